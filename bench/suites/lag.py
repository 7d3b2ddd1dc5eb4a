"""Lag: time from a write's intended send time until SQLite readers can see it, at
open-loop offered rates."""

from __future__ import annotations

import contextlib
import gc
import math
import multiprocessing
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from bench.harness import LEVELS, PRINCIPAL, Backend, Bench, make_values
from bench.openloop import Send, run_open_loop, schedule, senders_for
from bench.servers import WorkerProcess, cpu_pressure_us
from bench.stats import Target, summarize, us
from dualmem import DualMemory
from dualmem.sqlite_store import prefix_upper_bound

__all__ = [
    "CpuUse",
    "FullCollections",
    "Observer",
    "ObserverProcess",
    "RedisForks",
    "run",
    "wait_committed",
]

TARGETS_MS = {2000: 5.0, 10_000: 20.0}
POLL_S = 0.0005
#: How long the suite waits, after the observer's window, for every write of a rate to be
#: committed before it calls the missing ones lost.
COMMIT_WAIT_S = 600.0
_START_DELAY_NS = 300_000_000

METHOD = (
    "Every write has an intended send time fixed in advance (open loop: a constant "
    "offered rate, split round-robin over several sender processes on real Redis so that "
    "no sender is offered more than `per_sender_rate`; threads in the one process on "
    "fakeredis). Lag is measured from that intended time, so a sender that falls behind "
    "adds its queueing to the lag instead of hiding it (no coordinated omission). A write"
    " counts as queryable when an observer polling the journal table of the SQLite file "
    "(a separate read connection in a process of its own, so it never takes turns at the "
    "GIL with what it measures; every 0.5 ms) first sees it, so figures include up to one"
    " poll interval. Real Redis: writers run with `worker=False` and one `dualmem worker`"
    " process persists; fakeredis: the embedded default (writers and the worker thread in"
    " one process). The first `lag_warmup_s` of each rate are sent but not counted. In the"
    " one-process case, full garbage collections during each rate are recorded (`full_gc`):"
    " count, longest and total pause, and how many counted writes were in flight during one."
    " On a real Redis, the server's forks during each rate are counted (`redis_forks`, from"
    " `INFO stats`: with AOF on and no RDB snapshots, each one an automatic AOF rewrite)"
    " with the length of the last fork call, which stops the server meanwhile."
    " The observer stops `lag_seconds` + 60 s after the start; writes it has not seen by "
    "then are `not_visible` (no lag figure: the rate's target is n/a). After the window "
    "the suite waits (up to 600 s) until the journal holds every write of the rate and "
    "records that count (`committed`); a write still missing then fails the run, so a "
    "loss is never reported as lag."
    " CPU: each process's user + system time during a rate, per write sent (the senders and"
    " the observer count their own; the worker process and redis-server are read from"
    " `/proc`), and the share of the same window in which some runnable task waited for a"
    " CPU (the kernel's pressure stall information): how saturated the machine was."
)


