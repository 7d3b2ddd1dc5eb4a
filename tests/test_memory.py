"""DualMemory end to end, each test on fakeredis AND a real redis-server."""

from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis

import dualmem.memory as memory_module
import dualmem.worker as worker_module
from acl import Keyring, Level, Principal
from dualmem import (
    AccessDenied,
    Backpressure,
    ConfigurationError,
    DualMemError,
    DualMemory,
    MissingKey,
    NotPersisted,
    Receipt,
    StoreUnavailable,
    TamperedRecord,
    ValidationError,
)
from dualmem.commands import sid_of
from dualmem.keyuse import key_users
from dualmem.memory import CloseReport
from dualmem.ops.dlq import replay
from dualmem.ops.mirror import render_record
from dualmem.ops.runtime import Runtime, Write
from dualmem.ops.transfer import export_records
from dualmem.redis_backend import transact
from dualmem.settings import Settings
from dualmem.sqlite_store import SQLiteStore
from dualmem.store import Notification, StreamEntry
from dualmem.worker import Worker, WorkerStats, purge_floor

from .conftest import (
    REFUSED,
    RedisServer,
    allow_inserts,
    refuse_inserts,
    run_cli,
    wait_until,
    worker_of,
)

MakeMem = Callable[..., DualMemory]


def test_issue_api_round_trip(make_mem: MakeMem, coder: Principal) -> None:
    mem = make_mem()
    r = mem.put(
        "confidence/auth/1", {"confidence": 0.85}, level=Level.PRIVATE, principal=coder, ttl=86400
    )
    assert isinstance(r, Receipt) and r.scope == "agent:coder-1"
    mem.sync(r, timeout=5)
    assert mem.get("confidence/auth/1", level=Level.PRIVATE, principal=coder) == {
        "confidence": 0.85
    }
    for i in range(3):
        mem.put(f"consensus/{i}", {"score": 0.9 + i / 100}, level=Level.SWARM, principal=coder)
    last = mem.put("other/x", 1, level=Level.SWARM, principal=coder)
    mem.sync(last)
    recs = mem.query(principal=coder, level=Level.SWARM, prefix="consensus/", limit=100)
    assert [x.key for x in recs] == ["consensus/0", "consensus/1", "consensus/2"]
    assert recs[0].value == {"score": 0.9} and recs[0].owner == "coder-1"
    hist = mem.history("confidence/auth/1", level=Level.PRIVATE, principal=coder)
    assert [h.op for h in hist] == ["put"]
    changes = mem.changes(since=0, principal=coder)
    assert [c.seq for c in changes] == sorted(c.seq for c in changes) and len(changes) == 5
    d = mem.delete("confidence/auth/1", level=Level.PRIVATE, principal=coder)
    mem.sync(d)
    assert mem.get("confidence/auth/1", level=Level.PRIVATE, principal=coder) is None
    assert mem.get("confidence/auth/1", level=Level.PRIVATE, principal=coder, default=7) == 7
    m = mem.metrics()
    assert set(m) == {"redis_write", "encode", "persist", "lag", "read"}
    # Every operation on its path, counted: five puts and a delete sent (the delete
    # encodes nothing), six commands committed, three gets and one query read.
    counts = {path: m[path]["count"] for path in m}
    assert counts == {"redis_write": 6, "encode": 5, "persist": 6, "lag": 6, "read": 4}
    for path in m:
        assert m[path]["count"] > 0, path
        assert 0 < m[path]["p50"] <= m[path]["p95"] <= m[path]["p99"] <= m[path]["max"]


def test_a_receipt_names_the_operation_scope_and_key_it_stands_for(
    make_mem: MakeMem, coder: Principal
) -> None:
    # A put's receipt said "del" and nothing noticed: a caller sorting its receipts by
    # operation (or logging them) was told a write was a delete.
    mem = make_mem(worker=False)
    put = mem.put("k", 1, level=Level.SWARM, principal=coder)
    gone = mem.delete("k", level=Level.SWARM, principal=coder)
    event = mem.audit("checked", principal=coder, scope="swarm:phase-1-auth", key="k")
    assert (put.op, put.scope, put.key) == ("put", "swarm:phase-1-auth", "k")
    assert (gone.op, gone.scope, gone.key) == ("del", "swarm:phase-1-auth", "k")
    assert (event.op, event.scope, event.key) == ("audit", "swarm:phase-1-auth", "k")
    assert put.shard == gone.shard and put.stream_id != gone.stream_id


def test_put_is_one_round_trip_and_touches_no_sqlite(
    make_mem: MakeMem,
    coder: Principal,
    raw_redis: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    backend: str,
) -> None:
    mem = make_mem(worker=False)
    mem.put("warm", 1, level=Level.SWARM, principal=coder)  # connection established
    # Every exchange with Redis (RESP bytes to a server, or argument lists handed to the
    # in-process one) is one send_packed_command, or one run_transaction where the
    # in-process server runs a MULTI/EXEC in one step; real Redis is also counted below at
    # the server, by its command statistics.
    cls = mem._redis.connection_pool.connection_class
    sends: list[int] = []
    original = cls.send_packed_command

    def counting(self: object, command: object, check_health: bool = True) -> None:
        sends.append(1)
        original(self, command, check_health)  # type: ignore[arg-type]

    if backend == "fakeredis":
        direct = cls.run_transaction

        def counting_direct(self: object, command: object) -> object:
            sends.append(1)
            return direct(self, command)

        monkeypatch.setattr(cls, "run_transaction", counting_direct)

    def no_sqlite(*_: object) -> None:
        raise AssertionError("the write path opened SQLite")

    monkeypatch.setattr(cls, "send_packed_command", counting)
    monkeypatch.setattr(SQLiteStore, "_conn", no_sqlite)
    monkeypatch.setattr(SQLiteStore, "_write", no_sqlite)
    if backend == "redis":
        raw_redis.config_resetstat()
    for level in Level:
        sends.clear()
        p = Principal(agent_id="a", team="t", swarm="s", project="p", system=True)
        mem.put(f"k{int(level)}", {"v": "x" * 600}, level=level, principal=p, ttl=60)
        assert len(sends) == 1, f"level {level.name}: {len(sends)} round trips"
    sends.clear()
    mem.delete("k1", level=Level.PRIVATE, principal=p)
    assert len(sends) == 1
    if backend == "redis":
        stats = raw_redis.info("commandstats")
        calls = {k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items()}
        for cmd in ("multi", "exec", "xadd"):
            assert calls[cmd] == 6, (cmd, calls)
        assert calls["set"] == 6  # the delete leaves its mark (CACHE_TOMBSTONE)
        assert "xlen" not in calls  # read one write in 64 (the warm-up's), see below


def _all_redis_bytes(client: redis.Redis) -> bytes:
    chunks: list[bytes] = []
    for key in client.scan_iter(count=1000):
        chunks.append(key)
        kind = client.type(key)
        if kind == b"string":
            chunks.append(client.get(key) or b"")
        elif kind == b"stream":
            for sid, fields in client.xrange(key):
                chunks.append(sid)
                for k, v in fields.items():
                    chunks += [k, v]
    return b"\x00".join(chunks)


def _file_bytes(*paths: Path) -> bytes:
    return b"".join(p.read_bytes() for p in paths if p.exists())


def test_encrypted_levels_never_appear_in_plaintext(
    make_mem: MakeMem,
    raw_redis: redis.Redis,
    db_path: Path,
    backend: str,
    request: pytest.FixtureRequest,
) -> None:
    mem = make_mem(worker=False)
    p = Principal(agent_id="a", team="t", swarm="s", project="p", system=True)
    for level in Level:
        mem.put(
            f"k/{level.name}", {"needle": f"PLAINTEXT-{level.name}-0451"}, level=level, principal=p
        )
    redis_bytes = _all_redis_bytes(raw_redis)
    if backend == "redis":
        srv = request.getfixturevalue("redis_server")
        raw_redis.execute_command("BGREWRITEAOF")
        time.sleep(0.3)
        redis_bytes += b"".join(f.read_bytes() for f in srv.workdir.rglob("*") if f.is_file())
    worker = make_mem(worker=True)
    last = worker.put("flush", 1, level=Level.SWARM, principal=p)
    worker.sync(last)
    worker.close()
    db_bytes = _file_bytes(db_path, Path(str(db_path) + "-wal"))
    # The promise spelled out, not ``level.encrypted``: a change to ENCRYPTED_LEVELS
    # would move that expectation with it.
    sealed = {Level.PRIVATE, Level.TEAM, Level.SYSTEM}
    for level in Level:
        needle = f"PLAINTEXT-{level.name}-0451".encode()
        # The positive control (levels 3 and 4) shows the search would find a leak.
        assert (needle in redis_bytes) is (level not in sealed), level
        assert (needle in db_bytes) is (level not in sealed), level


def _swap_envelope(db_path: Path, src: tuple[str, str], dst: tuple[str, str]) -> None:
    with sqlite3.connect(db_path) as conn:
        env = conn.execute("SELECT envelope FROM memory WHERE scope=? AND key=?", src).fetchone()[0]
        n = conn.execute(
            "UPDATE memory SET envelope=? WHERE scope=? AND key=?", (env, *dst)
        ).rowcount
        assert n == 1
    conn.close()


def test_ciphertext_moved_in_sqlite_is_detected_and_audited(
    mem: DualMemory, coder: Principal, system: Principal, db_path: Path
) -> None:
    p = Principal(agent_id="coder-1", team="backend", system=True)
    for scope_level, key in (
        (Level.PRIVATE, "a"),
        (Level.PRIVATE, "b"),
        (Level.TEAM, "a"),
        (Level.SYSTEM, "a"),
    ):
        last = mem.put(key, {"who": f"{scope_level.name}/{key}"}, level=scope_level, principal=p)
    mem.sync(last)
    _swap_envelope(db_path, ("agent:coder-1", "a"), ("agent:coder-1", "b"))  # another key
    _swap_envelope(db_path, ("agent:coder-1", "a"), ("team:backend", "a"))  # another scope/level
    _swap_envelope(db_path, ("agent:coder-1", "a"), ("system", "a"))  # another level
    for level, key in ((Level.PRIVATE, "b"), (Level.TEAM, "a"), (Level.SYSTEM, "a")):
        with pytest.raises(TamperedRecord):
            mem.get(key, level=level, principal=p)
    assert mem.get("a", level=Level.PRIVATE, principal=p) == {"who": "PRIVATE/a"}
    with pytest.raises(TamperedRecord):
        mem.query(principal=p, level=Level.PRIVATE)
    # A flipped bit in place.
    with sqlite3.connect(db_path) as conn:
        where = "WHERE scope='agent:coder-1' AND key='a'"
        env = bytearray(conn.execute(f"SELECT envelope FROM memory {where}").fetchone()[0])
        env[len(env) // 2] ^= 0x10
        conn.execute(f"UPDATE memory SET envelope = ? {where}", (bytes(env),))
    conn.close()
    with pytest.raises(TamperedRecord):
        mem.get("a", level=Level.PRIVATE, principal=p)

    def tamper_events() -> list[object]:
        return [a for a in mem.store.audit_log() if a.event == "tampered_record"]

    events = wait_until(lambda: len(tamper_events()) >= 5 and tamper_events(), what="audit rows")
    assert all(a.risk == "high" for a in events)  # type: ignore[attr-defined]


def test_plaintext_planted_in_an_encrypted_scope_with_a_plaintext_level_is_refused(
    mem: DualMemory, coder: Principal, db_path: Path, tmp_path: Path
) -> None:
    # A swarm member's plaintext envelope copied over the coder's PRIVATE row, with the
    # row's level column set to SWARM: get() always opened with the scope's level, query()
    # and export opened with the row's column and returned the planted value.
    mallory = Principal(agent_id="mallory", swarm=coder.swarm)
    mem.sync(mem.put("creds", {"token": "real"}, level=Level.PRIVATE, principal=coder))
    mem.sync(mem.put("creds", {"token": "forged"}, level=Level.SWARM, principal=mallory))
    with sqlite3.connect(db_path) as conn:
        (env,) = conn.execute(
            "SELECT envelope FROM memory WHERE scope = ? AND key = 'creds'",
            (f"swarm:{coder.swarm}",),
        ).fetchone()
        conn.execute(
            "UPDATE memory SET envelope = ?, level = 3 WHERE scope = 'agent:coder-1'", (env,)
        )
    conn.close()
    with pytest.raises(TamperedRecord):
        mem.get("creds", level=Level.PRIVATE, principal=coder)
    with pytest.raises(TamperedRecord, match="stored at level 3, but its scope is at level 1"):
        mem.query(principal=coder, level=Level.PRIVATE)
    with pytest.raises(TamperedRecord):
        mem.query(principal=coder)
    out = io.StringIO()
    with sqlite3.connect(db_path) as conn:
        result = export_records(
            conn,
            out,
            now_ms=int(time.time() * 1000),
            codec=mem.codec,
            decrypt_as=coder,
        )
    conn.close()
    exported = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(d["scope"], d["value"]) for d in exported] == [
        (f"swarm:{coder.swarm}", {"token": "forged"})  # mallory's own record, nothing else
    ]
    assert [e.split(": ", 1)[0] for e in result.errors] == ["agent:coder-1/creds"]
    # The mirror renders a row with the same rule (a file in the clear would be the leak).
    with sqlite3.connect(db_path) as conn:
        row = conn.execute(
            "SELECT scope, key, level, owner, envelope, updated_at, expires_at, stream_id "
            "FROM memory WHERE scope = 'agent:coder-1'"
        ).fetchone()
    conn.close()
    with pytest.raises(TamperedRecord, match="stored at level 3"):
        render_record(row, mem.codec)
    rows = wait_until(
        lambda: [
            a
            for a in mem.store.audit_log()
            if a.event == "tampered_record" and "its scope is at level 1" in a.detail
        ],
        what="audit rows",
    )
    assert all(a.risk == "high" and a.scope == "agent:coder-1" for a in rows)


def test_ciphertext_moved_in_redis_cache_is_detected(
    mem: DualMemory, coder: Principal, raw_redis: redis.Redis
) -> None:
    mem.put("a", {"v": "A"}, level=Level.PRIVATE, principal=coder)
    mem.put("b", {"v": "B"}, level=Level.PRIVATE, principal=coder)
    lay = mem.layout
    env_a = raw_redis.get(lay.cache_key(0, "agent:coder-1", "a"))
    assert mem.get("b", level=Level.PRIVATE, principal=coder, fresh=True) == {"v": "B"}
    raw_redis.set(lay.cache_key(0, "agent:coder-1", "b"), env_a)
    with pytest.raises(TamperedRecord):
        mem.get("b", level=Level.PRIVATE, principal=coder, fresh=True)


def test_other_agents_scope_is_denied_and_audited(
    mem: DualMemory, coder: Principal, other: Principal
) -> None:
    r = mem.put("secret", {"v": 1}, level=Level.PRIVATE, principal=other)
    mem.sync(r)
    attempts = [
        lambda: mem.get("secret", level=Level.PRIVATE, principal=coder, scope="agent:coder-2"),
        lambda: mem.put("secret", 2, level=Level.PRIVATE, principal=coder, scope="agent:coder-2"),
        lambda: mem.get("x", level=Level.SYSTEM, principal=coder),
        lambda: mem.put("x", 1, level=Level.SYSTEM, principal=coder),
        lambda: mem.query(principal=coder, scope="team:frontend"),
        lambda: mem.query(principal=coder, level=Level.SYSTEM),
        # A level and a scope that is not at it, or is no scope at all: another scope.
        lambda: mem.query(principal=coder, level=Level.TEAM, scope="agent:coder-2"),
        lambda: mem.query(principal=coder, level=Level.TEAM, scope="agentx:coder-2"),
        lambda: mem.history("secret", level=Level.PRIVATE, principal=coder, scope="agent:coder-2"),
        lambda: mem.delete("secret", level=Level.PRIVATE, principal=coder, scope="agent:coder-2"),
        lambda: mem.authorize(coder, Level.PRIVATE, "read", scope="agent:coder-2"),
        lambda: mem.authorize(coder, Level.SYSTEM, "write"),
    ]
    receipts = []
    for attempt in attempts:
        with pytest.raises(AccessDenied) as info:
            attempt()
        receipts.append(info.value.audit_receipt)  # type: ignore[attr-defined]
    for receipt in receipts:
        mem.sync(receipt)
    denials = [a for a in mem.store.audit_log() if a.event == "access_denied"]
    assert len(denials) == len(attempts)
    assert {a.actor for a in denials} == {"coder-1"}
    assert all(a.risk == "high" for a in denials)
    assert "agent:coder-2" in {a.scope for a in denials}
    # The owner still reads it, and the other agent's query never shows it.
    assert mem.get("secret", level=Level.PRIVATE, principal=other) == {"v": 1}
    assert all(r.scope != "agent:coder-2" for r in mem.query(principal=coder))
    assert all(c.scope != "agent:coder-2" for c in mem.changes(0, principal=coder))


def test_a_denial_is_audited_with_the_action_and_the_record_denied(
    mem: DualMemory, coder: Principal
) -> None:
    # The audit row of a denial says what was attempted, and where: a put or delete is a
    # write, a get, history or query a read (a write denied as a read hid an attempt to
    # change another agent's record among attempts to look); its scope and key are the
    # ones named.
    other: dict[str, Any] = {"level": Level.PRIVATE, "principal": coder, "scope": "agent:coder-2"}
    attempts: dict[str, Callable[[], object]] = {
        "put": lambda: mem.put("k", 1, **other),
        "delete": lambda: mem.delete("k", **other),
        "get": lambda: mem.get("k", **other),
        "history": lambda: mem.history("k", **other),
        "query": lambda: mem.query(principal=coder, scope="agent:coder-2"),
    }
    for name, attempt in attempts.items():
        with pytest.raises(AccessDenied) as info:
            attempt()
        mem.sync(info.value.audit_receipt)  # type: ignore[attr-defined]
        row = [a for a in mem.store.audit_log() if a.event == "access_denied"][-1]
        want = "write" if name in ("put", "delete") else "read"
        assert json.loads(row.detail)["action"] == want, name
        assert (row.scope, row.key) == ("agent:coder-2", None if name == "query" else "k")
        assert f"may not {want} scope 'agent:coder-2'" in json.loads(row.detail)["reason"]


def test_changes_keeps_to_the_level_asked_for_and_refuses_a_bad_seq_or_limit(
    mem: DualMemory, coder: Principal
) -> None:
    # changes(level=...) is the feed of that level's scope only (it gave every scope the
    # principal reads); since is a journal seq, an int in [0, 2**63), and limit an int
    # >= 0.
    for level in (Level.PRIVATE, Level.TEAM, Level.SWARM):
        last = mem.put(f"k{int(level)}", 1, level=level, principal=coder)
    mem.sync(last)
    assert [c.scope for c in mem.changes(0, principal=coder, level=Level.SWARM)] == [
        "swarm:phase-1-auth"
    ]
    assert len(mem.changes(0, principal=coder)) == 3
    for bad in (-1, 1 << 63, True, 1.0):
        with pytest.raises(ValidationError, match="since must be a journal seq"):
            mem.changes(bad, principal=coder)  # type: ignore[arg-type]
    # limit is an int >= 0 too: -1 reached SQLite as LIMIT -1, every change.
    assert len(mem.changes(0, principal=coder, limit=2)) == 2
    for bad_limit in (-1, 2.0, "2"):
        with pytest.raises(ValidationError, match="limit"):
            mem.changes(0, principal=coder, limit=bad_limit)  # type: ignore[arg-type]


def test_a_record_past_its_expiry_is_absent_from_get_record_too(
    mem: DualMemory, coder: Principal, monkeypatch: pytest.MonkeyPatch
) -> None:
    # get_record reads the whole row, by its own path: at its expiry it is gone there as
    # it is for get and query, not returned with expires_at in the past.
    mem.sync(mem.put("k", "v", level=Level.SWARM, principal=coder, ttl=60), timeout=10)
    record = mem.get_record("k", level=Level.SWARM, principal=coder)
    assert record is not None and record.expires_at is not None
    past = (record.expires_at + 1) / 1000
    with monkeypatch.context() as clock:  # the reads' clock only, then the real one
        clock.setattr(time, "time", lambda: past)
        assert mem.get_record("k", level=Level.SWARM, principal=coder) is None
        assert mem.get("k", level=Level.SWARM, principal=coder) is None


def test_a_fresh_get_record_leaves_what_the_cache_does_not_know_empty(
    make_mem: MakeMem, coder: Principal
) -> None:
    # From the cache entry only the value is known: the record's owner, times and stream
    # id are empty, never filled in with the reader's name (another swarm member here,
    # who did not write it).
    mem = make_mem(worker=False)
    mem.put("k", {"v": 1}, level=Level.SWARM, principal=coder)
    reader = Principal(agent_id="reader-9", swarm=coder.swarm)
    record = mem.get_record("k", level=Level.SWARM, principal=reader, fresh=True)
    assert record == memory_module.Record(
        "swarm:phase-1-auth", "k", Level.SWARM, "", {"v": 1}, 0, 0, None, ""
    )


def test_a_record_under_a_key_this_process_lacks_is_audited_as_a_missing_key(
    make_mem: MakeMem, coder: Principal, tmp_path: Path
) -> None:
    # A record sealed under a key id the reader's key file does not hold (a lost or
    # wrong key file, or a forged header) raises MissingKey and is audited as such, not
    # as tampering: the two call for different fixes.
    writer = make_mem()
    writer.sync(writer.put("k", 1, level=Level.PRIVATE, principal=coder))
    other_keys = tmp_path / "other-keys.json"
    Keyring.generate().save(other_keys)
    reader = make_mem(keyring=str(other_keys))
    with pytest.raises(MissingKey):
        reader.get("k", level=Level.PRIVATE, principal=coder)
    rows = wait_until(
        lambda: [a for a in writer.store.audit_log() if a.key == "k" and a.risk == "high"],
        what="the audit row",
    )
    assert [(a.event, a.actor, a.scope) for a in rows] == [
        ("missing_key", "coder-1", "agent:coder-1")
    ]


