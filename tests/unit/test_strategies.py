"""Strategy names, the transformer blocks that shard, and activation checkpointing, in one
process (the multi-process runs are in test_distributed.py)."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_backbone, tiny_objective
from lightning.pytorch.strategies import FSDPStrategy
from timm.models.vision_transformer import Block
from transformers.models.clip.modeling_clip import CLIPEncoderLayer

from m3i_lightning.backbone import Backbone
from m3i_lightning.core.errors import ConfigError
from m3i_lightning.engine import sharding
from m3i_lightning.engine.module import MultiObjective
from m3i_lightning.runtime.strategies import FullyShardedDataParallel, build_strategy


def _model(tokenizer, *names: str) -> MultiObjective:
    torch.manual_seed(0)
    heads = {"inst_disc": dict(hidden_dim=32, out_dim=16)}
    return MultiObjective(tiny_backbone(depth=1),
                          {n: tiny_objective(n, tokenizer, **heads.get(n, {})) for n in names})


def test_strategy_names(tokenizer, monkeypatch):
    model = _model(tokenizer, "mim_feat", "clip")
    assert build_strategy({"name": "auto"}, model) == "auto"
    assert build_strategy({"name": "ddp"}, model) == "ddp"
    assert isinstance(build_strategy({"name": "fsdp"}, model), FullyShardedDataParallel)
    with pytest.raises(ConfigError, match="unknown strategy 'fdsp'"):
        build_strategy({"name": "fdsp"}, model)
    with pytest.raises(ConfigError, match="needs CUDA"):
        build_strategy({"name": "fsdp1"}, model)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    fsdp1 = build_strategy({"name": "fsdp1"}, model)
    assert isinstance(fsdp1, FSDPStrategy)
    with pytest.raises(ConfigError, match=r"\['inst_disc'\].*strategy=fsdp"):
        build_strategy({"name": "fsdp1"}, _model(tokenizer, "inst_disc"))


def test_sharded_checkpoints_need_fsdp2_and_async_needs_sharded(tokenizer):
    model = _model(tokenizer, "cls")
    plain = build_strategy({"name": "fsdp"}, model, {"sharded": False, "async": False})
    assert plain.checkpoint_writer is None
    background = build_strategy({"name": "fsdp"}, model, {"sharded": True, "async": True})
    assert background.checkpoint_writer.asynchronous
    with pytest.raises(ConfigError, match="checkpoint.sharded=true needs strategy=fsdp"):
        build_strategy({"name": "ddp"}, model, {"sharded": True, "async": False})
    with pytest.raises(ConfigError, match="checkpoint.async=true .* needs checkpoint.sharded"):
        build_strategy({"name": "fsdp"}, model, {"sharded": False, "async": True})


def test_blocks_of_student_teacher_predictor_and_text_tower_are_found(tokenizer):
    model = _model(tokenizer, "mim_feat", "clip")
    assert sharding.block_classes(model) == {Block, CLIPEncoderLayer}
    # student 1 + EMA teacher 1 + mim_feat predictor 1 + clip text tower 1
    assert len(sharding.transformer_blocks(model)) == 4
    assert Backbone not in sharding.block_classes(model)


def test_activation_checkpointing_recomputes_exactly(tokenizer, batch):
    """Same loss and gradients with the blocks recomputed in the backward pass; configuring
    twice changes nothing (Lightning may call configure_model again)."""
    results = []
    for checkpointing in (False, True):
        model = _model(tokenizer, "mim_feat", "clip")
        sharding.configure(model, activation_checkpointing=checkpointing)
        sharding.configure(model, activation_checkpointing=not checkpointing)
        assert model.backbone.model.grad_checkpointing is checkpointing
        text_model = model.heads["clip"].text_tower.model
        assert text_model.is_gradient_checkpointing is checkpointing
        torch.manual_seed(1)
        terms, _ = model.forward_terms(batch)
        sum(terms.values()).backward()
        results.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    plain, recomputed = results
    assert plain.keys() == recomputed.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(recomputed[name], grad, rtol=1e-5, atol=1e-6, msg=name)
