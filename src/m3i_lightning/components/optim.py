"""AdamW (or LARS, or LAMB) without weight decay on norms, biases and tokens, and a warmup +
cosine schedule; the learning rate given directly or by the linear scaling rule."""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from functools import partial

import torch
from timm.optim import Lamb
from torch import nn

from m3i_lightning.core.errors import ConfigError, check_options

NO_DECAY_NAMES = ("pos_embed", "cls_token", "reg_token", "mask_token", "logit_scale")


OPTIMIZERS = ("adamw", "lars", "lamb")
INTERVALS = ("step", "epoch")


@dataclass
class OptimConfig:
    # adamw | lars (BYOL, Barlow Twins: large-batch ResNet training) | lamb (DeiT III: timm's,
    # the global gradient norm clipped to 1 as apex's FusedLAMB does)
    name: str = "adamw"
    lr: float = 1e-3
    # When set, the linear scaling rule: lr = base_lr × global batch / 256 (MAE, MoCo v3, DINO).
    base_lr: float | None = None
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)  # adamw, lamb
    momentum: float = 0.9  # lars
    trust_coefficient: float = 1e-3  # lars: η of the trust ratio
    warmup_fraction: float = 0.05
    min_lr_ratio: float = 0.0
    # The lr the warm-up starts from (DeiT: timm's warmup_lr 1e-6); it ramps linearly to lr.
    warmup_start_lr: float = 0.0
    # step: the schedule moves every optimizer step (MAE, MoCo v3, DINO); epoch: it holds for a
    # whole epoch, timm's CosineLRScheduler stepped once per epoch as DeiT's main.py does.
    interval: str = "step"
    # interval=epoch: the epochs the lr trails its schedule. DeiT's main.py: 1, it steps the
    # schedule with the epoch just trained, so epochs 0 and 1 train at the schedule's epoch 0.
    epoch_lag: int = 0
    # When set, weight decay follows a cosine from weight_decay to this value (DINO: 0.04 → 0.4).
    final_weight_decay: float | None = None

    def learning_rate(self, global_batch_size: int | None) -> float:
        if self.base_lr is None:
            return self.lr
        if global_batch_size is None:
            raise ValueError("optim.base_lr scales with the global batch, which is unknown "
                             "here (no data module with a batch_size): set optim.lr instead")
        return self.base_lr * global_batch_size / 256

    def __post_init__(self) -> None:
        """Refuse values that cannot train, naming the ``optim.`` option and its range."""
        checks = {"name": (lambda v: v in OPTIMIZERS, f"one of {OPTIMIZERS}"),
                  "lr": (lambda v: v > 0, "a number > 0"),
                  "base_lr": (lambda v: v is None or v > 0, "null or a number > 0"),
                  "weight_decay": (lambda v: v >= 0, "a number >= 0"),
                  "betas": (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v),
                            "two numbers in [0, 1)"),
                  "warmup_fraction": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
                  "min_lr_ratio": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
                  "warmup_start_lr": (lambda v: v >= 0, "a number >= 0"),
                  "interval": (lambda v: v in INTERVALS, f"one of {INTERVALS}"),
                  "epoch_lag": (lambda v: isinstance(v, int) and (
                      v == 0 or (v > 0 and self.interval == "epoch")),
                                "0, or an integer > 0 with optim.interval=epoch"),
                  "final_weight_decay": (lambda v: v is None or v >= 0,
                                         "null or a number >= 0")}
        check_options({f"optim.{name}": (getattr(self, name), valid, allowed)
                       for name, (valid, allowed) in checks.items()})


