"""Evaluation on 2 CPU processes (gloo): ``python -m m3i_lightning.eval trainer.devices=2`` and
the end-of-run evaluation of a 2-process FSDP2 run give the one-process results, printed and
written once, by rank 0."""

from __future__ import annotations

import json

import pytest
from helpers import TINY_RUN, TWO_CPU_PROCESSES, compose_config, run

from m3i_lightning.commands.eval import RESULTS_FILE, evaluate_command
from m3i_lightning.core.errors import ConfigError

TABLE_ROW = "| kNN top-1"


def assert_same_results(got: dict, expected: dict, held_out: int) -> None:
    """kNN and zero-shot predictions are equal; the probe trains on features the two runs
    extract in different batches and sums in a different order, which may move a held-out
    image lying on a class boundary (the probe itself: tests/test_probe.py, to 1e-5)."""
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        slack = 1 / held_out if name == "linear_top1" else 0
        assert abs(got[name] - value) <= slack + 1e-12, (name, got[name], value)


def test_eval_command_on_two_processes_equals_one_process(clip_checkpoint, tmp_path, capsys):
    expected = evaluate_command(compose_config(f"checkpoint={clip_checkpoint}", name="eval"),
                                tmp_path / "one")
    held_out = json.loads((tmp_path / "one" / RESULTS_FILE).read_text())["data"]["samples"]
    done = run(f"checkpoint={clip_checkpoint}", *TWO_CPU_PROCESSES, "strategy=ddp",
               "data.num_workers=0", f"hydra.run.dir={tmp_path / 'two'}",
               module="m3i_lightning.eval")
    saved = json.loads((tmp_path / "two" / RESULTS_FILE).read_text())
    assert saved["data"]["samples"] == held_out
    assert_same_results(saved["results"], expected, held_out["val"])
    assert "MEMBER: 2/2" in done.stdout + done.stderr  # Lightning's line: 2 processes ran
    assert done.stdout.count(TABLE_ROW) == 1 and done.stdout.count("results: ") == 1


def test_end_of_run_evaluation_of_a_two_process_fsdp_run_equals_the_eval_command(tmp_path):
    """Every rank evaluates its share with the consolidated model (broadcast from rank 0):
    the run's eval.json is the one-process evaluation of its last checkpoint."""
    folder = tmp_path / "run"
    done = run(*TINY_RUN, "objective=[cls]", *TWO_CPU_PROCESSES, "strategy=fsdp",
               "data.batch_size=16", "trainer.max_steps=2", f"hydra.run.dir={folder}")
    assert done.stdout.count(TABLE_ROW) == 1
    saved = json.loads((folder / RESULTS_FILE).read_text())
    checkpoint = folder / "checkpoints" / "last.ckpt"
    expected = evaluate_command(compose_config(f"checkpoint={checkpoint}", "probe.epochs=1",
                                               name="eval"), tmp_path / "one")
    one = json.loads((tmp_path / "one" / RESULTS_FILE).read_text())
    assert saved["data"]["samples"] == one["data"]["samples"]
    assert_same_results(saved["results"], expected, one["data"]["samples"]["val"])


def test_eval_refuses_a_sharding_strategy_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="strategy= one of"):
        evaluate_command(compose_config("checkpoint=any.ckpt", "strategy=fsdp", name="eval"),
                         tmp_path)
