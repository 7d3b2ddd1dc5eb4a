"""Schema migrations, ordered and idempotent, tracked by ``PRAGMA user_version``."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from acl.errors import ConfigurationError

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "migrate", "schema_version"]

_V1 = """
CREATE TABLE IF NOT EXISTS memory (
    scope       TEXT    NOT NULL,
    key         TEXT    NOT NULL,
    level       INTEGER NOT NULL CHECK (level BETWEEN 1 AND 5),
    owner       TEXT    NOT NULL,
    envelope    BLOB,               -- NULL: tombstone of a delete, kept for tombstone_ttl
    sid         INTEGER NOT NULL,   -- stream id as an integer: the upsert guard
    stream_id   TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    expires_at  INTEGER,
    PRIMARY KEY (scope, key)
) WITHOUT ROWID

CREATE INDEX IF NOT EXISTS memory_expires ON memory (expires_at) WHERE expires_at IS NOT NULL

CREATE INDEX IF NOT EXISTS memory_tombstones ON memory (updated_at) WHERE envelope IS NULL

CREATE INDEX IF NOT EXISTS memory_updated ON memory (scope, updated_at)

CREATE TABLE IF NOT EXISTS journal (
    seq          INTEGER PRIMARY KEY,
    shard        INTEGER NOT NULL,
    stream_id    TEXT    NOT NULL,
    sid          INTEGER NOT NULL,
    op           TEXT    NOT NULL,
    scope        TEXT    NOT NULL,
    key          TEXT    NOT NULL,
    level        INTEGER NOT NULL,
    actor        TEXT    NOT NULL,
    ts           INTEGER NOT NULL,
    committed_at INTEGER NOT NULL,
    prev_hash    BLOB    NOT NULL,
    hash         BLOB    NOT NULL,
    UNIQUE (shard, stream_id)
)

CREATE INDEX IF NOT EXISTS journal_record ON journal (scope, key, sid)

CREATE INDEX IF NOT EXISTS journal_scope_seq ON journal (scope, seq)

CREATE TABLE IF NOT EXISTS audit_log (
    id         INTEGER PRIMARY KEY,
    ts         INTEGER NOT NULL,
    event      TEXT    NOT NULL,
    actor      TEXT    NOT NULL,
    scope      TEXT,
    key        TEXT,
    level      INTEGER,
    risk       TEXT    NOT NULL CHECK (risk IN ('low', 'medium', 'high')),
    detail     TEXT    NOT NULL DEFAULT '{}',
    shard      INTEGER,
    stream_id  TEXT,
    prev_hash  BLOB    NOT NULL,
    hash       BLOB    NOT NULL,
    UNIQUE (shard, stream_id)
)

CREATE TRIGGER IF NOT EXISTS audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END

CREATE TRIGGER IF NOT EXISTS audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END

CREATE TABLE IF NOT EXISTS dead_letters (
    id          INTEGER PRIMARY KEY,
    shard       INTEGER NOT NULL,
    stream_id   TEXT    NOT NULL,
    fields      TEXT    NOT NULL,   -- JSON {field: base64 value}
    error       TEXT    NOT NULL,
    deliveries  INTEGER NOT NULL,
    failed_at   INTEGER NOT NULL,
    replayed_at INTEGER,
    UNIQUE (shard, stream_id)
)

