"""The Lightning Trainer of a command, from the ``trainer:`` config: the same options, console and
batch split for pre-training, fine-tuning and evaluation."""

from __future__ import annotations

import lightning as L
import torch
from lightning.fabric import Fabric
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

from m3i_lightning.core.errors import ConfigError
from m3i_lightning.runtime.console import ParameterSummary, progress_bar, quiet_lightning


def trainer_kwargs(cfg: DictConfig) -> dict:
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    if kwargs["precision"] == "auto":
        kwargs["precision"] = "bf16-mixed" if torch.cuda.is_available() else "32-true"
    return kwargs


def build_trainer(cfg: DictConfig, **kwargs) -> L.Trainer:
    """``L.Trainer`` from ``cfg.trainer``; a value Lightning refuses names its option."""
    options = trainer_kwargs(cfg)
    try:
        return L.Trainer(**options, **kwargs)
    except (MisconfigurationException, ValueError, TypeError) as err:
        raise ConfigError(f"trainer options: {err}") from None


def console_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """The summary and progress bar of :mod:`~m3i_lightning.runtime.console`, where the trainer
    config keeps them on."""
    quiet_lightning()
    callbacks: list[L.Callback] = []
    if cfg.trainer.get("enable_model_summary", True):
        callbacks.append(ParameterSummary())
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(progress_bar(cfg.get("progress", "rich")))
    return callbacks


def process_count(cfg: DictConfig) -> int:
    """The processes the Trainer of ``cfg.trainer`` runs (nodes × devices per node), counted by
    Lightning's own rules before any Trainer exists, so the data is built with its
    per-process batch."""
    trainer = cfg.trainer
    try:
        return Fabric(accelerator=trainer.accelerator, devices=trainer.devices,
                      num_nodes=trainer.num_nodes).world_size
    except (MisconfigurationException, ValueError, TypeError) as err:
        raise ConfigError(f"trainer options: {err}") from None


def per_device_batch(global_batch_size: int, world_size: int) -> int:
    """Recipes state the paper's total batch; each process loads its share."""
    if global_batch_size % world_size:
        raise ConfigError(f"global_batch_size={global_batch_size} is not divisible by the "
                          f"{world_size} processes")
    return global_batch_size // world_size
