"""inst_disc (MoCo v3 / BYOL / Barlow Twins), dense_id (DenseCL) and sim_global (MSN): each
loss against the paper's formula written with loops, where gradients go, the queues, the
symmetrised directions, learning and no collapse on a fixed batch, the cross-rank logic in
two real processes, and a CLI run of the three together."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    TINY_HEADS,
    digits_module,
    feature_spread,
    tiny_backbone,
    tiny_objective,
)

from m3i_lightning import losses
from m3i_lightning.components.heads import GlobalBatchNorm1d
from m3i_lightning.components.optim import OptimConfig, build_optimizer
from m3i_lightning.core.errors import ConfigError
from m3i_lightning.engine.module import MultiObjective
from m3i_lightning.objectives import (
    OBJECTIVES,
    DenseContrast,
    InstanceDiscrimination,
    SiameseGlobal,
    Targets,
)

VARIANTS = ("moco", "byol", "barlow")

CASES = [("inst_disc", {"variant": v}) for v in VARIANTS] + [("dense_id", {}), ("sim_global", {})]
CASE_IDS = [f"inst_disc-{v}" for v in VARIANTS] + ["dense_id", "sim_global"]


def build(name: str, input_mode: str = "shared", **options) -> MultiObjective:
    torch.manual_seed(0)
    head = tiny_objective(name, None, **options)
    return MultiObjective(tiny_backbone(), {name: head}, input_mode=input_mode)


def momentum_heads(objective) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in objective.named_children() if n.startswith("momentum_")}


# --------------------------------------------------------------------------- the formulas

def softmax_list(scores: list[float]) -> list[float]:
    top = max(scores)
    exps = [math.exp(s - top) for s in scores]
    return [e / sum(exps) for e in exps]


def dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return sum(float(x) * float(y) for x, y in zip(a, b, strict=True))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return dot(a, b) / math.sqrt(dot(a, a) * dot(b, b))


def unit(*shape: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1)


def test_info_nce_is_moco_v3_two_tau_cross_entropy_with_diagonal_labels():
    torch.manual_seed(0)
    tau, offset = 0.2, 4
    query, keys = unit(4, 6), unit(8, 6)  # this rank's 4 queries, the global batch's 8 keys
    want = 0.0
    for i in range(4):
        logits = [dot(query[i], keys[j]) / tau for j in range(8)]
        want -= math.log(softmax_list(logits)[offset + i])
    want = 2 * tau * want / 4
    assert losses.info_nce(query, keys, tau, offset).item() == pytest.approx(want, rel=1e-9)


def test_info_nce_local_loss_over_simulated_ranks_equals_the_whole_batch():
    torch.manual_seed(0)
    query, keys = unit(8, 6).requires_grad_(), unit(8, 6)
    whole = losses.info_nce(query, keys)
    (grad_whole,) = torch.autograd.grad(whole, query)
    per_rank = [losses.info_nce(query[r * 4:(r + 1) * 4], keys, offset=r * 4) for r in range(2)]
    mean = torch.stack(per_rank).mean()
    (grad_mean,) = torch.autograd.grad(mean, query)
    torch.testing.assert_close(mean, whole)
    torch.testing.assert_close(grad_mean, grad_whole)


def test_queue_info_nce_is_one_positive_against_the_queue():
    torch.manual_seed(0)
    tau = 0.2
    query, key, queue = unit(3, 5), unit(3, 5), unit(7, 5)
    want = 0.0
    for i in range(3):
        logits = [dot(query[i], key[i]) / tau] + [dot(query[i], queue[k]) / tau for k in range(7)]
        want -= math.log(softmax_list(logits)[0])
    assert losses.queue_info_nce(query, key, queue, tau).item() == pytest.approx(want / 3)


def test_dense_info_nce_matches_each_location_by_backbone_similarity():
    torch.manual_seed(0)
    tau, b, n, m = 0.2, 2, 3, 4
    query, key, queue = unit(b, n, 5), unit(b, m, 5), unit(6, 5)
    query_feat = torch.randn(b, n, 7, dtype=torch.float64)
    key_feat = torch.randn(b, m, 7, dtype=torch.float64)
    want = 0.0
    for i in range(b):
        for loc in range(n):
            sims = [cosine(query_feat[i, loc], key_feat[i, j]) for j in range(m)]
            best = max(range(m), key=sims.__getitem__)
            logits = [dot(query[i, loc], key[i, best]) / tau]
            logits += [dot(query[i, loc], queue[k]) / tau for k in range(6)]
            want -= math.log(softmax_list(logits)[0])
    got = losses.dense_info_nce(query, key, query_feat, key_feat, queue, tau)
    assert got.item() == pytest.approx(want / (b * n))


def test_byol_loss_is_two_minus_two_cosine():
    torch.manual_seed(0)
    pred, target = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    want = sum(2 - 2 * cosine(pred[i], target[i]) for i in range(5)) / 5
    assert losses.byol_loss(pred, target).item() == pytest.approx(want)


def test_barlow_twins_loss_is_the_cross_correlation_formula():
    torch.manual_seed(0)
    lambd, batch, dim, eps = 5.1e-3, 6, 4, 1e-5
    z1 = torch.randn(batch, dim, dtype=torch.float64) * 3 + 1
    z2 = torch.randn(batch, dim, dtype=torch.float64) - 2

    def standardised(z):
        out = [[0.0] * dim for _ in range(batch)]
        for d in range(dim):
            column = [float(z[b, d]) for b in range(batch)]
            mean = sum(column) / batch
            var = sum((x - mean) ** 2 for x in column) / batch
            for b in range(batch):
                out[b][d] = (column[b] - mean) / math.sqrt(var + eps)
        return out

    a, b_ = standardised(z1), standardised(z2)
    c = [[sum(a[n][i] * b_[n][j] for n in range(batch)) / batch for j in range(dim)]
         for i in range(dim)]
    want = sum((1 - c[i][i]) ** 2 for i in range(dim))
    want += lambd * sum(c[i][j] ** 2 for i in range(dim) for j in range(dim) if i != j)
    assert losses.barlow_twins_loss(z1, z2, lambd).item() == pytest.approx(want)


def test_batch_standardize_is_the_reference_affine_free_batchnorm():
    torch.manual_seed(0)
    z = torch.randn(6, 4) * 2 + 3
    torch.testing.assert_close(losses.batch_standardize(z),
                               torch.nn.BatchNorm1d(4, affine=False).train()(z))


def test_msn_loss_is_sharpened_cross_entropy_plus_me_max():
    """MSN's own form: both sides at τ = 0.1, targets sharpened by the power 1/T, T = 0.25;
    the library's τ⁺ = 0.025 softmax must equal it."""
    torch.manual_seed(0)
    tau, sharpen, weight, batch, k = 0.1, 0.25, 1.0, 6, 5
    anchor, target = torch.randn(batch, 4, dtype=torch.float64), torch.randn(batch, 4,
                                                                              dtype=torch.float64)
    prototypes = torch.randn(k, 4, dtype=torch.float64)
    cross_entropy, mean_probs = 0.0, [0.0] * k
    for b in range(batch):
        p = softmax_list([cosine(anchor[b], prototypes[j]) / tau for j in range(k)])
        t = softmax_list([cosine(target[b], prototypes[j]) / tau for j in range(k)])
        t = [x ** (1 / sharpen) for x in t]
        t = [x / sum(t) for x in t]
        cross_entropy -= sum(t[j] * math.log(p[j]) for j in range(k)) / batch
        mean_probs = [mean_probs[j] + p[j] / batch for j in range(k)]
    me_max = sum(q * math.log(q) for q in mean_probs) + math.log(k)
    got = losses.msn_loss(anchor, target, prototypes, tau, tau * sharpen, weight)
    assert got.item() == pytest.approx(cross_entropy + weight * me_max)


