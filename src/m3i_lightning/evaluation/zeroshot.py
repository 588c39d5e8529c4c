"""Zero-shot classification with an image-text head (:class:`ImageText`, e.g. ``clip``): no
labelled example is used.

Each class is represented by the mean of its prompts' normalised text embeddings (CLIP's
prompt ensembling), and an image takes the class closest to its projected global feature.
Prompts are sentences like the captions the model was trained on, not bare class names: a
text tower trained on "a photo of a dog" places "dog" alone elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from m3i_lightning.core.errors import ConfigError
from m3i_lightning.objectives.capabilities import ImageText

# An ensemble in the style of CLIP's ImageNet prompts, for data without templates of its own.
PHOTO_TEMPLATES = (
    "a photo of a {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "a blurry photo of a {}.",
    "a bright photo of a {}.",
    "a dark photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
)


def class_prompts(datamodule, templates: Sequence[str] | None = None) -> list[list[str]]:
    """Prompts per class, in label order: ``templates`` (``zeroshot.templates``, each with
    one ``{}`` for the class name) when given; else the data's own caption templates
    (``datamodule.class_prompts()``, as the embedded digits have); else
    :data:`PHOTO_TEMPLATES`."""
    if templates is None and hasattr(datamodule, "class_prompts"):
        return datamodule.class_prompts()
    templates = list(templates or PHOTO_TEMPLATES)
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ConfigError(f"zeroshot.templates {bad}: each template needs exactly one '{{}}' "
                          "where the class name goes, e.g. 'a photo of a {}.'")
    return [[t.format(name) for t in templates] for name in datamodule.class_names]


@torch.no_grad()
def class_embeddings(head: ImageText, prompts: list[list[str]]) -> Tensor:
    """[C, D] unit-norm text embedding of every class, averaged over its prompts."""
    was_training = head.training
    head.eval()
    rows = [F.normalize(head.embed_texts(texts).float().mean(0), dim=-1) for texts in prompts]
    head.train(was_training)
    return torch.stack(rows)


@torch.no_grad()
def zero_shot_predict(head: ImageText, features: Tensor, classes: Tensor) -> Tensor:
    """Predicted class of each global feature [N, embed_dim], given :func:`class_embeddings`."""
    image = head.embed_images(features.to(classes.device)).float()
    return (image @ classes.T).argmax(-1)
