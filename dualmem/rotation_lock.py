"""One key rotation per namespace at a time: a lock in Redis that a heartbeat keeps alive.

Two ``rotate-keys`` runs at once (two operators, or a cron job overlapping a manual run)
would each make a different key active and re-seal the other's rows back under its own,
back and forth; the later one could then drop a key the other's rows still use. So a
rotation holds ``dm:{<namespace>:keyuse}:rotation`` from before it adds a key until it has
dropped the retired ones:

* The lock's value names its holder (``host``, ``pid``, a random token, when it started).
  It expires ``ttl`` seconds after its last renewal; a heartbeat thread renews it every
  quarter of that, only while the value is still its own (compare-and-set).
* A rotation that finds the lock held waits for it (``timeout``), saying who holds it. A
  holder that was killed in this process namespace (same boot, same pid namespace, and
  its pid is gone) is taken over at once, so ``rotate-keys --resume`` right after a
  SIGKILL does not wait for the expiry; any other holder (another host, or a container
  sharing this host name) is waited for until the expiry frees it.
* Before each batch of re-sealed records is sent, and before the key file is edited, the
  holder checks in Redis that the lock still holds its value, and that it renewed it less
  than ``ttl`` ago (:meth:`RotationLock.check`); if not (taken over, lost by Redis, or
  this process was stopped for longer than ``ttl``), it stops with
  :class:`~dualmem.errors.RotationBusy` and sends nothing more.

What is left: a holder frozen for longer than ``ttl`` between a check and the send that
follows it (a few milliseconds apart) sends that one batch while another rotation may
already hold the lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from dualmem.errors import RotationBusy
from dualmem.redis_backend import OutcomeUnknown, run_if_holds, translate_errors

__all__ = ["ROTATION_LOCK_TTL", "RotationLock", "describe_holder", "rotation_running"]

#: Seconds a rotation's lock outlives its last renewal (a killed holder's, at most).
ROTATION_LOCK_TTL = 10.0


def _lock_key(namespace: str) -> bytes:
    return f"dm:{{{namespace}:keyuse}}:rotation".encode()


def rotation_running(client: redis.Redis, namespace: str) -> bool:
    """Whether a key rotation holds ``namespace``'s lock: one is running (or was killed
    less than its lock's ttl ago). ``verify`` asks, since such a rotation re-seals cache
    entries and rows apart before its ``key_rotation`` event is committed."""
    return bool(client.exists(_lock_key(namespace)))


def describe_holder(raw: object) -> str:
    """Who holds the lock, from its value, for a message.

    >>> describe_holder(b'{"host": "h1", "pid": 42, "token": "ab", "since": 0}')
    'process 42 on h1'
    >>> describe_holder(b"junk")
    'an unknown process'
    """
    holder = _parse(raw)
    if holder is None:
        return "an unknown process"
    return f"process {holder['pid']} on {holder['host']}"


def _parse(raw: object) -> dict[str, object] | None:
    try:
        value = json.loads(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    if not isinstance(value, dict) or not isinstance(value.get("pid"), int):
        return None
    if not isinstance(value.get("host"), str):
        return None
    return value


def _process_namespace() -> str:
    """This boot and pid namespace (``boot_id:pid-ns inode``), ``""`` where /proc cannot
    say: two processes with the same value see the same pids."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""


def _dead_here(raw: object) -> bool:
    """True when ``raw`` names a process of this boot and pid namespace that no longer
    exists. A container sharing the host name but not its pids never qualifies."""
    holder = _parse(raw)
    if holder is None or holder["host"] != socket.gethostname():
        return False
    here = _process_namespace()
    if not here or holder.get("ns") != here:
        return False
    pid = int(holder["pid"])  # type: ignore[call-overload]
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # alive, owned by another user
    return False


