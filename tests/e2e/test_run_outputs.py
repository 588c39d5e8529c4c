"""A training run ends with its eval table, its pictures and the exported clip folder."""

from __future__ import annotations

import csv
import json

import torch
from helpers import run
from PIL import Image

from m3i_lightning.config.restore import CONFIG_KEY
from m3i_lightning.runtime.pictures import grid_size

PICTURES_RUN = ["objective=[mim_pixel,clip]", "backbone.depth=1", "backbone.embed_dim=32",
            "backbone.num_heads=2", "backbone.img_size=16", "data.source_size=16",
            "data.batch_size=32", "data.num_workers=0", "objective.clip.text_width=32",
            "objective.clip.proj_dim=32", "objective.clip.text_layers=1",
            "objective.clip.text_heads=2", "objective.mim_pixel.decoder_dim=32",
            "objective.mim_pixel.decoder_depth=1", "objective.mim_pixel.decoder_heads=2",
            "trainer.max_epochs=2", "+trainer.limit_train_batches=3",
            "trainer.check_val_every_n_epoch=1", "trainer.log_every_n_steps=1",
            "trainer.accelerator=cpu", "trainer.devices=1", "pictures.every_n_epochs=1",
            "pictures.num_images=4", "probe.epochs=5"]


def test_a_training_run_ends_with_the_eval_table_pictures_and_exported_clip(tmp_path):
    run_dir = tmp_path / "run"
    result = run(*PICTURES_RUN, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    for row in ("kNN top-1", "linear-probe top-1", "zero-shot top-1"):
        assert row in result.stdout
    results = json.loads((run_dir / "eval.json").read_text())["results"]
    assert set(results) == {"knn_top1", "linear_top1", "zero_shot_top1"}

    pictures = {p.name for p in (run_dir / "pictures").iterdir()}
    assert pictures == {"curves.png", "mim_pixel_epoch001.png", "mim_pixel_epoch002.png",
                        "mim_pixel_final.png"}
    # 4 images of 4 panels: input, masked input, prediction, target
    with Image.open(run_dir / "pictures" / "mim_pixel_final.png") as image:
        assert image.size == grid_size(4, 4, 16)

    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for name in ("val/knn_top1", "val/linear_top1"):
        values = [float(r[name]) for r in rows if r.get(name)]
        assert len(values) == 2 and all(0 <= v <= 1 for v in values), name

    assert (run_dir / "backbone" / "model.safetensors").exists()
    assert (run_dir / "backbone" / "clip" / "image_projection.safetensors").exists()
    card = (run_dir / "backbone" / "README.md").read_text()  # the model card, with the table
    assert f"{100 * results['zero_shot_top1']:6.2f}%" in card and "`clip/`" in card
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu",
                            weights_only=True)
    assert checkpoint[CONFIG_KEY]["objective"].keys() == {"mim_pixel", "clip"}
