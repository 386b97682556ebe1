"""The one family of user-facing errors, and the exit codes they map to.

Anything a user can fix (bad parameters, missing data, an unreachable server) raises a
:class:`CycleGANError`. The CLI prints it as one line and exits with its ``exit_code``; any
other exception is a bug and keeps its traceback.

Exit codes (a contract): 0 done; 2 bad input or parameters; 130 after SIGINT and 143 after
SIGTERM (training saves a checkpoint first); 1 for anything else.
"""

from __future__ import annotations

EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2


class CycleGANError(Exception):
    """An error the user can act on: ``message`` says what is wrong, ``hint`` what to do."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.key: str | None = None  # the offending parameter, for ConfigError

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class InputError(CycleGANError):
    """Bad input: parameters, data, a model or checkpoint file that cannot be used."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(InputError):
    """Invalid parameters: an unknown key, a wrong type or an impossible value."""


class DataError(InputError):
    """Input data that cannot be used: a bad source, an empty split, too many rejects."""


class ModelError(InputError):
    """A model folder, weights file or model URI that cannot be loaded."""


class CheckpointError(InputError):
    """A checkpoint that cannot be resumed from (mismatched settings, corrupt file)."""


class TrackingError(CycleGANError):
    """MLflow cannot be reached or refuses a request."""


class LockedError(CycleGANError):
    """Another stage is writing in this project folder."""


class Stopped(CycleGANError):
    """The run stopped on SIGINT/SIGTERM after saving its state (exit 130 / 143)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum
