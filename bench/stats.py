"""Pure statistics for the suites: percentiles, summaries, CDF points, ratios and targets."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "Target",
    "cdf_points",
    "flatness",
    "fmt",
    "median",
    "percentile",
    "ratio",
    "summarize",
    "us",
]


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of already sorted values, by nearest rank.

    Nearest rank returns a value that was actually observed, so a p95 never blends the
    tail with the body. ``nan`` for no values.

    >>> percentile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 0.95)
    10
    >>> percentile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 0.5)
    5
    >>> percentile([1, 2, 3], 0), percentile([], 0.5)
    (1, nan)
    """
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def median(values: Iterable[float]) -> float:
    """The median (mean of the middle two for an even count); ``nan`` when empty.

    >>> median([3, 1, 2]), median([4, 1, 2, 3])
    (2, 2.5)
    """
    xs = sorted(values)
    if not xs:
        return math.nan
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def summarize(samples_ns: Iterable[int]) -> dict[str, float]:
    """``count``, ``p50``, ``p95``, ``p99``, ``max`` and ``mean`` of nanosecond samples,
    in microseconds.

    >>> s = summarize(range(1000, 101000, 1000))
    >>> s["count"], s["p50"], s["p95"], s["p99"], s["max"], s["mean"]
    (100, 50.0, 95.0, 99.0, 100.0, 50.5)
    >>> summarize([3000, 1000, 2000])["p50"]  # any order
    2.0
    """
    xs = sorted(samples_ns)
    if not xs:
        nan = math.nan
        return {"count": 0, "p50": nan, "p95": nan, "p99": nan, "max": nan, "mean": nan}
    return {
        "count": len(xs),
        "p50": percentile(xs, 0.50) / 1e3,
        "p95": percentile(xs, 0.95) / 1e3,
        "p99": percentile(xs, 0.99) / 1e3,
        "max": xs[-1] / 1e3,
        "mean": sum(xs) / len(xs) / 1e3,
    }


def cdf_points(samples_ns: Iterable[int], points: int = 400) -> list[list[float]]:
    """``[[latency_us, fraction], ...]``: the empirical CDF at ``points`` evenly spaced
    fractions, small enough to store in a result file and plot later.

    >>> cdf_points([5000, 1000, 3000], points=3)
    [[1.0, 0.3333], [3.0, 0.6667], [5.0, 1.0]]
    """
    xs = sorted(samples_ns)
    if not xs:
        return []
    out = []
    for i in range(1, points + 1):
        q = i / points
        out.append([percentile(xs, q) / 1e3, round(q, 4)])
    return out


def ratio(value: float, baseline: float) -> float:
    """``value / baseline``; ``nan`` when the baseline is zero or missing.

    >>> ratio(3.0, 2.0), ratio(1.0, 0.0)
    (1.5, nan)
    """
    if not baseline or math.isnan(baseline) or math.isnan(value):
        return math.nan
    return value / baseline


def flatness(values: Iterable[float]) -> float:
    """``max / min`` of positive values (1.0 means perfectly flat); ``nan`` if any is missing.

    >>> flatness([3.0, 2.0, 2.5]), flatness([2.0, float("nan")]), flatness([2.0, 0.0])
    (1.5, nan, nan)
    """
    xs = list(values)
    if not xs or any(math.isnan(x) or x <= 0 for x in xs):
        return math.nan
    return max(xs) / min(xs)


@dataclass(frozen=True)
class Target:
    """One target of the issue's table, checked against a measured value.

    ``op`` is ``"<="`` (the value must not exceed ``limit``) or ``">="``.

    >>> t = Target.check("write", "redis", "put p95 / raw p95, level 1", 1.13, "<=", 1.2)
    >>> t.met, t.text
    (True, '1.13 ≤ 1.2')
    >>> t = Target.check("persist", "redis", "records/s", 50_000, ">=", 50_000, "/s")
    >>> t.met, t.text
    (True, '50000/s ≥ 50000/s')
    """

    suite: str
    backend: str
    what: str
    value: float
    op: str
    limit: float
    met: bool
    unit: str = ""
    #: What the report prints beside the ratio: dualmem's figure and the baseline's.
    dualmem: str = ""
    baseline: str = ""

    @classmethod
    def check(
        cls,
        suite: str,
        backend: str,
        what: str,
        value: float,
        op: str,
        limit: float,
        unit: str = "",
        *,
        dualmem: str = "",
        baseline: str = "",
    ) -> Target:
        """Build the target and decide ``met`` (a missing value never meets a target)."""
        if op not in ("<=", ">="):
            raise ValueError(f"op must be '<=' or '>=', got {op!r}")
        ok = not math.isnan(value) and (value <= limit if op == "<=" else value >= limit)
        return cls(suite, backend, what, value, op, limit, ok, unit, dualmem, baseline)

    @property
    def text(self) -> str:
        """``"<value> ≤ <limit>"`` with the unit, as the report prints it."""
        sign = "≤" if self.op == "<=" else "≥"
        return f"{fmt(self.value)}{self.unit} {sign} {fmt(self.limit)}{self.unit}"

    def to_json(self) -> dict[str, Any]:
        """A plain dict for the result files."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Target:
        """Inverse of :meth:`to_json` (a ``null`` value, written for NaN, reads as NaN)."""
        fields = dict(data)
        if fields.get("value") is None:
            fields["value"] = math.nan
        return cls(**fields)


def us(x: float | None) -> str:
    """A latency in microseconds for the report.

    >>> us(181.46), us(9.87), us(12345.6)
    ('181 µs', '9.9 µs', '12.3 ms')
    """
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if x >= 10_000:
        return f"{x / 1000:.1f} ms"
    if x >= 100:
        return f"{x:.0f} µs"
    return f"{x:.1f} µs"


def fmt(x: float | None) -> str:
    """A number with three significant digits (thousands kept whole), ``n/a`` for nan.

    >>> fmt(1.23456), fmt(0.0421), fmt(51234.9), fmt(float("nan"))
    ('1.23', '0.0421', '51235', 'n/a')
    """
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if abs(x) >= 1000:
        return f"{x:.0f}"
    return f"{x:.3g}"
