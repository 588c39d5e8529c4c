"""Cross-rank helpers that also work, as identities, in a single process."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor


def world() -> tuple[int, int]:
    """(rank, world_size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: Tensor) -> tuple[Tensor, int]:
    """Concatenate ``x`` [B, ...] from all ranks along dim 0, keeping gradients to every shard.

    Returns the gathered tensor and this rank's row offset in it, for local-loss InfoNCE:
    each rank scores its own rows against all candidates, and the autograd all-gather sends
    the candidates' gradients back to the ranks that own them.
    """
    rank, size = world()
    if size == 1:
        return x, 0
    return torch.cat(dist_fn.all_gather(x), dim=0), rank * x.shape[0]


def sum_over_ranks(x: Tensor) -> Tensor:
    """Sum ``x`` over ranks, without gradient: statistics of data sharded over ranks."""
    _, size = world()
    if size == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x


def mean_over_ranks(x: Tensor) -> Tensor:
    """Average ``x`` over ranks, without gradient: with equal per-rank batches, a per-rank batch
    mean becomes the mean over the global batch (DINO's center)."""
    _, size = world()
    if size == 1:
        return x
    return sum_over_ranks(x) / size


def sum_with_grad(x: Tensor) -> Tensor:
    """Sum ``x`` over ranks; the backward sums the gradients over ranks too, so every rank's
    input gets the gradient of every rank's loss (synchronised BatchNorm statistics)."""
    _, size = world()
    if size == 1:
        return x
    return dist_fn.all_reduce(x)
