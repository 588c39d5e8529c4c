"""Webdataset shards over a gloo group of two processes: the ranks read disjoint samples and
together all of them, reshuffled each epoch."""

from __future__ import annotations

import json
from pathlib import Path

import torch.multiprocessing as mp
from data_files import SHARD_PATTERN
from helpers import gloo_group

from m3i_lightning.data import WebDatasetData


def _labels_seen(rank: int, world: int, urls: str, init_file: str, out: str) -> None:
    """The labels (unique per sample) of every batch the loader gives this rank, per epoch,
    written to ``out/<rank>.json``: two DataLoader workers, two epochs."""
    with gloo_group(rank, world, init_file):
        dm = WebDatasetData(urls, img_size=8, batch_size=4, num_workers=2, val_fraction=0.0,
                            shuffle_buffer=3, fields={"view1", "label"})
        loader = dm.train_dataloader()
        seen = [[label for batch in loader for label in batch["label"].tolist()]
                for _ in range(2)]
        Path(out, f"{rank}.json").write_text(json.dumps({"epochs": seen, "len": len(loader)}))


def test_two_ranks_read_disjoint_samples_and_together_all(shards, tmp_path):
    """2 processes in a gloo group, 2 DataLoader workers each: 4 readers of 8 shards, two
    epochs."""
    # fork: the ranks start with everything imported; gloo and CPU tensors are fork-safe
    mp.start_processes(_labels_seen, nprocs=2, start_method="fork",
                       args=(2, str(shards / SHARD_PATTERN), str(tmp_path / "rendezvous"),
                             str(tmp_path)))
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    assert [r["len"] for r in ranks] == [4, 4]  # equal steps on both ranks
    for epoch in range(2):
        first, second = (r["epochs"][epoch] for r in ranks)
        assert len(first) == len(second) == 16
        assert not set(first) & set(second)
        assert sorted(first + second) == list(range(32))
    assert ranks[0]["epochs"][0] != ranks[0]["epochs"][1]  # reshuffled each epoch
