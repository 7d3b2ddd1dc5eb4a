"""The I/O-free core: settings, key checks, stream entries, batch planning, histograms."""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import threading
from pathlib import Path

import pytest

from acl import ConfigurationError, Level, ValidationError
from acl.crypto import Keyring
from dualmem.batch import GENESIS, chain_hash, journal_hash_values, plan_batch
from dualmem.commands import (
    MAX_KEY_BYTES,
    MAX_TTL_SECONDS,
    MalformedCommand,
    audit_fields,
    check_key,
    decode_command,
    delete_fields,
    put_fields,
    sid_of,
    stream_id_of,
    ttl_to_ms,
)
from dualmem.layout import Layout
from dualmem.metrics import Histogram, Metrics, prometheus_text
from dualmem.settings import MAX_WAIT_SECONDS, Settings, check_seconds, load_keyring
from dualmem.store import StreamEntry

from .conftest import redis_fields as raw

# -- settings -----------------------------------------------------------------------------


def test_arguments_beat_environment_beat_defaults() -> None:
    env = {"DUALMEM_SHARDS": "3", "DUALMEM_BATCH_SIZE": "50", "DUALMEM_WORKER": "false"}
    s = Settings.load({"shards": 2}, environ=env)
    assert (s.shards, s.batch_size, s.worker) == (2, 50, False)
    assert Settings.load(environ={}).redis_url == "memory://"


def test_without_an_environ_argument_the_process_environment_is_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The tests pass environ= everywhere; a load() that read no variables unless given
    # one would leave every deployment's DUALMEM_* settings at their defaults in silence.
    monkeypatch.setenv("DUALMEM_SHARDS", "5")
    monkeypatch.setenv("DUALMEM_NAMESPACE", "from-env")
    s = Settings.load({"namespace": "given"})
    assert (s.shards, s.namespace) == (5, "given")
    assert Settings.load(environ={}).shards == Settings().shards


def test_key_and_keyring_are_one_choice() -> None:
    # An argument for either drops the environment's other one (DUALMEM_KEYRING beat an
    # explicit key= in silence); both as arguments, or both in the environment, is refused.
    both_env = {"DUALMEM_KEY": "a2V5", "DUALMEM_KEYRING": "env.json"}
    s = Settings.load({"key": "bXk="}, environ=both_env)
    assert (s.key, s.keyring, s.keyring_file) == ("bXk=", None, None)
    s = Settings.load({"keyring": "mine.json"}, environ={"DUALMEM_KEY": "a2V5"})
    assert (s.key, s.keyring) == (None, "mine.json")
    s = Settings.load({}, environ={"DUALMEM_KEY": "a2V5"}, keyring_object=True)
    assert (s.key, s.keyring) == (None, None)
    with pytest.raises(ConfigurationError, match="key and keyring are both given as arguments"):
        Settings.load({"key": "bXk=", "keyring": "mine.json"}, environ={})
    with pytest.raises(ConfigurationError, match="key and keyring are both given as arguments"):
        Settings.load({"key": "bXk="}, environ={}, keyring_object=True)
    with pytest.raises(ConfigurationError, match="DUALMEM_KEY and DUALMEM_KEYRING are both set"):
        Settings.load({}, environ=both_env)
    with pytest.raises(ConfigurationError, match="key and keyring are both set"):
        Settings(key="bXk=", keyring="mine.json").validate()


def test_a_misspelled_environment_variable_is_named_in_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    env = {"DUALMEM_BATCHSIZE": "50", "DUALMEM_SHARDS": "2", "DUALMEM_ZZZ_QX": "1"}
    with caplog.at_level(logging.WARNING, logger="dualmem.settings"):
        s = Settings.load(environ=env)
        Settings.load(environ=env)  # once per process, not once per load
    assert (s.batch_size, s.shards) == (Settings().batch_size, 2)
    warned = [r.getMessage() for r in caplog.records if r.name == "dualmem.settings"]
    assert warned == [
        "ignoring DUALMEM_BATCHSIZE: dualmem has no such setting (did you mean "
        "DUALMEM_BATCH_SIZE?)",
        "ignoring DUALMEM_ZZZ_QX: dualmem has no such setting",
    ]


