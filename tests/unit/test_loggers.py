"""The ``logger:`` group: metrics.csv always, trackers chosen next to it, and a tracker that
cannot open its run is one error line."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
from helpers import compose_config
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, WandbLogger
from omegaconf import OmegaConf

from m3i_lightning.config.loggers import TrackerRuns, run_loggers
from m3i_lightning.core.errors import ConfigError


@pytest.mark.parametrize(("choice", "kinds"), [
    ("logger=csv", [CSVLogger]),
    ("logger=wandb", [CSVLogger, WandbLogger]),
    ("logger=[csv,wandb,mlflow]", [CSVLogger, WandbLogger, MLFlowLogger]),
])
def test_csv_is_always_kept_next_to_the_chosen_trackers(choice, kinds, tmp_path):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    loggers = run_loggers(compose_config(choice), tmp_path)
    assert [type(x) for x in loggers[1:]] == kinds[1:]
    assert isinstance(loggers[0], CSVLogger)


def test_unknown_or_uninstalled_logger_is_one_error_line(tmp_path, monkeypatch):
    cfg = OmegaConf.create({"logger": {"csv": {}, "comet": {}}})
    with pytest.raises(ConfigError, match=r"unknown logger\(s\) \['comet'\]"):
        run_loggers(cfg, tmp_path)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'm3i_lightning\[mlflow\]'"):
        run_loggers(compose_config("logger=[csv,mlflow]"), tmp_path)


def test_wandb_online_without_a_login_is_one_error_line(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for name in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    cfg = compose_config("logger=wandb", "logger.wandb.mode=online")
    trainer = SimpleNamespace(is_global_zero=True, loggers=run_loggers(cfg, tmp_path))
    with pytest.raises(ConfigError) as caught:
        TrackerRuns(cfg, tmp_path).on_fit_start(trainer, None)
    message = str(caught.value)
    assert message.startswith("logger=wandb: ") and "\n" not in message
    assert not (tmp_path / "trackers.json").exists()
