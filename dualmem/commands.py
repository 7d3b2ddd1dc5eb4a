"""Commands as stream entries: input checks, encoding and decoding; pure, no I/O."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, NamedTuple

from acl.crypto import SEALED_VERSION, envelope_sealing, may_be_sealed_by
from acl.errors import ValidationError
from acl.levels import ENCRYPTED_LEVELS, Level, level_of_number
from acl.policy import level_of_scope
from acl.text import encodes_utf8

__all__ = [
    "CACHE_EXPIRING",
    "CACHE_TOMBSTONE",
    "MAX_KEY_BYTES",
    "MAX_TTL_SECONDS",
    "SEQ_BITS",
    "SID_BYTES",
    "Command",
    "MalformedCommand",
    "Receipt",
    "audit_fields",
    "cache_value",
    "cached_envelope",
    "check_int",
    "check_key",
    "check_text",
    "decode_command",
    "delete_fields",
    "legacy_sid",
    "put_fields",
    "replay_fields",
    "reseal_fields",
    "sid_hash_text",
    "sid_of",
    "ttl_to_ms",
    "xadd_command",
]

MAX_KEY_BYTES = 512
#: What a delete leaves in the record's cache entry until it expires (``cache_ttl``): a
#: fresh read (``get(..., fresh=True)``) sees the record deleted at once, instead of
#: falling back to SQLite's copy that the worker has not deleted yet. No envelope starts
#: with a zero byte.
CACHE_TOMBSTONE = b"\x00deleted"
#: The cache entry of a put with a ttl: this prefix, its expiry (epoch ms, 8 bytes big
#: endian), then the envelope. The entry outlives the ttl (at least ``cache_ttl``), so a
#: fresh read after the expiry sees the put expired instead of falling back to SQLite's
#: older row while the worker has not committed it yet.
CACHE_EXPIRING = b"\x00x"
MAX_TTL_SECONDS = 10 * 365 * 86_400
OP_PUT = "put"
OP_DELETE = "del"
OP_AUDIT = "audit"
OP_RESEAL = "reseal"
#: Sequence bits of the schema-3 ordering id (``ms << 22 | seq`` in one integer). Rows and
#: commands written then still carry it: chain hashes of journal rows use it while an id
#: fits (so old chains verify), and old reseal guards are read in it.
SEQ_BITS = 22
_SID = struct.Struct(">QQ")
#: Length of an ordering id (``sid``): a stream id ``ms-seq`` as two big-endian 64-bit
#: numbers, so SQLite compares them as BLOBs (memcmp) in stream-id order.
SID_BYTES = _SID.size


class MalformedCommand(ValueError):
    """A stream entry that is not a well-formed dualmem command (it goes to dead letters)."""


@dataclass(frozen=True, slots=True)
class Receipt:
    """Proof that a command reached the stream: pass it to ``DualMemory.sync``.

    ``stream_id`` is the Redis id of the command in ``shard``'s stream.
    """

    shard: int
    stream_id: str
    scope: str
    key: str
    op: str


class Command(NamedTuple):
    """A decoded stream entry (a named tuple: the worker builds one per entry)."""

    op: str
    scope: str
    key: str
    level: Level
    actor: str
    ts_us: int
    envelope: bytes | None = None
    expires_at: int | None = None
    event: str | None = None
    risk: str | None = None
    detail: str | None = None
    #: reseal only: the sid of the row it re-encrypts (applied only while still current)
    guard: bytes | None = None
    #: a replayed command's original stream id: it orders the command, not its new id
    origin: str | None = None

    @property
    def ts_ms(self) -> int:
        """The writer's clock at put time, epoch milliseconds."""
        return self.ts_us // 1000


