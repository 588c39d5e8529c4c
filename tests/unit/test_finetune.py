"""Fine-tuning: layer-wise lr decay against its formula, the pre-trained weights arriving in
the fine-tuned network, the recipe's augmentation drawing from the sample's own seed, and the
command (a short run beats chance and writes finetune.json; a mismatched architecture is
one clear error line)."""

from __future__ import annotations

import random

import lightning as L
import pytest
import torch
from helpers import TINY_VIT, compose_config, digits_module, tiny_backbone
from omegaconf import OmegaConf

from m3i_lightning.commands.finetune import FineTuningData, build_classifier, recipe_from
from m3i_lightning.components.text import ByteTokenizer
from m3i_lightning.config.artifacts import export_backbone
from m3i_lightning.core.errors import ConfigError
from m3i_lightning.data.views import CropSet
from m3i_lightning.finetune import Classifier, FineTuning, Recipe, layer_decay_groups
from m3i_lightning.finetune.augment import RecipeView

LR, DECAY, WEIGHT_DECAY = 1e-3, 0.5, 0.05
# The layer of each parameter of a depth-2 ViT, written out: embeddings and the class token
# are layer 0, block i is layer i + 1, the final norm and the head layer 3.
LAYERS = {"backbone.model.cls_token": 0, "backbone.model.pos_embed": 0,
          "backbone.model.patch_embed.proj.weight": 0, "backbone.model.patch_embed.proj.bias": 0,
          "backbone.model.blocks.0.norm1.weight": 1, "backbone.model.blocks.0.attn.qkv.weight": 1,
          "backbone.model.blocks.0.mlp.fc2.bias": 1, "backbone.model.blocks.1.norm1.weight": 2,
          "backbone.model.blocks.1.attn.proj.weight": 2,
          "backbone.model.blocks.1.mlp.fc1.weight": 2,
          "backbone.model.fc_norm.weight": 3, "backbone.model.fc_norm.bias": 3,
          "head.weight": 3, "head.bias": 3}
NO_WEIGHT_DECAY = {"backbone.model.cls_token", "backbone.model.pos_embed",
                   "backbone.model.patch_embed.proj.bias", "backbone.model.blocks.0.norm1.weight",
                   "backbone.model.blocks.0.mlp.fc2.bias", "backbone.model.blocks.1.norm1.weight",
                   "backbone.model.fc_norm.weight", "backbone.model.fc_norm.bias", "head.bias"}


def tiny_classifier(**overrides) -> Classifier:
    torch.manual_seed(0)
    return Classifier(tiny_backbone(global_pool="avg", **overrides), num_classes=10)


def test_each_parameter_group_trains_at_lr_times_decay_to_the_power_of_its_depth_from_the_top():
    classifier = tiny_classifier()
    groups = layer_decay_groups(classifier, depth=2, lr=LR, layer_decay=DECAY,
                                weight_decay=WEIGHT_DECAY)
    group_of = {id(p): g for g in groups for p in g["params"]}
    named = dict(classifier.named_parameters())
    assert len(group_of) == len(named) == sum(len(g["params"]) for g in groups)
    for name, layer in LAYERS.items():
        group = group_of[id(named[name])]
        assert group["lr"] == pytest.approx(LR * DECAY ** (3 - layer)), name
        assert group["weight_decay"] == (0.0 if name in NO_WEIGHT_DECAY else WEIGHT_DECAY), name
    assert {round(g["lr"] / LR, 6) for g in groups} == {1.0, 0.5, 0.25, 0.125}


def test_pretrained_weights_arrive_and_the_pooling_switch_keeps_every_other_weight(tmp_path):
    """An exported token-pooled backbone into an average-pooled one (MAE): every weight but
    the final norm (dropped) is the exported one, fc_norm and the head are fresh."""
    torch.manual_seed(1)
    source = tiny_backbone(global_pool="token")
    export_backbone(source, tmp_path / "exported")
    cfg = OmegaConf.create({"checkpoint": None, "backbone_dir": str(tmp_path / "exported"),
                            "random_init": False, "backbone": {**TINY_VIT, "global_pool": "token"},
                            "finetune": {"drop_path": 0.1, "global_pool": "avg"}, "seed": 0})
    classifier, name = build_classifier(cfg, num_classes=10)
    assert name == f"backbone_dir={tmp_path / 'exported'}"
    tuned = classifier.backbone.model.state_dict()
    for key, value in source.model.state_dict().items():
        if not key.startswith("norm."):
            assert torch.equal(tuned[key], value), key
    assert "norm.weight" not in tuned and "fc_norm.weight" in tuned
    assert classifier.backbone.model.blocks[1].drop_path1.drop_prob == pytest.approx(0.1)
    cfg.backbone.depth = 3
    with pytest.raises(ConfigError, match=r"holds vit_tiny_patch16_224\(depth=2.*but backbone= "
                                          r"is vit_tiny_patch16_224\(depth=3"):
        build_classifier(cfg, num_classes=10)


def test_recipe_view_draws_from_the_sample_seed_only():
    view = RecipeView(CropSet(16, (0.2, 1.0)), crop_scale=(0.3, 1.0),
                      auto_augment="rand-m9-mstd0.5-inc1", reprob=0.5)
    image = torch.rand(3, 24, 24)
    random.seed(5)
    torch.manual_seed(5)
    before = (random.random(), torch.rand(1))
    random.seed(5)
    torch.manual_seed(5)
    first, _ = view("view1", image, random.Random(7))
    second, _ = view("view1", image, random.Random(7))
    assert (random.random(), torch.rand(1)) == before  # the global streams are untouched
    assert first.shape == (3, 16, 16) and torch.equal(first, second)
    assert not torch.equal(first, view("view1", image, random.Random(8))[0])


def test_the_imagenet_recipes_compose_with_vit_base_and_their_sources_lr():
    """lr = blr · 1024 / 256: MAE's 5e-4 → 2e-3, SiameseIM's 2.5e-4 → 1e-3."""
    for recipe, lr in (("mae_vit_base", 2e-3), ("siameseim_vit_base", 1e-3)):
        cfg = compose_config(f"finetune={recipe}", name="finetune", tiny=False)
        assert cfg.backbone.arch == "vit_base_patch16_224"
        assert recipe_from(cfg, cfg.finetune.batch_size).lr == pytest.approx(lr)
        assert cfg.finetune.layer_decay == 0.65 and cfg.trainer.max_epochs == 100


def test_unlabelled_training_images_stop_the_run_with_a_clear_error():
    """Cross-entropy would silently ignore label -100: a batch holding one is refused."""
    L.seed_everything(0)
    dm = digits_module(ByteTokenizer(16), batch_size=8, fields={"view1", "label"},
                       labels=False, train_view=RecipeView)  # every record without a label
    model = FineTuning(tiny_classifier(), Recipe(warmup_epochs=0))
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, accelerator="cpu")
    with pytest.raises(ConfigError, match="needs a label for every training image: 8 of"):
        trainer.fit(model, datamodule=FineTuningData(dm))
