"""Pictures: reconstruction panels of the pixel objectives, the grid PNGs written during a fit
(without disturbing training), the curves PNG, and a whole training run leaving its eval
table, pictures and exported clip model in the run folder."""

from __future__ import annotations

import csv

import lightning as L
import pytest
import torch
from helpers import digits_module, tiny_backbone, tiny_objective
from PIL import Image

from m3i_lightning.components.pixels import normalize_patches, patchify, reconstruction_panels
from m3i_lightning.config.loggers import run_loggers
from m3i_lightning.core.errors import ConfigError
from m3i_lightning.engine.module import MultiObjective
from m3i_lightning.runtime.pictures import (
    CURVES_DPI,
    CURVES_SIZE,
    ReconstructionGrid,
    grid_size,
    plot_curves,
)

PIXEL_HEADS = {"ae": dict(decoder_dim=32, decoder_depth=1, decoder_heads=2),
               "mim_pixel": dict(decoder_dim=32, decoder_depth=1, decoder_heads=2),
               "nvs": dict(predictor_dim=32, predictor_depth=1, predictor_heads=2),
               "sim_pixel": dict(predictor_dim=32, predictor_depth=1, predictor_heads=2)}
PANELS = ["input", "masked input", "prediction", "target"]


@pytest.mark.parametrize("norm_pix", [True, False])
def test_a_perfect_prediction_shows_the_target_and_the_mask_blanks_its_patches(norm_pix):
    torch.manual_seed(0)
    inputs, target = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    masked = torch.tensor([[0, 5, 9], [3, 4, 15]])
    truth = patchify(target, 4)
    truth = normalize_patches(truth) if norm_pix else truth
    everywhere = reconstruction_panels(inputs, target, truth, None, masked, 4, norm_pix)
    at_masked = reconstruction_panels(inputs, target, truth.gather(1, masked[..., None].expand(
        -1, -1, 48)), masked, masked, 4, norm_pix)
    for panels in (everywhere, at_masked):
        assert list(panels) == PANELS
        torch.testing.assert_close(panels["prediction"], target, atol=1e-4, rtol=1e-4)
    blanked = patchify(everywhere["masked input"], 4)
    kept = torch.ones(2, 16, dtype=torch.bool).scatter(1, masked, False)
    assert (blanked[~kept] == 0).all()
    torch.testing.assert_close(blanked[kept], patchify(inputs, 4)[kept])


def fit_with(callbacks, tokenizer, names):
    L.seed_everything(0)
    heads = {name: tiny_objective(name, tokenizer, **PIXEL_HEADS.get(name, {}))
             for name in names}
    model = MultiObjective(tiny_backbone(), heads)
    dm = digits_module(tokenizer, batch_size=8)
    trainer = L.Trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=0,
                        callbacks=callbacks, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", devices=1)
    trainer.fit(model, datamodule=dm)
    return model


def test_grids_of_every_pixel_objective_during_and_after_training(tokenizer, tmp_path):
    names = [*PIXEL_HEADS, "cls"]
    plain = fit_with([], tokenizer, names)
    drawn = fit_with([ReconstructionGrid(tmp_path, every_n_epochs=1, num_images=4)],
                     tokenizer, names)
    for a, b in zip(plain.parameters(), drawn.parameters(), strict=True):
        assert torch.equal(a, b)  # own RNG, no gradient: training is untouched
    expected = {f"{name}_{tag}.png" for name in PIXEL_HEADS
                for tag in ("epoch001", "epoch002", "final")}
    assert {p.name for p in tmp_path.iterdir()} == expected  # cls draws nothing
    for name in expected:
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and image.mode == "RGB"
            assert image.size == grid_size(4, len(PANELS), 16)


def write_metrics(path):
    """A metrics.csv as Lightning's CSVLogger writes it: one column per logged name."""
    columns = ["epoch", "step", "train/loss", "train/loss/mim_pixel", "train/loss/clip",
               "val/knn_top1", "val/linear_top1"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for step in range(9, 100, 10):
            parts = {"train/loss/mim_pixel": 1 / (step + 1), "train/loss/clip": 4 - step / 50}
            writer.writerow({"epoch": step // 30, "step": step,
                             "train/loss": sum(parts.values()), **parts})
            if step % 30 == 29:
                writer.writerow({"epoch": step // 30, "step": step,
                                 "val/knn_top1": step / 100, "val/linear_top1": step / 90})


def test_curves_png_from_metrics_csv_and_without_any(tmp_path):
    write_metrics(tmp_path / "metrics.csv")
    size = (int(CURVES_SIZE[0] * CURVES_DPI), int(CURVES_SIZE[1] * CURVES_DPI))
    for source in (tmp_path / "metrics.csv", tmp_path / "missing.csv"):
        out = plot_curves(source, tmp_path / "pictures" / f"{source.stem}.png")
        with Image.open(out) as image:
            assert image.format == "PNG" and image.size == size


def test_tensorboard_logger_is_an_option(tmp_path):
    cfg = {"logger": {"csv": {}, "tensorboard": {"folder": "tensorboard"}}}
    from omegaconf import OmegaConf

    try:
        import tensorboard  # noqa: F401
    except ModuleNotFoundError:
        with pytest.raises(ConfigError, match="tensorboard"):
            run_loggers(OmegaConf.create(cfg), tmp_path)
    else:
        loggers = run_loggers(OmegaConf.create(cfg), tmp_path)
        assert [type(x).__name__ for x in loggers] == ["CSVLogger", "TensorBoardLogger"]
    with pytest.raises(ConfigError, match="unknown logger"):
        run_loggers(OmegaConf.create({"logger": {"comet": {}}}), tmp_path)


