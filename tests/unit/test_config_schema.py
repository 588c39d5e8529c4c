"""The shipped YAML is the schema of the command line (#31, items 10 and 18): every option the
code reads is in it, so the documented ``key=value`` form works, and a key it lacks is one
error naming the closest known key, with or without ``+``."""

from __future__ import annotations

import re

import pytest
import yaml
from helpers import REPO

from m3i_lightning.backbone import family_of
from m3i_lightning.conf import CONF_DIR
from m3i_lightning.config.schema import accepted_options, check_command_line
from m3i_lightning.core.errors import ConfigError
from m3i_lightning.objectives import OBJECTIVES

CONTEXT = {"embed_dim", "grid_size", "patch_size", "num_classes", "tokenizer"}  # from the run
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def shipped(path) -> dict:
    node = yaml.safe_load(path.read_text()) or {}
    node.pop("defaults", None)
    return node


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_option_of_an_objective_class_is_in_its_yaml(name):
    family = OBJECTIVES[name]
    classes = [family, *family.variants.values()]
    options = set().union(*(accepted_options(c) for c in classes)) - CONTEXT
    options |= {"variant"} if family.variants else set()
    assert set(shipped(CONF_DIR / "objective" / f"{name}.yaml")) == options


def documented(prefix: str) -> set[str]:
    """Options written ``prefix.<option>`` in backticks or as ``prefix.<option>=`` in the docs."""
    pattern = re.compile(rf"(?<![\w.]){re.escape(prefix)}\.(\w+)(?=[=`|])")
    return {m for path in DOCS for m in pattern.findall(path.read_text())}


@pytest.mark.parametrize("path", sorted((CONF_DIR / "backbone").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_every_documented_backbone_option_of_the_family_is_in_its_yaml(path):
    node = shipped(path)
    options = accepted_options(family_of(node["arch"])) - {"arch", "img_size"}
    wanted = documented("backbone") & options
    assert wanted <= set(node), sorted(wanted - set(node))


def test_the_docs_name_the_backbone_options_the_test_guards():
    assert {"mask_token", "position_embedding", "init", "no_embed_class",
            "freeze_patch_embed"} <= documented("backbone")


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_documented_objective_option_is_in_its_yaml(name):
    assert documented(f"objective.{name}") <= set(shipped(CONF_DIR / "objective" / f"{name}.yaml"))


UNKNOWN = {  # (config, override): what the one error line names
    ("config", "+checkpoint.every_n_step=5"): "did you mean checkpoint.every_n_steps?",
    ("config", "+mask.rattio=0.9"): "did you mean mask.ratio?",
    ("config", "+knn.kk=3"): "did you mean knn.k?",
    ("config", "+foo=1"): "unknown key foo; the keys at the top level: activation_checkpointing",
    ("config", "objective.mim_feat.nope=1"): "unknown key objective.mim_feat.nope",
    ("config", "+objective.cls.label_smothing=0.1"): "did you mean objective.cls.label_smoothing",
    ("config", "+trainer.limit_val_bathces=0"): "did you mean trainer.limit_val_batches?",
    ("config", "data.local_crops={count:2,sise:3}"): "did you mean data.local_crops.size?",
    ("config", "trainer.limit_val_batches=0"): "add it with +trainer.limit_val_batches=0",
    ("config", "+seed=3"): "seed is already in the config; set it without the +",
    ("eval", "+knn.kk=3"): "did you mean knn.k?",
    ("finetune", "finetune.lrr=3"): "did you mean finetune.lr?",
}


@pytest.mark.parametrize("config, override", list(UNKNOWN))
def test_a_key_the_config_lacks_is_one_error_naming_the_closest(config, override):
    with pytest.raises(ConfigError) as err:
        check_command_line(config, [override])
    assert UNKNOWN[config, override] in str(err.value)
    assert "\n" not in str(err.value)


KNOWN = [  # documented forms, and keys a reader accepts beyond the YAML
    ["backbone.mask_token=true", "backbone.position_embedding=sincos", "backbone.init=mae",
     "backbone.no_embed_class=true", "backbone.freeze_patch_embed=true"],
    ["objective=[global_distill]", "objective.global_distill.multi_crop=true",
     "objective.global_distill.warmup_teacher_temp=0.04",
     "objective.global_distill.freeze_last_layer=1"],
    ["+trainer.limit_val_batches=0", "+backbone.qkv_bias=false",
     "++teacher.model_args.embed_dim=48", "checkpoint.every_n_steps=0"],
    ["-m", "backbone=vit_cpu,swin_cpu", "backbone.depths=[1,1]"],  # swin_cpu's key
]


@pytest.mark.parametrize("args", KNOWN, ids=lambda a: a[-1])
def test_documented_and_open_keys_pass(args):
    check_command_line("config", args)


def test_finetune_takes_the_trainer_summary_switch_as_documented():
    check_command_line("finetune", ["trainer.enable_model_summary=false"])


def test_the_slurm_launcher_without_its_extra_is_the_install_line(monkeypatch):
    from m3i_lightning.config import schema

    monkeypatch.setattr(schema, "installed", lambda module: False)
    with pytest.raises(ConfigError, match=r"pip install 'm3i_lightning\[cluster\]'"):
        check_command_line("config", ["-m", "hydra/launcher=slurm", "trainer.devices=8"])


def test_eval_takes_any_data_module_option_for_the_data_a_checkpoint_was_trained_on():
    check_command_line("eval", ["+data.path=/data/pets", "+data.label_column=label"])
    with pytest.raises(ConfigError, match=r"did you mean data\.path\?"):
        check_command_line("eval", ["+data.pth=/data/pets"])
