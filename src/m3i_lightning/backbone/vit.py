"""The Vision Transformer family: masked encoding by dropping the hidden patches (MAE)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import Tensor, nn

from m3i_lightning.backbone.base import Backbone, Encoded, Part, gather_tokens


class VisionTransformerBackbone(Backbone):
    """A timm ViT. With ``visible_index`` the masked patches are dropped right after the
    position embedding, so the transformer blocks never see them (~N/visible times cheaper).
    """

    family = "vit"
    timm_class = VisionTransformer
    timm_modules = ("vision_transformer", "deit")
    static_shapes = False  # the visible-token count differs between student and teacher

    def __init__(self, arch: str = "vit_tiny_patch16_224", img_size: int | Sequence[int] = 224,
                 **timm_kwargs) -> None:
        super().__init__(arch, img_size, **timm_kwargs)
        self.num_prefix_tokens: int = self.model.num_prefix_tokens

    def final_stride(self) -> int:
        return self.model.patch_embed.patch_size[0]

    def blocks(self) -> list[nn.Module]:
        return list(self.model.blocks)

    def filter_checkpoint(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        return checkpoint_filter_fn(state, self.model)

    def embed(self, images: Tensor) -> Tensor:
        """Patch embedding plus position embedding, prefix tokens first: [B, P + N, D]."""
        return self.model._pos_embed(self.model.patch_embed(images))

    def sequence(self, parts: Sequence[Part]) -> Tensor:
        """The prefix tokens, then each part's visible patches, each with its own position."""
        p = self.num_prefix_tokens
        patches = [x[:, p:] if visible is None else gather_tokens(x[:, p:], visible)
                   for x, visible in parts]
        return torch.cat([parts[0][0][:, :p], *patches], dim=1)

    def encode(self, x: Tensor) -> Tensor:
        """The transformer on an embedded token sequence (any subset or mixture of patches)."""
        m = self.model
        x = m.norm_pre(m.patch_drop(x))
        if m.grad_checkpointing and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint_sequential(m.blocks, len(m.blocks), x,
                                                             use_reentrant=False)
        else:
            x = m.blocks(x)
        return m.norm(x)

    def encode_parts(self, parts: Sequence[Part]) -> list[Tensor]:
        tokens = self.encode(self.sequence(parts))[:, self.num_prefix_tokens:]
        sizes = [x.shape[1] - self.num_prefix_tokens if visible is None else visible.shape[1]
                 for x, visible in parts]
        return list(tokens.split(sizes, dim=1))

    def pool(self, tokens: Tensor) -> Tensor:
        """Mean, then timm's fc_norm: the prefix tokens are shared by a mix's images."""
        return self.model.fc_norm(tokens.mean(dim=1))

    def forward(self, images: Tensor, visible_index: Tensor | None = None,
                masked_index: Tensor | None = None) -> Encoded:
        x = self.encode(self.sequence([(self.embed(images), visible_index)]))
        return Encoded(
            tokens=x[:, self.num_prefix_tokens:],
            global_feature=self.model.forward_head(x, pre_logits=True),
            visible_index=visible_index,
            masked_index=masked_index,
        )
