"""Evaluation: the kNN metric against a brute-force reference (one process and 2-process DDP),
the online probes never reaching the backbone, and zero-shot classification of a tiny model
trained with clip."""

from __future__ import annotations

import json
import math
import os

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import compose_config, digits_module, tiny_backbone, tiny_objective

from m3i_lightning.commands.eval import RESULTS_FILE, evaluate_command
from m3i_lightning.config.artifacts import export_model
from m3i_lightning.config.restore import load_checkpoint
from m3i_lightning.core.errors import ConfigError
from m3i_lightning.engine.module import MultiObjective
from m3i_lightning.evaluation.monitors import KNNAccuracy, LinearProbeAccuracy, ProbeMonitor

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


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    memory, memory_labels, queries, query_labels = toy_features()
    # uneven shards, rank-major, so the gathered order is the original order
    memory_cut, query_cut = 17, 9
    mine = slice(0, memory_cut) if rank == 0 else slice(memory_cut, None)
    queries_mine = slice(0, query_cut) if rank == 0 else slice(query_cut, None)
    results = []
    for metric in (KNNAccuracy(NUM_CLASSES, K, TEMPERATURE), LinearProbeAccuracy(NUM_CLASSES)):
        metric.update(memory[mine], memory_labels[mine], memory=True)
        metric.update(queries[queries_mine], query_labels[queries_mine])
        results.append(metric.compute())
    torch.save(torch.stack(results), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_metrics_under_two_process_ddp_equal_the_single_process_result(tmp_path):
    memory, memory_labels, queries, query_labels = toy_features()
    linear = LinearProbeAccuracy(NUM_CLASSES)
    linear.update(memory, memory_labels, memory=True)
    linear.update(queries, query_labels)
    expected = torch.tensor([reference_accuracy(memory, memory_labels, queries, query_labels),
                             linear.compute().item()])
    port = 29500 + os.getpid() % 1000
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"rank{rank}.pt"), expected)


def tiny_model(tokenizer, names=("cls",)) -> MultiObjective:
    torch.manual_seed(0)
    heads = {name: tiny_objective(name, tokenizer) for name in names}
    return MultiObjective(tiny_backbone(), heads, optim={"lr": 1e-3, "warmup_fraction": 0.0})


def fit_two_epochs(tokenizer, callbacks) -> tuple[MultiObjective, dict]:
    L.seed_everything(0)
    model = tiny_model(tokenizer)
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


def test_eval_command_reports_zero_shot_above_chance(clip_checkpoint, tmp_path, capsys):
    cfg = compose_config(f"checkpoint={clip_checkpoint}", name="eval")
    results = evaluate_command(cfg, tmp_path)
    assert set(results) == {"knn_top1", "linear_top1", "zero_shot_top1"}
    assert results["zero_shot_top1"] > 0.25  # chance is 0.10; ~0.6 after these 300 steps
    assert results["knn_top1"] > 0.25 and results["linear_top1"] > 0.25
    table = capsys.readouterr().out
    assert "kNN top-1" in table and "zero-shot top-1" in table
    saved = json.loads((tmp_path / RESULTS_FILE).read_text())
    assert saved["results"] == results and saved["checkpoint"] == str(clip_checkpoint)


def test_eval_of_the_exported_folder_equals_eval_of_the_checkpoint(clip_checkpoint, tmp_path):
    folder = export_model(load_checkpoint(clip_checkpoint), tmp_path / "export")
    from_checkpoint = evaluate_command(
        compose_config(f"checkpoint={clip_checkpoint}", name="eval"), tmp_path)
    from_folder = evaluate_command(compose_config(f"backbone_dir={folder}", name="eval"),
                                   tmp_path)
    assert from_folder == pytest.approx(from_checkpoint)
    with pytest.raises(ConfigError, match="exactly one"):
        evaluate_command(compose_config(name="eval"), tmp_path)


def test_eval_uses_the_trained_data_unless_told_and_names_it(tmp_path):
    """A run on an image folder, evaluated with checkpoint= alone: the folder's data (its
    2 classes, its split sizes), not the embedded digits; data=embedded chooses the digits."""
    from data_files import labelled_folder
    from runs import TINY_RUN, run

    labelled_folder(tmp_path / "images" / "train", 12, classes=2)
    labelled_folder(tmp_path / "images" / "val", 6, classes=2)
    tiny = [a for a in TINY_RUN if not a.startswith("data.source_size")]
    run(*tiny, "objective=[cls]", "data=imagefolder", f"data.path={tmp_path / 'images'}",
        "data.batch_size=4", "trainer.max_steps=1", f"hydra.run.dir={tmp_path / 'run'}")
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"

    stored = compose_config(f"checkpoint={checkpoint}", name="eval")
    evaluate_command(stored, tmp_path / "a", overrides=[f"checkpoint={checkpoint}"])
    report = json.loads((tmp_path / "a" / RESULTS_FILE).read_text())
    assert report["data"] == {"config": f"data=imagefolder path={tmp_path / 'images'}",
                              "samples": {"train": 12, "val": 6}}

    chosen = compose_config(f"checkpoint={checkpoint}", "data=embedded", name="eval")
    evaluate_command(chosen, tmp_path / "b", overrides=["data=embedded"])
    report = json.loads((tmp_path / "b" / RESULTS_FILE).read_text())
    assert report["data"] == {"config": "data=embedded", "samples": {"train": 1438, "val": 359}}
