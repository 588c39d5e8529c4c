"""``data=webdataset``: shards written by scripts/make_shards.py, streamed, split by rank and
worker, robust to broken members and truncated shards."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import pytest
import torch
from data_files import (
    SHARD_PATTERN,
    write,
)

from m3i_lightning.components.text import ByteTokenizer
from m3i_lightning.core.errors import ConfigError
from m3i_lightning.data import WebDatasetData
from m3i_lightning.data.shards import ShardSource, expand_urls
from m3i_lightning.data.stream import Reader, ViewStream
from m3i_lightning.data.views import CropSet


def module(urls, **kwargs) -> WebDatasetData:
    options = dict(img_size=8, batch_size=4, num_workers=0, val_fraction=0.0,
                   tokenizer=ByteTokenizer(16))
    return WebDatasetData(str(urls), **{**options, **kwargs})


def test_brace_patterns():
    assert expand_urls("s/{008..010}.tar") == ["s/008.tar", "s/009.tar", "s/010.tar"]
    assert expand_urls("{a,b}/{1..2}.tar::c.tar") == ["a/1.tar", "a/2.tar", "b/1.tar",
                                                       "b/2.tar", "c.tar"]


def test_glob_pattern(shards):
    assert expand_urls(str(shards / "*.tar")) == expand_urls(str(shards / SHARD_PATTERN))


def test_make_shards_writes_sizes_classes_and_captions(shards):
    assert json.loads((shards / "sizes.json").read_text()) == {
        f"{i:06d}.tar": 4 for i in range(8)}
    assert len(json.loads((shards / "classes.json").read_text())) == 32
    dm = module(shards / SHARD_PATTERN)
    assert dm.num_samples == 32 and dm.num_classes == 32
    assert dm.provides == {"view1", "view2", "geometry", "label", "text"}
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(loader) == len(batches) == 8
    labels = sorted(label for b in batches for label in b["label"].tolist())
    assert labels == list(range(32))  # one epoch: every sample once
    assert all(b["text_valid"].all() and b["view2"].shape == (4, 3, 8, 8) for b in batches)


def test_fewer_shards_than_readers_split_by_sample(shards):
    """2 shards for 2 ranks × 2 workers: every reader scans both and keeps every 4th sample."""
    source = ShardSource([str(shards / "000000.tar"), str(shards / "000001.tar")], 32, 0.0,
                         "train")
    parts = [[r[1] for r in source(Reader(rank, 2, worker, 2, 0, 0, "0"))]
             for rank in range(2) for worker in range(2)]
    assert all(len(p) == 2 for p in parts)
    assert sorted(sum(parts, [])) == sorted(r[1] for r in source.everything())


def test_resampled_streams_have_a_fixed_length_and_differ_on_resume(shards):
    source = ShardSource(expand_urls(str(shards / SHARD_PATTERN)), 32, 0.0, "train", resampled=True)

    def labels(seed: str) -> list[int]:
        stream = ViewStream(source, CropSet(8, (0.2, 1.0)), {"view1", "label"}, batch_size=4,
                            batches=5, seed=seed)
        samples = list(stream)
        assert len(samples) == len(stream) == 20
        return [s["label"] for s in samples]

    assert labels("0/step 0") == labels("0/step 0")
    assert labels("0/step 0") != labels("0/step 40")  # a resumed run draws new shards


def test_broken_member_and_truncated_shard_are_skipped_and_reported(shards, tmp_path):
    for i in range(3):
        shutil.copy(shards / f"{i:06d}.tar", tmp_path)
    shutil.copy(shards / "sizes.json", tmp_path)
    shutil.copy(shards / "classes.json", tmp_path)
    broken = bytearray((tmp_path / "000001.tar").read_bytes())
    header = broken.find(b".png", 512 * 3) - 9  # the second sample's image header
    broken[header + 2] ^= 0xFF  # its checksum no longer matches
    (tmp_path / "000001.tar").write_bytes(bytes(broken))
    whole = (tmp_path / "000002.tar").read_bytes()
    (tmp_path / "000002.tar").write_bytes(whole[: len(whole) // 2])
    dm = module(tmp_path / "{000000..000002}.tar", shuffle_buffer=0)
    torch.manual_seed(0)
    batches = list(dm.train_dataloader())
    assert len(batches) == 3  # 12 listed samples: the length holds, shards are re-read
    reasons = [entry for b in batches for entry in b.get("skipped", [])]
    assert any(r.startswith("broken tar member: ") and "000001.tar" in r for r in reasons)
    assert any(r.startswith("unreadable shard: ") and "000002.tar" in r for r in reasons)
    labels = {label for b in batches for label in b["label"].tolist()}
    assert len(labels) >= 6 and all(torch.isfinite(b["view1"]).all() for b in batches)


def test_shards_without_usable_samples_or_sizes_fail_at_start_up(tmp_path):
    with tarfile.open(tmp_path / "000000.tar", "w") as tar:
        for name, data in (("a.txt", b"caption without image"), ("b.jpg", b"not a jpeg")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "sizes.json").write_text('{"000000.tar": 2}')
    with pytest.raises(ConfigError, match="no usable sample.*all 2 failed"):
        module(tmp_path / "000000.tar")
    write(tmp_path / "other" / "000000.tar", (tmp_path / "000000.tar").read_bytes())
    with pytest.raises(ConfigError, match="sizes.json"):
        module(tmp_path / "other" / "000000.tar")
    with pytest.raises(ConfigError, match="needs data.urls"):
        WebDatasetData()
    with pytest.raises(ConfigError, match="no samples in|unreadable shard"):
        module(tmp_path / "missing.tar", num_samples=4)
    # a shard named by the pattern but absent is named, not reported as a sizes.json problem
    with pytest.raises(ConfigError, match=r"1 of the 2 shards .* do not exist, e\.g\. .*000001"):
        module(str(tmp_path) + "/{000000..000001}.tar")


