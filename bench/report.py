"""Result files in, ``REPORT.md`` out: the targets table, per-suite tables, method notes."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.stats import Target, fmt, us

__all__ = ["load_results", "render_report", "targets_table", "write_report"]

BACKENDS = ("redis", "fakeredis")
_BACKEND_TITLE = {"redis": "real redis-server", "fakeredis": "embedded fakeredis"}


def load_results(directory: Path) -> dict[str, dict[str, Any]]:
    """``{suite: document}`` for every ``<suite>.json`` in ``directory``, in suite order."""
    from bench.suites import SUITES

    out: dict[str, dict[str, Any]] = {}
    for name in SUITES:
        path = directory / f"{name}.json"
        if path.exists():
            out[name] = json.loads(path.read_text(encoding="utf-8"))
    return out


def _targets(docs: Mapping[str, Mapping[str, Any]]) -> list[Target]:
    out: list[Target] = []
    for doc in docs.values():
        for backend in BACKENDS:
            result = doc.get("backends", {}).get(backend)
            if result:
                out.extend(Target.from_json(t) for t in result.get("targets", []))
    return out


def targets_table(docs: Mapping[str, Mapping[str, Any]]) -> str:
    """The markdown table of every target: dualmem, baseline, measured, target, met."""
    lines = [
        "| suite | backend | measure | dualmem | baseline | measured | target | result |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in _targets(docs):
        sign = "≤" if t.op == "<=" else "≥"
        lines.append(
            f"| {t.suite} | {t.backend} | {t.what} | {t.dualmem or '—'} | {t.baseline or '—'} "
            f"| {fmt(t.value)}{t.unit} | {sign} {fmt(t.limit)}{t.unit} "
            f"| {'met' if t.met else '**missed**'} |"
        )
    return "\n".join(lines)


def _pcts(s: Mapping[str, float]) -> str:
    return f"{us(s['p50'])} | {us(s['p95'])} | {us(s['p99'])}"


def _write(result: Mapping[str, Any]) -> list[str]:
    lines = [
        "| level | put p50 / p95 / p99 | raw MULTI p50 / p95 / p99 | p95 ratio "
        "| same commands, dualmem's transport: p95 | ratio to it | `redis_write` p95 "
        "| `encode` p95 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        same = r.get("raw_same_commands")
        lines.append(
            f"| {r['level']} {r['level_name']} | {_slash(r['dualmem_put'])} "
            f"| {_slash(r['raw_multi'])} | {fmt(r['p95_ratio'])} "
            f"| {us(same['p95']) if same else '—'} "
            f"| {fmt(r['p95_ratio_same_commands']) if same else '—'} "
            f"| {us(r['redis_write']['p95'])} | {us(r['encode']['p95'])} |"
        )
    extra = result.get("rows_without_worker")
    if extra:
        lines += [
            "",
            "Diagnosis, no target: the same rounds with no worker running during the timed "
            "section (`worker=False`, and no `dualmem worker` process).",
            "",
            "| level | put p50 / p95 / p99 | raw MULTI p50 / p95 / p99 | p95 ratio "
            "| `encode` p95 |",
            "|---|---|---|---|---|",
        ]
        for r in extra:
            lines.append(
                f"| {r['level']} {r['level_name']} | {_slash(r['dualmem_put'])} "
                f"| {_slash(r['raw_multi'])} | {fmt(r['p95_ratio'])} "
                f"| {us(r['encode']['p95'])} |"
            )
    return lines


def _slash(s: Mapping[str, float]) -> str:
    return " / ".join(us(s[p]) for p in ("p50", "p95", "p99"))


def _persist(result: Mapping[str, Any]) -> list[str]:
    lines = [
        f"Backlog {result['backlog']:,} commands, batch size {result['batch_size']}.",
        "",
        "| round | worker drain | raw executemany | ratio | drain seconds | batches |",
        "|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(result["rounds"]):
        lines.append(
            f"| {i + 1} | {r['dualmem_rate']:,.0f}/s | {r['raw_rate']:,.0f}/s "
            f"| {fmt(r['dualmem_rate'] / r['raw_rate'])} | {r['seconds']:.2f} | {r['batches']} |"
        )
    lines.append(
        f"| **median** | **{result['dualmem_rate']:,.0f}/s** | **{result['raw_rate']:,.0f}/s** "
        f"| **{fmt(result['ratio'])}** | | |"
    )
    b = result.get("per_record")
    if b:
        lines += [
            "",
            "Where a drained record's time goes (microseconds a record; planning, apply and "
            "the worker's read timed again on the same backlog outside the worker's loop; "
            "the rest is the drain's remaining time):",
            "",
            "| drain, all of it | SQL: lookups, inserts, commit | planning: decode, hash "
            "chains, rows | read: XREADGROUP and parsing | the rest: XACK and PUBLISH, "
            "notifications, metrics | raw executemany | allowed at 0.8 of raw |",
            "|---|---|---|---|---|---|---|",
            f"| {b['drain_us']:.1f} | {b['sql_us']:.1f} | {b['plan_us']:.1f} "
            f"| {b['read_us']:.1f} | {b['rest_us']:.1f} | {b['raw_us']:.1f} "
            f"| {b['budget_us']:.1f} |",
        ]
    return lines


def _read(result: Mapping[str, Any]) -> list[str]:
    lines = [
        f"{result['records_per_level']:,} records per level.",
        "",
        "| level | dualmem get p50 / p95 / p99 | SQLite SELECT + json.loads | SQLite row only "
        "| diskcache get | ÷ SQLite | ÷ row only | ÷ diskcache |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        cells = [
            " / ".join(us(r[name][p]) for p in ("p50", "p95", "p99"))
            for name in ("dualmem_get", "sqlite_select_json", "sqlite_select_row", "diskcache_get")
        ]
        lines.append(
            f"| {r['level']} {r['level_name']} | {' | '.join(cells)} "
            f"| {fmt(r['p95_vs_sqlite'])} | {fmt(r['p95_vs_sqlite_row'])} "
            f"| {fmt(r['p95_vs_diskcache'])} |"
        )
    lines.append("")
    lines.append("Ratios are of p95s; p50 / p95 / p99 per contender.")
    return lines


def _lag(result: Mapping[str, Any]) -> list[str]:
    lines = [
        "| offered | senders | achieved | lag p50 | lag p95 | lag p99 | lag max "
        "| send start delay p95 | lag p95 from send start | not visible in window "
        "| committed | full GCs: count, longest, writes in flight "
        "| Redis forks: count, last fork call |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rates"]:
        lag = r["lag"]
        gcs = r.get("full_gc")
        gc_cell = (
            f"{gcs['count']}, {gcs['max_ms']:.1f} ms, {gcs['writes_in_flight']:,}"
            if gcs is not None
            else "—"
        )
        lines.append(
            f"| {r['offered_rate']:,}/s | {r['senders']} | {r['achieved_send_rate']:,.0f}/s "
            f"| {us(lag['p50'])} | {us(lag['p95'])} | {us(lag['p99'])} | {us(lag['max'])} "
            f"| {us(r['send_start_delay']['p95'])} | {us(r['lag_from_send_start']['p95'])} "
            f"| {r['not_visible']} | {_committed_cell(r)} | {gc_cell} | {_forks_cell(r)} |"
        )
    lines += [
        "",
        "Send start delay: how late senders started sends against their schedule (time the "
        "lag includes before the write reached dualmem: on a busy machine, the load "
        "generator's own queueing). Lag from send start leaves that out (diagnosis only; "
        "targets use the lag from the intended time). Full GCs (embedded fakeredis only): "
        "generation-2 collections of the one process while that rate ran; each stops the "
        "writers and the worker thread, and its length grows with the entries the in-process "
        "cache holds. Writes in flight: counted writes whose intended send time to first "
        "sighting overlaps one. Not visible in window: counted writes the observer had not "
        "seen when it stopped, `lag_seconds` + 60 s after the start (no lag figure for them,"
        " so the rate's target reads n/a). Committed: writes of the rate the journal held "
        "afterwards; the suite waits for all of them and fails the run if one is missing, "
        "so writes that were late are never confused with writes that were lost. Redis "
        "forks (real Redis only): the server's forks while the rate ran, with AOF on and "
        "snapshots off each an AOF rewrite Redis started on its own (the file had doubled "
        "and passed 64 MB); the rewrite takes a CPU while it runs and the fork call stops "
        "the server (the last call's length: Redis keeps only that one).",
        "",
        *_lag_cpu(result["rates"]),
    ]
    return lines


def _committed_cell(row: Mapping[str, Any]) -> str:
    """``committed of writes`` (results from before the check was made: unknown)."""
    if "committed" not in row:
        return "—"
    return f"{row['committed']:,} of {row['writes']:,}"


def _forks_cell(row: Mapping[str, Any]) -> str:
    """``count, last fork call`` (fakeredis, and results from before forks were
    counted: a dash).

    >>> _forks_cell({"redis_forks": {"count": 2, "latest_fork_ms": 3.14}})
    '2, 3.1 ms'
    >>> _forks_cell({"redis_forks": {"count": 0, "latest_fork_ms": None}}), _forks_cell({})
    ('0', '—')
    """
    forks = row.get("redis_forks")
    if forks is None:
        return "—"
    if not forks["count"]:
        return "0"
    return f"{forks['count']}, {forks['latest_fork_ms']:.1f} ms"


def _lag_cpu(rates: Sequence[Mapping[str, Any]]) -> list[str]:
    rows = [r for r in rates if "cpu" in r]
    if not rows:
        return []
    names = list(rows[0]["cpu"]["per_write_us"])
    lines = [
        "CPU per write sent (user + system time of each process over the rate's window), "
        "what their sum needs at the offered rate, and the share of the window in which "
        "some runnable task waited for a CPU (the kernel's pressure stall information; "
        "n/a where the kernel has none):",
        "",
        f"| offered | achieved | {' | '.join(names)} | total | CPUs needed at the offered "
        "rate | waiting for a CPU |",
        "|---|---|" + "---|" * len(names) + "---|---|---|",
    ]
    for r in rows:
        cpu = r["cpu"]
        wait = cpu["cpu_wait_share"]
        wait_cell = "n/a" if wait is None else f"{wait:.0%} of the time"
        cells = " | ".join(us(cpu["per_write_us"].get(n)) for n in names)
        lines.append(
            f"| {r['offered_rate']:,}/s | {r['achieved_send_rate']:,.0f}/s | {cells} "
            f"| {us(cpu['total_us'])} | {cpu['needed_cpus']:.2f} of {cpu['cpus']} "
            f"| {wait_cell} |"
        )
    return lines


def _peers(result: Mapping[str, Any]) -> list[str]:
    lines = [
        "| contender | put p50 | put p95 | put p99 | get p50 | get p95 | get p99 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, put in result["put"].items():
        get = result["get"].get(name)
        gets = _pcts(get) if get else "— | — | —"
        lines.append(f"| {name} | {_pcts(put)} | {gets} |")
    floor = result.get("floor")
    if floor:
        lines += [
            "",
            "A bare redis-py MULTI against each peer (peer put p95 / raw MULTI put p95, "
            "same rounds): " + ", ".join(f"{peer} {fmt(x)}x" for peer, x in floor.items()) + ".",
        ]
    return lines


def _scale(result: Mapping[str, Any]) -> list[str]:
    lines = [
        "| stored records | put p50 | put p95 | put p99 | raw MULTI p95 | put p95 ratio "
        "| drain rate | raw executemany | rate ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['records']:,} | {_pcts(r['put'])} | {us(r['raw_multi']['p95'])} "
            f"| {fmt(r['put_p95_ratio'])} | {r['persist_rate']:,.0f}/s "
            f"| {r['raw_executemany_rate']:,.0f}/s | {fmt(r['persist_rate_ratio'])} |"
        )
    lines.append("")
    lines.append(
        "Undivided max/min over sizes (machine drift included): put p95 "
        f"{fmt(result['put_p95_flatness_absolute'])}, drain rate "
        f"{fmt(result['persist_rate_flatness_absolute'])}."
    )
    return lines


_DETAIL = {
    "write": ("Write path", _write),
    "persist": ("Persist", _persist),
    "read": ("Read path", _read),
    "lag": ("Lag (write → queryable)", _lag),
    "peers": ("Peers", _peers),
    "scale": ("Scale", _scale),
}

_PLOTS = {
    "write": ("write_cdf.png", "Put latency CDF per level beside the raw MULTI baseline"),
    "lag": ("lag_vs_rate.png", "Lag percentiles against offered rate"),
}


def _machine(docs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    runs: dict[str, Mapping[str, Any]] = {}
    for doc in docs.values():
        run = doc["run"]
        # Each suite's file was written when that suite finished: the latest knows the
        # run's full duration.
        if run["id"] not in runs or run["seconds"] > runs[run["id"]]["seconds"]:
            runs[run["id"]] = run
    lines = []
    for run in runs.values():
        m = run["machine"]
        pk = m["packages"]
        lines += [
            f"- command: `{run['command']}` (sizes `{run['sizes']['name']}`, seed {run['seed']}, "
            f"started {m['started_utc']}, suites took {run.get('seconds', 0):.0f} s)",
            f"- {m['cpu_count']} CPUs ({m['cpu_model']}), {m['platform']}, "
            f"load average at start {m['load_average_at_start']}",
            f"- {m['python']}, SQLite {m['sqlite']}, redis-server {m['redis_server']}, "
            f"redis-py {pk.get('redis')} ({m['redis_py_parser']} parser), fakeredis "
            f"{pk.get('fakeredis')}, diskcache {pk.get('diskcache')}, "
            f"langgraph-checkpoint-sqlite {pk.get('langgraph-checkpoint-sqlite')}",
        ]
    return lines


def render_report(docs: Mapping[str, Mapping[str, Any]], plots: Mapping[str, str]) -> str:
    """The text of ``REPORT.md`` for the result documents (``plots``: suite -> file name)."""
    targets = _targets(docs)
    met = sum(t.met for t in targets)
    out = [
        "# dualmem benchmark report",
        "",
        "Generated by `python -m bench` from the JSON files beside this one; do not edit by "
        "hand. Every ratio compares dualmem with a baseline measured in the same run, on the "
        "same machine, interleaved operation by operation (see each suite's method), because "
        "absolute times on a shared machine mean little. Suites run one after another in "
        "one process; each starts after a full garbage collection, so none pays for the "
        "garbage of the one before.",
        "",
        *_machine(docs),
        "",
        f"## Targets ({met} of {len(targets)} met)",
        "",
        targets_table(docs),
    ]
    for suite, doc in docs.items():
        title, detail = _DETAIL[suite]
        out += ["", f"## {title}", ""]
        first = next(iter(doc["backends"].values()))
        out += [first["method"], ""]
        for backend in BACKENDS:
            result = doc["backends"].get(backend)
            if not result:
                continue
            out += [f"### {_BACKEND_TITLE[backend]}", "", *detail(result), ""]
        if suite in plots:
            out += [f"![{_PLOTS[suite][1]}]({plots[suite]})", ""]
    return "\n".join(out).rstrip() + "\n"


def write_report(directory: Path, *, plots: bool = True) -> Path:
    """Render ``REPORT.md`` (and the PNG plots, when matplotlib is there) in ``directory``."""
    docs = load_results(directory)
    made: dict[str, str] = {}
    if plots:
        from bench.plots import make_plots

        made = make_plots(docs, directory)
    path = directory / "REPORT.md"
    path.write_text(render_report(docs, made), encoding="utf-8")
    return path
