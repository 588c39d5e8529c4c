"""Objective plugins, keyed by their config name.

Every objective class registers itself when defined
(:class:`~m3i_lightning.objectives.base.Objective`), so a new objective is one class file here
plus its ``conf/objective/<name>.yaml``: no registry to edit. The modules load on first use of
a name of this package (``OBJECTIVES``, ``SiameseFeature``, ...), all of them at once, so the
registry is complete whenever it is read and importing the contract alone (``.base``) stays
light.
"""

import importlib
import pkgutil

from m3i_lightning.objectives.base import OBJECTIVES as _REGISTRY
from m3i_lightning.objectives.base import Objective, Targets

__all__ = ["OBJECTIVES", "Objective", "Targets"]


def _modules() -> list:
    return [importlib.import_module(f"{__name__}.{info.name}")
            for info in pkgutil.iter_modules(__path__)]


def __getattr__(name: str):
    modules = _modules()
    if name == "OBJECTIVES":
        return _REGISTRY
    for module in modules:
        if not name.startswith("_") and isinstance(getattr(module, name, None), type):
            return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
