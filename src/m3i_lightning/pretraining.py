"""The training engine of Eq. 4: encode each distinct input once, run the teacher once per
target view, sum the weighted NLL of every objective, then update the EMA teacher."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import lightning as L
import torch
from torch import Tensor, nn

from m3i_lightning import sharding
from m3i_lightning.backbone import Backbone, Encoded
from m3i_lightning.errors import ConfigError, NonFiniteLossError
from m3i_lightning.masking import build_mask
from m3i_lightning.mixing import check_mixable, encode_mixed, partner_rows
from m3i_lightning.optim import OptimConfig, build_optimizer
from m3i_lightning.teacher import EMATeacher, TargetEncoder

if TYPE_CHECKING:
    from m3i_lightning.objectives.base import Objective

INPUT_MODES = ("shared", "native")


@dataclass(frozen=True)
class Route:
    """Where one objective reads from: the encoded input and the view its target comes from.

    ``symmetric``: the reference loss also runs with the two views' roles swapped and sums both
    directions (MoCo v3, BYOL: ℓ(1→2) + ℓ(2→1)); see :meth:`directions`.
    """

    view: str
    masked: bool
    target_view: str | None
    symmetric: bool = False

    @property
    def input_key(self) -> tuple[str, bool]:
        return self.view, self.masked

    def directions(self) -> tuple[Route, ...]:
        """This route, then for a symmetric one the same with input and target views swapped."""
        if not self.symmetric:
            return (self,)
        return (self, Route(self.target_view, self.masked, self.view))


@dataclass
class Targets:
    """What an objective may predict: the target view's pixels and the teacher's encoding.

    ``input_view`` / ``view`` name the batch keys of the encoded input and of the target, so an
    inter-view objective can read both crops' geometry (``batch[f"{view}_geometry"]``).
    ``student`` is the student's own full encoding of the target view, with gradients, for
    objectives whose target branch is the trained network itself (Barlow Twins: f_φ = f_θ).
    """

    input_view: str
    view: str | None
    pixels: Tensor | None = None
    teacher: Encoded | None = None
    student: Encoded | None = None


class Pretraining(L.LightningModule):
    """Shared mechanism of :class:`MultiObjective` and of every objective trained on its own.

    ``input_mode='shared'`` is M3I's Eq. 4 with a single z_x: every objective reads one encoded
    input (view1, masked if any objective masks) and inter-view targets come from view2.
    ``input_mode='native'`` gives each objective its reference method's input; each distinct
    input is still encoded once. ``mix=True`` (shared mode) is M3I's multi-input pre-training:
    see :mod:`m3i_lightning.mixing`. ``teacher`` is a given target encoder (a
    :class:`~m3i_lightning.teacher.FrozenTeacher`); without one, an EMA of the backbone is built
    when an objective needs a teacher.
    """

    def __init__(self, backbone: Backbone | None = None, *, input_mode: str = "shared",
                 mask: str = "random", mask_ratio: float = 0.75,
                 teacher_momentum: float = 0.996, teacher_final_momentum: float = 1.0,
                 teacher: TargetEncoder | None = None,
                 optim: OptimConfig | Mapping | None = None, check_finite_every: int = 1,
                 mix: bool = False, activation_checkpointing: bool = False,
                 compile: bool = False) -> None:
        super().__init__()
        if input_mode not in INPUT_MODES:
            raise ConfigError(f"unknown input mode '{input_mode}'; choose one of {INPUT_MODES}")
        if mix and input_mode != "shared":
            raise ConfigError("mix=true mixes two images into the one shared input: it needs "
                              "input=shared")
        self.mix = mix
        self.backbone = backbone
        self.input_mode = input_mode
        self.mask_kind, self.mask_ratio = mask, mask_ratio
        self.teacher_momentum = (teacher_momentum, teacher_final_momentum)
        self.optim = OptimConfig(**optim) if isinstance(optim, Mapping) else optim or OptimConfig()
        self.check_finite_every = check_finite_every
        self.scaling = {"activation_checkpointing": activation_checkpointing, "compile": compile}
        self.teacher: TargetEncoder | None = teacher
        self.mask_generator = None

    def objectives(self) -> dict[str, Objective]:
        raise NotImplementedError

    def _build_engine(self) -> None:
        """Create the teacher and mask generator the selected objectives need."""
        if self.backbone is None:
            return
        routes = self.route_table = self.routes()
        self.teacher_views = self._target_views("uses_teacher")
        self.student_target_views = self._target_views("student_target")
        if not any(obj.uses_teacher for obj in self.objectives().values()):
            self.teacher = None
        elif self.teacher is None:
            self.teacher = EMATeacher(self.backbone, *self.teacher_momentum)
        if any(r.masked for r in routes.values()):
            self.mask_generator = build_mask(self.mask_kind, self.backbone.grid_size,
                                             self.mask_ratio)
        if self.mix:
            try:
                check_mixable(self.mask_generator)
            except ValueError as err:
                raise ConfigError(str(err)) from None

    def _target_views(self, flag: str) -> list[str]:
        """Target views, over every direction, of the objectives with ``flag`` set."""
        objectives = self.objectives()
        return sorted({d.target_view for name, route in self.route_table.items()
                       for d in route.directions()
                       if d.target_view and getattr(objectives[name], flag)})

    def routes(self) -> dict[str, Route]:
        """Native mode honours symmetric objectives; shared mode has one encoded input, so
        there a symmetric objective contributes its one direction (masked view1 → view2)."""
        objectives = self.objectives()
        if self.input_mode == "native":
            return {n: Route(o.input_view, o.masked_input, o.target_view, o.symmetric)
                    for n, o in objectives.items()}
        masked = self.mix or any(o.masked_input for o in objectives.values())
        return {n: Route("view1", masked, _shared_target(o)) for n, o in objectives.items()}

    def batch_fields(self) -> set[str]:
        """Batch keys the data must provide for the selected objectives."""
        fields: set[str] = set()
        for name, route in self.routes().items():
            fields.add(route.view)
            if route.target_view:
                fields.add(route.target_view)
            fields |= self.objectives()[name].requires
        if "view1" in fields and "view2" in fields:
            fields.add("geometry")
        return fields

    def check_data(self, provides: set[str]) -> None:
        """Fail before training when an objective needs something the data lacks."""
        for name, obj in self.objectives().items():
            missing = obj.requires - set(provides)
            if missing:
                raise ConfigError(
                    f"objective '{name}' needs {sorted(missing)} but the data provides only "
                    f"{sorted(provides)}")

    def on_fit_start(self) -> None:
        """Every process starts from one seed, so that all build identical weights; from here on
        each draws its own masks and mixing partners, or all ranks would hide the same patches
        of their different images at every step. (A resumed run restores each rank's streams
        afterwards, at train start.)"""
        if self.trainer.world_size > 1:
            torch.manual_seed(torch.initial_seed() + self.global_rank)

    def setup(self, stage: str) -> None:
        """Check the data, then ask it for only the fields the objectives read (before any
        loader exists), so a plain ``Trainer().fit(model, datamodule)`` builds nothing extra."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "provides"):
            self.check_data(datamodule.provides)
            datamodule.fields = self.batch_fields()

    def forward_terms(self, batch: dict) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Weighted loss term per objective, and their extra logs.

        An objective may read the batch more than once. M3I's mix: images A and B both predict
        their label / caption, two samples of one term, so the term is their mean. A symmetric
        route (native mode only, never mixed): its two directions are summed, as the reference.
        """
        terms, logs = {}, {}
        for name, readings in self._readings(batch).items():
            objective = self.objectives()[name]
            results = [objective.loss(*reading) for reading in readings]
            losses = [loss for loss, _ in results]
            total = torch.stack(losses).sum() if self.route_table[name].symmetric else _mean(losses)
            terms[name] = objective.weight * total
            for key in results[0][1]:
                logs[f"{name}/{key}"] = _mean([extra[key] for _, extra in results])
        return terms, logs

    def _readings(self, batch: dict) -> dict[str, list[tuple[dict, Encoded, Targets]]]:
        """(batch, encoded input, targets) per objective, each input encoded once."""
        routes = self.route_table
        teacher = {view: self.teacher(batch[view]) for view in self.teacher_views}
        if self.mix:
            return self._mixed_readings(batch, teacher)
        keys = [d.input_key for r in routes.values() for d in r.directions()]
        keys += [(view, False) for view in self.student_target_views]
        encoded = {key: self._encode(batch, *key) for key in dict.fromkeys(keys)}
        student = {view: encoded[view, False] for view in self.student_target_views}
        return {name: [(batch, encoded[d.input_key], _targets(batch, d, teacher, student))
                       for d in r.directions()]
                for name, r in routes.items()}

    def _mixed_readings(self, batch: dict, teacher: dict[str, Encoded]):
        """M3I multi-input: A (intra-view targets) and B (inter-view targets) encoded in one
        pass; objectives without an image target (labels, captions) read both."""
        size = batch["view1"].shape[0]
        partner = partner_rows(size, batch["view1"].device)
        encoded_a, encoded_b = encode_mixed(self.backbone, batch["view1"], partner,
                                            self.mask_generator)
        batch_b = {k: v[partner] if torch.is_tensor(v) and v.shape[:1] == (size,) else v
                   for k, v in batch.items()}
        teacher_b = {view: enc.select(partner) for view, enc in teacher.items()}
        student = {view: self._encode(batch, view, False) for view in self.student_target_views}
        student_b = {view: enc.select(partner) for view, enc in student.items()}
        readings = {}
        for name, r in self.route_table.items():
            a = (batch, encoded_a, _targets(batch, r, teacher, student))
            b = (batch_b, encoded_b, _targets(batch_b, r, teacher_b, student_b))
            readings[name] = {None: [a, b], "view1": [a], "view2": [b]}[r.target_view]
        return readings

    def _encode(self, batch: dict, view: str, masked: bool) -> Encoded:
        images = batch[view]
        if not masked:
            return self.backbone(images)
        mask = self.mask_generator(images.shape[0], images.device)
        visible, hidden = self.mask_generator.split(mask)
        return self.backbone(images, visible, hidden)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        terms, logs = self.forward_terms(batch)
        stacked = torch.stack(list(terms.values()))
        if self.check_finite_every and self.global_step % self.check_finite_every == 0:
            self._raise_if_nonfinite(terms, stacked)
        total = stacked.sum()
        batch_size = batch["view1"].shape[0]
        self.log("train/loss", total, prog_bar=True, batch_size=batch_size)
        for name, term in terms.items():
            self.log(f"train/loss/{name}", term, batch_size=batch_size)
        for key, value in logs.items():
            self.log(f"train/{key}", value, batch_size=batch_size)
        return total

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Detached global features of whole images. Lightning runs validation only when a
        module defines this step; the metrics themselves live in callbacks
        (:class:`~m3i_lightning.monitors.ProbeMonitor`), so the engine stays metric-free."""
        return self.backbone(batch["image"]).global_feature.detach()

    def reconstructions(self, batch: dict) -> dict[str, dict[str, Tensor]]:
        """Pictures of every objective that returns some (``Objective.reconstruct``), from the
        first reading of each; drawn by :class:`~m3i_lightning.pictures.ReconstructionGrid`.
        A step method like the two above, so a sharded engine gathers its weights for it."""
        readings = self._readings(batch)
        pictures = {name: self.objectives()[name].reconstruct(*readings[name][0])
                    for name in readings}
        return {name: panels for name, panels in pictures.items() if panels}

    def _raise_if_nonfinite(self, terms: dict[str, Tensor], stacked: Tensor) -> None:
        bad = ~torch.isfinite(stacked.detach())
        if bad.any():
            names = [n for n, b in zip(terms, bad.tolist(), strict=True) if b]
            raise NonFiniteLossError(
                f"loss of objective(s) {names} is NaN/inf at step {self.global_step}; "
                "lower the learning rate or check the data")

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.update_teacher(self.trainer.global_step, int(self.trainer.estimated_stepping_batches))

    def update_teacher(self, step: int, total_steps: int) -> None:
        """After an optimizer step: the teacher, then the objectives' averaged heads, follow the
        student. Public so that a loop stepping the optimizer itself (scripts/benchmark.py)
        runs exactly the Trainer's step."""
        if self.teacher is not None:
            momentum = self.teacher.update(self.backbone, step, total_steps)
            for objective in self.objectives().values():
                objective.ema_update(momentum)

    def configure_model(self) -> None:
        """Lightning's hook once the processes exist: activation checkpointing, compiled blocks
        and, under ``ModelParallelStrategy``, FSDP2 sharding (:mod:`m3i_lightning.sharding`)."""
        mesh = self.device_mesh["data_parallel"] if self.device_mesh is not None else None
        sharding.configure(self, mesh, **self.scaling)

    def configure_optimizers(self):
        if self.backbone is None:
            raise ConfigError(f"{type(self).__name__} has no backbone: pass backbone=... to "
                              "train it on its own, or add it to a MultiObjective")
        return build_optimizer(self, self.optim, int(self.trainer.estimated_stepping_batches))


