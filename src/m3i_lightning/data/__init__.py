"""Data modules producing the batch dict: views with geometry, labels, tokenised captions."""

from m3i_lightning.data.embedded import EmbeddedDigits

DATA_MODULES = {"embedded": EmbeddedDigits}

__all__ = ["DATA_MODULES", "EmbeddedDigits"]
