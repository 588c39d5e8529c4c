"""Evaluation protocols of a trained encoder: kNN, linear probe, zero-shot, fine-tuning and the
segmentation probe, with the table that reports them. Plain options in, scores out: the
commands read the config and write ``eval.json``; fine-tuning is a callable they inject.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from m3i_lightning.backbone import Backbone
from m3i_lightning.core.distributed import sum_over_ranks, world
from m3i_lightning.core.errors import ConfigError, EmptySplitError, check_options
from m3i_lightning.core.shares import gather_rows, row_counts, split_loader
from m3i_lightning.data.module import held_out_options
from m3i_lightning.data.skips import summary, tally
from m3i_lightning.evaluation.knn import extract_features, knn_predict
from m3i_lightning.evaluation.probe import fit_linear_probe
from m3i_lightning.evaluation.segmentation import segmentation_probe
from m3i_lightning.evaluation.zeroshot import class_embeddings, class_prompts, zero_shot_predict
from m3i_lightning.objectives.capabilities import ImageText, image_text_objectives

log = logging.getLogger(__name__)


@dataclass
class TrainedModel:
    """What evaluation and export need: the backbone, and the image-text head (zero-shot, its
    text side exported) when the model was trained with one (else None); ``config`` is the
    training config when known (a checkpoint), None for an exported folder."""

    backbone: Backbone
    image_text: ImageText | None = None
    config: Mapping | None = None

    @property
    def tokenizer(self):
        """The image-text head's tokenizer, for the data's captions; None without one."""
        return None if self.image_text is None else self.image_text.tokenizer



def top1(predicted: Tensor, labels: Tensor) -> float:
    return (predicted.cpu() == labels.cpu()).float().mean().item()


MIN_HELD_OUT, MIN_HELD_OUT_PER_CLASS = 50, 10  # below these, top-1 is mostly noise

CLASSIFICATION = ("knn", "linear", "zero_shot")  # scored on features of the data's images
PROTOCOLS = (*CLASSIFICATION, "finetune", "segmentation")
NEEDS_LABELS = (*CLASSIFICATION, "finetune")


def selected_protocols(protocols: Sequence[str] | None, image_text: bool) -> list[str]:
    """The protocols to run: ``protocols`` in :data:`PROTOCOLS` order, or by default kNN,
    linear probe and, with an image-text head (``image_text``), zero-shot."""
    if protocols is None:
        return ["knn", "linear", *(["zero_shot"] if image_text else [])]
    check_protocols(protocols)
    if "zero_shot" in protocols and not image_text:
        raise ConfigError("protocol zero_shot needs a model trained with an image-text "
                          f"objective (one of {image_text_objectives()})")
    return [p for p in PROTOCOLS if p in protocols]


def label_free(protocols: Sequence[str], requested: Sequence[str] | None) -> list[str]:
    """The ``protocols`` that data without labels can run; those it cannot that the config
    names (``requested``, None for the defaults) are said in a warning, not dropped silently."""
    dropped = [p for p in protocols if p in NEEDS_LABELS]
    if requested is not None and dropped:
        log.warning("protocols %s skipped: they need labels and the data has none "
                    "(data.labels=true and labelled images, e.g. class folders)", dropped)
    return [p for p in protocols if p not in NEEDS_LABELS]


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
    """Top-1 of each protocol, and how many labelled images each split gave
    (``sizes["train"]``, ``sizes["val"]``) and how many samples it skipped as unusable, an
    unreadable image or a label outside the classes (``sizes["train_skipped"]``,
    ``sizes["val_skipped"]``)."""

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


def _skipped(skipped: list[str], split: str) -> int:
    """How many samples of ``split`` every rank skipped as unusable (a collective), logged
    once with the most frequent reasons."""
    total = int(sum_over_ranks(torch.tensor(float(len(skipped)))).item())
    if total and world()[0] == 0:
        log.warning("evaluation skipped %d %s sample(s) (rank 0's: %s)", total, split,
                    summary(*tally(skipped)) or "none")
    return total


def _features(model: TrainedModel, datamodule, split: str,
              gather: bool) -> tuple[Tensor, Tensor, int]:
    """The labelled features of this rank's share of ``split`` (``gather``: of every rank's),
    on the model's device, where the kNN and the probe then run, and how many samples of the
    split were skipped as unusable."""
    device = next(model.backbone.parameters()).device
    loader = split_loader(datamodule, split)
    skipped: list[str] = []
    features, labels = extract_features(model.backbone, loader, gather=gather, skipped=skipped)
    count = _skipped(skipped, split)
    return (*_labelled(features.to(device), labels.to(device), split, datamodule), count)


def evaluate(model: TrainedModel, datamodule, knn: Mapping, probe: Mapping,
             templates: Sequence[str] | None = None,
             protocols: Sequence[str] = CLASSIFICATION) -> Evaluation:
    """Top-1 of each of the classification ``protocols`` the model supports. Features of the
    train split (memory, probe training set) and of the val split (queries) are extracted
    once and shared; ``templates``: the zero-shot prompts (``zeroshot.templates``, see
    :mod:`zeroshot`). :class:`EmptySplitError` when a split has no labelled image.

    Under a process group every rank calls it (a collective) with the whole model and extracts
    its share of each split: the training features stay sharded (kNN bank searched shard by
    shard, probe trained DDP-style, see
    :func:`~m3i_lightning.evaluation.probe.fit_linear_probe`), the queries are gathered; every
    rank returns the one-process result."""
    *train, train_skipped = _features(model, datamodule, "train", gather=False)
    *val, val_skipped = _features(model, datamodule, "val", gather=True)
    num_classes = datamodule.num_classes
    shares = row_counts(train[1])
    sizes = {"train": sum(shares), "val": len(val[1]), "train_skipped": train_skipped,
             "val_skipped": val_skipped}
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
    if model.image_text is not None and "zero_shot" in protocols:
        classes = class_embeddings(model.image_text, class_prompts(datamodule, templates))
        predicted = zero_shot_predict(model.image_text, val[0], classes)
        results["zero_shot_top1"] = top1(predicted, val[1])
    return Evaluation(results, sizes)


def run_protocols(model: TrainedModel, datamodule, protocols: Sequence[str], *,
                  knn: Mapping, probe: Mapping, templates: Sequence[str] | None = None,
                  segmentation: Mapping | None = None,
                  finetune: Callable[[Backbone], float] | None = None) -> Evaluation:
    """Each of ``protocols`` (from :func:`selected_protocols`): the classification ones on
    ``datamodule`` (None when none is selected), ``segmentation`` with the ``segmentation``
    options, ``finetune`` by calling ``finetune(backbone)`` (the fine-tuning command's run,
    injected by the caller, returns its top-1). Under a process group every rank calls it: the
    classification protocols run on every rank's share (:func:`evaluate`); fine-tuning and the
    segmentation probe run on one process, rank 0, whose results alone are reported.

    Args:
        model: the backbone (and image-text head) to score.
        datamodule: the data with its train / val splits.
        protocols: a subset of :data:`PROTOCOLS`.
        knn: ``k`` and ``temperature`` (and ``chunk_size``) of the kNN classifier.
        probe: the linear probe's ``epochs``, ``batch_size``, ``lr``, ``weight_decay``.
        templates: zero-shot prompt templates (None: the defaults).
        segmentation: options of :func:`~m3i_lightning.evaluation.segmentation.segmentation_probe`.
        finetune: fine-tunes a copy of the backbone and returns its top-1.
    """
    classification = [p for p in protocols if p in CLASSIFICATION]
    evaluation = Evaluation({}, {})
    if classification:
        evaluation = evaluate(model, datamodule, knn, probe, templates, classification)
    if world()[0] != 0:
        return evaluation
    if "finetune" in protocols:
        if finetune is None:
            raise ConfigError("protocol finetune needs a fine-tuning run: pass finetune=")
        evaluation.results["finetune_top1"] = finetune(model.backbone)
    if "segmentation" in protocols:
        score = segmentation_probe(model.backbone, segmentation or {})
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
             "zero_shot_top1": "zero-shot top-1 (class prompts)",
             "finetune_top1": "fine-tuning top-1 (finetune recipe)"}
    sizes, captions = evaluation.sizes, []
    if "val" in sizes:
        skipped = [f"{sizes[f'{split}_skipped']} {name}"
                   for split, name in (("val", "held-out"), ("train", "training"))
                   if sizes.get(f"{split}_skipped")]
        captions.append(f"{data + ': ' if data else ''}{sizes['val']} held-out images scored "
                        f"against {sizes['train']} training images" + (
                            f" ({' and '.join(skipped)} samples skipped as unusable)"
                            if skipped else ""))
    if segmentation is not None and "segmentation_val" in sizes:
        source = segmentation["data"]["source"]
        names["segmentation_miou"] = f"segmentation mIoU ({segmentation['epochs']} epochs)"
        captions.append(f"segmentation: {source} data, {sizes['segmentation_val']} held-out "
                        f"images, probe trained on {sizes['segmentation_train']}")
    rows = [f"| {names[key]:<36} | {100 * value:6.2f}% |"
            for key, value in evaluation.results.items()]
    header = f"| {'held-out split':<36} | {'score':>7} |"
    return "\n".join(["; ".join(captions), "", header, f"|{'-' * 38}|{'-' * 9}|", *rows])
