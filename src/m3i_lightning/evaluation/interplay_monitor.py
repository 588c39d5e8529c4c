"""The interplay monitor of a run: how the objectives' gradients agree on the shared encoder
(:mod:`m3i_lightning.engine.interplay`), measured every ``interplay.every_n_steps`` optimizer
steps, logged to every logger (``interplay/norm/<k>``, ``share/<k>``, ``cos_sum/<k>``,
``cos/<i>-<j>``), kept in ``interplay.json`` and drawn at the end as a heatmap of the pairwise
cosines (their mean over the run and their last value) beside the loss curves.

Each measurement costs one extra forward of the step and one backward per objective, paid only
at its interval; it changes nothing of the training (see :func:`~m3i_lightning.engine.interplay.
measure`).
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch

from m3i_lightning.core.errors import ConfigError
from m3i_lightning.engine.interplay import Interplay, check_wrt, measure


class InterplayMonitor(L.Callback):
    """Measures the interplay on the first batch of every ``every_n_steps``-th optimizer step,
    before the step runs, and hands the figures to every logger at that step; every rank
    measures (the reductions are collectives), rank 0 writes. A run of one objective has no
    interplay: nothing is measured.

    Args:
        every_n_steps: optimizer steps between measurements.
        wrt: ``encoder`` (the shared encoder's parameters) or ``tokens`` (z_x).
        record: where the history goes at the end (JSON), or None.
        picture: where the heatmap goes at the end (PNG), or None.
    """

    def __init__(self, every_n_steps: int, wrt: str = "encoder",
                 record: str | Path | None = None, picture: str | Path | None = None) -> None:
        if not isinstance(every_n_steps, int) or isinstance(every_n_steps, bool) \
                or every_n_steps < 1:
            raise ConfigError(f"interplay.every_n_steps={every_n_steps} must be a whole number "
                              "of steps (0: off)")
        check_wrt(wrt)
        self.every_n_steps, self.wrt = every_n_steps, wrt
        self.record = None if record is None else Path(record)
        self.picture = None if picture is None else Path(picture)
        self.names: list[str] = []
        self.history: list[dict] = []  # {"step": s, "gram": K x K}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        measured = self.history and self.history[-1]["step"] == step  # a later micro-batch
        if (step + 1) % self.every_n_steps or measured or len(pl_module.objectives()) < 2:
            return
        interplay = measure(pl_module, batch, self.wrt, trainer.precision_plugin.forward_context)
        self.names = list(interplay.names)
        self.history.append({"step": step, "gram": interplay.gram.tolist()})
        for logger in trainer.loggers:  # not self.log: a value would repeat on later steps
            logger.log_metrics(interplay.metrics(), step=step)

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero or not self.history:
            return
        record = {"wrt": self.wrt, "names": self.names, "history": self.history,
                  "summary": summarize(self.names, self.history)}
        if self.record is not None:
            self.record.parent.mkdir(parents=True, exist_ok=True)
            self.record.write_text(json.dumps(record, indent=1))
        if self.picture is not None:
            draw_cosines(record, self.picture)

    def state_dict(self) -> dict:
        return {"names": self.names, "history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        """A resumed run keeps the measurements before its checkpoint."""
        self.names, self.history = state_dict["names"], state_dict["history"]


def summarize(names: list[str], history: list[dict]) -> dict:
    """Over the measured steps: each pair's cosine (mean, first, last), each objective's share
    of the step, gradient norm and cosine with the step (means), by name."""
    measured = [Interplay(tuple(names), torch.tensor(h["gram"], dtype=torch.float64))
                for h in history]
    cosines = torch.stack([m.cosines() for m in measured])
    pairs = {f"{a}-{b}": (i, j) for i, a in enumerate(names) for j, b in enumerate(names)
             if i < j}

    def per_objective(values: torch.Tensor) -> dict[str, float]:
        return {n: float(v) for n, v in zip(names, values.mean(dim=0), strict=True)}

    return {"steps": [h["step"] for h in history],
            "cos": {p: {"mean": float(cosines[:, i, j].mean()), "first": float(cosines[0, i, j]),
                        "last": float(cosines[-1, i, j])} for p, (i, j) in pairs.items()},
            "share": per_objective(torch.stack([m.shares() for m in measured])),
            "norm": per_objective(torch.stack([m.norms() for m in measured])),
            "cos_sum": per_objective(torch.stack([m.cosines_with_sum() for m in measured]))}


def draw_cosines(record: dict, path: str | Path, title: str = "") -> Path:
    """Two heatmaps of the pairwise cosines of ``record`` (``interplay.json``): their mean over
    the measured steps and their last value, −1 (conflict, red) to +1 (synergy, blue), each
    cell labelled; the diagonal (1) is left blank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = record["names"]
    cosines = torch.stack([Interplay(tuple(names), torch.tensor(h["gram"], dtype=torch.float64))
                           .cosines() for h in record["history"]])
    steps = [h["step"] for h in record["history"]]
    panels = {f"mean over {len(steps)} measured steps": cosines.mean(dim=0),
              f"last (step {steps[-1]})": cosines[-1]}
    size = 1.2 + 0.9 * len(names)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size + 3, size + 0.6), dpi=100,
                             layout="constrained")
    for axis, (label, matrix) in zip(axes, panels.items(), strict=True):
        shown = matrix.clone()
        shown.fill_diagonal_(float("nan"))
        image = axis.imshow(shown.numpy(), cmap="RdBu", vmin=-1, vmax=1)
        axis.set_xticks(range(len(names)), names, rotation=30, ha="right")
        axis.set_yticks(range(len(names)), names)
        for i in range(len(names)):
            for j in range(len(names)):
                if i != j:
                    axis.text(j, i, f"{matrix[i, j]:+.2f}", ha="center", va="center", fontsize=9)
        axis.set_title(label, fontsize=10)
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="cosine of the gradients")
    fig.suptitle(title or f"objective interplay (gradients w.r.t. the {record['wrt']})",
                 fontsize=11)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)
    return out
