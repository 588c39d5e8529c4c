"""``python -m m3i_lightning.eval checkpoint=PATH`` (or ``backbone_dir=DIR``): the scores of the
``protocols`` (:data:`PROTOCOLS`; by default kNN, linear-probe and, for models trained with an
image-text objective such as clip, zero-shot top-1 on the held-out split); prints a table and
writes ``eval.json``. The training command runs the same :func:`run_protocols` at its end,
with the same option.

The model comes from the checkpoint's stored config or the exported folder; the data, at the
model's resolution, is by default the one the checkpoint was trained on (``data=...`` chooses
another; ``data.<key>=...`` changes one option); an exported folder is evaluated on the
command's ``data`` config. The table and ``eval.json`` name the data and both split sizes.

``trainer.devices=N`` (``trainer.accelerator``, ``trainer.num_nodes``, ``strategy=ddp``, as for
training) evaluates on N processes, each on its share of the data, with the one-process result
(see :func:`evaluate`); only rank 0 prints the table and writes ``eval.json``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from lightning.fabric import Fabric
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

from m3i_lightning.commands.command_line import run_with_arguments
from m3i_lightning.commands.finetune import finetune_top1
from m3i_lightning.config.artifacts import load_exported
from m3i_lightning.config.factory import build_datamodule
from m3i_lightning.config.restore import load_checkpoint
from m3i_lightning.core.errors import ConfigError, one_line_errors
from m3i_lightning.evaluation.protocols import (
    CLASSIFICATION,
    Evaluation,
    TrainedModel,
    check_eval_options,
    check_protocols,
    describe_data,
    format_table,
    run_protocols,
    selected_protocols,
)

log = logging.getLogger(__name__)

RESULTS_FILE = "eval.json"


def report(evaluation: Evaluation, cfg: DictConfig, out_dir: Path,
           source: Mapping[str, str]) -> Path:
    """Print the table and write ``eval.json`` (results, their settings, the data and its
    split sizes, and what was evaluated)."""
    knn, probe = OmegaConf.to_container(cfg.knn), OmegaConf.to_container(cfg.probe)
    segmentation = OmegaConf.to_container(cfg.segmentation, resolve=True)
    data = describe_data(cfg.data)
    print(format_table(evaluation, knn, probe, data, segmentation))
    settings = {"knn": knn, "probe": probe}
    if "segmentation_miou" in evaluation.results:
        settings["segmentation"] = segmentation
    if "finetune_top1" in evaluation.results:
        settings["finetune"] = OmegaConf.to_container(cfg.finetune, resolve=True)
    path = Path(out_dir) / RESULTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**source, "results": evaluation.results,
                                "data": {"config": data, "samples": evaluation.sizes},
                                **settings}, indent=2))
    return path


def run_cfg_protocols(model: TrainedModel, datamodule, cfg: DictConfig, out_dir: Path,
                      protocols) -> Evaluation:
    """:func:`run_protocols` with the options of ``cfg`` (``knn``, ``probe``, ``zeroshot``,
    ``segmentation``) and fine-tuning by the ``finetune:`` recipe in ``out_dir/finetune``."""
    return run_protocols(
        model, datamodule, protocols, knn=cfg.knn, probe=cfg.probe,
        templates=cfg.zeroshot.templates,
        segmentation=OmegaConf.to_container(cfg.segmentation, resolve=True),
        finetune=lambda backbone: finetune_top1(backbone, cfg, Path(out_dir) / "finetune"))


def load_trained(cfg: DictConfig) -> tuple[TrainedModel, dict[str, str]]:
    """The model named by exactly one of ``checkpoint=`` and ``backbone_dir=``."""
    if bool(cfg.checkpoint) == bool(cfg.backbone_dir):
        raise ConfigError("give exactly one of checkpoint=PATH (a training checkpoint) or "
                          "backbone_dir=DIR (an exported folder)")
    if cfg.checkpoint:
        return load_checkpoint(cfg.checkpoint), {"checkpoint": str(cfg.checkpoint)}
    return load_exported(cfg.backbone_dir), {"backbone_dir": str(cfg.backbone_dir)}


def data_config(cfg: DictConfig, trained: DictConfig | None, overrides,
                img_size: int) -> DictConfig:
    """The data to evaluate on, at the model's ``img_size``: that of the training run (stored
    in its checkpoint) unless the command names another with ``data=``; ``data.<key>=``
    overrides apply either way. An exported folder stores no data: the command's own config
    then."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    chosen = trained is None or any(o.key_or_group == "data" for o in parsed)
    data = OmegaConf.create(OmegaConf.to_container(cfg.data if chosen else trained.data,
                                                   resolve=True))
    if not chosen:
        for override in parsed:
            if override.key_or_group.startswith("data.") and not override.is_delete():
                OmegaConf.update(data, override.key_or_group.removeprefix("data."),
                                 override.value(), merge=True, force_add=True)
    return OmegaConf.merge(data, {"img_size": img_size})


