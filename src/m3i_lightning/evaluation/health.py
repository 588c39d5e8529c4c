"""Label-free health of a self-supervised run: is the representation collapsing?

A collapsed encoder maps every image to (nearly) the same point, and its loss can still look
fine. Three numbers show it before any label is consulted, logged at the logging interval:

- ``health/rankme``: RankMe (Garrido et al., ICML 2023), the effective rank of a batch of
  global features: exp of the entropy of their normalised singular values. It lies in
  [1, min(N, D)]; a collapsed representation has rank near 1.
- ``health/std``: the per-dimension standard deviation of the L2-normalised features, averaged
  (SimSiam's collapse check): about 1/√D for features spread over the sphere, 0 when collapsed.
- ``health/teacher_cosine``: the mean cosine between the student's and the teacher's global
  features of the same images, for runs with a teacher: how closely the student follows it.

The features come from one extra no-grad forward of the first ``max_samples`` images of the
logging step's view1, so the cost is a fraction of one step every ``log_every_n_steps``.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor


def rankme(features: Tensor, eps: float = 1e-7) -> Tensor:
    """Effective rank of ``features`` [N, D]: exp(−Σ p_k log p_k), p = σ / Σσ (+ ε)."""
    singular = torch.linalg.svdvals(features.float())
    p = singular / singular.sum() + eps
    return torch.exp(-(p * p.log()).sum())


def normalised_std(features: Tensor) -> Tensor:
    """Mean over dimensions of the batch std of the L2-normalised ``features`` [N, D]."""
    return F.normalize(features.float(), dim=-1).std(dim=0).mean()


class RepresentationHealth(L.Callback):
    """Logs :func:`rankme`, :func:`normalised_std` and the teacher–student cosine of the
    engine's backbone, and warns when the representation collapses: RankMe below
    ``min_rank`` or the normalised std below ``min_std`` times its healthy value 1/√D, naming
    the criterion that fired. Not before ``warmup_steps``: a freshly initialised network's
    features are narrow (a ViT's normalised std starts near a tenth of its spread value) and
    spread out in the first steps, so an early warning would be false."""

    def __init__(self, max_samples: int = 256, min_rank: float = 2.0, min_std: float = 0.1,
                 warmup_steps: int = 100) -> None:
        self.max_samples, self.min_rank, self.min_std = max_samples, min_rank, min_std
        self.warmup_steps = warmup_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % trainer.log_every_n_steps and step != trainer.max_steps:
            return
        images = batch["view1"][: self.max_samples]
        values, dim = self.measure(pl_module, images)
        pl_module.log_dict({f"health/{k}": v for k, v in values.items()},
                           batch_size=images.shape[0])
        self.warn_if_collapsed(values, dim, step)

    @torch.no_grad()
    def measure(self, engine, images: Tensor) -> tuple[dict[str, Tensor], int]:
        """The health values of the engine's features of ``images`` (its ``global_features``:
        student, teacher or None), and the feature width."""
        features, target = engine.global_features(images)
        values = {"rankme": rankme(features), "std": normalised_std(features)}
        if target is not None and target.shape == features.shape:
            values["teacher_cosine"] = F.cosine_similarity(features, target, dim=-1).mean()
        return values, features.shape[-1]

    def warn_if_collapsed(self, values: dict[str, Tensor], dim: int, step: int) -> None:
        if step < self.warmup_steps:
            return
        rank, std, healthy = values["rankme"].item(), values["std"].item(), dim ** -0.5
        fired = []
        if rank < self.min_rank:
            fired.append(f"RankMe {rank:.2f} is below health.min_rank={self.min_rank}")
        if std < self.min_std * healthy:
            fired.append(f"the normalised std {std:.4f} is below health.min_std={self.min_std} "
                         f"of its spread value {healthy:.4f}")
        if fired:
            rank_zero_warn(f"the representation is collapsing at step {step}: "
                           f"{' and '.join(fired)}; lower the learning rate, check the teacher "
                           "momentum, or add a regulariser (negatives, decorrelation)")
