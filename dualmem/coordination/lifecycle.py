"""Agent lifecycle: spawn, confidence updates, heartbeats, termination, dead-agent detection,
and each agent's event history, all written through ``DualMemory.put``."""

from __future__ import annotations

import math
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from acl.errors import TamperedRecord, ValidationError
from acl.levels import ENCRYPTED_LEVELS, Level, as_level
from acl.principal import Principal
from dualmem.commands import Receipt, check_int, ttl_to_ms
from dualmem.coordination._validation import (
    ReceiptLog,
    SeenRecords,
    check_ident,
    check_iteration,
    check_key_fits,
    check_score,
    check_strings,
    check_text,
    not_a_record,
    without_values,
)
from dualmem.memory import DualMemory, Record

__all__ = ["AgentEvent", "AgentInfo", "AgentLifecycle", "AgentStatus"]

_QUERY_LIMIT = 10_000  #: one page of a query; history reads page after page
#: The characters after an agent's event prefix: ``<at:020d>-<6 hex digits>``.
_AGENTS = "lifecycle/agents/"
_EVENTS = "lifecycle/events/"


class AgentStatus(StrEnum):
    """Where an agent is in its life. ``terminated`` and ``dead`` are final."""

    SPAWNED = "spawned"
    ACTIVE = "active"
    TERMINATED = "terminated"
    DEAD = "dead"

    @property
    def final(self) -> bool:
        """True for statuses an agent never leaves (it may be spawned again)."""
        return self in (AgentStatus.TERMINATED, AgentStatus.DEAD)


@dataclass(frozen=True, slots=True)
class AgentInfo:
    """An agent's current state. Times are epoch microseconds of the lifecycle's clock."""

    agent_id: str
    name: str
    type: str
    capabilities: tuple[str, ...]
    level: Level
    status: AgentStatus
    spawned_at: int
    last_heartbeat: int
    confidence: float | None
    phase: str | None
    iteration: int | None
    ended_at: int | None
    end_reason: str | None

    def to_value(self) -> dict[str, Any]:
        """The JSON value stored for this agent."""
        return {
            "agent_id": self.agent_id,
            "name": self.name,
            "type": self.type,
            "capabilities": list(self.capabilities),
            "level": int(self.level),
            "status": self.status.value,
            "spawned_at": self.spawned_at,
            "last_heartbeat": self.last_heartbeat,
            "confidence": self.confidence,
            "phase": self.phase,
            "iteration": self.iteration,
            "ended_at": self.ended_at,
            "end_reason": self.end_reason,
        }

    @classmethod
    def from_value(cls, v: Any) -> AgentInfo:
        """Inverse of :meth:`to_value`; ``TamperedRecord`` if it is not an agent record."""
        try:
            return cls(
                agent_id=str(v["agent_id"]),
                name=str(v["name"]),
                type=str(v["type"]),
                capabilities=tuple(str(c) for c in v["capabilities"]),
                level=Level(int(v["level"])),
                status=AgentStatus(v["status"]),
                spawned_at=int(v["spawned_at"]),
                last_heartbeat=int(v["last_heartbeat"]),
                # As update_confidence checks it (a ValidationError is a ValueError).
                confidence=(
                    None if v["confidence"] is None else check_score("confidence", v["confidence"])
                ),
                phase=v["phase"],
                iteration=v["iteration"],
                ended_at=v["ended_at"],
                end_reason=v["end_reason"],
            )
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise not_a_record("an agent lifecycle record", exc) from exc


@dataclass(frozen=True, slots=True)
class AgentEvent:
    """One entry of an agent's history: ``spawn``, ``confidence``, ``heartbeat`` (only
    with ``record_heartbeats``), ``terminate`` or ``dead``."""

    agent_id: str
    event: str
    at: int  #: epoch microseconds
    detail: dict[str, Any]


