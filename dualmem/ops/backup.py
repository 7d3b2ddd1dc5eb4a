"""``dualmem backup``: a consistent copy through SQLite's online backup API, verified."""

from __future__ import annotations

import os
import secrets
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from acl.crypto import fsync_dir
from acl.errors import ConfigurationError
from dualmem.errors import StoreUnavailable
from dualmem.migrations import schema_version
from dualmem.ops.database import (
    NO_PROGRESS,
    ProgressFn,
    check_dualmem,
    open_database,
    refuse_database_path,
)
from dualmem.ops.verify import Check, check_chain, check_foreign_keys, check_integrity

__all__ = ["BackupResult", "backup_database"]

_COUNTED = ("memory", "journal", "audit_log", "dead_letters", "missions", "tool_calls")


@dataclass
class BackupResult:
    """What ``backup_database`` wrote, and the checks run on the copy."""

    dest: Path
    bytes: int
    pages: int
    schema_version: int
    seconds: float
    rows: dict[str, int] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every check on the copy passed."""
        return all(c.ok for c in self.checks)


def backup_database(
    src: str | Path,
    dest: str | Path,
    *,
    overwrite: bool = False,
    progress: ProgressFn = NO_PROGRESS,
    keyring: str | Path | None = None,
) -> BackupResult:
    """Copy the live database ``src`` to ``dest`` and verify the copy.

    The online backup API copies every page in one step, under one read transaction, while
    the worker keeps writing (WAL), so the result is one consistent snapshot. The
    copy is written beside ``dest`` under a temporary name, switched out of WAL mode (one
    self-contained file), checked (``integrity_check``, ``foreign_key_check``, both hash
    chains), fsynced, and only then renamed to ``dest``: a file at ``dest`` is always a
    complete, verified backup. This reads the live database and writes only the new file,
    so it needs no help from the worker.
    """
    target = Path(dest)
    refuse_database_path(target, src, keyring)
    if target.exists() and not overwrite:
        raise ConfigurationError(f"{target} already exists; choose another name or --force")
    if not target.parent.is_dir():
        raise ConfigurationError(f"directory {target.parent} does not exist")
    if target.is_dir():
        raise ConfigurationError(f"{target} is a directory; give a file name")
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.partial")
    started = time.monotonic()
    try:
        with open_database(src) as source:
            check_dualmem(source, src)  # any version, newer too: only a copy is written
            try:
                # Only its owner can read it, whatever the umask: levels 3 and 4 are
                # plaintext, and so are every key name and the audit log.
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                out = sqlite3.connect(tmp, isolation_level=None)
            except (OSError, sqlite3.Error) as exc:
                raise StoreUnavailable(f"cannot create {tmp}: {exc}") from exc
            try:

                def step(_status: int, remaining: int, total: int) -> None:
                    progress("backup", total - remaining, total)

                # One step: the copy reads one snapshot under one read transaction (WAL:
                # the worker keeps committing meanwhile). Copied in several steps, every
                # commit in between restarted it from page 1, so under a steady stream of
                # puts a large database never finished backing up.
                source.backup(out, pages=-1, progress=step)
                out.execute("PRAGMA journal_mode = DELETE")
                result = _verify_copy(out, target)
            finally:
                out.close()
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except sqlite3.Error as exc:
        raise StoreUnavailable(f"backup to {target} failed: {exc}") from exc
    finally:
        if tmp.exists():
            tmp.unlink()
    result.bytes = target.stat().st_size
    result.seconds = time.monotonic() - started
    return result


def _verify_copy(conn: sqlite3.Connection, target: Path) -> BackupResult:
    checks = [check_integrity(conn), check_foreign_keys(conn)]
    checks.append(check_chain(conn, "journal"))
    checks.append(check_chain(conn, "audit_log"))
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")}
    rows = {
        t: int(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0])
        for t in _COUNTED
        if t in tables
    }
    pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
    result = BackupResult(target, 0, pages, schema_version(conn), 0.0, rows, checks)
    if not result.ok:
        failed = "; ".join(f"{c.name}: {c.summary}" for c in checks if not c.ok)
        raise StoreUnavailable(f"the copy failed verification ({failed}); nothing was written")
    return result
