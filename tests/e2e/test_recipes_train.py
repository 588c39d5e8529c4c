"""Each recipe trains two optimizer steps on the embedded digits through Lightning, as its
comment runs it (the CPU ViT and its scale; here a batch of 8): every term finite. A recipe
with a frozen teacher gets one of the architecture and projection width it names, at the CPU
ViT's grid and one block deep. (What each recipe builds: tests/unit/test_recipes.py.)"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import CONF_DIR, compose_config

from m3i_lightning.backbone import Backbone
from m3i_lightning.config.artifacts import export_backbone
from m3i_lightning.config.factory import build_datamodule, build_model, build_tokenizer_from

RECIPES = sorted({p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")} - {"base"})
CPU_RECIPE = ["backbone=vit_cpu", "data.batch_size=8", "data.source_size=16",
              "data.num_workers=0"]


def frozen_teacher(cfg, folder) -> list[str]:
    """The overrides that give the recipe ``cfg`` a frozen teacher of its own architecture
    and projection width, at the CPU ViT's grid, one block deep."""
    args = dict(img_size=32, patch_size=4, embed_dim=64, depth=1, num_heads=2,
                num_classes=cfg.teacher.model_args.num_classes)
    torch.manual_seed(1)
    weights = export_backbone(Backbone(cfg.teacher.arch, **args), folder)
    return [f"teacher.checkpoint={weights}", *(f"++teacher.model_args.{k}={v}"
                                                for k, v in args.items())]


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_trains_two_steps_on_the_embedded_data(recipe, tmp_path):
    cfg = compose_config(f"experiment={recipe}", *CPU_RECIPE, tiny=False)
    if cfg.teacher.kind == "frozen":
        cfg = compose_config(f"experiment={recipe}", *CPU_RECIPE,
                             *frozen_teacher(cfg, tmp_path / "teacher"), tiny=False)
    tokenizer = build_tokenizer_from(cfg.text)
    data = build_datamodule(cfg.data, tokenizer)
    torch.manual_seed(0)
    model = build_model(cfg, data.num_classes, tokenizer)
    trainer = L.Trainer(max_steps=2, max_epochs=cfg.trainer.max_epochs, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, accelerator="cpu", devices=1)
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 2
    for name in cfg.objective:
        assert torch.isfinite(trainer.callback_metrics[f"train/loss/{name}"]), name