def test_sinkhorn_rescales_rows_and_columns_to_a_balanced_assignment():
    torch.manual_seed(0)
    probs = F.softmax(torch.randn(6, 4, dtype=torch.float64) * 3, dim=-1)
    q = losses.sinkhorn(probs, iterations=200)
    torch.testing.assert_close(q.sum(1), torch.ones(6, dtype=torch.float64))
    torch.testing.assert_close(q.sum(0), torch.full((4,), 6 / 4, dtype=torch.float64))
    # only row and column scalings of the input: log(q / p) = a_b + c_k
    log_ratio = (q / probs).log()
    centred = (log_ratio - log_ratio.mean(0) - log_ratio.mean(1, keepdim=True)
               + log_ratio.mean())
    torch.testing.assert_close(centred, torch.zeros_like(centred))
    assert losses.sinkhorn(probs, iterations=3).sum(1).allclose(torch.ones(6, dtype=torch.float64))


# ------------------------------------------------------------------- gradients and buffers

@pytest.mark.parametrize(("name", "options"), CASES, ids=CASE_IDS)
def test_gradient_routing_and_momentum_heads_move_only_by_ema(name, options, batch):
    model = build(name, **options).train()
    objective = model.heads[name]
    terms, logs = model.forward_terms(batch)
    assert set(terms) == {name} and all(torch.isfinite(v) for v in logs.values())
    terms[name].backward()

    assert all(p.grad is not None for p in model.backbone.parameters())
    trainable = [(n, p) for n, p in objective.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for _, p in trainable), name
    frozen = momentum_heads(objective)
    for module in frozen.values():
        assert all(not p.requires_grad and p.grad is None for p in module.parameters())
    if model.teacher is not None:
        assert all(p.grad is None for p in model.teacher.parameters())

    optimizer = build_optimizer(model, OptimConfig(lr=1e-2, warmup_fraction=0.0), 10)
    optimizer = optimizer["optimizer"]
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    frozen_params = {f"{h}.{n}": p for h, m in frozen.items() for n, p in m.named_parameters()}
    assert not optimised & {id(p) for p in frozen_params.values()}
    before = {n: p.clone() for n, p in frozen_params.items()}
    optimizer.step()
    for n, p in frozen_params.items():
        assert torch.equal(p, before[n]), n

    momentum = 0.9
    if model.teacher is not None:
        model.teacher.momentum = momentum  # the cosine schedule's value at step 0
    model.update_teacher(0, 1)
    for head_name, module in frozen.items():
        source = getattr(objective, head_name.removeprefix("momentum_"))
        for (n, p), q in zip(module.named_parameters(), source.parameters(), strict=True):
            want = momentum * before[f"{head_name}.{n}"] + (1 - momentum) * q.detach()
            torch.testing.assert_close(p, want)


