"""`clip`: image-text contrastive learning with a text tower and batch negatives."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from m3i_lightning.components.losses import clip_loss
from m3i_lightning.components.text import TextTower
from m3i_lightning.core.distributed import gather_with_grad
from m3i_lightning.objectives.base import Objective
from m3i_lightning.objectives.capabilities import ImageText, load_tokenizer, save_tokenizer

IMAGE_PROJECTION_FILE = "image_projection.safetensors"  # image side and logit scale


class CLIP(Objective, ImageText):
    """Symmetric InfoNCE between the image global feature and the paired caption (CLIP).

    Texts of the whole global batch are the negatives: embeddings are gathered across ranks
    with gradients and each rank scores its own rows (open_clip's local loss). The logit
    scale is learned from 1/0.07 and clamped at 100. Images without a caption
    (``text_valid`` False) are left out of the loss, as queries and as negatives.

    Args:
        tokenizer: turns the captions into the text tower's tokens (e.g.
            :class:`~m3i_lightning.components.text.ByteTokenizer`).
        proj_dim: width of the joint image-text space.
        text_width: width of the text tower.
        text_layers: its transformer layers.
        text_heads: its attention heads.
        text_pretrained: a transformers CLIP text model name or local folder to start the tower
            from (None: random initialisation).
        init_temperature: the initial temperature (the logit scale starts at its inverse).
        max_logit_scale: the clamp of the learned logit scale.
        **kwargs: the options of every objective
        (:class:`~m3i_lightning.objectives.base.Objective`): ``weight``, and the backbone's
        ``embed_dim``, ``grid_size``, ``patch_size``.

    Example:
        >>> from m3i_lightning import Backbone
        >>> backbone = Backbone("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=1)
        >>> from m3i_lightning.components.text import ByteTokenizer
        >>> model = CLIP(backbone=backbone, tokenizer=ByteTokenizer(32), text_layers=1)
        >>> type(model.head).__name__
        'CLIP'
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
        self.tokenizer = tokenizer
        self.text_tower = TextTower(tokenizer, proj_dim, text_width, text_layers, text_heads,
                                    text_pretrained)
        self.image_proj = nn.Linear(self.embed_dim, self.text_tower.embed_dim, bias=False)
        # shape [1], not a scalar: FSDP2 shards parameters along dim 0
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / init_temperature)))
        self.max_logit_scale = max_logit_scale

    def embed_texts(self, texts: Sequence[str]) -> Tensor:
        tokens = self.tokenizer(texts)
        device = self.image_proj.weight.device
        text = self.text_tower(tokens["input_ids"].to(device),
                               tokens["attention_mask"].to(device))
        return F.normalize(text, dim=-1)

    def embed_images(self, features: Tensor) -> Tensor:
        return F.normalize(self.image_proj(features), dim=-1)

    def save_text_side(self, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.text_tower.save(folder)
        save_tokenizer(self.tokenizer, folder)
        save_file({"image_proj.weight": self.image_proj.weight.detach().cpu().contiguous(),
                   "logit_scale": self.logit_scale.detach().cpu().contiguous()},
                  folder / IMAGE_PROJECTION_FILE)

    @classmethod
    def load_text_side(cls, folder: Path, *, embed_dim: int, grid_size: tuple[int, int],
                       patch_size: int) -> CLIP:
        folder = Path(folder)
        head = cls(load_tokenizer(folder), text_pretrained=str(folder), embed_dim=embed_dim,
                   grid_size=grid_size, patch_size=patch_size)
        # the text tower's weights came with it (text_pretrained); this file holds the rest
        result = head.load_state_dict(load_file(folder / IMAGE_PROJECTION_FILE), strict=False)
        missing = [k for k in result.missing_keys if not k.startswith("text_tower.")]
        if missing or result.unexpected_keys:
            raise ValueError(f"{folder / IMAGE_PROJECTION_FILE}: missing {missing}, "
                             f"unexpected {result.unexpected_keys}")
        return head

    def loss(self, batch, encoded, targets):
        image = self.embed_images(encoded.global_feature)
        text = F.normalize(self.text_tower(batch["text"], batch["text_mask"]), dim=-1)
        scale = self.logit_scale[0].exp().clamp(max=self.max_logit_scale)
        all_image, offset = gather_with_grad(image)
        all_text, _ = gather_with_grad(text)
        all_valid = None
        if "text_valid" in batch:
            all_valid = gather_with_grad(batch["text_valid"].to(image.dtype))[0] > 0.5
        loss = clip_loss(image, text, scale, offset, all_image, all_text, all_valid)
        return loss, {"logit_scale": scale.detach()}

