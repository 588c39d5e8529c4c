"""The loggers of a run folder, from the ``logger:`` config.

``metrics.csv`` is always written (the curves are drawn from it); the trackers named next to it
(``logger=wandb``, ``'logger=[csv,mlflow,tensorboard]'``) are Lightning's own loggers and get
what Lightning logs (every loss term, the probes, the learning rate). Besides, each tracker
receives the resolved config as hyper-parameters when its run starts (:class:`TrackerRuns`)
and, at the end, every picture of the run folder and the evaluation table (:func:`publish_run`).
A tracker's run id is kept in ``<run>/trackers.json``, so a resumed run continues the same
tracker run.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning as L
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from m3i_lightning.core.errors import ConfigError
from m3i_lightning.runtime.metrics_log import ResumedCSVLogger, RunCSVLogger

log = logging.getLogger(__name__)

LOGGERS = ("csv", "tensorboard", "wandb", "mlflow")
TRACKERS_FILE = "trackers.json"
MLFLOW_STORE = "mlflow.db"  # the local MLflow store of a run folder (a SQLite file) ...
MLFLOW_ARTIFACTS = "mlartifacts"  # ... and its artifacts
PICTURES_KEY = "pictures"


def chosen_loggers(cfg: DictConfig) -> list[str]:
    """The names of ``cfg.logger`` (one key per chosen logger), checked."""
    names = list(cfg.get("logger") or {})
    unknown = [name for name in names if name not in LOGGERS]
    if unknown:
        raise ConfigError(f"unknown logger(s) {unknown}; choose from {list(LOGGERS)}")
    for name in names:
        if name != "csv" and importlib.util.find_spec(name) is None:
            raise ConfigError(f"logger={name} needs {name}: pip install 'm3i_lightning[{name}]'")
    return names


def run_loggers(cfg: DictConfig, out: Path, resuming: bool = False) -> list[Logger]:
    """CSV (kept and continued when ``resuming``), then each chosen tracker; a resumed run's
    trackers reopen the runs recorded in ``trackers.json``. Trackers log from rank 0 alone, so
    the other processes of a run (started with their rank in the environment) build none: an
    MLflow logger opens its store when it is built."""
    names = chosen_loggers(cfg)
    runs = recorded_runs(out) if resuming else {}
    csv_logger = ResumedCSVLogger if resuming else RunCSVLogger
    loggers: list[Logger] = [csv_logger(out, name="", version="")]
    for name in names:
        if name != "csv" and rank_zero_only.rank == 0:
            loggers.append(TRACKERS[name](cfg.logger[name], Path(out), runs.get(name)))
    return loggers


def tensorboard_logger(options: DictConfig, out: Path, run_id: str | None) -> Logger:
    return TensorBoardLogger(out, name="", version=options.folder)


def wandb_logger(options: DictConfig, out: Path, run_id: str | None) -> Logger:
    """W&B files go under ``<run>/wandb``; ``run_id`` continues that run (Lightning asks W&B
    to resume it when it exists)."""
    settings = {key: options[key] for key in ("entity", "mode") if options.get(key)}
    return WandbLogger(name=options.name or out.name, save_dir=out, id=run_id,
                       project=options.project, tags=list(options.tags) or None, **settings)


def mlflow_logger(options: DictConfig, out: Path, run_id: str | None) -> Logger:
    """Without ``tracking_uri``, a SQLite store and an artifact folder inside the run folder
    (MLflow refuses its plain-file store by default), shown by
    ``mlflow ui --backend-store-uri sqlite:///<run>/mlflow.db``."""
    local = options.tracking_uri is None
    folder = Path(out).resolve()
    artifacts = options.artifact_location or (str(folder / MLFLOW_ARTIFACTS) if local else None)
    return MLFlowLogger(experiment_name=options.experiment,
                        run_name=options.run_name or out.name,
                        tracking_uri=f"sqlite:///{folder / MLFLOW_STORE}" if local
                        else options.tracking_uri,
                        tags=OmegaConf.to_container(options.tags) or None,
                        artifact_location=artifacts, run_id=run_id)


