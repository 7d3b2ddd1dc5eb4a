"""The shared machinery of the suites: sizes, backends, seeded data, interleaved timing."""

from __future__ import annotations

import contextlib
import json
import random
import string
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis

from acl import Keyring, Level, Principal
from bench.servers import RedisServer, WorkerProcess
from dualmem import DualMemory

__all__ = [
    "FULL",
    "PRESETS",
    "PRINCIPAL",
    "QUICK",
    "TINY",
    "Backend",
    "Bench",
    "Sizes",
    "interleaved",
    "json_bytes",
    "make_values",
    "open_backend",
]

#: One principal that may use every level (SYSTEM needs ``system=True``).
PRINCIPAL = Principal(
    agent_id="bench-agent",
    team="bench-team",
    swarm="bench-swarm",
    project="bench-project",
    system=True,
)

VALUE_BYTES = 500


@dataclass(frozen=True)
class Sizes:
    """How much work each suite does. ``FULL`` made the committed results."""

    name: str
    #: Operations discarded before each latency measurement (connections, caches, JIT-free
    #: but allocator and page-cache warm-up still matter).
    warmup: int
    #: Measured put/raw pairs per level in the write suite.
    write_ops: int
    #: Commands in the persist suite's backlog, and how many times it is drained.
    persist_backlog: int
    persist_rounds: int
    #: Records per level in the read suite, and measured reads per level.
    read_records: int
    read_ops: int
    #: Offered rates (writes/s) of the lag suite, seconds at each rate, seconds of warm-up.
    lag_rates: tuple[int, ...]
    lag_seconds: float
    lag_warmup_s: float
    #: Measured operations per system in the peers suite.
    peers_ops: int
    #: Stored records at which the scale suite measures, puts and backlog at each.
    scale_sizes: tuple[int, ...]
    scale_put_ops: int
    scale_backlog: int
    #: Drains of that backlog per size (each from the same database), medians reported.
    scale_drain_rounds: int = 1
    #: Distinct keys the latency suites cycle over (puts overwrite, as agents do).
    key_space: int = 1000
    #: Highest offered rate one open-loop sender gets in the lag suite.
    per_sender_rate: int = 2500


FULL = Sizes(
    name="full",
    warmup=2000,
    write_ops=20_000,
    persist_backlog=100_000,
    persist_rounds=3,
    read_records=10_000,
    read_ops=20_000,
    lag_rates=(500, 2000, 10_000),
    lag_seconds=10.0,
    lag_warmup_s=1.0,
    peers_ops=10_000,
    scale_sizes=(1_000, 100_000, 1_000_000),
    scale_put_ops=10_000,
    scale_backlog=20_000,
    scale_drain_rounds=3,
)

QUICK = Sizes(
    name="quick",
    warmup=100,
    write_ops=600,
    persist_backlog=3000,
    persist_rounds=1,
    read_records=300,
    read_ops=600,
    lag_rates=(500, 2000, 10_000),
    lag_seconds=0.6,
    lag_warmup_s=0.1,
    peers_ops=300,
    scale_sizes=(100, 1000, 5000),
    scale_put_ops=300,
    scale_backlog=1000,
    key_space=200,
)

#: For the harness's own test: every code path, seconds in total.
TINY = Sizes(
    name="tiny",
    warmup=5,
    write_ops=40,
    persist_backlog=120,
    persist_rounds=2,  # two, so a median is not just the one figure
    read_records=30,
    read_ops=40,
    lag_rates=(200, 400),
    lag_seconds=0.25,
    lag_warmup_s=0.05,
    peers_ops=30,
    scale_sizes=(10, 60),
    scale_put_ops=30,
    scale_backlog=60,
    scale_drain_rounds=2,
    key_space=20,
    per_sender_rate=300,
)

PRESETS = {s.name: s for s in (FULL, QUICK, TINY)}