@pytest.mark.parametrize(
    ("overrides", "env", "match"),
    [
        ({"nonsense": 1}, {}, "unknown setting"),
        ({}, {"DUALMEM_SHARDS": "many"}, "DUALMEM_SHARDS"),
        ({"batch_size": 0}, {}, "batch_size"),
        ({"redis_url": "http://x"}, {}, "redis_url"),
        ({"namespace": "a{b}"}, {}, "namespace"),
        ({"socket_timeout": 0}, {}, "socket_timeout"),
        ({"shards": True}, {}, "shards"),
        ({}, {"DUALMEM_WORKER": "maybe"}, "DUALMEM_WORKER"),
        # Passed validation, then failed (or half-wrote) later:
        ({"close_timeout": float("inf")}, {}, "close_timeout"),  # OverflowError in close()
        ({"close_timeout": 10**9}, {}, "close_timeout"),  # no room for what waits add
        ({}, {"DUALMEM_SOCKET_TIMEOUT": "1e400"}, "socket_timeout"),  # at the first connect
        ({"cache_ttl": 10**16}, {}, "cache_ttl"),  # PX refused inside EXEC, XADD ran
        ({"redis_url": "redis://h:notaport/0"}, {}, "redis_url"),  # bare ValueError
        ({"redis_url": "redis://h:99999/0"}, {}, "redis_url"),
        ({"block_ms": 10**13}, {}, "block_ms"),  # the worker thread failed, close() raised
        ({"block_ms": 0}, {}, "block_ms must be >= 1"),  # an idle worker spun on reads
        ({"max_connections": 10**9}, {}, "max_connections must be at most 10,000"),  # hung
        ({"socket_timeout": 10**400}, {}, "socket_timeout must be a finite number"),  # Overflow
        # A lone surrogate or NUL raised later: a consumer's killed the worker thread.
        ({"consumer": "w\ud800"}, {}, "consumer must be valid Unicode"),
        ({"namespace": "n\ud800"}, {}, "namespace must be valid Unicode"),
        ({"group": "g\ud800"}, {}, "group must be valid Unicode"),
        ({"db_path": "a\x00b.db"}, {}, "db_path must be valid Unicode without NUL"),
        ({"keyring": "k\ud800.json"}, {}, "keyring must be valid Unicode"),
        # A line break in a worker's name forged log lines ("worker %s: ..."); an empty
        # group name reached XGROUP CREATE.
        ({"consumer": "w\nWARNING forged"}, {}, "consumer must hold no control characters"),
        ({"group": "g\x1b[31m"}, {}, "group must hold no control characters"),
        ({"consumer": "w\x85"}, {}, "consumer must hold no control characters"),  # C1: NEL
        ({"group": ""}, {}, "setting group must not be empty"),
        ({"claim_idle_ms": 10**20}, {}, "claim_idle_ms"),  # XAUTOCLAIM refused, forever
        ({}, {"DUALMEM_BUSY_TIMEOUT_MS": str(10**13)}, "busy_timeout_ms"),
        # Past these bounds the worker (or every put) failed later, again and again:
        ({"batch_size": 2**63}, {}, "batch_size must be at most 100,000"),  # XREADGROUP COUNT
        ({}, {"DUALMEM_BATCH_SIZE": "100001"}, "batch_size must be at most 100,000"),
        ({"shards": 2**40}, {}, "shards must be at most 1,024"),  # construction never ended
        ({"max_deliveries": 10_001}, {}, "max_deliveries must be at most 10,000"),  # its row
        ({"redis_retries": 101}, {}, "redis_retries must be at most 100"),  # the lease's PX
        ({"sqlite_cache_mb": 2**21 + 1}, {}, "sqlite_cache_mb must be at most 2,097,152"),
        ({"tombstone_ttl": 10**12 + 1}, {}, "tombstone_ttl must be at most 1,000,000,000,000"),
        # Not silently made into another value: a "2.5" shards read as 2, a 1 as a worker.
        ({}, {"DUALMEM_SHARDS": "2.5"}, "DUALMEM_SHARDS='2.5' is not a valid int"),
        ({}, {"DUALMEM_BATCH_SIZE": "1e3"}, "DUALMEM_BATCH_SIZE='1e3' is not a valid int"),
        ({"worker": 1}, {}, "setting worker must be a bool, got 1"),
        ({"worker": "1.0"}, {}, "setting worker must be a bool"),
    ],
)
def test_bad_settings_name_the_setting(
    overrides: dict[str, object], env: dict[str, str], match: str
) -> None:
    with pytest.raises(ConfigurationError, match=match):
        Settings.load(overrides, environ=env)


# Every number setting's bounds, written out here rather than read from the code's own
# lists: a setting dropped from one of them (its lower bound, its ceiling) passed every
# test before (mutation check). The last assertion makes a new number setting join a row.
_AT_LEAST_1 = (
    "shards", "batch_size", "max_deliveries", "max_backlog", "max_value_bytes",
    "sqlite_cache_mb", "max_connections", "block_ms",
)  # fmt: skip
_AT_LEAST_0 = (
    "claim_idle_ms", "compress_threshold", "cache_ttl", "redis_retries", "busy_timeout_ms",
    "tombstone_ttl",
)  # fmt: skip
_SECONDS = (
    "socket_timeout", "connect_timeout", "close_timeout", "metrics_interval",
    "purge_interval", "keyring_reload_interval",
)  # fmt: skip
_MILLISECONDS = ("block_ms", "claim_idle_ms", "busy_timeout_ms")
_CEILINGS = {
    "shards": 1024, "batch_size": 100_000, "max_deliveries": 10_000, "redis_retries": 100,
    "sqlite_cache_mb": 2**21, "tombstone_ttl": 10**12, "max_connections": 10_000,
    "cache_ttl": MAX_TTL_SECONDS,
}  # fmt: skip


