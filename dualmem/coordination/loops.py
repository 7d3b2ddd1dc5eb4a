"""CFN loop memory: Loop 3 confidence (private), Loop 2 consensus (swarm), Loop 4 decisions
(system), and the gates between them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from acl.errors import TamperedRecord, ValidationError
from acl.levels import Level
from acl.principal import Principal
from dualmem.commands import Receipt
from dualmem.coordination._validation import (
    MAX_ITERATION,
    ReceiptLog,
    SeenRecords,
    check_ident,
    check_iteration,
    check_json_object,
    check_score,
    check_strings,
    check_text,
    check_threshold,
    clock_us,
)
from dualmem.memory import DualMemory, Record

__all__ = [
    "DEFAULT_CONFIDENCE_THRESHOLD",
    "DEFAULT_CONSENSUS_THRESHOLD",
    "Decision",
    "Loop2Consensus",
    "Loop3Confidence",
    "Loop4Decision",
    "LoopMemory",
]

DEFAULT_CONFIDENCE_THRESHOLD = 0.75
DEFAULT_CONSENSUS_THRESHOLD = 0.90
_QUERY_LIMIT = 10_000
_ITERATION_DIGITS = len(str(MAX_ITERATION))  # iteration keys end in this many digits


class Decision(StrEnum):
    """The product owner's Loop 4 verdict."""

    PROCEED = "PROCEED"
    DEFER = "DEFER"
    ESCALATE = "ESCALATE"

    @classmethod
    def parse(cls, value: object) -> Decision:
        """A ``Decision`` from itself or its name (any case); else ``ValidationError``.

        >>> Decision.parse("proceed")
        <Decision.PROCEED: 'PROCEED'>
        """
        if isinstance(value, cls):
            return value
        if isinstance(value, str) and value.strip().upper() in cls.__members__:
            return cls[value.strip().upper()]
        raise ValidationError(f"decision must be one of PROCEED, DEFER, ESCALATE, got {value!r}")


@dataclass(frozen=True, slots=True)
class Loop3Confidence:
    """One agent's self-assessed confidence for a phase iteration (stored PRIVATE)."""

    agent_id: str
    phase: str
    iteration: int
    confidence: float
    reasoning: str
    blockers: tuple[str, ...]
    metadata: dict[str, Any]
    recorded_at: int  #: epoch microseconds
    gate_passed: bool  #: confidence >= the LoopMemory's confidence threshold


@dataclass(frozen=True, slots=True)
class Loop2Consensus:
    """The validators' consensus for a phase iteration (stored SWARM)."""

    swarm: str
    phase: str
    iteration: int
    score: float
    validation_results: Any
    recommendations: tuple[str, ...]
    recorded_by: str  #: the agent that wrote the record (as stored, not as claimed)
    recorded_at: int  #: epoch microseconds
    gate_passed: bool  #: score >= the LoopMemory's consensus threshold


@dataclass(frozen=True, slots=True)
class Loop4Decision:
    """The product owner's decision for a phase iteration (stored SYSTEM, encrypted)."""

    project: str
    swarm: str
    phase: str
    iteration: int
    decision: Decision
    reasoning: str
    deferred_issues: tuple[str, ...]
    next_actions: tuple[str, ...]
    decided_by: str  #: the agent that wrote the record (as stored, not as claimed)
    decided_at: int  #: epoch microseconds


