"""The operations commands of ``dualmem``: verify, migrate, export, import, mirror, backup,
purge, dlq, doctor, metrics (registered through ``dualmem.cli.COMMAND_MODULES``).

Exit codes: 0 all good; 1 something was found wrong (a failed check, a strict import with
bad lines, commands not confirmed); 2 the command could not run (bad options, a missing
file, a database from a newer dualmem); 3 an import that skipped bad lines.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from acl.crypto import Codec
from acl.errors import ConfigurationError, DualMemError
from acl.levels import Level, as_level
from acl.principal import Principal
from dualmem.cli import add_common_arguments, settings_from_args
from dualmem.ops.database import ProgressFn
from dualmem.settings import MAX_TOMBSTONE_TTL, Settings, check_seconds
from dualmem.shutdown import stop_on_signals

if TYPE_CHECKING:
    from dualmem.ops.runtime import Runtime
    from dualmem.ops.transfer import ImportPlan
    from dualmem.ops.verify import Check

__all__ = ["register_commands"]

_EXIT_FOUND = 1
_EXIT_SKIPPED_LINES = 3


def _console() -> Any:
    from rich.console import Console

    return Console()


@contextmanager
def _progress(console: Any) -> Iterator[ProgressFn]:
    """A rich progress bar per task; drawn only on a terminal (logs and pipes stay clean)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TaskID,
        TextColumn,
        TimeElapsedColumn,
    )

    bar = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )
    tasks: dict[str, TaskID] = {}

    def update(description: str, done: int, total: int | None) -> None:
        if description not in tasks:
            tasks[description] = bar.add_task(description, total=total)
        bar.update(tasks[description], completed=done, total=total)

    with bar:
        yield update


def _table(title: str, columns: Sequence[str]) -> Any:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col, overflow="fold")
    return table


_STYLE = {"ok": "[green]ok[/]", "warn": "[yellow]warn[/]", "fail": "[red]FAIL[/]", "skip": "skip"}


