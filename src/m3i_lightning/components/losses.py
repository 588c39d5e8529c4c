"""Pure loss functions: the −log P̂ of each distribution form and of each reference method.

Every function takes plain tensors and returns a scalar mean loss (``boltzmann_nll`` also one
per row), so it can be used without the rest of the library. Shapes use B = batch,
N = tokens, D = feature dimension. Each runs in float32 whatever the autocast around it
(:func:`in_float32`).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from m3i_lightning.components.pixels import normalize_patches

__all__ = ["autocast_off", "barlow_twins_loss", "batch_standardize", "bernoulli_nll",
           "boltzmann_nll", "byol_loss", "clip_loss", "dense_info_nce", "dino_loss",
           "feature_correlation", "gaussian_nll", "in_float32", "info_nce", "mae_loss", "msn_loss",
           "queue_info_nce", "sinkhorn", "unigrad_loss"]


GAUSSIAN_KINDS = ("mse", "smooth_l1", "cosine")
BOLTZMANN_KINDS = ("ce", "bce")
LOW_PRECISION = (torch.float16, torch.bfloat16)


def in_float32(loss: Callable) -> Callable:
    """``loss`` computed in float32 under any autocast: its half-precision tensor arguments
    upcast, autocast off inside. A softmax over thousands of candidates, a sum of squared
    errors or UniGrad's correlation keep 8 bits of mantissa in bfloat16, too few for a loss
    and its gradient; the heads before it still run in bfloat16.

    Args:
        loss: a function of tensors returning a loss.

    Returns:
        The same function, computed in float32.

    Example:
        >>> total = in_float32(lambda x: x.sum())
        >>> total(torch.ones(3, dtype=torch.bfloat16)).dtype
        torch.float32
    """
    @functools.wraps(loss)
    def float32_loss(*args, **kwargs):
        tensors = [v for v in (*args, *kwargs.values()) if torch.is_tensor(v)]
        with autocast_off(tensors[0].device.type if tensors else "cpu"):
            return loss(*map(_upcast, args), **{k: _upcast(v) for k, v in kwargs.items()})
    return float32_loss


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """No autocast on ``device_type`` inside the block; a device without autocast (``meta``,
    where shapes are worked out without data) has none to switch off.

    Args:
        device_type: the device kind, ``"cuda"``, ``"cpu"``, ``"meta"``...

    Example:
        >>> with torch.autocast("cpu"), autocast_off("cpu"):
        ...     torch.is_autocast_enabled("cpu")
        False
    """
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _upcast(value):
    return value.float() if torch.is_tensor(value) and value.dtype in LOW_PRECISION else value


@in_float32
def gaussian_nll(pred: Tensor, target: Tensor, kind: str = "mse", beta: float = 1.0) -> Tensor:
    """−log of a fixed-variance Gaussian (up to scale and constant): a regression loss.

    Args:
        pred: [..., D] predictions.
        target: [..., D] targets.
        kind: ``mse`` (mean over all elements), ``smooth_l1`` (Huber with ``beta``, as
            BEiT v2 / FD use) or ``cosine`` (2 − 2·cos per vector, the von Mises–Fisher form
            of BYOL, averaged over vectors).
        beta: the Huber threshold of ``smooth_l1``.

    Example:
        >>> gaussian_nll(torch.ones(2, 4), torch.zeros(2, 4))
        tensor(1.)
    """
    if kind == "mse":
        return F.mse_loss(pred, target)
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, target, beta=beta)
    if kind == "cosine":
        return (2 - 2 * F.cosine_similarity(pred, target, dim=-1)).mean()
    raise ValueError(f"unknown Gaussian loss kind '{kind}'; choose one of {GAUSSIAN_KINDS}")


@in_float32
def boltzmann_nll(logits: Tensor, target: Tensor, label_smoothing: float = 0.0,
                  reduction: str = "mean") -> Tensor:
    """−log softmax(logits)[target]: a Boltzmann distribution over the candidate set.

    Args:
        logits: [B, C] similarities already divided by the temperature.
        target: [B] candidate index (entries of −100 are ignored) or [B, C] soft target
            distribution.
        label_smoothing: the probability mass spread evenly over the candidates.
        reduction: ``mean``, or ``none`` for the loss of each row.

    Example:
        >>> boltzmann_nll(torch.zeros(2, 4), torch.tensor([0, 3]))  # uniform over 4: log 4
        tensor(1.3863)
    """
    return F.cross_entropy(logits, target, label_smoothing=label_smoothing, reduction=reduction)


@in_float32
def bernoulli_nll(logits: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """−log of independent two-state Boltzmann distributions, one per candidate (present with
    probability sigmoid(logit)): the binary cross-entropy with logits, averaged over the
    candidates, as DeiT III trains (torch's ``BCEWithLogitsLoss``: the mean over rows and
    candidates).

    Args:
        logits: [B, C].
        target: [B, C] probabilities of each candidate being present.
        reduction: ``mean``, or ``none`` for each row's mean over its candidates.

    Example:
        >>> bernoulli_nll(torch.zeros(1, 3), torch.ones(1, 3))  # sigmoid(0) = 1/2: log 2
        tensor(0.6931)
    """
    per_row = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(-1)
    return per_row if reduction == "none" else per_row.mean()


@in_float32
def clip_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor | float,
              offset: int = 0, all_image_emb: Tensor | None = None,
              all_text_emb: Tensor | None = None, all_valid: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE of CLIP (Radford et al., 2021; open_clip ``ClipLoss``).

    For data parallelism pass the embeddings gathered from all ranks as ``all_*`` and this
    rank's position ``offset`` in them: the local rows are scored against every candidate
    (open_clip's ``local_loss``), which averaged over ranks equals the loss on the whole batch.

    Args:
        image_emb: [B, D] L2-normalised image embeddings.
        text_emb: [B, D] L2-normalised embeddings of the matching texts.
        logit_scale: the multiplier of the similarities (already exponentiated and clamped).
        offset: this rank's first row in the gathered embeddings.
        all_image_emb: [B_all, D] image embeddings of every rank (default: ``image_emb``).
        all_text_emb: [B_all, D] text embeddings of every rank (default: ``text_emb``).
        all_valid: [B_all] bool, the (gathered) pairs that have a caption: the others are left
            out as queries and as candidates, shapes unchanged so every rank gathers the same
            sizes; the loss is then the mean over this rank's valid pairs (0, with a graph, if
            none).

    Example:
        >>> pairs = torch.eye(3)
        >>> clip_loss(pairs, pairs, logit_scale=100.0)  # each pair far closer than the others
        tensor(0.)
    """
    all_image_emb = image_emb if all_image_emb is None else all_image_emb
    all_text_emb = text_emb if all_text_emb is None else all_text_emb
    labels = torch.arange(image_emb.shape[0], device=image_emb.device) + offset
    logits_per_image = logit_scale * image_emb @ all_text_emb.T
    logits_per_text = logit_scale * text_emb @ all_image_emb.T
    if all_valid is None:
        return (boltzmann_nll(logits_per_image, labels)
                + boltzmann_nll(logits_per_text, labels)) / 2
    local = all_valid[offset: offset + image_emb.shape[0]]
    labels = labels.masked_fill(~local, -100)  # cross_entropy's ignore_index: 0 for that row
    # the lowest finite logit, not -inf: a row with no candidate left must stay finite
    lowest = torch.finfo(logits_per_image.dtype).min
    nll = (F.cross_entropy(logits_per_image.masked_fill(~all_valid, lowest), labels,
                           reduction="none")
           + F.cross_entropy(logits_per_text.masked_fill(~all_valid, lowest), labels,
                             reduction="none"))
    return nll.sum() / (2 * local.sum().clamp(min=1))


