"""Zero-shot classification with a model trained with ``clip``: no labelled example is used.

Each class is represented by the mean of its prompts' normalised text embeddings (CLIP's
prompt ensembling), and an image takes the class closest to its projected global feature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from m3i_lightning.objectives.clip import CLIP


def class_prompts(datamodule) -> list[list[str]]:
    """The data's own prompts per class (``class_prompts()``: its caption templates written
    for each class), else each class name alone."""
    if hasattr(datamodule, "class_prompts"):
        return datamodule.class_prompts()
    return [[name] for name in datamodule.class_names]


@torch.no_grad()
def class_embeddings(clip: CLIP, tokenizer, prompts: list[list[str]]) -> Tensor:
    """[C, D] unit-norm text embedding of every class, averaged over its prompts."""
    device = clip.image_proj.weight.device
    was_training = clip.training
    clip.eval()
    rows = []
    for texts in prompts:
        tokens = tokenizer(texts)
        text = clip.text_tower(tokens["input_ids"].to(device),
                               tokens["attention_mask"].to(device))
        rows.append(F.normalize(F.normalize(text.float(), dim=-1).mean(0), dim=-1))
    clip.train(was_training)
    return torch.stack(rows)


@torch.no_grad()
def zero_shot_predict(clip: CLIP, features: Tensor, classes: Tensor) -> Tensor:
    """Predicted class of each global feature [N, embed_dim], given :func:`class_embeddings`."""
    image = F.normalize(clip.image_proj(features.to(classes.device)).float(), dim=-1)
    return (image @ classes.T).argmax(-1)
