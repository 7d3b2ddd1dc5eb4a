"""``dualmem verify``: integrity, schema version, hash chains, projections, Redis parity."""

from __future__ import annotations

import contextlib
import functools
import logging
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import redis

from acl.crypto import Codec, envelope_key_id, envelope_sealing
from acl.errors import DualMemError
from acl.levels import Level
from acl.policy import level_of_scope
from dualmem.batch import GENESIS, chain_hash, journal_hash_values
from dualmem.commands import (
    CACHE_TOMBSTONE,
    MalformedCommand,
    cached_envelope,
    decode_command,
)
from dualmem.layout import Layout
from dualmem.migrations import SCHEMA_VERSION, schema_version
from dualmem.ops.database import NO_PROGRESS, ProgressFn
from dualmem.projection import (
    DECISION_COLUMNS,
    MISSION_COLUMNS,
    PLAINTEXT,
    PLAYBOOK_RUN_COLUMNS,
    RESERVED_PREFIX,
    TOOL_CALL_COLUMNS,
    MissionRecord,
    parse_key,
    parse_record,
    row_to_decision,
    row_to_mission,
    row_to_playbook_run,
    row_to_tool_call,
)
from dualmem.redis_backend import translate_errors
from dualmem.rotation_lock import rotation_running
from dualmem.sqlite_store import newest_mission_delete, prefix_upper_bound
from dualmem.worker import next_stream_id, safe_trim_id

__all__ = [
    "DIFFERENT",
    "MAX_PROBLEMS",
    "SAME",
    "UNJUDGED",
    "Check",
    "check_anchors",
    "check_chain",
    "check_foreign_keys",
    "check_integrity",
    "check_projections",
    "check_redis_parity",
    "check_schema",
    "guarded",
    "same_value",
    "split_cache_key",
    "verify_database",
]

#: Problems listed per check; the count says how many there were in all.
MAX_PROBLEMS = 20
_CHUNK = 5_000


@dataclass
class Check:
    """The outcome of one check: ``status`` is ``ok``, ``warn`` (passed, with something it
    could not judge: the summary says what), ``fail`` or ``skip``."""

    name: str
    status: str = "ok"
    summary: str = ""
    problems: list[str] = field(default_factory=list)
    problem_count: int = 0
    fix: str = ""

    def problem(self, text: str) -> None:
        """Count a problem (and keep its text if fewer than ``MAX_PROBLEMS`` are kept)."""
        self.status = "fail"
        self.problem_count += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(text)

    @property
    def ok(self) -> bool:
        """True unless the check failed (a warning passes)."""
        return self.status != "fail"

    def to_dict(self) -> dict[str, object]:
        """For ``--json``."""
        return {
            "name": self.name,
            "status": self.status,
            "summary": self.summary,
            "problems": self.problems,
            "problem_count": self.problem_count,
            "fix": self.fix,
        }


log = logging.getLogger("dualmem.verify")

_DAMAGED_FIX = "restore the newest backup (`dualmem backup` writes verified copies)"


def guarded(name: str, run: Callable[[], Check]) -> Check:
    """``run()``; if SQLite cannot read what the check needs (a damaged file raises
    ``sqlite3.DatabaseError``), a failed check ``name`` that says so, instead of an error
    that would end ``verify`` before its report."""
    try:
        return run()
    except sqlite3.DatabaseError as exc:
        c = Check(name)
        c.problem(f"SQLite could not read the database: {exc}")
        c.summary, c.fix = f"could not check: {exc}", _DAMAGED_FIX
        return c
    except (TypeError, ValueError, OverflowError) as exc:
        # A value of a type or size no dualmem writes (an edit, or a damaged page SQLite
        # decoded as junk): this check fails with it, the others still run. It could also
        # be a bug in the check: the traceback goes to the log, so it does not hide.
        log.warning("verify: %s failed on a value no dualmem writes", name, exc_info=True)
        c = Check(name)
        c.problem(f"a value no dualmem writes: {type(exc).__name__}: {exc}")
        c.summary, c.fix = f"could not check: {exc}", _DAMAGED_FIX
        return c


def _not_run(name: str, why: str) -> Check:
    return Check(name, status="skip", summary=f"not run: {why}")


def check_integrity(conn: sqlite3.Connection) -> Check:
    """``PRAGMA integrity_check``."""
    c = Check("integrity_check")
    rows = [str(r[0]) for r in conn.execute("PRAGMA integrity_check")]
    if rows != ["ok"]:
        for r in rows:
            c.problem(r)
        c.fix = _DAMAGED_FIX
    c.summary = "ok" if c.ok else f"{c.problem_count} problem(s)"
    return c


