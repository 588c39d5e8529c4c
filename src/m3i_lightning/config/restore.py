"""A trained model back from a Lightning checkpoint, for evaluation and export.

The training run stores its resolved config and class count in every checkpoint
(:class:`StoreConfig`); the factory then rebuilds exactly the trained modules. Only what is
evaluated or exported is rebuilt: the backbone and, for runs with an image-text objective
(:class:`~m3i_lightning.objectives.capabilities.ImageText`, e.g. ``clip``), that head, so
neither the teacher (a frozen teacher's weights file may be gone) nor the other heads are
needed.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from omegaconf import DictConfig, OmegaConf

from m3i_lightning.config.factory import (
    build_objectives,
    build_tokenizer_from,
    objective_class,
    objective_context,
    student_backbone,
)
from m3i_lightning.core.errors import ConfigError
from m3i_lightning.evaluation.protocols import TrainedModel
from m3i_lightning.objectives.capabilities import ImageText
from m3i_lightning.runtime.checkpointing import read_checkpoint

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