def test_every_number_setting_refuses_a_value_past_its_bounds_and_takes_the_bound() -> None:
    def refused(name: str, value: object, match: str) -> None:
        with pytest.raises(ConfigurationError, match=f"setting {name} must be {match}"):
            Settings.load({name: value}, environ={})

    def accepted(name: str, value: object) -> None:
        assert getattr(Settings.load({name: value}, environ={}), name) == value

    for name in _AT_LEAST_1:
        refused(name, 0, ">= 1")
        accepted(name, 1)
    for name in _AT_LEAST_0:
        refused(name, -1, ">= 0")
        accepted(name, 0)
    for name in _SECONDS:
        for bad in (0, -0.5, math.nan, MAX_WAIT_SECONDS + 0.5):
            refused(name, bad, "> 0 and at most")
        accepted(name, 0.001)
        accepted(name, float(MAX_WAIT_SECONDS))
    for name in _MILLISECONDS:
        accepted(name, MAX_WAIT_SECONDS * 1000)
        refused(name, MAX_WAIT_SECONDS * 1000 + 1, "at most")
    for name, most in _CEILINGS.items():
        accepted(name, most)
        refused(name, most + 1, "at most|<=")
    numbers = {f.name for f in dataclasses.fields(Settings) if f.type in ("int", "float")}
    assert numbers == set(_AT_LEAST_1 + _AT_LEAST_0 + _SECONDS)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"redis_url": ""}, "redis_url"),
        ({"sqlite_synchronous": "OFF"}, "sqlite_synchronous='OFF' must be NORMAL, FULL"),
        ({"db_path": ""}, "db_path must not be empty"),
        ({"key": "a2V5\x00"}, "key must be valid Unicode without NUL"),
        ({"namespace": "a b"}, "namespace"),
        ({"namespace": "a\tb"}, "namespace"),
        ({"namespace": "a\nb"}, "namespace"),
        ({"namespace": "a:b"}, "namespace"),
        ({"namespace": ""}, "namespace"),
        ({"socket_timeout": True}, "socket_timeout must be a float, got True"),
    ],
)
def test_bad_text_settings_name_the_setting(overrides: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        Settings.load(overrides, environ={})


def test_settings_are_read_as_written_by_hand() -> None:
    # SQLite's synchronous takes any case; every spelling of a bool the error message
    # offers is one, around spaces; an empty variable is unset, as an empty key argument
    # is not given (it must not drop the environment's keyring); a PathLike is its path.
    for mode in ("full", "Normal", "extra"):
        assert Settings.load({"sqlite_synchronous": mode}, environ={}).sqlite_synchronous == mode
    spellings = {" 1": True, "TRUE": True, "yes": True, "On\n": True}
    spellings |= {"0": False, "false": False, " NO ": False, "off": False}
    for spelling, value in spellings.items():
        assert Settings.load(environ={"DUALMEM_WORKER": spelling}).worker is value
        assert Settings.load({"worker": spelling}, environ={}).worker is value
    assert Settings.load(environ={"DUALMEM_SHARDS": ""}).shards == Settings().shards
    env = {"DUALMEM_KEYRING": "env.json"}
    assert Settings.load({"key": ""}, environ=env).keyring == "env.json"

    class Place:
        def __fspath__(self) -> str:
            return "by-hand.db"

    assert Settings.load({"db_path": Place()}, environ={}).db_path == "by-hand.db"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("batch_size", "five hundred", "setting batch_size must be an int, got 'five hundred'"),
        ("shards", "two", "setting shards must be an int, got 'two'"),
        ("socket_timeout", "soon", "setting socket_timeout must be a float, got 'soon'"),
        ("worker", "maybe", "setting worker must be a bool (true/false, yes/no, on/off or 1/0)"),
    ],
)
def test_a_bad_argument_is_named_as_the_argument_not_as_a_variable(
    name: str, value: str, message: str
) -> None:
    # It was "DUALMEM_BATCH_SIZE='five hundred' is not a valid int" with no such variable set.
    with pytest.raises(ConfigurationError) as exc:
        Settings.load({name: value}, environ={})
    assert str(exc.value).startswith(message)
    assert "DUALMEM_" not in str(exc.value)
    with pytest.raises(ConfigurationError, match=f"DUALMEM_{name.upper()}={value!r} is not"):
        Settings.load({}, environ={f"DUALMEM_{name.upper()}": value})


def test_replace_validates_the_copy() -> None:
    # The operator tools widen shards with replace(): a copy that skipped validation took
    # shards=0 or 2**40 into the per-shard streams it built (the latter never finished).
    s = Settings.load(environ={})
    assert s.replace(shards=4, batch_size=7).shards == 4
    with pytest.raises(ConfigurationError, match="shards must be >= 1"):
        s.replace(shards=0)
    with pytest.raises(ConfigurationError, match="shards must be at most 1,024"):
        s.replace(shards=2**40)
    with pytest.raises(ConfigurationError, match="redis_url"):
        s.replace(redis_url="http://db/0")


def test_only_a_memory_url_is_embedded_and_a_keyring_names_the_key_file() -> None:
    # A real Redis whose host is called "memory..." is no in-process fakeredis: taken for
    # one, its writes would go to a server that dies with the process.
    for url in ("redis://memory:6379/0", "rediss://memorystore.internal/1", "redis://a/0"):
        assert not Settings(redis_url=url).embedded
    assert Settings().embedded and Settings(redis_url="memory://other").embedded
    # The key file in use is the keyring setting's, not the embedded default beside the
    # database (a rotation or refusal check on the wrong file), and none for a bare key.
    assert Settings(db_path="m.db", keyring="k.json").keyring_file == Path("k.json")
    assert Settings(redis_url="redis://a/0", keyring="k.json").keyring_file == Path("k.json")
    assert Settings(db_path="m.db").keyring_file == Path("m.db.keys")
    assert Settings(db_path="m.db", key="a2V5").keyring_file is None
    assert Settings(redis_url="redis://a/0").keyring_file is None


