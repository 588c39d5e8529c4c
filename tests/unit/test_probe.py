"""The linear probe: standardised by its training features, and trained on features sharded
over 2 processes (gloo, uneven shares, batches some rank holds no row of) it is the probe one
process trains on all of them."""

from __future__ import annotations

import torch
from helpers import clustered_features

from m3i_lightning.evaluation.probe import fit_linear_probe

CLASSES, DIM, ROWS = 4, 6, 100
# rank 0 holds the first 13 rows: most batches of 8 drawn from the 100 have none of them
OPTIONS = dict(epochs=3, batch_size=8, lr=0.1, weight_decay=1e-4)


def clustered() -> tuple[torch.Tensor, torch.Tensor]:
    return clustered_features(CLASSES, DIM, ROWS)


def test_the_probe_standardises_by_the_training_features_and_separates_clusters():
    features, labels = clustered()
    probe = fit_linear_probe(features, labels, CLASSES, **OPTIONS)
    torch.testing.assert_close(probe.mean, features.mean(0))
    torch.testing.assert_close(probe.std, features.std(0, unbiased=False))
    accuracy = (probe(features).argmax(-1) == labels).float().mean().item()
    assert accuracy > 0.9


