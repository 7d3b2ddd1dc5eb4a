"""Every name in ``__all__`` imports, every public module says what it is for, and every
python example in the README runs (twice in one directory, as a user rerunning it would)."""

from __future__ import annotations

import importlib
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import acl
import dualmem
from acl import Keyring

from .conftest import RedisServer


@pytest.mark.parametrize("package", [acl, dualmem])
def test_all_names_import(package: object) -> None:
    for name in package.__all__:  # type: ignore[attr-defined]
        assert getattr(package, name) is not None, name


@pytest.mark.parametrize("package", [acl, dualmem])
def test_modules_have_a_purpose_and_public_functions_have_docstrings(package: object) -> None:
    for info in pkgutil.iter_modules(package.__path__):  # type: ignore[attr-defined]
        if info.name == "__main__":
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")  # type: ignore[attr-defined]
        assert module.__doc__ and module.__doc__.strip(), module.__name__
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if callable(obj):
                assert obj.__doc__, f"{module.__name__}.{name} has no docstring"


README = Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
_README_BLOCKS = _BLOCK.findall(README.read_text(encoding="utf-8"))
_README_REDIS = "redis://127.0.0.1:6379/0"


def test_the_readme_has_python_examples() -> None:
    assert len(_README_BLOCKS) >= 3  # quick start, coordination, mission log


@pytest.mark.parametrize(
    "code", _README_BLOCKS, ids=[f"block{i}" for i in range(len(_README_BLOCKS))]
)
def test_each_readme_example_runs_twice_in_one_directory(
    code: str, tmp_path: Path, redis_server: RedisServer
) -> None:
    """A user runs an example, then runs it again: the second run, on the ./dualmem.db
    (and key file) the first one left, must work too. Each run is a fresh interpreter in
    ``tmp_path``, as a user's would be; the quick start's real Redis is this test's."""
    redis_server.client().flushall()
    Keyring.generate().save(tmp_path / "keys.json")  # `dualmem keygen --out keys.json`
    source = code.replace(_README_REDIS, redis_server.url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUALMEM_")}
    env["PYTHONPATH"] = os.pathsep.join([str(README.parent), env.get("PYTHONPATH", "")])
    for run in (1, 2):
        done = subprocess.run(
            [sys.executable, "-c", source],
            check=False,
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, f"run {run}:\n{done.stderr}"


_TEST_NAME = re.compile(r"`(tests/(test_\w+\.py))?(?:::)?(test_\w+)`")


def test_every_test_the_readme_names_exists_where_it_says() -> None:
    """The promise tables name the test behind each promise: ``tests/<file>::<name>``,
    then bare names (or ``::<name>``) in that same file; a row that names no file yet
    may name a test of any file. A renamed or removed test would leave a promise that
    no test keeps."""
    tests_dir = Path(__file__).resolve().parent
    defined = {
        path.name: set(re.findall(r"^(?:async )?def (test_\w+)", path.read_text(), re.MULTILINE))
        for path in tests_dir.glob("test_*.py")
    }
    anywhere = set().union(*defined.values())
    named, wrong = 0, []
    for line in README.read_text(encoding="utf-8").splitlines():
        if not line.startswith("|"):
            continue
        current = None
        for match in _TEST_NAME.finditer(line):
            current = match.group(2) or current
            name = match.group(3)
            named += 1
            if name not in (defined.get(current, set()) if current else anywhere):
                wrong.append(f"{current or 'tests/'}::{name}")
    assert named > 100  # the tables are still there, and still parsed
    assert not wrong, wrong