def test_only_the_embedded_default_loads_the_key_file_beside_the_database(
    tmp_path: Path,
) -> None:
    # A key file left beside the database by an embedded run is not the keyring of a real
    # Redis deployment of the same db_path: loading it there sealed records with a key
    # no other process was told about (keyring_file says None for it, too).
    ring = Keyring.generate()
    ring.save(tmp_path / "m.db.keys")
    embedded = load_keyring(Settings(db_path=str(tmp_path / "m.db")))
    assert embedded is not None and embedded.active_id == ring.active_id
    real = Settings(redis_url="redis://a/0", db_path=str(tmp_path / "m.db"))
    assert load_keyring(real) is None and real.keyring_file is None


def test_a_wait_takes_every_number_of_seconds_from_its_bound_to_its_ceiling() -> None:
    # The bounds the docstring states, both ends included: 1,000,000 s was refused once
    # "at most" became "less than"; 0 is a wait (poll once), but an interval of 0 spins.
    assert check_seconds("timeout", MAX_WAIT_SECONDS) == MAX_WAIT_SECONDS
    assert check_seconds("timeout", 0) == 0.0
    assert check_seconds("poll_interval", 1e-6, positive=True) == 1e-6
    assert check_seconds("timeout", None, optional=True) is None
    for bad, kwargs in (
        (MAX_WAIT_SECONDS + 1e-3, {}),
        (0, {"positive": True}),
        (None, {}),
        (True, {}),
        (-1e-9, {}),
    ):
        with pytest.raises(ValidationError, match="must be"):
            check_seconds("timeout", bad, **kwargs)


# -- keys, ttl, entries --------------------------------------------------------------------


@pytest.mark.parametrize(
    "key", ["", "a\x00b", "x" * (MAX_KEY_BYTES + 1), "é" * 300, "\ud800", 5, None, b"k"]
)
def test_bad_keys(key: object) -> None:
    with pytest.raises(ValidationError):
        check_key(key)


@pytest.mark.parametrize("key", ["a", "x" * MAX_KEY_BYTES, "%_*?[]'\";--", "emoji/🚀", " lead"])
def test_good_keys(key: str) -> None:
    assert check_key(key) == key


@pytest.mark.parametrize("ttl", [0, -1, float("nan"), float("inf"), "10", True, 10**12])
def test_bad_ttls(ttl: object) -> None:
    with pytest.raises(ValidationError):
        ttl_to_ms(ttl)


def test_put_entry_round_trip() -> None:
    f = raw(put_fields("team:t", "k", Level.TEAM, "a", 123_456, b"\x01\x02env", 999))
    cmd = decode_command(f)
    assert (cmd.op, cmd.scope, cmd.key, cmd.level, cmd.actor) == ("put", "team:t", "k", 2, "a")
    assert (cmd.ts_us, cmd.envelope, cmd.expires_at, cmd.ts_ms) == (
        123_456,
        b"\x01\x02env",
        999,
        123,
    )
    d = decode_command(raw(delete_fields("team:t", "k", Level.TEAM, "a", 1)))
    assert d.op == "del" and d.envelope is None


@pytest.mark.parametrize(
    "mutate",
    [
        lambda f: f.pop(b"op"),
        lambda f: f.update({b"op": b"drop"}),
        lambda f: f.update({b"l": b"9"}),
        lambda f: f.update({b"l": b"1"}),  # scope team:t is not PRIVATE
        lambda f: f.update({b"s": b"nowhere"}),
        lambda f: f.update({b"k": b""}),
        lambda f: f.update({b"k": b"\xff\xfe"}),
        lambda f: f.update({b"t": b"yesterday"}),
        lambda f: f.pop(b"e"),
        lambda f: f.update({b"x": b"soon"}),
        # Refused by the full path; the worker's fast path must not take them either
        # (mutation check: its own key checks could go and no test noticed).
        lambda f: f.update({b"k": b"a\x00b"}),
        lambda f: f.update({b"k": b"k" * (MAX_KEY_BYTES + 1)}),
    ],
)
def test_malformed_entries_say_why(mutate: object) -> None:
    f = raw(put_fields("team:t", "k", Level.TEAM, "a", 1, b"env", None))
    mutate(f)  # type: ignore[operator]
    with pytest.raises(MalformedCommand):
        decode_command(f)


def test_a_replayed_entry_keeps_its_origin_and_a_tiny_ttl_is_one_millisecond() -> None:
    # A replay carries its original stream id ("o"), which orders it: the worker's fast
    # path for plain puts must leave it to the full decode, or the origin is dropped
    # (mutation check). A ttl under a millisecond is 1 ms, not 0 (PX 0 is an error).
    f = raw({**put_fields("swarm:s", "k", Level.SWARM, "a", 1, b"\x01\x00{}", None)})
    assert decode_command(f).origin is None
    f[b"o"] = b"1700000000000-7"
    assert decode_command(f).origin == "1700000000000-7"
    assert ttl_to_ms(0.0001) == 1


