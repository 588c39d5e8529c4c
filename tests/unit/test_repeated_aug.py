"""Repeated augmentation (DeiT's RASampler): each image several times in a row, its copies
dealt to different ranks, each copy another view; the epoch length and the resumable data
position are those of the project's own sampling."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from helpers import digits_module
from torch.utils.data import IterableDataset

from m3i_lightning.core.errors import ConfigError
from m3i_lightning.data import sampling
from m3i_lightning.data.dataset import make_loader
from m3i_lightning.data.sampling import ResumableSampler, sample_seed

REPEATS = 3


def rasampler_share(n: int, seed: int, epoch: int, rank: int, world_size: int) -> list[int]:
    """DeiT's RASampler written out: a permutation seeded by the epoch (here seed + epoch),
    each index three times in a row, padded by wrapping, every world_size-th entry from
    ``rank`` on, cut to the epoch length (the dataset rounded down to 256, per rank)."""
    g = torch.Generator().manual_seed(seed + epoch)
    repeated = torch.randperm(n, generator=g).repeat_interleave(REPEATS).tolist()
    total = math.ceil(n * REPEATS / world_size) * world_size
    selected = n // 256 * 256 // world_size if n >= 256 else math.ceil(n / world_size)
    return [repeated[i % len(repeated)] for i in range(rank, total, world_size)][:selected]


def shares(dataset, world_size: int, monkeypatch, seed: int = 5, epoch: int = 2):
    keys = []
    for rank in range(world_size):
        monkeypatch.setattr(sampling, "world", lambda rank=rank: (rank, world_size))
        sampler = ResumableSampler(dataset, seed, repeats=REPEATS)
        sampler.set_epoch(epoch)
        keys.append(list(sampler))
        assert len(sampler) == len(keys[-1])
    return keys


@pytest.mark.parametrize("world_size", [1, 2])
def test_the_shards_are_rasamplers_and_every_copy_has_its_own_seed(world_size, monkeypatch):
    dataset = range(700)
    keys = shares(dataset, world_size, monkeypatch)
    for rank, share in enumerate(keys):
        assert [i for i, _ in share] == rasampler_share(700, 5, 2, rank, world_size)
    every = [key for share in keys for key in share]
    counts = Counter(i for i, _ in every)
    partial = [n for n in counts.values() if n != REPEATS]
    assert len(partial) <= 1  # the epoch ends inside the copies of its last image at most
    # the ranks together hold copies 0, 1, ... of each image, each copy with its own seed
    assert sorted(s for _, s in every) == sorted(
        sample_seed(5, 2, i, copy) for i, n in counts.items() for copy in range(n))
    assert len({s for _, s in every}) == len(every)


def test_two_ranks_get_different_copies_of_an_image(monkeypatch):
    """RASampler deals consecutive copies to consecutive ranks: with two ranks, each image
    of the epoch is on both."""
    zero, one = ([i for i, _ in share] for share in shares(range(700), 2, monkeypatch))
    complete = [i for i, c in Counter(zero + one).items() if c == REPEATS]
    assert complete and all(i in zero and i in one for i in complete)


def test_each_copy_is_another_view_and_the_position_resumes_exactly(tokenizer):
    data = digits_module(tokenizer, batch_size=64, seed=7, repeated_aug=REPEATS)
    loader = data.train_dataloader()
    keys = list(loader.sampler)
    assert len(keys) == len(data.source("train")) // 256 * 256
    index, _ = keys[0]
    copies = [data.train_dataloader().dataset[key]["view1"] for key in keys if key[0] == index]
    assert len(copies) == REPEATS
    assert not any(torch.equal(a, b) for n, a in enumerate(copies) for b in copies[n + 1:])

    epoch = [batch["view1"] for batch in loader]
    assert len(epoch) == len(keys) // 64
    it = iter(loader)
    for _ in range(3):
        next(it)
    resumed = digits_module(tokenizer, batch_size=64, seed=7,
                            repeated_aug=REPEATS).train_dataloader()
    resumed.load_state_dict(loader.state_dict())
    rest = [batch["view1"] for batch in resumed]
    assert len(rest) == len(epoch) - 3
    assert all(torch.equal(a, b) for a, b in zip(rest, epoch[3:], strict=True))


class Stream(IterableDataset):
    def __iter__(self):
        yield from ()


def test_a_stream_or_a_count_below_one_is_refused(tokenizer):
    with pytest.raises(ConfigError, match="data.repeated_aug=3 .* streamed data"):
        make_loader(Stream(), 8, 0, shuffle=True, repeated_aug=3)
    with pytest.raises(ConfigError, match="data.repeated_aug"):
        digits_module(tokenizer, repeated_aug=0)
