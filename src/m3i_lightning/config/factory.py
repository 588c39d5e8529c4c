"""Builds the library's objects from a Hydra/OmegaConf config, with clear errors for bad values.

Shared by the training command, evaluation and export, so a checkpoint's saved config
re-creates exactly the modules it was trained with.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from m3i_lightning.backbone import Backbone, family_of
from m3i_lightning.components.optim import OptimConfig
from m3i_lightning.components.text import build_tokenizer
from m3i_lightning.config.artifacts import load_encoder
from m3i_lightning.config.schema import accepted_options, unknown_keys
from m3i_lightning.core.errors import ConfigError, check_options
from m3i_lightning.data import DATA_MODULES
from m3i_lightning.engine.module import MultiObjective
from m3i_lightning.engine.teacher import FrozenTeacher
from m3i_lightning.objectives import OBJECTIVES, Objective

log = logging.getLogger(__name__)


def _plain(cfg: Any) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


# An option as a Python caller names it in a message: ``Owner(option=value, ...)`` (another
# object's constructor call) or ``option=value`` (a parameter of the callee itself).
_OPTION = r"(\w+)=('[^']*'|\[[^\]]*\]|[^\s,;:()\[\]]+)"
_SPELLED = re.compile(rf"(?<![\w.])(?:(\w+)\(((?:{_OPTION}(?:, )?)+)\)|{_OPTION})")
_CONFIG_VALUES = {"True": "true", "False": "false", "None": "null"}


def config_spelling(message: str, keys: Mapping[str, str]) -> str:
    """``message`` with each option a Python caller names written as the command line sets it:
    ``keys`` maps a parameter (``mask_ratio``) to its key path (``mask.ratio``) and a class
    (``MaskedFeature``) to the path of its options (``objective.mim_feat``), so that
    ``mask_ratio=1.0`` reads ``mask.ratio=1.0`` and ``MaskedFeature(target_blocks=3)`` reads
    ``objective.mim_feat.target_blocks=3``; values lose their quotes (``True``: ``true``)."""

    def value(text: str) -> str:
        return _CONFIG_VALUES.get(text, text.strip("'"))

    def respell(match: re.Match) -> str:
        owner, options, name = match[1], match[2], match[5]
        if owner is not None and owner in keys:
            return " ".join(f"{keys[owner]}.{option}={value(given)}"
                            for option, given in re.findall(_OPTION, options))
        if name is not None and name in keys:
            return f"{keys[name]}={value(match[6])}"
        return match[0]

    return _SPELLED.sub(respell, message)


@contextmanager
def config_errors(keys: Mapping[str, str]) -> Iterator[None]:
    """A :class:`ConfigError` raised inside, re-worded into the config's key paths
    (:func:`config_spelling`)."""
    try:
        yield
    except ConfigError as err:
        raise type(err)(config_spelling(str(err), keys)) from None


def call_checked(factory, what: str, options: Mapping, context: Mapping, path: str):
    """Call ``factory(**options, **context)`` after checking every option is a parameter, so a
    typo in the config names itself instead of failing deep inside a constructor; its errors
    name the options by their key paths under ``path`` (:func:`config_errors`). An option left
    null takes the context's value when there is one (e.g. ``target_dim``)."""
    accepted = accepted_options(factory)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise unknown_keys([f"{path}.{option}" for option in unknown],
                           [f"{path}.{option}" for option in accepted - set(context)], path)
    given = {k: v for k, v in options.items() if not (k in context and v is None)}
    extra = {k: v for k, v in context.items() if k in accepted and k not in given}
    keys = {option: f"{path}.{option}" for option in accepted - set(extra)}
    with config_errors({**keys, factory.__name__: path}):
        try:
            return factory(**given, **extra)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"{what}: {err}") from None