class CpuUse:
    """CPU time per write of every process taking part in one rate, and how saturated the
    machine was.

    ``probes`` read a process's CPU seconds so far (``/proc`` for the worker process and
    redis-server, ``time.process_time`` for this process); they are read when the block
    starts and ends. Processes that measure themselves (sender processes, the observer)
    hand their seconds to :meth:`report`. The window runs from just before the first
    intended send until every write was visible, so per-write figures leave out start-up.
    ``cpu_wait_share``: the part of the window in which some runnable task waited for a
    CPU (``None`` where the kernel has no pressure stall information).

    >>> with CpuUse({"this process": time.process_time}) as cpu:
    ...     _ = sum(range(100_000))
    >>> row = cpu.report(writes=10, offered_rate=1000, reported={"observer": 0.001})
    >>> list(row["per_write_us"]), row["per_write_us"]["observer"]
    (['this process', 'observer'], 100.0)
    >>> row["total_us"] >= 100 and row["needed_cpus"] == row["total_us"] * 1000 / 1e6
    True
    """

    def __init__(self, probes: Mapping[str, Callable[[], float | None]]) -> None:
        self._probes = dict(probes)
        self._start: dict[str, float | None] = {}
        self.used: dict[str, float] = {}
        self._pressure: int | None = None
        self._t0 = 0
        self.cpu_wait_share: float | None = None

    def __enter__(self) -> CpuUse:
        self._start = {name: probe() for name, probe in self._probes.items()}
        self._pressure = cpu_pressure_us()
        self._t0 = time.monotonic_ns()
        return self

    def __exit__(self, *exc: object) -> None:
        wall_us = (time.monotonic_ns() - self._t0) / 1000
        for name, probe in self._probes.items():
            before, after = self._start[name], probe()
            if before is not None and after is not None:
                self.used[name] = after - before
        after_p = cpu_pressure_us()
        if self._pressure is not None and after_p is not None and wall_us > 0:
            self.cpu_wait_share = min(1.0, (after_p - self._pressure) / wall_us)

    def report(
        self, writes: int, offered_rate: int, reported: Mapping[str, float]
    ) -> dict[str, Any]:
        """Per-write microseconds of each process (probed ones first, then ``reported``),
        their total, the CPUs that total needs at ``offered_rate``, and the CPU wait share."""
        seconds = {**self.used, **reported}
        per_write = {name: sec / max(writes, 1) * 1e6 for name, sec in seconds.items()}
        total = sum(per_write.values())
        return {
            "per_write_us": per_write,
            "total_us": total,
            "needed_cpus": total * offered_rate / 1e6,
            "cpus": os.cpu_count(),
            "cpu_wait_share": self.cpu_wait_share,
        }


class RedisForks:
    """Forks of a real redis-server while entered (``INFO stats``: ``total_forks``).

    With AOF on and RDB snapshots off (the benchmark's server), each fork is an AOF
    rewrite Redis starts on its own once the file has doubled (and passed 64 MB): the
    rewrite child takes a CPU while it runs, and the ``fork()`` call itself stops the
    server. The lag suite records both per rate, to tell a Redis rewrite from the
    system under test when a rate's tail moves. ``latest_fork_ms`` is the last fork's
    call (Redis keeps only the latest), or ``None`` when there was none.
    """

    def __init__(self, client: Any) -> None:
        self._client = client
        self._before = 0
        self.count = 0
        self.latest_fork_ms: float | None = None

    def _stats(self) -> tuple[int, float]:
        info = self._client.info("stats")
        return int(info["total_forks"]), float(info["latest_fork_usec"]) / 1000

    def __enter__(self) -> RedisForks:
        self._before = self._stats()[0]
        return self

    def __exit__(self, *exc: object) -> None:
        total, latest_ms = self._stats()
        self.count = total - self._before
        self.latest_fork_ms = latest_ms if self.count else None

    def report(self) -> dict[str, Any]:
        """``{"count": forks, "latest_fork_ms": the last fork call's ms or None}``."""
        return {"count": self.count, "latest_fork_ms": self.latest_fork_ms}


