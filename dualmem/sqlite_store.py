"""SQLite implementation of :class:`~dualmem.store.Store`: one file, WAL, one writer."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from acl.crypto import envelope_key_id, envelope_sealing
from acl.errors import ConfigurationError
from acl.levels import ENCRYPTED_LEVELS, level_of_number
from dualmem.batch import GENESIS, BatchPlan, chain_hash, plan_batch
from dualmem.commands import OP_DELETE, MalformedCommand, sid_of
from dualmem.errors import StoreUnavailable
from dualmem.migrations import migrate
from dualmem.projection import (
    DECISION_COLUMNS,
    KINDS,
    MISSION_COLUMNS,
    PLAYBOOK_RUN_COLUMNS,
    TOOL_CALL_COLUMNS,
    Decision,
    Mission,
    PlaybookRun,
    ToolCall,
    child_key,
    mission_key,
    row_to_decision,
    row_to_mission,
    row_to_playbook_run,
    row_to_tool_call,
)
from dualmem.settings import Settings
from dualmem.store import (
    ApplyResult,
    AuditRow,
    Change,
    DeadLetter,
    SealedRow,
    Store,
    StoredRow,
    StreamEntry,
)

__all__ = [
    "MEMORY_COLUMNS",
    "ReplayEnd",
    "SQLiteStore",
    "follow_replays",
    "make_database_directory",
    "newest_mission_delete",
    "prefix_upper_bound",
]

Row = tuple[Any, ...]
log = logging.getLogger("dualmem.store")

#: The columns of ``memory`` the worker writes, in the order of its rows (the row id is
#: SQLite's to assign).
MEMORY_COLUMNS = (
    "scope", "key", "level", "owner", "envelope", "sid", "stream_id", "created_at",
    "updated_at", "expires_at",
)  # fmt: skip
#: A dead letter ``d`` of a put or delete whose replay (``replayed_as``, same shard) is
#: neither committed (in the journal) nor dead-lettered again: it may still wait in the
#: stream. (Fields are stored base64: ``b3A=`` is ``op``, ``cHV0`` ``put``, ``ZGVs``
#: ``del``.) A re-encryption (``reseal``) changes no value and journals nothing: its
#: replay holds nothing, like an audit event's.
_REPLAY_UNSETTLED = (
    "(d.replayed_as IS NOT NULL "
    """AND json_extract(d.fields, '$."b3A="') IN ('cHV0', 'ZGVs') """
    "AND NOT EXISTS (SELECT 1 FROM journal j WHERE j.shard = d.shard "
    "AND j.stream_id = d.replayed_as) "
    "AND NOT EXISTS (SELECT 1 FROM dead_letters e WHERE e.shard = d.shard "
    "AND e.stream_id = d.replayed_as))"
)
_MEMORY_INSERT = f"INSERT INTO memory ({', '.join(MEMORY_COLUMNS)}) VALUES "
# The sid guard makes the upsert idempotent and monotonic: a redelivered or late older
# command never overwrites a newer value or revives a tombstone. A put over a deleted or
# (at its own time) expired record starts a new record: a new created_at.
_MEMORY_UPSERT = """
ON CONFLICT (scope, key) DO UPDATE SET
    level = excluded.level,
    owner = excluded.owner,
    envelope = excluded.envelope,
    sid = excluded.sid,
    stream_id = excluded.stream_id,
    created_at = CASE WHEN memory.envelope IS NULL
                        OR memory.expires_at <= excluded.updated_at THEN excluded.created_at
                      ELSE memory.created_at END,
    updated_at = excluded.updated_at,
    expires_at = excluded.expires_at
WHERE excluded.sid > memory.sid
"""
# Key rotation: a new envelope for the same value, only while the row is still the one
# the rotation read (a newer put or a delete moved ``sid`` on, and then it wins).
_RESEAL = (
    "UPDATE memory SET envelope = ? WHERE scope = ? AND key = ? AND level = ? AND sid = ? "
    "AND envelope IS NOT NULL"
)
_JOURNAL_INSERT = (
    "INSERT INTO journal (seq, shard, stream_id, sid, op, scope, key, level, actor, ts, "
    "committed_at, prev_hash, hash) VALUES "
)
_AUDIT_INSERT = (
    "INSERT INTO audit_log (id, ts, event, actor, scope, key, level, risk, detail, shard, "
    "stream_id, prev_hash, hash) VALUES "
)
_MAX_PARAMS = 4000
#: How long the latency snapshot of a worker that stopped writing them is kept (a day).
METRICS_KEPT_MS = 24 * 3600 * 1000
_ROW_COLUMNS = "scope, key, level, owner, envelope, created_at, updated_at, expires_at, stream_id"
_CHANGE_COLUMNS = "seq, shard, stream_id, op, scope, key, level, actor, ts, committed_at"
_LIVE = "envelope IS NOT NULL AND (expires_at IS NULL OR expires_at > ?)"

# The end (last id, last hash) of both hash chains, in one statement (see _tails).
_TAILS = """SELECT (SELECT seq FROM journal ORDER BY seq DESC LIMIT 1),
                   (SELECT hash FROM journal ORDER BY seq DESC LIMIT 1),
                   (SELECT id FROM audit_log ORDER BY id DESC LIMIT 1),
                   (SELECT hash FROM audit_log ORDER BY id DESC LIMIT 1)"""


class _EntryFailed(Exception):
    """A per-entry error (``_ENTRY_ERRORS``) inside a batch's transaction: roll it back."""


# Errors that belong to one entry's content (a constraint, a bad value): retried entry by
# entry so the rest of the batch commits. Anything else (locked, I/O, full disk) fails
# the whole batch, which the worker retries unchanged.
_ENTRY_ERRORS = (
    sqlite3.IntegrityError,
    sqlite3.DataError,
    sqlite3.ProgrammingError,
    sqlite3.InterfaceError,
    OverflowError,
    MalformedCommand,  # a reseal that re-encrypts no write of its row (_check_reseals)
)


def prefix_upper_bound(prefix: str) -> str | None:
    """The smallest string greater than every string starting with ``prefix``.

    SQLite compares TEXT by its UTF-8 bytes, which orders like code points, so
    ``prefix <= key < bound`` is an index range with no LIKE/GLOB metacharacters to escape.
    ``None`` means no upper bound.

    >>> prefix_upper_bound("consensus/")
    'consensus0'
    >>> prefix_upper_bound("") is None
    True
    """
    chars = list(prefix)
    while chars:
        last = ord(chars.pop())
        nxt = last + 1
        if 0xD800 <= nxt <= 0xDFFF:
            nxt = 0xE000
        if nxt <= 0x10FFFF:
            return "".join(chars) + chr(nxt)
    return None


