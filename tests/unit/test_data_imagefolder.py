"""``data=imagefolder``: a messy real folder trains; broken files are skipped and counted."""

from __future__ import annotations

import json

import pytest
import torch
from data_files import image_bytes, labelled_folder, messy_folder, write

from m3i_lightning.components.text import ByteTokenizer
from m3i_lightning.core.errors import ConfigError
from m3i_lightning.data import ImageFolderData


def folder_module(path, **kwargs) -> ImageFolderData:
    options = dict(img_size=16, batch_size=4, num_workers=0, val_fraction=0.0,
                   tokenizer=ByteTokenizer(16))
    return ImageFolderData(str(path), **{**options, **kwargs})


def test_messy_folder_gives_labels_captions_and_counted_skips(tmp_path):
    expected = messy_folder(tmp_path)
    dm = folder_module(tmp_path, batch_size=expected["files"])  # one batch: every file
    assert dm.class_names == ["cat", "dog"] and dm.provides >= {"label", "text"}
    listing = dm.splits["train"]
    assert len(listing.files) == expected["files"]  # notes.txt and metadata are not samples
    torch.manual_seed(0)
    (batch,) = list(dm.train_dataloader())
    skipped = {entry.split(": ")[1].rsplit("/", 1)[-1] for entry in batch["skipped"]}
    assert skipped == expected["bad"]  # each bad file seen, replaced, reported
    assert batch["view1"].shape == (expected["files"], 3, 16, 16)
    assert torch.isfinite(batch["view1"]).all() and torch.isfinite(batch["view2"]).all()
    # loose.png has no class folder: label -100, left out of cls only
    assert listing.labels[listing.files.index(str(tmp_path / "loose.png"))] is None
    assert (batch["label"] == -100).any() and set(batch["label"].tolist()) <= {-100, 0, 1}
    # captions: missing and empty ones are invalid, the others tokenised
    captioned = {f for f, c in zip(listing.files, listing.captions, strict=True) if c}
    assert len(captioned) == 8
    assert batch["text_valid"].any() and not batch["text_valid"].all()
    assert (batch["text_mask"][~batch["text_valid"]].sum(1) == 2).all()  # bos + eos only


def test_split_folders_and_metadata_csv(tmp_path):
    for split, n in (("train", 6), ("validation", 3)):
        labelled_folder(tmp_path / split, n, captions=False)
    rows = "file_name,caption\nc00/0000.png,a red thing\nc01/0001.png,\n"
    (tmp_path / "train" / "metadata.csv").write_text(rows)
    dm = folder_module(tmp_path)
    assert len(dm.splits["train"].files) == 6 and len(dm.splits["val"].files) == 3
    assert sorted(filter(None, dm.splits["train"].captions)) == ["a red thing"]
    assert dm.provides >= {"label", "text"}
    (batch,) = list(dm.eval_dataloader("val"))
    assert batch["image"].shape == (3, 3, 16, 16) and batch["label"].tolist() == [0, 0, 1]


def test_folder_without_labels_or_captions(tmp_path):
    for i in range(4):
        write(tmp_path / f"{i}.jpg", image_bytes(i, fmt="JPEG"))
    dm = folder_module(tmp_path)
    assert dm.provides == {"view1", "view2", "geometry"} and dm.num_classes == 0


def test_empty_or_unusable_folders_fail_at_start_up(tmp_path):
    with pytest.raises(ConfigError, match="no image files"):
        folder_module(tmp_path)
    write(tmp_path / "readme.txt", b"hello")
    write(tmp_path / "a" / "broken.png", b"\x89PNG\r\n\x1a\n broken")
    write(tmp_path / "a" / "empty.jpg", b"")
    with pytest.raises(ConfigError, match="no usable sample.*all 2 failed"):
        folder_module(tmp_path)
    with pytest.raises(ConfigError, match="not a folder"):
        folder_module(tmp_path / "missing")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"name": "a/broken.png"}) + "\n")
    with pytest.raises(ConfigError, match="no 'file_name' column"):
        folder_module(tmp_path)


def test_metadata_rows_that_match_no_image_are_counted_and_explained(tmp_path, caplog):
    """file_name without its class folder matches nothing: the folder gets no caption, and the
    log says so and why; rows for missing files are counted."""
    labelled_folder(tmp_path, 4, classes=2, captions=False)
    rows = [{"file_name": f"{i:04d}.png", "text": f"image {i}"} for i in range(4)]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level("WARNING", logger="m3i_lightning"):
        dm = folder_module(tmp_path)
    assert "text" not in dm.provides
    (message,) = [r.getMessage() for r in caplog.records if "metadata under" in r.getMessage()]
    assert "none of its 4 row(s) names an image file there, so no image has a caption" in message
    assert "relative to the metadata file's folder" in message

    caplog.clear()
    rows = [{"file_name": "c00/0000.png", "text": "a"}, {"file_name": "c01/gone.png", "text": "b"}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level("WARNING", logger="m3i_lightning"):
        dm = folder_module(tmp_path)
    assert "text" in dm.provides
    (message,) = [r.getMessage() for r in caplog.records if "metadata under" in r.getMessage()]
    assert "1 of its 2 row(s) name no image file there (unused), e.g. " in message
    assert "gone.png" in message
