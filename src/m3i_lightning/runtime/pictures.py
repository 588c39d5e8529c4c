"""Pictures of a run, written into its folder: what the pixel objectives reconstruct (during
training) and the curves of every loss term and probe accuracy (at the end).

Grids are drawn with torchvision and PIL; the curves with matplotlib (Agg, no display), which
is imported only when a curve is drawn.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from pathlib import Path

import lightning as L
import torch
from PIL import Image, ImageDraw
from torch import Tensor
from torchvision.utils import make_grid

PICTURES_DIR = "pictures"  # a run folder's pictures, which trackers receive at the end
TILE = 96  # small views are enlarged (nearest neighbour) to at least this many pixels
PAD = 2
HEADER = 16  # pixels of the column-title strip
CURVES_SIZE = (12, 4.5)  # inches, at CURVES_DPI: a 1200 × 450 PNG
CURVES_DPI = 100


def grid_size(rows: int, columns: int, image_size: int) -> tuple[int, int]:
    """(width, height) in pixels of the PNG that :func:`save_grid` writes."""
    tile = image_size * math.ceil(TILE / image_size)
    return columns * (tile + PAD) + PAD, HEADER + rows * (tile + PAD) + PAD


def save_grid(panels: Mapping[str, Tensor], path: Path) -> Path:
    """One row per sample, one titled column per panel ([B, 3, H, W] each, same H = W).

    All panels share the display range of the real images (the first and last panels, input
    and target), so a prediction too dark or too bright shows as such.
    """
    columns = list(panels)
    images = [panels[name].detach().float().cpu() for name in columns]
    real = torch.cat([images[0], images[-1]])
    low, high = real.min().item(), real.max().item()
    size = images[0].shape[-1]
    scale = math.ceil(TILE / size)
    tiles = torch.stack(images, dim=1).flatten(0, 1)  # row-major: sample, then panel
    tiles = ((tiles - low) / max(high - low, 1e-6)).clamp(0, 1)
    tiles = tiles.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    grid = make_grid(tiles, nrow=len(columns), padding=PAD, pad_value=1.0)
    body = Image.fromarray(grid.mul(255).round().byte().permute(1, 2, 0).numpy())
    picture = Image.new("RGB", (body.width, body.height + HEADER), "white")
    picture.paste(body, (0, HEADER))
    draw = ImageDraw.Draw(picture)
    for i, name in enumerate(columns):
        draw.text((PAD + i * (size * scale + PAD) + 2, 2), name, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return path


class ReconstructionGrid(L.Callback):
    """Every ``every_n_epochs`` epochs and at the end of training, a grid PNG per objective
    that returns pictures (``Objective.pictures``): ``<objective>_epoch<N>.png`` and
    ``<objective>_final.png`` in ``out_dir``.

    The same first ``num_images`` training samples and the same masks (own seed, the training
    RNG untouched) every time, in eval mode, so successive grids show progress alone. Every
    rank computes (a sharded model's forward needs all of them); rank 0 writes.
    """

    def __init__(self, out_dir: str | Path, every_n_epochs: int = 10, num_images: int = 8,
                 seed: int = 0) -> None:
        self.out_dir = Path(out_dir)
        self.every_n_epochs, self.num_images, self.seed = every_n_epochs, num_images, seed
        self.batch: dict | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.batch is None:
            self.batch = {k: v[: self.num_images].detach().clone() if torch.is_tensor(v) else v
                          for k, v in batch.items()}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch + 1
        if self.every_n_epochs and epoch % self.every_n_epochs == 0:
            self.draw(trainer, pl_module, f"epoch{epoch:03d}")

    def on_fit_end(self, trainer, pl_module) -> None:
        self.draw(trainer, pl_module, "final")

    def draw(self, trainer, pl_module, tag: str) -> list[Path]:
        if self.batch is None:
            return []
        pictures = self.reconstruct(trainer, pl_module)
        if not trainer.is_global_zero:
            return []
        return [save_grid(panels, self.out_dir / f"{name}_{tag}.png")
                for name, panels in pictures.items()]

    @torch.no_grad()
    def reconstruct(self, trainer, pl_module) -> dict[str, dict[str, Tensor]]:
        """name → panels of every objective with pictures, for the kept batch."""
        device = pl_module.device
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in self.batch.items()}
        was_training = pl_module.training
        pl_module.eval()
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), trainer.precision_plugin.forward_context():
            torch.manual_seed(self.seed)
            pictures = pl_module.objective_pictures(batch)
        pl_module.train(was_training)
        return pictures


def read_metrics(path: Path) -> dict[str, list[tuple[float, float]]]:
    """Lightning's ``metrics.csv`` as column → [(step, value)] over the rows that have it."""
    series: dict[str, list[tuple[float, float]]] = {}
    if not path.exists():  # nothing was logged (a run shorter than log_every_n_steps)
        return series
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key not in ("step", "epoch") and value not in ("", None):
                    series.setdefault(key, []).append((float(row["step"]), float(value)))
    return series


def plot_curves(metrics_csv: str | Path, out_png: str | Path) -> Path:
    """Left: the total loss and each weighted term against the step (log scale when all
    positive). Right: the probe accuracies (``val/*top1``) against the step, in percent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_metrics(Path(metrics_csv))
    losses = {k: v for k, v in series.items() if k == "train/loss" or k.startswith("train/loss/")}
    probes = {k: v for k, v in series.items() if k.startswith("val/") and k.endswith("top1")}
    fig, (left, right) = plt.subplots(1, 2, figsize=CURVES_SIZE, dpi=CURVES_DPI)
    for name, points in losses.items():
        steps, values = zip(*points, strict=True)
        left.plot(steps, values, label=name.removeprefix("train/loss").lstrip("/") or "total",
                  linewidth=2.0 if name == "train/loss" else 1.0)
    if losses and all(v > 0 for points in losses.values() for _, v in points):
        left.set_yscale("log")
    left.set(title="training loss (weighted terms)", xlabel="step", ylabel="loss")
    for name, points in probes.items():
        steps, values = zip(*points, strict=True)
        right.plot(steps, [100 * v for v in values], marker="o", label=name.removeprefix("val/"))
    right.set(title="probes on the held-out split", xlabel="step", ylabel="top-1 (%)")
    if not probes:
        right.text(0.5, 0.5, "no validation epoch logged", ha="center", va="center",
                   transform=right.transAxes)
    for axis in (left, right):
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
