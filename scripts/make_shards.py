"""Turn an image folder into the tar shards ``data=webdataset`` streams.

    python scripts/make_shards.py SRC OUT [--shard-size 1000] [--seed 0] [--text-column text]

SRC is read as ``data=imagefolder`` reads it (class sub-folders give labels, metadata.jsonl /
metadata.csv give captions); point it at one split (e.g. ``DIR/train``) per shard set. Images
are shuffled once, so that every shard mixes the classes (streaming only shuffles within a
buffer), and stored byte for byte: OUT/000000.tar, … hold ``<key>.<ext>`` (the image file),
``<key>.txt`` (its caption, if any) and ``<key>.cls`` (its class index, if any). OUT/sizes.json
gives the samples per shard and OUT/classes.json the class names.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import tarfile
from pathlib import Path

from m3i_lightning.core.errors import M3IError
from m3i_lightning.data.imagefolder import class_names, list_folder


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def write_shards(src: Path, out: Path, shard_size: int, seed: int,
                 text_column: str | None) -> dict[str, int]:
    """Write the shards, ``sizes.json`` and ``classes.json``; returns the sizes."""
    classes = class_names(src)
    listing = list_folder(src, classes, text_column)
    if not listing.files:
        raise SystemExit(f"error: no image files under {src}")
    order = list(range(len(listing.files)))
    random.Random(seed).shuffle(order)
    out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for shard, start in enumerate(range(0, len(order), shard_size)):
        name = f"{shard:06d}.tar"
        partial = out / f"{name}.partial"
        with tarfile.open(partial, "w") as tar:
            for key, index in enumerate(order[start:start + shard_size], start):
                path = listing.files[index]
                ext = Path(path).suffix[1:].lower().replace("jpeg", "jpg")
                add_member(tar, f"{key:09d}.{ext}", Path(path).read_bytes())
                if listing.captions[index]:
                    add_member(tar, f"{key:09d}.txt", listing.captions[index].encode())
                if listing.labels[index] is not None:
                    add_member(tar, f"{key:09d}.cls", str(listing.labels[index]).encode())
        os.replace(partial, out / name)
        sizes[name] = len(order[start:start + shard_size])
    (out / "sizes.json").write_text(json.dumps(sizes, indent=1))
    if classes:
        (out / "classes.json").write_text(json.dumps(classes))
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="image folder (one split)")
    parser.add_argument("out", type=Path, help="output folder for the shards")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle")
    parser.add_argument("--text-column", default=None,
                        help="caption column of the metadata (default: text, else caption)")
    args = parser.parse_args(argv)
    if not args.src.is_dir():
        parser.error(f"{args.src} is not a folder")
    try:
        sizes = write_shards(args.src, args.out, args.shard_size, args.seed, args.text_column)
    except M3IError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {sum(sizes.values())} samples in {len(sizes)} shards to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