def check_foreign_keys(conn: sqlite3.Connection) -> Check:
    """``PRAGMA foreign_key_check``: every child row has its parent."""
    c = Check("foreign_key_check")
    for table, rowid, parent, _fkid in conn.execute("PRAGMA foreign_key_check"):
        c.problem(f"{table} row {rowid} has no parent in {parent}")
    c.summary = "ok" if c.ok else f"{c.problem_count} orphan row(s)"
    return c


def check_schema(conn: sqlite3.Connection) -> Check:
    """The file's ``user_version`` against the code's ``SCHEMA_VERSION``."""
    c = Check("schema version")
    version = schema_version(conn)
    c.summary = f"{version} (this dualmem: {SCHEMA_VERSION})"
    if version > SCHEMA_VERSION:
        c.problem(f"schema {version} is newer than this dualmem ({SCHEMA_VERSION})")
        c.fix = "upgrade dualmem"
    elif version == 0:
        c.problem("no dualmem schema: an empty file, or another program's database")
        c.fix = "check --db / DUALMEM_DB_PATH"
    elif version < 0:
        # An edit or a damaged header, not an older schema: `dualmem migrate` on it would
        # take a migration list index for a version.
        c.problem(f"schema {version} is no version dualmem writes")
        c.fix = _DAMAGED_FIX
    elif version < SCHEMA_VERSION:
        c.problem(f"schema {version} is older than this dualmem ({SCHEMA_VERSION})")
        c.fix = "run `dualmem migrate` (it backs up first)"
    return c


_CHAINS = {
    "journal": (
        "SELECT seq, shard, stream_id, sid, op, scope, key, level, actor, ts, committed_at, "
        "prev_hash, hash FROM journal WHERE seq > ? ORDER BY seq LIMIT ?",
        "seq",
    ),
    "audit_log": (
        "SELECT id, ts, event, actor, scope, key, level, risk, detail, shard, stream_id, "
        "prev_hash, hash FROM audit_log WHERE id > ? ORDER BY id LIMIT ?",
        "id",
    ),
}


def _rows(conn: sqlite3.Connection, sql: str) -> Iterator[tuple[object, ...]]:
    """Rows in id order, page by page (keyset), so a long chain is never all in memory.
    From the smallest id SQLite can hold: a row planted at id 0 or below is walked too."""
    last = -(1 << 63)
    while True:
        page = conn.execute(sql, (last, _CHUNK)).fetchall()
        if not page:
            return
        yield from page
        last = int(page[-1][0])


def check_chain(conn: sqlite3.Connection, table: str, progress: ProgressFn = NO_PROGRESS) -> Check:
    """Recompute the hash chain of ``journal`` or ``audit_log`` with ``chain_hash``.

    Each row's ``prev_hash`` must be the previous row's ``hash`` (``GENESIS`` before the
    first) and its ``hash`` must be ``chain_hash(prev_hash, values)``: editing, deleting or
    inserting any row shows up here.
    """
    sql, id_name = _CHAINS[table]
    c = Check(f"{table} hash chain")
    total = int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
    prev = GENESIS
    n = 0
    for row in _rows(conn, sql):
        if cast(int, row[0]) < 1:
            c.problem(f"{id_name} {row[0]}: ids start at 1 (a row put there by hand)")
        values = row[:-2]
        if table == "journal":
            values = journal_hash_values(values)
        prev_hash, digest = row[-2], row[-1]
        if not isinstance(prev_hash, bytes) or not isinstance(digest, bytes):
            # Edited to text or NULL (the columns are not STRICT), or a damaged page read
            # back as junk: a broken link, and the walk goes on from it.
            c.problem(f"{id_name} {row[0]}: prev_hash or hash is not a 32-byte hash")
            prev = digest if isinstance(digest, bytes) else b""
            n += 1
            continue
        if prev_hash != prev:
            c.problem(f"{id_name} {row[0]}: prev_hash does not match the previous row's hash")
        if chain_hash(prev_hash, values) != digest:
            c.problem(f"{id_name} {row[0]}: hash does not match the row's contents")
        prev = digest
        n += 1
        if n % _CHUNK == 0:
            progress(f"{table} chain", n, total)
    progress(f"{table} chain", n, total)
    if n != total:  # a row the keyset walk cannot reach (one planted at the smallest id)
        c.problem(f"{total - n} row(s) of {total} were not reached by the walk")
    c.summary = f"{n} rows ok" if c.ok else f"{c.problem_count} broken link(s) in {n} rows"
    if not c.ok:
        c.fix = "rows were edited outside dualmem: restore a backup and investigate"
    return c


