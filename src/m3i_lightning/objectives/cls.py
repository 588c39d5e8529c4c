"""`cls`: supervised classification as a Boltzmann distribution over learned category embeddings."""

from __future__ import annotations

import torch
from torch import nn

from m3i_lightning.distributions import Boltzmann
from m3i_lightning.objectives.base import Objective


class Classification(Objective):
    """ViT/DeiT supervised pre-training: softmax CE of the global feature against every class
    embedding (the rows of a linear layer); the other classes are the negatives."""

    name = "cls"
    form = "Boltzmann"
    target_repr = "category"
    requires = frozenset({"label"})

    def __init__(self, num_classes: int, label_smoothing: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.class_embed = nn.Linear(self.embed_dim, num_classes)
        self.distribution = Boltzmann(label_smoothing)

    def loss(self, batch, encoded, targets):
        logits = self.class_embed(encoded.global_feature)
        labels = batch["label"]
        known = labels >= 0
        # No labelled sample (-100 = missing): the mean would be 0/0 = NaN, so the loss then
        # reads class 0 and is multiplied by 0; decided on the device, never asked (a host sync).
        labelled = known.any()
        loss = self.distribution(logits, labels.where(labelled, 0)) * labelled
        with torch.no_grad():  # NaN without a labelled sample
            accuracy = ((logits.argmax(-1) == labels) & known).sum() / known.sum()
        return loss, {"acc": accuracy}
