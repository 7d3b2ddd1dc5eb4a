"""``dualmem dlq``: list dead-lettered commands and send them back to the stream."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from acl.errors import ValidationError
from dualmem.commands import MalformedCommand, Receipt, decode_command, replay_fields
from dualmem.ops.runtime import AuditEvent, Runtime
from dualmem.store import DeadLetter

__all__ = ["DeadLetterView", "ReplayResult", "describe", "replay"]


@dataclass(frozen=True, slots=True)
class DeadLetterView:
    """A dead letter with its command decoded as far as it decodes."""

    id: int
    shard: int
    stream_id: str
    op: str
    scope: str
    key: str
    error: str
    deliveries: int
    failed_at: int
    replayed_at: int | None


def describe(dead: DeadLetter) -> DeadLetterView:
    """Decode the stored fields (an undecodable entry shows its raw op, if any)."""
    try:
        cmd = decode_command(dead.fields)
        op, scope, key = cmd.op, cmd.scope, cmd.key
        if cmd.op == "audit":
            key = cmd.event or ""
    except MalformedCommand:
        op = dead.fields.get(b"op", b"?").decode("utf-8", "replace")
        scope = dead.fields.get(b"s", b"").decode("utf-8", "replace")
        key = dead.fields.get(b"k", b"").decode("utf-8", "replace")
    return DeadLetterView(
        dead.id,
        dead.shard,
        dead.stream_id,
        op,
        scope,
        key,
        dead.error,
        dead.deliveries,
        dead.failed_at,
        dead.replayed_at,
    )


@dataclass
class ReplayResult:
    """Which dead letters went back to the stream, and their new receipts."""

    ids: list[int]
    receipts: list[Receipt]


def replay(
    runtime: Runtime, ids: Sequence[int] | None, *, actor: str = "dualmem-dlq"
) -> ReplayResult:
    """XADD the stored fields of dead letters ``ids`` (``None``: all not yet replayed) back
    into their shard's stream, with a ``dlq_replay`` audit event, in one transaction; then
    mark them replayed. An id named more than once is sent once.

    Marking is a direct write of ``dead_letters.replayed_at``, outside the worker: an
    operational flag the worker never writes (it writes a dead letter under the stream id
    that failed, the replay has a new one, and the same entry dead-lettered again keeps
    its replay), so it cannot race a worker's update. It comes after the send: a crash
    between them leaves the letter listed, and a second replay re-applies the same
    command, which changes nothing.
    """
    letters = runtime.store.dead_letters(include_replayed=ids is not None)
    by_id = {d.id: d for d in letters}
    if ids is None:
        chosen = [d for d in letters if d.replayed_at is None]
    else:
        missing = sorted(set(ids) - by_id.keys())
        if missing:
            raise ValidationError(f"no dead letter with id {', '.join(map(str, missing))}")
        chosen = [by_id[i] for i in dict.fromkeys(ids)]  # an id named twice goes once
    if not chosen:
        return ReplayResult([], [])
    detail = {"ids": [d.id for d in chosen], "stream_ids": [d.stream_id for d in chosen]}
    receipts = runtime.send(
        [],
        raw=[(d.shard, replay_fields(d.fields, d.stream_id)) for d in chosen],
        audits=[AuditEvent("dlq_replay", actor, detail)],
    )
    runtime.store.mark_replayed(
        [d.id for d in chosen], [r.stream_id for r in receipts[: len(chosen)]]
    )
    return ReplayResult([d.id for d in chosen], receipts[: len(chosen)])
