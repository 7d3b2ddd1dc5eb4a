"""The dualmem command: worker processes (including SIGKILL), keygen, stats, demo."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from acl import Level, Principal
from dualmem import DualMemory
from dualmem.cli import main

from .conftest import RedisServer, wait_until

CODER = Principal(agent_id="coder-1", team="backend", swarm="s1", project="shop")


def start_worker(url: str, db: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "dualmem", "worker", "--redis-url", url, "--db", str(db), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def stop(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    return out


def test_keygen_writes_a_private_key_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "k" / "keys.json"
    assert main(["keygen", "--out", str(out)]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert json.loads(out.read_text())["format"] == "dualmem-keyring"
    assert main(["keygen", "--out", str(out)]) == 2  # never overwritten by accident
    assert "already exists" in capsys.readouterr().err


def test_worker_processes_persist_and_stop_cleanly(
    redis_server: RedisServer, tmp_path: Path, keyfile: Path
) -> None:
    redis_server.client().flushall()
    db = tmp_path / "w.db"
    writer = DualMemory(
        redis_url=redis_server.url, db_path=str(db), keyring=str(keyfile), worker=False
    )
    workers = [start_worker(redis_server.url, db) for _ in range(2)]  # one consumer group
    try:
        receipts = [
            writer.put(f"k{i}", {"i": i}, level=Level.PRIVATE, principal=CODER) for i in range(2000)
        ]
        for r in receipts:
            writer.sync(r, timeout=20)
    finally:
        outputs = [stop(w) for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs
    assert all("stopped" in o for o in outputs), outputs
    applied = sum(int(o.split(" applied")[0].rsplit(" ", 1)[-1]) for o in outputs)
    assert applied == 2000, outputs
    assert len(writer.changes(0, principal=CODER)) == 2000
    writer.close()


def test_worker_killed_with_sigkill_loses_nothing(
    redis_server: RedisServer, tmp_path: Path, keyfile: Path
) -> None:
    redis_server.client().flushall()
    db = tmp_path / "kill.db"
    writer = DualMemory(
        redis_url=redis_server.url, db_path=str(db), keyring=str(keyfile), worker=False
    )
    receipts = []
    for round_ in range(4):
        worker = start_worker(redis_server.url, db, "--claim-idle-ms", "300", "--batch-size", "50")
        for i in range(500):
            receipts.append(
                writer.put(
                    f"k{i % 97}", {"round": round_, "i": i}, level=Level.SWARM, principal=CODER
                )
            )
        time.sleep(0.05 * round_)
        worker.send_signal(signal.SIGKILL)  # no drain, no goodbye
        worker.wait(10)
    survivor = start_worker(redis_server.url, db, "--claim-idle-ms", "300")
    try:
        for r in receipts:
            writer.sync(r, timeout=30)
    finally:
        stop(survivor)
    with sqlite3.connect(db) as conn:
        n, distinct = conn.execute(
            "SELECT COUNT(*), COUNT(DISTINCT stream_id) FROM journal"
        ).fetchone()
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    assert n == distinct == len(receipts)
    last = {}
    for r in receipts:
        last[r.key] = r
    for key, receipt in last.items():
        rec = writer.get_record(key, level=Level.SWARM, principal=CODER)
        assert rec is not None and rec.stream_id == receipt.stream_id
    writer.close()


def test_worker_refuses_memory_url(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["worker", "--redis-url", "memory://", "--db", str(tmp_path / "x.db")]) == 2
    assert "real Redis" in capsys.readouterr().err


def test_stats_shows_the_workers_snapshot(
    redis_server: RedisServer, tmp_path: Path, keyfile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    redis_server.client().flushall()
    db = tmp_path / "s.db"
    with DualMemory(redis_url=redis_server.url, db_path=str(db), keyring=str(keyfile)) as mem:
        for i in range(50):
            mem.put(f"k{i}", i, level=Level.SWARM, principal=CODER)
    assert main(["stats", "--redis-url", redis_server.url, "--db", str(db), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    (source,) = data["metrics"].values()
    assert source["redis_write"]["count"] == 50
    assert source["persist"]["count"] == 50
    assert data["backlog"] == 0 and data["dead_letters"] == 0
    assert main(["stats", "--redis-url", redis_server.url, "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "redis_write" in out and "p95" in out


def test_stats_without_a_database(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stats", "--db", str(tmp_path / "none.db")]) == 2
    assert "no database" in capsys.readouterr().err


def test_demo_runs_and_survives_a_restart(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUALMEM_")}
    runs = [
        subprocess.run(
            [sys.executable, "-m", "dualmem", "demo"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        for _ in range(2)
    ]
    for r in runs:
        assert r.returncode == 0, r.stderr
        assert "p95" in r.stdout and "redis_write" in r.stdout
    assert "found 1 earlier run" in runs[1].stdout
    assert (tmp_path / "dualmem.db").exists() and (tmp_path / "dualmem.db.keys").exists()


def test_python_m_dualmem_help() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "dualmem", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0
    for cmd in ("worker", "stats", "keygen", "demo"):
        assert cmd in r.stdout


def test_wait_until_helper_fails_loudly() -> None:
    with pytest.raises(pytest.fail.Exception):
        wait_until(lambda: False, timeout=0.05, what="nothing")
