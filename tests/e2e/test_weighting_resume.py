"""A run with a learned or gradient-based weighting, killed while saving, resumes onto the very
trajectory of the uninterrupted run (the pattern of test_resume.py)."""

from __future__ import annotations

import pytest
from helpers import COMPOSED, TINY_RUN, losses, run
from test_resume import KILL_ON_SECOND_SAVE


@pytest.mark.parametrize("weighting", ["uncertainty", "pcgrad"])
def test_weighted_run_killed_while_saving_resumes_exactly(tmp_path, weighting):
    """[mim_feat, clip, cls] for 8 steps, last.ckpt every 3: killed while writing the step-6
    checkpoint, resumed from step 3, its losses (and, for uncertainty, the learned weights)
    at steps 3..7 equal the uninterrupted run's exactly: the log-variances and their optimizer
    state are in the checkpoint, PCGrad's order is drawn from the step."""
    args = [*TINY_RUN, *COMPOSED, "data.batch_size=64", "trainer.max_steps=8",
            "checkpoint.every_n_steps=3", f"weighting={weighting}"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run(*args, f"hydra.run.dir={whole}")
    done = run(*args, f"hydra.run.dir={killed}", prelude=KILL_ON_SECOND_SAVE, check=False)
    assert done.returncode == -9, done.stderr[-3000:]
    run(*args, "resume=auto", f"hydra.run.dir={killed}")
    keys = ["train/loss", *(["train/weight/clip"] if weighting == "uncertainty" else [])]
    for key in keys:
        resumed, expected = losses(killed, key), losses(whole, key)
        assert set(range(3, 8)) <= set(resumed)
        assert resumed == {step: expected[step] for step in resumed}
    if weighting == "uncertainty":
        assert losses(whole, "train/weight/clip")[7] != 1.0  # the weight was learned
