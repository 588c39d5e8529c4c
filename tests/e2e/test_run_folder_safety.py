"""Nothing of a run folder is lost (#31): a refused or failed start leaves the folder byte for
byte as it was, Hydra's record ``.hydra/`` included; a second run into a folder in use is
refused in one line while the first finishes untouched; places a run cannot write are found
before its first step; consolidate does not overwrite a file unless asked."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest
import torch
from helpers import QUIET_HYDRA, TINY_RUN, fails_with_one_line, losses, run, start

from m3i_lightning.commands import consolidate as consolidate_command
from m3i_lightning.commands import pretrain
from m3i_lightning.runtime.run_lock import LOCK_FILE

TINY_CLS = [*TINY_RUN, "objective=[cls]", "data.batch_size=32"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """The folder of a finished two-step run."""
    folder = tmp_path_factory.mktemp("finished") / "run"
    run(*TINY_CLS, "trainer.max_steps=2", f"hydra.run.dir={folder}")
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones included) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


REFUSED_STARTS = {
    "a new run": (["backbone.embed_dim=48", "optim.lr=0.5"],
                  "already holds checkpoints/last.ckpt"),
    "resume=auto, other objectives": (
        ["resume=auto", "objective=[mim_feat]"],
        "does not fit this run's model: it was trained with objective=['cls']; this run asks "
        "for objective=['mim_feat'] (weights: "),
    "resume=auto, another backbone": (
        ["resume=auto", "backbone.embed_dim=48"],
        "does not fit this run's model: it was trained with backbone.embed_dim=32; this run "
        "asks for backbone.embed_dim=48 (weights: "),
}


@pytest.mark.parametrize("case", REFUSED_STARTS)
def test_a_refused_or_failed_start_leaves_the_run_folder_byte_for_byte(finished, tmp_path,
                                                                       capsys, monkeypatch, case):
    """The record Hydra used to rewrite before any check (.hydra/overrides.yaml then named a
    run that never happened), the checkpoint and the metrics are as they were, and no lock is
    left behind."""
    args, expected = REFUSED_STARTS[case]
    folder = tmp_path / "run"
    shutil.copytree(finished, folder)
    before = snapshot(folder)
    assert {".hydra/config.yaml", ".hydra/overrides.yaml", "checkpoints/last.ckpt"} <= set(before)
    line = fails_with_one_line(capsys, monkeypatch, pretrain.main, "m3i_lightning", *TINY_CLS,
                               "trainer.max_steps=4", *args, f"hydra.run.dir={folder}",
                               *QUIET_HYDRA)
    assert expected in line, line
    assert snapshot(folder) == before


def test_a_sweep_marks_its_own_failed_jobs_and_leaves_an_earlier_run_alone(finished, tmp_path,
                                                                          capsys, monkeypatch):
    """A sweep run again into its folder: job 0 finds an earlier run there and is refused
    without a mark (it would brand that run FAILED for scripts/summarize_runs.py); job 1 is
    accepted and fails after its fit (no batch of 4,000 digits), so its own folder holds its
    record and FAILED."""
    sweep = tmp_path / "sweep"
    shutil.copytree(finished, sweep / "0")
    before = snapshot(sweep / "0")
    line = fails_with_one_line(capsys, monkeypatch, pretrain.main, "m3i_lightning", "-m",
                               *TINY_CLS, "trainer.max_steps=2", "data.batch_size=32,4000",
                               f"hydra.sweep.dir={sweep}", *QUIET_HYDRA)
    assert line.startswith("error: 2 of 2 sweep jobs failed") and "already holds" in line
    assert snapshot(sweep / "0") == before
    assert "no training step ran" in (sweep / "1" / "FAILED").read_text()
    assert "data.batch_size=4000" in (sweep / "1" / ".hydra" / "overrides.yaml").read_text()


# The first run stops where training starts (its lock held, its record written) until the test
# creates the file GO.
WAIT_AT_TRAIN_START = """
import time
from pathlib import Path
from m3i_lightning.runtime.checkpointing import ExactResume
started = ExactResume.on_train_start
def wait_for_go(self, trainer, module):
    Path({paused!r}).touch()
    while not Path({go!r}).exists():
        time.sleep(0.1)
    started(self, trainer, module)
