"""The two forms of P̂(z_y | ẑ_y) of the M3I unified view, as small modules objectives hold."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from m3i_lightning.components import losses


class Gaussian(nn.Module):
    """−log P̂ of a fixed-variance Gaussian around the prediction: a regression loss."""

    form = "Gaussian"

    def __init__(self, kind: str = "mse", beta: float = 1.0) -> None:
        super().__init__()
        if kind not in losses.GAUSSIAN_KINDS:
            raise ValueError(f"unknown Gaussian loss kind '{kind}'; choose one of "
                             f"{losses.GAUSSIAN_KINDS}")
        self.kind, self.beta = kind, beta

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        return losses.gaussian_nll(pred, target, self.kind, self.beta)


class Boltzmann(nn.Module):
    """−log softmax over a candidate set (classes, texts, negatives, prototypes): ``kind="ce"``.

    ``kind="bce"`` (DeiT III): every candidate its own two-state Boltzmann, present or absent
    (a sigmoid), so several may be present at once; the present ones are those the target
    gives any mass (an index: that one; a mixed soft target: both images' classes), as DeiT
    III thresholds its Mixup / CutMix targets at 0 (its engine.py, ``--bce-loss``). Label
    smoothing would give every class mass, so it is refused there.
    """

    form = "Boltzmann"

    def __init__(self, label_smoothing: float = 0.0, kind: str = "ce") -> None:
        super().__init__()
        if kind not in losses.BOLTZMANN_KINDS:
            raise ValueError(f"unknown Boltzmann loss kind '{kind}'; choose one of "
                             f"{losses.BOLTZMANN_KINDS}")
        if kind == "bce" and label_smoothing:
            raise ValueError(f"the bce loss takes every class the target gives mass as "
                             f"present, so label smoothing {label_smoothing} would make all of "
                             "them present: set label_smoothing to 0 (as DeiT III does)")
        self.label_smoothing, self.kind = label_smoothing, kind

    def forward(self, logits: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        """``target``: [B] candidate index or [B, C] soft target distribution."""
        if self.kind == "ce":
            return losses.boltzmann_nll(logits, target, self.label_smoothing, reduction)
        if target.dim() == 1:
            present = F.one_hot(target, logits.shape[-1])
        else:
            present = target > 0
        return losses.bernoulli_nll(logits, present.to(logits.dtype), reduction)
