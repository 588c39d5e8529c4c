"""The interplay monitor: the gradient-agreement figures against constructed gradients and
against torch.autograd.grad by hand, the monitor leaving the training untouched, its logs,
record and heatmap."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from helpers import digits_module, tiny_multi
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from m3i_lightning.core.errors import ConfigError
from m3i_lightning.engine.interplay import Interplay, gram, measure
from m3i_lightning.evaluation.interplay_monitor import InterplayMonitor, summarize

COMPOSED = ["mim_feat", "clip", "cls"]


class Toy(nn.Module):
    """An 'engine' whose encoder is one linear map w [4] and whose terms are given linear
    functions of it, so each gradient is known: d⟨c, w x⟩/dw = c x."""

    def __init__(self, directions: dict[str, list[float]]) -> None:
        super().__init__()
        self.backbone = nn.Linear(1, 4, bias=False)
        self.backbone.blocks = lambda: [self.backbone]
        self.directions = {n: torch.tensor(d) for n, d in directions.items()}

    def interplay_terms(self, batch: dict) -> dict[str, torch.Tensor]:
        encoded = self.backbone(batch["view1"]).sum(dim=0)
        return {n: (c * encoded).sum() for n, c in self.directions.items()}


def toy_measure(directions: dict[str, list[float]], wrt: str = "encoder") -> Interplay:
    torch.manual_seed(0)
    return measure(Toy(directions), {"view1": torch.ones(2, 1)}, wrt)


@pytest.mark.parametrize("wrt", ["encoder", "tokens"])
def test_opposite_same_and_orthogonal_gradients(wrt):
    """Opposite directions give cosine −1, the same objective twice +1, orthogonal ones 0;
    two gradients of norms 2·‖c‖ (the batch of 2 ones) cancel to a zero step."""
    opposite = toy_measure({"a": [1, 2, 0, 0], "b": [-1, -2, 0, 0]}, wrt)
    assert opposite.cosines()[0, 1].item() == pytest.approx(-1)
    assert opposite.total_norm().item() == pytest.approx(0, abs=1e-12)
    same = toy_measure({"a": [1, 2, 0, 3], "a again": [1, 2, 0, 3]}, wrt)
    assert same.cosines()[0, 1].item() == pytest.approx(1)
    assert same.shares().tolist() == pytest.approx([0.5, 0.5])
    orthogonal = toy_measure({"a": [1, 2, 0, 0], "b": [2, -1, 5, 0]}, wrt)
    assert orthogonal.cosines()[0, 1].item() == pytest.approx(0, abs=1e-12)
    if wrt == "encoder":  # d/dw of ⟨c, Σ_rows w·1⟩ = 2c
        assert orthogonal.norms().tolist() == pytest.approx([2 * 5 ** 0.5, 2 * 30 ** 0.5])


def test_figures_follow_their_definitions():
    """Shares sum to 1 and are ⟨g_k, g⟩/‖g‖²; cos_sum is ⟨g_k, g⟩/(‖g_k‖‖g‖), from vectors."""
    g = torch.tensor([[1.0, 0.0, 2.0], [-0.5, 1.0, 0.0], [0.0, 0.0, -1.0]], dtype=torch.float64)
    interplay = Interplay(("a", "b", "c"), gram([[row] for row in g]))
    total = g.sum(dim=0)
    assert interplay.shares().sum().item() == pytest.approx(1)
    for k in range(3):
        assert interplay.shares()[k].item() == pytest.approx((g[k] @ total / total.dot(total))
                                                             .item())
        assert interplay.cosines_with_sum()[k].item() == pytest.approx(
            torch.nn.functional.cosine_similarity(g[k], total, dim=0).item())
    metrics = interplay.metrics()
    assert metrics["interplay/cos/a-c"] == pytest.approx(-2 / 5 ** 0.5)
    assert set(metrics) == {f"interplay/{s}/{n}" for s in ("norm", "share", "cos_sum")
                            for n in "abc"} | {f"interplay/cos/{p}" for p in ("a-b", "a-c", "b-c")}


def test_norms_and_cosines_equal_autograd_by_hand(tokenizer, batch):
    """[mim_feat, clip, cls] with random masks: the monitor's Gram matrix equals the one of
    torch.autograd.grad of each weighted term with respect to the encoder's parameters, on
    the same masks (the same random state); the random state after it is the one before."""
    model = tiny_multi(tokenizer, COMPOSED).double()
    batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    torch.manual_seed(3)
    state = torch.get_rng_state()
    interplay = measure(model, batch)
    assert torch.equal(torch.get_rng_state(), state)
    terms = model.interplay_terms(batch)
    encoder = [p for p in model.backbone.parameters() if p.requires_grad]
    by_hand = []
    for term in terms.values():
        grads = torch.autograd.grad(term, encoder, retain_graph=True, allow_unused=True)
        by_hand.append(torch.cat([torch.zeros_like(p).flatten() if g is None else g.flatten()
                                  for p, g in zip(encoder, grads, strict=True)]))
    by_hand = torch.stack(by_hand)
    assert interplay.names == tuple(COMPOSED)
    torch.testing.assert_close(interplay.gram, by_hand @ by_hand.T, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(interplay.norms(), by_hand.norm(dim=1), rtol=1e-10, atol=0)
    assert (interplay.norms() > 0).all()


def test_token_gradients_of_disjoint_readers_are_orthogonal(tokenizer, batch):
    """With respect to z_x: mim_feat reads the patch tokens, cls the class token, so their
    token gradients do not overlap (cosine 0), while both reach the encoder's weights."""
    model = tiny_multi(tokenizer, ["mim_feat", "cls"])
    tokens = measure(model, batch, "tokens")
    assert tokens.cosines()[0, 1].item() == 0
    assert (tokens.norms() > 0).all()
    assert measure(model, batch, "encoder").cosines()[0, 1].item() != 0