def check_anchors(conn: sqlite3.Connection, client: redis.Redis, layout: Layout) -> Check:
    """The end of each hash chain against the anchor the worker leaves in Redis.

    A chain recomputes cleanly after rows are cut off its end; the anchor (the newest
    ``id:hash`` the worker committed, set after each batch) still names the cut row. The
    row must exist with that hash. No anchor (nothing committed since Redis lost its
    data) is reported, not failed; rows after the anchor are the newest batch's.
    """
    c = Check("hash chain anchors")
    notes: list[str] = []
    with translate_errors("verify anchors"):
        for table, (_, id_name) in _CHAINS.items():
            top = client.zrange(layout.anchor_key(table), -1, -1)
            if not top:
                notes.append(f"{table}: no anchor")
                continue
            raw = top[0]
            try:
                id_text, _, hex_hash = bytes(raw).decode().partition(":")  # type: ignore[arg-type]
                anchored_id, anchored_hash = int(id_text), bytes.fromhex(hex_hash)
            except ValueError:
                c.problem(f"{table}: the anchor in Redis is not '<id>:<hash>': {raw!r}")
                continue
            row = conn.execute(
                f"SELECT hash FROM {table} WHERE {id_name} = ?", (anchored_id,)
            ).fetchone()
            if row is None:
                last = conn.execute(f"SELECT MAX({id_name}) FROM {table}").fetchone()[0]
                c.problem(
                    f"{table} ends at {id_name} {last or 0}, before the anchored {id_name} "
                    f"{anchored_id}: rows were cut off its end"
                )
            elif bytes(row[0]) != anchored_hash:
                c.problem(f"{table} {id_name} {anchored_id}: hash differs from the anchor")
            else:
                notes.append(f"{table}: ends at or after {id_name} {anchored_id}")
    c.summary = "; ".join(notes) if c.ok else f"{c.problem_count} chain end(s) do not match"
    if not c.ok:
        keys = ", ".join(layout.anchor_key(table).decode() for table in _CHAINS)
        c.fix = (
            "rows were removed or replaced outside dualmem: restore a backup and investigate "
            "(after a deliberate restore of an older backup, a chain's anchor moves with the "
            "next row the worker commits to that chain: any change for the journal, an audit "
            f"event for audit_log; or delete the anchor keys in Redis: {keys})"
        )
    return c


_PROJECTED = {
    "mission": ("missions", "mission_id"),
    "tool_call": ("tool_calls", "call_id"),
    "decision": ("decisions", "decision_id"),
    "playbook_run": ("playbook_runs", "run_id"),
}
# The columns the store reads each kind with, and how it turns them into objects.
_CONTENT: dict[str, tuple[str, Callable[[Sequence[Any]], MissionRecord]]] = {
    "mission": (MISSION_COLUMNS, row_to_mission),
    "tool_call": (TOOL_CALL_COLUMNS, row_to_tool_call),
    "decision": (DECISION_COLUMNS, row_to_decision),
    "playbook_run": (PLAYBOOK_RUN_COLUMNS, row_to_playbook_run),
}


#: ``(kind, scope, mission_id, id)``: a projected row, and the record it comes from (a
#: mission's id is its mission_id).
_Ident = tuple[str, str, str, str]


def _projected_rows(conn: sqlite3.Connection) -> dict[_Ident, object]:
    """``{(kind, scope, mission_id, id): sid}`` of every projected row but the missions'
    placeholders (sid 0): a child row is read whatever its sid, so one planted with sid 0
    shows."""
    out: dict[_Ident, object] = {}
    for kind, (table, id_col) in _PROJECTED.items():
        where = "WHERE sid > 0" if kind == "mission" else ""
        for scope, mission_id, ident, sid in conn.execute(
            f"SELECT scope, mission_id, {id_col}, sid FROM {table} {where}"
        ):
            out[(kind, scope, mission_id, ident)] = sid
    return out


