"""Visible-token encoding of the ViT backbone against a sequence built by hand."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_backbone

from m3i_lightning.backbone import Backbone, Encoded, gather_tokens


def images(batch_size: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch_size, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def reference_encode(backbone: Backbone, x: torch.Tensor, keep: torch.Tensor | None):
    """cls token + patches with position embeddings, only the ``keep`` patches, then the timm
    blocks and final norm: what a ViT computes on a sequence that never had the others."""
    m = backbone.model
    patches = m.patch_embed(x) + m.pos_embed[:, 1:]
    cls = (m.cls_token + m.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    if keep is not None:
        patches = torch.stack([patches[b, keep[b]] for b in range(x.shape[0])])
    seq = m.norm(m.blocks(torch.cat([cls, patches], dim=1)))
    return seq[:, 1:], seq[:, 0]


def test_geometry_of_tiny_vit(backbone):
    assert backbone.embed_dim == 32
    assert backbone.grid_size == (4, 4)
    assert backbone.patch_size == 4
    assert backbone.num_patches == 16
    assert backbone.num_prefix_tokens == 1


def test_full_encoding_matches_timm(backbone):
    backbone.eval()
    x = images()
    with torch.no_grad():
        out = backbone(x)
        tokens, cls = reference_encode(backbone, x, None)
        features = backbone.model.forward_features(x)
    torch.testing.assert_close(out.tokens, tokens)
    torch.testing.assert_close(out.global_feature, cls)
    torch.testing.assert_close(out.tokens, features[:, 1:])
    assert out.visible_index is None and out.masked_index is None


def test_visible_token_encoding_equals_short_sequence(backbone):
    backbone.eval()
    x = images()
    g = torch.Generator().manual_seed(1)
    keep = torch.stack([torch.randperm(16, generator=g)[:5].sort().values for _ in range(3)])
    hidden = torch.stack([torch.tensor(sorted(set(range(16)) - set(k.tolist()))) for k in keep])
    with torch.no_grad():
        out = backbone(x, keep, hidden)
        tokens, cls = reference_encode(backbone, x, keep)
        full = backbone(x)
    assert isinstance(out, Encoded)
    torch.testing.assert_close(out.tokens, tokens)
    torch.testing.assert_close(out.global_feature, cls)
    assert out.visible_index is keep and out.masked_index is hidden
    # dropping tokens really changes the result: the masked patches were not attended to
    assert not torch.allclose(out.tokens, gather_tokens(full.tokens, keep), atol=1e-4)


def test_class_token_without_position_embedding_masked_as_timm_embeds_it():
    """DeiT III (timm ``no_embed_class``): position embeddings for the patches only, the class
    token prepended without one; the visible-token encoding still gives each kept patch its
    own position."""
    torch.manual_seed(0)
    backbone = tiny_backbone(no_embed_class=True).eval()
    m = backbone.model
    assert m.pos_embed.shape == (1, 16, 32)
    x = images()
    keep = torch.tensor([[0, 3, 9], [15, 2, 4], [7, 8, 1]])
    with torch.no_grad():
        out = backbone(x, keep)
        patches = m.patch_embed(x) + m.pos_embed
        patches = torch.stack([patches[b, keep[b]] for b in range(3)])
        seq = m.norm(m.blocks(torch.cat([m.cls_token.expand(3, -1, -1), patches], dim=1)))
        full = backbone(x)
    torch.testing.assert_close(out.tokens, seq[:, 1:])
    torch.testing.assert_close(out.global_feature, seq[:, 0])
    torch.testing.assert_close(full.tokens, m.forward_features(x)[:, 1:])


def test_mask_token_encoding_is_every_cell_with_the_token_in_the_hidden_ones():
    """``mask_token=True`` (BEiT, data2vec): the hidden patches' embeddings replaced by the
    token before the position embedding, every cell through the blocks; the visible cells'
    outputs are the tokens, the hidden ones' the masked tokens; the export has no token."""
    torch.manual_seed(0)
    backbone = tiny_backbone(mask_token=True).eval()
    assert backbone.masks_by_token and "mask_token" not in backbone.timm_kwargs
    assert not tiny_backbone().masks_by_token
    m = backbone.model
    x = images(2)
    keep = torch.tensor([[0, 5, 6, 11], [3, 9, 12, 15]])
    hidden = torch.stack([torch.tensor(sorted(set(range(16)) - set(k.tolist()))) for k in keep])
    with torch.no_grad():
        out = backbone(x, keep, hidden)
        patches = m.patch_embed(x)
        for b in range(2):
            patches[b, hidden[b]] = backbone.mask_token
        cls = m.cls_token + m.pos_embed[:, :1]
        seq = m.norm(m.blocks(torch.cat([cls.expand(2, -1, -1), patches + m.pos_embed[:, 1:]], 1)))
    torch.testing.assert_close(out.tokens, gather_tokens(seq[:, 1:], keep))
    torch.testing.assert_close(out.masked_tokens, gather_tokens(seq[:, 1:], hidden))
    torch.testing.assert_close(out.global_feature, seq[:, 0])
    assert "mask_token" not in {k.split(".")[0] for k in m.state_dict()}