def check_key(key: object, max_bytes: int = MAX_KEY_BYTES) -> str:
    """Return ``key`` if it is a usable record key, else raise ``ValidationError``.

    A key is a non-empty str of at most ``max_bytes`` UTF-8 bytes without NUL. Any other
    character is allowed and stored exactly (no glob or SQL meaning anywhere).

    >>> check_key("confidence/auth/1")
    'confidence/auth/1'
    >>> check_key("")
    Traceback (most recent call last):
    ...
    acl.errors.ValidationError: key must not be empty
    """
    if not isinstance(key, str):
        raise ValidationError(f"key must be a str, got {type(key).__name__}")
    if not key:
        raise ValidationError("key must not be empty")
    if "\x00" in key:
        raise ValidationError("key must not contain NUL characters")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise ValidationError("key must be valid Unicode (no lone surrogates)") from exc
    if size > max_bytes:
        raise ValidationError(f"key is {size} bytes in UTF-8; the limit is {max_bytes}")
    return key


def check_text(name: str, value: object, *, optional: bool = False) -> str | None:
    """Return ``value`` if it is a str that can travel (UTF-8, no NUL), else raise
    ``ValidationError``; ``None`` passes when ``optional``.

    Scopes, prefixes and event names become Redis keys, stream fields and SQL parameters,
    so one that cannot be encoded must fail here, as a clear error, not deep inside redis
    or sqlite3.

    >>> check_text("prefix", "\\ud800")
    Traceback (most recent call last):
    ...
    acl.errors.ValidationError: prefix must be valid Unicode (no lone surrogates)
    """
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise ValidationError(f"{name} must be a str, got {type(value).__name__}")
    if "\x00" in value:
        raise ValidationError(f"{name} must not contain NUL characters")
    if not encodes_utf8(value):
        raise ValidationError(f"{name} must be valid Unicode (no lone surrogates)")
    return value


def check_int(
    name: str, value: object, *, low: int = -(1 << 63), optional: bool = False
) -> int | None:
    """Return ``value`` if it is an int (not a bool) from ``low`` to 2**63-1, the range
    SQLite stores, else raise ``ValidationError``; ``None`` passes when ``optional``.

    >>> check_int("limit", 2**70, low=0)
    Traceback (most recent call last):
    ...
    acl.errors.ValidationError: limit must be an int from 0 to 9223372036854775807
    """
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value < 1 << 63:
        raise ValidationError(f"{name} must be an int from {low} to {(1 << 63) - 1}")
    return value


def ttl_to_ms(ttl: object) -> int | None:
    """A ttl in seconds (int or float, > 0) as milliseconds; ``None`` means no expiry.

    >>> ttl_to_ms(1.5), ttl_to_ms(None)
    (1500, None)
    """
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
        raise ValidationError(f"ttl must be a number of seconds, got {type(ttl).__name__}")
    # Bounds first: math.isfinite(10**400) raised OverflowError.
    if not 0 < ttl <= MAX_TTL_SECONDS or not math.isfinite(ttl):
        raise ValidationError(f"ttl must be > 0 and <= {MAX_TTL_SECONDS} seconds, got {ttl}")
    return max(1, int(ttl * 1000))


def put_fields(
    scope: str,
    key: str,
    level: Level,
    actor: str,
    ts_us: int,
    envelope: bytes,
    expires_at: int | None,
) -> dict[bytes, bytes | str | int]:
    """Stream entry of a put (short field names: this is the hot path's payload)."""
    fields: dict[bytes, bytes | str | int] = {
        b"op": OP_PUT,
        b"s": scope,
        b"k": key,
        b"l": int(level),
        b"a": actor,
        b"t": ts_us,
        b"e": envelope,
    }
    if expires_at is not None:
        fields[b"x"] = expires_at
    return fields


def delete_fields(
    scope: str, key: str, level: Level, actor: str, ts_us: int
) -> dict[bytes, bytes | str | int]:
    """Stream entry of a delete."""
    return {b"op": OP_DELETE, b"s": scope, b"k": key, b"l": int(level), b"a": actor, b"t": ts_us}


