"""Checkpoints that a preempted or crashed job resumes from exactly.

- :class:`AtomicCheckpointIO` writes each file next to its target and renames it over the
  target, so a crash while saving leaves the previous ``last.ckpt`` intact.
- :class:`LastCheckpoint` writes ``last.ckpt`` every N optimizer steps (or per epoch) and at
  the end of training.
- :class:`ExactResume` adds what Lightning's checkpoint lacks for an exact continuation: the
  random generators of every rank, and the data position (see
  :mod:`m3i_lightning.data.sampling`) restored reliably. Model, teacher, queues (buffers),
  logit scale, optimizer, LR schedule and loop counters are Lightning's own.
- :func:`resume_path` finds the checkpoint to resume from: ``resume=auto`` takes the newest of
  the run folder, for jobs that restart into the same folder.
- :func:`read_checkpoint` is the one reader of checkpoints (resume, eval, export): the safe
  loader, whose failures become one line naming the option and the file. It also reads the
  sharded folders of ``checkpoint.sharded=true``
  (:mod:`m3i_lightning.runtime.sharded_checkpoint`) as one consolidated checkpoint, which
  :mod:`m3i_lightning.commands.consolidate` writes as a file. :func:`read_weight_shapes`
  reads as little as the format allows (a file memory-mapped, a sharded folder's index): what
  a resume checks against its model before anything of the run is written.

Everything in a checkpoint is tensors, numbers and strings, so a file (and a sharded folder's
``meta.pt``) loads with ``weights_only=True``. A sharded folder's shard index is DCP's own
pickle: it is read through an unpickler that builds DCP's metadata classes alone
(:func:`~m3i_lightning.runtime.sharded_checkpoint.read_index`).
"""

from __future__ import annotations

import errno
import logging
import math
import os
import pickle
import random
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import CombinedLoader

from m3i_lightning.core.errors import ConfigError, M3IError
from m3i_lightning.runtime.sharded_checkpoint import (
    METADATA_FILE,
    PARTIAL_SUFFIX,
    UnusableShards,
    is_sharded,
    read_sharded,
    remove_stale,
    weight_shapes,
)

log = logging.getLogger(__name__)

# torch's weights_only refusal of a stored object, whichever way it words it: "Unsupported
# global: GLOBAL x was not an allowed global" or "unsupported GLOBAL x whose module is blocked"
REFUSED_BY_SAFE_LOADER = r"GLOBAL (\S+)"


def unwritable(path: Path, checkpoint: dict[str, Any], err: OSError) -> str:
    """Why ``checkpoint`` could not be saved at ``path``: for a full disk, how much it needs
    against what is free; the previous file at ``path`` is untouched either way."""
    kept = "the previous checkpoint there is intact" if path.is_file() else "nothing was saved"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        free = shutil.disk_usage(path.parent).free
        return (f"no space left to write {path}: the checkpoint needs about "
                f"{human_bytes(tensor_bytes(checkpoint))}, {human_bytes(free)} free on that "
                f"filesystem; {kept}. Free space or give a run folder on a bigger disk")
    return f"cannot write {path}: {err.strerror or err}; {kept}"


def tensor_bytes(tree: Any) -> int:
    """Bytes of the tensors in a nested checkpoint (the bulk of the file), storages once."""
    seen: dict[int, int] = {}

    def visit(node: Any) -> None:
        if isinstance(node, torch.Tensor):
            storage = node.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        elif isinstance(node, dict):
            for value in node.values():
                visit(value)
        elif isinstance(node, list | tuple):
            for value in node:
                visit(value)

    visit(tree)
    return sum(seen.values())


def human_bytes(count: float) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    unit = 0
    while count >= 1024 and unit < len(units) - 1:
        count, unit = count / 1024, unit + 1
    return f"{count:.1f} {units[unit]}"


