"""Mask generators with a fixed number of visible tokens per sample, so batches stay rectangular."""

from __future__ import annotations

import math
import random

import torch
from torch import Tensor


class MaskGenerator:
    """Base: ``__call__`` returns a boolean mask [B, N] (True = masked) with exactly
    ``num_masked`` True values in every row, and ``split`` turns it into index tensors.
    A ``guided`` generator draws from the teacher's class attention of the same images, which
    the engine computes first and passes as ``attention`` [B, N]."""

    guided = False

    def __init__(self, grid_size: tuple[int, int], ratio: float) -> None:
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
        self.grid_size = tuple(grid_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.num_masked = int(round(ratio * self.num_patches))
        self.num_visible = self.num_patches - self.num_masked

    def __call__(self, batch_size: int, device: torch.device | str = "cpu",
                 attention: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def split(self, mask: Tensor) -> tuple[Tensor, Tensor]:
        """(visible_index [B, V], masked_index [B, M]), each sorted by patch position."""
        order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)
        return order[:, : self.num_visible], order[:, self.num_visible:]


class RandomMask(MaskGenerator):
    """Uniformly random patches (MAE, SimMIM, SiameseIM)."""

    def __call__(self, batch_size: int, device: torch.device | str = "cpu",
                 attention: Tensor | None = None) -> Tensor:
        noise = torch.rand(batch_size, self.num_patches, device=device)
        rank = noise.argsort(dim=1).argsort(dim=1)
        return rank < self.num_masked


class BlockMask(MaskGenerator):
    """Block-wise masking (BEiT): rectangles of random area and aspect ratio until the budget
    is reached, then trimmed or topped up at random so every row has the same count."""

    def __init__(self, grid_size: tuple[int, int], ratio: float, min_block: int = 4,
                 aspect: tuple[float, float] = (0.3, 1 / 0.3)) -> None:
        super().__init__(grid_size, ratio)
        self.min_block = min_block
        self.log_aspect = (math.log(aspect[0]), math.log(aspect[1]))

    def _one(self, rng: random.Random) -> Tensor:
        h, w = self.grid_size
        mask = torch.zeros(h, w, dtype=torch.bool)
        for _ in range(10 * self.num_patches):
            covered = int(mask.sum())
            if covered >= self.num_masked:
                break
            area = rng.uniform(self.min_block, max(self.min_block, self.num_masked - covered))
            ratio = math.exp(rng.uniform(*self.log_aspect))
            bh = min(h, max(1, int(round(math.sqrt(area * ratio)))))
            bw = min(w, max(1, int(round(math.sqrt(area / ratio)))))
            top, left = rng.randint(0, h - bh), rng.randint(0, w - bw)
            mask[top: top + bh, left: left + bw] = True
        flat = mask.flatten()
        excess = int(flat.sum()) - self.num_masked
        pool = flat.nonzero().flatten() if excess > 0 else (~flat).nonzero().flatten()
        flip = pool[torch.randperm(len(pool), generator=_torch_gen(rng))[: abs(excess)]]
        flat[flip] = excess < 0
        return flat

    def __call__(self, batch_size: int, device: torch.device | str = "cpu",
                 attention: Tensor | None = None) -> Tensor:
        rng = random.Random(int(torch.randint(0, 2**31 - 1, ()).item()))
        return torch.stack([self._one(rng) for _ in range(batch_size)]).to(device)


class AttentionMask(MaskGenerator):
    """MILAN's semantic-aware sampling: the visible patches are drawn one after another
    without replacement, each with probability proportional to the teacher's class-token
    attention among those left (``torch.multinomial``), so salient patches are mostly kept
    and the student reconstructs the background from them (models_milan.py,
    ``attention_masking``)."""

    guided = True

    def __call__(self, batch_size: int, device: torch.device | str = "cpu",
                 attention: Tensor | None = None) -> Tensor:
        if attention is None or attention.shape != (batch_size, self.num_patches):
            raise ValueError(f"attention masking needs the teacher's class attention "
                             f"[{batch_size}, {self.num_patches}], got "
                             f"{None if attention is None else tuple(attention.shape)}")
        visible = torch.multinomial(attention.float(), self.num_visible, replacement=False)
        mask = torch.ones(batch_size, self.num_patches, dtype=torch.bool, device=attention.device)
        return mask.scatter_(1, visible, False)


def _torch_gen(rng: random.Random) -> torch.Generator:
    return torch.Generator().manual_seed(rng.randrange(2**31))


MASKS = {"random": RandomMask, "block": BlockMask, "attention": AttentionMask}


def build_mask(kind: str, grid_size: tuple[int, int], ratio: float) -> MaskGenerator:
    if kind not in MASKS:
        raise ValueError(f"unknown mask kind '{kind}'; choose one of {sorted(MASKS)}")
    return MASKS[kind](grid_size, ratio)
