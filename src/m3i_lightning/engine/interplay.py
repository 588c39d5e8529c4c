"""Objective interplay: how the objectives' gradients agree on the encoder they share.

Eq. 4 sums the objectives' terms on one encoder, so a step follows the sum g = Σ_k g_k of their
gradients. How they interact there is all in the Gram matrix G_ij = ⟨g_i, g_j⟩:

- ``norm`` ‖g_k‖ = √G_kk: how hard objective k pulls;
- ``share`` ⟨g_k, g⟩ / ‖g‖² = Σ_j G_kj / Σ_ij G_ij: its part of the step, measured along the
  step's direction. The shares sum to 1; a negative share works against the step, one above 1
  means the others partly cancel it;
- ``cos`` G_ij / (‖g_i‖ ‖g_j‖) of a pair: synergy above 0, conflict below;
- ``cos_sum`` ⟨g_k, g⟩ / (‖g_k‖ ‖g‖): how closely the step follows objective k.

g_k is the gradient of the k-th term as the optimiser sees it (its weight and a weighting
strategy's factor included) with respect to the shared encoder's parameters
(``wrt='encoder'``), or with respect to the encoded tokens z_x (``wrt='tokens'``: the output of
the encoder's last block, every token of every pass, which the final norm and every predictor
read).

The figures are those of the global batch. A DDP rank's loss is the mean over its shard and the
global gradient is the average of the ranks' gradients: each objective's parameter gradient is
averaged over ranks before the products are taken (:func:`global_gram`). Under FSDP2 the
backward already reduce-scatters the averaged gradient, each rank holding a shard of it, and
token gradients belong to the rank's own rows: those partial products are summed over ranks.

:func:`measure` runs its own forward pass of the step (the engine's ``interplay_terms``) and
leaves no trace: the random streams (masks, mixing partners) are forked, so it draws exactly the
masks of the training step that follows, the buffers (queues, centres, BatchNorm statistics)
and the parameters' gradients are put back as they were.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from m3i_lightning.core.distributed import world
from m3i_lightning.core.errors import ConfigError
from m3i_lightning.engine.sharding import local

WRT = ("encoder", "tokens")
CHUNK = 1 << 22  # elements of a gradient multiplied at a time in float64


@dataclass(frozen=True)
class Interplay:
    """The Gram matrix ``gram`` [K, K] (float64) of the objectives ``names``' gradients, and
    every figure derived from it (see the module doc).

    Example:
        >>> g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])  # two objectives' gradients
        >>> interplay = Interplay(("a", "b"), gram([[g[0]], [g[1]]]))
        >>> round(interplay.cosines()[0, 1].item(), 4), interplay.shares().tolist()
        (-0.7071, [0.0, 1.0])
    """

    names: tuple[str, ...]
    gram: Tensor

    def norms(self) -> Tensor:
        return self.gram.diagonal().clamp_min(0).sqrt()

    def total_norm(self) -> Tensor:
        """‖g‖ of the summed gradient, the step's direction."""
        return self.gram.sum().clamp_min(0).sqrt()

    def cosines(self) -> Tensor:
        """[K, K] pairwise cosines (0 where a gradient vanishes)."""
        return _ratio(self.gram, self.norms()[:, None] * self.norms()[None, :])

    def shares(self) -> Tensor:
        return _ratio(self.gram.sum(dim=1), self.gram.sum().expand(len(self.names)))

    def cosines_with_sum(self) -> Tensor:
        return _ratio(self.gram.sum(dim=1), self.norms() * self.total_norm())

    def metrics(self, prefix: str = "interplay") -> dict[str, float]:
        """Flat scalars for the loggers: ``<prefix>/norm/<k>``, ``share/<k>``, ``cos_sum/<k>``
        and ``cos/<i>-<j>`` for each pair."""
        values = {}
        for stat, vector in (("norm", self.norms()), ("share", self.shares()),
                             ("cos_sum", self.cosines_with_sum())):
            values.update({f"{prefix}/{stat}/{n}": float(v)
                           for n, v in zip(self.names, vector, strict=True)})
        cosines = self.cosines()
        for i, a in enumerate(self.names):
            for j in range(i + 1, len(self.names)):
                values[f"{prefix}/cos/{a}-{self.names[j]}"] = float(cosines[i, j])
        return values


def _ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return torch.where(denominator > 0, numerator / safe, torch.zeros_like(numerator))


def gram(gradients: Sequence[Sequence[Tensor]]) -> Tensor:
    """G_ij = Σ_pieces ⟨g_i, g_j⟩ of per-objective gradients given as pieces of one layout
    (one tensor per parameter, or per encoded output), in float64."""
    k = len(gradients)
    result = torch.zeros(k, k, dtype=torch.float64)
    for pieces in zip(*gradients, strict=True):
        flat = torch.stack([p.detach().reshape(-1) for p in pieces])
        for start in range(0, flat.shape[1], CHUNK):
            chunk = flat[:, start:start + CHUNK].double()
            result += (chunk @ chunk.T).cpu()
    return result


