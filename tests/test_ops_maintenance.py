"""``dualmem backup``, ``purge``, ``dlq``, ``doctor``, ``metrics`` and ``stats``, with bad
input for each; storage tests on fakeredis and a real redis-server."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from acl import Level, Principal
from dualmem import DualMemory, NotPersisted
from dualmem.commands import audit_fields, put_fields
from dualmem.layout import Layout
from dualmem.migrations import SCHEMA_VERSION, migrate
from dualmem.ops.exporter import Exporter, start_server
from dualmem.settings import Settings
from dualmem.store import StreamEntry

from .conftest import (
    RedisServer,
    free_port,
    partial_left_by_a_kill,
    record_file_calls,
    record_runtime_waits,
    redis_fields,
    run_cli,
    wait_until,
    worker_of,
)

CODER = Principal(agent_id="coder-1", team="backend", swarm="s1", project="shop")
FIXTURE = Path(__file__).parent / "data" / "schema_v1.db"


@pytest.fixture
def args(redis_url: str, db_path: Path, keyfile: Path) -> list[str]:
    return ["--redis-url", redis_url, "--db", str(db_path), "--keyring", str(keyfile)]


def count(db: Path, table: str, where: str = "1") -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute(f"SELECT count(*) FROM {table} WHERE {where}").fetchone()[0])


# -- backup -------------------------------------------------------------------------------


def test_backup_while_the_worker_writes_is_a_verified_snapshot(
    mem: DualMemory,
    args: list[str],
    db_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for r in [mem.put(f"pre{i}", "x" * 300, level=Level.TEAM, principal=CODER) for i in range(300)]:
        mem.sync(r, timeout=10)
    # Thousands of pages: a backup copied in steps restarted from page 1 at every commit
    # of the worker in between, and never finished while puts kept coming.
    with sqlite3.connect(db_path) as conn:
        conn.execute("CREATE TABLE test_padding (b BLOB)")
        conn.executemany("INSERT INTO test_padding VALUES (zeroblob(65536))", [()] * 300)
    conn.close()
    stop = threading.Event()
    deadline = time.monotonic() + 30

    def write() -> None:
        i = 0
        while not stop.is_set() and time.monotonic() < deadline:
            mem.put(f"during{i}", {"i": i}, level=Level.SWARM, principal=CODER)
            i += 1
            time.sleep(0.001)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        dest = tmp_path / "backups" / "copy.db"
        dest.parent.mkdir()
        code, out, _ = run_cli(capsys, "backup", *args, str(dest))
        finished_while_writing = writer.is_alive()
    finally:
        stop.set()
        writer.join()
    assert finished_while_writing
    assert code == 0, out
    assert "journal hash chain" in out and "schema version" in out
    assert not Path(f"{dest}-wal").exists()  # one self-contained file
    with sqlite3.connect(dest) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    assert count(dest, "memory") >= 300
    assert [p.name for p in dest.parent.iterdir()] == ["copy.db"]  # no partial files left
    # Only its owner can read it, whatever the umask (it was 0644 under umask 022).
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    code, out, _ = run_cli(capsys, "verify", "--db", str(dest), "--no-redis")
    assert code == 0, out


def test_backup_refuses_bad_destinations_and_a_damaged_source(
    mem: DualMemory,
    args: list[str],
    db_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    mem.sync(mem.put("k", 1, level=Level.SWARM, principal=CODER))
    taken = tmp_path / "taken.db"
    taken.write_text("keep me")
    code, _, err = run_cli(capsys, "backup", *args, str(taken))
    assert code == 2 and "already exists" in err and taken.read_text() == "keep me"
    code, _, err = run_cli(capsys, "backup", *args, str(tmp_path / "no" / "such" / "dir.db"))
    assert code == 2 and "does not exist" in err
    code, _, err = run_cli(
        capsys, "backup", "--db", str(tmp_path / "none.db"), str(tmp_path / "b.db")
    )
    assert code == 2 and "no database at" in err
    with sqlite3.connect(db_path) as conn:
        conn.execute("UPDATE journal SET key = 'forged'")
    code, _, err = run_cli(capsys, "backup", *args, str(tmp_path / "b.db"))
    assert code == 2 and "failed verification" in err
    assert not (tmp_path / "b.db").exists()


def test_backup_with_force_replaces_an_existing_file(
    mem: DualMemory, args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # No test failed when --force was parsed and not passed on (a backup over the last
    # one refused): every test of --force was one that must refuse.
    mem.sync(mem.put("k", 1, level=Level.SWARM, principal=CODER))
    dest = tmp_path / "nightly.db"
    dest.write_text("last night's copy")
    code, out, err = run_cli(capsys, "backup", *args, str(dest), "--force")
    assert code == 0, out + err
    assert count(dest, "memory") == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("nightly")] == ["nightly.db"]
    # It prints the rows of every counted table (only the first, memory's, failed nothing).
    for table in ("memory", "journal", "audit_log", "dead_letters", "missions", "tool_calls"):
        n = count(dest, table)
        assert re.search(rf"rows in {table}\s*│\s*{n}\s*│", out), (table, out)


def _damage(db_path: Path, kind: str) -> None:
    """Break ``db_path`` in a way only one of the copy's checks finds."""
    with contextlib.closing(sqlite3.connect(db_path)) as conn, conn:
        if kind == "audit_log hash chain":
            conn.execute(
                "INSERT INTO audit_log (ts, event, actor, risk, prev_hash, hash) "
                "VALUES (1, 'forged', 'x', 'low', x'00', x'00')"
            )
        elif kind == "foreign_key_check":
            conn.execute(
                "INSERT INTO tool_calls (scope, call_id, mission_id, tool_name, args, result, "
                "duration_ms, success, called_at, actor, sid) "
                "VALUES ('project:shop', 'c1', 'no-such-mission', 't', '{}', '{}', 0, 1, 1, 'x', 1)"
            )
        else:  # an index whose definition no longer matches its entries
            conn.execute("CREATE TABLE test_t (a, b)")
            conn.execute("CREATE INDEX test_i ON test_t (a)")
            conn.executemany("INSERT INTO test_t VALUES (?, ?)", [(i, -i) for i in range(10)])
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        if kind == "integrity_check":
            conn.execute("PRAGMA writable_schema = ON")
            conn.execute(
                "UPDATE sqlite_schema SET sql = 'CREATE INDEX test_i ON test_t (b)' "
                "WHERE name = 'test_i'"
            )
            conn.commit()


@pytest.mark.parametrize("kind", ["audit_log hash chain", "foreign_key_check", "integrity_check"])
def test_a_backup_whose_copy_fails_any_check_leaves_no_file(
    mem: DualMemory,
    args: list[str],
    db_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    kind: str,
) -> None:
    # Only a forged journal was tried: no test failed when the copy's audit chain, foreign
    # keys or integrity went unchecked, nor when a failed copy's partial file was left.
    mem.sync(mem.put("k", 1, level=Level.SWARM, principal=CODER))
    mem.close(timeout=2)
    _damage(db_path, kind)
    dest = tmp_path / "backups" / "b.db"
    dest.parent.mkdir()
    code, _, err = run_cli(capsys, "backup", *args, str(dest))
    assert code == 2 and "failed verification" in err and kind in err, err
    assert list(dest.parent.iterdir()) == []


