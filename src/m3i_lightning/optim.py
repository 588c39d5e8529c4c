"""AdamW without weight decay on norms, biases and tokens, and a warmup + cosine schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from m3i_lightning.errors import check_options

NO_DECAY_NAMES = ("pos_embed", "cls_token", "reg_token", "mask_token", "logit_scale")


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_fraction: float = 0.05
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        """Refuse values that cannot train, naming the ``optim.`` option and its range."""
        checks = {"lr": (lambda v: v > 0, "a number > 0"),
                  "weight_decay": (lambda v: v >= 0, "a number >= 0"),
                  "betas": (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v),
                            "two numbers in [0, 1)"),
                  "warmup_fraction": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
                  "min_lr_ratio": (lambda v: 0 <= v <= 1, "a number in [0, 1]")}
        check_options({f"optim.{name}": (getattr(self, name), valid, allowed)
                       for name, (valid, allowed) in checks.items()})


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters: 1-D tensors (norms, biases) and tokens get no decay."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or any(key in name for key in NO_DECAY_NAMES)
        (no_decay if skip else decay).append(p)
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
