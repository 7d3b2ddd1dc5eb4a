"""The worker: reads command streams in batches, commits them to the store, acks, publishes."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from acl.crypto import envelope_sealing
from dualmem.commands import (
    CACHE_TOMBSTONE,
    cache_value,
    cached_envelope,
    sid_of,
    stream_id_of,
)
from dualmem.errors import DualMemError, StoreUnavailable
from dualmem.layout import Layout
from dualmem.metrics import Metrics
from dualmem.redis_backend import (
    in_process,
    retries_of,
    send_many,
    text,
    transact,
    translate_errors,
)
from dualmem.settings import Settings
from dualmem.store import ApplyResult, Notification, Store, StreamEntry

__all__ = [
    "Worker",
    "WorkerStats",
    "default_consumer_name",
    "forget_consumer",
    "next_stream_id",
    "purge_floor",
]

log = logging.getLogger("dualmem.worker")

_TRIM_INTERVAL = 0.5
_IDLE_WAIT = 0.05
_MAX_BACKOFF = 1.0
# A batch costs nearly the same whether it holds one command or fifty: one SQLite
# transaction (its WAL pages), one ack pipeline, one read round trip. After a batch this
# small the loop pauses for _LINGER so the next read takes what arrived meanwhile. At 2k
# writes/s, measured with the lag suite of bench/ (2 CPUs, two runs each): with no pause
# a worker process spent about a third more CPU per record than with 1 ms; 1 ms gave it
# 215 µs of CPU per write and lag p95 3.8-3.9 ms (real Redis), 5.2-6.0 ms (fakeredis);
# 0.5 ms gave 254-263 µs and 3.3-3.7 ms, 4.3-4.6 ms: most of the batching for half the
# wait. When batches are full it never happens.
_LINGER = 0.0005
_SMALL_BATCH_FRACTION = 10


def default_consumer_name() -> str:
    """``host-pid-random``: unique per process, readable in ``XINFO CONSUMERS``."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


def next_stream_id(stream_id: str) -> str:
    """The smallest stream id after ``stream_id``.

    >>> next_stream_id("1700000000000-5")
    '1700000000000-6'
    >>> next_stream_id("1700000000000-18446744073709551615")  # where forget_consumer sets it
    '1700000000001-0'
    """
    ms, _, seq = stream_id.partition("-")
    if int(seq or 0) >= (1 << 64) - 1:  # the last sequence number of that millisecond
        return f"{int(ms) + 1}-0"
    return f"{ms}-{int(seq or 0) + 1}"


@dataclass
class WorkerStats:
    """Counters of one worker since it started."""

    batches: int = 0
    applied: int = 0
    duplicates: int = 0
    claimed: int = 0
    dead_lettered: int = 0
    failures: int = 0


