"""The Eq. 4 engine: each distinct input encoded once, routing per input mode, data checks and
named errors."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from helpers import compose_config, digits_module, tiny_backbone, tiny_multi, tiny_objective

from m3i_lightning.core.errors import ConfigError, NonFiniteLossError
from m3i_lightning.engine.module import MultiObjective
from m3i_lightning.engine.plan import Input, Reading
from m3i_lightning.objectives.base import Objective

COMPOSED = ["mim_feat", "clip", "cls"]


def record_calls(module: torch.nn.Module) -> list[tuple[tuple, dict]]:
    """Wrap ``module.forward`` to record every call's arguments."""
    calls = []
    forward = module.forward

    def counting(*args, **kwargs):
        calls.append((args, kwargs))
        return forward(*args, **kwargs)

    module.forward = counting
    return calls


def record_encoded(model: MultiObjective) -> dict[str, object]:
    """Wrap each objective's loss to remember which Encoded it was given."""
    seen = {}
    for name, head in model.heads.items():
        loss = head.loss

        def spy(batch, encoded, targets, _name=name, _loss=loss):
            seen[_name] = (encoded, targets)
            return _loss(batch, encoded, targets)

        head.loss = spy
    return seen


def is_masked(call) -> bool:
    args, kwargs = call
    return len(args) > 1 and args[1] is not None or kwargs.get("visible_index") is not None


def test_shared_mode_encodes_once(tokenizer, batch):
    model = tiny_multi(tokenizer, COMPOSED, input_mode="shared")
    student, teacher = record_calls(model.backbone), record_calls(model.teacher.encoder)
    seen = record_encoded(model)
    terms, _ = model.forward_terms(batch)
    assert set(terms) == set(COMPOSED)
    assert len(student) == 1 and is_masked(student[0])
    assert student[0][0][0] is batch["view1"]
    assert len(teacher) == 1 and not is_masked(teacher[0])
    assert teacher[0][0][0] is batch["view1"]
    # every objective read the one encoded input
    encoded = {id(enc) for enc, _ in seen.values()}
    assert len(encoded) == 1
    assert seen["mim_feat"][0].tokens.shape[1] == model.mask_generator.num_visible
    assert seen["mim_feat"][1].teacher is not None


def test_native_mode_encodes_each_distinct_input_once(tokenizer, batch):
    model = tiny_multi(tokenizer, COMPOSED, input_mode="native")
    student, teacher = record_calls(model.backbone), record_calls(model.teacher.encoder)
    seen = record_encoded(model)
    model.forward_terms(batch)
    assert len(student) == 2
    assert sorted(is_masked(c) for c in student) == [False, True]
    assert all(c[0][0] is batch["view1"] for c in student)
    assert len(teacher) == 1 and teacher[0][0][0] is batch["view1"]
    # mim_feat got the masked view, clip and cls share the full one
    assert seen["mim_feat"][0].masked_index is not None
    assert seen["clip"][0] is seen["cls"][0]
    assert seen["cls"][0].masked_index is None
    assert seen["cls"][0].tokens.shape[1] == model.backbone.num_patches


def test_no_teacher_without_a_teacher_objective(tokenizer, batch):
    model = tiny_multi(tokenizer, ["clip", "cls"])
    assert model.teacher is None and model.mask_generator is None
    student = record_calls(model.backbone)
    model.forward_terms(batch)
    assert len(student) == 1 and not is_masked(student[0])