def global_gram(gradients: Sequence[Sequence[Tensor]], partitioned: bool) -> Tensor:
    """:func:`gram` of the global gradients. ``partitioned``: each rank holds its own part of
    them (FSDP2 shards of the reduced gradient; token gradients of its rows), whose products
    add up over ranks. Otherwise each rank holds its local gradient of a replicated parameter
    (DDP), which is averaged over ranks first, as DDP averages it."""
    _, size = world()
    if size == 1:
        return gram(gradients)
    if partitioned:
        partial = gram(gradients).to(_collective_device(gradients))
        dist.all_reduce(partial)
        return partial.cpu()
    averaged = []
    for pieces in gradients:
        flat = torch.cat([p.detach().reshape(-1) for p in pieces])
        dist.all_reduce(flat)
        averaged.append([flat / size])
    return gram(averaged)


def _collective_device(gradients: Sequence[Sequence[Tensor]]) -> torch.device:
    """Where a collective's tensor must live: the gradients' device (nccl takes CUDA only)."""
    return next((p.device for pieces in gradients for p in pieces), torch.device("cpu"))


@contextlib.contextmanager
def kept_gradients(parameters: Sequence[nn.Parameter]) -> Iterator[None]:
    """Inside, every ``.grad`` starts empty; on the way out each is what it was."""
    saved = [p.grad for p in parameters]
    for p in parameters:
        p.grad = None
    try:
        yield
    finally:
        for p, grad in zip(parameters, saved, strict=True):
            p.grad = grad


@contextlib.contextmanager
def untouched(module: nn.Module) -> Iterator[None]:
    """The random streams (CPU and the module's CUDA device) forked and every buffer of
    ``module`` restored on the way out: a pass inside changes nothing the training reads."""
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    devices = sorted({p.device.index or 0 for p in module.parameters() if p.is_cuda})
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            with torch.no_grad():
                for buffer, value in buffers:
                    buffer.copy_(value)


def parameter_gradients(terms: Mapping[str, Tensor],
                        parameters: Sequence[nn.Parameter]) -> tuple[list[list[Tensor]], bool]:
    """Each term's gradient with respect to ``parameters`` (their local shards for FSDP2),
    by one backward per term into ``.grad``, so a sharded engine reduce-scatters each as in
    a training step; and whether they are shards (partitioned). Call it inside
    :func:`kept_gradients` of every parameter the terms reach."""
    sharded = any(isinstance(p, DTensor) for p in parameters)
    inputs = None if sharded else list(parameters)  # FSDP2's leaves are its gathered copies
    gradients = []
    for i, term in enumerate(terms.values()):
        for p in parameters:
            p.grad = None
        term.backward(retain_graph=i < len(terms) - 1, inputs=inputs)
        gradients.append([torch.zeros_like(local(p.detach())) if p.grad is None
                          else local(p.grad).clone() for p in parameters])
    return gradients, sharded


def token_gradients(terms: Mapping[str, Tensor], tokens: Sequence[Tensor]) -> list[list[Tensor]]:
    """Each term's gradient with respect to the encoded ``tokens``, scaled by 1/world size: a
    rank's loss is the mean over its shard, and the global loss the mean over ranks."""
    _, size = world()
    gradients = []
    for i, term in enumerate(terms.values()):
        grads = torch.autograd.grad(term, tokens, retain_graph=i < len(terms) - 1,
                                    allow_unused=True)
        gradients.append([torch.zeros_like(t) if g is None else g / size
                          for t, g in zip(tokens, grads, strict=True)])
    return gradients


@contextlib.contextmanager
def captured_outputs(module: nn.Module) -> Iterator[list[Tensor]]:
    """The outputs of ``module`` in the forward passes run inside (not the recomputations of
    activation checkpointing, which happen in the backward, after the block is left)."""
    outputs: list[Tensor] = []
    handle = module.register_forward_hook(lambda _m, _args, out: outputs.append(out))
    try:
        yield outputs
    finally:
        handle.remove()


Context = Callable[[], contextlib.AbstractContextManager]


def measure(engine, batch: dict, wrt: str = "encoder",
            forward_context: Context = contextlib.nullcontext) -> Interplay:
    """The interplay of ``engine``'s objectives on a training step of ``batch`` (see the module
    doc); every rank of a distributed run must call it (its reductions are collectives).

    Args:
        engine: a :class:`~m3i_lightning.engine.module.MultiObjective` (anything with
            ``backbone`` and ``interplay_terms``).
        batch: a training batch, as the step receives it.
        wrt: ``encoder`` (the shared encoder's parameters) or ``tokens`` (the encoded z_x).
        forward_context: what the step's forward runs in (the Trainer's autocast).
    """
    check_wrt(wrt)
    parameters = [p for p in engine.parameters() if p.requires_grad]
    encoder = [p for p in engine.backbone.parameters() if p.requires_grad]
    with untouched(engine), kept_gradients(parameters):
        with captured_outputs(engine.backbone.blocks()[-1]) as tokens, forward_context():
            terms = engine.interplay_terms(batch)
        if wrt == "tokens":
            gradients, partitioned = token_gradients(terms, tokens), True
        else:
            gradients, partitioned = parameter_gradients(terms, encoder)
    return Interplay(tuple(terms), global_gram(gradients, partitioned))


def check_wrt(wrt: str) -> None:
    if wrt not in WRT:
        raise ConfigError(f"interplay.wrt={wrt!r}: choose {' or '.join(WRT)}")
