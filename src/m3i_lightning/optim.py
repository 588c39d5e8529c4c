"""AdamW without weight decay on norms, biases and tokens, and a warmup + cosine schedule."""

from __future__ import annotations

import math
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


def decays(name: str, parameter: nn.Parameter) -> bool:
    """Whether weight decay applies: not to 1-D tensors (norms, biases) nor to tokens."""
    return parameter.ndim > 1 and not any(key in name for key in NO_DECAY_NAMES)


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters into those with weight decay and those without."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (decay if decays(name, p) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup from 0, then cosine decay to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(module: nn.Module, cfg: OptimConfig, total_steps: int):
    optimizer = torch.optim.AdamW(param_groups(module, cfg.weight_decay), lr=cfg.lr,
                                  betas=tuple(cfg.betas))
    warmup = int(cfg.warmup_fraction * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, total_steps, warmup, cfg.min_lr_ratio))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
