"""Turns (image, label, caption) records into the batch dict objectives read."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch
from torch.utils.data import Dataset, default_collate

from m3i_lightning.data.views import RandomView

MISSING_LABEL = -100


class ViewDataset(Dataset):
    """Builds only the requested ``fields`` of each sample: ``view1``, ``view2`` with their
    ``*_geometry``, ``label`` and ``caption`` (tokenised later, per batch, by :class:`Collate`).

    ``source[i]`` returns ``(image float [3,H,W] in [0,1], label int | None, caption str | None)``.
    Crops draw from torch's generator of the worker, which ``seed_everything(workers=True)``
    seeds per rank and worker, so runs with the same seed and worker count are reproducible.
    """

    def __init__(self, source: Sequence, view: RandomView, fields: set[str],
                 train: bool = True) -> None:
        self.source, self.view, self.fields, self.train = source, view, set(fields), train

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        image, label, caption = self.source[index]
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
            sample["caption"] = caption or ""
        return sample


class Collate:
    """Stacks samples and tokenises captions in the worker, so the training process only
    receives tensors; an empty caption gets ``text_valid = False``."""

    def __init__(self, tokenizer: Callable | None = None) -> None:
        self.tokenizer = tokenizer

    def __call__(self, samples: list[dict]) -> dict:
        captions = [s.pop("caption") for s in samples] if "caption" in samples[0] else None
        batch = default_collate(samples)
        if captions is not None:
            tokens = self.tokenizer(captions)
            batch["text"], batch["text_mask"] = tokens["input_ids"], tokens["attention_mask"]
            batch["text_valid"] = torch.tensor([bool(c) for c in captions])
        return batch
