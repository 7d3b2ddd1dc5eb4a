"""The Redis transport: the embedded client hands the in-process server argument lists,
with the same replies, errors and connection failures as RESP bytes over a socket."""

from __future__ import annotations

import functools
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest
import redis

from dualmem.layout import Layout
from dualmem.redis_backend import (
    WatchedKeyChanged,
    connect,
    drop_memory_server,
    in_process_connection_class,
    pack,
    retries_of,
    send_many,
    transact,
    transact_watching,
)
from dualmem.settings import Settings

from .conftest import wait_until


def _direct_client(server: fakeredis.FakeServer) -> fakeredis.FakeRedis:
    client = fakeredis.FakeRedis(server=server)
    pool = client.connection_pool
    pool.connection_class = in_process_connection_class(pool.connection_class)
    return client


@pytest.fixture
def fake() -> Iterator[fakeredis.FakeRedis]:
    client = _direct_client(fakeredis.FakeServer())
    yield client
    client.close()


def test_the_embedded_client_hands_the_installed_fakeredis_argument_lists() -> None:
    # If a fakeredis release renames the methods the in-process path calls, everything
    # still works (commands go as RESP bytes, transactions command by command) but loses
    # the speed the README quotes.
    url = "memory://transport-test"
    client, _ = connect(Settings(redis_url=url))
    try:
        # The pool's one connection, its socket watched: commands reach _process_command,
        # a transaction's commands reach _run_command in one step, nothing goes as bytes.
        conn: Any = client.connection_pool.get_connection()
        sock = conn.get_socket()
        assert callable(getattr(sock, "_process_command", None))
        seen: list[list[bytes]] = []
        ran: list[list[bytes]] = []
        real, real_run = sock._process_command, sock._run_command

        def spy(args: list[bytes]) -> None:
            seen.append(args)
            real(args)

        def spy_run(func: Any, sig: Any, args: list[bytes], from_script: bool) -> Any:
            ran.append([sig.name.encode(), *args])
            return real_run(func, sig, args, from_script)

        sock._process_command = spy
        sock._run_command = spy_run
        sock.sendall = lambda _data: pytest.fail("RESP bytes were sent")
        client.connection_pool.release(conn)
        assert transact(client, [(b"SET", b"k", "välue")]) == [b"OK"]
        assert client.get("k") == "välue".encode()
        assert client.execute_command("CLIENT SETNAME", "worker-1") in (True, b"OK")
        assert ran[0] == [b"set", b"k", "välue".encode()]
        assert [b"MULTI"] not in seen and [b"EXEC"] not in seen
        assert [b"CLIENT", b"SETNAME", b"worker-1"] in seen
        # What the direct path leaves to the ordinary one: a transaction EXEC would abort
        # goes command by command (and answers as Redis does).
        with pytest.raises(redis.ResponseError, match="wrong number of arguments"):
            transact(client, [(b"SET", b"k")])
        assert seen[-3:] == [[b"MULTI"], [b"SET", b"k"], [b"EXEC"]]
    finally:
        client.close()
        drop_memory_server(url)


def test_a_dropped_in_process_server_starts_empty() -> None:
    # drop_memory_server is a process restart for the embedded default (the restart tests,
    # the bench between suites): had it kept the server, a "restarted" DualMemory would
    # find the last run's cache entries and stream still in Redis.
    url = "memory://drop-test"
    first, _ = connect(Settings(redis_url=url))
    same, _ = connect(Settings(redis_url=url + "/"))  # one server per name
    clients = [first, same]
    try:
        first.set("k", "v")
        assert same.get("k") == b"v"
        drop_memory_server(url)
        fresh, _ = connect(Settings(redis_url=url))
        clients.append(fresh)
        assert fresh.get("k") is None
        assert first.get("k") == b"v"  # a client made before keeps the server it had
    finally:
        for client in clients:
            client.close()
        drop_memory_server(url)


