"""``dualmem migrate`` on a database FILE written by the core's first schema
(tests/data/schema_v1.db, see make_schema_v1.py): dry run, backup first, data intact and
readable afterwards, idempotent, no downgrades, newer databases refused."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from acl import ConfigurationError, Keyring, Level, Principal
from dualmem import DualMemory
from dualmem.commands import legacy_sid, stream_id_of
from dualmem.migrations import SCHEMA_VERSION
from dualmem.missions import MissionLog

from .conftest import run_cli
from .data.make_schema_v1 import FIXTURE_KEY_ID, FIXTURE_SECRET

FIXTURE = Path(__file__).parent / "data" / "schema_v1.db"
CODER = Principal(agent_id="coder-1", team="backend", swarm="phase-1-auth", project="shop")
SYSTEM = Principal(agent_id="orchestrator", system=True)


@pytest.fixture
def v1(tmp_path: Path) -> Path:
    db = tmp_path / "old.db"
    shutil.copyfile(FIXTURE, db)
    return db


def user_version(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])


def tables(db: Path) -> set[str]:
    with sqlite3.connect(db) as conn:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_schema WHERE type='table'")}


def test_the_fixture_really_is_the_first_schema() -> None:
    assert user_version(FIXTURE) == 1
    assert "missions" not in tables(FIXTURE)
    assert FIXTURE.stat().st_size < 100_000


def test_dry_run_changes_nothing(v1: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = v1.read_bytes()
    code, out, _ = run_cli(capsys, "migrate", "--db", str(v1), "--dry-run")
    assert code == 0
    assert "would migrate" in out and f"schema 1 -> {SCHEMA_VERSION}" in out
    assert "Mission log" in out and "rowid table" in out
    assert "dry run: nothing was changed" in out
    assert v1.read_bytes() == before
    assert list(v1.parent.glob("*.bak")) == []
    # Its table calls every step planned, none applied (a table that called them all
    # applied failed nothing); the migration then calls them applied, and a file already
    # current is named with its schema, nothing to do.
    states = [r.split("│")[3].strip() for r in out.splitlines() if r.startswith("│ ")]
    assert len(states) > 1 and set(states) - {""} == {"planned"}, out
    code, out, _ = run_cli(capsys, "migrate", "--db", str(v1))
    states = [r.split("│")[3].strip() for r in out.splitlines() if r.startswith("│ ")]
    assert code == 0 and len(states) > 1 and set(states) - {""} == {"applied"}, out
    code, out, _ = run_cli(capsys, "migrate", "--db", str(v1))
    assert code == 0 and f"is at schema {SCHEMA_VERSION}: nothing to do" in out, out


MEMORY_COLUMNS = (
    "scope, key, level, owner, envelope, sid, stream_id, created_at, updated_at, expires_at"
)


def plant_project_record(db: Path, key: str, value: object) -> None:
    """A record at level 4 written into the file by hand (stream id 5-1, schema 1's sid)."""
    from acl import Codec

    env = Codec(None).seal(value, scope="project:shop", key=key, level=Level.PROJECT)
    with sqlite3.connect(db) as conn:
        conn.execute(
            f"INSERT INTO memory ({MEMORY_COLUMNS}) VALUES (?, ?, 4, 'lead', ?, ?, ?, 5, 5, NULL)",
            ("project:shop", key, env, (5 << 22) | 1, "5-1"),
        )
    conn.close()


def memory_rows(db: Path) -> list[tuple[object, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(f"SELECT {MEMORY_COLUMNS} FROM memory ORDER BY scope, key").fetchall()


def test_migrating_the_first_schema_keeps_every_record(
    v1: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows_before = memory_rows(v1)
    assert any(r[4] is None for r in rows_before)  # a tombstone comes through too
    code, out, _ = run_cli(capsys, "migrate", "--db", str(v1))
    assert code == 0, out
    assert "migrated" in out and "applied" in out
    assert user_version(v1) == SCHEMA_VERSION
    assert {"missions", "tool_calls", "decisions", "playbook_runs", "sync_events"} <= tables(v1)
    # v3 rebuilt memory as a rowid table, (scope, key) still unique, every row the same;
    # v4 turned each integer sid into the 16-byte ordering id of the same stream id.
    assert memory_rows(v1) == [(*r[:5], legacy_sid(r[5]), *r[6:]) for r in rows_before]
    assert all(stream_id_of(r[5]) == r[6] for r in memory_rows(v1))
    with sqlite3.connect(v1) as conn:
        (sql,) = conn.execute("SELECT sql FROM sqlite_schema WHERE name = 'memory'").fetchone()
        assert "WITHOUT ROWID" not in sql and "UNIQUE (scope, key)" in sql
        indexes = {r[1] for r in conn.execute("PRAGMA index_list(memory)")}
        assert {"memory_expires", "memory_tombstones", "memory_updated"} <= indexes
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute(
                f"INSERT INTO memory ({MEMORY_COLUMNS}) SELECT {MEMORY_COLUMNS} FROM memory LIMIT 1"
            )
    # The backup came first, holds the old schema, and was verified.
    (backup,) = v1.parent.glob("old.db.v1-*.bak")
    assert user_version(backup) == 1 and "verified" in out
    # Every record of the old file opens with its old key: envelopes came through untouched.
    ring = Keyring.from_secret(FIXTURE_SECRET, key_id=FIXTURE_KEY_ID)
    with DualMemory(redis_url="memory://migrated", db_path=str(v1), keyring=ring) as mem:
        get = mem.get
        assert get("confidence/auth/1", level=Level.PRIVATE, principal=CODER) == {
            "confidence": 0.85
        }
        assert get("plan/auth", level=Level.TEAM, principal=CODER)["steps"] == ["login", "tokens"]
        assert get("spec/login", level=Level.PROJECT, principal=CODER) == {
            "text": "é ünïcode ✓",
            "n": 2,
        }
        assert get("config/limits", level=Level.SYSTEM, principal=SYSTEM) == {"max_agents": 12}
        assert get("scratch/tmp", level=Level.SWARM, principal=CODER) is None  # deleted
        assert len(mem.history("spec/login", level=Level.PROJECT, principal=CODER)) == 2
        # The new tables work on the migrated file.
        log = MissionLog(mem, CODER)
        mem.sync(log.start_mission("after-upgrade", "p"), timeout=10)
        assert log.get_mission("after-upgrade") is not None
    code, out, _ = run_cli(capsys, "verify", "--db", str(v1), "--no-redis")
    assert code == 0, out


def test_the_plan_names_each_step_by_its_own_migration_and_the_backup_shows_progress(
    v1: Path,
) -> None:
    # The dry run's text was only searched for two phrases, which every step list had
    # whichever migration each version was paired with: a plan one off said schema 3 adds
    # the mission log. And no test failed when migrate drew no progress for its backup.
    from dualmem.ops.maintenance import migrate_database, plan_migration

    steps = dict(plan_migration(v1).steps)
    assert sorted(steps) == list(range(2, SCHEMA_VERSION + 1))
    assert steps[2].startswith("Mission log") and steps[3].startswith("The memory table")
    assert steps[4].startswith("Ordering ids") and steps[5].startswith("Mission child rows")
    seen: list[tuple[str, int, int | None]] = []
    plan = migrate_database(v1, progress=lambda *event: seen.append(event))
    assert plan.backup is not None and plan.applied == list(range(2, SCHEMA_VERSION + 1))
    assert seen and seen[-1] == ("backup", plan.backup.pages, plan.backup.pages)


def test_a_file_one_schema_off_is_refused_by_the_commands_that_need_this_schema(
    v1: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Refusals were tried with the first schema (four behind) and schema 99 only: a check
    # one off let purge work on a file one schema behind (tables this code's purge does
    # not know), and export and purge read a file one schema ahead as if it were theirs.
    assert run_cli(capsys, "migrate", "--db", str(v1), "--to", str(SCHEMA_VERSION - 1))[0] == 0
    code, _, err = run_cli(capsys, "purge", "--db", str(v1))
    assert code == 2 and "run `dualmem migrate" in err, err
    assert run_cli(capsys, "migrate", "--db", str(v1))[0] == 0
    with sqlite3.connect(v1) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    out = tmp_path / "out.jsonl"
    for argv in (["purge"], ["export", "--out", str(out)]):
        code, _, err = run_cli(capsys, *argv, "--db", str(v1), "--redis-url", "memory://newer")
        assert code == 2 and "newer than this dualmem supports" in err, (argv, err)
    assert user_version(v1) == SCHEMA_VERSION + 1 and not out.exists()


def test_an_operator_command_opens_the_file_read_only_unless_it_writes(v1: Path) -> None:
    # verify, export and backup look at a file of any version through this, and it
    # promises to change nothing: no test failed with query_only dropped.
    from dualmem.ops.database import open_database

    with open_database(v1) as conn, pytest.raises(sqlite3.OperationalError, match="readonly"):
        conn.execute("CREATE TABLE test_written (x)")
    with open_database(v1, write=True) as conn:
        conn.execute("CREATE TABLE test_written (x)")
    assert "test_written" in tables(v1) and user_version(v1) == 1


def test_verify_fails_an_older_schema_and_says_to_migrate(
    v1: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # An unmigrated file is not healthy for this dualmem (its worker would refuse it), so
    # verify fails it with the fix; it reads the file without migrating it.
    code, out, _ = run_cli(capsys, "verify", "--db", str(v1), "--no-redis", "--json")
    assert code == 1
    checks = {c["name"]: c for c in json.loads(out)["checks"]}
    schema = checks["schema version"]
    assert schema["problems"] == [f"schema 1 is older than this dualmem ({SCHEMA_VERSION})"]
    assert "dualmem migrate" in schema["fix"]
    assert user_version(v1) == 1


def test_migrate_is_idempotent(v1: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(capsys, "migrate", "--db", str(v1))[0] == 0
    after = v1.read_bytes()
    code, out, _ = run_cli(capsys, "migrate", "--db", str(v1))
    assert code == 0 and "nothing to do" in out
    assert v1.read_bytes() == after
    assert len(list(v1.parent.glob("*.bak"))) == 1  # no second backup


def test_downgrades_unknown_targets_and_newer_databases_are_refused(
    v1: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(capsys, "migrate", "--db", str(v1))[0] == 0
    code, _, err = run_cli(capsys, "migrate", "--db", str(v1), "--to", "1")
    assert code == 2 and "refusing to downgrade" in err
    # Each bound just past it: `--to 6` (one past) crashed on a missing migration, `--to 0`
    # and a file one schema newer said "refusing to downgrade ... restore a backup", when
    # --to 7 and schema 99 were the only ones tried.
    for to in (SCHEMA_VERSION + 1, 0, SCHEMA_VERSION + 2):
        code, _, err = run_cli(capsys, "migrate", "--db", str(v1), "--to", str(to))
        assert code == 2 and "--to must be between 1 and" in err, (to, err)
    for newer in (SCHEMA_VERSION + 1, 99):
        with sqlite3.connect(v1) as conn:
            conn.execute(f"PRAGMA user_version = {newer}")
        conn.close()
        code, _, err = run_cli(capsys, "migrate", "--db", str(v1))
        assert code == 2 and "newer than this dualmem" in err, (newer, err)
        assert user_version(v1) == newer


def test_a_negative_schema_version_is_refused_and_the_file_left_as_it_is(
    v1: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # No dualmem writes a negative user_version (a hand edit, a damaged header). migrate
    # took it for an older schema: MIGRATIONS[-1] ran as "version 0", failed half-way
    # (duplicate column) and left schema-5 tables labelled schema 1; opening the file
    # did the same.
    assert run_cli(capsys, "migrate", "--db", str(v1))[0] == 0
    with sqlite3.connect(v1) as conn:
        conn.execute("PRAGMA user_version = -1")
    before = tables(v1)
    code, _, err = run_cli(capsys, "migrate", "--db", str(v1))
    assert code == 2 and "schema version -1 is no version dualmem writes" in err, err
    Keyring.generate().save(tmp_path / "keys.json")
    with pytest.raises(ConfigurationError, match="schema version -1 is no version"):
        DualMemory(db_path=str(v1), keyring=str(tmp_path / "keys.json"))
    assert user_version(v1) == -1 and tables(v1) == before
    assert not list(tmp_path.glob("old.db.v-1-*"))  # refused before its backup, too


def test_migrating_to_an_explicit_version_and_a_missing_file(
    v1: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(capsys, "migrate", "--db", str(v1), "--to", "1")
    assert code == 0 and "nothing to do" in out
    dest = tmp_path / "before-upgrade.db"
    code, out, _ = run_cli(capsys, "migrate", "--db", str(v1), "--to", "2", "--backup", str(dest))
    assert code == 0 and user_version(dest) == 1 and user_version(v1) == 2
    code, _, err = run_cli(capsys, "migrate", "--db", str(tmp_path / "missing.db"))
    assert code == 2 and "no database at" in err


def test_migrate_to_an_existing_backup_file_names_no_option_migrate_lacks(
    v1: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The message came from `backup` and said "or --force": migrate has no --force.
    taken = tmp_path / "old.bak"
    taken.write_text("keep me")
    code, _, err = run_cli(capsys, "migrate", "--db", str(v1), "--backup", str(taken))
    assert code == 2 and "already exists" in err and "--backup" in err
    assert "--force" not in err
    assert taken.read_text() == "keep me" and user_version(v1) == 1


def test_mission_log_records_of_a_first_schema_file_are_projected_by_the_migration(
    v1: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Schema 2 created the mission tables empty: a `_dm/` record written before (by hand,
    # as v1 had no MissionLog) stayed unprojected, and verify failed after the upgrade.
    value = {
        "mission_id": "legacy",
        "phase": "p",
        "status": "in_progress",
        "metadata": {},
        "started_at": 5,
        "updated_at": 5,
        "completed_at": None,
    }
    plant_project_record(v1, "_dm/mission/legacy", value)
    assert run_cli(capsys, "migrate", "--db", str(v1))[0] == 0
    with sqlite3.connect(v1) as conn:
        assert conn.execute("SELECT mission_id, status FROM missions").fetchall() == [
            ("legacy", "in_progress")
        ]
    conn.close()
    code, out, _ = run_cli(capsys, "verify", "--db", str(v1), "--no-redis")
    assert code == 0, out


def test_a_schema_3_mission_delete_is_kept_for_good_by_the_migration(
    v1: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Schema 4 moved a deleted mission's mark from its tombstone (which purge removes)
    # to mission_deletes: a mark not carried over, or carried under a wrong mission id,
    # let a late older put revive the mission after the upgrade. Only the projected
    # levels have marks; a placeholder mission (sid 0) stays below every stream id.
    assert run_cli(capsys, "migrate", "--db", str(v1), "--to", "3")[0] == 0
    gone = (7 << 22) | 2
    with sqlite3.connect(v1) as conn:
        for scope, key, level in (
            ("project:shop", "_dm/mission/gone", 4),
            ("agent:coder-1", "_dm/mission/secret", 1),
        ):
            conn.execute(
                f"INSERT INTO memory ({MEMORY_COLUMNS}) "
                "VALUES (?, ?, ?, 'lead', NULL, ?, ?, 7, 7, NULL)",
                (scope, key, level, gone, "7-2"),
            )
        conn.execute(
            "INSERT INTO missions (scope, mission_id, level, phase, status, started_at, "
            "updated_at, actor, sid) VALUES ('project:shop', 'early', 4, '', 'pending', 0, 0, "
            "'', 0)"
        )
    conn.close()
    assert run_cli(capsys, "migrate", "--db", str(v1))[0] == 0
    with sqlite3.connect(v1) as conn:
        marks = conn.execute("SELECT scope, mission_id, sid FROM mission_deletes").fetchall()
        placeholder = conn.execute(
            "SELECT typeof(sid), sid FROM missions WHERE mission_id = 'early'"
        ).fetchone()
    conn.close()
    assert marks == [("project:shop", "gone", legacy_sid(gone))]
    assert placeholder == ("integer", 0)


def test_a_mission_record_that_does_not_parse_does_not_stop_the_migration(
    v1: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The migration projects every mission-log record written before: one that is not a
    # record of its kind is left as it is (verify names it), not a migration that fails
    # and a file that no dualmem can open any more.
    key = "_dm/tool_call/m1/c1"
    plant_project_record(v1, key, {"junk": True})
    assert run_cli(capsys, "migrate", "--db", str(v1))[0] == 0
    assert user_version(v1) == SCHEMA_VERSION
    with sqlite3.connect(v1) as conn:
        assert conn.execute("SELECT count(*) FROM memory WHERE key = ?", (key,)).fetchone() == (1,)
        assert conn.execute("SELECT count(*) FROM tool_calls").fetchone() == (0,)
    conn.close()


def test_a_migration_that_fails_leaves_the_file_at_its_version(
    v1: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each migration is one transaction: a failure half-way rolls back what it did, and
    # the version stays where it was, so the next attempt starts from the same state.
    from dualmem import migrations

    def half_way(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE half_way (x)")
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(migrations, "MIGRATIONS", [migrations.MIGRATIONS[0], half_way])
    conn = sqlite3.connect(v1, isolation_level=None)
    try:
        with pytest.raises(sqlite3.OperationalError, match="disk I/O"):
            migrations.migrate(conn)
    finally:
        conn.close()
    assert user_version(v1) == 1 and "half_way" not in tables(v1)


def test_a_migration_another_process_made_meanwhile_is_not_made_again(
    v1: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two processes opened the same old file: the second read version 1, waited for the
    # write lock while the first migrated, and must look again under the lock (schema 4's
    # ALTER TABLE run twice fails: "duplicate column name").
    from dualmem import migrations

    conn = sqlite3.connect(v1, isolation_level=None)
    try:
        assert migrations.migrate(conn) == list(range(2, SCHEMA_VERSION + 1))
        real = migrations.schema_version
        reads = iter([1])  # the first look, before the other process migrated

        def stale_first(c: sqlite3.Connection) -> int:
            return next(reads, None) or real(c)

        monkeypatch.setattr(migrations, "schema_version", stale_first)
        assert migrations.migrate(conn) == []
    finally:
        conn.close()
    assert user_version(v1) == SCHEMA_VERSION


def test_a_new_database_reclaims_space_incrementally_and_refuses_a_one_step_downgrade(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # auto_vacuum takes effect only before the first table: `purge` can give pages back
    # to the file system (incremental_vacuum) only if the first migration set it. Both
    # the store and migrate() itself (which any connection may call) see to it, and
    # both the command and migrate() refuse to go back even one version.
    from acl.errors import ConfigurationError
    from dualmem import migrations
    from dualmem.sqlite_store import SQLiteStore

    SQLiteStore(tmp_path / "store.db").close()
    conn = sqlite3.connect(tmp_path / "bare.db", isolation_level=None)
    try:
        migrations.migrate(conn)
        with pytest.raises(ConfigurationError, match="refusing to downgrade"):
            migrations.migrate(conn, SCHEMA_VERSION - 1)
    finally:
        conn.close()
    for name in ("store.db", "bare.db"):
        with sqlite3.connect(tmp_path / name) as check:
            assert check.execute("PRAGMA auto_vacuum").fetchone() == (2,), name  # INCREMENTAL
        check.close()
    db = str(tmp_path / "store.db")
    code, _, err = run_cli(capsys, "migrate", "--db", db, "--to", str(SCHEMA_VERSION - 1))
    assert code == 2 and "refusing to downgrade" in err
