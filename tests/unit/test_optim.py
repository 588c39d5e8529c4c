"""The recipes' optimisers: LARS against its update rule written out, the linear scaling rule
of the learning rate, the schedules per step and per epoch (timm's, as DeiT steps it), and a
clear error for an unknown optimiser."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from m3i_lightning.components.optim import OptimConfig, build_optimizer
from m3i_lightning.core.errors import ConfigError


def test_lars_scales_each_weight_step_by_its_trust_ratio_and_not_the_biases():
    torch.manual_seed(0)
    layer = torch.nn.Linear(5, 3)
    config = OptimConfig(name="lars", lr=0.5, weight_decay=0.01, momentum=0.9,
                         trust_coefficient=0.001, warmup_fraction=0.0)
    optimizer = build_optimizer(layer, config, 10)["optimizer"]
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    layer(torch.randn(4, 5)).pow(2).sum().backward()
    grad_w, grad_b = layer.weight.grad.clone(), layer.bias.grad.clone()
    optimizer.step()
    # the weight: (g + λw) scaled by η‖w‖/‖g + λw‖; first step, so the momentum buffer is it
    update = grad_w + 0.01 * weight
    update = update * (0.001 * weight.norm() / update.norm())
    torch.testing.assert_close(layer.weight.detach(), weight - 0.5 * update)
    # the bias: neither decayed nor adapted (BYOL / Barlow Twins exclude it)
    torch.testing.assert_close(layer.bias.detach(), bias - 0.5 * grad_b)


def test_base_lr_follows_the_linear_scaling_rule():
    assert OptimConfig(base_lr=1.5e-4).learning_rate(4096) == pytest.approx(2.4e-3)
    assert OptimConfig(lr=1e-3).learning_rate(4096) == 1e-3
    with pytest.raises(ValueError, match="global batch"):
        OptimConfig(base_lr=1.5e-4).learning_rate(None)
    layer = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(layer, OptimConfig(base_lr=1e-4), 10,
                                global_batch_size=1024)["optimizer"]
    assert optimizer.param_groups[0]["initial_lr"] == pytest.approx(4e-4)


def test_the_engine_counts_the_batch_over_processes_and_accumulation(tokenizer):
    from helpers import tiny_backbone, tiny_objective

    from m3i_lightning.engine.module import MultiObjective

    model = MultiObjective(tiny_backbone(), {"cls": tiny_objective("cls", tokenizer)})
    model._trainer = SimpleNamespace(datamodule=SimpleNamespace(batch_size=32), world_size=4,
                                     accumulate_grad_batches=2)
    assert model.global_batch_size() == 256
    model._trainer.datamodule = None
    assert model.global_batch_size() is None


def test_unknown_optimizer_names_the_choices():
    with pytest.raises(ConfigError, match=r"optim\.name=sgd.*adamw.*lars.*lamb"):
        OptimConfig(name="sgd")


def test_lamb_steps_each_weight_by_its_trust_ratio_as_deit3_trains():
    """LAMB's first step (timm's, gradients under the clipping norm of 1): the Adam direction
    g / (|g| + eps) plus the weight decay, scaled by ||w|| / ||update||; biases (no decay)
    take the plain Adam step, unscaled, as apex's FusedLAMB does."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    config = OptimConfig(name="lamb", lr=0.1, weight_decay=0.05, betas=(0.9, 0.999),
                         warmup_fraction=0.0)
    optimizer = build_optimizer(layer, config, total_steps=10)["optimizer"]
    layer(torch.randn(2, 4)).sum().mul(0.01).backward()
    grads = layer.weight.grad.clone(), layer.bias.grad.clone()
    assert torch.cat([g.flatten() for g in grads]).norm() < 1
    optimizer.step()
    for before, grad, decay, after in ((weight, grads[0], 0.05, layer.weight),
                                       (bias, grads[1], 0.0, layer.bias)):
        update = grad / (grad.abs() + 1e-6) + decay * before
        trust = before.norm() / update.norm() if decay else 1.0
        expected = before - 0.1 * trust * update
        torch.testing.assert_close(after.detach(), expected, rtol=1e-5, atol=1e-6)


