"""Text side of image-text objectives: an offline tokenizer and a CLIP text tower from a config."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from m3i_lightning.core.errors import ConfigError

# torch's fused attention kernels (F.scaled_dot_product_attention), named rather than left to
# the transformers version's default; the image side gets them from timm (``fused_attn``).
ATTENTION = "sdpa"


class ByteTokenizer:
    """UTF-8 bytes as tokens, plus pad/bos/eos: needs no vocabulary file and no download."""

    padding_side = "right"

    def __init__(self, context_length: int = 32) -> None:
        self.context_length = context_length
        self.pad_token_id, self.bos_token_id, self.eos_token_id = 256, 257, 258
        self.vocab_size = 259

    def __call__(self, texts: Sequence[str]) -> dict[str, Tensor]:
        ids = torch.full((len(texts), self.context_length), self.pad_token_id, dtype=torch.long)
        for row, text in enumerate(texts):
            body = list(text.encode("utf-8"))[: self.context_length - 2]
            seq = [self.bos_token_id, *body, self.eos_token_id]
            ids[row, : len(seq)] = torch.tensor(seq)
        return {"input_ids": ids, "attention_mask": (ids != self.pad_token_id).long()}


class HFTokenizer:
    """Any ``transformers.AutoTokenizer`` (hub name or local folder), padded and truncated to
    the text tower's context length."""

    def __init__(self, name: str, context_length: int = 77) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(name)
        self.context_length = context_length
        self.padding_side = self.tokenizer.padding_side
        self.vocab_size = len(self.tokenizer)
        self.pad_token_id = self.tokenizer.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = self.tokenizer.eos_token_id
        self.bos_token_id = self.tokenizer.bos_token_id
        self.eos_token_id = self.tokenizer.eos_token_id

    def __call__(self, texts: Sequence[str]) -> dict[str, Tensor]:
        out = self.tokenizer(list(texts), padding="max_length", truncation=True,
                             max_length=self.context_length, return_tensors="pt")
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}


def build_tokenizer(name: str = "byte", context_length: int = 32) -> ByteTokenizer | HFTokenizer:
    """``byte`` for the offline default, else an AutoTokenizer name or path."""
    if name == "byte":
        return ByteTokenizer(context_length)
    return HFTokenizer(name, context_length)


class TextTower(nn.Module):
    """A ``transformers`` CLIP text transformer with projection, built from a config so nothing
    is downloaded; ``pretrained`` (a hub name or a local folder) loads real weights instead."""

    def __init__(self, tokenizer, embed_dim: int = 128, width: int = 128, layers: int = 2,
                 heads: int = 4, pretrained: str | None = None) -> None:
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        if pretrained:
            self.model = CLIPTextModelWithProjection.from_pretrained(
                pretrained, attn_implementation=ATTENTION)
        else:
            config = CLIPTextConfig(
                vocab_size=tokenizer.vocab_size, hidden_size=width, intermediate_size=4 * width,
                num_hidden_layers=layers, num_attention_heads=heads,
                max_position_embeddings=tokenizer.context_length, projection_dim=embed_dim,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, attn_implementation=ATTENTION,
            )
            self.model = CLIPTextModelWithProjection(config)
        self.embed_dim = self.model.config.projection_dim
        positions = self.model.config.max_position_embeddings
        if tokenizer.context_length > positions:
            raise ConfigError(f"text.context_length={tokenizer.context_length} exceeds the "
                              f"{positions} positions of the text tower; captions are cut to "
                              f"the context length, so set text.context_length<={positions}")
        # CLIP pools at the end token and its attention is causal: no position up to the end
        # token sees the padding after it, so with right padding the mask changes nothing.
        # Without it transformers need not ask the device whether the batch is padded (a host
        # sync every step) and attention runs as plain causal SDPA.
        self.needs_mask = getattr(tokenizer, "padding_side", None) != "right"

    def save(self, folder) -> None:
        """The tower as transformers saves it (``config.json``, ``model.safetensors``), without
        the "Writing model shards" bar transformers draws even for one file."""
        from transformers.utils import logging as hf_logging

        shown = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            self.model.save_pretrained(folder)
        finally:
            if shown:
                hf_logging.enable_progress_bar()

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        mask = attention_mask if self.needs_mask else None
        return self.model(input_ids=input_ids, attention_mask=mask).text_embeds
