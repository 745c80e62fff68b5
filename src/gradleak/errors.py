"""Exceptions that the CLI turns into one clear line instead of a traceback."""


class GradleakError(Exception):
    """Base class for errors caused by the user's input (config, data, files)."""


class ConfigError(GradleakError):
    """A config key has a wrong type, an impossible value or is unknown.

    The message starts with the dotted key, e.g. ``partition.clients.2.batch_size: must be > 0``.
    """

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}" if key else problem)


class DataError(GradleakError):
    """A data source is missing, unreadable or in an unexpected layout."""
