"""How the objectives' terms make one step: Eq. 4's fixed weights (the default), or a strategy of
the multi-task literature (``weighting=``).

- ``fixed``: Σ_k w_k·L_k (Eq. 4), L_k the objective's NLL.
- ``uncertainty`` (Kendall, Gal & Cipolla, CVPR 2018): a learned log-variance s_k = log σ_k² per
  term, with the factor its distribution form implies: a Gaussian term becomes
  ½·exp(−s_k)·T_k + ½·s_k (1/(2σ²)·T + log σ), a Boltzmann (softmax) term exp(−s_k)·T_k + ½·s_k
  (1/σ²·T + log σ), T_k = w_k·L_k the fixed-weighted term. Barlow Twins' decorrelation loss, a
  sum of squared errors, counts as Gaussian.
- ``pcgrad`` (Yu et al., NeurIPS 2020, Algorithm 1): on the shared encoder, each objective's
  gradient g_i is projected onto the normal plane of every other objective's gradient g_j it
  conflicts with (g_i·g_j < 0), the others taken in a random order and each projection applied
  to the running g_i: g_i ← g_i − (g_i·g_j / ‖g_j‖²)·g_j; the step takes Σ_i g_i. The heads
  keep their own gradients. Under DDP the projection acts on the global (rank-averaged)
  gradients, in the same order on every rank: the order comes from a generator seeded by the
  step, so a resumed run draws it again. It needs whole gradients, so FSDP2 is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from m3i_lightning.core.distributed import mean_over_ranks
from m3i_lightning.core.errors import ConfigError

# 1/(2σ²) for a Gaussian NLL, 1/σ² for a softmax likelihood (Kendall et al., Eqs. 7 and 10).
FORM_FACTORS = {"Gaussian": 0.5, "Boltzmann": 1.0, "decorrelation": 0.5}


class Weighting(nn.Module):
    """``fixed``: the terms as they are (Eq. 4). Subclasses transform the terms (``forward``)
    or the shared encoder's gradient (``backward``)."""

    name = "fixed"
    # Whether it works on the shards of an FSDP2 engine (PCGrad needs whole gradients).
    shards = True
    # Whether ``backward`` needs the step's terms.
    reads_terms = False

    def forward(self, terms: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], Tensor | None]:
        """The terms as the optimiser sees them, and a term of the strategy's own (None)."""
        return dict(terms), None

    def logs(self) -> dict[str, Tensor]:
        """Scalars to log with the step (``train/weight/<objective>``)."""
        return {}

    def backward(self, loss: Tensor, terms: Mapping[str, Tensor], shared: Sequence[nn.Parameter],
                 step: int, plain: Callable[[Tensor], None]) -> None:
        """Gradients of ``loss``; ``plain`` is Lightning's backward."""
        plain(loss)


class Uncertainty(Weighting):
    """Kendall et al.'s homoscedastic uncertainty weighting (see the module doc).

    Args:
        forms: each objective's distribution form (``Objective.form``), in term order.
    """

    name = "uncertainty"

    def __init__(self, forms: Mapping[str, str]) -> None:
        super().__init__()
        unknown = {n: f for n, f in forms.items() if f not in FORM_FACTORS}
        if unknown:
            raise ConfigError(f"weighting=uncertainty needs each objective's form in "
                              f"{sorted(FORM_FACTORS)}; {unknown} have none of them")
        self.names = tuple(forms)
        self.factors = tuple(FORM_FACTORS[form] for form in forms.values())
        self.log_variance = nn.Parameter(torch.zeros(len(forms)))

    def forward(self, terms: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        s = self.log_variance
        weighted = {name: factor * torch.exp(-s[i]) * terms[name]
                    for i, (name, factor) in enumerate(zip(self.names, self.factors,
                                                           strict=True))}
        return weighted, 0.5 * s.sum()

    def logs(self) -> dict[str, Tensor]:
        weights = torch.tensor(self.factors) * torch.exp(-self.log_variance.detach().cpu())
        return {f"weight/{name}": w for name, w in zip(self.names, weights, strict=True)}


class PCGrad(Weighting):
    """Yu et al.'s projection of conflicting gradients on the shared encoder (module doc)."""

    name = "pcgrad"
    shards = False
    reads_terms = True

    def backward(self, loss: Tensor, terms: Mapping[str, Tensor], shared: Sequence[nn.Parameter],
                 step: int, plain: Callable[[Tensor], None]) -> None:
        """Lightning's backward of ``loss``, then the shared encoder's gradient replaced by
        the PCGrad combination of the terms' (rank-averaged) gradients; accumulated
        gradients of earlier micro-batches are kept."""
        per_objective = []
        for term in terms.values():
            grads = torch.autograd.grad(term, shared, retain_graph=True, allow_unused=True)
            flat = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                              for p, g in zip(shared, grads, strict=True)])
            per_objective.append(mean_over_ranks(flat))
        combined = pcgrad(torch.stack(per_objective), torch.Generator().manual_seed(step))
        before = [None if p.grad is None else p.grad.clone() for p in shared]
        plain(loss)
        offset = 0
        for p, earlier in zip(shared, before, strict=True):
            piece = combined[offset:offset + p.numel()].view_as(p).to(p.dtype)
            p.grad = piece if earlier is None else earlier + piece
            offset += p.numel()


def pcgrad(gradients: Tensor, generator: torch.Generator) -> Tensor:
    """PCGrad's update direction from the objectives' gradients [K, P] (module doc); for each
    objective the order of the others is a permutation drawn from ``generator``."""
    projected = []
    for i in range(gradients.shape[0]):
        g = gradients[i].clone()
        others = [j for j in torch.randperm(gradients.shape[0], generator=generator).tolist()
                  if j != i]
        for j in others:
            dot = torch.dot(g, gradients[j])
            if dot < 0:
                g = g - dot / gradients[j].pow(2).sum() * gradients[j]
        projected.append(g)
    return torch.stack(projected).sum(dim=0)


WEIGHTINGS: dict[str, Callable[[Mapping[str, str]], Weighting]] = {
    "fixed": lambda forms: Weighting(), "uncertainty": Uncertainty,
    "pcgrad": lambda forms: PCGrad()}


def build_weighting(name: str, forms: Mapping[str, str]) -> Weighting:
    """The strategy ``name`` for objectives of the distribution ``forms`` (name → form)."""
    if name not in WEIGHTINGS:
        raise ConfigError(f"unknown weighting={name!r}; choose one of {sorted(WEIGHTINGS)}")
    return WEIGHTINGS[name](forms)