def read_checkpoint(path, option: str, map_location="cpu") -> dict[str, Any]:
    """``torch.load(path, weights_only=True)``: the safe loader, which never runs code stored in
    a file; a sharded folder is assembled into one checkpoint (:func:`read_sharded`, its index
    read by a restricted unpickler). Every way it can fail is a :class:`ConfigError` naming
    ``option`` (the setting that gave the path): a missing file, a folder that is no complete
    sharded checkpoint, a missing or truncated shard, a truncated or foreign file, and a pickle
    the safe loader refuses (it stays refused: this library writes only tensors, numbers and
    strings)."""
    path = _checkpoint_path(path, option)
    if is_sharded(path):
        try:
            return read_sharded(path, lambda metadata: _read_file(metadata, option, map_location))
        except UnusableShards as err:
            raise ConfigError(f"{option}={path} {err}") from None
        except (RuntimeError, ValueError, OSError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigError(f"{option}={path} cannot be read as a sharded checkpoint "
                              f"(missing or truncated shards): {reason}") from None
    return _read_file(path, option, map_location)


def read_weight_shapes(path, option: str) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """What a checkpoint holds besides its weights, and the shape of each model weight, read
    as cheaply as the format allows: a file memory-mapped, a sharded folder from its index and
    ``meta.pt`` (no shard is read). Fails as :func:`read_checkpoint` does."""
    path = _checkpoint_path(path, option)
    if is_sharded(path):
        try:
            shapes = weight_shapes(path)
        except UnusableShards as err:
            raise ConfigError(f"{option}={path} {err}") from None
        return _read_file(path / METADATA_FILE, option, "cpu"), shapes
    checkpoint = _read_file(path, option, "cpu", mmap=True)
    shapes = {k: tuple(v.shape) for k, v in checkpoint.get("state_dict", {}).items()}
    return {k: v for k, v in checkpoint.items()
            if k not in ("state_dict", "optimizer_states")}, shapes


def _checkpoint_path(path, option: str) -> Path:
    """``path`` as a file or a complete sharded folder, else a :class:`ConfigError`."""
    path = Path(path)
    if is_sharded(path) or path.is_file():
        return path
    if path.is_dir():
        found = sorted(checkpoints_in(path))
        hint = f", e.g. {option}={found[-1]}" if found else ""
        raise ConfigError(f"{option}={path} is a folder but no complete sharded checkpoint; "
                          f"give a checkpoint file or sharded folder{hint}")
    raise ConfigError(f"{option}={path}: no such file")


def _read_file(path: Path, option: str, map_location, mmap: bool = False) -> dict[str, Any]:
    try:
        return torch.load(path, map_location=map_location, weights_only=True,
                          mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        refused = re.search(REFUSED_BY_SAFE_LOADER, str(err))
        if refused or _is_pickle(path):
            stored = f" ({refused.group(1)})" if refused else ""
            raise ConfigError(f"{option}={path} is not a checkpoint this library wrote or trusts: "
                              f"it stores Python objects{stored}, not only tensors and numbers, "
                              "and is not loaded") from None
        raise ConfigError(f"{option}={path} cannot be read as a checkpoint (truncated, or not "
                          "a torch file)") from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as err:
        reason = str(err).split(". ")[0].splitlines()[0] if str(err) else ""
        raise ConfigError(f"{option}={path} cannot be read as a checkpoint (truncated, or not "
                          f"a torch file): {type(err).__name__}: {reason}") from None


def _is_pickle(path: Path) -> bool:
    """A plain pickle of protocol 2 or later (``pickle.dump``), not a torch file: the safe
    loader stops at its first opcode, which only says it is no torch file."""
    with open(path, "rb") as f:
        head = f.read(2)
    return len(head) == 2 and head[0] == pickle.PROTO[0] and 2 <= head[1] <= pickle.HIGHEST_PROTOCOL


class AtomicCheckpointIO(TorchCheckpointIO):
    """Stream the checkpoint into ``<name>.partial`` in the target's folder, flush it to disk,
    then rename it over the target: a rename within a folder is atomic (POSIX), so readers see
    the old checkpoint or the new one, never a truncated file. Lightning's own writer stages
    the file in the system temp folder, which is atomic only when that folder shares the
    target's filesystem (rarely so on a cluster), and first holds the whole checkpoint in
    memory. Local and network filesystems, not object stores."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + PARTIAL_SUFFIX)
        try:
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, path)
            remove_stale(path)
        except OSError as err:
            partial.unlink(missing_ok=True)
            raise M3IError(unwritable(path, checkpoint, err)) from None

    def load_checkpoint(self, path, map_location="cpu", weights_only=None) -> dict[str, Any]:
        """Resume through :func:`read_checkpoint`, always with the safe loader."""
        return read_checkpoint(path, "resume", map_location)


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt`` only, always under that name (no ``last-v1.ckpt`` when a resumed run
    finds it), every ``every_n_steps`` optimizer steps, and once more at the end of training:
    the final state is always on disk.

    ``every_n_steps=None`` saves at the last step of every epoch, through the same step trigger
    (its length in optimizer steps, known when training starts): a checkpoint written by
    Lightning's epoch-end hook resumes into a repeat of the epoch's first batch, and Lightning's
    own epoch trigger writes ``last`` only beside a top-k checkpoint, of which there are none.
    Epochs of unknown length (streamed data) are saved at the end only, which the run says."""

    def __init__(self, dirpath: Path, every_n_steps: int | None = None) -> None:
        super().__init__(dirpath=dirpath, save_last=True, save_top_k=0,
                         every_n_train_steps=every_n_steps or 0, enable_version_counter=False)
        self.every_epoch = every_n_steps is None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if not self.every_epoch:
            return
        batches = trainer.num_training_batches
        if math.isinf(batches):
            log.warning("the epochs' length is unknown (streamed data): last.ckpt is written at "
                        "the end of training only; set checkpoint.every_n_steps to save on the "
                        "way")
            return
        self._every_n_train_steps = max(1, math.ceil(batches / trainer.accumulate_grad_batches))

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class ExactResume(Callback):
    """Saves what an exact continuation needs beyond Lightning's own state, and restores it
    when the resumed training starts (late on purpose: whatever draws while the run is set up
    stays out of the random streams):

    - the torch (CPU and CUDA), Python and NumPy generators of every rank, so masks, mixing
      partners and any other draw continue as if the run had never stopped;
    - the position of the stateful training loaders. Lightning saves it too but drops it on
      resume when ``configure_optimizers`` reads ``estimated_stepping_batches``, as the engine
      does (Lightning issue #20550); loading it twice is harmless.
    """

    KEY = "m3i_resume"

    def __init__(self) -> None:
        self._to_restore: dict | None = None

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        state = _capture()
        ranks = [state]
        if dist.is_available() and dist.is_initialized():
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, state)
        checkpoint[self.KEY] = {"random": ranks,
                                "loaders": [loader.state_dict() for loader in _stateful(trainer)]}

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self._to_restore = checkpoint.get(self.KEY)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        state, self._to_restore = self._to_restore, None
        if state is None:
            return
        loaders = _stateful(trainer)
        if len(loaders) == len(state["loaders"]):
            for loader, position in zip(loaders, state["loaders"], strict=True):
                loader.load_state_dict(position)
        if len(state["random"]) == trainer.world_size:
            _restore(state["random"][trainer.global_rank])
        else:
            log.warning("resuming %d rank(s) from a checkpoint of %d: random streams restart "
                        "from the seed", trainer.world_size, len(state["random"]))


def _stateful(trainer: Trainer) -> list:
    """The training loaders that can save their position (``state_dict``)."""
    if trainer.train_dataloader is None:
        return []
    return [loader for loader in CombinedLoader(trainer.train_dataloader).flattened
            if hasattr(loader, "state_dict") and hasattr(loader, "load_state_dict")]


def _capture() -> dict[str, Any]:
    numpy_state = np.random.get_state(legacy=False)
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {**numpy_state, "state": {
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": numpy_state["state"]["pos"]}},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    np.random.set_state({**numpy_state, "state": {
        "key": numpy_state["state"]["key"].numpy().astype(np.uint32),
        "pos": numpy_state["state"]["pos"]}})
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoints_in(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run folder: ``checkpoints/*.ckpt`` and the
    ``hpc_ckpt_*.ckpt`` Lightning writes when SLURM requeues a job, files or links to complete
    sharded folders (never ``*.partial``, nor a folder a killed save left)."""
    run_dir = Path(run_dir)
    return [p for p in [*run_dir.glob("*.ckpt"), *(run_dir / "checkpoints").glob("*.ckpt")]
            if p.is_file() or is_sharded(p)]


def resume_path(resume: str | None, run_dir: Path) -> str | None:
    """``resume``: null (start fresh), ``auto`` (the newest checkpoint of ``run_dir``, or a
    fresh start when there is none yet) or a checkpoint path (file or sharded folder). The
    newest is the last written: a file's time, or when a sharded folder's link last moved."""
    if not resume:
        return None
    if resume == "auto":
        found = max(checkpoints_in(run_dir), key=lambda p: p.lstat().st_mtime, default=None)
        if found is None:
            log.info("resume=auto: no checkpoint in %s yet, starting fresh", run_dir)
            return None
        log.info("resume=auto: resuming from %s", found)
        return str(found)
    if not (Path(resume).is_file() or is_sharded(Path(resume))):
        raise ConfigError(f"resume={resume}: no such checkpoint file or complete sharded "
                          "folder; use resume=auto to take the newest checkpoint of the run "
                          "folder")
    return str(resume)
