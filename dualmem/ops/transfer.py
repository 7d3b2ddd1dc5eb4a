"""``dualmem export`` and ``dualmem import``: records as JSON Lines, one record a line.

A line holds ``scope``, ``key``, ``level``, ``owner``, ``created_at``, ``updated_at``,
``expires_at`` and either ``value`` (the JSON value: plaintext levels, or an encrypted
level exported with ``--decrypt``) or ``envelope`` (base64 of the sealed bytes: encrypted
levels stay encrypted in the file). Values round-trip byte for byte: the serializer is
compact JSON both ways, and sealed envelopes are copied as they are.

Import writes through the stream like any put (the worker commits), compares each line
with the committed row first (so importing a file twice adds nothing), and checks every
line before sending any: with ``strict`` one bad line means nothing is written, without it
bad lines are reported by number and skipped; either way the good lines go in ONE
``MULTI``/``EXEC``, never half of them.
"""

from __future__ import annotations

import base64
import binascii
import json
import sqlite3
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import IO, Any

from acl.crypto import Codec
from acl.errors import AccessDenied, DualMemError, ValidationError
from acl.levels import ENCRYPTED_LEVELS, Level, as_level
from acl.policy import level_of_scope, resolve_scope, stored_level
from acl.principal import Principal
from dualmem.commands import (
    MAX_TTL_SECONDS,
    OP_PUT,
    Command,
    MalformedCommand,
    check_key,
    check_text,
    sid_of,
)
from dualmem.ops.database import NO_PROGRESS, ProgressFn
from dualmem.ops.runtime import Write
from dualmem.projection import plan_projection
from dualmem.sqlite_store import prefix_upper_bound

__all__ = [
    "FIELDS",
    "ExportResult",
    "ImportItem",
    "ImportPlan",
    "LineError",
    "check_projectable",
    "export_records",
    "line_envelope",
    "line_expiry",
    "line_identity",
    "parse_line",
    "plan_import",
]

FIELDS = ("scope", "key", "level", "owner", "created_at", "updated_at", "expires_at")
_ALLOWED = {*FIELDS, "value", "envelope"}
DEFAULT_OWNER = "import"
_LINE_BREAKS = ("\x85", "\u2028", "\u2029")


def _dumps(obj: object) -> str:
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    # U+0085, U+2028 and U+2029 are legal raw inside JSON strings, but str.splitlines()
    # and other line-oriented tools break lines there; escaped, a line stays one line.
    # (json.dumps escapes the other line breaks: they are control characters.)
    for ch in _LINE_BREAKS:
        text = text.replace(ch, f"\\u{ord(ch):04x}")
    return text


@dataclass
class ExportResult:
    """Counts of an export; ``errors`` are rows left out (with why)."""

    records: int = 0
    sealed: int = 0
    decrypted: int = 0
    denied: int = 0
    errors: list[str] = field(default_factory=list)


def export_records(
    conn: sqlite3.Connection,
    out: IO[str],
    *,
    now_ms: int,
    codec: Codec,
    levels: Collection[Level] | None = None,
    prefix: str = "",
    decrypt_as: Principal | None = None,
    progress: ProgressFn = NO_PROGRESS,
) -> ExportResult:
    """Write every live record (of ``levels``, under ``prefix``) to ``out``, by scope, key.

    One ``SELECT`` is one read transaction: the file is a consistent snapshot even while
    the worker writes. Encrypted records are written sealed unless ``decrypt_as`` may read
    their scope (``acl.resolve_scope``), then their value is written in the clear.
    """
    where = ["envelope IS NOT NULL", "(expires_at IS NULL OR expires_at > ?)"]
    params: list[object] = [now_ms]
    if levels:
        where.append(f"level IN ({','.join('?' * len(levels))})")
        params.extend(int(lv) for lv in levels)
    if prefix:
        where.append("key >= ?")
        params.append(prefix)
        upper = prefix_upper_bound(prefix)
        if upper is not None:
            where.append("key < ?")
            params.append(upper)
    cond = " AND ".join(where)
    total = int(conn.execute(f"SELECT count(*) FROM memory WHERE {cond}", params).fetchone()[0])
    cursor = conn.execute(
        "SELECT scope, key, level, owner, envelope, created_at, updated_at, expires_at "
        f"FROM memory WHERE {cond} ORDER BY scope, key",
        params,
    )
    result = ExportResult()
    while rows := cursor.fetchmany(1000):
        for scope, key, level_no, owner, envelope, created, updated, expires in rows:
            line: dict[str, Any] = dict(
                zip(FIELDS, (scope, key, level_no, owner, created, updated, expires), strict=True)
            )
            try:
                level = stored_level(scope, level_no)
                if level in ENCRYPTED_LEVELS and not _may_read(decrypt_as, level, scope):
                    line["envelope"] = base64.b64encode(bytes(envelope)).decode("ascii")
                    result.sealed += 1
                    result.denied += decrypt_as is not None
                else:
                    line["value"] = codec.open(
                        bytes(envelope), scope=scope, key=key, level=level, owner=owner
                    )
                    result.decrypted += level in ENCRYPTED_LEVELS
            except DualMemError as exc:
                result.errors.append(f"{scope}/{key}: {exc}")
                continue
            out.write(_dumps(line) + "\n")
            result.records += 1
        progress("export", result.records + len(result.errors), total)
    return result


