"""Opening a dualmem database file for maintenance: without migrating it, read-only by default."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from acl.errors import ConfigurationError
from dualmem.errors import StoreUnavailable
from dualmem.migrations import NEGATIVE_SCHEMA, SCHEMA_VERSION, schema_version

__all__ = [
    "DatabaseSize",
    "ProgressFn",
    "check_current",
    "check_dualmem",
    "check_not_newer",
    "database_size",
    "open_database",
    "refuse_database_path",
    "seen_shards",
]

#: ``progress(description, done, total)``: how long-running operations report progress
#: (``total`` is ``None`` when unknown). The CLI draws it as a rich progress bar.
ProgressFn = Callable[[str, int, int | None], None]


def _no_progress(_description: str, _done: int, _total: int | None) -> None:
    return None


NO_PROGRESS: ProgressFn = _no_progress


@contextmanager
def open_database(path: str | Path, *, write: bool = False) -> Iterator[sqlite3.Connection]:
    """A connection to an existing database file that never migrates it.

    Read-only (``query_only``) unless ``write``. ``ConfigurationError`` when the file is
    missing or is not a SQLite database; ``StoreUnavailable`` when it cannot be read.
    Unlike ``SQLiteStore``, opening here changes nothing, so ``verify``, ``export`` and
    ``backup`` can look at a database of any version, and ``migrate`` can decide.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigurationError(f"no database at {p} (check --db or DUALMEM_DB_PATH)")
    try:
        conn = sqlite3.connect(p, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise StoreUnavailable(f"cannot open {p}: {exc}") from exc
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute("PRAGMA foreign_keys = ON")
        if not write:
            conn.execute("PRAGMA query_only = ON")
        try:
            conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()
        except sqlite3.DatabaseError as exc:
            raise ConfigurationError(f"{p} is not a dualmem database: {exc}") from exc
        yield conn
    finally:
        conn.close()


def check_dualmem(conn: sqlite3.Connection, path: str | Path) -> int:
    """The file's schema version; ``ConfigurationError`` if it has none (0).

    dualmem sets the version with its first tables, so 0 is an empty file or another
    program's database: nothing to read, and nothing ``dualmem migrate`` should write into.
    """
    version = schema_version(conn)
    if version < 0:
        raise ConfigurationError(f"{path}: schema version {version} {NEGATIVE_SCHEMA}")
    if version == 0:
        raise ConfigurationError(
            f"{path} is not a dualmem database (schema version 0: an empty file or another "
            "program's database; check --db or DUALMEM_DB_PATH)"
        )
    return version


def check_not_newer(conn: sqlite3.Connection, path: str | Path) -> int:
    """The file's schema version; ``ConfigurationError`` if this dualmem is too old for it
    or it is not a dualmem database (:func:`check_dualmem`)."""
    version = check_dualmem(conn, path)
    if version > SCHEMA_VERSION:
        raise ConfigurationError(
            f"{path} has schema version {version}, newer than this dualmem supports "
            f"({SCHEMA_VERSION}): upgrade dualmem to work on it"
        )
    return version


def check_current(conn: sqlite3.Connection, path: str | Path) -> int:
    """Like :func:`check_not_newer`, and an older schema is refused too (migrate first)."""
    version = check_not_newer(conn, path)
    if version < SCHEMA_VERSION:
        raise ConfigurationError(
            f"{path} has schema version {version}; this dualmem uses {SCHEMA_VERSION}: "
            f"run `dualmem migrate --db {path}` first"
        )
    return version


@dataclass(frozen=True, slots=True)
class DatabaseSize:
    """Where a database's bytes are: the main file, its WAL, and free pages inside."""

    file_bytes: int
    wal_bytes: int
    page_size: int
    page_count: int
    freelist_pages: int
    auto_vacuum: int

    @property
    def free_bytes(self) -> int:
        """Bytes of free pages (reusable; returned to the file system by ``purge``)."""
        return self.freelist_pages * self.page_size

    @property
    def total_bytes(self) -> int:
        """File plus WAL."""
        return self.file_bytes + self.wal_bytes


def seen_shards(conn: sqlite3.Connection) -> int:
    """How many shards the database has seen, in its journal or its dead letters
    (``MAX(shard) + 1``; 0 when both are empty): the streams an operator command reads,
    whatever ``--shards`` says, to cover them all.

    >>> conn = sqlite3.connect(":memory:")
    >>> _ = conn.execute("CREATE TABLE journal (shard INTEGER)")
    >>> _ = conn.execute("CREATE TABLE dead_letters (shard INTEGER)")
    >>> seen_shards(conn)
    0
    >>> _ = conn.executemany("INSERT INTO journal VALUES (?)", [(0,), (2,)])
    >>> seen_shards(conn)
    3
    >>> _ = conn.execute("INSERT INTO dead_letters VALUES (4)")
    >>> seen_shards(conn)
    5
    """
    top = conn.execute(
        "SELECT MAX(s) FROM (SELECT MAX(shard) AS s FROM journal"
        " UNION ALL SELECT MAX(shard) FROM dead_letters)"
    ).fetchone()[0]
    return 0 if top is None else int(top) + 1


def database_size(conn: sqlite3.Connection, path: str | Path) -> DatabaseSize:
    """Sizes of the file at ``path`` (its connection ``conn``)."""
    p = Path(path)
    wal = Path(str(p) + "-wal")

    def pragma(name: str) -> int:
        return int(conn.execute(f"PRAGMA {name}").fetchone()[0])

    return DatabaseSize(
        p.stat().st_size,
        wal.stat().st_size if wal.exists() else 0,
        pragma("page_size"),
        pragma("page_count"),
        pragma("freelist_count"),
        pragma("auto_vacuum"),
    )


def refuse_database_path(
    dest: str | Path, db_path: str | Path, keyring: str | Path | None = None
) -> None:
    """``ConfigurationError`` if writing ``dest`` would replace the database ``db_path``,
    one of its WAL files, its embedded key file (``<db>.keys``) or the key file
    ``keyring`` (``--force`` must never let an output clobber the source or the key that
    opens it).

    >>> refuse_database_path("copy.db", "mem.db")
    >>> refuse_database_path("./mem.db-wal", "mem.db")
    Traceback (most recent call last):
    ...
    acl.errors.ConfigurationError: mem.db-wal is the database mem.db or one of its files
    >>> refuse_database_path("keys.json", "mem.db", keyring="./keys.json")
    Traceback (most recent call last):
    ...
    acl.errors.ConfigurationError: keys.json is the key file ./keys.json
    """
    target = Path(dest).resolve()
    db = Path(db_path).resolve()
    if target in (db, Path(f"{db}-wal"), Path(f"{db}-shm"), Path(f"{db}-journal")):
        raise ConfigurationError(f"{Path(dest).name} is the database {db_path} or one of its files")
    for key in (Path(f"{db}.keys"), keyring):
        if key is not None and _same_file(target, Path(key)):
            raise ConfigurationError(f"{Path(dest).name} is the key file {key}")


def _same_file(a: Path, b: Path) -> bool:
    """The same path, or (both existing) the same file under another name: a hard link
    or a bind mount of it."""
    if a == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