def audit_fields(
    event: str,
    *,
    actor: str,
    ts_us: int,
    risk: str,
    scope: str | None = None,
    key: str | None = None,
    level: int | None = None,
    detail: Mapping[str, Any] | None = None,
) -> dict[bytes, bytes | str | int]:
    """Stream entry of an audit event (it travels the stream so the worker writes it)."""
    return {
        b"op": OP_AUDIT,
        b"ev": event,
        b"r": risk,
        b"s": scope or "",
        b"k": key or "",
        b"l": int(level or 0),
        b"a": actor,
        b"t": ts_us,
        b"d": json.dumps(dict(detail or {}), sort_keys=True, default=str),
    }


def reseal_fields(
    scope: str, key: str, level: Level, actor: str, ts_us: int, envelope: bytes, guard: bytes
) -> dict[bytes, bytes | str | int]:
    """Stream entry of a key rotation's re-encryption of one row (``dualmem.rotation``).

    The worker replaces the row's envelope only while the row's ``sid`` is still
    ``guard`` (the value the rotation read): a newer put or delete committed meanwhile
    always wins, and the row keeps its stream id, times and owner (the value did not
    change, only the key that seals it).
    """
    return {
        b"op": OP_RESEAL,
        b"s": scope,
        b"k": key,
        b"l": int(level),
        b"a": actor,
        b"t": ts_us,
        b"e": envelope,
        b"g": stream_id_of(guard),  # the row's sid, as the stream id it stands for
    }


def replay_fields(fields: Mapping[bytes, bytes], stream_id: str) -> dict[bytes, bytes]:
    """A failed entry's fields, ready to go back to the stream under a new id.

    They carry the id the command first had (``o``; kept from an earlier replay), and the
    worker orders the command by it: a replayed put never overwrites a newer put or delete
    committed after it first failed.

    >>> replay_fields({b"op": b"put"}, "5-0")
    {b'op': b'put', b'o': b'5-0'}
    """
    out = dict(fields)
    out.setdefault(b"o", stream_id.encode())
    return out


def _text(fields: Mapping[bytes, bytes], name: bytes) -> str:
    try:
        return fields[name].decode("utf-8")
    except KeyError:
        raise MalformedCommand(f"field {name.decode()!r} is missing") from None
    except UnicodeDecodeError as exc:
        raise MalformedCommand(f"field {name.decode()!r} is not UTF-8") from exc


def _int(fields: Mapping[bytes, bytes], name: bytes) -> int:
    text = _text(fields, name)
    try:
        return int(text)
    except ValueError:
        raise MalformedCommand(f"field {name.decode()!r} is not an integer: {text!r}") from None


_LEVEL_FIELD = {str(int(lv)).encode(): lv for lv in Level}


@lru_cache(maxsize=4096)
def _scope_level(scope: str) -> Level | None:
    try:
        return level_of_scope(scope)
    except ValueError:
        return None


def _decode_common(fields: Mapping[bytes, bytes]) -> Command | None:
    """The worker's hot path: a plain put or delete, decoded with no per-field calls.

    Accepts a subset of what :func:`decode_command`'s full checks accept; anything else
    (other ops, replays, anything odd) returns ``None`` and takes the full path, which
    also produces the precise error message.
    """
    try:
        op = fields[b"op"]
        raw_key = fields[b"k"]
        key = raw_key.decode()
        scope = fields[b"s"].decode()
        level = _LEVEL_FIELD[fields[b"l"]]
        actor = fields[b"a"].decode()
        ts_us = int(fields[b"t"])
        envelope = fields.get(b"e")
        x = fields.get(b"x")
        plain = (
            op in (b"put", b"del")
            and b"o" not in fields
            and key
            and "\x00" not in key
            and len(raw_key) <= MAX_KEY_BYTES
            and _scope_level(scope) is level
            and (op == b"del" or (envelope and may_be_sealed_by(envelope, fields[b"a"])))
        )
        if not plain:
            return None
        if op == b"del":
            return Command(OP_DELETE, scope, key, level, actor, ts_us)
        expires_at = None if x is None else int(x)
        return Command(OP_PUT, scope, key, level, actor, ts_us, envelope, expires_at)
    except (KeyError, ValueError, UnicodeDecodeError):
        return None


