"""`inst_disc`: instance discrimination between two views, as MoCo v3, BYOL or Barlow Twins."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m3i_lightning.backbone import Encoded
from m3i_lightning.distributed import gather_with_grad
from m3i_lightning.heads import GlobalBatchNorm1d, mlp
from m3i_lightning.losses import barlow_twins_loss, byol_loss, info_nce
from m3i_lightning.objectives.base import Objective
from m3i_lightning.teacher import ema_

VARIANTS = ("moco", "byol", "barlow")
# (hidden, output) widths of each reference's projector, used when the config leaves them null.
REFERENCE_DIMS = {"moco": (4096, 256), "byol": (4096, 256), "barlow": (8192, 8192)}


def _with_output_norm(head: nn.Sequential) -> nn.Sequential:
    """MoCo v3 ends its projector and predictor with a BatchNorm without affine parameters."""
    return nn.Sequential(*head, GlobalBatchNorm1d(head[-1].out_features, affine=False))


class InstanceDiscrimination(Objective):
    """The view2 image is told apart from the other images by its global feature; the target is
    the view1 image. ``variant`` picks the reference method and with it the regulariser:

    - ``moco`` (MoCo v3, Chen et al. 2021): 3-layer projector and 2-layer predictor on the
      student, a momentum projector (EMA of the projector) on the teacher's global feature;
      InfoNCE at τ = 0.2 against the keys of the global batch (gathered without gradient, as
      MoCo v3's keys come from the momentum encoder), scaled by 2τ. Negatives prevent collapse.
    - ``byol`` (BYOL, Grill et al. 2020): 2-layer projector and predictor, momentum projector,
      2 − 2·cos(p, z'). The stop-gradient EMA target with a predictor prevents collapse.
    - ``barlow`` (Barlow Twins, Zbontar et al. 2021): a 3-layer projector on both views, both
      encoded by the student with gradients (no teacher, ``targets.student``); the
      cross-correlation of the batch-standardised projections is pulled to the identity,
      λ = 5.1e-3. Decorrelation prevents collapse.

    Symmetrisation: MoCo v3 and BYOL sum the loss over both view orders. They are
    ``symmetric``, so in native mode the engine also runs view1 → view2 and sums the two
    directions. Shared mode encodes one input (masked view1), so there the term is the one
    direction masked view1 → view2. Barlow Twins' loss is symmetric in the two views by itself.

    Heads use :class:`~m3i_lightning.heads.GlobalBatchNorm1d`, the global-batch (synchronised)
    BatchNorm of the references; their linear layers keep a bias, which a following
    BatchNorm or the batch standardisation cancels, so the functions equal the references'.
    """

    name = "inst_disc"
    form = "Boltzmann"
    target_repr = "global feature"
    input_view = "view2"
    target_view = "view1"

    def __init__(self, variant: str = "moco", hidden_dim: int | None = None,
                 out_dim: int | None = None, temperature: float = 0.2, lambd: float = 5.1e-3,
                 **kwargs) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"unknown inst_disc variant '{variant}'; choose one of {VARIANTS}")
        # Set before super().__init__(), where a standalone objective plans its encoder passes.
        self.uses_teacher = self.symmetric = variant != "barlow"
        self.student_target = variant == "barlow"
        self.form = {"moco": "Boltzmann", "byol": "Gaussian", "barlow": "decorrelation"}[variant]
        super().__init__(**kwargs)
        self.variant, self.temperature, self.lambd = variant, temperature, lambd
        hidden_dim = hidden_dim or REFERENCE_DIMS[variant][0]
        out_dim = out_dim or REFERENCE_DIMS[variant][1]
        layers = 2 if variant == "byol" else 3
        self.projector = mlp(self.embed_dim, hidden_dim, out_dim, layers, "bn", nn.ReLU)
        if variant == "barlow":
            return
        self.predictor = mlp(out_dim, hidden_dim, out_dim, 2, "bn", nn.ReLU)
        if variant == "moco":
            self.projector = _with_output_norm(self.projector)
            self.predictor = _with_output_norm(self.predictor)
        self.momentum_projector = copy.deepcopy(self.projector).requires_grad_(False)

    def loss(self, batch, encoded, targets):
        z = self.projector(encoded.global_feature)
        logs = {"std": F.normalize(z.detach(), dim=-1).std(0).mean()}
        if self.variant == "barlow":
            return self._barlow(z, targets.student), logs
        pred = self.predictor(z)
        with torch.no_grad():
            key = self.momentum_projector(targets.teacher.global_feature)
        if self.variant == "byol":
            return byol_loss(pred, key), logs
        return self._moco(pred, key, logs)

    def _moco(self, pred: Tensor, key: Tensor, logs: dict) -> tuple[Tensor, dict]:
        query = F.normalize(pred, dim=-1)
        keys, offset = gather_with_grad(F.normalize(key, dim=-1))
        with torch.no_grad():
            nearest = (query @ keys.T).argmax(-1) - offset
            logs["acc"] = (nearest == torch.arange(len(query), device=query.device)).float().mean()
        return info_nce(query, keys, self.temperature, offset), logs

    def _barlow(self, z: Tensor, student: Encoded) -> Tensor:
        """Cross-correlation over the global batch: both sides gathered with gradients."""
        z_target = self.projector(student.global_feature)
        return barlow_twins_loss(gather_with_grad(z)[0], gather_with_grad(z_target)[0],
                                 self.lambd)

    def ema_update(self, momentum: float) -> None:
        if self.variant != "barlow":
            ema_(self.momentum_projector, self.projector, momentum)
