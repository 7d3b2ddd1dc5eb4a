"""Redis connections (real or in-process fakeredis) with an explicit retry policy, and
translation of redis errors into dualmem errors at this one boundary."""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import redis
from redis.backoff import ExponentialBackoff
from redis.connection import AbstractConnection, HiredisRespSerializer
from redis.retry import Retry

from dualmem.errors import StoreUnavailable
from dualmem.settings import Settings

_hiredis_pack: Callable[[tuple[Any, ...]], bytes] | None
try:
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # a dependency, but redis-py runs without it: so does pack()
    _hiredis_pack = None

_observability: Callable[[], Any] | None
try:
    from redis.observability.providers import get_observability_instance as _observability
except ImportError:  # a redis-py without OpenTelemetry metrics
    _observability = None

if TYPE_CHECKING:
    # Imported where an in-process server is made: fakeredis pulls in numpy, whose BLAS
    # starts threads, and a `dualmem worker` process on a real Redis needs none of it.
    import fakeredis

log = logging.getLogger("dualmem")

__all__ = [
    "MemoryServer",
    "OutcomeUnknown",
    "WatchedKeyChanged",
    "connect",
    "drop_memory_server",
    "in_process_connection_class",
    "memory_server",
    "retries_of",
    "run_if_holds",
    "take_back_refused_sets",
    "text",
    "transact",
    "transact_watching",
    "translate_errors",
]


@dataclass
class MemoryServer:
    """An in-process fakeredis server, shared by every client of one ``memory://name``.

    ``wakeup`` is set after each write: fakeredis returns from ``XREADGROUP ... BLOCK`` at
    once, so an in-process worker sleeps on this event instead of spinning.
    """

    server: fakeredis.FakeServer
    wakeup: threading.Event = field(default_factory=threading.Event)


_SERVERS: dict[str, MemoryServer] = {}
_SERVERS_LOCK = threading.Lock()


def _server_name(url: str) -> str:
    return url[len("memory://") :].strip("/") or "default"


def memory_server(url: str) -> MemoryServer:
    """The process-wide fakeredis server for ``memory://[name]`` (created on first use)."""
    name = _server_name(url)
    with _SERVERS_LOCK:
        srv = _SERVERS.get(name)
        if srv is None:
            import fakeredis

            srv = _SERVERS[name] = MemoryServer(fakeredis.FakeServer())
        return srv


def drop_memory_server(url: str) -> None:
    """Forget the in-process server of ``memory://[name]`` and everything it held.

    The next client of that URL starts empty, as after a process restart.
    """
    with _SERVERS_LOCK:
        _SERVERS.pop(_server_name(url), None)


def text(value: object) -> str:
    """A Redis reply (bytes or str) as str."""
    return value.decode() if isinstance(value, bytes) else str(value)


class _FairQueue(queue.LifoQueue[Any]):
    """The command pool's idle connections, handed to waiting threads in the order they
    came (``BlockingConnectionPool``'s ``queue_class``).

    With redis-py's own ``LifoQueue`` a thread that gave a connection back took it again
    for its next command before the waiter woken for it ran: with 120 threads on 100
    connections and 2 CPUs, some waited past a one-second wait while Redis answered in
    microseconds. Here a thread that finds others waiting queues behind them, and a
    connection given back wakes the first in line only (waking every waiter for each one
    made hundreds of threads fight over the lock and the GIL).

    Its lock is re-entrant, as redis-py's own pool lock is: a signal handler that runs a
    command (a ``close()`` asking Redis for the backlog) while its thread is inside this
    queue would otherwise wait for itself forever. Such a re-entered ``get`` never waits
    (its own thread holds the turn it would wait behind): it takes an idle connection,
    or fails at once (``StoreUnavailable``).
    """

    def __init__(self, maxsize: int = 0) -> None:
        super().__init__(maxsize)
        self.mutex = threading.RLock()  # type: ignore[assignment]
        self.not_empty = threading.Condition(self.mutex)
        self.not_full = threading.Condition(self.mutex)
        self.all_tasks_done = threading.Condition(self.mutex)
        self._line: collections.deque[threading.Condition] = collections.deque()
        self._inside: set[int] = set()  # threads in get(), waiting or not

    def _put(self, item: Any) -> None:  # called with the queue's lock held
        super()._put(item)
        if self._line:
            self._line[0].notify()

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        me = threading.get_ident()
        with self.mutex:
            if me in self._inside:  # a signal handler of a thread already in here
                if self._qsize():
                    return self._take()
                raise queue.Empty
            try:
                # Inside the try: a signal handler that raises right after the add must
                # not leave this thread marked as inside for good.
                self._inside.add(me)
                return self._get_in_turn(block, timeout)
            finally:
                self._inside.discard(me)

    def _get_in_turn(self, block: bool, timeout: float | None) -> Any:
        # Called with the mutex held.
        if not self._line and self._qsize():
            return self._take()
        if not block:
            raise queue.Empty
        turn = threading.Condition(self.mutex)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self._line.append(turn)  # inside the try, for the same reason as _inside
            while self._line[0] is not turn or not self._qsize():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise queue.Empty
                turn.wait(left)
            return self._take()
        finally:
            with contextlib.suppress(ValueError):
                self._line.remove(turn)
            if self._line and self._qsize():
                self._line[0].notify()  # the next in line may take what is left

    def _take(self) -> Any:
        item = self._get()
        self.not_full.notify()
        return item