class Worker:
    """Persists the command streams of one namespace into a :class:`Store`.

    Loop (``step``): claim entries of dead consumers (idle > ``claim_idle_ms``) or re-read
    this consumer's own failed entries, else ``XREADGROUP COUNT batch_size BLOCK block_ms``
    -> ``store.apply`` (one transaction) -> one pipeline with ``XACK`` and a ``PUBLISH``
    per change -> now and then trim each stream below its oldest unacknowledged entry.

    Ordering argument: the ack follows the commit, so a crash in between redelivers
    entries that are already committed; ``apply`` recognises them by stream id and
    changes nothing. Trimming never passes the oldest pending or undelivered entry, so
    the stream always holds every command not yet committed.
    """

    def __init__(
        self,
        client: redis.Redis,
        store: Store,
        settings: Settings,
        *,
        metrics: Metrics | None = None,
        wakeup: threading.Event | None = None,
        on_commit: Callable[[], None] | None = None,
        shards: Sequence[int] | None = None,
    ) -> None:
        self.redis = client
        self.store = store
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.layout = Layout(settings.namespace, settings.shards)
        self.group = settings.group
        self.consumer = settings.consumer or default_consumer_name()
        self.shards = list(range(settings.shards) if shards is None else shards)
        self.streams = {self.layout.stream(s): s for s in self.shards}
        self._all_streams = [self.layout.stream(s) for s in range(settings.shards)]
        self.stats = WorkerStats()
        self._wakeup = wakeup
        self._on_commit = on_commit
        self._retry_own = False
        # Set when a batch failed as a whole with an unexpected error: the next read adds
        # new entries to this consumer's pending ones, so a lone poison entry can be told
        # apart from a fault that fails everything (see _apply_alone).
        self._mix_new = False
        now = time.monotonic()
        self._next_claim = now  # claim at start: a restart picks up a dead consumer's work
        self._next_trim = now + _TRIM_INTERVAL
        self._next_purge = now + settings.purge_interval
        self._next_metrics = now + settings.metrics_interval
        self._stopping = threading.Event()
        # Set while drain() runs: a commit that keeps failing (the database locked by
        # another connection) is retried until then, not forever.
        self._deadline: float | None = None

    # -- set-up ------------------------------------------------------------------------

    def ensure_groups(self) -> None:
        """Create the consumer group on every stream (idempotent, from id 0)."""
        ensure_groups(self.redis, self.streams, self.group, self.store)

    def _recreate_groups(self) -> None:
        # Redis came back without the consumer group (restarted with no persistence, or
        # its data lost). Writers' XADDs recreate the stream but not the group, so without
        # this every later put would be acknowledged and never persisted. From id 0: what
        # was written meanwhile is delivered; anything already committed is a duplicate.
        try:
            self.ensure_groups()
            log.warning(
                "worker %s: consumer group %s was missing; recreated", self.consumer, self.group
            )
        except DualMemError as exc:
            log.warning("worker %s: could not recreate the consumer group: %s", self.consumer, exc)

    # -- the loop ----------------------------------------------------------------------

    def run(
        self,
        stop: threading.Event,
        *,
        drain_timeout: float | Callable[[], float] | None = None,
    ) -> int:
        """Work until ``stop`` is set, then drain for up to ``drain_timeout`` seconds (a
        callable is asked when the drain starts: ``close(timeout=...)`` decides it late).

        Returns how many commands were still pending when it gave up (0 when drained).
        Redis or SQLite outages are retried with backoff; they never end the loop.
        """
        self._stopping = stop
        backoff = 0.0
        small = max(2, self.settings.batch_size // _SMALL_BATCH_FRACTION)
        while not stop.is_set():
            try:
                if 0 < self.step(block=True) < small:
                    stop.wait(_LINGER)
                backoff = 0.0
            except DualMemError as exc:
                # Whatever was read and not acked is in this consumer's pending list.
                self._retry_own = True
                backoff = min(_MAX_BACKOFF, backoff * 2 or 0.01)
                log.warning("worker %s: %s; retrying in %.2fs", self.consumer, exc, backoff)
                if "NOGROUP" in str(exc):
                    self._recreate_groups()
                stop.wait(backoff)
            except Exception:
                # A bug, not an outage (a race once ended a worker process this way). The
                # worker is the only way commands reach SQLite: log it loudly and go on.
                self._retry_own = True
                backoff = min(_MAX_BACKOFF, backoff * 2 or 0.01)
                log.exception(
                    "worker %s: unexpected error; retrying in %.2fs", self.consumer, backoff
                )
                stop.wait(backoff)
        if drain_timeout is None:
            return 0
        self._stopping = threading.Event()
        try:
            return self.drain(drain_timeout() if callable(drain_timeout) else drain_timeout)
        except DualMemError as exc:
            log.warning("worker %s: drain failed: %s", self.consumer, exc)
            return -1

    def step(self, *, block: bool = False) -> int:
        """One iteration; returns the number of entries read."""
        entries = self._read(block)
        if entries:
            self._process(entries)
        elif block and self._wakeup is not None:
            # fakeredis: wait for a put to signal, then clear before the next read, so a
            # signal that arrives in between is never lost.
            self._wakeup.wait(_IDLE_WAIT)
            self._wakeup.clear()
        self._housekeeping()
        return len(entries)

    def drain(self, timeout: float) -> int:
        """Process until the streams hold nothing unacknowledged, for at most ``timeout`` s.

        Returns the number of commands still pending or undelivered (0: fully drained).
        """
        deadline = time.monotonic() + timeout
        self._deadline = deadline
        self._retry_own = True  # anything this consumer read and never acked goes too
        try:
            while True:
                n = self.step(block=False)
                if n == 0:
                    left = self.backlog()
                    if left == 0 or time.monotonic() >= deadline:
                        self._trim()
                        return left
                    time.sleep(0.005)
                elif time.monotonic() >= deadline:
                    return self.backlog()
        finally:
            self._deadline = None

    # -- reading -----------------------------------------------------------------------

    def _read(self, block: bool) -> list[StreamEntry]:
        pending = self._read_pending()
        if not pending:
            use_block = block and self._wakeup is None and self.settings.block_ms > 0
            return self._xreadgroup(">", block=use_block)
        room = self.settings.batch_size - len(pending)
        if self._mix_new and room > 0:
            self._mix_new = False
            pending += self._xreadgroup(">", block=False, count=room)
        return pending

    def _read_pending(self) -> list[StreamEntry]:
        """Entries read before: another consumer's, idle past ``claim_idle_ms`` (claimed
        every half of it), or this consumer's own after a failure."""
        now = time.monotonic()
        if now >= self._next_claim:
            self._next_claim = now + max(self.settings.claim_idle_ms / 2000, 0.05)
            claimed = self._claim()
            if claimed:
                return claimed
        if self._retry_own:
            own = self._xreadgroup("0", block=False)
            if own:
                return own
            self._retry_own = False
        return []

    def _xreadgroup(
        self, start: str, *, block: bool, count: int | None = None
    ) -> list[StreamEntry]:
        retried = retries_of(self.redis)
        with translate_errors("worker read"):
            resp = self.redis.xreadgroup(
                self.group,
                self.consumer,
                dict.fromkeys(self.streams, start),
                count=count or self.settings.batch_size,
                block=self.settings.block_ms if block else None,
            )
        self._note_retries(retried)
        return self._entries(resp)

    def _note_retries(self, before: int) -> None:
        # A read redis-py sent again after a failure may have run the first time, its
        # reply lost: what it read then sits in this consumer's pending list, and no one
        # claims it for claim_idle_ms. Read the pending list next.
        if retries_of(self.redis) != before:
            self._retry_own = True

    def _entries(self, resp: object) -> list[StreamEntry]:
        out: list[StreamEntry] = []
        gone: list[tuple[bytes, bytes]] = []
        for name, items in resp or []:  # type: ignore[attr-defined]
            shard = self.streams.get(name)
            if shard is None:
                shard = self.layout.shard_of_stream(name)
            for sid, fields in items:
                if not fields:
                    # Trimmed or deleted while pending: nothing left to apply. Redis says
                    # nil, which redis-py (and fakeredis) hand over as {}; XADD never
                    # makes an entry without fields.
                    gone.append((name, sid))
                    continue
                out.append(StreamEntry(shard, sid.decode(), fields))
        if gone:
            with translate_errors("worker ack"):
                for name, sid in gone:
                    self.redis.xack(name, self.group, sid)
        return out

    def _claim(self) -> list[StreamEntry]:
        out: list[StreamEntry] = []
        # Once a claim interval, look at this consumer's own pending list too, whatever
        # left entries there unnoticed.
        self._retry_own = True
        with translate_errors("worker claim"):
            for name in self.streams:
                start = "0-0"
                while len(out) < self.settings.batch_size:
                    resp = self.redis.xautoclaim(
                        name,
                        self.group,
                        self.consumer,
                        self.settings.claim_idle_ms,
                        start_id=start,
                        count=self.settings.batch_size - len(out),
                    )
                    start = text(resp[0])
                    out.extend(self._entries([(name, resp[1])]))
                    if start == "0-0":
                        break
            self._forget_idle_consumers()
        if out:
            self.stats.claimed += len(out)
            log.info("worker %s claimed %d entries of dead consumers", self.consumer, len(out))
        return out

    def _forget_idle_consumers(self) -> None:
        # Every restart adds a consumer name; drop those with nothing pending that have
        # been silent far longer than the claim time, so XINFO stays readable.
        limit = max(self.settings.claim_idle_ms * 4, _FORGET_IDLE_MS)
        for name in self.streams:
            floor = safe_trim_id(self.redis, name)  # taken before looking at the consumers
            for c in self.redis.xinfo_consumers(name, self.group):
                cname = text(c["name"])
                if cname != self.consumer and c["pending"] == 0 and c["idle"] > limit:
                    forget_consumer(self.redis, name, self.group, cname, floor)

    # -- processing --------------------------------------------------------------------

    def _process(self, entries: list[StreamEntry]) -> None:
        t0 = time.perf_counter_ns()
        result = self._apply_with_retry(entries)
        if result is None:
            return
        elapsed = time.perf_counter_ns() - t0
        self.stats.batches += 1
        self.stats.applied += result.applied
        self.stats.duplicates += result.duplicates
        if result.applied:
            self.metrics.record("persist", elapsed // result.applied, result.applied)
            now_us = time.time_ns() // 1000
            self.metrics.histograms["lag"].record_many(
                [max(0, now_us - ts) * 1000 for ts in result.ts_us]
            )
        dead = self._failures(result)
        to_ack = list(result.done) + [e for e, _, _ in dead]
        try:
            with translate_errors("worker ack"):
                by_stream: dict[int, list[str]] = {}
                for e in to_ack:
                    by_stream.setdefault(e.shard, []).append(e.stream_id)
                commands: list[tuple[Any, ...]] = [
                    (b"XACK", self.layout.stream(shard), self.group, *ids)
                    for shard, ids in by_stream.items()
                ]
                by_scope: dict[str, list[Notification]] = {}
                for note in result.notifications:
                    by_scope.setdefault(note.scope, []).append(note)
                commands.extend(
                    (b"PUBLISH", self.layout.channel(scope), Notification.encode_many(notes))
                    for scope, notes in by_scope.items()
                )
                anchors: list[tuple[str, tuple[int, bytes], int]] = []
                for chain, head in (
                    ("journal", result.journal_head),
                    ("audit_log", result.audit_head),
                ):
                    if head is not None:
                        key = self.layout.anchor_key(chain)
                        commands += [
                            (b"ZADD", key, head[0], f"{head[0]}:{head[1].hex()}"),
                            (b"ZREMRANGEBYRANK", key, 0, -2),  # keep the highest
                            (b"ZRANGE", key, -1, -1),
                        ]
                        anchors.append((chain, head, len(commands) - 1))
                if commands:
                    replies = send_many(self.redis, commands)
                    for chain, head, i in anchors:
                        self._check_anchor(chain, head, replies[i])
        except StoreUnavailable as exc:
            # Committed but not acked: the entries come back and are recognised as
            # duplicates, so this costs a re-read, never a double apply.
            log.warning("worker %s: ack failed after commit: %s", self.consumer, exc)
            self._retry_own = True
        if self._on_commit is not None:
            self._on_commit()

    def _check_anchor(self, chain: str, head: tuple[int, bytes], top: Any) -> None:
        """After this batch's anchor went in: an anchor above ``head`` is another worker's
        newer commit, unless the database does not hold it (Redis kept the anchor of a
        database since restored from an older backup): then this batch's head replaces
        it."""
        try:
            top_id, _, top_hash = bytes(top[0]).decode().partition(":")
            anchored, anchored_hash = int(top_id), bytes.fromhex(top_hash)
        except (IndexError, TypeError, ValueError, UnicodeDecodeError):
            anchored, anchored_hash = head[0] + 1, b""  # not an anchor: replace it
        if anchored < head[0] or (anchored, anchored_hash) == head:
            return
        # Above this head, or at the same id with another hash (a restored database wrote
        # that id again, and the sorted set kept the stale member of the tie): the
        # database decides.
        if self.store.chain_hash(chain, anchored) == anchored_hash:
            return
        log.warning(
            "worker %s: the %s anchor names id %d with a hash this database does not hold "
            "(restored from an older backup?): moved to %d",
            self.consumer,
            chain,
            anchored,
            head[0],
        )
        key = self.layout.anchor_key(chain)
        transact(self.redis, [(b"DEL", key), (b"ZADD", key, head[0], f"{head[0]}:{head[1].hex()}")])

    def _apply_with_retry(self, entries: list[StreamEntry]) -> ApplyResult | None:
        backoff = 0.01
        while True:
            try:
                return self.store.apply(entries)
            except StoreUnavailable as exc:
                # The database is locked, full or gone: nothing was committed. Retry the
                # same batch (no redelivery, so delivery counts stay honest) until stopped.
                log.warning("worker %s: commit failed: %s; retrying", self.consumer, exc)
                wait = backoff
                if self._deadline is not None:
                    wait = min(wait, max(0.0, self._deadline - time.monotonic()))
                if self._stopping.wait(wait) or (
                    self._deadline is not None and time.monotonic() >= self._deadline
                ):
                    self._retry_own = True
                    return None
                backoff = min(_MAX_BACKOFF, backoff * 2)
            except Exception as exc:  # a bug, not an outage: find out whose
                return self._apply_alone(entries, exc)

    def _apply_alone(self, entries: list[StreamEntry], error: Exception) -> ApplyResult:
        """After an unexpected error from a whole batch, apply each entry on its own.

        An entry that fails alone while another entry of the batch is newly committed alone
        is the entry's fault: it is returned as failed, so it is redelivered and then
        dead-lettered after ``max_deliveries`` like any failing entry, and the rest of the
        stream flows. If no entry commits alone, nothing says the entries are at fault (a
        bug may fail every command): ``error`` is raised, the loop logs it and retries
        with backoff, and nothing is dead-lettered. The next read then adds new entries
        to the pending ones, so one poison entry alone cannot hold back the commands
        behind it.
        """
        log.error(
            "worker %s: a batch of %d failed with an unexpected error; applying each entry alone",
            self.consumer,
            len(entries),
            exc_info=error,
        )
        result = ApplyResult()
        failed: list[tuple[StreamEntry, str]] = []
        for entry in entries:
            try:
                result.merge(self.store.apply([entry]))
            except StoreUnavailable:
                raise  # an outage after all: the loop retries (committed ones are duplicates)
            except Exception as exc:
                failed.append((entry, f"unexpected {type(exc).__name__}: {exc}"))
        if not result.applied:
            # Nothing newly committed alone (entries committed before, now duplicates,
            # prove nothing about the code that failed): not the entries' fault.
            self._retry_own = self._mix_new = True
            raise error
        result.failed.extend(failed)
        return result

    def _failures(self, result: ApplyResult) -> list[tuple[StreamEntry, str, int]]:
        if not result.failed:
            return []
        self.stats.failures += len(result.failed)
        dead: list[tuple[StreamEntry, str, int]] = []
        for entry, error in result.failed:
            deliveries = self._deliveries(entry)
            if deliveries is None:
                # No longer pending. Another worker claimed it and settled it since: it is
                # committed or dead-lettered there, not ours to dead-letter again. Else
                # Redis lost it (restarted empty): the dead letter is its only copy.
                if self.store.status(entry.shard, entry.stream_id) in ("committed", "dead"):
                    log.info(
                        "worker %s: entry %s/%s failed here; another worker settled it",
                        self.consumer,
                        entry.shard,
                        entry.stream_id,
                    )
                    continue
                deliveries = self.settings.max_deliveries
            if deliveries >= self.settings.max_deliveries:
                dead.append((entry, error, deliveries))
                log.error(
                    "worker %s: entry %s/%s failed %d times, dead-lettered: %s",
                    self.consumer,
                    entry.shard,
                    entry.stream_id,
                    deliveries,
                    error,
                )
            else:
                self._retry_own = True
                log.warning(
                    "worker %s: entry %s/%s failed (delivery %d of %d): %s",
                    self.consumer,
                    entry.shard,
                    entry.stream_id,
                    deliveries,
                    self.settings.max_deliveries,
                    error,
                )
        if dead:
            self.store.dead_letter(dead)
            self.stats.dead_lettered += len(dead)
            self._forget_cached(dead)
        return dead

    def _forget_cached(self, dead: list[tuple[StreamEntry, str, int]]) -> None:
        """Drop the cache entry each dead-lettered put or delete left, if it still holds
        that write: fresh reads answered it though it never reached SQLite, for
        ``cache_ttl`` (for good, for an agent's pinned state record).

        The entry holds that write when it holds its envelope (or one a key rotation
        re-sealed: the same write id and writer) and no later put or delete of the key is
        in the stream after it: a delete's mark, a plaintext envelope, even a sealed one
        (an import copies envelopes) can be a newer write's too. A replay never writes a
        cache entry, so it drops none. The stream after the batch's dead entries is read
        once, at most ``_FORGET_SCAN_LIMIT`` entries; past that, and on a Redis error, the
        entries are kept: the dead letters are committed, and an entry left behind only
        outlives its command."""
        mine = [w for w in (_dead_write(entry) for entry, _, _ in dead) if w is not None]
        if not mine:
            return
        by_shard: dict[int, list[_DeadWrite]] = {}
        for w in mine:
            by_shard.setdefault(self.layout.shard_of(w.scope, w.key), []).append(w)
        try:
            with translate_errors("worker cache"):
                for shard in sorted(by_shard):
                    self._forget_on(shard, by_shard[shard])
        except StoreUnavailable as exc:
            log.warning("worker %s: cache entries of dead letters kept: %s", self.consumer, exc)

    def _forget_on(self, shard: int, writes: list[_DeadWrite]) -> None:
        stream = self.layout.stream(shard)
        start = min(writes, key=lambda w: sid_of(w.stream_id)).stream_id
        after = _writes_after(self.redis, stream, start)
        if after is None:
            return  # more than _FORGET_SCAN_LIMIT entries behind them: cannot tell
        for w in writes:
            mine = sid_of(w.stream_id)
            if any(sid > mine and sk == (w.s, w.k) for sid, sk in after.writes):
                continue
            name = self.layout.cache_key(shard, w.scope, w.key)
            # Every look on the watched connection itself: with max_connections=1 a
            # second one would never come.
            with self.redis.pipeline() as pipe:
                try:
                    pipe.watch(name)  # type: ignore[no-untyped-call]
                    value: Any = pipe.get(name)
                    if value is None or not _same_write(value, w.expected):
                        continue
                    # Appended since the look above: a newer write's may be among them.
                    tail = _writes_after(pipe, stream, after.last)
                    if tail is None or any(sk == (w.s, w.k) for _, sk in tail.writes):
                        continue
                    pipe.multi()
                    pipe.delete(name)
                    pipe.execute()
                except redis.WatchError:
                    continue  # written again meanwhile: the entry is a newer write's

    def _deliveries(self, entry: StreamEntry) -> int | None:
        """How often ``entry`` was delivered; ``None`` when it is no longer pending."""
        with translate_errors("worker pending"):
            rows = self.redis.xpending_range(
                self.layout.stream(entry.shard), self.group, entry.stream_id, entry.stream_id, 1
            )
        if not rows:
            return None
        return int(rows[0]["times_delivered"])

    # -- housekeeping ------------------------------------------------------------------

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now >= self._next_trim:
            self._next_trim = now + _TRIM_INTERVAL
            self._trim()
        if now >= self._next_purge:
            self._next_purge = now + self.settings.purge_interval
            wall = int(time.time() * 1000)
            # Every shard's stream, not only this worker's: the purge covers every row.
            with translate_errors("worker purge"):
                floor = purge_floor(self.redis, self._all_streams)
            self.store.purge(wall, wall - self.settings.tombstone_ttl * 1000, floor=floor)
        if now >= self._next_metrics:
            self._next_metrics = now + self.settings.metrics_interval
            self.snapshot_metrics()

    def snapshot_metrics(self) -> None:
        """Write this process's latency histograms into the store's ``metrics`` table."""
        self.store.record_metrics(int(time.time() * 1000), self.consumer, self.metrics.snapshot())

    def _trim(self) -> None:
        with translate_errors("worker trim"):
            for name in self.streams:
                floor = safe_trim_id(self.redis, name)
                if floor is not None:
                    self.redis.xtrim(name, minid=floor, approximate=False)

    def backlog(self) -> int:
        """Commands in this worker's streams not yet acknowledged (pending + undelivered)."""
        total = 0
        with translate_errors("worker backlog"):
            for name in self.streams:
                total += stream_backlog(self.redis, name, self.group)
        return total


def ensure_groups(
    client: redis.Redis, streams: Mapping[bytes, int], group: str, store: Store | None = None
) -> None:
    """Create ``group`` at id 0 on each stream (``name -> shard``), creating the stream,
    ignoring existing groups.

    Where the group had to be created and ``store`` is given, the stream's last id is then
    raised to the newest id committed from that shard (see :func:`raise_last_id`): after
    Redis lost its data, ids it hands out sort after everything already in SQLite even if
    its clock is behind the one that wrote those rows.
    """
    with translate_errors("create consumer group"):
        for name, shard in streams.items():
            retried = retries_of(client)
            try:
                client.xgroup_create(name, group, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
                if retries_of(client) == retried:
                    continue
                # The group may be our own first attempt's, whose reply was lost: raise
                # the last id as if we had created it (a no-op when it is high enough).
            if store is not None:
                raise_last_id(client, name, store.max_sid(shard))


def raise_last_id(client: redis.Redis, stream: bytes, floor_sid: bytes) -> bool:
    """Make ``stream`` hand out ids above ``floor_sid`` (a :func:`sid_of` value); True if
    it had to.

    Redis gives ``XADD *`` the larger of its clock and the stream's last id (+1), and the
    upsert guard and the duplicate check rest on those ids. A stream recreated after Redis
    lost its data starts from its clock alone; if that clock was stepped back, new puts
    would sort before rows already committed (the record would keep its older value) or
    reuse a committed id (taken for a redelivery). An entry at the floor id added and
    deleted in one ``MULTI`` moves the last id up; no reader ever sees it.
    """
    if floor_sid <= sid_of("0-0"):  # nothing committed (b""), or nothing to raise above
        return False
    info = client.xinfo_stream(stream)
    if sid_of(text(info["last-generated-id"])) >= floor_sid:
        return False
    marker = stream_id_of(floor_sid)
    try:
        transact(client, [(b"XADD", stream, marker, b"op", b"floor"), (b"XDEL", stream, marker)])
    except redis.ResponseError as exc:
        if "equal or smaller" not in str(exc):
            raise
        return False  # a writer's XADD got there first, with an id above the floor
    # Routine for memory:// (its stream lives in the process: every restart makes a new
    # one); on a real Redis it means the stream lost its history or the clock went back.
    log.log(
        logging.INFO if in_process(client) else logging.WARNING,
        "stream %s was behind the newest committed id; its last id is now %s",
        text(stream),
        marker,
    )
    return True


def forget_consumer(
    client: redis.Redis, stream: bytes, group: str, consumer: str, floor: str | None
) -> int:
    """Delete ``consumer``, seen idle with nothing pending; returns the entries it held.

    ``XGROUP DELCONSUMER`` throws a consumer's pending entries away. If the consumer woke
    up between the caller's look and the deletion (a paused process, say) and read or
    claimed entries, they would never be delivered again and trimming would remove them:
    acknowledged writes lost. So when it held any, the group is set back to just below
    ``floor`` (``safe_trim_id`` taken before the look: every entry below it was already
    acknowledged) and delivers everything after it again; what was committed meanwhile
    is recognised as a duplicate.
    """
    held = int(client.xgroup_delconsumer(stream, group, consumer))
    if held:
        ms_text, _, seq_text = (floor or "0-0").partition("-")
        ms, seq = int(ms_text), int(seq_text or 0)
        if seq:
            back = f"{ms}-{seq - 1}"
        elif ms:
            back = f"{ms - 1}-{(1 << 64) - 1}"
        else:
            back = "0"
        client.xgroup_setid(stream, group, id=back)
        log.warning(
            "consumer %s woke up while being forgotten, holding %d entries: group %s "
            "delivers everything after %s again",
            consumer,
            held,
            group,
            back,
        )
    return held


def safe_trim_id(client: redis.Redis, stream: bytes) -> str | None:
    """The highest id below which every entry is acknowledged by every group.

    ``min`` over groups of (oldest pending id, or the id after the last delivered one).
    ``None`` when the stream has no group (then nothing may be trimmed).
    """
    floors: list[tuple[int, int]] = []
    for g in _groups(client, stream):
        oldest = client.xpending(stream, g["name"])["min"] if int(g["pending"]) > 0 else None
        # Nothing pending, or another worker acked it all between XINFO and XPENDING (min
        # is then None): everything up to the last delivered id is acknowledged.
        floor = next_stream_id(text(g["last-delivered-id"])) if oldest is None else text(oldest)
        ms_text, _, seq_text = floor.partition("-")
        floors.append((int(ms_text), int(seq_text or 0)))
    if not floors:
        return None
    ms, seq = min(floors)
    return f"{ms}-{seq}"


#: Stream entries the dead-letter cache cleanup reads after a batch's dead entries (one
#: XRANGE); with more behind them it keeps their cache entries.
_FORGET_SCAN_LIMIT = 1000
#: A consumer with nothing pending is forgotten once silent this long (ms), and four
#: claim times: far longer than a live worker ever is between two reads.
_FORGET_IDLE_MS = 60_000


@dataclass(frozen=True, slots=True)
class _DeadWrite:
    """A dead-lettered put or delete, as its cache entry would hold it."""

    stream_id: str
    s: bytes
    k: bytes
    scope: str
    key: str
    expected: bytes


def _dead_write(entry: StreamEntry) -> _DeadWrite | None:
    """The cache entry ``entry`` wrote, if it is a put or delete that wrote one (a replay,
    ``o``, writes none; a malformed entry's entry is not its own)."""
    f = entry.fields
    op, s, k, envelope = f.get(b"op"), f.get(b"s"), f.get(b"k"), f.get(b"e")
    if b"o" in f or s is None or k is None:
        return None
    try:
        if op == b"del":
            expected = CACHE_TOMBSTONE
        elif op == b"put" and envelope:
            x = f.get(b"x")
            expected = cache_value(envelope, None if x is None else int(x))
        else:
            return None
        return _DeadWrite(entry.stream_id, s, k, s.decode(), k.decode(), expected)
    except (ValueError, OverflowError):
        return None


@dataclass(frozen=True, slots=True)
class _After:
    """Puts and deletes ``(ordering id, (scope, key))`` found after a stream id, and the
    last id read."""

    writes: list[tuple[bytes, tuple[bytes | None, bytes | None]]]
    last: str


def _writes_after(client: Any, stream: bytes, stream_id: str) -> _After | None:
    """The puts and deletes in ``stream`` after ``stream_id`` (nothing after a pending
    entry has been trimmed); ``None`` past ``_FORGET_SCAN_LIMIT`` entries. A reseal or an
    audit event changes no value: not a later write."""
    page: list[Any] = (
        client.xrange(stream, min=next_stream_id(stream_id), max="+", count=_FORGET_SCAN_LIMIT)
        or []
    )
    if len(page) >= _FORGET_SCAN_LIMIT:
        return None
    writes = [
        (sid_of(text(sid)), (f.get(b"s"), f.get(b"k")))
        for sid, f in page
        if f and f.get(b"op") in (b"put", b"del")
    ]
    return _After(writes, text(page[-1][0]) if page else stream_id)


def _same_write(value: bytes, expected: bytes) -> bool:
    """Whether the cache entry ``value`` holds the write ``expected`` (a cache entry as
    the put made it): the same bytes, or the same expiry and an envelope of the same write
    (write id and writer: a key rotation re-seals a cache entry under a new nonce)."""
    if value == expected:
        return True
    (env, expires), (want, want_expires) = cached_envelope(value), cached_envelope(expected)
    if env is None or want is None or expires != want_expires:
        return False
    got, sealing = envelope_sealing(env), envelope_sealing(want)
    if got is None or sealing is None:
        return False
    return (got.write_id, got.writer) == (sealing.write_id, sealing.writer)


#: Pending entries ``purge_floor`` reads the fields of (for replays' original ids) per
#: group; beyond it the floor holds every tombstone for that purge.
_FLOOR_READ_LIMIT = 10_000


def purge_floor(client: redis.Redis, streams: Iterable[bytes]) -> bytes | None:
    """The ordering id (:func:`sid_of`) of the oldest command any of ``streams`` still
    holds unacknowledged by some group; ``None`` when there is none.

    A purge keeps every tombstone at or above it: the command below may be an older put
    of the tombstone's key, delivered to a consumer that died, and when it is claimed only
    the tombstone's newer id keeps it from bringing the deleted value back. A replayed dead
    letter is ordered by its original id (``o``), older than its stream id: pending
    entries count with that. (An undelivered replay is held by its dead letter, see
    ``SQLiteStore.purge``.) Past ``_FLOOR_READ_LIMIT`` pending entries in a group the
    floor is the lowest id there is: nothing is purged that time.
    """
    floors: list[bytes] = []
    for name in streams:
        for g in _groups(client, name):
            pending = int(g["pending"])
            if pending > _FLOOR_READ_LIMIT:
                return sid_of("0-0")
            ids = (
                [r["message_id"] for r in client.xpending_range(name, g["name"], "-", "+", pending)]
                if pending
                else []
            )
            if ids:
                # In id order: the first is the oldest pending; replays count by origin.
                floors += [sid_of(text(ids[0])), *_origins(client, name, ids)]
                continue
            # Nothing pending (or all acked since XINFO): the first entry not yet
            # delivered, if any. Not safe_trim_id's "next id": a group that never
            # delivered anything would hold every tombstone for good.
            start = next_stream_id(text(g["last-delivered-id"]))
            page = client.xrange(name, min=start, max="+", count=1)
            if page:
                floors.append(sid_of(text(page[0][0])))
    return min(floors, default=None)


def _origins(client: redis.Redis, stream: bytes, ids: list[Any]) -> list[bytes]:
    """Ordering ids of the original commands behind the replays among the pending
    entries ``ids`` of ``stream``."""
    pipe = client.pipeline(transaction=False)
    for sid in ids:
        pipe.xrange(stream, min=sid, max=sid, count=1)
    out: list[bytes] = []
    for page in pipe.execute():
        for _, fields in page or []:
            origin = (fields or {}).get(b"o")
            if origin is not None:
                with contextlib.suppress(ValueError, UnicodeDecodeError):
                    out.append(sid_of(origin.decode()))
    return out


def stream_backlog(client: redis.Redis, stream: bytes, group: str) -> int:
    """Pending plus undelivered entries of ``group`` on ``stream`` (0 when the stream does
    not exist yet).

    Undelivered is the group's ``lag`` (Redis 7); where Redis cannot tell it (it says
    nil after some deletions) or does not report it, the entries after the last delivered
    id are counted, page by page.
    """
    for g in _groups(client, stream):
        if text(g["name"]) != group:
            continue
        pending = int(g["pending"])
        lag = g.get("lag")
        if lag is not None:
            return pending + int(lag)
        start = next_stream_id(text(g["last-delivered-id"]))
        undelivered = 0
        while True:
            page = client.xrange(stream, min=start, max="+", count=10_000) or []
            undelivered += len(page)
            if len(page) < 10_000:
                return pending + undelivered
            start = next_stream_id(text(page[-1][0]))
    return int(client.xlen(stream))


def last_entry_ids(client: redis.Redis, streams: Sequence[bytes]) -> list[str | None]:
    """The id of each stream's last entry (``None``: empty or absent), in one round trip.
    Every entry added later has a higher id: what ``settle`` waits through, and where the
    mirror looks for a send that lost its reply.

    >>> import fakeredis
    >>> r = fakeredis.FakeRedis()
    >>> sid = r.xadd(b"s", {b"f": b"v"})
    >>> last_entry_ids(r, [b"s", b"none"]) == [sid.decode(), None]
    True
    """
    pipe: Any = client.pipeline(transaction=False)  # redis-py's pipeline is loosely typed
    for stream in streams:
        pipe.xrevrange(stream, "+", "-", count=1)
    return [text(items[0][0]) if items else None for items in pipe.execute()]


def settled_through(client: redis.Redis, stream: bytes, group: str, last_id: str) -> bool:
    """Whether every entry of ``stream`` up to ``last_id`` has been delivered to ``group``
    and acknowledged: committed to SQLite, or dead-lettered (a worker acknowledges only
    after one of those). ``False`` while the group does not exist (no worker started yet).
    """
    for g in _groups(client, stream):
        if text(g["name"]) != group:
            continue
        if sid_of(text(g["last-delivered-id"])) < sid_of(last_id):
            return False
        return not client.xpending_range(stream, group, "-", last_id, 1)
    return False


def stream_pending(client: redis.Redis, stream: bytes, group: str) -> int:
    """Entries of ``stream`` delivered to a consumer of ``group`` and not acknowledged
    (0 when the stream or the group does not exist yet)."""
    for g in _groups(client, stream):
        if text(g["name"]) == group:
            return int(g["pending"])
    return 0


def _groups(client: redis.Redis, stream: bytes) -> list[dict[str, Any]]:
    """``XINFO GROUPS``, empty when the stream does not exist (nothing written yet, or
    Redis restarted empty)."""
    try:
        return list(client.xinfo_groups(stream))
    except redis.ResponseError as exc:
        if "no such key" in str(exc).lower():
            return []
        raise
