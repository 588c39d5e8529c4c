"""Relative geometry of two crops: exact for known crops, and consistent with the real crops."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from m3i_lightning.components.geometry import (
    image_to_view,
    patch_centres,
    relative_geometry,
    view_to_image,
)
from m3i_lightning.components.pixels import patchify
from m3i_lightning.core.positions import grid_coords, sincos_embedding
from m3i_lightning.data.views import RandomView

GRID = (4, 4)
FULL = (0.0, 0.0, 1.0, 1.0, 0.0)


def geometry(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def coords(input_geometry, target_geometry, grid=GRID) -> torch.Tensor:
    """Input-grid (row, col) of every target patch, for one pair of crops: [N, 2]."""
    rel = relative_geometry(geometry(input_geometry), geometry(target_geometry))
    return rel.patch_coords(grid)[0]


def expected(rows, cols) -> torch.Tensor:
    """Row-major (row, col) pairs from the per-row and per-column values."""
    return torch.tensor([[r, c] for r in rows for c in cols])


@pytest.mark.parametrize("crop", [FULL, (0.0, 0.0, 1.0, 1.0, 1.0), (0.1, 0.3, 0.6, 0.45, 0.0),
                                  (0.1, 0.3, 0.6, 0.45, 1.0)])
def test_identity_crop_puts_every_target_patch_on_the_same_input_patch(crop):
    rel = relative_geometry(geometry(crop), geometry(crop))
    torch.testing.assert_close(rel.patch_coords(GRID)[0], grid_coords(GRID), atol=1e-5, rtol=0)
    torch.testing.assert_close(rel.origin, torch.zeros(1, 2), atol=1e-6, rtol=0)
    assert rel.log_scale.abs().max() < 1e-6 and rel.flip.item() == 0
    # the queries then coincide with the input tokens' own position embedding
    torch.testing.assert_close(rel.positions(GRID, 32)[0], sincos_embedding(grid_coords(GRID), 32),
                               atol=1e-5, rtol=0)


def test_horizontal_flip_reverses_the_columns():
    flipped = (0.0, 0.0, 1.0, 1.0, 1.0)
    reversed_columns = expected(rows=[0, 1, 2, 3], cols=[3, 2, 1, 0])
    for pair in [(FULL, flipped), (flipped, FULL)]:
        rel = relative_geometry(geometry(pair[0]), geometry(pair[1]))
        assert torch.equal(rel.patch_coords(GRID)[0], reversed_columns)
        assert rel.flip.item() == 1
        torch.testing.assert_close(rel.origin, torch.tensor([[0.0, 1.0]]))


def test_half_size_crop_at_a_known_offset():
    # target: rows 1/4..3/4 and columns 1/2..1 of the image; input: the whole image.
    # target patch (r, c) centre = image (1/4 + (r + 1/2)/8, 1/2 + (c + 1/2)/8)
    # → input grid (4·y − 1/2, 4·x − 1/2) = (0.75 + 0.5 r, 1.75 + 0.5 c)
    half = (0.25, 0.5, 0.5, 0.5, 0.0)
    assert torch.equal(coords(FULL, half), expected([0.75, 1.25, 1.75, 2.25],
                                                    [1.75, 2.25, 2.75, 3.25]))
    rel = relative_geometry(geometry(FULL), geometry(half))
    torch.testing.assert_close(rel.origin, torch.tensor([[0.25, 0.5]]))
    torch.testing.assert_close(rel.log_scale, torch.full((1, 2), math.log(0.5)))
    # the same crop mirrored: its first displayed column is the image's right edge
    mirrored = (0.25, 0.5, 0.5, 0.5, 1.0)
    assert torch.equal(coords(FULL, mirrored), expected([0.75, 1.25, 1.75, 2.25],
                                                        [3.25, 2.75, 2.25, 1.75]))
    torch.testing.assert_close(relative_geometry(geometry(FULL), geometry(mirrored)).origin,
                               torch.tensor([[0.25, 1.0]]))


def test_zoomed_input_sees_a_wider_target_outside_its_grid():
    # input: the half crop above; target: the whole image, twice as large in both axes
    # → rows 2r − 1.5, columns 2c − 3.5 (negative = left of / above the input crop)
    half = (0.25, 0.5, 0.5, 0.5, 0.0)
    assert torch.equal(coords(half, FULL), expected([-1.5, 0.5, 2.5, 4.5],
                                                    [-3.5, -1.5, 0.5, 2.5]))
    torch.testing.assert_close(relative_geometry(geometry(half), geometry(FULL)).log_scale,
                               torch.full((1, 2), math.log(2.0)))


def test_scale_is_per_axis():
    # target: the top half of the image, full width → rows compressed, columns unchanged
    top_half = (0.0, 0.0, 0.5, 1.0, 0.0)
    assert torch.equal(coords(FULL, top_half), expected([-0.25, 0.25, 0.75, 1.25],
                                                        [0, 1, 2, 3]))
    rel = relative_geometry(geometry(FULL), geometry(top_half))
    torch.testing.assert_close(rel.log_scale, torch.tensor([[math.log(0.5), 0.0]]))
    # a non-square grid keeps its own row and column units
    assert torch.equal(coords(FULL, top_half, grid=(2, 3)), expected([-0.25, 0.25], [0, 1, 2]))


def random_geometry(n: int, generator: torch.Generator) -> torch.Tensor:
    size = 0.2 + 0.8 * torch.rand(n, 2, generator=generator)
    corner = (1 - size) * torch.rand(n, 2, generator=generator)
    flip = (torch.rand(n, 1, generator=generator) < 0.5).float()
    return torch.cat([corner, size, flip], dim=1)


def test_relative_box_is_the_composition_of_the_two_crops():
    """The affine map (origin, scale, flip) equals target view → image → input view."""
    g = torch.Generator().manual_seed(0)
    input_geometry, target_geometry = random_geometry(64, g), random_geometry(64, g)
    centres = patch_centres((3, 5)).expand(64, -1, -1)
    through_image = image_to_view(input_geometry, view_to_image(target_geometry, centres))
    rel = relative_geometry(input_geometry, target_geometry)
    torch.testing.assert_close(rel.to_input(centres), through_image)
    torch.testing.assert_close(rel.patch_coords((3, 5)),
                               through_image * torch.tensor([3.0, 5.0]) - 0.5)
    torch.testing.assert_close(image_to_view(target_geometry,
                                             view_to_image(target_geometry, centres)), centres)


def patch_source_points(view: torch.Tensor, patch: int) -> torch.Tensor:
    """Source-image (row, col) fractions each patch of a ramp view shows: [N, 2]."""
    ramps = view[:2] * 0.5 + 0.5  # undo RandomView's (x − 0.5) / 0.5
    return patchify(ramps[None], patch)[0].reshape(-1, patch * patch, 2).mean(1)


def test_geometry_matches_the_crops_random_view_makes():
    """On an image whose pixels hold their own (row, col) fraction, each view's patches show
    the image points the geometry predicts, and a target patch shows the same point as the
    input view at its relative coordinates."""
    size, patch, source = 32, 4, 96
    grid = (size // patch,) * 2
    centre = (torch.arange(source) + 0.5) / source
    image = torch.stack([centre[:, None].expand(source, source),
                         centre[None, :].expand(source, source),
                         torch.zeros(source, source)])
    view = RandomView(size, scale=(0.3, 1.0))
    rng = random.Random(3)
    checked = 0
    for _ in range(8):
        (input_view, input_geometry), (target_view, target_geometry) = (
            view(image, rng), view(image, rng))
        input_points = patch_source_points(input_view, patch)
        target_points = patch_source_points(target_view, patch)
        centres = patch_centres(grid)[None]
        torch.testing.assert_close(view_to_image(input_geometry[None], centres)[0], input_points,
                                   atol=2e-3, rtol=0)
        # read the input view at each target patch's relative coordinates (bilinear on the
        # patch grid, exact for a ramp); only where the target patch lies inside the input
        rel = relative_geometry(input_geometry[None], target_geometry[None])
        at = rel.patch_coords(grid)[0]
        inside = ((at >= 0) & (at <= grid[0] - 1)).all(-1)
        normalised = (at[inside].flip(-1) / (grid[0] - 1) * 2 - 1)[None, None]
        input_grid = input_points.T.reshape(1, 2, *grid)
        seen = F.grid_sample(input_grid, normalised, align_corners=True)[0, :, 0].T
        torch.testing.assert_close(seen, target_points[inside], atol=2e-3, rtol=0)
        checked += int(inside.sum())
    assert checked > 50
