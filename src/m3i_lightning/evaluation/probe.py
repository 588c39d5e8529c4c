"""Linear probe on frozen features: how linearly separable a pre-trained representation is.

One recipe, shared by the online monitor (refitted at every validation) and the eval command:
features are extracted once, so training the probe costs only the linear layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m3i_lightning.core.distributed import mean_over_ranks, sum_over_ranks, world
from m3i_lightning.core.shares import row_counts


class LinearProbe(nn.Module):
    """A linear classifier on features standardised by the training features' mean and std.

    The standardisation plays the role of MAE's affine-free BatchNorm before the probe, but it
    is computed once from the frozen features, so the probe itself has no BatchNorm layer and
    behaves identically in training and evaluation.
    """

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, features: Tensor) -> Tensor:
        return self.linear((features.float() - self.mean) / self.std)


def fit_linear_probe(features: Tensor, labels: Tensor, num_classes: int, epochs: int = 50,
                     batch_size: int = 256, lr: float = 1e-2, weight_decay: float = 1e-4,
                     seed: int = 0, sharded: bool = False) -> LinearProbe:
    """Train a :class:`LinearProbe` with AdamW and a per-step cosine decay of the learning rate.

    Runs with gradients even when called from a validation loop (inference mode), and draws
    its initialisation and batch order from its own generator seeded with ``seed``: the
    training RNG is untouched, and every rank that holds the same features fits the same probe.

    ``sharded``: ``features`` are this rank's share of the training set, the shares in rank
    order making the whole (a collective: every rank calls it). The standardisation is that of
    the whole set; each step draws the batch one process would draw from the whole set, every
    rank scores the rows of it that it holds, and the gradients are averaged over ranks as DDP
    does, each rank's loss scaled so that the average is the one-process batch mean: every
    rank ends with the one-process probe, without the features ever being gathered.
    """
    with torch.inference_mode(False), torch.enable_grad():
        x, y = features.detach().float().clone(), labels.detach().clone()
        rank, ranks = world() if sharded else (0, 1)
        counts = row_counts(x) if sharded else [len(x)]
        first, total = sum(counts[:rank]), sum(counts)
        over_ranks = sum_over_ranks if sharded else (lambda t: t)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            probe = LinearProbe(x.shape[1], num_classes)
        mean = over_ranks(x.sum(0)) / total
        variance = over_ranks((x - mean).square().sum(0)) / total
        probe.mean.copy_(mean)
        probe.std.copy_(variance.sqrt().clamp_min(1e-6))
        probe = probe.to(x.device)
        parameters = list(probe.linear.parameters())
        optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
        steps_per_epoch = math.ceil(total / batch_size)
        steps = epochs * steps_per_epoch
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
        generator = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            for rows in torch.randperm(total, generator=generator).split(batch_size):
                mine = rows[(rows >= first) & (rows < first + len(x))].to(x.device) - first
                loss = F.cross_entropy(probe(x[mine]), y[mine], reduction="sum")
                optimizer.zero_grad(set_to_none=True)
                (loss * (ranks / len(rows))).backward()
                if sharded:
                    for p in parameters:
                        p.grad = mean_over_ranks(p.grad)
                optimizer.step()
                scheduler.step()
    return probe.requires_grad_(False).eval()