def check_sids(conn: sqlite3.Connection) -> Check:
    """Every ordering id (``sid``) is 16 bytes (schema 4), but the missions' placeholders:
    a sid edited into another form still hashes the same in its chain (its old integer
    form is hashed on purpose) but sorts apart from every other (``history`` order)."""
    c = Check("ordering ids")
    bad = "NOT (typeof(sid) = 'blob' AND length(sid) = 16)"
    counted = 0
    for table, extra in (
        ("memory", ""),
        ("journal", ""),
        ("missions", " AND NOT (typeof(sid) = 'integer' AND sid = 0)"),
        ("tool_calls", ""),
        ("decisions", ""),
        ("playbook_runs", ""),
    ):
        n = int(conn.execute(f"SELECT count(*) FROM {table} WHERE {bad}{extra}").fetchone()[0])
        counted += int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
        if n:
            c.problem(f"{table}: {n} row(s) whose sid is not a 16-byte ordering id")
    c.summary = f"{counted} rows ok" if c.ok else f"{c.problem_count} table(s) with bad sids"
    if not c.ok:
        c.fix = "rows were edited outside dualmem: restore a backup and investigate"
    return c


_Live = dict[_Ident, tuple[object, str, int, str, bytes]]


def _reserved_records(conn: sqlite3.Connection) -> tuple[_Live, dict[tuple[str, str], bytes]]:
    """``{(kind, scope, mission_id, id): (sid, key, level, owner, envelope)}`` of live
    ``_dm/`` records at the plaintext levels, and the sid of each mission's newest delete
    (``mission_deletes``)."""
    upper = prefix_upper_bound(RESERVED_PREFIX)
    live: _Live = {}
    deleted = {
        (str(scope), str(mid)): bytes(sid)
        for scope, mid, sid in conn.execute("SELECT scope, mission_id, sid FROM mission_deletes")
    }
    for scope, key, sid, level, owner, envelope in conn.execute(
        "SELECT scope, key, sid, level, owner, envelope FROM memory "
        "WHERE key >= ? AND key < ? AND level IN (3, 4) AND envelope IS NOT NULL",
        (RESERVED_PREFIX, upper),
    ):
        parsed = parse_key(key)
        if parsed is None:
            continue
        kind, mission_id, record_id = parsed
        live[(kind, scope, mission_id, record_id or mission_id)] = (
            sid,
            key,
            level,
            owner,
            bytes(envelope),
        )
    return live, deleted


def _content_differs(conn: sqlite3.Connection, ident: _Ident, record: tuple[Any, ...]) -> bool:
    """Whether the projected row of a record says something else than the record."""
    kind, scope, mission_id, name = ident
    _sid, key, level, owner, envelope = record
    table, id_col = _PROJECTED[kind]
    columns, to_object = _CONTENT[kind]
    row = conn.execute(
        f"SELECT {columns} FROM {table} WHERE scope = ? AND mission_id = ? AND {id_col} = ?",
        (scope, mission_id, name),
    ).fetchone()
    try:
        # The projection's own codec: the same bound on a value's size (a large tool call).
        value = PLAINTEXT.open(envelope, scope=scope, key=key, level=Level(level))
        expected = parse_record(
            kind, mission_id, None if kind == "mission" else name, scope, Level(level), owner, value
        )
        return row is None or to_object(row) != expected
    except (DualMemError, ValueError):
        return True


def _named(ident: _Ident) -> str:
    """``scope kind id`` of a mission, ``scope kind mission/id`` of a child."""
    kind, scope, mission_id, name = ident
    return f"{scope} {kind} {name if kind == 'mission' else f'{mission_id}/{name}'}"


def check_projections(conn: sqlite3.Connection) -> Check:
    """Every ``_dm/`` record at a plaintext level has its projected row with the same
    stream id, and every projected row has its record (see ``dualmem.projection``)."""
    c = Check("mission projection")
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")}
    if "missions" not in tables:
        c.status, c.summary = "skip", "no mission tables (schema before 2)"
        return c
    if "mission_deletes" not in tables:
        c.status, c.summary = "skip", "schema before 4: run `dualmem migrate` first"
        return c
    projected = _projected_rows(conn)
    live, deleted = _reserved_records(conn)
    orphans = _sealed_orphans(conn)
    for ident, record in live.items():
        kind, scope, mission_id, _name = ident
        sid = record[0]
        gone = deleted.get((scope, mission_id))
        if gone is not None and isinstance(sid, bytes) and sid < gone:
            # Older than its mission's delete: by design, not projected.
            if kind != "mission":
                orphans.append(f"{scope} {record[1]}")
            continue
        got = projected.get(ident)
        if got is None:
            c.problem(f"{_named(ident)}: record has no projected row")
        elif got != sid:
            c.problem(f"{_named(ident)}: projected from another version of the record")
        elif _content_differs(conn, ident, record):
            c.problem(f"{_named(ident)}: projected row differs from its record")
    for ident in sorted(projected.keys() - live.keys()):
        c.problem(f"{_named(ident)}: projected row without its record")
    c.summary = f"{len(projected)} rows ok" if c.ok else f"{c.problem_count} mismatch(es)"
    if not c.ok:
        c.fix = (
            "the mission tables were edited outside dualmem, or a worker older than schema 2 "
            "wrote records (stop old workers); the records in `memory` are authoritative"
        )
    elif orphans:
        # Not damage: a plain `delete` of a mission's record is allowed, and leaves them.
        orphans.sort()
        more = len(orphans) - _ORPHANS_NAMED
        c.status = "warn"
        c.summary += f", {len(orphans)} orphaned record(s) (older than their mission's delete)"
        c.fix = (
            "records of deleted missions (their mission record was removed with a plain "
            "`delete`, not MissionLog.delete_mission): no read lists them; delete them, or "
            "delete_mission() a new mission of that id, which takes them too: "
            + ", ".join(orphans[:_ORPHANS_NAMED])
            + (f" and {more} more" if more > 0 else "")
        )
    return c


