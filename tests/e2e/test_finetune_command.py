"""The fine-tuning command: a short run beats chance and writes its results; a checkpoint of
another architecture is one error line."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from helpers import CONF_DIR, TINY_FINETUNE, TINY_VIT, run, tiny_backbone
from omegaconf import OmegaConf


def test_short_finetune_beats_chance_and_writes_its_results(tmp_path):
    """From random init, 4 epochs (176 steps) on the digits with label smoothing, drop path,
    layer decay and random crops (mixup, flips and random erasing off: a tiny ViT from scratch
    needs far longer with them): the loss falls, held-out top-1 is far above chance (10%; 20%
    is 6 standard errors above it on 359 images), and the run folder holds finetune.json,
    last.ckpt (the final weights) and best.ckpt (the better of the validation after epoch 3
    and the final one)."""
    out = tmp_path / "run"
    run(*TINY_FINETUNE, "random_init=true", "finetune.epochs=4", "finetune.eval_every=3",
        "finetune.warmup_epochs=0.5", "finetune.lr=5e-3", "finetune.reprob=0",
        "finetune.hflip=0",
        "trainer.log_every_n_steps=1", f"hydra.run.dir={out}", module="m3i_lightning.finetune")
    summary = json.loads((out / "finetune.json").read_text())
    results = summary["results"]
    assert results["top1"] > 0.2 and results["top5"] >= results["top1"]
    assert summary["source"] == "random_init" and summary["steps"] == 4 * (1437 // 32)
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    during = [float(r["val/top1"]) for r in rows if r.get("val/top1")]
    assert len(during) == 2  # after epoch 3 (eval_every), and the final validation
    assert results["best_top1"] == pytest.approx(max(during))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert sum(losses[-20:]) < 0.9 * sum(losses[:20])
    best, last = (torch.load(out / "checkpoints" / f"{name}.ckpt", weights_only=True)
                  for name in ("best", "last"))
    assert last["global_step"] == summary["steps"]
    assert best["global_step"] == (summary["steps"] if during[1] > during[0] else 3 * 44)


def test_a_checkpoint_of_another_architecture_is_one_error_line_naming_both(tmp_path):
    """A pre-training checkpoint of depth 1 fine-tuned as backbone.depth=2."""
    torch.manual_seed(0)
    source = tiny_backbone(depth=1)
    config = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml"))
    config["backbone"] = {**TINY_VIT, "depth": 1}
    config["objective"] = {"cls": {}}
    state = {f"backbone.{k}": v for k, v in source.state_dict().items()}
    torch.save({"m3i_config": config, "state_dict": state}, tmp_path / "depth1.ckpt")
    done = run(*TINY_FINETUNE, f"checkpoint={tmp_path / 'depth1.ckpt'}",
               f"hydra.run.dir={tmp_path}", module="m3i_lightning.finetune", check=False)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: checkpoint="), done.stderr
    assert "depth=1" in lines[0] and "depth=2" in lines[0]
