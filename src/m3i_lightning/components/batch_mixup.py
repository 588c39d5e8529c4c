"""Mixup / CutMix of a labelled batch, as DeiT trains: timm's ``Mixup`` in batch mode, shared
by the supervised objective ``cls`` and by fine-tuning."""

from __future__ import annotations

from timm.data import Mixup
from torch import Tensor

from m3i_lightning.core.errors import ConfigError


class BatchMixup:
    """One draw per batch: with probability ``switch_prob`` CutMix (a box of the image pasted
    from its partner, λ from Beta(``cutmix``, ``cutmix``), corrected to the box's area), else
    Mixup (λ from Beta(``mixup``, ``mixup``)); an alpha of 0 turns that one off. Image i's
    partner is image B − 1 − i (the batch reversed); the targets are λ·one-hot(own label) +
    (1 − λ)·one-hot(partner's), smoothed by ``smoothing``. timm draws λ from NumPy's stream
    and the box from NumPy's and Python's."""

    def __init__(self, mixup: float, cutmix: float, num_classes: int,
                 switch_prob: float = 0.5, smoothing: float = 0.0) -> None:
        self.mix = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, switch_prob=switch_prob,
                         label_smoothing=smoothing, num_classes=num_classes)

    def __call__(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """``images`` [B, ...] (mixed in place), ``labels`` [B] → (images, soft targets [B, C])."""
        if len(labels) % 2:
            raise ConfigError(f"mixup / cutmix pair the images of a batch: the per-rank batch "
                              f"size must be even, got {len(labels)}")
        return self.mix(images, labels)
