"""Training views rendered on the accelerator (``data.augment_on=device``).

A loader worker then only reads, and decodes where the device cannot: it ships each view's
random parameters, drawn from the sample's own stream exactly as the worker path draws its
crops (so a run stays a function of its seed and resumes step-exact), with the image as

- the JPEG file's bytes, when the device decodes JPEGs (nvJPEG, through
  ``torchvision.io.decode_jpeg(device="cuda")``): the CPU reads files and parses headers;
- else a uint8 image, decoded at the largest DCT scale that keeps ``data.decode_size``
  pixels each way and resized whole to ``decode_size`` (4× smaller than float views, and one
  image for all the views of a sample). Formats nvJPEG cannot read (PNG, CMYK JPEGs, …) take
  this way on a GPU too.

:func:`choose_decoder` picks where JPEGs decode when training starts and says why in one log
line. Inside the step (the data module's ``on_after_batch_transfer``, after the pinned batch
is copied without blocking) the crops, flips and colour augmentations of the whole batch run
as a few batched tensor operations.

Crops are torchvision's ``roi_align`` (bilinear, averaging ⌈crop / view⌉² samples per output
pixel when shrinking, a box-filter antialias); flip, grayscale, solarisation and normalisation
are torchvision's functional ops on the batch, kept per sample with ``torch.where``; jitter and
blur are :mod:`m3i_lightning.data.colour`'s per-sample formulas. On CUDA the views are
returned ``channels_last``, the layout cuDNN's convolutions (the patch embedding, the ConvNet
families) run fastest on; on CPU they stay contiguous.
"""

from __future__ import annotations

import io
import random
from collections.abc import Sequence

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.ops import roi_align

from m3i_lightning.core.errors import ConfigError, M3IError
from m3i_lightning.data.colour import recolour_batch
from m3i_lightning.data.images import EncodedImage
from m3i_lightning.data.views import CropSet, RandomView, blur_kernel

SOURCE_KEY = "source_image"  # uint8 [B, 3, D, D]: images the workers decoded
ENCODED_KEY = "source_files"  # per sample: JPEG bytes, or a uint8 [3, D, D] image decoded
NAMES_KEY = "source_names"  # in a worker; with the samples' names, for a skip report
LISTED_KEYS = (ENCODED_KEY, NAMES_KEY)  # kept as lists by the collate function


def device_fields(crops: CropSet, names: Sequence[str], image: Tensor | EncodedImage,
                  rng: random.Random) -> dict:
    """The worker's half: per view ``name`` its geometry (``{name}_geometry``, as the worker
    path gives it) and colour parameters (``{name}_colour``, only when the view has colour
    augmentations), and the image: ``source_files`` / ``source_names`` when the device
    decodes JPEGs (``crops.device_decodes``), else the uint8 ``source_image``."""
    if not names:
        return {}
    height, width = image.size if isinstance(image, EncodedImage) else image.shape[-2:]
    sample: dict = {}
    for name in names:
        view = crops.view_for(name)
        sample[f"{name}_geometry"] = view.draw(height, width, rng)[2]
        colour = view.draw_colour(rng)
        if colour is not None:
            sample[f"{name}_colour"] = colour
    if isinstance(image, EncodedImage) and crops.device_decodes:
        sample[ENCODED_KEY] = image.read() if image.is_complete_jpeg() else crops.source(image)
        sample[NAMES_KEY] = image.name
    else:
        sample[SOURCE_KEY] = crops.source(image)
    return sample


def choose_decoder(device: torch.device) -> tuple[bool, str]:
    """Whether JPEGs are decoded on ``device`` (nvJPEG) rather than in the loader workers,
    and why: only a CUDA device whose torchvision decodes a probe JPEG there does."""
    workers = "the loader workers decode images at reduced DCT scale and ship uint8 images"
    if device.type != "cuda":
        return False, f"views render on {device.type}, so {workers}"
    probe = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 120, 150)).save(probe, "JPEG")
    try:
        decode_jpeg(torch.frombuffer(bytearray(probe.getvalue()), dtype=torch.uint8),
                    device=device)
    except (RuntimeError, ValueError) as err:
        return False, f"torchvision cannot decode JPEGs on {device} ({err}), so {workers}"
    return True, (f"nvJPEG decodes JPEGs on {device}: the loader workers read files and ship "
                  "their bytes (other formats: decoded in the workers at reduced DCT scale)")


