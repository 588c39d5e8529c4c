"""Objective plugins, keyed by their config name.

Every module of this package is imported here, and every objective class registers itself
when defined (:class:`~m3i_lightning.objectives.base.Objective`), so a new objective is one
class file here plus its ``conf/objective/<name>.yaml``: no registry to edit.
"""

import importlib
import pkgutil

from m3i_lightning.objectives.ae import AutoEncoder
from m3i_lightning.objectives.base import OBJECTIVES, Objective, Targets
from m3i_lightning.objectives.clip import CLIP
from m3i_lightning.objectives.cls import Classification
from m3i_lightning.objectives.dense_distill import DenseDistill
from m3i_lightning.objectives.dense_id import DenseContrast
from m3i_lightning.objectives.global_distill import GlobalDistill
from m3i_lightning.objectives.inst_disc import BYOL, BarlowTwins, InstanceDiscrimination, MoCoV3
from m3i_lightning.objectives.mim_feat import MaskedFeature
from m3i_lightning.objectives.mim_global import MaskedGlobal
from m3i_lightning.objectives.mim_pixel import MaskedPixel
from m3i_lightning.objectives.nvs import NovelViewSynthesis
from m3i_lightning.objectives.sim_feat import SiameseFeature
from m3i_lightning.objectives.sim_global import SiameseGlobal
from m3i_lightning.objectives.sim_pixel import SiamesePixel

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["BYOL", "CLIP", "OBJECTIVES", "AutoEncoder", "BarlowTwins", "Classification",
           "DenseContrast", "DenseDistill", "GlobalDistill", "InstanceDiscrimination",
           "MaskedFeature", "MaskedGlobal", "MaskedPixel", "MoCoV3", "NovelViewSynthesis",
           "Objective", "SiameseFeature", "SiameseGlobal", "SiamesePixel", "Targets"]
