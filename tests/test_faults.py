"""Faults 1-8 of issue 6 at their quick sizes, on real redis-server and worker processes.

Each test runs the scenario function that ``python -m bench.faults`` runs at full size for
the committed report (bench/results/FAULTS.md), then asserts its figures: any property
that did not hold is listed in ``problems`` and fails the test.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import faults
from bench.faultkit import FaultEnv, Figures

from .conftest import RedisServer

pytestmark = [pytest.mark.real_redis, pytest.mark.slow]

Q = faults.QUICK


@pytest.fixture
def env(own_redis_server: RedisServer, tmp_path: Path) -> FaultEnv:
    """A redis-server of this test's own (AOF everysec), a key file and a database path."""
    return FaultEnv(own_redis_server, tmp_path / "world")


def assert_holds(fig: Figures) -> None:
    assert fig.problems == [], "\n".join(fig.problems)


def assert_nothing_lost(fig: Figures, expected: int | None = None) -> None:
    assert_holds(fig)
    assert fig.lost == 0 and fig.duplicated == 0, fig
    assert fig.acked is not None and fig.acked == fig.persisted
    if expected is not None:
        assert fig.acked == expected


def test_1_worker_killed_at_random_points_loses_and_repeats_nothing(env: FaultEnv) -> None:
    fig = faults.worker_sigkill(env, puts=Q.sigkill_puts, kills=Q.sigkill_kills)
    assert_nothing_lost(fig, Q.sigkill_puts)
    assert fig.recover_s is not None and fig.recover_s < 10


def test_2_crash_between_commit_and_xack_applies_nothing_twice(env: FaultEnv) -> None:
    fig = faults.commit_then_crash(env, rounds=Q.crash_rounds)
    assert_nothing_lost(fig)
    assert fig.extra["committed_then_crashed"] > 0
    assert fig.extra["redelivered_and_skipped"] == fig.extra["committed_then_crashed"]
    assert fig.extra["rows_changed_by_redelivery"] == 0


def test_3_redis_restarts_lose_no_acknowledged_put(env: FaultEnv) -> None:
    fig = faults.redis_restart(env, puts=Q.restart_puts, seconds=Q.restart_seconds)
    assert_holds(fig)
    # SHUTDOWN: nothing lost. SIGKILL: anything lost was acknowledged in the last second.
    assert fig.duplicated == 0
    assert fig.extra["loss_window_s"] <= 1.0
    assert fig.acked == Q.restart_puts
    assert sum(fig.extra["refused_while_down"].values()) > 0  # the outages were real


def test_4_redis_unreachable_fails_fast_reads_work_writes_resume(env: FaultEnv) -> None:
    fig = faults.redis_unreachable(env, probes=Q.unreachable_probes)
    assert_holds(fig)
    assert fig.extra["slowest_failure_s"] < 1.0
    assert fig.extra["reads_ok_during_outages"] == 2 * Q.unreachable_probes
    # Down, frozen and back empty: each time a put went through and was persisted.
    assert set(fig.extra["persisted_after_outage_s"]) == {"down", "frozen", "empty"}
