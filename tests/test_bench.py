"""The benchmark harness cannot rot: its pure parts, and every suite at a tiny size on both
backends (what it measures is never asserted: speed is proven by bench/results, not here)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import doctest
import gc
import importlib
import json
import logging
import math
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bench import harness, machine, openloop, stats
from bench.cli import main
from bench.report import load_results, render_report, targets_table
from bench.suites import SUITES
from dualmem import DualMemory

from .conftest import _require_redis_server, wait_until

pytest.importorskip("matplotlib", reason="the bench extra is not installed")
pytest.importorskip("diskcache", reason="the bench extra is not installed")
pytest.importorskip("langgraph.store.sqlite", reason="the bench extra is not installed")


@pytest.mark.parametrize(
    "module",
    [
        "bench.cli",
        "bench.stats",
        "bench.openloop",
        "bench.harness",
        "bench.report",
        "bench.plots",
        "bench.suites.lag",
    ],
)
def test_doctests(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_full_collections_are_timed_and_matched_to_the_writes_they_delay() -> None:
    from bench.suites.lag import FullCollections

    junk = []
    with FullCollections() as fc:
        for _ in range(3):
            junk.append([[] for _ in range(50_000)])  # something for it to walk
            gc.collect()
    assert len(fc.pauses) == 3 and all(e > s for s, e in fc.pauses)
    gc.collect()
    assert len(fc.pauses) == 3  # not recording once left
    fc.pauses = [(100, 200), (1_000, 1_500)]
    # Windows: before both, overlapping the first, inside the second, spanning none.
    got = fc.report([(0, 100), (150, 400), (1_100, 1_200), (300, 900)])
    assert got == {"count": 2, "max_ms": 500 / 1e6, "total_ms": 600 / 1e6, "writes_in_flight": 2}


def test_open_loop_charges_lateness_to_the_system() -> None:
    now = [0]

    def clock() -> int:
        return now[0]

    def sleep(seconds: float) -> None:
        now[0] += int(seconds * 1e9)

    def send(i: int) -> None:
        now[0] += 3_000_000 if i == 0 else 100_000  # the first send stalls for 3 ms

    sends = openloop.run_open_loop(
        openloop.schedule(1000, 0.005, 0), send, clock=clock, sleep=sleep
    )
    delays = [started - due for _, due, started, _ in sends]
    # The stall delays the next sends (measured from their intended times) instead of
    # quietly moving the schedule, and the sender catches up once it can.
    assert delays == [0, 2_000_000, 1_100_000, 200_000, 0]


def test_schedule_splits_one_rate_over_senders_without_gaps() -> None:
    parts = [openloop.schedule(2000, 0.01, 5, senders=3, sender=k) for k in range(3)]
    merged = sorted(t for part in parts for t in part)
    assert merged == openloop.schedule(2000, 0.01, 5)
    # A rate or duration of zero is a mistake, not an empty run that reports nothing.
    for rate, duration in ((0, 1.0), (1000, 0)):
        with pytest.raises(ValueError, match="must be positive"):
            openloop.schedule(rate, duration, 0)


def test_targets_and_flatness() -> None:
    assert stats.Target.check("s", "b", "x", 1.2, "<=", 1.2).met
    assert not stats.Target.check("s", "b", "x", float("nan"), ">=", 1).met
    assert not stats.Target.check("s", "b", "x", 0.5, ">=", 1).met
    t = stats.Target.check("s", "b", "x", float("nan"), "<=", 1)
    back = stats.Target.from_json(json.loads(json.dumps({**t.to_json(), "value": None})))
    assert not back.met and math.isnan(back.value)  # null in the file, NaN again
    with pytest.raises(ValueError, match="op must be"):
        stats.Target.check("s", "b", "x", 1.0, "==", 1.0)  # a target always says which way
    assert stats.flatness([1.0, 0.0]) != stats.flatness([1.0, 0.0])  # nan: never flat


def test_the_lag_suite_fails_on_a_write_that_was_never_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bench.suites import lag

    db = tmp_path / "m.db"
    with DualMemory("memory://lag-loss", db_path=str(db)) as mem:
        for i in range(2):
            mem.sync(mem.put(f"bench/lag/7/{i}", i, level=3, principal=harness.PRINCIPAL), 10)
        mem.sync(mem.put("bench/lag/70/0", 0, level=3, principal=harness.PRINCIPAL), 10)
    monkeypatch.setattr(lag, "COMMIT_WAIT_S", 0.3)
    row: dict[str, Any] = {"writes": 2}
    lag._committed(db, 7, row)  # both there; the neighbouring rate's key is not counted
    assert row["committed"] == 2
    row = {"writes": 3}  # one acknowledged write the journal never got
    with pytest.raises(RuntimeError, match="1 of 3 acknowledged writes were not committed"):
        lag._committed(db, 7, row)
    assert row["committed"] == 2


@pytest.mark.real_redis
def test_the_lag_suite_counts_the_forks_of_a_real_redis_during_a_rate(tmp_path: Path) -> None:
    # An AOF rewrite (a fork) during a rate is on record beside that rate's lag; a rate
    # with none says 0 and names no fork call.
    from bench import servers
    from bench.suites import lag

    _require_redis_server()
    with servers.RedisServer(tmp_path / "redis") as server:
        client = server.client()
        try:
            with lag.RedisForks(client) as quiet:
                client.set("k", "v")
            assert quiet.report() == {"count": 0, "latest_fork_ms": None}
            with lag.RedisForks(client) as rewrite:
                client.bgrewriteaof()
                wait_until(
                    lambda: client.info("persistence")["aof_rewrite_in_progress"] == 0,
                    what="the AOF rewrite to end",
                )
            report = rewrite.report()
            assert report["count"] == 1 and report["latest_fork_ms"] > 0, report
        finally:
            client.close()


def test_the_committed_report_and_the_readme_are_the_committed_results() -> None:
    # The README quotes the committed run's targets table, and REPORT.md says it is
    # generated from the JSON beside it: both must be what that JSON gives, so a figure
    # edited by hand, or a run committed without its report (or the other way round),
    # fails here rather than in a reader's hands.
    from bench.report import _PLOTS

    root = Path(__file__).resolve().parent.parent
    results = root / "bench" / "results"
    docs = load_results(results)
    assert set(docs) == set(SUITES)
    plots = {suite: name for suite, (name, _) in _PLOTS.items() if (results / name).exists()}
    assert set(plots) == set(_PLOTS)  # the plots are committed with the run
    report = (results / "REPORT.md").read_text(encoding="utf-8")
    assert render_report(docs, plots) == report
    readme = (root / "README.md").read_text(encoding="utf-8")
    assert targets_table(docs) in readme
    targets = [t for doc in docs.values() for r in doc["backends"].values() for t in r["targets"]]
    met = sum(t["met"] for t in targets)
    assert f"({met} of {len(targets)} targets met" in readme
    assert f"## Targets ({met} of {len(targets)} met)" in report


_RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"


def _committed_docs() -> dict[str, dict[str, Any]]:
    return copy.deepcopy(load_results(_RESULTS))


def test_a_target_without_a_figure_reads_n_a_is_missed_and_is_not_counted_as_met() -> None:
    # A lag rate whose writes did not all become visible has no lag figure: its target is
    # null in the file (NaN) and not met. A report that showed it met, or counted it in
    # "N of M met", would claim a speed nobody measured. Made from the committed run: its
    # one met lag target given no figure, and no figures beside it.
    docs = _committed_docs()
    targets = docs["lag"]["backends"]["redis"]["targets"]
    target = next(t for t in targets if t["met"])
    target.update(value=None, met=False, dualmem="", baseline="")
    every = [t for d in docs.values() for r in d["backends"].values() for t in r["targets"]]
    met = sum(t["met"] for t in every)
    (row,) = [x for x in targets_table(docs).splitlines() if f"| redis | {target['what']} |" in x]
    assert row == f"| lag | redis | {target['what']} | — | — | n/a ms | ≤ 5 ms | **missed** |"
    assert f"## Targets ({met} of {len(every)} met)" in render_report(docs, {})


def test_the_lag_table_says_what_was_not_visible_committed_unknown_and_no_pressure_figure() -> None:
    # Writes the observer never saw, a row from before commits were checked and a kernel
    # without pressure stall information must read as such: a report showing 0 not
    # visible, every write committed or 0 % waiting for a CPU would hide why a rate's
    # lag target reads n/a, or claim a check that never ran.
    docs = _committed_docs()
    rows = docs["lag"]["backends"]["redis"]["rates"]
    rows[0]["not_visible"] = 3
    rows[1]["committed"] = rows[1]["writes"] - 1  # a run fails on this; the cell says it
    del rows[2]["committed"]
    for r in rows:
        r["cpu"]["cpu_wait_share"] = None
    section = render_report(docs, {}).split("## Lag")[1].split("### embedded fakeredis")[0]
    lines = [x for x in section.splitlines() if x.startswith(("| 500/s", "| 2,000/s", "| 10,"))]
    lag, cpu = [x.split(" | ") for x in lines[:3]], lines[3:]
    assert [c[9] for c in lag] == ["3", "0", "0"]
    assert [c[10] for c in lag] == [
        f"{rows[0]['committed']:,} of {rows[0]['writes']:,}",
        f"{rows[1]['writes'] - 1:,} of {rows[1]['writes']:,}",
        "—",
    ]
    assert len(cpu) == 3 and all(x.endswith("| n/a |") for x in cpu), cpu


def test_the_report_names_the_runs_seed_and_every_backend_it_ran() -> None:
    # A run with --seed 7 on a real Redis alone: the report must say seed 7 (the data it
    # measured) and show each suite's redis-server section, not leave out the only one.
    docs = _committed_docs()
    for doc in docs.values():
        doc["run"]["seed"] = 7
        del doc["backends"]["fakeredis"]
    text = render_report(docs, {})
    assert "seed 7," in text and "seed 1," not in text
    assert text.count("### real redis-server") == len(SUITES)
    assert "### embedded fakeredis" not in text


def test_the_plots_draw_the_figures_they_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The report shows the plots beside the tables: each line must be the figures its
    # label names (p95 lag in milliseconds at the offered rate, a CDF with latency along
    # x), the dotted line the p95 level, and a star at every lag target's limit.
    import matplotlib.pyplot as plt

    from bench.plots import make_plots
    from bench.suites.lag import TARGETS_MS

    docs = copy.deepcopy(load_results(_RESULTS))
    figures: list[Any] = []
    close = plt.close
    monkeypatch.setattr(plt, "close", figures.append)  # kept open to be read
    assert make_plots({s: docs[s] for s in ("write", "lag")}, tmp_path) == {
        "write": "write_cdf.png",
        "lag": "lag_vs_rate.png",
    }
    write_fig, lag_fig = figures
    try:
        for ax, backend in zip(write_fig.axes, ("redis", "fakeredis"), strict=True):
            cdf = docs["write"]["backends"][backend]["cdf_us"]
            lines = {line.get_label(): line for line in ax.get_lines()}
            for name, points in cdf.items():
                assert list(lines[name].get_xdata()) == [p[0] for p in points]
                assert list(lines[name].get_ydata()) == [p[1] for p in points]
            (level,) = [line for name, line in lines.items() if name not in cdf]
            assert list(level.get_ydata()) == [0.95, 0.95]
        (ax,) = lag_fig.axes
        lines = ax.get_lines()
        for backend, title in (("redis", "real redis-server"), ("fakeredis", "embedded fakeredis")):
            rates = docs["lag"]["backends"][backend]["rates"]
            for q in ("p50", "p95", "p99"):
                (line,) = [x for x in lines if x.get_label() == f"{title} {q}"]
                assert list(line.get_xdata()) == [r["offered_rate"] for r in rates]
                assert list(line.get_ydata()) == [r["lag"][q] / 1000 for r in rates]
        stars = [(x.get_xdata()[0], x.get_ydata()[0]) for x in lines if x.get_marker() == "*"]
        assert stars == list(TARGETS_MS.items())
        notes = [t.get_text() for t in ax.texts]
        assert notes == [f"target p95 ≤ {limit:g} ms" for limit in TARGETS_MS.values()]
    finally:
        for fig in figures:
            close(fig)


def test_values_are_seeded_and_exactly_500_bytes() -> None:
    a = harness.make_values(harness.random.Random("1:x"), 5)
    b = harness.make_values(harness.random.Random("1:x"), 5)
    assert a == b
    assert {len(harness.json_bytes(v)) for v in a} == {harness.VALUE_BYTES}


def test_the_baselines_store_the_bytes_dualmem_serializes() -> None:
    # The raw baselines store json_bytes(value) beside dualmem's put of the same value:
    # bytes that differ from what dualmem serializes (spaces after separators, keys in
    # another order) give the baseline other work than dualmem's, and the ratio is off.
    from acl.crypto import JsonSerializer

    for value in harness.make_values(harness.random.Random(3), 5):
        assert harness.json_bytes(value) == JsonSerializer().encode(value)


def test_a_suites_data_is_the_runs_seed_and_its_own_name(tmp_path: Path) -> None:
    # The report names the run's seed as what made the data: a generator that ignored
    # it would make --seed change nothing, and one that ignored the name would give every
    # suite and backend the same stream.
    def draws(seed: int, name: str) -> list[float]:
        rng = harness.Bench(harness.TINY, seed, tmp_path).rng(name)
        return [rng.random() for _ in range(4)]

    assert draws(1, "write") == draws(1, "write")
    assert draws(2, "write") != draws(1, "write") != draws(1, "read")


def test_the_full_sizes_are_what_made_the_committed_results() -> None:
    # FULL is documented as the sizes of the committed run, and the report names them
    # "full": a FULL changed without a new run would describe work the results never did.
    full = json.loads(json.dumps(harness.sizes_json(harness.FULL)))
    docs = load_results(_RESULTS)
    assert docs and all(doc["run"]["sizes"] == full for doc in docs.values())


def test_a_scratch_path_starts_without_the_last_databases_wal(tmp_path: Path) -> None:
    # A database removed without its -wal and -shm leaves SQLite a log of frames for the
    # next database of that name to replay: each suite's round must start from nothing.
    ctx = harness.Bench(harness.TINY, 1, tmp_path)
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / f"round.db{suffix}").write_bytes(b"left over")
    assert ctx.path("round.db") == tmp_path / "round.db"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench-keys.json"]


def test_a_bench_writer_is_deployed_as_each_backend_is_meant_to_be(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On a real Redis the timed writer runs no worker of its own and one `dualmem worker`
    # process persists (a worker thread in the writer would compete for its GIL and slow
    # the puts the targets compare); every bench DualMemory waits 5 s on a Redis stall
    # (timing it) rather than failing; and an embedded worker that did not drain fails
    # the run instead of reporting a persist rate for records it never stored.
    ctx = harness.Bench(harness.TINY, 1, tmp_path)
    processes: list[tuple[str, Path, str]] = []

    @contextlib.contextmanager
    def worker_process(url: str, db: Path) -> Iterator[None]:
        processes.append((url, db, "started"))
        yield
        processes.append((url, db, "stopped"))

    monkeypatch.setattr(harness, "WorkerProcess", worker_process)
    db = tmp_path / "w.db"
    real = harness.Backend("redis", "memory://bench-writer-test", server=object())  # type: ignore[arg-type]
    with ctx.writer(real, db) as mem:
        assert processes == [(real.url, db, "started")]
        assert mem.settings.worker is False and mem.settings.socket_timeout == 5.0
    assert processes[-1] == (real.url, db, "stopped")
    with harness.open_backend("fakeredis", tmp_path) as embedded:
        with ctx.writer(embedded, tmp_path / "e.db", socket_timeout=1.0) as mem:
            assert mem.settings.worker is True and mem.settings.socket_timeout == 1.0
        closed: list[float | None] = []

        class Undrained:
            def close(self, timeout: float | None = None) -> Any:
                closed.append(timeout)
                return SimpleNamespace(drained=False, pending=3)

        monkeypatch.setattr(ctx, "memory", lambda *a, **k: Undrained())
        undrained = ctx.writer(embedded, tmp_path / "u.db")
        with pytest.raises(RuntimeError, match="worker did not drain: 3 left"), undrained:
            pass
        assert closed == [120]
    assert len(processes) == 2  # the embedded backend started no worker process


def test_resetting_a_backend_empties_its_redis(tmp_path: Path) -> None:
    # Suites run one after another on one backend: the next must not find the last
    # one's streams and keys (a backlog it would drain, records it would count).
    flushed: list[bool] = []
    server = SimpleNamespace(client=lambda: SimpleNamespace(flushall=lambda: flushed.append(True)))
    harness.Backend("redis", "redis://unused", server=server).reset()  # type: ignore[arg-type]
    assert flushed == [True]
    with harness.open_backend("fakeredis", tmp_path) as backend:
        backend.raw_client().set("left", "over")
        backend.reset()
        assert backend.raw_client().keys("*") == []
    unknown = harness.open_backend("redis-server", tmp_path)  # not a quiet fakeredis run
    with pytest.raises(ValueError, match="unknown backend"), unknown:
        pass


def test_machine_description_names_the_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    # What the report says the figures were measured on: this machine's CPUs and its
    # three load averages, the SQLite library (not the sqlite3 module's own version),
    # the parser redis-py really uses and every package the run may depend on.
    import os

    from redis.utils import HIREDIS_AVAILABLE

    m = machine.describe_machine()
    assert m["cpu_count"] == os.cpu_count() and m["python"]
    assert m["sqlite"] == sqlite3.sqlite_version
    assert len(m["load_average_at_start"]) == 3
    assert m["redis_py_parser"] == ("hiredis" if HIREDIS_AVAILABLE else "python")
    assert set(m["packages"]) == set(machine._PACKAGES)
    assert set(m["packages"]) >= {"redis", "fakeredis", "diskcache"}
    monkeypatch.setattr("redis.utils.HIREDIS_AVAILABLE", not HIREDIS_AVAILABLE)
    other = "python" if HIREDIS_AVAILABLE else "hiredis"
    assert machine.describe_machine()["redis_py_parser"] == other


def test_the_machine_description_reads_the_redis_server_version_and_cpu_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The report names the redis-server the figures were measured on: its version is
    # the `v=` field of `--version` (not another field, nor the field with its name), and
    # the binary the run was given, not whichever one is on PATH.
    fake = tmp_path / "redis-server"
    fake.write_text(
        "#!/bin/sh\necho 'Redis server v=7.9.1 sha=00000000:0 malloc=jemalloc bits=64'\n"
    )
    fake.chmod(0o755)
    assert machine.redis_server_version(str(fake)) == "7.9.1"
    assert machine.redis_server_version(None) is None
    assert machine.redis_server_version(str(tmp_path / "missing")) is None
    assert machine.describe_machine(str(fake))["redis_server"] == "7.9.1"
    # A package that is not installed is named as absent, not given a version.
    assert machine._version("no-such-package-dualmem-bench") is None


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="needs /proc/cpuinfo")
def test_the_machine_description_names_the_cpu_model() -> None:
    # /proc/cpuinfo has a "model" line (a number) before "model name" on x86: the
    # report must name the processor, not its model number.
    lines = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
    names = [x.split(":", 1)[1].strip() for x in lines if x.lower().startswith("model name")]
    if not names:
        pytest.skip("no model name in /proc/cpuinfo")
    assert machine.describe_machine()["cpu_model"] == names[0]


def test_dualmem_cli_builds_without_importing_the_bench_extra() -> None:
    code = (
        "import sys, dualmem.cli as c; c.build_parser(); "
        "heavy = {'matplotlib', 'diskcache', 'langgraph'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_run_writes_the_suites_it_was_asked_for_and_the_command_that_repeats_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The result files name the command, seed and sizes that made them (the report quotes
    # them): any part of the command left out, a seed or sizes other than the run's, a
    # suite or backend not asked for, or a summary that counted a missed target as met
    # would describe a run nobody made. --sizes wins over --quick.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the scratch directory's
    out = tmp_path / "new" / "results"
    argv = ["--quick", "--sizes", "tiny", "--suite", "write", "--backend", "fakeredis"]
    argv += ["--seed", "7", "--no-progress", "--no-plots", "--out", str(out)]
    sigterm = signal.getsignal(signal.SIGTERM)
    assert main(argv) == 0
    printed = capsys.readouterr()
    assert signal.getsignal(signal.SIGTERM) is sigterm  # SIGTERM's handler is given back
    assert sorted(p.name for p in out.iterdir()) == ["REPORT.md", "write.json"]
    text = (out / "write.json").read_text()
    assert text.endswith("}\n")  # a text file: its last line ends
    doc = json.loads(text)
    run = doc["run"]
    assert run["command"] == (
        "python -m bench --quick --sizes tiny --suite write --backend fakeredis --seed 7"
    )
    assert run["seed"] == 7 and run["id"].endswith("-7") and run["seconds"] > 0
    assert run["sizes"] == json.loads(json.dumps(harness.sizes_json(harness.TINY)))
    assert doc["description"] == SUITES["write"] and list(doc["backends"]) == ["fakeredis"]
    targets = doc["backends"]["fakeredis"]["targets"]
    *lines, last = printed.out.splitlines()
    assert [line[:6] for line in lines] == ["met   " if t["met"] else "MISSED" for t in targets]
    assert all(t["what"] in line for t, line in zip(targets, lines, strict=True))
    met = sum(t["met"] for t in targets)
    assert last.startswith(f"{met} of {len(targets)} targets met in ")
    assert last.endswith(f"report: {out / 'REPORT.md'}")
    assert printed.err == ""  # --no-progress: no bars
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new"]  # the scratch is gone


def test_dualmem_bench_names_itself_and_a_smaller_run_writes_to_a_new_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # `dualmem bench --quick` with no --out: the quick preset, seed 1, results in a new
    # temporary directory (only a full run writes the committed bench/results), and the
    # command recorded as the one that was typed.
    from bench import cli
    from dualmem.cli import main as dualmem_main

    committed = tmp_path / "committed"  # where a full run writes: not this one
    monkeypatch.setattr(cli, "DEFAULT_RESULTS", committed)
    monkeypatch.setitem(harness.PRESETS, "quick", dataclasses.replace(harness.TINY, name="quick"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    argv = ["bench", "--quick", "--suite", "write", "--backend", "fakeredis", "--no-progress"]
    assert dualmem_main([*argv, "--no-plots"]) == 0
    report = Path(capsys.readouterr().out.splitlines()[-1].split("report: ")[1])
    assert report.parent.parent == tmp_path and report.parent.name.startswith(
        "dualmem-bench-quick-"
    )
    run = json.loads((report.parent / "write.json").read_text())["run"]
    assert run["command"] == "dualmem bench --quick --suite write --backend fakeredis"
    assert run["seed"] == 1 and run["sizes"]["name"] == "quick"
    assert not committed.exists()


@pytest.mark.real_redis
def test_a_run_on_both_backends_uses_the_redis_server_it_is_given_and_reports_both(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # --redis-server names the binary that is run (and whose version the results record),
    # not the one on PATH; the summary lists the targets of both backends and only those
    # of the suites that ran, though the results directory holds another suite's file.
    _require_redis_server()
    real = shutil.which("redis-server")
    assert real is not None
    calls = tmp_path / "calls"
    binary = tmp_path / "my-redis-server"
    binary.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexec {real} "$@"\n')
    binary.chmod(0o755)
    out = tmp_path / "results"
    out.mkdir()
    shutil.copy(_RESULTS / "read.json", out / "read.json")  # an earlier run's
    argv = ["--sizes", "tiny", "--suite", "write", "--redis-server", str(binary)]
    assert main([*argv, "--no-progress", "--no-plots", "--out", str(out)]) == 0
    *lines, last = capsys.readouterr().out.splitlines()
    doc = json.loads((out / "write.json").read_text())
    assert list(doc["backends"]) == ["redis", "fakeredis"]
    targets = [t for b in doc["backends"].values() for t in b["targets"]]
    assert [line.split()[1:3] for line in lines] == [[t["suite"], t["backend"]] for t in targets]
    assert last.startswith(f"{sum(t['met'] for t in targets)} of {len(targets)} targets met")
    ran = calls.read_text().splitlines()
    assert "--version" in ran and len(ran) >= 2, ran  # its version, and the server
    assert doc["run"]["machine"]["redis_server"] == machine.redis_server_version(real)


def _run_tiny(
    tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> dict[str, dict[str, object]]:
    from bench.suites import lag

    # The tiny rates get lag targets of their own, so the target code runs (2000 and
    # 10000 writes/s have them in a real run).
    monkeypatch.setattr(lag, "TARGETS_MS", {200: 5.0, 400: 20.0})
    out = tmp_path / "results"
    assert main(["--sizes", "tiny", "--backend", backend, "--no-progress", "--out", str(out)]) == 0
    docs = {}
    for suite in SUITES:
        text = (out / f"{suite}.json").read_text()
        docs[suite] = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
        result = docs[suite]["backends"][backend]
        assert result["method"]
        for t in result["targets"]:
            assert {"value", "limit", "met"} <= set(t)
    report = (out / "REPORT.md").read_text()
    assert "## Targets" in report and "| write |" in report
    # The report a run writes shows the plots it drew beside it.
    assert "](write_cdf.png)" in report and "](lag_vs_rate.png)" in report
    _check_targets_are_their_figures(docs, backend)
    assert (out / "write_cdf.png").stat().st_size > 0
    assert (out / "lag_vs_rate.png").stat().st_size > 0
    return docs


@pytest.mark.slow
def test_every_suite_runs_at_a_tiny_size_on_fakeredis(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = _run_tiny(tmp_path, "fakeredis", monkeypatch)
    lag = docs["lag"]["backends"]["fakeredis"]["rates"]  # type: ignore[index]
    assert all(r["not_visible"] == 0 for r in lag)  # every write became queryable
    assert all(r["committed"] == r["writes"] > 0 for r in lag)  # and was found afterwards
    for r in lag:  # one process: its full collections are on record, with their reach
        gcs = r["full_gc"]
        assert gcs["count"] >= 0 and gcs["max_ms"] <= gcs["total_ms"] + 1e-9
        assert 0 <= gcs["writes_in_flight"] <= r["counted"]
        _check_cpu(r, ["dualmem process", "observer"], self_measured=["dualmem process"])
        assert "redis_forks" not in r  # no redis-server to fork
    rendered = render_report(docs, {})
    assert rendered.count("### embedded fakeredis") == len(SUITES)


@pytest.mark.slow
@pytest.mark.real_redis
def test_every_suite_runs_at_a_tiny_size_on_a_real_redis(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _require_redis_server()
    docs = _run_tiny(tmp_path, "redis", monkeypatch)
    persist = docs["persist"]["backends"]["redis"]  # type: ignore[index]
    assert persist["rounds"][0]["batches"] >= 1
    # The breakdown is measured, not derived from one figure: each stage took time.
    parts = persist["per_record"]
    assert all(parts[k] > 0 for k in ("plan_us", "sql_us", "raw_us", "drain_us", "read_us"))
    assert parts["read_us"] + parts["rest_us"] == pytest.approx(parts["redis_us"])
    assert parts["budget_us"] == pytest.approx(parts["raw_us"] / 0.8)
    peers = docs["peers"]["backends"]["redis"]  # type: ignore[index]
    assert peers["put"]["raw MULTI SET+XADD (no dualmem)"]["count"] > 0
    assert len(peers["floor"]) == 2 and all(x > 0 for x in peers["floor"].values())
    for r in docs["lag"]["backends"]["redis"]["rates"]:  # type: ignore[index]
        _check_cpu(r, ["worker", "redis-server", "senders", "observer"], self_measured=["senders"])
        assert r["committed"] == r["writes"] > 0  # the worker process committed every write
        assert r["redis_forks"]["count"] >= 0 and set(r["redis_forks"]) == {
            "count",
            "latest_fork_ms",
        }


def _check_targets_are_their_figures(docs: dict[str, Any], backend: str) -> None:
    """Each target's value is what the figures stored beside it give: the README quotes
    these ratios, and a ratio taken the wrong way round, from the wrong row or the wrong
    percentile would report a speed nobody measured (each suite's own arithmetic, checked
    on what a tiny run measured, not on a timing)."""
    r = {suite: doc["backends"][backend] for suite, doc in docs.items()}

    def check(suite: str, values: list[float], limits: list[float]) -> None:
        targets = r[suite]["targets"]
        assert [t["value"] for t in targets] == pytest.approx(values), suite
        assert [t["limit"] for t in targets] == limits, suite

    rows = r["write"]["rows"]
    assert [row["level"] for row in rows] == [1, 2, 3, 4, 5]
    check("write", [row["dualmem_put"]["p95"] / row["raw_multi"]["p95"] for row in rows], [1.2] * 5)
    persist = r["persist"]
    rate, raw = persist["dualmem_rate"], persist["raw_rate"]
    assert rate == pytest.approx(stats.median(x["dualmem_rate"] for x in persist["rounds"]))
    assert raw == pytest.approx(stats.median(x["raw_rate"] for x in persist["rounds"]))
    check("persist", [rate, rate / raw], [50_000, 0.8])
    rows = r["read"]["rows"]
    assert [row["level"] for row in rows] == [3, 1]
    check(
        "read",
        [
            row["dualmem_get"]["p95"] / row[baseline]["p95"]
            for row in rows
            for baseline in ("sqlite_select_json", "diskcache_get")
        ],
        [3.0, 2.5] * 2,
    )
    rows = r["lag"]["rates"]
    assert [t["what"] for t in r["lag"]["targets"]] == [
        f"lag p95 at {row['offered_rate']} writes/s" for row in rows
    ]
    check("lag", [row["lag"]["p95"] / 1000 for row in rows], [5.0, 20.0])  # ms, as the limit
    put = r["peers"]["put"]
    pairs = [t["what"].removesuffix(" put p95").split(" put p95 / ") for t in r["peers"]["targets"]]
    assert pairs == [
        [peer, name]
        for peer in ("SqliteStore (defaults)", "SqliteStore (WAL, NORMAL)")
        for name in ("dualmem L3 SWARM", "dualmem L1 PRIVATE")
    ]
    check("peers", [put[peer]["p95"] / put[name]["p95"] for peer, name in pairs], [4.0] * 4)
    rows = r["scale"]["rows"]
    ratios = [row["put"]["p95"] / row["raw_multi"]["p95"] for row in rows]
    assert [row["put_p95_ratio"] for row in rows] == pytest.approx(ratios)
    drains = [stats.median(d["persist_rate_ratio"] for d in row["persist_rounds"]) for row in rows]
    check("scale", [max(ratios) / min(ratios), max(drains) / min(drains)], [1.5, 1.5])


def _check_cpu(row: dict[str, Any], names: list[str], self_measured: list[str]) -> None:
    """Every process's CPU is on record; those timing themselves (nanosecond clocks) used
    some, those read from /proc (10 ms ticks) may show none in a tiny run."""
    cpu = row["cpu"]
    per = cpu["per_write_us"]
    assert list(per) == names
    assert all(per[n] > 0 for n in self_measured) and all(v >= 0 for v in per.values())
    assert cpu["total_us"] == pytest.approx(sum(per.values()))
    assert cpu["needed_cpus"] == pytest.approx(cpu["total_us"] * row["offered_rate"] / 1e6)
    wait = cpu["cpu_wait_share"]
    assert wait is None or 0 <= wait <= 1


_PRAGMAS = (
    "auto_vacuum",
    "journal_mode",
    "synchronous",
    "foreign_keys",
    "wal_autocheckpoint",
    "cache_size",
)


def test_the_persist_baseline_gets_the_worker_connections_pragmas(tmp_path: Path) -> None:
    # It kept SQLite's default wal_autocheckpoint (a checkpoint inside a COMMIT every
    # 1000 pages), which the worker turns off: the baseline ran ~25 % slower and the
    # drain/raw ratio looked that much better than it was.
    from bench.suites.persist import raw_connection
    from dualmem.settings import Settings
    from dualmem.sqlite_store import SQLiteStore

    settings = Settings(db_path=str(tmp_path / "w.db"))
    store = SQLiteStore.from_settings(settings)
    try:
        with store._write() as conn:  # the worker's write connection
            worker = {p: conn.execute(f"PRAGMA {p}").fetchone()[0] for p in _PRAGMAS}
    finally:
        store.close()
    raw = raw_connection(tmp_path / "raw.db", settings)
    try:
        baseline = {p: raw.execute(f"PRAGMA {p}").fetchone()[0] for p in _PRAGMAS}
    finally:
        raw.close()
    assert baseline == worker and worker["wal_autocheckpoint"] == 0


def test_persist_rounds_after_the_first_drain_without_a_foreign_anchor_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Each round drains the same stream into a fresh database: the last round's anchor
    # (left in Redis) named an id this database did not hold, and the worker logged
    # "restored from an older backup?" once per round after the first. More than one
    # batch (500) a round: a one-batch round wrote the very anchor the last one left.
    from bench.suites import persist

    sizes = dataclasses.replace(harness.TINY, persist_backlog=600, persist_rounds=2)
    ctx = harness.Bench(sizes, 1, tmp_path / "scratch")
    with caplog.at_level(logging.WARNING), harness.open_backend("fakeredis", tmp_path) as backend:
        result = persist.run(ctx, backend)
    assert len(result["rounds"]) == 2
    assert not [r.getMessage() for r in caplog.records if "anchor" in r.getMessage()]


def test_scale_drains_each_size_in_rounds_from_the_same_database_and_reports_medians(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # One 20k drain and its 0.3 s baseline per size moved the rate ratio by up to 1.7x
    # between sizes on noise alone; rounds give a median. Each round starts from the same
    # copy of the size's database (not one grown by the rounds before), and the anchors
    # of the writer before it do not make the worker warn of a restored backup.
    from bench.stats import median
    from bench.suites import scale

    sizes = dataclasses.replace(harness.TINY, scale_sizes=(10,), scale_drain_rounds=3)
    ctx = harness.Bench(sizes, 1, tmp_path / "scratch")
    with caplog.at_level(logging.WARNING), harness.open_backend("fakeredis", tmp_path) as backend:
        result = scale.run(ctx, backend)
    (row,) = result["rows"]
    rounds = row["persist_rounds"]
    assert len(rounds) == 3
    assert [r["persist_batches"] for r in rounds] == [rounds[0]["persist_batches"]] * 3
    assert row["persist_rate_ratio"] == median(r["persist_rate_ratio"] for r in rounds)
    assert row["persist_rate"] == median(r["persist_rate"] for r in rounds)
    db = ctx.workdir / "scale-fakeredis.db"
    conn = sqlite3.connect(db)
    try:
        held = conn.execute("SELECT COUNT(*) FROM journal WHERE key LIKE 'bench/scale-persist/%'")
        # The last round's backlog alone: the rounds before it were drained into copies
        # replaced since.
        assert held.fetchone()[0] == sizes.scale_backlog
    finally:
        conn.close()
    assert not [r.getMessage() for r in caplog.records if "anchor" in r.getMessage()]


def _children(pid: int) -> dict[int, str]:
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out[int(d.name)] = cmd
    return out


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.real_redis
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_a_bench_stopped_with_sigterm_stops_every_process_it_started(tmp_path: Path) -> None:
    # SIGTERM (timeout, a cancelled CI job) killed Python at once: its redis-server and
    # `dualmem worker` kept running, and the scratch directory stayed.
    import os
    import time

    _require_redis_server()
    bench = subprocess.Popen(
        [sys.executable, "-m", "bench", "--sizes", "tiny", "--suite", "write"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # only the pid signalled below gets the signal
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    kids: dict[int, str] = {}
    deadline = time.monotonic() + 60
    while not any("dualmem worker" in c for c in kids.values()):
        assert bench.poll() is None and time.monotonic() < deadline, "no worker started"
        kids.update(_children(bench.pid))
        time.sleep(0.05)
    assert any("redis-server" in c for c in kids.values()), kids
    bench.send_signal(signal.SIGTERM)
    try:
        assert bench.wait(60) == 143
        left = {pid: cmd for pid, cmd in kids.items() if _running(pid)}
        assert left == {}, left
        assert not list(tmp_path.glob("dualmem-bench-scratch-*"))
    finally:
        for pid in kids:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.real_redis
def test_a_worker_start_interrupted_while_it_waits_stops_the_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # start() killed the worker only on its own timeout; anything else raised while it
    # waited for the start-up line (Ctrl-C) left it running, since __exit__ never ran.
    import time

    from bench import servers

    _require_redis_server()
    real_sleep = time.sleep
    with servers.RedisServer(tmp_path / "redis") as server:
        worker = servers.WorkerProcess(server.url, tmp_path / "w.db")

        calls = []

        def interrupted(seconds: float) -> None:  # Ctrl-C during start()'s first wait
            calls.append(seconds)
            if len(calls) == 1:
                raise KeyboardInterrupt
            real_sleep(seconds)

        monkeypatch.setattr(servers.time, "sleep", interrupted)
        with pytest.raises(KeyboardInterrupt):
            worker.start()
        monkeypatch.setattr(servers.time, "sleep", real_sleep)
        assert worker.proc is not None and worker.proc.poll() is not None


def test_interleaved_runs_every_op_once_a_round_in_shuffled_orders() -> None:
    # The latency suites' timing loop: the system and its baselines must meet the same
    # noise, so each round runs every op once, with the round's number, in a new order (a
    # fixed order gives one side the first-position cost every time), and the progress
    # bar advances by exactly the rounds run.
    calls: list[tuple[str, int]] = []
    ops = {name: (lambda i, name=name: calls.append((name, i))) for name in ("a", "b", "c")}
    advanced: list[int] = []
    began = time.perf_counter_ns()
    samples = harness.interleaved(ops, 300, harness.random.Random(7), advance=advanced.append)
    took = time.perf_counter_ns() - began
    assert sorted(samples) == ["a", "b", "c"]
    assert all(len(s) == 300 and min(s) >= 0 for s in samples.values())
    assert sum(map(sum, samples.values())) <= took  # durations, not clock readings
    rounds = [calls[3 * i : 3 * i + 3] for i in range(300)]
    assert all(sorted(r) == [("a", i), ("b", i), ("c", i)] for i, r in enumerate(rounds))
    orders = {tuple(name for name, _ in r) for r in rounds}
    assert len(orders) == 6  # every order of three, over 300 rounds
    assert sum(advanced) == 300 and advanced[:2] == [128, 128]
