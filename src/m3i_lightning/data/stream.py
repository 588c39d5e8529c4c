"""Streamed records (tar shards, streaming Hugging Face datasets) → the samples of ViewDataset.

A stream has no index to sample, so three things the map-style path gets from its sampler are
done here, in each DataLoader worker: splitting the data between ranks and workers (the record
source gets a :class:`Reader` saying which part is its own), shuffling (a buffer of raw, not yet
decoded records) and an exact length. Under DDP every rank must run the same number of steps,
or the ranks that finish first wait forever in a collective; a worker therefore yields exactly
its quota, starting its part again when the part runs short and stopping when it runs long.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from torch.utils.data import IterableDataset, get_worker_info

from m3i_lightning.core.errors import M3IError
from m3i_lightning.core.shares import VALID_KEY
from m3i_lightning.data.dataset import ViewDataset
from m3i_lightning.data.images import EncodedImage
from m3i_lightning.data.skips import BadSample, summary, tally
from m3i_lightning.data.views import CropSet


@dataclass(frozen=True)
class Reader:
    """One DataLoader worker of one rank, in one pass over its part of the data.

    ``index`` / ``count`` number the readers of all ranks, so a source that splits its shards
    by ``index::count`` gives every reader a disjoint part. ``order_rng`` is the same for all
    readers of an epoch (a shard permutation every rank agrees on); ``own_rng`` differs.
    """

    rank: int
    world: int
    worker: int
    workers: int
    epoch: int
    repeat: int
    seed: str

    @property
    def index(self) -> int:
        return self.rank * self.workers + self.worker

    @property
    def count(self) -> int:
        return self.world * self.workers

    def order_rng(self) -> random.Random:
        return random.Random(f"{self.seed}/epoch {self.epoch}/repeat {self.repeat}")

    def own_rng(self) -> random.Random:
        return random.Random(f"{self.seed}/epoch {self.epoch}/repeat {self.repeat}/"
                             f"reader {self.index} of {self.count}")


def held_out(key: str | bytes, fraction: float) -> bool:
    """Whether the sample with this key (a name, or the image bytes when there is none) is in
    the held-out split: a stable hash, so every reader and every epoch agree without an index."""
    data = key if isinstance(key, bytes) else key.encode()
    return fraction > 0 and zlib.crc32(data) < fraction * 2**32


class ViewStream(IterableDataset):
    """Decodes and crops the records ``records(reader)`` yields (or :class:`BadSample`
    instances, for members already known to be broken), through :meth:`ViewDataset.build`.

    ``batches``: batches this rank yields per epoch, spread over its workers; ``None`` reads
    each worker's part once (evaluation: labelled samples only), at most ``limit`` samples in
    all. ``epoch`` is the epoch of the first iteration: persistent workers count further epochs
    themselves.
    """

    def __init__(self, records: Callable[[Reader], Iterable], view: CropSet, fields: set[str],
                 *, batch_size: int, batches: int | None, train: bool = True, rank: int = 0,
                 world: int = 1, epoch: int = 0, seed: str = "0", shuffle_buffer: int = 0,
                 limit: int | None = None) -> None:
        self.records, self.samples = records, ViewDataset((), view, fields, train)
        self.batch_size, self.batches, self.limit = batch_size, batches, limit
        self.rank, self.world, self.epoch, self.seed = rank, world, epoch, seed
        self.shuffle_buffer = shuffle_buffer if train else 0
        self.iterations = 0

    def __len__(self) -> int:
        if self.batches is None:
            raise TypeError("an evaluation stream has no length")
        return self.batches * self.batch_size

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        epoch = self.epoch + self.iterations
        self.iterations += 1
        if self.batches is None:
            quota = None if self.limit is None else -(-self.limit // workers)
        else:
            quota = (self.batches // workers + (worker < self.batches % workers)) * self.batch_size
        if quota == 0:
            return
        yielded, pending, repeat = 0, [], 0
        while True:
            reader = Reader(self.rank, self.world, worker, workers, epoch, repeat, self.seed)
            before = yielded
            for item in shuffled(self.records(reader), self.shuffle_buffer, reader.own_rng()):
                sample = self._sample(item, pending)
                if sample is None:
                    continue
                if pending:
                    sample["skipped"], pending = pending, []
                yield sample
                yielded += 1
                if yielded == quota:
                    return
            if self.batches is None:
                if pending:  # evaluation counts every skipped sample, the last ones too
                    yield self.samples.unreadable(pending)
                return
            if yielded == before:
                where = (f"reader {reader.index} of {reader.count} (rank {self.rank}, worker "
                         f"{worker})")
                if pending:  # name what broke (a corrupt shard), not the worker count
                    raise M3IError(f"{where} found no usable sample in its part of the data: "
                                   f"{summary(*tally(pending))}")
                raise M3IError(f"{where} found no sample in its part of the data; use fewer "
                               "DataLoader workers or more shards")
            repeat += 1

    def _sample(self, item, pending: list[str]) -> dict | None:
        if isinstance(item, BadSample):
            pending.append(str(item))
            return None
        data, label, caption, name = item
        if label is None and not self.samples.train:
            return None  # evaluation (kNN, probes) needs the label
        try:
            sample = self.samples.build(EncodedImage(data, name), label, caption)
        except BadSample as bad:
            pending.append(str(bad))
            return None
        return sample if self.samples.train else {**sample, VALID_KEY: True}


def shuffled(items: Iterable, size: int, rng: random.Random) -> Iterator:
    """Approximate shuffle with a buffer of ``size`` items (raw records: cheap to hold).
    :class:`BadSample` markers pass straight through."""
    buffer: list = []
    for item in items:
        if isinstance(item, BadSample) or size <= 1:
            yield item
        elif len(buffer) < size:
            buffer.append(item)
        else:
            slot = rng.randrange(size)
            yield buffer[slot]
            buffer[slot] = item
    rng.shuffle(buffer)
    yield from buffer
