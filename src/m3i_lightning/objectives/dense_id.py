"""`dense_id`: dense instance discrimination (DenseCL) with negative queues."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m3i_lightning.components.heads import mlp
from m3i_lightning.components.losses import dense_info_nce, queue_info_nce
from m3i_lightning.core.distributed import gather_with_grad
from m3i_lightning.objectives.base import Objective


class DenseContrast(Objective):
    """DenseCL (Wang et al., CVPR 2021): every patch of view2 is told apart from the patches of
    other images; its positive is the view1 location it matches best.

    Two heads on the student, a global one (on the global feature) and a dense one (per patch
    token, DenseCL's 1×1 convolutions), both linear–ReLU–linear; the teacher's features go
    through their momentum copies (DenseCL's key encoder averages its neck). The positive of a
    query patch is the key patch whose backbone feature is most similar: the student's own
    token (a detached choice) against the teacher's tokens, as DenseCL compares the query and
    key backbones. Negatives are queues of earlier keys of the global batch (registered
    buffers, saved in checkpoints): global keys for the global term, mean-pooled dense keys
    for the dense term. Loss = (1 − λ)·global InfoNCE + λ·dense InfoNCE, λ = 0.5, τ = 0.2.
    The queues take this step's keys after the loss is computed.

    Args:
        hidden_dim: width of the projection heads' hidden layer.
        out_dim: width of the projections.
        queue_size: keys kept as negatives.
        temperature: τ of both InfoNCE terms.
        dense_weight: λ: loss = (1 − λ) global + λ dense.
        **kwargs: the options of every objective
        (:class:`~m3i_lightning.objectives.base.Objective`): ``weight``, and the backbone's
        ``embed_dim``, ``grid_size``, ``patch_size``.

    Example:
        >>> from m3i_lightning import Backbone
        >>> backbone = Backbone("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=1)
        >>> model = DenseContrast(backbone=backbone, queue_size=256)
        >>> type(model.head).__name__
        'DenseContrast'
    """

    name = "dense_id"
    reads_global_feature = True
    form = "Boltzmann"
    target_repr = "dense feature"
    input_view = "view2"
    target_view = "view1"
    uses_teacher = True

    def __init__(self, hidden_dim: int = 2048, out_dim: int = 128, queue_size: int = 65536,
                 temperature: float = 0.2, dense_weight: float = 0.5, **kwargs) -> None:
        super().__init__(**kwargs)
        self.temperature, self.dense_weight = temperature, dense_weight
        self.global_head = mlp(self.embed_dim, hidden_dim, out_dim, 2, None, nn.ReLU)
        self.dense_head = mlp(self.embed_dim, hidden_dim, out_dim, 2, None, nn.ReLU)
        self.add_momentum_copy("global_head")
        self.add_momentum_copy("dense_head")
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, out_dim), dim=-1))
        self.register_buffer("dense_queue",
                             F.normalize(torch.randn(queue_size, out_dim), dim=-1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def loss(self, batch, encoded, targets):
        teacher = targets.teacher
        query = F.normalize(self.global_head(encoded.global_feature), dim=-1)
        dense_query = F.normalize(self.dense_head(encoded.tokens), dim=-1)
        with torch.no_grad():
            key = F.normalize(self.momentum_global_head(teacher.global_feature), dim=-1)
            dense_projection = self.momentum_dense_head(teacher.tokens)
            dense_key = F.normalize(dense_projection, dim=-1)
            pooled_key = F.normalize(dense_projection.mean(dim=1), dim=-1)
        # Clones: the queues change in place below, before the backward pass reads them.
        global_term = queue_info_nce(query, key, self.queue.clone(), self.temperature)
        dense_term = dense_info_nce(dense_query, dense_key, encoded.tokens.detach(),
                                    teacher.tokens, self.dense_queue.clone(), self.temperature)
        if self.training:
            self._enqueue(key, pooled_key)
        loss = (1 - self.dense_weight) * global_term + self.dense_weight * dense_term
        return loss, {"global": global_term.detach(), "dense": dense_term.detach()}

    @torch.no_grad()
    def _enqueue(self, key: Tensor, pooled_key: Tensor) -> None:
        """Replace the oldest entries by the keys of the whole global batch (keys carry no
        gradient, so the gather is a plain all-gather)."""
        keys, pooled = gather_with_grad(key)[0], gather_with_grad(pooled_key)[0]
        size = self.queue.shape[0]
        keys, pooled = keys[-size:], pooled[-size:]
        slots = (self.queue_ptr + torch.arange(len(keys), device=keys.device)) % size
        self.queue[slots] = keys
        self.dense_queue[slots] = pooled
        self.queue_ptr.copy_((self.queue_ptr + len(keys)) % size)
