"""``data=hf``: a save_to_disk folder and parquet files, map-style and streaming."""

from __future__ import annotations

import pytest
import torch
from data_files import HF_ROWS

from m3i_lightning.components.text import ByteTokenizer, HFTokenizer, TextTower
from m3i_lightning.core.errors import ConfigError
from m3i_lightning.data import HFData
from m3i_lightning.data.hf import HFStream
from m3i_lightning.data.stream import ViewStream
from m3i_lightning.data.views import CropSet


def hf_module(name, **kwargs) -> HFData:
    options = dict(img_size=8, batch_size=4, num_workers=0, val_fraction=0.0,
                   text_column="caption", label_column="label", tokenizer=ByteTokenizer(16))
    return HFData(str(name), **{**options, **kwargs})


def test_save_to_disk_map_style(hf_folder):
    dm = hf_module(hf_folder / "disk", batch_size=HF_ROWS)
    assert dm.class_names == ["a", "b", "c"] and dm.provides >= {"label", "text"}
    torch.manual_seed(0)
    (batch,) = list(dm.train_dataloader())
    assert batch["view1"].shape == (HF_ROWS, 3, 8, 8)
    assert len(batch["skipped"]) >= 1 and "row 4" in batch["skipped"][0]
    assert (batch["label"] == -100).any()  # the -1 row: unlabelled, not mislabelled
    assert 0 < batch["text_valid"].sum() < HF_ROWS  # missing and empty captions are invalid


def test_parquet_streaming_split_by_node(hf_folder):
    """Two ranks' parts of the streamed parquet files (label = row index, so a label names its
    row): disjoint, and together every row with a readable image."""
    dm = hf_module(hf_folder / "*.parquet", streaming=True, label_column="index",
                   num_classes=HF_ROWS)
    assert dm.num_samples == HF_ROWS  # from the parquet footers
    parts = [[sample["label"] for sample in ViewStream(
        HFStream(dm.train, dm.columns, 0.0, "train"), CropSet(8, (0.2, 1.0)), {"view1", "label"},
        batch_size=4, batches=None, train=False, rank=rank, world=2)] for rank in range(2)]
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == [i for i in range(HF_ROWS) if i != 4]  # row 4 is broken
    loader = dm.train_dataloader()
    assert len(loader) == HF_ROWS // 4 == len(list(loader))


def test_local_tokenizer_truncates_to_the_context_length(hf_folder, word_tokenizer_folder,
                                                         tmp_path):
    tokenizer = HFTokenizer(str(word_tokenizer_folder), context_length=3)
    dm = hf_module(hf_folder / "disk", batch_size=HF_ROWS, tokenizer=tokenizer)
    (batch,) = list(dm.train_dataloader())
    assert batch["text"].shape == (HF_ROWS, 3)  # "photo 12 photo 12 …" cut to 3 tokens
    long = tokenizer(["photo 1 photo 2 photo 3", "photo"])
    assert long["input_ids"].tolist() == [[4, 6, 4], [4, 0, 0]]
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=4, projection_dim=8)).save_pretrained(
        tmp_path / "tower")
    assert TextTower(tokenizer, pretrained=str(tmp_path / "tower")).embed_dim == 8
    with pytest.raises(ConfigError, match="exceeds the 4 positions"):
        TextTower(HFTokenizer(str(word_tokenizer_folder), 16), pretrained=str(tmp_path / "tower"))


def test_bad_configuration_is_a_clear_error(hf_folder):
    with pytest.raises(ConfigError, match="no column 'text'"):
        hf_module(hf_folder / "disk", text_column="text")
    with pytest.raises(ConfigError, match="missing.parquet: no such folder or file"):
        hf_module(hf_folder / "missing.parquet")
    with pytest.raises(ConfigError, match="not a split 'test'"):
        hf_module(hf_folder / "disk", split="test")


