"""Scale: put latency and persist rate as the store grows from a thousand to a million
records."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from acl.crypto import Codec, Keyring
from bench.harness import LEVELS, PRINCIPAL, Backend, Bench, interleaved, json_bytes, make_values
from bench.stats import Target, flatness, median, ratio, summarize, us
from bench.suites.persist import (
    drain_rate,
    drop_anchors,
    fill_backlog,
    last_seq,
    raw_executemany_rate,
)
from bench.suites.write import RAW_STREAM, raw_put
from dualmem.commands import put_fields
from dualmem.sqlite_store import SQLiteStore
from dualmem.store import StreamEntry

__all__ = ["prefill", "run"]

TARGET_FLATNESS = 1.5
_PREFILL_BATCH = 500

METHOD = (
    "A database is grown to each size with real put commands (sealed envelopes, levels "
    "round-robin, random keys) committed through `SQLiteStore.apply`, the worker's own "
    "write; Redis holds no prefill, because no write path step reads Redis data by size. "
    "At each size a copy of that database gets (a) interleaved puts beside the raw MULTI "
    "baseline, persisted as in the write suite, and (b) a backlog of new puts drained by "
    "one in-process worker, as in the persist suite, beside raw executemany of the rows it "
    "wrote into a fresh database, right after it. (b) runs several rounds per size (3 in "
    "the full run), each on a new copy of the size's database; the table gives medians "
    "(the rate ratio is the median of the rounds' own ratios), the result file every "
    "round: a single 20k drain and its 0.3 s baseline moved by up to 1.7x between sizes "
    "with nothing but the machine's noise. Flatness is max/min over the sizes of each "
    "figure divided by its baseline measured at the same moment, so the machine's drift "
    "during the long run cancels and what remains is the effect of size; the undivided "
    "figures are in the table too."
)


def prefill(db: Path, start: int, count: int, ctx: Bench) -> None:
    """Commit ``count`` more put commands (indices ``start``..) into ``db`` via ``apply``."""
    codec = Codec(Keyring.load(ctx.keyfile))
    rng = ctx.rng(f"scale:prefill:{start}")
    values = [json_bytes(v) for v in make_values(rng, 64)]
    store = SQLiteStore(db)
    advance = ctx.progress.task(f"scale prefill to {start + count:,}", count)
    try:
        now_us = time.time_ns() // 1000
        for base in range(start, start + count, _PREFILL_BATCH):
            entries = []
            for i in range(base, min(base + _PREFILL_BATCH, start + count)):
                level = LEVELS[i % len(LEVELS)]
                scope = PRINCIPAL.scope(level)
                assert scope is not None
                key = f"bench/scale/{rng.getrandbits(64):016x}"
                envelope = codec.seal_bytes(
                    values[i % 64], scope=scope, key=key, level=level, owner=PRINCIPAL.agent_id
                )
                fields = put_fields(scope, key, level, PRINCIPAL.agent_id, now_us, envelope, None)
                raw = {k: v if isinstance(v, bytes) else str(v).encode() for k, v in fields.items()}
                # Stream ids far below any real one (ms 1), so they never meet the run's own.
                entries.append(StreamEntry(0, f"1-{i}", raw))
            result = store.apply(entries)
            if result.applied != len(entries):
                raise RuntimeError(f"prefill applied {result.applied} of {len(entries)}")
            advance(len(entries))
    finally:
        store.close()


def _base_db(ctx: Bench, size: int) -> Path:
    """A database holding ``size`` records, grown once and shared by both backends."""
    built: dict[int, Path] = ctx.cache.setdefault("scale_bases", {})
    if size in built:
        return built[size]
    base = ctx.workdir / "scale-base.db"
    have = ctx.cache.get("scale_base_size", 0)
    if size < have:
        raise RuntimeError("scale sizes must be increasing")
    prefill(base, have, size - have, ctx)
    ctx.cache["scale_base_size"] = size
    snapshot = ctx.workdir / f"scale-base-{size}.db"
    _copy_db(base, snapshot)
    built[size] = snapshot
    return snapshot


def _copy_db(src: Path, dst: Path) -> None:
    # The store was closed (WAL checkpointed on close); copy any -wal left anyway.
    for suffix in ("", "-wal"):
        s = Path(str(src) + suffix)
        d = Path(str(dst) + suffix)
        if s.exists():
            shutil.copyfile(s, d)
        elif d.exists():
            d.unlink()


def _drain_round(
    ctx: Bench, backend: Backend, raw: Any, base: Path, db: Path, size: int
) -> dict[str, Any]:
    """One drain of ``scale_backlog`` new puts into a copy of the ``size`` database, and
    raw ``executemany`` of the rows it wrote right after it.

    Every round starts from the same database (copied again from ``base``), so rounds
    differ only by the machine's noise. The hash-chain anchors a previous writer left in
    Redis name ids this copy does not hold: they are dropped first, as in the persist
    suite, or the worker would warn of a restored backup.
    """
    sizes = ctx.sizes
    _copy_db(base, db)
    writer = ctx.memory(backend, db, worker=False, max_backlog=sizes.scale_backlog + 1)
    try:
        drop_anchors(raw, writer.settings)
        fill_backlog(writer, sizes.scale_backlog, f"bench/scale-persist/{size}", ctx)
        before = last_seq(db)
        rate, info = drain_rate(writer, db, sizes.scale_backlog)
        raw_rate = raw_executemany_rate(
            db, ctx.path(f"scale-raw-{backend.name}.db"), writer.settings, before
        )
    finally:
        writer.close()
    return {
        "persist_rate": rate,
        "raw_executemany_rate": raw_rate,
        "persist_rate_ratio": ratio(rate, raw_rate),
        **{f"persist_{k}": v for k, v in info.items()},
    }


def run(ctx: Bench, backend: Backend) -> dict[str, Any]:
    """Measure put p95 and drain rate at each size."""
    sizes = ctx.sizes
    rng = ctx.rng(f"scale:{backend.name}")
    values = make_values(rng, 64)
    payloads = [json_bytes(v) for v in values]
    keys = [f"bench/scale-put/{i}" for i in range(sizes.key_space)]
    nk, nl = len(keys), len(LEVELS)
    rows: list[dict[str, Any]] = []
    for size in sizes.scale_sizes:
        base = _base_db(ctx, size)
        db = ctx.path(f"scale-{backend.name}.db")
        _copy_db(base, db)
        advance = ctx.progress.task(
            f"scale {size:,} [{backend.name}]",
            sizes.warmup + sizes.scale_put_ops + sizes.scale_backlog * sizes.scale_drain_rounds,
        )
        backend.reset()
        raw = backend.raw_client()
        with ctx.writer(backend, db) as mem:

            def put(i: int) -> None:
                mem.put(keys[i % nk], values[i % 64], level=LEVELS[i % nl], principal=PRINCIPAL)

            def raw_multi(i: int, client: Any = raw) -> None:
                raw_put(client, keys[i % nk], payloads[i % 64], LEVELS[i % nl], xlen=False)

            ops = {"dualmem": put, "raw": raw_multi}
            interleaved(ops, sizes.warmup, rng, advance=advance)
            samples = interleaved(ops, sizes.scale_put_ops, rng, advance=advance)
        raw.delete(RAW_STREAM)
        drains = []
        for _ in range(sizes.scale_drain_rounds):
            drains.append(_drain_round(ctx, backend, raw, base, db, size))
            advance(sizes.scale_backlog)
        raw.close()
        dm, base_put = summarize(samples["dualmem"]), summarize(samples["raw"])
        rows.append(
            {
                "records": size,
                "put": dm,
                "raw_multi": base_put,
                "put_p95_ratio": ratio(dm["p95"], base_put["p95"]),
                "persist_rate": median(d["persist_rate"] for d in drains),
                "raw_executemany_rate": median(d["raw_executemany_rate"] for d in drains),
                # The median of the rounds' ratios: each pairs a drain with the raw
                # baseline measured right after it.
                "persist_rate_ratio": median(d["persist_rate_ratio"] for d in drains),
                "persist_rounds": drains,
            }
        )
    put_flat = flatness(r["put_p95_ratio"] for r in rows)
    rate_flat = flatness(r["persist_rate_ratio"] for r in rows)
    targets = [
        Target.check(
            "scale",
            backend.name,
            "put p95 ÷ raw MULTI p95 at the same moment, max/min over sizes",
            put_flat,
            "<=",
            TARGET_FLATNESS,
            "x",
            dualmem=" / ".join(us(r["put"]["p95"]) for r in rows),
            baseline=" / ".join(us(r["raw_multi"]["p95"]) for r in rows),
        ),
        Target.check(
            "scale",
            backend.name,
            "drain rate ÷ raw executemany rate at the same moment, max/min over sizes",
            rate_flat,
            "<=",
            TARGET_FLATNESS,
            "x",
            dualmem=" / ".join(f"{r['persist_rate']:,.0f}/s" for r in rows),
            baseline=" / ".join(f"{r['raw_executemany_rate']:,.0f}/s" for r in rows),
        ),
    ]
    return {
        "method": METHOD,
        "rows": rows,
        # Without the baselines: how much of the spread is the machine, not the size.
        "put_p95_flatness_absolute": flatness(r["put"]["p95"] for r in rows),
        "persist_rate_flatness_absolute": flatness(r["persist_rate"] for r in rows),
        "targets": [t.to_json() for t in targets],
    }
