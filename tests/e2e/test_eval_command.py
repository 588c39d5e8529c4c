"""The eval command: on a trained clip run zero-shot above chance, caption-style prompts, the
exported folder evaluated as the checkpoint, the trained data unless told otherwise; the
segmentation and fine-tuning protocols into one table."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from data_files import labelled_folder
from helpers import REPO, TINY_RUN, compose_config, run, tiny_backbone

from m3i_lightning.commands.eval import RESULTS_FILE, evaluate_command
from m3i_lightning.config.artifacts import export_model
from m3i_lightning.config.factory import build_datamodule
from m3i_lightning.config.restore import TrainedModel, load_checkpoint
from m3i_lightning.core.errors import ConfigError
from m3i_lightning.evaluation.knn import extract_features
from m3i_lightning.evaluation.zeroshot import class_embeddings, class_prompts, zero_shot_predict


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
                              "samples": {"train": 12, "val": 6, "train_skipped": 0,
                                          "val_skipped": 0}}

    chosen = compose_config(f"checkpoint={checkpoint}", "data=embedded", name="eval")
    evaluate_command(chosen, tmp_path / "b", overrides=["data=embedded"])
    report = json.loads((tmp_path / "b" / RESULTS_FILE).read_text())
    assert report["data"] == {"config": "data=embedded", "samples": {
        "train": 1438, "val": 359, "train_skipped": 0, "val_skipped": 0}}


def test_caption_style_prompts_score_at_least_as_well_as_bare_names(clip_checkpoint):
    """A clip model trained on templated captions (the digits'): prompts in the style of its
    captions classify the held-out digits at least as well as the bare class names (up to 2
    points, 7 of 359 images, of run-to-run noise across CPUs), and well above chance (0.1)."""

    model = load_checkpoint(clip_checkpoint)
    dm = build_datamodule(model.config.data, model.tokenizer)
    dm.setup("validate")
    features, labels = extract_features(model.backbone, dm.eval_dataloader("val"))

    def accuracy(prompts) -> float:
        classes = class_embeddings(model.image_text, prompts)
        predicted = zero_shot_predict(model.image_text, features, classes)
        return (predicted == labels).float().mean().item()

    templated, bare = accuracy(class_prompts(dm)), accuracy(class_prompts(dm, ["{}"]))
    assert templated >= bare - 0.02 and templated > 0.3, (templated, bare)


def test_eval_command_runs_segmentation_and_finetune_protocols_into_one_table(tmp_path, capsys):
    torch.manual_seed(0)
    folder = export_model(TrainedModel(tiny_backbone()), tmp_path / "export")
    cfg = compose_config(f"backbone_dir={folder}", "protocols=[segmentation,finetune]",
                         "segmentation.data.train_scenes=16", "segmentation.data.val_scenes=8",
                         "segmentation.epochs=2", "finetune.epochs=1", "finetune.eval_every=1",
                         "finetune.warmup_epochs=0", name="eval")
    results = evaluate_command(cfg, tmp_path / "eval")
    assert set(results) == {"finetune_top1", "segmentation_miou"}
    assert 0 < results["segmentation_miou"] <= 1 and 0 <= results["finetune_top1"] <= 1
    table = capsys.readouterr().out
    assert "segmentation mIoU (2 epochs)" in table and "fine-tuning top-1" in table
    saved = json.loads((tmp_path / "eval" / RESULTS_FILE).read_text())
    assert saved["results"] == results and saved["segmentation"]["epochs"] == 2
    assert saved["data"]["samples"] == {"segmentation_train": 16, "segmentation_val": 8}
    finetuned = json.loads((tmp_path / "eval" / "finetune" / "finetune.json").read_text())
    assert finetuned["results"]["top1"] == results["finetune_top1"]

    script = REPO / "scripts" / "summarize_runs.py"
    spec = importlib.util.spec_from_file_location("summarize_runs", script)
    summarize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summarize)
    shown = summarize.final_metrics(tmp_path / "eval")
    assert shown["segmentation_miou"] == f"{100 * results['segmentation_miou']:.2f}%"
    assert shown["finetune_top1"] == f"{100 * results['finetune_top1']:.2f}%"
