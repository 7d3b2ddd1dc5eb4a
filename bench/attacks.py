"""Attack scenarios of issue 6 (9-13) with figures for the report.

``bench.faults`` runs them at full size for ``bench/results/FAULTS.md``; the tests in
``tests/test_attacks*.py`` run them (or hypothesis versions of them) at quick size.
"""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from acl import Codec, Keyring, Level, envelope_key_id
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
from dualmem import DualMemory

__all__ = ["key_rotation", "nonces"]

NONCE_OFFSET = 3  # version, flags, key id length; the nonce follows the key id


def nonces(n: int) -> Figures:
    """``n`` seals under one key: every 12-byte nonce differs."""
    fig = Figures("11a. nonces under one key", f"{n:,} seals")
    t0 = time.monotonic()
    ring = Keyring.generate()
    codec = Codec(ring)
    kid_len = len(ring.active_id)
    start = NONCE_OFFSET + kid_len
    seen: set[bytes] = set()
    repeats = 0
    for i in range(n):
        env = codec.seal_bytes(b"%d" % (i & 7), scope="agent:a", key="k", level=Level.PRIVATE)
        nonce = env[start : start + 12]
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
        if value is not None and envelope_key_id(bytes(value)) == key_id:
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
        killed_at = None
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
        "keys_lost_newest_value": len(check.stale),
        "worker": counters,
        "rotate_keys_output": [ln for ln in out.splitlines() if "re-sealed" in ln][-3:],
    }
    fig.seconds = time.monotonic() - t0
    return fig
