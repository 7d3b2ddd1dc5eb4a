"""Attack scenarios of issue 6 (9-13) with figures for the report.

``bench.faults`` runs them at full size for ``bench/results/FAULTS.md``; the tests in
``tests/test_attacks*.py`` run them (or hypothesis versions of them) at quick size.
"""

from __future__ import annotations

import json
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from acl import (
    AccessDenied,
    Codec,
    Keyring,
    Level,
    MissingKey,
    Principal,
    TamperedRecord,
    ValidationError,
    envelope_key_id,
    level_of_scope,
    readable_scopes,
)
from bench.faultkit import (
    FaultEnv,
    Figures,
    TrackedWriter,
    WorkerProc,
    check_persisted,
    wait_drained,
    wait_for,
    workers_stopped,
)
from dualmem import DualMemError, DualMemory, Receipt
from dualmem.batch import chain_hash
from dualmem.commands import cached_envelope

__all__ = [
    "NAMES",
    "Probe",
    "audit_log_attacks",
    "cross_scope_reads",
    "fuzz",
    "key_rotation",
    "make_principal",
    "nonces",
    "random_fields",
    "random_principal",
    "random_probe",
    "random_text",
    "random_value",
    "run_probe",
    "tampering",
    "write_everywhere",
]

TAG_BYTES = 16  # the GCM tag ends an envelope; the 12-byte nonce sits before its ciphertext


def nonces(n: int) -> Figures:
    """``n`` seals under one key: every 12-byte nonce differs."""
    fig = Figures("11a. nonces under one key", f"{n:,} seals")
    t0 = time.monotonic()
    ring = Keyring.generate()
    codec = Codec(ring)
    seen: set[bytes] = set()
    repeats = 0
    for i in range(n):
        data = b"%d" % (i & 7)  # below the compression threshold: ciphertext = data
        env = codec.seal_bytes(data, scope="agent:a", key="k", level=Level.PRIVATE, owner="a")
        end = len(env) - len(data) - TAG_BYTES
        nonce = env[end - 12 : end]
        if nonce in seen:
            repeats += 1
        seen.add(nonce)
    fig.require(repeats == 0, f"{repeats} repeated nonces in {n} seals")
    fig.sent = n
    fig.extra = {"seals": n, "distinct_nonces": len(seen), "repeated": repeats}
    fig.seconds = time.monotonic() - t0
    return fig


