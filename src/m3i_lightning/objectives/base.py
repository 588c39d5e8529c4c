"""The objective plugin: one row of the unified table, one term of Eq. 4."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from m3i_lightning.backbone import Backbone, Encoded
from m3i_lightning.errors import ConfigError
from m3i_lightning.pretraining import Pretraining, Targets


class Objective(Pretraining):
    """Owns its predictor f_ψ and distribution form; declares its input and target.

    Inside a :class:`~m3i_lightning.MultiObjective` an objective has no backbone and only
    computes :meth:`loss`. Given ``backbone=...`` it is a complete LightningModule trainable on
    its own with ``Trainer().fit``, through the same engine as the multi-objective case.
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
    requires: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, *, weight: float = 1.0, backbone: Backbone | None = None,
                 embed_dim: int | None = None, grid_size: tuple[int, int] | None = None,
                 patch_size: int | None = None, **engine) -> None:
        super().__init__(backbone, **engine)
        if backbone is not None:
            embed_dim, grid_size = backbone.embed_dim, backbone.grid_size
            patch_size = backbone.patch_size
        if embed_dim is None or grid_size is None:
            raise ConfigError(f"{type(self).__name__} needs a backbone or its embed_dim and "
                              "grid_size")
        self.weight = weight
        self.embed_dim, self.grid_size = embed_dim, tuple(grid_size)
        self.patch_size = patch_size  # only pixel objectives need it, to size their output
        self._build_engine()

    def objectives(self) -> dict[str, Objective]:
        return {self.name: self}

    def loss(self, batch: dict, encoded: Encoded, targets: Targets) -> tuple[Tensor, dict]:
        """−log P̂(z_y | ẑ_y) for this batch, and extra scalars to log. Never calls self.log."""
        raise NotImplementedError

    def ema_update(self, momentum: float) -> None:
        """Called after each teacher update with its momentum: objectives whose reference
        method also averages a head (MoCo / BYOL projectors, DINO heads) update it here."""

    def reconstruct(self, batch: dict, encoded: Encoded, targets: Targets) -> dict[str, Tensor]:
        """Pictures of what the objective predicts, for people to look at: name → images
        [B, 3, H, W] in the views' normalised space, in display order (pixel objectives return
        :func:`~m3i_lightning.pixels.reconstruction_panels`). Empty for objectives whose
        targets are not pixels. Drawn by :class:`~m3i_lightning.pictures.ReconstructionGrid`."""
        return {}
