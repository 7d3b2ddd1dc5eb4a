"""Attacks and bad input of issue 6 (9, 10, 12, 13; 11 is in test_attacks_rotation.py).

Every storage test runs on fakeredis and a real redis-server (the ``redis_url`` fixture).
"""

from __future__ import annotations

import contextlib
import random
import sqlite3
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from acl import (
    AccessDenied,
    Keyring,
    Level,
    MissingKey,
    Principal,
    TamperedRecord,
    ValidationError,
    crypto,
    level_of_scope,
)
from acl.crypto import _aad as _real_aad
from acl.policy import resolve_scope
from bench import attacks
from bench.faultkit import FaultEnv
from dualmem import DualMemory
from dualmem.batch import GENESIS, chain_hash
from dualmem.commands import put_fields, reseal_fields, sid_of
from dualmem.layout import Layout
from dualmem.sqlite_store import SQLiteStore
from dualmem.store import DeadLetter, StreamEntry

from .conftest import RedisServer, redis_fields, wait_until

MakeMem = Callable[..., DualMemory]
# The suite shares two cores with whatever else runs: slow generation is not a failure,
# and one DualMemory per test serves all of a test's examples.
SLOW_OK = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]

# Names made of few characters, ':' and '%' among them, so that different scopes and keys
# collide wherever a layout is not injective.
NAME = st.text(alphabet="ab:%", min_size=1, max_size=4)


@settings(max_examples=200, deadline=None, suppress_health_check=SLOW_OK)
@given(
    scopes=st.tuples(
        st.sampled_from(["agent", "team", "swarm", "project"]).map(lambda k: k + ":") | st.just(""),
        NAME,
    ),
    key=NAME,
    other=st.tuples(st.sampled_from(["agent:", "swarm:", ""]), NAME, NAME),
    shard=st.integers(0, 3),
)
def test_cache_keys_name_exactly_one_record(
    scopes: tuple[str, str], key: str, other: tuple[str, str, str], shard: int
) -> None:
    lay = Layout("ns", shards=4)
    scope = scopes[0] + scopes[1] if scopes[0] else "system"
    name = lay.cache_key(shard, scope, key)
    assert lay.split_cache_key(name) == (shard, scope, key)
    other_scope = other[0] + other[1] if other[0] else "system"
    if (other_scope, other[2]) != (scope, key):
        assert lay.cache_key(shard, other_scope, other[2]) != name


def test_a_scope_with_a_colon_cannot_read_another_scopes_cache_entry(make_mem: MakeMem) -> None:
    # Found by the suite: cache keys were "c:<scope>:<key>", so swarm "x" key "y:z" and
    # swarm "x:y" key "z" shared one entry and a fresh read crossed scopes.
    mem = make_mem()
    victim = Principal(agent_id="v", swarm="x:y")
    attacker = Principal(agent_id="m", swarm="x")
    mem.sync(mem.put("z", {"secret": "swarm x:y only"}, level=Level.SWARM, principal=victim))
    assert mem.get("y:z", level=Level.SWARM, principal=attacker, fresh=True) is None
    mem.sync(mem.put("y:z", {"mine": 1}, level=Level.SWARM, principal=attacker))
    assert mem.get("z", level=Level.SWARM, principal=victim, fresh=True) == {
        "secret": "swarm x:y only"
    }
    assert mem.get("y:z", level=Level.SWARM, principal=attacker, fresh=True) == {"mine": 1}


# -- 9. cross-scope reads --------------------------------------------------------------------

PRINCIPALS = st.builds(
    attacks.make_principal,
    st.sampled_from(attacks.NAMES),
    st.none() | st.sampled_from(attacks.NAMES),
    st.none() | st.sampled_from(attacks.NAMES),
    st.booleans(),
)
KEYS = ["k", "b:k", "%3A"]  # "swarm:a:b"+"k" against "swarm:a"+"b:k"
# Mostly the reader's own scopes (where a crossing would hide), now and then another one.
SCOPES = st.one_of(
    st.none(),
    st.none(),
    st.none(),
    st.just("system"),
    st.builds(
        lambda kind, name: f"{kind}:{name}",
        st.sampled_from(["agent", "team", "swarm", "project"]),
        st.sampled_from(attacks.NAMES),
    ),
)
PROBES = st.builds(
    attacks.Probe,
    st.sampled_from(["get", "fresh", "query", "history", "changes"]),
    st.none() | st.sampled_from(list(Level)),
    st.sampled_from(KEYS),
    SCOPES,
)


def _denial_rows(mem: DualMemory) -> int:
    return sum(1 for a in mem.store.audit_log() if a.event == "access_denied")


#: Every name as agent, team, swarm and project: neighbours such as swarm "a:b" key "k"
#: and swarm "a" key "b:k" all hold records, so any crossing shows up.
POPULATION = [attacks.make_principal(n, n, n, n == "a") for n in attacks.NAMES]


