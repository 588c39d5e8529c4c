"""Turns (image, label, caption) records into the batch dict objectives read."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

from m3i_lightning.core.errors import ConfigError, M3IError, check_options
from m3i_lightning.core.shares import VALID_KEY
from m3i_lightning.data.device_views import LISTED_KEYS, device_fields
from m3i_lightning.data.images import EncodedImage
from m3i_lightning.data.sampling import ResumableLoader, ResumableSampler
from m3i_lightning.data.skips import BadSample
from m3i_lightning.data.views import CropSet

MISSING_LABEL = -100
MAX_REPLACEMENTS = 100


class ViewDataset(Dataset):
    """Builds only the requested ``fields`` of each sample: ``view1``, ``view2`` (and the
    local crops ``local1`` ...) with their ``*_geometry``, ``label`` and ``caption``
    (tokenised later, per batch, by :class:`Collate`). With ``data.augment_on=device`` the
    views are not built here: the sample carries the image (uint8, or a JPEG's bytes) and each
    view's parameters (:func:`~m3i_lightning.data.device_views.device_fields`).

    ``source[i]`` returns ``(image, label int | None, caption str | None)`` or raises
    :class:`BadSample`; the image is an :class:`~m3i_lightning.data.images.EncodedImage` (a
    file, decoded here once for all its views) or a float [3,H,W] tensor in [0,1]. In
    training, a sample that cannot be read or decoded is replaced by a random other one, which
    carries the reason in ``skipped`` so the batch size stays fixed (ranks must agree on it);
    the random draws of a sample come from the seed its key carries (see :meth:`__getitem__`),
    so a run is reproducible with any worker count and resumes exactly. In evaluation
    (``train=False``) nothing is drawn: every sample is marked ``valid``, and one that cannot
    be read is dropped (:meth:`unreadable`), never swapped for another image and its label.
    """

    def __init__(self, source: Sequence, view: CropSet, fields: set[str],
                 train: bool = True) -> None:
        self.source, self.view, self.fields, self.train = source, view, set(fields), train

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        """``key``: an index, or ``(index, seed)`` from a
        :class:`~m3i_lightning.data.sampling.ResumableSampler`: every random draw of the sample
        then comes from ``seed``, whichever worker builds it and whenever."""
        index, seed = key if isinstance(key, tuple) else (key, None)
        if not self.train:
            try:
                return {**self.build(*self.source[index]), VALID_KEY: True}
            except BadSample as bad:
                return self.unreadable([str(bad)])
        rng = random.Random(int(torch.randint(2**62, ())) if seed is None else seed)
        skipped = []
        for _ in range(MAX_REPLACEMENTS):
            try:
                sample = self.build(*self.source[index], rng=rng)
                break
            except BadSample as bad:
                skipped.append(str(bad))
                index = rng.randrange(len(self.source))
        else:
            raise M3IError(f"{MAX_REPLACEMENTS} samples in a row could not be used, so most of "
                           f"the data is broken; the last: {skipped[-1]}")
        if skipped:
            sample["skipped"] = skipped
        return sample

    def unreadable(self, reasons: list[str]) -> dict:
        """The row an evaluation batch keeps for samples that cannot be used: a blank image
        without label, not ``valid`` (left out of every score), their ``reasons`` in
        ``skipped`` (counted and reported)."""
        sample = {"image": self.view.center(torch.zeros(3, 8, 8)), "label": MISSING_LABEL,
                  VALID_KEY: False, "skipped": list(reasons)}
        if "text" in self.fields:
            sample["caption"] = ""
        return sample

    def build(self, image, label: int | None, caption: str | None,
              rng: random.Random | None = None) -> dict:
        """The requested fields of one record; streamed datasets share it (their crops draw
        from the worker's torch generator when no ``rng`` is given). Raises
        :class:`BadSample` when the image cannot be decoded."""
        sample: dict = {}
        if not self.train:
            sample["image"] = self.view.center(image)
        else:
            rng = rng or random.Random(int(torch.randint(2**62, ())))
            names = [name for name in self.view.names if name in self.fields]
            if self.view.on_device:
                sample.update(device_fields(self.view, names, image, rng))
            elif isinstance(image, EncodedImage) and isinstance(self.view, CropSet):
                sample.update(self.view.render(names, image, rng))
            else:  # a float image, or a view that crops one (fine-tuning's timm recipe)
                if isinstance(image, EncodedImage):
                    image = image.tensor()
                for name in names:
                    sample[name], sample[f"{name}_geometry"] = self.view(name, image, rng)
        if "label" in self.fields or not self.train:
            sample["label"] = MISSING_LABEL if label is None else label
        if "text" in self.fields:
            sample["caption"] = (caption or "").strip()
        return sample


class Collate:
    """Stacks samples and tokenises captions in the worker, so the training process only
    receives tensors; an empty caption gets ``text_valid = False``. Reasons of samples skipped
    in the worker travel as ``batch["skipped"]`` (a list of strings, absent when none), JPEG
    files for the device as lists (:data:`~m3i_lightning.data.device_views.LISTED_KEYS`)."""

    def __init__(self, tokenizer: Callable | None = None) -> None:
        self.tokenizer = tokenizer

    def __call__(self, samples: list[dict]) -> dict:
        captions = [s.pop("caption") for s in samples] if "caption" in samples[0] else None
        skipped = [reason for s in samples for reason in s.pop("skipped", ())]
        listed = {key: [s.pop(key) for s in samples] for key in LISTED_KEYS if key in samples[0]}
        batch = default_collate(samples)
        batch.update(listed)
        if captions is not None:
            tokens = self.tokenizer(captions)
            batch["text"], batch["text_mask"] = tokens["input_ids"], tokens["attention_mask"]
            batch["text_valid"] = torch.tensor([bool(c) for c in captions])
        if skipped:
            batch["skipped"] = skipped
        return batch


def check_loader_options(batch_size, num_workers, crop_scale, val_fraction,
                         repeated_aug: int = 1) -> None:
    """Refuse the data options that cannot load (or would crop outside the image), naming
    the ``data.`` option and its range, before any file is read."""
    checks = {
        "data.batch_size": (batch_size, lambda v: isinstance(v, int) and v >= 1,
                            "an integer >= 1"),
        "data.num_workers": (num_workers, lambda v: isinstance(v, int) and v >= 0,
                             "an integer >= 0"),
        "data.crop_scale": (crop_scale, lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1,
                            "[min, max] with 0 < min <= max <= 1"),
        "data.val_fraction": (val_fraction, lambda v: 0 <= v < 1, "a number in [0, 1)"),
        "data.repeated_aug": (repeated_aug, lambda v: isinstance(v, int) and v >= 1,
                              "an integer >= 1")}
    check_options(checks)


def make_loader(dataset: Dataset, batch_size: int, num_workers: int, tokenizer=None,
                shuffle: bool = False, drop_last: bool = False, seed: int = 0,
                repeated_aug: int = 1) -> DataLoader:
    """The one DataLoader of every data module: decoding, both crops and tokenising run in
    persistent workers and batches arrive pinned on a GPU machine, so the training process
    does nothing per sample. Streamed datasets shuffle themselves; map-style data shuffles
    with ``seed`` through a :class:`ResumableLoader`, which resumes mid-epoch exactly, each
    image ``repeated_aug`` times when that is > 1 (DeiT's repeated augmentation)."""
    streamed = isinstance(dataset, IterableDataset)
    if shuffle and streamed and repeated_aug > 1:
        raise ConfigError(f"data.repeated_aug={repeated_aug} repeats images through a sampler, "
                          "which streamed data has not: use 1 (or map-style data)")
    options = dict(batch_size=batch_size, drop_last=drop_last, num_workers=num_workers,
                   persistent_workers=num_workers > 0, collate_fn=Collate(tokenizer),
                   pin_memory=torch.cuda.is_available())
    if shuffle and not streamed:
        return ResumableLoader(dataset, ResumableSampler(dataset, seed, repeats=repeated_aug),
                               **options)
    return DataLoader(dataset, **options)
