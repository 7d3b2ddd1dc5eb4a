"""``Subscriber``: every change a principal may read, exactly once and in seq order: catch-up
from the journal, then live through pub/sub, resumable from a saved position."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

import redis

from acl.errors import AccessDenied, ValidationError
from acl.levels import Level, as_level
from acl.policy import readable_scopes
from acl.principal import Principal
from dualmem.commands import check_int, check_key
from dualmem.errors import DualMemError, StoreUnavailable
from dualmem.memory import DualMemory
from dualmem.settings import check_seconds
from dualmem.store import Change, Notification

__all__ = ["POSITION_PREFIX", "Subscriber"]

log = logging.getLogger("dualmem.subscriber")

#: Key prefix (in the principal's PRIVATE scope) of saved positions. Changes to these keys
#: are a subscriber's own bookkeeping: no Subscriber delivers them (a subscriber that saw
#: its own saves would save again for each, forever).
POSITION_PREFIX = "_subscriber/"

_SLICE = 0.1  # longest single wait, so close() from another thread takes effect quickly
_SUBSCRIBE_TIMEOUT = 5.0
_MAX_BACKOFF = 2.0
_DRAIN_MAX = 1000


class Subscriber:
    """Iterate the changes ``principal`` may read, each exactly once, in journal order.

    ``since`` is a journal seq to start after (``0``: from the beginning), or a name: the
    position saved under that name (``_subscriber/<name>`` in the principal's PRIVATE
    scope, written through ``DualMemory.put``) is loaded, and kept up to date as changes
    are consumed, so a restarted consumer resumes with no gap and no duplicate. A new
    name starts from the beginning. ``level`` restricts the feed to one level; a name is
    tied to the level it was saved with (its position skipped the other levels' changes),
    and opening it with another ``level`` raises ``ValidationError``. A position also
    records the scopes it was consumed under: resumed by a principal that gained a scope
    since (joined a team or swarm, became system), that scope is read from its beginning,
    in seq order with the rest and without repeating the others; a scope it left keeps
    how far it was read, and resumes there if joined again. A position saved before
    scopes were recorded resumes as it did: at its seq in every scope the principal reads
    now.

    How it stays exact: it subscribes to the pub/sub channel of each scope it may read
    *first*, then reads the journal (so nothing committed in between is missed), then
    follows notifications. A notification is only a wake-up: the changes themselves are
    always read from the journal with ``seq >`` the last one seen and the principal's own
    scopes in the SQL, so a notification that duplicates the catch-up, arrives out of
    order, is forged, or names a scope the principal may not read delivers nothing extra.
    A dropped pub/sub connection is followed by a journal read as soon as it is back
    (reconnected by redis-py on its own, or subscribed again by the subscriber), so what
    was published meanwhile comes at once. Any other lost notification (a worker that
    died between commit and publish) costs latency, never a change: the journal is
    re-read every ``recheck_interval`` seconds and whenever a later notification arrives.
    Without Redis it keeps delivering from SQLite by those re-reads, and re-subscribes
    with backoff; a named one only while its position saves go through (see
    :meth:`poll`).

    When is a change consumed? When you ask for the next one (``poll``, ``next``), call
    :meth:`commit`, or leave a ``with`` block without an exception. The position is saved
    every ``commit_every`` consumed changes (default 1: each one). A process killed while
    handling a change gets that change again after the restart; nothing consumed before
    it comes back. When a save fails (Redis is down, or ``Backpressure``: the stream is at
    ``max_backlog`` and no worker drains it), nothing more is handed out until a retry
    goes through (:attr:`saving_stalled`), so a kill then repeats only what that save was
    for. Position
    saves travel the put path: on a real Redis they are durable at once (the cache entry
    and the stream), on ``memory://`` once the worker committed.
    For exactly-once side effects of your own, store ``change.seq`` with them in one
    transaction and restart with ``since=<that seq>``. A saved position past the journal's
    end (the database was replaced or restored from a backup) starts over from the
    beginning of the new journal, with a warning: repeats are possible there, gaps are not.

    One live Subscriber per name at a time. Not thread-safe, except :meth:`close`.

    >>> import tempfile, os
    >>> from acl import Level, Principal
    >>> from dualmem import DualMemory
    >>> agent = Principal(agent_id="a", swarm="s")
    >>> db = os.path.join(tempfile.mkdtemp(), "mem.db")
    >>> with DualMemory(redis_url="memory://doctest-subscriber", db_path=db) as mem:
    ...     mem.sync(mem.put("before", 1, level=Level.SWARM, principal=agent))
    ...     with Subscriber(mem, agent, since="doc") as sub:
    ...         first = sub.poll(timeout=5)      # catch-up from the journal
    ...         _ = mem.put("after", 2, level=Level.SWARM, principal=agent)
    ...         second = sub.poll(timeout=5)     # live, woken by pub/sub
    ...     resumed = Subscriber(mem, agent, since="doc")
    ...     [(c.seq, c.key) for c in (first, second)], resumed.position
    ...     resumed.close()
    ([(1, 'before'), (2, 'after')], 2)
    """

    def __init__(
        self,
        mem: DualMemory,
        principal: Principal,
        since: int | str = 0,
        *,
        level: Level | int | None = None,
        commit_every: int = 1,
        batch_size: int = 500,
        recheck_interval: float = 1.0,
    ) -> None:
        if not isinstance(mem, DualMemory):
            raise ValidationError("Subscriber needs a DualMemory")
        if not isinstance(principal, Principal):
            raise ValidationError("principal must be an acl.Principal")
        # Bounded by what SQLite stores too: batch_size is the LIMIT of every journal read.
        check_int("commit_every", commit_every, low=1)
        check_int("batch_size", batch_size, low=1)
        # More than 0 (0 re-read the journal in a busy loop) and bounded like every wait:
        # 10**400 raised OverflowError, and inf was taken and never re-read, so a lost
        # notification left its change undelivered until another one came.
        interval = check_seconds("recheck_interval", recheck_interval, positive=True)
        self._mem = mem
        self.principal = principal
        self.commit_every = commit_every
        self.batch_size = batch_size
        self.recheck_interval = interval
        self._own_scope = f"agent:{principal.agent_id}"
        # A level given by name or number is the Level it names (readable_scopes accepted
        # "swarm"; saving the position then failed on int("swarm")). Checked first: 3.0
        # reached readable_scopes as an iterable of levels (a TypeError).
        self.level = None if level is None else as_level(level)
        scopes = readable_scopes(principal, self.level)
        if level is not None and not scopes:
            # Let DualMemory raise (and audit) the denial, as for any other read.
            mem.changes(0, principal=principal, level=level, limit=1)
            raise AccessDenied(  # pragma: no cover - changes() above always raises here
                f"{principal.agent_id} may not read level {level}",
                agent_id=principal.agent_id,
                action="read",
                level=int(level),
                scope=None,
            )
        self.scopes = tuple(scopes.values())
        self._channels = [mem.layout.channel(s) for s in self.scopes]

        # Scopes the saved position recorded that the principal no longer reads, with how
        # far each was consumed: kept in the position, so a scope regained later resumes
        # there instead of repeating its changes from the beginning.
        self._kept: dict[str, int] = {}
        self.name, self._position_key, self._floors = self._start(since)
        # Each scope is consumed up to its floor (a scope gained since the position was
        # saved: up to 0). Reading starts at the lowest; up to the next floor only the
        # scopes at or below it are read (see _window).
        start = min(self._floors.values())
        self._scanned = start  # highest journal seq examined (delivered or skipped)
        self._delivered = start  # highest seq handed to the caller
        self._position = start  # highest seq consumed: what a restart resumes after
        self._saved = start  # highest position written through the put path
        # The last save failed: poll hands out nothing until a retry (at _next_save) works.
        self._save_failed = False
        self._save_backoff = 0.0
        self._stall_warned = False
        self._next_save = 0.0
        self._in_flight = False
        self._unsaved = 0
        self._buffer: deque[Change] = deque()
        self._needs_scan = True  # the first poll catches up from the journal
        self._next_recheck = 0.0
        self._pubsub: redis.client.PubSub | None = None
        self._next_connect = 0.0
        self._backoff = 0.0
        self._closing = threading.Event()
        # Re-entrant: a signal handler's close() runs in the thread it interrupted, which
        # may hold this lock (in poll(), or in close() itself: a second stop signal while
        # the first close or the ``with`` block's exit saves the position). A plain Lock
        # made that close() wait for its own thread forever. See close().
        self._poll_lock = threading.RLock()
        # The thread inside _poll_locked(): a close() from that same thread (a signal
        # handler running between two of its bytecodes) must not close under it.
        self._poll_owner: int | None = None
        self._closed = False
        # Subscribe before the first journal read: whatever commits after that read is
        # published after we listen. Fail early if Redis is unreachable at start.
        self._connect()

    def _start(self, since: object) -> tuple[str | None, str, dict[str, int]]:
        """``(name, position key, {scope: seq to start after})`` from ``since``."""
        if isinstance(since, str):
            if not since.strip():
                raise ValidationError("a subscriber name must not be empty")
            key = check_key(POSITION_PREFIX + since)
            saved_value = _saved_value(self._mem, self.principal, since)
            saved = _seq_of(since, saved_value) or 0
            self._check_same_filter(since, saved_value)
            last = self._mem.store.last_seq()
            if saved and (saved > last or not self._same_history(saved, saved_value)):
                # Only delivered (so committed) changes are ever saved. A position past the
                # journal's end, or one whose change there is another (its chain hash
                # differs: the journal grew again after a restore or a rollback), means a
                # different history. Resuming would skip its changes up to that seq;
                # starting it over can only repeat changes, never miss one.
                log.warning(
                    "subscriber %s: saved position %d is not in this journal (end %d): the "
                    "database was replaced or restored; starting over from its beginning",
                    since,
                    saved,
                    last,
                )
                return since, key, dict.fromkeys(self.scopes, 0)
            return since, key, self._floors_of(since, saved, saved_value)
        try:
            seq = check_int("since", since, low=0)  # a seq SQLite can compare with
        except ValidationError:
            raise ValidationError(
                f"since must be a journal seq (int from 0 to 2**63-1) or a name, got {since!r}"
            ) from None
        assert seq is not None
        return None, "", dict.fromkeys(self.scopes, seq)

    def _floors_of(self, name: str, saved: int, value: Any) -> dict[str, int]:
        """The seq each of this subscriber's scopes was consumed up to under the saved
        position ``value`` (its seq is ``saved``): ``saved`` for a scope it was consumed
        under, less for one still catching up ("behind"), 0 for one it never read."""
        floors = dict.fromkeys(self.scopes, saved)
        if not saved or not isinstance(value, dict) or "scopes" not in value:
            # Saved before scopes were recorded: taken to cover the scopes read now.
            return floors
        recorded, behind = value["scopes"], value.get("behind", {})
        if not (
            isinstance(recorded, list)
            and all(isinstance(scope, str) for scope in recorded)
            and isinstance(behind, dict)
            and all(
                isinstance(seq, int) and not isinstance(seq, bool) and 0 <= seq <= saved
                for seq in behind.values()
            )
        ):
            raise ValidationError(f"saved position {name!r} has no valid scopes: {value!r}")
        for scope in self.scopes:
            if scope in behind:
                floors[scope] = behind[scope]
            elif scope not in recorded:
                floors[scope] = 0
        self._kept = {scope: behind.get(scope, saved) for scope in recorded if scope not in floors}
        if min(floors.values()) < saved:
            log.info(
                "subscriber %s: reading %s from before its position %d (not consumed yet)",
                name,
                ", ".join(sorted(s for s, seq in floors.items() if seq < saved)),
                saved,
            )
        return floors

    def _check_same_filter(self, name: str, value: Any) -> None:
        """A position saved with another level filter skipped changes this subscriber
        would deliver: resuming it would miss them. Positions saved before the level was
        recorded pass."""
        if not isinstance(value, dict) or "level" not in value:
            return
        mine = None if self.level is None else int(self.level)
        if value["level"] != mine:
            raise ValidationError(
                f"subscriber {name!r} was saved with level={value['level']!r}, not "
                f"level={mine!r}: its position skipped changes this one would deliver. "
                "Open it with the same level, or use another name"
            )

    # -- positions -----------------------------------------------------------------------

    @staticmethod
    def saved_position(mem: DualMemory, principal: Principal, name: str) -> int | None:
        """The position saved under ``name`` for ``principal``, or ``None`` if none is.

        Read from the Redis cache entry when there is one (newest), else from SQLite.
        """
        return _seq_of(name, _saved_value(mem, principal, name))

    def _same_history(self, seq: int, value: Any) -> bool:
        """Whether journal row ``seq`` is the change the saved position consumed (its
        chain hash matches); positions saved before hashes were recorded pass."""
        recorded = value.get("hash") if isinstance(value, dict) else None
        if not isinstance(recorded, str):
            return True
        now = self._mem.store.journal_hash(seq)
        return now is not None and now.hex() == recorded

    @property
    def position(self) -> int:
        """Seq of the last consumed change: a restart with this name resumes after it."""
        return self._position

    @property
    def last_delivered(self) -> int:
        """Seq of the last change handed out (consumed or still being handled)."""
        return self._delivered

    def commit(self) -> None:
        """Mark the change last handed out as consumed and save the position now.

        Raises ``StoreUnavailable`` or ``Backpressure`` if the save cannot be written;
        :meth:`poll` then retries it before it hands out another change.
        """
        self._consume_in_flight(save=False)
        self._save()

    def _consume_in_flight(self, *, save: bool) -> None:
        if not self._in_flight:
            return
        self._in_flight = False
        self._position = self._delivered
        self._unsaved += 1
        if save and self._unsaved >= self.commit_every:
            try:
                self._save()
            except DualMemError as exc:
                # Not fatal, but poll hands out nothing more until a retry saves it: each
                # change delivered meanwhile would come back after a kill.
                log.warning("subscriber %s: could not save its position: %s", self.name, exc)

    def _save(self) -> None:
        if self.name is None or self._position <= self._saved:
            self._save_failed = False
            return
        try:
            self._write_position()
        except DualMemError:
            self._save_failed = True
            self._save_backoff = min(_MAX_BACKOFF, self._save_backoff * 2 or 0.05)
            self._next_save = time.monotonic() + self._save_backoff
            raise
        self._saved = self._position
        self._unsaved = 0
        self._save_failed = False
        self._save_backoff = 0.0
        self._stall_warned = False

    @property
    def saving_stalled(self) -> bool:
        """True while the position of a consumed change could not be saved: :meth:`poll`
        hands out nothing until a retry of the save goes through."""
        return self._save_failed

    def _retry_save(self) -> None:
        try:
            self._save()
        except DualMemError as exc:
            if self._save_backoff >= _MAX_BACKOFF and not self._stall_warned:
                self._stall_warned = True  # once per stall: the retries go on quietly
                log.warning(
                    "subscriber %s: delivery paused, position %d still not saved (retrying "
                    "every %.0fs): %s",
                    self.name,
                    self._position,
                    _MAX_BACKOFF,
                    exc,
                )
                return
            log.debug(
                "subscriber %s: position %d still not saved (next try in %.2fs): %s",
                self.name,
                self._position,
                self._save_backoff,
                exc,
            )
        else:
            log.info(
                "subscriber %s: position %d saved; delivering again", self.name, self._position
            )

    def _write_position(self) -> None:
        # How far each scope is consumed: a scope that started lower (gained since the
        # position it resumed was saved) is "behind" until the feed passes the others.
        through = {scope: max(floor, self._position) for scope, floor in self._floors.items()}
        through.update(self._kept)  # scopes no longer read keep how far they were read
        # The highest of all: a scope left behind may have been read further than any
        # scope read now, and a position records no scope above its seq.
        seq = max(through.values())
        value: dict[str, Any] = {
            "seq": seq,
            "saved_at_us": time.time_ns() // 1000,
            # The filter the position was consumed under (see _check_same_filter).
            "level": None if self.level is None else int(self.level),
            # ... and the scopes (see _floors_of).
            "scopes": sorted(through),
        }
        behind = {scope: done for scope, done in through.items() if done < seq}
        if behind:
            value["behind"] = behind
        chain = self._mem.store.journal_hash(seq) if seq else None
        if chain is not None:
            value["hash"] = chain.hex()  # which change this was, see _same_history
        # A restart reads the position from the cache entry first (newest): it must not
        # expire while the save waits in the stream (a worker outage past cache_ttl).
        self._mem._put_pinned(
            self._position_key,
            value,
            level=Level.PRIVATE,
            principal=self.principal,
        )

    # -- pub/sub -------------------------------------------------------------------------

    def _connect(self) -> None:
        ps = self._mem.pubsub()
        try:
            ps.subscribe(*self._channels)
            confirmed: set[bytes] = set()
            deadline = time.monotonic() + _SUBSCRIBE_TIMEOUT
            while len(confirmed) < len(self._channels):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise StoreUnavailable("subscribe: Redis did not confirm the subscription")
                msg = ps.get_message(timeout=min(remaining, _SLICE))
                if msg is None:
                    continue
                if msg["type"] == "subscribe":
                    confirmed.add(bytes(msg["channel"]))
                elif msg["type"] == "message":
                    self._on_notification(msg["data"])
        except (redis.RedisError, OSError) as exc:
            _close_quietly(ps)
            raise StoreUnavailable(f"subscribe: Redis is unavailable: {exc}") from exc
        except BaseException:
            _close_quietly(ps)
            raise
        # redis-py reconnects a pub/sub connection Redis dropped (a restart, a client
        # kill, a network blip) by itself inside get_message, and subscribes again: no
        # error reaches _wait. Whatever was published in between was lost, so each such
        # reconnect must be followed by a journal read, as a connect of ours is. Without
        # this, those changes waited for the next recheck (recheck_interval later).
        connection: Any = ps.connection  # typed None in redis-py; set by subscribe()
        connection.register_connect_callback(self._reconnected)
        self._pubsub = ps
        self._backoff = 0.0
        # Anything published while we were not listening is in the journal.
        self._needs_scan = True

    def _release(self, ps: redis.client.PubSub) -> None:
        """Close ``ps``: its connection goes back to the pool without :meth:`_reconnected`
        (another subscriber's connect on it is none of this one's business)."""
        connection: Any = ps.connection
        if connection is not None:
            connection.deregister_connect_callback(self._reconnected)
        _close_quietly(ps)

    def _reconnected(self, connection: object) -> None:
        """redis-py's callback after it reconnected (and re-subscribed) the pub/sub
        connection: changes published while it was down are read from the journal."""
        log.info("subscriber %s: pub/sub reconnected; reading the journal again", self.name)
        self._needs_scan = True

    def _drop_pubsub(self, why: object) -> None:
        if self._pubsub is not None:
            self._release(self._pubsub)
            self._pubsub = None
        self._backoff = min(_MAX_BACKOFF, self._backoff * 2 or 0.05)
        self._next_connect = time.monotonic() + self._backoff
        log.warning(
            "subscriber %s: pub/sub lost (%s); following the journal, re-subscribing in %.2fs",
            self.name,
            why,
            self._backoff,
        )

    def _on_notification(self, data: Any) -> None:
        try:
            notes = Notification.parse_message(data)
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError):
            # Not ours, or garbage (anyone who may PUBLISH can send it; an infinite seq
            # or deep nesting breaks the JSON reader): it cannot deliver anything.
            return
        for note in notes:
            if note.seq <= self._scanned:
                continue  # already read from the journal (the catch-up overlap, or a repeat)
            if note.scope == self._own_scope and note.key.startswith(POSITION_PREFIX):
                continue  # a subscriber's own position save: nothing to deliver
            self._needs_scan = True

    def _wait(self, seconds: float) -> None:
        """Wait up to ``seconds`` for notifications (or just wait, without pub/sub)."""
        if self._pubsub is None:
            self._closing.wait(seconds)
            return
        try:
            msg = self._pubsub.get_message(timeout=seconds)
            drained = 0
            while msg is not None:
                if msg["type"] == "message":
                    self._on_notification(msg["data"])
                drained += 1
                if drained >= _DRAIN_MAX:
                    break
                msg = self._pubsub.get_message(timeout=0)
        except (redis.RedisError, OSError, ValueError) as exc:
            self._drop_pubsub(exc)

    # -- the journal ---------------------------------------------------------------------

    def _window(self, after: int) -> tuple[list[str], int | None]:
        """The scopes to read after ``after``, and the seq up to which only they are read
        (``None``: every scope, no bound). A scope whose floor is above ``after`` was
        consumed up to its floor; reading it from below would only skip its rows (all of
        a database's history, for a scope gained after a long feed)."""
        active = [scope for scope in self.scopes if self._floors[scope] <= after]
        ahead = [floor for floor in self._floors.values() if floor > after]
        return active, (min(ahead) if ahead else None)

    def _scan(self) -> None:
        active, bound = self._window(self._scanned)
        if bound is None:
            rows = self._mem.changes(
                self._scanned, principal=self.principal, level=self.level, limit=self.batch_size
            )
            more = len(rows) >= self.batch_size
        else:
            # The scopes are this principal's own (readable_scopes): a subset needs no
            # other check than the one the constructor made.
            rows = self._mem.store.changes(active, self._scanned, self.batch_size)
            full = len(rows) >= self.batch_size
            below = [c for c in rows if c.seq <= bound]
            more, rows = True, below
            if not full or len(below) < self.batch_size:
                # Every row of the active scopes up to the bound is read: move to it, where
                # the next scope's floor joins the read.
                self._scanned = bound
        for change in rows:
            self._scanned = max(self._scanned, change.seq)
            if not self._skipped(change):
                self._buffer.append(change)
        self._needs_scan = more
        self._next_recheck = time.monotonic() + self.recheck_interval

    def backlog(self, limit: int = 10_000) -> int:
        """How many changes the journal holds for this subscriber beyond the last one
        handed out (at most ``limit`` are counted)."""
        check_int("limit", limit, low=0)
        if self._window(self._delivered)[1] is None:
            return self._count(list(self.scopes), self._delivered, limit)
        # Scope by scope, each after its own floor (see _window).
        counted = 0
        for scope in self.scopes:
            after = max(self._delivered, self._floors[scope])
            counted += self._count([scope], after, limit - counted)
        return counted

    def _count(self, scopes: list[str], after: int, limit: int) -> int:
        """Changes of ``scopes`` after ``after`` this subscriber would hand out, up to
        ``limit``: page by page, so rows it skips (its own position saves) do not use up
        the count."""
        self._mem._check_open()
        counted = 0
        while counted < limit:
            rows = self._mem.store.changes(scopes, after, self.batch_size)
            counted += sum(1 for c in rows if not self._skipped(c))
            if len(rows) < self.batch_size:
                break
            after = rows[-1].seq
        return min(counted, limit)

    def _skipped(self, change: Change) -> bool:
        """A subscriber's own bookkeeping, or a change consumed before this start (in a
        scope whose floor is above where reading started)."""
        if change.scope == self._own_scope and change.key.startswith(POSITION_PREFIX):
            return True
        return change.seq <= self._floors.get(change.scope, 0)

    # -- consuming -----------------------------------------------------------------------

    def poll(self, timeout: float | None = None) -> Change | None:
        """The next change, waiting up to ``timeout`` seconds (``None``: until one comes
        or the subscriber is closed). Returns ``None`` on timeout or when closed.

        Calling it consumes the change returned before (see the class notes) and saves
        the position. If that save fails (``StoreUnavailable`` while Redis is down, or
        ``Backpressure``), it hands out no change: it retries the save, with backoff up to
        2 s, until the timeout ends, and then returns ``None`` as on any timeout (it
        raises nothing). Delivery resumes with the first save that goes through.
        """
        check_seconds("timeout", timeout, optional=True)
        with self._poll_lock:
            self._poll_owner = threading.get_ident()
            try:
                return self._poll_locked(timeout)
            finally:
                self._poll_owner = None

    def _poll_locked(self, timeout: float | None) -> Change | None:
        if self._closed:
            return None
        self._consume_in_flight(save=True)
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        # A scan can find only rows to skip (this subscriber's own position saves) with
        # more behind them: scanning goes on at once, not a poll slice later, for the
        # whole timeout and at least one slice (so poll(timeout=0) gets past them too).
        scan_until = started + _SLICE if deadline is None else max(deadline, started + _SLICE)
        while not self._closing.is_set():
            if self._save_failed:
                # Handing out another change now would make it (and each one after it)
                # come back after a kill: the restart resumes from the last saved position.
                now = time.monotonic()
                if now >= self._next_save:
                    self._retry_save()
                    continue
                remaining = None if deadline is None else deadline - now
                if remaining is not None and remaining <= 0:
                    return None
                wait = min(_SLICE, self._next_save - now)
                self._wait(wait if remaining is None else min(wait, remaining))
                continue
            if self._buffer:
                change = self._buffer.popleft()
                self._delivered = change.seq
                self._in_flight = True
                return change
            now = time.monotonic()
            if self._needs_scan or now >= self._next_recheck:
                self._scan()
                if self._buffer or (
                    self._needs_scan and (deadline is None or time.monotonic() < scan_until)
                ):
                    continue
            if self._pubsub is None and now >= self._next_connect:
                try:
                    self._connect()
                except StoreUnavailable as exc:
                    self._drop_pubsub(exc)
                continue
            remaining = None if deadline is None else deadline - now
            if remaining is not None and remaining <= 0:
                return None
            wait = min(_SLICE, max(0.0, self._next_recheck - now))
            if remaining is not None:
                wait = min(wait, remaining)
            self._wait(wait)
        return None

    def __iter__(self) -> Subscriber:
        return self

    def __next__(self) -> Change:
        change = self.poll(timeout=None)
        if change is None:
            raise StopIteration
        return change

    # -- shutdown ------------------------------------------------------------------------

    def close(self, *, commit: bool = True) -> None:
        """Stop: a ``poll`` waiting in another thread returns ``None``, iteration ends.

        With ``commit`` (the default) the change last handed out counts as consumed;
        ``commit=False`` leaves it to be delivered again. Either way the position of the
        changes consumed is saved.

        Safe in a signal handler: it always returns. One that interrupts this thread's own
        ``poll`` only stops it (``poll`` returns ``None``, iteration ends) and leaves the
        rest to the ``with`` block's exit or a later ``close()``; one that interrupts a
        ``close()`` already under way returns at once and lets that one finish.
        """
        self._closing.set()
        if self._poll_owner == threading.get_ident():
            # Called from inside this thread's own poll() (a signal handler), mid-way: its
            # state is not ours to save. poll() returns None at its next check, so
            # iteration ends; the ``with`` block's exit or a later close() finishes.
            return
        # Re-entrant: this thread may hold it already (a signal landing at the edges of
        # poll(), where no change is half handed out, or inside a close()). Another
        # thread's poll() is waited for: it returns at its next check.
        with self._poll_lock:
            if self._closed:
                return  # done, or under way in this thread (a signal interrupted it)
            self._closed = True
            try:
                if commit:
                    self._consume_in_flight(save=False)
                # Without commit too: the changes consumed before the one handed out (by
                # asking for the next) are consumed, and commit_every may have left their
                # position unsaved.
                try:
                    self._save()
                except DualMemError as exc:
                    log.warning(
                        "subscriber %s: position %d not saved at close: %s",
                        self.name,
                        self._position,
                        exc,
                    )
            finally:
                if self._pubsub is not None:
                    self._release(self._pubsub)
                    self._pubsub = None

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.close(commit=exc_type is None)

    def __repr__(self) -> str:
        where = f"name={self.name!r}" if self.name else "unnamed"
        return (
            f"Subscriber({self.principal.agent_id}, {where}, position={self._position}, "
            f"scopes={list(self.scopes)})"
        )


def _saved_value(mem: DualMemory, principal: Principal, name: str) -> Any:
    """The saved position record of ``name``: the Redis cache entry when there is one
    (newest), else SQLite's; ``None`` when none was saved."""
    key = check_key(POSITION_PREFIX + name)
    try:
        return mem.get(key, level=Level.PRIVATE, principal=principal, fresh=True)
    except StoreUnavailable:
        return mem.get(key, level=Level.PRIVATE, principal=principal)


def _seq_of(name: str, value: Any) -> int | None:
    if value is None:
        return None
    seq = value.get("seq") if isinstance(value, dict) else None
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise ValidationError(f"saved position {name!r} is not a journal seq: {value!r}")
    return seq


def _close_quietly(ps: redis.client.PubSub) -> None:
    try:
        ps.close()
    except (redis.RedisError, OSError) as exc:  # pragma: no cover - best effort
        log.debug("closing pub/sub: %s", exc)