def _ms(ts: int | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _levels(values: Sequence[str] | None) -> list[Level] | None:
    return [as_level(int(v) if v.isdigit() else v) for v in values] if values else None


def _settings(args: argparse.Namespace) -> Settings:
    extra: dict[str, Any] = {}
    if getattr(args, "keyring", None):
        extra["keyring"] = args.keyring
    return settings_from_args(args, **extra)


# -- verify -------------------------------------------------------------------------------


def _now_ms() -> int:
    return int(time.time() * 1000)


def _on_redis(name: str, run: Callable[[], Check]) -> Check:
    """``guarded(name, run)``, and a Redis that fails during the check fails this check:
    it was reported under the parity check's name (the anchors' failure as a second
    "redis <-> sqlite parity" in the JSON)."""
    from dualmem.ops.verify import guarded

    try:
        return guarded(name, run)
    except DualMemError as exc:
        return _redis_failed(name, exc)


def _redis_failed(name: str, exc: DualMemError) -> Check:
    from dualmem.ops.verify import Check

    failed = Check(name)
    failed.problem(str(exc))
    failed.summary, failed.fix = "could not check", "check --redis-url"
    return failed


def cmd_verify(args: argparse.Namespace) -> int:
    """Integrity, foreign keys, schema version, hash chains, projections, Redis parity,
    and a mirror directory's parity; exit 1 with a report when anything is off."""
    from dualmem.layout import Layout
    from dualmem.ops.database import open_database, seen_shards
    from dualmem.ops.mirror import check_mirror
    from dualmem.ops.runtime import load_keyring, redis_client
    from dualmem.ops.verify import (
        check_anchors,
        check_redis_parity,
        guarded,
        verify_database,
    )

    settings = _settings(args)
    console = _console()
    with open_database(settings.db_path) as conn, _progress(console) as progress:
        checks = verify_database(conn, progress)
        # The clock is read as each check that judges expiry starts, not before the SQLite
        # checks (minutes on a big file): a record that expired meanwhile and was purged
        # to a tombstone was judged live by its cache entry, a false failure.
        if not args.no_redis:
            # The parity check opens the envelopes a key rotation re-sealed apart (the row
            # and its cache entry, each with its own nonce) to compare their values.
            keyring = load_keyring(settings)
            codec = (
                None
                if keyring is None
                else Codec(keyring, max_value_bytes=settings.max_value_bytes)
            )
            try:
                client = redis_client(settings)
                try:
                    # Every shard the database has seen, as purge reads them: without
                    # --shards, a 2-shard deployment's second shard went unchecked.
                    shards = max(settings.shards, seen_shards(conn))
                    layout = Layout(settings.namespace, shards)
                    checks.append(
                        _on_redis(
                            "redis <-> sqlite parity",
                            lambda: check_redis_parity(
                                conn, client, layout, _now_ms(), progress, codec=codec
                            ),
                        )
                    )
                    checks.append(
                        _on_redis("hash chain anchors", lambda: check_anchors(conn, client, layout))
                    )
                finally:
                    client.close()
            except DualMemError as exc:
                checks.append(_redis_failed("redis <-> sqlite parity", exc))
        if args.mirror:
            checks.append(
                guarded(f"mirror {args.mirror}", lambda: check_mirror(conn, args.mirror, _now_ms()))
            )
    ok = all(c.ok for c in checks)
    if args.json:
        print(json.dumps({"ok": ok, "checks": [c.to_dict() for c in checks]}, indent=2))
        return 0 if ok else _EXIT_FOUND
    table = _table(f"dualmem verify - {settings.db_path}", ("check", "result", "detail"))
    for c in checks:
        table.add_row(c.name, _STYLE[c.status], c.summary)
    console.print(table)
    for c in checks:
        if c.status == "warn" and c.fix:
            console.print(f"[yellow]{c.name}[/]: {c.fix}", soft_wrap=True)
        if c.ok:
            continue
        console.print(f"[red]{c.name}[/]: {c.problem_count} problem(s)")
        for p in c.problems:
            console.print(f"  - {p}", markup=False, soft_wrap=True)
        if c.problem_count > len(c.problems):
            console.print(f"  ... and {c.problem_count - len(c.problems)} more")
        if c.fix:
            console.print(f"  fix: {c.fix}", markup=False, soft_wrap=True)
    console.print("[green]all checks passed[/]" if ok else "[red]verify found problems[/]")
    return 0 if ok else _EXIT_FOUND


# -- migrate ------------------------------------------------------------------------------


def cmd_migrate(args: argparse.Namespace) -> int:
    """Upgrade the schema (backup first; never downgrades)."""
    from dualmem.ops.maintenance import migrate_database

    settings = _settings(args)
    console = _console()
    with _progress(console) as progress:
        plan = migrate_database(
            settings.db_path,
            args.to,
            dry_run=args.dry_run,
            backup_to=args.backup,
            progress=progress,
        )
    if not plan.steps:
        console.print(f"{plan.path} is at schema {plan.current}: nothing to do", soft_wrap=True)
        return 0
    console.print(
        f"{'would migrate' if args.dry_run else 'migrated'} {plan.path}: "
        f"schema {plan.current} -> {plan.target}",
        markup=False,
        soft_wrap=True,
    )
    table = _table("migrations", ("version", "migration", "state"))
    for version, description in plan.steps:
        state = "applied" if version in plan.applied else "planned"
        table.add_row(str(version), description, state)
    console.print(table)
    if plan.backup is not None:
        b = plan.backup
        console.print(
            f"backup: {b.dest} ({b.bytes / 1e6:.2f} MB, schema {b.schema_version}, verified)",
            markup=False,
            soft_wrap=True,
        )
    if args.dry_run:
        console.print("dry run: nothing was changed")
    return 0


# -- export / import ----------------------------------------------------------------------


def _principal(args: argparse.Namespace) -> Principal | None:
    if not args.decrypt:
        given = [args.as_agent, args.team, args.swarm, args.project, args.system]
        if any(given):
            # Without --decrypt they would be ignored, and the file would stay sealed
            # where the user asked to read it.
            raise ConfigurationError("--as, --team, --swarm, --project, --system need --decrypt")
        return None
    if not args.as_agent:
        raise ConfigurationError("--decrypt needs --as AGENT_ID (and its --team/--swarm/...)")
    return Principal(
        agent_id=args.as_agent,
        team=args.team,
        swarm=args.swarm,
        project=args.project,
        system=args.system,
    )


def cmd_export(args: argparse.Namespace) -> int:
    """Write live records to a JSON Lines file (encrypted levels sealed unless --decrypt)."""
    from dualmem.ops.database import (
        check_current,
        check_not_newer,
        open_database,
        refuse_database_path,
    )
    from dualmem.ops.runtime import AuditEvent, Runtime, load_keyring
    from dualmem.ops.transfer import export_records

    settings = _settings(args)
    console = _console()
    out = Path(args.out)
    refuse_database_path(out, settings.db_path, settings.keyring_file)
    if out.exists() and not args.force:
        raise ConfigurationError(f"{out} already exists; choose another name or --force")
    if not out.parent.is_dir():
        raise ConfigurationError(f"directory {out.parent} does not exist")
    principal = _principal(args)
    keyring = load_keyring(settings)
    if principal is not None and keyring is None:
        raise ConfigurationError("--decrypt needs the key file: --keyring or DUALMEM_KEYRING")
    codec = Codec(keyring, max_value_bytes=settings.max_value_bytes)
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(4)}.partial")
    audited = None
    try:
        with contextlib.ExitStack() as stack:
            # Decrypting is audited before the file appears: connect first (Redis down:
            # nothing is written), and a plaintext file that cannot be audited is removed.
            rt = stack.enter_context(Runtime(settings, keyring=keyring)) if principal else None
            conn = stack.enter_context(open_database(settings.db_path))
            progress = stack.enter_context(_progress(console))
            # Only its owner can read the file: it may hold decrypted values.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            fh = stack.enter_context(open(fd, "w", encoding="utf-8", newline="\n"))
            # Decrypting leaves an audit event, written by a worker on this file: it must
            # be current (exporting alone reads any version this code understands).
            (check_current if principal else check_not_newer)(conn, settings.db_path)
            result = export_records(
                conn,
                fh,
                now_ms=int(time.time() * 1000),
                codec=codec,
                levels=_levels(args.level),
                prefix=args.prefix or "",
                decrypt_as=principal,
                progress=progress,
            )
            fh.close()
            if rt is not None and principal is not None and result.decrypted:
                digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
                detail = {"file": str(out), "decrypted": result.decrypted, "sha256": digest}
                event = AuditEvent("export_decrypted", principal.agent_id, detail)
                # In the stream (Redis's log) before the file appears; committed, or the
                # command says that it is still pending, before it returns.
                audited = rt.wait(rt.send([], audits=[event], audit_receipts=True), 10)
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    console.print(
        f"exported {result.records} records to {out} ({result.sealed} sealed, "
        f"{result.decrypted} decrypted"
        + (f", {result.denied} not readable by {principal.agent_id}" if principal else "")
        + ")",
        markup=False,
        soft_wrap=True,
    )
    if audited is not None and audited.pending:
        console.print(
            "the export_decrypted audit event is in the command stream, not committed yet: "
            "a worker commits it",
            soft_wrap=True,
        )
    if audited is not None and audited.dead:
        console.print(
            "[red]the export_decrypted audit event was dead-lettered[/]: replay it with "
            "`dualmem dlq replay --all`",
            soft_wrap=True,
        )
    for e in result.errors:
        console.print(f"  left out {e}", markup=False, soft_wrap=True)
    # An audit event not confirmed is a command not confirmed (exit 1), as for import and
    # dlq replay: the decryption is not on the audit trail yet, or not at all.
    unconfirmed = audited is not None and bool(audited.pending or audited.dead)
    return _EXIT_FOUND if result.errors or unconfirmed else 0


