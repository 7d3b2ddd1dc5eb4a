"""Key rotation: re-seal every record under the active key, online, through the stream.

How it works (``dualmem rotate-keys``):

1. A fresh key is added to the key file and made active; the old keys stay in the file,
   because they still open every record not yet re-sealed. The file is replaced
   atomically, so a process reading it sees the old file or the new one.
2. Running processes learn the new key without a restart: a ``DualMemory`` loaded from a
   key file checks it at most every ``keyring_reload_interval`` seconds (one ``stat``)
   and reloads it when it changed, so its writers seal with the new key; a reader that
   meets an unknown key id reloads at once. The command waits that long (``--grace``)
   before it starts re-sealing. Processes given a ``Keyring`` object or ``DUALMEM_KEY``
   do not take part: rotate those by restarting them with the new key file.
3. Rows of SQLite not sealed with the active key are read in batches (keyset order, so a
   run that is killed resumes where the filter leaves it: only rows still under an old
   key are read again). Each is re-sealed and sent through the command stream as a
   ``reseal`` command guarded by the row's sid: the worker stays the only SQLite writer,
   and a put or delete committed meanwhile always wins over the re-sealed copy.
4. Redis cache entries under an old key are re-sealed in place with a compare-and-set
   (``WATCH``/``MULTI``), keeping their TTL; one replaced by a newer put is left to it.
5. The pass repeats until the database, the cache and the not-yet-persisted stream hold
   nothing under an old key (puts of a process that had not reloaded yet are caught by
   a later pass). Then the old keys are retired: ``--drop-retired`` removes them from the
   key file (refused while an unreplayed dead letter still needs one). It first waits
   until no running process may still seal with an old key: each holds a lease in Redis
   naming the keys it seals with (:mod:`dualmem.keyuse`); then one more pass catches what
   they sealed with an old key before moving on.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

from acl.crypto import Codec, Keyring, envelope_key_id
from acl.errors import ConfigurationError, MissingKey, TamperedRecord
from acl.levels import ENCRYPTED_LEVELS
from acl.policy import level_of_scope
from acl.principal import Principal
from dualmem.commands import cache_value, cached_envelope, reseal_fields
from dualmem.errors import NotPersisted
from dualmem.keyuse import clear_dropping, mark_dropping, wait_for_key_users
from dualmem.redis_backend import connect, run_if_holds, text, translate_errors
from dualmem.rotation_lock import RotationLock
from dualmem.settings import Settings, check_seconds

if TYPE_CHECKING:
    from dualmem.memory import DualMemory

__all__ = [
    "ACTOR",
    "KeyfileWatcher",
    "Leftovers",
    "RotationReport",
    "add_active_key",
    "drop_keys",
    "keyfile_signature",
    "register_commands",
    "rotate_keys",
]

log = logging.getLogger("dualmem.rotation")

#: The actor of reseal commands and of the rotation's audit event.
ACTOR = "dualmem-rotate-keys"
_ROTATOR = Principal(agent_id=ACTOR, system=True)
_LEVELS = sorted(int(level) for level in ENCRYPTED_LEVELS)

ProgressFn = Callable[[int, int], None]


class KeyfileWatcher:
    """Keeps a codec's keyring in step with its key file.

    :meth:`check` costs a clock read; at most every ``interval`` seconds it stats the file
    and reloads it when it changed (modification time, size or inode: ``Keyring.save``
    replaces the file, so each save is a new inode). :meth:`reload` looks at once.
    An unreadable file keeps the keyring in use and logs why.
    """

    def __init__(
        self,
        path: str | Path,
        codec: Codec,
        interval: float = 1.0,
        *,
        seen: tuple[int, int, int] | None = None,
    ) -> None:
        """``seen``: the file's :func:`keyfile_signature` taken *before* the codec's
        keyring was read from it. Taken after, a rotation saving the file in between
        would look already loaded, and this process would never learn the new key."""
        # Absolute: a process that changes directory still finds its key file.
        self.path = Path(path).absolute()
        self.codec = codec
        self.interval = interval
        self._seen = seen
        self._next = time.monotonic() + interval
        self._lock = threading.Lock()
        #: The last look found the file unreadable (the keyring in use was kept).
        self.failed = False

    def _signature(self) -> tuple[int, int, int] | None:
        return keyfile_signature(self.path)

    def check(self) -> None:
        """Reload the key file if it changed and the last look is ``interval`` s old."""
        if time.monotonic() >= self._next:
            self.reload()

    def reload(self) -> bool:
        """Reload the key file now if it changed; whether the keyring was replaced."""
        with self._lock:
            self._next = time.monotonic() + self.interval
            sig = self._signature()
            self.failed = sig is None
            if sig is None or sig == self._seen:
                return False
            try:
                ring = Keyring.load(self.path)
            except ConfigurationError as exc:
                log.warning("key file %s not reloaded: %s", self.path, exc)
                self.failed = True
                return False
            self.codec.keyring = ring
            self._seen = sig
        log.info("key file %s reloaded: active key %s", self.path, ring.active_id)
        return True


def keyfile_signature(path: str | Path) -> tuple[int, int, int] | None:
    """``(mtime_ns, size, inode)`` of a key file, ``None`` if it cannot be read: what
    :class:`KeyfileWatcher` compares to notice a new file."""
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


@contextmanager
def _editing(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock beside the key file for a load-modify-save: two rotations
    (or a rotation and a drop) editing it at once would each save what it loaded, and the
    later save would silently drop the other's key."""
    lock = Path(path).with_name(f".{Path(path).name}.lock")
    fd = os.open(lock, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def add_active_key(path: str | Path) -> Keyring:
    """Add a fresh key to the key file at ``path`` and make it active; returns the ring.

    The old keys stay: they open every record not yet re-sealed.
    """
    with _editing(path):
        ring = Keyring.load(path).with_new_key()
        ring.save(path, overwrite=True)
    return ring


def drop_keys(path: str | Path, key_ids: Sequence[str]) -> Keyring:
    """Remove ``key_ids`` (never the active key) from the key file; returns the ring."""
    with _editing(path):
        ring = Keyring.load(path)
        for kid in key_ids:
            if kid in ring.ids and kid != ring.active_id:
                ring = ring.without_key(kid)
        ring.save(path, overwrite=True)
    return ring


@dataclass
class Leftovers:
    """What is still sealed with a key other than the active one."""

    rows: int = 0
    cache: int = 0
    stream: int = 0
    dead_letters: int = 0
    unreadable: int = 0
    key_ids: set[str] = field(default_factory=set)

    @property
    def clean(self) -> bool:
        """Nothing left in SQLite, the cache or the stream (dead letters aside)."""
        return self.rows == self.cache == self.stream == 0


@dataclass
class RotationReport:
    """What :func:`rotate_keys` did, and what (if anything) it left."""

    active: str
    old_keys: tuple[str, ...]
    resealed_rows: int = 0
    resealed_cache: int = 0
    passes: int = 0
    seconds: float = 0.0
    left: Leftovers = field(default_factory=Leftovers)
    #: The ``key_rotation`` audit event is committed to SQLite (``dualmem mirror`` and
    #: ``verify`` learn of the rotation from it). False only if no worker committed it
    #: in time; it is in the stream and lands when a worker runs.
    audited: bool = False

    @property
    def done(self) -> bool:
        """Every record in SQLite, the cache and the stream is sealed with ``active``."""
        return self.left.clean

    @property
    def retired(self) -> tuple[str, ...]:
        """Old key ids that nothing uses any more (dead letters included)."""
        if not self.done:
            return ()
        return tuple(k for k in self.old_keys if k not in self.left.key_ids)


def _key_field(key_id: str) -> bytes:
    raw = key_id.encode("ascii")
    return bytes((len(raw),)) + raw


def _bytes(value: object) -> bytes | None:
    """A Redis reply (bytes, or str from a decoding client) as bytes."""
    if value is None:
        return None
    return value if isinstance(value, bytes) else str(value).encode()


def _id(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def rotate_keys(
    mem: DualMemory,
    *,
    batch_size: int = 500,
    timeout: float = 600.0,
    progress: ProgressFn | None = None,
    lock: RotationLock | None = None,
) -> RotationReport:
    """Re-seal everything ``mem`` can reach under its keyring's active key (see module doc).

    Online: writers and readers keep working; the re-sealed rows go through the stream, so
    a worker must be running (``mem``'s own, or ``dualmem worker`` processes). Returns
    when nothing is left under an old key, when passes stop making progress, or after
    ``timeout`` seconds; ``report.done`` says which. Before returning it waits for its
    ``key_rotation`` audit event to be committed (``report.audited``). Safe to run again
    at any point.

    One rotation per namespace runs at a time: this takes the namespace's rotation lock
    (waiting up to ``timeout`` for another rotation to end) unless the caller passes the
    ``lock`` it holds. Raises :class:`~dualmem.errors.RotationBusy` when the lock stays
    taken, or when this rotation loses it (nothing more is sent then).
    """
    ring = mem.codec.keyring
    if ring is None:
        raise ConfigurationError("key rotation needs a keyring (a key file)")
    client, _ = connect(mem.settings)
    own = None
    try:
        if lock is None:
            lock = own = RotationLock(client, mem.settings.namespace).acquire(timeout)
        deadline = time.monotonic() + timeout  # waiting for the lock is not re-sealing time
        run = _Rotation(mem, client, ring.active_id, batch_size, progress, lock)
        report = run.run(deadline, tuple(k for k in ring.ids if k != ring.active_id))
        # Under the lock still: while it is held, `verify` knows that rows and cache
        # entries may be re-sealed apart; released first, it judged them by the committed
        # event, which was not there yet.
        _audit_rotation(mem, report, deadline)
    finally:
        if own is not None:
            own.release()
        client.close()
    return report


def _audit_rotation(mem: DualMemory, report: RotationReport, deadline: float) -> None:
    """Record the rotation's ``key_rotation`` audit event and wait (until ``deadline``)
    for it to be committed; ``report.audited`` says whether it was."""
    receipt = mem.audit(
        "key_rotation",
        principal=_ROTATOR,
        # A record that does not open under any key was tampered with (or its key lost):
        # the rotation leaves it behind, and says so where verify and auditors look.
        risk="high" if report.left.unreadable else "medium",
        detail={
            "active": report.active,
            "retired": list(report.retired),
            "resealed_rows": report.resealed_rows,
            "resealed_cache": report.resealed_cache,
            "unreadable": report.left.unreadable,
            "done": report.done,
        },
    )
    # Return only once the event is in SQLite: a mirror run right after this call must
    # see the rotation (re-sealed rows have no journal entry; the event is its signal).
    try:
        mem.sync(receipt, timeout=max(1.0, deadline - time.monotonic()))
        report.audited = True
    except NotPersisted as exc:
        log.warning("key rotation audit event not committed yet: %s", exc)


class _Rotation:
    def __init__(
        self,
        mem: DualMemory,
        client: redis.Redis,
        active: str,
        batch_size: int,
        progress: ProgressFn | None,
        lock: RotationLock,
    ) -> None:
        self.mem = mem
        self.client = client
        self.lock = lock
        self.active = active
        self.field = _key_field(active)
        self.batch_size = batch_size
        self.progress = progress or (lambda done, total: None)
        self.layout = mem.layout
        self.group = mem.settings.group

    def run(self, deadline: float, old_keys: tuple[str, ...]) -> RotationReport:
        t0 = time.monotonic()
        report = RotationReport(self.active, old_keys)
        store = self.mem.store
        total = store.count_sealed_rows(_LEVELS, skip_key_field=self.field)
        done = 0
        self.progress(done, total)
        stalled = 0
        previous = -1
        while True:
            report.passes += 1
            sent: dict[int, str] = {}
            unreadable: set[tuple[str, str]] = set()
            after: tuple[str, str] | None = None
            while time.monotonic() < deadline:
                rows = store.sealed_rows(
                    _LEVELS, skip_key_field=self.field, after=after, limit=self.batch_size
                )
                if not rows:
                    break
                after = rows[-1].scope, rows[-1].key
                report.resealed_rows += self._reseal_rows(rows, sent, unreadable)
                done += len(rows)
                total = max(total, done)
                self.progress(done, total)
                self._throttle(deadline)
            report.resealed_cache += self._reseal_cache()
            self._wait_applied(sent, deadline)
            report.left = self._leftovers(unreadable)
            left = report.left
            if left.clean or time.monotonic() >= deadline:
                break
            # Only unreadable rows left, or a reseal that keeps failing: no pass will help.
            stalled = stalled + 1 if left.rows + left.cache >= previous and not left.stream else 0
            if stalled >= 3 or (left.rows + left.cache == left.unreadable and not left.stream):
                break
            previous = left.rows + left.cache
            total = done + left.rows
            self.progress(done, total)
            time.sleep(0.2)
        report.seconds = time.monotonic() - t0
        return report

    # -- SQLite rows, through the stream --------------------------------------------------

    def _reseal_rows(
        self,
        rows: Sequence[Any],
        sent: dict[int, str],
        unreadable: set[tuple[str, str]],
    ) -> int:
        codec = self.mem.codec
        now_us = time.time_ns() // 1000
        pipe = self.client.pipeline(transaction=False)
        shards: list[int] = []
        for row in rows:
            try:
                new = codec.reseal(row.envelope, scope=row.scope, key=row.key, level=row.level)
            except (TamperedRecord, MissingKey) as exc:
                log.warning("rotation: %s/%s cannot be re-sealed: %s", row.scope, row.key, exc)
                unreadable.add((row.scope, row.key))
                continue
            if new is None:
                continue
            shard = self.layout.shard_of(row.scope, row.key)
            fields = reseal_fields(row.scope, row.key, row.level, ACTOR, now_us, new, row.sid)
            pipe.xadd(self.layout.stream(shard), fields)  # type: ignore[arg-type]
            shards.append(shard)
        if not shards:
            return 0
        self.lock.check()
        with translate_errors("rotation: send reseals"):
            ids = pipe.execute()
        for shard, sid in zip(shards, ids, strict=True):
            stream_id = text(sid)
            if shard not in sent or _id(stream_id) > _id(sent[shard]):
                sent[shard] = stream_id
        return len(shards)

    def _throttle(self, deadline: float) -> None:
        # Each batch waits until every stream is under half its bound (XLEN, as puts count
        # it), so the rotation takes it past half by one batch at most: writers keep
        # their headroom.
        bound = max(1, self.mem.settings.max_backlog // 2)
        while time.monotonic() < deadline:
            with translate_errors("rotation: backlog"):
                if max(int(self.client.xlen(s)) for s in self.layout.streams()) < bound:
                    return
            time.sleep(0.05)

    def _acked_through(self, stream: bytes) -> tuple[int, int] | None:
        """The id below which the group has acknowledged every entry of ``stream``."""
        with translate_errors("rotation: progress"):
            for g in self.client.xinfo_groups(stream):
                if text(g["name"]) != self.group:
                    continue
                oldest = None
                if int(g["pending"]) > 0:
                    oldest = self.client.xpending(stream, g["name"])["min"]
                if oldest is not None:
                    return _id(text(oldest))
                ms, seq = _id(text(g["last-delivered-id"]))
                return ms, seq + 1
        return None

    def _wait_applied(self, sent: dict[int, str], deadline: float) -> None:
        waiting = dict(sent)
        while waiting and time.monotonic() < deadline:
            for shard, last in list(waiting.items()):
                floor = self._acked_through(self.layout.stream(shard))
                if floor is not None and floor > _id(last):
                    del waiting[shard]
            if waiting:
                time.sleep(0.02)
        if waiting:
            log.warning(
                "rotation: re-sealed rows not yet committed in shard(s) %s; is a worker running?",
                ", ".join(map(str, sorted(waiting))),
            )

    # -- the Redis cache, in place ---------------------------------------------------------

    def _cache_names(self) -> Iterator[list[bytes]]:
        for shard in range(self.layout.shards):
            batch: list[bytes] = []
            with translate_errors("rotation: scan cache"):
                for name in self.client.scan_iter(
                    match=self.layout.cache_pattern(shard), count=self.batch_size
                ):
                    batch.append(bytes(name))
                    if len(batch) >= self.batch_size:
                        yield batch
                        batch = []
            if batch:
                yield batch

    def _reseal_cache(self) -> int:
        n = 0
        for names in self._cache_names():
            self.lock.check()  # once a batch of cache entries, as for the rows
            with translate_errors("rotation: read cache"):
                values = self.client.mget(names)
            for name, reply in zip(names, values, strict=True):
                value = _bytes(reply)
                if value is None or self._old(cached_envelope(value)[0]) is None:
                    continue
                new = self._reseal_cached(name, value)
                if new is not None and self._compare_and_set(name, value, new):
                    n += 1
        return n

    def _reseal_cached(self, name: bytes, value: bytes) -> bytes | None:
        where = self.layout.split_cache_key(name)
        if where is None:
            return None
        _, scope, key = where
        envelope, expires_at = cached_envelope(value)
        if envelope is None:
            return None
        try:
            new = self.mem.codec.reseal(envelope, scope=scope, key=key, level=level_of_scope(scope))
            return None if new is None else cache_value(new, expires_at)
        except (TamperedRecord, MissingKey, ValueError) as exc:
            log.warning("rotation: cache entry %r cannot be re-sealed: %s", name, exc)
            return None

    def _compare_and_set(self, name: bytes, old: bytes, new: bytes) -> bool:
        # False: a newer put replaced it; the next pass looks at that one.
        with translate_errors("rotation: write cache"):
            return run_if_holds(self.client, name, old, (b"SET", name, new, b"KEEPTTL"))

    # -- what is left ----------------------------------------------------------------------

    def _old(self, envelope: bytes | None) -> str | None:
        if not envelope:
            return None
        kid = envelope_key_id(envelope)
        return kid if kid is not None and kid != self.active else None

    def _leftovers(self, unreadable: set[tuple[str, str]]) -> Leftovers:
        """What is still under an old key: the streams first, then SQLite, the cache and
        the dead letters. In that order nothing slips between two looks: a command that
        leaves the stream before it is read was committed (or dead-lettered) first, so
        the later looks see it; counted the other way round, a put the worker committed
        between the SQLite count and the stream read was in neither (its cache entry
        already re-sealed by this pass), and a drop removed the key its row needs."""
        left = Leftovers(unreadable=len(unreadable))
        store = self.mem.store
        for shard in range(self.layout.shards):
            stream = self.layout.stream(shard)
            floor = self._acked_through(stream)
            start = "-" if floor is None else f"{floor[0]}-{floor[1]}"
            with translate_errors("rotation: read stream"):
                entries = self.client.xrange(stream, min=start, max="+")
            for _, fields in entries or []:
                kid = self._old(_bytes((fields or {}).get(b"e")))
                if kid is not None:
                    left.stream += 1
                    left.key_ids.add(kid)
        left.rows = store.count_sealed_rows(_LEVELS, skip_key_field=self.field)
        after: tuple[str, str] | None = None
        while left.rows:
            rows = store.sealed_rows(_LEVELS, skip_key_field=self.field, after=after, limit=1000)
            if not rows:
                break
            after = rows[-1].scope, rows[-1].key
            left.key_ids.update(k for k in (envelope_key_id(r.envelope) for r in rows) if k)
        for names in self._cache_names():
            with translate_errors("rotation: read cache"):
                values = self.client.mget(names)
            for value in values:
                raw = _bytes(value)
                kid = None if raw is None else self._old(cached_envelope(raw)[0])
                if kid is not None:
                    left.cache += 1
                    left.key_ids.add(kid)
        for dead in store.dead_letters():
            kid = self._old(dead.fields.get(b"e"))
            if kid is not None:
                left.dead_letters += 1
                left.key_ids.add(kid)
        return left


# -- the command ---------------------------------------------------------------------------


def register_commands(subparsers: Any) -> None:
    """Add ``dualmem rotate-keys`` (see ``dualmem.cli.COMMAND_MODULES``)."""
    from dualmem.cli import add_common_arguments

    p = subparsers.add_parser(
        "rotate-keys",
        help="add a new active key and re-seal every record with it (online, resumable)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_arguments(p)
    p.add_argument("--keyring", help="the key file to rotate (DUALMEM_KEYRING)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="no new key: finish re-sealing under the key file's active key",
    )
    p.add_argument("--batch-size", type=int, default=500, help="rows per batch (500)")
    p.add_argument("--timeout", type=float, default=600.0, help="give up after S seconds")
    p.add_argument(
        "--grace",
        type=float,
        help=(
            "seconds to let running processes load the new key before re-sealing "
            "(default 2 x keyring_reload_interval); --drop-retired also waits for their "
            "key leases, up to --timeout"
        ),
    )
    p.add_argument(
        "--no-worker",
        action="store_true",
        help="rely on running `dualmem worker` processes instead of an in-process worker",
    )
    p.add_argument(
        "--drop-retired",
        action="store_true",
        help="remove old keys from the key file once nothing uses them",
    )
    p.set_defaults(func=cmd_rotate_keys)


def cmd_rotate_keys(args: argparse.Namespace) -> int:
    """``dualmem rotate-keys``: exit 0 when done, 1 when something is left (run again with
    ``--resume``)."""
    from rich.console import Console

    from dualmem.cli import settings_from_args

    settings = settings_from_args(args, keyring=args.keyring, worker=not args.no_worker)
    if settings.embedded:
        raise ConfigurationError(
            "rotate-keys: memory:// lives inside one process; rotate a real Redis "
            "(--redis-url redis://...) or call dualmem.rotation.rotate_keys in-process"
        )
    if not settings.keyring:
        raise ConfigurationError(
            "rotate-keys needs the key file to rotate: --keyring keys.json or DUALMEM_KEYRING"
        )
    console = Console()
    path = Path(settings.keyring)
    _preflight(args, settings)
    client, _ = connect(settings)
    try:
        lock = RotationLock(client, settings.namespace).acquire(
            args.timeout,
            on_wait=lambda who: console.print(f"waiting for the key rotation of {who} to end"),
        )
        try:
            return _rotate_locked(args, settings, console, path, lock)
        finally:
            lock.release()
    finally:
        client.close()


def _rotate_locked(
    args: argparse.Namespace,
    settings: Settings,
    console: Any,
    path: Path,
    lock: RotationLock,
) -> int:
    """The rotation itself, once this process holds the rotation lock."""
    from dualmem.memory import DualMemory

    if not args.resume:
        before = Keyring.load(path)
        ring = add_active_key(path)
        console.print(
            f"{path}: new key {ring.active_id} is active; {', '.join(before.ids)} kept "
            "until no record uses them"
        )
        grace = 2 * settings.keyring_reload_interval if args.grace is None else args.grace
        console.print(f"waiting {grace:g} s for running processes to load it")
        time.sleep(grace)
    mem = DualMemory(settings=settings)
    try:
        report = _rotate_with_progress(mem, args, console, lock)
        _print_report(console, report)
        if not report.done:
            return 1
        if report.retired and args.drop_retired:
            return _drop_retired(mem, args, console, path, report, lock)
    finally:
        mem.close()
    if report.retired:
        console.print(
            f"retired (no record uses them): {', '.join(report.retired)}; "
            "--drop-retired removes them from the key file"
        )
    return 0


def _preflight(args: argparse.Namespace, settings: Settings) -> None:
    """Refuse what would stop the rotation before the key file is changed: bad numbers,
    a Redis that does not answer, a database this dualmem cannot open."""
    from dualmem.ops.database import check_not_newer, open_database

    for name in ("grace", "timeout"):
        value = getattr(args, name)
        if value is not None:
            check_seconds(f"--{name}", value)
    if args.batch_size < 1:
        raise ConfigurationError(f"--batch-size must be >= 1 (got {args.batch_size})")
    client, _ = connect(settings)
    try:
        with translate_errors("rotate-keys"):
            client.ping()
    finally:
        client.close()
    # An existing dualmem database (check_not_newer refuses another program's file), never
    # a new one: the rotation's worker would commit the deployment's pending commands into
    # a file made by a mistyped --db (and acknowledge them), and --drop-retired would then
    # drop a key the real database still needs.
    with open_database(settings.db_path) as conn:
        check_not_newer(conn, settings.db_path)


def _rotate_with_progress(
    mem: DualMemory, args: argparse.Namespace, console: Any, lock: RotationLock
) -> RotationReport:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    columns = (*Progress.get_default_columns()[:1], BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("re-sealing", total=None)

        def tick(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        return rotate_keys(
            mem, batch_size=args.batch_size, timeout=args.timeout, progress=tick, lock=lock
        )


def _print_report(console: Any, report: RotationReport) -> None:
    left = report.left
    console.print(
        f"active key {report.active}: {report.resealed_rows} rows and {report.resealed_cache} "
        f"cache entries re-sealed in {report.passes} pass(es), {report.seconds:.1f} s"
    )
    if not report.audited:
        console.print(
            "[yellow]the key_rotation audit event is not committed yet[/] (it is in the "
            "stream; a running worker commits it, and `dualmem mirror` re-checks sealed "
            "files then)"
        )
    if not report.done:
        console.print(
            f"[bold red]not done[/]: {left.rows} rows ({left.unreadable} unreadable), "
            f"{left.cache} cache entries and {left.stream} queued puts still use "
            f"{', '.join(sorted(left.key_ids)) or 'old keys'}; run again with --resume"
        )
    elif left.dead_letters:
        console.print(
            f"{left.dead_letters} dead letter(s) still hold envelopes under "
            f"{', '.join(sorted(left.key_ids))}: those keys stay in the key file"
        )


def _drop_retired(
    mem: DualMemory,
    args: argparse.Namespace,
    console: Any,
    path: Path,
    report: RotationReport,
    lock: RotationLock,
) -> int:
    """Drop the retired keys once no running process may still seal with one of them
    (their key leases, :mod:`dualmem.keyuse`), after one more pass over the data: what a
    process sealed with an old key before its lease moved on has landed by then.

    Operator tools send envelopes sealed long before (an import copies sealed lines, a
    replay re-sends old commands): the keys are marked as being dropped before that last
    pass, and such a send refuses while the mark names a key of its envelopes (it
    WATCHes the mark, see ``Runtime.send``); after the drop the key file refuses it."""
    console.print("waiting for running processes to seal only with the active key")
    namespace = mem.settings.namespace
    client, _ = connect(mem.settings)
    try:
        blocking = wait_for_key_users(client, namespace, report.active, args.timeout)
        if blocking:
            for user in blocking:
                console.print(f"  process {user.token} may still seal with {', '.join(user.ids)}")
            console.print(
                "[bold red]not dropped[/]: those processes have not loaded the active key (an "
                "unreadable key file, or a stopped process); run again with --resume "
                "--drop-retired once they have"
            )
            return 1
        lock.check()
        mark_dropping(client, namespace, list(report.retired), args.timeout + 60)
        try:
            again = _rotate_with_progress(mem, args, console, lock)
            retired = tuple(k for k in report.retired if k in again.retired)
            if not again.done or not retired:
                _print_report(console, again)
                console.print("[bold red]not dropped[/]: run again with --resume --drop-retired")
                return 1
            lock.check()
            drop_keys(path, retired)
        finally:
            clear_dropping(client, namespace)
    finally:
        client.close()
    console.print(f"dropped retired key(s) {', '.join(retired)} from {path}")
    return 0
