"""Latency histograms per path (p50/p95/p99/max/count) and their Prometheus exposition."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping

__all__ = ["GAUGE_HELP", "PATHS", "Histogram", "Metrics", "prometheus_text"]

PATHS = ("redis_write", "encode", "persist", "lag", "read")

# Log-linear buckets (the HDR histogram layout): values below 2**_SUB nanoseconds are
# exact, above that each power of two is split into 2**_SUB buckets, so any quantile is
# within 1/2**_SUB (1.6 %) of the truth and memory is fixed whatever the sample count.
_SUB = 6
_M = 1 << _SUB
_MAX_EXP = 40  # below 2**47 ns (about 39 hours); from there on, the last bucket
_NBUCKETS = (_MAX_EXP + 2) * _M


def _index(v: int) -> int:
    if v < _M:
        return max(v, 0)
    e = v.bit_length() - _SUB - 1
    if e > _MAX_EXP:
        return _NBUCKETS - 1
    return e * _M + (v >> e)


def _bounds(idx: int) -> tuple[int, int]:
    if idx < _M:
        return idx, idx
    e = idx // _M - 1
    top = idx - e * _M
    return top << e, ((top + 1) << e) - 1


class Histogram:
    """A fixed-size latency histogram in nanoseconds; thread-safe.

    >>> h = Histogram()
    >>> for us in range(1, 1001):
    ...     h.record(us * 1000)
    >>> s = h.summary()
    >>> s["count"], round(s["p50"], 2), round(s["p95"], 2), s["max"]
    (1000, 0.5, 0.95, 1.0)
    """

    __slots__ = ("_counts", "_lock", "count", "max", "min", "total")

    def __init__(self) -> None:
        self._counts = [0] * _NBUCKETS
        self._lock = threading.Lock()
        self.count = 0
        self.total = 0
        self.max = 0
        self.min = 0

    def record(self, ns: int, n: int = 1) -> None:
        """Add ``n`` samples of ``ns`` nanoseconds."""
        idx = _index(ns)
        with self._lock:
            self._counts[idx] += n
            if self.count == 0 or ns < self.min:
                self.min = ns
            self.count += n
            self.total += ns * n
            self.max = max(self.max, ns)

    def record_many(self, values: list[int]) -> None:
        """Add one sample per value (nanoseconds), taking the lock once."""
        if not values:
            return
        indexes = [_index(v) for v in values]
        low, high = min(values), max(values)
        with self._lock:
            counts = self._counts  # under the lock: reset() replaces the list
            for idx in indexes:
                counts[idx] += 1
            if self.count == 0 or low < self.min:
                self.min = low
            self.count += len(values)
            self.total += sum(values)
            self.max = max(self.max, high)

    def quantile(self, q: float) -> float:
        """The ``q`` quantile (0..1) in nanoseconds, 0.0 when empty."""
        with self._lock:
            return self._quantile_locked(q)

    def _quantile_locked(self, q: float) -> float:
        if self.count == 0:
            return 0.0
        rank = max(1, int(q * self.count + 0.999999999))
        seen = 0
        for idx, c in enumerate(self._counts):
            if not c:
                continue
            seen += c
            if seen >= rank:
                lo, hi = _bounds(idx)
                mid = (lo + hi) / 2
                return float(min(max(mid, self.min), self.max))
        return float(self.max)

    def summary(self) -> dict[str, float]:
        """``count``, ``p50``, ``p95``, ``p99``, ``max`` and ``mean``; times in milliseconds."""
        with self._lock:
            qs = [self._quantile_locked(q) / 1e6 for q in (0.5, 0.95, 0.99)]
            mean = self.total / self.count / 1e6 if self.count else 0.0
            return {
                "count": self.count,
                "p50": qs[0],
                "p95": qs[1],
                "p99": qs[2],
                "max": self.max / 1e6,
                "mean": mean,
                "sum": self.total / 1e6,
            }

    def reset(self) -> None:
        """Forget every sample."""
        with self._lock:
            self._counts = [0] * _NBUCKETS
            self.count = self.total = self.max = self.min = 0


class Metrics:
    """One histogram per path; ``snapshot()`` is what ``DualMemory.metrics()`` returns.

    >>> m = Metrics()
    >>> m.record("read", 2_000_000)
    >>> m.snapshot()["read"]["p95"]
    2.0
    """

    def __init__(self, paths: Iterable[str] = PATHS) -> None:
        self.histograms: dict[str, Histogram] = {p: Histogram() for p in paths}

    def record(self, path: str, ns: int, n: int = 1) -> None:
        """Record a latency of ``ns`` nanoseconds (``n`` times) on ``path``."""
        self.histograms[path].record(ns, n)

    def snapshot(self) -> dict[str, dict[str, float]]:
        """``{path: {"count", "p50", "p95", "p99", "max", "mean", "sum"}}`` in milliseconds."""
        return {path: h.summary() for path, h in self.histograms.items()}

    def reset(self) -> None:
        """Forget every sample on every path."""
        for h in self.histograms.values():
            h.reset()


#: What each gauge of the exposition means (its ``# HELP`` line).
GAUGE_HELP = {
    "backlog": "Commands in Redis not yet persisted to SQLite (pending and undelivered)",
    "pending": "Commands delivered to a worker and not yet acknowledged",
    "dead_letters": "Dead-lettered commands not replayed",
    "db_bytes": "Size of the SQLite database and its WAL file, bytes",
    "journal_seq": "Seq of the newest journal row",
    "redis_up": "1 if Redis answered this scrape, else 0",
}


def prometheus_text(
    snapshot: Mapping[str, Mapping[str, float]], gauges: Mapping[str, float] | None = None
) -> str:
    """Prometheus text exposition (format 0.0.4) of a metrics snapshot.

    >>> print(prometheus_text({"read": Histogram().summary()}).splitlines()[2])
    dualmem_latency_seconds{path="read",quantile="0.5"} NaN
    """
    lines = [
        "# HELP dualmem_latency_seconds Latency per dualmem path.",
        "# TYPE dualmem_latency_seconds summary",
    ]
    for path, s in snapshot.items():
        for q, name in (("0.5", "p50"), ("0.95", "p95"), ("0.99", "p99")):
            # No sample: NaN, as client libraries export it (0 would read as no latency).
            shown = _num(s[name] / 1e3) if s["count"] else "NaN"
            lines.append(f'dualmem_latency_seconds{{path="{path}",quantile="{q}"}} {shown}')
        lines.append(f'dualmem_latency_seconds_sum{{path="{path}"}} {_num(s["sum"] / 1e3)}')
        lines.append(f'dualmem_latency_seconds_count{{path="{path}"}} {int(s["count"])}')
    for name, value in (gauges or {}).items():
        lines.append(f"# HELP dualmem_{name} {GAUGE_HELP.get(name, name.replace('_', ' '))}.")
        lines.append(f"# TYPE dualmem_{name} gauge")
        lines.append(f"dualmem_{name} {_num(value)}")
    return "\n".join(lines) + "\n"


def _num(x: float) -> str:
    return "0" if x == 0 else repr(float(x))