BAD_PUTS = [
    ({"key": ""}, "empty"),
    ({"key": "k" * 513}, "limit"),
    ({"key": "a\x00b"}, "NUL"),
    ({"value": {1, 2}}, "JSON"),
    ({"value": float("nan")}, "JSON"),
    ({"value": "x" * 3000}, "limit"),
    ({"level": 9}, "unknown level"),
    ({"level": "ADMIN"}, "unknown level"),
    ({"ttl": -5}, "ttl"),
    ({"principal": "coder-1"}, "Principal"),
]


@pytest.mark.parametrize(("change", "match"), BAD_PUTS)
def test_bad_input_is_rejected_and_nothing_is_stored(
    make_mem: MakeMem,
    coder: Principal,
    raw_redis: redis.Redis,
    change: dict[str, object],
    match: str,
) -> None:
    mem = make_mem(worker=False, max_value_bytes=2048)
    args: dict[str, object] = {"key": "k", "value": 1, "level": Level.SWARM, "principal": coder}
    args.update(change)
    key, value = args.pop("key"), args.pop("value")
    with pytest.raises(ValidationError, match=match):
        mem.put(key, value, **args)  # type: ignore[arg-type]
    assert raw_redis.xlen(mem.layout.stream(0)) == 0
    assert list(raw_redis.scan_iter(match="*:c:*")) == []


def test_principal_with_empty_id_cannot_be_built() -> None:
    with pytest.raises(ValidationError):
        Principal(agent_id="")


def test_backpressure_bounds_the_backlog(
    make_mem: MakeMem, coder: Principal, raw_redis: redis.Redis
) -> None:
    writer = make_mem(worker=False, max_backlog=5)
    receipts = [writer.put(f"k{i}", i, level=Level.SWARM, principal=coder) for i in range(5)]
    with pytest.raises(Backpressure) as info:
        writer.put("k5", 5, level=Level.SWARM, principal=coder)
    assert (info.value.backlog, info.value.bound) == (5, 5)
    assert raw_redis.xlen(writer.layout.stream(0)) == 5
    drain = make_mem(worker=True)
    for r in receipts:
        drain.sync(r)
    wait_until(lambda: raw_redis.xlen(writer.layout.stream(0)) == 0, what="trim after drain")
    writer.sync(writer.put("k5", 5, level=Level.SWARM, principal=coder))


