"""``data=torchvision``: torchvision's own classes read their files (FashionMNIST from the official
IDX files, Food101 and ImageNet from folders laid out as they expect); labels, splits and
class names are the class's, captions are written over the names."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from data_files import image_bytes, write
from helpers import compose_config

from m3i_lightning.components.text import ByteTokenizer
from m3i_lightning.config.factory import build_datamodule
from m3i_lightning.core.errors import ConfigError
from m3i_lightning.data import TorchvisionData

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]
SIZES = {"train": 48, "t10k": 24}


def read_idx(path: Path, count: int) -> np.ndarray:
    """The first ``count`` items of an IDX file (big-endian header: magic, then one size per
    dimension), read here independently of torchvision."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        _, _, _, dims = struct.unpack(">BBBB", f.read(4))
        shape = struct.unpack(f">{dims}I", f.read(4 * dims))
        item = int(np.prod(shape[1:], dtype=np.int64))
        data = np.frombuffer(f.read(count * item), dtype=np.uint8)
    return data.reshape(count, *shape[1:])


def write_idx(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    path.write_bytes(header + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes())


@pytest.fixture(scope="module")
def fashion_root(tmp_path_factory) -> tuple[Path, dict]:
    """<root>/FashionMNIST/raw/ as torchvision expects it: the first images and labels of
    Debian's official files (dataset-fashion-mnist), or random ones in the same IDX format
    where that package is absent."""
    root = tmp_path_factory.mktemp("fashion")
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in SIZES.items():
        official = DEBIAN_FASHION / f"{split}-images-idx3-ubyte.gz"
        if official.is_file():
            images = read_idx(official, count)
            labels = read_idx(DEBIAN_FASHION / f"{split}-labels-idx1-ubyte.gz", count)
        else:
            images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
            labels = rng.integers(0, 10, count, dtype=np.uint8)
        raw = root / "FashionMNIST" / "raw"
        write_idx(raw / f"{split}-images-idx3-ubyte", images)
        write_idx(raw / f"{split}-labels-idx1-ubyte", labels)
        arrays[split] = (images, labels)
    return root, arrays


def test_fashion_mnist_from_idx_files_through_the_config(fashion_root):
    root, arrays = fashion_root
    cfg = compose_config("data=torchvision", "data.name=FashionMNIST", f"data.root={root}",
                         "data.batch_size=8", "data.num_workers=0", "backbone.img_size=16",
                         tiny=False)
    dm = build_datamodule(cfg.data, ByteTokenizer(32))
    assert isinstance(dm, TorchvisionData) and dm.class_names == FASHION_CLASSES
    assert dm.provides >= {"label", "text"}
    train, val = dm.splits["train"], dm.splits["val"]
    assert (len(train), len(val)) == (SIZES["train"], SIZES["t10k"])
    images, labels = arrays["train"]
    assert train.labels == labels.tolist() and val.labels == arrays["t10k"][1].tolist()
    image, label, caption = train[5]
    assert label == labels[5] and caption == f"a photo of a {FASHION_CLASSES[labels[5]]}."
    expected = torch.from_numpy(images[5]).float().div(255).expand(3, 28, 28)
    assert torch.equal(image.tensor(), expected)  # grey, copied to the three channels

    batch = next(iter(dm.train_dataloader()))
    assert batch["view1"].shape == (8, 3, 16, 16) and batch["text_valid"].all()
    scored = next(iter(dm.eval_dataloader("val")))
    assert scored["label"].tolist() == arrays["t10k"][1][:8].tolist()
    assert dm.class_prompts()[1] == ["a photo of a Trouser."]


def test_missing_files_unknown_class_and_split_are_one_line(fashion_root, tmp_path):
    root, _ = fashion_root
    with pytest.raises(ConfigError, match=r"data.name=FashionMNIST under data.root=.*not found"):
        TorchvisionData("FashionMNIST", root=str(tmp_path))
    with pytest.raises(ConfigError, match="no torchvision dataset class"):
        TorchvisionData("FashionMnist", root=str(root))
    with pytest.raises(ConfigError, match="ImageNet cannot download"):
        TorchvisionData("ImageNet", root=str(tmp_path), download=True)
    write(tmp_path / "food-101" / "meta" / "train.json", b"{}")
    (tmp_path / "food-101" / "images").mkdir()
    with pytest.raises(ConfigError, match="Food101 has no split 'valid'"):
        TorchvisionData("Food101", root=str(tmp_path), val_split="valid")


def test_food101_and_imagenet_folders_through_their_classes(tmp_path):
    """Food101 (a split argument; train / test from meta/*.json) and ImageNet (its meta.bin
    and train/ val/ class folders): files handed over by path, held-out split the class's
    test / val, ImageNet's class names its first synonym."""
    food = tmp_path / "food" / "food-101"
    meta = {"train": {"apple_pie": ["apple_pie/1", "apple_pie/2"], "ramen": ["ramen/3"]},
            "test": {"apple_pie": ["apple_pie/4"], "ramen": ["ramen/5", "ramen/6"]}}
    for split, classes in meta.items():
        write(food / "meta" / f"{split}.json", json.dumps(classes).encode())
        for files in classes.values():
            for i, name in enumerate(files):
                write(food / "images" / f"{name}.jpg", image_bytes(i, fmt="JPEG"))
    dm = TorchvisionData("Food101", root=str(tmp_path / "food"), img_size=16, batch_size=2,
                         num_workers=0, tokenizer=ByteTokenizer(32))
    assert dm.class_names == ["apple_pie", "ramen"] and dm.val_name == "test"
    assert dm.splits["train"].labels == [0, 0, 1] and dm.splits["val"].labels == [0, 1, 1]
    image, _, caption = dm.splits["train"][2]
    assert Path(image.data) == food / "images" / "ramen" / "3.jpg"  # a path, decoded by the view
    assert caption.endswith("ramen.")
    assert next(iter(dm.train_dataloader()))["view1"].shape == (2, 3, 16, 16)

    net = tmp_path / "imagenet"
    wnids = {"n01440764": ("tench", "Tinca tinca"), "n01443537": ("goldfish",)}
    net.mkdir()
    torch.save((wnids, list(wnids)), net / "meta.bin")
    for split, count in (("train", 3), ("val", 2)):
        for wnid in wnids:
            for i in range(count):
                write(net / split / wnid / f"{i}.JPEG", image_bytes(i, fmt="JPEG"))
    dm = TorchvisionData("ImageNet", root=str(net), img_size=16, batch_size=4, num_workers=0,
                         labels=True, captions=False)
    assert dm.class_names == ["tench", "goldfish"] and dm.val_name == "val"
    assert (len(dm.splits["train"]), len(dm.splits["val"])) == (6, 4)
    assert "text" not in dm.provides
    assert next(iter(dm.eval_dataloader("val")))["label"].tolist() == [0, 0, 1, 1]
