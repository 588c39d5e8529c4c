"""A Hydra multirun over two objective sets, end to end on this machine, and its summary."""

from __future__ import annotations

import subprocess
import sys

from helpers import REPO, TINY_RUN, losses, run

SUMMARIZE = REPO / "scripts" / "summarize_runs.py"


def test_multirun_over_objective_sets_and_the_summary_table(tmp_path):
    """``-m 'objective=[cls],[clip]'``: one folder per job, each with its overrides, metrics and
    last.ckpt; summarize_runs.py prints the shared overrides once and one row per job with the
    swept objective set, the final loss of each objective (blank where not trained) and the
    evaluation results."""
    sweep = tmp_path / "sweep"
    run("-m", "objective=[cls],[clip]", *TINY_RUN, "data.batch_size=32", "trainer.max_steps=3",
        f"hydra.sweep.dir={sweep}")
    for job, name in (("0", "cls"), ("1", "clip")):
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file()
        assert sorted(losses(sweep / job, f"train/loss/{name}")) == [0, 1, 2]

    done = subprocess.run([sys.executable, str(SUMMARIZE), str(sweep)], capture_output=True,
                          text=True, timeout=60, check=True)
    shared, blank, header, rule, *rows = done.stdout.strip().splitlines()
    assert "backbone.depth=1" in shared and "trainer.max_steps=3" in shared
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns[:3] == ["run", "objective", "step"]
    assert {"loss", "loss/cls", "loss/clip", "knn_top1", "zero_shot_top1"} <= set(columns)
    table = [dict(zip(columns, (c.strip() for c in row.strip("|").split("|")), strict=True))
             for row in rows]
    assert [(r["run"], r["objective"], r["step"]) for r in table] == [
        ("0", "[cls]", "2"), ("1", "[clip]", "2")]
    assert table[0]["loss/cls"] and not table[0]["loss/clip"]
    assert table[1]["loss/clip"] and not table[1]["loss/cls"]
    assert all(r["knn_top1"].endswith("%") for r in table)


def test_local_multirun_refuses_multi_process_jobs(tmp_path):
    """Lightning would start a job's other processes by re-running the whole sweep: each job
    stops with one clear line instead, and the sweep ends with one line counting them."""
    done = run("-m", "objective=[cls],[clip]", *TINY_RUN, "trainer.accelerator=cpu",
               "trainer.devices=2", "strategy=ddp", f"hydra.sweep.dir={tmp_path}", check=False)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    *_, last = done.stderr.strip().splitlines()
    assert last.startswith("error: 2 of 2 sweep jobs failed")
    assert "a local multirun (-m) cannot start the processes" in last


def test_a_failing_job_does_not_stop_the_sweep_and_is_marked_failed(tmp_path):
    """Job 0 has a bad learning rate: it fails alone, job 1 still trains, the sweep exits 2
    with one line naming job 0, and the summary marks it FAILED."""
    sweep = tmp_path / "sweep"
    done = run("-m", *TINY_RUN, "objective=[cls]", "data.batch_size=32", "trainer.max_steps=2",
               "optim.lr=-1,1e-3", f"hydra.sweep.dir={sweep}", check=False)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: 1 of 2 sweep jobs failed")
    assert "job 0 (" in errors[0] and "optim.lr=-1 must be a number > 0" in errors[0]
    assert (sweep / "1" / "checkpoints" / "last.ckpt").is_file()
    assert not (sweep / "0" / "checkpoints").exists()

    table = subprocess.run([sys.executable, str(SUMMARIZE), str(sweep)], capture_output=True,
                           text=True, timeout=60, check=True).stdout
    rows = [line for line in table.splitlines() if line.startswith("| 0") or
            line.startswith("| 1")]
    assert "FAILED: optim.lr=-1 must be a number > 0" in rows[0]
    assert "FAILED" not in rows[1] and "%" in rows[1]
