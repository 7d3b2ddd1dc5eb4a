"""Faults 1-8 of issue 6 at their quick sizes, on real redis-server and worker processes.

Each test runs the scenario function that ``python -m bench.faults`` runs at full size for
the committed report (bench/results/FAULTS.md), then asserts its figures: any property
that did not hold is listed in ``problems`` and fails the test.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis

from acl import Keyring, Level, Principal
from bench import faults
from bench.faultkit import (
    WRITER,
    FaultEnv,
    Figures,
    PendingMonitor,
    TrackedWriter,
    WorkerProc,
    check_persisted,
    spawn_role,
    wait_drained,
    wait_for,
    workers_stopped,
)
from dualmem import DualMemory
from dualmem.commands import put_fields, replay_fields
from dualmem.sqlite_store import SQLiteStore
from dualmem.store import ApplyResult, StreamEntry
from dualmem.worker import (
    Worker,
    forget_consumer,
    next_stream_id,
    safe_trim_id,
    stream_backlog,
)

from .conftest import RedisServer, redis_fields, worker_of

pytestmark = [pytest.mark.real_redis, pytest.mark.slow]

Q = faults.QUICK


@pytest.fixture
def env(own_redis_server: RedisServer, tmp_path: Path) -> FaultEnv:
    """A redis-server of this test's own (AOF everysec), a key file and a database path."""
    return FaultEnv(own_redis_server, tmp_path / "world")


def assert_holds(fig: Figures) -> None:
    assert fig.problems == [], "\n".join(fig.problems)


def assert_nothing_lost(fig: Figures, expected: int | None = None) -> None:
    assert_holds(fig)
    assert fig.lost == 0 and fig.duplicated == 0, fig
    assert fig.acked is not None and fig.acked == fig.persisted
    if expected is not None:
        assert fig.acked == expected


def test_1_worker_killed_at_random_points_loses_and_repeats_nothing(env: FaultEnv) -> None:
    fig = faults.worker_sigkill(env, puts=Q.sigkill_puts, kills=Q.sigkill_kills)
    assert_nothing_lost(fig, Q.sigkill_puts)
    assert fig.recover_s is not None and fig.recover_s < 10
    assert fig.extra["killed_by_sigkill"] == Q.sigkill_kills  # the kills were real


def test_2_crash_between_commit_and_xack_applies_nothing_twice(env: FaultEnv) -> None:
    fig = faults.commit_then_crash(env, rounds=Q.crash_rounds)
    assert_nothing_lost(fig)
    assert fig.extra["committed_then_crashed"] > 0
    assert fig.extra["redelivered_and_skipped"] == fig.extra["committed_then_crashed"]
    assert fig.extra["rows_changed_by_redelivery"] == 0


def test_3_redis_restarts_lose_no_acknowledged_put(env: FaultEnv) -> None:
    fig = faults.redis_restart(env, puts=Q.restart_puts, seconds=Q.restart_seconds)
    assert_holds(fig)
    # SHUTDOWN: nothing lost. SIGKILL: anything lost was acknowledged in the last second.
    assert fig.duplicated == 0
    assert fig.extra["loss_window_s"] <= 1.0
    assert fig.acked == Q.restart_puts
    assert sum(fig.extra["refused_while_down"].values()) > 0  # the outages were real
    assert fig.extra["redis_exit_statuses"] == [0, -signal.SIGKILL]  # SHUTDOWN, then a crash
    # Acknowledged puts that existed only in Redis when it went down (the worker frozen).
    assert all(n > 0 for n in fig.extra["uncommitted_acked_puts_at_shutdown_and_sigkill"])


def test_4_redis_unreachable_fails_fast_reads_work_writes_resume(env: FaultEnv) -> None:
    fig = faults.redis_unreachable(env, probes=Q.unreachable_probes)
    assert_holds(fig)
    assert fig.extra["slowest_failure_s"] < 1.0
    assert fig.extra["reads_ok_during_outages"] == 2 * Q.unreachable_probes
    # Down, frozen and back empty: each time a put went through and was persisted.
    assert set(fig.extra["persisted_after_outage_s"]) == {"down", "frozen", "empty"}
    assert fig.extra["came_back_empty"] is True  # what was in Redis before was gone


