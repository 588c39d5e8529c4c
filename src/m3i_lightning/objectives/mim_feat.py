"""`mim_feat`: masked image modelling with the teacher's dense features as targets."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from m3i_lightning.components.distributions import Gaussian
from m3i_lightning.components.predictor import TokenPredictor
from m3i_lightning.core.encoded import gather_tokens
from m3i_lightning.core.errors import ConfigError, check_options
from m3i_lightning.objectives.base import Objective

# ``predictor``: the head that predicts the masked cells' features (see MaskedFeature).
PREDICTORS = ("transformer", "prompting", "linear")
TARGET_NORMS = ("layer", "none")  # LayerNorm without affine parameters, or the raw feature
LOSS_TOKENS = ("masked", "all")  # the masked patches, or MILAN's class token and every patch


class MaskedFeature(Objective):
    """data2vec / MILAN / BEiT v2 style: the masked view predicts, at each masked patch, the
    teacher's feature of the full view, normalised by a LayerNorm without affine parameters;
    the stop-gradient teacher is the regulariser.

    The feature is the teacher's output token (``target_blocks=0``, MILAN's CLIP target), or
    data2vec's: the average of the outputs of the teacher's last ``target_blocks`` blocks, each
    taken after its residual and before the final norm, as the data2vec vision release does
    (fairseq ``Data2VecVisionConfig``: ``end_of_block_targets``, no per-block normalisation,
    ``layer_norm_targets`` on the average; ``average_top_k_layers: 6`` for ViT-B). The
    teacher keeps those outputs from its one pass.

    The prediction comes from a :class:`TokenPredictor` (``predictor="transformer"``): a small
    transformer that fills the masked cells from the encoded visible tokens, the head of an
    MAE-style encoder. ``predictor="linear"`` is data2vec's own: the student encodes the masked
    cells as a mask token with the rest (a backbone whose ``masks_by_token``: a ViT with
    ``mask_token=True``, as data2vec's BEiT encoder, or a hierarchical one) and one linear
    layer reads its outputs at the masked cells (the release's ``lm_head`` after the final
    norm, data2vec_vision beit/modeling_cyclical.py; fairseq's ``final_proj``).

    MILAN's options: ``predictor="prompting"``, its decoder, where the encoded tokens stay
    fixed prompts and only the mask tokens are updated (``TokenPredictor(prompting=True)``);
    ``loss_tokens="all"``, its loss over the class token (the global feature, here a
    token-pooled ViT's class token, a prompt of the decoder too) and every patch, visible ones
    included; ``target_norm="none"``, its raw CLIP target (the cosine loss L2-normalises).

    Args:
        loss: ``mse``, ``smooth_l1`` or ``cosine``.
        beta: the smooth-L1 threshold (data2vec: 2).
        predictor: ``transformer``, ``prompting`` (MILAN) or ``linear`` (data2vec).
        predictor_dim: width of the transformer predictor.
        predictor_depth: its blocks.
        predictor_heads: its attention heads.
        target_dim: the teacher's width when it differs from the student's.
        target_blocks: 0: the teacher's output tokens; K: data2vec's average of its last K block
            outputs.
        target_norm: ``layer`` (the target LayerNorm-ed, data2vec) or ``none`` (MILAN).
        loss_tokens: ``masked`` (the masked patches) or ``all`` (MILAN: the class token and every
            patch).
        **kwargs: the options of every objective
        (:class:`~m3i_lightning.objectives.base.Objective`): ``weight``, and the backbone's
        ``embed_dim``, ``grid_size``, ``patch_size``.

    Example:
        >>> from m3i_lightning import Backbone
        >>> backbone = Backbone("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=1)
        >>> model = MaskedFeature(backbone=backbone, predictor_depth=2)
        >>> type(model.head).__name__
        'MaskedFeature'
    """

    name = "mim_feat"
    form = "Gaussian"
    target_repr = "dense feature"
    masked_input = True
    target_view = "view1"
    uses_teacher = True

    @classmethod
    def trains_global_feature(cls, *, loss_tokens: str = "masked", **options) -> bool:
        return loss_tokens == "all"  # MILAN's loss predicts the class token

    def __init__(self, loss: str = "mse", beta: float = 1.0, predictor: str = "transformer",
                 predictor_dim: int = 768, predictor_depth: int = 4, predictor_heads: int = 16,
                 target_dim: int | None = None, target_blocks: int = 0,
                 target_norm: str = "layer", loss_tokens: str = "masked", **kwargs) -> None:
        super().__init__(**kwargs)
        check_options({
            "target_blocks": (target_blocks, lambda k: isinstance(k, int) and k >= 0,
                              "an integer >= 0"),
            "predictor": (predictor, lambda p: p in PREDICTORS, f"one of {list(PREDICTORS)}"),
            "target_norm": (target_norm, lambda n: n in TARGET_NORMS,
                            f"one of {list(TARGET_NORMS)}"),
            "loss_tokens": (loss_tokens, lambda t: t in LOSS_TOKENS,
                            f"one of {list(LOSS_TOKENS)}")})
        if loss_tokens == "all" and (predictor == "linear" or target_blocks):
            raise ConfigError("loss_tokens='all' predicts the class token and the visible "
                              "patches through the transformer predictor from the teacher's "
                              "output tokens: it needs predictor='transformer' or "
                              "predictor='prompting', and target_blocks=0")
        self.target_norm, self.loss_tokens = target_norm, loss_tokens
        self.teacher_blocks = target_blocks
        self.target_width = target_dim or self.embed_dim
        self.reads_masked_tokens = predictor == "linear"
        if self.reads_masked_tokens:
            self.predictor = nn.Linear(self.embed_dim, self.target_width)
        else:
            self.predictor = TokenPredictor(self.embed_dim, self.target_width,
                                            self.grid_size, predictor_dim, predictor_depth,
                                            predictor_heads, prompting=predictor == "prompting")
        self.distribution = Gaussian(loss, beta)

    def loss(self, batch, encoded, targets):
        teacher = targets.teacher
        if self.loss_tokens == "all":
            pred, target = self.every_token(encoded, teacher)
        else:
            if self.reads_masked_tokens:
                pred = self.predictor(encoded.masked_tokens)
            else:
                query = self.predictor.position(encoded.masked_index)
                pred = self.predictor(encoded.tokens, encoded.visible_index, query)
            if self.teacher_blocks:
                features = teacher.top_blocks[:, -self.teacher_blocks:].mean(dim=1)
            else:
                features = teacher.tokens
            target = gather_tokens(features, encoded.masked_index)
        if self.target_norm == "layer":
            target = F.layer_norm(target, target.shape[-1:])
        return self.distribution(pred, target), {}

    def every_token(self, encoded, teacher):
        """MILAN's (prediction, target) pairs of the class token, the visible patches and the
        masked ones, in that order: the class token (the global feature) joins the
        predictor's context, which predicts every slot (models_milan.py ``forward_loss``)."""
        pred = self.predictor(encoded.tokens, encoded.visible_index,
                              self.predictor.position(encoded.masked_index),
                              prefix=encoded.global_feature.unsqueeze(1), every_slot=True)
        target = torch.cat([teacher.global_feature.unsqueeze(1),
                            gather_tokens(teacher.tokens, encoded.visible_index),
                            gather_tokens(teacher.tokens, encoded.masked_index)], dim=1)
        return pred, target
