"""The foundation objectives cls, clip and mim_feat: where gradients go, that a few steps on a
fixed batch lower each loss, and that each trains on its own through Lightning."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import digits_module, tiny_backbone, tiny_objective

from m3i_lightning.backbone import Backbone
from m3i_lightning.engine import MultiObjective
from m3i_lightning.errors import ConfigError
from m3i_lightning.objectives import CLIP, Classification, MaskedFeature
from m3i_lightning.optim import OptimConfig, build_optimizer
from m3i_lightning.teacher import cosine_momentum

NAMES = ["cls", "clip", "mim_feat"]
SELECTIONS = [[name] for name in NAMES] + [NAMES]


def multi(names, tokenizer, **engine) -> MultiObjective:
    torch.manual_seed(0)
    heads = {name: tiny_objective(name, tokenizer) for name in names}
    return MultiObjective(tiny_backbone(), heads, **engine)


def grad_norm(module: torch.nn.Module) -> torch.Tensor:
    return torch.stack([p.grad.norm() for p in module.parameters()]).norm()


def test_objective_classes_are_registered_under_their_names():
    assert (Classification.name, CLIP.name, MaskedFeature.name) == tuple(NAMES)


@pytest.mark.parametrize("names", SELECTIONS, ids="+".join)
def test_gradient_routing_and_ema_only_teacher(names, tokenizer, batch):
    model = multi(names, tokenizer)
    model.train()
    terms, _ = model.forward_terms(batch)
    assert set(terms) == set(names)
    torch.stack(list(terms.values())).sum().backward()

    # the student and every head get gradients
    for pname, p in model.backbone.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    # norms of order 0.1 or more (measured 0.1 to 70): far above rounding noise, not just "> 0"
    assert grad_norm(model.backbone) > 1e-2
    for name in names:
        for pname, p in model.heads[name].named_parameters():
            assert p.grad is not None, f"{name}.{pname}"
        assert grad_norm(model.heads[name]) > 1e-2, name
    if "clip" in names:
        clip = model.heads["clip"]
        assert clip.logit_scale.grad is not None and clip.logit_scale.grad.abs() > 1e-3
        assert all(p.grad is not None for p in clip.text_tower.parameters())
    if "mim_feat" in names:
        assert all(p.grad is not None for p in model.heads["mim_feat"].predictor.parameters())

    if "mim_feat" not in names:
        assert model.teacher is None
        return

    # the teacher gets none, is not optimised, and moves only by the EMA
    teacher = model.teacher
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2, warmup_fraction=0.0), 10)["optimizer"]
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in teacher.parameters()}
    assert {id(p) for p in model.backbone.parameters()} <= optimised

    teacher_before = {k: v.clone() for k, v in teacher.encoder.named_parameters()}
    student_before = {k: v.clone() for k, v in model.backbone.named_parameters()}
    optimizer.step()
    for k, v in teacher.encoder.named_parameters():
        torch.testing.assert_close(v, teacher_before[k], rtol=0, atol=0)
    assert any(not torch.equal(v, student_before[k])
               for k, v in model.backbone.named_parameters())

    step, total = 2, 10
    momentum = teacher.update(model.backbone, step, total)
    assert momentum == pytest.approx(cosine_momentum(step, total, 0.996, 1.0))
    student = dict(model.backbone.named_parameters())
    moved = 0
    for k, v in teacher.encoder.named_parameters():
        want = momentum * teacher_before[k] + (1 - momentum) * student[k].detach()
        torch.testing.assert_close(v, want)
        moved += not torch.equal(v, teacher_before[k])
    assert moved > 0


def eval_loss(model: MultiObjective, batch: dict) -> dict[str, float]:
    """Loss terms with a fixed mask draw, so before / after are measured on the same task."""
    torch.manual_seed(1234)
    with torch.no_grad():
        terms, _ = model.forward_terms(batch)
    return {k: v.item() for k, v in terms.items()}


@pytest.mark.parametrize("name", NAMES)
def test_short_fit_on_a_fixed_batch_lowers_the_loss(name, tokenizer, batch):
    model = multi([name], tokenizer)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    before = eval_loss(model, batch)[name]
    # 60 steps: after 30, clip's loss falls to 0.75-0.87 of its start depending on the seed of
    # the weights; after 60 every objective is below 0.6 whatever the seed
    for step in range(60):
        optimizer.zero_grad()
        terms, _ = model.forward_terms(batch)
        loss = terms[name]
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        model.update_teacher(step, 60)
    after = eval_loss(model, batch)[name]
    assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize("name", NAMES)
def test_each_objective_trains_alone_through_lightning(name, tokenizer):
    torch.manual_seed(0)
    objective = tiny_objective(name, tokenizer, backbone=tiny_backbone())
    assert objective.backbone is not None
    initial = {k: v.clone() for k, v in objective.backbone.state_dict().items()}
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(objective, datamodule=digits_module(tokenizer))
    assert trainer.global_step == 3
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"])
    torch.testing.assert_close(metrics["train/loss"], metrics[f"train/loss/{name}"])
    changed = [k for k, v in objective.backbone.state_dict().items()
               if not torch.equal(v, initial[k])]
    assert changed
    if name == "mim_feat":
        # the EMA teacher followed the student, but only part of the way
        teacher = objective.teacher.encoder.state_dict()
        student = objective.backbone.state_dict()
        key = "model.patch_embed.proj.weight"
        assert not torch.equal(teacher[key], initial[key])
        assert not torch.allclose(teacher[key], student[key])
    else:
        assert objective.teacher is None


# --- data2vec's targets: the average of the teacher's last K blocks --------------------------


def ref_data2vec_target(vit, images: torch.Tensor, k: int) -> torch.Tensor:
    """data2vec vision (fairseq ``end_of_block_targets``, ``layer_norm_targets``): the timm ViT
    run block by block by hand, the patch tokens each of its last k blocks outputs (after the
    residual, before the final norm) averaged, then standardised per token over the channels."""
    x = vit._pos_embed(vit.patch_embed(images))
    outputs = []
    for block in vit.blocks:
        x = block(x)
        outputs.append(x[:, vit.num_prefix_tokens:])
    mean = sum(outputs[-k:]) / k
    centred = mean - mean.mean(dim=-1, keepdim=True)
    return centred / (centred.pow(2).mean(dim=-1, keepdim=True) + 1e-5).sqrt()


@pytest.mark.parametrize("k", [1, 2])
def test_data2vec_target_averages_the_teachers_last_blocks_in_one_pass(k, tokenizer, batch):
    torch.manual_seed(0)
    objective = tiny_objective("mim_feat", tokenizer, backbone=tiny_backbone(depth=3),
                               target_blocks=k, loss="smooth_l1", beta=2.0)
    teacher = objective.teacher.encoder
    with torch.no_grad():  # a teacher unlike its student, so the test tells them apart
        for p in teacher.parameters():
            p.add_(0.1 * torch.randn_like(p))
    passes = []
    teacher.model.blocks[0].register_forward_hook(lambda *_: passes.append(1))
    readings = objective.readings(batch)["mim_feat"]
    assert len(passes) == 1
    reading_batch, encoded, targets = readings[0]
    loss, _ = objective.loss(reading_batch, encoded, targets)

    with torch.no_grad():
        target = ref_data2vec_target(teacher.model, batch["view1"], k)
    hidden = encoded.masked_index
    target = target.gather(1, hidden[..., None].expand(-1, -1, target.shape[-1]))
    pred = objective.predictor(encoded.tokens, encoded.visible_index,
                               objective.predictor.position(hidden))
    error = (pred - target).abs()
    huber = torch.where(error < 2.0, 0.5 * error**2 / 2.0, error - 1.0).mean()
    torch.testing.assert_close(loss, huber, rtol=1e-4, atol=1e-5)
    # the target is not the teacher's output token: the final norm is left out
    final = torch.nn.functional.layer_norm(targets.teacher.tokens, (32,))
    assert not torch.allclose(final.gather(1, hidden[..., None].expand(-1, -1, 32)), target,
                              atol=1e-2)


def test_data2vec_linear_head_reads_the_mask_token_encoding_at_the_masked_cells(tokenizer,
                                                                              batch):
    """data2vec's student: the masked cells encoded as the mask token with the rest, one
    linear layer on the outputs there; the token is trained, the EMA teacher never reads it."""
    torch.manual_seed(0)
    objective = tiny_objective("mim_feat", tokenizer, target_blocks=2, loss="smooth_l1",
                               beta=2.0, predictor="linear",
                               backbone=tiny_backbone(depth=3, mask_token=True))
    student, teacher = objective.backbone, objective.teacher.encoder
    reading_batch, encoded, targets = objective.readings(batch)["mim_feat"][0]
    loss, _ = objective.loss(reading_batch, encoded, targets)

    x, hidden, m = batch["view1"], encoded.masked_index, student.model
    cells = torch.zeros(x.shape[0], 16, 1, dtype=torch.bool).scatter_(1, hidden[..., None], True)
    patches = torch.where(cells, student.mask_token, m.patch_embed(x)) + m.pos_embed[:, 1:]
    cls = (m.cls_token + m.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    outputs = m.norm(m.blocks(torch.cat([cls, patches], dim=1)))[:, 1:]
    at_masked = outputs.gather(1, hidden[..., None].expand(-1, -1, 32))
    pred = at_masked @ objective.predictor.weight.T + objective.predictor.bias
    with torch.no_grad():
        target = ref_data2vec_target(teacher.model, x, 2)
    target = target.gather(1, hidden[..., None].expand(-1, -1, 32))
    error = (pred - target).abs()
    huber = torch.where(error < 2.0, 0.5 * error**2 / 2.0, error - 1.0).mean()
    torch.testing.assert_close(loss, huber, rtol=1e-4, atol=1e-5)

    loss.backward()
    # the token's gradient is of order 1e-2 and more, far above float32 rounding
    assert student.mask_token.grad.norm() > 1e-4 * m.patch_embed.proj.weight.grad.norm()
    assert student.mask_token.grad.norm() > 1e-4
    assert teacher.mask_token.grad is None and not teacher.mask_token.requires_grad
    with torch.no_grad():  # the teacher encodes the full view: its token changes nothing
        before = objective.teacher(x).tokens
        teacher.mask_token.add_(1.0)
        assert torch.equal(objective.teacher(x).tokens, before)


def test_data2vec_linear_head_needs_its_own_mask_token_encoding(tokenizer):
    with pytest.raises(ConfigError, match="drops the masked patches: set backbone.mask_token"):
        tiny_objective("mim_feat", tokenizer, backbone=tiny_backbone(), predictor="linear")
    head = tiny_objective("mim_feat", tokenizer, predictor="linear")
    with pytest.raises(ConfigError, match="where mix=true encodes the partner image's"):
        MultiObjective(tiny_backbone(mask_token=True), {"mim_feat": head}, input_mode="shared",
                       mix=True)
    with pytest.raises(ConfigError, match="predictor=mlp must be one of"):
        tiny_objective("mim_feat", tokenizer, predictor="mlp")


def test_data2vec_targets_beyond_the_teachers_depth_or_family_are_refused(tokenizer):
    with pytest.raises(ConfigError, match="has 2: choose target_blocks <= 2"):
        tiny_objective("mim_feat", tokenizer, backbone=tiny_backbone(), target_blocks=3)
    with pytest.raises(ValueError, match="has 2 blocks; 3 top blocks asked for"):
        tiny_backbone()(torch.zeros(1, 3, 16, 16), top_blocks=3)
    with pytest.raises(ConfigError, match="target_blocks=-1 must be an integer >= 0"):
        tiny_objective("mim_feat", tokenizer, target_blocks=-1)
    convnext = Backbone("convnext_atto", img_size=32, patch_size=4, output_stride=8,
                        depths=(1, 1, 1, 1), dims=(16, 16, 24, 32))
    with pytest.raises(ConfigError, match="convnext teacher does not give"):
        tiny_objective("mim_feat", tokenizer, target_blocks=1, backbone=convnext)
