"""Peers: dualmem ``put``/``get`` beside LangGraph's ``SqliteStore`` and diskcache."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from acl import Level
from bench.harness import PRINCIPAL, Backend, Bench, interleaved, json_bytes, make_values
from bench.stats import Target, ratio, summarize, us
from bench.suites.write import RAW_STREAM, raw_put

__all__ = ["run"]

TARGET_SPEEDUP = 4.0
NAMESPACE = ("bench", "peers")
LG_DEFAULT = "SqliteStore (defaults)"
LG_WAL = "SqliteStore (WAL, NORMAL)"
RAW = "raw MULTI SET+XADD (no dualmem)"

METHOD = (
    "Each round performs one operation per contender in random order, on the same key "
    "(cycling over the key space, so puts overwrite) and the same 500-byte JSON document. "
    "LangGraph `SqliteStore` (langgraph-checkpoint-sqlite) runs twice: as "
    "`SqliteStore.from_conn_string` opens it (SQLite defaults: rollback journal, "
    "synchronous=FULL, so every put waits for an fsync), and with dualmem's own pragmas "
    "(WAL, synchronous=NORMAL), which is the durability class of a put acknowledged by a "
    "real Redis with AOF everysec (on the embedded fakeredis a put lives in the process "
    "until the worker commits it). diskcache keeps its defaults (WAL, NORMAL). "
    "A dualmem put returns once the command is in Redis (persisted by the worker later, "
    "see the lag suite); SqliteStore and diskcache return after their SQLite commit. "
    "Gets run after the worker has persisted every put. A bare redis-py `MULTI; SET; "
    "XADD; EXEC` of the same bytes on the same Redis (the write suite's baseline) runs in "
    "the put rounds too: on real Redis a peer's p95 over its p95 is the most any write "
    "through this Redis could show against that peer in this run. On the embedded "
    "fakeredis dualmem's transport hands the in-process server argument lists instead of "
    "RESP bytes and runs a transaction in one step (see the write suite), so there a put "
    "can show more than the bare MULTI."
)


def run(ctx: Bench, backend: Backend) -> dict[str, Any]:
    """Time interleaved puts, then interleaved gets, of dualmem and its peers."""
    import diskcache  # type: ignore[import-untyped]
    from langgraph.store.sqlite import SqliteStore  # type: ignore[import-untyped]

    sizes = ctx.sizes
    rng = ctx.rng(f"peers:{backend.name}")
    values = make_values(rng, 64)
    payloads = [json_bytes(v) for v in values]
    raw = backend.raw_client()
    keys = [f"bench/peers/{i}" for i in range(sizes.key_space)]
    nk = len(keys)
    advance = ctx.progress.task(f"peers [{backend.name}]", 2 * (sizes.warmup + sizes.peers_ops))
    # As SqliteStore.from_conn_string connects; the library's defaults otherwise (rollback
    # journal, synchronous=FULL: an fsync per put) ...
    conn = sqlite3.connect(
        ctx.path(f"peers-langgraph-{backend.name}.db"),
        check_same_thread=False,
        isolation_level=None,
    )
    store = SqliteStore(conn)
    store.setup()
    # ... and tuned to dualmem's own durability class (WAL, synchronous=NORMAL: survives a
    # process crash, may lose the last commits on power loss, like Redis AOF everysec).
    conn_wal = sqlite3.connect(
        ctx.path(f"peers-langgraph-wal-{backend.name}.db"),
        check_same_thread=False,
        isolation_level=None,
    )
    conn_wal.execute("PRAGMA journal_mode = WAL")
    conn_wal.execute("PRAGMA synchronous = NORMAL")
    store_wal = SqliteStore(conn_wal)
    store_wal.setup()
    cache = diskcache.Cache(str(ctx.path(f"peers-diskcache-{backend.name}")))
    put_s: dict[str, list[int]] = {}
    get_s: dict[str, list[int]] = {}
    try:
        with ctx.writer(backend, ctx.path(f"peers-{backend.name}.db")) as mem:
            last: dict[Level, Any] = {}

            def dm_put(level: Level) -> Any:
                def op(i: int) -> None:
                    last[level] = mem.put(
                        keys[i % nk], values[i % 64], level=level, principal=PRINCIPAL
                    )

                return op

            def dm_get(level: Level) -> Any:
                return lambda i: mem.get(keys[i % nk], level=level, principal=PRINCIPAL)

            puts = {
                "dualmem L3 SWARM": dm_put(Level.SWARM),
                "dualmem L1 PRIVATE": dm_put(Level.PRIVATE),
                LG_DEFAULT: lambda i: store.put(NAMESPACE, keys[i % nk], values[i % 64]),
                LG_WAL: lambda i: store_wal.put(NAMESPACE, keys[i % nk], values[i % 64]),
                "diskcache": lambda i: cache.set(keys[i % nk], values[i % 64]),
                RAW: lambda i: raw_put(
                    raw, keys[i % nk], payloads[i % 64], Level.SWARM, xlen=False
                ),
            }
            gets = {
                "dualmem L3 SWARM": dm_get(Level.SWARM),
                "dualmem L1 PRIVATE": dm_get(Level.PRIVATE),
                LG_DEFAULT: lambda i: store.get(NAMESPACE, keys[i % nk]).value,
                LG_WAL: lambda i: store_wal.get(NAMESPACE, keys[i % nk]).value,
                "diskcache": lambda i: cache.get(keys[i % nk]),
            }
            interleaved(puts, sizes.warmup, rng, advance=advance)
            put_s = interleaved(puts, sizes.peers_ops, rng, advance=advance)
            for receipt in last.values():
                mem.sync(receipt, timeout=600)
            answers = {name: op(0) for name, op in gets.items()}
            if len({json.dumps(v, sort_keys=True) for v in answers.values()}) != 1:
                raise RuntimeError(f"contenders disagree on the value: {answers}")
            interleaved(gets, sizes.warmup, rng, advance=advance)
            get_s = interleaved(gets, sizes.peers_ops, rng, advance=advance)
    finally:
        raw.delete(RAW_STREAM)
        cache.close()
        conn.close()
        conn_wal.close()
    put_sum = {k: summarize(v) for k, v in put_s.items()}
    get_sum = {k: summarize(v) for k, v in get_s.items()}
    targets = [
        Target.check(
            "peers",
            backend.name,
            f"{peer} put p95 / {name} put p95",
            ratio(put_sum[peer]["p95"], put_sum[name]["p95"]),
            ">=",
            TARGET_SPEEDUP,
            "x",
            dualmem=us(put_sum[name]["p95"]),
            baseline=us(put_sum[peer]["p95"]),
        )
        for peer in (LG_DEFAULT, LG_WAL)
        for name in ("dualmem L3 SWARM", "dualmem L1 PRIVATE")
    ]
    floor = {
        peer: ratio(put_sum[peer]["p95"], put_sum[RAW]["p95"]) for peer in (LG_DEFAULT, LG_WAL)
    }
    return {
        "method": METHOD,
        "put": put_sum,
        "get": get_sum,
        "floor": floor,
        "targets": [t.to_json() for t in targets],
    }
