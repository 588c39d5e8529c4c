"""Zero-shot prompts: templates written for each class, in the style of the training captions."""

from __future__ import annotations

import pytest
from helpers import digits_module

from m3i_lightning.core.errors import ConfigError
from m3i_lightning.evaluation.zeroshot import PHOTO_TEMPLATES, class_prompts


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


