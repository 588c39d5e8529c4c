"""Weighting strategies against their papers' formulas, written out here: Kendall et al.'s
uncertainty weighting (CVPR 2018) and Yu et al.'s PCGrad (NeurIPS 2020, Algorithm 1), and
their place in the engine's step."""

from __future__ import annotations

import pytest
import torch
from helpers import compose_config, tiny_multi

from m3i_lightning.config.factory import build_model
from m3i_lightning.core.errors import ConfigError
from m3i_lightning.engine.weighting import Uncertainty, build_weighting, pcgrad


def test_uncertainty_is_kendalls_loss_per_distribution_form():
    """Gaussian: 1/(2σ²)·L + log σ; Boltzmann (softmax): 1/σ²·L + log σ, with s = log σ²."""
    weighting = Uncertainty({"mim_feat": "Gaussian", "cls": "Boltzmann"})
    with torch.no_grad():
        weighting.log_variance.copy_(torch.tensor([0.7, -0.4]))
    terms = {"mim_feat": torch.tensor(2.5), "cls": torch.tensor(1.3)}
    optimised, own = weighting(terms)
    sigma2 = torch.tensor([0.7, -0.4]).exp()
    expected = {"mim_feat": 2.5 / (2 * sigma2[0]), "cls": 1.3 / sigma2[1]}
    for name, value in expected.items():
        assert optimised[name].item() == pytest.approx(value.item())
    log_sigma = 0.5 * sigma2.log()
    total = sum(optimised.values()) + own
    assert total.item() == pytest.approx(sum(expected.values()).item() + log_sigma.sum().item())
    logs = weighting.logs()
    assert logs["weight/cls"].item() == pytest.approx(1 / sigma2[1].item())


def test_uncertainty_learns_toward_the_loss_it_weights():
    """The optimum of 1/(2σ²)·L + ½·log σ² is σ² = L: gradient descent on s gets there."""
    weighting = Uncertainty({"a": "Gaussian"})
    optimiser = torch.optim.SGD(weighting.parameters(), lr=0.5)
    for _ in range(200):
        optimised, own = weighting({"a": torch.tensor(4.0)})
        loss = optimised["a"] + own
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    # ½·exp(−s)·L + ½·s has its minimum at exp(s) = L
    assert weighting.log_variance.exp().item() == pytest.approx(4.0, rel=1e-3)


def test_pcgrad_of_two_conflicting_gradients_is_the_papers_projection():
    g1, g2 = torch.tensor([1.0, 2.0, 0.0]), torch.tensor([-2.0, 0.5, 1.0])
    assert g1 @ g2 < 0
    p1 = g1 - (g1 @ g2) / (g2 @ g2) * g2
    p2 = g2 - (g2 @ g1) / (g1 @ g1) * g1
    combined = pcgrad(torch.stack([g1, g2]), torch.Generator().manual_seed(0))
    torch.testing.assert_close(combined, p1 + p2)
    assert (p1 @ g2).abs() < 1e-6 and (p2 @ g1).abs() < 1e-6  # each lies on the other's plane


def test_pcgrad_leaves_agreeing_gradients_as_they_are():
    g = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    combined = pcgrad(g, torch.Generator().manual_seed(0))
    torch.testing.assert_close(combined, g.sum(dim=0))


def test_pcgrad_projects_onto_the_original_gradients_in_a_drawn_order():
    """Three gradients, g1 conflicting with both others: its projection depends on the order
    (Algorithm 1 projects the running g1 onto each original g_j); the result is one of the two
    orders written out here, and the same generator gives the same one."""
    g = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 1.0, 0.0], [-1.0, 0.0, 1.0]])

    def project(v, onto):
        dot = v @ onto
        return v - dot / (onto @ onto) * onto if dot < 0 else v

    def by_hand(order_of_1):
        first = project(project(g[0], g[order_of_1[0]]), g[order_of_1[1]])
        second = project(project(g[1], g[0]), g[2])  # g2 · g3 > 0: only g1 acts
        third = project(project(g[2], g[0]), g[1])
        return first + second + third

    candidates = [by_hand((1, 2)), by_hand((2, 1))]
    assert not torch.allclose(*candidates)
    results = [pcgrad(g, torch.Generator().manual_seed(seed)) for seed in range(8)]
    for result in results:
        assert any(torch.allclose(result, c) for c in candidates)
    assert any(torch.allclose(r, candidates[0]) for r in results)
    assert any(torch.allclose(r, candidates[1]) for r in results)
    torch.testing.assert_close(pcgrad(g, torch.Generator().manual_seed(5)), results[5])


def test_pcgrad_backward_writes_the_projection_of_the_terms_gradients(tokenizer, batch):
    """The engine's backward under weighting=pcgrad: the encoder's gradient is PCGrad of the
    terms' encoder gradients (drawn with the step's generator), every head's is its plain
    gradient."""
    model = tiny_multi(tokenizer, ["mim_feat", "clip", "cls"], weighting="pcgrad").double()
    batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    encoder = [p for p in model.backbone.parameters() if p.requires_grad]
    heads = [p for p in model.heads.parameters() if p.requires_grad]
    torch.manual_seed(0)
    terms = model.interplay_terms(batch)
    flat = []
    for term in terms.values():
        grads = torch.autograd.grad(term, encoder, retain_graph=True, allow_unused=True)
        flat.append(torch.cat([torch.zeros_like(p).flatten() if g is None else g.flatten()
                               for p, g in zip(encoder, grads, strict=True)]))
    expected = pcgrad(torch.stack(flat), torch.Generator().manual_seed(0))
    plain_heads = torch.autograd.grad(sum(terms.values()), heads, allow_unused=True)

    torch.manual_seed(0)
    loss = model.training_step(batch, 0)
    model.backward(loss)
    torch.testing.assert_close(torch.cat([p.grad.flatten() for p in encoder]), expected)
    for p, g in zip(heads, plain_heads, strict=True):
        if g is not None:
            torch.testing.assert_close(p.grad, g)
    assert not torch.allclose(expected, torch.stack(flat).sum(dim=0))  # something projected


def test_weighting_from_the_config_and_its_errors():
    cfg = compose_config("objective=[mim_feat,cls]", "weighting=uncertainty")
    model = build_model(cfg, 10, None)
    assert model.weighting.names == ("mim_feat", "cls")
    assert model.weighting.factors == (0.5, 1.0)
    assert "weighting.log_variance" in model.state_dict()
    fixed = build_model(compose_config("objective=[mim_feat,cls]"), 10, None)
    assert not [k for k in fixed.state_dict() if k.startswith("weighting")]
    with pytest.raises(ConfigError, match=r"unknown weighting=gradvac; choose one of "):
        build_model(compose_config("objective=[cls]", "weighting=gradvac"), 10, None)
    with pytest.raises(ConfigError, match="weighting=uncertainty needs each objective's form"):
        build_weighting("uncertainty", {"mine": None})


def test_pcgrad_refuses_fsdp2_in_one_line(tokenizer):
    model = tiny_multi(tokenizer, ["cls"], weighting="pcgrad")
    model._device_mesh = {"data_parallel": object()}  # what ModelParallelStrategy sets
    with pytest.raises(ConfigError, match="weighting=pcgrad combines whole gradients of the "
                                          "shared encoder, which FSDP2 shards: use strategy=ddp"):
        model.configure_model()