def test_stream_ids_sort_as_their_ordering_ids() -> None:
    # Every id Redis can hand out, past the 22 bits of sequence (and the 41 bits of
    # milliseconds) the schema-3 integer held: those were refused and dead-lettered.
    ids = [
        "1-0",
        "1-1",
        "2-0",
        "1700000000000-0",
        "1700000000000-4194303",
        "1700000000000-4194304",
        "1700000000000-18446744073709551615",
        "1700000000001-0",
        f"{1 << 41}-0",
        f"{(1 << 64) - 1}-{(1 << 64) - 1}",
    ]
    assert sorted(reversed(ids), key=sid_of) == ids
    assert all(stream_id_of(sid_of(i)) == i for i in ids)
    for bad in ("x-1", "1-y", "-1-0", f"{1 << 64}-0", f"1-{1 << 64}"):
        with pytest.raises(MalformedCommand):
            sid_of(bad)


def test_layout_keeps_one_hash_tag_per_shard() -> None:
    lay = Layout("ns", shards=8)
    shards = {lay.shard_of("agent:a", f"k{i}") for i in range(200)}
    assert shards == set(range(8))
    s = lay.shard_of("agent:a", "k1")
    tag = lay.stream(s).split(b"}")[0]
    assert lay.cache_key(s, "agent:a", "k1").startswith(tag + b"}")
    assert lay.shard_of_stream(lay.stream(5)) == 5


def test_split_cache_key_takes_only_this_namespaces_cache_keys_as_written() -> None:
    # A name that only looks like one (another spelling of the shard or of an escape, an
    # unknown scope kind, another namespace) names no record: verify reports it, the
    # rotation leaves it. Each check here stood alone in a mutation check.
    lay = Layout("ns", shards=4)
    for name in (
        b"dm:{ns:00}:c:swarm:s:k",  # shard 0 spelled another way
        b"dm:{ns:x}:c:swarm:s:k",  # no shard number (a ValueError)
        b"dm:{ns:1}:c:swarm:a%3ab:k",  # an escape spelled in lower case
        b"dm:{ns:1}:c:user:s:k",  # no such scope kind
        b"dm:{ns:1}:c:swarm:s",  # no key
        b"dm:{ns:1}:c:swarm::k",  # no scope name
        b"xx:{ns:1}:c:swarm:s:k",
        b"dm:{ns:1}:x:swarm:s:k",
        Layout("ns2").cache_key(1, "swarm:s", "k"),
        b"dm:{ns:1}:c:\xff:k",
    ):
        assert lay.split_cache_key(name) is None, name
    for scope, key in (
        ("system", "a:b"),
        ("swarm:%3A", "k"),
        ("agent:%25", "%3A"),
        ("team:t", "k"),
    ):
        assert lay.split_cache_key(lay.cache_key(3, scope, key)) == (3, scope, key)
    # Scope names holding what the escapes are made of: one entry each.
    assert lay.cache_key(0, "swarm:x%3Ay", "z") != lay.cache_key(0, "swarm:x:y", "z")
    # Each namespace's notifications on channels of its own.
    assert Layout("a").channel("swarm:s") != Layout("b").channel("swarm:s")
    assert lay.anchor_key("journal") != lay.anchor_key("audit_log")


# -- batch planning -------------------------------------------------------------------------


def entry(i: int, key: str = "k", op: str = "put", shard: int = 0) -> StreamEntry:
    if op == "put":
        f = put_fields(
            "swarm:s", key, Level.SWARM, "a", i * 1000, b"\x01\x00" + str(i).encode(), None
        )
    elif op == "del":
        f = delete_fields("swarm:s", key, Level.SWARM, "a", i * 1000)
    else:
        f = audit_fields("access_denied", actor="a", ts_us=i * 1000, risk="high", scope="agent:x")
    return StreamEntry(shard, f"{1000 + i}-0", raw(f))


def test_plan_builds_rows_and_chains_hashes() -> None:
    entries = [entry(1), entry(2, op="del"), entry(3, op="audit")]
    plan = plan_batch(
        entries, already=set(), journal_tail=(0, GENESIS), audit_tail=(0, GENESIS), now_ms=5
    )
    assert [r[0] for r in plan.journal] == [1, 2]
    assert plan.journal[0][-2] == GENESIS and plan.journal[1][-2] == plan.journal[0][-1]
    assert plan.journal[1][-1] == chain_hash(
        plan.journal[0][-1], journal_hash_values(plan.journal[1][:-2])
    )
    assert plan.memory[1][4] is None  # the delete is a tombstone
    assert len(plan.audit) == 1 and plan.audit[0][0] == 1
    assert [n.op for n in plan.notifications] == ["put", "del"]
    assert plan.journal_tail == (2, plan.journal[1][-1])


def test_plan_skips_committed_and_repeated_entries() -> None:
    e1, e2 = entry(1), entry(2)
    plan = plan_batch(
        [e1, e2, e2],
        already={(0, e1.stream_id)},
        journal_tail=(7, b"h" * 32),
        audit_tail=(0, GENESIS),
        now_ms=0,
    )
    assert plan.duplicates == [e1, e2]
    assert plan.applied == [e2]
    assert plan.journal[0][0] == 8


def test_plan_isolates_malformed_entries() -> None:
    bad = StreamEntry(0, "5-0", {b"op": b"put"})
    worse = StreamEntry(
        0, "not-an-id", raw(put_fields("swarm:s", "k", Level.SWARM, "a", 1, b"e", None))
    )
    plan = plan_batch(
        [entry(1), bad, worse, entry(2)],
        already=set(),
        journal_tail=(0, GENESIS),
        audit_tail=(0, GENESIS),
        now_ms=0,
    )
    assert [e for e, _ in plan.failed] == [bad, worse]
    assert all("malformed" in why for _, why in plan.failed)
    assert len(plan.applied) == 2


