"""Fault-injection kit: real redis-server and worker processes, a tracked writer, checks.

Used by ``bench.faults`` (the report) and by ``tests/test_faults.py`` (the quick sizes):
one implementation of each scenario, so the committed report measures exactly what CI
asserts. Child roles that must run in their own process (a worker that crashes between
COMMIT and XACK, a worker that stalls inside its SQLite transaction, a reader) are
started as ``python -m bench.faultkit <role> ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import redis

from acl import Keyring, Level, Principal
from bench.servers import RedisServer, free_port
from dualmem import Backpressure, DualMemError, DualMemory, StoreUnavailable

__all__ = [
    "ROOT",
    "Ack",
    "Check",
    "FaultEnv",
    "Figures",
    "PendingMonitor",
    "RedisProcess",
    "Server",
    "TrackedWriter",
    "WorkerProc",
    "check_persisted",
    "free_port",
    "integrity",
    "spawn_role",
    "wait_for",
]

ROOT = Path(__file__).resolve().parents[1]
WRITER = Principal(agent_id="fault-writer", team="ops", swarm="faults", project="dualmem")


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, poll: float = 0.01) -> Any:
    """Poll ``predicate`` until it is truthy; ``TimeoutError`` naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(poll)


class Server(Protocol):
    """What a scenario needs from a redis-server (``tests.conftest.RedisServer`` fits)."""

    port: int
    proc: subprocess.Popen[bytes] | None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""

    def start(self) -> object:
        """Start (or restart, on the same port and directory)."""

    def stop(self) -> None:
        """Clean SHUTDOWN (flushes the AOF)."""

    def kill(self) -> None:
        """SIGKILL, like a crash."""

    def client(self) -> redis.Redis:
        """A plain client."""


RedisProcess = RedisServer  # the fault scenarios' name for the shared launcher


@dataclass
class FaultEnv:
    """One scenario's world: a redis-server, a directory, a key file and a database path."""

    server: Server
    workdir: Path

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.keyfile.exists():
            Keyring.generate().save(self.keyfile)

    @property
    def keyfile(self) -> Path:
        """The key file every process of the scenario loads."""
        return self.workdir / "keys.json"

    @property
    def db(self) -> Path:
        """The SQLite database."""
        return self.workdir / "mem.db"

    def memory(self, **settings: Any) -> DualMemory:
        """A ``DualMemory`` on this world (no in-process worker unless asked)."""
        settings.setdefault("worker", False)
        return DualMemory(
            redis_url=self.server.url, db_path=str(self.db), keyring=str(self.keyfile), **settings
        )


@dataclass
class Figures:
    """What a scenario measured. ``problems`` lists every property that did not hold."""

    scenario: str
    size: str
    sent: int | None = None
    acked: int | None = None
    persisted: int | None = None
    lost: int | None = None
    duplicated: int | None = None
    denials: int | None = None
    recover_s: float | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def require(self, ok: bool, problem: str) -> None:
        """Record ``problem`` unless ``ok``."""
        if not ok:
            self.problems.append(problem)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {k: v for k, v in self.__dict__.items()}


# -- worker processes ----------------------------------------------------------------------


class WorkerProc:
    """A ``python -m dualmem worker`` process; its output goes to a log file (never a pipe
    that could fill up and block it)."""

    def __init__(
        self,
        env: FaultEnv,
        consumer: str,
        *,
        claim_idle_ms: int = 300,
        batch_size: int = 100,
        extra: Sequence[str] = (),
    ) -> None:
        self.env = env
        self.consumer = consumer
        self.args = [
            sys.executable,
            *("-m", "dualmem", "worker", "--redis-url", env.server.url, "--db", str(env.db)),
            *("--consumer", consumer, "--claim-idle-ms", str(claim_idle_ms)),
            *("--batch-size", str(batch_size), *extra),
        ]
        self.log = env.workdir / f"worker-{consumer}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self._log_start = 0  # where this process's output starts in the log

    def start(self) -> WorkerProc:
        """Spawn the process (again: its output goes on in the same log)."""
        with open(self.log, "ab") as out:
            self._log_start = out.tell()
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT)
        self.started_at = time.monotonic()
        return self

    def kill(self) -> None:
        """SIGKILL: no drain, no goodbye."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)

    def stop(self, timeout: float = 60) -> dict[str, int]:
        """SIGTERM (drain, then exit) and the counters the worker printed when it stopped.

        Waits for the start-up banner first: it is printed after the signal handlers are
        installed, and a SIGTERM before that ends the process without its report. Both
        are looked for in this process's output only: a restarted worker's log holds the
        banner and the report of the process before it.
        """
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(TimeoutError):
                wait_for(lambda: "dualmem worker" in self.own_text(), 30, "the worker banner")
            self.proc.send_signal(signal.SIGTERM)
        if self.proc is not None:
            self.proc.wait(timeout)
        return worker_counters(self.own_text())

    def text(self) -> str:
        """Everything written to the log so far (by every start of this worker)."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def own_text(self) -> str:
        """What the process of the last :meth:`start` wrote so far."""
        if not self.log.exists():
            return ""
        with open(self.log, "rb") as f:
            f.seek(self._log_start)
            return f.read().decode(errors="replace")


