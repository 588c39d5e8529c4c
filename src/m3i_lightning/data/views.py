"""Random crops of one image that remember where they came from.

Inter-view objectives must know the relative transform between the two views, so each crop
returns its geometry: (top, left, height, width) as fractions of the source image, and a flip
flag. With it a decoder query can be placed at the location of the other view it predicts.

Two renderings draw from the same distributions. An image already in memory as a float tensor
(the embedded digits) goes through the reference recipe: torchvision's ``resized_crop`` and
v2 transforms (:meth:`RandomView.__call__`). An image file (:class:`~m3i_lightning.data.images.
EncodedImage`) goes the short way (:meth:`CropSet.render`): every view of the sample is drawn
first, the file is decoded once at the largest DCT scale all of them allow, each view is
cropped and resized in one 8-bit resampling, and only the view turns float, for the colour
augmentations (:mod:`m3i_lightning.data.colour`) and the normalisation.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from PIL import Image
from timm.data.auto_augment import rand_augment_transform
from timm.data.random_erasing import RandomErasing
from torch import Tensor

from m3i_lightning.core.seeding import seeded_globals
from m3i_lightning.core.views import GLOBAL_VIEWS, local_view_names
from m3i_lightning.data.colour import SOLARIZE_THRESHOLD, recolour
from m3i_lightning.data.images import DecodedImage, EncodedImage, dct_scale

IDENTITY_GEOMETRY = (0.0, 0.0, 1.0, 1.0, 0.0)
# ``data.augment_on``: where the crops and colour augmentations of training views run. ``device``:
# the worker ships the uint8 image and each view's parameters; m3i_lightning.data.device_views
# renders them batched on the accelerator.
AUGMENT_ON = ("workers", "device")
# ``data.interpolation``: how a training crop is resampled to the view's size, antialiased when
# it shrinks. DeiT and DeiT III resize bicubically (timm's RandomResizedCropAndInterpolation).
INTERPOLATIONS = {"bilinear": T.InterpolationMode.BILINEAR,
                  "bicubic": T.InterpolationMode.BICUBIC}


def crop_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
             rng: random.Random) -> tuple[int, int, int, int]:
    """Inception-style random resized crop box (top, left, h, w) in pixels."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


