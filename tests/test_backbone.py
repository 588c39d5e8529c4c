"""Visible-token encoding of the ViT backbone against a sequence built by hand."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_backbone

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
    x = images(2)
    out = backbone(x, torch.tensor([[0, 5], [3, 9]]))
    # random weights: a plain sum has a zero gradient through the final LayerNorm
    g = torch.Generator().manual_seed(2)
    loss = (out.tokens * torch.randn(out.tokens.shape, generator=g)).sum()
    (loss + (out.global_feature * torch.randn(out.global_feature.shape, generator=g)).sum()
     ).backward()
    m = backbone.model
    for param in (m.patch_embed.proj.weight, m.pos_embed, m.cls_token, m.norm.weight):
        assert param.grad is not None and param.grad.norm() > 1e-3
    # only the visible patches' position embeddings (and the cls slot) get a gradient
    used = m.pos_embed.grad[0].norm(dim=-1) > 1e-3
    assert used.tolist() == [i in (0, 1, 4, 6, 10) for i in range(17)]


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
