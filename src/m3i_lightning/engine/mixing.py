"""M3I's multi-input encoding: two masked images mixed at patch level into one encoder input."""

from __future__ import annotations

import torch
from torch import Tensor

from m3i_lightning.backbone import Backbone, Encoded
from m3i_lightning.components.masking import MaskGenerator


def partner_rows(batch_size: int, device: torch.device) -> Tensor:
    """Image B of sample i is image i−1 of the batch, so every image is A once and B once."""
    return torch.roll(torch.arange(batch_size, device=device), shifts=1)


def check_mixable(mask_generator: MaskGenerator) -> None:
    """Both images' visible patches must fit in one grid: mask ratio >= 0.5."""
    if 2 * mask_generator.num_visible > mask_generator.num_patches:
        raise ValueError("mixing two images needs mask ratio >= 0.5 so their visible patches "
                         f"fit in one grid (visible per image: {mask_generator.num_visible} of "
                         f"{mask_generator.num_patches})")


def mixed_masks(mask_generator: MaskGenerator, batch_size: int,
                device: torch.device) -> tuple[Tensor, Tensor]:
    """Masks (True = hidden) of A and B with disjoint visible patches: A's visible patches come
    from the generator, B's are drawn at random among A's hidden ones, the same count."""
    check_mixable(mask_generator)
    visible = mask_generator.num_visible
    mask_a = mask_generator(batch_size, device)
    noise = torch.rand(mask_a.shape, device=device).masked_fill(~mask_a, 2.0)
    rank = noise.argsort(dim=1).argsort(dim=1)
    mask_b = rank >= visible
    return mask_a, mask_b


def encode_mixed(backbone: Backbone, images: Tensor, partner: Tensor,
                 mask_generator: MaskGenerator) -> tuple[Encoded, Encoded]:
    """Encode A = ``images`` and B = ``images[partner]`` in ONE network pass.

    Each image keeps its visible final-grid cells where its own grid has them: a ViT encodes
    [prefix tokens, A's visible patches, B's visible patches], each with its own position
    embedding; a hierarchical network one patch-embedding map holding, in every final-grid
    cell, that cell of A or of B (or the mask token where both are hidden). The output is
    split back per image, each with its own visible / hidden indices and a global feature
    pooled over its own tokens.
    """
    mask_a, mask_b = mixed_masks(mask_generator, images.shape[0], images.device)
    vis_a, hid_a = mask_generator.split(mask_a)
    vis_b, hid_b = mask_generator.split(mask_b)
    x = backbone.embed(images)
    tokens_a, tokens_b = backbone.encode_parts([(x, vis_a), (x[partner], vis_b)])
    return (Encoded(tokens_a, backbone.pool(tokens_a), vis_a, hid_a),
            Encoded(tokens_b, backbone.pool(tokens_b), vis_b, hid_b))
