"""``data=hf``: a save_to_disk folder and parquet files, map-style and streaming."""

from __future__ import annotations

import pytest
import torch
from data_files import image_bytes, pretrain

from m3i_lightning.components.text import ByteTokenizer, HFTokenizer, TextTower
from m3i_lightning.core.errors import ConfigError
from m3i_lightning.data import HFData
from m3i_lightning.data.hf import HFStream
from m3i_lightning.data.stream import ViewStream
from m3i_lightning.data.views import CropSet

datasets = pytest.importorskip("datasets")

N = 24


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """24 rows: a ClassLabel (one row unlabelled: -1), captions (some missing or empty), one
    image that is not an image; written with save_to_disk and as 2 parquet files."""
    root = tmp_path_factory.mktemp("hf")
    rows = {"image": [{"bytes": image_bytes(i), "path": None} for i in range(N)],
            "caption": [None if i % 5 == 0 else "" if i % 7 == 0 else f"photo {i}"
                        for i in range(N)],
            "label": [-1 if i == 3 else i % 3 for i in range(N)],
            "index": list(range(N))}
    rows["image"][4] = {"bytes": b"broken", "path": None}
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["a", "b", "c"]),
                                  "index": datasets.Value("int64")})
    table = datasets.Dataset.from_dict(rows, features=features)
    table.save_to_disk(str(root / "disk"))
    for part in range(2):
        table.shard(2, part, contiguous=True).to_parquet(str(root / f"part{part}.parquet"))
    return root


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory):
    """A word-level AutoTokenizer saved to a local folder: what text.tokenizer=PATH loads."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "photo", *map(str, range(N))]
    model = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=model, pad_token="[PAD]", unk_token="[UNK]",
                            bos_token="[BOS]", eos_token="[EOS]").save_pretrained(folder)
    return folder


def hf_module(name, **kwargs) -> HFData:
    options = dict(img_size=8, batch_size=4, num_workers=0, val_fraction=0.0,
                   text_column="caption", label_column="label", tokenizer=ByteTokenizer(16))
    return HFData(str(name), **{**options, **kwargs})


def test_save_to_disk_map_style(saved):
    dm = hf_module(saved / "disk", batch_size=N)
    assert dm.class_names == ["a", "b", "c"] and dm.provides >= {"label", "text"}
    torch.manual_seed(0)
    (batch,) = list(dm.train_dataloader())
    assert batch["view1"].shape == (N, 3, 8, 8)
    assert len(batch["skipped"]) >= 1 and "row 4" in batch["skipped"][0]
    assert (batch["label"] == -100).any()  # the -1 row: unlabelled, not mislabelled
    assert 0 < batch["text_valid"].sum() < N  # missing and empty captions are invalid


def test_parquet_streaming_split_by_node(saved):
    """Two ranks' parts of the streamed parquet files (label = row index, so a label names its
    row): disjoint, and together every row with a readable image."""
    dm = hf_module(saved / "*.parquet", streaming=True, label_column="index", num_classes=N)
    assert dm.num_samples == N  # from the parquet footers
    parts = [[sample["label"] for sample in ViewStream(
        HFStream(dm.train, dm.columns, 0.0, "train"), CropSet(8, (0.2, 1.0)), {"view1", "label"},
        batch_size=4, batches=None, train=False, rank=rank, world=2)] for rank in range(2)]
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == [i for i in range(N) if i != 4]  # row 4 is broken
    loader = dm.train_dataloader()
    assert len(loader) == N // 4 == len(list(loader))


def test_local_tokenizer_truncates_to_the_context_length(saved, word_tokenizer, tmp_path):
    tokenizer = HFTokenizer(str(word_tokenizer), context_length=3)
    dm = hf_module(saved / "disk", batch_size=N, tokenizer=tokenizer)
    (batch,) = list(dm.train_dataloader())
    assert batch["text"].shape == (N, 3)  # "photo 12 photo 12 …" cut to 3 tokens
    long = tokenizer(["photo 1 photo 2 photo 3", "photo"])
    assert long["input_ids"].tolist() == [[4, 6, 4], [4, 0, 0]]
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=4, projection_dim=8)).save_pretrained(
        tmp_path / "tower")
    assert TextTower(tokenizer, pretrained=str(tmp_path / "tower")).embed_dim == 8
    with pytest.raises(ConfigError, match="exceeds the 4 positions"):
        TextTower(HFTokenizer(str(word_tokenizer), 16), pretrained=str(tmp_path / "tower"))


def test_bad_configuration_is_a_clear_error(saved):
    with pytest.raises(ConfigError, match="no column 'text'"):
        hf_module(saved / "disk", text_column="text")
    with pytest.raises(ConfigError, match="could not be loaded"):
        hf_module(saved / "missing.parquet")
    with pytest.raises(ConfigError, match="not a split 'test'"):
        hf_module(saved / "disk", split="test")


def test_pretrain_on_streamed_parquet(saved, word_tokenizer, tmp_path):
    """The acceptance run on a Hugging Face dataset, offline: parquet files, streaming, and a
    local AutoTokenizer folder for the captions."""
    done = pretrain(tmp_path / "run", "data=hf", f"data.name='{saved}/*.parquet'",
                    f"text.tokenizer={word_tokenizer}", "text.context_length=8",
                    "data.streaming=true", "data.text_column=caption",
                    "data.label_column=label", "data.val_fraction=0.3",
                    "data.shuffle_buffer=8", "trainer.max_steps=2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "kNN top-1" in done.stdout
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
