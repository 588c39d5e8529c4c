"""``data.augment_on=device``: the views rendered batched from the worker's uint8 image and
per-sample parameters have the worker pipeline's statistics, show exactly the crop their
geometry says, and keep a run a function of its seed."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from m3i_lightning.data.dataset import Collate, ViewDataset
from m3i_lightning.data.device_views import SOURCE_KEY, render_batch
from m3i_lightning.data.views import CropSet, LocalCrops

SAMPLES = 1024
VIEWS = ("view1", "view2")


def coloured_images(count: int, size: int = 48) -> torch.Tensor:
    """Images of random reddish colours with detail at the scale of a few pixels, float
    [count, 3, size, size] in [0, 1]: the digits are grey and smooth, where hue, saturation
    and blur would not show (a hue shift moves the red into the other channels)."""
    coarse = torch.rand(count, 3, size // 4, size // 4,
                        generator=torch.Generator().manual_seed(0))
    coarse = coarse * torch.tensor([1.0, 0.5, 0.25])[:, None, None]
    return F.interpolate(coarse, size=size, mode="bilinear", align_corners=False).clamp(0, 1)


class Images:
    """A source of unlabelled, uncaptioned images, as ``ViewDataset`` reads one."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], None, None


def rendered(crops: CropSet, images: torch.Tensor, count: int, names=VIEWS) -> dict:
    """One batch of ``count`` samples, sample i from seed i, its views rendered where
    ``crops`` says (nothing left to do on the worker path)."""
    dataset = ViewDataset(Images(images), crops, set(names))
    batch = Collate()([dataset[(i % len(images), i)] for i in range(count)])
    return render_batch(batch, crops)


@pytest.fixture(scope="module")
def both_paths() -> dict:
    images = coloured_images(64)
    return {(augment, on): rendered(CropSet(24, (0.2, 1.0), augment=augment, augment_on=on),
                                    images, SAMPLES)
            for augment in ("byol", "mocov2") for on in ("workers", "device")}


