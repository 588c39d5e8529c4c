"""Errors the command line reports as one clear line instead of a traceback."""


class M3IError(Exception):
    """A problem with the user's configuration or data, explained in the message."""


class ConfigError(M3IError):
    """A configuration value that cannot work (unknown name, missing data field, ...)."""


class NonFiniteLossError(M3IError):
    """A loss term became NaN or infinite; the message names the objective."""
