"""``dualmem verify``: every check passes on a healthy database and fails, with a readable
report and exit 1, on each kind of damage; on fakeredis and a real redis-server."""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from acl import Codec, Keyring, Level, Principal
from acl.crypto import envelope_sealing
from dualmem import DualMemory
from dualmem.batch import chain_hash, journal_hash_values
from dualmem.commands import CACHE_TOMBSTONE
from dualmem.migrations import SCHEMA_VERSION
from dualmem.missions import MissionLog
from dualmem.redis_backend import connect
from dualmem.rotation import add_active_key, rotate_keys
from dualmem.rotation_lock import RotationLock
from dualmem.worker import Worker

from .conftest import free_port, run_cli, wait_until

CODER = Principal(agent_id="coder-1", team="backend", swarm="s1", project="shop")


def fill(mem: DualMemory) -> None:
    rs = [
        mem.put(f"k{i}", {"i": i}, level=lvl, principal=CODER)
        for i in range(5)
        for lvl in (Level.PRIVATE, Level.TEAM, Level.SWARM, Level.PROJECT)
    ]
    rs.append(mem.delete("k4", level=Level.SWARM, principal=CODER))
    rs.append(mem.audit("deploy", principal=CODER, risk="medium", detail={"v": 1}))
    log = MissionLog(mem, CODER)
    rs.append(log.start_mission("m1", "p"))
    rs.append(log.record_tool_call("m1", "grep", {}, {}, 1, True))
    for r in rs:
        mem.sync(r, timeout=10)


@pytest.fixture
def args(redis_url: str, db_path: Path) -> list[str]:
    return ["--redis-url", redis_url, "--db", str(db_path)]


def report(capsys: pytest.CaptureFixture[str], args: list[str]) -> tuple[int, dict[str, dict]]:
    code, out, _ = run_cli(capsys, "verify", *args, "--json")
    doc = json.loads(out)
    # The report's "ok" is what a script reads: no test failed when it said true next to
    # a failed check.
    assert doc["ok"] is (code == 0) is all(c["status"] != "fail" for c in doc["checks"]), doc
    return code, {c["name"]: c for c in doc["checks"]}


