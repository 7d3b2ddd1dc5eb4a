"""SQLiteStore on real SQLite files: idempotent apply, ordering, expiry, schema versions."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from acl import ConfigurationError, Level
from dualmem.batch import GENESIS, chain_hash, journal_hash_values
from dualmem.commands import (
    audit_fields,
    delete_fields,
    put_fields,
    replay_fields,
    reseal_fields,
    sid_of,
)
from dualmem.errors import StoreUnavailable
from dualmem.migrations import SCHEMA_VERSION, migrate
from dualmem.ops.verify import verify_database
from dualmem.settings import Settings
from dualmem.sqlite_store import METRICS_KEPT_MS, SQLiteStore, prefix_upper_bound
from dualmem.store import Store, StreamEntry

from .conftest import REFUSED, refuse_inserts
from .conftest import redis_fields as raw


def put(
    ms: int,
    key: str = "k",
    value: bytes = b"v",
    scope: str = "swarm:s",
    expires_at: int | None = None,
) -> StreamEntry:
    f = put_fields(
        scope,
        key,
        Level.SWARM if scope.startswith("swarm") else Level.PRIVATE,
        "a",
        ms * 1000,
        b"\x01\x00" + value,
        expires_at,
    )
    return StreamEntry(0, f"{ms}-0", raw(f))


def delete(ms: int, key: str = "k") -> StreamEntry:
    return StreamEntry(
        0, f"{ms}-0", raw(delete_fields("swarm:s", key, Level.SWARM, "a", ms * 1000))
    )


@pytest.fixture
def store(tmp_path: Path) -> SQLiteStore:
    s = SQLiteStore(tmp_path / "m.db")
    yield s  # type: ignore[misc]
    s.close()


def value_of(store: SQLiteStore, key: str = "k", now: int = 0) -> bytes | None:
    row = store.get("swarm:s", key, now)
    # The read path's two-column lookup agrees with the whole row in every test here
    # (expired, deleted, re-created, older puts delivered late).
    slim = store.get_envelope("swarm:s", key, now)
    assert slim == (None if row is None else (row.envelope, row.owner))
    return None if row is None else row.envelope[2:]


def journal_count(store: SQLiteStore) -> int:
    return len(store.changes(["swarm:s", "agent:a"], 0))


def test_apply_is_idempotent(store: SQLiteStore) -> None:
    batch = [put(1, value=b"a"), put(2, key="k2", value=b"b")]
    first = store.apply(batch)
    assert (first.applied, first.duplicates) == (2, 0)
    again = store.apply(batch)
    assert (again.applied, again.duplicates) == (0, 2)
    assert again.notifications == []
    assert journal_count(store) == 2
    assert value_of(store) == b"a"


def test_get_envelope_is_the_live_rows_envelope_and_owner_as_the_base_class_reads_them(
    store: SQLiteStore,
) -> None:
    store.apply([put(1, value=b"a"), put(2, key="gone"), put(3, key="old", expires_at=10)])
    store.apply([delete(4, key="gone")])
    for key, now in [("k", 0), ("gone", 0), ("old", 9), ("old", 10), ("absent", 0)]:
        assert store.get_envelope("swarm:s", key, now) == Store.get_envelope(
            store, "swarm:s", key, now
        )
    assert store.get_envelope("swarm:s", "k", 0) == (b"\x01\x00a", "a")
    assert store.get_envelope("swarm:s", "old", 9) is not None
    assert store.get_envelope("swarm:s", "old", 10) is None
    assert store.get_envelope("swarm:s", "gone", 0) is None
    assert store.get_envelope("swarm:s", "absent", 0) is None


def test_older_command_never_overwrites_newer(store: SQLiteStore) -> None:
    store.apply([put(2, value=b"new")])
    store.apply([put(1, value=b"old")])  # redelivered late (claimed from a dead consumer)
    assert value_of(store) == b"new"
    assert [c.stream_id for c in store.history("swarm:s", "k")] == ["1-0", "2-0"]


def test_tombstone_stops_a_late_put_from_reviving_a_delete(store: SQLiteStore) -> None:
    store.apply([put(1), delete(3)])
    store.apply([put(2, value=b"zombie")])
    assert value_of(store) is None
    store.apply([put(4, value=b"back")])
    assert value_of(store) == b"back"


def test_several_commands_on_one_key_in_one_batch_end_with_the_newest(store: SQLiteStore) -> None:
    store.apply([put(1, value=b"a"), put(2, value=b"b"), delete(3), put(4, value=b"d")])
    assert value_of(store) == b"d"
    row = store.get("swarm:s", "k", 0)
    assert row is not None and row.created_at == 4  # re-created after the delete


def test_a_put_over_an_expired_record_starts_a_new_record(store: SQLiteStore) -> None:
    # A read treats an expired record as gone, like a deleted one: writing the key again
    # is a new record (it kept the expired one's created_at until purge ran).
    store.apply([put(1, expires_at=5), put(10, key="k2", expires_at=50)])
    store.apply([put(6, value=b"again"), put(20, key="k2", value=b"refresh")])
    row, live = store.get("swarm:s", "k", 6), store.get("swarm:s", "k2", 20)
    assert row is not None and (row.created_at, row.updated_at) == (6, 6)
    assert live is not None and (live.created_at, live.updated_at) == (10, 20)


def test_expired_rows_are_invisible_then_purged(store: SQLiteStore) -> None:
    store.apply([put(1, key="short", expires_at=1_000), put(2, key="long")])
    store.apply([put(3, key="next", expires_at=1_001)])  # live for one more millisecond
    assert value_of(store, "short", now=999) == b"v"
    assert value_of(store, "short", now=1_000) is None
    assert [r.key for r in store.query(["swarm:s"], now_ms=1_000)] == ["long", "next"]
    assert store.purge(now_ms=1_000, tombstones_before_ms=0) == 1
    # Purge takes what has expired, never a record still live.
    assert value_of(store, "next", now=1_000) == b"v"


def test_an_expired_row_stays_a_tombstone_so_a_late_older_put_cannot_revive_it(
    store: SQLiteStore,
) -> None:
    store.apply([put(5, value=b"new", expires_at=1_000)])
    assert store.purge(now_ms=1_000, tombstones_before_ms=0) == 1
    # An older put delivered late (a dead consumer's claim, a dead-letter replay): purge
    # used to delete the expired row, and then nothing stopped this one.
    store.apply([put(3, value=b"old")])
    assert value_of(store, now=1_001) is None
    # The tombstone goes after its own TTL, counted from the expiry.
    assert store.purge(now_ms=5_000, tombstones_before_ms=1_000) == 0
    assert store.purge(now_ms=5_000, tombstones_before_ms=1_001) == 1


def test_tombstones_are_purged_after_their_ttl(store: SQLiteStore) -> None:
    store.apply([put(1), delete(2)])
    assert store.purge(now_ms=10, tombstones_before_ms=2) == 0
    assert store.purge(now_ms=10, tombstones_before_ms=3) == 1


def test_a_tombstone_outlives_its_ttl_while_a_dead_letter_of_its_key_waits(
    store: SQLiteStore,
) -> None:
    # A put that failed and was dead-lettered, then a newer put and a delete: replaying
    # the letter after purge dropped the tombstone used to bring the failed value back.
    failed = put(1, value=b"old, failed")
    store.dead_letter([(failed, "poisoned", 3)])
    store.apply([put(2, value=b"newer"), delete(3), put(4, key="other"), delete(5, key="other")])
    assert store.purge(now_ms=10, tombstones_before_ms=6) == 1  # only the other key's
    store.apply([failed])  # the replay (the worker orders it by its original id)
    assert value_of(store) is None
    # Replayed (marked when sent): the command may still be in the stream, so the
    # tombstone stays for a tombstone TTL after the replay, then goes like any other.
    assert store.dead_letter_count() == 1
    store.mark_replayed([d.id for d in store.dead_letters()])
    assert store.dead_letter_count() == 0  # what `stats` and the exporter show
    replayed_at = store.dead_letters(include_replayed=True)[0].replayed_at
    assert replayed_at is not None
    assert store.purge(now_ms=10, tombstones_before_ms=replayed_at) == 0
    assert len(store.dead_letters(include_replayed=True)) == 1  # a letter waiting stays
    # The tombstone goes, and so does the envelope of the letter replayed that long ago
    # (plaintext at levels 3 and 4, kept for good before); the row stays, since sync()
    # on the original receipt follows it to its replay.
    assert store.purge(now_ms=10, tombstones_before_ms=replayed_at + 1) == 2
    assert value_of(store) is None
    (letter,) = store.dead_letters(include_replayed=True)
    assert b"e" not in letter.fields and letter.fields[b"k"] == b"k"
    assert store.purge(now_ms=10, tombstones_before_ms=replayed_at + 1) == 0


def test_a_tombstone_outlives_its_ttl_while_the_replay_of_a_dead_letter_waits(
    store: SQLiteStore,
) -> None:
    # A replay is ordered by its original id, below the tombstone's. Held only for a
    # tombstone TTL after it was sent, a replay still pending after that (its consumer
    # died) found no tombstone when claimed, and brought the failed value back.
    failed = put(1, value=b"old, failed")
    store.dead_letter([(failed, "poisoned", 3)])
    store.apply([put(2, value=b"newer"), delete(3)])
    store.mark_replayed([d.id for d in store.dead_letters()], ["9-0"])
    replayed_at = store.dead_letters(include_replayed=True)[0].replayed_at
    assert replayed_at is not None
    assert store.purge(now_ms=10, tombstones_before_ms=replayed_at + 1) == 0
    (letter,) = store.dead_letters(include_replayed=True)
    assert b"e" in letter.fields  # its envelope stays too: it may be replayed again
    store.apply([StreamEntry(0, "9-0", {**failed.fields, b"o": b"1-0"})])  # claimed late
    assert value_of(store) is None
    # Committed: the replay has done its work, and the tombstone goes like any other.
    assert store.purge(now_ms=10, tombstones_before_ms=replayed_at + 1) == 2
    # A key rotation's re-encryption, dead-lettered and replayed, journals nothing when
    # it commits: it held its key's tombstone and envelope for good. It changes no value
    # (an UPDATE guarded by the row's id), so it holds nothing, as an audit event's.
    reseal = StreamEntry(
        0,
        "15-0",
        raw(reseal_fields("swarm:s", "r", Level.SWARM, "a", 15_000, b"\x01\x00v", sid_of("14-0"))),
    )
    store.dead_letter([(reseal, "poisoned", 3)])
    store.apply([put(16, key="r"), delete(17, key="r")])
    store.mark_replayed([d.id for d in store.dead_letters()], ["18-0"])
    later = max(d.replayed_at or 0 for d in store.dead_letters(include_replayed=True))
    assert store.purge(now_ms=10, tombstones_before_ms=later + 1) == 2  # tombstone, envelope
    # An audit event's dead letter, replayed, holds no tombstone (it changes no record).
    audit = StreamEntry(0, "20-0", {b"op": b"audit", b"s": b"swarm:s", b"k": b"a", b"t": b"20"})
    store.dead_letter([(audit, "poisoned", 3)])
    store.apply([put(21, key="a"), delete(22, key="a")])
    store.mark_replayed([d.id for d in store.dead_letters()], ["30-0"])
    later = max(d.replayed_at or 0 for d in store.dead_letters(include_replayed=True))
    assert store.purge(now_ms=10, tombstones_before_ms=later + 1) == 1


def test_purge_keeps_a_replayed_letter_that_sync_follows(store: SQLiteStore) -> None:
    # Deleting the replayed letter broke the chain sync() follows: a receipt whose
    # replay was dead-lettered again said "not committed (is a worker running?)".
    first = put(1, value=b"poison")
    store.dead_letter([(first, "poisoned", 3)])
    (letter,) = store.dead_letters()
    store.mark_replayed([letter.id], ["7-0"])
    store.dead_letter([(StreamEntry(0, "7-0", first.fields), "poisoned", 3)])
    assert store.status(0, "1-0") == "dead"
    replayed_at = store.dead_letters(include_replayed=True)[0].replayed_at
    assert replayed_at is not None
    store.purge(now_ms=10, tombstones_before_ms=replayed_at + 1)
    assert store.status(0, "1-0") == "dead"


@pytest.mark.parametrize("prefix", ["a%", "a_", "a*", "a[", "a'", "é", "a\U0010ffff", "\uffff"])
def test_prefix_query_treats_metacharacters_literally(store: SQLiteStore, prefix: str) -> None:
    keys = [prefix + "1", prefix + "2", prefix, "a", "ab", "b", prefix[:-1] + "zz"]
    store.apply([put(i + 1, key=k) for i, k in enumerate(dict.fromkeys(keys))])
    got = [r.key for r in store.query(["swarm:s"], now_ms=0, prefix=prefix)]
    assert got == sorted(k for k in dict.fromkeys(keys) if k.startswith(prefix))


def test_prefix_upper_bound() -> None:
    assert prefix_upper_bound("ab") == "ac"
    assert prefix_upper_bound("a\U0010ffff") == "b"
    assert prefix_upper_bound("\ud7ff") == "\ue000"
    assert prefix_upper_bound("\U0010ffff") is None


def test_query_filters_by_scope_time_and_limit(store: SQLiteStore) -> None:
    store.apply([put(i, key=f"k{i}") for i in range(1, 11)])
    store.apply([put(20, key="mine", scope="agent:a")])
    assert len(store.query(["swarm:s"], now_ms=0)) == 10
    assert [r.key for r in store.query(["agent:a"], now_ms=0)] == ["mine"]
    assert [r.key for r in store.query(["swarm:s"], now_ms=0, since=3, until=5)] == ["k3", "k4"]
    assert len(store.query(["swarm:s"], now_ms=0, limit=3)) == 3
    assert store.query([], now_ms=0) == []


def test_a_page_after_a_key_below_the_prefix_stays_under_the_prefix(store: SQLiteStore) -> None:
    # ``after`` names where the last page ended; one that sorts below the prefix (a page
    # of another query, or a hand-made one) must not widen the range to the keys between.
    keys = ["a", "a/1", "b", "b/1", "b/2", "b0", "c"]
    store.apply([put(i, key=k) for i, k in enumerate(keys, start=1)])
    page = store.query(["swarm:s"], now_ms=0, prefix="b/", after=("swarm:s", "a/1"))
    assert [r.key for r in page] == ["b/1", "b/2"]
    page = store.query(["swarm:s"], now_ms=0, prefix="b/", after=("swarm:s", "b/1"))
    assert [r.key for r in page] == ["b/2"]
    page = store.query(["swarm:s"], now_ms=0, prefix="b/", after=("swarm:s", "b0"))
    assert page == []


def test_one_failing_entry_does_not_fail_the_batch(store: SQLiteStore, tmp_path: Path) -> None:
    refuse_inserts(tmp_path / "m.db", "NEW.key = 'poison'")
    result = store.apply([put(1, key="a"), put(2, key="poison"), put(3, key="b")])
    assert result.applied == 2
    assert [(e.stream_id, REFUSED in why) for e, why in result.failed] == [("2-0", True)]
    assert {e.stream_id for e in result.done} == {"1-0", "3-0"}
    assert [c.key for c in store.changes(["swarm:s"], 0)] == ["a", "b"]
    assert store.status(0, "2-0") is None


def test_journal_hash_chain_spans_batches(store: SQLiteStore, tmp_path: Path) -> None:
    store.apply([put(1), put(2)])
    store.apply([put(3)])
    with sqlite3.connect(tmp_path / "m.db") as conn:
        rows = conn.execute(
            "SELECT seq, shard, stream_id, sid, op, scope, key, level, actor, ts, committed_at, "
            "prev_hash, hash FROM journal ORDER BY seq"
        ).fetchall()
    prev = GENESIS
    for row in rows:
        assert row[-2] == prev
        assert row[-1] == chain_hash(prev, journal_hash_values(row[:-2]))
        prev = row[-1]


def test_audit_log_is_append_only(store: SQLiteStore, tmp_path: Path) -> None:
    f = audit_fields("access_denied", actor="x", ts_us=1, risk="high", scope="agent:y")
    store.apply([StreamEntry(0, "9-0", raw(f))])
    assert [a.event for a in store.audit_log()] == ["access_denied"]
    with sqlite3.connect(tmp_path / "m.db") as conn:
        for sql in ("UPDATE audit_log SET actor = 'nobody'", "DELETE FROM audit_log"):
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                conn.execute(sql)


def test_dead_letters_and_status(store: SQLiteStore) -> None:
    e = StreamEntry(0, "5-0", {b"op": b"junk", b"\xff": b"\x00\x01"})
    store.dead_letter([(e, "malformed", 3)])
    assert store.status(0, "5-0") == "dead"
    (dl,) = store.dead_letters()
    assert (dl.fields, dl.error, dl.deliveries) == (e.fields, "malformed", 3)
    # A dead letter is a command that will not commit: a medium risk for whoever reads
    # the audit log by risk (as a low one it was filed with routine events).
    last = store.audit_log()[-1]
    assert (last.event, last.risk) == ("dead_letter", "medium")
    store.mark_replayed([dl.id])
    assert store.dead_letters() == []
    assert store.status(0, "5-0") is None


def test_a_replayed_letter_dead_lettered_again_stays_replayed(store: SQLiteStore) -> None:
    # A worker died between committing the dead letter and its XACK; another claimed the
    # entry after `dlq replay` ran and dead-lettered it again: the letter was listed as
    # waiting again, sync() on its receipt said dead, and a second replay sent it twice.
    poison = StreamEntry(0, "5-0", {b"op": b"junk"})
    store.dead_letter([(poison, "malformed", 3)])
    (dl,) = store.dead_letters()
    store.apply([put(7)])  # the replay, committed under its new stream id
    store.mark_replayed([dl.id], ["7-0"])
    store.dead_letter([(poison, "malformed again", 4)])
    assert store.dead_letters() == []
    (again,) = store.dead_letters(include_replayed=True)
    assert again.id == dl.id and again.replayed_at is not None
    assert (again.error, again.deliveries) == ("malformed again", 4)
    assert store.status(0, "5-0") == "committed"
    assert [a.event for a in store.audit_log()].count("dead_letter") == 2


def replay_chain(store: SQLiteStore, first: int, letters: int) -> str:
    """Dead-letter ``first-0`` and replay it, the replay dead-lettered and replayed again,
    ``letters`` dead letters in all (each replayed as the next id): the last replay's id."""
    fields = put(first).fields
    for ms in range(first, first + letters):
        store.dead_letter([(StreamEntry(0, f"{ms}-0", fields), "poisoned", 3)])
        (letter,) = store.dead_letters()
        store.mark_replayed([letter.id], [f"{ms + 1}-0"])
    return f"{first + letters}-0"