class StepLosses(L.Callback):
    def __init__(self) -> None:
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].item())


def fit(tokenizer, steps: int, monitor: InterplayMonitor | None, logdir=None):
    """``steps`` steps of [mim_feat, clip, cls, dense_id]: random masks, and DenseCL's queues,
    buffers that the monitor's own pass would move."""
    L.seed_everything(0)
    model = tiny_multi(tokenizer, [*COMPOSED, "dense_id"])
    recorder = StepLosses()
    trainer = L.Trainer(max_steps=steps, limit_val_batches=0, enable_checkpointing=False,
                        logger=CSVLogger(logdir) if logdir else False,
                        enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", log_every_n_steps=1,
                        callbacks=[recorder, *([monitor] if monitor else [])])
    trainer.fit(model, datamodule=digits_module(tokenizer, batch_size=16))
    return model, recorder.losses


def test_the_monitor_changes_no_training_step(tokenizer, tmp_path):
    """Measuring every other step (random masks, DenseCL's queues in the buffers) leaves
    every step's loss and the final weights and buffers exactly as without it; the monitor's
    figures reach the CSV logger at its steps, its record and heatmap are written."""
    plain, plain_losses = fit(tokenizer, 4, None)
    monitor = InterplayMonitor(2, record=tmp_path / "interplay.json",
                               picture=tmp_path / "interplay.png")
    monitored, monitored_losses = fit(tokenizer, 4, monitor, tmp_path / "logs")
    assert monitored_losses == plain_losses
    for (name, a), b in zip(plain.state_dict().items(), monitored.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    record = json.loads((tmp_path / "interplay.json").read_text())
    assert [h["step"] for h in record["history"]] == [1, 3]
    assert record["names"] == [*COMPOSED, "dense_id"]
    assert (tmp_path / "interplay.png").stat().st_size > 0
    metrics = next((tmp_path / "logs").rglob("metrics.csv")).read_text().splitlines()
    header = metrics[0].split(",")
    rows = [dict(zip(header, line.split(","), strict=True)) for line in metrics[1:]]
    measured = sorted(int(r["step"]) for r in rows if r["interplay/cos/clip-cls"])
    assert measured == [1, 3]


def test_summary_and_resume_state():
    history = [{"step": 1, "gram": [[1.0, -1.0], [-1.0, 4.0]]},
               {"step": 3, "gram": [[1.0, 1.0], [1.0, 1.0]]}]
    summary = summarize(["a", "b"], history)
    assert summary["cos"]["a-b"] == {"mean": pytest.approx(0.25), "first": -0.5, "last": 1.0}
    assert summary["share"]["a"] == pytest.approx((0 / 3 + 2 / 4) / 2)
    monitor = InterplayMonitor(2)
    monitor.load_state_dict({"names": ["a", "b"], "history": history})
    assert monitor.state_dict() == {"names": ["a", "b"], "history": history}


@pytest.mark.parametrize("every", [-1, 1.5, True, "10"])
def test_a_bad_interval_or_target_is_one_line(every):
    with pytest.raises(ConfigError, match="interplay.every_n_steps"):
        InterplayMonitor(every)
    with pytest.raises(ConfigError, match="interplay.wrt='weights': choose encoder or tokens"):
        InterplayMonitor(10, "weights")