def _observed() -> bool:
    """Whether redis-py's OpenTelemetry metrics are switched on in this process."""
    if _observability is None:
        return False
    try:
        manager = _observability().get_provider_manager()
        return manager is not None and bool(manager.config.enabled_telemetry)
    except Exception:  # a redis-py whose observability API changed: do it redis-py's way
        return True


class _CommandPool(redis.BlockingConnectionPool):
    """redis-py's blocking pool, handing out and taking back connections with less Python.

    redis-py's ``get_connection`` and ``release`` took 10 µs per command: a deprecation
    wrapper and six calls that record OpenTelemetry metrics (no-ops unless switched on)
    around the queue. That was the largest part of the put path's transport after packing.
    Here the common case does what redis-py does without them: check for a fork, take a
    connection from the queue (``_FairQueue``: waiting threads in turn), connect it,
    and, as redis-py does only with maintenance notifications off, reconnect one that
    has data to read; given back, it goes to the queue. redis-py's own code runs
    whenever anything else is in play: its metrics switched on, a client-side cache, a
    pool in maintenance, a connection from before a fork or marked for reconnection.
    """

    def _plain(self) -> bool:
        state: Any = self
        return (
            not getattr(state, "_in_maintenance", False)
            and getattr(state, "cache", None) is None
            and not _observed()
        )

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        """A connected connection from the queue (see the class)."""
        if args or kwargs or not self._plain():
            base: Any = super()
            return base.get_connection(*args, **kwargs)
        self._checkpid()
        state: Any = self
        try:
            conn = state.pool.get(block=True, timeout=state.timeout)
        except queue.Empty:
            raise redis.ConnectionError("No connection available.") from None
        if conn is None:
            try:
                conn = state.make_connection()
            except BaseException:
                state.pool.put_nowait(None)  # the slot stays free
                raise
        try:
            conn.connect()
            if not state.maint_notifications_enabled():
                # As redis-py: unread data, or a connection Redis closed, is reconnected.
                # (With maintenance notifications on, the default, redis-py does not
                # look: an idle connection may hold a notification. transact's PING of
                # an idle connection is what finds one Redis closed.)
                try:
                    if conn.can_read():
                        raise redis.ConnectionError("Connection has data")
                except (redis.ConnectionError, redis.TimeoutError, OSError):
                    conn.disconnect()
                    conn.connect()
                    if conn.can_read():
                        raise redis.ConnectionError("Connection not ready") from None
        except BaseException:
            state.release(conn)
            raise
        return conn

    def release(self, connection: Any) -> None:
        """Give ``connection`` back to the queue (see the class)."""
        self._checkpid()  # first: after a fork no connection of the parent's is ours
        if (
            not self._plain()
            or not self.owns_connection(connection)
            or connection.should_reconnect()
        ):
            base: Any = super()
            base.release(connection)
            return
        state: Any = self
        with contextlib.suppress(queue.Full):
            state.pool.put_nowait(connection)


#: The longest pause between two attempts of one command, in seconds.
_BACKOFF_CAP = 0.05

#: Connections a pub/sub client may hold: no cap of its own. Each open ``Subscriber`` (or
#: ``DualMemory.pubsub()``) holds one for its lifetime, so the application decides how
#: many; Redis's ``maxclients`` is the limit (redis-py's default pool refused the 101st).
_PUBSUB_MAX_CONNECTIONS = 2**31 - 1