def test_plan_refuses_an_origin_after_its_entry_and_an_unknown_audit_risk() -> None:
    # Mutation check. A replay is ordered by its original id ("o"): one claiming an
    # origin after its own id would outrank every write made after it (a put that later
    # writes could never replace). An audit risk other than low/medium/high is no audit
    # row. An audit event with no scope stores NULL scope, key and level, not "" and 0.
    late = entry(1)
    late.fields[b"o"] = b"9999-0"  # its own id is 1001-0
    replay = entry(2)
    replay.fields[b"o"] = b"5-0"
    odd = StreamEntry(0, "1003-0", raw(audit_fields("x", actor="a", ts_us=1, risk="extreme")))
    bare = StreamEntry(0, "1004-0", raw(audit_fields("x", actor="a", ts_us=1, risk="low")))
    plan = plan_batch(
        [late, replay, odd, bare],
        already=set(),
        journal_tail=(0, GENESIS),
        audit_tail=(0, GENESIS),
        now_ms=0,
    )
    assert [(e, "after the entry" in why or "risk" in why) for e, why in plan.failed] == [
        (late, True),
        (odd, True),
    ]
    assert plan.memory[0][5] == sid_of("5-0")  # the replay, ordered by its origin
    (row,) = plan.audit
    assert row[4:7] == (None, None, None)


def test_chain_hash_of_a_row_holding_a_separator_is_the_one_verify_has_always_read() -> None:
    # Mutation check. verify recomputes the hash of every stored row: an encoding that
    # changed for a value holding \x1e or \x1f (escaped only when it has \x1f, a \x1e
    # left raw on the fast path, None spelled "None" on the escaped path) would report
    # rows written by this release as tampered. Pinned hashes of such rows, with a None.
    assert chain_hash(GENESIS, [7, None, "a\x1eb"]).hex()[:16] == "41379757bb7c8195"
    assert chain_hash(GENESIS, [7, None, "a\x1fb"]).hex()[:16] == "6abacbf11e4619d5"
    assert chain_hash(GENESIS, [7, None, "a\x1e\x1fb"]).hex()[:16] == "2d7de16da123b6de"


def test_chain_hash_reads_values_given_once_like_a_list_of_them() -> None:
    # chain_hash takes any iterable, and read it twice when a value held a separator:
    # a generator was used up by then, so its row hashed as if it had no values at all.
    row = [7, None, "a\x1fb", "c"]
    assert chain_hash(GENESIS, iter(row)) == chain_hash(GENESIS, row)
    assert chain_hash(GENESIS, iter(row)) != chain_hash(GENESIS, [])


def test_plan_continues_both_chains_from_their_tails_and_fills_every_column() -> None:
    # Mutation check: the tests planned from empty chains and looked at a few columns.
    # The audit tail is what the next entry of the slow path (one plan per entry) starts
    # from: counting the batch's rows instead of continuing the id reused audit ids. A
    # mirror.* audit event's sync_events row names its own audit row (the id before it
    # named the previous one, or 0), and is written at all. The journal keeps ts and
    # committed_at apart and names the actor; the worker publishes each change under its
    # journal seq and records its lag from the writer's clock in microseconds.
    jh, ah = b"j" * 32, b"a" * 32
    sync = StreamEntry(
        0,
        "1004-0",
        raw(
            audit_fields(
                "mirror.mission", actor="m", ts_us=4_000, risk="low", scope="system", key="q"
            )
        ),
    )
    plan = plan_batch(
        [entry(1), entry(2, op="audit"), sync, entry(3, op="del")],
        already=set(),
        journal_tail=(7, jh),
        audit_tail=(4, ah),
        now_ms=99,
    )
    assert [r[0] for r in plan.audit] == [5, 6]
    assert plan.audit[0][-2] == ah and plan.audit[1][-2] == plan.audit[0][-1]
    assert plan.audit_tail == (6, plan.audit[1][-1])
    assert [params[0] for _, params in plan.projections] == [6]
    # seq, shard, stream id, sid, op, scope, key, level, actor, ts (ms), committed_at
    put_row = (8, 0, "1001-0", sid_of("1001-0"), "put", "swarm:s", "k", 3, "a", 1, 99)
    assert plan.journal[0][:11] == put_row
    assert plan.journal[0][-2] == jh and plan.journal_tail == (9, plan.journal[1][-1])
    assert [n.seq for n in plan.notifications] == [8, 9]
    assert plan.ts_us == [1_000, 3_000]


def test_a_notification_message_of_one_object_parses_as_one() -> None:
    # parse_message reads a batch's JSON array and the single-object form (one
    # notification per message): reading the latter as no notification at all passed
    # every test, and a subscriber fed by such a publisher would miss each change.
    from dualmem.store import Notification

    note = Notification(7, "swarm:s", "k", 3, "del")
    assert Notification.parse_message(note.to_json()) == [note]
    assert Notification.parse_message(note.to_json().decode()) == [note]


# -- metrics -----------------------------------------------------------------------------------


def test_histogram_quantiles_match_exact_values() -> None:
    rng = random.Random(7)
    samples = [int(rng.lognormvariate(11, 1.2)) for _ in range(50_000)]
    h = Histogram()
    for v in samples:
        h.record(v)
    samples.sort()
    for q in (0.5, 0.95, 0.99):
        exact = samples[int(q * len(samples)) - 1]
        assert abs(h.quantile(q) - exact) / exact < 0.02, q
    assert h.max == samples[-1]
    assert h.count == len(samples)


