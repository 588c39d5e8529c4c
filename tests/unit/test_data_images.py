"""Images of every mode become the RGB a viewer shows; broken files become counted skips."""

from __future__ import annotations

import io
import logging
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from data_files import image_bytes
from PIL import Image

from m3i_lightning.data.images import decode_image
from m3i_lightning.data.skips import BadSample, SkipReport
from m3i_lightning.data.views import RandomView


def encoded(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **kwargs)
    return out.getvalue()


@pytest.mark.parametrize("mode,fmt", [("RGB", "JPEG"), ("L", "PNG"), ("1", "PNG"),
                                      ("LA", "PNG"), ("RGBA", "PNG"), ("P", "PNG"),
                                      ("CMYK", "JPEG"), ("I;16", "PNG"), ("RGB", "WEBP")])
def test_every_mode_becomes_rgb_in_unit_range(mode, fmt):
    image = decode_image(image_bytes(3, mode, (20, 12), fmt))
    assert image.shape == (3, 12, 20) and image.dtype == torch.float32
    assert 0 <= image.min() and image.max() <= 1 and image.std() > 0


def test_values_are_those_a_viewer_shows():
    gray16 = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))
    assert decode_image(encoded(gray16)).mean().item() == pytest.approx(0.5, abs=0.01)

    transparent = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert torch.allclose(decode_image(encoded(transparent)), torch.ones(3, 4, 4))

    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([10, 20, 30] + [0] * 765)
    palette.info["transparency"] = 0
    assert torch.allclose(decode_image(encoded(palette, transparency=0)), torch.ones(3, 4, 4))

    gray = decode_image(encoded(Image.new("L", (4, 4), 51)))
    assert torch.allclose(gray, torch.full((3, 4, 4), 0.2))


@pytest.mark.parametrize("data", [
    image_bytes(1, fmt="JPEG", size=(64, 64))[:300],    # truncated JPEG
    image_bytes(1, size=(64, 64))[:100],                # truncated PNG
    b"plain text, named .jpg",                           # not an image at all
    b"",                                                 # empty file
])
def test_broken_files_are_bad_samples(data):
    with pytest.raises(BadSample) as bad:
        decode_image(data, "x.jpg")
    assert bad.value.reason == "unreadable image" and "x.jpg" in bad.value.detail


def test_images_smaller_than_the_crop_are_upsampled():
    view, geometry = RandomView(16)(decode_image(image_bytes(2, size=(3, 2))), random.Random(0))
    assert view.shape == (3, 16, 16) and torch.isfinite(view).all() and geometry.shape == (5,)


def test_skip_report_sums_batches_and_logs_once_per_epoch(caplog):
    report, logged = SkipReport(), {}
    module = SimpleNamespace(log=lambda name, value, **_: logged.__setitem__(name, value))
    trainer = SimpleNamespace(is_global_zero=True)
    report.on_train_batch_start(trainer, module, {"skipped": [
        "unreadable image: a.jpg: truncated", "unreadable image: b.png: bad"]}, 0)
    report.on_train_batch_start(trainer, module, {"view1": None}, 1)
    report.on_train_batch_start(trainer, module, {"skipped": ["broken tar member: s.tar"]}, 2)
    with caplog.at_level(logging.WARNING, logger="m3i_lightning"):
        report.on_train_epoch_end(trainer, module)
        report.on_train_epoch_end(trainer, module)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["skipped 3 samples: 2 unreadable image (e.g. a.jpg: truncated); "
                     "1 broken tar member (e.g. s.tar)"]
    assert logged["data/skipped"] == 0.0  # the second epoch started from zero
