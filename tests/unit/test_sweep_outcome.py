"""The pre-training command's count of failed sweep jobs belongs to one call: a second command
run in the same process (a notebook, a test) does not inherit the first one's failures."""

from __future__ import annotations

import sys

from m3i_lightning.commands import pretrain


def test_a_second_call_does_not_report_the_first_calls_failed_jobs(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["m3i_lightning"])
    monkeypatch.setattr(pretrain, "hydra_main", lambda: 0.5)
    pretrain.SWEEP.jobs, pretrain.SWEEP.failures[:] = 2, ["job 0 (objective=[cls]): earlier"]
    assert pretrain.main() == 0.5
    assert pretrain.SWEEP.jobs == 0 and pretrain.SWEEP.failures == []
