"""Fashion-MNIST as an image folder for ``data=imagefolder``: a seeded sample of the official
training and test sets (IDX files, e.g. Debian's dataset-fashion-mnist in
/usr/share/datasets/fashion-mnist), written as PNGs in ``DIR/train/<class>/`` and
``DIR/val/<class>/``, with a caption per image (``metadata.jsonl``: "a photo of a <class>.").

    python scripts/fashion_mnist_folder.py DIR [--train 1500] [--val 1000] [--seed 0]
        [--idx /usr/share/datasets/fashion-mnist]

The held-out images come from the test set, the training images from the training set: the two
never overlap. The sizes default to the 1,500 / 1,000 split of docs/interplay.md.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
           "bag", "ankle boot")
IDX = Path("/usr/share/datasets/fashion-mnist")


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (gzipped or not): magic (dtype 0x08 = uint8, rank), sizes, then the data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\0\0" or data[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    rank = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(rank))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * rank).reshape(shape)


def write_split(images: np.ndarray, labels: np.ndarray, folder: Path) -> None:
    metadata = []
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        name = f"{CLASSES[label].replace(' ', '_')}/{i:05d}.png"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, "L").save(folder / name)
        metadata.append({"file_name": name, "text": f"a photo of a {CLASSES[label]}."})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metadata))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=1500)
    parser.add_argument("--val", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--idx", type=Path, default=IDX)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    for split, prefix, count in (("train", "train", args.train), ("val", "t10k", args.val)):
        found = {p.name.split(".")[0]: p for p in args.idx.glob(f"{prefix}-*-ubyte*")}
        images = read_idx(found[f"{prefix}-images-idx3-ubyte"])
        labels = read_idx(found[f"{prefix}-labels-idx1-ubyte"])
        chosen = np.sort(rng.choice(len(labels), count, replace=False))
        write_split(images[chosen], labels[chosen], args.out / split)
        print(f"{split}: {count} images, {np.bincount(labels[chosen], minlength=10).tolist()} "
              "per class")


if __name__ == "__main__":
    main()
