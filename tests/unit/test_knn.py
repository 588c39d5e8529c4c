"""The kNN at scale: chunked over queries it equals the dense computation and an independent
nearest-neighbour search, and 2 processes (gloo) extracting their shares and searching a
sharded bank give the 1-process result."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import digits_module, tiny_backbone
from sklearn.neighbors import NearestNeighbors

from m3i_lightning.components.text import ByteTokenizer
from m3i_lightning.core.shares import EqualShare, split_loader
from m3i_lightning.evaluation.knn import extract_features, knn_predict, nearest

K, TEMPERATURE, CLASSES = 10, 0.07, 5


def random_problem(seed: int = 0, bank: int = 300, queries: int = 50, dim: int = 16):
    """Gaussian float64 features: distinct similarities, so neither the neighbours nor the
    votes can tie."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(bank, dim, generator=g, dtype=torch.float64),
            torch.randint(CLASSES, (bank,), generator=g),
            torch.randn(queries, dim, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("chunk_size", [1, 7, 50, 1000])
def test_chunked_knn_equals_the_dense_one_and_an_independent_search(chunk_size):
    bank, labels, queries = random_problem()
    dense_sims, dense_rows = nearest(bank, queries, K)
    sims, rows = nearest(bank, queries, K, chunk_size)
    assert torch.equal(rows, dense_rows)
    torch.testing.assert_close(sims, dense_sims, rtol=0, atol=1e-12)
    search = NearestNeighbors(n_neighbors=K, metric="cosine", algorithm="brute").fit(bank.numpy())
    distances, reference = search.kneighbors(queries.numpy())
    assert torch.equal(rows, torch.from_numpy(reference))
    torch.testing.assert_close(sims, torch.from_numpy(1 - distances), rtol=0, atol=1e-12)
    dense = knn_predict(bank, labels, queries, CLASSES, K, TEMPERATURE)
    chunked = knn_predict(bank, labels, queries, CLASSES, K, TEMPERATURE, chunk_size)
    assert torch.equal(chunked.argmax(-1), dense.argmax(-1))
    torch.testing.assert_close(chunked, dense, rtol=1e-12, atol=0)


def test_equal_shares_cover_the_split_once_in_order():
    data = [{"x": i} for i in range(10)]
    shares = [EqualShare(data, rank, 3) for rank in range(3)]
    assert [len(s) for s in shares] == [4, 4, 4]
    items = [s[i] for s in shares for i in range(len(s))]
    assert [item["x"] for item in items if item["valid"]] == list(range(10))
    assert [item["valid"] for item in items].count(False) == 2


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        torch.manual_seed(0)
        backbone = tiny_backbone()
        dm = digits_module(ByteTokenizer(16), batch_size=32)
        train = extract_features(backbone, split_loader(dm, "train"), gather=True)
        val = extract_features(backbone, split_loader(dm, "val"), gather=True)
        mine = slice(rank * len(train[0]) // world, (rank + 1) * len(train[0]) // world)
        scores = knn_predict(train[0][mine], train[1][mine], val[0], 10, K, TEMPERATURE,
                             chunk_size=64, sharded_bank=True)
        torch.save({"train": train, "val": val, "predicted": scores.argmax(-1)},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_extraction_and_sharded_knn_equal_one_process(tmp_path):
    """Each rank extracts its share of both splits (gathered in order) and holds half of the
    bank; every rank's predictions are the one-process dense kNN's."""
    torch.manual_seed(0)
    backbone = tiny_backbone()
    dm = digits_module(ByteTokenizer(16), batch_size=32)
    train = extract_features(backbone, dm.eval_dataloader("train"))
    val = extract_features(backbone, dm.eval_dataloader("val"))
    expected = knn_predict(*train, val[0], 10, K, TEMPERATURE).argmax(-1)
    mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for split, reference in (("train", train), ("val", val)):
            torch.testing.assert_close(got[split][0], reference[0], rtol=1e-5, atol=1e-6)
            assert torch.equal(got[split][1], reference[1])
        assert torch.equal(got["predicted"], expected)
