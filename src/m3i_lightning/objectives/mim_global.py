"""`mim_global`: the masked view predicts the teacher's global feature of the full view."""

from __future__ import annotations

from torch import nn

from m3i_lightning.components.distributions import Gaussian
from m3i_lightning.components.heads import mlp
from m3i_lightning.objectives.base import Objective


class MaskedGlobal(Objective):
    """The row of the unified table with no published method: the masked view's global feature,
    through an MLP predictor, regresses the stop-gradient teacher's global feature of the full
    view, with the normalised MSE ‖p/‖p‖ − z/‖z‖‖² = 2 − 2·cos (a Gaussian on the sphere).

    The predictor is BYOL's (linear, BatchNorm, ReLU, linear): with a stop-gradient EMA teacher
    and no negatives, that asymmetric head is what keeps the pair from collapsing.

    Args:
        predictor_dim: hidden width of the BYOL-style predictor.
        predictor_layers: its layers.
        target_dim: the teacher's width when it differs from the student's.
        **kwargs: the options of every objective
        (:class:`~m3i_lightning.objectives.base.Objective`): ``weight``, and the backbone's
        ``embed_dim``, ``grid_size``, ``patch_size``.

    Example:
        >>> from m3i_lightning import Backbone
        >>> backbone = Backbone("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=1)
        >>> model = MaskedGlobal(backbone=backbone)  # alone: a LightningModule
        >>> type(model.head).__name__
        'MaskedGlobal'
    """

    name = "mim_global"
    reads_global_feature = True
    form = "Gaussian"
    target_repr = "global feature"
    masked_input = True
    target_view = "view1"
    uses_teacher = True
    min_batch_size = 2  # BatchNorm in the predictor

    def __init__(self, predictor_dim: int = 2048, predictor_layers: int = 2,
                 target_dim: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.target_width = target_dim or self.embed_dim
        self.predictor = mlp(self.embed_dim, predictor_dim, self.target_width,
                             predictor_layers, norm="bn", act=nn.ReLU)
        self.distribution = Gaussian("cosine")

    def loss(self, batch, encoded, targets):
        pred = self.predictor(encoded.global_feature)
        return self.distribution(pred, targets.teacher.global_feature), {}
