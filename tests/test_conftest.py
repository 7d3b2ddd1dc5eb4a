"""The test harness's own guards, run on a throwaway test file in a pytest of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_hung_test_fails_where_it_hangs_and_the_run_goes_on(tmp_path: Path) -> None:
    # A change that made a loop spin (a paged query, in a mutation check) hung the whole
    # suite: pytest has no time limit of its own, and CI waited for its own.
    (tmp_path / "test_hangs.py").write_text(
        "import time\n\n\ndef test_hangs():\n    time.sleep(60)\n\n\ndef test_after():\n    pass\n",
        encoding="utf-8",
    )
    env = {**os.environ, "TEST_HANG_SECONDS": "1"}
    argv = ["-p", "tests.conftest", "-p", "no:cacheprovider", "-o", "addopts="]
    r = subprocess.run(
        [sys.executable, "-m", "pytest", *argv, str(tmp_path / "test_hangs.py")],
        cwd=ROOT,
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
