"""The image-file path of the views: one decode at the largest DCT scale every view allows, 8-bit
crops, then the colour formulas shared with the device. It gives the crops the full decode
gives, pixels within what resampling itself changes, and the reference recipe's statistics."""

from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from sklearn.datasets import load_sample_image
from test_device_views import SAMPLES, coloured_images, per_view_statistics

from m3i_lightning.data.colour import adjust_hue, gaussian_blur, kernel_within
from m3i_lightning.data.dataset import Collate, ViewDataset
from m3i_lightning.data.device_views import ENCODED_KEY, render_batch
from m3i_lightning.data.images import EncodedImage, dct_scale
from m3i_lightning.data.views import CropSet, RandomView

VIEWS = ("view1", "view2")


def jpeg(pixels: np.ndarray, quality: int = 95) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=quality)
    return out.getvalue()


def ramp(height: int = 768, width: int = 1024) -> np.ndarray:
    """uint8 [H, W, 3]: red = row, green = column (pixel centres as fractions), blue 0.5."""
    rows, cols = np.meshgrid((np.arange(height) + 0.5) / height,
                             (np.arange(width) + 0.5) / width, indexing="ij")
    return (np.stack([rows, cols, np.full_like(rows, 0.5)], -1) * 255).round().astype(np.uint8)


def test_the_scale_is_the_largest_at_which_every_crop_keeps_its_view_resolution():
    assert dct_scale([(600, 500, 224)]) == 2  # 500 / 2 = 250 >= 224
    assert dct_scale([(600, 447, 224)]) == 1  # 447 / 2 < 224: never enlarge
    assert dct_scale([(1800, 1800, 224)]) == 8 and dct_scale([(900, 900, 224)]) == 4
    assert dct_scale([(900, 900, 224), (200, 200, 96)]) == 2  # the tightest view decides
    assert dct_scale([(100, 100, 224)]) == 1 and dct_scale([]) == 1


def test_a_jpeg_decodes_at_the_scale_asked_and_other_formats_whole():
    data = jpeg(ramp(750, 1000))
    decoded = EncodedImage(data).decode(4)
    assert decoded.scale == 4 and decoded.pixels.shape == (3, 188, 250)  # ⌈750/4⌉, ⌈1000/4⌉
    png = io.BytesIO()
    Image.fromarray(ramp(40, 60)).save(png, "PNG")
    whole = EncodedImage(png.getvalue()).decode(4)
    assert whole.scale == 1 and whole.pixels.shape == (3, 40, 60)
    assert EncodedImage(data).size == (750, 1000)


def views_of(data: bytes, view: RandomView, seed: int) -> tuple:
    """One view of the file drawn from ``seed``, rendered from the reduced decode and from the
    full decode: (its box, geometry, reduced view, full view, the scale used), views in [0, 1]."""
    image = EncodedImage(data)
    box, flipped, geometry = view.draw(*image.size, random.Random(seed))
    reduced = image.decode(dct_scale([(box[2], box[3], view.size)]))
    full = EncodedImage(data).decode(1)
    return (box, geometry, view.render(reduced, box, flipped, None) * 0.5 + 0.5,
            view.render(full, box, flipped, None) * 0.5 + 0.5, reduced.scale)


def test_reduced_decode_of_a_ramp_shows_the_crop_its_geometry_says():
    """On a 1024×768 ramp, 48 px views of crops ≥ 30 % of the area decode at 1/4 or 1/8, and
    each pixel of the reduced view holds the source coordinates the (full-resolution)
    geometry maps it to, as the full decode's view does: within half a source pixel and two
    8-bit steps (JPEG and resampling rounding)."""
    data, size = jpeg(ramp()), 48
    view = RandomView(size, (0.3, 1.0))
    steps = (torch.arange(size) + 0.5) / size
    scales = set()
    for seed in range(12):
        box, geometry, reduced, full, scale = views_of(data, view, seed)
        scales.add(scale)
        top, left, height, width, flip = geometry.tolist()
        assert box == (round(top * 768), round(left * 1024), round(height * 768),
                       round(width * 1024))
        rows = top + height * steps
        cols = left + width * (steps.flip(0) if flip else steps)
        for rendered in (reduced, full):
            assert (rendered[0] - rows[:, None]).abs().max() <= 0.5 / 768 + 2 / 255
            assert (rendered[1] - cols[None, :]).abs().max() <= 0.5 / 1024 + 2 / 255
    assert scales == {8} or scales >= {4}


@pytest.mark.parametrize("photo", ["china.jpg", "flower.jpg"])
def test_reduced_decode_of_a_photo_differs_from_the_full_one_less_than_two_resamplers(photo):
    """On scikit-learn's photos (640×427), the views decoded at 1/4 or 1/8 differ from the full
    decode's on average less than the full decode's bilinear view differs from its bicubic
    one: what the reduced scale changes is within what the choice of resampling changes."""
    data = jpeg(load_sample_image(photo))
    bilinear, bicubic = RandomView(48, (0.3, 1.0)), RandomView(48, (0.3, 1.0),
                                                              interpolation="bicubic")
    reduction, resampling, scales = [], [], set()
    for seed in range(24):
        box, _, reduced, full, scale = views_of(data, bilinear, seed)
        image = EncodedImage(data)
        flipped = bilinear.draw(*image.size, random.Random(seed))[1]
        other = bicubic.render(image.decode(1), box, flipped, None) * 0.5 + 0.5
        reduction.append((reduced - full).abs().mean())
        resampling.append((other - full).abs().mean())
        scales.add(scale)
    assert min(scales) >= 4
    assert torch.stack(reduction).mean() < torch.stack(resampling).mean()


