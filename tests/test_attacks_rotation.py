"""Attack 11 (key rotation): the reseal command, ``dualmem.rotation`` and ``rotate-keys``.

The store-level tests pin the reseal contract the rotation relies on: a re-encrypted
envelope replaces a row only while the row is still the one the rotation read, so a
concurrent newer put or delete always wins, and replaying it changes nothing.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from acl import Codec, Keyring, Level, Principal, crypto, envelope_key_id
from bench import attacks
from bench.faultkit import FaultEnv
from dualmem import DualMemory, RotationBusy, StoreUnavailable
from dualmem.cli import main
from dualmem.commands import cached_envelope, delete_fields, put_fields, reseal_fields, sid_of
from dualmem.keyuse import KeyLease, key_users, landing_slack, wait_for_key_users
from dualmem.rotation import (
    KeyfileWatcher,
    add_active_key,
    drop_keys,
    keyfile_signature,
    rotate_keys,
)
from dualmem.rotation_lock import RotationLock
from dualmem.settings import Settings
from dualmem.sqlite_store import SQLiteStore
from dualmem.store import StreamEntry

from .conftest import RedisServer, run_cli, wait_until
from .conftest import redis_fields as _raw

MakeMem = Callable[..., DualMemory]

SCOPE = "agent:a"


def put(sid: str, envelope: bytes, key: str = "k") -> StreamEntry:
    return StreamEntry(0, sid, _raw(put_fields(SCOPE, key, Level.PRIVATE, "a", 1, envelope, None)))


def reseal(sid: str, envelope: bytes, guard: str, key: str = "k") -> StreamEntry:
    f = reseal_fields(SCOPE, key, Level.PRIVATE, "rotation", 2, envelope, sid_of(guard))
    return StreamEntry(0, sid, _raw(f))


@pytest.fixture
def store(tmp_path: Path) -> SQLiteStore:
    s = SQLiteStore(tmp_path / "m.db")
    yield s  # type: ignore[misc]
    s.close()


def envelope_of(store: SQLiteStore, key: str = "k") -> bytes | None:
    row = store.get(SCOPE, key, 0)
    return None if row is None else row.envelope


def test_reseal_replaces_the_envelope_and_nothing_else(store: SQLiteStore) -> None:
    store.apply([put("1-0", b"old-key")])
    before = store.get(SCOPE, "k", 0)
    result = store.apply([reseal("2-0", b"new-key", guard="1-0")])
    assert result.applied == 1 and result.notifications == [] and result.failed == []
    after = store.get(SCOPE, "k", 0)
    assert after is not None and before is not None
    assert after.envelope == b"new-key"
    # Same command wrote the same value: stream id, owner and times are kept.
    assert (after.stream_id, after.owner, after.created_at, after.updated_at) == (
        before.stream_id,
        before.owner,
        before.created_at,
        before.updated_at,
    )
    assert [c.stream_id for c in store.history(SCOPE, "k")] == ["1-0"]  # no journal row
    again = store.apply([reseal("2-0", b"new-key", guard="1-0")])  # redelivered
    assert again.failed == [] and envelope_of(store) == b"new-key"


def test_a_reseal_redelivered_or_sent_again_at_its_generation_is_no_failure(
    store: SQLiteStore,
) -> None:
    # A reseal has no journal row, so a redelivery after its commit is applied again; a
    # resumed rotation sends another of the same generation. Both re-encrypt the same
    # write at the same step: neither is dead-lettered. An older generation is.
    codec = Codec(Keyring.generate())
    original = codec.seal({"v": 1}, scope=SCOPE, key="k", level=Level.PRIVATE, owner="a")
    store.apply([put("1-0", original)])
    rotated = Codec(codec.keyring.with_new_key())  # type: ignore[union-attr]
    first = rotated.reseal(original, scope=SCOPE, key="k", level=Level.PRIVATE)
    second = rotated.reseal(original, scope=SCOPE, key="k", level=Level.PRIVATE)
    assert first is not None and second is not None and first != second
    for sid, envelope in [("2-0", first), ("2-0", first), ("3-0", second)]:
        result = store.apply([reseal(sid, envelope, guard="1-0")])
        assert result.failed == [] and envelope_of(store) == envelope
    older = store.apply([reseal("4-0", original, guard="1-0")])
    assert [e.stream_id for e, _ in older.failed] == ["4-0"]
    # The same generation under another key: an aborted rotation's envelope, which would
    # put the row back under a key retired since.
    aborted = Codec(codec.keyring.with_new_key()).reseal(  # type: ignore[union-attr]
        original, scope=SCOPE, key="k", level=Level.PRIVATE
    )
    assert aborted is not None and envelope_key_id(aborted) != envelope_key_id(second)
    refused = store.apply([reseal("5-0", aborted, guard="1-0")])
    assert [e.stream_id for e, _ in refused.failed] == ["5-0"]
    assert envelope_of(store) == second


def test_a_newer_put_always_wins_over_a_reseal(store: SQLiteStore) -> None:
    store.apply([put("1-0", b"v1-old-key")])
    store.apply([put("3-0", b"v2")])  # committed before the reseal arrives
    store.apply([reseal("2-0", b"v1-new-key", guard="1-0")])
    assert envelope_of(store) == b"v2"
    # In one batch, whatever the order of the entries in it.
    store.apply([put("4-0", b"v3", key="j")])
    store.apply([reseal("6-0", b"v3-new-key", guard="4-0", key="j"), put("5-0", b"v4", key="j")])
    assert envelope_of(store, "j") == b"v4"


def test_a_reseal_never_revives_a_deleted_row(store: SQLiteStore) -> None:
    store.apply([put("1-0", b"v1")])
    gone = delete_fields(SCOPE, "k", Level.PRIVATE, "a", 3)
    store.apply([StreamEntry(0, "3-0", _raw(gone))])
    store.apply([reseal("2-0", b"v1-new-key", guard="1-0")])
    assert store.get(SCOPE, "k", 0) is None
    # Nor one that names the tombstone itself as its guard (a reseal planted by whoever
    # can add stream entries, carrying an older envelope of the record): the row is at
    # that stream id, but holds no envelope to re-encrypt.
    store.apply([reseal("4-0", b"v1-planted", guard="3-0")])
    assert store.get(SCOPE, "k", 0) is None


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({b"l": b"3", b"s": b"swarm:s"}, "not encrypted"),
        ({b"g": b"yesterday"}, "not an integer"),
        ({b"g": b"-1"}, "out of range"),
        ({b"e": b""}, "without an envelope"),
    ],
)
def test_malformed_reseals_fail_alone(
    store: SQLiteStore, change: dict[bytes, bytes], why: str
) -> None:
    store.apply([put("1-0", b"v1")])
    bad = reseal("2-0", b"x", guard="1-0")
    entry = StreamEntry(0, "2-0", {**bad.fields, **change})
    result = store.apply([entry, put("3-0", b"v2", key="other")])
    assert len(result.failed) == 1 and why in result.failed[0][1]
    assert envelope_of(store) == b"v1" and envelope_of(store, "other") == b"v2"


# -- nonces ----------------------------------------------------------------------------------


def test_nonces_never_repeat_under_one_key() -> None:
    fig = attacks.nonces(250_000)  # the report runs 1,000,000
    assert fig.problems == [] and fig.extra["repeated"] == 0
    assert fig.extra["distinct_nonces"] == 250_000


def test_the_nonce_check_reports_a_nonce_source_that_repeats(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Injected: a nonce source cycling through three nonces that differ in their last byte
    # only. The check counted no repeat (its count not kept or not required), or read
    # something else than the nonce: the tag's bytes, or the nonce without its last bytes.
    cycle = itertools.cycle([bytes(11) + bytes([j]) for j in range(3)])
    monkeypatch.setattr(crypto, "_next_nonce", lambda: next(cycle))
    fig = attacks.nonces(100)
    assert fig.extra["distinct_nonces"] == 3 and fig.extra["repeated"] == 97
    assert fig.problems == ["97 repeated nonces in 100 seals"]


# -- processes learn the new key -------------------------------------------------------------


def test_a_running_process_learns_a_rotated_key(tmp_path: Path) -> None:
    keyfile = tmp_path / "keys.json"
    Keyring.generate().save(keyfile)
    codec = Codec(Keyring.load(keyfile))
    watcher = KeyfileWatcher(keyfile, codec, interval=3600)
    old = codec.keyring.active_id if codec.keyring else ""
    watcher.check()  # within the interval: not even a stat
    new = add_active_key(keyfile).active_id
    watcher.check()
    assert codec.keyring is not None and codec.keyring.active_id == old
    assert watcher.reload() and codec.keyring.active_id == new  # what a MissingKey triggers
    assert not watcher.reload()  # unchanged file: nothing to do
    assert old in codec.keyring.ids  # old records still open
    keyfile.write_text("not a key file")
    keyfile.chmod(0o600)
    assert not watcher.reload() and codec.keyring.active_id == new  # a broken file is ignored


def test_a_running_writer_seals_its_next_puts_with_a_rotated_key(
    make_mem: MakeMem, keyfile: Path, raw_redis: redis.Redis
) -> None:
    # put looks at its key file (every keyring_reload_interval): with that look gone, a
    # running writer sealed with the old key for good, and a rotation never finished.
    writer = make_mem(worker=False, keyring_reload_interval=0.05)
    p = Principal(agent_id="a", team="t")
    writer.put("k", 0, level=Level.TEAM, principal=p)
    new = add_active_key(keyfile).active_id

    def sealed_with() -> str | None:
        r = writer.put("k", 1, level=Level.TEAM, principal=p)
        raw = raw_redis.get(writer.layout.cache_key(r.shard, r.scope, r.key))
        envelope, _ = cached_envelope(raw or b"")
        assert envelope is not None
        return envelope_key_id(envelope)

    wait_until(lambda: sealed_with() == new, what="a put sealed with the rotated key")


def test_a_process_started_during_a_rotation_still_learns_the_new_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The key file is saved by a rotation between the process reading it and its watcher
    # looking at it: the watcher took the new file's signature for what was loaded, and
    # the process sealed with the old key (and could not open new records) for good.
    import dualmem.memory as memory_module

    keyfile = tmp_path / "keys.json"
    Keyring.generate().save(keyfile)
    load = memory_module._load_keyring
    rotated: list[str] = []

    def load_then_rotate(settings: object) -> Keyring:
        ring = load(settings)  # type: ignore[arg-type]
        rotated.append(add_active_key(keyfile).active_id)
        return ring

    monkeypatch.setattr(memory_module, "_load_keyring", load_then_rotate)
    mem = DualMemory(
        redis_url="memory://rotation-race", db_path=str(tmp_path / "m.db"), keyring=str(keyfile)
    )
    try:
        assert mem._keyfile is not None and mem._keyfile.reload()
        assert mem.codec.keyring is not None and mem.codec.keyring.active_id == rotated[0]
    finally:
        mem.close()


def test_two_edits_of_the_key_file_at_once_lose_no_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two rotate-keys (or a rotation and a drop) each loaded the file, changed it and
    # saved it: the later save silently dropped the key the other had just added.
    keyfile = tmp_path / "keys.json"
    Keyring.generate().save(keyfile)
    barrier = threading.Barrier(2)
    load = Keyring.load

    def load_and_wait(path: object) -> Keyring:
        ring = load(path)  # type: ignore[arg-type]
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait(timeout=0.5)  # without a lock both have loaded the same file here
        return ring

    monkeypatch.setattr(Keyring, "load", staticmethod(load_and_wait))
    added: list[str] = []
    threads = [
        threading.Thread(target=lambda: added.append(add_active_key(keyfile).active_id))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    monkeypatch.undo()
    assert len(added) == 2 and set(added) <= set(Keyring.load(keyfile).ids)


def test_a_drop_and_a_rotation_editing_the_key_file_at_once_lose_no_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # rotate-keys --drop-retired removed a key while another rotation added one: each
    # loaded the file and saved what it had loaded, and the later save lost the other's
    # edit (the new active key, or the drop).
    keyfile = tmp_path / "keys.json"
    ring = Keyring.generate()
    old = ring.active_id
    ring.with_new_key().save(keyfile)
    barrier = threading.Barrier(2)
    load = Keyring.load

    def load_and_wait(path: object) -> Keyring:
        ring = load(path)  # type: ignore[arg-type]
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait(timeout=0.5)  # without a lock both have loaded the same file here
        return ring

    monkeypatch.setattr(Keyring, "load", staticmethod(load_and_wait))
    added: list[str] = []
    threads = [
        threading.Thread(target=lambda: added.append(add_active_key(keyfile).active_id)),
        threading.Thread(target=lambda: drop_keys(keyfile, [old])),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    monkeypatch.undo()
    after = Keyring.load(keyfile)
    assert len(added) == 1 and after.active_id == added[0] and old not in after.ids
    # Asked to drop the active key (a caller's mistake), it keeps it.
    assert drop_keys(keyfile, [after.active_id]).ids == after.ids


def test_a_key_file_watcher_sees_a_same_size_file_saved_in_the_same_tick_and_a_missing_one(
    tmp_path: Path,
) -> None:
    # Two saves within one tick of the file system's clock (milliseconds) and of the same
    # size differ only by inode: without it the process kept the first keyring. A key
    # file that is gone must read as failed: a writer whose lease lapsed then refuses to
    # seal with a key a drop may have removed.
    keyfile = tmp_path / "keys.json"
    Keyring.generate().save(keyfile)
    codec = Codec(Keyring.load(keyfile))
    watcher = KeyfileWatcher(keyfile, codec, interval=3600, seen=keyfile_signature(keyfile))
    st = keyfile.stat()
    second = Keyring.generate()
    second.save(keyfile, overwrite=True)
    os.utime(keyfile, ns=(st.st_atime_ns, st.st_mtime_ns))  # the same tick
    assert keyfile.stat().st_size == st.st_size
    assert watcher.reload() and codec.keyring is not None
    assert codec.keyring.active_id == second.active_id and not watcher.failed
    keyfile.unlink()
    assert not watcher.reload() and watcher.failed
    assert codec.keyring.active_id == second.active_id  # the keyring in use is kept
    second.save(keyfile)
    watcher.reload()
    assert not watcher.failed


# -- the library, on both backends -----------------------------------------------------------


def test_rotation_reseals_everything_and_never_overwrites_a_newer_put(
    make_mem: MakeMem, keyfile: Path, raw_redis: redis.Redis
) -> None:
    writer = make_mem(keyring_reload_interval=0.05)  # reads its key file like any process
    p = Principal(agent_id="a", team="t", swarm="s", project="p", system=True)
    levels = (Level.PRIVATE, Level.TEAM, Level.SYSTEM, Level.SWARM)
    last = {}
    for i in range(300):
        lvl = levels[i % 4]
        last[(f"k{i}", lvl)] = writer.put(f"k{i}", {"v": i, "gen": 0}, level=lvl, principal=p)
    writer.sync(list(last.values())[-1], timeout=10)
    old = writer.codec.keyring.active_id  # type: ignore[union-attr]
    early = make_mem(worker=False, keyring_reload_interval=3600)  # loaded before the rotation
    new = add_active_key(keyfile).active_id
    rotator = make_mem()  # loads the new key file
    stop = threading.Event()
    newer: dict[tuple[str, Level], dict[str, int]] = {}
    receipts = []

    def keep_writing() -> None:
        n = 0
        while not stop.is_set():
            i = n % 150  # keys 150.. keep their first value (and cache entry)
            lvl = levels[i % 4]
            value = {"v": i, "gen": 1 + n // 150}
            receipts.append(writer.put(f"k{i}", value, level=lvl, principal=p))
            newer[(f"k{i}", lvl)] = value
            n += 1
            time.sleep(0.0005)

    t = threading.Thread(target=keep_writing)
    t.start()
    try:
        report = rotate_keys(rotator, batch_size=50, timeout=60)
    finally:
        stop.set()
        t.join()
    assert report.resealed_rows > 0
    writer.sync(receipts[-1], timeout=10)
    # The writer is quiet now: one more run finds what it wrote under the old key before
    # it reloaded, and then nothing is left.
    report = rotate_keys(rotator, batch_size=50, timeout=60)
    assert report.done and report.retired == (old,), report
    assert rotator.store.count_sealed_rows([1, 2, 5], skip_key_field=_field(new)) == 0
    cached = [raw_redis.get(n) for n in raw_redis.scan_iter(match=b"dm:*:c:*")]
    assert cached and all(envelope_key_id(bytes(v)) in (new, None) for v in cached if v)
    drop_keys(keyfile, report.retired)
    reader = make_mem(keyring=Keyring.load(keyfile))  # has never seen the old key
    for key, lvl in last:
        expected = newer.get((key, lvl), {"v": int(key[1:]), "gen": 0})
        assert reader.get(key, level=lvl, principal=p) == expected, key
        assert reader.get(key, level=lvl, principal=p, fresh=True) == expected, key
    # A process that loaded the key file before the rotation meets the new key id and
    # reloads the file (its reload interval has not come round yet).
    assert early.get("k0", level=Level.PRIVATE, principal=p) == newer.get(
        ("k0", Level.PRIVATE), {"v": 0, "gen": 0}
    )
    assert early.codec.keyring is not None and early.codec.keyring.active_id == new
    audit = [a for a in reader.store.audit_log() if a.event == "key_rotation"]
    assert len(audit) == 2 and all(a.actor == "dualmem-rotate-keys" for a in audit)


def test_rotate_keys_returns_once_its_audit_event_is_in_sqlite(
    make_mem: MakeMem, keyfile: Path, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mirror or verify run right after a rotation must see it: re-sealed rows have no
    journal entry, so the committed ``key_rotation`` event is the only signal."""
    mem = make_mem()
    p = Principal(agent_id="a", team="t", swarm="s", project="p")
    mem.sync(mem.put("k", {"v": 1}, level=Level.PRIVATE, principal=p), timeout=10)
    add_active_key(keyfile)
    rotator = make_mem()

    def committed_events() -> int:
        # A fresh connection: no waiting, no help from the store's caches.
        with contextlib.closing(sqlite3.connect(db_path)) as conn:
            sql = "SELECT COUNT(*) FROM audit_log WHERE event = 'key_rotation'"
            return int(conn.execute(sql).fetchone()[0])

    # And it holds its lock until then: `verify` without the key file takes a held lock
    # for a rotation that may have re-sealed rows and cache entries apart; released
    # before its event was committed, verify failed those pairs in between.
    at_release: list[int] = []
    release = RotationLock.release

    def noting_release(lock: RotationLock) -> None:
        at_release.append(committed_events())
        release(lock)

    monkeypatch.setattr(RotationLock, "release", noting_release)
    report = rotate_keys(rotator, timeout=30)
    assert committed_events() == 1
    assert at_release == [1]
    assert report.done and report.audited
    # With no worker to commit it, the call still returns (after at least a second) and
    # says so; the event waits in the stream for a worker.
    mem.close()
    rotator.close()
    t0 = time.monotonic()
    report = rotate_keys(make_mem(worker=False), timeout=0.1)
    assert not report.audited and 1.0 <= time.monotonic() - t0 < 10
    mem = make_mem()  # a worker: it commits the waiting event
    mem.sync(mem.put("k2", 2, level=Level.SWARM, principal=p), timeout=10)
    assert sum(a.event == "key_rotation" for a in mem.store.audit_log()) == 2


