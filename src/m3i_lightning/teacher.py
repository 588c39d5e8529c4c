"""Target encoder f_φ: an exponential moving average of the student, never trained by gradients."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def cosine_momentum(step: int, total_steps: int, base: float, final: float = 1.0) -> float:
    """BYOL/DINO schedule: ``base`` at step 0 rising to ``final`` at ``total_steps`` on a cosine."""
    progress = min(step / max(total_steps, 1), 1.0)
    return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2


class EMATeacher(nn.Module):
    """A frozen copy of ``student`` whose weights follow it by EMA.

    The copy has the student's structure, so a sharding strategy that wraps the student's
    blocks wraps the teacher's identically and :meth:`update` works on local shards: it is a
    single foreach lerp over matching parameter lists, no gather of the full model. It stays
    in eval mode (no dropout / drop-path) whatever the trainer asks.
    """

    def __init__(self, student: nn.Module, momentum: float = 0.996,
                 final_momentum: float = 1.0) -> None:
        super().__init__()
        self.encoder = copy.deepcopy(student)
        self.encoder.requires_grad_(False)
        self.momentum = momentum
        self.final_momentum = final_momentum
        super().train(False)

    def train(self, mode: bool = True) -> EMATeacher:
        return super().train(False)

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.encoder(*args, **kwargs)

    @torch.no_grad()
    def update(self, student: nn.Module, step: int, total_steps: int) -> float:
        """Move every teacher tensor towards the student's; returns the momentum used."""
        m = cosine_momentum(step, total_steps, self.momentum, self.final_momentum)
        teacher_params = list(self.encoder.parameters())
        student_params = [p.detach() for p in student.parameters()]
        if len(teacher_params) != len(student_params):
            raise RuntimeError("teacher and student have different parameter lists")
        torch._foreach_lerp_(teacher_params, student_params, 1.0 - m)
        for t, s in zip(self.encoder.buffers(), student.buffers(), strict=True):
            t.copy_(s)
        return m
