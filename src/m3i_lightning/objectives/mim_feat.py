"""`mim_feat`: masked image modelling with the teacher's dense features as targets."""

from __future__ import annotations

import torch.nn.functional as F

from m3i_lightning.backbone import gather_tokens
from m3i_lightning.distributions import Gaussian
from m3i_lightning.objectives.base import Objective
from m3i_lightning.predictor import TokenPredictor


class MaskedFeature(Objective):
    """data2vec / MILAN / BEiT v2 style: the masked view predicts, at each masked patch, the EMA
    teacher's feature of the full view, normalised by a LayerNorm without affine parameters;
    the stop-gradient teacher is the regulariser."""

    name = "mim_feat"
    form = "Gaussian"
    target_repr = "dense feature"
    masked_input = True
    target_view = "view1"
    uses_teacher = True

    def __init__(self, loss: str = "mse", predictor_dim: int = 768, predictor_depth: int = 4,
                 predictor_heads: int = 16, target_dim: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.target_width = target_dim or self.embed_dim
        self.predictor = TokenPredictor(self.embed_dim, self.target_width,
                                        self.grid_size, predictor_dim, predictor_depth,
                                        predictor_heads)
        self.distribution = Gaussian(loss)

    def loss(self, batch, encoded, targets):
        query = self.predictor.position(encoded.masked_index)
        pred = self.predictor(encoded.tokens, encoded.visible_index, query)
        target = gather_tokens(targets.teacher.tokens, encoded.masked_index)
        target = F.layer_norm(target, target.shape[-1:])
        return self.distribution(pred, target), {}
