"""DeiT's Mixup / CutMix in ``cls``: the loss on a mixed batch is the soft-target
cross-entropy (DeiT III's binary cross-entropy with ``loss=bce``), the mix is a function of
torch's stream, and it runs only with cls alone."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_backbone, tiny_objective

from m3i_lightning.core.errors import ConfigError
from m3i_lightning.engine.module import MultiObjective

SMOOTHING = 0.1


def cls_alone(tokenizer, smoothing: float = SMOOTHING, **options) -> MultiObjective:
    torch.manual_seed(0)
    head = tiny_objective("cls", tokenizer, label_smoothing=smoothing, **options)
    model = MultiObjective(tiny_backbone(), {"cls": head})
    model.log = lambda *args, **kwargs: None  # no trainer to log to
    return model


def recovered_lambda(images: torch.Tensor, mixed: torch.Tensor) -> float:
    """λ of the batch, read off the images alone: Mixup's mixed = λ·x + (1 − λ)·x reversed
    (least squares); CutMix's box of the reversed batch pasted in, λ = 1 − its area."""
    partner = images.flip(0)
    pasted = (mixed != images).any(0).any(0)
    rows, cols = pasted.any(1).nonzero().squeeze(1), pasted.any(0).nonzero().squeeze(1)
    box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    inside = torch.zeros_like(pasted)
    inside[box] = True
    if torch.equal(mixed[..., inside], partner[..., inside]) and torch.equal(
            mixed[..., ~inside], images[..., ~inside]):
        return 1 - inside.sum().item() / inside.numel()
    d = images - partner
    lam = ((mixed - partner) * d).sum() / (d * d).sum()
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * partner, atol=1e-5, rtol=0)
    return lam.item()


@pytest.mark.parametrize("mix", [dict(mixup=0.8), dict(cutmix=1.0)], ids=["mixup", "cutmix"])
def test_the_loss_on_a_mixed_batch_is_the_soft_target_cross_entropy(mix, tokenizer, batch):
    model = cls_alone(tokenizer, **mix)
    head = model.heads["cls"]
    labels = batch["label"].clone()
    labels[2] = -100  # a missing label: its row and its partner's (B − 3) leave the loss
    batch = {**batch, "label": labels}
    torch.manual_seed(3)
    mixed = head.augment_batch(batch)["view1"]
    lam = recovered_lambda(batch["view1"], mixed)
    assert 0 < lam < 1
    torch.manual_seed(3)
    loss = model.training_step(batch, 0)

    onehot = F.one_hot(labels.clamp(min=0), 10).float()
    targets = lam * onehot + (1 - lam) * onehot.flip(0)
    targets = (1 - SMOOTHING) * targets + SMOOTHING / 10
    log_p = head.class_embed(model.backbone(mixed).global_feature).log_softmax(-1)
    rows = [i for i in range(len(labels)) if i not in (2, len(labels) - 3)]
    expected = -(targets[rows] * log_p[rows]).sum(-1).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def binary_cross_entropy(logits: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """−[y·log σ(x) + (1 − y)·log(1 − σ(x))] per class, averaged over the classes."""
    return -(present * F.logsigmoid(logits) + (1 - present) * F.logsigmoid(-logits)).mean(-1)


@pytest.mark.parametrize("mix", [dict(mixup=0.8), dict(cutmix=1.0)], ids=["mixup", "cutmix"])
def test_bce_on_a_mixed_batch_makes_both_images_classes_present(mix, tokenizer, batch):
    """DeiT III (``--bce-loss``): the mixed targets thresholded at 0, a BCE per class, the
    mean over classes and rows; a row without a label (and its partner's) leaves it."""
    model = cls_alone(tokenizer, smoothing=0.0, loss="bce", **mix)
    head = model.heads["cls"]
    labels = batch["label"].clone()
    labels[2] = -100
    batch = {**batch, "label": labels}
    torch.manual_seed(3)
    mixed = head.augment_batch(batch)["view1"]
    assert 0 < recovered_lambda(batch["view1"], mixed) < 1
    torch.manual_seed(3)
    loss = model.training_step(batch, 0)

    onehot = F.one_hot(labels.clamp(min=0), 10).float()
    present = torch.maximum(onehot, onehot.flip(0))
    logits = head.class_embed(model.backbone(mixed).global_feature)
    rows = [i for i in range(len(labels)) if i not in (2, len(labels) - 3)]
    expected = binary_cross_entropy(logits[rows], present[rows]).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_bce_without_mixup_has_the_label_present_and_refuses_smoothing(tokenizer, batch):
    model = cls_alone(tokenizer, smoothing=0.0, loss="bce")
    head = model.heads["cls"]
    logits = head.class_embed(model.backbone(batch["view1"]).global_feature)
    expected = binary_cross_entropy(logits, F.one_hot(batch["label"], 10).float()).mean()
    torch.testing.assert_close(model.training_step(batch, 0), expected)
    with pytest.raises(ValueError, match="label smoothing 0.1 would make all of them present"):
        cls_alone(tokenizer, loss="bce")
    with pytest.raises(ValueError, match="unknown Boltzmann loss kind 'hinge'"):
        cls_alone(tokenizer, loss="hinge")


def test_the_mix_is_a_function_of_torch_stream_and_leaves_the_others(tokenizer, batch):
    head = cls_alone(tokenizer, mixup=0.8, cutmix=1.0).heads["cls"]
    original = batch["view1"].clone()

    def draw(seed):
        torch.manual_seed(seed)
        return head.augment_batch(batch)["view1"]

    random.seed(1), np.random.seed(1)
    expected = random.random(), np.random.rand()
    random.seed(1), np.random.seed(1)
    first, again, other = draw(5), draw(5), draw(6)
    assert (random.random(), np.random.rand()) == expected
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert torch.equal(batch["view1"], original)


def test_without_mixup_the_batch_is_untouched_and_the_loss_the_plain_one(tokenizer, batch):
    model = cls_alone(tokenizer)
    head = model.heads["cls"]
    assert not head.augments_batch and head.augment_batch(batch) is batch
    logits = head.class_embed(model.backbone(batch["view1"]).global_feature)
    expected = F.cross_entropy(logits, batch["label"], label_smoothing=SMOOTHING)
    torch.testing.assert_close(model.training_step(batch, 0), expected)


def test_mixup_runs_only_with_cls_alone_and_on_an_even_batch(tokenizer, batch):
    heads = {"cls": tiny_objective("cls", tokenizer, mixup=0.8),
             "mim_feat": tiny_objective("mim_feat", tokenizer)}
    with pytest.raises(ConfigError, match=r"\['cls'\] mix the images .*\['mim_feat'\]"):
        MultiObjective(tiny_backbone(), heads)
    head = cls_alone(tokenizer, cutmix=1.0).heads["cls"]
    odd = {key: value[:7] for key, value in batch.items() if torch.is_tensor(value)}
    with pytest.raises(ConfigError, match="must be even, got 7"):
        head.augment_batch(odd)