CREATE TABLE IF NOT EXISTS metrics (
    ts     INTEGER NOT NULL,
    source TEXT    NOT NULL,
    path   TEXT    NOT NULL,
    count  INTEGER NOT NULL,
    p50    REAL    NOT NULL,
    p95    REAL    NOT NULL,
    p99    REAL    NOT NULL,
    max    REAL    NOT NULL,
    PRIMARY KEY (source, ts, path)
)
"""


def _execute_script(conn: sqlite3.Connection, script: str) -> None:
    # Statement by statement, not executescript(): executescript commits on its own and
    # would break the one-transaction-per-migration rule. Triggers hold ';' inside
    # BEGIN ... END, so statements are separated by blank lines instead.
    for statement in script.strip().split("\n\n"):
        conn.execute(statement)


def _v1(conn: sqlite3.Connection) -> None:
    _execute_script(conn, _V1)


_V2 = """
CREATE TABLE IF NOT EXISTS missions (
    scope        TEXT    NOT NULL,
    mission_id   TEXT    NOT NULL,
    level        INTEGER NOT NULL CHECK (level BETWEEN 1 AND 5),
    phase        TEXT    NOT NULL,
    status       TEXT    NOT NULL
                 CHECK (status IN ('pending', 'in_progress', 'completed', 'failed')),
    metadata     TEXT    NOT NULL DEFAULT '{}' CHECK (json_valid(metadata)),
    started_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL,
    completed_at INTEGER,
    actor        TEXT    NOT NULL,
    sid          INTEGER NOT NULL,  -- 0: placeholder for children that arrived first
    PRIMARY KEY (scope, mission_id)
)

CREATE INDEX IF NOT EXISTS missions_status ON missions (scope, status, started_at, mission_id)

CREATE INDEX IF NOT EXISTS missions_started ON missions (scope, started_at, mission_id)

CREATE TABLE IF NOT EXISTS tool_calls (
    scope        TEXT    NOT NULL,
    call_id      TEXT    NOT NULL,
    mission_id   TEXT    NOT NULL,
    tool_name    TEXT    NOT NULL,
    args         TEXT    NOT NULL CHECK (json_valid(args)),
    result       TEXT    NOT NULL CHECK (json_valid(result)),
    duration_ms  REAL    NOT NULL CHECK (duration_ms >= 0),
    success      INTEGER NOT NULL CHECK (success IN (0, 1)),
    error        TEXT,
    called_at    INTEGER NOT NULL,
    actor        TEXT    NOT NULL,
    sid          INTEGER NOT NULL,
    PRIMARY KEY (scope, call_id),
    FOREIGN KEY (scope, mission_id) REFERENCES missions (scope, mission_id) ON DELETE CASCADE
)

CREATE INDEX IF NOT EXISTS tool_calls_mission ON tool_calls (scope, mission_id, called_at, call_id)

CREATE INDEX IF NOT EXISTS tool_calls_success
    ON tool_calls (scope, mission_id, success, called_at, call_id)

CREATE TABLE IF NOT EXISTS decisions (
    scope         TEXT    NOT NULL,
    decision_id   TEXT    NOT NULL,
    mission_id    TEXT    NOT NULL,
    decision_type TEXT    NOT NULL,
    rationale     TEXT    NOT NULL,
    agent_name    TEXT    NOT NULL,
    decided_at    INTEGER NOT NULL,
    actor         TEXT    NOT NULL,
    sid           INTEGER NOT NULL,
    PRIMARY KEY (scope, decision_id),
    FOREIGN KEY (scope, mission_id) REFERENCES missions (scope, mission_id) ON DELETE CASCADE
)

CREATE INDEX IF NOT EXISTS decisions_mission
    ON decisions (scope, mission_id, decided_at, decision_id)

CREATE TABLE IF NOT EXISTS playbook_runs (
    scope         TEXT    NOT NULL,
    run_id        TEXT    NOT NULL,
    mission_id    TEXT    NOT NULL,
    playbook_name TEXT    NOT NULL,
    phase         TEXT    NOT NULL,
    started_at    INTEGER NOT NULL,
    completed_at  INTEGER,
    success       INTEGER NOT NULL CHECK (success IN (0, 1)),
    actor         TEXT    NOT NULL,
    sid           INTEGER NOT NULL,
    PRIMARY KEY (scope, run_id),
    FOREIGN KEY (scope, mission_id) REFERENCES missions (scope, mission_id) ON DELETE CASCADE
)

CREATE INDEX IF NOT EXISTS playbook_runs_mission
    ON playbook_runs (scope, mission_id, started_at, run_id)

