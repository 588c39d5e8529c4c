"""The training engine of Eq. 4: encode each distinct input once, run the teacher once per
target view, sum the weighted NLL of every objective, then update the EMA teacher and the
objectives' averaged heads.

A :class:`MultiObjective` holds the heads on one backbone; an objective trained on its own is a
MultiObjective with one head (:meth:`MultiObjective.alone`, which ``Objective(backbone=...)``
calls).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping

import lightning as L
import torch
from torch import Tensor, nn

from m3i_lightning.backbone import Backbone, Encoded
from m3i_lightning.components.masking import build_mask
from m3i_lightning.components.optim import OptimConfig, build_optimizer, follow_weight_decay
from m3i_lightning.core.errors import ConfigError, NonFiniteLossError
from m3i_lightning.core.views import local_view_names
from m3i_lightning.engine import checks, sharding
from m3i_lightning.engine.mixing import encode_mixed, partner_rows
from m3i_lightning.engine.plan import Input, Plan, Reading, build_plan
from m3i_lightning.engine.teacher import EMATeacher, TargetEncoder, ema_
from m3i_lightning.engine.weighting import build_weighting
from m3i_lightning.objectives.base import Objective, Targets

Readings = dict[str, list[tuple[dict, Encoded, Targets]]]


class Engine(L.LightningModule):
    """Shared mechanism of :class:`MultiObjective` and of every objective trained on its own.

    Subclasses provide :meth:`objectives` and call :meth:`build_engine` once those exist.
    """

    def objectives(self) -> dict[str, Objective]:
        raise NotImplementedError

    def build_engine(self, backbone: Backbone, *, input_mode: str = "shared",
                     mask: str = "random", mask_ratio: float = 0.75,
                     teacher_momentum: float = 0.996, teacher_final_momentum: float = 1.0,
                     teacher: TargetEncoder | None = None,
                     optim: OptimConfig | Mapping | None = None, check_finite_every: int = 1,
                     mix: bool = False, local_crops: int = 0,
                     activation_checkpointing: bool = False, compile: bool = False,
                     weighting: str = "fixed") -> None:
        """``input_mode='shared'`` is M3I's Eq. 4 with a single z_x, ``'native'`` gives each
        objective its reference method's input, ``mix=True`` is M3I's multi-input pre-training
        (see :mod:`m3i_lightning.engine.plan`); ``local_crops``: how many local crops the data gives
        (DINO / MSN multi-crop, batch keys ``local1`` ...). ``teacher`` is a given target encoder (a
        :class:`~m3i_lightning.engine.teacher.FrozenTeacher`); without one, an EMA of the backbone
        is built when an objective needs a teacher. ``weighting``: how the terms make the step
        (:mod:`m3i_lightning.engine.weighting`). Every bad value is a ConfigError here."""
        checks.check_input(input_mode, mix)
        objectives = self.objectives()
        checks.check_backbone(backbone, objectives, mix)
        checks.check_masked_tokens(backbone, objectives, mix)
        checks.check_batch_augment(objectives)
        self.backbone = backbone
        self.input_mode, self.mix = input_mode, mix
        self.plan: Plan = build_plan(objectives, input_mode, mix, local_view_names(local_crops))
        self.mask_generator = _mask_generator(self.plan, objectives, backbone.grid_size, mask,
                                              mask_ratio)
        self._mask_kind, self._mask_ratio, self._grid_masks = mask, mask_ratio, {}
        self.teacher: TargetEncoder | None = None
        if self.plan.teacher_views:
            self.teacher = teacher or EMATeacher(backbone, teacher_momentum,
                                                 teacher_final_momentum)
            checks.check_teacher_width(self.teacher, objectives)
            checks.check_teacher_blocks(self.teacher, objectives)
        # how many last block outputs the teacher keeps: the most any objective reads (each
        # takes its own last K of them)
        self.teacher_blocks = max((o.teacher_blocks for o in objectives.values()), default=0)
        guided = self.mask_generator is not None and self.mask_generator.guided
        if guided:
            checks.check_guided_mask(self.plan, self.teacher, backbone)
        # what the teacher's one pass keeps beside its tokens
        self.teacher_options = {key: value for key, value in (
            ("top_blocks", self.teacher_blocks), ("class_attention", guided)) if value}
        self.optim = OptimConfig(**optim) if isinstance(optim, Mapping) else optim or OptimConfig()
        self.check_finite_every = check_finite_every
        self.scaling = {"activation_checkpointing": activation_checkpointing, "compile": compile}
        self.weighting = build_weighting(weighting, {name: getattr(o, "form", None)
                                                     for name, o in objectives.items()})
        self._step_terms: dict[str, Tensor] | None = None  # for a weighting that reads them

    def batch_fields(self) -> set[str]:
        """Batch keys the data must provide for the selected objectives."""
        return self.plan.fields({n: o.requires for n, o in self.objectives().items()})

    def check_data(self, provides: set[str]) -> None:
        """Fail before training when an objective needs something the data lacks."""
        checks.check_data(self.objectives(), provides)

    def check_batch_size(self, batch_size: int) -> None:
        """Fail before training when an objective needs a larger per-process batch."""
        checks.check_batch_size(self.objectives(), batch_size)

    def on_fit_start(self) -> None:
        """Every process starts from one seed, so that all build identical weights; from here on
        each draws its own masks and mixing partners, or all ranks would hide the same patches
        of their different images at every step. (A resumed run restores each rank's streams
        afterwards, at train start.)"""
        if self.trainer.world_size > 1:
            torch.manual_seed(torch.initial_seed() + self.global_rank)

    def setup(self, stage: str) -> None:
        """Check the data before any loader exists. (The data module asks :meth:`batch_fields`
        of the module it trains, so a plain ``Trainer().fit(model, datamodule)`` builds
        nothing extra.)"""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "provides"):
            self.check_data(datamodule.provides)
        if stage == "fit" and isinstance(getattr(datamodule, "batch_size", None), int):
            self.check_batch_size(datamodule.batch_size)

    def readings(self, batch: dict) -> Readings:
        """(batch, encoded input, targets) of every reading of the plan, each input encoded
        once and each teacher view encoded once: the teacher first, as an attention-guided
        mask of the student's input follows the teacher's attention."""
        plan = self.plan
        partner = None
        if plan.mixed:
            partner = partner_rows(batch["view1"].shape[0], batch["view1"].device)
        teacher = _encode_grouped(batch, [Input(v, False) for v in plan.teacher_views],
                                  lambda images, *_: self.teacher(images, **self.teacher_options))
        teacher = {key.view: enc for key, enc in teacher.items()}
        encoded = self._encode_inputs(batch, partner, teacher)
        student = {view: encoded[Input(view, False)] for view in plan.student_views}
        sources = {False: (batch, teacher, student)}
        if partner is not None:
            sources[True] = _partner_view(batch, teacher, student, partner)
        return {name: [_reading(r, encoded, *sources[r.partner]) for r in p.readings]
                for name, p in plan.objectives.items()}

    def _encode_inputs(self, batch: dict, partner: Tensor | None,
                       teacher: dict[str, Encoded]) -> dict[Input, Encoded]:
        """Every input of the plan; a mix encodes images A and B (view1 and its partner
        rows) in one pass. ``teacher``: its encodings by view, whose class attention guides
        the masks of an attention-guided generator."""
        encoded = {}
        if partner is not None:
            encoded[Input("view1", True, "a")], encoded[Input("view1", True, "b")] = (
                encode_mixed(self.backbone, batch["view1"], partner, self.mask_generator))
        others = [key for key in self.plan.inputs if key not in encoded]
        guides = {view: enc.class_attention for view, enc in teacher.items()
                  if enc.class_attention is not None}
        return {**encoded, **_encode_grouped(batch, others, self._encode, guides)}

    def _encode(self, images: Tensor, masked: bool, attention: Tensor | None) -> Encoded:
        if not masked:
            return self.backbone(images)
        generator = self._mask_for(images)
        mask = generator(images.shape[0], images.device, attention)
        visible, hidden = generator.split(mask)
        return self.backbone(images, visible, hidden)

    def _mask_for(self, images: Tensor):
        """The mask generator of the images' patch grid: the backbone's, or one per local-crop
        size (MSN masks its focal views too)."""
        grid = self.backbone.grid_for(tuple(images.shape[-2:]))
        if grid == tuple(self.backbone.grid_size):
            return self.mask_generator
        if grid not in self._grid_masks:
            objectives = {n: o for n, o in self.objectives().items() if o.masked_input}
            self._grid_masks[grid] = _mask_generator(self.plan, objectives, grid,
                                                     self._mask_kind, self._mask_ratio)
        return self._grid_masks[grid]

    def forward_terms(self, batch: dict) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Weighted loss term per objective, its readings reduced as the plan says, and their
        extra logs (averaged over the readings)."""
        terms, logs = {}, {}
        objectives = self.objectives()
        for name, readings in self.readings(batch).items():
            objective = objectives[name]
            term, extra = objective.term(readings, self.plan.objectives[name].reduce)
            terms[name] = objective.weight * term
            logs.update({f"{name}/{key}": value for key, value in extra.items()})
        return terms, logs

    def step_terms(self, batch: dict):
        """A training step's forward on ``batch``: the weighted term of each objective (Eq. 4's
        weight), the same as the optimiser sees it (the weighting strategy's factor too), the
        strategy's own term (None for most), the extra logs and the batch as the objectives
        augmented it."""
        for objective in self.objectives().values():
            objective.follow_schedule(self.current_epoch)
            batch = objective.augment_batch(batch)
        terms, logs = self.forward_terms(batch)
        optimised, own = self.weighting(terms)
        return terms, optimised, own, logs, batch

    @sharding.step_method
    def interplay_terms(self, batch: dict) -> dict[str, Tensor]:
        """Each term of a training step on ``batch`` as the optimiser sees it: the pass of the
        interplay monitor (:func:`m3i_lightning.engine.interplay.measure`), which runs it
        before the step, its random draws forked; a step method, so a sharded engine gathers
        its weights for it."""
        return self.step_terms(batch)[1]

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        terms, optimised, own, logs, batch = self.step_terms(batch)
        stacked = torch.stack(list(terms.values()))
        if self.check_finite_every and self.global_step % self.check_finite_every == 0:
            self._raise_if_nonfinite(terms, stacked)
        total = torch.stack(list(optimised.values())).sum()
        if own is not None:
            total = total + own
        if self.weighting.reads_terms:
            self._step_terms = optimised
        batch_size = batch["view1"].shape[0]
        self.log("train/loss", total, prog_bar=True, batch_size=batch_size)
        for name, term in terms.items():
            self.log(f"train/loss/{name}", term, batch_size=batch_size)
        for key, value in {**logs, **self.weighting.logs()}.items():
            self.log(f"train/{key}", value, batch_size=batch_size)
        return total

    def backward(self, loss: Tensor, *args, **kwargs) -> None:
        """Lightning's backward, through the weighting strategy: PCGrad rewrites the shared
        encoder's gradient from the step's terms."""
        terms, self._step_terms = self._step_terms, None
        lightning_backward = super().backward
        shared = [p for p in self.backbone.parameters() if p.requires_grad]
        self.weighting.backward(loss, terms or {}, shared, self.global_step,
                                lambda value: lightning_backward(value, *args, **kwargs))

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Detached global features of whole images. Lightning runs validation only when a
        module defines this step; the metrics themselves live in callbacks
        (:class:`~m3i_lightning.evaluation.monitors.ProbeMonitor`), so the engine stays
        metric-free."""
        return self.backbone(batch["image"]).global_feature.detach()

    @sharding.step_method
    @torch.no_grad()
    def global_features(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """The student's and the teacher's (None without one) global features of ``images``,
        for the health monitors (:mod:`m3i_lightning.evaluation.health`); a step method, so a
        sharded engine gathers its weights for it."""
        student = self.backbone(images).global_feature
        return student, None if self.teacher is None else self.teacher(images).global_feature

    @sharding.step_method
    def objective_pictures(self, batch: dict) -> dict[str, dict[str, Tensor]]:
        """Pictures of every objective that draws some (:meth:`Objective.pictures`), from the
        first reading of each; drawn by :class:`~m3i_lightning.runtime.pictures.ReconstructionGrid`.
        A step method like the two above, so a sharded engine gathers its weights for it."""
        objectives = self.objectives()
        pictures = {name: objectives[name].pictures(*readings[0])
                    for name, readings in self.readings(batch).items()}
        return {name: panels for name, panels in pictures.items() if panels}

    def _raise_if_nonfinite(self, terms: dict[str, Tensor], stacked: Tensor) -> None:
        bad = ~torch.isfinite(stacked.detach())
        if bad.any():
            names = [n for n, b in zip(terms, bad.tolist(), strict=True) if b]
            raise NonFiniteLossError(
                f"loss of objective(s) {names} is NaN/inf at step {self.global_step}; "
                "lower the learning rate or check the data")

    def on_before_optimizer_step(self, optimizer) -> None:
        for objective in self.objectives().values():
            objective.adjust_gradients(self.current_epoch)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        total = int(self.trainer.estimated_stepping_batches)
        follow_weight_decay(optimizer, self.optim, self.trainer.global_step, total)
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.update_teacher(self.trainer.global_step, total)

    def update_teacher(self, step: int, total_steps: int) -> None:
        """After an optimizer step: the teacher, then every averaged head, follow the student
        with the teacher's momentum. Public so that a loop stepping the optimizer itself
        (scripts/benchmark.py) runs exactly the Trainer's step."""
        if self.teacher is None:
            return
        momentum = self.teacher.update(self.backbone, step, total_steps)
        for objective in self.objectives().values():
            for averaged, online in objective.momentum_pairs():
                ema_(averaged, online, momentum)

    def configure_model(self) -> None:
        """Lightning's hook once the processes exist: activation checkpointing, compiled blocks
        and, under ``ModelParallelStrategy``, FSDP2 sharding
        (:mod:`m3i_lightning.engine.sharding`)."""
        mesh = self.device_mesh["data_parallel"] if self.device_mesh is not None else None
        if mesh is not None and not self.weighting.shards:
            raise ConfigError(f"weighting={self.weighting.name} combines whole gradients of the "
                              "shared encoder, which FSDP2 shards: use strategy=ddp")
        sharding.configure(self, mesh, **self.scaling)

    def configure_optimizers(self):
        exempt = [getattr(objective, name) for objective in self.objectives().values()
                  for name in objective.no_weight_decay]
        return build_optimizer(self, self.optim, int(self.trainer.estimated_stepping_batches),
                               exempt, self.global_batch_size(), self.trainer.max_epochs)

    def global_batch_size(self) -> int | None:
        """Samples per optimizer step over all processes (the linear scaling rule's batch);
        None when the data module does not say its batch size."""
        per_process = getattr(self.trainer.datamodule, "batch_size", None)
        if per_process is None:
            return None
        return per_process * self.trainer.world_size * self.trainer.accumulate_grad_batches


# The keyword options of the engine, which a single-objective run takes beside the head's own.
ENGINE_OPTIONS = frozenset(inspect.signature(Engine.build_engine).parameters) - {"self",
                                                                               "backbone"}


class MultiObjective(Engine):
    """Several objectives on one backbone: the all-in-one pre-training of M3I (Eq. 4).

    Args:
        backbone: the shared encoder.
        objectives: name → objective head, each built without ``backbone=`` and sized with
            the backbone's ``embed_dim`` and ``grid_size``.
        **engine: the options of :meth:`Engine.build_engine`: ``input_mode`` (``shared`` or
            ``native``), ``mix``, ``mask``, ``mask_ratio``, the teacher's momentum, ``optim``
            and the rest.

    Example:
        >>> from m3i_lightning import Backbone
        >>> from m3i_lightning.objectives import Classification, MaskedFeature
        >>> backbone = Backbone("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=1)
        >>> dims = dict(embed_dim=backbone.embed_dim, grid_size=backbone.grid_size)
        >>> model = MultiObjective(backbone, {"mim_feat": MaskedFeature(**dims),
        ...                                   "cls": Classification(num_classes=10, **dims)})
        >>> sorted(model.batch_fields())
        ['label', 'view1']
    """

    def __init__(self, backbone: Backbone, objectives: Mapping[str, Objective], **engine) -> None:
        super().__init__()
        if not objectives:
            raise ConfigError("MultiObjective needs at least one objective")
        for name, objective in objectives.items():
            if not isinstance(objective, Objective):
                raise ConfigError(f"objective '{name}' is a {type(objective).__name__}, not an "
                                  "objective head: build it without backbone=, sized with "
                                  "embed_dim / grid_size, and the MultiObjective shares its one")
        self.heads = nn.ModuleDict(objectives)
        self.build_engine(backbone, **engine)

    def objectives(self) -> dict[str, Objective]:
        return dict(self.heads.items())

    @classmethod
    def alone(cls, objective: type[Objective], backbone: Backbone, **options) -> MultiObjective:
        """``objective`` trained on its own: a MultiObjective with that one head, sized for
        ``backbone``; ``options`` are the engine's (:data:`ENGINE_OPTIONS`) and the head's own.

        Example:
            >>> from m3i_lightning import Backbone
            >>> from m3i_lightning.objectives import SiameseFeature
            >>> b = Backbone("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=1)
            >>> model = MultiObjective.alone(SiameseFeature, backbone=b, mask_ratio=0.5)
            >>> type(model.head).__name__
            'SiameseFeature'
        """
        engine = {k: options.pop(k) for k in ENGINE_OPTIONS & set(options)}
        head = objective(embed_dim=backbone.embed_dim, grid_size=backbone.grid_size,
                         patch_size=backbone.patch_size, **options)
        return cls(backbone, {objective.name: head}, **engine)

    @property
    def head(self) -> Objective:
        """The one objective of a single-objective run."""
        if len(self.heads) != 1:
            raise AttributeError(f"this MultiObjective has {len(self.heads)} heads: read "
                                 f"`heads[name]` ({', '.join(self.heads)})")
        return next(iter(self.heads.values()))


