"""Weights on disk: the exported model folder, written at the end of training or by
``python -m m3i_lightning.export checkpoint=PATH out=DIR`` and read back by the eval command,
and the encoder weights of a frozen teacher.

    DIR/model.safetensors, DIR/config.json   the backbone, loadable by timm alone
    DIR/image_text.json                      only for models trained with an image-text
                                             objective: its config name (e.g. clip)
    DIR/<name>/                              that head's text side (``save_text_side``); clip's:
        config.json, model.safetensors        the text tower (transformers save_pretrained)
        m3i_tokenizer.json (+ tokenizer files) how to rebuild the tokenizer
        image_projection.safetensors          image side of the joint space, and logit scale
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from m3i_lightning.backbone import Backbone
from m3i_lightning.core.errors import ConfigError, M3IError
from m3i_lightning.evaluation.protocols import TrainedModel
from m3i_lightning.objectives import OBJECTIVES
from m3i_lightning.objectives.capabilities import ImageText, image_text_objectives
from m3i_lightning.runtime.checkpointing import read_checkpoint

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
IMAGE_TEXT_FILE = "image_text.json"  # which objective's text side the folder holds


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


def export_image_text(head: ImageText, out_dir: str | Path) -> Path:
    """The head's text side in ``out_dir/<its config name>`` and that name (with its variant,
    for a family) in ``image_text.json``, so :func:`load_exported` rebuilds the same class.
    Returns the sub-folder."""
    cls, out = type(head), Path(out_dir)
    record = {"objective": cls.name}
    if "variant" in vars(cls):
        record["variant"] = cls.variant
    head.save_text_side(out / cls.name)
    (out / IMAGE_TEXT_FILE).write_text(json.dumps(record, indent=2))
    return out / cls.name


def export_model(model: TrainedModel, out_dir: str | Path) -> Path:
    """The backbone, plus the image-text head's text side when the model has one, as the
    folder ``out_dir``; returns it. The folder is replaced as a whole: written as a new sibling,
    then renamed into place, so it never pairs one model's files with another's (an earlier
    export's text side, say), and a failed export leaves the previous folder as it was. An
    existing ``out_dir`` must be empty or an exported folder: nothing else is deleted.
    The weight files get the permissions the umask gives any new file (the safetensors writer
    makes them private), since teams share run folders."""
    out = Path(out_dir)
    target = out.resolve() if out.is_symlink() else out
    staging = None
    try:
        check_replaceable(target)
        staging = _new_sibling(target, "export")
        export_backbone(model.backbone, staging)
        if model.image_text is not None:
            export_image_text(model.image_text, staging)
        mode = staging.stat().st_mode & 0o666  # a new folder's mode is the umask's
        for weights in staging.rglob("*.safetensors"):
            weights.chmod(mode)
        _swap_in(staging, target)
    except OSError as err:
        raise M3IError(f"cannot write the exported model to {out}: "
                       f"{err.strerror or err}; choose a folder you can write") from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return out


def check_replaceable(out: Path) -> None:
    """``out`` may be replaced by an export: absent, an empty folder or an exported one."""
    if out.exists() and not out.is_dir():
        raise M3IError(f"cannot write the exported model to {out}: it is a file; give a "
                       "folder")
    if out.is_dir():
        entries = sorted(p.name for p in out.iterdir())
        if entries and not {CONFIG_FILE, WEIGHTS_FILE} <= set(entries):
            raise M3IError(f"cannot write the exported model to {out}: it holds files of "
                           f"something else ({', '.join(entries[:3])}), which the export "
                           "would replace; give a new or empty folder, or an exported one")


def _new_sibling(out: Path, kind: str) -> Path:
    """A new, hidden folder beside ``out`` (same filesystem, so a rename moves it), made
    like any folder: with the umask's permissions."""
    out.parent.mkdir(parents=True, exist_ok=True)
    while True:
        folder = out.with_name(f".{out.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue


def _swap_in(staging: Path, out: Path) -> None:
    """Rename ``staging`` to ``out``: in one step when ``out`` is absent or empty, else the old
    folder moves aside first (readers see the old folder or the new one, for an instant
    none, never a mix) and is removed once the new one is in place."""
    try:
        os.rename(staging, out)
        return
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    old = _new_sibling(out, "replaced")
    os.rename(out, old)
    try:
        os.rename(staging, out)
    except OSError:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def load_exported(folder: str | Path) -> TrainedModel:
    """Read a folder written by :func:`export_model` back, on the CPU."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise ConfigError(f"backbone_dir={folder} holds no {CONFIG_FILE} and {WEIGHTS_FILE}: "
                          "give a folder written by the export, e.g. <run folder>/backbone")
    backbone = exported_backbone(folder)
    return TrainedModel(backbone, load_image_text(folder, backbone))


def exported_backbone(folder: Path) -> Backbone:
    """The network ``config.json`` describes, holding ``model.safetensors``; a folder whose
    two files disagree (edited, or copied from two exports) is one :class:`ConfigError`
    naming both, not timm's ``TypeError`` or a list of size mismatches."""
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
        arch, model_args = config["architecture"], config["model_args"]
        # ConvNeXt / ResNet take no img_size: the training size is the pretrained_cfg's
        img_size = tuple(config["pretrained_cfg"]["input_size"][1:])
        described = f"{arch}({', '.join(f'{k}={v}' for k, v in sorted(model_args.items()))})"
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        raise ConfigError(f"{folder / CONFIG_FILE} is not an export's config ({type(err).__name__}"
                          f": {err}); export the checkpoint again") from None
    try:
        backbone = Backbone.create(arch, **{"img_size": img_size, **model_args})
    except (TypeError, ValueError, RuntimeError, AssertionError) as err:
        raise ConfigError(f"{folder / CONFIG_FILE} describes {described}, which timm cannot "
                          f"build ({str(err).splitlines()[0]}); export the checkpoint "
                          "again") from None
    weights = read_weights(folder / WEIGHTS_FILE)
    try:
        backbone.model.load_state_dict(weights)
    except RuntimeError:
        wanted = backbone.model.state_dict()
        stray = sorted(wanted.keys() ^ weights.keys()) or sorted(
            k for k in wanted if wanted[k].shape != weights[k].shape)
        raise ConfigError(f"{folder}: {WEIGHTS_FILE} does not hold the network {CONFIG_FILE} "
                          f"describes, {described} ({len(stray)} weights differ, e.g. "
                          f"{stray[0]}); the two files come from different models: export the "
                          "checkpoint again") from None
    return backbone


def load_image_text(folder: Path, backbone: Backbone) -> ImageText | None:
    """The image-text head whose text side ``folder`` holds (None without one), rebuilt by its
    class, for ``backbone``. A folder exported before ``image_text.json`` names the objective
    by its sub-folder alone."""
    record_file = folder / IMAGE_TEXT_FILE
    if record_file.is_file():
        record = json.loads(record_file.read_text())
    else:
        found = [name for name in image_text_objectives() if (folder / name).is_dir()]
        if not found:
            return None
        record = {"objective": found[0]}
    name = record["objective"]
    if name not in OBJECTIVES:
        raise ConfigError(f"{folder} holds the text side of objective '{name}', which is not "
                          "registered; import the module defining it (registered: "
                          f"{sorted(OBJECTIVES)})")
    cls = OBJECTIVES[name]
    cls = cls.variants[record["variant"]] if "variant" in record else cls
    try:
        return cls.load_text_side(folder / name, embed_dim=backbone.embed_dim,
                                  grid_size=backbone.grid_size, patch_size=backbone.patch_size)
    except (OSError, ValueError, SafetensorError) as err:
        raise ConfigError(f"{folder / name}: cannot rebuild the '{name}' head's text side "
                          f"({err}); export the checkpoint again") from None


def read_weights(path: Path) -> dict:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"{path} cannot be read as safetensors (truncated?): {err}") from None


CHECKPOINT_PREFIXES = ("backbone.model.", "module.")


def load_encoder(arch: str, checkpoint: str | Path, **timm_kwargs) -> Backbone:
    """The backbone of ``arch`` (:meth:`Backbone.create` with ``timm_kwargs``) with the weights
    of a local checkpoint: a frozen teacher's encoder.

    Accepted: a ``.safetensors`` file or a torch file (``.pth``, ``.pt``, ``.ckpt``) holding
    timm keys (this library's export, timm hub files), a Lightning checkpoint of this library
    (its student backbone is taken), a ``{'model': ...}`` wrapper (MAE, DeiT), or any layout
    the family's timm converter knows (OpenAI / open_clip CLIP, DINOv2, original ConvNeXt and
    Swin releases); ViT position embeddings are resampled to the backbone's grid. Every weight
    of the network must be found (else ValueError); extra entries (decoders, heads) are ignored.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise ValueError(f"teacher checkpoint '{path}' is not a file")
    backbone = Backbone.create(arch, **timm_kwargs)
    if path.suffix == ".safetensors":
        state = read_weights(path)
    else:
        state = read_checkpoint(path, "teacher.checkpoint")
    for wrapper in ("state_dict", "model"):
        state = state.get(wrapper, state)
    for prefix in CHECKPOINT_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            break
    state = backbone.filter_checkpoint(state)
    missing, _ = backbone.model.load_state_dict(state, strict=False)
    if missing:
        raise ValueError(f"teacher checkpoint '{path}' lacks {len(missing)} weight(s) of "
                         f"'{backbone.arch}', e.g. {missing[:3]}")
    return backbone
