"""The measuring tools of the benchmark on known workloads: syncs, peak memory, call counts,
the order of timing rounds and the per-round ratio."""

from __future__ import annotations

import pytest
import torch
from measure import (
    PeakMemory,
    SyncCounter,
    count_calls,
    median_ratio,
    time_rounds,
)
from torch import nn

CPU = torch.device("cpu")


def test_sync_counter_counts_each_value_read_and_data_dependent_shape():
    x = torch.randn(6, generator=torch.Generator().manual_seed(0))
    with SyncCounter() as counter:
        y = x * 2 + 1
        for i in range(4):
            y[i].item()
    assert counter.count == 4
    with SyncCounter() as counter:
        x[x > 0]  # boolean index: the output's size depends on the values
        x.nonzero()
        bool(x.any())
        torch.equal(x, y)
    assert counter.count == 4


def test_sync_counter_ignores_work_that_stays_on_the_device():
    x = torch.randn(8, 4)
    with SyncCounter() as counter:
        y = (x @ x.T).softmax(-1).mean(0)
        x.index_select(0, torch.tensor([3, 1]))
        x.repeat_interleave(2, dim=0, output_size=16)
        torch.where(x > 0, x, y[None, :4])
    assert counter.count == 0


def test_peak_memory_sees_a_known_allocation():
    with PeakMemory(CPU) as memory:
        pass
    if memory.rise is None:
        pytest.skip("no resident-set high-water mark here (needs Linux /proc/self/status "
                    "and /proc/self/clear_refs)")
    with PeakMemory(CPU) as memory:
        block = torch.ones(64, 2**20, dtype=torch.uint8)  # 64 MiB, every page touched
        del block
    # freed before the end, yet seen: the high-water mark keeps the peak
    assert memory.rise >= 60 * 2**20


def test_count_calls_counts_forwards_inside_the_block_only():
    first, second = nn.Linear(3, 3), nn.Linear(3, 3)
    x = torch.randn(2, 3)
    first(x)
    with count_calls({"first": first, "second": second}) as calls:
        first(second(first(x)))
        first(x)
    assert calls == {"first": 3, "second": 1}
    first(x)
    assert calls["first"] == 3  # hooks removed on leaving
    assert not first._forward_pre_hooks and not second._forward_pre_hooks


def test_time_rounds_take_turns_in_the_given_order():
    order = []
    steps = {name: (lambda name=name: order.append(name)) for name in ("b", "a", "c")}
    times = time_rounds(steps, warmup=1, repeats=2, device=CPU)
    assert order == ["b", "a", "c"] * 3  # one untimed round, then two timed ones
    assert list(times) == ["b", "a", "c"]
    assert all(len(t) == 2 and all(s >= 0 for s in t) for t in times.values())


def test_median_ratio_is_the_median_of_per_round_ratios():
    # a burst of load in round 2 doubles both sides: per round the ratio stays 0.5
    assert median_ratio([1.0, 2.0, 1.0], [2.0, 4.0, 2.0]) == 0.5
    assert median_ratio([1.0, 3.0, 2.0], [1.0, 1.0, 1.0]) == 2.0
    with pytest.raises(ValueError):
        median_ratio([1.0], [1.0, 2.0])