def _encode_grouped(batch: dict, keys: list[Input],
                    encode: Callable[[Tensor, bool, Tensor | None], Encoded],
                    guides: Mapping[str, Tensor] | None = None) -> dict[Input, Encoded]:
    """``encode`` each input, inputs of one image size and masking in ONE batched pass (the
    two global views together, all local crops together), as multi-crop references do;
    ``guides``: the teacher's class attention by view, passed along with masked images."""
    groups: dict[tuple, list[Input]] = {}
    for key in keys:
        groups.setdefault((key.masked, *batch[key.view].shape[1:]), []).append(key)
    encoded = {}
    for (masked, *_), group in groups.items():
        images = [batch[key.view] for key in group]
        guide = torch.cat([guides[key.view] for key in group]) if masked and guides else None
        together = encode(torch.cat(images) if len(images) > 1 else images[0], masked, guide)
        start = 0
        for key, part in zip(group, images, strict=True):
            encoded[key] = together.select(slice(start, start + part.shape[0]))
            start += part.shape[0]
    return encoded


def _reading(reading: Reading, encoded: dict[Input, Encoded], batch: dict,
             teacher: dict[str, Encoded], student: dict[str, Encoded]):
    view = reading.target_view
    targets = Targets(reading.input.view, view, batch.get(view) if view else None,
                      teacher.get(view), student.get(view))
    return batch, encoded[reading.input], targets


def _partner_view(batch: dict, teacher: dict[str, Encoded], student: dict[str, Encoded],
                  partner: Tensor):
    """The batch, teacher and student encodings as image B of the mix sees them."""
    size = partner.shape[0]
    batch = {k: v[partner] if torch.is_tensor(v) and v.shape[:1] == (size,) else v
             for k, v in batch.items()}
    return (batch, {v: enc.select(partner) for v, enc in teacher.items()},
            {v: enc.select(partner) for v, enc in student.items()})


def _mask_generator(plan: Plan, objectives: Mapping[str, Objective], grid: tuple[int, int],
                    kind: str, ratio: float):
    """The mask of the masked inputs, None when nothing is masked."""
    checks.check_mask(kind, ratio)
    if not plan.masked:
        return None
    generator = build_mask(kind, grid, ratio)
    checks.check_mask_grid(generator, ratio, objectives, plan.mixed)
    return generator
