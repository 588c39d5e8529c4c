"""Samples that cannot be used: how a worker marks one, and how the training process reports them.

A bad file must neither crash an epoch nor vanish silently. In training, the DataLoader worker
that meets it raises :class:`BadSample` internally, moves on to the next sample and attaches the
reason to the sample it delivers instead; evaluation delivers a row left out of every score,
with the reason (see :class:`~m3i_lightning.data.dataset.ViewDataset`).
:class:`~m3i_lightning.data.dataset.Collate` gathers those reasons into ``batch["skipped"]``.
Worker processes share no memory with the trainer, so the batch is the only channel back:
:class:`SkipReport` reads it in the training process, sums it over ranks and logs one line per
epoch; evaluation counts them (:func:`tally`) and reports them with its scores.
"""

from __future__ import annotations

import logging
from collections import Counter

import lightning as L
import torch.distributed as dist

log = logging.getLogger(__name__)


class BadSample(Exception):
    """One sample that cannot be used; ``reason`` groups the count, ``detail`` names the file."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def split_entry(entry: str) -> tuple[str, str]:
    """``"reason: detail"`` (the string form of a :class:`BadSample`) → (reason, detail)."""
    reason, _, detail = entry.partition(": ")
    return reason, detail


class SkipReport(L.Callback):
    """Counts ``batch["skipped"]`` and logs ``skipped N samples: …`` at the end of each epoch
    in which any sample was skipped; ``data/skipped`` goes to the logger every epoch."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, str] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        for entry in batch.get("skipped", ()) if isinstance(batch, dict) else ():
            self.add(entry)

    def add(self, entry: str) -> None:
        reason, detail = split_entry(entry)
        self.counts[reason] += 1
        self.examples.setdefault(reason, detail)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        counts, examples = self.counts, self.examples
        if dist.is_available() and dist.is_initialized():
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (counts, examples))
            counts = sum((c for c, _ in gathered), Counter())
            examples = {k: v for _, e in reversed(gathered) for k, v in e.items()}
        total = sum(counts.values())
        pl_module.log("data/skipped", float(total), sync_dist=True)  # equal on every rank
        if total and trainer.is_global_zero:
            log.warning("skipped %d samples: %s", total, summary(counts, examples))
        self.counts, self.examples = Counter(), {}


def tally(entries) -> tuple[Counter, dict[str, str]]:
    """Counts by reason of ``entries`` (``"reason: detail"``) and the first detail of each."""
    counts, examples = Counter(), {}
    for entry in entries:
        reason, detail = split_entry(entry)
        counts[reason] += 1
        examples.setdefault(reason, detail)
    return counts, examples


def summary(counts: Counter, examples: dict[str, str]) -> str:
    """``3 unreadable image (e.g. a.jpg: truncated); 1 …``, most frequent reason first."""
    return "; ".join(f"{n} {reason} (e.g. {examples[reason]})"
                     for reason, n in counts.most_common())
