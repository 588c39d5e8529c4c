"""A ConvNeXt scales out like the ViT (2 real processes on CPU, gloo): DDP equals one process on
the concatenated batch, and FSDP2 (one unit per ConvNeXt block, mask token in the root) tracks
DDP on a masked, teacher-distilling run."""

from __future__ import annotations

import torch
import torch.multiprocessing as mp
from helpers import (
    TWO_CPU_PROCESSES,
    digits32,
    family_backbone,
    gloo_share,
    losses,
    run,
    tiny_heads,
)

from m3i_lightning.engine.module import MultiObjective

GLOBAL_BATCH, STEPS = 8, 2


def _steps(batch: dict, rows: slice, average) -> list[dict]:
    """Two SGD steps (float64) of [cls, inst_disc (MoCo v3)] on a ConvNeXt, in native mode: no
    masks, so both runs see the same inputs whatever the random streams; ``average`` turns
    this process's gradients into DDP's. Returns each step's terms and gradients."""
    backbone = family_backbone("convnext")
    model = MultiObjective(backbone, tiny_heads(["cls", "inst_disc"], backbone),
                           input_mode="native").double()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    local = {k: v[rows].double() if v.is_floating_point() else v[rows]
             for k, v in batch.items() if torch.is_tensor(v)}
    record = []
    for step in range(STEPS):
        terms, _ = model.forward_terms(local)
        torch.stack(list(terms.values())).sum().backward()
        grads = {n: average(p.grad) for n, p in model.named_parameters() if p.grad is not None}
        for name, p in model.named_parameters():
            if p.grad is not None:
                p.grad = grads[name]
        record.append({"terms": {n: average(t.detach()) for n, t in terms.items()},
                       "grads": grads})
        optimizer.step()
        optimizer.zero_grad()
        model.update_teacher(step, 10)
    return record


def _ddp_worker(rank: int, world_size: int, init_file: str) -> None:
    torch.set_num_threads(1)
    batch = digits32(GLOBAL_BATCH, 0)
    reference = _steps(batch, slice(None), lambda t: t)
    with gloo_share(rank, world_size, init_file, GLOBAL_BATCH) as (rows, average):
        ours = _steps(batch, rows, average)
        tight = dict(rtol=1e-9, atol=1e-10)
        for step, (mine, theirs) in enumerate(zip(ours, reference, strict=True)):
            for name, term in theirs["terms"].items():
                torch.testing.assert_close(mine["terms"][name], term, **tight,
                                           msg=f"step {step} loss {name}")
            assert mine["grads"].keys() == theirs["grads"].keys()
            for name, grad in theirs["grads"].items():
                torch.testing.assert_close(mine["grads"][name], grad, **tight,
                                           msg=f"step {step} grad {name}")


def test_ddp_on_a_convnext_equals_one_process_on_the_concatenated_batch(tmp_path):
    """Per step, each term (mean over ranks) and every parameter's DDP-averaged gradient equal
    one process on the global batch (float64, rtol 1e-9 / atol 1e-10)."""
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "rendezvous")), nprocs=2)


# A CPU ConvNeXt smaller than convnext_cpu, with mim_feat (mask tokens, EMA teacher) and cls.
TINY_CONVNEXT = ["backbone=convnext_cpu", "backbone.dims=[16,16,24,32]",
                 "backbone.depths=[1,1,1,1]", "data.source_size=16", "data.num_workers=0",
                 "trainer.log_every_n_steps=1", "+trainer.limit_val_batches=0", "export=false",
                 "probe.epochs=1", "objective=[mim_feat,cls]",
                 "objective.mim_feat.predictor_dim=32", "objective.mim_feat.predictor_depth=1",
                 "objective.mim_feat.predictor_heads=2"]


def test_fsdp2_on_a_convnext_tracks_ddp(tmp_path):
    """[mim_feat, cls] for 3 steps on 2 processes, FSDP2 (activation checkpointing on) and
    DDP, the same seed and data: every step's losses agree (rtol 1e-4), and the consolidated
    FSDP2 checkpoint holds the DDP run's weights, mask token and EMA teacher included."""
    common = [*TINY_CONVNEXT, *TWO_CPU_PROCESSES, "data.batch_size=8", "teacher.momentum=0.5",
              "trainer.max_steps=3"]
    fsdp, ddp = tmp_path / "fsdp", tmp_path / "ddp"
    run(*common, "strategy=fsdp", "activation_checkpointing=true", f"hydra.run.dir={fsdp}")
    run(*common, "strategy=ddp", f"hydra.run.dir={ddp}")
    fsdp_losses = losses(fsdp)
    assert sorted(fsdp_losses) == [0, 1, 2]
    torch.testing.assert_close(fsdp_losses, losses(ddp), rtol=1e-4, atol=0)
    sharded, replicated = (torch.load(d / "checkpoints" / "last.ckpt", weights_only=True)
                           ["state_dict"] for d in (fsdp, ddp))
    assert sharded.keys() == replicated.keys()
    assert {"backbone.mask_token", "teacher.encoder.mask_token"} <= sharded.keys()
    for name, value in replicated.items():
        torch.testing.assert_close(sharded[name], value, rtol=1e-4, atol=1e-6, msg=name)
