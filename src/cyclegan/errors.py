"""The one family of user-facing errors.

Anything a user can fix (bad parameters, missing data, an unreachable server) raises a
:class:`CycleGANError`. The CLI prints it as one line and exits non-zero; any other exception
is a bug and keeps its traceback.
"""

from __future__ import annotations


class CycleGANError(Exception):
    """An error the user can act on: ``message`` says what is wrong, ``hint`` what to do."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.key: str | None = None  # the offending parameter, for ConfigError

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ConfigError(CycleGANError):
    """Invalid parameters: an unknown key, a wrong type or an impossible value."""

    exit_code = 2


class DataError(CycleGANError):
    """Input data that cannot be used: a bad source, an empty split, too many rejects."""


class TrackingError(CycleGANError):
    """MLflow cannot be reached or refuses a request."""


class CheckpointError(CycleGANError):
    """A checkpoint that cannot be resumed from (mismatched settings, corrupt file)."""


class NotAvailableError(CycleGANError):
    """A feature that has not landed yet, or an optional dependency that is missing."""
