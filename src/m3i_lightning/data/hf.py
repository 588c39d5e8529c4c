"""``data=hf``: any Hugging Face dataset with an image column, and optionally text and labels.

``name`` is a hub id (online), a folder written by ``save_to_disk``, parquet file(s) (a path or
glob) or a local folder ``load_dataset`` understands. Map-style datasets are indexed through
:class:`~m3i_lightning.data.dataset.ViewDataset` (Lightning adds the distributed sampler);
``streaming=true`` reads an ``IterableDataset`` split per rank with ``split_dataset_by_node``
(and per worker by ``datasets`` itself) through :class:`~m3i_lightning.data.stream.ViewStream`.

The image column is read undecoded and decoded in the workers as an
:class:`~m3i_lightning.data.images.EncodedImage` (at the reduced scale the views allow), so every
data module converts images to RGB the same way and a broken image is a skipped sample instead
of an exception inside ``datasets``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from m3i_lightning.core.errors import ConfigError
from m3i_lightning.data.dataset import ViewDataset
from m3i_lightning.data.images import EncodedImage
from m3i_lightning.data.module import ViewDataModule, require_usable
from m3i_lightning.data.skips import BadSample
from m3i_lightning.data.stream import Reader, ViewStream, held_out

log = logging.getLogger(__name__)

SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


LOCAL_PREFIXES = ("/", "./", "../", "~")  # a name written so is a path, never a Hub id


def load_hf(name: str, split: str, streaming: bool) -> tuple:
    """(dataset, number of rows or None when unknown) of the ``split`` of ``name`` (see the
    module docstring), map-style or streaming."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    path = Path(name).expanduser()
    if name.startswith(LOCAL_PREFIXES) and not any(c in name for c in "*?[") and not (
            path.exists()):
        raise ConfigError(f"data.name={name}: no such folder or file (a save_to_disk folder, "
                          "parquet file(s), or a Hub id such as org/name)")
    try:
        if path.is_dir() and any((path / marker).exists() for marker in SAVED_MARKERS):
            dataset = load_from_disk(str(path))
            if isinstance(dataset, DatasetDict):
                if split not in dataset:
                    raise ConfigError(f"{name} has no split '{split}'; splits: {list(dataset)}")
                dataset = dataset[split]
            elif split not in ("train", str(dataset.split)):
                raise ConfigError(f"{name} holds one dataset (split {dataset.split}), not a "
                                  f"split '{split}'")
            size = len(dataset)
            if streaming:
                dataset = dataset.to_iterable_dataset(num_shards=max(1, min(size, 64)))
            return dataset, size
        if path.suffix == ".parquet" or any(c in name for c in "*?["):
            dataset = load_dataset("parquet", data_files=name, split=split, streaming=streaming)
            return dataset, parquet_rows(name)
        dataset = load_dataset(name, split=split, streaming=streaming)
        return dataset, reported_size(dataset, split)
    except ConfigError:
        raise
    except Exception as err:  # datasets raises many types for a missing / malformed dataset
        raise ConfigError(f"Hugging Face dataset '{name}' (split '{split}') could not be "
                          f"loaded: {type(err).__name__}: {err}") from None


def prepare_columns(dataset, image_columns: Sequence[str], optional: Sequence[str | None] = ()):
    """Check the columns exist and read the image columns undecoded (images, and the masks of
    :mod:`m3i_lightning.evaluation.segmentation`), so the workers decode them with the
    project's rules."""
    from datasets import Image

    columns = dataset.column_names
    if columns is not None:
        for column in [*image_columns, *optional]:
            if column is not None and column not in columns:
                raise ConfigError(f"the dataset has no column '{column}'; columns: {columns}")
    features = dataset.features or {}
    for column in image_columns:
        if isinstance(features.get(column), Image):
            dataset = dataset.cast_column(column, Image(decode=False))
    return dataset


def image_data(cell):
    """What an undecoded image cell holds to decode: its bytes, else its path (None: empty)."""
    if isinstance(cell, dict):
        return cell.get("bytes") or cell.get("path")
    return cell


