"""The I/O shell of the operator commands that write: commands go through the stream.

``DESIGN.md``: the worker is the only SQLite writer. Operator commands keep that rule by
writing the way ``put`` does (``SET`` cache, ``XADD`` command) and letting a worker commit;
they run one in-process worker so they can wait for their own commits even when no
``dualmem worker`` process is running (and because ``memory://`` lives in one process).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import redis

from acl.crypto import Codec, Keyring, envelope_key_id
from acl.levels import Level
from dualmem.commands import (
    CACHE_TOMBSTONE,
    Receipt,
    audit_fields,
    delete_fields,
    put_fields,
    xadd_command,
)
from dualmem.commands import (
    cache_value as cached,
)
from dualmem.errors import Backpressure, KeyDropped, StoreUnavailable
from dualmem.keyuse import KeyLease, dropping_key, dropping_refusal, send_carrying
from dualmem.layout import Layout
from dualmem.ops.database import NO_PROGRESS, ProgressFn, check_current, open_database
from dualmem.redis_backend import (
    WatchedKeyChanged,
    connect,
    take_back_refused_sets,
    text,
    transact,
    transact_watching,
    translate_errors,
)
from dualmem.rotation import KeyfileWatcher, keyfile_signature
from dualmem.settings import Settings, check_seconds, load_keyring
from dualmem.sqlite_store import SQLiteStore
from dualmem.worker import Worker, ensure_groups

__all__ = [
    "AuditEvent",
    "Runtime",
    "WaitResult",
    "Write",
    "load_keyring",
    "new_database_is_safe",
    "redis_client",
]


@dataclass(frozen=True, slots=True)
class Write:
    """One command an operator tool sends: a put (``envelope`` set) or a delete."""

    scope: str
    key: str
    level: Level
    actor: str
    envelope: bytes | None
    expires_at: int | None = None


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """An audit event sent with the commands (``mirror.*`` ones also become sync events)."""

    event: str
    actor: str
    detail: Mapping[str, Any]
    scope: str | None = None
    key: str | None = None
    level: int | None = None
    risk: str = "medium"


@dataclass(frozen=True, slots=True)
class WaitResult:
    """How many of the waited-for commands were committed, dead-lettered, still pending."""

    committed: int
    dead: int
    pending: int


class Runtime:
    """Store, Redis client, layout, codec and (optionally) an in-process worker.

    Use as a context manager; ``close()`` lets the worker drain what is pending.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        keyring: Keyring | None = None,
        worker: bool = True,
        lease_all_keys: bool = False,
        create: bool = False,
    ) -> None:
        """``lease_all_keys``: this tool's key lease names every key of the keyring (see
        :class:`dualmem.keyuse.KeyLease`), so no key is dropped while it runs.

        With ``worker``, a missing database file is refused (``ConfigurationError``, "no
        database at ...") unless ``create``: the in-process worker joins the namespace's
        consumer group and commits whatever its streams hold, so a mistyped ``--db``
        would take the deployment's pending commands into a new file and acknowledge
        them there (see :func:`new_database_is_safe` for when ``create`` is).
        """
        self.settings = settings
        self.layout = Layout(settings.namespace, settings.shards)
        # A key file is watched, as by DualMemory: a long-running tool (the mirror) must
        # seal with the key rotate-keys made active, never with one it is about to drop.
        keyfile = None if keyring is not None else settings.keyring_file
        seen = None if keyfile is None else keyfile_signature(keyfile)
        self.codec = Codec(
            keyring if keyring is not None else load_keyring(settings),
            compress_threshold=settings.compress_threshold,
            max_value_bytes=settings.max_value_bytes,
        )
        self._keyfile = (
            None
            if keyfile is None or not keyfile.exists()
            else KeyfileWatcher(keyfile, self.codec, settings.keyring_reload_interval, seen=seen)
        )
        if Path(settings.db_path).exists() or (worker and not create):
            # SQLiteStore would migrate an older file on open; an operator command
            # leaves upgrades to `dualmem migrate`, which backs up first. A missing file
            # is refused here (open_database: "no database at ..."), before SQLiteStore
            # creates it.
            with open_database(settings.db_path) as conn:
                check_current(conn, settings.db_path)
        self.store = SQLiteStore.from_settings(settings)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._left = 0
        try:
            self.client, self._wakeup = connect(settings)
            ensure_groups(self.client, self.layout.stream_shards(), settings.group, self.store)
            # A lease on the keys it seals with, as DualMemory holds (dualmem.keyuse).
            self._lease: KeyLease | None = None
            if self._keyfile is not None:
                self._lease = KeyLease.take(
                    self.client, settings, self.codec, all_keys=lease_all_keys
                )
            if worker:
                self._start_worker()
        except BaseException:
            self.store.close()
            raise

    def refresh_keys(self) -> None:
        """Reload the key file if it changed (looked at most every
        ``keyring_reload_interval`` seconds) and renew this process's key lease (one round
        trip). Call before sealing: the lease then covers the seals until :meth:`send`."""
        if self._keyfile is not None:
            self._keyfile.check()
        if self._lease is not None:
            self._lease.renew()

    def keep_lease(self) -> None:
        """Renew the key lease if a renewal is due: call it now and then while sealing
        for longer than ``keyring_reload_interval`` before :meth:`send`."""
        if self._lease is not None:
            self._lease.check()

    def _start_worker(self) -> None:
        client, _ = connect(self.settings, extra_timeout=self.settings.block_ms / 1000)
        w = Worker(client, self.store, self.settings, wakeup=self._wakeup)

        def run() -> None:
            self._left = w.run(self._stop, drain_timeout=self.settings.close_timeout)
            client.close()

        self._thread = threading.Thread(target=run, name="dualmem-ops-worker", daemon=True)
        self._thread.start()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> int:
        """Stop the worker after it drained (bounded by ``close_timeout``); returns what is
        still pending."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join(self.settings.close_timeout + self.settings.block_ms / 1000 + 5)
            self._thread = None
        self.store.close()
        if self._lease is not None:
            self._lease.release()
        self.client.close()
        return self._left

    # -- writing ----------------------------------------------------------------------

    def send(
        self,
        writes: Sequence[Write],
        *,
        audits: Sequence[AuditEvent] = (),
        raw: Sequence[tuple[int, Mapping[bytes, bytes]]] = (),
        audit_receipts: bool = False,
        now_us: int | None = None,
    ) -> list[Receipt]:
        """Send every command in ONE ``MULTI``/``EXEC``: all of them reach the stream or none.

        ``audits`` are recorded with them, in the same transaction. ``raw`` are stream
        entries ``(shard, fields)`` sent as they are (dead-letter replay). Returns the
        receipts of ``writes`` and ``raw``, then (``audit_receipts``) those of ``audits``,
        for :meth:`wait`. Raises ``Backpressure`` before writing anything when the streams
        cannot take them all. ``now_us`` is the time the commands carry (their ``t``
        field; default: now): a caller that must find its commands again without their
        stream ids (the mirror, after a kill between the send and its state save) picks
        it before sending.
        """
        if now_us is None:
            now_us = time.time_ns() // 1000
        per_shard: dict[int, int] = {}
        planned: list[tuple[int, Write]] = []
        for w in writes:
            shard = self.layout.shard_of(w.scope, w.key)
            per_shard[shard] = per_shard.get(shard, 0) + 1
            planned.append((shard, w))
        for shard, _ in raw:
            per_shard[shard] = per_shard.get(shard, 0) + 1
        audit_shards = [self.layout.shard_of(a.scope or "", a.key or "") for a in audits]
        for shard in audit_shards:
            per_shard[shard] = per_shard.get(shard, 0) + 1
        self._check_room(per_shard)
        # One MULTI/EXEC through dualmem's transport, like put: never sent twice (a reply
        # timeout raises "may or may not have run" instead of sending it again).
        commands: list[tuple[Any, ...]] = []
        for shard, w in planned:
            cache_key = self.layout.cache_key(shard, w.scope, w.key)
            if w.envelope is None:
                cache_value, px = CACHE_TOMBSTONE, self._px(None, now_us)
                fields = delete_fields(w.scope, w.key, w.level, w.actor, now_us)
            else:
                cache_value, px = cached(w.envelope, w.expires_at), self._px(w.expires_at, now_us)
                fields = put_fields(
                    w.scope, w.key, w.level, w.actor, now_us, w.envelope, w.expires_at
                )
            commands.append((b"SET", cache_key, cache_value) + (() if px is None else (b"PX", px)))
            commands.append(xadd_command(self.layout.stream(shard), fields))
        for shard, entry in raw:
            commands.append(xadd_command(self.layout.stream(shard), entry))
        for shard, a in zip(audit_shards, audits, strict=True):
            fields = audit_fields(
                a.event,
                actor=a.actor,
                ts_us=now_us,
                risk=a.risk,
                scope=a.scope,
                key=a.key,
                level=a.level,
                detail=a.detail,
            )
            commands.append(xadd_command(self.layout.stream(shard), fields))
        key_ids = self._sealed_under(writes, raw)
        with translate_errors("send commands"):
            send = partial(self._transact, key_ids=key_ids, pairs=len(planned))
            replies = send_carrying(self._lease, commands, send)
        if self._wakeup is not None:
            self._wakeup.set()
        receipts = [
            Receipt(shard, text(replies[2 * i + 1]), w.scope, w.key, "put" if w.envelope else "del")
            for i, (shard, w) in enumerate(planned)
        ]
        base = 2 * len(planned)
        receipts += [
            Receipt(shard, text(replies[base + i]), "", "", "raw")
            for i, (shard, _) in enumerate(raw)
        ]
        if audit_receipts:
            base += len(raw)
            receipts += [
                Receipt(shard, text(replies[base + i]), a.scope or "", a.key or "", "audit")
                for i, (shard, a) in enumerate(zip(audit_shards, audits, strict=True))
            ]
        return receipts

    @staticmethod
    def _sealed_under(
        writes: Sequence[Write], raw: Sequence[tuple[int, Mapping[bytes, bytes]]]
    ) -> set[str]:
        """Key ids of the envelopes about to be sent."""
        envelopes = [w.envelope for w in writes] + [fields.get(b"e") for _, fields in raw]
        return {k for e in envelopes if e and (k := envelope_key_id(bytes(e))) is not None}

    def _transact(
        self, commands: list[tuple[Any, ...]], key_ids: set[str], pairs: int
    ) -> list[Any]:
        """One MULTI/EXEC (EXEC's replies, a failed command's error in its place:
        ``send_carrying`` raises it), its first ``pairs`` command pairs writes' ``SET``
        and ``XADD`` (the cache entry of a refused ``XADD`` is taken back:
        ``take_back_refused_sets``).
        """
        replies = self._run(commands, key_ids)
        take_back_refused_sets(self.client, commands, replies, pairs)
        return replies

    def _run(self, commands: list[tuple[Any, ...]], key_ids: set[str]) -> list[Any]:
        """One MULTI/EXEC; with envelopes sealed under ``key_ids``, only while no key drop
        is under way for one of them and the key file still holds them all.

        A drop (``rotate-keys --drop-retired``) marks the keys it is about to remove
        before its last look at the data, and this send WATCHes that mark: a send that
        got through before the mark is seen by that look, one after it is refused, and
        one racing it finds EXEC aborted and looks again. Once the drop is done the key
        file no longer holds the key: reloaded here, after the WATCH, that refuses too.
        """
        if not key_ids:
            return transact(self.client, commands, keep_errors=True)

        def decide(mark: object) -> None:
            if self._keyfile is not None:
                # Now, after the WATCH: a drop done since is in the file; and a tool that
                # is refused seals again with the active key.
                self._keyfile.reload()
                if self._keyfile.failed:
                    raise KeyDropped(
                        f"key file {self._keyfile.path} cannot be read, so it cannot say the "
                        "keys of these records are still in it: nothing was sent"
                    )
            why = dropping_refusal(mark, key_ids)
            ring = self.codec.keyring
            gone = sorted(key_ids - set(() if ring is None else ring.ids))
            if why is None and gone and self._keyfile is not None:
                why = f"key {', '.join(gone)} is no longer in the key file"
            if why is not None:
                raise KeyDropped(f"{why}: nothing was sent (seal those records again)")

        for _ in range(5):
            try:
                return transact_watching(
                    self.client,
                    dropping_key(self.settings.namespace),
                    decide,
                    commands,
                    keep_errors=True,
                )
            except WatchedKeyChanged:
                continue  # a drop started meanwhile: look at its mark again
        raise StoreUnavailable("the key drop mark kept changing: nothing was sent")

    def _px(self, expires_at: int | None, now_us: int) -> int | None:
        cache_ms = self.settings.cache_ttl * 1000 or None
        if expires_at is not None:
            # As put: the entry (its expiry inside) outlives the expiry, by cache_ttl.
            left = max(1, expires_at - now_us // 1000)
            return left if cache_ms is None else max(left, cache_ms)
        return cache_ms

    def _check_room(self, per_shard: Mapping[int, int]) -> None:
        with translate_errors("backlog check"):
            for shard, n in per_shard.items():
                stream = self.layout.stream(shard)
                length = int(self.client.xlen(stream))
                if length + n > self.settings.max_backlog:
                    raise Backpressure(
                        f"{stream.decode()} holds {length} commands and this operation adds "
                        f"{n}, over max_backlog={self.settings.max_backlog}: split the input "
                        "or wait for the workers to catch up",
                        backlog=length,
                        bound=self.settings.max_backlog,
                    )

    def wait(
        self,
        receipts: Sequence[Receipt],
        timeout: float,
        progress: ProgressFn = NO_PROGRESS,
    ) -> WaitResult:
        """Wait until every receipt is committed or dead-lettered, at most ``timeout`` s
        (``ValidationError`` for a timeout that is no number of seconds: nan never ended)."""
        deadline = time.monotonic() + check_seconds("timeout", timeout)
        todo = list(receipts)
        committed = dead = 0
        total = len(todo)
        while todo:
            still: list[Receipt] = []
            for r in todo:
                status = self.store.status(r.shard, r.stream_id)
                if status == "committed":
                    committed += 1
                elif status == "dead":
                    dead += 1
                else:
                    still.append(r)
            todo = still
            progress("commit", total - len(todo), total)
            if not todo or time.monotonic() >= deadline:
                break
            time.sleep(0.01)
        return WaitResult(committed, dead, len(todo))


def new_database_is_safe(settings: Settings) -> bool:
    """Whether a command may create the missing database ``settings.db_path`` with its
    in-process worker (``Runtime(create=True)``): when the namespace has no command stream
    in Redis yet, so there is no deployment whose pending commands the new file would
    take over. The embedded ``memory://`` Redis of a new process never has one."""
    client = redis_client(settings)
    try:
        layout = Layout(settings.namespace, settings.shards)
        with translate_errors("look for command streams"):
            return not any(client.exists(stream) for stream in layout.streams())
    finally:
        client.close()


def redis_client(settings: Settings) -> redis.Redis:
    """A client for read-only use (verify, stats, doctor)."""
    client, _ = connect(settings)
    return client
