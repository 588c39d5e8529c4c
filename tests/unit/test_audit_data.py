"""Nothing silently dropped or wrong in the data evaluation reads (#31, items 7, 8, 9, 12, 13):
a held-out folder beside ``data.path=<DIR>/train``, counted strays and out-of-range labels, the
protocols unlabelled data cannot run said, one class warned, bad weights refused, and one rule
for an empty held-out split in the three file formats."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
from data_files import SHARD_PATTERN, image_bytes, labelled_folder, write
from helpers import compose_config, tiny_backbone

from m3i_lightning.config.factory import build_datamodule, build_objectives
from m3i_lightning.core.errors import ConfigError, EmptySplitError, M3IError, message_of
from m3i_lightning.data import WebDatasetData
from m3i_lightning.data.imagefolder import ImageFolderData
from m3i_lightning.data.shards import to_record
from m3i_lightning.data.skips import BadSample
from m3i_lightning.evaluation.protocols import TrainedModel, evaluate, label_free

FOLDER = dict(img_size=16, batch_size=4, num_workers=0)


def test_data_path_to_train_reads_the_val_folder_beside_it(tmp_path):
    labelled_folder(tmp_path / "train", 12)
    labelled_folder(tmp_path / "val", 6)
    for path in (tmp_path, tmp_path / "train"):
        data = ImageFolderData(str(path), **FOLDER)
        assert (len(data.splits["train"].files), len(data.splits["val"].files)) == (12, 6)


def test_held_out_images_of_no_class_of_train_are_counted(tmp_path, caplog):
    write(tmp_path / "train" / "cat" / "0.png", image_bytes(0))
    write(tmp_path / "train" / "dog" / "0.png", image_bytes(1))
    write(tmp_path / "val" / "Cat" / "0.png", image_bytes(2))
    write(tmp_path / "val" / "dog" / "1.png", image_bytes(3))
    with caplog.at_level(logging.WARNING):
        ImageFolderData(str(tmp_path), **FOLDER)
    assert "1 of the 2 images under" in caplog.text and "(Cat, not one of" in caplog.text


def test_one_class_is_warned(tmp_path, caplog):
    labelled_folder(tmp_path, 4, classes=1)
    with caplog.at_level(logging.WARNING):
        ImageFolderData(str(tmp_path), **FOLDER)
    assert "the data has one class (c00)" in caplog.text


@pytest.mark.parametrize("cls, outcome", [(b"1", 1), (b"5", "outside data.num_classes=2"),
                                          (b"cat", "class 'cat' is no integer"), (None, None)])
def test_a_shard_label_outside_the_classes_is_a_counted_skip(cls, outcome):
    group = {"png": image_bytes(0), **({"cls": cls} if cls is not None else {})}
    record = to_record("a.tar", "k", group, num_classes=2)
    if isinstance(outcome, str):
        assert isinstance(record, BadSample) and outcome in str(record)
    else:
        assert record[1] == outcome


def test_protocols_that_need_labels_are_said_when_asked_for(caplog):
    with caplog.at_level(logging.WARNING):
        assert label_free(["knn", "linear"], None) == []
    assert caplog.text == ""
    with caplog.at_level(logging.WARNING):
        assert label_free(["knn", "segmentation"], ["knn", "segmentation"]) == ["segmentation"]
    assert "protocols ['knn'] skipped: they need labels" in caplog.text


@pytest.mark.parametrize("weight, message", [(-1, "weight=-1 must be a number >= 0"),
                                             ("abc", "weight=abc must be a number >= 0"),
                                             (float("nan"), "weight=nan must be")])
def test_a_weight_that_is_no_number_or_negative_is_refused(weight, message):
    with pytest.raises(ConfigError, match=message):
        build_objectives({"cls": {"weight": weight}}, {"embed_dim": 8, "grid_size": (2, 2),
                                                       "num_classes": 2})


def test_a_weight_of_zero_is_warned(caplog):
    with caplog.at_level(logging.WARNING):
        build_objectives({"cls": {"weight": 0}}, {"embed_dim": 8, "grid_size": (2, 2),
                                                  "num_classes": 2})
    assert "objective.cls.weight=0: its loss is logged but trains nothing" in caplog.text


def empty_held_out(kind: str, tmp_path, request) -> list[str]:
    if kind == "imagefolder":
        return [f"data.path={labelled_folder(tmp_path, 8)}"]
    if kind == "hf":
        return [f"data.name={request.getfixturevalue('hf_folder') / 'disk'}",
                "data.label_column=label"]
    return [f"data.urls='{request.getfixturevalue('shards') / SHARD_PATTERN}'",
            "data.num_classes=32"]


@pytest.mark.parametrize("kind", ["embedded", "imagefolder", "hf", "webdataset"])
def test_an_empty_held_out_split_is_one_error_naming_its_options(kind, tmp_path, request):
    """One rule for every data format: evaluation says which options supply the split."""
    args = [] if kind == "embedded" else [f"data={kind}", *empty_held_out(kind, tmp_path, request)]
    cfg = compose_config(*args, "data.val_fraction=0", "data.img_size=16", "data.num_workers=0",
                         tiny=False)
    data = build_datamodule(cfg.data, None)
    if hasattr(data, "setup"):
        data.setup("validate")
    with pytest.raises(EmptySplitError, match="data.val_fraction"):
        evaluate(TrainedModel(tiny_backbone()), data, cfg.knn, cfg.probe)


def test_a_corrupt_shard_read_by_a_worker_is_named_in_one_line(shards, tmp_path):
    """Two workers, one shard each, the second corrupt through and through: the error names
    that shard (not the worker count), and comes back from the worker as one line."""
    for name in ("000000.tar", "sizes.json", "classes.json"):
        shutil.copy(shards / name, tmp_path)
    (tmp_path / "000001.tar").write_bytes(b"\x00garbage" * 700)
    sizes = json.loads((tmp_path / "sizes.json").read_text())
    (tmp_path / "sizes.json").write_text(json.dumps(
        {"000000.tar": sizes["000000.tar"], "000001.tar": sizes["000000.tar"]}))
    data = WebDatasetData(str(tmp_path / "{000000..000001}.tar"), img_size=8, batch_size=2,
                          num_workers=2, val_fraction=0.0, captions=False)
    with pytest.raises(M3IError) as err:
        list(data.train_dataloader())
    line = message_of(err.value)
    assert "000001.tar" in line and "unreadable shard" in line and "\n" not in line
    assert "fewer DataLoader workers" not in line


@pytest.mark.parametrize("name", ["./my_dataset", "/data/nowhere", "~/nowhere"])
def test_a_missing_local_hf_dataset_is_not_blamed_on_the_hub(name, tmp_path, monkeypatch):
    from m3i_lightning.data.hf import load_hf

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=f"data.name={name}: no such folder or file"):
        load_hf(name, "train", False)