ExactResume.on_train_start = wait_for_go
"""


def test_a_second_run_into_a_folder_in_use_is_refused_while_the_first_finishes_untouched(
        tmp_path, capsys, monkeypatch):
    """Two runs into one folder (a requeued job racing the live one): the second is refused in
    one line naming the first's process; the first then finishes with its own record, its
    three steps' checkpoint and every loss row, and releases the lock."""
    folder, paused, go = tmp_path / "run", tmp_path / "paused", tmp_path / "go"
    first = start(*TINY_CLS, "trainer.max_steps=3", "optim.lr=0.002",
                  f"hydra.run.dir={folder}", scripts=tmp_path,
                  prelude=WAIT_AT_TRAIN_START.format(paused=str(paused), go=str(go)))
    try:
        while not paused.exists() and first.poll() is None:
            time.sleep(0.1)
        assert first.poll() is None, first.communicate()[1][-3000:]
        line = fails_with_one_line(capsys, monkeypatch, pretrain.main, "m3i_lightning",
                                   *TINY_CLS, "trainer.max_steps=5", f"hydra.run.dir={folder}",
                                   *QUIET_HYDRA)
        assert f"the run folder {folder} is in use by process {first.pid} on" in line
        go.touch()
        _, stderr = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 0, stderr[-3000:]
    overrides = (folder / ".hydra" / "overrides.yaml").read_text()
    assert "optim.lr=0.002" in overrides and "trainer.max_steps=3" in overrides
    assert torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert sorted(losses(folder)) == [0, 1, 2]
    assert not (folder / LOCK_FILE).exists()


@pytest.fixture
def shared_tmp():
    """A folder another user can enter (pytest's own are private to the user running it)."""
    with tempfile.TemporaryDirectory() as folder:
        os.chmod(folder, 0o777)
        yield Path(folder)


# Root writes anywhere: as root, the command runs as nobody to meet the permissions.
OTHER_USER = 65534 if os.geteuid() == 0 else None


def one_error_line(done) -> str:
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr
    return errors[0]


UNWRITABLE_RUNS = {"m3i_lightning": [*TINY_CLS, "trainer.max_steps=1"],
                   "m3i_lightning.finetune": ["random_init=true"],
                   "m3i_lightning.eval": [f"checkpoint={Path(__file__)}"]}


@pytest.mark.parametrize("module", UNWRITABLE_RUNS)
def test_an_unwritable_parent_of_the_run_folder_is_one_line(shared_tmp, module):
    """Found before Hydra creates the folder (its PermissionError was a traceback)."""
    locked = shared_tmp / "locked"
    locked.mkdir(mode=0o555)
    locked.chmod(0o555)
    done = run(*UNWRITABLE_RUNS[module], f"hydra.run.dir={locked / 'run'}", module=module,
               check=False, user=OTHER_USER)
    line = one_error_line(done)
    assert f"cannot write the run folder hydra.run.dir={locked / 'run'}: Permission denied" in line
    assert list(locked.iterdir()) == []


def test_a_read_only_checkpoints_folder_is_refused_before_training(finished, shared_tmp):
    """Found at the start, not after the last step ("nothing was saved"); the run folder is
    left as it was."""
    folder = shared_tmp / "run"
    shutil.copytree(finished, folder)
    for path in (folder, *folder.rglob("*")):
        path.chmod(0o777 if path.is_dir() else 0o666)
    (folder / "checkpoints").chmod(0o555)
    before = snapshot(folder)
    done = run(*TINY_CLS, "trainer.max_steps=4", "resume=auto", f"hydra.run.dir={folder}",
               *QUIET_HYDRA, check=False, user=OTHER_USER)
    line = one_error_line(done)
    assert f"cannot write in {folder / 'checkpoints'}: Permission denied" in line
    assert snapshot(folder) == before


def test_consolidate_replaces_an_existing_file_only_with_overwrite(finished, tmp_path, capsys,
                                                                   monkeypatch):
    source = finished / "checkpoints" / "last.ckpt"
    other = tmp_path / "last.ckpt"
    other.write_bytes(b"another run's checkpoint")
    line = fails_with_one_line(capsys, monkeypatch, consolidate_command.main, "consolidate",
                               f"checkpoint={source}", f"out={other}")
    assert f"out={other} already exists" in line and "overwrite=true" in line
    assert other.read_bytes() == b"another run's checkpoint"
    line = fails_with_one_line(capsys, monkeypatch, consolidate_command.main, "consolidate",
                               f"checkpoint={source}", f"out={tmp_path}", "overwrite=true")
    assert f"out={tmp_path} is a folder" in line
    consolidate_command.main([f"checkpoint={source}", f"out={other}", "overwrite=true"])
    written = torch.load(other, weights_only=True)
    assert written["global_step"] == 2
    expected = torch.load(source, weights_only=True)["state_dict"]
    assert all(torch.equal(written["state_dict"][k], v) for k, v in expected.items())
