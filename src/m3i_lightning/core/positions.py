"""Fixed 2-D sin-cos position embeddings: the queries of every decoder, and the encoder
positions of MAE, MoCo v3 and SiameseIM (``backbone.position_embedding=sincos``)."""

from __future__ import annotations

import torch
from torch import Tensor


def sincos_embedding(coords: Tensor, dim: int) -> Tensor:
    """Fixed 2-D sin-cos embedding of continuous (row, col) ``coords`` [..., 2] → [..., dim].

    Half the channels encode the row and half the column, as in MAE's decoder, but the
    coordinates may be fractional or outside the grid, which relative (inter-view) queries need.
    """
    if dim % 4:
        raise ValueError(f"sin-cos embedding needs a dimension divisible by 4, got {dim}")
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, device=coords.device, dtype=torch.float32)
                            / (dim // 4))
    angles = coords.float().unsqueeze(-1) * freqs
    return torch.cat([angles[..., 0, :].sin(), angles[..., 0, :].cos(),
                      angles[..., 1, :].sin(), angles[..., 1, :].cos()], dim=-1)


def grid_coords(grid_size: tuple[int, int]) -> Tensor:
    """(row, col) of every patch of a grid, row-major: [H·W, 2]."""
    rows, cols = torch.meshgrid(torch.arange(grid_size[0]), torch.arange(grid_size[1]),
                                indexing="ij")
    return torch.stack([rows.flatten(), cols.flatten()], dim=-1).float()