#: How many dead letters :func:`follow_replays` follows: a replay dead-lettered and
#: replayed again, and so on, but never round a loop of ``replayed_as`` for ever.
_REPLAY_HOPS = 16
_LETTER_HOP = (
    "SELECT 0, id, error, replayed_at, replayed_as, fields FROM dead_letters "
    "WHERE shard = ? AND stream_id = ?"
)
# A hop that asks for the commit too, in the same statement: sync() polls this.
_COMMIT_OR_LETTER_HOP = (
    "SELECT 1, NULL, NULL, NULL, NULL, NULL FROM journal WHERE shard = ? AND stream_id = ? "
    "UNION ALL SELECT 1, NULL, NULL, NULL, NULL, NULL FROM audit_log "
    "WHERE shard = ? AND stream_id = ? UNION ALL " + _LETTER_HOP
)


# Not frozen: building a frozen one costs 0.5 µs more, on each of sync()'s polls.
@dataclass(slots=True)
class ReplayEnd:
    """Where :func:`follow_replays` stopped, at ``stream_id``, and why (``state``):

    * ``"committed"``: in the journal or the audit log (looked for only when asked);
    * ``"open"``: no dead letter under it: in flight, or committed (when not asked);
    * ``"dead"``: dead-lettered and not replayed; ``letter`` is its ``(id, error)``;
    * ``"unrecorded"``: its dead letter was replayed under an id not recorded (a replay
      older than schema 4); ``fields`` are the letter's, as stored;
    * ``"too_deep"``: the replay of the last dead letter followed, not looked at.
    """

    state: Literal["committed", "open", "dead", "unrecorded", "too_deep"]
    stream_id: str
    letter: tuple[int, str] | None = None
    fields: str | None = None


def follow_replays(
    conn: sqlite3.Connection, shard: int, stream_id: str, *, committed: bool = False
) -> ReplayEnd:
    """Follow the command ``stream_id`` of ``shard`` from its dead letter to the letter's
    replay (``dead_letters.replayed_as``, same shard), and so on, through at most 16
    dead letters. With ``committed``, each id is first looked for among the commits
    (journal, audit log), and the first one found ends it.

    >>> from dualmem.migrations import migrate
    >>> conn = sqlite3.connect(":memory:", isolation_level=None)
    >>> _ = migrate(conn)
    >>> follow_replays(conn, 0, "5-0", committed=True)
    ReplayEnd(state='open', stream_id='5-0', letter=None, fields=None)
    """
    sql, repeat = (_COMMIT_OR_LETTER_HOP, 3) if committed else (_LETTER_HOP, 1)
    for _ in range(_REPLAY_HOPS):
        rows = conn.execute(sql, (shard, stream_id) * repeat).fetchall()
        if not rows:
            return ReplayEnd("open", stream_id)
        for row in rows:
            if row[0]:
                return ReplayEnd("committed", stream_id)
        # Not committed: the one row is the dead letter ((shard, stream_id) is unique).
        _, letter, error, replayed_at, replayed_as, fields = rows[0]
        if replayed_at is None:
            return ReplayEnd("dead", stream_id, letter=(int(letter), str(error)))
        if replayed_as is None:
            return ReplayEnd("unrecorded", stream_id, fields=fields)
        stream_id = str(replayed_as)
    return ReplayEnd("too_deep", stream_id)


def newest_mission_delete(scope: str, mission_id: str) -> tuple[str, tuple[str, str, str]]:
    """The query for the sid of the newest delete of mission ``mission_id``'s record in
    ``scope`` (``NULL`` if it was never deleted), and its parameters: to run alone, or as
    a scalar subquery in parentheses. It asks the journal, which keeps every delete for
    good, at every level: the encrypted ones have no mark in ``mission_deletes``, and
    purge may have taken the record's tombstone.

    >>> sql, params = newest_mission_delete("project:shop", "m1")
    >>> sql
    'SELECT MAX(sid) FROM journal WHERE scope = ? AND key = ? AND op = ?'
    >>> params
    ('project:shop', '_dm/mission/m1', 'del')
    """
    return (
        "SELECT MAX(sid) FROM journal WHERE scope = ? AND key = ? AND op = ?",
        (scope, mission_key(mission_id), OP_DELETE),
    )


def _row(r: Row) -> StoredRow:
    return StoredRow(r[0], r[1], level_of_number(r[2]), r[3], r[4], r[5], r[6], r[7], r[8])


def _change(r: Row) -> Change:
    return Change(r[0], r[1], r[2], r[3], r[4], r[5], level_of_number(r[6]), r[7], r[8], r[9])


