"""Augmentations of the recipes' view pipelines: torchvision v2 and timm transforms, drawn
from each sample's own seed, asymmetric between the two views as BYOL's table states, and
DeiT's RandAugment + random erasing and DeiT III's 3-Augment."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from timm.data.auto_augment import RandAugment as TimmRandAugment

from m3i_lightning.data.views import (
    AUGMENTATIONS,
    CropSet,
    Photometric,
    RandAugment,
    RandomView,
    ThreeAugment,
    crop_box,
)

IDENTITY = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def image() -> torch.Tensor:
    return torch.rand(3, 24, 24, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("augment", ["byol", "deit", "three_augment"])
def test_a_view_is_a_function_of_its_seed_and_leaves_the_global_streams(augment):
    """timm's RandAugment draws from Python's and NumPy's streams, random erasing and
    torchvision from torch's: all are seeded from the sample's stream and put back."""
    crops = CropSet(16, (0.3, 1.0), augment=augment)
    streams = lambda: (random.random(), np.random.rand(), torch.rand(()).item())  # noqa: E731
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    expected = streams()
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    first, _ = crops("view2", image(), random.Random(7))
    again, _ = crops("view2", image(), random.Random(7))
    assert streams() == expected
    others = [crops("view2", image(), random.Random(seed))[0] for seed in (8, 9)]
    assert torch.equal(first, again) and not any(torch.equal(first, o) for o in others)


def test_the_colour_transform_runs_after_the_crop_on_the_same_stream():
    """Solarisation alone, always on: the view is the solarised plain crop of the same seed
    (same box, same flip)."""
    plain = RandomView(16, (0.3, 1.0), **IDENTITY)
    solarised = RandomView(16, (0.3, 1.0), **IDENTITY, photometric=Photometric(
        jitter_p=0.0, grayscale_p=0.0, solarize_p=1.0))
    view, geometry = solarised(image(), random.Random(3))
    raw, raw_geometry = plain(image(), random.Random(3))
    torch.testing.assert_close(view, TF.solarize(raw, 0.5))
    assert torch.equal(geometry, raw_geometry)


def probabilities(transform: T.Compose) -> dict[str, float]:
    found = {}
    for step in transform.transforms:
        inner = step.transforms[0] if isinstance(step, T.RandomApply) else step
        found[type(inner).__name__] = step.p
    return found


def test_byol_pipeline_is_asymmetric_as_the_paper_states():
    """BYOL Table 6: jitter (0.4, 0.4, 0.2, 0.1) at 0.8, grayscale 0.2, blur 1.0 / 0.1,
    solarisation 0 / 0.2; DINO's local crops blur at 0.5."""
    crops = CropSet(32, (0.3, 1.0), augment="byol")
    view1, view2 = (probabilities(crops.views[v].photometric) for v in ("view1", "view2"))
    local = probabilities(crops.local_view.photometric)
    assert view1 == {"ColorJitter": 0.8, "RandomGrayscale": 0.2, "GaussianBlur": 1.0,
                     "RandomSolarize": 0.0}
    assert view2 == {**view1, "GaussianBlur": 0.1, "RandomSolarize": 0.2}
    assert local["GaussianBlur"] == 0.5
    jitter = crops.views["view1"].photometric.transforms[0].transforms[0]
    assert (jitter.brightness, jitter.contrast, jitter.saturation) == ((0.6, 1.4),) * 2 + (
        (0.8, 1.2),)
    assert jitter.hue == (-0.1, 0.1)


def test_no_augmentation_by_default_and_a_clear_error_for_an_unknown_one():
    assert CropSet(16, (0.3, 1.0)).views["view1"].photometric is None
    assert set(AUGMENTATIONS) == {"none", "byol", "mocov2", "deit", "three_augment"}
    with pytest.raises(ValueError, match="data.augment"):
        CropSet(16, (0.3, 1.0), augment="simclr")


def test_crops_resample_as_data_interpolation_says_bicubic_for_deit():
    """The crop box of the view's stream, resized bicubically (antialiased, clipped to [0, 1]
    as PIL's 8-bit result is): a different picture from the bilinear default."""
    views = {mode: CropSet(8, (0.3, 1.0), flip=False, interpolation=mode).views["view1"]
             for mode in ("bilinear", "bicubic")}
    assert views["bicubic"].interpolation == T.InterpolationMode.BICUBIC
    assert CropSet(8, (0.3, 1.0)).local_view.interpolation == T.InterpolationMode.BILINEAR
    top, left, h, w = crop_box(24, 24, (0.3, 1.0), (3 / 4, 4 / 3), random.Random(3))
    expected = TF.resized_crop(image(), top, left, h, w, [8, 8], T.InterpolationMode.BICUBIC,
                               antialias=True).clamp(0, 1)
    bicubic = views["bicubic"](image(), random.Random(3))[0]
    torch.testing.assert_close(bicubic, TF.normalize(expected, [0.5] * 3, [0.5] * 3))
    bilinear = views["bilinear"](image(), random.Random(3))[0]
    assert (bicubic - bilinear).abs().max() > 1e-2
    with pytest.raises(ValueError, match="unknown interpolation 'nearest'"):
        CropSet(8, (0.3, 1.0), interpolation="nearest")
    with pytest.raises(ValueError, match="data.interpolation=bicubic resamples in the loader"):
        CropSet(8, (0.3, 1.0), augment_on="device", interpolation="bicubic")


