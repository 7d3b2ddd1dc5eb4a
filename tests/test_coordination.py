"""Coordination helpers end to end (LoopMemory, AgentLifecycle, BlockingCoordinator), each
test on fakeredis AND a real redis-server."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import hmac
import json
import math
import re
import secrets
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from acl import Level, Principal
from dualmem import AccessDenied, DualMemory, NotPersisted, TamperedRecord, ValidationError
from dualmem.coordination import (
    Ack,
    AgentLifecycle,
    AgentStatus,
    BlockingCoordinator,
    Decision,
    LoopMemory,
    Signal,
)
from dualmem.coordination._validation import clock_us
from dualmem.errors import ConfigurationError
from dualmem.store import AuditRow

from .conftest import wait_until, worker_of

MakeMem = Callable[..., DualMemory]

SWARM = "phase-1-auth"  # the swarm of the ``coder`` fixture
BOSS = Principal(agent_id="coordinator", swarm=SWARM, project="shop")
PEER = Principal(agent_id="coder-3", swarm=SWARM, project="shop")
SILENT = Principal(agent_id="silent-1", swarm=SWARM, project="shop")
ROGUE = Principal(agent_id="rogue", swarm=SWARM, project="shop")


def audit(mem: DualMemory, event: str) -> list[AuditRow]:
    return [r for r in mem.store.audit_log() if r.event == event]


def raw_sqlite_envelopes(db_path: Path, key_like: str) -> list[bytes]:
    with sqlite3.connect(db_path) as conn:
        rows = conn.execute("SELECT envelope FROM memory WHERE key LIKE ?", (key_like,)).fetchall()
    conn.close()
    return [bytes(r[0]) for r in rows]


def raw_redis_values(raw: redis.Redis) -> bytes:
    out = []
    for key in raw.scan_iter(count=1000):
        kind = raw.type(key)
        if kind == b"string":
            out.append(raw.get(key) or b"")
        elif kind == b"stream":
            for _, fields in raw.xrange(key):
                out.extend(fields.values())
    return b"\n".join(out)


class FakeClock:
    """Epoch seconds that move only when the test says so."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


# -- LoopMemory ----------------------------------------------------------------------------


def test_loop3_entry_is_private_to_its_agent(
    make_mem: MakeMem,
    coder: Principal,
    other: Principal,
    raw_redis: redis.Redis,
    db_path: Path,
) -> None:
    mem = make_mem()
    loops = LoopMemory(mem, swarm=SWARM, project="shop")
    loops.store_loop3_confidence(
        coder,
        "auth",
        1,
        0.85,
        "NEEDLE-loop3-reasoning",
        blockers=["flaky test"],
        metadata={"files": 3},
        ttl=3600,
    )
    fresh = loops.get_loop3_confidence(coder, "auth", 1, fresh=True)  # before the commit
    loops.sync()
    mine = loops.get_loop3_confidence(coder, "auth", 1)
    assert mine is not None and mine == fresh
    assert (mine.agent_id, mine.confidence, mine.gate_passed) == ("coder-1", 0.85, True)
    assert mine.blockers == ("flaky test",) and mine.metadata == {"files": 3}
    # Another agent reading "its own" entry of that iteration finds nothing of coder-1's ...
    assert loops.get_loop3_confidence(other, "auth", 1) is None
    # ... and naming coder-1's entry is denied and audited.
    with pytest.raises(AccessDenied) as denied:
        loops.get_loop3_confidence(other, "auth", 1, agent_id="coder-1")
    mem.sync(denied.value.audit_receipt)  # type: ignore[attr-defined]
    (row,) = audit(mem, "access_denied")
    assert row.actor == "coder-2" and row.risk == "high"
    # PRIVATE is encrypted: the reasoning is in neither Redis nor SQLite as plaintext.
    assert b"NEEDLE" not in raw_redis_values(raw_redis)
    (envelope,) = raw_sqlite_envelopes(db_path, "cfn/%/loop3/%")
    assert b"NEEDLE" not in envelope


def test_loop2_consensus_is_shared_by_the_swarm_and_latest_wins(
    make_mem: MakeMem, coder: Principal, other: Principal
) -> None:
    mem = make_mem()
    loops = LoopMemory(mem, swarm=SWARM, project="shop")
    for iteration, score in ((1, 0.8), (3, 0.95), (2, 0.9)):
        loops.store_loop2_consensus(
            coder, "auth", iteration, score, {"tests": "green", "i": iteration}, ["ship it"]
        )
    loops.store_loop2_consensus(coder, "ui", 7, 0.5, None, [])
    loops.sync()
    latest = loops.get_loop2_consensus(BOSS, "auth")  # any principal of the swarm reads it
    assert latest is not None
    assert (latest.iteration, latest.score, latest.recorded_by) == (3, 0.95, "coder-1")
    assert latest.validation_results == {"tests": "green", "i": 3} and latest.gate_passed
    second = loops.get_loop2_consensus(BOSS, "auth", 2)
    assert second is not None and second.score == 0.9 and second.gate_passed  # 0.90 passes
    first = loops.get_loop2_consensus(BOSS, "auth", 1)
    assert first is not None and not first.gate_passed
    assert loops.get_loop2_consensus(BOSS, "auth", 9) is None
    assert loops.get_loop2_consensus(BOSS, "nothing-yet") is None
    # A principal of another swarm can neither read nor write this swarm's consensus.
    with pytest.raises(AccessDenied):
        loops.get_loop2_consensus(other, "auth")
    with pytest.raises(AccessDenied):
        loops.store_loop2_consensus(other, "auth", 4, 0.99, {}, [])


