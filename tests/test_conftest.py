"""The test harness's own guards, run on throwaway files in a pytest of its own."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.servers import RedisServer

ROOT = Path(__file__).resolve().parent.parent


def run_hang_limited(tmp_path: Path, name: str, source: str) -> str:
    """Lay out ``tmp_path`` as this repository is (``tests/`` with this suite's conftest,
    ``pkg/`` for a module's doctests), write ``source`` at ``name`` there, run pytest on
    both directories with a 1 s hang limit; check that one test failed as hung and the
    next one still ran; return the output."""
    (tmp_path / "tests").mkdir()
    (tmp_path / "pkg").mkdir()
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "tests" / "conftest.py")
    (tmp_path / name).write_text(source, encoding="utf-8")
    env = {**os.environ, "TEST_HANG_SECONDS": "1", "PYTHONPATH": str(ROOT)}
    argv = ["-p", "no:cacheprovider", "--rootdir", str(tmp_path), "--doctest-modules"]
    r = subprocess.run(
        [sys.executable, "-m", "pytest", *argv, "tests", "pkg"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "1 failed, 1 passed" in out, out
    assert "still running after 1 s: hung" in out and "time.sleep(60)" in out, out
    assert "--- thread MainThread:" in out, out  # every thread's stack, in its stderr
    return out


def test_a_hung_test_fails_where_it_hangs_and_the_run_goes_on(tmp_path: Path) -> None:
    # A change that made a loop spin (a paged query, in a mutation check) hung the whole
    # suite: pytest has no time limit of its own, and CI waited for its own.
    source = (
        "import time\n\n\ndef test_hangs():\n    time.sleep(60)\n\n\ndef test_after():\n    pass\n"
    )
    run_hang_limited(tmp_path, "tests/test_hangs.py", source)


def test_a_hung_doctest_fails_where_it_hangs_and_the_run_goes_on(tmp_path: Path) -> None:
    # The watchdog was an autouse fixture of tests/conftest.py, which does not reach the
    # doctests of acl/ and dualmem/: a doctest that hung still hung the suite.
    source = (
        'def hangs():\n    """\n    >>> import time\n    >>> time.sleep(60)\n    """\n\n\n'
        'def after():\n    """\n    >>> 1 + 1\n    2\n    """\n'
    )
    out = run_hang_limited(tmp_path, "pkg/hangs.py", source)
    assert "FAILED pkg/hangs.py::hangs.hangs" in out, out  # the doctest that hung


def test_a_server_whose_port_was_taken_meanwhile_fails_to_start(
    own_redis_server: RedisServer, tmp_path: Path
) -> None:
    # Between free_port() and redis-server binding it, another process (a helper's test
    # run, a second suite) may take the port. The other server answered the PING, so
    # start() returned as if this one ran: its tests used (and flushed) the other's data,
    # and its stop() shut the other down.
    late = RedisServer(tmp_path / "late")
    late.port = own_redis_server.port
    with pytest.raises(RuntimeError, match="did not start"):
        late.start()
    assert late.proc is not None and late.proc.poll() is not None  # its own one is gone
    late.stop()
    assert own_redis_server.client().ping()  # the other one still runs


def _listening_addresses(port: int) -> set[str]:
    """Local addresses of the sockets listening on ``port`` (IPv4 and IPv6), from /proc."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            for line in list(f)[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.rsplit(":", 1)
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    found.add(address)
    return found


def test_the_redis_server_the_tests_start_listens_on_loopback_only_with_aof_everysec(
    redis_server: RedisServer,
) -> None:
    # Any server a test or benchmark starts listens on 127.0.0.1 only; the benchmarks
    # run against AOF everysec, the configuration the README recommends.
    assert _listening_addresses(redis_server.port) == {"0100007F"}  # 127.0.0.1, nothing else
    config = redis_server.client().config_get("*")
    assert config["bind"].split() == ["127.0.0.1"]
    assert (config["appendonly"], config["appendfsync"]) == ("yes", "everysec")
    assert config["protected-mode"] == "yes"
