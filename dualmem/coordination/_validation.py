"""Input checks and small shared pieces of the coordination helpers; pure except ReceiptLog."""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from acl.errors import TamperedRecord, ValidationError
from dualmem.commands import MAX_KEY_BYTES, Receipt
from dualmem.settings import check_seconds  # re-exported: dualmem's one check of a wait

if TYPE_CHECKING:
    from dualmem.memory import DualMemory, Record

__all__ = [
    "MAX_ITERATION",
    "ReceiptLog",
    "SeenRecords",
    "check_ident",
    "check_iteration",
    "check_json_object",
    "check_key_fits",
    "check_score",
    "check_seconds",
    "check_strings",
    "check_text",
    "check_threshold",
    "clock_us",
    "not_a_record",
    "without_values",
]

MAX_ITERATION = 999_999  # keys hold iterations zero-padded to 6 digits, so they sort
_MAX_IDENT = 128
_MAX_TEXT = 64 * 1024


def check_score(name: str, value: object) -> float:
    """A score in [0, 1] as a float; anything else is a ``ValidationError``.

    >>> check_score("confidence", 0.85)
    0.85
    >>> check_score("confidence", 1.2)
    Traceback (most recent call last):
    ...
    acl.errors.ValidationError: confidence must be within [0, 1], got 1.2
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(f"{name} must be a number in [0, 1], got {type(value).__name__}")
    try:
        score = float(value)
    except OverflowError:  # an int too large for a float: out of range like any other
        raise ValidationError(f"{name} must be within [0, 1], got {value!r}") from None
    if not math.isfinite(score) or not 0.0 <= score <= 1.0:
        raise ValidationError(f"{name} must be within [0, 1], got {value!r}")
    return score


def check_threshold(name: str, value: object) -> float:
    """A gate threshold: a score in [0, 1]."""
    return check_score(name, value)


def check_ident(name: str, value: object) -> str:
    """An identifier that becomes part of a key: non-empty, at most 128 characters,
    no ``/`` (it separates key segments) and no control characters.

    >>> check_ident("phase", "auth")
    'auth'
    >>> check_ident("phase", "a/b")
    Traceback (most recent call last):
    ...
    acl.errors.ValidationError: phase must not contain '/' (it separates key segments)
    """
    if not isinstance(value, str):
        raise ValidationError(f"{name} must be a str, got {type(value).__name__}")
    if not value.strip():
        raise ValidationError(f"{name} must not be empty")
    if len(value) > _MAX_IDENT:
        raise ValidationError(f"{name} is longer than {_MAX_IDENT} characters")
    if "/" in value:
        raise ValidationError(f"{name} must not contain '/' (it separates key segments)")
    if any(ch < " " or ch == "\x7f" for ch in value):
        raise ValidationError(f"{name} must not contain control characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError(f"{name} must be valid Unicode (no lone surrogates)") from None
    return value


def check_key_fits(name: str, value: str, key: str) -> str:
    """``key`` (built from ``value``, the ``name`` argument) if it fits a record key's
    limit of 512 UTF-8 bytes; else a ``ValidationError`` naming the argument, raised
    before anything is written rather than when the key is first used.

    >>> check_key_fits("target", "\u00e9" * 300, "acks/" + "\u00e9" * 300)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    acl.errors.ValidationError: target is too long: the key it makes is 605 bytes in UTF-8, ...
    """
    size = len(key.encode("utf-8"))
    if size > MAX_KEY_BYTES:
        room = MAX_KEY_BYTES - (size - len(value.encode("utf-8")))
        raise ValidationError(
            f"{name} is too long: the key it makes is {size} bytes in UTF-8, keys are "
            f"limited to {MAX_KEY_BYTES} (at most {room} bytes for {name})"
        )
    return key


def check_iteration(value: object) -> int:
    """An iteration number, 0..999999 (stored zero-padded so keys sort numerically)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"iteration must be an int, got {type(value).__name__}")
    if not 0 <= value <= MAX_ITERATION:
        raise ValidationError(f"iteration must be within 0..{MAX_ITERATION}, got {value}")
    return value


