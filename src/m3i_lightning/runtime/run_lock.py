"""One training run at a time in a run folder.

Two runs writing one folder at once (a SLURM requeue racing the live job, a launch started
twice) would mix their checkpoints, logs and configs. The first process of a run holds
``run.lock`` in its folder while it runs: the holder's pid, host and a heartbeat (the file's
modification time, refreshed every :data:`HEARTBEAT_S` seconds by a daemon thread). A second
run is refused while the holder lives; a lock whose holder has died is taken over: on the
holder's host when its pid is gone, from any host once the heartbeat is older than
:data:`STALE_AFTER_S` (a node that died, a pid reused). The lock goes when the run ends,
exceptions included.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from m3i_lightning.core.errors import ConfigError

LOCK_FILE = "run.lock"
HEARTBEAT_S = 10.0
STALE_AFTER_S = 60.0
# Set, to the process's place among its run's processes, by the launchers that start several:
# torchrun, SLURM, Lightning (its own child processes), LSF.
RANK_VARIABLES = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "JSM_NAMESPACE_RANK")


def first_process() -> bool:
    """Whether this process is its run's first (rank 0 of every launcher), known from the
    environment before any process group exists."""
    return all(os.environ.get(name, "0") == "0" for name in RANK_VARIABLES)


class RunLock:
    """``with RunLock(folder):`` holds ``folder/run.lock`` for the block, or raises a
    :class:`ConfigError` naming the live holder."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.record = {"pid": os.getpid(), "host": socket.gethostname(),
                       "token": uuid.uuid4().hex}
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        while not self._create():
            holder, age = self._holder()
            if holder is None:
                continue  # released meanwhile
            if self._alive(holder, age):
                raise ConfigError(
                    f"the run folder {self.folder} is in use by process {holder.get('pid')} on "
                    f"{holder.get('host')} (its {LOCK_FILE} refreshed {age:.0f} s ago): wait "
                    "for that run to end, or give another folder (hydra.run.dir=...); the lock "
                    "of a process that has ended is taken over")
            self._take_over(holder)
        self._heartbeat = threading.Thread(target=self._beat, name="run-lock", daemon=True)
        self._heartbeat.start()

    def release(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        holder, _ = self._holder()
        if holder == self.record:
            self.path.unlink(missing_ok=True)

    def _create(self) -> bool:
        """Create the lock with this process's record; False when one exists."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return False
        except OSError as err:
            raise ConfigError(f"cannot write in the run folder {self.folder}: "
                              f"{err.strerror or err}; give a folder you can write "
                              "(hydra.run.dir=...)") from None
        with os.fdopen(fd, "w") as f:
            json.dump(self.record, f)
        return True

    def _holder(self) -> tuple[dict | None, float]:
        """The lock's record (``{}`` while unreadable: its holder still writing it, or a
        damaged file; None when there is no lock) and seconds since its last heartbeat."""
        try:
            age = time.time() - self.path.stat().st_mtime
            text = self.path.read_text()
        except FileNotFoundError:
            return None, 0.0
        except OSError as err:
            raise ConfigError(f"cannot read {self.path}: {err.strerror or err}") from None
        try:
            record = json.loads(text)
        except ValueError:
            record = {}
        return record if isinstance(record, dict) else {}, age

    def _alive(self, holder: dict, age: float) -> bool:
        if age > STALE_AFTER_S:
            return False
        if holder.get("host") != socket.gethostname():
            return True
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, KeyError, ValueError, TypeError):
            return True
        return True

    def _take_over(self, stale: dict) -> None:
        """Remove the stale lock, unless another process replaced it meanwhile: it is moved
        aside under a name of this process's own, checked, and put back when it is a new
        holder's."""
        aside = self.path.with_name(f"{LOCK_FILE}.{self.record['token']}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another process took it over first: look again
        except OSError as err:
            raise ConfigError(f"cannot take over the stale lock {self.path}: "
                              f"{err.strerror or err}") from None
        try:
            moved = json.loads(aside.read_text())
        except (OSError, ValueError):
            moved = {}
        if moved != stale:
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass  # the folder went away or became read-only: the run reports that itself