def connect(
    settings: Settings, *, extra_timeout: float = 0.0, pubsub: bool = False
) -> tuple[redis.Redis, threading.Event | None]:
    """A client for ``settings.redis_url`` and, for ``memory://``, the server's wakeup event.

    Real Redis gets short timeouts and ``redis_retries`` retries with capped exponential
    backoff, set here explicitly: the client library's defaults would retry for seconds,
    and a write path must fail fast (``StoreUnavailable``) when Redis is gone.
    ``extra_timeout`` lengthens the socket timeout for a worker's blocking reads.

    The client's pool holds at most ``max_connections`` connections; a thread that finds
    them all busy waits for one as long as a command may hold one (every attempt's connect
    and reply timeouts, and the backoff between them), not failing at once as redis-py's
    default pool does ("Too many connections" from a healthy Redis). A wait of one reply
    timeout alone failed puts from a healthy Redis when 120 threads shared two CPUs.
    ``pubsub=True`` gives a client for long-lived pub/sub connections instead,
    with no cap: each subscriber holds one for good, and in the command pool a hundred of
    them left no connection for a put.
    """
    attempts = settings.redis_retries + 1
    wait = (settings.connect_timeout + settings.socket_timeout + extra_timeout) * attempts
    wait += _BACKOFF_CAP * settings.redis_retries
    if settings.embedded:
        import fakeredis

        srv = memory_server(settings.redis_url)
        if pubsub:
            fake = fakeredis.FakeRedis(server=srv.server, max_connections=_PUBSUB_MAX_CONNECTIONS)
        else:
            fake = fakeredis.FakeRedis(
                server=srv.server,
                connection_pool_class=_CommandPool,
                max_connections=settings.max_connections,
            )
            # fakeredis passes no pool arguments but the connections' own.
            fake.connection_pool.timeout = wait  # type: ignore[attr-defined]
            fake.connection_pool.queue_class = _FairQueue  # type: ignore[attr-defined]
            fake.connection_pool.reset()
        fake_pool = fake.connection_pool
        fake_pool.connection_class = in_process_connection_class(fake_pool.connection_class)
        return fake, srv.wakeup
    retry = _CountingRetry(ExponentialBackoff(cap=_BACKOFF_CAP, base=0.005), settings.redis_retries)
    options: dict[str, Any] = {
        "socket_timeout": settings.socket_timeout + extra_timeout,
        "socket_connect_timeout": settings.connect_timeout,
        "retry": retry,
        "health_check_interval": 0,  # transact checks an idle connection itself
        "client_name": "dualmem",
    }
    pool: redis.ConnectionPool
    if pubsub:
        pool = redis.ConnectionPool.from_url(
            settings.redis_url, max_connections=_PUBSUB_MAX_CONNECTIONS, **options
        )
    else:
        pool = _CommandPool.from_url(
            settings.redis_url,
            max_connections=settings.max_connections,
            timeout=wait,
            queue_class=_FairQueue,
            **options,
        )
    return redis.Redis.from_pool(pool), None


