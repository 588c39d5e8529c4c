"""Sharded checkpoints under FSDP2 (``checkpoint.sharded=true``, ``checkpoint.async=true``):
``resume=auto`` takes only complete folders, a 2-process run killed during an asynchronous
save resumes from the previous folder onto the trajectory of an uninterrupted run, and a
sharded folder loads into one process, by Lightning's resharding loader and consolidated into
one file, to the same continuation."""

from __future__ import annotations

import os
import time

import pytest
import torch
from helpers import TINY_RUN, TWO_CPU_PROCESSES, losses, run

from m3i_lightning.config.restore import load_checkpoint
from m3i_lightning.core.errors import ConfigError
from m3i_lightning.runtime.checkpointing import read_checkpoint, resume_path
from m3i_lightning.runtime.sharded_checkpoint import INDEX_FILE, METADATA_FILE

SHARDED = ["objective=[cls]", "strategy=fsdp", "trainer.accelerator=cpu",
           "data.batch_size=16", "checkpoint.every_n_steps=2", "checkpoint.sharded=true"]


def _folder(path, *files: str):
    path.mkdir()
    for name in files:
        (path / name).write_bytes(b"")
    return path


def test_resume_auto_takes_the_newest_complete_sharded_checkpoint(tmp_path):
    """A link to a complete folder is a checkpoint; a newer folder a killed save left (no DCP
    index) and one no link points to are not, and neither can be given as ``resume=``."""
    checkpoints = tmp_path / "checkpoints"
    old = tmp_path / "hpc_ckpt_1.ckpt"
    checkpoints.mkdir()
    old.write_bytes(b"")
    os.utime(old, (time.time() - 60, time.time() - 60))
    _folder(checkpoints / "last.ckpt.step-2", METADATA_FILE, INDEX_FILE)
    link = checkpoints / "last.ckpt"
    link.symlink_to("last.ckpt.step-2", target_is_directory=True)
    time.sleep(0.01)
    killed = _folder(checkpoints / "last.ckpt.step-4.partial", METADATA_FILE)
    _folder(checkpoints / "orphan.ckpt", METADATA_FILE)
    assert resume_path("auto", tmp_path) == str(link)
    for incomplete in (killed, checkpoints / "orphan.ckpt"):
        with pytest.raises(ConfigError, match="no such checkpoint file or complete sharded"):
            resume_path(str(incomplete), tmp_path)
        with pytest.raises(ConfigError, match="no complete sharded checkpoint"):
            read_checkpoint(incomplete, "checkpoint")


# Rank 0 lets its second sharded save write its shard, then kills every process of the job
# (SIGKILL to the process group) while the save is in flight, before DCP's index is written.
KILL_DURING_SECOND_SAVE = """
import os, signal
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemWriter
real_write, calls = FileSystemWriter.write_data, []
def write_data(self, plan, planner):
    calls.append(1)
    written = real_write(self, plan, planner)
    if len(calls) == 2 and dist.get_rank() == 0:
        written.wait()
        os.killpg(0, signal.SIGKILL)
    return written
FileSystemWriter.write_data = write_data
"""


def test_two_process_run_killed_during_async_save_resumes_exactly(tmp_path):
    """2 FSDP2 processes, asynchronous sharded saves at steps 2, 4 and 6. The run killed
    while its step-4 save is written keeps ``last.ckpt`` on the complete step-2 folder
    (loadable, with the ranks' random streams and the data position) beside the torn
    step-4 one. Restarted with resume=auto it resumes from step 2, and its losses at steps
    2..5 equal the uninterrupted run's exactly: the shards written in the background while
    training went on hold the step-2 state (weights, optimizer, LR schedule), and the random
    streams and data position are restored."""
    args = [*TINY_RUN, *SHARDED, *TWO_CPU_PROCESSES, "checkpoint.async=true",
            "trainer.max_steps=6"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run(*args, f"hydra.run.dir={whole}")
    done = run(*args, f"hydra.run.dir={killed}", prelude=KILL_DURING_SECOND_SAVE, check=False)
    assert done.returncode == -9, done.stderr[-3000:]

    checkpoints = killed / "checkpoints"
    assert os.readlink(checkpoints / "last.ckpt") == "last.ckpt.step-2"
    torn = checkpoints / "last.ckpt.step-4.partial"
    assert (torn / METADATA_FILE).is_file() and not (torn / INDEX_FILE).exists()
    previous = read_checkpoint(checkpoints / "last.ckpt", "resume")
    assert previous["global_step"] == 2 and len(previous["m3i_resume"]["random"]) == 2
    assert previous["m3i_resume"]["loaders"] == [{"epoch": 0, "batches": 2}]

    run(*args, "resume=auto", f"hydra.run.dir={killed}")
    resumed, expected = losses(killed), losses(whole)
    assert set(range(2, 6)) <= set(resumed)
    assert resumed == {step: expected[step] for step in resumed}
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "last.ckpt.step-6"]


def test_sharded_checkpoint_loads_into_one_process_resharded_or_consolidated(tmp_path):
    """A 2-process sharded checkpoint at step 4 continues on 1 process two ways: FSDP2
    loading the folder itself (Lightning's loader, DCP resharding 2 shards into 1) and a
    single-device run from the file of ``python -m m3i_lightning.consolidate`` (assembled
    offline, optimizer states by name). Both give the same losses at steps 4 and 5 (step 5
    depends on the Adam moments). The consolidated file holds full tensors, and the eval and
    export loader rebuilds the backbone from the folder directly."""
    sharded, folder, file = tmp_path / "sharded", tmp_path / "resharded", tmp_path / "file"
    run(*TINY_RUN, *SHARDED, *TWO_CPU_PROCESSES, "trainer.max_steps=4",
        f"hydra.run.dir={sharded}")
    link = sharded / "checkpoints" / "last.ckpt"
    consolidated = tmp_path / "full.ckpt"
    run(f"checkpoint={link}", f"out={consolidated}", module="m3i_lightning.consolidate")
    full = torch.load(consolidated, weights_only=True)
    assert full["global_step"] == 4
    backbone = load_checkpoint(link).backbone.state_dict()
    for name, value in backbone.items():
        assert torch.equal(full["state_dict"][f"backbone.{name}"], value), name

    one = [*TINY_RUN, "objective=[cls]", "trainer.accelerator=cpu", "trainer.devices=1",
           "data.batch_size=16", "trainer.max_steps=6"]
    run(*one, "strategy=fsdp", f"resume={link}", f"hydra.run.dir={folder}")
    run(*one, "strategy=auto", f"resume={consolidated}", f"hydra.run.dir={file}")
    by_folder, by_file = losses(folder), losses(file)
    assert sorted(by_folder) == [4, 5]
    torch.testing.assert_close(by_folder, by_file, rtol=1e-5, atol=0)
