"""A CSV logger that keeps the history of a resumed run.

Lightning's ``CSVLogger`` deletes an existing ``metrics.csv`` when it starts, so a run resumed
after preemption would lose every loss logged before the restart. This one keeps the file;
at its first write it drops the rows at or after the first step it logs (written after the
checkpoint it resumed from, and about to be logged again), so every step appears once.
"""

from __future__ import annotations

import csv

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


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


class ResumedCSVLogger(CSVLogger):
    """``CSVLogger`` for a run that continues from a checkpoint in the same folder."""

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumedWriter(log_dir=self.log_dir)
        return self._experiment
