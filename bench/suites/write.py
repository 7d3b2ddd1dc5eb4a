"""Write path: ``put`` at each level against raw redis-py ``MULTI`` SET+XADD of the same bytes."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, cast

import redis

from acl import Level
from bench.harness import LEVELS, PRINCIPAL, Backend, Bench, interleaved, json_bytes, make_values
from bench.stats import Target, cdf_points, ratio, summarize, us
from dualmem import DualMemory
from dualmem.commands import put_fields
from dualmem.memory import XLEN_EVERY
from dualmem.metrics import Metrics
from dualmem.redis_backend import connect, transact

__all__ = ["CACHE_TTL_MS", "RAW_STREAM", "raw_put", "run", "same_put"]

RAW_STREAM = b"bench:raw:cmd"
CACHE_TTL_MS = 3_600_000  # dualmem's default cache_ttl, so both SETs carry the same PX
TARGET_P95_RATIO = 1.2

METHOD = (
    "Each round times one `put` and one raw redis-py `MULTI; SET; XADD; EXEC` in random "
    "order. The raw transaction stores the same 500-byte JSON document (serialized before "
    "the clock starts) under a cache key with the same PX, and appends a stream entry with "
    "the same seven fields dualmem writes; `put` also validates, checks access, seals the "
    "envelope (AES-256-GCM at levels 1, 2, 5) and, one write in 64, adds the XLEN it "
    "needs for backpressure. A third contender, timed in the same rounds, sends put's "
    "exact commands (XLEN as often) "
    "through dualmem's own transport (`dualmem.redis_backend.transact`, on a client "
    "configured like dualmem's: socket timeouts, bounded retries): the gap between it and "
    "put is dualmem's own work (validation, access check, envelope, metrics). That "
    "transport packs each command with one hiredis call and checks a connection out of "
    "its pool without redis-py's metrics calls (`dualmem.redis_backend.pack`, "
    "`_CommandPool`), so on real Redis it sends the same bytes in less time than the "
    "redis-py pipeline. On the "
    "embedded fakeredis it hands the in-process server each command as an "
    "argument list instead of RESP bytes for fakeredis to parse in Python, and runs a "
    "`MULTI; ...; EXEC` in one step, as the server's EXEC runs its queue, instead of "
    "command by command through its reply queue, so there put "
    "and this contender are both faster than the raw redis-py transaction. Real Redis: the "
    "writer runs with `worker=False` and one `dualmem worker` "
    "process persists concurrently (a worker thread would compete with the writer for the "
    "GIL), with its default settings (so as a SCHED_BATCH task, see `worker_sched`). "
    "fakeredis lives in one process, so the targets there are measured on the "
    "embedded default (writer plus its worker thread, which shares the GIL); the same "
    "measurement with no worker running at all (no thread, no process) is shown for "
    "diagnosis."
)


def _raw_put_parts(key: str, payload: bytes, level: Level) -> tuple[bytes, dict[Any, Any]]:
    """The cache key and stream fields of a put of ``payload`` at ``key``, as put has them."""
    scope = str(PRINCIPAL.scope(level))
    ts_us = time.time_ns() // 1000
    fields = put_fields(scope, key, level, PRINCIPAL.agent_id, ts_us, payload, None)
    return f"bench:raw:c:{scope}:{key}".encode(), cast(dict[Any, Any], fields)


def raw_put(client: redis.Redis, key: str, payload: bytes, level: Level, *, xlen: bool) -> None:
    """The baseline: redis-py ``MULTI; SET; XADD [; XLEN]; EXEC`` of a put's bytes."""
    cache_key, fields = _raw_put_parts(key, payload, level)
    pipe = client.pipeline(transaction=True)
    pipe.set(cache_key, payload, px=CACHE_TTL_MS)
    pipe.xadd(RAW_STREAM, fields)
    if xlen:
        pipe.xlen(RAW_STREAM)
    pipe.execute()


def same_put(client: redis.Redis, key: str, payload: bytes, level: Level, *, xlen: bool) -> None:
    """``raw_put``'s commands through dualmem's transport (``transact``), as put sends them."""
    cache_key, fields = _raw_put_parts(key, payload, level)
    xadd = (b"XADD", RAW_STREAM, b"*", *(part for item in fields.items() for part in item))
    commands: list[tuple[Any, ...]] = [(b"SET", cache_key, payload, b"PX", CACHE_TTL_MS), xadd]
    if xlen:
        commands.append((b"XLEN", RAW_STREAM))
    transact(client, commands)


