"""MLP heads of the global objectives, built one way so projectors and predictors stay alike."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from m3i_lightning.core.distributed import sum_with_grad, world


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are those of the global batch, over all ranks.

    The reference methods (MoCo v3, BYOL, Barlow Twins, MSN) normalise their heads with
    synchronised BatchNorm, and a multi-process run must equal one process on the concatenated
    batch; torch's SyncBatchNorm needs a GPU, this one also runs on CPU (gloo). Mean and
    variance are two all-reduces whose backward reaches every rank. In one process, or in eval
    mode, it is plain BatchNorm1d.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or world()[1] == 1:
            return super().forward(x)
        x = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16/fp16: statistics in fp32
        totals = sum_with_grad(torch.cat([x.sum(0), x.new_tensor([x.shape[0]])]))
        count = totals[-1]
        mean = totals[:-1] / count
        var = sum_with_grad((x - mean).pow(2).sum(0)) / count
        if self.track_running_stats:
            self._track(mean.detach(), var.detach() * count / (count - 1))
        out = (x - mean) * torch.rsqrt(var + self.eps)
        return out * self.weight + self.bias if self.affine else out

    @torch.no_grad()
    def _track(self, mean: Tensor, unbiased_var: Tensor) -> None:
        self.num_batches_tracked.add_(1)
        momentum = self.momentum if self.momentum is not None else 1 / self.num_batches_tracked
        self.running_mean.lerp_(mean, momentum)
        self.running_var.lerp_(unbiased_var, momentum)


NORMS = {"bn": GlobalBatchNorm1d, "ln": nn.LayerNorm, None: None}


def mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2,
        norm: str | None = None, act: type[nn.Module] = nn.GELU) -> nn.Sequential:
    """``num_layers`` linear layers with [norm →] activation between them, none after the last.

    This is the shape of the projectors and predictors of DINO (GELU, no norm), BYOL / SimSiam /
    MoCo v3 / Barlow Twins (BatchNorm, ReLU) and MSN (BatchNorm, GELU); ``norm`` is ``'bn'``
    (:class:`GlobalBatchNorm1d`), ``'ln'`` or None.
    """
    if num_layers < 1:
        raise ValueError(f"an MLP head needs at least one layer, got {num_layers}")
    if norm not in NORMS:
        raise ValueError(f"unknown head norm '{norm}'; choose one of {list(NORMS)}")
    dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        layers.append(nn.Linear(d_in, d_out))
        if i < num_layers - 1:
            if norm is not None:
                layers.append(NORMS[norm](d_out))
            layers.append(act())
    return nn.Sequential(*layers)
