"""The examples in the public docstrings (the objectives, Backbone, MultiObjective, the losses,
the data modules, the model card) run and print what they show."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import m3i_lightning.objectives

OBJECTIVE_MODULES = [f"m3i_lightning.objectives.{info.name}"
                     for info in pkgutil.iter_modules(m3i_lightning.objectives.__path__)]
MODULES = ["m3i_lightning.components.losses", "m3i_lightning.backbone.base",
           "m3i_lightning.engine.module", "m3i_lightning.data.embedded",
           "m3i_lightning.config.model_card", "m3i_lightning.engine.interplay",
           *OBJECTIVE_MODULES]
WITH_EXAMPLES = {"m3i_lightning.components.losses", "m3i_lightning.backbone.base",
                 "m3i_lightning.engine.interplay",
                 "m3i_lightning.engine.module", "m3i_lightning.data.embedded",
                 "m3i_lightning.objectives.mim_feat", "m3i_lightning.objectives.inst_disc"}


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name),
                             optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} example(s) of {name} failed (printed above)"
    if name in WITH_EXAMPLES:
        assert result.attempted > 0, name