def test_a_fakeredis_that_moved_what_the_direct_path_uses_takes_the_ordinary_path(
    fake: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn: Any = fake.connection_pool.get_connection()
    sock = conn.get_socket()
    fake.connection_pool.release(conn)
    # A release that moved the helper the direct path imports (looked up once a process).
    import dualmem.redis_backend as backend

    fresh = functools.cache(backend._fakeredis_parts.__wrapped__)
    monkeypatch.setattr(backend, "_fakeredis_parts", fresh)
    monkeypatch.setitem(sys.modules, "fakeredis._socket._resp", None)
    seen: list[list[bytes]] = []
    real = sock._process_command
    monkeypatch.setattr(sock, "_process_command", lambda args: (seen.append(args), real(args)))
    assert transact(fake, [(b"SET", b"k", b"v"), (b"INCR", b"n")]) == [b"OK", 1]
    assert seen == [[b"MULTI"], [b"SET", b"k", b"v"], [b"INCR", b"n"], [b"EXEC"]]


def test_a_server_of_another_type_queues_by_its_own_rules(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Dragonfly refuses some commands inside MULTI as it queues them; the direct path
    # replicates Redis's queueing only, so other server types take the ordinary path.
    client = _direct_client(fakeredis.FakeServer(server_type="dragonfly"))
    conn: Any = client.connection_pool.get_connection()
    sock = conn.get_socket()
    client.connection_pool.release(conn)
    seen: list[list[bytes]] = []
    real = sock._process_command
    monkeypatch.setattr(sock, "_process_command", lambda args: (seen.append(args), real(args)))
    assert transact(client, [(b"SET", b"k", b"v")]) == [b"OK"]
    assert seen == [[b"MULTI"], [b"SET", b"k", b"v"], [b"EXEC"]]


def test_a_direct_transaction_wakes_a_blocked_reader_and_honours_watch(
    fake: fakeredis.FakeRedis,
) -> None:
    # The worker blocks in XREADGROUP on another connection; a put's XADD must wake it.
    fake.xgroup_create("s", "g", id="0", mkstream=True)
    reader = fakeredis.FakeRedis(server=fake.connection_pool.connection_kwargs["server"])
    got: list[Any] = []
    thread = threading.Thread(
        target=lambda: got.append(reader.xreadgroup("g", "c", {"s": ">"}, count=1, block=5000))
    )
    thread.start()
    time.sleep(0.2)  # blocked by now; not woken, it would time out with no entry
    transact(fake, [(b"XADD", b"s", b"*", b"op", b"put")])
    thread.join(10)
    assert got and got[0][0][1][0][1] == {b"op": b"put"}

    # A WATCHed key changed by a direct transaction aborts the watcher's EXEC.
    def decide(_value: object) -> None:
        transact(fake, [(b"SET", b"w", b"meanwhile")])  # changed after WATCH

    with pytest.raises(WatchedKeyChanged):
        transact_watching(fake, b"w", decide, [(b"SET", b"w", b"mine")])
    assert fake.get("w") == b"meanwhile"


SCRIPT: list[tuple[Any, ...]] = [
    (b"SET", "text", "not a number"),
    (b"XADD", b"s", b"*", b"op", "put", b"l", 3, b"t", 1_764_000_000_000_000),
    (b"INCRBY", b"n", 5),
    (b"SET", b"k", "välue".encode(), b"PX", 60_000),
    (b"SET", b"f", 2.5),
    (b"SET", bytearray(b"ba"), memoryview(b"mv")),
]


def _run(client: fakeredis.FakeRedis) -> dict[str, Any]:
    """One of each kind of exchange, with every reply or error, ids masked."""
    out: dict[str, Any] = {}
    replies = transact(client, SCRIPT)
    replies[1] = b"<id>" if replies[1].endswith(b"-0") else replies[1]
    out["transact"] = replies
    out["read_back"] = send_many(
        client, [(b"GET", b"k"), (b"XLEN", b"s"), (b"GET", b"n"), (b"GET", b"f"), (b"GET", b"ba")]
    )
    with pytest.raises(redis.ResponseError) as exc:
        send_many(client, [(b"INCR", b"n"), (b"INCR", b"text"), (b"INCR", b"n")])
    out["send_many_error"] = str(exc.value)
    out["after_error"] = send_many(client, [(b"GET", b"n"), (b"PING",)])
    with pytest.raises(redis.ResponseError) as exc:
        transact(client, [(b"SET", b"a", 1), (b"INCR", b"text"), (b"SET", b"b", 2)])
    out["exec_error"] = str(exc.value)
    with pytest.raises(redis.ResponseError) as exc:
        transact(client, [(b"SET", b"c", 1), (b"GET",)])  # refused while queueing
    out["abort"] = str(exc.value)
    out["after_abort"] = send_many(client, [(b"MGET", b"a", b"b", b"c"), (b"PING",)])
    with pytest.raises(redis.ResponseError) as exc:
        transact(client, [(b"SET", b"d", 1), (b"MULTI",), (b"SET", b"e", 2)])
    out["nested"] = str(exc.value)
    out["after_nested"] = send_many(client, [(b"MGET", b"d", b"e"), (b"PING",)])
    # redis-py's own paths: commands with response callbacks, a pipeline, a stream group.
    out["client"] = [client.incr("n"), client.get("k"), client.exists("a", "b", "c")]
    with pytest.raises(redis.DataError):
        client.set("bad", None)  # type: ignore[arg-type]
    pipe = client.pipeline(transaction=True)
    pipe.set("p", 1).incr("p").get("p")
    out["pipeline"] = pipe.execute()
    client.xgroup_create("s", "g", id="0")
    read = client.xreadgroup("g", "c", {"s": ">"}, count=10)
    out["xreadgroup"] = [(name, [fields for _, fields in items]) for name, items in read]
    return out


def test_argument_lists_and_resp_bytes_give_the_same_results() -> None:
    direct = _run(_direct_client(fakeredis.FakeServer()))
    packed = _run(fakeredis.FakeRedis(server=fakeredis.FakeServer()))
    assert direct == packed
    assert direct["transact"] == [b"OK", b"<id>", 5, b"OK", b"OK", b"OK"]
    assert direct["read_back"] == ["välue".encode(), 1, b"5", b"2.5", b"mv"]
    assert direct["after_error"] == [b"7", b"PONG"]
    assert "not an integer" in direct["exec_error"]
    assert "wrong number of arguments" in direct["abort"]
    # A command failing inside EXEC leaves the others applied (Redis semantics); a command
    # refused while queueing discards the whole transaction.
    assert direct["after_abort"] == [[b"1", b"2", None], b"PONG"]
    # MULTI inside a transaction is refused as it is queued, and the rest runs. Run on the
    # direct path it opened a second transaction on the connection: no error, and every
    # later command on it was queued (+QUEUED) instead of run.
    assert "MULTI calls can not be nested" in direct["nested"]
    assert direct["after_nested"] == [[b"1", b"2"], b"PONG"]
    assert direct["pipeline"] == [True, 2, b"2"]


def test_pub_sub_goes_through_the_in_process_path(fake: fakeredis.FakeRedis) -> None:
    sub = fake.pubsub()
    sub.subscribe("ch")
    assert sub.get_message(timeout=1)["type"] == "subscribe"
    assert fake.publish("ch", "hello") == 1
    assert sub.get_message(timeout=1)["data"] == b"hello"
    sub.close()


def test_a_stopped_server_is_a_connection_error_then_recovers(fake: fakeredis.FakeRedis) -> None:
    server = fake.connection_pool.connection_kwargs["server"]
    assert transact(fake, [(b"SET", b"k", b"1")]) == [b"OK"]
    server.connected = False
    with pytest.raises(redis.ConnectionError):
        transact(fake, [(b"SET", b"k", b"2")])
    with pytest.raises(redis.ConnectionError):
        fake.get("k")
    server.connected = True
    assert transact(fake, [(b"SET", b"k", b"3")]) == [b"OK"]
    assert fake.get("k") == b"3"


@pytest.mark.parametrize("path", ["direct", "packed"])
def test_a_killed_client_fails_once_then_reconnects(path: str) -> None:
    server = fakeredis.FakeServer()
    client = _direct_client(server) if path == "direct" else fakeredis.FakeRedis(server=server)
    assert send_many(client, [(b"CLIENT", b"SETNAME", b"victim")]) == [b"OK"]
    other = fakeredis.FakeRedis(server=server)
    assert other.client_kill_filter(_type="normal", skipme=True) == 1
    # The pooled connection was killed under it; the embedded client has no retries, so
    # the exchange fails (dropping that connection) and nothing ran; the next one connects.
    with pytest.raises(redis.ConnectionError):
        transact(client, [(b"INCR", b"counter")])
    assert client.get("counter") is None
    assert transact(client, [(b"INCR", b"counter")]) == [1]


@pytest.mark.parametrize("path", ["direct", "packed"])
def test_a_command_that_crashes_the_server_code_leaves_no_replies_behind(path: str) -> None:
    # fakeredis raises a Python exception (not a Redis error reply) for a group name that
    # is not UTF-8. The commands before it ran and queued replies (or opened a MULTI); the
    # connection must be dropped, not returned to the pool with them.
    server = fakeredis.FakeServer()
    client = _direct_client(server) if path == "direct" else fakeredis.FakeRedis(server=server)
    client.xadd("s", {"f": "v"}, id="1-0")
    client.xgroup_create("s", "g", id="0")
    client.set("a", "A")
    with pytest.raises(UnicodeDecodeError):
        send_many(client, [(b"SET", b"x", b"1"), (b"XPENDING", b"s", b"\xff")])
    assert client.get("a") == b"A"
    with pytest.raises(UnicodeDecodeError):
        transact(client, [(b"SET", b"y", b"1"), (b"XPENDING", b"s", b"\xff")])
    assert client.get("a") == b"A"
    assert transact(client, [(b"SET", b"z", b"1")]) == [b"OK"]
    # redis-py's own pipelines (the worker's, a mirror's) drop nothing on such an error:
    # the send itself must. Kept, the connection answered the next GET with the MULTI's
    # +OK, then with a +QUEUED, each reply one command late.
    for transaction in (True, False):
        pipe = client.pipeline(transaction=transaction)
        pipe.set("w", 1).execute_command("XPENDING", b"s", b"\xff")
        with pytest.raises(UnicodeDecodeError):
            pipe.execute()
        assert [client.get("a"), client.get("a")] == [b"A", b"A"]


def test_a_get_re_entered_by_a_signal_handler_never_waits_behind_its_own_thread() -> None:
    # The handler's get joined the line behind the turn its own (suspended) thread held,
    # and waited out its whole timeout while that turn could not move; the turn's wake-up
    # could be lost meanwhile. Re-entered, a get takes an idle connection or fails at once.
    import queue
    import signal
    import threading
    import time

    from dualmem.redis_backend import _FairQueue

    q = _FairQueue(2)
    inner: list[tuple[str, float]] = []

    def handler(signum: int, frame: object) -> None:
        began = time.monotonic()
        try:
            q.get(timeout=5)
            inner.append(("got", time.monotonic() - began))
        except queue.Empty:
            inner.append(("empty", time.monotonic() - began))

    before = signal.signal(signal.SIGALRM, handler)
    giver = threading.Timer(0.3, q.put_nowait, args=("connection",))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)  # while the get below waits in line
        giver.start()
        assert q.get(timeout=5) == "connection"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)
        giver.cancel()
    assert len(inner) == 1 and inner[0][0] == "empty" and inner[0][1] < 1.0, inner


