"""End-to-end fine-tuning of a pre-trained backbone: the transfer number papers report."""

from m3i_lightning.finetune.layer_decay import layer_decay_groups, layer_of
from m3i_lightning.finetune.module import Classifier, FineTuning, Recipe

__all__ = ["Classifier", "FineTuning", "Recipe", "layer_decay_groups", "layer_of"]
