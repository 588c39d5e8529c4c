"""Multi-crop (DINO, MSN): local crops from the data, one encoder pass per crop size, DINO's
cross-view pairing and loss against its formula written out here, MSN's focal views, and the
schedules of the DINO recipe."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import digits_module, tiny_backbone, tiny_objective

from m3i_lightning.components.optim import OptimConfig, build_optimizer, follow_weight_decay
from m3i_lightning.engine.module import MultiObjective
from m3i_lightning.engine.plan import Input, Reading

LOCAL = dict(count=2, size=8, scale=(0.05, 0.4))
DINO_TINY = dict(out_dim=16, hidden_dim=16, bottleneck_dim=8)
MSN_TINY = dict(hidden_dim=16, out_dim=8, num_prototypes=8)


@pytest.fixture
def crops_batch(tokenizer) -> dict:
    torch.manual_seed(0)
    dm = digits_module(tokenizer, local_crops=LOCAL)
    return next(iter(dm.train_dataloader()))


def dino_model(**options) -> MultiObjective:
    torch.manual_seed(0)
    head = tiny_objective("global_distill", None, **{**DINO_TINY, **options})
    return MultiObjective(tiny_backbone(dynamic_img_size=True), {"global_distill": head},
                          input_mode="native", local_crops=LOCAL["count"])


def test_the_data_gives_local_crops_of_their_own_size(crops_batch):
    assert crops_batch["view1"].shape[-2:] == (16, 16)
    for name in ("local1", "local2"):
        assert crops_batch[name].shape[-2:] == (8, 8)
        height, width = crops_batch[f"{name}_geometry"][:, 2:4].unbind(-1)
        assert ((height * width) <= LOCAL["scale"][1] + 0.05).all()  # crop areas, rounding


def test_dino_pairs_every_student_crop_with_every_other_teacher_view():
    model = dino_model(multi_crop=True)
    readings = model.plan.objectives["global_distill"].readings
    pairs = {(r.input.view, r.target_view) for r in readings}
    crops = ("view1", "view2", "local1", "local2")
    assert pairs == {(s, t) for s in crops for t in ("view1", "view2") if s != t}
    assert model.plan.teacher_views == ("view1", "view2")
    # the table's intra-view row stays the default
    intra = dino_model().plan.objectives["global_distill"].readings
    assert intra == (Reading(Input("view1", False), "view1"),)


def test_one_encoder_pass_per_crop_size(crops_batch):
    model = dino_model(multi_crop=True)
    student, teacher = [], []
    model.backbone.register_forward_pre_hook(lambda m, args: student.append(args[0].shape))
    model.teacher.encoder.register_forward_pre_hook(lambda m, args: teacher.append(args[0].shape))
    model.forward_terms(crops_batch)
    batch = crops_batch["view1"].shape[0]
    assert sorted(student) == sorted([(2 * batch, 3, 16, 16), (2 * batch, 3, 8, 8)])
    assert teacher == [(2 * batch, 3, 16, 16)]


def test_dino_multi_crop_loss_equals_the_reference_formula(crops_batch):
    """DINO's loss written out: for each teacher global view t and student crop s ≠ t,
    −Σ_k softmax((g_t − c)/τ_t)_k log softmax(g_s/τ_s)_k, averaged over samples and pairs; the
    centre then moves once, towards the mean teacher score of both global views."""
    model = dino_model(multi_crop=True).train()
    dino = model.heads["global_distill"]
    with torch.no_grad():
        dino.center.normal_()
    center = dino.center.clone()
    with torch.no_grad():
        student = {v: dino.head(model.backbone(crops_batch[v]).global_feature)
                   for v in ("view1", "view2", "local1", "local2")}
        teacher = {v: dino.momentum_head(model.teacher(crops_batch[v]).global_feature)
                   for v in ("view1", "view2")}
    total, pairs = 0.0, 0
    for t, scores in teacher.items():
        q = torch.softmax((scores - center) / dino.teacher_temp, dim=-1)
        for s, logits in student.items():
            if s == t:
                continue
            total += -(q * torch.log_softmax(logits / dino.student_temp, dim=-1)).sum(-1).mean()
            pairs += 1
    terms, _ = model.forward_terms(crops_batch)
    torch.testing.assert_close(terms["global_distill"], total / pairs)
    batch_center = torch.cat(list(teacher.values())).mean(0)
    torch.testing.assert_close(dino.center, 0.9 * center + 0.1 * batch_center)


def test_dino_schedules_teacher_temperature_and_frozen_prototypes(crops_batch):
    dino = tiny_objective("global_distill", None, **DINO_TINY, teacher_temp=0.07,
                          warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=30,
                          freeze_last_layer=1)
    for epoch, temperature in ((0, 0.04), (15, 0.055), (30, 0.07), (100, 0.07)):
        dino.follow_schedule(epoch)
        assert dino.teacher_temp == pytest.approx(temperature)
    dino.head.prototypes.weight.grad = torch.ones_like(dino.head.prototypes.weight)
    dino.adjust_gradients(1)
    assert dino.head.prototypes.weight.grad is not None
    dino.adjust_gradients(0)
    assert dino.head.prototypes.weight.grad is None


def test_weight_decay_follows_a_cosine_to_its_final_value():
    layer = torch.nn.Linear(4, 4)
    config = OptimConfig(weight_decay=0.04, final_weight_decay=0.4)
    optimizer = build_optimizer(layer, config, 100)["optimizer"]
    for step, want in ((0, 0.04), (50, 0.22), (100, 0.4)):
        follow_weight_decay(optimizer, config, step, 100)
        decayed, plain = optimizer.param_groups
        assert decayed["weight_decay"] == pytest.approx(want) and plain["weight_decay"] == 0.0


def test_msn_scores_its_focal_views_as_anchors_of_the_same_target(crops_batch):
    from m3i_lightning.components.losses import msn_loss

    torch.manual_seed(0)
    msn = tiny_objective("sim_global", None, **MSN_TINY)
    model = MultiObjective(tiny_backbone(dynamic_img_size=True), {"sim_global": msn},
                           input_mode="native", local_crops=LOCAL["count"], mask_ratio=0.5)
    readings = model.plan.objectives["sim_global"].readings
    assert [(r.input, r.target_view) for r in readings] == [
        (Input(v, True), "view1") for v in ("view2", "local1", "local2")]
    got = model.readings(crops_batch)["sim_global"]
    assert [encoded.visible_index.shape[1] for _, encoded, _ in got] == [8, 2, 2]
    anchors = torch.cat([msn.projector(e.global_feature) for _, e, _ in got])
    with torch.no_grad():
        targets = torch.cat([msn.momentum_projector(t.teacher.global_feature) for *_, t in got])
    want = msn_loss(anchors, targets, msn.prototypes, msn.anchor_temperature,
                    msn.target_temperature, msn.me_max_weight, msn.sinkhorn_iterations)
    torch.testing.assert_close(msn.term(got, "mean")[0], want)
    model._trainer = SimpleNamespace(estimated_stepping_batches=10, max_epochs=None,
                                     datamodule=None)
    decayed, plain = model.configure_optimizers()["optimizer"].param_groups
    assert any(p is msn.prototypes for p in plain["params"]) and plain["weight_decay"] == 0.0
    assert not any(p is msn.prototypes for p in decayed["params"])
