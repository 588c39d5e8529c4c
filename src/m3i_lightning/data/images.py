"""Image files of any mode to the RGB float tensors the views crop, or a :class:`BadSample`.

Real collections hold grayscale scans, RGBA / palette PNGs with transparency, CMYK JPEGs and
16-bit medical or astronomy images. Each is mapped to what a viewer would show, so the model
never sees a silently wrong image: transparency is composited on white, 16-bit values are scaled
by their range instead of clipped to 255. Anything PIL cannot fully decode is a bad sample.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from m3i_lightning.data.skips import BadSample

IMAGE_EXTENSIONS = frozenset(
    {"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm"})

_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def is_image_name(name: str) -> bool:
    """Whether a file name has an image extension (case-insensitive)."""
    return name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS


def decode_image(data: bytes | str | os.PathLike | Image.Image, name: str | None = None) -> Tensor:
    """``data`` (file bytes, a path or a PIL image) → float [3, H, W] in [0, 1].

    The whole image is decoded here, so a truncated file fails now and not inside a crop.
    Raises :class:`BadSample` (reason ``unreadable image``) for anything that is not a
    complete, decodable image; ``name`` labels the sample in that message.
    """
    array = open_image(data, name, rgb_array)
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)


def open_image(data: bytes | str | os.PathLike | Image.Image, name: str | None,
               convert: Callable[[Image.Image], np.ndarray]) -> np.ndarray:
    """``convert`` of the fully decoded image ``data`` (what :func:`decode_image` and the
    segmentation masks share), or :class:`BadSample` (``unreadable image``) naming ``name``."""
    name = name or (str(data) if isinstance(data, str | os.PathLike) else "<bytes>")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if isinstance(data, Image.Image):
                image = data
            else:
                image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
            image.load()
            array = convert(image)
    except UnidentifiedImageError:
        raise BadSample("unreadable image", f"{name}: not an image format PIL knows") from None
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct/zlib errors
        raise BadSample("unreadable image", f"{name}: {type(err).__name__}: {err}") from None
    if min(array.shape[:2]) == 0:
        raise BadSample("unreadable image", f"{name}: empty image")
    return array


def rgb_array(image: Image.Image) -> np.ndarray:
    """uint8 [H, W, 3] of any PIL mode, as a viewer would display it."""
    if image.mode in _HIGH_DEPTH_MODES:
        return np.repeat(high_depth_gray(image)[..., None], 3, axis=-1)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return np.array(image.convert("RGB"), dtype=np.uint8)


def high_depth_gray(image: Image.Image) -> np.ndarray:
    """uint8 [H, W] of a 16-bit, 32-bit integer or float grayscale image: 16-bit modes are
    scaled by 65535, 32-bit integers by 65535 when they exceed 8 bits (PIL opens some 16-bit
    files so), floats by their own range."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        low, high = (values.min(), values.max()) if values.size else (0.0, 1.0)
        values = (values - low) / max(high - low, 1e-12)
    elif image.mode.startswith("I;16") or values.max(initial=0) > 255:
        values = values / 65535.0
    else:
        values = values / 255.0
    return np.clip(values * 255.0, 0, 255).round().astype(np.uint8)