def json_bytes(value: object) -> bytes:
    """Compact JSON, as ``acl.crypto.JsonSerializer`` writes it (what the baselines store)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def make_values(rng: random.Random, n: int, size: int = VALUE_BYTES) -> list[dict[str, Any]]:
    """``n`` JSON objects of exactly ``size`` bytes serialized, shaped like agent memory.

    >>> vs = make_values(random.Random(1), 3)
    >>> [len(json_bytes(v)) for v in vs]
    [500, 500, 500]
    """
    out = []
    for i in range(n):
        value: dict[str, Any] = {
            "agent": f"coder-{rng.randrange(100)}",
            "confidence": round(rng.random(), 4),
            "step": i,
            "notes": "",
        }
        pad = size - len(json_bytes(value))
        value["notes"] = "".join(rng.choices(string.ascii_letters + " ", k=pad))
        out.append(value)
    return out


@dataclass
class Backend:
    """The Redis a suite runs on: a real ``redis-server`` or the embedded fakeredis server."""

    name: str
    url: str
    server: RedisServer | None = None

    @property
    def external_worker(self) -> bool:
        """True on a real Redis: persistence runs in a ``dualmem worker`` process."""
        return self.server is not None

    def raw_client(self) -> redis.Redis:
        """A plain client on the same Redis, for the raw baselines."""
        if self.server is not None:
            return self.server.client()
        import fakeredis

        from dualmem.redis_backend import memory_server

        return fakeredis.FakeRedis(server=memory_server(self.url).server)

    def reset(self) -> None:
        """An empty Redis for the next suite."""
        if self.server is not None:
            self.server.client().flushall()
        else:
            from dualmem.redis_backend import drop_memory_server

            drop_memory_server(self.url)
            self.url = f"memory://bench-{uuid.uuid4().hex[:12]}"


@contextlib.contextmanager
def open_backend(name: str, workdir: Path, redis_binary: str | None = None) -> Iterator[Backend]:
    """Start the backend (a redis-server with AOF everysec on a free 127.0.0.1 port, or an
    in-process fakeredis server) and stop it afterwards."""
    if name == "redis":
        with RedisServer(workdir / "redis", binary=redis_binary) as server:
            yield Backend("redis", server.url, server)
    elif name == "fakeredis":
        backend = Backend("fakeredis", f"memory://bench-{uuid.uuid4().hex[:12]}")
        try:
            yield backend
        finally:
            from dualmem.redis_backend import drop_memory_server

            drop_memory_server(backend.url)
    else:
        raise ValueError(f"unknown backend {name!r}")


class Progress:
    """A progress bar per suite (rich), advanced outside the timed sections."""

    def __init__(self, enabled: bool = True) -> None:
        self._bar: Any = None
        if enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
            )
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("{task.description:<34}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=Console(stderr=True),
            )

    def __enter__(self) -> Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def task(self, description: str, total: int) -> Callable[[int], None]:
        """A new bar; returns ``advance(n)``."""
        if self._bar is None:
            return lambda n: None
        task_id = self._bar.add_task(description, total=total)
        bar = self._bar

        def advance(n: int) -> None:
            bar.advance(task_id, n)

        return advance

    def log(self, message: str) -> None:
        """A line above the bars."""
        if self._bar is not None:
            self._bar.console.print(message)


@dataclass
class Bench:
    """What every suite gets: sizes, a seed, a scratch directory, a key file, progress."""

    sizes: Sizes
    seed: int
    workdir: Path
    progress: Progress = field(default_factory=lambda: Progress(enabled=False))
    redis_binary: str | None = None
    #: Suites may keep expensive set-up here across backends (the scale suite's databases).
    cache: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.keyfile = self.workdir / "bench-keys.json"
        if not self.keyfile.exists():
            Keyring.generate().save(self.keyfile)

    def rng(self, name: str) -> random.Random:
        """A generator seeded by the run's seed and ``name``: the same data every run."""
        return random.Random(f"{self.seed}:{name}")

    def path(self, name: str) -> Path:
        """A fresh path in the scratch directory (removed first if it exists)."""
        p = self.workdir / name
        for suffix in ("", "-wal", "-shm"):
            q = Path(str(p) + suffix)
            if q.exists():
                q.unlink()
        return p

    def memory(self, backend: Backend, db: Path, **settings: Any) -> DualMemory:
        """A ``DualMemory`` on ``backend`` with this run's key file.

        Its socket timeout is the raw baseline client's (5 s, ``RedisServer.client``), not
        the default 0.25 s: a benchmark times a Redis stall (an AOF rewrite's fork under a
        large data set took longer than 0.25 s once, at the scale suite's 1M records) as
        the latency it is, where the default fails the put (``StoreUnavailable``) and
        would end the run.
        """
        settings.setdefault("socket_timeout", 5.0)
        return DualMemory(
            redis_url=backend.url, db_path=str(db), keyring=str(self.keyfile), **settings
        )

    @contextlib.contextmanager
    def writer(self, backend: Backend, db: Path, **settings: Any) -> Iterator[DualMemory]:
        """A writer and its persistence, as each backend is meant to be deployed.

        Real Redis: the writer runs with ``worker=False`` and one ``dualmem worker`` process
        persists, so the worker does not compete with the writer for this process's GIL.
        fakeredis lives inside one process, so there the embedded default runs: the writer
        with its in-process worker thread. Leaving the block drains the worker.
        """
        if backend.external_worker:
            with WorkerProcess(backend.url, db):
                mem = self.memory(backend, db, worker=False, **settings)
                try:
                    yield mem
                finally:
                    mem.close()
        else:
            mem = self.memory(backend, db, **settings)
            try:
                yield mem
            finally:
                report = mem.close(timeout=120)
                if not report.drained:
                    raise RuntimeError(f"worker did not drain: {report.pending} left")


def interleaved(
    ops: Mapping[str, Callable[[int], object]],
    n: int,
    rng: random.Random,
    *,
    advance: Callable[[int], None] | None = None,
) -> dict[str, list[int]]:
    """Time ``n`` rounds of every op, in a fresh random order each round.

    Interleaving puts the system and its baselines under the same noise (other processes,
    CPU frequency, a background worker) at the same moments, so their ratio means
    something on a shared machine; shuffling removes any first-or-second position bias.
    Returns nanosecond samples per op. ``op(i)`` gets the round number.
    """
    names = list(ops)
    samples: dict[str, list[int]] = {name: [] for name in names}
    order = names[:]
    clock = time.perf_counter_ns
    for i in range(n):
        rng.shuffle(order)
        for name in order:
            op = ops[name]
            t0 = clock()
            op(i)
            samples[name].append(clock() - t0)
        if advance is not None and i % 128 == 127:
            advance(128)
    if advance is not None and n % 128:
        advance(n % 128)
    return samples


def sizes_json(sizes: Sizes) -> dict[str, Any]:
    """The sizes as stored in result files."""
    return asdict(sizes)


LEVELS = tuple(Level)
