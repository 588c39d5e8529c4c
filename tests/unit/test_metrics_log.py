"""A resumed run keeps its metrics history and logs each step once."""

from __future__ import annotations

import csv

from lightning.pytorch.loggers import CSVLogger

from m3i_lightning.runtime.metrics_log import ResumedCSVLogger


def rows(path) -> list[dict]:
    with open(path / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_resumed_logger_keeps_history_and_replaces_steps_logged_again(tmp_path):
    first = CSVLogger(tmp_path, name="", version="")
    for step in range(10):
        first.log_metrics({"train/loss": 10.0 - step, "data/skipped": 0}, step=step)
    first.save()

    resumed = ResumedCSVLogger(tmp_path, name="", version="")
    resumed.save()  # Lightning saves before any metric is logged
    for step in range(5, 8):
        resumed.log_metrics({"train/loss": -step, "val/knn_top1": 0.5}, step=step)
    resumed.save()
    resumed.log_metrics({"train/loss": -8.0}, step=8)
    resumed.save()

    logged = rows(tmp_path)
    assert [int(r["step"]) for r in logged] == list(range(9))
    assert [float(r["train/loss"]) for r in logged[:5]] == [10.0, 9.0, 8.0, 7.0, 6.0]
    assert [float(r["train/loss"]) for r in logged[5:]] == [-5.0, -6.0, -7.0, -8.0]
    assert logged[6]["val/knn_top1"] == "0.5" and logged[0]["val/knn_top1"] == ""


def test_a_fresh_run_in_a_used_folder_starts_a_new_file(tmp_path):
    old = CSVLogger(tmp_path, name="", version="")
    old.log_metrics({"train/loss": 1.0}, step=0)
    old.save()
    fresh = CSVLogger(tmp_path, name="", version="")
    fresh.log_metrics({"train/loss": 2.0}, step=3)
    fresh.save()
    assert [r["step"] for r in rows(tmp_path)] == ["3"]
