"""Pixel targets of the Gaussian pixel objectives (ae, mim_pixel, nvs, sim_pixel)."""

from __future__ import annotations

from torch import Tensor

from m3i_lightning.core.encoded import gather_tokens


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


def _paste(patches: Tensor, index: Tensor, values: Tensor) -> Tensor:
    """``patches`` [B, N, D] with rows ``index`` [B, K] replaced by ``values`` [B, K, D]."""
    return patches.scatter(1, index.unsqueeze(-1).expand_as(values), values)


def reconstruction_panels(inputs: Tensor, target: Tensor, pred: Tensor, index: Tensor | None,
                          masked_index: Tensor | None, patch_size: int,
                          norm_pix: bool) -> dict[str, Tensor]:
    """The pictures of a pixel objective (see ``Objective.reconstruct``).

    ``inputs``: the encoded view; ``target``: the target view; ``pred`` [B, K, p·p·C] the
    predicted patches at ``index`` [B, K] of the target (None: all, in order). The prediction
    is pasted over the target, so unpredicted (visible) patches show the truth, as in MAE's
    figures; normalised predictions are shown with each target patch's own mean and variance.
    The masked input has its ``masked_index`` patches blanked (0, the normalised mean).
    """
    p = patch_size
    target_patches = patchify(target, p)
    truth = target_patches if index is None else gather_tokens(target_patches, index)
    if norm_pix:
        var = truth.var(dim=-1, keepdim=True)
        pred = pred * (var + 1e-6).sqrt() + truth.mean(dim=-1, keepdim=True)
    shown = pred if index is None else _paste(target_patches, index, pred)
    panels = {"input": inputs}
    if masked_index is not None:
        input_patches = patchify(inputs, p)
        blank = gather_tokens(input_patches, masked_index).zero_()
        grid = (inputs.shape[-2] // p, inputs.shape[-1] // p)
        panels["masked input"] = unpatchify(_paste(input_patches, masked_index, blank), p, grid)
    grid = (target.shape[-2] // p, target.shape[-1] // p)
    panels["prediction"] = unpatchify(shown.to(target.dtype), p, grid)
    panels["target"] = target
    return panels
