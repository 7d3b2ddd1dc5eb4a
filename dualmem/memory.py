"""``DualMemory``: the public facade. Commands go to Redis, queries come from SQLite."""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis

from acl.crypto import Codec, Keyring
from acl.errors import (
    AccessDenied,
    ConfigurationError,
    MissingKey,
    TamperedRecord,
    ValidationError,
)
from acl.levels import ENCRYPTED_LEVELS, Level, as_level
from acl.policy import level_of_scope, readable_scopes, resolve_scope, stored_level
from acl.principal import Principal
from dualmem.commands import (
    CACHE_TOMBSTONE,
    Receipt,
    audit_fields,
    cache_value,
    cached_envelope,
    check_int,
    check_key,
    check_text,
    delete_fields,
    put_fields,
    ttl_to_ms,
    xadd_command,
)
from dualmem.errors import Backpressure, DualMemError, NotPersisted, StoreUnavailable
from dualmem.keyuse import KeyLease, send_carrying
from dualmem.layout import Layout
from dualmem.metrics import Metrics, prometheus_text
from dualmem.projection import projected
from dualmem.redis_backend import (
    connect,
    take_back_refused_sets,
    text,
    transact,
    translate_errors,
)
from dualmem.rotation import KeyfileWatcher, keyfile_signature
from dualmem.settings import Settings, check_seconds, load_keyring
from dualmem.sqlite_store import SQLiteStore, holds_sealed_rows, make_database_directory
from dualmem.store import Change, Store, StoredRow
from dualmem.worker import (
    Worker,
    ensure_groups,
    last_entry_ids,
    settled_through,
    stream_backlog,
)

__all__ = ["CloseReport", "DualMemory", "Record"]

log = logging.getLogger("dualmem")

_MAX_QUERY_LIMIT = 10_000
#: What every call on a closed DualMemory raises: its open check, the write gate, and a
#: read whose store a close() in another thread shut under it.
_CLOSED = "this DualMemory is closed"
#: put reads its stream's length (XLEN inside its MULTI) on one write in XLEN_EVERY per
#: shard, and on every write once its estimate (the last length read plus its own writes
#: since) is within XLEN_EVERY of max_backlog. XLEN is nearly free on a real Redis but
#: costs the in-process fakeredis about 17 µs of a 130 µs transaction (bench/).
XLEN_EVERY = 64
_ABSENT: Any = object()  # "no record", distinct from a stored JSON null


@dataclass(frozen=True, slots=True)
class Record:
    """A decrypted record as ``query`` returns it."""

    scope: str
    key: str
    level: Level
    owner: str
    value: Any
    created_at: int
    updated_at: int
    expires_at: int | None
    stream_id: str


@dataclass(frozen=True, slots=True)
class CloseReport:
    """What ``close()`` left behind: ``pending`` commands not yet persisted (0 = drained)."""

    pending: int
    drained: bool


#: Every DualMemory not closed yet, held weakly (the set never keeps one alive). The worker
#: thread is a daemon: at exit it would die with the puts it had not persisted, so one
#: atexit hook closes (drains) whatever is still open. One hook for all, not one each:
#: CPython never reuses the slot an unregistered atexit callback leaves, so a
#: register/unregister per object would grow its list (and slow each unregister) for good.
_OPEN: weakref.WeakSet[DualMemory] = weakref.WeakSet()
#: Re-entrant: a signal handler may make or close a DualMemory while its thread is in here.
_OPEN_LOCK = threading.RLock()


def _close_open_at_exit() -> None:
    """Close every DualMemory the process made (a forked child that exits must not drain,
    or release the connections and lease of, its parent's objects).

    Each is bounded by its ``close_timeout``, and they close side by side, so the exit
    waits about as long as the slowest one, not the sum. One already closing (in another
    thread) is waited for: its drain must end before the interpreter does. A failing
    close leaves the others alone.
    """
    with _OPEN_LOCK:
        left = [mem for mem in _OPEN if mem._pid == os.getpid()]

    def close(mem: DualMemory) -> None:
        try:
            mem.close()
        except Exception:
            log.exception("closing a DualMemory at exit failed")

    if len(left) <= 1:
        for mem in left:
            close(mem)
        return
    threads = [threading.Thread(target=close, args=(m,), daemon=True) for m in left]
    for t in threads:
        t.start()
    deadline = time.monotonic() + max(m._close_bound() for m in left)
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))


atexit.register(_close_open_at_exit)


def _record_of(row: StoredRow, value: Any) -> Record:
    """A stored row with its opened ``value``."""
    return Record(
        row.scope,
        row.key,
        row.level,
        row.owner,
        value,
        row.created_at,
        row.updated_at,
        row.expires_at,
        row.stream_id,
    )