def worker_counters(log: str) -> dict[str, int]:
    """Sum the ``N applied, N duplicates, ...`` lines that stopping workers print."""
    totals: Counter[str] = Counter()
    for line in log.splitlines():
        if " stopped: " not in line:
            continue
        for part in line.split(" stopped: ", 1)[1].split(", "):
            words = part.split()
            if words and words[0].isdigit():
                totals[" ".join(words[1:])] += int(words[0])
    return dict(totals)


def spawn_role(role: str, *args: str, log: Path) -> subprocess.Popen[bytes]:
    """Start ``python -m bench.faultkit <role> <args>`` with its output in ``log``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "bench.faultkit", role, *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
        )


class PendingMonitor:
    """Measures recovery: how long after a consumer died until its pending entries were
    claimed by another worker and committed (its pending count back to 0)."""

    def __init__(self, client: redis.Redis, stream: bytes, group: str = "persist") -> None:
        self.client = client
        self.stream = stream
        self.group = group
        self.deaths: dict[str, float] = {}
        self.recovered: dict[str, float] = {}
        self.left_pending: dict[str, int] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="pending-monitor", daemon=True)

    def start(self) -> PendingMonitor:
        """Start polling."""
        self._thread.start()
        return self

    def died(self, consumer: str) -> None:
        """Note that ``consumer`` was killed now (and how much work it left pending)."""
        with self._lock:
            self.deaths[consumer] = time.monotonic()
        with contextlib.suppress(redis.RedisError):
            for info in self.client.xinfo_consumers(self.stream, self.group):
                if info["name"].decode() == consumer:
                    self.left_pending[consumer] = int(info["pending"])

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self._poll()

    def _poll(self) -> None:
        with self._lock:
            waiting = [c for c in self.deaths if c not in self.recovered]
        if not waiting:
            return
        try:
            infos = self.client.xinfo_consumers(self.stream, self.group)
        except redis.RedisError:
            return
        pending = {i["name"].decode(): int(i["pending"]) for i in infos}
        now = time.monotonic()
        with self._lock:
            for c in waiting:
                if pending.get(c, 0) == 0:
                    self.recovered[c] = now - self.deaths[c]

    def stop(self) -> list[float]:
        """Stop polling (after a last look); the recovery times measured (seconds)."""
        self._stop.set()
        self._thread.join(5)
        self._poll()
        return sorted(self.recovered.values())


# -- the tracked writer --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ack:
    """One acknowledged put: ``at`` is ``time.monotonic()`` when ``put`` returned."""

    key: str
    level: Level
    value: int
    shard: int
    stream_id: str
    at: float


def _sid(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


class TrackedWriter:
    """Sends numbered puts from a thread and remembers every acknowledgement.

    Put ``i`` writes ``{"i": i}`` to key ``k<i % keys>`` (levels alternate between an
    encrypted and a plaintext one per key). A put that raises ``StoreUnavailable`` or
    ``Backpressure`` is retried (same value) until acknowledged or the writer is stopped;
    every attempt counts as sent.
    """

    def __init__(
        self,
        mem: DualMemory,
        *,
        keys: int = 500,
        principal: Principal = WRITER,
        levels: Sequence[Level] = (Level.PRIVATE, Level.SWARM),
        retry_delay: float = 0.01,
    ) -> None:
        self.mem = mem
        self.keys = keys
        self.principal = principal
        self.levels = tuple(levels)
        self.retry_delay = retry_delay
        self.acks: list[Ack] = []
        self.sent = 0
        self.errors: Counter[str] = Counter()
        self.error_seconds: list[float] = []  # how long each failed put took to fail
        self.stop_event = threading.Event()
        self._thread: threading.Thread | None = None
        self._next = 0

    def key_of(self, i: int) -> tuple[str, Level]:
        """Key and level of put ``i``."""
        k = i % self.keys
        return f"k{k}", self.levels[k % len(self.levels)]

    def put_one(self, i: int) -> Ack | None:
        """One attempt at put ``i``; ``None`` if it failed."""
        key, level = self.key_of(i)
        self.sent += 1
        t0 = time.monotonic()
        try:
            r = self.mem.put(key, {"i": i}, level=level, principal=self.principal)
        except (StoreUnavailable, Backpressure) as exc:
            self.errors[type(exc).__name__] += 1
            self.error_seconds.append(time.monotonic() - t0)
            return None
        ack = Ack(key, level, i, r.shard, r.stream_id, time.monotonic())
        self.acks.append(ack)
        return ack

    def run(self, n: int, rate: float | None = None) -> None:
        """Send puts ``next .. next+n-1`` (at most ``rate`` per second), each until acked."""
        start = time.monotonic()
        first = self._next
        for i in range(first, first + n):
            while not self.stop_event.is_set():
                if self.put_one(i) is not None:
                    break
                time.sleep(self.retry_delay)
            if self.stop_event.is_set():
                return
            self._next = i + 1
            if rate:
                ahead = (i - first + 1) / rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)

    def start(self, n: int, rate: float | None = None) -> TrackedWriter:
        """Run :meth:`run` in a thread."""
        self._thread = threading.Thread(target=self.run, args=(n, rate), daemon=True)
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        """Wait for the thread."""
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """Whether the thread is still sending."""
        return self._thread is not None and self._thread.is_alive()


# -- checks --------------------------------------------------------------------------------


@dataclass
class Check:
    """What SQLite holds compared with what was acknowledged."""

    acked: int
    persisted: int
    lost: list[Ack]
    duplicated: int
    phantoms: int
    stale: list[str]
    integrity: str


def integrity(db: Path) -> str:
    """``PRAGMA integrity_check`` of the database file (a fresh connection)."""
    conn = sqlite3.connect(db)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


def check_persisted(
    db: Path, acks: Sequence[Ack], reader: DualMemory, principal: Principal = WRITER
) -> Check:
    """Every acknowledged put in ``journal`` exactly once, and each key's row holds the value
    of its last acknowledged put (read back through ``get_record``, so decrypted).

    ``phantoms`` counts journal puts that no one saw acknowledged (a put that raised after
    its command had in fact reached Redis).
    """
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute(
            "SELECT shard, stream_id, COUNT(*) FROM journal WHERE op = 'put' "
            "GROUP BY shard, stream_id"
        ).fetchall()
    finally:
        conn.close()
    counts = {(int(s), str(i)): int(n) for s, i, n in rows}
    acked_ids = {(a.shard, a.stream_id) for a in acks}
    lost = [a for a in acks if (a.shard, a.stream_id) not in counts]
    duplicated = sum(n - 1 for n in counts.values())
    phantoms = sum(1 for ident in counts if ident not in acked_ids)
    last: dict[str, Ack] = {}
    for a in acks:
        prev = last.get(a.key)
        if prev is None or _sid(a.stream_id) > _sid(prev.stream_id):
            last[a.key] = a
    stale: list[str] = []
    for key, a in last.items():
        rec = reader.get_record(key, level=a.level, principal=principal)
        if rec is None:
            stale.append(f"{key}: missing (expected {a.stream_id})")
        elif rec.value != {"i": a.value} or _sid(rec.stream_id) < _sid(a.stream_id):
            # A later id with the same value is a phantom copy of the same put (see above).
            stale.append(f"{key}: {rec.stream_id} {rec.value} != {a.stream_id} {a.value}")
    return Check(
        acked=len(acks),
        persisted=len(acks) - len(lost),
        lost=lost,
        duplicated=duplicated,
        phantoms=phantoms,
        stale=stale,
        integrity=integrity(db),
    )


def wait_drained(mem: DualMemory, timeout: float) -> float:
    """Wait until no command is pending or undelivered; returns the seconds it took."""
    t0 = time.monotonic()
    wait_for(lambda: sum(_backlog(mem).values()) == 0, timeout, "the backlog to drain", 0.05)
    return time.monotonic() - t0


def _backlog(mem: DualMemory) -> dict[int, int]:
    try:
        return mem.backlog()
    except DualMemError:
        return {0: -1}


# -- child roles (python -m bench.faultkit <role>) -----------------------------------------


def _role_crash_after_commit(args: argparse.Namespace) -> int:
    """A real Worker that SIGKILLs itself right after its N-th COMMIT, before the XACK."""
    from dualmem.redis_backend import connect
    from dualmem.settings import Settings
    from dualmem.sqlite_store import SQLiteStore
    from dualmem.store import ApplyResult, StreamEntry
    from dualmem.worker import Worker

    settings = Settings.load(
        {
            "redis_url": args.redis_url,
            "db_path": args.db,
            "batch_size": args.batch_size,
            "consumer": args.consumer,
        }
    )
    store = SQLiteStore(settings.db_path)
    client, _ = connect(settings, extra_timeout=settings.block_ms / 1000)
    worker = Worker(client, store, settings)
    real_apply = store.apply
    commits = 0

    def apply_then_die(entries: Sequence[StreamEntry]) -> ApplyResult:
        nonlocal commits
        result = real_apply(entries)  # returns after COMMIT
        commits += 1
        if commits >= args.after:
            print(f"COMMITTED {len(result.done)}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)  # between COMMIT and XACK
        return result

    store.apply = apply_then_die  # type: ignore[method-assign]
    stop = threading.Event()
    worker.run(stop)
    return 0


def _role_stall_in_txn(args: argparse.Namespace) -> int:
    """A real Worker whose SQLite transaction stalls when it inserts ``--marker``.

    The connection keeps a tiny page cache so uncommitted pages spill into the WAL file
    before the stall: the kill then leaves uncommitted frames behind, the hard case.
    """
    from dualmem.redis_backend import connect
    from dualmem.settings import Settings
    from dualmem.sqlite_store import SQLiteStore
    from dualmem.worker import Worker

    settings = Settings.load(
        {
            "redis_url": args.redis_url,
            "db_path": args.db,
            "batch_size": args.batch_size,
            "consumer": args.consumer,
        }
    )
    store = SQLiteStore(settings.db_path)
    conn = store._conn()  # the worker thread is this thread: the same connection

    def stall() -> int:
        print("IN-TRANSACTION", flush=True)
        time.sleep(60)
        return 0

    conn.create_function("fault_stall", 0, stall)
    conn.execute("PRAGMA cache_size = 8")
    conn.execute(
        "CREATE TEMP TRIGGER fault_stall BEFORE INSERT ON main.memory "
        f"WHEN NEW.key = '{args.marker}' BEGIN SELECT fault_stall(); END"
    )
    client, _ = connect(settings, extra_timeout=settings.block_ms / 1000)
    worker = Worker(client, store, settings)
    worker.run(threading.Event())
    return 0


def _role_reader(args: argparse.Namespace) -> int:
    """Read keys ``k0..k<keys-1>`` for ``--seconds``; report reads, errors, regressions.

    A regression is a key whose value went back to an older put after a newer one was
    seen: the worker must never apply an older command over a newer one.
    """
    mem = DualMemory(redis_url=args.redis_url, db_path=args.db, keyring=args.keyring, worker=False)
    reads = queries = regressions = 0
    errors: Counter[str] = Counter()
    seen: dict[str, int] = {}
    deadline = time.monotonic() + args.seconds
    i = 0
    levels = (Level.PRIVATE, Level.SWARM)
    while time.monotonic() < deadline:
        k = (i * 7919) % args.keys
        key = f"k{k}"
        try:
            if i % 50 == 49:
                mem.query(principal=WRITER, level=Level.SWARM, prefix="k1", limit=200)
                queries += 1
            else:
                value = mem.get(key, level=levels[k % 2], principal=WRITER)
                reads += 1
                if value is not None:
                    n = int(value["i"])
                    if n < seen.get(key, -1):
                        regressions += 1
                    seen[key] = max(n, seen.get(key, -1))
        except Exception as exc:  # every error counts: "database is locked" included
            errors[f"{type(exc).__name__}: {exc}"[:200]] += 1
        i += 1
    mem.close()
    print(
        json.dumps(
            {"reads": reads, "queries": queries, "regressions": regressions, "errors": errors}
        ),
        flush=True,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the child roles."""
    p = argparse.ArgumentParser(prog="python -m bench.faultkit")
    sub = p.add_subparsers(dest="role", required=True)
    for name, func in (
        ("crash-after-commit", _role_crash_after_commit),
        ("stall-in-txn", _role_stall_in_txn),
        ("reader", _role_reader),
    ):
        s = sub.add_parser(name)
        s.add_argument("--redis-url", required=True)
        s.add_argument("--db", required=True)
        s.add_argument("--consumer", default="fault-child")
        s.add_argument("--batch-size", type=int, default=100)
        s.add_argument("--after", type=int, default=1)
        s.add_argument("--marker", default="marker")
        s.add_argument("--keyring")
        s.add_argument("--keys", type=int, default=500)
        s.add_argument("--seconds", type=float, default=5.0)
        s.set_defaults(func=func)
    args = p.parse_args(argv)
    return int(args.func(args))


@contextlib.contextmanager
def workers_stopped(procs: Sequence[WorkerProc]) -> Iterator[None]:
    """Make sure every worker process is gone when the block exits."""
    try:
        yield
    finally:
        for w in procs:
            with contextlib.suppress(Exception):
                w.kill()


if __name__ == "__main__":
    sys.exit(main())