def test_a_record_a_rotation_cannot_open_is_left_and_audited(
    make_mem: MakeMem, keyfile: Path, db_path: Path
) -> None:
    # Only a log line said so: the audit event of the rotation read as a clean one.
    mem = make_mem()
    p = Principal(agent_id="a", team="t")
    for key in ("good", "bad"):
        mem.sync(mem.put(key, {"v": key}, level=Level.PRIVATE, principal=p), timeout=10)
    with sqlite3.connect(db_path) as conn:
        (env,) = conn.execute("SELECT envelope FROM memory WHERE key = 'bad'").fetchone()
        flipped = bytes(env[:-1]) + bytes((env[-1] ^ 1,))
        conn.execute("UPDATE memory SET envelope = ? WHERE key = 'bad'", (flipped,))
    conn.close()
    add_active_key(keyfile)
    report = rotate_keys(make_mem(), timeout=5)
    assert report.left.unreadable == 1 and report.resealed_rows == 1
    (event,) = [a for a in mem.store.audit_log() if a.event == "key_rotation"]
    assert event.risk == "high" and json.loads(event.detail)["unreadable"] == 1


def test_a_key_a_dead_letter_is_sealed_with_is_never_retired(
    make_mem: MakeMem,
    keyfile: Path,
    redis_url: str,
    db_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A dead letter keeps the envelope its put was sealed with: `dlq replay` sends it
    # again later, so its key must stay in the key file though every row is re-sealed.
    p = Principal(agent_id="a")
    mem = make_mem()
    old = mem.codec.keyring.active_id  # type: ignore[union-attr]
    env = mem.codec.seal({"v": 1}, scope="agent:a", key="late", level=Level.PRIVATE, owner="a")
    fields = put_fields("agent:a", "late", Level.PRIVATE, "a", 1, env, None)
    mem.store.dead_letter([(StreamEntry(0, "1-1", _raw(fields)), "disk I/O error", 3)])
    mem.sync(mem.put("k", {"v": 2}, level=Level.PRIVATE, principal=p), timeout=10)
    add_active_key(keyfile)
    report = rotate_keys(make_mem(), timeout=30)
    assert report.done and report.resealed_rows == 1
    assert report.left.dead_letters == 1 and report.retired == (), report
    drop_keys(keyfile, report.retired)
    assert old in Keyring.load(keyfile).ids
    args = ["--redis-url", redis_url, "--db", str(db_path), "--keyring", str(keyfile)]
    code, out, _ = run_cli(capsys, "dlq", "replay", *args, "--all")
    assert code == 0 and "1 committed" in out, out
    reader = make_mem(keyring=Keyring.load(keyfile))
    assert reader.get("late", level=Level.PRIVATE, principal=p) == {"v": 1}


def test_a_put_still_in_the_stream_under_the_old_key_keeps_the_rotation_from_done(
    make_mem: MakeMem, keyfile: Path
) -> None:
    # Nothing in SQLite or the cache is left under the old key, but a put sealed with it
    # waits in the stream (no worker): dropping the key now would make it unreadable
    # once a worker commits it.
    p = Principal(agent_id="a")
    writer = make_mem(worker=False)
    old = writer.codec.keyring.active_id  # type: ignore[union-attr]
    writer.put("k", {"v": 1}, level=Level.PRIVATE, principal=p)
    add_active_key(keyfile)
    report = rotate_keys(make_mem(worker=False), timeout=0.5)
    assert report.left.rows == report.left.cache == 0, report
    assert report.left.stream == 1 and old in report.left.key_ids
    assert not report.done and report.retired == ()


def _cache(raw_redis: redis.Redis) -> dict[bytes, bytes]:
    return {bytes(n): bytes(raw_redis.get(n)) for n in raw_redis.scan_iter(match=b"dm:*:c:*")}


def _cached_key_id(value: bytes | None) -> str | None:
    envelope = None if value is None else cached_envelope(value)[0]
    return None if envelope is None else envelope_key_id(envelope)


def test_rotation_progress_counts_every_row_it_reads_and_never_passes_its_total(
    make_mem: MakeMem, keyfile: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # rotate-keys shows "done of total" from the progress callback. Rows written under
    # the old key during the pass are read too: the total must grow with them, not show
    # 8 of 7, and done counts rows, not batches.
    from dualmem.rotation import _Rotation

    p = Principal(agent_id="a")
    writer = make_mem(keyring_reload_interval=3600)  # keeps sealing with the old key
    for i in range(7):
        receipt = writer.put(f"a{i}", i, level=Level.PRIVATE, principal=p)
    writer.sync(receipt, timeout=10)
    old = writer.codec.keyring.active_id  # type: ignore[union-attr]
    add_active_key(keyfile)
    rotator = make_mem()
    real = _Rotation._reseal_rows

    def reseal_rows(self: _Rotation, *a: object) -> int:
        if not late:  # after the first batch was read
            for i in range(3):  # after the pass's cursor: this pass reads them too
                late.append(writer.put(f"z{i}", i, level=Level.PRIVATE, principal=p))
            for r in late:  # two workers share the stream: each, not only the last
                writer.sync(r, timeout=10)  # type: ignore[arg-type]
        return real(self, *a)  # type: ignore[arg-type]

    late: list[object] = []
    monkeypatch.setattr(_Rotation, "_reseal_rows", reseal_rows)
    seen: list[tuple[int, int]] = []
    report = rotate_keys(
        rotator, batch_size=2, timeout=30, progress=lambda d, t: seen.append((d, t))
    )
    assert report.done and report.resealed_rows == 10, report
    assert seen[0] == (0, 7) and seen[-1] == (10, 10), seen
    assert all(d <= t for d, t in seen), seen
    assert [d for d, _ in seen] == sorted(d for d, _ in seen), seen
    # The audit event names the key the rotation retired (mirror and auditors read it).
    (event,) = [a for a in rotator.store.audit_log() if a.event == "key_rotation"]
    assert json.loads(event.detail)["retired"] == [old]


def test_a_cache_entry_left_under_the_old_key_after_the_pass_is_found_and_re_sealed(
    make_mem: MakeMem, keyfile: Path, raw_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A cache entry under the old key that appears after the pass re-sealed the cache
    # (what a process that had not reloaded yet leaves there; here only the cache holds
    # it). The last look must count it and another pass re-seal it, keeping its TTL:
    # reported done, the old key was dropped and that entry could not be opened.
    from dualmem.rotation import _Rotation

    p = Principal(agent_id="a")
    mem = make_mem()
    mem.sync(mem.put("k", {"v": 1}, level=Level.PRIVATE, principal=p), timeout=10)
    before = _cache(raw_redis)
    assert len(before) == 1
    new = add_active_key(keyfile).active_id
    rotator = make_mem()
    real = _Rotation._reseal_cache
    calls = [0]

    def reseal_cache(self: _Rotation) -> int:
        n = real(self)
        calls[0] += 1
        if calls[0] == 1:
            for name, value in before.items():
                raw_redis.set(name, value, keepttl=True)
        return n

    monkeypatch.setattr(_Rotation, "_reseal_cache", reseal_cache)
    report = rotate_keys(rotator, timeout=30)
    assert report.done and report.passes == 2 and report.resealed_cache == 2, report
    for name in before:
        assert _cached_key_id(raw_redis.get(name)) == new
        assert raw_redis.pttl(name) > 0  # the put's cache TTL is kept
    assert rotator.get("k", level=Level.PRIVATE, principal=p) == {"v": 1}


def test_a_namespace_with_glob_characters_has_its_cache_re_sealed(
    make_mem: MakeMem, keyfile: Path, raw_redis: redis.Redis
) -> None:
    # The cache scan's pattern was the namespace unescaped: "n[1" matched none of its own
    # entries, the rotation re-sealed none and reported done, and once the old key was
    # dropped a fresh read of the record failed (MissingKey).
    p = Principal(agent_id="a")
    mem = make_mem(namespace="n[1")
    mem.sync(mem.put("k", {"v": 1}, level=Level.PRIVATE, principal=p), timeout=10)
    (name,) = _cache(raw_redis)
    new = add_active_key(keyfile).active_id
    report = rotate_keys(make_mem(namespace="n[1"), timeout=30)
    assert report.done and report.resealed_cache == 1, report
    assert _cached_key_id(raw_redis.get(name)) == new
    drop_keys(keyfile, report.retired)
    reader = make_mem(namespace="n[1", keyring=Keyring.load(keyfile))
    assert reader.get("k", level=Level.PRIVATE, principal=p, fresh=True) == {"v": 1}


def test_the_cache_re_seal_never_overwrites_a_newer_put(
    make_mem: MakeMem, keyfile: Path, raw_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A put replaced the cache entry between the rotation's read of it and its write:
    # written over, the cache served the older value (re-sealed) until it expired.
    from dualmem.rotation import _Rotation

    p = Principal(agent_id="a")
    mem = make_mem()
    mem.sync(mem.put("k", {"v": 1}, level=Level.PRIVATE, principal=p), timeout=10)
    new = add_active_key(keyfile).active_id
    rotator, newer = make_mem(), make_mem()  # newer loaded the new key file
    real = _Rotation._reseal_cached
    receipts = []

    def reseal_then_put(self: _Rotation, name: bytes, value: bytes) -> bytes | None:
        resealed = real(self, name, value)
        receipts.append(newer.put("k", {"v": 2}, level=Level.PRIVATE, principal=p))
        return resealed

    monkeypatch.setattr(_Rotation, "_reseal_cached", reseal_then_put)
    report = rotate_keys(rotator, timeout=30)
    assert len(receipts) == 1 and report.done, report
    assert report.resealed_cache == 0  # the entry it read was gone: nothing re-sealed
    newer.sync(receipts[0], timeout=10)
    assert [_cached_key_id(v) for v in _cache(raw_redis).values()] == [new]
    assert rotator.get("k", level=Level.PRIVATE, principal=p) == {"v": 2}


def test_a_rotation_that_lost_its_lock_leaves_the_cache_alone(
    make_mem: MakeMem, keyfile: Path, raw_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Lost between its rows and its cache entries: it went on re-sealing the cache in
    # place while another rotation, holding the lock now, re-sealed it under its own key.
    from dualmem.rotation import _Rotation

    rotator = _a_record_under_the_old_key(make_mem, keyfile)
    old = {_cached_key_id(v) for v in _cache(raw_redis).values()}
    assert len(old) == 1 and None not in old
    lock = RotationLock(raw_redis, rotator.settings.namespace).acquire(timeout=0)
    real = _Rotation._reseal_rows

    def send_then_lose(self: _Rotation, *a: object) -> int:
        n = real(self, *a)  # type: ignore[arg-type]
        raw_redis.set(_LOCK, b"someone else", px=60_000)
        return n

    monkeypatch.setattr(_Rotation, "_reseal_rows", send_then_lose)
    try:
        with pytest.raises(RotationBusy, match="lost its lock"):
            rotate_keys(rotator, timeout=5, lock=lock)
    finally:
        lock.release()
    assert {_cached_key_id(v) for v in _cache(raw_redis).values()} == old


def test_a_record_whose_key_is_gone_is_left_and_the_others_re_sealed(
    make_mem: MakeMem, keyfile: Path
) -> None:
    # A row sealed with a key the key file does not hold (lost, or copied in from
    # another deployment): MissingKey stopped the rotation, and no record after it in
    # the batch was re-sealed.
    p = Principal(agent_id="a")
    mem = make_mem()
    stranger = Codec(Keyring.generate())
    env = stranger.seal({"v": 0}, scope=SCOPE, key="a-lost", level=Level.PRIVATE, owner="a")
    fields = put_fields(SCOPE, "a-lost", Level.PRIVATE, "a", 1, env, None)
    mem.store.apply([StreamEntry(0, "1-1", _raw(fields))])
    mem.sync(mem.put("b-good", {"v": 1}, level=Level.PRIVATE, principal=p), timeout=10)
    add_active_key(keyfile)
    report = rotate_keys(make_mem(), timeout=5)
    assert report.resealed_rows == 1 and report.left.unreadable == 1, report
    assert not report.done and envelope_key_id(env) in report.left.key_ids


def test_a_rotation_that_cannot_progress_stops_after_three_passes(
    make_mem: MakeMem, keyfile: Path, raw_redis: redis.Redis
) -> None:
    # A cache entry that does not open (tampered) fails its re-seal at every pass: the
    # rotation must give up after three passes without progress, say what is left, and
    # not spin until --timeout.
    p = Principal(agent_id="a")
    mem = make_mem()
    mem.sync(mem.put("k", {"v": 1}, level=Level.PRIVATE, principal=p), timeout=10)
    ((name, value),) = _cache(raw_redis).items()
    raw_redis.set(name, value[:-1] + bytes((value[-1] ^ 1,)), keepttl=True)
    add_active_key(keyfile)
    report = rotate_keys(make_mem(), timeout=30)
    assert report.passes == 3 and not report.done, report
    assert report.left.cache == 1 and report.left.rows == 0 and report.retired == ()


def test_a_rotation_passes_again_once_a_lagging_worker_commits_a_put_under_the_old_key(
    make_mem: MakeMem, keyfile: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing left in SQLite or the cache, but a put under the old key still waits in
    # the stream: taken for "only unreadable records left" (there are none), the
    # rotation stopped not done instead of passing again once the worker committed it.
    from dualmem.rotation import _Rotation

    p = Principal(agent_id="a")
    writer = make_mem(worker=False)
    receipt = writer.put("k", {"v": 1}, level=Level.PRIVATE, principal=p)
    add_active_key(keyfile)
    rotator = make_mem(worker=False)
    real = _Rotation._leftovers
    workers: list[DualMemory] = []

    def leftovers(self: _Rotation, unreadable: set[tuple[str, str]]) -> object:
        left = real(self, unreadable)
        if not workers:
            workers.append(make_mem())  # the worker catches up now
            workers[0].sync(receipt, timeout=10)
        return left

    monkeypatch.setattr(_Rotation, "_leftovers", leftovers)
    report = rotate_keys(rotator, timeout=30)
    assert report.done and report.passes == 2 and report.resealed_rows == 1, report


def test_a_rotation_waits_for_its_reseals_and_sends_each_row_once(
    make_mem: MakeMem, keyfile: Path, raw_redis: redis.Redis
) -> None:
    # No worker commits the re-sealed rows yet: the rotation must wait for them before it
    # counts what is left. Counted at once, every row it had just sent was still "left",
    # and each pass sent all of them again.
    writer = make_mem(worker=False)
    for i in range(5):  # committed long ago: in SQLite, no longer in the stream
        env = writer.codec.seal(i, scope=SCOPE, key=f"k{i}", level=Level.PRIVATE, owner="a")
        fields = put_fields(SCOPE, f"k{i}", Level.PRIVATE, "a", 1, env, None)
        writer.store.apply([StreamEntry(0, f"1-{i}", _raw(fields))])
    add_active_key(keyfile)
    report = rotate_keys(make_mem(worker=False), timeout=1.5)
    assert report.passes == 1 and report.resealed_rows == 5 and not report.done, report
    assert _entries_added(raw_redis) == 5 + 1  # the reseals and the audit event


def test_a_rotation_waits_for_its_last_reseal_to_be_committed_not_its_first(
    make_mem: MakeMem, keyfile: Path, raw_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The worker had committed the first re-sealed rows and was still on the last one
    # when the rotation counted what was left: that row counted as left, and the next
    # pass sent it again (with a slow enough worker, three such passes gave up not done).
    from dualmem.commands import OP_RESEAL
    from dualmem.rotation import _Rotation

    writer = make_mem(worker=False)
    for i in range(4):  # committed long ago: in SQLite, no longer in the stream
        env = writer.codec.seal(i, scope=SCOPE, key=f"k{i}", level=Level.PRIVATE, owner="a")
        fields = put_fields(SCOPE, f"k{i}", Level.PRIVATE, "a", 1, env, None)
        writer.store.apply([StreamEntry(0, f"1-{i}", _raw(fields))])
    add_active_key(keyfile)
    counted = threading.Event()
    reseals: list[object] = []
    real_apply, real_leftovers = SQLiteStore.apply, _Rotation._leftovers

    def apply(self: SQLiteStore, entries: list[StreamEntry]) -> object:
        if any(e.fields.get(b"op") == OP_RESEAL.encode() for e in entries):
            reseals.append(entries)
            if len(reseals) == 4:  # the last one: held until the rotation counts, or 2 s
                counted.wait(timeout=2)
        return real_apply(self, entries)

    def leftovers(self: _Rotation, unreadable: set[tuple[str, str]]) -> object:
        left = real_leftovers(self, unreadable)
        counted.set()
        return left

    monkeypatch.setattr(SQLiteStore, "apply", apply)
    monkeypatch.setattr(_Rotation, "_leftovers", leftovers)
    make_mem(batch_size=1)  # the worker: one command per commit
    report = rotate_keys(make_mem(worker=False), timeout=30)
    assert report.done and report.passes == 1 and report.resealed_rows == 4, report
    assert _entries_added(raw_redis) == 4 + 1  # each row sent once, and the audit event


def test_a_put_under_the_old_key_a_worker_is_committing_keeps_the_rotation_from_done(
    make_mem: MakeMem, keyfile: Path, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A worker had read the put (delivered, not yet acknowledged) and was committing it
    # when the rotation counted what was left: reading the stream only after the last
    # delivered entry missed it, the rotation said done, and --drop-retired removed the
    # key that row is sealed with.
    from dualmem.commands import OP_PUT
    from dualmem.rotation import Leftovers, _Rotation

    p = Principal(agent_id="a")
    writer = make_mem(worker=False)
    receipt = writer.put("k", {"v": 1}, level=Level.PRIVATE, principal=p)
    new = add_active_key(keyfile).active_id
    reading, counted = threading.Event(), threading.Event()
    real_apply = SQLiteStore.apply

    def apply(self: SQLiteStore, entries: list[StreamEntry]) -> object:
        if any(e.fields.get(b"op") == OP_PUT.encode() for e in entries):
            reading.set()
            counted.wait(timeout=5)  # committed once the rotation has looked, or in 5 s
        return real_apply(self, entries)

    monkeypatch.setattr(SQLiteStore, "apply", apply)
    worker = make_mem()
    assert reading.wait(timeout=10)  # the worker holds the put, delivered
    rotator = make_mem(worker=False)
    real_leftovers = _Rotation._leftovers

    def leftovers(self: _Rotation, unreadable: set[tuple[str, str]]) -> Leftovers:
        left = real_leftovers(self, unreadable)
        counted.set()
        return left

    monkeypatch.setattr(_Rotation, "_leftovers", leftovers)
    report = rotate_keys(rotator, timeout=30)
    worker.sync(receipt, timeout=10)
    assert report.done and report.passes == 2 and report.resealed_rows == 1, report
    with sqlite3.connect(db_path) as conn:
        (env,) = conn.execute("SELECT envelope FROM memory WHERE key = 'k'").fetchone()
    conn.close()
    assert envelope_key_id(bytes(env)) == new


def test_a_rotation_leaves_writers_headroom_in_the_stream(
    make_mem: MakeMem, keyfile: Path, raw_redis: redis.Redis
) -> None:
    # The re-sealed rows go through the stream: with no worker to drain it, the rotation
    # filled it to max_backlog, and every writer got Backpressure.
    writer = make_mem(worker=False, max_backlog=20)
    for i in range(40):  # committed long ago: in SQLite, no longer in the stream
        env = writer.codec.seal(i, scope=SCOPE, key=f"k{i}", level=Level.PRIVATE, owner="a")
        fields = put_fields(SCOPE, f"k{i}", Level.PRIVATE, "a", 1, env, None)
        writer.store.apply([StreamEntry(0, f"1-{i}", _raw(fields))])
    add_active_key(keyfile)
    report = rotate_keys(make_mem(worker=False, max_backlog=20), batch_size=4, timeout=1)
    assert 0 < report.resealed_rows < 40 and not report.done, report
    # Sent while under half the bound (10): at most one batch past it, and the audit event.
    assert _stream_length(raw_redis) <= 10 + 4
    writer.put("w", 1, level=Level.PRIVATE, principal=Principal(agent_id="a"))


def _field(key_id: str) -> bytes:
    return bytes((len(key_id),)) + key_id.encode()


# -- key leases: a drop waits for every process still sealing with an old key --------------


def _users(raw_redis: redis.Redis) -> dict[str, tuple[str, ...]]:
    return {u.token: u.ids for u in key_users(raw_redis, "dualmem")}


def test_a_process_leases_the_keys_it_may_seal_with(
    make_mem: MakeMem, keyfile: Path, raw_redis: redis.Redis
) -> None:
    p = Principal(agent_id="a")
    mem = make_mem(worker=False, keyring_reload_interval=0.05)
    assert mem._lease is not None
    old = mem.codec.keyring.active_id  # type: ignore[union-attr]
    # Taken at start, before the first seal.
    assert _users(raw_redis) == {mem._lease.token: (old,)}
    new = add_active_key(keyfile).active_id
    time.sleep(0.06)
    mem.put("k", 1, level=Level.PRIVATE, principal=p)  # reloads, seals with the new key
    # The old key stays named while a put sealed with it may still be on its way.
    assert _users(raw_redis) == {mem._lease.token: (new, old)}
    mem._lease.slack = 0.05
    time.sleep(0.06)
    mem.put("k", 2, level=Level.PRIVATE, principal=p)
    assert _users(raw_redis) == {mem._lease.token: (new,)}
    mem.close()
    assert _users(raw_redis) == {}


def test_a_write_carries_a_lease_renewal_only_when_one_is_due(
    make_mem: MakeMem, raw_redis: redis.Redis
) -> None:
    # The renewal rides in a write's transaction once keyring_reload_interval has
    # passed: sending it with every write cost each put two more commands and renewed
    # an hour-long lease at every write.
    p = Principal(agent_id="a")
    mem = make_mem(worker=False, keyring_reload_interval=3600)
    assert mem._lease is not None
    taken = mem._lease._renewed_at
    entry = f"dm:{{dualmem:keyuse}}:{mem._lease.token}".encode()
    raw_redis.pexpire(entry, 600_000)  # what a renewal would set back to over an hour
    for i in range(3):
        mem.put("k", i, level=Level.PRIVATE, principal=p)
    assert mem._lease._renewed_at == taken
    assert 0 < raw_redis.pttl(entry) <= 600_000
    mem._lease._renewed_at -= 3600  # an hour on: the next write renews
    mem.put("k", 3, level=Level.PRIVATE, principal=p)
    assert raw_redis.pttl(entry) > 3_600_000


def test_a_send_whose_renewal_alone_is_refused_returns_the_replies_to_its_commands(
    raw_redis: redis.Redis,
) -> None:
    # send_carrying returns the replies to the caller's commands: with the renewal
    # refused, it handed back the renewal's replies too, after them. The renewal stays
    # unconfirmed (due again at the next write).
    from functools import partial

    from dualmem.keyuse import send_carrying
    from dualmem.redis_backend import transact

    lease = KeyLease(raw_redis, "dualmem", Codec(Keyring.generate()), interval=60, slack=3)
    raw_redis.set(b"dm:{dualmem:keyuse}", b"not a set")  # SADD to it fails
    send = partial(transact, raw_redis, keep_errors=True)
    replies = send_carrying(lease, [(b"SET", b"x", b"1"), (b"GET", b"x")], send)
    assert replies == [b"OK", b"1"]
    assert lease.lapsed() and lease.commands()


def test_a_process_that_keeps_writing_keeps_its_lease_alive_past_its_ttl(
    make_mem: MakeMem, raw_redis: redis.Redis
) -> None:
    # The renewal rides in a write's transaction when one is due; a write that carried
    # none must not count as a renewal, or a busy writer's lease expired in Redis (a drop
    # then went ahead) while the writer took it for fresh.
    p = Principal(agent_id="a")
    mem = make_mem(
        worker=False,
        keyring_reload_interval=0.05,
        redis_retries=0,
        connect_timeout=0.1,
        socket_timeout=0.1,
    )
    assert mem._lease is not None
    ttl_s = mem._lease._ttl_ms / 1000
    assert ttl_s < 3  # the test below outlives it
    token = mem._lease.token
    ends = time.monotonic() + ttl_s + 0.5
    i = 0
    while time.monotonic() < ends:
        mem.put("k", i, level=Level.PRIVATE, principal=p)
        assert token in _users(raw_redis), f"lease gone after {i} writes"
        i += 1
        time.sleep(0.01)
    pttl = raw_redis.pttl(b"dm:{dualmem:keyuse}:" + token.encode())
    assert pttl > (ttl_s - 0.5) * 1000  # renewed within the last interval or so


def test_a_lease_outlives_the_last_write_it_covers(
    make_mem: MakeMem, raw_redis: redis.Redis
) -> None:
    # After a renewal a writer seals without renewing until keyring_reload_interval + 1 s
    # later (then its lease counts as lapsed), and such a write may take landing_slack to
    # reach Redis: the lease must live that long. With an expiry of the interval alone, a
    # lease vanished while its process still sealed with the old key, a drop went ahead,
    # and that write landed under a key nobody has any more.
    mem = make_mem(worker=False, keyring_reload_interval=2.0)
    assert mem._lease is not None
    covers = mem.settings.keyring_reload_interval + 1.0 + landing_slack(mem.settings)
    mem._lease.renew()
    pttl = raw_redis.pttl(b"dm:{dualmem:keyuse}:" + mem._lease.token.encode())
    assert pttl > (covers - 0.5) * 1000, (pttl, covers)


def test_a_renewal_asked_for_is_sent_though_none_is_due(raw_redis: redis.Redis) -> None:
    # The mirror reloads its key file and renews its lease before each cycle seals
    # (Runtime.refresh_keys): the lease then covers the cycle's seals until its send.
    # When renew() waited for the interval like a write's renewal, the lease kept its old
    # expiry and its old keys while the cycle sealed with the new one.
    ring = Keyring.generate()
    codec = Codec(ring)
    lease = KeyLease(raw_redis, "dualmem", codec, interval=60, slack=60)
    lease.renew()
    codec.keyring = ring.with_new_key()  # the key file was reloaded
    lease.renew()  # no renewal is due for a minute
    assert _users(raw_redis) == {lease.token: (codec.keyring.active_id, ring.active_id)}
    lease.release()


def test_a_drop_waits_for_a_lease_naming_an_old_key_to_move_on(raw_redis: redis.Redis) -> None:
    # wait_for_key_users waits up to its timeout for the leases to name only the active
    # key; when it returned at its first look, a drop refused while a writer was about
    # to reload the key file.
    ring = Keyring.generate()
    lease = KeyLease(raw_redis, "dualmem", Codec(ring), interval=60, slack=60)
    lease.renew()  # names only the old key: this process has not reloaded yet
    new = ring.with_new_key()
    timer = threading.Timer(0.3, lease.release)  # ... and then it stops writing
    timer.start()
    try:
        assert wait_for_key_users(raw_redis, "dualmem", new.active_id, timeout=30) == []
    finally:
        timer.join()


def test_the_lease_of_a_process_that_died_expires(redis_url: str, raw_redis: redis.Redis) -> None:
    ring = Keyring.generate()
    lease = KeyLease(raw_redis, "dualmem", Codec(ring), interval=0.05, slack=0.05)
    lease.renew()  # then the process is killed: nothing deletes it
    assert _users(raw_redis) == {lease.token: (ring.active_id,)}
    wait_until(lambda: not _users(raw_redis), timeout=5, what="the lease to expire")
    assert raw_redis.smembers(b"dm:{dualmem:keyuse}") == set()  # its token left the index
    assert wait_for_key_users(raw_redis, "dualmem", ring.active_id, timeout=0) == []


@pytest.mark.real_redis
def test_drop_retired_waits_for_a_writer_that_still_seals_with_the_old_key(
    redis_server: RedisServer,
    tmp_path: Path,
    keyfile: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A writer reloads its key file every 10 s; the rotation waited its own grace, found
    # nothing left under the old key and dropped it. The writer went on sealing with the
    # dropped key, and nobody could open those records again.
    redis_server.client().flushall()
    db = str(tmp_path / "m.db")
    p = Principal(agent_id="a")
    writer = DualMemory(
        redis_url=redis_server.url, db_path=db, keyring=str(keyfile), keyring_reload_interval=10
    )
    try:
        old = writer.codec.keyring.active_id  # type: ignore[union-attr]
        writer.sync(writer.put("before", 1, level=Level.PRIVATE, principal=p), timeout=10)
        args = ["rotate-keys", "--redis-url", redis_server.url, "--db", db]
        args += ["--keyring", str(keyfile), "--grace", "0.1", "--drop-retired"]
        code, out, _ = run_cli(capsys, *args, "--timeout", "2")
        assert code == 1 and "not dropped" in out and writer._lease.token in out  # type: ignore[union-attr]
        assert old in Keyring.load(keyfile).ids
        late = writer.put("late", 2, level=Level.PRIVATE, principal=p)  # still the old key
        writer.sync(late, timeout=10)
    finally:
        writer.close()  # gone: its lease with it
    code, out, _ = run_cli(capsys, *args[:-1], "--resume", "--drop-retired", "--timeout", "30")
    assert code == 0 and f"dropped retired key(s) {old}" in out, out
    assert Keyring.load(keyfile).ids == (Keyring.load(keyfile).active_id,)
    reader = DualMemory(redis_url=redis_server.url, db_path=db, keyring=str(keyfile))
    try:
        assert reader.get("before", level=Level.PRIVATE, principal=p) == 1
        assert reader.get("late", level=Level.PRIVATE, principal=p) == 2
    finally:
        reader.close()


_LOCK = b"dm:{dualmem:keyuse}:rotation"


def _a_rotation_to_drop(
    redis_server: RedisServer, tmp_path: Path, keyfile: Path
) -> tuple[list[str], str]:
    """A committed record sealed with the key file's active key (its writer closed: no
    lease left), and the ``rotate-keys`` arguments that add a new key, re-seal the record
    and drop the old key; returns them and the old key's id."""
    redis_server.client().flushall()
    db = str(tmp_path / "m.db")
    writer = DualMemory(redis_url=redis_server.url, db_path=db, keyring=str(keyfile))
    try:
        old = writer.codec.keyring.active_id  # type: ignore[union-attr]
        p = Principal(agent_id="a")
        writer.sync(writer.put("k", 1, level=Level.PRIVATE, principal=p), timeout=10)
    finally:
        writer.close()
    args = ["rotate-keys", "--redis-url", redis_server.url, "--db", db]
    args += ["--keyring", str(keyfile), "--grace", "0.1", "--timeout", "30", "--drop-retired"]
    return args, old


def _lose_the_lock(client: redis.Redis, how: str) -> None:
    if how == "expired":  # Redis lost it (evicted, flushed, failed over)
        client.delete(_LOCK)
    else:  # another rotation took it over
        client.set(_LOCK, b"someone else", px=60_000)


@pytest.mark.real_redis
@pytest.mark.parametrize("how", ["expired", "taken over"])
def test_a_drop_that_lost_its_lock_while_it_waited_marks_no_key(
    redis_server: RedisServer,
    tmp_path: Path,
    keyfile: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    how: str,
) -> None:
    # The drop waits up to --timeout for the key leases: its lock may be gone by then.
    # It went on to mark the keys as being dropped (refusing imports and replays of
    # another rotation, which holds the lock now) and to pass over the data again.
    import dualmem.rotation as rotation_module

    args, old = _a_rotation_to_drop(redis_server, tmp_path, keyfile)
    client = redis_server.client()
    real_wait, real_mark = rotation_module.wait_for_key_users, rotation_module.mark_dropping
    marked: list[object] = []

    def wait_then_lose(*a: object, **kw: object) -> object:
        blocking = real_wait(*a, **kw)  # type: ignore[arg-type]
        _lose_the_lock(client, how)
        return blocking

    def mark(*a: object, **kw: object) -> None:
        marked.append(a[2])
        real_mark(*a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(rotation_module, "wait_for_key_users", wait_then_lose)
    monkeypatch.setattr(rotation_module, "mark_dropping", mark)
    code, out, err = run_cli(capsys, *args)
    assert code == 2 and "lost its lock" in err, (out, err)
    assert marked == []
    assert old in Keyring.load(keyfile).ids
    assert client.get(_LOCK) == (None if how == "expired" else b"someone else")


@pytest.mark.real_redis
@pytest.mark.parametrize("how", ["expired", "taken over"])
def test_a_drop_that_lost_its_lock_after_its_last_pass_keeps_the_keys(
    redis_server: RedisServer,
    tmp_path: Path,
    keyfile: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    how: str,
) -> None:
    # The lock was lost during the drop's last pass over the data: another rotation may
    # have made its own key active and be re-sealing under it. This one edited the key
    # file anyway, racing the other's edits.
    import dualmem.rotation as rotation_module
    from dualmem.keyuse import dropping_key

    args, old = _a_rotation_to_drop(redis_server, tmp_path, keyfile)
    client = redis_server.client()
    real_pass = rotation_module._rotate_with_progress
    passes: list[object] = []

    def pass_then_lose(*a: object, **kw: object) -> object:
        report = real_pass(*a, **kw)  # type: ignore[arg-type]
        passes.append(report)
        if len(passes) == 2:  # the drop's last pass
            _lose_the_lock(client, how)
        return report

    monkeypatch.setattr(rotation_module, "_rotate_with_progress", pass_then_lose)
    code, out, err = run_cli(capsys, *args)
    assert code == 2 and "lost its lock" in err, (out, err)
    assert len(passes) == 2 and old in Keyring.load(keyfile).ids
    assert client.get(dropping_key("dualmem")) is None  # the mark went with the drop


@pytest.mark.real_redis
def test_the_drop_marks_the_retired_keys_for_its_last_pass_and_then_clears_the_mark(
    redis_server: RedisServer,
    tmp_path: Path,
    keyfile: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The mark is what keeps an import or a replay from sending envelopes under a key
    # the drop is about to remove: it must name that key for the whole last pass (which
    # may take --timeout), and go once the drop is done, or every such send refused for
    # a minute more (or, marking nothing, landed under a key gone from the key file).
    import dualmem.rotation as rotation_module
    from dualmem.keyuse import dropping_key

    args, old = _a_rotation_to_drop(redis_server, tmp_path, keyfile)
    client = redis_server.client()
    mark = dropping_key("dualmem")
    real_rotate = rotation_module.rotate_keys
    seen: list[tuple[object, int]] = []

    def rotate_and_look(*a: object, **kw: object) -> object:
        seen.append((client.get(mark), client.pttl(mark)))
        report = real_rotate(*a, **kw)  # type: ignore[arg-type]
        seen.append((client.get(mark), client.pttl(mark)))
        return report

    monkeypatch.setattr(rotation_module, "rotate_keys", rotate_and_look)
    code, out, _ = run_cli(capsys, *args)
    assert code == 0 and f"dropped retired key(s) {old}" in out, out
    assert len(seen) == 4 and seen[:2] == [(None, -2), (None, -2)]  # no mark on the first
    for raw, pttl in seen[2:]:  # the last pass: before it starts and once it is over
        assert raw is not None and json.loads(raw) == [old]
        assert pttl > 30_000  # outlives the pass's own --timeout 30
    assert client.get(mark) is None
    assert Keyring.load(keyfile).ids == (Keyring.load(keyfile).active_id,)


@pytest.mark.real_redis
def test_a_drop_keeps_a_key_a_dead_letter_took_while_it_waited(
    redis_server: RedisServer,
    tmp_path: Path,
    keyfile: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A process that had not reloaded the key file yet (its lease made the drop wait)
    # sealed a put with the old key, and the worker dead-lettered it: the last pass finds
    # that dead letter, and `dlq replay` needs the old key to send it again. The drop
    # used the first pass's list of retired keys and removed it anyway.
    import dualmem.rotation as rotation_module
    from dualmem.keyuse import dropping_key

    args, old = _a_rotation_to_drop(redis_server, tmp_path, keyfile)
    codec = Codec(Keyring.load(keyfile))  # the late process's keyring: the old key active
    env = codec.seal({"v": 1}, scope=SCOPE, key="late", level=Level.PRIVATE, owner="a")
    fields = put_fields(SCOPE, "late", Level.PRIVATE, "a", 1, env, None)
    real_wait = rotation_module.wait_for_key_users

    def wait_then_dead_letter(*a: object, **kw: object) -> object:
        blocking = real_wait(*a, **kw)  # type: ignore[arg-type]
        store = SQLiteStore(tmp_path / "m.db")
        try:
            store.dead_letter([(StreamEntry(0, "1-1", _raw(fields)), "disk I/O error", 3)])
        finally:
            store.close()
        return blocking

    monkeypatch.setattr(rotation_module, "wait_for_key_users", wait_then_dead_letter)
    code, out, _ = run_cli(capsys, *args)
    assert code == 1 and "not dropped" in out and "1 dead letter(s)" in out, out
    assert old in Keyring.load(keyfile).ids
    assert redis_server.client().get(dropping_key("dualmem")) is None


@pytest.mark.real_redis
def test_rotate_keys_exits_1_while_a_put_under_the_old_key_is_left(
    redis_server: RedisServer,
    tmp_path: Path,
    keyfile: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A put sealed with the old key waits in the stream (no worker runs): a rotation that
    # is not done must say so by its exit code, or a script takes it as finished.
    redis_server.client().flushall()
    db = str(tmp_path / "m.db")
    writer = DualMemory(redis_url=redis_server.url, db_path=db, keyring=str(keyfile), worker=False)
    try:
        writer.put("k", 1, level=Level.PRIVATE, principal=Principal(agent_id="a"))
        args = ["rotate-keys", "--redis-url", redis_server.url, "--db", db, "--no-worker"]
        args += ["--keyring", str(keyfile), "--grace", "0", "--timeout", "0.5"]
        code, out, _ = run_cli(capsys, *args)
    finally:
        writer.close()
    assert code == 1 and "not done" in out and "--resume" in out, out


@pytest.mark.real_redis
def test_drop_retired_with_no_key_to_drop_succeeds_and_keeps_the_keys(
    redis_server: RedisServer,
    tmp_path: Path,
    keyfile: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Every record re-sealed, but a dead letter still holds the old key: the rotation is
    # done and there is nothing to drop. It went on to wait for the key leases, mark no
    # key, pass over the data again, and then failed with "not dropped".
    import dualmem.rotation as rotation_module

    args, old = _a_rotation_to_drop(redis_server, tmp_path, keyfile)
    codec = Codec(Keyring.load(keyfile))
    env = codec.seal({"v": 1}, scope=SCOPE, key="late", level=Level.PRIVATE, owner="a")
    fields = put_fields(SCOPE, "late", Level.PRIVATE, "a", 1, env, None)
    store = SQLiteStore(tmp_path / "m.db")
    try:
        store.dead_letter([(StreamEntry(0, "1-1", _raw(fields)), "disk I/O error", 3)])
    finally:
        store.close()
    waited: list[object] = []
    real_wait = rotation_module.wait_for_key_users

    def wait(*a: object, **kw: object) -> object:
        waited.append(a)
        return real_wait(*a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(rotation_module, "wait_for_key_users", wait)
    code, out, _ = run_cli(capsys, *args)
    assert code == 0 and "1 dead letter(s)" in out and "not dropped" not in out, out
    assert waited == [] and old in Keyring.load(keyfile).ids


@pytest.mark.real_redis
def test_drop_retired_waits_for_a_process_that_moves_on_after_its_first_look(
    redis_server: RedisServer,
    tmp_path: Path,
    keyfile: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A process still names the old key in its lease when the drop starts, and stops
    # writing a moment later: the drop must wait for it (up to --timeout), not refuse at
    # its first look.
    import dualmem.keyuse as keyuse_module

    args, old = _a_rotation_to_drop(redis_server, tmp_path, keyfile)
    lease = KeyLease(
        redis_server.client(), "dualmem", Codec(Keyring.load(keyfile)), interval=60, slack=60
    )
    lease.renew()  # loaded the key file before the rotation: names the old key only
    real = keyuse_module.key_users
    looks: list[list[str]] = []

    def key_users(*a: object, **kw: object) -> object:
        users = real(*a, **kw)  # type: ignore[arg-type]
        looks.append([u.token for u in users])
        if len(looks) == 1:
            lease.release()  # it stops writing right after the drop's first look
        return users

    monkeypatch.setattr(keyuse_module, "key_users", key_users)
    code, out, _ = run_cli(capsys, *args)
    assert code == 0 and f"dropped retired key(s) {old}" in out, out
    assert lease.token in looks[0] and old not in Keyring.load(keyfile).ids


def test_the_drop_mark_lasts_its_ttl_and_one_nobody_can_read_refuses(
    raw_redis: redis.Redis,
) -> None:
    # The drop marks the keys it removes for the whole of its last pass over the data
    # (--timeout + 60 s): a mark that expired in as many milliseconds let an import land
    # under a key the drop then removed. A mark that does not parse (another version
    # wrote it) cannot say which keys are safe: every send refuses.
    from dualmem.keyuse import clear_dropping, dropping_key, dropping_refusal, mark_dropping

    mark = dropping_key("dualmem")
    mark_dropping(raw_redis, "dualmem", ["k1"], ttl=60)
    assert raw_redis.pttl(mark) > 30_000
    assert dropping_refusal(raw_redis.get(mark), {"k1"}) is not None
    raw_redis.set(mark, b"junk", px=60_000)
    assert dropping_refusal(raw_redis.get(mark), {"k2"}) is not None
    clear_dropping(raw_redis, "dualmem")
    assert raw_redis.get(mark) is None


def test_the_drop_mark_names_every_key_dropped_and_replaces_a_mark_left_behind(
    raw_redis: redis.Redis,
) -> None:
    # A drop of two retired keys marked only the first: an import sealed under the
    # second landed during the last pass and the drop removed its key. A drop that
    # crashed leaves its mark (it expires after --timeout + 60 s); the next drop's mark
    # written only if none was there kept naming the old keys, not the new drop's.
    from dualmem.keyuse import clear_dropping, dropping_key, dropping_refusal, mark_dropping

    mark = dropping_key("dualmem")
    mark_dropping(raw_redis, "dualmem", ["k2", "k1"], ttl=60)
    assert dropping_refusal(raw_redis.get(mark), {"k1"}) is not None
    assert dropping_refusal(raw_redis.get(mark), {"k2"}) is not None
    assert dropping_refusal(raw_redis.get(mark), {"k3"}) is None
    mark_dropping(raw_redis, "dualmem", ["k3"], ttl=60)  # the first drop never cleared
    assert dropping_refusal(raw_redis.get(mark), {"k3"}) is not None
    clear_dropping(raw_redis, "dualmem")


def test_the_drop_mark_with_redis_down_is_a_clean_error_and_its_clearing_a_no_op() -> None:
    # mark_dropping (and the wait for the leases before it) with Redis unreachable
    # raised redis-py's ConnectionError, not StoreUnavailable (the CLI's "Redis is
    # unavailable"); clear_dropping, run in a finally after the last pass, raised too
    # and replaced the error that ended the drop (the mark expires anyway).
    from dualmem.keyuse import clear_dropping, mark_dropping

    down = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    with pytest.raises(StoreUnavailable):
        wait_for_key_users(down, "dualmem", "kactive", timeout=0)
    with pytest.raises(StoreUnavailable):
        mark_dropping(down, "dualmem", ["k1"], ttl=60)
    clear_dropping(down, "dualmem")


def test_the_wait_for_key_users_returns_at_its_first_look_when_no_lease_blocks(
    raw_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With every lease naming the active key alone, the drop goes ahead at once: a wait
    # that slept through its --timeout whatever it found passed every test.
    import dualmem.keyuse as keyuse_module

    raw_redis.sadd(b"dm:{dualmem:keyuse}", b"h:1:x")
    raw_redis.set(b"dm:{dualmem:keyuse}:h:1:x", json.dumps(["kactive"]))

    class Clock:
        monotonic = staticmethod(time.monotonic)

        @staticmethod
        def sleep(seconds: float) -> None:
            raise AssertionError(f"waited {seconds} s though no lease blocks")

    monkeypatch.setattr(keyuse_module, "time", Clock)
    assert wait_for_key_users(raw_redis, "dualmem", "kactive", timeout=600) == []


def test_an_operator_send_in_another_namespace_refuses_under_its_drop_mark(
    ops_settings: Settings, raw_redis: redis.Redis
) -> None:
    # The send WATCHes and reads dropping_key(namespace), the key mark_dropping writes
    # for the drop of that namespace: a mark looked up under the default namespace let
    # an import of the "team" deployment land under a key its drop then removed.
    from dualmem.errors import KeyDropped
    from dualmem.keyuse import clear_dropping, dropping_key, mark_dropping
    from dualmem.ops.runtime import Runtime, Write

    assert dropping_key("team") != dropping_key("dualmem")
    with Runtime(ops_settings.replace(namespace="team"), worker=False) as rt:
        old = rt.codec.keyring.active_id  # type: ignore[union-attr]
        env = rt.codec.seal({"v": 1}, scope=SCOPE, key="imp", level=Level.PRIVATE, owner="a")
        stream = rt.layout.stream(rt.layout.shard_of(SCOPE, "imp"))
        mark_dropping(raw_redis, "team", [old], ttl=60)
        with pytest.raises(KeyDropped, match=old):
            rt.send([Write(SCOPE, "imp", Level.PRIVATE, "a", env)])
        assert raw_redis.xlen(stream) == 0
        clear_dropping(raw_redis, "team")
        rt.send([Write(SCOPE, "imp", Level.PRIVATE, "a", env)])
        assert raw_redis.xlen(stream) == 1


def test_leases_of_two_namespaces_on_one_redis_stay_apart_each_in_one_slot(
    raw_redis: redis.Redis,
) -> None:
    # Two deployments share a Redis under their own namespaces. One index for both made
    # the first namespace's drop take the second's leases for expired and remove them
    # from the index: the second's drop then saw no process sealing with its old key.
    # The lease's index and entry share the hash tag {<namespace>:keyuse}, so the
    # renewal's MULTI touches one slot (valid on Redis Cluster) whatever the namespace.
    from redis.crc import key_slot

    codec = Codec(Keyring.generate())
    alpha = KeyLease(raw_redis, "alpha", codec, interval=60, slack=3)
    beta = KeyLease(raw_redis, "beta", codec, interval=60, slack=3)
    alpha.renew()
    beta.renew()
    assert [u.token for u in key_users(raw_redis, "alpha")] == [alpha.token]
    assert [u.token for u in key_users(raw_redis, "beta")] == [beta.token]
    assert [u.token for u in key_users(raw_redis, "alpha")] == [alpha.token]
    for ns, lease in (("alpha", alpha), ("beta", beta)):
        index, entry = f"dm:{{{ns}:keyuse}}".encode(), f"dm:{{{ns}:keyuse}}:{lease.token}"
        assert raw_redis.sismember(index, lease.token)
        assert raw_redis.exists(entry.encode())
        assert key_slot(index) == key_slot(entry.encode())
    alpha.release()
    assert key_users(raw_redis, "alpha") == []
    assert [u.token for u in key_users(raw_redis, "beta")] == [beta.token]


def test_an_operator_send_never_lands_under_a_key_being_dropped(
    ops_settings: Settings,
    keyfile: Path,
    raw_redis: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An import (or the mirror, or a replay) seals long before it sends: it could land
    # after the drop's last look at the data, under a key the drop then removed.
    from dualmem.errors import KeyDropped
    from dualmem.keyuse import clear_dropping, mark_dropping
    from dualmem.ops import runtime as runtime_module
    from dualmem.ops.runtime import Runtime, Write

    with Runtime(ops_settings, worker=False) as rt:
        old = rt.codec.keyring.active_id  # type: ignore[union-attr]
        env = rt.codec.seal({"v": 1}, scope=SCOPE, key="imp", level=Level.PRIVATE, owner="a")
        write = Write(SCOPE, "imp", Level.PRIVATE, "a", env)
        stream = rt.layout.stream(rt.layout.shard_of(SCOPE, "imp"))
        new = add_active_key(keyfile).active_id
        # The drop has marked the old key: the send refuses, nothing reaches Redis.
        mark_dropping(raw_redis, "dualmem", [old], ttl=60)
        with pytest.raises(KeyDropped, match=old):
            rt.send([write])
        assert raw_redis.xlen(stream) == 0
        # A drop that starts between the send's WATCH and its EXEC aborts the EXEC; the
        # send looks again and refuses.
        clear_dropping(raw_redis, "dualmem")
        refusal = runtime_module.dropping_refusal
        calls: list[object] = []

        def racing(mark: object, ids: set[str]) -> str | None:
            calls.append(mark)
            if len(calls) == 1:
                mark_dropping(raw_redis, "dualmem", [old], ttl=60)  # after WATCH, before EXEC
            return refusal(mark, ids)

        monkeypatch.setattr(runtime_module, "dropping_refusal", racing)
        with pytest.raises(KeyDropped, match=old):
            rt.send([write])
        assert len(calls) == 2 and raw_redis.xlen(stream) == 0
        monkeypatch.undo()
        # Once dropped, the key file refuses it (the mark is gone by then).
        clear_dropping(raw_redis, "dualmem")
        drop_keys(keyfile, [old])
        with pytest.raises(KeyDropped, match="no longer in the key file"):
            rt.send([write])
        assert raw_redis.xlen(stream) == 0
        # Sealed under the active key, it goes through.
        fresh = rt.codec.seal({"v": 2}, scope=SCOPE, key="imp", level=Level.PRIVATE, owner="a")
        assert envelope_key_id(fresh) == new
        (receipt,) = rt.send([Write(SCOPE, "imp", Level.PRIVATE, "a", fresh)])
        assert raw_redis.xlen(stream) == 1 and receipt.stream_id


def test_a_writer_whose_lease_lapsed_reloads_its_key_file_before_it_seals(
    make_mem: MakeMem, keyfile: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A renewal that failed with its write was not due again for a whole interval: the
    # lease expired, a drop went ahead, and the writer went on sealing with the dropped
    # key until its key file watcher came round.
    import dualmem.memory as memory_module

    p = Principal(agent_id="a")
    writer = make_mem(
        worker=False,
        keyring_reload_interval=2.0,
        connect_timeout=0.05,
        socket_timeout=0.05,
        redis_retries=0,
    )
    assert writer._lease is not None
    t0 = time.monotonic()  # its lease was taken at start, good for 2 + 1.2 + 1 s
    time.sleep(2.05)  # a renewal is due
    real = memory_module.transact

    def failing(*args: object, **kwargs: object) -> object:
        raise redis.ConnectionError("Redis restarting")

    monkeypatch.setattr(memory_module, "transact", failing)
    with pytest.raises(StoreUnavailable):
        writer.put("a", 1, level=Level.PRIVATE, principal=p)
    monkeypatch.setattr(memory_module, "transact", real)
    new = add_active_key(keyfile).active_id  # a rotation starts; the watcher looked just now
    time.sleep(max(0.0, t0 + 3.1 - time.monotonic()))  # no renewal for interval + 1 s
    writer.put("b", 2, level=Level.PRIVATE, principal=p)
    cached = writer.get("b", level=Level.PRIVATE, principal=p, fresh=True)
    assert cached == 2
    assert writer.codec.keyring is not None and writer.codec.keyring.active_id == new
    assert not writer._lease.lapsed()  # renewed with that write


# -- the command, with real processes --------------------------------------------------------


@pytest.mark.real_redis
@pytest.mark.slow
def test_rotate_keys_online_killed_and_resumed(
    own_redis_server: RedisServer, tmp_path: Path
) -> None:
    fig = attacks.key_rotation(FaultEnv(own_redis_server, tmp_path / "world"), records=600)
    assert fig.problems == [], "\n".join(fig.problems)
    assert fig.lost == 0 and fig.duplicated == 0
    assert fig.extra["left_under_old_key_after"] == 0
    assert fig.extra["cache_entries_under_old_key_after"] == 0
    assert fig.extra["old_key_dropped"] and fig.extra["keys_lost_newest_value"] == 0
    # The kill was mid-way: after the first row was re-sealed, before the last.
    assert (
        0 < fig.extra["left_under_old_key_when_killed"] < fig.extra["records_under_old_key_before"]
    )
    assert fig.extra["resumed_the_killed_runs_key"]  # --resume finished that run's rotation


@pytest.mark.real_redis
def test_the_rotation_attack_counts_the_rows_and_cache_entries_sealed_under_a_key(
    own_redis_server: RedisServer, tmp_path: Path
) -> None:
    # The attack's "nothing left under the old key" counted cache entries with a pattern
    # no cache key matches: 0 whatever the cache held.
    env = FaultEnv(own_redis_server, tmp_path / "world")
    mem = env.memory(worker=True)
    try:
        p = Principal(agent_id="a", team="t", swarm="s")
        levels = (Level.PRIVATE, Level.TEAM, Level.SWARM)  # swarm: plaintext, no key id
        for r in [mem.put(f"k{i}", i, level=lvl, principal=p) for i in range(3) for lvl in levels]:
            mem.sync(r, timeout=30)
    finally:
        mem.close()
    kid = Keyring.load(env.keyfile).active_id
    assert attacks._rows_under(env.db, kid) == 6 and attacks._cache_under(env, kid) == 6
    assert attacks._rows_under(env.db, "k0000dead") == attacks._cache_under(env, "k0000dead") == 0


def test_rotate_keys_refuses_memory_url_and_needs_a_key_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DUALMEM_KEYRING", raising=False)
    db = str(tmp_path / "m.db")
    assert main(["rotate-keys", "--redis-url", "memory://", "--db", db]) == 2
    assert "memory://" in capsys.readouterr().err
    assert main(["rotate-keys", "--redis-url", "redis://127.0.0.1:1/0", "--db", db]) == 2
    assert "--keyring" in capsys.readouterr().err


@pytest.mark.real_redis
def test_a_rotation_that_cannot_run_leaves_the_key_file_alone(
    redis_server: RedisServer,
    tmp_path: Path,
    keyfile: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Each of these used to add a new active key to the file, then fail (exit 2).
    before = keyfile.read_bytes()
    db = tmp_path / "m.db"
    newer = tmp_path / "newer.db"
    with sqlite3.connect(newer) as conn:
        conn.execute("PRAGMA user_version = 99")
    conn.close()
    base = ["rotate-keys", "--keyring", str(keyfile), "--no-worker"]
    cases = [
        (["--redis-url", redis_server.url, "--db", str(db), "--grace", "nan"], "--grace"),
        (["--redis-url", redis_server.url, "--db", str(db), "--timeout", "inf"], "--timeout"),
        # A batch of 0 rows re-sealed nothing, after the new key was added.
        (["--redis-url", redis_server.url, "--db", str(db), "--batch-size", "0"], "--batch-size"),
        (["--redis-url", "redis://127.0.0.1:1/0", "--db", str(db)], "unavailable"),
        (["--redis-url", redis_server.url, "--db", str(newer)], "newer"),
        # A mistyped --db: the rotation's worker committed the deployment's pending
        # commands into a new file, and --drop-retired dropped the real database's key.
        (["--redis-url", redis_server.url, "--db", str(db), "--drop-retired"], "no database"),
    ]
    for extra, why in cases:
        code, _, err = run_cli(capsys, *base, *extra)
        assert code == 2 and why in err, (extra, err)
        assert keyfile.read_bytes() == before, extra
    assert not db.exists()


@pytest.mark.parametrize("junk", [b"5", b"null", b"true", b"{not json", b'{"a": 1}'])
def test_a_lease_holding_junk_blocks_a_drop_and_breaks_nothing(
    redis_url: str, raw_redis: redis.Redis, junk: bytes
) -> None:
    # Valid JSON that is not a list made the drop's lease check raise TypeError.
    raw_redis.sadd(b"dm:{dualmem:keyuse}", b"h:1:x")
    raw_redis.set(b"dm:{dualmem:keyuse}:h:1:x", junk)
    (user,) = wait_for_key_users(raw_redis, "dualmem", "kactive", timeout=0)
    assert user.token == "h:1:x" and user.ids != ("kactive",)


def test_a_lease_naming_an_old_key_after_the_active_one_blocks_a_drop(
    raw_redis: redis.Redis,
) -> None:
    # A lease names the active key first, then the keys it may still seal with (one
    # active less than landing_slack ago, every key of an import's keyring). Looking at
    # the first id alone let the drop go ahead under a process still sealing with kold.
    raw_redis.sadd(b"dm:{dualmem:keyuse}", b"h:1:x", b"h:2:y")
    raw_redis.set(b"dm:{dualmem:keyuse}:h:1:x", json.dumps(["kactive", "kold"]))
    raw_redis.set(b"dm:{dualmem:keyuse}:h:2:y", json.dumps(["kactive"]))
    (user,) = wait_for_key_users(raw_redis, "dualmem", "kactive", timeout=0)
    assert user.token == "h:1:x" and user.ids == ("kactive", "kold")


def test_the_last_look_never_misses_a_put_the_worker_commits_meanwhile(
    make_mem: MakeMem, keyfile: Path, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The leftovers check counted SQLite first and read the stream last: a put sealed
    # with the old key, committed by a worker in between (its cache entry already
    # re-sealed by this pass), was in neither, and --drop-retired removed its key.
    from dualmem.rotation import _Rotation

    p = Principal(agent_id="a")
    writer = make_mem(worker=False)  # the workers run elsewhere, and lag
    old = writer.codec.keyring.active_id  # type: ignore[union-attr]
    receipt = writer.put("k", {"v": 1}, level=Level.PRIVATE, principal=p)
    add_active_key(keyfile)
    rotator = make_mem(worker=False)
    real = _Rotation._cache_names
    calls = [0]

    def cache_names(self: _Rotation) -> Iterator[list[bytes]]:
        calls[0] += 1
        if calls[0] == 2:  # the leftovers' cache scan
            make_mem().sync(receipt, timeout=10)  # a worker catches up right now
        yield from real(self)

    monkeypatch.setattr(_Rotation, "_cache_names", cache_names)
    report = rotate_keys(rotator, timeout=5)
    with sqlite3.connect(db_path) as conn:
        (env,) = conn.execute("SELECT envelope FROM memory WHERE key = 'k'").fetchone()
    conn.close()
    # Either the rotation went on and re-sealed it, or it says the old key is still used.
    still_old = envelope_key_id(bytes(env)) == old
    assert not (still_old and report.done and old in report.retired), report


def test_a_writer_whose_lease_lapsed_does_not_seal_when_its_key_file_cannot_be_read(
    make_mem: MakeMem, keyfile: Path
) -> None:
    # Its lease expired, so no drop waits for it; a key file it cannot read cannot tell
    # it whether its key is still there, and it went on sealing with that key.
    from dualmem.errors import ConfigurationError

    p = Principal(agent_id="a")
    writer = make_mem(worker=False, keyring_reload_interval=0.05)
    writer.put("a", 1, level=Level.PRIVATE, principal=p)
    good = keyfile.read_bytes()
    time.sleep(1.2)  # no write for interval + 1 s: the lease may have lapsed
    keyfile.write_text("not a key file")
    with pytest.raises(ConfigurationError, match="cannot be read"):
        writer.put("b", 2, level=Level.PRIVATE, principal=p)
    keyfile.write_bytes(good)
    writer.put("b", 2, level=Level.PRIVATE, principal=p)
    assert writer.get("b", level=Level.PRIVATE, principal=p, fresh=True) == 2


def test_a_writer_keeps_writing_after_it_changes_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The key file watcher kept a relative path: after os.chdir its stat failed, and once
    # the lease lapsed every put was refused as if the key file could not be read.
    import uuid

    from dualmem.redis_backend import drop_memory_server

    p = Principal(agent_id="a")
    monkeypatch.chdir(tmp_path)
    url = f"memory://chdir-{uuid.uuid4().hex}"
    mem = DualMemory(url, keyring_reload_interval=0.2)  # dualmem.db and its key file, relative
    try:
        mem.sync(mem.put("a", 1, level=Level.PRIVATE, principal=p), timeout=10)
        (tmp_path / "elsewhere").mkdir()
        monkeypatch.chdir(tmp_path / "elsewhere")
        time.sleep(1.5)  # idle: the key lease lapses
        mem.sync(mem.put("b", 2, level=Level.PRIVATE, principal=p), timeout=10)
        assert mem.get("b", level=Level.PRIVATE, principal=p) == 2
    finally:
        mem.close()
        drop_memory_server(url)


# -- one rotation at a time ------------------------------------------------------------------


def _streams(raw_redis: redis.Redis) -> list[bytes]:
    # The command streams are dm:{<namespace>:<shard>}:cmd: the pattern dm:*:s:* used
    # here matched no key, and every "sent nothing" check compared 0 with 0.
    return [bytes(s) for s in raw_redis.scan_iter(match=b"dm:*:cmd")]


def _stream_length(raw_redis: redis.Redis) -> int:
    """Entries in the command streams now (a worker trims the ones it committed)."""
    return sum(int(raw_redis.xlen(s)) for s in _streams(raw_redis))


def _entries_added(raw_redis: redis.Redis) -> int:
    """Entries ever added to the command streams (trimming does not lower it)."""
    return sum(int(raw_redis.xinfo_stream(s)["entries-added"]) for s in _streams(raw_redis))


def _a_record_under_the_old_key(make_mem: MakeMem, keyfile: Path) -> DualMemory:
    """One committed record sealed with the key a new active key just replaced; returns a
    process (no worker of its own) to rotate with."""
    mem = make_mem()
    p = Principal(agent_id="a")
    mem.sync(mem.put("k", {"v": 1}, level=Level.PRIVATE, principal=p), timeout=10)
    add_active_key(keyfile)
    return make_mem(worker=False)


def test_a_second_rotation_waits_for_the_first_and_sends_nothing(
    make_mem: MakeMem, keyfile: Path, raw_redis: redis.Redis
) -> None:
    # Two rotations at once each re-sealed the other's rows back under their own key.
    rotator = _a_record_under_the_old_key(make_mem, keyfile)
    first = RotationLock(raw_redis, rotator.settings.namespace).acquire(timeout=0)
    try:
        before = _entries_added(raw_redis)
        t0 = time.monotonic()
        with pytest.raises(RotationBusy, match=f"process {os.getpid()} on"):
            rotate_keys(rotator, timeout=0.5)
        assert time.monotonic() - t0 >= 0.5  # it waited for the other one to end
        assert _entries_added(raw_redis) == before  # and re-sealed nothing
    finally:
        first.release()
    report = rotate_keys(rotator, timeout=30)  # the lock is free again
    assert report.resealed_rows == 1 and report.done


def test_a_rotation_that_lost_its_lock_stops_before_it_sends(
    make_mem: MakeMem, keyfile: Path, raw_redis: redis.Redis
) -> None:
    rotator = _a_record_under_the_old_key(make_mem, keyfile)
    namespace = rotator.settings.namespace
    # Taken over by another process (this one was frozen past the lock's expiry): the
    # heartbeat sees a value that is not its own.
    lock = RotationLock(raw_redis, namespace, ttl=5).acquire(timeout=0)
    raw_redis.set(b"dm:{%s:keyuse}:rotation" % namespace.encode(), b"someone else")
    before = _entries_added(raw_redis)
    # At once, not at the heartbeat's next renewal (it kept sending for up to ttl/4).
    with pytest.raises(RotationBusy, match="lost its lock"):
        rotate_keys(rotator, timeout=5, lock=lock)
    assert _entries_added(raw_redis) == before
    lock.release()
    assert raw_redis.get(b"dm:{%s:keyuse}:rotation" % namespace.encode()) == b"someone else"
    # Not renewed for longer than its ttl (a frozen process, Redis unreachable): the same.
    raw_redis.delete(b"dm:{%s:keyuse}:rotation" % namespace.encode())
    stale = RotationLock(raw_redis, namespace, ttl=0.3).acquire(timeout=0)
    stale._stop.set()  # no more renewals
    time.sleep(0.4)
    with pytest.raises(RotationBusy, match="not renewed"):
        rotate_keys(rotator, timeout=5, lock=stale)
    assert _entries_added(raw_redis) == before
    stale.release()


def test_the_lock_of_a_rotation_killed_on_this_host_is_taken_over_at_once(
    raw_redis: redis.Redis,
) -> None:
    import subprocess
    import sys

    from dualmem.rotation_lock import _process_namespace

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: its pid names no process now
    here = _process_namespace()
    assert here  # Linux: boot id and pid namespace
    holder = {"host": socket.gethostname(), "pid": dead.pid, "token": "x", "since": 0}
    # The same host name in another pid namespace (a container on the host's network):
    # that pid may well be alive there. It was taken over at once; now it is waited for.
    elsewhere = json.dumps({**holder, "ns": "another-boot:1"})
    raw_redis.set(b"dm:{ns:keyuse}:rotation", elsewhere, px=60_000)
    with pytest.raises(RotationBusy, match=f"process {dead.pid} on"):
        RotationLock(raw_redis, "ns").acquire(timeout=0.3)
    value = json.dumps({**holder, "ns": here})
    raw_redis.set(b"dm:{ns:keyuse}:rotation", value, px=60_000)
    t0 = time.monotonic()
    lock = RotationLock(raw_redis, "ns").acquire(timeout=30)
    assert time.monotonic() - t0 < 5
    assert raw_redis.get(b"dm:{ns:keyuse}:rotation") == lock.value
    lock.release()
    # Its own value already there (SET ran, its reply was lost, the retry found the key
    # taken): acquired, not a wait for itself until the expiry.
    mine = RotationLock(raw_redis, "ns")
    raw_redis.set(b"dm:{ns:keyuse}:rotation", mine.value, px=60_000)
    mine.acquire(timeout=0).release()
    assert raw_redis.get(b"dm:{ns:keyuse}:rotation") is None
    # A live holder (this very process, seen from another lock) is waited for instead.
    alive = json.dumps({"host": socket.gethostname(), "pid": os.getppid(), "token": "y"})
    raw_redis.set(b"dm:{ns:keyuse}:rotation", alive, px=60_000)
    with pytest.raises(RotationBusy, match=f"process {os.getppid()} on"):
        RotationLock(raw_redis, "ns").acquire(timeout=0.3)
    assert raw_redis.get(b"dm:{ns:keyuse}:rotation") == alive.encode()


def test_a_rotation_whose_lock_expired_stops(raw_redis: redis.Redis) -> None:
    # Redis lost the lock (evicted, flushed, failed over): another rotation can take it
    # now, so this one must stop before it sends or edits anything more.
    lock = RotationLock(raw_redis, "ns").acquire(timeout=0)
    raw_redis.delete(b"dm:{ns:keyuse}:rotation")
    with pytest.raises(RotationBusy, match="it expired"):
        lock.check()
    lock.release()


def test_the_heartbeat_keeps_the_lock_past_its_ttl_and_renews_only_its_own(
    raw_redis: redis.Redis,
) -> None:
    # A rotation runs for longer than the lock's ttl: the heartbeat must renew it in
    # time, or check() stopped every long rotation. And it renews only while the value
    # is its own: extending another rotation's lock gave that one this ttl, and this one
    # never learned it had lost the lock.
    lock = RotationLock(raw_redis, "ns", ttl=1.0).acquire(timeout=0)
    time.sleep(2.5)
    lock.check()  # still ours
    assert raw_redis.get(b"dm:{ns:keyuse}:rotation") == lock.value
    raw_redis.set(b"dm:{ns:keyuse}:rotation", b"someone else", px=60_000)
    wait_until(lambda: lock._lost is not None, timeout=10, what="the heartbeat to see it")
    assert raw_redis.pttl(b"dm:{ns:keyuse}:rotation") > 30_000  # not renewed by this one
    lock.release()
    assert raw_redis.get(b"dm:{ns:keyuse}:rotation") == b"someone else"


def test_a_dead_holders_lock_is_taken_over_only_while_it_still_holds_it(
    raw_redis: redis.Redis,
) -> None:
    # Two rotations that both read a killed holder's value race to take its lock over:
    # the second to act finds the first's value there and must leave it. Overwritten,
    # both rotations held the lock at once.
    import subprocess
    import sys

    from dualmem.rotation_lock import _process_namespace

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    holder = {"host": socket.gethostname(), "pid": dead.pid, "token": "x", "since": 0}
    stale = json.dumps({**holder, "ns": _process_namespace()}).encode()
    raw_redis.set(b"dm:{ns:keyuse}:rotation", stale, px=60_000)
    first = RotationLock(raw_redis, "ns").acquire(timeout=0)  # took it over
    second = RotationLock(raw_redis, "ns")
    assert not second._take_over(stale)  # what it read before the first took it over
    assert raw_redis.get(b"dm:{ns:keyuse}:rotation") == first.value
    first.check()
    first.release()


@pytest.mark.real_redis
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a check as another user")
def test_a_live_rotation_of_another_user_on_this_host_is_waited_for(
    redis_server: RedisServer,
) -> None:
    # A holder whose pid another user may not signal (EPERM) is alive: it is waited for.
    # Taken for dead, a second rotation took over the lock of a running one, and two
    # rotations re-sealed and dropped keys at once.
    from dualmem.rotation_lock import _process_namespace

    client = redis_server.client()
    client.flushall()
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "token": "x", "since": 0}
    value = json.dumps({**holder, "ns": _process_namespace()}).encode()
    client.set(b"dm:{ns:keyuse}:rotation", value, px=60_000)
    child = os.fork()
    if child == 0:  # the other user's rotation: may not signal this (root) process
        code = 3
        try:
            os.setuid(65534)
            RotationLock(redis.Redis.from_url(redis_server.url), "ns").acquire(timeout=0.3)
            code = 1
        except RotationBusy:
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the lock was taken over"
    assert client.get(b"dm:{ns:keyuse}:rotation") == value


@pytest.mark.real_redis
def test_rotate_keys_waits_for_a_running_rotation_before_it_adds_a_key(
    redis_server: RedisServer,
    tmp_path: Path,
    keyfile: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    before = keyfile.read_bytes()
    SQLiteStore(tmp_path / "m.db").close()  # rotate-keys needs an existing database
    held = RotationLock(redis_server.client(), "dualmem").acquire(timeout=0)
    try:
        code, out, err = run_cli(
            capsys,
            *("rotate-keys", "--keyring", str(keyfile), "--no-worker", "--timeout", "0.5"),
            *("--redis-url", redis_server.url, "--db", str(tmp_path / "m.db")),
        )
    finally:
        held.release()
    assert code == 2, (out, err)
    assert "waiting for the key rotation of process" in out
    assert "another key rotation is running" in err
    assert keyfile.read_bytes() == before  # no key added while the other one ran


def test_a_running_process_keeps_its_keys_when_its_key_file_turns_to_junk(
    make_mem: MakeMem, keyfile: Path
) -> None:
    # A key file rewritten with bytes that are not UTF-8: the watcher let the raw
    # UnicodeDecodeError out of every write and of reads that reload on a missing key.
    p = Principal(agent_id="a")
    mem = make_mem(keyring_reload_interval=0.05)
    mem.sync(mem.put("k", {"v": 1}, level=Level.PRIVATE, principal=p), timeout=10)
    keyfile.write_bytes(b"\xff\xfe" + b"\x00junk" * 10)
    time.sleep(0.1)
    mem.sync(mem.put("k2", {"v": 2}, level=Level.PRIVATE, principal=p), timeout=10)
    assert mem.get("k", level=Level.PRIVATE, principal=p) == {"v": 1}
    assert mem.get("k2", level=Level.PRIVATE, principal=p) == {"v": 2}
    assert mem._keyfile is not None and mem._keyfile.failed


def test_a_replay_or_a_send_whose_key_file_cannot_be_read_never_lands_under_a_dropped_key(
    ops_settings: Settings, keyfile: Path, raw_redis: redis.Redis
) -> None:
    # A dead letter replayed is sent as its stream entry (raw): its envelope's key was
    # not looked at, so a replay landed under a key the drop was removing. And a key file
    # that cannot be read cannot say a key is still in it: such a send went through on
    # the keyring loaded before.
    from dualmem.errors import KeyDropped
    from dualmem.keyuse import clear_dropping, mark_dropping
    from dualmem.ops.runtime import Runtime, Write

    with Runtime(ops_settings, worker=False) as rt:
        old = rt.codec.keyring.active_id  # type: ignore[union-attr]
        env = rt.codec.seal({"v": 1}, scope=SCOPE, key="dl", level=Level.PRIVATE, owner="a")
        letter = put_fields(SCOPE, "dl", Level.PRIVATE, "a", 1, env, None)
        stream = rt.layout.stream(0)
        mark_dropping(raw_redis, "dualmem", [old], ttl=60)
        with pytest.raises(KeyDropped, match=old):
            rt.send([], raw=[(0, _raw(letter))])
        assert raw_redis.xlen(stream) == 0
        clear_dropping(raw_redis, "dualmem")
        keyfile.write_text("not a key file")
        with pytest.raises(KeyDropped, match="cannot be read"):
            rt.send([Write(SCOPE, "dl", Level.PRIVATE, "a", env)])
        assert all(raw_redis.xlen(rt.layout.stream(s)) == 0 for s in range(ops_settings.shards))