CREATE TABLE IF NOT EXISTS sync_events (
    id        INTEGER PRIMARY KEY,
    audit_id  INTEGER NOT NULL UNIQUE REFERENCES audit_log (id),
    ts        INTEGER NOT NULL,
    kind      TEXT    NOT NULL,
    scope     TEXT    NOT NULL,
    key       TEXT    NOT NULL,
    detail    TEXT    NOT NULL DEFAULT '{}' CHECK (json_valid(detail))
)

CREATE INDEX IF NOT EXISTS sync_events_record ON sync_events (scope, key, id)

ALTER TABLE metrics ADD COLUMN sum REAL NOT NULL DEFAULT 0
"""


def _v2(conn: sqlite3.Connection) -> None:
    """Mission log (missions, tool_calls, decisions, playbook_runs), sync_events, metrics.sum."""
    _execute_script(conn, _V2)


# v3: the memory table becomes a rowid table with a UNIQUE (scope, key) index instead of
# a WITHOUT ROWID table keyed by (scope, key). Its rows carry a whole envelope (~600 bytes
# for a 500-byte value), so a WITHOUT ROWID leaf holds about six of them: random keys
# split leaves constantly, and every commit rewrites those pages in the WAL. Measured on
# 100k rows with random keys (bare SQL, same journal): 37 -> 30 WAL frames and 535 -> 344
# us CPU per 5-record commit, 1998 -> 957 frames and 29 -> 16 ms per 500-record commit,
# primary-key lookups unchanged (7.5 us). SQLite's own advice: WITHOUT ROWID suits rows
# under about a twentieth of a page.
_V3 = """
CREATE TABLE memory_v3 (
    id          INTEGER PRIMARY KEY,
    scope       TEXT    NOT NULL,
    key         TEXT    NOT NULL,
    level       INTEGER NOT NULL CHECK (level BETWEEN 1 AND 5),
    owner       TEXT    NOT NULL,
    envelope    BLOB,               -- NULL: tombstone of a delete, kept for tombstone_ttl
    sid         INTEGER NOT NULL,   -- stream id as an integer: the upsert guard
    stream_id   TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    expires_at  INTEGER,
    UNIQUE (scope, key)
)

INSERT INTO memory_v3 (scope, key, level, owner, envelope, sid, stream_id, created_at,
                       updated_at, expires_at)
SELECT scope, key, level, owner, envelope, sid, stream_id, created_at, updated_at, expires_at
FROM memory ORDER BY scope, key

DROP TABLE memory

ALTER TABLE memory_v3 RENAME TO memory

CREATE INDEX memory_expires ON memory (expires_at) WHERE expires_at IS NOT NULL

CREATE INDEX memory_tombstones ON memory (updated_at) WHERE envelope IS NULL

