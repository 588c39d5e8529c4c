"""Errors the command line reports as one clear line instead of a traceback, and the one
mechanism every command uses to report them (:func:`one_line_errors`)."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

FULL_TRACE_VARIABLE = "HYDRA_FULL_ERROR"  # Hydra's own switch, honoured by every command
USAGE_EXIT_CODE = 2

F = TypeVar("F", bound=Callable)


class M3IError(Exception):
    """A problem with the user's configuration or data, explained in the message."""


class ConfigError(M3IError):
    """A configuration value that cannot work (unknown name, missing data field, ...)."""


class NonFiniteLossError(M3IError):
    """A loss term became NaN or infinite; the message names the objective."""


class EmptySplitError(ConfigError):
    """A split that evaluation reads holds no labelled sample; the message names the option
    that supplies it."""


def check_options(checks: Mapping[str, tuple[Any, Callable[[Any], bool], str]]) -> None:
    """``{option: (value, valid, allowed)}``: a :class:`ConfigError` naming the first option
    whose value fails ``valid`` (or is of a type it cannot compare) and what is allowed."""
    for name, (value, valid, allowed) in checks.items():
        try:
            ok = valid(value)
        except TypeError:
            ok = False
        if not ok:
            raise ConfigError(f"{name}={value} must be {allowed}")


def full_trace_wanted() -> bool:
    return os.environ.get(FULL_TRACE_VARIABLE) == "1"


def message_of(err: BaseException) -> str:
    """The error's own message. One raised in a DataLoader worker comes back wrapped in the
    worker's traceback (torch's ``ExceptionWrapper``), whose last line is the original."""
    text = str(err)
    if "\nOriginal Traceback" in text:
        text = text.rstrip().splitlines()[-1].split(": ", 1)[-1]
    return text


def exit_with(err: BaseException) -> None:
    """Print ``error: <message>`` on stderr and exit with code 2."""
    print(f"error: {message_of(err)}", file=sys.stderr)
    sys.exit(USAGE_EXIT_CODE)


def one_line_errors(command: F) -> F:
    """Run ``command``; an :class:`M3IError` ends it with one ``error:`` line and exit code 2,
    or, with ``HYDRA_FULL_ERROR=1``, propagates with its full traceback for debugging."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except M3IError as err:
            if full_trace_wanted():
                raise
            exit_with(err)

    return run  # type: ignore[return-value]
