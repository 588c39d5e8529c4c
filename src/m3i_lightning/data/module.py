"""What the file-backed data modules share: the view, the loader and the start-up check.

Like :class:`~m3i_lightning.data.embedded.EmbeddedDigits`, a data module announces
``provides`` / ``num_classes`` / ``class_names`` when it is built (the model is sized from them
before training starts), builds the ``fields`` the trained model reads (:class:`TrainFields`),
and serves ``train_dataloader()`` and ``eval_dataloader(split)`` for kNN / probes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from m3i_lightning.core.distributed import world
from m3i_lightning.core.errors import ConfigError
from m3i_lightning.data.dataset import check_loader_options, make_loader
from m3i_lightning.data.device_views import DeviceViews, choose_decoder
from m3i_lightning.data.images import decode_image
from m3i_lightning.data.skips import BadSample
from m3i_lightning.data.views import CropSet, LocalCrops

log = logging.getLogger(__name__)


class TrainFields:
    """The batch keys a data module's training loader builds (``fields``): those it was built
    with, else those the module it trains reads (its ``batch_fields()``, asked when the
    loader is built, so a plain ``Trainer().fit(model, datamodule)`` builds nothing extra),
    else everything it ``provides``."""

    requested_fields: set[str] | None
    provides: set[str]

    @property
    def fields(self) -> set[str]:
        if self.requested_fields is not None:
            return self.requested_fields
        trained = getattr(getattr(self, "trainer", None), "lightning_module", None)
        if hasattr(trained, "batch_fields"):
            return trained.batch_fields()
        return set(self.provides)


class ViewDataModule(TrainFields, DeviceViews, L.LightningDataModule):
    """Base of the image folder, shard and Hugging Face data modules. ``train_view`` builds
    the training view from the data's crops (fine-tuning's recipe augmentation); None: the
    crops themselves.

    Args:
        img_size: the side of the views, in pixels.
        batch_size: samples per batch and process.
        num_workers: DataLoader worker processes.
        crop_scale: the (min, max) area fraction of a view's random crop.
        flip: random horizontal flips.
        tokenizer: turns captions into tokens (None: the data's captions are not tokenised).
        fields: the batch keys to build (None: those the trained module reads,
            :class:`TrainFields`).
        seed: the seed of the training order and of each sample's crops.
        val_fraction: the share held out where the data has no held-out split of its own.
        local_crops: DINO / MSN multi-crop: ``count``, ``size``, ``scale`` of the small crops.
        augment: the views' augmentations: ``none``, ``byol``, ``mocov2``, ``deit`` or
            ``three_augment``.
        repeated_aug: DeiT's repeated augmentation: each image that many times in a row.
        augment_on: ``workers`` (crops and colours in the DataLoader) or ``device`` (batched in
            the step).
        decode_size: ``augment_on=device``: the square every image is resized to.
        interpolation: ``bilinear`` or ``bicubic`` resizing of the crops.
        train_view: builds the training view from the crops (fine-tuning's recipe); None: the
            crops themselves.
    """

    def __init__(self, img_size: int, batch_size: int, num_workers: int,
                 crop_scale: Sequence[float], flip: bool, tokenizer, fields: set[str] | None,
                 seed: int, val_fraction: float = 0.0, local_crops: Mapping | None = None,
                 augment: str = "none", repeated_aug: int = 1, augment_on: str = "workers",
                 decode_size: int | None = None, interpolation: str = "bilinear",
                 train_view: Callable[[CropSet], Any] | None = None) -> None:
        super().__init__()
        check_loader_options(batch_size, num_workers, list(crop_scale), val_fraction,
                             repeated_aug)
        crops = CropSet(img_size, tuple(crop_scale), flip, LocalCrops(**local_crops or {}),
                        augment, augment_on, decode_size, interpolation)
        self.view = crops if train_view is None else train_view(crops)
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.repeated_aug = repeated_aug
        self.tokenizer = tokenizer
        self.requested_fields = set(fields) if fields is not None else None
        self.provides = {*crops.names, "geometry"}
        self.num_classes, self.class_names = 0, []

    def announce(self, labels: Sequence[str] | None, captions: bool) -> None:
        """Set what the data provides (``labels``: the class names, None when unlabelled); one
        class is said in a warning, since every label-based number is then trivially perfect."""
        if labels:
            self.provides.add("label")
            self.num_classes, self.class_names = len(labels), list(labels)
            if len(labels) == 1:
                log.warning("the data has one class (%s): cls trains to a loss of 0 and kNN, "
                            "linear probe and fine-tuning score 100%% whatever the model; give "
                            "two or more classes, or data.labels=false", labels[0])
        if captions:
            self.provides.add("text")

    def loader(self, dataset: Dataset, train: bool, num_workers: int | None = None) -> DataLoader:
        if train and self.view.on_device:
            self.view.device_decodes, why = choose_decoder(self.render_device())
            log.info("data.augment_on=device: %s", why)
        workers = self.num_workers if num_workers is None else num_workers
        return make_loader(dataset, self.batch_size, workers, self.tokenizer, shuffle=train,
                           drop_last=train, seed=self.seed, repeated_aug=self.repeated_aug)

    def val_dataloader(self) -> list[DataLoader]:
        """The online monitors' memory (train split) then queries (val split), whole labelled
        images; none without labels, so an unlabelled run skips validation. Under DDP each
        rank reads its part (streams split themselves, map-style data gets a sampler)."""
        if "label" not in self.provides:
            return []
        rank, world_size, _, _ = self.placement()
        return [self.eval_dataloader(split, rank, world_size) for split in ("train", "val")]

    def render_device(self) -> torch.device:
        """Where the views of a batch are rendered: the trainer's device (the CPU without a
        trainer)."""
        return self.trainer.strategy.root_device if self.trainer is not None else torch.device(
            "cpu")

    def placement(self) -> tuple[int, int, int, int]:
        """(rank, world size, current epoch, global step) of the training run, so a stream
        built on resume continues where the run is instead of at epoch 0."""
        trainer = self.trainer
        if trainer is None:
            return (*world(), 0, 0)
        return trainer.global_rank, trainer.world_size, trainer.current_epoch, trainer.global_step

    def stream_batches(self, world_size: int) -> int:
        """Batches every rank yields per epoch of a stream: the same on all ranks, so none
        waits at the end of an epoch for another that ran out."""
        kept = int(self.num_samples * (1 - self.val_fraction))
        batches = kept // (world_size * self.batch_size)
        if batches == 0:
            raise ConfigError(f"{kept} training samples are fewer than one batch of "
                              f"{self.batch_size} per rank on {world_size} rank(s)")
        return batches


def held_out_options(datamodule) -> str:
    """The options that size or supply the held-out split of this data."""
    options = getattr(datamodule, "held_out_options", None)
    return options() if options else "a held-out split"


def require_usable(records: Iterable, where: str) -> None:
    """Raise :class:`ConfigError` unless some record of ``records`` decodes, so a folder or
    shard list with no usable sample fails at start-up, not in a worker mid-epoch.

    ``records`` yields ``(image data, label, caption, name)`` or :class:`BadSample`; it is read
    only up to the first usable sample, so a healthy dataset costs one decode.
    """
    seen, last = 0, None
    for item in records:
        seen += 1
        if isinstance(item, BadSample):
            last = item
            continue
        try:
            decode_image(item[0], item[3])
            return
        except BadSample as bad:
            last = bad
    if not seen:
        raise ConfigError(f"no samples in {where}")
    raise ConfigError(f"no usable sample in {where}: all {seen} failed; the last: {last}")