class FullCollections:
    """Full (generation 2) garbage collections in this process while it is entered.

    The embedded default keeps its cache inside the interpreter (fakeredis holds one
    tracked object per cached entry), so a full collection walks every cached entry while
    it holds the GIL: the writers and the worker thread stop for it. Recorded as
    ``(start_ns, end_ns)`` on ``time.monotonic_ns``, the clock of the sends and of the
    observer, so each write's lag window can be checked against them.

    >>> with FullCollections() as fc:
    ...     _ = gc.collect()
    >>> len(fc.pauses) >= 1 and fc.pauses[0][1] >= fc.pauses[0][0]
    True
    """

    def __init__(self) -> None:
        self.pauses: list[tuple[int, int]] = []
        self._start = 0

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._start = time.monotonic_ns()
        elif self._start:
            self.pauses.append((self._start, time.monotonic_ns()))
            self._start = 0

    def __enter__(self) -> FullCollections:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def report(self, windows: list[tuple[int, int]]) -> dict[str, Any]:
        """Count, longest and total pause, and how many of ``windows`` (a write's intended
        send time to its first sighting) contain part of a pause."""
        hit = 0
        for begin, end in windows:
            if any(s < end and e > begin for s, e in self.pauses):
                hit += 1
        lengths = [e - s for s, e in self.pauses]
        return {
            "count": len(lengths),
            "max_ms": max(lengths, default=0) / 1e6,
            "total_ms": sum(lengths) / 1e6,
            "writes_in_flight": hit,
        }


class Observer:
    """Polls the journal for keys under ``prefix`` and notes when each first appears."""

    def __init__(self, db: Path, prefix: str, stop: Any = None) -> None:
        self.db = db
        self.prefix = prefix
        self.seen: dict[int, int] = {}
        self._conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, check_same_thread=False)
        self._conn.execute("PRAGMA busy_timeout = 5000")
        row = self._conn.execute("SELECT COALESCE(MAX(seq), 0) FROM journal").fetchone()
        self._seq = int(row[0])
        # Anything with is_set()/set(): a multiprocessing Event when it runs in a child.
        self._stop = threading.Event() if stop is None else stop

    def poll(self) -> int:
        """One poll; returns how many new keys of ours became visible."""
        rows = self._conn.execute(
            "SELECT seq, key FROM journal WHERE seq > ? ORDER BY seq", (self._seq,)
        ).fetchall()
        now = time.monotonic_ns()
        found = 0
        for seq, key in rows:
            self._seq = seq
            if key.startswith(self.prefix):
                index = int(key[len(self.prefix) :])
                if index not in self.seen:
                    self.seen[index] = now
                    found += 1
        return found

    def follow(self, expected: int, deadline_ns: int) -> None:
        """Poll until ``expected`` keys were seen, ``stop()`` or the deadline."""
        while len(self.seen) < expected and not self._stop.is_set():
            if time.monotonic_ns() > deadline_ns:
                return
            self.poll()
            time.sleep(POLL_S)

    def stop(self) -> None:
        """Make ``follow`` return."""
        self._stop.set()

    def close(self) -> None:
        """Close the read connection."""
        self._conn.close()


class ObserverProcess:
    """An :class:`Observer` in a process of its own, with the same ``follow``/``stop``/
    ``close``/``seen`` surface.

    The observer is the measuring instrument: in the measured process it would take turns
    at the GIL with the writers and the worker thread (the embedded default), and every
    turn it waited for would be reported as lag. Its clock is ``time.monotonic_ns``, which
    is system-wide, so its sightings compare with the senders' intended times.
    """

    def __init__(self, db: Path, prefix: str) -> None:
        mp = multiprocessing.get_context("spawn")
        self._pipe, child = mp.Pipe()
        self._stop = mp.Event()
        self._proc = mp.Process(
            target=_observer_process, args=(child, str(db), prefix, self._stop), daemon=True
        )
        self._proc.start()
        # Ready means it has read the journal's current end: nothing sent later is missed.
        if not self._pipe.poll(60) or self._pipe.recv() != "ready":
            self.close()
            raise RuntimeError("the lag observer process did not start")
        self.seen: dict[int, int] = {}
        #: CPU seconds the observer used in its last ``follow``.
        self.cpu_seconds = 0.0

    def follow(self, expected: int, deadline_ns: int) -> None:
        """Poll (in the child) until ``expected`` keys were seen, ``stop()`` or the deadline."""
        self._pipe.send((expected, deadline_ns))
        wait_s = max(0.0, (deadline_ns - time.monotonic_ns()) / 1e9) + 30
        if not self._pipe.poll(wait_s):
            raise RuntimeError("the lag observer process did not report")
        self.seen, self.cpu_seconds = self._pipe.recv()

    def stop(self) -> None:
        """Make ``follow`` return with what was seen so far."""
        self._stop.set()

    def close(self) -> None:
        """Stop the child process."""
        self._stop.set()
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        self._pipe.close()


