"""Builds the library's objects from a Hydra/OmegaConf config, with clear errors for bad values.

Shared by the training command, evaluation and export, so a checkpoint's saved config
re-creates exactly the modules it was trained with.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from m3i_lightning.backbone import Backbone, family_of
from m3i_lightning.components.optim import OptimConfig
from m3i_lightning.components.text import build_tokenizer
from m3i_lightning.config.artifacts import load_encoder
from m3i_lightning.core.errors import ConfigError
from m3i_lightning.data import DATA_MODULES
from m3i_lightning.engine.module import MultiObjective
from m3i_lightning.engine.teacher import FrozenTeacher
from m3i_lightning.objectives import OBJECTIVES, Objective


def _plain(cfg: Any) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def accepted_options(factory) -> set[str]:
    """Keyword parameters of a class over its constructors' chain (each passes ``**kwargs``
    on): the classes of this library, and every objective class wherever it is defined."""
    chain = [k for k in factory.__mro__ if "__init__" in vars(k)
             and (k.__module__.startswith("m3i_lightning") or issubclass(k, Objective))]
    names = set().union(*(inspect.signature(k.__init__).parameters for k in chain))
    return names - {"self", "kwargs"}


def call_checked(factory, what: str, options: Mapping, context: Mapping):
    """Call ``factory(**options, **context)`` after checking every option is a parameter, so a
    typo in the config names itself instead of failing deep inside a constructor. An option
    left null takes the context's value when there is one (e.g. ``target_dim``)."""
    accepted = accepted_options(factory)
    unknown = sorted(set(options) - accepted)
    if unknown:
        valid = sorted(accepted - set(context))
        raise ConfigError(f"{what}: unknown option(s) {unknown}; valid options: {valid}")
    given = {k: v for k, v in options.items() if not (k in context and v is None)}
    extra = {k: v for k, v in context.items() if k in accepted and k not in given}
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
    if ((cfg.get("mix") or not trains_class_token(cfg)) and family.family == "vit"
            and options.get("global_pool", "token") == "token"):
        options.update(global_pool="avg", fc_norm=False)  # other families already pool by mean
    if local_crop_count(cfg) and family.timm_takes_img_size:
        options["dynamic_img_size"] = True  # ViT, Swin; a ConvNeXt takes any size as it is
    return build_backbone(options)


def trains_class_token(cfg: DictConfig) -> bool:
    """Whether an objective of the run reads the global feature (an unknown name counts as
    one: building the objectives reports it)."""
    return any(name not in OBJECTIVES
               or OBJECTIVES[name].trains_global_feature(_plain(options or {}))
               for name, options in (cfg.get("objective") or {}).items())


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
        options = {**(sizes.get(name) or {}),
                   **{k: v for k, v in (options or {}).items() if v is not None}}
        factory = objective_class(name, options)
        objectives[name] = call_checked(factory, f"objective '{name}'", options, context)
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


def build_datamodule(cfg: Mapping, tokenizer, fields: set[str] | None = None):
    """The data module named by ``module`` (or ``name``, when ``name`` is not the dataset's own
    option, as it is for ``data=hf``); every other key is a constructor option."""
    options = _plain(cfg)
    name = options.pop("module") if "module" in options else options.pop("name")
    if name not in DATA_MODULES:
        raise ConfigError(f"unknown data '{name}'; choose from {sorted(DATA_MODULES)}")
    return call_checked(DATA_MODULES[name], f"data '{name}'", options,
                        {"tokenizer": tokenizer, "fields": fields})


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


def finite_check_interval(cfg: DictConfig) -> int:
    """``check_finite_every: auto``: every step on CPU, where reading the loss costs nothing;
    on a GPU, every ``trainer.log_every_n_steps`` steps, when Lightning reads it anyway, so the
    check adds no stall of its own (a bad step is then caught within that many steps)."""
    value = cfg.check_finite_every
    if value != "auto":
        return int(value)
    return cfg.trainer.log_every_n_steps if torch.cuda.is_available() else 1


def build_model(cfg: DictConfig, num_classes: int, tokenizer) -> MultiObjective:
    """The backbone and the selected objectives as one MultiObjective."""
    backbone = student_backbone(cfg)
    teacher = build_teacher(cfg)
    objectives = build_objectives(cfg.objective,
                                  objective_context(backbone, num_classes, tokenizer, teacher),
                                  cfg.get("heads"))
    return MultiObjective(
        backbone, objectives, input_mode=cfg.input, mask=cfg.mask.kind,
        mask_ratio=cfg.mask.ratio, teacher_momentum=cfg.teacher.momentum,
        teacher_final_momentum=cfg.teacher.final_momentum, teacher=teacher,
        optim=call_checked(OptimConfig, "optim", _plain(cfg.optim), {}),
        check_finite_every=finite_check_interval(cfg), mix=cfg.mix,
        local_crops=local_crop_count(cfg),
        activation_checkpointing=cfg.activation_checkpointing, compile=cfg.compile)
