"""Sharded checkpoints of FSDP2 runs (``checkpoint.sharded=true``): every rank writes its own
shards with ``torch.distributed.checkpoint`` (DCP), in the background with
``checkpoint.async=true``, and any number of processes reads them back (DCP reshards on load).

The folder has the layout of Lightning's ``ModelParallelStrategy`` with
``save_distributed_checkpoint=True`` (DCP shards of ``state_dict`` and ``optimizer_<i>``, and
``meta.pt`` holding the rest: loop counters, callbacks, the random streams and data position of
:class:`~m3i_lightning.runtime.checkpointing.ExactResume`, the run's config), so Lightning's own
loader resumes from it. What :class:`ShardedCheckpointWriter` adds to Lightning's writer:

- atomicity. A save goes into ``<name>.step-<N>.partial/``, is renamed ``<name>.step-<N>/``
  once every rank's shards and DCP's index are on disk, and only then the symbolic link
  ``<name>`` (``last.ckpt``) moves to it (a new link renamed over the old one). A job killed
  mid-save keeps ``<name>`` on the previous complete folder; leftovers go at the next save.
- asynchrony. The shards are copied to memory at the save and written by a background thread,
  over a process group of its own (collectives of training and writing would interleave on one
  group), while training goes on; the next save and the end of training wait for it.

:func:`read_sharded` gathers a folder into the layout of a consolidated file on one process.
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from m3i_lightning.core.errors import M3IError

METADATA_FILE = "meta.pt"  # Lightning's name for the non-tensor part of a sharded checkpoint
INDEX_FILE = ".metadata"  # DCP's index of the shards, written last by the coordinating rank
PARTIAL_SUFFIX = ".partial"  # of a save under way, file or folder, until renamed into place
STEP_INFIX = ".step-"


def is_sharded(path: Path) -> bool:
    """A complete sharded checkpoint: a folder (or a link to one) with both index files."""
    path = Path(path)
    return path.is_dir() and (path / METADATA_FILE).is_file() and (path / INDEX_FILE).is_file()


def read_sharded(folder: Path, read_metadata: Callable[[Path], dict]) -> dict[str, Any]:
    """The checkpoint in ``folder`` as one dict laid out like a consolidated file: full
    tensors assembled from every rank's shards, on one process without a process group.
    Optimizer states stay keyed by parameter name: a torch optimizer loads them by position in
    its groups, Lightning's FSDP2 loader by name (an index would need the model's parameter
    order, frozen ones included). ``read_metadata`` reads ``meta.pt`` (the caller's safe
    loader)."""
    checkpoint = read_metadata(Path(folder) / METADATA_FILE)
    shards: dict[str, Any] = {}
    # torch's own DCP-to-file converter (format_utils.dcp_to_torch_save), minus the file
    _load_state_dict(shards, dcp.FileSystemReader(folder), planner=_EmptyStateDictLoadPlanner(),
                     no_dist=True)
    checkpoint["state_dict"] = shards.pop("state_dict")
    count = len([key for key in shards if key.startswith("optimizer_")])
    checkpoint["optimizer_states"] = [shards[f"optimizer_{i}"] for i in range(count)]
    return checkpoint


class ShardedCheckpointWriter:
    """Writes Lightning's checkpoint dict (sharded ``state_dict`` and ``optimizer_states``)
    as a sharded folder behind a link; every rank calls :meth:`save` and :meth:`wait`."""

    def __init__(self, asynchronous: bool) -> None:
        self.asynchronous = asynchronous
        self._executor = ThreadPoolExecutor(1, "sharded-checkpoint") if asynchronous else None
        self._group: dist.ProcessGroup | None = None
        self._pending: Future | None = None

    def save(self, checkpoint: dict[str, Any], link: Path) -> None:
        self.wait()
        leader = dist.get_rank() == 0
        chosen = [_fresh_folder(link, checkpoint["global_step"]) if leader else None]
        dist.broadcast_object_list(chosen)
        folder: Path = chosen[0]
        partial = folder.with_name(folder.name + PARTIAL_SUFFIX)
        shards = {"state_dict": checkpoint["state_dict"],
                  **{f"optimizer_{i}": state
                     for i, state in enumerate(checkpoint.get("optimizer_states", []))}}
        if leader:
            partial.mkdir(parents=True)
            metadata = {k: v for k, v in checkpoint.items()
                        if k not in ("state_dict", "optimizer_states")}
            torch.save(metadata, partial / METADATA_FILE)
        dist.barrier()
        if not self.asynchronous:
            self._written(lambda: dcp.save(shards, checkpoint_id=partial), partial, folder, link)
            return
        if self._group is None:
            self._group = dist.new_group(backend="gloo")
        upload = dcp.async_save(shards, checkpoint_id=partial, process_group=self._group)
        self._pending = self._executor.submit(self._written, upload.result, partial, folder,
                                              link)

    def wait(self) -> None:
        """Until the save in flight, if any, is on disk and committed (on rank 0)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _written(self, write: Callable[[], Any], partial: Path, folder: Path,
                 link: Path) -> None:
        try:
            write()
            if dist.get_rank() == 0:
                _commit(partial, folder, link)
        except OSError as err:
            raise M3IError(f"cannot write the sharded checkpoint {partial}: "
                           f"{err.strerror or err}; {link} still holds the previous one") from None


def _fresh_folder(link: Path, step: int) -> Path:
    """The folder for a save at ``step``, once leftovers of killed or older saves are gone:
    ``<link>.step-<step>``, or with a counter when the live checkpoint already has that name."""
    remove_stale(link)
    base = link.with_name(f"{link.name}{STEP_INFIX}{step}")
    candidates = itertools.chain([base], (base.with_name(f"{base.name}-{k}")
                                          for k in itertools.count(2)))
    return next(c for c in candidates if not c.exists())


def _commit(partial: Path, folder: Path, link: Path) -> None:
    """Rename the written folder to its final name, move the link to it, drop the old one."""
    os.rename(partial, folder)
    staged_link = link.with_name(link.name + PARTIAL_SUFFIX)
    staged_link.unlink(missing_ok=True)
    staged_link.symlink_to(folder.name, target_is_directory=True)
    os.replace(staged_link, link)
    remove_stale(link)


def remove_stale(link: Path) -> None:
    """Remove every ``<link>.step-*`` folder but the one ``link`` points to (a consolidated
    file saved over the link leaves none)."""
    live = link.resolve() if link.is_symlink() else None
    for folder in link.parent.glob(f"{link.name}{STEP_INFIX}*"):
        if folder.resolve() != live:
            shutil.rmtree(folder, ignore_errors=True)
