"""The fine-tuning training view: timm's ImageNet recipe transform in place of the
pre-training crop, so every data module serves fine-tuning batches unchanged.

A data module builds its samples through ``view(image, rng)`` (training) and
``view.center(image)`` (evaluation); :class:`RecipeView` keeps that interface, so it works for
map-style data and for streams alike. Its random draws (crop, RandAugment, random erasing)
come from the sample's own ``rng``, so the run stays reproducible whatever the worker count.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from timm.data import create_transform
from torch import Tensor

from m3i_lightning.data.views import IDENTITY_GEOMETRY, RandomView


@contextlib.contextmanager
def seeded_globals(rng: random.Random):
    """Run the block with Python's, NumPy's and torch's global generators seeded from
    ``rng`` (timm's transforms draw from all three), then restore them."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(rng.getrandbits(64))
    np.random.seed(rng.getrandbits(32))
    torch.default_generator.manual_seed(rng.getrandbits(63))  # the CPU stream alone: cheap
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


class RecipeView:
    """``timm.data.create_transform(is_training=True)``: random resized crop, flip,
    RandAugment (``auto_augment``, e.g. ``rand-m9-mstd0.5-inc1``; None: off), normalisation
    and random erasing (``reprob``); the evaluation view is ``eval_view``'s (resize, normalise),
    as for kNN and probes. Normalised like the pre-training views (mean and std of
    ``eval_view``)."""

    def __init__(self, eval_view: RandomView, crop_scale: Sequence[float] = (0.08, 1.0),
                 hflip: float = 0.5, auto_augment: str | None = None, reprob: float = 0.0,
                 remode: str = "pixel", interpolation: str = "bicubic") -> None:
        self.eval_view = eval_view
        self.transform = create_transform(
            eval_view.size, is_training=True, scale=tuple(crop_scale), hflip=hflip,
            color_jitter=None, auto_augment=auto_augment or None, interpolation=interpolation,
            mean=tuple(eval_view.mean), std=tuple(eval_view.std), re_prob=reprob,
            re_mode=remode)
        self.geometry = torch.tensor(IDENTITY_GEOMETRY)

    def __call__(self, image: Tensor, rng: random.Random) -> tuple[Tensor, Tensor]:
        """``image`` float [3, H, W] in [0, 1] → (augmented view, a placeholder geometry: the
        crop is not tracked, fine-tuning reads no geometry)."""
        with seeded_globals(rng):
            view = self.transform(TF.to_pil_image(image.clamp(0, 1)))
        return view, self.geometry

    def center(self, image: Tensor) -> Tensor:
        return self.eval_view.center(image)