def test_a_reset_just_before_record_many_takes_its_lock_loses_no_bucket() -> None:
    # record_many took the bucket list before the lock: a reset in between (the bench
    # resets while the worker records lag) left count 10 and empty buckets, so every
    # quantile said max.
    h = Histogram()
    h.record(5_000_000)

    class ResetFirst:
        def __init__(self) -> None:
            self.inner, self.armed = threading.Lock(), True

        def __enter__(self) -> None:
            if self.armed:
                self.armed = False
                h.reset()  # lands between the caller's read of the state and its lock
            self.inner.acquire()

        def __exit__(self, *exc: object) -> None:
            self.inner.release()

    h._lock = ResetFirst()  # type: ignore[assignment]
    h.record_many([1000] * 10)
    assert h.count == sum(h._counts) == 10
    assert h.quantile(0.5) == h.quantile(0.99) == 1000


def test_histogram_memory_is_fixed() -> None:
    h = Histogram()
    size = len(h._counts)
    for v in range(0, 10**12, 10**7):
        h.record(v)
    h.record(10**15)  # beyond the top bucket: clamped, not grown
    assert len(h._counts) == size
    assert h.summary()["max"] == 10**15 / 1e6


def test_histogram_edges_nearest_rank_single_samples_and_sums() -> None:
    # Mutation check: none of these was tested. Nearest rank: the p95 of 10 samples is
    # the 10th (a floor took the 9th); one sample is every quantile exactly; a sample
    # recorded n times adds n to the sum; a negative duration (clocks of two processes
    # apart: lag) counts as 0, not in the top buckets where Python's negative index put
    # it; 2**47 ns and more land in the last bucket (one past it was an IndexError).
    h = Histogram()
    for v in range(1, 11):  # below 64 ns every value has its own bucket
        h.record(v)
    assert (h.quantile(0.5), h.quantile(0.95), h.quantile(0.1)) == (5.0, 10.0, 1.0)
    for record in (lambda h, v: h.record(v), lambda h, v: h.record_many([v])):
        one = Histogram()
        record(one, 123_457)
        assert {one.quantile(q) for q in (0.01, 0.5, 0.99)} == {123_457.0}
    bulk = Histogram()
    bulk.record(20_000, n=10)
    bulk.record_many([5_000, 5_000])
    s = bulk.summary()
    assert (s["count"], s["sum"], s["mean"]) == (12, 0.21, 0.0175)
    skewed = Histogram()
    skewed.record(-5_000)
    skewed.record(1_000)
    skewed.record(2_000)
    assert skewed.quantile(0.3) == 0.0  # the negative sample ranks first
    top = Histogram()
    for v in (2**47, 2**48 - 1, 2**60):
        top.record(v)
    assert top.count == sum(top._counts) == 3 and top.max == 2**60


def test_metrics_snapshot_and_prometheus() -> None:
    m = Metrics()
    m.record("redis_write", 150_000)
    m.record("persist", 20_000, n=10)
    snap = m.snapshot()
    assert set(snap) == {"redis_write", "encode", "persist", "lag", "read"}
    assert snap["persist"]["count"] == 10
    text = prometheus_text(snap, {"backlog": 3})
    # In seconds, as the metric's name says (the snapshot is in milliseconds): a value
    # off by the unit went unnoticed while only the series' names were checked.
    assert 'dualmem_latency_seconds{path="redis_write",quantile="0.95"} 0.00015\n' in text
    assert 'dualmem_latency_seconds_sum{path="persist"} 0.0002\n' in text
    assert 'dualmem_latency_seconds_count{path="persist"} 10' in text
    assert "dualmem_backlog 3.0" in text
    assert "# HELP dualmem_backlog Commands in Redis not yet persisted" in text
    # A path with no sample exports NaN quantiles, not a latency of 0.
    assert 'dualmem_latency_seconds{path="lag",quantile="0.95"} NaN' in text
    assert 'dualmem_latency_seconds_count{path="lag"} 0' in text


def test_samples_recorded_n_at_a_time_or_in_a_list_rank_like_single_ones() -> None:
    # Mutation check. The worker records its persist time n at a time (one figure per
    # batch): a bucket counting the call once put p50 past every sample (it said max).
    # Its lag goes in lists, one per batch: a list's min and max taken the wrong way
    # round, or a later batch's max replacing an earlier larger one, showed wrong
    # figures; an audit-only batch has no lag to record (an empty list raised in the
    # worker). A quantile is never above the largest sample (122,880 ns is the bottom
    # of its bucket, whose middle was shown), and a sample of 20 to 39 hours has a
    # bucket (with one bucket row too few recording it was an IndexError).
    h = Histogram()
    h.record(10, n=9)  # below 64 ns every value has its own bucket
    h.record(50)
    assert (h.quantile(0.9), h.quantile(0.95)) == (10.0, 50.0)
    lag = Histogram()
    lag.record_many([30, 10, 20])
    lag.record_many([5])
    lag.record_many([])
    assert (lag.count, lag.min, lag.max) == (4, 5, 30)
    assert [lag.quantile(q) for q in (0.25, 0.5, 0.75, 1.0)] == [5.0, 10.0, 20.0, 30.0]
    low = Histogram()
    low.record(122_880)
    assert low.quantile(0.99) == 122_880.0
    day = Histogram()
    day.record(2**46)
    day.record(2**47 - 1)
    assert day.count == sum(day._counts) == 2
    assert abs(day.quantile(0.5) - 2**46) / 2**46 < 1 / 64


