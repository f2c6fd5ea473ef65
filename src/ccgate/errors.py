"""Errors ccgate raises for users, and the exit codes the CLI maps them to.

Core code raises a ``CcgateError`` subclass whose message is a sentence a person can act on;
only the CLI turns it into ``Error: ...`` on stderr and an exit code.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    ERROR = 1
    USAGE = 2
    NOT_RUNNING = 3
    CONFIG = 4
    UNAVAILABLE = 5
    DIFFERENCES = 6  # `admin reconcile`: the ledger and the provider's report disagree


class CcgateError(Exception):
    """Base class: the message is shown to the user as it is."""

    exit_code: ExitCode = ExitCode.ERROR


class ConfigError(CcgateError):
    """A file ccgate reads or writes is missing, malformed or unsafe."""

    exit_code = ExitCode.CONFIG


class SettingsFileError(ConfigError):
    """Claude Code's settings.json cannot be read or changed safely."""


class NotRunningError(CcgateError):
    """The daemon is not running."""

    exit_code = ExitCode.NOT_RUNNING


class DaemonStartError(CcgateError):
    """The daemon did not come up healthy."""

    exit_code = ExitCode.UNAVAILABLE


class CredentialError(CcgateError):
    """A secret is missing or cannot be stored."""

    exit_code = ExitCode.CONFIG