def test_visible_order_is_respected(backbone):
    """Tokens come back in the order of visible_index, whatever that order is."""
    backbone.eval()
    x = images(2)
    keep = torch.tensor([[7, 1, 12, 3], [0, 15, 5, 9]])
    with torch.no_grad():
        out = backbone(x, keep)
        tokens, _ = reference_encode(backbone, x, keep)
    torch.testing.assert_close(out.tokens, tokens)


def test_masked_encoding_shapes(backbone):
    x = images(4)
    keep = torch.arange(4).expand(4, -1)
    hidden = torch.arange(4, 16).expand(4, -1)
    out = backbone(x, keep, hidden)
    assert out.tokens.shape == (4, 4, 32)
    assert out.global_feature.shape == (4, 32)
    assert out.masked_index.shape == (4, 12)
    full = backbone(x)
    assert full.tokens.shape == (4, 16, 32)
    assert full.global_feature.shape == (4, 32)


def test_masked_encoding_backpropagates(backbone):
    """A fixed random projection of the outputs is a loss whose gradient truly reaches every
    visible position (a plain sum would not: the sum of a LayerNorm output is constant, so its
    gradient is rounding noise). Hidden positions are never gathered, so their gradient is
    exactly zero by construction."""
    x = images(2)
    out = backbone(x, torch.tensor([[0, 5], [3, 9]]))
    g = torch.Generator().manual_seed(1)
    token_weights = torch.randn(out.tokens.shape, generator=g)
    global_weights = torch.randn(out.global_feature.shape, generator=g)
    ((out.tokens * token_weights).sum() + (out.global_feature * global_weights).sum()).backward()
    m = backbone.model
    # projection weights of order 1 give true gradients of order 1 or more; a zero gradient
    # seen through float32 rounding would be some 1e-5
    for param in (m.patch_embed.proj.weight, m.pos_embed, m.cls_token, m.norm.weight):
        assert param.grad is not None and param.grad.norm() > 1e-2
    # position embeddings: the cls slot and the visible patches (1 + index) get a gradient well
    # above rounding relative to the whole; the hidden ones exactly none
    per_position = m.pos_embed.grad[0].norm(dim=-1)
    visible = [0, 1, 4, 6, 10]
    assert (per_position[visible] > 1e-3 * per_position.norm()).all(), per_position
    hidden = [i for i in range(17) if i not in visible]
    assert torch.equal(per_position[hidden], torch.zeros(len(hidden)))


def test_gather_tokens():
    tokens = torch.arange(2 * 4 * 3).reshape(2, 4, 3)
    index = torch.tensor([[3, 0], [1, 1]])
    got = gather_tokens(tokens, index)
    assert got.tolist() == [[tokens[0, 3].tolist(), tokens[0, 0].tolist()],
                            [tokens[1, 1].tolist(), tokens[1, 1].tolist()]]


def test_unknown_arch():
    with pytest.raises(ValueError, match="not_a_real_vit"):
        Backbone("not_a_real_vit")


def test_arch_outside_the_families_is_rejected_naming_them():
    with pytest.raises(ValueError, match="efficientnet.*convnext.*swin.*resnet.*vit"):
        Backbone("efficientnet_b0")


def test_timm_kwargs_are_kept_for_export():
    b = tiny_backbone(depth=1)
    assert b.arch == "vit_tiny_patch16_224"
    assert b.timm_kwargs["num_classes"] == 0
    assert b.timm_kwargs["depth"] == 1 and len(b.model.blocks) == 1