def test_an_interrupt_right_after_entering_a_get_leaves_no_mark() -> None:
    # A signal handler that raises (Ctrl-C caught by the application) just after the
    # thread was marked as inside get left the mark: every later get of that thread was
    # taken for a re-entered one and failed at once instead of waiting its turn.
    import threading

    from dualmem.redis_backend import _FairQueue

    class InterruptedAfterAdd(set[int]):
        def add(self, element: int) -> None:
            super().add(element)
            raise KeyboardInterrupt

    q = _FairQueue(2)
    q._inside = InterruptedAfterAdd()
    with pytest.raises(KeyboardInterrupt):
        q.get(timeout=0.1)
    assert threading.get_ident() not in q._inside


def test_a_connection_given_back_goes_to_the_thread_waiting_for_it() -> None:
    # A thread that gave its connection back and asked again at once took it before the
    # waiter woken for it could run (redis-py's queue, or this one ignoring its line):
    # with more threads than connections, some waited past the pool's whole wait while
    # Redis answered at once. Holding the queue's lock from the give-back to the next
    # get is that race decided against the waiter, every time.
    import queue

    from dualmem.redis_backend import _FairQueue

    q = _FairQueue(2)
    got: list[Any] = []

    def wait_in_line() -> None:
        try:
            got.append(q.get(timeout=5))
        except queue.Empty:
            got.append("empty")

    waiter = threading.Thread(target=wait_in_line)
    waiter.start()
    try:
        wait_until(lambda: len(q._line) == 1, what="the waiter in line")
        with q.mutex:
            q.put_nowait("connection")
            with pytest.raises(queue.Empty):
                q.get(block=False)  # not this thread's turn
    finally:
        waiter.join(10)
    assert got == ["connection"]