def _mean(values: list[Tensor]) -> Tensor:
    return values[0] if len(values) == 1 else torch.stack(values).mean()


def _targets(batch: dict, route: Route, teacher: dict[str, Encoded],
             student: dict[str, Encoded]) -> Targets:
    view = route.target_view
    return Targets(route.view, view, batch.get(view) if view else None, teacher.get(view),
                   student.get(view))


def _shared_target(objective: Objective) -> str | None:
    """In shared mode the input is view1: an intra-view target stays view1, and an inter-view
    target (a view other than the objective's own input) becomes view2."""
    if objective.target_view is None:
        return None
    return "view1" if objective.target_view == objective.input_view else "view2"


class MultiObjective(Pretraining):
    """Several objectives on one backbone: the all-in-one pre-training of M3I (Eq. 4)."""

    def __init__(self, backbone: Backbone, objectives: Mapping[str, Objective], **kwargs) -> None:
        super().__init__(backbone, **kwargs)
        if not objectives:
            raise ConfigError("MultiObjective needs at least one objective")
        for name, objective in objectives.items():
            if objective.backbone is not None:
                raise ConfigError(f"objective '{name}' owns a backbone; inside a "
                                  "MultiObjective objectives share the MultiObjective's one")
        self.heads = nn.ModuleDict(objectives)
        self._build_engine()

    def objectives(self) -> dict[str, Objective]:
        return dict(self.heads.items())
