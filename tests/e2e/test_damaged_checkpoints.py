"""Checkpoints and exported folders that are damaged, crafted or mismatched (#31): one
``error:`` line in every command that reads them, nothing executed, nothing of the run folder
changed; intact sharded checkpoints still load everywhere, fine-tuning included."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from helpers import (
    QUIET_HYDRA,
    TINY_FINETUNE,
    TINY_RUN,
    fails_with_one_line,
    run,
    tiny_backbone,
)

from m3i_lightning.commands import consolidate as consolidate_command
from m3i_lightning.commands import eval as eval_command
from m3i_lightning.commands import export as export_command
from m3i_lightning.commands import finetune as finetune_command
from m3i_lightning.commands import pretrain
from m3i_lightning.config.artifacts import CONFIG_FILE, export_model, load_exported
from m3i_lightning.config.restore import load_checkpoint
from m3i_lightning.evaluation.protocols import TrainedModel
from m3i_lightning.runtime.sharded_checkpoint import INDEX_FILE

SHARDED = [*TINY_RUN, "objective=[cls]", "strategy=fsdp", "trainer.accelerator=cpu",
           "trainer.devices=1", "data.batch_size=16", "checkpoint.sharded=true"]


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory) -> Path:
    """A two-step FSDP2 run on one CPU process writing sharded checkpoints (last.ckpt, a link
    to its folder of DCP shards, index and meta.pt)."""
    folder = tmp_path_factory.mktemp("sharded") / "run"
    run(*SHARDED, "trainer.max_steps=2", f"hydra.run.dir={folder}")
    return folder


class RunsACommand:
    """Unpickled, calls ``os.system``: what a crafted ``.metadata`` does to ``pickle.load``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def read_by(command: str, link: Path, tmp_path: Path, capsys, monkeypatch) -> str:
    """The one error line of ``command`` given the sharded checkpoint at ``link``."""
    if command == "consolidate":
        return fails_with_one_line(capsys, monkeypatch, consolidate_command.main, "consolidate",
                                   f"checkpoint={link}", f"out={tmp_path / 'out.ckpt'}")
    if command == "eval":
        return fails_with_one_line(capsys, monkeypatch, eval_command.main, "eval",
                                   f"checkpoint={link}", f"hydra.run.dir={tmp_path / 'eval'}",
                                   *QUIET_HYDRA)
    if command == "export":
        return fails_with_one_line(capsys, monkeypatch, export_command.main, "export",
                                   f"checkpoint={link}", f"out={tmp_path / 'exported'}")
    return fails_with_one_line(capsys, monkeypatch, pretrain.main, "m3i_lightning", *SHARDED,
                               "trainer.max_steps=4", "resume=auto",
                               f"hydra.run.dir={link.parent.parent}", *QUIET_HYDRA)


@pytest.mark.parametrize("command", ["consolidate", "eval", "export", "resume"])
@pytest.mark.parametrize("damage", ["missing shard", "crafted index"])
def test_a_damaged_or_crafted_sharded_checkpoint_is_one_line_everywhere(
        sharded_run, tmp_path, capsys, monkeypatch, damage, command):
    """A shard lost in a copy: named, instead of DCP's CheckpointException traceback. A shard
    index that would run a shell command when unpickled: refused, and the command never runs.
    The run folder is left as it was (resume=auto picks such folders up by itself)."""
    folder = tmp_path / "run"
    shutil.copytree(sharded_run, folder, symlinks=True)
    link = folder / "checkpoints" / "last.ckpt"
    marker = tmp_path / "executed"
    if damage == "missing shard":
        (link / "__0_0.distcp").unlink()
        expected = "cannot be read as a sharded checkpoint: its shard file __0_0.distcp is missing"
    else:
        (link / INDEX_FILE).write_bytes(pickle.dumps(RunsACommand(marker)))
        expected = (f"is not loaded: its shard index ({INDEX_FILE}) would build posix.system, "
                    "which is none of DCP's metadata classes")
    before = snapshot(folder)
    line = read_by(command, link, tmp_path, capsys, monkeypatch)
    option = "resume" if command == "resume" else "checkpoint"
    assert f"error: {option}={link} {expected}" in line, line
    assert not marker.exists()
    assert snapshot(folder) == before
    assert not (tmp_path / "out.ckpt").exists() and not (tmp_path / "exported").exists()