def test_terms_are_weighted_and_summed(tokenizer, batch):
    torch.manual_seed(0)
    heads = {"cls": tiny_objective("cls", tokenizer, weight=0.5),
             "clip": tiny_objective("clip", tokenizer, weight=2.0)}
    model = MultiObjective(tiny_backbone(), heads)
    seen = record_encoded(model)
    terms, logs = model.forward_terms(batch)
    # the cls term by hand: log-softmax over the class embeddings, half weight
    logits = heads["cls"].class_embed(seen["cls"][0].global_feature)
    logp = logits - logits.logsumexp(dim=-1, keepdim=True)
    nll = -logp[torch.arange(len(batch["label"])), batch["label"]].mean()
    torch.testing.assert_close(terms["cls"], 0.5 * nll)
    assert {"cls/acc", "clip/logit_scale"} <= set(logs)
    assert logs["clip/logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    torch.manual_seed(3)
    total = model.training_step(batch, 0)
    torch.manual_seed(3)
    terms, _ = model.forward_terms(batch)
    torch.testing.assert_close(total, terms["cls"] + terms["clip"])


class ViewTwoProbe(Objective, register=False):
    """A minimal objective reading view2, for routing tests."""

    name = "probe"
    input_view = "view2"

    def loss(self, batch, encoded, targets):
        return encoded.global_feature.pow(2).mean(), {}


class InterViewProbe(ViewTwoProbe, register=False):
    name = "inter"
    target_view = "view1"


def test_routes_and_batch_fields_per_mode(tokenizer):
    torch.manual_seed(0)
    for mode in ("shared", "native"):
        model = tiny_multi(tokenizer, COMPOSED, input_mode=mode)
        assert model.batch_fields() == {"view1", "label", "text"}

    def probe_model(mode, probe):
        heads = {"cls": tiny_objective("cls", tokenizer), "probe": probe(embed_dim=32,
                                                                         grid_size=(4, 4))}
        return MultiObjective(tiny_backbone(), heads, input_mode=mode)

    def readings(model):
        return model.plan.objectives["probe"].readings

    shared = probe_model("shared", ViewTwoProbe)
    assert readings(shared) == (Reading(Input("view1", False), None),)
    assert shared.batch_fields() == {"view1", "label"}
    native = probe_model("native", ViewTwoProbe)
    assert readings(native) == (Reading(Input("view2", False), None),)
    assert native.batch_fields() == {"view1", "view2", "geometry", "label"}

    # an inter-view target: view2 → view1 natively, view1 → view2 in shared mode
    shared = probe_model("shared", InterViewProbe)
    assert readings(shared) == (Reading(Input("view1", False), "view2"),)
    native = probe_model("native", InterViewProbe)
    assert readings(native) == (Reading(Input("view2", False), "view1"),)
    for model in (shared, native):
        assert model.batch_fields() == {"view1", "view2", "geometry", "label"}

    # any masked objective masks the one shared input
    masked = tiny_multi(tokenizer, COMPOSED, input_mode="shared")
    assert {r.input.masked for p in masked.plan.objectives.values() for r in p.readings} == {True}
    native = tiny_multi(tokenizer, COMPOSED, input_mode="native")
    assert {n: p.readings[0].input.masked for n, p in native.plan.objectives.items()} == {
        "mim_feat": True, "clip": False, "cls": False}


def test_check_data_names_the_objective(tokenizer):
    model = tiny_multi(tokenizer, COMPOSED)
    model.check_data({"view1", "view2", "geometry", "label", "text"})
    with pytest.raises(ConfigError, match=r"'cls' needs \['label'\]"):
        model.check_data({"view1", "view2", "geometry", "text"})
    with pytest.raises(ConfigError, match=r"'clip' needs \['text'\]"):
        model.check_data({"view1", "view2", "geometry", "label"})


def test_fit_checks_the_data_first(tokenizer):
    """A standalone objective on data without labels fails at setup, naming itself."""
    torch.manual_seed(0)
    objective = tiny_objective("cls", tokenizer, backbone=tiny_backbone(depth=1))
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ConfigError, match="'cls' needs"):
        trainer.fit(objective, datamodule=digits_module(tokenizer, labels=False))
    assert trainer.global_step == 0


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_loss_names_the_objective(tokenizer, batch, monkeypatch, bad):
    model = tiny_multi(tokenizer, COMPOSED)
    clip = model.heads["clip"]
    real_loss = clip.loss

    def broken(batch, encoded, targets):
        loss, logs = real_loss(batch, encoded, targets)
        return loss * bad, logs

    monkeypatch.setattr(clip, "loss", broken)
    with pytest.raises(NonFiniteLossError, match=r"\['clip'\]") as err:
        model.training_step(batch, 0)
    assert "cls" not in str(err.value) and "mim_feat" not in str(err.value)
    # with the check off, the step goes through and returns the non-finite total
    model.check_finite_every = 0
    assert not torch.isfinite(model.training_step(batch, 0))


def test_objective_with_its_own_backbone_is_rejected(tokenizer):
    owner = tiny_objective("cls", tokenizer, backbone=tiny_backbone(depth=1))
    with pytest.raises(ConfigError, match="'cls' is a MultiObjective, not an objective head"):
        MultiObjective(tiny_backbone(depth=1), {"cls": owner})


def test_engine_configuration_errors(tokenizer):
    with pytest.raises(ConfigError, match="at least one"):
        MultiObjective(tiny_backbone(depth=1), {})
    with pytest.raises(ConfigError, match="sideways"):
        MultiObjective(tiny_backbone(depth=1), {"cls": tiny_objective("cls", tokenizer)},
                       input_mode="sideways")
    with pytest.raises(ConfigError, match="needs a backbone"):
        tiny_objective("cls", tokenizer, embed_dim=None)


def test_ranks_draw_their_own_masks_after_building_identical_weights():
    """All processes share one seed (identical initial weights); at fit start each rank moves
    to its own random stream, so ranks do not hide the same patches at every step."""
    from types import SimpleNamespace

    masks, weights = [], []
    for rank in (0, 1):
        torch.manual_seed(0)
        model = MultiObjective(tiny_backbone(), {"mim_feat": tiny_objective("mim_feat", None)})
        weights.append(model.backbone.model.pos_embed.detach().clone())
        model._trainer = SimpleNamespace(world_size=2, global_rank=rank)
        model.on_fit_start()
        masks.append(model.mask_generator(8, "cpu"))
    assert torch.equal(*weights)
    assert not torch.equal(*masks)


