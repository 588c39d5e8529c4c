"""What a training run adds around ``trainer.fit``, all inside its run folder.

Before: the loggers (CSV always, since the curves are drawn from ``metrics.csv``; TensorBoard
too with ``logger=tensorboard``) and the callbacks: the config stored in each checkpoint,
the online probes when the data has labels, the reconstruction grids. After, on rank 0: the
exported model, the evaluation table (``eval.json``) and the curves.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from omegaconf import DictConfig

from m3i_lightning.errors import ConfigError, EmptySplitError
from m3i_lightning.eval import evaluate, report
from m3i_lightning.export import export_model
from m3i_lightning.metrics_log import LogLastStep, ResumedCSVLogger, RunCSVLogger
from m3i_lightning.monitors import ProbeMonitor
from m3i_lightning.pictures import ReconstructionGrid, plot_curves
from m3i_lightning.restore import StoreConfig, TrainedModel

log = logging.getLogger("m3i_lightning")

PICTURES_DIR = "pictures"
EXPORT_DIR = "backbone"
LOGGERS = ("csv", "tensorboard")


def evaluable(datamodule) -> bool:
    """Labels and the evaluation loaders (``eval_dataloader(split)``, and ``val_dataloader``
    giving memory then queries, see :mod:`m3i_lightning.monitors`)."""
    return "label" in datamodule.provides and hasattr(datamodule, "eval_dataloader")


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


def run_callbacks(cfg: DictConfig, datamodule, out: Path) -> list[L.Callback]:
    callbacks = [StoreConfig(cfg, datamodule.num_classes), LogLastStep(),
                 ReconstructionGrid(out / PICTURES_DIR, cfg.pictures.every_n_epochs,
                                    cfg.pictures.num_images)]
    if evaluable(datamodule):
        callbacks.append(ProbeMonitor(datamodule.num_classes, cfg.knn.k, cfg.knn.temperature,
                                      cfg.probe))
    return callbacks


def finish_run(trainer: L.Trainer, model, datamodule, tokenizer, cfg: DictConfig,
               out: Path) -> dict:
    """Export, evaluate (table printed, ``eval.json``) and draw the curves; rank 0 only. A
    split without labelled images skips the evaluation with a warning naming the options that
    supply it: a finished run never turns into a crash."""
    if not trainer.is_global_zero:
        return {}
    clip = model.heads["clip"] if "clip" in model.heads else None
    trained = TrainedModel(model.backbone, clip, tokenizer, cfg)
    results: dict = {}
    if cfg.export:
        results["export"] = str(export_model(trained, out / EXPORT_DIR))
    if evaluable(datamodule):
        try:
            evaluation = evaluate(trained, datamodule, cfg.knn, cfg.probe)
        except EmptySplitError as err:
            log.warning("end-of-run evaluation skipped: %s", err)
        else:
            results.update(evaluation.results)
            report(evaluation, cfg, out, {"run_dir": str(out)})
    results["curves"] = str(plot_curves(out / "metrics.csv", out / PICTURES_DIR / "curves.png"))
    return results
