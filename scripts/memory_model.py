"""Memory per GPU of M3I pre-training (``experiment=m3i``) for ViT-B / L / H under DDP, FSDP2
and FSDP2 with activation checkpointing: a model computed from the real modules, not a
measurement.

    python scripts/memory_model.py [--batch 64] [--gpus 8]

Each model is built on the meta device (no memory, real shapes), so its sizes are the library's
own: P trainable parameters (student backbone and heads), F frozen ones (the EMA teacher and
the averaged heads), U the largest FSDP2 unit (a transformer block, or the root's remainder).
The activations A are the bytes of every tensor autograd saves during one forward pass of the
real plan (mixed input, predictors, losses) over ``--batch`` samples, the model and the batch in
bfloat16 as autocast runs the matmuls (parameters, and views of them, left out), attention
through SDPA's flash kernel as on CUDA (on the meta device torch would take its math path,
which keeps the attention matrix); with activation checkpointing the blocks save only their
inputs, and one block's activations come back during its recomputation. With float32
weights, gradients and two AdamW moments (Lightning's ``bf16-mixed``), per GPU over G GPUs:

    DDP              16 P + 4 P (gradient buckets) + 4 F + A
    FSDP2            (16 P + 4 F) / G + 2 · 4 U (the gathered unit and the prefetched next) + A
    FSDP2 + act. ck. (16 P + 4 F) / G + 2 · 4 U + A_ckpt + A_block

Not counted: the CUDA context and allocator fragmentation (add 1 to 3 GiB), the teacher's
transient forward activations (no graph; at most one block's), NCCL buffers.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmark  # noqa: E402  (the scripts folder: its compose)

from m3i_lightning.config.factory import build_model, build_tokenizer_from  # noqa: E402
from m3i_lightning.engine.sharding import enable_activation_checkpointing, transformer_blocks  # noqa: E402

BACKBONES = {"ViT-B/16": "vit_base", "ViT-L/16": "vit_large", "ViT-H/14": "vit_huge"}
GIB = 2**30


def meta_model(backbone: str):
    cfg = benchmark.compose([f"backbone={backbone}", "experiment=m3i"])
    with torch.device("meta"):
        model = build_model(cfg, 1000, build_tokenizer_from(cfg.text))
    for parameter in model.parameters():  # as autocast computes with them; buffers stay
        parameter.data = parameter.data.bfloat16()
    return model.train(), cfg


@contextlib.contextmanager
def saved_tensors(exclude: nn.Module) -> Iterator[list[int]]:
    """Counts the bytes of the tensors autograd saves in the block (``[total]``), leaving out
    the parameters of ``exclude`` and views of them; attention runs SDPA's flash kernel."""
    params = {id(p) for p in exclude.parameters()}
    total = [0]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in params and id(getattr(tensor, "_base", None)) not in params:
            total[0] += tensor.numel() * tensor.element_size()
        return tensor

    def flash(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
        return torch.ops.aten._scaled_dot_product_flash_attention(
            query, key, value, dropout_p, is_causal, scale=scale)[0]

    fused = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = flash
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            yield total
    finally:
        F.scaled_dot_product_attention = fused


def saved_bytes(model: nn.Module, batch: dict) -> int:
    """Bytes autograd saves in one forward pass of the training plan."""
    with saved_tensors(model) as total:
        model.forward_terms(batch)
    return total[0]


def meta_batch(batch: int, size: int) -> dict:
    views = {name: torch.empty(batch, 3, size, size, device="meta", dtype=torch.bfloat16)
             for name in ("view1", "view2")}
    geometry = {f"{name}_geometry": torch.empty(batch, 5, device="meta") for name in views}
    return {**views, **geometry, "label": torch.zeros(batch, dtype=torch.long, device="meta")}


def block_bytes(model: nn.Module, batch: int) -> int:
    """Saved bytes of the student's first block alone over its real sequence length."""
    block = transformer_blocks(model.backbone)[0]
    tokens = model.backbone.grid_size[0] * model.backbone.grid_size[1] + 1
    x = torch.empty(batch, tokens, model.backbone.embed_dim, device="meta", dtype=torch.bfloat16,
                    requires_grad=True)
    with saved_tensors(block) as total:
        block(x)
    return total[0]


def memory_rows(batch: int, gpus: int, backbones: dict[str, str] = BACKBONES) -> list[dict]:
    """One row per backbone: parameter counts, activations and GiB per GPU of each setup."""
    rows = []
    for label, backbone in backbones.items():
        model, cfg = meta_model(backbone)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        blocks = transformer_blocks(model)
        in_blocks = {id(p) for b in blocks for p in b.parameters()}
        root = sum(p.numel() for p in model.parameters() if id(p) not in in_blocks)
        unit = max([sum(p.numel() for p in b.parameters()) for b in blocks] + [root])
        size = cfg.backbone.img_size
        activations = saved_bytes(model, meta_batch(batch, size))
        one_block = block_bytes(model, batch)
        enable_activation_checkpointing(model)
        checkpointed = saved_bytes(model, meta_batch(batch, size)) + one_block
        states = 16 * trainable + 4 * frozen
        rows.append({
            "backbone": label, "trainable_m": trainable / 1e6, "frozen_m": frozen / 1e6,
            "activations_gib": activations / GIB, "checkpointed_gib": checkpointed / GIB,
            "ddp_gib": (states + 4 * trainable + activations) / GIB,
            "fsdp2_gib": (states / gpus + 8 * unit + activations) / GIB,
            "fsdp2_ac_gib": (states / gpus + 8 * unit + checkpointed) / GIB})
    return rows


def markdown(rows: list[dict], batch: int, gpus: int) -> str:
    lines = [f"| backbone | trainable (M) | frozen (M) | activations, batch {batch} (GiB) "
             f"| DDP (GiB) | FSDP2, {gpus} GPUs (GiB) | FSDP2 + act. ckpt (GiB) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['backbone']} | {r['trainable_m']:.0f} | {r['frozen_m']:.0f} | "
                     f"{r['activations_gib']:.1f} | {r['ddp_gib']:.1f} | {r['fsdp2_gib']:.1f} | "
                     f"{r['fsdp2_ac_gib']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64, help="samples per GPU")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs FSDP2 shards over")
    args = parser.parse_args(argv)
    rows = memory_rows(args.batch, args.gpus)
    print(markdown(rows, args.batch, args.gpus))
    return rows


if __name__ == "__main__":
    main()