def test_registered_under_their_config_names():
    assert OBJECTIVES["inst_disc"] is InstanceDiscrimination
    assert OBJECTIVES["dense_id"] is DenseContrast
    assert OBJECTIVES["sim_global"] is SiameseGlobal
    assert {v: c.__name__ for v, c in InstanceDiscrimination.variants.items()} == {
        "moco": "MoCoV3", "byol": "BYOL", "barlow": "BarlowTwins"}


def test_each_variant_declares_its_encoder_passes():
    moco, byol, barlow = (tiny_objective("inst_disc", None, variant=v)
                          for v in VARIANTS)
    assert moco.uses_teacher and moco.symmetric and not moco.student_target
    assert byol.uses_teacher and byol.symmetric and not byol.student_target
    assert not barlow.uses_teacher and not barlow.symmetric and barlow.student_target
    assert not hasattr(barlow, "predictor") and not momentum_heads(barlow)
    assert InstanceDiscrimination.symmetric is False  # class default stays the engine's
    with pytest.raises(ConfigError, match="variant 'simclr'.*barlow"):
        tiny_objective("inst_disc", None, variant="simclr")


@pytest.mark.parametrize("input_mode", ["shared", "native"])
def test_barlow_encodes_its_target_view_with_the_student_and_no_teacher(input_mode, batch):
    model = build("inst_disc", input_mode, variant="barlow")
    assert model.teacher is None
    target_view = model.plan.objectives["inst_disc"].readings[0].target_view
    assert model.plan.student_views == (target_view,)
    readings = model.readings(batch)["inst_disc"]
    assert len(readings) == 1
    _, encoded, targets = readings[0]
    assert targets.teacher is None and targets.student.global_feature.requires_grad
    loss, _ = model.heads["inst_disc"].loss(*readings[0])
    grad_target, grad_input = torch.autograd.grad(
        loss, [targets.student.global_feature, encoded.global_feature])
    # both sides are trained: every row's gradient is of order 10, far above rounding noise
    assert (grad_target.norm(dim=-1) > 1e-2).all() and (grad_input.norm(dim=-1) > 1e-2).all()


