"""The ResNet family: whole images to a global feature, for the global objectives only."""

from __future__ import annotations

from timm.models import resnet
from torch import Tensor, nn

from m3i_lightning.backbone.base import Backbone
from m3i_lightning.core.encoded import Encoded


class ResNetBackbone(Backbone):
    """A timm ResNet (ResNet, ResNeXt, SE-ResNet, ...). It takes no masked input and offers
    no dense tokens (``tokens`` is its last stage's map, for inspection); the engine refuses
    the objectives that need either, and the mix, so it has no parts to compose or pool."""

    family = "resnet"
    timm_class = resnet.ResNet
    timm_modules = ("resnet",)
    timm_takes_img_size = False
    supports_masking = False
    supports_dense = False

    def blocks(self) -> list[nn.Module]:
        m = self.model
        return [block for layer in (m.layer1, m.layer2, m.layer3, m.layer4) for block in layer]

    def forward(self, images: Tensor, visible_index: Tensor | None = None,
                masked_index: Tensor | None = None) -> Encoded:
        if visible_index is not None:
            raise ValueError(f"'{self.arch}' (a ResNet) encodes whole images only: no masked "
                             "or mixed input")
        x = self.model.forward_features(images)
        return Encoded(x.flatten(2).transpose(1, 2), self.model.forward_head(x, pre_logits=True))