def test_class_attention_is_the_last_blocks_head_averaged_class_token_row():
    """MILAN's CLIP returns ``nn.MultiheadAttention``'s weights of its last block (heads
    averaged) and reads the class token's row at the patches: the same module, loaded with the
    timm block's qkv and projection, gives the reference."""
    torch.manual_seed(0)
    backbone = tiny_backbone(depth=2).eval()
    m = backbone.model
    x = images()
    with torch.no_grad():
        out = backbone(x, class_attention=True)
        seq = m.blocks[0](m._pos_embed(m.patch_embed(x)))
        block = m.blocks[-1]
        mha = torch.nn.MultiheadAttention(32, 2, batch_first=True)
        mha.in_proj_weight.copy_(block.attn.qkv.weight)
        mha.in_proj_bias.copy_(block.attn.qkv.bias)
        mha.out_proj.load_state_dict(block.attn.proj.state_dict())
        h = block.norm1(seq)
        mixed, weights = mha(h, h, h, need_weights=True, average_attn_weights=True)
    torch.testing.assert_close(mixed, block.attn(h), rtol=1e-4, atol=1e-5)  # loaded alike
    torch.testing.assert_close(out.class_attention, weights[:, 0, 1:], rtol=1e-4, atol=1e-6)
    assert out.class_attention.shape == (3, 16)
    assert torch.allclose(out.tokens, backbone(x).tokens)
    without = tiny_backbone(class_token=False, global_pool="avg")
    assert not without.supports_class_attention
    with pytest.raises(ValueError, match="no class token"):
        without(x, class_attention=True)


def mae_sincos_grid(grid: int, dim: int) -> torch.Tensor:
    """MAE's get_2d_sincos_pos_embed, written out: for each axis a quarter of the channels
    sin(p·ω_k) and a quarter cos(p·ω_k), ω_k = 10000^(−k/(dim/4)); row channels first here."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows = []
    for r in range(grid):
        for c in range(grid):
            rows.append(torch.cat([torch.sin(r * omega), torch.cos(r * omega),
                                   torch.sin(c * omega), torch.cos(c * omega)]))
    return torch.stack(rows).float()


def test_sincos_positions_are_the_fixed_2d_grid_with_the_class_token_row_at_zero():
    """position_embedding=sincos (MAE, MoCo v3, SiameseIM): never trained, and not a timm
    argument (test_export reloads such a network in a clean timm process)."""
    torch.manual_seed(0)
    backbone = tiny_backbone(position_embedding="sincos")
    pos = backbone.model.pos_embed
    torch.testing.assert_close(pos[0, 1:], mae_sincos_grid(4, 32))
    assert pos[0, 0].abs().sum() == 0 and not pos.requires_grad
    assert "position_embedding" not in backbone.timm_kwargs
    with pytest.raises(ValueError, match="position_embedding must be one of"):
        tiny_backbone(position_embedding="sine")


def xavier_bound(weight: torch.Tensor) -> float:
    fan_out, fan_in = weight.shape[0], weight[0].numel()
    return (6.0 / (fan_in + fan_out)) ** 0.5


def assert_xavier_uniform(weight: torch.Tensor) -> None:
    """Inside ±sqrt(6 / (fan_in + fan_out)) and spread over it (a uniform's std is bound/√3;
    timm's trunc_normal(0.02) and PyTorch's kaiming-uniform defaults are far narrower or
    wider for these widths)."""
    bound = xavier_bound(weight)
    assert weight.abs().max() <= bound + 1e-6
    assert weight.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.15)


def test_mae_init_is_xavier_uniform_with_zero_biases_and_the_patch_embedding_as_a_linear():
    torch.manual_seed(0)
    m = tiny_backbone(init="mae").model
    for name, module in m.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert_xavier_uniform(module.weight)
            assert module.bias.abs().sum() == 0, name
    assert_xavier_uniform(m.patch_embed.proj.weight)
    assert m.patch_embed.proj.bias.abs().sum() == 0
    assert m.cls_token.std().item() == pytest.approx(0.02, rel=0.5)
    timm_default = tiny_backbone().model.blocks[0].mlp.fc1.weight
    assert timm_default.std().item() < 0.5 * xavier_bound(timm_default) / 3 ** 0.5


def test_a_frozen_patch_embedding_takes_no_step_while_the_blocks_do():
    """freeze_patch_embed (MoCo v3's random patch projection, SiameseIM): no gradient and no
    change after an optimizer step; the blocks and the fixed positions as asked."""
    torch.manual_seed(0)
    backbone = tiny_backbone(freeze_patch_embed=True, position_embedding="sincos")
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    trainable = [p for p in backbone.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    tokens = backbone(images()).tokens
    weights = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(1))
    (tokens * weights).sum().backward()
    optimizer.step()
    after = backbone.model.state_dict()
    for key in ("patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed"):
        assert torch.equal(after[key], before[key]), key
    assert not torch.allclose(after["blocks.0.mlp.fc1.weight"], before["blocks.0.mlp.fc1.weight"])
