"""``python -m m3i_lightning`` end to end, run from a foreign working directory: the composed
default and each objective alone succeed and leave a complete run folder; bad values exit
with one clear message and no traceback.

Every subprocess pays ~10 s of imports, so the runs are few and each checks a lot.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from helpers import QUIET_HYDRA, fails_with_one_line
from safetensors.torch import load_file

from m3i_lightning.commands import pretrain

TINY = ["backbone.depth=1", "backbone.embed_dim=32", "backbone.num_heads=2",
        "backbone.img_size=16", "data.source_size=16", "data.batch_size=32",
        "data.num_workers=0", "trainer.max_steps=3", "trainer.log_every_n_steps=1"]
TINY_HEADS = ["objective.clip.text_width=32", "objective.clip.proj_dim=32",
              "objective.clip.text_layers=1", "objective.clip.text_heads=2",
              "objective.mim_feat.predictor_dim=32", "objective.mim_feat.predictor_depth=1",
              "objective.mim_feat.predictor_heads=2"]
NAMES = ["mim_feat", "clip", "cls"]


def run_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    # one thread per process (the machine is shared), and Hydra's short error reports
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "m3i_lightning", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def check_run_folder(run: Path, names: list[str]) -> None:
    """Saved config, per-objective metrics, checkpoint and exported backbone of one run."""
    config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    assert set(config["objective"]) == set(names)

    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0])
    assert "train/loss" in columns
    assert {c for c in columns if c.startswith("train/loss/")} == {
        f"train/loss/{n}" for n in names}
    logged = [r for r in rows if r["train/loss"]]
    assert len(logged) == 3
    for row in logged:
        total = float(row["train/loss"])
        assert math.isfinite(total)
        assert total == pytest.approx(sum(float(row[f"train/loss/{n}"]) for n in names),
                                      rel=1e-5)

    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3
    keys = set(ckpt["state_dict"])
    assert any(k.startswith("backbone.model.") for k in keys)
    for name in names:
        assert any(k.startswith(f"heads.{name}.") for k in keys), name
    assert any(k.startswith("teacher.") for k in keys) == ("mim_feat" in names)

    # the exported backbone rebuilds with timm alone and holds the trained weights
    weights = load_file(run / "backbone" / "model.safetensors")
    spec = json.loads((run / "backbone" / "config.json").read_text())
    model = timm.create_model(spec["architecture"], **spec["model_args"])
    model.load_state_dict(weights, strict=True)
    torch.testing.assert_close(weights["pos_embed"], ckpt["state_dict"]["backbone.model.pos_embed"])


def test_default_composed_run_from_any_directory(tmp_path):
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    run = tmp_path / "run"
    result = run_cli(cwd, *TINY, *TINY_HEADS, f"hydra.run.dir={run}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "kNN top-1" in result.stdout
    check_run_folder(run, NAMES)
    assert list(cwd.iterdir()) == []  # nothing written to the working directory


def test_each_objective_alone_as_a_multirun(tmp_path):
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    sweep = tmp_path / "sweep"
    result = run_cli(cwd, "-m", "objective=[cls],[clip],[mim_feat]", *TINY,
                     f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    for job, name in enumerate(["cls", "clip", "mim_feat"]):
        check_run_folder(sweep / str(job), [name])
    assert list(cwd.iterdir()) == []


ERRORS = {
    "unknown objective": (["objective=[mim_feat,nope]"], ["nope", "cls", "clip", "mim_feat"]),
    "unknown backbone preset": (["backbone=vit_nope"], ["vit_nope", "vit_tiny", "vit_cpu"]),
    "unknown data key": (["+data.bogus=1"], ["bogus", "batch_size"]),
    "typo in objective option": (["+objective.cls.label_smothing=0.1"],
                                 ["label_smothing", "label_smoothing"]),
    "captions needed": (["objective=[clip]", "data.captions=false"], ["'clip'", "text"]),
    "labels needed": (["objective=[cls]", "data.labels=false"], ["'cls'", "label"]),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_values_fail_with_one_clear_message(case, tmp_path, capsys, monkeypatch):
    """In this process (what a shell sees is test_errors' subprocess test): one line naming the
    value and the choices, and no run folder."""
    args, expected = ERRORS[case]
    line = fails_with_one_line(capsys, monkeypatch, pretrain.main, "m3i_lightning", *TINY, *args,
                               *QUIET_HYDRA, f"hydra.run.dir={tmp_path / 'run'}")
    for text in expected:
        assert text in line, (text, line)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_all_fourteen_objectives_in_one_run(tmp_path):
    """Every row of the unified table selected together: one run, each term logged."""
    from helpers import TINY_RUN, assert_each_term_logged, run

    from m3i_lightning.objectives import OBJECTIVES

    names = sorted(OBJECTIVES)
    assert len(names) == 14
    run(*TINY_RUN, "objective=[" + ",".join(names) + "]", "data.batch_size=32",
        "trainer.max_steps=2", f"hydra.run.dir={tmp_path}")
    assert_each_term_logged(tmp_path, names, steps=2)


def test_a_short_run_logs_its_last_step_and_prints_no_misleading_lines(tmp_path, monkeypatch):
    """3 steps at the default log_every_n_steps=10: the last step's total and every term are in
    metrics.csv; the console shows each term and where the run stops, and none of Lightning's
    lines that mislead here; the exported weights are as readable as the umask allows."""
    from helpers import run

    monkeypatch.setenv("COLUMNS", "250")  # room for every term on the progress bar
    args = [a for a in TINY if not a.startswith("trainer.log_every")]
    done = run(*args, *TINY_HEADS, "probe.epochs=1", f"hydra.run.dir={tmp_path}",
               prelude="import os; os.umask(0o002)")
    with open(tmp_path / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["train/loss"]]
    assert [r["step"] for r in rows] == ["2"]
    assert all(math.isfinite(float(rows[0][f"train/loss/{n}"])) for n in NAMES)

    console = done.stdout + done.stderr
    for misleading in ("Previous log files", "Total FLOPs", "FLOPs", "in eval mode at the start",
                       "litlogger", "Epoch 0/49"):
        assert misleading not in console, misleading
    assert "Epoch 0 (stops at step 3)" in console
    for name in NAMES:
        assert f"{name}: " in console, name
    for weights in (tmp_path / "backbone").rglob("*.safetensors"):
        assert weights.stat().st_mode & 0o777 == 0o664, weights