def test_5_poison_entries_are_dead_lettered_and_replayed_without_going_back_in_time(
    env: FaultEnv,
) -> None:
    fig = faults.poison_entries(env, puts=Q.poison_puts)
    assert_nothing_lost(fig, Q.poison_puts)
    assert fig.extra["dead_letters"] == 3
    assert any("poisoned by the fault suite" in e for e in fig.extra["errors"])
    assert sum("malformed" in e for e in fig.extra["errors"]) == 2
    assert fig.extra["worker"]["dead-lettered"] == 3
    # The replayed put is older than the put that followed it: the newer value stays.
    assert fig.extra["value_after_replay"] == {"v": "newer"}


def test_replayed_command_takes_its_original_place(tmp_path: Path) -> None:
    def put(sid: str, value: bytes, origin: str | None = None) -> StreamEntry:
        fields = put_fields("swarm:s", "k", Level.SWARM, "a", 1, b"\x01\x00" + value, None)
        raw = redis_fields(fields)
        return StreamEntry(0, sid, replay_fields(raw, origin) if origin else raw)

    store = SQLiteStore(tmp_path / "m.db")
    try:
        store.apply([put("2-0", b"newer")])
        assert store.apply([put("3-0", b"older", origin="1-0")]).applied == 1
        row = store.get("swarm:s", "k", 0)
        assert row is not None and row.envelope.endswith(b"newer")
        assert [c.stream_id for c in store.history("swarm:s", "k")] == ["3-0", "2-0"]
        store.apply([put("4-0", b"newest", origin="3-0")])  # replayed, yet newer than 2-0
        row = store.get("swarm:s", "k", 0)
        assert row is not None and row.envelope.endswith(b"newest")
        failed = store.apply([put("5-0", b"x", origin="9-0")]).failed  # origin in the future
        assert len(failed) == 1 and "origin" in failed[0][1]
    finally:
        store.close()


def test_6_backlog_bound_refuses_keeps_memory_flat_and_never_trims_pending(
    env: FaultEnv,
) -> None:
    fig = faults.backpressure(env, bound=Q.backlog_bound, hammer_s=0.5, puts=Q.backlog_puts)
    assert_nothing_lost(fig, Q.backlog_bound + Q.backlog_puts)
    assert fig.extra["xlen_at_bound"] == Q.backlog_bound
    assert fig.extra["held_entries"] == 20  # the stuck consumer really holds some
    assert fig.extra["refused_at_bound"] > 0
    assert fig.extra["used_memory_growth_while_refusing_bytes"] < 256 * 1024
    assert fig.extra["max_xlen"] <= Q.backlog_bound + 1
    # The stuck consumer's entries were looked for after several trims, and were there.
    assert fig.extra["held_entries_checked_present"] >= 10
    assert fig.extra["worker"]["claimed"] >= fig.extra["held_entries"]


def test_7_kill_inside_a_sqlite_transaction_leaves_no_partial_batch(env: FaultEnv) -> None:
    fig = faults.kill_in_transaction(env, rounds=Q.txn_kills)
    assert_nothing_lost(fig)
    assert fig.extra["rows_of_killed_batches_visible"] == 0
    assert fig.extra["integrity_check"] == "ok"


def test_8_two_workers_and_readers_no_lock_errors_no_loss(env: FaultEnv) -> None:
    fig = faults.workers_and_readers(env, seconds=Q.concurrent_seconds)
    assert_nothing_lost(fig)
    assert fig.extra["reader_errors"] == 0 and fig.extra["locked_in_worker_logs"] == 0
    assert fig.extra["reads"] > 0 and fig.extra["regressions"] == 0
    assert len(fig.extra["applied_per_worker"]) == 2
    assert all(n > 0 for n in fig.extra["applied_per_worker"])


