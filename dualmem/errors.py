"""Every error dualmem raises; all derive from :class:`DualMemError`."""

from __future__ import annotations

from acl.errors import (
    AccessDenied,
    ConfigurationError,
    DualMemError,
    MissingKey,
    TamperedRecord,
    ValidationError,
)

__all__ = [
    "AccessDenied",
    "Backpressure",
    "ConfigurationError",
    "DualMemError",
    "KeyDropped",
    "MissingKey",
    "NotPersisted",
    "RotationBusy",
    "StoreUnavailable",
    "TamperedRecord",
    "ValidationError",
]


class Backpressure(DualMemError):
    """The command stream's backlog is over ``max_backlog``: the worker is behind.

    Nothing was written. Retry after a short wait, or add workers.
    """

    def __init__(self, message: str, *, backlog: int, bound: int) -> None:
        super().__init__(message)
        self.backlog = backlog
        self.bound = bound


class StoreUnavailable(DualMemError):
    """Redis or SQLite could not be reached or failed; the original error is chained."""


class NotPersisted(DualMemError):
    """``sync`` timed out (or the command was dead-lettered) before the worker committed it."""


class KeyDropped(ConfigurationError):
    """An operator tool (import, mirror, dlq replay) did not send records sealed under a
    key that ``rotate-keys --drop-retired`` is removing, or has removed, from the key file:
    they would be unreadable. Nothing was sent; seal them again with the active key."""


class RotationBusy(DualMemError):
    """Another key rotation holds the namespace's rotation lock (see
    :mod:`dualmem.rotation_lock`), or this rotation lost it. Nothing was changed by the
    refused step; run the rotation again (``--resume``) once the other one has ended."""
