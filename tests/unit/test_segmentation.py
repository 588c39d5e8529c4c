"""The segmentation probe: mIoU against a per-class formula, the folder and Hugging Face forms
with their bad inputs, the embedded scenes, protocol selection, and a dense objective's
tokens scoring above a random initialisation."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from helpers import tiny_backbone
from PIL import Image

from m3i_lightning.core.errors import ConfigError
from m3i_lightning.evaluation.protocols import PROTOCOLS, selected_protocols
from m3i_lightning.evaluation.segmentation import confusion_matrix, mean_iou, segmentation_probe
from m3i_lightning.evaluation.segmentation.scenes import digit_scenes

IGNORE = 255


def reference_miou(predicted: list[int], target: list[int], num_classes: int) -> float:
    """IoU per class from sets of pixel positions; classes absent from both are skipped."""
    kept = [(p, t) for p, t in zip(predicted, target, strict=True) if t != IGNORE]
    ious = []
    for c in range(num_classes):
        pred = {i for i, (p, _) in enumerate(kept) if p == c}
        true = {i for i, (_, t) in enumerate(kept) if t == c}
        if pred | true:
            ious.append(len(pred & true) / len(pred | true))
    return sum(ious) / len(ious)


def test_mean_iou_matches_the_set_formula_ignoring_pixels_and_absent_classes():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, IGNORE, IGNORE], [0, 1, 2, 0]])
    predicted = torch.tensor([[0, 1, 1, 1], [2, 0, 4, 1], [0, 1, 1, 0]])  # class 3: absent
    expected = reference_miou(predicted.flatten().tolist(), target.flatten().tolist(), 5)
    confusion = torch.zeros(5, 5, dtype=torch.long)
    for rows in ([0], [1, 2]):  # accumulated over batches
        confusion += confusion_matrix(predicted[rows], target[rows], 5, IGNORE)
    assert confusion.sum() == 10  # the two ignored pixels are left out, with their class 4 / 1
    assert mean_iou(confusion) == pytest.approx(expected)
    # class 4 is predicted only on ignored pixels: absent, so 3 classes enter the mean
    assert expected == pytest.approx((3 / 5 + 3 / 5 + 1 / 3) / 3)


def test_scenes_are_deterministic_and_masks_hold_digit_classes():
    images, masks = digit_scenes("val", 6, 16)
    again_images, again_masks = digit_scenes("val", 6, 16)
    assert torch.equal(images, again_images) and torch.equal(masks, again_masks)
    assert images.shape == (6, 3, 16, 16) and 0 <= images.min() and images.max() <= 1
    assert masks.min() == 0 and 1 <= masks.max() <= 10
    assert not torch.equal(digit_scenes("train", 6, 16)[1], masks)
    # every digit pixel is brighter than any background pixel
    brightness = images.min(1).values
    assert brightness[masks > 0].min() > images.max(1).values[masks == 0].max() - 0.5


def tiny_options(data: dict, num_classes: int = 3, epochs: int = 5) -> dict:
    return dict(data=data, num_classes=num_classes, ignore_index=IGNORE, epochs=epochs,
                batch_size=4, lr=0.05, weight_decay=0.0, num_workers=0)


def pair(size, seed: int) -> tuple[Image.Image, Image.Image]:
    """An image whose bright left half is class 1, the rest class 2, a corner ignored."""
    rng = np.random.default_rng(seed)
    height, width = size
    pixels = (rng.random((height, width, 3)) * 80).astype(np.uint8)
    mask = np.full((height, width), 2, dtype=np.uint8)
    pixels[:, : width // 2] += 150
    mask[:, : width // 2] = 1
    mask[0, 0] = IGNORE
    return Image.fromarray(pixels), Image.fromarray(mask)


def write_split(root, names, size=(20, 24)) -> None:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    for i, name in enumerate(names):
        image, mask = pair(size, i)
        image.save(root / "images" / f"{name}.jpg")
        mask.save(root / "masks" / f"{name}.png")


def test_folder_form_trains_a_probe_that_separates_the_halves(tmp_path):
    write_split(tmp_path / "train", [f"a{i}" for i in range(8)])
    write_split(tmp_path / "val", [f"b{i}" for i in range(4)])
    torch.manual_seed(0)
    score = segmentation_probe(tiny_backbone(),
                               tiny_options({"source": "folder", "path": str(tmp_path)},
                                            epochs=30))
    assert score.sizes == {"train": 8, "val": 4}
    assert score.miou > 0.8  # bright half vs dark half, at 4 px patches


def test_folder_bad_pairs_are_skipped_and_counted(tmp_path, caplog):
    write_split(tmp_path / "train", [f"a{i}" for i in range(4)])
    write_split(tmp_path / "val", ["b0", "b1", "b2"])
    (tmp_path / "train" / "images" / "lonely.jpg").write_bytes(
        (tmp_path / "train" / "images" / "a0.jpg").read_bytes())
    pair((10, 10), 0)[1].save(tmp_path / "val" / "masks" / "b1.png")  # wrong size
    (tmp_path / "val" / "masks" / "b2.png").write_bytes(b"not a png")
    with caplog.at_level(logging.WARNING, "m3i_lightning"):
        score = segmentation_probe(tiny_backbone(), tiny_options(
            {"source": "folder", "path": str(tmp_path)}))
    assert score.sizes == {"train": 4, "val": 1}
    text = caplog.text
    assert "1 image file(s)" in text and "lonely.jpg" in text
    assert "skipped 2 samples" in text and "mask size differs from its image" in text
    assert "unreadable image" in text


def test_all_pairs_failing_and_out_of_range_ids_are_one_line_errors(tmp_path):
    write_split(tmp_path / "train", ["a0", "a1"])
    write_split(tmp_path / "val", ["b0"])
    options = tiny_options({"source": "folder", "path": str(tmp_path)})
    pair((5, 5), 0)[1].save(tmp_path / "val" / "masks" / "b0.png")
    with pytest.raises(ConfigError, match="no usable image and mask in the segmentation val"):
        segmentation_probe(tiny_backbone(), options)
    write_split(tmp_path / "other" / "train", ["a0"])
    write_split(tmp_path / "other" / "val", ["b0"])
    with pytest.raises(ConfigError, match=r"a0\.png: class id 2 is outside "
                                          r"segmentation\.num_classes=2"):
        segmentation_probe(tiny_backbone(), tiny_options(
            {"source": "folder", "path": str(tmp_path / "other")}, num_classes=2))
    with pytest.raises(ConfigError, match="no image under .* has a mask of the same name"):
        (tmp_path / "empty" / "train" / "images").mkdir(parents=True)
        (tmp_path / "empty" / "train" / "masks").mkdir()
        (tmp_path / "empty" / "val").mkdir()
        segmentation_probe(tiny_backbone(), tiny_options(
            {"source": "folder", "path": str(tmp_path / "empty")}))


def test_hugging_face_form_reads_image_and_annotation_columns(tmp_path):
    import datasets

    def rows(count, offset):
        images, masks = zip(*(pair((18, 18), offset + i) for i in range(count)), strict=True)
        return datasets.Dataset.from_dict(
            {"image": list(images), "annotation": list(masks)},
            features=datasets.Features({"image": datasets.Image(),
                                        "annotation": datasets.Image()}))

    datasets.DatasetDict({"train": rows(6, 0), "validation": rows(3, 10)}).save_to_disk(
        str(tmp_path / "ds"))
    data = {"source": "hf", "name": str(tmp_path / "ds"), "split": "train",
            "val_split": "validation", "image_column": "image", "mask_column": "annotation"}
    torch.manual_seed(0)
    score = segmentation_probe(tiny_backbone(), tiny_options(data, epochs=30))
    assert score.sizes == {"train": 6, "val": 3} and score.miou > 0.8
    with pytest.raises(ConfigError, match="no column 'mask'"):
        segmentation_probe(tiny_backbone(), tiny_options({**data, "mask_column": "mask"}))


def test_protocol_selection_defaults_and_refuses_unknown_names():
    assert selected_protocols(None, image_text=False) == ["knn", "linear"]
    assert selected_protocols(None, image_text=True) == ["knn", "linear", "zero_shot"]
    assert selected_protocols(["segmentation", "knn"], image_text=False) == ["knn",
                                                                            "segmentation"]
    with pytest.raises(ConfigError, match=r"choose a non-empty subset of \[.*'segmentation'\]"):
        selected_protocols(["knn", "segmentaton"], image_text=False)
    with pytest.raises(ConfigError, match=r"zero_shot needs .* image-text objective .*'clip'"):
        selected_protocols(["zero_shot"], image_text=False)
    assert set(PROTOCOLS) == {"knn", "linear", "zero_shot", "finetune", "segmentation"}


