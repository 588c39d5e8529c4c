"""Where the patches of one crop lie in another crop of the same image.

Inter-view objectives predict a target view from an input view. A decoder query only knows
which patch of the target it must fill if it is told where that patch sits relative to the
input, so the two crops' geometry is turned into input-grid coordinates (SiameseIM's relative
position) plus the relative scale and flip of the target.

Conventions, shared with :class:`~m3i_lightning.data.views.RandomView`:

- a view's geometry is ``(top, left, height, width, flip)``: the crop box as fractions of the
  source image, and whether the resized crop was then mirrored left-right;
- *view fractions* ``(u, v)`` locate a point in a view as displayed (after its flip), ``u``
  downwards and ``v`` rightwards, both in [0, 1];
- in a grid of ``(gh, gw)`` patches, view fractions ``(u, v)`` have grid coordinates
  ``(u·gh − ½, v·gw − ½)``: the centre of patch ``(r, c)`` sits at the integers ``(r, c)``,
  the coordinates :func:`~m3i_lightning.core.positions.grid_coords` gives the input's own tokens.
  Coordinates are measured from the input view's top-left patch; a target patch outside the
  input crop gets coordinates outside ``[0, gh−1] × [0, gw−1]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from m3i_lightning.core.positions import grid_coords, sincos_embedding

# SiameseIM multiplies log-scales by 10 before the sin-cos encoding: crop-scale ratios lie
# within about [1/5, 5] (|log| < 1.7), which would barely turn the low-frequency channels.
LOG_SCALE_GAIN = 10.0


def view_to_image(geometry: Tensor, points: Tensor) -> Tensor:
    """View fractions ``points`` [B, K, 2] of views with ``geometry`` [B, 5] → the same
    points as (row, col) fractions of the source image [B, K, 2]."""
    top, left, height, width, flip = (g[:, None] for g in geometry.unbind(-1))
    u, v = points.unbind(-1)
    v = torch.where(flip > 0, 1 - v, v)
    return torch.stack([top + height * u, left + width * v], dim=-1)


def image_to_view(geometry: Tensor, points: Tensor) -> Tensor:
    """Inverse of :func:`view_to_image`: source-image fractions → view fractions."""
    top, left, height, width, flip = (g[:, None] for g in geometry.unbind(-1))
    y, x = points.unbind(-1)
    v = (x - left) / width
    return torch.stack([(y - top) / height, torch.where(flip > 0, 1 - v, v)], dim=-1)


def patch_centres(grid_size: tuple[int, int]) -> Tensor:
    """View fractions of the centre of every patch, row-major: [gh·gw, 2]."""
    return (grid_coords(grid_size) + 0.5) / torch.tensor(grid_size, dtype=torch.float32)


@dataclass
class RelativeGeometry:
    """The target view as seen from the input view (SiameseIM's relative box).

    ``origin`` [B, 2]: input-view fractions (row, col) of the target's displayed top-left
    corner. ``log_scale`` [B, 2]: log(target / input) crop height and width. ``flip`` [B]: 1
    where exactly one of the two views is mirrored, so the target's columns run right-to-left
    in the input. Together they are the affine map from target to input view fractions:
    ``u_in = origin_u + e^{log_scale_h}·u``, ``v_in = origin_v ± e^{log_scale_w}·v``.
    """

    origin: Tensor
    log_scale: Tensor
    flip: Tensor

    def to_input(self, points: Tensor) -> Tensor:
        """Target-view fractions [B, K, 2] → input-view fractions [B, K, 2]."""
        sign = torch.stack([torch.ones_like(self.flip), 1 - 2 * self.flip], dim=-1)
        return self.origin[:, None] + (sign * self.log_scale.exp())[:, None] * points

    def patch_coords(self, grid_size: tuple[int, int]) -> Tensor:
        """Grid coordinates in the input view of every target patch centre: [B, gh·gw, 2]."""
        size = torch.tensor(grid_size, dtype=self.origin.dtype, device=self.origin.device)
        centres = patch_centres(grid_size).to(self.origin)
        return self.to_input(centres.expand(self.origin.shape[0], -1, -1)) * size - 0.5

    def positions(self, grid_size: tuple[int, int], dim: int) -> Tensor:
        """Sin-cos position embedding [B, gh·gw, dim] of the target patches in the input grid:
        at the identity crop it equals the input tokens' own position embedding."""
        return sincos_embedding(self.patch_coords(grid_size), dim)

    def code(self, dim: int) -> Tensor:
        """Scale and flip of the target, which positions alone do not carry (a mirrored or
        zoomed patch looks different): sin-cos of the gained log-scales and ±1 for the flip,
        [B, dim + 1]."""
        scales = sincos_embedding(LOG_SCALE_GAIN * self.log_scale, dim)
        return torch.cat([scales, (2 * self.flip - 1)[:, None]], dim=-1)


def relative_geometry(input_geometry: Tensor, target_geometry: Tensor) -> RelativeGeometry:
    """Relative box of the target crop w.r.t. the input crop, both [B, 5] as
    :class:`~m3i_lightning.data.views.RandomView` returns them."""
    input_geometry, target_geometry = input_geometry.float(), target_geometry.float()
    corner = torch.zeros(input_geometry.shape[0], 1, 2, device=input_geometry.device)
    origin = image_to_view(input_geometry, view_to_image(target_geometry, corner))[:, 0]
    log_scale = (target_geometry[:, 2:4] / input_geometry[:, 2:4]).log()
    flip = ((input_geometry[:, 4] > 0) != (target_geometry[:, 4] > 0)).float()
    return RelativeGeometry(origin, log_scale, flip)