def _read_lines(path: Path) -> Iterator[str]:
    """Lines of ``path``; a line that is not UTF-8 becomes one that fails JSON parsing
    with a message naming the problem, so it is reported by its number like any other."""
    with open(path, "rb") as fh:
        for raw in fh:
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield f"\x00 not UTF-8 ({exc.reason} at byte {exc.start})"


def cmd_import(args: argparse.Namespace) -> int:
    """Import a JSON Lines file through the stream (idempotent; --dry-run; --strict)."""
    from dualmem.ops.runtime import AuditEvent, Runtime, load_keyring

    check_seconds("--wait", args.wait)
    settings = _settings(args)
    console = _console()
    path = Path(args.file)
    if not path.is_file():
        raise ConfigurationError(f"no such file: {path}")
    _check_new_database(settings, args.new_db)
    with contextlib.ExitStack() as stack:
        if args.dry_run:
            rt = None
            codec = Codec(
                load_keyring(settings),
                compress_threshold=settings.compress_threshold,
                max_value_bytes=settings.max_value_bytes,
            )
        else:
            # Connected before the first seal: its key lease names every key it may send
            # under (sealed lines are copied as they are), so no rotation drops one of
            # them until this import has landed (dualmem.keyuse).
            rt = stack.enter_context(Runtime(settings, lease_all_keys=True, create=True))
            codec = rt.codec
        plan = _plan_import(path, settings, codec, console, rt)
        for lineno, error in plan.errors:
            console.print(f"{path}:{lineno}: {error}", markup=False, style="red", soft_wrap=True)
        table = _table(f"import {path}", ("new", "changed", "unchanged", "expired", "bad lines"))
        table.add_row(
            str(len(plan.new)),
            str(len(plan.changed)),
            str(plan.unchanged),
            str(plan.expired),
            str(len(plan.errors)),
        )
        console.print(table)
        if plan.errors and args.strict:
            console.print(f"--strict: {len(plan.errors)} bad line(s), nothing was imported")
            return _EXIT_FOUND
        if rt is None:
            for item in plan.writes[:20]:
                state = "new" if item in plan.new else "changed"
                console.print(
                    f"  would write ({state}) {item.write.scope}/{item.write.key}", markup=False
                )
            if len(plan.writes) > 20:
                console.print(f"  ... and {len(plan.writes) - 20} more")
            console.print("dry run: nothing was written")
            return _EXIT_SKIPPED_LINES if plan.errors else 0
        if plan.writes:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            detail = {
                "file": str(path),
                "sha256": digest,
                "new": len(plan.new),
                "changed": len(plan.changed),
                "bad_lines": [n for n, _ in plan.errors],
            }
            with _progress(console) as progress:
                receipts = rt.send(
                    [i.write for i in plan.writes],
                    audits=[AuditEvent("import", "dualmem-import", detail)],
                )
                done = rt.wait(receipts, args.wait, progress)
            console.print(
                f"imported {done.committed} record(s)"
                + (
                    f"; {done.pending} still pending, a worker will commit them"
                    if done.pending
                    else ""
                )
                + (f"; {done.dead} dead-lettered (dualmem dlq list)" if done.dead else ""),
                soft_wrap=True,
            )
            if done.pending or done.dead:
                return _EXIT_FOUND
        elif plan.errors:
            console.print("nothing to import: besides the bad lines, nothing new or changed")
        else:
            console.print("nothing to import: every record is already there")
    return _EXIT_SKIPPED_LINES if plan.errors else 0


