"""``python -m m3i_lightning.eval checkpoint=PATH`` (or ``backbone_dir=DIR``): kNN, linear-probe
and, for models trained with clip, zero-shot top-1 on the held-out split; prints a table and
writes ``eval.json``. The training command runs the same :func:`evaluate` at its end.

The data comes from the command's config groups (``data=...``) at the model's resolution;
the model from the checkpoint's stored config or the exported folder.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from m3i_lightning.errors import ConfigError, M3IError
from m3i_lightning.export import load_exported
from m3i_lightning.factory import build_datamodule
from m3i_lightning.knn import extract_features, knn_predict
from m3i_lightning.probe import fit_linear_probe
from m3i_lightning.restore import TrainedModel, load_checkpoint
from m3i_lightning.zeroshot import class_embeddings, class_prompts, zero_shot_predict

RESULTS_FILE = "eval.json"


def top1(predicted: Tensor, labels: Tensor) -> float:
    return (predicted.cpu() == labels.cpu()).float().mean().item()


def _labelled(features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    known = labels >= 0
    if not known.any():
        raise ConfigError("evaluation needs labels: the data gave none (data.labels=false?)")
    return features[known], labels[known]


def evaluate(model: TrainedModel, datamodule, knn: Mapping, probe: Mapping) -> dict[str, float]:
    """Top-1 of every protocol the model supports. Features of the train split (memory,
    probe training set) and of the val split (queries) are extracted once and shared."""
    train = _labelled(*extract_features(model.backbone, datamodule.eval_dataloader("train")))
    val = _labelled(*extract_features(model.backbone, datamodule.eval_dataloader("val")))
    num_classes = datamodule.num_classes
    scores = knn_predict(*train, val[0], num_classes, knn["k"], knn["temperature"])
    results = {"knn_top1": top1(scores.argmax(-1), val[1])}
    linear = fit_linear_probe(*train, num_classes, **probe)
    results["linear_top1"] = top1(linear(val[0]).argmax(-1), val[1])
    if model.clip is not None:
        classes = class_embeddings(model.clip, model.tokenizer, class_prompts(datamodule))
        results["zero_shot_top1"] = top1(zero_shot_predict(model.clip, val[0], classes), val[1])
    return results


def format_table(results: Mapping[str, float], knn: Mapping, probe: Mapping) -> str:
    """A Markdown table of the top-1 results, naming each protocol's settings."""
    names = {"knn_top1": f"kNN top-1 (k={knn['k']}, T={knn['temperature']})",
             "linear_top1": f"linear-probe top-1 ({probe['epochs']} epochs)",
             "zero_shot_top1": "zero-shot top-1 (clip prompts)"}
    rows = [f"| {names[key]:<32} | {100 * value:6.2f}% |" for key, value in results.items()]
    header = f"| {'held-out split':<32} | {'top-1':>7} |"
    return "\n".join([header, f"|{'-' * 34}|{'-' * 9}|", *rows])


def report(results: Mapping[str, float], cfg: DictConfig, out_dir: Path,
           source: Mapping[str, str]) -> Path:
    """Print the table and write ``eval.json`` (results, their settings and what was evaluated)."""
    knn, probe = OmegaConf.to_container(cfg.knn), OmegaConf.to_container(cfg.probe)
    print(format_table(results, knn, probe))
    path = Path(out_dir) / RESULTS_FILE
    path.write_text(json.dumps({**source, "results": results, "knn": knn, "probe": probe},
                               indent=2))
    return path


def load_trained(cfg: DictConfig) -> tuple[TrainedModel, dict[str, str]]:
    """The model named by exactly one of ``checkpoint=`` and ``backbone_dir=``."""
    if bool(cfg.checkpoint) == bool(cfg.backbone_dir):
        raise ConfigError("give exactly one of checkpoint=PATH (a training checkpoint) or "
                          "backbone_dir=DIR (an exported folder)")
    if cfg.checkpoint:
        return load_checkpoint(cfg.checkpoint), {"checkpoint": str(cfg.checkpoint)}
    return load_exported(cfg.backbone_dir), {"backbone_dir": str(cfg.backbone_dir)}


def evaluate_command(cfg: DictConfig, out_dir: Path) -> dict[str, float]:
    model, source = load_trained(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.backbone.to(device)
    if model.clip is not None:
        model.clip.to(device)
    cfg.data.img_size = model.backbone.img_size[0]
    datamodule = build_datamodule(cfg.data, model.tokenizer)
    datamodule.setup("validate")
    results = evaluate(model, datamodule, cfg.knn, cfg.probe)
    print(f"results: {report(results, cfg, out_dir, source)}")
    return results


@hydra.main(config_path="conf", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        evaluate_command(cfg, Path(HydraConfig.get().runtime.output_dir))
    except M3IError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
