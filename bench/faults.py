"""The fault and attack suite (issue 6) as one command: ``python -m bench.faults [--quick]``.

Each scenario kills, restarts or attacks the real thing (redis-server and worker
processes on 127.0.0.1) and returns :class:`~bench.faultkit.Figures`; ``problems`` lists
every property that did not hold. ``tests/test_faults.py`` and ``tests/test_attacks.py``
run the same functions at their quick sizes and fail on any problem; this module runs
them at full size and writes ``bench/results/FAULTS.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import random
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from acl import Level
from bench import attacks
from bench.faultkit import (
    ROOT,
    WRITER,
    FaultEnv,
    Figures,
    PendingMonitor,
    RedisProcess,
    TrackedWriter,
    WorkerProc,
    check_persisted,
    integrity,
    spawn_role,
    wait_drained,
    wait_for,
    workers_stopped,
)
from dualmem import DualMemory, StoreUnavailable
from dualmem.redis_backend import text

__all__ = ["FAULTS", "FULL", "QUICK", "Size", "main", "run_all"]

RESULTS = ROOT / "bench" / "results" / "FAULTS.md"


def _record_check(fig: Figures, check: Any) -> None:
    fig.acked = check.acked
    fig.persisted = check.persisted
    fig.lost = len(check.lost)
    fig.duplicated = check.duplicated
    fig.require(
        not check.lost, f"{len(check.lost)} acknowledged puts missing, e.g. {check.lost[:3]}"
    )
    fig.require(check.duplicated == 0, f"{check.duplicated} stream ids applied twice")
    # Where no put raised, every put in the journal is one its writer saw acknowledged:
    # another is a command sent twice under a second id (which the journal's one row per
    # stream id cannot show), or one no one made.
    fig.require(
        fig.sent != check.acked or check.phantoms == 0,
        f"{check.phantoms} puts in the journal that no put returned (a command sent twice?)",
    )
    fig.require(
        not check.stale, f"{len(check.stale)} keys without their last value: {check.stale[:3]}"
    )
    fig.require(check.integrity == "ok", f"integrity_check: {check.integrity}")


# -- 1. worker SIGKILL ---------------------------------------------------------------------


def worker_sigkill(env: FaultEnv, *, puts: int, kills: int, seed: int = 1) -> Figures:
    """Kill the worker with SIGKILL at random points while a writer sends ``puts``."""
    rnd = random.Random(seed)
    fig = Figures("1. worker SIGKILL while writing", f"{puts:,} puts, {kills} kills")
    t0 = time.monotonic()
    mem = env.memory()
    monitor = PendingMonitor(env.server.client(), mem.layout.stream(0)).start()
    procs: list[WorkerProc] = []
    killed = 0  # workers that died of the SIGKILL (not of something else, not alive)
    with workers_stopped(procs):
        procs.append(WorkerProc(env, "w0").start())
        # Spread the puts over the kills, so every kill lands while the writer is busy.
        writer = TrackedWriter(mem, keys=max(50, puts // 40)).start(puts, rate=puts / (kills * 0.4))
        for n in range(1, kills + 1):
            w = procs[-1]
            wait_for(lambda w=w: "dualmem worker" in w.text(), 30, "worker start")  # type: ignore[misc]
            time.sleep(rnd.uniform(0.0, 0.25))  # a random point in its work
            w.kill()
            killed += w.proc is not None and w.proc.returncode == -signal.SIGKILL
            monitor.died(w.consumer)
            procs.append(WorkerProc(env, f"w{n}").start())
        writer.join()
        drain = wait_drained(mem, 300)
        counters = procs[-1].stop()
    recoveries = monitor.stop()
    check = check_persisted(env.db, writer.acks, mem)
    mem.close()
    fig.sent = writer.sent
    _record_check(fig, check)
    fig.recover_s = max(recoveries) if recoveries else None
    fig.require(killed == kills, f"only {killed} of {kills} workers died of a SIGKILL")
    fig.require(len(recoveries) == kills, f"only {len(recoveries)} of {kills} kills recovered")
    fig.extra = {
        "killed_by_sigkill": killed,
        "median_recover_s": statistics.median(recoveries) if recoveries else None,
        "kills_with_entries_in_flight": sum(1 for n in monitor.left_pending.values() if n),
        "entries_in_flight_at_kills": sum(monitor.left_pending.values()),
        "drain_after_last_put_s": round(drain, 3),
        "last_worker": counters,
    }
    fig.notes.append(
        "recovery = time from a SIGKILL until the dead consumer's pending entries were "
        "claimed and committed by its successor (claim_idle_ms=300)"
    )
    fig.seconds = time.monotonic() - t0
    return fig


# -- 2. crash between COMMIT and XACK ------------------------------------------------------


def _dump(db: Path) -> tuple[set[tuple[Any, ...]], set[tuple[Any, ...]]]:
    conn = sqlite3.connect(db)
    try:
        journal = set(conn.execute("SELECT * FROM journal").fetchall())
        memory = set(conn.execute("SELECT * FROM memory").fetchall())
    finally:
        conn.close()
    return journal, memory


def commit_then_crash(env: FaultEnv, *, rounds: int, batch: int = 50, seed: int = 2) -> Figures:
    """A worker dies (SIGKILL) right after COMMIT, before XACK; redelivery applies nothing."""
    rnd = random.Random(seed)
    fig = Figures("2. crash between COMMIT and XACK", f"{rounds} crashes, batches of {batch}")
    t0 = time.monotonic()
    mem = env.memory()
    writer = TrackedWriter(mem, keys=10**9)  # one key per put: every row is its own witness
    committed_then_crashed = 0
    for r in range(rounds):
        after = rnd.randint(1, 3)
        writer.run(batch * 3 + rnd.randint(1, batch))
        log = env.workdir / f"crash-{r}.log"
        child = spawn_role(
            "crash-after-commit",
            *("--redis-url", env.server.url, "--db", str(env.db), "--consumer", f"crash{r}"),
            *("--batch-size", str(batch), "--after", str(after)),
            log=log,
        )
        try:
            child.wait(60)
        except subprocess.TimeoutExpired:
            child.kill()
            fig.problems.append(f"round {r}: the crashing worker never reached its commit")
            continue
        fig.require(child.returncode == -signal.SIGKILL, f"round {r}: exit {child.returncode}")
        for line in log.read_text().splitlines():
            if line.startswith("COMMITTED "):
                committed_then_crashed += int(line.split()[1])
    before_journal, before_memory = _dump(env.db)
    w = WorkerProc(env, "rescuer").start()
    with workers_stopped([w]):
        recover = wait_drained(mem, 120)
        counters = w.stop()
    after_journal, after_memory = _dump(env.db)
    check = check_persisted(env.db, writer.acks, mem)
    mem.close()
    fig.sent = writer.sent
    _record_check(fig, check)
    fig.recover_s = recover
    changed = len(before_journal - after_journal) + len(before_memory - after_memory)
    fig.require(changed == 0, f"{changed} committed rows changed on redelivery")
    redelivered = counters.get("duplicates", 0)
    fig.require(
        redelivered == committed_then_crashed,
        f"{committed_then_crashed} entries committed before the crash, but the rescuer "
        f"recognised {redelivered} as already applied",
    )
    dead = _count(env.db, "SELECT COUNT(*) FROM dead_letters")
    fig.require(dead == 0, f"{dead} entries dead-lettered")
    fig.extra = {
        "committed_then_crashed": committed_then_crashed,
        "redelivered_and_skipped": redelivered,
        "rows_changed_by_redelivery": changed,
    }
    fig.seconds = time.monotonic() - t0
    return fig


def _count(db: Path, sql: str, params: tuple[Any, ...] = ()) -> int:
    conn = sqlite3.connect(db)
    try:
        return int(conn.execute(sql, params).fetchone()[0])
    finally:
        conn.close()


# -- 3. redis-server restarted -------------------------------------------------------------


def redis_restart(env: FaultEnv, *, puts: int, seconds: float = 6.0) -> Figures:
    """SHUTDOWN and, separately, SIGKILL redis-server (AOF everysec) during writes.

    The worker is frozen (SIGSTOP) for a while before each restart, so Redis holds a
    backlog of acknowledged puts that exist nowhere else when it goes down: those are
    what the restart must not lose.
    """
    fig = Figures("3. redis-server SHUTDOWN and SIGKILL", f"{puts:,} puts over {seconds:.0f} s")
    t0 = time.monotonic()
    mem = env.memory()
    w = WorkerProc(env, "w0").start()
    pause = min(1.5, seconds / 6)
    at_stake: list[int] = []
    exits: list[int | None] = []  # redis-server's exit status at each restart

    def went_down() -> None:
        exits.append(None if env.server.proc is None else env.server.proc.poll())

    def freeze_worker() -> None:
        assert w.proc is not None
        w.proc.send_signal(signal.SIGSTOP)
        time.sleep(pause)
        at_stake.append(sum(mem.backlog().values()))

    def thaw_worker() -> None:
        assert w.proc is not None
        w.proc.send_signal(signal.SIGCONT)

    with workers_stopped([w]):
        writer = TrackedWriter(mem, keys=200).start(puts, rate=puts / seconds)
        time.sleep(seconds / 4)
        freeze_worker()
        t_shutdown = time.monotonic()
        env.server.stop()
        went_down()
        time.sleep(0.3)
        env.server.start()
        t_up1 = time.monotonic()
        thaw_worker()
        time.sleep(seconds / 4)
        freeze_worker()
        t_kill = time.monotonic()
        env.server.kill()
        went_down()
        time.sleep(0.3)
        env.server.start()
        t_up2 = time.monotonic()
        thaw_worker()
        writer.join()
        drain = wait_drained(mem, 120)
        counters = w.stop()
    check = check_persisted(env.db, writer.acks, mem)
    mem.close()
    fig.sent = writer.sent
    fig.acked = check.acked
    fig.persisted = check.persisted
    fig.lost = len(check.lost)
    fig.duplicated = check.duplicated
    before_shutdown = [a for a in check.lost if a.at <= t_shutdown]
    outside_window = [a for a in check.lost if a.at <= t_kill - 1.0 or t_up2 < a.at]
    # A clean SHUTDOWN exits 0; a SIGKILL is the crash the loss window is about.
    fig.require(exits == [0, -signal.SIGKILL], f"redis-server exit statuses {exits}")
    fig.require(not before_shutdown, f"{len(before_shutdown)} puts acked before SHUTDOWN lost")
    fig.require(not outside_window, f"{len(outside_window)} lost puts outside the 1 s fsync window")
    fig.require(check.duplicated == 0, f"{check.duplicated} stream ids applied twice")
    fig.require(check.integrity == "ok", f"integrity_check: {check.integrity}")
    window = max((t_kill - a.at for a in check.lost), default=0.0)

    def first_ack_after(t: float) -> float | None:
        later = [a.at for a in writer.acks if a.at > t]
        return min(later) - t if later else None

    r1, r2 = first_ack_after(t_up1), first_ack_after(t_up2)
    fig.recover_s = max(x for x in (r1, r2) if x is not None) if (r1 or r2) else None
    fig.extra = {
        "uncommitted_acked_puts_at_shutdown_and_sigkill": at_stake,
        "lost_after_sigkill": len(check.lost),
        "loss_window_s": round(window, 3),
        "refused_while_down": dict(writer.errors),
        "redis_exit_statuses": exits,
        "first_put_after_restart_s": [r1, r2],
        "drain_s": round(drain, 3),
        "worker": counters,
        "timeline_s": {
            "shutdown": round(t_shutdown - t0, 3),
            "up_again": round(t_up1 - t0, 3),
            "sigkill": round(t_kill - t0, 3),
            "up_after_sigkill": round(t_up2 - t0, 3),
            "last_ack": round(max(a.at for a in writer.acks) - t0, 3),
        },
    }
    fig.notes.append(
        "redis-server SIGKILL loses only what it had not yet written to the AOF file; "
        "with appendfsync everysec that is at most the last second (about 2 s if the disk "
        "stalls); an OS crash can also lose the unsynced page cache"
    )
    fig.seconds = time.monotonic() - t0
    return fig


# -- 4. Redis unreachable ------------------------------------------------------------------


def redis_unreachable(env: FaultEnv, *, probes: int = 20) -> Figures:
    """Redis down (refused), frozen (SIGSTOP: timeouts) and back empty: fail fast, keep
    reading, resume writing with no manual step."""
    fig = Figures("4. Redis unreachable", f"{probes} puts per outage, 3 outages")
    t0 = time.monotonic()
    mem = env.memory(worker=True)
    p = WRITER
    levels = (Level.PRIVATE, Level.SWARM)
    base = [mem.put(f"base{i}", {"i": i}, level=levels[i % 2], principal=p) for i in range(20)]
    for r in base:
        mem.sync(r, timeout=10)
    fail_times: list[float] = []
    reads_ok = 0
    read_errors = 0
    recover: dict[str, float] = {}
    persist: dict[str, float] = {}
    phantom_keys: list[str] = []

    def outage(name: str) -> None:
        nonlocal reads_ok, read_errors
        for j in range(probes):
            key = f"probe-{name}-{j}"
            phantom_keys.append(key)
            t = time.monotonic()
            try:
                mem.put(key, {"j": j}, level=1, principal=p)
                fig.problems.append(f"{name}: put succeeded while Redis was unreachable")
            except StoreUnavailable:
                fail_times.append(time.monotonic() - t)
            try:
                got = mem.get(f"base{j % 20}", level=levels[j % 2], principal=p)
                reads_ok += got == {"i": j % 20}
                read_errors += got != {"i": j % 20}
            except Exception as exc:
                read_errors += 1
                fig.problems.append(f"{name}: read failed: {exc!r}")

    def comeback(name: str) -> None:
        t = time.monotonic()
        while True:
            try:
                r = mem.put(f"after-{name}", {"ok": True}, level=1, principal=p)
                break
            except StoreUnavailable:
                if time.monotonic() - t > 30:
                    fig.problems.append(f"{name}: writes did not resume within 30 s")
                    return
                time.sleep(0.01)
        recover[name] = time.monotonic() - t
        try:
            mem.sync(r, timeout=30)
            persist[name] = time.monotonic() - t
        except Exception as exc:
            fig.problems.append(f"{name}: a put after the outage was not persisted: {exc}")

    # (a) down: connection refused
    env.server.kill()
    outage("down")
    env.server.start()
    comeback("down")
    # (b) frozen: the process is there but answers nothing (timeouts, not refusals)
    assert env.server.proc is not None
    env.server.proc.send_signal(signal.SIGSTOP)
    try:
        outage("frozen")
    finally:
        env.server.proc.send_signal(signal.SIGCONT)
    comeback("frozen")
    # (c) back but empty (its data directory lost): groups must come back by themselves
    env.server.client().set(b"faults:witness", b"written before the crash")
    env.server.kill()
    workdir = getattr(env.server, "workdir", None)
    if workdir is not None:
        for f in Path(workdir).rglob("appendonly*"):
            if f.is_file():
                f.unlink()
    env.server.start()
    came_back_empty = not env.server.client().exists(b"faults:witness")
    fig.require(came_back_empty, "redis-server came back with its data: it was not emptied")
    outage_empty_t = time.monotonic()
    comeback("empty")
    try:
        wait_drained(mem, 30)
    except TimeoutError as exc:
        fig.problems.append(f"after the outages: {exc}")
    phantoms = _count(
        env.db,
        "SELECT COUNT(*) FROM journal WHERE key LIKE 'probe-%'",
    )
    mem.close()
    fig.sent = probes * 2 + len(recover) + sum(1 for p_ in fig.problems if "resume" in p_)
    fig.acked = len(recover)
    fig.persisted = len(persist)
    fig.recover_s = max(recover.values()) if recover else None
    worst = max(fail_times) if fail_times else None
    fig.require(worst is not None and worst < 1.0, f"slowest StoreUnavailable took {worst} s")
    fig.require(
        len(fail_times) == probes * 2, f"{len(fail_times)} of {probes * 2} puts failed fast"
    )
    fig.require(read_errors == 0, f"{read_errors} reads failed or were wrong during outages")
    fig.extra = {
        "slowest_failure_s": round(worst or 0, 3),
        "median_failure_s": round(statistics.median(fail_times), 4) if fail_times else None,
        "reads_ok_during_outages": reads_ok,
        "first_put_after_outage_s": {k: round(v, 3) for k, v in recover.items()},
        "persisted_after_outage_s": {k: round(v, 3) for k, v in persist.items()},
        "failed_puts_applied_later": phantoms,
        "empty_restart_at": round(outage_empty_t - t0, 3),
        "came_back_empty": came_back_empty,
    }
    fig.notes.append(
        "a put that times out (frozen Redis) raised StoreUnavailable but its command may "
        "still reach Redis and be persisted ('failed_puts_applied_later'): a timeout is "
        "ambiguous, a refusal is not"
    )
    fig.seconds = time.monotonic() - t0
    return fig


# -- 5. poison entries and the dead-letter queue --------------------------------------------


def _cli(env: FaultEnv, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "dualmem",
            *args,
            "--redis-url",
            env.server.url,
            "--db",
            str(env.db),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=env.workdir,
    )


def poison_entries(env: FaultEnv, *, puts: int, max_deliveries: int = 3) -> Figures:
    """Undecodable entries and one whose SQL fails go to ``dead_letters`` after
    ``max_deliveries`` tries with their error while the rest flows; ``dualmem dlq`` lists
    them and replays the one that can now succeed."""
    fig = Figures("5. poison entries, dlq", f"{puts:,} puts, 3 poison entries")
    t0 = time.monotonic()
    mem = env.memory()
    stream = mem.layout.stream(0)
    conn = sqlite3.connect(env.db)
    conn.execute(
        "CREATE TRIGGER fault_poison BEFORE INSERT ON memory "
        "WHEN instr(NEW.envelope, CAST('POISON' AS BLOB)) > 0 "
        "BEGIN SELECT RAISE(ABORT, 'poisoned by the fault suite'); END"
    )
    conn.commit()
    conn.close()
    client = env.server.client()
    w = WorkerProc(env, "w0", extra=("--max-deliveries", str(max_deliveries))).start()
    with workers_stopped([w]):
        writer = TrackedWriter(mem, keys=200).start(puts, rate=puts / 3)
        time.sleep(1.0)
        t_inject = time.monotonic()
        bad_ids = [
            client.xadd(stream, {b"op": b"put", b"s": b"swarm:faults", b"k": b"no-envelope"}),
            client.xadd(stream, {b"\xff\xfe": b"\x00\x01", b"op": b"\xff"}),
        ]
        poison = mem.put("poisoned", {"v": "POISON"}, level=Level.SWARM, principal=WRITER)
        newer = mem.put("poisoned", {"v": "newer"}, level=Level.SWARM, principal=WRITER)
        try:
            wait_for(lambda: _count(env.db, "SELECT COUNT(*) FROM dead_letters") >= 3, 60, "dlq")
        except TimeoutError as exc:
            fig.problems.append(str(exc))
        isolated = time.monotonic() - t_inject
        writer.join()
        drain = wait_drained(mem, 120)
        listed = _cli(env, "dlq", "list", "--json")
        fig.require(listed.returncode == 0, f"dlq list failed: {listed.stderr[-500:]}")
        views = json.loads(listed.stdout) if listed.returncode == 0 else []
        by_sid = {v["stream_id"]: v for v in views}
        want = {text(s) for s in bad_ids} | {poison.stream_id}
        fig.require(set(by_sid) == want, f"dlq list shows {sorted(by_sid)}, expected {want}")
        for v in views:
            fig.require(v["deliveries"] >= max_deliveries, f"dead after {v['deliveries']} tries")
            fig.require(bool(v["error"]), f"dead letter {v['id']} has no error")
        sql_error = by_sid.get(poison.stream_id, {}).get("error", "")
        fig.require("poisoned by the fault suite" in sql_error, f"SQL error kept: {sql_error!r}")
        # The cause is fixed; replay the SQL one. A newer put to its key was committed
        # meanwhile, so the replay must not bring back the older value.
        conn = sqlite3.connect(env.db)
        conn.execute("DROP TRIGGER fault_poison")
        conn.commit()
        conn.close()
        poison_id = by_sid.get(poison.stream_id, {}).get("id")
        replayed = _cli(
            env, "dlq", "replay", str(poison_id), "--keyring", str(env.keyfile), "--wait", "30"
        )
        fig.require(replayed.returncode == 0, f"dlq replay failed: {replayed.stderr[-500:]}")
        wait_drained(mem, 60)
        after = _cli(env, "dlq", "list", "--json")
        left = json.loads(after.stdout) if after.returncode == 0 else []
        counters = w.stop()
    check = check_persisted(env.db, writer.acks, mem)
    mem.sync(newer, timeout=10)
    final = mem.get("poisoned", level=Level.SWARM, principal=WRITER)
    history = mem.history("poisoned", level=Level.SWARM, principal=WRITER)
    mem.close()
    fig.require(
        poison.stream_id not in {v["stream_id"] for v in left}, "replayed letter still listed"
    )
    fig.require(
        any(h.stream_id not in (poison.stream_id, newer.stream_id) for h in history),
        "the replayed put was not committed",
    )
    fig.require(
        final == {"v": "newer"},
        f"the replay of an older put overwrote the newer value: {final!r}",
    )
    fig.sent = writer.sent + 4
    _record_check(fig, check)
    fig.recover_s = isolated
    fig.extra = {
        "dead_letters": len(views),
        "errors": sorted({v["error"][:80] for v in views}),
        "time_to_dead_letter_s": round(isolated, 3),
        "drain_s": round(drain, 3),
        "value_after_replay": final,
        "worker": counters,
    }
    fig.notes.append("recover = from injecting the poison until all three were dead-lettered")
    fig.seconds = time.monotonic() - t0
    return fig


# -- 6. backlog bound ------------------------------------------------------------------------


def _used_memory(client: Any) -> int:
    return int(client.info("memory")["used_memory"])


def backpressure(env: FaultEnv, *, bound: int, hammer_s: float, puts: int) -> Figures:
    """Past ``max_backlog`` puts raise Backpressure and Redis memory stops growing; a stuck
    consumer's pending entries survive every trim until they are claimed and committed."""
    fig = Figures("6. backlog bound, trimming", f"max_backlog={bound:,}, {puts:,} more puts")
    t0 = time.monotonic()
    mem = env.memory(max_backlog=bound)
    client = env.server.client()
    stream = mem.layout.stream(0)
    writer = TrackedWriter(mem, keys=200)
    # (a) no worker: fill up to the bound, then keep pushing.
    i = 0
    while writer.put_one(i) is not None:
        i += 1
        if i > bound * 2:
            fig.problems.append(f"{i} puts accepted with max_backlog={bound}")
            break
    xlen_at_bound = int(client.xlen(stream))
    mem_at_bound = _used_memory(client)
    refused = 0
    peak_mem = mem_at_bound
    deadline = time.monotonic() + hammer_s
    while time.monotonic() < deadline:
        if writer.put_one(i) is not None:
            fig.problems.append("a put was accepted past the bound")
            i += 1
        else:
            refused += 1
        if refused % 200 == 0:
            peak_mem = max(peak_mem, _used_memory(client))
    xlen_after = int(client.xlen(stream))
    fig.require(xlen_at_bound == bound, f"XLEN {xlen_at_bound} at the bound {bound}")
    fig.require(xlen_after == xlen_at_bound, f"XLEN grew to {xlen_after} while refusing")
    growth = peak_mem - mem_at_bound
    fig.require(growth < 256 * 1024, f"used_memory grew {growth} bytes while refusing")
    # (b) a consumer takes the oldest entries and hangs; workers trim around it.
    taken: Any = client.xreadgroup("persist", "stuck", {stream: ">"}, count=20)
    held = [text(sid) for sid, _ in taken[0][1]]
    w = WorkerProc(env, "w0", claim_idle_ms=3000).start()
    checks = 0
    missing: set[str] = set()
    max_xlen = xlen_after
    with workers_stopped([w]):
        writer.start(puts)
        while True:
            pending = client.xpending_range(stream, "persist", "-", "+", 100, "stuck")
            if not pending:
                break
            for sid in held:
                if not client.xrange(stream, sid, sid):
                    missing.add(sid)
            checks += 1
            max_xlen = max(max_xlen, int(client.xlen(stream)))
            if time.monotonic() - t0 > 120:
                fig.problems.append("the stuck consumer's entries were never claimed")
                break
            time.sleep(0.05)
        writer.join()
        drain = wait_drained(mem, 120)
        counters = w.stop()
    check = check_persisted(env.db, writer.acks, mem)
    mem.close()
    fig.require(not missing, f"{len(missing)} pending entries trimmed away: {sorted(missing)}")
    fig.require(max_xlen <= bound + 1, f"stream reached {max_xlen} entries (bound {bound})")
    fig.sent = writer.sent
    _record_check(fig, check)
    fig.recover_s = drain
    fig.extra = {
        "refused_at_bound": refused,
        "xlen_at_bound": xlen_at_bound,
        "used_memory_growth_while_refusing_bytes": growth,
        "backpressure_total": writer.errors.get("Backpressure", 0),
        "held_entries": len(held),
        "held_entries_checked_present": checks,
        "max_xlen": max_xlen,
        "worker": counters,
    }
    fig.notes.append(
        "a stuck consumer's pending entries block trimming, so the stream fills to the bound "
        "and writers get Backpressure until the entries are claimed (claim_idle_ms=3000)"
    )
    fig.seconds = time.monotonic() - t0
    return fig


