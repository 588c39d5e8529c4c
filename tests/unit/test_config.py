"""Every hyper-parameter in one place: each key of every YAML under conf/ is an option the code
accepts, the CLI's defaults equal the classes' where they overlap, and recipes and the CPU
scale compose as documented."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import lightning as L
import pytest
import timm
import yaml
from helpers import CONF_DIR, compose_config
from omegaconf import OmegaConf

from m3i_lightning.backbone import family_of
from m3i_lightning.components.optim import OptimConfig
from m3i_lightning.config.factory import accepted_options
from m3i_lightning.data import DATA_MODULES
from m3i_lightning.engine.module import Engine
from m3i_lightning.objectives import OBJECTIVES
from m3i_lightning.runtime.strategies import STRATEGIES

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
CPU_RECIPES = sorted(f"cpu/{p.stem}" for p in (CONF_DIR / "experiment" / "cpu").glob("*.yaml"))


def load(path: Path) -> dict:
    node = yaml.safe_load(path.read_text()) or {}
    node.pop("defaults", None)
    return node


def objective_options(name: str) -> set[str]:
    """What ``objective.<name>`` may hold: its weight, a family's variant, and every option of
    its class (of any of a family's variants)."""
    family = OBJECTIVES[name]
    classes = list(family.variants.values()) or [family]
    options = set().union(*(accepted_options(c) for c in classes))
    return options | ({"variant"} if family.variants else set())


def engine_defaults() -> dict:
    return {k: p.default for k, p in inspect.signature(Engine.build_engine).parameters.items()
            if p.default is not inspect.Parameter.empty}


@pytest.mark.parametrize("path", sorted((CONF_DIR / "objective").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_objective_yaml_keys_are_options_and_leave_values_to_the_class(path):
    node = load(path)
    assert set(node) <= objective_options(path.stem), path
    # values live in the class defaults; the YAML only names the options (null) and the weight
    assert {k: v for k, v in node.items() if k not in ("weight", "variant")
            and v is not None} == {}


def test_every_objective_has_a_yaml_and_every_yaml_an_objective():
    assert {p.stem for p in (CONF_DIR / "objective").glob("*.yaml")} == set(OBJECTIVES)


@pytest.mark.parametrize("path", sorted((CONF_DIR / "backbone").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_backbone_yaml_keys_are_arguments_of_the_family_timm_class(path):
    """Every key is an argument of the timm class the architecture's family builds
    (VisionTransformer, SwinTransformer, ConvNeXt, ResNet), or one of the family's own
    (img_size, a ViT's mask_token, position_embedding, init, freeze_patch_embed)."""
    node = load(path)
    arch = node.pop("arch")
    assert arch in timm.list_models()
    family = family_of(arch)
    assert set(node) <= set(inspect.signature(family.timm_class.__init__).parameters) | (
        accepted_options(family)), family.family


@pytest.mark.parametrize("path", sorted((CONF_DIR / "data").glob("*.yaml")), ids=lambda p: p.stem)
def test_data_yaml_keys_are_data_module_options(path):
    node = load(path)
    name = node.pop("module") if "module" in node else node.pop("name")
    assert set(node) <= accepted_options(DATA_MODULES[name])


def test_optim_yaml_is_the_optimiser_config_and_its_defaults():
    node = load(CONF_DIR / "optim" / "adamw.yaml")
    defaults = {f.name: f.default for f in dataclasses.fields(OptimConfig)}
    assert set(node) == set(defaults)
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in node.items()} == defaults


def test_trainer_strategy_and_logger_yaml():
    assert set(load(CONF_DIR / "trainer" / "default.yaml")) <= set(
        inspect.signature(L.Trainer.__init__).parameters)
    assert {load(p)["name"] for p in (CONF_DIR / "strategy").glob("*.yaml")} == set(STRATEGIES)


def test_cli_engine_defaults_are_the_engines_at_reference_scale():
    """Without the CPU scale (a ViT-B), the config's engine values are the engine's defaults,
    and the CPU scale changes only what it says it changes."""
    cfg, engine = compose_config("backbone=vit_base", tiny=False), engine_defaults()
    assert dict(cfg.heads) == {}
    assert cfg.mask.kind == engine["mask"] and cfg.mask.ratio == engine["mask_ratio"]
    assert cfg.teacher.momentum == engine["teacher_momentum"]
    assert cfg.teacher.final_momentum == engine["teacher_final_momentum"]
    assert cfg.input == engine["input_mode"] and cfg.mix == engine["mix"]
    cpu = compose_config(tiny=False)
    scale = load(CONF_DIR / "scale" / "cpu.yaml")
    assert cpu.mask.ratio == scale["mask"]["ratio"] != cfg.mask.ratio
    assert cpu.optim.min_lr_ratio == scale["optim"]["min_lr_ratio"]


def test_cpu_scale_sizes_are_options_of_their_objectives():
    heads = load(CONF_DIR / "scale" / "cpu.yaml")["heads"]
    assert set(heads) <= set(OBJECTIVES)
    for name, sizes in heads.items():
        assert set(sizes) <= objective_options(name), name


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_recipe_composes_to_known_keys(experiment):
    """A recipe only sets keys the default config has, objective options the classes take,
    and reaches ViT-B by default but the CPU heads with backbone=vit_cpu."""
    base = compose_config(tiny=False)
    cfg = compose_config(f"experiment={experiment}", tiny=False)
    assert set(cfg) <= set(base)
    for section in ("optim", "data", "trainer", "mask", "teacher"):
        assert set(cfg[section]) <= set(base[section]), (experiment, section)
    for name, options in cfg.objective.items():
        assert set(options) <= objective_options(name), (experiment, name)
    assert cfg.backbone.arch == "vit_base_patch16_224" and dict(cfg.heads) == {}
    cpu = compose_config(f"experiment={experiment}", "backbone=vit_cpu", tiny=False)
    assert dict(cpu.heads) == load(CONF_DIR / "scale" / "cpu.yaml")["heads"]


def flat(node, prefix: str = "") -> dict:
    """dotted key → value of a composed config."""
    if not isinstance(node, dict):
        return {prefix: node}
    return {k: v for key, child in node.items()
            for k, v in flat(child, f"{prefix}.{key}" if prefix else key).items()}


@pytest.mark.parametrize("recipe", CPU_RECIPES)
def test_every_cpu_recipe_runs_the_cpu_budget_on_the_cpu_vit(recipe):
    """The CPU recipes (compare_objectives' rows) all train the CPU ViT with its heads, at the
    one budget of cpu/base, and set only keys the default config knows."""
    budget = load(CONF_DIR / "experiment" / "cpu" / "base.yaml")
    cfg = compose_config(f"experiment={recipe}", tiny=False)
    default = compose_config(f"objective=[{','.join(cfg.objective)}]", tiny=False)
    assert set(flat(OmegaConf.to_container(cfg))) <= set(flat(OmegaConf.to_container(default)))
    assert cfg.backbone == compose_config(tiny=False).backbone
    assert dict(cfg.heads) == load(CONF_DIR / "scale" / "cpu.yaml")["heads"]
    assert cfg.global_batch_size == budget["global_batch_size"]
    assert cfg.trainer.max_epochs == budget["trainer"]["max_epochs"]


def test_cpu_m3i_departs_from_the_m3i_recipe_only_in_its_cpu_values():
    """experiment=cpu/m3i is M3I's recipe on the CPU ViT (its objectives, shared mixed input,
    teacher and schedule) but for the budget and the two values tuned at it."""
    paper = compose_config("experiment=m3i", "backbone=vit_cpu", tiny=False)
    paper = flat(OmegaConf.to_container(paper))
    cpu = flat(OmegaConf.to_container(compose_config("experiment=cpu/m3i", tiny=False)))
    assert set(paper) == set(cpu)
    changed = {k for k in paper if paper[k] != cpu[k]}
    assert changed == {"global_batch_size", "trainer.max_epochs", "mask.ratio", "optim.lr"}
    assert cpu["input"] == "shared" and cpu["mix"] is True
