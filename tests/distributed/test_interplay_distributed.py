"""The interplay monitor and the weighting strategies on 2 processes: data parallel equals one
process on the concatenated batch, FSDP2 equals DDP."""

from __future__ import annotations

import csv

import pytest
import torch
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
from m3i_lightning.engine.interplay import measure
from m3i_lightning.engine.module import MultiObjective

GLOBAL_BATCH = 8
# No masks (their draws differ between one process and two), negatives gathered over ranks
# (clip, MoCo v3) and a plain cross-entropy (cls); MoCo v3's heads hold BatchNorm.
OBJECTIVES = {"clip": {}, "inst_disc": dict(variant="moco", hidden_dim=32, out_dim=16), "cls": {}}
TIGHT = dict(rtol=1e-9, atol=1e-12)


def _model(weighting: str = "fixed") -> MultiObjective:
    torch.manual_seed(0)
    tokenizer = ByteTokenizer(context_length=16)
    objectives = {n: tiny_objective(n, tokenizer, **o) for n, o in OBJECTIVES.items()}
    return MultiObjective(tiny_backbone(depth=1), objectives, input_mode="native",
                          weighting=weighting).double()


def _rows(batch: dict, rows: slice) -> dict:
    return {k: v[rows].double() if v.is_floating_point() else v[rows]
            for k, v in batch.items() if torch.is_tensor(v)}


def _interplay(batch: dict) -> dict:
    model = _model()
    return {wrt: measure(model, batch, wrt).gram for wrt in ("encoder", "tokens")}


def _train(weighting: str, batch: dict, average) -> dict:
    """Two SGD steps through the engine's own training_step and backward; ``average`` is
    DDP's mean of the gradients over ranks."""
    model = _model(weighting)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    record: dict = {"losses": [], "grads": []}
    for _ in range(2):
        loss = model.training_step(batch, 0)
        model.backward(loss)
        for p in model.parameters():
            if p.grad is not None:
                p.grad = average(p.grad)
        record["losses"].append(average(loss.detach()))
        record["grads"].append({n: p.grad.clone() for n, p in model.named_parameters()
                                if p.grad is not None})
        optimizer.step()
        optimizer.zero_grad()
    return record


def _worker(rank: int, world_size: int, init_file: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    batch = next(iter(digits_module(ByteTokenizer(16), batch_size=GLOBAL_BATCH)
                      .train_dataloader()))
    whole = _rows(batch, slice(None))
    reference = _interplay(whole)  # before any process group
    trained = {w: _train(w, whole, lambda t: t) for w in ("uncertainty", "pcgrad")}
    with gloo_share(rank, world_size, init_file, GLOBAL_BATCH) as (rows, average):
        ours = _interplay(_rows(batch, rows))
        for wrt, gram in reference.items():
            torch.testing.assert_close(ours[wrt], gram, **TIGHT, msg=f"gram w.r.t. {wrt}")
        for weighting, expected in trained.items():
            got = _train(weighting, _rows(batch, rows), average)
            for step in range(2):
                torch.testing.assert_close(got["losses"][step], expected["losses"][step],
                                           **TIGHT)
                assert got["grads"][step].keys() == expected["grads"][step].keys()
                for name, grad in expected["grads"][step].items():
                    torch.testing.assert_close(got["grads"][step][name], grad, rtol=1e-9,
                                               atol=1e-10, msg=f"{weighting} step {step} {name}")


def test_ddp_interplay_and_weighting_equal_one_process_on_the_concatenated_batch(tmp_path):
    """[clip, inst_disc (MoCo v3), cls] in float64: the Gram matrix of the objectives'
    gradients (w.r.t. the encoder and w.r.t. the tokens) measured by 2 gloo processes on their
    halves equals one process on the whole batch, and so do two SGD steps of
    weighting=uncertainty and weighting=pcgrad (losses and every DDP-averaged gradient)."""
    mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous")), nprocs=2)


def _interplay_columns(run_dir) -> dict[tuple[int, str], float]:
    with open(run_dir / "metrics.csv") as f:
        return {(int(r["step"]), k): float(v) for r in csv.DictReader(f)
                for k, v in r.items() if k.startswith("interplay/") and v}


def test_fsdp2_interplay_and_uncertainty_weighting_equal_ddp(tmp_path):
    """[mim_feat, clip, cls] (random masks) with weighting=uncertainty and the monitor at every
    step on 2 processes: FSDP2 (each rank's shards of the reduced gradients, partial products
    summed) gives DDP's figures and losses (rtol 1e-6). (The token gradients under FSDP2 gave
    DDP's too when measured; one pair of runs is kept, for the suite's time.)"""
    common = [*TINY_RUN, *COMPOSED, *TWO_CPU_PROCESSES, "data.batch_size=16",
              "trainer.max_steps=2", "weighting=uncertainty", "interplay.every_n_steps=1"]
    fsdp, ddp = tmp_path / "fsdp", tmp_path / "ddp"
    run(*common, "strategy=fsdp", f"hydra.run.dir={fsdp}")
    run(*common, "strategy=ddp", f"hydra.run.dir={ddp}")
    sharded, replicated = _interplay_columns(fsdp), _interplay_columns(ddp)
    assert {step for step, _ in replicated} == {0, 1}
    assert len(replicated) == 2 * 12  # 3 norms, shares, cosines with the sum; 3 pairs
    assert sharded.keys() == replicated.keys()
    for key, value in replicated.items():
        assert sharded[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert losses(fsdp) == pytest.approx(losses(ddp), rel=1e-6)
