"""Samples without a caption or a label leave only the objectives that need one."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from m3i_lightning.components.losses import clip_loss
from m3i_lightning.engine.module import MultiObjective
from m3i_lightning.objectives.clip import CLIP
from m3i_lightning.objectives.cls import Classification
from m3i_lightning.objectives.mim_feat import MaskedFeature


def embeddings(n: int = 8, dim: int = 6):
    torch.manual_seed(0)
    image = F.normalize(torch.randn(n, dim), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(n, dim), dim=-1).requires_grad_()
    return image, text


def test_clip_loss_over_the_captioned_pairs_only():
    image, text = embeddings()
    valid = torch.tensor([1, 1, 0, 1, 0, 1, 1, 1], dtype=torch.bool)
    masked = clip_loss(image, text, 14.0, 0, image, text, all_valid=valid)
    masked.backward()
    expected = clip_loss(image[valid].detach(), text[valid].detach(), 14.0)
    assert torch.allclose(masked, expected)
    # uncaptioned rows are filled out and ignored: exactly no gradient, by construction; every
    # captioned row gets one of order 1, far above rounding
    assert image.grad[~valid].abs().sum() == 0 and text.grad[~valid].abs().sum() == 0
    assert (image.grad[valid].norm(dim=-1) > 1e-2).all()
    assert (text.grad[valid].norm(dim=-1) > 1e-2).all()
    full = clip_loss(image, text, 14.0, 0, image, text, all_valid=torch.ones(8, dtype=torch.bool))
    assert torch.allclose(full, clip_loss(image, text, 14.0))


def test_clip_rank_slice_uses_its_offset():
    """A rank scoring rows 4..7 of a gathered batch of 8 (open_clip's local loss)."""
    image, text = embeddings()
    valid = torch.tensor([1, 0, 1, 1, 1, 1, 0, 1], dtype=torch.bool)
    local = clip_loss(image[4:], text[4:], 10.0, 4, image, text, all_valid=valid)
    logits = 10.0 * image @ text[valid].T
    rows = torch.tensor([4, 5, 7])
    targets = valid.cumsum(0)[rows] - 1
    per_image = F.cross_entropy(logits[rows], targets)
    per_text = F.cross_entropy((10.0 * text @ image[valid].T)[rows], targets)
    assert torch.allclose(local, (per_image + per_text) / 2)


def test_nothing_captioned_or_labelled_is_zero_not_nan():
    image, text = embeddings()
    none = torch.zeros(8, dtype=torch.bool)
    loss = clip_loss(image, text, 14.0, 0, image, text, all_valid=none)
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(image.grad).all()
    head = Classification(num_classes=3, embed_dim=6, grid_size=(2, 2))
    encoded = type("Encoded", (), {"global_feature": image})()
    loss, logs = head.loss({"label": torch.full((8,), -100)}, encoded, None)
    assert loss.item() == 0 and loss.requires_grad and logs["acc"].isnan()


def test_unlabelled_uncaptioned_batch_still_trains_the_other_objectives(backbone, tokenizer,
                                                                        batch):
    heads = {"mim_feat": MaskedFeature(embed_dim=32, grid_size=(4, 4), predictor_dim=16,
                                       predictor_depth=1, predictor_heads=2),
             "clip": CLIP(tokenizer, embed_dim=32, grid_size=(4, 4), proj_dim=16,
                          text_width=16, text_layers=1, text_heads=2),
             "cls": Classification(num_classes=10, embed_dim=32, grid_size=(4, 4))}
    model = MultiObjective(backbone, heads)
    batch = {**batch, "label": torch.full_like(batch["label"], -100),
             "text_valid": torch.zeros_like(batch["text_valid"])}
    terms, _ = model.forward_terms(batch)
    assert terms["clip"].item() == 0 and terms["cls"].item() == 0 and terms["mim_feat"] > 0.1
    sum(terms.values()).backward()
    grads = [p.grad for p in backbone.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # the masked-feature term alone moves the student: a gradient far above rounding noise
    assert torch.stack([g.norm() for g in grads]).norm() > 1e-3
