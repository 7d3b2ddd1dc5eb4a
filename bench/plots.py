"""PNG plots from the result documents (matplotlib, from the ``bench`` extra)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["make_plots"]

_BACKENDS = (("redis", "real redis-server"), ("fakeredis", "embedded fakeredis"))


def make_plots(docs: Mapping[str, Mapping[str, Any]], directory: Path) -> dict[str, str]:
    """Draw what the documents allow; returns ``{suite: png file name}``."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    made: dict[str, str] = {}
    if "write" in docs:
        made["write"] = _write_cdf(docs["write"], directory / "write_cdf.png")
    if "lag" in docs:
        made["lag"] = _lag_vs_rate(docs["lag"], directory / "lag_vs_rate.png")
    return made


def _write_cdf(doc: Mapping[str, Any], path: Path) -> str:
    import matplotlib.pyplot as plt

    present = [(b, title) for b, title in _BACKENDS if b in doc["backends"]]
    fig, axes = plt.subplots(1, len(present), figsize=(6.5 * len(present), 4.5), squeeze=False)
    for ax, (backend, title) in zip(axes[0], present, strict=True):
        for name, points in doc["backends"][backend]["cdf_us"].items():
            if not points:
                continue
            xs = [p[0] for p in points]
            ys = [p[1] for p in points]
            raw = name.startswith("raw")
            ax.plot(
                xs,
                ys,
                label=name,
                color="black" if raw else None,
                linestyle="--" if raw else "-",
                linewidth=2 if raw else 1.2,
            )
        ax.axhline(0.95, color="grey", linewidth=0.6, linestyle=":")
        ax.set_xscale("log")
        ax.set_xlabel("latency (µs, log scale)")
        ax.set_ylabel("fraction of writes")
        ax.set_title(f"put latency CDF: {title}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _lag_vs_rate(doc: Mapping[str, Any], path: Path) -> str:
    import matplotlib.pyplot as plt

    from bench.suites.lag import TARGETS_MS

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    styles = {"redis": "-", "fakeredis": "--"}
    for backend, title in _BACKENDS:
        result = doc["backends"].get(backend)
        if not result:
            continue
        rates = [r["offered_rate"] for r in result["rates"]]
        for q, marker in (("p50", "o"), ("p95", "s"), ("p99", "^")):
            ys = [r["lag"][q] / 1000 for r in result["rates"]]
            ax.plot(rates, ys, styles[backend], marker=marker, label=f"{title} {q}")
    for rate, limit in TARGETS_MS.items():
        ax.plot([rate], [limit], marker="*", color="red", markersize=14, linestyle="none")
        ax.annotate(f"target p95 ≤ {limit:g} ms", (rate, limit), textcoords="offset points",
                    xytext=(6, 6), fontsize=8, color="red")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("offered rate (writes/s, open loop)")
    ax.set_ylabel("write → queryable lag (ms)")
    ax.set_title("lag against offered rate")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name