#: How many orphaned records a warning names (it is one line of text, not a problem list).
_ORPHANS_NAMED = 5


def _sealed_orphans(conn: sqlite3.Connection) -> list[str]:
    """``scope key`` of every live tool call, decision or playbook run at an encrypted
    level written before its mission's newest delete: ``MissionLog`` hides those as the
    projection does at the plaintext levels. Nothing is projected there, so the delete is
    the journal's (keys and ordering ids are not encrypted: no key file needed)."""
    upper = prefix_upper_bound(RESERVED_PREFIX)
    marks: dict[tuple[str, str], object] = {}
    out: list[str] = []
    for scope, key, sid in conn.execute(
        "SELECT scope, key, sid FROM memory "
        "WHERE key >= ? AND key < ? AND level NOT IN (3, 4) AND envelope IS NOT NULL",
        (RESERVED_PREFIX, upper),
    ).fetchall():
        parsed = parse_key(key)
        if parsed is None or parsed[0] == "mission":
            continue
        mission = (str(scope), parsed[1])
        if mission not in marks:
            marks[mission] = conn.execute(*newest_mission_delete(scope, parsed[1])).fetchone()[0]
        gone = marks[mission]
        if isinstance(gone, bytes) and isinstance(sid, bytes) and sid < gone:
            out.append(f"{scope} {key}")
    return out


def verify_database(conn: sqlite3.Connection, progress: ProgressFn = NO_PROGRESS) -> list[Check]:
    """Every check that needs only the database file, on one snapshot of it (a read
    transaction): workers may go on committing meanwhile.

    A check SQLite cannot complete (a damaged page: ``sqlite3.DatabaseError``) fails with
    the error; the others still run, or are listed as not run when what they depend on
    (the schema version) cannot be read.
    """
    if conn.in_transaction:
        return _verify_database(conn, progress)
    conn.execute("BEGIN")  # deferred: reads nothing yet
    try:
        return _verify_database(conn, progress)
    finally:
        _end_read(conn)


def _end_read(conn: sqlite3.Connection) -> None:
    """End the read transaction; on a damaged file SQLite may have ended it already, or
    refuse to: nothing was written, so a failure here changes nothing."""
    if not conn.in_transaction:
        return
    try:
        conn.execute("COMMIT")
    except sqlite3.DatabaseError:
        with contextlib.suppress(sqlite3.DatabaseError):
            conn.execute("ROLLBACK")


_CHAIN_NAMES = [f"{table} hash chain" for table in _CHAINS]


def _verify_database(conn: sqlite3.Connection, progress: ProgressFn) -> list[Check]:
    checks = [
        guarded("integrity_check", lambda: check_integrity(conn)),
        guarded("foreign_key_check", lambda: check_foreign_keys(conn)),
        guarded("schema version", lambda: check_schema(conn)),
    ]
    later = [*_CHAIN_NAMES, "ordering ids", "mission projection"]
    try:
        version = schema_version(conn)
    except sqlite3.DatabaseError as exc:
        return checks + [
            _not_run(name, f"the schema version cannot be read ({exc})") for name in later
        ]
    if not 1 <= version <= SCHEMA_VERSION:
        # Tables of a newer schema may have other columns: judging them would mislead;
        # version 0 is an empty file or not a dualmem database at all.
        return checks
    for table, name in zip(_CHAINS, _CHAIN_NAMES, strict=True):
        checks.append(guarded(name, functools.partial(check_chain, conn, table, progress)))
    if version >= 4:
        checks.append(guarded("ordering ids", lambda: check_sids(conn)))
    checks.append(guarded("mission projection", lambda: check_projections(conn)))
    return checks


