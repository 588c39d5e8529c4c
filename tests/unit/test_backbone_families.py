"""ConvNeXt, Swin and ResNet behind the ViT's interface: SimMIM mask tokens against an input
built by hand, hidden pixels that never reach the network, M3I's mix at final-grid cells, the
engine's refusal of what ResNet cannot serve, and every objective learning on each family."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_FAMILIES, TINY_HEADS, digits32, family_backbone, tiny_backbone, tiny_heads

from m3i_lightning.backbone import (
    Backbone,
    ConvNeXtBackbone,
    ResNetBackbone,
    SwinBackbone,
    VisionTransformerBackbone,
)
from m3i_lightning.components.masking import RandomMask
from m3i_lightning.components.predictor import TokenPredictor
from m3i_lightning.core.errors import ConfigError
from m3i_lightning.engine import sharding
from m3i_lightning.engine.mixing import encode_mixed, partner_rows
from m3i_lightning.engine.module import MultiObjective
from m3i_lightning.objectives import OBJECTIVES

MASKED = ["convnext", "swin"]
GRID, CELL = 4, 8  # final grid side, pixels per final cell

GLOBAL = ["clip", "cls", "global_distill", "inst_disc"]  # sorted


def images(batch_size: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def random_split(batch_size: int, visible: int, seed: int = 1):
    """Sorted visible and hidden final-grid cells, different in every row."""
    g = torch.Generator().manual_seed(seed)
    order = torch.stack([torch.randperm(GRID * GRID, generator=g) for _ in range(batch_size)])
    return order[:, :visible].sort(1).values, order[:, visible:].sort(1).values


@pytest.fixture(scope="module")
def batch32() -> dict:
    return digits32(8, 0)


@pytest.fixture(scope="module")
def others32() -> dict:
    return digits32(32, 1)


# --- the families and what they declare -------------------------------------------------------


def test_each_arch_builds_its_family_with_the_final_grid_and_stride():
    expected = {"convnext": (ConvNeXtBackbone, 32), "swin": (SwinBackbone, 32),
                "resnet": (ResNetBackbone, 32)}
    for family, (cls, width) in expected.items():
        backbone = family_backbone(family)
        assert type(backbone) is cls and isinstance(backbone, Backbone)
        assert backbone.embed_dim == width
    for family in MASKED:
        backbone = family_backbone(family)
        assert backbone.grid_size == (GRID, GRID) and backbone.patch_size == CELL
        assert backbone.grid_for(64) == (8, 8) and backbone.grid_for((48, 32)) == (6, 4)
        assert backbone.supports_masking and backbone.supports_dense
    resnet = family_backbone("resnet")
    assert resnet.grid_size == (1, 1) and resnet.patch_size == 32
    assert not resnet.supports_masking and not resnet.supports_dense
    assert type(tiny_backbone()) is VisionTransformerBackbone


def test_img_size_reaches_timm_only_where_the_class_takes_it():
    assert family_backbone("swin").timm_kwargs["img_size"] == 32
    assert "img_size" not in family_backbone("convnext").timm_kwargs
    assert family_backbone("convnext", img_size=48).grid_size == (6, 6)
    with pytest.raises(ValueError, match="not a multiple of the final stride 8"):
        family_backbone("convnext", img_size=36)


def test_an_overlapping_convnext_stem_is_refused_for_masking():
    with pytest.raises(ValueError, match="stem_type='patch'"):
        family_backbone("convnext", stem_type="overlap", patch_size=4)


@pytest.mark.parametrize("family", MASKED + ["resnet"])
def test_full_encoding_is_timm_forward(family):
    backbone = family_backbone(family).eval()
    x = images()
    with torch.no_grad():
        out = backbone(x)
        features = backbone.model.forward_features(x)
        pooled = backbone.model(x)
    torch.testing.assert_close(out.global_feature, pooled)
    grid = features if family == "swin" else features.permute(0, 2, 3, 1)
    torch.testing.assert_close(out.tokens, grid.flatten(1, 2))
    if backbone.supports_masking:  # pooling a subset of the tokens is for masked inputs
        torch.testing.assert_close(backbone.pool(out.tokens), pooled)


# --- SimMIM mask tokens --------------------------------------------------------------------------


def hand_masked(backbone: Backbone, x: torch.Tensor, visible: torch.Tensor):
    """timm's own patch embedding with the mask token written, cell by cell, over every
    embedding cell of a hidden final-grid cell, then timm's stages and final norm; the visible
    cells' tokens, and their mean through the head's norm (ConvNeXt) or as is (Swin)."""
    m = backbone.model
    token = backbone.mask_token.detach()
    swin = isinstance(backbone, SwinBackbone)
    embedded = (m.patch_embed(x) if swin else m.stem(x)).clone()
    side = embedded.shape[1] if swin else embedded.shape[2]
    k = side // GRID
    for b in range(x.shape[0]):
        for cell in range(GRID * GRID):
            if cell in visible[b].tolist():
                continue
            r, c = divmod(cell, GRID)
            if swin:
                embedded[b, r * k:(r + 1) * k, c * k:(c + 1) * k, :] = token
            else:
                embedded[b, :, r * k:(r + 1) * k, c * k:(c + 1) * k] = token[:, None, None]
    if swin:
        final = m.norm(m.layers(embedded))
    else:
        final = m.norm_pre(m.stages(embedded)).permute(0, 2, 3, 1)
    tokens = torch.stack([torch.stack([final[b, i // GRID, i % GRID] for i in visible[b]])
                          for b in range(x.shape[0])])
    mean = tokens.mean(1)
    if swin:
        return tokens, mean
    norm = m.head.norm
    return tokens, F.layer_norm(mean, mean.shape[-1:], norm.weight, norm.bias, norm.eps)


@pytest.mark.parametrize("family", MASKED)
def test_masked_encoding_equals_a_hand_built_mask_token_input(family):
    backbone = family_backbone(family).eval()
    x = images()
    visible, hidden = random_split(3, 5)
    with torch.no_grad():
        out = backbone(x, visible, hidden)
        tokens, pooled = hand_masked(backbone, x, visible)
        full = backbone(x)
    torch.testing.assert_close(out.tokens, tokens)
    torch.testing.assert_close(out.global_feature, pooled)
    assert out.visible_index is visible and out.masked_index is hidden
    # the mask token really replaced the hidden cells: the visible cells' context changed
    visible_full = torch.stack([full.tokens[b, visible[b]] for b in range(3)])
    assert not torch.allclose(out.tokens, visible_full, atol=1e-3)


@pytest.mark.parametrize("family", MASKED)
def test_the_mask_token_receives_gradient(family):
    backbone = family_backbone(family)
    visible, hidden = random_split(2, 6)
    out = backbone(images(2), visible, hidden)
    g = torch.Generator().manual_seed(3)
    loss = (out.tokens * torch.randn(out.tokens.shape, generator=g)).sum()
    loss = loss + (out.global_feature * torch.randn(out.global_feature.shape, generator=g)).sum()
    loss.backward()
    scale = loss.detach().abs() / out.tokens.numel()
    assert backbone.mask_token.grad.norm() > 1e-3 * max(scale.item(), 1.0)


@pytest.mark.parametrize("family", MASKED)
def test_hidden_pixels_do_not_reach_the_network(family):
    """Noise in the hidden cells' pixels leaves the output as it was; noise in one visible
    cell changes it."""
    backbone = family_backbone(family).eval()
    x = images(2)
    visible, hidden = random_split(2, 6)
    noisy = x.clone()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(4)) * 5
    for b in range(2):
        for cell in hidden[b].tolist():
            r, c = divmod(cell, GRID)
            rows, cols = slice(r * CELL, (r + 1) * CELL), slice(c * CELL, (c + 1) * CELL)
            noisy[b, :, rows, cols] = noise[b, :, rows, cols]
    seen = x.clone()
    r, c = divmod(visible[0, 0].item(), GRID)
    seen[0, :, r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL] += 5
    with torch.no_grad():
        clean, hidden_noise, visible_noise = (backbone(v, visible, hidden)
                                              for v in (x, noisy, seen))
    torch.testing.assert_close(hidden_noise.tokens, clean.tokens)
    torch.testing.assert_close(hidden_noise.global_feature, clean.global_feature)
    assert not torch.allclose(visible_noise.tokens, clean.tokens, atol=1e-3)


# --- M3I's mix on a hierarchical net -----------------------------------------------------------


@pytest.mark.parametrize("family", MASKED)
def test_mix_puts_each_final_cell_from_the_image_its_mask_says(family):
    """The mixed pass equals timm's stages on a patch embedding built by hand: in every
    final-grid cell, image A's embedding where A is visible, B's where B is, else the mask
    token; each image's tokens are its visible cells of that one map, its global feature
    pooled over them."""
    backbone = family_backbone(family).eval()
    x = images(4)
    partner = partner_rows(4, x.device)
    torch.manual_seed(1)
    with torch.no_grad():
        enc_a, enc_b = encode_mixed(backbone, x, partner, RandomMask(backbone.grid_size, 0.5))
    vis_a, vis_b = enc_a.visible_index, enc_b.visible_index
    assert not (set(vis_a[0].tolist()) & set(vis_b[0].tolist()))
    m = backbone.model
    swin = family == "swin"
    embed = m.patch_embed if swin else m.stem
    with torch.no_grad():
        own, other = embed(x), embed(x[partner])
        mixed = torch.empty_like(own)
        k = (own.shape[1] if swin else own.shape[2]) // GRID
        for b in range(4):
            for cell in range(GRID * GRID):
                r, c = divmod(cell, GRID)
                source = (own[b] if cell in vis_a[b].tolist() else other[b]
                          if cell in vis_b[b].tolist() else None)
                where = ((slice(r * k, (r + 1) * k), slice(c * k, (c + 1) * k), slice(None))
                         if swin else (slice(None), slice(r * k, (r + 1) * k),
                                       slice(c * k, (c + 1) * k)))
                mixed[b][where] = (backbone.mask_token[None, None, :] if swin
                                   else backbone.mask_token[:, None, None]).expand_as(
                    mixed[b][where]) if source is None else source[where]
        final = m.norm(m.layers(mixed)) if swin else m.norm_pre(m.stages(mixed)).permute(0, 2, 3, 1)
        final = final.flatten(1, 2)
    for enc, vis in ((enc_a, vis_a), (enc_b, vis_b)):
        expected = torch.stack([final[b, vis[b]] for b in range(4)])
        torch.testing.assert_close(enc.tokens, expected)
        torch.testing.assert_close(enc.global_feature, backbone.pool(expected))


# --- what ResNet cannot serve ------------------------------------------------------------------


def test_resnet_refuses_masked_input():
    backbone = family_backbone("resnet")
    visible, hidden = random_split(2, 8)
    with pytest.raises(ValueError, match="whole images only"):
        backbone(images(2), visible, hidden)


def test_the_engine_names_what_resnet_cannot_serve():
    backbone = family_backbone("resnet")
    with pytest.raises(ConfigError) as err:
        MultiObjective(backbone,
                       tiny_heads(["mim_feat", "dense_id", "mim_global", "cls"], backbone))
    message = str(err.value)
    assert "['dense_id', 'mim_feat', 'mim_global'] need" in message
    assert "masked input and no dense tokens" in message
    assert f"among {GLOBAL}" in message
    with pytest.raises(ConfigError, match=r"\['mix'\] need"):
        MultiObjective(backbone, tiny_heads(["cls"], backbone), mix=True)
    MultiObjective(backbone, tiny_heads(GLOBAL, backbone))  # every global objective is served


def test_the_objectives_resnet_serves_are_exactly_the_global_ones():
    served = sorted(n for n, o in OBJECTIVES.items() if not o.masked_input
                    and not o.reads_tokens())
    assert served == GLOBAL


# --- scaling: sharding units, activation checkpointing -----------------------------------------


@pytest.mark.parametrize("family", ["convnext", "swin", "resnet"])
def test_blocks_are_the_sharding_units_with_the_predictor_blocks(family):
    backbone = family_backbone(family)
    names = ["cls"] if family == "resnet" else ["mim_feat", "cls"]
    model = MultiObjective(backbone, tiny_heads(names, backbone))
    classes = sharding.block_classes(model)
    assert {type(b) for b in backbone.blocks()} <= classes
    depth = len(backbone.blocks())
    assert depth == sum(TINY_FAMILIES[family].get("depths") or TINY_FAMILIES[family]["layers"])
    predictors = [b for m in model.modules() if isinstance(m, TokenPredictor) for b in m.blocks]
    # student + EMA teacher blocks, and the predictor's
    teachers = 2 if model.teacher is not None else 1
    assert len(sharding.transformer_blocks(model)) == teachers * depth + len(predictors)


def test_compile_takes_conv_blocks_static_and_transformer_blocks_dynamic(monkeypatch):
    """ConvNeXt's block class runs at every stage's width: compiled with dynamic shapes,
    inductor fails on the symbolic channel count (torch 2.14); static, it recompiles per
    stage. (Compiling itself takes minutes on a CPU, so only the choice is tested here.)"""
    backbone = family_backbone("convnext")
    model = MultiObjective(backbone, tiny_heads(["mim_feat", "cls"], backbone))
    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, **kw: calls.append((type(self).__name__, kw["dynamic"])))
    sharding.compile_blocks(model)
    assert sorted(set(calls)) == [("Block", None), ("ConvNeXtBlock", False)]
    assert len(calls) == len(sharding.transformer_blocks(model))


@pytest.mark.parametrize("family", MASKED)
def test_activation_checkpointing_gives_the_same_gradients(family):
    visible, hidden = random_split(2, 6)

    def grads(checkpointing: bool) -> dict:
        backbone = family_backbone(family)
        sharding.enable_activation_checkpointing(backbone) if checkpointing else None
        out = backbone(images(2), visible, hidden)
        g = torch.Generator().manual_seed(5)
        (out.tokens * torch.randn(out.tokens.shape, generator=g)).sum().backward()
        return {n: p.grad for n, p in backbone.named_parameters() if p.grad is not None}

    plain, recomputed = grads(False), grads(True)
    assert plain.keys() == recomputed.keys() and "mask_token" in plain
    for name, grad in plain.items():
        torch.testing.assert_close(recomputed[name], grad, msg=name)


# --- every objective learns on every family that serves it -----------------------------------


def measured_loss(model: MultiObjective, batch: dict, name: str, queues: dict) -> float:
    torch.manual_seed(1234)  # the same mask every time
    load_buffers(model, queues)
    with torch.no_grad():
        return model.forward_terms(batch)[0][name].item()


def load_buffers(model: MultiObjective, buffers: dict[str, torch.Tensor]) -> None:
    for key, value in buffers.items():
        model.get_buffer(key).copy_(value)


CASES = [(f, n) for f in MASKED for n in TINY_HEADS] + [("resnet", n) for n in GLOBAL]


@pytest.mark.parametrize(("family", "name"), CASES, ids=[f"{f}-{n}" for f, n in CASES])
def test_short_fit_on_a_fixed_batch_lowers_the_loss(family, name, batch32, others32):
    """As the ViT tests measure it: DenseCL's queue holds 32 other images' keys, kept fixed
    (trained on one batch it would fill with the batch's own keys, its positives), DINO's
    centre starts at its steady state on the batch."""
    backbone = family_backbone(family)
    model = MultiObjective(backbone, tiny_heads([name], backbone), mask_ratio=0.5).train()
    with torch.no_grad():
        model.forward_terms(others32)
    queues = {k: b.clone() for k, b in model.named_buffers() if "queue" in k}
    if name == "global_distill":
        head = model.heads[name]
        with torch.no_grad():
            head.center.copy_(head.momentum_head(model.teacher(batch32["view1"])
                                                 .global_feature).mean(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    before = measured_loss(model, batch32, name, queues)
    for step in range(30):
        load_buffers(model, queues)
        terms, _ = model.forward_terms(batch32)
        assert torch.isfinite(terms[name])
        optimizer.zero_grad()
        terms[name].backward()
        optimizer.step()
        model.update_teacher(step, 30)
    after = measured_loss(model, batch32, name, queues)
    assert after < 0.9 * before, (before, after)


# --- other image sizes (multi-crop views) ------------------------------------------------------


@pytest.mark.parametrize("family", ["vit", *MASKED])
def test_an_image_of_another_size_is_encoded_on_its_own_grid(family):
    """ConvNeXt takes any multiple of its stride; ViT and Swin with timm's
    ``dynamic_img_size=True``. Masks index the grid of :meth:`Backbone.grid_for`."""
    if family == "vit":
        backbone = tiny_backbone(img_size=32, dynamic_img_size=True).eval()
    else:
        backbone = family_backbone(family, **({"dynamic_img_size": True} if family == "swin"
                                              else {})).eval()
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(6))
    rows, cols = backbone.grid_for(48)
    assert (rows, cols) == (48 // backbone.patch_size,) * 2
    cells = torch.arange(rows * cols)
    visible, hidden = cells[::3].expand(2, -1), cells[cells % 3 != 0].expand(2, -1)
    with torch.no_grad():
        full, masked = backbone(x), backbone(x, visible, hidden)
        features = backbone.model.forward_features(x)
    if family == "vit":
        features = features[:, backbone.num_prefix_tokens:]
    elif family == "convnext":
        features = features.flatten(2).transpose(1, 2)
    else:
        features = features.flatten(1, 2)
    torch.testing.assert_close(full.tokens, features)
    assert masked.tokens.shape == (2, visible.shape[1], backbone.embed_dim)
