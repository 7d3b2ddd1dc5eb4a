"""The query-side store contract, documented once; ``SQLiteStore`` is its first implementation."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from acl.levels import Level
from dualmem.projection import Decision, Mission, PlaybookRun, ToolCall

__all__ = [
    "ApplyResult",
    "AuditRow",
    "Change",
    "DeadLetter",
    "Notification",
    "SealedRow",
    "Store",
    "StoredRow",
    "StreamEntry",
]


class StreamEntry(NamedTuple):
    """One entry read from a command stream, as the worker hands it to the store."""

    shard: int
    stream_id: str
    fields: Mapping[bytes, bytes]


class StoredRow(NamedTuple):
    """A current record as stored: the value is still an envelope (decrypted by the reader)."""

    scope: str
    key: str
    level: Level
    owner: str
    envelope: bytes
    created_at: int
    updated_at: int
    expires_at: int | None
    stream_id: str


@dataclass(frozen=True, slots=True)
class Change:
    """One journal entry: what happened to which record, never the value."""

    seq: int
    shard: int
    stream_id: str
    op: str
    scope: str
    key: str
    level: Level
    actor: str
    ts: int
    committed_at: int


class Notification(NamedTuple):
    """What the worker publishes after commit: enough to react, never the value.

    The worker sends one pub/sub message per scope and batch, holding that batch's
    notifications as a JSON array in seq order (one PUBLISH per change cost the worker
    more than the SQLite commit itself). :meth:`parse_message` reads either form.

    >>> notes = [Notification(7, "swarm:s", "k", 3, "put"), Notification(8, "swarm:s", "j", 3,
    ...          "del")]
    >>> Notification.parse_message(Notification.encode_many(notes)) == notes
    True
    """

    seq: int
    scope: str
    key: str
    level: int
    op: str

    def _dict(self) -> dict[str, object]:
        return {
            "seq": self.seq,
            "scope": self.scope,
            "key": self.key,
            "level": self.level,
            "op": self.op,
        }

    def to_json(self) -> bytes:
        """One notification as a JSON object."""
        return json.dumps(self._dict(), separators=(",", ":")).encode()

    @staticmethod
    def encode_many(notes: Sequence[Notification]) -> bytes:
        """A pub/sub message body: the notifications as a JSON array."""
        return json.dumps([n._dict() for n in notes], separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes | str | Mapping[str, object]) -> Notification:
        """Parse one notification (a JSON object, or its already-parsed dict)."""
        d: Any = json.loads(data) if isinstance(data, (bytes, str)) else data
        return cls(int(d["seq"]), str(d["scope"]), str(d["key"]), int(d["level"]), str(d["op"]))

    @classmethod
    def parse_message(cls, data: bytes | str) -> list[Notification]:
        """Parse a pub/sub message body: a JSON array of notifications or a single one.

        Raises ``ValueError``, ``KeyError`` or ``TypeError`` on anything else.
        """
        doc = json.loads(data)
        items = doc if isinstance(doc, list) else [doc]
        return [cls.from_json(item) for item in items]


@dataclass(frozen=True, slots=True)
class AuditRow:
    """One row of the append-only, hash-chained audit log."""

    id: int
    ts: int
    event: str
    actor: str
    scope: str | None
    key: str | None
    level: int | None
    risk: str
    detail: str


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A command that failed ``max_deliveries`` times, kept with its error for replay."""

    id: int
    shard: int
    stream_id: str
    fields: dict[bytes, bytes]
    error: str
    deliveries: int
    failed_at: int
    replayed_at: int | None


@dataclass(frozen=True, slots=True)
class SealedRow:
    """A row as key rotation reads it: its place, its envelope and the sid that orders it
    (the guard of a reseal command)."""

    scope: str
    key: str
    level: Level
    envelope: bytes
    sid: bytes