@pytest.mark.parametrize("command", ["consolidate", "eval", "export", "resume"])
def test_a_shard_of_the_right_size_but_damaged_bytes_is_one_line(sharded_run, tmp_path, capsys,
                                                                   monkeypatch, command):
    """Past the index's checks, DCP's own failure (a CheckpointException, which is no
    Exception) is caught where the folder is assembled, or where Lightning loads it to resume."""
    folder = tmp_path / "run"
    shutil.copytree(sharded_run, folder, symlinks=True)
    link = folder / "checkpoints" / "last.ckpt"
    shard = link / "__0_0.distcp"
    shard.write_bytes(bytes(shard.stat().st_size))
    line = read_by(command, link, tmp_path, capsys, monkeypatch)
    option = "resume" if command == "resume" else "checkpoint"
    assert f"error: {option}={link} cannot be read as a sharded checkpoint: a shard is " \
           "damaged (" in line, line


def test_an_intact_sharded_checkpoint_is_exported_and_fine_tuned(sharded_run, tmp_path):
    """DCP's real index passes the restricted unpickler; ``finetune checkpoint=`` reads the
    sharded folder as eval and export do (it used to answer "no such file")."""
    link = sharded_run / "checkpoints" / "last.ckpt"
    export_command.main([f"checkpoint={link}", f"out={tmp_path / 'exported'}"])
    trained = load_checkpoint(link).backbone.state_dict()
    exported = load_exported(tmp_path / "exported").backbone.state_dict()
    assert trained.keys() == exported.keys()
    assert all(torch.equal(trained[k], exported[k]) for k in trained)
    out = tmp_path / "finetune"
    run(*TINY_FINETUNE, "backbone.depth=1", f"checkpoint={link}", "finetune.epochs=1",
        "trainer.max_steps=2", f"hydra.run.dir={out}", module="m3i_lightning.finetune")
    summary = json.loads((out / "finetune.json").read_text())
    assert summary["source"] == f"checkpoint={link}" and summary["steps"] == 2


@pytest.mark.parametrize("pickled", ["a stored os.system", "a plain pickle"])
def test_a_pickled_checkpoint_is_refused_and_runs_nothing(tmp_path, capsys, monkeypatch,
                                                          pickled):
    """torch 2.14 words the safe loader's refusal of a blocked module ("unsupported GLOBAL
    posix.system whose module posix is blocked") and of a pickle that is no torch file
    ("Unsupported operand") otherwise than the "Unsupported global" of earlier versions:
    neither is reported as a truncated file."""
    path, marker = tmp_path / "pickled.ckpt", tmp_path / "executed"
    if pickled == "a stored os.system":
        torch.save({"state_dict": {}, "hook": RunsACommand(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({"state_dict": {}}, protocol=4))
    line = fails_with_one_line(capsys, monkeypatch, eval_command.main, "eval",
                               f"checkpoint={path}", f"hydra.run.dir={tmp_path / 'eval'}",
                               *QUIET_HYDRA)
    assert f"checkpoint={path} is not a checkpoint this library wrote or trusts" in line
    if pickled == "a stored os.system":
        assert "(posix.system)" in line
    assert not marker.exists()


MISMATCHES = {
    "weights of another width": ({"embed_dim": 48},
                                 "model.safetensors does not hold the network config.json "
                                 "describes, vit_tiny_patch16_224("),
    "an argument timm lacks": ({"bogus_option": 1}, "which timm cannot build"),
}


@pytest.mark.parametrize("command", ["eval", "finetune"])
@pytest.mark.parametrize("mismatch", MISMATCHES)
def test_an_exported_folder_whose_config_does_not_fit_its_weights_is_one_line(
        tmp_path, capsys, monkeypatch, mismatch, command):
    changed, expected = MISMATCHES[mismatch]
    folder = export_model(TrainedModel(tiny_backbone()), tmp_path / "exported")
    config = json.loads((folder / CONFIG_FILE).read_text())
    config["model_args"].update(changed)
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    main = eval_command.main if command == "eval" else finetune_command.main
    line = fails_with_one_line(capsys, monkeypatch, main, command, *TINY_FINETUNE,
                               f"backbone_dir={folder}", f"hydra.run.dir={tmp_path / 'out'}",
                               *QUIET_HYDRA)
    assert expected in line and "export the checkpoint again" in line, line