def test_trim_survives_the_other_worker_acking_between_xinfo_and_xpending(
    redis_server: RedisServer,
) -> None:
    # Found by scenario 8: XINFO said "pending", the other worker acked everything before
    # XPENDING, whose min was then None, and the trimming worker process died on it.
    redis_server.client().flushall()
    stream = b"dm:{race:0}:cmd"
    plain = redis_server.client()
    plain.xgroup_create(stream, "persist", id="0", mkstream=True)
    ids = [plain.xadd(stream, {b"n": str(i).encode()}) for i in range(3)]
    plain.xreadgroup("persist", "other", {stream: ">"}, count=10)

    class OtherWorkerAcksFirst(redis.Redis):
        def xpending(self, name: Any, groupname: Any) -> Any:
            plain.xack(stream, "persist", *ids)
            return super().xpending(name, groupname)

    racing = OtherWorkerAcksFirst(host="127.0.0.1", port=redis_server.port)
    assert safe_trim_id(racing, stream) == next_stream_id(ids[-1].decode())


def test_an_unexpected_error_does_not_end_the_worker(
    make_mem: Callable[..., DualMemory], coder: Principal
) -> None:
    # Fault injection: the store's first commit raises something that is not a dualmem
    # error (as the XPENDING race above did); the worker logs it and goes on.
    writer = make_mem(worker=False)
    receipts = [writer.put(f"k{i}", i, level=Level.SWARM, principal=coder) for i in range(20)]
    store = SQLiteStore(writer.settings.db_path)
    real_apply = store.apply
    failures = []

    def apply_failing_once(entries: Sequence[StreamEntry]) -> ApplyResult:
        if not failures:
            failures.append(1)
            raise RuntimeError("injected bug")
        return real_apply(entries)

    store.apply = apply_failing_once  # type: ignore[method-assign]
    worker = Worker(writer._redis, store, writer.settings.replace(consumer="w"))
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,))
    thread.start()
    try:
        for r in receipts:
            writer.sync(r, timeout=10)
    finally:
        stop.set()
        thread.join(10)
        store.close()
    assert failures == [1]


def _empty_group(redis_server: RedisServer) -> tuple[redis.Redis, bytes]:
    """A flushed server and a new stream with an empty ``persist`` group on it."""
    client = redis_server.client()
    client.flushall()
    stream = b"dm:{forget:0}:cmd"
    client.xgroup_create(stream, "persist", id="0", mkstream=True)
    return client, stream


def test_a_consumer_waking_up_while_it_is_forgotten_loses_nothing(
    redis_server: RedisServer,
) -> None:
    # Found by reading the worker: XGROUP DELCONSUMER throws away what the consumer holds.
    # A paused worker that wakes between XINFO (idle, nothing pending) and the deletion
    # and reads entries would lose them for good; they must be delivered again.
    client, stream = _empty_group(redis_server)
    ids = [client.xadd(stream, {b"n": str(i).encode()}) for i in range(5)]
    done = client.xreadgroup("persist", "a", {stream: ">"}, count=2)[0][1]
    client.xack(stream, "persist", *(sid for sid, _ in done))
    client.xgroup_createconsumer(stream, "persist", "sleeper")
    floor = safe_trim_id(client, stream)  # the worker's look: sleeper idle, 0 pending
    woke = client.xreadgroup("persist", "sleeper", {stream: ">"}, count=2)[0][1]
    assert [sid for sid, _ in woke] == ids[2:4]
    assert forget_consumer(client, stream, "persist", "sleeper", floor) == 2
    again = client.xreadgroup("persist", "w", {stream: ">"}, count=10)[0][1]
    assert [sid for sid, _ in again] == ids[2:]  # nothing below the floor, nothing lost


