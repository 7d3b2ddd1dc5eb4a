"""The Redis transport: the in-process server gets argument lists, with the same replies,
errors and connection failures as RESP bytes over a socket."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest
import redis

import dualmem.redis_backend as rb
from dualmem.redis_backend import send_many, transact


@pytest.fixture
def fake() -> Iterator[fakeredis.FakeRedis]:
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    yield client
    client.close()


def _packed_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rb, "_in_process", lambda _conn: False)


def test_the_installed_fakeredis_takes_argument_lists(fake: fakeredis.FakeRedis) -> None:
    # If a fakeredis release renames the method the in-process path calls, puts still
    # work (they go packed) but lose the speed the README quotes: this test says so.
    conn: Any = fake.connection_pool.get_connection()
    try:
        assert rb._in_process(conn)
    finally:
        fake.connection_pool.release(conn)
    sent: list[object] = []
    real_send = rb._send

    def spy(conn: object, packed: object) -> None:
        sent.append(packed)
        real_send(conn, packed)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rb, "_send", spy)
        transact(fake, [(b"SET", b"k", b"v")])
    assert isinstance(sent[0], rb._Direct)
    assert sent[0] == [[b"MULTI"], [b"SET", b"k", b"v"], [b"EXEC"]]


def test_a_real_connection_is_not_in_process() -> None:
    conn = redis.Connection(host="127.0.0.1", port=1)  # never connected
    assert not rb._in_process(conn)


SCRIPT: list[tuple[Any, ...]] = [
    (b"SET", "text", "not a number"),
    (b"XADD", b"s", b"*", b"op", "put", b"l", 3, b"t", 1_764_000_000_000_000),
    (b"INCRBY", b"n", 5),
    (b"SET", b"k", "välue".encode(), b"PX", 60_000),
]


def _run(client: fakeredis.FakeRedis) -> dict[str, Any]:
    """One of each kind of exchange, with every reply or error, ids masked."""
    out: dict[str, Any] = {}
    replies = transact(client, SCRIPT)
    replies[1] = b"<id>" if replies[1].endswith(b"-0") else replies[1]
    out["transact"] = replies
    out["read_back"] = send_many(client, [(b"GET", b"k"), (b"XLEN", b"s"), (b"GET", b"n")])
    with pytest.raises(redis.ResponseError) as exc:
        send_many(client, [(b"INCR", b"n"), (b"INCR", b"text"), (b"INCR", b"n")])
    out["send_many_error"] = str(exc.value)
    out["after_error"] = send_many(client, [(b"GET", b"n"), (b"PING",)])
    with pytest.raises(redis.ResponseError) as exc:
        transact(client, [(b"SET", b"a", 1), (b"INCR", b"text"), (b"SET", b"b", 2)])
    out["exec_error"] = str(exc.value)
    with pytest.raises(redis.ResponseError) as exc:
        transact(client, [(b"SET", b"c", 1), (b"GET",)])  # wrong arity: EXECABORT
    out["abort"] = str(exc.value)
    out["after_abort"] = send_many(client, [(b"MGET", b"a", b"b", b"c"), (b"PING",)])
    return out


def test_argument_lists_and_resp_bytes_give_the_same_results(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    direct = _run(fakeredis.FakeRedis(server=fakeredis.FakeServer()))
    _packed_only(monkeypatch)
    packed = _run(fakeredis.FakeRedis(server=fakeredis.FakeServer()))
    assert direct == packed
    assert direct["transact"] == [b"OK", b"<id>", 5, b"OK"]
    assert direct["read_back"] == ["välue".encode(), 1, b"5"]
    assert direct["after_error"] == [b"7", b"PONG"]
    assert "wrong number of arguments" in direct["abort"]
    assert "not an integer" in direct["exec_error"]
    # A command failing inside EXEC leaves the others applied (Redis semantics); a command
    # refused while queueing discards the whole transaction.
    assert direct["after_abort"] == [[b"1", b"2", None], b"PONG"]


def test_a_stopped_server_is_a_connection_error_then_recovers(fake: fakeredis.FakeRedis) -> None:
    assert transact(fake, [(b"SET", b"k", b"1")]) == [b"OK"]
    fake.connection_pool.connection_kwargs["server"].connected = False
    with pytest.raises(redis.ConnectionError):
        transact(fake, [(b"SET", b"k", b"2")])
    with pytest.raises(redis.ConnectionError):
        send_many(fake, [(b"PING",)])
    fake.connection_pool.connection_kwargs["server"].connected = True
    assert transact(fake, [(b"SET", b"k", b"3")]) == [b"OK"]
    assert fake.get("k") == b"3"


@pytest.mark.parametrize("path", ["direct", "packed"])
def test_a_killed_client_fails_once_then_reconnects(
    path: str, monkeypatch: pytest.MonkeyPatch, fake: fakeredis.FakeRedis
) -> None:
    if path == "packed":
        _packed_only(monkeypatch)
    assert send_many(fake, [(b"CLIENT", b"SETNAME", b"victim")]) == [b"OK"]
    other = fakeredis.FakeRedis(server=fake.connection_pool.connection_kwargs["server"])
    assert other.client_kill_filter(_type="normal", skipme=True) == 1
    # The pooled connection was killed under it; the embedded client has no retries, so
    # the exchange fails (dropping that connection) and nothing ran; the next one connects.
    with pytest.raises(redis.ConnectionError):
        transact(fake, [(b"INCR", b"counter")])
    assert fake.get("counter") is None
    assert transact(fake, [(b"INCR", b"counter")]) == [1]
