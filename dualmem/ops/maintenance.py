"""``dualmem migrate`` and ``dualmem purge``: schema upgrades with a backup first, and
giving expired rows and free pages back."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from acl.errors import ConfigurationError
from dualmem.migrations import MIGRATIONS, SCHEMA_VERSION, migrate
from dualmem.ops.backup import BackupResult, backup_database
from dualmem.ops.database import (
    NO_PROGRESS,
    ProgressFn,
    check_current,
    check_dualmem,
    database_size,
    open_database,
    seen_shards,
)
from dualmem.sqlite_store import SQLiteStore

__all__ = ["MigrationPlan", "PurgeResult", "migrate_database", "plan_migration", "purge_database"]

_AUTO_VACUUM = {0: "NONE", 1: "FULL", 2: "INCREMENTAL"}
_VACUUM_BATCH = 2_000


@dataclass
class MigrationPlan:
    """What ``migrate`` does (or did): ``steps`` are ``(version, description)``."""

    path: Path
    current: int
    target: int
    steps: list[tuple[int, str]]
    backup: BackupResult | None = None
    applied: list[int] = field(default_factory=list)


def plan_migration(path: str | Path, target: int | None = None) -> MigrationPlan:
    """The migrations that would take ``path`` to ``target`` (default: this code's version).

    Refuses (``ConfigurationError``) a database newer than this code, a target this code
    does not know, and any downgrade: migrations only go forward.
    """
    goal = SCHEMA_VERSION if target is None else target
    with open_database(path) as conn:
        # A file with no dualmem schema is refused here as well as by the backup the real
        # run takes first: the dry run said "would migrate 0 -> 4" and the run exit 2.
        current = check_dualmem(conn, path)
    if current > SCHEMA_VERSION:
        raise ConfigurationError(
            f"{path} has schema version {current}, newer than this dualmem ({SCHEMA_VERSION}): "
            "upgrade dualmem instead"
        )
    if not 1 <= goal <= SCHEMA_VERSION:
        raise ConfigurationError(f"--to must be between 1 and {SCHEMA_VERSION}, got {goal}")
    if goal < current:
        raise ConfigurationError(
            f"refusing to downgrade {path} from schema {current} to {goal}: migrations only "
            "go forward (restore a backup taken before the upgrade instead)"
        )
    steps = [
        (v, (MIGRATIONS[v - 1].__doc__ or MIGRATIONS[v - 1].__name__).strip().splitlines()[0])
        for v in range(current + 1, goal + 1)
    ]
    return MigrationPlan(Path(path), current, goal, steps)


def migrate_database(
    path: str | Path,
    target: int | None = None,
    *,
    dry_run: bool = False,
    backup_to: str | Path | None = None,
    progress: ProgressFn = NO_PROGRESS,
) -> MigrationPlan:
    """Back the database up, then apply the planned migrations (each in one transaction).

    Idempotent: a database already at ``target`` is left alone, with no backup. The backup
    goes to ``backup_to`` or ``<db>.v<current>-<UTC time>.bak`` beside the database and is
    verified before the first migration runs. This writes to the database outside the
    worker on purpose: it is an offline operation (stop the workers first: a worker of the
    older version would go on writing without the new schema's projections), and the same
    migrations run anyway whenever a newer dualmem opens the file.
    """
    plan = plan_migration(path, target)
    if dry_run or not plan.steps:
        return plan
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = Path(backup_to) if backup_to else Path(f"{path}.v{plan.current}-{stamp}.bak")
    if dest.exists():
        # backup_database would say "or --force", an option `backup` has and migrate has
        # not: migrate never replaces a file.
        raise ConfigurationError(
            f"{dest} already exists; choose another --backup file (migrate never replaces one)"
        )
    plan.backup = backup_database(path, dest, progress=progress)
    with open_database(path, write=True) as conn:
        plan.applied = migrate(conn, plan.target)
    return plan


@dataclass
class PurgeResult:
    """What ``purge`` removed and gave back."""

    rows: int
    freed_pages: int
    page_size: int
    auto_vacuum: str
    vacuumed: bool
    bytes_before: int
    bytes_after: int


def purge_database(
    path: str | Path,
    *,
    now_ms: int,
    tombstones_before_ms: int,
    full_vacuum: bool = False,
    floor: bytes | None = None,
    read_floor: Callable[[int], bytes | None] | None = None,
    progress: ProgressFn = NO_PROGRESS,
) -> PurgeResult:
    """Drop expired values and old tombstones, then hand free pages back to the file system.

    An expired row keeps its key as a tombstone until ``tombstones_before_ms`` passes its
    expiry, like a delete's, so a late older command cannot bring the value back.
    ``floor`` (see :func:`dualmem.worker.purge_floor`) keeps every tombstone at or above
    the oldest command still unacknowledged in Redis, whatever its age. ``read_floor``
    instead finds it out: it is called once, after the database is opened and checked,
    with the number of shards its journal and dead letters have seen
    (:func:`~dualmem.ops.database.seen_shards`, 0 for neither), and returns the floor;
    what it raises stops the purge before any row goes (``dualmem purge`` reads the
    streams of those shards from Redis this way, without opening the file a second
    time). Passing both is a ``ValueError``.

    The rows go through ``Store.purge``, the very transaction the worker runs on its own
    schedule; it deletes only rows that reads already treat as absent, and takes the write
    lock like any writer, so running it beside a worker cannot lose or reorder an update.
    ``PRAGMA incremental_vacuum`` then returns free pages (no logical change at all).

    A database created before ``auto_vacuum=INCREMENTAL`` was set keeps its free pages
    for reuse but cannot shrink; ``full_vacuum`` converts it with one ``VACUUM``, which
    rewrites the whole file and blocks writers while it runs (an offline operation).
    """
    if floor is not None and read_floor is not None:
        raise ValueError("pass floor or read_floor, not both")
    with open_database(path) as conn:
        check_current(conn, path)
        before = database_size(conn, path)
        shards = seen_shards(conn) if read_floor is not None else 0
    if read_floor is not None:
        floor = read_floor(shards)
    store = SQLiteStore(path)
    removed = 0
    try:
        while True:
            n = store.purge(now_ms, tombstones_before_ms, limit=10_000, floor=floor)
            removed += n
            progress("purge", removed, None)
            if n == 0:
                break
    finally:
        store.close()
    vacuumed = False
    with open_database(path, write=True) as conn:
        free = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
        mode = int(conn.execute("PRAGMA auto_vacuum").fetchone()[0])
        if full_vacuum and mode != 2:
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            conn.execute("VACUUM")
            vacuumed = True
        elif mode == 2:
            _incremental_vacuum(conn, free, progress)
        after = database_size(conn, path)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    freed = free - after.freelist_pages if (mode == 2 or vacuumed) else 0
    return PurgeResult(
        removed,
        max(freed, 0),
        after.page_size,
        _AUTO_VACUUM.get(after.auto_vacuum, str(after.auto_vacuum)),
        vacuumed,
        before.total_bytes,
        Path(path).stat().st_size + _wal(path),
    )


def _incremental_vacuum(conn: sqlite3.Connection, free: int, progress: ProgressFn) -> None:
    """Give every free page back to the file system.

    Each step of ``PRAGMA incremental_vacuum`` frees one page, and Python's sqlite3 steps
    a statement without result columns only once, so it runs once per page. Batches of
    ``_VACUUM_BATCH`` pages per transaction keep the write lock short for the worker.
    """
    done = 0
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for _ in range(_VACUUM_BATCH):
                if int(conn.execute("PRAGMA freelist_count").fetchone()[0]) == 0:
                    break
                conn.execute("PRAGMA incremental_vacuum")
                done += 1
            left = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        progress("vacuum", done, free)
        if left == 0:
            return


def _wal(path: str | Path) -> int:
    wal = Path(f"{path}-wal")
    return wal.stat().st_size if wal.exists() else 0
