"""Attack 11 (key rotation): the reseal command, ``dualmem.rotation`` and ``rotate-keys``.

The store-level tests pin the reseal contract the rotation relies on: a re-encrypted
envelope replaces a row only while the row is still the one the rotation read, so a
concurrent newer put or delete always wins, and replaying it changes nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from acl import Level
from dualmem.commands import delete_fields, put_fields, reseal_fields
from dualmem.sqlite_store import SQLiteStore
from dualmem.store import StreamEntry

SCOPE = "agent:a"


def _raw(fields: dict[bytes, bytes | str | int]) -> dict[bytes, bytes]:
    return {k: v if isinstance(v, bytes) else str(v).encode() for k, v in fields.items()}


def put(sid: str, envelope: bytes, key: str = "k") -> StreamEntry:
    return StreamEntry(0, sid, _raw(put_fields(SCOPE, key, Level.PRIVATE, "a", 1, envelope, None)))


def reseal(sid: str, envelope: bytes, guard: str, key: str = "k") -> StreamEntry:
    f = reseal_fields(SCOPE, key, Level.PRIVATE, "rotation", 2, envelope, guard)
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


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({b"l": b"3", b"s": b"swarm:s"}, "not encrypted"),
        ({b"g": b"yesterday"}, "stream id"),
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
