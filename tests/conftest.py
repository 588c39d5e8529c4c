"""Fixtures only (helpers live in ``helpers.py``), and each test's tier marked from its folder:
``unit`` (fast, in-process), ``distributed`` (2-process gloo), ``e2e`` (commands run as a user
runs them)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from data_files import hf_dataset, one_class_shards, word_tokenizer
from helpers import CLIP_TINY, compose_config, digits_module, fit_and_save, tiny_backbone

from m3i_lightning.backbone import Backbone
from m3i_lightning.components.text import ByteTokenizer

# Tiny tensors gain nothing from intra-op threads, and on a shared 2-core machine the spinning
# of oversubscribed threads makes a step tens of times slower: tests run single-threaded.
torch.set_num_threads(1)

TIERS = ("unit", "distributed", "e2e")


def pytest_collection_modifyitems(items) -> None:
    root = Path(__file__).parent
    for item in items:
        tier = item.path.relative_to(root).parts[0]
        if tier in TIERS:
            item.add_marker(tier)


@pytest.fixture
def backbone() -> Backbone:
    torch.manual_seed(0)
    return tiny_backbone()


@pytest.fixture(scope="session")
def tokenizer() -> ByteTokenizer:
    return ByteTokenizer(context_length=16)


@pytest.fixture
def batch(tokenizer) -> dict:
    """One training batch with every field: view1/view2 with geometry, label, text."""
    torch.manual_seed(0)
    return next(iter(digits_module(tokenizer).train_dataloader()))


@pytest.fixture(scope="session")
def clip_checkpoint(tmp_path_factory) -> Path:
    """300 steps of clip alone on the digits (~10 s), saved with its config."""
    path = tmp_path_factory.mktemp("clip_run") / "last.ckpt"
    fit_and_save(compose_config(*CLIP_TINY, "data.batch_size=64", "optim.lr=2e-3"), 300, path)
    return path


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory) -> Path:
    """A Hugging Face dataset on disk, save_to_disk and parquet (data_files.hf_dataset)."""
    return hf_dataset(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="session")
def word_tokenizer_folder(tmp_path_factory) -> Path:
    """A local word-level AutoTokenizer folder (data_files.word_tokenizer)."""
    return word_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """8 webdataset shards of 4 one-class images (data_files.one_class_shards)."""
    return one_class_shards(tmp_path_factory.mktemp("wds"))
