"""Errors a user can cause. Each carries one sentence that says what is wrong and how to fix it.

The CLI prints ``str(error)`` on one line and exits with ``error.exit_code``; library callers
catch :class:`MmdiffError` and never see a traceback from deep inside a dependency.
"""
from __future__ import annotations


def _one_line(message: str) -> str:
    """Escape newlines and other control characters (a user's value may hold them)."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in message)


class MmdiffError(Exception):
    """Base class for user-facing errors (exit code 1); the message is always one line."""

    exit_code = 1

    def __init__(self, message: str = "") -> None:
        super().__init__(_one_line(str(message)))


class ConfigError(MmdiffError):
    """A config file, key, value or override is wrong (exit code 2, before anything runs)."""

    exit_code = 2


class DataError(MmdiffError):
    """A shard, image or caption source cannot be used."""


class CheckpointError(MmdiffError):
    """A checkpoint or weights file is missing, unreadable, unsafe or of the wrong kind."""


class TrainingError(MmdiffError):
    """Training cannot go on (e.g. non-finite losses step after step); earlier checkpoints are intact."""


class Terminated(MmdiffError):
    """The run was stopped by SIGTERM (exit code 143 = 128 + 15, as a killed process); resumable."""

    exit_code = 143


class UsageError(MmdiffError):
    """A command-line argument is wrong (exit code 2)."""

    exit_code = 2
