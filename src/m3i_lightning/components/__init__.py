"""Building blocks with no training loop: losses, distribution forms, pixel targets, heads and
predictors, masks, view geometry, the text tower, optimiser recipes. Torch (and timm / transformers
layers) only: no Lightning, no config."""
