"""k-nearest-neighbour classification on frozen features (the DINO protocol), at any scale.

The query × bank similarity matrix is never built whole (ImageNet's 50k × 1.28M would be
256 GB in float32): queries go ``chunk_size`` at a time, so the memory beyond the bank and the
queries is chunk_size × bank rows. The bank may stay sharded over ranks: each rank finds the k
nearest of its own rows and only those candidates are gathered.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from m3i_lightning.core.distributed import world
from m3i_lightning.core.shares import gather_rows, valid_rows


@torch.no_grad()
def extract_features(backbone: nn.Module, loader: DataLoader, gather: bool = False,
                     skipped: list[str] | None = None) -> tuple[Tensor, Tensor]:
    """Global features (float32, on the CPU) and labels of every batch of ``loader`` (keys
    ``image``, ``label``, and ``valid`` for a rank's share, see :mod:`m3i_lightning.core.shares`).
    On a GPU the backbone runs in bf16 autocast. ``gather``: the shares of every rank, in
    rank order (a collective: every rank must call it). Empty tensors for a loader that
    yields nothing. ``skipped``: a list that receives this rank's reasons of the samples its
    batches left out (``batch["skipped"]``: unreadable images)."""
    was_training = backbone.training
    backbone.eval()
    device = next(backbone.parameters()).device
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    feats, labels = [], []
    for batch in loader:
        if skipped is not None:
            skipped.extend(batch.get("skipped", ()))
        keep = valid_rows(batch)
        with autocast:
            encoded = backbone(batch["image"].to(device, non_blocking=True))
        feats.append(encoded.global_feature.float()[keep.to(device)])
        labels.append(batch["label"][keep].to(device))
    backbone.train(was_training)
    if not feats:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    features, labels = torch.cat(feats), torch.cat(labels)
    if gather:
        features, labels = gather_rows(features), gather_rows(labels)
    return features.cpu(), labels.cpu()


def nearest(bank: Tensor, queries: Tensor, k: int,
            chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Cosine similarities [Q, k'] and bank rows [Q, k'] of the k' = min(k, bank rows) nearest
    bank features of each query, best first; ``chunk_size`` queries at a time (None: all)."""
    bank = F.normalize(bank, dim=-1)
    k = min(k, bank.shape[0])
    step = queries.shape[0] if chunk_size is None else chunk_size
    if step <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    sims, rows = [], []
    for chunk in queries.split(max(step, 1)):
        top_sims, top_rows = (F.normalize(chunk, dim=-1) @ bank.T).topk(k, dim=-1)
        sims.append(top_sims)
        rows.append(top_rows)
    if not sims:
        return queries.new_zeros((0, k)), torch.zeros((0, k), dtype=torch.long)
    return torch.cat(sims), torch.cat(rows)


def vote(top_sims: Tensor, top_labels: Tensor, num_classes: int, temperature: float) -> Tensor:
    """Class scores [Q, C]: each neighbour votes for its label with weight exp(sim / T),
    added in place (a one-hot [Q, k, C] tensor would be 20 × the scores' size)."""
    scores = top_sims.new_zeros((top_sims.shape[0], num_classes))
    return scores.scatter_add_(1, top_labels, (top_sims / temperature).exp())


def _merge_over_ranks(top_sims: Tensor, top_labels: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k best of every rank's candidates, for the same queries on every rank."""
    _, size = world()
    gathered_sims = [torch.empty_like(top_sims) for _ in range(size)]
    gathered_labels = [torch.empty_like(top_labels) for _ in range(size)]
    dist.all_gather(gathered_sims, top_sims.contiguous())
    dist.all_gather(gathered_labels, top_labels.contiguous())
    sims, labels = torch.cat(gathered_sims, dim=1), torch.cat(gathered_labels, dim=1)
    best_sims, best = sims.topk(min(k, sims.shape[1]), dim=-1)
    return best_sims, labels.gather(1, best)


def knn_predict(bank: Tensor, bank_labels: Tensor, queries: Tensor, num_classes: int,
                k: int = 20, temperature: float = 0.07, chunk_size: int | None = None,
                sharded_bank: bool = False) -> Tensor:
    """Class scores [Q, C] of the weighted kNN: cosine similarity to the ``k`` nearest bank
    features, each voting for its label with weight exp(similarity / temperature).

    ``chunk_size``: queries compared at a time (None: all at once). ``sharded_bank``: ``bank``
    is this rank's part of the bank and every rank holds the same ``queries``; the result is
    the one for the whole bank, on every rank (a collective). Each rank's part must hold at
    least ``k`` rows, so that its candidates contain every global neighbour it owns.
    """
    top_sims, top_rows = nearest(bank, queries, k, chunk_size)
    top_labels = bank_labels.to(top_rows.device)[top_rows]
    if sharded_bank and world()[1] > 1:
        if bank.shape[0] < k:
            raise ValueError(f"a bank shard of {bank.shape[0]} rows is smaller than k={k}")
        top_sims, top_labels = _merge_over_ranks(top_sims, top_labels, k)
    return vote(top_sims, top_labels, num_classes, temperature)
