"""`cls`: supervised classification as a Boltzmann distribution over learned category embeddings."""

from __future__ import annotations

import random

import torch
from torch import nn

from m3i_lightning.components.batch_mixup import BatchMixup
from m3i_lightning.components.distributions import Boltzmann
from m3i_lightning.core.seeding import seeded_globals
from m3i_lightning.objectives.base import Objective


class Classification(Objective):
    """ViT/DeiT supervised pre-training: softmax CE of the global feature against every class
    embedding (the rows of a linear layer); the other classes are the negatives.

    ``mixup`` / ``cutmix`` > 0: DeiT's Mixup / CutMix (:class:`BatchMixup`, switching with
    ``mixup_switch_prob``) of view1 in each training batch; the loss is then the cross-entropy
    against the mixed soft targets, smoothed by ``label_smoothing`` (as DeiT smooths inside
    them). The mixing changes the images every objective would read, so it trains alone.

    ``loss="bce"``: DeiT III's binary cross-entropy instead (:class:`Boltzmann`'s ``bce``):
    each class present or not on its own, every class of a mixed image present.

    Args:
        num_classes: the categories of the data (the factory passes the data's).
        label_smoothing: probability mass spread evenly over the classes (DeiT: 0.1).
        mixup: Mixup's Beta alpha on view1 per batch (DeiT: 0.8; 0: off).
        cutmix: CutMix's Beta alpha (DeiT: 1.0; 0: off).
        mixup_switch_prob: probability of CutMix instead of Mixup when both are on (DeiT: 0.5).
        loss: ``ce`` (softmax cross-entropy) or ``bce`` (DeiT III, needs no label smoothing).
        **kwargs: the options of every objective
        (:class:`~m3i_lightning.objectives.base.Objective`): ``weight``, and the backbone's
        ``embed_dim``, ``grid_size``, ``patch_size``.

    Example:
        >>> from m3i_lightning import Backbone
        >>> backbone = Backbone("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=1)
        >>> model = Classification(backbone=backbone, num_classes=10)
        >>> type(model.head).__name__
        'Classification'
    """

    name = "cls"
    reads_global_feature = True
    form = "Boltzmann"
    target_repr = "category"
    requires = frozenset({"label"})

    def __init__(self, num_classes: int, label_smoothing: float = 0.0, mixup: float = 0.0,
                 cutmix: float = 0.0, mixup_switch_prob: float = 0.5, loss: str = "ce",
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.class_embed = nn.Linear(self.embed_dim, num_classes)
        self.distribution = Boltzmann(label_smoothing, loss)
        self.mixup = None
        if mixup > 0 or cutmix > 0:
            self.mixup = BatchMixup(mixup, cutmix, num_classes, mixup_switch_prob)

    @property
    def augments_batch(self) -> bool:
        return self.mixup is not None

    def augment_batch(self, batch: dict) -> dict:
        """view1 mixed, with its soft targets (``mixed_label``) and which rows have them
        (``mixed_valid``: the image and its partner both labelled; missing labels, −100,
        enter the mix as class 0 and leave their rows out of the loss)."""
        if self.mixup is None:
            return batch
        labels = batch["label"]
        known = labels >= 0
        # timm draws from the global streams: seeded from torch's, like the masks
        with seeded_globals(random.Random(int(torch.randint(2**62, ())))):
            images, targets = self.mixup(batch["view1"].clone(), labels.clamp(min=0))
        return {**batch, "view1": images, "mixed_label": targets,
                "mixed_valid": known & known.flip(0)}

    def loss(self, batch, encoded, targets):
        logits = self.class_embed(encoded.global_feature)
        labels = batch["label"]
        known = labels >= 0
        if "mixed_label" in batch:
            target, valid = batch["mixed_label"], batch["mixed_valid"]
        else:
            target, valid = labels.clamp(min=0), known
        # the mean over the valid rows; 0 without one (not 0/0 = NaN), decided on the device,
        # never asked (a host sync)
        per_row = self.distribution(logits, target, reduction="none")
        loss = (per_row * valid).sum() / valid.sum().clamp(min=1)
        with torch.no_grad():  # NaN without a labelled sample
            accuracy = ((logits.argmax(-1) == labels) & known).sum() / known.sum()
        return loss, {"acc": accuracy}