@in_float32
def info_nce(query: Tensor, key: Tensor, temperature: float = 0.2, offset: int = 0) -> Tensor:
    """MoCo v3's contrastive loss (Chen, Xie & He, ICCV 2021), one direction of it:

        2τ · mean_i −log softmax_j(q_i · k_j / τ)[offset + i]

    Every key but the positive is a negative. For data parallelism pass the keys gathered from
    all ranks and this rank's offset in them (local loss: averaged over ranks it equals the
    loss on the whole batch). MoCo v3's keys come from the momentum encoder and carry no
    gradient. The 2τ factor is MoCo v3's: it cancels the 1/τ the logits put on the gradient,
    so τ does not rescale the update.

    Args:
        query: [B, D] L2-normalised predictions.
        key: [M, D] L2-normalised keys, M ≥ B; row ``offset + i`` is the positive of query i.
        temperature: τ.
        offset: this rank's first row in the gathered keys.

    Example:
        >>> q = torch.eye(2)
        >>> info_nce(q, q, temperature=1.0)  # 2 · −log(e / (e + 1))
        tensor(0.6265)
    """
    labels = torch.arange(query.shape[0], device=query.device) + offset
    return 2 * temperature * boltzmann_nll(query @ key.T / temperature, labels)


@in_float32
def queue_info_nce(query: Tensor, key: Tensor, queue: Tensor, temperature: float = 0.2) -> Tensor:
    """InfoNCE against a memory queue (MoCo v2, DenseCL's global term): the candidates of query
    i are its own positive ``key[i]`` and the K queued keys. Keys and queue are targets: no
    gradient flows to them.

    Args:
        query: [B, D] L2-normalised.
        key: [B, D] L2-normalised positives.
        queue: [K, D] L2-normalised keys of earlier batches, the negatives.
        temperature: τ.

    Example:
        >>> q = torch.eye(2)
        >>> queue_info_nce(q, q, queue=-q, temperature=1.0)  # −log(e / (e + e⁻¹ + 1))
        tensor(0.4076)
    """
    positive = (query * key.detach()).sum(-1, keepdim=True)
    logits = torch.cat([positive, query @ queue.detach().T], dim=1) / temperature
    return boltzmann_nll(logits, torch.zeros(query.shape[0], dtype=torch.long,
                                             device=query.device))


