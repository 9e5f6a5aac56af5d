"""Errors caused by user input. The CLI prints them on one line and exits with code 2."""


class InputError(Exception):
    """Bad user input (config, data directory, checkpoint): one line naming the field and fix."""

    exit_code = 2


class ConfigError(InputError):
    """A config key is unknown, mistyped or out of range."""


class DataError(InputError):
    """A dataset cannot be read from the given location."""


class RunFailed(Exception):
    """A run that ended without a usable result, through no fault of the input (e.g. every
    federated round was lost): the CLI prints one line and exits with code 4."""

    exit_code = 4