# -- 7. killed inside a SQLite write transaction --------------------------------------------


def kill_in_transaction(env: FaultEnv, *, rounds: int, batch: int = 400) -> Figures:
    """SIGKILL a worker while its batch transaction is open (uncommitted pages already in
    the WAL): the file stays consistent and no part of the batch is ever visible."""
    fig = Figures("7. SIGKILL inside a SQLite transaction", f"{rounds} kills, batches of {batch}")
    t0 = time.monotonic()
    mem = env.memory()
    writer = TrackedWriter(mem, keys=10**9)
    wal = Path(str(env.db) + "-wal")
    visible_partial = 0
    wal_sizes: list[int] = []
    for r in range(rounds):
        first = len(writer.acks)
        writer.run(batch)
        ids = [(a.shard, a.stream_id) for a in writer.acks[first:]]
        marker = writer.acks[first + (2 * batch) // 3].key
        log = env.workdir / f"stall-{r}.log"
        child = spawn_role(
            "stall-in-txn",
            *("--redis-url", env.server.url, "--db", str(env.db), "--consumer", f"stall{r}"),
            *("--batch-size", str(batch), "--marker", marker),
            log=log,
        )
        try:
            wait_for(lambda log=log: "IN-TRANSACTION" in log.read_text(), 60, "the stall")  # type: ignore[misc]
            # While the transaction is open, another connection sees none of it.
            visible_partial += _visible(env.db, ids)
            wal_sizes.append(wal.stat().st_size if wal.exists() else 0)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(10)
        fig.require(child.returncode == -signal.SIGKILL, f"round {r}: exit {child.returncode}")
        fig.require(integrity(env.db) == "ok", f"round {r}: integrity_check failed")
        visible_partial += _visible(env.db, ids)
    w = WorkerProc(env, "rescuer").start()
    with workers_stopped([w]):
        recover = wait_drained(mem, 120)
        counters = w.stop()
    check = check_persisted(env.db, writer.acks, mem)
    mem.close()
    fig.require(visible_partial == 0, f"{visible_partial} rows of killed batches were visible")
    fig.sent = writer.sent
    _record_check(fig, check)
    fig.recover_s = recover
    fig.extra = {
        "rows_of_killed_batches_visible": visible_partial,
        "wal_bytes_at_kill": wal_sizes,
        "integrity_check": check.integrity,
        "rescuer": counters,
    }
    fig.notes.append(
        "the stalled worker's connection keeps an 8-page cache, so its uncommitted pages "
        "spill into the WAL before the kill; recovery must ignore those frames"
    )
    fig.seconds = time.monotonic() - t0
    return fig


def _visible(db: Path, ids: list[tuple[int, str]]) -> int:
    conn = sqlite3.connect(db)
    try:
        n = 0
        for shard, sid in ids:
            n += conn.execute(
                "SELECT COUNT(*) FROM journal WHERE shard = ? AND stream_id = ?", (shard, sid)
            ).fetchone()[0]
            n += conn.execute("SELECT COUNT(*) FROM memory WHERE stream_id = ?", (sid,)).fetchone()[
                0
            ]
        return n
    finally:
        conn.close()


# -- 8. two workers and readers --------------------------------------------------------------


def workers_and_readers(
    env: FaultEnv, *, seconds: float, rate: int = 1500, readers: int = 2
) -> Figures:
    """Two workers in one consumer group and reader processes, for ``seconds``."""
    fig = Figures(
        "8. two workers + readers", f"{seconds:.0f} s, {rate:,} puts/s, {readers} reader processes"
    )
    t0 = time.monotonic()
    mem = env.memory()
    keys = 1000
    workers = [WorkerProc(env, name, batch_size=200).start() for name in ("a", "b")]
    logs = [env.workdir / f"reader-{n}.log" for n in range(readers)]
    procs = [
        spawn_role(
            "reader",
            *("--redis-url", env.server.url, "--db", str(env.db), "--keyring", str(env.keyfile)),
            *("--keys", str(keys), "--seconds", str(seconds)),
            log=log,
        )
        for log in logs
    ]
    with workers_stopped(workers):
        writer = TrackedWriter(mem, keys=keys).start(int(rate * seconds), rate=rate)
        writer.join()
        for p in procs:
            p.wait(seconds + 60)
        drain = wait_drained(mem, 120)
        counters = [w.stop() for w in workers]
    check = check_persisted(env.db, writer.acks, mem)
    mem.close()
    results: list[dict[str, Any]] = []
    for log in logs:
        lines = [ln for ln in log.read_text().splitlines() if ln.startswith("{")]
        results.append(json.loads(lines[-1]) if lines else {"missing": True})
    fig.require(all("missing" not in r for r in results), f"a reader did not report: {results}")
    errors = sum(sum(r.get("errors", {}).values()) for r in results)
    regressions = sum(r.get("regressions", 0) for r in results)
    locked = sum(w.text().count("locked") for w in workers)
    fig.require(errors == 0, f"readers saw errors: {[r.get('errors') for r in results]}")
    fig.require(regressions == 0, f"{regressions} reads went back to an older value")
    fig.require(locked == 0, f"'database is locked' {locked} times in the worker logs")
    applied = [c.get("applied", 0) for c in counters]
    fig.require(all(a > 0 for a in applied), f"a worker applied nothing: {applied}")
    fig.sent = writer.sent
    _record_check(fig, check)
    fig.recover_s = drain
    fig.extra = {
        "reads": sum(r.get("reads", 0) for r in results),
        "queries": sum(r.get("queries", 0) for r in results),
        "reader_errors": errors,
        "regressions": regressions,
        "locked_in_worker_logs": locked,
        "applied_per_worker": applied,
        "duplicates_recognised": sum(c.get("duplicates", 0) for c in counters),
    }
    fig.seconds = time.monotonic() - t0
    return fig


# -- registry and report -------------------------------------------------------------------


@dataclass(frozen=True)
class Size:
    """The parameters of one run of every scenario."""

    sigkill_puts: int
    sigkill_kills: int
    crash_rounds: int
    restart_puts: int
    restart_seconds: float
    unreachable_probes: int
    poison_puts: int
    backlog_bound: int
    backlog_puts: int
    txn_kills: int
    concurrent_seconds: float
    cross_attempts: int
    tamper_rounds: int
    nonces: int
    rotation_records: int
    fuzz_cases: int


QUICK = Size(
    sigkill_puts=2_000,
    sigkill_kills=4,
    crash_rounds=3,
    restart_puts=2_000,
    restart_seconds=3.0,
    unreachable_probes=4,
    poison_puts=1_000,
    backlog_bound=500,
    backlog_puts=2_000,
    txn_kills=2,
    concurrent_seconds=4.0,
    cross_attempts=400,
    tamper_rounds=240,
    nonces=250_000,
    rotation_records=600,
    fuzz_cases=800,
)
FULL = Size(
    sigkill_puts=20_000,
    sigkill_kills=20,
    crash_rounds=20,
    restart_puts=20_000,
    restart_seconds=10.0,
    unreachable_probes=20,
    poison_puts=10_000,
    backlog_bound=5_000,
    backlog_puts=20_000,
    txn_kills=10,
    concurrent_seconds=60.0,
    cross_attempts=5_000,
    tamper_rounds=2_000,
    nonces=1_000_000,
    rotation_records=5_000,
    fuzz_cases=5_000,
)

Scenario = Callable[[FaultEnv, Size], Figures]

FAULTS: dict[str, Scenario] = {
    "worker_sigkill": lambda env, s: worker_sigkill(
        env, puts=s.sigkill_puts, kills=s.sigkill_kills
    ),
    "commit_then_crash": lambda env, s: commit_then_crash(env, rounds=s.crash_rounds),
    "redis_restart": lambda env, s: redis_restart(
        env, puts=s.restart_puts, seconds=s.restart_seconds
    ),
    "redis_unreachable": lambda env, s: redis_unreachable(env, probes=s.unreachable_probes),
    "poison_entries": lambda env, s: poison_entries(env, puts=s.poison_puts),
    "backpressure": lambda env, s: backpressure(
        env, bound=s.backlog_bound, hammer_s=1.0, puts=s.backlog_puts
    ),
    "kill_in_transaction": lambda env, s: kill_in_transaction(env, rounds=s.txn_kills),
    "workers_and_readers": lambda env, s: workers_and_readers(env, seconds=s.concurrent_seconds),
    "cross_scope_reads": lambda env, s: _with_memory(
        env, lambda mem: attacks.cross_scope_reads(mem, attempts=s.cross_attempts)
    ),
    "tampering": lambda env, s: _with_memory(
        env,
        lambda mem: attacks.tampering(mem, env.server.client(), env.db, rounds=s.tamper_rounds),
    ),
    "nonces": lambda env, s: attacks.nonces(s.nonces),
    "key_rotation": lambda env, s: attacks.key_rotation(env, records=s.rotation_records),
    "audit_log": lambda env, s: _with_memory(
        env, lambda mem: attacks.audit_log_attacks(mem, env.db, env.workdir)
    ),
    "fuzz": lambda env, s: attacks.fuzz(env, cases=s.fuzz_cases),
}


def _with_memory(env: FaultEnv, scenario: Callable[[DualMemory], Figures]) -> Figures:
    mem = env.memory(worker=True)
    try:
        return scenario(mem)
    finally:
        mem.close()


@contextlib.contextmanager
def fresh_env(root: Path, name: str) -> Iterator[FaultEnv]:
    """A new redis-server and directory for one scenario."""
    workdir = root / name
    server = RedisProcess(workdir / "redis")
    server.start()
    try:
        yield FaultEnv(server, workdir)
    finally:
        server.stop()
        server.kill()


def run_all(size: Size, only: list[str] | None = None) -> list[Figures]:
    """Run every scenario (or ``only`` those) at ``size``; each in its own world."""
    out: list[Figures] = []
    with tempfile.TemporaryDirectory(prefix="dualmem-faults-") as tmp:
        for name, scenario in FAULTS.items():
            if only and name not in only:
                continue
            print(f">> {name}", file=sys.stderr, flush=True)
            with fresh_env(Path(tmp), name) as env:
                fig = scenario(env, size)
            print(f"   {json.dumps(fig.to_json(), default=str)}", file=sys.stderr, flush=True)
            out.append(fig)
    return out


def _cell(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def render(figures: list[Figures], size_name: str, seconds: float) -> str:
    """The markdown report."""
    lines = [
        "# dualmem fault and attack suite (issue 6)",
        "",
        f"Generated by `python -m bench.faults{' --quick' if size_name == 'quick' else ''}` "
        f"({size_name} size) in {seconds:.0f} s on {platform.system()} {platform.machine()}, "
        f"Python {platform.python_version()}, redis-server and worker processes on 127.0.0.1.",
        "The same scenario functions run at their quick sizes in `tests/test_faults.py` and "
        "`tests/test_attacks.py`, which fail on any problem listed below.",
        "",
        "| scenario | size | sent | acked | persisted | lost | duplicated | denials | "
        "recover (s) | problems |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for f in figures:
        cells = [f.sent, f.acked, f.persisted, f.lost, f.duplicated, f.denials, f.recover_s]
        lines.append(
            f"| {f.scenario} | {f.size} | "
            + " | ".join(_cell(c) for c in cells)
            + f" | {len(f.problems) or 'none'} |"
        )
    lost = sum(f.lost or 0 for f in figures)
    dup = sum(f.duplicated or 0 for f in figures)
    problems = sum(len(f.problems) for f in figures)
    lines += [
        "",
        f"**In all: {lost} lost, {dup} duplicated, {problems} problems.**",
        "",
        "Columns: *sent* = put attempts (or attacks), *acked* = puts that returned a receipt, "
        "*persisted* = acknowledged puts found in `journal`, *lost* = acknowledged and not "
        "persisted, *duplicated* = stream ids applied more than once, *denials* = reads "
        "refused with an audited `AccessDenied` (9) or statements the database refused "
        "(12). *recover* is per scenario: 1 the slowest time from a SIGKILL until the dead "
        "worker's pending entries were committed by its successor; 2 and 7 the rescuer's "
        "drain; 3 and 4 the slowest time from Redis being back to the next acknowledged "
        "put; 5 the time from injecting the poison to all of it being dead-lettered; 6 and "
        "8 the drain once the writers stopped.",
    ]
    lines.append("")
    for f in figures:
        lines += [f"## {f.scenario}", ""]
        for k, v in f.extra.items():
            lines.append(f"- {k}: `{json.dumps(v, default=str)}`")
        for n in f.notes:
            lines.append(f"- note: {n}")
        for p in f.problems:
            lines.append(f"- **PROBLEM**: {p}")
        lines.append(f"- ran in {f.seconds:.1f} s")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the suite and write the report; exit 1 if any property did not hold."""
    p = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__)
    p.add_argument("--quick", action="store_true", help="the CI sizes")
    p.add_argument("--only", nargs="*", help="run only these scenarios")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="report path (default: bench/results/FAULTS.md for a full run of every "
        "scenario, a temporary file otherwise, so the committed report is only ever "
        "replaced by a full run)",
    )
    args = p.parse_args(argv)
    out: Path | None = args.out
    if out is None:
        if args.quick or args.only:
            out = Path(tempfile.mkdtemp(prefix="dualmem-faults-")) / "FAULTS.md"
        else:
            out = RESULTS
    t0 = time.monotonic()
    figures = run_all(QUICK if args.quick else FULL, args.only)
    text = render(figures, "quick" if args.quick else "full", time.monotonic() - t0)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"report: {out}")
    return 1 if any(f.problems for f in figures) else 0


if __name__ == "__main__":
    sys.exit(main())
