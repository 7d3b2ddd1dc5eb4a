"""The mission log: writes through the put path, projection by the worker, reads from SQLite,
on fakeredis and a real redis-server; plus the projection on SQLiteStore alone."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from acl import AccessDenied, Codec, Level, Principal, ValidationError
from dualmem import DualMemory, NotPersisted
from dualmem.commands import Receipt, delete_fields, put_fields
from dualmem.missions import MissionLog
from dualmem.ops.verify import check_projections
from dualmem.projection import Decision, PlaybookRun, ToolCall, child_key, mission_key
from dualmem.sqlite_store import SQLiteStore
from dualmem.store import StreamEntry

from .conftest import redis_fields, wait_until

LEAD = Principal(agent_id="lead", team="backend", swarm="s1", project="shop")
RIVAL = Principal(agent_id="rival", team="other", project="rival-shop")


def sync_all(mem: DualMemory, receipts: list[Receipt]) -> None:
    for r in receipts:
        mem.sync(r, timeout=10)


def raw_db(db_path: Path) -> sqlite3.Connection:
    return sqlite3.connect(db_path)


def test_a_mission_round_trip_through_the_put_path(mem: DualMemory, db_path: Path) -> None:
    log = MissionLog(mem, LEAD)
    rs = [log.start_mission("auth-7", "design", {"owner": "backend", "n": 1})]
    rs.append(log.record_tool_call("auth-7", "grep", {"q": "login"}, {"hits": 3}, 12.5, True))
    time.sleep(0.002)
    cut = time.time_ns() // 1_000_000
    time.sleep(0.002)
    rs.append(log.record_tool_call("auth-7", "pytest", ["-q"], None, 900, False, "2 failed"))
    rs.append(log.record_decision("auth-7", "approach", "tokens beat sessions", "architect"))
    rs.append(log.record_playbook_run("auth-7", "deploy", "staging", cut - 50, cut, True))
    rs.append(log.update_mission("auth-7", phase="build", status="in_progress"))
    sync_all(mem, rs)

    m = log.get_mission("auth-7")
    assert m is not None
    assert (m.status, m.phase, m.metadata, m.scope) == (
        "in_progress",
        "build",
        {"owner": "backend", "n": 1},
        "project:shop",
    )
    assert m.completed_at is None and m.updated_at >= m.started_at
    calls = log.tool_calls("auth-7")
    assert [c.tool_name for c in calls] == ["grep", "pytest"]
    assert calls[0].args == {"q": "login"} and calls[0].result == {"hits": 3}
    assert calls[1].error == "2 failed" and calls[1].success is False
    assert [c.tool_name for c in log.tool_calls("auth-7", success=False)] == ["pytest"]
    assert [c.tool_name for c in log.tool_calls("auth-7", since=cut)] == ["pytest"]
    assert [d.rationale for d in log.decisions("auth-7")] == ["tokens beat sessions"]
    runs = log.playbook_runs("auth-7")
    assert [(r.playbook_name, r.completed_at - r.started_at) for r in runs] == [("deploy", 50)]

    sync_all(mem, [log.update_mission("auth-7", status="completed")])
    done = log.get_mission("auth-7")
    assert done is not None and done.status == "completed" and done.completed_at is not None
    assert [m.mission_id for m in log.list_missions(status="completed")] == ["auth-7"]
    assert log.list_missions(status="in_progress") == []

    # Stored as the issue asks: integer epoch ms, valid JSON columns, one row per record.
    with raw_db(db_path) as conn:
        row = conn.execute(
            "SELECT typeof(called_at), json_valid(args), json_valid(result) FROM tool_calls"
        ).fetchall()
        assert row == [("integer", 1, 1)] * 2
        assert conn.execute(
            "SELECT typeof(started_at), typeof(completed_at) FROM missions"
        ).fetchone() == ("integer", "integer")
        assert conn.execute(
            "SELECT json_extract(metadata, '$.owner') FROM missions"
        ).fetchone() == ("backend",)


def test_illegal_transitions_and_unknown_missions_are_rejected_before_any_write(
    mem: DualMemory,
) -> None:
    log = MissionLog(mem, LEAD)
    sync_all(mem, [log.start_mission("m1", "plan", status="pending")])
    # sync() returns at the commit and the ack follows it: wait for a settled backlog.
    wait_until(lambda: mem.backlog() == {0: 0}, what="the ack after the commit")
    before = mem.backlog()
    with pytest.raises(ValidationError, match="from pending to completed"):
        log.update_mission("m1", status="completed")
    with pytest.raises(ValidationError, match="status must be one of"):
        log.update_mission("m1", status="done")
    with pytest.raises(ValidationError, match="already exists"):
        log.start_mission("m1", "plan")
    with pytest.raises(ValidationError, match="unknown mission"):
        log.record_tool_call("nope", "grep", {}, {}, 1, True)
    with pytest.raises(ValidationError, match="unknown mission"):
        log.update_mission("nope", status="failed")
    with pytest.raises(ValidationError, match="must not contain '/'"):
        log.start_mission("a/b", "plan")
    with pytest.raises(ValidationError, match="duration_ms"):
        log.record_tool_call("m1", "grep", {}, {}, -1, True)
    with pytest.raises(ValidationError, match="before started_at"):
        log.record_playbook_run("m1", "deploy", "x", 100, 50, True)
    with pytest.raises(ValidationError, match="JSON"):
        log.record_tool_call("m1", "grep", {"f": object()}, {}, 1, True)
    assert mem.backlog() == before  # nothing reached the stream

    # The check sees the newest state even before the worker commits it (Redis cache).
    log.update_mission("m1", status="in_progress")
    log.update_mission("m1", status="failed")
    with pytest.raises(ValidationError, match="from failed to in_progress"):
        log.update_mission("m1", status="in_progress")
    # A delete too: an update right after it used to read SQLite's copy, succeed, and
    # (a newer stream id than the delete) bring the mission back once committed.
    log.delete_mission("m1")
    with pytest.raises(ValidationError, match="unknown mission"):
        log.update_mission("m1", status="completed")
    with pytest.raises(ValidationError, match="unknown mission"):
        log.record_tool_call("m1", "grep", {}, {}, 1, True)


def test_delete_cascades_to_the_mission_tables(mem: DualMemory, db_path: Path) -> None:
    log = MissionLog(mem, LEAD)
    rs = [log.start_mission("m1", "p"), log.start_mission("m2", "p")]
    for mid in ("m1", "m2"):
        rs.append(log.record_tool_call(mid, "t", {}, {}, 1, True))
        rs.append(log.record_decision(mid, "d", "r", "a"))
        rs.append(log.record_playbook_run(mid, "pb", "x", 1, 2, True))
    sync_all(mem, rs)
    receipts = log.delete_mission("m1")
    # The mission's delete first (a late child cannot bring it back), then its records.
    assert [r.key for r in receipts][:1] == [mission_key("m1")] and len(receipts) == 4
    sync_all(mem, receipts)
    assert log.get_mission("m1") is None and log.tool_calls("m1") == []
    with raw_db(db_path) as conn:
        for table in ("missions", "tool_calls", "decisions", "playbook_runs"):
            assert conn.execute(f"SELECT DISTINCT mission_id FROM {table}").fetchall() == [("m2",)]
        fks = {
            r[2]: r[-2]
            for t in ("tool_calls", "decisions", "playbook_runs")
            for r in conn.execute(f"PRAGMA foreign_key_list({t})")
        }
        assert fks == {"missions": "CASCADE"}
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    # The records themselves are gone too, not only their projection.
    assert mem.query(principal=LEAD, level=Level.PROJECT, prefix="_dm/tool_call/m1/") == []


def test_reads_use_the_indexes(mem: DualMemory) -> None:
    store = mem.store
    assert isinstance(store, SQLiteStore)
    conn = store._conn()
    seen: list[str] = []
    conn.set_trace_callback(seen.append)  # the statements as run, parameters expanded
    try:
        store.missions("project:shop", status="pending")
        store.missions("project:shop")
        store.mission("project:shop", "m")
        store.tool_calls("project:shop", "m", since=5, success=True)
        store.tool_calls("project:shop", "m")
        store.decisions("project:shop", "m")
        store.playbook_runs("project:shop", "m")
        store.stale_children("project:shop", "m")
    finally:
        conn.set_trace_callback(None)
    assert len(seen) == 8
    for sql in seen:
        plan = " ".join(str(r[-1]) for r in conn.execute("EXPLAIN QUERY PLAN " + sql))
        assert "USING INDEX" in plan or "USING PRIMARY KEY" in plan, (sql, plan)
        assert "SCAN" not in plan and "TEMP B-TREE" not in plan, (sql, plan)


def test_encrypted_levels_are_never_projected_and_still_readable(
    mem: DualMemory, db_path: Path
) -> None:
    log = MissionLog(mem, LEAD, level=Level.TEAM)
    secret = "sk-live-4f7a9c1e-never-in-plaintext"
    rs = [log.start_mission("t1", "design", {"token": secret})]
    rs.append(log.record_tool_call("t1", "vault", {"key": secret}, {"ok": True}, 3, True))
    rs.append(log.record_tool_call("t1", "vault", {"key": "x"}, None, 3, False))
    rs.append(log.record_decision("t1", "rotate", secret, "security"))
    sync_all(mem, rs)
    sync_all(mem, [log.update_mission("t1", status="completed")])
    mission = log.get_mission("t1")
    assert (
        mission is not None
        and mission.metadata == {"token": secret}
        and mission.status == "completed"
    )
    assert [m.mission_id for m in log.list_missions(status="completed")] == ["t1"]
    assert [c.args for c in log.tool_calls("t1", success=True)] == [{"key": secret}]
    assert [d.rationale for d in log.decisions("t1")] == [secret]
    # A PROJECT-level mission log does not see the TEAM one.
    assert MissionLog(mem, LEAD).get_mission("t1") is None
    with raw_db(db_path) as conn:
        for table in ("missions", "tool_calls", "decisions", "playbook_runs"):
            assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    raw = b"".join(
        p.read_bytes() for p in db_path.parent.iterdir() if p.name.startswith(db_path.name)
    )
    assert secret.encode() not in raw


def test_a_private_tool_call_in_a_project_mission(mem: DualMemory) -> None:
    log = MissionLog(mem, LEAD)
    rs = [log.start_mission("m", "p")]
    rs.append(
        log.record_tool_call(
            "m", "login", {"password": "hunter2"}, {}, 1, True, level=Level.PRIVATE
        )
    )
    rs.append(log.record_tool_call("m", "grep", {}, {}, 1, True))
    sync_all(mem, rs)
    assert [c.tool_name for c in log.tool_calls("m")] == ["grep"]
    private = log.tool_calls("m", level=Level.PRIVATE)
    assert [(c.tool_name, c.args, c.scope) for c in private] == [
        ("login", {"password": "hunter2"}, "agent:lead")
    ]


def test_access_is_scoped_and_denials_are_audited(mem: DualMemory) -> None:
    sync_all(mem, [MissionLog(mem, LEAD).start_mission("m", "p")])
    assert MissionLog(mem, RIVAL).get_mission("m") is None  # another project's scope
    loner = Principal(agent_id="loner")
    with pytest.raises(AccessDenied):
        MissionLog(mem, loner).list_missions()
    with pytest.raises(AccessDenied):
        MissionLog(mem, loner).start_mission("m", "p")


def test_a_malformed_reserved_record_is_dead_lettered_and_the_rest_flows(
    make_mem: Callable[..., DualMemory],
) -> None:
    mem = make_mem(max_deliveries=1, claim_idle_ms=50)
    bad = mem.put(
        mission_key("m9"),
        {"mission_id": "m9", "status": "bogus"},
        level=Level.PROJECT,
        principal=LEAD,
    )
    good = MissionLog(mem, LEAD).start_mission("m1", "p")
    mem.sync(good, timeout=10)
    with pytest.raises(NotPersisted, match="dead-lettered"):
        mem.sync(bad, timeout=10)
    dead = mem.store.dead_letters()
    assert len(dead) == 1 and "not a valid mission record" in dead[0].error
    assert "status must be one of" in dead[0].error


# -- the projection on SQLiteStore alone (no Redis) ------------------------------------------

CODEC = Codec(None)


def put_entry(ms: int, key: str, value: object, scope: str = "project:shop") -> StreamEntry:
    env = CODEC.seal(value, scope=scope, key=key, level=Level.PROJECT)
    f = put_fields(scope, key, Level.PROJECT, "lead", ms * 1000, env, None)
    return StreamEntry(0, f"{ms}-0", redis_fields(f))


def del_entry(ms: int, key: str, scope: str = "project:shop") -> StreamEntry:
    f = delete_fields(scope, key, Level.PROJECT, "lead", ms * 1000)
    return StreamEntry(0, f"{ms}-0", redis_fields(f))


def mission_value(mid: str, status: str, ts: int) -> dict[str, object]:
    return {
        "mission_id": mid,
        "phase": "p",
        "status": status,
        "metadata": {},
        "started_at": ts,
        "updated_at": ts,
        "completed_at": None,
    }


def call_value(mid: str, cid: str, ts: int) -> dict[str, object]:
    return {
        "mission_id": mid,
        "call_id": cid,
        "tool_name": "t",
        "args": {},
        "result": None,
        "duration_ms": 1.0,
        "success": True,
        "error": None,
        "called_at": ts,
    }


@pytest.fixture
def store(tmp_path: Path) -> SQLiteStore:
    s = SQLiteStore(tmp_path / "p.db")
    yield s  # type: ignore[misc]
    s.close()


def test_a_child_before_its_mission_keeps_the_foreign_key(store: SQLiteStore) -> None:
    store.apply([put_entry(10, child_key("tool_call", "m", "c1"), call_value("m", "c1", 10))])
    assert store.mission("project:shop", "m") is None  # placeholder, hidden from reads
    assert [c.call_id for c in store.tool_calls("project:shop", "m")] == ["c1"]
    store.apply([put_entry(5, mission_key("m"), mission_value("m", "in_progress", 5))])
    m = store.mission("project:shop", "m")
    assert m is not None and m.status == "in_progress"


def test_a_record_with_a_blank_name_an_older_version_wrote_is_still_projected(
    store: SQLiteStore,
) -> None:
    # MissionLog refuses a name of white space only now; records an older version wrote
    # with one may still be in a stream, and refusing them in the projection would
    # dead-letter history.
    store.apply(
        [
            put_entry(
                10,
                child_key("tool_call", "m", "c1"),
                {**call_value("m", "c1", 10), "tool_name": " "},
            )
        ]
    )
    assert [c.tool_name for c in store.tool_calls("project:shop", "m")] == [" "]


def test_a_record_the_columns_refuse_fails_alone_and_the_batch_commits(
    store: SQLiteStore,
) -> None:
    # NaN: the JSON reader accepts it, the projection's columns (strict JSON) do not. It
    # used to raise out of apply, so the worker retried that batch forever and its shard
    # stalled; now the entry fails alone (then is retried and dead-lettered, like any
    # poison entry) and the rest of the batch commits.
    bad = put_entry(
        10, child_key("tool_call", "m", "c1"), {**call_value("m", "c1", 10), "args": "NAN!"}
    )
    env = bad.fields[b"e"]
    assert env.count(b'"NAN!"') == 1  # levels 3 and 4 are plain JSON in the envelope
    bad.fields[b"e"] = env.replace(b'"NAN!"', b"NaN")
    good = put_entry(11, child_key("tool_call", "m", "c2"), call_value("m", "c2", 11))
    result = store.apply([bad, good])
    assert [e.stream_id for e, _ in result.failed] == ["10-0"]
    assert "not a valid tool_call record" in result.failed[0][1]
    assert result.applied == 1 and [e.stream_id for e in result.done] == ["11-0"]
    assert [c.call_id for c in store.tool_calls("project:shop", "m")] == ["c2"]


def test_a_record_nested_too_deep_to_parse_fails_alone(store: SQLiteStore) -> None:
    # put refuses values nested deeper than 100 levels; a stream entry written straight
    # into Redis is not bound by that. The JSON reader's RecursionError must stay a
    # malformed record (the envelope reader turns it into one), not an unexpected error
    # the worker retries forever while nothing else arrives.
    bad = put_entry(10, child_key("tool_call", "m", "c1"), {**call_value("m", "c1", 10)})
    env, depth = bad.fields[b"e"], 100_000
    assert env.count(b'"args":{}') == 1  # levels 3 and 4 are plain JSON in the envelope
    bad.fields[b"e"] = env.replace(b'"args":{}', b'"args":' + b"[" * depth + b"]" * depth)
    good = put_entry(11, child_key("tool_call", "m", "c2"), call_value("m", "c2", 11))
    result = store.apply([bad, good])
    assert [e.stream_id for e, _ in result.failed] == ["10-0"]
    assert "not a valid tool_call record" in result.failed[0][1]
    assert [c.call_id for c in store.tool_calls("project:shop", "m")] == ["c2"]


def test_projection_is_idempotent_and_never_goes_back(store: SQLiteStore) -> None:
    newer = put_entry(20, mission_key("m"), mission_value("m", "completed", 20))
    older = put_entry(10, mission_key("m"), mission_value("m", "in_progress", 10))
    store.apply([newer])
    store.apply([older, newer])  # late older command, and a redelivery
    m = store.mission("project:shop", "m")
    assert m is not None and m.status == "completed"


def test_a_late_child_cannot_revive_a_deleted_mission(store: SQLiteStore) -> None:
    store.apply([put_entry(10, mission_key("m"), mission_value("m", "in_progress", 10))])
    store.apply([del_entry(20, mission_key("m"))])
    store.apply(
        [
            put_entry(
                15,
                child_key("decision", "m", "d1"),
                {
                    "mission_id": "m",
                    "decision_id": "d1",
                    "decision_type": "x",
                    "rationale": "",
                    "agent_name": "a",
                    "decided_at": 15,
                },
            )
        ]
    )
    assert store.mission("project:shop", "m") is None
    assert store.decisions("project:shop", "m") == []
    # Not even a placeholder (sid 0) is left for it: only a child newer than the delete
    # gets one.
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("SELECT count(*) FROM missions").fetchone()[0] == 0
    conn.close()


def test_an_older_mission_delete_applied_late_keeps_the_newer_deletes_mark(
    store: SQLiteStore,
) -> None:
    # Two deletes of one mission, the older applied last (a claimed or replayed entry):
    # the mark must stay at the newer one, or a child written between the two deletes
    # and applied late is projected into the deleted mission.
    tc = child_key("tool_call", "m", "c1")
    store.apply([put_entry(10, mission_key("m"), mission_value("m", "in_progress", 10))])
    store.apply([del_entry(20, mission_key("m"))])
    store.apply([del_entry(12, mission_key("m"))])
    store.apply([put_entry(15, tc, call_value("m", "c1", 15))])
    assert store.tool_calls("project:shop", "m") == []
    assert store.mission("project:shop", "m") is None


def test_a_late_older_put_cannot_revive_a_deleted_mission_or_tool_call(
    store: SQLiteStore, tmp_path: Path
) -> None:
    # A dead consumer's entries are claimed after the deletes committed (or replayed from
    # the dead-letter table): memory keeps its tombstones, and the projection must agree.
    store.apply([put_entry(10, mission_key("m"), mission_value("m", "in_progress", 10))])
    store.apply([put_entry(11, child_key("tool_call", "m", "c1"), call_value("m", "c1", 11))])
    store.apply([del_entry(30, child_key("tool_call", "m", "c1")), del_entry(31, mission_key("m"))])
    store.apply(
        [
            put_entry(20, mission_key("m"), mission_value("m", "completed", 20)),
            put_entry(21, child_key("tool_call", "m", "c1"), call_value("m", "c1", 21)),
        ]
    )
    assert store.get("project:shop", mission_key("m"), 0) is None
    assert store.mission("project:shop", "m") is None
    assert store.missions("project:shop") == []
    assert store.tool_calls("project:shop", "m") == []
    # A tool call deleted alone, its mission alive: the late put does not revive it either,
    # and a newer put of it still projects.
    store.apply([put_entry(40, mission_key("m2"), mission_value("m2", "in_progress", 40))])
    store.apply([del_entry(50, child_key("tool_call", "m2", "c2"))])
    store.apply([put_entry(45, child_key("tool_call", "m2", "c2"), call_value("m2", "c2", 45))])
    assert store.tool_calls("project:shop", "m2") == []
    store.apply([put_entry(60, child_key("tool_call", "m2", "c2"), call_value("m2", "c2", 60))])
    assert [c.call_id for c in store.tool_calls("project:shop", "m2")] == ["c2"]
    with sqlite3.connect(store.path) as conn:
        assert check_projections(conn).status == "ok"
    conn.close()


def test_mission_log_records_cannot_expire(mem: DualMemory, store: SQLiteStore) -> None:
    # Expiry makes the memory row a tombstone with no command, so nothing would remove
    # the projected row: after a purge, verify failed on a healthy database.
    with pytest.raises(ValidationError, match="cannot expire"):
        mem.put(mission_key("m"), mission_value("m", "pending", 1), level=4, principal=LEAD, ttl=60)
    mem.put("_dm/not-projected", 1, level=4, principal=LEAD, ttl=60)  # other keys may
    mem.put(mission_key("m"), {"secret": 1}, level=2, principal=LEAD, ttl=60)  # not projected
    # A command that gets past put (another writer) fails alone in the worker.
    env = CODEC.seal(
        mission_value("m", "pending", 1),
        scope="project:shop",
        key=mission_key("m"),
        level=Level.PROJECT,
    )
    f = put_fields("project:shop", mission_key("m"), Level.PROJECT, "lead", 1000, env, 10**13)
    entry = StreamEntry(0, "1-0", redis_fields(f))
    result = store.apply([entry])
    assert "cannot expire" in result.failed[0][1]
    assert store.mission("project:shop", "m") is None


def test_a_record_whose_ids_do_not_match_its_key_fails_alone(store: SQLiteStore) -> None:
    good = put_entry(10, mission_key("m"), mission_value("m", "pending", 10))
    bad = put_entry(11, child_key("tool_call", "m", "c1"), call_value("m", "other", 11))
    result = store.apply([good, bad])
    assert result.applied == 1 and [e.stream_id for e, _ in result.failed] == ["11-0"]
    assert "call_id in the value does not match the key" in result.failed[0][1]


@pytest.mark.parametrize("level", [Level.TEAM, Level.PROJECT])
def test_a_junk_mission_record_is_a_tampered_record_not_a_value_error(
    make_mem: Callable[..., DualMemory], level: Level
) -> None:
    # Any member of the scope can put anything under the mission log's keys: get_mission
    # and start_mission let the parser's ValueError out, which is not a DualMemError.
    from dualmem import DualMemError, TamperedRecord

    mem = make_mem()
    receipt = mem.put(mission_key("x"), {"secret": 1}, level=level, principal=LEAD)
    if level is Level.TEAM:
        mem.sync(receipt, timeout=10)
    # At PROJECT the worker's projection refuses it (dead-lettered); its cache entry stays.
    log = MissionLog(mem, LEAD, level=level)
    with pytest.raises(TamperedRecord, match="does not hold a mission record"):
        log.start_mission("x", "p")  # reads the record as it is now (fresh)
    if level is Level.TEAM:  # at PROJECT the projection refused it: no row, no mission
        with pytest.raises(DualMemError):
            log.get_mission("x")


def _projection_ok(store: SQLiteStore) -> bool:
    with sqlite3.connect(store.path) as conn:
        check = check_projections(conn)
    conn.close()
    return check.status == "ok"


def test_a_child_written_after_a_delete_is_projected_when_the_mission_comes_back(
    store: SQLiteStore,
) -> None:
    # A tool call recorded while another process deleted its mission, then the mission
    # id used again: the call is live in memory but was never projected (the delete's
    # tombstone refused it), so log.tool_calls hid it and verify failed.
    tc = child_key("tool_call", "m", "c1")
    store.apply([put_entry(10, mission_key("m"), mission_value("m", "in_progress", 10))])
    store.apply([del_entry(20, mission_key("m"))])
    store.apply([put_entry(21, tc, call_value("m", "c1", 21))])
    store.apply([put_entry(30, mission_key("m"), mission_value("m", "pending", 30))])
    assert store.get("project:shop", tc, 0) is not None
    assert [c.call_id for c in store.tool_calls("project:shop", "m")] == ["c1"]
    assert _projection_ok(store)


def test_a_mission_delete_applied_late_keeps_its_newer_children(store: SQLiteStore) -> None:
    # Workers apply out of order: the call (21) lands before the mission's delete (20);
    # the delete's cascade took the newer call's row with it.
    tc = child_key("tool_call", "m", "c1")
    store.apply([put_entry(10, mission_key("m"), mission_value("m", "in_progress", 10))])
    store.apply([put_entry(21, tc, call_value("m", "c1", 21))])
    store.apply([del_entry(20, mission_key("m"))])
    assert [c.call_id for c in store.tool_calls("project:shop", "m")] == ["c1"]
    assert store.mission("project:shop", "m") is None
    assert _projection_ok(store)


def test_a_mission_delete_applied_late_keeps_its_newer_decision(
    store: SQLiteStore,
) -> None:
    # As for a tool call: the placeholder the mission leaves behind holds the foreign key
    # of a newer decision, so it stays while the decision does.
    decision = {
        "mission_id": "m",
        "decision_id": "d1",
        "decision_type": "x",
        "rationale": "",
        "agent_name": "a",
        "decided_at": 21,
    }
    store.apply([put_entry(10, mission_key("m"), mission_value("m", "in_progress", 10))])
    store.apply([put_entry(21, child_key("decision", "m", "d1"), decision)])
    store.apply([del_entry(20, mission_key("m"))])
    assert [d.decision_id for d in store.decisions("project:shop", "m")] == ["d1"]
    assert store.mission("project:shop", "m") is None
    assert _projection_ok(store)


def test_a_mission_delete_outlives_its_purged_tombstone(store: SQLiteStore) -> None:
    # The tombstone in memory was the only mark of the delete: once purge removed it,
    # verify failed on a healthy database, and a replayed older child came back.
    from dualmem.commands import replay_fields

    tc = child_key("tool_call", "m", "c1")
    late = put_entry(15, tc, call_value("m", "c1", 15))
    # The mission's own older put too: its projection was refused by the tombstone alone.
    late_mission = put_entry(16, mission_key("m"), mission_value("m", "completed", 16))
    store.apply([put_entry(10, mission_key("m"), mission_value("m", "in_progress", 10))])
    store.dead_letter([(late, "OperationalError: disk I/O error", 3)])
    store.dead_letter([(late_mission, "OperationalError: disk I/O error", 3)])
    store.apply([del_entry(20, mission_key("m"))])
    store.apply([put_entry(21, child_key("tool_call", "m", "c2"), call_value("m", "c2", 21))])
    store.mark_replayed([d.id for d in store.dead_letters()])  # let purge take the tombstone
    assert store.purge(now_ms=10**13, tombstones_before_ms=10**13) > 0
    assert store.get("project:shop", mission_key("m"), 0) is None
    assert _projection_ok(store)
    store.apply([StreamEntry(0, "100-0", replay_fields(late.fields, late.stream_id))])
    store.apply([StreamEntry(0, "101-0", replay_fields(late_mission.fields, "16-0"))])
    assert [c.call_id for c in store.tool_calls("project:shop", "m")] == ["c2"]
    assert store.mission("project:shop", "m") is None
    assert store.missions("project:shop") == []
    # The replayed call is a live record of the deleted mission, listed at no level:
    # verify passes and names it, as it does any orphan of a plain mission delete.
    with sqlite3.connect(store.path) as conn:
        check = check_projections(conn)
    conn.close()
    assert check.status == "warn" and check.problems == []
    assert "1 orphaned record(s)" in check.summary and f"project:shop {tc}" in check.fix


def test_a_missions_newest_delete_in_its_scope_makes_its_sealed_children_stale(
    store: SQLiteStore,
) -> None:
    # At an encrypted level nothing is projected: the journal's deletes of the mission's
    # record alone tell which children are stale (MissionLog) or orphaned (verify).
    scope, mission, envelope = "agent:lead", mission_key("m"), b"sealed, never opened here"

    def entry(ms: int, key: str, *, deleted: bool = False, in_scope: str = scope) -> StreamEntry:
        if deleted:
            f = delete_fields(in_scope, key, Level.PRIVATE, "lead", ms * 1000)
        else:
            f = put_fields(in_scope, key, Level.PRIVATE, "lead", ms * 1000, envelope, None)
        return StreamEntry(0, f"{ms}-0", redis_fields(f))

    calls = [child_key("tool_call", "m", c) for c in ("c1", "c2", "c3")]
    for e in [
        entry(10, mission),
        entry(11, calls[0]),
        entry(20, mission, deleted=True),
        entry(21, mission),
        entry(22, calls[1]),
        entry(30, mission, deleted=True),  # the newest delete
        entry(31, mission),
        entry(32, calls[2]),
        entry(33, mission),  # a put of the record: no delete
        entry(40, mission, deleted=True, in_scope="agent:other"),  # another scope's mission
    ]:
        store.apply([e])
    assert store.stale_children(scope, "m") == calls[:2]
    assert store.stale_children("agent:other", "m") == []
    with contextlib.closing(sqlite3.connect(store.path)) as conn:
        check = check_projections(conn)
    assert check.status == "warn" and check.problems == [], (check.summary, check.problems)
    assert "2 orphaned record(s)" in check.summary
    assert f"{scope} {calls[0]}, {scope} {calls[1]}" in check.fix and calls[2] not in check.fix


def test_verify_finds_a_projected_row_edited_by_hand(store: SQLiteStore) -> None:
    # Verify compared sids only: a mission marked completed and a failed tool call marked
    # successful in the tables (what MissionLog reads) passed as "2 rows ok".
    tc = child_key("tool_call", "m", "c1")
    store.apply([put_entry(10, mission_key("m"), mission_value("m", "in_progress", 10))])
    store.apply([put_entry(11, tc, call_value("m", "c1", 11))])
    assert _projection_ok(store)
    with sqlite3.connect(store.path) as conn:
        conn.execute("UPDATE missions SET status = 'completed', completed_at = 99")
        conn.execute("UPDATE tool_calls SET tool_name = 'rm -rf'")
    conn.close()
    with sqlite3.connect(store.path) as conn:
        check = check_projections(conn)
    conn.close()
    assert check.status == "fail"
    assert sorted(check.problems) == [
        "project:shop mission m: projected row differs from its record",
        "project:shop tool_call m/c1: projected row differs from its record",
    ]


def test_verify_finds_a_projected_row_set_back_to_an_older_version(store: SQLiteStore) -> None:
    # Same contents, an older version's sid: the row reads right, but the projection
    # orders by that sid (a mission delete applied late removes the rows older than it,
    # so it would remove this one although its record is newer than the delete).
    tc = child_key("tool_call", "m", "c1")
    store.apply([put_entry(10, mission_key("m"), mission_value("m", "in_progress", 10))])
    store.apply([put_entry(11, tc, call_value("m", "c1", 11))])
    with sqlite3.connect(store.path) as conn:
        (first,) = conn.execute("SELECT sid FROM tool_calls").fetchone()
    conn.close()
    store.apply([put_entry(12, tc, call_value("m", "c1", 11))])  # written again, unchanged
    assert _projection_ok(store)
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("SELECT sid FROM tool_calls").fetchone()[0] != first
        conn.execute("UPDATE tool_calls SET sid = ?", (first,))
    conn.close()
    with sqlite3.connect(store.path) as conn:
        check = check_projections(conn)
    conn.close()
    assert check.status == "fail"
    assert check.problems == [
        "project:shop tool_call m/c1: projected from another version of the record"
    ]


def test_verify_finds_hand_edits_its_walks_used_to_skip(store: SQLiteStore) -> None:
    # A tool call planted with sid 0 (children were read with "sid > 0", reads serve it),
    # a journal row at the smallest seq (the walk started after it), and a journal sid
    # set back to its old integer form (it hashes the same and sorts first in history).
    from dualmem.ops.verify import check_chain, check_sids

    store.apply([put_entry(10, mission_key("m"), mission_value("m", "in_progress", 10))])
    store.apply([put_entry(11, child_key("tool_call", "m", "c1"), call_value("m", "c1", 11))])
    store.apply([put_entry(12, "k", {"v": 1}), put_entry(20, "k", {"v": 2})])
    with sqlite3.connect(store.path) as conn:
        conn.execute(
            "INSERT INTO tool_calls (scope, call_id, mission_id, tool_name, args, result, "
            "duration_ms, success, error, called_at, actor, sid) VALUES ('project:shop', "
            "'evil', 'm', 'rm -rf', '{}', 'null', 1.0, 1, NULL, 12, 'lead', 0)"
        )
        conn.execute(
            "INSERT INTO journal (seq, shard, stream_id, sid, op, scope, key, level, actor, ts,"
            " committed_at, prev_hash, hash) VALUES (?, 0, '5-0', x'00', 'del', "
            "'project:shop', 'k', 4, 'mallory', 5, 5, x'00', x'00')",
            (-(1 << 63),),
        )
        conn.execute("UPDATE journal SET sid = ? WHERE stream_id = '20-0'", (20 << 22,))
    conn.close()
    assert "evil" in [c.call_id for c in store.tool_calls("project:shop", "m")]
    assert not _projection_ok(store)
    with sqlite3.connect(store.path) as conn:
        chain, sids = check_chain(conn, "journal"), check_sids(conn)
    conn.close()
    assert "1 row(s) of 5 were not reached by the walk" in chain.problems
    assert sids.problems == [
        "journal: 2 row(s) whose sid is not a 16-byte ordering id",
        "tool_calls: 1 row(s) whose sid is not a 16-byte ordering id",
    ]


def test_verify_passes_a_large_tool_call(
    make_mem: Callable[..., DualMemory], db_path: Path
) -> None:
    # Verify opened records with the default 1 MiB bound; the worker's projection allows
    # any size the max_value_bytes setting does.
    mem = make_mem(max_value_bytes=8 * 1024 * 1024)
    log = MissionLog(mem, LEAD)
    sync_all(
        mem,
        [
            log.start_mission("m1", "p"),
            log.record_tool_call("m1", "dump", {}, "x" * (2 * 1024 * 1024), 1.0, True),
        ],
    )
    assert len(log.tool_calls("m1")) == 1
    with raw_db(db_path) as conn:
        check = check_projections(conn)
    assert check.status == "ok", check.problems


def test_migrating_to_schema_4_projects_a_child_written_after_its_missions_delete(
    tmp_path: Path,
) -> None:
    # Schema 3 hid a tool call written after its mission's delete; schema 4 projects
    # it, and so must the migration (schema 5 projects every record again), or verify
    # fails on a healthy upgraded database.
    from dualmem.migrations import migrate

    path = tmp_path / "v3.db"
    conn = sqlite3.connect(path, isolation_level=None)
    migrate(conn, 3)
    tc = child_key("tool_call", "m", "c1")
    env = CODEC.seal(call_value("m", "c1", 21), scope="project:shop", key=tc, level=Level.PROJECT)
    for key, e, sid, stream_id in [
        (mission_key("m"), None, 20 << 22, "20-0"),
        (tc, env, 21 << 22, "21-0"),
    ]:
        conn.execute(
            "INSERT INTO memory (scope, key, level, owner, envelope, sid, stream_id, created_at,"
            " updated_at) VALUES ('project:shop', ?, 4, 'lead', ?, ?, ?, 1, 1)",
            (key, e, sid, stream_id),
        )
    conn.close()
    migrated = SQLiteStore(path)
    try:
        assert [c.call_id for c in migrated.tool_calls("project:shop", "m")] == ["c1"]
        assert _projection_ok(migrated)
    finally:
        migrated.close()


def test_one_id_under_two_missions_is_two_rows(store: SQLiteStore) -> None:
    # Child rows were keyed by (scope, id): a record reusing an id under another mission
    # took the first one's row over, and deleting either removed the row of both.
    for ms, mid in [(10, "m1"), (11, "m2")]:
        store.apply([put_entry(ms, mission_key(mid), mission_value(mid, "in_progress", ms))])
    store.apply([put_entry(20, child_key("tool_call", "m1", "c1"), call_value("m1", "c1", 20))])
    store.apply([put_entry(21, child_key("tool_call", "m2", "c1"), call_value("m2", "c1", 21))])
    assert [c.mission_id for c in store.tool_calls("project:shop", "m1")] == ["m1"]
    assert [c.mission_id for c in store.tool_calls("project:shop", "m2")] == ["m2"]
    assert _projection_ok(store)
    store.apply([del_entry(30, child_key("tool_call", "m2", "c1"))])
    assert [c.call_id for c in store.tool_calls("project:shop", "m1")] == ["c1"]
    assert store.tool_calls("project:shop", "m2") == []
    assert _projection_ok(store)


def _schema_4_file(path: Path) -> sqlite3.Connection:
    """A fresh file at schema 4 (autocommit), for rows written as schema 4 kept them."""
    from dualmem.migrations import migrate

    conn = sqlite3.connect(path, isolation_level=None)
    migrate(conn, 4)
    return conn


def _v4_record(conn: sqlite3.Connection, key: str, value: object, stream_id: str) -> None:
    """The ``memory`` row of a put of ``value`` at ``key`` (project:shop) by lead."""
    from dualmem.commands import sid_of

    env = CODEC.seal(value, scope="project:shop", key=key, level=Level.PROJECT)
    conn.execute(
        "INSERT INTO memory (scope, key, level, owner, envelope, sid, stream_id, created_at,"
        " updated_at) VALUES ('project:shop', ?, 4, 'lead', ?, ?, ?, 1, 1)",
        (key, env, sid_of(stream_id), stream_id),
    )


def _v4_tool_call(conn: sqlite3.Connection, mission_id: str, called_at: int, sid: bytes) -> None:
    """A projected row of tool call c1 under ``mission_id``, as schema 4 stored it."""
    conn.execute(
        "INSERT INTO tool_calls (scope, call_id, mission_id, tool_name, args, result, "
        "duration_ms, success, error, called_at, actor, sid) VALUES ('project:shop', 'c1', "
        "?, 't', '{}', 'null', 1.0, 1, NULL, ?, 'lead', ?)",
        (mission_id, called_at, sid),
    )


def test_migrating_to_schema_5_gives_a_reused_id_its_row_back(tmp_path: Path) -> None:
    # A schema-4 file where m2's call c1 took m1's row over: after the migration each
    # mission has its own row again, and verify passes.
    from dualmem.commands import sid_of
    from dualmem.migrations import schema_version

    path = tmp_path / "v4.db"
    conn = _schema_4_file(path)
    _v4_record(conn, mission_key("m1"), mission_value("m1", "in_progress", 10), "10-0")
    _v4_record(conn, mission_key("m2"), mission_value("m2", "in_progress", 11), "11-0")
    _v4_record(conn, child_key("tool_call", "m1", "c1"), call_value("m1", "c1", 20), "20-0")
    _v4_record(conn, child_key("tool_call", "m2", "c1"), call_value("m2", "c1", 21), "21-0")
    for mid, ms in [("m1", 10), ("m2", 11)]:
        conn.execute(
            "INSERT INTO missions (scope, mission_id, level, phase, status, started_at, "
            "updated_at, actor, sid) VALUES ('project:shop', ?, 4, 'p', 'in_progress', ?, ?, "
            "'lead', ?)",
            (mid, ms, ms, sid_of(f"{ms}-0")),
        )
    _v4_tool_call(conn, "m2", 21, sid_of("21-0"))  # what schema 4 kept: the second record's
    with pytest.raises(sqlite3.IntegrityError):  # the old key: one row per (scope, id)
        _v4_tool_call(conn, "m1", 20, b"\x00")
    conn.close()
    migrated = SQLiteStore(path)
    try:
        with sqlite3.connect(path) as check:
            assert schema_version(check) == 5
        check.close()
        assert [c.called_at for c in migrated.tool_calls("project:shop", "m1")] == [20]
        assert [c.called_at for c in migrated.tool_calls("project:shop", "m2")] == [21]
        assert _projection_ok(migrated)
    finally:
        migrated.close()


def test_a_child_row_without_its_mission_does_not_stop_the_schema_5_migration(
    tmp_path: Path,
) -> None:
    # A schema-4 file with an orphan tool call (its mission row deleted by hand): the
    # rebuilt table's foreign key refused the copy, so the file could not be opened.
    from dualmem.commands import sid_of

    path = tmp_path / "v4.db"
    conn = _schema_4_file(path)
    _v4_record(conn, child_key("tool_call", "m", "c1"), call_value("m", "c1", 21), "21-0")
    _v4_tool_call(conn, "m", 21, sid_of("21-0"))
    conn.close()
    migrated = SQLiteStore(path)
    try:
        assert [c.call_id for c in migrated.tool_calls("project:shop", "m")] == ["c1"]
        with sqlite3.connect(path) as check:
            assert check.execute("PRAGMA foreign_key_check").fetchall() == []
        check.close()
        assert _projection_ok(migrated)
    finally:
        migrated.close()


@pytest.mark.parametrize("level", [Level.PROJECT, Level.PRIVATE])
def test_delete_mission_right_after_a_record_deletes_that_record_too(
    mem: DualMemory, db_path: Path, level: Level
) -> None:
    # The records are listed from SQLite: one written just before, not yet persisted, was
    # left behind (a live record at PROJECT with no projection row; at PRIVATE a deleted
    # mission still listing its tool call, and handing it to a new mission of that id).
    log = MissionLog(mem, LEAD, level=level)
    sync_all(mem, [log.start_mission("m1", "p")])
    log.record_tool_call("m1", "pytest", [], None, 1, True)
    log.record_decision("m1", "d", "r", "a")
    sync_all(mem, log.delete_mission("m1"))
    assert log.get_mission("m1") is None
    assert log.tool_calls("m1") == [] and log.decisions("m1") == []
    assert mem.query(principal=LEAD, level=level, prefix="_dm/") == []
    sync_all(mem, [log.start_mission("m1", "again")])
    assert log.tool_calls("m1") == []


def test_delete_mission_waits_for_earlier_writes_and_deletes_nothing_without_them(
    tmp_path: Path,
) -> None:
    with DualMemory(db_path=str(tmp_path / "m.db")) as mem:
        log = MissionLog(mem, LEAD)
        sync_all(mem, [log.start_mission("m1", "p")])
        mem._worker_stop.set()  # no worker from here on: nothing settles
        mem._worker_thread.join(10)
        log.record_tool_call("m1", "pytest", [], None, 1, True)
        with pytest.raises(NotPersisted, match=r"not settled within 0\.2s"):
            log.delete_mission("m1", timeout=0.2)
        assert log.get_mission("m1") is not None  # nothing deleted


def test_times_and_durations_the_projection_cannot_store_are_refused_up_front(
    mem: DualMemory,
) -> None:
    # started_at 2**63 and a datetime before 1970 were accepted and then dead-lettered by
    # the worker (the run never appeared); since=2**63 and duration_ms=10**400 raised a
    # bare OverflowError.
    from datetime import UTC, datetime

    log = MissionLog(mem, LEAD)
    private = MissionLog(mem, LEAD, level=Level.PRIVATE)
    sync_all(mem, [log.start_mission("m", "p"), private.start_mission("m", "p")])
    before_1970 = datetime(1969, 12, 31, tzinfo=UTC)
    for started in (2**63, before_1970):
        with pytest.raises(ValidationError, match="started_at must be epoch milliseconds"):
            log.record_playbook_run("m", "pb", "x", started, None, True)
    with pytest.raises(ValidationError, match="completed_at"):
        log.record_playbook_run("m", "pb", "x", 1, 2**63, True)
    for reader in (log, private):
        with pytest.raises(ValidationError, match="since"):
            reader.tool_calls("m", since=2**63)
    for duration in (10**400, float("nan"), -1, True):
        with pytest.raises(ValidationError, match="duration_ms"):
            log.record_tool_call("m", "t", None, None, duration, True)  # type: ignore[arg-type]
    receipt = log.record_playbook_run("m", "pb", "x", 2**63 - 1, None, True)
    sync_all(mem, [receipt])
    assert [r.started_at for r in log.playbook_runs("m")] == [2**63 - 1]


def test_a_tool_call_record_with_a_duration_too_large_for_a_float_is_dead_lettered(
    mem: DualMemory,
) -> None:
    # Written with a plain put: the worker's projection raised OverflowError, an unexpected
    # error that was retried (never dead-lettered while nothing else arrived).
    log = MissionLog(mem, LEAD)
    sync_all(mem, [log.start_mission("m", "p")])
    call_id = "0000000000001-abcd"
    value = {
        "mission_id": "m",
        "call_id": call_id,
        "tool_name": "t",
        "args": None,
        "result": None,
        "duration_ms": 10**400,
        "success": True,
        "error": None,
        "called_at": 1,
    }
    bad = mem.put(child_key("tool_call", "m", call_id), value, level=Level.PROJECT, principal=LEAD)
    with pytest.raises(NotPersisted, match="dead-lettered"):
        mem.sync(bad, timeout=10)
    assert log.tool_calls("m") == []


@pytest.mark.parametrize("level", [Level.PROJECT, Level.PRIVATE])
def test_a_plainly_deleted_missions_records_are_listed_at_no_level(
    mem: DualMemory, db_path: Path, level: Level
) -> None:
    # A plain delete of the mission record leaves its children live as records. The
    # projection drops their rows with the mission's and refuses them for good (they are
    # older than the delete), so PROJECT listed none of them; PRIVATE scanned the records
    # and listed them, for the deleted mission and for a new mission of the same id.
    log = MissionLog(mem, LEAD, level=level)
    sync_all(mem, [log.start_mission("m1", "p")])
    old = [
        log.record_tool_call("m1", "old", {}, None, 1, True),
        log.record_decision("m1", "old", "r", "a"),
        log.record_playbook_run("m1", "old", "x", 1, 2, True),
    ]
    sync_all(mem, old)
    sync_all(mem, [mem.delete(mission_key("m1"), level=level, principal=LEAD)])
    assert log.get_mission("m1") is None
    assert log.tool_calls("m1") == [] and log.decisions("m1") == []
    assert log.playbook_runs("m1") == []
    sync_all(mem, [log.start_mission("m1", "again")])
    sync_all(mem, [log.record_tool_call("m1", "new", {}, None, 1, True)])
    assert [c.tool_name for c in log.tool_calls("m1")] == ["new"]
    assert log.decisions("m1") == [] and log.playbook_runs("m1") == []
    # The records themselves stay (a plain delete deletes one record); verify names them.
    keys = {r.key for r in old}
    assert {r.key for r in mem.query(principal=LEAD, level=level, prefix="_dm/")} >= keys
    with raw_db(db_path) as conn:
        check = check_projections(conn)
    assert check.status == "warn", (check.summary, check.problems)
    assert "3 orphaned record(s)" in check.summary
    # delete_mission takes them with the mission's current records.
    sync_all(mem, log.delete_mission("m1"))
    assert mem.query(principal=LEAD, level=level, prefix="_dm/") == []
    with raw_db(db_path) as conn:
        assert check_projections(conn).status == "ok"


@pytest.mark.parametrize("level", [Level.PROJECT, Level.PRIVATE])
def test_a_record_written_after_a_plain_mission_delete_is_listed_at_every_level(
    mem: DualMemory, level: Level
) -> None:
    # Only records older than the delete are the deleted mission's: one written after it
    # (another process that had not seen the delete) is listed, at PROJECT under the
    # placeholder row, and stays the mission's when its id is used again.
    log = MissionLog(mem, LEAD, level=level)
    sync_all(mem, [log.start_mission("m1", "p")])
    sync_all(mem, [log.record_tool_call("m1", "old", {}, None, 1, True)])
    sync_all(mem, [mem.delete(mission_key("m1"), level=level, principal=LEAD)])
    late = {**call_value("m1", "late", 1), "tool_name": "late"}
    sync_all(
        mem, [mem.put(child_key("tool_call", "m1", "late"), late, level=level, principal=LEAD)]
    )
    assert [c.tool_name for c in log.tool_calls("m1")] == ["late"]
    sync_all(mem, [log.start_mission("m1", "again")])
    assert [c.tool_name for c in log.tool_calls("m1")] == ["late"]


# -- the projection's edges, found by mutating it -------------------------------------------

CHILD_KINDS = ["tool_call", "decision", "playbook_run"]
CHILD_ID = {"tool_call": "call_id", "decision": "decision_id", "playbook_run": "run_id"}


def child_value(kind: str, mid: str, rid: str, ts: int) -> dict[str, object]:
    """A valid record of a child ``kind`` at epoch ms ``ts``."""
    if kind == "tool_call":
        return call_value(mid, rid, ts)
    if kind == "decision":
        return {
            "mission_id": mid,
            "decision_id": rid,
            "decision_type": "x",
            "rationale": "",
            "agent_name": "a",
            "decided_at": ts,
        }
    return {
        "mission_id": mid,
        "run_id": rid,
        "playbook_name": "pb",
        "phase": "x",
        "started_at": ts,
        "completed_at": None,
        "success": True,
    }


def child_ids(store: SQLiteStore, kind: str, mid: str) -> list[str]:
    """The ids of mission ``mid``'s projected ``kind`` rows, as the store's read lists them."""
    rows: list[ToolCall] | list[Decision] | list[PlaybookRun]
    if kind == "tool_call":
        rows = store.tool_calls("project:shop", mid)
    elif kind == "decision":
        rows = store.decisions("project:shop", mid)
    else:
        rows = store.playbook_runs("project:shop", mid)
    return [getattr(rec, CHILD_ID[kind]) for rec in rows]


def test_reserved_keys_of_other_shapes_are_plain_records(store: SQLiteStore) -> None:
    # Only _dm/mission/<id> and _dm/<child kind>/<mission>/<id> are the mission log's; any
    # other key under _dm/ holds a plain record. Parsed loosely, _dm/mission/m/notes was
    # taken for mission m (or for a child of kind "mission") and failed as a malformed
    # mission record: a plain write dead-lettered.
    keys = ["_dm/mission/m/notes", "_dm/mission", "_dm/tool_call/m", "_dm/decision/m/d/x"]
    result = store.apply([put_entry(10 + i, key, {"note": i}) for i, key in enumerate(keys)])
    assert result.failed == [] and result.applied == len(keys)
    assert all(store.get("project:shop", key, 0) is not None for key in keys)
    with contextlib.closing(sqlite3.connect(store.path)) as conn:
        assert conn.execute("SELECT count(*) FROM missions").fetchone() == (0,)


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        (mission_key("m"), mission_value("other", "pending", 11), "mission_id in the value"),
        (
            mission_key("m"),
            {**mission_value("m", "pending", 11), "metadata": [1]},
            "metadata must be a JSON object",
        ),
        (child_key("tool_call", "m", "c1"), call_value("other", "c1", 11), "mission_id in the"),
        (
            child_key("tool_call", "m", "c1"),
            {**call_value("m", "c1", 11), "error": 500},
            "error must be a str or null",
        ),
        (
            child_key("tool_call", "m", "c1"),
            {**call_value("m", "c1", 11), "tool_name": ""},
            "tool_name must be a non-empty str",
        ),
        (
            child_key("playbook_run", "m", "r1"),
            {**child_value("playbook_run", "m", "r1", 11), "completed_at": 10},
            "completed_at is before started_at",
        ),
    ],
)
def test_a_record_that_does_not_fit_its_kind_fails_alone(
    store: SQLiteStore, key: str, value: dict[str, object], reason: str
) -> None:
    # Each was projected as if it fitted: a row filed under the key's mission although the
    # value names another, metadata that is not the dict Mission.metadata promises, an
    # error column holding a number, a nameless tool, a run that ends before it starts.
    good = put_entry(10, mission_key("g"), mission_value("g", "pending", 10))
    result = store.apply([good, put_entry(11, key, value)])
    assert result.applied == 1 and [e.stream_id for e, _ in result.failed] == ["11-0"]
    assert reason in result.failed[0][1]
    assert store.mission("project:shop", "m") is None
    assert store.tool_calls("project:shop", "m") == []


def test_a_mission_delete_applied_late_keeps_the_mission_started_again_after_it(
    store: SQLiteStore,
) -> None:
    # Deleted (20) and started again (30), the delete applied last (claimed from a dead
    # consumer): memory keeps the newer put, and the projection must too. Turned back into
    # a placeholder, the live mission vanished from get_mission and list_missions.
    store.apply([put_entry(10, mission_key("m"), mission_value("m", "in_progress", 10))])
    store.apply([put_entry(30, mission_key("m"), mission_value("m", "pending", 30))])
    store.apply([del_entry(20, mission_key("m"))])
    m = store.mission("project:shop", "m")
    assert m is not None and (m.status, m.started_at) == ("pending", 30)
    assert [m.mission_id for m in store.missions("project:shop")] == ["m"]
    assert _projection_ok(store)


@pytest.mark.parametrize("kind", CHILD_KINDS)
def test_a_mission_delete_applied_late_leaves_a_bare_hidden_placeholder(
    store: SQLiteStore, kind: str
) -> None:
    # A child newer than the delete keeps its row under a placeholder mission. A playbook
    # run lost it (the placeholder was dropped as empty, and the cascade took the run);
    # list_missions listed the placeholder; and the placeholder kept the deleted
    # mission's phase, status and metadata in the file.
    deleted = {**mission_value("m", "in_progress", 10), "phase": "ship", "metadata": {"o": 1}}
    store.apply([put_entry(10, mission_key("m"), deleted)])
    store.apply([put_entry(21, child_key(kind, "m", "r1"), child_value(kind, "m", "r1", 21))])
    store.apply([del_entry(20, mission_key("m"))])
    assert child_ids(store, kind, "m") == ["r1"]
    assert store.mission("project:shop", "m") is None and store.missions("project:shop") == []
    with contextlib.closing(sqlite3.connect(store.path)) as conn:
        rows = conn.execute("SELECT phase, status, metadata, completed_at FROM missions")
        assert rows.fetchall() == [("", "pending", "{}", None)]
    assert _projection_ok(store)


@pytest.mark.parametrize("kind", CHILD_KINDS)
def test_a_child_older_than_its_missions_delete_stays_out_of_the_mission_started_again(
    store: SQLiteStore, kind: str
) -> None:
    # Written (15) before the mission's delete (20), applied after the mission was started
    # again (30): it belongs to the deleted mission. Only a tool call was refused; a
    # decision or a playbook run was listed under the new mission.
    store.apply([put_entry(10, mission_key("m"), mission_value("m", "in_progress", 10))])
    store.apply([del_entry(20, mission_key("m"))])
    store.apply([put_entry(30, mission_key("m"), mission_value("m", "pending", 30))])
    store.apply([put_entry(15, child_key(kind, "m", "r1"), child_value(kind, "m", "r1", 15))])
    assert child_ids(store, kind, "m") == []
    with contextlib.closing(sqlite3.connect(store.path)) as conn:
        check = check_projections(conn)
    assert check.status == "warn" and "1 orphaned record(s)" in check.summary


@pytest.mark.parametrize("kind", CHILD_KINDS)
def test_a_child_deleted_alone_is_ordered_by_stream_id_both_ways(
    store: SQLiteStore, kind: str
) -> None:
    # Deleted (50), then an older put (45) applied late: a decision or a playbook run came
    # back (only the tool call was tested). Put (70), then an older delete (60) applied
    # late: the delete removed the newer put's row, a live record that no read listed.
    key = child_key(kind, "m", "r1")
    store.apply([put_entry(40, mission_key("m"), mission_value("m", "in_progress", 40))])
    store.apply([del_entry(50, key)])
    store.apply([put_entry(45, key, child_value(kind, "m", "r1", 45))])
    assert child_ids(store, kind, "m") == []
    store.apply([put_entry(70, key, child_value(kind, "m", "r1", 70))])
    store.apply([del_entry(60, key)])
    assert child_ids(store, kind, "m") == ["r1"]
    assert _projection_ok(store)


@pytest.mark.parametrize("child_first", [False, True])
def test_a_child_with_the_same_stream_id_as_its_missions_delete_is_kept(
    store: SQLiteStore, child_first: bool
) -> None:
    # Each shard has its own stream, so a mission's delete (shard 0) and a child's put
    # (shard 1) can get the same id: the child is not older than the delete, and verify
    # expects its row. Refused when applied after the delete, or removed by it when
    # applied before, it was a live record without a row: verify failed.
    tc = child_key("tool_call", "m", "c1")
    store.apply([put_entry(10, mission_key("m"), mission_value("m", "in_progress", 10))])
    child = put_entry(20, tc, call_value("m", "c1", 20))
    both = [StreamEntry(1, child.stream_id, child.fields), del_entry(20, mission_key("m"))]
    for entry in both if child_first else both[::-1]:
        store.apply([entry])
    assert [c.call_id for c in store.tool_calls("project:shop", "m")] == ["c1"]
    assert store.mission("project:shop", "m") is None
    assert _projection_ok(store)


def test_stale_children_are_live_records_strictly_older_than_the_delete(
    store: SQLiteStore,
) -> None:
    # At an encrypted level (nothing projected). A child deleted before its mission was
    # listed as stale although it is no live record, and delete_mission deleted it again;
    # a child with the delete's own stream id (another shard) was hidden by MissionLog
    # while verify (strictly older) counts it as the mission's.
    scope = "agent:lead"

    def entry(ms: int, key: str, *, deleted: bool = False, shard: int = 0) -> StreamEntry:
        if deleted:
            f = delete_fields(scope, key, Level.PRIVATE, "lead", ms * 1000)
        else:
            f = put_fields(scope, key, Level.PRIVATE, "lead", ms * 1000, b"sealed", None)
        return StreamEntry(shard, f"{ms}-0", redis_fields(f))

    gone, old, tie = (child_key("tool_call", "m", c) for c in ("gone", "old", "tie"))
    for e in [
        entry(10, mission_key("m")),
        entry(11, gone),
        entry(12, gone, deleted=True),
        entry(13, old),
        entry(20, mission_key("m"), deleted=True),
        entry(20, tie, shard=1),
    ]:
        store.apply([e])
    assert store.stale_children(scope, "m") == [old]
    with contextlib.closing(sqlite3.connect(store.path)) as conn:
        check = check_projections(conn)
    assert "1 orphaned record(s)" in check.summary and tie not in check.fix


# -- MissionLog's reads and writes at every level, found by mutating them ----------------------


@pytest.mark.parametrize("level", [Level.PROJECT, Level.PRIVATE])
def test_reads_order_by_time_not_by_id_and_filter_at_every_level(
    mem: DualMemory, level: Level
) -> None:
    # Ids sort by creation only when MissionLog makes them: a mission's id and a playbook
    # run's start are the caller's, and any writer may put a record. Ordered by id
    # (either way: the ids below sort neither like the times nor against them), with
    # list_missions' status filter dropped at PRIVATE, or since= made exclusive, these
    # reads listed the wrong records or in the wrong order; a failed playbook run was
    # projected as a success, and a run ending the millisecond it started was refused
    # (by the worker, and by record_playbook_run).
    log = MissionLog(mem, LEAD, level=level)

    def put(key: str, value: dict[str, object]) -> Receipt:
        return mem.put(key, value, level=level, principal=LEAD)

    rs = [
        put(mission_key("zeta"), mission_value("zeta", "pending", 10)),
        put(mission_key("alpha"), mission_value("alpha", "in_progress", 20)),
        put(mission_key("mid"), mission_value("mid", "in_progress", 30)),
    ]
    for cid, ts in [("c-a", 30), ("c-b", 10), ("c-c", 20)]:
        rs.append(put(child_key("tool_call", "zeta", cid), call_value("zeta", cid, ts)))
    for did, ts in [("d-a", 20), ("d-b", 10), ("d-c", 30)]:
        rs.append(put(child_key("decision", "zeta", did), child_value("decision", "zeta", did, ts)))
    runs = [("r-a", 200, 200, True), ("r-b", 100, 150, False), ("r-c", 300, None, True)]
    for rid, start, end, ok in runs:
        value = {**child_value("playbook_run", "zeta", rid, start), "completed_at": end}
        rs.append(put(child_key("playbook_run", "zeta", rid), {**value, "success": ok}))
    rs.append(log.record_playbook_run("zeta", "instant", "x", 400, 400, True))
    sync_all(mem, rs)
    assert [m.mission_id for m in log.list_missions()] == ["zeta", "alpha", "mid"]
    assert [m.mission_id for m in log.list_missions(status="pending")] == ["zeta"]
    assert [c.call_id for c in log.tool_calls("zeta")] == ["c-b", "c-c", "c-a"]
    assert [c.call_id for c in log.tool_calls("zeta", since=20)] == ["c-c", "c-a"]
    assert [d.decision_id for d in log.decisions("zeta")] == ["d-b", "d-a", "d-c"]
    got = [(r.playbook_name, r.started_at, r.success) for r in log.playbook_runs("zeta")]
    assert got == [("pb", 100, False), ("pb", 200, True), ("pb", 300, True), ("instant", 400, True)]


def test_a_junk_record_at_an_encrypted_level_is_skipped_by_reads(mem: DualMemory) -> None:
    # Any member of the scope can put anything under the mission log's keys; at an
    # encrypted level the reads parse the records themselves, and skip one that is not a
    # record of its kind (a ValueError, not even a DualMemError, escaped them otherwise).
    log = MissionLog(mem, LEAD, level=Level.TEAM)
    sync_all(mem, [log.start_mission("m", "p")])
    rs = [
        mem.put(mission_key("junk"), {"x": 1}, level=Level.TEAM, principal=LEAD),
        mem.put(child_key("tool_call", "m", "junk"), {"x": 1}, level=Level.TEAM, principal=LEAD),
        log.record_tool_call("m", "grep", {}, None, 1, True),
    ]
    sync_all(mem, rs)
    assert [m.mission_id for m in log.list_missions()] == ["m"]
    assert [c.tool_name for c in log.tool_calls("m")] == ["grep"]


def test_an_encrypted_read_refuses_more_records_than_it_scans(
    mem: DualMemory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One query page of MAX_ENCRYPTED_SCAN records may not be all of them: a full page
    # raises rather than list some. With the check at "more than a page" (never true of
    # one page) the read silently dropped the rest. The bound is lowered to keep the test
    # small; the code path is the same.
    from dualmem import missions

    monkeypatch.setattr(missions, "MAX_ENCRYPTED_SCAN", 3)
    log = MissionLog(mem, LEAD, level=Level.PRIVATE)
    sync_all(mem, [log.start_mission("m", "p")])
    sync_all(mem, [log.record_tool_call("m", "t", {}, None, 1, True) for _ in range(2)])
    assert len(log.tool_calls("m")) == 2
    sync_all(mem, [log.record_tool_call("m", "t", {}, None, 1, True)])
    with pytest.raises(ValidationError, match="more than 2 tool_call records"):
        log.tool_calls("m")
    # Each read scans its own kind: the mission's three tool calls are no missions (a scan
    # of all of "_dm/" refused list_missions here).
    assert [m.mission_id for m in log.list_missions()] == ["m"]


def test_every_record_kind_can_be_stored_at_another_level(mem: DualMemory) -> None:
    # level= on record_decision and record_playbook_run was only tested for tool calls:
    # ignored, a decision meant for PRIVATE was written at the log's level (PROJECT),
    # in plaintext, for the whole project to read.
    log = MissionLog(mem, LEAD)
    rs = [log.start_mission("m", "p")]
    rs.append(log.record_decision("m", "d", "secret reason", "a", level=Level.PRIVATE))
    rs.append(log.record_playbook_run("m", "pb", "x", 1, 2, True, level=Level.PRIVATE))
    sync_all(mem, rs)
    assert log.decisions("m") == [] and log.playbook_runs("m") == []
    assert [d.scope for d in log.decisions("m", level=Level.PRIVATE)] == ["agent:lead"]
    assert [r.scope for r in log.playbook_runs("m", level=Level.PRIVATE)] == ["agent:lead"]


def test_mission_ids_are_1_to_128_printable_characters(mem: DualMemory) -> None:
    # The bounds of check_id: 128 characters were refused with ">=", and DEL passed as a
    # printable character without its own test.
    log = MissionLog(mem, LEAD)
    longest = "m" * 128
    sync_all(mem, [log.start_mission(longest, "p")])
    mission = log.get_mission(longest)
    assert mission is not None and mission.mission_id == longest
    for bad, why in [
        ("m" * 129, "longer than 128"),
        ("a\x7fb", "control characters"),
        ("a\nb", "control characters"),
        ("", "non-empty"),
    ]:
        with pytest.raises(ValidationError, match=why):
            log.start_mission(bad, "p")


def test_a_mission_starts_pending_or_in_progress_only(mem: DualMemory) -> None:
    # Started as completed or failed, a mission skipped the transitions update_mission
    # enforces (and completed_at stayed None for a terminal mission).
    log = MissionLog(mem, LEAD)
    for status in ("completed", "failed", "done"):
        with pytest.raises(ValidationError, match="starts as 'pending' or 'in_progress'"):
            log.start_mission("m", "p", status=status)


def test_update_mission_never_moves_updated_at_back(mem: DualMemory) -> None:
    # The mission was last written by a process whose clock is an hour ahead: stamped
    # with this process's clock alone, the update went back in time and completed_at
    # came before updated_at's previous value.
    log = MissionLog(mem, LEAD)
    ahead = time.time_ns() // 1_000_000 + 3_600_000
    value = {**mission_value("m", "in_progress", ahead - 10), "updated_at": ahead}
    sync_all(mem, [mem.put(mission_key("m"), value, level=Level.PROJECT, principal=LEAD)])
    sync_all(mem, [log.update_mission("m", status="completed")])
    done = log.get_mission("m")
    assert done is not None and done.updated_at == done.completed_at == ahead


@pytest.mark.parametrize("level", [Level.PROJECT, Level.PRIVATE])
def test_update_mission_changes_only_what_it_is_given(mem: DualMemory, level: Level) -> None:
    # Each field update_mission is not given is the current one: a phase-only update
    # moved a pending mission to in_progress, a status change emptied the phase or kept
    # the old metadata, and metadata given was merged into the old (it is replaced) or
    # ignored; started_at was stamped again on every update.
    log = MissionLog(mem, LEAD, level=level)
    sync_all(mem, [log.start_mission("m", "plan", {"a": 1, "b": 2}, status="pending")])
    started = log.get_mission("m")
    assert started is not None
    time.sleep(0.002)  # the update's clock is past the start's
    sync_all(mem, [log.update_mission("m", phase="build")])
    m = log.get_mission("m")
    assert m is not None
    assert (m.status, m.phase, m.metadata) == ("pending", "build", {"a": 1, "b": 2})
    assert m.started_at == started.started_at and m.updated_at > started.updated_at
    sync_all(mem, [log.update_mission("m", metadata={"a": 3})])
    m = log.get_mission("m")
    assert m is not None and (m.status, m.phase, m.metadata) == ("pending", "build", {"a": 3})
    sync_all(mem, [log.update_mission("m", status="in_progress")])
    sync_all(mem, [log.update_mission("m", status="completed")])
    done = log.get_mission("m")
    assert done is not None
    assert (done.status, done.phase, done.metadata) == ("completed", "build", {"a": 3})
    assert done.started_at == started.started_at and done.completed_at == done.updated_at


@pytest.mark.parametrize("level", [Level.PROJECT, Level.PRIVATE])
def test_times_given_as_aware_datetimes_are_epoch_milliseconds(
    mem: DualMemory, level: Level
) -> None:
    # Only ints were tested: a datetime taken as epoch seconds stored a run 1000 times
    # too early, and tool_calls(since=<datetime>) listed calls made before it.
    from datetime import UTC, datetime, timedelta

    log = MissionLog(mem, LEAD, level=level)
    sync_all(mem, [log.start_mission("m", "p")])
    start = datetime(2026, 3, 1, 12, 0, 0, 250_000, tzinfo=UTC)
    end = start + timedelta(seconds=90)
    sync_all(mem, [log.record_playbook_run("m", "deploy", "prod", start, end, True)])
    (run,) = log.playbook_runs("m")
    assert (run.started_at, run.completed_at) == (1_772_366_400_250, 1_772_366_490_250)
    sync_all(mem, [log.record_tool_call("m", "old", {}, None, 1, True)])
    time.sleep(0.002)
    cut = datetime.now(UTC)
    time.sleep(0.002)
    sync_all(mem, [log.record_tool_call("m", "new", {}, None, 1, True)])
    assert [c.tool_name for c in log.tool_calls("m", since=cut)] == ["new"]


def test_mission_log_arguments_of_the_wrong_type_are_refused_before_any_write(
    mem: DualMemory,
) -> None:
    # Each was taken and written (success="yes", error=5, a phase of 5, an empty name, a
    # naive datetime: whose zone?), read as an empty answer (an unknown status, success
    # "yes"), or failed with something other than a ValidationError (a principal given by
    # name, metadata that is no mapping, a playbook run without a start time: a bare
    # AssertionError).
    from datetime import datetime

    with pytest.raises(ValidationError, match=r"principal must be an acl\.Principal"):
        MissionLog(mem, "lead")  # type: ignore[arg-type]
    log = MissionLog(mem, LEAD)
    sync_all(mem, [log.start_mission("m", "p")])
    wait_until(lambda: mem.backlog() == {0: 0}, what="the ack after the commit")
    before = mem.backlog()
    with pytest.raises(ValidationError, match="phase must be a str"):
        log.start_mission("m2", 5)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="phase must be a str"):
        log.update_mission("m", phase=5)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="metadata must be a mapping"):
        log.start_mission("m2", "p", ["owner"])  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="metadata must be a mapping"):
        log.update_mission("m", metadata="owner")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="success must be a bool"):
        log.record_tool_call("m", "t", {}, None, 1, "yes")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="error must be a str or None"):
        log.record_tool_call("m", "t", {}, None, 1, False, 5)  # type: ignore[arg-type]
    # A name of white space only was taken too (the coordination checks refuse it): a
    # decision by "  " reads as one by nobody.
    for blank in ("", " ", "\t", "  \n"):
        with pytest.raises(ValidationError, match="tool_name must be a non-empty str"):
            log.record_tool_call("m", blank, {}, None, 1, True)
        with pytest.raises(ValidationError, match="decision_type must be a non-empty str"):
            log.record_decision("m", blank, "r", "a")
        with pytest.raises(ValidationError, match="agent_name must be a non-empty str"):
            log.record_decision("m", "d", "r", blank)
        with pytest.raises(ValidationError, match="playbook_name must be a non-empty str"):
            log.record_playbook_run("m", blank, "x", 1, 2, True)
    with pytest.raises(ValidationError, match="success must be a bool"):
        log.record_playbook_run("m", "pb", "x", 1, 2, 1)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="started_at must be epoch milliseconds"):
        log.record_playbook_run("m", "pb", "x", None, None, True)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="timezone-aware"):
        log.record_playbook_run("m", "pb", "x", datetime(2026, 3, 1), None, True)
    with pytest.raises(ValidationError, match="timezone-aware"):
        log.tool_calls("m", since=datetime(2026, 3, 1))
    with pytest.raises(ValidationError, match="success must be a bool or None"):
        log.tool_calls("m", success="yes")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="status must be one of"):
        log.list_missions(status="done")
    assert mem.backlog() == before  # nothing reached the stream


def test_records_made_within_one_millisecond_are_all_kept(mem: DualMemory) -> None:
    # A record's id starts with the time in ms and ends in random hex: ids of the time
    # alone made records written within one millisecond share a key, the later one
    # replacing the earlier.
    log = MissionLog(mem, LEAD)
    sync_all(mem, [log.start_mission("m", "p")])
    rs = []
    for i in range(100):
        rs.append(log.record_tool_call("m", f"t{i}", {}, None, 1, True))
        rs.append(log.record_decision("m", "d", f"r{i}", "a"))
    sync_all(mem, rs)
    assert len({r.key for r in rs}) == 200
    assert sorted(c.tool_name for c in log.tool_calls("m")) == sorted(f"t{i}" for i in range(100))
    assert len(log.decisions("m")) == 100


@pytest.mark.parametrize("level", [Level.PROJECT, Level.PRIVATE])
def test_decisions_and_playbook_runs_read_back_every_field_as_recorded(
    mem: DualMemory, level: Level
) -> None:
    # Only the rationale and the playbook's name were read back: a decision's agent
    # stored as the log's principal, a run's phase lost, a failed run stored as a
    # success all passed, and so did an empty rationale being refused.
    log = MissionLog(mem, LEAD, level=level)
    sync_all(mem, [log.start_mission("m", "p")])
    rs = [
        log.record_decision("m", "approach", "", "architect"),
        log.record_playbook_run("m", "deploy", "staging", 100, 150, False),
    ]
    sync_all(mem, rs)
    (d,) = log.decisions("m")
    assert (d.decision_type, d.rationale, d.agent_name) == ("approach", "", "architect")
    (run,) = log.playbook_runs("m")
    assert (run.playbook_name, run.phase, run.started_at, run.completed_at, run.success) == (
        "deploy",
        "staging",
        100,
        150,
        False,
    )


@pytest.mark.parametrize("level", [Level.PROJECT, Level.PRIVATE])
def test_records_made_within_one_millisecond_are_read_in_the_order_they_were_made(
    mem: DualMemory, level: Level
) -> None:
    # Reads order by time (ms), then by id: ids of the time and random hex alone put the
    # records one process made within a millisecond in random order, so tool_calls() and
    # decisions() ("in call order", "in the order they were taken") listed a burst of
    # them shuffled.
    log = MissionLog(mem, LEAD, level=level)
    sync_all(mem, [log.start_mission("m", "p")])
    rs = []
    for i in range(100):
        rs.append(log.record_tool_call("m", f"t{i:03d}", {}, None, 1, True))
        rs.append(log.record_decision("m", "d", f"r{i:03d}", "a"))
    sync_all(mem, rs)
    assert [c.tool_name for c in log.tool_calls("m")] == [f"t{i:03d}" for i in range(100)]
    assert [d.rationale for d in log.decisions("m")] == [f"r{i:03d}" for i in range(100)]
