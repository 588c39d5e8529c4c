"""kNN over two gloo processes: each rank extracts its share of both splits (gathered in
order) and holds half of the bank, and predicts as one process does."""

from __future__ import annotations

import os

import torch
import torch.multiprocessing as mp
from helpers import digits_module, gloo_group, tiny_backbone

from m3i_lightning.components.text import ByteTokenizer
from m3i_lightning.core.shares import split_loader
from m3i_lightning.evaluation.knn import extract_features, knn_predict

K, TEMPERATURE = 10, 0.07


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    with gloo_group(rank, world, init_file):
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
