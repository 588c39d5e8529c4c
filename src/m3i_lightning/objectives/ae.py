"""`ae`: auto-encoding, the view reconstructs its own per-patch normalised pixels."""

from __future__ import annotations

from torch import Tensor

from m3i_lightning.components.losses import mae_loss
from m3i_lightning.components.pixels import patchify, reconstruction_panels
from m3i_lightning.components.predictor import TokenPredictor
from m3i_lightning.core.encoded import Encoded, gather_tokens
from m3i_lightning.core.errors import ConfigError
from m3i_lightning.objectives.base import Objective, Targets


class AutoEncoder(Objective):
    """The full view predicts its own pixels at every patch through a light decoder; each
    target patch is standardised by its own mean and variance (MAE's ``norm_pix_loss``) and
    the Gaussian NLL is the MSE over all patches. Fixed pixel targets need no regulariser.

    The decoder is MAE's: a small transformer over the encoded tokens plus one query slot per
    patch to reconstruct, so the same head also works when the shared input is masked.

    Args:
        norm_pix: standardise each target patch by its own mean and variance (MAE's
            ``norm_pix_loss``).
        decoder_dim: width of the decoder.
        decoder_depth: its transformer blocks.
        decoder_heads: its attention heads.
        **kwargs: the options of every objective
        (:class:`~m3i_lightning.objectives.base.Objective`): ``weight``, and the backbone's
        ``embed_dim``, ``grid_size``, ``patch_size``.

    Example:
        >>> from m3i_lightning import Backbone
        >>> backbone = Backbone("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=1)
        >>> model = AutoEncoder(backbone=backbone, decoder_depth=2)
        >>> type(model.head).__name__
        'AutoEncoder'
    """

    name = "ae"
    form = "Gaussian"
    target_repr = "dense pixels"
    target_view = "view1"

    def __init__(self, norm_pix: bool = True, decoder_dim: int = 512, decoder_depth: int = 8,
                 decoder_heads: int = 16, **kwargs) -> None:
        super().__init__(**kwargs)
        if self.patch_size is None:
            raise ConfigError(f"{type(self).__name__} needs the backbone's patch_size")
        self.norm_pix = norm_pix
        self.decoder = TokenPredictor(self.embed_dim, 3 * self.patch_size**2, self.grid_size,
                                      decoder_dim, decoder_depth, decoder_heads)

    def patches_to_predict(self, encoded: Encoded) -> Tensor | None:
        """Indices [B, Q] of the patches to reconstruct; None for all of them."""
        return None

    def predict_patches(self, encoded: Encoded,
                        targets: Targets) -> tuple[Tensor, Tensor, Tensor | None]:
        """(predicted patches, their target patches, their indices or None for all)."""
        patches = patchify(targets.pixels, self.patch_size)
        index = self.patches_to_predict(encoded)
        if index is None:
            query = self.decoder.pos_embed.expand(patches.shape[0], -1, -1)
        else:
            query = self.decoder.position(index)
            patches = gather_tokens(patches, index)
        pred = self.decoder(encoded.tokens, encoded.visible_index, query)
        return pred, patches, index

    def loss(self, batch, encoded, targets):
        pred, patches, _ = self.predict_patches(encoded, targets)
        return mae_loss(pred, patches, norm_pix=self.norm_pix), {}

    def pictures(self, batch, encoded, targets):
        pred, _, index = self.predict_patches(encoded, targets)
        return reconstruction_panels(batch[targets.input_view], targets.pixels, pred, index,
                                     encoded.masked_index, self.patch_size, self.norm_pix)
