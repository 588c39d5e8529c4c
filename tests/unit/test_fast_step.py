"""What makes an accelerator step fast without changing its result: fused attention in every
transformer, fused AdamW on CUDA, and float32 losses under bfloat16 autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_VIT, tiny_backbone, tiny_objective

from m3i_lightning.components.optim import OptimConfig, build_optimizer, fused_on
from m3i_lightning.components.predictor import TokenPredictor
from m3i_lightning.components.text import TextTower
from m3i_lightning.engine.module import MultiObjective


@pytest.fixture
def sdpa_calls(monkeypatch) -> list[int]:
    """Counts the calls of ``F.scaled_dot_product_attention`` (timm and transformers look it
    up on the module at each call)."""
    calls: list[int] = []
    fused = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return fused(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    return calls


def test_every_attention_layer_runs_torch_sdpa(sdpa_calls, tokenizer):
    """The backbone, the predictor and the text tower each call SDPA once per block, so none
    falls back to an explicit softmax(QKᵀ)V."""
    tiny_backbone()(torch.randn(2, 3, 16, 16))
    assert len(sdpa_calls) == TINY_VIT["depth"]
    sdpa_calls.clear()
    TokenPredictor(32, 8, (4, 4), dim=32, depth=3, num_heads=2)(
        torch.randn(2, 16, 32), None, torch.randn(2, 5, 32))
    assert len(sdpa_calls) == 3
    sdpa_calls.clear()
    tokens = tokenizer(["a seven", "a two"])
    TextTower(tokenizer, 32, 32, layers=2, heads=2)(tokens["input_ids"],
                                                    tokens["attention_mask"])
    assert len(sdpa_calls) == 2


def test_adamw_is_fused_exactly_when_every_parameter_is_on_cuda():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert fused_on([cuda, cuda]) and not fused_on([cuda, cpu]) and not fused_on([])
    optimizer = build_optimizer(torch.nn.Linear(4, 4), OptimConfig(), 10)["optimizer"]
    assert isinstance(optimizer, torch.optim.AdamW) and not optimizer.defaults["fused"]


def test_loss_terms_are_float32_under_bf16_autocast(tokenizer, batch):
    """The composed step under CPU bfloat16 autocast: every loss term comes out float32
    (SiameseIM's UniGrad term with its correlation included)."""
    torch.manual_seed(0)
    names = ["mim_feat", "clip", "cls", "sim_feat"]
    objectives = {n: tiny_objective(n, tokenizer) for n in names}
    model = MultiObjective(tiny_backbone(), objectives)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms, _ = model.forward_terms(batch)
    assert {name: term.dtype for name, term in terms.items()} == dict.fromkeys(
        names, torch.float32)
