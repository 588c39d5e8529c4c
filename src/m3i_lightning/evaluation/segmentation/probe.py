"""The linear segmentation probe: how much a frozen backbone's patch tokens know about what
each pixel shows (DINOv2's linear protocol, a cheap stand-in for ADE20k).

Each patch token goes through one linear classifier
(:class:`~m3i_lightning.evaluation.probe.LinearProbe`: standardised by the training tokens, so
no BatchNorm); the grid of class logits is upsampled
bilinearly to the mask and trained with pixel cross-entropy, ignoring ``ignore_index``. Tokens
come from the backbone's usual forward (:class:`~m3i_lightning.backbone.base.Encoded`, the last
stage's grid for every family; a ResNet's final feature map) and are extracted once, so the
probe trains at the cost of the linear layer. The score is the mean IoU on the held-out split.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m3i_lightning.components.optim import warmup_cosine
from m3i_lightning.data.skips import SkipReport
from m3i_lightning.evaluation.probe import LinearProbe
from m3i_lightning.evaluation.segmentation.data import (
    MaskedImages,
    check_class_ids,
    check_segmentation_options,
    load_sources,
    pair_loader,
    report_skips,
)
from m3i_lightning.evaluation.segmentation.miou import confusion_matrix, mean_iou


@dataclass
class SegmentationScore:
    """Mean IoU on the held-out split, and how many images each split gave."""

    miou: float
    sizes: dict[str, int]


@torch.no_grad()
def extract_patch_tokens(backbone: nn.Module, dataset: MaskedImages, split: str,
                         options: Mapping) -> tuple[Tensor, Tensor]:
    """Tokens [N, h, w, D] (float32, CPU) on the backbone's final grid and masks [N, H, W] of
    the usable samples of ``dataset``; skipped ones are logged, bad class ids refused."""
    was_training = backbone.training
    backbone.eval()
    device = next(backbone.parameters()).device
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    skips, tokens, masks = SkipReport(), [], []
    for batch in pair_loader(dataset, options["batch_size"], options["num_workers"]):
        for entry in batch["skipped"]:
            skips.add(entry)
        if "image" not in batch:
            continue
        check_class_ids(batch["mask"], batch["index"], dataset.source, options["num_classes"],
                        options["ignore_index"])
        images = batch["image"].to(device, non_blocking=True)
        with autocast:
            encoded = backbone(images)
        grid = backbone.grid_for(images.shape[-2:])
        tokens.append(encoded.tokens.float().reshape(len(images), *grid, -1).cpu())
        masks.append(batch["mask"])
    backbone.train(was_training)
    report_skips(skips, split, len(masks))
    return torch.cat(tokens), torch.cat(masks)


def upsampled_logits(probe: LinearProbe, tokens: Tensor, size: tuple[int, int]) -> Tensor:
    """Class logits [B, C, H, W]: the probe on every token [B, h, w, D], then bilinear."""
    logits = probe(tokens).permute(0, 3, 1, 2)
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def fit_segmentation_probe(tokens: Tensor, masks: Tensor, num_classes: int, ignore_index: int,
                           epochs: int, batch_size: int, lr: float, weight_decay: float,
                           seed: int = 0) -> LinearProbe:
    """Train the per-token classifier with AdamW and a cosine decay per step; its
    initialisation and batch order come from ``seed``, not the global RNG."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    flat = tokens.reshape(-1, tokens.shape[-1])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = LinearProbe(flat.shape[1], num_classes)
    probe.mean.copy_(flat.mean(0))
    probe.std.copy_(flat.std(0, unbiased=False).clamp_min(1e-6))
    probe = probe.to(device)
    optimizer = torch.optim.AdamW(probe.linear.parameters(), lr=lr, weight_decay=weight_decay)
    total = epochs * math.ceil(len(tokens) / batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, total, 0, 0.0))
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for rows in torch.randperm(len(tokens), generator=generator).split(batch_size):
            target = masks[rows].to(device)
            logits = upsampled_logits(probe, tokens[rows].to(device), target.shape[-2:])
            loss = F.cross_entropy(logits, target, ignore_index=ignore_index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return probe.requires_grad_(False).eval()


@torch.no_grad()
def score_segmentation(probe: LinearProbe, tokens: Tensor, masks: Tensor, num_classes: int,
                       ignore_index: int, batch_size: int) -> float:
    """Mean IoU of the probe's per-pixel argmax over all of ``tokens``."""
    device = probe.mean.device
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    for rows in torch.arange(len(tokens)).split(batch_size):
        target = masks[rows].to(device)
        predicted = upsampled_logits(probe, tokens[rows].to(device), target.shape[-2:])
        confusion += confusion_matrix(predicted.argmax(1), target, num_classes, ignore_index)
    return mean_iou(confusion)


def segmentation_probe(backbone: nn.Module, options: Mapping) -> SegmentationScore:
    """The whole protocol with the ``segmentation:`` options: data at the backbone's
    resolution, tokens of both splits, the probe fitted on train and scored on val."""
    check_segmentation_options(options)
    sources = load_sources(options["data"], backbone.img_size)
    train, val = (extract_patch_tokens(backbone, MaskedImages(sources[split], backbone.img_size),
                                       split, options) for split in ("train", "val"))
    classes, ignore = options["num_classes"], options["ignore_index"]
    probe = fit_segmentation_probe(*train, classes, ignore, options["epochs"],
                                   options["batch_size"], options["lr"],
                                   options["weight_decay"])
    miou = score_segmentation(probe, *val, classes, ignore, options["batch_size"])
    return SegmentationScore(miou, {"train": len(train[0]), "val": len(val[0])})