def split_cache_key(layout: Layout, name: bytes) -> list[tuple[int, str, str]]:
    """Every ``(shard, scope, key)`` a cache key name can stand for.

    Since cache keys escape ``:`` inside a scope's name (see ``Layout.cache_key``), a name
    stands for at most one record.

    >>> split_cache_key(Layout("ns"), b"dm:{ns:0}:c:agent:a%3Ab:k")
    [(0, 'agent:a:b', 'k')]
    """
    found = layout.split_cache_key(name)
    return [] if found is None else [found]


def _in_flight(client: redis.Redis, streams: Sequence[bytes]) -> set[tuple[str, str]]:
    """``(scope, key)`` of every command a worker may not have committed yet: from the
    oldest entry some group has not acknowledged (``safe_trim_id``) to the end."""
    out: set[tuple[str, str]] = set()
    for stream in streams:
        start = safe_trim_id(client, stream) or "-"
        while True:
            page = cast(
                list[tuple[bytes, dict[bytes, bytes]]],
                client.xrange(stream, min=start, max="+", count=_CHUNK) or [],
            )
            for _sid, fields in page:
                try:
                    cmd = decode_command(fields)
                except MalformedCommand:
                    continue
                out.add((cmd.scope, cmd.key))
            if len(page) < _CHUNK:
                break
            start = next_stream_id(page[-1][0].decode())
    return out


def check_redis_parity(
    conn: sqlite3.Connection,
    client: redis.Redis,
    layout: Layout,
    now_ms: int,
    progress: ProgressFn = NO_PROGRESS,
    *,
    codec: Codec | None = None,
) -> Check:
    """Every live cache entry in Redis has its SQLite row holding the same envelope.

    Records with a command still in a stream are in flight (the worker has not committed
    them yet) and are counted, not judged; so are entries whose row has just expired (the
    cache and the row expire a few milliseconds apart).

    A key rotation re-seals the row and the cache entry apart, each with its own nonce:
    their bytes differ while their value does not. With a keyring (``codec``) both are
    opened and their values compared. Without one, such a pair cannot be told from a
    tamper: it is counted as not judged and the check ends in ``warn``, not ``fail``.
    """
    c = Check("redis <-> sqlite parity")
    streams = layout.streams()
    tally = _Tally(conn, codec if codec is not None and codec.keyring is not None else None)
    with translate_errors("verify parity"):
        inflight = _in_flight(client, streams)
        checked = skipped = strangers = 0
        # Entries that differ are judged again after the scan, against the streams as
        # they are then: a put that reached Redis after the in-flight list was read was
        # compared with the older committed row, a false failure while writes go on.
        suspects: list[tuple[bytes, list[tuple[int, str, str]]]] = []
        for shard in range(layout.shards):
            for name in client.scan_iter(match=layout.cache_pattern(shard), count=1000):
                candidates = split_cache_key(layout, bytes(name))
                if not candidates:
                    c.problem(f"{name!r}: not a cache key of this namespace")
                    strangers += 1
                    continue
                if any((sc, k) in inflight for _, sc, k in candidates):
                    skipped += 1
                    continue
                cached = client.get(name)
                if cached is None:
                    continue  # expired between SCAN and GET
                checked += 1
                first = Check(c.name)
                _judge(conn, first, tally, candidates, bytes(cached), now_ms)  # type: ignore[arg-type]
                if not first.ok:
                    suspects.append((bytes(name), list(candidates)))
                if checked % 1000 == 0:
                    progress("redis parity", checked, None)
        if suspects:
            # Read before the entries are judged again: a rotation that ends meanwhile has
            # its event committed before it lets go of the lock.
            tally.rotating = tally.codec is None and rotation_running(client, layout.namespace)
            dropped, landed = _judge_again(conn, client, streams, c, tally, suspects, now_ms)
            checked, skipped = checked - dropped, skipped + landed
    progress("redis parity", checked, checked)
    matched = checked - tally.unjudged
    resealed = (
        f" ({tally.resealed} re-sealed apart by a key rotation: same value)"
        if tally.resealed
        else ""
    )
    unjudged = (
        f", {tally.unjudged} re-sealed by a key rotation not judged (no keyring)"
        if tally.unjudged
        else ""
    )
    c.summary = f"{matched} cache entries match{resealed}{unjudged}, {skipped} in flight"
    if not c.ok:
        # A name that is no cache key is a problem but no entry: "1 of 0 differ" it said.
        others = (
            f", {strangers} name{'s' if strangers > 1 else ''} in the cache's key space "
            "that no cache key has"
            if strangers
            else ""
        )
        c.summary = (
            f"{c.problem_count - strangers} of {checked} cache entries differ{unjudged}"
            f"{others}; {skipped} in flight"
        )
        c.fix = (
            "a write bypassed the stream or a row was edited: `dualmem dlq list`, then "
            "rewrite the record through the API (the stream re-syncs both sides)"
        )
    elif tally.unjudged:
        c.status = "warn"
        c.fix = (
            "pass the key file (--keyring or DUALMEM_KEYRING): verify then opens entries a "
            "key rotation re-sealed and compares their values"
        )
    return c


