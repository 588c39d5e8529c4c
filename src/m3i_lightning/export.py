"""Backbone export: safetensors weights plus the timm architecture that re-creates them."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from m3i_lightning.backbone import Backbone

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def export_backbone(backbone: Backbone, out_dir: str | Path) -> Path:
    """Write ``model.safetensors`` (timm state-dict keys) and ``config.json`` with
    ``architecture`` and ``model_args``, so that
    ``timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=...), **args)``
    rebuilds the same network."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.model.state_dict().items()}
    save_file(state, out / WEIGHTS_FILE, metadata={"architecture": backbone.arch})
    config = {"architecture": backbone.arch, "model_args": backbone.timm_kwargs}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return out / WEIGHTS_FILE
