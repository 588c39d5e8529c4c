"""The start screen of a pre-training run (resolved config, run folder, objectives with weights
and readings, data with split sizes) and the ``progress=`` bar."""

from __future__ import annotations

import pytest
from helpers import compose_config
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

from m3i_lightning.components.text import ByteTokenizer
from m3i_lightning.config.factory import build_datamodule, build_model
from m3i_lightning.config.start_screen import show_start_screen, start_screen
from m3i_lightning.config.trainer import console_callbacks
from m3i_lightning.core.errors import ConfigError

DIGITS = 1797  # the embedded data set


def built(*overrides: str):
    cfg = compose_config("objective=[mim_pixel,clip,cls]", "objective.cls.weight=0.5",
                         "objective.clip.text_width=32", "objective.clip.proj_dim=32",
                         "objective.clip.text_layers=1", "objective.clip.text_heads=2",
                         "objective.mim_pixel.decoder_dim=32",
                         "objective.mim_pixel.decoder_depth=1",
                         "objective.mim_pixel.decoder_heads=2", *overrides)
    tokenizer = ByteTokenizer(cfg.text.context_length)
    datamodule = build_datamodule(cfg.data, tokenizer)
    return cfg, build_model(cfg, datamodule.num_classes, tokenizer), datamodule


def test_screen_shows_config_folder_objectives_and_split_sizes(tmp_path):
    cfg, model, datamodule = built()
    screen = start_screen(cfg, tmp_path, model, datamodule)
    assert screen.startswith("config (print_config=false hides it):\n")
    assert "  mim_pixel:\n    weight: 1.0\n    norm_pix: null\n    decoder_dim: 32" in screen
    assert f"run folder: {tmp_path.resolve()}" in screen
    lines = screen.splitlines()
    objectives = lines[lines.index("objectives (input=shared):") + 1:][:3]
    assert [line.split() for line in objectives] == [
        ["mim_pixel", "weight", "1", "masked", "view1", "→", "view1"],
        ["clip", "weight", "1", "masked", "view1", "→", "text"],
        ["cls", "weight", "0.5", "masked", "view1", "→", "label"]]
    held_out = round(cfg.data.val_fraction * DIGITS)
    assert lines[-1] == (f"data: data=embedded: val {held_out:,}, train {DIGITS - held_out:,}; "
                         "10 classes; captions")

    cfg, model, datamodule = built("print_config=false", "mix=true")
    screen = start_screen(cfg, tmp_path, model, datamodule)
    assert screen.startswith("run folder:") and "objectives (input=shared, mix):" in screen
    assert "masked view1 (mixed, image a) → view1" in screen


def test_screen_is_printed_by_rank_zero_only(tmp_path, capsys, monkeypatch):
    cfg, model, datamodule = built("print_config=false")
    show_start_screen(cfg, tmp_path, model, datamodule)
    assert capsys.readouterr().out.startswith("run folder:")
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    show_start_screen(cfg, tmp_path, model, datamodule)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(("progress", "kind"), [("rich", RichProgressBar),
                                                  ("simple", TQDMProgressBar)])
def test_progress_option_picks_the_bar(progress, kind):
    (bar,) = [c for c in console_callbacks(compose_config(f"progress={progress}"))
              if isinstance(c, RichProgressBar | TQDMProgressBar)]
    assert isinstance(bar, kind)


def test_unknown_progress_is_one_error_line():
    with pytest.raises(ConfigError, match=r"progress=fancy: choose one of \['rich', 'simple'\]"):
        console_callbacks(compose_config("progress=fancy"))