def _check_new_database(settings: Settings, new_db: bool) -> None:
    """Refuse an import into a missing database where its worker would take over another
    deployment's pending commands (:func:`dualmem.ops.runtime.new_database_is_safe`),
    unless ``--new-db`` says the new file is meant."""
    from dualmem.ops.runtime import new_database_is_safe

    if new_db or Path(settings.db_path).exists() or new_database_is_safe(settings):
        return
    raise ConfigurationError(
        f"no database at {settings.db_path} (check --db or DUALMEM_DB_PATH): namespace "
        f"{settings.namespace!r} on {settings.shown_url} already has command streams, whose "
        "pending commands the import's worker would commit into a new file; pass --new-db "
        f"if {settings.db_path} is to become that deployment's database"
    )


def _plan_import(
    path: Path, settings: Settings, codec: Codec, console: Any, rt: Runtime | None
) -> ImportPlan:
    """Check every line of ``path`` against the database (or an empty one)."""
    import sqlite3

    from dualmem.migrations import migrate
    from dualmem.ops.database import check_current, open_database
    from dualmem.ops.transfer import plan_import

    now_ms = int(time.time() * 1000)
    with _progress(console) as bar:

        def progress(stage: str, done: int, total: int | None) -> None:
            if rt is not None:
                rt.keep_lease()  # sealing for a while: keep the lease's keys named
            bar(stage, done, total)

        if Path(settings.db_path).exists():
            with open_database(settings.db_path) as conn:
                check_current(conn, settings.db_path)
                return plan_import(_read_lines(path), conn, codec, now_ms=now_ms, progress=progress)
        empty = sqlite3.connect(":memory:", isolation_level=None)
        try:
            migrate(empty)
            return plan_import(_read_lines(path), empty, codec, now_ms=now_ms, progress=progress)
        finally:
            empty.close()


