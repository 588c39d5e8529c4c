"""Every rank's equal share of an evaluation split, and the gather that puts the shares back.

Rank r of W reads positions [r·m, (r+1)·m) of the split, m = ⌈n / W⌉; positions past the end
repeat the last sample and carry ``valid = False``. Equal shares keep the ranks in step (an
FSDP forward is a collective, so no rank may run out of batches early), and gathering the
shares in rank order gives back the split's own order once the padding is dropped: results
are those of one process reading the whole split. Unlike a ``DistributedSampler``, no sample
is counted twice.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset

from m3i_lightning.core.distributed import world

VALID_KEY = "valid"


class EqualShare(Dataset):
    """Rank ``rank``'s ⌈n / world_size⌉ samples of ``dataset`` (dict samples), each marked
    ``valid`` unless it is padding or the dataset marked it not valid (an unreadable image);
    padding carries no ``skipped`` reasons, so each is counted once. An empty split gives
    every rank an empty share: whoever reads it says which split is missing."""

    def __init__(self, dataset: Dataset, rank: int, world_size: int) -> None:
        self.dataset, self.total = dataset, len(dataset)
        self.size = math.ceil(self.total / world_size)
        self.start = rank * self.size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        position = self.start + i
        sample = self.dataset[min(position, self.total - 1)]
        if position >= self.total:
            sample.pop("skipped", None)
        return {**sample, VALID_KEY: position < self.total and sample.get(VALID_KEY, True)}


def share_loader(loader: DataLoader, rank: int, world_size: int) -> DataLoader:
    """``loader`` over this rank's :class:`EqualShare` of its (map-style) dataset, with the
    same batching, workers and collation. A stream is returned as it is: it reads its own part
    (its data module shards it by rank), and its samples carry no ``valid`` flag."""
    if isinstance(loader.dataset, IterableDataset):
        return loader
    return DataLoader(EqualShare(loader.dataset, rank, world_size),
                      batch_size=loader.batch_size, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                      persistent_workers=loader.persistent_workers)


def split_loader(datamodule, split: str, rank: int | None = None,
                 world_size: int | None = None) -> DataLoader:
    """This rank's share of the data module's evaluation ``split`` (whole images and labels);
    rank and world size default to those of the process group."""
    if rank is None or world_size is None:
        rank, world_size = world()
    method = datamodule.eval_dataloader
    if "rank" in inspect.signature(method).parameters:
        loader = method(split, rank=rank, world_size=world_size)
    else:
        loader = method(split)
    return share_loader(loader, rank, world_size)


def valid_rows(batch: dict) -> Tensor:
    """Which rows of an evaluation batch are real samples (all, for a stream's batch)."""
    if VALID_KEY in batch:
        return batch[VALID_KEY].bool()
    return torch.ones(len(batch["label"]), dtype=torch.bool)


def row_counts(x: Tensor) -> list[int]:
    """The number of rows of ``x`` on every rank, in rank order (a collective)."""
    _, size = world()
    if size == 1:
        return [x.shape[0]]
    count = torch.tensor([x.shape[0]], device=x.device)
    counts = [torch.zeros_like(count) for _ in range(size)]
    dist.all_gather(counts, count)
    return [int(c.item()) for c in counts]


def gather_rows(x: Tensor) -> Tensor:
    """Concatenate ``x`` [n_r, ...] of every rank in rank order; the row counts may differ
    (a stream's shares), so each rank's rows travel padded to the largest count."""
    _, size = world()
    if size == 1:
        return x
    counts = row_counts(x)
    padded = x.new_zeros((max(counts), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:count] for p, count in zip(parts, counts, strict=True)])
