"""Dense transfer: a linear segmentation probe on frozen patch tokens, scored by mean IoU."""

from m3i_lightning.evaluation.segmentation.miou import confusion_matrix, mean_iou
from m3i_lightning.evaluation.segmentation.probe import SegmentationScore, segmentation_probe

__all__ = ["SegmentationScore", "confusion_matrix", "mean_iou", "segmentation_probe"]
