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
    supports_top_blocks = True

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

    def encode(self, x: Tensor, top_blocks: int = 0) -> tuple[Tensor, list[Tensor]]:
        """The transformer on an embedded token sequence (any subset or mixture of patches),
        and the outputs of its last ``top_blocks`` blocks (each after its residual, before the
        final norm), kept from the same pass."""
        m = self.model
        x = m.norm_pre(m.patch_drop(x))
        kept = []
        if top_blocks:
            first_kept = len(m.blocks) - top_blocks
            for i, block in enumerate(m.blocks):
                x = block(x)
                if i >= first_kept:
                    kept.append(x)
        elif m.grad_checkpointing and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint_sequential(m.blocks, len(m.blocks), x,
                                                             use_reentrant=False)
        else:
            x = m.blocks(x)
        return m.norm(x), kept

    def encode_parts(self, parts: Sequence[Part]) -> list[Tensor]:
        tokens = self.encode(self.sequence(parts))[0][:, self.num_prefix_tokens:]
        sizes = [x.shape[1] - self.num_prefix_tokens if visible is None else visible.shape[1]
                 for x, visible in parts]
        return list(tokens.split(sizes, dim=1))

    def pool(self, tokens: Tensor) -> Tensor:
        """Mean, then timm's fc_norm: the prefix tokens are shared by a mix's images."""
        return self.model.fc_norm(tokens.mean(dim=1))

    def forward(self, images: Tensor, visible_index: Tensor | None = None,
                masked_index: Tensor | None = None, top_blocks: int = 0) -> Encoded:
        if not 0 <= top_blocks <= len(self.model.blocks):
            raise ValueError(f"'{self.arch}' has {len(self.model.blocks)} blocks; "
                             f"{top_blocks} top blocks asked for")
        x, kept = self.encode(self.sequence([(self.embed(images), visible_index)]), top_blocks)
        p = self.num_prefix_tokens
        return Encoded(
            tokens=x[:, p:],
            global_feature=self.model.forward_head(x, pre_logits=True),
            visible_index=visible_index,
            masked_index=masked_index,
            top_blocks=torch.stack([k[:, p:] for k in kept], dim=1) if kept else None,
        )
