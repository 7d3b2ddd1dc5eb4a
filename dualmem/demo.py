"""``dualmem demo``: a put/sync/get round trip on the embedded default, with latencies."""

from __future__ import annotations

import time

from rich.console import Console
from rich.table import Table

from acl.levels import Level
from acl.principal import Principal
from dualmem.memory import DualMemory

__all__ = ["run_demo"]


def run_demo(
    redis_url: str | None = None, db_path: str | None = None, keyring: str | None = None
) -> int:
    """Write records at every level, wait for persistence, read them back, print p50/p95/p99.

    Running it twice shows that the first run's records (and their keys) survived.
    """
    console = Console()
    coder = Principal(agent_id="coder-1", team="backend", swarm="phase-1-auth", project="shop")
    system = Principal(agent_id="orchestrator", system=True)
    with DualMemory(redis_url=redis_url, db_path=db_path, keyring=keyring) as mem:
        s = mem.settings
        console.print(f"[bold]dualmem demo[/] redis={s.redis_url} db={s.db_path}")
        before = mem.query(principal=coder, level=Level.PRIVATE, prefix="demo/run/", limit=10_000)
        run = len(before) + 1
        if before:
            console.print(
                f"found {len(before)} earlier run(s) in {s.db_path}: last value "
                f"{before[-1].value} (encrypted at rest, opened with the saved key)"
            )
        receipt = mem.put(
            f"demo/run/{run:04d}",
            {"run": run, "at": time.strftime("%Y-%m-%dT%H:%M:%S")},
            level=Level.PRIVATE,
            principal=coder,
        )
        t0 = time.perf_counter()
        for i in range(2000):
            # Even iterations: an agent's private confidence (encrypted); odd: the swarm's
            # shared consensus (plaintext level, compressed when large).
            private = i % 2 == 0
            mem.put(
                f"{'confidence' if private else 'consensus'}/auth/{i % 50}",
                {"score": round(0.5 + (i % 50) / 100, 2), "iteration": i},
                level=Level.PRIVATE if private else Level.SWARM,
                principal=coder,
                ttl=86_400,
            )
        last = mem.put(
            "decision/phase-1", {"decision": "PROCEED"}, level=Level.SYSTEM, principal=system
        )
        elapsed = time.perf_counter() - t0
        mem.sync(receipt, timeout=30)
        mem.sync(last, timeout=30)
        console.print(
            f"wrote 2,002 records in {elapsed * 1000:.0f} ms "
            f"({2002 / elapsed:,.0f}/s), all persisted to SQLite"
        )
        got = mem.get("confidence/auth/8", level=Level.PRIVATE, principal=coder)
        console.print(f"get confidence/auth/8 (PRIVATE, encrypted at rest) -> {got}")
        swarm = mem.query(principal=coder, level=Level.SWARM, prefix="consensus/", limit=100)
        console.print(f"query SWARM prefix 'consensus/' -> {len(swarm)} records")
        console.print(
            "decision readable by coder-1? ",
            "no (AccessDenied)" if _denied(mem, coder) else "yes",
        )
        for _ in range(20):
            mem.get(f"demo/run/{run:04d}", level=Level.PRIVATE, principal=coder)
        table = Table(title="latency per path (ms)")
        for col in ("path", "count", "p50", "p95", "p99", "max"):
            table.add_column(col, justify="left" if col == "path" else "right")
        for path, m in mem.metrics().items():
            table.add_row(
                path, f"{int(m['count']):,}", *(f"{m[k]:.3f}" for k in ("p50", "p95", "p99", "max"))
            )
        console.print(table)
        report = mem.close()
        console.print(
            f"closed: {'drained' if report.drained else f'{report.pending} pending'}; "
            f"run `dualmem demo` again to see run {run} read back"
        )
    return 0


def _denied(mem: DualMemory, who: Principal) -> bool:
    from dualmem.errors import AccessDenied

    try:
        mem.get("decision/phase-1", level=Level.SYSTEM, principal=who)
    except AccessDenied:
        return True
    return False