def _may_read(principal: Principal | None, level: Level, scope: str) -> bool:
    if principal is None:
        return False
    try:
        resolve_scope(principal, level, action="read", scope=scope)
    except AccessDenied:
        return False
    return True


class LineError(ValueError):
    """A line of an import file that cannot be imported; the message says why."""


@dataclass(frozen=True, slots=True)
class ImportItem:
    """One importable line: the command to send, and its plaintext JSON when known."""

    line: int
    write: Write
    payload: bytes


@dataclass
class ImportPlan:
    """What an import would do: ``new`` and ``changed`` lines are sent, the rest are not."""

    lines: int = 0
    new: list[ImportItem] = field(default_factory=list)
    changed: list[ImportItem] = field(default_factory=list)
    unchanged: int = 0
    expired: int = 0
    errors: list[tuple[int, str]] = field(default_factory=list)

    @property
    def writes(self) -> list[ImportItem]:
        """Lines to send, in file order."""
        return sorted(self.new + self.changed, key=lambda i: i.line)


def line_identity(obj: dict[str, Any]) -> tuple[str, str, Level]:
    """``(scope, key, level)`` of a line (or mirror file), checked; else ``LineError``."""
    scope, key = obj.get("scope"), obj.get("key")
    if not isinstance(scope, str):
        raise LineError("scope must be a string")
    try:
        check_text("scope", scope)
        check_key(key)
        level = as_level(obj.get("level"))
        scope_level = level_of_scope(scope)
    except (ValidationError, ValueError) as exc:
        raise LineError(str(exc)) from None
    assert isinstance(key, str)
    if scope_level is not level:
        raise LineError(f"scope {scope!r} is not at level {level.name}")
    return scope, key, level


