"""`global_distill`: DINO self-distillation of the teacher's prototype distribution."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m3i_lightning.distributed import mean_over_ranks
from m3i_lightning.heads import mlp
from m3i_lightning.losses import dino_loss
from m3i_lightning.objectives.base import Objective


class DINOHead(nn.Module):
    """DINO's projection head: an MLP to a bottleneck, L2 normalisation, then K prototypes.

    The prototype layer is DINO's weight-normalised linear layer with its norms frozen at 1
    (``norm_last_layer``): every prototype is a unit vector, so a logit is a cosine similarity
    and no prototype wins by growing its norm.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, bottleneck_dim: int,
                 num_layers: int) -> None:
        super().__init__()
        self.mlp = mlp(in_dim, hidden_dim, bottleneck_dim, num_layers)
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.prototypes = nn.Linear(bottleneck_dim, out_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        return F.linear(x, F.normalize(self.prototypes.weight, dim=-1))


class GlobalDistill(Objective):
    """DINO (Caron et al., 2021): the student's prototype distribution matches the teacher's.

    The teacher's global feature goes through the teacher head, an EMA copy of the student's
    head updated with the teacher's momentum; the teacher's scores are centred (a running mean
    with momentum 0.9, over the global batch) and sharpened (τ_t = 0.04), the student's are
    softened with τ_s = 0.1, and the loss is their cross-entropy (a Boltzmann distribution over
    prototypes). Centering and sharpening pull in opposite directions, which is what prevents
    collapse. The teacher head being an EMA copy, the teacher must have the student's width.
    """

    name = "global_distill"
    form = "Boltzmann"
    target_repr = "global feature"
    target_view = "view1"
    uses_teacher = True

    def __init__(self, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 head_layers: int = 3, student_temp: float = 0.1, teacher_temp: float = 0.04,
                 center_momentum: float = 0.9, **kwargs) -> None:
        super().__init__(**kwargs)
        self.head = DINOHead(self.embed_dim, out_dim, hidden_dim, bottleneck_dim, head_layers)
        self.add_momentum_copy("head")
        self.register_buffer("center", torch.zeros(out_dim))
        self.student_temp, self.teacher_temp = student_temp, teacher_temp
        self.center_momentum = center_momentum

    def loss(self, batch, encoded, targets):
        with torch.no_grad():
            teacher_logits = self.momentum_head(targets.teacher.global_feature)
            probs = F.softmax((teacher_logits - self.center) / self.teacher_temp, dim=-1)
            entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
        student_logits = self.head(encoded.global_feature)
        loss = dino_loss(student_logits, teacher_logits, self.center, self.student_temp,
                         self.teacher_temp)
        if self.training:
            self._update_center(teacher_logits)
        return loss, {"teacher_entropy": entropy}

    @torch.no_grad()
    def _update_center(self, teacher_logits: Tensor) -> None:
        batch_center = mean_over_ranks(teacher_logits.float().mean(dim=0))
        self.center.lerp_(batch_center, 1.0 - self.center_momentum)
