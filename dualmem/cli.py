"""The ``dualmem`` command: core commands here (worker, stats, keygen, demo); other areas
register theirs through ``COMMAND_MODULES``."""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import json
import logging
import os
import signal
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from acl.crypto import Keyring
from dualmem.errors import ConfigurationError, DualMemError
from dualmem.settings import WORKER_SCHED, Settings
from dualmem.shutdown import stop_on_signals

__all__ = [
    "COMMAND_MODULES",
    "WORKER_OPTIONS",
    "add_common_arguments",
    "build_parser",
    "main",
    "set_worker_scheduling",
    "settings_from_args",
    "worker_settings",
]

log = logging.getLogger("dualmem.worker")

#: Modules with a ``register_commands(subparsers)`` function, each adding its subcommands.
#: Every command handler takes the parsed ``argparse.Namespace`` and returns an exit code.
COMMAND_MODULES: tuple[str, ...] = ("bench.cli", "dualmem.ops.cli", "dualmem.rotation")


def settings_from_args(args: argparse.Namespace, **extra: Any) -> Settings:
    """Settings from the common options (see :func:`add_common_arguments`), then env."""
    overrides: dict[str, Any] = {
        "redis_url": getattr(args, "redis_url", None),
        "db_path": getattr(args, "db", None),
        "namespace": getattr(args, "namespace", None),
        "shards": getattr(args, "shards", None),
    }
    overrides.update(extra)
    return Settings.load(overrides)


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """``--redis-url``, ``--db``, ``--namespace``, ``--shards`` (each falls back to env)."""
    p.add_argument("--redis-url", help="redis://host:port/db or memory:// (DUALMEM_REDIS_URL)")
    p.add_argument("--db", help="SQLite database file (DUALMEM_DB_PATH)")
    p.add_argument("--namespace", help="Redis key prefix (DUALMEM_NAMESPACE)")
    p.add_argument("--shards", type=int, help="number of command streams (DUALMEM_SHARDS)")


#: Options of ``dualmem worker`` beyond the common ones, each named as its setting.
WORKER_OPTIONS = (
    "batch_size",
    "claim_idle_ms",
    "max_deliveries",
    "consumer",
    "block_ms",
    "worker_sched",
)


def worker_settings(args: argparse.Namespace) -> Settings:
    """The settings of ``dualmem worker``: its options, then the common ones, then env.

    >>> args = build_parser().parse_args(["worker", "--batch-size", "50", "--shards", "2"])
    >>> s = worker_settings(args)
    >>> s.batch_size, s.shards
    (50, 2)
    """
    extra = {n: getattr(args, n) for n in WORKER_OPTIONS if getattr(args, n, None) is not None}
    return settings_from_args(args, **extra)


def cmd_worker(args: argparse.Namespace) -> int:
    """Run a persistence worker until SIGTERM/SIGINT, then drain and exit."""
    from dualmem.redis_backend import connect
    from dualmem.sqlite_store import SQLiteStore
    from dualmem.worker import Worker

    settings = worker_settings(args)
    if settings.embedded:
        print(
            "dualmem worker: memory:// lives inside one process; a separate worker needs a "
            "real Redis (--redis-url redis://...)",
            file=sys.stderr,
        )
        return 2
    # Before any thread starts: threads inherit the policy of the one that creates them.
    sched = set_worker_scheduling(settings.worker_sched)
    store = SQLiteStore.from_settings(settings)
    client, _ = connect(settings, extra_timeout=settings.block_ms / 1000)
    worker = Worker(client, store, settings)
    worker.ensure_groups()
    if hasattr(signal, "SIGUSR1"):
        # `kill -USR1 <pid>` prints every thread's stack to stderr: what a stuck worker is
        # doing, without stopping it.
        faulthandler.register(signal.SIGUSR1, all_threads=True)

    def on_signal(signum: int) -> None:
        log.info("signal %d: draining", signum)

    with stop_on_signals(on_signal) as stop:
        print(
            f"dualmem worker {worker.consumer}: {settings.shown_url} -> {settings.db_path} "
            f"({settings.shards} shard(s), group {settings.group}, scheduling {sched})",
            flush=True,
        )
        left = worker.run(stop, drain_timeout=settings.close_timeout)
    try:
        worker.snapshot_metrics()
    except DualMemError as exc:
        # Best effort, as at DualMemory.close(): a locked or full database must not turn
        # a clean stop into a failure with no summary.
        log.warning("could not save the latency figures at exit: %s", exc)
    finally:
        store.close()
        client.close()
    s = worker.stats
    pending = "an unknown number of commands (the drain failed)" if left < 0 else left
    print(
        f"dualmem worker {worker.consumer} stopped: {s.applied} applied, {s.duplicates} "
        f"duplicates, {s.claimed} claimed, {s.dead_lettered} dead-lettered, {pending} left "
        "pending",
        flush=True,
    )
    return 0


