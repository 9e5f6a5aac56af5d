"""Errors caused by user input. The CLI prints them on one line and exits with code 2."""


class InputError(Exception):
    """Bad user input (config, data directory, checkpoint): one line naming the field and fix."""

    exit_code = 2


class ConfigError(InputError):
    """A config key is unknown, mistyped or out of range."""


class DataError(InputError):
    """A dataset cannot be read from the given location."""