def test_a_healthy_database_passes_every_check(
    mem: DualMemory, args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    fill(mem)
    code, out, _ = run_cli(capsys, "verify", *args)
    assert code == 0, out
    assert "all checks passed" in out
    code, checks = report(capsys, args)
    assert code == 0
    assert checks["journal hash chain"]["summary"] == "23 rows ok"
    assert checks["audit_log hash chain"]["summary"] == "1 rows ok"
    assert checks["mission projection"]["summary"] == "2 rows ok"
    # 21 live records (2 of them the mission log), each cached by its put, and the mark
    # the one delete left (it agrees with the committed tombstone); none in flight.
    parity = checks["redis <-> sqlite parity"]["summary"]
    assert parity == "22 cache entries match, 0 in flight"


def test_an_edited_journal_row_breaks_the_chain(
    mem: DualMemory, args: list[str], db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(mem)
    with sqlite3.connect(db_path) as conn:
        conn.execute("UPDATE journal SET actor = 'mallory' WHERE seq = 7")
    code, out, _ = run_cli(capsys, "verify", *args)
    assert code == 1
    assert "seq 7: hash does not match the row's contents" in out
    # The fix is what the operator acts on (the README's example shows it).
    assert "fix: rows were edited outside dualmem: restore a backup and investigate" in out
    assert "verify found problems" in out


def test_a_row_planted_below_the_first_id_is_found(
    mem: DualMemory, args: list[str], db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The chain walk started after id 0: a journal row at seq 0 (served by history) and
    # an audit row at id -1 were never looked at.
    fill(mem)
    with sqlite3.connect(db_path) as conn:
        conn.execute(
            "INSERT INTO journal (seq, shard, stream_id, sid, op, scope, key, level, actor, "
            "ts, committed_at, prev_hash, hash) VALUES (0, 0, '5-0', x'00', 'del', "
            "'project:shop', 'k1', 4, 'mallory', 5, 5, x'00', x'00')"
        )
        conn.execute("DROP TRIGGER audit_log_no_update")
        conn.execute(
            "INSERT INTO audit_log (id, ts, event, actor, risk, prev_hash, hash) "
            "VALUES (-1, 1, 'x', 'mallory', 'low', x'00', x'00')"
        )
    conn.close()
    code, checks = report(capsys, args)
    assert code == 1
    assert (
        "seq 0: ids start at 1 (a row put there by hand)"
        in checks["journal hash chain"]["problems"]
    )
    assert (
        "id -1: ids start at 1 (a row put there by hand)"
        in checks["audit_log hash chain"]["problems"]
    )


def test_a_file_that_is_not_a_dualmem_database_is_a_finding_not_a_crash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty.db"
    empty.touch()
    code, out, _ = run_cli(capsys, "verify", "--db", str(empty), "--no-redis")
    assert code == 1 and "no dualmem schema" in out


def damage_table(db: Path, table: str) -> None:
    """Overwrite the header of ``table``'s root b-tree page: SQLite then raises
    ``DatabaseError: database disk image is malformed`` when it reads that table."""
    with sqlite3.connect(db) as conn:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        (root,) = conn.execute(
            "SELECT rootpage FROM sqlite_schema WHERE name = ?", (table,)
        ).fetchone()
    conn.close()
    data = bytearray(db.read_bytes())
    offset = (root - 1) * page_size
    for i in range(offset + 8, offset + 60):
        data[i] ^= 0xFF
    db.write_bytes(bytes(data))


def test_a_damaged_page_fails_its_checks_and_the_others_still_run(
    mem: DualMemory, args: list[str], db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A SQLite error in one check (the journal chain cannot be read) ended verify with a
    # traceback, twice over (the read transaction's COMMIT raised again), and no report.
    fill(mem)
    mem.close()
    damage_table(db_path, "journal")
    code, checks = report(capsys, [*args, "--no-redis"])
    assert code == 1
    # Every line SQLite's integrity_check gives is a problem, the first one too.
    with sqlite3.connect(db_path) as conn:
        lines = [str(r[0]) for r in conn.execute("PRAGMA integrity_check")]
    conn.close()
    integrity = checks["integrity_check"]
    assert lines != ["ok"] and integrity["status"] == "fail"
    assert (integrity["problems"], integrity["problem_count"]) == (lines[:20], len(lines))
    chain = checks["journal hash chain"]
    assert chain["status"] == "fail"
    assert chain["problems"] == [
        "SQLite could not read the database: database disk image is malformed"
    ]
    assert "restore the newest backup" in chain["fix"]
    # The checks after it ran: the audit chain is not damaged.
    assert checks["audit_log hash chain"]["status"] == "ok"
    assert "mission projection" in checks
    code, out, err = run_cli(capsys, "verify", *args, "--no-redis")
    assert code == 1 and "verify found problems" in out and "Traceback" not in err


@pytest.mark.parametrize("damage", ["audit_log page", "text hash", "integer hash"])
def test_junk_where_a_hash_belongs_is_a_broken_link_not_a_crash(
    mem: DualMemory,
    args: list[str],
    db_path: Path,
    capsys: pytest.CaptureFixture[str],
    damage: str,
) -> None:
    # A damaged audit_log page that SQLite decodes as junk rows (prev_hash NULL), or a
    # hash column edited to text or a number (the columns are not STRICT): verify ended in a
    # TypeError traceback, exit 1 like a report, with no report.
    fill(mem)
    mem.close()
    if damage == "audit_log page":
        damage_table(db_path, "audit_log")
    else:
        with sqlite3.connect(db_path) as conn:
            value = "edited" if damage == "text hash" else 7
            conn.execute("UPDATE journal SET prev_hash = ? WHERE seq = 2", (value,))
        conn.close()
    code, out, err = run_cli(capsys, "verify", *args, "--no-redis", "--json")
    assert code == 1 and "Traceback" not in err, err
    checks = {c["name"]: c for c in json.loads(out)["checks"]}
    table = "audit_log" if damage == "audit_log page" else "journal"
    assert checks[f"{table} hash chain"]["status"] == "fail"
    if table == "journal":
        # One broken link, and the walk goes on from that row's hash: seq 3 still links
        # to seq 2 and every row is reached (no problem made up after the junk one).
        assert checks["journal hash chain"]["problems"] == [
            "seq 2: prev_hash or hash is not a 32-byte hash"
        ]
    assert "mission projection" in checks  # the checks after it still ran


def test_a_deleted_journal_row_breaks_the_link(
    mem: DualMemory, args: list[str], db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(mem)
    with sqlite3.connect(db_path) as conn:
        conn.execute("DELETE FROM journal WHERE seq = 3")
    code, checks = report(capsys, args)
    assert code == 1
    assert checks["journal hash chain"]["problems"] == [
        "seq 4: prev_hash does not match the previous row's hash"
    ]


def test_an_audit_row_edited_behind_the_triggers_is_detected(
    mem: DualMemory, args: list[str], db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(mem)
    with sqlite3.connect(db_path) as conn:
        conn.execute("DROP TRIGGER audit_log_no_update")
        conn.execute("UPDATE audit_log SET risk = 'low'")
    code, checks = report(capsys, args)
    assert code == 1
    assert checks["audit_log hash chain"]["problem_count"] == 1
    assert "hash does not match" in checks["audit_log hash chain"]["problems"][0]


def fill_and_wait_for_the_anchors(
    mem: DualMemory, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    """``fill`` and wait until each chain's anchor names its last row (the worker sets
    the anchors right after the commit that sync() waits for)."""
    fill(mem)
    ends = "journal: ends at or after seq 23; audit_log: ends at or after id 1"
    wait_until(lambda: report(capsys, args)[1]["hash chain anchors"]["summary"] == ends)


def test_rows_cut_off_the_end_of_a_chain_are_found_by_the_anchor(
    mem: DualMemory, args: list[str], db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fill_and_wait_for_the_anchors(mem, capsys, args)
    with sqlite3.connect(db_path) as conn:
        conn.execute("DELETE FROM journal WHERE seq > 20")
        conn.execute("DROP TRIGGER audit_log_no_delete")
        conn.execute("DELETE FROM audit_log")
    code, checks = report(capsys, args)
    assert code == 1
    # What is left of each chain still recomputes: only the anchors show the cut.
    assert checks["journal hash chain"]["status"] == "ok"
    assert checks["audit_log hash chain"]["status"] == "ok"
    assert checks["hash chain anchors"]["problems"] == [
        "journal ends at seq 20, before the anchored seq 23: rows were cut off its end",
        "audit_log ends at id 0, before the anchored id 1: rows were cut off its end",
    ]
    # After a restore, only a row committed to that chain moves its anchor: the fix said
    # "the next committed write", and plain puts never moved the audit_log's.
    fix = checks["hash chain anchors"]["fix"]
    assert "an audit event for audit_log" in fix and ":anchor}:audit_log:top" in fix


def test_a_chains_last_row_replaced_with_a_consistent_chain_is_found_by_the_anchor(
    mem: DualMemory, args: list[str], db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The chain's last row rewritten, its hash recomputed: every link still holds, so
    # only the anchor (the hash the worker committed at that seq) can tell.
    fill_and_wait_for_the_anchors(mem, capsys, args)
    with sqlite3.connect(db_path) as conn:
        conn.execute("UPDATE journal SET actor = 'someone-else' WHERE seq = 23")
        row = conn.execute(
            "SELECT seq, shard, stream_id, sid, op, scope, key, level, actor, ts, "
            "committed_at, prev_hash FROM journal WHERE seq = 23"
        ).fetchone()
        digest = chain_hash(row[-1], journal_hash_values(row[:-1]))
        conn.execute("UPDATE journal SET hash = ? WHERE seq = 23", (digest,))
    code, checks = report(capsys, args)
    assert code == 1
    assert checks["journal hash chain"]["status"] == "ok"
    assert checks["hash chain anchors"]["problems"] == [
        "journal seq 23: hash differs from the anchor"
    ]


def test_an_anchor_moves_on_with_the_next_commit(
    mem: DualMemory, args: list[str], raw_redis: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    r = mem.put("k", {"v": 1}, level=Level.SWARM, principal=CODER)
    mem.sync(r)
    key = mem.layout.anchor_key("journal")
    wait_until(lambda: raw_redis.zrange(key, -1, -1))
    raw_redis.zadd(key, {b"999:00": 999})  # as after restoring an older backup: ahead
    assert report(capsys, args)[0] == 1
    mem.sync(mem.put("k", {"v": 2}, level=Level.SWARM, principal=CODER))
    wait_until(lambda: raw_redis.zrange(key, -1, -1) != [b"999:00"])
    code, checks = report(capsys, args)
    assert code == 0, checks["hash chain anchors"]
    # Restored again, and the next commit lands on the very id the stale anchor names (a
    # tie in the sorted set, which keeps the member that sorts last): still replaced.
    next_seq = mem.store.last_seq() + 1
    stale = f"{next_seq}:{'ff' * 32}".encode()
    raw_redis.zadd(key, {stale: next_seq})
    mem.sync(mem.put("k", {"v": 3}, level=Level.SWARM, principal=CODER))
    wait_until(lambda: raw_redis.zrange(key, -1, -1) != [stale])
    code, checks = report(capsys, args)
    assert code == 0, checks["hash chain anchors"]
    raw_redis.zadd(key, {b"not an anchor": 10**6})
    code, checks = report(capsys, args)
    assert code == 1
    assert "is not '<id>:<hash>'" in checks["hash chain anchors"]["problems"][0]
    # The next commit replaces a member that is no anchor too (it stayed, on top, for good).
    mem.sync(mem.put("k", {"v": 4}, level=Level.SWARM, principal=CODER))
    wait_until(lambda: raw_redis.zrange(key, -1, -1) != [b"not an anchor"])
    code, checks = report(capsys, args)
    assert code == 0, checks["hash chain anchors"]


def test_a_worker_that_acks_late_cannot_move_the_anchor_back(
    mem: DualMemory,
    args: list[str],
    db_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Two workers share the group: w1 commits seq 1 and is descheduled before its ack
    # pipeline; w2 commits seq 2..3 and anchors 3; then w1 anchored 1 (a plain SET), and
    # rows cut off after seq 1 went unnoticed.
    import dualmem.worker as worker_module

    mem.close()
    writer = DualMemory(
        redis_url=mem.settings.redis_url,
        db_path=str(db_path),
        keyring=mem.settings.keyring,
        worker=False,
    )
    c1, _ = connect(writer.settings)
    c2, _ = connect(writer.settings)
    w1 = Worker(c1, writer.store, writer.settings.replace(consumer="w1"))
    w2 = Worker(c2, writer.store, writer.settings.replace(consumer="w2"))
    real = worker_module.send_many
    committed, go = threading.Event(), threading.Event()

    def send_many(client: redis.Redis, commands: Any) -> list[Any]:
        if client is c1:  # w1, between its commit and its ack pipeline
            committed.set()
            go.wait(10)
        return real(client, commands)

    monkeypatch.setattr(worker_module, "send_many", send_many)
    try:
        start = writer.store.last_seq()
        writer.put("a", 1, level=Level.SWARM, principal=CODER)
        slow = threading.Thread(target=w1.step)
        slow.start()
        assert committed.wait(10)
        writer.put("b", 2, level=Level.SWARM, principal=CODER)
        writer.put("c", 3, level=Level.SWARM, principal=CODER)
        w2.step()
        go.set()
        slow.join()
        anchored = writer._redis.zrange(writer.layout.anchor_key("journal"), -1, -1)
        assert anchored[0].split(b":")[0] == str(start + 3).encode()
    finally:
        go.set()
        c1.close()
        c2.close()
        writer.close()
    with sqlite3.connect(db_path) as conn:
        conn.execute("DELETE FROM journal WHERE seq > ?", (start + 1,))
    conn.close()
    code, checks = report(capsys, args)
    assert code == 1
    assert checks["hash chain anchors"]["problems"] == [
        f"journal ends at seq {start + 1}, before the anchored seq {start + 3}: "
        "rows were cut off its end"
    ]


def test_orphans_and_lost_projections_are_reported(
    mem: DualMemory, args: list[str], db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(mem)
    with sqlite3.connect(db_path) as conn:
        conn.execute("PRAGMA foreign_keys = OFF")
        conn.execute("DELETE FROM missions")  # no cascade with foreign keys off
    code, checks = report(capsys, args)
    assert code == 1
    assert checks["foreign_key_check"]["problems"] == ["tool_calls row 1 has no parent in missions"]
    assert checks["mission projection"]["problems"] == [
        "project:shop mission m1: record has no projected row"
    ]


def test_redis_and_sqlite_disagreeing_is_reported(
    mem: DualMemory,
    args: list[str],
    raw_redis: redis.Redis,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fill(mem)
    lay = mem.layout
    raw_redis.set(lay.cache_key(0, "swarm:s1", "k1"), b"\x01\x00{}")  # not what SQLite holds
    raw_redis.set(lay.cache_key(0, "swarm:s1", "ghost"), b"\x01\x00{}")  # no row at all
    raw_redis.set(lay.cache_key(0, "swarm:s1", "k4"), b"\x01\x00{}")  # deleted in SQLite
    raw_redis.set(lay.cache_key(0, "swarm:s1", "k2"), CACHE_TOMBSTONE)  # live in SQLite
    # A name in the cache's key space that is no record's cache key: nothing reads it.
    junk = lay.cache_key(0, "swarm:s1", "k3").replace(b":c:swarm:", b":c:bogus:")
    raw_redis.set(junk, b"\x01\x00{}")
    code, checks = report(capsys, args)
    assert code == 1
    assert sorted(checks["redis <-> sqlite parity"]["problems"]) == [
        f"{junk!r}: not a cache key of this namespace",
        "swarm:s1/ghost: cached in Redis but no row in SQLite",
        "swarm:s1/k1: the cached envelope differs from the SQLite row",
        "swarm:s1/k2: deleted in Redis but live in SQLite (a lost delete)",
        "swarm:s1/k4: deleted in SQLite but still cached in Redis",
    ]
    # The junk is a problem but no cache entry: counted apart ("5 of ..." counted it among
    # the entries, and junk alone said "1 of 0 cache entries differ").
    summary = checks["redis <-> sqlite parity"]["summary"]
    assert re.fullmatch(
        r"4 of \d+ cache entries differ, 1 name in the cache's key space that no cache key "
        r"has; 0 in flight",
        summary,
    ), summary


def test_a_redis_that_cannot_be_reached_fails_verify_instead_of_passing_it(
    mem: DualMemory, db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # No test failed when this failed check was left out of the report: verify then
    # passed (exit 0) having compared nothing.
    fill(mem)
    down = ["--redis-url", f"redis://127.0.0.1:{free_port()}/0", "--db", str(db_path)]
    code, checks = report(capsys, down)
    assert code == 1
    parity = checks["redis <-> sqlite parity"]
    assert (parity["status"], parity["summary"]) == ("fail", "could not check"), parity
    assert parity["fix"] == "check --redis-url"


def test_verify_compares_the_cache_entries_of_every_shard(
    make_mem: Callable[..., DualMemory],
    args: list[str],
    raw_redis: redis.Redis,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # No test failed when verify, told --shards 2, scanned one shard's cache entries: a
    # tampered entry of the second went unnoticed. Without --shards it went unnoticed
    # too: verify now reads every shard the journal has seen, as purge does.
    mem = make_mem(shards=2)
    keys = [f"k{i}" for i in range(40)]
    on_two = [k for k in keys if mem.layout.shard_of("swarm:s1", k) == 1][:3]
    on_one = [k for k in keys if mem.layout.shard_of("swarm:s1", k) == 0][:2]
    for r in [mem.put(k, 1, level=Level.SWARM, principal=CODER) for k in on_one + on_two]:
        mem.sync(r, timeout=10)
    code, checks = report(capsys, [*args, "--shards", "2"])
    assert code == 0, checks
    assert checks["redis <-> sqlite parity"]["summary"] == "5 cache entries match, 0 in flight"
    raw_redis.set(mem.layout.cache_key(1, "swarm:s1", on_two[0]), b"\x01\x00{}")
    for shards in (["--shards", "2"], []):
        code, checks = report(capsys, [*args, *shards])
        assert code == 1, shards
        assert checks["redis <-> sqlite parity"]["problems"] == [
            f"swarm:s1/{on_two[0]}: the cached envelope differs from the SQLite row"
        ]


def test_commands_not_yet_committed_are_in_flight_not_errors(
    make_mem: object, args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    writer = make_mem(worker=False)  # type: ignore[operator]
    for i in range(3):
        writer.put(f"p{i}", i, level=Level.SWARM, principal=CODER)
    code, checks = report(capsys, args)
    assert code == 0, checks
    assert checks["redis <-> sqlite parity"]["summary"] == "0 cache entries match, 3 in flight"
    # Nothing committed yet, so no anchor: said, not failed (and not a silent "ok").
    anchors = checks["hash chain anchors"]
    assert (anchors["status"], anchors["summary"]) == (
        "ok",
        "journal: no anchor; audit_log: no anchor",
    )


def test_a_database_from_a_newer_dualmem_fails_the_schema_check(
    mem: DualMemory, args: list[str], db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(mem)
    mem.close()
    with sqlite3.connect(db_path) as conn:
        conn.execute("PRAGMA user_version = 99")
    code, out, _ = run_cli(capsys, "verify", *args, "--no-redis")
    assert code == 1
    assert f"schema 99 is newer than this dualmem ({SCHEMA_VERSION})" in out
    assert "fix: upgrade dualmem" in out
    # Tables of a newer schema may hold other columns: no chain or projection check
    # judges them (their "ok" would mislead).
    code, checks = report(capsys, [*args, "--no-redis"])
    assert list(checks) == ["integrity_check", "foreign_key_check", "schema version"]


def test_a_negative_schema_version_is_not_an_older_schema(
    mem: DualMemory, args: list[str], db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # No dualmem writes a negative user_version (an edit, or a damaged header): verify
    # called it "schema -1 is older than this dualmem" with the fix "run `dualmem
    # migrate`", and that migrate took the newest migration for "version 0", failed
    # half-way and left the file labelled schema 1 over schema-5 tables.
    fill(mem)
    mem.close()
    with sqlite3.connect(db_path) as conn:
        conn.execute("PRAGMA user_version = -1")
    conn.close()
    code, checks = report(capsys, [*args, "--no-redis"])
    assert code == 1
    schema = checks["schema version"]
    assert schema["problems"] == ["schema -1 is no version dualmem writes"]
    assert "migrate" not in schema["fix"] and "restore the newest backup" in schema["fix"]
    assert list(checks) == ["integrity_check", "foreign_key_check", "schema version"]


def test_missing_and_foreign_files_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(capsys, "verify", "--db", str(tmp_path / "nope.db"), "--no-redis")
    assert code == 2 and "no database at" in err
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database at all" * 100)
    code, _, err = run_cli(capsys, "verify", "--db", str(junk), "--no-redis")
    assert code == 2 and "is not a dualmem database" in err


def test_verify_reads_one_snapshot_while_the_worker_commits(mem: DualMemory, db_path: Path) -> None:
    # The chain check counted rows, then walked them page by page, each read seeing the
    # newest commit: a row committed in between was "not reached by the walk".
    from dualmem.ops.database import open_database
    from dualmem.ops.verify import verify_database

    fill(mem)

    class Live:
        def __init__(self, conn: sqlite3.Connection) -> None:
            self.conn = conn

        @property
        def in_transaction(self) -> bool:
            return self.conn.in_transaction

        def execute(self, sql: str, *args: Any) -> Any:
            cur = self.conn.execute(sql, *args)
            if sql.startswith("SELECT count(*) FROM journal"):
                rows = cur.fetchall()
                mem.sync(mem.put("during", 1, level=Level.SWARM, principal=CODER), timeout=10)
                return _Rows(rows)
            return cur

    class _Rows(list[Any]):
        def fetchone(self) -> Any:
            return self[0]

    with open_database(db_path) as conn:
        checks = verify_database(Live(conn))  # type: ignore[arg-type]
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]


@pytest.mark.real_redis
def test_a_redis_with_no_stream_yet_is_healthy_for_verify_stats_and_metrics(
    redis_server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A fresh Redis, or one restarted empty: XINFO and XPENDING on a missing stream fail
    # with "no such key" / NOGROUP. verify failed its parity check (exit 1), stats said
    # the backlog was unavailable and metrics said dualmem_redis_up 0.
    db = tmp_path / "m.db"
    with DualMemory(redis_url="memory://no-stream-yet", db_path=str(db)) as mem:
        mem.sync(mem.put("k", 1, level=Level.PROJECT, principal=CODER), timeout=10)
    redis_server.client().flushall()
    args = ["--redis-url", redis_server.url, "--db", str(db)]
    code, out, _ = run_cli(capsys, "verify", *args)
    assert code == 0 and "all checks passed" in out, out
    code, out, _ = run_cli(capsys, "stats", *args, "--json")
    stats = json.loads(out)
    assert code == 0 and (stats["backlog"], stats["pending"]) == (0, 0), stats
    code, out, _ = run_cli(capsys, "metrics", *args)
    assert code == 0 and "dualmem_redis_up 1" in out, out
    assert "dualmem_backlog 0" in out


def test_a_key_rotation_keeps_redis_and_sqlite_in_parity_and_a_tamper_still_fails(
    make_mem: Any,
    keyfile: Path,
    args: list[str],
    raw_redis: redis.Redis,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A rotation re-seals the row (through the stream) and the cache entry (in place)
    each with its own nonce: the bytes differ, the value does not. With the keyring,
    verify opens both and compares values; without it, it cannot tell and says so."""
    mem = make_mem()
    receipts = [mem.put(f"r{i}", {"i": i}, level=Level.PRIVATE, principal=CODER) for i in range(3)]
    mem.sync(receipts[-1], timeout=10)
    add_active_key(keyfile)
    rotation = rotate_keys(make_mem(), timeout=30)
    assert rotation.done and rotation.resealed_rows == rotation.resealed_cache == 3
    keyed = [*args, "--keyring", str(keyfile)]
    code, checks = report(capsys, keyed)
    parity = checks["redis <-> sqlite parity"]
    assert code == 0, parity
    assert parity["status"] == "ok"
    assert parity["summary"] == (
        "3 cache entries match (3 re-sealed apart by a key rotation: same value), 0 in flight"
    )
    # Without the key the two ciphertexts cannot be compared: a warning, not a failure
    # (headers that agree prove nothing: anyone can copy one).
    code, checks = report(capsys, args)
    parity = checks["redis <-> sqlite parity"]
    assert code == 0, parity
    assert parity["status"] == "warn"
    # None of the three is counted as a match: nothing compared their values.
    assert parity["summary"] == (
        "0 cache entries match, 3 re-sealed by a key rotation not judged (no keyring), 0 in flight"
    )
    # A cache entry holding another value (sealed with the active key) or an envelope
    # that does not open is still a failure, with the keyring or without it.
    scope = "agent:coder-1"
    codec = Codec(Keyring.load(keyfile))
    other = codec.seal({"i": 99}, scope=scope, key="r0", level=Level.PRIVATE)
    raw_redis.set(mem.layout.cache_key(mem.layout.shard_of(scope, "r0"), scope, "r0"), other)
    name = mem.layout.cache_key(mem.layout.shard_of(scope, "r1"), scope, "r1")
    flipped = bytearray(raw_redis.get(name))  # type: ignore[arg-type]
    flipped[-1] ^= 1
    raw_redis.set(name, bytes(flipped))
    code, checks = report(capsys, keyed)
    parity = checks["redis <-> sqlite parity"]
    assert code == 1
    assert sorted(parity["problems"]) == [
        "agent:coder-1/r0: the cached envelope holds another value than the SQLite row",
        f"agent:coder-1/r1: the cached envelope does not open: envelope failed "
        f"authentication for {scope}/r1 at level PRIVATE",
    ]
    code, checks = report(capsys, args)
    parity = checks["redis <-> sqlite parity"]
    assert code == 1
    assert parity["problems"] == [
        "agent:coder-1/r0: the cached envelope is another write than the SQLite row"
    ]


def test_a_put_landing_during_the_parity_scan_is_in_flight_not_a_failure(
    make_mem: Any, db_path: Path, raw_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The in-flight list was read once, before the cache scan: a put that reached Redis
    # in between was judged against the older committed row, "the cached envelope
    # differs from the SQLite row", a false failure while writes went on.
    from dualmem.layout import Layout
    from dualmem.ops import verify as verify_module

    first = make_mem()
    first.sync(first.put("k", {"v": 1}, level=Level.SWARM, principal=CODER), timeout=10)
    first.close(timeout=5)  # no worker from here on: the next put stays in the stream
    writer = make_mem(worker=False)
    real = verify_module._in_flight
    calls: list[int] = []

    def in_flight_then_a_put(*args: Any, **kwargs: Any) -> set[tuple[str, str]]:
        out = real(*args, **kwargs)
        if not calls:
            writer.put("k", {"v": 2}, level=Level.SWARM, principal=CODER)
        calls.append(1)
        return out

    monkeypatch.setattr(verify_module, "_in_flight", in_flight_then_a_put)
    conn = sqlite3.connect(db_path)
    try:
        check = verify_module.check_redis_parity(
            conn, raw_redis, Layout(writer.settings.namespace, 1), 2**62
        )
    finally:
        conn.close()
    assert check.ok, check.problems
    # The entry judged first is not judged after all: it is not counted as a match.
    assert check.summary == "0 cache entries match, 1 in flight"


def test_a_check_keeps_its_first_problems_and_counts_them_all(
    mem: DualMemory, args: list[str], db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A report keeps MAX_PROBLEMS texts per check and counts every problem: no test had
    # more than a few, so a list that grew past the bound, or a count that stopped at it
    # (the operator told of 21 broken links where there were 23), went unnoticed.
    from dualmem.ops.verify import MAX_PROBLEMS

    fill(mem)
    with sqlite3.connect(db_path) as conn:
        conn.execute("UPDATE journal SET actor = 'mallory'")  # every one of the 23 rows
    conn.close()
    code, checks = report(capsys, [*args, "--no-redis"])
    chain = checks["journal hash chain"]
    assert code == 1
    assert chain["problems"] == [
        f"seq {seq}: hash does not match the row's contents" for seq in range(1, MAX_PROBLEMS + 1)
    ]
    assert (chain["problem_count"], chain["summary"]) == (23, "23 broken link(s) in 23 rows")
    code, out, _ = run_cli(capsys, "verify", *args, "--no-redis")
    assert code == 1
    assert "journal hash chain: 23 problem(s)" in out and "... and 3 more" in out
    # The table's report lists every problem kept, not only the first.
    for seq in range(1, MAX_PROBLEMS + 1):
        assert f"  - seq {seq}: hash does not match the row's contents\n" in out, out


def test_verify_reads_chains_and_streams_past_their_first_page(
    make_mem: Callable[..., DualMemory],
    args: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The chains and the streams' in-flight commands are read in pages of 5,000 and no
    # test had a second page: a keyset walk that skipped the row after each page, or an
    # in-flight list that stopped after its first page (later puts then "cached in Redis
    # but no row in SQLite"), went unnoticed. Pages of 2 rows or entries here.
    from dualmem.ops import verify as verify_module

    first = make_mem()
    fill(first)
    first.close(timeout=5)  # no worker from here on: the next puts stay in the stream
    writer = make_mem(worker=False)
    for i in range(5):
        writer.put(f"p{i}", i, level=Level.SWARM, principal=CODER)
    monkeypatch.setattr(verify_module, "_CHUNK", 2)
    code, checks = report(capsys, args)
    assert code == 0, checks
    assert checks["journal hash chain"]["summary"] == "23 rows ok"
    assert checks["redis <-> sqlite parity"]["summary"] == "22 cache entries match, 5 in flight"


def test_the_cache_entries_of_purged_rows_are_no_parity_problem(
    make_mem: Callable[..., DualMemory], db_path: Path, raw_redis: redis.Redis
) -> None:
    # Purge removes a deleted record's tombstone and an expired record's row; the delete's
    # mark and the expired put's entry stay in Redis until cache_ttl. Neither is a value
    # Redis serves, and no test had them: verify calling them "cached in Redis but no row
    # in SQLite" would fail every verify after a purge.
    from dualmem.ops.maintenance import purge_database
    from dualmem.ops.verify import check_redis_parity

    mem = make_mem(purge_interval=3600)  # the worker's own purge stays out of the way
    mem.sync(mem.put("gone", 1, level=Level.SWARM, principal=CODER), timeout=10)
    mem.sync(mem.delete("gone", level=Level.SWARM, principal=CODER), timeout=10)
    mem.sync(mem.put("brief", 2, level=Level.SWARM, principal=CODER, ttl=60), timeout=10)
    later = int(time.time() * 1000) + 120_000  # past the ttl: no waiting for it
    purge_database(db_path, now_ms=later, tombstones_before_ms=later)
    conn = sqlite3.connect(db_path)
    try:
        left = conn.execute("SELECT count(*) FROM memory WHERE key IN ('gone', 'brief')")
        assert left.fetchone()[0] == 0
        check = check_redis_parity(conn, raw_redis, mem.layout, later)
    finally:
        conn.close()
    assert check.ok, check.problems
    assert check.summary == "2 cache entries match, 0 in flight"


def test_a_record_that_expires_while_verify_walks_the_chains_is_no_parity_problem(
    make_mem: Callable[..., DualMemory],
    db_path: Path,
    args: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # verify read the clock before its SQLite checks, which take minutes on a big file:
    # a record that expired meanwhile and that a purge turned into a tombstone was judged
    # as live by its cache entry ("deleted in SQLite but still cached in Redis"). Here the
    # chain walks are made to last until the record has expired and been purged.
    from dualmem.ops import verify as verify_module
    from dualmem.ops.maintenance import purge_database

    mem = make_mem(purge_interval=3600)  # the purge below is the only one
    t0 = time.monotonic()
    mem.sync(mem.put("brief", 1, level=Level.SWARM, principal=CODER, ttl=2), timeout=10)
    real = verify_module.verify_database

    def long_walks(conn: sqlite3.Connection, progress: Any) -> Any:
        checks = real(conn, progress)
        time.sleep(max(0.0, t0 + 2.2 - time.monotonic()))
        purge_database(db_path, now_ms=int(time.time() * 1000), tombstones_before_ms=0)
        return checks

    monkeypatch.setattr(verify_module, "verify_database", long_walks)
    code, checks = report(capsys, args)
    parity = checks["redis <-> sqlite parity"]
    assert code == 0 and parity["status"] == "ok", parity
    with sqlite3.connect(db_path) as conn:  # the purge did make it a tombstone
        row = conn.execute("SELECT envelope FROM memory WHERE key = 'brief'").fetchone()
    conn.close()
    assert row == (None,)


def test_redis_failing_during_the_anchors_check_fails_that_check_by_its_name(
    make_mem: Callable[..., DualMemory],
    db_path: Path,
    backend: str,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Redis went away after the parity check and before the anchors': its failure was
    # reported as a second "redis <-> sqlite parity" check (two checks of one name in the
    # JSON, the passed one beside it) and the anchors check was missing.
    from dualmem.ops import verify as verify_module

    if backend == "redis":
        srv = request.getfixturevalue("own_redis_server")
        mem = make_mem(redis_url=srv.url)
        stop_redis: Callable[[], None] = srv.kill
    else:
        from dualmem.redis_backend import memory_server

        mem = make_mem()

        def stop_redis() -> None:
            memory_server(mem.settings.redis_url).server.connected = False

    mem.sync(mem.put("k", 1, level=Level.SWARM, principal=CODER), timeout=10)
    real = verify_module.check_anchors

    def redis_goes_away(*a: Any, **kw: Any) -> Any:
        stop_redis()
        return real(*a, **kw)

    monkeypatch.setattr(verify_module, "check_anchors", redis_goes_away)
    code, out, _ = run_cli(capsys, "verify", "--redis-url", mem.settings.redis_url, "--db",
                           str(db_path), "--json")  # fmt: skip
    names = [c["name"] for c in json.loads(out)["checks"]]
    checks = {c["name"]: c for c in json.loads(out)["checks"]}
    assert code == 1 and len(names) == len(set(names)), names
    assert checks["redis <-> sqlite parity"]["status"] == "ok"
    anchors = checks["hash chain anchors"]
    assert anchors["status"] == "fail" and anchors["summary"] == "could not check", anchors
    assert "Redis is unavailable" in anchors["problems"][0]


def test_a_value_no_dualmem_writes_fails_its_check_and_the_others_still_run(
    mem: DualMemory, args: list[str], db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The anchored row's hash edited to a negative number: bytes() of it raises
    # ValueError, which would end verify with a traceback and no report if guarded()
    # let it through.
    fill_and_wait_for_the_anchors(mem, capsys, args)
    with sqlite3.connect(db_path) as conn:
        conn.execute("UPDATE journal SET hash = -1 WHERE seq = 23")
    conn.close()
    code, checks = report(capsys, args)
    assert code == 1
    assert checks["journal hash chain"]["problems"] == [
        "seq 23: prev_hash or hash is not a 32-byte hash"
    ]
    anchors = checks["hash chain anchors"]
    assert anchors["problems"] == ["a value no dualmem writes: ValueError: negative count"]
    assert "restore the newest backup" in anchors["fix"]


def test_a_pair_re_sealed_apart_while_a_rotation_runs_is_not_a_failure_without_the_key(
    make_mem: Callable[..., DualMemory],
    keyfile: Path,
    args: list[str],
    raw_redis: redis.Redis,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A running rotation re-seals cache entries and rows apart before its key_rotation
    # event is committed. verify without the key file knew only committed rotations: it
    # failed every such pair ("differs from the SQLite row") for as long as one ran. The
    # rotation's lock in Redis says one is running; the headers still condemn.
    scope = "agent:coder-1"
    mem = make_mem()
    mem.sync(mem.put("r", {"v": 1}, level=Level.PRIVATE, principal=CODER), timeout=10)
    name = mem.layout.cache_key(mem.layout.shard_of(scope, "r"), scope, "r")
    add_active_key(keyfile)
    codec = Codec(Keyring.load(keyfile))
    resealed = codec.reseal(
        bytes(raw_redis.get(name)),  # type: ignore[arg-type]
        scope=scope,
        key="r",
        level=Level.PRIVATE,
    )
    assert resealed is not None
    raw_redis.set(name, resealed)  # the rotation re-sealed the cache entry, not the row yet
    client, _ = connect(mem.settings)
    lock = RotationLock(client, mem.settings.namespace).acquire(5)
    try:
        code, checks = report(capsys, args)
        parity = checks["redis <-> sqlite parity"]
        assert (code, parity["status"]) == (0, "warn"), parity
        assert parity["summary"] == (
            "0 cache entries match, 1 re-sealed by a key rotation not judged (no keyring), "
            "0 in flight"
        )
        # Another write's header is another value, rotation or not.
        sealing = envelope_sealing(resealed)
        assert sealing is not None
        forged = codec.seal_bytes(
            b'{"v": 2}',
            scope=scope,
            key="r",
            level=Level.PRIVATE,
            sealing=sealing._replace(writer="mallory"),
        )
        raw_redis.set(name, forged)
        code, checks = report(capsys, args)
        assert code == 1
        assert checks["redis <-> sqlite parity"]["problems"] == [
            f"{scope}/r: the cached envelope is another write than the SQLite row"
        ]
        raw_redis.set(name, resealed)
    finally:
        lock.release()
        client.close()
    # No rotation running and none committed: nothing re-seals, the pair differs.
    code, checks = report(capsys, args)
    assert code == 1
    assert checks["redis <-> sqlite parity"]["problems"] == [
        f"{scope}/r: the cached envelope differs from the SQLite row"
    ]


def test_without_the_key_file_only_a_pair_a_rotation_resealed_goes_unjudged(
    make_mem: Callable[..., DualMemory],
    keyfile: Path,
    args: list[str],
    db_path: Path,
    raw_redis: redis.Redis,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Without the key, verify may leave a row and its cache entry whose bytes differ
    unjudged only when a key rotation re-sealed them apart: both encrypted, one write in
    both headers, the row written before the newest rotation. Any other such pair fails:
    a header agrees whenever it is copied (onto a flipped byte, say), and the second of
    two rotations re-seals the rows written since the first."""
    scope = "agent:coder-1"

    def name(key: str) -> bytes:
        return mem.layout.cache_key(mem.layout.shard_of(scope, key), scope, key)

    def flipped(envelope: bytes) -> bytes:
        out = bytearray(envelope)
        out[-1] ^= 1
        return bytes(out)

    mem = make_mem()
    mem.sync(mem.put("early", {"v": 1}, level=Level.PRIVATE, principal=CODER), timeout=10)
    mem.sync(mem.put("shared", {"v": 1}, level=Level.SWARM, principal=CODER), timeout=10)
    # No rotation yet: one byte flipped, header intact, is a failure, not "not judged".
    good = bytes(raw_redis.get(name("early")))  # type: ignore[arg-type]
    raw_redis.set(name("early"), flipped(good))
    code, checks = report(capsys, args)
    assert code == 1
    assert checks["redis <-> sqlite parity"]["problems"] == [
        f"{scope}/early: the cached envelope differs from the SQLite row"
    ]
    raw_redis.set(name("early"), good)
    # Two rotations with a write between them; one more write after the second.
    add_active_key(keyfile)
    assert rotate_keys(make_mem(), timeout=30).done
    between = make_mem()
    second = between.put("between", {"v": 2}, level=Level.PRIVATE, principal=CODER)
    between.sync(second, timeout=10)
    add_active_key(keyfile)
    assert rotate_keys(make_mem(), timeout=30).done
    late = make_mem()
    late.sync(late.put("late", {"v": 3}, level=Level.PRIVATE, principal=CODER), timeout=10)
    code, checks = report(capsys, args)
    parity = checks["redis <-> sqlite parity"]
    assert code == 0, parity
    assert parity["summary"] == (
        "2 cache entries match, 2 re-sealed by a key rotation not judged (no keyring), 0 in flight"
    )
    # Written after the newest rotation: nothing re-sealed it, a flipped byte differs.
    raw_redis.set(name("late"), flipped(bytes(raw_redis.get(name("late")))))  # type: ignore[arg-type]
    # A plaintext record's entry replaced by an encrypted envelope: no rotation seals
    # a plaintext row, whatever its age.
    shared = mem.layout.cache_key(mem.layout.shard_of("swarm:s1", "shared"), "swarm:s1", "shared")
    raw_redis.set(shared, good)
    # The write id of the row, another writer: another write, re-sealed or not.
    codec = Codec(Keyring.load(keyfile))
    sealing = envelope_sealing(bytes(raw_redis.get(name("early"))))  # type: ignore[arg-type]
    assert sealing is not None
    forged = codec.seal_bytes(
        b'{"v": 1}',
        scope=scope,
        key="early",
        level=Level.PRIVATE,
        sealing=sealing._replace(writer="mallory"),
    )
    raw_redis.set(name("early"), forged)
    code, checks = report(capsys, args)
    parity = checks["redis <-> sqlite parity"]
    assert code == 1
    assert sorted(parity["problems"]) == [
        f"{scope}/early: the cached envelope is another write than the SQLite row",
        f"{scope}/late: the cached envelope differs from the SQLite row",
        "swarm:s1/shared: the cached envelope differs from the SQLite row",
    ]
    # With the key file, a row that does not open is a failure, not a match.
    with sqlite3.connect(db_path) as conn:
        (row,) = conn.execute(
            "SELECT envelope FROM memory WHERE scope = ? AND key = 'between'", (scope,)
        ).fetchone()
        conn.execute(
            "UPDATE memory SET envelope = ? WHERE scope = ? AND key = 'between'",
            (flipped(row), scope),
        )
    conn.close()
    code, checks = report(capsys, [*args, "--keyring", str(keyfile)])
    assert code == 1
    assert (
        f"{scope}/between: the SQLite row does not open: envelope failed authentication "
        f"for {scope}/between at level PRIVATE" in checks["redis <-> sqlite parity"]["problems"]
    )


def test_a_sid_out_of_form_is_found_in_every_table_that_holds_one(
    mem: DualMemory, args: list[str], db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The ordering-ids check lists six tables; no test edited a sid in memory, decisions
    # or playbook_runs, so dropping any of them from the list went unnoticed (a sid set
    # back to another form sorts apart from every other: history and the projection's
    # "newer wins" then order that row wrongly).
    fill(mem)
    log = MissionLog(mem, CODER)
    mem.sync(log.record_decision("m1", "merge", "tests pass", "coder"), timeout=10)
    mem.sync(log.record_playbook_run("m1", "ship", "p", 1, 2, True), timeout=10)
    tables = ["memory", "journal", "missions", "tool_calls", "decisions", "playbook_runs"]
    with sqlite3.connect(db_path) as conn:
        for table in tables:
            conn.execute(
                f"UPDATE {table} SET sid = x'00' WHERE sid = (SELECT max(sid) FROM {table})"
            )
    conn.close()
    code, checks = report(capsys, [*args, "--no-redis"])
    assert code == 1
    assert checks["ordering ids"]["problems"] == [
        f"{table}: 1 row(s) whose sid is not a 16-byte ordering id" for table in tables
    ]


def test_a_mission_placeholder_is_no_bad_ordering_id(tmp_path: Path) -> None:
    # A child committed before its mission (another shard, another worker) leaves the
    # mission a placeholder row with sid 0 until the mission's record arrives: a healthy
    # state, which no verify test had (every check must pass on it).
    from dualmem.ops.database import open_database
    from dualmem.ops.verify import verify_database
    from dualmem.projection import child_key
    from dualmem.sqlite_store import SQLiteStore

    from .test_missions import call_value, put_entry

    store = SQLiteStore(tmp_path / "p.db")
    try:
        store.apply([put_entry(10, child_key("tool_call", "m", "c1"), call_value("m", "c1", 10))])
    finally:
        store.close()
    with open_database(tmp_path / "p.db") as conn:
        (placeholders,) = conn.execute("SELECT count(*) FROM missions WHERE sid = 0").fetchone()
        checks = verify_database(conn)
    assert placeholders == 1
    assert [(c.name, c.status) for c in checks if c.status != "ok"] == []


def test_the_orphan_warning_names_five_and_counts_the_rest(
    mem: DualMemory, args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # The warning after a plain delete of a mission names its first five orphaned records
    # and says how many more there are: no test had five or more, so a warning that
    # named six, or ended "and 0 more" with exactly five, went unnoticed.
    from dualmem.projection import mission_key

    log = MissionLog(mem, CODER)
    mem.sync(log.start_mission("m1", "p"), timeout=10)
    calls = [log.record_tool_call("m1", f"t{i}", {}, None, 1, True) for i in range(5)]
    mem.sync(calls[-1], timeout=10)
    mem.sync(mem.delete(mission_key("m1"), level=Level.PROJECT, principal=CODER), timeout=10)
    code, checks = report(capsys, [*args, "--no-redis"])
    projection = checks["mission projection"]
    assert code == 0 and projection["status"] == "warn", projection
    named = sorted(f"project:shop {r.key}" for r in calls)
    assert projection["summary"].endswith(
        ", 5 orphaned record(s) (older than their mission's delete)"
    )
    assert projection["fix"].endswith(": " + ", ".join(named))
    # The table says how to fix a warning too (it could keep quiet: every test read --json).
    code, out, _ = run_cli(capsys, "verify", *args, "--no-redis")
    assert code == 0 and f"mission projection: {projection['fix']}\n" in out, out
    mem.sync(log.start_mission("m2", "p"), timeout=10)
    one_more = log.record_tool_call("m2", "t", {}, None, 1, True)
    mem.sync(one_more, timeout=10)
    mem.sync(mem.delete(mission_key("m2"), level=Level.PROJECT, principal=CODER), timeout=10)
    code, checks = report(capsys, [*args, "--no-redis"])
    projection = checks["mission projection"]
    assert code == 0 and "6 orphaned record(s)" in projection["summary"], projection
    named = sorted([*named, f"project:shop {one_more.key}"])
    assert projection["fix"].endswith(": " + ", ".join(named[:5]) + " and 1 more")


def test_a_schema_4_file_has_its_ordering_ids_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Schema 4 made every ordering id 16 bytes; verify checks them from that version on.
    # A file migrated to 4 and not further (`migrate --to 4`, or a deployment paused
    # between steps) had no test: a check that began at 5 went unnoticed.
    import shutil

    db = tmp_path / "v4.db"
    shutil.copyfile(Path(__file__).parent / "data" / "schema_v1.db", db)
    assert run_cli(capsys, "migrate", "--db", str(db), "--to", "4")[0] == 0
    code, checks = report(capsys, ["--db", str(db), "--no-redis"])
    assert code == 1  # older than this dualmem: the schema check says to migrate
    assert checks["schema version"]["summary"] == f"4 (this dualmem: {SCHEMA_VERSION})"
    assert checks["ordering ids"]["status"] == "ok", checks["ordering ids"]
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE memory SET sid = x'00' WHERE sid = (SELECT max(sid) FROM memory)")
    conn.close()
    code, checks = report(capsys, ["--db", str(db), "--no-redis"])
    assert checks["ordering ids"]["problems"] == [
        "memory: 1 row(s) whose sid is not a 16-byte ordering id"
    ]
