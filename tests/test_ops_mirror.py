"""``dualmem mirror``: files follow the change feed and resume from their position; files
edited by hand are imported, SQLite wins conflicts, every conflict is in sync_events;
``verify --mirror`` reports parity. On fakeredis and a real redis-server."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from acl import Keyring, Level, Principal, envelope_key_id
from dualmem import DualMemory, Receipt
from dualmem.commands import put_fields
from dualmem.errors import Backpressure, StoreUnavailable
from dualmem.ops import dlq
from dualmem.ops.mirror import (
    SENDING_FILE,
    STATE_FILE,
    CycleReport,
    Mirror,
    _follow,
    check_mirror,
    record_path,
)
from dualmem.ops.runtime import Runtime
from dualmem.redis_backend import connect, text
from dualmem.rotation import add_active_key, drop_keys, rotate_keys
from dualmem.settings import Settings
from dualmem.sqlite_store import SQLiteStore
from dualmem.store import StreamEntry
from dualmem.worker import Worker

from .conftest import (
    REFUSED,
    RedisServer,
    allow_inserts,
    record_file_calls,
    record_runtime_waits,
    redis_fields,
    refuse_inserts,
    run_cli,
    wait_until,
)

CODER = Principal(agent_id="coder-1", team="backend", swarm="s1", project="shop")
SECRET = "mirror-secret-6c1b-never-in-files"


@pytest.fixture
def args(redis_url: str, db_path: Path, keyfile: Path) -> list[str]:
    return ["--redis-url", redis_url, "--db", str(db_path), "--keyring", str(keyfile)]


@pytest.fixture
def mdir(tmp_path: Path) -> Path:
    return tmp_path / "mirror"


def put(mem: DualMemory, key: str, value: object, level: Level = Level.SWARM) -> None:
    mem.sync(mem.put(key, value, level=level, principal=CODER), timeout=10)


def once(capsys: pytest.CaptureFixture[str], args: list[str], mdir: Path) -> str:
    code, out, err = run_cli(capsys, "mirror", *args, "--dir", str(mdir), "--once")
    assert code == 0, out + err
    return out


def file_of(mdir: Path, key: str, scope: str = "swarm:s1") -> Path:
    return record_path(mdir, scope, key)


def write_value(path: Path, value: object) -> None:
    """Edit a mirrored file by hand: a plaintext value instead of what is there (for a
    sealed record, its envelope)."""
    edited = doc(path)
    edited.pop("envelope", None)
    edited["value"] = value
    path.write_text(json.dumps(edited), encoding="utf-8")


def settings_for(redis_url: str, db_path: Path, keyfile: Path) -> Settings:
    return Settings.load({"redis_url": redis_url, "db_path": str(db_path), "keyring": str(keyfile)})


@pytest.fixture
def settings(redis_url: str, db_path: Path, keyfile: Path) -> Settings:
    return settings_for(redis_url, db_path, keyfile)


@contextlib.contextmanager
def started_mirror(settings: Settings, mdir: Path) -> Iterator[tuple[Runtime, Mirror]]:
    """A Runtime with no worker of its own and a Mirror on ``mdir``, after its first
    cycle."""
    with Runtime(settings, worker=False) as rt:
        mirror = Mirror(rt, mdir)
        cycle(mirror)
        yield rt, mirror


def now_ms() -> int:
    return int(time.time() * 1000)


def cycle(mirror: Mirror) -> Any:
    """One mirror cycle now; its report."""
    return mirror.cycle(now_ms())


def save_new(mirror: Mirror, path: Path, value: object) -> Any:
    """Save the file of the record swarm:s1/new by hand, then run one mirror cycle."""
    path.write_text(
        json.dumps({"scope": "swarm:s1", "key": "new", "level": 3, "value": value}),
        encoding="utf-8",
    )
    return cycle(mirror)


def commit_through(rt: Runtime, receipt: Receipt) -> None:
    """Commit the stream's commands up to ``receipt``'s, one at a time, with a worker of
    the test's own: the commands sent after it stay in flight."""
    settings = dataclasses.replace(rt.settings, batch_size=1)
    client, _ = connect(settings)
    try:
        worker = Worker(client, rt.store, settings)
        worker.ensure_groups()
        while rt.store.status(receipt.shard, receipt.stream_id) != "committed":
            assert worker.step(), "the stream ended before the receipt's command"
    finally:
        client.close()


