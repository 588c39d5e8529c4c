"""What a training run adds around ``trainer.fit``, all inside its run folder.

Admission, before anything is written: the folder can be created and written (checked by the
:class:`WritableRunFolder` Hydra callback before Hydra creates it, and for the folders a run
writes into), no other run holds it (:class:`~m3i_lightning.runtime.run_lock.RunLock`), and
checkpoints already there are reused only when asked. Hydra's own record of the run
(``.hydra/``: config, Hydra config, overrides) is written by :func:`write_record` once the run
is accepted, so a refused or failed start leaves the previous run's record as it was.

Before the fit: the loggers (CSV always, since the curves are drawn from ``metrics.csv``;
TensorBoard too with ``logger=tensorboard``) and the callbacks: the config stored in each
checkpoint, the online probes when the data has labels, the reconstruction grids. After, on
rank 0: the exported model, the evaluation table (``eval.json``) and the curves; the
evaluation itself runs on every rank.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf

from m3i_lightning.commands.eval import RESULTS_FILE, report, run_cfg_protocols
from m3i_lightning.config.artifacts import export_model
from m3i_lightning.config.model_card import write_model_card
from m3i_lightning.config.restore import StoreConfig
from m3i_lightning.core.errors import (
    ConfigError,
    EmptySplitError,
    exit_with,
    full_trace_wanted,
)
from m3i_lightning.evaluation.health import RepresentationHealth
from m3i_lightning.evaluation.interplay_monitor import InterplayMonitor
from m3i_lightning.evaluation.monitors import ProbeMonitor
from m3i_lightning.evaluation.protocols import TrainedModel, label_free, selected_protocols
from m3i_lightning.objectives.capabilities import find_image_text
from m3i_lightning.runtime.checkpointing import checkpoints_in
from m3i_lightning.runtime.metrics_log import LogLastStep
from m3i_lightning.runtime.pictures import PICTURES_DIR, ReconstructionGrid, plot_curves
from m3i_lightning.runtime.run_lock import LOCK_FILE, RunLock, first_process
from m3i_lightning.runtime.strategies import FullyShardedDataParallel

log = logging.getLogger(__name__)

INTERPLAY_FILE = "interplay.json"  # the interplay monitor's measurements (interplay.every_n_steps)
EXPORT_DIR = "backbone"
CHECKPOINTS_DIR = "checkpoints"
RECORD_DIR = ".hydra"  # Hydra's name for its record of a run
FAILED_FILE = "FAILED"  # in the folder of a sweep job that failed: its error line


def evaluable(datamodule) -> bool:
    """Labels and the evaluation loaders (``eval_dataloader(split)``, and ``val_dataloader``
    giving memory then queries, see :mod:`m3i_lightning.evaluation.monitors`)."""
    return "label" in datamodule.provides and hasattr(datamodule, "eval_dataloader")


def check_run_folder(out: Path, resume: str | None, overwrite: bool) -> None:
    """A folder that holds checkpoints is only reused when asked: resumed (``resume=``) or
    replaced (``overwrite=true``); nothing of a finished run is lost by a repeated command.
    The folders the run writes into, where they exist already, must be writable: a read-only
    ``checkpoints/`` would otherwise be found when the first checkpoint is saved."""
    found = checkpoints_in(out)
    if found and not resume and not overwrite:
        names = ", ".join(str(p.relative_to(out)) for p in sorted(found))
        raise ConfigError(f"the run folder {out} already holds {names}: continue it with "
                          "resume=auto, or give a new folder (hydra.run.dir=...) or "
                          "overwrite=true to start again in it")
    for folder in (out, out / CHECKPOINTS_DIR, out / PICTURES_DIR):
        if folder.is_dir():
            check_writable(folder)


def check_writable(folder: Path) -> None:
    """Create (and remove) a file in ``folder``: what the run will do, whatever permissions,
    ACLs or a read-only mount say."""
    try:
        _probe(folder)
    except OSError as err:
        raise ConfigError(f"cannot write in {folder}: {err.strerror or err}; the run would save "
                          "nothing there. Make it writable or give another run folder "
                          "(hydra.run.dir=...)") from None


def holding_run_folder(command: Callable[[DictConfig], dict]) -> Callable[[DictConfig], dict]:
    """Run ``command(cfg)`` in Hydra's run folder once it is admitted: its first process holds
    the folder's :class:`RunLock` for the whole run (a second run into the folder is refused
    in one line) and :func:`check_run_folder` passes."""

    @functools.wraps(command)
    def run(cfg: DictConfig) -> dict:
        out = Path(HydraConfig.get().runtime.output_dir)
        with RunLock(out) if first_process() else contextlib.nullcontext():
            check_run_folder(out, cfg.resume, cfg.get("overwrite", False))
            return command(cfg)

    return run


def _probe(folder: Path) -> None:
    with tempfile.TemporaryFile(dir=folder):
        pass


# The run folders whose record this process wrote: their runs were accepted.
_RECORDED: set[Path] = set()


def write_record(cfg: DictConfig, out: Path) -> None:
    """Hydra's record of the run in ``out/.hydra/`` (``config.yaml``, ``hydra.yaml``,
    ``overrides.yaml``, as Hydra writes them), by the first process, once the run is
    accepted. The config sets ``hydra.output_subdir: null`` so that Hydra does not write it
    before the command has checked anything."""
    if not first_process():
        return
    hydra_cfg = HydraConfig.instance().cfg
    record = out / RECORD_DIR
    record.mkdir(exist_ok=True)
    for name, node in (("config.yaml", cfg), ("hydra.yaml", hydra_cfg),
                       ("overrides.yaml", hydra_cfg.hydra.overrides.task)):
        (record / name).write_text(OmegaConf.to_yaml(node), encoding="utf-8")
    _RECORDED.add(out)


def mark_failed(cfg: DictConfig, out: Path, message: str) -> None:
    """The folder of a sweep job that failed gets the job's record and ``FAILED`` (its error
    line), for ``scripts/summarize_runs.py`` to list it as failed, when the folder is the
    job's: it was accepted (and wrote its record), or it found the folder empty. A folder
    holding an earlier run, or one in use, is left as it is."""
    if out not in _RECORDED:
        if any((out / name).exists() for name in (RECORD_DIR, LOCK_FILE, CHECKPOINTS_DIR)):
            return
        write_record(cfg, out)
    if first_process():
        (out / FAILED_FILE).write_text(f"{message}\n")


class WritableRunFolder(HydraCallback):
    """Hydra callback (``hydra.callbacks`` in conf/config.yaml): create the run folder (the
    sweep folder of a multirun) before Hydra does, so that a place the user cannot write is one
    ``error:`` line instead of Hydra's ``PermissionError`` traceback."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        _create(Path(config.hydra.run.dir), "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        _create(Path(config.hydra.sweep.dir), "hydra.sweep.dir")