def test_status_follows_replays_sixteen_dead_letters_deep(store: SQLiteStore) -> None:
    # 15 dead letters: the 16th id looked at is the replay that committed.
    store.apply([StreamEntry(0, replay_chain(store, 100, 15), put(100).fields)])
    assert store.status(0, "100-0") == "committed"
    # 16: the replay after the 16th is not looked at (dead-lettered itself here).
    last = replay_chain(store, 200, 16)
    store.dead_letter([(StreamEntry(0, last, put(200).fields), "poisoned", 3)])
    assert store.status(0, "200-0") is None
    assert store.status(0, "201-0") == "dead"


def test_status_of_a_command_committed_and_dead_lettered_is_committed(
    store: SQLiteStore,
) -> None:
    store.apply([put(3)])
    store.dead_letter([(put(3), "failed on another worker", 3)])
    assert store.status(0, "3-0") == "committed"


def test_status_finds_a_replay_from_before_schema_4_by_its_original_sid(
    store: SQLiteStore,
) -> None:
    first = put(1, value=b"poison")
    store.dead_letter([(first, "poisoned", 3), (StreamEntry(1, "1-0", first.fields), "x", 3)])
    store.mark_replayed([d.id for d in store.dead_letters()])  # no replayed_as: schema 3
    assert store.status(0, "1-0") is None
    store.apply([StreamEntry(0, "9-0", replay_fields(first.fields, "1-0"))])
    assert store.status(0, "1-0") == "committed"
    assert store.status(1, "1-0") is None  # the journal row is shard 0's