@settings(max_examples=300, deadline=None, suppress_health_check=SLOW_OK)
@given(reader=PRINCIPALS, probes=st.lists(PROBES, min_size=1, max_size=6))
def test_9_no_principal_ever_receives_a_value_outside_its_scopes(
    mem: DualMemory, reader: Principal, probes: list[attacks.Probe]
) -> None:
    if not getattr(mem, "_population_written", False):
        receipts = [r for w in POPULATION for r in attacks.write_everywhere(mem, w, KEYS)]
        mem.sync(receipts[-1], timeout=30)
        mem._population_written = True  # type: ignore[attr-defined]
    before = _denial_rows(mem)
    denials = []
    for probe in probes:
        problems, receipt = attacks.run_probe(mem, reader, probe)
        assert problems == []
        if receipt is not None:
            denials.append(receipt)
    for r in denials:
        mem.sync(r, timeout=30)
        assert mem.store.status(r.shard, r.stream_id) == "committed"
    assert _denial_rows(mem) - before == len(denials)  # one audit row per denial


def test_9_many_random_reads_leak_nothing_and_every_denial_is_audited(mem: DualMemory) -> None:
    fig = attacks.cross_scope_reads(mem, attempts=400)
    assert fig.problems == [], fig.problems
    assert fig.denials and fig.extra["denials_audited"] == fig.denials


def test_9_write_everywhere_puts_every_key_at_every_scope_the_writer_has(mem: DualMemory) -> None:
    # A writer without a team (so without a project) stopped at the first level it had no
    # scope at: its swarm and system records were never written, and no read could cross
    # into them.
    writer = attacks.make_principal("a", None, "s", True)
    receipts = attacks.write_everywhere(mem, writer, ["k", "b:k"])
    assert sorted((r.scope, r.key) for r in receipts) == sorted(
        (scope, key) for scope in ("agent:a", "swarm:s", "system") for key in ("k", "b:k")
    )


def test_9_random_probes_and_readers_cover_every_op_level_scope_shape_and_role() -> None:
    # Probes that never read from the cache ("fresh"), a named scope mostly at a level not
    # its own (a ValidationError before any read) or readers never system: the attack
    # reported nothing because it tried less, not because nothing leaked.
    rnd = random.Random(9)
    probes = [attacks.random_probe(rnd, ["k", "b:k"]) for _ in range(2000)]
    assert {p.op for p in probes} == {"get", "fresh", "query", "history", "changes"}
    assert {p.level for p in probes} == {None, *Level}
    shapes = {p.scope.partition(":")[0] if p.scope else None for p in probes}
    assert shapes == {None, "system", "agent", "team", "swarm", "project"}
    named = [p for p in probes if p.scope is not None]
    at_its_level = [p for p in named if p.level == level_of_scope(str(p.scope))]
    assert len(at_its_level) > 0.7 * len(named)  # reaches the ACL, not the level check
    readers = [attacks.random_principal(rnd) for _ in range(500)]
    assert {r.system for r in readers} == {True, False}
    assert any(r.team is None for r in readers) and any(r.swarm is None for r in readers)


def test_9_a_read_that_meets_another_records_envelope_is_reported(
    make_mem: MakeMem, raw_redis: redis.Redis, db_path: Path
) -> None:
    # A cross-scope read that ends in TamperedRecord was passed as "no problem"; a "fresh"
    # probe read SQLite, so an entry crossing scopes in the cache was never read at all.
    mem = make_mem()
    me, other = (
        attacks.make_principal("a", "t", "s", False),
        attacks.make_principal("b", "u", "s", False),
    )
    receipts = attacks.write_everywhere(mem, me, ["k"]) + attacks.write_everywhere(
        mem, other, ["k"]
    )
    mem.sync(receipts[-1])
    get = attacks.Probe("get", Level.PRIVATE, "k", None)
    fresh = attacks.Probe("fresh", Level.PRIVATE, "k", None)
    assert attacks.run_probe(mem, me, fresh) == ([], None)
    lay = mem.layout
    raw_redis.set(
        lay.cache_key(lay.shard_of("agent:a", "k"), "agent:a", "k"),
        raw_redis.get(lay.cache_key(lay.shard_of("agent:b", "k"), "agent:b", "k")),  # type: ignore[arg-type]
    )
    assert attacks.run_probe(mem, me, get) == ([], None)  # SQLite still holds its own
    problems, receipt = attacks.run_probe(mem, me, fresh)
    assert receipt is None and len(problems) == 1 and " met " in problems[0], problems
    with sqlite3.connect(db_path) as conn:
        conn.execute(
            "UPDATE memory SET envelope = (SELECT envelope FROM memory WHERE scope = "
            "'agent:b') WHERE scope = 'agent:a'"
        )
    conn.close()
    problems, receipt = attacks.run_probe(mem, me, get)
    assert receipt is None and len(problems) == 1 and " met " in problems[0], problems


def test_9_a_value_filed_under_another_scope_or_key_is_reported(mem: DualMemory) -> None:
    # The value names where it was written; a record whose value names another scope or
    # key (another record's plaintext) was passed as "no problem".
    reader = attacks.make_principal("a", "t", "s", False)
    stray = {"scope": "swarm:s", "key": "other", "by": "a"}
    mem.sync(mem.put("k", stray, level=Level.SWARM, principal=reader))
    for op in ("get", "fresh", "query"):
        problems, _ = attacks.run_probe(mem, reader, attacks.Probe(op, Level.SWARM, "k", None))
        assert len(problems) == 1 and "as swarm:s/k" in problems[0], (op, problems)