class _CountingRetry(Retry):
    """redis-py's retry policy, counting the failures it retried (see :func:`retries_of`).

    Every connection of a pool gets a deep copy of the policy; the copies share one
    counter, so the count is the client's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.retried = [0]

    def __deepcopy__(self, memo: dict[int, Any]) -> _CountingRetry:
        return copy.copy(self)  # the backoff is stateless; the counter is shared

    def call_with_retry(self, do: Any, fail: Any, *args: Any, **kwargs: Any) -> Any:
        def noted(*failure: Any) -> Any:
            self.retried[0] += 1
            return fail(*failure)

        return super().call_with_retry(do, noted, *args, **kwargs)


def retries_of(client: redis.Redis) -> int:
    """How many failed calls ``client`` has retried so far (0 for a client not made by
    :func:`connect`). A read whose reply was lost and that redis-py then sent again
    leaves what the first one read pending: the worker notices by this count.

    >>> import fakeredis
    >>> retries_of(fakeredis.FakeRedis())
    0
    """
    retry = client.connection_pool.connection_kwargs.get("retry")
    return retry.retried[0] if isinstance(retry, _CountingRetry) else 0


#: A pooled connection idle this long is PINGed before a transaction goes out on it: once
#: sent, a transaction is never sent again (see transact), so a connection Redis closed
#: while it sat in the pool (a restart) must be found before, when a retry is still safe.
_IDLE_PING_S = 1.0
_PING = b"*1\r\n$4\r\nPING\r\n"


class OutcomeUnknown(redis.RedisError):
    """A transaction was sent and no reply came (a timeout, a dropped connection): it may
    or may not have run, so it is not sent again (not a ConnectionError: the client's
    retry policy retries those)."""


def transact(
    client: redis.Redis, commands: Sequence[tuple[Any, ...]], *, keep_errors: bool = False
) -> list[Any]:
    """``MULTI; <commands>; EXEC`` as one write and one read on a pooled connection.

    Returns EXEC's raw replies (no response callbacks: ``SET`` gives ``b"OK"``, ``XADD`` the
    id as bytes). This is the put path's round trip; going around redis-py's ``Pipeline``
    object saves about 20 µs per call, more than dualmem's own work on a put. Errors are
    redis-py's: a command EXEC ran and that failed raises its ``ResponseError`` (the
    others ran: Redis has no rollback), or with ``keep_errors`` stays in its place among
    the replies, so the caller can tell which ones ran. A failed exchange drops the
    connection (it may hold unread replies). It is
    retried under the client's retry policy only if it failed before the whole transaction
    was handed to the socket (EXEC is its last command, so Redis ran none of it); once
    sent, a timeout or a dropped connection raises ``OutcomeUnknown`` instead: sending it
    again could run it twice (two stream entries for one put that returns one receipt).

    >>> import fakeredis
    >>> transact(fakeredis.FakeRedis(), [(b"SET", b"k", b"v"), (b"INCR", b"n")])
    [b'OK', 1]
    >>> ok, failed = transact(
    ...     fakeredis.FakeRedis(), [(b"SET", b"k", b"v"), (b"INCR", b"k")], keep_errors=True)
    >>> ok, str(failed)
    (b'OK', 'value is not an integer or out of range')
    """
    exchange = _exchange_keeping_errors if keep_errors else _exchange
    return _round_trip(client, [(b"MULTI",), *commands, (b"EXEC",)], len(commands), exchange)


class WatchedKeyChanged(redis.WatchError):
    """``EXEC`` ran nothing: the watched key changed after ``WATCH`` (safe to try again)."""


def transact_watching(
    client: redis.Redis,
    watched: bytes,
    decide: Callable[[Any], None],
    commands: Sequence[tuple[Any, ...]],
    *,
    keep_errors: bool = False,
) -> list[Any]:
    """``WATCH watched; GET watched``, then ``decide(value)`` (raise to send nothing),
    then ``MULTI; <commands>; EXEC`` on the same connection: the transaction runs only if
    ``watched`` did not change in between, else ``WatchedKeyChanged`` (nothing ran).

    As :func:`transact`: the transaction is never sent twice (a missing reply is
    ``OutcomeUnknown``); a failed command's error is raised, or kept in its place with
    ``keep_errors``; the ``WATCH``/``GET`` exchange, which changes nothing, is retried.

    >>> import fakeredis
    >>> r = fakeredis.FakeRedis()
    >>> transact_watching(r, b"mark", lambda v: None, [(b"INCR", b"n")])
    [1]
    """
    pool = client.connection_pool
    conn: Any = pool.get_connection()
    try:
        watch = pack(conn, [(b"WATCH", watched), (b"GET", watched)])
        _, value = conn.retry.call_with_retry(
            lambda: _read_replies(conn, watch, 2), lambda _err: conn.disconnect()
        )
        decide(value)
        packed = pack(conn, [(b"MULTI",), *commands, (b"EXEC",)])
        replies = _exchange(conn, packed, len(commands), aborted_ok=True, keep_errors=keep_errors)
        if replies is None:
            raise WatchedKeyChanged(f"{watched!r} changed after WATCH: nothing ran")
        result: list[Any] = replies
        return result
    except BaseException:
        conn.disconnect()  # WATCH state, unread replies: never hand this on
        raise
    finally:
        pool.release(conn)


class _NotHeld(Exception):
    """``run_if_holds``'s key holds another value: send nothing."""