def test_metrics_snapshots(store: SQLiteStore) -> None:
    snap = {"read": {"count": 3, "p50": 1.0, "p95": 2.0, "p99": 3.0, "max": 4.0}}
    store.record_metrics(1, "w1", snap)
    store.record_metrics(2, "w1", {"read": {**snap["read"], "count": 5}})
    assert store.latest_metrics()["w1"]["read"]["count"] == 5
    # Only the latest snapshot of each source is kept, and a source silent for a day
    # goes (the table grew by a snapshot per worker per interval, and every worker that
    # ever ran was listed for ever).
    store.record_metrics(3, "w2", snap)
    day = METRICS_KEPT_MS
    store.record_metrics(day + 2, "w1", snap)
    assert set(store.latest_metrics()) == {"w1", "w2"}
    store.record_metrics(day + 4, "w1", snap)
    assert set(store.latest_metrics()) == {"w1"}
    rows = store._conn().execute("SELECT DISTINCT ts FROM metrics").fetchall()
    assert rows == [(day + 4,)]


def test_a_db_path_that_cannot_be_created_is_a_configuration_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A regular file where the database's directory must be raised a raw FileExistsError
    # (or NotADirectoryError), an unwritable parent a raw PermissionError: not DualMemErrors.
    (tmp_path / "afile").write_text("")
    for path in (tmp_path / "afile" / "x.db", tmp_path / "afile" / "sub" / "x.db"):
        with pytest.raises(ConfigurationError) as exc:
            SQLiteStore(path)
        assert str(exc.value) == (
            f"db_path {path} cannot be used: {tmp_path / 'afile'} is not a directory"
        )
        assert isinstance(exc.value.__cause__, OSError)

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "mkdir", refuse)  # root may write anywhere: pretend
    with pytest.raises(ConfigurationError, match=r"cannot create its directory .*Permission"):
        SQLiteStore(tmp_path / "new" / "x.db")
    monkeypatch.undo()
    monkeypatch.setattr("dualmem.sqlite_store.os.open", refuse)
    with pytest.raises(ConfigurationError, match=r"x\.db cannot be created: Permission denied"):
        SQLiteStore(tmp_path / "x.db")


