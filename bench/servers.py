"""Processes the benchmarks start and always stop: a redis-server on 127.0.0.1, and
``dualmem worker`` processes."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = [
    "RedisServer",
    "WorkerProcess",
    "cpu_pressure_us",
    "free_port",
    "process_cpu_seconds",
]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) process ``pid`` has used so far, from ``/proc``; ``None``
    off Linux or once it is gone.

    >>> process_cpu_seconds(os.getpid()) is None or process_cpu_seconds(os.getpid()) >= 0
    True
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_pressure_us() -> int | None:
    """Microseconds since boot during which at least one runnable task waited for a CPU
    (the kernel's pressure stall information, ``some`` line of ``/proc/pressure/cpu``);
    ``None`` where the kernel does not provide it.

    Two readings a wall-clock interval apart give the share of that interval the machine
    had more runnable work than CPUs. (``/proc/stat``'s busy time is sampled at the
    scheduler tick, which a tickless kernel skips on idle CPUs: for short bursts of work it
    reported a fifth of the CPU time the processes themselves accounted for.)

    >>> now = cpu_pressure_us()
    >>> now is None or now >= 0
    True
    """
    try:
        with open("/proc/pressure/cpu") as f:
            for line in f:
                kind, *fields = line.split()
                if kind == "some":
                    return int(dict(x.split("=", 1) for x in fields)["total"])
    except (OSError, KeyError, ValueError):
        return None
    return None


class RedisServer:
    """A redis-server on a free 127.0.0.1 port, keeping its files in ``workdir``, with AOF
    ``appendfsync everysec`` (the configuration the README recommends) unless told not to.

    The one launcher used by the benchmarks, the fault suite and the tests. Use it as a
    context manager, or call :meth:`start` and then :meth:`stop` (clean ``SHUTDOWN``) or
    :meth:`kill` (SIGKILL, like a crash); :meth:`start` again restarts it on the same port
    and directory.
    """

    def __init__(
        self, workdir: Path, *, appendonly: bool = True, binary: str | None = None
    ) -> None:
        found = binary or shutil.which("redis-server")
        if found is None:
            raise RuntimeError(
                "redis-server is not installed (apt-get install redis-server), "
                "or run the benchmarks with --backend fakeredis"
            )
        self.binary = found
        self.workdir = workdir
        self.appendonly = appendonly
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def cpu_seconds(self) -> float | None:
        """CPU time (user + system) the server has used so far (its AOF rewrite children
        not included); ``None`` off Linux or when it is not running."""
        return None if self.proc is None else process_cpu_seconds(self.proc.pid)

    def client(self) -> redis.Redis:
        """A plain redis-py client with a generous timeout (what a raw baseline uses, and
        what tests inspect with; not the code under test)."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def start(self) -> RedisServer:
        """Start the server and wait until it answers PING."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary,
            *("--port", str(self.port), "--bind", "127.0.0.1", "--protected-mode", "yes"),
            *("--dir", str(self.workdir), "--save", ""),
            *("--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "everysec"),
            *("--logfile", "redis.log", "--daemonize", "no"),
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        try:
            while True:
                with contextlib.suppress(redis.ConnectionError):
                    # Its own answer, not another server's: one that took the port between
                    # free_port() and this bind answered PING too (and would have been used,
                    # then shut down by stop()).
                    if self.client().info("server").get("process_id") == self.proc.pid:
                        return self
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log = self.workdir / "redis.log"
                    raise RuntimeError(
                        f"redis-server did not start on port {self.port}: "
                        + (log.read_text()[-2000:] if log.exists() else "no log")
                    )
                time.sleep(0.02)
        except BaseException:
            # Whatever ends the wait (a timeout, Ctrl-C): __exit__ will not run for a
            # start() that raised, so the server is stopped here.
            self.kill()
            raise

    def stop(self) -> None:
        """Clean shutdown: SHUTDOWN flushes and fsyncs the AOF; then the process is gone."""
        if self.proc is None or self.proc.poll() is not None:
            return
        # No retries: the connection closing is SHUTDOWN's answer, and the client's default
        # retry policy would spend seconds retrying it.
        once = redis.Redis(
            host="127.0.0.1", port=self.port, socket_timeout=5, retry=Retry(NoBackoff(), 0)
        )
        with contextlib.suppress(redis.RedisError):
            once.shutdown(nosave=False)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def kill(self) -> None:
        """SIGKILL: no flush, like a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        self.kill()


class WorkerProcess:
    """``python -m dualmem worker`` on a real Redis: persistence outside the writer's process,
    as the README recommends when a writer's latency matters."""

    def __init__(self, redis_url: str, db_path: Path, *extra: str) -> None:
        self.args = [
            sys.executable,
            "-m",
            "dualmem",
            "worker",
            "--redis-url",
            redis_url,
            "--db",
            str(db_path),
            *extra,
        ]
        # Output goes to a file, not a pipe: nobody reads a pipe during the run, and a
        # full pipe would stall the worker and with it the numbers.
        self.log_path = db_path.with_name(db_path.name + f".worker-{free_port()}.log")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def output(self) -> str:
        """Everything the worker printed so far."""
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def start(self, timeout: float = 30) -> WorkerProcess:
        """Start the worker and wait for its start-up line."""
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        try:
            while "dualmem worker" not in self.output:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"dualmem worker did not start: {self.output}")
                time.sleep(0.02)
        except BaseException:
            self.kill()  # see RedisServer.start
            raise
        return self

    def stop(self, timeout: float = 120) -> str:
        """SIGTERM (the worker drains, then exits); returns everything it printed."""
        if self.proc is None:
            return self.output
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        if self.proc.returncode != 0:
            raise RuntimeError(f"dualmem worker exited with {self.proc.returncode}: {self.output}")
        return self.output

    def cpu_seconds(self) -> float | None:
        """CPU time (user + system) the worker has used so far; ``None`` off Linux."""
        return None if self.proc is None else process_cpu_seconds(self.proc.pid)

    def kill(self) -> None:
        """SIGKILL, for clean-up after an error."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            self.kill()
            return
        self.stop()
