"""The suites, in the order they run. Each module has ``run(bench, backend) -> dict``."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["SUITES", "load"]

#: Suite name -> one line on what it compares (the issue's table, in order).
SUITES: dict[str, str] = {
    "write": "put per level vs raw redis-py MULTI SET+XADD",
    "persist": "one worker draining a backlog vs raw executemany",
    "read": "get (levels 3, 1) vs raw SQLite PK SELECT and diskcache",
    "lag": "write -> queryable at open-loop offered rates",
    "peers": "put/get vs LangGraph SqliteStore and diskcache",
    "scale": "put p95 and persist rate at growing store sizes",
}


def load(name: str) -> Callable[..., dict[str, Any]]:
    """The ``run`` function of suite ``name`` (imported on demand)."""
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; suites: {', '.join(SUITES)}")
    module = importlib.import_module(f"bench.suites.{name}")
    run: Callable[..., dict[str, Any]] = module.run
    return run
