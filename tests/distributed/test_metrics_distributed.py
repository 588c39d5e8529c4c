"""The kNN and linear-probe metrics of the online monitors under two-process DDP, on uneven
shards, equal the single-process result."""

from __future__ import annotations

import os

import torch
import torch.multiprocessing as mp
from helpers import clustered_features, gloo_group

from m3i_lightning.evaluation.monitors import KNNAccuracy, LinearProbeAccuracy

NUM_CLASSES, K, TEMPERATURE = 4, 5, 0.1
MEMORY, QUERIES = 40, 24
# uneven shards, rank-major, so the gathered order is the original order
MEMORY_CUT, QUERY_CUT = 17, 9


def features():
    """Memory rows then query rows, drawn around the same centres, in 2 dimensions so that
    the classes overlap."""
    x, y = clustered_features(NUM_CLASSES, 2, MEMORY + QUERIES)
    return x[:MEMORY], y[:MEMORY], x[MEMORY:], y[MEMORY:]


def metrics(memory, memory_labels, queries, query_labels) -> torch.Tensor:
    results = []
    for metric in (KNNAccuracy(NUM_CLASSES, K, TEMPERATURE), LinearProbeAccuracy(NUM_CLASSES)):
        metric.update(memory, memory_labels, memory=True)
        metric.update(queries, query_labels)
        results.append(metric.compute())
    return torch.stack(results)


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    with gloo_group(rank, world, init_file):
        memory, memory_labels, queries, query_labels = features()
        mine = slice(0, MEMORY_CUT) if rank == 0 else slice(MEMORY_CUT, None)
        asked = slice(0, QUERY_CUT) if rank == 0 else slice(QUERY_CUT, None)
        torch.save(metrics(memory[mine], memory_labels[mine], queries[asked],
                           query_labels[asked]), os.path.join(out_dir, f"rank{rank}.pt"))


def test_metrics_under_two_process_ddp_equal_the_single_process_result(tmp_path):
    expected = metrics(*features())
    assert (0 < expected).all() and (expected < 1).all()  # neither always right nor wrong
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2)
    for rank in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"rank{rank}.pt"), expected)
