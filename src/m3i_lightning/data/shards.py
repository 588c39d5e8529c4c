"""``data=webdataset``: image-text tar shards (LAION / CC12M / YFCC style), streamed.

A shard is a plain tar whose members ``<key>.<ext>`` group into samples by key: an image
(``jpg``, ``png``, ``webp``, …), a caption (``txt``, or ``json`` with ``caption`` / ``text``) and
optionally a class index (``cls``). Python's ``tarfile`` reads them as a stream (local paths or
any fsspec URL), so no extra dependency is needed. ``sizes.json`` beside the shards (``{"<shard
file name>": <samples>}``, as written by ``scripts/make_shards.py``) or ``num_samples`` gives
the epoch length; ``classes.json`` (a list of class names) or ``num_classes`` makes ``cls`` a
label.

Shards are dealt to the readers (ranks × workers) after a permutation all ranks agree on, so the
readers of an epoch see disjoint samples and together all of them; with fewer shards than
readers each reader scans every shard and keeps every n-th sample. ``resampled=true`` draws
shards with replacement instead, a different draw per epoch and per resume, so a resumed run
keeps going on fresh samples instead of replaying the epoch's beginning.
"""

from __future__ import annotations

import json
import logging
import re
import tarfile
from collections.abc import Iterator, Sequence
from itertools import islice
from pathlib import PurePosixPath

import fsspec

from m3i_lightning.core.errors import ConfigError
from m3i_lightning.data.images import is_image_name
from m3i_lightning.data.module import ViewDataModule, require_usable
from m3i_lightning.data.skips import BadSample
from m3i_lightning.data.stream import Reader, ViewStream, held_out

log = logging.getLogger(__name__)