class AgentLifecycle:
    """A registry of agents kept by ``principal`` at ``level`` (default SWARM, so the swarm
    sees who is alive), written through ``DualMemory.put``.

    Current state lives at ``lifecycle/agents/<agent_id>``; every event is its own record
    at ``lifecycle/events/<agent_id>/<time>-<random>``, so history needs no read before a
    write. An agent whose last heartbeat (or update) is older than ``heartbeat_timeout``
    seconds is marked ``dead`` by :meth:`stale_agents`, which records a ``dead`` event and
    an audit row. A terminated or dead agent cannot be updated (``ValidationError``) until
    it is spawned again. Events expire after ``event_ttl`` seconds when it is given (a
    put's ttl; the state never expires). ``clock`` (epoch seconds) is injectable for tests.

    Updates read the agent's state from the Redis cache (``fresh``) and write it back:
    one writer per agent at a time (a lock serialises this object's own threads). The
    state's cache entry does not expire (it is replaced by the key's next write), so a
    worker that falls behind by more than ``cache_ttl`` cannot make an update or a spawn
    see an older state than the last one written.

    >>> import tempfile, os
    >>> from acl import Level, Principal
    >>> from dualmem import DualMemory
    >>> boss = Principal(agent_id="coordinator", swarm="auth")
    >>> db = os.path.join(tempfile.mkdtemp(), "mem.db")
    >>> with DualMemory(redis_url="memory://doctest-lifecycle", db_path=db) as mem:
    ...     life = AgentLifecycle(mem, boss, heartbeat_timeout=30)
    ...     _ = life.register_spawn("coder-1", "Coder", "coder", ["python"], Level.PRIVATE)
    ...     _ = life.update_confidence("coder-1", 0.8, "tests pass", "impl", 1)
    ...     _ = life.register_termination("coder-1", "phase complete")
    ...     life.sync()
    ...     [e.event for e in life.history("coder-1")], life.agent("coder-1").status.value
    (['spawn', 'confidence', 'terminate'], 'terminated')
    """

    def __init__(
        self,
        mem: DualMemory,
        principal: Principal,
        *,
        level: Level | int = Level.SWARM,
        heartbeat_timeout: float = 30.0,
        record_heartbeats: bool = False,
        event_ttl: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(mem, DualMemory):
            raise ValidationError("AgentLifecycle needs a DualMemory")
        if not isinstance(principal, Principal):
            raise ValidationError("principal must be an acl.Principal")
        if (
            isinstance(heartbeat_timeout, bool)
            or not isinstance(heartbeat_timeout, (int, float))
            or not math.isfinite(heartbeat_timeout)
            or heartbeat_timeout <= 0
        ):
            raise ValidationError(f"heartbeat_timeout must be > 0 seconds, got {heartbeat_timeout}")
        # Checked as a put checks its ttl, before anything is written (a bad one was
        # refused by the first event's put, inside register_spawn).
        ttl_to_ms(event_ttl)
        self.mem = mem
        self.principal = principal
        self.level = as_level(level)
        self.heartbeat_timeout = float(heartbeat_timeout)
        self.record_heartbeats = record_heartbeats
        self.event_ttl = event_ttl
        self._clock = clock
        self._lock = threading.RLock()
        self._last_us = 0
        self._receipts = ReceiptLog(mem)
        self._rejected = SeenRecords()

    # -- plumbing ------------------------------------------------------------------------

    def _now_us(self) -> int:
        # Strictly increasing within this object, so event keys sort in call order even
        # when the clock stands still or steps back.
        now = int(self._clock() * 1_000_000)
        self._last_us = max(now, self._last_us + 1)
        return self._last_us

    def _put(self, key: str, value: Any, ttl: float | None = None) -> Receipt:
        return self._receipts.add(
            self.mem.put(key, value, level=self.level, principal=self.principal, ttl=ttl)
        )

    def _event(self, agent_id: str, event: str, at: int, detail: dict[str, Any]) -> Receipt:
        key = f"{_EVENTS}{agent_id}/{at:020d}-{secrets.token_hex(3)}"
        value = {"agent_id": agent_id, "event": event, "at": at, "detail": detail}
        return self._put(key, value, ttl=self.event_ttl)

    def _current(self, agent_id: str) -> AgentInfo | None:
        """The agent's state from the Redis cache, ``None`` if it has none. A record at its
        key that is not its state (junk, or a record naming another agent) is audited
        (:meth:`_reject_once`) and raised as ``TamperedRecord``: its fields must not be
        taken for this agent's, nor its ``agent_id`` decide which key an update writes."""
        record = self.mem.get_record(
            f"{_AGENTS}{agent_id}", level=self.level, principal=self.principal, fresh=True
        )
        if record is None:
            return None
        try:
            return self._parse(record)
        except TamperedRecord as exc:
            # The cache gives no stream id: when SQLite has committed this same value, its
            # row names the version, so list_agents' rejection of it is not repeated.
            committed = self.mem.get_record(record.key, level=self.level, principal=self.principal)
            if committed is not None and committed.value == record.value:
                record = committed
            self._reject_once(record, str(exc))
            raise

    @staticmethod
    def _parse(record: Record) -> AgentInfo:
        """The state ``record`` holds; ``TamperedRecord`` if it is not an agent record, or
        names another agent than the one its key does."""
        info = AgentInfo.from_value(record.value)
        if record.key != f"{_AGENTS}{info.agent_id}":
            raise TamperedRecord(f"names agent {info.agent_id!r}, stored under {record.key!r}")
        return info

    def _live(self, agent_id: str) -> AgentInfo:
        info = self._current(check_ident("agent_id", agent_id))
        if info is None:
            raise ValidationError(f"unknown agent {agent_id!r}: register_spawn it first")
        if info.status.final:
            raise ValidationError(
                f"agent {agent_id!r} is {info.status.value}; it cannot be updated "
                "(register_spawn it again)"
            )
        return info

    def _save(self, info: AgentInfo) -> Receipt:
        # Pinned: the state is read back with fresh=True (the cache entry first), so the
        # entry must not expire while its command waits in the stream longer than
        # cache_ttl (a worker outage), or a read would fall back to an older committed
        # state: a terminated agent's heartbeat would write "active" over "terminated".
        # The next write of the key replaces the entry (a delete's tombstone too, which
        # then expires as usual); a key rotation re-seals it in place.
        return self._receipts.add(
            self.mem._put_pinned(
                f"{_AGENTS}{info.agent_id}",
                info.to_value(),
                level=self.level,
                principal=self.principal,
            )
        )

    # -- commands ------------------------------------------------------------------------

    def register_spawn(
        self,
        agent_id: str,
        name: str,
        type: str,
        capabilities: Sequence[str],
        level: Level | int,
    ) -> Receipt:
        """Register a new agent (``spawned``). ``level`` is the access level it works at.

        Re-spawning an agent that is terminated or dead starts a new life; spawning one
        that is alive is a ``ValidationError``. A record at the agent's key that is not its
        state (junk, or one naming another agent: skipped by :meth:`list_agents`) is no
        living agent either: it is audited (``agent_record_rejected``) and replaced.
        """
        check_ident("agent_id", agent_id)
        # Its longest key, an event's, must fit: checked before anything is written.
        check_key_fits("agent_id", agent_id, f"{_EVENTS}{agent_id}/{0:020d}-{0:06x}")
        check_text("name", name, allow_empty=False)
        check_ident("type", type)
        caps = check_strings("capabilities", capabilities)
        lvl = as_level(level)
        with self._lock:
            try:
                existing = self._current(agent_id)
            except TamperedRecord:
                existing = None  # not its state (audited by _current): a new life replaces it
            if existing is not None and not existing.status.final:
                raise ValidationError(f"agent {agent_id!r} is already {existing.status.value}")
            now = self._now_us()
            info = AgentInfo(
                agent_id=agent_id,
                name=name,
                type=type,
                capabilities=caps,
                level=lvl,
                status=AgentStatus.SPAWNED,
                spawned_at=now,
                last_heartbeat=now,
                confidence=None,
                phase=None,
                iteration=None,
                ended_at=None,
                end_reason=None,
            )
            self._event(
                agent_id,
                "spawn",
                now,
                {"name": name, "type": type, "capabilities": list(caps), "level": int(lvl)},
            )
            return self._save(info)

    def update_confidence(
        self, agent_id: str, confidence: float, reasoning: str, phase: str, iteration: int
    ) -> Receipt:
        """Record the agent's confidence (also a sign of life); ``active`` from now on."""
        score = check_score("confidence", confidence)
        check_text("reasoning", reasoning)
        check_ident("phase", phase)
        check_iteration(iteration)
        with self._lock:
            info = self._live(agent_id)
            now = self._now_us()
            self._event(
                agent_id,
                "confidence",
                now,
                {
                    "confidence": score,
                    "reasoning": reasoning,
                    "phase": phase,
                    "iteration": iteration,
                },
            )
            return self._save(
                replace(
                    info,
                    status=AgentStatus.ACTIVE,
                    last_heartbeat=now,
                    confidence=score,
                    phase=phase,
                    iteration=iteration,
                )
            )

    def heartbeat(self, agent_id: str) -> Receipt:
        """Note that the agent is alive (history records it only with record_heartbeats)."""
        with self._lock:
            info = self._live(agent_id)
            now = self._now_us()
            if self.record_heartbeats:
                self._event(agent_id, "heartbeat", now, {})
            return self._save(replace(info, status=AgentStatus.ACTIVE, last_heartbeat=now))

    def register_termination(self, agent_id: str, reason: str) -> Receipt:
        """End the agent's life (``terminated``); later updates are refused."""
        check_text("reason", reason)
        with self._lock:
            info = self._live(agent_id)
            now = self._now_us()
            self._event(agent_id, "terminate", now, {"reason": reason})
            return self._save(
                replace(info, status=AgentStatus.TERMINATED, ended_at=now, end_reason=reason)
            )

    def stale_agents(self) -> list[AgentInfo]:
        """Agents alive on record whose last heartbeat is older than ``heartbeat_timeout``:
        each is marked ``dead`` now (a ``dead`` event and a medium-risk audit row).

        Returns them as they are after marking. Candidates come from SQLite; each is
        re-read from the Redis cache first, so a heartbeat not yet persisted still counts.
        """
        limit_us = int(self.heartbeat_timeout * 1_000_000)
        dead: list[AgentInfo] = []
        with self._lock:
            for candidate in self.list_agents():
                if candidate.status.final:
                    continue
                if int(self._clock() * 1_000_000) - candidate.last_heartbeat <= limit_us:
                    continue
                try:
                    info = self._current(candidate.agent_id)
                except TamperedRecord:
                    continue  # the cache holds junk for it (audited); the committed record is fine
                now = self._now_us()
                if info is None or info.status.final or now - info.last_heartbeat <= limit_us:
                    continue
                silent_s = round((now - info.last_heartbeat) / 1e6, 3)
                self._event(
                    info.agent_id,
                    "dead",
                    now,
                    {"last_heartbeat": info.last_heartbeat, "silent_s": silent_s},
                )
                marked = replace(
                    info,
                    status=AgentStatus.DEAD,
                    ended_at=now,
                    end_reason=f"no heartbeat for {silent_s:.1f}s",
                )
                self._save(marked)
                self._receipts.add(
                    self.mem.audit(
                        "agent_dead",
                        principal=self.principal,
                        risk="medium",
                        key=f"{_AGENTS}{info.agent_id}",
                        detail={"agent_id": info.agent_id, "silent_s": silent_s},
                    )
                )
                dead.append(marked)
        return dead

    # -- queries -------------------------------------------------------------------------

    def agent(self, agent_id: str) -> AgentInfo | None:
        """The agent's current state (from the Redis cache when present), or ``None``."""
        return self._current(check_ident("agent_id", agent_id))

    def list_agents(self, status: AgentStatus | str | None = None) -> list[AgentInfo]:
        """Agents as committed to SQLite, by id; only those with ``status`` if given
        (all of them, page after page)."""
        wanted = None if status is None else _status(status)
        records = self.mem.query_all(
            principal=self.principal, level=self.level, prefix=_AGENTS, page=_QUERY_LIMIT
        )
        agents = []
        for r in records:
            try:
                info = self._parse(r)
            except TamperedRecord as exc:
                self._reject_once(r, str(exc))
                continue
            agents.append(info)
        return [a for a in agents if wanted is None or a.status is wanted]

    def _reject_once(self, record: Record, reason: str) -> None:
        # Any member of the scope can put junk under the registry's prefixes: it is skipped
        # (it must not hide the other agents, or switch off stale_agents) and audited high
        # once per record version, not once per poll.
        if not self._rejected.first(record):
            return
        if self.level in ENCRYPTED_LEVELS:
            # The audit log is plaintext; the reason quotes what the sealed record holds.
            reason = without_values(reason)
        self._receipts.add(
            self.mem.audit(
                "agent_record_rejected",
                principal=self.principal,
                risk="high",
                key=record.key,
                detail={"reason": reason},
            )
        )

    def history(
        self,
        agent_id: str,
        limit: int | None = None,
        event_types: Iterable[str] | None = None,
    ) -> list[AgentEvent]:
        """The agent's events, oldest first; ``limit`` (an int >= 0) keeps the newest
        ``limit`` of them (``DualMemory.history`` keeps the oldest), ``event_types`` only
        those kinds.

        All of the agent's events are read, page after page (10,000 records a page,
        ``DualMemory.query_all``), so the newest are found however many there are.
        """
        check_ident("agent_id", agent_id)
        # As DualMemory.history checks it: a negative limit was taken for 0 (an empty list).
        check_int("limit", limit, low=0, optional=True)
        kinds = None if event_types is None else set(check_strings("event_types", event_types))

        records = self.mem.query_all(
            principal=self.principal,
            level=self.level,
            prefix=f"{_EVENTS}{agent_id}/",
            page=_QUERY_LIMIT,
        )
        events = []
        for r in records:
            v = r.value
            try:
                ev = AgentEvent(
                    str(v["agent_id"]), str(v["event"]), int(v["at"]), dict(v["detail"])
                )
            except (KeyError, TypeError, ValueError, OverflowError) as exc:
                self._reject_once(r, str(not_a_record("an agent event", exc)))
                continue
            if kinds is None or ev.event in kinds:
                events.append(ev)
        if limit is not None:
            events = events[-limit:] if limit > 0 else []
        return events

    def sync(self, timeout: float = 5.0) -> None:
        """Wait until everything this registry wrote is committed to SQLite."""
        self._receipts.sync(timeout)


def _status(value: AgentStatus | str) -> AgentStatus:
    try:
        return AgentStatus(value)
    except ValueError:
        names = ", ".join(s.value for s in AgentStatus)
        raise ValidationError(f"status must be one of {names}, got {value!r}") from None