def doc(path: Path) -> dict[str, object]:
    return json.loads(path.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def sync_events(db: Path) -> list[tuple[str, str, dict[str, object]]]:
    with sqlite3.connect(db) as conn:
        return [
            (kind, key, json.loads(detail))
            for kind, key, detail in conn.execute(
                "SELECT kind, key, detail FROM sync_events ORDER BY id"
            )
        ]


def event_kinds(db: Path, key: str) -> list[str]:
    """The kinds of ``key``'s sync events, oldest first."""
    return [kind for kind, k, _ in sync_events(db) if k == key]


def verify_mirror(capsys: pytest.CaptureFixture[str], args: list[str], mdir: Path) -> dict:
    code, out, _ = run_cli(capsys, "verify", *args, "--mirror", str(mdir), "--json")
    checks = {c["name"]: c for c in json.loads(out)["checks"]}
    return {"code": code, **checks[f"mirror {mdir}"]}


def test_files_follow_the_change_feed_and_resume(
    mem: DualMemory, args: list[str], mdir: Path, db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    put(mem, "a", {"n": 1})
    put(mem, "b/c:d", "slashes and colons")
    put(mem, "spec", {"text": "é ✓"}, Level.PROJECT)
    out = once(capsys, args, mdir)
    assert "3 written" in out
    assert doc(file_of(mdir, "a"))["value"] == {"n": 1}
    assert file_of(mdir, "b/c:d").name == "b%2Fc%3Ad.json"
    assert doc(file_of(mdir, "spec", "project:shop"))["value"] == {"text": "é ✓"}
    assert verify_mirror(capsys, args, mdir)["status"] == "ok"
    # Later changes: an update, a delete, a new record. The next run starts where the
    # last one stopped (its saved journal position) and applies only those.
    put(mem, "a", {"n": 2})
    mem.sync(mem.delete("b/c:d", level=Level.SWARM, principal=CODER))
    put(mem, "new", [1, 2])
    behind = verify_mirror(capsys, args, mdir)  # behind until it runs
    assert behind["status"] == "fail"
    assert behind["fix"] == f"run `dualmem mirror --dir {mdir} --once`"
    # Two of the three records (a, new) and one file with no record: "spec" is in sync.
    assert behind["summary"] == "2 of 3 records out of sync (1 behind, 0 edited), 1 stray file"
    assert sorted(behind["problems"]) == [
        "swarm:s1/a.json: behind SQLite (the mirror has not applied the newest change)",
        "swarm:s1/b%2Fc%3Ad.json: no live record in SQLite",
        "swarm:s1/new.json: missing",
    ]
    out = once(capsys, args, mdir)
    assert "2 written, 1 removed" in out
    assert doc(file_of(mdir, "a"))["value"] == {"n": 2}
    assert not file_of(mdir, "b/c:d").exists()
    state = json.loads((mdir / STATE_FILE).read_text())
    assert state["seq"] == mem.store.last_seq()
    assert verify_mirror(capsys, args, mdir)["status"] == "ok"
    assert once(capsys, args, mdir).startswith("mirror")  # nothing new: nothing written
    assert sync_events(db_path) == []


def test_verify_summarises_a_send_a_cycle_did_not_finish_as_such(
    mem: DualMemory, args: list[str], mdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A sending file left by a mirror killed mid-send, every file in sync: the summary
    # said "0 of 1 records out of sync (0 behind, 0 edited)", nothing of what was wrong.
    put(mem, "a", {"n": 1})
    once(capsys, args, mdir)
    (mdir / SENDING_FILE).write_text("{}", encoding="utf-8")
    left = verify_mirror(capsys, args, mdir)
    assert (left["code"], left["status"]) == (1, "fail")
    assert left["summary"] == "1 files match, a cycle ended during its send"
    (stray := mdir / "swarm:s1" / "gone.json").write_text("{}", encoding="utf-8")
    left = verify_mirror(capsys, args, mdir)
    assert left["summary"] == "1 files match, 1 stray file, a cycle ended during its send"
    stray.unlink()


def test_the_sending_file_is_on_disk_before_the_send_and_the_state_after_it(
    mem: DualMemory, settings: Settings, mdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The sending file is how a cycle that ends during its send (a kill, a power loss)
    # is settled by the next one without sending its imports twice, and the state file
    # names what was sent. Each was fsynced, its directory entry was not: a power loss
    # after the send could take the renamed file away and leave the old one.
    put(mem, "plan", {"steps": 1})
    with started_mirror(settings, mdir) as (rt, mirror):
        write_value(file_of(mdir, "plan"), {"steps": 2})
        events = record_file_calls(monkeypatch)
        send = rt.send

        def watched_send(*args: Any, **kwargs: Any) -> Any:
            events.append(("send", ""))
            return send(*args, **kwargs)

        monkeypatch.setattr(rt, "send", watched_send)
        assert cycle(mirror).imported == 1
    # Each call by what it did and the path it left in place (a replace's source is a
    # random temporary name).
    calls = [(e[0], e[-1]) for e in events]
    at = calls.index(("send", ""))
    sending, state, directory = str(mdir / SENDING_FILE), str(mdir / STATE_FILE), str(mdir)
    assert calls[at - 2 : at] == [("replace", sending), ("fsync", directory)]
    after = calls[at + 1 :]
    saved = after.index(("replace", state))
    assert after[saved + 1] == ("fsync", directory)


def test_a_file_edited_by_hand_is_imported(
    mem: DualMemory, args: list[str], mdir: Path, db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    put(mem, "plan", {"steps": 1})
    once(capsys, args, mdir)
    f = file_of(mdir, "plan")
    d = doc(f)
    d["value"] = {"steps": 2, "edited": "by hand"}
    f.write_text(json.dumps(d), encoding="utf-8")  # compact: formatting differs too
    edited = verify_mirror(capsys, args, mdir)
    assert "differs from SQLite (edited by hand" in " ".join(edited["problems"])
    assert edited["summary"] == "1 of 1 records out of sync (0 behind, 1 edited)"
    out = once(capsys, args, mdir)
    assert "imported" in out
    assert mem.get("plan", level=Level.SWARM, principal=CODER) == {"steps": 2, "edited": "by hand"}
    assert doc(f)["owner"] == "mirror"  # written back from SQLite after the commit
    assert [(k, key) for k, key, _ in sync_events(db_path)] == [("imported", "plan")]
    assert {a.event: a.risk for a in mem.store.audit_log()}["mirror.imported"] == "low"
    assert verify_mirror(capsys, args, mdir)["status"] == "ok"


def test_mirror_once_waits_its_wait_for_the_edits_it_imported(
    mem: DualMemory,
    args: list[str],
    mdir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # --once waits up to --wait for the edits it imported to commit before its last
    # cycle writes them back. No test failed when it did not wait at all: with a worker
    # slower than the next cycle, the directory was left behind SQLite at exit.
    put(mem, "plan", {"steps": 1})
    once(capsys, args, mdir)
    f = file_of(mdir, "plan")
    write_value(f, {"steps": 2})
    waits = record_runtime_waits(monkeypatch)
    code, out, err = run_cli(capsys, "mirror", *args, "--dir", str(mdir), "--once", "--wait", "7")
    assert code == 0 and "1 imported" in out, out + err
    assert waits == [7.0]
    assert doc(f)["owner"] == "mirror"  # written back from SQLite after the commit


def test_a_key_with_a_leading_dot_is_not_a_hidden_file(
    mem: DualMemory, args: list[str], mdir: Path, db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # It was `.env.json`: a hidden name the mirror's own scan skips, so every cycle
    # "restored" it (an audit event each time), its edits were never imported, and
    # verify --mirror called it missing.
    put(mem, ".env", {"v": 1})
    put(mem, "..", "dots")
    once(capsys, args, mdir)
    f = file_of(mdir, ".env")
    assert f.name == "%2Eenv.json" and doc(f)["key"] == ".env"
    assert file_of(mdir, "..").name == "%2E..json"
    assert not any(p.name.startswith(".") for p in f.parent.iterdir())
    assert "0 written, 0 removed, 0 imported, 0 conflicts, 0 rejected, 0 restored" in once(
        capsys, args, mdir
    )
    assert verify_mirror(capsys, args, mdir)["status"] == "ok"
    write_value(f, {"v": 2})
    assert "1 imported" in once(capsys, args, mdir)
    assert mem.get(".env", level=Level.SWARM, principal=CODER) == {"v": 2}
    assert [(k, key) for k, key, _ in sync_events(db_path)] == [("imported", ".env")]
    assert verify_mirror(capsys, args, mdir)["status"] == "ok"


def test_a_key_too_long_for_a_file_name_is_mirrored_under_its_hash(
    mem: DualMemory, args: list[str], mdir: Path, db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # No test named a key this long: a mirror that used its percent-encoded name (over
    # 300 bytes, more than a file name may have) ended every cycle in "File name too long".
    key = "k" * 150 + "/é" * 30
    put(mem, key, {"v": 1})
    once(capsys, args, mdir)
    f = file_of(mdir, key)
    assert f.name.startswith("~") and len(f.name.encode()) <= 200
    assert doc(f)["key"] == key  # the file holds the real key
    assert verify_mirror(capsys, args, mdir)["status"] == "ok"
    write_value(f, {"v": 2})
    assert "1 imported" in once(capsys, args, mdir)
    assert mem.get(key, level=Level.SWARM, principal=CODER) == {"v": 2}
    assert [(k, kk) for k, kk, _ in sync_events(db_path)] == [("imported", key)]


def test_a_mirror_written_with_hidden_names_moves_them_once(
    mem: DualMemory, args: list[str], mdir: Path, db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A mirror an older dualmem wrote: `.env.json` in the files and in the state.
    put(mem, ".env", {"v": 1})
    put(mem, ".edited", {"v": 1})
    once(capsys, args, mdir)
    state = json.loads((mdir / STATE_FILE).read_text())
    for key in (".env", ".edited"):
        new = file_of(mdir, key)
        old = new.with_name(key + ".json")
        new.rename(old)
        rel = new.relative_to(mdir).as_posix()
        state["files"][old.relative_to(mdir).as_posix()] = state["files"].pop(rel)
    (mdir / STATE_FILE).write_text(json.dumps(state))
    hidden_edit = file_of(mdir, ".edited").with_name(".edited.json")
    hidden_edit.write_text("an edit the old mirror never saw", encoding="utf-8")
    out = once(capsys, args, mdir)
    assert "2 written" in out and "0 restored" in out
    assert doc(file_of(mdir, ".env"))["value"] == {"v": 1}
    assert not file_of(mdir, ".env").with_name(".env.json").exists()
    assert hidden_edit.read_text(encoding="utf-8") == "an edit the old mirror never saw"
    assert "0 written, 0 removed, 0 imported, 0 conflicts, 0 rejected, 0 restored" in once(
        capsys, args, mdir
    )
    assert sync_events(db_path) == []
    assert verify_mirror(capsys, args, mdir)["status"] == "ok"


def test_only_its_owner_can_read_a_mirror(
    mem: DualMemory, args: list[str], mdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Files were created with the umask (0644): levels 3 and 4 readable by anyone.
    put(mem, "plan", {"steps": 1})
    put(mem, "spec", "text", Level.PROJECT)
    old = os.umask(0o022)
    try:
        once(capsys, args, mdir)
        write_value(file_of(mdir, "plan"), {"steps": 2})
        put(mem, "spec", "newer", Level.PROJECT)
        once(capsys, args, mdir)  # an import written back, an update applied
    finally:
        os.umask(old)
    files = [mdir / STATE_FILE, file_of(mdir, "plan"), file_of(mdir, "spec", "project:shop")]
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    for d in (mdir, file_of(mdir, "plan").parent, file_of(mdir, "spec", "project:shop").parent):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    # The directories it creates above the mirror too (they followed the umask).
    deep = mdir.parent / "a" / "b" / "m"
    old = os.umask(0o022)
    try:
        once(capsys, args, deep)
    finally:
        os.umask(old)
    for d in (deep.parent.parent, deep.parent, deep):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d


@pytest.mark.parametrize("interval", ["0", "-1", "nan", "inf", "1e300"])
def test_an_interval_that_is_not_a_positive_duration_is_refused(
    args: list[str], mdir: Path, capsys: pytest.CaptureFixture[str], interval: str
) -> None:
    # 0, -1 and nan were accepted and the mirror looped without pause.
    code, _, err = run_cli(capsys, "mirror", *args, "--dir", str(mdir), f"--interval={interval}")
    assert code == 2, err
    assert f"--interval must be a number of seconds in (0, 1,000,000], got {float(interval)}" in err
    assert not mdir.exists()


def test_a_running_mirror_prints_a_line_only_for_a_cycle_that_did_something(
    redis_server: RedisServer, db_path: Path, keyfile: Path, mdir: Path
) -> None:
    # Without --once the mirror keeps quiet about idle cycles: a summary line after each
    # of them (every --interval) went unnoticed by every test, which all ran --once.
    redis_server.client().flushall()
    url = redis_server.url
    with DualMemory(redis_url=url, db_path=str(db_path), keyring=str(keyfile)) as mem:
        put(mem, "a", 1)
    argv = ["--redis-url", url, "--db", str(db_path), "--keyring", str(keyfile)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "dualmem", "mirror", *argv, "--dir", str(mdir), "--interval=0.01"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    state = mdir / STATE_FILE

    def saved_ns() -> int:
        with contextlib.suppress(FileNotFoundError):
            return int(json.loads(state.read_text())["saved_ns"])
        return 0

    try:
        wait_until(lambda: file_of(mdir, "a").exists() and saved_ns(), what="the first cycle")
        for _ in range(2):  # each cycle saves the state: two idle cycles after the first
            last = saved_ns()
            wait_until(lambda: saved_ns() > last, what="an idle cycle")  # noqa: B023
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    lines = [line for line in out.splitlines() if line.startswith("mirror ")]
    assert len(lines) == 1 and "1 written" in lines[0], out


def test_sqlite_wins_a_conflict_and_the_conflict_is_recorded(
    mem: DualMemory, args: list[str], mdir: Path, db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    put(mem, "k", "v1")
    once(capsys, args, mdir)
    f = file_of(mdir, "k")
    put(mem, "k", "v2 from an agent")  # SQLite changes...
    d = doc(f)
    d["value"] = "v2 from a human"  # ...and so does the file
    f.write_text(json.dumps(d, indent=2), encoding="utf-8")
    out = once(capsys, args, mdir)
    assert "conflict" in out and "SQLite wins" in out
    assert mem.get("k", level=Level.SWARM, principal=CODER) == "v2 from an agent"
    assert doc(f)["value"] == "v2 from an agent"
    ((kind, key, detail),) = sync_events(db_path)
    assert (kind, key) == ("conflict", "k")
    assert "v2 from a human" in str(detail["discarded"])  # what lost is kept
    assert detail["path"] == "swarm:s1/k.json"
    # In the audit log too, as a medium risk (an import is low): a conflict discards a save.
    audit = {a.event: a.risk for a in mem.store.audit_log()}
    assert audit["mirror.conflict"] == "medium"
    assert verify_mirror(capsys, args, mdir)["status"] == "ok"


def test_a_running_mirror_knows_its_own_imports_from_changes_in_sqlite(
    make_mem: Callable[..., DualMemory],
    db_path: Path,
    mdir: Path,
    settings: Settings,
) -> None:
    # A running mirror kept the stream id the file was written from after importing an
    # edit: once the import committed, the file's next edit was "conflict: SQLite changed
    # too; SQLite wins" and lost, though the only change in SQLite was that import.
    mem = make_mem()
    put(mem, "cfg", {"v": 0})
    f = file_of(mdir, "cfg")

    def edit_and_cycle(value: object) -> Any:
        write_value(f, value)
        return cycle(mirror)

    with started_mirror(settings, mdir) as (rt, mirror):
        first = edit_and_cycle({"v": 1})
        assert first.imported == 1
        assert rt.wait(first.receipts, 10).committed == len(first.receipts)
        second = edit_and_cycle({"v": 2})  # the next save, after the import committed
        assert (second.imported, second.conflicts) == (1, 0), second.events
        rt.wait(second.receipts, 10)
        assert mem.get("cfg", level=Level.SWARM, principal=CODER) == {"v": 2}
        # A genuine change in SQLite since is still a conflict, and SQLite wins.
        put(mem, "cfg", {"v": "agent"})
        third = edit_and_cycle({"v": 3})
        assert (third.imported, third.conflicts) == (0, 1), third.events
        assert doc(f)["value"] == {"v": "agent"}
        rt.wait(third.receipts, 10)
        # Edits imported while no worker runs are all the mirror's own once committed.
        mem.close(timeout=2)
        pending = [edit_and_cycle({"v": 4}), edit_and_cycle({"v": 5})]
        assert [r.imported for r in pending] == [1, 1]
        make_mem()  # a worker again
        for r in pending:
            assert rt.wait(r.receipts, 10).committed == len(r.receipts)
        last = edit_and_cycle({"v": 6})
        assert (last.imported, last.conflicts) == (1, 0), last.events
        rt.wait(last.receipts, 10)
    assert make_mem().get("cfg", level=Level.SWARM, principal=CODER) == {"v": 6}
    assert event_kinds(db_path, "cfg") == [
        "imported",
        "imported",
        "conflict",
        "imported",
        "imported",
        "imported",
    ]


def test_a_new_files_next_save_is_imported_while_the_first_is_in_flight(
    make_mem: Callable[..., DualMemory],
    db_path: Path,
    mdir: Path,
    settings: Settings,
) -> None:
    # A file that creates its record has no row until its import commits: its second
    # save in the meantime was "conflict: the record was deleted; SQLite wins", the file
    # was removed and the record ended with the first save.
    mem = make_mem()
    put(mem, "seed", 0)
    f = file_of(mdir, "new")

    with started_mirror(settings, mdir) as (rt, mirror):
        mem.close(timeout=2)  # no worker: the imports stay in flight
        pending = [
            save_new(mirror, f, {"v": 1}),
            save_new(mirror, f, {"v": 2}),
            save_new(mirror, f, {"v": 3}),
        ]
        assert [(r.imported, r.conflicts) for r in pending] == [(1, 0)] * 3, pending[-1].events
        assert doc(f)["value"] == {"v": 3}
        make_mem()  # a worker again
        for r in pending:
            assert rt.wait(r.receipts, 10).committed == len(r.receipts)
        last = cycle(mirror)
        assert last.conflicts == 0 and doc(f)["owner"] == "mirror", last.events
        assert doc(f)["value"] == {"v": 3}
    assert make_mem().get("new", level=Level.SWARM, principal=CODER) == {"v": 3}
    assert event_kinds(db_path, "new") == ["imported"] * 3


def test_an_edit_put_back_while_its_import_is_in_flight_is_imported(
    make_mem: Callable[..., DualMemory],
    db_path: Path,
    mdir: Path,
    settings: Settings,
) -> None:
    # The second save puts back what SQLite still holds while the first save's import is
    # in flight: it was taken for formatting only (the file's in-flight imports dropped
    # with it), and the first save committed last. So for a plaintext value and for a
    # sealed file's expiry.
    mem = make_mem()
    put(mem, "cfg", {"v": 0})
    put(mem, "token", {"t": SECRET}, Level.TEAM)
    f, sealed = file_of(mdir, "cfg"), file_of(mdir, "token", "team:backend")

    def set_expiry(expires: int | None) -> None:
        d = doc(sealed)
        d["expires_at"] = expires
        sealed.write_text(json.dumps(d), encoding="utf-8")

    with started_mirror(settings, mdir) as (rt, mirror):
        assert "envelope" in doc(sealed)
        mem.close(timeout=2)  # no worker: the imports stay in flight
        write_value(f, {"v": 1})
        set_expiry(int(time.time() * 1000) + 3_600_000)
        first = cycle(mirror)
        assert first.imported == 2, first.events
        write_value(f, {"v": 0})
        set_expiry(None)
        second = cycle(mirror)
        assert (second.imported, second.conflicts) == (2, 0), second.events
        make_mem()  # a worker again
        for r in (first, second):
            assert rt.wait(r.receipts, 10).committed == len(r.receipts)
        last = cycle(mirror)
        assert last.conflicts == 0, last.events
        assert doc(f)["value"] == {"v": 0} and doc(sealed)["expires_at"] is None
    mem = make_mem()
    assert mem.get("cfg", level=Level.SWARM, principal=CODER) == {"v": 0}
    record = mem.get_record("token", level=Level.TEAM, principal=CODER)
    assert record is not None and record.value == {"t": SECRET}
    assert (record.owner, record.expires_at) == ("coder-1", None)
    assert event_kinds(db_path, "cfg") == ["imported"] * 2


def test_a_file_deleted_while_its_import_is_in_flight_keeps_its_next_save(
    make_mem: Callable[..., DualMemory],
    db_path: Path,
    mdir: Path,
    settings: Settings,
) -> None:
    # The restore of a file deleted by hand dropped the ids of its imports in flight:
    # once the import committed, the file's next save was "conflict: SQLite changed
    # too; SQLite wins" and lost, though the only change in SQLite was that import.
    mem = make_mem()
    put(mem, "cfg", {"v": 0})
    put(mem, "other", {"v": 0})
    f, g = file_of(mdir, "cfg"), file_of(mdir, "other")
    with started_mirror(settings, mdir) as (rt, mirror):
        mem.close(timeout=2)  # no worker: the imports stay in flight
        write_value(f, {"v": 1})
        write_value(g, {"v": 1})
        first = cycle(mirror)
        assert first.imported == 2, first.events
        f.unlink()
        g.unlink()
        restore = cycle(mirror)
        assert restore.restored == 2 and doc(f)["value"] == {"v": 0}, restore.events
        mem = make_mem()  # a worker again
        for r in (first, restore):
            assert rt.wait(r.receipts, 10).committed == len(r.receipts)
        # An agent's write since is still a change in SQLite: it wins.
        put(mem, "other", {"v": "agent"})
        write_value(f, {"v": 2})  # saved before the mirror read the commits
        write_value(g, {"v": 2})
        last = cycle(mirror)
        assert (last.imported, last.conflicts) == (1, 1), last.events
        assert "conflict swarm:s1/other.json: SQLite changed too; SQLite wins" in last.events
        assert doc(g)["value"] == {"v": "agent"}
        rt.wait(last.receipts, 10)
    mem = make_mem()
    assert mem.get("cfg", level=Level.SWARM, principal=CODER) == {"v": 2}
    assert mem.get("other", level=Level.SWARM, principal=CODER) == {"v": "agent"}
    assert event_kinds(db_path, "cfg") == [
        "imported",
        "restored",
        "imported",
    ]


def cfg_without_a_worker(make_mem: Callable[..., DualMemory], mdir: Path) -> Path:
    """The record ``cfg`` (``{"v": 0}``) committed, and no worker running from here on:
    commands commit when ``commit_through`` says. Its file in ``mdir``."""
    mem = make_mem()
    put(mem, "cfg", {"v": 0})
    mem.close(timeout=2)
    return file_of(mdir, "cfg")


def two_saves_imported(mirror: Mirror, f: Path) -> tuple[CycleReport, CycleReport]:
    """Saves ``{"v": 1}`` then ``{"v": 2}`` in ``f``, each imported by a cycle of its own:
    the two cycles' reports."""
    write_value(f, {"v": 1})
    first = cycle(mirror)
    write_value(f, {"v": 2})
    second = cycle(mirror)
    assert [(r.imported, r.conflicts) for r in (first, second)] == [(1, 0)] * 2
    return first, second


def test_a_save_made_while_a_later_import_is_in_flight_is_imported(
    make_mem: Callable[..., DualMemory],
    db_path: Path,
    mdir: Path,
    settings: Settings,
) -> None:
    # With two imports of one file in flight, the cycle that read the first from the
    # journal rewrote the file to it (the last save gone from the file) and forgot the
    # second: a save made before the second was read was then "conflict: SQLite changed
    # too; SQLite wins", and lost. The mirror is restarted in between: what is in flight
    # is in its saved state.
    f = cfg_without_a_worker(make_mem, mdir)
    with started_mirror(settings, mdir) as (rt, mirror):
        first, second = two_saves_imported(mirror, f)
        commit_through(rt, first.receipts[0])
        r2 = second.receipts[0]
        assert rt.store.status(r2.shard, r2.stream_id) is None  # still in flight
    # The restarted mirror's first cycle reads the first import from the journal.
    with started_mirror(settings, mdir) as (rt, mirror):
        assert doc(f)["value"] == {"v": 2}  # the last save stays in its file
        write_value(f, {"v": 3})
        commit_through(rt, r2)  # committed before the mirror read it
        third = cycle(mirror)
        assert (third.imported, third.conflicts) == (1, 0), third.events
        make_mem()  # a worker again
        assert rt.wait(third.receipts, 10).committed == len(third.receipts)
        last = cycle(mirror)
        assert last.conflicts == 0 and doc(f)["value"] == {"v": 3}, last.events
        assert doc(f)["owner"] == "mirror" and not mirror.state.files["swarm:s1/cfg.json"].get(
            "sent"
        )
    assert make_mem().get("cfg", level=Level.SWARM, principal=CODER) == {"v": 3}
    assert event_kinds(db_path, "cfg") == ["imported"] * 3


def test_a_save_made_after_an_earlier_import_was_read_is_checked_against_its_row(
    make_mem: Callable[..., DualMemory],
    db_path: Path,
    mdir: Path,
    settings: Settings,
) -> None:
    # The cycle that reads the first of two imports of a file keeps the file (its last
    # save) and makes the row that import left the file's base. No test saved again
    # before the second import committed, so a mirror that kept the older base went
    # unnoticed: the first import, read and so no longer in flight, was then "SQLite
    # changed too" for that save, and the save was lost.
    f = cfg_without_a_worker(make_mem, mdir)
    with started_mirror(settings, mdir) as (rt, mirror):
        first, _ = two_saves_imported(mirror, f)
        commit_through(rt, first.receipts[0])
        held = cycle(mirror)  # reads the first import; the second is in flight
        assert held.written == 0 and doc(f)["value"] == {"v": 2}, held.events
        write_value(f, {"v": 3})
        third = cycle(mirror)
        assert (third.imported, third.conflicts) == (1, 0), third.events
        make_mem()  # a worker again
        assert rt.wait(third.receipts, 10).committed == len(third.receipts)
        last = cycle(mirror)
        assert last.conflicts == 0 and doc(f)["value"] == {"v": 3}, last.events
    assert make_mem().get("cfg", level=Level.SWARM, principal=CODER) == {"v": 3}
    assert event_kinds(db_path, "cfg") == ["imported"] * 3


def test_a_save_after_a_conflict_is_imported_while_an_earlier_import_is_in_flight(
    make_mem: Callable[..., DualMemory],
    db_path: Path,
    mdir: Path,
    settings: Settings,
) -> None:
    # The conflict's rewrite from SQLite forgot the file's import still in flight: once
    # it committed, a save made before the mirror read it was "conflict: SQLite changed
    # too; SQLite wins", though the only change in SQLite was that import.
    f = cfg_without_a_worker(make_mem, mdir)
    with started_mirror(settings, mdir) as (rt, mirror):
        agent = make_mem(worker=False).put(
            "cfg", {"v": "agent"}, level=Level.SWARM, principal=CODER
        )
        write_value(f, {"v": 1})
        first = cycle(mirror)
        assert first.imported == 1, first.events
        commit_through(rt, agent)  # before the import, which stays in flight
        write_value(f, {"v": 2})
        second = cycle(mirror)
        assert (second.imported, second.conflicts) == (0, 1), second.events
        assert doc(f)["value"] == {"v": "agent"}
        write_value(f, {"v": 3})
        commit_through(rt, first.receipts[0])  # committed before the mirror read it
        third = cycle(mirror)
        assert (third.imported, third.conflicts) == (1, 0), third.events
        make_mem()  # a worker again
        assert rt.wait(third.receipts, 10).committed == len(third.receipts)
        last = cycle(mirror)
        assert last.conflicts == 0 and doc(f)["value"] == {"v": 3}, last.events
    assert make_mem().get("cfg", level=Level.SWARM, principal=CODER) == {"v": 3}
    kinds = event_kinds(db_path, "cfg")
    assert kinds == ["imported", "conflict", "imported"]


def test_a_write_an_import_overwrote_unread_is_still_a_change_for_the_next_save(
    make_mem: Callable[..., DualMemory],
    db_path: Path,
    mdir: Path,
    settings: Settings,
) -> None:
    # An agent's write committed just before the mirror's import of the file, both read
    # by one cycle: the row is the mirror's own, but the agent's write is a change in
    # SQLite the next save never saw. No test had both in one cycle, so a mirror that
    # judged by the row alone (importing the save) went unnoticed.
    f = cfg_without_a_worker(make_mem, mdir)
    with started_mirror(settings, mdir) as (rt, mirror):
        make_mem(worker=False).put("cfg", {"v": "agent"}, level=Level.SWARM, principal=CODER)
        write_value(f, {"v": 1})
        first = cycle(mirror)  # checked against {"v": 0}: the agent's write is in flight
        assert (first.imported, first.conflicts) == (1, 0), first.events
        commit_through(rt, first.receipts[0])  # the agent's write, then the import over it
        write_value(f, {"v": 2})  # saved before the mirror read either
        second = cycle(mirror)
        assert (second.imported, second.conflicts) == (0, 1), second.events
        assert doc(f)["value"] == {"v": 1}  # SQLite's
        make_mem()  # a worker again
        rt.wait(second.receipts, 10)
    assert make_mem().get("cfg", level=Level.SWARM, principal=CODER) == {"v": 1}
    assert event_kinds(db_path, "cfg") == ["imported", "conflict"]


def test_an_import_the_worker_dead_letters_is_in_flight_no_more(
    make_mem: Callable[..., DualMemory],
    db_path: Path,
    mdir: Path,
    settings: Settings,
) -> None:
    # An import the worker dead-lettered stayed "in flight" until the file was next
    # rewritten from SQLite: the file kept a save SQLite never got, and nothing said so.
    mem = make_mem(max_deliveries=1)
    put(mem, "cfg", {"v": 0})
    f = file_of(mdir, "cfg")
    with started_mirror(settings, mdir) as (rt, mirror):
        refuse_inserts(db_path, "NEW.key = 'cfg'")
        write_value(f, {"v": 1, "note": "never committed"})
        first = cycle(mirror)
        assert first.imported == 1, first.events
        assert rt.wait(first.receipts, 10).dead == 1  # the import; its event commits
        (letter,) = rt.store.dead_letters()
        failed = cycle(mirror)
        assert (failed.failed, failed.written) == (1, 1), failed.events
        assert (
            f"dead-lettered (IntegrityError: {REFUSED}); `dualmem dlq replay {letter.id}`"
            in (failed.events[0])
        )
        assert doc(f)["value"] == {"v": 0}  # SQLite's
        rt.wait(failed.receipts, 10)
        allow_inserts(db_path)
        # Nothing of the file in flight: SQLite's changes reach it, its saves are imported.
        put(mem, "cfg", {"v": "agent"})
        assert cycle(mirror).written == 1
        assert doc(f)["value"] == {"v": "agent"}
        write_value(f, {"v": 2})
        last = cycle(mirror)
        assert (last.imported, last.conflicts) == (1, 0), last.events
        rt.wait(last.receipts, 10)
    assert mem.get("cfg", level=Level.SWARM, principal=CODER) == {"v": 2}
    events = [(k, d) for k, key, d in sync_events(db_path) if key == "cfg"]
    assert [k for k, _ in events] == ["imported", "failed", "imported"]
    detail = events[1][1]
    assert (detail["dead_letter"], detail["stream_id"]) == (letter.id, letter.stream_id)
    assert letter.stream_id == first.receipts[0].stream_id
    assert "never committed" in str(detail["discarded"])  # the save SQLite never got


def test_a_failed_import_from_an_older_state_never_reports_a_later_save_as_its_own(
    make_mem: Callable[..., DualMemory],
    db_path: Path,
    mdir: Path,
    settings: Settings,
) -> None:
    # A state saved before imports kept their saves names only the import's id: its
    # failed event has the file's content only while the file still holds that save
    # (by its hash). No test had such a state, so a mirror that reported whatever the
    # file held went unnoticed: a later save, imported next, was in the failed event as
    # the save that never committed.
    mem = make_mem(max_deliveries=1)
    put(mem, "cfg", {"v": 0})
    f = file_of(mdir, "cfg")
    with started_mirror(settings, mdir) as (rt, mirror):
        refuse_inserts(db_path, "NEW.key = 'cfg'")
        write_value(f, {"v": 1, "note": "the failed save"})
        first = cycle(mirror)
        assert rt.wait(first.receipts, 10).dead == 1
        allow_inserts(db_path)
        state = json.loads((mdir / STATE_FILE).read_text(encoding="utf-8"))
        entry = state["files"]["swarm:s1/cfg.json"]
        (sid,) = entry["sent"]
        entry["holds"] = sid  # as an older release saved it
        (mdir / STATE_FILE).write_text(json.dumps(state), encoding="utf-8")
        write_value(f, {"v": 2, "note": "a later save"})
        report = Mirror(rt, mdir).cycle(now_ms())  # restarted on that state
        assert (report.failed, report.imported) == (1, 1), report.events
        rt.wait(report.receipts, 10)
    assert mem.get("cfg", level=Level.SWARM, principal=CODER) == {"v": 2, "note": "a later save"}
    (detail,) = failed_events(db_path, "cfg")
    assert detail["stream_id"] == sid and "discarded" not in detail


def test_a_failed_import_from_an_older_state_reports_the_save_its_file_still_holds(
    make_mem: Callable[..., DualMemory],
    db_path: Path,
    mdir: Path,
    settings: Settings,
) -> None:
    # A state saved before imports kept their saves names only the import's id: the
    # failed event takes the save from the file while the file still holds it (by the
    # hash the state kept). Only a file saved again since was tested, so a mirror that
    # dropped such an id's hash went unnoticed: the failed event had no save at all.
    mem = make_mem(max_deliveries=1)
    put(mem, "cfg", {"v": 0})
    f = file_of(mdir, "cfg")
    with started_mirror(settings, mdir) as (rt, mirror):
        refuse_inserts(db_path, "NEW.key = 'cfg'")
        write_value(f, {"v": 1, "note": "the failed save"})
        first = cycle(mirror)
        assert rt.wait(first.receipts, 10).dead == 1
        allow_inserts(db_path)
        state = json.loads((mdir / STATE_FILE).read_text(encoding="utf-8"))
        entry = state["files"]["swarm:s1/cfg.json"]
        (sid,) = entry["sent"]
        entry["holds"] = sid  # as an older release saved it
        (mdir / STATE_FILE).write_text(json.dumps(state), encoding="utf-8")
        report = Mirror(rt, mdir).cycle(now_ms())  # restarted on that state
        assert (report.failed, report.written) == (1, 1), report.events
        rt.wait(report.receipts, 10)
    (detail,) = failed_events(db_path, "cfg")
    assert detail["stream_id"] == sid and "the failed save" in str(detail["discarded"])


def test_the_replay_of_a_files_seventeenth_failed_import_is_the_mirrors_own(
    make_mem: Callable[..., DualMemory],
    db_path: Path,
    mdir: Path,
    settings: Settings,
) -> None:
    # The file keeps the ids of its last 16 failed imports. No test failed more than
    # two, so a mirror that kept the first 16 went unnoticed: the replay of any later
    # one, made after its event, was a change in SQLite, and the next save a false
    # conflict.
    mem = make_mem(max_deliveries=1)
    put(mem, "cfg", {"v": 0})
    f = file_of(mdir, "cfg")
    with started_mirror(settings, mdir) as (rt, mirror):
        for v in range(1, 18):
            a_failed_import(rt, mirror, db_path, f, {"v": v})
        newest = max(rt.store.dead_letters(), key=lambda letter: letter.id)
        replays = dlq.replay(rt, [newest.id]).receipts
        assert rt.wait(replays, 10).committed == 1
        write_value(f, {"v": "last"})
        last = cycle(mirror)
        assert (last.imported, last.conflicts) == (1, 0), last.events
        rt.wait(last.receipts, 10)
    assert mem.get("cfg", level=Level.SWARM, principal=CODER) == {"v": "last"}


def test_a_dead_lettered_import_replayed_is_followed_to_its_replay(
    make_mem: Callable[..., DualMemory],
    db_path: Path,
    mdir: Path,
    settings: Settings,
) -> None:
    # The import's dead letter was replayed (`dualmem dlq replay`) before the mirror saw
    # it: the replay is the mirror's own import under a new stream id, not a change in
    # SQLite to defend the file's next save against.
    mem = make_mem(max_deliveries=1)
    put(mem, "cfg", {"v": 0})
    f = file_of(mdir, "cfg")
    with started_mirror(settings, mdir) as (rt, mirror):
        refuse_inserts(db_path, "NEW.key = 'cfg'")
        write_value(f, {"v": 1})
        first = cycle(mirror)
        assert rt.wait(first.receipts, 10).dead == 1
        allow_inserts(db_path)
        (replay,) = dlq.replay(rt, None).receipts
        assert rt.wait([replay], 10).committed == 1
        write_value(f, {"v": 2})
        second = cycle(mirror)
        assert (second.imported, second.conflicts, second.failed) == (1, 0, 0), second.events
        rt.wait(second.receipts, 10)
    assert mem.get("cfg", level=Level.SWARM, principal=CODER) == {"v": 2}
    assert event_kinds(db_path, "cfg") == ["imported"] * 2


def test_a_failed_import_replayed_after_its_event_is_the_mirrors_own(
    make_mem: Callable[..., DualMemory],
    db_path: Path,
    mdir: Path,
    settings: Settings,
) -> None:
    # Replayed as its failed event advises (after the mirror reported it), a dead-lettered
    # import's commit was a change in SQLite to the mirror: the file's next save was a
    # false conflict, discarded.
    mem = make_mem(max_deliveries=1)
    put(mem, "cfg", {"v": 0})
    f = file_of(mdir, "cfg")
    with started_mirror(settings, mdir) as (rt, mirror):
        refuse_inserts(db_path, "NEW.key = 'cfg'")
        write_value(f, {"v": 1})
        first = cycle(mirror)
        assert rt.wait(first.receipts, 10).dead == 1
        failed = cycle(mirror)
        assert failed.failed == 1, failed.events
        rt.wait(failed.receipts, 10)
        allow_inserts(db_path)
        (letter,) = rt.store.dead_letters()
        (replay,) = dlq.replay(rt, [letter.id]).receipts
        assert rt.wait([replay], 10).committed == 1
        write_value(f, {"v": 2, "note": "next save"})
        second = cycle(mirror)
        assert (second.imported, second.conflicts) == (1, 0), second.events
        rt.wait(second.receipts, 10)
        assert cycle(mirror).conflicts == 0
    assert mem.get("cfg", level=Level.SWARM, principal=CODER) == {"v": 2, "note": "next save"}
    kinds = event_kinds(db_path, "cfg")
    assert kinds == ["imported", "failed", "imported"]


def a_failed_import(rt: Runtime, mirror: Mirror, db_path: Path, f: Path, value: Any) -> None:
    """``value`` saved in ``f`` (the record ``cfg``), its import dead-lettered (a worker
    with ``max_deliveries=1``) and its ``failed`` event committed; the poison is gone
    after."""
    refuse_inserts(db_path, "NEW.key = 'cfg'")
    write_value(f, value)
    assert rt.wait(cycle(mirror).receipts, 10).dead == 1
    failed = cycle(mirror)
    assert failed.failed == 1, failed.events
    rt.wait(failed.receipts, 10)
    allow_inserts(db_path)


def test_two_failed_imports_of_a_file_replayed_after_their_events_are_the_mirrors_own(
    make_mem: Callable[..., DualMemory],
    db_path: Path,
    mdir: Path,
    settings: Settings,
) -> None:
    # The file keeps the ids of its last 16 failed imports. No test had more than one,
    # so a mirror that kept only the last went unnoticed: the replay of the earlier one
    # was then a change in SQLite, and the file's next save a false conflict.
    mem = make_mem(max_deliveries=1)
    put(mem, "cfg", {"v": 0})
    f = file_of(mdir, "cfg")
    with started_mirror(settings, mdir) as (rt, mirror):
        for v in (1, 2):
            a_failed_import(rt, mirror, db_path, f, {"v": v})
        replays = dlq.replay(rt, None).receipts
        assert len(replays) == 2 and rt.wait(replays, 10).committed == 2
        write_value(f, {"v": 3})
        last = cycle(mirror)
        assert (last.imported, last.conflicts) == (1, 0), last.events
        rt.wait(last.receipts, 10)
    assert mem.get("cfg", level=Level.SWARM, principal=CODER) == {"v": 3}
    assert event_kinds(db_path, "cfg") == ["imported", "failed"] * 2 + ["imported"]


def test_a_failed_imports_replay_still_in_flight_stays_the_mirrors_own(
    make_mem: Callable[..., DualMemory],
    db_path: Path,
    mdir: Path,
    settings: Settings,
) -> None:
    # A cycle reads an agent's write of the record while the replay of its failed import
    # is still in flight: the failed import must stay known until the replay is read.
    # No test read another change first, so a mirror that forgot the failed import there
    # (taking the replay for read) went unnoticed: once the replay committed, the next
    # save was a false conflict, discarded.
    mem = make_mem(max_deliveries=1)
    put(mem, "cfg", {"v": 0})
    f = file_of(mdir, "cfg")
    with started_mirror(settings, mdir) as (rt, mirror):
        a_failed_import(rt, mirror, db_path, f, {"v": 1})
        mem.close(timeout=2)  # no worker: commands commit when commit_through says
        agent = make_mem(worker=False).put(
            "cfg", {"v": "agent"}, level=Level.SWARM, principal=CODER
        )
        (letter,) = rt.store.dead_letters()
        (replay,) = dlq.replay(rt, [letter.id]).receipts
        commit_through(rt, agent)  # the agent's write; the replay stays in flight
        mid = cycle(mirror)
        assert mid.conflicts == 0 and doc(f)["value"] == {"v": "agent"}, mid.events
        commit_through(rt, replay)
        write_value(f, {"v": 2})  # saved before the mirror read the replay
        second = cycle(mirror)
        assert (second.imported, second.conflicts) == (1, 0), second.events
        make_mem()  # a worker again
        rt.wait(second.receipts, 10)
    assert make_mem().get("cfg", level=Level.SWARM, principal=CODER) == {"v": 2}
    assert event_kinds(db_path, "cfg") == ["imported", "failed", "imported"]


def fill_backlog(make_mem: Callable[..., DualMemory], n: int) -> None:
    """Put ``n`` commands in the stream with no worker to take them: with
    ``max_backlog=n``, the next send is refused (``Backpressure``), nothing sent."""
    writer = make_mem(worker=False)
    for i in range(n):
        writer.put(f"bulk{i}", i, level=Level.SWARM, principal=CODER)


def clear_backlog(make_mem: Callable[..., DualMemory], rt: Runtime) -> DualMemory:
    """A worker again, and room in the stream for the mirror's sends."""
    worker = make_mem()
    worker.settle(10)
    rt.settings = dataclasses.replace(rt.settings, max_backlog=10_000)
    return worker


@pytest.mark.parametrize("again", ["same", "restarted"])
def test_a_cycle_whose_send_fails_loses_no_save(
    make_mem: Callable[..., DualMemory],
    redis_url: str,
    db_path: Path,
    keyfile: Path,
    mdir: Path,
    again: str,
) -> None:
    # A cycle rewrote a conflicting (and a rejected) file from SQLite before it sent the
    # events carrying those saves: when the send then failed (Backpressure), the saves
    # were in neither the files nor any event, and the next cycle had nothing to report.
    mem = make_mem()
    for k in ("cfg", "bad", "other"):
        put(mem, k, {"v": 0})
    settings = dataclasses.replace(settings_for(redis_url, db_path, keyfile), max_backlog=3)
    f, bad, other = file_of(mdir, "cfg"), file_of(mdir, "bad"), file_of(mdir, "other")
    with started_mirror(settings, mdir) as (rt, mirror):
        put(mem, "cfg", {"v": "agent"})
        mem.close(timeout=5)
        fill_backlog(make_mem, 3)
        write_value(f, {"v": 1, "note": "conflicting save"})
        bad.write_text('{"rejected save": ', encoding="utf-8")
        write_value(other, {"v": 1})
        state = (mdir / STATE_FILE).read_bytes()
        with pytest.raises(Backpressure):
            cycle(mirror)
        # Refused before anything was sent: no send for the next cycle to look for (nor
        # for `verify --mirror` to report as a cycle that ended during its send).
        assert not (mdir / SENDING_FILE).exists()
        # Nothing sent, nothing changed: the saves are where the user left them.
        assert doc(f)["value"] == {"v": 1, "note": "conflicting save"}
        assert bad.read_text(encoding="utf-8") == '{"rejected save": '
        assert (mdir / STATE_FILE).read_bytes() == state
        worker = clear_backlog(make_mem, rt)
        cycling = Mirror(rt, mdir) if again == "restarted" else mirror
        report = cycling.cycle(now_ms())
        assert (report.conflicts, report.rejected, report.imported) == (1, 1, 1), report.events
        rt.wait(report.receipts, 10)
        assert doc(f)["value"] == {"v": "agent"}  # SQLite wins, once the events are sent
        assert doc(bad)["value"] == {"v": 0}
    worker.settle(10)
    assert worker.get("other", level=Level.SWARM, principal=CODER) == {"v": 1}
    events = {key: (kind, d) for kind, key, d in sync_events(db_path)}
    assert events["cfg"][0] == "conflict"
    assert "conflicting save" in str(events["cfg"][1]["discarded"])
    assert events["bad"][0] == "rejected"
    assert events["bad"][1]["discarded"] == '{"rejected save": '


def test_a_mirror_whose_cycle_failed_does_the_same_work_again(
    make_mem: Callable[..., DualMemory],
    redis_url: str,
    db_path: Path,
    keyfile: Path,
    mdir: Path,
) -> None:
    # The cycle that found a dead-lettered import failed at its send (Backpressure), after
    # taking the import out of flight and recording the hash of another file's save in
    # the state in memory: cycled again, the same Mirror never reported the failed import
    # and never imported the save.
    mem = make_mem(max_deliveries=1)
    put(mem, "cfg", {"v": 0})
    put(mem, "x", {"v": 0})
    # Room for the first cycle's import and its audit event after the two puts.
    settings = dataclasses.replace(settings_for(redis_url, db_path, keyfile), max_backlog=4)
    f, x = file_of(mdir, "cfg"), file_of(mdir, "x")
    with started_mirror(settings, mdir) as (rt, mirror):
        refuse_inserts(db_path, "NEW.key = 'cfg'")
        write_value(f, {"v": 1, "note": "never committed"})
        first = cycle(mirror)
        assert rt.wait(first.receipts, 10).dead == 1
        mem.close(timeout=5)
        fill_backlog(make_mem, 3)
        write_value(x, {"v": 9})
        with pytest.raises(Backpressure):
            cycle(mirror)
        assert doc(f)["value"] == {"v": 1, "note": "never committed"}  # no event sent yet
        worker = clear_backlog(make_mem, rt)
        again = cycle(mirror)
        assert (again.failed, again.imported) == (1, 1), again.events
        rt.wait(again.receipts, 10)
        assert doc(f)["value"] == {"v": 0}
    worker.settle(10)
    assert worker.get("x", level=Level.SWARM, principal=CODER) == {"v": 9}
    assert event_kinds(db_path, "cfg") == ["imported", "failed"]
    (failed,) = failed_events(db_path, "cfg")
    assert "never committed" in str(failed["discarded"])


def lose(raw_redis: redis.Redis, rt: Runtime, receipt: Receipt) -> None:
    """Redis loses the command of ``receipt`` (as one restarted without its data would)."""
    assert raw_redis.xdel(rt.layout.stream(receipt.shard), receipt.stream_id) == 1


def failed_events(db: Path, key: str) -> list[dict[str, object]]:
    return [d for k, kk, d in sync_events(db) if kk == key and k == "failed"]


def test_an_import_redis_lost_is_a_failed_event_and_never_sent_again(
    make_mem: Callable[..., DualMemory],
    db_path: Path,
    mdir: Path,
    raw_redis: redis.Redis,
    settings: Settings,
) -> None:
    # An import gone from the stream with no commit and no dead letter (Redis restarted
    # without its data) was sent again: a worker that still held it would write it twice.
    # It is a failed import now: the event has the save, the file SQLite's content.
    mem = make_mem()
    put(mem, "cfg", {"v": 0})
    put(mem, "other", {"v": 0})
    f, g = file_of(mdir, "cfg"), file_of(mdir, "other")
    with started_mirror(settings, mdir) as (rt, mirror):
        mem.close(timeout=2)  # no worker: the imports stay in flight
        write_value(f, {"v": 1, "note": "lost save"})
        write_value(g, {"v": 1})
        first = cycle(mirror)
        assert first.imported == 2, first.events
        waiting = cycle(mirror)  # still in the stream: in flight
        assert (waiting.imported, waiting.written, waiting.failed) == (0, 0, 0), waiting.events
        lost = first.receipts[0]
        assert (lost.key, lost.op) == ("cfg", "put")
        lose(raw_redis, rt, lost)
        again = cycle(mirror)
        assert (again.imported, again.failed, again.written) == (0, 1, 1), again.events
        assert "its import was lost from Redis before it was committed" in again.events[0]
        assert doc(f)["value"] == {"v": 0}  # SQLite's
        make_mem()  # a worker again
        rest = [r for r in first.receipts if r != lost] + again.receipts
        assert rt.wait(rest, 10).committed == len(rest)
        assert cycle(mirror).conflicts == 0
    mem = make_mem()
    assert mem.get("cfg", level=Level.SWARM, principal=CODER) == {"v": 0}
    assert mem.get("other", level=Level.SWARM, principal=CODER) == {"v": 1}
    assert event_kinds(db_path, "cfg") == ["imported", "failed"]
    (detail,) = failed_events(db_path, "cfg")
    assert detail["stream_id"] == lost.stream_id and "lost save" in str(detail["discarded"])


def test_an_import_committed_and_trimmed_during_the_cycle_is_not_lost(
    make_mem: Callable[..., DualMemory],
    db_path: Path,
    mdir: Path,
    raw_redis: redis.Redis,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An import committed after the cycle's SQLite snapshot and gone from its stream
    # before the cycle looked there is in neither: SQLite, asked after the stream, knows
    # it. No test raced the two, so a mirror that took the stream's word alone (a failed
    # event for a save SQLite has) went unnoticed.
    f = cfg_without_a_worker(make_mem, mdir)
    with started_mirror(settings, mdir) as (rt, mirror):
        write_value(f, {"v": 1})
        first = cycle(mirror)
        assert first.imported == 1, first.events
        real = Mirror._changed

        def then_committed_and_trimmed(self: Mirror, *args: Any) -> Any:
            changed = real(self, *args)  # the cycle's snapshot is taken
            commit_through(rt, first.receipts[0])
            lose(raw_redis, rt, first.receipts[0])  # acknowledged, then trimmed
            return changed

        monkeypatch.setattr(Mirror, "_changed", then_committed_and_trimmed)
        raced = cycle(mirror)
        monkeypatch.undo()
        assert (raced.failed, raced.written) == (0, 0), raced.events
        last = cycle(mirror)  # reads the commit: the mirror's own
        assert (last.failed, last.conflicts) == (0, 0), last.events
        assert doc(f)["value"] == {"v": 1} and doc(f)["owner"] == "mirror"
        make_mem()  # a worker again
        rt.wait(first.receipts, 10)
    assert event_kinds(db_path, "cfg") == ["imported"]


@contextlib.contextmanager
def mirror_and_a_worker_by_hand(
    make_mem: Callable[..., DualMemory], redis_url: str, db_path: Path, keyfile: Path, mdir: Path
) -> Iterator[tuple[Runtime, Mirror, Worker]]:
    """A running mirror of the record ``cfg`` (``{"v": 0}``) and a worker on its database
    that the test drives itself (batches of 10): ``worker._read`` takes a batch and holds
    it, ``worker._process`` commits it, ``drain`` commits the rest."""
    mem = make_mem()
    put(mem, "cfg", {"v": 0})
    mem.close(timeout=2)
    settings = dataclasses.replace(settings_for(redis_url, db_path, keyfile), batch_size=10)
    with started_mirror(settings, mdir) as (rt, mirror):
        client, _ = connect(settings)
        try:
            worker = Worker(client, rt.store, settings)
            worker.ensure_groups()
            yield rt, mirror, worker
        finally:
            client.close()


def drain(worker: Worker) -> None:
    """Commit everything in the streams (their groups made again: Redis may be new)."""
    worker.ensure_groups()
    while worker.step():
        pass


def test_an_import_a_worker_commits_after_redis_lost_it_is_written_once(
    make_mem: Callable[..., DualMemory],
    redis_url: str,
    db_path: Path,
    keyfile: Path,
    mdir: Path,
    raw_redis: redis.Redis,
) -> None:
    # Redis restarted empty while a worker held the import in memory: "lost" to the
    # mirror, which sent it again; the worker then committed the original, and the copy
    # sent again was written over an agent's later write.
    f = file_of(mdir, "cfg")
    with mirror_and_a_worker_by_hand(make_mem, redis_url, db_path, keyfile, mdir) as (
        rt,
        mirror,
        worker,
    ):
        write_value(f, {"v": 1, "note": "user save"})
        first = cycle(mirror)
        batch = worker._read(False)  # the worker holds the import, its commit under way
        assert first.receipts[0].stream_id in [e.stream_id for e in batch]
        raw_redis.flushall()  # Redis restarted without its data
        lost = cycle(mirror)
        assert (lost.imported, lost.failed) == (0, 1), lost.events
        worker._process(batch)  # ... and the worker's commit lands after all
        assert rt.store.status(0, first.receipts[0].stream_id) == "committed"
        write_value(f, {"v": 2})  # saved before the mirror read that commit
        second = cycle(mirror)
        # The late commit is the mirror's own import, not a change to defend against.
        assert (second.imported, second.conflicts) == (1, 0), second.events
        assert "reported lost from Redis was committed after all" in " ".join(second.events)
        agent = make_mem(worker=False)
        agent.put("cfg", {"v": "agent"}, level=Level.SWARM, principal=CODER)
        drain(worker)
        last = cycle(mirror)
        assert (last.imported, last.conflicts) == (0, 0), last.events
        assert doc(f)["value"] == {"v": "agent"}
    with sqlite3.connect(db_path) as conn:
        mirror_puts = conn.execute(
            "SELECT COUNT(*) FROM journal WHERE key = 'cfg' AND actor = 'mirror'"
        ).fetchone()[0]
    conn.close()
    assert mirror_puts == 2  # the first save once, the second once
    assert make_mem().get("cfg", level=Level.SWARM, principal=CODER) == {"v": "agent"}


def test_two_imports_a_worker_commits_after_redis_lost_them_are_the_mirrors_own(
    make_mem: Callable[..., DualMemory],
    redis_url: str,
    db_path: Path,
    keyfile: Path,
    mdir: Path,
    raw_redis: redis.Redis,
) -> None:
    # The file keeps the ids of its last 16 imports reported lost. No test lost more than
    # one, so a mirror that kept only the last went unnoticed: the late commit of the
    # earlier one was then a change in SQLite, and the file's next save a false conflict.
    f = file_of(mdir, "cfg")
    with mirror_and_a_worker_by_hand(make_mem, redis_url, db_path, keyfile, mdir) as (
        _rt,
        mirror,
        worker,
    ):
        for v in (1, 2):
            write_value(f, {"v": v})
            assert cycle(mirror).imported == 1
        batch = worker._read(False)  # the worker holds both imports
        raw_redis.flushall()  # Redis restarted without its data
        lost = cycle(mirror)
        assert (lost.imported, lost.failed) == (0, 2), lost.events
        worker._process(batch)  # ... and both commits land after all
        write_value(f, {"v": 3})  # saved before the mirror read them
        last = cycle(mirror)
        assert (last.imported, last.conflicts) == (1, 0), last.events
        drain(worker)
    assert make_mem().get("cfg", level=Level.SWARM, principal=CODER) == {"v": 3}


def test_a_late_commit_of_a_files_seventeenth_lost_import_is_the_mirrors_own(
    make_mem: Callable[..., DualMemory],
    redis_url: str,
    db_path: Path,
    keyfile: Path,
    mdir: Path,
    raw_redis: redis.Redis,
) -> None:
    # The file keeps the ids of its last 16 imports reported lost. No test lost more than
    # two, so a mirror that kept the first 16 went unnoticed: the late commit of any later
    # one was a change in SQLite, and the file's next save a false conflict.
    f = file_of(mdir, "cfg")
    with mirror_and_a_worker_by_hand(make_mem, redis_url, db_path, keyfile, mdir) as (
        rt,
        mirror,
        worker,
    ):
        for v in range(1, 17):  # sixteen imports Redis lost for good
            write_value(f, {"v": v})
            sent = cycle(mirror)
            assert sent.imported == 1, sent.events
            lose(raw_redis, rt, sent.receipts[0])
            assert cycle(mirror).failed == 1
        drain(worker)  # their events
        write_value(f, {"v": 17})
        sent = cycle(mirror)
        batch = worker._read(False)  # the worker holds the seventeenth import
        lose(raw_redis, rt, sent.receipts[0])
        assert cycle(mirror).failed == 1
        worker._process(batch)  # ... and commits it after all
        write_value(f, {"v": 18})  # saved before the mirror read that commit
        last = cycle(mirror)
        assert (last.imported, last.conflicts) == (1, 0), last.events
        drain(worker)
    assert make_mem().get("cfg", level=Level.SWARM, principal=CODER) == {"v": 18}


def test_a_new_files_import_redis_lost_is_a_failed_event(
    make_mem: Callable[..., DualMemory],
    db_path: Path,
    mdir: Path,
    raw_redis: redis.Redis,
    settings: Settings,
) -> None:
    # Its entry lost its hash to be "sent again", and the new file was then taken for
    # a record deleted in SQLite: a conflict, the file removed.
    mem = make_mem()
    put(mem, "seed", 0)
    f = file_of(mdir, "new")
    with started_mirror(settings, mdir) as (rt, mirror):
        mem.close(timeout=2)
        first = save_new(mirror, f, {"v": "my new record"})
        assert first.imported == 1, first.events
        lose(raw_redis, rt, first.receipts[0])
        again = cycle(mirror)
        assert (again.failed, again.conflicts, again.removed) == (1, 0, 1), again.events
        assert not f.exists()
        rt.wait(again.receipts, 10)
        # Saved again: a new record, imported.
        make_mem()
        last = save_new(mirror, f, {"v": "again"})
        assert (last.imported, last.conflicts) == (1, 0), last.events
        rt.wait(last.receipts, 10)
    assert make_mem().get("new", level=Level.SWARM, principal=CODER) == {"v": "again"}
    assert event_kinds(db_path, "new") == [
        "imported",
        "failed",
        "imported",
    ]
    (detail,) = failed_events(db_path, "new")
    assert "my new record" in str(detail["discarded"])


@pytest.mark.parametrize("between", [True, False], ids=["followed", "unseen"])
def test_a_replayed_import_redis_lost_is_a_failed_event_with_its_save(
    make_mem: Callable[..., DualMemory],
    db_path: Path,
    mdir: Path,
    raw_redis: redis.Redis,
    between: bool,
    settings: Settings,
) -> None:
    # The replay of a dead-lettered import was followed as the import, but the save's
    # marker stayed on the dead letter's id: Redis losing the replay lost the save
    # silently (no event, the file rewritten from SQLite).
    mem = make_mem(max_deliveries=1)
    put(mem, "cfg", {"v": 0})
    f = file_of(mdir, "cfg")
    with started_mirror(settings, mdir) as (rt, mirror):
        refuse_inserts(db_path, "NEW.key = 'cfg'")
        write_value(f, {"v": 1, "note": "the user's save"})
        first = cycle(mirror)
        assert rt.wait(first.receipts, 10).dead == 1
        mem.close(timeout=2)  # no worker: the replay stays in flight
        allow_inserts(db_path)
        (replay,) = dlq.replay(rt, None).receipts
        if between:
            mid = cycle(mirror)
            assert (mid.failed, mid.written) == (0, 0), mid.events
        lose(raw_redis, rt, replay)
        lost = cycle(mirror)
        assert (lost.failed, lost.written) == (1, 1), lost.events
        assert doc(f)["value"] == {"v": 0}
        make_mem()
        rt.wait(lost.receipts, 10)
    (detail,) = failed_events(db_path, "cfg")
    assert detail["stream_id"] == replay.stream_id
    assert "the user's save" in str(detail["discarded"])


def test_a_replay_dead_lettered_again_is_a_failed_event_with_its_save(
    make_mem: Callable[..., DualMemory],
    db_path: Path,
    mdir: Path,
    settings: Settings,
) -> None:
    mem = make_mem(max_deliveries=1)
    put(mem, "cfg", {"v": 0})
    f = file_of(mdir, "cfg")
    with started_mirror(settings, mdir) as (rt, mirror):
        refuse_inserts(db_path, "NEW.key = 'cfg'")
        write_value(f, {"v": 1, "note": "the user's save"})
        first = cycle(mirror)
        assert rt.wait(first.receipts, 10).dead == 1
        mem.close(timeout=2)
        (replay,) = dlq.replay(rt, None).receipts  # still poisoned
        mid = cycle(mirror)
        assert mid.failed == 0, mid.events
        make_mem(max_deliveries=1)
        assert rt.wait([replay], 10).dead == 1
        failed = cycle(mirror)
        assert (failed.failed, failed.written) == (1, 1), failed.events
        rt.wait(failed.receipts, 10)
    (detail,) = failed_events(db_path, "cfg")
    assert detail["stream_id"] == replay.stream_id
    assert "the user's save" in str(detail["discarded"])


@pytest.mark.parametrize("how", ["deleted", "rejected"])
def test_an_import_lost_after_its_file_was_rewritten_is_a_failed_event(
    make_mem: Callable[..., DualMemory],
    db_path: Path,
    mdir: Path,
    raw_redis: redis.Redis,
    how: str,
    settings: Settings,
) -> None:
    # The restore (or rejection) kept the import's id but not which save it carried:
    # Redis losing it then dropped the save with no event.
    mem = make_mem()
    put(mem, "cfg", {"v": 0})
    f = file_of(mdir, "cfg")
    with started_mirror(settings, mdir) as (rt, mirror):
        mem.close(timeout=2)
        write_value(f, {"v": 1, "note": "the user's save"})
        first = cycle(mirror)
        assert first.imported == 1, first.events
        if how == "deleted":
            f.unlink()
        else:
            f.write_text("{not json", encoding="utf-8")
        rewritten = cycle(mirror)
        assert doc(f)["value"] == {"v": 0}, rewritten.events
        lose(raw_redis, rt, first.receipts[0])
        lost = cycle(mirror)
        assert (lost.failed, lost.imported) == (1, 0), lost.events
        make_mem()
        rt.wait(lost.receipts + rewritten.receipts, 10)
    (detail,) = failed_events(db_path, "cfg")
    assert "the user's save" in str(detail["discarded"])


def test_a_new_file_deleted_while_its_import_is_in_flight_keeps_its_next_save(
    make_mem: Callable[..., DualMemory],
    db_path: Path,
    mdir: Path,
    settings: Settings,
) -> None:
    # With no row to restore, the entry went, and with it the import's id: once it
    # committed, the next save was "SQLite changed too" and lost.
    mem = make_mem()
    put(mem, "seed", 0)
    f = file_of(mdir, "new")
    with started_mirror(settings, mdir) as (rt, mirror):
        mem.close(timeout=2)
        first = save_new(mirror, f, {"v": 1})
        assert first.imported == 1, first.events
        f.unlink()
        gone = cycle(mirror)
        assert (gone.restored, gone.written) == (0, 0), gone.events
        quiet = cycle(mirror)  # no restore every cycle
        assert (quiet.restored, quiet.events) == (0, []), quiet.events
        commit_through(rt, first.receipts[0])
        second = save_new(mirror, f, {"v": 2})  # saved before the mirror read the commit
        assert (second.imported, second.conflicts) == (1, 0), second.events
        make_mem()
        rt.wait(second.receipts + gone.receipts, 10)
        cycle(mirror)
        assert doc(f)["value"] == {"v": 2}
    assert make_mem().get("new", level=Level.SWARM, principal=CODER) == {"v": 2}
    assert event_kinds(db_path, "new") == ["imported"] * 2


def test_a_new_files_record_deleted_after_its_import_committed_is_a_conflict(
    make_mem: Callable[..., DualMemory],
    db_path: Path,
    mdir: Path,
    settings: Settings,
) -> None:
    # The file's next save comes after the import committed and an agent deleted the
    # record (both unread by the mirror yet): SQLite wins, as for any record's file.
    mem = make_mem()
    put(mem, "seed", 0)
    f = file_of(mdir, "new")

    with started_mirror(settings, mdir) as (rt, mirror):
        first = save_new(mirror, f, {"v": 1})
        assert first.imported == 1
        assert rt.wait(first.receipts, 10).committed == len(first.receipts)
        mem.sync(mem.delete("new", level=Level.SWARM, principal=CODER), timeout=10)
        second = save_new(mirror, f, {"v": 2})
        assert (second.imported, second.conflicts) == (0, 1), second.events
        assert "conflict swarm:s1/new.json: the record was deleted; SQLite wins" in second.events
        assert not f.exists()
        rt.wait(second.receipts, 10)
    assert mem.get("new", level=Level.SWARM, principal=CODER) is None
    assert event_kinds(db_path, "new") == ["imported", "conflict"]


def test_an_edit_that_sets_a_past_expiry_expires_the_record(
    mem: DualMemory, args: list[str], mdir: Path, db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The cycle that imported the edit also took the file for expired (its expiry is the
    # edit's) and rewrote it from SQLite, so the entry lost its in-flight imports: the
    # cycle died with KeyError after sending the import, before saving its state.
    put(mem, "k", "v1")
    once(capsys, args, mdir)
    f = file_of(mdir, "k")
    d = doc(f)
    d["value"], d["expires_at"] = "v2", 1000
    f.write_text(json.dumps(d), encoding="utf-8")
    out = once(capsys, args, mdir)
    assert "imported swarm:s1/k.json" in out and "1 removed" in out, out
    assert not f.exists()
    assert mem.get("k", level=Level.SWARM, principal=CODER) is None
    state = json.loads((mdir / STATE_FILE).read_text())
    assert state["files"] == {} and state["seq"] == mem.store.last_seq()
    assert [(k, key) for k, key, _ in sync_events(db_path)] == [("imported", "k")]
    assert verify_mirror(capsys, args, mdir)["status"] == "ok"


def test_a_past_expiry_edit_stays_in_its_file_while_its_import_is_in_flight(
    make_mem: Callable[..., DualMemory],
    db_path: Path,
    mdir: Path,
    settings: Settings,
) -> None:
    mem = make_mem()
    put(mem, "k", "v1")
    f = file_of(mdir, "k")
    with started_mirror(settings, mdir) as (rt, mirror):
        mem.close(timeout=2)  # no worker: the import stays in flight
        d = doc(f)
        d["value"], d["expires_at"] = "v2", 1000
        f.write_text(json.dumps(d), encoding="utf-8")
        first = cycle(mirror)
        assert (first.imported, first.written, first.removed) == (1, 0, 0), first.events
        # The next cycle, before the import commits: the file is the edit, not SQLite's
        # (still live) row written back.
        second = cycle(mirror)
        assert (second.written, second.removed) == (0, 0), second.events
        assert doc(f)["value"] == "v2"
        make_mem()  # a worker again
        assert rt.wait(first.receipts, 10).committed == len(first.receipts)
        last = cycle(mirror)
        assert last.removed == 1 and not f.exists(), last.events
    assert make_mem().get("k", level=Level.SWARM, principal=CODER) is None


def test_a_file_goes_in_the_millisecond_its_record_expires(
    mem: DualMemory, mdir: Path, settings: Settings
) -> None:
    # A record is live while its expiry is after now, so at its expiry it is gone. No
    # test cycled at that very millisecond: a mirror that kept the file one more (while
    # `verify --mirror` called it a file with no live record) went unnoticed.
    mem.sync(mem.put("k", "v", level=Level.SWARM, principal=CODER, ttl=3600), timeout=10)
    record = mem.get_record("k", level=Level.SWARM, principal=CODER)
    assert record is not None and record.expires_at is not None
    f = file_of(mdir, "k")
    with Runtime(settings, worker=False) as rt:
        mirror = Mirror(rt, mdir)
        assert mirror.cycle(record.expires_at - 1).written == 1
        assert mirror.cycle(record.expires_at - 1).removed == 0
        report = mirror.cycle(record.expires_at)
        assert report.removed == 1 and not f.exists(), report.events
        assert mirror.state.files == {}


def test_broken_deleted_and_stray_files(
    mem: DualMemory, args: list[str], mdir: Path, db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    put(mem, "x", 1)
    put(mem, "y", 2)
    once(capsys, args, mdir)
    fx, fy = file_of(mdir, "x"), file_of(mdir, "y")
    fx.write_text('{"scope": "swarm:s1", "key": "x", "level": 3, "value": ', encoding="utf-8")
    fy.unlink()
    stray = mdir / "swarm:s1" / "stray.json"
    stray.write_text("not json at all", encoding="utf-8")
    out = once(capsys, args, mdir)
    assert "rejected swarm:s1/x.json: not valid JSON" in out
    assert "rejected swarm:s1/stray.json" in out
    assert doc(fx)["value"] == 1 and doc(fy)["value"] == 2  # SQLite restored both
    assert stray.read_text() == "not json at all"  # not ours: left alone
    kinds = sorted((k, key) for k, key, _ in sync_events(db_path))
    assert kinds == [("rejected", ""), ("rejected", "x"), ("restored", "y")]
    once(capsys, args, mdir)
    assert len(sync_events(db_path)) == 3  # the stray file is reported once
    v = verify_mirror(capsys, args, mdir)
    assert v["code"] == 1 and v["problems"] == ["swarm:s1/stray.json: no live record in SQLite"]


def test_a_running_mirror_reads_only_files_changed_since_its_last_save(
    mem: DualMemory,
    redis_url: str,
    db_path: Path,
    keyfile: Path,
    mdir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The state's save time stayed what it was at start-up, so a long-running mirror read
    # every file it had written since then again, each cycle, to compare its content.
    import dualmem.ops.mirror as mirror_module

    for i in range(5):
        put(mem, f"r{i}", i)
    mem.close(timeout=5)
    read: list[str] = []
    real = Path.read_bytes

    def counted(path: Path) -> bytes:
        if path.suffix == ".json" and path.name != STATE_FILE:
            read.append(path.name)
        return real(path)

    with started_mirror(settings_for(redis_url, db_path, keyfile), mdir) as (_rt, mirror):
        assert len(list((mdir / "swarm:s1").iterdir())) == 5
        time.sleep(mirror_module._RACY_NS / 1e9 + 0.1)  # the files' stamps are settled
        # A file touched, its content the same: read once, then its new stamp is known
        # (no test touched one: a mirror that kept the old stamp read it every cycle).
        past = time.time_ns() - 10 * 10**9
        os.utime(file_of(mdir, "r1"), ns=(past, past))
        cycle(mirror)  # saves the state: its time is now
        time.sleep(0.05)
        monkeypatch.setattr(Path, "read_bytes", counted)
        write_value(file_of(mdir, "r0"), 10)
        report = cycle(mirror)
        assert report.imported == 1, report.events
        assert read == ["r0.json"]  # the edited file only


def test_a_stray_file_deleted_leaves_the_state(
    mem: DualMemory, args: list[str], mdir: Path, db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    put(mem, "x", 1)
    once(capsys, args, mdir)
    stray = mdir / "swarm:s1" / "stray.json"
    stray.write_text("not json at all", encoding="utf-8")
    once(capsys, args, mdir)
    assert list(json.loads((mdir / STATE_FILE).read_text())["rejected"]) == ["swarm:s1/stray.json"]
    stray.unlink()
    once(capsys, args, mdir)
    assert json.loads((mdir / STATE_FILE).read_text())["rejected"] == {}
    # Saved there again, the same bytes are judged again (and reported again).
    stray.write_text("not json at all", encoding="utf-8")
    out = once(capsys, args, mdir)
    assert "rejected swarm:s1/stray.json" in out
    assert event_kinds(db_path, "") == ["rejected", "rejected"]


def test_a_stray_file_a_records_file_replaced_is_judged_afresh_when_saved_again(
    mem: DualMemory, args: list[str], mdir: Path, db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A stray file is reported once; a record's file written over it ends that. No test
    # had a record come and go at a stray file's path, so a mirror that still took the
    # same bytes saved there again for the stray file it had reported (and said nothing)
    # went unnoticed.
    put(mem, "seed", 0)
    once(capsys, args, mdir)
    stray = file_of(mdir, "x")
    stray.write_text("not json at all", encoding="utf-8")
    assert "rejected swarm:s1/x.json" in once(capsys, args, mdir)
    put(mem, "x", 1)
    once(capsys, args, mdir)
    assert doc(stray)["value"] == 1  # the record's file now
    mem.sync(mem.delete("x", level=Level.SWARM, principal=CODER), timeout=10)
    assert "1 removed" in once(capsys, args, mdir)
    stray.write_text("not json at all", encoding="utf-8")
    assert "rejected swarm:s1/x.json" in once(capsys, args, mdir)
    assert event_kinds(db_path, "") == ["rejected", "rejected"]


def test_a_file_nested_too_deeply_to_parse_is_rejected_and_the_cycle_goes_on(
    mem: DualMemory, args: list[str], mdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # json.loads raised RecursionError, which the mirror did not catch: every cycle
    # ended in a traceback, so a running mirror died and stayed dead.
    put(mem, "x", 1)
    put(mem, "y", 2)
    once(capsys, args, mdir)
    fx, fy = file_of(mdir, "x"), file_of(mdir, "y")
    deep = "[" * 100_000 + "]" * 100_000
    fx.write_text(f'{{"scope": "swarm:s1", "key": "x", "level": 3, "value": {deep}}}')
    write_value(fy, 3)  # an edit in the same cycle is still imported
    out = once(capsys, args, mdir)
    assert "rejected swarm:s1/x.json: not valid JSON" in out and " 1 imported" in out, out
    assert doc(fx)["value"] == 1  # SQLite wins, as for any invalid file
    assert mem.get("y", level=Level.SWARM, principal=CODER) == 3
    other = mdir.parent / "other"
    other.mkdir()
    (other / STATE_FILE).write_text(deep)  # the mirror's own state: a usage error
    code, _, err = run_cli(capsys, "mirror", *args, "--dir", str(other), "--once")
    assert code == 2 and "is not a dualmem mirror state" in err, err


def test_a_file_with_both_value_and_envelope_or_neither_is_rejected(
    mem: DualMemory, args: list[str], mdir: Path, db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # No test saved such a file: without the check, a value added beside a sealed file's
    # envelope was dropped unreported (the envelope read, the file taken for formatting
    # only), and a file with neither ended every cycle in a KeyError.
    put(mem, "token", {"t": 1}, Level.TEAM)
    put(mem, "plan", {"v": 1})
    once(capsys, args, mdir)
    both, neither = file_of(mdir, "token", "team:backend"), file_of(mdir, "plan")
    d = doc(both)
    d["value"] = {"t": 2}
    both.write_text(json.dumps(d), encoding="utf-8")
    d = doc(neither)
    del d["value"]
    neither.write_text(json.dumps(d), encoding="utf-8")
    out = once(capsys, args, mdir)
    assert out.count("a file needs exactly one of 'value' and 'envelope'") == 2, out
    assert " 2 rejected" in out, out
    assert mem.get("token", level=Level.TEAM, principal=CODER) == {"t": 1}
    assert doc(neither)["value"] == {"v": 1}  # SQLite wins, as for any invalid file
    assert sorted(event_kinds(db_path, "token") + event_kinds(db_path, "plan")) == [
        "rejected",
        "rejected",
    ]


def test_an_expiring_records_file_shows_its_expiry_and_a_value_edit_keeps_it(
    mem: DualMemory, args: list[str], mdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A file shows its record's expires_at, and an edit of the value alone is imported
    # with it. No test looked at an expiring record's file: a mirror that wrote null
    # there went unnoticed, and every value edit then made the record one that never
    # expires.
    mem.sync(mem.put("lease", "v1", level=Level.SWARM, principal=CODER, ttl=3600), timeout=10)
    record = mem.get_record("lease", level=Level.SWARM, principal=CODER)
    assert record is not None and record.expires_at is not None
    once(capsys, args, mdir)
    f = file_of(mdir, "lease")
    assert doc(f)["expires_at"] == record.expires_at
    write_value(f, "v2")
    assert "1 imported" in once(capsys, args, mdir)
    after = mem.get_record("lease", level=Level.SWARM, principal=CODER)
    assert after is not None and (after.value, after.expires_at) == ("v2", record.expires_at)


def test_files_other_than_json_beside_the_records_are_left_alone(
    mem: DualMemory, args: list[str], mdir: Path, db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Only `<key>.json` files are records. No test left anything else in a scope's
    # directory, so a scan that took every file for one went unnoticed: an editor's
    # backup copy (`plan.json~`) was rejected as a file in the wrong place, in an audit
    # event, and `verify --mirror` failed on it.
    put(mem, "plan", {"v": 1})
    once(capsys, args, mdir)
    f = file_of(mdir, "plan")
    backup = f.with_name(f.name + "~")
    shutil.copy(f, backup)
    write_value(f, {"v": 2})
    out = once(capsys, args, mdir)
    assert "1 imported" in out and " 0 rejected" in out, out
    assert doc(backup)["value"] == {"v": 1}  # not the mirror's: left as it is
    assert [(k, key) for k, key, _ in sync_events(db_path)] == [("imported", "plan")]
    assert verify_mirror(capsys, args, mdir)["status"] == "ok"


def test_a_file_that_is_not_a_json_object_is_rejected_and_the_cycle_goes_on(
    mem: DualMemory, args: list[str], mdir: Path, db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # No test saved valid JSON that is not an object: without the check, its fields were
    # looked up on a list (AttributeError), and every cycle ended in a traceback.
    put(mem, "x", 1)
    put(mem, "y", 2)
    once(capsys, args, mdir)
    fx, fy = file_of(mdir, "x"), file_of(mdir, "y")
    fx.write_text('["scope", "swarm:s1", "key", "x"]', encoding="utf-8")
    write_value(fy, 3)  # an edit in the same cycle is still imported
    out = once(capsys, args, mdir)
    assert "rejected swarm:s1/x.json: expected a JSON object" in out and " 1 imported" in out, out
    assert doc(fx)["value"] == 1  # SQLite wins, as for any invalid file
    assert mem.get("y", level=Level.SWARM, principal=CODER) == 3
    assert sorted(k for k, key, _ in sync_events(db_path)) == ["imported", "rejected"]


def test_a_file_the_worker_or_redis_would_refuse_is_rejected_before_anything_is_sent(
    mem: DualMemory, args: list[str], mdir: Path, db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The mirror checks a save as `import` checks a line. Only import's checks were
    # tested, so a mirror without them went unnoticed: an expiry past put's ttl bound
    # went to Redis (which refuses its PX inside the transaction), and a mission-log
    # record the projection refuses was sent for the worker to dead-letter.
    put(mem, "x", 1)
    once(capsys, args, mdir)
    fx = file_of(mdir, "x")
    d = doc(fx)
    d["expires_at"] = 2**62
    fx.write_text(json.dumps(d), encoding="utf-8")
    mission = file_of(mdir, "_dm/mission/m1", "project:shop")
    mission.parent.mkdir(mode=0o700, exist_ok=True)
    mission.write_text(
        json.dumps(
            {"scope": "project:shop", "key": "_dm/mission/m1", "level": 4, "value": {"x": 1}}
        ),
        encoding="utf-8",
    )
    out = once(capsys, args, mdir)
    assert "rejected swarm:s1/x.json: expires_at is more than" in out, out
    assert "rejected project:shop/_dm%2Fmission%2Fm1.json: _dm/mission/m1: not a valid" in out
    assert " 0 imported" in out and " 2 rejected" in out, out
    mem.settle(10)
    assert mem.store.dead_letters() == []
    record = mem.get_record("x", level=Level.SWARM, principal=CODER)
    assert record is not None and record.expires_at is None
    assert doc(fx)["expires_at"] is None  # SQLite wins, as for any invalid file
    assert sorted(k for k, _, _ in sync_events(db_path)) == ["rejected", "rejected"]


def test_a_deleted_file_whose_row_does_not_open_is_not_reported_restored(
    mem: DualMemory, args: list[str], mdir: Path, db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A row whose level column was edited does not open (TamperedRecord): the mirror
    # leaves its file alone and `verify --mirror` names the row. No test had such a row,
    # so a verify that also called its file edited by hand, and a mirror that reported
    # the deleted file restored (an audit event) while it wrote nothing, went unnoticed.
    put(mem, "creds", {"t": 1}, Level.PRIVATE)
    once(capsys, args, mdir)
    f = file_of(mdir, "creds", "agent:coder-1")
    with sqlite3.connect(db_path) as conn:
        conn.execute("UPDATE memory SET level = 3 WHERE scope = 'agent:coder-1'")
    conn.close()
    v = verify_mirror(capsys, args, mdir)
    assert len(v["problems"]) == 1, v["problems"]
    assert "agent:coder-1/creds.json: the SQLite row does not open" in v["problems"][0]
    f.unlink()
    out = once(capsys, args, mdir)
    assert "agent:coder-1/creds.json: not mirrored" in out and " 0 restored" in out, out
    assert not f.exists()
    assert sync_events(db_path) == []


def test_a_new_file_becomes_a_record_and_files_in_the_wrong_place_do_not(
    mem: DualMemory, args: list[str], mdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    put(mem, "seed", 0)
    once(capsys, args, mdir)
    new = file_of(mdir, "from-a-file")
    new.write_text(json.dumps({"scope": "swarm:s1", "key": "from-a-file", "level": 3, "value": 7}))
    misplaced = mdir / "swarm:s1" / "elsewhere.json"
    misplaced.write_text(json.dumps({"scope": "swarm:s1", "key": "other", "level": 3, "value": 8}))
    out = once(capsys, args, mdir)
    assert "imported swarm:s1/from-a-file.json" in out
    assert "do not belong at swarm:s1/elsewhere.json" in out
    assert mem.get("from-a-file", level=Level.SWARM, principal=CODER) == 7
    assert mem.get("other", level=Level.SWARM, principal=CODER) is None


def test_encrypted_records_are_mirrored_sealed(
    mem: DualMemory, args: list[str], mdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    put(mem, "token", {"t": SECRET}, Level.PRIVATE)
    put(mem, "token", {"t": SECRET}, Level.TEAM)
    root = Principal(agent_id="root", system=True)
    mem.sync(mem.put("token", {"t": SECRET}, level=Level.SYSTEM, principal=root), timeout=10)
    once(capsys, args, mdir)
    for scope in ("team:backend", "system"):  # every encrypted level, not only PRIVATE
        sealed = file_of(mdir, "token", scope)
        assert "envelope" in doc(sealed) and SECRET not in sealed.read_text(), scope
    f = file_of(mdir, "token", "agent:coder-1")
    assert "envelope" in doc(f) and SECRET not in f.read_text()
    # A hand edit may give a new value in the clear: it is sealed on the way in.
    d = doc(f)
    del d["envelope"]
    d["value"] = {"t": SECRET + "-rotated"}
    f.write_text(json.dumps(d))
    once(capsys, args, mdir)
    assert mem.get("token", level=Level.PRIVATE, principal=CODER) == {"t": SECRET + "-rotated"}
    assert SECRET not in f.read_text()  # written back sealed


def test_an_encrypted_records_hand_edit_is_in_no_event_and_not_in_the_state(
    make_mem: Callable[..., DualMemory], db_path: Path, mdir: Path, settings: Settings
) -> None:
    # What a save loses is kept in its event, and the save an import carries in the state,
    # for plaintext levels only: the audit log, sync_events and the state are not sealed.
    # No test had a conflict or an import in flight of an encrypted record, so a value
    # typed in the clear into its file could have been copied to all three unnoticed.
    mem = make_mem()
    put(mem, "token", {"t": 0}, Level.TEAM)
    put(mem, "note", {"n": 0}, Level.TEAM)
    token, note = (file_of(mdir, k, "team:backend") for k in ("token", "note"))
    with started_mirror(settings, mdir) as (rt, mirror):
        put(mem, "token", {"t": "agent"}, Level.TEAM)  # SQLite changes: a conflict
        mem.close(timeout=2)  # no worker: the import stays in flight
        write_value(token, {"t": SECRET + "-lost-in-a-conflict"})
        write_value(note, {"n": SECRET + "-imported"})
        report = cycle(mirror)
        assert (report.conflicts, report.imported) == (1, 1), report.events
        assert SECRET not in (mdir / STATE_FILE).read_text(encoding="utf-8")
        mem = make_mem()  # a worker again
        assert rt.wait(report.receipts, 10).committed == len(report.receipts)
    assert mem.get("note", level=Level.TEAM, principal=CODER) == {"n": SECRET + "-imported"}
    events = sync_events(db_path)
    assert sorted((kind, key) for kind, key, _ in events) == [
        ("conflict", "token"),
        ("imported", "note"),
    ]
    assert all("discarded" not in detail for _, _, detail in events)
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        details = [d for (d,) in conn.execute("SELECT detail FROM audit_log")]
    assert details and not any(SECRET in str(d) for d in details)


def test_an_expiry_edit_of_a_sealed_file_keeps_the_records_writer(
    mem: DualMemory, args: list[str], mdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The envelope names its writer: sent as the mirror's own, the kept envelope was
    # refused ("sealed by 'coder-1', not by its recorded writer 'mirror'").
    put(mem, "token", {"t": SECRET}, Level.PRIVATE)
    once(capsys, args, mdir)
    f = file_of(mdir, "token", "agent:coder-1")
    d = doc(f)
    expires = int(time.time() * 1000) + 3_600_000
    d["expires_at"] = expires
    f.write_text(json.dumps(d))
    out = once(capsys, args, mdir)
    assert "1 imported" in out and " 0 rejected" in out, out
    record = mem.get_record("token", level=Level.PRIVATE, principal=CODER)
    assert record is not None and record.value == {"t": SECRET}
    assert (record.owner, record.expires_at) == ("coder-1", expires)


def test_an_expiry_edit_made_before_a_rotation_reached_the_file_keeps_the_new_key(
    mem: DualMemory,
    make_mem: Callable[..., DualMemory],
    keyfile: Path,
    args: list[str],
    mdir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The file's envelope is the write the row holds, sealed before a rotation re-sealed
    # the row: imported as it was, it put the row back under the retired key.
    put(mem, "token", {"t": SECRET}, Level.PRIVATE)
    once(capsys, args, mdir)
    f = file_of(mdir, "token", "agent:coder-1")
    new = add_active_key(keyfile).active_id
    assert rotate_keys(make_mem(), timeout=30).done
    d = doc(f)
    assert envelope_key_id(base64.b64decode(str(d["envelope"]))) != new
    expires = int(time.time() * 1000) + 3_600_000
    d["expires_at"] = expires
    f.write_text(json.dumps(d))
    out = once(capsys, args, mdir)
    assert "1 imported" in out, out
    row = mem.store.get("agent:coder-1", "token", 0)
    assert row is not None and row.expires_at == expires and envelope_key_id(row.envelope) == new


def test_an_older_envelope_pasted_into_a_sealed_file_is_refused(
    mem: DualMemory, args: list[str], mdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Imported under the writer it names, the record's older envelope became a write its
    # writer never made, and the row went back to the older value.
    put(mem, "token", {"t": 1}, Level.PRIVATE)
    once(capsys, args, mdir)
    f = file_of(mdir, "token", "agent:coder-1")
    older = doc(f)["envelope"]
    put(mem, "token", {"t": 2}, Level.PRIVATE)
    once(capsys, args, mdir)
    d = doc(f)
    d["envelope"] = older
    f.write_text(json.dumps(d))
    out = once(capsys, args, mdir)
    assert " 1 rejected" in out and "not the record's current write" in out, out
    assert mem.get("token", level=Level.PRIVATE, principal=CODER) == {"t": 2}


def test_a_mirror_keeps_its_levels(
    mem: DualMemory, args: list[str], mdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    put(mem, "s", 1)
    put(mem, "p", 2, Level.PROJECT)
    run_cli(capsys, "mirror", *args, "--dir", str(mdir), "--once", "--level", "project")
    assert not file_of(mdir, "s").exists() and file_of(mdir, "p", "project:shop").exists()
    code, _, err = run_cli(
        capsys, "mirror", *args, "--dir", str(mdir), "--once", "--level", "swarm"
    )
    assert code == 2 and "mirrors levels [4]" in err
    not_a_dir = mdir / STATE_FILE
    code, _, err = run_cli(capsys, "mirror", *args, "--dir", str(not_a_dir), "--once")
    assert code == 2 and "is not a directory" in err


def test_a_file_of_a_level_the_mirror_does_not_keep_is_rejected_not_imported(
    mem: DualMemory, args: list[str], mdir: Path, db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # No test saved such a file: a mirror of --level project could have imported a swarm
    # record from a file saved by hand in its directory.
    put(mem, "p", 1, Level.PROJECT)
    project_only = ["mirror", *args, "--dir", str(mdir), "--once", "--level", "project"]
    assert run_cli(capsys, *project_only)[0] == 0
    stray = file_of(mdir, "s")
    stray.parent.mkdir(mode=0o700)
    stray.write_text(json.dumps({"scope": "swarm:s1", "key": "s", "level": 3, "value": 2}))
    code, out, err = run_cli(capsys, *project_only)
    assert code == 0 and "rejected swarm:s1/s.json: level SWARM is not mirrored here" in out, err
    mem.settle(10)
    assert mem.get("s", level=Level.SWARM, principal=CODER) is None
    assert doc(stray)["value"] == 2  # not the mirror's: left alone
    assert [(k, key) for k, key, _ in sync_events(db_path)] == [("rejected", "")]


def test_a_same_size_edit_right_after_a_write_is_still_seen(
    mem: DualMemory, args: list[str], mdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    put(mem, "n", 1)
    once(capsys, args, mdir)
    f = file_of(mdir, "n")
    stat = f.stat()
    f.write_text(f.read_text().replace('"value": 1', '"value": 2'))
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same mtime
    assert "imported" in once(capsys, args, mdir)
    assert mem.get("n", level=Level.SWARM, principal=CODER) == 2


def test_sealed_files_follow_a_key_rotation(
    make_mem: Callable[..., DualMemory],
    keyfile: Path,
    args: list[str],
    mdir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    put(make_mem(), "token", {"t": SECRET}, Level.PRIVATE)
    once(capsys, args, mdir)
    f = file_of(mdir, "token", "agent:coder-1")
    before = envelope_key_id(base64.b64decode(str(doc(f)["envelope"])))
    ring = Keyring.load(keyfile).with_new_key()
    ring.save(keyfile, overwrite=True)
    # A rotation re-seals rows in place: no journal entry, only its audit event.
    assert rotate_keys(make_mem(), timeout=30).done
    assert "1 written" in once(capsys, args, mdir)
    after = envelope_key_id(base64.b64decode(str(doc(f)["envelope"])))
    assert before != after == ring.active_id
    assert verify_mirror(capsys, args, mdir)["status"] == "ok"


def test_only_the_cycle_that_sees_a_key_rotation_compares_every_file(
    make_mem: Callable[..., DualMemory],
    keyfile: Path,
    mdir: Path,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A rotation re-seals rows with no journal entry, so the cycle that sees its audit
    # event compares every live record's file with SQLite; the cycles after it do not.
    # No test looked past that cycle: a mirror that never moved its audit position on
    # read every file again in every cycle, for good.
    mem = make_mem()
    put(mem, "token", {"t": SECRET}, Level.PRIVATE)
    put(mem, "plan", 1)
    Keyring.load(keyfile).with_new_key().save(keyfile, overwrite=True)
    with started_mirror(settings, mdir) as (_rt, mirror):
        assert rotate_keys(make_mem(), timeout=30).done
        assert cycle(mirror).written == 1  # the sealed file, re-sealed
        past = time.time_ns() - 10 * 10**9
        for f in (file_of(mdir, "token", "agent:coder-1"), file_of(mdir, "plan")):
            os.utime(f, ns=(past, past))  # read once more by the next scan, then settled
        cycle(mirror)
        read: list[str] = []
        real = Path.read_bytes

        def counted(path: Path) -> bytes:
            if path.suffix == ".json" and path.name != STATE_FILE:
                read.append(path.name)
            return real(path)

        monkeypatch.setattr(Path, "read_bytes", counted)
        report = cycle(mirror)
        monkeypatch.undo()
    assert (report.written, read) == (0, []), report.events


def test_a_running_mirror_seals_edits_with_the_key_a_rotation_made_active(
    make_mem: Callable[..., DualMemory],
    redis_url: str,
    db_path: Path,
    keyfile: Path,
    mdir: Path,
) -> None:
    # A long-running `dualmem mirror` loaded the key file once: after rotate-keys
    # --drop-retired it went on sealing imported edits with the dropped key, and those
    # records could no longer be opened by anyone (MissingKey).
    mem = make_mem()
    put(mem, "note", {"v": 1}, Level.TEAM)
    settings = Settings.load(
        {
            "redis_url": redis_url,
            "db_path": str(db_path),
            "keyring": str(keyfile),
            "keyring_reload_interval": 0.05,
        }
    )
    with started_mirror(settings, mdir) as (rt, mirror):
        f = file_of(mdir, "note", "team:backend")
        old = Keyring.load(keyfile)
        # The end state of a rotation with --drop-retired: only the new key is left.
        rotated = old.with_new_key()
        rotated.without_key(old.active_id).save(keyfile, overwrite=True)
        time.sleep(0.1)  # past keyring_reload_interval
        write_value(f, {"v": 2})
        report = cycle(mirror)
        assert report.imported == 1
        rt.wait(report.receipts, 10)
    with sqlite3.connect(db_path) as conn:
        (env,) = conn.execute(
            "SELECT envelope FROM memory WHERE scope = 'team:backend' AND key = 'note'"
        ).fetchone()
    conn.close()
    assert envelope_key_id(bytes(env)) == rotated.active_id
    reader = make_mem()
    assert reader.get("note", level=Level.TEAM, principal=CODER) == {"v": 2}


@pytest.mark.parametrize("events_reply", ["kept", "lost"])
def test_edits_sealed_under_a_key_being_dropped_wait_for_the_next_cycle(
    make_mem: Callable[..., DualMemory],
    db_path: Path,
    keyfile: Path,
    mdir: Path,
    raw_redis: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    settings: Settings,
    events_reply: str,
) -> None:
    # A cycle seals hand edits, then sends them; a drop of that key in between left them
    # committed under a key no longer in the key file. Now the send refuses and the next
    # cycle seals the same edits again with the active key. The cycle's other events go
    # in a send of their own; its reply lost ("lost"), they were sent with no record of
    # it, and the next cycle judged the same files again: a second conflict event.
    from dualmem.keyuse import clear_dropping, mark_dropping

    mem = make_mem()
    put(mem, "note", {"v": 1}, Level.TEAM)
    put(mem, "plain", {"v": 1})
    with started_mirror(settings, mdir) as (rt, mirror):
        f = file_of(mdir, "note", "team:backend")
        # A conflict in the same cycle: its file goes back to SQLite's value, and its
        # event (which holds the discarded hand edit) must survive the refusal.
        plain = file_of(mdir, "plain")
        write_value(plain, {"v": "by hand"})
        put(mem, "plain", {"v": 2})
        write_value(f, {"v": 2})
        old = rt.codec.keyring.active_id  # type: ignore[union-attr]
        real_scan = Mirror._scan_edits

        def then_a_rotation(self: Mirror, *args: Any) -> None:
            real_scan(self, *args)  # sealed with the old key
            add_active_key(keyfile)
            mark_dropping(raw_redis, "dualmem", [old], ttl=60)

        monkeypatch.setattr(Mirror, "_scan_edits", then_a_rotation)
        if events_reply == "kept":
            report = cycle(mirror)
            monkeypatch.undo()
            assert any("not sent" in e for e in report.events) and report.conflicts == 1
            assert report.imported == 0  # the refused import is not reported as one
            rt.wait(report.receipts, 10)
        else:
            real_send = Runtime.send

            def refused_then_reply_lost(self: Runtime, *args: Any, **kwargs: Any) -> Any:
                real_send(self, *args, **kwargs)  # the first raises KeyDropped
                raise StoreUnavailable("send commands: the reply was lost (it may have run)")

            monkeypatch.setattr(Runtime, "send", refused_then_reply_lost)
            with pytest.raises(StoreUnavailable):
                cycle(mirror)
            monkeypatch.undo()
        wait_until(lambda: len(sync_events(db_path)) == 1, timeout=10)
        assert [(k, key) for k, key, _ in sync_events(db_path)] == [("conflict", "plain")]
        drop_keys(keyfile, [old])
        clear_dropping(raw_redis, "dualmem")
        report = cycle(mirror)
        assert (report.imported, report.conflicts) == (1, 0), report.events
        rt.wait(report.receipts, 10)
        assert doc(plain)["value"] == {"v": 2}  # SQLite's, the conflict's outcome
    assert [(k, key) for k, key, _ in sync_events(db_path)] == [
        ("conflict", "plain"),
        ("imported", "note"),
    ]
    reader = make_mem(keyring=Keyring.load(keyfile))  # has never seen the old key
    assert reader.get("note", level=Level.TEAM, principal=CODER) == {"v": 2}


def test_operator_commands_never_migrate_behind_your_back(
    tmp_path: Path, mdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = tmp_path / "old.db"
    shutil.copyfile(Path(__file__).parent / "data" / "schema_v1.db", old)
    for argv in (
        ["mirror", "--dir", str(mdir), "--once"],
        ["dlq", "replay", "--all"],
        ["dlq", "list"],
    ):
        code, _, err = run_cli(capsys, *argv, "--db", str(old), "--redis-url", "memory://old")
        assert code == 2 and "run `dualmem migrate" in err, argv
    with sqlite3.connect(old) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (1,)


def test_an_operator_command_with_a_wrong_db_never_takes_the_deployments_commands(
    make_mem: Callable[..., DualMemory],
    redis_url: str,
    keyfile: Path,
    tmp_path: Path,
    mdir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A mistyped --db was created, and the command's in-process worker joined the
    # deployment's consumer group: it committed the deployment's acknowledged puts into
    # the new file and acknowledged them there; the real database never got them.
    writer = make_mem(worker=False)  # the deployment, its worker restarting
    receipts = [writer.put(f"k{i}", i, level=Level.SWARM, principal=CODER) for i in range(20)]
    wrong = tmp_path / "typo.db"
    out = tmp_path / "out.jsonl"
    common = ["--redis-url", redis_url, "--db", str(wrong), "--keyring", str(keyfile)]
    for argv in (
        ["mirror", "--dir", str(mdir), "--once"],
        ["dlq", "replay", "--all"],
        ["export", "--out", str(out), "--decrypt", "--as", CODER.agent_id],
    ):
        code, _, err = run_cli(capsys, *argv, *common)
        assert code == 2 and f"no database at {wrong}" in err, (argv, err)
    assert not wrong.exists() and not mdir.exists() and not out.exists()
    worker = make_mem()  # the deployment's worker is back: every put is still its own
    for r in receipts:
        worker.sync(r, timeout=10)
    assert worker.get("k19", level=Level.SWARM, principal=CODER) == 19


def test_a_refused_import_keeps_its_hand_edit_when_the_cycle_refreshes_every_file(
    make_mem: Callable[..., DualMemory],
    db_path: Path,
    mdir: Path,
    raw_redis: redis.Redis,
    settings: Settings,
) -> None:
    # After a key rotation a cycle rewrites every file from SQLite: the file just edited
    # by hand was rewritten too, before its import was sent; the send was refused, and
    # the edit was gone with no event.
    from dualmem.keyuse import clear_dropping, mark_dropping

    mem = make_mem()
    put(mem, "note", {"v": 1}, Level.TEAM)
    with started_mirror(settings, mdir) as (rt, mirror):
        ops = Principal(agent_id="ops", system=True)
        mem.sync(mem.audit("key_rotation", principal=ops, detail={"done": True}), timeout=10)
        f = file_of(mdir, "note", "team:backend")
        write_value(f, {"v": "by hand"})
        active = rt.codec.keyring.active_id  # type: ignore[union-attr]
        mark_dropping(raw_redis, "dualmem", [active], ttl=60)
        report = cycle(mirror)
        assert any("not sent" in e for e in report.events)
        assert doc(f)["value"] == {"v": "by hand"}  # still there
        clear_dropping(raw_redis, "dualmem")
        report = cycle(mirror)
        assert report.imported == 1
        rt.wait(report.receipts, 10)
    assert mem.get("note", level=Level.TEAM, principal=CODER) == {"v": "by hand"}


def test_a_record_deleted_in_a_cycle_that_sees_a_key_rotation_loses_its_file(
    make_mem: Callable[..., DualMemory],
    keyfile: Path,
    args: list[str],
    mdir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # After a rotation the cycle rewrote every live record's file instead of the records
    # the journal changed: the file of a record deleted since the last cycle stayed.
    mem = make_mem()
    put(mem, "token", {"t": SECRET}, Level.PRIVATE)
    put(mem, "gone", 1)
    once(capsys, args, mdir)
    Keyring.load(keyfile).with_new_key().save(keyfile, overwrite=True)
    assert rotate_keys(make_mem(), timeout=30).done
    mem.sync(mem.delete("gone", level=Level.SWARM, principal=CODER), timeout=10)
    assert "1 removed" in once(capsys, args, mdir)
    assert not file_of(mdir, "gone").exists()
    assert verify_mirror(capsys, args, mdir)["status"] == "ok"


def test_a_save_made_while_the_cycle_sends_is_not_overwritten(
    make_mem: Callable[..., DualMemory],
    db_path: Path,
    mdir: Path,
    settings: Settings,
) -> None:
    # A conflict's rewrite from SQLite waits until the cycle's events are sent; it wrote
    # the file whatever it held by then, so a save made meanwhile was in no file, no row
    # and no event. It is now left for the next cycle, which judges it (made without
    # the agent's change in view: a conflict too, the save in its event).
    mem = make_mem()
    put(mem, "cfg", {"v": 0})
    f = file_of(mdir, "cfg")
    with started_mirror(settings, mdir) as (rt, mirror):
        put(mem, "cfg", {"v": "agent"})  # SQLite changes...
        write_value(f, {"v": 1})  # ... and the file: a conflict
        send = rt.send

        def save_then_send(*args: Any, **kwargs: Any) -> Any:
            write_value(f, {"v": 2})  # saved while the cycle sends
            return send(*args, **kwargs)

        rt.send = save_then_send  # type: ignore[method-assign]
        first = cycle(mirror)
        rt.send = send  # type: ignore[method-assign]
        assert first.conflicts == 1 and doc(f)["value"] == {"v": 2}, first.events
        rt.wait(first.receipts, 10)
        second = cycle(mirror)
        assert second.conflicts == 1 and doc(f)["value"] == {"v": "agent"}, second.events
        rt.wait(second.receipts, 10)
    saves = [d["discarded"] for kind, key, d in sync_events(db_path) if kind == "conflict"]
    assert [json.loads(str(s))["value"] for s in saves] == [{"v": 1}, {"v": 2}]


def test_a_file_write_failing_after_the_send_sends_nothing_twice(
    make_mem: Callable[..., DualMemory],
    db_path: Path,
    mdir: Path,
    monkeypatch: pytest.MonkeyPatch,
    settings: Settings,
) -> None:
    # Files are written once the cycle's imports and events are sent; a write failing
    # then (a full disk) ended the cycle before the state was saved, and the restarted
    # mirror sent the imports again. The state is now saved right after the send.
    import dualmem.ops.mirror as mirror_module

    mem = make_mem()
    put(mem, "cfg", {"v": 0})
    put(mem, "other", {"v": 0})
    mem.close(timeout=2)  # no worker: the import stays in flight
    f, other = file_of(mdir, "cfg"), file_of(mdir, "other")
    with started_mirror(settings, mdir) as (rt, mirror):
        agent = make_mem(worker=False)
        commit_through(rt, agent.put("cfg", {"v": "agent"}, level=Level.SWARM, principal=CODER))
        write_value(f, {"v": 1})  # a conflict: rewritten after the send
        write_value(other, {"v": 1})  # an import
        real = mirror_module._atomic_write

        def full_disk(path: Path, data: bytes, **kwargs: Any) -> None:
            if path == f:
                raise OSError(28, "No space left on device", str(path))
            real(path, data, **kwargs)

        monkeypatch.setattr(mirror_module, "_atomic_write", full_disk)
        with pytest.raises(OSError):
            cycle(mirror)
        monkeypatch.setattr(mirror_module, "_atomic_write", real)
        again = Mirror(rt, mdir).cycle(now_ms())  # restarted
        assert again.imported == 0 and doc(f)["value"] == {"v": "agent"}, again.events
    worker = make_mem()
    worker.settle(10)
    events = [(kind, key) for kind, key, _ in sync_events(db_path)]
    assert events.count(("imported", "other")) == 1
    assert events.count(("conflict", "cfg")) == 1  # judged once, rewritten by the next cycle
    assert worker.get("other", level=Level.SWARM, principal=CODER) == {"v": 1}


def test_a_file_put_back_while_the_cycle_sends_is_still_rewritten(
    make_mem: Callable[..., DualMemory],
    db_path: Path,
    mdir: Path,
    settings: Settings,
) -> None:
    # The conflict's rewrite was skipped for a file saved again during the send; when
    # that save put back the bytes the mirror had written, no later cycle saw a change,
    # and the file kept the old value for good. It stays to be rewritten (`recheck`).
    mem = make_mem()
    put(mem, "cfg", {"v": 0})
    f = file_of(mdir, "cfg")
    with started_mirror(settings, mdir) as (rt, mirror):
        original = f.read_bytes()
        put(mem, "cfg", {"v": "agent"})
        write_value(f, {"v": 1})  # a conflict
        send = rt.send

        def undo_then_send(*args: Any, **kwargs: Any) -> Any:
            f.write_bytes(original)  # the edit undone while the cycle sends
            return send(*args, **kwargs)

        rt.send = undo_then_send  # type: ignore[method-assign]
        first = cycle(mirror)
        rt.send = send  # type: ignore[method-assign]
        assert first.conflicts == 1 and doc(f)["value"] == {"v": 0}
        rt.wait(first.receipts, 10)
        cycle(mirror)
        assert doc(f)["value"] == {"v": "agent"}


@pytest.mark.parametrize("then", ["same", "restarted"])
def test_a_failed_imports_file_goes_back_after_a_failed_file_write(
    make_mem: Callable[..., DualMemory],
    db_path: Path,
    mdir: Path,
    monkeypatch: pytest.MonkeyPatch,
    then: str,
    settings: Settings,
) -> None:
    # The cycle that sent a dead-lettered import's failed event saved its state, then
    # failed to write the file back (a full disk): no later cycle rewrote it, and the
    # file showed a save SQLite never got, for good.
    import dualmem.ops.mirror as mirror_module

    mem = make_mem(max_deliveries=1)
    put(mem, "cfg", {"v": 0})
    f = file_of(mdir, "cfg")
    with started_mirror(settings, mdir) as (rt, mirror):
        refuse_inserts(db_path, "NEW.key = 'cfg'")
        write_value(f, {"v": 1})
        assert rt.wait(cycle(mirror).receipts, 10).dead == 1
        real = mirror_module._atomic_write

        def full_disk(path: Path, data: bytes, **kwargs: Any) -> None:
            if path == f:
                raise OSError(28, "No space left on device", str(path))
            real(path, data, **kwargs)

        monkeypatch.setattr(mirror_module, "_atomic_write", full_disk)
        with pytest.raises(OSError):
            cycle(mirror)  # the failed event sent, no file write
        monkeypatch.setattr(mirror_module, "_atomic_write", real)
        again = mirror if then == "same" else Mirror(rt, mdir)
        again.cycle(now_ms())
        assert doc(f)["value"] == {"v": 0}
    assert event_kinds(db_path, "cfg").count("failed") == 1


def cycle_losing_its_reply(
    mirror: Mirror, monkeypatch: pytest.MonkeyPatch, *, sent: bool = True
) -> None:
    """One cycle whose send raises ``StoreUnavailable`` as a lost reply does: after its
    transaction reached Redis (``sent``), or before anything was written."""
    real = Runtime.send

    def send(self: Runtime, *args: Any, **kwargs: Any) -> Any:
        if sent:
            real(self, *args, **kwargs)
        raise StoreUnavailable("send commands: the reply was lost (it may have run)")

    monkeypatch.setattr(Runtime, "send", send)
    try:
        with pytest.raises(StoreUnavailable):
            cycle(mirror)
    finally:
        monkeypatch.undo()


@pytest.mark.real_redis
@pytest.mark.parametrize("before_restart", ["in flight", "committed and trimmed"])
def test_a_mirror_killed_between_its_send_and_its_state_save_knows_its_imports(
    redis_server: RedisServer, db_path: Path, keyfile: Path, mdir: Path, before_restart: str
) -> None:
    # Killed (SIGKILL) after its imports reached the stream and before the state naming
    # their stream ids was saved, a restarted mirror read the files as new saves: it
    # imported them again, and once the first copy was read from the journal the file's
    # next save was "conflict: SQLite changed too; SQLite wins", and lost.
    redis_server.client().flushall()
    url = redis_server.url
    settings = settings_for(url, db_path, keyfile)
    mem = DualMemory(redis_url=url, db_path=str(db_path), keyring=str(keyfile))
    put(mem, "cfg", {"v": 0})
    put(mem, "token", {"t": SECRET}, Level.TEAM)
    mem.close(timeout=5)  # no worker: the imports stay in the stream
    with started_mirror(settings, mdir):
        pass
    f, sealed = file_of(mdir, "cfg"), file_of(mdir, "token", "team:backend")
    write_value(f, {"v": 1})
    d = doc(sealed)
    d["expires_at"] = int(time.time() * 1000) + 3_600_000  # an expiry edit of a sealed file
    sealed.write_text(json.dumps(d), encoding="utf-8")
    child = (
        "import os, signal, time\n"
        "from dualmem.ops.mirror import Mirror\n"
        "from dualmem.ops.runtime import Runtime\n"
        "from dualmem.settings import Settings\n"
        "real = Runtime.send\n"
        "def send(self, *args, **kwargs):\n"
        "    real(self, *args, **kwargs)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)  # sent; the state not saved yet\n"
        "Runtime.send = send\n"
        f"settings = Settings.load({{'redis_url': {url!r}, 'db_path': {str(db_path)!r},"
        f" 'keyring': {str(keyfile)!r}}})\n"
        "with Runtime(settings, worker=False) as rt:\n"
        f"    Mirror(rt, {str(mdir)!r}).cycle(int(time.time() * 1000))\n"
    )
    done = subprocess.run([sys.executable, "-c", child], timeout=120, check=False)
    assert done.returncode == -signal.SIGKILL
    assert (mdir / SENDING_FILE).exists()
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        check = check_mirror(conn, mdir, now_ms())
    assert any("ended during its send" in p for p in check.problems), check.problems
    raw = redis_server.client()
    worker: DualMemory | None = None
    try:
        if before_restart == "committed and trimmed":
            worker = DualMemory(redis_url=url, db_path=str(db_path), keyring=str(keyfile))
            worker.settle(10)
            for stream in raw.keys("*:cmd"):
                raw.xtrim(stream, maxlen=0)  # found in the journal, not in the stream
            # Saved before the restarted mirror read that commit: its own import, no change
            # in SQLite to defend the save against.
            write_value(f, {"v": 2})
        with Runtime(settings, worker=False) as rt:
            mirror = Mirror(rt, mdir)
            restarted = cycle(mirror)
            assert not (mdir / SENDING_FILE).exists()
            if before_restart == "in flight":
                assert (restarted.imported, restarted.conflicts) == (0, 0), restarted.events
                ids = {rel: e.get("sent", []) for rel, e in mirror.state.files.items()}
                assert len(ids["swarm:s1/cfg.json"]) == len(ids["team:backend/token.json"]) == 1
                worker = DualMemory(redis_url=url, db_path=str(db_path), keyring=str(keyfile))
                worker.settle(10)
                assert cycle(mirror).conflicts == 0
                write_value(f, {"v": 2})
                restarted = cycle(mirror)
            assert (restarted.imported, restarted.conflicts) == (1, 0), restarted.events
            rt.wait(restarted.receipts, 10)
            assert worker is not None
        assert worker.get("cfg", level=Level.SWARM, principal=CODER) == {"v": 2}
        assert worker.get("token", level=Level.TEAM, principal=CODER) == {"t": SECRET}
        assert event_kinds(db_path, "cfg") == ["imported", "imported"]
    finally:
        raw.close()
        if worker is not None:
            worker.close(timeout=5)
    assert event_kinds(db_path, "token") == ["imported"]


def test_a_send_whose_reply_was_lost_is_looked_for_before_anything_is_sent_again(
    make_mem: Callable[..., DualMemory],
    raw_redis: redis.Redis,
    db_path: Path,
    mdir: Path,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A send that raised after the transaction reached Redis (the reply lost) was taken
    # for one that sent nothing: the next cycle imported the save again, and its next
    # save was a conflict with the first copy. One that raised before sending must be
    # sent again, and a found import the worker dead-lettered is a failed event.
    mem = make_mem(max_deliveries=1)
    for k in ("cfg", "unsent", "poisoned"):
        put(mem, k, {"v": 0})
    mem.close(timeout=5)  # no worker: commands commit when the test says
    f, unsent, poisoned = (file_of(mdir, k) for k in ("cfg", "unsent", "poisoned"))

    with started_mirror(settings, mdir) as (rt, mirror):
        write_value(f, {"v": 1})
        cycle_losing_its_reply(mirror, monkeypatch)
        found = cycle(mirror)
        assert (found.imported, found.conflicts) == (0, 0), found.events
        # Refused before it was sent: nothing to find, the next cycle sends the save.
        write_value(unsent, {"v": 1})
        cycle_losing_its_reply(mirror, monkeypatch, sent=False)
        assert cycle(mirror).imported == 1
        # Dead-lettered (and trimmed from its stream) before the next cycle looked.
        refuse_inserts(db_path, "NEW.key = 'poisoned'")
        write_value(poisoned, {"v": 1, "note": "never committed"})
        cycle_losing_its_reply(mirror, monkeypatch)
        worker = make_mem(max_deliveries=1)
        worker.settle(10)
        for stream in raw_redis.keys("*:cmd"):
            raw_redis.xtrim(stream, maxlen=0)
        failed = cycle(mirror)
        assert (failed.imported, failed.failed) == (0, 1), failed.events
        rt.wait(failed.receipts, 10)
        allow_inserts(db_path)
        write_value(f, {"v": 2})
        last = cycle(mirror)
        assert (last.imported, last.conflicts) == (1, 0), last.events
        rt.wait(last.receipts, 10)
        assert not (mdir / SENDING_FILE).exists()
    assert worker.get("cfg", level=Level.SWARM, principal=CODER) == {"v": 2}
    assert worker.get("unsent", level=Level.SWARM, principal=CODER) == {"v": 1}
    assert event_kinds(db_path, "cfg") == ["imported", "imported"]
    assert event_kinds(db_path, "unsent") == ["imported"]
    assert event_kinds(db_path, "poisoned") == ["imported", "failed"]
    # The save the found import carried, kept with its id (it was in no saved state).
    (detail,) = failed_events(db_path, "poisoned")
    assert "never committed" in str(detail["discarded"])


def test_an_import_missing_from_a_send_found_after_a_lost_reply_is_sent_again(
    make_mem: Callable[..., DualMemory],
    db_path: Path,
    mdir: Path,
    raw_redis: redis.Redis,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A send found by its event while its import is nowhere (its entry lost from the
    # stream): the import did not arrive, and its file's entry goes back to what it was.
    # No test lost part of a send, so a mirror that took the import for sent went
    # unnoticed: the save was then in no import and no failed event.
    mem = make_mem()
    put(mem, "cfg", {"v": 0})
    mem.close(timeout=2)  # no worker: the send stays in the stream
    f = file_of(mdir, "cfg")
    with started_mirror(settings, mdir) as (rt, mirror):
        write_value(f, {"v": 1})
        cycle_losing_its_reply(mirror, monkeypatch)
        (stream,) = raw_redis.keys("*:cmd")
        entries: Any = raw_redis.xrange(stream)  # redis-py's xrange is loosely typed
        *_, (sid, _) = [e for e in entries if (e[1][b"op"], e[1][b"k"]) == (b"put", b"cfg")]
        assert raw_redis.xdel(stream, sid) == 1  # the import lost, its event there
        again = cycle(mirror)
        assert (again.imported, again.failed) == (1, 0), again.events
        make_mem()  # a worker again
        rt.wait(again.receipts, 10)
    assert make_mem().get("cfg", level=Level.SWARM, principal=CODER) == {"v": 1}


def test_a_send_that_never_went_is_not_taken_for_an_older_dead_letter_of_its_file(
    make_mem: Callable[..., DualMemory],
    db_path: Path,
    mdir: Path,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A lost send is looked for by record and by the time the send stamped on its
    # commands. No test had an older dead letter of the same file, so a look that
    # matched by record alone went unnoticed: it took that letter for the send that
    # never went, reported it failed again and dropped the new save.
    mem = make_mem(max_deliveries=1)
    put(mem, "cfg", {"v": 0})
    f = file_of(mdir, "cfg")
    with started_mirror(settings, mdir) as (rt, mirror):
        a_failed_import(rt, mirror, db_path, f, {"v": 1})
        write_value(f, {"v": 2})
        cycle_losing_its_reply(mirror, monkeypatch, sent=False)
        again = cycle(mirror)
        assert (again.imported, again.failed) == (1, 0), again.events
        rt.wait(again.receipts, 10)
    assert mem.get("cfg", level=Level.SWARM, principal=CODER) == {"v": 2}
    assert event_kinds(db_path, "cfg") == ["imported", "failed", "imported"]


def test_a_conflict_whose_send_never_went_is_judged_and_reported_by_the_next_cycle(
    make_mem: Callable[..., DualMemory],
    db_path: Path,
    mdir: Path,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A send that ended before anything reached Redis leaves its sending file, and the
    # next cycle finds none of it: the state saved before stands. No test lost a send
    # that carried only a conflict, so a mirror that adopted the lost cycle's state
    # anyway went unnoticed: the file counted as reported, was rewritten from SQLite
    # unjudged, and the conflicting save was in no event.
    mem = make_mem()
    put(mem, "cfg", {"v": 0})
    f = file_of(mdir, "cfg")
    with started_mirror(settings, mdir) as (rt, mirror):
        put(mem, "cfg", {"v": "agent"})
        write_value(f, {"v": 1, "note": "conflicting save"})
        cycle_losing_its_reply(mirror, monkeypatch, sent=False)
        assert (mdir / SENDING_FILE).exists()
        assert doc(f)["value"] == {"v": 1, "note": "conflicting save"}  # not rewritten
        again = cycle(mirror)
        assert again.conflicts == 1, again.events
        rt.wait(again.receipts, 10)
        assert doc(f)["value"] == {"v": "agent"}  # SQLite wins, once the event is sent
    ((kind, key, detail),) = sync_events(db_path)
    assert (kind, key) == ("conflict", "cfg")
    assert "conflicting save" in str(detail["discarded"])


@pytest.mark.parametrize("sending_file", ["with the stream tops", "from before they were kept"])
def test_the_look_for_a_lost_send_reads_its_streams_from_where_the_send_began(
    make_mem: Callable[..., DualMemory],
    db_path: Path,
    mdir: Path,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    sending_file: str,
) -> None:
    # The look read every stream the send wrote to from its first entry: with the worker
    # down, the whole backlog, once per cycle that lost its reply. The send's entries can
    # only come after the last entry each stream held before it, which the sending file
    # now records; a file written before that was recorded is still read whole.
    backlog = 2_500
    mem = make_mem()
    put(mem, "cfg", {"v": 0})
    mem.close(timeout=5)
    writer = make_mem(worker=False)  # no worker: the backlog stays in the stream
    with started_mirror(settings, mdir) as (rt, mirror):
        for i in range(backlog):
            writer.put(f"noise/{i}", {"i": i}, level=Level.SWARM, principal=CODER)
        write_value(file_of(mdir, "cfg"), {"v": 1})
        (stream,) = rt.client.keys("*:cmd")
        top = text(rt.client.xrevrange(stream, "+", "-", count=1)[0][0])
        cycle_losing_its_reply(mirror, monkeypatch)
        sending = json.loads((mdir / SENDING_FILE).read_text(encoding="utf-8"))
        assert sending["after"] == {text(stream): top}
        if sending_file == "from before they were kept":
            del sending["after"]
            (mdir / SENDING_FILE).write_text(json.dumps(sending), encoding="utf-8")
        read: list[int] = []
        real_xrange = rt.client.xrange

        def xrange(*args: Any, **kwargs: Any) -> Any:
            page = real_xrange(*args, **kwargs)
            read.append(len(page))
            return page

        monkeypatch.setattr(rt.client, "xrange", xrange)
        found = cycle(mirror)
        monkeypatch.undo()
        assert (found.imported, found.conflicts) == (0, 0), found.events
        assert not (mdir / SENDING_FILE).exists()
        assert len(mirror.state.files["swarm:s1/cfg.json"]["sent"]) == 1
        if sending_file == "with the stream tops":
            assert 0 < sum(read) < 5  # the send's own entries, nothing before them
        else:
            assert sum(read) > backlog
    make_mem().settle(30)
    assert event_kinds(db_path, "cfg") == ["imported"]


@pytest.mark.parametrize("found", ["in the stream", "committed and trimmed"])
def test_a_cycle_that_sent_only_events_and_lost_its_reply_reports_them_once(
    make_mem: Callable[..., DualMemory],
    db_path: Path,
    mdir: Path,
    raw_redis: redis.Redis,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    found: str,
) -> None:
    # A cycle with no import (a conflict, a rejection, a restore) that ended after its
    # send and before its state save had nothing to look for: the next cycle judged the
    # same files again and sent every event a second time. Events committed and gone
    # from the stream are found in the sync events (no test trimmed them before).
    mem = make_mem()
    for k in ("cfg", "bad", "gone"):
        put(mem, k, {"v": 0})
    f, bad, gone = (file_of(mdir, k) for k in ("cfg", "bad", "gone"))

    with started_mirror(settings, mdir) as (_, mirror):
        put(mem, "cfg", {"v": "agent"})  # committed; the mirror has not read it yet
        write_value(f, {"v": 1, "note": "conflicting save"})
        bad.write_text('{"rejected save": ', encoding="utf-8")
        gone.unlink()
        cycle_losing_its_reply(mirror, monkeypatch)
        if found == "committed and trimmed":
            mem.settle(10)
            for stream in raw_redis.keys("*:cmd"):
                raw_redis.xtrim(stream, maxlen=0)
        again = cycle(mirror)
        assert (again.conflicts, again.rejected, again.restored) == (0, 0, 0), again.events
        assert doc(f)["value"] == {"v": "agent"} and doc(bad)["value"] == {"v": 0}
        assert doc(gone)["value"] == {"v": 0}
        assert not mirror.state.reported and not (mdir / SENDING_FILE).exists()
    mem.settle(10)
    kinds = sorted((kind, key) for kind, key, _ in sync_events(db_path))
    assert kinds == [("conflict", "cfg"), ("rejected", "bad"), ("restored", "gone")]


def test_follow_tells_where_a_command_went(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "m.db")
    fields = redis_fields(put_fields("swarm:s", "k", Level.SWARM, "a", 1000, b"\x01\x00v", None))

    def letter(sid: str, replayed_as: str | None = None, *, replayed: bool = True) -> int:
        store.dead_letter([(StreamEntry(0, sid, fields), f"poisoned {sid}", 3)])
        (d,) = [d for d in store.dead_letters(include_replayed=True) if d.stream_id == sid]
        if replayed:
            store.mark_replayed([d.id], None if replayed_as is None else [replayed_as])
        return d.id

    try:
        dead = letter("2-0", replayed=False)
        letter("3-0")  # replayed before schema 4: under an id not recorded
        letter("4-0", "5-0")
        for ms in range(100, 116):  # 16 dead letters, each replayed as the next id
            letter(f"{ms}-0", f"{ms + 1}-0")
        tail = letter("116-0", replayed=False)
        with contextlib.closing(sqlite3.connect(tmp_path / "m.db")) as conn:
            assert _follow(conn, 0, "1-0") == ("1-0", None)
            assert _follow(conn, 1, "2-0") == ("2-0", None)  # another shard's letter
            assert _follow(conn, 0, "2-0") == (None, (dead, "poisoned 2-0"))
            # The dead letters alone tell it: a commit of the same id is not looked for.
            store.apply([StreamEntry(0, "2-0", fields)])
            assert _follow(conn, 0, "2-0") == (None, (dead, "poisoned 2-0"))
            assert _follow(conn, 0, "3-0") == (None, None)
            assert _follow(conn, 0, "4-0") == ("5-0", None)
            # The replay after the 16th dead letter is not looked at.
            assert _follow(conn, 0, "100-0") == ("116-0", None)
            assert _follow(conn, 0, "101-0") == (None, (tail, "poisoned 116-0"))
    finally:
        store.close()