def test_latest_consensus_is_found_past_one_page_of_iterations(
    make_mem: MakeMem, coder: Principal, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A query returns at most one page of keys (10,000), in ascending order: iteration
    # 10,000 used to lose to 9,999, the last key of the first page. The same search with
    # a page of 5 keys and 12 iterations.
    from dualmem.coordination import loops as loops_module

    monkeypatch.setattr(loops_module, "_QUERY_LIMIT", 5)
    mem = make_mem()
    loops = LoopMemory(mem, swarm=SWARM, project="shop")
    for iteration in range(12):
        loops.store_loop2_consensus(coder, "auth", iteration, iteration / 20, {}, [])
    loops.store_loop2_consensus(coder, "ui", 99, 0.1, {}, [])  # another phase
    loops.sync()
    latest = loops.get_loop2_consensus(BOSS, "auth")
    assert latest is not None and (latest.iteration, latest.score) == (11, 0.55)


def test_junk_under_a_phase_does_not_hide_or_replace_the_latest_consensus(
    make_mem: MakeMem, coder: Principal, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The latest consensus was the record with the highest key under the phase: one junk
    # record there (any swarm member can put one) made get_loop2_consensus raise
    # TamperedRecord for everyone, and a well-formed value at a key that is not an
    # iteration was returned as the newest. Checked with one page, and with pages of 3.
    from dualmem.coordination import loops as loops_module

    mem = make_mem()
    loops = LoopMemory(mem, swarm=SWARM, project="shop")
    for iteration in (1, 2):
        loops.store_loop2_consensus(BOSS, "impl", iteration, 0.9 + iteration / 100, {}, [])
    prefix = f"cfn/shop/{SWARM}/loop2/impl/"
    valid = mem.get(prefix + "000002", level=Level.SWARM, principal=BOSS, fresh=True)
    planted = {
        "notes": "hello",  # junk at a key that is not an iteration
        "zzz": {**valid, "iteration": 7, "score": 0.1},  # well-formed, not an iteration key
        "0000031": {**valid, "iteration": 31},  # one digit too many
        "000003": {"hello": 1},  # an iteration key holding junk
        "000004": {**valid, "iteration": 4, "swarm": "another-swarm"},  # another swarm's
    }
    for tail, value in planted.items():
        mem.put(prefix + tail, value, level=Level.SWARM, principal=ROGUE)
    loops.sync()
    mem.sync(mem.put("sentinel", 1, level=Level.SWARM, principal=BOSS))
    for page in (loops_module._QUERY_LIMIT, 3):
        monkeypatch.setattr(loops_module, "_QUERY_LIMIT", page)
        for _ in range(2):  # read twice, audited once
            latest = loops.get_loop2_consensus(coder, "impl")
            assert latest is not None and (latest.iteration, latest.score) == (2, 0.92)
    assert loops.get_loop2_consensus(coder, "other") is None
    mem.sync(mem.put("sentinel", 2, level=Level.SWARM, principal=BOSS))
    loops.sync()
    rows = audit(mem, "loop_record_rejected")
    assert sorted(r.key for r in rows) == sorted(prefix + t for t in planted)
    assert all(r.risk == "high" and r.actor == "coder-1" for r in rows)


def test_junk_under_loop4_is_left_out_of_the_decisions_and_audited_without_its_value(
    make_mem: MakeMem, system: Principal, db_path: Path
) -> None:
    # One record under the Loop 4 prefix that was not a decision made
    # list_loop4_decisions raise TamperedRecord for every reader, and a decision stored at
    # another iteration's (or swarm's, or project's) key was listed as that one. Loop 2
    # records were already checked against their key; Loop 4 records now are too. The
    # audit row is plaintext and the value SYSTEM (encrypted): it quotes nothing of it.
    mem = make_mem()
    loops = LoopMemory(mem, swarm=SWARM, project="shop")
    loops.store_loop4_decision(system, "impl", 1, "PROCEED", "ship")
    loops.store_loop4_decision(system, "impl", 2, "DEFER", "wait")
    loops.sync()
    prefix = f"cfn/shop/{SWARM}/loop4/impl/"
    valid = mem.get(prefix + "000002", level=Level.SYSTEM, principal=system, fresh=True)
    writer = Principal(agent_id="another-system-agent", system=True)
    planted = {
        "notes": {"hello": "NEEDLE-1"},  # junk at a key that is not an iteration
        "zzz": {**valid, "iteration": 7},  # well-formed, not an iteration key
        "000003": {"decision": "NEEDLE-2"},  # an iteration key holding junk
        "000004": {**valid, "iteration": 4, "decision": "NEEDLE-3"},  # no decision
        "000005": {**valid, "iteration": 6},  # names another iteration
        "000007": {**valid, "iteration": 7, "phase": "design"},  # another phase
        "000008": {**valid, "iteration": 8, "swarm": "another-swarm"},  # another swarm's
        "000009": {**valid, "iteration": 9, "project": "another-project"},  # project
    }
    for tail, value in planted.items():
        mem.put(prefix + tail, value, level=Level.SYSTEM, principal=writer)
    mem.sync(mem.put("sentinel", 1, level=Level.SYSTEM, principal=writer))
    for _ in range(2):  # read twice, audited once
        listed = loops.list_loop4_decisions(system)
        assert [(d.iteration, d.decision) for d in listed] == [
            (1, Decision.PROCEED),
            (2, Decision.DEFER),
        ]
        assert [d.iteration for d in loops.list_loop4_decisions(system, "impl")] == [1, 2]
    loops.sync()
    rows = audit(mem, "loop_record_rejected")
    assert sorted(r.key for r in rows) == sorted(prefix + t for t in planted)
    assert all(r.risk == "high" and r.actor == system.agent_id for r in rows)
    assert all(r.level == int(Level.SYSTEM) for r in rows)
    assert not any("NEEDLE" in r.detail for r in rows)
    files = [db_path, db_path.with_name(db_path.name + "-wal")]
    assert not any(b"NEEDLE" in f.read_bytes() for f in files if f.exists())


def test_loop_records_name_their_writer_not_what_their_value_claims(
    make_mem: MakeMem, system: Principal
) -> None:
    # Any member of the swarm could store a consensus that names the coordinator as its
    # recorder (and any system principal a decision in another's name): the value was
    # believed, not the writer dualmem records with every row.
    mem = make_mem()
    loops = LoopMemory(mem, swarm=SWARM, project="shop")
    forged = {
        "swarm": SWARM, "phase": "impl", "iteration": 1, "score": 0.99,
        "validation_results": {}, "recommendations": [],
        "recorded_by": BOSS.agent_id, "recorded_at": 1,
    }  # fmt: skip
    key = loops.key(2, "impl", 1)
    mem.put(key, forged, level=Level.SWARM, principal=ROGUE, scope=f"swarm:{SWARM}")
    impostor = Principal(agent_id="impostor", system=True)
    loops.store_loop4_decision(impostor, "impl", 1, "PROCEED", "ship")
    mem.sync(mem.put(loops.key(4, "impl", 2), {
        "project": "shop", "swarm": SWARM, "phase": "impl", "iteration": 2,
        "decision": "PROCEED", "reasoning": "r", "deferred_issues": [], "next_actions": [],
        "decided_by": system.agent_id, "decided_at": 2,
    }, level=Level.SYSTEM, principal=impostor))  # fmt: skip
    loops.sync()
    for got in (
        loops.get_loop2_consensus(BOSS, "impl"),
        loops.get_loop2_consensus(BOSS, "impl", 1),
    ):
        assert got is not None and got.recorded_by == ROGUE.agent_id
    assert [d.decided_by for d in loops.list_loop4_decisions(system)] == ["impostor"] * 2


def test_loop4_decisions_are_system_only_encrypted_and_chronological(
    make_mem: MakeMem, coder: Principal, system: Principal, db_path: Path
) -> None:
    mem = make_mem()
    loops = LoopMemory(mem, swarm=SWARM, project="shop")
    # Stored in an order that differs from key order: listing must follow time, not keys.
    loops.store_loop4_decision(system, "impl", 2, "PROCEED", "NEEDLE-decision", (), ["deploy"])
    loops.store_loop4_decision(system, "design", 1, Decision.DEFER, "wait", ["perf"], [])
    loops.store_loop4_decision(system, "impl", 1, "escalate", "conflict", [], ["ask PO"])
    loops.sync()
    listed = loops.list_loop4_decisions(system)
    assert [(d.phase, d.iteration, d.decision) for d in listed] == [
        ("impl", 2, Decision.PROCEED),
        ("design", 1, Decision.DEFER),
        ("impl", 1, Decision.ESCALATE),
    ]
    assert listed[0].next_actions == ("deploy",) and listed[1].deferred_issues == ("perf",)
    assert [d.iteration for d in loops.list_loop4_decisions(system, "impl")] == [2, 1]
    # Another swarm's LoopMemory lists none of these.
    assert LoopMemory(mem, swarm="other", project="shop").list_loop4_decisions(system) == []
    with pytest.raises(AccessDenied):
        loops.list_loop4_decisions(coder)
    with pytest.raises(AccessDenied):
        loops.store_loop4_decision(coder, "impl", 3, "PROCEED", "I decide")
    with pytest.raises(ValidationError, match="PROCEED, DEFER, ESCALATE"):
        loops.store_loop4_decision(system, "impl", 3, "MAYBE", "?")
    envelopes = raw_sqlite_envelopes(db_path, "cfn/%/loop4/%")
    assert len(envelopes) == 3 and not any(b"NEEDLE" in e for e in envelopes)


def test_decisions_stored_within_one_clock_tick_keep_their_order(
    make_mem: MakeMem, system: Principal, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The clock standing still (a coarse clock, or one stepped back): decided_at still
    # grows with each store, so "chronological" is the order they were stored in, not
    # the order of their phases.
    from dualmem.coordination import loops as loops_module

    monkeypatch.setattr(loops_module, "clock_us", lambda: 1_700_000_000_000_000)
    mem = make_mem()
    loops = LoopMemory(mem, swarm=SWARM, project="shop")
    for phase in ("test", "impl", "design"):
        loops.store_loop4_decision(system, phase, 1, "PROCEED", "ok")
    loops.sync()
    listed = loops.list_loop4_decisions(system)
    assert [d.phase for d in listed] == ["test", "impl", "design"]
    assert len({d.decided_at for d in listed}) == 3


@pytest.mark.parametrize(
    "bad",
    [
        -0.01,
        1.0001,
        math.nan,
        math.inf,
        True,
        "0.9",
        None,
        pytest.param(10**400, id="int-too-large-for-a-float"),
        pytest.param(-(10**400), id="negative-int-too-large-for-a-float"),
    ],
)
def test_scores_outside_the_unit_interval_are_rejected_and_nothing_is_stored(
    make_mem: MakeMem, coder: Principal, bad: object
) -> None:
    mem = make_mem()
    loops = LoopMemory(mem, swarm=SWARM, project="shop")
    life = AgentLifecycle(mem, coder)
    life.register_spawn("coder-1", "Coder", "coder", [], Level.PRIVATE)
    life.sync()
    before = mem.changes(0, principal=coder)
    with pytest.raises(ValidationError):
        loops.store_loop3_confidence(coder, "auth", 1, bad, "r")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        loops.store_loop2_consensus(coder, "auth", 1, bad, {}, [])  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        life.update_confidence("coder-1", bad, "r", "auth", 1)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        loops.confidence_gate_passed(bad)  # type: ignore[arg-type]
    sentinel = mem.put("sentinel", 1, level=Level.SWARM, principal=coder)
    mem.sync(sentinel)
    after = mem.changes(before[-1].seq, principal=coder)
    assert [c.key for c in after] == ["sentinel"]


def test_sync_waits_for_every_write_even_when_workers_commit_out_of_order(
    make_mem: MakeMem, coder: Principal, raw_redis: redis.Redis
) -> None:
    writer = make_mem(worker=False)
    life = AgentLifecycle(writer, coder)
    life.register_spawn("coder-1", "Coder", "coder", [], Level.PRIVATE)  # event, then state
    # A worker takes the first command and dies before committing it; another worker
    # commits the rest at once and the first only when it claims it (claim_idle_ms).
    stream = writer.layout.stream(0)
    taken = raw_redis.xreadgroup(writer.settings.group, "dead-worker", {stream: ">"}, count=1)
    assert len(taken[0][1]) == 1  # type: ignore[index]
    make_mem(claim_idle_ms=500)
    # sync() used to wait for the newest receipt per shard only, and returned with the
    # spawn event still unpersisted.
    life.sync(timeout=30)
    assert [e.event for e in life.history("coder-1")] == ["spawn"]


def test_the_receipt_log_drops_committed_receipts_and_keeps_the_rest(
    make_mem: MakeMem, coder: Principal
) -> None:
    from dualmem.coordination._validation import ReceiptLog

    mem = make_mem(worker=False)
    log = ReceiptLog(mem)
    log._prune_at = 3
    worker = make_mem()
    done = [mem.put(f"k{i}", i, level=Level.SWARM, principal=coder) for i in range(2)]
    for r in done:
        mem.sync(r)
        log.add(r)
    worker.close()  # no worker from here on: the next put stays uncommitted
    pending = mem.put("later", 1, level=Level.SWARM, principal=coder)
    log.add(pending)  # the third: prunes the two committed ones, keeps this one
    assert log._outstanding == [pending]


def test_a_receipt_logs_sync_waits_for_all_its_receipts_within_one_timeout(
    make_mem: MakeMem, coder: Principal, monkeypatch: pytest.MonkeyPatch
) -> None:
    # sync(timeout) is one deadline for every receipt: given each receipt the whole
    # timeout, a sync of n receipts each committed just in time took n times as long.
    from dualmem.coordination._validation import ReceiptLog

    mem = make_mem()
    log = ReceiptLog(mem)
    for i in range(3):
        log.add(mem.put(f"k{i}", i, level=Level.SWARM, principal=coder))
    waits: list[float] = []
    real_sync = mem.sync

    def sync(receipt: Any, timeout: float = 5.0) -> Any:
        waits.append(timeout)
        return real_sync(receipt, timeout=timeout)

    monkeypatch.setattr(mem, "sync", sync)
    log.sync(30)
    assert len(waits) == 3 and all(w < 30 for w in waits)  # what is left of one deadline
    assert log._outstanding == []


def test_a_receipt_added_while_a_receipt_log_syncs_is_kept_for_the_next_sync(
    make_mem: MakeMem, coder: Principal, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another thread's write made during a sync was not waited for by it: emptying the
    # log afterwards dropped its receipt, and the next sync returned before its commit.
    from dualmem.coordination._validation import ReceiptLog

    mem = make_mem()
    log = ReceiptLog(mem)
    log.add(mem.put("first", 1, level=Level.SWARM, principal=coder))
    late: list[Any] = []
    real_sync = mem.sync

    def sync(receipt: Any, timeout: float = 5.0) -> Any:
        if not late:  # another thread writes while this sync waits
            late.append(log.add(mem.put("late", 2, level=Level.SWARM, principal=coder)))
        return real_sync(receipt, timeout=timeout)

    monkeypatch.setattr(mem, "sync", sync)
    log.sync(10)
    assert log._outstanding == late


def test_a_receipt_log_full_of_uncommitted_receipts_prunes_again_only_after_as_many_more(
    make_mem: MakeMem, coder: Principal, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With no worker nothing commits, and a prune keeps every receipt: pruning again at
    # the next add (the bound not moved past what is kept) asked SQLite for the status of
    # every outstanding receipt on every write, thousands of queries a put.
    from dualmem.coordination._validation import ReceiptLog

    monkeypatch.setattr(ReceiptLog, "_PRUNE_AT", 2)
    mem = make_mem(worker=False)
    log = ReceiptLog(mem)
    for i in range(2):
        log.add(mem.put(f"k{i}", i, level=Level.SWARM, principal=coder))
    assert len(log._outstanding) == 2 and log._prune_at == 4  # pruned, kept both
    log.add(mem.put("k2", 2, level=Level.SWARM, principal=coder))
    assert log._prune_at == 4  # no prune before the fourth
    log.add(mem.put("k3", 3, level=Level.SWARM, principal=coder))
    assert len(log._outstanding) == 4 and log._prune_at == 8


def test_gate_thresholds_are_configurable(make_mem: MakeMem, coder: Principal) -> None:
    mem = make_mem()
    default = LoopMemory(mem, swarm=SWARM, project="shop")
    assert (default.confidence_threshold, default.consensus_threshold) == (0.75, 0.90)
    assert default.confidence_gate_passed(0.75) and not default.confidence_gate_passed(0.7499)
    assert default.confidence_gate_passed([0.8, 0.9, 0.75])
    assert not default.confidence_gate_passed([0.8, 0.74])
    assert not default.confidence_gate_passed([])  # nobody reported: the gate is not passed
    assert default.consensus_gate_passed(0.9) and not default.consensus_gate_passed(0.8999)
    lenient = LoopMemory(
        mem, swarm=SWARM, project="shop", confidence_threshold=0.5, consensus_threshold=0.6
    )
    assert lenient.confidence_gate_passed(0.5) and lenient.consensus_gate_passed(0.6)
    lenient.store_loop3_confidence(coder, "auth", 1, 0.55, "ok")
    lenient.sync()
    as_lenient = lenient.get_loop3_confidence(coder, "auth", 1)
    as_default = default.get_loop3_confidence(coder, "auth", 1)
    assert as_lenient is not None and as_lenient.gate_passed
    assert as_default is not None and not as_default.gate_passed
    for bad in (1.5, -0.1, math.nan):
        with pytest.raises(ValidationError):
            LoopMemory(mem, swarm=SWARM, project="shop", confidence_threshold=bad)
        with pytest.raises(ValidationError):
            LoopMemory(mem, swarm=SWARM, project="shop", consensus_threshold=bad)
    # A confidence read back exactly at the threshold passes, as the gate says it does.
    lenient.store_loop3_confidence(coder, "auth", 2, 0.5, "just")
    lenient.sync()
    at_threshold = lenient.get_loop3_confidence(coder, "auth", 2)
    assert at_threshold is not None and at_threshold.gate_passed
    with pytest.raises(ValidationError, match="'/'"):
        LoopMemory(mem, swarm="a/b", project="shop")
    with pytest.raises(ValidationError, match="'/'"):
        default.store_loop3_confidence(coder, "auth/x", 1, 0.8, "r")


# -- AgentLifecycle ------------------------------------------------------------------------


def test_agent_lifecycle_records_each_step_and_refuses_updates_after_termination(
    make_mem: MakeMem,
) -> None:
    mem = make_mem()
    clock = FakeClock()
    life = AgentLifecycle(mem, BOSS, heartbeat_timeout=30, clock=clock)
    life.register_spawn("coder-1", "Coder one", "coder", ["python", "sql"], Level.PRIVATE)
    life.register_spawn("coder-2", "Coder two", "coder", ["go"], "team")
    clock.now += 1
    life.update_confidence("coder-1", 0.82, "tests pass", "auth", 1)
    life.heartbeat("coder-2")
    clock.now += 1
    life.register_termination("coder-1", "phase complete")
    life.sync()
    one = life.agent("coder-1")
    assert one is not None and one.status is AgentStatus.TERMINATED
    assert (one.confidence, one.phase, one.iteration) == (0.82, "auth", 1)
    assert one.capabilities == ("python", "sql") and one.level is Level.PRIVATE
    assert one.end_reason == "phase complete"
    two = life.agent("coder-2")
    assert two is not None and two.status is AgentStatus.ACTIVE and two.level is Level.TEAM
    assert [e.event for e in life.history("coder-1")] == ["spawn", "confidence", "terminate"]
    assert [e.event for e in life.history("coder-1", limit=1)] == ["terminate"]
    (conf,) = life.history("coder-1", event_types=["confidence"])
    assert conf.detail == {
        "confidence": 0.82,
        "reasoning": "tests pass",
        "phase": "auth",
        "iteration": 1,
    }
    assert [e.event for e in life.history("coder-2")] == ["spawn"]  # heartbeats stay out
    assert [a.agent_id for a in life.list_agents()] == ["coder-1", "coder-2"]
    assert [a.agent_id for a in life.list_agents(status="terminated")] == ["coder-1"]
    assert [a.agent_id for a in life.list_agents(AgentStatus.ACTIVE)] == ["coder-2"]
    with pytest.raises(ValidationError):
        life.list_agents(status="sleeping")
    # A terminated agent cannot be updated; nothing is written by the attempts.
    before = mem.changes(0, principal=BOSS)
    for attempt in (
        lambda: life.update_confidence("coder-1", 0.9, "late", "auth", 2),
        lambda: life.heartbeat("coder-1"),
        lambda: life.register_termination("coder-1", "again"),
        lambda: life.heartbeat("nobody"),
        lambda: life.register_spawn("coder-2", "dup", "coder", [], Level.PRIVATE),
    ):
        with pytest.raises(ValidationError):
            attempt()
    sentinel = mem.put("sentinel", 1, level=Level.SWARM, principal=BOSS)
    mem.sync(sentinel)
    assert [c.key for c in mem.changes(before[-1].seq, principal=BOSS)] == ["sentinel"]
    # A terminated agent may be spawned again: a new life, the old history kept.
    life.register_spawn("coder-1", "Coder one", "coder", ["python"], Level.PRIVATE)
    life.sync()
    again = life.agent("coder-1")
    assert again is not None and again.status is AgentStatus.SPAWNED
    assert [e.event for e in life.history("coder-1")][-2:] == ["terminate", "spawn"]
    # A confidence is a sign of life as a heartbeat is: spawned, then active.
    life.update_confidence("coder-1", 0.5, "started", "auth", 3)
    now_active = life.agent("coder-1")
    assert now_active is not None and now_active.status is AgentStatus.ACTIVE


def test_an_agents_history_holds_none_of_an_agent_whose_id_it_begins(make_mem: MakeMem) -> None:
    # Events live under lifecycle/events/<agent_id>/: coder-1's history read the prefix
    # lifecycle/events/coder-1, coder-10's events with it, if the slash were left out.
    mem = make_mem()
    life = AgentLifecycle(mem, BOSS, heartbeat_timeout=30)
    for agent in ("coder-1", "coder-10", "coder-1x"):
        life.register_spawn(agent, agent, "coder", [], Level.SWARM)
    life.register_termination("coder-10", "done")
    life.sync()
    assert [(e.agent_id, e.event) for e in life.history("coder-1")] == [("coder-1", "spawn")]
    assert [e.event for e in life.history("coder-10")] == ["spawn", "terminate"]


@pytest.mark.parametrize("bad", [0, -1, math.inf, math.nan, True, "30"])
def test_a_heartbeat_timeout_that_is_no_positive_number_of_seconds_is_refused(
    make_mem: MakeMem, bad: object
) -> None:
    # 0 marked every agent dead at its first stale_agents(); infinity made it raise
    # OverflowError (int(inf * 1e6)).
    with pytest.raises(ValidationError, match="heartbeat_timeout"):
        AgentLifecycle(make_mem(), BOSS, heartbeat_timeout=bad)  # type: ignore[arg-type]


def test_a_state_record_naming_another_agent_is_refused_and_redirects_no_write(
    make_mem: MakeMem,
) -> None:
    # The state at lifecycle/agents/<id> was believed whatever agent it named: a member's
    # record at helper's key naming the terminated coder-1 made the keeper's own
    # heartbeat("helper") write coder-1's key, "active" again with the planted fields.
    mem = make_mem()
    life = AgentLifecycle(mem, BOSS, heartbeat_timeout=30)
    life.register_spawn("helper", "Helper", "coder", [], Level.SWARM)
    life.register_spawn("coder-1", "Coder", "coder", ["python"], Level.SWARM)
    life.register_termination("coder-1", "phase complete")
    life.sync()
    c1 = mem.get("lifecycle/agents/coder-1", level=Level.SWARM, principal=BOSS)
    planted = {**c1, "status": "active", "ended_at": None, "capabilities": ["shell"]}
    mem.sync(mem.put("lifecycle/agents/helper", planted, level=Level.SWARM, principal=ROGUE))
    for attempt in (
        lambda: life.agent("helper"),
        lambda: life.heartbeat("helper"),
        lambda: life.update_confidence("helper", 0.9, "ok", "auth", 1),
        lambda: life.register_termination("helper", "done"),
    ):
        with pytest.raises(TamperedRecord, match="names agent 'coder-1'"):
            attempt()
    life.sync()
    mem.sync(mem.put("sentinel", 1, level=Level.SWARM, principal=BOSS))
    record = mem.get_record("lifecycle/agents/coder-1", level=Level.SWARM, principal=BOSS)
    assert record is not None and record.value == c1  # not written again
    one = life.agent("coder-1")
    assert one is not None and one.status is AgentStatus.TERMINATED
    assert one.capabilities == ("python",)
    assert [e.event for e in life.history("coder-1")] == ["spawn", "terminate"]
    assert [e.event for e in life.history("helper")] == ["spawn"]
    (row,) = audit(mem, "agent_record_rejected")  # four reads of one version: one row
    assert row.key == "lifecycle/agents/helper" and row.risk == "high"
    assert "names agent 'coder-1'" in json.loads(row.detail)["reason"]
    # Another version of the record (read from the cache: no stream id) is audited again.
    planted = {**planted, "agent_id": "coder-9"}
    mem.sync(mem.put("lifecycle/agents/helper", planted, level=Level.SWARM, principal=ROGUE))
    for _ in range(2):
        with pytest.raises(TamperedRecord, match="names agent 'coder-9'"):
            life.heartbeat("helper")
    life.sync()
    mem.sync(mem.put("sentinel", 2, level=Level.SWARM, principal=BOSS))
    assert len(audit(mem, "agent_record_rejected")) == 2


def test_spawn_over_a_record_that_is_not_the_agents_state_starts_a_new_life(
    make_mem: MakeMem,
) -> None:
    # One junk record at lifecycle/agents/<id> (any swarm member can put one) made
    # register_spawn(<id>) raise TamperedRecord for ever, unaudited: the id could never be
    # registered again, though list_agents skipped the record as no agent.
    mem = make_mem()
    life = AgentLifecycle(mem, BOSS, heartbeat_timeout=30)
    life.register_spawn("other", "Other", "coder", [], Level.SWARM)
    life.sync()
    other = mem.get("lifecycle/agents/other", level=Level.SWARM, principal=BOSS)
    planted = {
        "lifecycle/agents/coder-1": {"hello": 1},
        "lifecycle/agents/coder-2": {**other, "status": "active"},  # names "other"
    }
    for key, value in planted.items():
        mem.sync(mem.put(key, value, level=Level.SWARM, principal=ROGUE))
    assert [a.agent_id for a in life.list_agents()] == ["other"]
    for agent_id in ("coder-1", "coder-2"):
        with pytest.raises(TamperedRecord):  # an unknown, garbled agent: not heartbeated
            life.heartbeat(agent_id)
        life.register_spawn(agent_id, "Coder", "coder", ["python"], Level.SWARM)
        with pytest.raises(ValidationError, match="already spawned"):  # alive now
            life.register_spawn(agent_id, "Coder", "coder", ["python"], Level.SWARM)
        life.heartbeat(agent_id)
    life.sync()
    mem.sync(mem.put("sentinel", 1, level=Level.SWARM, principal=BOSS))
    assert [a.agent_id for a in life.list_agents()] == ["coder-1", "coder-2", "other"]
    for agent_id in ("coder-1", "coder-2"):
        info = life.agent(agent_id)
        assert info is not None and info.status is AgentStatus.ACTIVE
        assert info.agent_id == agent_id and info.capabilities == ("python",)
        assert [e.event for e in life.history(agent_id)] == ["spawn"]
    other_now = life.agent("other")
    assert other_now is not None and other_now.status is AgentStatus.SPAWNED
    rows = audit(mem, "agent_record_rejected")
    assert sorted(r.key for r in rows) == sorted(planted)  # the junk, audited once each
    assert all(r.risk == "high" for r in rows)


@pytest.mark.parametrize("committed_between", [False, True], ids=["cache-only", "committed"])
def test_the_same_junk_planted_again_after_a_spawn_is_audited_again(
    make_mem: MakeMem, committed_between: bool
) -> None:
    # Each planting is a version of its own: one read from the cache only, replaced by a
    # spawn, must not keep a second planting of the same value out of the audit log.
    # Both orders run by hand: with the worker running, this test failed about one run
    # in twelve, when the worker committed the first planting between the heartbeat's
    # read (from the cache) and the spawn's (which found it committed).
    mem = make_mem(worker=False)
    persist = persistence_by_hand(mem)
    life = AgentLifecycle(mem, BOSS)
    junk = {"hello": 1}
    mem.put("lifecycle/agents/helper", junk, level=Level.SWARM, principal=ROGUE)
    with pytest.raises(TamperedRecord):
        life.heartbeat("helper")  # read from the cache: nothing committed yet
    if committed_between:
        persist()
    life.register_spawn("helper", "Helper", "coder", [], Level.SWARM)
    persist()
    mem.put("lifecycle/agents/helper", junk, level=Level.SWARM, principal=ROGUE)
    persist()
    assert life.list_agents() == []
    with pytest.raises(TamperedRecord):
        life.heartbeat("helper")
    persist()
    # Read in the cache and then committed, the first planting is two versions to the
    # audit (no stream id in the cache): one row more, never one less (the README's
    # "Agent lifecycle records trust any member of their scope" says why).
    assert len(audit(mem, "agent_record_rejected")) == (3 if committed_between else 2)


def test_history_keeps_the_newest_events_past_one_page(
    make_mem: MakeMem, monkeypatch: pytest.MonkeyPatch
) -> None:
    # history read one page of events (10,000, the oldest), so limit= and event_types=
    # answered from the oldest ones past that. The same with a page of 4 records.
    from dualmem.coordination import lifecycle as lifecycle_module

    monkeypatch.setattr(lifecycle_module, "_QUERY_LIMIT", 4)
    mem = make_mem()
    life = AgentLifecycle(mem, BOSS, record_heartbeats=True, heartbeat_timeout=30)
    life.register_spawn("coder-1", "Coder", "coder", [], Level.PRIVATE)
    for _ in range(13):
        life.heartbeat("coder-1")
    life.register_termination("coder-1", "done")
    life.sync()
    assert [e.event for e in life.history("coder-1", limit=1)] == ["terminate"]
    assert [e.event for e in life.history("coder-1", event_types=["terminate"])] == ["terminate"]
    everything = life.history("coder-1")
    assert [e.event for e in everything] == ["spawn"] + ["heartbeat"] * 13 + ["terminate"]
    assert [e.at for e in everything] == sorted(e.at for e in everything)


def test_history_refuses_a_limit_as_dualmemory_history_does(
    make_mem: MakeMem, coder: Principal
) -> None:
    # AgentLifecycle.history(limit=-1) returned [] where DualMemory.history raises.
    mem = make_mem()
    life = AgentLifecycle(mem, BOSS, heartbeat_timeout=30)
    life.register_spawn("coder-1", "Coder", "coder", [], Level.PRIVATE)
    life.sync()
    for bad in (-1, True, "1", 1.0, 2**63):
        with pytest.raises(ValidationError, match="limit must be an int from 0"):
            life.history("coder-1", limit=bad)  # type: ignore[arg-type]
        with pytest.raises(ValidationError, match="limit must be an int from 0"):
            mem.history("k", level=Level.PRIVATE, principal=coder, limit=bad)  # type: ignore[arg-type]
    assert life.history("coder-1", limit=0) == []
    assert [e.event for e in life.history("coder-1", limit=1)] == ["spawn"]


def test_lifecycle_state_outlives_cache_ttl_while_the_worker_is_behind(
    make_mem: MakeMem,
) -> None:
    # Updates read the state with fresh=True. Its cache entry used to expire after
    # cache_ttl; with the worker further behind than that, the read fell back to an older
    # committed state: a terminated agent's heartbeat wrote "active" over "terminated",
    # and a second spawn of a living agent was let through.
    mem = make_mem(worker=False, cache_ttl=1)
    life = AgentLifecycle(mem, BOSS, heartbeat_timeout=30)
    persist = persistence_by_hand(mem)
    life.register_spawn("ended", "Ended", "coder", [], Level.PRIVATE)
    life.register_spawn("again", "Again", "coder", [], Level.PRIVATE)
    life.register_termination("again", "done")
    persist()
    life.register_termination("ended", "done")  # not committed from here on ...
    life.register_spawn("again", "Again", "coder", [], Level.PRIVATE)
    time.sleep(1.3)  # ... for longer than cache_ttl
    with pytest.raises(ValidationError, match="terminated"):
        life.heartbeat("ended")
    with pytest.raises(ValidationError, match="already spawned"):
        life.register_spawn("again", "Again", "coder", [], Level.PRIVATE)
    make_mem()  # the worker is back
    life.sync(timeout=10)
    ended, again = life.agent("ended"), life.agent("again")
    assert ended is not None and ended.status is AgentStatus.TERMINATED
    assert again is not None and again.status is AgentStatus.SPAWNED
    assert [e.event for e in life.history("ended")] == ["spawn", "terminate"]
    assert [e.event for e in life.history("again")] == ["spawn", "terminate", "spawn"]


def persistence_by_hand(mem: DualMemory) -> Callable[[], None]:
    """For a DualMemory made with ``worker=False``: a call commits what is in its streams,
    so the test controls what SQLite has seen."""
    worker = worker_of(mem, "test")

    def persist() -> None:
        while worker.step():
            pass

    return persist


def test_a_dead_agents_reason_gives_its_silence_to_a_tenth_of_a_second(make_mem: MakeMem) -> None:
    # The reason gave what a round to the millisecond left ("no heartbeat for 31.032s" in
    # one run, "31.2s" in the next): a reader comparing reasons saw formats, not times.
    # The event's silent_s keeps the milliseconds.
    mem = make_mem(worker=False)
    persist = persistence_by_hand(mem)
    clock = FakeClock()
    life = AgentLifecycle(mem, BOSS, heartbeat_timeout=30, clock=clock)
    life.register_spawn("hung", "hung", "coder", [], Level.SWARM)
    persist()
    clock.now += 31.032
    assert [a.end_reason for a in life.stale_agents()] == ["no heartbeat for 31.0s"]
    persist()
    (dead,) = life.history("hung", event_types=["dead"])
    assert dead.detail["silent_s"] == 31.032


def test_missed_heartbeats_mark_an_agent_dead(make_mem: MakeMem) -> None:
    mem = make_mem(worker=False)
    persist = persistence_by_hand(mem)
    clock = FakeClock()
    life = AgentLifecycle(mem, BOSS, heartbeat_timeout=30, record_heartbeats=True, clock=clock)
    for agent in ("alive", "hung", "late"):
        life.register_spawn(agent, agent, "coder", [], Level.SWARM)
    persist()
    clock.now += 20
    life.heartbeat("alive")
    persist()
    clock.now += 20  # t=40: hung and late last heard of at t=0
    life.heartbeat("late")  # in Redis only: SQLite still says t=0
    dead = life.stale_agents()
    assert [a.agent_id for a in dead] == ["hung"]
    persist()
    hung = life.agent("hung")
    assert hung is not None and hung.status is AgentStatus.DEAD
    assert hung.end_reason == "no heartbeat for 40.0s"
    assert [e.event for e in life.history("hung")] == ["spawn", "dead"]
    assert [e.event for e in life.history("late", event_types=["heartbeat"])] == ["heartbeat"]
    (row,) = audit(mem, "agent_dead")
    assert row.risk == "medium" and json.loads(row.detail)["agent_id"] == "hung"
    assert life.stale_agents() == []  # already marked: not again
    clock.now += 15  # t=55: alive last beat at 20, late at 40
    assert [a.agent_id for a in life.stale_agents()] == ["alive"]
    with pytest.raises(ValidationError, match="dead"):
        life.heartbeat("hung")
    persist()
    assert [a.agent_id for a in life.list_agents(status="dead")] == ["alive", "hung"]


def test_events_expire_after_event_ttl_and_the_state_never_does(make_mem: MakeMem) -> None:
    # No test gave an event_ttl: events written without it (kept for good) went
    # unnoticed, and a bad one was refused only by the first event's put.
    mem = make_mem()
    for bad in (0, -1, math.inf, "60", True):
        with pytest.raises(ValidationError, match="ttl"):
            AgentLifecycle(mem, BOSS, event_ttl=bad)
    life = AgentLifecycle(mem, BOSS, event_ttl=60)
    before = int(time.time() * 1000)
    life.register_spawn("coder-1", "Coder", "coder", [], Level.SWARM)
    life.update_confidence("coder-1", 0.8, "ok", "impl", 1)
    life.sync(timeout=10)
    after = int(time.time() * 1000)
    records = mem.query(principal=BOSS, level=Level.SWARM, prefix="lifecycle/")
    events = [r for r in records if r.key.startswith("lifecycle/events/")]
    (state,) = [r for r in records if r.key.startswith("lifecycle/agents/")]
    assert len(events) == 2 and state.expires_at is None
    for r in events:
        assert r.expires_at is not None and before + 60_000 <= r.expires_at <= after + 60_000


def test_stale_agents_go_by_the_state_the_worker_has_not_persisted_yet(
    make_mem: MakeMem,
) -> None:
    # Candidates come from SQLite, the verdict from the Redis cache. No test had the cache
    # disagree with SQLite in these ways (mutation check): an agent terminated in the
    # cache was marked dead over "terminated"; junk in the cache for one agent made
    # stale_agents raise for all; a confidence did not count as a sign of life; the
    # silence was measured from SQLite's older heartbeat; a second junk value in the
    # cache was taken for the first, committed one and not audited.
    mem = make_mem(worker=False)
    persist = persistence_by_hand(mem)
    clock = FakeClock()
    life = AgentLifecycle(mem, BOSS, heartbeat_timeout=30, clock=clock)
    for agent in ("ended", "junked", "beaten", "confident"):
        life.register_spawn(agent, agent, "coder", [], Level.SWARM)
    persist()
    clock.now += 20  # t=20
    life.update_confidence("confident", 0.9, "on track", "impl", 1)
    persist()
    life.heartbeat("beaten")  # from here on, nothing reaches SQLite: it still says t=0
    life.register_termination("ended", "done")
    mem.put("lifecycle/agents/junked", {"junk": 1}, level=Level.SWARM, principal=ROGUE)
    clock.now += 20  # t=40
    assert life.stale_agents() == []
    ended = life.agent("ended")
    assert ended is not None and ended.status is AgentStatus.TERMINATED
    clock.now += 20  # t=60: beaten and confident last heard of at t=20
    dead = life.stale_agents()
    assert [(a.agent_id, a.end_reason) for a in dead] == [
        ("beaten", "no heartbeat for 40.0s"),
        ("confident", "no heartbeat for 40.0s"),
    ]
    mem.put("lifecycle/agents/junked", {"junk": 2}, level=Level.SWARM, principal=ROGUE)
    with pytest.raises(TamperedRecord):
        life.agent("junked")
    persist()
    life.sync(timeout=10)
    rejected = [r.key for r in audit(mem, "agent_record_rejected")]
    assert rejected == ["lifecycle/agents/junked"] * 2  # each junk value once


# -- BlockingCoordinator -------------------------------------------------------------------


@pytest.fixture
def secret() -> bytes:
    return secrets.token_bytes(32)


def test_every_target_acks_once_and_a_second_ack_is_a_no_op(
    make_mem: MakeMem, coder: Principal, secret: bytes
) -> None:
    mem = make_mem()
    boss = BlockingCoordinator(mem, BOSS, secret)
    signal = boss.send_signal(["coder-1", "coder-3"], "pause", {"reason": "review", "n": 1.5})
    one = BlockingCoordinator(mem, coder, secret)
    three = BlockingCoordinator(mem, PEER, secret)
    # Targets discover the signal themselves.
    boss.sync()
    assert [s.id for s in one.pending_signals()] == [signal.id]
    first = one.acknowledge_signal(signal)
    second = one.acknowledge_signal(signal.id)  # by id, and again: a no-op
    assert second == first
    three.acknowledge_signal(signal)
    result = boss.wait_for_acks(signal, timeout=10)
    assert result.complete and result.acked == ("coder-1", "coder-3") and result.retries == 0
    assert one.pending_signals() == []
    for c in (one, three, boss):
        c.sync()
    ack_key = f"coord/acks/{signal.id}/coder-1"
    assert [h.op for h in mem.history(ack_key, level=Level.SWARM, principal=coder)] == ["put"]
    assert [r.actor for r in audit(mem, "signal_ack")] == ["coder-1", "coder-3"]
    assert all(r.risk == "low" for r in audit(mem, "signal_ack"))
    assert len(audit(mem, "signal_sent")) == 1 and len(audit(mem, "signal_complete")) == 1
    # Only targets may ACK.
    with pytest.raises(ValidationError, match="not addressed"):
        BlockingCoordinator(mem, ROGUE, secret).acknowledge_signal(signal)


def test_a_signal_id_names_its_send_time_in_utc(
    make_mem: MakeMem, secret: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The id's time was the sender's local time: two senders in other time zones (or one
    # across a DST change) made ids naming times hours apart from their sends, so the
    # ids told nothing reliable about when a signal was sent.
    monkeypatch.setenv("TZ", "XST-05:45")  # POSIX form, no tz database needed: UTC+05:45
    time.tzset()
    try:
        signal = BlockingCoordinator(make_mem(), BOSS, secret).send_signal(["coder-1"], "go")
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    stamp, _, _ = signal.id.partition("-")
    sent = datetime.datetime.strptime(stamp, "%Y%m%dT%H%M%S").replace(tzinfo=datetime.UTC)
    assert int(sent.timestamp()) == signal.sent_at // 1_000_000


def test_a_second_ack_by_another_object_is_a_no_op_once_the_first_is_committed(
    make_mem: MakeMem, coder: Principal, secret: bytes
) -> None:
    # What "ACKing twice is a no-op" means across objects (a restarted target): before
    # the first ACK is committed a new object cannot tell it from a planted copy in the
    # cache, so it writes its own (both count); once committed, it writes nothing.
    mem = make_mem(worker=False)
    boss = BlockingCoordinator(mem, BOSS, secret)
    signal = boss.send_signal(["coder-1"], "pause")
    persist = persistence_by_hand(mem)
    persist()
    first = BlockingCoordinator(mem, coder, secret).acknowledge_signal(signal)
    second = BlockingCoordinator(mem, coder, secret).acknowledge_signal(signal)
    assert second != first  # written again: the first was not committed
    persist()
    assert BlockingCoordinator(mem, coder, secret).acknowledge_signal(signal) == second
    persist()
    ack_key = f"coord/acks/{signal.id}/coder-1"
    assert [h.op for h in mem.history(ack_key, level=Level.SWARM, principal=coder)] == [
        "put",
        "put",
    ]
    assert len(audit(mem, "signal_ack")) == 2
    assert boss.wait_for_acks(signal, timeout=1).acked == ("coder-1",)


def test_wait_for_acks_times_out_for_a_silent_target(
    make_mem: MakeMem, coder: Principal, secret: bytes
) -> None:
    mem = make_mem()
    boss = BlockingCoordinator(mem, BOSS, secret, max_retries=2)
    signal = boss.send_signal(["coder-1", "silent-1"], "checkpoint", None)
    BlockingCoordinator(mem, coder, secret).acknowledge_signal(signal)
    began_ms = int(time.time() * 1000)
    result = boss.wait_for_acks(signal, timeout=0.6)
    assert not result.complete
    assert result.acked == ("coder-1",) and result.missing == ("silent-1",)
    assert result.rejected == {} and result.retries == 2
    boss.sync()
    stored = boss.get_signal(signal.id)
    assert stored is not None and stored.attempt == 3  # sent once, re-sent twice
    assert boss.signal_problem(stored) is None  # every re-send is signed again
    retries = audit(mem, "signal_retry")
    assert [json.loads(r.detail)["attempt"] for r in retries] == [2, 3]
    assert all(r.risk == "medium" and json.loads(r.detail)["missing"] for r in retries)
    # Spread over the timeout: the i-th re-send not before i/3 of it (a bound a slow
    # machine cannot break, only later re-sends; all of them early went unnoticed).
    assert [r.ts >= began_ms + 200 * (i + 1) for i, r in enumerate(retries)] == [True] * 2
    (timeout,) = audit(mem, "signal_timeout")
    assert timeout.risk == "medium" and json.loads(timeout.detail)["missing"] == ["silent-1"]
    assert json.loads(timeout.detail)["timeout_s"] == 0.6
    # The silent target still sees the re-sent signal as pending; acking late completes it.
    silent = BlockingCoordinator(mem, SILENT, secret)
    assert [s.attempt for s in silent.pending_signals()] == [3]
    silent.acknowledge_signal(silent.pending_signals()[0])
    assert boss.wait_for_acks(signal, timeout=10).complete


def test_a_wait_with_no_time_left_still_makes_every_re_send(
    make_mem: MakeMem, coder: Principal, secret: bytes
) -> None:
    # A process starved past every retry time (here: a timeout of 0, all of them past at
    # once) still re-sends max_retries times before it gives up. A loop that went on to
    # the deadline after a re-send stopped after the first (mutation check). A target
    # named twice is one target.
    mem = make_mem()
    boss = BlockingCoordinator(mem, BOSS, secret, max_retries=3)
    signal = boss.send_signal(["coder-3", "coder-1", "coder-3", "silent-1"], "pause", None)
    assert signal.targets == ("coder-3", "coder-1", "silent-1")
    one = BlockingCoordinator(mem, coder, secret)
    one.acknowledge_signal(signal)
    one.sync()  # ACKs count as committed
    boss.sync()
    result = boss.wait_for_acks(signal, timeout=0)
    assert (result.acked, result.missing, result.retries) == (
        ("coder-1",),
        ("coder-3", "silent-1"),
        3,
    )
    for member in (SILENT, PEER):
        BlockingCoordinator(mem, member, secret).acknowledge_signal(signal.id)
    late = boss.wait_for_acks(signal, timeout=10)
    assert late.complete and late.acked == ("coder-3", "coder-1", "silent-1")


def test_signals_and_acks_expire_after_signal_ttl(
    make_mem: MakeMem, coder: Principal, secret: bytes
) -> None:
    # No test looked at the records' expiry: signals and ACKs kept for good (signal_ttl
    # not passed on to their puts) went unnoticed.
    mem = make_mem()
    boss = BlockingCoordinator(mem, BOSS, secret, signal_ttl=120)
    before = int(time.time() * 1000)
    signal = boss.send_signal(["coder-1"], "pause", None)
    BlockingCoordinator(mem, coder, secret, signal_ttl=120).acknowledge_signal(signal)
    boss.sync()
    mem.settle(10)
    after = int(time.time() * 1000)
    records = mem.query(principal=BOSS, level=Level.SWARM, prefix="coord/signals/")
    records += mem.query(principal=BOSS, level=Level.SWARM, prefix="coord/acks/")
    assert len(records) == 2, [r.key for r in records]
    for r in records:
        assert r.expires_at is not None and before + 120_000 <= r.expires_at <= after + 120_000


def test_a_signal_under_a_key_id_it_does_not_know_is_named_as_such(
    make_mem: MakeMem, secret: bytes
) -> None:
    # Not "MAC does not verify": the key id is named, so an operator sees a participant
    # with another secret (or one not rotated in yet) rather than a forgery.
    mem = make_mem()
    signal = BlockingCoordinator(mem, BOSS, secrets.token_bytes(32)).send_signal(
        ["coder-1"], "pause", None
    )
    problem = BlockingCoordinator(mem, BOSS, secret).signal_problem(signal)
    assert problem == f"signed with unknown key id {signal.kid!r}"


def test_a_signal_secret_of_sixteen_bytes_is_enough_and_one_less_is_not(
    make_mem: MakeMem,
) -> None:
    # The documented floor is "at least 16 bytes": 16 is taken, 15 refused, as bytes or
    # as a str (its UTF-8 bytes).
    mem = make_mem()
    for enough in (b"s" * 16, "s" * 16):
        BlockingCoordinator(mem, BOSS, enough)
    for short in (b"s" * 15, "s" * 15):
        with pytest.raises(ConfigurationError, match="at least 16 bytes"):
            BlockingCoordinator(mem, BOSS, short)


def test_signals_and_acks_are_not_signed_with_the_callers_secret_itself(
    make_mem: MakeMem, coder: Principal, secret: bytes
) -> None:
    # The MAC key is derived from the secret: a secret also used elsewhere (an API token,
    # say) does not make that other use an oracle for signal and ACK MACs. A MAC that is
    # a plain HMAC-SHA256 under the secret would be one.
    mem = make_mem()
    signal = BlockingCoordinator(mem, BOSS, secret).send_signal(["coder-1"], "pause")
    ack = BlockingCoordinator(mem, coder, secret).acknowledge_signal(signal)
    for signed in (signal, ack):
        plain = hmac.new(secret, signed.signed_part(), hashlib.sha256).hexdigest()
        assert signed.mac != plain and len(signed.mac) == len(plain)


def test_the_mac_covers_every_field_of_a_signal_and_of_an_ack(
    make_mem: MakeMem, coder: Principal, secret: bytes
) -> None:
    # "mac signs every other field": any one of them changed (under the same key id)
    # breaks it. A field left out of the signed bytes (a signal's attempt, an ACK's
    # target) could be changed without the secret.
    mem = make_mem()
    boss = BlockingCoordinator(mem, BOSS, secret)
    signal = boss.send_signal(["coder-1"], "pause", {"why": "review"})
    ack = BlockingCoordinator(mem, coder, secret).acknowledge_signal(signal)
    forged = "MAC does not verify (forged or altered)"
    for name, value in {
        "id": "20261126T000000-000000000000",
        "type": "resume",
        "sender": "rogue",
        "targets": ("coder-1", "rogue"),
        "payload": {"why": "rm -rf"},
        "sent_at": signal.sent_at + 1,
        "attempt": signal.attempt + 1,
    }.items():
        assert boss.signal_problem(dataclasses.replace(signal, **{name: value})) == forged, name
    for name, value in {
        "signal_id": "20261126T000000-000000000000",
        "target": "coder-3",
        "digest": "0" * 64,
        "acked_at": ack.acked_at + 1,
    }.items():
        altered = dataclasses.replace(ack, **{name: value})
        assert boss.ack_problem(signal, "coder-1", altered, None) == forged, name


def test_an_ack_under_a_key_id_it_does_not_know_is_named_as_such(
    make_mem: MakeMem, coder: Principal, secret: bytes
) -> None:
    # As for a signal: the key id is named, not "MAC does not verify", so an operator
    # sees a target with another secret (or one not rotated in yet), not a forgery.
    mem = make_mem()
    boss = BlockingCoordinator(mem, BOSS, secret)
    signal = boss.send_signal(["coder-1"], "pause")
    elsewhere = BlockingCoordinator(mem, coder, secrets.token_bytes(32))
    draft = Ack(signal.id, "coder-1", signal.digest, clock_us(), elsewhere._signer.kid, "")
    ack = dataclasses.replace(draft, mac=elsewhere._mac(draft.signed_part()))
    problem = boss.ack_problem(signal, "coder-1", ack, "coder-1")
    assert problem == f"signed with unknown key id {ack.kid!r}"


def test_pending_signals_are_listed_oldest_first(
    make_mem: MakeMem, coder: Principal, secret: bytes
) -> None:
    # The documented order is the order they were sent (keys sort by the second they
    # were sent in and a random part: within one second, not in send order).
    mem = make_mem()
    boss = BlockingCoordinator(mem, BOSS, secret)
    sent = [boss.send_signal(["coder-1"], "tick", {"n": i}).id for i in range(6)]
    boss.sync()
    assert [s.id for s in BlockingCoordinator(mem, coder, secret).pending_signals()] == sent


def test_a_second_wait_goes_on_numbering_the_attempts(make_mem: MakeMem, secret: bytes) -> None:
    # attempt is 1 for the first send and one more per re-send, across waits: a second
    # wait that numbered its re-sends from the signal object again (attempt 2 again)
    # stored a re-send that said it came before the one already stored.
    mem = make_mem()
    boss = BlockingCoordinator(mem, BOSS, secret, max_retries=1)
    signal = boss.send_signal(["silent-1"], "pause")
    boss.sync()
    assert boss.wait_for_acks(signal, timeout=0).retries == 1
    assert boss.wait_for_acks(signal, timeout=0).retries == 1
    boss.sync()
    assert [json.loads(r.detail)["attempt"] for r in audit(mem, "signal_retry")] == [2, 3]
    stored = boss.get_signal(signal.id)
    assert stored is not None and stored.attempt == 3


@pytest.mark.parametrize("planted", ["another body", "a forged MAC"])
def test_a_re_send_signs_only_the_senders_own_body_and_attempts(
    make_mem: MakeMem, secret: bytes, planted: str
) -> None:
    # A re-send goes on from the newest stored attempt of the signal, read from the
    # cache, where a swarm member can put a copy before the worker commits it. A copy
    # with another body (signed: the member holds the secret) taken as that attempt made
    # the coordinator sign the member's body and store it in its own name, a signal it
    # never sent that passes every writer check; a copy with a MAC that does not verify
    # (no secret needed) set the coordinator's attempt numbers.
    mem = make_mem(worker=False)
    persist = persistence_by_hand(mem)
    boss = BlockingCoordinator(mem, BOSS, secret, max_retries=1)
    signal = boss.send_signal(["silent-1"], "pause", {"why": "review"})
    persist()
    rogue = BlockingCoordinator(mem, ROGUE, secret)
    if planted == "another body":
        copy = rogue._sign_signal(dataclasses.replace(signal, payload={"why": "rm -rf"}), 5)
    else:
        copy = dataclasses.replace(signal, attempt=5, mac="00" * 32)
    rogue._put(rogue._signal_key(signal.id), copy.to_value())  # in the cache only
    assert boss.wait_for_acks(signal, timeout=0).retries == 1
    persist()
    stored = boss.get_signal(signal.id)
    assert stored is not None and stored.payload == {"why": "review"} and stored.attempt == 2
    assert boss.signal_problem(stored) is None
    record = mem.get_record(rogue._signal_key(signal.id), level=Level.SWARM, principal=BOSS)
    assert (
        record is not None and record.owner == BOSS.agent_id and record.value == stored.to_value()
    )


def test_a_signal_argument_that_is_no_signal_is_a_validation_error(
    make_mem: MakeMem, coder: Principal, secret: bytes
) -> None:
    # Neither a Signal nor a signal id: a ValidationError naming what was passed, not an
    # AttributeError from deep inside the wait.
    mem = make_mem()
    boss = BlockingCoordinator(mem, BOSS, secret)
    target = BlockingCoordinator(mem, coder, secret)
    for bad in (None, 5, {"id": "x"}):
        with pytest.raises(ValidationError, match="expected a Signal or a signal id"):
            boss.wait_for_acks(bad, timeout=0)  # type: ignore[arg-type]
        with pytest.raises(ValidationError, match="expected a Signal or a signal id"):
            target.acknowledge_signal(bad, timeout=0)  # type: ignore[arg-type]


def test_a_forged_altered_or_replayed_ack_is_rejected_and_audited_high(
    make_mem: MakeMem, coder: Principal, secret: bytes, db_path: Path
) -> None:
    mem = make_mem()
    boss = BlockingCoordinator(mem, BOSS, secret, max_retries=0)
    signal = boss.send_signal(["coder-1", "coder-3", "silent-1", "rogue"], "stop", {"x": 1})
    other_signal = boss.send_signal(["silent-1"], "stop", {"x": 2})
    one = BlockingCoordinator(mem, coder, secret)
    one.acknowledge_signal(signal)  # the one genuine ACK
    key = f"coord/acks/{signal.id}/%s"

    # 1. Forged: coder-3's principal writes an ACK without knowing the secret (right
    #    format and key id, made-up MAC).
    genuine = one.acknowledge_signal(signal)
    forged = {**genuine.to_value(), "target": "coder-3", "mac": "00" * 32}
    mem.put(key % "coder-3", forged, level=Level.SWARM, principal=PEER)
    # 2. Replayed: silent-1's valid ACK of another signal, copied onto this one.
    silent = BlockingCoordinator(mem, SILENT, secret)
    replayed = silent.acknowledge_signal(other_signal).to_value()
    mem.put(key % "silent-1", replayed, level=Level.SWARM, principal=SILENT)
    # 3. Altered: rogue's valid ACK, then edited in the SQLite file (SWARM is plaintext).
    rogue = BlockingCoordinator(mem, ROGUE, secret)
    rogue.acknowledge_signal(signal)
    for c in (boss, one, silent, rogue):
        c.sync()
    mem.sync(mem.put("sentinel", 1, level=Level.SWARM, principal=BOSS))
    with sqlite3.connect(db_path) as conn:
        (env,) = conn.execute(
            "SELECT envelope FROM memory WHERE key = ?", (key % "rogue",)
        ).fetchone()
        altered = bytes(env).replace(b'"acked_at":1', b'"acked_at":2')
        assert altered != bytes(env)
        conn.execute("UPDATE memory SET envelope = ? WHERE key = ?", (altered, key % "rogue"))
    conn.close()

    result = boss.wait_for_acks(signal, timeout=0.3)
    assert result.acked == ("coder-1",) and not result.complete
    assert set(result.missing) == {"coder-3", "silent-1", "rogue"}
    assert result.rejected == {
        "coder-3": "MAC does not verify (forged or altered)",
        "silent-1": "acknowledges another signal (replayed)",
        "rogue": "MAC does not verify (forged or altered)",
    }
    boss.sync()
    rejected = audit(mem, "signal_ack_rejected")
    # Once per bad record, although the wait looked at each of them many times.
    assert sorted(json.loads(r.detail)["target"] for r in rejected) == [
        "coder-3",
        "rogue",
        "silent-1",
    ]
    assert all(r.risk == "high" and r.actor == "coordinator" for r in rejected)

    # 4. Valid MAC, wrong writer: coder-3 acks genuinely, then coder-1 (who holds the
    #    secret) overwrites it with a verbatim copy. The copy is refused for its writer.
    three = BlockingCoordinator(mem, PEER, secret)
    real = three.acknowledge_signal(signal)
    mem.sync(mem.put(key % "coder-3", real.to_value(), level=Level.SWARM, principal=coder))
    again = boss.wait_for_acks(signal, timeout=0.2)
    assert again.rejected["coder-3"] == "written by 'coder-1', not by the target 'coder-3'"
    # coder-3 is not fooled into thinking it already acked: it writes its ACK again.
    three.acknowledge_signal(signal)
    three.sync()  # committed, so a short wait sees it; the other two stay missing
    assert boss.wait_for_acks(signal, timeout=0.2).acked == ("coder-1", "coder-3")


def test_a_copy_of_an_ack_in_the_cache_does_not_stop_the_target_from_acking(
    make_mem: MakeMem, coder: Principal, secret: bytes
) -> None:
    from dualmem.coordination.signals import Ack

    writer = make_mem(worker=False)  # a worker runs only when this test says so
    boss = BlockingCoordinator(writer, BOSS, secret)
    signal = boss.send_signal(["coder-1"], "pause")
    # The signal is committed (a target acks only a committed signal); what follows is not.
    worker_of(writer, "w").step()
    # A swarm member holding the secret plants a MAC-valid ACK "by coder-1" before coder-1
    # acks. The cache does not say who wrote it; acknowledge_signal used to return it as
    # coder-1's own pending ACK and write nothing, so the coordinator (which checks the
    # writer) never saw coder-1's ACK.
    rogue = BlockingCoordinator(writer, ROGUE, secret)
    draft = Ack(signal.id, "coder-1", signal.digest, 1, rogue._signer.kid, "")
    copy = dataclasses.replace(draft, mac=rogue._mac(draft.signed_part()))
    writer.put(f"coord/acks/{signal.id}/coder-1", copy.to_value(), level=3, principal=ROGUE)
    own = BlockingCoordinator(writer, coder, secret).acknowledge_signal(signal)
    assert own != copy and own.acked_at > 1
    make_mem()  # a worker commits both; coder-1's own ACK is the newer write
    result = boss.wait_for_acks(signal, timeout=10)
    assert result.acked == ("coder-1",) and not result.rejected


def test_an_ack_of_another_body_under_the_signals_id_does_not_count(
    make_mem: MakeMem, coder: Principal, secret: bytes
) -> None:
    # An ACK is bound to the signal's body (its digest), not to its id alone: one its
    # target signed over another body of the signal (another payload, say: what a tampered
    # copy showed it) acknowledges something the coordinator never sent.
    mem = make_mem()
    boss = BlockingCoordinator(mem, BOSS, secret, max_retries=0)
    signal = boss.send_signal(["coder-1"], "pause", {"until": "deploy"})
    boss.sync()
    one = BlockingCoordinator(mem, coder, secret)
    other_body = dataclasses.replace(signal, payload={"until": "never"})
    assert other_body.id == signal.id and other_body.digest != signal.digest
    draft = Ack(signal.id, "coder-1", other_body.digest, clock_us(), one._signer.kid, "")
    signed = dataclasses.replace(draft, mac=one._mac(draft.signed_part()))
    mem.sync(
        mem.put(
            f"coord/acks/{signal.id}/coder-1", signed.to_value(), level=Level.SWARM, principal=coder
        )
    )
    result = boss.wait_for_acks(signal, timeout=0.1)
    assert result.missing == ("coder-1",)
    assert result.rejected == {"coder-1": "acknowledges another signal (replayed)"}
    # Its target still sees the signal as pending, and its own ACK then counts.
    assert [s.id for s in one.pending_signals()] == [signal.id]
    one.acknowledge_signal(signal)
    one.sync()
    assert boss.wait_for_acks(signal, timeout=5).acked == ("coder-1",)


@pytest.mark.parametrize("planted", ["re-signed", "junk"])
def test_an_ack_overwritten_after_it_was_written_is_written_again(
    make_mem: MakeMem, coder: Principal, secret: bytes, planted: str
) -> None:
    # coder-1's ACK, then a swarm member's record at its key: a copy re-signed with
    # another acked_at (it holds the secret), or junk. The same object acking again used
    # to compare the committed value with its own pending ACK, see them differ, take its
    # ACK as "not committed yet" for good and write nothing: the target stayed missing.
    mem = make_mem()
    boss = BlockingCoordinator(mem, BOSS, secret, max_retries=0)
    signal = boss.send_signal(["coder-1"], "pause")
    boss.sync()
    one = BlockingCoordinator(mem, coder, secret)
    mine = one.acknowledge_signal(signal)
    one.sync()
    rogue = BlockingCoordinator(mem, ROGUE, secret)
    draft = Ack(signal.id, "coder-1", signal.digest, mine.acked_at + 1, rogue._signer.kid, "")
    value = (
        dataclasses.replace(draft, mac=rogue._mac(draft.signed_part())).to_value()
        if planted == "re-signed"
        else {"hello": 1}
    )
    ack_key = f"coord/acks/{signal.id}/coder-1"
    mem.sync(mem.put(ack_key, value, level=Level.SWARM, principal=ROGUE))
    assert boss.wait_for_acks(signal, timeout=0.1).missing == ("coder-1",)
    assert [s.id for s in one.pending_signals()] == [signal.id]  # not hidden any more
    again = one.acknowledge_signal(signal)
    assert again != mine
    one.sync()
    assert boss.wait_for_acks(signal, timeout=5).acked == ("coder-1",)
    assert one.acknowledge_signal(signal) == again  # and then a no-op again
    one.sync()
    ops = [h.op for h in mem.history(ack_key, level=Level.SWARM, principal=coder)]
    assert ops == ["put", "put", "put"]


def test_a_forged_signal_is_refused_by_its_target(
    make_mem: MakeMem, coder: Principal, secret: bytes
) -> None:
    mem = make_mem()
    boss = BlockingCoordinator(mem, BOSS, secret)
    signal = boss.send_signal(["coder-1"], "pause", {"why": "review"})
    changed = Signal(**{**signal.to_value(), "targets": ("coder-1",), "payload": {"why": "rm -rf"}})
    target = BlockingCoordinator(mem, coder, secret)
    with pytest.raises(TamperedRecord, match="not authentic"):
        target.acknowledge_signal(changed)
    # Planted in the store by a swarm member without the secret: skipped, audited once.
    fake = BlockingCoordinator(mem, ROGUE, secrets.token_bytes(32))
    planted = fake.send_signal(["coder-1"], "pause", None)
    fake.sync()
    boss.sync()
    assert [s.id for s in target.pending_signals()] == [signal.id]
    assert [s.id for s in target.pending_signals()] == [signal.id]
    target.sync()
    rejected = audit(mem, "signal_rejected")
    assert [json.loads(r.detail)["signal"] for r in rejected] == [signal.id, planted.id]
    assert all(r.risk == "high" for r in rejected)


def test_a_signal_signed_in_the_senders_name_by_another_member_is_refused(
    make_mem: MakeMem, coder: Principal, secret: bytes
) -> None:
    mem = make_mem()
    boss = BlockingCoordinator(mem, BOSS, secret)
    genuine = boss.send_signal(["coder-1"], "pause", {"why": "review"})
    # A swarm member holding the secret signs a signal in the coordinator's name: the MAC
    # verifies (everyone holds the key), but dualmem recorded who wrote the record.
    rogue = BlockingCoordinator(mem, ROGUE, secret)
    draft = Signal(
        id="20261126T000000-spoofed0",
        type="stop",
        sender=BOSS.agent_id,
        targets=("coder-1",),
        payload={"why": "rm -rf"},
        sent_at=clock_us(),
        attempt=1,
        kid=rogue._signer.kid,
        mac="",
    )
    spoof = rogue._sign_signal(draft, 1)
    assert rogue.signal_problem(spoof) is None  # what a MAC check alone concludes
    rogue._put(rogue._signal_key(spoof.id), spoof.to_value())
    for c in (boss, rogue):
        c.sync()
    target = BlockingCoordinator(mem, coder, secret)
    assert [s.id for s in target.pending_signals()] == [genuine.id]
    expected = f"written by {ROGUE.agent_id!r}, not by its sender {BOSS.agent_id!r}"
    with pytest.raises(TamperedRecord, match=re.escape(expected)):
        target.acknowledge_signal(spoof.id)
    with pytest.raises(TamperedRecord, match="written by"):
        target.acknowledge_signal(spoof)
    # The same spoof, put where a writer check that trusted anything else would miss it:
    # under another signal's key (its id names the coordinator's signal)...
    elsewhere = dataclasses.replace(spoof, id="20261126T000000-elsewhere")
    rogue._put(rogue._signal_key(elsewhere.id), spoof.to_value())
    # ... reusing the genuine signal's id with another payload (signed, never stored) ...
    twin = rogue._sign_signal(dataclasses.replace(genuine, payload={"why": "rm -rf"}), 1)
    rogue.sync()
    with pytest.raises(ValidationError, match="no signal"):
        target.acknowledge_signal(elsewhere.id)  # the record there is not that signal
    with pytest.raises(TamperedRecord, match="does not match the signal as stored"):
        target.acknowledge_signal(twin)
    target.acknowledge_signal(genuine.id)  # the coordinator's own signal still goes through
    target.sync()
    reasons = [json.loads(r.detail)["reason"] for r in audit(mem, "signal_rejected")]
    # pending_signals (once), both acknowledge_signal calls, then the twin.
    assert reasons == [expected] * 3 + ["does not match the signal as stored (altered)"]
    assert boss.wait_for_acks(genuine, timeout=10).complete
    # ... and not committed yet: only a committed record says who wrote it.
    mem.close()  # its worker stops; nothing commits what follows
    unsynced = make_mem(worker=False)
    late = rogue._sign_signal(dataclasses.replace(spoof, id="20261126T000000-uncommitted"), 1)
    BlockingCoordinator(unsynced, ROGUE, secret)._put(rogue._signal_key(late.id), late.to_value())
    with pytest.raises(NotPersisted, match="not committed"):
        BlockingCoordinator(unsynced, coder, secret).acknowledge_signal(late.id, timeout=0.2)


def test_a_wait_by_id_trusts_only_the_committed_signal_its_waiter_sent(
    make_mem: MakeMem, coder: Principal, secret: bytes
) -> None:
    mem = make_mem()
    boss = BlockingCoordinator(mem, BOSS, secret, max_retries=0)
    signal = boss.send_signal(["coder-1"], "pause", {"why": "review"})  # coder-1 stays silent
    boss.sync()
    # A swarm member holding the secret overwrites the signal with a copy in the
    # coordinator's name whose only target is itself, and acks that copy. A wait by id
    # used to read the copy from the cache and report every target acked.
    rogue = BlockingCoordinator(mem, ROGUE, secret)
    forged = rogue._sign_signal(dataclasses.replace(signal, targets=("rogue",)), 1)
    rogue._put(rogue._signal_key(signal.id), forged.to_value())
    draft = dataclasses.replace(
        Ack(signal.id, "rogue", forged.digest, clock_us(), rogue._signer.kid, ""), mac=""
    )
    ack = dataclasses.replace(draft, mac=rogue._mac(draft.signed_part()))
    rogue._put(rogue._ack_key(signal.id, "rogue"), ack.to_value())
    rogue.sync()
    expected = f"written by {ROGUE.agent_id!r}, not by its sender {BOSS.agent_id!r}"
    with pytest.raises(TamperedRecord, match=re.escape(expected)):
        boss.wait_for_acks(signal.id, timeout=1)
    with pytest.raises(TamperedRecord, match="does not match the signal as stored"):
        boss.wait_for_acks(signal, timeout=1)  # the genuine object: its record was replaced
    boss.sync()
    assert [json.loads(r.detail)["reason"] for r in audit(mem, "signal_rejected")] == [
        expected,
        "does not match the signal as stored (altered)",
    ]
    # Only the sender waits: anyone else's re-sends would be signals in its name.
    mine = boss.send_signal(["coder-1"], "resume")
    with pytest.raises(ValidationError, match="only its sender waits"):
        BlockingCoordinator(mem, coder, secret).wait_for_acks(mine, timeout=0.1)
    # The genuine path still works, by object and by id.
    BlockingCoordinator(mem, coder, secret).acknowledge_signal(mine.id)
    assert boss.wait_for_acks(mine.id, timeout=10).acked == ("coder-1",)
    assert boss.wait_for_acks(mine, timeout=10).complete


def test_pending_signals_sees_every_signal_past_one_page(
    make_mem: MakeMem, coder: Principal, secret: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A query returns one page (10,000 records) in key order, and signal keys start with
    # their send time: past one page of live signals (ACKed ones and other agents' count;
    # they live a day) new signals were never seen. The same with a page of 4 records.
    from dualmem.coordination import signals as signals_module

    monkeypatch.setattr(signals_module, "_QUERY_LIMIT", 4)
    mem = make_mem()
    boss = BlockingCoordinator(mem, BOSS, secret)
    for_peer = [boss.send_signal(["coder-3"], "tick").id for _ in range(13)]
    for_coder = boss.send_signal(["coder-1"], "pause").id
    # junk under the prefix, inside and after the signal ids' key range
    for key in ("coord/signals/1", "coord/signals/zzz"):
        mem.put(key, {"hello": 1}, level=Level.SWARM, principal=ROGUE)
    mem.sync(mem.put("coord/signals/~", 1, level=Level.SWARM, principal=ROGUE))
    boss.sync()
    peer = BlockingCoordinator(mem, PEER, secret)
    assert sorted(s.id for s in peer.pending_signals()) == sorted(for_peer)
    assert [s.id for s in BlockingCoordinator(mem, coder, secret).pending_signals()] == [for_coder]
    peer.acknowledge_signal(for_peer[-1])
    peer.sync()
    assert sorted(s.id for s in peer.pending_signals()) == sorted(for_peer[:-1])


def test_junk_under_the_signal_and_agent_prefixes_is_skipped_and_audited_once(
    make_mem: MakeMem, coder: Principal, secret: bytes
) -> None:
    mem = make_mem()
    boss = BlockingCoordinator(mem, BOSS, secret)
    genuine = boss.send_signal(["coder-1"], "pause")
    lifecycle = AgentLifecycle(mem, BOSS)
    lifecycle.register_spawn("coder-1", "Coder one", "coder", ["python"], Level.SWARM)
    # Any member of the swarm can put anything under these prefixes, no secret needed:
    # records that are not JSON objects of the right shape, a signal whose MAC is not
    # ASCII (compare_digest raised TypeError on it), an agent whose confidence overflows a
    # float, and an agent record stored under another agent's key, whose own key holds junk.
    good = mem.get("lifecycle/agents/coder-1", level=Level.SWARM, principal=BOSS, fresh=True)
    planted = {
        "coord/signals/zzz": {"hello": 1},
        "coord/signals/x1": {**genuine.to_value(), "id": "x1", "mac": "\u00e9"},
        "lifecycle/agents/zzz": {"hello": 1},
        "lifecycle/agents/huge": {**good, "agent_id": "huge", "confidence": 10**400},
        "lifecycle/agents/A": {**good, "agent_id": "B", "last_heartbeat": 1},
        "lifecycle/agents/B": {"hello": 1},
        "lifecycle/events/coder-1/zzz": {"hello": 1},
    }
    for key, value in planted.items():
        mem.sync(mem.put(key, value, level=Level.SWARM, principal=ROGUE))
    boss.sync()
    lifecycle.sync()
    target = BlockingCoordinator(mem, coder, secret)
    for _ in range(2):  # polled twice, audited once
        assert [s.id for s in target.pending_signals()] == [genuine.id]
        assert [a.agent_id for a in lifecycle.list_agents()] == ["coder-1"]
        assert [e.event for e in lifecycle.history("coder-1")] == ["spawn"]
        assert lifecycle.stale_agents() == []
    target.sync()
    lifecycle.sync()
    rows = audit(mem, "signal_rejected")
    assert sorted(r.key for r in rows) == ["coord/signals/x1", "coord/signals/zzz"]
    assert all(r.risk == "high" for r in rows)
    rows = audit(mem, "agent_record_rejected")
    assert sorted(r.key for r in rows) == [
        "lifecycle/agents/A",
        "lifecycle/agents/B",
        "lifecycle/agents/huge",
        "lifecycle/agents/zzz",
        "lifecycle/events/coder-1/zzz",
    ]
    assert all(r.risk == "high" for r in rows)


def test_a_team_signals_type_and_targets_stay_sealed_in_audit_rows(
    make_mem: MakeMem, db_path: Path, raw_redis: redis.Redis, secret: bytes
) -> None:
    # At an encrypted level the signal's value is sealed; its audit rows (plaintext, in
    # the stream and in SQLite) used to repeat its type and targets.
    mem = make_mem()
    lead = Principal(agent_id="lead", team="backend")
    boss = BlockingCoordinator(mem, lead, secret, level=Level.TEAM, max_retries=1)
    signal = boss.send_signal(["NEEDLE-target"], "NEEDLE-type", {"why": "NEEDLE-payload"})
    result = boss.wait_for_acks(signal, timeout=0.3)
    assert result.missing == ("NEEDLE-target",)  # the caller still gets the names
    assert b"NEEDLE" not in raw_redis_values(raw_redis)
    boss.sync()
    mem.close()
    assert b"NEEDLE" not in b"".join(p.read_bytes() for p in db_path.parent.glob("*.db*"))
    reopened = make_mem()
    details = {r.event: json.loads(r.detail) for r in reopened.store.audit_log()}
    assert details["signal_sent"] == {"signal": signal.id, "targets_count": 1}
    assert details["signal_timeout"]["missing_count"] == 1


def test_rejection_reasons_at_an_encrypted_level_quote_nothing_from_the_sealed_record(
    make_mem: MakeMem, db_path: Path, raw_redis: redis.Redis, secret: bytes
) -> None:
    # A record that does not parse, or fails a check, is audited with the reason; the
    # reason quoted the decrypted value ("invalid literal for int(): 'NEEDLE'", "names
    # target 'NEEDLE'") into the plaintext audit log, in the stream and in SQLite.
    mem = make_mem()
    lead = Principal(agent_id="lead", team="backend")
    member = Principal(agent_id="member", team="backend")
    rogue = Principal(agent_id="rogue", team="backend")
    boss = BlockingCoordinator(mem, lead, secret, level=Level.TEAM, max_retries=0)
    signal = boss.send_signal(["member"], "pause")
    forger = BlockingCoordinator(mem, rogue, secret, level=Level.TEAM)
    # A target holding both kinds of quote: its repr escapes one of them, and a reason cut
    # short at the escaped quote ('x\'...) quoted the rest of it.
    target_id = "x'y\"NEEDLE-target"
    draft = Ack(signal.id, target_id, signal.digest, clock_us(), forger._signer.kid, "")
    ack = dataclasses.replace(draft, mac=forger._mac(draft.signed_part()))
    lifecycle = AgentLifecycle(mem, lead, level=Level.TEAM)
    lifecycle.register_spawn("member", "Member", "coder", ["python"], Level.TEAM)
    good = mem.get("lifecycle/agents/member", level=Level.TEAM, principal=lead, fresh=True)
    planted = {
        "coord/signals/s1": {**signal.to_value(), "id": "s1", "sent_at": "NEEDLE-1"},
        "coord/signals/s2": {**signal.to_value(), "id": "s2", "kid": "NEEDLE-2"},
        f"coord/acks/{signal.id}/member": ack.to_value(),
        "lifecycle/agents/a1": {**good, "agent_id": "a1", "status": "NEEDLE-3"},
        "lifecycle/agents/a2": {**good, "agent_id": "NEEDLE's-4"},  # repr in "..."
        "lifecycle/events/member/e1": {"agent_id": "member", "event": "x", "at": "NEEDLE-5"},
    }
    for key, value in planted.items():
        mem.sync(mem.put(key, value, level=Level.TEAM, principal=rogue))
    target = BlockingCoordinator(mem, member, secret, level=Level.TEAM)
    assert [s.id for s in target.pending_signals()] == [signal.id]
    assert [a.agent_id for a in lifecycle.list_agents()] == ["member"]
    assert [e.event for e in lifecycle.history("member")] == ["spawn"]
    result = boss.wait_for_acks(signal, timeout=0.2)
    assert repr(target_id) in result.rejected["member"]  # the caller still gets it
    for c in (boss, target, lifecycle):
        c.sync()
    rows = [
        r for r in mem.store.audit_log() if "rejected" in r.event or r.event == "signal_timeout"
    ]
    assert len(rows) == 7, rows
    assert not [r.detail for r in rows if "NEEDLE" in r.detail]
    assert b"NEEDLE" not in raw_redis_values(raw_redis)
    mem.close()
    assert b"NEEDLE" not in b"".join(p.read_bytes() for p in db_path.parent.glob("*.db*"))


def test_previous_secret_still_verifies_after_rotation(make_mem: MakeMem, coder: Principal) -> None:
    mem = make_mem()
    old, new = secrets.token_bytes(32), secrets.token_bytes(32)
    signal = BlockingCoordinator(mem, BOSS, old).send_signal(["coder-1"], "pause")
    rotated_target = BlockingCoordinator(mem, coder, new, previous_secrets=[old])
    rotated_target.acknowledge_signal(signal)
    assert (
        BlockingCoordinator(mem, BOSS, new, previous_secrets=[old])
        .wait_for_acks(signal, timeout=10)
        .complete
    )
    assert (
        not BlockingCoordinator(mem, BOSS, old, max_retries=0)
        .wait_for_acks(signal, timeout=0.2)
        .complete
    )  # the old key alone cannot verify an ACK signed with the new one


def test_ids_whose_keys_would_not_fit_are_refused_before_anything_is_written(
    make_mem: MakeMem, coder: Principal, secret: bytes
) -> None:
    # Idents are limited to 128 characters, keys to 512 UTF-8 bytes: a target of 120
    # emoji (480 bytes) makes an ACK key of 520. send_signal accepted it, and
    # wait_for_acks raised ValidationError mid-wait. Lone surrogates passed check_ident,
    # then raised UnicodeEncodeError.
    mem = make_mem()
    boss = BlockingCoordinator(mem, BOSS, secret, max_retries=0)
    wide = "\U0001f600" * 120
    Principal(agent_id=wide, swarm=SWARM)  # a legal agent id
    with pytest.raises(ValidationError, match=r"target is too long: .* 520 bytes"):
        boss.send_signal(["coder-1", wide], "pause")
    for targets, kind in ((["\ud800"], "pause"), (["coder-1"], "pa\udfffuse")):
        with pytest.raises(ValidationError, match="lone surrogates"):
            boss.send_signal(targets, kind)
    with pytest.raises(ValidationError, match="lone surrogates"):
        boss.get_signal("\ud800")
    # A target of 100 emoji fits, and its ACK is found.
    fits = "\U0001f600" * 100
    signal = boss.send_signal([fits], "pause")
    boss.sync()
    BlockingCoordinator(mem, Principal(agent_id=fits, swarm=SWARM), secret).acknowledge_signal(
        signal
    )
    assert boss.wait_for_acks(signal, timeout=5).acked == (fits,)
    life = AgentLifecycle(mem, BOSS)
    with pytest.raises(ValidationError, match="agent_id is too long"):
        life.register_spawn("\U0001f600" * 117, "Wide", "coder", [], Level.PRIVATE)
    with pytest.raises(ValidationError, match="lone surrogates"):
        life.register_spawn("a\ud800", "Bad", "coder", [], Level.PRIVATE)
    boss.sync()
    life.sync()
    mem.sync(mem.put("sentinel", 1, level=Level.SWARM, principal=BOSS))
    assert len(audit(mem, "signal_sent")) == 1  # only the one that fits
    assert mem.query(principal=BOSS, level=Level.SWARM, prefix="lifecycle/") == []


def test_timeouts_and_retries_are_checked_before_anything_is_done(
    make_mem: MakeMem, coder: Principal, secret: bytes
) -> None:
    # acknowledge_signal(timeout=nan) waited forever for the signal's commit and
    # timeout="1" raised a raw TypeError; max_retries had no upper bound, and
    # wait_for_acks built a list of that many re-send times.
    mem = make_mem()
    boss = BlockingCoordinator(mem, BOSS, secret)
    signal = boss.send_signal(["coder-1"], "pause")
    target = BlockingCoordinator(mem, coder, secret)
    for bad in (math.nan, math.inf, -1, "1", True, 10**400):
        with pytest.raises(ValidationError, match="timeout must be a number of seconds"):
            target.acknowledge_signal(signal, timeout=bad)  # type: ignore[arg-type]
        with pytest.raises(ValidationError, match="timeout must be a number of seconds"):
            boss.wait_for_acks(signal, timeout=bad)  # type: ignore[arg-type]
    for retries in (-1, 101, 10**12):
        with pytest.raises(ValidationError, match=r"max_retries must be an int in 0\.\.100"):
            BlockingCoordinator(mem, BOSS, secret, max_retries=retries)
    BlockingCoordinator(mem, BOSS, secret, max_retries=100)
    target.acknowledge_signal(signal, timeout=5)
    assert boss.wait_for_acks(signal, timeout=5).complete


def test_sync_timeouts_poll_interval_and_signal_ttl_are_checked_first(
    make_mem: MakeMem, coder: Principal, secret: bytes
) -> None:
    # The helpers' sync(timeout) was never checked: -1 or NaN waited not at all (and
    # raised NotPersisted), "5" raised a raw TypeError and 2e6 a ValidationError quoting a
    # figure nobody passed. poll_interval <= 0 or NaN busy-polled, "0.1" raised TypeError;
    # signal_ttl=-1 was taken and refused at the first send_signal.
    mem = make_mem(worker=False)  # nothing commits: a wait that is not refused times out
    loops = LoopMemory(mem, swarm=SWARM, project="shop")
    loops.store_loop3_confidence(coder, "auth", 1, 0.9, "x")
    life = AgentLifecycle(mem, BOSS, heartbeat_timeout=30)
    life.register_spawn("coder-1", "Coder", "coder", [], Level.PRIVATE)
    boss = BlockingCoordinator(mem, BOSS, secret)
    signal = boss.send_signal(["coder-1"], "pause")
    for bad in (-1, math.nan, math.inf, "5", True, 2e6, 10**400):
        for sync in (loops.sync, life.sync, boss.sync):
            with pytest.raises(ValidationError, match=rf"timeout must be .*, got {bad!r}$"):
                sync(bad)  # type: ignore[arg-type]
    for bad in (0, -1, math.nan, math.inf, "0.1", True, 2e6):
        with pytest.raises(ValidationError, match=rf"poll_interval must be .*, got {bad!r}$"):
            boss.wait_for_acks(signal, timeout=0.1, poll_interval=bad)  # type: ignore[arg-type]
    for bad in (-1, 0, math.nan, "60", 10**12):
        with pytest.raises(ValidationError, match=rf"signal_ttl must be .*, got {bad!r}$"):
            BlockingCoordinator(mem, BOSS, secret, signal_ttl=bad)  # type: ignore[arg-type]
    BlockingCoordinator(mem, BOSS, secret, signal_ttl=None)


def test_coordinator_configuration_is_checked(make_mem: MakeMem, system: Principal) -> None:
    mem = make_mem()
    with pytest.raises(ConfigurationError, match="16 bytes"):
        BlockingCoordinator(mem, BOSS, b"short")
    with pytest.raises(ValidationError, match="Principal"):
        BlockingCoordinator(mem, "coordinator", b"x" * 32)  # type: ignore[arg-type]
    with pytest.raises(AccessDenied):
        BlockingCoordinator(mem, system, b"x" * 32)  # no swarm: no scope for SWARM signals
    with pytest.raises(AccessDenied):
        BlockingCoordinator(mem, BOSS, b"x" * 32, level=Level.SYSTEM)  # not a system principal
    mem.sync(mem.put("sentinel", 1, level=Level.SWARM, principal=BOSS))
    denied = wait_until(
        lambda: len(audit(mem, "access_denied")) >= 2 and audit(mem, "access_denied"),
        what="audit rows",
    )
    assert sorted(r.actor for r in denied) == [BOSS.agent_id, system.agent_id]
    boss = BlockingCoordinator(mem, BOSS, b"x" * 32)
    with pytest.raises(ValidationError):
        boss.send_signal("coder-1", "pause")
    with pytest.raises(ValidationError):
        boss.send_signal([], "pause")
    with pytest.raises(ValidationError):
        boss.send_signal(["coder-1"], "pause", {"bad": {1, 2}})
    with pytest.raises(ValidationError):
        boss.wait_for_acks("no-such-signal", timeout=1)


def test_agents_and_decisions_are_listed_past_one_page(
    make_mem: MakeMem, monkeypatch: pytest.MonkeyPatch
) -> None:
    # list_agents (so stale_agents) and list_loop4_decisions read one query page, 10,000
    # records: past that, agents and decisions were left out. The same with pages of 3.
    from dualmem.coordination import lifecycle as lifecycle_module
    from dualmem.coordination import loops as loops_module

    monkeypatch.setattr(lifecycle_module, "_QUERY_LIMIT", 3)
    monkeypatch.setattr(loops_module, "_QUERY_LIMIT", 3)
    mem = make_mem()
    life = AgentLifecycle(mem, BOSS, heartbeat_timeout=30)
    ids = [f"coder-{i}" for i in range(8)] + ["zz:odd id"]  # any legal id, any character
    for agent_id in ids:
        life.register_spawn(agent_id, "Coder", "coder", [], Level.PRIVATE)
    life.sync()
    assert [a.agent_id for a in life.list_agents()] == sorted(ids)
    loops = LoopMemory(mem, project="shop", swarm=SWARM)
    owner = Principal(agent_id="product-owner", system=True)
    for i in range(1, 8):
        loops.store_loop4_decision(owner, "auth", i, "PROCEED", "ok")
    loops.sync(10)
    assert [d.iteration for d in loops.list_loop4_decisions(owner, "auth")] == list(range(1, 8))


@pytest.mark.parametrize("junk", [{"score": 10**400}, {"iteration": 10**400}])
def test_a_loop2_record_with_a_number_too_big_is_skipped_not_raised(
    make_mem: MakeMem, coder: Principal, junk: dict[str, Any]
) -> None:
    # float(10**400) raised OverflowError, which the junk filter did not catch: one
    # member's record broke get_loop2_consensus for the whole swarm.
    mem = make_mem()
    loops = LoopMemory(mem, swarm=SWARM, project="shop")
    loops.store_loop2_consensus(BOSS, "impl", 1, 0.95, {}, [])
    loops.sync()
    prefix = f"cfn/shop/{SWARM}/loop2/impl/"
    valid = mem.get(prefix + "000001", level=Level.SWARM, principal=BOSS, fresh=True)
    rogue = Principal(agent_id="rogue", swarm=SWARM, project="shop")
    bad = {**valid, "iteration": 2, **junk}
    mem.sync(mem.put(prefix + "000002", bad, level=Level.SWARM, principal=rogue), timeout=10)
    latest = loops.get_loop2_consensus(coder, "impl")
    assert latest is not None and latest.iteration == 1


@pytest.mark.parametrize("named", [{"iteration": 7}, {"phase": "design"}, {"agent_id": "coder-9"}])
def test_a_loop3_value_naming_another_entry_is_no_record_at_this_ones_key(
    make_mem: MakeMem, coder: Principal, named: dict[str, Any]
) -> None:
    # An agent's own plain put of iteration 7's entry (or another phase's, or another
    # agent's) at iteration 1's key was read back as iteration 1's confidence.
    mem = make_mem()
    loops = LoopMemory(mem, swarm=SWARM, project="shop")
    loops.store_loop3_confidence(coder, "impl", 1, 0.9, "ok")
    key = loops.key(3, "impl", 1)
    mine = mem.get(key, level=Level.PRIVATE, principal=coder, fresh=True)
    assert loops.get_loop3_confidence(coder, "impl", 1, fresh=True) is not None
    mem.put(key, {**mine, **named}, level=Level.PRIVATE, principal=coder)
    with pytest.raises(TamperedRecord, match="names another agent, phase or iteration"):
        loops.get_loop3_confidence(coder, "impl", 1, fresh=True)


@pytest.mark.parametrize("score", [7.5, "0.95", -4, True])
def test_a_score_the_write_path_refuses_is_no_record_on_read(
    make_mem: MakeMem, coder: Principal, score: Any
) -> None:
    # Scores outside [0, 1] are refused on write, but a plain put of one was read back as
    # a record: a Loop 2 score of 7.5 passed the gate, "0.95" too, -4 was the latest.
    mem = make_mem()
    loops = LoopMemory(mem, swarm=SWARM, project="shop")
    loops.store_loop2_consensus(BOSS, "impl", 1, 0.95, {}, [])
    loops.store_loop3_confidence(coder, "impl", 1, 0.9, "ok")
    life = AgentLifecycle(mem, BOSS, heartbeat_timeout=30)
    life.register_spawn("coder-1", "Coder", "coder", [], Level.SWARM)
    life.update_confidence("coder-1", 0.8, "ok", "impl", 1)
    for helper in (loops, life):
        helper.sync()
    with pytest.raises(ValidationError):
        loops.store_loop2_consensus(BOSS, "impl", 2, score, {}, [])
    loop2 = mem.get(loops.key(2, "impl", 1), level=Level.SWARM, principal=BOSS)
    loop3 = mem.get(loops.key(3, "impl", 1), level=Level.PRIVATE, principal=coder)
    state = mem.get("lifecycle/agents/coder-1", level=Level.SWARM, principal=BOSS)
    bad2 = {**loop2, "iteration": 2, "score": score}
    bad3 = {**loop3, "iteration": 2, "confidence": score}
    for key, value, level, writer in (
        (loops.key(2, "impl", 2), bad2, Level.SWARM, ROGUE),
        (loops.key(3, "impl", 2), bad3, Level.PRIVATE, coder),  # its own entry
        ("lifecycle/agents/coder-1", {**state, "confidence": score}, Level.SWARM, ROGUE),
    ):
        mem.sync(mem.put(key, value, level=level, principal=writer))
    with pytest.raises(TamperedRecord, match="does not hold a Loop 2 record"):
        loops.get_loop2_consensus(BOSS, "impl", 2)
    latest = loops.get_loop2_consensus(BOSS, "impl")  # skipped: iteration 1 answers
    assert latest is not None and (latest.iteration, latest.score) == (1, 0.95)
    with pytest.raises(TamperedRecord, match="does not hold a Loop 3 record"):
        loops.get_loop3_confidence(coder, "impl", 2)
    assert life.list_agents() == []
    with pytest.raises(TamperedRecord, match="not an agent lifecycle record"):
        life.agent("coder-1")
    for helper in (loops, life):
        helper.sync()
    mem.sync(mem.put("sentinel", 1, level=Level.SWARM, principal=BOSS))
    assert [r.key for r in audit(mem, "loop_record_rejected")] == [loops.key(2, "impl", 2)]
    assert [r.key for r in audit(mem, "agent_record_rejected")] == ["lifecycle/agents/coder-1"]


def test_arguments_of_the_wrong_type_are_a_validation_error(
    make_mem: MakeMem, secret: bytes
) -> None:
    # send_signal(None/5) and previous_secrets=None raised a bare TypeError (every error
    # is to derive from DualMemError); key(3.0, ...) made "cfn/shop/<swarm>/loop3.0/...".
    mem = make_mem()
    boss = BlockingCoordinator(mem, BOSS, secret)
    for targets in (None, 5):
        with pytest.raises(ValidationError, match="targets must be a list of agent ids"):
            boss.send_signal(targets, "pause")  # type: ignore[arg-type]
    for previous in (None, 5, secret, secret.decode("latin-1")):
        with pytest.raises(ValidationError, match="previous_secrets must be a list"):
            BlockingCoordinator(mem, BOSS, secret, previous_secrets=previous)  # type: ignore[arg-type]
    loops = LoopMemory(mem, swarm=SWARM, project="shop")
    for loop in (3.0, True, "3", 1):
        with pytest.raises(ValidationError, match="loop must be 2, 3 or 4"):
            loops.key(loop, "impl", 1)  # type: ignore[arg-type]
    assert loops.key(3, "impl", 1) == f"cfn/shop/{SWARM}/loop3/impl/000001"
    boss.sync()
    mem.sync(mem.put("sentinel", 1, level=Level.SWARM, principal=BOSS))
    assert audit(mem, "signal_sent") == []  # nothing was sent


# -- the input checks' bounds, found by mutating _validation.py ----------------------------


def nothing_written_since(mem: DualMemory, principal: Principal, seq: int) -> bool:
    """Whether nothing but a sentinel put now reached SQLite after change ``seq``."""
    mem.sync(mem.put("sentinel", 1, level=Level.SWARM, principal=principal))
    return [c.key for c in mem.changes(seq, principal=principal)] == ["sentinel"]


def test_idents_are_1_to_128_printable_characters_without_a_slash(
    make_mem: MakeMem, coder: Principal
) -> None:
    # Only '/' and lone surrogates were tested: an empty or blank phase, one of 129
    # characters, a '/' leading it, a newline, \x1f or DEL in it were each taken into a
    # key, a phase of 5 raised AttributeError, and 128 characters were refused with ">=".
    mem = make_mem()
    loops = LoopMemory(mem, swarm=SWARM, project="shop")
    longest = "p" * 128
    loops.store_loop3_confidence(coder, longest, 1, 0.9, "ok")
    loops.sync()
    mine = loops.get_loop3_confidence(coder, longest, 1)
    assert mine is not None and mine.phase == longest
    seq = mem.changes(0, principal=coder)[-1].seq
    for bad, why in [
        (5, "phase must be a str, got int"),
        ("", "phase must not be empty"),
        ("  ", "phase must not be empty"),
        ("p" * 129, "phase is longer than 128 characters"),
        ("a/b", "phase must not contain '/'"),
        ("/auth", "phase must not contain '/'"),
        ("a\nb", "phase must not contain control characters"),
        ("a\x1fb", "phase must not contain control characters"),
        ("a\x7fb", "phase must not contain control characters"),
    ]:
        with pytest.raises(ValidationError, match=why):
            loops.store_loop3_confidence(coder, bad, 1, 0.9, "ok")  # type: ignore[arg-type]
    assert nothing_written_since(mem, coder, seq)


def test_iterations_are_ints_from_0_to_999999(make_mem: MakeMem, coder: Principal) -> None:
    # Only 999999 + 1 was tested: -1 was taken (a key ending "0000-1"), the highest
    # iteration refused with "<", and True stored as iteration 1.
    mem = make_mem()
    loops = LoopMemory(mem, swarm=SWARM, project="shop")
    loops.store_loop2_consensus(coder, "auth", 0, 0.5, {}, [])
    loops.store_loop2_consensus(coder, "auth", 999_999, 0.95, {}, [])
    loops.sync()
    latest = loops.get_loop2_consensus(BOSS, "auth")
    assert latest is not None and latest.iteration == 999_999
    first = loops.get_loop2_consensus(BOSS, "auth", 0)
    assert first is not None and first.score == 0.5
    seq = mem.changes(0, principal=coder)[-1].seq
    for bad in (-1, 1_000_000, True, 1.0, "1"):
        with pytest.raises(ValidationError, match="iteration must be"):
            loops.store_loop2_consensus(coder, "auth", bad, 0.9, {}, [])  # type: ignore[arg-type]
    assert nothing_written_since(mem, coder, seq)


def test_scores_of_exactly_0_and_1_and_an_empty_reasoning_are_accepted(
    make_mem: MakeMem, coder: Principal
) -> None:
    # [0, 1] is closed: a confidence of 1.0 refused with "<" had no test; and reasoning
    # may be empty (only a name may not), which refusing failed nothing either.
    mem = make_mem()
    strict = LoopMemory(
        mem, swarm=SWARM, project="shop", confidence_threshold=1.0, consensus_threshold=0.0
    )
    assert strict.confidence_gate_passed(1.0) and not strict.confidence_gate_passed(0.9999)
    assert strict.consensus_gate_passed(0.0)
    strict.store_loop3_confidence(coder, "auth", 1, 1.0, "")
    strict.store_loop2_consensus(coder, "auth", 1, 0, {}, [])
    life = AgentLifecycle(mem, BOSS)
    life.register_spawn("coder-1", "Coder", "coder", [], Level.SWARM)
    life.update_confidence("coder-1", 1.0, "", "auth", 1)
    life.register_termination("coder-1", "")
    for helper in (strict, life):
        helper.sync()
    mine = strict.get_loop3_confidence(coder, "auth", 1)
    assert mine is not None and (mine.confidence, mine.reasoning, mine.gate_passed) == (
        1.0,
        "",
        True,
    )
    consensus = strict.get_loop2_consensus(BOSS, "auth", 1)
    assert consensus is not None and (consensus.score, consensus.gate_passed) == (0.0, True)
    agent = life.agent("coder-1")
    assert agent is not None and (agent.confidence, agent.end_reason) == (1.0, "")


def test_free_text_is_a_str_of_at_most_64_kib_characters_and_a_name_is_not_blank(
    make_mem: MakeMem, coder: Principal
) -> None:
    # Reasoning of 5 raised a bare TypeError; the 64 KiB bound was never reached (65536
    # characters refused with ">=", one more taken with the bound moved); a blank or
    # empty agent name was registered.
    mem = make_mem()
    loops = LoopMemory(mem, swarm=SWARM, project="shop")
    longest = "r" * (64 * 1024)
    loops.store_loop3_confidence(coder, "auth", 1, 0.9, longest)
    loops.sync()
    mine = loops.get_loop3_confidence(coder, "auth", 1)
    assert mine is not None and mine.reasoning == longest
    seq = mem.changes(0, principal=coder)[-1].seq
    with pytest.raises(ValidationError, match="reasoning is longer than 65536 characters"):
        loops.store_loop3_confidence(coder, "auth", 2, 0.9, longest + "r")
    with pytest.raises(ValidationError, match="reasoning must be a str, got int"):
        loops.store_loop3_confidence(coder, "auth", 2, 0.9, 5)  # type: ignore[arg-type]
    life = AgentLifecycle(mem, BOSS)
    for name in ("", "  "):
        with pytest.raises(ValidationError, match="name must not be empty"):
            life.register_spawn("coder-1", name, "coder", [], Level.SWARM)
    assert nothing_written_since(mem, coder, seq)
    assert life.list_agents() == []


def test_lists_of_strings_are_neither_one_str_nor_bytes_nor_hold_anything_else(
    make_mem: MakeMem, coder: Principal
) -> None:
    # A str of blockers was stored one character each ("flaky" as f, l, a, k, y), bytes
    # as their ints, a number raised a bare TypeError, a list holding an int was stored;
    # and every item counts, in the order given.
    mem = make_mem()
    loops = LoopMemory(mem, swarm=SWARM, project="shop")
    loops.store_loop3_confidence(coder, "auth", 1, 0.9, "ok", blockers=("b", "a", "c"))
    loops.sync()
    mine = loops.get_loop3_confidence(coder, "auth", 1)
    assert mine is not None and mine.blockers == ("b", "a", "c")
    seq = mem.changes(0, principal=coder)[-1].seq
    for bad, why in [
        ("flaky", "blockers must be a list of strings, got str"),
        (b"flaky", "blockers must be a list of strings, got bytes"),
        (5, "blockers must be a list of strings, got int"),
        (["flaky", 5], "blockers must hold strings only, got int"),
    ]:
        with pytest.raises(ValidationError, match=why):
            loops.store_loop3_confidence(coder, "auth", 2, 0.9, "ok", blockers=bad)  # type: ignore[arg-type]
    assert nothing_written_since(mem, coder, seq)


def test_metadata_is_a_mapping_with_str_keys_and_any_mapping_will_do(
    make_mem: MakeMem, coder: Principal
) -> None:
    # A dict with an int key was stored (JSON turned it into "1"), a list or a number
    # raised a bare TypeError, and a read-only mapping (not a dict) was handed on as it
    # was, to be refused as no JSON.
    from types import MappingProxyType

    mem = make_mem()
    loops = LoopMemory(mem, swarm=SWARM, project="shop")
    loops.store_loop3_confidence(coder, "auth", 1, 0.9, "ok", metadata=MappingProxyType({"n": 3}))
    loops.sync()
    mine = loops.get_loop3_confidence(coder, "auth", 1)
    assert mine is not None and mine.metadata == {"n": 3}
    seq = mem.changes(0, principal=coder)[-1].seq
    for bad in ({1: "x"}, ["n"], 5):
        with pytest.raises(ValidationError, match="metadata must be a mapping with str keys"):
            loops.store_loop3_confidence(coder, "auth", 2, 0.9, "ok", metadata=bad)  # type: ignore[arg-type]
    assert nothing_written_since(mem, coder, seq)


def test_the_same_junk_under_two_agents_keys_read_from_the_cache_is_audited_for_each(
    make_mem: MakeMem,
) -> None:
    # A version read from the cache has no stream id: its value tells it apart, and its
    # key does. Marked by the value alone, the same junk under a second agent's key was
    # taken as seen and never audited.
    mem = make_mem(worker=False)
    persist = persistence_by_hand(mem)
    life = AgentLifecycle(mem, BOSS)
    for agent in ("helper-1", "helper-2"):
        mem.put(f"lifecycle/agents/{agent}", {"hello": 1}, level=Level.SWARM, principal=ROGUE)
    for agent in ("helper-1", "helper-2"):
        with pytest.raises(TamperedRecord):
            life.heartbeat(agent)  # read from the cache: nothing committed yet
    persist()
    assert sorted(r.key for r in audit(mem, "agent_record_rejected")) == [
        "lifecycle/agents/helper-1",
        "lifecycle/agents/helper-2",
    ]


def test_a_target_whose_ack_key_is_exactly_512_bytes_fits(make_mem: MakeMem, secret: bytes) -> None:
    # The limit is 512 bytes inclusive, and the refusal names the room a target has: a
    # target of exactly that many bytes (an ACK key of 512) was refused with ">=".
    mem = make_mem()
    boss = BlockingCoordinator(mem, BOSS, secret, max_retries=0)
    with pytest.raises(ValidationError, match=r"at most (\d+) bytes for target") as refused:
        boss.send_signal(["\U0001f600" * 128], "pause")
    room_match = re.search(r"at most (\d+) bytes", str(refused.value))
    assert room_match is not None
    room = int(room_match.group(1))
    exact = "\U0001f600" * (room // 4) + "a" * (room % 4)
    assert len(exact.encode("utf-8")) == room
    with pytest.raises(ValidationError, match="target is too long"):
        boss.send_signal([exact + "a"], "pause")
    signal = boss.send_signal([exact], "pause")
    boss.sync()
    BlockingCoordinator(mem, Principal(agent_id=exact, swarm=SWARM), secret).acknowledge_signal(
        signal
    )
    assert boss.wait_for_acks(signal, timeout=5).acked == (exact,)