def student_backbone(cfg: DictConfig) -> Backbone:
    """The student of a run, as training, evaluation and export all rebuild it from the run's
    config. Its global feature is the one the objectives train, and so the one evaluation and
    export read. Two runs train no class token, so their backbone pools by the mean of the
    normalised patch tokens (timm ``global_pool='avg', fc_norm=False``): M3I's mix, which pools
    each image over its own tokens, and a run whose objectives all read tokens only (masked
    modelling, as BEiT and data2vec probe the mean of the patch tokens). Local crops
    (multi-crop) are encoded at their own size, with position embeddings resampled to it (timm
    ``dynamic_img_size``)."""
    options = _plain(cfg.backbone)
    family = family_of(options["arch"])
    if pools_tokens(cfg):
        options.update(global_pool="avg", fc_norm=False)  # other families already pool by mean
    if local_crop_count(cfg) and family.timm_takes_img_size:
        options["dynamic_img_size"] = True  # ViT, Swin; a ConvNeXt takes any size as it is
    return build_backbone(options)


def pools_tokens(cfg: DictConfig) -> bool:
    """Whether the run's ViT, which reads its class token by default, is made to pool the mean
    of its patch tokens instead (see :func:`student_backbone`)."""
    return bool((cfg.get("mix") or not trains_class_token(cfg))
                and family_of(cfg.backbone.arch).family == "vit"
                and cfg.backbone.get("global_pool", "token") == "token")


def global_feature(cfg: DictConfig) -> str:
    """What the run's global feature is, as evaluation reads it: ``class token`` or
    ``mean-pooled`` (a non-ViT family's pooling, or a ViT's ``global_pool`` option otherwise)."""
    if family_of(cfg.backbone.arch).family != "vit":
        return "mean-pooled"
    pool = "avg" if pools_tokens(cfg) else cfg.backbone.get("global_pool", "token")
    return {"token": "class token", "avg": "mean-pooled"}.get(pool, f"global_pool={pool}")


def trains_class_token(cfg: DictConfig) -> bool:
    """Whether an objective of the run, with the options it will be built with, reads the
    global feature (an unknown name counts as one: building the objectives reports it)."""
    sizes = _plain(cfg.get("heads") or {})
    for name, options in _plain(cfg.get("objective") or {}).items():
        if name not in OBJECTIVES:
            return True
        options = given_options(options, sizes.get(name))
        if objective_class(name, options).trains_global_feature(**options):
            return True
    return False


def local_crop_count(cfg: DictConfig) -> int:
    """Local crops per sample of the run's data (0 for a config without ``data.local_crops``,
    such as one written before multi-crop)."""
    return int(((cfg.get("data") or {}).get("local_crops") or {}).get("count", 0))


def build_backbone(cfg: Mapping) -> Backbone:
    options = _plain(cfg)
    arch = options.pop("arch")
    try:
        return Backbone.create(arch, **options)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"backbone '{arch}' with {options}: {err}") from None


def build_tokenizer_from(cfg: Mapping):
    text = _plain(cfg)
    try:
        return build_tokenizer(text["tokenizer"], text["context_length"])
    except OSError as err:
        raise ConfigError(f"tokenizer '{text['tokenizer']}' could not be loaded: {err}") from None


def objective_class(name: str, options: dict) -> type[Objective]:
    """The class of objective ``name``; for a family (``inst_disc``) the variant that
    ``options`` names, which is taken out of them."""
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective '{name}'; choose from {sorted(OBJECTIVES)}")
    family = OBJECTIVES[name]
    if not family.variants:
        return family
    variant = options.pop("variant", None) or family.default_variant
    if variant not in family.variants:
        raise ConfigError(f"objective '{name}': unknown variant '{variant}'; choose one of "
                          f"{sorted(family.variants)}")
    return family.variants[variant]


def given_options(options: Mapping | None, sizes: Mapping | None) -> dict:
    """An objective's options as it is built with them: the scale's head sizes, then every
    option the config sets (a null one leaves the class default)."""
    return {**(sizes or {}), **{k: v for k, v in (options or {}).items() if v is not None}}


