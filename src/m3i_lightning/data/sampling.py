"""Training order and augmentation seeds that survive a restart: exact mid-epoch resume.

Two things make a resumed run see the batches an uninterrupted run would have seen:

- the order is a function of (seed, epoch) and Lightning checkpoints how many batches of the
  epoch were delivered (:class:`ResumableLoader` has ``state_dict`` / ``load_state_dict``,
  which Lightning's fit loop saves and restores), so the resumed pass starts at the next one;
- every random draw of a sample (crops, flips, the replacement of a bad record) comes from a
  seed of its own, a function of (seed, epoch, index) that travels with the index to the
  dataset (:class:`ResumableSampler` yields ``(index, seed)``), so augmentations depend on
  neither the global random stream, nor the worker count, nor how far workers prefetched.

With repeated augmentation (DeiT's, ``repeats`` > 1) the order is timm's
:class:`~timm.data.distributed_sampler.RepeatAugSampler` (DeiT's RASampler): each image of the
shuffle ``repeats`` times in a row, dealt to the ranks in turn, so its copies land on
different ranks; each copy has a seed of its own, so it is another view of the image.
"""

from __future__ import annotations

from itertools import islice

import numpy as np
import torch
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from m3i_lightning.core.distributed import world


def sample_seed(seed: int, epoch: int, index: int, copy: int = 0) -> int:
    """A well-mixed 64-bit seed for one sample of one epoch (``copy``: which of its repeated
    copies; the first has the seed a run without repetition gives it)."""
    return int(np.random.SeedSequence((seed, epoch, index, copy)).generate_state(1, np.uint64)[0])


class ResumableSampler(DistributedSampler):
    """This rank's share of a seeded shuffle, each index paired with its :func:`sample_seed`.

    A ``DistributedSampler`` (equal shares, the tail dropped), so Lightning keeps it under DDP
    / FSDP instead of substituting its own, and calls :meth:`set_epoch`. ``start`` skips the
    first samples of the next pass only: where a resumed epoch picks up. ``repeats`` > 1:
    repeated augmentation, in the order and epoch length of timm's ``RepeatAugSampler``
    (DeiT's RASampler: about as many samples per epoch as without it, so an epoch shows about
    1 / ``repeats`` of the images, each ``repeats`` times).
    """

    def __init__(self, dataset: Dataset, seed: int = 0, shuffle: bool = True,
                 repeats: int = 1) -> None:
        rank, world_size = world()
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle,
                         seed=seed, drop_last=True)
        self.start = 0
        self.repeated = None
        if repeats > 1:
            self.repeated = RepeatAugSampler(dataset, world_size, rank, shuffle, repeats)
            self.num_samples = len(self.repeated)

    def __iter__(self):
        start, self.start = self.start, 0
        for index, copy in islice(self._order(), start, None):
            yield index, sample_seed(self.seed, self.epoch, index, copy)

    def _order(self):
        """(index, copy) of this rank's share of the epoch."""
        if self.repeated is None:
            return ((index, 0) for index in super().__iter__())
        # timm shuffles by the epoch alone: given seed + epoch, as DistributedSampler seeds
        self.repeated.set_epoch(self.seed + self.epoch)
        # its list holds each image's copies in a row and this rank takes every
        # num_replicas-th entry from its rank on: its k-th is copy (rank + k * replicas) % repeats
        repeats = self.repeated.num_repeats
        return ((index, (self.rank + k * self.num_replicas) % repeats)
                for k, index in enumerate(self.repeated))


class ResumableLoader(DataLoader):
    """A DataLoader over a :class:`ResumableSampler` whose position (epoch, batches delivered)
    is saved in Lightning's checkpoints. It has a generator of its own: a DataLoader otherwise
    draws its workers' base seed from the global stream at each epoch start, which would shift
    the masks of a resumed run."""

    def __init__(self, dataset: Dataset, sampler: ResumableSampler, batch_size: int,
                 **kwargs) -> None:
        super().__init__(dataset, batch_size=batch_size, sampler=sampler,
                         generator=torch.Generator(), **kwargs)
        self._position = {"epoch": sampler.epoch, "batches": 0}
        self._resume: dict | None = None

    def __iter__(self):
        resume, self._resume = self._resume, None
        skipped = resume["batches"] if resume and resume["epoch"] == self.sampler.epoch else 0
        self.sampler.start = skipped * self.batch_size
        self._position = {"epoch": self.sampler.epoch, "batches": skipped}
        for batch in super().__iter__():
            self._position["batches"] += 1
            yield batch

    def state_dict(self) -> dict:
        return dict(self._position)

    def load_state_dict(self, state: dict) -> None:
        """Lightning calls it before the resumed epoch's pass starts; the pass skips the
        delivered batches if it is the saved epoch (a checkpoint at an epoch's end resumes
        into the next one, from its start)."""
        self._resume = dict(state)