def test_a_group_set_back_to_the_end_of_a_millisecond_still_reports_its_backlog(
    redis_server: RedisServer,
) -> None:
    # forget_consumer sets a group back to "<ms - 1>-18446744073709551615" when its floor
    # has sequence 0; the id after that was computed as "<ms - 1>-18446744073709551616",
    # which Redis refuses, so the backlog, trimming and verify failed until a delivery.
    client, stream = _empty_group(redis_server)
    ids = [client.xadd(stream, {b"n": b"x"}, id=f"{100 + i}-0") for i in range(5)]
    client.xreadgroup("persist", "a", {stream: ">"}, count=1)  # 100-0 stays pending
    client.xgroup_createconsumer(stream, "persist", "sleeper")
    floor = safe_trim_id(client, stream)
    assert floor == "100-0"
    client.xreadgroup("persist", "sleeper", {stream: ">"}, count=2)
    assert forget_consumer(client, stream, "persist", "sleeper", floor) == 2
    assert client.xinfo_groups(stream)[0]["last-delivered-id"] == b"99-18446744073709551615"
    assert next_stream_id("99-18446744073709551615") == "100-0"
    assert stream_backlog(client, stream, "persist") == 1 + len(ids)  # 100-0 twice: pending
    assert safe_trim_id(client, stream) == "100-0"


def test_the_backlog_counts_pending_entries_where_redis_cannot_tell_the_lag(
    raw_redis: redis.Redis,
) -> None:
    # An undelivered entry deleted (XDEL) leaves Redis 7 unable to tell the group's lag
    # (nil); the entries after the last delivered one are counted instead, and the pending
    # ones were left out there: a drain could report 0 with entries still pending.
    stream = b"backlog-test"
    ids = [raw_redis.xadd(stream, {b"n": b"x"}) for _ in range(6)]
    raw_redis.xgroup_create(stream, "persist", id="0")
    raw_redis.xreadgroup("persist", "slow", {stream: ">"}, count=2)  # pending: 2
    raw_redis.xdel(stream, ids[3])
    assert stream_backlog(raw_redis, stream, "persist") == 2 + 3


