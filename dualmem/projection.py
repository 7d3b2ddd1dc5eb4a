"""Projections of reserved records into relational tables, planned by the worker; pure, no I/O.

Some records are more useful as rows than as key/value pairs: the mission log's missions,
tool calls, decisions and playbook runs, and the mirror's sync events. They are written
like any other record (one Redis round trip, the stream, the worker), and the worker turns
them into rows of their tables **in the same SQLite transaction** as the batch that carries
them, so a projection can never disagree with the record it came from.

* Records under the reserved key prefix ``_dm/`` at the plaintext levels (SWARM, PROJECT)
  are projected: ``_dm/mission/<mission>`` into ``missions``, ``_dm/tool_call/<mission>/<id>``
  into ``tool_calls``, ``_dm/decision/...`` into ``decisions`` and ``_dm/playbook_run/...``
  into ``playbook_runs``. A delete of the record deletes the row (for a mission, with its
  children: the foreign keys cascade).
* Records at the encrypted levels are **never** projected: the worker holds no keys and a
  plaintext column would undo the encryption at rest. ``MissionLog`` reads them from the
  encrypted records instead.
* Audit events named ``mirror.<kind>`` are also rows of ``sync_events``.

Every statement is idempotent and monotonic like the ``memory`` upsert: rows remember the
stream id (``sid``) that wrote them, and an older command never overwrites a newer one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from acl.crypto import Codec
from acl.errors import DualMemError
from acl.levels import Level, level_of_number
from dualmem.commands import OP_AUDIT, OP_DELETE, OP_PUT, Command, MalformedCommand

__all__ = [
    "DECISION_COLUMNS",
    "KINDS",
    "MAX_ID_CHARS",
    "MISSION_COLUMNS",
    "PLAINTEXT",
    "PLAYBOOK_RUN_COLUMNS",
    "RESERVED_PREFIX",
    "STATUSES",
    "SYNC_EVENT_PREFIX",
    "TOOL_CALL_COLUMNS",
    "TRANSITIONS",
    "Decision",
    "Mission",
    "MissionRecord",
    "PlaybookRun",
    "Statement",
    "ToolCall",
    "check_id",
    "child_key",
    "mission_key",
    "parse_key",
    "parse_record",
    "plan_projection",
    "projected",
    "row_to_decision",
    "row_to_mission",
    "row_to_playbook_run",
    "row_to_tool_call",
    "to_json",
]

RESERVED_PREFIX = "_dm/"
SYNC_EVENT_PREFIX = "mirror."
KINDS = ("mission", "tool_call", "decision", "playbook_run")
STATUSES = ("pending", "in_progress", "completed", "failed")
#: Legal status changes; staying in the same status (a phase or metadata update) is legal
#: except for the two terminal states.
TRANSITIONS: dict[str, frozenset[str]] = {
    "pending": frozenset({"pending", "in_progress", "failed"}),
    "in_progress": frozenset({"in_progress", "completed", "failed"}),
    "completed": frozenset(),
    "failed": frozenset(),
}
MAX_ID_CHARS = 128

#: ``(sql, parameters)``: one statement of a batch's projection, executed in plan order.
Statement = tuple[str, tuple[object, ...]]

# Plaintext envelopes only; the bound protects against a forged size header, and is far
# above any max_value_bytes a writer may have used.
#: The codec that opens plaintext-level envelopes (any size a setting allows).
PLAINTEXT = Codec(None, max_value_bytes=1 << 28)
_PLAINTEXT_LEVELS = (Level.SWARM, Level.PROJECT)


@dataclass(frozen=True, slots=True)
class Mission:
    """A mission as the log stores it (times are epoch milliseconds)."""

    mission_id: str
    scope: str
    level: Level
    phase: str
    status: str
    metadata: dict[str, Any]
    started_at: int
    updated_at: int
    completed_at: int | None
    actor: str


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One tool call of a mission; ``args`` and ``result`` are any JSON values."""

    call_id: str
    mission_id: str
    scope: str
    tool_name: str
    args: Any
    result: Any
    duration_ms: float
    success: bool
    error: str | None
    called_at: int
    actor: str


