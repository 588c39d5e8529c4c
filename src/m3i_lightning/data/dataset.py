"""Turns (image, label, caption) records into the batch dict objectives read."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

from m3i_lightning.data.skips import BadSample
from m3i_lightning.data.views import RandomView
from m3i_lightning.errors import M3IError

MISSING_LABEL = -100
MAX_REPLACEMENTS = 100


class ViewDataset(Dataset):
    """Builds only the requested ``fields`` of each sample: ``view1``, ``view2`` with their
    ``*_geometry``, ``label`` and ``caption`` (tokenised later, per batch, by :class:`Collate`).

    ``source[i]`` returns ``(image float [3,H,W] in [0,1], label int | None, caption str | None)``
    or raises :class:`BadSample`; a bad sample is replaced by a random other one, which carries
    the reason in ``skipped`` so the batch size stays fixed (ranks must agree on it). Crops
    draw from torch's generator of the worker, which ``seed_everything(workers=True)`` seeds
    per rank and worker, so runs with the same seed and worker count are reproducible.
    """

    def __init__(self, source: Sequence, view: RandomView, fields: set[str],
                 train: bool = True) -> None:
        self.source, self.view, self.fields, self.train = source, view, set(fields), train

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        skipped = []
        for _ in range(MAX_REPLACEMENTS):
            try:
                record = self.source[index]
                break
            except BadSample as bad:
                skipped.append(str(bad))
                index = int(torch.randint(len(self.source), ()))
        else:
            raise M3IError(f"{MAX_REPLACEMENTS} samples in a row could not be used, so most of "
                           f"the data is broken; the last: {skipped[-1]}")
        sample = self.build(*record)
        if skipped:
            sample["skipped"] = skipped
        return sample

    def build(self, image, label: int | None, caption: str | None) -> dict:
        """The requested fields of one decoded record; streamed datasets share it."""
        sample: dict = {}
        if not self.train:
            sample["image"] = self.view.center(image)
        else:
            rng = random.Random(int(torch.randint(2**62, ())))
            for name in ("view1", "view2"):
                if name in self.fields:
                    sample[name], sample[f"{name}_geometry"] = self.view(image, rng)
        if "label" in self.fields or not self.train:
            sample["label"] = MISSING_LABEL if label is None else label
        if "text" in self.fields:
            sample["caption"] = (caption or "").strip()
        return sample


class Collate:
    """Stacks samples and tokenises captions in the worker, so the training process only
    receives tensors; an empty caption gets ``text_valid = False``. Reasons of samples skipped
    in the worker travel as ``batch["skipped"]`` (a list of strings, absent when none)."""

    def __init__(self, tokenizer: Callable | None = None) -> None:
        self.tokenizer = tokenizer

    def __call__(self, samples: list[dict]) -> dict:
        captions = [s.pop("caption") for s in samples] if "caption" in samples[0] else None
        skipped = [reason for s in samples for reason in s.pop("skipped", ())]
        batch = default_collate(samples)
        if captions is not None:
            tokens = self.tokenizer(captions)
            batch["text"], batch["text_mask"] = tokens["input_ids"], tokens["attention_mask"]
            batch["text_valid"] = torch.tensor([bool(c) for c in captions])
        if skipped:
            batch["skipped"] = skipped
        return batch


def make_loader(dataset: Dataset, batch_size: int, num_workers: int, tokenizer=None,
                shuffle: bool = False, drop_last: bool = False) -> DataLoader:
    """The one DataLoader of every data module: decoding, both crops and tokenising run in
    persistent workers and batches arrive pinned on a GPU machine, so the training process
    does nothing per sample. Streamed datasets shuffle themselves."""
    return DataLoader(dataset, batch_size=batch_size,
                      shuffle=shuffle and not isinstance(dataset, IterableDataset),
                      drop_last=drop_last, num_workers=num_workers,
                      persistent_workers=num_workers > 0, collate_fn=Collate(tokenizer),
                      pin_memory=torch.cuda.is_available())