EVAL_STRATEGIES = ("auto", "ddp")


def launch(cfg: DictConfig) -> Fabric:
    """The processes of ``trainer.accelerator`` / ``devices`` / ``num_nodes`` and
    ``strategy=``, as for training: Lightning Fabric starts the others (re-running the command
    line, or joining those torchrun / SLURM started) and sets up the process group. The frozen
    model is whole on every process, so the sharded strategies have nothing to shard."""
    if cfg.strategy.name not in EVAL_STRATEGIES:
        raise ConfigError(f"evaluation runs with strategy= one of {EVAL_STRATEGIES} (the frozen "
                          f"model is replicated on every process), not '{cfg.strategy.name}'")
    trainer = cfg.trainer
    try:
        fabric = Fabric(accelerator=trainer.accelerator, devices=trainer.devices,
                        num_nodes=trainer.num_nodes, strategy=cfg.strategy.name)
    except (MisconfigurationException, ValueError, TypeError) as err:
        raise ConfigError(f"trainer options: {err}") from None
    fabric.launch()
    return fabric


def evaluate_command(cfg: DictConfig, out_dir: Path, overrides=()) -> dict[str, float]:
    """``overrides``: the command line's, which say whether it chose the data itself. Every
    process evaluates its share (:func:`evaluate`); rank 0 prints and writes the results."""
    check_eval_options(cfg.knn, cfg.probe)
    check_protocols(cfg.protocols)
    fabric = launch(cfg)
    model, source = load_trained(cfg)
    protocols = selected_protocols(cfg.protocols, model.image_text is not None)
    # the command's config with the data it evaluates on (the given one stays as it is)
    data = data_config(cfg, model.config, overrides, model.backbone.img_size[0])
    evaluated = OmegaConf.create({**OmegaConf.to_container(cfg), "data": data})
    model.backbone.to(fabric.device)
    if model.image_text is not None:
        model.image_text.to(fabric.device)
    datamodule = None
    if any(p in CLASSIFICATION for p in protocols):
        datamodule = build_datamodule(data, model.tokenizer)
        datamodule.setup("validate")
    evaluation = run_cfg_protocols(model, datamodule, evaluated, out_dir, protocols)
    if fabric.is_global_zero:
        print(f"results: {report(evaluation, evaluated, out_dir, source)}")
    return evaluation.results


@hydra.main(config_path="../conf", config_name="eval", version_base="1.3")
@one_line_errors
def eval_app(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    evaluate_command(cfg, Path(hydra_cfg.runtime.output_dir), hydra_cfg.overrides.task)


@one_line_errors
def main(argv: list[str] | None = None) -> None:
    """The eval command on the command line's overrides, or on ``argv`` from Python."""
    run_with_arguments(eval_app, argv, "eval")


if __name__ == "__main__":
    main()
