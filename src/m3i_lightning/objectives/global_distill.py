"""`global_distill`: DINO self-distillation of the teacher's prototype distribution."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m3i_lightning.components.heads import mlp
from m3i_lightning.components.losses import dino_loss
from m3i_lightning.core.distributed import mean_over_ranks
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

    Natively this is the table's intra-view row (view1 → view1). ``multi_crop=True`` is DINO
    itself: the teacher encodes both global views, the student every crop (the two global
    views and the data's local crops), and the loss averages every (student crop, teacher
    view) pair except a view with itself; the centre follows the teacher's scores of both
    global views, once per step. DINO's schedules: the teacher temperature rises linearly
    from ``warmup_teacher_temp`` to ``teacher_temp`` over ``warmup_teacher_temp_epochs``, and
    the prototype layer does not move during the first ``freeze_last_layer`` epochs.

    Args:
        out_dim: prototypes K.
        hidden_dim: width of the head's MLP.
        bottleneck_dim: width before the prototypes.
        head_layers: layers of the MLP.
        student_temp: the student's temperature.
        teacher_temp: the teacher's temperature (after the warm-up).
        warmup_teacher_temp: the teacher's temperature at the start (None: no warm-up).
        warmup_teacher_temp_epochs: epochs of the warm-up (DINO: 30).
        center_momentum: momentum of the centre of the teacher's scores.
        freeze_last_layer: epochs the prototype layer stays frozen (DINO: 1).
        multi_crop: DINO's multi-crop pairing (every student crop against every teacher global
            view but its own; the data's ``local_crops``).
        **kwargs: the options of every objective
        (:class:`~m3i_lightning.objectives.base.Objective`): ``weight``, and the backbone's
        ``embed_dim``, ``grid_size``, ``patch_size``.

    Example:
        >>> from m3i_lightning import Backbone
        >>> backbone = Backbone("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=1)
        >>> model = GlobalDistill(backbone=backbone, out_dim=1024)
        >>> type(model.head).__name__
        'GlobalDistill'
    """

    name = "global_distill"
    reads_global_feature = True
    form = "Boltzmann"
    target_repr = "global feature"
    target_view = "view1"
    uses_teacher = True

    def __init__(self, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 head_layers: int = 3, student_temp: float = 0.1, teacher_temp: float = 0.04,
                 warmup_teacher_temp: float | None = None, warmup_teacher_temp_epochs: int = 0,
                 center_momentum: float = 0.9, freeze_last_layer: int = 1,
                 multi_crop: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.multi_crop = self.reads_local_crops = multi_crop
        self.final_teacher_temp = teacher_temp
        self.warmup_teacher_temp = teacher_temp if warmup_teacher_temp is None else (
            warmup_teacher_temp)
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.freeze_last_layer = freeze_last_layer
        self.head = DINOHead(self.embed_dim, out_dim, hidden_dim, bottleneck_dim, head_layers)
        self.add_momentum_copy("head")
        self.register_buffer("center", torch.zeros(out_dim))
        self.student_temp = student_temp
        self.teacher_temp = self.warmup_teacher_temp
        self.center_momentum = center_momentum

    def follow_schedule(self, epoch: int) -> None:
        warmup = self.warmup_teacher_temp_epochs
        progress = min(epoch / warmup, 1.0) if warmup else 1.0
        self.teacher_temp = self.warmup_teacher_temp + progress * (
            self.final_teacher_temp - self.warmup_teacher_temp)

    def adjust_gradients(self, epoch: int) -> None:
        if epoch < self.freeze_last_layer:
            self.head.prototypes.weight.grad = None

    def loss(self, batch, encoded, targets):
        return self.term([(batch, encoded, targets)], "mean")

    def term(self, readings, reduce):
        """DINO's loss over all its (student crop, teacher view) pairs: each teacher view's
        scores computed once, the centre updated once from all of them."""
        teacher_logits = {}
        with torch.no_grad():
            for _, _, targets in readings:
                if targets.view not in teacher_logits:
                    teacher_logits[targets.view] = self.momentum_head(
                        targets.teacher.global_feature)
            scores = torch.cat(list(teacher_logits.values()))
            probs = F.softmax((scores - self.center) / self.teacher_temp, dim=-1)
            entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
        losses = [dino_loss(self.head(encoded.global_feature), teacher_logits[targets.view],
                            self.center, self.student_temp, self.teacher_temp)
                  for _, encoded, targets in readings]
        if self.training:
            self._update_center(scores)
        return torch.stack(losses).mean(), {"teacher_entropy": entropy}

    @torch.no_grad()
    def _update_center(self, teacher_logits: Tensor) -> None:
        batch_center = mean_over_ranks(teacher_logits.float().mean(dim=0))
        self.center.lerp_(batch_center, 1.0 - self.center_momentum)
