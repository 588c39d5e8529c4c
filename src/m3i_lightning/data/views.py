"""Random crops of one image that remember where they came from.

Inter-view objectives must know the relative transform between the two views, so each crop
returns its geometry: (top, left, height, width) as fractions of the source image, and a flip
flag. With it a decoder query can be placed at the location of the other view it predicts.
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

from m3i_lightning.plan import GLOBAL_VIEWS, local_view_names
from m3i_lightning.seeding import seeded_globals

IDENTITY_GEOMETRY = (0.0, 0.0, 1.0, 1.0, 0.0)


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

    def transform(self, size: int, mean: tuple[float, ...]) -> T.Transform:
        return T.Compose([
            T.RandomApply([T.ColorJitter(*self.jitter)], p=self.jitter_p),
            T.RandomGrayscale(self.grayscale_p),
            T.RandomApply([T.GaussianBlur(blur_kernel(size), sigma=(0.1, 2.0))],
                          p=self.blur_p),
            T.RandomSolarize(0.5, p=self.solarize_p),
        ])


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
    """One augmented view: random resized crop, optional horizontal flip, optional
    augmentations of the crop (:data:`ViewAugment`), normalisation, optional random erasing
    (timm's, per-pixel noise, when the augmentation gives it a probability)."""

    def __init__(self, size: int, scale: tuple[float, float] = (0.2, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True,
                 mean: tuple[float, ...] = (0.5, 0.5, 0.5),
                 std: tuple[float, ...] = (0.5, 0.5, 0.5),
                 photometric: ViewAugment | None = None) -> None:
        self.size, self.scale, self.ratio, self.flip = size, tuple(scale), tuple(ratio), flip
        self.mean, self.std = list(mean), list(std)
        self.photometric = photometric.transform(size, tuple(mean)) if photometric else None
        self.erasing = None
        if photometric and photometric.erasing:
            self.erasing = RandomErasing(photometric.erasing, mode="pixel", max_count=1,
                                         device="cpu")

    def __call__(self, image: Tensor, rng: random.Random) -> tuple[Tensor, Tensor]:
        """``image``: float [3, H, W] in [0, 1] → (view [3, size, size], geometry [5])."""
        _, h, w = image.shape
        top, left, ch, cw = crop_box(h, w, self.scale, self.ratio, rng)
        view = TF.resized_crop(image, top, left, ch, cw, [self.size, self.size], antialias=True)
        flipped = self.flip and rng.random() < 0.5
        if flipped:
            view = TF.horizontal_flip(view)
        geometry = torch.tensor([top / h, left / w, ch / h, cw / w, float(flipped)])
        if self.photometric is None:
            return self.normalize(view), geometry
        # torchvision and timm draw from the global generators: seeded from the sample's own
        # stream, a view stays a function of its seed (any worker, and after a resume)
        with seeded_globals(rng):
            view = self.normalize(self.photometric(view.clamp(0, 1)))
            if self.erasing is not None:
                view = self.erasing(view)
        return view, geometry

    def center(self, image: Tensor) -> Tensor:
        """The whole image, resized: the evaluation view."""
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
    with the colour augmentations that ``augment`` (:data:`AUGMENTATIONS`) gives it."""

    def __init__(self, size: int, scale: tuple[float, float], flip: bool = True,
                 local: LocalCrops | None = None, augment: str = "none") -> None:
        if augment not in AUGMENTATIONS:
            raise ValueError(f"unknown augment '{augment}' (data.augment); choose one of "
                             f"{sorted(AUGMENTATIONS)}")
        colours = AUGMENTATIONS[augment]
        local = local or LocalCrops()
        self.views = {name: RandomView(size, scale, flip=flip, photometric=colours.get(name))
                      for name in GLOBAL_VIEWS}
        self.local_view = RandomView(local.size, local.scale, flip=flip,
                                     photometric=colours.get("local"))
        self.names = (*GLOBAL_VIEWS, *local_view_names(local.count))

    def __call__(self, name: str, image: Tensor, rng: random.Random) -> tuple[Tensor, Tensor]:
        return self.views.get(name, self.local_view)(image, rng)

    def center(self, image: Tensor) -> Tensor:
        return self.views["view1"].center(image)
