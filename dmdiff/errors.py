"""User-facing error types. The CLI prints these without a traceback (exit status 2)."""


class DmdiffError(Exception):
    """Base class for errors caused by input the user can fix (files, configs, arguments)."""


class ConfigError(DmdiffError, ValueError):
    """A config file or value is wrong: unknown key, wrong type, value out of range."""


class ImageReadError(DmdiffError, ValueError):
    """An image file cannot be read or converted; the message names the file and the reason."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")