def check_weight(name: str, weight) -> None:
    """Refuse a weight that is no number, or negative (gradient ascent on the term), and warn
    on 0: the head is then built and its loss logged, but it trains nothing."""
    valid = (isinstance(weight, int | float) and not isinstance(weight, bool)
             and math.isfinite(weight))
    if not valid or weight < 0:
        raise ConfigError(f"objective.{name}.weight={weight} must be a number >= 0")
    if weight == 0:
        log.warning("objective.%s.weight=0: its loss is logged but trains nothing; leave %s out "
                    "of objective=[...] to skip it", name, name)


def build_objectives(cfg: Mapping, context: Mapping,
                     sizes: Mapping | None = None) -> dict[str, Objective]:
    """The selected objectives (``cfg``: name → options). An option left null takes the class
    default, the reference method's value, unless the scale (``sizes``: name → head sizes,
    ``cfg.heads``, see conf/scale/) gives one; an option set in ``cfg`` wins over both."""
    selected = _plain(cfg)
    if not selected:
        raise ConfigError(f"no objective selected; choose from {sorted(OBJECTIVES)}")
    sizes = _plain(sizes or {})
    objectives = {}
    for name, options in selected.items():
        options = given_options(options, sizes.get(name))
        check_weight(name, options.get("weight", 1.0))
        factory = objective_class(name, options)
        objectives[name] = call_checked(factory, f"objective '{name}'", options, context,
                                        f"objective.{name}")
    return objectives


def objective_context(backbone: Backbone, num_classes: int, tokenizer,
                      teacher: FrozenTeacher | None = None) -> dict:
    """What the factory passes to every objective that takes it: the backbone's sizes, the
    data's class count, the tokenizer, and a frozen teacher's width (``target_dim``)."""
    context = {"embed_dim": backbone.embed_dim, "grid_size": backbone.grid_size,
               "patch_size": backbone.patch_size, "num_classes": num_classes,
               "tokenizer": tokenizer}
    if teacher is not None:
        context["target_dim"] = teacher.embed_dim
    return context


def build_datamodule(cfg: Mapping, tokenizer, fields: set[str] | None = None,
                     batch_size: int | None = None, train_view=None):
    """The data module named by ``module`` (or ``name``, when ``name`` is not the dataset's own
    option, as it is for ``data=hf``); every other key is a constructor option. ``batch_size``:
    the per-process share of a global batch, in place of ``data.batch_size``; ``fields`` and
    ``train_view``: see :class:`~m3i_lightning.data.module.ViewDataModule`."""
    options = _plain(cfg)
    name = options.pop("module") if "module" in options else options.pop("name")
    if name not in DATA_MODULES:
        raise ConfigError(f"unknown data '{name}'; choose from {sorted(DATA_MODULES)}")
    if batch_size is not None:
        options["batch_size"] = batch_size
    return call_checked(DATA_MODULES[name], f"data '{name}'", options,
                        {"tokenizer": tokenizer, "fields": fields, "train_view": train_view},
                        "data")


def build_teacher(cfg: DictConfig) -> FrozenTeacher | None:
    """``teacher.kind=frozen``: fixed weights from ``teacher.checkpoint``, with the student's
    architecture unless ``teacher.arch`` (and ``teacher.model_args``) name another. None for
    ``ema``: the engine then builds the EMA of the backbone."""
    teacher = _plain(cfg.teacher)
    kind = teacher.get("kind", "ema")
    if kind == "ema":
        if teacher.get("project"):
            raise ConfigError("teacher.project=true maps a frozen network's tokens through its "
                              "image projection: it needs teacher.kind=frozen")
        return None
    if kind != "frozen":
        raise ConfigError(f"unknown teacher kind '{kind}'; choose ema or frozen")
    if not teacher.get("checkpoint"):
        raise ConfigError("teacher.kind=frozen needs teacher.checkpoint=<local weights file>")
    if teacher.get("arch"):
        arch, model_args = teacher["arch"], teacher.get("model_args") or {}
    else:
        model_args = _plain(cfg.backbone)
        arch = model_args.pop("arch")
    try:
        encoder = load_encoder(arch, teacher["checkpoint"], **model_args)
        return FrozenTeacher(encoder, teacher["momentum"], teacher["final_momentum"],
                             teacher.get("project", False))
    except (ValueError, TypeError) as err:
        raise ConfigError(f"frozen teacher '{arch}': {err}") from None