def test_9_a_read_that_hands_out_what_was_not_asked_for_is_reported(
    mem: DualMemory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A read past its query inside the reader's own scopes (a query ignoring its prefix,
    # a get answering with another key's record, a named scope answered from another of
    # the reader's scopes) was passed as "no problem": only a scope not the reader's was.
    reader = attacks.make_principal("a", "t", "s", False)
    for key in ("k", "x"):
        for level, scope in ((Level.SWARM, "swarm:s"), (Level.TEAM, "team:t")):
            value = {"scope": scope, "key": key, "by": "a"}
            mem.sync(mem.put(key, value, level=level, principal=reader))
    probes = [
        attacks.Probe("query", None, "k", None),
        attacks.Probe("get", Level.SWARM, "k", None),
        attacks.Probe("history", Level.SWARM, "k", "swarm:s"),
    ]
    for probe in probes:
        assert attacks.run_probe(mem, reader, probe) == ([], None), probe
    query, get_record, history = mem.query, mem.get_record, mem.history
    monkeypatch.setattr(mem, "query", lambda **kw: query(**{**kw, "prefix": ""}))
    monkeypatch.setattr(mem, "get_record", lambda key, **kw: get_record("x", **kw))
    monkeypatch.setattr(
        mem, "history", lambda key, **kw: history(key, **{**kw, "level": Level.TEAM, "scope": None})
    )
    for probe, wrong in zip(probes, ("swarm:s/x", "swarm:s/x", "team:t/k"), strict=True):
        problems, _ = attacks.run_probe(mem, reader, probe)
        assert problems and all("not asked for" in p for p in problems), (probe, problems)
        assert any(f"got {wrong}, not asked for" in p for p in problems), (probe, problems)


def _lax_policy(
    principal: Principal,
    level: object,
    *,
    action: str,
    scope: str | None = None,
    key: str | None = None,
) -> tuple[Level, str]:
    """A broken ACL for the harness to find: any scope a reader names is granted."""
    if action == "read" and scope is not None:
        return Level(level), scope  # type: ignore[call-overload]
    return resolve_scope(principal, level, action=action, scope=scope, key=key)


def test_9_a_memory_whose_acl_grants_a_named_scope_is_reported_as_leaking(
    mem: DualMemory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The attack against a memory with a hole in its ACL (injected here: a reader may name
    # any scope) must report leaks; with the scope check or the collection of its problems
    # gone, it reported none and the hole passed.
    victim = attacks.make_principal("b", "b", "b", False)
    reader = attacks.make_principal("a", "a", "a", False)
    mem.sync(
        mem.put(
            "k", {"scope": "swarm:b", "key": "k", "by": "b"}, level=Level.SWARM, principal=victim
        )
    )
    probe = attacks.Probe("get", Level.SWARM, "k", "swarm:b")
    problems, receipt = attacks.run_probe(mem, reader, probe)
    assert problems == [] and receipt is not None  # denied and audited
    monkeypatch.setattr("dualmem.memory.resolve_scope", _lax_policy)
    problems, receipt = attacks.run_probe(mem, reader, probe)
    assert receipt is None and len(problems) == 1 and "got swarm:b/k" in problems[0], problems
    fig = attacks.cross_scope_reads(mem, attempts=200)
    assert fig.extra["leaks"] > 0 and any("values outside" in p for p in fig.problems), fig


def test_9_a_denial_that_leaves_no_audit_receipt_is_reported(
    mem: DualMemory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A denial raised without its audit receipt (injected here: the audit write returns
    # nothing) was passed as "no problem": an unaudited denial is one of the attack's findings.
    reader = attacks.make_principal("a", "a", "a", False)
    probe = attacks.Probe("get", Level.SWARM, "k", "swarm:b")
    monkeypatch.setattr(mem, "_audit", lambda *args, **kwargs: None)
    problems, receipt = attacks.run_probe(mem, reader, probe)
    assert receipt is None and len(problems) == 1 and "without an audit receipt" in problems[0]


def test_9_denials_whose_receipts_name_no_denial_row_are_reported(
    mem: DualMemory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Injected: each denial hands back the receipt of another audit event, and no
    # access_denied row is written. Counting every audit row, or not comparing the count
    # with the denials, passed the run as "every denial audited".
    audit = mem._audit
    monkeypatch.setattr(
        mem, "_audit", lambda *args, **kwargs: audit("not_a_denial", actor="x", risk="low")
    )
    fig = attacks.cross_scope_reads(mem, attempts=100)
    assert fig.denials and fig.extra["denials_audited"] == 0
    assert any("audit rows" in p for p in fig.problems), fig.problems


def test_9_cross_scope_reads_on_a_memory_read_before_count_only_their_own_denials(
    mem: DualMemory,
) -> None:
    # The audit rows were counted from zero, not from the run's start: a second run on the
    # same memory found its predecessor's denials too and reported a mismatch.
    first = attacks.cross_scope_reads(mem, attempts=150)
    second = attacks.cross_scope_reads(mem, attempts=150, seed=19)
    for fig in (first, second):
        assert fig.problems == [], fig.problems
        assert fig.denials and fig.extra["denials_audited"] == fig.denials


# -- 10. ciphertext tampering -----------------------------------------------------------------


def test_10_tampered_envelopes_in_sqlite_and_redis_never_read_as_plaintext(
    mem: DualMemory, raw_redis: redis.Redis, db_path: Path
) -> None:
    fig = attacks.tampering(mem, raw_redis, db_path, rounds=240)
    assert fig.problems == [], fig.problems
    by_attack = fig.extra["by_attack"]
    for where in ("sqlite", "redis"):
        for attack in ("bit", "key", "scope", "level", "key_id", "plain"):
            assert by_attack.get(f"{where}:{attack}:tampered", 0) > 0, (where, attack)
        assert by_attack.get(f"{where}:unknown_key_id:missing_key", 0) > 0
    assert fig.extra["leaks"] == 0 and fig.extra["audited"] >= fig.extra["detected"]


def _aad_without_scope(header: bytes, scope: str, key: str, level: int) -> bytes:
    """A broken codec for the harness to find: the additional data leaves out the scope."""
    return _real_aad(header, "", key, level)


def test_10_tampering_reports_a_codec_that_does_not_bind_the_scope(
    mem: DualMemory, raw_redis: redis.Redis, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Injected: envelopes sealed and opened without their scope in the GCM additional data,
    # so one scope's envelope opens under another's name. The attack must report it: with
    # a read that opened not counted as a leak, the leaks not required away, or the "scope"
    # swap taking another key's envelope (which the key still refuses), it passed.
    monkeypatch.setattr(crypto, "_aad", _aad_without_scope)
    fig = attacks.tampering(mem, raw_redis, db_path, rounds=120)
    assert fig.extra["leaks"] > 0
    # SQLite's row names its writer too, which the swapped envelope fails; the cache's not.
    assert len(fig.problems) == 1 and "were read" in fig.problems[0], fig.problems
    assert (
        "scope in redis" in fig.problems[0] and "redis:scope:tampered" not in fig.extra["by_attack"]
    )


def test_10_tampering_reports_a_keyring_that_cannot_open_a_key_it_holds(
    mem: DualMemory, raw_redis: redis.Redis, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Injected: a keyring that answers MissingKey for every key but its active one. A swap
    # between two keys the ring holds must fail authentication, never MissingKey: with
    # that count not kept, the attack passed a keyring that cannot read its own records.
    real_aead = Keyring.aead

    def active_only(ring: Keyring, key_id: str) -> Any:
        if key_id != ring.active_id:
            raise MissingKey(f"no key {key_id!r} (injected)")
        return real_aead(ring, key_id)

    monkeypatch.setattr(Keyring, "aead", active_only)
    fig = attacks.tampering(mem, raw_redis, db_path, rounds=60)
    assert any("swaps between known keys gave MissingKey" in p for p in fig.problems), fig


# -- a Redis writer without the key ------------------------------------------------------------


def _put_twice(mem: DualMemory, who: Principal) -> tuple[bytes, str]:
    """Put an old then a new value of one private record; ``(old envelope, new row's
    stream id)``."""
    mem.sync(mem.put("role", {"role": "admin"}, level=Level.PRIVATE, principal=who))
    old = mem.store.get("agent:coder-1", "role", 0)
    mem.sync(mem.put("role", {"role": "revoked"}, level=Level.PRIVATE, principal=who))
    new = mem.store.get("agent:coder-1", "role", 0)
    assert old is not None and new is not None
    return bytes(old.envelope), new.stream_id


def _dead_letter_of(
    mem: DualMemory, raw_redis: redis.Redis, fields: dict[bytes, Any], what: str
) -> DeadLetter:
    """Add ``fields`` to their record's stream, as a Redis writer without the key can,
    and wait for the worker to dead-letter that entry."""
    shard = mem.layout.shard_of(fields[b"s"], fields[b"k"])
    forged = raw_redis.xadd(mem.layout.stream(shard), fields).decode()  # type: ignore[arg-type]
    (dead,) = wait_until(
        lambda: [d for d in mem.store.dead_letters() if d.stream_id == forged], what=what
    )
    return dead  # type: ignore[no-any-return]


def test_an_older_envelope_passed_off_as_a_reseal_is_refused(
    make_mem: MakeMem, raw_redis: redis.Redis
) -> None:
    # A forged key-rotation entry carrying the record's older envelope, guarded by the
    # row's current stream id (the stream shows both), rolled the row back in silence:
    # no journal row, and verify passed. The envelope's write id gives it away.
    coder = Principal(agent_id="coder-1", team="backend")
    mem = make_mem(max_deliveries=2, claim_idle_ms=50)
    old_envelope, current = _put_twice(mem, coder)
    fields = reseal_fields(
        "agent:coder-1", "role", Level.PRIVATE, "rotation", 1, old_envelope, sid_of(current)
    )
    dead = _dead_letter_of(mem, raw_redis, fields, "the forged reseal dead-lettered")
    assert "not a re-encryption of the write its row holds" in dead.error
    assert mem.get("role", level=Level.PRIVATE, principal=coder) == {"role": "revoked"}


def test_a_records_envelope_from_before_a_rotation_cannot_take_its_row_back(
    make_mem: MakeMem, raw_redis: redis.Redis, keyfile: Path
) -> None:
    # Same write, same write id: only the generation tells the rotation's re-encryption
    # from the envelope it replaced, which would move the row back under the retired key.
    from dualmem.rotation import add_active_key, rotate_keys

    coder = Principal(agent_id="coder-1", team="backend")
    mem = make_mem(max_deliveries=2, claim_idle_ms=50)
    mem.sync(mem.put("role", {"role": "admin"}, level=Level.PRIVATE, principal=coder))
    before = mem.store.get("agent:coder-1", "role", 0)
    add_active_key(keyfile)
    assert rotate_keys(make_mem(), timeout=30).done
    after = mem.store.get("agent:coder-1", "role", 0)
    assert before is not None and after is not None and after.envelope != before.envelope
    fields = reseal_fields(
        "agent:coder-1",
        "role",
        Level.PRIVATE,
        "rotation",
        1,
        bytes(before.envelope),
        sid_of(after.stream_id),
    )
    dead = _dead_letter_of(
        mem, raw_redis, fields, "the replayed pre-rotation envelope dead-lettered"
    )
    assert "or an older generation" in dead.error
    now = mem.store.get("agent:coder-1", "role", 0)
    assert now is not None and now.envelope == after.envelope


@pytest.mark.parametrize("envelope", [b"\x02", b"\x02\x03", b"\x02\x03\x00abc"])
def test_a_short_or_headless_version_2_envelope_fails_alone(
    make_mem: MakeMem, raw_redis: redis.Redis, envelope: bytes
) -> None:
    # A 1- or 2-byte envelope starting with version 2 raised IndexError in the worker's
    # hot path: retried with tracebacks instead of dead-lettered as malformed.
    mem = make_mem(max_deliveries=2, claim_idle_ms=50)
    fields = put_fields("agent:coder-1", "x", Level.PRIVATE, "coder-1", 1, envelope, None)
    dead = _dead_letter_of(mem, raw_redis, fields, "the malformed put dead-lettered")
    assert "malformed version-2 envelope header" in dead.error


def test_a_put_re_sent_under_another_writer_is_refused_and_a_row_naming_one_does_not_open(
    make_mem: MakeMem, raw_redis: redis.Redis, db_path: Path
) -> None:
    # The writer was not sealed: a put re-sent with another agent id (or a row whose
    # owner was edited) named someone who never wrote it, e.g. a Loop 4 decision's author.
    coder = Principal(agent_id="coder-1", team="backend")
    mem = make_mem(max_deliveries=2, claim_idle_ms=50)
    _, current = _put_twice(mem, coder)
    row = mem.store.get("agent:coder-1", "role", 0)
    assert row is not None
    fields = put_fields(
        "agent:coder-1", "role", Level.PRIVATE, "intern-7", 1, bytes(row.envelope), None
    )
    dead = _dead_letter_of(mem, raw_redis, fields, "the re-sent put dead-lettered")
    assert "sealed by 'coder-1', not by the command's writer 'intern-7'" in dead.error
    record = mem.get_record("role", level=Level.PRIVATE, principal=coder)
    assert record is not None and record.owner == "coder-1" and record.stream_id == current
    with sqlite3.connect(db_path) as conn:
        conn.execute("UPDATE memory SET owner = 'intern-7' WHERE key = 'role'")
    conn.close()
    with pytest.raises(TamperedRecord, match="not by its recorded writer 'intern-7'"):
        mem.get("role", level=Level.PRIVATE, principal=coder)  # envelope and owner only
    with pytest.raises(TamperedRecord, match="not by its recorded writer 'intern-7'"):
        mem.get_record("role", level=Level.PRIVATE, principal=coder)  # the whole row
    with pytest.raises(TamperedRecord, match="not by its recorded writer 'intern-7'"):
        mem.query(principal=coder, level=Level.PRIVATE)  # every row it lists


# -- 12. the audit log ------------------------------------------------------------------------


def test_12_audit_log_refuses_edits_and_verify_finds_forged_rows(
    mem: DualMemory, db_path: Path, tmp_path: Path
) -> None:
    fig = attacks.audit_log_attacks(mem, db_path, tmp_path)
    assert fig.problems == [], fig.problems
    assert fig.denials == 4  # UPDATE and DELETE refused by the triggers
    found = fig.extra["verify_found"]
    assert found.pop("untouched copy (must pass)") == []
    assert len(found) == 5 and all(found.values()), found
    # Each edit is found by the chain of its table, not by some other check that happens
    # to fail on the copy.
    for name, failed in found.items():
        chain = "journal hash chain" if name.startswith("journal") else "audit_log hash chain"
        assert chain in failed, (name, failed)


def test_12_the_careful_forger_edits_an_audit_row_and_gives_it_a_hash_of_its_own(
    mem: DualMemory, db_path: Path
) -> None:
    # The forger that rewrites the edited row's hash (so only the next row's prev_hash
    # gives it away) was a careless one: its hash was left as it was, or computed over the
    # wrong columns, and verify found the row by its own hash instead.
    p = Principal(agent_id="auditor", swarm="s")
    for n in range(3):
        mem.sync(mem.audit("app_event", principal=p, detail={"n": n}))
    with sqlite3.connect(db_path) as conn:
        ids = [r[0] for r in conn.execute("SELECT id FROM audit_log ORDER BY id")]
        before = conn.execute("SELECT hash FROM audit_log WHERE id = ?", (ids[1],)).fetchone()
    conn.close()
    attacks._edit_and_rehash(db_path, ids[1])
    cols = "id, ts, event, actor, scope, key, level, risk, detail, shard, stream_id, prev_hash"
    with sqlite3.connect(db_path) as conn:
        row = conn.execute(f"SELECT {cols}, hash FROM audit_log WHERE id = ?", (ids[1],)).fetchone()
        following = conn.execute(
            "SELECT prev_hash FROM audit_log WHERE id = ?", (ids[2],)
        ).fetchone()
    conn.close()
    assert row[3] == "someone" and bytes(row[-1]) != bytes(before[0])
    assert bytes(row[-1]) == chain_hash(bytes(row[-2]), row[:-2])  # its own hash holds
    assert bytes(following[0]) == bytes(before[0])  # the next row still names the old one


@settings(max_examples=300, deadline=None, suppress_health_check=SLOW_OK)
@given(st.lists(st.text(alphabet="ab\x1e\x1f", max_size=4), min_size=1, max_size=4))
def test_12_chain_hash_gives_every_row_its_own_encoding(values: list[str]) -> None:
    # Found by the suite: values were joined with \x1f unescaped, so a key holding \x1f
    # let an edit move text between two columns and keep the row's hash.
    h = chain_hash(GENESIS, values)
    for i in range(len(values) - 1):
        a, b = values[i], values[i + 1]
        for cut in range(len(a) + len(b) + 1):
            joined = a + "\x1f" + b
            other = [*values[:i], joined[:cut], joined[cut + 1 :], *values[i + 2 :]]
            if other != values and "\x1f" in joined[cut : cut + 1]:
                assert chain_hash(GENESIS, other) != h


def test_12_chain_hash_is_one_to_one_over_every_short_row() -> None:
    # Every row of two values over {a, \x1e, \x1f} up to 4 characters each (14,641 rows):
    # no two share a hash. Escaping the separator alone (not the escape character) let
    # ["x\x1e", "y\x1fz"] and ["x\x1fy\x1e", "z"] encode alike.
    import itertools

    alphabet = "a\x1e\x1f"
    words = ["".join(w) for n in range(5) for w in itertools.product(alphabet, repeat=n)]
    hashes = {chain_hash(GENESIS, [u, v]) for u in words for v in words}
    assert len(hashes) == len(words) ** 2
    assert chain_hash(GENESIS, ["x\x1e", "y\x1fz"]) != chain_hash(GENESIS, ["x\x1fy\x1e", "z"])


# -- 13. fuzzed input -------------------------------------------------------------------------

FUZZ_PRINCIPAL = Principal(agent_id="fz", team="fz", swarm="fz", project="fz", system=True)
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4)
        | st.tuples(children, children)
        | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=15,
)


def _nested(depth: int) -> object:
    value: object = "bottom"
    for _ in range(depth):
        value = [value]
    return value


NOT_JSON = st.sampled_from(
    [{1: "int key"}, {"a": {None: 1}}, {"a", "set"}, b"bytes", float("nan"), float("inf")]
)
VALUES = (
    JSON
    | NOT_JSON
    | st.sampled_from([99, 100, 101, 950, 5000]).map(_nested)
    | st.text(min_size=900, max_size=1200)
)
ANY_TEXT = st.text(st.characters(blacklist_categories=()), max_size=12)  # NUL, surrogates too
FUZZ_KEYS = (
    ANY_TEXT
    | st.text(alphabet="%_*?[]^'\";-/\\:{}\x01\x1f", min_size=1, max_size=12)
    | st.sampled_from(["x" * 512, "x" * 513, "\u00e9" * 256, "\u00e9" * 257])
    | st.sampled_from([b"k", 7, None, ["k"]])
)
FUZZ_LEVELS = st.sampled_from(list(Level)) | st.sampled_from([0, 6, -1, "team", "no", True, 1.0])
FUZZ_TTLS = st.none() | st.integers(-5, 10**10) | st.floats() | st.just("10")


@settings(max_examples=150, deadline=None, suppress_health_check=SLOW_OK)
@given(key=FUZZ_KEYS, value=VALUES, level=FUZZ_LEVELS, ttl=FUZZ_TTLS)
def test_13_put_is_a_clear_error_or_a_correct_round_trip(
    make_mem: MakeMem,
    raw_redis: redis.Redis,
    key: object,
    value: object,
    level: object,
    ttl: object,
) -> None:
    mem = _fuzz_mem(make_mem)
    cache = mem.layout.cache_pattern(0)
    keys_before = set(raw_redis.scan_iter(match=cache, count=1000))
    stream = mem.layout.stream(0)
    last_id_before = raw_redis.xinfo_stream(stream)["last-generated-id"]
    try:
        r = mem.put(key, value, level=level, principal=FUZZ_PRINCIPAL, ttl=ttl)  # type: ignore[arg-type]
    except ValidationError:
        # Nothing reached Redis: no new cache entry (an earlier example's short ttl may
        # expire meanwhile, and the worker may still be moving its chain anchors), no
        # command.
        assert set(raw_redis.scan_iter(match=cache, count=1000)) <= keys_before
        # No XADD (the worker may trim meanwhile, so the length would not say).
        assert raw_redis.xinfo_stream(stream)["last-generated-id"] == last_id_before
        return
    expected = _as_json(value)
    mem.sync(r, timeout=30)
    for fresh in (False, True):
        got = mem.get(str(key), level=level, principal=FUZZ_PRINCIPAL, fresh=fresh)  # type: ignore[arg-type]
        short_lived = isinstance(ttl, (int, float)) and ttl < 60
        assert got == expected or (short_lived and got is None), (key, value, got)


def _as_json(value: object) -> object:
    """What a value reads back as: JSON has arrays, not tuples (and nothing else changes)."""
    if isinstance(value, (list, tuple)):
        return [_as_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _as_json(v) for k, v in value.items()}
    return value


JUNK = st.sampled_from(
    [None, "", "\ud800", "a\x00b", 2**70, -1, True, 1.5, b"x", ["x"], "swarm:fz"]
)


@settings(max_examples=150, deadline=None, suppress_health_check=SLOW_OK)
@given(
    prefix=ANY_TEXT | JUNK,
    scope=JUNK | st.sampled_from(["agent:fz", "agent:x", "system", "team:\ud800", "nope"]),
    level=FUZZ_LEVELS | st.none(),
    number=JUNK | st.integers(-(2**64), 2**64),
    key=FUZZ_KEYS,
)
def test_13_reads_and_audits_are_a_clear_error_or_an_answer(
    make_mem: MakeMem, prefix: object, scope: object, level: object, number: object, key: object
) -> None:
    mem = _fuzz_mem(make_mem)
    p = FUZZ_PRINCIPAL
    calls = [
        lambda: mem.query(principal=p, prefix=prefix, level=level, scope=scope),
        lambda: mem.query(principal=p, since=number, until=number, limit=number),
        lambda: mem.get(key, level=level, principal=p, scope=scope),
        lambda: mem.get(key, level=level or 1, principal=p, fresh=True),
        lambda: mem.history(key, level=level or 3, principal=p, scope=scope, limit=number),
        lambda: mem.changes(number, principal=p, level=level, limit=number),
        lambda: mem.delete(key, level=level or 3, principal=p, scope=scope),
        lambda: mem.audit(prefix, principal=p, scope=scope, key=key, level=level),
    ]
    for call in calls:
        # The clear error is a ValidationError or an AccessDenied; anything else (an
        # AttributeError, UnicodeEncodeError, OverflowError...) fails the test.
        with contextlib.suppress(ValidationError, AccessDenied):
            call()  # type: ignore[no-untyped-call]


def _fuzz_mem(make_mem: MakeMem) -> DualMemory:
    # One DualMemory per test run (hypothesis calls the test many times per fixture).
    mem = getattr(make_mem, "_fuzz_mem", None)
    if mem is None:
        mem = make_mem(max_value_bytes=4096)
        make_mem._fuzz_mem = mem  # type: ignore[attr-defined]
    return mem  # type: ignore[no-any-return]


ENVELOPE_JUNK = st.binary(max_size=120) | st.builds(
    lambda head, body: head + body,
    st.sampled_from([b"\x01\x00", b"\x01\x01", b"\x01\x02\x08", b"\x01\x03\x01k", b"\x02\x02"]),
    st.binary(max_size=80),
)


@settings(max_examples=150, deadline=None, suppress_health_check=SLOW_OK)
@given(junk=ENVELOPE_JUNK, level=st.sampled_from(list(Level)))
def test_13_malformed_envelopes_in_sqlite_are_tampered_records(
    make_mem: MakeMem, db_path: Path, junk: bytes, level: Level
) -> None:
    mem = _fuzz_mem(make_mem)
    key = f"junk-{int(level)}"
    scope = FUZZ_PRINCIPAL.scope(level)
    if mem.store.get(scope or "", key, 0) is None:
        mem.sync(mem.put(key, {"real": True}, level=level, principal=FUZZ_PRINCIPAL), timeout=30)
    conn = sqlite3.connect(db_path)
    with conn:
        conn.execute(
            "UPDATE memory SET envelope = ? WHERE scope = ? AND key = ?", (junk, scope, key)
        )
    conn.close()
    try:
        got = mem.get(key, level=level, principal=FUZZ_PRINCIPAL)
    except (TamperedRecord, MissingKey):
        return
    # Only bytes that really are a plaintext envelope can open, and only at levels 3 and 4.
    assert not level.encrypted and junk[:1] == b"\x01", (junk, got)


FIELD_NAMES = [b"op", b"s", b"k", b"l", b"a", b"t", b"e", b"x", b"g", b"o", b"ev", b"r", b"d"]
FIELD_VALUES = st.sampled_from(
    [
        b"put",
        b"del",
        b"reseal",
        b"audit",
        b"team:jk",
        b"swarm:jk",
        b"system",
        b"2",
        b"3",
        b"-1",
        b"1-0",
        b"99999999999999999999",
        b"",
        b"\x01\x00{}",
        b"low",
        b"\xff",
    ]
) | st.binary(max_size=12)
ENTRIES = st.dictionaries(st.sampled_from(FIELD_NAMES), FIELD_VALUES, min_size=1, max_size=10) | (
    st.builds(attacks.random_fields, st.randoms(use_true_random=False))
)


@settings(max_examples=200, deadline=None, suppress_health_check=SLOW_OK)
@given(fields=st.lists(ENTRIES, min_size=1, max_size=6))
def test_13_malformed_stream_entries_fail_alone_and_leave_no_trace(
    fields: list[dict[bytes, bytes]],
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(Path(tmp) / "m.db")
        try:
            entries = [StreamEntry(0, f"{i + 1}-0", f) for i, f in enumerate(fields)]
            good = put_fields("swarm:ok", "k", Level.SWARM, "a", 1, b"\x01\x00{}", None)
            raw = redis_fields(good)
            entries.append(StreamEntry(0, f"{len(fields) + 1}-0", raw))
            result = store.apply(entries)  # never raises for bad content
            assert store.status(0, entries[-1].stream_id) == "committed"
            failed = {e.stream_id for e, _ in result.failed}
            assert len(failed) + len(result.done) == len(entries)
            for e in entries:
                if e.stream_id in failed:
                    assert store.status(0, e.stream_id) is None  # no journal or audit row
                    rows = store._read(
                        "SELECT COUNT(*) FROM memory WHERE stream_id = ?", [e.stream_id]
                    )
                    assert rows[0][0] == 0
        finally:
            store.close()


def test_13_a_dead_lettered_entry_that_left_a_row_behind_is_counted(tmp_path: Path) -> None:
    # The fuzz run's last check (a junk entry dead-lettered yet holding a journal, memory
    # or audit row: a partial write) counted nothing, whatever the database held.
    store = SQLiteStore(tmp_path / "m.db")
    try:
        fields = redis_fields(put_fields("swarm:ok", "k", Level.SWARM, "a", 1, b"\x01\x00{}", None))
        committed, dead_only = StreamEntry(0, "1-0", fields), StreamEntry(0, "2-0", fields)
        assert not store.apply([committed]).failed
        store.dead_letter([(committed, "dead and committed", 1), (dead_only, "dead only", 1)])
    finally:
        store.close()
    assert attacks._fuzz_traces(tmp_path / "m.db", [b"1-0", b"2-0"]) == 1
    assert attacks._fuzz_traces(tmp_path / "m.db", [b"2-0"]) == 0


@pytest.mark.real_redis
@pytest.mark.slow
def test_13_fuzzed_puts_envelopes_and_entries_against_a_worker_process(
    own_redis_server: RedisServer, tmp_path: Path
) -> None:
    fig = attacks.fuzz(FaultEnv(own_redis_server, tmp_path / "world"), cases=800)
    assert fig.problems == [], fig.problems
    assert fig.extra["accepted_puts"] > 50 and fig.extra["rejected_puts"] > 50
    assert fig.extra["worker"]["dead-lettered"] > 0  # the junk entries reached the worker
    # The junk envelopes reached a read (one that never placed them read nothing, and
    # counted that as a rejection).
    assert fig.extra["junk_envelopes_refused_by_a_read"] > 0.9 * 200


@pytest.mark.real_redis
def test_13_fuzz_reports_a_memory_that_loses_values_crashes_and_rejects_after_writing(
    own_redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Injected faults the fuzz run must report: SQLite reads that lose the value, a put
    # that raises an untranslated error, a put rejected after its command reached the
    # stream, a fresh read of a junk envelope that raises something else than
    # TamperedRecord. With any of those counts dropped, the run passed such a memory.
    real_put, real_get = DualMemory.put, DualMemory.get

    def put(mem: DualMemory, key: Any, value: Any, **kwargs: Any) -> Any:
        if kwargs.get("ttl") == 600:
            raise KeyError("injected")
        if kwargs.get("ttl") == 3.5:
            real_put(mem, "stray", 1, level=Level.SWARM, principal=kwargs["principal"])
            raise ValidationError("injected, after a write")
        return real_put(mem, key, value, **kwargs)

    def get(mem: DualMemory, key: Any, **kwargs: Any) -> Any:
        if kwargs.get("fresh") and key == "junk3":
            raise RuntimeError("injected")
        return None if not kwargs.get("fresh") else real_get(mem, key, **kwargs)

    monkeypatch.setattr(DualMemory, "put", put)
    monkeypatch.setattr(DualMemory, "get", get)
    fig = attacks.fuzz(FaultEnv(own_redis_server, tmp_path / "world"), cases=200)
    problems = "\n".join(fig.problems)
    assert "untranslated errors" in problems and "put: KeyError" in problems
    assert "envelope: RuntimeError: injected" in fig.extra["errors"]
    assert "rejected inputs left something behind" in problems
    assert "accepted values did not read back equal" in problems
