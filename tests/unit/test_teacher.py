"""EMA teacher: cosine momentum schedule, frozen copy, and the update rule computed by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from m3i_lightning.engine.teacher import EMATeacher, cosine_momentum


def test_cosine_momentum_endpoints():
    assert cosine_momentum(0, 100, 0.996) == pytest.approx(0.996)
    assert cosine_momentum(100, 100, 0.996) == pytest.approx(1.0)
    assert cosine_momentum(250, 100, 0.996) == pytest.approx(1.0)
    assert cosine_momentum(50, 100, 0.9, 0.99) == pytest.approx((0.9 + 0.99) / 2)


def test_cosine_momentum_known_points_symmetry_and_monotonic():
    """The schedule's defining properties rather than its expression: a cosine ramp from base
    to final passes a quarter of the way at a third of the steps (cos(π/3) = 1/2), three
    quarters at two thirds, is point-symmetric about the midpoint and rises at every step."""
    base, final, total = 0.9, 1.0, 60
    assert cosine_momentum(20, total, base, final) == pytest.approx(0.925)
    assert cosine_momentum(40, total, base, final) == pytest.approx(0.975)
    values = [cosine_momentum(s, total, base, final) for s in range(total + 1)]
    for step in range(total + 1):
        assert values[step] + values[total - step] == pytest.approx(base + final)
    assert all(b > a for a, b in zip(values, values[1:], strict=False))


def student_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))


def test_teacher_is_a_frozen_copy():
    student = student_net()
    teacher = EMATeacher(student)
    for (name, t), (_, s) in zip(teacher.encoder.named_parameters(), student.named_parameters(),
                                 strict=True):
        assert not t.requires_grad, name
        assert s.requires_grad
        assert t.data_ptr() != s.data_ptr()
        torch.testing.assert_close(t, s)
    x = torch.randn(5, 4, requires_grad=True)
    out = teacher(x)
    assert not out.requires_grad and out.grad_fn is None


def test_teacher_stays_in_eval_mode():
    student = student_net()
    teacher = EMATeacher(student)
    assert not teacher.training and not teacher.encoder.training
    wrapper = nn.ModuleDict({"student": student, "teacher": teacher})
    wrapper.train()
    assert student.training
    assert not teacher.training
    assert all(not m.training for m in teacher.modules())
    teacher.train(True)
    assert all(not m.training for m in teacher.modules())
    # eval mode: dropout off, so two calls agree
    x = torch.randn(6, 4)
    torch.testing.assert_close(teacher(x), teacher(x))


def test_update_is_the_hand_computed_lerp():
    student = student_net()
    teacher = EMATeacher(student, momentum=0.9, final_momentum=1.0)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
        student[1].running_mean.fill_(0.25)
    before = {k: v.clone() for k, v in teacher.encoder.state_dict().items()}
    step, total = 5, 15  # a third of the way: the momentum is a quarter from 0.9 to 1
    m = 0.925
    used = teacher.update(student, step, total)
    assert used == pytest.approx(m)
    student_state = student.state_dict()
    for name, param in teacher.encoder.named_parameters():
        want = m * before[name] + (1 - m) * student_state[name]
        torch.testing.assert_close(param, want)
        assert not torch.allclose(param, before[name])
        assert not param.requires_grad
    # buffers (BatchNorm statistics) are copied, not averaged
    torch.testing.assert_close(teacher.encoder[1].running_mean, torch.full((8,), 0.25))


def test_update_at_final_momentum_leaves_teacher_unchanged():
    student = student_net()
    teacher = EMATeacher(student, momentum=0.5)
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(3.0)
    before = [p.clone() for p in teacher.encoder.parameters()]
    assert teacher.update(student, 10, 10) == pytest.approx(1.0)
    for got, want in zip(teacher.encoder.parameters(), before, strict=True):
        torch.testing.assert_close(got, want)


def test_update_rejects_a_different_student():
    teacher = EMATeacher(student_net())
    with pytest.raises(RuntimeError, match="parameter"):
        teacher.update(nn.Linear(4, 3), 0, 10)
