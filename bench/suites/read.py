"""Read path: ``get`` by key at levels 3 and 1 against a raw SQLite primary-key SELECT and
diskcache."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from typing import Any

from acl import Level
from bench.harness import PRINCIPAL, Backend, Bench, interleaved, json_bytes, make_values
from bench.stats import Target, cdf_points, ratio, summarize, us
from dualmem import DualMemory

__all__ = ["run"]

TARGET_VS_SQLITE = 3.0
TARGET_VS_DISKCACHE = 2.5
READ_LEVELS = (Level.SWARM, Level.PRIVATE)

METHOD = (
    "The same records (500-byte JSON documents) are stored by dualmem (through put and the "
    "worker), in a raw SQLite table `kv(key TEXT PRIMARY KEY, value BLOB)` (WAL, "
    "synchronous=NORMAL) and in a diskcache `Cache`. Each round reads one random key from "
    "each, in random order, and every contender returns the decoded value: raw SQLite is "
    "`SELECT value FROM kv WHERE key = ?` plus `json.loads` (the row alone, without "
    "decoding, is reported too), diskcache unpickles, dualmem checks access, reads SQLite "
    "with the expiry condition, and opens the envelope (AES-256-GCM at level 1)."
)


def _ops(
    mem: DualMemory, raw: sqlite3.Connection, cache: Any, keys: list[str], level: Level
) -> dict[str, Callable[[int], object]]:
    """One read per contender; round ``i`` reads ``keys[i]`` from each."""

    def dm_get(i: int) -> object:
        return mem.get(keys[i], level=level, principal=PRINCIPAL)

    def sqlite_get(i: int) -> object:
        row = raw.execute("SELECT value FROM kv WHERE key = ?", (keys[i],))
        return json.loads(row.fetchone()[0])

    def sqlite_row(i: int) -> object:
        return raw.execute("SELECT value FROM kv WHERE key = ?", (keys[i],)).fetchone()

    def diskcache_get(i: int) -> object:
        return cache.get(keys[i])

    return {
        "dualmem": dm_get,
        "sqlite": sqlite_get,
        "sqlite_row": sqlite_row,
        "diskcache": diskcache_get,
    }


def run(ctx: Bench, backend: Backend) -> dict[str, Any]:
    """Fill the three stores with the same data, then time interleaved random reads."""
    import diskcache  # type: ignore[import-untyped]

    sizes = ctx.sizes
    rng = ctx.rng(f"read:{backend.name}")
    values = make_values(rng, 64)
    n = sizes.read_records
    keys = [f"bench/read/{i:07d}" for i in range(n)]
    advance = ctx.progress.task(
        f"read [{backend.name}]", n * len(READ_LEVELS) + len(READ_LEVELS) * sizes.read_ops
    )
    raw_path = ctx.path(f"read-raw-{backend.name}.db")
    raw = sqlite3.connect(raw_path, isolation_level=None)
    raw.execute("PRAGMA journal_mode = WAL")
    raw.execute("PRAGMA synchronous = NORMAL")
    raw.execute("CREATE TABLE kv (key TEXT PRIMARY KEY, value BLOB NOT NULL)")
    raw.execute("BEGIN")
    raw.executemany(
        "INSERT INTO kv VALUES (?, ?)",
        [(k, json_bytes(values[i % 64])) for i, k in enumerate(keys)],
    )
    raw.execute("COMMIT")
    cache = diskcache.Cache(str(ctx.path(f"read-diskcache-{backend.name}")))
    for i, k in enumerate(keys):
        cache.set(k, values[i % 64])
    rows: list[dict[str, Any]] = []
    targets: list[Target] = []
    cdfs: dict[str, list[list[float]]] = {}
    mem = ctx.memory(backend, ctx.path(f"read-{backend.name}.db"))
    try:
        for level in READ_LEVELS:
            last = None
            for i, k in enumerate(keys):
                last = mem.put(k, values[i % 64], level=level, principal=PRINCIPAL)
                if i % 1000 == 999:
                    advance(1000)
            advance(n % 1000)
            assert last is not None
            mem.sync(last, timeout=600)
        for level in READ_LEVELS:
            picks = [rng.randrange(n) for _ in range(sizes.warmup + sizes.read_ops)]
            ops = _ops(mem, raw, cache, [keys[p] for p in picks], level)
            # One check that every contender answers the same thing, before timing.
            first = {name: op(0) for name, op in ops.items() if name != "sqlite_row"}
            if len({json.dumps(v, sort_keys=True) for v in first.values()}) != 1:
                raise RuntimeError(f"contenders disagree on the value: {first}")
            interleaved(ops, sizes.warmup, rng)
            measured = _ops(mem, raw, cache, [keys[p] for p in picks[sizes.warmup :]], level)
            samples = interleaved(measured, sizes.read_ops, rng, advance=advance)
            s = {name: summarize(v) for name, v in samples.items()}
            vs_sqlite = ratio(s["dualmem"]["p95"], s["sqlite"]["p95"])
            vs_diskcache = ratio(s["dualmem"]["p95"], s["diskcache"]["p95"])
            rows.append(
                {
                    "level": int(level),
                    "level_name": level.name,
                    "dualmem_get": s["dualmem"],
                    "sqlite_select_json": s["sqlite"],
                    "sqlite_select_row": s["sqlite_row"],
                    "diskcache_get": s["diskcache"],
                    "p95_vs_sqlite": vs_sqlite,
                    "p95_vs_sqlite_row": ratio(s["dualmem"]["p95"], s["sqlite_row"]["p95"]),
                    "p95_vs_diskcache": vs_diskcache,
                }
            )
            name = f"level {int(level)} {level.name}"
            targets.append(
                Target.check(
                    "read",
                    backend.name,
                    f"get p95 / SQLite PK SELECT p95, {name}",
                    vs_sqlite,
                    "<=",
                    TARGET_VS_SQLITE,
                    dualmem=us(s["dualmem"]["p95"]),
                    baseline=us(s["sqlite"]["p95"]),
                )
            )
            targets.append(
                Target.check(
                    "read",
                    backend.name,
                    f"get p95 / diskcache get p95, {name}",
                    vs_diskcache,
                    "<=",
                    TARGET_VS_DISKCACHE,
                    dualmem=us(s["dualmem"]["p95"]),
                    baseline=us(s["diskcache"]["p95"]),
                )
            )
            cdfs[f"dualmem get L{int(level)}"] = cdf_points(samples["dualmem"])
            if level is READ_LEVELS[0]:
                cdfs["raw SQLite SELECT + json.loads"] = cdf_points(samples["sqlite"])
                cdfs["diskcache get"] = cdf_points(samples["diskcache"])
    finally:
        mem.close()
        cache.close()
        raw.close()
    return {
        "method": METHOD,
        "records_per_level": n,
        "rows": rows,
        "targets": [t.to_json() for t in targets],
        "cdf_us": cdfs,
    }
