"""Mean intersection-over-union, the score of semantic segmentation (ADE20k, DINOv2's linear
segmentation), from a confusion matrix accumulated over batches of any size."""

from __future__ import annotations

import torch
from torch import Tensor


def confusion_matrix(predicted: Tensor, target: Tensor, num_classes: int,
                     ignore_index: int) -> Tensor:
    """[C, C] pixel counts, row: target class, column: predicted class; pixels whose target
    is ``ignore_index`` are left out."""
    keep = target != ignore_index
    pairs = target[keep].long() * num_classes + predicted[keep].long()
    return torch.bincount(pairs, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def mean_iou(confusion: Tensor) -> float:
    """Mean over classes of TP / (TP + FP + FN); a class absent from both targets and
    predictions has no IoU and is left out of the mean (NaN when no class is present)."""
    confusion = confusion.double()
    true_positive = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    present = union > 0
    return (true_positive[present] / union[present]).mean().item()
