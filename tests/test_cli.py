"""The dualmem command: worker processes (including SIGKILL), keygen, stats, demo."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis.connection

from acl import ConfigurationError, Keyring, Level, Principal
from dualmem import DualMemory
from dualmem.cli import WORKER_OPTIONS, build_parser, main, worker_settings
from dualmem.coordination import BlockingCoordinator, LoopMemory, Signal
from dualmem.settings import Settings

from .conftest import RedisServer, refuse_inserts, run_cli, wait_until

CODER = Principal(agent_id="coder-1", team="backend", swarm="s1", project="shop")


def start_worker(url: str, db: Path, *extra: str) -> subprocess.Popen[str]:
    """A `dualmem worker` process, returned once it has printed its banner: its signal
    handlers are installed by then, so a SIGTERM drains instead of killing it mid-import."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "dualmem", "worker", "--redis-url", url, "--db", str(db), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("dualmem worker ") and "->" in line:
            proc.banner = line  # type: ignore[attr-defined]
            return proc
    raise AssertionError(f"worker exited before its banner (code {proc.wait(10)})")


def stop(proc: subprocess.Popen[str]) -> str:
    """SIGTERM, and the worker's output once it has drained and exited. One still running
    after 30 s is made to print its threads' stacks (SIGUSR1), killed, and reported."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)
        time.sleep(1)
        proc.kill()
        out, _ = proc.communicate(timeout=10)
        raise AssertionError(f"worker still running 30 s after SIGTERM:\n{out}") from None
    return out


def test_keygen_writes_a_private_key_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "k" / "keys.json"
    # A missing directory is refused, as export and backup do (it was created silently).
    assert main(["keygen", "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"dualmem keygen: directory {out.parent} does not exist\n"
    assert not out.parent.exists()
    out.parent.mkdir()
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
    assert all("draining" in o for o in outputs), outputs  # the worker logs at INFO
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


def _policies(pid: int) -> set[int]:
    """The scheduling policy of every thread of process ``pid``."""
    return {os.sched_getscheduler(int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux-only")
@pytest.mark.parametrize(
    ("extra", "policy"),
    [((), "SCHED_BATCH"), (("--worker-sched", "normal"), "SCHED_OTHER")],
)
def test_worker_process_runs_as_a_batch_task_unless_told_otherwise(
    redis_server: RedisServer, tmp_path: Path, keyfile: Path, extra: tuple[str, ...], policy: str
) -> None:
    redis_server.client().flushall()
    db = tmp_path / "s.db"
    writer = DualMemory(
        redis_url=redis_server.url, db_path=str(db), keyring=str(keyfile), worker=False
    )
    proc = start_worker(redis_server.url, db, *extra)
    try:
        # The banner names the policy in effect, not the one asked for alone.
        banner = proc.banner  # type: ignore[attr-defined]
        assert f"scheduling {'batch' if policy == 'SCHED_BATCH' else 'normal'})" in banner
        # A commit starts the SQLite checkpointer thread: it must inherit the policy.
        writer.sync(writer.put("k", {"v": 1}, level=Level.SWARM, principal=CODER), timeout=20)
        wait_until(lambda: len(os.listdir(f"/proc/{proc.pid}/task")) > 1, timeout=10)
        assert _policies(proc.pid) == {getattr(os, policy)}
    finally:
        stop(proc)
        writer.close()
    assert proc.returncode == 0


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux-only")
def test_scheduling_covers_the_threads_already_running_too() -> None:
    # Linux schedules threads: setting the calling thread alone left a thread an imported
    # library had started before at normal priority (new threads inherit it either way).
    # In a process of its own: the test process's scheduling stays as it is.
    script = """if True:
        import os, threading
        from dualmem.cli import set_worker_scheduling
        started, done = threading.Event(), threading.Event()
        def early():
            started.set()
            done.wait()
        thread = threading.Thread(target=early)
        thread.start()
        started.wait()
        print(set_worker_scheduling("batch"))
        print(sorted({os.sched_getscheduler(int(t)) for t in os.listdir("/proc/self/task")}))
        done.set()
        thread.join()
    """
    r = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert r.stdout.split("\n")[:2] == ["batch", str([os.SCHED_BATCH])], r.stdout + r.stderr


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="no SIGUSR1 here")
def test_a_worker_prints_its_stacks_on_sigusr1_and_keeps_working(
    redis_server: RedisServer, tmp_path: Path, keyfile: Path
) -> None:
    redis_server.client().flushall()
    db = tmp_path / "s.db"
    proc = start_worker(redis_server.url, db)
    writer = DualMemory(
        redis_url=redis_server.url, db_path=str(db), keyring=str(keyfile), worker=False
    )
    try:
        proc.send_signal(signal.SIGUSR1)
        assert proc.stdout is not None
        dump = []
        for line in proc.stdout:
            dump.append(line)
            if "most recent call first" in line and "Current thread" in "".join(dump):
                break
        assert proc.poll() is None  # still running, and still persisting
        writer.sync(writer.put("k", 1, level=Level.SWARM, principal=CODER), timeout=20)
    finally:
        stop(proc)
        writer.close()
    assert proc.returncode == 0


def test_worker_sched_setting_is_validated() -> None:
    assert Settings.load({"worker_sched": "normal"}).worker_sched == "normal"
    with pytest.raises(ConfigurationError, match="worker_sched"):
        Settings.load({"worker_sched": "idle"})


def test_every_worker_option_reaches_its_setting_over_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Dropping an option from the list the worker passes on (or --shards, --namespace from
    # the common ones) left `dualmem worker --batch-size 50` at the default in silence.
    given = {
        "redis_url": ("--redis-url", "redis://127.0.0.1:7777/3"),
        "db_path": ("--db", "given.db"),
        "namespace": ("--namespace", "given-ns"),
        "shards": ("--shards", "3"),
        "batch_size": ("--batch-size", "57"),
        "claim_idle_ms": ("--claim-idle-ms", "1234"),
        "max_deliveries": ("--max-deliveries", "7"),
        "consumer": ("--consumer", "given-consumer"),
        "block_ms": ("--block-ms", "42"),
        "worker_sched": ("--worker-sched", "normal"),
    }
    assert set(given) >= set(WORKER_OPTIONS)
    for name in given:  # every one also set in the environment: the option must win
        monkeypatch.setenv(f"DUALMEM_{name.upper()}", str(getattr(Settings(), name)))
    argv = ["worker"] + [part for option in given.values() for part in option]
    settings = worker_settings(build_parser().parse_args(argv))
    for name, (_, value) in given.items():
        assert str(getattr(settings, name)) == value, name


@pytest.mark.parametrize("option", ["--batch-size", "--max-deliveries", "--block-ms"])
def test_a_worker_option_given_as_zero_is_refused_not_dropped(option: str) -> None:
    # An option is passed on when it was given, not when it is truthy: `--batch-size 0`
    # dropped as "not given" ran the worker on the environment's or the default value
    # in silence, where the setting's own check refuses it.
    name = option[2:].replace("-", "_")
    with pytest.raises(ConfigurationError, match=f"setting {name} must be >= 1"):
        worker_settings(build_parser().parse_args(["worker", option, "0"]))


@pytest.mark.parametrize("wait", ["nan", "-1", "inf"])
def test_a_wait_that_is_no_duration_is_refused_before_anything_is_sent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], wait: str
) -> None:
    # `import`, `mirror` and `dlq replay` took any float for --wait: nan waited for a
    # commit that did not come for ever (no deadline compares true with nan), -1 gave up
    # at once and called every command pending; both after sending.
    line = {"scope": "swarm:s1", "key": "k", "level": 3, "owner": "a", "value": 1}
    line |= {"created_at": 1, "updated_at": 1, "expires_at": None}
    records = tmp_path / "in.jsonl"
    records.write_text(json.dumps(line) + "\n", encoding="utf-8")
    db = tmp_path / "w.db"
    common = ["--redis-url", f"memory://cli-wait-{secrets.token_hex(4)}", "--db", str(db)]
    for argv in (
        ["import", str(records), *common],
        ["mirror", *common, "--dir", str(tmp_path / "m"), "--once"],
        ["dlq", "replay", "--all", *common],
    ):
        if argv[0] == "dlq":
            with DualMemory(redis_url=common[1], db_path=str(db)):
                pass  # dlq needs a database to read
        code, _, err = run_cli(capsys, *argv, f"--wait={wait}")
        assert code == 2, (argv, err)
        assert f"--wait must be a number of seconds in [0, 1,000,000], got {float(wait)}" in err
    assert not db.exists() or not _keys_in(db)
    assert not (tmp_path / "m").exists()


def _keys_in(db: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return [k for (k,) in conn.execute("SELECT key FROM memory")]


def test_worker_refuses_memory_url(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["worker", "--redis-url", "memory://", "--db", str(tmp_path / "x.db")]) == 2
    assert "real Redis" in capsys.readouterr().err


def test_stats_shows_the_workers_snapshot(
    redis_server: RedisServer,
    tmp_path: Path,
    keyfile: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    redis_server.client().flushall()
    db = tmp_path / "s.db"
    wal = tmp_path / "s.db-wal"
    quiet = {"purge_interval": 3600, "metrics_interval": 3600}  # no write but the puts'
    with DualMemory(
        redis_url=redis_server.url, db_path=str(db), keyring=str(keyfile), **quiet
    ) as mem:
        for i in range(50):
            last = mem.put(f"k{i}", i, level=Level.SWARM, principal=CODER)
        mem.sync(last)
        # While the worker holds the database open (and idle), its WAL stays put: the
        # figures are the files' own, and the journal's last seq is the 50th command.
        assert main(["stats", "--redis-url", redis_server.url, "--db", str(db), "--json"]) == 0
        data = json.loads(capsys.readouterr().out)
        assert data["db_wal_bytes"] == wal.stat().st_size > 0
        assert data["db_bytes"] == db.stat().st_size + wal.stat().st_size
        # The free pages' bytes (no test looked: all the file's pages went as free).
        with sqlite3.connect(db) as conn:
            free, size = (
                conn.execute(f"PRAGMA {p}").fetchone()[0] for p in ("freelist_count", "page_size")
            )
        conn.close()
        assert data["db_free_bytes"] == free * size
        assert data["journal_seq"] == 50 and data["pending"] == 0
    assert main(["stats", "--redis-url", redis_server.url, "--db", str(db), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    (source,) = data["metrics"].values()
    assert source["redis_write"]["count"] == 50
    assert source["persist"]["count"] == 50
    assert data["backlog"] == 0 and data["dead_letters"] == 0
    monkeypatch.setenv("COLUMNS", "200")  # one table row a line
    assert main(["stats", "--redis-url", redis_server.url, "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "redis_write" in out and "p95" in out
    # Each figure under its own heading (p95 and p99 were swappable unseen).
    (row,) = [line for line in out.splitlines() if "redis_write" in line]
    shown = re.findall(r"\d+\.\d{3}", row)
    wrote = source["redis_write"]
    assert shown == [f"{wrote[k]:.3f}" for k in ("p50", "p95", "p99", "max")], row


@pytest.mark.real_redis
def test_stats_counts_every_shards_backlog_its_pending_and_the_dead_letters(
    redis_server: RedisServer, tmp_path: Path, keyfile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The figures an operator watches were tested at zero: a backlog summed over the
    # first shard alone, the pending count or the dead letters shown as 0 passed.
    client = redis_server.client()
    client.flushall()
    db = tmp_path / "b.db"
    mem = DualMemory(
        redis_url=redis_server.url,
        db_path=str(db),
        keyring=str(keyfile),
        shards=2,
        max_deliveries=1,
    )
    refuse_inserts(db, "NEW.key = 'bad'")
    bad = mem.put("bad", 0, level=Level.SWARM, principal=CODER)
    wait_until(lambda: mem.store.status(bad.shard, bad.stream_id) == "dead", what="dead letter")
    mem.close()
    with DualMemory(
        redis_url=redis_server.url,
        db_path=str(db),
        keyring=str(keyfile),
        shards=2,
        worker=False,
    ) as writer:
        for i in range(40):
            writer.put(f"k{i}", i, level=Level.SWARM, principal=CODER)
        lengths = [client.xlen(writer.layout.stream(s)) for s in range(2)]
        # A consumer that took three of the second shard's commands and died.
        client.xreadgroup("persist", "gone", {writer.layout.stream(1): ">"}, count=3)
    assert all(lengths)  # the puts went to both shards
    argv = ["stats", "--redis-url", redis_server.url, "--db", str(db), "--shards", "2"]
    assert main([*argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["backlog"], data["pending"], data["dead_letters"]) == (40, 3, 1), data


def test_stats_without_a_database(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stats", "--db", str(tmp_path / "none.db")]) == 2
    assert "no database" in capsys.readouterr().err


def test_stats_never_migrates_an_older_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "old.db"
    shutil.copy(Path(__file__).parent / "data" / "schema_v1.db", db)
    assert main(["stats", "--db", str(db)]) == 2
    assert "dualmem migrate" in capsys.readouterr().err
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1  # untouched
    conn.close()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["purge", "--tombstone-ttl", "-5"], "must be 0..1000000000000 seconds"),
        (["purge", "--tombstone-ttl", str(10**20)], "must be 0..1000000000000 seconds"),
        (["export", "--out", "{tmp}/x.jsonl", "--prefix", "\udcff"], "surrogates not allowed"),
        (["export", "--out", "/nonexistent-dir/x.jsonl"], "does not exist"),
    ],
)
def test_bad_command_input_is_a_message_and_exit_2_not_a_traceback(
    tmp_path: Path,
    keyfile: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    db = tmp_path / "m.db"
    with DualMemory(redis_url="memory://cli-bad-input", db_path=str(db), keyring=str(keyfile)):
        pass
    common = ["--db", str(db), "--redis-url", "memory://cli-bad-input", "--keyring", str(keyfile)]
    code = main([a.replace("{tmp}", str(tmp_path)) for a in argv] + common)
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    with pytest.raises(SystemExit) as exc:  # argparse: a usage error, exit 2
        main(["dlq", "replay", "abc", *common])
    assert exc.value.code == 2


def test_a_sqlite_error_is_a_message_and_exit_2_not_a_traceback(
    tmp_path: Path, keyfile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from .test_ops_verify import damage_table

    db = tmp_path / "m.db"
    url = "memory://cli-sqlite-error"
    with DualMemory(redis_url=url, db_path=str(db), keyring=str(keyfile)) as mem:
        mem.sync(mem.put("k", 1, level=Level.PROJECT, principal=CODER))
    damage_table(db, "memory")
    common = ["--db", str(db), "--redis-url", url, "--keyring", str(keyfile)]
    code = main(["export", "--out", str(tmp_path / "x.jsonl"), *common])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err == "dualmem export: DatabaseError: database disk image is malformed\n"


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
@pytest.mark.parametrize(
    "command", [["stats", "--json"], ["doctor", "--json"], ["stats"], ["demo"]]
)
def test_a_closed_stdout_ends_quietly(
    tmp_path: Path, keyfile: Path, command: list[str], buffered: bool
) -> None:
    # `dualmem stats --json | head -1`: the JSON commands printed "dualmem stats:
    # BrokenPipeError: [Errno 32] Broken pipe" and exited 2; those printing through rich
    # (the tables, the demo) already ended quietly with 1, and all do now. Buffered (a
    # shell's default) the output meets the closed pipe at the last flush, not at print:
    # unflushed there, it was "Exception ignored ... BrokenPipeError" and exit status 120.
    db = tmp_path / "m.db"
    with DualMemory(redis_url="memory://cli-closed-stdout", db_path=str(db), keyring=str(keyfile)):
        pass
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DUALMEM_", "PYTHONUNBUF"))}
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first write
    try:
        done = subprocess.run(
            [sys.executable, "-m", "dualmem", *command, "--db", str(db)],
            cwd=tmp_path,
            env=env,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=180,
            check=False,
        )
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (1, "")


def test_metrics_serve_refuses_a_port_out_of_range(capsys: pytest.CaptureFixture[str]) -> None:
    # --serve 99999 was "OverflowError: bind(): port must be 0-65535." from bind(), after
    # the exporter had started; now argparse's usage error (exit 2).
    for port in ("99999", "-1", "http"):
        with pytest.raises(SystemExit) as exc:
            main(["metrics", "--serve", port])
        assert exc.value.code == 2
        assert "argument --serve: the port must be" in capsys.readouterr().err


def run_demo(cwd: Path, *args: str, env_settings: dict[str, str] | None = None) -> str:
    """``dualmem demo`` in ``cwd`` with no DUALMEM_* settings but ``env_settings``; its
    output, whitespace-folded (rich wraps long lines)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUALMEM_")}
    env.update(env_settings or {})
    r = subprocess.run(
        [sys.executable, "-m", "dualmem", "demo", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return " ".join(r.stdout.split())


def check_demo_runs(first: str, second: str) -> None:
    """What one complete CFN loop must show, and what a second run must find."""
    for out in (first, second):
        for seen in (
            "Spawn three agents",
            "gate (every confidence >= 0.75): not passed",
            "gate (every confidence >= 0.75): passed",
            "coder-2 reads coder-1's entry → AccessDenied",
            "coder-2 reads its own → 0.81",  # its entry of the first iteration
            "Loop 2 consensus auth",
            "gate (>= 0.90): passed → Loop 4",
            "validator-1 lists decisions → AccessDenied",
            "acked coder-1, coder-2; missing coder-3 after 2 re-sends",
            "ACK for coder-3 rejected: MAC does not verify",
            "the second ACK was a no-op",
            "coder-3: no heartbeat for",
            "marked dead",
            "still active: coder-1, coder-2 8. The write path",  # not the dead coder-3
            # Two refused reads and the forged ACK are the high-risk rows, by event.
            "3 high risk (access_denied, signal_ack_rejected), the rest agent_dead, "
            "signal_ack, signal_retry, signal_sent, signal_timeout",
            "1,500 encrypted Loop 3 writes",
        ):
            assert seen in out, seen
        # The Subscriber feed printed changes live, and the latency table has every path.
        assert re.search(r"live #\d+ put Loop 2 consensus auth #\d+ swarm by validator-1", out)
        # Each change named by what it is: an agent's state was "agents state" with the
        # wrong part of its key, an ACK named the signal id, not the agent it is for, and
        # the first send of a signal read "re-sent" with the two words swapped.
        assert re.search(r"live #\d+ put coder-3 state swarm by coordinator", out)
        # Each agent's confidence reaches the (SWARM) registry, though its entry is private.
        assert re.search(r"live #\d+ put coder-2 event: confidence swarm by coordinator", out)
        sent = re.findall(r"put signal \.\.(\w{6}) (sent|re-sent) swarm by coordinator", out)
        assert [how for _, how in sent] == ["sent", "re-sent", "re-sent"], sent
        signal_id = sent[0][0]
        # Each step waits until the feed printed its changes: the six of the spawns come
        # before the next step, the dead agent's state before the line that reports it.
        spawns = out[out.index("1. Spawn three agents") : out.index("2. Loop 3")]
        assert len(re.findall(r"live #\d+ put coder-\d (state|event: spawn) ", spawns)) == 6
        dead = out[out.index("7. Heartbeats") : out.index("coder-3: no heartbeat")]
        assert re.search(r"live #\d+ put coder-3 state ", dead), dead
        assert f"put ACK ..{signal_id} for coder-1 swarm by coder-1" in out
        assert f"put ACK ..{signal_id} for coder-3 swarm by rogue-agent" in out
        for path in ("redis_write", "encode", "persist", "lag", "read", "feed"):
            cell = r" [│|] (\S+)"  # rich draws ASCII bars when the output is not UTF-8
            row = re.search(rf"[│|] {path} [│|][^│|]*[│|] ([\d,]+){cell * 4} [│|]", out)
            assert row is not None, path
            count, *quantiles = row.groups()
            p50, p95, p99, top = map(float, quantiles)
            assert int(count.replace(",", "")) > 0 and p50 <= p95 <= p99 <= top, row.group(0)
            if path == "feed":
                # Measured in whole milliseconds ("1 ms steps"), so its max is one: a lag
                # recorded in the wrong unit read 0.009 ms for 9 ms.
                assert quantiles[3].endswith(".000"), row.group(0)
                # One sample per change the observer was shown live.
                shown = re.search(r"the observer was shown (\d+) ", out)
                assert shown is not None
                assert count == shown.group(1) == str(out.count(" live #")), row.group(0)
        assert "p50" in out and "p95" in out and "p99" in out
        # This run's journal: no more changes than this run wrote (not the whole journal).
        writes = re.search(r"[│|] redis_write [│|][^│|]*[│|] ([\d,]+) ", out)
        journal = re.search(r"journal: ([\d,]+) changes this run", out)
        assert writes is not None and journal is not None
        assert 0 < int(journal.group(1).replace(",", "")) <= int(writes.group(1).replace(",", ""))
        assert "closed (drained)." in out
    assert "First run" in first and "Found the state" not in first
    assert "Run dualmem demo again: run 2 finds this state" in first
    # The consensus is stored for the iteration that passed the confidence gate.
    assert "put Loop 2 consensus auth #2 " in first and "0.93 (iteration 2)" in first
    # Said only when the observer had nothing to catch up on: the first run.
    assert "(nothing to catch up on)" in first and "nothing to catch up" not in second
    # The audit summary counts this run's rows, the same in both (the second counted the
    # first run's too when it started after the oldest row, not the newest).
    audits = [
        re.findall(r"audit log: (\d+) rows this run; (\d+) high risk", out)
        for out in (first, second)
    ]
    assert audits[0] == audits[1] and len(audits[0]) == 1, audits
    # The second run reads the first run's state back from SQLite ...
    assert "Found the state of 1 earlier run" in second
    assert "decision auth #2: PROCEED by product-owner" in second
    assert "agents: coder-1 terminated, coder-2 terminated, coder-3 dead" in second
    # ... and its Subscriber resumes exactly where the first one saved its position,
    # catching up on the terminations written after it stopped.
    saved = re.search(r"saved its position at seq (\d+)", first)
    assert saved is not None
    assert f"'demo-observer', after seq {saved.group(1)}" in second
    assert f"Subscriber saved its position at journal seq {saved.group(1)}" in second
    assert re.search(r"caught up #\d+ put coder-1 event: terminate", second)
    # All four changes written after the first run's observer stopped are caught up, the
    # last one too (it was shown as "live" when the catch-up ended one change early).
    caught_up = second[: second.index("1. Spawn three agents")]
    assert re.search(r"caught up #\d+ put coder-2 state", caught_up), caught_up
    assert " live " not in caught_up, caught_up
    assert "decision auth #4" in second  # the loop went on with the next iterations


def test_demo_runs_and_survives_a_restart(tmp_path: Path) -> None:
    first = run_demo(tmp_path)
    check_demo_runs(first, run_demo(tmp_path))
    for name in ("dualmem.db", "dualmem.db.keys", "dualmem.db.signal-secret"):
        assert (tmp_path / name).exists(), name
    # A third run counts both earlier runs, lists both decisions and goes on from there.
    third = run_demo(tmp_path)
    assert "Found the state of 2 earlier runs" in third
    assert "decision auth #2: PROCEED" in third and "decision auth #4: PROCEED" in third
    assert "Loop 3, iteration 5:" in third and "put decision auth #6 " in third
    # The participants' signal secret is kept private and reused: the signals of all
    # three runs verify with the one in the file (the file was readable by anyone, and the
    # later runs signed with a fresh secret nobody kept).
    secret = tmp_path / "dualmem.db.signal-secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    coordinator = Principal(agent_id="coordinator", swarm="phase-1-auth", project="shop")
    db = str(tmp_path / "dualmem.db")
    with DualMemory(redis_url="memory://cli-demo-signals", db_path=db) as mem:
        records = mem.query(principal=coordinator, prefix="coord/signals/")
        signals = [Signal.from_value(r.value) for r in records]
        checker = BlockingCoordinator(mem, coordinator, secret.read_bytes())
        assert len(signals) == 3 and [checker.signal_problem(s) for s in signals] == [None] * 3
        # What the first run said of coder-1's sealed entry is that entry in SQLite.
        key = LoopMemory(mem, swarm="phase-1-auth", project="shop").key(3, "auth", 1)
        row = mem.store.get("agent:coder-1", key, int(time.time() * 1000))
        assert row is not None
        said = f"coder-1's entry is {len(row.envelope)} bytes of AES-256-GCM ciphertext"
        assert said in first, first


def test_the_demos_observer_catches_up_on_what_the_database_held_before_it(
    tmp_path: Path,
) -> None:
    # The observer follows everything it may read, from the beginning: a database with
    # eleven earlier SWARM changes shows the first eight and counts the other three (the
    # count was dropped, or printed again at every later step, with nothing new hidden).
    planner = Principal(agent_id="planner", swarm="phase-1-auth", project="shop")
    db = tmp_path / "dualmem.db"
    with DualMemory(redis_url="memory://cli-demo-catch-up", db_path=str(db)) as mem:
        for i in range(11):
            receipt = mem.put(f"plan/step-{i}", {"step": i}, level=Level.SWARM, principal=planner)
        mem.sync(receipt, 10)
    out = run_demo(tmp_path)
    assert "First run" in out and "from the beginning" in out
    before = out[: out.index("1. Spawn three agents")]
    assert re.findall(r"caught up #\d+ put (\S+)", before) == [f"plan/step-{i}" for i in range(8)]
    assert out.count("more caught up") == 1 and "... and 3 more caught up" in before, before
    assert "nothing to catch up on" not in out


def test_demo_seals_with_the_key_file_it_is_given(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # `dualmem demo --keyring FILE` must seal with FILE, not make <db>.keys beside it:
    # the records would open only with a key the user never chose.
    for name in [n for n in os.environ if n.startswith("DUALMEM_")]:
        monkeypatch.delenv(name)
    keys, db = tmp_path / "chosen.json", tmp_path / "d.db"
    assert main(["keygen", "--out", str(keys)]) == 0
    assert main(["demo", "--db", str(db), "--keyring", str(keys)]) == 0, capsys.readouterr()
    assert not (tmp_path / "d.db.keys").exists()
    with pytest.raises(ConfigurationError, match="key file"):
        DualMemory(redis_url="memory://cli-demo-keyring", db_path=str(db))
    with DualMemory(redis_url="memory://cli-demo-keyring", db_path=str(db), keyring=str(keys)):
        pass


def test_a_command_interrupted_with_ctrl_c_exits_130(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The shell's convention for SIGINT (128 + 2), with no traceback: a script can tell
    # an interrupted command from one that failed.
    def interrupted() -> Keyring:
        raise KeyboardInterrupt

    monkeypatch.setattr(Keyring, "generate", interrupted)  # keygen's first step
    assert main(["keygen", "--out", str(tmp_path / "k.json")]) == 130
    assert capsys.readouterr().err == "" and not (tmp_path / "k.json").exists()


def test_demo_against_a_real_redis(redis_server: RedisServer, tmp_path: Path) -> None:
    redis_server.client().flushall()
    first = run_demo(tmp_path, "--redis-url", redis_server.url)
    assert "(real Redis)" in first and "key file dualmem.db.keys (created" in first
    check_demo_runs(first, run_demo(tmp_path, "--redis-url", redis_server.url))
    # Its own namespace: nothing of the demo under the default one.
    keys = redis_server.client().keys("*")
    assert keys and all(k.startswith(b"dm:{dualmem-demo:") for k in keys)


def test_demo_against_a_real_redis_seals_with_the_key_in_the_environment(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    # DUALMEM_KEY is the user's key: the demo made a key file of its own beside the
    # database (and sealed with it) when only a key file, not a key, counted as given.
    redis_server.client().flushall()
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    out = run_demo(tmp_path, "--redis-url", redis_server.url, env_settings={"DUALMEM_KEY": key})
    assert "(real Redis)" in out and "key file" not in out
    assert "1,500 encrypted Loop 3 writes" in out
    assert not (tmp_path / "dualmem.db.keys").exists()
    owner = Principal(agent_id="product-owner", swarm="phase-1-auth", project="shop", system=True)
    db = str(tmp_path / "dualmem.db")
    with DualMemory(redis_url=redis_server.url, db_path=db, key=key, namespace="dualmem-demo") as m:
        loops = LoopMemory(m, swarm="phase-1-auth", project="shop")
        assert [d.decision.value for d in loops.list_loop4_decisions(owner, "auth")] == ["PROCEED"]


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
    assert "COMMAND_MODULES" not in r.stdout  # the module's docstring, meant for developers
    assert "Exit codes" in r.stdout


def test_wait_until_helper_fails_loudly() -> None:
    with pytest.raises(pytest.fail.Exception):
        wait_until(lambda: False, timeout=0.05, what="nothing")


@pytest.mark.real_redis
def test_a_worker_stopped_with_a_backlog_drains_it_before_it_exits(
    redis_server: RedisServer, tmp_path: Path, keyfile: Path
) -> None:
    # SIGTERM ends the loop, then the worker drains (up to close_timeout): a worker that
    # gave up at once left the backlog to the next one and said "N left pending". The
    # database is held locked while the backlog is written and the SIGTERM lands, so
    # the loop cannot have taken it all before the stop.
    redis_server.client().flushall()
    db = tmp_path / "d.db"
    proc = start_worker(redis_server.url, db, "--batch-size", "100")
    holder = sqlite3.connect(db, isolation_level=None, timeout=30)
    try:
        holder.execute("BEGIN IMMEDIATE")
        # Another process's writes: its own store file, the same streams.
        with DualMemory(
            redis_url=redis_server.url,
            db_path=str(tmp_path / "writer.db"),
            keyring=str(keyfile),
            worker=False,
        ) as writer:
            for i in range(1000):
                writer.put(f"k{i}", i, level=Level.SWARM, principal=CODER)
            writer.close(timeout=0)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # the signal lands; the loop is held at its first commit
    finally:
        holder.close()
    out = stop(proc)
    assert proc.returncode == 0, out
    assert "0 left pending" in out, out
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT COUNT(*) FROM memory").fetchone()[0] == 1000


@pytest.mark.real_redis
def test_a_worker_whose_drain_failed_does_not_claim_a_count(
    own_redis_server: RedisServer, tmp_path: Path
) -> None:
    # With Redis gone at the stop, the drain cannot tell what is pending: the summary
    # said "-1 left pending", a number where none is known.
    proc = start_worker(own_redis_server.url, tmp_path / "g.db", "--block-ms", "100")
    own_redis_server.kill()
    out = stop(proc)
    assert proc.returncode == 0, out
    assert "an unknown number of commands (the drain failed) left pending" in out, out
    assert "-1 left" not in out


@pytest.mark.real_redis
def test_a_worker_stopped_while_the_database_is_locked_exits_cleanly(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    # Saving the latency figures at exit met a lock another process held: the worker
    # exited 2 with "database is locked", no summary line, store and client left open.
    db = tmp_path / "m.db"
    proc = start_worker(redis_server.url, db)
    wait_until(db.exists, what="the worker's database")
    holder = sqlite3.connect(db, isolation_level=None, timeout=30)
    try:
        holder.execute("BEGIN IMMEDIATE")
        out = stop(proc)
    finally:
        holder.close()
    assert proc.returncode == 0, out
    assert "could not save the latency figures at exit" in out
    assert "0 left pending" in out


def test_a_redis_password_is_never_printed(
    redis_server: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `dualmem worker` printed its redis_url in its banner and `dualmem doctor` in its
    # table, password and all.
    admin = redis_server.client()
    admin.execute_command("ACL", "SETUSER", "probe", "on", ">S3cretPw", "~*", "&*", "+@all")
    try:
        url = f"redis://probe:S3cretPw@127.0.0.1:{redis_server.port}/0"
        db = tmp_path / "m.db"
        proc = subprocess.Popen(
            [sys.executable, "-m", "dualmem", "worker", "--redis-url", url, "--db", str(db)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert proc.stdout is not None
        banner = proc.stdout.readline()
        out = banner + stop(proc)
        assert "S3cretPw" not in out and f"probe:***@127.0.0.1:{redis_server.port}" in banner
        main(["doctor", "--redis-url", url, "--db", str(db)])
        printed = capsys.readouterr()
        assert "S3cretPw" not in printed.out + printed.err
        assert "probe:***@" in printed.out
        demo = tmp_path / "demo.db"
        admin.flushdb()  # another test's demo left its namespace, sealed with its own key
        code = main(["demo", "--redis-url", url, "--db", str(demo)])
        assert code == 0, capsys.readouterr()
        printed = capsys.readouterr()
        assert "S3cretPw" not in printed.out + printed.err
        assert "probe:***@" in printed.out
    finally:
        admin.execute_command("ACL", "DELUSER", "probe")


def test_secrets_stay_out_of_reprs() -> None:
    from dualmem.coordination.signals import _derive

    ring = Keyring.generate()
    secret = ring._keys[ring.active_id].secret
    key = base64.b64encode(secret).decode()
    assert key not in repr(Settings(key=key))
    # A password in the URL, before the host or as a query parameter (redis-py reads both;
    # the second is how a unix:// URL carries one), is masked in output and in the repr.
    for url in (
        "redis://app:S3cretPw@db:6379/0",
        "redis://db:6379/0?password=S3cretPw",
        "unix:///run/redis.sock?db=0&password=S3cretPw",
        "redis://app:S3c@retPw@db:6379/0",  # an unescaped "@": urllib splits at the last
        "rediss://:S3cr/etPw@db:6380/0",
        "redis://db:6379/0?password=S3c@retPw",  # an "@" after the path is the query's
        "redis://db:6379/0?PASSWORD=S3cretPw",  # not read by redis-py, but a secret all the same
    ):
        shown = Settings(redis_url=url)
        text = shown.shown_url + repr(shown)
        assert not any(part in text for part in ("S3c", "retPw", "etPw")) and "***" in text
    # ... and in the error for a bad URL, whose repr must not raise either.
    for url in (
        "redis://app:S3cretPw@db:abc/0",
        "redis://app:S3cretPw@[::1/0",
        "redis://db:6379/0?password=S3cretPw&db=x",
        "http://app:S3cretPw@db/0",
    ):
        with pytest.raises(ConfigurationError) as err:
            Settings.load({"redis_url": url})
        assert "S3cretPw" not in str(err.value) + repr(Settings(redis_url=url))
    assert repr(secret) not in repr(ring._keys) and str(list(secret)) not in repr(ring._keys)
    # A key or URL of the wrong type was quoted back in full; a key given as the bytes
    # base64.b64encode() returns is taken as its text.
    for name, value in (("key", [key]), ("redis_url", b"redis://:S3cretPw@db/0")):
        with pytest.raises(ConfigurationError) as err:
            Settings.load({name: value})
        assert key not in str(err.value) and "S3cretPw" not in str(err.value)
    assert Settings.load({"key": key.encode()}).key == key
    signer = _derive(b"x" * 32)
    assert repr(signer.key) not in repr(signer)


def test_a_password_that_breaks_the_url_stays_out_of_its_error() -> None:
    # An unescaped "#" or "?" in a password ends the host for urllib and redis-py refuses
    # the URL: the error quoted it whole (the mask wanted its "@" before any "?" or "#").
    # With a "/" the URL was masked, but redis-py's message quoted the password's first
    # part as the port.
    for url in (
        "redis://app:S3c#retPw@db/0",
        "redis://:S3c?retPw@db:6379/0",
        "rediss://:S3c/retPw@db:6380/0",
        "redis://app:S3c#retPw@db/0?password=S3c@retPw",
        "redis://app:S3c?password=S3c#retPw@db/0",  # one mask inside the other
    ):
        with pytest.raises(ConfigurationError, match="redis_url") as err:
            Settings.load({"redis_url": url}, environ={})
        text = str(err.value) + repr(Settings(redis_url=url))
        assert "S3c" not in text and "retPw" not in text and "***" in text, text
    # A quote that is no part of the password stays in the message.
    with pytest.raises(ConfigurationError, match="as 'notaport'"):
        Settings.load({"redis_url": "redis://app:S3cretPw@db:notaport/0"}, environ={})


def test_a_redis_url_whose_path_is_no_database_number_is_refused() -> None:
    # redis-py reads the path as the database number and ignores one that is not a
    # number: "redis://db/1O" (a letter O) used database 0, and a password holding an
    # unescaped "/" whose first part is digits ("12345/x") made the host "app", the port
    # 12345 and the rest a path it ignored. Both loaded, to write to the wrong place.
    for url in ("redis://db:6379/1O", "redis://app:12345/x@db/0", "rediss://db/0/1"):
        with pytest.raises(ConfigurationError, match="database number") as err:
            Settings.load({"redis_url": url}, environ={})
        assert "12345" not in str(err.value) and "x@" not in str(err.value), err.value
    for url, db in {
        "redis://db:6379/3": 3,
        "redis://db:6379/": None,
        "redis://db:6379": None,
        "redis://db/0/": 0,
        "redis://db/%33": 3,
        "redis://app:12345%2Fx@db/0": 0,  # the "/" escaped: the password it is
        "unix:///run/redis.sock?db=2": 2,
    }.items():
        loaded = Settings.load({"redis_url": url}, environ={})
        assert redis.connection.parse_url(loaded.redis_url).get("db") == db, url


def test_a_masked_url_keeps_all_but_its_passwords() -> None:
    # What is printed still says where Redis is: only the password goes, before the host
    # (a "/" in it too) and in every password= query (a later one is one all the same).
    shown = {
        "redis://app:S3c/retPw@db:6379/0?db=1&x=a@b": "redis://app:***@db:6379/0?db=1&x=a@b",
        "redis://db/0?password=S3c&db=1&password=retPw": "redis://db/0?password=***&db=1&password=***",
        "rediss://:S3cretPw@db/2#frag": "rediss://:***@db/2#frag",
    }
    for url, masked in shown.items():
        assert Settings(redis_url=url).shown_url == masked


def test_a_demo_interrupted_after_its_spawn_does_not_stop_the_next_run(tmp_path: Path) -> None:
    # Every later run exited 2 with "agent 'coder-1' is already active" until the
    # database was deleted.
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUALMEM_")}
    env["PYTHONUNBUFFERED"] = "1"
    # Ctrl-C as a terminal sends it: a suite run in the background of a shell (`pytest
    # &`) has SIGINT ignored, a child inherits that, and Python leaves an ignored SIGINT
    # ignored: the demo ran to its end and this test failed (it read as load-sensitive).
    # A handler, unlike "ignore", is not inherited across exec: the child gets SIGINT's
    # default action, and Python its KeyboardInterrupt.
    ignored = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dualmem", "demo"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    finally:
        signal.signal(signal.SIGINT, ignored)
    assert proc.stdout is not None
    seen = ""
    for line in proc.stdout:
        seen += line
        if "registers coder-1..3" in line:
            break
    proc.send_signal(signal.SIGINT)
    seen += proc.stdout.read()
    proc.wait(60)
    # Interrupted (130), wherever the signal found it after the spawns: on a busy machine
    # the demo may have gone on for a while before it landed (a check that it had not
    # reached Loop 2 failed once under load; the terminations come last either way).
    assert "registers coder-1..3" in seen and proc.returncode == 130, seen
    out = run_demo(tmp_path)
    assert "an interrupted earlier run left coder-1 (" in out, out
    # The agents it left are earlier state, shown as such (not "First run").
    assert "First run" not in out and "- agents: coder-1 " in out, out
    # Named as what it is: "Found the state of 0 earlier runs" read as nothing found.
    assert "Found the state an interrupted earlier run left" in out and "0 earlier" not in out
    assert "gate (every confidence >= 0.75): passed" in out
