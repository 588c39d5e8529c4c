"""`dense_distill`: every token regresses the teacher's dense feature at its patch (FD)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from m3i_lightning.components.distributions import Gaussian
from m3i_lightning.core.encoded import gather_tokens
from m3i_lightning.core.errors import ConfigError
from m3i_lightning.objectives.base import Objective


class DenseDistill(Objective):
    """Feature Distillation (Wei et al., 2022), as BEiT v2's tokenizer also regresses a teacher:
    the full view's tokens, through a per-token linear head (FD's 1×1 convolution), regress
    the teacher's features of the same view, whitened by a LayerNorm without affine
    parameters; smooth-L1 with β = 2 as FD. The stop-gradient teacher is the regulariser; a
    frozen pre-trained teacher (``teacher.kind=frozen``) is FD proper, and a wider one is met
    with ``target_dim``. If the shared input is masked, the encoded tokens are compared.

    Args:
        loss: ``smooth_l1`` (FD), ``mse`` or ``cosine``.
        beta: the smooth-L1 threshold.
        target_dim: the teacher's width when it differs from the student's (a frozen teacher).
        **kwargs: the options of every objective
        (:class:`~m3i_lightning.objectives.base.Objective`): ``weight``, and the backbone's
        ``embed_dim``, ``grid_size``, ``patch_size``.

    Example:
        >>> from m3i_lightning import Backbone
        >>> backbone = Backbone("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=1)
        >>> model = DenseDistill(backbone=backbone)  # alone: a LightningModule
        >>> type(model.head).__name__
        'DenseDistill'
    """

    name = "dense_distill"
    form = "Gaussian"
    target_repr = "dense feature"
    target_view = "view1"
    uses_teacher = True

    def __init__(self, loss: str = "smooth_l1", beta: float = 2.0, target_dim: int | None = None,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.target_width = target_dim or self.embed_dim
        self.head = nn.Linear(self.embed_dim, self.target_width)
        self.distribution = Gaussian(loss, beta)

    def loss(self, batch, encoded, targets):
        target = targets.teacher.tokens
        if target.shape[1] != self.grid_size[0] * self.grid_size[1]:
            raise ConfigError(f"dense_distill: the teacher gives {target.shape[1]} tokens for a "
                              f"student grid of {self.grid_size}; use a teacher with the same "
                              "patch grid")
        if encoded.visible_index is not None:
            target = gather_tokens(target, encoded.visible_index)
        target = F.layer_norm(target, target.shape[-1:])
        return self.distribution(self.head(encoded.tokens), target), {}
