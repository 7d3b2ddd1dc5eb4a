"""Write path: ``put`` at each level against raw redis-py ``MULTI`` SET+XADD of the same bytes."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from bench.harness import LEVELS, PRINCIPAL, Backend, Bench, interleaved, json_bytes, make_values
from bench.stats import Target, cdf_points, ratio, summarize, us
from dualmem.metrics import Metrics

__all__ = ["CACHE_TTL_MS", "RAW_STREAM", "run"]

RAW_STREAM = b"bench:raw:cmd"
CACHE_TTL_MS = 3_600_000  # dualmem's default cache_ttl, so both SETs carry the same PX
TARGET_P95_RATIO = 1.2

METHOD = (
    "Each round times one `put` and one raw redis-py `MULTI; SET; XADD; EXEC` in random "
    "order. The raw transaction stores the same 500-byte JSON document (serialized before "
    "the clock starts) under a cache key with the same PX, and appends a stream entry with "
    "the same seven fields dualmem writes; `put` also validates, checks access, seals the "
    "envelope (AES-256-GCM at levels 1, 2, 5) and adds the XLEN it needs for backpressure. "
    "Real Redis: the writer runs with `worker=False` and one `dualmem worker` process "
    "persists concurrently. fakeredis: the embedded default (writer plus its worker thread "
    "in one process)."
)


def run(ctx: Bench, backend: Backend) -> dict[str, Any]:
    """Measure put latency per level beside the raw transaction, both interleaved."""
    sizes = ctx.sizes
    rng = ctx.rng(f"write:{backend.name}")
    values = make_values(rng, 64)
    payloads = [json_bytes(v) for v in values]
    keys = [f"bench/write/{i}" for i in range(sizes.key_space)]
    raw = backend.raw_client()
    rows: list[dict[str, Any]] = []
    targets: list[Target] = []
    cdfs: dict[str, list[list[float]]] = {}
    raw_all: list[int] = []
    nkeys, nvals = len(keys), len(values)
    advance = ctx.progress.task(
        f"write [{backend.name}]", len(LEVELS) * (sizes.warmup + sizes.write_ops)
    )
    with ctx.writer(backend, ctx.path(f"write-{backend.name}.db")) as mem:
        for level in LEVELS:
            scope = PRINCIPAL.scope(level)
            assert scope is not None

            def put(i: int, level: Any = level) -> None:
                mem.put(keys[i % nkeys], values[i % nvals], level=level, principal=PRINCIPAL)

            def raw_put(i: int, scope: str = scope, level: Any = level) -> None:
                key = keys[i % nkeys]
                payload = payloads[i % nvals]
                pipe = raw.pipeline(transaction=True)
                pipe.set(f"bench:raw:c:{scope}:{key}".encode(), payload, px=CACHE_TTL_MS)
                pipe.xadd(
                    RAW_STREAM,
                    {
                        b"op": "put",
                        b"s": scope,
                        b"k": key,
                        b"l": int(level),
                        b"a": PRINCIPAL.agent_id,
                        b"t": time.time_ns() // 1000,
                        b"e": payload,
                    },
                )
                pipe.execute()

            ops: dict[str, Callable[[int], object]] = {"dualmem": put, "raw": raw_put}
            interleaved(ops, sizes.warmup, rng, advance=advance)
            mem.metrics_registry.reset()
            samples = interleaved(ops, sizes.write_ops, rng, advance=advance)
            own: Metrics = mem.metrics_registry
            redis_write = own.histograms["redis_write"].summary()
            encode = own.histograms["encode"].summary()
            raw.delete(RAW_STREAM)
            dm, base = summarize(samples["dualmem"]), summarize(samples["raw"])
            r = ratio(dm["p95"], base["p95"])
            rows.append(
                {
                    "level": int(level),
                    "level_name": level.name,
                    "dualmem_put": dm,
                    "raw_multi": base,
                    "p95_ratio": r,
                    "p50_ratio": ratio(dm["p50"], base["p50"]),
                    # dualmem's own histograms over the same puts (ms -> us)
                    "redis_write": {k: _us(k, v) for k, v in redis_write.items()},
                    "encode": {k: _us(k, v) for k, v in encode.items()},
                }
            )
            targets.append(
                Target.check(
                    "write",
                    backend.name,
                    f"put p95 / raw MULTI p95, level {int(level)} {level.name}",
                    r,
                    "<=",
                    TARGET_P95_RATIO,
                    dualmem=us(dm["p95"]),
                    baseline=us(base["p95"]),
                )
            )
            cdfs[f"L{int(level)} {level.name}"] = cdf_points(samples["dualmem"])
            raw_all.extend(samples["raw"])
    cdfs["raw MULTI SET+XADD"] = cdf_points(raw_all)
    return {
        "method": METHOD,
        "rows": rows,
        "targets": [t.to_json() for t in targets],
        "cdf_us": cdfs,
    }


def _us(name: str, value: float) -> float:
    """Metrics summaries are in ms; result files use microseconds (counts stay counts)."""
    return value if name == "count" else value * 1000.0
