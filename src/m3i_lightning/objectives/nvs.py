"""`nvs`: novel view synthesis, one crop predicts the pixels of another crop."""

from __future__ import annotations

from m3i_lightning.components.losses import mae_loss
from m3i_lightning.components.pixels import patchify, reconstruction_panels
from m3i_lightning.core.errors import ConfigError
from m3i_lightning.objectives.relative_query import RelativeQueryObjective


class NovelViewSynthesis(RelativeQueryObjective):
    """The full view2 predicts every patch of view1, per-patch normalised pixels (MAE's
    ``norm_pix_loss``), with a Gaussian NLL: the MSE over all target patches. Each decoder query
    sits at its view1 patch's position relative to view2, with view1's relative scale and flip.
    Fixed pixel targets need no regulariser.

    Args:
        norm_pix: standardise each target patch (MAE's ``norm_pix_loss``).
        **kwargs: the decoder's options (``predictor_dim``, ``predictor_depth``,
            ``predictor_heads`` of
            :class:`~m3i_lightning.objectives.relative_query.RelativeQueryObjective`) and those of
            every objective.

    Example:
        >>> from m3i_lightning import Backbone
        >>> backbone = Backbone("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=1)
        >>> model = NovelViewSynthesis(backbone=backbone, predictor_depth=2)
        >>> type(model.head).__name__
        'NovelViewSynthesis'
    """

    name = "nvs"
    form = "Gaussian"
    target_repr = "dense pixels"

    def __init__(self, norm_pix: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        if self.patch_size is None:
            raise ConfigError(f"{type(self).__name__} needs the backbone's patch_size")
        self.norm_pix = norm_pix
        self.predictor = self.relative_predictor(3 * self.patch_size**2)

    def loss(self, batch, encoded, targets):
        pred = self.predict(batch, encoded, targets)
        patches = patchify(targets.pixels, self.patch_size)
        return mae_loss(pred, patches, norm_pix=self.norm_pix), {}

    def pictures(self, batch, encoded, targets):
        return reconstruction_panels(batch[targets.input_view], targets.pixels,
                                     self.predict(batch, encoded, targets), None,
                                     encoded.masked_index, self.patch_size, self.norm_pix)
