"""Blocking signals: a coordinator sends a signed signal, targets answer with HMAC-SHA256
signed ACKs, the coordinator waits with bounded retries; every step leaves an audit row."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from acl.errors import ConfigurationError, TamperedRecord, ValidationError
from acl.levels import ENCRYPTED_LEVELS, Level, as_level
from acl.principal import Principal
from dualmem.commands import MAX_TTL_SECONDS, Receipt, ttl_to_ms
from dualmem.coordination._validation import (
    ReceiptLog,
    SeenRecords,
    check_ident,
    check_key_fits,
    check_seconds,
    clock_us,
    not_a_record,
    without_values,
)
from dualmem.errors import NotPersisted
from dualmem.memory import DualMemory, Record

__all__ = ["Ack", "AckResult", "BlockingCoordinator", "Signal"]

_SIGNALS = "coord/signals/"
_ACKS = "coord/acks/"
_MIN_SECRET_BYTES = 16
_MAX_RETRIES = 100  # wait_for_acks plans (and may catch up on) that many re-sends
_KDF_LABEL = b"dualmem/coordination/hmac-sha256/v1"
_QUERY_LIMIT = 10_000  #: one page of a query; pending_signals reads page after page
#: The characters of a signal id (see send_signal): pending_signals pages by them.
_SIGNAL_ID_SHAPE = "00000000T000000-000000000000"  # as long as every id send_signal makes
#: Audit detail taken from a signal's value, left out at encrypted levels (see _audit). Who
#: acked or was refused is not among them: ACK keys name their target in the clear anyway.
_SEALED_DETAIL = ("type", "targets", "missing", "rejected")


def _canonical(doc: dict[str, Any]) -> bytes:
    """The exact bytes a MAC covers: sorted keys, no spaces, UTF-8."""
    return json.dumps(
        doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


@dataclass(frozen=True, slots=True)
class _Key:
    kid: str
    key: bytes = field(repr=False)  # never in a log line or a traceback


def _derive(secret: bytes | str) -> _Key:
    raw = secret.encode("utf-8") if isinstance(secret, str) else secret
    if not isinstance(raw, bytes) or len(raw) < _MIN_SECRET_BYTES:
        raise ConfigurationError(
            f"the signal secret must be at least {_MIN_SECRET_BYTES} bytes "
            "(use secrets.token_bytes(32) and share it with every participant)"
        )
    # A derived key, never the caller's secret itself: the same secret used elsewhere
    # (for example as an API token) cannot be turned into an ACK forgery oracle here.
    key = hmac.new(raw, _KDF_LABEL, hashlib.sha256).digest()
    kid = hashlib.sha256(b"kid" + key).hexdigest()[:12]
    return _Key(kid, key)


@dataclass(frozen=True, slots=True)
class Signal:
    """A signal as stored at ``coord/signals/<id>``; ``mac`` signs every other field."""

    id: str
    type: str
    sender: str
    targets: tuple[str, ...]
    payload: Any
    sent_at: int  #: epoch microseconds
    attempt: int  #: 1 for the first send, +1 per retry
    kid: str
    mac: str

    def body(self) -> dict[str, Any]:
        """The fields that stay the same across retries (what an ACK is bound to)."""
        return {
            "id": self.id,
            "type": self.type,
            "sender": self.sender,
            "targets": list(self.targets),
            "payload": self.payload,
            "sent_at": self.sent_at,
        }

    @property
    def digest(self) -> str:
        """SHA-256 of :meth:`body`: an ACK names it, so it acknowledges exactly this signal."""
        return hashlib.sha256(b"dualmem-signal-body\x00" + _canonical(self.body())).hexdigest()

    def signed_part(self) -> bytes:
        """The bytes ``mac`` covers."""
        return b"signal\x00" + _canonical({**self.body(), "attempt": self.attempt, "kid": self.kid})

    def to_value(self) -> dict[str, Any]:
        """The stored JSON value."""
        return {**self.body(), "attempt": self.attempt, "kid": self.kid, "mac": self.mac}

    @classmethod
    def from_value(cls, v: Any) -> Signal:
        """Parse a stored value; ``TamperedRecord`` if it is not a signal."""
        try:
            return cls(
                id=str(v["id"]),
                type=str(v["type"]),
                sender=str(v["sender"]),
                targets=tuple(str(t) for t in v["targets"]),
                payload=v["payload"],
                sent_at=int(v["sent_at"]),
                attempt=int(v["attempt"]),
                kid=str(v["kid"]),
                mac=str(v["mac"]),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise not_a_record("a signal record", exc) from exc


@dataclass(frozen=True, slots=True)
class Ack:
    """A target's acknowledgement, stored at ``coord/acks/<signal id>/<target>``."""

    signal_id: str
    target: str
    digest: str  #: the acknowledged signal's :attr:`Signal.digest`
    acked_at: int  #: epoch microseconds
    kid: str
    mac: str

    def signed_part(self) -> bytes:
        """The bytes ``mac`` covers."""
        return b"ack\x00" + _canonical(
            {
                "signal_id": self.signal_id,
                "target": self.target,
                "digest": self.digest,
                "acked_at": self.acked_at,
                "kid": self.kid,
            }
        )

    def to_value(self) -> dict[str, Any]:
        """The stored JSON value."""
        return {
            "signal_id": self.signal_id,
            "target": self.target,
            "digest": self.digest,
            "acked_at": self.acked_at,
            "kid": self.kid,
            "mac": self.mac,
        }

    @classmethod
    def from_value(cls, v: Any) -> Ack:
        """Parse a stored value; ``TamperedRecord`` if it is not an ACK."""
        try:
            return cls(
                signal_id=str(v["signal_id"]),
                target=str(v["target"]),
                digest=str(v["digest"]),
                acked_at=int(v["acked_at"]),
                kid=str(v["kid"]),
                mac=str(v["mac"]),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise not_a_record("an ACK record", exc) from exc


@dataclass(frozen=True, slots=True)
class AckResult:
    """What :meth:`BlockingCoordinator.wait_for_acks` saw before it returned.

    ``acked``: targets with a valid ACK; ``missing``: targets without one (``rejected``
    maps those whose ACK record failed verification to the reason); ``retries``: how many
    times the signal was re-sent.
    """

    signal_id: str
    acked: tuple[str, ...]
    missing: tuple[str, ...]
    rejected: dict[str, str]
    retries: int

    @property
    def complete(self) -> bool:
        """Every target acknowledged."""
        return not self.missing


class BlockingCoordinator:
    """Signals with acknowledgements, for one participant (``coordinator_id``).

    ``coordinator_id`` is the participant's :class:`~acl.Principal`: its ``agent_id`` is
    the id in signals and ACKs, and it authorizes the writes. Signals and ACKs live at
    ``level`` (default SWARM, so sender and targets must share a swarm) and expire after
    ``signal_ttl`` seconds. ``secret`` (at least 16 bytes) is shared by all participants;
    a key derived from it signs signals and ACKs with HMAC-SHA256; ``previous_secrets``
    still verify (for rotating the secret). The secret is never stored.

    An ACK counts only if its MAC verifies, it names this signal's id and digest and the
    target, and the record was written by the target's own principal. Anything else is
    rejected and audited as high risk. ACKing twice is a no-op once the first ACK is
    committed, or within one object before that (see :meth:`acknowledge_signal`).
    ``wait_for_acks`` re-sends
    the signal at most ``max_retries`` (0..100) times within its timeout.

    >>> import tempfile, os
    >>> from acl import Principal
    >>> from dualmem import DualMemory
    >>> boss = Principal(agent_id="coordinator", swarm="auth")
    >>> coder = Principal(agent_id="coder-1", swarm="auth")
    >>> secret = b"0123456789abcdef0123456789abcdef"
    >>> db = os.path.join(tempfile.mkdtemp(), "mem.db")
    >>> with DualMemory(redis_url="memory://doctest-signals", db_path=db) as mem:
    ...     sender = BlockingCoordinator(mem, boss, secret)
    ...     signal = sender.send_signal(["coder-1"], "pause", {"reason": "review"})
    ...     _ = BlockingCoordinator(mem, coder, secret).acknowledge_signal(signal)
    ...     result = sender.wait_for_acks(signal, timeout=5)
    ...     result.acked, result.missing, result.complete
    (('coder-1',), (), True)
    """

    def __init__(
        self,
        mem: DualMemory,
        coordinator_id: Principal,
        secret: bytes | str,
        *,
        level: Level | int = Level.SWARM,
        max_retries: int = 3,
        signal_ttl: float | None = 86_400.0,
        previous_secrets: Sequence[bytes | str] = (),
    ) -> None:
        if not isinstance(mem, DualMemory):
            raise ValidationError("BlockingCoordinator needs a DualMemory")
        if not isinstance(coordinator_id, Principal):
            raise ValidationError(
                "coordinator_id must be the participant's acl.Principal (its agent_id is "
                f"the id in signals and ACKs), got {type(coordinator_id).__name__}"
            )
        if (
            isinstance(max_retries, bool)
            or not isinstance(max_retries, int)
            or not 0 <= max_retries <= _MAX_RETRIES
        ):
            raise ValidationError(
                f"max_retries must be an int in 0..{_MAX_RETRIES}, got {max_retries!r}"
            )
        try:
            # The ttl of every signal's put: refused here, not at the first send_signal.
            ttl_to_ms(signal_ttl)
        except ValidationError:
            raise ValidationError(
                f"signal_ttl must be None (no expiry) or seconds in (0, {MAX_TTL_SECONDS}], "
                f"got {signal_ttl!r}"
            ) from None
        if isinstance(previous_secrets, (str, bytes)) or not isinstance(previous_secrets, Iterable):
            raise ValidationError(
                "previous_secrets must be a list of secrets (empty for none), got "
                f"{type(previous_secrets).__name__}"
            )
        self.mem = mem
        self.principal = coordinator_id
        self.id = check_ident("coordinator_id", coordinator_id.agent_id)
        self.level = as_level(level)
        # Through the facade, so a denial (no scope at the level, SYSTEM for a non-system
        # principal) is audited like any other.
        _, self.scope = mem.authorize(coordinator_id, self.level, "write")
        self.max_retries = max_retries
        self.signal_ttl = signal_ttl
        self._signer = _derive(secret)
        self._verifiers = {k.kid: k for k in (self._signer, *map(_derive, previous_secrets))}
        self._receipts = ReceiptLog(mem)
        self._rejected = SeenRecords()
        # ACKs this object wrote that may not be committed yet, with the receipt of their
        # put (dropped once the put is committed).
        self._pending_acks: dict[str, tuple[Ack, Receipt]] = {}

    # -- signing -------------------------------------------------------------------------

    def _mac(self, part: bytes) -> str:
        return hmac.new(self._signer.key, part, hashlib.sha256).hexdigest()

    def _mac_ok(self, kid: str, mac: str, part: bytes) -> bool:
        key = self._verifiers.get(kid)
        if key is None:
            return False
        expected = hmac.new(key.key, part, hashlib.sha256).hexdigest()
        # Bytes: compare_digest refuses a str that is not ASCII (a planted "mac": "é"
        # would raise instead of failing to verify).
        return hmac.compare_digest(expected.encode(), str(mac).encode("utf-8", "replace"))

    def _sign_signal(self, s: Signal, attempt: int) -> Signal:
        unsigned = Signal(
            s.id, s.type, s.sender, s.targets, s.payload, s.sent_at, attempt, self._signer.kid, ""
        )
        return Signal(
            s.id,
            s.type,
            s.sender,
            s.targets,
            s.payload,
            s.sent_at,
            attempt,
            self._signer.kid,
            self._mac(unsigned.signed_part()),
        )

    def signal_problem(self, signal: Signal, writer: str | None = None) -> str | None:
        """Why ``signal`` is not authentic, or ``None`` when its MAC verifies.

        ``writer`` is the agent that wrote the signal's record (``None``: unknown, not
        checked). Every participant holds the secret, so a MAC alone cannot tell the
        coordinator from a swarm member signing a signal in its name; the record's writer,
        which dualmem stores with every row, can.
        """
        if signal.kid not in self._verifiers:
            return f"signed with unknown key id {signal.kid!r}"
        if not self._mac_ok(signal.kid, signal.mac, signal.signed_part()):
            return "MAC does not verify (forged or altered)"
        if writer is not None and writer != signal.sender:
            return f"written by {writer!r}, not by its sender {signal.sender!r}"
        return None

    def ack_problem(self, signal: Signal, target: str, ack: Ack, writer: str | None) -> str | None:
        """Why ``ack`` does not acknowledge ``signal`` for ``target``, or ``None`` if it does.

        ``writer`` is the agent that wrote the ACK record (``None``: unknown, not checked).
        """
        if ack.kid not in self._verifiers:
            return f"signed with unknown key id {ack.kid!r}"
        if not self._mac_ok(ack.kid, ack.mac, ack.signed_part()):
            return "MAC does not verify (forged or altered)"
        if ack.signal_id != signal.id or ack.digest != signal.digest:
            return "acknowledges another signal (replayed)"
        if ack.target != target:
            return f"names target {ack.target!r}, not {target!r}"
        if writer is not None and writer != target:
            return f"written by {writer!r}, not by the target {target!r}"
        return None

    # -- keys and audit ------------------------------------------------------------------

    @staticmethod
    def _signal_key(signal_id: str) -> str:
        return f"{_SIGNALS}{signal_id}"

    @staticmethod
    def _ack_key(signal_id: str, target: str) -> str:
        return f"{_ACKS}{signal_id}/{target}"

    def _check_ack_keys(self, signal_id: str, targets: Iterable[str]) -> None:
        """``ValidationError`` unless every target's ACK key fits a key's 512 UTF-8 bytes
        (else that target's ACK could never be stored, nor looked for)."""
        for target in targets:
            check_key_fits("target", target, self._ack_key(signal_id, target))

    def _audit(self, event: str, risk: str, key: str, **detail: Any) -> None:
        if self.level in ENCRYPTED_LEVELS:
            # The audit log is plaintext; a signal's type and targets are part of its
            # sealed value at this level, so only their number is recorded.
            for name in _SEALED_DETAIL:
                if name in detail:
                    value = detail.pop(name)
                    if isinstance(value, (list, tuple, dict)):
                        detail[f"{name}_count"] = len(value)
            # A rejection reason quotes what the record holds (a key id, a target).
            if "reason" in detail:
                detail["reason"] = without_values(str(detail["reason"]))
        self._receipts.add(
            self.mem.audit(
                event,
                principal=self.principal,
                risk=risk,
                scope=self.scope,
                key=key,
                level=int(self.level),
                detail=detail,
            )
        )

    def _put(self, key: str, value: dict[str, Any]) -> Receipt:
        return self._receipts.add(
            self.mem.put(
                key,
                value,
                level=self.level,
                principal=self.principal,
                ttl=self.signal_ttl,
            )
        )

    # -- sending -------------------------------------------------------------------------

    def send_signal(self, targets: Iterable[str], type: str, payload: Any = None) -> Signal:
        """Store a signed signal for ``targets`` (agent ids) and audit the send (low risk).

        Targets see it through a :class:`~dualmem.Subscriber` on the signal's scope or
        through :meth:`pending_signals`. ``payload`` is any JSON value.
        """
        if isinstance(targets, str):
            raise ValidationError("targets must be a list of agent ids, not one string")
        if not isinstance(targets, Iterable):
            raise ValidationError(
                f"targets must be a list of agent ids, got {targets.__class__.__name__}"
            )
        wanted = tuple(dict.fromkeys(check_ident("target", t) for t in targets))
        if not wanted:
            raise ValidationError("a signal needs at least one target")
        self._check_ack_keys(_SIGNAL_ID_SHAPE, wanted)
        check_ident("type", type)
        try:
            _canonical({"payload": payload})
        except (TypeError, ValueError) as exc:
            raise ValidationError(f"payload is not JSON-serializable: {exc}") from exc
        # The id's time is the send time in UTC, from the same clock reading as sent_at:
        # in local time, ids from participants in other time zones (or across a DST
        # change) named times hours apart from when they were sent.
        sent_at = clock_us()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(sent_at // 1_000_000))
        sid = f"{stamp}-{secrets.token_hex(6)}"
        draft = Signal(sid, type, self.id, wanted, payload, sent_at, 1, self._signer.kid, "")
        signal = self._sign_signal(draft, 1)
        self._put(self._signal_key(sid), signal.to_value())
        self._audit(
            "signal_sent", "low", self._signal_key(sid), signal=sid, type=type, targets=list(wanted)
        )
        return signal

    def get_signal(self, signal_id: str) -> Signal | None:
        """The stored signal (latest attempt), from the Redis cache when present."""
        check_ident("signal_id", signal_id)
        value = self.mem.get(
            check_key_fits("signal_id", signal_id, self._signal_key(signal_id)),
            level=self.level,
            principal=self.principal,
            fresh=True,
        )
        if value is None:
            return None
        found = Signal.from_value(value)
        return found if found.id == signal_id else None  # a record naming another signal

    def pending_signals(self) -> list[Signal]:
        """Authentic signals addressed to this participant that it has not ACKed yet,
        oldest first (from SQLite). Forged ones (a MAC that does not verify, or a record
        written by someone other than the signal's sender) are skipped and audited (high
        risk).

        Every live signal of the scope is read, page after page (10,000 records a page,
        ``DualMemory.query_all``), so none is cut off however many there are.
        """
        records = self.mem.query_all(
            principal=self.principal, level=self.level, prefix=_SIGNALS, page=_QUERY_LIMIT
        )
        out: list[Signal] = []
        for r in records:
            try:
                signal = Signal.from_value(r.value)
            except TamperedRecord as exc:
                # Anyone in the swarm can put junk under the prefix: skip it, not the feed.
                self._reject_once("signal_rejected", r, str(exc))
                continue
            if self.id not in signal.targets:
                continue
            problem = self._record_problem(signal, r)
            if problem is not None:
                self._reject_once("signal_rejected", r, problem, signal=signal.id)
                continue
            if self._own_valid_ack(signal) is None:
                out.append(signal)
        out.sort(key=lambda s: (s.sent_at, s.id))
        return out

    def _newest(self, signal: Signal) -> Signal:
        """The stored attempt of ``signal`` if it is newer and authentic, else ``signal``."""
        stored = self.get_signal(signal.id)
        if (
            stored is not None
            and stored.digest == signal.digest
            and stored.attempt > signal.attempt
            and self.signal_problem(stored) is None
        ):
            return stored
        return signal

    def _resolve(self, signal: Signal | str) -> Signal:
        if isinstance(signal, str):
            found = self.get_signal(signal)
            if found is None:
                raise ValidationError(f"no signal {signal!r} (expired, or never sent)")
            return found
        if not isinstance(signal, Signal):
            raise ValidationError(f"expected a Signal or a signal id, got {type(signal).__name__}")
        return signal

    # -- acknowledging -------------------------------------------------------------------

    def _record_problem(self, signal: Signal, record: Record) -> str | None:
        """Why the stored ``record`` holding ``signal`` is not an authentic signal: its key
        must name the signal's id, its MAC verify, and its writer be the sender."""
        if record.key != self._signal_key(signal.id):
            return f"stored under {record.key!r} but names signal {signal.id!r}"
        return self.signal_problem(signal, record.owner)

    def _stored_problem(self, signal: Signal, record: Record) -> str | None:
        """Why ``signal`` is not the authentic signal committed in ``record``."""
        try:
            stored = Signal.from_value(record.value)
        except TamperedRecord as exc:
            return str(exc)
        if stored.digest != signal.digest:
            return "does not match the signal as stored (altered)"
        return self._record_problem(stored, record)

    def _committed_signal(self, signal_id: str, timeout: float) -> Record:
        """The committed record of ``signal_id``, waiting up to ``timeout`` seconds for
        the worker to commit it (only a committed record says who wrote it)."""
        key = self._signal_key(signal_id)
        deadline = time.monotonic() + timeout
        delay = 0.002
        while True:
            record = self.mem.get_record(key, level=self.level, principal=self.principal)
            if record is not None:
                return record
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NotPersisted(
                    f"signal {signal_id} is not committed after {timeout}s, so who wrote it "
                    "cannot be checked yet (is a worker running?)"
                )
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.05)

    def _check_committed(self, signal: Signal, timeout: float) -> None:
        """Raise ``TamperedRecord`` (audited, high risk) unless ``signal`` is the body of its
        committed record, written by its sender; ``NotPersisted`` if that record is not
        committed within ``timeout`` seconds."""
        record = self._committed_signal(signal.id, timeout)
        problem = self._stored_problem(signal, record)
        if problem is not None:
            self._audit(
                "signal_rejected",
                "high",
                self._signal_key(signal.id),
                signal=signal.id,
                reason=problem,
            )
            raise TamperedRecord(f"signal {signal.id} is not authentic: {problem}")

    def _valid_ack_value(self, signal: Signal, value: Any) -> Ack | None:
        try:
            ack = Ack.from_value(value)
        except TamperedRecord:
            return None
        return ack if self.ack_problem(signal, self.id, ack, None) is None else None

    def _own_valid_ack(self, signal: Signal) -> Ack | None:
        """This participant's valid ACK of ``signal`` if one is stored (idempotency)."""
        key = self._ack_key(signal.id, self.id)
        pending = self._pending_acks.get(signal.id)
        # Whether our own put is committed, asked before the record is read: once it is,
        # the record read next is ours or a later write of the key.
        ours_done = pending is not None and (
            self.mem.store.status(pending[1].shard, pending[1].stream_id) is not None
        )
        record = self.mem.get_record(key, level=self.level, principal=self.principal)
        committed = None if record is None else self._valid_ack_value(signal, record.value)
        if committed is not None and record is not None and record.owner == self.id:
            self._pending_acks.pop(signal.id, None)
            return committed
        # Not committed yet, or the committed record is someone else's copy. Only an ACK
        # this object wrote counts as pending: the Redis cache says nothing about who
        # wrote an entry, and any participant holding the secret can put a valid-looking
        # copy there, which would make us return without writing our own. Ours counts
        # while its put is still in the stream; once that put is committed (or
        # dead-lettered) and the record is not ours, it was overwritten (a verbatim or
        # re-signed copy, junk, a delete): it no longer stands, so we ACK again. Telling
        # the two apart by the put's stream id, not by comparing values, is what catches
        # a copy that differs from ours.
        if pending is None:
            return None
        if ours_done:
            self._pending_acks.pop(signal.id, None)
            return None
        return pending[0]

    def acknowledge_signal(self, signal: Signal | str, *, timeout: float = 5.0) -> Ack:
        """ACK ``signal`` as this participant: an HMAC-SHA256-signed record, audited (low).

        Only the signal as committed counts: this waits up to ``timeout`` seconds for its
        record to be committed (``NotPersisted`` after that), and the signal must be that
        record's body, its MAC must verify and the record must have been written by the
        sender it names; otherwise ``TamperedRecord`` (audited high risk). A signal not
        addressed to this participant raises ``ValidationError``.

        Idempotent, precisely: nothing is written and the existing ACK is returned when a
        valid ACK of this signal written by this participant is committed, or when this
        same object wrote one whose put is not committed yet. Another object for the same
        agent (a restarted process) that acks before the first ACK is committed writes a
        second one (a second put and a second ``signal_ack`` audit row; either ACK counts).
        It cannot skip the write on the strength of the Redis cache: the cache does not
        say who wrote an entry, and any participant holding the secret can put a valid
        looking copy there, which would leave the target's own ACK unwritten.
        """
        timeout = check_seconds("timeout", timeout)
        signal = self._resolve(signal)
        check_key_fits("agent_id", self.id, self._ack_key(signal.id, self.id))
        self._check_committed(signal, timeout)
        if self.id not in signal.targets:
            raise ValidationError(f"signal {signal.id} is not addressed to {self.id}")
        existing = self._own_valid_ack(signal)
        if existing is not None:
            return existing
        draft = Ack(signal.id, self.id, signal.digest, clock_us(), self._signer.kid, "")
        ack = Ack(
            draft.signal_id,
            draft.target,
            draft.digest,
            draft.acked_at,
            draft.kid,
            self._mac(draft.signed_part()),
        )
        key = self._ack_key(signal.id, self.id)
        self._pending_acks[signal.id] = (ack, self._put(key, ack.to_value()))
        self._audit("signal_ack", "low", key, signal=signal.id, type=signal.type)
        return ack

    # -- waiting -------------------------------------------------------------------------

    def _reject_once(self, event: str, record: Record, reason: str, **detail: Any) -> None:
        if self._rejected.first(record):  # once per record version, not once per poll
            self._audit(event, "high", record.key, reason=reason, **detail)

    def _check_ack(self, signal: Signal, target: str) -> tuple[bool, str | None]:
        """``(valid, rejection reason)`` for the target's ACK record as committed."""
        record = self.mem.get_record(
            self._ack_key(signal.id, target), level=self.level, principal=self.principal
        )
        if record is None:
            return False, None
        try:
            ack = Ack.from_value(record.value)
        except TamperedRecord as exc:
            reason: str | None = str(exc)
        else:
            reason = self.ack_problem(signal, target, ack, record.owner)
        if reason is None:
            return True, None
        self._reject_once("signal_ack_rejected", record, reason, signal=signal.id, target=target)
        return False, reason

    def wait_for_acks(
        self, signal: Signal | str, timeout: float, *, poll_interval: float = 0.02
    ) -> AckResult:
        """Wait up to ``timeout`` seconds for every target's ACK, re-sending the signal
        ``max_retries`` times (evenly spread over the timeout) while some are missing.

        While any target is missing it re-sends exactly ``max_retries`` times before it
        gives up (a starved process catches up on missed re-sends before returning).

        Only the sender waits (``ValidationError`` otherwise), and only for its signal as
        committed: the targets come from the committed record, which must have been
        written by this participant (a swarm member holding the secret could otherwise put
        a copy with other targets in the cache, and a wait by id would believe it). The
        wait for that commit counts against ``timeout``; ``NotPersisted`` if it never
        comes (no target can have acked a signal that is not committed).

        ACKs are read as committed to SQLite, so the writer of each is known. Audit rows:
        ``signal_retry`` (medium) per re-send, ``signal_ack_rejected`` (high) per bad ACK
        record, then ``signal_complete`` (low) or ``signal_timeout`` (medium).
        """
        timeout = check_seconds("timeout", timeout)
        # > 0: at 0 (or NaN, or below) the wait below polled without pausing.
        poll_interval = check_seconds("poll_interval", poll_interval, positive=True)
        signal = self._resolve(signal)
        if signal.sender != self.id:
            raise ValidationError(
                f"signal {signal.id} was sent by {signal.sender!r}: only its sender waits "
                f"for its ACKs, not {self.id!r}"
            )
        if self.signal_problem(signal) is not None:
            raise TamperedRecord(f"signal {signal.id} is not authentic; refusing to wait for it")
        self._check_ack_keys(signal.id, signal.targets)  # before any re-send, not mid-wait
        start = time.monotonic()
        self._check_committed(signal, timeout)
        deadline = start + timeout
        slots = self.max_retries + 1
        retry_at = [start + timeout * (i + 1) / slots for i in range(self.max_retries)]
        pending = list(signal.targets)
        acked: list[str] = []
        rejected: dict[str, str] = {}
        retries = 0
        current = self._newest(signal)
        delay = min(poll_interval, 0.005)
        while True:
            for target in list(pending):
                ok, reason = self._check_ack(signal, target)
                if ok:
                    pending.remove(target)
                    acked.append(target)
                    rejected.pop(target, None)
                elif reason is not None:
                    rejected[target] = reason
            if not pending:
                break
            now = time.monotonic()
            if retries < self.max_retries and now >= retry_at[retries]:
                # A process starved past several retry times still makes every re-send
                # (one per check), so a silent target always costs exactly max_retries.
                retries += 1
                current = self._sign_signal(current, current.attempt + 1)
                self._put(self._signal_key(signal.id), current.to_value())
                self._audit(
                    "signal_retry",
                    "medium",
                    self._signal_key(signal.id),
                    signal=signal.id,
                    attempt=current.attempt,
                    missing=list(pending),
                )
                continue
            if now >= deadline:
                break
            wake = deadline if retries >= self.max_retries else min(deadline, retry_at[retries])
            time.sleep(max(0.0, min(delay, wake - now)))
            delay = min(delay * 2, poll_interval)
        result = AckResult(
            signal.id,
            tuple(t for t in signal.targets if t in acked),
            tuple(pending),
            {t: r for t, r in rejected.items() if t in pending},
            retries,
        )
        if result.complete:
            self._audit(
                "signal_complete",
                "low",
                self._signal_key(signal.id),
                signal=signal.id,
                retries=retries,
            )
        else:
            self._audit(
                "signal_timeout",
                "medium",
                self._signal_key(signal.id),
                signal=signal.id,
                missing=list(result.missing),
                rejected=result.rejected,
                retries=retries,
                timeout_s=timeout,
            )
        return result

    def sync(self, timeout: float = 5.0) -> None:
        """Wait until every signal, ACK and audit row this participant wrote is committed."""
        self._receipts.sync(timeout)