def _observer_process(conn: Connection, db: str, prefix: str, stop: Any) -> None:
    observer = Observer(Path(db), prefix, stop)
    try:
        conn.send("ready")
        if not conn.poll(600):
            return
        expected, deadline_ns = conn.recv()
        cpu0 = time.process_time()
        observer.follow(expected, deadline_ns)
        conn.send((observer.seen, time.process_time() - cpu0))
    finally:
        observer.close()
        conn.close()


def _sender(
    mem: DualMemory, rate: int, seconds: float, start_ns: int, senders: int, k: int, seed: str
) -> list[Send]:
    import random

    values = make_values(random.Random(seed), 16)
    prefix = f"bench/lag/{rate}/"
    nlev = len(LEVELS)

    def send(i: int) -> None:
        mem.put(f"{prefix}{i}", values[i % 16], level=LEVELS[i % nlev], principal=PRINCIPAL)

    plan = schedule(rate, seconds, start_ns, senders=senders, sender=k)
    return run_open_loop(plan, send)


def _sender_process(
    conn: Connection, url: str, db: str, keyfile: str, rate: int, seconds: float, senders: int,
    k: int, seed: str,
) -> None:  # fmt: skip
    """Entry point of one sender process: connect, say ready, wait for the start time."""
    # The raw client's socket timeout, as every benchmark DualMemory (see Bench.memory).
    mem = DualMemory(redis_url=url, db_path=db, keyring=keyfile, worker=False, socket_timeout=5.0)
    try:
        conn.send("ready")
        start_ns = conn.recv()
        cpu0 = time.process_time()
        sends = _sender(mem, rate, seconds, start_ns, senders, k, seed)
        conn.send((sends, time.process_time() - cpu0))
    finally:
        mem.close()
        conn.close()


def _run_rate_processes(
    ctx: Bench, backend: Backend, db: Path, rate: int, observer: ObserverProcess, cpu: CpuUse
) -> tuple[list[Send], dict[str, float]]:
    """Sends of every sender process, and the CPU seconds the senders and the observer
    report; ``cpu`` is entered just before the start time is sent."""
    sizes = ctx.sizes
    senders = senders_for(rate, sizes.per_sender_rate)
    mp = multiprocessing.get_context("spawn")
    pipes: list[Connection] = []
    procs = []
    for k in range(senders):
        parent, child = mp.Pipe()
        p = mp.Process(
            target=_sender_process,
            args=(
                child,
                backend.url,
                str(db),
                str(ctx.keyfile),
                rate,
                sizes.lag_seconds,
                senders,
                k,
                f"{ctx.seed}:lag:{k}",
            ),
            daemon=True,
        )
        p.start()
        pipes.append(parent)
        procs.append(p)
    try:
        for pipe in pipes:
            if not pipe.poll(60) or pipe.recv() != "ready":
                raise RuntimeError("a lag sender process did not start")
        sends: list[Send] = []
        sender_cpu = 0.0
        with cpu:
            start_ns = time.monotonic_ns() + _START_DELAY_NS
            for pipe in pipes:
                pipe.send(start_ns)
            expected = int(rate * sizes.lag_seconds)
            observer.follow(expected, start_ns + int((sizes.lag_seconds + 60) * 1e9))
            for pipe in pipes:
                if not pipe.poll(120):
                    raise RuntimeError("a lag sender process did not report")
                part, seconds = pipe.recv()
                sends.extend(part)
                sender_cpu += seconds
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    return sends, {"senders": sender_cpu, "observer": observer.cpu_seconds}


