"""Running a Hydra command from Python: every command reads its ``key=value`` overrides from the
command line, as Hydra apps do; a caller in Python hands them in instead."""

from __future__ import annotations

import sys
from collections.abc import Callable


def run_with_arguments(app: Callable[[], object], argv: list[str] | None) -> object:
    """Run the Hydra app ``app`` (a ``@hydra.main`` function) on ``argv`` in place of the
    command line's arguments, or on the command line's own when ``argv`` is None."""
    if argv is None:
        return app()
    saved = sys.argv
    sys.argv = [saved[0], *argv]
    try:
        return app()
    finally:
        sys.argv = saved
