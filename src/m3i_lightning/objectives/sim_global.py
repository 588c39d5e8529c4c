"""`sim_global`: the masked view's prototype assignment matches the full view's (MSN)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from m3i_lightning.components.heads import mlp
from m3i_lightning.components.losses import msn_loss
from m3i_lightning.core.distributed import gather_with_grad
from m3i_lightning.objectives.base import Objective


class SiameseGlobal(Objective):
    """Masked Siamese Networks (Assran et al., ECCV 2022): the masked view2 (anchor) and the
    teacher's full view1 (target) are soft-assigned to K learnable prototypes; the anchor's
    assignment (τ = 0.1) is trained towards the sharpened target assignment (τ⁺ = 0.025,
    Sinkhorn-balanced as in MSN's released configs), with mean-entropy maximisation (weight 1)
    so that the batch uses every prototype. A Boltzmann distribution over prototypes.

    The projection head is MSN's (3 linear layers, BatchNorm, GELU, truncated-normal init);
    the target encoder is the EMA teacher followed by an EMA copy of the head, as MSN averages
    its whole target encoder. Prototypes are L2-normalised in the loss and learnt through the
    anchor branch only. The loss runs on the global batch (embeddings gathered with gradients),
    so me-max and Sinkhorn see every rank's samples, as MSN's all-reduces do. With local
    crops (``data.local_crops``) the focal views, masked too, are further anchors of the same
    target; prototypes get no weight decay.

    Args:
        hidden_dim: width of the projection head's hidden layers.
        out_dim: width of the embeddings.
        num_prototypes: K.
        anchor_temperature: τ of the anchors.
        target_temperature: τ⁺ of the sharpened targets.
        me_max_weight: weight of the mean-entropy maximisation.
        sinkhorn_iterations: Sinkhorn rounds on the targets (0: none).
        **kwargs: the options of every objective
        (:class:`~m3i_lightning.objectives.base.Objective`): ``weight``, and the backbone's
        ``embed_dim``, ``grid_size``, ``patch_size``.

    Example:
        >>> from m3i_lightning import Backbone
        >>> backbone = Backbone("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=1)
        >>> model = SiameseGlobal(backbone=backbone, num_prototypes=64)
        >>> type(model.head).__name__
        'SiameseGlobal'
    """

    name = "sim_global"
    reads_global_feature = True
    form = "Boltzmann"
    target_repr = "global feature"
    input_view = "view2"
    masked_input = True
    target_view = "view1"
    uses_teacher = True
    reads_local_crops = True  # MSN's focal views: more anchors of the same target
    no_weight_decay = ("prototypes",)  # as MSN's optimiser groups
    min_batch_size = 2  # BatchNorm in the projector

    def __init__(self, hidden_dim: int = 2048, out_dim: int = 256, num_prototypes: int = 1024,
                 anchor_temperature: float = 0.1, target_temperature: float = 0.025,
                 me_max_weight: float = 1.0, sinkhorn_iterations: int = 3, **kwargs) -> None:
        super().__init__(**kwargs)
        self.anchor_temperature, self.target_temperature = anchor_temperature, target_temperature
        self.me_max_weight, self.sinkhorn_iterations = me_max_weight, sinkhorn_iterations
        self.projector = mlp(self.embed_dim, hidden_dim, out_dim, 3, "bn", nn.GELU)
        for layer in self.projector:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.add_momentum_copy("projector")
        bound = out_dim ** -0.5
        self.prototypes = nn.Parameter(torch.empty(num_prototypes, out_dim).uniform_(-bound, bound))

    def loss(self, batch, encoded, targets):
        return self.term([(batch, encoded, targets)], "mean")

    def term(self, readings, reduce):
        """MSN's loss over every anchor view at once (the masked view2 and, with local crops,
        the masked focal views), each against the target of its image, so that mean-entropy
        maximisation and Sinkhorn see all anchors together, as MSN's loss does."""
        anchor = torch.cat([self.projector(encoded.global_feature)
                            for _, encoded, _ in readings])
        with torch.no_grad():
            target = torch.cat([self.momentum_projector(targets.teacher.global_feature)
                                for _, _, targets in readings])
        anchor, target = gather_with_grad(anchor)[0], gather_with_grad(target)[0]
        loss = msn_loss(anchor, target, self.prototypes, self.anchor_temperature,
                        self.target_temperature, self.me_max_weight, self.sinkhorn_iterations)
        with torch.no_grad():
            nearest = (target @ F.normalize(self.prototypes.detach(), dim=-1).T).argmax(-1)
            used = torch.zeros(len(self.prototypes), device=nearest.device)
            used[nearest] = 1.0
        return loss, {"std": F.normalize(anchor.detach(), dim=-1).std(0).mean(),
                      "prototypes_used": used.sum()}