def run_seed(cfg: DictConfig) -> int:
    """``seed``, refused in one line unless an integer that every generator takes."""
    check_options({"seed": (cfg.seed, lambda v: type(v) is int and 0 <= v < 2**32,
                            "an integer in [0, 2**32)")})
    return cfg.seed


def finite_check_interval(cfg: DictConfig) -> int:
    """``check_finite_every: auto``: every step on CPU, where reading the loss costs nothing;
    on a GPU, every ``trainer.log_every_n_steps`` steps, when Lightning reads it anyway, so the
    check adds no stall of its own (a bad step is then caught within that many steps)."""
    value = cfg.check_finite_every
    if value != "auto":
        return int(value)
    return cfg.trainer.log_every_n_steps if torch.cuda.is_available() else 1


# Where each engine parameter is set in the config: build_model reads them there (the last two
# derived from their keys; a key absent or null leaves the engine's default), and the engine's
# errors are re-worded with them.
ENGINE_KEYS = {"input_mode": "input", "mask": "mask.kind", "mask_ratio": "mask.ratio",
               "teacher_momentum": "teacher.momentum",
               "teacher_final_momentum": "teacher.final_momentum", "mix": "mix",
               "activation_checkpointing": "activation_checkpointing", "compile": "compile",
               "local_crops": "data.local_crops.count",
               "check_finite_every": "check_finite_every", "weighting": "weighting"}
# The objects beside the engine whose options its errors name, by their keys' paths.
BUILT_KEYS = {"Backbone": "backbone", "FrozenTeacher": "teacher"}


def engine_keys(objectives: Mapping[str, Objective]) -> dict[str, str]:
    """What the engine's errors name, by key path: its parameters, the backbone's and the
    teacher's options, and each objective's (``objective.<name>``)."""
    heads = {type(objective).__name__: f"objective.{name}"
             for name, objective in objectives.items()}
    return {**ENGINE_KEYS, **BUILT_KEYS, **heads}


def build_model(cfg: DictConfig, num_classes: int, tokenizer) -> MultiObjective:
    """The backbone and the selected objectives as one MultiObjective."""
    backbone = student_backbone(cfg)
    teacher = build_teacher(cfg)
    objectives = build_objectives(cfg.objective,
                                  objective_context(backbone, num_classes, tokenizer, teacher),
                                  cfg.get("heads"))
    engine = {param: OmegaConf.select(cfg, key) for param, key in ENGINE_KEYS.items()}
    engine = {param: value for param, value in engine.items() if value is not None}
    engine.update(local_crops=local_crop_count(cfg),
                  check_finite_every=finite_check_interval(cfg))
    optim = call_checked(OptimConfig, "optim", _plain(cfg.optim), {}, "optim")
    with config_errors(engine_keys(objectives)):
        return MultiObjective(backbone, objectives, teacher=teacher, optim=optim, **engine)


def check_run_data(model: MultiObjective, datamodule, cfg: DictConfig) -> None:
    """The model's checks of its data (:meth:`MultiObjective.check_data` and
    ``check_batch_size``) before any Trainer exists, in the config's words."""
    keys = {} if cfg.get("global_batch_size") else {"batch_size": "data.batch_size"}
    with config_errors(keys):
        model.check_data(datamodule.provides)
        model.check_batch_size(datamodule.batch_size)
