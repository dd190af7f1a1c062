"""Error types. Every message is one sentence naming the problem and the fix; the CLI prints it and exits 2."""

from __future__ import annotations


class QloraLiteError(Exception):
    """Bad input or an unmet requirement that the user can fix."""

    exit_code = 2


class ConfigError(QloraLiteError):
    """A setting is missing, unknown, of the wrong type or out of range."""


class ModelLoadError(QloraLiteError):
    """The model directory cannot be read or does not match what was asked."""


class DataError(QloraLiteError):
    """A dataset file cannot be read or holds records that cannot be used."""


class AdapterError(QloraLiteError):
    """An adapter does not exist, is malformed or does not fit the base model."""


class ExportError(QloraLiteError):
    """A merged export cannot be written as asked."""


class TrainingError(QloraLiteError):
    """Training stopped on a condition the user must look at (NaN loss, out of memory)."""


class OutOfMemoryError(TrainingError):
    """The GPU ran out of memory during training; `advice` holds the memory report and the change that fits.

    Its own exit code (3), so scripts can tell "change the settings" from "fix the input".
    """

    exit_code = 3

    def __init__(self, message: str, advice=None):
        super().__init__(message)
        self.advice = advice


class UsageError(QloraLiteError):
    """The command line itself is malformed (unknown sub-command, missing or invalid argument)."""


class LockedError(QloraLiteError):
    """Another process is writing the same output directory."""
