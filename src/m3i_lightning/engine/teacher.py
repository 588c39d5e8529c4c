"""Target encoder f_φ: never trained by gradients; an EMA of the student, or frozen weights."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import torch
from torch import nn

from m3i_lightning.backbone import Backbone, Encoded
from m3i_lightning.components.optim import cosine_ramp
from m3i_lightning.engine.sharding import local

EVAL_MODE_WARNING = r"Found \d+ module\(s\) in eval mode at the start of training"


def cosine_momentum(step: int, total_steps: int, base: float, final: float = 1.0) -> float:
    """BYOL/DINO schedule: ``base`` at step 0 rising to ``final`` at ``total_steps`` on a cosine."""
    return cosine_ramp(step, total_steps, base, final)


@torch.no_grad()
def ema_(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """target ← momentum·target + (1 − momentum)·source, parameter by parameter; buffers copied.

    A single foreach lerp over matching parameter lists: on modules of identical structure it
    works on local shards (DDP, FSDP2: each DTensor's local tensor), with no gather of the full
    model. Used by the EMA teacher and by the heads that the reference methods average (DINO,
    MoCo, BYOL).
    """
    target_params = [local(p) for p in target.parameters()]
    source_params = [local(p.detach()) for p in source.parameters()]
    if [p.shape for p in target_params] != [p.shape for p in source_params]:
        raise RuntimeError("EMA target and source have different parameters or shards: shard "
                           "them with the same plan")
    torch._foreach_lerp_(target_params, source_params, 1.0 - momentum)
    for t, s in zip(target.buffers(), source.buffers(), strict=True):
        t.copy_(s)


class TargetEncoder(nn.Module):
    """An encoder run under ``no_grad`` and kept in eval mode (no dropout / drop-path) whatever
    the trainer asks; subclasses say how it follows the student in :meth:`update`."""

    def __init__(self, encoder: Backbone, momentum: float = 0.996,
                 final_momentum: float = 1.0) -> None:
        super().__init__()
        self.encoder = encoder
        self.encoder.requires_grad_(False)
        self.momentum = momentum
        self.final_momentum = final_momentum
        super().train(False)
        # Lightning warns of modules in eval mode when training starts: these are on purpose
        warnings.filterwarnings("ignore", message=EVAL_MODE_WARNING)

    @property
    def embed_dim(self) -> int:
        return self.encoder.embed_dim

    def train(self, mode: bool = True) -> TargetEncoder:
        return super().train(False)

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.encoder(*args, **kwargs)

    def momentum_at(self, step: int, total_steps: int) -> float:
        return cosine_momentum(step, total_steps, self.momentum, self.final_momentum)

    def update(self, student: nn.Module, step: int, total_steps: int) -> float:
        """Follow the student after an optimizer step; returns the momentum of the schedule,
        which the engine passes on to the objectives' averaged heads."""
        raise NotImplementedError


class EMATeacher(TargetEncoder):
    """A frozen copy of ``student`` whose weights follow it by EMA.

    The copy has the student's structure, so a sharding strategy that wraps the student's
    blocks wraps the teacher's identically and :func:`ema_` works on local shards.
    """

    def __init__(self, student: Backbone, momentum: float = 0.996,
                 final_momentum: float = 1.0) -> None:
        super().__init__(copy.deepcopy(student), momentum, final_momentum)

    def update(self, student: nn.Module, step: int, total_steps: int) -> float:
        m = self.momentum_at(step, total_steps)
        ema_(self.encoder, student, m)
        return m


class FrozenTeacher(TargetEncoder):
    """Fixed pre-trained weights, as Feature Distillation distils a CLIP / DINO / DeiT model.

    ``encoder`` is built and loaded by the caller (the config layer reads the checkpoint file:
    :func:`m3i_lightning.config.artifacts.load_encoder`). It never moves, but :meth:`update`
    still returns the momentum schedule, for heads the reference averages. Its width may
    differ from the student's: objectives then take ``target_dim``.

    ``project=True`` passes its tokens and global feature (after the final norm) through the
    network's linear head: a CLIP tower's image projection, which timm keeps as ``head`` when
    built with ``num_classes`` = the embedding width, and which MILAN applies to every token
    of its target. The objectives then read the head's width.
    """

    def __init__(self, encoder: Backbone, momentum: float = 0.996, final_momentum: float = 1.0,
                 project: bool = False) -> None:
        arch = encoder.arch
        if project and encoder.family != "vit":
            raise ValueError(f"project=True reads a ViT's normed tokens; '{arch}' is of the "
                             f"{encoder.family} family")
        if project and not isinstance(encoder.model.get_classifier(), nn.Linear):
            raise ValueError(f"project=True needs the network's image projection, but "
                             f"'{arch}' is built without a head: give num_classes=<its "
                             "embedding width> (e.g. 512 for a CLIP ViT-B) and a checkpoint "
                             "holding head.weight (timm converts CLIP's visual.proj to it)")
        super().__init__(encoder, momentum, final_momentum)
        self.project = project

    @property
    def embed_dim(self) -> int:
        if self.project:
            return self.encoder.model.get_classifier().out_features
        return self.encoder.embed_dim

    def forward(self, *args, **kwargs) -> Encoded:
        encoded = super().forward(*args, **kwargs)
        if not self.project:
            return encoded
        head = self.encoder.model.get_classifier()
        with torch.no_grad():
            return dataclasses.replace(encoded, tokens=head(encoded.tokens),
                                       global_feature=head(encoded.global_feature))

    def update(self, student: nn.Module, step: int, total_steps: int) -> float:
        return self.momentum_at(step, total_steps)
