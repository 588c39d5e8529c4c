"""Intra-view objectives (ae, mim_pixel, dense_distill, global_distill, mim_global) and the
frozen teacher: losses against the papers' formulas written out here, gradient routing,
learning on a fixed batch, no collapse, and the command line."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from helpers import TINY_VIT, compose_config, fit_fixed_batch, tiny_backbone

from m3i_lightning import MultiObjective
from m3i_lightning.components.losses import dino_loss, mae_loss
from m3i_lightning.components.pixels import patchify
from m3i_lightning.config.artifacts import export_backbone, load_encoder
from m3i_lightning.config.factory import build_model
from m3i_lightning.core.errors import ConfigError
from m3i_lightning.engine.teacher import FrozenTeacher
from m3i_lightning.objectives import OBJECTIVES

INTRA = ["ae", "mim_pixel", "dense_distill", "global_distill", "mim_global"]
TINY_OPTIONS = {
    "ae": dict(decoder_dim=32, decoder_depth=1, decoder_heads=2),
    "mim_pixel": dict(decoder_dim=32, decoder_depth=1, decoder_heads=2),
    "dense_distill": {},
    "global_distill": dict(out_dim=64, hidden_dim=32, bottleneck_dim=16),
    "mim_global": dict(predictor_dim=32),
}


def context(backbone) -> dict:
    return dict(embed_dim=backbone.embed_dim, grid_size=backbone.grid_size,
                patch_size=backbone.patch_size)


def build(name: str, backbone, **options):
    return OBJECTIVES[name](**{**TINY_OPTIONS[name], **options}, **context(backbone))


# --- hand-written references: the formulas as the papers state them --------------------------


def ref_mae(pred, images, mask, patch_size):
    """MAE: each target patch standardised by its mean and (unbiased) variance + 1e-6; the loss
    is the mean over masked patches of the mean squared error over the patch's pixels."""
    b, c, h, w = images.shape
    p = patch_size
    total, count = 0.0, 0
    for i in range(b):
        for n in range(mask.shape[1]):
            if not mask[i, n]:
                continue
            row, col = divmod(n, w // p)
            pixels = [float(images[i, ch, row * p + y, col * p + x])
                      for y in range(p) for x in range(p) for ch in range(c)]
            mean = sum(pixels) / len(pixels)
            var = sum((v - mean) ** 2 for v in pixels) / (len(pixels) - 1)
            target = [(v - mean) / math.sqrt(var + 1e-6) for v in pixels]
            err = sum((float(q) - t) ** 2 for q, t in zip(pred[i, n], target, strict=True))
            total += err / len(target)
            count += 1
    return total / count


def ref_dino(student, teacher, center, student_temp, teacher_temp):
    """DINO: −Σ_k softmax((t − c)/τ_t)_k log softmax(s/τ_s)_k, averaged over the batch."""
    total = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist(), strict=True):
        t_scaled = [(t - c) / teacher_temp for t, c in zip(t_row, center.tolist(), strict=True)]
        t_max = max(t_scaled)
        t_exp = [math.exp(v - t_max) for v in t_scaled]
        p_t = [v / sum(t_exp) for v in t_exp]
        s_scaled = [s / student_temp for s in s_row]
        s_max = max(s_scaled)
        log_z = s_max + math.log(sum(math.exp(v - s_max) for v in s_scaled))
        total += -sum(p * (s - log_z) for p, s in zip(p_t, s_scaled, strict=True))
    return total / len(student)


# --- losses ----------------------------------------------------------------------------------


def test_mae_loss_is_mean_masked_patch_mse_of_normalised_pixels():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 8, 8)
    patches = patchify(images, 4)
    pred = torch.randn_like(patches)
    mask = torch.tensor([[1, 0, 1, 1], [0, 1, 0, 0]], dtype=torch.bool)
    expected = ref_mae(pred, images, mask, 4)
    assert mae_loss(pred, patches, mask).item() == pytest.approx(expected, rel=1e-5)
    masked = mask.nonzero(as_tuple=True)
    gathered = mae_loss(pred[masked].unsqueeze(0), patches[masked].unsqueeze(0))
    assert gathered.item() == pytest.approx(expected, rel=1e-5)
    raw = mae_loss(pred, patches, mask, norm_pix=False)
    assert raw.item() == pytest.approx(((pred - patches) ** 2).mean(-1)[mask].mean().item())


