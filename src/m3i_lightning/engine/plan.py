"""The engine's plan, computed once when it is built: which inputs the student encodes, which
views the teacher encodes, and what each objective reads and how its readings are reduced.

A training step only follows the plan (:meth:`m3i_lightning.engine.module.Engine.readings`),
so every routing decision of the three input modes lives here:

- ``native``: each objective reads its reference method's input; a symmetric one (MoCo v3,
  BYOL) reads both view orders and sums them, as the references do. With local crops
  (multi-crop), a ``multi_crop`` objective (DINO) reads every student crop against every
  teacher global view but its own, and one that ``reads_local_crops`` (MSN's focal views)
  adds the local crops to its input views; both average their readings.
- ``shared`` (M3I's single z_x): one input, view1, masked if any objective masks; an
  inter-view target (a view other than the objective's own input) becomes view2.
- ``shared`` with ``mix`` (M3I's multi-input): images A and B in one mixed pass; A reads the
  intra-view targets, B (the partner image of each row) the inter-view ones, and objectives
  without an image target (labels, captions) read both and average them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from m3i_lightning.core.views import GLOBAL_VIEWS

if TYPE_CHECKING:
    from m3i_lightning.objectives.base import Objective


INPUT_MODES = ("shared", "native")


@dataclass(frozen=True)
class Input:
    """One student encoding: a view, masked or whole; ``mixed`` names image A or B of the
    mixed pass, both encoded at once from view1."""

    view: str
    masked: bool
    mixed: str | None = None


@dataclass(frozen=True)
class Reading:
    """One call of an objective's loss: its encoded input and the view its target comes from.
    ``partner``: the batch as image B of the mix sees it (each row's partner image)."""

    input: Input
    target_view: str | None
    partner: bool = False


@dataclass(frozen=True)
class ObjectivePlan:
    """An objective's readings and how their losses combine: ``sum`` for the two directions
    of a symmetric loss, ``mean`` for samples of one term (M3I's images A and B)."""

    readings: tuple[Reading, ...]
    reduce: str = "mean"


@dataclass(frozen=True)
class Plan:
    objectives: Mapping[str, ObjectivePlan]
    inputs: tuple[Input, ...]  # every distinct student encoding, each computed once
    teacher_views: tuple[str, ...]
    student_views: tuple[str, ...]  # full target views the student encodes with gradients

    @property
    def mixed(self) -> bool:
        return any(i.mixed for i in self.inputs)

    @property
    def masked(self) -> bool:
        return any(i.masked for i in self.inputs)

    def fields(self, requires: Mapping[str, frozenset[str]]) -> set[str]:
        """Batch keys the data must provide, given each objective's other ``requires``."""
        fields = {i.view for i in self.inputs}
        fields |= {r.target_view for p in self.objectives.values() for r in p.readings
                   if r.target_view}
        for extra in requires.values():
            fields |= extra
        if {"view1", "view2"} <= fields:
            fields.add("geometry")
        return fields


def build_plan(objectives: Mapping[str, Objective], input_mode: str, mix: bool,
               local_views: tuple[str, ...] = ()) -> Plan:
    """The plan for ``objectives`` in ``input_mode`` (see the module doc); ``local_views``:
    the batch keys of the local crops (read in native mode only)."""
    if mix:
        plans = {name: _mixed(o) for name, o in objectives.items()}
    elif input_mode == "native":
        plans = {name: _native(o, local_views) for name, o in objectives.items()}
    else:
        masked = any(o.masked_input for o in objectives.values())
        plans = {name: ObjectivePlan((Reading(Input("view1", masked), _shared_target(o)),))
                 for name, o in objectives.items()}

    def target_views(flag: str) -> tuple[str, ...]:
        return tuple(sorted({r.target_view for name, p in plans.items() for r in p.readings
                             if r.target_view and getattr(objectives[name], flag)}))

    student_views = target_views("student_target")
    inputs = [r.input for p in plans.values() for r in p.readings]
    inputs += [Input(view, False) for view in student_views]
    return Plan(plans, tuple(dict.fromkeys(inputs)), target_views("uses_teacher"),
                student_views)


def _native(objective: Objective, local_views: tuple[str, ...]) -> ObjectivePlan:
    """Every (student view, target view) pair of the objective's reference method; the pairs
    of two views of one image skip the view itself (a view never predicts its own target)."""
    if objective.multi_crop:
        students, targets = (*GLOBAL_VIEWS, *local_views), GLOBAL_VIEWS
    elif objective.symmetric:
        students = targets = (objective.input_view, objective.target_view)
    else:
        local = local_views if objective.reads_local_crops else ()
        students, targets = (objective.input_view, *local), (objective.target_view,)
    cross = objective.multi_crop or objective.symmetric
    readings = tuple(Reading(Input(s, objective.masked_input), t) for s in students
                     for t in targets if not (cross and s == t))
    return ObjectivePlan(readings, "sum" if objective.symmetric else "mean")


def _mixed(objective: Objective) -> ObjectivePlan:
    """Image A predicts its own view, B the other view of its image; both their labels."""
    target = _shared_target(objective)
    a = Reading(Input("view1", True, "a"), target)
    b = Reading(Input("view1", True, "b"), target, partner=True)
    if target is None:
        return ObjectivePlan((a, b))
    return ObjectivePlan((a,) if target == "view1" else (b,))


def _shared_target(objective: Objective) -> str | None:
    """In shared mode the input is view1: an intra-view target stays view1, and an inter-view
    target (a view other than the objective's own input) becomes view2."""
    if objective.target_view is None:
        return None
    return "view1" if objective.target_view == objective.input_view else "view2"