def test_a_get_re_entered_by_a_signal_handler_takes_an_idle_connection() -> None:
    # The handler runs while its thread waits in line and a connection was just given
    # back (the wake-up for it not yet acted on): a close() asking Redis for the backlog
    # then failed (StoreUnavailable) although a connection lay idle in the queue.
    import queue
    import signal

    from dualmem.redis_backend import _FairQueue

    q = _FairQueue(2)
    inner: list[Any] = []
    handled = threading.Event()

    def handler(signum: int, frame: object) -> None:
        try:
            inner.append(q.get(timeout=5))
        except queue.Empty:
            inner.append("empty")
        handled.set()

    main = threading.get_ident()

    def give_back() -> None:
        wait_until(lambda: len(q._line) == 1, what="the main thread in line")
        # The signal is sent before the lock is let go: the main thread cannot take the
        # connection before its handler has run (signal handlers run in the main thread).
        with q.mutex:
            q.put_nowait("idle")
            signal.pthread_kill(main, signal.SIGUSR1)
        handled.wait(10)
        q.put_nowait("later")

    before = signal.signal(signal.SIGUSR1, handler)
    giver = threading.Thread(target=give_back)
    giver.start()
    try:
        outer = q.get(timeout=10)
    finally:
        giver.join(10)
        signal.signal(signal.SIGUSR1, before)
    assert inner == ["idle"] and outer == "later", (inner, outer)