def per_view_statistics(views: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per view [N, ...]: its channel means and stds, its sharpness (mean absolute horizontal
    difference, what blur lowers) and whether it is grey (all channels equal)."""
    return {"mean": views.mean(dim=(2, 3)), "std": views.std(dim=(2, 3)),
            "sharpness": (views[..., 1:] - views[..., :-1]).abs().mean(dim=(1, 2, 3)),
            "grey": ((views - views.mean(1, keepdim=True)).abs().amax(dim=(1, 2, 3))
                     < 1e-4).float()}


@pytest.mark.parametrize("augment", ["byol", "mocov2"])
@pytest.mark.parametrize("name", VIEWS)
def test_device_views_have_the_statistics_of_the_worker_views(both_paths, augment, name):
    """Over 1,024 samples of coloured images, the per-channel mean and std, the sharpness, the
    grey rate (grayscale p = 0.2) and the flip rate of the device views agree with the worker
    views' within five standard errors of the difference of two independent means (plus 0.01
    for the two resamplers: roi_align's box average against the antialiased resize)."""
    worker = per_view_statistics(both_paths[augment, "workers"][name])
    device = per_view_statistics(both_paths[augment, "device"][name])
    for key in worker:
        a, b = worker[key], device[key]
        standard_error = torch.sqrt(a.var(0) / len(a) + b.var(0) / len(b))
        gap = (a.mean(0) - b.mean(0)).abs()
        assert torch.all(gap <= 5 * standard_error + 0.01), (key, a.mean(0), b.mean(0))
    assert abs(device["grey"].mean().item() - 0.2) < 5 * math.sqrt(0.2 * 0.8 / SAMPLES)
    flips = both_paths[augment, "device"][f"{name}_geometry"][:, 4]
    assert abs(flips.mean().item() - 0.5) < 5 * math.sqrt(0.25 / SAMPLES)


def test_crop_areas_and_aspect_ratios_follow_the_same_distribution(both_paths):
    """The boxes come from the same draw on both paths: area fractions in the crop scale
    (0.2, 1) and the same quartiles of area and log aspect ratio within sampling error."""
    for name in VIEWS:
        worker = both_paths["byol", "workers"][f"{name}_geometry"]
        device = both_paths["byol", "device"][f"{name}_geometry"]
        for geometry in (worker, device):
            area = geometry[:, 2] * geometry[:, 3]
            assert area.min() >= 0.19 and area.max() <= 1.0
        quartiles = torch.tensor([0.25, 0.5, 0.75])
        for measure in (lambda g: g[:, 2] * g[:, 3], lambda g: (g[:, 3] / g[:, 2]).log()):
            gap = (measure(worker).quantile(quartiles) - measure(device).quantile(quartiles))
            assert gap.abs().max() < 0.06, (name, gap)


def test_a_device_view_shows_the_crop_its_geometry_says():
    """On a ramp image (red = row, green = column fraction), every pixel of a rendered view,
    global or local, flipped or not, holds the source coordinates the geometry maps it to:
    view pixel (i, j) ↦ (top + h·(i + ½)/S, left + w·(j' + ½)/S), j' = S−1−j when flipped
    (within half a source pixel and the uint8 step)."""
    size, source = 16, 64
    centres = (torch.arange(source) + 0.5) / source
    ramp = torch.stack([centres[:, None].expand(source, source),
                        centres[None, :].expand(source, source),
                        torch.full((source, source), 0.5)])
    crops = CropSet(size, (0.2, 1.0), local=LocalCrops(count=2, size=8), augment="none",
                    augment_on="device")
    names = crops.names
    batch = rendered(crops, ramp[None], 64, names)
    assert SOURCE_KEY not in batch
    for name in names:
        views, geometry = batch[name] * 0.5 + 0.5, batch[f"{name}_geometry"]
        n = views.shape[-1]
        top, left, height, width, flip = (g[:, None] for g in geometry.unbind(-1))
        steps = (torch.arange(n) + 0.5) / n
        rows = top + height * steps
        cols = left + width * torch.where(flip > 0, steps.flip(0), steps)
        tolerance = 0.5 / source + 1 / 255
        assert (views[:, 0] - rows[:, :, None]).abs().max() <= tolerance, name
        assert (views[:, 1] - cols[:, None, :]).abs().max() <= tolerance, name
        assert flip.any() and not flip.all()


def test_the_worker_ships_uint8_images_at_the_decode_size_and_parameters_from_the_seed():
    """The device batch carries one uint8 image per sample (resized whole to decode_size) and
    each view's parameters; the same seeds give the same batch, and view1's box is the worker
    path's box of the same seed (its first draws)."""
    images = coloured_images(4, size=40)
    device = CropSet(16, (0.2, 1.0), augment="byol", augment_on="device", decode_size=32)
    dataset = ViewDataset(Images(images), device, set(VIEWS))
    sample = dataset[(1, 5)]
    assert sample[SOURCE_KEY].dtype == torch.uint8
    assert sample[SOURCE_KEY].shape == (3, 32, 32) and "view1" not in sample
    assert set(sample["view2_colour"]) == {"jitter", "factors", "order", "grayscale", "blur",
                                           "sigma", "solarize"}
    again = dataset[(1, 5)]
    assert all(torch.equal(sample[k], again[k]) for k in ("view1_geometry", "view2_geometry"))
    worker = ViewDataset(Images(images), CropSet(16, (0.2, 1.0), augment="byol"), set(VIEWS))
    assert torch.equal(worker[(1, 5)]["view1_geometry"], sample["view1_geometry"])


def test_an_unknown_augment_on_is_refused_naming_the_option():
    with pytest.raises(ValueError, match="data.augment_on"):
        CropSet(16, (0.3, 1.0), augment_on="gpu")


def test_a_batch_of_the_worker_path_passes_through_unchanged():
    crops = CropSet(16, (0.3, 1.0))
    batch = rendered(crops, coloured_images(2), 4)
    assert render_batch(dict(batch), crops).keys() == batch.keys()


def test_random_draws_come_from_the_sample_stream_only():
    """Rendering draws nothing: the global generators are untouched and a batch renders the
    same twice."""
    crops = CropSet(16, (0.2, 1.0), augment="byol", augment_on="device")
    dataset = ViewDataset(Images(coloured_images(4)), crops, set(VIEWS))
    samples = [dataset[(i % 4, i)] for i in range(8)]
    state = torch.get_rng_state(), random.getstate()
    first = render_batch(Collate()([dict(s) for s in samples]), crops)
    second = render_batch(Collate()([dict(s) for s in samples]), crops)
    assert torch.equal(first["view1"], second["view1"])
    assert torch.equal(torch.get_rng_state(), state[0]) and random.getstate() == state[1]
