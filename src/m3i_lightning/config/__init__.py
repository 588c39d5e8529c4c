"""The only library code that reads OmegaConf: builds data, backbone, objectives and engine from a
composed config, restores checkpoints with their stored config, writes exported artifacts."""
