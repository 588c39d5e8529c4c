"""Every family end to end: the exported ConvNeXt, Swin and ResNet load in plain timm with the
same features, and back into the library and a frozen teacher; experiment=m3i and all 14
objectives train on the CPU-sized ConvNeXt and Swin; the command line trains, exports and
refuses what ResNet cannot serve."""

from __future__ import annotations

import json
import subprocess
import sys

import lightning as L
import pytest
import torch
from helpers import TIMM_ONLY, TINY_FAMILIES, compose_config, family_backbone, run

from m3i_lightning.config import artifacts as export
from m3i_lightning.config.factory import build_datamodule, build_model, build_tokenizer_from
from m3i_lightning.engine.teacher import FrozenTeacher
from m3i_lightning.objectives import OBJECTIVES

FAMILIES = ["convnext", "swin", "resnet"]



def timm_features(folders) -> None:
    result = subprocess.run([sys.executable, "-c", TIMM_ONLY, *map(str, folders)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_each_family_exports_to_plain_timm_and_back(tmp_path):
    """timm alone, the library's loader and a frozen teacher reading the weights file all give
    the trained network's global feature (float32 rounding between processes at most)."""
    backbones, inputs = {}, {}
    for family in FAMILIES:
        backbone = family_backbone(family).eval()
        with torch.no_grad():  # move the weights off their init, BatchNorm statistics too
            for p in backbone.model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
            backbone.train()(torch.randn(4, 3, 32, 32))
        backbone.eval()
        folder = tmp_path / family
        export.export_backbone(backbone, folder)
        inputs[family] = torch.randn(2, 3, 32, 32)
        torch.save(inputs[family], folder / "input.pt")
        backbones[family] = backbone
    timm_features(tmp_path / f for f in FAMILIES)
    for family, backbone in backbones.items():
        folder = tmp_path / family
        with torch.no_grad():
            expected = backbone(inputs[family]).global_feature
            reloaded = export.load_exported(folder).backbone.eval()
            options = {k: v for k, v in TINY_FAMILIES[family].items() if k != "arch"}
            teacher = FrozenTeacher(export.load_encoder(backbone.arch,
                                                        folder / export.WEIGHTS_FILE, **options))
            assert type(reloaded.model) is type(backbone.model)
            assert reloaded.grid_size == backbone.grid_size
            torch.testing.assert_close(reloaded(inputs[family]).global_feature, expected)
            torch.testing.assert_close(teacher(inputs[family]).global_feature, expected)
        for features in torch.load(folder / "timm_features.pt"):
            torch.testing.assert_close(features, expected)
        config = json.loads((folder / export.CONFIG_FILE).read_text())
        assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]


def composed(*overrides: str):
    return compose_config("data.source_size=16", "data.num_workers=0", "data.batch_size=8",
                          *overrides, tiny=False)


def fit_two_steps(cfg):
    L.seed_everything(0)
    tokenizer = build_tokenizer_from(cfg.text)
    dm = build_datamodule(cfg.data, tokenizer)
    model = build_model(cfg, dm.num_classes, tokenizer)
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, accelerator="cpu",
                        devices=1, log_every_n_steps=1)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 2
    return trainer.callback_metrics


@pytest.mark.parametrize("backbone", ["convnext_cpu", "swin_cpu"])
def test_m3i_and_all_objectives_train_on_the_cpu_families(backbone):
    """The shipped CPU configs (their scale's heads): experiment=m3i (mixed input), and the 14
    objectives selected together, each term logged and finite."""
    m3i = fit_two_steps(composed("experiment=m3i", f"backbone={backbone}"))
    for name in ("mim_feat", "sim_feat", "cls"):
        assert torch.isfinite(m3i[f"train/loss/{name}"]), name
    names = sorted(OBJECTIVES)
    every = fit_two_steps(composed(f"objective=[{','.join(names)}]", f"backbone={backbone}"))
    for name in names:
        assert torch.isfinite(every[f"train/loss/{name}"]), name


def test_cpu_configs_select_the_cpu_scale():
    for backbone in ("convnext_cpu", "swin_cpu", "resnet_cpu"):
        cfg = composed(f"backbone={backbone}")
        assert cfg.heads.mim_feat.predictor_dim == 128 and cfg.mask.ratio == 0.5, backbone
        assert cfg.data.img_size == 32


def test_the_command_line_trains_and_exports_a_convnext_and_refuses_resnet_masking(tmp_path):
    out = tmp_path / "run"
    run("backbone=convnext_cpu", "objective=[mim_feat,cls]", "trainer.max_steps=2",
        "data.source_size=16", "data.num_workers=0", "data.batch_size=8",
        "+trainer.limit_val_batches=0", "probe.epochs=1", f"hydra.run.dir={out}")
    folders = [p.parent for p in out.rglob(export.CONFIG_FILE)]
    assert len(folders) == 1
    assert json.loads((folders[0] / export.CONFIG_FILE).read_text())["architecture"] == (
        "convnext_atto")
    refused = run("backbone=resnet_cpu", "trainer.max_steps=2", "data.num_workers=0",
                  f"hydra.run.dir={tmp_path / 'resnet'}", check=False)
    assert refused.returncode == 2
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in refused.stderr and len(errors) == 1
    assert errors[0].startswith("error: backbone 'resnet18'") and "['mim_feat'] need" in errors[0]
