"""The embedded segmentation data: scenes of handwritten digits on textured backgrounds.

Each scene pastes one to ``max_digits`` of the embedded digits (the same train / val split as
``data=embedded``), each at a random size, place and colour, onto a random texture (two
coloured sine gratings and noise). Its mask gives every pixel the class digit + 1 where a digit
is drawn and 0 (background) elsewhere. A pixel's colour says little about its class: a probe
must recognise the digit's shape, which a patch token only knows through its context.
Scenes are drawn from a generator seeded by the split, so every run sees the same ones.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from m3i_lightning.data.embedded import DIGIT_NAMES, EmbeddedDigits

NUM_CLASSES = len(DIGIT_NAMES) + 1  # background and the ten digits
INK_THRESHOLD = 0.5  # digit intensity above which a pixel belongs to the digit
SPLIT_SEEDS = {"train": 0, "val": 1}
# Textures stay darker than any digit (whose colour channels lie in [0.6, 1]): a pixel's
# brightness tells digit from background, only the shape tells which digit.
BACKGROUND_BRIGHTNESS, MIN_INK_COLOUR = 0.45, 0.6


def texture(size: int, generator: torch.Generator) -> Tensor:
    """[3, size, size] in [0, 1]: two sine gratings of random frequency, angle and colour,
    plus pixel noise."""
    ys, xs = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(),
                            indexing="ij")
    image = torch.rand(3, 1, 1, generator=generator) * 0.5 + 0.25
    for _ in range(2):
        angle, phase = torch.rand(2, generator=generator) * 2 * math.pi
        frequency = (0.1 + 0.4 * torch.rand((), generator=generator)) * 2 * math.pi / 4
        grating = torch.sin(frequency * (xs * angle.cos() + ys * angle.sin()) + phase)
        image = image + 0.25 * (torch.rand(3, 1, 1, generator=generator) - 0.5) * 2 * grating
    image = image + 0.05 * torch.randn(3, size, size, generator=generator)
    return image.clamp(0, 1) * BACKGROUND_BRIGHTNESS


def digit_scenes(split: str, count: int, size: int, max_digits: int = 3,
                 val_fraction: float = 0.2, split_seed: int = 0) -> tuple[Tensor, Tensor]:
    """``count`` scenes of ``size`` px drawn from the digits of ``split``: images
    [count, 3, size, size] in [0, 1] and masks [count, size, size] (long class ids)."""
    digits = EmbeddedDigits(source_size=8, val_fraction=val_fraction, split_seed=split_seed,
                            captions=False)
    digits.setup()
    source = digits.source(split)
    generator = torch.Generator().manual_seed(1000 * split_seed + SPLIT_SEEDS[split])
    images = torch.empty(count, 3, size, size)
    masks = torch.zeros(count, size, size, dtype=torch.long)
    for i in range(count):
        image = texture(size, generator)
        for _ in range(int(torch.randint(1, max_digits + 1, (), generator=generator))):
            digit, label, _ = source[int(torch.randint(len(source), (), generator=generator))]
            side = int(torch.randint(size // 2, size * 3 // 4 + 1, (), generator=generator))
            ink = F.interpolate(digit[:1].unsqueeze(0), size=side, mode="bilinear",
                                align_corners=False)[0].clamp(0, 1)
            top, left = torch.randint(size - side + 1, (2,), generator=generator).tolist()
            colour = MIN_INK_COLOUR + (1 - MIN_INK_COLOUR) * torch.rand(3, 1, 1,
                                                                        generator=generator)
            window = image[:, top:top + side, left:left + side]
            window.mul_(1 - ink).add_(colour * ink)
            masks[i, top:top + side, left:left + side][ink[0] > INK_THRESHOLD] = label + 1
        images[i] = image
    return images, masks