@pytest.mark.parametrize("variant", ["moco", "byol"])
def test_native_mode_sums_both_view_orders_shared_mode_keeps_one(variant, batch):
    model = build("inst_disc", "native", variant=variant).train()
    objective = model.heads["inst_disc"]
    assert model.plan.teacher_views == ("view1", "view2")
    terms, _ = model.forward_terms(batch)
    enc = {v: model.backbone(batch[v]) for v in ("view1", "view2")}
    teacher = {v: model.teacher(batch[v]) for v in ("view1", "view2")}
    want = sum(objective.loss(batch, enc[a], Targets(a, b, batch[b], teacher[b]))[0]
               for a, b in (("view2", "view1"), ("view1", "view2")))
    torch.testing.assert_close(terms["inst_disc"], want)

    shared = build("inst_disc", "shared", variant=variant)
    assert len(shared.plan.objectives["inst_disc"].readings) == 1
    assert len(shared.readings(batch)["inst_disc"]) == 1


def test_dense_queues_are_buffers_filled_with_the_keys_after_the_loss(batch):
    model = build("dense_id", "native").train()
    objective: DenseContrast = model.heads["dense_id"]
    buffers = dict(objective.named_buffers())
    assert {"queue", "dense_queue", "queue_ptr"} <= set(buffers)
    assert not {"queue", "dense_queue"} & {n for n, _ in objective.named_parameters()}
    assert {"queue", "dense_queue", "queue_ptr"} <= set(objective.state_dict())

    before = objective.queue.clone()
    model.eval()
    model.forward_terms(batch)
    assert torch.equal(objective.queue, before) and objective.queue_ptr == 0  # eval: no enqueue

    model.train()
    model.forward_terms(batch)
    size = batch["view1"].shape[0]
    teacher = model.teacher(batch["view1"])
    with torch.no_grad():
        key = F.normalize(objective.momentum_global_head(teacher.global_feature), dim=-1)
        pooled = F.normalize(objective.momentum_dense_head(teacher.tokens).mean(1), dim=-1)
    assert objective.queue_ptr == size
    torch.testing.assert_close(objective.queue[:size], key)
    torch.testing.assert_close(objective.dense_queue[:size], pooled)
    assert torch.equal(objective.queue[size:], before[size:])

    # the ring wraps: 32 slots, 8 taken, 30 more keys fill 8..31 then 0..5
    keys = F.normalize(torch.randn(30, objective.queue.shape[1]), dim=-1)
    objective._enqueue(keys, keys)
    assert objective.queue_ptr == 6
    torch.testing.assert_close(objective.queue[8:], keys[:24])
    torch.testing.assert_close(objective.queue[:6], keys[24:])


# --------------------------------------------------------------------- learning, collapse