def _judge_again(
    conn: sqlite3.Connection,
    client: redis.Redis,
    streams: list[bytes],
    c: Check,
    tally: _Tally,
    suspects: list[tuple[bytes, list[tuple[int, str, str]]]],
    now_ms: int,
) -> tuple[int, int]:
    """Judge the entries that differed once more, with the streams read again; ``(no
    longer judged, in flight now)``: an entry gone since, or whose put is in a stream
    now, is not judged."""
    inflight = _in_flight(client, streams)
    dropped = landed = 0
    for name, candidates in suspects:
        cached = client.get(name)
        if cached is None:
            dropped += 1  # expired since
        elif any((sc, k) in inflight for _, sc, k in candidates):
            dropped, landed = dropped + 1, landed + 1
        else:
            _judge(conn, c, tally, candidates, bytes(cached), now_ms)  # type: ignore[arg-type]
    return dropped, landed


class _Tally:
    """How the encrypted pairs whose bytes differ were judged (see ``same_value``)."""

    def __init__(self, conn: sqlite3.Connection, codec: Codec | None) -> None:
        self.conn = conn
        self.codec = codec
        self.resealed = 0
        self.unjudged = 0
        #: A key rotation holds its lock (see ``rotation_running``) when the suspects are
        #: judged again: any row may have been re-sealed apart from its cache entry.
        self.rotating = False

    @functools.cached_property
    def rotated_at(self) -> int | None:
        """The time (ms) of the newest committed key rotation, ``None`` if none ran; read
        once, and only when a pair needs it."""
        row = self.conn.execute(
            "SELECT MAX(ts) FROM audit_log WHERE event = 'key_rotation'"
        ).fetchone()
        return None if row is None or row[0] is None else int(row[0])


#: ``same_value`` verdicts.
SAME, DIFFERENT, UNJUDGED = "same", "different", "unjudged"


def _judged_by_headers(row_envelope: bytes, cached: bytes, *, resealed: bool) -> tuple[str, str]:
    """:func:`same_value` without a keyring. Only a key rotation makes two envelopes of
    one value (``resealed``): otherwise differing bytes differ. The headers can only
    condemn: names of another write (write id, writer) are another value, whereas
    agreeing ones prove nothing without the key (anyone can copy a header)."""
    if not resealed:
        return DIFFERENT, "the cached envelope differs from the SQLite row"
    row_sealing, cached_sealing = envelope_sealing(row_envelope), envelope_sealing(cached)
    if row_sealing is not None and cached_sealing is not None:
        one_write = row_sealing.write_id == cached_sealing.write_id
        if not (one_write and row_sealing.writer == cached_sealing.writer):
            return DIFFERENT, "the cached envelope is another write than the SQLite row"
    if envelope_key_id(row_envelope) and envelope_key_id(cached):
        return UNJUDGED, ""
    return DIFFERENT, "the cached envelope differs from the SQLite row"