@in_float32
def dense_info_nce(query: Tensor, key: Tensor, query_feat: Tensor, key_feat: Tensor,
                   queue: Tensor, temperature: float = 0.2) -> Tensor:
    """DenseCL's dense contrastive loss (Wang et al., CVPR 2021): every query location is
    contrasted, as in :func:`queue_info_nce`, against the key location that matches it best;
    averaged over all B·N locations.

    Args:
        query: [B, N, D] L2-normalised dense projections of one view (the query locations
            may be a subset, e.g. the visible patches).
        key: [B, M, D] L2-normalised dense projections of the other view.
        query_feat: [B, N, C] backbone features that only choose the match ...
        key_feat: [B, M, C] ... the positive of location n is the key location m of highest
            cosine similarity cos(query_feat_n, key_feat_m).
        queue: [K, D] negatives.
        temperature: τ.

    Example:
        >>> z = F.normalize(torch.randn(2, 4, 8), dim=-1)
        >>> dense_info_nce(z, z, z, z, queue=F.normalize(torch.randn(16, 8), dim=-1)).shape
        torch.Size([])
    """
    similarity = F.normalize(query_feat, dim=-1) @ F.normalize(key_feat, dim=-1).transpose(1, 2)
    match = similarity.argmax(dim=-1, keepdim=True)
    positive = torch.take_along_dim(key, match, dim=1)
    return queue_info_nce(query.flatten(0, 1), positive.flatten(0, 1), queue, temperature)


@in_float32
def byol_loss(pred: Tensor, target: Tensor) -> Tensor:
    """BYOL's regression loss (Grill et al., NeurIPS 2020), one direction of it: the mean over
    the batch of ‖p/‖p‖ − z/‖z‖‖² = 2 − 2·cos(p, z).

    Args:
        pred: [B, D] online predictions p.
        target: [B, D] target projections z (the caller stops their gradient).

    Example:
        >>> byol_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]]))  # orthogonal
        tensor(2.)
    """
    return gaussian_nll(pred, target, "cosine")


def batch_standardize(z: Tensor, eps: float = 1e-5) -> Tensor:
    """Each feature of ``z`` to zero mean and unit (biased) variance over the batch, as a
    BatchNorm without affine parameters in training mode.

    Args:
        z: [B, D].
        eps: added to the variance.

    Example:
        >>> batch_standardize(torch.tensor([[1.0], [3.0]]), eps=0.0).flatten()
        tensor([-1.,  1.])
    """
    return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + eps)


