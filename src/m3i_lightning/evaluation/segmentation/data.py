"""Images with per-pixel class masks, for the segmentation probe: the embedded digit scenes
(:mod:`~m3i_lightning.evaluation.segmentation.scenes`), an image and mask folder pair, or a
Hugging Face dataset with an image and an annotation column (ADE20k's ``scene_parse_150``
form).

    DIR/train/images/<name>.<ext>   DIR/train/masks/<name>.png   a mask: one channel of class
    DIR/val/images/...              DIR/val/masks/...            ids (PNG mode L, P or I;16)

The held-out folder may also be named validation, valid or test; an image and its mask share
their path below ``images/`` and ``masks/`` up to the extension. Images are decoded as
everywhere else (:func:`~m3i_lightning.data.images.decode_image`); both are resized to the
backbone's resolution (masks by nearest neighbour). A pair that cannot be used (a file without
its partner, an unreadable file, a mask of another size than its image) is skipped, counted and
logged; a class id outside ``num_classes`` that is not ``ignore_index`` is an error naming the
file, since it means ``num_classes`` is wrong.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

from m3i_lightning.core.errors import ConfigError, check_options
from m3i_lightning.data.hf import image_data, load_hf, prepare_columns
from m3i_lightning.data.imagefolder import VAL_DIRS
from m3i_lightning.data.images import decode_image, is_image_name, open_image
from m3i_lightning.data.skips import BadSample, SkipReport, summary
from m3i_lightning.evaluation.segmentation.scenes import digit_scenes

log = logging.getLogger(__name__)

SOURCES = ("embedded", "folder", "hf")


def decode_mask(data, name: str) -> Tensor:
    """A mask file (bytes, path or PIL image) → long [H, W] class ids, or :class:`BadSample`."""
    array = open_image(data, name, np.asarray)
    if array.ndim != 2 or array.dtype.kind not in "uib":
        raise BadSample("mask is not one channel of class ids",
                        f"{name}: shape {array.shape}, {array.dtype} (save masks as PNG of "
                        "mode L, P or I;16)")
    return torch.from_numpy(array.astype(np.int64))


def paired(image: Tensor, mask: Tensor, name: str) -> tuple[Tensor, Tensor]:
    if tuple(image.shape[-2:]) != tuple(mask.shape):
        raise BadSample("mask size differs from its image",
                        f"{name}: image {tuple(image.shape[-2:])}, mask {tuple(mask.shape)}")
    return image, mask


class SceneSource:
    """The embedded scenes of one split, already decoded."""

    def __init__(self, images: Tensor, masks: Tensor) -> None:
        self.images, self.masks = images, masks

    def __len__(self) -> int:
        return len(self.images)

    def name(self, i: int) -> str:
        return f"scene {i}"

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.images[i], self.masks[i]


class FolderPairs:
    """(image file, mask file) pairs, decoded on access."""

    def __init__(self, pairs: list[tuple[Path, Path]]) -> None:
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def name(self, i: int) -> str:
        return str(self.pairs[i][1])

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        image, mask = self.pairs[i]
        return paired(decode_image(image), decode_mask(mask, str(mask)), str(mask))


class HFPairs:
    """Rows of a map-style Hugging Face dataset with undecoded image and mask columns."""

    def __init__(self, dataset, image_column: str, mask_column: str) -> None:
        self.dataset, self.image_column, self.mask_column = dataset, image_column, mask_column

    def __len__(self) -> int:
        return len(self.dataset)

    def name(self, i: int) -> str:
        return f"row {i}"

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        row, name = self.dataset[i], self.name(i)
        image, mask = image_data(row[self.image_column]), image_data(row[self.mask_column])
        if image is None or mask is None:
            raise BadSample("sample without image or mask", name)
        return paired(decode_image(image, name), decode_mask(mask, name), name)


def folder_pairs(root: Path) -> FolderPairs:
    """The pairs of ``root/images`` and ``root/masks``; files without a partner are logged
    and left out."""
    listed = {}
    for kind in ("images", "masks"):
        folder = root / kind
        if not folder.is_dir():
            raise ConfigError(f"segmentation data folder {root} has no {kind}/ folder")
        listed[kind] = {p.relative_to(folder).with_suffix(""): p for p in sorted(folder.rglob("*"))
                        if p.is_file() and is_image_name(p.name) and not p.name.startswith(".")}
    images, masks = listed["images"], listed["masks"]
    for kind, mine, other in (("image", images, masks), ("mask", masks, images)):
        alone = sorted(set(mine) - set(other))
        if alone:
            log.warning("skipped %d %s file(s) under %s without a partner of the same name "
                        "(e.g. %s)", len(alone), kind, root, mine[alone[0]])
    pairs = [(images[key], masks[key]) for key in sorted(set(images) & set(masks))]
    if not pairs:
        raise ConfigError(f"no image under {root}/images has a mask of the same name under "
                          f"{root}/masks")
    return FolderPairs(pairs)


def load_sources(data: Mapping, img_size: tuple[int, int]) -> dict:
    """The train and val sources that ``segmentation.data`` describes (embedded scenes drawn
    at ``img_size``, square)."""
    source = data["source"]
    if source == "embedded":
        return {split: SceneSource(*digit_scenes(split, data[f"{split}_scenes"], img_size[0],
                                                 data["max_digits"]))
                for split in ("train", "val")}
    if source == "folder":
        if not data.get("path") or not Path(data["path"]).expanduser().is_dir():
            raise ConfigError(f"segmentation.data.path={data.get('path')} must be a folder "
                              "holding train/ and val/, each with images/ and masks/")
        root = Path(data["path"]).expanduser()
        val = next((root / d for d in VAL_DIRS if (root / d).is_dir()), None)
        if val is None:
            raise ConfigError(f"segmentation.data.path={root} has no held-out folder (one of "
                              f"{'/'.join(VAL_DIRS)})")
        return {"train": folder_pairs(root / "train"), "val": folder_pairs(val)}
    if source == "hf":
        if not data.get("name"):
            raise ConfigError("segmentation.data.source=hf needs segmentation.data.name")
        columns = [data["image_column"], data["mask_column"]]
        return {split: HFPairs(prepare_columns(load_hf(data["name"], data[key], False)[0],
                                               columns), *columns)
                for split, key in (("train", "split"), ("val", "val_split"))}
    raise ConfigError(f"segmentation.data.source={source} must be one of {list(SOURCES)}")


class MaskedImages(Dataset):
    """Samples ``{image, mask, index}`` of a source at ``size`` px; a pair that cannot be used
    becomes ``{skipped: reason}``, dropped by :func:`collate_pairs`."""

    def __init__(self, source, size: tuple[int, int]) -> None:
        self.source, self.size = source, tuple(size)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        try:
            image, mask = self.source[i]
        except BadSample as bad:
            return {"skipped": str(bad)}
        if tuple(image.shape[-2:]) != self.size:
            image = F.interpolate(image[None], size=self.size, mode="bilinear", antialias=True,
                                  align_corners=False)[0]
            mask = F.interpolate(mask[None, None].float(), size=self.size,
                                 mode="nearest")[0, 0]
        return {"image": image, "mask": mask.long(), "index": i}


def collate_pairs(samples: list[dict]) -> dict:
    """Stack the usable samples; the reasons of the others travel as ``skipped``."""
    usable = [s for s in samples if "skipped" not in s]
    batch = default_collate(usable) if usable else {}
    batch["skipped"] = [s["skipped"] for s in samples if "skipped" in s]
    return batch


def report_skips(skips: SkipReport, split: str, used: int) -> None:
    """Log the pairs a pass over ``split`` skipped; none usable is an error."""
    skipped = sum(skips.counts.values())
    if not used:
        raise ConfigError(f"no usable image and mask in the segmentation {split} split: all "
                          f"{skipped} failed: {summary(skips.counts, skips.examples)}")
    if skipped:
        log.warning("segmentation %s split: skipped %d samples: %s", split, skipped,
                    summary(skips.counts, skips.examples))


def check_class_ids(masks: Tensor, indices: Tensor, source, num_classes: int,
                    ignore_index: int) -> None:
    """Refuse a mask holding a class id that is neither below ``num_classes`` nor
    ``ignore_index``: scoring it would be silently wrong."""
    bad = (masks >= num_classes) | (masks < 0)
    bad &= masks != ignore_index
    if bad.any():
        row = int(bad.flatten(1).any(1).nonzero()[0])
        value = int(masks[row][bad[row]][0])
        raise ConfigError(f"{source.name(int(indices[row]))}: class id {value} is outside "
                          f"segmentation.num_classes={num_classes} (ids 0..{num_classes - 1}, "
                          f"{ignore_index} = segmentation.ignore_index)")


def pair_loader(dataset: MaskedImages, batch_size: int, num_workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                      collate_fn=collate_pairs, pin_memory=torch.cuda.is_available())


def check_segmentation_options(cfg: Mapping) -> None:
    """Refuse probe settings that cannot train or score, before any feature is extracted."""
    integer = (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1")
    checks = {f"segmentation.{key}": (cfg[key], *integer)
              for key in ("num_classes", "epochs", "batch_size")}
    checks["segmentation.lr"] = (cfg["lr"], lambda v: v > 0, "a number > 0")
    checks["segmentation.weight_decay"] = (cfg["weight_decay"], lambda v: v >= 0,
                                           "a number >= 0")
    checks["segmentation.ignore_index"] = (cfg["ignore_index"],
                                           lambda v: isinstance(v, int) and v >= cfg["num_classes"],
                                           "an integer >= segmentation.num_classes")
    checks["segmentation.data.source"] = (cfg["data"]["source"], lambda v: v in SOURCES,
                                          f"one of {list(SOURCES)}")
    check_options(checks)