@dataclass(frozen=True, slots=True)
class Decision:
    """A decision taken in a mission, with its rationale and the agent that took it."""

    decision_id: str
    mission_id: str
    scope: str
    decision_type: str
    rationale: str
    agent_name: str
    decided_at: int
    actor: str


@dataclass(frozen=True, slots=True)
class PlaybookRun:
    """One run of a playbook during a mission."""

    run_id: str
    mission_id: str
    scope: str
    playbook_name: str
    phase: str
    started_at: int
    completed_at: int | None
    success: bool
    actor: str


MissionRecord = Mission | ToolCall | Decision | PlaybookRun


def check_id(what: str, value: object) -> str:
    """``value`` if it can be a mission or record id, else ``ValueError``.

    An id is 1 to 128 characters, without ``/`` (it is a key segment) or control characters.

    >>> check_id("mission_id", "auth-rollout-7")
    'auth-rollout-7'
    >>> check_id("mission_id", "a/b")
    Traceback (most recent call last):
    ...
    ValueError: mission_id must not contain '/'
    """
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty str")
    if len(value) > MAX_ID_CHARS:
        raise ValueError(f"{what} is longer than {MAX_ID_CHARS} characters")
    if "/" in value:
        raise ValueError(f"{what} must not contain '/'")
    if any(ch < " " or ch == "\x7f" for ch in value):
        raise ValueError(f"{what} must not contain control characters")
    return value


def mission_key(mission_id: str) -> str:
    """The record key of a mission.

    >>> mission_key("m1")
    '_dm/mission/m1'
    """
    return f"{RESERVED_PREFIX}mission/{mission_id}"


def child_key(kind: str, mission_id: str, record_id: str) -> str:
    """The record key of a tool call, decision or playbook run.

    >>> child_key("tool_call", "m1", "0001")
    '_dm/tool_call/m1/0001'
    """
    return f"{RESERVED_PREFIX}{kind}/{mission_id}/{record_id}"


def parse_key(key: str) -> tuple[str, str, str | None] | None:
    """``(kind, mission_id, record_id)`` of a projected key, ``None`` for any other key.

    >>> parse_key("_dm/tool_call/m1/0001"), parse_key("_dm/mission/m1"), parse_key("plan")
    (('tool_call', 'm1', '0001'), ('mission', 'm1', None), None)
    """
    if not key.startswith(RESERVED_PREFIX):
        return None
    parts = key[len(RESERVED_PREFIX) :].split("/")
    if parts[0] == "mission" and len(parts) == 2:
        return "mission", parts[1], None
    if parts[0] in KINDS[1:] and len(parts) == 3:
        return parts[0], parts[1], parts[2]
    return None


def projected(key: str, level: Level) -> bool:
    """Whether a record at ``key`` and ``level`` is projected into the mission tables.

    >>> projected("_dm/mission/m1", Level.PROJECT), projected("_dm/mission/m1", Level.TEAM)
    (True, False)
    """
    return level in _PLAINTEXT_LEVELS and parse_key(key) is not None