@in_float32
def barlow_twins_loss(z1: Tensor, z2: Tensor, lambd: float = 5.1e-3) -> Tensor:
    """Barlow Twins' redundancy-reduction loss (Zbontar et al., ICML 2021):

        C = ẑ1ᵀ ẑ2 / B,   L = Σ_i (1 − C_ii)² + λ Σ_{i≠j} C_ij²

    with ẑ the batch-standardised embeddings (:func:`batch_standardize`). Pulling C to the
    identity makes the views agree (diagonal) while decorrelating the features
    (off-diagonal), the regulariser that prevents collapse.

    Args:
        z1: [B, D] projections of one view, with gradients (no target network) ...
        z2: [B, D] ... and of the other; under data parallelism, those of the global batch.
        lambd: λ, the weight of the off-diagonal terms.

    Example:
        >>> z = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0]])
        >>> barlow_twins_loss(z, z) < 1e-8  # the views agree, the features are uncorrelated
        tensor(True)
    """
    c = batch_standardize(z1).T @ batch_standardize(z2) / z1.shape[0]
    on_diagonal = (1 - c.diagonal()).pow(2).sum()
    off_diagonal = c.pow(2).sum() - c.diagonal().pow(2).sum()
    return on_diagonal + lambd * off_diagonal


def sinkhorn(probs: Tensor, iterations: int = 3) -> Tensor:
    """Sinkhorn–Knopp balancing of soft assignments (SwAV; MSN's targets): alternately
    rescale so each prototype holds 1/K of the mass and each sample 1/B.

    Args:
        probs: [B, K] soft assignments of B samples to K prototypes.
        iterations: rounds of the two rescalings.

    Returns:
        [B, K] rows summing to one, with the prototypes used evenly over the batch.

    Example:
        >>> sinkhorn(torch.tensor([[0.9, 0.1], [0.8, 0.2]]), iterations=20).sum(0)
        tensor([1., 1.])
    """
    q = probs / probs.sum()
    batch, prototypes = q.shape
    for _ in range(iterations):
        q = q / (q.sum(0, keepdim=True) * prototypes)
        q = q / (q.sum(1, keepdim=True) * batch)
    return q * batch


@in_float32
def msn_loss(anchor: Tensor, target: Tensor, prototypes: Tensor,
             anchor_temperature: float = 0.1, target_temperature: float = 0.025,
             me_max_weight: float = 1.0, sinkhorn_iterations: int = 0) -> Tensor:
    """Masked Siamese Networks' loss (Assran et al., ECCV 2022):

        p = softmax(cos(anchor, prototypes) / τ),   p⁺ = softmax(cos(target, prototypes) / τ⁺)
        L = mean_b H(p⁺_b, p_b) − w · H(mean_b p_b) + w · log K

    The low target temperature τ⁺ = 0.025 sharpens the targets (MSN writes it as a softmax at
    τ = 0.1 raised to 1/T, T = 0.25), optionally balanced by :func:`sinkhorn`; the
    mean-entropy maximisation (me-max, weight w) spreads the anchors over all prototypes,
    which prevents collapse. Under data parallelism pass the global batch.

    Args:
        anchor: [B, D] masked-view embeddings.
        target: [B, D] target-encoder embeddings of the full view (a constant).
        prototypes: [K, D] learnable prototypes (both sides are L2-normalised here).
        anchor_temperature: τ.
        target_temperature: τ⁺.
        me_max_weight: w.
        sinkhorn_iterations: rounds of :func:`sinkhorn` on the targets (0: none).

    Example:
        >>> z = torch.randn(8, 16)
        >>> msn_loss(z, z, prototypes=torch.randn(4, 16)).shape
        torch.Size([])
    """
    prototypes = F.normalize(prototypes, dim=-1)
    logits = F.normalize(anchor, dim=-1) @ prototypes.T / anchor_temperature
    with torch.no_grad():
        targets = F.softmax(F.normalize(target, dim=-1) @ prototypes.T / target_temperature, -1)
        if sinkhorn_iterations:
            targets = sinkhorn(targets, sinkhorn_iterations)
    cross_entropy = boltzmann_nll(logits, targets)
    mean_probs = F.softmax(logits, dim=-1).mean(0)
    neg_entropy = (mean_probs * mean_probs.log()).sum()
    return cross_entropy + me_max_weight * (neg_entropy + math.log(prototypes.shape[0]))


