"""Small real datasets written to disk for the data tests: images of every awkward kind, broken
files, captions in metadata files, and the command line the acceptance runs use."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

TINY_CLI = ["backbone.img_size=16", "backbone.patch_size=4", "backbone.depth=1",
            "backbone.embed_dim=32", "backbone.num_heads=2", "objective.clip.text_width=32",
            "objective.mim_feat.predictor_dim=32", "data.batch_size=8", "data.num_workers=0",
            "'objective=[mim_feat,clip,cls]'"]


def image_bytes(seed: int, mode: str = "RGB", size: tuple[int, int] = (24, 20),
                fmt: str = "PNG") -> bytes:
    """An encoded image of random content in ``mode``."""
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    else:
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def messy_folder(root: Path) -> dict:
    """Two class folders of 7 images, each a different kind (grayscale, RGBA, palette, CMYK JPEG,
    16-bit, smaller than the crop, …), one image outside the classes, a corrupt JPEG, a
    truncated PNG, a text file; captions in metadata.jsonl, some empty or missing.

    Returns what the test should find: the bad files and the captioned / unlabelled images.
    """
    kinds = [("RGB", "PNG", "png"), ("L", "PNG", "png"), ("RGBA", "PNG", "png"),
             ("P", "PNG", "png"), ("CMYK", "JPEG", "jpg"), ("I;16", "PNG", "png"),
             ("RGB", "JPEG", "jpg")]
    captions, seed = [], 0
    for cls in ("cat", "dog"):
        for i, (mode, fmt, ext) in enumerate(kinds):
            seed += 1
            size = (3, 2) if i == 6 else (24, 20)
            write(root / cls / f"{i}.{ext}", image_bytes(seed, mode, size, fmt))
            text = f"a {mode} {cls} number {i}" if i % 3 else ("" if i == 3 else None)
            if text is not None:
                captions.append({"file_name": f"{cls}/{i}.{ext}", "text": text})
    write(root / "loose.png", image_bytes(99))
    write(root / "cat" / "corrupt.jpg", b"\xff\xd8\xff\xe0 not really a jpeg")
    write(root / "dog" / "truncated.png", image_bytes(7, size=(64, 64))[:200])
    write(root / "notes.txt", b"not an image")
    (root / "metadata.jsonl").write_text("".join(json.dumps(c) + "\n" for c in captions))
    return {"bad": {"corrupt.jpg", "truncated.png"}, "images": 15, "files": 17}


def labelled_folder(root: Path, n: int, classes: int = 2, captions: bool = True) -> Path:
    """``n`` plain PNG images spread over ``classes`` folders, all captioned."""
    rows = []
    for i in range(n):
        name = f"c{i % classes:02d}/{i:04d}.png"
        write(root / name, image_bytes(1000 + i))
        rows.append({"file_name": name, "text": f"image {i} of class {i % classes}"})
    if captions:
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


HF_ROWS = 24


def hf_dataset(root: Path) -> Path:
    """:data:`HF_ROWS` rows: a ClassLabel (one row unlabelled: -1), captions (some missing or
    empty), one image that is not an image; written with save_to_disk (``root/disk``) and as
    2 parquet files (``root/part*.parquet``)."""
    import datasets

    rows = {"image": [{"bytes": image_bytes(i), "path": None} for i in range(HF_ROWS)],
            "caption": [None if i % 5 == 0 else "" if i % 7 == 0 else f"photo {i}"
                        for i in range(HF_ROWS)],
            "label": [-1 if i == 3 else i % 3 for i in range(HF_ROWS)],
            "index": list(range(HF_ROWS))}
    rows["image"][4] = {"bytes": b"broken", "path": None}
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["a", "b", "c"]),
                                  "index": datasets.Value("int64")})
    table = datasets.Dataset.from_dict(rows, features=features)
    table.save_to_disk(str(root / "disk"))
    for part in range(2):
        table.shard(2, part, contiguous=True).to_parquet(str(root / f"part{part}.parquet"))
    return root


def word_tokenizer(folder: Path) -> Path:
    """A word-level AutoTokenizer for the captions of :func:`hf_dataset`, saved to ``folder``:
    what text.tokenizer=PATH loads."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "photo", *map(str, range(HF_ROWS))]
    model = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=model, pad_token="[PAD]", unk_token="[UNK]",
                            bos_token="[BOS]", eos_token="[EOS]").save_pretrained(folder)
    return folder


SHARD_PATTERN = "{000000..000007}.tar"  # the 8 shards of one_class_shards


def one_class_shards(root: Path) -> Path:
    """32 images, each its own class (so a label names its sample), in 8 shards of 4
    (:data:`SHARD_PATTERN`); returns the shard folder."""
    import make_shards as script  # scripts/ is on the tests' path: no interpreter to start

    labelled_folder(root / "src", 32, classes=32)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert script.main([str(root / "src"), str(root / "shards"), "--shard-size", "4"]) == 0
    assert "wrote 32 samples in 8 shards" in printed.getvalue()
    return root / "shards"


def make_shards(src: Path, out: Path, shard_size: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "make_shards.py"), str(src),
                           str(out), "--shard-size", str(shard_size)], capture_output=True,
                          text=True, check=True)


def pretrain(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``python -m m3i_lightning`` with the tiny model, offline, in a fresh process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(run_dir / "hf_home"), "PYTHONWARNINGS": "ignore"}
    command = " ".join([sys.executable, "-m", "m3i_lightning", *TINY_CLI, *overrides,
                        f"hydra.run.dir={run_dir}"])
    return subprocess.run(command, shell=True, capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=600)