def test_deit_views_are_timm_randaugment_and_random_erasing_as_deit_states():
    """DeiT: RandAugment rand-m9-mstd0.5-inc1 (2 operations, magnitude 9, std 0.5, the
    increasing-severity set) and random erasing 0.25 in pixel mode, once, on every view."""
    crops = CropSet(32, (0.08, 1.0), augment="deit")
    for view in (*crops.views.values(), crops.local_view):
        policy = next(t for t in view.photometric.transforms if isinstance(t, TimmRandAugment))
        assert policy.num_layers == 2
        assert {op.magnitude for op in policy.ops} == {9}
        assert {op.magnitude_std for op in policy.ops} == {0.5}
        assert "SolarizeIncreasing" in {op.name for op in policy.ops}
        assert policy.ops[0].hparams["translate_const"] == int(view.size * 0.45)
        erasing = view.erasing
        assert (erasing.probability, erasing.mode, erasing.max_count) == (0.25, "pixel", 1)


def test_random_erasing_replaces_one_box_of_the_normalised_crop_with_noise():
    """With no RandAugment operation (n0) and erasing always on, the view is the plain crop of
    the same seed (up to the 8-bit round trip) but for one box of per-pixel normal noise."""
    plain = RandomView(32, (0.3, 1.0), **IDENTITY)
    erased = RandomView(32, (0.3, 1.0), **IDENTITY,
                        photometric=RandAugment(policy="rand-n0-m9", erasing=1.0))
    for seed in range(5):
        view, geometry = erased(image(), random.Random(seed))
        raw, raw_geometry = plain(image(), random.Random(seed))
        assert torch.equal(geometry, raw_geometry)
        changed = ((view - raw).abs() > 1.5 / 255).any(0)
        rows, cols = changed.any(1).nonzero().squeeze(1), changed.any(0).nonzero().squeeze(1)
        box = changed[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert box.float().mean() > 0.9  # one filled rectangle
        assert 0.02 * 32 * 32 * 0.9 <= box.numel() <= 32 * 32 / 3 * 1.1  # timm's area range
        inside = view[:, rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert inside.min() < 0 and inside.max() > 1  # normal noise, not image values


def variation(x: torch.Tensor) -> float:
    return float(x.diff(dim=-1).abs().mean() + x.diff(dim=-2).abs().mean())


def test_three_augment_gives_each_view_one_of_grayscale_solarisation_and_blur():
    """DeiT III's 3-Augment without its jitter: every view is exactly the grayscale or the
    solarised plain crop of its seed, or a blurred one (no sharper, colour kept; σ near 0.1
    barely blurs); all three occur."""
    plain = RandomView(32, (0.3, 1.0), **IDENTITY)
    three = RandomView(32, (0.3, 1.0), **IDENTITY, photometric=ThreeAugment(jitter=0.0))
    kinds, smoothing = [], []
    for seed in range(30):
        view, _ = three(image(), random.Random(seed))
        raw, _ = plain(image(), random.Random(seed))
        if torch.allclose(view, TF.solarize(raw, 0.5)):
            kinds.append("solarize")
        elif torch.allclose(view, TF.rgb_to_grayscale(raw, 3), atol=1e-6):
            kinds.append("grayscale")
        else:
            assert not torch.equal(view[0], view[1])
            smoothing.append(variation(view) / variation(raw))
            kinds.append("blur")
    assert set(kinds) == {"solarize", "grayscale", "blur"}
    assert max(smoothing) <= 1 + 1e-5 and min(smoothing) < 0.9


def test_three_augment_jitters_brightness_contrast_saturation_by_its_value():
    jitter = CropSet(32, (0.08, 1.0), augment="three_augment").views["view1"].photometric
    colour = jitter.transforms[1]
    assert isinstance(jitter.transforms[0], T.RandomChoice) and isinstance(colour, T.ColorJitter)
    assert (colour.brightness, colour.contrast, colour.saturation, colour.hue) == (
        (0.7, 1.3), (0.7, 1.3), (0.7, 1.3), None)
    assert CropSet(32, (0.08, 1.0), augment="three_augment").views["view1"].erasing is None
