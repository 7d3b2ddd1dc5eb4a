"""Fixtures: a real redis-server on a free loopback port, and every storage test run on
both fakeredis and that server."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import redis

from acl import Keyring, Principal
from bench.servers import RedisServer, free_port
from dualmem import DualMemory
from dualmem.redis_backend import drop_memory_server
from dualmem.settings import Settings
from dualmem.worker import Worker

__all__ = [
    "REFUSED",
    "RedisServer",
    "allow_inserts",
    "free_port",
    "redis_fields",
    "refuse_inserts",
    "wait_until",
]

REDIS_SERVER = shutil.which("redis-server")
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
#: A test still running after this many seconds has hung (the slowest take well under a
#: minute; ``TEST_HANG_SECONDS`` overrides it). It fails where it hangs, every thread's
#: stack in its captured stderr, and the run goes on: CI fails instead of waiting for
#: its own time limit (a change that made a paged query loop forever hung the suite).
HANG_SECONDS = float(os.environ.get("TEST_HANG_SECONDS", "300"))
#: The signal the watchdog sends the main thread: a real-time one no test or code uses.
_HANG_SIGNAL = signal.SIGRTMIN + 2 if hasattr(signal, "SIGRTMIN") else None


def _require_redis_server() -> None:
    if REDIS_SERVER is None:
        msg = "redis-server is not installed (apt-get install redis-server)"
        if IN_CI:
            pytest.fail(f"{msg}: CI must test against a real Redis", pytrace=False)
        pytest.skip(msg)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the session (tests flush it before use)."""
    _require_redis_server()
    srv = RedisServer(tmp_path_factory.mktemp("redis"))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def own_redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server for one test, free to stop, kill and restart."""
    _require_redis_server()
    srv = RedisServer(tmp_path / "redis")
    srv.start()
    yield srv
    srv.stop()
    srv.kill()


@pytest.fixture(params=["fakeredis", "redis"])
def backend(request: pytest.FixtureRequest) -> str:
    """The backend name; tests that take ``redis_url`` run once on each."""
    return str(request.param)


@pytest.fixture
def redis_url(backend: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """``memory://<unique>`` (fakeredis) or the real server's URL, empty at start."""
    if backend == "fakeredis":
        url = f"memory://test-{uuid.uuid4().hex}"
        yield url
        drop_memory_server(url)
    else:
        srv: RedisServer = request.getfixturevalue("redis_server")
        srv.client().flushall()
        yield srv.url


@pytest.fixture
def raw_redis(redis_url: str) -> redis.Redis:
    """A plain client on the same Redis as ``redis_url`` (to inspect or tamper)."""
    if redis_url.startswith("memory://"):
        import fakeredis

        from dualmem.redis_backend import memory_server

        return fakeredis.FakeRedis(server=memory_server(redis_url).server)
    return redis.Redis.from_url(redis_url)


@pytest.fixture
def keyfile(tmp_path: Path) -> Path:
    path = tmp_path / "keys.json"
    Keyring.generate().save(path)
    return path


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "mem.db"


@pytest.fixture
def make_mem(redis_url: str, db_path: Path, keyfile: Path) -> Iterator[Callable[..., DualMemory]]:
    """Factory of DualMemory instances on this test's Redis and database; all are closed."""
    made: list[DualMemory] = []

    def make(**kwargs: Any) -> DualMemory:
        kwargs.setdefault("redis_url", redis_url)
        kwargs.setdefault("db_path", str(db_path))
        kwargs.setdefault("keyring", str(keyfile))
        mem = DualMemory(**kwargs)
        made.append(mem)
        return mem

    yield make
    for mem in made:
        mem.close(timeout=2)


@pytest.fixture
def mem(make_mem: Callable[..., DualMemory]) -> DualMemory:
    return make_mem()


@pytest.fixture
def ops_settings(redis_url: str, db_path: Path, keyfile: Path) -> Settings:
    """Settings of this test's Redis, database and key file, for an operator command's
    ``Runtime`` (``with Runtime(ops_settings, worker=False) as rt:``)."""
    return Settings.load({"redis_url": redis_url, "db_path": str(db_path), "keyring": str(keyfile)})


@pytest.fixture
def coder() -> Principal:
    return Principal(agent_id="coder-1", team="backend", swarm="phase-1-auth", project="shop")


@pytest.fixture
def other() -> Principal:
    return Principal(agent_id="coder-2", team="frontend", swarm="phase-2-ui", project="shop")


@pytest.fixture
def system() -> Principal:
    return Principal(agent_id="orchestrator", system=True)


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(0.01)


def redis_fields(fields: Mapping[bytes, bytes | str | int]) -> dict[bytes, bytes]:
    """A stream entry's fields as Redis returns them (every value bytes), e.g. of
    ``put_fields(...)``, for a ``StreamEntry`` built by hand."""
    return {k: v if isinstance(v, bytes) else str(v).encode() for k, v in fields.items()}


#: The error of a commit :func:`refuse_inserts` makes fail (a dead letter's ``error``).
REFUSED = "refused by the test"


def worker_of(mem: DualMemory, consumer: str, **kwargs: Any) -> Worker:
    """A worker on ``mem``'s Redis, database and settings under a consumer name of its
    own, run by hand (``step()``, ``drain()``): the test decides when SQLite sees what."""
    return Worker(mem._redis, mem.store, mem.settings.replace(consumer=consumer), **kwargs)


