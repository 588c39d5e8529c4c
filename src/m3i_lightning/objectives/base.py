"""The objective plugin: one row of the unified table, one term of Eq. 4.

An objective is a head: its predictor f_ψ, its distribution form and what it reads. It knows
nothing of optimisers, masks or teachers; the engine (:mod:`m3i_lightning.engine.module`)
encodes the inputs and builds the targets it declares. ``SiameseFeature(backbone=b, ...)``
builds a complete LightningModule that trains it on its own: the package root installs
:attr:`Objective.host` (the engine's ``MultiObjective.alone``), so this module never imports
the engine. What a head offers beyond its loss (an image-text joint space) is a capability
mixed into its class (:mod:`m3i_lightning.objectives.capabilities`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from m3i_lightning.core.encoded import Encoded
from m3i_lightning.core.errors import ConfigError

LossInputs = tuple[dict, Encoded, "Targets"]  # what the engine hands to :meth:`Objective.loss`

# Every objective class that names itself, by config name (a family such as ``inst_disc`` by
# its family name; its variants are in ``family.variants``). Filled as classes are defined.
OBJECTIVES: dict[str, type[Objective]] = {}


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


class Objective(nn.Module):
    """Owns its predictor f_ψ and distribution form; declares its input and target.

    The class variables are the objective's row of the unified table; the engine plans every
    encoder pass from them. ``embed_dim`` / ``grid_size`` / ``patch_size`` size the head for
    the backbone it will read (the factory passes the backbone's). Subclasses that name
    themselves (``name``) are registered in :data:`OBJECTIVES`; pass ``register=False`` in
    the class statement for a throw-away subclass.
    """

    name: ClassVar[str]
    form: ClassVar[str]  # distribution of P̂: "Gaussian" or "Boltzmann" (the table's last column)
    target_repr: ClassVar[str]  # what z_y is: category, paired text, dense pixels / feature, ...
    input_view: ClassVar[str] = "view1"
    masked_input: ClassVar[bool] = False
    target_view: ClassVar[str | None] = None
    uses_teacher: ClassVar[bool] = False
    # The student also encodes the full target view, with gradients (``targets.student``).
    student_target: ClassVar[bool] = False
    # In native mode the loss is also taken with the views swapped, the directions summed.
    symmetric: ClassVar[bool] = False
    # Native mode with local crops: DINO's pairing (every student crop × every teacher global
    # view but its own), or the local crops as extra input views (MSN's focal views).
    multi_crop: bool = False
    reads_local_crops: bool = False
    requires: ClassVar[frozenset[str]] = frozenset()
    # The loss reads the encoder's global feature (class token or pool). A run of objectives that
    # all read tokens only leaves the class token untrained, so its backbone pools the tokens.
    reads_global_feature: ClassVar[bool] = False
    # How many of the teacher's last block outputs the loss reads (``targets.teacher.top_blocks``,
    # data2vec's targets); 0: only its final tokens.
    teacher_blocks: int = 0
    # The loss reads the encoder's outputs at the masked cells (``encoded.masked_tokens``,
    # data2vec's linear head): the backbone must encode them as a mask token.
    reads_masked_tokens: bool = False
    # Parameters (attribute names) the reference keeps out of weight decay (MSN's prototypes).
    no_weight_decay: ClassVar[tuple[str, ...]] = ()
    # Smallest per-process batch the loss means something at (BatchNorm heads, batch negatives).
    min_batch_size: ClassVar[int] = 1
    # A family (``inst_disc``): its variants by name, and the one the config gets by default.
    variants: ClassVar[dict[str, type[Objective]]] = {}
    default_variant: ClassVar[str | None] = None

    @classmethod
    def trains_global_feature(cls, **options) -> bool:
        """Whether the loss of ``Cls(**options)`` reads the global feature, known before the
        backbone is built (it pools by the class token only when some objective trains it)."""
        return cls.reads_global_feature

    def __init_subclass__(cls, register: bool = True, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if not register:
            return
        if "variant" in vars(cls):
            if cls.variants is Objective.variants:
                raise TypeError(f"{cls.__name__} is a variant: its family class must define "
                                "its own `variants = {}`")
            cls.variants[cls.variant] = cls
        elif "name" in vars(cls):
            OBJECTIVES[cls.name] = cls

    # Builds the trainable module of ``Cls(backbone=b, **options)``: set by the package root,
    # the composition root that knows the engine (dependency inversion: heads sit below it).
    host: ClassVar[Callable[..., nn.Module] | None] = None

    def __new__(cls, *args, backbone=None, **kwargs):
        """Without a backbone, a plain head for a MultiObjective. With one, the objective
        trained on its own: ``Objective.host(cls, backbone, **kwargs)``, a MultiObjective with
        this one head (``model.head``), which pickles and deep-copies like any module."""
        if backbone is None:
            return super().__new__(cls)
        if Objective.host is None:
            raise ConfigError(f"{cls.__name__}(backbone=...) needs the engine: build it with "
                              "m3i_lightning.MultiObjective.alone")
        return Objective.host(cls, backbone, *args, **kwargs)

    def __init__(self, *, weight: float = 1.0, embed_dim: int | None = None,
                 grid_size: tuple[int, int] | None = None, patch_size: int | None = None) -> None:
        super().__init__()
        if embed_dim is None or grid_size is None:
            raise ConfigError(f"{type(self).__name__} needs a backbone or its embed_dim and "
                              "grid_size")
        self.weight = weight
        self.embed_dim, self.grid_size = embed_dim, tuple(grid_size)
        self.patch_size = patch_size  # only pixel objectives need it, to size their output
        # Width of the teacher features the head reads; objectives taking ``target_dim`` widen it.
        self.target_width = embed_dim
        self._momentum_heads: tuple[str, ...] = ()

    @classmethod
    def reads_tokens(cls) -> bool:
        """The loss reads ``encoded.tokens``: every objective with a dense target does, so a
        backbone without dense tokens (ResNet) cannot serve it."""
        return getattr(cls, "target_repr", "").startswith("dense")

    def add_momentum_copy(self, head: str) -> nn.Module:
        """Register ``momentum_<head>`` (dots of a nested path as ``_``): a stop-gradient copy
        of the sub-module ``head`` that follows it by EMA with the teacher's momentum, as the
        reference methods average their projectors / heads (MoCo, BYOL, DINO, MSN, DenseCL,
        SiameseIM's decoder projection). The engine updates every pair. Returns the copy."""
        averaged = copy.deepcopy(self.get_submodule(head)).requires_grad_(False)
        setattr(self, _momentum_name(head), averaged)
        self._momentum_heads = (*self._momentum_heads, head)
        return averaged

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(averaged copy, online head) for every head registered by :meth:`add_momentum_copy`."""
        return [(getattr(self, _momentum_name(head)), self.get_submodule(head))
                for head in self._momentum_heads]

    def loss(self, batch: dict, encoded: Encoded, targets: Targets) -> tuple[Tensor, dict]:
        """−log P̂(z_y | ẑ_y) for this batch, and extra scalars to log. Never calls self.log."""
        raise NotImplementedError

    def term(self, readings: list[LossInputs], reduce: str) -> tuple[Tensor, dict]:
        """The objective's unweighted term of Eq. 4 over its readings (each a (batch, encoded,
        targets) triple of the engine's plan): their losses summed (``reduce='sum'``, the two
        directions of a symmetric loss) or averaged, and the logs averaged. An objective whose
        reference couples its readings (DINO's centre, MSN's mean entropy) overrides this."""
        results = [self.loss(*reading) for reading in readings]
        losses = torch.stack([loss for loss, _ in results])
        logs = {key: torch.stack([extra[key] for _, extra in results]).mean()
                for key in results[0][1]}
        return (losses.sum() if reduce == "sum" else losses.mean()), logs

    @property
    def augments_batch(self) -> bool:
        """Whether :meth:`augment_batch` changes the batch: the engine then lets this
        objective be the run's only one, as every other would read the changed images."""
        return False

    def augment_batch(self, batch: dict) -> dict:
        """Called by the engine on each training batch before anything is encoded: an
        objective whose reference augments whole batches (cls: DeiT's Mixup / CutMix) returns
        the batch with that applied. Its random draws come from torch's global stream, which
        each rank seeds for itself and a resumed run restores."""
        return batch

    def follow_schedule(self, epoch: int) -> None:
        """Called by the engine before each training step: objectives whose reference
        schedules a hyper-parameter over epochs (DINO's teacher temperature) set it here."""

    def adjust_gradients(self, epoch: int) -> None:
        """Called by the engine after the backward pass, before the optimizer step: DINO
        freezes its prototype layer during the first epoch here."""

    def pictures(self, batch: dict, encoded: Encoded, targets: Targets) -> dict[str, Tensor]:
        """Pictures of what the objective predicts, for people to look at: name → images
        [B, 3, H, W] in the views' normalised space, in display order (pixel objectives return
        :func:`~m3i_lightning.components.pixels.reconstruction_panels`). Empty for objectives
        whose targets are not pixels. Drawn by
        :class:`~m3i_lightning.runtime.pictures.ReconstructionGrid`."""
        return {}


def _momentum_name(head: str) -> str:
    return "momentum_" + head.replace(".", "_")