_PACKED_COMMANDS = [
    [(b"MULTI",), (b"SET", b"k", b"v" * 9000, b"PX", 3_600_000), (b"EXEC",)],  # > cutoff
    [(b"XADD", b"s", b"*", b"sc", "agent:é", b"lv", 1, b"ts", 1.5, b"e", memoryview(b"x"))],
    [(b"GET", b"")],
]
_REDIS_PY_PATH = [
    [(b"CLIENT SETNAME", b"w-1")],  # redis-py splits a name with a space
    [(b"SET", b"k", bytearray(b"v"))],  # hiredis refuses bytearray; redis-py copies it
    [("SET", b"k", b"v")],  # a str name: redis-py encodes and splits it
]


@pytest.mark.parametrize("commands", _PACKED_COMMANDS + _REDIS_PY_PATH)
def test_pack_gives_the_bytes_redis_py_would_send(commands: list[tuple[Any, ...]]) -> None:
    conn = redis.Connection()
    assert b"".join(pack(conn, commands)) == b"".join(conn.pack_commands(commands))


@pytest.mark.parametrize("commands", _PACKED_COMMANDS)
def test_pack_makes_one_buffer_where_hiredis_can(commands: list[tuple[Any, ...]]) -> None:
    # One bytes object, one sendall: redis-py's own packing is what the put path skips.
    assert len(pack(redis.Connection(), commands)) == 1


def test_pack_refuses_what_redis_py_refuses() -> None:
    with pytest.raises(redis.DataError):
        pack(redis.Connection(), [(b"SET", b"k", None)])


def test_pack_without_hiredis_is_redis_py_packing(monkeypatch: pytest.MonkeyPatch) -> None:
    import dualmem.redis_backend as backend

    monkeypatch.setattr(backend, "_hiredis_pack", None)
    conn = redis.Connection()
    commands = _PACKED_COMMANDS[0]
    assert pack(conn, commands) == conn.pack_commands(commands)


def _command_client(redis_url: str, **settings: Any) -> redis.Redis:
    client, _ = connect(Settings(redis_url=redis_url, **settings))
    return client