class DualMemory:
    """Dual-layer memory: one Redis round trip per write, SQLite for every read.

    With no arguments it runs embedded: an in-process fakeredis server, a worker thread
    and ``./dualmem.db`` (plus its key file ``./dualmem.db.keys``). Arguments override
    ``DUALMEM_*`` environment variables, which override defaults (see ``Settings``).

    >>> import tempfile, os
    >>> from acl import Level, Principal
    >>> db = os.path.join(tempfile.mkdtemp(), "mem.db")
    >>> coder = Principal(agent_id="coder-1", team="backend", swarm="auth", project="shop")
    >>> with DualMemory(redis_url="memory://doctest", db_path=db) as mem:
    ...     r = mem.put("confidence/auth/1", {"confidence": 0.85}, level=Level.PRIVATE,
    ...                 principal=coder, ttl=86400)
    ...     mem.sync(r, timeout=5)
    ...     mem.get("confidence/auth/1", level=Level.PRIVATE, principal=coder)
    {'confidence': 0.85}
    """

    def __init__(
        self,
        redis_url: str | None = None,
        db_path: str | None = None,
        keyring: str | Keyring | None = None,
        *,
        worker: bool | None = None,
        settings: Settings | None = None,
        **overrides: Any,
    ) -> None:
        given_ring = keyring if isinstance(keyring, Keyring) else None
        if settings is None:
            settings = Settings.load(
                {
                    "redis_url": redis_url,
                    "db_path": db_path,
                    "keyring": None if given_ring else keyring,
                    "worker": worker,
                    **overrides,
                },
                keyring_object=given_ring is not None,
            )
        elif redis_url or db_path or keyring or worker is not None or overrides:
            raise ConfigurationError("pass either settings= or individual settings, not both")
        elif not isinstance(settings, Settings):  # 5 raised AttributeError from .namespace
            raise ConfigurationError(
                f"settings must be a dualmem.Settings, got {type(settings).__name__}"
            )
        self.settings = settings
        self.layout = Layout(settings.namespace, settings.shards)
        self.metrics_registry = Metrics()
        # A key file is watched, so a key rotation reaches this process (dualmem.rotation);
        # its signature is taken before it is read (see KeyfileWatcher).
        keyfile = None if given_ring else settings.keyring_file
        seen = None if keyfile is None else keyfile_signature(keyfile)
        self.codec = Codec(
            given_ring or _load_keyring(settings),
            compress_threshold=settings.compress_threshold,
            max_value_bytes=settings.max_value_bytes,
        )
        self._keyfile = (
            None
            if keyfile is None
            else KeyfileWatcher(keyfile, self.codec, settings.keyring_reload_interval, seen=seen)
        )
        self._streams = self.layout.streams()
        # Per shard, under _backlog_lock (threads share the estimate: see _reserve):
        # the estimated stream length, counting this object's writes in flight;
        self._backlog = [0] * settings.shards
        # writes since the last XLEN (starting full, the first write reads it);
        self._unchecked = [XLEN_EVERY - 1] * settings.shards
        # and writes this object has started, and those of them whose round trip is over.
        self._started = [0] * settings.shards
        self._settled = [0] * settings.shards
        self._backlog_lock = threading.RLock()  # a signal handler may put too
        self._closed = False
        self._committed = threading.Condition()
        self.store: Store = SQLiteStore.from_settings(settings)
        try:
            self._redis, self._wakeup = connect(settings)
            # Groups exist before the first XADD, so no command is ever outside a group.
            ensure_groups(self._redis, self.layout.stream_shards(), settings.group, self.store)
            # A process that follows a key file holds a lease on the keys it seals with,
            # taken before its first seal: a key drop waits for it (dualmem.keyuse).
            self._lease = (
                None if self._keyfile is None else KeyLease.take(self._redis, settings, self.codec)
            )
        except BaseException:
            self.store.close()
            raise
        self._worker: Worker | None = None
        self._worker_thread: threading.Thread | None = None
        self._worker_stop = threading.Event()
        #: What the worker thread's drain left: None until it returns, -1 when unknown.
        self._worker_left: int | None = None
        # Commands between the open check and their XADD: close() waits for them before
        # the drain, so a put that returned a receipt is never left behind a drained close.
        self._gate = threading.Condition()
        # The first close() does the work; any other waits for it and gets its report.
        self._close_done = threading.Event()
        self._close_report: CloseReport | None = None
        self._closer = 0  # the thread running the first close()
        self._close_wait = 0.0
        self._in_flight = 0
        # Pub/sub connections come from a client of their own, made at the first
        # pubsub(): each holds its connection for good, and the command pool is bounded.
        self._pubsub_client: redis.Redis | None = None
        self._pubsub_lock = threading.Lock()
        self._pid = os.getpid()
        if settings.worker:
            self._start_worker()
        with _OPEN_LOCK:
            _OPEN.add(self)

    # -- lifecycle ---------------------------------------------------------------------

    def _start_worker(self) -> None:
        client, _ = connect(self.settings, extra_timeout=self.settings.block_ms / 1000)
        self._worker = Worker(
            client,
            self.store,
            self.settings,
            metrics=self.metrics_registry,
            wakeup=self._wakeup,
            on_commit=self._notify_committed,
        )

        def run() -> None:
            assert self._worker is not None
            left = -1
            try:
                # Asked when the drain starts: close(timeout=...) sets it just before.
                left = self._worker.run(
                    self._worker_stop, drain_timeout=lambda: self._drain_timeout
                )
            except Exception:  # close() must not read a crash as "drained"
                log.exception("the dualmem worker thread failed")
            finally:
                self._worker_left = left

        self._drain_timeout = self.settings.close_timeout
        self._worker_thread = threading.Thread(target=run, name="dualmem-worker", daemon=True)
        self._worker_thread.start()

    def _notify_committed(self) -> None:
        with self._committed:
            self._committed.notify_all()

    def close(self, timeout: float | None = None) -> CloseReport:
        """Stop accepting commands, let the in-process worker drain (up to ``timeout`` s,
        default ``close_timeout``), snapshot metrics, release connections.

        The report says how many commands are still pending in Redis; a later worker on
        the same Redis persists them (on ``memory://`` they live only in this process).
        With ``worker=False`` nothing is drained here: the report says what Redis still
        holds unpersisted (by this writer or any other, see :meth:`backlog`), which the
        workers elsewhere own; on ``memory://`` that is lost when the process exits.
        Closing again returns the first close's report, after waiting for it to finish.
        A DualMemory still open when the interpreter exits is closed by an atexit hook,
        with this default timeout.
        """
        drain_timeout = self.settings.close_timeout if timeout is None else timeout
        check_seconds("timeout", drain_timeout)
        with self._gate:
            already = self._closed
            self._closed = True
            if not already:
                self._closer = threading.get_ident()
                self._close_wait = drain_timeout + self.settings.block_ms / 1000 + 10
        # It stays in _OPEN (weakly): the exit hook calls close() again, which waits for a
        # drain still running in another thread instead of ending the interpreter under it.
        if already:
            # Another close() (an atexit hook, a second thread) may still be draining:
            # its report is the answer, not "drained" because nothing is left to do here.
            # The same thread (a signal handler that interrupted the first close) cannot
            # wait for itself: it gets "not known to be drained" at once.
            if self._closer != threading.get_ident():
                self._close_done.wait(self._close_wait)
            return self._close_report or CloseReport(pending=1, drained=False)
        try:
            self._close_report = self._close_first(drain_timeout)
        except BaseException:
            self._release_after_failed_close()
            raise
        finally:
            self._close_done.set()
        return self._close_report

    def _close_bound(self) -> float:
        """How long a close with the default timeout may take, waits included."""
        return self.settings.close_timeout + self.settings.block_ms / 1000 + 15

    def _release_after_failed_close(self) -> None:
        # The store and the client are released even when the close itself failed; the
        # store stays open only under a worker thread that is still running.
        thread = self._worker_thread
        stopped = () if thread is not None and thread.is_alive() else self._worker_resources()
        for release in (*stopped, self._redis.close, self._close_pubsub_client):
            try:
                release()
            except Exception:  # pragma: no cover - best effort after the first error
                log.exception("close: releasing a resource failed")

    def _worker_resources(self) -> tuple[Callable[[], None], ...]:
        """What closes once no worker thread runs: the store, and the worker's own Redis
        client (its blocking reads; it stayed open as long as this object lived)."""
        if self._worker is None:
            return (self.store.close,)
        return (self.store.close, self._worker.redis.close)

    def _close_first(self, drain_timeout: float) -> CloseReport:
        with self._gate:
            # Commands already past the open check finish their round trip first, so the
            # drain below sees them (each is bounded by the client's socket timeouts).
            if not self._gate.wait_for(lambda: self._in_flight == 0, drain_timeout + 5):
                log.warning("close: %d writes still in flight", self._in_flight)
        pending = 0
        worker_alive = False
        if self._worker_thread is None:
            # No worker here: "drained" only if Redis holds nothing unpersisted.
            pending = self._pending_or_unknown()
        elif self._worker is not None:
            self._drain_timeout = drain_timeout
            self._worker_stop.set()
            self._worker_thread.join(drain_timeout + self.settings.block_ms / 1000 + 5)
            worker_alive = self._worker_thread.is_alive()
            left = self._worker_left
            if worker_alive or left is None or left < 0:
                # The drain did not say (it failed, or is still retrying): ask Redis.
                pending = self._pending_or_unknown()
            else:
                pending = left
            if not worker_alive:
                try:
                    self._worker.snapshot_metrics()
                except DualMemError as exc:  # pragma: no cover - best effort at shutdown
                    log.warning("could not snapshot metrics at close: %s", exc)
            if pending:
                log.warning("dualmem closed with %d commands not yet persisted", pending)
        if worker_alive:
            # Still inside a commit or a Redis call: closing its store under it could
            # corrupt nothing (SQLite rolls back) but would turn its retry into a crash.
            log.error("dualmem worker thread did not stop; its store is left open")
        else:
            for release in self._worker_resources():
                release()
        if self._lease is not None:
            self._lease.release()
        self._redis.close()
        self._close_pubsub_client()
        return CloseReport(pending=pending, drained=pending == 0)

    def _close_pubsub_client(self) -> None:
        # Disconnects the pub/sub connections still open, as closing the one shared
        # client did before they had their own.
        with self._pubsub_lock:
            client, self._pubsub_client = self._pubsub_client, None
        if client is not None:
            client.close()

    def _pending_or_unknown(self) -> int:
        """Commands Redis still holds unpersisted (acks follow commits, so 0 means all
        committed); 1 when Redis cannot say (unknown is not drained)."""
        try:
            return sum(self.backlog().values())
        except DualMemError as exc:
            log.warning("close: could not read the backlog: %s", exc)
            return 1

    def __enter__(self) -> DualMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise DualMemError(_CLOSED)

    @contextmanager
    def _overtaken_by_close(self) -> Iterator[None]:
        """A ``close()`` in another thread between a read's open check and its SQLite read
        closes the store under it: say so, as the open check would have, rather than
        ``StoreUnavailable`` (an outage, which a caller retries)."""
        try:
            yield
        except StoreUnavailable as exc:
            if self._closed:
                raise DualMemError(_CLOSED) from exc
            raise

    # -- access ------------------------------------------------------------------------

    def authorize(
        self,
        principal: Principal,
        level: Level | int,
        action: str = "read",
        scope: str | None = None,
        key: str | None = None,
    ) -> tuple[Level, str]:
        """Check that ``principal`` may ``action`` ("read" or "write") at ``level``.

        Returns the level and the scope the operation would use (``scope``, or the
        principal's own scope at that level). A denial raises ``AccessDenied`` and writes
        an audit row, exactly as a denied ``get`` or ``put`` does (once this DualMemory is
        closed it still raises, with no audit row: nothing would persist it). Layers built on the
        facade (``dualmem.missions``) use it before reading their own tables.

        >>> import tempfile, os
        >>> from acl import AccessDenied, Level, Principal
        >>> db = os.path.join(tempfile.mkdtemp(), "mem.db")
        >>> coder = Principal(agent_id="coder-1", team="backend")
        >>> with DualMemory(redis_url="memory://authorize", db_path=db) as mem:
        ...     print(mem.authorize(coder, Level.TEAM))
        ...     try:
        ...         mem.authorize(coder, Level.PRIVATE, scope="agent:coder-2")
        ...     except AccessDenied:
        ...         print("denied")
        (<Level.TEAM: 2>, 'team:backend')
        denied
        """
        # Once closed the decision still holds, but nothing would persist its audit row
        # (on memory:// nothing ever will): a denial is raised without one. A call that
        # began before close() is audited as a racing read is (see _audit). The key goes
        # into the audit row: one that cannot travel raised UnicodeEncodeError with no
        # audit, or was dead-lettered with it (bytes).
        check_text("key", key, optional=True)
        return self._authorize(principal, level, action, scope, key, audit=not self._closed)

    def _authorize(
        self,
        principal: object,
        level: object,
        action: str,
        scope: str | None,
        key: str | None,
        *,
        audit: bool = True,
    ) -> tuple[Level, str]:
        if action not in ("read", "write"):
            raise ValidationError(f"action must be 'read' or 'write', got {action!r}")
        if not isinstance(principal, Principal):
            raise ValidationError(f"principal must be an acl.Principal, got {type(principal)!r}")
        check_text("scope", scope, optional=True)
        try:
            return resolve_scope(principal, level, action=action, scope=scope, key=key)
        except AccessDenied as exc:
            if not audit:
                exc.audit_receipt = None  # type: ignore[attr-defined]
                raise
            exc.audit_receipt = self._audit(  # type: ignore[attr-defined]
                "access_denied",
                actor=principal.agent_id,
                risk="high",
                scope=exc.scope,
                key=key,
                level=exc.level,
                detail={"action": action, "reason": str(exc)},
            )
            raise

    def _audit(
        self,
        event: str,
        *,
        actor: str,
        risk: str,
        scope: str | None = None,
        key: str | None = None,
        level: int | None = None,
        detail: dict[str, Any] | None = None,
    ) -> Receipt | None:
        """Send an audit event through the stream (best effort: never masks the caller's
        own error). Returns its receipt, or ``None`` if Redis could not take it."""
        shard = self.layout.shard_of(scope or "", key or "")
        fields = audit_fields(
            event,
            actor=actor,
            ts_us=time.time_ns() // 1000,
            risk=risk,
            scope=scope,
            key=key,
            level=level,
            detail=detail,
        )
        # Like a put, a close() that began meanwhile waits for it and drains it; unlike a
        # put, an audit event (a denial seen by a reader racing close()) is still sent
        # once closed: a worker elsewhere persists it.
        counted = self._enter_gate(refuse_closed=False)
        try:
            with translate_errors("audit"):
                sid = self._redis.xadd(self._streams[shard], fields)  # type: ignore[arg-type]
        except DualMemError as exc:
            log.error("audit event %s by %s could not be recorded: %s", event, actor, exc)
            return None
        finally:
            if counted:
                self._leave_gate()
        if self._wakeup is not None:
            self._wakeup.set()
        return Receipt(shard, text(sid), scope or "", key or "", "audit")

    def audit(
        self,
        event: str,
        *,
        principal: Principal,
        risk: str = "low",
        scope: str | None = None,
        key: str | None = None,
        level: int | None = None,
        detail: dict[str, Any] | None = None,
    ) -> Receipt:
        """Record an application audit event (``risk`` is low, medium or high)."""
        self._check_open()
        if risk not in ("low", "medium", "high"):
            raise ValidationError(f"risk must be low, medium or high, got {risk!r}")
        if not isinstance(principal, Principal):
            raise ValidationError("principal must be an acl.Principal")
        check_text("event", event)
        check_text("scope", scope, optional=True)
        check_text("key", key, optional=True)
        if level is not None:
            level = int(as_level(level))
        _check_detail(detail)
        receipt = self._audit(
            event,
            actor=principal.agent_id,
            risk=risk,
            scope=scope,
            key=key,
            level=level,
            detail=detail,
        )
        if receipt is None:
            raise StoreUnavailable(f"audit event {event!r} could not be written to Redis")
        return receipt

    # -- commands ----------------------------------------------------------------------

    def put(
        self,
        key: str,
        value: Any,
        *,
        level: Level | int,
        principal: Principal,
        ttl: float | None = None,
        scope: str | None = None,
    ) -> Receipt:
        """Write ``value`` (any JSON value) at ``key``; returns after ONE Redis round trip.

        Validation, the access check and the envelope (JSON -> lz4 -> AES-GCM for levels
        1, 2, 5) happen first; then ``MULTI; SET cache; XADD command; EXEC`` (with an
        ``XLEN`` for the backlog bound one write in ``XLEN_EVERY``, 64). The
        worker persists the command to SQLite; ``sync(receipt)`` waits for that.
        Raises ``ValidationError``, ``AccessDenied``, ``Backpressure`` or ``StoreUnavailable``;
        on any of them nothing was written, except a ``StoreUnavailable`` that says the
        transaction "may or may not have run" (sent, and no reply before the timeout).
        """
        return self._write(key, value, lvl_arg=level, principal=principal, ttl=ttl, scope=scope)

    def _put_pinned(
        self, key: str, value: Any, *, level: Level | int, principal: Principal
    ) -> Receipt:
        """``put`` whose cache entry never expires (``cache_ttl`` aside): for a small record
        read with ``fresh=True`` that must stay right while its command waits in the
        stream longer than ``cache_ttl`` (a subscriber's saved position, a worker outage)."""
        return self._write(key, value, lvl_arg=level, principal=principal, pinned=True)

    def _write(
        self,
        key: str,
        value: Any,
        *,
        lvl_arg: Level | int,
        principal: Principal,
        ttl: float | None = None,
        scope: str | None = None,
        pinned: bool = False,
    ) -> Receipt:
        self._check_open()
        check_key(key)
        lvl, sc = self._authorize(principal, lvl_arg, "write", scope, key)
        ttl_ms = ttl_to_ms(ttl)
        if ttl_ms is not None and projected(key, lvl):
            raise ValidationError(f"{key}: mission log records cannot expire (no ttl)")
        t0 = time.perf_counter_ns()
        if self._keyfile is not None:
            if self._lease is not None and self._lease.lapsed():
                # No renewal got through for a while: a drop may have removed the key
                # this process seals with. Look at the key file now, not at the interval;
                # one that cannot be read cannot say the key is still there.
                self._keyfile.reload()
                if self._keyfile.failed and lvl in ENCRYPTED_LEVELS:
                    raise ConfigurationError(
                        f"key file {self._keyfile.path} cannot be read, and this process's "
                        "key lease lapsed: not sealing with a key a rotation may have dropped"
                    )
            else:
                self._keyfile.check()
        envelope = self.codec.seal(value, scope=sc, key=key, level=lvl, owner=principal.agent_id)
        t1 = time.perf_counter_ns()
        now_us = time.time_ns() // 1000
        expires_at = None if ttl_ms is None else now_us // 1000 + ttl_ms
        shard = self.layout.shard_of(sc, key)
        fields = put_fields(sc, key, lvl, principal.agent_id, now_us, envelope, expires_at)
        cache_ms = self.settings.cache_ttl * 1000 or None
        px = cache_ms
        if ttl_ms is not None:
            # Past its ttl too (the expiry is in the entry): until the commit a fresh read
            # must see this put expired, not SQLite's older row.
            px = ttl_ms if cache_ms is None else max(ttl_ms, cache_ms)
        if pinned:
            px = None  # no PX: the entry stays until the key is written again
        cache_key = self.layout.cache_key(shard, sc, key)
        cached = cache_value(envelope, expires_at)
        sid = self._send(shard, fields, cache_key, cached, px)
        t2 = time.perf_counter_ns()
        self.metrics_registry.record("encode", t1 - t0)
        self.metrics_registry.record("redis_write", t2 - t1)
        return Receipt(shard, sid, sc, key, "put")

    def delete(
        self, key: str, *, level: Level | int, principal: Principal, scope: str | None = None
    ) -> Receipt:
        """Delete the record at ``key`` (same path as put: one round trip, worker persists)."""
        self._check_open()
        check_key(key)
        lvl, sc = self._authorize(principal, level, "write", scope, key)
        shard = self.layout.shard_of(sc, key)
        fields = delete_fields(sc, key, lvl, principal.agent_id, time.time_ns() // 1000)
        px = self.settings.cache_ttl * 1000 or None
        cache_key = self.layout.cache_key(shard, sc, key)
        t0 = time.perf_counter_ns()
        sid = self._send(shard, fields, cache_key, CACHE_TOMBSTONE, px)
        # The same round trip as a put's (MULTI SET XADD EXEC): a write path like it.
        self.metrics_registry.record("redis_write", time.perf_counter_ns() - t0)
        return Receipt(shard, sid, sc, key, "del")

    def _send(
        self,
        shard: int,
        fields: dict[bytes, bytes | str | int],
        cache_key: bytes,
        cached: bytes,
        px: int | None,
    ) -> str:
        self._enter_gate()
        try:
            stream = self._streams[shard]
            check, settled = self._reserve(shard, stream)
            cache: tuple[Any, ...] = (b"SET", cache_key, cached)
            if px is not None:
                cache += (b"PX", px)
            commands: tuple[tuple[Any, ...], ...] = (cache, xadd_command(stream, fields))
            if check:
                commands += ((b"XLEN", stream),)
            length = None
            try:
                with translate_errors("write"):
                    replies = send_carrying(self._lease, commands, self._transact)
                if check:
                    length = int(replies[2])
            finally:
                # A failed write keeps its place in the estimate (it may have run: a reply
                # that timed out); the next length read leaves it out once it is settled.
                with self._backlog_lock:
                    self._settled[shard] += 1
                    if length is not None:
                        self._backlog[shard] = length + self._uncertain(shard, settled) - 1
            if self._wakeup is not None:
                self._wakeup.set()
            return text(replies[1])
        finally:
            self._leave_gate()

    def _transact(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """A write's ``MULTI; SET; XADD; ...; EXEC`` (see :meth:`_send`): EXEC's replies,
        a failed command's error in its place (``send_carrying`` raises it), after taking
        back the cache entry of a refused ``XADD`` (``take_back_refused_sets``)."""
        replies = transact(self._redis, commands, keep_errors=True)
        if isinstance(replies[1], redis.ResponseError):
            take_back_refused_sets(self._redis, commands, replies, 1)
        return replies

    def _uncertain(self, shard: int, settled: int) -> int:
        """This object's writes a length read may have missed: those started and not yet
        settled when the read was sent (``settled`` then), or started since. Counted as
        missed: some ran before the read, so the estimate is only ever too high. Held
        under ``_backlog_lock``."""
        return self._started[shard] - settled

    def _reserve(self, shard: int, stream: bytes) -> tuple[bool, int]:
        """Take a place under ``max_backlog`` for one write, or raise ``Backpressure``.

        Checking the bound and counting the write in the estimate are one step under one
        lock, so threads sharing this object never pass the bound together by each
        reading the same estimate (32 threads passed it by 31). Returns whether the
        write reads the stream's length too, and ``_settled`` when it was counted (what
        its length read may have missed, see :meth:`_uncertain`).
        """
        bound = self.settings.max_backlog
        with self._backlog_lock:
            if self._backlog[shard] < bound:
                return self._count(shard)
            settled = self._settled[shard]
        # At the bound by the estimate: only then a second round trip, to see whether the
        # worker has caught up since the last read.
        with translate_errors("backlog check"):
            length = int(self._redis.xlen(stream))
        with self._backlog_lock:
            self._backlog[shard] = length + self._uncertain(shard, settled)
            if self._backlog[shard] < bound:
                return self._count(shard)
            backlog = self._backlog[shard]
        raise Backpressure(
            f"command stream {stream.decode()} holds {backlog} entries "
            f"(max_backlog={bound}); the worker is behind",
            backlog=backlog,
            bound=bound,
        )

    def _count(self, shard: int) -> tuple[bool, int]:
        """Count one write in the estimate (under ``_backlog_lock``); see :meth:`_reserve`."""
        check = (
            self._unchecked[shard] >= XLEN_EVERY - 1
            or self._backlog[shard] + XLEN_EVERY >= self.settings.max_backlog
        )
        # Only ever too high for this object alone: the worker's trimming lowers the real
        # length. Other writers' commands show at the next XLEN.
        self._unchecked[shard] = 0 if check else self._unchecked[shard] + 1
        self._backlog[shard] += 1
        self._started[shard] += 1
        return check, self._settled[shard]

    def _enter_gate(self, *, refuse_closed: bool = True) -> bool:
        """Count a command about to reach Redis; ``close()`` waits for those in flight, so
        its drain sees them. Once closed: raise, or (``refuse_closed=False``) return
        False without counting it."""
        with self._gate:
            if self._closed:
                if refuse_closed:
                    raise DualMemError(_CLOSED)
                return False
            self._in_flight += 1
            return True

    def _leave_gate(self) -> None:
        with self._gate:
            self._in_flight -= 1
            if not self._in_flight:
                self._gate.notify_all()

    # -- read-your-writes --------------------------------------------------------------

    def sync(self, receipt: Receipt, timeout: float = 5.0) -> None:
        """Wait until the worker has committed ``receipt`` to SQLite.

        Raises ``NotPersisted`` after ``timeout`` seconds, or at once if the command was
        dead-lettered.
        """
        self._check_open()
        if not isinstance(receipt, Receipt):
            raise ValidationError("sync() takes the Receipt returned by put/delete")
        # A Receipt built by hand: its shard and stream id go into SQLite parameters
        # (a shard of 2**64 raised OverflowError, a lone surrogate UnicodeEncodeError).
        check_int("receipt shard", receipt.shard, low=0)
        check_text("receipt stream_id", receipt.stream_id)
        check_seconds("timeout", timeout)

        def committed() -> bool:
            with self._overtaken_by_close():
                status = self.store.status(receipt.shard, receipt.stream_id)
            if status == "dead":
                raise NotPersisted(
                    f"command {receipt.shard}/{receipt.stream_id} was dead-lettered; "
                    "see `dualmem dlq list`"
                )
            return status == "committed"

        self._wait_for(
            committed,
            timeout,
            lambda: (
                f"command {receipt.shard}/{receipt.stream_id} not committed within "
                f"{timeout}s (is a worker running?)"
            ),
        )

    def _wait_for(self, done: Callable[[], bool], timeout: float, late: Callable[[], str]) -> None:
        """Poll ``done`` until it is true, woken by the in-process worker's commits (else
        backing off to 50 ms); ``NotPersisted(late())`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        delay = 0.0005
        while True:
            self._check_open()  # a close() during the wait closes the store under it
            if done():
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NotPersisted(late())
            with self._committed:
                self._committed.wait(min(delay, remaining))
            delay = min(delay * 2, 0.05)

    def settle(self, timeout: float = 5.0) -> None:
        """Wait until every command in Redis when called, from any process, is committed to
        SQLite (or dead-lettered): what reads and queries see then includes every write
        made before the call. For when receipts are not at hand, such as the writes of
        other processes; a worker must be running.

        Raises ``NotPersisted`` after ``timeout`` seconds, naming the shards still behind.

        >>> from acl import Level, Principal
        >>> with DualMemory() as mem:
        ...     me = Principal(agent_id="a", swarm="s")
        ...     _ = mem.put("k", 1, level=Level.SWARM, principal=me)
        ...     mem.settle()
        ...     [r.key for r in mem.query(principal=me, level=Level.SWARM)]
        ['k']
        """
        self._check_open()
        check_seconds("timeout", timeout)
        with translate_errors("settle"):
            tops = {
                shard: top
                for shard, top in enumerate(last_entry_ids(self._redis, self._streams))
                if top is not None
            }

        def settled() -> bool:
            with translate_errors("settle"):
                for shard, top in list(tops.items()):
                    if settled_through(self._redis, self._streams[shard], self.settings.group, top):
                        del tops[shard]
            return not tops

        self._wait_for(
            settled,
            timeout,
            lambda: (
                f"commands up to {sorted(tops.items())} (shard, stream id) not settled "
                f"within {timeout}s (is a worker running?)"
            ),
        )

    # -- queries -----------------------------------------------------------------------

    def _open(
        self,
        row_envelope: bytes,
        scope: str,
        key: str,
        level: Level,
        actor: str,
        owner: str | None = None,
    ) -> Any:
        """Open an envelope (``owner``: the writer its row names, checked against the one
        it was sealed by), auditing a tampered record or a missing key."""
        try:
            try:
                return self.codec.open(row_envelope, scope=scope, key=key, level=level, owner=owner)
            except MissingKey:
                # Re-sealed by a key rotation under a key this process has not loaded yet.
                if self._keyfile is None or not self._keyfile.reload():
                    raise
                return self.codec.open(row_envelope, scope=scope, key=key, level=level, owner=owner)
        except (TamperedRecord, MissingKey) as exc:
            # An unknown key id is a lost key file or a forged header: audited either way.
            self._audit(
                "tampered_record" if isinstance(exc, TamperedRecord) else "missing_key",
                actor=actor,
                risk="high",
                scope=scope,
                key=key,
                level=int(level),
                detail={"error": str(exc)},
            )
            raise

    def get(
        self,
        key: str,
        *,
        level: Level | int,
        principal: Principal,
        scope: str | None = None,
        default: Any = None,
        fresh: bool = False,
    ) -> Any:
        """The value at ``key``, or ``default`` when absent or expired.

        Reads SQLite (what the worker has committed). ``fresh=True`` answers from the Redis
        cache entry when there is one, so a caller sees its own put before the commit.
        """
        _, _, _, value = self._fetch(key, level, principal, scope, fresh, whole_row=False)
        return default if value is _ABSENT else value

    def get_record(
        self,
        key: str,
        *,
        level: Level | int,
        principal: Principal,
        scope: str | None = None,
        fresh: bool = False,
    ) -> Record | None:
        """Like :meth:`get` but with the record's metadata (owner, times, stream id).

        From the cache (``fresh=True``) only the value is known: owner, times and stream id
        are then empty.
        """
        lvl, sc, row, value = self._fetch(key, level, principal, scope, fresh, whole_row=True)
        if value is _ABSENT:
            return None
        if row is None:
            return Record(sc, key, lvl, "", value, 0, 0, None, "")
        return _record_of(row, value)

    def _fetch(
        self,
        key: str,
        level: Level | int,
        principal: Principal,
        scope: str | None,
        fresh: bool,
        *,
        whole_row: bool,
    ) -> tuple[Level, str, StoredRow | None, Any]:
        """Authorize, then read the cache entry (``fresh``) or the SQLite row, and open it.

        Returns ``(level, scope, row or None, value or _ABSENT)``; the row only with
        ``whole_row``. ``get`` reads just the envelope and owner and builds no Record on
        its way out (the read path's own cost is what the read bench measures).
        """
        self._check_open()
        check_key(key)
        lvl, sc = self._authorize(principal, level, "read", scope, key)
        t0 = time.perf_counter_ns()
        row: StoredRow | None = None
        value: Any = _ABSENT
        cached = None
        if fresh:
            shard = self.layout.shard_of(sc, key)
            with translate_errors("cache read"):
                cached = self._redis.get(self.layout.cache_key(shard, sc, key))
        if cached is not None:
            envelope, expires_at = cached_envelope(bytes(cached))  # type: ignore[arg-type]
            # A delete's mark, or a put past its ttl: deleted or expired, maybe not
            # committed yet; SQLite's copy is older.
            if envelope is not None and (
                expires_at is None or expires_at > time.time_ns() // 1_000_000
            ):
                value = self._open(envelope, sc, key, lvl, principal.agent_id)
        elif whole_row:
            with self._overtaken_by_close():
                row = self.store.get(sc, key, int(time.time() * 1000))
            if row is not None:
                value = self._open(row.envelope, sc, key, lvl, principal.agent_id, row.owner)
        else:
            with self._overtaken_by_close():
                found = self.store.get_envelope(sc, key, int(time.time() * 1000))
            if found is not None:
                value = self._open(found[0], sc, key, lvl, principal.agent_id, found[1])
        self.metrics_registry.record("read", time.perf_counter_ns() - t0)
        return lvl, sc, row, value

    def _record(self, row: StoredRow, actor: str) -> Record:
        # The scope's level, never the row's level column alone: a row whose column was
        # edited to a plaintext level would otherwise open a planted plaintext value in an
        # encrypted scope (Codec.open refuses it when asked with the scope's level).
        try:
            level = stored_level(row.scope, int(row.level))
        except TamperedRecord as exc:
            self._audit(
                "tampered_record",
                actor=actor,
                risk="high",
                scope=row.scope,
                key=row.key,
                level=int(row.level),
                detail={"error": str(exc)},
            )
            raise
        value = self._open(row.envelope, row.scope, row.key, level, actor, row.owner)
        return _record_of(row, value)

    def _scopes(
        self, principal: Principal, level: Level | int | None, scope: str | None
    ) -> list[str]:
        if not isinstance(principal, Principal):
            raise ValidationError("principal must be an acl.Principal")
        check_text("scope", scope, optional=True)
        if scope is not None:
            if level is not None:
                # A scope not at the level (or no scope at all) is another principal's
                # scope as far as this level goes: denied and audited, as get does.
                return [self._authorize(principal, level, "read", scope, None)[1]]
            try:
                scope_level = level_of_scope(scope)
            except ValueError as exc:
                raise ValidationError(str(exc)) from exc
            return [self._authorize(principal, scope_level, "read", scope, None)[1]]
        if level is not None:
            return [self._authorize(principal, level, "read", None, None)[1]]
        return list(readable_scopes(principal).values())

    def query(
        self,
        *,
        principal: Principal,
        level: Level | int | None = None,
        prefix: str = "",
        since: int | None = None,
        until: int | None = None,
        limit: int = 100,
        scope: str | None = None,
        after: tuple[str, str] | None = None,
    ) -> list[Record]:
        """Records the principal may read, by key prefix, level and ``updated_at`` range
        (epoch ms, ``since <= updated_at < until``).

        ``level=None`` searches every level the principal has a scope at; naming a level
        or scope it has none at raises ``AccessDenied``. Ordered by scope, then key, at
        most ``limit`` (up to 10,000). For the next page pass ``after=(r.scope, r.key)`` of
        the last record: only records sorting after it are returned
        (:meth:`query_all` does that until the end).
        """
        self._check_open()
        check_text("prefix", prefix)
        if after is not None:
            if not (isinstance(after, tuple) and len(after) == 2):
                raise ValidationError("after must be a (scope, key) tuple")
            check_text("after scope", after[0])
            check_text("after key", after[1])
        check_int("since", since, optional=True)
        check_int("until", until, optional=True)
        _check_page_size("limit", limit)
        scopes = self._scopes(principal, level, scope)
        t0 = time.perf_counter_ns()
        with self._overtaken_by_close():
            rows = self.store.query(
                scopes,
                now_ms=int(time.time() * 1000),
                prefix=prefix,
                since=since,
                until=until,
                limit=limit,
                after=after,
            )
        out = [self._record(r, principal.agent_id) for r in rows]
        self.metrics_registry.record("read", time.perf_counter_ns() - t0)
        return out

    def query_all(
        self,
        *,
        principal: Principal,
        level: Level | int | None = None,
        prefix: str = "",
        since: int | None = None,
        until: int | None = None,
        scope: str | None = None,
        page: int = _MAX_QUERY_LIMIT,
    ) -> list[Record]:
        """Every record :meth:`query` would find, however many: page after page of
        ``page`` records, each starting after the last one of the page before.

        >>> import tempfile, os
        >>> from acl import Level, Principal
        >>> agent = Principal(agent_id="a", swarm="s")
        >>> db = os.path.join(tempfile.mkdtemp(), "mem.db")
        >>> with DualMemory(redis_url="memory://doctest-query-all", db_path=db) as mem:
        ...     for i in range(5):
        ...         _ = mem.put(f"k{i}", i, level=Level.SWARM, principal=agent)
        ...     mem.sync(_)
        ...     [r.key for r in mem.query_all(principal=agent, prefix="k", page=2)]
        ['k0', 'k1', 'k2', 'k3', 'k4']
        """
        # Checked here, under its own name: query() would blame its limit, which the
        # caller never passed.
        _check_page_size("page", page)
        out: list[Record] = []
        after: tuple[str, str] | None = None
        while True:
            rows = self.query(
                principal=principal,
                level=level,
                prefix=prefix,
                since=since,
                until=until,
                limit=page,
                scope=scope,
                after=after,
            )
            out.extend(rows)
            if len(rows) < page:
                return out
            after = (rows[-1].scope, rows[-1].key)

    def history(
        self,
        key: str,
        *,
        level: Level | int,
        principal: Principal,
        scope: str | None = None,
        limit: int | None = None,
    ) -> list[Change]:
        """Journal entries of one record (puts and deletes, oldest first; no values).

        This is the record's change feed read from its start: ``limit`` keeps the OLDEST
        ``limit`` entries, not the newest (unlike ``AgentLifecycle.history``). There is no
        offset; for the entries after the first ``n``, read more (``limit=None`` reads
        them all) and slice: ``[n:]`` is the next page, ``[-n:]`` the newest ``n``.

        >>> import tempfile, os
        >>> from acl import Level, Principal
        >>> agent = Principal(agent_id="a", swarm="s")
        >>> db = os.path.join(tempfile.mkdtemp(), "mem.db")
        >>> with DualMemory(redis_url="memory://doctest-history", db_path=db) as mem:
        ...     for v in range(3):
        ...         r = mem.put("k", v, level=Level.SWARM, principal=agent)
        ...     mem.sync(r)
        ...     every = mem.history("k", level=Level.SWARM, principal=agent)
        ...     first = mem.history("k", level=Level.SWARM, principal=agent, limit=2)
        ...     len(every), first == every[:2]
        (3, True)
        """
        self._check_open()
        check_key(key)
        check_int("limit", limit, low=0, optional=True)
        _, sc = self._authorize(principal, level, "read", scope, key)
        with self._overtaken_by_close():
            return self.store.history(sc, key, limit)

    def changes(
        self,
        since: int = 0,
        *,
        principal: Principal,
        level: Level | int | None = None,
        limit: int | None = None,
    ) -> list[Change]:
        """The change feed after ``since`` (a journal seq), restricted to what the
        principal may read, ordered by seq."""
        self._check_open()
        if isinstance(since, bool) or not isinstance(since, int) or not 0 <= since < 1 << 63:
            raise ValidationError("since must be a journal seq (int >= 0)")
        check_int("limit", limit, low=0, optional=True)
        scopes = self._scopes(principal, level, None)
        with self._overtaken_by_close():
            return self.store.changes(scopes, since, limit)

    def pubsub(self) -> redis.client.PubSub:
        """A new pub/sub connection on this memory's Redis (its own, outside the pool
        ``put`` draws from: see ``max_connections``); the caller closes it.

        The worker publishes one notification per committed change (seq, scope, key,
        level, op; never the value) on ``layout.channel(scope)``. ``dualmem.Subscriber``
        builds on this; redis errors on the returned object are the caller's to translate.
        """
        self._check_open()
        with self._pubsub_lock:
            self._check_open()  # a close() since would never close a client made now
            if self._pubsub_client is None:
                self._pubsub_client, _ = connect(self.settings, pubsub=True)
            client = self._pubsub_client
        ps: redis.client.PubSub = client.pubsub(  # type: ignore[no-untyped-call]
            ignore_subscribe_messages=False
        )
        return ps

    # -- observability -----------------------------------------------------------------

    def metrics(self) -> dict[str, dict[str, float]]:
        """p50/p95/p99/max/mean (ms) and count per path: redis_write, encode, persist, lag,
        read. ``persist`` and ``lag`` are filled by the in-process worker."""
        return self.metrics_registry.snapshot()

    def backlog(self) -> dict[int, int]:
        """Commands not yet persisted (pending + undelivered), per shard."""
        with translate_errors("backlog"):
            return {
                shard: stream_backlog(self._redis, stream, self.settings.group)
                for shard, stream in enumerate(self._streams)
            }

    def prometheus(self) -> str:
        """Prometheus text exposition of :meth:`metrics` plus the backlog gauge."""
        gauges: dict[str, float] = {}
        try:
            gauges["backlog"] = float(sum(self.backlog().values()))
        except DualMemError:
            gauges["redis_up"] = 0.0
        else:
            gauges["redis_up"] = 1.0
        return prometheus_text(self.metrics(), gauges)


def _check_detail(detail: object) -> None:
    """``ValidationError`` unless an audit event's ``detail`` is a mapping with string keys
    that encodes as JSON (values that are not JSON become their ``str``)."""
    if detail is None:
        return
    if not isinstance(detail, Mapping) or not all(isinstance(k, str) for k in detail):
        raise ValidationError("detail must be a dict with str keys")
    try:
        json.dumps(dict(detail), sort_keys=True, default=str)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValidationError(f"detail cannot be encoded as JSON: {exc}") from None


def _check_page_size(name: str, value: object) -> None:
    """``ValidationError`` unless ``value`` is an int (not a bool) in 1..10,000."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= _MAX_QUERY_LIMIT:
        raise ValidationError(f"{name} must be an int in 1..{_MAX_QUERY_LIMIT}, got {value!r}")


def _load_keyring(settings: Settings) -> Keyring:
    ring = load_keyring(settings)
    if ring is not None:
        return ring
    if settings.embedded:
        path = settings.default_keyring_path
        if holds_sealed_rows(settings.db_path) and not path.exists():  # not made meanwhile
            # A database copied or moved without its key file: a new key would open none
            # of its records, and records sealed under it would be stranded once the old
            # file came back.
            raise ConfigurationError(
                f"{settings.db_path} holds encrypted records but its key file {path} is "
                "missing: put the key file back (or pass keyring= / key=); a new key "
                "would open none of them"
            )
        ring = Keyring.generate()
        # The key file goes beside the database: a db_path that cannot be used is named
        # as such, not as the key file's raw OSError.
        make_database_directory(settings.db_path)
        try:
            ring.save(path)
        except ConfigurationError as exc:
            if not path.exists():  # not made first by another process: it cannot be made
                raise ConfigurationError(
                    f"cannot create the key file {path} beside db_path {settings.db_path}: {exc}"
                ) from exc
            # Another process created it first: use theirs, so both read the same data.
            return Keyring.load(path)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot create the key file {path} beside db_path {settings.db_path}: "
                f"{exc.strerror or exc}"
            ) from exc
        log.info("created key file %s (keep it: it opens every encrypted record)", path)
        return ring
    raise ConfigurationError(
        "levels PRIVATE, TEAM and SYSTEM are encrypted but no key is configured: pass "
        "keyring='keys.json' (create it with `dualmem keygen --out keys.json`) or set "
        "DUALMEM_KEYRING / DUALMEM_KEY"
    )
