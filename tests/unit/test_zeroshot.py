"""Zero-shot prompts: templates written for each class, in the style of the training captions."""

from __future__ import annotations

import pytest
from helpers import digits_module

from m3i_lightning.core.errors import ConfigError
from m3i_lightning.evaluation.zeroshot import PHOTO_TEMPLATES, class_embeddings, class_prompts


class Named:
    class_names = ["cat", "dog"]


def test_prompts_are_templates_written_for_each_class(tokenizer):
    assert class_prompts(Named()) == [[t.format(n) for t in PHOTO_TEMPLATES]
                                      for n in ("cat", "dog")]
    assert class_prompts(Named(), ["a {} here"]) == [["a cat here"], ["a dog here"]]
    digits = digits_module(tokenizer)
    assert class_prompts(digits)[5][0] == "a handwritten digit five"  # the data's own
    assert class_prompts(digits, ["{}"])[5] == ["five"]
    with pytest.raises(ConfigError, match="exactly one"):
        class_prompts(Named(), ["a photo"])


def test_caption_style_prompts_score_at_least_as_well_as_bare_names(clip_checkpoint):
    """A clip model trained on templated captions (the digits'): prompts in the style of its
    captions classify the held-out digits at least as well as the bare class names (up to 2
    points, 7 of 359 images, of run-to-run noise across CPUs), and well above chance (0.1)."""
    from m3i_lightning.config.factory import build_datamodule
    from m3i_lightning.config.restore import load_checkpoint
    from m3i_lightning.evaluation.knn import extract_features
    from m3i_lightning.evaluation.zeroshot import zero_shot_predict

    model = load_checkpoint(clip_checkpoint)
    dm = build_datamodule(model.config.data, model.tokenizer)
    dm.setup("validate")
    features, labels = extract_features(model.backbone, dm.eval_dataloader("val"))

    def accuracy(prompts) -> float:
        classes = class_embeddings(model.image_text, prompts)
        predicted = zero_shot_predict(model.image_text, features, classes)
        return (predicted == labels).float().mean().item()

    templated, bare = accuracy(class_prompts(dm)), accuracy(class_prompts(dm, ["{}"]))
    assert templated >= bare - 0.02 and templated > 0.3, (templated, bare)
