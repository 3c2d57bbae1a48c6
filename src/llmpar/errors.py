"""Errors the workflow reports as a clear message (no traceback) before any expensive work."""


class UserError(Exception):
    """Bad input: the message names the problem. Raised before anything is written under results/."""


class ConfigError(UserError):
    """The configuration (or a CLI argument) is invalid."""


class DataError(UserError):
    """The corpus or tokenizer input is missing, empty or unusable."""


class ExpectedFailure(Exception):
    """A run outcome that is itself a result (status oom, diverged or invalid), not a crash."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status
        self.message = message
