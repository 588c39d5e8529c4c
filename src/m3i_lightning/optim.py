"""AdamW without weight decay on norms, biases and tokens, and a warmup + cosine schedule."""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

import torch
from torch import nn

NO_DECAY_NAMES = ("pos_embed", "cls_token", "reg_token", "mask_token", "logit_scale")


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_fraction: float = 0.05
    min_lr_ratio: float = 0.0
    # When set, weight decay follows a cosine from weight_decay to this value (DINO: 0.04 → 0.4).
    final_weight_decay: float | None = None


def param_groups(module: nn.Module, weight_decay: float,
                 exempt: Collection[nn.Parameter] = ()) -> list[dict]:
    """Split trainable parameters: 1-D tensors (norms, biases), tokens and the ``exempt``
    parameters (those a reference method keeps out of weight decay) get no decay."""
    exempt_ids = {id(p) for p in exempt}
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        skip = (p.ndim <= 1 or any(key in name for key in NO_DECAY_NAMES)
                or id(p) in exempt_ids)
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup from 0, then cosine decay to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def follow_weight_decay(optimizer: torch.optim.Optimizer, cfg: OptimConfig, step: int,
                        total_steps: int) -> None:
    """Set the decayed groups' weight decay to the schedule's value at ``step`` (a cosine from
    ``weight_decay`` to ``final_weight_decay``, as DINO's); nothing without a final value."""
    if cfg.final_weight_decay is None:
        return
    progress = min(step / max(total_steps, 1), 1.0)
    decay = cfg.final_weight_decay - (cfg.final_weight_decay - cfg.weight_decay) * (
        math.cos(math.pi * progress) + 1) / 2
    for group in optimizer.param_groups:
        if group["weight_decay"] > 0:
            group["weight_decay"] = decay


def build_optimizer(module: nn.Module, cfg: OptimConfig, total_steps: int,
                    exempt: Collection[nn.Parameter] = ()):
    optimizer = torch.optim.AdamW(param_groups(module, cfg.weight_decay, exempt), lr=cfg.lr,
                                  betas=tuple(cfg.betas))
    warmup = int(cfg.warmup_fraction * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, total_steps, warmup, cfg.min_lr_ratio))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
