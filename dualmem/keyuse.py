"""Which keys running processes may still seal with: leases in Redis that a key drop waits on.

``rotate-keys --drop-retired`` removes old keys from the key file once nothing in the
database, the cache or the stream uses them. A process that has not reloaded the key file
yet would still seal new records with an old key, and once that key is dropped nobody can
open them. So every process that watches a key file holds a *lease* in Redis naming the
key ids it may seal with:

* ``dm:{<namespace>:keyuse}:<token>`` holds the ids (JSON), with a Redis-side expiry of
  ``keyring_reload_interval + slack + 1`` seconds; ``dm:{<namespace>:keyuse}`` is the set
  of tokens (``host:pid:random``), so the drop finds them without a SCAN.
* The lease is taken when the process starts and renewed inside the transaction of a
  write once ``keyring_reload_interval`` has passed since the last renewal: no extra
  round trip on the write path. So while a process seals with a key, its lease is alive
  for at least ``slack`` more seconds: longer than a write takes to reach Redis.
* The ids are the active key and every key that was active less than ``slack`` seconds
  ago (a write sealed just before the process reloaded is still on its way). One-shot
  tools that send envelopes sealed under any key (``dualmem import``, which copies sealed
  lines as they are, and ``dlq replay``) name every key of their keyring until they are
  done; ``dualmem mirror`` renews its lease before each cycle seals.
* The drop waits until no live lease names anything but the active key, re-checks the
  data once more (anything sealed with an old key has landed by then), and only then
  edits the key file. A process that cannot reload (an unreadable key file) keeps naming
  the old key, and the drop refuses.

A process killed with SIGKILL leaves its lease to expire; a closed one deletes it.
What is left: a write frozen between its seal and its arrival in Redis for longer than
``slack`` (a stopped process), or a process that started sealing before the new key was
saved and sends its first write more than the rotation's ``--grace`` later.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from acl.crypto import Codec
from dualmem.redis_backend import text, transact, translate_errors
from dualmem.settings import Settings

log = logging.getLogger("dualmem")

__all__ = [
    "KeyLease",
    "KeyUser",
    "clear_dropping",
    "dropping_key",
    "dropping_refusal",
    "key_users",
    "landing_slack",
    "mark_dropping",
    "send_carrying",
    "wait_for_key_users",
]


def landing_slack(settings: Settings) -> float:
    """Seconds a write may take from its seal to its arrival in Redis, with margin: every
    connect and socket timeout of every attempt, doubled, plus a second.

    >>> landing_slack(Settings())
    3.0
    """
    attempts = settings.redis_retries + 1
    return 1.0 + 2 * attempts * (settings.connect_timeout + settings.socket_timeout)


def _index(namespace: str) -> bytes:
    return f"dm:{{{namespace}:keyuse}}".encode()


def _entry(namespace: str, token: str) -> bytes:
    return f"dm:{{{namespace}:keyuse}}:{token}".encode()


class KeyLease:
    """This process's lease on the key ids it may seal with (see the module doc).

    ``commands()`` returns the renewal to add to a write's transaction when one is due
    (else ``()``), and ``confirm(sent_at)`` records it once that transaction succeeded: a
    renewal that failed is due again at the next write. ``lapsed()`` says the lease may
    have expired (no renewal got through for a while): the writer then reloads its key
    file before it seals, since a drop may have gone ahead meanwhile. ``renew()`` sends a
    renewal on its own. Thread-safe.
    """

    def __init__(
        self,
        client: redis.Redis,
        namespace: str,
        codec: Codec,
        interval: float,
        slack: float,
        *,
        all_keys: bool = False,
    ) -> None:
        """``all_keys``: name every key of the keyring, not only the active one (a
        one-shot tool that sends envelopes sealed under any of them: ``dualmem import``
        copies sealed lines, ``dlq replay`` re-sends old commands). A drop then waits
        until the tool is done."""
        self.client = client
        self.all_keys = all_keys
        self.codec = codec
        self.interval = interval
        self.slack = slack
        self.token = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._index = _index(namespace)
        self._key = _entry(namespace, self.token)
        self._ttl_ms = int((interval + slack + 1.0) * 1000)
        self._lock = threading.Lock()
        self._active: str | None = None
        self._recent: dict[str, float] = {}  # key id -> when it stopped being active
        # Monotonic time the last renewal that got through was sent: its entry lives
        # until at least that plus the TTL.
        self._renewed_at = -float("inf")

    @classmethod
    def take(cls, client: redis.Redis, settings: Settings, codec: Codec, **kw: bool) -> KeyLease:
        """A lease on ``codec``'s keys with ``settings``' interval and slack, renewed now
        (before the first seal); ``kw``: ``all_keys``."""
        lease = cls(
            client,
            settings.namespace,
            codec,
            settings.keyring_reload_interval,
            landing_slack(settings),
            **kw,
        )
        lease.renew()
        return lease

    def _ids(self, now: float) -> list[str]:
        """The key ids this process may seal with now, the active one first (under the lock)."""
        ring = self.codec.keyring
        active = "" if ring is None else ring.active_id
        if self._active is not None and active != self._active:
            self._recent[self._active] = now
        self._active = active
        for kid, since in list(self._recent.items()):
            if now - since >= self.slack or kid == active:
                del self._recent[kid]
        others = set(self._recent)
        if self.all_keys and ring is not None:
            others.update(k for k in ring.ids if k != active)
        return [active, *sorted(others)]

    def lapsed(self) -> bool:
        """Whether the lease may no longer cover a seal made now until it reaches Redis
        (``slack`` later): no renewal got through for ``interval`` and a second."""
        return time.monotonic() >= self._renewed_at + self.interval + 1.0

    def commands(self, *, force: bool = False) -> tuple[tuple[Any, ...], ...]:
        """The renewal to send in the caller's transaction, if one is due (``interval``
        after the last one that got through) or ``force``, else ``()``. Call after the
        keyring was reloaded (if at all) and after sealing; pass the time it is sent to
        :meth:`confirm` once the transaction succeeded."""
        now = time.monotonic()
        if not force and now < self._renewed_at + self.interval:
            return ()
        with self._lock:
            ids = self._ids(now)
        return (
            (b"SADD", self._index, self.token.encode()),
            (b"SET", self._key, json.dumps(ids).encode(), b"PX", self._ttl_ms),
        )

    def confirm(self, sent_at: float) -> None:
        """A transaction carrying a renewal, sent at monotonic time ``sent_at``, succeeded."""
        with self._lock:
            self._renewed_at = max(self._renewed_at, sent_at)

    def check(self) -> None:
        """Renew if a renewal is due (a round trip then): for a tool that seals for a
        while before it sends."""
        self._send(self.commands())

    def renew(self) -> None:
        """Send a renewal now (one round trip)."""
        self._send(self.commands(force=True))

    def _send(self, renewal: tuple[tuple[Any, ...], ...]) -> None:
        if not renewal:
            return
        sent_at = time.monotonic()
        with translate_errors("key lease"):
            transact(self.client, renewal)
        self.confirm(sent_at)

    def release(self) -> None:
        """Delete the lease (the process stops writing). Best effort: it expires anyway."""
        with contextlib.suppress(redis.RedisError):
            transact(self.client, [(b"DEL", self._key), (b"SREM", self._index, self.token)])


def _dropping(namespace: str) -> bytes:
    return f"dm:{{{namespace}:keyuse}}:dropping".encode()


def mark_dropping(client: redis.Redis, namespace: str, ids: list[str], ttl: float) -> None:
    """Say in Redis that ``ids`` are about to leave the key file, for ``ttl`` seconds
    at most (:func:`clear_dropping` ends it): an operator tool sending envelopes sealed
    under one of them refuses (see :func:`dropping_refusal`)."""
    with translate_errors("key drop"):
        client.set(_dropping(namespace), json.dumps(sorted(ids)), px=max(1, int(ttl * 1000)))


def clear_dropping(client: redis.Redis, namespace: str) -> None:
    """End :func:`mark_dropping` (best effort: the mark expires anyway)."""
    with contextlib.suppress(redis.RedisError):
        client.delete(_dropping(namespace))


def dropping_key(namespace: str) -> bytes:
    """The Redis key :func:`mark_dropping` sets (what a guarded send WATCHes)."""
    return _dropping(namespace)


def dropping_refusal(raw: object, ids: set[str]) -> str | None:
    """Why envelopes under ``ids`` must not be sent while the drop mark reads ``raw``
    (its value, ``None`` when there is none), or ``None`` when they may.

    >>> dropping_refusal(b'["k1"]', {"k1", "k2"})
    'key k1 is being dropped from the key file'
    >>> dropping_refusal(None, {"k1"}) is None
    True
    """
    if raw is None:
        return None
    try:
        marked = json.loads(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        marked = None
    if not isinstance(marked, list):
        return "a key is being dropped from the key file"
    hit = sorted(ids & {str(m) for m in marked})
    return f"key {', '.join(hit)} is being dropped from the key file" if hit else None


def send_carrying(
    lease: KeyLease | None,
    commands: Sequence[tuple[Any, ...]],
    send: Callable[[list[tuple[Any, ...]]], list[Any]],
) -> list[Any]:
    """``send(commands)`` with ``lease``'s renewal appended when one is due (last, so the
    replies to ``commands`` keep their places); the replies to ``commands``.

    ``send`` runs them in one ``MULTI``/``EXEC`` and returns EXEC's replies with each
    failed command's error in its place (``transact(..., keep_errors=True)``). An error
    among ``commands`` is raised (the others ran: Redis has no rollback). A refused
    renewal alone is logged, not raised: ``commands`` ran, and a caller told otherwise
    sends them again. The renewal is confirmed only once it ran; one that failed is due
    again at the next write (and the lease lapses as when none gets through).

    >>> send_carrying(None, [(b"PING",)], lambda sent: [b"PONG" for _ in sent])
    [b'PONG']
    """
    renewal = () if lease is None else lease.commands()
    sent_at = time.monotonic()
    replies = send([*commands, *renewal])
    for reply in replies:
        if isinstance(reply, redis.ResponseError):
            break
    else:
        if renewal and lease is not None:
            lease.confirm(sent_at)
        return replies
    own = len(commands)
    for reply in replies[:own]:
        if isinstance(reply, redis.ResponseError):
            raise reply
    refused = next(r for r in replies[own:] if isinstance(r, redis.ResponseError))
    log.warning("Redis refused the key lease renewal (the write ran): %s", refused)
    return replies[:own]


@dataclass(frozen=True, slots=True)
class KeyUser:
    """A live lease: a process (``host:pid:random``) and the key ids it may seal with."""

    token: str
    ids: tuple[str, ...]


def key_users(client: redis.Redis, namespace: str) -> list[KeyUser]:
    """Every live lease of ``namespace``; tokens whose lease expired leave the index.

    >>> import fakeredis
    >>> key_users(fakeredis.FakeRedis(), "dualmem")
    []
    """
    index = _index(namespace)
    tokens = sorted(text(t) for t in client.smembers(index))
    if not tokens:
        return []
    values = client.mget([_entry(namespace, t) for t in tokens])
    users: list[KeyUser] = []
    gone: list[str] = []
    for token, raw in zip(tokens, values, strict=True):
        if raw is None:
            gone.append(token)
            continue
        try:
            ids = json.loads(raw)
        except ValueError:
            ids = None
        if not isinstance(ids, list):
            ids = [repr(raw)]  # not ours to read: treat it as naming an unknown key
        users.append(KeyUser(token, tuple(str(i) for i in ids)))
    if gone:
        client.srem(index, *gone)
    return users


def wait_for_key_users(
    client: redis.Redis,
    namespace: str,
    active: str,
    timeout: float,
    poll: float = 0.25,
) -> list[KeyUser]:
    """Wait until no live lease names a key other than ``active``; return the leases that
    still do after ``timeout`` seconds (empty: safe to drop every other key)."""
    deadline = time.monotonic() + timeout
    while True:
        with translate_errors("key leases"):
            blocking = [u for u in key_users(client, namespace) if set(u.ids) - {active}]
        remaining = deadline - time.monotonic()
        if not blocking or remaining <= 0:
            return blocking
        time.sleep(min(poll, remaining))
