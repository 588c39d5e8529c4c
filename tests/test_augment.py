"""Colour augmentations of the recipes' view pipelines: torchvision v2 transforms, drawn from
each sample's own seed, asymmetric between the two views as BYOL's table states."""

from __future__ import annotations

import random

import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF

from m3i_lightning.data.views import AUGMENTATIONS, CropSet, Photometric, RandomView


def image() -> torch.Tensor:
    return torch.rand(3, 24, 24, generator=torch.Generator().manual_seed(0))


def test_a_view_is_a_function_of_its_seed():
    crops = CropSet(16, (0.3, 1.0), augment="byol")
    first, _ = crops("view2", image(), random.Random(7))
    again, _ = crops("view2", image(), random.Random(7))
    other, _ = crops("view2", image(), random.Random(8))
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_the_colour_transform_runs_after_the_crop_on_the_same_stream():
    """Solarisation alone, always on: the view is the solarised plain crop of the same seed
    (same box, same flip)."""
    identity = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    plain = RandomView(16, (0.3, 1.0), **identity)
    solarised = RandomView(16, (0.3, 1.0), **identity, photometric=Photometric(
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
    assert set(AUGMENTATIONS) == {"none", "byol", "mocov2"}
    with pytest.raises(ValueError, match="data.augment"):
        CropSet(16, (0.3, 1.0), augment="simclr")
