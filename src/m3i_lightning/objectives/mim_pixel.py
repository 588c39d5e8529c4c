"""`mim_pixel`: masked image modelling of pixels (MAE)."""

from __future__ import annotations

from m3i_lightning.objectives.ae import AutoEncoder


class MaskedPixel(AutoEncoder):
    """MAE: the encoder sees only the visible patches, the light decoder fills the masked
    slots, and the loss is the MSE of per-patch normalised pixels on the masked patches only.

    The asymmetry is the point: the encoder pays for the visible quarter of the image, and
    reconstructing what it never saw is what makes its features useful. MAE's ViT-B decoder
    (depth 8, width 512, 16 heads) is the default.
    """

    name = "mim_pixel"
    masked_input = True

    def patches_to_predict(self, encoded):
        return encoded.masked_index