def same_value(
    codec: Codec | None,
    row_envelope: bytes,
    cached: bytes,
    *,
    scope: str,
    key: str,
    level: Level,
    resealed: bool,
) -> tuple[str, str]:
    """Whether two envelopes of one record whose bytes differ hold the same value:
    ``(verdict, why)``.

    Only a key rotation seals one value twice (the row and the cache entry, each with its
    own nonce); any other write caches the very envelope it commits. With a keyring both
    are opened with the record's ``(scope, key, level)``: the same plaintext bytes are
    ``SAME``; another value, or an envelope that does not open, is ``DIFFERENT``. With
    none, two encrypted envelopes of a row a rotation may have re-sealed (``resealed``)
    are ``UNJUDGED``, unless their headers name two writes (``DIFFERENT``); anything else
    is ``DIFFERENT``.

    >>> from acl.crypto import Keyring
    >>> codec = Codec(Keyring.generate())
    >>> where = dict(scope="agent:a", key="k", level=Level.PRIVATE)
    >>> one, two = (codec.seal({"v": 1}, **where) for _ in range(2))
    >>> same_value(codec, one, two, resealed=False, **where)
    ('same', '')
    >>> same_value(None, one, two, resealed=True, **where)[0]  # two writes
    'different'
    >>> again = Codec(codec.keyring.with_new_key()).reseal(one, **where)
    >>> same_value(None, one, again, resealed=True, **where)  # one write: not verified
    ('unjudged', '')
    >>> same_value(None, one, again, resealed=False, **where)[0]
    'different'
    """
    if codec is None or codec.keyring is None:
        return _judged_by_headers(row_envelope, cached, resealed=resealed)
    try:
        row_value = codec.open_bytes(row_envelope, scope=scope, key=key, level=level)
    except DualMemError as exc:
        return DIFFERENT, f"the SQLite row does not open: {exc}"
    try:
        cached_value = codec.open_bytes(cached, scope=scope, key=key, level=level)
    except DualMemError as exc:
        return DIFFERENT, f"the cached envelope does not open: {exc}"
    if row_value != cached_value:
        return DIFFERENT, "the cached envelope holds another value than the SQLite row"
    return SAME, ""


def _judge(
    conn: sqlite3.Connection,
    c: Check,
    tally: _Tally,
    candidates: Iterable[tuple[int, str, str]],
    cached: bytes,
    now_ms: int,
) -> None:
    for _, scope, key in candidates:
        try:
            level = level_of_scope(scope)
        except ValueError:
            continue
        row = conn.execute(
            "SELECT envelope, expires_at, updated_at FROM memory WHERE scope = ? AND key = ?",
            (scope, key),
        ).fetchone()
        if row is None:
            continue
        envelope, expires_at, updated_at = row
        cached_env, cached_expiry = cached_envelope(cached)
        if cached_expiry is not None and cached_expiry <= now_ms:
            return  # a put past its ttl: deleted or expired, like the row will be
        if cached == CACHE_TOMBSTONE:
            # A delete's mark: a committed delete (a tombstone, or no row) agrees with it.
            if envelope is not None:
                c.problem(f"{scope}/{key}: deleted in Redis but live in SQLite (a lost delete)")
        elif envelope is None:
            c.problem(f"{scope}/{key}: deleted in SQLite but still cached in Redis")
        elif expires_at is not None and expires_at <= now_ms:
            pass  # expiring: the cache entry follows within its own ttl
        elif cached_env is not None and bytes(envelope) != cached_env:
            _judge_resealed(c, tally, (scope, key, level, updated_at), bytes(envelope), cached_env)
        return
    expiry = cached_envelope(cached)[1]
    if cached == CACHE_TOMBSTONE or (expiry is not None and expiry <= now_ms):
        return  # deleted or expired, and no row left (purged, or never committed)
    scope, key = next(iter(candidates))[1:]
    c.problem(f"{scope}/{key}: cached in Redis but no row in SQLite")


def _judge_resealed(
    c: Check, tally: _Tally, row: tuple[str, str, Level, object], envelope: bytes, cached: bytes
) -> None:
    """A row ``(scope, key, level, updated_at)`` and its cache entry whose bytes differ:
    one value re-sealed apart by a key rotation, or a problem (see ``same_value``).

    Both are opened with the scope's level, never the row's level column (an edited column
    must not turn an encrypted record into a plaintext one), as ``get`` does."""
    scope, key, at, updated_at = row
    rotated = tally.rotated_at if tally.codec is None else None
    # A finished rotation re-seals only rows written before it, and its event is
    # committed after. A running one re-seals whatever is under an old key, whenever it
    # was written: the headers alone can condemn then.
    resealed = tally.rotating or (
        rotated is not None and isinstance(updated_at, int) and updated_at <= rotated
    )
    verdict, why = same_value(
        tally.codec, envelope, cached, scope=scope, key=key, level=at, resealed=resealed
    )
    if verdict == SAME:
        tally.resealed += 1
    elif verdict == UNJUDGED:
        tally.unjudged += 1
    else:
        c.problem(f"{scope}/{key}: {why}")
