"""Colour augmentations of :class:`~m3i_lightning.data.views.Photometric` as tensor formulas
that take each sample's own parameters.

torchvision's colour operations take one number per call, and its Gaussian blur convolves a
full 2-D kernel (a 23 × 23 kernel is most of a 224 px view's cost on a CPU). Here the same
formulas take a factor or σ per sample (blend with black / the mean grey / the grey image;
the HSV hue shift; a separable Gaussian as shifted sums), so the device renders a whole batch
with them (``data.augment_on=device``) and a loader worker the views of one image file; both
draw their parameters with :meth:`~m3i_lightning.data.views.Photometric.draw`, from
torchvision's distributions, and agree with torchvision's transforms (the reference recipe)
within float rounding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import Tensor

IDENTITY_FACTORS = (1.0, 1.0, 1.0, 0.0)  # brightness, contrast, saturation, hue
HUE_OFFSETS = (5.0, 3.0, 1.0)  # red, green, blue: where each channel sits on the hue hexagon
SOLARIZE_THRESHOLD = 0.5

Factor = Tensor | float  # per sample: [B, 1, 1, 1]; or one number for a single sample


def blend(image: Tensor, other: Tensor, ratio: Factor) -> Tensor:
    return (ratio * image + (1 - ratio) * other).clamp(0, 1)


def adjust_brightness(views: Tensor, factor: Factor) -> Tensor:
    return (views * factor).clamp(0, 1)  # a blend with black


def adjust_contrast(views: Tensor, factor: Factor) -> Tensor:
    grey = TF.rgb_to_grayscale(views).mean(dim=(-3, -2, -1), keepdim=True)
    return blend(views, grey, factor)


def adjust_saturation(views: Tensor, factor: Factor) -> Tensor:
    return blend(views, TF.rgb_to_grayscale(views), factor)


def adjust_hue(views: Tensor, factor: Factor) -> Tensor:
    """torchvision's hue shift (the HSV hue turned by ``factor`` of a turn, value and saturation
    kept) in one pass, without the round trip through HSV: a pixel of maximum M, minimum m and
    hue H (in sixths of a turn) has channel c = M − (M − m)·clamp(min(k, 4 − k), 0, 1),
    k = (H + offset_c) mod 6, offsets 5, 3, 1 for red, green and blue; the shift adds to H.
    A tie for the maximum goes to red, then green, as in torchvision's conversion."""
    red, green, blue = views.unbind(-3)
    high, low = views.amax(-3), views.amin(-3)
    chroma = high - low
    inverse = 1.0 / chroma.clamp_min(1e-12)  # grey pixels (no chroma) keep their value
    is_red = (red == high).to(views.dtype)
    is_green = (green == high).to(views.dtype) * (1 - is_red)
    is_blue = 1 - is_red - is_green
    sixths = ((is_red * (green - blue) + is_green * (blue - red) + is_blue * (red - green))
              * inverse + 2 * is_green + 4 * is_blue)
    offsets = torch.tensor(HUE_OFFSETS, device=views.device, dtype=views.dtype)[:, None, None]
    k = sixths.unsqueeze(-3) + 6 * factor + offsets  # factor [B, 1, 1, 1] or one number
    k = k - 6 * torch.floor(k / 6)
    return high.unsqueeze(-3) - chroma.unsqueeze(-3) * torch.minimum(k, 4 - k).clamp(0, 1)


ADJUSTMENTS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def gaussian_blur(views: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Each view [B, C, H, W] blurred with its own σ [B]: torchvision's separable kernel
    (weights ∝ exp(−d² / 2σ²) over the integer offsets d), reflect padding, as a sum of
    shifted copies along each axis (no 2-D convolution)."""
    offsets = torch.arange(kernel_size, device=views.device, dtype=views.dtype)
    offsets = offsets - (kernel_size - 1) / 2
    weights = torch.softmax(-offsets.pow(2) / (2 * sigma.to(views.dtype)[:, None] ** 2), -1)
    weights = weights.T.reshape(kernel_size, -1, 1, 1, 1)
    height, width = views.shape[-2:]
    pad = kernel_size // 2
    padded = F.pad(views, (pad, pad, pad, pad), mode="reflect")
    rows = padded[..., :width] * weights[0]
    for tap in range(1, kernel_size):
        rows.addcmul_(padded[..., tap:tap + width], weights[tap])
    out = rows[..., :height, :] * weights[0]
    for tap in range(1, kernel_size):
        out.addcmul_(rows[..., tap:tap + height, :], weights[tap])
    return out


def kernel_within(sigma: float, kernel_size: int) -> int:
    """The taps of a ``kernel_size`` Gaussian of ``sigma`` within 4σ of its centre: those
    beyond weigh less than 1e-4 of the kernel together, so no 8-bit value changes."""
    return min(kernel_size, 2 * math.ceil(4 * sigma) + 1)


def recolour_batch(views: Tensor, colour: dict, kernel_size: int) -> Tensor:
    """Colour jitter, grayscale, blur and solarisation of a batch [B, 3, S, S], each where its
    sample drew it (batched: every operation runs on the whole batch and ``torch.where``
    keeps it per sample, so the device never waits on a value)."""
    def chosen(key: str) -> Tensor:
        return colour[key].bool()[:, None, None, None]

    views = jitter_batch(views, colour)
    views = torch.where(chosen("grayscale"), TF.rgb_to_grayscale(views, 3), views)
    blurred = gaussian_blur(views, colour["sigma"], kernel_size)
    views = torch.where(chosen("blur"), blurred, views)
    solarized = TF.solarize(views, SOLARIZE_THRESHOLD)
    return torch.where(chosen("solarize"), solarized, views)


def jitter_batch(views: Tensor, colour: dict) -> Tensor:
    """ColorJitter with each sample's factors and order: at every position of the order, each
    adjustment runs with the sample's factor where the sample puts it there and the identity
    factor elsewhere; samples that drew no jitter get identity factors throughout."""
    identity = torch.tensor(IDENTITY_FACTORS, device=views.device, dtype=views.dtype)
    factors = torch.where(colour["jitter"].bool()[:, None], colour["factors"].to(views.dtype),
                          identity)
    for position in range(4):
        for op, adjust in enumerate(ADJUSTMENTS):
            here = colour["order"][:, position] == op
            factor = torch.where(here, factors[:, op], identity[op])
            views = adjust(views, factor[:, None, None, None])
    return views


def recolour(view: Tensor, colour: dict, kernel_size: int) -> Tensor:
    """The same operations on one view [1, 3, S, S] and its own draw, running only those it
    drew (what a loader worker pays), the blur with :func:`kernel_within` taps."""
    if colour["jitter"]:
        factors = colour["factors"].tolist()
        for op in colour["order"].tolist():
            if factors[op] != IDENTITY_FACTORS[op]:
                view = ADJUSTMENTS[op](view, factors[op])
    if colour["grayscale"]:
        view = TF.rgb_to_grayscale(view, 3)
    if colour["blur"]:
        sigma = float(colour["sigma"])
        view = gaussian_blur(view, colour["sigma"].reshape(1).to(view.dtype),
                             kernel_within(sigma, kernel_size))
    if colour["solarize"]:
        view = TF.solarize(view, SOLARIZE_THRESHOLD)
    return view