def render_batch(batch: dict, crops: CropSet) -> dict:
    """The device's half: every view the batch has parameters for, rendered from its source
    image; the source and colour parameters are dropped. A batch without a source image
    (the worker path, evaluation) is returned as it is."""
    if SOURCE_KEY in batch:
        images = TF.to_dtype(batch.pop(SOURCE_KEY), torch.float32, scale=True)
    elif ENCODED_KEY in batch:
        images = decode_sources(batch, crops.decode_size)
    else:
        return batch
    for name in crops.names:
        if f"{name}_geometry" in batch:
            views = render_view(images, batch[f"{name}_geometry"], crops.view_for(name),
                                batch.pop(f"{name}_colour", None))
            if views.is_cuda:
                views = views.contiguous(memory_format=torch.channels_last)
            batch[name] = views
    return batch


def decode_sources(batch: dict, size: int | None) -> Tensor:
    """The batch's images as float [B, 3, size, size] in [0, 1] on its device: JPEG bytes
    decoded there (together, else one by one when some fails), each resized whole to
    ``size``. A JPEG that does not decode is a skipped sample (``batch["skipped"]``): the
    sample is replaced by the batch's first good one, all its fields with it."""
    entries, names = batch.pop(ENCODED_KEY), batch.pop(NAMES_KEY)
    device = next(value.device for key, value in batch.items() if key.endswith("_geometry"))
    jpegs = [i for i, entry in enumerate(entries) if isinstance(entry, bytes)]
    images: list[Tensor | None] = list(entries)
    for i, image in zip(jpegs, decode_jpegs([entries[i] for i in jpegs], device), strict=True):
        images[i] = image
    good = next((i for i, image in enumerate(images) if image is not None), None)
    if good is None:
        raise M3IError(f"no image of a batch of {len(images)} could be decoded on {device}, "
                       f"e.g. {names[0]}")
    for i in (i for i, image in enumerate(images) if image is None):
        replace_sample(batch, i, good)
        images[i] = images[good]
        batch.setdefault("skipped", []).append(
            f"unreadable image: {names[i]}: nvJPEG could not decode it")
    resized = [resize_whole(image.to(device), size) for image in images]
    if len({image.shape for image in resized}) > 1:
        raise ConfigError("data.decode_size=null ships images as they are, but this batch's "
                          "differ in size: set data.decode_size")
    return torch.stack(resized)


def decode_jpegs(files: list[bytes], device: torch.device) -> list[Tensor | None]:
    """uint8 [3, H, W] of each JPEG decoded on ``device`` (None: it did not decode)."""
    data = [torch.frombuffer(bytearray(file), dtype=torch.uint8) for file in files]
    if not data:
        return []
    try:
        return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        decoded: list[Tensor | None] = []
        for one in data:
            try:
                decoded.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                decoded.append(None)
        return decoded


def resize_whole(image: Tensor, size: int | None) -> Tensor:
    """uint8 [3, H, W] → float [3, size, size] in [0, 1] (antialiased bilinear, as the
    workers resize)."""
    image = TF.to_dtype(image, torch.float32, scale=True)
    if size is None or image.shape[-2:] == (size, size):
        return image
    return TF.resize(image, [size, size], antialias=True).clamp(0, 1)


def replace_sample(batch: dict, target: int, source: int) -> None:
    """Every per-sample field of sample ``target`` set to sample ``source``'s."""
    for key, value in batch.items():
        if isinstance(value, dict):
            replace_sample(value, target, source)
        elif isinstance(value, Tensor) and value.dim() > 0:
            value[target] = value[source]
        elif isinstance(value, list) and key != "skipped":
            value[target] = value[source]


def render_view(images: Tensor, geometry: Tensor, view: RandomView,
                colour: dict | None) -> Tensor:
    """``images`` float [B, 3, H, W] in [0, 1], ``geometry`` [B, 5] → normalised views
    [B, 3, size, size]: crop, flip, then the colour augmentations in the worker's order."""
    views = crop(images, geometry, view.size)
    flipped = geometry[:, 4].bool()[:, None, None, None]
    views = torch.where(flipped, TF.horizontal_flip(views), views)
    if colour is not None:
        views = recolour_batch(views, colour, blur_kernel(views.shape[-1]))
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


class DeviceViews:
    """Data-module hook of the device path: Lightning calls it on every batch after the copy
    to the device, in training, validation and prediction alike (batches without a source
    image pass through). The data module keeps its :class:`CropSet` as ``self.view``."""

    view: CropSet

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        return render_batch(batch, self.view) if isinstance(batch, dict) else batch
