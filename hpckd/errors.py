"""User-facing errors.

A :class:`UserError` is something the user can fix (a bad config key, a missing folder, a corrupt image).
The CLI prints its message as one line and exits non-zero, without a traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An error caused by user input; its message says what, where and how to fix it."""

    exit_code = 2


class ConfigError(UserError):
    """Unknown key, wrong type or invalid value in an experiment config."""


class DataError(UserError):
    """Missing dataset folder, empty class folder, corrupt or unreadable image."""


class CheckpointError(UserError):
    """Missing, corrupt or incompatible checkpoint."""