# -- mirror -------------------------------------------------------------------------------


def cmd_mirror(args: argparse.Namespace) -> int:
    """Keep a directory of JSON files in sync with the change feed (resumable)."""
    from dualmem.ops.mirror import Mirror
    from dualmem.ops.runtime import Runtime

    # 0, a negative number or nan made the loop spin without pause.
    check_seconds("--interval", args.interval, positive=True)
    check_seconds("--wait", args.wait)
    settings = _settings(args)
    console = _console()
    # --once: nothing to stop. Otherwise SIGTERM/SIGINT end the loop after a last cycle.
    stopper = contextlib.nullcontext(threading.Event()) if args.once else stop_on_signals()
    with stopper as stop, Runtime(settings) as rt:
        mirror = Mirror(rt, args.dir, levels=_levels(args.level))
        with _progress(console) as progress:
            while True:
                report = mirror.cycle(int(time.time() * 1000), progress)
                _print_cycle(console, report, args.dir, quiet=not args.once)
                if report.receipts and (args.once or stop.is_set()):
                    # Let the imported edits commit, then write them back: on exit the
                    # directory matches SQLite.
                    rt.wait(report.receipts, args.wait)
                    _print_cycle(console, mirror.cycle(int(time.time() * 1000), progress), args.dir)
                if args.once or stop.wait(args.interval):
                    break
    return 0


def _print_cycle(console: Any, report: Any, directory: str, *, quiet: bool = False) -> None:
    busy = report.written or report.removed or report.imported or report.events
    if quiet and not busy:
        return
    for line in report.events:
        console.print(f"  {line}", markup=False, soft_wrap=True)
    console.print(
        f"mirror {directory}: seq {report.seq}, {report.written} written, {report.removed} "
        f"removed, {report.imported} imported, {report.conflicts} conflicts, "
        f"{report.rejected} rejected, {report.restored} restored",
        markup=False,
        soft_wrap=True,
    )


# -- backup / purge -----------------------------------------------------------------------


def cmd_backup(args: argparse.Namespace) -> int:
    """Copy the database with the online backup API and verify the copy."""
    from dualmem.ops.backup import backup_database

    settings = _settings(args)
    console = _console()
    with _progress(console) as progress:
        r = backup_database(
            settings.db_path,
            args.dest,
            overwrite=args.force,
            progress=progress,
            keyring=settings.keyring_file,
        )
    console.print(f"backup {settings.db_path} -> {r.dest} (verified)", soft_wrap=True)
    table = _table("", ("item", "value"))
    table.add_row("size", f"{r.bytes / 1e6:.2f} MB ({r.pages} pages)")
    table.add_row("schema version", str(r.schema_version))
    for name, n in r.rows.items():
        table.add_row(f"rows in {name}", str(n))
    for c in r.checks:
        table.add_row(c.name, c.summary if c.ok else f"[red]FAIL[/] {c.summary}")
    table.add_row("time", f"{r.seconds:.2f} s")
    console.print(table)
    return 0 if r.ok else _EXIT_FOUND


def _unacknowledged_floor(settings: Settings, seen: int) -> bytes | None:
    """The deployment's oldest unacknowledged command (``purge_floor``), read from Redis,
    on every shard ``--shards`` names or the database has seen (``seen``, which
    ``purge_database`` counts with ``seen_shards`` when it checks the file).

    A tombstone above it must stay whatever its age, so purge does not go on without
    knowing it. The embedded ``memory://`` Redis of this process holds no other process's
    commands (and is how an operator whose Redis lost its data for good says so): the
    caller does not ask then.
    """
    from dualmem.layout import Layout
    from dualmem.redis_backend import connect, translate_errors
    from dualmem.worker import purge_floor

    shards = max(settings.shards, seen)
    client, _ = connect(settings)
    try:
        with translate_errors(
            f"purge needs Redis at {settings.shown_url} to see which commands are still "
            "unacknowledged (a tombstone newer than one of them must stay; with Redis's "
            "data gone for good, pass --redis-url memory://)"
        ):
            layout = Layout(settings.namespace, shards)
            return purge_floor(client, [layout.stream(i) for i in range(shards)])
    finally:
        client.close()


