"""The linear probe trained on features sharded over 2 processes (gloo, uneven shares, batches
some rank holds no row of) is the probe one process trains on all of them."""

from __future__ import annotations

import os

import torch
import torch.multiprocessing as mp
from helpers import clustered_features, gloo_group

from m3i_lightning.evaluation.probe import fit_linear_probe

CLASSES, DIM, ROWS = 4, 6, 100
# rank 0 holds the first 13 rows: most batches of 8 drawn from the 100 have none of them
CUT = 13
OPTIONS = dict(epochs=3, batch_size=8, lr=0.1, weight_decay=1e-4)


def probe_state(probe) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in probe.state_dict().items()}


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    with gloo_group(rank, world, init_file):
        features, labels = clustered_features(CLASSES, DIM, ROWS)
        mine = slice(0, CUT) if rank == 0 else slice(CUT, None)
        sharded = fit_linear_probe(features[mine], labels[mine], CLASSES, **OPTIONS,
                                   sharded=True)
        # every rank holding the whole set (the online monitor's gathered features)
        whole = fit_linear_probe(features, labels, CLASSES, **OPTIONS)
        torch.save({"sharded": probe_state(sharded), "whole": probe_state(whole)},
                   os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_processes_on_uneven_shares_train_the_one_process_probe(tmp_path):
    features, labels = clustered_features(CLASSES, DIM, ROWS)
    expected = probe_state(fit_linear_probe(features, labels, CLASSES, **OPTIONS))
    mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for name, value in expected.items():
        for got in ranks:
            torch.testing.assert_close(got["sharded"][name], value, rtol=1e-5, atol=1e-6,
                                       msg=name)
            assert torch.equal(got["whole"][name], value), name
        assert torch.equal(ranks[0]["sharded"][name], ranks[1]["sharded"][name]), name
