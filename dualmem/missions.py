"""The mission log: missions, tool calls, decisions and playbook runs, stored like any record.

Every write is a ``put`` (one Redis round trip; the worker persists it). Records live under
the reserved key prefix ``_dm/``; at the plaintext levels (SWARM, PROJECT, the default) the
worker also projects them into the ``missions``, ``tool_calls``, ``decisions`` and
``playbook_runs`` tables in the same transaction (see ``dualmem.projection``), and reads are
indexed SQL queries on those tables. At the encrypted levels (PRIVATE, TEAM, SYSTEM) nothing
is projected, because a plaintext column would undo the encryption at rest: the records
stay sealed in ``memory`` and reads decrypt them and filter in this process (at most
``MAX_ENCRYPTED_SCAN`` records per call).

>>> import tempfile, os
>>> from acl import Principal
>>> from dualmem import DualMemory
>>> db = os.path.join(tempfile.mkdtemp(), "m.db")
>>> lead = Principal(agent_id="lead", project="shop")
>>> with DualMemory(redis_url="memory://missions-doctest", db_path=db) as mem:
...     log = MissionLog(mem, lead)
...     _ = log.start_mission("auth-7", "design", {"owner": "backend"})
...     r = log.record_tool_call("auth-7", "grep", {"q": "login"}, {"hits": 3}, 12.5, True)
...     mem.sync(r)
...     [c.tool_name for c in log.tool_calls("auth-7", success=True)]
['grep']
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from acl.errors import TamperedRecord, ValidationError
from acl.levels import ENCRYPTED_LEVELS, Level, as_level
from acl.principal import Principal
from dualmem.commands import Receipt
from dualmem.projection import (
    KINDS,
    STATUSES,
    TRANSITIONS,
    Decision,
    Mission,
    MissionRecord,
    PlaybookRun,
    ToolCall,
    check_id,
    child_key,
    duration_ms_of,
    epoch_ms_of,
    mission_key,
    parse_key,
    parse_record,
)

if TYPE_CHECKING:
    from dualmem.memory import DualMemory

__all__ = [
    "MAX_ENCRYPTED_SCAN",
    "STATUSES",
    "Decision",
    "Mission",
    "MissionLog",
    "PlaybookRun",
    "ToolCall",
]

log = logging.getLogger("dualmem.missions")

#: Largest number of records one read scans at an encrypted level (one ``query`` page).
MAX_ENCRYPTED_SCAN = 10_000

_R = TypeVar("_R", Mission, ToolCall, Decision, PlaybookRun)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _epoch_ms(name: str, value: object, *, optional: bool = False) -> int | None:
    """An epoch-ms int from an int (ms) or an aware ``datetime``, from 0 to 2**63-1 (what
    the worker's projection stores: beyond it the record was accepted here and then
    dead-lettered)."""
    if value is None and optional:
        return None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValidationError(f"{name} must be a timezone-aware datetime or epoch ms")
        value = int(value.timestamp() * 1000)
    elif isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"{name} must be epoch milliseconds (int >= 0) or a datetime")
    try:
        return epoch_ms_of(name, value)
    except ValueError as exc:
        raise ValidationError(str(exc)) from None


class _Ids:
    """Record ids: the time in ms, a counter, random hex. Reads order by time (ms), then
    id, so the counter keeps the records this process makes within a millisecond in the
    order it made them; the hex keeps ids of different processes apart.

    >>> ids = _Ids()
    >>> a, b = ids.new(), ids.new()
    >>> a < b and len(a) == len(b) == 26
    True
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ms = 0  # the millisecond of the last id made ...
        self._seq = 0  # ... and how many were made before it in that millisecond

    def new(self) -> str:
        with self._lock:
            now = _now_ms()
            if now == self._ms:
                self._seq += 1
            else:
                self._ms, self._seq = now, 0
            seq = self._seq
        # Time first, so a mission's records sort by creation in key order too.
        return f"{now:013d}-{seq:04x}{secrets.token_hex(4)}"


_ids = _Ids()


def _new_id() -> str:
    return _ids.new()


