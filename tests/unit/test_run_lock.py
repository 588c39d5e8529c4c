"""The run folder's lock: held for the block and gone after it (exceptions included), refused
in one message while its holder lives, taken over once the holder is dead (its pid gone on
this host, or its heartbeat stale from any host)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from m3i_lightning.core.errors import ConfigError
from m3i_lightning.runtime import run_lock
from m3i_lightning.runtime.run_lock import LOCK_FILE, STALE_AFTER_S, RunLock, first_process


def hold(folder, pid: int, host: str, age: float = 0.0) -> None:
    """A lock in ``folder`` as another process would have left it, ``age`` seconds old."""
    path = folder / LOCK_FILE
    path.write_text(json.dumps({"pid": pid, "host": host, "token": "other"}))
    then = time.time() - age
    os.utime(path, (then, then))


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(done.stdout)


def test_held_for_the_block_and_released_after_it_even_on_an_exception(tmp_path):
    with RunLock(tmp_path) as lock:
        record = json.loads((tmp_path / LOCK_FILE).read_text())
        assert record["pid"] == os.getpid() and record == lock.record
    assert not (tmp_path / LOCK_FILE).exists()
    with pytest.raises(RuntimeError, match="inside"), RunLock(tmp_path):
        raise RuntimeError("inside")
    assert list(tmp_path.iterdir()) == []


def test_a_live_holder_refuses_the_second_run_and_keeps_its_lock(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(ConfigError, match=f"in use by process {os.getpid()} on") as refused:
            RunLock(tmp_path).acquire()
        assert "hydra.run.dir=" in str(refused.value)
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    hold(tmp_path, pid=1, host="another-node")  # alive as far as anyone here can tell
    with pytest.raises(ConfigError, match="in use by process 1 on another-node"):
        RunLock(tmp_path).acquire()


@pytest.mark.parametrize("holder", ["dead pid on this host", "stale heartbeat elsewhere",
                                    "stale heartbeat, unreadable"])
def test_the_lock_of_a_dead_holder_is_taken_over(tmp_path, holder):
    if holder == "dead pid on this host":
        hold(tmp_path, dead_pid(), socket.gethostname())
    elif holder == "stale heartbeat elsewhere":
        hold(tmp_path, 1, "another-node", age=STALE_AFTER_S + 5)
    else:
        (tmp_path / LOCK_FILE).write_text("{torn")
        then = time.time() - STALE_AFTER_S - 5
        os.utime(tmp_path / LOCK_FILE, (then, then))
    with RunLock(tmp_path) as lock:
        assert json.loads((tmp_path / LOCK_FILE).read_text()) == lock.record
        assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]
    assert list(tmp_path.iterdir()) == []


def test_the_heartbeat_keeps_a_long_run_from_looking_stale(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    with RunLock(tmp_path):
        then = time.time() - 3600
        os.utime(tmp_path / LOCK_FILE, (then, then))
        deadline = time.monotonic() + 30
        while time.time() - (tmp_path / LOCK_FILE).stat().st_mtime > 60:
            assert time.monotonic() < deadline, "the heartbeat never refreshed the lock"
            time.sleep(0.05)


@pytest.mark.parametrize("variables, first", [
    ({}, True), ({"RANK": "0", "LOCAL_RANK": "0"}, True), ({"LOCAL_RANK": "1"}, False),
    ({"RANK": "3"}, False), ({"SLURM_PROCID": "2"}, False)])
def test_only_the_first_process_of_a_launch_takes_the_lock(monkeypatch, variables, first):
    for name in run_lock.RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert first_process() is first