def test_dino_loss_is_cross_entropy_of_centred_sharpened_teacher():
    torch.manual_seed(0)
    student, teacher = torch.randn(4, 10, requires_grad=True), torch.randn(4, 10)
    teacher.requires_grad_(True)
    center = torch.randn(10)
    loss = dino_loss(student, teacher, center, student_temp=0.1, teacher_temp=0.04)
    assert loss.item() == pytest.approx(ref_dino(student, teacher, center, 0.1, 0.04), rel=1e-5)
    loss.backward()
    assert student.grad is not None and teacher.grad is None


# --- gradient routing ------------------------------------------------------------------------


def teacher_model(backbone):
    objectives = {name: build(name, backbone) for name in ("dense_distill", "global_distill",
                                                            "mim_global")}
    return MultiObjective(backbone, objectives, input_mode="native")


def test_teacher_dino_head_and_center_get_no_gradient(backbone, batch):
    model = teacher_model(backbone)
    terms, _ = model.forward_terms(batch)
    torch.stack(list(terms.values())).sum().backward()
    dino = model.heads["global_distill"]
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    assert all(p.grad is None and not p.requires_grad for p in dino.momentum_head.parameters())
    assert "center" not in dict(dino.named_parameters()) and not dino.center.requires_grad
    assert all(p.grad is not None for p in dino.head.parameters())
    assert all(p.grad is not None for p in model.backbone.parameters() if p.requires_grad)


def test_dino_teacher_head_moves_only_by_ema_and_center_by_its_running_mean(backbone, batch):
    model = teacher_model(backbone)
    dino = model.heads["global_distill"]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = [p.clone() for p in dino.momentum_head.parameters()]
    with torch.no_grad():
        teacher_logits = dino.momentum_head(model.teacher(batch["view1"]).global_feature)
    terms, _ = model.forward_terms(batch)
    torch.stack(list(terms.values())).sum().backward()
    optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, dino.momentum_head.parameters(),
                                                 strict=True))
    assert torch.allclose(dino.center, 0.1 * teacher_logits.mean(0), atol=1e-6)
    model.teacher.momentum = 0.9  # the cosine schedule's value at step 0
    model.update_teacher(0, 1)
    for old, new, student in zip(before, dino.momentum_head.parameters(), dino.head.parameters(),
                                 strict=True):
        assert torch.allclose(new, 0.9 * old + 0.1 * student, atol=1e-6)


def test_frozen_teacher_never_moves_but_heads_still_follow_the_schedule(tmp_path, batch):
    torch.manual_seed(1)
    weights = export_backbone(tiny_backbone(), tmp_path / "teacher")
    options = dict(TINY_VIT)
    teacher = FrozenTeacher(load_encoder(options.pop("arch"), weights, **options), 0.9, 1.0)
    frozen = [p.clone() for p in teacher.parameters()]
    torch.manual_seed(0)
    backbone = tiny_backbone()
    model = MultiObjective(backbone, {"global_distill": build("global_distill", backbone)},
                           teacher=teacher)
    assert model.teacher is teacher
    assert teacher.update(backbone, 0, 10) == pytest.approx(0.9)
    assert all(torch.equal(a, b) for a, b in zip(frozen, teacher.parameters(), strict=True))


# --- loading a frozen teacher ----------------------------------------------------------------


def test_frozen_teacher_loads_safetensors_and_lightning_checkpoints(tmp_path):
    torch.manual_seed(1)
    source = tiny_backbone().eval()
    images = torch.randn(2, 3, 16, 16)
    expected = source(images).tokens
    options = dict(TINY_VIT)
    arch = options.pop("arch")
    safetensors = export_backbone(source, tmp_path / "export")
    ckpt = tmp_path / "run.ckpt"
    state = {f"backbone.model.{k}": v for k, v in source.model.state_dict().items()}
    state["heads.ae.decoder.head.weight"] = torch.zeros(3)
    torch.save({"state_dict": state, "epoch": 1}, ckpt)
    for path in (safetensors, ckpt):
        teacher = FrozenTeacher(load_encoder(arch, path, **options))
        assert not teacher.training
        assert torch.allclose(teacher(images).tokens, expected, atol=1e-6)
    with pytest.raises(ValueError, match="lacks"):
        load_encoder(arch, ckpt, **{**options, "depth": 3})
    with pytest.raises(ValueError, match="not a file"):
        load_encoder(arch, tmp_path / "missing.safetensors", **options)


