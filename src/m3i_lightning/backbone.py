"""The student encoder f_θ: a thin wrapper over a timm ViT that can encode visible tokens only."""

from __future__ import annotations

from dataclasses import dataclass

import timm
import torch
from torch import Tensor, nn


@dataclass
class Encoded:
    """What one encoder pass yields; every objective reads from this instead of re-encoding.

    ``tokens`` holds the patch tokens that were encoded (all of them, or only the visible ones),
    in the order of ``visible_index``; ``masked_index`` lists the patches left out.
    """

    tokens: Tensor
    global_feature: Tensor
    visible_index: Tensor | None = None
    masked_index: Tensor | None = None

    def select(self, rows: Tensor) -> Encoded:
        """The same encoding for the samples ``rows`` of the batch (e.g. a permutation)."""
        return Encoded(*(None if t is None else t[rows] for t in (
            self.tokens, self.global_feature, self.visible_index, self.masked_index)))


def gather_tokens(tokens: Tensor, index: Tensor) -> Tensor:
    """Pick ``index`` [B, K] along the token axis of ``tokens`` [B, N, D]."""
    return tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


class Backbone(nn.Module):
    """A timm Vision Transformer returning dense patch tokens and a global feature.

    With ``visible_index`` the masked patches are dropped right after the position embedding,
    so the transformer blocks never see them (MAE-style encoding, ~N/visible times cheaper).
    The timm architecture name and its keyword arguments are kept so the weights can be
    exported and re-created with ``timm.create_model(arch, **timm_kwargs)``.
    """

    def __init__(self, arch: str = "vit_tiny_patch16_224", **timm_kwargs) -> None:
        super().__init__()
        if arch not in timm.list_models():
            raise ValueError(f"unknown timm architecture '{arch}'")
        self.arch = arch
        self.timm_kwargs = {"num_classes": 0, **timm_kwargs}
        self.model = timm.create_model(arch, pretrained=False, **self.timm_kwargs)
        if not hasattr(self.model, "_pos_embed"):
            raise ValueError(f"'{arch}' is not a ViT: masked encoding needs a timm "
                             "VisionTransformer")
        self.embed_dim: int = self.model.embed_dim
        self.grid_size: tuple[int, int] = tuple(self.model.patch_embed.grid_size)
        self.patch_size: int = self.model.patch_embed.patch_size[0]
        self.num_patches: int = self.grid_size[0] * self.grid_size[1]
        self.num_prefix_tokens: int = self.model.num_prefix_tokens

    def embed(self, images: Tensor) -> Tensor:
        """Patch embedding plus position embedding, prefix tokens first: [B, P + N, D]."""
        return self.model._pos_embed(self.model.patch_embed(images))

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

    def pool(self, tokens: Tensor) -> Tensor:
        """Global feature of a group of encoded patch tokens (mean, then timm's fc_norm): M3I's
        mixed input pools each image over its own tokens."""
        return self.model.fc_norm(tokens.mean(dim=1))

    def forward(self, images: Tensor, visible_index: Tensor | None = None,
                masked_index: Tensor | None = None) -> Encoded:
        x = self.embed(images)
        if visible_index is not None:
            prefix, patches = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens:]
            x = torch.cat([prefix, gather_tokens(patches, visible_index)], dim=1)
        x = self.encode(x)
        return Encoded(
            tokens=x[:, self.num_prefix_tokens:],
            global_feature=self.model.forward_head(x, pre_logits=True),
            visible_index=visible_index,
            masked_index=masked_index,
        )
