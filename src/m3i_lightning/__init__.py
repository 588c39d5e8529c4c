"""m3i_lightning: visual pre-training objectives that compose, after M3I (CVPR 2023)."""

from m3i_lightning.backbone import Backbone, Encoded
from m3i_lightning.objectives import OBJECTIVES, Objective
from m3i_lightning.pretraining import MultiObjective, Pretraining
from m3i_lightning.teacher import EMATeacher

__all__ = ["OBJECTIVES", "Backbone", "EMATeacher", "Encoded", "MultiObjective", "Objective",
           "Pretraining"]
