"""Export: the backbone folder loads with timm alone in a clean process and gives the same
features; ``python -m m3i_lightning.export`` turns a training checkpoint into a folder whose
backbone, text tower, tokenizer and image projection equal the trained ones."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import TIMM_ONLY, compose_config, fit_and_save, tiny_backbone

from m3i_lightning.commands import export as export_command
from m3i_lightning.config import artifacts as export
from m3i_lightning.config.restore import CONFIG_KEY, TrainedModel, load_checkpoint
from m3i_lightning.core.errors import ConfigError
from m3i_lightning.evaluation.zeroshot import class_embeddings
from m3i_lightning.objectives.capabilities import TOKENIZER_FILE


def test_exported_backbone_gives_identical_features_in_a_clean_timm_process(tmp_path):
    """A plain ViT, one with DeiT III's class token outside the position embedding
    (``no_embed_class``, a timm argument the export keeps) and MAE's encoder (fixed sin-cos
    positions, its init, a frozen patch embedding: the backbone's options, not timm's), all
    in one clean process."""
    backbones = {}
    variants = {"plain": {}, "no_embed_class": dict(no_embed_class=True),
                "mae_encoder": dict(position_embedding="sincos", init="mae",
                                    freeze_patch_embed=True)}
    for name, kwargs in variants.items():
        torch.manual_seed(0)
        backbones[name] = tiny_backbone(**kwargs).eval()
        export.export_backbone(backbones[name], tmp_path / name)
        torch.save(torch.randn(3, 3, 16, 16), tmp_path / name / "input.pt")
    result = subprocess.run([sys.executable, "-c", TIMM_ONLY,
                             *(str(tmp_path / name) for name in backbones)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for name, backbone in backbones.items():
        with torch.no_grad():
            expected = backbone(torch.load(tmp_path / name / "input.pt")).global_feature
        for features in torch.load(tmp_path / name / "timm_features.pt"):
            assert torch.equal(features, expected), name
    assert backbones["no_embed_class"].model.pos_embed.shape[1] == 16  # patches only


@pytest.fixture(scope="module")
def clip_cls_run(tmp_path_factory):
    """A two-step run of [clip, cls] saved as Lightning does, config included."""
    cfg = compose_config("objective=[clip,cls]", "objective.clip.text_width=32",
                         "objective.clip.proj_dim=32", "objective.clip.text_layers=1",
                         "objective.clip.text_heads=2", "data.batch_size=16")
    path = tmp_path_factory.mktemp("run") / "last.ckpt"
    return (path, *fit_and_save(cfg, 2, path))


def test_export_command_writes_the_trained_backbone_text_tower_and_tokenizer(clip_cls_run,
                                                                             tmp_path, capsys):
    path, model, tokenizer, dm = clip_cls_run
    export_command.main([f"checkpoint={path}", f"out={tmp_path}"])
    assert str(tmp_path) in capsys.readouterr().out
    spec = json.loads((tmp_path / "clip" / TOKENIZER_FILE).read_text())
    assert spec == {"tokenizer": "byte", "context_length": tokenizer.context_length}
    assert json.loads((tmp_path / export.IMAGE_TEXT_FILE).read_text()) == {"objective": "clip"}
    exported = export.load_exported(tmp_path)
    (tmp_path / export.IMAGE_TEXT_FILE).unlink()  # a folder exported before the record

    for loaded in (exported, export.load_exported(tmp_path), load_checkpoint(path)):
        for (name, a), b in zip(model.backbone.state_dict().items(),
                                loaded.backbone.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
        trained, restored = model.heads["clip"], loaded.image_text
        assert torch.equal(trained.image_proj.weight, restored.image_proj.weight)
        assert torch.equal(trained.logit_scale, restored.logit_scale)
        prompts = dm.class_prompts()
        assert torch.equal(class_embeddings(trained, prompts),
                           class_embeddings(restored, prompts))


def test_export_without_clip_writes_only_the_backbone(tmp_path):
    export.export_model(TrainedModel(tiny_backbone()), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [export.CONFIG_FILE,
                                                          export.WEIGHTS_FILE]
    assert export.load_exported(tmp_path).image_text is None


def test_checkpoint_without_config_and_bad_arguments_fail_clearly(clip_cls_run, tmp_path):
    checkpoint = torch.load(clip_cls_run[0], map_location="cpu", weights_only=True)
    del checkpoint[CONFIG_KEY]
    torch.save(checkpoint, tmp_path / "plain.ckpt")
    with pytest.raises(ConfigError, match="training config"):
        load_checkpoint(tmp_path / "plain.ckpt")
    with pytest.raises(SystemExit):
        export_command.main([f"out={tmp_path}"])
