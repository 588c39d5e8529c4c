"""k-nearest-neighbour classification on frozen features (the DINO protocol)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader


@torch.no_grad()
def extract_features(backbone: nn.Module, loader: DataLoader) -> tuple[Tensor, Tensor]:
    """Global features and labels of every batch of ``loader`` (keys ``image``, ``label``);
    empty tensors for a loader that yields nothing."""
    was_training = backbone.training
    backbone.eval()
    device = next(backbone.parameters()).device
    feats, labels = [], []
    for batch in loader:
        feats.append(backbone(batch["image"].to(device)).global_feature.float().cpu())
        labels.append(batch["label"])
    backbone.train(was_training)
    if not feats:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels)


def knn_predict(bank: Tensor, bank_labels: Tensor, queries: Tensor, num_classes: int,
                k: int = 20, temperature: float = 0.07) -> Tensor:
    """Class scores [Q, C]: cosine similarity to the ``k`` nearest bank features, each
    neighbour voting for its label with weight exp(similarity / temperature)."""
    sims = F.normalize(queries, dim=-1) @ F.normalize(bank, dim=-1).T
    top_sims, top_idx = sims.topk(min(k, bank.shape[0]), dim=-1)
    votes = F.one_hot(bank_labels[top_idx], num_classes).float()
    return (votes * (top_sims / temperature).exp().unsqueeze(-1)).sum(dim=1)