def decode_command(fields: Mapping[bytes, bytes]) -> Command:
    """Parse a stream entry; ``MalformedCommand`` says what is wrong with it.

    >>> fields = put_fields("swarm:s", "k", Level.SWARM, "a", 1, b"\\x01\\x00{}", None)
    >>> raw = {k: v if isinstance(v, bytes) else str(v).encode() for k, v in fields.items()}
    >>> decode_command(raw).scope
    'swarm:s'
    """
    common = _decode_common(fields)
    if common is not None:
        return common
    op = _text(fields, b"op")
    actor = _text(fields, b"a")
    ts_us = _int(fields, b"t")
    if op == OP_AUDIT:
        lvl = _int(fields, b"l")
        return Command(
            op=op,
            scope=_text(fields, b"s"),
            key=_text(fields, b"k"),
            level=Level(lvl) if lvl in Level._value2member_map_ else Level.SYSTEM,
            actor=actor,
            ts_us=ts_us,
            event=_text(fields, b"ev"),
            risk=_text(fields, b"r"),
            detail=_text(fields, b"d"),
        )
    if op not in (OP_PUT, OP_DELETE, OP_RESEAL):
        raise MalformedCommand(f"unknown op {op!r}")
    scope = _text(fields, b"s")
    key = _text(fields, b"k")
    try:
        check_key(key)
        level = level_of_number(_int(fields, b"l"))
        scope_level = level_of_scope(scope)
    except (ValidationError, ValueError) as exc:
        raise MalformedCommand(str(exc)) from exc
    if scope_level is not level:
        raise MalformedCommand(f"scope {scope!r} does not belong to level {level.name}")
    origin = _stream_id(fields, b"o") if b"o" in fields else None
    if op == OP_DELETE:
        return Command(
            op=op, scope=scope, key=key, level=level, actor=actor, ts_us=ts_us, origin=origin
        )
    envelope = fields.get(b"e")
    if not envelope:
        raise MalformedCommand(f"{op} without an envelope")
    if level in ENCRYPTED_LEVELS and envelope[0] == SEALED_VERSION:
        sealing = envelope_sealing(envelope)
        if sealing is None:
            raise MalformedCommand(f"{op} with a malformed version-2 envelope header")
        if op == OP_PUT and sealing.writer != actor:
            # Re-sent with another writer: the row would name someone who never wrote it.
            raise MalformedCommand(
                f"envelope was sealed by {sealing.writer!r}, not by the command's writer {actor!r}"
            )
    if op == OP_RESEAL:
        if level not in ENCRYPTED_LEVELS:
            raise MalformedCommand(f"reseal at level {level.name}, which is not encrypted")
        return Command(op, scope, key, level, actor, ts_us, envelope=envelope, guard=_guard(fields))
    expires_at = _int(fields, b"x") if b"x" in fields else None
    return Command(
        op=op,
        scope=scope,
        key=key,
        level=level,
        actor=actor,
        ts_us=ts_us,
        envelope=envelope,
        expires_at=expires_at,
        origin=origin,
    )


def _stream_id(fields: Mapping[bytes, bytes], name: bytes) -> str:
    text = _text(fields, name)
    sid_of(text)  # raises MalformedCommand if it is not a stream id
    return text


def stream_id_of(sid: bytes) -> str:
    """Inverse of :func:`sid_of`.

    >>> stream_id_of(sid_of("1700000000000-2"))
    '1700000000000-2'
    """
    ms, seq = _SID.unpack(sid)
    return f"{ms}-{seq}"