def _measure(
    ctx: Bench,
    backend: Backend,
    mem: DualMemory,
    *,
    same: bool,
    label: str,
) -> tuple[list[dict[str, Any]], dict[str, list[int]]]:
    """Interleave puts and raw transactions at each level; rows and all samples by op."""
    sizes = ctx.sizes
    rng = ctx.rng(f"write:{backend.name}:{label}")
    values = make_values(rng, 64)
    payloads = [json_bytes(v) for v in values]
    keys = [f"bench/write/{i}" for i in range(sizes.key_space)]
    nkeys, nvals = len(keys), len(values)
    raw = backend.raw_client()
    # The same commands through dualmem's transport, on a client configured exactly like
    # dualmem's (socket timeouts, bounded retries): what is left between this and put is
    # dualmem's own work.
    twin, _ = connect(mem.settings)
    advance = ctx.progress.task(
        f"write [{backend.name}{label}]", len(LEVELS) * (sizes.warmup + sizes.write_ops)
    )
    rows: list[dict[str, Any]] = []
    every: dict[str, list[int]] = {}
    for level in LEVELS:

        def put(i: int, lv: Level = level) -> object:
            return mem.put(keys[i % nkeys], values[i % nvals], level=lv, principal=PRINCIPAL)

        def raw_multi(i: int, lv: Level = level) -> None:
            raw_put(raw, keys[i % nkeys], payloads[i % nvals], lv, xlen=False)

        def raw_same(i: int, lv: Level = level) -> None:
            xlen = i % XLEN_EVERY == 0
            same_put(twin, keys[i % nkeys], payloads[i % nvals], lv, xlen=xlen)

        ops: dict[str, Callable[[int], object]] = {"dualmem": put, "raw": raw_multi}
        if same:
            ops["raw_same"] = raw_same
        interleaved(ops, sizes.warmup, rng, advance=advance)
        mem.metrics_registry.reset()
        samples = interleaved(ops, sizes.write_ops, rng, advance=advance)
        own: Metrics = mem.metrics_registry
        redis_write = own.histograms["redis_write"].summary()
        encode = own.histograms["encode"].summary()
        raw.delete(RAW_STREAM)
        s = {name: summarize(v) for name, v in samples.items()}
        row = {
            "level": int(level),
            "level_name": level.name,
            "dualmem_put": s["dualmem"],
            "raw_multi": s["raw"],
            "p95_ratio": ratio(s["dualmem"]["p95"], s["raw"]["p95"]),
            "p50_ratio": ratio(s["dualmem"]["p50"], s["raw"]["p50"]),
            # dualmem's own histograms over the same puts (ms -> us)
            "redis_write": {k: _us(k, v) for k, v in redis_write.items()},
            "encode": {k: _us(k, v) for k, v in encode.items()},
        }
        if same:
            row["raw_same_commands"] = s["raw_same"]
            row["p95_ratio_same_commands"] = ratio(s["dualmem"]["p95"], s["raw_same"]["p95"])
            row["p50_ratio_same_commands"] = ratio(s["dualmem"]["p50"], s["raw_same"]["p50"])
        rows.append(row)
        for name, v in samples.items():
            every.setdefault(f"{name}:{int(level)}", v)
    twin.close()
    return rows, every


def run(ctx: Bench, backend: Backend) -> dict[str, Any]:
    """Measure put latency per level beside the raw transaction, interleaved."""
    with ctx.writer(backend, ctx.path(f"write-{backend.name}.db")) as mem:
        rows, samples = _measure(ctx, backend, mem, same=True, label="")
    targets = [
        Target.check(
            "write",
            backend.name,
            f"put p95 / raw MULTI p95, level {r['level']} {r['level_name']}",
            r["p95_ratio"],
            "<=",
            TARGET_P95_RATIO,
            dualmem=us(r["dualmem_put"]["p95"]),
            baseline=us(r["raw_multi"]["p95"]),
        )
        for r in rows
    ]
    cdfs = {
        f"L{r['level']} {r['level_name']}": cdf_points(samples[f"dualmem:{r['level']}"])
        for r in rows
    }
    cdfs["raw MULTI SET+XADD"] = cdf_points([x for r in rows for x in samples[f"raw:{r['level']}"]])
    out: dict[str, Any] = {"method": METHOD, "rows": rows}
    # Diagnosis only (no target): the same measurement with no worker running at all (no
    # thread in the process, no worker process), to separate dualmem's write path from
    # the persisting worker's share of the GIL (fakeredis) or of the CPUs (real Redis).
    db = ctx.path(f"write-{backend.name}-noworker.db")
    mem = ctx.memory(backend, db, worker=False, max_backlog=10**9)
    try:
        out["rows_without_worker"], _ = _measure(
            ctx, backend, mem, same=False, label=", worker=False"
        )
    finally:
        mem.close()
    out["targets"] = [t.to_json() for t in targets]
    out["cdf_us"] = cdfs
    return out


def _us(name: str, value: float) -> float:
    """Metrics summaries are in ms; result files use microseconds (counts stay counts)."""
    return value if name == "count" else value * 1000.0