def refuse_inserts(db: Path, when: str = "1", *, table: str = "memory") -> None:
    """Make every commit that inserts a row of ``table`` for which ``when`` holds (an SQL
    condition on ``NEW``) fail with :data:`REFUSED`, as a disk error would: the worker
    retries it, then dead-letters it. Replaces the refusal made before, if any;
    :func:`allow_inserts` ends it."""
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("DROP TRIGGER IF EXISTS test_refuse")
        conn.execute(
            f"CREATE TRIGGER test_refuse BEFORE INSERT ON {table} WHEN {when} "
            f"BEGIN SELECT RAISE(ABORT, '{REFUSED}'); END"
        )


def allow_inserts(db: Path) -> None:
    """End the refusal :func:`refuse_inserts` made."""
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("DROP TRIGGER IF EXISTS test_refuse")


def record_runtime_waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The timeouts every ``Runtime.wait`` is called with from now on (it still waits):
    what an operator command passes on from its ``--wait``."""
    from dualmem.ops.runtime import Runtime

    waits: list[float] = []
    real_wait = Runtime.wait

    def wait(rt: Runtime, receipts: Any, timeout: float, *a: Any) -> Any:
        waits.append(timeout)
        return real_wait(rt, receipts, timeout, *a)

    monkeypatch.setattr(Runtime, "wait", wait)
    return waits


def partial_left_by_a_kill(script: str, args: list[str], dest: Path) -> Path:
    """Run the Python ``script`` with ``args``, which kills itself with SIGKILL while it
    writes ``dest``; the one file it left in ``dest``'s directory: its hidden partial
    file (``.<name>.<random>.partial``), never ``dest``."""
    import subprocess

    argv = [sys.executable, "-c", script, *args]
    killed = subprocess.run(argv, capture_output=True, timeout=60, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (left,) = dest.parent.iterdir()
    assert left.name.startswith(f".{dest.name}.") and left.name.endswith(".partial")
    return left


def record_file_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    """Record this test's real ``os.fsync``, ``os.link`` and ``os.replace`` calls, in
    order, as ``("fsync", path of the fd)``, ``("link", src, dest)``, ``("replace", src,
    dest)``."""
    events: list[tuple[str, ...]] = []
    fsync, link, replace = os.fsync, os.link, os.replace

    def watched_fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def watched_link(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        events.append(("link", str(src), str(dst)))
        link(src, dst)

    def watched_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        events.append(("replace", str(src), str(dst)))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", watched_fsync)
    monkeypatch.setattr(os, "link", watched_link)
    monkeypatch.setattr(os, "replace", watched_replace)
    return events


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``dualmem <argv>`` in this process; its exit code, stdout and stderr."""
    from dualmem.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


class HangWatchdog:
    """Fails a test still running after ``HANG_SECONDS`` (see there), where it hangs: its
    set-up, call or tear-down. A plugin (registered by :func:`pytest_configure`), not an
    autouse fixture, so it guards the modules' doctests too: a fixture of this file does
    not reach the items under ``acl/`` and ``dualmem/``.

    A timer thread sends the main thread ``_HANG_SIGNAL``, whose handler (installed once,
    for the whole run) fails the test only while one is armed: a timer that fires as its
    test ends finds nothing to fail, where a handler put back to the signal's default
    would have killed the run."""

    def __init__(self) -> None:
        self._armed: str | None = None
        if _HANG_SIGNAL is not None:
            signal.signal(_HANG_SIGNAL, self._hung)

    def _hung(self, signum: int, frame: object) -> None:
        if self._armed is None:
            return
        frames = sys._current_frames()
        for t in threading.enumerate():
            stack = frames.get(t.ident or -1)
            if stack is not None:
                lines = "".join(traceback.format_stack(stack))
                print(f"--- thread {t.name}:\n{lines}", file=sys.stderr)
        pytest.fail(f"still running after {HANG_SECONDS:g} s: hung (stacks in stderr)")

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item) -> Iterator[object]:
        """Arm a timer that signals the main thread; disarm it when the test is done."""
        main = threading.main_thread().ident
        if _HANG_SIGNAL is None or main != threading.get_ident():
            return (yield)
        watchdog = threading.Timer(HANG_SECONDS, signal.pthread_kill, (main, _HANG_SIGNAL))
        watchdog.daemon = True
        self._armed = item.nodeid
        watchdog.start()
        try:
            return (yield)
        finally:
            self._armed = None
            watchdog.cancel()


def pytest_configure(config: pytest.Config) -> None:
    """Register :class:`HangWatchdog` for every test of the run, doctests included."""
    if not config.pluginmanager.has_plugin("dualmem-hang-watchdog"):
        config.pluginmanager.register(HangWatchdog(), "dualmem-hang-watchdog")


@pytest.fixture(autouse=True)
def no_worker_outlives_its_test() -> Iterator[None]:
    """Fail a test that leaves an in-process worker thread running after its
    ``DualMemory`` was closed: such a thread keeps consuming the shared redis-server's
    stream in later tests (a close(timeout=1) whose drain ran on the 30 s default did)."""
    before = set(threading.enumerate())
    yield
    left = [t for t in threading.enumerate() if t not in before and t.name == "dualmem-worker"]
    for t in left:
        t.join(5)
    alive = [t.name for t in left if t.is_alive()]
    assert not alive, f"worker threads still running after the test: {alive}"