class LARS(torch.optim.Optimizer):
    """SGD with momentum where each weight's step is scaled by its trust ratio
    η‖w‖ / ‖g + λw‖ (You et al., 2017), as BYOL and Barlow Twins train. Groups with
    ``lars=False`` (biases and norms, which these references neither decay nor adapt) take
    plain momentum-SGD steps."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 1e-3) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, lars=True))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad.add(p, alpha=group["weight_decay"])
                if group["lars"]:
                    weight_norm, update_norm = p.norm(), update.norm()
                    trust = group["trust_coefficient"] * weight_norm / update_norm
                    update = update.mul(torch.where(
                        (weight_norm > 0) & (update_norm > 0), trust, torch.ones_like(trust)))
                buffer = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buffer.mul_(group["momentum"]).add_(update)
                p.add_(buffer, alpha=-group["lr"])
        return loss


def decays(name: str, parameter: nn.Parameter) -> bool:
    """Whether weight decay applies: not to 1-D tensors (norms, biases) nor to tokens."""
    return parameter.ndim > 1 and not any(key in name for key in NO_DECAY_NAMES)


def param_groups(module: nn.Module, weight_decay: float,
                 exempt: Collection[nn.Parameter] = ()) -> list[dict]:
    """Split trainable parameters into those with weight decay and those without (as
    :func:`decays` says, and the ``exempt`` ones a reference method keeps out of it)."""
    exempt_ids = {id(p) for p in exempt}
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (decay if decays(name, p) and id(p) not in exempt_ids else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_ratio: float,
                  start_ratio: float = 0.0) -> float:
    """LR multiplier per step: a linear warm-up from ``start_ratio`` whose first step already
    moves, then a cosine over the steps after it, down to ``min_ratio`` (MAE's schedule)."""
    if step < warmup_steps:
        return start_ratio + (1 - start_ratio) * (step + 1) / warmup_steps
    return cosine_ramp(step - warmup_steps, total_steps - warmup_steps, 1.0, min_ratio)


def epoch_warmup_cosine(epoch: int, epochs: int, warmup_epochs: int, min_ratio: float,
                        start_ratio: float, lag: int = 0) -> float:
    """LR multiplier per epoch as timm's CosineLRScheduler gives it to DeiT: a linear warm-up
    from ``start_ratio`` (its warmup_lr_init) that starts there at epoch 0, then a cosine that
    counts from epoch 0 over all ``epochs`` (no warm-up prefix) down to ``min_ratio``; with
    ``lag``, epoch e trains at the schedule's epoch max(e − lag, 0)."""
    epoch = max(epoch - lag, 0)
    if epoch < warmup_epochs:
        return start_ratio + (1 - start_ratio) * epoch / warmup_epochs
    return cosine_ramp(epoch, epochs, 1.0, min_ratio)


def cosine_ramp(step: int, total_steps: int, start: float, end: float) -> float:
    """``start`` at step 0 moving to ``end`` at ``total_steps`` on a half cosine: the schedule
    of the EMA momentum (BYOL, DINO) and of DINO's weight decay."""
    progress = min(step / max(total_steps, 1), 1.0)
    return end - (end - start) * (math.cos(math.pi * progress) + 1) / 2


def follow_weight_decay(optimizer: torch.optim.Optimizer, cfg: OptimConfig, step: int,
                        total_steps: int) -> None:
    """Set the decayed groups' weight decay to the schedule's value at ``step`` (a cosine from
    ``weight_decay`` to ``final_weight_decay``, as DINO's); nothing without a final value."""
    if cfg.final_weight_decay is None:
        return
    decay = cosine_ramp(step, total_steps, cfg.weight_decay, cfg.final_weight_decay)
    for group in optimizer.param_groups:
        if group["weight_decay"] > 0:
            group["weight_decay"] = decay


def fused_on(devices: Collection[torch.device]) -> bool:
    """Whether AdamW takes its fused kernel (one launch for all parameters instead of several
    per tensor): when every parameter is on CUDA, as they are once the strategy has placed
    (and, under FSDP, sharded) the model before it builds the optimizer."""
    return bool(devices) and all(device.type == "cuda" for device in devices)


def build_optimizer(module: nn.Module, cfg: OptimConfig, total_steps: int,
                    exempt: Collection[nn.Parameter] = (), global_batch_size: int | None = None,
                    epochs: int | None = None):
    """The optimizer and its lr schedule, over ``total_steps`` (``interval=step``) or over
    ``epochs`` (``interval=epoch``, which needs them)."""
    groups = param_groups(module, cfg.weight_decay, exempt)
    lr = cfg.learning_rate(global_batch_size)
    if cfg.name == "lars":
        groups[1]["lars"] = False
        optimizer = LARS(groups, lr, cfg.momentum, cfg.weight_decay, cfg.trust_coefficient)
    elif cfg.name == "lamb":
        optimizer = Lamb(groups, lr=lr, betas=tuple(cfg.betas))
    else:
        devices = [p.device for group in groups for p in group["params"]]
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas),
                                      fused=fused_on(devices))
    start = cfg.warmup_start_lr / lr
    if cfg.interval == "epoch":
        if not epochs or epochs < 0:
            raise ConfigError("optim.interval=epoch schedules the lr over trainer.max_epochs, "
                              "which is not set: set trainer.max_epochs or optim.interval=step")
        # the warm-up a recipe states in epochs, as a fraction of them (5 of 300 is 0.0167)
        warmup = round(cfg.warmup_fraction * epochs)
        multiplier = partial(epoch_warmup_cosine, epochs=epochs, warmup_epochs=warmup,
                             min_ratio=cfg.min_lr_ratio, start_ratio=start, lag=cfg.epoch_lag)
    else:
        multiplier = partial(warmup_cosine, total_steps=total_steps,
                             warmup_steps=int(cfg.warmup_fraction * total_steps),
                             min_ratio=cfg.min_lr_ratio, start_ratio=start)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
    return {"optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": cfg.interval}}
