"""The head f_ψ(z_x, t_x, t_y) of dense objectives: a small transformer that fills query slots."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from m3i_lightning.components.heads import GlobalBatchNorm1d
from m3i_lightning.core.positions import grid_coords, sincos_embedding
from m3i_lightning.core.weight_init import xavier_init_


class TokenBatchNorm(nn.Module):
    """BatchNorm of tokens [B, N, C] over every token of the (global) batch: SiameseIM's
    ``PermuteBN``, the norm of its decoder blocks, synchronised over ranks as the release's
    SyncBatchNorm is (:class:`~m3i_lightning.components.heads.GlobalBatchNorm1d`)."""

    def __init__(self, dim: int, **factory) -> None:
        super().__init__()
        self.bn = GlobalBatchNorm1d(dim, **factory)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(x.reshape(-1, x.shape[-1])).reshape(x.shape)


DECODER_NORMS = {"ln": nn.LayerNorm, "bn": TokenBatchNorm}


class PromptedAttention(nn.Module):
    """Attention of the query slots alone: their queries read keys and values of the fixed
    prompts and of the (normed) query slots themselves."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, queries: Tensor, prompts: Tensor) -> Tensor:
        b, n, d = queries.shape
        heads = self.num_heads
        q = self.q(queries).reshape(b, n, heads, d // heads).transpose(1, 2)
        kv = self.kv(torch.cat([prompts, queries], dim=1))
        k, v = kv.reshape(b, -1, 2, heads, d // heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class PromptedBlock(nn.Module):
    """A block of MILAN's prompting decoder (models_milan.py ``Block_fordecoder``): only the
    query slots are updated; the prompts (the encoder's tokens as embedded, un-normed) stay
    fixed through every block and serve as keys and values."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = PromptedAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, queries: Tensor, prompts: Tensor) -> Tensor:
        queries = queries + self.attn(self.norm1(queries), prompts)
        return queries + self.mlp(self.norm2(queries))


class TokenPredictor(nn.Module):
    """Predicts target tokens at query positions from the encoded (visible) tokens.

    The sequence is [encoded tokens + their positions, mask token + query position]; without
    attention masks a transformer is permutation-equivariant, so this equals MAE's decoder on
    the re-ordered full grid, and it also accepts queries at positions of another view.
    ``prompting=True`` is MILAN's decoder instead: the encoded tokens pass every block
    unchanged, as prompts the query slots attend to (:class:`PromptedBlock`), so the
    decoder cannot rewrite the encoder's representation of the visible patches.

    SiameseIM's decoder adds two things (``projector_depth`` > 0, ``norm='bn'``): a projector,
    blocks over the embedded encoder tokens before any decoder position is added (the part
    whose EMA copy also builds the targets, :meth:`project`), and BatchNorm instead of
    LayerNorm in every block, with no norm before the output layer. Batch statistics across
    images are what keep such a stop-gradient dense objective from settling on a
    position-only prediction.
    """

    def __init__(self, in_dim: int, out_dim: int, grid_size: tuple[int, int], dim: int = 128,
                 depth: int = 2, num_heads: int = 4, mlp_ratio: float = 4.0,
                 prompting: bool = False, projector_depth: int = 0, norm: str = "ln") -> None:
        super().__init__()
        if norm not in DECODER_NORMS:
            raise ValueError(f"unknown decoder norm '{norm}'; choose one of {list(DECODER_NORMS)}")
        if prompting and (projector_depth or norm != "ln"):
            raise ValueError("the prompting decoder (MILAN) has no projector and LayerNorm blocks")
        norm_layer = DECODER_NORMS[norm]
        self.embed = nn.Linear(in_dim, dim)
        self.projector = nn.Sequential(*[Block(dim, num_heads, mlp_ratio, qkv_bias=True,
                                               norm_layer=norm_layer)
                                         for _ in range(projector_depth)])
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_embedding(grid_coords(grid_size), dim),
                             persistent=False)
        self.prompting = prompting
        if prompting:
            blocks = [PromptedBlock(dim, num_heads, mlp_ratio) for _ in range(depth)]
        else:
            blocks = [Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                      for _ in range(depth)]
        self.blocks = nn.Sequential(*blocks)
        self.norm = nn.LayerNorm(dim) if norm == "ln" else nn.Identity()
        self.head = nn.Linear(dim, out_dim)
        xavier_init_(self)  # the decoders of MAE, MILAN and SiameseIM
        nn.init.normal_(self.mask_token, std=0.02)

    def project(self, tokens: Tensor) -> Tensor:
        """Encoder tokens [B, N, in_dim] in the decoder's width, through its projector."""
        return self.projector(self.embed(tokens))

    def position(self, index: Tensor) -> Tensor:
        """Position embeddings of patch ``index`` [B, K] of the input grid."""
        return self.pos_embed[index]

    def forward(self, tokens: Tensor, visible_index: Tensor | None, query_pos: Tensor,
                prefix: Tensor | None = None, every_slot: bool = False) -> Tensor:
        """``tokens`` [B, V, in_dim] at ``visible_index`` [B, V] (None = all patches in order);
        ``query_pos`` [B, Q, dim] position embeddings of the slots to predict → [B, Q, out_dim].
        ``prefix`` [B, P, in_dim]: tokens of no grid position (a class token) put before the
        encoded ones; ``every_slot``: the predictions of all P + V + Q slots, in that order."""
        b = tokens.shape[0]
        if visible_index is None:
            context_pos = self.pos_embed.unsqueeze(0).expand(b, -1, -1)
        else:
            context_pos = self.position(visible_index)
        if prefix is not None:  # projected with the tokens; no grid position of its own
            tokens = torch.cat([prefix, tokens], dim=1)
            no_position = context_pos.new_zeros(b, prefix.shape[1], context_pos.shape[-1])
            context_pos = torch.cat([no_position, context_pos], dim=1)
        context = self.project(tokens) + context_pos
        queries = self.mask_token.expand(b, query_pos.shape[1], -1) + query_pos
        if self.prompting:
            for block in self.blocks:
                queries = block(queries, context)
            x = torch.cat([context, queries], dim=1)
        else:
            x = self.blocks(torch.cat([context, queries], dim=1))
        return self.head(self.norm(x if every_slot else x[:, context.shape[1]:]))

