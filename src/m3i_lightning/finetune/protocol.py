"""Fine-tuning as an evaluation protocol (``protocols=[...,finetune]``): the fine-tuning command
run on the evaluated backbone, with the ``finetune:`` recipe of the evaluating config, on its
data; the score is the top-1 of the last weights on the held-out split."""

from __future__ import annotations

import contextlib
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from m3i_lightning.backbone import Backbone

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def finetune_config(cfg: DictConfig, img_size: int) -> DictConfig:
    """The fine-tuning command's config with the recipe, data and seed of ``cfg``. It runs on
    one device: the end of a training run evaluates on rank 0 alone."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    scope = (contextlib.nullcontext() if GlobalHydra.instance().is_initialized()
             else initialize_config_dir(str(CONF_DIR), version_base="1.3"))
    with scope:
        composed = compose("finetune")
    data = OmegaConf.to_container(cfg.data, resolve=True)
    composed.data = {**data, "img_size": img_size}
    composed.finetune = OmegaConf.to_container(cfg.finetune, resolve=True)
    composed.seed = cfg.seed
    composed.trainer.devices = 1
    return composed


def finetune_top1(backbone: Backbone, cfg: DictConfig, out_dir: Path) -> float:
    """Fine-tune a copy of ``backbone`` (its weights stay as they are) in ``out_dir``."""
    from m3i_lightning.finetune.command import finetune

    composed = finetune_config(cfg, backbone.img_size[0])
    return finetune(composed, Path(out_dir), (backbone, "the evaluated model"))["top1"]
