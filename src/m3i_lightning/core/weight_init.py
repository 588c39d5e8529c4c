"""MAE's initialisation (its ``initialize_weights``, after the JAX ViT): xavier-uniform
linear layers with zero biases, LayerNorms at one and zero. MAE, MILAN and SiameseIM build
their encoders and decoders this way, where timm and PyTorch draw their own defaults."""

from __future__ import annotations

from torch import nn


def xavier_init_(module: nn.Module) -> None:
    """Re-initialise every ``nn.Linear`` and ``nn.LayerNorm`` inside ``module`` in place."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