def run_if_holds(
    client: redis.Redis, name: bytes, expected: object, command: tuple[Any, ...]
) -> bool:
    """Run ``command`` only while ``name`` holds ``expected`` (a compare-and-set, under
    ``WATCH``: see :func:`transact_watching`); whether it ran. A value that changed
    between the look and the write, or another value, is False and runs nothing.

    >>> import fakeredis
    >>> r = fakeredis.FakeRedis()
    >>> r.set(b"k", b"a"), run_if_holds(r, b"k", b"b", (b"SET", b"k", b"c"))
    (True, False)
    >>> run_if_holds(r, b"k", b"a", (b"SET", b"k", b"c")), r.get(b"k")
    (True, b'c')
    """

    def decide(value: object) -> None:
        if value != expected:
            raise _NotHeld

    try:
        transact_watching(client, name, decide, [command])
    except (_NotHeld, WatchedKeyChanged):
        return False
    return True


def take_back_refused_sets(
    client: redis.Redis, commands: Sequence[tuple[Any, ...]], replies: Sequence[Any], pairs: int
) -> None:
    """After a transaction whose first ``pairs`` command pairs are ``SET cache``,
    ``XADD command`` (a write's): delete each cache entry whose ``SET`` ran and whose
    ``XADD`` Redis refused (the stream's name holding another type), only while it still
    holds that write's bytes (:func:`run_if_holds`). Redis runs the rest of a transaction
    past a failed command and has no rollback: the entry would show a write that raised,
    and that no command will ever bring to SQLite. A Redis error here is logged.

    >>> import fakeredis
    >>> r = fakeredis.FakeRedis()
    >>> _ = r.set(b"s", b"not a stream")
    >>> sent = [(b"SET", b"c", b"v"), (b"XADD", b"s", b"*", b"op", b"put")]
    >>> replies = transact(r, sent, keep_errors=True)
    >>> take_back_refused_sets(r, sent, replies, 1); r.exists(b"c")
    0
    """
    for i in range(pairs):
        if isinstance(replies[2 * i + 1], redis.ResponseError) and replies[2 * i] == b"OK":
            name, value = commands[2 * i][1], commands[2 * i][2]
            try:
                run_if_holds(client, name, value, (b"DEL", name))
            except redis.RedisError as exc:
                log.warning(
                    "a refused write's cache entry %r stays (until it expires or the key "
                    "is written again): %s",
                    name,
                    exc,
                )


