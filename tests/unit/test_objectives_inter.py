"""Inter-view objectives (nvs, sim_pixel, sim_feat): losses against the papers' formulas
written out here, relative queries, routing in both input modes, gradient routing, learning on
a fixed batch, no collapse, and the command line."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from helpers import fit_fixed_batch, tiny_backbone

from m3i_lightning import MultiObjective
from m3i_lightning.components.geometry import relative_geometry
from m3i_lightning.components.losses import feature_correlation, unigrad_loss
from m3i_lightning.core.positions import grid_coords, sincos_embedding
from m3i_lightning.objectives import OBJECTIVES

INTER = ["nvs", "sim_pixel", "sim_feat"]
TINY = dict(predictor_dim=32, predictor_depth=1, predictor_heads=2)


def build(name: str, backbone, **options):
    return OBJECTIVES[name](**{**TINY, **options}, embed_dim=backbone.embed_dim,
                            grid_size=backbone.grid_size, patch_size=backbone.patch_size)


def readings(model: MultiObjective, batch: dict) -> dict:
    """The (batch, encoded, targets) each objective reads, as the engine builds them."""
    torch.manual_seed(0)
    return {name: r[0] for name, r in model.readings(batch).items()}


# --- hand-written references: the formulas as the papers state them --------------------------


def ref_unigrad(pred, target, neg_weight):
    """SiameseIM's dense UniGrad loss, with F = (1/n) Σ_v y_v y_vᵀ over the n target vectors:
    (1/n) Σ_v [ Σ_i (p_vi − y_vi)² + λ Σ_ij p_vi F_ij p_vj ] / D."""
    p = pred.reshape(-1, pred.shape[-1]).tolist()
    y = target.reshape(-1, target.shape[-1]).tolist()
    n, d = len(y), len(y[0])
    corr = [[sum(y[v][i] * y[v][j] for v in range(n)) / n for j in range(d)] for i in range(d)]
    total = 0.0
    for pv, yv in zip(p, y, strict=True):
        positive = sum((a - b) ** 2 for a, b in zip(pv, yv, strict=True))
        negative = sum(pv[i] * corr[i][j] * pv[j] for i in range(d) for j in range(d))
        total += (positive + neg_weight * negative) / d
    return total / n


def ref_norm_pix_mse(pred, images, patch):
    """MAE's norm-pix MSE over every patch: each patch standardised by its mean and unbiased
    variance + 1e-6, then the mean squared error over pixels and patches."""
    b, c, h, w = images.shape
    total, count = 0.0, 0
    for i in range(b):
        for n in range((h // patch) * (w // patch)):
            row, col = divmod(n, w // patch)
            pixels = [float(images[i, ch, row * patch + y, col * patch + x])
                      for y in range(patch) for x in range(patch) for ch in range(c)]
            mean = sum(pixels) / len(pixels)
            std = math.sqrt(sum((v - mean) ** 2 for v in pixels) / (len(pixels) - 1) + 1e-6)
            total += sum((float(q) - (v - mean) / std) ** 2
                         for q, v in zip(pred[i, n], pixels, strict=True)) / len(pixels)
            count += 1
    return total / count


def ref_layer_norm(x, eps=1e-5):
    """LayerNorm without affine parameters: (x − mean) / sqrt(biased var + ε) per vector."""
    mean = x.mean(-1, keepdim=True)
    return (x - mean) / ((x - mean).pow(2).mean(-1, keepdim=True) + eps).sqrt()


def test_unigrad_loss_matches_the_formula():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 5, 6), torch.randn(2, 5, 6)
    corr = feature_correlation(target)
    ref = [[sum(v[i] * v[j] for v in target.reshape(-1, 6).tolist()) / 10 for j in range(6)]
           for i in range(6)]
    torch.testing.assert_close(corr, torch.tensor(ref))
    assert unigrad_loss(pred, target, corr, 0.02).item() == pytest.approx(
        ref_unigrad(pred, target, 0.02), rel=1e-5)


def test_unigrad_gradient_is_the_unified_form_and_targets_get_none():
    """UniGrad: ∂L/∂p = positive pull (p − y) + λ·F p; here scaled by 2/(n·D)."""
    torch.manual_seed(0)
    pred = torch.randn(12, 8, requires_grad=True)
    target = torch.randn(12, 8, requires_grad=True)
    corr = feature_correlation(target)
    unigrad_loss(pred, target, corr, 0.5).backward()
    expected = 2 / (12 * 8) * (pred - target + 0.5 * pred @ corr)
    torch.testing.assert_close(pred.grad, expected.detach())
    assert target.grad is None


# --- the objectives' losses --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["nvs", "sim_pixel"])
def test_pixel_objectives_regress_normalised_pixels_of_every_target_patch(name, backbone, batch):
    model = MultiObjective(backbone, {name: build(name, backbone)}, input_mode="native")
    reading = readings(model, batch)[name]
    objective = model.heads[name]
    loss, _ = objective.loss(*reading)
    pred = objective.predict(*reading)
    assert pred.shape == (8, 16, 3 * 4 * 4)
    assert loss.item() == pytest.approx(ref_norm_pix_mse(pred.detach(), batch["view1"], 4),
                                        rel=1e-5)


@pytest.mark.parametrize("projection", [True, False])
def test_sim_feat_is_unigrad_on_layer_normed_teacher_features(backbone, batch, projection):
    """SiameseIM's code: the target is the LayerNorm of the teacher tokens projected by the
    EMA copy of the decoder's input projection and projector (a 48-wide decoder here, so the
    projection changes the width); without the projection, the LayerNorm-ed teacher tokens."""
    objective = build("sim_feat", backbone, target_projection=projection, predictor_dim=48)
    model = MultiObjective(backbone, {"sim_feat": objective}, input_mode="native")
    reading = readings(model, batch)["sim_feat"]
    loss, _ = objective.loss(*reading)
    pred = objective.predict(*reading).detach()
    teacher = model.teacher(batch["view1"]).tokens
    if projection:
        decoder = objective.predictor.decoder
        for copy, online in ((objective.momentum_predictor_decoder_embed, decoder.embed),
                             (objective.momentum_predictor_decoder_projector, decoder.projector)):
            for c, o in zip(copy.parameters(), online.parameters(), strict=True):
                assert torch.equal(c, o) and not c.requires_grad
        embedded = teacher @ decoder.embed.weight.T + decoder.embed.bias
        with torch.no_grad():
            teacher = decoder.projector(embedded)
    target = ref_layer_norm(teacher)
    assert pred.shape == target.shape == (8, 16, 48 if projection else 32)
    assert loss.item() == pytest.approx(ref_unigrad(pred, target, 0.02), rel=1e-4)


@pytest.mark.parametrize("class_token", [True, False])
def test_sim_feat_decoder_reads_the_global_feature_when_asked(backbone, batch, class_token):
    """SiameseIM's decoder reads the encoder's class token before the visible tokens: the
    predictions follow the global feature with class_token, and ignore it without."""
    objective = build("sim_feat", backbone, class_token=class_token)
    model = MultiObjective(backbone, {"sim_feat": objective}, input_mode="native")
    seen, encoded, targets = readings(model, batch)["sim_feat"]
    moved = dataclasses.replace(encoded, global_feature=encoded.global_feature + 1.0)
    with torch.no_grad():
        change = (objective.predict(seen, moved, targets)
                  - objective.predict(seen, encoded, targets)).abs().max().item()
    assert change > 1e-2 if class_token else change < 1e-6


def test_sim_feat_correlation_is_a_moving_average_when_asked(backbone):
    objective = build("sim_feat", backbone, correlation_momentum=0.9)
    first, second = torch.randn(4, 16, 32), torch.randn(4, 16, 32)
    torch.testing.assert_close(objective.update_correlation(first), feature_correlation(first))
    torch.testing.assert_close(objective.update_correlation(second).clone(),
                               0.9 * feature_correlation(first)
                               + 0.1 * feature_correlation(second))
    per_batch = build("sim_feat", backbone)
    per_batch.update_correlation(first)
    torch.testing.assert_close(per_batch.update_correlation(second), feature_correlation(second))


# --- relative queries and routing ----------------------------------------------------------------


def spy(forward, seen: dict, name: str):
    """Wrap a predictor's forward to record its (encoded, input geometry, target geometry)."""
    def recording(*args, **kwargs):
        seen[name] = args
        return forward(*args, **kwargs)
    return recording


