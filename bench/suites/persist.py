"""Persist: one worker draining a backlog, against raw ``executemany`` of the same rows."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import redis

from bench.harness import LEVELS, PRINCIPAL, Backend, Bench, make_values
from bench.stats import Target, median, ratio
from dualmem import DualMemory, Worker
from dualmem.batch import GENESIS, plan_batch
from dualmem.layout import Layout
from dualmem.migrations import migrate
from dualmem.redis_backend import connect
from dualmem.settings import Settings
from dualmem.sqlite_store import MEMORY_COLUMNS, SQLiteStore
from dualmem.store import StreamEntry

__all__ = [
    "drain_rate",
    "drop_anchors",
    "fill_backlog",
    "last_seq",
    "raw_connection",
    "raw_executemany_rate",
    "read_cost",
    "run",
    "stage_costs",
]

TARGET_RATE = 50_000
TARGET_RATIO = 0.8

METHOD = (
    "A writer (`worker=False`) fills the command stream with puts spread over the five "
    "levels; then one `dualmem.Worker` in the benchmark process drains it into a fresh "
    "database (`Worker.drain`: XREADGROUP batches of `batch_size`, decode, hash chains, one "
    "SQLite transaction per batch, XACK and a PUBLISH per scope and batch, trimming). The "
    "baseline reads back the journal and memory rows that drain wrote, and inserts the same "
    "rows in the same order into a fresh database with the same schema and the pragmas of "
    "the worker's write connection (WAL, synchronous=NORMAL, incremental auto_vacuum, "
    "foreign keys, no checkpoint inside a commit, the 64 MiB page cache), `executemany` "
    "per table, one transaction per batch of the same size: the SQLite floor with no "
    "Redis, decoding or hashing. The backlog is refilled with the same entries between "
    "rounds; rates are medians over rounds."
)


def fill_backlog(mem: DualMemory, n: int, prefix: str, ctx: Bench, advance: Any = None) -> None:
    """``n`` puts with unique keys, levels round-robin, through the real write path."""
    values = make_values(ctx.rng(f"fill:{prefix}"), 64)
    for i in range(n):
        mem.put(
            f"{prefix}/{i:08d}", values[i % 64], level=LEVELS[i % len(LEVELS)], principal=PRINCIPAL
        )
        if advance is not None and i % 1000 == 999:
            advance(1000)
    if advance is not None and n % 1000:
        advance(n % 1000)


def drain_rate(mem: DualMemory, db: Path, expected: int) -> tuple[float, dict[str, Any]]:
    """Drain the stream with one in-process ``Worker`` into ``db``; records per second."""
    settings = mem.settings
    store = SQLiteStore.from_settings(settings.replace(db_path=str(db)))
    client, _ = connect(settings, extra_timeout=settings.block_ms / 1000)
    worker = Worker(client, store, settings)
    try:
        t0 = time.perf_counter()
        left = worker.drain(timeout=3600)
        elapsed = time.perf_counter() - t0
    finally:
        store.close()
        client.close()
    if left or worker.stats.applied != expected:
        raise RuntimeError(
            f"drain left {left} pending and applied {worker.stats.applied} of {expected}"
        )
    return expected / elapsed, {"seconds": elapsed, "batches": worker.stats.batches}


def last_seq(db: Path) -> int:
    """The highest journal seq in ``db`` (0 when empty)."""
    conn = sqlite3.connect(db)
    try:
        return int(conn.execute("SELECT COALESCE(MAX(seq), 0) FROM journal").fetchone()[0])
    finally:
        conn.close()


def raw_connection(raw_db: Path, settings: Settings) -> sqlite3.Connection:
    """A fresh database with dualmem's schema, on a connection with the pragmas of the
    worker's write connection (``SQLiteStore``), pragma for pragma: above all no checkpoint
    inside a COMMIT (the worker's run in a background thread). With SQLite's default, one
    every 1000 pages, this baseline was about 25 % slower and the ratio looked better."""
    conn = sqlite3.connect(raw_db, isolation_level=None)
    conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {settings.sqlite_synchronous}")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    conn.execute(f"PRAGMA cache_size = {-1024 * settings.sqlite_cache_mb}")
    migrate(conn)
    return conn


def raw_executemany_rate(db: Path, raw_db: Path, settings: Settings, after_seq: int = 0) -> float:
    """Insert the rows the worker wrote to ``db`` (journal seq > ``after_seq``) into a fresh
    ``raw_db``, ``executemany`` per table in batches of the worker's ``batch_size``; rows per
    second. The connection gets the worker's pragmas, its page cache included."""
    batch = settings.batch_size
    src = sqlite3.connect(db)
    try:
        journal = src.execute(
            "SELECT * FROM journal WHERE seq > ? ORDER BY seq", (after_seq,)
        ).fetchall()
        memory = src.execute(
            f"SELECT {', '.join(f'm.{c}' for c in MEMORY_COLUMNS)} FROM journal j "
            "JOIN memory m ON m.scope = j.scope AND m.key = j.key WHERE j.seq > ? ORDER BY j.seq",
            (after_seq,),
        ).fetchall()
    finally:
        src.close()
    conn = raw_connection(raw_db, settings)
    try:
        jsql = f"INSERT INTO journal VALUES ({','.join('?' * len(journal[0]))})"
        msql = (
            f"INSERT INTO memory ({', '.join(MEMORY_COLUMNS)}) "
            f"VALUES ({','.join('?' * len(MEMORY_COLUMNS))})"
        )
        t0 = time.perf_counter()
        for start in range(0, len(journal), batch):
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(jsql, journal[start : start + batch])
            conn.executemany(msql, memory[start : start + batch])
            conn.execute("COMMIT")
        elapsed = time.perf_counter() - t0
    finally:
        conn.close()
    return len(journal) / elapsed


def stage_costs(entries: list[StreamEntry], settings: Settings, db: Path) -> dict[str, float]:
    """Where a drained record's time goes, microseconds a record, off the worker's loop.

    ``plan``: :func:`dualmem.batch.plan_batch` alone (decode, hash chains, rows) over the
    backlog in batches of ``batch_size``. ``apply``: :meth:`SQLiteStore.apply` of the same
    batches into a fresh ``db`` (planning, the duplicate lookup, the SQL and the commit).
    The drain's remaining time is Redis: XREADGROUP and its parsing, acks, notifications.
    """
    batch = settings.batch_size
    chunks = [entries[i : i + batch] for i in range(0, len(entries), batch)]
    t0 = time.perf_counter()
    jtail = atail = (0, GENESIS)
    for chunk in chunks:
        plan = plan_batch(chunk, already=set(), journal_tail=jtail, audit_tail=atail, now_ms=0)
        jtail, atail = plan.journal_tail, plan.audit_tail
    plan_s = time.perf_counter() - t0
    store = SQLiteStore.from_settings(settings.replace(db_path=str(db)))
    try:
        t0 = time.perf_counter()
        for chunk in chunks:
            store.apply(chunk)
        apply_s = time.perf_counter() - t0
    finally:
        store.close()
    n = len(entries)
    return {"plan_us": plan_s / n * 1e6, "apply_us": apply_s / n * 1e6}


def read_cost(
    client: redis.Redis,
    stream: bytes,
    entries: list[tuple[str, dict[bytes, bytes]]],
    settings: Settings,
    db: Path,
) -> float:
    """Microseconds a record of the worker's read alone: ``entries`` appended to ``stream``
    again, then read in batches of ``batch_size`` by the worker's own read
    (``XREADGROUP`` and parsing into stream entries) under a scratch consumer group,
    with nothing applied or acknowledged. The group and the entries are removed after."""
    _refill(client, stream, entries)
    group = "bench-read"
    client.xgroup_create(stream, group, id="0")
    read_settings = settings.replace(db_path=str(db), group=group, consumer=group)
    store = SQLiteStore.from_settings(read_settings)
    worker_client, _ = connect(read_settings)
    worker = Worker(worker_client, store, read_settings)
    try:
        n = 0
        t0 = time.perf_counter()
        while batch := worker._xreadgroup(">", block=False):  # the worker's read path
            n += len(batch)
        elapsed = time.perf_counter() - t0
    finally:
        store.close()
        worker_client.close()
        client.xgroup_destroy(stream, group)
        client.xtrim(stream, maxlen=0)
    if n != len(entries):
        raise RuntimeError(f"read {n} of {len(entries)} entries back")
    return elapsed / n * 1e6


def _capture(client: redis.Redis, stream: bytes) -> list[tuple[str, dict[bytes, bytes]]]:
    out: list[tuple[str, dict[bytes, bytes]]] = []
    start = "-"
    while True:
        chunk = client.xrange(stream, min=start, max="+", count=10_000)
        if not chunk:
            return out
        out.extend((str(sid, "ascii"), fields) for sid, fields in chunk)  # type: ignore[misc,arg-type]
        last = str(chunk[-1][0], "ascii")  # type: ignore[arg-type]
        ms, _, seq = last.partition("-")
        start = f"{ms}-{int(seq) + 1}"


def _refill(
    client: redis.Redis, stream: bytes, entries: list[tuple[str, dict[bytes, bytes]]]
) -> None:
    for start in range(0, len(entries), 1000):
        pipe = client.pipeline(transaction=False)
        for _, fields in entries[start : start + 1000]:
            pipe.xadd(stream, fields)  # type: ignore[arg-type]
        pipe.execute()


def drop_anchors(client: redis.Redis, settings: Settings) -> None:
    """Delete the worker's hash-chain anchors (``Layout.anchor_key``) of
    ``settings.namespace``, as if no database had been persisted there yet."""
    layout = Layout(settings.namespace, 1)
    client.delete(*(layout.anchor_key(chain) for chain in ("journal", "audit_log")))


def run(ctx: Bench, backend: Backend) -> dict[str, Any]:
    """Drain the backlog ``persist_rounds`` times, each beside the raw executemany."""
    sizes = ctx.sizes
    n = sizes.persist_backlog
    advance = ctx.progress.task(f"persist [{backend.name}]", n + n * sizes.persist_rounds)
    mem = ctx.memory(
        backend, ctx.path(f"persist-writer-{backend.name}.db"), worker=False, max_backlog=n + 1
    )
    rounds: list[dict[str, Any]] = []
    try:
        fill_backlog(mem, n, "bench/persist", ctx, advance)
        stream = Layout(mem.settings.namespace, 1).stream(0)
        raw = backend.raw_client()
        entries = _capture(raw, stream)
        for r in range(sizes.persist_rounds):
            if r:
                _refill(raw, stream, entries)
                # Each round drains into a fresh database: the last round's hash-chain
                # anchors name ids this one does not hold, and the worker would warn
                # "restored from an older backup?" at its first commit.
                drop_anchors(raw, mem.settings)
            db = ctx.path(f"persist-{backend.name}-{r}.db")
            rate, info = drain_rate(mem, db, n)
            raw_rate = raw_executemany_rate(
                db, ctx.path(f"persist-raw-{backend.name}-{r}.db"), mem.settings
            )
            rounds.append({"dualmem_rate": rate, "raw_rate": raw_rate, **info})
            advance(n)
        stages = stage_costs(
            [StreamEntry(0, sid, fields) for sid, fields in entries],
            mem.settings,
            ctx.path(f"persist-stages-{backend.name}.db"),
        )
        read_us = read_cost(
            raw, stream, entries, mem.settings, ctx.path(f"persist-read-{backend.name}.db")
        )
    finally:
        mem.close()
    rate = median(x["dualmem_rate"] for x in rounds)
    raw_rate = median(x["raw_rate"] for x in rounds)
    rel = ratio(rate, raw_rate)
    drain_us, raw_us = 1e6 / rate, 1e6 / raw_rate
    breakdown = {
        "drain_us": drain_us,
        "raw_us": raw_us,
        "plan_us": stages["plan_us"],
        "sql_us": stages["apply_us"] - stages["plan_us"],
        "redis_us": drain_us - stages["apply_us"],
        "read_us": read_us,
        "rest_us": drain_us - stages["apply_us"] - read_us,
        "budget_us": raw_us / TARGET_RATIO,
    }
    targets = [
        Target.check(
            "persist",
            backend.name,
            "records/s, one worker draining the backlog",
            rate,
            ">=",
            TARGET_RATE,
            "/s",
            dualmem=f"{rate:,.0f}/s",
            baseline=f"{raw_rate:,.0f}/s",
        ),
        Target.check(
            "persist",
            backend.name,
            "drain rate / raw executemany rate",
            rel,
            ">=",
            TARGET_RATIO,
            dualmem=f"{rate:,.0f}/s",
            baseline=f"{raw_rate:,.0f}/s",
        ),
    ]
    return {
        "method": METHOD,
        "backlog": n,
        "batch_size": mem.settings.batch_size,
        "rounds": rounds,
        "dualmem_rate": rate,
        "raw_rate": raw_rate,
        "ratio": rel,
        "per_record": breakdown,
        "targets": [t.to_json() for t in targets],
    }
