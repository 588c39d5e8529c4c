"""``python -m m3i_lightning.eval checkpoint=PATH`` (or ``backbone_dir=DIR``): the scores of the
``protocols`` (:data:`PROTOCOLS`; by default kNN, linear-probe and, for models trained with
clip, zero-shot top-1 on the held-out split); prints a table and writes ``eval.json``. The
training command runs the same :func:`run_protocols` at its end, with the same option.

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from lightning.fabric import Fabric
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from m3i_lightning.data.module import held_out_options
from m3i_lightning.distributed import world
from m3i_lightning.errors import ConfigError, EmptySplitError, check_options, one_line_errors
from m3i_lightning.export import load_exported
from m3i_lightning.factory import build_datamodule
from m3i_lightning.knn import extract_features, knn_predict
from m3i_lightning.probe import fit_linear_probe
from m3i_lightning.restore import TrainedModel, load_checkpoint
from m3i_lightning.shares import gather_rows, row_counts, split_loader
from m3i_lightning.zeroshot import class_embeddings, class_prompts, zero_shot_predict

log = logging.getLogger("m3i_lightning")

RESULTS_FILE = "eval.json"


def top1(predicted: Tensor, labels: Tensor) -> float:
    return (predicted.cpu() == labels.cpu()).float().mean().item()


MIN_HELD_OUT, MIN_HELD_OUT_PER_CLASS = 50, 10  # below these, top-1 is mostly noise

CLASSIFICATION = ("knn", "linear", "zero_shot")  # scored on features of the data's images
PROTOCOLS = (*CLASSIFICATION, "finetune", "segmentation")
NEEDS_LABELS = (*CLASSIFICATION, "finetune")


def selected_protocols(protocols: Sequence[str] | None, clip: bool) -> list[str]:
    """The protocols to run: ``protocols`` in :data:`PROTOCOLS` order, or by default kNN,
    linear probe and, with a clip head (``clip``), zero-shot."""
    if protocols is None:
        return ["knn", "linear", *(["zero_shot"] if clip else [])]
    check_protocols(protocols)
    if "zero_shot" in protocols and not clip:
        raise ConfigError("protocol zero_shot needs a model trained with the clip objective")
    return [p for p in PROTOCOLS if p in protocols]


def check_protocols(protocols: Sequence[str] | None) -> None:
    """Refuse an unknown protocol name (or an empty list) before anything runs."""
    if protocols is None:
        return
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown or not protocols:
        raise ConfigError(f"protocols={list(protocols)}: choose a non-empty subset of "
                          f"{list(PROTOCOLS)}")


@dataclass
class Evaluation:
    """Top-1 of each protocol, and how many labelled images each split gave."""

    results: dict[str, float]
    sizes: dict[str, int]


def _labelled(features: Tensor, labels: Tensor, split: str, datamodule) -> tuple[Tensor, Tensor]:
    """The labelled rows of this rank's ``features`` and ``labels``; :class:`EmptySplitError`
    on every rank when no rank holds one (a collective)."""
    known = labels >= 0
    if not sum(row_counts(labels[known])):
        where = (held_out_options(datamodule) if split == "val" else
                 "labelled training images (data.labels=true and a label for some images)")
        raise EmptySplitError(f"the {split} split has no labelled image, so kNN, linear probe "
                              f"and zero-shot cannot be scored; evaluation needs {where}")
    return features[known], labels[known]


def _features(model: TrainedModel, datamodule, split: str, gather: bool) -> tuple[Tensor, Tensor]:
    """The labelled features of this rank's share of ``split`` (``gather``: of every rank's),
    on the model's device, where the kNN and the probe then run."""
    device = next(model.backbone.parameters()).device
    loader = split_loader(datamodule, split)
    features, labels = extract_features(model.backbone, loader, gather=gather)
    return _labelled(features.to(device), labels.to(device), split, datamodule)


