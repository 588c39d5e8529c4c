"""`mim_pixel`: masked image modelling of pixels (MAE)."""

from __future__ import annotations

from m3i_lightning.objectives.ae import AutoEncoder


class MaskedPixel(AutoEncoder):
    """MAE: the encoder sees only the visible patches, the light decoder fills the masked
    slots, and the loss is the MSE of per-patch normalised pixels on the masked patches only.

    The asymmetry is the point: the encoder pays for the visible quarter of the image, and
    reconstructing what it never saw is what makes its features useful. MAE's ViT-B decoder
    (depth 8, width 512, 16 heads) is the default.

    Args:
        **kwargs: :class:`AutoEncoder`'s options (``norm_pix``, ``decoder_dim``,
            ``decoder_depth``, ``decoder_heads``) and those of every objective (``weight``, the
            backbone's sizes).

    Example:
        >>> from m3i_lightning import Backbone
        >>> backbone = Backbone("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=1)
        >>> model = MaskedPixel(backbone=backbone, decoder_depth=2)
        >>> type(model.head).__name__
        'MaskedPixel'
    """

    name = "mim_pixel"
    masked_input = True

    def patches_to_predict(self, encoded):
        return encoded.masked_index
