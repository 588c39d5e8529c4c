"""The fine-tuning training view: timm's ImageNet recipe transform in place of the
pre-training crop, so every data module serves fine-tuning batches unchanged.

A data module builds its samples through ``view(name, image, rng)`` for each of
``view.names`` (training) and ``view.center(image)`` (evaluation), as for a
:class:`~m3i_lightning.data.views.CropSet`; :class:`RecipeView` keeps that interface, so it
works for map-style data and for streams alike. Its random draws (crop, RandAugment, random erasing)
come from the sample's own ``rng``, so the run stays reproducible whatever the worker count.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
import torchvision.transforms.v2.functional as TF
from timm.data import create_transform
from torch import Tensor

from m3i_lightning.core.seeding import seeded_globals
from m3i_lightning.data.views import IDENTITY_GEOMETRY, CropSet


class RecipeView:
    """``timm.data.create_transform(is_training=True)``: random resized crop, flip,
    RandAugment (``auto_augment``, e.g. ``rand-m9-mstd0.5-inc1``; None: off), normalisation
    and random erasing (``reprob``); the evaluation view is ``eval_view``'s (resize, normalise),
    as for kNN and probes. Normalised like the pre-training views (mean and std of
    ``eval_view``). One training view, ``view1``."""

    names = ("view1",)
    on_device = False  # timm's pipeline runs in the loader workers

    def __init__(self, crops: CropSet, crop_scale: Sequence[float] = (0.08, 1.0),
                 hflip: float = 0.5, auto_augment: str | None = None, reprob: float = 0.0,
                 remode: str = "pixel", interpolation: str = "bicubic") -> None:
        eval_view = self.eval_view = crops.views["view1"]
        self.transform = create_transform(
            eval_view.size, is_training=True, scale=tuple(crop_scale), hflip=hflip,
            color_jitter=None, auto_augment=auto_augment or None, interpolation=interpolation,
            mean=tuple(eval_view.mean), std=tuple(eval_view.std), re_prob=reprob,
            re_mode=remode)
        self.geometry = torch.tensor(IDENTITY_GEOMETRY)

    def __call__(self, name: str, image: Tensor, rng: random.Random) -> tuple[Tensor, Tensor]:
        """``image`` float [3, H, W] in [0, 1] → (augmented view, a placeholder geometry: the
        crop is not tracked, fine-tuning reads no geometry)."""
        with seeded_globals(rng):
            view = self.transform(TF.to_pil_image(image.clamp(0, 1)))
        return view, self.geometry

    def center(self, image: Tensor) -> Tensor:
        return self.eval_view.center(image)
