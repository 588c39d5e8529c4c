"""Exact resume: the data position and crops survive a restart, ``resume=auto`` finds the newest
checkpoint, and a run killed while writing a checkpoint resumes from the previous one onto
the very trajectory of an uninterrupted run."""

from __future__ import annotations

import math
import os
import textwrap
import time

import pytest
import torch
from helpers import COMPOSED, TINY_RUN, digits_module, losses, run

from m3i_lightning.core.errors import ConfigError
from m3i_lightning.runtime.checkpointing import resume_path

LR = "lr-AdamW/pg1"  # LearningRateMonitor's column of the decayed parameters' lr


def _batches(loader) -> list[torch.Tensor]:
    return [batch["view1"] for batch in loader]


def test_loader_resumes_mid_epoch_with_the_same_crops_whatever_the_workers(tokenizer):
    """The order is a function of (seed, epoch) and each sample's crops of its own seed: one
    worker process or none give the same batches; a fresh loader given the state after 3
    batches delivers exactly the rest of the epoch; the next epoch starts from its beginning
    with another order."""
    loader = digits_module(tokenizer, batch_size=64, seed=7).train_dataloader()
    epoch = _batches(loader)
    with_workers = digits_module(tokenizer, batch_size=64, seed=7)
    with_workers.num_workers = 1
    assert all(torch.equal(a, b)
               for a, b in zip(_batches(with_workers.train_dataloader()), epoch, strict=True))

    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.state_dict()
    assert state == {"epoch": 0, "batches": 3}
    resumed = digits_module(tokenizer, batch_size=64, seed=7).train_dataloader()
    resumed.load_state_dict(state)
    rest = _batches(resumed)
    assert len(rest) == len(epoch) - 3
    assert all(torch.equal(a, b) for a, b in zip(rest, epoch[3:], strict=True))

    resumed.sampler.set_epoch(1)
    next_epoch = _batches(resumed)
    assert len(next_epoch) == len(epoch)
    assert not torch.equal(next_epoch[0], epoch[0])


def test_resume_auto_takes_the_newest_checkpoint_of_the_run_folder(tmp_path):
    assert resume_path(None, tmp_path) is None
    assert resume_path("auto", tmp_path) is None  # nothing yet: a fresh start
    (tmp_path / "checkpoints").mkdir()
    old, new = tmp_path / "hpc_ckpt_1.ckpt", tmp_path / "checkpoints" / "last.ckpt"
    for path in (old, new, tmp_path / "checkpoints" / "last.ckpt.partial"):
        path.write_bytes(b"")
        time.sleep(0.01)
    os.utime(old, (time.time() - 60, time.time() - 60))
    assert resume_path("auto", tmp_path) == str(new)
    assert resume_path(str(old), tmp_path) == str(old)
    with pytest.raises(ConfigError, match="no such checkpoint"):
        resume_path(str(tmp_path / "missing.ckpt"), tmp_path)


def on_second_save(failure: str) -> str:
    """A prelude for the pre-training process: ``torch.save`` writes the first checkpoint,
    then runs ``failure`` instead of the second (``obj``, ``f``, ``real_save`` in scope)."""
    return ("import errno, io, os, signal, torch\n"
            "real_save, calls = torch.save, []\n"
            "def save(obj, f, *args, **kwargs):\n"
            "    calls.append(1)\n"
            "    if len(calls) < 2:\n"
            "        return real_save(obj, f, *args, **kwargs)\n"
            + textwrap.indent(textwrap.dedent(failure), "    ") + "torch.save = save\n")


