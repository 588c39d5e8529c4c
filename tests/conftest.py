"""Shared tiny fixtures: a 16 px ViT with 4 px patches and real batches of the embedded digits."""

from __future__ import annotations

import pytest
import torch

from m3i_lightning.backbone import Backbone
from m3i_lightning.data import EmbeddedDigits
from m3i_lightning.text import ByteTokenizer

TINY_VIT = dict(arch="vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=2,
                num_heads=2)


def tiny_backbone(**overrides) -> Backbone:
    options = {**TINY_VIT, **overrides}
    return Backbone(options.pop("arch"), **options)


@pytest.fixture
def backbone() -> Backbone:
    torch.manual_seed(0)
    return tiny_backbone()


@pytest.fixture(scope="session")
def tokenizer() -> ByteTokenizer:
    return ByteTokenizer(context_length=16)


def digits_module(tokenizer, batch_size: int = 8, **kwargs) -> EmbeddedDigits:
    dm = EmbeddedDigits(img_size=16, source_size=16, batch_size=batch_size, num_workers=0,
                        tokenizer=tokenizer, **kwargs)
    dm.setup("fit")
    return dm


@pytest.fixture
def batch(tokenizer) -> dict:
    """One training batch with every field: view1/view2 with geometry, label, text."""
    torch.manual_seed(0)
    return next(iter(digits_module(tokenizer).train_dataloader()))
