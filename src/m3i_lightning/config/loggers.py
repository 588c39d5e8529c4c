"""The loggers of a run folder, from the ``logger:`` config."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.loggers import Logger, TensorBoardLogger
from omegaconf import DictConfig

from m3i_lightning.core.errors import ConfigError
from m3i_lightning.runtime.metrics_log import ResumedCSVLogger, RunCSVLogger

LOGGERS = ("csv", "tensorboard")


def run_loggers(cfg: DictConfig, out: Path, resuming: bool = False) -> list[Logger]:
    """CSV (kept and continued when ``resuming``), plus TensorBoard with logger=tensorboard."""
    name = cfg.logger.name
    if name not in LOGGERS:
        raise ConfigError(f"unknown logger '{name}'; choose one of {LOGGERS}")
    csv_logger = ResumedCSVLogger if resuming else RunCSVLogger
    loggers: list[Logger] = [csv_logger(out, name="", version="")]
    if name == "tensorboard":
        try:
            loggers.append(TensorBoardLogger(out, name="", version="tensorboard"))
        except ModuleNotFoundError:
            raise ConfigError("logger=tensorboard needs TensorBoard: "
                              "pip install 'm3i_lightning[tensorboard]'") from None
    return loggers
