"""Layer-wise learning-rate decay (BEiT, MAE, SiameseIM fine-tuning of ViTs).

Layer 0 is the input side (patch and position embeddings, class / register tokens), block i
is layer i + 1, and everything after the blocks (final norms, the head) is layer L + 1 for a
ViT of L blocks. A parameter of layer l trains at lr · decay^(L + 1 − l): the head at the full
rate, earlier layers, which hold the most general pre-trained features, ever more slowly.
"""

from __future__ import annotations

import re

from torch import nn

from m3i_lightning.components.optim import decays

INPUT_SIDE = ("patch_embed", "pos_embed", "cls_token", "reg_token", "norm_pre")
BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def layer_of(name: str, depth: int) -> int:
    """The layer of the parameter ``name`` in a ViT of ``depth`` blocks."""
    block = BLOCK.search(name)
    if block:
        return int(block.group(1)) + 1
    if any(part in INPUT_SIDE for part in name.split(".")):
        return 0
    return depth + 1


def layer_decay_groups(module: nn.Module, depth: int, lr: float, layer_decay: float,
                       weight_decay: float) -> list[dict]:
    """AdamW parameter groups of ``module``, one per (layer, with or without weight decay),
    each with its ``lr`` and a ``layer`` key; norms, biases and tokens get no weight decay."""
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        layer, decayed = layer_of(name, depth), decays(name, p)
        group = groups.setdefault((layer, decayed), {
            "params": [], "layer": layer, "lr": lr * layer_decay ** (depth + 1 - layer),
            "weight_decay": weight_decay if decayed else 0.0})
        group["params"].append(p)
    return [groups[key] for key in sorted(groups)]