def test_queries_are_the_target_patches_relative_to_the_input(backbone):
    predictor = build("nvs", backbone).predictor
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0]])
    # identity crop: exactly the input tokens' own position embedding
    torch.testing.assert_close(predictor.queries(full, full)[0], predictor.decoder.pos_embed)
    half = torch.tensor([[0.25, 0.5, 0.5, 0.5, 0.0]])
    coords = torch.tensor([[0.75 + 0.5 * r, 1.75 + 0.5 * c] for r in range(4) for c in range(4)])
    torch.testing.assert_close(predictor.queries(full, half)[0], sincos_embedding(coords, 32))
    # once trained, the scale / flip code tells a mirrored or zoomed target apart
    torch.nn.init.normal_(predictor.view_code.weight)
    flipped = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0]])
    mirrored_positions = sincos_embedding(grid_coords((4, 4)).flip(0), 32)
    assert not torch.allclose(predictor.queries(full, flipped)[0, 0], mirrored_positions[0])


@pytest.mark.parametrize("mode", ["shared", "native"])
def test_routing_and_geometry_in_both_input_modes(mode, backbone, batch, monkeypatch):
    """Native: view2 (masked for sim_*) predicts view1. Shared: the one masked view1 predicts
    view2, and the queries place view2's patches in view1's grid."""
    objectives = {name: build(name, backbone) for name in INTER}
    model = MultiObjective(backbone, objectives, input_mode=mode)
    source, target = ("view1", "view2") if mode == "shared" else ("view2", "view1")
    seen = {}
    for name, objective in objectives.items():
        monkeypatch.setattr(objective.predictor, "forward",
                            spy(objective.predictor.forward, seen, name))
    got = readings(model, batch)
    assert model.plan.teacher_views == (target,)
    for name in INTER:
        _, encoded, targets = got[name]
        masked = mode == "shared" or name != "nvs"
        assert (targets.input_view, targets.view) == (source, target)
        assert (encoded.visible_index is not None) == masked
        assert model.plan.objectives[name].readings[0].input.view == source
        model.heads[name].loss(*got[name])
        _, input_geometry, target_geometry = seen[name]
        assert input_geometry is batch[f"{source}_geometry"]
        assert target_geometry is batch[f"{target}_geometry"]
        if name != "sim_feat":
            assert targets.pixels is batch[target]
    rel = relative_geometry(batch[f"{source}_geometry"], batch[f"{target}_geometry"])
    predictor = model.heads["sim_feat"].predictor
    torch.testing.assert_close(predictor.queries(batch[f"{source}_geometry"],
                                                 batch[f"{target}_geometry"]),
                               sincos_embedding(rel.patch_coords((4, 4)), 32))


