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
DCP's index (``.metadata``) is a plain pickle, which ``pickle.load`` would let run any code:
:func:`read_index` reads it through an unpickler that builds DCP's own metadata classes and
nothing else, and :func:`check_shards` finds a missing or truncated shard file before DCP
would fail on it deep inside its loader.
"""

from __future__ import annotations

import inspect
import itertools
import os
import pickle
import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
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


class UnusableShards(ValueError):
    """A folder that looks like a sharded checkpoint but cannot be loaded; the message says
    why, to follow the path that was given."""


def _index_classes() -> dict[tuple[str, str], type]:
    """What DCP pickles into its index: the classes of its metadata module, the storage
    record of its file system writer, and the torch types they hold (sizes, dtypes, layout,
    and the path the checkpoint was saved to)."""
    allowed = {(dcp_metadata.__name__, name): obj for name, obj in vars(dcp_metadata).items()
               if inspect.isclass(obj) and obj.__module__ == dcp_metadata.__name__}
    allowed[(_StorageInfo.__module__, _StorageInfo.__name__)] = _StorageInfo
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    for module in ("pathlib", type(Path()).__module__):
        allowed[(module, type(Path()).__name__)] = type(Path())
    return allowed


class _IndexUnpickler(pickle.Unpickler):
    """Builds only the objects of :func:`_index_classes` and torch dtypes: a crafted index
    naming any other callable (``os.system``, ...) is refused before anything is called."""

    allowed = _index_classes()

    def find_class(self, module: str, name: str):
        found = self.allowed.get((module, name))
        if found is None and module == "torch" and isinstance(getattr(torch, name, None),
                                                              torch.dtype):
            found = getattr(torch, name)
        if found is None:
            raise UnusableShards(f"is not loaded: its shard index ({INDEX_FILE}) would build "
                                 f"{module}.{name}, which is none of DCP's metadata classes "
                                 "(a crafted or foreign folder)")
        return found


def read_index(folder: Path) -> dcp_metadata.Metadata:
    """DCP's index of ``folder``, read by :class:`_IndexUnpickler`."""
    try:
        with open(Path(folder) / INDEX_FILE, "rb") as f:
            index = _IndexUnpickler(f).load()
    except UnusableShards:
        raise
    except Exception as err:  # a damaged pickle fails in many ways, all of them "unreadable"
        raise UnusableShards(f"cannot be read as a sharded checkpoint: its shard index "
                             f"({INDEX_FILE}) is damaged ({type(err).__name__})") from None
    if not isinstance(index, dcp_metadata.Metadata):
        raise UnusableShards(f"cannot be read as a sharded checkpoint: its {INDEX_FILE} holds "
                             f"a {type(index).__name__}, not DCP's index")
    return index


def check_shards(folder: Path, index: dcp_metadata.Metadata) -> None:
    """Every shard file the index names is inside ``folder`` and long enough for the bytes
    the index reads from it."""
    folder = Path(folder).resolve()
    needed: dict[str, int] = {}
    for info in index.storage_data.values():
        name = str(info.relative_path)
        needed[name] = max(needed.get(name, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        shard = (folder / name).resolve()
        if shard.parent != folder:
            raise UnusableShards(f"is not loaded: its shard index names {name}, outside the "
                                 "folder (a crafted or foreign folder)")
        if not shard.is_file():
            raise UnusableShards(f"cannot be read as a sharded checkpoint: its shard file {name} "
                                 "is missing (copy the whole folder, every rank's shards)")
        if shard.stat().st_size < size:
            raise UnusableShards(f"cannot be read as a sharded checkpoint: its shard file {name} "
                                 f"is truncated ({shard.stat().st_size} of {size} bytes)")


def weight_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """The shape of every weight of the model in ``folder`` (a checked index; no shard is
    read): what a resumed run's model must match."""
    index = read_index(folder)
    check_shards(folder, index)
    prefix = "state_dict."
    return {key[len(prefix):]: tuple(entry.size)
            for key, entry in index.state_dict_metadata.items()
            if key.startswith(prefix) and isinstance(entry, dcp_metadata.TensorStorageMetadata)}


class _CheckedReader(dcp.FileSystemReader):
    """DCP's file reader handed the index :func:`read_index` read, so DCP never unpickles
    ``.metadata`` itself."""

    def __init__(self, folder: Path, index: dcp_metadata.Metadata) -> None:
        super().__init__(folder)
        self.index = index

    def read_metadata(self, *args, **kwargs) -> dcp_metadata.Metadata:
        if self.index.storage_meta is None:
            self.index.storage_meta = dcp_metadata.StorageMeta()
        self.index.storage_meta.load_id = self.load_id
        return self.index


def damaged(err: CheckpointException) -> UnusableShards:
    """DCP's failure to read shards that passed :func:`check_shards` (bytes damaged in place),
    as the one line of its first rank's first failure."""
    failure = next(iter(err.failures.values()))[0]
    reason = str(failure).split(". ")[0].splitlines()[0] if str(failure) else ""
    return UnusableShards(f"cannot be read as a sharded checkpoint: a shard is damaged "
                          f"({type(failure).__name__}: {reason})")


def read_sharded(folder: Path, read_metadata: Callable[[Path], dict]) -> dict[str, Any]:
    """The checkpoint in ``folder`` as one dict laid out like a consolidated file: full
    tensors assembled from every rank's shards, on one process without a process group.
    Optimizer states stay keyed by parameter name: a torch optimizer loads them by position in
    its groups, Lightning's FSDP2 loader by name (an index would need the model's parameter
    order, frozen ones included). ``read_metadata`` reads ``meta.pt`` (the caller's safe
    loader). Raises :class:`UnusableShards`."""
    index = read_index(folder)
    check_shards(folder, index)
    checkpoint = read_metadata(Path(folder) / METADATA_FILE)
    shards: dict[str, Any] = {}
    # torch's own DCP-to-file converter (format_utils.dcp_to_torch_save), minus the file
    try:
        _load_state_dict(shards, _CheckedReader(folder, index),
                         planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    except CheckpointException as err:  # a BaseException: it wraps each rank's failure
        raise damaged(err) from None
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
