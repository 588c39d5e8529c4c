"""Loading image files on both paths: where JPEGs decode (chosen and logged at start), what the
device path ships, bad files counted and skipped wherever they fail, and a step-exact resume."""

from __future__ import annotations

import io
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from data_files import image_bytes, messy_folder, write
from PIL import Image

from m3i_lightning.components.text import ByteTokenizer
from m3i_lightning.data import ImageFolderData
from m3i_lightning.data import device_views as device_views_module
from m3i_lightning.data import module as module_module
from m3i_lightning.data.device_views import ENCODED_KEY, NAMES_KEY, choose_decoder
from m3i_lightning.data.skips import SkipReport


def photo_jpeg(seed: int, size: tuple[int, int] = (64, 48), mode: str = "RGB") -> bytes:
    """A JPEG of smooth random colours (upsampled noise, like a photo's low frequencies)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3),
                                          dtype=np.uint8))
    out = io.BytesIO()
    coarse.resize(size, Image.Resampling.BICUBIC).convert(mode).save(out, "JPEG", quality=90)
    return out.getvalue()


def undecodable_jpeg() -> bytes:
    """A JPEG whose header parses but whose scan names a quantisation table never defined:
    only a full decode finds out."""
    data = bytearray(photo_jpeg(5))
    table = data.find(b"\xff\xdb") + 4  # precision / id byte of the first DQT table
    data[table] = (data[table] & 0xF0) | 0x3
    return bytes(data)


def jpeg_folder(root, count: int = 20):
    for i in range(count):
        write(root / f"c{i % 2}" / f"{i:03d}.jpg", photo_jpeg(i))
    return root


def folder_module(path, **kwargs) -> ImageFolderData:
    options = dict(img_size=16, batch_size=4, num_workers=0, val_fraction=0.0,
                   tokenizer=ByteTokenizer(16), augment="byol", seed=3)
    return ImageFolderData(str(path), **{**options, **kwargs})


@pytest.fixture
def device_decodes(monkeypatch):
    """The data module finds the device decoding JPEGs, as on a GPU with nvJPEG; the device's
    half then decodes with torchvision on this CPU."""
    monkeypatch.setattr(module_module, "choose_decoder",
                        lambda device: (True, "nvJPEG decodes JPEGs (test)"))


def test_jpegs_decode_on_a_cuda_device_that_reads_them_else_in_the_workers(monkeypatch):
    """The choice and its reason; the CUDA branch with torchvision's decoder replaced (this
    machine has no GPU): it decodes a probe JPEG on the device, or says why not."""
    on_device, why = choose_decoder(torch.device("cpu"))
    assert not on_device and "views render on cpu" in why and "reduced DCT scale" in why
    probes = []
    monkeypatch.setattr(device_views_module, "decode_jpeg",
                        lambda data, device: probes.append(device))
    on_device, why = choose_decoder(torch.device("cuda", 1))
    assert on_device and why.startswith("nvJPEG decodes JPEGs on cuda:1")
    assert probes == [torch.device("cuda", 1)]

    def fails(data, device):
        raise RuntimeError("torchvision was built without nvJPEG")

    monkeypatch.setattr(device_views_module, "decode_jpeg", fails)
    on_device, why = choose_decoder(torch.device("cuda"))
    assert not on_device and "built without nvJPEG" in why and "workers decode" in why


def test_the_data_module_chooses_for_its_trainers_device_and_says_why_in_one_line(
        tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(device_views_module, "decode_jpeg", lambda data, device: None)
    dm = folder_module(jpeg_folder(tmp_path, 4), augment_on="device")
    with caplog.at_level(logging.INFO, logger="m3i_lightning"):
        dm.train_dataloader()
    assert not dm.view.device_decodes  # no trainer: the views render on the CPU
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)))
    with caplog.at_level(logging.INFO, logger="m3i_lightning"):
        dm.train_dataloader()
    assert dm.view.device_decodes
    lines = [r.getMessage() for r in caplog.records if "data.augment_on=device" in r.getMessage()]
    assert len(lines) == 2 and "views render on cpu" in lines[0]
    assert lines[1].startswith("data.augment_on=device: nvJPEG decodes JPEGs on cuda:0")
    workers = folder_module(tmp_path)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="m3i_lightning"):
        workers.train_dataloader()
    assert not caplog.records


def test_the_device_path_ships_jpeg_bytes_and_decodes_what_nvjpeg_cannot_in_the_workers(
        tmp_path, device_decodes):
    """RGB and grayscale JPEGs travel as their file bytes; a CMYK JPEG and a PNG are decoded
    in the worker (at decode_size); the rendered batch has every view."""
    write(tmp_path / "a" / "rgb.jpg", photo_jpeg(1))
    write(tmp_path / "a" / "grey.jpg", photo_jpeg(2, mode="L"))
    write(tmp_path / "a" / "cmyk.jpg", photo_jpeg(3, mode="CMYK"))
    write(tmp_path / "a" / "plain.png", image_bytes(4, size=(40, 30)))
    dm = folder_module(tmp_path, augment_on="device", decode_size=32, labels=False)
    dataset = dm.train_dataloader().dataset
    shipped = {}
    for i, path in enumerate(dm.splits["train"].files):
        sample = dataset[(i, i)]
        shipped[path.rsplit("/", 1)[-1]] = sample[ENCODED_KEY]
        assert sample[NAMES_KEY] == path
    assert isinstance(shipped["rgb.jpg"], bytes) and isinstance(shipped["grey.jpg"], bytes)
    for name in ("cmyk.jpg", "plain.png"):
        assert shipped[name].dtype == torch.uint8 and shipped[name].shape == (3, 32, 32)
    batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert ENCODED_KEY not in batch and NAMES_KEY not in batch
    assert batch["view1"].shape == batch["view2"].shape == (4, 3, 16, 16)
    assert torch.isfinite(batch["view1"]).all()


@pytest.mark.parametrize("decoder", ["workers", "device"])
def test_bad_files_on_the_device_path_are_counted_and_skipped(tmp_path, monkeypatch, decoder):
    """A messy folder plus a truncated JPEG and one that only a full decode finds broken: with
    the workers decoding, each is a skipped sample of the worker; with the device decoding,
    the worker still catches what its header check can (a file PIL cannot open, a JPEG cut
    short, a broken PNG) and the device reports the JPEG its decoder refuses, replacing that
    sample by another of the batch (all its fields). SkipReport counts every one."""
    expected = messy_folder(tmp_path)
    write(tmp_path / "cat" / "cut.jpg", photo_jpeg(6)[:400])
    write(tmp_path / "dog" / "badtable.jpg", undecodable_jpeg())
    if decoder == "device":
        monkeypatch.setattr(module_module, "choose_decoder", lambda device: (True, "test"))
    files = expected["files"] + 2
    dm = folder_module(tmp_path, augment_on="device", batch_size=files)
    torch.manual_seed(0)
    batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    skipped = {entry.split(": ")[1].rsplit("/", 1)[-1] for entry in batch["skipped"]}
    assert skipped == {*expected["bad"], "cut.jpg", "badtable.jpg"}
    entries = [e for e in batch["skipped"] if "badtable.jpg" in e]
    assert all(e.endswith("nvJPEG could not decode it") == (decoder == "device")
               for e in entries)
    report = SkipReport()
    report.on_train_batch_start(None, None, batch, 0)
    # every entry counted (a bad file drawn again as another's replacement is one more)
    assert report.counts["unreadable image"] == len(batch["skipped"]) >= 4
    assert batch["view1"].shape[0] == files and torch.isfinite(batch["view1"]).all()


def test_a_sample_the_device_cannot_decode_is_replaced_with_all_its_fields(tmp_path,
                                                                        device_decodes):
    write(tmp_path / "a" / "good.jpg", photo_jpeg(1))
    write(tmp_path / "b" / "badtable.jpg", undecodable_jpeg())
    dm = folder_module(tmp_path, augment_on="device", batch_size=2)
    dataset = dm.train_dataloader().dataset
    samples = [dataset[(i, 10 + i)] for i in range(2)]
    batch = dm.on_after_batch_transfer(dm.train_dataloader().collate_fn(samples), 0)
    assert batch["label"].tolist() == [0, 0]  # the good image's label, not the broken one's
    assert torch.equal(batch["view1"][0], batch["view1"][1])
    assert torch.equal(batch["view2_geometry"][0], batch["view2_geometry"][1])
    assert batch["skipped"] == [f"unreadable image: {tmp_path}/b/badtable.jpg: nvJPEG could "
                                "not decode it"]


def rendered_epoch(loader, dm) -> list[dict]:
    return [dm.on_after_batch_transfer(batch, 0) for batch in loader]


@pytest.mark.parametrize("path", ["workers", "device: workers decode", "device: device decodes"])
def test_the_loader_resumes_mid_epoch_with_the_same_views_on_every_path(tmp_path, monkeypatch,
                                                                      path):
    """An epoch of JPEG files (5 batches); a fresh loader given the state after 2 batches
    delivers exactly the 3 others, views and geometry equal to the bit, on the worker path (the
    resumed loader with a worker process) and on the device path with either decoder."""
    jpeg_folder(tmp_path)
    options = {"augment_on": "workers" if path == "workers" else "device"}
    if path.endswith("device decodes"):
        monkeypatch.setattr(module_module, "choose_decoder", lambda device: (True, "test"))
    dm = folder_module(tmp_path, **options)
    loader = dm.train_dataloader()
    epoch = rendered_epoch(loader, dm)
    assert len(epoch) == 5
    resumed_dm = folder_module(tmp_path, **options, num_workers=1 if path == "workers" else 0)
    resumed = resumed_dm.train_dataloader()
    resumed.load_state_dict({"epoch": 0, "batches": 2})
    rest = rendered_epoch(resumed, resumed_dm)
    assert len(rest) == 3
    for got, expected in zip(rest, epoch[2:], strict=True):
        for key in ("view1", "view2", "view1_geometry", "view2_geometry", "label"):
            assert torch.equal(got[key], expected[key]), key