def cmd_purge(args: argparse.Namespace) -> int:
    """Drop expired values (their rows stay as tombstones) and delete old tombstones, then
    return free pages to the file system."""
    from dualmem.ops.maintenance import purge_database

    settings = _settings(args)
    console = _console()
    now = int(time.time() * 1000)
    ttl = settings.tombstone_ttl if args.tombstone_ttl is None else args.tombstone_ttl
    if not 0 <= ttl <= MAX_TOMBSTONE_TTL:
        # Negative would date the cut-off in the future and drop tombstones that still
        # guard against late, older commands; past the bound the cut-off overflows SQLite.
        raise ConfigurationError(
            f"--tombstone-ttl must be 0..{MAX_TOMBSTONE_TTL} seconds, got {ttl}"
        )
    # The floor is read once purge_database has opened and checked the file (and counted
    # its journal's shards), before it drops anything; memory:// has none to read.
    read_floor = None if settings.embedded else functools.partial(_unacknowledged_floor, settings)
    with _progress(console) as progress:
        r = purge_database(
            settings.db_path,
            now_ms=now,
            tombstones_before_ms=now - ttl * 1000,
            full_vacuum=args.vacuum,
            read_floor=read_floor,
            progress=progress,
        )
    console.print(
        f"purged {r.rows} expired value(s) and old tombstone(s); freed {r.freed_pages} page(s) "
        f"({r.freed_pages * r.page_size / 1e6:.2f} MB); file {r.bytes_before / 1e6:.2f} MB -> "
        f"{r.bytes_after / 1e6:.2f} MB; auto_vacuum {r.auto_vacuum}"
        + (" (converted by VACUUM)" if r.vacuumed else ""),
        markup=False,
        soft_wrap=True,
    )
    if settings.embedded:
        console.print(
            "note: no Redis given (memory://), so tombstones past their ttl went without "
            "a look at the commands still unacknowledged in the deployment's streams; "
            "pass its --redis-url (and --namespace) to keep the ones those need",
            markup=False,
            soft_wrap=True,
        )
    if r.auto_vacuum != "INCREMENTAL":
        console.print(
            "note: this database was created without auto_vacuum=INCREMENTAL, so free pages "
            f"are reused but not given back; run `dualmem purge --db {settings.db_path} "
            "--vacuum` once (a full VACUUM: it blocks writers while it runs)",
            markup=False,
            soft_wrap=True,
        )
    return 0


# -- dlq ----------------------------------------------------------------------------------