def test_frozen_teacher_from_config_gives_its_width_to_the_objectives(tmp_path, tokenizer):
    torch.manual_seed(1)
    wide = dict(img_size=16, patch_size=4, embed_dim=48, depth=1, num_heads=2)
    weights = export_backbone(tiny_backbone(**wide), tmp_path / "teacher")
    overrides = ["objective=[dense_distill,mim_global]", "backbone.img_size=16",
                 "backbone.embed_dim=32", "backbone.depth=1", "backbone.num_heads=2",
                 "teacher.kind=frozen", f"teacher.checkpoint={weights}",
                 "teacher.arch=vit_tiny_patch16_224",
                 "teacher.model_args={" + ",".join(f"{k}:{v}" for k, v in wide.items()) + "}"]
    cfg = compose_config(*overrides, tiny=False)
    model = build_model(cfg, num_classes=10, tokenizer=tokenizer)
    assert isinstance(model.teacher, FrozenTeacher) and model.teacher.embed_dim == 48
    assert model.heads["dense_distill"].head.out_features == 48
    assert model.heads["mim_global"].predictor[-1].out_features == 48


CLIP_TOWER = dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)


def test_projected_teacher_is_the_clip_towers_head_on_its_normed_tokens(tmp_path, tokenizer):
    """teacher.project: every token (and the class token, the global feature) through the
    CLIP tower's image projection after its final norm (ln_post), MILAN's target: timm's own
    network computes the reference."""
    torch.manual_seed(1)
    tower = timm.create_model("vit_base_patch16_clip_224", num_classes=24, **CLIP_TOWER).eval()
    weights = tmp_path / "clip.pth"
    torch.save(tower.state_dict(), weights)
    images = torch.randn(2, 3, 16, 16)
    encoder = load_encoder("vit_base_patch16_clip_224", weights, num_classes=24, **CLIP_TOWER)
    teacher = FrozenTeacher(encoder, project=True)
    with torch.no_grad():
        normed = tower.forward_features(images)  # [B, 1 + N, D] after ln_post
        expected_tokens, expected_global = tower.head(normed[:, 1:]), tower.head(normed[:, 0])
    encoded = teacher(images)
    torch.testing.assert_close(encoded.tokens, expected_tokens, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(encoded.global_feature, expected_global, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(encoded.global_feature, tower(images), rtol=1e-4, atol=1e-5)
    assert teacher.embed_dim == 24
    with pytest.raises(ValueError, match="built without a head: give num_classes"):
        FrozenTeacher(load_encoder("vit_base_patch16_clip_224", weights, **CLIP_TOWER),
                      project=True)
    cfg = compose_config("teacher.project=true", tiny=False)
    with pytest.raises(ConfigError, match="needs teacher.kind=frozen"):
        build_model(cfg, num_classes=10, tokenizer=tokenizer)


# --- learning and collapse -------------------------------------------------------------------


def train(name: str, batch: dict, steps: int = 30):
    """:func:`conftest.fit_fixed_batch` of one intra-view objective.

    DINO's centre starts at its steady state on this batch (the mean teacher score): from zero
    the first steps chase the one prototype every sample shares, a transient that is not what
    the student has to learn."""
    torch.manual_seed(0)
    objective = OBJECTIVES[name](**TINY_OPTIONS[name], backbone=tiny_backbone())
    if name == "global_distill":
        with torch.no_grad():
            teacher = objective.teacher(batch["view1"]).global_feature
            objective.head.center.copy_(objective.head.momentum_head(teacher).mean(0))
    return fit_fixed_batch(objective, batch, steps)


@pytest.mark.parametrize("name", INTRA)
def test_each_objective_lowers_its_loss_on_a_fixed_batch(name, batch):
    losses, _, _ = train(name, batch)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.9 * first, losses


@pytest.mark.parametrize("name", ["global_distill", "mim_global"])
def test_teacher_objectives_do_not_collapse(name, batch):
    """Mean-pooled features keep their spread across the batch."""
    _, start, end = train(name, batch, steps=40)
    assert end > 0.5 * start and end > 0.03, (start, end)


# --- command line ----------------------------------------------------------------------------