def test_the_command_pool_hands_out_connections_without_redis_py_s_checkout(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The put path's checkout: redis-py's get_connection/release (10 µs of metrics calls
    # and wrappers per command) are not on it while nothing needs them.
    client = _command_client(redis_url)
    try:
        assert transact(client, [(b"SET", b"k", b"v")]) == [b"OK"]

        def not_here(*_args: Any, **_kwargs: Any) -> Any:
            raise AssertionError("redis-py's own checkout ran")

        monkeypatch.setattr(redis.BlockingConnectionPool, "get_connection", not_here)
        monkeypatch.setattr(redis.BlockingConnectionPool, "release", not_here)
        assert transact(client, [(b"INCR", b"n")]) == [1]
        assert client.get(b"k") == b"v"  # redis-py's own commands use the same pool
    finally:
        monkeypatch.undo()
        client.close()


def test_the_command_pool_lets_redis_py_check_out_when_its_metrics_are_on(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dualmem.redis_backend as backend

    client = _command_client(redis_url)
    seen: list[str] = []
    get, release = redis.BlockingConnectionPool.get_connection, redis.BlockingConnectionPool.release

    def counted_get(self: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append("get")
        return get(self, *args, **kwargs)

    def counted_release(self: Any, conn: Any) -> None:
        seen.append("release")
        release(self, conn)

    monkeypatch.setattr(redis.BlockingConnectionPool, "get_connection", counted_get)
    monkeypatch.setattr(redis.BlockingConnectionPool, "release", counted_release)
    monkeypatch.setattr(backend, "_observed", lambda: True)
    try:
        assert transact(client, [(b"SET", b"k", b"v")]) == [b"OK"]
        assert seen == ["get", "release"]
    finally:
        client.close()


def test_a_connection_that_failed_to_be_made_leaves_its_slot(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One connection allowed: had the failed make_connection taken the slot's token with
    # it, every later command would wait out the pool timeout and fail.
    client = _command_client(redis_url, max_connections=1)
    pool: Any = client.connection_pool
    made = pool.make_connection

    def fails_once() -> Any:
        monkeypatch.setattr(pool, "make_connection", made)
        raise OSError("no file descriptors left")

    monkeypatch.setattr(pool, "make_connection", fails_once)
    try:
        with pytest.raises(OSError, match="no file descriptors"):
            transact(client, [(b"SET", b"k", b"v")])
        assert transact(client, [(b"GET", b"k")]) == [None]
    finally:
        client.close()


@pytest.mark.real_redis
def test_the_command_pool_is_fork_safe(redis_server: Any) -> None:
    # A child must never use its parent's socket (both would read each other's replies).
    import os

    client = _command_client(redis_server.url)
    try:
        transact(client, [(b"SET", b"fork", b"parent")])
        parent_conn: Any = client.connection_pool.get_connection()
        parent_sock = parent_conn._sock
        client.connection_pool.release(parent_conn)
        pid = os.fork()
        if pid == 0:  # the child: exit status tells the parent what it saw
            ok = False
            try:
                conn: Any = client.connection_pool.get_connection()
                fresh = conn._sock is not parent_sock and conn.pid == os.getpid()
                client.connection_pool.release(conn)
                ok = fresh and transact(client, [(b"GET", b"fork")]) == [b"parent"]
            finally:
                os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert transact(client, [(b"SET", b"fork", b"still")]) == [b"OK"]  # parent's intact
    finally:
        client.close()


@pytest.mark.real_redis
def test_a_pooled_connection_redis_closed_while_idle_is_found_before_a_transaction(
    redis_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A transaction is never sent twice (its reply may be lost after it ran), so a
    # pooled connection Redis closed while it sat idle (a restart, a CLIENT KILL, an
    # idle timeout) must be found before the transaction goes out: an idle connection is
    # PINGed first, and a failed PING is retried on a new connection. Without it, the put
    # went out on the dead socket and failed as "may or may not have run".
    import dualmem.redis_backend as backend

    monkeypatch.setattr(backend, "_IDLE_PING_S", 0.05)
    client = _command_client(redis_server.url)
    admin = redis_server.client()
    try:
        assert transact(client, [(b"DEL", b"idle-counter")]) == [0]
        assert admin.client_kill_filter(_type="normal", skipme=True) >= 1
        time.sleep(0.1)
        assert transact(client, [(b"INCR", b"idle-counter")]) == [1]
        assert admin.get(b"idle-counter") == b"1"
    finally:
        client.close()
        admin.close()


def test_a_direct_transaction_runs_on_the_server_s_clock_of_now(fake: fakeredis.FakeRedis) -> None:
    # Every command stamps the server's databases with the time before it runs, and an
    # expiry counts from that stamp: a transaction run in one step must stamp it too, or
    # a put's cache entry would expire early by the time since the server's last command.
    assert transact(fake, [(b"SET", b"before", b"1")]) == [b"OK"]
    time.sleep(2)
    assert transact(fake, [(b"SET", b"k", b"v", b"PX", 600_000)]) == [b"OK"]
    assert fake.pttl("k") > 599_000


@pytest.mark.real_redis
def test_a_worker_s_blocking_read_longer_than_the_reply_timeout_waits_it_out(
    redis_server: Any,
) -> None:
    # A worker's client blocks in XREADGROUP for block_ms; connect(extra_timeout=...) is
    # what keeps that wait from being a reply timeout. Without it, a block_ms above
    # socket_timeout (0.25 s) made every idle read time out, be sent again by the retry
    # policy and fail as "Redis is unavailable": the worker logged an outage and backed
    # off while Redis was healthy, and each resent read could leave entries pending.
    settings = Settings(redis_url=redis_server.url, block_ms=600)
    redis_server.client().flushall()
    client, _ = connect(settings, extra_timeout=settings.block_ms / 1000)
    try:
        client.xgroup_create("idle", "g", id="0", mkstream=True)
        assert client.xreadgroup("g", "c", {"idle": ">"}, count=1, block=settings.block_ms) == []
        assert retries_of(client) == 0
    finally:
        client.close()


def test_a_redis_that_never_answers_the_connect_fails_fast() -> None:
    # A host that drops the connect (a full listen queue here; a firewall or a dead host
    # on a network) must fail within connect_timeout per attempt, as a refused one does.
    # Without the connect timeout set, redis-py's default of 5 s per attempt held a put
    # for 10 s before StoreUnavailable.
    import socket

    from dualmem.errors import StoreUnavailable
    from dualmem.redis_backend import translate_errors

    listener = socket.socket()
    queued = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)  # never accepted: one connection fills the queue
    port = listener.getsockname()[1]
    client, _ = connect(Settings(redis_url=f"redis://127.0.0.1:{port}/0"))
    try:
        queued.connect(("127.0.0.1", port))
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable, match="Timeout connecting"), translate_errors("write"):
            transact(client, [(b"SET", b"k", b"v")])
        # Two attempts of connect_timeout (0.25 s each); without it, 10 s. The bound is
        # not a speed target: it is wide enough for a loaded machine and still tells a
        # connect timeout that is set from redis-py's default.
        assert time.monotonic() - t0 < 6.0
    finally:
        client.close()
        queued.close()
        listener.close()


def _client_and_other(
    backend: str, request: pytest.FixtureRequest
) -> tuple[redis.Redis, redis.Redis]:
    """dualmem's command client on an empty server of ``backend``, and a plain client of
    another program on the same server; the caller closes both."""
    if backend == "redis":
        srv = request.getfixturevalue("redis_server")
        srv.client().flushall()
        return _command_client(srv.url), srv.client()
    server = fakeredis.FakeServer()
    return _direct_client(server), fakeredis.FakeRedis(server=server)


@pytest.mark.parametrize("backend", ["fakeredis", "redis"])
def test_a_compare_and_set_that_sends_nothing_leaves_no_watch_behind(
    backend: str, request: pytest.FixtureRequest
) -> None:
    # run_if_holds found another value and sent no MULTI: its WATCH was still set on the
    # connection. Had that connection gone back to the pool as it was, a change to the
    # watched key by anyone made the next transaction on it (a put) abort: EXEC ran
    # nothing and the put failed.
    from dualmem.redis_backend import run_if_holds

    client, other = _client_and_other(backend, request)
    try:
        other.set(b"lock", b"theirs")
        assert not run_if_holds(client, b"lock", b"mine", (b"DEL", b"lock"))
        other.set(b"lock", b"changed")  # after the look: the WATCH, had it stayed, fires
        assert transact(client, [(b"INCR", b"n")]) == [1]
        assert other.get(b"n") == b"1"
    finally:
        client.close()
        other.close()


@pytest.mark.parametrize("backend", ["fakeredis", "redis"])
def test_a_compare_and_set_whose_key_changes_after_its_look_is_false_and_runs_nothing(
    backend: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The key held the expected value at the look (WATCH, GET) and changed before EXEC:
    # EXEC runs nothing, and run_if_holds says False, as for another value. It raised
    # WatchedKeyChanged instead (a rotation's cache re-seal, racing a put, then failed
    # as "Redis is unavailable"). Another client writes between the look and the write.
    from dualmem import redis_backend

    client, other = _client_and_other(backend, request)
    real = redis_backend.transact_watching

    def a_put_comes_between(c: redis.Redis, watched: bytes, decide: Any, commands: Any) -> Any:
        def look(value: object) -> None:
            decide(value)
            other.set(watched, b"newer")

        return real(c, watched, look, commands)

    monkeypatch.setattr(redis_backend, "transact_watching", a_put_comes_between)
    try:
        other.set(b"k", b"old")
        assert not redis_backend.run_if_holds(client, b"k", b"old", (b"SET", b"k", b"resealed"))
        assert other.get(b"k") == b"newer"
    finally:
        client.close()
        other.close()


def test_a_thread_waits_for_a_busy_connection_as_long_as_a_command_may_hold_it(
    redis_url: str,
) -> None:
    # A command may hold its connection for both attempts' timeouts (an idle PING that
    # times out, then the transaction on a new connection): a thread waiting for the
    # pool's last connection must wait that long. Waiting one reply timeout only (or one
    # attempt's) failed a put with "No connection available" from a healthy Redis while
    # another thread's command was still within its own limits.
    settings = Settings(redis_url=redis_url, max_connections=1)
    client = _command_client(redis_url, max_connections=1)
    pool: Any = client.connection_pool
    held = pool.get_connection()
    holds_for = 2 * settings.socket_timeout + 0.1  # beyond one attempt, within two
    giver = threading.Timer(holds_for, pool.release, args=(held,))
    giver.start()
    try:
        assert transact(client, [(b"INCR", b"n")]) == [1]
    finally:
        giver.join()
        client.close()


@pytest.mark.real_redis
def test_a_connection_that_failed_to_connect_leaves_its_slot(own_redis_server: Any) -> None:
    # One connection allowed, and Redis down when a command takes it: the connection
    # that could not connect must go back to the pool. Kept by the failed command, its
    # slot was gone for good, and once Redis was back every command waited out the pool
    # timeout and failed ("No connection available") from a healthy Redis.
    srv = own_redis_server
    client = _command_client(srv.url, max_connections=1)
    try:
        assert transact(client, [(b"SET", b"k", b"v")]) == [b"OK"]
        client.connection_pool.disconnect()  # the next command connects afresh
        srv.kill()
        with pytest.raises(redis.ConnectionError):
            transact(client, [(b"SET", b"k", b"w")])
        srv.start()
        assert transact(client, [(b"GET", b"k")]) == [b"v"]
    finally:
        client.close()


@pytest.mark.real_redis
def test_a_compare_and_set_on_a_connection_redis_closed_is_retried(redis_server: Any) -> None:
    # WATCH and GET change nothing, so a failure there is retried on a new connection
    # (the MULTI/EXEC after it is never sent twice). Without the retry, the first
    # compare-and-set after a Redis restart (a rotation lock's, a key rotation's) failed
    # on the pooled connection Redis had closed.
    from dualmem.redis_backend import run_if_holds

    redis_server.client().flushall()
    client = _command_client(redis_server.url)
    admin = redis_server.client()
    try:
        admin.set(b"lock", b"mine")
        assert transact(client, [(b"GET", b"lock")]) == [b"mine"]  # a pooled connection
        assert admin.client_kill_filter(_type="normal", skipme=True) >= 1
        assert run_if_holds(client, b"lock", b"mine", (b"SET", b"lock", b"next"))
        assert admin.get(b"lock") == b"next"
    finally:
        client.close()
        admin.close()


@pytest.mark.real_redis
def test_a_command_redis_refuses_is_reported_as_a_refusal_not_an_outage(
    redis_server: Any,
) -> None:
    # A Redis out of memory (maxmemory, noeviction) answers, and refuses writes: the
    # error must say so, with Redis's reason, not send the operator looking for an
    # outage ("Redis is unavailable") while Redis is up.
    from dualmem.errors import StoreUnavailable
    from dualmem.redis_backend import translate_errors

    admin = redis_server.client()
    client = _command_client(redis_server.url)
    admin.flushall()
    admin.config_set("maxmemory", "1")
    try:
        with (
            pytest.raises(
                StoreUnavailable, match="refused the command: command not allowed when used memory"
            ),
            translate_errors("write"),
        ):
            transact(client, [(b"SET", b"k", b"v")])
    finally:
        admin.config_set("maxmemory", "0")
        client.close()
        admin.close()


def test_a_cache_scan_finds_exactly_its_own_namespaces_entries(raw_redis: redis.Redis) -> None:
    # A namespace may hold glob characters, and its SCAN pattern escaped only the hash
    # tag's braces: "n?" matched "nx"'s entries (which verify reported as "not a cache key
    # of this namespace" in a Redis two deployments share), and "n[1" matched none of its
    # own (rotation left them sealed under a key it then dropped; verify skipped them).
    names = ["n[1", "n?", "nx", "n*", "n*x", "n\\", "n]", "n[x]", "n^"]
    for ns in names:
        Settings.load({"namespace": ns}, environ={})  # each one a namespace dualmem takes
        raw_redis.set(Layout(ns).cache_key(0, "swarm:s", "k"), ns)
    for ns in names:
        lay = Layout(ns)
        found = {bytes(n) for n in raw_redis.scan_iter(match=lay.cache_pattern(0), count=1000)}
        assert found == {lay.cache_key(0, "swarm:s", "k")}, ns
