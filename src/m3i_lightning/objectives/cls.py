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
        if not known.any():  # no labelled sample (-100 = missing): the mean would be 0/0 = NaN
            return logits.sum() * 0, {}
        loss = self.distribution(logits, labels)
        with torch.no_grad():
            accuracy = (logits.argmax(-1) == labels)[known].float().mean()
        return loss, {"acc": accuracy}
