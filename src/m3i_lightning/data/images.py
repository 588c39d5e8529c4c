"""Image files of any mode to the RGB pixels the views crop, or a :class:`BadSample`.

An :class:`EncodedImage` is a file read but not decoded: the views of a sample choose the scale.
A JPEG decodes at the largest DCT scale (1/2, 1/4 or 1/8 of each side: libjpeg's scaled inverse
DCT, for a fraction of the work) at which every crop keeps its view's resolution
(:func:`dct_scale`), and the views are cut from that 8-bit image (:class:`DecodedImage`).

Real collections hold grayscale scans, RGBA / palette PNGs with transparency, CMYK JPEGs and
16-bit medical or astronomy images. Each is mapped to what a viewer would show, so the model
never sees a silently wrong image: transparency is composited on white, 16-bit values are scaled
by their range instead of clipped to 255. Anything PIL cannot fully decode is a bad sample.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from m3i_lightning.data.skips import BadSample

IMAGE_EXTENSIONS = frozenset(
    {"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm"})

_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
DCT_SCALES = (8, 4, 2, 1)
RESAMPLING = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


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


def sample_name(data: bytes | str | os.PathLike | Image.Image, name: str | None) -> str:
    return name or (str(data) if isinstance(data, str | os.PathLike) else "<bytes>")


@contextlib.contextmanager
def readable(name: str) -> Iterator[None]:
    """Turn whatever PIL raises while reading image ``name`` into a :class:`BadSample`
    (``unreadable image``); a decompression bomb counts as unreadable too."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except UnidentifiedImageError:
        raise BadSample("unreadable image", f"{name}: not an image format PIL knows") from None
    except BadSample:
        raise
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct/zlib errors
        raise BadSample("unreadable image", f"{name}: {type(err).__name__}: {err}") from None


def open_image(data: bytes | str | os.PathLike | Image.Image, name: str | None,
               convert: Callable[[Image.Image], np.ndarray]) -> np.ndarray:
    """``convert`` of the fully decoded image ``data`` (what :func:`decode_image` and the
    segmentation masks share), or :class:`BadSample` (``unreadable image``) naming ``name``."""
    name = sample_name(data, name)
    with readable(name):
        if isinstance(data, Image.Image):
            image = data
        else:
            image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
        image.load()
        array = convert(image)
    if min(array.shape[:2]) == 0:
        raise BadSample("unreadable image", f"{name}: empty image")
    return array


def dct_scale(crops: Iterable[tuple[int, int, int]]) -> int:
    """The largest JPEG DCT scale (1, 2, 4 or 8: libjpeg decodes 1/scale of each side for
    almost nothing) at which every crop ``(height, width, size)`` in full-resolution pixels
    still has at least ``size`` pixels each way, so its ``size`` × ``size`` view is shrunk
    from the reduced image, never enlarged where the full one would not be."""
    smallest = min((min(height, width) / size for height, width, size in crops), default=1.0)
    return next(scale for scale in DCT_SCALES if scale <= max(smallest, 1.0))


