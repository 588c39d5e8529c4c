"""`clip`: image-text contrastive learning with a text tower and batch negatives."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from m3i_lightning.components.losses import clip_loss
from m3i_lightning.components.text import TextTower
from m3i_lightning.core.distributed import gather_with_grad
from m3i_lightning.objectives.base import Objective


class CLIP(Objective):
    """Symmetric InfoNCE between the image global feature and the paired caption (CLIP).

    Texts of the whole global batch are the negatives: embeddings are gathered across ranks
    with gradients and each rank scores its own rows (open_clip's local loss). The logit
    scale is learned from 1/0.07 and clamped at 100. Images without a caption
    (``text_valid`` False) are left out of the loss, as queries and as negatives.
    """

    name = "clip"
    reads_global_feature = True
    form = "Boltzmann"
    target_repr = "paired text"
    requires = frozenset({"text"})
    min_batch_size = 2  # the other captions of the batch are the negatives

    def __init__(self, tokenizer, proj_dim: int = 512, text_width: int = 512,
                 text_layers: int = 12, text_heads: int = 8, text_pretrained: str | None = None,
                 init_temperature: float = 0.07, max_logit_scale: float = 100.0,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.text_tower = TextTower(tokenizer, proj_dim, text_width, text_layers, text_heads,
                                    text_pretrained)
        self.image_proj = nn.Linear(self.embed_dim, self.text_tower.embed_dim, bias=False)
        # shape [1], not a scalar: FSDP2 shards parameters along dim 0
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / init_temperature)))
        self.max_logit_scale = max_logit_scale

    def loss(self, batch, encoded, targets):
        image = F.normalize(self.image_proj(encoded.global_feature), dim=-1)
        text = F.normalize(self.text_tower(batch["text"], batch["text_mask"]), dim=-1)
        scale = self.logit_scale[0].exp().clamp(max=self.max_logit_scale)
        all_image, offset = gather_with_grad(image)
        all_text, _ = gather_with_grad(text)
        all_valid = None
        if "text_valid" in batch:
            all_valid = gather_with_grad(batch["text_valid"].to(image.dtype))[0] > 0.5
        loss = clip_loss(image, text, scale, offset, all_image, all_text, all_valid)
        return loss, {"logit_scale": scale.detach()}

