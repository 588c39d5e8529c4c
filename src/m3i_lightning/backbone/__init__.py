"""The student encoder f_θ: one interface (:class:`Encoded`) over the timm families ViT, Swin,
ConvNeXt and ResNet; ``Backbone.create(arch, ...)`` (or ``Backbone(arch, ...)``) builds the
family of ``arch``."""

from m3i_lightning.backbone.base import Backbone, family_of
from m3i_lightning.backbone.hierarchical import ConvNeXtBackbone, MaskTokenBackbone, SwinBackbone
from m3i_lightning.backbone.resnet import ResNetBackbone
from m3i_lightning.backbone.vit import VisionTransformerBackbone
from m3i_lightning.core.encoded import Encoded, Part, gather_tokens

__all__ = ["Backbone", "ConvNeXtBackbone", "Encoded", "MaskTokenBackbone", "Part",
           "ResNetBackbone", "SwinBackbone", "VisionTransformerBackbone", "family_of",
           "gather_tokens"]
