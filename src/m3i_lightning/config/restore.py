"""A trained model back from a Lightning checkpoint, for evaluation and export.

The training run stores its resolved config and class count in every checkpoint
(:class:`StoreConfig`); the factory then rebuilds exactly the trained modules. Only what is
evaluated or exported is rebuilt: the backbone and, for runs with an image-text objective
(:class:`~m3i_lightning.objectives.capabilities.ImageText`, e.g. ``clip``), that head, so
neither the teacher (a frozen teacher's weights file may be gone) nor the other heads are
needed.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from m3i_lightning.config.factory import (
    build_objectives,
    build_tokenizer_from,
    given_options,
    objective_class,
    objective_context,
    student_backbone,
)
from m3i_lightning.core.errors import ConfigError
from m3i_lightning.evaluation.protocols import TrainedModel
from m3i_lightning.objectives.capabilities import ImageText
from m3i_lightning.runtime.checkpointing import read_checkpoint, read_weight_shapes

CONFIG_KEY = "m3i_config"
NUM_CLASSES_KEY = "m3i_num_classes"


class StoreConfig(L.Callback):
    """Adds the resolved training config and the number of classes to every checkpoint."""

    def __init__(self, cfg: DictConfig, num_classes: int) -> None:
        self.config = OmegaConf.to_container(cfg, resolve=True)
        self.num_classes = num_classes

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[CONFIG_KEY] = self.config
        checkpoint[NUM_CLASSES_KEY] = self.num_classes


def _with_prefix(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def image_text_objective(cfg: DictConfig) -> str | None:
    """The first objective of the run's ``cfg`` whose class offers
    :class:`~m3i_lightning.objectives.capabilities.ImageText`; None when none does."""
    selected = OmegaConf.to_container(cfg.objective, resolve=True) or {}
    return next((name for name, options in selected.items()
                 if issubclass(objective_class(name, dict(options or {})), ImageText)), None)


def load_checkpoint(path: str | Path) -> TrainedModel:
    """Rebuild the backbone (and image-text head) of a MultiObjective checkpoint on the CPU."""
    checkpoint = read_checkpoint(path, "checkpoint")
    if CONFIG_KEY not in checkpoint:
        raise ConfigError(f"{path} holds no training config ('{CONFIG_KEY}'): it was not "
                          "written by `python -m m3i_lightning`; export its backbone instead")
    cfg = OmegaConf.create(checkpoint[CONFIG_KEY])
    state = checkpoint["state_dict"]
    backbone = student_backbone(cfg)
    backbone.load_state_dict(_with_prefix(state, "backbone."))
    name = image_text_objective(cfg)
    if name is None:
        return TrainedModel(backbone, config=cfg)
    context = objective_context(backbone, checkpoint[NUM_CLASSES_KEY],
                                build_tokenizer_from(cfg.text))
    head = build_objectives({name: cfg.objective[name]}, context, cfg.get("heads"))[name]
    head.load_state_dict(_with_prefix(state, f"heads.{name}."))
    return TrainedModel(backbone, head, cfg)


def check_resumable(path: str | Path, model: torch.nn.Module, cfg: DictConfig) -> None:
    """Before the run writes anything: the checkpoint ``resume=`` gives can be read (the safe
    loader; a sharded folder's index and shards checked, no shard read) and holds this run's
    model, weight for weight and shape for shape. Lightning's loader would find out later, in
    a long ``load_state_dict`` traceback; this says in one line which options differ."""
    stored, shapes = read_weight_shapes(path, "resume")
    wanted = {k: tuple(v.shape) for k, v in model.state_dict().items() if hasattr(v, "shape")}
    if shapes == wanted:
        return
    missing = sorted(wanted.keys() - shapes.keys())
    extra = sorted(shapes.keys() - wanted.keys())
    reshaped = sorted(k for k in wanted.keys() & shapes.keys() if wanted[k] != shapes[k])
    counts = [f"{len(keys)} {what}, e.g. {keys[0]}" for keys, what in (
        (missing, "missing"), (extra, "not in this run's model"), (reshaped, "of other shapes"))
        if keys]
    trained = stored.get(CONFIG_KEY)
    before = model_options(trained) if trained is not None else {}
    now = model_options(OmegaConf.to_container(cfg, resolve=True))
    shared = set(before.get("objective", [])) & set(now["objective"])
    keys = [k for k in {**before, **now} if before.get(k) != now.get(k)
            and (not k.startswith("objective.") or k.split(".")[1] in shared)][:6]
    if trained is None:
        differ = "it holds no training config of this library"
    elif keys:
        differ = ("it was trained with " + ", ".join(f"{k}={before.get(k)}" for k in keys)
                  + "; this run asks for " + ", ".join(f"{k}={now.get(k)}" for k in keys))
    else:
        differ = "it was trained with other model options"
    raise ConfigError(f"resume={path} does not fit this run's model: {differ} (weights: "
                      f"{'; '.join(counts)}). Resume with the options it was trained with, or "
                      "start afresh (a new hydra.run.dir=..., or overwrite=true)")


def model_options(cfg: Mapping) -> dict[str, Any]:
    """The options of a run config that shape its model's weights, by key path: the
    objectives, the backbone and each objective's options (head sizes included)."""
    objectives = cfg.get("objective") or {}
    options: dict[str, Any] = {"objective": sorted(objectives)}
    options.update(_flat("backbone", cfg.get("backbone") or {}))
    for name, given in objectives.items():
        sizes = (cfg.get("heads") or {}).get(name)
        options.update(_flat(f"objective.{name}", given_options(given, sizes)))
    return options


def _flat(prefix: str, node: Mapping) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, Mapping):
            flat.update(_flat(f"{prefix}.{key}", value))
        else:
            flat[f"{prefix}.{key}"] = value
    return flat