def send_many(client: redis.Redis, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
    """Send ``commands`` in one write and read their replies (no ``MULTI``: not atomic).

    The worker's ``XACK`` + ``PUBLISH`` after each commit, without the cost of redis-py's
    ``Pipeline`` object. Every reply is read before the first error reply is raised, so
    the connection goes back to the pool in step; a failed exchange drops the connection
    and is retried under the client's retry policy (both commands are safe to repeat).

    >>> import fakeredis
    >>> send_many(fakeredis.FakeRedis(), [(b"SET", b"k", b"v"), (b"INCR", b"n")])
    [b'OK', 1]
    """
    return _round_trip(client, commands, len(commands), _read_replies)


def _round_trip(
    client: redis.Redis,
    commands: Sequence[tuple[Any, ...]],
    count: int,
    exchange: Callable[[Any, Any, int], list[Any]],
) -> list[Any]:
    """Pack ``commands`` once and run ``exchange(conn, packed, count)`` on a pooled
    connection, under the client's retry policy (a failure drops the connection)."""
    pool = client.connection_pool
    conn: Any = pool.get_connection()  # redis-py leaves parts of Connection untyped
    try:
        packed = pack(conn, commands)
        result: list[Any] = conn.retry.call_with_retry(
            lambda: exchange(conn, packed, count), lambda _err: conn.disconnect()
        )
        return result
    except BaseException:
        # Whatever went wrong (an interrupt between two replies included), replies may be
        # left unread: the next caller of this pooled connection would read them as its
        # own. A fresh connection is cheap; a desynchronised one lies from then on.
        conn.disconnect()
        raise
    finally:
        pool.release(conn)


def pack(conn: Any, commands: Sequence[tuple[Any, ...]]) -> Any:
    """``conn.pack_commands(commands)``: the bytes redis-py would send, made faster.

    redis-py packs each command through a generator per argument and a buffer-splitting
    loop: 9 µs for a put's ``MULTI; SET; XADD; EXEC``, more than the rest of the
    transport's Python. Where its packer is hiredis's (``hiredis`` installed, a plain
    redis-py connection), this hands each command to ``hiredis.pack_command`` as redis-py
    does and joins the result: the same bytes for 2.5 µs. Anything redis-py would rewrite
    first (a command name with a space, ``bytearray``: ``hiredis`` refuses that) takes
    redis-py's own path, which also raises its errors.

    >>> conn = redis.Connection()
    >>> b"".join(pack(conn, [(b"SET", b"k", "v", 5)])) == b"".join(
    ...     conn.pack_commands([(b"SET", b"k", "v", 5)]))
    True
    """
    cls = type(conn)
    if (
        _hiredis_pack is not None
        and cls.pack_commands is AbstractConnection.pack_commands
        and type(getattr(conn, "_command_packer", None)) is HiredisRespSerializer
    ):
        out = []
        for command in commands:
            name = command[0]
            if type(name) is not bytes or b" " in name:
                break
            try:
                out.append(_hiredis_pack(command))
            except TypeError:
                break
        else:
            return [b"".join(out)]
    return conn.pack_commands(commands)


class _Direct(list[list[bytes]]):
    """Commands for an in-process server, as argument lists instead of RESP bytes."""


def in_process(client: redis.Redis) -> bool:
    """Whether ``client`` talks to an in-process fakeredis server (``memory://``).

    >>> import fakeredis
    >>> in_process(fakeredis.FakeRedis()), in_process(redis.Redis())
    (True, False)
    """
    cls = client.connection_pool.connection_class
    return any(k.__module__.startswith("fakeredis") for k in cls.__mro__)


def in_process_connection_class(base: type[Any]) -> type[Any]:
    """A subclass of fakeredis's connection class ``base`` that hands each command to the
    in-process server as an argument list instead of RESP bytes.

    fakeredis parses the RESP a client sends with a Python generator, line by line: on
    the embedded default that parse was about 40 % of a put (45 µs of the 105 µs its
    ``MULTI; SET; XADD; EXEC`` took) and a third of the worker's read. The socket's
    ``_process_command`` is the method that parser hands each parsed command to, so the
    same command code runs on the same arguments; replies, errors, transactions and
    pub/sub are read back as before. With a fakeredis whose socket lacks that method the
    commands go as RESP bytes (``tests/test_redis_backend.py`` notices).

    A ``MULTI; ...; EXEC`` (a put) goes further: ``run_transaction`` runs its commands the
    way the server's EXEC runs its queue, in one step (see there), and returns EXEC's
    reply without the four trips through ``_process_command`` and the reply queue.
    """

    class InProcessConnection(base):  # type: ignore[misc]
        def pack_command(self, *args: Any) -> _Direct:
            return _Direct([self._arguments(args)])

        def pack_commands(self, commands: Sequence[Sequence[Any]]) -> _Direct:
            return _Direct([self._arguments(args) for args in commands])

        def send_command(self, *args: Any, **kwargs: Any) -> None:
            self.send_packed_command(
                self.pack_command(*args), check_health=kwargs.get("check_health", True)
            )

        def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            if not isinstance(command, _Direct):
                super().send_packed_command(command, check_health)
                return
            sock = self._fake_socket()
            process = getattr(sock, "_process_command", None)
            if process is None:  # a fakeredis without it: RESP bytes, as redis-py sends
                super().send_packed_command(base.pack_commands(self, command), check_health)
                return
            if not self._server.connected or getattr(sock, "_killed", False):
                # What the fake socket's sendall raises for a stopped server or a
                # killed client, and what redis-py does then: drop the connection.
                self.disconnect()
                raise redis.ConnectionError("in-process Redis server is not connected")
            try:
                for args in command:
                    process(args)
            except BaseException:
                # As redis-py does when a send fails: the replies of the commands already
                # run (or an open MULTI) must not stay on a connection the pool reuses.
                self.disconnect()
                raise

        def run_transaction(self, command: _Direct) -> Any:
            """EXEC's reply to ``command`` (``MULTI; ...; EXEC``), run on the in-process
            server in one step, or ``_NOT_DIRECT``: the ordinary path is needed.

            Sent one by one, each of those commands takes the server's lock, clears out
            closed connections, stamps every database's clock and goes through a reply
            queue; EXEC then runs the queued ones under the lock. Here the queued
            commands run as EXEC runs them (``_run_command``, in a transaction), after
            the same checks (known command, ACL, arity), under one hold of the lock:
            the same code on the same arguments, without the queueing. Anything the
            ordinary path would answer with an error before EXEC (an unknown command, a
            wrong arity), a connection with WATCHed keys or a transaction already open,
            a server of another type (Dragonfly queues by its own rules) and a fakeredis
            that moved what this uses take the ordinary path, which then gives
            redis-py's errors and EXEC's abort exactly.
            """
            sock = self._fake_socket()
            decode = getattr(self, "_decode", None)  # looked up before anything runs
            if decode is None or not self._server.connected or getattr(sock, "_killed", False):
                return _NOT_DIRECT  # the ordinary path raises what redis-py raises
            result = _run_direct(sock, command)
            return result if result is _NOT_DIRECT else decode(result)

        def _fake_socket(self) -> Any:
            # The in-process server's socket, connected if need be (an older fakeredis
            # has no get_socket: its _sock then).
            get_socket = getattr(self, "get_socket", None)
            return self._sock if get_socket is None else get_socket()

        def _arguments(self, args: Sequence[Any]) -> list[bytes]:
            # As redis-py packs them: a command name with spaces ("CLIENT SETNAME") is
            # several arguments; str, int and float are encoded, anything else refused.
            first = args[0]
            if isinstance(first, str):
                args = (*first.encode().split(), *args[1:])
            elif b" " in first:
                args = (*first.split(), *args[1:])
            encode = self.encoder.encode
            # bytearray and memoryview come back from encode() as they are; the server's
            # command code expects bytes, which the RESP parser would have made of them.
            return [a if type(a) is bytes else bytes(encode(a)) for a in args]

    return InProcessConnection


#: ``run_transaction``'s answer when the transaction must take the ordinary path.
_NOT_DIRECT: Any = object()

#: What the direct path uses from fakeredis beyond its sockets: ``(SimpleError,
#: FLAG_TRANSACTION, extract_command)``.
_FakeredisParts = tuple[type[Exception], str, Callable[[list[bytes]], Any]]


@functools.cache
def _fakeredis_parts() -> _FakeredisParts | None:
    """:data:`_FakeredisParts`, imported once, on the first direct transaction (a put
    pays no import statements; a process on a real Redis never imports fakeredis);
    ``None`` when this fakeredis has moved one of them (the ordinary path then)."""
    try:
        from fakeredis._helpers import SimpleError
        from fakeredis._msgs import FLAG_TRANSACTION
        from fakeredis._socket._resp import extract_command
    except ImportError:
        return None
    return SimpleError, FLAG_TRANSACTION, extract_command


def _run_direct(sock: Any, command: _Direct) -> Any:
    """Run ``MULTI; <queued>; EXEC`` on fakeredis socket ``sock`` as its ``EXEC`` would;
    the decoded results, or ``_NOT_DIRECT`` before anything ran."""
    parts = _fakeredis_parts()
    if parts is None:
        return _NOT_DIRECT
    steps = _direct_steps(sock, command, parts)
    if steps is None:
        return _NOT_DIRECT
    simple_error = parts[0]
    try:  # every attribute used below, before anything runs
        server, version, run, decode = (
            sock._server,
            sock.version,
            sock._run_command,
            sock._decode_result,
        )
        lock, closed, dbs = server.lock, server.closed_sockets, server.dbs
    except AttributeError:
        return _NOT_DIRECT
    with lock:
        try:
            for _, sig, args in steps:
                sig.check_arity(args, version)
        except simple_error:
            return _NOT_DIRECT  # EXEC would abort: the ordinary path gives the error
        # Nothing has run yet. What each command does first, once:
        while closed:
            gone = closed.pop()()
            if gone:
                gone._cleanup(server)
        now = time.time()
        for db in dbs.values():
            db.time = now
        # Then what EXEC does with its queue.
        results = []
        for func, sig, args in steps:
            try:
                sock._in_transaction = True
                answer = run(func, sig, args, False)
            except simple_error as exc:
                answer = exc
            finally:
                sock._in_transaction = False
            results.append(answer)
    return decode(results)


def _direct_steps(
    sock: Any, command: _Direct, parts: _FakeredisParts
) -> list[tuple[Any, Any, list[bytes]]] | None:
    """The queued commands of ``command`` as ``(method, signature, arguments)``, checked
    as the server checks a command it queues (known, allowed); ``None`` where the
    ordinary path must run it (see ``run_transaction``)."""
    simple_error, transaction_flag, extract_command = parts
    try:
        if (
            len(command) < 2
            or command[0] != [b"MULTI"]
            or command[-1] != [b"EXEC"]
            or sock._watches
            or sock._transaction is not None
            or sock._transaction_paused
            or sock._in_transaction
            or sock._pubsub
            or sock._reply_off
            or sock._reply_skip
            or sock._reply_skip_next
            or sock._server.server_type != "redis"  # others queue by other rules
        ):
            return None
        validate, info = sock._server.acl.validate_command, sock._client_info
        steps = []
        for fields in command:
            name, args = extract_command(fields)
            func, sig = sock._name_to_func(name)
            validate(info.user, info, fields)
            steps.append((func, sig, args))
    except AttributeError:  # another fakeredis: the ordinary path
        return None
    except simple_error:  # unknown or not allowed: the ordinary path answers it
        return None
    steps = steps[1:-1]
    if any(transaction_flag in sig.flags for _, sig, _ in steps):
        return None  # WATCH, MULTI, EXEC or DISCARD inside: the ordinary path
    return steps


def _read_replies(conn: Any, packed: Any, count: int) -> list[Any]:
    conn.send_packed_command(packed, check_health=False)
    replies: list[Any] = []
    error: redis.ResponseError | None = None
    for _ in range(count):
        try:
            reply = conn.read_response()
        except redis.ResponseError as exc:  # the reply was consumed; the rest still follow
            reply = exc
        if isinstance(reply, redis.ResponseError) and error is None:
            error = reply
        replies.append(reply)
    if error is not None:
        raise error
    return replies


def _exchange(
    conn: Any, packed: Any, queued: int, *, aborted_ok: bool = False, keep_errors: bool = False
) -> Any:
    # Everything up to the send is safe to retry: an idle connection's PING, connecting,
    # and the send itself (if it fails, EXEC did not reach Redis whole, so none of it ran).
    direct = isinstance(packed, _Direct)  # in-process: no socket to go stale
    if (
        not direct
        and getattr(conn, "_sock", None) is not None
        and time.monotonic() - getattr(conn, "_dualmem_used", 0.0) > _IDLE_PING_S
    ):
        conn.send_packed_command([_PING], check_health=False)
        if conn.read_response() not in (b"PONG", "PONG"):
            raise redis.ConnectionError("bad reply to PING")
    if direct:
        replies = conn.run_transaction(packed)
        if replies is not _NOT_DIRECT:
            return _exec_replies(replies, aborted_ok, keep_errors)
    conn.send_packed_command(packed, check_health=False)
    try:
        conn.read_response()  # +OK for MULTI
        for _ in range(queued):
            conn.read_response()  # +QUEUED, or the error that makes EXEC abort
        replies = conn.read_response()
    except (redis.ResponseError, redis.BusyLoadingError):
        # EXECABORT or a rejected command (-LOADING while Redis loads its data: a
        # ConnectionError to redis-py, so retried): EXEC ran nothing. Replies may be left
        # unread on the socket.
        conn.disconnect()
        raise
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        conn.disconnect()
        raise OutcomeUnknown(
            f"no reply after the transaction was sent, so it may or may not have run: {exc}"
        ) from exc
    if not direct:
        conn._dualmem_used = time.monotonic()
    return _exec_replies(replies, aborted_ok, keep_errors)


_exchange_keeping_errors = functools.partial(_exchange, keep_errors=True)


def _exec_replies(replies: Any, aborted_ok: bool, keep_errors: bool = False) -> Any:
    if replies is None and aborted_ok:
        return None  # a WATCHed key changed: EXEC ran nothing
    if not isinstance(replies, list):
        raise redis.ResponseError(f"EXEC returned {replies!r}")
    if not keep_errors:
        for reply in replies:
            if isinstance(reply, redis.ResponseError):
                raise reply
    return replies


def translate_errors(what: str) -> _Translated:
    """Turn redis-py exceptions raised inside the block into ``StoreUnavailable``.

    >>> with translate_errors("ping"):
    ...     raise redis.ConnectionError("refused")
    Traceback (most recent call last):
    ...
    dualmem.errors.StoreUnavailable: ping: Redis is unavailable: refused
    """
    return _Translated(what)


class _Translated:
    """:func:`translate_errors`'s block: a class, not a generator (``@contextmanager``
    cost 1.2 µs a block, on every put and fresh read; this 0.3)."""

    __slots__ = ("what",)

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> Literal[False]:
        if exc is None:
            return False
        if isinstance(exc, redis.ResponseError):
            raise StoreUnavailable(f"{self.what}: Redis refused the command: {exc}") from exc
        if isinstance(exc, (redis.RedisError, OSError)):
            raise StoreUnavailable(f"{self.what}: Redis is unavailable: {exc}") from exc
        return False