def set_worker_scheduling(policy: str) -> str:
    """Put this process's threads, and those they start later, under ``policy`` (see
    ``Settings.worker_sched``); returns the policy in effect.

    Where the platform has no SCHED_BATCH, or refuses, it says so in the log and goes on
    as it is: scheduling is a latency preference, not a correctness setting.
    """
    if policy != "batch":
        return "normal"
    batch = getattr(os, "SCHED_BATCH", None)
    if batch is None:
        log.warning("SCHED_BATCH is not available here; the worker keeps normal scheduling")
        return "normal"
    try:
        # Linux schedules threads, not processes: each one that exists now (an imported
        # library may have started some), then new threads inherit it from their creator.
        for tid in sorted(int(t) for t in os.listdir("/proc/self/task")):
            os.sched_setscheduler(tid, batch, os.sched_param(0))
    except OSError as exc:
        log.warning("could not switch the worker to SCHED_BATCH: %s", exc)
        return "normal"
    return "batch"


def cmd_stats(args: argparse.Namespace) -> int:
    """Print latency percentiles per path, backlog (pending + undelivered), dead letters
    and database size (file, WAL, free pages)."""
    from rich.console import Console
    from rich.table import Table

    from dualmem.redis_backend import connect, translate_errors
    from dualmem.sqlite_store import SQLiteStore
    from dualmem.worker import stream_backlog, stream_pending

    settings = settings_from_args(args)
    if not Path(settings.db_path).exists():
        print(f"dualmem stats: no database at {settings.db_path}", file=sys.stderr)
        return 2
    from dualmem.ops.database import check_current, database_size, open_database

    with open_database(settings.db_path) as conn:
        # Opening the store would migrate an older file on the spot, with no backup;
        # upgrades go through `dualmem migrate`.
        check_current(conn, settings.db_path)
    store = SQLiteStore.from_settings(settings)
    try:
        snapshots = store.latest_metrics()
        dead = store.dead_letter_count()
        last_seq = store.last_seq()
    finally:
        store.close()
    with open_database(settings.db_path) as conn:
        sizes = database_size(conn, settings.db_path)
    size = sizes.total_bytes
    backlog: int | str = "n/a (memory:// is per process)"
    pending: int | str = "n/a"
    if not settings.embedded:
        from dualmem.layout import Layout

        try:
            client, _ = connect(settings)
            with translate_errors("stats"):
                streams = Layout(settings.namespace, settings.shards).streams()
                backlog = sum(stream_backlog(client, s, settings.group) for s in streams)
                # Delivered to a worker but not acknowledged: in a batch being committed,
                # or left by a dead worker until it is claimed.
                pending = sum(stream_pending(client, s, settings.group) for s in streams)
            client.close()
        except DualMemError as exc:
            backlog = f"unavailable ({exc})"
    if args.json:
        print(
            json.dumps(
                {
                    "metrics": snapshots,
                    "backlog": backlog,
                    "pending": pending,
                    "dead_letters": dead,
                    "journal_seq": last_seq,
                    "db_bytes": size,
                    "db_wal_bytes": sizes.wal_bytes,
                    "db_free_bytes": sizes.free_bytes,
                },
                indent=2,
            )
        )
        return 0
    console = Console()
    table = Table(title=f"dualmem latency (ms) - {settings.db_path}")
    for col in ("source", "path", "count", "p50", "p95", "p99", "max"):
        table.add_column(col, justify="right" if col not in ("source", "path") else "left")
    for source, paths in snapshots.items():
        for path, s in paths.items():
            table.add_row(
                source,
                path,
                str(int(s["count"])),
                *(f"{s[k]:.3f}" for k in ("p50", "p95", "p99", "max")),
            )
    if not snapshots:
        table.caption = "no snapshots yet: a worker writes one every metrics_interval and at exit"
    console.print(table)
    console.print(
        f"backlog: {backlog} (pending: {pending})   dead letters: {dead}   "
        f"journal seq: {last_seq}   database: {size / 1e6:.2f} MB "
        f"(WAL {sizes.wal_bytes / 1e6:.2f} MB, free {sizes.free_bytes / 1e6:.2f} MB)"
    )
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    """Write a new key file (mode 0600) in an existing directory."""
    out = Path(args.out)
    if not out.parent.is_dir():
        # As export and backup: a typo in the path is not a reason to create directories.
        raise ConfigurationError(f"directory {out.parent} does not exist")
    ring = Keyring.generate()
    ring.save(args.out, overwrite=args.force)
    print(
        f"wrote {args.out} (key id {ring.active_id}, mode 0600): back it up; "
        "without it encrypted records cannot be read"
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo (see ``dualmem.demo``)."""
    from dualmem.demo import run_demo

    return run_demo(redis_url=args.redis_url, db_path=args.db, keyring=args.keyring)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``dualmem`` command."""
    parser = argparse.ArgumentParser(
        prog="dualmem",
        description=(
            "dualmem: Redis-first writes, SQLite-backed reads, five access levels. "
            "`dualmem demo` shows it on the embedded default; `dualmem COMMAND --help` "
            "describes each command. Exit codes: 0 all good, 1 something is wrong (a failed "
            "check), 2 the command cannot run, 3 an import skipped bad lines."
        ),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("worker", help="persist command streams to SQLite until stopped")
    add_common_arguments(p)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--claim-idle-ms", type=int)
    p.add_argument("--max-deliveries", type=int)
    p.add_argument("--block-ms", type=int)
    p.add_argument("--consumer", help="consumer name (default host-pid-random)")
    p.add_argument(
        "--worker-sched",
        choices=WORKER_SCHED,
        help="CPU scheduling of this process (DUALMEM_WORKER_SCHED, default batch)",
    )
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("stats", help="latency percentiles, backlog, dead letters, size")
    add_common_arguments(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("keygen", help="create a key file for the encrypted levels")
    p.add_argument("--out", required=True, help="path of the new key file")
    p.add_argument("--force", action="store_true", help="replace an existing file (dangerous)")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser(
        "demo", help="a complete CFN loop with a live Subscriber feed and per-path latency"
    )
    p.add_argument("--redis-url", default=None, help="default: memory:// (embedded)")
    p.add_argument("--db", default=None, help="default: ./dualmem.db")
    p.add_argument(
        "--keyring", default=None, help="key file (default: <db>.keys, created on first use)"
    )
    p.set_defaults(func=cmd_demo)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dualmem`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose or args.command == "worker" else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        code = int(args.func(args))
        # Output still buffered reaches a closed pipe here, inside the handlers below,
        # not in the interpreter's last flush (an "Exception ignored" message, exit 120).
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # stdout's reader went away (`dualmem stats --json | head -1`): end quietly, the
        # way the commands that print through rich (the demo, the tables) already do.
        _closed_stdout()
    except DualMemError as exc:
        print(f"dualmem {args.command}: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError, OverflowError, sqlite3.Error) as exc:
        # What the environment or the input refused (a missing directory, a port in use
        # or out of range, a malformed URL, text that is not UTF-8, a database file SQLite
        # cannot read or write): a message, not a traceback (--verbose logs it too).
        if args.verbose:
            logging.getLogger("dualmem.cli").exception("dualmem %s failed", args.command)
        print(f"dualmem {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _closed_stdout() -> NoReturn:
    """End the process after its stdout was closed, as rich's ``Console`` does for the
    commands that print through it: stdout pointed at devnull (so the interpreter's last
    flush cannot fail again) and exit status 1, with nothing on stderr."""
    from rich.console import Console

    Console().on_broken_pipe()
    raise SystemExit(1)  # pragma: no cover - on_broken_pipe raises it


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
