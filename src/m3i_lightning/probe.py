"""Linear probe on frozen features: how linearly separable a pre-trained representation is.

One recipe, shared by the online monitor (refitted at every validation) and the eval command:
features are extracted once, so training the probe costs only the linear layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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
                     seed: int = 0) -> LinearProbe:
    """Train a :class:`LinearProbe` with AdamW and a per-step cosine decay of the learning rate.

    Runs with gradients even when called from a validation loop (inference mode), and draws
    its initialisation and batch order from its own generator seeded with ``seed``: the
    training RNG is untouched, and every rank of a DDP run fits the same probe from the same
    gathered features.
    """
    with torch.inference_mode(False), torch.enable_grad():
        x, y = features.detach().float().clone(), labels.detach().clone()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            probe = LinearProbe(x.shape[1], num_classes)
        probe.mean.copy_(x.mean(0))
        probe.std.copy_(x.std(0, unbiased=False).clamp_min(1e-6))
        probe = probe.to(x.device)
        optimizer = torch.optim.AdamW(probe.linear.parameters(), lr=lr,
                                      weight_decay=weight_decay)
        steps_per_epoch = math.ceil(len(x) / batch_size)
        total = epochs * steps_per_epoch
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
        generator = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=generator).to(x.device)
            for rows in order.split(batch_size):
                loss = F.cross_entropy(probe(x[rows]), y[rows])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
    return probe.requires_grad_(False).eval()