def cmd_dlq(args: argparse.Namespace) -> int:
    """List dead letters, or replay them into the stream."""
    from dualmem.ops.database import check_current, open_database, seen_shards
    from dualmem.ops.dlq import describe, replay
    from dualmem.ops.runtime import Runtime

    settings = _settings(args)
    console = _console()
    with open_database(settings.db_path) as conn:
        check_current(conn, settings.db_path)
        seen = seen_shards(conn)
    if args.action == "list":
        from dualmem.sqlite_store import SQLiteStore

        store = SQLiteStore(settings.db_path)
        try:
            views = [describe(d) for d in store.dead_letters(include_replayed=args.all)]
        finally:
            store.close()
        if args.json:
            print(json.dumps([_view(v) for v in views], indent=2))
            return 0
        table = _table(
            f"dead letters - {settings.db_path}",
            ("id", "shard/stream id", "op", "scope/key", "tries", "failed at", "replayed", "error"),
        )
        for v in views:
            table.add_row(
                str(v.id),
                f"{v.shard}/{v.stream_id}",
                v.op,
                f"{v.scope}/{v.key}",
                str(v.deliveries),
                _ms(v.failed_at),
                _ms(v.replayed_at),
                v.error,
            )
        if not views:
            table.caption = "no dead letters"
        console.print(table)
        return 0
    if args.all and args.ids:
        # Both given, --all won: every dead letter was replayed, not the ones named.
        raise ConfigurationError("name the dead letters to replay (ids) or pass --all, not both")
    ids = None if args.all else list(args.ids)
    if not ids and not args.all:
        raise ConfigurationError("name the dead letters to replay (ids) or pass --all")
    check_seconds("--wait", args.wait)
    # A dead letter goes back to its own shard's stream: the command's worker reads every
    # shard the database has seen, whatever --shards says (as verify and purge read them),
    # so it commits the replay and the command can confirm it. Without --shards 2, a
    # second shard's dead letter stayed pending in a stream the worker did not read.
    settings = settings.replace(shards=max(settings.shards, seen))
    # Dead letters hold envelopes under any key: the lease names them all while they are
    # re-sent, so a rotation cannot drop one in between (dualmem.keyuse).
    with Runtime(settings, lease_all_keys=True) as rt:
        result = replay(rt, ids)
        if not result.ids:
            console.print("nothing to replay")
            return 0
        done = rt.wait(result.receipts, args.wait)
    console.print(
        f"replayed {len(result.ids)} dead letter(s) ({', '.join(map(str, result.ids))}): "
        f"{done.committed} committed, {done.dead} dead-lettered again, {done.pending} pending",
        soft_wrap=True,
    )
    return 0 if not done.dead and not done.pending else _EXIT_FOUND


def _view(v: Any) -> dict[str, Any]:
    return {name: getattr(v, name) for name in v.__slots__}


# -- doctor / metrics ---------------------------------------------------------------------


def cmd_doctor(args: argparse.Namespace) -> int:
    """Check Redis persistence, key file, database and versions; say how to fix each."""
    from dualmem.ops.doctor import run_doctor

    settings = _settings(args)
    findings = run_doctor(settings)
    if args.json:
        print(json.dumps([_view(f) for f in findings], indent=2))
    else:
        console = _console()
        table = _table("dualmem doctor", ("check", "status", "detail", "fix"))
        for f in findings:
            table.add_row(f.check, _STYLE[f.status], f.detail, f.fix)
        console.print(table)
    return _EXIT_FOUND if any(f.status == "fail" for f in findings) else 0


def cmd_metrics(args: argparse.Namespace) -> int:
    """Print the Prometheus exposition, or serve it on 127.0.0.1:PORT until stopped."""
    from dualmem.ops.exporter import Exporter, start_server

    settings = _settings(args)
    exporter = Exporter(settings)
    try:
        if args.serve is None:
            sys.stdout.write(exporter.render())
            return 0
        server, thread = start_server(args.serve, exporter.render)
        host, port = server.server_address[:2]
        with stop_on_signals() as stop:
            print(f"serving http://{host!s}:{port}/metrics (Ctrl-C stops)", flush=True)
            stop.wait()
        server.shutdown()
        server.server_close()
        thread.join(5)
        return 0
    finally:
        exporter.close()


# -- registration -------------------------------------------------------------------------


def _port(text: str) -> int:
    """A TCP port for argparse: an int in 0..65535 (0: any free port).

    >>> _port("99999")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: the port must be 0..65535, got 99999
    """
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"the port must be an int in 0..65535, got {text!r}"
        ) from None
    if not 0 <= port <= 65535:
        # bind() refused it as an OverflowError after the exporter had started.
        raise argparse.ArgumentTypeError(f"the port must be 0..65535, got {port}")
    return port


def _keyring_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keyring", help="key file (DUALMEM_KEYRING); needed for encrypted levels")


def register_commands(sub: Any) -> None:
    """Add the operations subcommands to the ``dualmem`` parser."""
    _register_checks(sub)
    _register_transfer(sub)
    _register_maintenance(sub)