CREATE INDEX memory_updated ON memory (scope, updated_at)
"""


def _v3(conn: sqlite3.Connection) -> None:
    """The memory table as a rowid table with a UNIQUE (scope, key) index (see above)."""
    _execute_script(conn, _V3)


# v4: ordering ids (``sid`` columns) become 16-byte BLOBs, a stream id's ms and seq as two
# big-endian 64-bit numbers (``dualmem.commands.sid_of``), instead of ``ms << 22 | seq`` in
# one integer: that packing refused every command past 4,194,303 in one millisecond (Redis
# counts seq up while its clock is behind the stream) and ran out in September 2039. The
# columns keep their INTEGER affinity, which stores a BLOB as it is; SQLite compares BLOBs
# with memcmp, so the guards (``excluded.sid > memory.sid``) keep their meaning, and the
# projection's placeholder rows keep the integer 0, below every BLOB. Journal rows keep
# their chain hashes: a sid is hashed in its old integer form while it fits
# (``sid_hash_text``). Every sid is rewritten once, in one transaction.
_SID_TABLES = ("memory", "journal", "missions", "tool_calls", "decisions", "playbook_runs")


def _v4(conn: sqlite3.Connection) -> None:
    """Ordering ids as 16-byte BLOBs (see above); dead letters remember their replay;
    mission deletes are kept for good."""
    from dualmem.commands import legacy_sid

    conn.create_function("dm_legacy_sid", 1, legacy_sid, deterministic=True)
    for table in _SID_TABLES:
        conn.execute(
            f"UPDATE {table} SET sid = dm_legacy_sid(sid) WHERE typeof(sid) = 'integer' AND sid > 0"
        )
    # The stream id a dead letter was replayed under, so sync() on the original receipt
    # follows it (an audit event's replay has no journal row to be found by).
    conn.execute("ALTER TABLE dead_letters ADD COLUMN replayed_as TEXT")
    # The newest delete of each mission, kept for good: the projection refuses anything
    # of that mission older than it (see dualmem.projection). Until now the record's
    # tombstone in `memory` said so, and purge removed it after tombstone_ttl.
    conn.execute(
        """CREATE TABLE mission_deletes (
               scope      TEXT NOT NULL,
               mission_id TEXT NOT NULL,
               sid        BLOB NOT NULL,
               PRIMARY KEY (scope, mission_id)
           )"""
    )
    conn.execute(
        """INSERT INTO mission_deletes (scope, mission_id, sid)
           SELECT scope, substr(key, 13), sid FROM memory
           WHERE envelope IS NULL AND key LIKE '\\_dm/mission/%' ESCAPE '\\'
             AND level IN (3, 4)"""
    )
    # Records not projected yet (written by hand under schema 1, or a child written after
    # its mission's delete under schema 3) are projected by v5, whose statements this
    # code plans: they name v5's keys, which these tables do not have yet.


def _project_existing(conn: sqlite3.Connection) -> None:
    """Project every live mission-log record that is not yet: a file from schema 1 held
    such records (written by hand: v1 had no MissionLog) and v2 created the tables empty.
    Projected ones are left as they are (the statements only ever move a row forward)."""
    from acl.levels import Level
    from dualmem.commands import OP_PUT, Command, MalformedCommand
    from dualmem.projection import plan_projection

    rows = conn.execute(
        """SELECT scope, key, level, owner, envelope, sid, expires_at FROM memory
           WHERE key LIKE '\\_dm/%' ESCAPE '\\' AND level IN (3, 4)
             AND envelope IS NOT NULL"""
    )
    for scope, key, level, owner, envelope, sid, expires_at in rows:  # row by row
        cmd = Command(OP_PUT, scope, key, Level(level), owner, 0, bytes(envelope), expires_at)
        try:
            statements = plan_projection(cmd, bytes(sid))
        except MalformedCommand:
            continue  # not a record of its kind: verify names it, as it did before
        for sql, params in statements:
            conn.execute(sql, params)


# v5: a mission's child rows (tool calls, decisions, playbook runs) are keyed by scope,
# mission and id, as their records are (``_dm/tool_call/<mission>/<id>``). Keyed by scope
# and id alone, a record that reused an id under another mission took the first one's
# row over, and a delete of either removed the row the other still had. Each table is
# rebuilt with the new key (its rows are copied as they are), then every live record is
# projected again: the rows such a reuse had taken over come back.
_V5_TABLES = {
    "tool_calls": (
        "call_id",
        """
    tool_name    TEXT    NOT NULL,
    args         TEXT    NOT NULL CHECK (json_valid(args)),
    result       TEXT    NOT NULL CHECK (json_valid(result)),
    duration_ms  REAL    NOT NULL CHECK (duration_ms >= 0),
    success      INTEGER NOT NULL CHECK (success IN (0, 1)),
    error        TEXT,
    called_at    INTEGER NOT NULL,""",
        [
            "CREATE INDEX tool_calls_mission ON tool_calls (scope, mission_id, called_at, call_id)",
            "CREATE INDEX tool_calls_success "
            "ON tool_calls (scope, mission_id, success, called_at, call_id)",
        ],
    ),
    "decisions": (
        "decision_id",
        """
    decision_type TEXT    NOT NULL,
    rationale     TEXT    NOT NULL,
    agent_name    TEXT    NOT NULL,
    decided_at    INTEGER NOT NULL,""",
        [
            "CREATE INDEX decisions_mission "
            "ON decisions (scope, mission_id, decided_at, decision_id)"
        ],
    ),
    "playbook_runs": (
        "run_id",
        """
    playbook_name TEXT    NOT NULL,
    phase         TEXT    NOT NULL,
    started_at    INTEGER NOT NULL,
    completed_at  INTEGER,
    success       INTEGER NOT NULL CHECK (success IN (0, 1)),""",
        [
            "CREATE INDEX playbook_runs_mission "
            "ON playbook_runs (scope, mission_id, started_at, run_id)"
        ],
    ),
}


def _v5(conn: sqlite3.Connection) -> None:
    """Mission child rows keyed by ``(scope, mission_id, id)`` (see above)."""
    for table, (id_col, columns, indexes) in _V5_TABLES.items():
        conn.execute(
            f"""CREATE TABLE {table}_v5 (
    scope        TEXT    NOT NULL,
    mission_id   TEXT    NOT NULL,
    {id_col}     TEXT    NOT NULL,{columns}
    actor        TEXT    NOT NULL,
    sid          BLOB    NOT NULL,
    PRIMARY KEY (scope, mission_id, {id_col}),
    FOREIGN KEY (scope, mission_id) REFERENCES missions (scope, mission_id) ON DELETE CASCADE
)"""
        )
        names = [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
        listed = ", ".join(names)
        # A row whose mission row is gone (edited out by hand: verify's foreign key check
        # names it) would fail the new table's foreign key and with it the migration, so
        # the file could not be opened any more. It is left behind; if its record is live,
        # the projection below writes it again, under a placeholder mission.
        conn.execute(
            f"INSERT INTO {table}_v5 ({listed}) SELECT {listed} FROM {table} AS t "
            "WHERE EXISTS (SELECT 1 FROM missions AS m "
            "WHERE m.scope = t.scope AND m.mission_id = t.mission_id)"
        )
        conn.execute(f"DROP TABLE {table}")
        conn.execute(f"ALTER TABLE {table}_v5 RENAME TO {table}")
        for sql in indexes:
            conn.execute(sql)
    _project_existing(conn)


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_v1, _v2, _v3, _v4, _v5]
SCHEMA_VERSION = len(MIGRATIONS)


#: Why a negative ``user_version`` is refused: no dualmem writes one, and taken for an
#: older schema, ``MIGRATIONS[-1]`` ran as "version 0" and failed half-way (duplicate
#: column), leaving the newest tables labelled schema 1.
NEGATIVE_SCHEMA = (
    "is no version dualmem writes (a damaged header or an edit); restore a backup "
    "(`dualmem backup`'s copy, or migrate's .bak)"
)


def schema_version(conn: sqlite3.Connection) -> int:
    """The database's ``user_version``."""
    row = conn.execute("PRAGMA user_version").fetchone()
    return int(row[0])


def migrate(conn: sqlite3.Connection, target: int = SCHEMA_VERSION) -> list[int]:
    """Apply missing migrations up to ``target``, each in its own transaction.

    Returns the versions applied. A database newer than this code is refused: old code
    writing into a schema it does not know is how data gets corrupted quietly.
    """
    current = schema_version(conn)
    if current < 0:
        raise ConfigurationError(f"database schema version {current} {NEGATIVE_SCHEMA}")
    if current > SCHEMA_VERSION:
        raise ConfigurationError(
            f"database schema version {current} is newer than this dualmem supports "
            f"({SCHEMA_VERSION}); upgrade dualmem to open it"
        )
    if target < current:
        raise ConfigurationError(
            f"refusing to downgrade the schema from version {current} to {target}"
        )
    if current == 0:
        # auto_vacuum only takes effect before the first table exists; INCREMENTAL lets
        # `dualmem purge` hand free pages back to the file system without a full VACUUM.
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
    applied: list[int] = []
    for version in range(current + 1, target + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Another process may have migrated meanwhile; re-check under the write lock.
            if schema_version(conn) < version:
                MIGRATIONS[version - 1](conn)
                conn.execute(f"PRAGMA user_version = {int(version)}")
                applied.append(version)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return applied
