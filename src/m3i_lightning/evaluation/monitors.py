"""Online monitors of a pre-training run: kNN and linear-probe top-1 at every validation epoch.

Design. Validation feeds two loaders of whole (un-augmented) images: the memory, i.e. the
training split, then the held-out split as queries (``EmbeddedDigits.val_dataloader``). The
engine's ``validation_step`` returns the detached global features, and :class:`ProbeMonitor`
hands them to torchmetrics metrics whose states are concatenated over ranks, so under DDP
every rank scores the whole held-out split against the whole memory.

Why a memory of train-split features re-extracted at validation time rather than a running
bank of training features: training batches are encoded masked (and possibly mixed), so their
global features are not the representation a user will probe, and a bank filled over an
epoch mixes features of backbones of different ages. Re-extracting costs one forward pass
over the training split per validation, which ``trainer.check_val_every_n_epoch`` keeps rare.
The linear probe is refitted on the same features at each validation (milliseconds for a
linear layer), detached, so it can never reach the backbone's gradients or optimizer.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import lightning as L
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from m3i_lightning.core.errors import EmptySplitError
from m3i_lightning.data.module import held_out_options
from m3i_lightning.evaluation.knn import knn_predict
from m3i_lightning.evaluation.probe import fit_linear_probe

log = logging.getLogger(__name__)

MEMORY_LOADER = 0  # index of the training-split loader among the validation loaders
STATES = ("memory_features", "memory_labels", "query_features", "query_labels")


class FrozenFeatureAccuracy(Metric):
    """Top-1 of a classifier fitted on frozen memory features, scored on query features.

    ``update(features, labels, memory=...)`` appends a batch of either kind; samples without a
    label (negative) are left out. All four states are lists reduced by concatenation over
    ranks, so :meth:`compute` sees the same global tensors on every rank. Under DDP Lightning's
    sampler pads each split to a multiple of the world size by repeating a few samples (at
    most world_size − 1 per split), which shifts the accuracy by at most that many samples.
    """

    full_state_update = False

    def __init__(self, num_classes: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes
        for name in STATES:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, features: Tensor, labels: Tensor, memory: bool = False) -> None:
        known = labels >= 0
        kind = "memory" if memory else "query"
        getattr(self, f"{kind}_features").append(features[known].detach().float())
        getattr(self, f"{kind}_labels").append(labels[known].detach())

    def compute(self) -> Tensor:
        """:class:`EmptySplitError` when the memory or the queries hold no labelled sample."""
        counts = [sum(len(t) for t in state) if isinstance(state, list) else len(state)
                  for state in (self.memory_labels, self.query_labels)]
        if not all(counts):
            raise EmptySplitError(f"{type(self).__name__} needs memory and query features; got "
                                  f"{counts[0]} and {counts[1]}")
        memory, memory_labels, queries, labels = (dim_zero_cat(getattr(self, n)) for n in STATES)
        predicted = self.predict(memory, memory_labels.long(), queries)
        return (predicted == labels).float().mean()

    def predict(self, memory: Tensor, memory_labels: Tensor, queries: Tensor) -> Tensor:
        """Predicted class of each query."""
        raise NotImplementedError


class KNNAccuracy(FrozenFeatureAccuracy):
    """Weighted kNN of the DINO protocol (cosine, ``k`` neighbours, exp(sim / T) votes)."""

    def __init__(self, num_classes: int, k: int = 20, temperature: float = 0.07,
                 **kwargs) -> None:
        super().__init__(num_classes, **kwargs)
        self.k, self.temperature = k, temperature

    def predict(self, memory, memory_labels, queries):
        return knn_predict(memory, memory_labels, queries, self.num_classes, self.k,
                           self.temperature).argmax(-1)


class LinearProbeAccuracy(FrozenFeatureAccuracy):
    """A :func:`~m3i_lightning.evaluation.probe.fit_linear_probe` fitted on the memory features."""

    def __init__(self, num_classes: int, probe: Mapping | None = None, **kwargs) -> None:
        super().__init__(num_classes, **kwargs)
        self.probe_options = dict(probe or {})

    def predict(self, memory, memory_labels, queries):
        probe = fit_linear_probe(memory, memory_labels, self.num_classes, **self.probe_options)
        return probe(queries).argmax(-1)


class ProbeMonitor(L.Callback):
    """Logs ``val/knn_top1`` and ``val/linear_top1`` after every validation epoch.

    Expects the validation loaders memory-first (see the module docstring) and a module whose
    ``validation_step`` returns global features. Nothing is logged for Lightning's sanity
    check, whose two batches per loader make no meaningful memory.
    """

    def __init__(self, num_classes: int, k: int = 20, temperature: float = 0.07,
                 probe: Mapping | None = None) -> None:
        self.metrics = {"val/knn_top1": KNNAccuracy(num_classes, k, temperature),
                        "val/linear_top1": LinearProbeAccuracy(num_classes, probe)}
        self.warned = False

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                                dataloader_idx: int = 0) -> None:
        for metric in self.metrics.values():
            metric.update(outputs, batch["label"], memory=dataloader_idx == MEMORY_LOADER)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        for name, metric in self.metrics.items():
            if not trainer.sanity_checking:
                self._log(name, metric, trainer, pl_module)
            metric.reset()

    def _log(self, name: str, metric: FrozenFeatureAccuracy, trainer, pl_module) -> None:
        """The same value on every rank (states gathered over ranks): sync_dist's mean leaves
        it unchanged and only tells Lightning the value is global. An empty split (the same on
        every rank) is warned about once and not logged."""
        try:
            value = metric.compute()
        except EmptySplitError as err:
            if not self.warned and trainer.is_global_zero:
                log.warning("online kNN / linear probe skipped: %s; evaluation needs %s", err,
                            held_out_options(trainer.datamodule))
            self.warned = True
            return
        pl_module.log(name, value, prog_bar=True, sync_dist=True)
