"""The network to fine-tune: ``backbone=`` with the recipe's pooling and drop path, holding
the weights of a pre-training checkpoint or an exported folder (or none: the random-init
baseline), after checking that they are the same architecture."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from m3i_lightning.backbone import Backbone
from m3i_lightning.config.artifacts import load_exported
from m3i_lightning.config.factory import build_backbone
from m3i_lightning.config.restore import load_checkpoint
from m3i_lightning.core.errors import ConfigError

# timm arguments that fine-tuning sets itself: they change no pre-trained weight's shape.
FINETUNE_ARGS = ("drop_path_rate", "global_pool", "num_classes", "fc_norm")
# Parameters that change with the pooling: MAE's average pooling drops the final norm and
# adds fc_norm, freshly initialised (and the reverse for a token-pooled fine-tuning).
POOLING_PARAMS = ("norm.", "fc_norm.")


def describe(arch: str, timm_kwargs: Mapping) -> str:
    """``arch(option=value, ...)`` over the options that define the pre-trained weights."""
    args = ", ".join(f"{k}={v}" for k, v in sorted(timm_kwargs.items())
                     if k not in FINETUNE_ARGS)
    return f"{arch}({args})"


def load_source(checkpoint: str | None, backbone_dir: str | None) -> tuple[Backbone, str]:
    """The pre-trained backbone and how to name it in messages."""
    if checkpoint:  # a file or a sharded folder: the reader says what is wrong with either
        return load_checkpoint(checkpoint).backbone, f"checkpoint={checkpoint}"
    if not (Path(backbone_dir) / "config.json").is_file():
        raise ConfigError(f"backbone_dir={backbone_dir}: no exported model (config.json) there")
    return load_exported(backbone_dir).backbone, f"backbone_dir={backbone_dir}"


def finetuning_backbone(cfg: Mapping, drop_path: float, global_pool: str) -> Backbone:
    """``backbone=`` (``cfg``) with the recipe's drop path and pooling."""
    return build_backbone({**cfg, "drop_path_rate": drop_path, "global_pool": global_pool})


def transfer(source: Backbone, target: Backbone, name: str) -> None:
    """Copy the pre-trained weights of ``source`` into ``target``: the same architecture, up to
    the pooling (see :data:`POOLING_PARAMS`)."""
    have, want = describe(source.arch, source.timm_kwargs), describe(target.arch,
                                                                     target.timm_kwargs)
    if have != want:
        raise ConfigError(f"{name} holds {have} but backbone= is {want}: choose the backbone "
                          "it was pre-trained with (backbone=..., backbone.<option>=...)")
    state = source.model.state_dict()
    result = target.model.load_state_dict(state, strict=False)
    stray = [k for k in (*result.missing_keys, *result.unexpected_keys)
             if not k.startswith(POOLING_PARAMS)]
    if stray:
        raise ConfigError(f"{name}: weights do not fit backbone= {want}: {sorted(stray)[:5]}")
