"""The ``python -m bench`` and ``dualmem bench`` command: run suites, write results, report.

Only the standard library is imported here: ``dualmem`` builds its parser from this module
whether or not the ``bench`` extra (matplotlib, diskcache, LangGraph) is installed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_RESULTS", "add_arguments", "main", "register_commands", "run_bench"]

#: Where a full run writes (the committed results); smaller runs default to a temp dir.
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The bench options (shared by ``python -m bench`` and ``dualmem bench``)."""
    from bench.suites import SUITES

    p.add_argument(
        "--quick",
        action="store_true",
        help="every suite at small sizes (under a minute); what CI runs",
    )
    p.add_argument(
        "--sizes",
        choices=("full", "quick", "tiny"),
        default=None,
        help="size preset (default full; --quick means quick; tiny is for the self-test)",
    )
    p.add_argument(
        "--suite",
        action="append",
        choices=list(SUITES),
        help="run only this suite (repeatable); default: all of them",
    )
    p.add_argument(
        "--backend",
        choices=("both", "redis", "fakeredis"),
        default="both",
        help="real redis-server, embedded fakeredis, or both (default)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"results directory (default: bench/results for a full run, "
        f"a new temporary directory otherwise; {DEFAULT_RESULTS.name}/ is committed)",
    )
    p.add_argument("--seed", type=int, default=1, help="seed of every generator (default 1)")
    p.add_argument("--no-plots", action="store_true", help="skip the matplotlib PNGs")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--redis-server", default=None, help="redis-server binary (default: PATH)")


def _clean(value: Any) -> Any:
    """NaN as null, so result files are strict JSON.

    >>> _clean({"p95": float("nan"), "rows": [(1, float("nan"))], "count": 3})
    {'p95': None, 'rows': [[1, None]], 'count': 3}
    """
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _command(args: argparse.Namespace) -> str:
    parts = [getattr(args, "prog_name", "python -m bench")]
    if args.quick:
        parts.append("--quick")
    if args.sizes:
        parts += ["--sizes", args.sizes]
    for s in args.suite or []:
        parts += ["--suite", s]
    if args.backend != "both":
        parts += ["--backend", args.backend]
    if args.seed != 1:
        parts += ["--seed", str(args.seed)]
    return " ".join(parts)


@contextlib.contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """SIGTERM (``timeout``, a cancelled CI job, a supervisor) raises SystemExit(143)
    while the suites run, so every server and worker process they started is stopped and
    the scratch directory removed, as on Ctrl-C; by default Python died at once and left
    them running."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_bench(args: argparse.Namespace) -> int:
    """Run the chosen suites on the chosen backends; write JSON, plots and REPORT.md."""
    from bench.harness import PRESETS, Bench, Progress, open_backend
    from bench.machine import describe_machine
    from bench.report import write_report
    from bench.suites import SUITES, load

    sizes = PRESETS[args.sizes or ("quick" if args.quick else "full")]
    suites = args.suite or list(SUITES)
    backends = ["redis", "fakeredis"] if args.backend == "both" else [args.backend]
    out: Path = args.out or (
        DEFAULT_RESULTS
        if sizes.name == "full"
        else Path(tempfile.mkdtemp(prefix=f"dualmem-bench-{sizes.name}-"))
    )
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    run_info: dict[str, Any] = {
        "id": f"{time.strftime('%Y%m%dT%H%M%S')}-{args.seed}",
        "command": _command(args),
        "sizes": asdict(sizes),
        "seed": args.seed,
        "machine": describe_machine(args.redis_server),
        "seconds": 0.0,
    }
    docs = {
        s: {"suite": s, "description": SUITES[s], "run": run_info, "backends": {}} for s in suites
    }
    scratch = Path(tempfile.mkdtemp(prefix="dualmem-bench-scratch-"))
    try:
        with _terminate_as_exit(), Progress(enabled=not args.no_progress) as progress:
            ctx = Bench(sizes, args.seed, scratch, progress, args.redis_server)
            for name in backends:
                with open_backend(name, scratch, args.redis_server) as backend:
                    for suite in suites:
                        backend.reset()
                        # The last suite's garbage (a dropped fakeredis server sits in
                        # reference cycles) goes now, not in a full collection inside the
                        # next suite's timed window (81 ms in one lag run at 500/s).
                        gc.collect()
                        docs[suite]["backends"][name] = load(suite)(ctx, backend)
                        run_info["seconds"] = time.monotonic() - started
                        path = out / f"{suite}.json"
                        text = json.dumps(_clean(docs[suite]), indent=1, allow_nan=False)
                        path.write_text(text + "\n", encoding="utf-8")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report = write_report(out, plots=not args.no_plots)
    from bench.report import load_results
    from bench.stats import Target

    targets = [
        Target.from_json(t)
        for doc in load_results(out).values()
        if doc["suite"] in suites
        for result in doc["backends"].values()
        for t in result["targets"]
    ]
    for t in targets:
        mark = "met   " if t.met else "MISSED"
        print(f"{mark} {t.suite:8} {t.backend:10} {t.what}: {t.text}")
    print(
        f"{sum(t.met for t in targets)} of {len(targets)} targets met in "
        f"{time.monotonic() - started:.0f} s; report: {report}"
    )
    return 0


def register_commands(subparsers: Any) -> None:
    """Add ``dualmem bench`` (see ``dualmem.cli.COMMAND_MODULES``)."""
    p = subparsers.add_parser(
        "bench", help="side-by-side benchmarks (needs the bench extra: pip install '.[bench]')"
    )
    add_arguments(p)
    p.set_defaults(func=run_bench, prog_name="dualmem bench")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m bench``."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_bench(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
