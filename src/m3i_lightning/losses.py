"""Pure loss functions: the −log P̂ of each distribution form and of each reference method.

Every function takes plain tensors and returns a scalar mean loss, so it can be used without
the rest of the library. Shapes use B = batch, N = tokens, D = feature dimension.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from m3i_lightning.pixels import normalize_patches

GAUSSIAN_KINDS = ("mse", "smooth_l1", "cosine")


def gaussian_nll(pred: Tensor, target: Tensor, kind: str = "mse", beta: float = 1.0) -> Tensor:
    """−log of a fixed-variance Gaussian (up to scale and constant): a regression loss.

    ``pred``, ``target``: [..., D]. ``kind``: ``mse`` (mean over all elements),
    ``smooth_l1`` (Huber with ``beta``, as BEiT v2 / FD use), or ``cosine``
    (2 − 2·cos per vector, the von Mises–Fisher form of BYOL), averaged over vectors.
    """
    if kind == "mse":
        return F.mse_loss(pred, target)
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, target, beta=beta)
    if kind == "cosine":
        return (2 - 2 * F.cosine_similarity(pred, target, dim=-1)).mean()
    raise ValueError(f"unknown Gaussian loss kind '{kind}'; choose one of {GAUSSIAN_KINDS}")


def boltzmann_nll(logits: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """−log softmax(logits)[target]: a Boltzmann distribution over the candidate set.

    ``logits``: [B, C] similarities already divided by the temperature; ``target``: [B]
    candidate index (entries of −100 are ignored) or [B, C] soft target distribution.
    """
    return F.cross_entropy(logits, target, label_smoothing=label_smoothing)


def clip_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor | float,
              offset: int = 0, all_image_emb: Tensor | None = None,
              all_text_emb: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE of CLIP (Radford et al., 2021; open_clip ``ClipLoss``).

    ``image_emb``, ``text_emb``: [B, D] L2-normalised embeddings of matching pairs;
    ``logit_scale``: the multiplier (already exponentiated and clamped).
    For data parallelism pass the embeddings gathered from all ranks as ``all_*`` and this
    rank's position ``offset`` in them: the local rows are scored against every candidate
    (open_clip's ``local_loss``), which averaged over ranks equals the loss on the whole batch.
    """
    all_image_emb = image_emb if all_image_emb is None else all_image_emb
    all_text_emb = text_emb if all_text_emb is None else all_text_emb
    labels = torch.arange(image_emb.shape[0], device=image_emb.device) + offset
    logits_per_image = logit_scale * image_emb @ all_text_emb.T
    logits_per_text = logit_scale * text_emb @ all_image_emb.T
    return (boltzmann_nll(logits_per_image, labels) + boltzmann_nll(logits_per_text, labels)) / 2


def mae_loss(pred: Tensor, target_patches: Tensor, mask: Tensor | None = None,
             norm_pix: bool = True) -> Tensor:
    """MAE's reconstruction loss (He et al., 2022): the mean over the masked patches of each
    patch's mean squared error, the target patches standardised first (``norm_pix_loss``).

    ``pred``, ``target_patches``: [B, N, p·p·C] (targets as :func:`~m3i_lightning.pixels.patchify`
    gives them, before normalisation). ``mask``: [B, N], 1 = masked: only those patches count.
    Without ``mask`` every given patch counts, so pass all N patches (auto-encoder) or the
    masked ones only, gathered ([B, M, p·p·C], the same loss).
    """
    target = normalize_patches(target_patches) if norm_pix else target_patches
    per_patch = (pred - target).pow(2).mean(dim=-1)
    if mask is None:
        return per_patch.mean()
    mask = mask.to(per_patch.dtype)
    return (per_patch * mask).sum() / mask.sum()


def dino_loss(student_logits: Tensor, teacher_logits: Tensor, center: Tensor,
              student_temp: float = 0.1, teacher_temp: float = 0.04) -> Tensor:
    """DINO's self-distillation cross-entropy (Caron et al., 2021), averaged over the batch:

        −Σ_k softmax((t − c)/τ_t)_k · log softmax(s/τ_s)_k

    ``student_logits`` s, ``teacher_logits`` t: [B, K] prototype scores of matching views;
    ``center`` c: [K] or [1, K], the running mean of teacher scores. Centering keeps one
    prototype from dominating, the low teacher temperature sharpens; together they prevent
    collapse. The teacher distribution is a fixed target: no gradient flows to it.
    """
    target = F.softmax((teacher_logits.detach() - center) / teacher_temp, dim=-1)
    return boltzmann_nll(student_logits / student_temp, target)
