"""The two forms of P̂(z_y | ẑ_y) of the M3I unified view, as small modules objectives hold."""

from __future__ import annotations

from torch import Tensor, nn

from m3i_lightning import losses


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
    """−log softmax over a candidate set (classes, texts, negatives, prototypes)."""

    form = "Boltzmann"

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        return losses.boltzmann_nll(logits, target, self.label_smoothing, reduction)