def sid_of(stream_id: str) -> bytes:
    """The ordering id of a stream id ``"<ms>-<seq>"``: 16 bytes that sort like the id
    (as Python bytes and as SQLite BLOBs), for every id Redis can hand out.

    >>> sid_of("1700000000000-2") > sid_of("1700000000000-1") > sid_of("1699999999999-9")
    True
    >>> sid_of("1700000000000-4194304") > sid_of("1700000000000-4194303")  # no 22-bit cap
    True
    """
    ms_text, _, seq_text = stream_id.partition("-")
    try:
        ms, seq = int(ms_text), int(seq_text or 0)
        return _SID.pack(ms, seq)
    except (ValueError, struct.error):
        raise MalformedCommand(f"not a stream id: {stream_id!r}") from None


def sid_hash_text(sid: object) -> str:
    """How a journal row's sid enters its chain hash: the schema-3 integer while the id
    fits in it, so chains written before stay valid, else ``ms-seq``.

    >>> sid_hash_text(sid_of("1-2")), sid_hash_text(sid_of("1-4194304"))
    ('4194306', '1-4194304')
    >>> sid_hash_text(4194306)  # a schema-3 value (or one edited back to an integer)
    '4194306'
    """
    if not isinstance(sid, (bytes, bytearray, memoryview)) or len(sid) != SID_BYTES:
        return str(sid)
    ms, seq = _SID.unpack(sid)
    if seq < 1 << SEQ_BITS and ms < 1 << (63 - SEQ_BITS):
        return str((ms << SEQ_BITS) | seq)
    return f"{ms}-{seq}"


def legacy_sid(value: int) -> bytes:
    """The ordering id of a schema-3 integer sid (``ms << 22 | seq``).

    >>> stream_id_of(legacy_sid((1700000000000 << 22) | 7))
    '1700000000000-7'
    """
    return _SID.pack(value >> SEQ_BITS, value & ((1 << SEQ_BITS) - 1))


def _guard(fields: Mapping[bytes, bytes]) -> bytes:
    """A reseal's guard: a stream id, or (a command sent before schema 4) its integer."""
    text = _text(fields, b"g")
    if text.partition("-")[0] not in ("", text):  # "<ms>-<seq>", not "-1" or "42"
        return sid_of(text)
    value = _int(fields, b"g")
    if not 0 <= value < 1 << 63:
        raise MalformedCommand(f"reseal guard out of range: {value}")
    return legacy_sid(value)


def xadd_command(stream: bytes, fields: Mapping[bytes, Any]) -> tuple[Any, ...]:
    """``XADD stream * field value ...`` as one command tuple for ``transact``.

    >>> xadd_command(b"s", {b"op": b"put", b"t": 1})
    (b'XADD', b's', b'*', b'op', b'put', b't', 1)
    """
    out: list[Any] = [b"XADD", stream, b"*"]
    for name, value in fields.items():
        out += (name, value)
    return tuple(out)


def cache_value(envelope: bytes, expires_at: int | None) -> bytes:
    """What a put caches: the envelope, behind its expiry when it has one.

    >>> cached_envelope(cache_value(b"\\x01env", 1_700_000_000_000))
    (b'\\x01env', 1700000000000)
    >>> cache_value(b"\\x01env", None)
    b'\\x01env'
    """
    if expires_at is None:
        return envelope
    return CACHE_EXPIRING + int(expires_at).to_bytes(8, "big") + envelope


def cached_envelope(value: bytes) -> tuple[bytes | None, int | None]:
    """``(envelope, expires_at)`` of a cache entry; the envelope is ``None`` for a
    delete's mark (:data:`CACHE_TOMBSTONE`).

    >>> cached_envelope(CACHE_TOMBSTONE), cached_envelope(b"\\x01env")
    ((None, None), (b'\\x01env', None))
    """
    if value == CACHE_TOMBSTONE:
        return None, None
    if value.startswith(CACHE_EXPIRING) and len(value) > 10:
        return value[10:], int.from_bytes(value[2:10], "big")
    return value, None