def check_text(name: str, value: object, *, allow_empty: bool = True) -> str:
    """Free text (reasoning, a reason): a str of at most 64 KiB characters."""
    if not isinstance(value, str):
        raise ValidationError(f"{name} must be a str, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise ValidationError(f"{name} must not be empty")
    if len(value) > _MAX_TEXT:
        raise ValidationError(f"{name} is longer than {_MAX_TEXT} characters")
    return value


def check_strings(name: str, value: object) -> tuple[str, ...]:
    """A sequence of strings (not a single str, which would iterate by character)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValidationError(f"{name} must be a list of strings, got {type(value).__name__}")
    items = tuple(value)
    for item in items:
        if not isinstance(item, str):
            raise ValidationError(f"{name} must hold strings only, got {type(item).__name__}")
    return items


def check_json_object(name: str, value: object) -> dict[str, Any]:
    """``None`` or a mapping with string keys, returned as a dict (JSON-checked on put)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ValidationError(f"{name} must be a mapping with str keys")
    return dict(value)


def clock_us() -> int:
    """Wall-clock time in epoch microseconds."""
    return time.time_ns() // 1000


class SeenRecords:
    """Record versions already rejected. A bad record stays where it is while callers poll:
    each version (key and stream id) is audited once, not once per poll.

    >>> from collections import namedtuple
    >>> R = namedtuple("R", "key stream_id")
    >>> seen = SeenRecords()
    >>> seen.first(R("k", "1-0")), seen.first(R("k", "1-0")), seen.first(R("k", "2-0"))
    (True, False, True)
    """

    def __init__(self) -> None:
        self._seen: set[tuple[str, str]] = set()

    def first(self, record: Record) -> bool:
        """True the first time this version of ``record`` is seen. A record read from the
        Redis cache has no stream id: its value tells its versions apart.

        >>> from collections import namedtuple
        >>> R = namedtuple("R", "key stream_id value")
        >>> seen = SeenRecords()
        >>> [seen.first(R("k", "", v)) for v in ({"a": 1}, {"a": 1}, {"a": 2})]
        [True, False, True]
        """
        version = record.stream_id or "cache:" + json.dumps(
            record.value, sort_keys=True, default=repr
        )
        mark = (record.key, version)
        if mark in self._seen:
            return False
        self._seen.add(mark)
        return True


class ReceiptLog:
    """The receipts of what one helper wrote and may not be committed yet, so ``sync`` can
    wait for all of them.

    Every receipt is kept, not just the newest per shard: a shard's commands are not
    committed in stream order when several workers share it, or when a dead worker's
    entries wait to be claimed. Committed receipts are dropped by ``sync`` and, past
    ``_PRUNE_AT`` outstanding ones, by ``add``, so a writer that never syncs stays bounded
    by what is actually uncommitted.
    """

    _PRUNE_AT = 4096

    def __init__(self, mem: DualMemory) -> None:
        self._mem = mem
        self._lock = threading.Lock()
        self._outstanding: list[Receipt] = []
        self._prune_at = self._PRUNE_AT

    def add(self, receipt: Receipt) -> Receipt:
        """Remember ``receipt`` and return it."""
        with self._lock:
            self._outstanding.append(receipt)
            if len(self._outstanding) >= self._prune_at:
                store = self._mem.store
                self._outstanding = [
                    r
                    for r in self._outstanding
                    if store.status(r.shard, r.stream_id) != "committed"
                ]
                # Still many uncommitted (no worker running): check again after as many more.
                self._prune_at = max(self._PRUNE_AT, 2 * len(self._outstanding))
        return receipt

    def sync(self, timeout: float) -> None:
        """Wait until everything written so far is committed (``NotPersisted`` on timeout,
        or at once for a dead-lettered command). ``timeout`` is checked before anything is
        waited for (``ValidationError``), as by ``DualMemory.sync``."""
        deadline = time.monotonic() + check_seconds("timeout", timeout)
        with self._lock:
            receipts = list(self._outstanding)
        for r in receipts:
            self._mem.sync(r, timeout=max(0.0, deadline - time.monotonic()))
        done = set(receipts)
        with self._lock:
            self._outstanding = [r for r in self._outstanding if r not in done]


# A Python repr of a string: what every rejection reason quotes its values with.
_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"")


def without_values(reason: str) -> str:
    """``reason`` with every quoted value (a string repr) replaced by ``…``: what goes to
    the plaintext audit log when the record it is about is sealed (levels 1, 2, 5).
    Rejection reasons quote every value taken from a record with ``!r``.

    >>> without_values(f"names target {'x'!r}, not {'y' + chr(39) + 's'!r}")
    'names target …, not …'
    """
    return _QUOTED.sub("…", reason)


def not_a_record(kind: str, exc: Exception) -> TamperedRecord:
    """The error for a value that does not parse as ``kind``, naming no value from it
    (an exception's text can quote one: ``invalid literal for int(): 'secret'``).

    >>> str(not_a_record("a signal record", KeyError("id")))
    "not a signal record: no field 'id'"
    >>> str(not_a_record("a signal record", ValueError("invalid literal: 'secret'")))
    'not a signal record: a field of the wrong type or value (ValueError)'
    """
    if isinstance(exc, KeyError) and exc.args and isinstance(exc.args[0], str):
        # The missing name is one of ours (v["name"] in the parser), never the value's.
        return TamperedRecord(f"not {kind}: no field {exc.args[0]!r}")
    return TamperedRecord(f"not {kind}: a field of the wrong type or value ({type(exc).__name__})")