def _register_checks(sub: Any) -> None:
    p = sub.add_parser("verify", help="integrity, hash chains, schema, Redis/mirror parity")
    add_common_arguments(p)
    _keyring_option(p)
    p.add_argument("--mirror", metavar="DIR", help="also check a mirror directory")
    p.add_argument("--no-redis", action="store_true", help="skip the Redis parity check")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("migrate", help="upgrade the schema (backs up first, never downgrades)")
    add_common_arguments(p)
    _keyring_option(p)
    p.add_argument("--to", type=int, help="target schema version (default: this dualmem's)")
    p.add_argument("--dry-run", action="store_true", help="show the plan, change nothing")
    p.add_argument("--backup", help="backup file (default <db>.v<N>-<time>.bak)")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("doctor", help="check persistence, keys, database; say how to fix")
    add_common_arguments(p)
    _keyring_option(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("metrics", help="Prometheus exposition (--serve PORT on 127.0.0.1)")
    add_common_arguments(p)
    _keyring_option(p)
    p.add_argument(
        "--serve", type=_port, metavar="PORT", help="serve http://127.0.0.1:PORT/metrics"
    )
    p.set_defaults(func=cmd_metrics)


def _register_transfer(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="write records to a JSON Lines file",
        epilog="exit 0: exported; 1: a record left out (it cannot be opened), or the "
        "export_decrypted audit event not confirmed (pending or dead-lettered)",
    )
    add_common_arguments(p)
    _keyring_option(p)
    p.add_argument("--out", required=True, help="the .jsonl file to write")
    p.add_argument("--level", action="append", help="only this level (repeatable: 1-5 or name)")
    p.add_argument("--prefix", help="only keys starting with this")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.add_argument("--decrypt", action="store_true", help="write readable encrypted values")
    p.add_argument("--as", dest="as_agent", metavar="AGENT_ID", help="principal for --decrypt")
    p.add_argument("--team")
    p.add_argument("--swarm")
    p.add_argument("--project")
    p.add_argument("--system", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "import",
        help="import a JSON Lines file (idempotent)",
        epilog="exit 0: imported; 1: --strict and bad lines (nothing written) or commits not "
        "confirmed; 3: imported, bad lines skipped",
    )
    add_common_arguments(p)
    _keyring_option(p)
    p.add_argument("file", help="the .jsonl file to read")
    p.add_argument("--dry-run", action="store_true", help="report what would change")
    p.add_argument("--strict", action="store_true", help="any bad line: import nothing")
    p.add_argument("--wait", type=float, default=30.0, help="seconds to wait for commits")
    p.add_argument(
        "--new-db",
        action="store_true",
        help="create a missing --db even though the Redis namespace already has command "
        "streams (their pending commands are committed into it)",
    )
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("mirror", help="keep one JSON file per record in sync with the feed")
    add_common_arguments(p)
    _keyring_option(p)
    p.add_argument("--dir", required=True, help="the mirror directory")
    p.add_argument("--once", action="store_true", help="one cycle, then exit")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between cycles")
    p.add_argument("--level", action="append", help="only this level (repeatable)")
    p.add_argument("--wait", type=float, default=10.0, help="seconds to wait for imports")
    p.set_defaults(func=cmd_mirror)


def _register_maintenance(sub: Any) -> None:
    p = sub.add_parser("backup", help="online backup to DEST, verified")
    add_common_arguments(p)
    _keyring_option(p)
    p.add_argument("dest", help="the backup file to create")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.set_defaults(func=cmd_backup)

    p = sub.add_parser("purge", help="drop expired values and old tombstones, give free pages back")
    add_common_arguments(p)
    _keyring_option(p)
    p.add_argument("--tombstone-ttl", type=int, help="seconds tombstones are kept")
    p.add_argument("--vacuum", action="store_true", help="full VACUUM to enable auto_vacuum")
    p.set_defaults(func=cmd_purge)

    p = sub.add_parser("dlq", help="list or replay dead-lettered commands")
    dlq = p.add_subparsers(dest="action", required=True)
    q = dlq.add_parser("list", help="dead letters, oldest first")
    add_common_arguments(q)
    _keyring_option(q)
    q.add_argument("--all", action="store_true", help="include replayed ones")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_dlq)
    q = dlq.add_parser("replay", help="send dead letters back to the stream")
    add_common_arguments(q)
    _keyring_option(q)
    q.add_argument("ids", nargs="*", type=int, help="dead letter ids (see dlq list)")
    q.add_argument("--all", action="store_true", help="every dead letter not yet replayed")
    q.add_argument("--wait", type=float, default=10.0, help="seconds to wait for commits")
    q.set_defaults(func=cmd_dlq)