def to_json(value: Any) -> str:
    """Compact JSON text, as the JSON columns hold it."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


# -- record values -------------------------------------------------------------------------


def _str(d: dict[str, Any], name: str, *, empty: bool = True) -> str:
    v = d.get(name)
    if not isinstance(v, str) or (not empty and not v):
        raise ValueError(f"{name} must be a {'' if empty else 'non-empty '}str")
    return v


#: Epoch milliseconds above this do not fit an SQLite INTEGER.
MAX_EPOCH_MS = (1 << 63) - 1


def epoch_ms_of(name: str, v: object) -> int:
    """``v`` if it is epoch milliseconds SQLite can store (an int, not a bool, from 0 to
    2**63-1), else ``ValueError`` naming ``name``.

    >>> epoch_ms_of("t", 2**63)
    Traceback (most recent call last):
    ...
    ValueError: t must be epoch milliseconds (int from 0 to 9223372036854775807)
    """
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_EPOCH_MS:
        raise ValueError(f"{name} must be epoch milliseconds (int from 0 to {MAX_EPOCH_MS})")
    return v


def duration_ms_of(v: object) -> float:
    """``v`` as a tool call's ``duration_ms``: a finite number >= 0 (not a bool), else
    ``ValueError`` (an int too large for a float too: it raised ``OverflowError``).

    >>> duration_ms_of(12), duration_ms_of(1.5)
    (12.0, 1.5)
    >>> duration_ms_of(10**400)
    Traceback (most recent call last):
    ...
    ValueError: duration_ms must be a finite number >= 0
    """
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        try:
            duration = float(v)
        except OverflowError:
            pass
        else:
            if math.isfinite(duration) and duration >= 0:
                return duration
    raise ValueError("duration_ms must be a finite number >= 0")


def _ms(d: dict[str, Any], name: str, *, optional: bool = False) -> int | None:
    v = d.get(name)
    if v is None and optional:
        return None
    return epoch_ms_of(name, v)


def _bool(d: dict[str, Any], name: str) -> bool:
    v = d.get(name)
    if not isinstance(v, bool):
        raise ValueError(f"{name} must be true or false")
    return v


def parse_record(
    kind: str,
    mission_id: str,
    record_id: str | None,
    scope: str,
    level: Level,
    actor: str,
    value: Any,
) -> MissionRecord:
    """Check a record's value against its kind and return it as a row object.

    The ids in the value must match the key. ``ValueError`` says what is wrong.
    """
    if not isinstance(value, dict):
        raise ValueError(f"a {kind} record must be a JSON object")
    if value.get("mission_id") != mission_id:
        raise ValueError("mission_id in the value does not match the key")
    if kind == "mission":
        status = value.get("status")
        if status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}")
        metadata = value.get("metadata", {})
        if not isinstance(metadata, dict):
            raise ValueError("metadata must be a JSON object")
        started = _ms(value, "started_at")
        updated = _ms(value, "updated_at")
        assert started is not None and updated is not None
        return Mission(
            mission_id,
            scope,
            level,
            _str(value, "phase"),
            str(status),
            metadata,
            started,
            updated,
            _ms(value, "completed_at", optional=True),
            actor,
        )
    id_field = {"tool_call": "call_id", "decision": "decision_id", "playbook_run": "run_id"}[kind]
    if value.get(id_field) != record_id:
        raise ValueError(f"{id_field} in the value does not match the key")
    assert record_id is not None
    if kind == "tool_call":
        duration = duration_ms_of(value.get("duration_ms"))
        error = value.get("error")
        if error is not None and not isinstance(error, str):
            raise ValueError("error must be a str or null")
        called = _ms(value, "called_at")
        assert called is not None
        return ToolCall(
            record_id,
            mission_id,
            scope,
            _str(value, "tool_name", empty=False),
            value.get("args"),
            value.get("result"),
            duration,
            _bool(value, "success"),
            error,
            called,
            actor,
        )
    if kind == "decision":
        decided = _ms(value, "decided_at")
        assert decided is not None
        return Decision(
            record_id,
            mission_id,
            scope,
            _str(value, "decision_type", empty=False),
            _str(value, "rationale"),
            _str(value, "agent_name", empty=False),
            decided,
            actor,
        )
    started = _ms(value, "started_at")
    assert started is not None
    completed = _ms(value, "completed_at", optional=True)
    if completed is not None and completed < started:
        raise ValueError("completed_at is before started_at")
    return PlaybookRun(
        record_id,
        mission_id,
        scope,
        _str(value, "playbook_name", empty=False),
        _str(value, "phase"),
        started,
        completed,
        _bool(value, "success"),
        actor,
    )


# -- the statements ------------------------------------------------------------------------

_TABLES = {
    "tool_call": ("tool_calls", "call_id"),
    "decision": ("decisions", "decision_id"),
    "playbook_run": ("playbook_runs", "run_id"),
}
# Every projected row is written only while its record's `memory` row is the one this
# command wrote (same sid, not a tombstone). The statements run after the batch's memory
# upserts, whose sid guard already decided: a late, older put of a record that was
# deleted (a claimed or replayed entry) changes neither. A delete removes the projected
# row, so without this a late put found no row to compare its sid with and revived it.
_CURRENT = (
    "EXISTS (SELECT 1 FROM memory WHERE scope = ? AND key = ? AND sid = ? AND envelope IS NOT NULL)"
)
# A mission's deletes leave a mark that purge never removes (``mission_deletes``, the
# newest delete's sid): every projected write of that mission, its own or a child's,
# older than the mark is refused. The record's tombstone in ``memory`` did that job until
# purge removed it after ``tombstone_ttl``: then a replayed or claimed older child came
# back. A child newer than the delete (written after it, or a mission id used again) is
# projected like any other.
_NOT_DELETED = (
    "NOT EXISTS (SELECT 1 FROM mission_deletes WHERE scope = ? AND mission_id = ? AND sid > ?)"
)
_MISSION_UPSERT = f"""
INSERT INTO missions (scope, mission_id, level, phase, status, metadata, started_at,
                      updated_at, completed_at, actor, sid)
SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?
WHERE {_CURRENT} AND {_NOT_DELETED}
ON CONFLICT (scope, mission_id) DO UPDATE SET
    level = excluded.level, phase = excluded.phase, status = excluded.status,
    metadata = excluded.metadata, started_at = excluded.started_at,
    updated_at = excluded.updated_at, completed_at = excluded.completed_at,
    actor = excluded.actor, sid = excluded.sid
WHERE excluded.sid > missions.sid
"""
# A child can reach the worker before its mission (they may sit in different shards, or
# be read by different workers): a placeholder row (sid 0, never shown by reads) keeps
# the foreign key, and the mission's own record replaces it. A child older than the
# mission's last delete gets no placeholder, so a late child cannot revive it.
_PLACEHOLDER = f"""
INSERT INTO missions (scope, mission_id, level, phase, status, metadata, started_at,
                      updated_at, completed_at, actor, sid)
SELECT ?, ?, ?, '', 'pending', '{{}}', ?, ?, NULL, ?, 0
WHERE {_NOT_DELETED}
ON CONFLICT (scope, mission_id) DO NOTHING
"""
_MARK_DELETED = """
INSERT INTO mission_deletes (scope, mission_id, sid) VALUES (?, ?, ?)
ON CONFLICT (scope, mission_id) DO UPDATE SET sid = excluded.sid
WHERE excluded.sid > mission_deletes.sid
"""
# A mission's delete removes its children older than the delete; one newer than it (a
# late mission delete applied after a child written later) keeps its row, under a
# placeholder mission when the mission itself goes.
_DELETE_CHILDREN = [
    f"DELETE FROM {table} WHERE scope = ? AND mission_id = ? AND sid < ?"
    for table in ("tool_calls", "decisions", "playbook_runs")
]
_MISSION_TO_PLACEHOLDER = """
UPDATE missions SET phase = '', status = 'pending', metadata = '{}', completed_at = NULL,
    sid = 0
WHERE scope = ? AND mission_id = ? AND sid < ?
"""
_DROP_EMPTY_PLACEHOLDER = """
DELETE FROM missions WHERE scope = ? AND mission_id = ? AND sid = 0
  AND NOT EXISTS (SELECT 1 FROM tool_calls WHERE scope = ? AND mission_id = ?)
  AND NOT EXISTS (SELECT 1 FROM decisions WHERE scope = ? AND mission_id = ?)
  AND NOT EXISTS (SELECT 1 FROM playbook_runs WHERE scope = ? AND mission_id = ?)
"""
_CHILD_UPSERT = {
    "tool_call": f"""
INSERT INTO tool_calls (scope, call_id, mission_id, tool_name, args, result, duration_ms,
                        success, error, called_at, actor, sid)
SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?
WHERE EXISTS (SELECT 1 FROM missions WHERE scope = ? AND mission_id = ?)
  AND {_CURRENT} AND {_NOT_DELETED}
ON CONFLICT (scope, mission_id, call_id) DO UPDATE SET
    tool_name = excluded.tool_name, args = excluded.args,
    result = excluded.result, duration_ms = excluded.duration_ms, success = excluded.success,
    error = excluded.error, called_at = excluded.called_at, actor = excluded.actor,
    sid = excluded.sid
WHERE excluded.sid > tool_calls.sid
""",
    "decision": f"""
INSERT INTO decisions (scope, decision_id, mission_id, decision_type, rationale, agent_name,
                       decided_at, actor, sid)
SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?
WHERE EXISTS (SELECT 1 FROM missions WHERE scope = ? AND mission_id = ?)
  AND {_CURRENT} AND {_NOT_DELETED}