TRACKERS = {"tensorboard": tensorboard_logger, "wandb": wandb_logger, "mlflow": mlflow_logger}
TRACKER_TYPES = {"tensorboard": TensorBoardLogger, "wandb": WandbLogger, "mlflow": MLFlowLogger}


def tracker_name(logger: Logger) -> str | None:
    return next((name for name, kind in TRACKER_TYPES.items() if isinstance(logger, kind)), None)


def recorded_runs(out: Path) -> dict[str, str]:
    """Tracker name → run id, as :class:`TrackerRuns` wrote them into the run folder."""
    path = Path(out) / TRACKERS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def open_errors() -> tuple[type[Exception], ...]:
    """What a tracker raises when its run cannot be opened (no W&B login, an MLflow server
    refusing), among the trackers installed."""
    errors: list[type[Exception]] = []
    if importlib.util.find_spec("wandb"):
        import wandb

        errors.append(wandb.errors.Error)
    if importlib.util.find_spec("mlflow"):
        from mlflow.exceptions import MlflowException

        errors.append(MlflowException)
    return tuple(errors)


class TrackerRuns(L.Callback):
    """When the fit starts, on rank 0: each tracker's run is opened and its id written to
    ``<out>/trackers.json``; a run that is new gets the resolved config as hyper-parameters
    (a continued one holds them already, and MLflow refuses to change a logged param).

    Args:
        cfg: the run's config, logged resolved.
        out: the run folder.
    """

    def __init__(self, cfg: DictConfig, out: str | Path) -> None:
        self.config = OmegaConf.to_container(cfg, resolve=True)
        self.out = Path(out)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        recorded = recorded_runs(self.out)
        runs = dict(recorded)
        for logger in trainer.loggers:
            name = tracker_name(logger)
            if name is None:
                continue
            try:
                logger.experiment  # opens the tracker's run  # noqa: B018
            except open_errors() as err:
                raise ConfigError(f"logger={name}: {err}".splitlines()[0]) from None
            runs[name] = str(logger.version)
            if recorded.get(name) != runs[name]:
                logger.log_hyperparams(self.config)
        if runs:
            (self.out / TRACKERS_FILE).write_text(json.dumps(runs, indent=2) + "\n")


def publish_run(loggers: Sequence[Logger], pictures: Path, results: Mapping, step: int) -> None:
    """At the end of a run, on rank 0: the numbers of the evaluation table (as ``eval/<name>``)
    and every PNG under ``pictures`` (reconstruction grids, curves, any other picture of the
    run) to each tracker, whose run is then closed.

    Args:
        loggers: the trainer's loggers; those that are no tracker are left alone.
        pictures: the run's picture folder.
        results: the run's results; the numbers among them are logged.
        step: the step they are logged at (the run's last).
    """
    numbers = {f"eval/{key}": float(value) for key, value in results.items()
               if isinstance(value, int | float) and not isinstance(value, bool)}
    files = sorted(Path(pictures).rglob("*.png"))
    for logger in loggers:
        name = tracker_name(logger)
        if name is None:
            continue
        if numbers:
            logger.log_metrics(numbers, step=step)
        for path in files:
            log_picture(logger, path, path.relative_to(pictures).with_suffix("").as_posix(), step)
        logger.finalize("success")
        if name == "wandb":
            logger.experiment.finish()


def log_picture(logger: Logger, path: Path, name: str, step: int) -> None:
    """One PNG to a tracker, as the tracker shows pictures: a W&B image, an MLflow artifact
    under ``pictures/``, a TensorBoard image."""
    if isinstance(logger, WandbLogger):
        logger.log_image(key=f"{PICTURES_KEY}/{name}", images=[str(path)], step=step)
    elif isinstance(logger, MLFlowLogger):
        folder = Path(PICTURES_KEY, name).parent.as_posix()
        logger.experiment.log_artifact(logger.run_id, str(path), folder)
    elif isinstance(logger, TensorBoardLogger):
        import numpy as np
        from PIL import Image

        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        logger.experiment.add_image(f"{PICTURES_KEY}/{name}", pixels, step, dataformats="HWC")
