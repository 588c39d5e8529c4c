"""Objective plugins, keyed by their config name."""

from m3i_lightning.objectives.base import Objective
from m3i_lightning.objectives.clip import CLIP
from m3i_lightning.objectives.cls import Classification
from m3i_lightning.objectives.mim_feat import MaskedFeature

OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls for cls in (Classification, CLIP, MaskedFeature)
}

__all__ = ["CLIP", "OBJECTIVES", "Classification", "MaskedFeature", "Objective"]