class SQLiteStore(Store):
    """The store in one SQLite file (WAL, ``synchronous=NORMAL``, ``BEGIN IMMEDIATE``).

    Each thread gets its own connection, closed when the thread ends; the worker's is the
    only one that writes.

    >>> import tempfile, os
    >>> store = SQLiteStore(os.path.join(tempfile.mkdtemp(), "m.db"))
    >>> store.last_seq(), store.get("swarm:s", "k", now_ms=0)
    (0, None)
    >>> store.close()
    """

    def __init__(
        self,
        path: str | Path,
        *,
        busy_timeout_ms: int = 5_000,
        synchronous: str = "NORMAL",
        writer_cache_mb: int = 64,
    ) -> None:
        self.path = Path(path)
        self.busy_timeout_ms = busy_timeout_ms
        self.synchronous = synchronous
        self.writer_cache_mb = writer_cache_mb
        self._local = threading.local()
        # Every connection still open, for close(); a thread's own leaves it when the
        # thread ends (see _ThreadConnection).
        self._conns: set[sqlite3.Connection] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._checkpointer: _Checkpointer | None = None
        try:
            make_database_directory(self.path)
            _create_private(self.path)
            conn = self._conn()
            # auto_vacuum must be chosen before the file's first page is written, and
            # switching to WAL writes it: so this comes first (a no-op on existing files).
            # INCREMENTAL lets `dualmem purge` hand free pages back without a full VACUUM.
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            # WAL is a property of the file: set once, every later connection sees it.
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreUnavailable(f"{self.path}: could not enable WAL (got {mode!r})")
            migrate(conn)
        except sqlite3.Error as exc:
            self.close()
            raise StoreUnavailable(f"cannot open database {self.path}: {exc}") from exc
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_settings(cls, settings: Settings) -> SQLiteStore:
        """The store at ``settings.db_path`` with its busy timeout, ``synchronous`` mode and
        write connection's page cache."""
        return cls(
            settings.db_path,
            busy_timeout_ms=settings.busy_timeout_ms,
            synchronous=settings.sqlite_synchronous.upper(),
            writer_cache_mb=settings.sqlite_cache_mb,
        )

    # -- connections -------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        held: _ThreadConnection | None = getattr(self._local, "conn", None)
        if held is not None:
            return held.conn
        if self._closed:
            raise StoreUnavailable(f"store {self.path} is closed")
        # isolation_level=None: we issue BEGIN IMMEDIATE / COMMIT ourselves, so the write
        # lock is taken up front and a busy database waits (busy_timeout) instead of
        # failing half-way through a transaction.
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, cached_statements=256
        )
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
        conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        conn.execute("PRAGMA foreign_keys = ON")
        with self._lock:
            self._conns.add(conn)
        self._local.conn = _ThreadConnection(conn, self._conns)
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        if not getattr(self._local, "writer", False):
            self._become_writer(conn)
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot begin a write on {self.path}: {exc}") from exc
        try:
            yield conn
            conn.execute("COMMIT")
            if self._checkpointer is not None:
                self._checkpointer.kick()
        except BaseException as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise StoreUnavailable(f"write to {self.path} failed: {exc}") from exc
            raise

    def _become_writer(self, conn: sqlite3.Connection) -> None:
        # A checkpoint copies WAL frames into the database file and fsyncs it; left to
        # SQLite it runs inside whichever COMMIT crosses wal_autocheckpoint pages, which
        # puts milliseconds of I/O on the worker's commit path (the lag tail). Writers
        # here never checkpoint; a background thread does it, PASSIVE, right after commits.
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        # Negative: KiB rather than pages. Only the writer gets it (one per process), so
        # reader threads do not each grow a cache of this size.
        conn.execute(f"PRAGMA cache_size = {-1024 * int(self.writer_cache_mb)}")
        self._local.writer = True
        with self._lock:
            if self._checkpointer is None and not self._closed:
                self._checkpointer = _Checkpointer(self.path)
                self._checkpointer.start()

    def _read(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        try:
            return self._conn().execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise self._read_failed(exc) from exc

    def _read_failed(self, exc: sqlite3.Error) -> StoreUnavailable:
        return StoreUnavailable(f"read from {self.path} failed: {exc}")

    # -- writes (worker only) ----------------------------------------------------------

    def apply(self, entries: Sequence[StreamEntry]) -> ApplyResult:
        """See :meth:`Store.apply`."""
        now_ms = int(time.time() * 1000)
        result = ApplyResult()
        try:
            with self._write() as conn:
                plan = self._plan(conn, entries, now_ms)
                try:
                    self._write_plan(conn, plan)
                except _ENTRY_ERRORS as exc:
                    raise _EntryFailed from exc  # rolls the whole batch back
            plans = [plan]
        except _EntryFailed:
            # Slow path, only after the batch as a whole hit a per-entry error: planned
            # again under a new write lock (another worker may have committed since),
            # then each entry in its own savepoint, so one poison entry fails alone.
            with self._write() as conn:
                plans = self._apply_each(conn, self._plan(conn, entries, now_ms), now_ms)
        for p in plans:
            result.done.extend(p.applied)
            result.done.extend(p.duplicates)
            result.failed.extend(p.failed)
            result.notifications.extend(p.notifications)
            result.ts_us.extend(p.ts_us)
            result.applied += len(p.applied)
            result.duplicates += len(p.duplicates)
            if p.journal:
                result.journal_head = p.journal_tail
            if p.audit:
                result.audit_head = p.audit_tail
        return result

    def _plan(
        self, conn: sqlite3.Connection, entries: Sequence[StreamEntry], now_ms: int
    ) -> BatchPlan:
        """The batch's rows, planned under the write lock: duplicates looked up, chains
        continued from their tails."""
        jtail, atail = self._tails(conn)
        return plan_batch(
            entries,
            already=self._already(conn, entries),
            journal_tail=jtail,
            audit_tail=atail,
            now_ms=now_ms,
        )

    def _apply_each(
        self, conn: sqlite3.Connection, plan: BatchPlan, now_ms: int
    ) -> list[BatchPlan]:
        out = [BatchPlan(duplicates=plan.duplicates, failed=plan.failed)]
        jtail, atail = self._tails(conn)
        for entry in plan.applied:
            one = plan_batch(
                [entry], already=set(), journal_tail=jtail, audit_tail=atail, now_ms=now_ms
            )
            conn.execute("SAVEPOINT entry")
            try:
                self._write_plan(conn, one)
            except _ENTRY_ERRORS as exc:
                conn.execute("ROLLBACK TO entry")
                conn.execute("RELEASE entry")
                out.append(BatchPlan(failed=[(entry, f"{type(exc).__name__}: {exc}")]))
                continue
            conn.execute("RELEASE entry")
            jtail, atail = one.journal_tail, one.audit_tail
            out.append(one)
        return out

    @staticmethod
    def _tails(conn: sqlite3.Connection) -> tuple[tuple[int, bytes], tuple[int, bytes]]:
        """``(last id, last hash)`` of the journal and of the audit chain, read under the
        write lock in one statement (in one process with its writers, every statement
        lets another thread take the GIL, and the worker waits for it back)."""
        jseq, jhash, aid, ahash = conn.execute(_TAILS).fetchone()
        return (
            (0, GENESIS) if jseq is None else (int(jseq), bytes(jhash)),
            (0, GENESIS) if aid is None else (int(aid), bytes(ahash)),
        )

    @staticmethod
    def _already(conn: sqlite3.Connection, entries: Sequence[StreamEntry]) -> set[tuple[int, str]]:
        # Audit commands are recorded in audit_log, every other change in journal: look
        # each id up only where it can be.
        wanted: dict[tuple[str, int], list[str]] = {}
        for e in entries:
            table = "audit_log" if e.fields.get(b"op") == b"audit" else "journal"
            wanted.setdefault((table, e.shard), []).append(e.stream_id)
        found: set[tuple[int, str]] = set()
        for (table, shard), ids in wanted.items():
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                rows = conn.execute(
                    f"SELECT stream_id FROM {table} WHERE shard = ? AND stream_id IN ({marks})",
                    (shard, *chunk),
                )
                found.update((shard, str(r[0])) for r in rows)
        return found

    @staticmethod
    def _write_plan(conn: sqlite3.Connection, plan: BatchPlan) -> None:
        _insert_rows(conn, _JOURNAL_INSERT, plan.journal)
        # Rows of one multi-row INSERT are applied in order, so several commands on one
        # key in a batch end with the newest.
        _insert_rows(conn, _MEMORY_INSERT, plan.memory, _MEMORY_UPSERT)
        _insert_rows(conn, _AUDIT_INSERT, plan.audit)
        for sql, params in plan.projections:
            conn.execute(sql, params)
        if plan.reseal:
            # After the upserts: a put in the same batch has moved the row past the guard.
            _check_reseals(conn, plan.reseal)
            conn.executemany(_RESEAL, plan.reseal)

    def append_audit(
        self,
        conn: sqlite3.Connection,
        events: Sequence[tuple[int, str, str, str | None, str | None, int | None, str, str]],
    ) -> None:
        """Append worker-originated audit rows ``(ts, event, actor, scope, key, level, risk,
        detail)`` inside the caller's write transaction, extending the hash chain."""
        aid, ahash = self._tails(conn)[1]
        rows = []
        for ts, event, actor, scope, key, level, risk, detail in events:
            aid += 1
            row = (aid, ts, event, actor, scope, key, level, risk, detail, None, None)
            prev, ahash = ahash, chain_hash(ahash, row)
            rows.append((*row, prev, ahash))
        _insert_rows(conn, _AUDIT_INSERT, rows)

    def dead_letter(self, items: Sequence[tuple[StreamEntry, str, int]]) -> None:
        """See :meth:`Store.dead_letter`."""
        if not items:
            return
        now_ms = int(time.time() * 1000)
        with self._write() as conn:
            # The same entry comes again when a worker died between this commit and its
            # XACK and another one claimed it. Its replay, if one ran in between, stands:
            # clearing it listed the letter as waiting again, made sync() on the original
            # receipt say dead-lettered, and a second replay journaled the command twice.
            conn.executemany(
                """INSERT INTO dead_letters (shard, stream_id, fields, error, deliveries, failed_at)
                   VALUES (?, ?, ?, ?, ?, ?)
                   ON CONFLICT (shard, stream_id) DO UPDATE SET
                       error = excluded.error, deliveries = excluded.deliveries,
                       failed_at = excluded.failed_at""",
                [
                    (e.shard, e.stream_id, _fields_to_json(e.fields), err, n, now_ms)
                    for e, err, n in items
                ],
            )
            self.append_audit(
                conn,
                [
                    (
                        now_ms,
                        "dead_letter",
                        "worker",
                        None,
                        None,
                        None,
                        "medium",
                        json.dumps(
                            {
                                "shard": e.shard,
                                "stream_id": e.stream_id,
                                "error": err,
                                "deliveries": n,
                            },
                            sort_keys=True,
                        ),
                    )
                    for e, err, n in items
                ],
            )

    def mark_replayed(self, ids: Sequence[int], new_ids: Sequence[str] | None = None) -> None:
        """See :meth:`Store.mark_replayed`."""
        now_ms = int(time.time() * 1000)
        replayed_as: Sequence[str | None] = [None] * len(ids) if new_ids is None else new_ids
        with self._write() as conn:
            conn.executemany(
                "UPDATE dead_letters SET replayed_at = ?, replayed_as = ? WHERE id = ?",
                [(now_ms, new, i) for i, new in zip(ids, replayed_as, strict=True)],
            )

    def purge(
        self,
        now_ms: int,
        tombstones_before_ms: int,
        limit: int = 10_000,
        *,
        floor: bytes | None = None,
    ) -> int:
        """See :meth:`Store.purge`."""
        with self._write() as conn:
            # An expired row becomes a tombstone (dated at its expiry), not a gap: with no
            # row left, the upsert's sid guard would let an older command delivered late
            # (a dead consumer's claim, a dead-letter replay) bring back an older value.
            expired = conn.execute(
                """UPDATE memory SET envelope = NULL, updated_at = expires_at,
                       expires_at = NULL
                   WHERE (scope, key) IN (
                       SELECT scope, key FROM memory WHERE expires_at <= ? LIMIT ?)""",
                (now_ms, limit),
            ).rowcount
            # A tombstone stays while a dead letter of its key waits for a replay (and for
            # a tombstone TTL after one): the replayed, older command would find no row
            # to lose against and revive it.
            conn.execute(
                "CREATE TEMP TABLE IF NOT EXISTS held_keys "
                "(scope TEXT, key TEXT, PRIMARY KEY (scope, key)) WITHOUT ROWID"
            )
            conn.execute("DELETE FROM temp.held_keys")
            conn.executemany(
                "INSERT OR IGNORE INTO temp.held_keys VALUES (?, ?)",
                self._held_keys(conn, tombstones_before_ms),
            )
            # So does one at or above the oldest command still unacknowledged in the
            # streams: that command may be an older put of its key, delivered to a
            # consumer that died, which its claim would otherwise bring back.
            tombs = conn.execute(
                """DELETE FROM memory WHERE (scope, key) IN (
                       SELECT scope, key FROM memory m WHERE envelope IS NULL AND updated_at < ?
                       AND (? IS NULL OR sid < ?)
                       AND NOT EXISTS (SELECT 1 FROM temp.held_keys h
                                       WHERE h.scope = m.scope AND h.key = m.key)
                       LIMIT ?)""",
                (tombstones_before_ms, floor, floor, limit),
            ).rowcount
            # A dead letter replayed a tombstone TTL ago, its replay settled, has done its
            # work and no longer holds a tombstone, but it held the command's envelope
            # (plaintext at levels 3 and 4) for good. The envelope goes; the row stays,
            # since sync() on the original receipt follows it to its replay (replayed_as).
            letters = conn.execute(
                f"""UPDATE dead_letters SET fields = json_remove(fields, '$.' || ?)
                   WHERE id IN (SELECT id FROM dead_letters d
                                WHERE replayed_at < ? AND json_type(fields, '$.' || ?) IS NOT NULL
                                AND NOT ({_REPLAY_UNSETTLED})
                                LIMIT ?)""",
                (_ENVELOPE_FIELD, tombstones_before_ms, _ENVELOPE_FIELD, limit),
            ).rowcount
        return int(expired) + int(tombs) + int(letters)

    @staticmethod
    def _held_keys(conn: sqlite3.Connection, since_ms: int) -> list[tuple[str, str]]:
        """``(scope, key)`` of every dead letter not replayed, replayed at ``since_ms`` or
        later, or replayed under an id (``replayed_as``) neither committed nor
        dead-lettered yet. A replay is ordered by the original command's id, older than
        the tombstone: while it waits in the stream (pending for a consumer that died,
        however long), only the tombstone keeps it from bringing the value back. A
        replay Redis lost holds its key's tombstone for good (one row), until the letter
        is replayed again."""
        out = []
        for (text,) in conn.execute(
            "SELECT fields FROM dead_letters d WHERE replayed_at IS NULL OR replayed_at >= ? "
            f"OR {_REPLAY_UNSETTLED}",
            (since_ms,),
        ):
            try:
                fields = _fields_from_json(text)
                if fields.get(b"op") not in (b"put", b"del"):  # audit, reseal: hold nothing
                    continue
                out.append((fields[b"s"].decode(), fields[b"k"].decode()))
            except (KeyError, ValueError):  # no scope/key: holds nothing
                continue
        return out

    def record_metrics(
        self, ts_ms: int, source: str, snapshot: Mapping[str, Mapping[str, float]]
    ) -> None:
        """See :meth:`Store.record_metrics`."""
        rows = [
            (
                ts_ms,
                source,
                path,
                int(s["count"]),
                s["p50"],
                s["p95"],
                s["p99"],
                s["max"],
                s.get("sum", 0.0),
            )
            for path, s in snapshot.items()
        ]
        with self._write() as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO metrics "
                "(ts, source, path, count, p50, p95, p99, max, sum) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            # Only the latest snapshot of a source is ever read (its histograms are
            # cumulative), and a source silent for METRICS_KEPT_MS is a stopped worker:
            # the table grew by a snapshot per worker per metrics_interval, for ever, and
            # `stats`/`metrics` listed every worker that ever ran.
            conn.execute(
                "DELETE FROM metrics WHERE (source = ? AND ts < ?) OR ts < ?",
                (source, ts_ms, ts_ms - METRICS_KEPT_MS),
            )

    # -- reads -------------------------------------------------------------------------

    def status(self, shard: int, stream_id: str) -> str | None:
        """See :meth:`Store.status`. A dead letter replayed since is followed to its
        replay (``replayed_as``, same shard); one replayed before that column existed is
        found by its original sid, which the replay keeps (puts and deletes)."""
        try:
            end = follow_replays(self._conn(), shard, stream_id, committed=True)
        except sqlite3.Error as exc:
            raise self._read_failed(exc) from exc
        if end.state in ("committed", "dead"):
            return end.state
        if end.state == "unrecorded" and end.fields is not None:
            return self._replayed_before_schema_4(shard, end.stream_id, end.fields)
        return None  # open: not committed yet (or lost); too_deep: not known

    def _replayed_before_schema_4(self, shard: int, stream_id: str, fields: str) -> str | None:
        try:
            decoded = _fields_from_json(fields)
            scope, key = decoded[b"s"].decode(), decoded[b"k"].decode()
            sid = sid_of(stream_id)
        except (ValueError, KeyError, TypeError, MalformedCommand):
            return None  # an audit event or junk: no journal row to find it by
        found = self._read(
            "SELECT 1 FROM journal WHERE scope = ? AND key = ? AND sid = ? AND shard = ?",
            (scope, key, sid, shard),
        )
        return "committed" if found else None

    def get(self, scope: str, key: str, now_ms: int) -> StoredRow | None:
        """See :meth:`Store.get`."""
        rows = self._read(
            f"SELECT {_ROW_COLUMNS} FROM memory WHERE scope = ? AND key = ? AND {_LIVE}",
            (scope, key, now_ms),
        )
        return _row(rows[0]) if rows else None

    def get_envelope(self, scope: str, key: str, now_ms: int) -> tuple[bytes, str] | None:
        """See :meth:`Store.get_envelope`: two columns, no :class:`StoredRow` (the read
        path's SQL and row building were a third of a ``get``)."""
        rows = self._read(
            f"SELECT envelope, owner FROM memory WHERE scope = ? AND key = ? AND {_LIVE}",
            (scope, key, now_ms),
        )
        return (rows[0][0], rows[0][1]) if rows else None

    def query(
        self,
        scopes: Sequence[str],
        *,
        now_ms: int,
        prefix: str = "",
        since: int | None = None,
        until: int | None = None,
        limit: int = 100,
        after: tuple[str, str] | None = None,
    ) -> list[StoredRow]:
        """See :meth:`Store.query`."""
        if after is None:
            return self._query(scopes, now_ms, prefix, since, until, limit)
        # Two index seeks instead of one row-value filter, which SQLite does not use to
        # seek beside "scope IN (...)": every page re-read its scope from the start, so
        # reading N rows page by page cost N**2 / 2 / page.
        after_scope, after_key = after
        rows = []
        if after_scope in scopes:
            rows = self._query([after_scope], now_ms, prefix, since, until, limit, after_key)
        later = [s for s in scopes if s > after_scope]  # str order is SQLite's BINARY order
        if len(rows) < limit and later:
            rows += self._query(later, now_ms, prefix, since, until, limit - len(rows))
        return rows

    def _query(
        self,
        scopes: Sequence[str],
        now_ms: int,
        prefix: str,
        since: int | None,
        until: int | None,
        limit: int,
        after_key: str | None = None,
    ) -> list[StoredRow]:
        if not scopes:
            return []
        where = [f"scope IN ({','.join('?' * len(scopes))})", _LIVE]
        params: list[object] = [*scopes, now_ms]
        if after_key is not None and after_key >= prefix:
            where.append("key > ?")  # the tighter lower bound: the index seeks to it
            params.append(after_key)
        elif prefix:
            where.append("key >= ?")
            params.append(prefix)
        if prefix:
            upper = prefix_upper_bound(prefix)
            if upper is not None:
                where.append("key < ?")
                params.append(upper)
        if since is not None:
            where.append("updated_at >= ?")
            params.append(since)
        if until is not None:
            where.append("updated_at < ?")
            params.append(until)
        params.append(limit)
        sql = (
            f"SELECT {_ROW_COLUMNS} FROM memory WHERE {' AND '.join(where)} "
            "ORDER BY scope, key LIMIT ?"
        )
        return [_row(r) for r in self._read(sql, params)]

    def history(self, scope: str, key: str, limit: int | None = None) -> list[Change]:
        """See :meth:`Store.history`."""
        rows = self._read(
            f"SELECT {_CHANGE_COLUMNS} FROM journal WHERE scope = ? AND key = ? "
            "ORDER BY sid LIMIT ?",
            (scope, key, -1 if limit is None else limit),
        )
        return [_change(r) for r in rows]

    def changes(self, scopes: Sequence[str], since: int, limit: int | None = None) -> list[Change]:
        """See :meth:`Store.changes`."""
        if not scopes:
            return []
        rows = self._read(
            f"SELECT {_CHANGE_COLUMNS} FROM journal "
            f"WHERE seq > ? AND scope IN ({','.join('?' * len(scopes))}) ORDER BY seq LIMIT ?",
            (since, *scopes, -1 if limit is None else limit),
        )
        return [_change(r) for r in rows]

    def last_seq(self) -> int:
        """See :meth:`Store.last_seq`."""
        rows = self._read("SELECT COALESCE(MAX(seq), 0) FROM journal")
        return int(rows[0][0])

    def journal_hash(self, seq: int) -> bytes | None:
        """See :meth:`Store.journal_hash`."""
        return self.chain_hash("journal", seq)

    def chain_hash(self, chain: str, row_id: int) -> bytes | None:
        """See :meth:`Store.chain_hash`."""
        sql = {
            "journal": "SELECT hash FROM journal WHERE seq = ?",
            "audit_log": "SELECT hash FROM audit_log WHERE id = ?",
        }[chain]
        rows = self._read(sql, (row_id,))
        return bytes(rows[0][0]) if rows else None

    def max_sid(self, shard: int) -> bytes:
        """See :meth:`Store.max_sid`. A scan of the tables that record stream ids: the
        worker asks only when it had to create a consumer group (a new stream, or Redis
        lost its data). The ids themselves, not only the ``sid`` column: a replayed
        command is ordered by its original id but took a newer one, and audit events and
        dead letters have ids too; a new command given any of them would be taken for it."""
        ms = "CAST(substr(stream_id, 1, instr(stream_id, '-') - 1) AS INTEGER)"
        seq = "CAST(substr(stream_id, instr(stream_id, '-') + 1) AS INTEGER)"
        found: list[bytes] = []
        for table in ("journal", "audit_log", "dead_letters"):
            rows = self._read(
                f"SELECT stream_id FROM {table} WHERE shard = ? "
                f"ORDER BY {ms} DESC, {seq} DESC LIMIT 1",
                (shard,),
            )
            for (stream_id,) in rows:
                with contextlib.suppress(MalformedCommand):
                    found.append(sid_of(str(stream_id)))
        rows = self._read("SELECT MAX(sid) FROM journal WHERE shard = ?", (shard,))
        if rows and isinstance(rows[0][0], bytes):
            found.append(rows[0][0])
        return max(found, default=b"")

    def audit_log(self, since_id: int = 0, limit: int | None = None) -> list[AuditRow]:
        """See :meth:`Store.audit_log`."""
        rows = self._read(
            "SELECT id, ts, event, actor, scope, key, level, risk, detail FROM audit_log "
            "WHERE id > ? ORDER BY id LIMIT ?",
            (since_id, -1 if limit is None else limit),
        )
        return [AuditRow(*r) for r in rows]

    def dead_letters(self, *, include_replayed: bool = False) -> list[DeadLetter]:
        """See :meth:`Store.dead_letters`."""
        cond = "" if include_replayed else "WHERE replayed_at IS NULL"
        rows = self._read(
            "SELECT id, shard, stream_id, fields, error, deliveries, failed_at, replayed_at "
            f"FROM dead_letters {cond} ORDER BY id"
        )
        return [
            DeadLetter(r[0], r[1], r[2], _fields_from_json(r[3]), r[4], r[5], r[6], r[7])
            for r in rows
        ]

    def dead_letter_count(self) -> int:
        """See :meth:`Store.dead_letter_count`."""
        ((n,),) = self._read("SELECT COUNT(*) FROM dead_letters WHERE replayed_at IS NULL")
        return int(n)

    def sealed_rows(
        self,
        levels: Sequence[int],
        *,
        skip_key_field: bytes = b"",
        after: tuple[str, str] | None = None,
        limit: int = 500,
    ) -> list[SealedRow]:
        """See :meth:`Store.sealed_rows`."""
        where, params = _sealed_where(levels, skip_key_field)
        if after is not None:
            where += " AND (scope, key) > (?, ?)"
            params.extend(after)
        rows = self._read(
            f"SELECT scope, key, level, envelope, sid FROM memory WHERE {where} "
            "ORDER BY scope, key LIMIT ?",
            [*params, limit],
        )
        return [
            SealedRow(r[0], r[1], level_of_number(r[2]), bytes(r[3]), bytes(r[4])) for r in rows
        ]

    def count_sealed_rows(self, levels: Sequence[int], *, skip_key_field: bytes = b"") -> int:
        """See :meth:`Store.count_sealed_rows`."""
        where, params = _sealed_where(levels, skip_key_field)
        return int(self._read(f"SELECT COUNT(*) FROM memory WHERE {where}", params)[0][0])

    def latest_metrics(self) -> dict[str, dict[str, dict[str, float]]]:
        """See :meth:`Store.latest_metrics`."""
        rows = self._read(
            """SELECT m.source, m.path, m.count, m.p50, m.p95, m.p99, m.max, m.ts, m.sum
               FROM metrics m
               JOIN (SELECT source, MAX(ts) AS ts FROM metrics GROUP BY source) last
                 ON last.source = m.source AND last.ts = m.ts ORDER BY m.source, m.path"""
        )
        out: dict[str, dict[str, dict[str, float]]] = {}
        for source, path, count, p50, p95, p99, mx, ts, total in rows:
            out.setdefault(source, {})[path] = {
                "count": count,
                "p50": p50,
                "p95": p95,
                "p99": p99,
                "max": mx,
                "ts": ts,
                "sum": total,
            }
        return out

    def mission(self, scope: str, mission_id: str) -> Mission | None:
        """See :meth:`Store.mission`."""
        rows = self._read(
            f"SELECT {MISSION_COLUMNS} FROM missions "
            "WHERE scope = ? AND mission_id = ? AND sid > 0",
            (scope, mission_id),
        )
        return row_to_mission(rows[0]) if rows else None

    def missions(self, scope: str, *, status: str | None = None) -> list[Mission]:
        """See :meth:`Store.missions`."""
        where = "scope = ? AND sid > 0"
        params: list[object] = [scope]
        if status is not None:
            where += " AND status = ?"
            params.append(status)
        rows = self._read(
            f"SELECT {MISSION_COLUMNS} FROM missions WHERE {where} ORDER BY started_at, mission_id",
            params,
        )
        return [row_to_mission(r) for r in rows]

    def tool_calls(
        self,
        scope: str,
        mission_id: str,
        *,
        since: int | None = None,
        success: bool | None = None,
    ) -> list[ToolCall]:
        """See :meth:`Store.tool_calls`."""
        where = "scope = ? AND mission_id = ?"
        params: list[object] = [scope, mission_id]
        if success is not None:
            where += " AND success = ?"
            params.append(int(success))
        if since is not None:
            where += " AND called_at >= ?"
            params.append(since)
        rows = self._read(
            f"SELECT {TOOL_CALL_COLUMNS} FROM tool_calls WHERE {where} ORDER BY called_at, call_id",
            params,
        )
        return [row_to_tool_call(r) for r in rows]

    def decisions(self, scope: str, mission_id: str) -> list[Decision]:
        """See :meth:`Store.decisions`."""
        rows = self._read(
            f"SELECT {DECISION_COLUMNS} FROM decisions WHERE scope = ? AND mission_id = ? "
            "ORDER BY decided_at, decision_id",
            (scope, mission_id),
        )
        return [row_to_decision(r) for r in rows]

    def playbook_runs(self, scope: str, mission_id: str) -> list[PlaybookRun]:
        """See :meth:`Store.playbook_runs`."""
        rows = self._read(
            f"SELECT {PLAYBOOK_RUN_COLUMNS} FROM playbook_runs WHERE scope = ? AND "
            "mission_id = ? ORDER BY started_at, run_id",
            (scope, mission_id),
        )
        return [row_to_playbook_run(r) for r in rows]

    def stale_children(self, scope: str, mission_id: str) -> list[str]:
        """See :meth:`Store.stale_children`."""
        # One statement, so the delete and the records are read from the same snapshot.
        deleted, deleted_params = newest_mission_delete(scope, mission_id)
        params: list[object] = []
        for kind in KINDS[1:]:
            prefix = child_key(kind, mission_id, "")
            params += [scope, prefix, prefix_upper_bound(prefix), *deleted_params]
        # One indexed range per kind (an OR of ranges searches the whole scope).
        ranged = (
            "SELECT key FROM memory WHERE scope = ? AND key >= ? AND key < ? "
            f"AND envelope IS NOT NULL AND sid < ({deleted})"
        )
        rows = self._read(" UNION ALL ".join([ranged] * (len(KINDS) - 1)) + " ORDER BY key", params)
        return [str(r[0]) for r in rows]

    def close(self) -> None:
        """See :meth:`Store.close`."""
        self._closed = True
        with self._lock:
            conns = list(self._conns)
            self._conns.clear()
            checkpointer, self._checkpointer = self._checkpointer, None
        if checkpointer is not None:
            checkpointer.stop()
        for conn in conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()


class _ThreadConnection:
    """One thread's connection, held in the store's thread-local storage: when the thread
    ends, Python drops that storage and this closes the connection. A program that runs
    each task in a new thread would otherwise keep one connection (two file descriptors)
    per thread it ever ran, until it hit the descriptor limit.

    The connection is made with ``check_same_thread=False``, so whichever thread drops the
    holder may close it; ``SQLiteStore.close`` closes those still open.
    """

    __slots__ = ("_open", "conn")

    def __init__(self, conn: sqlite3.Connection, open_conns: set[sqlite3.Connection]) -> None:
        self.conn = conn
        self._open = open_conns

    def __del__(self) -> None:
        # No lock here: this runs at a thread's exit, and set.discard is atomic. A second
        # close() (the store's, racing) is a no-op.
        self._open.discard(self.conn)
        with contextlib.suppress(sqlite3.Error):
            self.conn.close()


class _Checkpointer:
    """A thread that runs ``PRAGMA wal_checkpoint(PASSIVE)`` after commits, off their path.

    At most one checkpoint per ``interval`` seconds, and only after commits: under load the
    WAL holds a fraction of a second of batches, and a quiet database is not fsynced after
    every small batch. PASSIVE never waits for readers or writers, so it cannot stall the
    worker; frames a reader still needs are left for a later round. Commits stay
    crash-safe either way: checkpointing only moves committed pages into the database file.
    """

    def __init__(self, path: Path, interval: float = 0.25) -> None:
        self.path = path
        self.interval = interval
        self._kick = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dualmem-checkpoint", daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def kick(self) -> None:
        """A commit happened."""
        self._kick.set()

    def stop(self) -> None:
        """Stop the thread and wait for it (a checkpoint in progress finishes first)."""
        self._stopping.set()
        self._kick.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(10)

    def _run(self) -> None:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:  # pragma: no cover - the store opened the file already
            log.warning("checkpointer cannot open %s: %s", self.path, exc)
            return
        try:
            while not self._stopping.is_set():
                self._kick.wait()
                self._kick.clear()
                if self._stopping.is_set():
                    break
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:
                    log.debug("checkpoint of %s skipped: %s", self.path, exc)
                # Commits during this pause share the next checkpoint.
                self._stopping.wait(self.interval)
        finally:
            conn.close()


def make_database_directory(path: str | Path) -> None:
    """Create the directory of the database file ``path``, with its parents.

    What stands in the way (a regular file where a directory must be, no permission) is
    a ``ConfigurationError`` naming ``path``, the ``OSError`` chained: a setting to fix,
    not an outage.

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> open(f"{d}/afile", "w").close()
    >>> make_database_directory(f"{d}/afile/x.db")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    acl.errors.ConfigurationError: db_path ... cannot be used: .../afile is not a directory
    """
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        # The one nearest the root: the directories below it cannot be looked at.
        blocker = next((a for a in reversed(p.parents) if a.exists() and not a.is_dir()), p.parent)
        raise ConfigurationError(
            f"db_path {p} cannot be used: {blocker} is not a directory"
        ) from exc
    except OSError as exc:
        raise ConfigurationError(
            f"db_path {p} cannot be used: cannot create its directory {p.parent}: "
            f"{exc.strerror or exc}"
        ) from exc


def _create_private(path: Path) -> None:
    """Create a new database file with mode 0600 (an empty file is an empty database):
    levels 3 and 4 are plaintext in it, and SQLite gives its -wal and -shm files the
    database file's mode. An existing file keeps its mode."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return  # there already (a file, or a directory sqlite3 will refuse)
    except OSError as exc:
        raise ConfigurationError(
            f"db_path {path} cannot be created: {exc.strerror or exc}"
        ) from exc
    os.close(fd)


def holds_sealed_rows(path: str | Path) -> bool:
    """Whether the database at ``path`` holds a live record, or a dead letter waiting for a
    replay, at an encrypted level (read only; ``False`` for no file, an empty one, or one
    with no dualmem tables). ``ConfigurationError`` when it cannot tell (the file is locked
    or damaged): the caller must not guess.

    >>> holds_sealed_rows("/nonexistent/dualmem.db")
    False
    """
    p = Path(path)
    if not p.is_file() or p.stat().st_size == 0:
        return False
    sealed_levels = {int(lv) for lv in ENCRYPTED_LEVELS}
    levels = ",".join(map(str, sorted(sealed_levels)))
    try:
        conn = sqlite3.connect(f"{p.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
        try:
            row = conn.execute(
                f"SELECT 1 FROM memory WHERE level IN ({levels}) AND envelope IS NOT NULL LIMIT 1"
            ).fetchone()
            if row is not None:
                return True
            letters = conn.execute(
                "SELECT fields FROM dead_letters WHERE replayed_at IS NULL"
            ).fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        if "no such table" in str(exc):
            return False  # not a dualmem database (yet)
        raise ConfigurationError(f"cannot read {p} to see what it holds: {exc}") from exc
    for (text,) in letters:
        try:
            fields = _fields_from_json(text)
        except (ValueError, TypeError):
            return True  # cannot tell: as if sealed
        try:
            level = int(fields.get(b"l", b""))
        except ValueError:
            continue  # no level: a malformed command that no key could open either
        if fields.get(b"e") and level in sealed_levels:
            return True
    return False


def _check_reseals(conn: sqlite3.Connection, reseals: Sequence[tuple[object, ...]]) -> None:
    """Refuse a reseal that is not a later re-encryption of the write its row holds.

    A key rotation re-encrypts a row's envelope keeping its write id and writer, one
    generation up (``Codec.reseal``). Without this check, whoever could add a stream
    entry could pass an older envelope of the record off as a re-encryption, guarded by
    the row's current stream id (which the stream shows): the row would silently go back
    to an older value, or back under a key a rotation retired, with no journal row. The
    same generation under the same key is taken: a reseal redelivered after its commit
    (it has no journal row to be found a duplicate by), or sent again by a resumed
    rotation before the first copy was applied, re-encrypts the same write at the same
    step. A row sealed before envelope version 2 has no write id, and takes any reseal.
    """
    for envelope, scope, key, level, guard in reseals:
        row = conn.execute(
            "SELECT envelope FROM memory WHERE scope = ? AND key = ? AND level = ? AND sid = ? "
            "AND envelope IS NOT NULL",
            (scope, key, level, guard),
        ).fetchone()
        if row is None:
            continue  # the row moved on (or is gone): the guard leaves it alone
        current = envelope_sealing(bytes(row[0]))
        if current is None:
            continue
        assert isinstance(envelope, bytes)
        new = envelope_sealing(envelope)
        # The same generation only under the same key (a redelivery, or a resumed
        # rotation's second copy): another key at that generation is an aborted
        # rotation's envelope, which would put the row back under a key since retired.
        same_step = new is not None and new.generation == current.generation
        if (
            new is None
            or (new.write_id, new.writer) != (current.write_id, current.writer)
            or new.generation < current.generation
            or (same_step and envelope_key_id(envelope) != envelope_key_id(bytes(row[0])))
        ):
            raise MalformedCommand(
                f"reseal of {scope}/{key} is not a re-encryption of the write its row holds "
                "(another write id or writer, or an older generation)"
            )


def _insert_rows(
    conn: sqlite3.Connection, head: str, rows: Sequence[Sequence[object]], tail: str = ""
) -> None:
    """INSERT many rows with multi-row VALUES statements instead of executemany.

    executemany steps once per row and the sqlite3 module releases the GIL on every
    step; with a busy writer thread in the same process (the embedded default) each
    re-acquisition waits for the interpreter's switch interval. One statement per few
    hundred rows makes that a handful of hand-offs per batch, and is faster anyway.
    """
    if not rows:
        return
    width = len(rows[0])
    per = max(1, _MAX_PARAMS // width)
    group = "(" + ",".join("?" * width) + ")"
    for start in range(0, len(rows), per):
        chunk = rows[start : start + per]
        sql = head + ",".join([group] * len(chunk)) + tail
        conn.execute(sql, [v for row in chunk for v in row])


def _sealed_where(levels: Sequence[int], skip_key_field: bytes) -> tuple[str, list[object]]:
    where = f"envelope IS NOT NULL AND level IN ({','.join('?' * len(levels))})"
    params: list[object] = [int(lv) for lv in levels]
    if skip_key_field:
        # substr() on a BLOB counts bytes; byte 3 (1-based) is the key id's length byte.
        where += " AND substr(envelope, 3, ?) IS NOT ?"
        params += [len(skip_key_field), skip_key_field]
    return where, params


#: The JSON path member of a dead letter's envelope field (names are base64 too).
_ENVELOPE_FIELD = '"' + base64.b64encode(b"e").decode() + '"'


def _fields_to_json(fields: Mapping[bytes, bytes]) -> str:
    return json.dumps(
        {base64.b64encode(k).decode(): base64.b64encode(v).decode() for k, v in fields.items()},
        sort_keys=True,
    )


def _fields_from_json(text: str) -> dict[bytes, bytes]:
    return {base64.b64decode(k): base64.b64decode(v) for k, v in json.loads(text).items()}