class LoopMemory:
    """Loop 3 / 2 / 4 records of one swarm in one project, written through ``DualMemory.put``.

    * Loop 3 confidence is PRIVATE (``agent:<id>``, encrypted): only that agent reads it.
    * Loop 2 consensus is SWARM (``swarm:<swarm>``): principals of the swarm read it.
    * Loop 4 decisions are SYSTEM (encrypted): only system principals read or write them.

    Keys are ``cfn/<project>/<swarm>/loop<n>/<phase>/<iteration, 6 digits>``. Every write
    returns the put's :class:`~dualmem.Receipt`; ``sync()`` waits for all of them.
    Gates: ``confidence_gate_passed`` (every confidence >= ``confidence_threshold``,
    default 0.75) and ``consensus_gate_passed`` (score >= ``consensus_threshold``, 0.90).

    >>> import tempfile, os
    >>> from acl import Principal
    >>> from dualmem import DualMemory
    >>> coder = Principal(agent_id="coder-1", swarm="auth", project="shop")
    >>> po = Principal(agent_id="po", system=True)
    >>> db = os.path.join(tempfile.mkdtemp(), "mem.db")
    >>> with DualMemory(redis_url="memory://doctest-loops", db_path=db) as mem:
    ...     loops = LoopMemory(mem, swarm="auth", project="shop")
    ...     _ = loops.store_loop3_confidence(coder, "impl", 1, 0.82, "tests pass")
    ...     _ = loops.store_loop2_consensus(coder, "impl", 1, 0.93, {"tests": "ok"}, [])
    ...     _ = loops.store_loop4_decision(po, "impl", 1, "PROCEED", "gates passed")
    ...     loops.sync()
    ...     mine = loops.get_loop3_confidence(coder, "impl", 1)
    ...     latest = loops.get_loop2_consensus(coder, "impl")
    ...     [d.decision for d in loops.list_loop4_decisions(po)]
    ...     (mine.confidence, mine.gate_passed, latest.score, latest.gate_passed)
    [<Decision.PROCEED: 'PROCEED'>]
    (0.82, True, 0.93, True)
    """

    def __init__(
        self,
        mem: DualMemory,
        *,
        swarm: str,
        project: str,
        confidence_threshold: float = DEFAULT_CONFIDENCE_THRESHOLD,
        consensus_threshold: float = DEFAULT_CONSENSUS_THRESHOLD,
    ) -> None:
        if not isinstance(mem, DualMemory):
            raise ValidationError("LoopMemory needs a DualMemory")
        self.mem = mem
        self.swarm = check_ident("swarm", swarm)
        self.project = check_ident("project", project)
        self.confidence_threshold = check_threshold("confidence_threshold", confidence_threshold)
        self.consensus_threshold = check_threshold("consensus_threshold", consensus_threshold)
        self._receipts = ReceiptLog(mem)
        self._last_us = 0
        self._rejected = SeenRecords()

    def _now_us(self) -> int:
        # Strictly increasing per LoopMemory, so decisions listed "in chronological order"
        # keep the order they were stored in even within one clock tick.
        self._last_us = max(clock_us(), self._last_us + 1)
        return self._last_us

    def __repr__(self) -> str:
        return (
            f"LoopMemory(swarm={self.swarm!r}, project={self.project!r}, "
            f"confidence_threshold={self.confidence_threshold}, "
            f"consensus_threshold={self.consensus_threshold})"
        )

    # -- keys ----------------------------------------------------------------------------

    @property
    def swarm_scope(self) -> str:
        """The scope Loop 2 records live in."""
        return f"swarm:{self.swarm}"

    def _prefix(self, loop: int, phase: str | None = None) -> str:
        base = f"cfn/{self.project}/{self.swarm}/loop{loop}/"
        return base if phase is None else f"{base}{phase}/"

    def key(self, loop: int, phase: str, iteration: int) -> str:
        """The record key of a Loop ``loop`` (2, 3 or 4) entry.

        >>> import tempfile, os
        >>> from dualmem import DualMemory
        >>> db = os.path.join(tempfile.mkdtemp(), "k.db")
        >>> with DualMemory(redis_url="memory://doctest-loop-key", db_path=db) as mem:
        ...     LoopMemory(mem, swarm="auth", project="shop").key(3, "impl", 7)
        'cfn/shop/auth/loop3/impl/000007'
        """
        # An int, not just equal to one: 3.0 == 3 made the key ".../loop3.0/...".
        if isinstance(loop, bool) or not isinstance(loop, int) or loop not in (2, 3, 4):
            raise ValidationError(f"loop must be 2, 3 or 4, got {loop!r}")
        return f"{self._prefix(loop, check_ident('phase', phase))}{check_iteration(iteration):06d}"

    # -- gates ---------------------------------------------------------------------------

    def confidence_gate_passed(self, confidences: float | Iterable[float]) -> bool:
        """Whether every confidence reaches ``confidence_threshold`` (an empty set fails).

        >>> import tempfile, os
        >>> from dualmem import DualMemory
        >>> db = os.path.join(tempfile.mkdtemp(), "g.db")
        >>> with DualMemory(redis_url="memory://doctest-gate", db_path=db) as mem:
        ...     gate = LoopMemory(mem, swarm="s", project="p", confidence_threshold=0.8)
        ...     gate.confidence_gate_passed([0.81, 0.9]), gate.confidence_gate_passed(0.79)
        (True, False)
        """
        if isinstance(confidences, Iterable) and not isinstance(confidences, (str, bytes)):
            values: list[object] = list(confidences)
        else:
            values = [confidences]
        scores = [check_score("confidence", v) for v in values]
        return bool(scores) and all(s >= self.confidence_threshold for s in scores)

    def consensus_gate_passed(self, score: float) -> bool:
        """Whether a Loop 2 consensus score reaches ``consensus_threshold``."""
        return check_score("score", score) >= self.consensus_threshold

    # -- Loop 3 --------------------------------------------------------------------------

    def store_loop3_confidence(
        self,
        principal: Principal,
        phase: str,
        iteration: int,
        confidence: float,
        reasoning: str,
        blockers: Sequence[str] = (),
        metadata: Mapping[str, Any] | None = None,
        ttl: float | None = None,
    ) -> Receipt:
        """Store the principal's own confidence for ``phase``/``iteration`` (PRIVATE).

        ``confidence`` outside [0, 1] is a ``ValidationError`` and nothing is written.
        """
        value = {
            "agent_id": principal.agent_id if isinstance(principal, Principal) else None,
            "phase": check_ident("phase", phase),
            "iteration": check_iteration(iteration),
            "confidence": check_score("confidence", confidence),
            "reasoning": check_text("reasoning", reasoning),
            "blockers": list(check_strings("blockers", blockers)),
            "metadata": check_json_object("metadata", metadata),
            "recorded_at": self._now_us(),
        }
        key = self.key(3, phase, iteration)
        return self._receipts.add(
            self.mem.put(key, value, level=Level.PRIVATE, principal=principal, ttl=ttl)
        )

    def get_loop3_confidence(
        self,
        principal: Principal,
        phase: str,
        iteration: int,
        *,
        agent_id: str | None = None,
        fresh: bool = False,
    ) -> Loop3Confidence | None:
        """The principal's own Loop 3 entry, or ``None``.

        ``agent_id`` names whose entry to read; any agent other than the principal itself
        raises ``AccessDenied`` (and is audited): Loop 3 entries are private.
        ``fresh=True`` answers from the Redis cache (read-your-writes before the commit).
        """
        key = self.key(3, check_ident("phase", phase), check_iteration(iteration))
        scope = None if agent_id is None else f"agent:{agent_id}"
        value = self.mem.get(
            key, level=Level.PRIVATE, principal=principal, scope=scope, fresh=fresh
        )
        agent = principal.agent_id if agent_id is None else agent_id
        return None if value is None else self._loop3(value, key, agent)

    def _loop3(self, v: Any, key: str, agent: str) -> Loop3Confidence:
        try:
            # The write path's own check: a value it would refuse is no Loop 3 record.
            confidence = check_score("confidence", v["confidence"])
            # The record names the place it is stored at, as Loop 2 and 4 records do: a
            # value naming another agent, phase or iteration is not this entry.
            if str(v["agent_id"]) != agent or self.key(3, v["phase"], v["iteration"]) != key:
                raise ValueError("it names another agent, phase or iteration than its key")
            return Loop3Confidence(
                agent_id=str(v["agent_id"]),
                phase=str(v["phase"]),
                iteration=int(v["iteration"]),
                confidence=confidence,
                reasoning=str(v["reasoning"]),
                blockers=tuple(v["blockers"]),
                metadata=dict(v["metadata"]),
                recorded_at=int(v["recorded_at"]),
                gate_passed=confidence >= self.confidence_threshold,
            )
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise TamperedRecord(f"{key} does not hold a Loop 3 record: {exc!r}") from exc

    # -- Loop 2 --------------------------------------------------------------------------

    def store_loop2_consensus(
        self,
        principal: Principal,
        phase: str,
        iteration: int,
        score: float,
        validation_results: Any,
        recommendations: Sequence[str],
    ) -> Receipt:
        """Store the swarm's consensus for ``phase``/``iteration`` (SWARM, this swarm only).

        A principal of another swarm gets ``AccessDenied``; ``score`` outside [0, 1] is a
        ``ValidationError``. ``validation_results`` is any JSON value.
        """
        value = {
            "swarm": self.swarm,
            "phase": check_ident("phase", phase),
            "iteration": check_iteration(iteration),
            "score": check_score("score", score),
            "validation_results": validation_results,
            "recommendations": list(check_strings("recommendations", recommendations)),
            "recorded_by": principal.agent_id if isinstance(principal, Principal) else None,
            "recorded_at": self._now_us(),
        }
        key = self.key(2, phase, iteration)
        return self._receipts.add(
            self.mem.put(key, value, level=Level.SWARM, principal=principal, scope=self.swarm_scope)
        )

    def get_loop2_consensus(
        self, principal: Principal, phase: str, iteration: int | None = None
    ) -> Loop2Consensus | None:
        """The consensus of ``iteration``, or of the highest iteration when ``None``.

        Without ``iteration``, only iteration keys count: another key under the phase's
        prefix, or a record there that is not a Loop 2 record, is skipped (the next lower
        iteration answers) and audited once as ``loop_record_rejected`` (high risk).
        """
        check_ident("phase", phase)
        if iteration is None:
            prefix = self._prefix(2, phase)
            return self._latest_loop2(principal, prefix, prefix)
        key = self.key(2, phase, check_iteration(iteration))
        record = self.mem.get_record(
            key, level=Level.SWARM, principal=principal, scope=self.swarm_scope
        )
        return None if record is None else self._loop2(record)

    def _latest_loop2(self, principal: Principal, base: str, prefix: str) -> Loop2Consensus | None:
        """The Loop 2 record with the highest iteration key under ``base`` (a phase's
        prefix), searching the keys under ``prefix``. Only iteration keys count (``base``
        and 6 digits, zero-padded, so the highest is the newest); any other key under the
        prefix, and a record that is not a Loop 2 record, is skipped and audited (high risk)
        once: any member of the swarm can put one there. A query returns keys in ascending
        order, at most ``_QUERY_LIMIT`` of them: past that, narrow the prefix by the next
        digit, highest first, so iteration 10,000 is found past 0..9,999."""
        records = self.mem.query(
            principal=principal, scope=self.swarm_scope, prefix=prefix, limit=_QUERY_LIMIT
        )
        if len(records) >= _QUERY_LIMIT and len(prefix) < len(base) + _ITERATION_DIGITS:
            for digit in "9876543210":
                found = self._latest_loop2(principal, base, prefix + digit)
                if found is not None:
                    return found
            return None
        for r in reversed(records):
            tail = r.key[len(base) :]
            if len(tail) != _ITERATION_DIGITS or not (tail.isascii() and tail.isdigit()):
                self._reject_once(principal, r, "not an iteration key")
                continue
            try:
                return self._loop2(r)
            except TamperedRecord as exc:
                self._reject_once(principal, r, str(exc))
        return None

    def _reject_once(self, principal: Principal, record: Record, reason: str) -> None:
        """Audit ``record`` as ``loop_record_rejected`` (high risk), once per version. An
        audit row is not encrypted: ``reason`` must quote nothing of a record whose level
        is."""
        if not self._rejected.first(record):
            return
        self._receipts.add(
            self.mem.audit(
                "loop_record_rejected",
                principal=principal,
                risk="high",
                scope=record.scope,
                key=record.key,
                level=int(record.level),
                detail={"reason": reason},
            )
        )

    def _loop2(self, r: Record) -> Loop2Consensus:
        v, key = r.value, r.key
        try:
            # The write path's own check (a ValidationError is a ValueError): a score it
            # would refuse (7.5, "0.95", -4) is no Loop 2 record.
            score = check_score("score", v["score"])
            # The record names the place it is stored at: a value naming another
            # iteration, phase or swarm is not that iteration's consensus.
            if str(v["swarm"]) != self.swarm or self.key(2, v["phase"], v["iteration"]) != key:
                raise ValueError("it names another swarm, phase or iteration than its key")
            return Loop2Consensus(
                swarm=str(v["swarm"]),
                phase=str(v["phase"]),
                iteration=int(v["iteration"]),
                score=score,
                validation_results=v["validation_results"],
                recommendations=tuple(v["recommendations"]),
                # Who wrote the record, as dualmem stored it: any member of the swarm
                # can put a value that names the coordinator.
                recorded_by=r.owner,
                recorded_at=int(v["recorded_at"]),
                gate_passed=score >= self.consensus_threshold,
            )
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise TamperedRecord(f"{key} does not hold a Loop 2 record: {exc!r}") from exc

    # -- Loop 4 --------------------------------------------------------------------------

    def store_loop4_decision(
        self,
        principal: Principal,
        phase: str,
        iteration: int,
        decision: Decision | str,
        reasoning: str,
        deferred_issues: Sequence[str] = (),
        next_actions: Sequence[str] = (),
    ) -> Receipt:
        """Store the product owner's decision (SYSTEM: system principals only, encrypted).

        ``decision`` is PROCEED, DEFER or ESCALATE (a :class:`Decision` or its name).
        """
        value = {
            "project": self.project,
            "swarm": self.swarm,
            "phase": check_ident("phase", phase),
            "iteration": check_iteration(iteration),
            "decision": Decision.parse(decision).value,
            "reasoning": check_text("reasoning", reasoning),
            "deferred_issues": list(check_strings("deferred_issues", deferred_issues)),
            "next_actions": list(check_strings("next_actions", next_actions)),
            "decided_by": principal.agent_id if isinstance(principal, Principal) else None,
            "decided_at": self._now_us(),
        }
        key = self.key(4, phase, iteration)
        return self._receipts.add(self.mem.put(key, value, level=Level.SYSTEM, principal=principal))

    def list_loop4_decisions(
        self, principal: Principal, phase: str | None = None
    ) -> list[Loop4Decision]:
        """Decisions of this swarm (of one ``phase`` if given), oldest first.

        A non-system principal gets ``AccessDenied`` (audited). A record under the prefix
        that is not a decision of the iteration its key names (another key, a value the
        write path would refuse, one naming another project, swarm, phase or iteration)
        is left out and audited once as ``loop_record_rejected`` (high risk).
        """
        prefix = self._prefix(4, None if phase is None else check_ident("phase", phase))
        records = self.mem.query_all(
            principal=principal, level=Level.SYSTEM, prefix=prefix, page=_QUERY_LIMIT
        )
        decisions = []
        for r in records:
            try:
                decisions.append(self._loop4(r))
            except TamperedRecord:
                # Not the exception's text: it can quote the value, which is encrypted.
                self._reject_once(principal, r, "not a Loop 4 decision of its key")
        decisions.sort(key=lambda d: (d.decided_at, d.phase, d.iteration))
        return decisions

    def _loop4(self, r: Record) -> Loop4Decision:
        v, key = r.value, r.key
        try:
            # The record names the place it is stored at, as a Loop 2 record does.
            if (
                str(v["project"]) != self.project
                or str(v["swarm"]) != self.swarm
                or self.key(4, v["phase"], v["iteration"]) != key
            ):
                raise ValueError("it names another project, swarm, phase or iteration")
            return Loop4Decision(
                project=str(v["project"]),
                swarm=str(v["swarm"]),
                phase=str(v["phase"]),
                iteration=int(v["iteration"]),
                decision=Decision.parse(v["decision"]),
                reasoning=str(v["reasoning"]),
                deferred_issues=tuple(v["deferred_issues"]),
                next_actions=tuple(v["next_actions"]),
                decided_by=r.owner,  # the record's writer, not what its value claims
                decided_at=int(v["decided_at"]),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise TamperedRecord(f"{key} does not hold a Loop 4 record: {exc!r}") from exc

    # -- read-your-writes ----------------------------------------------------------------

    def sync(self, timeout: float = 5.0) -> None:
        """Wait until everything this LoopMemory wrote is committed to SQLite."""
        self._receipts.sync(timeout)
