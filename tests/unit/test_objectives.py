"""The foundation objectives cls, clip and mim_feat: where gradients go, that a few steps on a
fixed batch lower each loss, and that each trains on its own through Lightning."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import digits_module, tiny_backbone, tiny_objective

from m3i_lightning.backbone import Backbone
from m3i_lightning.components.optim import OptimConfig, build_optimizer
from m3i_lightning.core.errors import ConfigError
from m3i_lightning.engine.module import MultiObjective
from m3i_lightning.engine.teacher import cosine_momentum
from m3i_lightning.objectives import CLIP, Classification, MaskedFeature

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
    loss, _ = objective.head.loss(reading_batch, encoded, targets)

    with torch.no_grad():
        target = ref_data2vec_target(teacher.model, batch["view1"], k)
    hidden = encoded.masked_index
    target = target.gather(1, hidden[..., None].expand(-1, -1, target.shape[-1]))
    pred = objective.head.predictor(encoded.tokens, encoded.visible_index,
                               objective.head.predictor.position(hidden))
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
    loss, _ = objective.head.loss(reading_batch, encoded, targets)

    x, hidden, m = batch["view1"], encoded.masked_index, student.model
    cells = torch.zeros(x.shape[0], 16, 1, dtype=torch.bool).scatter_(1, hidden[..., None], True)
    patches = torch.where(cells, student.mask_token, m.patch_embed(x)) + m.pos_embed[:, 1:]
    cls = (m.cls_token + m.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    outputs = m.norm(m.blocks(torch.cat([cls, patches], dim=1)))[:, 1:]
    at_masked = outputs.gather(1, hidden[..., None].expand(-1, -1, 32))
    pred = at_masked @ objective.head.predictor.weight.T + objective.head.predictor.bias
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
    with pytest.raises(ConfigError,
                       match=r"drops the masked patches: build it with Backbone\(mask_token=True"):
        tiny_objective("mim_feat", tokenizer, backbone=tiny_backbone(), predictor="linear")
    head = tiny_objective("mim_feat", tokenizer, predictor="linear")
    with pytest.raises(ConfigError, match="where mix=True encodes the partner image's"):
        MultiObjective(tiny_backbone(mask_token=True), {"mim_feat": head}, input_mode="shared",
                       mix=True)
    with pytest.raises(ConfigError, match="predictor=mlp must be one of"):
        tiny_objective("mim_feat", tokenizer, predictor="mlp")


def test_data2vec_targets_beyond_the_teachers_depth_or_family_are_refused(tokenizer):
    with pytest.raises(ConfigError, match=r"MaskedFeature\(target_blocks=3\) .* has 2: choose"):
        tiny_objective("mim_feat", tokenizer, backbone=tiny_backbone(), target_blocks=3)
    with pytest.raises(ValueError, match="has 2 blocks; 3 top blocks asked for"):
        tiny_backbone()(torch.zeros(1, 3, 16, 16), top_blocks=3)
    with pytest.raises(ConfigError, match="target_blocks=-1 must be an integer >= 0"):
        tiny_objective("mim_feat", tokenizer, target_blocks=-1)
    convnext = Backbone("convnext_atto", img_size=32, patch_size=4, output_stride=8,
                        depths=(1, 1, 1, 1), dims=(16, 16, 24, 32))
    with pytest.raises(ConfigError, match="convnext teacher does not give"):
        tiny_objective("mim_feat", tokenizer, target_blocks=1, backbone=convnext)


# --- MILAN: the prompting decoder, the loss over every token, attention-guided masks ---------


def prompting_reference(predictor, tokens, pos, prefix, query_pos):
    """MILAN's decoder written out (models_milan.py forward_decoder / Block_fordecoder): the
    prompts (class token, visible tokens with positions) are never updated; per block, each
    mask token's query reads keys and values of [prompts, normed mask tokens], per head."""
    prompts = torch.cat([predictor.embed(prefix), predictor.embed(tokens) + pos], dim=1)
    x = predictor.mask_token + query_pos
    for block in predictor.blocks:
        heads, (b, n, d) = block.attn.num_heads, x.shape
        h = block.norm1(x)
        q = block.attn.q(h).view(b, n, heads, -1)
        k, v = block.attn.kv(torch.cat([prompts, h], dim=1)).view(b, -1, 2, heads, d // heads
                                                                  ).unbind(2)
        weights = torch.einsum("bqhc,bkhc->bhqk", q, k).div((d // heads) ** 0.5).softmax(-1)
        x = x + block.attn.proj(torch.einsum("bhqk,bkhc->bqhc", weights, v).reshape(b, n, d))
        x = x + block.mlp(block.norm2(x))
    return predictor.head(predictor.norm(torch.cat([prompts, x], dim=1)))


def test_prompting_decoder_keeps_the_prompts_fixed_and_updates_the_mask_tokens():
    from m3i_lightning.components.predictor import TokenPredictor

    torch.manual_seed(0)
    predictor = TokenPredictor(32, 24, (4, 4), dim=32, depth=2, num_heads=4, prompting=True)
    visible = torch.tensor([[0, 5, 9], [2, 3, 15]])
    hidden = torch.tensor([[1, 2, 14], [0, 7, 8]])
    tokens, prefix = torch.randn(2, 3, 32), torch.randn(2, 1, 32)
    query = predictor.position(hidden)
    out = predictor(tokens, visible, query, prefix=prefix, every_slot=True)
    expected = prompting_reference(predictor, tokens, predictor.position(visible), prefix, query)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    # the prompts' slots are their embeddings, normed and read out: unchanged by the blocks
    fixed = predictor.head(predictor.norm(torch.cat(
        [predictor.embed(prefix), predictor.embed(tokens) + predictor.position(visible)], 1)))
    torch.testing.assert_close(out[:, :4], fixed)
    torch.testing.assert_close(predictor(tokens, visible, query, prefix=prefix), out[:, 4:])
    # ... while the mask tokens read them
    moved = predictor(tokens + 1.0, visible, query, prefix=prefix)
    assert (moved - out[:, 4:]).abs().mean() > 1e-2


def test_every_decoder_starts_as_maes_xavier_uniform_linear_layers_with_zero_biases():
    """MAE, MILAN and SiameseIM initialise their decoders so (initialize_weights); PyTorch's
    default (kaiming-uniform, a ≈ 3x narrower bound at these widths) would differ."""
    from m3i_lightning.components.predictor import TokenPredictor

    torch.manual_seed(0)
    predictor = TokenPredictor(32, 48, (4, 4), dim=64, depth=2, num_heads=4, projector_depth=1)
    linears = [m for m in predictor.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 + 3 * 4  # embed, head, and qkv / proj / fc1 / fc2 of 3 blocks
    for linear in linears:
        bound = (6.0 / (linear.in_features + linear.out_features)) ** 0.5
        assert linear.weight.abs().max() <= bound + 1e-6
        assert linear.weight.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.15)
        assert linear.bias.abs().sum() == 0
    assert predictor.mask_token.std().item() == pytest.approx(0.02, rel=0.5)


def test_siameseim_decoder_projects_then_predicts_with_batchnorm_over_all_tokens():
    """SiameseIM's decoder (models_sim.py forward_sim): the embedded encoder tokens pass the
    projector blocks before the decoder positions are added, every block normalises with
    BatchNorm over all tokens of the batch, and no norm precedes the output layer."""
    from m3i_lightning.components.predictor import TokenBatchNorm, TokenPredictor

    torch.manual_seed(0)
    predictor = TokenPredictor(32, 24, (4, 4), dim=32, depth=2, num_heads=4,
                               projector_depth=1, norm="bn")
    visible = torch.tensor([[0, 5, 9], [2, 3, 15], [1, 4, 6]])
    tokens = torch.randn(3, 3, 32)
    query = predictor.position(torch.tensor([[1, 2], [0, 7], [3, 8]]))
    out = predictor(tokens, visible, query)
    context = predictor.projector(predictor.embed(tokens)) + predictor.position(visible)
    slots = predictor.blocks(torch.cat([context, predictor.mask_token + query], 1))
    torch.testing.assert_close(out, predictor.head(slots[:, 3:]))
    assert all(isinstance(block.norm1, TokenBatchNorm) for block in predictor.projector)
    x = torch.randn(3, 5, 32)
    flat = x.reshape(-1, 32)
    expected = (x - flat.mean(0)) / torch.sqrt(flat.var(0, unbiased=False) + 1e-5)
    torch.testing.assert_close(TokenBatchNorm(32)(x), expected, rtol=1e-4, atol=1e-5)
    # the statistics span the batch: another image moves this one's prediction (LayerNorm: not)
    other = tokens.clone()
    other[1:] += 1.0
    assert (predictor(other, visible, query)[0] - out[0]).abs().mean() > 1e-2
    layer = TokenPredictor(32, 24, (4, 4), dim=32, depth=2, num_heads=4, projector_depth=1)
    torch.testing.assert_close(layer(other, visible, query)[0], layer(tokens, visible, query)[0])


def test_milan_loss_covers_the_class_token_and_every_patch_against_raw_targets(tokenizer,
                                                                             batch):
    """loss_tokens=all, target_norm=none, cosine: 2 - 2 cos averaged over the class token
    and all patches, the targets as the teacher gives them (models_milan.py forward_loss)."""
    torch.manual_seed(0)
    objective = tiny_objective("mim_feat", tokenizer, backbone=tiny_backbone(), loss="cosine",
                               predictor="prompting", target_norm="none", loss_tokens="all")
    assert objective.head.predictor.prompting
    reading_batch, encoded, targets = objective.readings(batch)["mim_feat"][0]
    loss, _ = objective.head.loss(reading_batch, encoded, targets)
    pred = objective.head.predictor(encoded.tokens, encoded.visible_index,
                               objective.head.predictor.position(encoded.masked_index),
                               prefix=encoded.global_feature[:, None], every_slot=True)
    teacher = targets.teacher
    order = torch.cat([encoded.visible_index, encoded.masked_index], dim=1)
    target = torch.cat([teacher.global_feature[:, None],
                        teacher.tokens[torch.arange(8)[:, None], order]], dim=1)
    assert pred.shape == target.shape == (8, 17, 32)
    cosine = (pred * target).sum(-1) / (pred.norm(dim=-1) * target.norm(dim=-1))
    torch.testing.assert_close(loss, (2 - 2 * cosine).mean(), rtol=1e-4, atol=1e-5)


def test_milan_options_are_checked(tokenizer):
    with pytest.raises(ConfigError, match=r"target_norm=batch must be one of \['layer', 'none'\]"):
        tiny_objective("mim_feat", tokenizer, target_norm="batch")
    with pytest.raises(ConfigError, match="loss_tokens='all' .* needs predictor='transformer'"):
        tiny_objective("mim_feat", tokenizer, loss_tokens="all", predictor="linear")
    with pytest.raises(ConfigError, match="loss_tokens='all'"):
        tiny_objective("mim_feat", tokenizer, loss_tokens="all", target_blocks=1)


def test_attention_mask_is_drawn_from_the_teachers_attention_of_the_same_images(tokenizer,
                                                                              batch):
    """mask.kind=attention: the teacher runs first and the student's visible patches are the
    AttentionMask draw from its class attention of view1 (the same random stream)."""
    from m3i_lightning.components.masking import AttentionMask

    torch.manual_seed(0)
    objective = tiny_objective("mim_feat", tokenizer, backbone=tiny_backbone(), mask="attention")
    torch.manual_seed(3)
    encoded = objective.readings(batch)["mim_feat"][0][1]
    attention = objective.teacher(batch["view1"], class_attention=True).class_attention
    torch.manual_seed(3)
    expected = AttentionMask((4, 4), 0.75)(8, attention=attention)
    assert torch.equal(encoded.visible_index, (~expected).nonzero()[:, 1].view(8, 4))


def test_attention_mask_is_refused_where_no_teacher_attention_guides_it(tokenizer):
    with pytest.raises(ConfigError, match="no class token"):
        tiny_objective("mim_feat", tokenizer, mask="attention",
                       backbone=tiny_backbone(class_token=False, global_pool="avg"))
    with pytest.raises(ConfigError, match="the teacher encodes only \\[\\]"):
        tiny_objective("mim_pixel", tokenizer, mask="attention", backbone=tiny_backbone())
    with pytest.raises(ConfigError, match=r"mask='attention' .* \(mix=True\)"):
        MultiObjective(tiny_backbone(), {"mim_feat": tiny_objective("mim_feat", tokenizer)},
                       mask="attention", mask_ratio=0.5, mix=True)
