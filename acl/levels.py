"""The five access levels and which of them are encrypted."""

from __future__ import annotations

from enum import IntEnum

from acl.errors import ValidationError

__all__ = ["ENCRYPTED_LEVELS", "Level", "as_level", "level_of_number"]


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

_BY_NUMBER: dict[object, Level] = {int(level): level for level in Level}


def level_of_number(number: int) -> Level:
    """``Level(number)`` for a number read back from storage, in a dict lookup: the enum's
    own call took 0.5 µs, on every row and every stream entry read. Anything that is not
    a level's number raises ``ValueError``, as ``Level(number)`` does.

    >>> level_of_number(2)
    <Level.TEAM: 2>
    >>> level_of_number(7)
    Traceback (most recent call last):
    ...
    ValueError: 7 is not a valid Level
    """
    level = _BY_NUMBER.get(number)
    return Level(number) if level is None else level


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
            return level_of_number(value)
        if isinstance(value, str):
            return Level[value.strip().upper()]
    except (KeyError, ValueError):
        pass
    names = ", ".join(level.name for level in Level)
    raise ValidationError(f"unknown level {value!r}: use 1..5 or one of {names}")
