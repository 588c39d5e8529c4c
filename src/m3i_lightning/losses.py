"""``m3i_lightning.losses``: the bare losses of every objective, pure torch
(:mod:`m3i_lightning.components.losses`), for use without the rest of the library."""

from m3i_lightning.components.losses import *  # noqa: F403
from m3i_lightning.components.losses import __all__  # noqa: F401 (the same public names)
