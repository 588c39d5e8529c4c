"""The contrastive objectives on two gloo processes equal one process on the concatenated
batch."""

from __future__ import annotations

import torch
import torch.multiprocessing as mp
from helpers import gloo_group, tiny_objective

from m3i_lightning.backbone import Encoded
from m3i_lightning.objectives import Targets

VARIANTS = ("moco", "byol", "barlow")


CASES = [("inst_disc", {"variant": v}) for v in VARIANTS] + [("dense_id", {}), ("sim_global", {})]


def _inputs(global_batch: int, tokens: int = 4, dim: int = 32) -> dict[str, torch.Tensor]:
    """Float64, as the heads run here: two ranks sum in another order than one process, and in
    float32 the default tolerances would be about as tight as that reordering."""
    torch.manual_seed(1)
    return {name: torch.randn(global_batch, *shape, dtype=torch.float64)
            for name, shape in [("student_tokens", (tokens, dim)), ("student_global", (dim,)),
                                ("target_tokens", (tokens, dim)), ("target_global", (dim,))]}


def _run(name: str, options: dict, inputs: dict, rows: slice):
    """Loss, head parameter gradients and input gradients of one objective on ``rows``."""
    torch.manual_seed(0)
    objective = tiny_objective(name, None, **options).double().train()
    trained = ("student", "target") if objective.student_target else ("student",)
    x = {k: v[rows].clone().requires_grad_(k.startswith(trained)) for k, v in inputs.items()}
    student = Encoded(x["student_tokens"], x["student_global"])
    target = Encoded(x["target_tokens"], x["target_global"])
    if objective.student_target:
        targets = Targets("view2", "view1", student=target)
    else:
        targets = Targets("view2", "view1", teacher=target)
    loss, _ = objective.loss({}, student, targets)
    loss.backward()
    grads = {n: p.grad for n, p in objective.named_parameters() if p.grad is not None}
    inputs_grad = {k: v.grad for k, v in x.items() if v.grad is not None}
    return loss.detach(), grads, inputs_grad, dict(objective.named_buffers())


def _distributed_worker(rank: int, world_size: int, init_file: str) -> None:
    global_batch = 8
    inputs = _inputs(global_batch)
    reference = [_run(n, o, inputs, slice(None)) for n, o in CASES]  # before any process group
    with gloo_group(rank, world_size, init_file) as dist:
        local = global_batch // world_size
        rows = slice(rank * local, (rank + 1) * local)
        for (name, options), (loss_1, grads_1, inputs_1, buffers_1) in zip(
                CASES, reference, strict=True):
            what = f"{name} {options}"
            loss, grads, input_grads, buffers = _run(name, options, inputs, rows)
            dist.all_reduce(loss)
            torch.testing.assert_close(loss / world_size, loss_1, msg=what)
            assert grads.keys() == grads_1.keys(), what
            for n, g in grads.items():  # DDP averages gradients over ranks
                dist.all_reduce(g)
                torch.testing.assert_close(g / world_size, grads_1[n], msg=f"{what} {n}")
            for k, g in input_grads.items():  # every rank's loss reaches the local inputs
                torch.testing.assert_close(g / world_size, inputs_1[k][rows], msg=f"{what} {k}")
            for n, b in buffers.items():
                if "queue" in n:  # the queues hold the whole global batch's keys
                    torch.testing.assert_close(b, buffers_1[n], msg=f"{what} {n}")


def test_two_processes_equal_one_process_on_the_concatenated_batch(tmp_path):
    """Gloo, 2 ranks: loss (mean over ranks), DDP-averaged head gradients, the gradients that
    reach each rank's inputs, and the queues equal one process on the global batch, for every
    variant: MoCo keys gathered without gradient, global-batch BatchNorm in the heads, Barlow /
    MSN statistics over the global batch, DenseCL queues fed with every rank's keys."""
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "rendezvous")), nprocs=2)
