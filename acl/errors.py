"""The error hierarchy shared by ``acl`` and ``dualmem``: one base class, one meaning each."""

from __future__ import annotations

__all__ = [
    "AccessDenied",
    "ConfigurationError",
    "DualMemError",
    "MissingKey",
    "TamperedRecord",
    "ValidationError",
]


class DualMemError(Exception):
    """Base class of every error raised by ``acl`` and ``dualmem``.

    Callers can catch this one class; redis and sqlite3 exceptions never reach them
    untranslated (the original is chained as ``__cause__``).
    """


class ConfigurationError(DualMemError):
    """A setting is missing or wrong; the message names the setting and the fix."""


class ValidationError(DualMemError, ValueError):
    """Bad input from the caller (key, value, level, principal); nothing was stored."""


class AccessDenied(DualMemError, PermissionError):
    """The principal asked for a scope or level it does not belong to.

    ``action`` is ``"read"`` or ``"write"``; ``scope`` is what was asked for (or ``None``
    when the level itself is forbidden); ``agent_id`` names the principal.
    """

    def __init__(
        self,
        message: str,
        *,
        agent_id: str,
        action: str,
        level: int,
        scope: str | None,
        key: str | None = None,
    ) -> None:
        super().__init__(message)
        self.agent_id = agent_id
        self.action = action
        self.level = level
        self.scope = scope
        self.key = key


class TamperedRecord(DualMemError):
    """An envelope failed authentication: altered, truncated, or moved to another place."""


class MissingKey(DualMemError):
    """An envelope names a key id that the keyring does not hold."""