def test_put_reads_the_backlog_one_write_in_64_and_each_write_near_the_bound(
    make_mem: MakeMem, coder: Principal, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = make_mem(worker=False, max_backlog=200)
    sent: list[tuple[bytes, ...]] = []
    original = memory_module.transact

    def recording(
        client: redis.Redis, commands: Sequence[tuple[Any, ...]], **kwargs: Any
    ) -> list[Any]:
        sent.append(tuple(c[0] for c in commands))
        return original(client, commands, **kwargs)

    monkeypatch.setattr(memory_module, "transact", recording)
    for i in range(199):
        writer.put(f"k{i}", i, level=Level.SWARM, principal=coder)
    with_xlen = [i for i, names in enumerate(sent) if b"XLEN" in names]
    # The first write, every 64th after it, then every write from 136 on (within 64 of 200).
    assert with_xlen == [0, 64, 128, *range(136, 199)]
    writer.put("k199", 199, level=Level.SWARM, principal=coder)
    with pytest.raises(Backpressure):
        writer.put("k200", 200, level=Level.SWARM, principal=coder)


def test_backpressure_with_two_writers_overshoots_by_at_most_64_each(
    make_mem: MakeMem, coder: Principal, raw_redis: redis.Redis
) -> None:
    a, b = make_mem(worker=False, max_backlog=300), make_mem(worker=False, max_backlog=300)
    stopped = set()
    for i in range(1000):
        for name, w in (("a", a), ("b", b)):
            if name in stopped:
                continue
            try:
                w.put(f"{name}{i}", i, level=Level.SWARM, principal=coder)
            except Backpressure:
                stopped.add(name)
        if len(stopped) == 2:
            break
    assert stopped == {"a", "b"}
    assert 300 <= raw_redis.xlen(a.layout.stream(0)) < 300 + 2 * 64


def test_threads_sharing_one_writer_never_pass_the_bound(
    make_mem: MakeMem, coder: Principal, raw_redis: redis.Redis
) -> None:
    # The estimate was read and raised without a lock: 32 threads each saw room for one
    # more and passed a bound of 1000 by up to 31 (128 threads: by 99).
    bound, threads = 300, 32
    writer = make_mem(worker=False, max_backlog=bound)
    start = threading.Barrier(threads)
    accepted = [0] * threads
    errors: list[BaseException] = []

    def write(t: int) -> None:
        start.wait()
        try:
            while True:
                writer.put(f"t{t}/{accepted[t]}", 1, level=Level.SWARM, principal=coder)
                accepted[t] += 1
        except Backpressure:
            return
        except BaseException as exc:  # reported below
            errors.append(exc)

    in_threads(write, threads)
    assert not errors
    # Each thread stops once the stream is full as far as the writer knows; the last one
    # running knows exactly, so the stream ends at the bound, not past it.
    assert raw_redis.xlen(writer.layout.stream(0)) == sum(accepted) == bound


def put_from_threads(mem: DualMemory, who: Principal, threads: int, each: int) -> list[Exception]:
    """``each`` puts from each of ``threads`` threads started at once; what they raised."""
    start = threading.Barrier(threads)
    errors: list[Exception] = []

    def write(t: int) -> None:
        start.wait()
        for i in range(each):
            try:
                mem.put(f"t{t}/{i}", i, level=Level.SWARM, principal=who)
            except Exception as exc:  # reported by the caller
                errors.append(exc)

    in_threads(write, threads)
    return errors


def in_threads(target: Callable[[int], None], threads: int) -> None:
    """Run ``target(0)`` .. ``target(threads - 1)`` each in a thread of its own; wait."""
    running = [threading.Thread(target=target, args=(t,)) for t in range(threads)]
    for th in running:
        th.start()
    for th in running:
        th.join(60)


@pytest.mark.parametrize(("threads", "limit"), [(120, None), (24, 3)])
def test_more_threads_than_connections_all_put(
    make_mem: MakeMem, coder: Principal, raw_redis: redis.Redis, threads: int, limit: int | None
) -> None:
    # redis-py's default pool refuses a 101st connection at once: 120 threads putting
    # through one DualMemory got StoreUnavailable ("Too many connections") from a healthy
    # Redis. The pool is bounded (max_connections, 100) and a thread waits its turn.
    mem = make_mem(worker=False, max_connections=limit)
    errors = put_from_threads(mem, coder, threads, 10)
    assert not errors, errors[:3]
    assert raw_redis.xlen(mem.layout.stream(0)) == threads * 10
    opened = mem._redis.connection_pool._connections  # type: ignore[attr-defined]
    assert len(opened) <= (limit or 100)


def test_restart_finishes_pending_writes(make_mem: MakeMem, coder: Principal) -> None:
    first = make_mem(worker=False)
    receipts = [
        first.put(f"k{i}", {"i": i}, level=Level.PRIVATE, principal=coder) for i in range(300)
    ]
    first.close()
    second = make_mem(worker=True)
    for r in receipts:
        second.sync(r, timeout=10)
    got = second.query(principal=coder, level=Level.PRIVATE, limit=1000)
    assert sorted(r.value["i"] for r in got) == list(range(300))


def test_dead_consumers_entries_are_claimed(
    make_mem: MakeMem, coder: Principal, raw_redis: redis.Redis
) -> None:
    writer = make_mem(worker=False)
    receipts = [writer.put(f"k{i}", i, level=Level.SWARM, principal=coder) for i in range(50)]
    stream = writer.layout.stream(0)
    # A consumer reads everything and dies before acking.
    taken = raw_redis.xreadgroup("persist", "dead-consumer", {stream: ">"}, count=100)
    assert len(taken[0][1]) == 50
    rescuer = make_mem(worker=True, claim_idle_ms=200)
    for r in receipts:
        rescuer.sync(r, timeout=10)
    # sync returns at the commit; the worker acks right after it (its ack pipeline), so a
    # loaded machine can show the entries pending for a moment.
    wait_until(
        lambda: raw_redis.xpending(stream, "persist")["pending"] == 0, what="the claimed acks"
    )
    assert len(rescuer.changes(0, principal=coder)) == 50


def test_a_worker_restarted_under_its_name_takes_back_its_own_pending_entries_at_once(
    make_mem: MakeMem, coder: Principal, raw_redis: redis.Redis
) -> None:
    # A worker with a fixed consumer name died holding entries, and came back. Its first
    # claim also reads its own pending list: without that, its first steps found nothing
    # (the entries are its own, not idle past claim_idle_ms) and they waited a full
    # claim time (a minute here) to be claimed like a dead consumer's.
    writer = make_mem(worker=False, claim_idle_ms=60_000)
    receipts = [writer.put(f"k{i}", i, level=Level.SWARM, principal=coder) for i in range(3)]
    stream = writer.layout.stream(0)
    assert len(raw_redis.xreadgroup("persist", "w", {stream: ">"}, count=10)[0][1]) == 3
    w = worker_of(writer, "w")
    assert w.step() == 3
    assert [writer.store.status(r.shard, r.stream_id) for r in receipts] == ["committed"] * 3
    assert raw_redis.xpending(stream, "persist")["pending"] == 0


def test_a_worker_forgets_consumers_silent_for_minutes_and_keeps_recent_ones(
    make_mem: MakeMem, coder: Principal, raw_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every restart adds a consumer name; the claim deletes those with nothing pending
    # silent for a minute (and four claim times). Without it XINFO CONSUMERS grew by one
    # name a restart for good; with the claim time alone as the limit, a worker between
    # two reads a few hundred milliseconds apart was deleted from under itself. One
    # still holding entries (more than a claim takes) stays: deleting it would throw
    # them away, and the group would have to deliver everything after them again.
    # The minute is 3 s here (the idle times are real: Redis's clock cannot be moved).
    import dualmem.worker as worker_module

    monkeypatch.setattr(worker_module, "_FORGET_IDLE_MS", 3_000)
    writer = make_mem(worker=False, claim_idle_ms=200, batch_size=1)
    stream = writer.layout.stream(0)
    writer.put("k0", 0, level=Level.SWARM, principal=coder)
    assert worker_of(writer, "gone").step() == 1  # committed and acked: nothing pending
    for i in range(3):
        writer.put(f"h{i}", i, level=Level.SWARM, principal=coder)
    assert len(raw_redis.xreadgroup("persist", "holder", {stream: ">"}, count=3)[0][1]) == 3
    time.sleep(3.2)  # "gone" silent past the limit
    assert worker_of(writer, "recent").step() == 1  # claims one of the holder's three
    time.sleep(0.3)  # silent past claim_idle_ms, far from the limit
    assert worker_of(writer, "w").step() == 1  # and another
    consumers = {
        c["name"].decode(): c["pending"] for c in raw_redis.xinfo_consumers(stream, "persist")
    }
    assert consumers == {"holder": 1, "recent": 0, "w": 0}


@pytest.mark.real_redis
@pytest.mark.parametrize("backend", ["redis"])  # fakeredis: a re-read keeps the idle time
def test_a_dead_consumers_entries_behind_many_fresh_pending_ones_are_claimed(
    make_mem: MakeMem, coder: Principal, raw_redis: redis.Redis
) -> None:
    # XAUTOCLAIM looks at no more than ten times COUNT pending entries a call (Redis 7).
    # With a live consumer's 19 fresh entries first in the pending list and a batch of
    # 2, the first call claims one dead entry: a claim that stopped there (and started
    # from the same place at every claim) left the others waiting behind the live
    # consumer's; one that asked the next call for a whole batch again took 3.
    writer = make_mem(worker=False, claim_idle_ms=200, batch_size=2)
    receipts = [writer.put(f"k{i}", i, level=Level.SWARM, principal=coder) for i in range(22)]
    stream = writer.layout.stream(0)
    assert len(raw_redis.xreadgroup("persist", "busy", {stream: ">"}, count=19)[0][1]) == 19
    assert len(raw_redis.xreadgroup("persist", "dead", {stream: ">"}, count=10)[0][1]) == 3
    time.sleep(0.3)  # the dead consumer's entries are idle past claim_idle_ms
    # The live consumer reads its pending entries again: they are not idle.
    assert len(raw_redis.xreadgroup("persist", "busy", {stream: "0"}, count=19)[0][1]) == 19
    w = worker_of(writer, "w")
    assert w.step() == 2
    assert w.stats.claimed == 2
    assert [writer.store.status(r.shard, r.stream_id) for r in receipts[19:]] == [
        "committed",
        "committed",
        None,
    ]


def test_entries_committed_whose_ack_failed_are_read_again_at_the_next_step(
    make_mem: MakeMem, coder: Principal, raw_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Redis failed the ack pipeline after the commit: the entries stay in this worker's
    # pending list. Without a look at that list next, they waited for a claim
    # (claim_idle_ms, a minute here), held in the backlog and unsettled for sync().
    writer = make_mem(worker=False, claim_idle_ms=60_000)
    stream = writer.layout.stream(0)
    for i in range(2):
        writer.put(f"k{i}", i, level=Level.SWARM, principal=coder)
    real = worker_module.send_many
    failed: list[int] = []

    def send_many(client: Any, commands: Any) -> Any:
        if not failed:
            failed.append(1)
            raise StoreUnavailable("ack: Redis is unavailable (planted by the test)")
        return real(client, commands)

    monkeypatch.setattr(worker_module, "send_many", send_many)
    w = worker_of(writer, "w")
    assert w.step() == 2 and failed  # committed, not acknowledged
    assert raw_redis.xpending(stream, "persist")["pending"] == 2
    assert w.step() == 2
    assert (w.stats.applied, w.stats.duplicates) == (2, 2)
    assert raw_redis.xpending(stream, "persist")["pending"] == 0


def test_the_worker_counts_what_its_stop_summary_prints(
    make_mem: MakeMem, coder: Principal, raw_redis: redis.Redis
) -> None:
    # `dualmem worker` ends with "<n> applied, <n> duplicates, <n> claimed, <n>
    # dead-lettered": duplicates (entries committed before a crash, redelivered) and
    # batches were never counted, and nothing failed for it.
    from dualmem.store import StreamEntry

    writer = make_mem(worker=False, max_deliveries=1)
    stream = writer.layout.stream(0)
    for i in range(3):
        writer.put(f"d{i}", i, level=Level.SWARM, principal=coder)
    # The crash between COMMIT and XACK: committed, not acknowledged.
    writer.store.apply([StreamEntry(0, sid.decode(), f) for sid, f in raw_redis.xrange(stream)])
    for i in range(2):
        writer.put(f"n{i}", i, level=Level.SWARM, principal=coder)
    raw_redis.xadd(stream, {b"op": b"put", b"s": b"swarm:phase-1-auth", b"k": b"x"})  # malformed
    w = worker_of(writer, "w")
    assert w.step() == 6
    assert w.stats == WorkerStats(
        batches=1, applied=2, duplicates=3, claimed=0, dead_lettered=1, failures=1
    )


def test_replayed_entries_change_nothing(
    make_mem: MakeMem, coder: Principal, raw_redis: redis.Redis, db_path: Path
) -> None:
    writer = make_mem(worker=False)
    for i in range(20):
        writer.put(f"k{i % 5}", i, level=Level.SWARM, principal=coder)
    from dualmem.store import StreamEntry

    stream = writer.layout.stream(0)
    entries = [StreamEntry(0, sid.decode(), f) for sid, f in raw_redis.xrange(stream)]
    # The crash between COMMIT and XACK: the batch is committed, the entries stay pending.
    first = writer.store.apply(entries)
    assert first.applied == 20
    before = _dump(db_path)
    worker = make_mem(worker=True)
    wait_until(lambda: worker.backlog() == {0: 0}, what="redelivery acked")
    assert _dump(db_path) == before
    assert writer.store.apply(entries).duplicates == 20


def _dump(db_path: Path) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    with sqlite3.connect(db_path) as conn:
        mem_rows = conn.execute("SELECT * FROM memory ORDER BY scope, key").fetchall()
        journal = conn.execute("SELECT * FROM journal ORDER BY seq").fetchall()
    conn.close()
    return mem_rows, journal


def test_poison_entries_go_to_dead_letters_and_the_rest_flows(
    make_mem: MakeMem, coder: Principal, raw_redis: redis.Redis, db_path: Path
) -> None:
    writer = make_mem(worker=False)
    stream = writer.layout.stream(0)
    good1 = writer.put("good1", 1, level=Level.SWARM, principal=coder)
    bad_id = raw_redis.xadd(stream, {b"op": b"put", b"s": b"swarm:phase-1-auth", b"k": b"x"})
    poison = writer.put("poison", 2, level=Level.SWARM, principal=coder)
    good2 = writer.put("good2", 3, level=Level.SWARM, principal=coder)
    refuse_inserts(db_path, "NEW.key = 'poison'")
    worker = make_mem(worker=True, max_deliveries=3, claim_idle_ms=50)
    worker.sync(good1)
    worker.sync(good2)
    wait_until(lambda: len(worker.store.dead_letters()) == 2, what="two dead letters")
    dead = {d.stream_id: d for d in worker.store.dead_letters()}
    assert "malformed" in dead[bad_id.decode()].error
    assert REFUSED in dead[poison.stream_id].error
    assert all(d.deliveries >= 3 for d in dead.values())
    with pytest.raises(NotPersisted, match="dead-lettered"):
        worker.sync(poison, timeout=1)
    wait_until(lambda: raw_redis.xpending(stream, "persist")["pending"] == 0, what="acked")


def test_a_failing_entry_is_dead_lettered_at_delivery_max_deliveries_not_before(
    make_mem: MakeMem, coder: Principal, raw_redis: redis.Redis, db_path: Path
) -> None:
    # Counted one delivery ahead, an entry was dead-lettered a delivery early (at its
    # first with max_deliveries 2), its letter claiming the delivery it never had.
    writer = make_mem(worker=False, max_deliveries=2)
    poison = writer.put("poison", 1, level=Level.SWARM, principal=coder)
    refuse_inserts(db_path)
    w = worker_of(writer, "w")
    w.ensure_groups()
    assert w.step() == 1
    assert writer.store.dead_letters() == []
    pending = raw_redis.xpending_range(writer.layout.stream(0), "persist", "-", "+", 10)
    assert [p["times_delivered"] for p in pending] == [1]
    assert w.step() == 1  # its own pending list, read again: the second delivery
    (dead,) = writer.store.dead_letters()
    assert (dead.stream_id, dead.deliveries) == (poison.stream_id, 2)


def test_a_dead_lettered_write_leaves_no_cache_entry_for_fresh_reads(
    make_mem: MakeMem, coder: Principal, db_path: Path
) -> None:
    # Fresh reads answered a dead-lettered put's value (or a delete's mark) from the cache
    # for cache_ttl, for good for an agent's pinned state, though SQLite never had it. A
    # put with a ttl too: its cache entry holds its expiry, and the worker looked for
    # one without it, found none and kept the entry. The last entry of the stream too:
    # the look at what came after it took the entry itself for a later write.
    writer = make_mem(worker=False)
    swarm = {"level": Level.SWARM, "principal": coder}
    kept = [writer.put(k, "committed", **swarm) for k in ("k", "d", "j", "t")]
    poison = [
        writer.put("k", "never committed", **swarm),
        writer.delete("d", **swarm),
        writer.put("j", "never committed", **swarm),
    ]
    newer = writer.put("j", "newer", **swarm)  # its cache entry replaced the poison's
    poison.append(writer.put("t", "never committed", ttl=3600, **swarm))  # the last entry
    _poison(db_path, *(r.stream_id for r in poison))
    assert writer.get("k", fresh=True, **swarm) == "never committed"
    assert writer.get("d", fresh=True, **swarm) is None
    assert writer.get("t", fresh=True, **swarm) == "never committed"
    worker = make_mem(max_deliveries=2, claim_idle_ms=50)
    for r in [*kept, newer]:
        worker.sync(r)
    wait_until(lambda: len(worker.store.dead_letters()) == 4, what="four dead letters")
    # The entries go right after the dead letters' commit.
    wait_until(
        lambda: [worker.get(k, fresh=True, **swarm) for k in "kdt"] == ["committed"] * 3,
        timeout=2,
        what="the dead writes' cache entries gone",
    )
    assert worker.get("j", fresh=True, **swarm) == "newer"


def test_dead_writes_of_one_batch_keep_the_mark_of_a_delete_between_them(
    make_mem: MakeMem, coder: Principal, raw_redis: redis.Redis, db_path: Path
) -> None:
    # Two dead writes in one batch, and between them in the stream a delete of the
    # first's key that a dead consumer holds (not committed yet): its mark is the same
    # bytes as the dead delete's. Reading the stream after the batch's newest dead write
    # missed it, and the cleanup took its mark: fresh reads showed the deleted value.
    writer = make_mem(worker=False, max_deliveries=2, claim_idle_ms=3_600_000)
    swarm = {"level": Level.SWARM, "principal": coder}
    stream, group = writer.layout.stream(0), writer.settings.group
    writer.put("k", "v", **swarm)
    assert worker_of(writer, "w").step() == 1
    dead_delete = writer.delete("k", **swarm)
    writer.delete("k", **swarm)  # held by a dead consumer
    dead_put = writer.put("j", "never committed", **swarm)
    _poison(db_path, dead_delete.stream_id, dead_put.stream_id)
    for consumer in ("w", "dead", "w"):
        assert len(raw_redis.xreadgroup(group, consumer, {stream: ">"}, count=1)[0][1]) == 1
    w = worker_of(writer, "w")  # back: its first step reads its own pending entries
    assert w.step() == 2
    assert len(writer.store.dead_letters()) == 2
    assert writer.get("k", fresh=True, **swarm) is None


def test_a_dead_lettered_write_on_another_shard_leaves_no_cache_entry(
    make_mem: MakeMem, coder: Principal, db_path: Path
) -> None:
    # The cache entry is looked for on the shard of the write's key: looked for on
    # shard 0, a dead-lettered put of a shard-1 key kept answering fresh reads.
    writer = make_mem(worker=False, shards=2)
    swarm = {"level": Level.SWARM, "principal": coder}
    scope = "swarm:phase-1-auth"  # the coder's swarm
    key = next(k for k in (f"k{i}" for i in range(100)) if writer.layout.shard_of(scope, k) == 1)
    kept = writer.put(key, "committed", **swarm)
    poison = writer.put(key, "never committed", **swarm)
    _poison(db_path, poison.stream_id)
    assert writer.get(key, fresh=True, **swarm) == "never committed"
    worker = make_mem(max_deliveries=1, shards=2)
    worker.sync(kept)
    wait_until(lambda: len(worker.store.dead_letters()) == 1, what="the dead letter")
    wait_until(
        lambda: worker.get(key, fresh=True, **swarm) == "committed",
        timeout=2,
        what="the dead write's cache entry gone",
    )


def _poison(db_path: Path, *stream_ids: str) -> None:
    """Make the memory row of each of ``stream_ids`` fail (a real SQLite error)."""
    marks = ",".join(f"'{sid}'" for sid in stream_ids)
    refuse_inserts(db_path, f"NEW.stream_id IN ({marks})")


def test_a_dead_lettered_write_keeps_the_cache_entry_of_a_newer_write_of_the_same_bytes(
    make_mem: MakeMem, coder: Principal, db_path: Path
) -> None:
    # Every delete leaves the same mark, and a plaintext put of the same value the same
    # envelope: dropping the entry because it held the dead write's bytes took the newer
    # write's, and its writer no longer read its own delete (or put) before the commit.
    writer = make_mem(worker=False)
    swarm = {"level": Level.SWARM, "principal": coder}
    settings = writer.settings.replace(consumer="w", batch_size=1, max_deliveries=1)
    worker = Worker(writer._redis, writer.store, settings)
    for k in ("d", "j"):
        writer.put(k, "committed", **swarm)
        assert worker.step() == 1
    d1, _ = writer.delete("d", **swarm), writer.delete("d", **swarm)
    j1, _ = writer.put("j", "again", **swarm), writer.put("j", "again", **swarm)
    _poison(db_path, d1.stream_id, j1.stream_id)
    assert worker.step() == 1 and len(writer.store.dead_letters()) == 1  # d1 dead, d2 waits
    assert writer.get("d", fresh=True, **swarm) is None
    assert worker.step() == 1  # d2 committed
    assert worker.step() == 1 and len(writer.store.dead_letters()) == 2  # j1 dead, j2 waits
    assert writer.get("j", fresh=True, **swarm) == "again"
    assert worker.step() == 1
    assert writer.get("j", **swarm) == "again" and writer.get("d", **swarm) is None


def test_a_dead_lettered_delete_keeps_the_mark_of_a_delete_made_while_it_looked(
    make_mem: MakeMem, coder: Principal, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As above, the newer delete made after the worker read the stream behind the dead
    # one and before it watched the cache entry: the entry holds the same mark, so only
    # the second look at the stream, on the watched connection, tells them apart.
    writer = make_mem(worker=False)
    swarm = {"level": Level.SWARM, "principal": coder}
    settings = writer.settings.replace(consumer="w", batch_size=1, max_deliveries=1)
    worker = Worker(writer._redis, writer.store, settings)
    writer.put("d", "committed", **swarm)
    assert worker.step() == 1
    d1 = writer.delete("d", **swarm)
    _poison(db_path, d1.stream_id)
    real = worker_module._writes_after
    newer: list[Receipt] = []

    def writes_after(client: Any, stream: bytes, stream_id: str) -> Any:
        after = real(client, stream, stream_id)
        if not newer:
            newer.append(writer.delete("d", **swarm))
        return after

    monkeypatch.setattr(worker_module, "_writes_after", writes_after)
    assert worker.step() == 1 and len(writer.store.dead_letters()) == 1  # d1 dead
    assert newer and writer.get("d", fresh=True, **swarm) is None
    assert worker.step() == 1  # the newer delete committed
    assert writer.get("d", **swarm) is None


def test_a_dead_lettered_copy_or_replay_keeps_the_cache_entry_of_a_later_write(
    make_mem: MakeMem, coder: Principal, raw_redis: redis.Redis, db_path: Path
) -> None:
    # A sealed envelope names its write, but an import sends the same envelope again: the
    # first copy dead-lettered dropped the second's entry while it waited. A replay never
    # writes a cache entry, yet one dead-lettered again dropped the mark of a newer
    # delete pending before it in the stream. One connection only: every look at Redis
    # goes over the watched one (a second was never free, and the entry was kept).
    writer = make_mem(worker=False, max_connections=1)
    private = {"level": Level.PRIVATE, "principal": coder}
    settings = writer.settings.replace(
        consumer="w", batch_size=1, max_deliveries=1, claim_idle_ms=3_600_000
    )
    worker = Worker(writer._redis, writer.store, settings)
    stream = writer.layout.stream(0)
    writer.put("s", "committed", **private)
    assert worker.step() == 1
    first = writer.put("s", "copied", **private)
    ((_, fields),) = raw_redis.xrange(stream, min=first.stream_id, max=first.stream_id)
    raw_redis.xadd(stream, fields)  # the same command again, as an import of one line twice
    _poison(db_path, first.stream_id)
    assert worker.step() == 1 and len(writer.store.dead_letters()) == 1
    assert writer.get("s", fresh=True, **private) == "copied"  # the copy waits
    assert worker.step() == 1
    # A replay dead-lettered again, with the writer's own newer delete pending before it.
    writer.put("k", "v0", **private)
    assert worker.step() == 1
    refuse_inserts(db_path, "NEW.key = 'k' AND NEW.envelope IS NULL")
    writer.delete("k", **private)
    assert worker.step() == 1 and len(writer.store.dead_letters()) == 2
    writer.delete("k", **private)
    raw_redis.xreadgroup(settings.group, "dead", {stream: ">"}, count=1)  # held, not acked
    letter = max(d.id for d in writer.store.dead_letters())
    with Runtime(writer.settings.replace(consumer="ops"), worker=False) as rt:
        replay(rt, [letter])
    while worker.step():  # the replay, dead again, and its audit event
        pass
    assert len(writer.store.dead_letters(include_replayed=True)) == 3
    assert writer.get("k", fresh=True, **private) is None


def test_a_dead_lettered_write_re_sealed_by_a_key_rotation_leaves_no_cache_entry(
    make_mem: MakeMem, coder: Principal, db_path: Path, keyfile: Path
) -> None:
    # A rotation re-seals the cache entry of a put not yet committed (a new nonce, the
    # same write id): compared by its bytes, the dead write's entry looked like another
    # write's and stayed, for good for a pinned agent state. The re-encryption of the
    # record's committed row, queued behind it, is no later write either.
    from dualmem.rotation import add_active_key, rotate_keys

    writer = make_mem(worker=False)
    private = {"level": Level.PRIVATE, "principal": coder}
    writer.put("s", {"v": "committed"}, **private)
    assert worker_of(writer, "w").step() == 1
    poison = writer._put_pinned("s", {"v": "never committed"}, **private)
    _poison(db_path, poison.stream_id)
    add_active_key(keyfile)
    report = rotate_keys(make_mem(worker=False), timeout=1)
    assert (report.resealed_cache, report.resealed_rows) == (1, 1)
    worker = make_mem(max_deliveries=1)
    wait_until(lambda: len(worker.store.dead_letters()) == 1, what="the dead letter")
    # The entry goes right after the dead letter's commit.
    wait_until(
        lambda: worker.get("s", fresh=True, **private) == {"v": "committed"},
        timeout=2,
        what="the dead write's cache entry gone",
    )


def test_a_dead_lettered_write_keeps_its_cache_entry_behind_a_long_stream(
    make_mem: MakeMem, coder: Principal, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The cleanup reads the stream behind a batch's dead entries once, up to a bound (a
    # scan per dead letter through a large backlog stalled the worker for seconds); past
    # the bound it cannot tell whether a later write of the key waits, and keeps the entry.
    monkeypatch.setattr(worker_module, "_FORGET_SCAN_LIMIT", 3)
    writer = make_mem(worker=False)
    swarm = {"level": Level.SWARM, "principal": coder}
    settings = writer.settings.replace(consumer="w", batch_size=1, max_deliveries=1)
    worker = Worker(writer._redis, writer.store, settings)
    writer.put("k", "committed", **swarm)
    assert worker.step() == 1
    poison = writer.put("k", "never committed", **swarm)
    _poison(db_path, poison.stream_id)
    behind = [writer.put(f"other{i}", i, **swarm) for i in range(3)]
    assert worker.step() == 1 and len(writer.store.dead_letters()) == 1
    assert writer.get("k", fresh=True, **swarm) == "never committed"  # kept: cannot tell
    while worker.step():
        pass
    assert [writer.store.status(r.shard, r.stream_id) for r in behind] == ["committed"] * 3


def _trip_on(keys: set[bytes] | None) -> staticmethod[..., None]:
    """A stand-in for a bug in the store: ``SQLiteStore._write_plan`` raising RuntimeError
    (not an outage, not a per-entry SQLite error) for a plan holding one of ``keys``, or
    for every plan with anything new to write when ``keys`` is None. The real write runs
    otherwise."""
    real = SQLiteStore._write_plan

    def tripping(conn: sqlite3.Connection, plan: Any) -> None:
        if plan.applied and (keys is None or any(e.fields.get(b"k") in keys for e in plan.applied)):
            raise RuntimeError("a bug planted by the test")
        real(conn, plan)

    return staticmethod(tripping)


def test_an_entry_tripping_an_unexpected_error_is_dead_lettered_and_the_rest_flows(
    make_mem: MakeMem, coder: Principal, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = make_mem(worker=False)
    poison = writer.put("poison", 1, level=Level.SWARM, principal=coder)
    monkeypatch.setattr(SQLiteStore, "_write_plan", _trip_on({b"poison"}))
    worker = make_mem(worker=True, max_deliveries=3, claim_idle_ms=50)
    # Alone, the poison cannot be told from a bug that fails everything: it waits.
    time.sleep(0.5)
    assert worker.store.dead_letters() == []
    assert worker.store.status(poison.shard, poison.stream_id) != "committed"
    # Commands behind it still flow, and beside them it fails alone: dead-lettered.
    goods = [writer.put(f"good{i}", i, level=Level.SWARM, principal=coder) for i in range(3)]
    for receipt in goods:
        worker.sync(receipt, timeout=10)
    wait_until(lambda: len(worker.store.dead_letters()) == 1, what="the poison dead-lettered")
    (dead,) = worker.store.dead_letters()
    assert dead.stream_id == poison.stream_id
    assert "unexpected RuntimeError: a bug planted by the test" in dead.error
    with pytest.raises(NotPersisted, match="dead-lettered"):
        worker.sync(poison, timeout=1)
    assert worker.get("good2", level=Level.SWARM, principal=coder) == 2


def test_entries_applied_alone_are_acked_published_and_timed_in_that_step(
    make_mem: MakeMem,
    coder: Principal,
    raw_redis: redis.Redis,
    db_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # After a batch hit a bug, each entry is applied alone and the results are merged:
    # a merge that dropped the committed entries, an entry's own failure, the
    # notifications or the lag samples passed every test (the entries came back and were
    # settled later; a subscriber saw them at its next journal recheck). In the step
    # itself they must be acked or dead-lettered, published and timed as a batch's are.
    writer = make_mem(worker=False, max_deliveries=1)
    swarm = {"level": Level.SWARM, "principal": coder}
    writer.put("poison", 0, **swarm)
    writer.audit("first", principal=coder)
    for i in range(3):
        writer.put(f"good{i}", i, **swarm)
    writer.audit("last", principal=coder)
    monkeypatch.setattr(SQLiteStore, "_write_plan", _trip_on({b"poison"}))
    refuse_inserts(db_path, "NEW.key = 'good2'")  # fails alone too, as a full disk would
    feed = raw_redis.pubsub()
    feed.subscribe(writer.layout.channel("swarm:phase-1-auth"))
    w = worker_of(writer, "w")
    w.ensure_groups()
    assert feed.get_message(timeout=5)["type"] == "subscribe"  # type: ignore[index]
    assert w.step() == 6
    assert raw_redis.xpending(writer.layout.stream(0), writer.settings.group)["pending"] == 0
    dead = sorted(d.fields[b"k"].decode() for d in writer.store.dead_letters())
    assert dead == ["good2", "poison"]
    published = []
    while (message := feed.get_message(timeout=1)) is not None:
        published += [n.key for n in Notification.parse_message(message["data"])]
    feed.close()
    assert sorted(published) == ["good0", "good1"]
    assert w.metrics.histograms["lag"].count == 2  # the two puts (events carry no lag)
    assert w.stats.applied == 4
    # The chain anchors name the newest rows, not the first entry's.
    (journal,) = raw_redis.zrange(writer.layout.anchor_key("journal"), -1, -1)
    assert int(journal.split(b":")[0]) == writer.store.last_seq()
    (audit,) = raw_redis.zrange(writer.layout.anchor_key("audit_log"), -1, -1)
    (last,) = [a.id for a in writer.store.audit_log() if a.event == "last"]
    assert int(audit.split(b":")[0]) == last  # the dead letters' rows are written after


def test_an_outage_while_entries_are_applied_alone_dead_letters_nothing(
    make_mem: MakeMem, coder: Principal, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # While a batch that hit a bug was applied entry by entry, the database was locked
    # for one of them: taken for that entry's own failure, it was dead-lettered beside
    # the poison (max_deliveries 1), though nothing was wrong with it.
    writer = make_mem(worker=False, max_deliveries=1, busy_timeout_ms=20)
    swarm = {"level": Level.SWARM, "principal": coder}
    poison = writer.put("poison", 0, **swarm)
    good = writer.put("good", 1, **swarm)
    locked = writer.put("locked", 2, **swarm)
    monkeypatch.setattr(SQLiteStore, "_write_plan", _trip_on({b"poison"}))
    store = writer.store
    real_apply = store.apply
    held = threading.Event()

    def apply(entries: Any) -> Any:
        if [e.stream_id for e in entries] == [locked.stream_id] and not held.is_set():
            held.set()
            with write_locked(db_path):  # another connection holds the lock meanwhile
                return real_apply(entries)
        return real_apply(entries)

    monkeypatch.setattr(store, "apply", apply)
    w = Worker(writer._redis, store, writer.settings.replace(consumer="w"))
    w.ensure_groups()
    with pytest.raises(StoreUnavailable):  # an outage: the loop retries the batch
        w.step()
    assert held.is_set() and store.dead_letters() == []
    assert w.drain(10) == 0
    assert [d.stream_id for d in store.dead_letters()] == [poison.stream_id]
    assert store.status(good.shard, good.stream_id) == "committed"
    assert store.status(locked.shard, locked.stream_id) == "committed"


def test_a_bug_failing_every_entry_dead_letters_nothing(
    make_mem: MakeMem, coder: Principal, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = make_mem(worker=False)
    receipts = [writer.put(f"k{i}", i, level=Level.SWARM, principal=coder) for i in range(5)]
    monkeypatch.setattr(SQLiteStore, "_write_plan", _trip_on(None))
    worker = make_mem(worker=True, max_deliveries=2, claim_idle_ms=50)
    receipts.append(writer.put("late", 5, level=Level.SWARM, principal=coder))
    time.sleep(1.0)  # several retries, far past max_deliveries
    assert worker.store.dead_letters() == []
    assert all(worker.store.status(r.shard, r.stream_id) != "committed" for r in receipts)
    monkeypatch.undo()  # the bug fixed: everything commits, in order
    for r in receipts:
        worker.sync(r, timeout=10)
    assert worker.store.dead_letters() == []
    assert worker.get("late", level=Level.SWARM, principal=coder) == 5


def test_a_bug_failing_every_new_write_dead_letters_nothing_beside_a_duplicate(
    make_mem: MakeMem, coder: Principal, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = make_mem(worker=False, max_deliveries=2, claim_idle_ms=50)
    receipts = [writer.put(f"k{i}", i, level=Level.SWARM, principal=coder) for i in range(4)]
    # A worker committed k0 and died before its XACK: k0 comes back as a duplicate.
    dead = worker_of(writer, "dead")
    dead.ensure_groups()
    stream = writer.layout.stream(0)
    resp = writer._redis.xreadgroup(writer.settings.group, "dead", {stream: ">"}, count=1)
    writer.store.apply(dead._entries(resp))
    monkeypatch.setattr(SQLiteStore, "_write_plan", _trip_on(None))
    w = worker_of(writer, "w")
    w._next_claim = time.monotonic() + 3600  # first its own reads: k1..k3 fail, retried
    for _ in range(3):
        with contextlib.suppress(RuntimeError):
            w.step()
    time.sleep(0.1)  # past claim_idle_ms: one claim returns k0 (dead's) with k1..k3
    w._next_claim = 0
    with contextlib.suppress(RuntimeError):
        w.step()
    # k0 "committing" alone is no evidence that the others are at fault.
    assert writer.store.dead_letters() == []
    status = [writer.store.status(r.shard, r.stream_id) for r in receipts]
    assert status[0] == "committed" and "committed" not in status[1:]


def test_trimming_never_removes_a_pending_entry(
    make_mem: MakeMem, coder: Principal, raw_redis: redis.Redis
) -> None:
    writer = make_mem(worker=False)
    stream = writer.layout.stream(0)
    for i in range(10):
        writer.put(f"k{i}", i, level=Level.SWARM, principal=coder)
    held = [sid for sid, _ in raw_redis.xreadgroup("persist", "slow", {stream: ">"}, count=4)[0][1]]
    w = worker_of(writer, "w")
    assert w.step() == 6  # the other six, committed and acked
    w._trim()
    ids = [sid for sid, _ in raw_redis.xrange(stream)]
    assert ids[:4] == held and len(ids) == 10  # nothing below the oldest pending entry goes
    raw_redis.xack(stream, "persist", held[0], held[1])
    w._trim()
    assert [sid for sid, _ in raw_redis.xrange(stream)][:2] == held[2:]
    assert raw_redis.xlen(stream) == 8
    raw_redis.xack(stream, "persist", *held[2:])
    for i in range(3):
        writer.put(f"late{i}", i, level=Level.SWARM, principal=coder)
    w._trim()
    assert raw_redis.xlen(stream) == 3  # acked entries gone, undelivered ones kept
    assert w.step() == 3
    w._trim()
    assert raw_redis.xlen(stream) == 0


def test_trimming_keeps_what_another_group_has_not_acknowledged(
    make_mem: MakeMem, coder: Principal, raw_redis: redis.Redis
) -> None:
    # The trim floor is the lowest of every group's: a floor taken from the group furthest
    # ahead removed commands another group (another deployment reading the same streams)
    # had not read yet.
    writer = make_mem(worker=False)
    stream = writer.layout.stream(0)
    ids = [writer.put(f"k{i}", i, level=Level.SWARM, principal=coder).stream_id for i in range(5)]
    raw_redis.xgroup_create(stream, "other", id="0")
    w = worker_of(writer, "w")
    w.ensure_groups()
    assert w.step() == 5
    w._trim()
    assert raw_redis.xlen(stream) == 5
    raw_redis.xreadgroup("other", "o", {stream: ">"}, count=2)
    raw_redis.xack(stream, "other", *ids[:2])
    w._trim()
    assert [sid.decode() for sid, _ in raw_redis.xrange(stream)] == ids[2:]


def test_trimming_leaves_a_stream_whose_group_is_gone_whole(
    make_mem: MakeMem, coder: Principal, raw_redis: redis.Redis
) -> None:
    # Redis came back without the consumer group, and writers' XADDs recreated the
    # stream: nothing says what was acknowledged, so nothing is trimmed. A trim sent
    # anyway (with no floor) failed the worker's step and its drain.
    writer = make_mem(worker=False)
    stream = writer.layout.stream(0)
    w = worker_of(writer, "w")
    w.ensure_groups()
    raw_redis.xgroup_destroy(stream, writer.settings.group)
    for i in range(3):
        writer.put(f"k{i}", i, level=Level.SWARM, principal=coder)
    w._trim()
    assert raw_redis.xlen(stream) == 3


def test_a_drain_counts_what_every_shard_still_holds(
    make_mem: MakeMem, coder: Principal, raw_redis: redis.Redis
) -> None:
    # A worker of two shards whose drain ran out of time with a dead consumer's entry
    # still pending on shard 0 (not idle long enough to claim): it counted the last
    # shard's backlog alone and reported 0, drained.
    writer = make_mem(worker=False, shards=2, claim_idle_ms=60_000)
    scope = "swarm:phase-1-auth"  # the coder's swarm
    key = next(k for k in (f"k{i}" for i in range(100)) if writer.layout.shard_of(scope, k) == 0)
    writer.put(key, 1, level=Level.SWARM, principal=coder)
    w = worker_of(writer, "w")
    w.ensure_groups()
    stream = writer.layout.stream(0)
    raw_redis.xreadgroup(writer.settings.group, "dead", {stream: ">"}, count=10)
    assert w.backlog() == 1
    assert w.drain(0.1) == 1


def test_creating_the_consumer_groups_on_a_key_that_is_no_stream_fails(
    make_mem: MakeMem, raw_redis: redis.Redis
) -> None:
    # Only "the group exists already" is taken for done: a stream's key holding
    # another program's string let the worker start without a group and fail every
    # read after that, a warning a cycle, for as long as it ran.
    from dualmem.worker import stream_pending

    writer = make_mem(worker=False)
    raw_redis.set(writer.layout.stream(0), b"not a stream")
    with pytest.raises(DualMemError, match="WRONGTYPE"):
        worker_of(writer, "w").ensure_groups()
    # Only a missing stream reads as "no groups": `dualmem stats` showed 0 pending.
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        stream_pending(raw_redis, writer.layout.stream(0), writer.settings.group)


def test_a_running_worker_saves_its_latency_figures_every_metrics_interval(
    make_mem: MakeMem, coder: Principal
) -> None:
    # `dualmem stats` and the exporter read the figures a worker saves every
    # metrics_interval while it runs: a worker that saved them only when it stopped
    # showed nothing for as long as it ran, and nothing failed.
    writer = make_mem(worker=False)
    writer.put("k", "v", level=Level.SWARM, principal=coder)
    w = worker_of(writer, "w")
    assert w.step() == 1
    assert "w" not in writer.store.latest_metrics()
    w._next_metrics = 0
    w._housekeeping()
    assert writer.store.latest_metrics()["w"]["persist"]["count"] == 1


def test_the_workers_purge_keeps_a_tombstone_younger_than_tombstone_ttl(
    make_mem: MakeMem, coder: Principal, db_path: Path
) -> None:
    # The worker's periodic purge drops tombstones older than tombstone_ttl only: one
    # that purged every tombstone at once passed every test (they set the ttl to 0).
    writer = make_mem(worker=False, tombstone_ttl=3600)
    writer.put("k", "v", level=Level.SWARM, principal=coder)
    writer.delete("k", level=Level.SWARM, principal=coder)
    w = worker_of(writer, "w")
    assert w.step() == 2
    w._next_purge = 0
    w._housekeeping()
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        rows = conn.execute("SELECT key, envelope FROM memory").fetchall()
    assert rows == [("k", None)]  # the tombstone, kept for its hour


def test_purge_keeps_a_tombstone_while_an_older_put_of_its_key_is_pending(
    make_mem: MakeMem, coder: Principal, raw_redis: redis.Redis
) -> None:
    # A put delivered to a consumer that died, then its key's delete committed by another:
    # purge (the worker's, or `dualmem purge --tombstone-ttl 0`) dropped the tombstone
    # while the put still waited to be claimed, and the claim brought the deleted value back.
    writer = make_mem(worker=False, claim_idle_ms=50, tombstone_ttl=0)
    stream = writer.layout.stream(0)
    writer.put("k", "old", level=Level.SWARM, principal=coder)
    worker_of(writer, "dead").ensure_groups()
    raw_redis.xreadgroup(writer.settings.group, "dead", {stream: ">"}, count=1)  # never acked
    writer.delete("k", level=Level.SWARM, principal=coder)
    w = worker_of(writer, "w")
    w._next_claim = time.monotonic() + 3600
    assert w.step() == 1  # the delete: a tombstone
    time.sleep(0.01)
    w._next_purge = 0
    w._housekeeping()  # tombstone_ttl 0: every tombstone is old enough
    cut = int(time.time() * 1000) + 1
    store = writer.store
    assert store.purge(cut, cut, floor=purge_floor(raw_redis, [stream])) == 0
    time.sleep(0.1)  # past claim_idle_ms: the dead consumer's put is claimed
    w._next_claim = 0
    assert w.step() == 1
    assert writer.get("k", level=Level.SWARM, principal=coder, fresh=False) is None
    # Once nothing older is pending, the tombstone goes like any other.
    assert store.purge(cut, cut, floor=purge_floor(raw_redis, [stream])) == 1


def test_purge_keeps_a_tombstone_while_an_older_put_of_its_key_is_delivered_again(
    make_mem: MakeMem, coder: Principal, raw_redis: redis.Redis
) -> None:
    # As above, but the dead consumer is forgotten while holding the put (it woke up as
    # it was deleted): the group is set back and the put waits undelivered, nothing
    # pending. A floor that counted pending entries only let purge drop the tombstone, and
    # the put, delivered again, brought the deleted value back.
    from dualmem.worker import forget_consumer, safe_trim_id

    writer = make_mem(worker=False, tombstone_ttl=0)
    stream = writer.layout.stream(0)
    group = writer.settings.group
    writer.put("k", "old", level=Level.SWARM, principal=coder)
    worker_of(writer, "dead").ensure_groups()
    raw_redis.xreadgroup(group, "dead", {stream: ">"}, count=1)  # never acked
    writer.delete("k", level=Level.SWARM, principal=coder)
    w = worker_of(writer, "w")
    w._next_claim = time.monotonic() + 3600
    assert w.step() == 1  # the delete: a tombstone
    assert forget_consumer(raw_redis, stream, group, "dead", safe_trim_id(raw_redis, stream)) == 1
    assert raw_redis.xpending(stream, group)["pending"] == 0
    time.sleep(0.01)
    w._next_purge = 0
    w._housekeeping()  # tombstone_ttl 0: every tombstone is old enough
    assert w.drain(10) == 0  # the put, then the delete (a duplicate), delivered again
    assert writer.get("k", level=Level.SWARM, principal=coder, fresh=False) is None


def test_a_purge_floor_past_its_read_limit_holds_every_tombstone(
    make_mem: MakeMem, coder: Principal, raw_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Past _FLOOR_READ_LIMIT pending entries in a group, the floor is the lowest id there
    # is (nothing purged that time). A group skipped there counted for nothing: with no
    # other floor, purge dropped tombstones that older puts among its entries still needed.
    monkeypatch.setattr(worker_module, "_FLOOR_READ_LIMIT", 2)
    writer = make_mem(worker=False)
    stream = writer.layout.stream(0)
    for i in range(3):
        writer.put(f"k{i}", i, level=Level.SWARM, principal=coder)
    worker_of(writer, "dead").ensure_groups()
    raw_redis.xreadgroup(writer.settings.group, "dead", {stream: ">"}, count=10)  # never acked
    assert purge_floor(raw_redis, [stream]) == sid_of("0-0")


def test_the_purge_floor_is_the_oldest_of_several_pending_entries(
    make_mem: MakeMem, coder: Principal, raw_redis: redis.Redis
) -> None:
    # A dead consumer holds two puts: the floor is the older one's id. Taken from the
    # newest pending entry, it let a purge drop a tombstone the older put still needed.
    writer = make_mem(worker=False)
    stream = writer.layout.stream(0)
    ids = [writer.put(f"k{i}", i, level=Level.SWARM, principal=coder).stream_id for i in range(3)]
    worker_of(writer, "w").ensure_groups()
    raw_redis.xreadgroup(writer.settings.group, "dead", {stream: ">"}, count=2)
    assert purge_floor(raw_redis, [stream]) == sid_of(ids[0])


def test_purge_keeps_the_tombstone_a_dead_letter_replayed_twice_needs(
    make_mem: MakeMem, coder: Principal, raw_redis: redis.Redis, db_path: Path
) -> None:
    # The first replay was read by a consumer that died; the second (a crash before the
    # first was marked, or the letter named again) committed, and the letter then named
    # only it. The first, ordered by the original id below the tombstone, was then no
    # longer held by anything: purge dropped the tombstone and its claim revived the value.

    writer = make_mem(worker=False)
    swarm = {"level": Level.SWARM, "principal": coder}
    settings = writer.settings.replace(consumer="w", max_deliveries=1, claim_idle_ms=3_600_000)
    w = Worker(writer._redis, writer.store, settings)
    writer.put("k", "committed", **swarm)
    assert w.step() == 1
    failed = writer.put("k", "old, failed", **swarm)
    _poison(db_path, failed.stream_id)
    assert w.step() == 1 and len(writer.store.dead_letters()) == 1
    writer.delete("k", **swarm)
    assert w.step() == 1  # the tombstone
    (letter,) = writer.store.dead_letters()
    with Runtime(writer.settings.replace(consumer="ops"), worker=False) as rt:
        replay(rt, [letter.id])
    stream = writer.layout.stream(0)
    raw_redis.xreadgroup(settings.group, "dead", {stream: ">"}, count=1)  # never acked
    with Runtime(writer.settings.replace(consumer="ops"), worker=False) as rt:
        second = replay(rt, [letter.id]).receipts[0]
    w.step()  # the second replay, and the replays' audit events
    assert writer.store.status(0, second.stream_id) == "committed"
    time.sleep(0.01)
    cut = int(time.time() * 1000)
    # The pending replay counts by its original id, below the tombstone's.
    assert purge_floor(raw_redis, [stream]) == sid_of(failed.stream_id)
    writer.store.purge(cut, cut, floor=purge_floor(raw_redis, [stream]))  # letter: envelope
    with sqlite3.connect(db_path) as conn:  # the tombstone stays
        assert conn.execute("SELECT envelope FROM memory WHERE key = 'k'").fetchall() == [(None,)]
    conn.close()
    time.sleep(0.01)
    claimer = Worker(writer._redis, writer.store, settings.replace(consumer="c", claim_idle_ms=1))
    assert claimer.step() >= 1  # the first replay, claimed at last
    assert raw_redis.xpending(stream, settings.group)["pending"] == 0
    assert writer.get("k", **swarm) is None


def test_a_worker_of_one_shard_purges_with_every_shards_floor(
    make_mem: MakeMem, coder: Principal, raw_redis: redis.Redis
) -> None:
    # A worker serving shard 0 only took the floor from its own stream, while its purge
    # covers every row: shard 1's held put then revived its deleted key.
    writer = make_mem(worker=False, shards=2, tombstone_ttl=0)
    key = next(
        k for k in (f"k{i}" for i in range(100)) if writer.layout.shard_of("swarm:phase-1-auth", k)
    )
    stream = writer.layout.stream(1)
    writer.put(key, "old", level=Level.SWARM, principal=coder)
    raw_redis.xreadgroup(writer.settings.group, "dead", {stream: ">"}, count=1)  # never acked
    writer.delete(key, level=Level.SWARM, principal=coder)
    one = worker_of(writer, "w1", shards=[1])
    one._next_claim = time.monotonic() + 3600
    assert one.step() == 1  # the delete: a tombstone
    time.sleep(0.01)
    zero = worker_of(writer, "w0", shards=[0])
    zero._next_purge = 0
    zero._housekeeping()
    with sqlite3.connect(writer.store.path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM memory WHERE envelope IS NULL").fetchone() == (1,)
    conn.close()


def test_notifications_carry_no_value(
    mem: DualMemory, coder: Principal, raw_redis: redis.Redis
) -> None:
    pubsub = raw_redis.pubsub()
    pubsub.subscribe(mem.layout.channel("agent:coder-1"))
    wait_until(lambda: pubsub.get_message(timeout=0.1), what="subscribe confirmation")
    r = mem.put("k", {"secret": "NEEDLE-77"}, level=Level.PRIVATE, principal=coder)
    mem.sync(r)
    msg = wait_until(lambda: pubsub.get_message(timeout=0.1), what="notification")
    (body,) = json.loads(msg["data"])  # one message per scope and batch, an array
    assert set(body) == {"seq", "scope", "key", "level", "op"}
    assert body["key"] == "k" and body["op"] == "put" and body["level"] == 1
    assert b"NEEDLE" not in msg["data"]
    pubsub.close()


def test_a_batch_publishes_every_change_of_a_scope_in_one_message(
    make_mem: MakeMem, coder: Principal, raw_redis: redis.Redis
) -> None:
    # One message per scope and batch, holding each of its changes: a message that
    # carried some of them only left subscribers without the others until a recheck.
    writer = make_mem(worker=False)
    receipts = [writer.put(f"k{i}", i, level=Level.SWARM, principal=coder) for i in range(3)]
    receipts.append(writer.delete("k1", level=Level.SWARM, principal=coder))
    pubsub = raw_redis.pubsub()
    pubsub.subscribe(writer.layout.channel("swarm:phase-1-auth"))
    wait_until(lambda: pubsub.get_message(timeout=0.1), what="subscribe confirmation")
    w = worker_of(writer, "w")
    w.ensure_groups()
    assert w.step() == 4
    msg = wait_until(lambda: pubsub.get_message(timeout=0.1), what="notification")
    pubsub.close()
    notes = Notification.parse_message(msg["data"])
    assert [(n.key, n.op) for n in notes] == [
        ("k0", "put"),
        ("k1", "put"),
        ("k2", "put"),
        ("k1", "del"),
    ]
    assert [n.seq for n in notes] == sorted({n.seq for n in notes})


def test_expired_records_are_invisible(mem: DualMemory, coder: Principal) -> None:
    mem.sync(mem.put("long", 2, level=Level.SWARM, principal=coder, ttl=60))
    # The record must be read once before it expires: on a loaded machine the put, its
    # sync and the read took longer than a 0.3 s ttl, so a longer one is tried then.
    for ttl in (0.3, 1.0, 3.0, 10.0):
        t0 = time.monotonic()
        mem.sync(mem.put("short", 1, level=Level.SWARM, principal=coder, ttl=ttl))
        seen = mem.get("short", level=Level.SWARM, principal=coder)
        if time.monotonic() - t0 < ttl:  # read before the put's expiry, for sure
            assert seen == 1
            break
    else:
        pytest.fail("no put was read back within its ttl, the longest 10 s")
    time.sleep(max(0.0, t0 + ttl + 0.05 - time.monotonic()))
    assert mem.get("short", level=Level.SWARM, principal=coder) is None
    assert mem.get("short", level=Level.SWARM, principal=coder, fresh=True) is None
    assert [r.key for r in mem.query(principal=coder, level=Level.SWARM)] == ["long"]


def test_sync_times_out_without_a_worker(make_mem: MakeMem, coder: Principal) -> None:
    mem = make_mem(worker=False)
    r = mem.put("k", 1, level=Level.SWARM, principal=coder)
    t0 = time.monotonic()
    with pytest.raises(NotPersisted, match="not committed"):
        mem.sync(r, timeout=0.2)
    assert time.monotonic() - t0 < 1
    assert mem.get("k", level=Level.SWARM, principal=coder, fresh=True) == 1


def test_a_fresh_read_sees_a_delete_before_the_worker_commits_it(
    make_mem: MakeMem, coder: Principal, capsys: pytest.CaptureFixture[str]
) -> None:
    mem = make_mem(worker=False)
    worker = worker_of(mem, "w")
    mem.put("k", {"v": 1}, level=Level.PRIVATE, principal=coder)
    worker.step()
    r = mem.delete("k", level=Level.PRIVATE, principal=coder)
    # Not committed: SQLite still has the value, but a fresh read answers for the delete
    # (the delete used to drop the cache entry, and the read fell back to SQLite).
    assert mem.get("k", level=Level.PRIVATE, principal=coder) == {"v": 1}
    assert mem.get("k", level=Level.PRIVATE, principal=coder, fresh=True) is None
    assert mem.get_record("k", level=Level.PRIVATE, principal=coder, fresh=True) is None
    worker.step()
    mem.sync(r)
    assert mem.get("k", level=Level.PRIVATE, principal=coder, fresh=True) is None
    # verify: a delete's mark agrees with the committed tombstone.
    _, out, _ = run_cli(
        capsys,
        "verify",
        "--redis-url",
        mem.settings.redis_url,
        "--db",
        mem.settings.db_path,
        "--keyring",
        str(mem.settings.keyring),
        "--json",
    )
    checks = {c["name"]: c for c in json.loads(out)["checks"]}
    assert checks["redis <-> sqlite parity"]["status"] == "ok", checks
    # A new put replaces the mark.
    mem.put("k", {"v": 2}, level=Level.PRIVATE, principal=coder)
    assert mem.get("k", level=Level.PRIVATE, principal=coder, fresh=True) == {"v": 2}


def test_redis_down_fails_fast_and_reads_keep_working(
    make_mem: MakeMem,
    coder: Principal,
    backend: str,
    request: pytest.FixtureRequest,
    keyfile: Path,
    tmp_path: Path,
) -> None:
    if backend == "redis":
        srv = request.getfixturevalue("own_redis_server")
        mem = make_mem(redis_url=srv.url)
        mem.sync(mem.put("k", 1, level=Level.SWARM, principal=coder))
        srv.kill()
    else:
        mem = make_mem()
        mem.sync(mem.put("k", 1, level=Level.SWARM, principal=coder))
        from dualmem.redis_backend import memory_server

        memory_server(mem.settings.redis_url).server.connected = False
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable):
        mem.put("k2", 2, level=Level.SWARM, principal=coder)
    assert time.monotonic() - t0 < 1.0
    assert mem.get("k", level=Level.SWARM, principal=coder) == 1
    with pytest.raises(StoreUnavailable):
        mem.get("k", level=Level.SWARM, principal=coder, fresh=True)


def test_redis_unreachable_at_start_is_store_unavailable(db_path: Path, keyfile: Path) -> None:
    from .conftest import free_port

    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable):
        DualMemory(
            redis_url=f"redis://127.0.0.1:{free_port()}/0",
            db_path=str(db_path),
            keyring=str(keyfile),
        )
    assert time.monotonic() - t0 < 1.0


def test_real_redis_without_a_key_is_a_configuration_error(db_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="dualmem keygen"):
        DualMemory(redis_url="redis://127.0.0.1:1/0", db_path=str(db_path))


def test_embedded_default_keeps_its_key_across_restarts(tmp_path: Path, coder: Principal) -> None:
    import os
    import stat

    from dualmem.redis_backend import drop_memory_server

    db = tmp_path / "embedded.db"
    url = "memory://restart-test"
    with DualMemory(redis_url=url, db_path=str(db)) as mem:
        mem.sync(mem.put("k", {"v": "kept"}, level=Level.PRIVATE, principal=coder))
    keyfile = Path(str(db) + ".keys")
    assert stat.S_IMODE(os.stat(keyfile).st_mode) == 0o600
    drop_memory_server(url)  # as if the process had ended
    with DualMemory(redis_url=url, db_path=str(db)) as mem:
        assert mem.get("k", level=Level.PRIVATE, principal=coder) == {"v": "kept"}
    drop_memory_server(url)
    # The key file lost (or the database copied without it): a new key would open none of
    # its records, and records sealed under it would be stranded once the file came back.
    # It used to make one silently.
    saved = keyfile.read_bytes()
    keyfile.unlink()
    with pytest.raises(ConfigurationError, match="holds encrypted records but its key file"):
        DualMemory(redis_url=url, db_path=str(db))
    assert not keyfile.exists()
    keyfile.write_bytes(saved)
    os.chmod(keyfile, 0o600)
    with DualMemory(redis_url=url, db_path=str(db)) as mem:
        assert mem.get("k", level=Level.PRIVATE, principal=coder) == {"v": "kept"}
    drop_memory_server(url)
    # A database holding plaintext levels only gets a key file on first use, as a new one.
    plain = tmp_path / "plain.db"
    with DualMemory(redis_url=url, db_path=str(plain)) as mem:
        mem.sync(mem.put("k", 1, level=Level.SWARM, principal=coder))
    drop_memory_server(url)
    Path(str(plain) + ".keys").unlink()
    with DualMemory(redis_url=url, db_path=str(plain)) as mem:
        assert mem.get("k", level=Level.SWARM, principal=coder) == 1
    assert Path(str(plain) + ".keys").exists()
    drop_memory_server(url)


def test_a_lapsed_lease_with_an_unreadable_key_file_refuses_only_encrypted_puts(
    make_mem: MakeMem, coder: Principal, keyfile: Path
) -> None:
    # A writer whose key lease lapsed and whose key file cannot be read must not seal
    # with a key a rotation may have dropped; a put at a plaintext level seals with no
    # key, and goes through (it was refused too).
    writer = make_mem(worker=False)
    assert writer._lease is not None
    keyfile.write_text("not a key file")
    writer._lease._renewed_at -= 10 * writer._lease.interval + 10  # idle that long: lapsed
    assert writer._lease.lapsed()
    with pytest.raises(ConfigurationError, match="cannot be read"):
        writer.put("secret", 1, level=Level.PRIVATE, principal=coder)
    writer.put("open", 2, level=Level.SWARM, principal=coder)
    assert writer.get("open", level=Level.SWARM, principal=coder, fresh=True) == 2


def test_key_from_environment(
    tmp_path: Path, coder: Principal, monkeypatch: pytest.MonkeyPatch
) -> None:
    import base64

    from dualmem.redis_backend import drop_memory_server

    monkeypatch.setenv("DUALMEM_KEY", base64.b64encode(b"s" * 32).decode())
    url = "memory://env-key"
    with DualMemory(redis_url=url, db_path=str(tmp_path / "e.db")) as mem:
        mem.sync(mem.put("k", 1, level=Level.TEAM, principal=coder))
        assert not Path(str(tmp_path / "e.db") + ".keys").exists()
        ring = mem.codec.keyring
        assert ring is not None and ring.active_id.startswith("e")
    drop_memory_server(url)


def test_a_key_argument_wins_over_a_keyring_from_the_environment(
    tmp_path: Path, coder: Principal, monkeypatch: pytest.MonkeyPatch
) -> None:
    # DUALMEM_KEYRING silently replaced an explicit key=: records were sealed with the
    # environment's key file, and the key the caller kept opened none of them.
    import base64

    from dualmem.redis_backend import drop_memory_server

    env_keys = tmp_path / "env_keys.json"
    Keyring.generate().save(env_keys)
    monkeypatch.setenv("DUALMEM_KEYRING", str(env_keys))
    key = base64.b64encode(b"k" * 32).decode()
    url = "memory://key-arg-wins"
    with DualMemory(redis_url=url, db_path=str(tmp_path / "k.db"), key=key) as mem:
        assert mem.settings.keyring is None and mem.settings.keyring_file is None
        mem.sync(mem.put("k", 1, level=Level.PRIVATE, principal=coder))
    monkeypatch.delenv("DUALMEM_KEYRING")
    with DualMemory(redis_url=url, db_path=str(tmp_path / "k.db"), key=key) as mem:
        assert mem.get("k", level=Level.PRIVATE, principal=coder) == 1
    # Both as arguments was resolved to the keyring in silence: now refused, as is a
    # Keyring object beside key=.
    with pytest.raises(ConfigurationError, match="key and keyring are both given"):
        DualMemory(redis_url=url, db_path=str(tmp_path / "k.db"), key=key, keyring=str(env_keys))
    with pytest.raises(ConfigurationError, match="key and keyring are both given"):
        DualMemory(
            redis_url=url, db_path=str(tmp_path / "k.db"), key=key, keyring=Keyring.generate()
        )
    drop_memory_server(url)


def test_a_db_path_under_a_regular_file_is_a_configuration_error(
    tmp_path: Path, redis_url: str, keyfile: Path
) -> None:
    # The embedded default creates its key file beside the database first, so the raw
    # FileExistsError came from there; with a key file, from the store.
    (tmp_path / "afile").write_text("")
    db = tmp_path / "afile" / "x.db"
    expected = f"db_path {db} cannot be used: {tmp_path / 'afile'} is not a directory"
    for kwargs in ({"redis_url": "memory://under-a-file"}, {"keyring": str(keyfile)}):
        kwargs.setdefault("redis_url", redis_url)
        with pytest.raises(ConfigurationError) as exc:
            DualMemory(db_path=str(db), **kwargs)
        assert str(exc.value) == expected
        assert isinstance(exc.value.__cause__, OSError)


def test_an_embedded_key_file_that_cannot_be_created_is_a_configuration_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(self: Keyring, path: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Keyring, "save", refuse)
    db = tmp_path / "m.db"
    with pytest.raises(ConfigurationError, match="cannot create the key file") as exc:
        DualMemory(db_path=str(db), redis_url="memory://no-key-file")
    assert "Permission denied" in str(exc.value) and isinstance(exc.value.__cause__, OSError)


def test_a_key_file_save_refused_as_a_configuration_error_is_not_taken_for_a_race(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Keyring.save reports an unwritable path as a ConfigurationError, like the file made
    # first by another process: the embedded default took it for that race, loaded the
    # missing file, and said "does not exist: create it with dualmem keygen".
    real_open = os.open

    def refusing_open(path: Any, *args: Any, **kwargs: Any) -> int:
        if ".keys." in os.fspath(path):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    with pytest.raises(ConfigurationError, match="cannot create the key file") as exc:
        DualMemory(db_path=str(tmp_path / "m.db"), redis_url="memory://refused-key-file")
    assert "Permission denied" in str(exc.value)


def test_a_db_path_whose_key_file_name_is_too_long_is_a_configuration_error(
    tmp_path: Path,
) -> None:
    # A 255-byte file name is a valid db_path, but its "<name>.keys" sibling is over
    # NAME_MAX: Path.exists() raised a raw OSError (ENAMETOOLONG) from _load_keyring.
    db = tmp_path / ("d" * 252 + ".db")
    with pytest.raises(ConfigurationError, match="use a shorter db_path") as exc:
        DualMemory(db_path=str(db), redis_url="memory://name-too-long")
    assert f"cannot use the key file {db}.keys beside db_path {db}" in str(exc.value)
    assert isinstance(exc.value.__cause__, OSError)
    assert list(tmp_path.iterdir()) == []  # nothing was made


def test_settings_that_are_not_a_settings_object_are_a_configuration_error() -> None:
    # DualMemory(settings=5) raised AttributeError from settings.namespace.
    with pytest.raises(ConfigurationError, match=r"settings must be a dualmem\.Settings, got int"):
        DualMemory(settings=5)  # type: ignore[arg-type]


def test_settings_with_individual_settings_too_is_a_configuration_error(tmp_path: Path) -> None:
    # settings= is the whole configuration: an override beside it (shards=4) was to be
    # refused, not dropped without a word.
    settings = Settings.load({"redis_url": "memory://both", "db_path": str(tmp_path / "m.db")})
    with pytest.raises(ConfigurationError, match="either settings= or individual settings"):
        DualMemory(settings=settings, shards=4)
    assert list(tmp_path.iterdir()) == []  # refused before anything was made


@pytest.mark.parametrize("keyring", ["keys.json", Keyring.generate()], ids=["path", "object"])
def test_settings_with_a_keyring_beside_them_is_a_configuration_error(
    tmp_path: Path, keyring: str | Keyring
) -> None:
    # A keyring= beside settings= was dropped without a word: every record was sealed
    # with the settings' key, not the one the caller passed.
    settings = Settings.load({"redis_url": "memory://both-keys", "db_path": str(tmp_path / "m.db")})
    with pytest.raises(ConfigurationError, match="either settings= or individual settings"):
        DualMemory(settings=settings, keyring=keyring)
    assert list(tmp_path.iterdir()) == []  # refused before anything was made


def test_a_failed_start_closes_the_database_it_opened(
    db_path: Path, keyfile: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A DualMemory whose Redis cannot be reached raises StoreUnavailable; the store it
    # opened first is closed (its connection and checkpoint thread), not left to a caller
    # that retries the construction in a loop.
    from .conftest import free_port

    opened: list[SQLiteStore] = []
    real = SQLiteStore.from_settings.__func__  # type: ignore[attr-defined]

    def recording(cls: type[SQLiteStore], settings: Settings) -> SQLiteStore:
        opened.append(real(cls, settings))
        return opened[-1]

    monkeypatch.setattr(SQLiteStore, "from_settings", classmethod(recording))
    with pytest.raises(StoreUnavailable):
        DualMemory(
            redis_url=f"redis://127.0.0.1:{free_port()}/0",
            db_path=str(db_path),
            keyring=str(keyfile),
        )
    (store,) = opened
    with pytest.raises(StoreUnavailable):
        store.get("swarm:s", "k", 0)


def test_close_releases_the_key_lease(
    make_mem: MakeMem, raw_redis: redis.Redis, coder: Principal
) -> None:
    # A closed process deletes its lease on the keys it seals with (dualmem.keyuse): a key
    # drop waits for every live lease, and would wait for a closed writer's until it
    # expired.
    mem = make_mem(worker=False)
    assert mem._lease is not None
    mem.put("k", 1, level=Level.PRIVATE, principal=coder)
    assert [u.token for u in key_users(raw_redis, mem.settings.namespace)] == [mem._lease.token]
    mem.close()
    assert key_users(raw_redis, mem.settings.namespace) == []


def test_a_worker_thread_that_failed_is_not_taken_for_a_drain(
    make_mem: MakeMem, coder: Principal, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The worker thread died of a bug before persisting anything: its drain said nothing
    # (-1), so close() asks Redis what is left, and reports that count, not the -1.
    def failing(self: Worker, *args: object, **kwargs: object) -> int:
        raise RuntimeError("a bug in the worker")

    monkeypatch.setattr(Worker, "run", failing)
    mem = make_mem()
    mem.put("k", 1, level=Level.SWARM, principal=coder)
    assert mem.close() == CloseReport(pending=1, drained=False)


def test_close_drains_and_reports(make_mem: MakeMem, coder: Principal) -> None:
    mem = make_mem()
    receipts = [mem.put(f"k{i}", i, level=Level.SWARM, principal=coder) for i in range(200)]
    report = mem.close()
    assert report.drained and report.pending == 0
    check = make_mem(worker=False)
    for r in receipts:
        assert check.store.status(r.shard, r.stream_id) == "committed"
    with pytest.raises(Exception, match="closed"):
        mem.put("k", 1, level=Level.SWARM, principal=coder)


def test_close_drains_a_backlog_of_many_batches_within_its_timeout(
    make_mem: MakeMem, coder: Principal, db_path: Path
) -> None:
    # The worker thread asks for close(timeout=...) when its drain starts. A drain that
    # took no time for it committed one batch and reported the rest pending, though
    # the database was free again and 30 s allowed.
    mem = make_mem(batch_size=2, busy_timeout_ms=50)
    mem.sync(mem.put("warm", 0, level=Level.SWARM, principal=coder))
    with write_locked(db_path):  # the backlog builds up behind a busy database
        receipts = [mem.put(f"k{i}", i, level=Level.SWARM, principal=coder) for i in range(20)]
    report = mem.close(timeout=30)
    assert report.drained and report.pending == 0
    check = make_mem(worker=False)
    assert {check.store.status(r.shard, r.stream_id) for r in receipts} == {"committed"}


@contextlib.contextmanager
def write_locked(db_path: Path) -> Iterator[None]:
    """Hold the database's write lock, as a backup, a shell or a migration would."""
    locker = sqlite3.connect(db_path, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        locker.execute("ROLLBACK")
        locker.close()


def test_close_with_the_database_locked_gives_up_at_its_timeout_and_says_so(
    make_mem: MakeMem, coder: Principal, db_path: Path
) -> None:
    mem = make_mem(busy_timeout_ms=50)
    mem.sync(mem.put("warm", 0, level=Level.SWARM, principal=coder))
    with write_locked(db_path):
        receipts = [mem.put(f"k{i}", i, level=Level.SWARM, principal=coder) for i in range(5)]
        t0 = time.monotonic()
        report = mem.close(timeout=1)
        elapsed = time.monotonic() - t0
    # It used to retry the commit past its timeout, then report drained=True with the
    # five commands still in Redis (a hang bound here, not a speed target).
    assert not report.drained and report.pending == 5
    assert elapsed < 30
    # The drain honoured close(timeout=1), not the 30 s close_timeout it was started
    # with: its thread has ended (one that lived on kept reading the stream of a shared
    # Redis into this test's database, taking later tests' commands).
    assert mem._worker_thread is not None and not mem._worker_thread.is_alive()
    # Closing again (an atexit hook, another thread) gets the same answer, not "drained".
    assert mem.close() == report
    # Nothing is lost: they wait in Redis for the next worker.
    check = make_mem(claim_idle_ms=100)
    for r in receipts:
        check.sync(r, timeout=30)


def test_a_commit_retried_while_the_database_is_locked_counts_one_delivery(
    make_mem: MakeMem,
    coder: Principal,
    db_path: Path,
    raw_redis: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The worker retries a batch whose commit failed (the database locked) as it is. Read
    # again from the pending list for each retry, the entries counted a delivery per retry:
    # after a lock of a few retries, one failure of an entry dead-lettered it at once.
    mem = make_mem(busy_timeout_ms=20)
    mem.sync(mem.put("warm", 0, level=Level.SWARM, principal=coder))
    attempts = [0]
    real_apply = mem.store.apply

    def apply(entries: Any) -> Any:
        attempts[0] += 1
        return real_apply(entries)

    monkeypatch.setattr(mem.store, "apply", apply)
    stream = mem.layout.stream(0)
    with write_locked(db_path):
        receipt = mem.put("k", 1, level=Level.SWARM, principal=coder)
        wait_until(lambda: attempts[0] >= 5, what="five commit attempts")
        pending = raw_redis.xpending_range(stream, mem.settings.group, "-", "+", 10)
        assert [(p["message_id"], p["times_delivered"]) for p in pending] == [
            (receipt.stream_id.encode(), 1)
        ]
    mem.sync(receipt, timeout=10)


def test_a_drain_with_the_database_locked_retries_its_batch_without_redelivering_it(
    make_mem: MakeMem, coder: Principal, db_path: Path, raw_redis: redis.Redis
) -> None:
    # The drain after stop was set retried its commits under the loop's stop event, which
    # made every retry give up at once and read the batch again: each retry counted a
    # delivery, as in the test above.
    writer = make_mem(worker=False, busy_timeout_ms=20)
    receipts = [writer.put(f"k{i}", i, level=Level.SWARM, principal=coder) for i in range(3)]
    w = worker_of(writer, "w")
    w.ensure_groups()
    stop = threading.Event()
    stop.set()
    with write_locked(db_path):
        assert w.run(stop, drain_timeout=0.5) == 3
    pending = raw_redis.xpending_range(writer.layout.stream(0), "persist", "-", "+", 10)
    assert [p["times_delivered"] for p in pending] == [1, 1, 1]
    assert w.drain(10) == 0
    assert [writer.store.status(r.shard, r.stream_id) for r in receipts] == ["committed"] * 3


@pytest.mark.parametrize("held", [1, 5])
def test_a_drain_waits_for_a_dead_consumers_entries_to_become_claimable(
    make_mem: MakeMem, coder: Principal, raw_redis: redis.Redis, held: int
) -> None:
    # Entries a dead consumer read, not idle long enough to be claimed when the drain
    # started: the drain found nothing to read and returned at once with them pending,
    # though its timeout left time to claim and commit them. One entry alone as well: a
    # drain content with one left over passed with five.
    writer = make_mem(worker=False, claim_idle_ms=300)
    receipts = [writer.put(f"k{i}", i, level=Level.SWARM, principal=coder) for i in range(held)]
    stream = writer.layout.stream(0)
    assert len(raw_redis.xreadgroup("persist", "dead", {stream: ">"}, count=10)[0][1]) == held
    w = worker_of(writer, "w")
    assert w.drain(10) == 0
    assert [writer.store.status(r.shard, r.stream_id) for r in receipts] == ["committed"] * held


class _RecordedWaits(threading.Event):
    """A stop event whose ``wait`` records its timeout and returns at once (the worker's
    backoff, without sleeping it); it is set at the ``stop_at``-th wait."""

    def __init__(self, stop_at: int) -> None:
        super().__init__()
        self.waits: list[float | None] = []
        self.stop_at = stop_at

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout)
        if len(self.waits) >= self.stop_at:
            self.set()
        return self.is_set()


def test_the_commit_retry_backoff_is_bounded(
    make_mem: MakeMem, coder: Principal, db_path: Path
) -> None:
    # The wait between two commit attempts doubles from 10 ms up to _MAX_BACKOFF: doubling
    # without a bound, a database locked for a minute left the worker asleep for another
    # minute after it was free again, and for hours after a longer lock.
    writer = make_mem(worker=False, busy_timeout_ms=1)
    receipt = writer.put("k", 1, level=Level.SWARM, principal=coder)
    w = worker_of(writer, "w")
    w.ensure_groups()
    stop = _RecordedWaits(stop_at=15)
    with write_locked(db_path):
        w.run(stop)
    waits = stop.waits[:15]
    assert waits[0] == 0.01 and max(t for t in waits if t is not None) == 1.0
    assert w.drain(10) == 0
    assert writer.store.status(receipt.shard, receipt.stream_id) == "committed"


def test_a_drains_commit_retries_never_wait_past_its_timeout(
    make_mem: MakeMem, coder: Principal, db_path: Path
) -> None:
    # While it drains, the worker's wait between two commit attempts is cut to what is
    # left of the drain's timeout: waiting its whole backoff (up to 1 s) overran
    # close(timeout=...) by as much.
    writer = make_mem(worker=False, busy_timeout_ms=1)
    writer.put("k", 1, level=Level.SWARM, principal=coder)
    w = worker_of(writer, "w")
    w.ensure_groups()
    waits = w._stopping = _RecordedWaits(stop_at=1_000_000)  # records, never stops
    with write_locked(db_path):
        assert w.drain(0.3) == 1
    assert len(waits.waits) > 5
    assert all(t is not None and t <= 0.3 for t in waits.waits)


def test_raising_a_streams_last_id_raises_any_refusal_but_the_race_it_expects(
    own_redis_server: RedisServer,
) -> None:
    # Raising a recreated stream's last id above the newest committed one (after Redis
    # lost its data) expects one refusal: a writer's XADD got there first, "equal or
    # smaller". Any other (here a user not allowed XDEL; OOM, a read-only replica in
    # practice) was swallowed as that race, and the worker went on with a stream whose
    # new ids could sort below committed rows.
    from dualmem.commands import sid_of
    from dualmem.worker import raise_last_id

    admin = own_redis_server.client()
    admin.xadd(b"s", {b"op": b"x"}, id="5-0")
    admin.acl_setuser("no-xdel", enabled=True, nopass=True, keys=["*"], commands=["+@all", "-xdel"])
    limited = redis.Redis(
        host="127.0.0.1", port=own_redis_server.port, username="no-xdel", socket_timeout=5
    )
    try:
        with pytest.raises(redis.ResponseError):
            raise_last_id(limited, b"s", sid_of("9-0"))
        assert admin.xinfo_stream(b"s")["last-generated-id"] == b"5-0"  # nothing ran
        # The race it expects is no error: the stream is past the floor already.
        assert raise_last_id(admin, b"s", sid_of("5-0")) is False
        assert raise_last_id(admin, b"s", sid_of("9-0")) is True
        assert admin.xinfo_stream(b"s")["last-generated-id"] == b"9-0"
    finally:
        limited.close()
        admin.close()


def test_the_worker_loops_backoff_while_redis_is_down_is_bounded(
    own_redis_server: RedisServer, db_path: Path, keyfile: Path
) -> None:
    # The wait between two tries of the loop while Redis is down doubles from 10 ms up to
    # _MAX_BACKOFF: doubling without a bound, after an outage of a minute the worker slept
    # for another minute once Redis was back, and the backlog grew to its bound meanwhile.
    from dualmem.redis_backend import connect

    mem = DualMemory(
        redis_url=own_redis_server.url, db_path=str(db_path), keyring=str(keyfile), worker=False
    )
    client, _ = connect(mem.settings)
    w = Worker(client, mem.store, mem.settings.replace(consumer="w"))
    w.ensure_groups()
    own_redis_server.stop()
    stop = _RecordedWaits(stop_at=15)
    try:
        w.run(stop)
    finally:
        client.close()
        own_redis_server.start()
        mem.close(timeout=5)
    assert stop.waits[0] == 0.01 and max(t for t in stop.waits if t is not None) == 1.0


def test_a_drain_goes_on_past_its_first_batch(
    make_mem: MakeMem, coder: Principal, raw_redis: redis.Redis
) -> None:
    # A drain that returned after its first batch left the rest of the backlog in Redis
    # at every close with more than batch_size commands behind. It trims what it acked.
    writer = make_mem(worker=False, batch_size=5)
    receipts = [writer.put(f"k{i}", i, level=Level.SWARM, principal=coder) for i in range(12)]
    w = worker_of(writer, "w")
    w.ensure_groups()
    assert w.drain(10) == 0
    assert [writer.store.status(r.shard, r.stream_id) for r in receipts] == ["committed"] * 12
    assert raw_redis.xlen(writer.layout.stream(0)) == 0


def test_a_pending_entry_deleted_from_the_stream_is_acknowledged(
    make_mem: MakeMem, coder: Principal, raw_redis: redis.Redis
) -> None:
    # An entry of the worker's own pending list deleted from the stream (XDEL, a trim by
    # hand) comes back without fields: Redis says nil, redis-py and fakeredis give {}.
    # The worker looked for None only, so it applied {} as a command: "malformed",
    # redelivered max_deliveries times, then dead-lettered, a letter with nothing in it.
    # Left unacknowledged, it would stay pending for good: the backlog never 0 (every
    # drain ran to its timeout), and no trim passed it.
    writer = make_mem(worker=False)
    receipts = [writer.put(f"k{i}", i, level=Level.SWARM, principal=coder) for i in range(3)]
    stream = writer.layout.stream(0)
    assert len(raw_redis.xreadgroup("persist", "w", {stream: ">"}, count=10)[0][1]) == 3
    raw_redis.xdel(stream, receipts[1].stream_id)
    w = worker_of(writer, "w")
    # Its own pending list read, no claim first: Redis 7's XAUTOCLAIM drops deleted
    # entries from the pending list by itself.
    w._next_claim = time.monotonic() + 3600
    assert w.drain(5) == 0
    assert raw_redis.xpending(stream, "persist")["pending"] == 0
    status = [writer.store.status(r.shard, r.stream_id) for r in receipts]
    assert status[0] == status[2] == "committed"
    assert writer.store.dead_letters() == []


def test_a_second_close_waits_for_the_first_and_reports_what_it_found(
    make_mem: MakeMem, coder: Principal, db_path: Path
) -> None:
    mem = make_mem(busy_timeout_ms=50)
    mem.sync(mem.put("warm", 0, level=Level.SWARM, principal=coder))
    reports: list[object] = []
    with write_locked(db_path):
        for i in range(5):
            mem.put(f"k{i}", i, level=Level.SWARM, principal=coder)
        first = threading.Thread(target=lambda: reports.append(mem.close(timeout=1)))
        first.start()
        wait_until(lambda: mem._closed, what="the first close to start")
        # It used to return CloseReport(0, True) at once while the first still drained.
        second = mem.close(timeout=1)
        first.join(30)
    assert reports == [second] and not second.drained and second.pending == 5


def test_sync_refuses_a_timeout_that_is_not_a_finite_number(
    make_mem: MakeMem, coder: Principal
) -> None:
    mem = make_mem(worker=False)
    r = mem.put("k", 1, level=Level.SWARM, principal=coder)
    for bad in (float("nan"), float("inf"), -1, "5", True, None, 10**400):
        # The message of every wait (settings.check_seconds); sync's own said "seconds".
        with pytest.raises(
            ValidationError,
            match=r"^timeout must be a number of seconds in \[0, 1,000,000\], got ",
        ):
            mem.sync(r, timeout=bad)  # type: ignore[arg-type]


def test_a_put_in_flight_when_close_starts_is_drained_with_the_rest(
    make_mem: MakeMem, coder: Principal, monkeypatch: pytest.MonkeyPatch
) -> None:
    mem = make_mem()
    real = memory_module.transact
    sending = threading.Event()

    def slow_network(client: Any, commands: Any, **kwargs: Any) -> Any:
        sending.set()
        time.sleep(0.3)  # the XADD lands after close() has begun
        return real(client, commands, **kwargs)

    monkeypatch.setattr(memory_module, "transact", slow_network)
    # close() waits for writes already past its open check, then drains them too: a put
    # that returned a receipt is never left behind a close that says it drained.
    _close_while_sending(
        make_mem, mem, sending, lambda: mem.put("late", 1, level=Level.SWARM, principal=coder)
    )


def test_close_is_woken_by_the_last_write_in_flight_not_by_its_bound(
    make_mem: MakeMem, coder: Principal, monkeypatch: pytest.MonkeyPatch
) -> None:
    # close() waits for the writes already past their open check, and the last one to
    # land wakes it: without that wake-up it sat out its whole bound (the drain timeout
    # plus 5 s) after every such write.
    mem = make_mem()
    waiting, sending = threading.Event(), threading.Event()
    woken: list[bool] = []

    class Recording(threading.Condition):
        """close()'s wait: says it has begun, and whether a notify ended it (True) or
        its timeout did, cut to 10 s here (False)."""

        def wait(self, timeout: float | None = None) -> bool:
            waiting.set()
            got = super().wait(10 if timeout is None else min(timeout, 10))
            woken.append(got)
            return got

    mem._gate = Recording()
    real = memory_module.transact

    def held(client: Any, commands: Any, **kwargs: Any) -> Any:
        sending.set()
        assert waiting.wait(10)  # close() waits for this write
        return real(client, commands, **kwargs)

    monkeypatch.setattr(memory_module, "transact", held)
    writer = threading.Thread(target=lambda: mem.put("k", 1, level=Level.SWARM, principal=coder))
    writer.start()
    assert sending.wait(10)
    report = mem.close()
    writer.join(10)
    assert woken == [True] and report.drained


def _close_while_sending(
    make_mem: MakeMem, mem: DualMemory, sending: threading.Event, send: Callable[[], Receipt]
) -> None:
    """Run ``send`` in a thread, close ``mem`` once ``sending`` says its command is on the
    way, and check that the close drained it: committed, and reported as drained."""
    got: list[Receipt] = []
    writer = threading.Thread(target=lambda: got.append(send()))
    writer.start()
    assert sending.wait(10)
    report = mem.close()
    writer.join(10)
    assert report.drained and len(got) == 1
    check = make_mem(worker=False)
    assert check.store.status(got[0].shard, got[0].stream_id) == "committed"


def test_an_audit_event_in_flight_when_close_starts_is_drained_with_the_rest(
    make_mem: MakeMem, coder: Principal, monkeypatch: pytest.MonkeyPatch
) -> None:
    mem = make_mem()
    real = mem._redis.xadd
    sending = threading.Event()

    def slow_network(*args: Any, **kwargs: Any) -> Any:
        sending.set()
        time.sleep(0.3)  # the XADD lands after close() has begun
        return real(*args, **kwargs)

    monkeypatch.setattr(mem._redis, "xadd", slow_network)
    # An audit row is a command like a put: acknowledged means persisted by this close.
    _close_while_sending(
        make_mem, mem, sending, lambda: mem.audit("deploy", principal=coder, risk="high")
    )


def test_an_audit_event_racing_close_still_reaches_redis(
    make_mem: MakeMem, coder: Principal
) -> None:
    # A reader that passed the open check before close() and is then denied: its
    # access_denied row is not dropped for arriving late; a worker on this Redis keeps it.
    mem = make_mem()
    mem.close()
    receipt = mem._audit("access_denied", actor=coder.agent_id, risk="high", key="k")
    assert receipt is not None
    later = make_mem()
    later.sync(receipt, timeout=10)


def test_sync_after_close_says_closed(make_mem: MakeMem, coder: Principal) -> None:
    # It raised StoreUnavailable ("Cannot operate on a closed database") from the store.
    mem = make_mem()
    receipt = mem.put("k", 1, level=Level.SWARM, principal=coder)
    mem.close()
    with pytest.raises(DualMemError, match="this DualMemory is closed") as info:
        mem.sync(receipt)
    assert not isinstance(info.value, StoreUnavailable)


@pytest.mark.parametrize("waits", ["sync", "settle"])
def test_a_close_during_a_sync_ends_the_wait_with_closed(
    make_mem: MakeMem, coder: Principal, waits: str
) -> None:
    # sync() waiting on a command no worker persists, and close() in another thread: the
    # wait ends with "this DualMemory is closed", not with an error from the store that
    # close() shut under it. settle() too: it asks Redis, whose client answers again
    # after close(), so without its open check it waited out its timeout and raised
    # NotPersisted.
    mem = make_mem(worker=False)
    receipt = mem.put("k", 1, level=Level.SWARM, principal=coder)
    waiting, closed = threading.Event(), threading.Event()

    class HeldWait(threading.Condition):
        """The wait between two looks, held until close() has returned."""

        def wait(self, timeout: float | None = None) -> bool:
            waiting.set()
            closed.wait(10)
            return False

    mem._committed = HeldWait()
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            if waits == "sync":
                mem.sync(receipt, timeout=20)
            else:
                mem.settle(timeout=20)
        except BaseException as exc:
            errors.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    assert waiting.wait(10)  # it looked once, and waits for the next look
    mem.close()
    closed.set()
    waiter.join(30)
    assert not waiter.is_alive()
    (error,) = errors
    assert isinstance(error, DualMemError) and "this DualMemory is closed" in str(error)
    assert not isinstance(error, StoreUnavailable)


# Each read, by the store method it ends in (see _overtaken_by_close).
_READS_CLOSE_CAN_OVERTAKE: dict[
    str, tuple[str, Callable[[DualMemory, Principal, Receipt], object]]
] = {
    "get": ("get_envelope", lambda m, p, r: m.get("k", level=Level.SWARM, principal=p)),
    "get_record": ("get", lambda m, p, r: m.get_record("k", level=Level.SWARM, principal=p)),
    "query": ("query", lambda m, p, r: m.query(principal=p, level=Level.SWARM)),
    "history": ("history", lambda m, p, r: m.history("k", level=Level.SWARM, principal=p)),
    "changes": ("changes", lambda m, p, r: m.changes(principal=p)),
    "sync": ("status", lambda m, p, r: m.sync(r, timeout=5)),
}


@pytest.mark.parametrize("read", sorted(_READS_CLOSE_CAN_OVERTAKE))
def test_a_read_a_close_overtakes_says_closed(
    make_mem: MakeMem, coder: Principal, read: str
) -> None:
    # A close() in another thread between a read's open check and its SQLite read closes
    # the store under it: the read said StoreUnavailable ("read from ... failed: Cannot
    # operate on a closed database"), an outage a caller retries, not the close it was.
    # The store method is wrapped to run that close() first: the race, every time.
    mem = make_mem(worker=False)
    receipt = mem.put("k", 1, level=Level.SWARM, principal=coder)
    method, call = _READS_CLOSE_CAN_OVERTAKE[read]
    reached = getattr(mem.store, method)

    def overtaken(*args: Any, **kwargs: Any) -> object:
        mem.close(timeout=0)
        return reached(*args, **kwargs)

    setattr(mem.store, method, overtaken)
    with pytest.raises(DualMemError, match="this DualMemory is closed") as info:
        call(mem, coder, receipt)
    assert not isinstance(info.value, StoreUnavailable)
    assert isinstance(info.value.__cause__, StoreUnavailable)  # what the store said


def test_a_denial_after_close_sends_no_audit_event(
    make_mem: MakeMem, coder: Principal, raw_redis: redis.Redis
) -> None:
    # authorize() after close() still denies, but sent its audit event into a stream no
    # worker of this object would ever persist (on memory://, none at all).
    mem = make_mem(worker=False)
    mem.close()
    stream = mem.layout.stream(0)
    before = raw_redis.xlen(stream)
    with pytest.raises(AccessDenied):
        mem.authorize(coder, Level.PRIVATE, scope="agent:coder-2")
    assert raw_redis.xlen(stream) == before
    assert mem.authorize(coder, Level.SWARM) == (Level.SWARM, "swarm:phase-1-auth")


def _mem_whose_redis_goes(
    make_mem: MakeMem, backend: str, request: pytest.FixtureRequest, **kwargs: Any
) -> tuple[DualMemory, Callable[[], None]]:
    """A DualMemory, and what takes its Redis away: a server of its own, killed (real
    Redis), or the in-process server disconnected."""
    if backend == "redis":
        srv = request.getfixturevalue("own_redis_server")
        return make_mem(redis_url=srv.url, **kwargs), srv.kill
    from dualmem.redis_backend import memory_server

    mem = make_mem(**kwargs)

    def cut() -> None:
        memory_server(mem.settings.redis_url).server.connected = False

    return mem, cut


def test_close_without_worker_while_redis_is_down_is_not_drained(
    make_mem: MakeMem, coder: Principal, backend: str, request: pytest.FixtureRequest
) -> None:
    # With no worker, close() asks Redis what is left unpersisted; when Redis cannot say,
    # the answer is "not known to be drained", not a drained close over a lost put.
    mem, cut_redis = _mem_whose_redis_goes(make_mem, backend, request, worker=False)
    mem.put("k", 1, level=Level.SWARM, principal=coder)
    cut_redis()
    assert mem.close() == CloseReport(pending=1, drained=False)


@pytest.mark.real_redis
def test_close_releases_every_redis_connection_it_opened(
    redis_server: RedisServer, db_path: Path, keyfile: Path, coder: Principal
) -> None:
    # close() releases connections: the worker thread's own (its blocking XREADGROUP)
    # stayed open for as long as the closed object lived; the command pool's and the
    # pub/sub client's are released too (a pub/sub object the caller never closed).
    admin = redis_server.client()
    admin.flushall()

    def ours() -> set[str]:
        return {c["id"] for c in admin.client_list() if c.get("name") == "dualmem"}

    before = ours()
    mem = DualMemory(redis_url=redis_server.url, db_path=str(db_path), keyring=str(keyfile))
    try:
        mem.sync(mem.put("k", 1, level=Level.SWARM, principal=coder))
        ps = mem.pubsub()
        ps.subscribe("ch")
        assert ps.get_message(timeout=5) is not None  # its connection is open
        opened = ours() - before
        assert len(opened) == 3  # the command pool's, the worker's, the pub/sub one
    finally:
        mem.close()
    wait_until(lambda: not ours() & opened, what="every connection of mem to close")
    assert mem._worker_thread is not None and not mem._worker_thread.is_alive()


def test_a_write_after_close_is_refused_before_it_is_checked_or_audited(
    make_mem: MakeMem, coder: Principal, raw_redis: redis.Redis
) -> None:
    # A put or delete on a closed DualMemory says "closed" first: not a ValidationError
    # about its key, nor an AccessDenied whose audit event went into a stream that no
    # worker of this object would persist.
    mem = make_mem(worker=False)
    mem.close()
    stream = mem.layout.stream(0)
    before = raw_redis.xlen(stream)
    other = {"level": Level.PRIVATE, "principal": coder, "scope": "agent:coder-2"}
    attempts: list[Callable[[], object]] = [
        lambda: mem.put("", 1, level=Level.SWARM, principal=coder),
        lambda: mem.put("k", 1, **other),  # type: ignore[arg-type]
        lambda: mem.delete("k", **other),  # type: ignore[arg-type]
    ]
    for attempt in attempts:
        with pytest.raises(DualMemError, match="this DualMemory is closed"):
            attempt()
    assert raw_redis.xlen(stream) == before


def test_a_close_interrupted_while_the_worker_commits_leaves_its_store_open(
    make_mem: MakeMem, coder: Principal, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A close() that fails (a KeyboardInterrupt while it waits for the worker thread)
    # releases what it can, but not the store under a worker still committing: its
    # commit goes through, where a store closed under it failed it.
    mem = make_mem(close_timeout=2)
    applying, go_on = threading.Event(), threading.Event()
    real_apply = mem.store.apply

    def held(*args: Any, **kwargs: Any) -> Any:
        applying.set()
        go_on.wait(10)
        return real_apply(*args, **kwargs)

    monkeypatch.setattr(mem.store, "apply", held)
    receipt = mem.put("k", 1, level=Level.SWARM, principal=coder)
    assert applying.wait(10)  # the worker is inside its commit
    thread = mem._worker_thread
    assert thread is not None
    real_join = thread.join

    def interrupted(timeout: float | None = None) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(thread, "join", interrupted)
    with pytest.raises(KeyboardInterrupt):
        mem.close()
    go_on.set()
    real_join(30)
    assert not thread.is_alive()
    assert make_mem(worker=False).store.status(receipt.shard, receipt.stream_id) == "committed"


def test_a_close_that_fails_after_its_worker_stopped_still_releases_the_store(
    make_mem: MakeMem, coder: Principal, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A close() that fails once the worker thread has stopped (here a bug in the metrics
    # snapshot) raises, and still closes the store and the worker's Redis client: with
    # nothing running under them, keeping them open only leaked a connection and the
    # checkpoint thread. (A memory.py mutation check: nothing looked.)
    mem = make_mem()
    mem.sync(mem.put("k", 1, level=Level.SWARM, principal=coder), timeout=10)
    worker = mem._worker
    assert worker is not None

    def broken() -> None:
        raise RuntimeError("a bug in the snapshot")

    monkeypatch.setattr(worker, "snapshot_metrics", broken)
    with pytest.raises(RuntimeError, match="a bug in the snapshot"):
        mem.close()
    assert mem._worker_thread is not None and not mem._worker_thread.is_alive()
    with pytest.raises(StoreUnavailable):
        mem.store.get("swarm:phase-1-auth", "k", 0)


def test_close_without_worker_reports_pending(make_mem: MakeMem, coder: Principal) -> None:
    # close() said (0, drained) with the put still in Redis: on memory:// it was lost at
    # exit with nothing reported.
    mem = make_mem(worker=False)
    mem.put("k", 1, level=Level.SWARM, principal=coder)
    assert mem.backlog() == {0: 1}
    assert mem.close() == CloseReport(pending=1, drained=False)
    persisted = make_mem()  # a worker
    persisted.sync(persisted.put("j", 2, level=Level.SWARM, principal=coder))
    wait_until(lambda: persisted.backlog() == {0: 0}, what="the acks")  # they follow commits
    assert make_mem(worker=False).close() == CloseReport(pending=0, drained=True)


@pytest.mark.parametrize("ending", ["return", "close in a daemon thread"])
def test_a_process_that_exits_without_close_persists_every_put(
    redis_url: str, db_path: Path, keyfile: Path, coder: Principal, ending: str
) -> None:
    # The worker thread is a daemon: a process that returned without close() took the
    # puts it had not persisted with it (0 of 200 on the embedded default). An atexit hook
    # closes what is left open, draining as close() does; a close already running in a
    # daemon thread is waited for (the hook skipped it, and the exit cut its drain short).
    n = 300 if ending == "return" else 3000
    last = "threading.Thread(target=mem.close, daemon=True).start()" if n == 3000 else ""
    child = f"""
import threading
from acl import Level, Principal
from dualmem import DualMemory
coder = Principal(agent_id="coder-1", team="backend", swarm="phase-1-auth", project="shop")
mem = DualMemory(redis_url={redis_url!r}, db_path={str(db_path)!r}, keyring={str(keyfile)!r})
for i in range({n}):
    level = (Level.PRIVATE, Level.SWARM)[i % 2]
    mem.put(f"exit/{{i}}", i, level=level, principal=coder)
{last}
"""
    root = str(Path(__file__).resolve().parents[1])
    done = subprocess.run(
        [sys.executable, "-c", child],
        env={**os.environ, "PYTHONPATH": root},
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    # No worker here: only what the child itself persisted is in the file.
    with DualMemory(
        redis_url=redis_url, db_path=str(db_path), keyring=str(keyfile), worker=False
    ) as reader:
        got = reader.query_all(principal=coder, prefix="exit/")
    assert sorted(r.value for r in got) == list(range(n))


def test_the_exit_hook_holds_no_object_and_forgets_closed_ones(
    redis_url: str, db_path: Path, keyfile: Path
) -> None:
    # One hook for every object, holding them weakly: closed ones leave its set once
    # collected (no growth however many are made), and one dropped unclosed is collected.
    def made() -> DualMemory:
        return DualMemory(
            redis_url=redis_url, db_path=str(db_path), keyring=str(keyfile), worker=False
        )

    gc.collect()  # closed ones of earlier tests, kept only by reference cycles
    before = len(memory_module._OPEN)
    for _ in range(20):
        made().close()
    gc.collect()
    assert len(memory_module._OPEN) == before
    dropped = weakref.ref(made())
    gc.collect()
    assert dropped() is None
    assert len(memory_module._OPEN) == before


@pytest.mark.real_redis
def test_a_forked_child_that_exits_leaves_its_parents_objects_open(
    redis_server: RedisServer, db_path: Path, keyfile: Path, coder: Principal
) -> None:
    # The exit hook closes the objects of the process that made them: a forked child (a
    # multiprocessing worker) exiting through it closed its parent's copy too, and that
    # close deleted the parent's key lease in Redis.
    redis_server.client().flushall()
    mem = DualMemory(
        redis_url=redis_server.url, db_path=str(db_path), keyring=str(keyfile), worker=False
    )
    try:
        assert mem._lease is not None
        pid = os.fork()
        if pid == 0:  # the child: what its interpreter's exit runs, then gone
            try:
                memory_module._close_open_at_exit()
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        users = key_users(redis_server.client(), mem.settings.namespace)
        assert [u.token for u in users] == [mem._lease.token]
        mem.put("k", 1, level=Level.PRIVATE, principal=coder)  # still open here
    finally:
        mem.close()


def test_a_signal_handler_may_close_while_its_thread_holds_the_exit_set_or_the_pool(
    redis_url: str, db_path: Path, keyfile: Path
) -> None:
    # Both locks were plain ones: a handler's close() on a thread interrupted inside
    # DualMemory() (the exit set) or inside a command (the pool's queue) waited for itself.
    from dualmem.redis_backend import _FairQueue

    def in_thread(job: Callable[[], object]) -> None:
        t = threading.Thread(target=job, daemon=True)
        t.start()
        t.join(10)
        assert not t.is_alive(), "deadlocked"

    mem = DualMemory(redis_url=redis_url, db_path=str(db_path), keyring=str(keyfile), worker=False)

    def close_inside_the_exit_set() -> None:
        with memory_module._OPEN_LOCK:
            mem.close()

    in_thread(close_inside_the_exit_set)
    q = _FairQueue(2)
    q.put_nowait("connection")

    def command_inside_the_queue() -> None:
        with q.mutex:
            assert q.get(timeout=0.1) == "connection"
            with pytest.raises(queue.Empty):
                q.get(timeout=0.1)

    in_thread(command_inside_the_queue)


def test_shards_keep_keys_in_order(
    make_mem: MakeMem, coder: Principal, raw_redis: redis.Redis
) -> None:
    mem = make_mem(shards=4)
    receipts = {}
    for i in range(200):
        receipts[f"k{i % 20}"] = mem.put(f"k{i % 20}", i, level=Level.SWARM, principal=coder)
    for r in receipts.values():
        mem.sync(r)
    assert {r.shard for r in receipts.values()} == {0, 1, 2, 3}
    for i in range(20):
        assert mem.get(f"k{i}", level=Level.SWARM, principal=coder) == 180 + i
    assert all(raw_redis.exists(mem.layout.stream(s)) for s in range(4))


def test_a_close_between_pubsubs_open_check_and_its_lock_leaves_no_client_behind(
    make_mem: MakeMem,
) -> None:
    # pubsub() looks again under its lock: a close() that ran between its first check and
    # the lock had already closed the pub/sub client, and one made after it was never
    # closed (a connection left open by a closed object).
    mem = make_mem(worker=False)
    real = mem._pubsub_lock

    class CloseOnFirstEntry:
        """The lock, entered first by pubsub() after its open check: close() runs there."""

        def __init__(self) -> None:
            self.entered = False

        def __enter__(self) -> bool:
            if not self.entered:
                self.entered = True
                mem.close()  # its own release of the pub/sub client enters this lock too
            return real.acquire()

        def __exit__(self, *exc: object) -> None:
            real.release()

    mem._pubsub_lock = CloseOnFirstEntry()  # type: ignore[assignment]
    with pytest.raises(DualMemError, match="this DualMemory is closed"):
        mem.pubsub()
    assert mem._pubsub_client is None


def test_prometheus_exposition(mem: DualMemory, coder: Principal) -> None:
    mem.sync(mem.put("k", 1, level=Level.SWARM, principal=coder))
    # sync() returns at the commit; the ack follows it, and the backlog counts until then.
    wait_until(lambda: mem.backlog() == {0: 0}, what="the ack after the commit")
    text = mem.prometheus()
    assert 'dualmem_latency_seconds_count{path="redis_write"} 1' in text
    assert "dualmem_redis_up 1.0" in text
    assert "dualmem_backlog 0\n" in text


def test_prometheus_says_redis_is_down_when_it_cannot_read_the_backlog(
    make_mem: MakeMem, backend: str, request: pytest.FixtureRequest
) -> None:
    # The exposition's redis_up gauge is what an alert watches: 0 with Redis gone (and no
    # backlog figure it could not read), not 1.
    mem, cut_redis = _mem_whose_redis_goes(make_mem, backend, request, worker=False)
    assert "dualmem_redis_up 1.0\n" in mem.prometheus()
    cut_redis()
    text = mem.prometheus()
    assert "dualmem_redis_up 0\n" in text and "dualmem_backlog " not in text


def test_keyring_object_can_be_passed(tmp_path: Path, redis_url: str, coder: Principal) -> None:
    ring = Keyring.generate()
    with DualMemory(redis_url=redis_url, db_path=str(tmp_path / "k.db"), keyring=ring) as mem:
        mem.sync(mem.put("k", 1, level=Level.SYSTEM, principal=Principal("s", system=True)))
        assert mem.codec.keyring is ring


def test_authorize_returns_the_scope_an_operation_would_use(
    mem: DualMemory, coder: Principal
) -> None:
    assert mem.authorize(coder, Level.PRIVATE) == (Level.PRIVATE, "agent:coder-1")
    assert mem.authorize(coder, 2, "write") == (Level.TEAM, coder.scope(Level.TEAM))
    with pytest.raises(ValidationError, match="action"):
        mem.authorize(coder, Level.TEAM, "delete")
    with pytest.raises(ValidationError):
        mem.authorize(coder, 9)


def test_a_put_redis_refuses_inside_its_transaction_raises_and_leaves_nothing(
    make_mem: MakeMem, coder: Principal, raw_redis: redis.Redis
) -> None:
    # Inside MULTI/EXEC one command can fail alone: the stream's name holding a string
    # (an operator's mistake) makes XADD answer WRONGTYPE in EXEC's array, and the put
    # built its receipt from that error. Redis has no rollback: the SET before it ran, and
    # its cache entry stayed, so a fresh read showed a value (or a delete's tombstone)
    # that no command would ever bring to SQLite, after a put that raised.
    mem = make_mem(worker=False)
    mem.put("k", 1, level=Level.SWARM, principal=coder)
    scope = coder.scope(Level.SWARM)
    shard = mem.layout.shard_of(scope, "k")
    cache_key = mem.layout.cache_key(shard, scope, "k")
    stream = mem.layout.stream(shard)
    raw_redis.rename(stream, stream + b"-aside")
    raw_redis.set(stream, b"not a stream")
    with pytest.raises(StoreUnavailable, match="Redis refused the command: WRONGTYPE"):
        mem.put("k", 2, level=Level.SWARM, principal=coder)
    assert mem.get("k", level=Level.SWARM, principal=coder, fresh=True) != 2
    with pytest.raises(StoreUnavailable, match="Redis refused the command: WRONGTYPE"):
        mem.delete("k", level=Level.SWARM, principal=coder)
    assert not raw_redis.exists(cache_key)


def test_a_put_whose_key_lease_renewal_alone_is_refused_returns_its_receipt(
    make_mem: MakeMem, coder: Principal, raw_redis: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    # The key lease's renewal rides in a put's transaction. When Redis refused only the
    # renewal (another program's string at the lease index), the put's SET and XADD had
    # run and the worker committed the write, yet the put raised "Redis refused the
    # command": a caller told nothing was written retried, and wrote it twice.
    mem = make_mem(worker=False, keyring_reload_interval=0.05)
    assert mem._lease is not None
    renewed = mem._lease._renewed_at
    index = mem._lease._index
    raw_redis.delete(index)
    raw_redis.set(index, b"not a set")
    time.sleep(0.1)  # a renewal is due: the put carries it
    with caplog.at_level(logging.WARNING, logger="dualmem"):
        receipt = mem.put("k", 1, level=Level.PRIVATE, principal=coder)
    assert raw_redis.xrange(mem.layout.stream(receipt.shard))[-1][0].decode() == receipt.stream_id
    assert "key lease" in caplog.text and "WRONGTYPE" in caplog.text
    # Not confirmed: the renewal is due again at the next write, and the lease lapses as
    # it would with no renewal getting through (the writer then reloads its key file).
    assert mem._lease._renewed_at == renewed


def test_send_many_reads_every_reply_before_raising(raw_redis: redis.Redis) -> None:
    from dualmem.redis_backend import send_many

    raw_redis.set("text", "not a number")
    with pytest.raises(redis.ResponseError):
        send_many(raw_redis, [(b"INCR", b"n"), (b"INCR", b"text"), (b"INCR", b"n")])
    # The commands after the error ran, and their replies did not stay on the connection:
    # the next exchange on the pooled connection gets its own replies.
    assert send_many(raw_redis, [(b"GET", b"n"), (b"PING",)]) == [b"2", b"PONG"]
    assert raw_redis.get("n") == b"2"


def test_a_put_whose_reply_times_out_is_never_sent_twice(
    own_redis_server: RedisServer, tmp_path: Path, keyfile: Path, coder: Principal
) -> None:
    # Redis stalls past socket_timeout (SIGSTOP here; a fork or a slow command in
    # practice). The transaction was sent; it used to be sent again on a new connection
    # and the put returned one receipt for two stream entries once Redis woke up.
    srv = own_redis_server
    mem = DualMemory(
        redis_url=srv.url, db_path=str(tmp_path / "m.db"), keyring=str(keyfile), worker=False
    )
    try:
        mem.put("warm", 1, level=Level.SWARM, principal=coder)
        raw = srv.client()
        stream = mem.layout.stream(0)
        before = raw.xlen(stream)
        assert srv.proc is not None
        os.kill(srv.proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(StoreUnavailable, match="may or may not have run"):
                mem.put("k", {"v": 1}, level=Level.SWARM, principal=coder)
        finally:
            os.kill(srv.proc.pid, signal.SIGCONT)
        wait_until(lambda: raw.xlen(stream) > before, what="the buffered transaction")
        time.sleep(0.3)  # a second copy, if one was sent, would be in by now
        assert raw.xlen(stream) == before + 1
        r = mem.put("after", 2, level=Level.SWARM, principal=coder)  # the client recovers
        ((_, fields),) = raw.xrange(stream, min=r.stream_id, max=r.stream_id)
        assert fields[b"k"] == b"after"
    finally:
        mem.close()


def test_an_operator_send_whose_reply_times_out_is_never_sent_twice(
    own_redis_server: RedisServer, tmp_path: Path, keyfile: Path
) -> None:
    # import, dlq replay and the mirror send through Runtime.send, which used redis-py's
    # Pipeline: its retry sent MULTI..EXEC again after a reply timeout.
    srv = own_redis_server
    settings = Settings.load(
        {"redis_url": srv.url, "db_path": str(tmp_path / "m.db"), "keyring": str(keyfile)}
    )
    with Runtime(settings, worker=False) as rt:
        write = Write("swarm:s", "k", Level.SWARM, "op", b"\x01\x00{}")
        rt.send([write])
        raw = srv.client()
        stream = rt.layout.stream(0)
        before = raw.xlen(stream)
        assert srv.proc is not None
        pid = srv.proc.pid
        check_room = rt._check_room

        def stall_after_the_room_check(per_shard: Any) -> None:
            check_room(per_shard)
            os.kill(pid, signal.SIGSTOP)  # Redis stalls just as the transaction goes out

        rt._check_room = stall_after_the_room_check  # type: ignore[method-assign]
        try:
            with pytest.raises(StoreUnavailable, match="may or may not have run"):
                rt.send([write])
        finally:
            os.kill(pid, signal.SIGCONT)
        wait_until(lambda: raw.xlen(stream) > before, what="the buffered transaction")
        time.sleep(0.3)
        assert raw.xlen(stream) == before + 1


@pytest.mark.real_redis
def test_a_busy_loading_redis_is_a_refusal_that_is_retried_not_an_unknown_outcome(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # -LOADING (Redis loading its data after a restart) refuses the transaction: nothing
    # ran, so it is sent again under the retry policy, not reported as "may or may not
    # have run" (a Redis that is loading is hard to produce on demand: the connection
    # plays one, and the retry goes to the real server).
    from dualmem.redis_backend import connect

    redis_server.client().flushall()
    client, _ = connect(Settings.load({"redis_url": redis_server.url}))
    transact(client, [(b"SET", b"warm", b"1")])  # its connection was used just now: no PING
    conn_class = redis.connection.Connection
    real_send, real_read = conn_class.send_packed_command, conn_class.read_response
    loading = [True]
    sent: list[bytes] = []

    def send(self: Any, command: Any, check_health: bool = True) -> None:
        data = b"".join(command) if isinstance(command, list) else bytes(command)
        if b"INCR" in data:
            sent.append(data)
        if not loading[0]:
            real_send(self, command, check_health)

    def read(self: Any, *args: Any, **kwargs: Any) -> Any:
        if loading[0]:
            loading[0] = False
            raise redis.BusyLoadingError("Redis is loading the dataset in memory")
        return real_read(self, *args, **kwargs)

    monkeypatch.setattr(conn_class, "send_packed_command", send)
    monkeypatch.setattr(conn_class, "read_response", read)
    try:
        assert transact(client, [(b"INCR", b"n")]) == [1]
    finally:
        monkeypatch.undo()
        client.close()
    assert len(sent) == 2  # refused, then sent again
    assert redis_server.client().get(b"n") == b"1"


def test_close_from_a_signal_handler_during_close_returns_at_once(
    make_mem: MakeMem, coder: Principal, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A handler that runs close() on the thread already inside close() cannot wait for
    # that first close (it is suspended under the handler): it waited its whole timeout.
    mem = make_mem()
    mem.put("k", 1, level=Level.SWARM, principal=coder)
    inner: list[object] = []
    first = mem._close_first

    def interrupted(timeout: float) -> CloseReport:
        t0 = time.monotonic()
        inner.append(mem.close())
        inner.append(time.monotonic() - t0)
        return first(timeout)

    monkeypatch.setattr(mem, "_close_first", interrupted)
    report = mem.close()
    assert inner[0] == CloseReport(pending=1, drained=False) and inner[1] < 1
    assert report.drained and mem.close() == report
    for bad in (float("inf"), float("nan"), -1):
        with pytest.raises(ValidationError, match="timeout"):
            make_mem().close(timeout=bad)


def test_an_interrupt_between_two_replies_leaves_no_reply_behind(
    make_mem: MakeMem, coder: Principal, raw_redis: redis.Redis
) -> None:
    # Ctrl-C (or a SIGALRM timeout) after MULTI's reply was read: the pooled connection
    # went back with EXEC's reply unread, and every later put read the reply of the put
    # before it (a receipt naming another command's entry, or a false error).
    mem = make_mem(worker=False)
    mem.put("warm", 1, level=Level.SWARM, principal=coder)
    pool = mem._redis.connection_pool
    conn = pool.get_connection()
    pool.release(conn)
    real = conn.read_response
    calls = [0]

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        reply = real(*args, **kwargs)
        calls[0] += 1
        if calls[0] == 1:
            conn.read_response = real  # type: ignore[method-assign]
            raise KeyboardInterrupt
        return reply

    direct = getattr(conn, "run_transaction", None)
    if direct is None:
        conn.read_response = interrupted  # type: ignore[method-assign]
    else:
        # The in-process server runs a put's MULTI/EXEC in one step and no reply is read:
        # the interrupt comes after it ran, before its reply was returned.
        def interrupted_direct(command: Any) -> Any:
            direct(command)
            conn.run_transaction = direct
            raise KeyboardInterrupt

        conn.run_transaction = interrupted_direct
    with pytest.raises(KeyboardInterrupt):
        mem.put("interrupted", 0, level=Level.SWARM, principal=coder)
    stream = mem.layout.stream(0)
    for i in range(3):
        r = mem.put(f"k{i}", i, level=Level.SWARM, principal=coder)
        ((_, fields),) = raw_redis.xrange(stream, min=r.stream_id, max=r.stream_id)
        assert fields[b"k"] == f"k{i}".encode()


def test_ids_after_redis_lost_its_data_sort_after_committed_ones(
    make_mem: MakeMem,
    coder: Principal,
    raw_redis: redis.Redis,
    redis_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Rows committed under ids an hour ahead of this clock stand for rows written before
    # Redis lost its data and its host's clock was stepped back by an hour.
    writer = make_mem(worker=False)
    r = writer.put("k", {"v": "old"}, level=Level.SWARM, principal=coder)
    stream = writer.layout.stream(r.shard)
    ((_, fields),) = raw_redis.xrange(stream)
    ahead = f"{int(time.time() * 1000) + 3_600_000}-0"
    raw_redis.xadd(stream, fields, id=ahead)
    ahead_receipt = Receipt(r.shard, ahead, r.scope, r.key, r.op)
    mem = make_mem()
    mem.sync(ahead_receipt)
    assert mem.store.max_sid(r.shard) == sid_of(ahead)
    mem.close()
    writer.close()
    raw_redis.flushall()  # the stream, its consumer group and the cache entries are gone

    with caplog.at_level(logging.INFO, logger="dualmem.worker"):
        mem = make_mem()
    (raised,) = [r for r in caplog.records if "behind the newest committed id" in r.message]
    # A warning on a real Redis (it lost the stream's history); on memory:// every restart
    # makes a new stream, so there it is routine (it was a warning on every restart).
    embedded = redis_url.startswith("memory://")
    assert raised.levelno == (logging.INFO if embedded else logging.WARNING)
    r2 = mem.put("k", {"v": "new"}, level=Level.SWARM, principal=coder)
    assert sid_of(r2.stream_id) > sid_of(ahead)
    mem.sync(r2)
    assert mem.get("k", level=Level.SWARM, principal=coder) == {"v": "new"}
    # The entry that moved the stream's last id was never delivered or stored.
    assert [c.stream_id for c in mem.history("k", level=Level.SWARM, principal=coder)] == [
        r.stream_id,
        ahead,
        r2.stream_id,
    ]
    assert raw_redis.xlen(stream) <= 1

    # Redis loses its data again while this worker runs: the first put recreates the
    # stream from the (behind) clock and sorts before the committed rows, the README's
    # documented window; the worker recreates its group, raises the last id, and every
    # put after that wins again.
    raw_redis.flushall()
    lost = mem.put("k", {"v": "in the window"}, level=Level.SWARM, principal=coder)
    assert sid_of(lost.stream_id) < sid_of(ahead)
    mem.sync(lost)
    r3 = mem.put("k", {"v": "after"}, level=Level.SWARM, principal=coder)
    assert sid_of(r3.stream_id) > sid_of(ahead)
    mem.sync(r3)
    assert mem.get("k", level=Level.SWARM, principal=coder) == {"v": "after"}


@pytest.mark.parametrize("kind", ["replay", "audit", "dead letter"])
def test_ids_after_redis_lost_its_data_sort_after_every_committed_id(
    make_mem: MakeMem, coder: Principal, raw_redis: redis.Redis, kind: str
) -> None:
    # The floor was MAX(journal.sid): a replayed command is ordered by its original id but
    # took a newer one, and audit events and dead letters have ids outside the journal.
    # A new command given one of those ids was taken for it: acked, never written, and
    # sync() said committed.
    writer = make_mem(worker=False)
    r = writer.put("k", {"v": "old"}, level=Level.SWARM, principal=coder)
    a = writer.audit("before", principal=coder)
    stream = writer.layout.stream(r.shard)
    (put_fields_, audit_fields_) = (dict(f) for _, f in raw_redis.xrange(stream))
    ahead = f"{int(time.time() * 1000) + 3_600_000}-0"
    fields = {
        "replay": {**put_fields_, b"o": r.stream_id.encode()},
        "audit": audit_fields_,
        "dead letter": {**put_fields_, b"l": b"9"},  # refused by the worker
    }[kind]
    raw_redis.xadd(stream, fields, id=ahead)
    mem = make_mem(max_deliveries=1)
    status = "dead" if kind == "dead letter" else "committed"
    wait_until(lambda: mem.store.status(a.shard, ahead) == status, what=f"{ahead} {status}")
    assert mem.store.max_sid(r.shard) == sid_of(ahead)
    mem.close()
    writer.close()
    raw_redis.flushall()

    mem = make_mem()
    after = [
        mem.put("n", 1, level=Level.SWARM, principal=coder),
        mem.audit("after", principal=coder),
    ]
    assert all(sid_of(x.stream_id) > sid_of(ahead) for x in after)
    for x in after:
        mem.sync(x)
    assert mem.get("n", level=Level.SWARM, principal=coder) == 1
    assert [e.event for e in mem.store.audit_log()].count("after") == 1


def test_sync_of_a_dead_lettered_put_succeeds_once_its_replay_is_committed(
    make_mem: MakeMem, coder: Principal, db_path: Path
) -> None:
    # The replay commits under a new stream id; sync() on the original receipt timed out
    # ("is a worker running?") although its command was committed.
    from dualmem.ops import dlq

    mem = make_mem(max_deliveries=1)
    mem.sync(mem.put("warm", 0, level=Level.SWARM, principal=coder))
    refuse_inserts(db_path, "NEW.key = 'p'")
    r = mem.put("p", 1, level=Level.SWARM, principal=coder)
    wait_until(mem.store.dead_letters, what="the dead letter")
    with pytest.raises(NotPersisted, match="dead-lettered"):
        mem.sync(r, timeout=1)
    allow_inserts(db_path)
    with Runtime(mem.settings, worker=False) as rt:
        (new,) = dlq.replay(rt, None).receipts
    mem.sync(new, timeout=10)
    mem.sync(r, timeout=2)
    assert mem.get("p", level=Level.SWARM, principal=coder) == 1


@pytest.mark.real_redis
def test_entries_whose_read_reply_was_lost_are_applied_without_waiting_for_a_claim(
    own_redis_server: RedisServer,
    db_path: Path,
    keyfile: Path,
    coder: Principal,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Redis ran an XREADGROUP, its reply was lost, and redis-py sent the read again: what
    # the first one read sat in the worker's own pending list until claim_idle_ms passed
    # (sync() timed out, close() reported it pending, a later put committed first).
    mem = DualMemory(redis_url=own_redis_server.url, db_path=str(db_path), keyring=str(keyfile))
    armed = [False]
    real = redis.Redis.parse_response

    def lossy(self: redis.Redis, conn: Any, command_name: str, **options: Any) -> Any:
        reply = real(self, conn, command_name, **options)
        if armed[0] and command_name == "XREADGROUP" and reply:
            armed[0] = False
            raise redis.ConnectionError("connection reset by peer")  # Redis ran it
        return reply

    # Patched before the warm-up, armed after it: the worker's read already blocked when
    # "k" is put goes through ``lossy`` too (patched after the warm-up, a read blocked
    # before the patch returned "k" through the real method, and the test waited in vain).
    monkeypatch.setattr(redis.Redis, "parse_response", lossy)
    try:
        mem.sync(mem.put("warm", 0, level=Level.SWARM, principal=coder))
        armed[0] = True
        r1 = mem.put("k", "v1", level=Level.SWARM, principal=coder)
        wait_until(lambda: not armed[0], what="the lost reply")
        r2 = mem.put("k", "v2", level=Level.SWARM, principal=coder)
        mem.sync(r1, timeout=5)
        mem.sync(r2, timeout=5)
        history = mem.history("k", level=Level.SWARM, principal=coder)
        assert [c.stream_id for c in history] == [r1.stream_id, r2.stream_id]
    finally:
        report = mem.close(timeout=5)
    assert report.drained, report


def test_sync_of_a_dead_lettered_audit_event_succeeds_once_its_replay_is_committed(
    make_mem: MakeMem, coder: Principal, raw_redis: redis.Redis
) -> None:
    # An audit event's replay has no journal row to be found by: sync() on the original
    # receipt timed out although the event was committed. The dead letter now records the
    # id it was replayed under.
    from dualmem.ops import dlq
    from dualmem.store import StreamEntry

    mem = make_mem(worker=False)
    receipt = mem.audit("app_event", principal=coder, detail={"a": 1})
    stream = mem.layout.stream(receipt.shard)
    ((sid, fields),) = raw_redis.xrange(stream)
    entry = StreamEntry(receipt.shard, sid.decode(), dict(fields))
    mem.store.dead_letter([(entry, "disk I/O error", 3)])
    raw_redis.xgroup_destroy(stream, mem.settings.group)  # as if delivered and acked
    raw_redis.xgroup_create(stream, mem.settings.group, id="$")
    with pytest.raises(NotPersisted, match="dead-lettered"):
        mem.sync(receipt, timeout=0)
    with Runtime(mem.settings) as rt:
        (replayed,) = dlq.replay(rt, None).receipts
        assert rt.wait([replayed], 10).committed == 1
    mem.sync(receipt, timeout=2)
    assert [e.event for e in mem.store.audit_log()].count("app_event") == 1


# {1: "a"} alone encodes (as {"1": "a"}): only the str-keys check refuses it, where a
# detail read back would name other keys than the ones it was given.
@pytest.mark.parametrize("detail", ["text", [1, 2], {1: "a", "b": 2}, {1: "a"}, {"self": None}])
def test_an_audit_detail_that_is_not_a_json_object_is_a_validation_error(
    make_mem: MakeMem, coder: Principal, detail: Any
) -> None:
    # A plain ValueError or TypeError escaped from json.dumps, where every other bad
    # input is a ValidationError.
    mem = make_mem(worker=False)
    if detail == {"self": None}:
        detail["self"] = detail  # a cycle
    with pytest.raises(ValidationError, match="detail"):
        mem.audit("deploy", principal=coder, detail=detail)
    mem.audit("deploy", principal=coder, detail={"ok": [1, 2], "when": time})  # str()'d


def test_an_audit_event_with_a_bad_risk_or_level_is_refused_and_one_redis_cannot_take_raises(
    make_mem: MakeMem, coder: Principal, backend: str, request: pytest.FixtureRequest
) -> None:
    # audit() records what the application says happened: a risk outside low, medium and
    # high, or a level that is no level, is a ValidationError before anything is sent;
    # an event Redis could not take raises StoreUnavailable, not a receipt of nothing.
    mem, cut_redis = _mem_whose_redis_goes(make_mem, backend, request, worker=False)
    for bad in ({"risk": "urgent"}, {"level": 9}, {"level": "ADMIN"}):
        with pytest.raises(ValidationError, match=r"risk|level"):
            mem.audit("deploy", principal=coder, **bad)
    assert mem.backlog() == {0: 0}
    receipt = mem.audit("deploy", principal=coder, level="TEAM")  # type: ignore[arg-type]
    assert mem.backlog() == {0: 1} and receipt.op == "audit"
    cut_redis()
    with pytest.raises(StoreUnavailable, match="audit event 'deploy' could not be written"):
        mem.audit("deploy", principal=coder)


def test_an_operator_audit_event_can_be_waited_for_like_a_write(make_mem: MakeMem) -> None:
    # `export --decrypt` waited on rt.send([], audits=[...]), which returned no receipt for
    # the event: the wait waited for nothing.
    from dualmem.ops.runtime import AuditEvent

    mem = make_mem(worker=False)
    event = AuditEvent("export_decrypted", "coder-1", {"file": "x.jsonl"})
    with Runtime(mem.settings) as rt:
        assert rt.send([], audits=[event]) == []  # writes and raw entries only, as before
        (receipt,) = rt.send([], audits=[event], audit_receipts=True)
        assert rt.wait([receipt], 10).committed == 1
    assert mem.store.status(receipt.shard, receipt.stream_id) == "committed"
    assert receipt.op == "audit"


def test_a_failed_entry_another_worker_settled_is_not_dead_lettered_again(
    make_mem: MakeMem, coder: Principal, raw_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An entry that failed here but was no longer pending when the worker looked (another
    # worker claimed it and committed it meanwhile) was dead-lettered at once: its
    # delivery count was taken to be max_deliveries.
    from dualmem.redis_backend import connect

    writer = make_mem(worker=False)
    settled = writer.put("settled", 1, level=Level.SWARM, principal=coder)
    failing = writer.put("failing", 2, level=Level.SWARM, principal=coder)
    stream = writer.layout.stream(0)
    store = writer.store
    real_apply = store.apply

    def apply(entries: Any) -> Any:
        result = real_apply(entries)
        for e in list(result.done):
            if e.stream_id in (settled.stream_id, failing.stream_id):
                result.done.remove(e)
                result.failed.append((e, "failed here"))
            if e.stream_id == settled.stream_id:  # committed elsewhere, and acked there
                raw_redis.xack(stream, writer.settings.group, e.stream_id)
        return result

    monkeypatch.setattr(store, "apply", apply)
    client, _ = connect(writer.settings)
    worker = Worker(client, store, writer.settings)
    worker.ensure_groups()
    assert worker.step() == 2
    client.close()
    assert store.dead_letters() == []  # one settled elsewhere, one left for its retry
    assert [r["message_id"] for r in raw_redis.xpending_range(stream, "persist", "-", "+", 9)] == [
        failing.stream_id.encode()
    ]


@pytest.mark.parametrize("failure", ["refused commit", "bug"])
def test_an_entry_whose_dead_letter_failed_is_retried_without_waiting_for_a_claim(
    make_mem: MakeMem,
    coder: Principal,
    raw_redis: redis.Redis,
    db_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    failure: str,
) -> None:
    # The loop caught the failed dead-letter write (an outage, or a bug: any error) and went
    # on reading new entries only: the entry sat in the worker's own pending list until its
    # next claim (claim_idle_ms/2), its receipt neither committed nor dead-lettered, the
    # backlog held up meanwhile.
    writer = make_mem(worker=False)
    stream = writer.layout.stream(0)
    bad_id = raw_redis.xadd(stream, {b"op": b"put", b"s": b"swarm:phase-1-auth", b"k": b"x"})
    tripped = threading.Event()
    if failure == "bug":
        real = SQLiteStore.dead_letter

        def dead_letter(self: SQLiteStore, items: Any) -> None:
            if not tripped.is_set():
                tripped.set()
                raise RuntimeError("a bug planted by the test")
            real(self, items)

        monkeypatch.setattr(SQLiteStore, "dead_letter", dead_letter)
    else:
        refuse_inserts(db_path, table="dead_letters")
    worker = make_mem(worker=True, max_deliveries=1, claim_idle_ms=60_000)
    assert worker._worker is not None
    stats = worker._worker.stats
    wait_until(lambda: stats.failures >= 1, what="the malformed entry failed")
    if failure != "bug":
        allow_inserts(db_path)
    wait_until(worker.store.dead_letters, timeout=10, what="its dead letter")
    (dead,) = worker.store.dead_letters()
    assert dead.stream_id == bad_id.decode() and "malformed" in dead.error
    wait_until(lambda: worker.backlog() == {0: 0}, what="acked")


def step_failing_then(
    writer: DualMemory, db_path: Path, monkeypatch: pytest.MonkeyPatch, then: Callable[..., None]
) -> None:
    """One step of a worker on ``writer``'s store while every commit fails, ``then(worker,
    failed)`` run right after its real ``apply`` returned (what another worker, or Redis,
    does before this one looks at the entries that failed)."""
    from dualmem.redis_backend import connect

    refuse_inserts(db_path)
    store = writer.store
    real_apply = store.apply
    client, _ = connect(writer.settings)
    worker = Worker(client, store, writer.settings)
    worker.ensure_groups()

    def apply(entries: Any) -> Any:
        result = real_apply(entries)
        then(worker, [e for e, _ in result.failed])
        return result

    monkeypatch.setattr(store, "apply", apply)
    try:
        assert worker.step() == 1
    finally:
        client.close()


def test_a_failed_entry_another_worker_dead_lettered_keeps_that_dead_letter(
    make_mem: MakeMem,
    coder: Principal,
    raw_redis: redis.Redis,
    db_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The entry failed here too, but another worker claimed it and dead-lettered it before
    # this one looked: dead-lettering it again overwrote that letter's error and delivery
    # count with this worker's guess (max_deliveries) and audited a second dead letter.
    writer = make_mem(worker=False, max_deliveries=3)
    poison = writer.put("poison", 1, level=Level.SWARM, principal=coder)
    stream, store = writer.layout.stream(0), writer.store

    def settled_there(_: Worker, failed: list[StreamEntry]) -> None:
        for e in failed:  # dead-lettered elsewhere, and acked there
            store.dead_letter([(e, "failed there", 7)])
            raw_redis.xack(stream, writer.settings.group, e.stream_id)

    step_failing_then(writer, db_path, monkeypatch, settled_there)
    (dead,) = store.dead_letters()
    assert (dead.stream_id, dead.error, dead.deliveries) == (poison.stream_id, "failed there", 7)
    assert [a.event for a in store.audit_log()].count("dead_letter") == 1


def test_a_failed_entry_redis_lost_before_the_worker_looked_is_dead_lettered(
    make_mem: MakeMem,
    coder: Principal,
    raw_redis: redis.Redis,
    db_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An entry whose commit failed, no longer pending when the worker looked because Redis
    # lost its data meanwhile (restarted empty, the group recreated by another worker): its
    # dead letter is the only copy left. Taken for an entry another worker settled, or for
    # one with deliveries to spare, it was dropped: the put was nowhere, not in SQLite,
    # not in the stream, not in the dead letters.
    writer = make_mem(worker=False, max_deliveries=3)
    lost = writer.put("lost", 1, level=Level.SWARM, principal=coder)

    def redis_lost_it(worker: Worker, _: list[StreamEntry]) -> None:
        raw_redis.flushall()  # Redis restarted empty
        worker.ensure_groups()  # and a worker recreated the group

    step_failing_then(writer, db_path, monkeypatch, redis_lost_it)
    (dead,) = writer.store.dead_letters()
    assert (dead.stream_id, dead.deliveries) == (lost.stream_id, 3)
    assert REFUSED in dead.error
    assert writer.store.status(lost.shard, lost.stream_id) == "dead"


def test_query_pages_with_after_and_query_all_reads_every_page(
    make_mem: MakeMem, coder: Principal
) -> None:
    mem = make_mem()
    keys = ["a", "a\u00e9", "b/1", "b/2", "b/~", "c", "\U0001f600"]
    receipts = [mem.put(k, k, level=lvl, principal=coder) for k in keys for lvl in (3, 4)]
    mem.sync(receipts[-1], timeout=10)
    expected = [(r.scope, r.key) for r in mem.query(principal=coder, limit=100)]
    assert len(expected) == 2 * len(keys) and expected == sorted(expected)
    pages, after = [], None
    while True:
        page = mem.query(principal=coder, limit=3, after=after)
        pages.append(page)
        if len(page) < 3:
            break
        after = (page[-1].scope, page[-1].key)
    assert [(r.scope, r.key) for p in pages for r in p] == expected
    assert [(r.scope, r.key) for r in mem.query_all(principal=coder, page=2)] == expected
    assert [r.key for r in mem.query_all(principal=coder, level=3, prefix="b/", page=2)] == [
        "b/1",
        "b/2",
        "b/~",
    ]
    for bad in ("b/1", ("swarm:phase-1-auth",), ("swarm:phase-1-auth", "b/1", "x")):
        # A tuple of one or three raised IndexError, or was passed on to the store.
        with pytest.raises(ValidationError, match=r"after must be a \(scope, key\) tuple"):
            mem.query(principal=coder, after=bad)  # type: ignore[arg-type]


def test_query_refuses_a_since_or_until_that_is_not_an_int(
    mem: DualMemory, coder: Principal
) -> None:
    # since and until bound updated_at (ms): an int each. A string or a float was
    # compared by SQLite as it came, and a number past 64 bits raised OverflowError.
    mem.sync(mem.put("k", 1, level=Level.SWARM, principal=coder))
    assert [r.key for r in mem.query(principal=coder, since=0, until=2**62)] == ["k"]
    for name in ("since", "until"):
        for bad in ("5", 1.5, True, 2**64):
            with pytest.raises(ValidationError, match=name):
                mem.query(principal=coder, **{name: bad})  # type: ignore[arg-type]


def test_query_keeps_to_its_updated_at_range_at_both_ends(
    mem: DualMemory, coder: Principal
) -> None:
    # until was dropped on its way to the store and every later record came back: a
    # caller reading "what changed up to t" was handed what changed after it too.
    mem.sync(mem.put("a", 1, level=Level.SWARM, principal=coder))
    (first,) = mem.query(principal=coder)
    wait_until(lambda: time.time() * 1000 > first.updated_at + 1, what="the next millisecond")
    mem.sync(mem.put("b", 2, level=Level.SWARM, principal=coder))
    second = mem.get_record("b", level=Level.SWARM, principal=coder)
    assert second is not None and second.updated_at > first.updated_at
    # since <= updated_at < until (Store.query)
    assert [r.key for r in mem.query(principal=coder, until=second.updated_at)] == ["a"]
    assert [r.key for r in mem.query(principal=coder, since=second.updated_at)] == ["b"]
    both = mem.query(principal=coder, since=first.updated_at, until=second.updated_at + 1)
    assert [r.key for r in both] == ["a", "b"]


def test_history_refuses_a_limit_that_is_not_a_count(mem: DualMemory, coder: Principal) -> None:
    # history passed its limit to SQLite unchecked: -1 read every entry, a string was
    # compared as it came, and one past 64 bits raised OverflowError.
    mem.sync(mem.put("k", 1, level=Level.SWARM, principal=coder))
    assert len(mem.history("k", level=Level.SWARM, principal=coder, limit=0)) == 0
    for bad in (-1, "2", True, 1.0, 2**64):
        with pytest.raises(ValidationError, match="limit"):
            mem.history("k", level=Level.SWARM, principal=coder, limit=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("page", [0, -1, 10_001, 20_000, "5", True, 2.0])
def test_query_all_names_a_bad_page_as_page(
    mem: DualMemory, coder: Principal, page: object
) -> None:
    # It said "limit must be an int in 1..10000", naming a parameter the caller never passed.
    with pytest.raises(ValidationError, match=r"^page must be an int in 1\.\.10000, got "):
        mem.query_all(principal=coder, page=page)  # type: ignore[arg-type]


def test_a_fresh_read_after_a_puts_ttl_sees_it_expired_before_the_commit(
    make_mem: MakeMem, coder: Principal, raw_redis: redis.Redis
) -> None:
    # The cache entry of a put with a ttl lived for that ttl only: past it, with the
    # worker behind, a fresh read fell back to SQLite and answered the value the put had
    # replaced.
    first = make_mem()
    first.sync(first.put("k", "old", level=Level.SWARM, principal=coder), timeout=10)
    first.close()  # no worker from here on: the next put waits in the stream
    writer = make_mem(worker=False)
    # Read back before the ttl ends, for sure (see test_expired_records_are_invisible).
    for ttl in (0.3, 1.0, 3.0, 10.0):
        t0 = time.monotonic()
        r = writer.put("k", "new", level=Level.SWARM, principal=coder, ttl=ttl)
        seen = writer.get("k", level=Level.SWARM, principal=coder, fresh=True)
        if time.monotonic() - t0 < ttl:
            assert seen == "new"
            break
    else:
        pytest.fail("no put was read back within its ttl, the longest 10 s")
    time.sleep(max(0.0, t0 + ttl + 0.1 - time.monotonic()))
    assert writer.get("k", level=Level.SWARM, principal=coder, fresh=True) is None
    assert writer.get("k", level=Level.SWARM, principal=coder) == "old"  # not committed
    # The entry holds its expiry and outlives the ttl by cache_ttl.
    name = writer.layout.cache_key(r.shard, r.scope, r.key)
    assert raw_redis.pttl(name) > 1000
    mem = make_mem()  # a worker again
    mem.sync(r, timeout=10)
    assert mem.get("k", level=Level.SWARM, principal=coder) is None  # committed, expired
    assert mem.get("k", level=Level.SWARM, principal=coder, fresh=True) is None


def test_cache_entries_and_delete_marks_live_for_cache_ttl(
    make_mem: MakeMem, coder: Principal, raw_redis: redis.Redis
) -> None:
    # A put's cache entry and a delete's mark live for cache_ttl (seconds); a put with a
    # longer ttl keeps its entry that long, one with a shorter ttl still cache_ttl; a
    # pinned entry has no expiry. A delete's mark sent without one stayed in Redis for good.
    mem = make_mem(worker=False, cache_ttl=100)
    swarm: dict[str, Any] = {"level": Level.SWARM, "principal": coder}
    receipts = {
        "put": (mem.put("p", 1, **swarm), 100_000),
        "delete": (mem.delete("d", **swarm), 100_000),
        "put with a longer ttl": (mem.put("l", 1, ttl=500, **swarm), 500_000),
        "put with a shorter ttl": (mem.put("s", 1, ttl=5, **swarm), 100_000),
        "pinned put": (mem._put_pinned("q", 1, **swarm), -1),
    }
    for what, (r, ms) in receipts.items():
        left = raw_redis.pttl(mem.layout.cache_key(r.shard, r.scope, r.key))
        assert (ms - 10_000 < left <= ms) if ms > 0 else left == ms, (what, left)


def test_a_fresh_read_and_sqlite_agree_on_the_millisecond_a_put_expires(
    make_mem: MakeMem, coder: Principal, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SQLite holds a row live while expires_at > now (ms); the cache entry must answer the
    # same at every millisecond, or a fresh read and a plain one disagree at the edge.
    mem = make_mem()
    r = mem.put("k", "v", level=Level.SWARM, principal=coder, ttl=60)
    mem.sync(r, timeout=10)
    record = mem.get_record("k", level=Level.SWARM, principal=coder)
    assert record is not None and record.expires_at is not None
    edge_ms = record.expires_at
    for offset_ms, live in ((-1, True), (0, False), (1, False)):
        # Half a millisecond in: a float clock (time.time) holds it without rounding
        # across the millisecond's edge.
        at_ns = (edge_ms + offset_ms) * 1_000_000 + 500_000
        with monkeypatch.context() as clock:  # the reads' clock only, then the real one
            clock.setattr(time, "time_ns", lambda at_ns=at_ns: at_ns)
            clock.setattr(time, "time", lambda at_ns=at_ns: at_ns / 1e9)
            fresh = mem.get("k", level=Level.SWARM, principal=coder, fresh=True)
            plain = mem.get("k", level=Level.SWARM, principal=coder)
        assert (fresh == "v", plain == "v") == (live, live), offset_ms


def test_key_rotation_keeps_a_cached_puts_expiry(
    make_mem: MakeMem, coder: Principal, raw_redis: redis.Redis, keyfile: Path
) -> None:
    from acl import envelope_key_id
    from dualmem.commands import cached_envelope
    from dualmem.rotation import add_active_key, rotate_keys

    writer = make_mem(worker=False)
    r = writer.put("k", {"v": 1}, level=Level.PRIVATE, principal=coder, ttl=3600)
    name = writer.layout.cache_key(r.shard, r.scope, r.key)
    _, expires_at = cached_envelope(raw_redis.get(name))
    assert expires_at is not None
    new = add_active_key(keyfile).active_id
    report = rotate_keys(make_mem(), timeout=30)
    assert report.done and report.resealed_cache >= 1
    envelope, kept = cached_envelope(raw_redis.get(name))
    assert kept == expires_at and envelope is not None and envelope_key_id(envelope) == new
    assert writer.get("k", level=Level.PRIVATE, principal=coder, fresh=True) == {"v": 1}


def test_settled_through_an_id_ignores_what_is_pending_after_it(
    make_mem: MakeMem, coder: Principal, raw_redis: redis.Redis
) -> None:
    # settle() waits through the last entry when it was called: a look at every pending
    # entry, not those up to that id, also waited for writes made after the call, for
    # good under steady writes or a dead consumer holding a later one.
    from dualmem.worker import settled_through

    writer = make_mem(worker=False)
    stream = writer.layout.stream(0)
    first = writer.put("a", 1, level=Level.SWARM, principal=coder)
    w = worker_of(writer, "w")
    assert w.step() == 1
    later = writer.put("b", 2, level=Level.SWARM, principal=coder)
    raw_redis.xreadgroup(writer.settings.group, "dead", {stream: ">"}, count=1)  # never acked
    assert settled_through(raw_redis, stream, writer.settings.group, first.stream_id)
    assert not settled_through(raw_redis, stream, writer.settings.group, later.stream_id)


def test_settle_waits_for_every_earlier_write_of_any_object_on_every_shard(
    make_mem: MakeMem, coder: Principal
) -> None:
    writer = make_mem(worker=False, shards=4)
    for i in range(60):
        writer.put(f"k{i:02d}", i, level=Level.SWARM, principal=coder)
    with pytest.raises(NotPersisted, match=r"not settled within 0\.2s"):
        writer.settle(timeout=0.2)  # no worker anywhere yet
    reader = make_mem(shards=4)
    reader.settle(timeout=10)
    keys = [r.key for r in reader.query(principal=coder, level=Level.SWARM)]
    assert keys == [f"k{i:02d}" for i in range(60)]
    writer.delete("k00", level=Level.SWARM, principal=coder)
    writer.settle(timeout=10)  # reader's worker persists for it
    assert reader.get("k00", level=Level.SWARM, principal=coder) is None
    with pytest.raises(ValidationError):
        reader.settle(timeout=-1)


def test_settle_with_nothing_in_redis_returns_without_a_worker(
    make_mem: MakeMem, coder: Principal
) -> None:
    # A shard whose stream holds no command has nothing to wait for: settle() returns at
    # once, even with no worker anywhere, and a shard that holds one is still waited for.
    mem = make_mem(worker=False, shards=2)
    mem.settle(timeout=0)
    mem.put("k", 1, level=Level.SWARM, principal=coder)
    with pytest.raises(NotPersisted, match=r"not settled within 0s") as info:
        mem.settle(timeout=0)
    (shard,) = [s for s, n in mem.backlog().items() if n]
    assert f"[({shard}, " in str(info.value)  # the shard written to, only


def test_a_ttl_too_large_for_a_float_and_a_key_that_cannot_travel_are_refused(
    make_mem: MakeMem, coder: Principal
) -> None:
    # put(ttl=10**400) raised a bare OverflowError; authorize(key=...) never checked its
    # key: a lone surrogate raised UnicodeEncodeError with no audit row for the denial,
    # and bytes were sent in the audit command and dead-lettered.
    mem = make_mem(worker=False)
    with pytest.raises(ValidationError, match="ttl"):
        mem.put("k", 1, level=Level.SWARM, principal=coder, ttl=10**400)
    for key in ("\ud800", b"k", "a\x00b"):
        with pytest.raises(ValidationError, match="key"):
            mem.authorize(coder, Level.PRIVATE, scope="agent:other", key=key)  # type: ignore[arg-type]
    assert sum(mem.backlog().values()) == 0  # nothing sent


def test_sync_refuses_a_receipt_built_by_hand_with_fields_that_cannot_be_looked_up(
    make_mem: MakeMem,
) -> None:
    # shard 2**64 raised a bare OverflowError from SQLite; a lone surrogate in the stream
    # id a UnicodeEncodeError.
    mem = make_mem(worker=False)
    for shard, sid in ((2**64, "1-0"), (-1, "1-0"), (0, "\ud800"), (0, 5)):
        with pytest.raises(ValidationError, match="receipt"):
            mem.sync(Receipt(shard, sid, "s", "k", "put"), timeout=0)  # type: ignore[arg-type]
    # Not a Receipt at all (a stream id, a tuple): named as such, not an AttributeError.
    for bad in ("1-0", (0, "1-0")):
        with pytest.raises(ValidationError, match=r"sync\(\) takes the Receipt"):
            mem.sync(bad, timeout=0)  # type: ignore[arg-type]