# Kill the process with SIGKILL half-way through writing its second checkpoint.
KILL_ON_SECOND_SAVE = on_second_save("""
    data = io.BytesIO()
    real_save(obj, data, *args, **kwargs)
    f.write(data.getvalue()[: len(data.getvalue()) // 2])
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_run_killed_while_saving_resumes_exactly(tmp_path):
    """40 steps of [mim_feat, clip, cls] (batch 64: 22 per epoch), last.ckpt every 15 steps.
    The run killed while writing the step-30 checkpoint leaves the step-15 last.ckpt loadable
    (weights_only) and only a torn ``last.ckpt.partial``. Restarted with resume=auto, it
    resumes from step 15, mid-epoch, and its losses at steps 15..39 (across the epoch
    boundary) equal the uninterrupted run's exactly: weights, teacher, optimizer, LR schedule,
    step counters, random streams (masks) and data position (order, crops) are all restored."""
    args = [*TINY_RUN, *COMPOSED, "data.batch_size=64", "trainer.max_steps=40",
            "checkpoint.every_n_steps=15"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run(*args, f"hydra.run.dir={whole}")
    done = run(*args, f"hydra.run.dir={killed}", prelude=KILL_ON_SECOND_SAVE, check=False)
    assert done.returncode == -9, done.stderr[-3000:]

    last = killed / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 15
    with pytest.raises(Exception):  # noqa: B017 - any unpickling error of the torn file
        torch.load(killed / "checkpoints" / "last.ckpt.partial", weights_only=True)

    run(*args, "resume=auto", f"hydra.run.dir={killed}")
    resumed, expected = losses(killed), losses(whole)
    assert set(range(15, 40)) <= set(resumed)  # the history before step 15, if saved, is kept
    assert resumed == {step: expected[step] for step in resumed}


DISK_FULL_ON_SECOND_SAVE = on_second_save("""
    f.write(b"half a checkpoint")
    raise OSError(errno.ENOSPC, "No space left on device")
""")


def test_disk_full_while_saving_ends_the_run_in_one_line_and_keeps_the_previous_checkpoint(
        tmp_path):
    """The step-2 save hits a full disk: one line saying where and how much space the
    checkpoint needs, exit code 2; the step-1 last.ckpt still loads and no .partial is left."""
    done = run(*TINY_RUN, "objective=[cls]", "data.batch_size=32", "trainer.max_steps=3",
               "checkpoint.every_n_steps=1", f"hydra.run.dir={tmp_path}",
               prelude=DISK_FULL_ON_SECOND_SAVE, check=False)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert len(errors) == 1 and f"no space left to write {last}" in errors[0]
    needed = sum(v.numel() * v.element_size()
                 for v in torch.load(last, weights_only=True)["state_dict"].values())
    assert "KiB" in errors[0] and "the previous checkpoint there is intact" in errors[0]
    assert float(errors[0].split("needs about ")[1].split(" KiB")[0]) * 1024 >= needed
    assert torch.load(last, weights_only=True)["global_step"] == 1
    assert list(last.parent.iterdir()) == [last]  # no last.ckpt.partial


def test_run_with_views_rendered_on_the_device_resumes_exactly_from_an_epoch_end(tmp_path):
    """``data.augment_on=device`` with BYOL's colour augmentations, and last.ckpt at the end of
    every epoch (``checkpoint.every_n_steps`` unset; 11 steps per epoch, validation never): the
    views are rendered in the step from parameters drawn from each sample's stream, so the run
    killed while saving at the end of epoch 2 and resumed from the end of epoch 1 logs exactly
    the uninterrupted run's losses."""
    args = [*TINY_RUN, *COMPOSED, "data.batch_size=128", "trainer.max_steps=25",
            "data.augment_on=device", "data.augment=byol"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run(*args, f"hydra.run.dir={whole}")
    done = run(*args, f"hydra.run.dir={killed}", prelude=KILL_ON_SECOND_SAVE, check=False)
    assert done.returncode == -9, done.stderr[-3000:]
    assert torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 11
    run(*args, "resume=auto", f"hydra.run.dir={killed}")
    resumed, expected = losses(killed), losses(whole)
    assert set(range(11, 25)) <= set(resumed)
    assert resumed == {step: expected[step] for step in resumed}


def test_lr_held_per_epoch_follows_its_schedule_and_resumes_mid_epoch(tmp_path):
    """``optim.interval=epoch`` in a run (batch 64: 22 steps per epoch, 3 epochs, 1 of
    warm-up from 1e-4): the logged lr holds for each epoch at the schedule's value, and a run
    killed at its second checkpoint resumes from step 15 (mid-epoch) onto the uninterrupted
    run's lrs and losses, across the epoch boundaries."""
    args = [*TINY_RUN, *COMPOSED, "data.batch_size=64", "trainer.max_epochs=3", "optim.lr=1e-3",
            "optim.interval=epoch", "optim.warmup_fraction=0.34", "optim.warmup_start_lr=1e-4",
            "optim.min_lr_ratio=0", "checkpoint.every_n_steps=15"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run(*args, f"hydra.run.dir={whole}")
    per_epoch = [1e-4, *(0.5e-3 * (1 + math.cos(math.pi * e / 3)) for e in (1, 2))]
    assert losses(whole, LR) == pytest.approx({step: per_epoch[step // 22] for step in range(66)},
                                              rel=1e-6)
    assert run(*args, f"hydra.run.dir={killed}", prelude=KILL_ON_SECOND_SAVE,
               check=False).returncode == -9
    run(*args, "resume=auto", f"hydra.run.dir={killed}")
    for key in (LR, "train/loss"):
        resumed, expected = losses(killed, key), losses(whole, key)
        assert set(range(15, 66)) <= set(resumed)
        assert resumed == {step: expected[step] for step in resumed}