@in_float32
def mae_loss(pred: Tensor, target_patches: Tensor, mask: Tensor | None = None,
             norm_pix: bool = True) -> Tensor:
    """MAE's reconstruction loss (He et al., 2022): the mean over the masked patches of each
    patch's mean squared error, the target patches standardised first (``norm_pix_loss``).

    Args:
        pred: [B, N, p·p·C] predicted patches.
        target_patches: [B, N, p·p·C] as :func:`~m3i_lightning.components.pixels.patchify`
            gives them, before normalisation.
        mask: [B, N], 1 = masked: only those patches count. Without it every given patch
            counts, so pass all N patches (auto-encoder) or the masked ones only, gathered
            ([B, M, p·p·C], the same loss).
        norm_pix: standardise each target patch (MAE's ``norm_pix_loss``).

    Example:
        >>> patches = torch.randn(2, 4, 12)
        >>> torch.isclose(mae_loss(torch.zeros(2, 4, 12), patches, norm_pix=False),
        ...               patches.pow(2).mean())
        tensor(True)
    """
    target = normalize_patches(target_patches) if norm_pix else target_patches
    per_patch = (pred - target).pow(2).mean(dim=-1)
    if mask is None:
        return per_patch.mean()
    mask = mask.to(per_patch.dtype)
    return (per_patch * mask).sum() / mask.sum()


@in_float32
def dino_loss(student_logits: Tensor, teacher_logits: Tensor, center: Tensor,
              student_temp: float = 0.1, teacher_temp: float = 0.04) -> Tensor:
    """DINO's self-distillation cross-entropy (Caron et al., 2021), averaged over the batch:

        −Σ_k softmax((t − c)/τ_t)_k · log softmax(s/τ_s)_k

    Centering keeps one prototype from dominating, the low teacher temperature sharpens;
    together they prevent collapse. The teacher distribution is a fixed target: no gradient
    flows to it.

    Args:
        student_logits: [B, K] prototype scores s of the student's view.
        teacher_logits: [B, K] prototype scores t of the teacher's matching view.
        center: [K] or [1, K], c, the running mean of teacher scores.
        student_temp: τ_s.
        teacher_temp: τ_t.

    Example:
        >>> dino_loss(torch.zeros(2, 4), torch.zeros(2, 4), center=torch.zeros(4))  # log 4
        tensor(1.3863)
    """
    target = F.softmax((teacher_logits.detach() - center) / teacher_temp, dim=-1)
    return boltzmann_nll(student_logits / student_temp, target)


@in_float32
def feature_correlation(features: Tensor) -> Tensor:
    """UniGrad's correlation matrix F = (1/n) Σ_v v vᵀ (uncentred) of n vectors.

    Args:
        features: [..., D]; every leading dimension indexes samples.

    Returns:
        [D, D].

    Example:
        >>> feature_correlation(torch.eye(2))
        tensor([[0.5000, 0.0000],
                [0.0000, 0.5000]])
    """
    vectors = features.reshape(-1, features.shape[-1])
    return vectors.T @ vectors / vectors.shape[0]


@in_float32
def unigrad_loss(pred: Tensor, target: Tensor, correlation: Tensor,
                 neg_weight: float = 0.02) -> Tensor:
    """SiameseIM's dense UniGrad loss (Tao et al., CVPR 2023; UniGrad, Tao et al., CVPR 2022):

        L = (1/D) · mean_v [ ‖p_v − y_v‖² + λ · p_vᵀ F p_v ]

    Targets and F are constants. The gradient, 2/(nD)·(p_v − y_v + λ F p_v), is UniGrad's
    unified form: a positive pull towards the target plus a negative term pushing p_v out of
    the directions where features concentrate, which is what keeps the features from
    collapsing without negative pairs.

    Args:
        pred: [..., D] predictions p, one vector v per leading index (B·N tokens).
        target: [..., D] targets y.
        correlation: [D, D] F, the correlation of the targets (:func:`feature_correlation`
            of this batch, or its moving average).
        neg_weight: λ.

    Example:
        >>> p = torch.eye(2)
        >>> unigrad_loss(p, p, feature_correlation(p))  # λ · pᵀFp / D = 0.02 · 0.5 / 2
        tensor(0.0050)
    """
    target, correlation = target.detach(), correlation.detach()
    positive = (pred - target).pow(2).sum(-1)
    negative = ((pred @ correlation) * pred).sum(-1)
    return (positive + neg_weight * negative).mean() / pred.shape[-1]