def blur_kernel(size: int) -> int:
    """Gaussian blur kernel of a ``size`` px view: odd, a tenth of the view (BYOL's)."""
    return max(3, int(0.1 * size) // 2 * 2 + 1)


@dataclass(frozen=True)
class Photometric:
    """The colour augmentations of one view, as the instance-discrimination papers tabulate
    them (BYOL's Table 6): colour jitter (brightness, contrast, saturation, hue) with
    probability ``jitter_p``, grayscale, Gaussian blur (σ in [0.1, 2], a kernel a tenth of
    the view) and solarisation, each with its probability; torchvision v2 transforms."""

    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    solarize_p: float = 0.0
    erasing: float = 0.0  # random erasing after normalisation: none in these pipelines

    BLUR_SIGMA = (0.1, 2.0)
    SOLARIZE_THRESHOLD = SOLARIZE_THRESHOLD

    def transform(self, size: int, mean: tuple[float, ...]) -> T.Transform:
        return T.Compose([
            T.RandomApply([T.ColorJitter(*self.jitter)], p=self.jitter_p),
            T.RandomGrayscale(self.grayscale_p),
            T.RandomApply([T.GaussianBlur(blur_kernel(size), sigma=self.BLUR_SIGMA)],
                          p=self.blur_p),
            T.RandomSolarize(self.SOLARIZE_THRESHOLD, p=self.solarize_p),
        ])

    def draw(self, rng: random.Random) -> dict[str, Tensor]:
        """This view's colour parameters from the sample's stream, for the formulas of
        :mod:`m3i_lightning.data.colour` (on the device or in a loader worker), from the
        distributions torchvision's transforms draw from: each jitter factor uniform in
        [max(0, 1 − x), 1 + x] (hue in [−h, h]), the four adjustments in a random order, σ
        uniform in ``BLUR_SIGMA``."""
        *gains, hue = self.jitter
        factors = [rng.uniform(max(0.0, 1 - g), 1 + g) for g in gains] + [rng.uniform(-hue, hue)]
        return {"jitter": torch.tensor(rng.random() < self.jitter_p),
                "factors": torch.tensor(factors),
                "order": torch.tensor(rng.sample(range(4), 4)),
                "grayscale": torch.tensor(rng.random() < self.grayscale_p),
                "blur": torch.tensor(rng.random() < self.blur_p),
                "sigma": torch.tensor(rng.uniform(*self.BLUR_SIGMA)),
                "solarize": torch.tensor(rng.random() < self.solarize_p)}


@dataclass(frozen=True)
class RandAugment:
    """DeiT's augmentations of a view: timm's RandAugment ``policy`` (``rand-m9-mstd0.5-inc1``:
    two operations per image at magnitude 9 ± N(0, 0.5), severity rising with it), on the
    crop as an 8-bit image with bicubic affine operations, filled with the normalisation mean,
    as timm's ``create_transform`` builds it; then timm's random erasing with probability
    ``erasing`` (one box of per-pixel normal noise) on the normalised view. The affine
    operations move the content inside the crop: the geometry stays the crop's."""

    policy: str = "rand-m9-mstd0.5-inc1"
    erasing: float = 0.25

    def transform(self, size: int, mean: tuple[float, ...]) -> T.Transform:
        hparams = dict(translate_const=int(size * 0.45),
                       img_mean=tuple(min(255, round(255 * m)) for m in mean),
                       interpolation=Image.BICUBIC)
        return T.Compose([T.ToPILImage(), rand_augment_transform(self.policy, hparams),
                          T.PILToTensor(), T.ToDtype(torch.float32, scale=True)])


@dataclass(frozen=True)
class ThreeAugment:
    """DeiT III's 3-Augment: one of grayscale, solarisation and Gaussian blur (σ in [0.1, 2],
    a kernel a tenth of the view), chosen uniformly for each image, then colour jitter
    (brightness, contrast, saturation ``jitter``, no hue) every time; torchvision v2."""

    jitter: float = 0.3
    erasing: float = 0.0  # DeiT III turns random erasing off

    def transform(self, size: int, mean: tuple[float, ...]) -> T.Transform:
        return T.Compose([
            T.RandomChoice([T.Grayscale(3), T.RandomSolarize(0.5, p=1.0),
                            T.GaussianBlur(blur_kernel(size), sigma=(0.1, 2.0))]),
            T.ColorJitter(self.jitter, self.jitter, self.jitter),
        ])


ViewAugment = Photometric | RandAugment | ThreeAugment

# ``data.augment``: per view, the augmentations of a reference pipeline. ``byol`` is BYOL's
# asymmetric pair (blur always on view1; rarely, with solarisation, on view2), which MoCo v3,
# Barlow Twins and DINO (local crops: blur half the time) share; ``mocov2`` is the symmetric
# MoCo v2 pipeline DenseCL uses; ``deit`` (RandAugment, random erasing) and ``three_augment``
# (DeiT III) are the supervised recipes', the same on every view.
VIEWS = ("view1", "view2", "local")
AUGMENTATIONS: dict[str, dict[str, ViewAugment]] = {
    "none": {},
    "byol": {"view1": Photometric(blur_p=1.0), "view2": Photometric(blur_p=0.1, solarize_p=0.2),
             "local": Photometric(blur_p=0.5)},
    "mocov2": {name: Photometric(jitter=(0.4, 0.4, 0.4, 0.1), blur_p=0.5) for name in VIEWS},
    "deit": {name: RandAugment() for name in VIEWS},
    "three_augment": {name: ThreeAugment() for name in VIEWS},
}


class RandomView:
    """One augmented view: random resized crop (resampled as ``interpolation`` says,
    :data:`INTERPOLATIONS`), optional horizontal flip, optional augmentations of the crop
    (:data:`ViewAugment`), normalisation, optional random erasing (timm's, per-pixel noise,
    when the augmentation gives it a probability)."""

    def __init__(self, size: int, scale: tuple[float, float] = (0.2, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True,
                 mean: tuple[float, ...] = (0.5, 0.5, 0.5),
                 std: tuple[float, ...] = (0.5, 0.5, 0.5),
                 photometric: ViewAugment | None = None, interpolation: str = "bilinear") -> None:
        self.size, self.scale, self.ratio, self.flip = size, tuple(scale), tuple(ratio), flip
        self.interpolation, self.mode = INTERPOLATIONS[interpolation], interpolation
        self.mean, self.std = list(mean), list(std)
        self.colours = photometric
        self.photometric = photometric.transform(size, tuple(mean)) if photometric else None
        self.erasing = None
        if photometric and photometric.erasing:
            self.erasing = RandomErasing(photometric.erasing, mode="pixel", max_count=1,
                                         device="cpu")

    def draw(self, height: int, width: int, rng: random.Random) -> tuple[tuple, bool, Tensor]:
        """The crop box (pixels), the flip and the geometry [5] of one view of an image of
        ``height`` × ``width``; the first draws of the view from ``rng``, wherever it renders."""
        top, left, ch, cw = crop_box(height, width, self.scale, self.ratio, rng)
        flipped = self.flip and rng.random() < 0.5
        geometry = torch.tensor([top / height, left / width, ch / height, cw / width,
                                 float(flipped)])
        return (top, left, ch, cw), flipped, geometry

    def __call__(self, image: Tensor, rng: random.Random) -> tuple[Tensor, Tensor]:
        """The reference recipe: ``image`` float [3, H, W] in [0, 1] → (view [3, size, size],
        geometry [5])."""
        _, h, w = image.shape
        (top, left, ch, cw), flipped, geometry = self.draw(h, w, rng)
        # clamped: a bicubic kernel overshoots [0, 1] at edges, where PIL's 8-bit result clips
        view = TF.resized_crop(image, top, left, ch, cw, [self.size, self.size],
                               self.interpolation, antialias=True).clamp(0, 1)
        if flipped:
            view = TF.horizontal_flip(view)
        if self.photometric is None:
            return self.normalize(view), geometry
        return self.augment(view, rng), geometry

    def augment(self, view: Tensor, rng: random.Random) -> Tensor:
        """The augmentation's torchvision / timm transform, normalisation and random erasing.
        They draw from the global generators: seeded from ``rng``, the sample's own stream, a
        view stays a function of its seed (any worker, and after a resume)."""
        with seeded_globals(rng):
            view = self.normalize(self.photometric(view))
            if self.erasing is not None:
                view = self.erasing(view)
        return view

    def draw_colour(self, rng: random.Random) -> dict[str, Tensor] | random.Random | None:
        """This view's colour draw from the sample's stream, after its crop's: the parameters
        of :class:`Photometric` augmentations (:meth:`Photometric.draw`), a stream of its own
        for the others' transforms (:meth:`augment`), None without augmentations."""
        if isinstance(self.colours, Photometric):
            return self.colours.draw(rng)
        return random.Random(rng.getrandbits(64)) if self.colours else None

    def render(self, image: DecodedImage, box: tuple[int, int, int, int], flipped: bool,
               colour: dict[str, Tensor] | random.Random | None) -> Tensor:
        """This view of ``image`` for the crop ``box`` (top, left, height, width in
        full-resolution pixels), the flip and the colour draw of :meth:`draw` /
        :meth:`draw_colour`: one 8-bit resampling crops and resizes
        (:meth:`~m3i_lightning.data.images.DecodedImage.crop`), then the view turns float for
        its colours and the normalisation."""
        view = image.crop(box, self.size, self.mode)
        if flipped:
            view = view.flip(-1)
        # planar from here (the decoded pixels are interleaved): the colours read channels
        view = view.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)
        if isinstance(colour, dict):
            view = recolour(view[None], colour, blur_kernel(self.size))[0]
        elif colour is not None:
            return self.augment(view, colour)
        return self.normalize(view)

    def center(self, image: Tensor | EncodedImage) -> Tensor:
        """The whole image, resized: the evaluation view (an image file decoded at the
        largest DCT scale that keeps ``size`` pixels each way)."""
        if isinstance(image, EncodedImage):
            height, width = image.size
            pixels = image.decode(dct_scale([(height, width, self.size)])).whole(self.size)
            return self.normalize(pixels.float().div_(255.0))
        return self.normalize(TF.resize(image, [self.size, self.size], antialias=True))

    def normalize(self, view: Tensor) -> Tensor:
        return TF.normalize(view, self.mean, self.std)


@dataclass(frozen=True)
class LocalCrops:
    """DINO / MSN multi-crop: ``count`` small crops of ``size`` px from the ``scale`` range of
    the image area, besides the two global views (DINO: 10 × 96 px from (0.05, 0.4))."""

    count: int = 0
    size: int = 96
    scale: tuple[float, float] = (0.05, 0.4)

    def __post_init__(self) -> None:
        if self.count < 0 or self.size < 1:
            raise ValueError(f"local_crops needs count >= 0 and size >= 1, got {self}")
        object.__setattr__(self, "scale", tuple(self.scale))


class CropSet:
    """The crops of one training sample, by batch key: the global views ``view1`` and
    ``view2`` and the :class:`LocalCrops` ``local1`` ... (same flip and normalisation), each
    with the colour augmentations that ``augment`` (:data:`AUGMENTATIONS`) gives it, each crop
    resampled as ``interpolation`` (:data:`INTERPOLATIONS`) says."""

    def __init__(self, size: int, scale: tuple[float, float], flip: bool = True,
                 local: LocalCrops | None = None, augment: str = "none",
                 augment_on: str = "workers", decode_size: int | None = None,
                 interpolation: str = "bilinear") -> None:
        if augment not in AUGMENTATIONS:
            raise ValueError(f"unknown augment '{augment}' (data.augment); choose one of "
                             f"{sorted(AUGMENTATIONS)}")
        if augment_on not in AUGMENT_ON:
            raise ValueError(f"unknown augment_on '{augment_on}' (data.augment_on); choose one "
                             f"of {list(AUGMENT_ON)}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"unknown interpolation '{interpolation}' (data.interpolation); "
                             f"choose one of {list(INTERPOLATIONS)}")
        if augment_on == "device" and interpolation != "bilinear":
            raise ValueError(f"data.interpolation={interpolation} resamples in the loader "
                             "workers only: the device crops bilinearly (roi_align); give "
                             "data.augment_on=workers")
        if decode_size is not None and decode_size < 1:
            raise ValueError(f"data.decode_size must be null or >= 1, got {decode_size}")
        self.on_device, self.decode_size = augment_on == "device", decode_size
        # on the device path, whether the device decodes JPEGs (nvJPEG) and the workers ship
        # file bytes; the data module chooses (m3i_lightning.data.device_views.choose_decoder)
        self.device_decodes = False
        colours = AUGMENTATIONS[augment]
        if self.on_device and any(not isinstance(a, Photometric) for a in colours.values()):
            raise ValueError(f"data.augment={augment} runs in the loader workers only: the "
                             "device renders crops and colour augmentations (none, byol, "
                             "mocov2); give data.augment_on=workers")
        local = local or LocalCrops()
        self.views = {name: RandomView(size, scale, flip=flip, photometric=colours.get(name),
                                       interpolation=interpolation)
                      for name in GLOBAL_VIEWS}
        self.local_view = RandomView(local.size, local.scale, flip=flip,
                                     photometric=colours.get("local"),
                                     interpolation=interpolation)
        self.names = (*GLOBAL_VIEWS, *local_view_names(local.count))

    def view_for(self, name: str) -> RandomView:
        """The view of batch key ``name``: a global view's own, else the local crops'."""
        return self.views.get(name, self.local_view)

    def __call__(self, name: str, image: Tensor, rng: random.Random) -> tuple[Tensor, Tensor]:
        return self.view_for(name)(image, rng)

    def render(self, names: list[str], image: EncodedImage, rng: random.Random) -> dict:
        """The views ``names`` of an image file and their geometry: every view's crop, flip
        and colours drawn first (in that order, view by view), then one decode at the largest
        DCT scale at which every crop keeps its view's resolution
        (:func:`~m3i_lightning.data.images.dct_scale`), then each view rendered from it
        (:meth:`RandomView.render`)."""
        height, width = image.size
        drawn = []
        for name in names:
            view = self.view_for(name)
            box, flipped, geometry = view.draw(height, width, rng)
            drawn.append((name, view, box, flipped, geometry, view.draw_colour(rng)))
        decoded = image.decode(dct_scale(
            (box[2], box[3], view.size) for _, view, box, *_ in drawn))
        sample = {}
        for name, view, box, flipped, geometry, colour in drawn:
            sample[name] = view.render(decoded, box, flipped, colour)
            sample[f"{name}_geometry"] = geometry
        return sample

    def source(self, image: Tensor | EncodedImage) -> Tensor:
        """``image`` (float [3, H, W], or a file decoded at the largest DCT scale that keeps
        ``decode_size`` pixels each way) as the uint8 image a device batch carries: resized
        whole to ``decode_size`` × ``decode_size`` when set, so images of any size stack into
        one batch. Crop boxes are fractions of the image, so a crop shows the same content at
        either size (only its resolution changes)."""
        if isinstance(image, EncodedImage):
            height, width = image.size
            side = self.decode_size
            decoded = image.decode(dct_scale([(height, width, side)] if side else []))
            return decoded.pixels if side is None else decoded.whole(side)
        image = TF.to_dtype(image.clamp(0, 1), torch.uint8, scale=True)
        if self.decode_size is None:
            return image
        return TF.resize(image, [self.decode_size, self.decode_size], antialias=True)

    def center(self, image: Tensor | EncodedImage) -> Tensor:
        return self.views["view1"].center(image)