def test_hue_and_blur_formulas_equal_torchvision():
    """The per-sample formulas against torchvision's operations: the hue shift (grey pixels and
    ties for the maximum included) and the separable blur; dropping the taps beyond 4σ moves no
    value by a tenth of an 8-bit step."""
    images = torch.rand(4, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    images[0, :, :5] = 0.4  # grey
    images[1, 0, :, :6] = images[1, 1, :, :6]  # red = green
    for k, factor in enumerate((-0.5, -0.1, 0.07, 0.5)):
        expected = TF.adjust_hue(images[k], factor)
        batched = adjust_hue(images, torch.full((4, 1, 1, 1), factor))[k]
        torch.testing.assert_close(batched, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(adjust_hue(images[k:k + 1], factor)[0], expected,
                                   atol=1e-5, rtol=0)
    sigma = torch.tensor([0.1, 0.7, 1.3, 2.0])
    blurred = gaussian_blur(images, sigma, 9)
    for k, s in enumerate(sigma.tolist()):
        torch.testing.assert_close(blurred[k], TF.gaussian_blur(images[k], [9, 9], [s, s]),
                                   atol=1e-5, rtol=0)
        short = gaussian_blur(images[k:k + 1], sigma[k:k + 1], kernel_within(s, 9))
        assert (short[0] - blurred[k]).abs().max() < 0.1 / 255


class Files:
    """The same images as JPEG files (:class:`EncodedImage`) or decoded to float tensors."""

    def __init__(self, files: list[bytes], decoded: bool) -> None:
        self.files, self.decoded = files, decoded

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        image = EncodedImage(self.files[i], f"image {i}")
        return (image.tensor() if self.decoded else image), None, None


@pytest.fixture(scope="module")
def three_renderings() -> dict:
    """1,024 samples (sample i from seed i) of 64 JPEGs of coloured images, BYOL's views at
    24 px: the reference recipe on the decoded float images, the worker path on the files,
    the device path shipping the files' bytes (decoded by torchvision on this CPU)."""
    files = [jpeg((image.permute(1, 2, 0) * 255).round().byte().numpy())
             for image in coloured_images(64)]
    results = {}
    for name, decoded, on, device_decodes in (("reference", True, "workers", False),
                                              ("workers", False, "workers", False),
                                              ("device", False, "device", True)):
        crops = CropSet(24, (0.2, 1.0), augment="byol", augment_on=on)
        crops.device_decodes = device_decodes
        dataset = ViewDataset(Files(files, decoded), crops, set(VIEWS))
        samples = [dataset[(i % len(files), i)] for i in range(SAMPLES)]
        if on == "device":
            assert all(isinstance(s[ENCODED_KEY], bytes) for s in samples)
        results[name] = render_batch(Collate()(samples), crops)
    return results


@pytest.mark.parametrize("path", ["workers", "device"])
@pytest.mark.parametrize("name", VIEWS)
def test_views_of_files_have_the_statistics_of_the_reference_recipe(three_renderings, path,
                                                                   name):
    """Per-channel mean and std, sharpness, grey rate and flip rate over 1,024 samples agree
    with the reference recipe's within five standard errors of the difference of two means
    (plus 0.01 for the resamplers), as the device path's statistics test states; crop areas
    and log aspect ratios have the same quartiles."""
    reference = per_view_statistics(three_renderings["reference"][name])
    rendered = per_view_statistics(three_renderings[path][name])
    for key in reference:
        a, b = reference[key], rendered[key]
        standard_error = torch.sqrt(a.var(0) / len(a) + b.var(0) / len(b))
        gap = (a.mean(0) - b.mean(0)).abs()
        assert torch.all(gap <= 5 * standard_error + 0.01), (key, a.mean(0), b.mean(0))
    assert abs(rendered["grey"].mean().item() - 0.2) < 5 * math.sqrt(0.2 * 0.8 / SAMPLES)
    geometry = three_renderings[path][f"{name}_geometry"]
    assert abs(geometry[:, 4].mean().item() - 0.5) < 5 * math.sqrt(0.25 / SAMPLES)
    quartiles = torch.tensor([0.25, 0.5, 0.75])
    expected = three_renderings["reference"][f"{name}_geometry"]
    for measure in (lambda g: g[:, 2] * g[:, 3], lambda g: (g[:, 3] / g[:, 2]).log()):
        gap = measure(geometry).quantile(quartiles) - measure(expected).quantile(quartiles)
        assert gap.abs().max() < 0.06, (name, gap)


def test_the_device_renders_the_views_the_worker_path_renders_from_the_same_draws(
        three_renderings):
    """The worker and device paths draw every crop, flip and colour parameter of a sample in
    the same order from its seed: their geometry is identical, sample by sample."""
    for name in VIEWS:
        assert torch.equal(three_renderings["workers"][f"{name}_geometry"],
                           three_renderings["device"][f"{name}_geometry"])
