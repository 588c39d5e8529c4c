"""`sim_feat`: Siamese image modelling (SiameseIM) of the teacher's dense features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from m3i_lightning.components.losses import autocast_off, feature_correlation, unigrad_loss
from m3i_lightning.core.distributed import mean_over_ranks
from m3i_lightning.core.encoded import Encoded
from m3i_lightning.core.errors import ConfigError
from m3i_lightning.objectives.relative_query import RelativeQueryObjective


class SiameseFeature(RelativeQueryObjective):
    """SiameseIM (Tao et al., CVPR 2023): the masked view2 predicts, at every patch of view1,
    the EMA teacher's dense feature of the full view1, normalised by a LayerNorm without affine
    parameters. Queries carry view1's position, scale and flip relative to view2, so the
    predictor must both match the views (semantic alignment, as instance discrimination does)
    and fill in content it never saw (spatial sensitivity, as masked image modelling does).

    The loss is the dense UniGrad loss (:func:`~m3i_lightning.components.losses.unigrad_loss`):
    a Gaussian pull to the stop-gradient target plus ``neg_weight`` (0.02) times a decorrelation
    term on the predictions. Its correlation matrix F of the targets is averaged over ranks;
    ``correlation_momentum`` ρ keeps a moving average F ← ρF + (1−ρ)F_batch as UniGrad does for
    global features, while 0 (the default) uses each batch's own F, as SiameseIM does: B·N
    dense targets per step already estimate it well. The loss is computed in float32.

    The decoder is the release's: the encoder tokens pass a projector (``projector_depth``
    blocks, 2) before the predictor blocks, and every block normalises with BatchNorm over
    the batch's tokens (``decoder_norm='bn'``; 'ln': MAE's LayerNorm decoder).
    Targets as SiameseIM's code builds them (``target_projection``, the default): the teacher
    tokens go through the EMA copy of the decoder's input projection and projector, then the
    LayerNorm, so prediction and target live in the decoder's width; without it, the
    LayerNorm-ed teacher tokens themselves (the paper's description).
    The decoder reads the global feature before the visible tokens (``class_token``, as the
    release's decoder reads the encoder's class token): on a ViT without mix, its class token,
    which a sim_feat run therefore trains and is read by; with M3I's mix, each image's
    mean-pooled own tokens, its global feature there.

    Args:
        neg_weight: λ of the UniGrad decorrelation term.
        correlation_momentum: 0: each batch's target correlation (SiameseIM); UniGrad: 0.99.
        target_projection: targets through the EMA copy of the decoder's projection (SiameseIM's
            code), else the LayerNorm-ed teacher tokens.
        projector_depth: blocks of the decoder's projector, before the predictor blocks.
        decoder_norm: ``bn`` (BatchNorm over the batch's tokens, SiameseIM) or ``ln`` (MAE).
        class_token: the decoder reads the global feature before the visible tokens.
        **kwargs: the decoder's options (``predictor_dim``, ``predictor_depth``,
            ``predictor_heads`` of
            :class:`~m3i_lightning.objectives.relative_query.RelativeQueryObjective`) and those of
            every objective.

    Example:
        >>> from m3i_lightning import Backbone
        >>> backbone = Backbone("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=1)
        >>> model = SiameseFeature(backbone=backbone, predictor_depth=2)
        >>> type(model.head).__name__
        'SiameseFeature'
    """

    name = "sim_feat"
    form = "Gaussian"
    target_repr = "dense feature"
    masked_input = True
    uses_teacher = True

    @classmethod
    def trains_global_feature(cls, *, class_token: bool = True, **options) -> bool:
        return class_token

    def __init__(self, neg_weight: float = 0.02, correlation_momentum: float = 0.0,
                 target_projection: bool = True, projector_depth: int = 2,
                 decoder_norm: str = "bn", class_token: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.class_token = class_token
        if not 0.0 <= correlation_momentum < 1.0:
            raise ConfigError(f"correlation_momentum={correlation_momentum} must be in [0, 1)")
        self.neg_weight, self.correlation_momentum = neg_weight, correlation_momentum
        width = self.predictor_shape[0] if target_projection else self.embed_dim
        self.predictor = self.relative_predictor(width, projector_depth=projector_depth,
                                                 norm=decoder_norm)
        self.target_projection = target_projection
        if target_projection:
            self.add_momentum_copy("predictor.decoder.embed")
            self.add_momentum_copy("predictor.decoder.projector")
        self.register_buffer("correlation", torch.zeros(width, width))
        self.register_buffer("correlation_seen", torch.tensor(False))

    def decoder_prefix(self, encoded: Encoded) -> Tensor | None:
        return encoded.global_feature.unsqueeze(1) if self.class_token else None

    @torch.no_grad()
    def update_correlation(self, target: Tensor) -> Tensor:
        """Fold this batch's target correlation into F and return F [D, D]."""
        batch = mean_over_ranks(feature_correlation(target))
        # the first batch is taken whole; a tensor weight, so the device is never asked (a sync)
        rho = self.correlation_momentum * self.correlation_seen.float()
        self.correlation.lerp_(batch, 1.0 - rho)
        self.correlation_seen.fill_(True)
        return self.correlation

    def loss(self, batch, encoded, targets):
        pred = self.predict(batch, encoded, targets)
        with autocast_off(pred.device.type):
            teacher = targets.teacher.tokens.float()
            if self.target_projection:
                with torch.no_grad():
                    teacher = self.momentum_predictor_decoder_projector(
                        self.momentum_predictor_decoder_embed(teacher)).float()
            target = F.layer_norm(teacher, teacher.shape[-1:])
            correlation = self.update_correlation(target)
            return unigrad_loss(pred.float(), target, correlation, self.neg_weight), {}