class EncodedImage:
    """An image file read but not decoded: its size from the header, its pixels on demand at a
    reduced DCT scale (JPEG; other formats whole), converted as :func:`rgb_array` converts.

    Loader workers build views from it: one decode at the scale every view of the sample
    allows (:func:`dct_scale`), each view cropped and resized from the 8-bit image before
    anything turns to float. ``data`` is file bytes, a path or a PIL image; ``name`` labels
    the sample in a :class:`BadSample`. Nothing is read before it is asked for.
    """

    def __init__(self, data: bytes | str | os.PathLike | Image.Image,
                 name: str | None = None) -> None:
        self.data, self.name = data, sample_name(data, name)
        self._header: Image.Image | None = None
        self._size: tuple[int, int] | None = None

    def read(self) -> bytes:
        """The file's bytes (a path is read once)."""
        if isinstance(self.data, str | os.PathLike):
            with readable(self.name), open(self.data, "rb") as f:
                self.data = f.read()
        if isinstance(self.data, Image.Image):
            raise TypeError(f"{self.name} is a decoded PIL image, not a file")
        return self.data

    def _open(self) -> Image.Image:
        """The PIL image with only its header parsed."""
        if isinstance(self.data, Image.Image):
            return self.data
        data = self.read()
        with readable(self.name):
            return Image.open(io.BytesIO(data))

    @property
    def header(self) -> Image.Image:
        if self._header is None:
            self._header = self._open()
            width, height = self._header.size
            if min(width, height) == 0:
                raise BadSample("unreadable image", f"{self.name}: empty image")
            self._size = (height, width)
        return self._header

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) at full resolution, from the header."""
        if self._size is None:
            _ = self.header
        return self._size

    def is_complete_jpeg(self) -> bool:
        """A baseline or progressive RGB / grayscale JPEG (what nvJPEG decodes; CMYK / YCCK
        are not) that ends with its end-of-image marker: a file cut short is left to the
        workers' decoder, which reports it."""
        if isinstance(self.data, Image.Image):
            return False
        header = self.header
        return (header.format == "JPEG" and header.mode in ("RGB", "L")
                and self.read().rstrip(b"\0").endswith(b"\xff\xd9"))

    def decode(self, scale: int = 1) -> DecodedImage:
        """The image decoded at ``1/scale`` of each side where the format allows (JPEG's DCT
        scaling), else whole (scale 1)."""
        image = self.header
        self._header = None  # PIL decodes an opened image once
        with readable(self.name):
            if scale > 1 and image.format == "JPEG":
                height, width = self.size
                drafted = image.draft(None, (width // scale, height // scale))
                scale = round(width / drafted[1][2]) if drafted else 1
            else:
                scale = 1
            image.load()
            return DecodedImage(rgb_image(image), scale)

    def tensor(self) -> Tensor:
        """The whole image, float [3, H, W] in [0, 1] (as :func:`decode_image`)."""
        return self.decode().pixels.float().div_(255.0)


class DecodedImage:
    """An 8-bit RGB image decoded at 1/``scale`` of the full resolution (pixel i covers
    full-resolution pixels [i·scale, (i + 1)·scale)), cut into views by boxes of
    full-resolution pixels."""

    def __init__(self, image: Image.Image, scale: int) -> None:
        self.image, self.scale = image, scale
        self._pixels: Tensor | None = None

    @property
    def pixels(self) -> Tensor:
        """uint8 [3, h, w]."""
        if self._pixels is None:
            self._pixels = torch.from_numpy(np.array(self.image)).permute(2, 0, 1)
        return self._pixels

    def crop(self, box: tuple[int, int, int, int], size: int, mode: str = "bilinear") -> Tensor:
        """uint8 [3, size, size]: the ``box`` (top, left, height, width in full-resolution
        pixels) resized by ``mode`` (bilinear | bicubic), antialiased when it shrinks. At full
        resolution the box is cut out and resized (as torchvision's ``resized_crop``, by
        torch's 8-bit kernels); at a reduced scale its corners fall between pixels, and PIL
        resamples the fractional box as it is (a rounded box would shift the view by up to
        half a reduced pixel)."""
        top, left, height, width = box
        if self.scale == 1:
            return resize(self.pixels[:, top:top + height, left:left + width], size, mode)
        corners = (left / self.scale, top / self.scale, (left + width) / self.scale,
                   (top + height) / self.scale)
        view = self.image.resize((size, size), RESAMPLING[mode], box=corners)
        return torch.from_numpy(np.array(view)).permute(2, 0, 1)

    def whole(self, size: int) -> Tensor:
        """uint8 [3, size, size]: the whole image resized (bilinear, antialiased)."""
        return resize(self.pixels, size, "bilinear")


def resize(pixels: Tensor, size: int, mode: str) -> Tensor:
    """uint8 [3, H, W] → uint8 [3, size, size], antialiased when it shrinks."""
    return F.interpolate(pixels[None], size=(size, size), mode=mode, antialias=True)[0]


def rgb_image(image: Image.Image) -> Image.Image:
    """8-bit RGB of any PIL mode, as a viewer would display it."""
    if image.mode == "RGB":
        return image
    if image.mode in _HIGH_DEPTH_MODES:
        return Image.fromarray(high_depth_gray(image)).convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image.convert("RGB")


def rgb_array(image: Image.Image) -> np.ndarray:
    """uint8 [H, W, 3] of any PIL mode, as a viewer would display it."""
    return np.array(rgb_image(image), dtype=np.uint8)


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
