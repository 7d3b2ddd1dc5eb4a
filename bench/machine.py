"""What the numbers were measured on: CPUs, Python, redis-server, SQLite, library versions."""

from __future__ import annotations

import os
import platform
import shutil
import sqlite3
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["describe_machine", "redis_server_version"]

_PACKAGES = (
    "dualmem",
    "redis",
    "hiredis",
    "fakeredis",
    "cryptography",
    "lz4",
    "diskcache",
    "langgraph-checkpoint-sqlite",
    "matplotlib",
)


def redis_server_version(binary: str | None) -> str | None:
    """``redis-server --version``'s ``v=`` field, or ``None`` when there is no binary."""
    if not binary:
        return None
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except OSError:
        return None
    for part in out.split():
        if part.startswith("v="):
            return part[2:]
    return out.strip() or None


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def describe_machine(redis_binary: str | None = None) -> dict[str, Any]:
    """A description of this machine and software, stored with every result file."""
    binary = redis_binary or shutil.which("redis-server")
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = []
    try:
        from redis.utils import HIREDIS_AVAILABLE

        parser = "hiredis" if HIREDIS_AVAILABLE else "python"
    except ImportError:
        parser = "unknown"
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "sqlite": sqlite3.sqlite_version,
        "redis_server": redis_server_version(binary),
        "redis_py_parser": parser,
        "packages": {p: _version(p) for p in _PACKAGES},
        "load_average_at_start": load,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
