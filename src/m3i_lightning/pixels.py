"""Pixel targets of the Gaussian pixel objectives (ae, mim_pixel, nvs, sim_pixel)."""

from __future__ import annotations

from torch import Tensor


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """[B, C, H, W] → [B, N, p·p·C], patches in row-major order (timm's token order)."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: Tensor, patch_size: int, grid_size: tuple[int, int]) -> Tensor:
    """Inverse of :func:`patchify`: [B, N, p·p·C] → [B, C, H, W]."""
    b, _, d = patches.shape
    p, (gh, gw) = patch_size, grid_size
    c = d // (p * p)
    x = patches.reshape(b, gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, c, gh * p, gw * p)


def normalize_patches(patches: Tensor, eps: float = 1e-6) -> Tensor:
    """MAE's ``norm_pix_loss`` target: each patch standardised by its own mean and variance."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps).sqrt()
