"""The ablation command end to end, tiny: two objectives, 2 steps, 1 seed."""

from __future__ import annotations

import json

from helpers import TINY_RUN, run

TINY_ABLATION = [*TINY_RUN, "objective=[cls,mim_feat]", "objective.mim_feat.predictor_dim=32",
                 "objective.mim_feat.predictor_depth=1", "objective.mim_feat.predictor_heads=2",
                 "data.batch_size=32", "trainer.max_steps=2", "interplay.every_n_steps=1",
                 "trainer.enable_progress_bar=false", "seeds=[0]"]
JOBS = ["random-class_token-seed0", "random-mean_pooled-seed0", "only-cls-seed0",
        "only-mim_feat-seed0", "full-seed0", "full-mix-seed0"]


def test_ablation_table_plots_a_failed_job_and_a_second_call(tmp_path):
    """[cls, mim_feat]: each alone, together, together with mix, and the random init of both
    features. A job whose folder already holds a checkpoint (planted) fails alone: it is
    marked FAILED with its line, the table says so, the others finish, the command exits 2
    with one line. Called again once the plant is gone, it runs that job only (the finished
    ones keep their results untouched) and the table is complete: kNN and linear-probe
    cells for every row, marginal contributions, the gain over the best single objective and
    the full composition's interplay."""
    out = tmp_path / "ablation"
    planted = out / "runs" / "only-mim_feat-seed0" / "checkpoints" / "last.ckpt"
    planted.parent.mkdir(parents=True)
    planted.write_bytes(b"another run's checkpoint")
    first = run(*TINY_ABLATION, f"hydra.run.dir={out}", module="m3i_lightning.ablate",
                check=False)
    assert first.returncode == 2, first.stderr[-3000:]
    assert "Traceback" not in first.stderr
    errors = [line for line in first.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: 1 of 6 ablation jobs failed")
    failed = (out / "runs" / "only-mim_feat-seed0" / "FAILED").read_text()
    assert "already holds checkpoints/last.ckpt" in failed
    table = (out / "ablation.md").read_text()
    assert "| mim_feat | mim_feat | mean-pooled | failed |" in table
    assert f"- mim_feat, seed 0: {failed.strip()}" in table
    finished = {job: (out / "runs" / job / "eval.json").stat().st_mtime
                for job in JOBS if job != "only-mim_feat-seed0"}
    assert len(finished) == 5

    planted.unlink()
    second = run(*TINY_ABLATION, f"hydra.run.dir={out}", module="m3i_lightning.ablate")
    assert "5 finished, 1 to run" in second.stdout
    assert {job: (out / "runs" / job / "eval.json").stat().st_mtime for job in finished} \
        == finished
    summary = json.loads((out / "ablation.json").read_text())
    assert summary["scores"] == ["knn_top1", "linear_top1"]
    for entry in summary["rows"].values():
        assert not entry["failed"] and len(entry["values"]["linear_top1"]) == 1
    assert set(summary["marginal"]) == {"cls", "mim_feat"}
    assert summary["composition"]["linear_top1"]["best_single"] in ("cls", "mim_feat")
    assert set(summary["interplay"]["cos"]) == {"cls-mim_feat"}
    assert len(summary["interplay"]["steps"]) == 2
    table = (out / "ablation.md").read_text()
    assert "failed" not in table and "| full (mix) | cls, mim_feat | mean-pooled |" in table
    for picture in ("ablation_bars.png", "ablation_interplay.png"):
        assert (out / picture).stat().st_size > 10_000
