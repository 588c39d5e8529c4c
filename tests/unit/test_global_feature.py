"""The global feature that evaluation and export read is the one the objectives train: the
class token without mix, each image's mean-pooled own tokens with M3I's mix, and the mean of the
tokens when no objective reads the class token (masked modelling alone)."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from helpers import compose_config
from safetensors.torch import load_file

from m3i_lightning.config.artifacts import export_backbone
from m3i_lightning.config.factory import build_model


@pytest.mark.parametrize(("objectives", "mix", "pooled", "extra"), [
    ("mim_feat,cls", False, False, ()), ("mim_feat,cls", True, True, ()),
    ("mim_feat,sim_feat", False, True, ("objective.sim_feat.class_token=false",)),
    ("sim_feat", False, False, ()),  # SiameseIM's decoder reads the class token
    ("mim_feat", False, False, ("objective.mim_feat.loss_tokens=all",))])  # MILAN's class token
def test_evaluated_feature_is_the_trained_one_and_export_keeps_it(objectives, mix, pooled,
                                                                  extra, batch, tmp_path):
    torch.manual_seed(0)
    cfg = compose_config(f"objective=[{objectives}]", f"mix={str(mix).lower()}", *extra)
    model = build_model(cfg, num_classes=10, tokenizer=None).eval()
    images = batch["view1"]
    with torch.no_grad():
        evaluated = model.validation_step({"image": images}, 0)
        encoded = model.backbone(images)
        full = model.backbone.model.forward_features(images)
    mean_pooled = model.backbone.pool(encoded.tokens)  # what every mixed objective reads
    class_token = full[:, 0]
    trained = mean_pooled if pooled else class_token
    other = class_token if pooled else mean_pooled
    torch.testing.assert_close(evaluated, trained)
    assert (evaluated - other).abs().max() > 1e-3

    out = export_backbone(model.backbone, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_args"].get("global_pool", "token") == ("avg" if pooled else "token")
    reloaded = timm.create_model(config["architecture"], **config["model_args"]).eval()
    reloaded.load_state_dict(load_file(out))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(images), trained)
