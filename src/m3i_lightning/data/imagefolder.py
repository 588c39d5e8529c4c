"""``data=imagefolder``: a folder of images, with Hugging Face ``imagefolder`` conventions.

    DIR/[train/]<class>/<image>         class sub-folders give labels (images elsewhere: none)
    DIR/[train/]**/metadata.jsonl|csv   ``file_name`` (relative to the metadata file) + caption
    DIR/val|validation|valid|test/…     held-out split; without it a fraction of train is held out

``data.path`` is DIR, or DIR/train itself: the held-out folder is then looked for beside it.

The folder is listed once, at start-up; files are read and decoded in the DataLoader workers.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from m3i_lightning.core.errors import ConfigError, EmptySplitError
from m3i_lightning.data.dataset import ViewDataset
from m3i_lightning.data.images import EncodedImage, is_image_name
from m3i_lightning.data.module import ViewDataModule, require_usable

log = logging.getLogger(__name__)

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
CAPTION_COLUMNS = ("text", "caption")
VAL_DIRS = ("val", "validation", "valid", "test")


@dataclass
class Listing:
    """Image files of one split with their class index (None: no class folder) and caption."""

    files: list[str] = field(default_factory=list)
    labels: list[int | None] = field(default_factory=list)
    captions: list[str | None] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def subset(self, indices: Sequence[int]) -> Listing:
        return Listing([self.files[i] for i in indices], [self.labels[i] for i in indices],
                       [self.captions[i] for i in indices])


def class_names(root: Path) -> list[str]:
    """Sub-folders of ``root`` that hold at least one image file, sorted: label i is name i."""
    names = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.is_dir() and not entry.name.startswith("."):
            for _, _, files in os.walk(entry.path):
                if any(is_image_name(f) for f in files):
                    names.append(entry.name)
                    break
    return names


def list_folder(root: Path, classes: Sequence[str], text_column: str | None) -> Listing:
    """Every image file under ``root`` (hidden entries left out), in a fixed order."""
    index = {name: i for i, name in enumerate(classes)}
    listing = Listing()
    captions: dict[str, str | None] = {}
    walked = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        walked.append((folder, sorted(f for f in files if not f.startswith("."))))
        for name in METADATA_FILES:
            if name in files:
                captions.update(read_metadata(Path(folder) / name, text_column))
    for folder, files in walked:
        relative = Path(folder).relative_to(root)
        label = index.get(relative.parts[0]) if relative.parts else None
        for name in files:
            path = os.path.join(folder, name)
            if name in METADATA_FILES:
                continue
            if not is_image_name(name):
                listing.ignored.append(str(relative / name))
                continue
            listing.files.append(path)
            listing.labels.append(label)
            listing.captions.append(captions.get(os.path.normpath(path)))
    report_unmatched(captions, {os.path.normpath(path) for path in listing.files}, root)
    return listing


def report_strays(listing: Listing, root: Path, classes: Sequence[str]) -> None:
    """Log how many held-out images lie outside the class folders of train/ (``val/Cat``
    against ``train/cat``): they carry no label, so evaluation leaves them out."""
    strays = [Path(f).relative_to(root) for f, label in zip(listing.files, listing.labels,
                                                            strict=True) if label is None]
    if strays and classes:
        folders = sorted({p.parts[0] if len(p.parts) > 1 else "." for p in strays})
        log.warning("%d of the %d images under %s are in no class folder of train/ (%s, not "
                    "one of %s; names must match exactly): evaluation leaves them out",
                    len(strays), len(listing.files), root, ", ".join(folders[:5]),
                    list(classes)[:10])


def report_unmatched(rows: dict[str, str | None], images: set[str], root: Path) -> None:
    """Log the metadata rows whose ``file_name`` names no image file under ``root``: their
    captions are unused, and when no row matches, the folder has no captions at all."""
    unmatched = sorted(set(rows) - images)
    if not unmatched:
        return
    if len(unmatched) == len(rows):
        what = (f"none of its {len(rows)} row(s) names an image file there, so no image has "
                "a caption")
    else:
        what = f"{len(unmatched)} of its {len(rows)} row(s) name no image file there (unused)"
    log.warning("metadata under %s: %s, e.g. '%s'; a file_name is relative to the metadata "
                "file's folder (for train/cat/001.jpg beside train/metadata.jsonl: "
                "cat/001.jpg)", root, what, unmatched[0])


def read_metadata(path: Path, text_column: str | None) -> dict[str, str | None]:
    """{image path: caption, None when the row has none} from a metadata.jsonl / metadata.csv;
    a malformed row is logged and left out (its image then has no caption)."""
    rows: list[dict] = []
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        if path.suffix == ".csv":
            rows = list(csv.DictReader(f))
        else:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    row = None
                if isinstance(row, dict):
                    rows.append(row)
                else:
                    log.warning("%s line %d is not a JSON object; left out", path, number)
    columns = set().union(*rows) if rows else set()
    if rows and "file_name" not in columns:
        raise ConfigError(f"{path} has no 'file_name' column (columns: {sorted(columns)})")
    if text_column is not None and rows and text_column not in columns:
        raise ConfigError(f"{path} has no caption column '{text_column}' (columns: "
                          f"{sorted(columns)})")
    column = text_column or next((c for c in CAPTION_COLUMNS if c in columns), None)
    captions = {}
    for row in rows:
        caption = row.get(column) if column else None
        if row.get("file_name"):
            usable = isinstance(caption, str) and caption.strip()
            captions[os.path.normpath(path.parent / str(row["file_name"]))] = (
                caption if usable else None)
    return captions


class FolderSource:
    """(image, label, caption) of listed files; the image is read and decoded by the view
    that needs it (in a DataLoader worker), at the scale it needs."""

    def __init__(self, listing: Listing) -> None:
        self.listing = listing

    def __len__(self) -> int:
        return len(self.listing.files)

    def __getitem__(self, i: int):
        listing = self.listing
        return EncodedImage(listing.files[i]), listing.labels[i], listing.captions[i]


class ImageFolderData(ViewDataModule):
    """Images under ``path``; see the module docstring for the layout.

    ``labels`` / ``captions`` switch off what the folder would provide; ``text_column`` names
    the caption column of the metadata (default: ``text``, else ``caption``); without a
    validation folder ``val_fraction`` of the images (at least one) is held out for kNN.

    Args:
        path: the image folder (DIR, or DIR/train).
        labels: take the class folders as labels.
        captions: take the metadata's captions.
        text_column: the caption column of the metadata (None: ``text``, else ``caption``).
        val_fraction: held out when there is no ``val``/``validation``/``valid``/``test``
            folder beside ``train``.

    The other options (``img_size``, ``batch_size``, ``num_workers``, ``crop_scale``,
    ``flip``, ``local_crops``, ``augment``, ``repeated_aug``, ``augment_on``, ``decode_size``,
    ``interpolation``, ``seed``, ``tokenizer``, ``fields``, ``train_view``) build the views and
    the loader, as :class:`~m3i_lightning.data.module.ViewDataModule` says.

    Example:
        >>> data = ImageFolderData("/data/pets", img_size=224, batch_size=64)  # doctest: +SKIP
        >>> data.class_names[:2]  # doctest: +SKIP
        ['abyssinian', 'beagle']
    """

    def __init__(self, path: str | None = None, img_size: int = 32, batch_size: int = 128,
                 num_workers: int = 2, crop_scale: Sequence[float] = (0.2, 1.0),
                 flip: bool = True, labels: bool = True, captions: bool = True,
                 text_column: str | None = None,
                 val_fraction: float = 0.01, seed: int = 0, tokenizer=None,
                 fields: set[str] | None = None, local_crops: dict | None = None,
                 augment: str = "none", repeated_aug: int = 1,
                 augment_on: str = "workers", decode_size: int | None = 320,
                 interpolation: str = "bilinear", train_view=None) -> None:
        super().__init__(img_size, batch_size, num_workers, crop_scale, flip, tokenizer, fields,
                         seed, val_fraction, local_crops, augment, repeated_aug, augment_on,
                         decode_size, interpolation, train_view)
        if not path:
            raise ConfigError("data=imagefolder needs data.path=<image folder>")
        root = Path(path).expanduser()
        if not root.is_dir():
            raise ConfigError(f"data.path '{path}' is not a folder")
        train_root, base = ((root / "train", root) if (root / "train").is_dir()
                            else (root, root.parent) if root.name == "train" else (root, None))
        val_root = next((base / d for d in VAL_DIRS if base and (base / d).is_dir()), None)
        if val_root is not None and base != root:
            log.info("data.path=%s: the held-out images are those of %s beside it", path,
                     val_root)
        classes = class_names(train_root) if labels else []
        train = list_folder(train_root, classes, text_column)
        if train.ignored:
            log.warning("ignored %d file(s) under %s that are not images: %s", len(train.ignored),
                        train_root, ", ".join(train.ignored[:5]))
        if not train.files:
            raise ConfigError(f"no image files under {train_root}")
        require_usable(((path, None, None, path) for path in train.files), str(train_root))
        if val_root is not None:
            val = list_folder(val_root, classes, text_column)
            report_strays(val, val_root, classes)
        else:
            train, val = hold_out(train, val_fraction, seed)
        if not captions:
            train.captions = [None] * len(train.files)
        self.splits = {"train": train, "val": val}
        self.val_fraction, self.has_val_folder = val_fraction, val_root is not None
        self.announce(classes, any(train.captions))

    def held_out_options(self) -> str:
        folders = "/".join(VAL_DIRS)
        if self.has_val_folder:
            return (f"labelled images in the {folders} folder beside train/ (one sub-folder "
                    "per class of train/)")
        return (f"a {folders} folder beside train/ (DIR/train/<class>/..., DIR/val/<class>/...), "
                f"or a bigger data.val_fraction (now {self.val_fraction}) of the images")

    def train_dataloader(self):
        return self.loader(ViewDataset(FolderSource(self.splits["train"]), self.view,
                                       self.fields), train=True)

    def eval_dataloader(self, split: str, rank: int = 0, world_size: int = 1):
        """Whole labelled images of ``train`` or ``val``, for kNN / linear probes (a sampler
        splits them between ranks)."""
        listing = self.splits[split]
        labelled = listing.subset([i for i, label in enumerate(listing.labels)
                                   if label is not None])
        if not labelled.files:
            needed = self.held_out_options() if split == "val" else "images in class folders"
            raise EmptySplitError(f"the {split} split has no image in a class folder of "
                                  f"{self.class_names}; evaluation needs {needed}")
        return self.loader(ViewDataset(FolderSource(labelled), self.view, {"label"},
                                       train=False), train=False)


def hold_out(listing: Listing, fraction: float, seed: int) -> tuple[Listing, Listing]:
    """A fixed random ``fraction`` of the files (at least one when >0) as the val split."""
    n = len(listing.files)
    n_val = min(n - 1, max(1, round(fraction * n))) if fraction > 0 and n > 1 else 0
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return listing.subset(sorted(order[n_val:])), listing.subset(sorted(order[:n_val]))
