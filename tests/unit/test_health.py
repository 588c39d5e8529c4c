"""Label-free collapse monitors: RankMe against its formula on matrices of known rank, the
normalised std, and the warning on a collapsed representation."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import tiny_backbone

from m3i_lightning.evaluation.health import RepresentationHealth, normalised_std, rankme


def test_rankme_is_the_entropy_rank_of_the_singular_values():
    torch.manual_seed(0)
    # orthogonal rows of equal norm: every singular value equal, effective rank = the count
    q, _ = torch.linalg.qr(torch.randn(16, 16))
    assert rankme(q[:8]).item() == pytest.approx(8, rel=1e-3)
    # rank one: a single non-zero singular value
    assert rankme(torch.randn(32, 1) @ torch.randn(1, 16)).item() == pytest.approx(1, rel=1e-3)
    # singular values 3 and 1: exp(−(¾ log ¾ + ¼ log ¼))
    two = torch.diag(torch.tensor([3.0, 1.0]))
    want = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert rankme(two).item() == pytest.approx(want, rel=1e-4)


def test_normalised_std_is_zero_when_collapsed_and_near_one_over_root_d_when_spread():
    torch.manual_seed(0)
    assert normalised_std(torch.ones(64, 32)).item() == pytest.approx(0, abs=1e-6)
    assert normalised_std(torch.randn(4096, 32)).item() == pytest.approx(32 ** -0.5, rel=0.05)


class Constant:
    """A collapsed engine: the same feature for every image, no teacher."""

    def global_features(self, images):
        return torch.ones(images.shape[0], 16), None


class Fresh:
    """A freshly initialised ViT, no teacher."""

    def __init__(self):
        self.backbone = tiny_backbone().eval()

    def global_features(self, images):
        return self.backbone(images).global_feature, None


def test_a_collapsed_representation_warns_and_a_fresh_one_does_not(recwarn):
    health = RepresentationHealth(warmup_steps=0)
    images = torch.randn(32, 3, 16, 16)
    values, dim = health.measure(Constant(), images)
    with pytest.warns(UserWarning, match="collapsing at step 7"):
        health.warn_if_collapsed(values, dim, 7)
    torch.manual_seed(0)
    values, dim = health.measure(Fresh(), images)
    health.warn_if_collapsed(values, dim, 8)
    assert not [w for w in recwarn if "collapsing" in str(w.message)]
    assert values["rankme"].item() > 2


def test_teacher_cosine_starts_at_one_for_an_ema_copy(tokenizer):
    from helpers import tiny_objective

    from m3i_lightning.engine.module import MultiObjective

    torch.manual_seed(0)
    model = MultiObjective(tiny_backbone(), {"mim_feat": tiny_objective("mim_feat", tokenizer)})
    values, _ = RepresentationHealth().measure(model.eval(), torch.randn(8, 3, 16, 16))
    assert values["teacher_cosine"].item() == pytest.approx(1.0, abs=1e-4)