class RotationLock:
    """The key rotation lock of one namespace (see the module doc).

    >>> import fakeredis
    >>> r = fakeredis.FakeRedis()
    >>> first = RotationLock(r, "ns").acquire(timeout=0)
    >>> RotationLock(r, "ns").acquire(timeout=0)
    Traceback (most recent call last):
    ...
    dualmem.errors.RotationBusy: another key rotation is running (process ...); ...
    >>> first.release()
    >>> RotationLock(r, "ns").acquire(timeout=0).release()
    """

    def __init__(self, client: redis.Redis, namespace: str, ttl: float = ROTATION_LOCK_TTL):
        self.client = client
        self.name = _lock_key(namespace)
        self.ttl = ttl
        self.value = json.dumps(
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "token": secrets.token_hex(8),
                "since": int(time.time()),
                "ns": _process_namespace(),
            },
            sort_keys=True,
        ).encode()
        self._renewed = 0.0
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self, timeout: float, on_wait: Callable[[str], None] | None = None) -> RotationLock:
        """Take the lock, waiting up to ``timeout`` seconds for its holder to let go
        (``on_wait`` is told once who holds it); raises :class:`RotationBusy` after that.
        Returns ``self``, holding the lock and renewing it until :meth:`release`."""
        deadline = time.monotonic() + timeout
        told = False
        while True:
            with translate_errors("key rotation lock"):
                if self.client.set(self.name, self.value, nx=True, px=self._ttl_ms):
                    break
                holder = self.client.get(self.name)
            if holder == self.value:
                break  # our SET ran and its reply was lost; redis-py's retry found it taken
            if holder is not None and _dead_here(holder) and self._take_over(holder):
                break
            if time.monotonic() >= deadline:
                raise RotationBusy(
                    f"another key rotation is running ({describe_holder(holder)}); "
                    f"run again once it has ended (a stopped one's lock expires "
                    f"{self.ttl:g} s after its last renewal)"
                )
            if on_wait is not None and not told:
                told = True
                on_wait(describe_holder(holder))
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        self._renewed = time.monotonic()
        self._thread = threading.Thread(
            target=self._beat, name="dualmem-rotation-lock", daemon=True
        )
        self._thread.start()
        return self

    @property
    def _ttl_ms(self) -> int:
        return max(1, int(self.ttl * 1000))

    def _if_still(self, expected: object, command: tuple[Any, ...]) -> bool:
        """Run ``command`` only while the lock holds ``expected`` (a compare-and-set);
        whether it ran."""
        return run_if_holds(self.client, self.name, expected, command)

    def _take_over(self, holder: object) -> bool:
        """Replace a dead holder's value with ours, only if it is still that value."""
        with translate_errors("key rotation lock"):
            try:
                return self._if_still(holder, (b"SET", self.name, self.value, b"PX", self._ttl_ms))
            except OutcomeUnknown:
                return False  # the next look at the lock says whether it ran

    def _renew(self) -> bool:
        """Push the expiry back if the lock is still ours; False when it is not."""
        return self._if_still(self.value, (b"PEXPIRE", self.name, self._ttl_ms))

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            started = time.monotonic()
            try:
                mine = self._renew()
            except redis.RedisError:
                continue  # checked against the last renewal by check()
            if not mine:
                self._lost = "another process holds it now"
                return
            self._renewed = started

    def check(self) -> None:
        """Raise :class:`RotationBusy` unless the lock is still this rotation's: call it
        before anything that only the holder may do (send re-sealed records, edit the
        key file). One GET: a take-over is seen at once, not at the next renewal."""
        if self._lost is None and time.monotonic() - self._renewed > self.ttl:
            self._lost = f"not renewed for more than {self.ttl:g} s"
        if self._lost is None:
            with translate_errors("key rotation lock"):
                holder = self.client.get(self.name)
            if holder != self.value:
                self._lost = (
                    "it expired" if holder is None else f"{describe_holder(holder)} holds it now"
                )
        if self._lost is not None:
            raise RotationBusy(
                f"this key rotation lost its lock ({self._lost}); nothing more was sent. "
                "Run it again with --resume"
            )

    def release(self) -> None:
        """Stop renewing and delete the lock if it is still ours (best effort)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with contextlib.suppress(redis.RedisError):
            self._if_still(self.value, (b"DEL", self.name))
