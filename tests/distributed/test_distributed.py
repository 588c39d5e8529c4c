"""Scale-out with 2 real processes on CPU (gloo): data parallel equals one process on the
concatenated batch; FSDP2 trains a composed run, tracks DDP, keeps the teacher in step and
resumes from its checkpoint."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import (
    COMPOSED,
    TINY_RUN,
    TWO_CPU_PROCESSES,
    digits_module,
    gloo_share,
    losses,
    run,
    tiny_backbone,
    tiny_objective,
)

from m3i_lightning.components.text import ByteTokenizer
from m3i_lightning.engine.module import MultiObjective

GLOBAL_BATCH = 8
STEPS = 2
# inst_disc (MoCo v3) reads view2 and predicts the teacher's view1 key, both directions in
# native mode; no masks, so both runs see the same inputs whatever the random streams.
OBJECTIVES = {"clip": {}, "inst_disc": dict(variant="moco", hidden_dim=32, out_dim=16)}


def _train(batch: dict, rows: slice, average) -> dict:
    """Two SGD steps of [clip, inst_disc] on ``batch[rows]`` in float64, each followed by the
    engine's EMA updates (:meth:`update_teacher`); ``average`` turns this process's gradients
    into DDP's (mean over ranks). SGD, not Adam: Adam's first step is the gradient's sign,
    which float noise flips on the parameters whose gradient is zero in exact arithmetic
    (biases before a BatchNorm)."""
    torch.manual_seed(0)
    tokenizer = ByteTokenizer(context_length=16)
    objectives = {n: tiny_objective(n, tokenizer, **o) for n, o in OBJECTIVES.items()}
    model = MultiObjective(tiny_backbone(depth=1), objectives, input_mode="native").double()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    local = {k: v[rows].double() if v.is_floating_point() else v[rows]
             for k, v in batch.items() if torch.is_tensor(v)}
    record: dict = {"losses": [], "grads": []}
    for step in range(STEPS):
        terms, _ = model.forward_terms(local)
        loss = torch.stack(list(terms.values())).sum()
        loss.backward()
        for p in model.parameters():
            if p.grad is not None:
                p.grad = average(p.grad)
        record["losses"].append({n: average(t.detach()) for n, t in terms.items()})
        record["grads"].append({n: p.grad.clone() for n, p in model.named_parameters()
                                if p.grad is not None})
        optimizer.step()
        optimizer.zero_grad()
        model.update_teacher(step, 10)
    record["teacher"] = {n: p.detach().clone() for n, p in model.teacher.named_parameters()}
    record["momentum_heads"] = {n: p.detach().clone() for n, p in
                                objectives["inst_disc"].momentum_projector.named_parameters()}
    return record


def _ddp_worker(rank: int, world_size: int, init_file: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    batch = next(iter(digits_module(ByteTokenizer(16), batch_size=GLOBAL_BATCH)
                      .train_dataloader()))
    reference = _train(batch, slice(None), lambda t: t)  # before any process group
    with gloo_share(rank, world_size, init_file, GLOBAL_BATCH) as (rows, average):
        ours = _train(batch, rows, average)
        tight = dict(rtol=1e-9, atol=1e-10)
        for step in range(STEPS):
            for name, loss in reference["losses"][step].items():
                torch.testing.assert_close(ours["losses"][step][name], loss, **tight,
                                           msg=f"step {step} loss {name}")
            assert ours["grads"][step].keys() == reference["grads"][step].keys()
            for name, grad in reference["grads"][step].items():
                torch.testing.assert_close(ours["grads"][step][name], grad, **tight,
                                           msg=f"step {step} grad {name}")
        for part in ("teacher", "momentum_heads"):
            for name, value in ours[part].items():
                torch.testing.assert_close(value, reference[part][name], **tight)
                gathered = [torch.empty_like(value) for _ in range(world_size)]
                dist.all_gather(gathered, value)
                assert all(torch.equal(g, value) for g in gathered), f"{part} {name} differs"


def test_ddp_equals_one_process_on_the_concatenated_batch(tmp_path):
    """Whole model (backbone, text tower, heads, EMA teacher), clip and inst_disc (MoCo v3):
    per step, each term (mean over ranks) and every parameter's DDP-averaged gradient equal one
    process on the global batch (float64, rtol 1e-9 / atol 1e-10); after two SGD steps the
    teacher and MoCo's momentum projector equal it too, and are bitwise identical on both
    ranks. Negatives are gathered with gradients (local loss), BatchNorm statistics are those
    of the global batch."""
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "rendezvous")), nprocs=2)


def _checkpoint(run_dir) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)


def test_fsdp2_tracks_ddp_keeps_the_teacher_in_step_and_resumes(tmp_path):
    """[mim_feat, clip, cls] for 4 steps on 2 processes, FSDP2 (with activation checkpointing)
    and DDP, the same seed and data: every step's losses agree (rtol 1e-4), and the FSDP2
    checkpoint (consolidated, loaded with weights_only) holds the DDP run's weights, teacher
    included (rtol 1e-4, atol 1e-6): the shard-local EMA is the full one. Teacher momentum 0.5,
    so that the teacher moves far from its initial copy and stays apart from the student.
    Restarted with resume=auto, the FSDP2 run continues from step 4 to step 6."""
    common = [*TINY_RUN, *COMPOSED, *TWO_CPU_PROCESSES, "data.batch_size=16",
              "teacher.momentum=0.5", "trainer.max_steps=4"]
    fsdp, ddp = tmp_path / "fsdp", tmp_path / "ddp"
    run(*common, "strategy=fsdp", "activation_checkpointing=true", f"hydra.run.dir={fsdp}")
    run(*common, "strategy=ddp", f"hydra.run.dir={ddp}")

    fsdp_losses, ddp_losses = losses(fsdp), losses(ddp)
    assert sorted(fsdp_losses) == [0, 1, 2, 3]
    torch.testing.assert_close(fsdp_losses, ddp_losses, rtol=1e-4, atol=0)
    sharded, replicated = _checkpoint(fsdp), _checkpoint(ddp)
    assert sharded["global_step"] == replicated["global_step"] == 4
    assert sharded["state_dict"].keys() == replicated["state_dict"].keys()
    for name, value in replicated["state_dict"].items():
        torch.testing.assert_close(sharded["state_dict"][name], value, rtol=1e-4, atol=1e-6,
                                   msg=name)
    teacher = {k.removeprefix("teacher.encoder."): v for k, v in sharded["state_dict"].items()
               if k.startswith("teacher.encoder.")}
    student = {k.removeprefix("backbone."): v for k, v in sharded["state_dict"].items()
               if k.startswith("backbone.")}
    assert teacher.keys() == student.keys()
    gap = max((teacher[k] - student[k]).abs().max().item() for k in teacher)
    assert gap > 1e-4

    run(*common[:-1], "trainer.max_steps=6", "strategy=fsdp", "resume=auto",
        f"hydra.run.dir={fsdp}")
    assert sorted(losses(fsdp)) == [0, 1, 2, 3, 4, 5]  # history kept, steps 4-5 added
    assert _checkpoint(fsdp)["global_step"] == 6