def evaluate(model: TrainedModel, datamodule, knn: Mapping, probe: Mapping,
             templates: Sequence[str] | None = None,
             protocols: Sequence[str] = CLASSIFICATION) -> Evaluation:
    """Top-1 of each of the classification ``protocols`` the model supports. Features of the
    train split (memory, probe training set) and of the val split (queries) are extracted
    once and shared; ``templates``: the zero-shot prompts (``zeroshot.templates``, see
    :mod:`zeroshot`). :class:`EmptySplitError` when a split has no labelled image.

    Under a process group every rank calls it (a collective) with the whole model and extracts
    its share of each split: the training features stay sharded (kNN bank searched shard by
    shard, probe trained DDP-style, see :func:`~m3i_lightning.probe.fit_linear_probe`), the
    queries are gathered; every rank returns the one-process result."""
    train = _features(model, datamodule, "train", gather=False)
    val = _features(model, datamodule, "val", gather=True)
    num_classes = datamodule.num_classes
    shares = row_counts(train[1])
    sizes = {"train": sum(shares), "val": len(val[1])}
    if sizes["val"] < max(MIN_HELD_OUT, MIN_HELD_OUT_PER_CLASS * num_classes) and world()[0] == 0:
        log.warning("the held-out split has only %d labelled images for %d classes: its top-1 "
                    "is mostly noise; give a bigger one with %s", sizes["val"], num_classes,
                    held_out_options(datamodule))
    results = {}
    if "knn" in protocols:
        # a shard with fewer than k rows could miss neighbours it owns: such a bank is gathered
        sharded_bank = len(shares) > 1 and min(shares) >= knn["k"]
        bank = train if sharded_bank else tuple(map(gather_rows, train))
        scores = knn_predict(*bank, val[0], num_classes, knn["k"], knn["temperature"],
                             knn.get("chunk_size"), sharded_bank=sharded_bank)
        results["knn_top1"] = top1(scores.argmax(-1), val[1])
    if "linear" in protocols:
        linear = fit_linear_probe(*train, num_classes, **probe, sharded=True)
        results["linear_top1"] = top1(linear(val[0]).argmax(-1), val[1])
    if model.clip is not None and "zero_shot" in protocols:
        prompts = class_prompts(datamodule, templates)
        classes = class_embeddings(model.clip, model.tokenizer, prompts)
        results["zero_shot_top1"] = top1(zero_shot_predict(model.clip, val[0], classes), val[1])
    return Evaluation(results, sizes)


def run_protocols(model: TrainedModel, datamodule, cfg: DictConfig, out_dir: Path,
                  protocols: Sequence[str]) -> Evaluation:
    """Each of ``protocols`` (from :func:`selected_protocols`): the classification ones on
    ``datamodule`` (None when none is selected), ``segmentation`` with the ``segmentation:``
    options, ``finetune`` with the ``finetune:`` recipe in ``out_dir/finetune``. Under a
    process group every rank calls it: the classification protocols run on every rank's share
    (:func:`evaluate`); fine-tuning and the segmentation probe run on one process, rank 0,
    whose results alone are reported."""
    classification = [p for p in protocols if p in CLASSIFICATION]
    evaluation = Evaluation({}, {})
    if classification:
        evaluation = evaluate(model, datamodule, cfg.knn, cfg.probe, cfg.zeroshot.templates,
                              classification)
    if world()[0] != 0:
        return evaluation
    if "finetune" in protocols:
        from m3i_lightning.finetune.protocol import finetune_top1

        evaluation.results["finetune_top1"] = finetune_top1(model.backbone, cfg,
                                                            Path(out_dir) / "finetune")
    if "segmentation" in protocols:
        from m3i_lightning.segmentation import segmentation_probe

        score = segmentation_probe(model.backbone, OmegaConf.to_container(cfg.segmentation,
                                                                          resolve=True))
        evaluation.results["segmentation_miou"] = score.miou
        evaluation.sizes.update({f"segmentation_{k}": v for k, v in score.sizes.items()})
    return evaluation