_BRACES = re.compile(r"\{([^{}]*)\}")
_BLOCK = 512


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Shard URLs of brace patterns: ``a/{000..127}.tar`` (zero-padded range), ``{x,y}``
    alternatives, or a glob (``a/*.tar``, sorted); several patterns as a list or joined by
    ``::``."""
    patterns = urls.split("::") if isinstance(urls, str) else list(urls)
    expanded: list[str] = []
    for pattern in patterns:
        for url in _expand(pattern.strip()):
            expanded.extend(_glob(url) if any(c in url for c in "*?[") else [url])
    return expanded


def _glob(pattern: str) -> list[str]:
    fs, _ = fsspec.core.url_to_fs(pattern)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    prefix = "" if protocol in ("file", "local") else f"{protocol}://"
    return sorted(prefix + path for path in fs.glob(pattern))


def _expand(pattern: str) -> list[str]:
    match = _BRACES.search(pattern)
    if match is None:
        return [pattern] if pattern else []
    body, head, tail = match.group(1), pattern[:match.start()], pattern[match.end():]
    if ".." in body:
        low, high = body.split("..", 1)
        if not (low.isdigit() and high.isdigit()):
            raise ConfigError(f"bad range '{{{body}}}' in shard pattern '{pattern}'")
        width = len(low) if low.startswith("0") else 0
        choices = [str(i).zfill(width) for i in range(int(low), int(high) + 1)]
    else:
        choices = body.split(",")
    return [url for choice in choices for url in _expand(head + choice + tail)]


def sibling(url: str, name: str) -> str:
    """The URL of file ``name`` in the folder of shard ``url``."""
    return url.rsplit("/", 1)[0] + "/" + name if "/" in url else name


def read_json(url: str):
    """A JSON file at ``url``, or None when it does not exist."""
    try:
        with fsspec.open(url, "r") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def shard_sizes(shards: Sequence[str]) -> list[int] | None:
    """Samples per shard from the ``sizes.json`` files beside the shards; None if one is
    missing or lists no count for some shard."""
    tables: dict[str, dict | None] = {}
    sizes = []
    for shard in shards:
        index = sibling(shard, "sizes.json")
        if index not in tables:
            tables[index] = read_json(index)
        table = tables[index] or {}
        name = shard.rsplit("/", 1)[-1]
        if name not in table:
            return None
        sizes.append(int(table[name]))
    return sizes


def missing_shards(shards: Sequence[str]) -> list[str]:
    """The shard URLs that name no file."""
    missing = []
    for url in shards:
        fs, path = fsspec.core.url_to_fs(url)
        if not fs.exists(path):
            missing.append(url)
    return missing


def tar_members(url: str) -> Iterator[tuple[str, bytes] | BadSample]:
    """(member name, bytes) of the regular files of one tar, streamed.

    A member with a corrupt header is stepped over (``ignore_zeros`` makes tarfile search on
    for the next valid header) and reported as a :class:`BadSample` where the gap is noticed;
    a shard that cannot be read on ends with one. tarfile ends quietly when a shard is cut
    at or inside a header, so the end-of-archive marker (two zero blocks) is checked too, and
    on a file that is no tar at all, so a shard without a single member is one as well.
    """
    expected = 0
    try:
        fs, path = fsspec.core.url_to_fs(url)
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*",
                                                    ignore_zeros=True) as tar:
            for member in tar:
                if member.offset > expected:
                    yield BadSample("broken tar member", f"{url} at byte {expected}")
                expected = member.offset_data + -(-member.size // _BLOCK) * _BLOCK
                if member.isfile():
                    yield member.name, tar.extractfile(member).read()
        size = fs.size(path)
        if expected == 0 and size:  # garbage reads as an archive without members
            yield BadSample("unreadable shard", f"{url}: no tar member in its {size} bytes")
        elif size is not None and size < expected + 2 * _BLOCK:
            yield BadSample("unreadable shard", f"{url}: cut short after byte {expected} (no "
                            "end-of-archive marker)")
    except (tarfile.TarError, OSError, EOFError) as err:
        yield BadSample("unreadable shard", f"{url}: {type(err).__name__}: {err}")


def split_name(name: str) -> tuple[str, str]:
    """``dir/0001.jpg`` → (``dir/0001``, ``jpg``): the key ends at the first dot of the file
    name, as in webdataset."""
    path = PurePosixPath(name)
    stem, _, ext = path.name.partition(".")
    return str(path.parent / stem) if str(path.parent) != "." else stem, ext.lower()


def shard_samples(url: str) -> Iterator[tuple[str, dict[str, bytes]] | BadSample]:
    """(key, {extension: bytes}) of consecutive members sharing a key.

    A sample next to a broken member may have lost a part of itself: the group that follows
    the gap is dropped and reported once as a broken member. When the shard cannot be read on,
    the sample being read is dropped with the shard's error.
    """
    key, group, damaged, broken = None, {}, None, None
    for item in tar_members(url):
        if isinstance(item, BadSample) and item.reason == "broken tar member":
            broken = item
            continue
        if isinstance(item, BadSample):
            group, broken = {}, None
            yield item
            continue
        member_key, ext = split_name(item[0])
        if member_key != key:
            if group:
                yield damaged or (key, group)
            key, group, damaged = member_key, {}, None
        if broken is not None:
            damaged, broken = broken, None
        group[ext] = item[1]
    if group:
        yield damaged or (key, group)
    if broken is not None:
        yield broken


def to_record(url: str, key: str, group: dict[str, bytes],
              num_classes: int | None) -> tuple | BadSample:
    """(image bytes, label, caption, name) of one sample, or why it cannot be used."""
    name = f"{url}:{key}"
    image = next((data for ext, data in group.items() if is_image_name(ext)), None)
    if image is None:
        return BadSample("sample without image", f"{name} has only {sorted(group)}")
    try:
        label = label_of(group, num_classes)
    except ValueError as err:
        return BadSample("unusable label", f"{name}: {err}")
    return image, label, caption_of(group), name


def caption_of(group: dict[str, bytes]) -> str | None:
    """The ``txt`` member, else ``caption`` / ``text`` of the ``json`` member."""
    if "txt" in group:
        return group["txt"].decode("utf-8", "replace")
    try:
        meta = json.loads(group["json"]) if "json" in group else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    meta = meta if isinstance(meta, dict) else {}
    return next((meta[c] for c in ("caption", "text") if isinstance(meta.get(c), str)), None)


def label_of(group: dict[str, bytes], num_classes: int | None) -> int | None:
    """The ``cls`` member as a class index; None when absent or without a class count (the
    sample is then unlabelled). ValueError when it is no integer or outside
    [0, num_classes): the sample is skipped and counted, never mislabelled."""
    if "cls" not in group or not num_classes:
        return None
    text = group["cls"].decode("utf-8", "replace").strip()
    try:
        label = int(text)
    except ValueError:
        raise ValueError(f"class '{text}' is no integer") from None
    if not 0 <= label < num_classes:
        raise ValueError(f"class {label} is outside data.num_classes={num_classes}")
    return label


class ShardSource:
    """The records of a shard list, split for one :class:`Reader`; picklable for workers."""

    def __init__(self, shards: Sequence[str], num_classes: int | None, val_fraction: float,
                 split: str, resampled: bool = False) -> None:
        self.shards, self.num_classes = list(shards), num_classes
        self.val_fraction, self.split, self.resampled = val_fraction, split, resampled

    def records(self, url: str) -> Iterator[tuple | BadSample]:
        for item in shard_samples(url):
            if isinstance(item, BadSample):
                yield item
            elif held_out(item[0], self.val_fraction) == (self.split == "val"):
                yield to_record(url, *item, self.num_classes)

    def everything(self) -> Iterator[tuple | BadSample]:
        """Every record of every shard in order: the start-up check reads it."""
        for url in self.shards:
            yield from self.records(url)

    def __call__(self, reader: Reader) -> Iterator[tuple | BadSample]:
        if self.resampled:
            rng = reader.own_rng()
            while True:
                yield from self.records(rng.choice(self.shards))
        order = list(self.shards)
        if self.split == "train":
            reader.order_rng().shuffle(order)
        if len(order) >= reader.count:
            for url in order[reader.index::reader.count]:
                yield from self.records(url)
        else:
            records = (r for url in order for r in self.records(url))
            yield from islice(records, reader.index, None, reader.count)


class WebDatasetData(ViewDataModule):
    """Tar shards at ``urls`` (see the module docstring), streamed and split by rank / worker.

    ``val_urls`` are the held-out shards for kNN; without them the samples whose key hashes
    below ``val_fraction`` are held out of training. ``shuffle_buffer`` raw samples per worker
    are mixed before decoding.

    Args:
        urls: the shards: a brace pattern, a glob, or a list of paths or fsspec URLs.
        num_samples: samples an epoch (None: from ``sizes.json`` beside the shards).
        num_classes: classes of ``.cls`` (None: from ``classes.json``, if any).
        val_urls: the held-out shards.
        val_fraction: without them, the share of samples (by key hash) held out.
        resampled: draw shards with replacement (fresh samples after a resume).
        shuffle_buffer: raw samples mixed per worker before decoding.
        eval_samples: at most this many samples per split in evaluation.
        captions: take the captions.

    The other options (``img_size``, ``batch_size``, ``num_workers``, ``crop_scale``,
    ``flip``, ``local_crops``, ``augment``, ``repeated_aug``, ``augment_on``, ``decode_size``,
    ``interpolation``, ``seed``, ``tokenizer``, ``fields``, ``train_view``) build the views and
    the loader, as :class:`~m3i_lightning.data.module.ViewDataModule` says.

    Example:
        >>> data = WebDatasetData("shards/{000000..000127}.tar", img_size=224)  # doctest: +SKIP
    """

    def __init__(self, urls: str | Sequence[str] | None = None, img_size: int = 32,
                 batch_size: int = 128, num_workers: int = 2,
                 crop_scale: Sequence[float] = (0.2, 1.0), flip: bool = True,
                 num_samples: int | None = None,
                 num_classes: int | None = None, val_urls: str | Sequence[str] | None = None,
                 val_fraction: float = 0.01, resampled: bool = False,
                 shuffle_buffer: int = 1000, eval_samples: int = 10000, captions: bool = True,
                 seed: int = 0, tokenizer=None, fields: set[str] | None = None,
                 local_crops: dict | None = None,
                 augment: str = "none", repeated_aug: int = 1,
                 augment_on: str = "workers", decode_size: int | None = 320,
                 interpolation: str = "bilinear", train_view=None) -> None:
        super().__init__(img_size, batch_size, num_workers, crop_scale, flip, tokenizer, fields,
                         seed, val_fraction, local_crops, augment, repeated_aug, augment_on,
                         decode_size, interpolation, train_view)
        if not urls:
            raise ConfigError("data=webdataset needs data.urls=<shard pattern>, e.g. "
                              "'shards/{000000..000127}.tar'")
        self.shards = expand_urls(urls)
        if not self.shards:
            raise ConfigError(f"data.urls '{urls}' names no shard")
        self.val_shards = expand_urls(val_urls) if val_urls else None
        self.val_fraction = 0.0 if self.val_shards else val_fraction
        self.resampled, self.shuffle_buffer = resampled, shuffle_buffer
        self.eval_samples = eval_samples
        classes = read_json(sibling(self.shards[0], "classes.json"))
        if num_classes is None and isinstance(classes, list):
            num_classes = len(classes)
        names = (classes if isinstance(classes, list) and len(classes) == num_classes
                 else [str(i) for i in range(num_classes or 0)])
        self.num_samples = num_samples
        if num_samples is None:
            sizes = shard_sizes(self.shards)
            missing = missing_shards(self.shards) if sizes is None else []
            if missing:
                raise ConfigError(f"{len(missing)} of the {len(self.shards)} shards of data.urls "
                                  f"'{urls}' do not exist, e.g. {missing[0]}")
            if sizes is None:
                raise ConfigError(
                    f"the number of samples in {urls} is unknown: write a sizes.json beside the "
                    "shards (scripts/make_shards.py does) or set data.num_samples")
            self.num_samples = sum(sizes)
        source = ShardSource(self.shards, num_classes, 0.0, "train")
        require_usable(source.everything(), f"the shards {urls}")
        groups = [g for _, g in (s for s in islice(shard_samples(self.shards[0]), 64)
                                 if not isinstance(s, BadSample))]
        has_cls = any("cls" in g for g in groups)
        if has_cls and not num_classes:
            log.warning("shards %s have .cls members but no class count: set data.num_classes "
                        "or write classes.json beside them to train on labels", urls)
        has_captions = any((caption_of(g) or "").strip() for g in groups)
        self.announce(names if has_cls and num_classes else None, captions and has_captions)

    def held_out_options(self) -> str:
        if self.val_shards:
            return "labelled samples (.cls members) in the held-out shards data.val_urls"
        return ("held-out shards data.val_urls=<pattern> (a separate validation set), or a "
                f"bigger data.val_fraction (now {self.val_fraction}: the samples whose key "
                "hashes below it are held out of training)")

    def train_dataloader(self):
        rank, world_size, epoch, step = self.placement()
        batches = self.stream_batches(world_size)
        seed = f"{self.seed}/step {step}" if self.resampled else str(self.seed)
        source = ShardSource(self.shards, self.num_classes, self.val_fraction, "train",
                             self.resampled)
        stream = ViewStream(source, self.view, self.fields, batch_size=self.batch_size,
                            batches=batches, rank=rank, world=world_size, epoch=epoch, seed=seed,
                            shuffle_buffer=self.shuffle_buffer)
        return self.loader(stream, train=True)

    def eval_dataloader(self, split: str, rank: int = 0, world_size: int = 1):
        """Up to ``eval_samples`` whole labelled images of ``train`` or ``val``, this rank's
        part of them."""
        if split == "val" and self.val_shards:
            source = ShardSource(self.val_shards, self.num_classes, 0.0, "train")
        else:
            source = ShardSource(self.shards, self.num_classes, self.val_fraction, split)
        stream = ViewStream(source, self.view, {"label"}, batch_size=self.batch_size,
                            batches=None, train=False, rank=rank, world=world_size,
                            limit=-(-self.eval_samples // world_size))
        return self.loader(stream, train=False)
