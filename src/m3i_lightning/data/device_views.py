"""Training views rendered on the accelerator (``data.augment_on=device``).

A loader worker then only decodes: it ships the uint8 image (4× smaller than float views, and
one image for all the views of a sample) and each view's random parameters, drawn from the
sample's own stream exactly as the worker path draws its crops, so a run stays a function of
its seed and resumes step-exact. Inside the step (the data module's ``on_after_batch_transfer``,
after the pinned batch is copied without blocking) the crops, flips and colour augmentations
of the whole batch run as a few batched tensor operations.

Crops are torchvision's ``roi_align`` (bilinear, averaging ⌈crop / view⌉² samples per output
pixel when shrinking, a box-filter antialias); flip, grayscale, solarisation and normalisation
are torchvision's functional ops on the batch, kept per sample with ``torch.where``. Colour
jitter and blur take one factor or σ per sample, which torchvision's ops do not (they take one
number per call): they are written here as the same formulas with the factor broadcast
(blend with black / the mean grey / the grey image; torchvision's HSV conversion for the hue;
a separable Gaussian of each sample's σ as a grouped convolution). On CUDA the views are
returned ``channels_last``, the layout cuDNN's convolutions (the patch embedding, the ConvNet
families) run fastest on; on CPU they stay contiguous.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torchvision.ops import roi_align
from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv

from m3i_lightning.data.views import CropSet, Photometric, RandomView, blur_kernel

SOURCE_KEY = "source_image"
IDENTITY_FACTORS = (1.0, 1.0, 1.0, 0.0)  # brightness, contrast, saturation, hue


def device_fields(crops: CropSet, names: Sequence[str], image: Tensor,
                  rng: random.Random) -> dict:
    """The worker's half: the uint8 source image and, per view ``name``, its geometry
    (``{name}_geometry``, as the worker path gives it) and colour parameters
    (``{name}_colour``, only when the view has colour augmentations)."""
    if not names:
        return {}
    sample: dict = {SOURCE_KEY: crops.source(image)}
    for name in names:
        geometry, colour = crops.view_for(name).draw_for_device(image, rng)
        sample[f"{name}_geometry"] = geometry
        if colour is not None:
            sample[f"{name}_colour"] = colour
    return sample


def render_batch(batch: dict, crops: CropSet) -> dict:
    """The device's half: every view the batch has parameters for, rendered from its source
    image; the source and colour parameters are dropped. A batch without a source image
    (the worker path, evaluation) is returned as it is."""
    if SOURCE_KEY not in batch:
        return batch
    images = TF.to_dtype(batch.pop(SOURCE_KEY), torch.float32, scale=True)
    for name in crops.names:
        if f"{name}_geometry" in batch:
            views = render_view(images, batch[f"{name}_geometry"], crops.view_for(name),
                                batch.pop(f"{name}_colour", None))
            if views.is_cuda:
                views = views.contiguous(memory_format=torch.channels_last)
            batch[name] = views
    return batch


def render_view(images: Tensor, geometry: Tensor, view: RandomView,
                colour: dict | None) -> Tensor:
    """``images`` float [B, 3, H, W] in [0, 1], ``geometry`` [B, 5] → normalised views
    [B, 3, size, size]: crop, flip, then the colour augmentations in the worker's order."""
    views = crop(images, geometry, view.size)
    flipped = geometry[:, 4].bool()[:, None, None, None]
    views = torch.where(flipped, TF.horizontal_flip(views), views)
    if colour is not None:
        views = recolour(views, colour, view.colours)
    return view.normalize(views)


def crop(images: Tensor, geometry: Tensor, size: int) -> Tensor:
    """Resized crops [B, 3, size, size] of the boxes (top, left, height, width fractions)."""
    height, width = images.shape[-2:]
    top, left, box_h, box_w = (g * s for g, s in zip(
        geometry[:, :4].to(images.dtype).unbind(-1), (height, width, height, width),
        strict=True))
    index = torch.arange(len(images), device=images.device, dtype=images.dtype)
    boxes = torch.stack([index, left, top, left + box_w, top + box_h], dim=-1)
    return roi_align(images, boxes, size, sampling_ratio=-1, aligned=True).clamp(0, 1)


def recolour(views: Tensor, colour: dict, photometric: Photometric) -> Tensor:
    """Colour jitter, grayscale, blur and solarisation, each where the sample drew it."""
    def chosen(key: str) -> Tensor:
        return colour[key].bool()[:, None, None, None]

    views = jitter(views, colour)
    views = torch.where(chosen("grayscale"), TF.rgb_to_grayscale(views, 3), views)
    blurred = blur(views, colour["sigma"], blur_kernel(views.shape[-1]))
    views = torch.where(chosen("blur"), blurred, views)
    solarized = TF.solarize(views, photometric.SOLARIZE_THRESHOLD)
    return torch.where(chosen("solarize"), solarized, views)


def jitter(views: Tensor, colour: dict) -> Tensor:
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


def blend(image: Tensor, other: Tensor, ratio: Tensor) -> Tensor:
    return (ratio * image + (1 - ratio) * other).clamp(0, 1)


def adjust_brightness(views: Tensor, factor: Tensor) -> Tensor:
    return blend(views, torch.zeros_like(views), factor)


def adjust_contrast(views: Tensor, factor: Tensor) -> Tensor:
    grey = TF.rgb_to_grayscale(views).mean(dim=(-3, -2, -1), keepdim=True)
    return blend(views, grey, factor)


def adjust_saturation(views: Tensor, factor: Tensor) -> Tensor:
    return blend(views, TF.rgb_to_grayscale(views), factor)


def adjust_hue(views: Tensor, factor: Tensor) -> Tensor:
    hue, saturation, value = _rgb_to_hsv(views).unbind(dim=-3)
    hue = (hue + factor[:, 0]).remainder(1.0)
    return _hsv_to_rgb(torch.stack([hue, saturation, value], dim=-3))


ADJUSTMENTS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def blur(views: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Gaussian blur of each view with its own σ [B]: a separable kernel per sample (weights
    ∝ exp(−d² / 2σ²) over the integer offsets d, as torchvision's), reflect padding."""
    b, c, h, w = views.shape
    offsets = torch.arange(kernel_size, device=views.device, dtype=views.dtype)
    offsets = offsets - (kernel_size - 1) / 2
    kernels = torch.softmax(-offsets.pow(2) / (2 * sigma.to(views.dtype)[:, None] ** 2), -1)
    kernels = kernels[:, None].expand(b, c, kernel_size).reshape(b * c, kernel_size)
    pad = kernel_size // 2
    x = F.pad(views.reshape(1, b * c, h, w), (pad, pad, pad, pad), mode="reflect")
    x = F.conv2d(x, kernels[:, None, :, None], groups=b * c)
    x = F.conv2d(x, kernels[:, None, None, :], groups=b * c)
    return x.reshape(b, c, h, w)


class DeviceViews:
    """Data-module hook of the device path: Lightning calls it on every batch after the copy
    to the device, in training, validation and prediction alike (batches without a source
    image pass through). The data module keeps its :class:`CropSet` as ``self.view``."""

    view: CropSet

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        return render_batch(batch, self.view) if isinstance(batch, dict) else batch
