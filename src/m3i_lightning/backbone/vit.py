"""The Vision Transformer family: masked encoding by dropping the hidden patches (MAE), or by
a mask token in their place (BEiT, data2vec)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import Tensor, nn

from m3i_lightning.backbone.base import Backbone
from m3i_lightning.backbone.mask_token import MaskTokenInput, new_mask_token
from m3i_lightning.core.encoded import Encoded, Part, gather_tokens
from m3i_lightning.core.positions import grid_coords, sincos_embedding
from m3i_lightning.core.weight_init import xavier_init_

POSITION_EMBEDDINGS = ("learned", "sincos")
INITS = ("timm", "mae", "moco")


class VisionTransformerBackbone(MaskTokenInput, Backbone):
    """A timm ViT. With ``visible_index`` the masked patches are dropped right after the
    position embedding, so the transformer blocks never see them (~N/visible times cheaper).

    ``mask_token=True`` (the backbone's option, not timm's: the exported network has none)
    encodes them instead as BEiT and data2vec do: a learned mask token takes each hidden
    patch's embedding, the position embedding is added to every cell, and all cells run
    through the blocks; the outputs at the hidden cells are ``Encoded.masked_tokens``.

    Three more options of the backbone build the encoders of the reference releases, which
    are not timm's defaults: ``position_embedding='sincos'`` fixes the position embedding to
    the 2-D sin-cos grid, untrained (MAE, MILAN, SiameseIM, MoCo v3; the prefix tokens' rows
    at zero, as MAE's); ``init='mae'`` draws MAE's initialisation (xavier-uniform linear
    layers and patch embedding, zero biases, class token N(0, 0.02)) instead of timm's, and
    ``init='moco'`` MoCo v3's;
    ``freeze_patch_embed=True`` trains no patch embedding (MoCo v3's "random patch
    projection", kept by SiameseIM). The exported network is a plain timm ViT either way.
    """

    family = "vit"
    timm_class = VisionTransformer
    timm_modules = ("vision_transformer", "deit")
    static_shapes = False  # the visible-token count differs between student and teacher
    supports_top_blocks = True
    channels_last = True  # the patch embedding's tokens [B, N, D] ([B, H, W, D] if dynamic)

    def __init__(self, arch: str = "vit_tiny_patch16_224", img_size: int | Sequence[int] = 224,
                 mask_token: bool = False, position_embedding: str = "learned",
                 init: str = "timm", freeze_patch_embed: bool = False, **timm_kwargs) -> None:
        if position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(f"position_embedding must be one of {POSITION_EMBEDDINGS}, "
                             f"got '{position_embedding}'")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got '{init}'")
        super().__init__(arch, img_size, **timm_kwargs)
        self.num_prefix_tokens: int = self.model.num_prefix_tokens
        self.mask_token = new_mask_token(self.embed_dim) if mask_token else None
        self.supports_class_attention = self.model.cls_token is not None
        if init != "timm":
            self.reference_init(init)
        if position_embedding == "sincos":
            self.fix_sincos_positions()
        if freeze_patch_embed:
            self.model.patch_embed.requires_grad_(False)

    def reference_init(self, kind: str) -> None:
        """MAE's ``initialize_weights`` (and MoCo v3's, ``kind='moco'``: each of q, k, v drawn
        as its own xavier-uniform layer, the class token N(0, 1e-6)); the patch embedding as
        a linear layer in both."""
        m = self.model
        xavier_init_(m)
        if kind == "moco":
            for block in m.blocks:
                qkv = block.attn.qkv.weight
                bound = math.sqrt(6.0 / (qkv.shape[0] // 3 + qkv.shape[1]))
                nn.init.uniform_(qkv, -bound, bound)
        projection = m.patch_embed.proj
        nn.init.xavier_uniform_(projection.weight.view(projection.weight.shape[0], -1))
        nn.init.zeros_(projection.bias)
        for token in (m.cls_token, m.reg_token):
            if token is not None:
                nn.init.normal_(token, std=1e-6 if kind == "moco" else 0.02)

    def fix_sincos_positions(self) -> None:
        pos_embed = self.model.pos_embed
        if pos_embed is None:
            raise ValueError(f"'{self.arch}' has no position embedding to fix")
        grid = sincos_embedding(grid_coords(self.model.patch_embed.grid_size), self.embed_dim)
        prefix = grid.new_zeros(pos_embed.shape[1] - grid.shape[0], self.embed_dim)
        with torch.no_grad():
            pos_embed.copy_(torch.cat([prefix, grid]).unsqueeze(0))
        pos_embed.requires_grad_(False)

    @property
    def masks_by_token(self) -> bool:
        return self.mask_token is not None

    def final_stride(self) -> int:
        return self.model.patch_embed.patch_size[0]

    def blocks(self) -> list[nn.Module]:
        return list(self.model.blocks)

    def filter_checkpoint(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        return checkpoint_filter_fn(state, self.model)

    def embed(self, images: Tensor) -> Tensor:
        """Patch embedding plus position embedding, prefix tokens first: [B, P + N, D]; with a
        mask token the patch embedding alone, whose hidden cells it fills before the
        positions are added (:meth:`sequence`)."""
        x = self.model.patch_embed(images)
        return x if self.masks_by_token else self.model._pos_embed(x)

    def sequence(self, parts: Sequence[Part]) -> Tensor:
        """The prefix tokens, then each part's visible patches, each with its own position; with
        a mask token every cell, the hidden ones holding it."""
        if self.masks_by_token:
            return self.model._pos_embed(self.compose(parts))
        p = self.num_prefix_tokens
        patches = [x[:, p:] if visible is None else gather_tokens(x[:, p:], visible)
                   for x, visible in parts]
        return torch.cat([parts[0][0][:, :p], *patches], dim=1)

    def encode(self, x: Tensor, top_blocks: int = 0,
               class_attention: bool = False) -> tuple[Tensor, list[Tensor], Tensor | None]:
        """The transformer on an embedded token sequence (any subset or mixture of patches),
        the outputs of its last ``top_blocks`` blocks (each after its residual, before the
        final norm), and the last block's class-token attention, kept from the same pass."""
        m = self.model
        x = m.norm_pre(m.patch_drop(x))
        kept, attention = [], None
        if top_blocks or class_attention:
            first_kept = len(m.blocks) - top_blocks
            for i, block in enumerate(m.blocks):
                if class_attention and i == len(m.blocks) - 1:
                    attention = self.class_token_attention(block, x)
                x = block(x)
                if i >= first_kept:
                    kept.append(x)
        elif m.grad_checkpointing and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint_sequential(m.blocks, len(m.blocks), x,
                                                             use_reentrant=False)
        else:
            x = m.blocks(x)
        return m.norm(x), kept, attention

    def class_token_attention(self, block: nn.Module, x: Tensor) -> Tensor:
        """softmax(q_cls · k / sqrt(d)) of ``block`` on its input ``x``, averaged over heads,
        at the patches [B, N]: recomputed from the block's qkv, since timm's fused attention
        keeps no weights (as ``nn.MultiheadAttention`` averages them for MILAN's CLIP)."""
        attn = block.attn
        b, n, _ = x.shape
        qkv = attn.qkv(block.norm1(x)).reshape(b, n, 3, attn.num_heads, attn.head_dim)
        q, k = attn.q_norm(qkv[:, :1, 0].transpose(1, 2)), attn.k_norm(qkv[:, :, 1].transpose(1, 2))
        weights = (q @ k.transpose(-2, -1) * attn.scale).softmax(dim=-1)  # [B, heads, 1, P + N]
        return weights.mean(dim=1)[:, 0, self.num_prefix_tokens:]

    def encode_parts(self, parts: Sequence[Part]) -> list[Tensor]:
        tokens = self.encode(self.sequence(parts))[0][:, self.num_prefix_tokens:]
        if self.masks_by_token:
            return [tokens if visible is None else gather_tokens(tokens, visible)
                    for _, visible in parts]
        sizes = [x.shape[1] - self.num_prefix_tokens if visible is None else visible.shape[1]
                 for x, visible in parts]
        return list(tokens.split(sizes, dim=1))

    def pool(self, tokens: Tensor) -> Tensor:
        """Mean, then timm's fc_norm: the prefix tokens are shared by a mix's images."""
        return self.model.fc_norm(tokens.mean(dim=1))

    def forward(self, images: Tensor, visible_index: Tensor | None = None,
                masked_index: Tensor | None = None, top_blocks: int = 0,
                class_attention: bool = False) -> Encoded:
        if not 0 <= top_blocks <= len(self.model.blocks):
            raise ValueError(f"'{self.arch}' has {len(self.model.blocks)} blocks; "
                             f"{top_blocks} top blocks asked for")
        if class_attention and not self.supports_class_attention:
            raise ValueError(f"'{self.arch}' has no class token, so no class attention")
        x, kept, attention = self.encode(self.sequence([(self.embed(images), visible_index)]),
                                         top_blocks, class_attention)
        p = self.num_prefix_tokens
        tokens, blocks, masked = x[:, p:], [k[:, p:] for k in kept], None
        if self.masks_by_token and visible_index is not None:  # every cell was encoded
            if masked_index is not None:
                masked = gather_tokens(tokens, masked_index)
            tokens = gather_tokens(tokens, visible_index)
            blocks = [gather_tokens(b, visible_index) for b in blocks]
        return Encoded(tokens, self.model.forward_head(x, pre_logits=True), visible_index,
                       masked_index, torch.stack(blocks, dim=1) if blocks else None, masked,
                       attention)