@pytest.mark.real_redis
def test_a_group_created_by_a_call_whose_reply_was_lost_still_gets_its_floor(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # XGROUP CREATE ran, its reply was lost, and redis-py's retry got BUSYGROUP: the group
    # was taken for someone else's and the stream's last id was never raised above what
    # SQLite holds (see raise_last_id).
    from dualmem.commands import sid_of
    from dualmem.redis_backend import connect
    from dualmem.settings import Settings
    from dualmem.worker import ensure_groups

    redis_server.client().flushall()
    ahead = f"{int(time.time() * 1000) + 3_600_000}-0"
    fields = put_fields("swarm:s", "k", Level.SWARM, "a", 1, b"\x01\x00{}", None)
    raw = redis_fields(fields)
    store = SQLiteStore(tmp_path / "m.db")
    store.apply([StreamEntry(0, ahead, raw)])
    client, _ = connect(Settings.load({"redis_url": redis_server.url}))
    real = redis.Redis.parse_response
    lost = [True]

    def lossy(self: redis.Redis, conn: Any, command_name: str, **options: Any) -> Any:
        reply = real(self, conn, command_name, **options)
        if lost[0] and command_name == "XGROUP CREATE":
            lost[0] = False
            raise redis.ConnectionError("connection reset by peer")  # Redis ran it
        return reply

    monkeypatch.setattr(redis.Redis, "parse_response", lossy)
    stream = b"dm:{lost:0}:cmd"
    try:
        ensure_groups(client, {stream: 0}, "persist", store)
    finally:
        monkeypatch.undo()
        client.close()
        store.close()
    assert not lost[0]
    last = redis_server.client().xinfo_stream(stream)["last-generated-id"].decode()
    assert sid_of(last) >= sid_of(ahead)


def test_the_backlog_counts_past_ten_thousand_and_is_zero_before_the_first_write(
    redis_server: RedisServer,
) -> None:
    # It stopped at 10,000 (one XRANGE page), so a backlog alert above that never fired;
    # and a stream not created yet read as "Redis unavailable". A stream without the
    # group (Redis lost it) holds nothing acknowledged: all of it is backlog. A group
    # Redis cannot tell the lag of (created at an id inside the stream) is counted page
    # by page: counting the last page alone said 50 where 10,000 waited.
    client = redis_server.client()
    client.flushall()
    stream = b"dm:{backlog:0}:cmd"
    assert stream_backlog(client, stream, "persist") == 0
    pipe = client.pipeline(transaction=False)
    for _ in range(10_050):
        pipe.xadd(stream, {b"n": b"x"})
    ids = pipe.execute()
    assert stream_backlog(client, stream, "persist") == 10_050  # no group yet
    client.xgroup_create(stream, "persist", id="0")
    client.xreadgroup("persist", "a", {stream: ">"}, count=50)  # 50 pending
    assert stream_backlog(client, stream, "persist") == 10_050
    client.xgroup_create(stream, "mid", id=ids[49])
    (mid,) = [g for g in client.xinfo_groups(stream) if g["name"] == b"mid"]
    assert mid["lag"] is None
    assert stream_backlog(client, stream, "mid") == 10_000


def test_the_fault_check_reports_lost_puts_stale_rows_phantoms_and_a_corrupt_file(
    env: FaultEnv,
) -> None:
    # Every scenario ends in check_persisted and _record_check, but only ever on a database
    # that holds everything: a check that counted no loss, let a stale row pass, or never
    # ran integrity_check (found by a faultkit/faults mutation check) passed them all.
    mem = env.memory()
    writer = TrackedWriter(mem, keys=4)  # k0..k3 each get three puts, k1 and k3 plaintext
    writer.run(8)
    writer.run(4)  # goes on where the first run stopped
    assert [(a.key, a.level, a.value) for a in writer.acks[:4]] == [
        ("k0", Level.PRIVATE, 0),
        ("k1", Level.SWARM, 1),
        ("k2", Level.PRIVATE, 2),
        ("k3", Level.SWARM, 3),
    ]
    assert [a.value for a in writer.acks] == list(range(12)) and writer.sent == 12
    with pytest.raises(TimeoutError):
        wait_drained(mem, 0.2)  # no worker yet: nothing drains
    assert worker_of(mem, "w").drain(30) == 0
    clean = check_persisted(env.db, writer.acks, mem)
    assert (clean.acked, clean.persisted, clean.lost, clean.phantoms) == (12, 12, [], 0)
    assert (clean.duplicated, clean.stale, clean.integrity) == (0, [], "ok")
    fig = Figures("check", "test", sent=12)
    faults._record_check(fig, clean)
    assert fig.problems == [] and (fig.acked, fig.persisted, fig.lost) == (12, 12, 0)

    acks = writer.acks
    again = writer.put_one(11)  # k3's last value acknowledged twice: the later id counts
    assert again is not None
    mem.put("k2", {"i": 6}, level=Level.PRIVATE, principal=WRITER)  # no one saw it acked
    assert worker_of(mem, "w").drain(30) == 0
    with contextlib.closing(sqlite3.connect(env.db)) as conn, conn:
        # k0's first put gone from the journal; k1's row gone; k3's row back at the
        # older copy of its value.
        conn.execute("DELETE FROM journal WHERE stream_id = ?", (acks[0].stream_id,))
        conn.execute("DELETE FROM memory WHERE key = 'k1'")
        conn.execute("UPDATE memory SET stream_id = ? WHERE key = 'k3'", (acks[11].stream_id,))
    check = check_persisted(env.db, writer.acks, mem)
    assert check.acked == 13 and check.persisted == 12 and check.lost == [acks[0]]
    assert check.phantoms == 1 and check.duplicated == 0 and check.integrity == "ok"
    stale = {s.split(":")[0]: s for s in check.stale}
    assert sorted(stale) == ["k1", "k2", "k3"], check.stale
    assert "missing" in stale["k1"]
    assert acks[11].stream_id in stale["k3"] and again.stream_id in stale["k3"]
    fig = Figures("check", "test")
    faults._record_check(fig, check)
    assert (fig.acked, fig.persisted, fig.lost) == (13, 12, 1)
    assert len(fig.problems) == 2, fig.problems
    assert fig.problems[0].startswith("1 acknowledged puts missing")
    assert fig.problems[1].startswith("3 keys without their last value")
    # Had no put raised, the put no one saw acknowledged (k2's) is one too many: a
    # command sent twice under a second id shows only that way.
    fig = Figures("check", "test", sent=13)
    faults._record_check(fig, check)
    assert len(fig.problems) == 3, fig.problems
    assert fig.problems[1].startswith("1 puts in the journal that no put returned")

    # An index that no longer matches its table: integrity_check says so, and so must
    # the figures.
    with contextlib.closing(sqlite3.connect(env.db)) as conn, conn:
        conn.execute("PRAGMA writable_schema = ON")
        conn.execute(
            "UPDATE sqlite_master SET sql = 'CREATE INDEX journal_scope_seq ON journal (key, seq)' "
            "WHERE name = 'journal_scope_seq'"
        )
    corrupt = check_persisted(env.db, writer.acks, mem)
    env.server.kill()
    with pytest.raises(TimeoutError):
        wait_drained(mem, 0.2)  # Redis gone: the backlog is unknown, not drained
    mem.close()
    assert corrupt.integrity != "ok" and "journal_scope_seq" in corrupt.integrity
    fig = Figures("check", "test")
    faults._record_check(fig, corrupt)
    assert fig.problems[-1] == f"integrity_check: {corrupt.integrity}"


def test_a_killed_worker_process_dies_of_sigkill_and_a_stopped_one_reports_its_counters(
    env: FaultEnv,
) -> None:
    # The scenarios trust WorkerProc.kill to crash the worker and WorkerProc.stop to drain
    # it and return what it printed: a kill that sent SIGTERM (a clean drain, no crash at
    # all) passed scenario 1 (a faultkit mutation check). And a worker started again
    # was sent its SIGTERM before it could handle it (stop found the banner of the process
    # before it in the same log): it died without draining, and stop returned the earlier
    # process's counters.
    mem = env.memory()
    writer = TrackedWriter(mem, keys=10)
    writer.run(30)
    first = WorkerProc(env, "first", extra=("--worker-sched", "normal")).start()
    wait_drained(mem, 60)
    writer.run(5)
    wait_drained(mem, 60)
    counters = first.stop()
    assert first.proc is not None and first.proc.returncode == 0
    assert "scheduling normal)" in first.text()  # the extra arguments reached it
    assert counters == {
        "applied": 35,
        "duplicates": 0,
        "claimed": 0,
        "dead-lettered": 0,
        "left pending": 0,
    }
    # The same worker started again (the same log) and stopped at once: it waits for the
    # new process's banner (the old one's is in the log), drains what waits, and reports
    # the new process's counters.
    writer.run(3)
    assert first.start().stop() == {**counters, "applied": 3}
    victim = WorkerProc(env, "victim").start()
    wait_for(lambda: "dualmem worker" in victim.text(), 30, "the victim's banner")
    writer.run(4)
    victim.kill()
    mem.close()
    assert victim.proc is not None and victim.proc.returncode == -signal.SIGKILL
    assert " stopped: " not in victim.text()  # no drain, no goodbye
    assert victim.stop() == {}
    # A scenario that fails half-way leaves no worker process behind.
    late = WorkerProc(env, "late")
    with contextlib.suppress(RuntimeError), workers_stopped([late]):
        late.start()
        raise RuntimeError("the scenario failed")
    assert late.proc is not None and late.proc.returncode == -signal.SIGKILL


def test_the_pending_monitor_counts_a_dead_consumer_recovered_only_once_nothing_is_pending(
    redis_server: RedisServer,
) -> None:
    # Scenario 1's recovery figures come from PendingMonitor; a monitor that counted a
    # consumer recovered with entries still pending (or at once), never counted one the
    # group had forgotten, or noted what another consumer held as the dead one's, passed
    # scenario 1 with figures that lied (a faultkit mutation check).
    client, stream = _empty_group(redis_server)
    for i in range(5):
        client.xadd(stream, {b"n": str(i).encode()})
    held = client.xreadgroup("persist", "dead", {stream: ">"}, count=3)[0][1]
    client.xreadgroup("persist", "alive", {stream: ">"}, count=2)
    monitor = PendingMonitor(redis_server.client(), stream).start()
    monitor.died("dead")
    assert monitor.left_pending == {"dead": 3}
    client.xack(stream, "persist", *(sid for sid, _ in held[:2]))
    assert monitor.stop() == []  # one entry still pending: not recovered
    monitor = PendingMonitor(redis_server.client(), stream).start()
    monitor.died("dead")
    monitor.died("forgotten")  # gone from the group (a worker forgets idle consumers)
    client.xack(stream, "persist", held[2][0])
    assert len(monitor.stop()) == 2
    assert monitor.left_pending == {"dead": 1}


def test_the_fault_suite_command_exits_1_and_reports_every_problem_a_scenario_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing ran `python -m bench.faults` itself: an exit status of 0 whatever the
    # scenarios found, a report that said "none" or dropped the PROBLEM lines, or a quick
    # run that replaced the committed full-size report, all passed (a mutation check).
    worlds: list[tuple[FaultEnv, faults.Size]] = []

    def broken(env: FaultEnv, size: faults.Size) -> Figures:
        worlds.append((env, size))
        fig = Figures("98. broken on purpose", "one size")
        fig.lost = 2
        fig.require(False, "2 acknowledged puts missing")
        return fig

    def fine(env: FaultEnv, size: faults.Size) -> Figures:
        worlds.append((env, size))
        return Figures("99. fine", "one size", lost=0)

    monkeypatch.setitem(faults.FAULTS, "broken", broken)
    monkeypatch.setitem(faults.FAULTS, "fine", fine)
    committed = tmp_path / "committed" / "FAULTS.md"
    monkeypatch.setattr(faults, "RESULTS", committed)
    out = tmp_path / "report.md"
    assert faults.main(["--quick", "--only", "broken", "fine", "--out", str(out)]) == 1
    report = out.read_text()
    assert "| 98. broken on purpose | one size | - | - | - | 2 | - | - | - | 1 |" in report
    assert "| 99. fine | one size | - | - | - | 0 | - | - | - | none |" in report
    assert "**In all: 2 lost, 0 duplicated, 1 problems.**" in report
    assert "- **PROBLEM**: 2 acknowledged puts missing" in report
    # Each scenario ran at the quick size in a world of its own, whose Redis is gone.
    assert [size for _, size in worlds] == [faults.QUICK, faults.QUICK]
    assert worlds[0][0].workdir != worlds[1][0].workdir
    assert all(
        env.server.proc is not None and env.server.proc.poll() is not None for env, _ in worlds
    )
    # Only the scenarios asked for; a quick run without --out leaves the committed report,
    # which only a full run of every scenario replaces.
    assert faults.main(["--quick", "--only", "fine"]) == 0
    assert len(worlds) == 3 and not committed.exists()
    # The attack scenarios get a memory with its worker (their syncs wait for it).
    assert faults.main(["--quick", "--only", "cross_scope_reads", "--out", str(out)]) == 0
    assert " | none |" in out.read_text()
    monkeypatch.setattr(faults, "FAULTS", {"fine": fine})
    assert faults.main(["--quick"]) == 0
    assert len(worlds) == 4 and not committed.exists()
    assert faults.main([]) == 0
    assert worlds[-1][1] == faults.FULL and "| 99. fine |" in committed.read_text()


def test_a_reader_process_counts_every_read_that_raised(env: FaultEnv) -> None:
    # Scenario 8 fails on the errors its reader processes report ("database is locked"
    # among them), but never saw one: a reader that swallowed its errors passed it. A
    # reader holding the wrong key file cannot open the encrypted keys.
    mem = env.memory(worker=True)
    writer = TrackedWriter(mem, keys=4)
    writer.run(4)
    wait_drained(mem, 30)
    mem.close()
    wrong = env.workdir / "other-keys.json"
    Keyring.generate().save(wrong)
    log = env.workdir / "reader.log"
    reader = spawn_role(
        "reader",
        *("--redis-url", env.server.url, "--db", str(env.db), "--keyring", str(wrong)),
        *("--keys", "4", "--seconds", "0.5"),
        log=log,
    )
    assert reader.wait(60) == 0
    report = json.loads(log.read_text().splitlines()[-1])
    # k1 and k3 (plaintext) read fine; every read of k0 and k2 raised, and was counted.
    assert report["reads"] > 0 and report["regressions"] == 0
    assert sum(report["errors"].values()) > 0, report
    assert all(e.startswith("MissingKey: ") for e in report["errors"]), report