class MissionLog:
    """Missions and what happened in them, for one principal.

    ``level`` (default PROJECT) is where mission records live; every ``record_*`` method
    takes ``level=`` to store that one record elsewhere (for example a tool call whose
    arguments hold secrets at PRIVATE), and every read takes ``level=`` to read there.

    Status changes follow ``pending -> in_progress -> completed | failed`` (``pending ->
    failed`` too); anything else raises ``ValidationError``. The check is made against the
    newest state (the Redis cache entry, else SQLite), so it sees this process's own
    unpersisted writes; two processes updating one mission at once must coordinate.
    """

    def __init__(
        self, mem: DualMemory, principal: Principal, *, level: Level | int = Level.PROJECT
    ) -> None:
        if not isinstance(principal, Principal):
            raise ValidationError("principal must be an acl.Principal")
        self.mem = mem
        self.principal = principal
        self.level = as_level(level)

    # -- writes --------------------------------------------------------------------

    def _put(self, key: str, value: dict[str, Any], level: Level | int | None) -> Receipt:
        lvl = self.level if level is None else as_level(level)
        return self.mem.put(key, value, level=lvl, principal=self.principal)

    def _current(self, mission_id: str) -> Mission | None:
        record = self.mem.get_record(
            mission_key(mission_id), level=self.level, principal=self.principal, fresh=True
        )
        if record is None:
            return None
        scope = self.principal.scope(self.level) or ""
        return _mission(mission_id, scope, self.level, record.owner, record.value)

    def _existing(self, mission_id: str) -> Mission:
        check = _checked(mission_id)
        current = self._current(check)
        if current is None:
            raise ValidationError(f"unknown mission {mission_id!r}: start_mission() it first")
        return current

    def start_mission(
        self,
        mission_id: str,
        phase: str,
        metadata: Mapping[str, Any] | None = None,
        *,
        status: str = "in_progress",
    ) -> Receipt:
        """Create a mission (``status`` ``in_progress``, or ``pending`` to start it later)."""
        mid = _checked(mission_id)
        if status not in ("pending", "in_progress"):
            raise ValidationError("a mission starts as 'pending' or 'in_progress'")
        if self._current(mid) is not None:
            raise ValidationError(f"mission {mission_id!r} already exists")
        now = _now_ms()
        value = {
            "mission_id": mid,
            "phase": _text("phase", phase),
            "status": status,
            "metadata": _object("metadata", metadata),
            "started_at": now,
            "updated_at": now,
            "completed_at": None,
        }
        return self._put(mission_key(mid), value, None)

    def update_mission(
        self,
        mission_id: str,
        *,
        status: str | None = None,
        phase: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Receipt:
        """Change a mission's status, phase or metadata (metadata is replaced, not merged)."""
        current = self._existing(mission_id)
        new_status = current.status if status is None else status
        if new_status not in STATUSES:
            raise ValidationError(f"status must be one of {', '.join(STATUSES)}")
        if new_status not in TRANSITIONS[current.status]:
            raise ValidationError(
                f"mission {mission_id!r} cannot go from {current.status} to {new_status}"
            )
        now = max(_now_ms(), current.updated_at)
        terminal = not TRANSITIONS[new_status]
        value = {
            "mission_id": current.mission_id,
            "phase": current.phase if phase is None else _text("phase", phase),
            "status": new_status,
            "metadata": current.metadata if metadata is None else _object("metadata", metadata),
            "started_at": current.started_at,
            "updated_at": now,
            "completed_at": now if terminal else None,
        }
        return self._put(mission_key(current.mission_id), value, None)

    def delete_mission(self, mission_id: str, *, timeout: float = 5.0) -> list[Receipt]:
        """Delete a mission and its records at the log's level (the mission first, so a
        late child cannot bring it back); returns every receipt, the mission's first.

        Its records are listed from SQLite once every write made before the call (by any
        process) is there (:meth:`DualMemory.settle`, up to ``timeout`` seconds, then
        ``NotPersisted`` and nothing deleted): a record written just before would be
        missed otherwise, and outlive its mission. Records an earlier mission of this id
        left behind (its record deleted with a plain ``delete``: no read lists them) are
        deleted too.
        """
        mission = self._existing(mission_id)
        lvl = self.level
        self.mem.settle(timeout)
        # Listed before anything is deleted: at the plaintext levels the list comes from
        # the projection, which the mission's delete empties (ON DELETE CASCADE).
        children = [
            child_key(kind, mission.mission_id, _record_id(rec))
            for kind in KINDS[1:]
            for rec in self._children(kind, mission.mission_id, lvl)
        ]
        # Left by an earlier mission of this id (its record deleted with a plain delete):
        # every read hides them, so nothing but this ever deletes them.
        stale = self.mem.store.stale_children(mission.scope, mission.mission_id)
        children = list(dict.fromkeys([*children, *stale]))
        receipts = [
            self.mem.delete(mission_key(mission.mission_id), level=lvl, principal=self.principal)
        ]
        for key in children:
            receipts.append(self.mem.delete(key, level=lvl, principal=self.principal))
        return receipts

    def record_tool_call(
        self,
        mission_id: str,
        tool_name: str,
        args: Any,
        result: Any,
        duration_ms: float,
        success: bool,
        error: str | None = None,
        *,
        level: Level | int | None = None,
    ) -> Receipt:
        """Record one tool call (``args``/``result``: any JSON values)."""
        mission = self._existing(mission_id)
        try:
            duration = duration_ms_of(duration_ms)
        except ValueError as exc:
            raise ValidationError(str(exc)) from None
        if not isinstance(success, bool):
            raise ValidationError("success must be a bool")
        if error is not None and not isinstance(error, str):
            raise ValidationError("error must be a str or None")
        call_id = _new_id()
        value = {
            "mission_id": mission.mission_id,
            "call_id": call_id,
            "tool_name": _text("tool_name", tool_name, empty=False),
            "args": args,
            "result": result,
            "duration_ms": duration,
            "success": success,
            "error": error,
            "called_at": _now_ms(),
        }
        return self._put(child_key("tool_call", mission.mission_id, call_id), value, level)

    def record_decision(
        self,
        mission_id: str,
        decision_type: str,
        rationale: str,
        agent_name: str,
        *,
        level: Level | int | None = None,
    ) -> Receipt:
        """Record a decision, why it was taken and by which agent."""
        mission = self._existing(mission_id)
        decision_id = _new_id()
        value = {
            "mission_id": mission.mission_id,
            "decision_id": decision_id,
            "decision_type": _text("decision_type", decision_type, empty=False),
            "rationale": _text("rationale", rationale),
            "agent_name": _text("agent_name", agent_name, empty=False),
            "decided_at": _now_ms(),
        }
        return self._put(child_key("decision", mission.mission_id, decision_id), value, level)

    def record_playbook_run(
        self,
        mission_id: str,
        playbook_name: str,
        phase: str,
        started_at: int | datetime,
        completed_at: int | datetime | None,
        success: bool,
        *,
        level: Level | int | None = None,
    ) -> Receipt:
        """Record a playbook run (times as epoch ms or aware datetimes)."""
        mission = self._existing(mission_id)
        start = _epoch_ms("started_at", started_at)
        end = _epoch_ms("completed_at", completed_at, optional=True)
        assert start is not None
        if end is not None and end < start:
            raise ValidationError("completed_at is before started_at")
        if not isinstance(success, bool):
            raise ValidationError("success must be a bool")
        run_id = _new_id()
        value = {
            "mission_id": mission.mission_id,
            "run_id": run_id,
            "playbook_name": _text("playbook_name", playbook_name, empty=False),
            "phase": _text("phase", phase),
            "started_at": start,
            "completed_at": end,
            "success": success,
        }
        return self._put(child_key("playbook_run", mission.mission_id, run_id), value, level)

    # -- reads (SQLite) ------------------------------------------------------------

    def _scope(self, level: Level | int | None) -> tuple[Level, str]:
        lvl = self.level if level is None else as_level(level)
        # The facade's check: denials are audited like any other read.
        return self.mem.authorize(self.principal, lvl, "read")

    def get_mission(self, mission_id: str, *, level: Level | int | None = None) -> Mission | None:
        """The mission as committed to SQLite, or ``None``."""
        mid = _checked(mission_id)
        lvl, scope = self._scope(level)
        if lvl in ENCRYPTED_LEVELS:
            r = self.mem.get_record(mission_key(mid), level=lvl, principal=self.principal)
            if r is None:
                return None
            return _mission(mid, r.scope, r.level, r.owner, r.value)
        return self.mem.store.mission(scope, mid)

    def list_missions(
        self, status: str | None = None, *, level: Level | int | None = None
    ) -> list[Mission]:
        """Missions (optionally with one ``status``), oldest start first."""
        if status is not None and status not in STATUSES:
            raise ValidationError(f"status must be one of {', '.join(STATUSES)}")
        lvl, scope = self._scope(level)
        if lvl in ENCRYPTED_LEVELS:
            found = self._scan("mission", mission_key(""), lvl, Mission)
            return sorted(
                (m for m in found if status is None or m.status == status),
                key=lambda m: (m.started_at, m.mission_id),
            )
        return self.mem.store.missions(scope, status=status)

    def tool_calls(
        self,
        mission_id: str,
        since: int | datetime | None = None,
        success: bool | None = None,
        *,
        level: Level | int | None = None,
    ) -> list[ToolCall]:
        """Tool calls of a mission, in call order, from ``since`` (epoch ms) on, with the
        given outcome when ``success`` is not ``None``."""
        mid = _checked(mission_id)
        start = _epoch_ms("since", since, optional=True)
        if success is not None and not isinstance(success, bool):
            raise ValidationError("success must be a bool or None")
        lvl, scope = self._scope(level)
        if lvl in ENCRYPTED_LEVELS:
            calls = self._scan_children("tool_call", mid, lvl, scope, ToolCall)
            return sorted(
                (
                    c
                    for c in calls
                    if (start is None or c.called_at >= start)
                    and (success is None or c.success is success)
                ),
                key=lambda c: (c.called_at, c.call_id),
            )
        return self.mem.store.tool_calls(scope, mid, since=start, success=success)

    def decisions(self, mission_id: str, *, level: Level | int | None = None) -> list[Decision]:
        """Decisions of a mission in the order they were taken."""
        mid = _checked(mission_id)
        lvl, scope = self._scope(level)
        if lvl in ENCRYPTED_LEVELS:
            found = self._scan_children("decision", mid, lvl, scope, Decision)
            return sorted(found, key=lambda d: (d.decided_at, d.decision_id))
        return self.mem.store.decisions(scope, mid)

    def playbook_runs(
        self, mission_id: str, *, level: Level | int | None = None
    ) -> list[PlaybookRun]:
        """Playbook runs of a mission by start time."""
        mid = _checked(mission_id)
        lvl, scope = self._scope(level)
        if lvl in ENCRYPTED_LEVELS:
            found = self._scan_children("playbook_run", mid, lvl, scope, PlaybookRun)
            return sorted(found, key=lambda r: (r.started_at, r.run_id))
        return self.mem.store.playbook_runs(scope, mid)

    def _children(self, kind: str, mission_id: str, level: Level) -> list[MissionRecord]:
        readers: dict[str, Callable[..., list[Any]]] = {
            "tool_call": self.tool_calls,
            "decision": self.decisions,
            "playbook_run": self.playbook_runs,
        }
        return list(readers[kind](mission_id, level=level))

    def _scan_children(
        self, kind: str, mission_id: str, level: Level, scope: str, cls: type[_R]
    ) -> list[_R]:
        """A mission's ``kind`` records at an encrypted level, but those older than the
        mission's newest delete: the projection refuses those at the plaintext levels
        (see ``dualmem.projection``), so a mission deleted with a plain ``delete``, and a
        new one of its id, list none of its old records at any level."""
        found = self._scan(kind, child_key(kind, mission_id, ""), level, cls)
        stale = set(self.mem.store.stale_children(scope, mission_id)) if found else set()
        return [rec for rec in found if child_key(kind, mission_id, _record_id(rec)) not in stale]

    def _scan(self, kind: str, prefix: str, level: Level, cls: type[_R]) -> list[_R]:
        """Decrypt the records under ``prefix`` at an encrypted level (one query page)."""
        records = self.mem.query(
            principal=self.principal, level=level, prefix=prefix, limit=MAX_ENCRYPTED_SCAN
        )
        if len(records) >= MAX_ENCRYPTED_SCAN:
            raise ValidationError(
                f"more than {MAX_ENCRYPTED_SCAN - 1} {kind} records under {prefix!r} at the "
                f"encrypted level {level.name}; keep large mission logs at PROJECT or SWARM"
            )
        out: list[_R] = []
        for r in records:
            parsed = parse_key(r.key)
            if parsed is None or parsed[0] != kind:
                continue
            try:
                rec = parse_record(kind, parsed[1], parsed[2], r.scope, r.level, r.owner, r.value)
            except ValueError as exc:
                log.warning("skipping malformed %s record %s/%s: %s", kind, r.scope, r.key, exc)
                continue
            if isinstance(rec, cls):
                out.append(rec)
        return out


def _mission(mission_id: str, scope: str, level: Level, owner: str, value: Any) -> Mission:
    """The mission record's value as a :class:`Mission`; ``TamperedRecord`` if it is not
    one (any member of the scope can put anything under the mission log's keys)."""
    try:
        rec = parse_record("mission", mission_id, None, scope, level, owner, value)
    except ValueError as exc:
        raise TamperedRecord(
            f"mission {mission_id!r} does not hold a mission record: {exc}"
        ) from None
    assert isinstance(rec, Mission)
    return rec


def _checked(mission_id: object) -> str:
    try:
        return check_id("mission_id", mission_id)
    except ValueError as exc:
        raise ValidationError(str(exc)) from exc


def _text(name: str, value: object, *, empty: bool = True) -> str:
    # A name (empty=False) must hold more than white space, as the coordination checks
    # ask; the projection still takes a blank one, which an older version wrote.
    if not isinstance(value, str) or (not empty and not value.strip()):
        raise ValidationError(
            f"{name} must be a str" if empty else f"{name} must be a non-empty str, not blank"
        )
    return value


def _object(name: str, value: Mapping[str, Any] | None) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValidationError(f"{name} must be a mapping (a JSON object)")
    return dict(value)


def _record_id(rec: MissionRecord) -> str:
    if isinstance(rec, ToolCall):
        return rec.call_id
    if isinstance(rec, Decision):
        return rec.decision_id
    if isinstance(rec, PlaybookRun):
        return rec.run_id
    return rec.mission_id
