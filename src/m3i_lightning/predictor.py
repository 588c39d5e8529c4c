"""The head f_ψ(z_x, t_x, t_y) of dense objectives: a small transformer that fills query slots."""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn


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


class TokenPredictor(nn.Module):
    """Predicts target tokens at query positions from the encoded (visible) tokens.

    The sequence is [encoded tokens + their positions, mask token + query position]; without
    attention masks a transformer is permutation-equivariant, so this equals MAE's decoder on
    the re-ordered full grid, and it also accepts queries at positions of another view.
    """

    def __init__(self, in_dim: int, out_dim: int, grid_size: tuple[int, int], dim: int = 128,
                 depth: int = 2, num_heads: int = 4, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_embedding(grid_coords(grid_size), dim),
                             persistent=False)
        self.blocks = nn.Sequential(*[Block(dim, num_heads, mlp_ratio, qkv_bias=True)
                                      for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, out_dim)
        nn.init.normal_(self.mask_token, std=0.02)

    def position(self, index: Tensor) -> Tensor:
        """Position embeddings of patch ``index`` [B, K] of the input grid."""
        return self.pos_embed[index]

    def forward(self, tokens: Tensor, visible_index: Tensor | None,
                query_pos: Tensor) -> Tensor:
        """``tokens`` [B, V, in_dim] at ``visible_index`` [B, V] (None = all patches in order);
        ``query_pos`` [B, Q, dim] position embeddings of the slots to predict → [B, Q, out_dim]."""
        b = tokens.shape[0]
        if visible_index is None:
            context_pos = self.pos_embed.unsqueeze(0).expand(b, -1, -1)
        else:
            context_pos = self.position(visible_index)
        queries = self.mask_token.expand(b, query_pos.shape[1], -1) + query_pos
        x = torch.cat([self.embed(tokens) + context_pos, queries], dim=1)
        x = self.norm(self.blocks(x))
        return self.head(x[:, tokens.shape[1]:])

