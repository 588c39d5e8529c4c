"""The exported model folder: written at the end of training or by
``python -m m3i_lightning.export checkpoint=PATH out=DIR``, read back by the eval command.

    DIR/model.safetensors, DIR/config.json   the backbone, loadable by timm alone
    DIR/clip/                                 only for models trained with clip:
        config.json, model.safetensors        the text tower (transformers save_pretrained)
        m3i_tokenizer.json (+ tokenizer files) how to rebuild the tokenizer
        image_projection.safetensors          image side of the joint space, and logit scale
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from m3i_lightning.backbone import Backbone
from m3i_lightning.components.text import ByteTokenizer, build_tokenizer
from m3i_lightning.config.restore import TrainedModel
from m3i_lightning.core.errors import ConfigError, M3IError
from m3i_lightning.objectives.clip import CLIP

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CLIP_DIR = "clip"
TOKENIZER_FILE = "m3i_tokenizer.json"
IMAGE_PROJECTION_FILE = "image_projection.safetensors"


def export_backbone(backbone: Backbone, out_dir: str | Path) -> Path:
    """Write ``model.safetensors`` (timm state-dict keys) and ``config.json`` with
    ``architecture`` and ``model_args``, so that
    ``timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=...), **args)``
    rebuilds the same network. ``pretrained_cfg`` makes the folder timm's own format too:
    ``timm.create_model('local-dir:DIR', pretrained=True)``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.model.state_dict().items()}
    save_file(state, out / WEIGHTS_FILE, metadata={"architecture": backbone.arch})
    input_size = [3, *backbone.img_size]
    config = {"architecture": backbone.arch, "model_args": backbone.timm_kwargs,
              "pretrained_cfg": {"num_classes": 0, "input_size": input_size}}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return out / WEIGHTS_FILE


def export_clip(clip: CLIP, tokenizer, out_dir: str | Path) -> Path:
    """The text tower via ``save_pretrained``, the tokenizer (``save_pretrained`` for a
    transformers one; the byte tokenizer is described by its context length alone) and the
    image projection with the logit scale, so zero-shot classification needs nothing else."""
    out = Path(out_dir)
    clip.text_tower.model.save_pretrained(out)
    if isinstance(tokenizer, ByteTokenizer):
        name = "byte"
    else:
        tokenizer.tokenizer.save_pretrained(out)
        name = "."
    spec = {"tokenizer": name, "context_length": tokenizer.context_length}
    (out / TOKENIZER_FILE).write_text(json.dumps(spec, indent=2))
    save_file({"image_proj.weight": clip.image_proj.weight.detach().cpu().contiguous(),
               "logit_scale": clip.logit_scale.detach().cpu().contiguous()},
              out / IMAGE_PROJECTION_FILE)
    return out


def export_model(model: TrainedModel, out_dir: str | Path) -> Path:
    """The backbone, plus ``clip/`` when the model has a clip head; returns the folder.
    The weight files get the permissions the umask gives any new file (the safetensors writer
    makes them private), since teams share run folders."""
    out = Path(out_dir)
    try:
        export_backbone(model.backbone, out)
        if model.clip is not None:
            export_clip(model.clip, model.tokenizer, out / CLIP_DIR)
        mode = 0o666 & ~current_umask()
        for weights in out.rglob("*.safetensors"):
            weights.chmod(mode)
    except OSError as err:
        raise M3IError(f"cannot write the exported model to {out}: "
                       f"{err.strerror or err}; choose a folder you can write") from None
    return out


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_exported(folder: str | Path) -> TrainedModel:
    """Read a folder written by :func:`export_model` back, on the CPU."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise ConfigError(f"backbone_dir={folder} holds no {CONFIG_FILE} and {WEIGHTS_FILE}: "
                          "give a folder written by the export, e.g. <run folder>/backbone")
    config = json.loads((folder / CONFIG_FILE).read_text())
    # ConvNeXt / ResNet take no img_size: the training size is the pretrained_cfg's input size
    img_size = tuple(config["pretrained_cfg"]["input_size"][1:])
    backbone = Backbone(config["architecture"], **{"img_size": img_size, **config["model_args"]})
    backbone.model.load_state_dict(read_weights(folder / WEIGHTS_FILE))
    clip_dir = folder / CLIP_DIR
    if not clip_dir.is_dir():
        return TrainedModel(backbone)
    spec = json.loads((clip_dir / TOKENIZER_FILE).read_text())
    name = "byte" if spec["tokenizer"] == "byte" else str(clip_dir / spec["tokenizer"])
    tokenizer = build_tokenizer(name, spec["context_length"])
    clip = CLIP(tokenizer, text_pretrained=str(clip_dir), embed_dim=backbone.embed_dim,
                grid_size=backbone.grid_size, patch_size=backbone.patch_size)
    result = clip.load_state_dict(read_weights(clip_dir / IMAGE_PROJECTION_FILE), strict=False)
    if result.unexpected_keys:
        raise M3IError(f"{clip_dir / IMAGE_PROJECTION_FILE}: unexpected {result.unexpected_keys}")
    return TrainedModel(backbone, clip, tokenizer)


def read_weights(path: Path) -> dict:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"{path} cannot be read as safetensors (truncated?): {err}") from None
