"""m3i_lightning: visual pre-training objectives that compose, after M3I (CVPR 2023).

The names below load on first use, so importing one part of the library (a bare loss, one
objective head) does not import the rest, the training engine included.
"""

import importlib

from m3i_lightning.objectives.base import Objective as _Objective

_EXPORTS = {
    "Backbone": "m3i_lightning.backbone",
    "Encoded": "m3i_lightning.backbone",
    "EMATeacher": "m3i_lightning.engine.teacher",
    "Engine": "m3i_lightning.engine.module",
    "MultiObjective": "m3i_lightning.engine.module",
    "OBJECTIVES": "m3i_lightning.objectives",
    "Objective": "m3i_lightning.objectives",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'm3i_lightning' has no attribute '{name}'")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def _train_alone(objective, backbone, *args, **options):
    """``Objective(backbone=b, ...)``: the engine's single-objective run, imported on first use."""
    from m3i_lightning.engine.module import MultiObjective

    return MultiObjective.alone(objective, backbone, *args, **options)


_Objective.host = _train_alone