@dataclass(frozen=True)
class Columns:
    """Which columns hold the image, caption and label, and how many classes there are."""

    image: str
    text: str | None
    label: str | None
    num_classes: int

    def record(self, row: dict, name: str) -> tuple | BadSample:
        """(image data, label, caption, name) of one row, or why it cannot be used."""
        image = image_data(row.get(self.image))
        if image is None:
            return BadSample("sample without image", name)
        return image, self.label_of(row), self.caption_of(row), name

    def caption_of(self, row: dict) -> str | None:
        """The caption; with a list of captions (COCO style) a random non-empty one."""
        text = row.get(self.text) if self.text else None
        if isinstance(text, list):
            text = [t for t in text if isinstance(t, str) and t.strip()]
            return random.choice(text) if text else None
        return text if isinstance(text, str) else None

    def label_of(self, row: dict) -> int | None:
        """The class index; missing, negative (datasets' "no label") or out of range: None."""
        label = row.get(self.label) if self.label else None
        if isinstance(label, bool) or not isinstance(label, int):
            return None
        return label if 0 <= label < self.num_classes else None


class HFSource:
    """Rows ``indices`` of a map-style dataset as (image, label, caption) records."""

    def __init__(self, dataset, indices: Sequence[int], columns: Columns) -> None:
        self.dataset, self.indices, self.columns = dataset, list(indices), columns

    def __len__(self) -> int:
        return len(self.indices)

    def record(self, i: int) -> tuple | BadSample:
        index = self.indices[i]
        return self.columns.record(self.dataset[index], f"row {index}")

    def __getitem__(self, i: int):
        record = self.record(i)
        if isinstance(record, BadSample):
            raise record
        data, label, caption, name = record
        return EncodedImage(data, name), label, caption


class HFStream:
    """The records of a streaming dataset for one :class:`Reader`: this rank's part by
    ``split_dataset_by_node``; ``datasets`` then deals its shards to the DataLoader workers."""

    def __init__(self, dataset, columns: Columns, val_fraction: float, split: str) -> None:
        self.dataset, self.columns = dataset, columns
        self.val_fraction, self.split = val_fraction, split

    def __call__(self, reader: Reader) -> Iterator[tuple | BadSample]:
        from datasets.distributed import split_dataset_by_node

        dataset = self.dataset
        if reader.world > 1:
            dataset = split_dataset_by_node(dataset, rank=reader.rank, world_size=reader.world)
        dataset.set_epoch(reader.epoch)
        for number, row in enumerate(dataset):
            record = self.columns.record(row, f"streamed row {number} of worker {reader.worker}")
            if isinstance(record, BadSample):
                yield record
            elif held_out(stable_key(record[0]), self.val_fraction) == (self.split == "val"):
                yield record


def stable_key(image) -> bytes | str:
    """What the held-out hash of a streamed row reads: its image bytes, or its path."""
    return image if isinstance(image, bytes) else str(image)


