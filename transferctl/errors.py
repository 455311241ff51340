"""Errors that the CLI turns into one line and an exit code, and the did-you-mean hint their messages give."""

from __future__ import annotations

import difflib


def did_you_mean(word: str, choices: list[str]) -> str:
    """'; did you mean 'x'?' for the closest choice, or '' when none is close."""
    match = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean '{match[0]}'?" if match else ""


class TransferError(Exception):
    """Base class: `exit_code` is what the CLI exits with."""

    exit_code = 1


class UsageError(TransferError):
    """Bad input the user can fix: a config, an override, a path, a flag."""

    exit_code = 2


class ConfigError(UsageError):
    """A config that fails validation; the message names the dotted key."""


class RunFailed(TransferError):
    """A failure while running; the message points at the run's log."""

    exit_code = 1


class Interrupted(TransferError):
    """SIGINT or SIGTERM stopped a run after a checkpoint; exit 130 or 143 (128 + the signal)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum
