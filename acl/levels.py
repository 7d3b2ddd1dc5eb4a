"""The five access levels and which of them are encrypted."""

from __future__ import annotations

from enum import IntEnum

from acl.errors import ValidationError

__all__ = ["ENCRYPTED_LEVELS", "Level", "as_level"]


class Level(IntEnum):
    """Access level of a record; the number is stored, so it never changes meaning.

    >>> Level(3).name
    'SWARM'
    >>> Level.PRIVATE.encrypted, Level.PROJECT.encrypted
    (True, False)
    """

    PRIVATE = 1
    TEAM = 2
    SWARM = 3
    PROJECT = 4
    SYSTEM = 5

    @property
    def encrypted(self) -> bool:
        """Whether records at this level are sealed with AES-256-GCM."""
        return self in ENCRYPTED_LEVELS


ENCRYPTED_LEVELS = frozenset({Level.PRIVATE, Level.TEAM, Level.SYSTEM})


def as_level(value: object) -> Level:
    """Return ``value`` as a :class:`Level`, or raise ``ValidationError``.

    Accepts a ``Level``, an int 1..5 or a level name (any case); rejects bools,
    which are ints in Python but never a level.

    >>> as_level("team")
    <Level.TEAM: 2>
    >>> as_level(9)
    Traceback (most recent call last):
    ...
    acl.errors.ValidationError: unknown level 9: use 1..5 or one of PRIVATE, TEAM, ...
    """
    if isinstance(value, Level):
        return value
    try:
        if isinstance(value, int) and not isinstance(value, bool):
            return Level(value)
        if isinstance(value, str):
            return Level[value.strip().upper()]
    except (KeyError, ValueError):
        pass
    names = ", ".join(level.name for level in Level)
    raise ValidationError(f"unknown level {value!r}: use 1..5 or one of {names}")
