"""Objective plugins, keyed by their config name."""

from m3i_lightning.objectives.ae import AutoEncoder
from m3i_lightning.objectives.base import Objective
from m3i_lightning.objectives.clip import CLIP
from m3i_lightning.objectives.cls import Classification
from m3i_lightning.objectives.dense_distill import DenseDistill
from m3i_lightning.objectives.dense_id import DenseContrast
from m3i_lightning.objectives.global_distill import GlobalDistill
from m3i_lightning.objectives.inst_disc import InstanceDiscrimination
from m3i_lightning.objectives.mim_feat import MaskedFeature
from m3i_lightning.objectives.mim_global import MaskedGlobal
from m3i_lightning.objectives.mim_pixel import MaskedPixel
from m3i_lightning.objectives.nvs import NovelViewSynthesis
from m3i_lightning.objectives.sim_feat import SiameseFeature
from m3i_lightning.objectives.sim_global import MaskedSiamese
from m3i_lightning.objectives.sim_pixel import SiamesePixel

OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls for cls in (Classification, CLIP, MaskedFeature, AutoEncoder, MaskedPixel,
                              DenseDistill, GlobalDistill, MaskedGlobal, NovelViewSynthesis,
                              SiamesePixel, SiameseFeature, InstanceDiscrimination,
                              DenseContrast, MaskedSiamese)
}

__all__ = ["CLIP", "OBJECTIVES", "AutoEncoder", "Classification", "DenseContrast",
           "DenseDistill", "GlobalDistill", "InstanceDiscrimination", "MaskedFeature",
           "MaskedGlobal", "MaskedPixel", "MaskedSiamese", "NovelViewSynthesis", "Objective",
           "SiameseFeature", "SiamesePixel"]