def test_finite_check_interval(monkeypatch):
    """auto: every step on CPU; on a GPU only when Lightning reads the loss for logging."""
    from omegaconf import OmegaConf

    from m3i_lightning.config.factory import finite_check_interval

    cfg = OmegaConf.create({"check_finite_every": "auto", "trainer": {"log_every_n_steps": 50}})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert finite_check_interval(cfg) == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert finite_check_interval(cfg) == 50
    cfg.check_finite_every = 7
    assert finite_check_interval(cfg) == 7


def test_standalone_objective_is_a_one_head_engine_that_pickles(tokenizer, tmp_path):
    """``Cls(backbone=b)`` is a MultiObjective with that one head: a class defined where it
    lives, which pickles, deep-copies and round-trips through torch.save."""
    import copy
    import pickle

    from m3i_lightning.engine.module import Engine
    from m3i_lightning.objectives import Classification

    head = tiny_objective("cls", tokenizer)
    alone = tiny_objective("cls", tokenizer, backbone=tiny_backbone(depth=1))
    assert type(head) is Classification and not isinstance(head, Engine)
    assert type(alone) is MultiObjective and type(alone).__module__ == "m3i_lightning.engine.module"
    assert type(alone.head) is Classification and alone.objectives() == {"cls": alone.head}
    for restored in (pickle.loads(pickle.dumps(alone)), copy.deepcopy(alone)):
        assert type(restored.head) is Classification
        assert restored.state_dict().keys() == alone.state_dict().keys()
    torch.save(alone, tmp_path / "alone.pt")
    loaded = torch.load(tmp_path / "alone.pt", weights_only=False)
    for key, value in alone.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize("ratio", [0.0, 0.01, 1.0, 1.5, -0.5])
def test_mask_ratios_that_cannot_work_are_refused_when_built(tokenizer, ratio):
    with pytest.raises(ConfigError, match=rf"^mask_ratio={ratio} "):
        tiny_multi(tokenizer, COMPOSED, mask_ratio=ratio)


def test_unknown_mask_kind_names_the_choices(tokenizer):
    with pytest.raises(ConfigError,
                       match=r"^mask='nope' must be one of \['attention', 'block', 'random'\]"):
        tiny_multi(tokenizer, COMPOSED, mask="nope")


def test_a_teacher_of_another_width_needs_heads_sized_for_it(tokenizer):
    from m3i_lightning.engine.teacher import TargetEncoder

    wide = TargetEncoder(tiny_backbone(embed_dim=48, depth=1))
    with pytest.raises(ConfigError, match=r"48 wide.*\['global_distill'\].*\[32\]"):
        MultiObjective(tiny_backbone(), {"global_distill": tiny_objective(
            "global_distill", None, out_dim=16, hidden_dim=16, bottleneck_dim=8)}, teacher=wide)
    sized = tiny_objective("mim_feat", None, target_dim=48)
    model = MultiObjective(tiny_backbone(), {"mim_feat": sized}, teacher=wide)
    assert model.teacher is wide


@pytest.mark.parametrize("name", ["clip", "inst_disc", "mim_global", "sim_global"])
def test_objectives_that_compare_samples_refuse_a_batch_of_one(tokenizer, name):
    model = tiny_multi(tokenizer, [name])
    model.check_batch_size(2)
    with pytest.raises(ConfigError, match=rf"'{name}' needs a per-process batch of at least 2 "
                       r".*got batch_size=1$"):
        model.check_batch_size(1)


FIFTEENTH = '''
"""A new row of the table: the global feature regresses the teacher's (cosine)."""
import torch.nn.functional as F

from m3i_lightning.objectives.base import Objective


class GlobalRegression(Objective):
    name = "global_regression"
    form = "Gaussian"
    target_repr = "global feature"
    target_view = "view1"
    uses_teacher = True

    def __init__(self, scale: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.scale = scale

    def loss(self, batch, encoded, targets):
        cos = F.cosine_similarity(encoded.global_feature, targets.teacher.global_feature)
        return self.scale * (1 - cos).mean(), {}
'''


def test_a_fifteenth_objective_is_one_class_file_and_one_yaml(tmp_path, monkeypatch, batch):
    """No registry is edited: defining the class registers it, its YAML selects it."""
    import importlib

    from m3i_lightning.config.factory import build_model
    from m3i_lightning.objectives import OBJECTIVES

    (tmp_path / "global_regression.py").write_text(FIFTEENTH)
    conf = tmp_path / "conf" / "objective"
    conf.mkdir(parents=True)
    (conf / "global_regression.yaml").write_text(
        "# @package objective.global_regression\nweight: 0.5\nscale: null\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(OBJECTIVES, "global_regression", raising=False)
    importlib.import_module("global_regression")
    try:
        assert "global_regression" in OBJECTIVES
        cfg = compose_config(f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
                             "objective=[global_regression,cls]")
        model = build_model(cfg, num_classes=10, tokenizer=None)
        terms, _ = model.forward_terms(batch)
        assert set(terms) == {"global_regression", "cls"} and model.teacher is not None
        assert model.heads["global_regression"].weight == 0.5
    finally:
        OBJECTIVES.pop("global_regression", None)
