"""Hierarchical families (ConvNeXt, Swin): masked input by SimMIM-style mask tokens.

A convolution or a shifted window cannot skip tokens, so compute stays dense: the patch
embedding of every hidden cell is replaced by one learned mask token and the whole map runs
through the stages. A cell of the mask is a cell of the last stage's grid, upsampled to the
patch-embedding grid; the patch embedding is non-overlapping, so hidden pixels never reach the
network. The encoded tokens are the final map's visible cells, in the order of
``visible_index``, and the global feature pools those cells alone, as the ViT sees only its
visible patches; the final map's hidden cells are kept too (``Encoded.masked_tokens``).
"""

from __future__ import annotations

from collections.abc import Sequence

from timm.models import convnext, swin_transformer
from torch import Tensor, nn

from m3i_lightning.backbone.base import Backbone
from m3i_lightning.backbone.mask_token import MaskTokenInput, new_mask_token
from m3i_lightning.core.encoded import Encoded, Part, gather_tokens


class MaskTokenBackbone(MaskTokenInput, Backbone):
    """Shared mechanism of the hierarchical families; each says where its patch embedding is,
    how its stages run, and its layout (``channels_last``: NHWC maps, else NCHW)."""

    masks_by_token = True

    def __init__(self, arch: str, img_size: int | Sequence[int] = 224, **timm_kwargs) -> None:
        super().__init__(arch, img_size, **timm_kwargs)
        embed_stride = self.embed_stride()
        if self.patch_size % embed_stride:
            raise ValueError(f"'{arch}': final stride {self.patch_size} is not a multiple of "
                             f"the patch embedding's {embed_stride}")
        self.cell_size = self.patch_size // embed_stride  # embedding cells per final cell
        self.mask_token = new_mask_token(self.embed_width())

    def embed_stride(self) -> int:
        raise NotImplementedError

    def embed_width(self) -> int:
        raise NotImplementedError

    def stages(self, x: Tensor) -> Tensor:
        """Every stage and the final norm, on a patch-embedding map in the model's layout."""
        raise NotImplementedError

    def _flatten(self, x: Tensor) -> Tensor:
        """A map in the model's layout → tokens [B, H·W, D], row-major."""
        return x.flatten(1, 2) if self.channels_last else x.flatten(2).transpose(1, 2)

    def encode_parts(self, parts: Sequence[Part]) -> list[Tensor]:
        tokens = self._flatten(self.stages(self.compose(parts)))
        return [tokens if visible is None else gather_tokens(tokens, visible)
                for _, visible in parts]

    def pool(self, tokens: Tensor) -> Tensor:
        """timm's head on the K tokens laid out as a K×1 map: for every pooling type it equals
        the head on a map of those cells."""
        x = tokens.unsqueeze(2) if self.channels_last else tokens.transpose(1, 2).unsqueeze(-1)
        return self.model.forward_head(x, pre_logits=True)

    def forward(self, images: Tensor, visible_index: Tensor | None = None,
                masked_index: Tensor | None = None) -> Encoded:
        x = self.stages(self.compose([(self.embed(images), visible_index)]))
        tokens = self._flatten(x)
        if visible_index is None:  # timm's own head on the map: the exported network's output
            return Encoded(tokens, self.model.forward_head(x, pre_logits=True), None,
                           masked_index)
        masked = None if masked_index is None else gather_tokens(tokens, masked_index)
        tokens = gather_tokens(tokens, visible_index)
        return Encoded(tokens, self.pool(tokens), visible_index, masked_index,
                       masked_tokens=masked)


class ConvNeXtBackbone(MaskTokenBackbone):
    """A timm ConvNeXt; masked cells get the mask token after the stem (conv + norm)."""

    family = "convnext"
    timm_class = convnext.ConvNeXt
    timm_modules = ("convnext",)
    timm_takes_img_size = False
    channels_last = False

    def __init__(self, arch: str, img_size: int | Sequence[int] = 224, **timm_kwargs) -> None:
        super().__init__(arch, img_size, **timm_kwargs)
        conv = self.model.stem[0]
        if len(self.model.stem) != 2 or conv.kernel_size != conv.stride:
            raise ValueError(f"'{arch}': masking needs the non-overlapping patch stem "
                             "(stem_type='patch'), so hidden pixels cannot leak")

    def embed_stride(self) -> int:
        return self.model.stem[0].stride[0]

    def embed_width(self) -> int:
        return self.model.stem[0].out_channels

    def blocks(self) -> list[nn.Module]:
        return [block for stage in self.model.stages for block in stage.blocks]

    def filter_checkpoint(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        return convnext.checkpoint_filter_fn(state, self.model)

    def embed(self, images: Tensor) -> Tensor:
        return self.model.stem(images)

    def stages(self, x: Tensor) -> Tensor:
        return self.model.norm_pre(self.model.stages(x))


class SwinBackbone(MaskTokenBackbone):
    """A timm Swin Transformer; masked cells get the mask token after the patch embedding
    (conv + norm), as SimMIM does. ``dynamic_img_size=True`` lets it encode other sizes."""

    family = "swin"
    timm_class = swin_transformer.SwinTransformer
    timm_modules = ("swin_transformer",)
    channels_last = True

    def embed_stride(self) -> int:
        return self.model.patch_embed.patch_size[0]

    def embed_width(self) -> int:
        return self.model.patch_embed.proj.out_channels

    def blocks(self) -> list[nn.Module]:
        return [block for stage in self.model.layers for block in stage.blocks]

    def filter_checkpoint(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        return swin_transformer.checkpoint_filter_fn(state, self.model)

    def embed(self, images: Tensor) -> Tensor:
        return self.model.patch_embed(images)

    def stages(self, x: Tensor) -> Tensor:
        return self.model.norm(self.model.layers(x))