class HFData(ViewDataModule):
    """A Hugging Face dataset; see the module docstring for what ``name`` may be.

    ``image_column`` must exist; ``text_column`` / ``label_column`` are optional. A
    ``ClassLabel`` column brings its class names, a plain integer column needs
    ``num_classes`` when streaming. ``val_split`` is the held-out split for kNN; without it
    ``val_fraction`` of the rows is held out. A streamed epoch has ``num_samples`` rows, by
    default the split size the dataset reports.

    Args:
        name: a hub id, a ``save_to_disk`` folder, or parquet file(s).
        split: the training split.
        val_split: the held-out split (None: ``val_fraction`` of the rows).
        image_column: the column of the images.
        text_column: the column of the captions (None: no captions).
        label_column: the column of the labels (None: no labels).
        streaming: stream the dataset, split per rank.
        num_samples: a streamed epoch's rows (None: the size the dataset reports).
        num_classes: classes of a plain integer label column when streaming.
        val_fraction: held out without ``val_split``.
        shuffle_buffer: rows mixed per worker when streaming.
        eval_samples: at most this many rows per split in evaluation when streaming.

    The other options (``img_size``, ``batch_size``, ``num_workers``, ``crop_scale``,
    ``flip``, ``local_crops``, ``augment``, ``repeated_aug``, ``augment_on``, ``decode_size``,
    ``interpolation``, ``seed``, ``tokenizer``, ``fields``, ``train_view``) build the views and
    the loader, as :class:`~m3i_lightning.data.module.ViewDataModule` says.

    Example:
        >>> data = HFData("./my_dataset", text_column="caption", label_column="label",
        ...               img_size=224)  # doctest: +SKIP
    """

    def __init__(self, name: str | None = None, split: str = "train", val_split: str | None = None,
                 image_column: str = "image", text_column: str | None = None,
                 label_column: str | None = None, streaming: bool = False,
                 num_samples: int | None = None, num_classes: int | None = None,
                 img_size: int = 32, batch_size: int = 128, num_workers: int = 2,
                 crop_scale: Sequence[float] = (0.2, 1.0), flip: bool = True,
                 val_fraction: float = 0.01, shuffle_buffer: int = 1000,
                 eval_samples: int = 10000, seed: int = 0, tokenizer=None,
                 fields: set[str] | None = None, local_crops: dict | None = None,
                 augment: str = "none", repeated_aug: int = 1,
                 augment_on: str = "workers", decode_size: int | None = 320,
                 interpolation: str = "bilinear", train_view=None) -> None:
        super().__init__(img_size, batch_size, num_workers, crop_scale, flip, tokenizer, fields,
                         seed, val_fraction, local_crops, augment, repeated_aug, augment_on,
                         decode_size, interpolation, train_view)
        if not name:
            raise ConfigError("data=hf needs data.name=<hub id, save_to_disk folder or parquet "
                              "path>")
        self.name, self.streaming = name, streaming
        self.shuffle_buffer, self.eval_samples = shuffle_buffer, eval_samples
        dataset, size = load_hf(name, split, streaming)
        dataset = prepare_columns(dataset, [image_column], [text_column, label_column])
        classes = self._classes(dataset, label_column, num_classes)
        self.columns = Columns(image_column, text_column, label_column, len(classes))
        val = (prepare_columns(load_hf(name, val_split, streaming)[0], [image_column],
                               [text_column, label_column]) if val_split else None)
        self.val_fraction = 0.0 if val_split else val_fraction
        self.val_split = val_split
        where = f"Hugging Face dataset '{name}' split '{split}'"
        if streaming:
            self.train, self.val = dataset, val
            self.num_samples = num_samples or size
            if self.num_samples is None:
                raise ConfigError(f"{where} does not report its size: set data.num_samples")
            require_usable(HFStream(dataset, self.columns, 0.0, "train")(
                Reader(0, 1, 0, 1, 0, 0, str(seed))), where)
        else:
            everything = HFSource(dataset, range(len(dataset)), self.columns)
            require_usable((everything.record(i) for i in range(len(everything))), where)
            self.sources = self._map_splits(dataset, val, seed)
        self.announce(classes or None, text_column is not None)

    def _classes(self, dataset, label_column: str | None, num_classes: int | None) -> list[str]:
        """Class names: a ``ClassLabel``'s, else ``num_classes`` numbers, else (map-style) as
        many as the largest label + 1."""
        if label_column is None:
            return []
        from datasets import ClassLabel

        feature = (dataset.features or {}).get(label_column)
        if isinstance(feature, ClassLabel):
            return list(feature.names)
        if num_classes is None:
            if self.streaming:
                raise ConfigError(f"label column '{label_column}' is not a ClassLabel: set "
                                  "data.num_classes")
            labels = [v for v in dataset[label_column] if isinstance(v, int) and v >= 0]
            num_classes = max(labels) + 1 if labels else 0
        return [str(i) for i in range(num_classes)]

    def _labelled(self, dataset) -> list[bool]:
        """Which rows have a usable label (evaluation reads only those)."""
        column = self.columns.label
        if column is None:
            return [False] * len(dataset)
        return [self.columns.label_of({column: v}) is not None for v in dataset[column]]

    def _map_splits(self, dataset, val, seed: int) -> dict[str, HFSource]:
        if val is not None:
            return {"train": HFSource(dataset, range(len(dataset)), self.columns),
                    "val": HFSource(val, range(len(val)), self.columns)}
        n = len(dataset)
        n_val = min(n - 1, max(1, round(self.val_fraction * n))) if self.val_fraction else 0
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        return {"train": HFSource(dataset, sorted(order[n_val:]), self.columns),
                "val": HFSource(dataset, sorted(order[:n_val]), self.columns)}

    def held_out_options(self) -> str:
        if self.val_split:
            return f"labelled rows in the held-out split data.val_split={self.val_split}"
        return ("a held-out split of the dataset, data.val_split=<split name>, or a bigger "
                f"data.val_fraction (now {self.val_fraction}) of the rows")

    def train_dataloader(self):
        if not self.streaming:
            return self.loader(ViewDataset(self.sources["train"], self.view, self.fields),
                               train=True)
        rank, world_size, epoch, _ = self.placement()
        batches = self.stream_batches(world_size)
        stream = ViewStream(HFStream(self.train, self.columns, self.val_fraction, "train"),
                            self.view, self.fields, batch_size=self.batch_size, batches=batches,
                            rank=rank, world=world_size, epoch=epoch, seed=str(self.seed),
                            shuffle_buffer=self.shuffle_buffer)
        return self.loader(stream, train=True, num_workers=self._stream_workers(world_size))

    def _stream_workers(self, world_size: int) -> int:
        """``datasets`` gives each worker whole shards: more workers than this rank's shards
        would idle (and find nothing), so they are capped."""
        shards = self.train.num_shards
        per_rank = shards // world_size if shards % world_size == 0 else shards
        if self.num_workers > per_rank:
            log.warning("%s has %d shard(s) per rank: using %d DataLoader worker(s), not %d",
                        self.name, per_rank, per_rank, self.num_workers)
        return min(self.num_workers, per_rank)

    def eval_dataloader(self, split: str, rank: int = 0, world_size: int = 1):
        """Whole labelled images of ``train`` or ``val`` (streaming: up to ``eval_samples``,
        this rank's part of them), for kNN / linear probes."""
        if not self.streaming:
            source = self.sources[split]
            usable = self._labelled(source.dataset)
            labelled = [i for i in source.indices if usable[i]]
            return self.loader(ViewDataset(HFSource(source.dataset, labelled, self.columns),
                                           self.view, {"label"}, train=False), train=False)
        if split == "val" and self.val is not None:
            records = HFStream(self.val, self.columns, 0.0, "train")
        else:
            records = HFStream(self.train, self.columns, self.val_fraction, split)
        stream = ViewStream(records, self.view, {"label"}, batch_size=self.batch_size,
                            batches=None, train=False, rank=rank, world=world_size,
                            limit=-(-self.eval_samples // world_size))
        return self.loader(stream, train=False, num_workers=self._stream_workers(world_size))


def parquet_rows(pattern: str) -> int:
    """Rows of the parquet files matching ``pattern``, from their footers (no data is read)."""
    import fsspec
    import pyarrow.parquet as pq

    fs, _, paths = fsspec.get_fs_token_paths(pattern)
    total = 0
    for path in paths:
        with fs.open(path, "rb") as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total


def reported_size(dataset, split: str) -> int | None:
    """Rows in ``split`` as the dataset's metadata reports them, if it does."""
    if hasattr(dataset, "__len__"):
        return len(dataset)
    splits = getattr(dataset.info, "splits", None) or {}
    info = splits.get(split) if hasattr(splits, "get") else None
    return getattr(info, "num_examples", None) or None