def _run_rate_threads(
    ctx: Bench, mem: DualMemory, rate: int, observer: ObserverProcess, cpu: CpuUse
) -> tuple[list[Send], dict[str, float]]:
    """Sends of every sender thread, and the observer's CPU seconds; ``cpu`` spans the
    threads' run."""
    sizes = ctx.sizes
    senders = senders_for(rate, sizes.per_sender_rate)
    start_ns = time.monotonic_ns() + _START_DELAY_NS
    results: list[list[Send]] = [[] for _ in range(senders)]
    errors: list[BaseException] = []

    def body(k: int) -> None:
        try:
            results[k] = _sender(
                mem, rate, sizes.lag_seconds, start_ns, senders, k, f"{ctx.seed}:lag:{k}"
            )
        except BaseException as exc:  # reported below, not lost in a thread
            errors.append(exc)
            observer.stop()

    threads = [threading.Thread(target=body, args=(k,)) for k in range(senders)]
    with cpu:
        for t in threads:
            t.start()
        expected = int(rate * sizes.lag_seconds)
        observer.follow(expected, start_ns + int((sizes.lag_seconds + 60) * 1e9))
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    return [s for r in results for s in r], {"observer": observer.cpu_seconds}


def wait_committed(db: Path, prefix: str, writes: int, timeout_s: float = COMMIT_WAIT_S) -> int:
    """How many writes under ``prefix`` the journal of ``db`` holds, once it holds
    ``writes`` of them or ``timeout_s`` has passed (polled every 0.2 s).

    Run after the observer's window closed: it tells writes that were only late apart
    from writes that were lost.

    >>> import tempfile
    >>> db = Path(tempfile.mkdtemp()) / "m.db"
    >>> with DualMemory("memory://wait-committed", db_path=str(db)) as mem:
    ...     _ = [mem.put(f"lag/5/{i}", i, level=3, principal=PRINCIPAL) for i in range(3)]
    ...     mem.sync(mem.put("lag/50/0", 0, level=3, principal=PRINCIPAL), timeout=10)
    >>> wait_committed(db, "lag/5/", 3), wait_committed(db, "lag/5/", 4, timeout_s=0.3)
    (3, 3)
    """
    upper = prefix_upper_bound(prefix)
    sql = "SELECT COUNT(*) FROM journal WHERE key >= ?" + ("" if upper is None else " AND key < ?")
    params = (prefix,) if upper is None else (prefix, upper)
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
        deadline = time.monotonic() + timeout_s
        while True:
            n = int(conn.execute(sql, params).fetchone()[0])
            if n >= writes or time.monotonic() >= deadline:
                return n
            time.sleep(0.2)
    finally:
        conn.close()


def _committed(db: Path, rate: int, row: dict[str, Any]) -> None:
    """Record how many of the rate's writes were committed in the end; fail on a loss."""
    writes = row["writes"]
    row["committed"] = n = wait_committed(db, f"bench/lag/{rate}/", writes, COMMIT_WAIT_S)
    if n < writes:
        raise RuntimeError(
            f"lag at {rate}/s: {writes - n} of {writes} acknowledged writes were not "
            f"committed {COMMIT_WAIT_S:.0f} s after the observer's window"
        )