def fit(model: MultiObjective, batch: dict, steps: int, lr: float = 2e-3,
        queues: dict[str, torch.Tensor] | None = None) -> list[dict]:
    """Plain-torch training on one batch, the teacher and heads following by the engine's
    :meth:`update_teacher`;
    ``queues``: contents to reset the negative queues to before every step."""
    optimizer = build_optimizer(model, OptimConfig(lr=lr, warmup_fraction=0.0,
                                                   weight_decay=0.0), steps)["optimizer"]
    model.train()
    history = []
    for step in range(steps):
        load_buffers(model, queues or {})
        terms, logs = model.forward_terms(batch)
        total = torch.stack(list(terms.values())).sum()
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        model.update_teacher(step, steps)
        history.append({"loss": total.item(), **{k: v.item() for k, v in logs.items()}})
    return history


def load_buffers(model: MultiObjective, buffers: dict[str, torch.Tensor]) -> None:
    for name, value in buffers.items():
        model.get_buffer(name).copy_(value)


def measured_loss(model: MultiObjective, batch: dict, queues: dict[str, torch.Tensor]) -> float:
    torch.manual_seed(123)  # the same mask every time
    load_buffers(model, queues)
    with torch.no_grad():
        return torch.stack(list(model.forward_terms(batch)[0].values())).sum().item()


@pytest.mark.parametrize(("name", "options"), CASES, ids=CASE_IDS)
def test_each_objective_lowers_its_loss_on_a_fixed_batch(name, options, batch, tokenizer):
    """DenseCL's negatives are the keys of 32 other images, kept fixed: trained on one batch,
    its queue would otherwise fill with copies of the batch's own keys, its positives."""
    model = build(name, "native", **options).train()
    torch.manual_seed(1)
    others = next(iter(digits_module(tokenizer, batch_size=32).train_dataloader()))
    with torch.no_grad():
        model.forward_terms(others)
    queues = {n: b.clone() for n, b in model.named_buffers() if "queue" in n}
    start = measured_loss(model, batch, queues)
    fit(model, batch, steps=30, queues=queues)
    end = measured_loss(model, batch, queues)
    assert end < 0.9 * start, (start, end)


@pytest.mark.parametrize(("name", "options"), [("inst_disc", {"variant": "byol"}),
                                               ("sim_global", {})], ids=["byol", "msn"])
def test_no_collapse_over_a_short_run(name, options, batch):
    """Collapse drives the head's spread, the encoder's feature spread and the number of MSN
    prototypes in use to 0, 0 and 1. Bars set well below the lowest of ten seeds of the weights
    (head spread ≥ 0.37 of its start and ≥ 0.33/sqrt(dim), feature spread ≥ 0.66 of its start
    and ≥ 0.066, prototypes used ≥ 4), so float rounding cannot tip them."""
    model = build(name, "native", **options)
    features_start = feature_spread(model.backbone, batch["view1"])
    history = fit(model, batch, steps=40, lr=5e-3)
    start, end = history[0][f"{name}/std"], history[-1][f"{name}/std"]
    # spread over the sphere, a head's std is about 1/sqrt(dim)
    assert end > 0.2 * start and end > 0.15 / math.sqrt(TINY_HEADS[name]["out_dim"]), (start, end)
    features_end = feature_spread(model.backbone, batch["view1"])
    assert features_end > 0.4 * features_start and features_end > 0.03
    if name == "sim_global":
        assert history[-1]["sim_global/prototypes_used"] >= 2


# -------------------------------------------------------------------- two real processes


def test_global_batchnorm_is_batchnorm_in_one_process():
    torch.manual_seed(0)
    x = torch.randn(6, 4)
    ours, plain = GlobalBatchNorm1d(4), torch.nn.BatchNorm1d(4)
    torch.testing.assert_close(ours(x), plain(x))
    torch.testing.assert_close(ours.running_var, plain.running_var)


# ------------------------------------------------------------------------------- the CLI