@dataclass(slots=True)
class ApplyResult:
    """What one :meth:`Store.apply` call did.

    ``done`` are entries now safe to acknowledge (newly applied or already applied
    before); ``failed`` are entries whose own content failed, with the error, left for a
    redelivery; ``notifications`` go out after commit; ``lags_us`` hold writer-clock
    timestamps (microseconds) of newly applied commands; ``*_head`` are the chains' new
    ends, which the worker anchors in Redis.
    """

    done: list[StreamEntry] = field(default_factory=list)
    failed: list[tuple[StreamEntry, str]] = field(default_factory=list)
    notifications: list[Notification] = field(default_factory=list)
    ts_us: list[int] = field(default_factory=list)
    applied: int = 0
    duplicates: int = 0
    #: ``(id, hash)`` of the newest journal / audit row this call committed, if any.
    journal_head: tuple[int, bytes] | None = None
    audit_head: tuple[int, bytes] | None = None

    def merge(self, later: ApplyResult) -> None:
        """Add the outcome of a later ``apply`` call to this one (its chain heads win)."""
        self.done.extend(later.done)
        self.failed.extend(later.failed)
        self.notifications.extend(later.notifications)
        self.ts_us.extend(later.ts_us)
        self.applied += later.applied
        self.duplicates += later.duplicates
        self.journal_head = later.journal_head or self.journal_head
        self.audit_head = later.audit_head or self.audit_head


