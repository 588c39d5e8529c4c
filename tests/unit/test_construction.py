"""Explicit construction: ``Backbone.create`` builds each family's own class (as does the
user's ``Backbone(arch)``), which pickles and deep-copies whole; the engine's step methods are
found by their mark, not by their names."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from helpers import TINY_FAMILIES, TINY_VIT, tiny_multi

from m3i_lightning.backbone import (
    Backbone,
    ConvNeXtBackbone,
    ResNetBackbone,
    SwinBackbone,
    VisionTransformerBackbone,
)
from m3i_lightning.engine import sharding
from m3i_lightning.engine.module import MultiObjective

FAMILIES = {"vit": (VisionTransformerBackbone, TINY_VIT),
            "convnext": (ConvNeXtBackbone, TINY_FAMILIES["convnext"]),
            "swin": (SwinBackbone, TINY_FAMILIES["swin"]),
            "resnet": (ResNetBackbone, TINY_FAMILIES["resnet"])}


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_is_created_by_its_class_and_pickles_and_deep_copies(family):
    cls, options = FAMILIES[family]
    options = dict(options)
    arch = options.pop("arch")
    torch.manual_seed(0)
    created = Backbone.create(arch, **options).eval()
    torch.manual_seed(0)
    called = Backbone(arch, **options).eval()
    images = torch.randn(2, 3, *created.img_size)
    with torch.no_grad():
        expected = created(images).global_feature
        assert torch.equal(called(images).global_feature, expected)
    for clone in (pickle.loads(pickle.dumps(created)), copy.deepcopy(created)):
        assert type(clone) is type(called) is cls
        assert (clone.arch, clone.grid_size, clone.timm_kwargs) == (arch, created.grid_size,
                                                                   created.timm_kwargs)
        with torch.no_grad():
            assert torch.equal(clone(images).global_feature, expected)


def test_create_on_a_family_class_refuses_another_family():
    options = dict(TINY_FAMILIES["resnet"])
    arch = options.pop("arch")
    assert type(ResNetBackbone.create(arch, **options)) is ResNetBackbone
    with pytest.raises(ValueError, match="resnet family, not a VisionTransformerBackbone"):
        VisionTransformerBackbone.create(arch, **options)


def test_step_methods_are_the_lightning_steps_and_the_marked_ones_whatever_their_names(
        tokenizer):
    class Renamed(MultiObjective):
        """``objective_pictures`` under another name, and one more marked method."""

        @sharding.step_method
        def drawings(self, batch):
            return self.objective_pictures(batch)

    model = tiny_multi(tokenizer, ["cls"])
    assert sorted(sharding.step_methods(model)) == ["global_features", "interplay_terms",
                                                    "objective_pictures", "training_step",
                                                    "validation_step"]
    renamed = Renamed(model.backbone, dict(model.heads))
    assert sorted(sharding.step_methods(renamed)) == ["drawings", "global_features",
                                                      "interplay_terms", "objective_pictures",
                                                      "training_step", "validation_step"]
