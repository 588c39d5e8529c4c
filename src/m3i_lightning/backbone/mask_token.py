"""Masked input by a learned mask token (SimMIM, BEiT, data2vec): the patch embedding of every
hidden cell is replaced by one learned vector and the whole grid is encoded, so the network
also gives outputs at the hidden cells. The mechanism of the hierarchical families, which
cannot skip cells, and of a ViT built with ``mask_token=True``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from m3i_lightning.core.encoded import Part


def new_mask_token(width: int) -> nn.Parameter:
    """A mask token of ``width`` channels, initialised with std 0.02 (SimMIM, BEiT, data2vec)."""
    token = nn.Parameter(torch.zeros(width))
    nn.init.normal_(token, std=0.02)
    return token


class MaskTokenInput:
    """Mixin of a :class:`~m3i_lightning.backbone.base.Backbone` whose ``mask_token`` fills the
    hidden cells of its patch embedding. The embedding's layout: ``channels_last`` (channels
    after the cells, [B, H, W, D] or a ViT's [B, N, D]; else [B, D, H, W]), and ``cell_size``
    patch-embedding cells per final-grid cell along each side (1 for a ViT)."""

    mask_token: nn.Parameter
    channels_last: bool
    cell_size: int = 1

    def _spatial(self, x: Tensor) -> tuple[int, ...]:
        return tuple(x.shape[1:-1] if self.channels_last else x.shape[2:])

    def cell_mask(self, visible: Tensor, embedded: Tensor) -> Tensor:
        """True on the patch-embedding cells of the final-grid cells ``visible`` [B, V], shaped
        to broadcast over ``embedded``."""
        grid = [size // self.cell_size for size in self._spatial(embedded)]
        keep = torch.zeros(visible.shape[0], math.prod(grid), dtype=torch.bool,
                           device=visible.device).scatter_(1, visible, True).view(-1, *grid)
        for axis in range(1, len(grid) + 1):
            keep = keep.repeat_interleave(self.cell_size, axis)
        return keep.unsqueeze(-1 if self.channels_last else 1)

    def compose(self, parts: Sequence[Part]) -> Tensor:
        """One patch embedding: each part's visible cells, the mask token everywhere else."""
        first = parts[0][0]
        token = self.mask_token.to(first.dtype)
        x = token if self.channels_last else token.view(-1, *(1,) * len(self._spatial(first)))
        for embedded, visible in parts:
            x = embedded if visible is None else torch.where(self.cell_mask(visible, embedded),
                                                             embedded, x)
        return x
