"""Validation speaks the caller's language: the engine and the objectives name Python
parameters, and the config layer re-words the same error into the key paths a command line
sets (the commands' one-line errors: tests/e2e/test_errors.py)."""

from __future__ import annotations

import pytest
from helpers import compose_config, tiny_backbone, tiny_objective

from m3i_lightning.config.factory import build_model, config_spelling
from m3i_lightning.core.errors import ConfigError
from m3i_lightning.engine.module import MultiObjective
from m3i_lightning.objectives import MaskedFeature, SiameseFeature

KEYS = {"mask_ratio": "mask.ratio", "mix": "mix", "input_mode": "input",
        "MaskedFeature": "objective.mim_feat", "Backbone": "backbone"}


def test_python_options_become_key_paths_and_nothing_else_changes():
    message = ("mask_ratio=0.25 with mix=True: use input_mode='shared', "
               "MaskedFeature(predictor='linear', target_blocks=0) and Backbone(mask_token=True); "
               "Other(mix=1), mix_ratio=3, a.mix=2 and mask_ratio stay")
    spelled = ("mask.ratio=0.25 with mix=true: use input=shared, "
               "objective.mim_feat.predictor=linear objective.mim_feat.target_blocks=0 and "
               "backbone.mask_token=true; Other(mix=1), mix_ratio=3, a.mix=2 and mask_ratio stay")
    assert config_spelling(message, KEYS) == spelled
    assert config_spelling(spelled, KEYS) == spelled  # key paths are left as they are


@pytest.mark.parametrize(("engine", "overrides", "python", "command_line"), [
    (dict(mask_ratio=1.0), ["mask.ratio=1.0"], "mask_ratio=1.0 must be a number in [0, 1)",
     "mask.ratio=1.0 must be a number in [0, 1)"),
    (dict(mask="nope"), ["mask.kind=nope"], "mask='nope' must be one of",
     "mask.kind=nope must be one of"),
    (dict(mix=True, input_mode="native"), ["mix=true", "input=native"],
     "mix=True mixes two images into the one shared input: it needs input_mode='shared'",
     "mix=true mixes two images into the one shared input: it needs input=shared"),
], ids=["ratio", "kind", "mix"])
def test_one_engine_error_in_both_languages(tokenizer, engine, overrides, python, command_line):
    with pytest.raises(ConfigError) as raised:
        MultiObjective(tiny_backbone(), {"mim_feat": tiny_objective("mim_feat", tokenizer)},
                       **engine)
    assert str(raised.value).startswith(python)
    cfg = compose_config("objective=[mim_feat]", *overrides)
    with pytest.raises(ConfigError) as raised:
        build_model(cfg, num_classes=10, tokenizer=tokenizer)
    assert str(raised.value).startswith(command_line)


def test_an_objective_error_names_its_options_in_both_languages(tokenizer):
    with pytest.raises(ConfigError) as raised:
        tiny_objective("mim_feat", tokenizer, loss_tokens="all", predictor="linear")
    assert str(raised.value).endswith("it needs predictor='transformer' or "
                                      "predictor='prompting', and target_blocks=0")
    cfg = compose_config("objective=[mim_feat]", "objective.mim_feat.loss_tokens=all",
                         "objective.mim_feat.predictor=linear")
    with pytest.raises(ConfigError) as raised:
        build_model(cfg, num_classes=10, tokenizer=tokenizer)
    assert str(raised.value).startswith("objective.mim_feat.loss_tokens=all predicts ")
    assert str(raised.value).endswith(
        "it needs objective.mim_feat.predictor=transformer or "
        "objective.mim_feat.predictor=prompting, and objective.mim_feat.target_blocks=0")


def test_whether_an_objective_trains_the_global_feature_is_asked_with_its_options():
    assert not MaskedFeature.trains_global_feature()
    assert MaskedFeature.trains_global_feature(loss_tokens="all", predictor_dim=32)
    assert SiameseFeature.trains_global_feature()
    assert not SiameseFeature.trains_global_feature(class_token=False)