def check_eval_options(knn: Mapping, probe: Mapping) -> None:
    """Refuse kNN / probe settings that give no or meaningless scores, before any training."""
    checks = {"knn.k": (knn["k"], lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
              "knn.temperature": (knn["temperature"], lambda v: v > 0, "a number > 0"),
              "probe.epochs": (probe["epochs"], lambda v: isinstance(v, int) and v >= 1,
                               "an integer >= 1"),
              "probe.batch_size": (probe["batch_size"], lambda v: isinstance(v, int) and v >= 1,
                                   "an integer >= 1"),
              "probe.lr": (probe["lr"], lambda v: v > 0, "a number > 0"),
              "probe.weight_decay": (probe["weight_decay"], lambda v: v >= 0, "a number >= 0")}
    check_options(checks)


def describe_data(data: Mapping) -> str:
    """``data=<kind>`` and where it is read from: the option naming the files, if any."""
    kind = data.get("module") or data.get("name")
    source = next((f"{key}={data[key]}" for key in ("path", "urls", "name")
                   if key in data and data[key] and data[key] != kind), None)
    return f"data={kind}" + (f" {source}" if source else "")


def format_table(evaluation: Evaluation, knn: Mapping, probe: Mapping, data: str = "",
                 segmentation: Mapping | None = None) -> str:
    """A Markdown table of the results, naming each protocol's settings, the data and the
    split sizes."""
    names = {"knn_top1": f"kNN top-1 (k={knn['k']}, T={knn['temperature']})",
             "linear_top1": f"linear-probe top-1 ({probe['epochs']} epochs)",
             "zero_shot_top1": "zero-shot top-1 (clip prompts)",
             "finetune_top1": "fine-tuning top-1 (finetune recipe)"}
    sizes, captions = evaluation.sizes, []
    if "val" in sizes:
        captions.append(f"{data + ': ' if data else ''}{sizes['val']} held-out images scored "
                        f"against {sizes['train']} training images")
    if segmentation is not None and "segmentation_val" in sizes:
        source = segmentation["data"]["source"]
        names["segmentation_miou"] = f"segmentation mIoU ({segmentation['epochs']} epochs)"
        captions.append(f"segmentation: {source} data, {sizes['segmentation_val']} held-out "
                        f"images, probe trained on {sizes['segmentation_train']}")
    rows = [f"| {names[key]:<36} | {100 * value:6.2f}% |"
            for key, value in evaluation.results.items()]
    header = f"| {'held-out split':<36} | {'score':>7} |"
    return "\n".join(["; ".join(captions), "", header, f"|{'-' * 38}|{'-' * 9}|", *rows])


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


def load_trained(cfg: DictConfig) -> tuple[TrainedModel, dict[str, str]]:
    """The model named by exactly one of ``checkpoint=`` and ``backbone_dir=``."""
    if bool(cfg.checkpoint) == bool(cfg.backbone_dir):
        raise ConfigError("give exactly one of checkpoint=PATH (a training checkpoint) or "
                          "backbone_dir=DIR (an exported folder)")
    if cfg.checkpoint:
        return load_checkpoint(cfg.checkpoint), {"checkpoint": str(cfg.checkpoint)}
    return load_exported(cfg.backbone_dir), {"backbone_dir": str(cfg.backbone_dir)}


def data_config(cfg: DictConfig, trained: DictConfig | None, overrides) -> DictConfig:
    """The data to evaluate on: that of the training run (stored in its checkpoint) unless the
    command names another with ``data=``; ``data.<key>=`` overrides apply either way. An
    exported folder stores no data: the command's own config then."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    if trained is None or any(o.key_or_group == "data" for o in parsed):
        return cfg.data
    data = OmegaConf.create(OmegaConf.to_container(trained.data, resolve=True))
    for override in parsed:
        if override.key_or_group.startswith("data.") and not override.is_delete():
            OmegaConf.update(data, override.key_or_group.removeprefix("data."),
                             override.value(), merge=True, force_add=True)
    return data


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
    protocols = selected_protocols(cfg.protocols, model.clip is not None)
    cfg.data = data_config(cfg, model.config, overrides)
    model.backbone.to(fabric.device)
    if model.clip is not None:
        model.clip.to(fabric.device)
    cfg.data.img_size = model.backbone.img_size[0]
    datamodule = None
    if any(p in CLASSIFICATION for p in protocols):
        datamodule = build_datamodule(cfg.data, model.tokenizer)
        datamodule.setup("validate")
    evaluation = run_protocols(model, datamodule, cfg, out_dir, protocols)
    if fabric.is_global_zero:
        print(f"results: {report(evaluation, cfg, out_dir, source)}")
    return evaluation.results


@hydra.main(config_path="conf", config_name="eval", version_base="1.3")
@one_line_errors
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    evaluate_command(cfg, Path(hydra_cfg.runtime.output_dir), hydra_cfg.overrides.task)


if __name__ == "__main__":
    main()
