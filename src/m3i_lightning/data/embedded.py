"""The default data: scikit-learn's handwritten digits, shipped inside an installed package.

1,797 real 8×8 images in 10 classes, upscaled once, with captions written from the label, so
every objective (labels, image-text pairs, views) runs with no download.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from m3i_lightning.components.text import ByteTokenizer
from m3i_lightning.data.dataset import ViewDataset, check_loader_options, make_loader
from m3i_lightning.data.device_views import DeviceViews
from m3i_lightning.data.module import TrainFields
from m3i_lightning.data.views import CropSet, LocalCrops

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION_TEMPLATES = (
    "a handwritten digit {name}",
    "the number {digit}",
    "a scanned image of a {name}",
    "a blurry {name} written by hand",
)


def caption_for(label: int, index: int) -> str:
    """One fixed caption per image: the template cycles with the index."""
    template = CAPTION_TEMPLATES[index % len(CAPTION_TEMPLATES)]
    return template.format(name=DIGIT_NAMES[label], digit=label)


class DigitsSource:
    """(image, label, caption) records of the digits, as float RGB tensors in [0, 1]."""

    def __init__(self, indices: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
                 labels_on: bool, captions_on: bool) -> None:
        self.indices, self.images, self.labels = indices, images, labels
        self.labels_on, self.captions_on = labels_on, captions_on

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = int(self.indices[i])
        label = int(self.labels[index])
        caption = caption_for(label, index) if self.captions_on else None
        return self.images[index], label if self.labels_on else None, caption


class EmbeddedDigits(TrainFields, DeviceViews, L.LightningDataModule):
    """Digits split deterministically into train / val; ``labels`` / ``captions`` can be
    switched off to pre-train as if the data had none; ``train_view`` as for
    :class:`~m3i_lightning.data.module.ViewDataModule`.

    Args:
        img_size: the side of the views.
        source_size: the side the 8×8 digits are upscaled to once.
        batch_size: samples per batch.
        num_workers: DataLoader worker processes.
        val_fraction: the share of the digits held out (0.2: 359 of 1,797).
        split_seed: the seed of that split.
        crop_scale: the (min, max) area fraction of a view's random crop.
        flip: random horizontal flips.
        labels: give the digit as label (False: pre-train as if unlabelled).
        captions: give captions written from the label.
        tokenizer: turns captions into tokens (default: a byte-level one).
        fields: the batch keys to build (None: those the trained module reads).
        seed: the seed of the training order and of each sample's crops.
        local_crops: DINO / MSN multi-crop: ``count``, ``size``, ``scale`` of the small crops.
        augment: the views' augmentations (``none``, ``byol``, ...).
        repeated_aug: DeiT's repeated augmentation.
        augment_on: ``workers`` or ``device``.
        interpolation: ``bilinear`` or ``bicubic`` resizing of the crops.
        train_view: builds the training view from the crops (fine-tuning's recipe).

    Example:
        >>> data = EmbeddedDigits(img_size=16, batch_size=32, num_workers=0)
        >>> data.setup("fit")
        >>> next(iter(data.train_dataloader()))["view1"].shape
        torch.Size([32, 3, 16, 16])
    """

    def __init__(self, img_size: int = 32, source_size: int = 32, batch_size: int = 128,
                 num_workers: int = 2, val_fraction: float = 0.2, split_seed: int = 0,
                 crop_scale: tuple[float, float] = (0.35, 1.0), flip: bool = True,
                 labels: bool = True, captions: bool = True, tokenizer=None,
                 fields: set[str] | None = None, seed: int = 0,
                 local_crops: dict | None = None, augment: str = "none",
                 repeated_aug: int = 1, augment_on: str = "workers",
                 interpolation: str = "bilinear", train_view=None) -> None:
        super().__init__()
        check_loader_options(batch_size, num_workers, list(crop_scale), val_fraction,
                             repeated_aug)
        self.img_size, self.source_size = img_size, source_size
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.repeated_aug = repeated_aug
        self.val_fraction, self.split_seed = val_fraction, split_seed
        crops = CropSet(img_size, crop_scale, flip, LocalCrops(**local_crops or {}), augment,
                        augment_on, interpolation=interpolation)
        self.view = crops if train_view is None else train_view(crops)
        self.labels_on, self.captions_on = labels, captions
        self.tokenizer = tokenizer or ByteTokenizer()
        self.provides = {*crops.names, "geometry"}
        self.provides |= {"label"} if labels else set()
        self.provides |= {"text"} if captions else set()
        self.requested_fields = set(fields) if fields is not None else None
        self.num_classes = len(DIGIT_NAMES)
        self.class_names = list(DIGIT_NAMES)

    def setup(self, stage: str | None = None) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.from_numpy(digits.images).float().div(16.0).unsqueeze(1)
        images = F.interpolate(images, size=self.source_size, mode="bilinear",
                               align_corners=False).clamp(0, 1).expand(-1, 3, -1, -1)
        labels = torch.from_numpy(digits.target).long()
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(
            self.split_seed))
        n_val = int(round(self.val_fraction * len(labels)))
        self.splits = {"val": order[:n_val], "train": order[n_val:]}
        self._images, self._labels = images.contiguous(), labels

    def source(self, split: str) -> DigitsSource:
        return DigitsSource(self.splits[split], self._images, self._labels, self.labels_on,
                            self.captions_on)

    def _loader(self, dataset, shuffle: bool, drop_last: bool) -> DataLoader:
        return make_loader(dataset, self.batch_size, self.num_workers, self.tokenizer,
                           shuffle=shuffle, drop_last=drop_last, seed=self.seed,
                           repeated_aug=self.repeated_aug)

    def train_dataloader(self) -> DataLoader:
        return self._loader(ViewDataset(self.source("train"), self.view, self.fields), True, True)

    def eval_dataloader(self, split: str) -> DataLoader:
        """Whole images and labels of a split, for kNN / linear probes."""
        return self._loader(ViewDataset(self.source(split), self.view, {"label"}, train=False),
                            False, False)

    def val_dataloader(self) -> list[DataLoader]:
        """The online monitors' memory (train split) then their queries (val split), whole
        images; none without labels, so an unlabelled run skips validation."""
        if not self.labels_on:
            return []
        return [self.eval_dataloader("train"), self.eval_dataloader("val")]

    def held_out_options(self) -> str:
        return f"data.val_fraction (now {self.val_fraction}) of the 1,797 digits"

    def class_prompts(self) -> list[list[str]]:
        """Zero-shot prompts: every caption template, written for each class in label order."""
        return [[caption_for(label, index) for index in range(len(CAPTION_TEMPLATES))]
                for label in range(self.num_classes)]
