"""Mask generators: a fixed masked count per row and a clean visible / masked split."""

from __future__ import annotations

import pytest
import torch

from m3i_lightning.components.masking import AttentionMask, BlockMask, RandomMask, build_mask

GENERATORS = [RandomMask, BlockMask]


@pytest.mark.parametrize("kind", GENERATORS)
@pytest.mark.parametrize("grid, ratio, expected", [((4, 4), 0.75, 12), ((8, 8), 0.5, 32),
                                                   ((14, 14), 0.4, 78), ((4, 6), 0.0, 0)])
def test_exact_masked_count_per_row(kind, grid, ratio, expected):
    torch.manual_seed(0)
    gen = kind(grid, ratio)
    assert gen.num_masked == expected
    assert gen.num_visible == grid[0] * grid[1] - expected
    mask = gen(16)
    assert mask.dtype == torch.bool
    assert mask.shape == (16, grid[0] * grid[1])
    assert mask.sum(dim=1).tolist() == [expected] * 16


@pytest.mark.parametrize("kind", GENERATORS)
def test_rows_differ(kind):
    torch.manual_seed(0)
    mask = kind((8, 8), 0.5)(8)
    assert len({tuple(row.tolist()) for row in mask}) > 1


@pytest.mark.parametrize("kind", GENERATORS)
def test_split_is_disjoint_sorted_and_complete(kind):
    torch.manual_seed(1)
    gen = kind((6, 6), 0.6)
    mask = gen(10)
    visible, masked = gen.split(mask)
    assert visible.shape == (10, gen.num_visible)
    assert masked.shape == (10, gen.num_masked)
    for row in range(10):
        vis, hid = visible[row].tolist(), masked[row].tolist()
        assert vis == sorted(vis) and hid == sorted(hid)
        assert not set(vis) & set(hid)
        assert sorted(vis + hid) == list(range(36))
        # the split agrees with the mask it came from
        assert all(not mask[row, i] for i in vis)
        assert all(mask[row, i] for i in hid)


def test_split_of_a_given_mask():
    gen = RandomMask((2, 3), 0.5)
    mask = torch.tensor([[True, False, True, False, False, True],
                         [False, False, False, True, True, True]])
    visible, masked = gen.split(mask)
    assert visible.tolist() == [[1, 3, 4], [0, 1, 2]]
    assert masked.tolist() == [[0, 2, 5], [3, 4, 5]]


def test_block_mask_is_blockier_than_random():
    """Masked patches of BlockMask have far more masked 4-neighbours than uniform masking."""

    def masked_neighbour_fraction(mask: torch.Tensor) -> float:
        grid = mask.reshape(-1, 14, 14).float()
        padded = torch.nn.functional.pad(grid, (1, 1, 1, 1))
        neighbours = (padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1]
                      + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:])
        return float((neighbours * grid).sum() / (4 * grid.sum()))

    torch.manual_seed(0)
    block = masked_neighbour_fraction(BlockMask((14, 14), 0.4)(32))
    random = masked_neighbour_fraction(RandomMask((14, 14), 0.4)(32))
    assert random < 0.45
    assert block > random + 0.2


@pytest.mark.parametrize("kind", GENERATORS)
@pytest.mark.parametrize("ratio", [1.0, 1.5, -0.1])
def test_ratio_validation(kind, ratio):
    with pytest.raises(ValueError, match="ratio"):
        kind((4, 4), ratio)


def test_build_mask():
    assert isinstance(build_mask("random", (4, 4), 0.5), RandomMask)
    block = build_mask("block", (4, 4), 0.5)
    assert isinstance(block, BlockMask) and block.num_masked == 8
    assert isinstance(build_mask("attention", (4, 4), 0.5), AttentionMask)
    with pytest.raises(ValueError, match="random"):
        build_mask("checkerboard", (4, 4), 0.5)


# --- MILAN's attention-guided masks -------------------------------------------------------


def test_attention_mask_keeps_the_count_and_the_patches_the_attention_peaks_at():
    """A class token attending only to 4 of 16 patches: those are the 4 visible ones
    (ratio 0.75, MILAN's), every row masking exactly 12."""
    torch.manual_seed(0)
    gen = AttentionMask((4, 4), 0.75)
    peaks = torch.stack([torch.randperm(16)[:4] for _ in range(32)])
    attention = torch.full((32, 16), 1e-12).scatter_(1, peaks, 1.0)
    mask = gen(32, attention=attention)
    assert mask.sum(dim=1).tolist() == [12] * 32
    visible, _ = gen.split(mask)
    assert torch.equal(visible, peaks.sort(dim=1).values)


def test_attention_mask_draws_patches_in_proportion_to_attention_without_replacement():
    """Two visible patches of four drawn one after the other, each in proportion to the
    attention of the patches left: P({i, j}) = p_i p_j / (1 - p_i) + p_j p_i / (1 - p_j)."""
    torch.manual_seed(0)
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    rows = 40000
    mask = AttentionMask((2, 2), 0.5)(rows, attention=p.expand(rows, -1))
    kept = (~mask).float()
    for i in range(4):
        for j in range(i + 1, 4):
            expected = p[i] * p[j] / (1 - p[i]) + p[j] * p[i] / (1 - p[j])
            observed = (kept[:, i] * kept[:, j]).mean()
            assert observed == pytest.approx(expected.item(), abs=0.015), (i, j)


def test_attention_mask_needs_the_attention_of_its_rows():
    gen = AttentionMask((4, 4), 0.75)
    with pytest.raises(ValueError, match=r"class attention \[2, 16\], got None"):
        gen(2)
    with pytest.raises(ValueError, match=r"got \(2, 9\)"):
        gen(2, attention=torch.rand(2, 9))