def _create(folder: Path, option: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _probe(folder)
    except OSError as err:
        if full_trace_wanted():
            raise
        exit_with(ConfigError(f"cannot write the run folder {option}={folder}: "
                              f"{err.strerror or err}; give a folder you can write"))


def untrained(trainer: L.Trainer, datamodule, out: Path) -> None:
    """After a fit that ran no step. ``trainer.max_steps=0`` asks for that (the random-init
    baseline): its initial weights are saved as ``last.ckpt`` and a step-0 row starts
    ``metrics.csv``, so the run folder is complete. Otherwise the data gave no batch: a
    :class:`ConfigError` saying why, before anything is exported."""
    if trainer.max_steps == 0 or trainer.max_epochs == 0:
        if trainer.is_global_zero:
            print("trainer.max_steps=0: no training step; last.ckpt holds the initial weights")
        trainer.save_checkpoint(out / CHECKPOINTS_DIR / "last.ckpt", weights_only=False)
        if isinstance(trainer.strategy, FullyShardedDataParallel):
            trainer.strategy.wait_for_checkpoint()  # the fit is over: nothing waits for it
        for logger in trainer.loggers:
            logger.log_metrics({"epoch": 0}, step=0)
            logger.save()
        return
    loader = datamodule.train_dataloader()
    size = len(loader.dataset) if hasattr(loader.dataset, "__len__") else "too few"
    per_process = f" per process on {trainer.world_size}" if trainer.world_size > 1 else ""
    raise ConfigError(f"no training step ran: the training split's {size} samples make no "
                      f"batch of data.batch_size={loader.batch_size}{per_process}, and the "
                      f"incomplete last batch is dropped (drop_last={loader.drop_last}); lower "
                      "data.batch_size or give more data")


def run_callbacks(cfg: DictConfig, datamodule, out: Path) -> list[L.Callback]:
    callbacks = [StoreConfig(cfg, datamodule.num_classes), LogLastStep(),
                 ReconstructionGrid(out / PICTURES_DIR, cfg.pictures.every_n_epochs,
                                    cfg.pictures.num_images)]
    callbacks.append(RepresentationHealth(**cfg.health))
    if cfg.interplay.every_n_steps:
        callbacks.append(InterplayMonitor(cfg.interplay.every_n_steps, cfg.interplay.wrt,
                                          out / INTERPLAY_FILE,
                                          out / PICTURES_DIR / "interplay.png"))
    if evaluable(datamodule):
        callbacks.append(ProbeMonitor(datamodule.num_classes, cfg.knn.k, cfg.knn.temperature,
                                      cfg.probe))
    return callbacks


def finish_run(trainer: L.Trainer, model, datamodule, cfg: DictConfig, out: Path) -> dict:
    """Export, evaluate ``protocols`` (table printed, ``eval.json``, then the exported folder's
    model card holding it) and draw the curves. Every
    rank calls it with the whole model: the classification protocols run on every rank's share
    of the data (see :func:`~m3i_lightning.evaluation.protocols.run_protocols`), the rest on
    rank 0, which alone returns results. Data without labels runs only the protocols that need
    none (segmentation); a split without labelled images skips the evaluation with a warning
    naming the options that supply it: a finished run never turns into a crash."""
    writer = trainer.is_global_zero
    trained = TrainedModel(model.backbone, find_image_text(model.heads.values()), cfg)
    results: dict = {}
    if cfg.export and writer:
        results["export"] = str(export_model(trained, out / EXPORT_DIR))
    protocols = selected_protocols(cfg.get("protocols"), trained.image_text is not None)
    if not evaluable(datamodule):
        protocols = label_free(protocols, cfg.get("protocols"))
    evaluation = None
    if protocols:
        try:
            evaluation = run_cfg_protocols(trained, datamodule, cfg, out, protocols)
        except EmptySplitError as err:
            if writer:
                log.warning("end-of-run evaluation skipped: %s", err)
    if not writer:
        return {}
    if evaluation is not None:
        results.update(evaluation.results)
        report(evaluation, cfg, out, {"run_dir": str(out)})
    if "export" in results:
        write_model_card(results["export"], cfg, out / RESULTS_FILE)
    results["curves"] = str(plot_curves(out / "metrics.csv", out / PICTURES_DIR / "curves.png"))
    return results
