"""M3I mix: each token of A and B sits where its mask says, one encoder pass, own targets."""

from __future__ import annotations

import torch
from helpers import tiny_backbone

from m3i_lightning.backbone import gather_tokens
from m3i_lightning.components.masking import RandomMask
from m3i_lightning.engine.mixing import encode_mixed, mixed_masks, partner_rows
from m3i_lightning.engine.module import MultiObjective
from m3i_lightning.objectives import Classification, MaskedFeature


def test_mixed_masks_are_disjoint_with_equal_counts():
    gen = RandomMask((4, 4), 0.75)
    mask_a, mask_b = mixed_masks(gen, 64, torch.device("cpu"))
    assert ((~mask_a).sum(1) == gen.num_visible).all()
    assert ((~mask_b).sum(1) == gen.num_visible).all()
    assert not ((~mask_a) & (~mask_b)).any()


def test_mixed_tokens_equal_a_hand_built_sequence():
    """Encoding the mixture equals the ViT on [cls, A's visible patches, B's visible patches]
    built by hand from each image's own patch and position embedding."""
    torch.manual_seed(0)
    backbone = tiny_backbone().eval()
    images = torch.randn(4, 3, 16, 16)
    partner = partner_rows(4, images.device)
    gen = RandomMask(backbone.grid_size, 0.5)
    torch.manual_seed(1)
    enc_a, enc_b = encode_mixed(backbone, images, partner, gen)
    m = backbone.model
    tokens = m.patch_embed(images) + m.pos_embed[:, 1:]
    cls = (m.cls_token + m.pos_embed[:, :1]).expand(4, -1, -1)
    sequence = torch.cat([cls, gather_tokens(tokens, enc_a.visible_index),
                          gather_tokens(tokens[partner], enc_b.visible_index)], dim=1)
    expected = m.norm(m.blocks(sequence))[:, 1:]
    v = enc_a.visible_index.shape[1]
    torch.testing.assert_close(enc_a.tokens, expected[:, :v])
    torch.testing.assert_close(enc_b.tokens, expected[:, v:])
    torch.testing.assert_close(enc_a.global_feature, m.fc_norm(expected[:, :v].mean(1)))
    hidden_a = torch.ones(4, 16, dtype=torch.bool).scatter(1, enc_a.visible_index, False)
    assert torch.equal(hidden_a.nonzero()[:, 1].view(4, -1), enc_a.masked_index)


def test_mix_encodes_once_and_each_image_gets_its_own_targets(batch, tokenizer):
    torch.manual_seed(0)
    backbone = tiny_backbone()
    ctx = dict(embed_dim=32, grid_size=(4, 4))
    model = MultiObjective(backbone, {"mim_feat": MaskedFeature(predictor_dim=32, **ctx),
                                      "cls": Classification(num_classes=10, **ctx)},
                           mask_ratio=0.5, mix=True)
    calls, seen = [], {}
    encode = backbone.encode
    backbone.encode = lambda x: calls.append(x.shape) or encode(x)
    for name in ("mim_feat", "cls"):
        original = model.heads[name].loss

        def spy(b, enc, tgt, _name=name, _orig=original):
            seen.setdefault(_name, []).append((b["label"], enc, tgt))
            return _orig(b, enc, tgt)
        model.heads[name].loss = spy
    terms, _ = model.forward_terms(batch)
    assert len(calls) == 1 and calls[0][1] == 1 + 16  # cls token + 8 visible of A + 8 of B
    assert len(seen["mim_feat"]) == 1 and len(seen["cls"]) == 2
    labels_a, labels_b = seen["cls"][0][0], seen["cls"][1][0]
    assert torch.equal(labels_b, labels_a.roll(1))
    assert torch.isfinite(torch.stack(list(terms.values()))).all()