def line_envelope(
    obj: dict[str, Any], codec: Codec, scope: str, key: str, level: Level, writer: str
) -> tuple[bytes, bytes]:
    """``(envelope, plaintext JSON)`` of a line written as ``writer``: its envelope
    checked (it must have been sealed by that writer), or its value sealed."""
    try:
        if "envelope" not in obj:
            payload = codec.serializer.encode(obj["value"])
            envelope = codec.seal(obj["value"], scope=scope, key=key, level=level, owner=writer)
            return envelope, payload
        if not isinstance(obj["envelope"], str):
            raise LineError("envelope must be a base64 string")
        try:
            envelope = base64.b64decode(obj["envelope"], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise LineError(f"envelope is not base64: {exc}") from None
        payload = codec.open_bytes(envelope, scope=scope, key=key, level=level, owner=writer)
        # What put would refuse is refused here too: a payload that is not the JSON a
        # seal makes (every reader of its scope would meet a TamperedRecord), or too big.
        if len(payload) > codec.max_value_bytes:
            raise LineError(
                f"value is {len(payload)} bytes serialized; the limit is "
                f"{codec.max_value_bytes} (setting max_value_bytes)"
            )
        codec.open(envelope, scope=scope, key=key, level=level)
        return envelope, payload
    except DualMemError as exc:
        raise LineError(str(exc)) from None


def parse_line(text: str, lineno: int, codec: Codec, now_ms: int) -> ImportItem | None:
    """Check one line; ``None`` if its record has expired, ``LineError`` if it is bad."""
    try:
        # Without its line ending, an error's position is within this line.
        obj = json.loads(text.rstrip("\r\n"))
    except ValueError as exc:
        raise LineError(f"not valid JSON: {exc}") from None
    except RecursionError:
        # Nested deeper than the parser's recursion limit: a traceback, before.
        raise LineError("not valid JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        raise LineError("expected a JSON object")
    unknown = sorted(set(obj) - _ALLOWED)
    if unknown:
        raise LineError(f"unknown field(s): {', '.join(unknown)}")
    scope, key, level = line_identity(obj)
    owner = obj.get("owner", DEFAULT_OWNER)
    if not isinstance(owner, str) or not owner:
        raise LineError("owner must be a non-empty string")
    try:
        check_text("owner", owner)
    except ValidationError as exc:
        raise LineError(str(exc)) from None
    expires = line_expiry(obj, now_ms)
    if ("value" in obj) == ("envelope" in obj):
        raise LineError("a line needs exactly one of 'value' and 'envelope'")
    if expires is not None and expires <= now_ms:
        return None
    envelope, payload = line_envelope(obj, codec, scope, key, level, owner)
    check_projectable(scope, key, level, owner, envelope, expires)
    return ImportItem(lineno, Write(scope, key, level, owner, envelope, expires), payload)


def line_expiry(obj: dict[str, Any], now_ms: int) -> int | None:
    """A line's ``expires_at`` (epoch ms or ``None``), checked; else ``LineError``."""
    expires = obj.get("expires_at")
    if expires is None:
        return None
    if isinstance(expires, bool) or not isinstance(expires, int):
        raise LineError("expires_at must be epoch milliseconds or null")
    if expires > now_ms + MAX_TTL_SECONDS * 1000:
        # The bound put's ttl has: beyond it Redis refuses the cache entry's PX inside the
        # transaction (after the lines before it went in), and SQLite's integers overflow.
        raise LineError(f"expires_at is more than {MAX_TTL_SECONDS} s from now")
    return expires


def check_projectable(
    scope: str, key: str, level: Level, owner: str, envelope: bytes, expires: int | None
) -> None:
    """``LineError`` if the worker would refuse this record when projecting it (a mission
    log record under ``_dm/`` that does not fit its kind), so ``--strict`` and
    ``--dry-run`` catch it before anything is sent."""
    command = Command(OP_PUT, scope, key, level, owner, 0, envelope, expires)
    try:
        plan_projection(command, sid_of("0-1"))
    except MalformedCommand as exc:
        raise LineError(str(exc)) from None


def plan_import(
    lines: Iterable[str],
    conn: sqlite3.Connection,
    codec: Codec,
    *,
    now_ms: int,
    progress: ProgressFn = NO_PROGRESS,
) -> ImportPlan:
    """Check every line and compare it with the committed row; sends nothing.

    A line is unchanged when the live row has the same level, owner, expiry and value
    (the same sealed bytes, or the same plaintext when the keyring opens both).
    """
    plan = ImportPlan()
    first_line: dict[tuple[str, str], int] = {}
    for lineno, raw in enumerate(lines, start=1):
        plan.lines = lineno
        if lineno % 1000 == 0:
            # Whatever this line is: the import renews its key lease from here.
            progress("check", lineno, None)
        if not raw.strip():
            continue
        try:
            item = parse_line(raw, lineno, codec, now_ms)
        except LineError as exc:
            plan.errors.append((lineno, str(exc)))
            continue
        if item is None:
            plan.expired += 1
            continue
        ident = (item.write.scope, item.write.key)
        if ident in first_line:
            plan.errors.append(
                (lineno, f"duplicate of line {first_line[ident]} ({ident[0]}/{ident[1]})")
            )
            continue
        first_line[ident] = lineno
        state = _compare(conn, codec, item, now_ms)
        if state == "new":
            plan.new.append(item)
        elif state == "changed":
            plan.changed.append(item)
        else:
            plan.unchanged += 1
    return plan


def _compare(conn: sqlite3.Connection, codec: Codec, item: ImportItem, now_ms: int) -> str:
    w = item.write
    row = conn.execute(
        "SELECT level, owner, envelope, expires_at FROM memory WHERE scope = ? AND key = ? "
        "AND envelope IS NOT NULL AND (expires_at IS NULL OR expires_at > ?)",
        (w.scope, w.key, now_ms),
    ).fetchone()
    if row is None:
        return "new"
    level, owner, envelope, expires = row
    if (level, owner, expires) != (int(w.level), w.actor, w.expires_at):
        return "changed"
    if bytes(envelope) == w.envelope:
        return "unchanged"
    try:
        same = codec.open_bytes(bytes(envelope), scope=w.scope, key=w.key, level=w.level)
    except DualMemError:
        return "changed"
    return "unchanged" if same == item.payload else "changed"
