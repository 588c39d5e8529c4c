"""The training engine: Eq. 4 as a LightningModule. It plans every encoder pass once, keeps the
teacher, mixes inputs and sums the objectives' terms. Objectives, components, backbone and data
sit below it; Trainer plumbing, evaluation and config above."""

from m3i_lightning.engine.module import ENGINE_OPTIONS, Engine, MultiObjective
from m3i_lightning.engine.teacher import EMATeacher

__all__ = ["ENGINE_OPTIONS", "EMATeacher", "Engine", "MultiObjective"]