def test_epoch_interval_steps_the_lr_as_timm_cosine_scheduler_does_for_deit():
    """``interval=epoch``: one lr per epoch, timm's CosineLRScheduler (DeiT's schedule) stepped
    with each epoch: the warm-up from ``warmup_start_lr``, the cosine counted from epoch 0."""
    from timm.scheduler import CosineLRScheduler

    epochs, lr, start = 12, 1e-3, 1e-6
    config = OptimConfig(lr=lr, warmup_fraction=0.25, min_lr_ratio=0.01, warmup_start_lr=start,
                         interval="epoch")
    built = build_optimizer(torch.nn.Linear(2, 2), config, total_steps=1000, epochs=epochs)
    assert built["lr_scheduler"]["interval"] == "epoch"
    optimizer, scheduler = built["optimizer"], built["lr_scheduler"]["scheduler"]
    reference_optimizer = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=lr)
    reference = CosineLRScheduler(reference_optimizer, t_initial=epochs, lr_min=lr * 0.01,
                                  warmup_t=3, warmup_lr_init=start)
    for epoch in range(epochs):
        reference.step(epoch)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(
            reference_optimizer.param_groups[0]["lr"], rel=1e-9), epoch
        scheduler.step()
    with pytest.raises(ConfigError, match="trainer.max_epochs"):
        build_optimizer(torch.nn.Linear(2, 2), config, total_steps=1000, epochs=None)


def test_epoch_lag_trails_the_schedule_as_deits_main_steps_it():
    """DeiT's main.py builds timm's scheduler (which sets the warm-up's first lr) and calls
    ``step(epoch)`` after each epoch, so the next epoch trains at the value of the one just
    trained: ``epoch_lag=1``. A lag without the per-epoch interval is refused."""
    from timm.scheduler import CosineLRScheduler

    epochs, lr, start = 12, 1e-3, 1e-6
    config = OptimConfig(lr=lr, warmup_fraction=0.25, min_lr_ratio=0.01, warmup_start_lr=start,
                         interval="epoch", epoch_lag=1)
    built = build_optimizer(torch.nn.Linear(2, 2), config, total_steps=1000, epochs=epochs)
    optimizer, scheduler = built["optimizer"], built["lr_scheduler"]["scheduler"]
    reference_optimizer = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=lr)
    reference = CosineLRScheduler(reference_optimizer, t_initial=epochs, lr_min=lr * 0.01,
                                  warmup_t=3, warmup_lr_init=start)
    for epoch in range(epochs):  # main.py's loop: train the epoch, then step(epoch)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(
            reference_optimizer.param_groups[0]["lr"], rel=1e-9), epoch
        reference.step(epoch)
        scheduler.step()
    with pytest.raises(ConfigError, match="optim.epoch_lag"):
        OptimConfig(epoch_lag=1)


def test_step_warmup_ramps_from_its_start_lr():
    """``interval=step``: step s < W of the warm-up at start + (lr - start)(s + 1) / W, then
    the cosine over the remaining steps down to min_lr_ratio x lr."""
    lr, start, total, warmup = 1e-3, 1e-4, 20, 4
    config = OptimConfig(lr=lr, warmup_fraction=warmup / total, min_lr_ratio=0.1,
                         warmup_start_lr=start)
    built = build_optimizer(torch.nn.Linear(2, 2), config, total_steps=total)
    optimizer, scheduler = built["optimizer"], built["lr_scheduler"]["scheduler"]
    seen = []
    for _ in range(total):
        seen.append(optimizer.param_groups[0]["lr"])
        scheduler.step()
    ramp = [start + (lr - start) * (s + 1) / warmup for s in range(warmup)]
    cosine = [0.1 * lr + 0.9 * lr * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))) / 2
              for s in range(warmup, total)]
    assert seen == pytest.approx(ramp + cosine, rel=1e-9)
