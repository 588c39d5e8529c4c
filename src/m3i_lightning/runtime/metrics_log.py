"""The run's ``metrics.csv``: the CSV loggers of a fresh and of a resumed run, and the last
step's losses, always written.

Lightning's ``CSVLogger`` deletes an existing ``metrics.csv`` when it starts, so a run resumed
after preemption would lose every loss logged before the restart. :class:`ResumedCSVLogger`
keeps the file; at its first write it drops the rows at or after the first step it logs
(written after the checkpoint it resumed from, and about to be logged again), so every step
appears once. :class:`RunCSVLogger`, for a fresh run, replaces an old file without Lightning's
warning that "previous log files will be deleted": the run folder always holds Hydra's
``.hydra/`` already, and a folder with checkpoints is only reused when the user asks
(``resume=`` or ``overwrite=true``).

Lightning logs training values every ``log_every_n_steps`` steps, so a run whose last step
falls between two of them would end without its final losses (a 3-step run: none at all);
:class:`LogLastStep` writes them.
"""

from __future__ import annotations

import csv

from lightning.pytorch import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

TRAIN_PREFIX = "train/"


class _FreshWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            self._fs.rm_file(self.metrics_file_path)


class _ResumedWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        self._trimmed = False

    def save(self) -> None:
        if self.metrics and not self._trimmed and self._fs.isfile(self.metrics_file_path):
            first = min(row["step"] for row in self.metrics)
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                reader = csv.DictReader(file)
                keys = list(reader.fieldnames or [])
                kept = [row for row in reader if row.get("step") and float(row["step"]) < first]
            with self._fs.open(self.metrics_file_path, "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=keys)
                writer.writeheader()
                writer.writerows(kept)
            self.metrics_keys = keys
        self._trimmed = self._trimmed or bool(self.metrics)
        super().save()


class RunCSVLogger(CSVLogger):
    """``CSVLogger`` for a fresh run in its run folder."""

    writer = _FreshWriter

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = self.writer(log_dir=self.log_dir)
        return self._experiment


class ResumedCSVLogger(RunCSVLogger):
    """``CSVLogger`` for a run that continues from a checkpoint in the same folder."""

    writer = _ResumedWriter


class LogLastStep(Callback):
    """At the end of training, log the last step's ``train/*`` values unless Lightning did
    (it logs step ``s`` when ``(s + 1) % log_every_n_steps == 0``, or when stopping early)."""

    def __init__(self) -> None:
        self.epoch = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.epoch = trainer.current_epoch  # at the end of training it already counts one more

    def on_train_end(self, trainer, pl_module) -> None:
        steps = trainer.global_step
        if steps == 0 or trainer.should_stop or steps % trainer.log_every_n_steps == 0:
            return
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items()
                   if key.startswith(TRAIN_PREFIX)}
        if not metrics:
            return
        metrics["epoch"] = self.epoch
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=steps - 1)
            logger.save()
