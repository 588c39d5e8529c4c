"""The pure losses against independent formulas written out by hand in this file."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from m3i_lightning import losses as L
from m3i_lightning.components.distributions import Boltzmann, Gaussian
from m3i_lightning.components.losses import boltzmann_nll, clip_loss, gaussian_nll

# --- hand-written references (explicit loops, no torch loss functions) -----------------------


def ref_mse(pred, target):
    total, count = 0.0, 0
    for p, t in zip(pred.flatten().tolist(), target.flatten().tolist(), strict=True):
        total += (p - t) ** 2
        count += 1
    return total / count


def ref_smooth_l1(pred, target, beta):
    total, count = 0.0, 0
    for p, t in zip(pred.flatten().tolist(), target.flatten().tolist(), strict=True):
        d = abs(p - t)
        total += 0.5 * d * d / beta if d < beta else d - 0.5 * beta
        count += 1
    return total / count


def ref_cosine(pred, target):
    rows_p = pred.reshape(-1, pred.shape[-1]).tolist()
    rows_t = target.reshape(-1, target.shape[-1]).tolist()
    total = 0.0
    for p, t in zip(rows_p, rows_t, strict=True):
        dot = sum(a * b for a, b in zip(p, t, strict=True))
        norm_p = math.sqrt(sum(a * a for a in p))
        norm_t = math.sqrt(sum(b * b for b in t))
        total += 2 - 2 * dot / (norm_p * norm_t)
    return total / len(rows_p)


def ref_log_softmax(row):
    top = max(row)
    log_z = top + math.log(sum(math.exp(v - top) for v in row))
    return [v - log_z for v in row]


def ref_ce_hard(logits, target, smoothing=0.0, ignore=-100):
    """Mean over non-ignored rows of (1-ε)·(−log p[y]) + ε·mean_c(−log p[c])."""
    total, count = 0.0, 0
    for row, y in zip(logits.tolist(), target.tolist(), strict=True):
        if y == ignore:
            continue
        logp = ref_log_softmax(row)
        total += (1 - smoothing) * -logp[y] + smoothing * -sum(logp) / len(logp)
        count += 1
    return total / count


def ref_ce_soft(logits, probs):
    total = 0.0
    for row, q in zip(logits.tolist(), probs.tolist(), strict=True):
        logp = ref_log_softmax(row)
        total += -sum(qc * lc for qc, lc in zip(q, logp, strict=True))
    return total / logits.shape[0]


def ref_clip(image, text, scale):
    """Symmetric InfoNCE written out: pairs on the diagonal, every other row a negative."""
    n = image.shape[0]
    img, txt = image.tolist(), text.tolist()

    def sim(a, b):
        return scale * sum(x * y for x, y in zip(a, b, strict=True))

    loss_i = sum(-ref_log_softmax([sim(img[i], txt[j]) for j in range(n)])[i] for i in range(n))
    loss_t = sum(-ref_log_softmax([sim(txt[i], img[j]) for j in range(n)])[i] for i in range(n))
    return (loss_i / n + loss_t / n) / 2


def unit_rows(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    return x / x.norm(dim=-1, keepdim=True)


# --- Gaussian ----------------------------------------------------------------------------------


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    target = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    return pred, target


def test_gaussian_mse(pair):
    pred, target = pair
    assert gaussian_nll(pred, target, "mse").item() == pytest.approx(ref_mse(pred, target))


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0])
def test_gaussian_smooth_l1(pair, beta):
    pred, target = pair
    got = gaussian_nll(pred, target, "smooth_l1", beta=beta).item()
    assert got == pytest.approx(ref_smooth_l1(pred, target, beta))
    # both branches of the Huber loss are exercised by the data
    diff = (pred - target).abs()
    assert (diff < beta).any() and (diff >= beta).any()


def test_gaussian_cosine(pair):
    pred, target = pair
    assert gaussian_nll(pred, target, "cosine").item() == pytest.approx(ref_cosine(pred, target))
    # scale invariance and the endpoints of 2 − 2·cos
    assert gaussian_nll(3 * pred, target, "cosine").item() == pytest.approx(
        ref_cosine(pred, target))
    assert gaussian_nll(pred, pred, "cosine").item() == pytest.approx(0.0, abs=1e-12)
    assert gaussian_nll(pred, -pred, "cosine").item() == pytest.approx(4.0)


def test_gaussian_unknown_kind():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="huber"):
        gaussian_nll(x, x, "huber")
    with pytest.raises(ValueError, match="huber"):
        Gaussian("huber")


def test_gaussian_module_matches_function(pair):
    pred, target = pair
    got = Gaussian("smooth_l1", beta=0.5)(pred, target).item()
    assert got == pytest.approx(ref_smooth_l1(pred, target, 0.5))


# --- Boltzmann ---------------------------------------------------------------------------------


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(2)
    return 4 * torch.randn(6, 5, generator=g, dtype=torch.float64)


def test_boltzmann_hard_targets(logits):
    target = torch.tensor([0, 4, 2, 2, 1, 3])
    assert boltzmann_nll(logits, target).item() == pytest.approx(ref_ce_hard(logits, target))


def test_boltzmann_ignores_missing_labels(logits):
    target = torch.tensor([0, -100, 2, -100, 1, 3])
    assert boltzmann_nll(logits, target).item() == pytest.approx(ref_ce_hard(logits, target))


def test_boltzmann_label_smoothing(logits):
    target = torch.tensor([0, 4, 2, 2, 1, 3])
    got = boltzmann_nll(logits, target, label_smoothing=0.1).item()
    assert got == pytest.approx(ref_ce_hard(logits, target, smoothing=0.1))
    assert Boltzmann(0.1)(logits, target).item() == pytest.approx(got)


def test_boltzmann_soft_targets(logits):
    g = torch.Generator().manual_seed(3)
    probs = torch.rand(6, 5, generator=g, dtype=torch.float64)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    assert boltzmann_nll(logits, probs).item() == pytest.approx(ref_ce_soft(logits, probs))


def test_boltzmann_is_shift_invariant(logits):
    target = torch.tensor([0, 4, 2, 2, 1, 3])
    assert boltzmann_nll(logits + 100.0, target).item() == pytest.approx(
        boltzmann_nll(logits, target).item())


# --- CLIP --------------------------------------------------------------------------------------


def test_clip_loss_matches_reference():
    image, text = unit_rows(6, 8, seed=4), unit_rows(6, 8, seed=5)
    for scale in (1.0, 14.3, 100.0):
        got = clip_loss(image, text, scale).item()
        assert got == pytest.approx(ref_clip(image, text, scale))


def test_clip_loss_tensor_scale_and_perfect_pairs():
    image = unit_rows(4, 8, seed=6)
    scale = torch.tensor(50.0, dtype=torch.float64)
    assert clip_loss(image, image.clone(), scale).item() == pytest.approx(
        ref_clip(image, image, 50.0))
    # orthogonal, perfectly matched pairs at a high scale: the loss vanishes
    eye = torch.eye(4, dtype=torch.float64)
    assert clip_loss(eye, eye, 100.0).item() < 1e-6


def test_clip_local_loss_over_two_ranks_equals_full_batch():
    """open_clip's local loss: each rank scores its rows against the gathered candidates at
    its offset; the mean over ranks equals the loss on the whole batch (values and grads)."""
    world, per_rank, dim, scale = 2, 5, 8, 20.0
    image = unit_rows(world * per_rank, dim, seed=7).requires_grad_(True)
    text = unit_rows(world * per_rank, dim, seed=8).requires_grad_(True)

    full = clip_loss(image, text, scale)
    assert full.item() == pytest.approx(ref_clip(image.detach(), text.detach(), scale))
    full_grads = torch.autograd.grad(full, (image, text))

    per_rank_losses = []
    for rank in range(world):
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        per_rank_losses.append(clip_loss(image[rows], text[rows], scale, offset=rank * per_rank,
                                         all_image_emb=image, all_text_emb=text))
    # a single chunk alone is not the full loss, the average is
    assert per_rank_losses[0].item() != pytest.approx(full.item())
    mean = torch.stack(per_rank_losses).mean()
    assert mean.item() == pytest.approx(full.item())
    local_grads = torch.autograd.grad(mean, (image, text))
    for got, want in zip(local_grads, full_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_clip_local_loss_wrong_offset_differs():
    """The offset matters: rank 1 scored as if it were rank 0 gives a different loss."""
    image, text = unit_rows(8, 8, seed=9), unit_rows(8, 8, seed=10)
    right = clip_loss(image[4:], text[4:], 10.0, 4, image, text).item()
    wrong = clip_loss(image[4:], text[4:], 10.0, 0, image, text).item()
    assert right != pytest.approx(wrong)


def _normalised(*shape: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape), dim=-1)


LOSS_CALLS = {  # name: (loss, its arguments)
    "gaussian_nll": lambda: (L.gaussian_nll, (torch.randn(4, 8), torch.randn(4, 8))),
    "boltzmann_nll": lambda: (L.boltzmann_nll, (torch.randn(4, 6), torch.tensor([0, 1, 5, 2]))),
    "clip_loss": lambda: (L.clip_loss, (_normalised(4, 8), _normalised(4, 8), 14.0)),
    "info_nce": lambda: (L.info_nce, (_normalised(4, 8), _normalised(4, 8))),
    "queue_info_nce": lambda: (L.queue_info_nce, (_normalised(4, 8), _normalised(4, 8),
                                                  _normalised(16, 8))),
    "dense_info_nce": lambda: (L.dense_info_nce, (_normalised(2, 5, 8), _normalised(2, 5, 8),
                                                  torch.randn(2, 5, 6), torch.randn(2, 5, 6),
                                                  _normalised(16, 8))),
    "byol_loss": lambda: (L.byol_loss, (torch.randn(4, 8), torch.randn(4, 8))),
    "barlow_twins_loss": lambda: (L.barlow_twins_loss, (torch.randn(8, 6), torch.randn(8, 6))),
    "msn_loss": lambda: (L.msn_loss, (torch.randn(4, 8), torch.randn(4, 8),
                                      torch.randn(10, 8))),
    "mae_loss": lambda: (L.mae_loss, (torch.randn(2, 5, 12), torch.randn(2, 5, 12),
                                      torch.tensor([[1, 0, 1, 1, 0]] * 2))),
    "dino_loss": lambda: (L.dino_loss, (torch.randn(4, 10), torch.randn(4, 10),
                                        torch.zeros(10))),
    "unigrad_loss": lambda: (L.unigrad_loss, (torch.randn(2, 5, 8), torch.randn(2, 5, 8),
                                              L.feature_correlation(torch.randn(2, 5, 8)))),
    "feature_correlation": lambda: (L.feature_correlation, (torch.randn(2, 5, 8),)),
}


@pytest.mark.parametrize("name", sorted(LOSS_CALLS))
def test_losses_run_in_float32_under_bf16_autocast(name):
    """Under ``torch.autocast("cpu", torch.bfloat16)``, with bfloat16 inputs as the heads give
    them, every loss (and UniGrad's correlation) returns float32 equal to the float32
    computation on the same inputs: no matmul or reduction of it ran in bfloat16."""
    torch.manual_seed(0)
    loss, args = LOSS_CALLS[name]()
    low = [a.bfloat16() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = loss(*low)
    reference = loss(*[a.float() if torch.is_tensor(a) and a.is_floating_point() else a
                       for a in low])
    assert result.dtype == torch.float32
    assert torch.equal(result, reference)
