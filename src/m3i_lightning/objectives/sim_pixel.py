"""`sim_pixel`: Siamese image modelling of pixels."""

from __future__ import annotations

from m3i_lightning.objectives.nvs import NovelViewSynthesis


class SiamesePixel(NovelViewSynthesis):
    """SiameseIM's set-up with pixel targets: the *masked* view2 predicts every patch of view1
    (normalised pixels, MSE over all target patches) through relative queries. Masking makes
    the encoder cheaper and the task harder than :class:`NovelViewSynthesis`; predicting the
    other crop, rather than the hidden patches of the same one, adds the inter-view alignment
    that MAE lacks.
    """

    name = "sim_pixel"
    masked_input = True
