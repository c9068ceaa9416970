"""User-facing errors.

Every error a user can cause by their input (a wrong name, a missing file, a corrupt run directory)
is a :class:`TrajscopeError`. The command line prints its message as one line, without a
traceback, and exits with :attr:`TrajscopeError.exit_code`.
"""

from __future__ import annotations


class TrajscopeError(Exception):
    """Base class of errors caused by input, configuration or the state of a run directory."""

    exit_code = 1


class UsageError(TrajscopeError):
    """An unknown name or an invalid option value (exit code 2, like a command-line usage error)."""

    exit_code = 2


class RunNotFoundError(TrajscopeError):
    """No run matches the given id, id prefix or name."""

    exit_code = 2


class RunExistsError(TrajscopeError):
    """A run with the same config hash already exists."""


class RunLockedError(TrajscopeError):
    """Another process is writing to the run."""


class CorruptRunError(TrajscopeError):
    """A run directory, its database or one of its files cannot be read."""


class DataNotFoundError(TrajscopeError):
    """A workload's data files are absent (the message names the expected files)."""

    exit_code = 2


class DivergedError(TrajscopeError):
    """The loss (or a norm) became NaN or infinite; the run was marked ``diverged``."""

    exit_code = 3

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


def unknown_choice(kind: str, value: object, choices) -> UsageError:
    """Return the one-line error for an unknown ``kind`` named ``value``, listing the valid choices."""
    valid = ", ".join(sorted(str(c) for c in choices))
    return UsageError(f"unknown {kind} {value!r}; valid choices: {valid}")
