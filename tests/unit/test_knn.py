"""The kNN at scale: chunked over queries it equals the dense computation and an independent
nearest-neighbour search, and 2 processes (gloo) extracting their shares and searching a
sharded bank give the 1-process result."""

from __future__ import annotations

import pytest
import torch
from sklearn.neighbors import NearestNeighbors

from m3i_lightning.core.shares import EqualShare
from m3i_lightning.evaluation.knn import knn_predict, nearest

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