ON CONFLICT (scope, mission_id, decision_id) DO UPDATE SET
    decision_type = excluded.decision_type,
    rationale = excluded.rationale, agent_name = excluded.agent_name,
    decided_at = excluded.decided_at, actor = excluded.actor, sid = excluded.sid
WHERE excluded.sid > decisions.sid
""",
    "playbook_run": f"""
INSERT INTO playbook_runs (scope, run_id, mission_id, playbook_name, phase, started_at,
                           completed_at, success, actor, sid)
SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ?
WHERE EXISTS (SELECT 1 FROM missions WHERE scope = ? AND mission_id = ?)
  AND {_CURRENT} AND {_NOT_DELETED}
ON CONFLICT (scope, mission_id, run_id) DO UPDATE SET
    playbook_name = excluded.playbook_name,
    phase = excluded.phase, started_at = excluded.started_at,
    completed_at = excluded.completed_at, success = excluded.success,
    actor = excluded.actor, sid = excluded.sid
WHERE excluded.sid > playbook_runs.sid
""",
}
_SYNC_EVENT = (
    "INSERT INTO sync_events (audit_id, ts, kind, scope, key, detail) VALUES (?, ?, ?, ?, ?, ?)"
)


def _child_params(rec: MissionRecord, sid: bytes) -> tuple[object, ...]:
    if isinstance(rec, ToolCall):
        return (
            rec.scope,
            rec.call_id,
            rec.mission_id,
            rec.tool_name,
            to_json(rec.args),
            to_json(rec.result),
            rec.duration_ms,
            int(rec.success),
            rec.error,
            rec.called_at,
            rec.actor,
            sid,
        )
    if isinstance(rec, Decision):
        return (
            rec.scope,
            rec.decision_id,
            rec.mission_id,
            rec.decision_type,
            rec.rationale,
            rec.agent_name,
            rec.decided_at,
            rec.actor,
            sid,
        )
    assert isinstance(rec, PlaybookRun)
    return (
        rec.scope,
        rec.run_id,
        rec.mission_id,
        rec.playbook_name,
        rec.phase,
        rec.started_at,
        rec.completed_at,
        int(rec.success),
        rec.actor,
        sid,
    )


def _record_time(rec: MissionRecord) -> int:
    if isinstance(rec, ToolCall):
        return rec.called_at
    if isinstance(rec, Decision):
        return rec.decided_at
    assert isinstance(rec, PlaybookRun)
    return rec.started_at


def plan_projection(cmd: Command, sid: bytes, audit_id: int | None = None) -> list[Statement]:
    """The statements that project ``cmd`` (stream id ``sid``); ``[]`` for most commands.

    ``audit_id`` is the id the command's audit row gets (audit commands only). A reserved
    record whose value does not fit its kind raises ``MalformedCommand``: like any poison
    entry it is retried, then dead-lettered with the reason.
    """
    if cmd.op == OP_AUDIT:
        if not (cmd.event or "").startswith(SYNC_EVENT_PREFIX):
            return []
        kind = str(cmd.event)[len(SYNC_EVENT_PREFIX) :]
        return [(_SYNC_EVENT, (audit_id, cmd.ts_ms, kind, cmd.scope, cmd.key, cmd.detail))]
    if cmd.op not in (OP_PUT, OP_DELETE):
        return []  # a reseal (key rotation) changes no value, and is never at these levels
    parsed = parse_key(cmd.key)
    if parsed is None or cmd.level not in _PLAINTEXT_LEVELS:
        return []
    if cmd.op == OP_PUT and cmd.expires_at is not None:
        # Expiry turns the memory row into a tombstone without a command, so nothing
        # would remove the projected row: the mission tables would disagree with it.
        raise MalformedCommand(f"{cmd.key}: mission log records cannot expire (no ttl)")
    try:
        return _plan_record(cmd, sid, *parsed)
    except MalformedCommand:
        raise
    except (ValueError, TypeError) as exc:
        # A value that parsed but cannot be stored (NaN in a JSON field, which the JSON
        # reader accepts and the columns refuse): this entry fails alone, instead of the
        # whole batch raising and its shard stalling behind it.
        raise MalformedCommand(f"{cmd.key}: not a valid {parsed[0]} record: {exc}") from exc


def _plan_record(
    cmd: Command, sid: bytes, kind: str, mission_id: str, record_id: str | None
) -> list[Statement]:
    try:
        check_id("mission_id", mission_id)
        if record_id is not None:
            check_id("record id", record_id)
    except ValueError as exc:
        raise MalformedCommand(f"{cmd.key}: {exc}") from exc
    if cmd.op == OP_DELETE:
        if kind == "mission":
            ident = (cmd.scope, mission_id)
            return [
                (_MARK_DELETED, (*ident, sid)),
                *((sql, (*ident, sid)) for sql in _DELETE_CHILDREN),
                (_MISSION_TO_PLACEHOLDER, (*ident, sid)),
                (_DROP_EMPTY_PLACEHOLDER, ident * 4),
            ]
        table, id_col = _TABLES[kind]
        sql = f"DELETE FROM {table} WHERE scope = ? AND mission_id = ? AND {id_col} = ? AND sid < ?"
        return [(sql, (cmd.scope, mission_id, record_id, sid))]
    assert cmd.envelope is not None
    try:
        value = PLAINTEXT.open(cmd.envelope, scope=cmd.scope, key=cmd.key, level=cmd.level)
        rec = parse_record(kind, mission_id, record_id, cmd.scope, cmd.level, cmd.actor, value)
    except (DualMemError, ValueError) as exc:
        raise MalformedCommand(f"{cmd.key}: not a valid {kind} record: {exc}") from exc
    if isinstance(rec, Mission):
        params: tuple[object, ...] = (
            rec.scope,
            rec.mission_id,
            int(rec.level),
            rec.phase,
            rec.status,
            to_json(rec.metadata),
            rec.started_at,
            rec.updated_at,
            rec.completed_at,
            rec.actor,
            sid,
            cmd.scope,
            cmd.key,
            sid,
            cmd.scope,
            mission_id,
            sid,
        )
        return [(_MISSION_UPSERT, params)]
    when = _record_time(rec)
    placeholder = (cmd.scope, mission_id, int(cmd.level), when, when, cmd.actor)
    not_deleted = (cmd.scope, mission_id, sid)
    return [
        (_PLACEHOLDER, (*placeholder, *not_deleted)),
        (
            _CHILD_UPSERT[kind],
            (
                *_child_params(rec, sid),
                cmd.scope,
                mission_id,
                cmd.scope,
                cmd.key,
                sid,
                *not_deleted,
            ),
        ),
    ]


# -- rows back to objects (used by the store's reads) --------------------------------------


#: The columns each ``row_to_*`` below reads, in its order (the store's reads, verify).
MISSION_COLUMNS = (
    "scope, mission_id, level, phase, status, metadata, started_at, updated_at, completed_at, actor"
)
TOOL_CALL_COLUMNS = (
    "scope, call_id, mission_id, tool_name, args, result, duration_ms, success, error, "
    "called_at, actor"
)
DECISION_COLUMNS = (
    "scope, decision_id, mission_id, decision_type, rationale, agent_name, decided_at, actor"
)
PLAYBOOK_RUN_COLUMNS = (
    "scope, run_id, mission_id, playbook_name, phase, started_at, completed_at, success, actor"
)


def row_to_mission(r: Sequence[Any]) -> Mission:
    """A ``missions`` row (columns as in ``SQLiteStore``) as a :class:`Mission`."""
    return Mission(
        r[1], r[0], level_of_number(r[2]), r[3], r[4], json.loads(r[5]), r[6], r[7], r[8], r[9]
    )


def row_to_tool_call(r: Sequence[Any]) -> ToolCall:
    """A ``tool_calls`` row as a :class:`ToolCall`."""
    return ToolCall(
        r[1],
        r[2],
        r[0],
        r[3],
        json.loads(r[4]),
        json.loads(r[5]),
        r[6],
        bool(r[7]),
        r[8],
        r[9],
        r[10],
    )


def row_to_decision(r: Sequence[Any]) -> Decision:
    """A ``decisions`` row as a :class:`Decision`."""
    return Decision(r[1], r[2], r[0], r[3], r[4], r[5], r[6], r[7])


def row_to_playbook_run(r: Sequence[Any]) -> PlaybookRun:
    """A ``playbook_runs`` row as a :class:`PlaybookRun`."""
    return PlaybookRun(r[1], r[2], r[0], r[3], r[4], r[5], r[6], bool(r[7]), r[8])
