"""`inst_disc`: instance discrimination between two views, as MoCo v3, BYOL or Barlow Twins.

One config name, three reference methods: ``objective.inst_disc.variant`` picks the class
(:attr:`InstanceDiscrimination.variants`), and with it the regulariser.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m3i_lightning.components.heads import GlobalBatchNorm1d, mlp
from m3i_lightning.components.losses import barlow_twins_loss, byol_loss, info_nce
from m3i_lightning.core.distributed import gather_with_grad
from m3i_lightning.objectives.base import Objective, Targets


class InstanceDiscrimination(Objective):
    """The view2 image is told apart from the other images by its global feature; the target
    is the view1 image. The family of :class:`MoCoV3`, :class:`BYOL` and :class:`BarlowTwins`.

    Each projector width left null takes the reference's (``reference_dims``). Heads use
    :class:`~m3i_lightning.components.heads.GlobalBatchNorm1d`, the global-batch (synchronised)
    BatchNorm of the references; their linear layers keep a bias, which a following
    BatchNorm or the batch standardisation cancels, so the functions equal the references'.

    Args:
        hidden_dim: width of the projector's (and predictor's) hidden layers (None: the
            reference's, ``reference_dims``).
        out_dim: width of the projections (None: the reference's).
        **kwargs: the options of every objective
        (:class:`~m3i_lightning.objectives.base.Objective`): ``weight``, and the backbone's
        ``embed_dim``, ``grid_size``, ``patch_size``.

    Example:
        >>> from m3i_lightning import Backbone
        >>> backbone = Backbone("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=1)
        >>> model = MoCoV3(backbone=backbone)  # alone: a LightningModule
        >>> type(model.head).__name__
        'MoCoV3'
    """

    name = "inst_disc"
    reads_global_feature = True
    target_repr = "global feature"
    input_view = "view2"
    target_view = "view1"
    min_batch_size = 2  # BatchNorm heads; batch negatives (MoCo) or statistics (Barlow)
    variants: ClassVar[dict[str, type[Objective]]] = {}
    default_variant = "moco"
    variant: ClassVar[str]
    reference_dims: ClassVar[tuple[int, int]]  # (hidden, output) of the reference projector
    projector_layers: ClassVar[int]

    def __init__(self, hidden_dim: int | None = None, out_dim: int | None = None,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.hidden_dim = hidden_dim or self.reference_dims[0]
        self.out_dim = out_dim or self.reference_dims[1]
        self.projector = self.head(self.embed_dim, self.projector_layers)

    def head(self, in_dim: int, layers: int) -> nn.Sequential:
        """An MLP head to ``out_dim`` with the references' BatchNorm and ReLU."""
        return mlp(in_dim, self.hidden_dim, self.out_dim, layers, "bn", nn.ReLU)

    def loss(self, batch, encoded, targets):
        z = self.projector(encoded.global_feature)
        loss, logs = self.discriminate(z, targets)
        return loss, {"std": F.normalize(z.detach(), dim=-1).std(0).mean(), **logs}

    def discriminate(self, z: Tensor, targets: Targets) -> tuple[Tensor, dict]:
        """The loss of the projected view2 ``z`` against its target, and extra logs."""
        raise NotImplementedError


class MomentumTarget(InstanceDiscrimination, register=False):
    """MoCo v3 and BYOL: a predictor on the student, a momentum projector (EMA of the
    projector) on the teacher's global feature, and the loss summed over both view orders:
    they are ``symmetric``, so in native mode the engine also runs view1 → view2. Shared mode
    encodes one input (masked view1), so there the term is the one direction."""

    uses_teacher = True
    symmetric = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.predictor = self.head(self.out_dim, 2)
        self.add_momentum_copy("projector")

    def discriminate(self, z, targets):
        pred = self.predictor(z)
        with torch.no_grad():
            key = self.momentum_projector(targets.teacher.global_feature)
        return self.compare(pred, key)

    def compare(self, pred: Tensor, key: Tensor) -> tuple[Tensor, dict]:
        raise NotImplementedError


class MoCoV3(MomentumTarget):
    """MoCo v3 (Chen et al. 2021): 3-layer projector and 2-layer predictor, each ending in a
    BatchNorm without affine parameters; InfoNCE at τ = 0.2 against the keys of the global
    batch (gathered without gradient, as MoCo v3's keys come from the momentum encoder),
    scaled by 2τ. Negatives prevent collapse.

    Args:
        temperature: τ of the InfoNCE.
        **kwargs: :class:`InstanceDiscrimination`'s options (``hidden_dim``, ``out_dim``) and
            those of every objective.

    Example:
        >>> from m3i_lightning import Backbone
        >>> backbone = Backbone("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=1)
        >>> model = MoCoV3(backbone=backbone, temperature=0.2)  # alone: a LightningModule
        >>> type(model.head).__name__
        'MoCoV3'
    """

    variant = "moco"
    form = "Boltzmann"
    reference_dims = (4096, 256)
    projector_layers = 3

    def __init__(self, temperature: float = 0.2, **kwargs) -> None:
        super().__init__(**kwargs)
        self.temperature = temperature

    def head(self, in_dim, layers):
        head = super().head(in_dim, layers)
        return nn.Sequential(*head, GlobalBatchNorm1d(self.out_dim, affine=False))

    def compare(self, pred, key):
        query = F.normalize(pred, dim=-1)
        keys, offset = gather_with_grad(F.normalize(key, dim=-1))
        with torch.no_grad():
            nearest = (query @ keys.T).argmax(-1) - offset
            acc = (nearest == torch.arange(len(query), device=query.device)).float().mean()
        return info_nce(query, keys, self.temperature, offset), {"acc": acc}


class BYOL(MomentumTarget):
    """BYOL (Grill et al. 2020): 2-layer projector and predictor, 2 − 2·cos(p, z'). The
    stop-gradient EMA target with a predictor prevents collapse.

    Args:
        **kwargs: :class:`InstanceDiscrimination`'s options (``hidden_dim``, ``out_dim``) and
            those of every objective.

    Example:
        >>> from m3i_lightning import Backbone
        >>> backbone = Backbone("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=1)
        >>> model = BYOL(backbone=backbone)  # alone: a LightningModule
        >>> type(model.head).__name__
        'BYOL'
    """

    variant = "byol"
    form = "Gaussian"
    reference_dims = (4096, 256)
    projector_layers = 2

    def compare(self, pred, key):
        return byol_loss(pred, key), {}


class BarlowTwins(InstanceDiscrimination):
    """Barlow Twins (Zbontar et al. 2021): a 3-layer projector on both views, both encoded by
    the student with gradients (no teacher, ``targets.student``); the cross-correlation of the
    batch-standardised projections over the global batch (both sides gathered with gradients)
    is pulled to the identity, off-diagonal terms weighted λ = 5.1e-3. Decorrelation prevents
    collapse; the loss is symmetric in the two views by itself.

    Args:
        lambd: λ, the weight of the off-diagonal terms.
        **kwargs: :class:`InstanceDiscrimination`'s options (``hidden_dim``, ``out_dim``) and
            those of every objective.

    Example:
        >>> from m3i_lightning import Backbone
        >>> backbone = Backbone("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=1)
        >>> model = BarlowTwins(backbone=backbone)  # alone: a LightningModule
        >>> type(model.head).__name__
        'BarlowTwins'
    """

    variant = "barlow"
    form = "decorrelation"
    student_target = True
    reference_dims = (8192, 8192)
    projector_layers = 3

    def __init__(self, lambd: float = 5.1e-3, **kwargs) -> None:
        super().__init__(**kwargs)
        self.lambd = lambd

    def discriminate(self, z, targets):
        z_target = self.projector(targets.student.global_feature)
        loss = barlow_twins_loss(gather_with_grad(z)[0], gather_with_grad(z_target)[0],
                                 self.lambd)
        return loss, {}
