"""Data modules producing the batch dict: views with geometry, labels, tokenised captions."""

from m3i_lightning.data.embedded import EmbeddedDigits
from m3i_lightning.data.hf import HFData
from m3i_lightning.data.imagefolder import ImageFolderData
from m3i_lightning.data.shards import WebDatasetData
from m3i_lightning.data.skips import SkipReport
from m3i_lightning.data.torchvision import TorchvisionData

DATA_MODULES = {"embedded": EmbeddedDigits, "imagefolder": ImageFolderData,
                "webdataset": WebDatasetData, "hf": HFData, "torchvision": TorchvisionData}

__all__ = ["DATA_MODULES", "EmbeddedDigits", "HFData", "ImageFolderData", "SkipReport",
           "TorchvisionData", "WebDatasetData"]