def _analyse(
    rate: int,
    sends: list[Send],
    seen: dict[int, int],
    ctx: Bench,
    collections: FullCollections | None = None,
) -> dict[str, Any]:
    if not sends:
        raise RuntimeError(f"no sends at {rate}/s")
    start = min(due for _, due, _, _ in sends)
    warm_end = start + int(ctx.sizes.lag_warmup_s * 1e9)
    counted = [s for s in sends if s[1] >= warm_end]
    lags = [seen[i] - due for i, due, _, _ in counted if i in seen]
    # Diagnosis only: from the moment the send actually started, i.e. without the
    # senders' own queueing. The targets use ``lags`` (from the intended time).
    after_start = [seen[i] - started for i, _, started, _ in counted if i in seen]
    missing = sum(1 for i, _, _, _ in counted if i not in seen)
    late = [started - due for _, due, started, _ in counted]
    last_end = max(end for _, _, _, end in sends)
    row: dict[str, Any] = {
        "offered_rate": rate,
        "senders": senders_for(rate, ctx.sizes.per_sender_rate),
        "writes": len(sends),
        "counted": len(counted),
        "not_visible": missing,
        "achieved_send_rate": len(sends) / max((last_end - start) / 1e9, 1e-9),
        "lag": summarize(lags),
        "lag_from_send_start": summarize(after_start),
        "send_start_delay": summarize(late),
        "send_latency": summarize(end - started for _, _, started, end in counted),
    }
    if collections is not None:
        row["full_gc"] = collections.report(
            [(due, seen[i]) for i, due, _, _ in counted if i in seen]
        )
    return row


def run(ctx: Bench, backend: Backend) -> dict[str, Any]:
    """Each offered rate for ``lag_seconds``; lag percentiles per rate."""
    sizes = ctx.sizes
    db = ctx.path(f"lag-{backend.name}.db")
    advance = ctx.progress.task(f"lag [{backend.name}]", len(sizes.lag_rates))
    results: list[dict[str, Any]] = []
    if backend.server is not None:  # a real Redis: its worker runs as a process
        server_cpu = backend.server.cpu_seconds
        # The database must exist (schema included) before the observer opens it.
        DualMemory(
            redis_url=backend.url, db_path=str(db), keyring=str(ctx.keyfile), worker=False
        ).close()
        raw = backend.raw_client()
        with WorkerProcess(backend.url, db) as worker, contextlib.closing(raw):
            for rate in sizes.lag_rates:
                observer = ObserverProcess(db, f"bench/lag/{rate}/")
                try:
                    cpu = CpuUse({"worker": worker.cpu_seconds, "redis-server": server_cpu})
                    with RedisForks(raw) as forks:
                        sends, reported = _run_rate_processes(ctx, backend, db, rate, observer, cpu)
                    row = _analyse(rate, sends, observer.seen, ctx)
                    row["cpu"] = cpu.report(len(sends), rate, reported)
                    row["redis_forks"] = forks.report()
                    _committed(db, rate, row)
                    results.append(row)
                finally:
                    observer.close()
                advance(1)
    else:
        mem = ctx.memory(backend, db)
        try:
            for rate in sizes.lag_rates:
                observer = ObserverProcess(db, f"bench/lag/{rate}/")
                try:
                    cpu = CpuUse({"dualmem process": time.process_time})
                    with FullCollections() as collections:
                        sends, reported = _run_rate_threads(ctx, mem, rate, observer, cpu)
                    row = _analyse(rate, sends, observer.seen, ctx, collections)
                    row["cpu"] = cpu.report(len(sends), rate, reported)
                    _committed(db, rate, row)
                    results.append(row)
                finally:
                    observer.close()
                advance(1)
        finally:
            mem.close(timeout=120)
    targets = []
    for row in results:
        limit = TARGETS_MS.get(row["offered_rate"])
        if limit is None:
            continue
        p95_ms = row["lag"]["p95"] / 1000
        if row["not_visible"]:
            p95_ms = math.nan  # writes that never became visible cannot meet a lag target
        targets.append(
            Target.check(
                "lag",
                backend.name,
                f"lag p95 at {row['offered_rate']} writes/s",
                p95_ms,
                "<=",
                limit,
                " ms",
                dualmem=f"p50 {us(row['lag']['p50'])}, p99 {us(row['lag']['p99'])}",
            )
        )
    return {
        "method": METHOD,
        "rates": results,
        "poll_interval_ms": POLL_S * 1000,
        "targets": [t.to_json() for t in targets],
    }