class Store(ABC):
    """The persistent, queryable side of dualmem.

    Contract for every implementation:

    * Only the worker writes, through :meth:`apply`, :meth:`dead_letter`,
      :meth:`purge` and :meth:`record_metrics`; each call is one transaction.
    * :meth:`apply` is idempotent by ``(shard, stream_id)``: an entry applied twice changes
      nothing the second time, and a record never goes back to an older stream id.
    * One bad entry never fails the others: it is reported in ``ApplyResult.failed``.
      Infrastructure failures (disk, locks) raise ``StoreUnavailable`` and commit nothing.
    * Reads never return tombstones or rows whose ``expires_at`` has passed, and take
      scopes already authorized by ``acl`` (the store filters by them in its query).
    * Times are integer epoch milliseconds.
    * :meth:`apply` also maintains the projections of reserved records, in the same
      transaction as the rows they come from (see ``dualmem.projection``): ``_dm/`` records
      at the plaintext levels become rows of the mission tables, ``mirror.*`` audit events
      rows of ``sync_events``. Encrypted records are never projected.
    """

    @abstractmethod
    def apply(self, entries: Sequence[StreamEntry]) -> ApplyResult:
        """Apply a batch of stream entries in one transaction (see the class contract)."""

    @abstractmethod
    def dead_letter(self, items: Sequence[tuple[StreamEntry, str, int]]) -> None:
        """Record ``(entry, error, deliveries)`` in dead letters, with an audit row each.

        An entry already dead-lettered (delivered again: a worker died before its ack)
        gets the new error and deliveries; a replay of it, if one ran, stands."""

    @abstractmethod
    def status(self, shard: int, stream_id: str) -> str | None:
        """``"committed"``, ``"dead"`` (dead-lettered, with no replay since) or ``None``."""

    @abstractmethod
    def get(self, scope: str, key: str, now_ms: int) -> StoredRow | None:
        """The live row at ``(scope, key)``, or ``None``."""

    def get_envelope(self, scope: str, key: str, now_ms: int) -> tuple[bytes, str] | None:
        """``(envelope, owner)`` of the live row at ``(scope, key)``, or ``None``: what a
        read needs to open the value, without the row's other columns."""
        row = self.get(scope, key, now_ms)
        return None if row is None else (row.envelope, row.owner)

    @abstractmethod
    def query(
        self,
        scopes: Sequence[str],
        *,
        now_ms: int,
        prefix: str = "",
        since: int | None = None,
        until: int | None = None,
        limit: int = 100,
        after: tuple[str, str] | None = None,
    ) -> list[StoredRow]:
        """Live rows in ``scopes`` whose key starts with ``prefix`` and ``since <= updated_at
        < until``, ordered by scope then key, at most ``limit``; with ``after`` only rows
        whose ``(scope, key)`` sorts after it (the next page)."""

    @abstractmethod
    def history(self, scope: str, key: str, limit: int | None = None) -> list[Change]:
        """Journal entries of one record in stream order (oldest first)."""

    @abstractmethod
    def changes(self, scopes: Sequence[str], since: int, limit: int | None = None) -> list[Change]:
        """Journal entries with ``seq > since`` in ``scopes``, ordered by ``seq``."""

    @abstractmethod
    def last_seq(self) -> int:
        """The highest journal ``seq`` (0 when empty)."""

    @abstractmethod
    def chain_hash(self, chain: str, row_id: int) -> bytes | None:
        """The hash of row ``row_id`` of the ``journal`` or ``audit_log`` chain (``None``
        when there is none)."""

    @abstractmethod
    def journal_hash(self, seq: int) -> bytes | None:
        """The chain hash of journal row ``seq`` (``None`` when there is none): what
        identifies that change, so a position saved against another history is noticed."""

    @abstractmethod
    def max_sid(self, shard: int) -> bytes:
        """The highest ordering id (``sid``, see ``commands.sid_of``) of any stream id
        recorded from ``shard``'s stream, ``b""`` when none: the floor new stream ids must
        stay above."""

    @abstractmethod
    def audit_log(self, since_id: int = 0, limit: int | None = None) -> list[AuditRow]:
        """Audit rows with ``id > since_id`` in order."""

    @abstractmethod
    def dead_letters(self, *, include_replayed: bool = False) -> list[DeadLetter]:
        """Dead-lettered commands, oldest first."""

    @abstractmethod
    def dead_letter_count(self) -> int:
        """How many dead-lettered commands wait for a replay (``len(dead_letters())``
        without reading them)."""

    @abstractmethod
    def sealed_rows(
        self,
        levels: Sequence[int],
        *,
        skip_key_field: bytes = b"",
        after: tuple[str, str] | None = None,
        limit: int = 500,
    ) -> list[SealedRow]:
        """Rows at ``levels`` that hold an envelope (expired ones too, tombstones not),
        ordered by ``(scope, key)`` and starting after ``after``, at most ``limit``.

        Envelopes whose key-id field (bytes 2.. of ``acl.crypto``'s layout: a length byte,
        then the id) starts with ``skip_key_field`` are left out: key rotation asks for
        the rows not yet sealed with the active key.
        """

    @abstractmethod
    def count_sealed_rows(self, levels: Sequence[int], *, skip_key_field: bytes = b"") -> int:
        """How many rows :meth:`sealed_rows` would return in all."""

    @abstractmethod
    def mark_replayed(self, ids: Sequence[int], new_ids: Sequence[str] | None = None) -> None:
        """Note that these dead letters were sent to the stream again (under ``new_ids``,
        one stream id each, which :meth:`status` follows)."""

    @abstractmethod
    def purge(
        self,
        now_ms: int,
        tombstones_before_ms: int,
        limit: int = 10_000,
        *,
        floor: bytes | None = None,
    ) -> int:
        """Turn expired rows into tombstones dated at their expiry (so a late older
        command cannot bring a value back), delete tombstones last changed before
        ``tombstones_before_ms`` (unless a dead letter of their key still needs them, or
        their ordering id is at or above ``floor``, the oldest command still unacknowledged
        in the streams: see :func:`dualmem.worker.purge_floor`), and dead letters replayed
        before it; returns how many rows changed or went."""

    @abstractmethod
    def record_metrics(
        self, ts_ms: int, source: str, snapshot: Mapping[str, Mapping[str, float]]
    ) -> None:
        """Store a latency snapshot (one row per path)."""

    @abstractmethod
    def latest_metrics(self) -> dict[str, dict[str, dict[str, float]]]:
        """``{source: {path: summary}}`` from each source's newest snapshot."""

    @abstractmethod
    def mission(self, scope: str, mission_id: str) -> Mission | None:
        """The projected mission ``mission_id`` in ``scope`` (placeholders excluded)."""

    @abstractmethod
    def missions(self, scope: str, *, status: str | None = None) -> list[Mission]:
        """Projected missions of ``scope`` (with ``status`` if given), oldest start first."""

    @abstractmethod
    def tool_calls(
        self,
        scope: str,
        mission_id: str,
        *,
        since: int | None = None,
        success: bool | None = None,
    ) -> list[ToolCall]:
        """Tool calls of a mission with ``called_at >= since`` and the given outcome,
        in call order."""

    @abstractmethod
    def decisions(self, scope: str, mission_id: str) -> list[Decision]:
        """Decisions of a mission in the order they were taken."""

    @abstractmethod
    def playbook_runs(self, scope: str, mission_id: str) -> list[PlaybookRun]:
        """Playbook runs of a mission by start time."""

    @abstractmethod
    def stale_children(self, scope: str, mission_id: str) -> list[str]:
        """Keys of the live tool call, decision and playbook run records of a mission in
        ``scope`` that were written before the newest delete of the mission's record (at
        any level): they belong to the mission that delete ended, not to one of that id
        started since. Empty if the mission's record was never deleted."""

    @abstractmethod
    def close(self) -> None:
        """Release connections; the store is unusable afterwards."""