def test_mixed_input_gives_image_b_its_own_geometry(backbone, batch, monkeypatch):
    """M3I's mix: image B (the batch rolled by one) predicts its own view2 from its own view1."""
    objective = build("sim_feat", backbone)
    model = MultiObjective(backbone, {"sim_feat": objective}, mix=True)
    seen = {}
    monkeypatch.setattr(objective.predictor, "forward",
                        spy(objective.predictor.forward, seen, "sim_feat"))
    terms, _ = model.forward_terms(batch)
    assert torch.isfinite(terms["sim_feat"])
    _, g_in, g_out = seen["sim_feat"]
    torch.testing.assert_close(g_in, batch["view1_geometry"].roll(1, 0))
    torch.testing.assert_close(g_out, batch["view2_geometry"].roll(1, 0))


def test_gradients_reach_the_student_and_heads_never_the_teacher_or_targets(backbone, batch):
    model = MultiObjective(backbone, {name: build(name, backbone) for name in INTER},
                           input_mode="native")
    got = readings(model, batch)
    total = sum(model.heads[name].loss(*got[name])[0] for name in INTER)
    total.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert not got["sim_feat"][2].teacher.tokens.requires_grad
    assert not model.heads["sim_feat"].correlation.requires_grad
    # every weight tensor of the student gets a gradient of norm ≥ 0.0075 here, every view code
    # ≥ 0.5: bars a hundred times lower, still far above rounding noise
    assert all(p.grad is not None and p.grad.norm() > 1e-4 for p in backbone.parameters()
               if p.requires_grad and p.ndim > 1)
    for name in INTER:
        code = model.heads[name].predictor.view_code.weight.grad
        assert code is not None and code.norm() > 1e-3, name


# --- learning and collapse -------------------------------------------------------------------


def train(name: str, batch: dict, steps: int = 30, lr: float = 1e-3):
    """:func:`conftest.fit_fixed_batch` of one inter-view objective in native mode."""
    torch.manual_seed(0)
    objective = OBJECTIVES[name](**TINY, backbone=tiny_backbone(), input_mode="native")
    return fit_fixed_batch(objective, batch, steps, lr)


@pytest.mark.parametrize("name", INTER)
def test_each_objective_lowers_its_loss_on_a_fixed_batch(name, batch):
    losses, _, _ = train(name, batch)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.9 * first, losses


def test_sim_feat_does_not_collapse(batch):
    """Over 40 steps at a high learning rate the features keep their spread across the batch
    (measured here: 0.106 → 0.064); a collapsed encoder would drive it to 0."""
    _, start, end = train("sim_feat", batch, steps=40, lr=3e-3)
    assert end > 0.4 * start and end > 0.03, (start, end)


# --- command line ----------------------------------------------------------------------------


