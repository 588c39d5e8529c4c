"""`sim_pixel`: Siamese image modelling of pixels."""

from __future__ import annotations

from m3i_lightning.objectives.nvs import NovelViewSynthesis


class SiamesePixel(NovelViewSynthesis):
    """SiameseIM's set-up with pixel targets: the *masked* view2 predicts every patch of view1
    (normalised pixels, MSE over all target patches) through relative queries. Masking makes
    the encoder cheaper and the task harder than :class:`NovelViewSynthesis`; predicting the
    other crop, rather than the hidden patches of the same one, adds the inter-view alignment
    that MAE lacks.

    Args:
        **kwargs: :class:`NovelViewSynthesis`'s options (``norm_pix``, ``predictor_dim``,
            ``predictor_depth``, ``predictor_heads``) and those of every objective.

    Example:
        >>> from m3i_lightning import Backbone
        >>> backbone = Backbone("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=1)
        >>> model = SiamesePixel(backbone=backbone, predictor_depth=2)
        >>> type(model.head).__name__
        'SiamesePixel'
    """

    name = "sim_pixel"
    masked_input = True
