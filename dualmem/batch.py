"""Batch planning for the worker: stream entries to rows, hash chains; pure, no I/O."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from dualmem.commands import (
    OP_AUDIT,
    OP_DELETE,
    OP_RESEAL,
    MalformedCommand,
    decode_command,
    sid_hash_text,
    sid_of,
)
from dualmem.projection import Statement, plan_projection
from dualmem.store import Notification, StreamEntry

__all__ = ["GENESIS", "RISKS", "BatchPlan", "chain_hash", "journal_hash_values", "plan_batch"]

GENESIS = b"\x00" * 32
RISKS = ("low", "medium", "high")


def chain_hash(prev: bytes, values: Iterable[object]) -> bytes:
    """SHA-256 over the previous hash and a row's values (unit separator between them).

    Both the journal and the audit log chain their rows with this, and ``verify``
    recomputes it: editing any row breaks every hash after it. A value's own unit and
    record separators are escaped (with the record separator), so no two rows share an
    encoding: a key holding ``\\x1f`` cannot let an edit move text between columns.
    Values without those characters encode as they always did.

    >>> chain_hash(GENESIS, [1, "a", None]).hex()[:16]
    'b6518af840b88701'
    >>> chain_hash(GENESIS, ["a\\x1fb", "c"]) == chain_hash(GENESIS, ["a", "b\\x1fc"])
    False
    """
    parts = ["" if v is None else str(v) for v in values]
    text = "\x1f".join(parts)
    if "\x1e" in text or text.count("\x1f") != len(parts) - 1:
        # Rare: a value holds a separator; escape each value (see _chain_text). From
        # parts: ``values`` may be an iterator, already used up.
        text = "\x1f".join([_chain_text(p) for p in parts])
    return hashlib.sha256(prev + text.encode("utf-8")).digest()


def journal_hash_values(row: Sequence[object]) -> tuple[object, ...]:
    """A journal row's columns ``(seq, shard, stream_id, sid, op, ..., committed_at)`` as
    :func:`chain_hash` takes them: the sid in the form ``sid_hash_text`` gives it (its
    schema-3 integer while it fits, so chains written before schema 4 still verify).

    >>> from dualmem.commands import sid_of
    >>> journal_hash_values((1, 0, "1-2", sid_of("1-2"), "put"))
    (1, 0, '1-2', '4194306', 'put')
    """
    return (*row[:3], sid_hash_text(row[3]), *row[4:])


def _chain_text(value: object) -> str:
    text = "" if value is None else str(value)
    if "\x1e" in text or "\x1f" in text:
        text = text.replace("\x1e", "\x1e\x1e").replace("\x1f", "\x1e\x1f")
    return text


@dataclass(slots=True)
class BatchPlan:
    """Rows to write for a batch, computed before any SQL runs."""

    journal: list[tuple[object, ...]] = field(default_factory=list)
    memory: list[tuple[object, ...]] = field(default_factory=list)
    audit: list[tuple[object, ...]] = field(default_factory=list)
    notifications: list[Notification] = field(default_factory=list)
    applied: list[StreamEntry] = field(default_factory=list)
    duplicates: list[StreamEntry] = field(default_factory=list)
    failed: list[tuple[StreamEntry, str]] = field(default_factory=list)
    ts_us: list[int] = field(default_factory=list)
    #: Projection statements (see ``dualmem.projection``), run after the rows above.
    projections: list[Statement] = field(default_factory=list)
    #: Key-rotation re-encryptions ``(envelope, scope, key, level, guard sid)``: each
    #: replaces a row's envelope only if the row is still at the guard's stream id.
    reseal: list[tuple[object, ...]] = field(default_factory=list)
    journal_tail: tuple[int, bytes] = (0, GENESIS)
    audit_tail: tuple[int, bytes] = (0, GENESIS)


def _order_sid(stream_id: str, origin: str | None) -> bytes:
    """The id that orders a command: its own, or a replayed command's original one, so a
    replay (``dualmem dlq replay``) never overwrites what was written after it failed."""
    sid = sid_of(stream_id)
    if origin is None:
        return sid
    first = sid_of(origin)
    if first > sid:
        raise MalformedCommand(f"origin {origin} is after the entry itself")
    return first


def plan_batch(
    entries: Sequence[StreamEntry],
    *,
    already: set[tuple[int, str]],
    journal_tail: tuple[int, bytes],
    audit_tail: tuple[int, bytes],
    now_ms: int,
) -> BatchPlan:
    """Turn entries into journal, memory and audit rows.

    ``already`` holds ``(shard, stream_id)`` of entries committed before: they become
    ``duplicates`` (acknowledged, nothing written). ``*_tail`` is ``(last id, last hash)``
    of each chain. Entries that do not decode land in ``failed`` with the reason.

    Memory rows are upserts guarded by the stream id (see ``SQLiteStore``): a delete is a
    row with a NULL envelope (a tombstone), so an older put delivered late cannot revive it.
    """
    plan = BatchPlan(journal_tail=journal_tail, audit_tail=audit_tail)
    seq, jhash = journal_tail
    aid, ahash = audit_tail
    seen = set(already)
    for entry in entries:
        ident = (entry.shard, entry.stream_id)
        if ident in seen:
            plan.duplicates.append(entry)
            continue
        try:
            cmd = decode_command(entry.fields)
            sid = _order_sid(entry.stream_id, cmd.origin)
            if cmd.op == OP_AUDIT and cmd.risk not in RISKS:
                raise MalformedCommand(f"audit risk must be one of {RISKS}, got {cmd.risk!r}")
            # Planned before anything is added, so a record that cannot be projected
            # fails alone, like any other malformed entry.
            projected = plan_projection(cmd, sid, aid + 1)
        except MalformedCommand as exc:
            plan.failed.append((entry, f"malformed command: {exc}"))
            continue
        seen.add(ident)
        plan.applied.append(entry)
        ts = cmd.ts_ms
        if cmd.op == OP_RESEAL:
            # Not a change of value: no journal row, no notification (see reseal_fields).
            plan.reseal.append((cmd.envelope, cmd.scope, cmd.key, int(cmd.level), cmd.guard))
            continue
        if cmd.op == OP_AUDIT:
            aid += 1
            level = int(cmd.level) if cmd.scope else None
            row = (
                aid,
                ts,
                cmd.event,
                cmd.actor,
                cmd.scope or None,
                cmd.key or None,
                level,
                cmd.risk,
                cmd.detail,
                entry.shard,
                entry.stream_id,
            )
            prev_a = ahash
            ahash = chain_hash(ahash, row)
            plan.audit.append((*row, prev_a, ahash))
            plan.projections.extend(projected)
            continue
        seq += 1
        jrow = (
            seq,
            entry.shard,
            entry.stream_id,
            sid,
            cmd.op,
            cmd.scope,
            cmd.key,
            int(cmd.level),
            cmd.actor,
            ts,
            now_ms,
        )
        prev = jhash
        jhash = chain_hash(jhash, journal_hash_values(jrow))
        plan.journal.append((*jrow, prev, jhash))
        envelope = None if cmd.op == OP_DELETE else cmd.envelope
        expires = None if cmd.op == OP_DELETE else cmd.expires_at
        plan.memory.append(
            (
                cmd.scope,
                cmd.key,
                int(cmd.level),
                cmd.actor,
                envelope,
                sid,
                entry.stream_id,
                ts,
                ts,
                expires,
            )
        )
        plan.notifications.append(Notification(seq, cmd.scope, cmd.key, int(cmd.level), cmd.op))
        plan.projections.extend(projected)
        plan.ts_us.append(cmd.ts_us)
    plan.journal_tail = (seq, jhash)
    plan.audit_tail = (aid, ahash)
    return plan
