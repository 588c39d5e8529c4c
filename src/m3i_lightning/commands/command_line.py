"""Running a Hydra command: every command reads its ``key=value`` overrides from the command
line, as Hydra apps do (a caller in Python hands them in instead), and refuses a key its config
does not hold before Hydra composes anything
(:func:`~m3i_lightning.config.schema.check_command_line`)."""

from __future__ import annotations

import sys
from collections.abc import Callable

from m3i_lightning.config.schema import check_command_line


def run_with_arguments(app: Callable[[], object], argv: list[str] | None,
                       config_name: str) -> object:
    """Run the Hydra app ``app`` (a ``@hydra.main`` function of config ``config_name``) on
    ``argv`` in place of the command line's arguments, or on the command line's own when
    ``argv`` is None, once its keys are checked."""
    if argv is None:
        check_command_line(config_name, sys.argv[1:])
        return app()
    check_command_line(config_name, argv)
    saved = sys.argv
    sys.argv = [saved[0], *argv]
    try:
        return app()
    finally:
        sys.argv = saved