def _hundred_samples() -> Histogram:
    """90 samples of 10 ns, 5 of 20, 4 of 30 and one of 40: p50, p95, p99 and max apart."""
    h = Histogram()
    h.record(10, n=90)
    h.record(20, n=5)
    h.record(30, n=4)
    h.record(40)
    return h


def test_summary_p99_and_reset_of_every_path() -> None:
    # Mutation check: the summaries tested had one sample, or p50 and p95 alone, so a
    # p99 taken at 0.999 or showing p95 went unnoticed; a reset that kept the max (or
    # reset only the first path) showed the last run's max beside the new run's figures
    # (the bench resets the registry between its runs).
    h = _hundred_samples()
    s = h.summary()
    assert (s["p50"], s["p95"], s["p99"], s["max"]) == (10 / 1e6, 20 / 1e6, 30 / 1e6, 40 / 1e6)
    m = Metrics()
    for path in m.histograms:
        m.record(path, 1_000)
    m.reset()
    assert m.snapshot() == Metrics().snapshot()


def test_prometheus_text_is_the_exposition_format_line_for_line() -> None:
    # Mutation check: the test looked for a few lines. The quantile labels must name
    # the figures they carry (p95 and p99 swapped, or p99 left out, went unnoticed), the
    # types are summary and gauge, a gauge without a help text of its own is described
    # by its name (not a KeyError), and the text ends with a line feed, which the
    # format requires of its last line. A path whose samples all took 0 ns has a
    # latency of 0, not NaN (that is for a path with no sample).
    h = _hundred_samples()
    text = prometheus_text({"persist": h.summary()}, {"db_bytes": 4096, "open_files": 2})
    assert text == (
        "# HELP dualmem_latency_seconds Latency per dualmem path.\n"
        "# TYPE dualmem_latency_seconds summary\n"
        'dualmem_latency_seconds{path="persist",quantile="0.5"} 1e-08\n'
        'dualmem_latency_seconds{path="persist",quantile="0.95"} 2e-08\n'
        'dualmem_latency_seconds{path="persist",quantile="0.99"} 3.0000000000000004e-08\n'
        'dualmem_latency_seconds_sum{path="persist"} 1.16e-06\n'
        'dualmem_latency_seconds_count{path="persist"} 100\n'
        "# HELP dualmem_db_bytes Size of the SQLite database and its WAL file, bytes.\n"
        "# TYPE dualmem_db_bytes gauge\n"
        "dualmem_db_bytes 4096.0\n"
        "# HELP dualmem_open_files open files.\n"
        "# TYPE dualmem_open_files gauge\n"
        "dualmem_open_files 2.0\n"
    )
    instant = Histogram()
    instant.record(0)
    assert "NaN" not in prometheus_text({"encode": instant.summary()})


def test_a_long_tombstone_ttl_and_an_empty_key_argument_are_accepted() -> None:
    # A bound of ten years refused "keep tombstones for good" (10**10 s), which worked;
    # an empty keyring= argument dropped DUALMEM_KEY, where an empty variable is unset.
    assert Settings.load({"tombstone_ttl": 10**10}, environ={}).tombstone_ttl == 10**10
    s = Settings.load({"keyring": ""}, environ={"DUALMEM_KEY": "a2V5"})
    assert (s.key, s.keyring) == ("a2V5", None)


def test_stream_entry_edges_the_worker_relies_on() -> None:
    # Each of these passed unnoticed by a mutation check of dualmem.commands:
    from dualmem.commands import (
        CACHE_EXPIRING,
        cached_envelope,
        check_int,
        replay_fields,
        sid_hash_text,
        sid_of,
    )

    # 2**63 does not fit SQLite's INTEGER: refused, not an OverflowError inside sqlite3.
    assert check_int("limit", (1 << 63) - 1) == (1 << 63) - 1
    with pytest.raises(ValidationError, match="limit must be an int"):
        check_int("limit", 1 << 63)
    # A dead letter replayed twice keeps the id it first had: ordered by it, it never
    # overwrites what was committed after it first failed.
    again = replay_fields(replay_fields({b"op": b"put"}, "5-0"), "9-0")
    assert again[b"o"] == b"5-0"
    # A stream id past the 41 bits of milliseconds schema 3 packed (September 2039)
    # hashes as "ms-seq", not as an integer that overflows 63 bits.
    late = f"{1 << 41}-3"
    assert sid_hash_text(sid_of(late)) == late
    # A cache entry that only starts like an expiring one (too short to hold the
    # expiry) is taken as it is, not cut into an empty envelope and a garbled expiry.
    short = CACHE_EXPIRING + b"12345678"
    assert cached_envelope(short) == (short, None)
    # A put with an empty envelope is malformed, as one without.
    raw = {
        k: v if isinstance(v, bytes) else str(v).encode()
        for k, v in put_fields("swarm:s", "k", Level.SWARM, "a", 1, b"", None).items()
    }
    with pytest.raises(MalformedCommand, match="without an envelope"):
        decode_command(raw)
