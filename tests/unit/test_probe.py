"""The linear probe: standardised by its training features, and trained on features sharded
over 2 processes (gloo, uneven shares, batches some rank holds no row of) it is the probe one
process trains on all of them."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from m3i_lightning.evaluation.probe import fit_linear_probe

CLASSES, DIM, ROWS = 4, 6, 100
# rank 0 holds the first 13 rows: most batches of 8 drawn from the 100 have none of them
CUT = 13
OPTIONS = dict(epochs=3, batch_size=8, lr=0.1, weight_decay=1e-4)


def clustered(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(CLASSES, DIM, generator=g)
    labels = torch.randint(CLASSES, (ROWS,), generator=g)
    return centres[labels] + torch.randn(ROWS, DIM, generator=g) + 5, labels


def probe_state(probe) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in probe.state_dict().items()}


def test_the_probe_standardises_by_the_training_features_and_separates_clusters():
    features, labels = clustered()
    probe = fit_linear_probe(features, labels, CLASSES, **OPTIONS)
    torch.testing.assert_close(probe.mean, features.mean(0))
    torch.testing.assert_close(probe.std, features.std(0, unbiased=False))
    accuracy = (probe(features).argmax(-1) == labels).float().mean().item()
    assert accuracy > 0.9


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        features, labels = clustered()
        mine = slice(0, CUT) if rank == 0 else slice(CUT, None)
        sharded = fit_linear_probe(features[mine], labels[mine], CLASSES, **OPTIONS,
                                   sharded=True)
        # every rank holding the whole set (the online monitor's gathered features)
        whole = fit_linear_probe(features, labels, CLASSES, **OPTIONS)
        torch.save({"sharded": probe_state(sharded), "whole": probe_state(whole)},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_on_uneven_shares_train_the_one_process_probe(tmp_path):
    features, labels = clustered()
    expected = probe_state(fit_linear_probe(features, labels, CLASSES, **OPTIONS))
    mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for name, value in expected.items():
        for got in ranks:
            torch.testing.assert_close(got["sharded"][name], value, rtol=1e-5, atol=1e-6,
                                       msg=name)
            assert torch.equal(got["whole"][name], value), name
        assert torch.equal(ranks[0]["sharded"][name], ranks[1]["sharded"][name]), name