def test_schema_is_versioned_and_migrations_are_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "v.db"
    SQLiteStore(path).close()
    with sqlite3.connect(path, isolation_level=None) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert migrate(conn) == []
    conn.close()


def test_newer_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    SQLiteStore(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(ConfigurationError, match="newer than this dualmem supports"):
        SQLiteStore(path)


def test_downgrade_is_refused(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "d.db", isolation_level=None)
    migrate(conn)
    with pytest.raises(ConfigurationError, match="downgrade"):
        migrate(conn, target=0)
    conn.close()


@pytest.mark.parametrize(("mode", "number"), [("NORMAL", 1), ("full", 2)])
def test_synchronous_mode_comes_from_settings(tmp_path: Path, mode: str, number: int) -> None:
    store = SQLiteStore.from_settings(
        Settings.load({"db_path": str(tmp_path / "s.db"), "sqlite_synchronous": mode})
    )
    try:
        assert store._conn().execute("PRAGMA synchronous").fetchone()[0] == number
    finally:
        store.close()
    with pytest.raises(ConfigurationError, match="sqlite_synchronous"):
        Settings.load({"sqlite_synchronous": "SOMETIMES"})


def test_the_write_connection_gets_the_configured_page_cache(tmp_path: Path) -> None:
    settings = Settings.load({"db_path": str(tmp_path / "c.db"), "sqlite_cache_mb": 16})
    store = SQLiteStore.from_settings(settings)
    try:
        with store._write() as conn:
            assert conn.execute("PRAGMA cache_size").fetchone()[0] == -16 * 1024
    finally:
        store.close()
    with pytest.raises(ConfigurationError, match="sqlite_cache_mb"):
        Settings.load({"sqlite_cache_mb": 0})


def _at(stream_id: str, value: bytes, key: str = "k") -> StreamEntry:
    entry = put(1, key, value)
    return StreamEntry(0, stream_id, entry.fields)


def test_ids_past_the_old_integer_packing_are_applied_in_order(
    store: SQLiteStore, tmp_path: Path
) -> None:
    # The ordering id was ms << 22 | seq in one integer: a stream id past 4,194,303 in one
    # millisecond (Redis counts seq up while its clock is behind the stream) was refused
    # as out of range and dead-lettered, and so was every id after September 2039.
    ms = 1_700_000_000_000
    for stream_id, value in [
        (f"{ms}-4194303", b"a"),
        (f"{ms}-4194304", b"b"),
        (f"{ms}-18446744073709551615", b"c"),
        (f"{ms + 1}-0", b"d"),
        (f"{1 << 41}-0", b"e"),  # September 2039
        (f"{(1 << 41) + 1}-5000000", b"f"),
    ]:
        result = store.apply([_at(stream_id, value)])
        assert result.failed == [] and value_of(store) == value, stream_id
    # Late, older commands still lose, also against ids past the old packing.
    store.apply([_at(f"{ms}-9000000", b"late"), _at(f"{1 << 41}-1", b"late", key="j")])
    assert value_of(store) == b"f" and value_of(store, "j") == b"late"
    assert store.max_sid(0) == sid_of(f"{(1 << 41) + 1}-5000000")
    with sqlite3.connect(tmp_path / "m.db") as conn:
        assert all(c.ok for c in verify_database(conn)), [c for c in verify_database(conn)]
    conn.close()


def test_a_reseal_sent_before_schema_4_still_applies(store: SQLiteStore) -> None:
    # A reseal command in the stream (or a dead letter) across the upgrade carries its
    # guard as the old integer.
    fields = reseal_fields("agent:a", "k", Level.PRIVATE, "rot", 6, b"\x01\x00new", sid_of("5-0"))
    assert raw(fields)[b"g"] == b"5-0"  # what is sent now
    legacy = {**raw(fields), b"g": str(5 << 22).encode()}  # what was sent before
    store.apply([put(5, value=b"old-key", scope="agent:a")])
    result = store.apply([StreamEntry(0, "6-0", legacy)])
    assert result.failed == []
    row = store.get("agent:a", "k", 0)
    assert row is not None and row.envelope == b"\x01\x00new"


def test_a_new_database_and_its_wal_are_private(tmp_path: Path) -> None:
    # Created with the umask (0644 here): any user could read levels 3 and 4, and
    # `dualmem doctor` warned about the demo's own database.
    import os
    import stat

    old = os.umask(0o022)
    try:
        store = SQLiteStore(tmp_path / "new.db")
        store.apply([put(1)])
        for name in ("new.db", "new.db-wal", "new.db-shm"):
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
        store.close()
        existing = tmp_path / "existing.db"
        existing.touch(mode=0o640)
        SQLiteStore(existing).close()
        assert stat.S_IMODE(existing.stat().st_mode) == 0o640  # an existing file is kept
    finally:
        os.umask(old)


def test_holds_sealed_rows_counts_dead_letters_waiting_at_an_encrypted_level(
    tmp_path: Path,
) -> None:
    # Only the memory table was read: a database whose sealed data was all in dead
    # letters got a new embedded key, and those letters could not be replayed.
    from dualmem.sqlite_store import holds_sealed_rows

    db = tmp_path / "m.db"
    store = SQLiteStore(db)
    plain = StreamEntry(0, "1-0", {b"op": b"put", b"l": b"3", b"e": b"\x01{}"})
    no_level = StreamEntry(0, "1-1", {b"op": b"put", b"e": b"junk"})
    comma = StreamEntry(0, "1-2", {b"op": b"put", b"l": b",", b"e": b"junk"})
    store.dead_letter([(plain, "boom", 3), (no_level, "malformed", 3), (comma, "malformed", 3)])
    assert not holds_sealed_rows(db)  # plaintext or no level: nothing a key is needed for
    sealed = StreamEntry(0, "2-0", {b"op": b"put", b"l": b"1", b"e": b"\x01sealed"})
    store.dead_letter([(sealed, "boom", 3)])
    assert holds_sealed_rows(db)
    (letter,) = [d for d in store.dead_letters() if d.stream_id == "2-0"]
    store.mark_replayed([letter.id])
    assert not holds_sealed_rows(db)  # replayed: its command is back in the stream
    # A delete waiting at an encrypted level has no envelope: no key is needed to replay
    # it (counted anyway, a lost key file refused a database holding nothing sealed).
    gone = StreamEntry(0, "3-0", {b"op": b"del", b"l": b"1", b"s": b"agent:a", b"k": b"k"})
    store.dead_letter([(gone, "boom", 3)])
    assert not holds_sealed_rows(db)
    # A letter whose stored fields do not decode cannot be told apart: as if sealed (a
    # new key would be made for a database that may hold data only the lost one opens).
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("UPDATE dead_letters SET fields = 'not json' WHERE stream_id = '3-0'")
    assert holds_sealed_rows(db)
    store.close()


def test_a_finished_threads_connection_is_closed(store: SQLiteStore) -> None:
    # Each thread that ever read kept its connection (two file descriptors) until close():
    # a program running each task in a new thread ran out of descriptors.
    store.apply([put(1)])
    before = len(os.listdir("/proc/self/fd")), len(store._conns)
    seen: list[bytes | None] = []
    for _ in range(300):
        t = threading.Thread(target=lambda: seen.append(value_of(store)))
        t.start()
        t.join()
    assert seen == [b"v"] * 300
    assert len(store._conns) <= before[1] + 1
    assert len(os.listdir("/proc/self/fd")) <= before[0] + 4
    # A thread still running keeps its connection, and close() closes it.
    opened, release = threading.Event(), threading.Event()

    def hold() -> None:
        value_of(store)
        opened.set()
        release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    opened.wait(10)
    (conn,) = set(store._conns) - {store._conn()}
    store.close()
    with pytest.raises(sqlite3.ProgrammingError):
        conn.execute("SELECT 1")
    release.set()
    holder.join()


# -- found by mutating sqlite_store -----------------------------------------------------------


def test_a_redelivered_audit_event_is_a_duplicate(store: SQLiteStore) -> None:
    # Audit events are looked up in audit_log, puts and deletes in the journal. Looked up
    # in the journal alone, an audit event delivered again (a worker died between the
    # commit and its XACK) hit audit_log's unique stream id and was dead-lettered.
    f = audit_fields("access_denied", actor="x", ts_us=1, risk="high", scope="agent:y")
    batch = [StreamEntry(0, "9-0", raw(f)), put(10)]
    assert store.apply(batch).failed == []
    again = store.apply(batch)
    assert (again.applied, again.duplicates, again.failed) == (0, 2, [])
    assert [a.event for a in store.audit_log()] == ["access_denied"]


def test_a_redelivered_batch_past_500_entries_is_all_duplicates(store: SQLiteStore) -> None:
    # Stream ids are looked up 500 at a time (SQLite's bound on parameters). Only the
    # first 500 looked up, the rest of a redelivered batch met the journal's unique
    # stream id, failed, and was dead-lettered although it was committed.
    batch = [put(i, key=f"k{i}") for i in range(1, 1202)]
    assert store.apply(batch).applied == 1201
    again = store.apply(batch)
    assert (again.applied, again.duplicates, again.failed) == (0, 1201, [])


def test_the_slow_path_plans_again_under_its_own_write_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A batch with a failing entry is applied again entry by entry, under a new write
    # lock. Another worker may commit some of its entries in between (it claimed them
    # from this one): planned again, they are duplicates; with the first plan they were
    # applied a second time, met the unique stream id and were dead-lettered.
    path = tmp_path / "m.db"
    mine, other = SQLiteStore(path), SQLiteStore(path)
    try:
        refuse_inserts(path, "NEW.key = 'poison'")
        batch = [put(1, key="a"), put(2, key="poison"), put(3, key="b")]
        write, locks = mine._write, [0]

        @contextlib.contextmanager
        def then_the_other_commits() -> Iterator[sqlite3.Connection]:
            locks[0] += 1
            if locks[0] == 2:  # between the failed batch and the slow path
                assert other.apply([batch[0]]).applied == 1
            with write() as conn:
                yield conn

        monkeypatch.setattr(mine, "_write", then_the_other_commits)
        result = mine.apply(batch)
        assert locks[0] == 2
        assert [e.stream_id for e, _ in result.failed] == ["2-0"]
        assert (result.applied, result.duplicates) == (1, 1)
        assert [c.key for c in mine.changes(["swarm:s"], 0)] == ["a", "b"]
    finally:
        mine.close()
        other.close()


def test_a_page_after_a_key_never_holds_more_than_its_limit(store: SQLiteStore) -> None:
    # A page after (scope, key) reads the rest of that scope, then the scopes after it,
    # for what the limit leaves: asked again for the whole limit, the later scopes made
    # the page longer than asked.
    store.apply([put(i, key=f"a{i}", scope="agent:a") for i in range(1, 4)])
    store.apply([put(i, key=f"s{i}") for i in range(4, 8)])
    page = store.query(["agent:a", "swarm:s"], now_ms=0, limit=3, after=("agent:a", "a2"))
    assert [r.key for r in page] == ["a3", "s4", "s5"]


def test_changes_are_those_after_since(store: SQLiteStore) -> None:
    # changes(since=N) is every change after seq N: the change at N came again.
    store.apply([put(1, key="a"), put(2, key="b"), put(3, key="c")])
    first = store.changes(["swarm:s"], 0)
    assert [c.key for c in store.changes(["swarm:s"], first[0].seq)] == ["b", "c"]
    assert [c.key for c in store.changes(["swarm:s"], first[0].seq, limit=1)] == ["b"]


def test_max_sid_compares_stream_ids_as_numbers_in_every_table(store: SQLiteStore) -> None:
    # Compared as text, "9-0" came after "10-0": a worker that recreated its consumer
    # group after Redis lost its data started the new stream below ids already used.
    f = audit_fields("access_denied", actor="x", ts_us=1, risk="high", scope="agent:y")
    store.apply([StreamEntry(0, sid, raw(f)) for sid in ("9-0", "10-0")])
    assert store.max_sid(0) == sid_of("10-0")
    store.dead_letter([(StreamEntry(1, sid, {b"op": b"junk"}), "x", 3) for sid in ("9-5", "10-1")])
    assert store.max_sid(1) == sid_of("10-1")
    # Each shard's own ids only: another shard's raised this stream past its own clock.
    assert store.max_sid(0) == sid_of("10-0")


def test_purge_keeps_a_tombstone_at_the_floor(store: SQLiteStore) -> None:
    # The floor is the oldest command still unacknowledged: a tombstone at or above it
    # stays (Store.purge), also the one whose own delete is that command.
    store.apply([put(4), delete(5)])
    assert store.purge(100, 100, floor=sid_of("5-0")) == 0
    assert store.purge(100, 100, floor=sid_of("5-1")) == 1


# -- found by mutating sqlite_store, second check ------------------------------------------


def test_a_page_after_a_scope_not_asked_for_reads_none_of_it(store: SQLiteStore) -> None:
    # ``scopes`` are the ones acl authorized; ``after`` comes from the caller unchecked
    # (DualMemory.query passes it through). Without the check that the after scope is
    # one of them, a page after ("agent:other", "") read another agent's private rows.
    store.apply([put(1, key="secret", scope="agent:other"), put(2, key="shared")])
    page = store.query(["swarm:s"], now_ms=0, after=("agent:other", ""))
    assert [(r.scope, r.key) for r in page] == [("swarm:s", "shared")]
    # An after scope sorting past every asked one: the page is empty, not the other's.
    store.apply([put(3, key="late", scope="zzz:other")])
    assert store.query(["swarm:s"], now_ms=0, after=("zzz:other", "")) == []


def test_a_page_after_the_prefix_itself_leaves_that_key_out(store: SQLiteStore) -> None:
    # A key may equal the prefix, and a page can end on it. The seek starts after the
    # after key when it is at or above the prefix: started at the prefix instead, the
    # next page began with the key the page before ended on (query_all read it twice).
    store.apply([put(i, key=k) for i, k in enumerate(["a", "b", "b1", "b2", "c"], start=1)])
    page = store.query(["swarm:s"], now_ms=0, prefix="b", after=("swarm:s", "b"))
    assert [r.key for r in page] == ["b1", "b2"]


def test_a_put_at_the_very_ms_its_key_expired_starts_a_new_record(store: SQLiteStore) -> None:
    # A record is gone from its expires_at on (reads see it live while now < expires_at),
    # so a put at that very millisecond writes a new record: compared strictly, it kept
    # the expired record's created_at.
    store.apply([put(1, expires_at=5)])
    assert value_of(store, now=5) is None
    store.apply([put(5, value=b"new")])
    row = store.get("swarm:s", "k", 5)
    assert row is not None and (row.created_at, row.updated_at) == (5, 5)


def test_changes_come_in_commit_order_not_stream_order(store: SQLiteStore) -> None:
    # The change feed is read by seq (a subscriber resumes after the last seq it saw).
    # An older command delivered late commits after a newer one: read in sid order, it
    # came before the change committed first, and a feed paged by seq went backwards.
    store.apply([put(2, key="new")])
    store.apply([put(1, key="late")])  # claimed late from a dead consumer
    feed = store.changes(["swarm:s"], 0)
    assert [c.key for c in feed] == ["new", "late"]
    assert [c.seq for c in feed] == sorted(c.seq for c in feed)


def test_the_audit_log_reads_after_its_id_and_keeps_its_limit(store: SQLiteStore) -> None:
    # audit_log(since_id) is what a reader reads after the last row it saw, at most
    # `limit` rows: the row at since_id came again, and the limit was not kept.
    events = [
        StreamEntry(0, f"{ms}-0", raw(audit_fields(e, actor="x", ts_us=ms, risk="low")))
        for ms, e in [(1, "one"), (2, "two"), (3, "three")]
    ]
    store.apply(events)
    first = store.audit_log()
    assert [a.event for a in first] == ["one", "two", "three"]
    assert [a.event for a in store.audit_log(first[0].id)] == ["two", "three"]
    assert [a.event for a in store.audit_log(first[0].id, limit=1)] == ["two"]


def test_a_record_history_keeps_its_limit(store: SQLiteStore) -> None:
    # history(limit=n) is the record's OLDEST n changes (DualMemory.history's promise):
    # without the limit every change came back.
    store.apply([put(1, value=b"a"), put(2, value=b"b"), delete(3), put(4, value=b"c")])
    assert [c.stream_id for c in store.history("swarm:s", "k", limit=2)] == ["1-0", "2-0"]
    assert len(store.history("swarm:s", "k")) == 4


def test_purge_never_takes_a_live_record(store: SQLiteStore) -> None:
    # Only tombstones go after their TTL: without the envelope check, every record last
    # written before the tombstone cutoff (a day ago by default) was deleted as well.
    store.apply([put(1, key="live"), put(2, key="gone"), delete(3, key="gone")])
    assert store.purge(now_ms=10, tombstones_before_ms=10) == 1
    assert value_of(store, "live") == b"v"


def test_purge_does_at_most_limit_rows_of_each_kind_per_call(store: SQLiteStore) -> None:
    # The worker purges inside its write lock, between batches: `limit` bounds that
    # pause (dualmem purge calls again until nothing is left). Unbounded, a day of
    # expiries held every commit back while it ran.
    store.apply([put(i, key=f"e{i}", expires_at=5) for i in range(1, 4)])
    assert store.purge(now_ms=5, tombstones_before_ms=0, limit=2) == 2
    assert store.purge(now_ms=5, tombstones_before_ms=0, limit=2) == 1
    assert store.purge(now_ms=6, tombstones_before_ms=6, limit=2) == 2  # tombstones now
    assert store.purge(now_ms=6, tombstones_before_ms=6, limit=2) == 1
    assert store.purge(now_ms=6, tombstones_before_ms=6, limit=2) == 0


def test_a_letter_whose_replay_was_dead_lettered_again_gives_up_its_envelope(
    store: SQLiteStore,
) -> None:
    # Its replay failed and is a dead letter of its own (which keeps the command): the
    # first letter has settled. Counted as still waiting, it kept the envelope
    # (plaintext at levels 3 and 4) in the file for good.
    first = put(1, value=b"poison")
    store.dead_letter([(first, "poisoned", 3)])
    (letter,) = store.dead_letters()
    store.mark_replayed([letter.id], ["7-0"])
    store.dead_letter([(StreamEntry(0, "7-0", first.fields), "poisoned again", 3)])
    replayed_at = store.dead_letters(include_replayed=True)[0].replayed_at
    assert replayed_at is not None
    assert store.purge(now_ms=10, tombstones_before_ms=replayed_at + 1) == 1
    old, again = store.dead_letters(include_replayed=True)
    assert b"e" not in old.fields and b"e" in again.fields


def test_a_replay_is_settled_only_by_a_commit_in_its_own_shard(store: SQLiteStore) -> None:
    # Each shard's stream hands out its own ids, so another shard may commit the same
    # id. Taken for the replay's commit, it let purge drop the tombstone while the
    # replay still waited, and the replay then brought the failed value back.
    failed = put(1, value=b"old, failed")
    store.dead_letter([(failed, "poisoned", 3)])
    store.apply([put(2, value=b"newer"), delete(3)])
    store.mark_replayed([d.id for d in store.dead_letters()], ["9-0"])
    other = put(9, key="elsewhere")
    store.apply([StreamEntry(1, "9-0", other.fields)])  # shard 1's 9-0, not the replay
    replayed_at = store.dead_letters(include_replayed=True)[0].replayed_at
    assert replayed_at is not None
    assert store.purge(now_ms=10, tombstones_before_ms=replayed_at + 1) == 0
    store.apply([StreamEntry(0, "9-0", {**failed.fields, b"o": b"1-0"})])  # the replay
    assert value_of(store) is None


def test_the_chain_heads_name_only_rows_this_call_committed(
    store: SQLiteStore, tmp_path: Path
) -> None:
    # ApplyResult.*_head is the newest row this call committed, None if none: the worker
    # anchors it in Redis. Set from every plan, an audit-only batch reported the
    # journal's old end, and a slow path whose last entry failed reported (0, GENESIS).
    first = store.apply([put(1)])
    assert first.journal_head is not None and first.audit_head is None
    f = audit_fields("access_denied", actor="x", ts_us=1, risk="high", scope="agent:y")
    audited = store.apply([StreamEntry(0, "2-0", raw(f))])
    assert audited.journal_head is None and audited.audit_head is not None
    refuse_inserts(tmp_path / "m.db", "NEW.key = 'poison'")
    slow = store.apply([put(3, key="a"), put(4, key="poison")])
    assert [e.stream_id for e, _ in slow.failed] == ["4-0"]
    (change,) = store.changes(["swarm:s"], first.journal_head[0])
    assert slow.journal_head == (change.seq, store.journal_hash(change.seq))


def test_a_closed_store_opens_no_new_connection(store: SQLiteStore) -> None:
    # close() leaves the store unusable (Store.close): a thread that read afterwards
    # opened a new connection that nothing would ever close.
    store.apply([put(1)])
    store.close()
    errors: list[BaseException] = []

    def read() -> None:
        try:
            value_of(store)
        except StoreUnavailable as exc:
            errors.append(exc)

    t = threading.Thread(target=read)
    t.start()
    t.join()
    assert [str(e) for e in errors] == [f"store {store.path} is closed"]
    assert store._conns == set()


def test_sealed_rows_page_after_the_row_named(store: SQLiteStore) -> None:
    # Key rotation reads the rows to re-encrypt page by page, each after the last row
    # of the page before: a page that began with that row again made `rotate-keys` read
    # it for ever (the rotation tests hang rather than fail).
    level = int(Level.PRIVATE)
    store.apply([put(i, key=f"k{i}", scope="agent:a") for i in range(1, 4)])
    first = store.sealed_rows([level], limit=2)
    assert [r.key for r in first] == ["k1", "k2"]
    rest = store.sealed_rows([level], after=(first[-1].scope, first[-1].key), limit=2)
    assert [r.key for r in rest] == ["k3"]


def test_the_same_stream_id_in_two_shards_is_two_commands(store: SQLiteStore) -> None:
    # Each shard's stream hands out its own ids, so two shards give out the same one.
    # A command looked up as already applied without its shard was taken for the other
    # shard's and acknowledged unwritten: the put was lost.
    store.apply([put(5, key="a")])
    other = put(5, key="b")
    result = store.apply([StreamEntry(1, "5-0", other.fields)])
    assert (result.applied, result.duplicates) == (1, 0)
    assert value_of(store, "b") == b"v"


def test_status_looks_only_in_the_commands_own_shard(store: SQLiteStore) -> None:
    # sync() asks status(shard, id): another shard's commit or dead letter of the same id
    # said committed (a write not in SQLite yet) or dead (one that will commit).
    store.apply([StreamEntry(1, "5-0", put(5, key="b").fields)])
    store.dead_letter([(StreamEntry(1, "6-0", put(6).fields), "poisoned", 3)])
    assert (store.status(0, "5-0"), store.status(0, "6-0")) == (None, None)
    assert (store.status(1, "5-0"), store.status(1, "6-0")) == ("committed", "dead")


def test_a_replay_from_before_schema_4_is_found_by_its_own_sid(store: SQLiteStore) -> None:
    # A pre-schema-4 replay is found by the journal row of its original sid: any change
    # of the same key (here a newer put) made it look committed before it was.
    first = put(1, value=b"poison")
    store.dead_letter([(first, "poisoned", 3)])
    store.mark_replayed([d.id for d in store.dead_letters()])  # no replayed_as: schema 3
    store.apply([put(2, value=b"newer")])
    assert store.status(0, "1-0") is None
    store.apply([StreamEntry(0, "9-0", replay_fields(first.fields, "1-0"))])
    assert store.status(0, "1-0") == "committed"


def test_sealed_rows_and_holds_sealed_rows_leave_tombstones_out(
    store: SQLiteStore, tmp_path: Path
) -> None:
    # A tombstone has no envelope to re-encrypt or open: listed, key rotation would
    # reseal nothing; counted, a database whose sealed records were all deleted was
    # refused a new embedded key.
    from dualmem.sqlite_store import holds_sealed_rows

    store.apply(
        [
            put(1, scope="agent:a"),
            StreamEntry(0, "2-0", raw(delete_fields("agent:a", "k", Level.PRIVATE, "a", 2000))),
        ]
    )
    assert store.sealed_rows([int(Level.PRIVATE)]) == []
    assert store.count_sealed_rows([int(Level.PRIVATE)]) == 0
    assert not holds_sealed_rows(tmp_path / "m.db")