def _rotate(env: FaultEnv, *args: str, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [
                sys.executable,
                *("-m", "dualmem", "rotate-keys", "--redis-url", env.server.url),
                *("--db", str(env.db), "--keyring", str(env.keyfile), *args),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _rows_under(db: Path, key_id: str) -> int:
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute("SELECT envelope FROM memory WHERE envelope IS NOT NULL").fetchall()
    finally:
        conn.close()
    return sum(1 for (e,) in rows if envelope_key_id(bytes(e)) == key_id)


def _cache_under(env: FaultEnv, key_id: str) -> int:
    client = env.server.client()
    n = 0
    for name in client.scan_iter(match=b"dm:*:c:*", count=1000):
        value = client.get(name)
        envelope = cached_envelope(value)[0] if isinstance(value, bytes) else None
        if envelope is not None and envelope_key_id(envelope) == key_id:
            n += 1
    return n


def key_rotation(
    env: FaultEnv, *, records: int, batch: int = 100, kill: bool = True, seed: int = 11
) -> Figures:
    """``dualmem rotate-keys`` while a writer keeps writing: killed once mid-way and
    resumed, then nothing is left under the old key, every value reads back (with a
    keyring that no longer holds the old key) and no concurrent put was overwritten."""
    rnd = random.Random(seed)
    fig = Figures(
        "11b. key rotation (online, killed, resumed)",
        f"{records:,} records, {2 * records:,} concurrent puts",
    )
    t0 = time.monotonic()
    levels = (Level.PRIVATE, Level.TEAM, Level.SWARM)
    mem = env.memory(keyring_reload_interval=0.2)
    old = Keyring.load(env.keyfile).active_id
    w = WorkerProc(env, "w0").start()
    logs = env.workdir / "rotate.log"
    with workers_stopped([w]):
        writer = TrackedWriter(mem, keys=records, levels=levels)
        writer.run(records)  # every key written once under the old key
        wait_drained(mem, 120)
        before = _rows_under(env.db, old)
        # Concurrent puts to the same keys throughout the rotation.
        writer.start(2 * records, rate=2 * records / 4.0)
        first = _rotate(env, "--batch-size", str(batch), "--grace", "0.5", log=logs)
        killed_at = new = None
        if kill:
            new = wait_for(
                lambda: (k := Keyring.load(env.keyfile).active_id) != old and k, 30, "new key"
            )
            wait_for(lambda: _rows_under(env.db, str(new)) > 0, 60, "first re-sealed rows")
            time.sleep(rnd.uniform(0.0, 0.3))
            first.send_signal(signal.SIGKILL)
            first.wait(10)
            killed_at = _rows_under(env.db, old)
            second = _rotate(env, "--resume", "--batch-size", str(batch), log=logs)
        else:
            second = first
        second.wait(300)
        writer.join()
        wait_drained(mem, 120)
        # A last pass now that the writer is quiet, then drop the retired key.
        final = _rotate(env, "--resume", "--drop-retired", log=logs)
        final.wait(300)
        counters = w.stop()
    active = Keyring.load(env.keyfile).active_id
    out = logs.read_text(errors="replace")
    fig.require(second.returncode == 0, f"rotate-keys --resume exited {second.returncode}")
    fig.require(final.returncode == 0, f"rotate-keys --drop-retired exited {final.returncode}")
    left_rows = _rows_under(env.db, old)
    left_cache = _cache_under(env, old)
    fig.require(left_rows == 0, f"{left_rows} rows still sealed with the retired key")
    fig.require(left_cache == 0, f"{left_cache} cache entries still sealed with the retired key")
    ring = Keyring.load(env.keyfile)
    fig.require(old not in ring.ids, f"retired key {old} still in the key file")
    fig.require(active != old, "the active key did not change")
    # --resume finishes the killed run's rotation: a run that made a key of its own instead
    # would re-seal everything again and leave "killed and resumed" untested.
    fig.require(not kill or active == new, f"the resumed run made another key than {new}")
    check = check_persisted(env.db, writer.acks, mem)
    mem.close()
    # Every last value reads back through a process that never had the old key.
    fresh = DualMemory(redis_url=env.server.url, db_path=str(env.db), keyring=ring, worker=False)
    unreadable = 0
    try:
        check_new = check_persisted(env.db, writer.acks, fresh)
        unreadable = len(check_new.stale)
    except Exception as exc:  # MissingKey or TamperedRecord: the property is broken
        fig.problems.append(f"reading with the new key file failed: {exc!r}")
    finally:
        fresh.close()
    fig.require(unreadable == 0, f"{unreadable} records unreadable without the old key")
    fig.sent = writer.sent
    fig.acked = check.acked
    fig.persisted = check.persisted
    fig.lost = len(check.lost)
    fig.duplicated = check.duplicated
    fig.require(not check.lost, f"{len(check.lost)} acknowledged puts lost")
    fig.require(not check.stale, f"{len(check.stale)} keys lost their newest value")
    fig.extra = {
        "records_under_old_key_before": before,
        "left_under_old_key_when_killed": killed_at,
        "left_under_old_key_after": left_rows,
        "cache_entries_under_old_key_after": left_cache,
        "old_key_dropped": old not in ring.ids,
        "resumed_the_killed_runs_key": kill and active == new,
        "keys_lost_newest_value": len(check.stale),
        "worker": counters,
        "rotate_keys_output": [ln for ln in out.splitlines() if "re-sealed" in ln][-3:],
    }
    fig.seconds = time.monotonic() - t0
    return fig


# -- 9. cross-scope reads --------------------------------------------------------------------

#: Few names, ':' and '%' among them, so different scopes and keys collide wherever a
#: layout or a query is not exact.
NAMES = ("a", "b", "a:b", "b%", "%3A")


def make_principal(agent: str, team: str | None, swarm: str | None, system: bool) -> Principal:
    """A principal; its project is its team's, so project scopes are shared too."""
    return Principal(agent_id=agent, team=team, swarm=swarm, project=team, system=system)


def write_everywhere(mem: DualMemory, writer: Principal, keys: Sequence[str]) -> list[Receipt]:
    """``writer`` puts each key at every level it has a scope at; the value names the scope,
    so a reader can tell where a value it received came from."""
    out = []
    for level in Level:
        scope = writer.scope(level)
        if scope is None:
            continue
        for key in keys:
            value = {"scope": scope, "key": key, "by": writer.agent_id}
            out.append(mem.put(key, value, level=level, principal=writer))
    return out


@dataclass(frozen=True)
class Probe:
    """One read attempt: ``op`` is get, fresh (get from the cache), query, history or
    changes; ``scope`` is a scope to name explicitly (``None``: the principal's own)."""

    op: str
    level: Level | None
    key: str
    scope: str | None


def run_probe(mem: DualMemory, reader: Principal, probe: Probe) -> tuple[list[str], Receipt | None]:
    """Run one probe; returns the problems seen (a leak) and the denial's audit receipt."""
    allowed = set(readable_scopes(reader).values())
    problems: list[str] = []
    lvl = probe.level
    try:
        if probe.op in ("get", "fresh"):
            level = lvl or Level.SWARM
            rec = mem.get_record(
                probe.key,
                level=level,
                principal=reader,
                scope=probe.scope,
                fresh=probe.op == "fresh",
            )
            found = [] if rec is None else [(rec.scope, rec.key, rec.value)]
        elif probe.op == "query":
            recs = mem.query(principal=reader, level=lvl, scope=probe.scope, prefix=probe.key[:1])
            found = [(r.scope, r.key, r.value) for r in recs]
        elif probe.op == "history":
            level = lvl or Level.SWARM
            changes = mem.history(probe.key, level=level, principal=reader, scope=probe.scope)
            found = [(c.scope, c.key, None) for c in changes]
        else:
            found = [(c.scope, c.key, None) for c in mem.changes(0, principal=reader, level=lvl)]
    except ValidationError:
        return [], None  # a scope that is not at the level asked for: a clear error, no read
    except TamperedRecord as exc:  # nobody tampered here: another record's envelope arrived
        return [f"{reader.agent_id} met {exc} via {probe}"], None
    except AccessDenied as exc:
        receipt: Receipt | None = getattr(exc, "audit_receipt", None)
        if receipt is None:
            problems.append(f"denial without an audit receipt: {exc}")
        return problems, receipt
    prefix = probe.key[:1] if probe.op == "query" else None
    for scope, key, value in found:
        if scope not in allowed:
            problems.append(f"{reader.agent_id} got {scope}/{key} via {probe}")
        # Inside its own scopes too, a read hands out only what was asked for: another
        # key, another prefix's or another named scope's record is a read past the query.
        asked_key = key.startswith(prefix) if prefix is not None else key == probe.key
        asked_scope = probe.scope is None or scope == probe.scope
        if probe.op != "changes" and not (asked_key and asked_scope):
            problems.append(f"{reader.agent_id} got {scope}/{key}, not asked for, via {probe}")
        if value is not None and (value.get("scope"), value.get("key")) != (scope, key):
            problems.append(f"{reader.agent_id} got {value} as {scope}/{key} via {probe}")
    return problems, None


def random_probe(rnd: random.Random, keys: Sequence[str]) -> Probe:
    """A probe over every op, level and scope shape, own or not."""
    kind = rnd.choice(["agent", "team", "swarm", "project"])
    scope = rnd.choice([None, None, "system", f"{kind}:{rnd.choice(NAMES)}"])
    level = rnd.choice([None, *Level])
    if scope is not None:
        level = level_of_scope(scope) if rnd.random() < 0.8 else level
    return Probe(
        rnd.choice(["get", "fresh", "query", "history", "changes"]), level, rnd.choice(keys), scope
    )


def random_principal(rnd: random.Random) -> Principal:
    """A principal made of :data:`NAMES`."""
    return make_principal(
        rnd.choice(NAMES),
        rnd.choice([None, *NAMES]),
        rnd.choice([None, *NAMES]),
        rnd.random() < 0.2,
    )


def cross_scope_reads(mem: DualMemory, *, attempts: int, seed: int = 9) -> Figures:
    """Random principals read with random levels, scopes and keys: no value outside the
    reader's scopes is ever returned, and every denial leaves an audit row."""
    rnd = random.Random(seed)
    fig = Figures("9. cross-scope reads", f"{attempts:,} read attempts, random principals")
    t0 = time.monotonic()
    keys = ["k", "b:k", "b", "%3A"]  # with NAMES: "swarm:a:b"+"k" and "swarm:a"+"b:k"
    writers = {random_principal(rnd) for _ in range(12)}
    receipts = [r for w in writers for r in write_everywhere(mem, w, keys)]
    mem.sync(receipts[-1], timeout=30)
    before = _denials(mem)
    denials: list[Receipt] = []
    leaks: list[str] = []
    for _ in range(attempts):
        problems, receipt = run_probe(mem, random_principal(rnd), random_probe(rnd, keys))
        leaks += problems
        if receipt is not None:
            denials.append(receipt)
    for r in denials:
        mem.sync(r, timeout=30)
    audited = _denials(mem) - before
    fig.sent = attempts
    fig.denials = len(denials)
    fig.require(not leaks, f"{len(leaks)} values outside the reader's scopes: {leaks[:3]}")
    fig.require(audited == len(denials), f"{len(denials)} denials but {audited} audit rows")
    fig.extra = {
        "writers": len(writers),
        "records": len(receipts),
        "leaks": len(leaks),
        "denials_audited": audited,
    }
    fig.seconds = time.monotonic() - t0
    return fig


def _denials(mem: DualMemory) -> int:
    return sum(1 for a in mem.store.audit_log() if a.event == "access_denied")


# -- 10. ciphertext tampering ---------------------------------------------------------------


def tampering(
    mem: DualMemory, raw: redis.Redis, db: Path, *, rounds: int, seed: int = 10
) -> Figures:
    """Flip bits, swap envelopes between keys, scopes, levels and key ids, in SQLite and in
    the Redis cache: every read raises ``TamperedRecord`` (``MissingKey`` for a key id the
    keyring does not hold), never returns another record's plaintext."""
    rnd = random.Random(seed)
    fig = Figures("10. ciphertext tampering", f"{rounds:,} tampered reads in SQLite and Redis")
    t0 = time.monotonic()
    me = Principal(agent_id="a", team="t", swarm="s", project="p", system=True)
    other = Principal(agent_id="b", team="u", swarm="s", project="p", system=True)
    keys = ["k0", "k1", "k:2"]
    receipts = write_everywhere(mem, me, keys) + write_everywhere(mem, other, keys)
    ring = mem.codec.keyring
    assert ring is not None
    mem.codec.keyring = ring.with_new_key()  # a second key id for the swaps
    receipts += write_everywhere(mem, me, ["k3"]) + write_everywhere(mem, other, ["k3"])
    mem.sync(receipts[-1], timeout=30)
    keys.append("k3")
    sealed = [lvl for lvl in Level if lvl.encrypted]
    counts: Counter[str] = Counter()
    leaks: list[str] = []
    for i in range(rounds):
        where = "redis" if i % 2 else "sqlite"
        attack = rnd.choice(["bit", "key", "scope", "level", "key_id", "unknown_key_id", "plain"])
        level = rnd.choice(sealed)
        key = rnd.choice(keys)
        victim = (me.scope(level) or "", key)
        original = _envelope(mem, raw, db, where, *victim)
        forged = _forge(mem, raw, db, where, attack, original, level, key, me, other, rnd)
        if forged is None:
            continue
        _set_envelope(mem, raw, db, where, *victim, forged)
        try:
            value = mem.get(key, level=level, principal=me, fresh=where == "redis")
            leaks.append(f"{attack} in {where}: {victim} read as {value}")
        except TamperedRecord:
            counts[f"{where}:{attack}:tampered"] += 1
        except MissingKey:
            counts[f"{where}:{attack}:missing_key"] += 1
        finally:
            _set_envelope(mem, raw, db, where, *victim, original)
    detected = sum(counts.values())
    # A flipped bit in the key id names a key this keyring never had: MissingKey is right.
    wrong_kind = sum(
        n
        for k, n in counts.items()
        if k.endswith("missing_key") and ":unknown_key_id:" not in k and ":bit:" not in k
    )
    fig.sent = detected + len(leaks)

    def audited() -> int:
        events = ("tampered_record", "missing_key")
        return sum(1 for a in mem.store.audit_log() if a.event in events)

    try:
        wait_for(lambda: audited() >= detected, 30, "audit rows of the tampered reads", 0.05)
    except TimeoutError:
        fig.problems.append(f"{detected} tampered reads, {audited()} audit rows")
    fig.require(not leaks, f"{len(leaks)} tampered envelopes were read: {leaks[:3]}")
    fig.require(wrong_kind == 0, f"{wrong_kind} swaps between known keys gave MissingKey")
    fig.extra = {
        "detected": detected,
        "audited": audited(),
        "leaks": len(leaks),
        "by_attack": dict(sorted(counts.items())),
    }
    fig.notes.append(
        "levels 3 and 4 are plaintext by design (no MAC): moving their rows is not detected, "
        "only levels 1, 2 and 5 are attacked here"
    )
    fig.seconds = time.monotonic() - t0
    return fig


def _envelope(
    mem: DualMemory, raw: redis.Redis, db: Path, where: str, scope: str, key: str
) -> bytes:
    if where == "redis":
        value = raw.get(mem.layout.cache_key(mem.layout.shard_of(scope, key), scope, key))
        assert isinstance(value, bytes), (scope, key)
        return value
    conn = sqlite3.connect(db)
    try:
        row = conn.execute("SELECT envelope FROM memory WHERE scope=? AND key=?", (scope, key))
        return bytes(row.fetchone()[0])
    finally:
        conn.close()


def _set_envelope(
    mem: DualMemory, raw: redis.Redis, db: Path, where: str, scope: str, key: str, env: bytes
) -> None:
    if where == "redis":
        raw.set(mem.layout.cache_key(mem.layout.shard_of(scope, key), scope, key), env)
        return
    conn = sqlite3.connect(db)
    try:
        with conn:
            conn.execute("UPDATE memory SET envelope=? WHERE scope=? AND key=?", (env, scope, key))
    finally:
        conn.close()


def _forge(
    mem: DualMemory,
    raw: redis.Redis,
    db: Path,
    where: str,
    attack: str,
    original: bytes,
    level: Level,
    key: str,
    me: Principal,
    other: Principal,
    rnd: random.Random,
) -> bytes | None:
    """The tampered envelope for ``attack`` (``None`` when it does not apply)."""

    def read(scope: str | None, k: str) -> bytes:
        return _envelope(mem, raw, db, where, scope or "", k)

    def flip() -> bytes:
        env = bytearray(original)
        bit = rnd.randrange(len(env) * 8)
        env[bit // 8] ^= 1 << (bit % 8)
        return bytes(env)

    def relabel(known: bool) -> bytes | None:
        ring, kid = mem.codec.keyring, envelope_key_id(original)
        if kid is None or ring is None:
            return None
        if known:
            others = [k for k in ring.ids if k != kid and len(k) == len(kid)]
        else:
            others = ["z" * len(kid)]
        return original.replace(kid.encode(), others[0].encode(), 1) if others else None

    keys = [k for k in ("k0", "k1", "k:2", "k3") if k != key]
    forgeries: dict[str, Callable[[], bytes | None]] = {
        "bit": flip,
        "key": lambda: read(me.scope(level), rnd.choice(keys)),
        "scope": lambda: (
            None if other.scope(level) == me.scope(level) else read(other.scope(level), key)
        ),
        "level": lambda: read(me.scope(rnd.choice([x for x in Level if x is not level])), key),
        "key_id": lambda: relabel(known=True),
        "unknown_key_id": lambda: relabel(known=False),
        "plain": lambda: b"\x01\x00" + json.dumps({"scope": me.scope(level), "key": key}).encode(),
    }
    return forgeries[attack]()


# -- 12. the audit log ------------------------------------------------------------------------


def _copy_db(src: Path, dst: Path) -> None:
    a, b = sqlite3.connect(src), sqlite3.connect(dst)
    try:
        a.backup(b)
    finally:
        a.close()
        b.close()


def _edit(db: Path, *statements: str | tuple[str, tuple[object, ...]]) -> None:
    conn = sqlite3.connect(db)
    try:
        for st in statements:
            sql, params = (st, ()) if isinstance(st, str) else st
            conn.execute(sql, params)
        conn.commit()
    finally:
        conn.close()


_NO_TRIGGERS = ("DROP TRIGGER audit_log_no_update", "DROP TRIGGER audit_log_no_delete")


def _rehash_audit_row(db: Path, row_id: int) -> None:
    """The careful forger: recompute the edited row's own hash (not the later ones)."""
    conn = sqlite3.connect(db)
    try:
        cols = "id, ts, event, actor, scope, key, level, risk, detail, shard, stream_id, prev_hash"
        row = conn.execute(f"SELECT {cols} FROM audit_log WHERE id = ?", (row_id,)).fetchone()
        digest = chain_hash(bytes(row[-1]), row[:-1])
        conn.execute("UPDATE audit_log SET hash = ? WHERE id = ?", (digest, row_id))
        conn.commit()
    finally:
        conn.close()


def _edit_and_rehash(db: Path, row_id: int) -> None:
    _edit(db, *_NO_TRIGGERS, f"UPDATE audit_log SET actor = 'someone' WHERE id = {row_id}")
    _rehash_audit_row(db, row_id)


def audit_log_attacks(mem: DualMemory, db: Path, workdir: Path) -> Figures:
    """UPDATE and DELETE on ``audit_log`` are refused by the database; rows edited with the
    triggers dropped (and journal rows edited) are found by ``dualmem verify``."""
    fig = Figures("12. audit log edits", "4 refused statements, 6 edits checked by verify")
    t0 = time.monotonic()
    p = Principal(agent_id="auditor", team="t", swarm="s", project="p")
    receipts = [
        mem.put("plain", 1, level=Level.SWARM, principal=p),
        mem.put("a\x1fb", 2, level=Level.SWARM, principal=p),  # a unit separator in a key
        mem.audit("app_event", principal=p, risk="medium", detail={"n": 1}),
    ]
    for i in range(4):
        try:
            mem.get(f"x{i}", level=Level.SYSTEM, principal=p)
        except AccessDenied as exc:
            receipts.append(exc.audit_receipt)  # type: ignore[attr-defined]
    receipts.append(mem.audit("app_event", principal=p, detail={"n": 2}))
    for r in receipts:
        mem.sync(r, timeout=30)
    refused = 0
    conn = sqlite3.connect(db)
    try:
        for sql in (
            "UPDATE audit_log SET detail = '{}' WHERE id = 1",
            "UPDATE audit_log SET risk = 'low'",
            "DELETE FROM audit_log WHERE id = 1",
            "DELETE FROM audit_log",
        ):
            try:
                conn.execute(sql)
                conn.commit()
                fig.problems.append(f"the database accepted: {sql}")
            except sqlite3.IntegrityError as exc:
                refused += "append-only" in str(exc)
    finally:
        conn.close()
    fig.require(refused == 4, f"{refused} of 4 statements refused as append-only")
    conn = sqlite3.connect(db)
    try:
        sep_row = conn.execute(
            "SELECT seq, scope, key FROM journal WHERE key = ?", ("a\x1fb",)
        ).fetchone()
        audit_ids = [r[0] for r in conn.execute("SELECT id FROM audit_log ORDER BY id")]
    finally:
        conn.close()
    mid = audit_ids[len(audit_ids) // 2]
    edits: dict[str, Callable[[Path], None]] = {
        "untouched copy (must pass)": lambda f: None,
        "audit row edited": lambda f: _edit(
            f, *_NO_TRIGGERS, f"UPDATE audit_log SET detail = '{{\"forged\":1}}' WHERE id = {mid}"
        ),
        "audit row edited, its own hash recomputed": lambda f: _edit_and_rehash(f, mid),
        "audit row deleted": lambda f: _edit(
            f, *_NO_TRIGGERS, f"DELETE FROM audit_log WHERE id = {mid}"
        ),
        "journal row edited (put -> del)": lambda f: _edit(
            f, "UPDATE journal SET op = 'del' WHERE seq = 1"
        ),
        "journal scope/key boundary moved": lambda f: _edit(
            f,
            (
                "UPDATE journal SET scope = ?, key = ? WHERE seq = ?",
                (sep_row[1] + "\x1fa", "b", sep_row[0]),
            ),
        ),
    }
    found: dict[str, list[str]] = {}
    for name, edit in edits.items():
        copy = workdir / f"audit-{len(found)}.db"
        _copy_db(db, copy)
        edit(copy)
        done = subprocess.run(
            [sys.executable, "-m", "dualmem", "verify", "--db", str(copy), "--no-redis", "--json"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        try:
            failed = [c["name"] for c in json.loads(done.stdout)["checks"] if c["status"] == "fail"]
        except (ValueError, KeyError):
            failed = [f"unreadable output, exit {done.returncode}: {done.stderr[-300:]}"]
        found[name] = failed
        if name.startswith("untouched"):
            fig.require(
                done.returncode == 0 and not failed, f"verify failed an untouched copy: {failed}"
            )
        else:
            fig.require(
                done.returncode != 0 and any("chain" in c for c in failed),
                f"verify did not find '{name}' (exit {done.returncode}, failed: {failed})",
            )
    fig.sent = len(edits) - 1
    fig.denials = refused
    fig.extra = {"verify_found": found}
    fig.notes.append(
        "a hash chain cannot see a forger who rewrites every later hash, or drops rows at the "
        "tail; anchoring the last hash elsewhere (a mirror, a backup) is what catches that"
    )
    fig.seconds = time.monotonic() - t0
    return fig


# -- 13. fuzzed input -------------------------------------------------------------------------

_ODD = "\x01\x1f\x7f%_*?[]^'\";--/\\:{}\u2028\u00e9\U0001f600abc"


def random_text(rnd: random.Random, max_len: int = 12) -> str:
    """Text of odd characters (controls, SQL and glob metacharacters, emoji), now and then
    with a NUL or a lone surrogate, which no key or value may hold."""
    chars = [rnd.choice(_ODD) for _ in range(rnd.randint(0, max_len))]
    if chars and rnd.random() < 0.1:
        chars[rnd.randrange(len(chars))] = rnd.choice(["\x00", "\ud800"])
    return "".join(chars)


def random_value(rnd: random.Random, depth: int = 0) -> object:
    """A JSON value, or now and then something JSON cannot hold exactly."""
    roll = rnd.random()
    if depth > 3 or roll < 0.3:
        return rnd.choice(
            [
                None,
                True,
                0,
                -1,
                2**70,
                1.5,
                float("nan"),
                random_text(rnd),
                "x" * rnd.choice([1, 5000]),
            ]
        )
    if roll < 0.45:
        return rnd.choice([{1: "int key"}, {"a", "set"}, b"bytes", object(), (1, 2)])
    if roll < 0.5:
        deep: object = []
        for _ in range(rnd.choice([50, 101, 5000])):
            deep = [deep]
        return deep
    if roll < 0.75:
        return [random_value(rnd, depth + 1) for _ in range(rnd.randint(0, 4))]
    return {random_text(rnd, 4): random_value(rnd, depth + 1) for _ in range(rnd.randint(0, 4))}


def random_fields(rnd: random.Random) -> dict[bytes, bytes]:
    """A stream entry that may or may not be a command: half are valid commands with one
    to three fields removed or replaced, half are random fields."""
    junk = [
        b"nope",
        b"swarm:jk",
        b"agent:jk",
        b"team:jk",
        b"system",
        b"0",
        b"3",
        b"9",
        b"-1",
        b"99999999999999999999999",
        b"",
        b"\xff\xfe",
        b"\x01\x00{}",
        b"\x01\x02\x02kx",
        b"1-0",
        b"9999999999999-0",
        b"low",
        b"{}",
        b"k" * 600,
        b"a\x00b",
    ]
    if rnd.random() < 0.5:
        names = [b"op", b"s", b"k", b"l", b"a", b"t", b"e", b"x", b"g", b"o", b"ev", b"r", b"\xff"]
        return {rnd.choice(names): rnd.choice(junk) for _ in range(rnd.randint(1, 9))}
    valid: dict[bytes, bytes] = {
        b"op": rnd.choice([b"put", b"del", b"reseal", b"audit"]),
        b"s": b"team:jk",
        b"k": b"jk",
        b"l": b"2",
        b"a": b"jk",
        b"t": b"1",
        b"e": b"\x01\x00{}",
        b"g": b"1",
        b"ev": b"e",
        b"r": b"low",
        b"d": b"{}",
    }
    for _ in range(rnd.randint(1, 3)):
        name = rnd.choice(list(valid))
        if rnd.random() < 0.3:
            valid.pop(name)
        else:
            valid[name] = rnd.choice(junk)
    return valid or {b"op": b"nope"}


@dataclass
class _FuzzTally:
    #: (key, level) -> (value as it reads back, receipt, monotonic expiry or None)
    accepted: dict[tuple[str, Level], tuple[object, Receipt, float | None]] = field(
        default_factory=dict
    )
    rejected: int = 0
    crashes: int = 0
    partial: int = 0
    wrong: int = 0
    envelopes: int = 0
    #: junk envelopes a read refused (TamperedRecord, MissingKey): the ones that reached a read
    refused_envelopes: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    def crash(self, what: str, exc: Exception) -> None:
        self.crashes += 1
        self.errors[f"{what}{type(exc).__name__}: {exc}"[:120]] += 1


def _fuzz_puts(
    mem: DualMemory, client: redis.Redis, p: Principal, rnd: random.Random, n: int, t: _FuzzTally
) -> None:
    stream = mem.layout.stream(0)
    for _ in range(n):
        key: object = random_text(rnd, rnd.choice([8, 8, 600]))
        if rnd.random() < 0.05:
            key = rnd.choice([b"bytes", 7, None, ["k"]])
        level: object = rnd.choice([*Level, *Level, *Level, 0, 6, "team", "ADMIN", True, 2.0])
        ttl = rnd.choice([None, None, None, None, 600, 3.5, 0, -1, float("inf"), "10", 1e12])
        value = random_value(rnd)
        # The last id the stream generated, not its length: the worker trims meanwhile.
        last = _last_id(client, stream)
        try:
            r = mem.put(key, value, level=level, principal=p, ttl=ttl)  # type: ignore[arg-type]
        except (ValidationError, AccessDenied) as exc:
            t.rejected += 1
            t.errors[type(exc).__name__] += 1
            t.partial += _last_id(client, stream) != last
            continue
        except Exception as exc:  # anything else is an untranslated error
            t.crash("put: ", exc)
            continue
        # JSON has arrays, not tuples: a tuple comes back as a list.
        expires = None if ttl is None else time.monotonic() + float(ttl)
        t.accepted[(r.key, level_of_scope(r.scope))] = (json.loads(json.dumps(value)), r, expires)


def _last_id(client: redis.Redis, stream: bytes) -> object:
    info: Any = client.xinfo_stream(stream)
    return info["last-generated-id"]


def _fuzz_envelopes(
    mem: DualMemory, client: redis.Redis, p: Principal, rnd: random.Random, n: int, t: _FuzzTally
) -> None:
    for i in range(n):
        level = rnd.choice(list(Level))
        scope = p.scope(level) or ""
        junk = bytes(rnd.randrange(256) for _ in range(rnd.randint(0, 80)))
        if rnd.random() < 0.5:
            junk = bytes((1, rnd.choice([0, 1, 2, 3]))) + junk
        client.set(mem.layout.cache_key(0, scope, f"junk{i}"), junk)
        try:
            mem.get(f"junk{i}", level=level, principal=p, fresh=True)
        except (TamperedRecord, MissingKey):
            t.refused_envelopes += 1
        except Exception as exc:
            t.crash("envelope: ", exc)
            continue
        t.envelopes += 1  # rejected, or junk that happens to be a valid plaintext envelope


def _fuzz_traces(db: Path, junk_ids: Sequence[bytes]) -> int:
    """Junk entries that were dead-lettered yet left rows behind."""
    conn = sqlite3.connect(db)
    partial = 0
    try:
        for sid in junk_ids:
            ident = sid.decode()
            dead = conn.execute("SELECT COUNT(*) FROM dead_letters WHERE stream_id = ?", (ident,))
            rows = conn.execute(
                "SELECT (SELECT COUNT(*) FROM journal WHERE stream_id = ?) + "
                "(SELECT COUNT(*) FROM memory WHERE stream_id = ?) + "
                "(SELECT COUNT(*) FROM audit_log WHERE stream_id = ?)",
                (ident, ident, ident),
            )
            partial += bool(dead.fetchone()[0] and rows.fetchone()[0])
    finally:
        conn.close()
    return partial


def fuzz(env: FaultEnv, *, cases: int, seed: int = 13) -> Figures:
    """Random keys, values, levels and ttls through ``put``; random bytes as envelopes;
    random stream entries in front of a worker process: clear errors or correct round
    trips, never a crash of the worker, never a partial write."""
    rnd = random.Random(seed)
    fig = Figures(
        "13. fuzzed input", f"{cases:,} puts, {cases // 4:,} envelopes, {cases // 4:,} entries"
    )
    t0 = time.monotonic()
    mem = env.memory(max_value_bytes=64 * 1024)
    client = env.server.client()
    w = WorkerProc(env, "w0", extra=("--max-deliveries", "2")).start()
    p = Principal(agent_id="fz", team="fz", swarm="fz", project="fz", system=True)
    t = _FuzzTally()
    with workers_stopped([w]):
        _fuzz_puts(mem, client, p, rnd, cases, t)
        _fuzz_envelopes(mem, client, p, rnd, cases // 4, t)
        stream = mem.layout.stream(0)
        junk_ids = [
            bytes(client.xadd(stream, random_fields(rnd)))  # type: ignore[arg-type]
            for _ in range(cases // 4)
        ]
        tail = mem.put("after-the-junk", {"ok": True}, level=Level.SWARM, principal=p)
        try:
            for r in [tail, *(r for _, r, _ in t.accepted.values())]:
                mem.sync(r, timeout=60)
        except DualMemError as exc:
            fig.problems.append(f"the worker stopped persisting after the junk: {exc}")
        worker_alive = w.proc is not None and w.proc.poll() is None
        wait_drained(mem, 60)
        counters = w.stop()
    for (key, level), (value, _, expires) in t.accepted.items():
        for fresh in (False, True):
            got = mem.get(key, level=level, principal=p, fresh=fresh)
            expired = expires is not None and time.monotonic() >= expires
            if got != value and not (got is None and expired):
                t.wrong += 1
                t.errors[f"round trip {key!r}: {got!r} != {value!r}"[:120]] += 1
    t.partial += _fuzz_traces(env.db, junk_ids)
    mem.close()
    fig.sent = cases
    fig.acked = len(t.accepted)
    fig.require(t.crashes == 0, f"{t.crashes} untranslated errors: {list(t.errors)[:5]}")
    fig.require(t.partial == 0, f"{t.partial} rejected inputs left something behind")
    fig.require(t.wrong == 0, f"{t.wrong} accepted values did not read back equal")
    fig.require(worker_alive, "the worker process died on the junk entries")
    fig.extra = {
        "accepted_puts": len(t.accepted),
        "rejected_puts": t.rejected,
        "errors": dict(t.errors.most_common(8)),
        "junk_envelopes_rejected": t.envelopes,
        "junk_envelopes_refused_by_a_read": t.refused_envelopes,
        "junk_stream_entries": len(junk_ids),
        "worker": counters,
    }
    fig.seconds = time.monotonic() - t0
    return fig