def test_a_backup_appears_complete_fsynced_and_renamed_into_place(
    mem: DualMemory,
    db_path: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No test failed when the copy was not fsynced before its rename, nor the directory
    # after it (a crash could leave an empty or missing "verified" backup), nor when the
    # progress counted the pages left instead of the pages copied.
    from dualmem.ops.backup import backup_database

    mem.sync(mem.put("k", 1, level=Level.SWARM, principal=CODER))
    dest = tmp_path / "backups" / "b.db"
    dest.parent.mkdir()
    events = record_file_calls(monkeypatch)
    seen: list[tuple[int, int | None, bool]] = []
    result = backup_database(
        db_path,
        dest,
        progress=lambda _stage, done, total: seen.append((done, total, dest.exists())),
    )
    assert result.ok and result.bytes == dest.stat().st_size
    # What `dualmem backup` prints from it: no test looked at the file it names, the schema
    # version or the rows it counts (only the memory table's could be counted).
    assert result.dest == dest and result.schema_version == SCHEMA_VERSION
    counted = ("memory", "journal", "audit_log", "dead_letters", "missions", "tool_calls")
    assert result.rows == {t: count(dest, t) for t in counted}
    assert seen and seen[-1] == (result.pages, result.pages, False)  # not there before it is done
    ours = [e for e in events if str(dest.parent) in e[1]]
    (partial,) = {e[1] for e in ours if e[1] != str(dest) and e[1] != str(dest.parent)}
    assert ours == [
        ("fsync", partial),
        ("replace", partial, str(dest)),
        ("fsync", str(dest.parent)),
    ]


def test_a_backup_killed_mid_copy_does_not_stop_the_next_one(
    mem: DualMemory, db_path: Path, tmp_path: Path
) -> None:
    # A backup killed outright (SIGKILL, an OOM kill, a crash) leaves its partial file
    # behind. No test failed when that file's name was the same on every run: every later
    # backup to the same DEST then refused ("cannot create .b.db.partial: File exists"),
    # night after night, until someone found and deleted the hidden file.
    from dualmem.ops.backup import backup_database

    mem.sync(mem.put("k", 1, level=Level.SWARM, principal=CODER))
    dest = tmp_path / "backups" / "b.db"
    dest.parent.mkdir()
    # Killed once the pages are copied, before the copy is checked and renamed.
    script = (
        "import os, signal, sys\n"
        "from dualmem.ops.backup import backup_database\n"
        "backup_database(sys.argv[1], sys.argv[2],\n"
        "                progress=lambda *_: os.kill(os.getpid(), signal.SIGKILL))\n"
    )
    left = partial_left_by_a_kill(script, [str(db_path), str(dest)], dest)
    result = backup_database(db_path, dest)
    assert result.ok and count(dest, "memory") == 1
    assert sorted(p.name for p in dest.parent.iterdir()) == sorted([left.name, "b.db"])


def test_a_backup_to_a_directory_is_refused_with_force_too(
    mem: DualMemory, args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Only refused without --force (as "already exists"); with it, no test looked.
    mem.sync(mem.put("k", 1, level=Level.SWARM, principal=CODER))
    target = tmp_path / "backups"
    target.mkdir()
    code, _, err = run_cli(capsys, "backup", *args, str(target), "--force")
    assert code == 2 and "is a directory" in err, err
    assert list(target.iterdir()) == []


# -- purge --------------------------------------------------------------------------------


def test_purge_drops_expired_values_and_shrinks_the_file(
    make_mem: Callable[..., DualMemory],
    args: list[str],
    db_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    mem = make_mem(purge_interval=3600)  # the worker's own purge stays out of the way
    big = os.urandom(8000).hex()
    rs = [mem.put(f"t{i}", big, level=Level.SWARM, principal=CODER, ttl=0.2) for i in range(100)]
    rs.append(mem.put("kept", 1, level=Level.SWARM, principal=CODER))
    for r in rs:
        mem.sync(r, timeout=10)
    time.sleep(0.3)
    with sqlite3.connect(db_path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    before = db_path.stat().st_size
    code, out, _ = run_cli(capsys, "purge", *args)
    assert code == 0, out
    assert "purged 100 expired value(s)" in out and "auto_vacuum INCREMENTAL" in out
    # The expired keys stay as tombstones (no value) until the tombstone TTL.
    with sqlite3.connect(db_path) as conn:
        live, tombs = conn.execute(
            "SELECT COUNT(envelope), COUNT(*) - COUNT(envelope) FROM memory"
        ).fetchone()
    assert (live, tombs) == (1, 100)
    assert db_path.stat().st_size < before / 2
    assert mem.get("kept", level=Level.SWARM, principal=CODER) == 1


def test_purge_counts_the_tombstone_ttl_in_seconds(
    make_mem: Callable[..., DualMemory],
    args: list[str],
    db_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # No test failed when --tombstone-ttl was taken as milliseconds: every purge test
    # passed 0 or none, and a tombstone a minute old went under --tombstone-ttl 3600.
    mem = make_mem(purge_interval=3600)  # the worker's own purge stays out of the way
    mem.sync(mem.put("k", 1, level=Level.SWARM, principal=CODER))
    mem.sync(mem.delete("k", level=Level.SWARM, principal=CODER))
    with sqlite3.connect(db_path) as conn:
        conn.execute("UPDATE memory SET updated_at = updated_at - 60000 WHERE key = 'k'")
    conn.close()
    code, out, _ = run_cli(capsys, "purge", *args, "--tombstone-ttl", "3600")
    assert code == 0 and "purged 0 expired value(s)" in out, out
    assert count(db_path, "memory") == 1  # the tombstone, a minute into its hour
    code, out, _ = run_cli(capsys, "purge", *args, "--tombstone-ttl", "30")
    assert code == 0 and "purged 1 expired value(s)" in out, out
    assert count(db_path, "memory") == 0


def test_purge_on_an_old_file_converts_it_with_vacuum(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "old.db"
    shutil.copyfile(FIXTURE, db)
    code, _, err = run_cli(capsys, "purge", "--db", str(db))
    assert code == 2 and "run `dualmem migrate" in err  # purge never migrates silently
    assert run_cli(capsys, "migrate", "--db", str(db))[0] == 0
    code, out, _ = run_cli(capsys, "purge", "--db", str(db))
    assert code == 0 and "auto_vacuum NONE" in out and "--vacuum" in out
    with contextlib.closing(sqlite3.connect(db)) as conn:
        free = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
    assert free > 0  # the pages of the table schema 3 rebuilt
    code, out, _ = run_cli(capsys, "purge", "--db", str(db), "--vacuum")
    assert code == 0 and "auto_vacuum INCREMENTAL (converted by VACUUM)" in out
    # The pages the VACUUM gave back are counted (they were reported as 0).
    assert f"freed {free} page(s)" in out, out
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA auto_vacuum").fetchone() == (2,)


def test_purge_goes_on_past_its_first_batch_of_expired_values(
    make_mem: Callable[..., DualMemory],
    args: list[str],
    db_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Every purge test had fewer than one batch (10,000 rows): a purge that stopped after
    # its first batch passed them all.
    make_mem(worker=False).close(timeout=2)  # the database, no worker to purge it
    with contextlib.closing(sqlite3.connect(db_path)) as conn, conn:
        conn.executemany(
            "INSERT INTO memory (scope, key, level, owner, envelope, sid, stream_id, "
            "created_at, updated_at, expires_at) VALUES ('swarm:s1', ?, 3, 'o', x'00', 1, "
            "'0-1', 1, 1, 2)",
            [(f"k{i}",) for i in range(10_001)],
        )
    code, out, _ = run_cli(capsys, "purge", *args)
    assert code == 0, out
    assert count(db_path, "memory") == 0  # each value, then its tombstone (long expired)


def test_purge_gives_back_every_free_page_and_vacuums_only_a_file_that_needs_it(
    make_mem: Callable[..., DualMemory],
    args: list[str],
    db_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Every purge test freed fewer pages than one vacuum batch (2,000): a purge that gave
    # back one batch passed them all; and --vacuum on a file already INCREMENTAL ran a
    # full VACUUM (blocking writers) that nothing needed, reported as a conversion.
    make_mem(worker=False).close(timeout=2)
    with contextlib.closing(sqlite3.connect(db_path)) as conn, conn:
        conn.execute("CREATE TABLE test_padding (b BLOB)")
        conn.executemany("INSERT INTO test_padding VALUES (zeroblob(65536))", [()] * 160)
    with contextlib.closing(sqlite3.connect(db_path)) as conn, conn:
        conn.execute("DROP TABLE test_padding")
        free = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
    assert free > 2_000
    code, out, _ = run_cli(capsys, "purge", *args, "--vacuum")
    assert code == 0, out
    assert f"freed {free} page(s)" in out and "converted by VACUUM" not in out, out
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        assert conn.execute("PRAGMA freelist_count").fetchone() == (0,)


def test_purge_takes_a_floor_or_reads_one_for_the_shards_its_journal_has_seen(
    make_mem: Callable[..., DualMemory], db_path: Path
) -> None:
    # Both were taken, the floor given silently replaced by the one read; and an empty
    # journal was reported as one shard, not none (the docstring's 0).
    from dualmem.ops.maintenance import purge_database

    make_mem(worker=False).close(timeout=2)
    now = int(time.time() * 1000)
    with pytest.raises(ValueError, match="not both"):
        purge_database(
            db_path, now_ms=now, tombstones_before_ms=now, floor=b"", read_floor=lambda n: None
        )
    asked: list[int] = []
    purge_database(
        db_path,
        now_ms=now,
        tombstones_before_ms=now,
        read_floor=asked.append,
    )
    assert asked == [0]


def test_purge_reports_its_progress_and_sizes_and_leaves_no_thread_behind(
    make_mem: Callable[..., DualMemory], db_path: Path
) -> None:
    # No test looked at what purge_database reports while it runs or at the sizes it
    # returns: the progress bar stayed empty (the purge's or the vacuum's calls dropped)
    # or counted the pages left as the pages done; the size before left out the WAL and
    # the size after counted the shared-memory file; and a purge that never closed its
    # store left its checkpoint thread and a connection to the file behind in the caller.
    from dualmem.ops.maintenance import purge_database

    make_mem(worker=False).close(timeout=2)
    # A connection held open keeps the WAL (and its -shm file) while purge runs.
    holder = sqlite3.connect(db_path, isolation_level=None)
    try:
        holder.execute("CREATE TABLE test_padding (b BLOB)")
        holder.executemany("INSERT INTO test_padding VALUES (zeroblob(65536))", [()] * 160)
        holder.execute("DROP TABLE test_padding")
        holder.executemany(
            "INSERT INTO memory (scope, key, level, owner, envelope, sid, stream_id, "
            "created_at, updated_at, expires_at) VALUES ('swarm:s1', ?, 3, 'o', x'00', 1, "
            "'0-1', 1, 1, 2)",
            [(f"k{i}",) for i in range(3)],
        )
        wal = Path(f"{db_path}-wal")
        before = db_path.stat().st_size + wal.stat().st_size
        assert wal.stat().st_size > 0
        checkpointers = sum(t.name == "dualmem-checkpoint" for t in threading.enumerate())
        seen: list[tuple[str, int, int | None]] = []
        now = int(time.time() * 1000)
        r = purge_database(
            db_path,
            now_ms=now,
            tombstones_before_ms=now,
            progress=lambda stage, done, total: seen.append((stage, done, total)),
        )
        assert sum(t.name == "dualmem-checkpoint" for t in threading.enumerate()) == checkpointers
        assert r.rows == 6  # each value, then its tombstone (long expired)
        assert [e for e in seen if e[0] == "purge"][-1] == ("purge", 6, None)
        vacuum = [e for e in seen if e[0] == "vacuum"]
        assert r.freed_pages > 2_000 and len(vacuum) >= 2  # more than one batch
        assert vacuum[-1] == ("vacuum", r.freed_pages, r.freed_pages)
        assert r.bytes_before == before
        assert r.bytes_after == db_path.stat().st_size + wal.stat().st_size
        assert Path(f"{db_path}-shm").exists()  # held open: not counted as the WAL
    finally:
        holder.close()


@pytest.mark.parametrize("backend", ["redis"])  # memory:// holds no other process's commands
def test_purge_keeps_a_tombstone_an_unacknowledged_older_put_needs(
    make_mem: Callable[..., DualMemory],
    args: list[str],
    raw_redis: redis.Redis,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # On the second of two shards, with purge not told --shards 2: the journal says so.
    writer = make_mem(worker=False, shards=2)
    key = next(k for k in (f"k{i}" for i in range(100)) if writer.layout.shard_of("swarm:s1", k))
    stream = writer.layout.stream(1)
    writer.put(key, "old", level=Level.SWARM, principal=CODER)
    raw_redis.xreadgroup(writer.settings.group, "dead", {stream: ">"}, count=1)  # never acked
    writer.delete(key, level=Level.SWARM, principal=CODER)
    worker = worker_of(writer, "w")
    worker._next_claim = time.monotonic() + 3600  # claims nothing
    assert worker.step() == 1  # the delete: a tombstone
    time.sleep(0.01)
    checks = _count_checks(monkeypatch)
    code, out, _ = run_cli(capsys, "purge", *args, "--tombstone-ttl", "0")
    assert code == 0 and "purged 0 expired value(s)" in out, out
    # The journal's shards come from the one read-only open that checks the schema.
    assert checks == {"check_current": 1, "read-only opens": 1}, checks
    assert count(writer.store.path, "memory") == 1  # the tombstone the older put needs
    raw_redis.xack(stream, writer.settings.group, raw_redis.xrange(stream, count=1)[0][0])
    code, out, _ = run_cli(capsys, "purge", *args, "--tombstone-ttl", "0")
    assert code == 0 and "purged 1 expired value(s)" in out, out
    assert "no Redis given" not in out
    # With the embedded memory:// it cannot look, and says so.
    code, out, _ = run_cli(capsys, "purge", *args[2:], "--redis-url", "memory://purge-note")
    assert code == 0 and "note: no Redis given (memory://)" in out, out
    # With Redis unreachable it cannot know what is pending: it refuses, dropping nothing.
    port = free_port()
    code, _, err = run_cli(capsys, "purge", *args[2:], "--redis-url", f"redis://127.0.0.1:{port}/0")
    assert code == 2 and "purge needs Redis at" in err and "--redis-url memory://" in err


def _count_checks(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count ``check_current`` calls and read-only ``open_database`` opens from now on."""
    from dualmem.ops import database, maintenance

    counts = {"check_current": 0, "read-only opens": 0}
    check, open_db = database.check_current, database.open_database

    def counted_check(conn: sqlite3.Connection, path: str | Path) -> int:
        counts["check_current"] += 1
        return check(conn, path)

    def counted_open(path: str | Path, *, write: bool = False) -> Any:
        counts["read-only opens"] += not write
        return open_db(path, write=write)

    for module in (database, maintenance):
        monkeypatch.setattr(module, "check_current", counted_check)
        monkeypatch.setattr(module, "open_database", counted_open)
    return counts


# -- dlq ----------------------------------------------------------------------------------


def test_a_poison_entry_replayed_is_dead_again(
    make_mem: Callable[..., DualMemory],
    args: list[str],
    raw_redis: redis.Redis,
    capsys: pytest.CaptureFixture[str],
) -> None:
    mem = make_mem(max_deliveries=1)
    sid = raw_redis.xadd(
        mem.layout.stream(0), {"op": "put", "s": "swarm:s1", "k": "p", "l": 3, "a": "x", "t": 1}
    )
    wait_until(mem.store.dead_letters, what="the dead letter")
    code, out, _ = run_cli(capsys, "dlq", "list", *args, "--json")
    (dead,) = json.loads(out)
    assert dead["stream_id"] == sid.decode() and dead["op"] == "put" and dead["key"] == "p"
    # Its fields do not decode as a command: the list shows them raw, its scope too (it
    # showed "/p", which record had failed left to guess).
    assert dead["scope"] == "swarm:s1"
    assert "put without an envelope" in dead["error"]
    code, out, _ = run_cli(capsys, "dlq", "replay", *args, str(dead["id"]))
    assert code == 1 and "1 dead-lettered again" in out
    code, out, _ = run_cli(capsys, "dlq", "list", *args, "--all", "--json")
    assert [d["replayed_at"] is not None for d in json.loads(out)] == [True, False]


def test_a_dead_letter_of_a_passing_failure_replays_and_commits(
    mem: DualMemory,
    args: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = mem.codec.seal(
        {"v": 1}, scope="agent:coder-1", key="late", level=Level.PRIVATE, owner="coder-1"
    )
    fields = put_fields(
        "agent:coder-1", "late", Level.PRIVATE, "coder-1", time.time_ns() // 1000, env, None
    )
    raw = redis_fields(fields)
    # What the worker records when a batch keeps failing (say the disk was full).
    mem.store.dead_letter([(StreamEntry(0, "1-1", raw), "disk I/O error", 3)])
    code, out, _ = run_cli(capsys, "dlq", "list", *args, "--json")
    (dead,) = json.loads(out)
    assert (dead["error"], dead["scope"], dead["key"]) == (
        "disk I/O error",
        "agent:coder-1",
        "late",
    )
    # It waits as long as --wait says (a replay that waited its fixed default whatever
    # --wait said failed nothing: a slow worker's replay was called pending too soon).
    waits = record_runtime_waits(monkeypatch)
    code, out, _ = run_cli(capsys, "dlq", "replay", *args, "--all", "--wait", "25")
    assert code == 0 and "1 committed" in out
    assert waits == [25.0]
    assert mem.get("late", level=Level.PRIVATE, principal=CODER) == {"v": 1}
    code, out, _ = run_cli(capsys, "dlq", "list", *args)
    assert "no dead letters" in out
    assert "dlq_replay" in [a.event for a in mem.store.audit_log()]
    code, out, _ = run_cli(capsys, "dlq", "replay", *args, "--all")
    assert code == 0 and "nothing to replay" in out


def two_dead_letters(mem: DualMemory) -> tuple[int, int]:
    """Two dead letters of one put (entries 1-1 and 1-2); their ids."""
    env = mem.codec.seal(
        {"v": 1}, scope="agent:coder-1", key="late", level=Level.PRIVATE, owner="coder-1"
    )
    fields = put_fields("agent:coder-1", "late", Level.PRIVATE, "coder-1", 1, env, None)
    raw = redis_fields(fields)
    mem.store.dead_letter([(StreamEntry(0, "1-1", raw), "disk I/O error", 3)])
    mem.store.dead_letter([(StreamEntry(0, "1-2", raw), "disk I/O error", 3)])
    first, second = (d.id for d in mem.store.dead_letters())
    return first, second


def test_a_dead_letter_named_twice_is_replayed_once(
    mem: DualMemory, args: list[str], db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `dlq replay 1 1` sent dead letter 1 twice: two stream entries, two commits.
    first, second = two_dead_letters(mem)
    code, out, _ = run_cli(
        capsys, "dlq", "replay", *args, str(second), str(first), str(second), str(first)
    )
    assert code == 0 and "2 committed" in out, out
    assert f"replayed 2 dead letter(s) ({second}, {first})" in out, out
    assert count(db_path, "journal", "key = 'late'") == 2
    (event,) = [a for a in mem.store.audit_log() if a.event == "dlq_replay"]
    assert json.loads(event.detail)["ids"] == [second, first]
    # The audit event names the stream entries replayed, in the same order, and the tool
    # that replayed them: both could go (an empty list, another actor) and no test saw.
    assert json.loads(event.detail)["stream_ids"] == ["1-2", "1-1"]
    assert event.actor == "dualmem-dlq"


def test_a_dead_lettered_audit_event_is_listed_by_its_event_and_replays_into_the_log(
    mem: DualMemory, args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # An audit event has no key: the list shows its event name there. Without that, the
    # export_decrypted event a decrypting export asks to replay (its message names
    # `dlq replay --all`) was listed as "/", an empty op/key no operator could place.
    fields = audit_fields(
        "export_decrypted", actor="coder-1", ts_us=1, risk="medium", detail={"file": "x"}
    )
    mem.store.dead_letter([(StreamEntry(0, "1-1", redis_fields(fields)), "disk I/O error", 3)])
    code, out, _ = run_cli(capsys, "dlq", "list", *args, "--json")
    (dead,) = json.loads(out)
    assert (dead["op"], dead["scope"], dead["key"]) == ("audit", "", "export_decrypted")
    code, out, _ = run_cli(capsys, "dlq", "replay", *args, "--all")
    assert code == 0 and "1 committed" in out, out
    (event,) = [a for a in mem.store.audit_log() if a.event == "export_decrypted"]
    assert (event.actor, json.loads(event.detail)) == ("coder-1", {"file": "x"})


def test_a_replay_the_streams_cannot_take_sends_nothing_and_marks_nothing(
    make_mem: Callable[..., DualMemory], ops_settings: Settings
) -> None:
    # A letter is marked replayed only after its send went: marked first, a send refused
    # (here the backlog bound; Redis down alike) took it off the list with nothing sent,
    # and `dlq replay --all` never found it again. Every replay test's send went through.
    from dualmem.errors import Backpressure
    from dualmem.ops.dlq import replay
    from dualmem.ops.runtime import Runtime

    first, second = two_dead_letters(make_mem(worker=False))
    with Runtime(ops_settings.replace(max_backlog=1, shards=1), worker=False) as rt:
        stream = rt.layout.stream(0)
        before = rt.client.xlen(stream)
        with pytest.raises(Backpressure):  # 2 commands, room for 1
            replay(rt, None)
        with pytest.raises(Backpressure):
            replay(rt, [second, first])
        assert rt.client.xlen(stream) == before
        letters = rt.store.dead_letters()
    assert [(d.id, d.replayed_at) for d in letters] == [(first, None), (second, None)]


def test_a_replay_names_every_key_in_its_lease_until_it_has_sent(
    make_mem: Callable[..., DualMemory],
    args: list[str],
    keyfile: Path,
    raw_redis: redis.Redis,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A dead letter holds an envelope under whichever key sealed it: while it is re-sent,
    # a rotation must not drop that key (dualmem.keyuse).
    from dualmem.keyuse import key_users
    from dualmem.ops import dlq
    from dualmem.rotation import add_active_key

    mem = make_mem(keyring_reload_interval=3600)  # its own lease keeps naming the old key
    old = mem.codec.keyring.active_id  # type: ignore[union-attr]
    env = mem.codec.seal(
        {"v": 1}, scope="agent:coder-1", key="late", level=Level.PRIVATE, owner="coder-1"
    )
    fields = put_fields("agent:coder-1", "late", Level.PRIVATE, "coder-1", 1, env, None)
    raw = redis_fields(fields)
    mem.store.dead_letter([(StreamEntry(0, "1-1", raw), "disk I/O error", 3)])
    new = add_active_key(keyfile).active_id
    seen: list[tuple[str, ...]] = []
    replay = dlq.replay

    def watched(*a: object, **kw: object) -> object:
        seen.extend(u.ids for u in key_users(raw_redis, "dualmem"))
        return replay(*a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(dlq, "replay", watched)
    code, out, _ = run_cli(capsys, "dlq", "replay", *args, "--all")
    assert code == 0 and "1 committed" in out
    assert sorted(seen) == sorted([(old,), (new, old)])


def a_shard_1_dead_letter(mem: DualMemory) -> None:
    """A dead letter of a put that failed on shard 1 (entry 1-1)."""
    env = mem.codec.seal({"v": 1}, scope="swarm:s1", key="late", level=Level.SWARM)
    fields = put_fields("swarm:s1", "late", Level.SWARM, "coder-1", 1, env, None)
    mem.store.dead_letter([(StreamEntry(1, "1-1", redis_fields(fields)), "disk I/O error", 3)])


def test_a_dead_letter_of_a_shard_past_shards_is_replayed_and_confirmed(
    make_mem: Callable[..., DualMemory],
    args: list[str],
    db_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A dead letter of a deployment's second shard, replayed without --shards 2, went to
    # a stream the command's own worker did not read: it stayed pending there and the
    # replay exited 1 whatever the deployment's workers did. The worker now reads every
    # shard the database has seen, here in its dead letters alone (the journal is empty).
    mem = make_mem(shards=2, worker=False)
    a_shard_1_dead_letter(mem)
    code, out, _ = run_cli(capsys, "dlq", "replay", *args, "--all", "--wait", "10")
    assert code == 0, out
    assert "1 committed, 0 dead-lettered again, 0 pending" in out
    # Committed from its own shard's stream (the journal names the stream's shard).
    assert count(db_path, "journal", "shard = 1 AND key = 'late'") == 1


def test_a_replay_its_worker_cannot_commit_in_time_is_exit_1(
    make_mem: Callable[..., DualMemory],
    args: list[str],
    db_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No test failed when a replay still pending after --wait exited 0. The command's
    # worker applies nothing until the command's wait is over (the real apply, held back
    # by a gate): it commits after that, too late for the answer.
    from dualmem.ops.runtime import Runtime
    from dualmem.sqlite_store import SQLiteStore

    first, _ = two_dead_letters(make_mem(worker=False))
    answered = threading.Event()
    apply, wait = SQLiteStore.apply, Runtime.wait

    def gated(self: SQLiteStore, *a: Any, **kw: Any) -> Any:
        answered.wait(30)
        return apply(self, *a, **kw)

    def then_open(self: Runtime, *a: Any, **kw: Any) -> Any:
        try:
            return wait(self, *a, **kw)
        finally:
            answered.set()

    monkeypatch.setattr(SQLiteStore, "apply", gated)
    monkeypatch.setattr(Runtime, "wait", then_open)
    code, out, _ = run_cli(capsys, "dlq", "replay", *args, str(first), "--wait", "0.2")
    assert code == 1, out
    assert "0 committed, 0 dead-lettered again, 1 pending" in out
    # Committed after the answer, by the command's worker as it drained.
    assert count(db_path, "journal", "key = 'late'") == 1


def test_dlq_bad_input(
    mem: DualMemory, args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(capsys, "dlq", "replay", *args, "99")
    assert code == 2 and "no dead letter with id 99" in err
    # Every id that is not there is named, not only the first (one fix, then the next).
    code, _, err = run_cli(capsys, "dlq", "replay", *args, "99", "98", "99")
    assert code == 2 and "no dead letter with id 98, 99" in err, err
    code, _, err = run_cli(capsys, "dlq", "replay", *args)
    assert code == 2 and "--all" in err


def test_dlq_replay_of_ids_with_all_is_a_usage_error_and_replays_nothing(
    mem: DualMemory, args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # `dlq replay 1 --all` replayed every dead letter, not the one named.
    first, _ = two_dead_letters(mem)
    code, _, err = run_cli(capsys, "dlq", "replay", *args, str(first), "--all")
    assert code == 2 and "not both" in err
    assert [d.replayed_at for d in mem.store.dead_letters(include_replayed=True)] == [None, None]


def test_sync_reports_a_dead_letter_and_stats_count_it(
    make_mem: Callable[..., DualMemory], args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    mem = make_mem(max_deliveries=1)
    bad = mem.put("_dm/mission/x", {"status": "?"}, level=Level.PROJECT, principal=CODER)
    with pytest.raises(NotPersisted):
        mem.sync(bad, timeout=10)
    code, out, _ = run_cli(capsys, "stats", *args[:4], "--json")
    stats = json.loads(out)
    assert code == 0 and stats["dead_letters"] == 1
    assert {"pending", "db_free_bytes", "db_wal_bytes"} <= stats.keys()


# -- stats --------------------------------------------------------------------------------


def test_stats_separates_pending_from_undelivered(
    redis_server: RedisServer, tmp_path: Path, keyfile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    redis_server.client().flushall()
    db = tmp_path / "s.db"
    writer = DualMemory(
        redis_url=redis_server.url, db_path=str(db), keyring=str(keyfile), worker=False
    )
    try:
        for i in range(7):
            writer.put(f"k{i}", i, level=Level.SWARM, principal=CODER)
        client = redis_server.client()
        # A consumer that read 3 and died before acknowledging: pending, not lost.
        client.xreadgroup("persist", "dead-one", {writer.layout.stream(0): ">"}, count=3)
        code, out, _ = run_cli(
            capsys, "stats", "--redis-url", redis_server.url, "--db", str(db), "--json"
        )
        stats = json.loads(out)
        assert code == 0 and (stats["backlog"], stats["pending"]) == (7, 3)
        code, out, _ = run_cli(capsys, "stats", "--redis-url", redis_server.url, "--db", str(db))
        assert "backlog: 7 (pending: 3)" in out
    finally:
        writer.close(timeout=0.1)


# -- doctor -------------------------------------------------------------------------------


def doctor(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, dict]]:
    code, out, _ = run_cli(capsys, "doctor", *argv, "--json")
    return code, {f["check"]: f for f in json.loads(out)}


def test_doctor_on_a_healthy_setup(
    redis_server: RedisServer, tmp_path: Path, keyfile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    redis_server.client().flushall()
    db = tmp_path / "d.db"
    DualMemory(
        redis_url=redis_server.url, db_path=str(db), keyring=str(keyfile), worker=False
    ).close()
    db.chmod(0o600)
    code, found = doctor(
        capsys, "--redis-url", redis_server.url, "--db", str(db), "--keyring", str(keyfile)
    )
    assert code == 0, found
    assert {f["status"] for f in found.values()} == {"ok"}
    assert found["redis persistence"]["detail"] == "appendonly yes, appendfsync everysec"
    assert found["key file"]["detail"].startswith(f"{keyfile} (mode 600")
    code, out, _ = run_cli(
        capsys,
        "doctor",
        "--redis-url",
        redis_server.url,
        "--db",
        str(db),
        "--keyring",
        str(keyfile),
    )
    assert code == 0 and "dualmem doctor" in out


def test_doctor_warns_when_stream_ids_run_ahead_of_redis_clock(
    redis_server: RedisServer, tmp_path: Path, keyfile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Ahead of the clock, every XADD keeps the stream's last millisecond and counts its
    # sequence up: dualmem orders those ids (past the 22 bits schema 3 held), and the
    # doctor points at the clock.
    client = redis_server.client()
    client.flushall()
    db = tmp_path / "d.db"
    args = ("--redis-url", redis_server.url, "--db", str(db), "--keyring", str(keyfile))
    mem = DualMemory(redis_url=redis_server.url, db_path=str(db), keyring=str(keyfile))
    try:
        mem.sync(mem.put("k", 1, level=Level.SWARM, principal=CODER))
        _, found = doctor(capsys, *args)
        assert found["stream ids"]["status"] == "ok"
        stream = mem.layout.stream(0)
        ahead = int(time.time() * 1000) + 7_200_000
        client.xadd(stream, {b"op": b"floor"}, id=f"{ahead}-5000000")
        _, found = doctor(capsys, *args)
        assert found["stream ids"]["status"] == "warn", found["stream ids"]
        assert "ahead of Redis's clock" in found["stream ids"]["detail"]
        assert "sequence 5,000,000" in found["stream ids"]["detail"]
        # ... and a put in that millisecond, past the old 22-bit sequence, is persisted.
        r = mem.put("k", 2, level=Level.SWARM, principal=CODER)
        assert r.stream_id == f"{ahead}-5000001"
        mem.sync(r)
        assert mem.get("k", level=Level.SWARM, principal=CODER) == 2
    finally:
        mem.close(timeout=2)
        client.flushall()


def test_doctor_finds_each_problem_and_says_how_to_fix_it(
    tmp_path: Path, keyfile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    srv = RedisServer(tmp_path / "noaof", appendonly=False)
    srv.start()
    try:
        srv.client().config_set("maxmemory-policy", "allkeys-lru")
        db = tmp_path / "old.db"
        shutil.copyfile(FIXTURE, db)
        db.chmod(0o644)
        keyfile.chmod(0o644)
        code, found = doctor(
            capsys, "--redis-url", srv.url, "--db", str(db), "--keyring", str(keyfile)
        )
        # Its table says how to fix each too (a table without the fix column, the one
        # an operator reads, failed nothing: every other test read --json).
        argv = ["--redis-url", srv.url, "--db", str(db), "--keyring", str(keyfile)]
        table_code, table, _ = run_cli(capsys, "doctor", *argv)
        assert table_code == 1 and "chmod" in table and "noeviction" in table, table
        # Evicting only keys with a ttl never takes a stream, but takes the cache entry
        # a fresh read of a write not yet committed needs: a failure too, said so.
        srv.client().config_set("maxmemory-policy", "volatile-lru")
        _, volatile = doctor(capsys, "--redis-url", srv.url, "--db", str(db))
        # AOF on, but left to the OS to write out: a warning of its own.
        srv.client().config_set("appendonly", "yes")
        srv.client().config_set("appendfsync", "no")
        _, no_fsync = doctor(capsys, "--redis-url", srv.url, "--db", str(db))
    finally:
        srv.stop()
    assert code == 1
    assert found["redis persistence"]["status"] == "warn"
    assert "CONFIG SET appendonly yes" in found["redis persistence"]["fix"]
    assert found["redis eviction"]["status"] == "fail"
    assert "command stream" in found["redis eviction"]["detail"]
    assert "maxmemory-policy noeviction" in found["redis eviction"]["fix"]
    assert no_fsync["redis persistence"]["status"] == "warn"
    assert "appendfsync no" in no_fsync["redis persistence"]["detail"]
    assert "appendfsync everysec" in no_fsync["redis persistence"]["fix"]
    assert volatile["redis eviction"]["status"] == "fail"
    assert "fresh read" in volatile["redis eviction"]["detail"]
    assert "maxmemory-policy noeviction" in volatile["redis eviction"]["fix"]
    assert (
        found["key file"]["status"] == "fail" and found["key file"]["fix"] == f"chmod 600 {keyfile}"
    )
    assert found["schema"]["status"] == "warn" and "dualmem migrate" in found["schema"]["fix"]
    assert found["auto_vacuum"]["status"] == "warn" and "--vacuum" in found["auto_vacuum"]["fix"]
    assert found["database permissions"]["fix"].startswith(f"chmod 600 {db}")


def test_doctor_gates_the_versions_dualmem_needs(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SQLite 3.38 (JSON functions in the mission tables) and Redis 6.2 (XAUTOCLAIM,
    # MINID trimming): an older one is a failure that says what to upgrade, a release
    # candidate or a patch level is read by its numbers.
    from dualmem.ops import doctor as doctor_module

    assert doctor_module._version("6.2.0-rc2") == (6, 2, 0)
    assert doctor_module._version("10.0.1") == (10, 0, 1)
    assert doctor_module._version("3.38.5.1") == (3, 38, 5)
    for sqlite, status in (("3.37.2", "fail"), ("3.38.0", "ok"), ("3.45.1", "ok")):
        monkeypatch.setattr(doctor_module.sqlite3, "sqlite_version", sqlite)
        (found,) = [f for f in doctor_module.check_versions() if f.check == "sqlite library"]
        assert found.status == status, (sqlite, found)
    monkeypatch.undo()
    real_connect = doctor_module.connect
    for server, status in (("6.0.16", "fail"), ("6.2.0", "ok"), ("7.2.4", "ok")):

        def connect(settings: Settings, version: str = server) -> Any:
            client, pool = real_connect(settings)
            client.info = lambda *a, **k: {"redis_version": version}  # type: ignore[method-assign]
            return client, pool

        monkeypatch.setattr(doctor_module, "connect", connect)
        settings = Settings.load({"redis_url": redis_server.url, "db_path": "unused.db"})
        (found,) = [f for f in doctor_module.check_redis(settings) if f.check == "redis version"]
        assert found.status == status, (server, found)
        assert status == "ok" or "upgrade to Redis 6.2.0" in found.fix


def an_empty_redis_of(
    redis_server: RedisServer, tmp_path: Path, *, shards: int
) -> tuple[redis.Redis, Settings, list[bytes]]:
    """The session's Redis emptied, settings for it with ``shards``, and their streams."""
    client = redis_server.client()
    client.flushall()
    settings = Settings.load(
        {"redis_url": redis_server.url, "db_path": str(tmp_path / "d.db")}
    ).replace(shards=shards)
    return client, settings, list(Layout(settings.namespace, settings.shards).streams())


def test_doctor_looks_at_every_shards_stream_and_warns_a_minute_ahead(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    # The stream ids check looked at the first shard only when it had no stream yet, or
    # kept the first stream it read, not the one furthest ahead; and two minutes ahead is
    # already worth a look at the clock.
    from dualmem.ops.doctor import check_stream_ids

    client, settings, streams = an_empty_redis_of(redis_server, tmp_path, shards=3)
    now_ms = int(time.time() * 1000)
    client.xadd(streams[1], {b"op": b"x"}, id=f"{now_ms - 1000}-0")  # behind: fine
    client.xadd(streams[2], {b"op": b"x"}, id=f"{now_ms + 120_000}-7")  # two minutes ahead
    (found,) = check_stream_ids(client, settings)
    assert found.status == "warn" and streams[2].decode() in found.detail, found
    assert "sequence 7" in found.detail
    client.delete(streams[2])
    (found,) = check_stream_ids(client, settings)
    assert found.status == "ok", found
    client.flushall()


def test_doctor_fails_a_command_stream_name_holding_another_type(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    # Another program's string at a shard's stream name makes every put fail (WRONGTYPE
    # inside EXEC), each leaving its cache entry (Redis has no rollback): doctor only
    # warned that it "cannot read the streams", quoting the WRONGTYPE error.
    from dualmem.ops.doctor import check_stream_ids

    client, settings, streams = an_empty_redis_of(redis_server, tmp_path, shards=2)
    client.xadd(streams[0], {b"op": b"x"})
    client.set(streams[1], b"someone else's")
    (found,) = check_stream_ids(client, settings)
    assert found.status == "fail", found
    assert f"{streams[1].decode()} holds a string, not a command stream" in found.detail
    assert "RENAME" in found.fix
    client.flushall()


def test_doctor_fails_a_group_readable_or_broken_key_file_and_warns_a_rollback_journal(
    redis_server: RedisServer, tmp_path: Path, keyfile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Group-readable is readable by others than its owner; a key file that does not load
    # cannot open a record; a database in rollback-journal mode blocks its writer while
    # a reader reads, and one with auto_vacuum FULL (not INCREMENTAL) is not what purge
    # expects either.
    db = tmp_path / "d.db"
    with sqlite3.connect(db) as conn:
        migrate(conn)
        conn.execute("PRAGMA auto_vacuum = FULL")  # from INCREMENTAL: no VACUUM needed
        conn.execute("PRAGMA journal_mode = DELETE")
    conn.close()
    db.chmod(0o600)
    args = ("--redis-url", redis_server.url, "--db", str(db), "--keyring", str(keyfile))
    keyfile.chmod(0o640)
    _, found = doctor(capsys, *args)
    assert found["key file"]["status"] == "fail" and "mode 640" in found["key file"]["detail"]
    assert found["key file"]["fix"] == f"chmod 600 {keyfile}"  # not "restore it from a backup"
    assert found["journal mode"]["status"] == "warn", found["journal mode"]
    assert found["auto_vacuum"]["status"] == "warn", found["auto_vacuum"]
    keyfile.write_text("not a key file")
    keyfile.chmod(0o600)
    _, found = doctor(capsys, *args)
    assert found["key file"]["status"] == "fail" and "restore" in found["key file"]["fix"]


def test_doctor_without_redis_or_key_and_with_a_newer_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "new.db"
    shutil.copyfile(FIXTURE, db)
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA user_version = 99")
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    code, found = doctor(capsys, "--redis-url", url, "--db", str(db))
    assert code == 1
    assert found["redis"]["status"] == "fail" and "start Redis" in found["redis"]["fix"]
    assert found["key"]["status"] == "fail" and "dualmem keygen" in found["key"]["fix"]
    assert found["schema"]["status"] == "fail" and found["schema"]["fix"] == "upgrade dualmem"
    code, found = doctor(capsys, "--redis-url", "memory://doc", "--db", str(tmp_path / "x.db"))
    assert found["redis persistence"]["status"] == "warn"
    assert found["database"]["status"] == "ok"  # created on first use
    # A directory given as the database said "disk I/O error: restore the newest backup".
    code, found = doctor(capsys, "--redis-url", "memory://doc", "--db", str(tmp_path))
    assert code == 1 and found["database"]["status"] == "fail"
    assert "not a file" in found["database"]["detail"] and "--db" in found["database"]["fix"]


def test_doctor_fails_an_embedded_database_whose_key_file_is_gone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # doctor said the key "will be created on first use" (exit 0) where DualMemory
    # refuses the database: a new key would open none of its sealed records.
    from acl.errors import ConfigurationError
    from dualmem.redis_backend import drop_memory_server

    db = tmp_path / "d.db"
    url = "memory://doctor-lost-key"
    try:
        with DualMemory(db_path=str(db), redis_url=url) as m:  # creates d.db.keys
            m.sync(m.put("k", "secret", level=Level.PRIVATE, principal=CODER), timeout=5)
        _, found = doctor(capsys, "--redis-url", url, "--db", str(db))
        assert found["key file"]["status"] == "ok"
        Path(f"{db}.keys").unlink()
        with pytest.raises(ConfigurationError, match="key file"):
            DualMemory(db_path=str(db), redis_url=url)
        code, found = doctor(capsys, "--redis-url", url, "--db", str(db))
        assert code == 1 and found["key"]["status"] == "fail", found["key"]
        assert "holds encrypted records" in found["key"]["detail"]
        assert found["key"]["fix"].startswith(f"restore {db}.keys")
        # Without sealed records a new key is still made on first use.
        fresh = tmp_path / "fresh.db"
        with DualMemory(db_path=str(fresh), redis_url=url) as m:
            m.sync(m.put("k", "plain", level=Level.SWARM, principal=CODER), timeout=5)
        Path(f"{fresh}.keys").unlink()
        _, found = doctor(capsys, "--redis-url", url, "--db", str(fresh))
        assert found["key"]["status"] == "ok" and "created on first use" in found["key"]["detail"]
    finally:
        drop_memory_server(url)


def test_doctor_names_a_key_file_name_too_long_for_the_file_system(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A 251-byte db file name is valid, but its "<name>.keys" sibling is over NAME_MAX:
    # doctor looked the key file up with a bare Path.exists(), whose OSError
    # (ENAMETOOLONG) ended it with a traceback instead of a finding.
    db = tmp_path / ("d" * 248 + ".db")
    url = "memory://key-name-too-long"
    code, found = doctor(capsys, "--redis-url", url, "--db", str(db))
    assert code == 1 and found["key"]["status"] == "fail", found["key"]
    assert "its name is too long for the file system" in found["key"]["detail"]
    assert "use a shorter db_path, or pass keyring= / key=" in found["key"]["detail"]


def test_doctor_fails_another_programs_database(
    redis_url: str, tmp_path: Path, keyfile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # doctor exited 0 with warnings whose fix was `dualmem migrate`, which then refused
    # the file as "not a dualmem database".
    db = tmp_path / "other.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (x)")
    conn.close()
    before = db.read_bytes()
    argv = ("--redis-url", redis_url, "--db", str(db), "--keyring", str(keyfile))
    code, found = doctor(capsys, *argv)
    assert code == 1 and found["database"]["status"] == "fail", found
    assert "is not a dualmem database" in found["database"]["detail"]
    assert "--db" in found["database"]["fix"]
    assert not [f for f in found.values() if "dualmem migrate" in f["fix"]]
    code, _, err = run_cli(capsys, "migrate", "--db", str(db))
    assert code == 2 and "is not a dualmem database" in err  # the same verdict
    assert db.read_bytes() == before


# -- metrics ------------------------------------------------------------------------------

#: A label value is quoted, with a backslash, a quote and a line break escaped.
_LABEL = r'[a-z_]+="(?:[^"\\\n]|\\[\\"n])*"'
_SAMPLE = re.compile(rf"^dualmem_[a-z_]+(\{{{_LABEL}(,{_LABEL})*\}})? (-?[0-9.e+-]+|NaN)$")


def check_exposition(text: str) -> None:
    lines = text.splitlines()
    for line in lines:
        assert line.startswith("#") or _SAMPLE.match(line), line
    # Every family has one HELP and one TYPE line (the gauges had TYPE only).
    families = {line.split()[2] for line in lines if line.startswith("# TYPE ")}
    helped = [line.split()[2] for line in lines if line.startswith("# HELP ")]
    assert sorted(helped) == sorted(families), (helped, families)


def test_metrics_prints_an_exposition_with_one_series_per_worker(
    make_mem: Callable[..., DualMemory],
    args: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    mem = make_mem()
    for r in [mem.put(f"k{i}", i, level=Level.SWARM, principal=CODER) for i in range(20)]:
        mem.sync(r)
    mem.close()  # the worker snapshots its histograms on the way out
    code, out, _ = run_cli(capsys, "metrics", *args)
    assert code == 0
    check_exposition(out)
    assert re.search(r'dualmem_latency_seconds_count\{source="[^"]+",path="persist"\} 20', out)
    assert "dualmem_dead_letters 0" in out and "dualmem_journal_seq 20" in out
    assert out.count("# TYPE dualmem_latency_seconds summary") == 1


def test_metrics_server_serves_on_loopback_and_stops(
    mem: DualMemory, redis_url: str, db_path: Path
) -> None:
    mem.sync(mem.put("k", 1, level=Level.SWARM, principal=CODER))
    exporter = Exporter(Settings.load({"redis_url": redis_url, "db_path": str(db_path)}))
    server, thread = start_server(0, exporter.render)
    try:
        host, port = server.server_address[:2]
        assert host == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            body = resp.read().decode()
        check_exposition(body)
        assert "dualmem_journal_seq 1" in body
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=5)
        assert err.value.code == 404
        # A client that connects and sends nothing held the one-at-a-time server: every
        # other scrape timed out, and shutdown() waited for it.
        idle = socket.create_connection(("127.0.0.1", port))
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                assert resp.status == 200
            t0 = time.monotonic()
            server.shutdown()
            assert time.monotonic() - t0 < 2
        finally:
            idle.close()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
        exporter.close()
    assert not thread.is_alive()


@pytest.mark.real_redis
def test_the_exposition_sums_every_shard_and_labels_every_worker(
    own_redis_server: RedisServer, tmp_path: Path, keyfile: Path
) -> None:
    # Each gauge from its own source: backlog and pending summed over every shard's
    # stream (not the last one's), dead letters counted, the database's size with its
    # WAL; one HELP/TYPE per family however many workers, and a worker name that needs
    # escaping kept one label; redis_up 0 (and no backlog figures) once Redis is gone.
    db = tmp_path / "m.db"
    settings = Settings.load(
        {"redis_url": own_redis_server.url, "db_path": str(db), "keyring": str(keyfile)}
    ).replace(shards=2, worker=False)
    raw = own_redis_server.client()
    mem = DualMemory(settings=settings)
    try:
        streams = list(mem.layout.streams())  # the writer made their groups
        keys = [f"k{i}" for i in range(40)]
        for key in keys:
            mem.put(key, 1, level=Level.SWARM, principal=CODER)
        per_stream = [raw.xlen(stream) for stream in streams]
        assert all(n > 0 for n in per_stream) and sum(per_stream) == len(keys)
        raw.xreadgroup(settings.group, "c", {streams[1]: ">"}, count=3)  # 3 pending
        two_dead_letters(mem)
        snapshot = {"put": {"count": 2, "p50": 1.0, "p95": 2.0, "p99": 3.0, "max": 4.0}}
        mem.store.record_metrics(1, 'host-1 "a\\b"', snapshot)
        mem.store.record_metrics(1, "host-2\nw", snapshot)  # settings let a consumer have one
    finally:
        mem.close()
    exporter = Exporter(settings)
    try:
        text = exporter.render()
        check_exposition(text)
        gauges = dict(
            line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("dualmem_")
        )
        assert float(gauges["dualmem_backlog"]) == len(keys)
        assert float(gauges["dualmem_pending"]) == 3
        assert float(gauges["dualmem_dead_letters"]) == 2
        wal = Path(f"{db}-wal")
        assert wal.stat().st_size > 0
        assert float(gauges["dualmem_db_bytes"]) == db.stat().st_size + wal.stat().st_size
        assert float(gauges["dualmem_redis_up"]) == 1
        assert text.count("# TYPE dualmem_latency_seconds summary") == 1
        assert 'source="host-1 \\"a\\\\b\\"",path="put"' in text
        assert 'source="host-2\\nw",path="put"' in text
        own_redis_server.kill()
        down = exporter.render()
        assert "dualmem_redis_up 0" in down and "dualmem_backlog" not in down
    finally:
        exporter.close()


def test_the_metrics_server_answers_a_query_string_and_503_when_it_cannot_render() -> None:
    # Prometheus may add parameters (/metrics?name[]=...): they were a 404. A render
    # that fails (Redis or SQLite gone) is a 503 with its reason, not a dropped
    # connection; and scrapes render one at a time (one SQLite connection, one client).
    from dualmem.errors import StoreUnavailable

    active: list[int] = []
    overlapped = threading.Event()
    fail = threading.Event()

    def render() -> str:
        active.append(1)
        try:
            if len(active) > 1:
                overlapped.set()
            if fail.is_set():
                raise StoreUnavailable("metrics: Redis is down")
            overlapped.wait(0.5)  # long enough for a second scrape to come in
            return "dualmem_up 1\n"
        finally:
            active.pop()

    server, thread = start_server(0, render)
    port = server.server_address[1]
    try:
        bodies: list[str] = []

        def scrape(suffix: str) -> None:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{port}/metrics{suffix}", timeout=10
            ) as resp:
                bodies.append(resp.read().decode())

        scrapers = [threading.Thread(target=scrape, args=(s,)) for s in ("", "?name[]=x")]
        for t in scrapers:
            t.start()
        for t in scrapers:
            t.join(10)
        assert bodies == ["dualmem_up 1\n"] * 2
        assert not overlapped.is_set()
        fail.set()
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
        assert err.value.code == 503 and "Redis is down" in err.value.read().decode()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_metrics_serve_command_runs_until_sigterm(
    redis_server: RedisServer, tmp_path: Path, keyfile: Path
) -> None:
    redis_server.client().flushall()
    db = tmp_path / "m.db"
    with DualMemory(redis_url=redis_server.url, db_path=str(db), keyring=str(keyfile)) as mem:
        mem.sync(mem.put("k", 1, level=Level.SWARM, principal=CODER))
        mem.put("pending", 2, level=Level.SWARM, principal=CODER)
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dualmem",
            "metrics",
            "--serve",
            str(port),
            "--redis-url",
            redis_server.url,
            "--db",
            str(db),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert f"serving http://127.0.0.1:{port}/metrics" in proc.stdout.readline()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            body = resp.read().decode()
        check_exposition(body)
        assert "dualmem_redis_up 1" in body and "dualmem_backlog 0" in body
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    assert proc.returncode == 0


def test_metrics_refuses_a_database_of_another_schema(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "old.db"
    shutil.copyfile(FIXTURE, db)
    code, _, err = run_cli(capsys, "metrics", "--db", str(db))
    assert code == 2 and "run `dualmem migrate" in err
    code, _, err = run_cli(capsys, "metrics", "--db", str(tmp_path / "none.db"))
    assert code == 2 and "no database at" in err
