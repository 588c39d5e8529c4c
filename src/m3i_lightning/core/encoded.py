"""The one contract between encoders and objectives: what one encoder pass yields.

It lives below every family and every head (plain tensors, torch only), so a loss or an
objective can read an encoding without importing timm.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class Encoded:
    """What one encoder pass yields; every objective reads from this instead of re-encoding.

    ``tokens`` holds the final-grid tokens that were encoded (all of them, or only the visible
    ones), in the order of ``visible_index``; ``masked_index`` lists the cells left out.
    ``top_blocks`` [B, K, N, D], when asked for, holds the same tokens as the last K blocks
    output them (before the final norm), kept from the same pass: data2vec's targets.
    ``masked_tokens`` holds the outputs at the cells of ``masked_index``, in its order, when the
    backbone encoded those cells as a mask token (:attr:`Backbone.masks_by_token`).
    ``class_attention`` [B, N], when asked for, is the last block's attention of the class
    token to each patch, averaged over heads: what MILAN's mask sampling follows.
    """

    tokens: Tensor
    global_feature: Tensor
    visible_index: Tensor | None = None
    masked_index: Tensor | None = None
    top_blocks: Tensor | None = None
    masked_tokens: Tensor | None = None
    class_attention: Tensor | None = None

    def select(self, rows: Tensor | slice) -> Encoded:
        """The same encoding for the samples ``rows`` of the batch (a permutation, or a slice:
        one input's part of a batched pass)."""
        return Encoded(*(None if t is None else t[rows] for t in (
            self.tokens, self.global_feature, self.visible_index, self.masked_index,
            self.top_blocks, self.masked_tokens, self.class_attention)))


def gather_tokens(tokens: Tensor, index: Tensor) -> Tensor:
    """Pick ``index`` [B, K] along the token axis of ``tokens`` [B, N, D]."""
    return tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


# One part of an encoder input: an embedding and the final-grid cells of it that are visible
# (None: every cell). M3I's mix encodes two parts in one pass.
Part = tuple[Tensor, Tensor | None]
