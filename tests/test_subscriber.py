"""Subscriber: catch-up then live, exactly once and in order, resumable, never beyond the
principal's scopes; each test on fakeredis AND a real redis-server unless it says so."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from acl import Level, Principal
from dualmem import (
    AccessDenied,
    DualMemError,
    DualMemory,
    StoreUnavailable,
    Subscriber,
    ValidationError,
)
from dualmem.redis_backend import _IDLE_PING_S
from dualmem.store import Change, Notification, StreamEntry
from dualmem.subscriber import POSITION_PREFIX
from dualmem.worker import Worker

from .conftest import RedisServer, wait_until

MakeMem = Callable[..., DualMemory]


def feed(mem: DualMemory, who: Principal) -> list[int]:
    """Every seq ``who`` may read, from the journal, without subscribers' bookkeeping."""
    return [c.seq for c in mem.changes(0, principal=who) if not c.key.startswith(POSITION_PREFIX)]


def consume_until(sub: Subscriber, key: str, *, limit: int = 100_000) -> list[Change]:
    """Poll until the change at ``key`` arrives (included); fail if the feed stalls."""
    got: list[Change] = []
    for _ in range(limit):
        change = sub.poll(timeout=15)
        assert change is not None, f"feed stalled after {len(got)} changes, waiting for {key}"
        got.append(change)
        if change.key == key:
            return got
    pytest.fail(f"{key} never arrived")


def write_mixed(mem: DualMemory, me: Principal, stranger: Principal, n: int, *, tag: str) -> None:
    """``n`` changes ``me`` may read (puts and deletes at three levels), with changes
    ``me`` may not read in between; the last one is ``<tag>/done``."""
    for i in range(n - 1):
        level = (Level.SWARM, Level.PRIVATE, Level.PROJECT)[i % 3]
        if i % 7 == 6:
            mem.delete(
                f"{tag}/{i - 3}",
                level=(Level.SWARM, Level.PRIVATE, Level.PROJECT)[(i - 3) % 3],
                principal=me,
            )
        else:
            mem.put(f"{tag}/{i}", {"i": i}, level=level, principal=me)
        if i % 5 == 0:
            mem.put(f"{tag}/noise/{i}", i, level=Level.PRIVATE, principal=stranger)
    mem.put(f"{tag}/done", True, level=Level.SWARM, principal=me)


def test_catch_up_then_live_each_change_once_and_in_order(
    make_mem: MakeMem, coder: Principal, other: Principal
) -> None:
    mem = make_mem()
    write_mixed(mem, coder, other, 60, tag="early")
    mem.sync(mem.put("early/synced", 1, level=Level.SWARM, principal=coder))
    with Subscriber(mem, coder, since=0) as sub:
        producer = threading.Thread(
            target=write_mixed, args=(mem, coder, other, 300), kwargs={"tag": "late"}
        )
        producer.start()  # written while the subscriber catches up: the race it must win
        got = consume_until(sub, "late/done")
        producer.join()
    assert [c.seq for c in got] == feed(mem, coder)
    assert len(got) == 60 + 1 + 300
    assert {c.scope for c in got} == {"agent:coder-1", "swarm:phase-1-auth", "project:shop"}
    assert any(c.op == "del" for c in got)


def test_never_delivers_what_the_principal_may_not_read(
    make_mem: MakeMem,
    coder: Principal,
    other: Principal,
    system: Principal,
    raw_redis: redis.Redis,
) -> None:
    mem = make_mem()
    sub = Subscriber(mem, other, since=0)  # other: team frontend, swarm phase-2-ui, project shop
    assert set(sub.scopes) == {"agent:coder-2", "team:frontend", "swarm:phase-2-ui", "project:shop"}
    for level in (Level.PRIVATE, Level.TEAM, Level.SWARM, Level.PROJECT):
        mem.put(f"coder/{level.name}", 1, level=level, principal=coder)
    mem.put("decision", "PROCEED", level=Level.SYSTEM, principal=system)
    last = mem.put("theirs", 2, level=Level.SWARM, principal=coder)
    mem.sync(last)
    # Forged notifications on channels other listens to, naming scopes it may not read,
    # and plain garbage: none of it may turn into a delivery.
    forged = Notification(10_000, "agent:coder-1", "coder/PRIVATE", 1, "put")
    raw_redis.publish(mem.layout.channel("project:shop"), forged.to_json())
    raw_redis.publish(mem.layout.channel("agent:coder-2"), b"\xff not json")
    # JSON that parses but breaks the reader: an infinite seq (OverflowError), nesting
    # deeper than the recursion limit (RecursionError). Each used to end the feed.
    inf = b'{"seq":1e999,"scope":"agent:coder-2","key":"mine","level":1,"op":"put"}'
    raw_redis.publish(mem.layout.channel("agent:coder-2"), inf)
    raw_redis.publish(mem.layout.channel("agent:coder-2"), b"[" * 100_000)
    mem.put("mine", 3, level=Level.PRIVATE, principal=other)
    got = consume_until(sub, "mine")
    sub.close()
    assert [(c.scope, c.key) for c in got] == [
        ("project:shop", "coder/PROJECT"),
        ("agent:coder-2", "mine"),
    ]
    # The system principal sees SYSTEM; coder may not even ask for it (denied, audited).
    with Subscriber(mem, system, since=0) as sys_sub:
        assert [c.key for c in consume_until(sys_sub, "decision")] == ["decision"]
    with pytest.raises(AccessDenied) as denied:
        Subscriber(mem, coder, since=0, level=Level.SYSTEM)
    mem.sync(denied.value.audit_receipt)  # type: ignore[attr-defined]
    assert [r.actor for r in mem.store.audit_log() if r.event == "access_denied"] == ["coder-1"]


def test_a_subscriber_killed_mid_stream_resumes_with_no_gap_and_no_duplicate(
    make_mem: MakeMem, coder: Principal, other: Principal
) -> None:
    mem = make_mem()
    producer = threading.Thread(
        target=write_mixed, args=(mem, coder, other, 1000), kwargs={"tag": "run"}
    )
    first = Subscriber(mem, coder, since="indexer")
    producer.start()
    handled = [first.poll(timeout=15) for _ in range(400)]
    assert all(c is not None for c in handled)
    in_flight = first.poll(timeout=15)  # handed out; the consumer dies while handling it
    assert in_flight is not None
    # Killed: no close(), no commit; the producer keeps writing while nobody listens.
    resumed_at = Subscriber.saved_position(mem, coder, "indexer")
    second = Subscriber(mem, coder, since="indexer")
    assert second.position == resumed_at == handled[-1].seq  # type: ignore[union-attr]
    rest = consume_until(second, "run/done")
    second.close()
    producer.join()
    first.close(commit=False)  # release its connection; it saves nothing
    expected = feed(mem, coder)
    assert len(expected) == 1000
    delivered = [c.seq for c in handled if c is not None] + [c.seq for c in rest]
    assert delivered == expected  # no gap, no duplicate, in order
    assert rest[0].seq == in_flight.seq  # the change it died on comes again
    # A third start finds nothing left, and the positions never showed up as changes.
    third = Subscriber(mem, coder, since="indexer")
    assert third.position == expected[-1] and third.poll(timeout=0) is None
    third.close()
    assert not any(c.key.startswith(POSITION_PREFIX) for c in handled + rest if c)


def test_a_with_block_left_by_an_exception_leaves_its_change_to_come_again(
    make_mem: MakeMem, coder: Principal
) -> None:
    # The class promise: a change is consumed when the next is asked for, on commit(),
    # or when the ``with`` block is left without an exception. One whose handling raised
    # is delivered again to the next start; the one before it is not.
    mem = make_mem()
    for i in range(3):
        mem.put(f"k{i}", i, level=Level.SWARM, principal=coder)
    mem.sync(mem.put("k3", 3, level=Level.SWARM, principal=coder), timeout=10)
    with (
        pytest.raises(RuntimeError, match="handler failed"),
        Subscriber(mem, coder, since="jobs") as sub,
    ):
        done = sub.poll(timeout=5)
        failing = sub.poll(timeout=5)  # consumes ``done``
        assert done is not None and failing is not None
        raise RuntimeError("handler failed")
    assert Subscriber.saved_position(mem, coder, "jobs") == done.seq
    with Subscriber(mem, coder, since="jobs") as again:
        assert [c.key for c in consume_until(again, "k3")] == ["k1", "k2", "k3"]
    # Left without an exception: the last change handed out is consumed.
    with Subscriber(mem, coder, since="jobs") as after:
        assert after.poll(timeout=0) is None


def test_a_name_saved_under_a_level_filter_is_not_resumed_without_it(
    make_mem: MakeMem, coder: Principal
) -> None:
    # The filtered subscriber's position passed the PRIVATE change it never delivered; the
    # same name reopened without the filter resumed after it, and missed it for good.
    mem = make_mem()
    mem.put("secret", 1, level=Level.PRIVATE, principal=coder)
    mem.sync(mem.put("shared", 2, level=Level.SWARM, principal=coder), timeout=10)
    with Subscriber(mem, coder, since="watch", level=Level.SWARM) as sub:
        assert [c.key for c in consume_until(sub, "shared")] == ["shared"]
    with pytest.raises(ValidationError, match="saved with level=3, not level=None"):
        Subscriber(mem, coder, since="watch")
    with pytest.raises(ValidationError, match="saved with level=3, not level=1"):
        Subscriber(mem, coder, since="watch", level=Level.PRIVATE)
    with Subscriber(mem, coder, since="watch", level=Level.SWARM) as again:
        assert again.position == feed(mem, coder)[-1]  # the same filter resumes
    with Subscriber(mem, coder, since="watch", level="swarm") as named:  # by its name too
        assert named.level is Level.SWARM and named.position == feed(mem, coder)[-1]
    mem.sync(mem.put("shared2", 3, level=Level.SWARM, principal=coder), timeout=10)
    with Subscriber(mem, coder, since="by-name", level="swarm") as by_name:
        assert [c.key for c in consume_until(by_name, "shared2")] == ["shared", "shared2"]
    assert Subscriber.saved_position(mem, coder, "by-name") is not None  # saved, no crash
    with Subscriber(mem, coder, since="everything") as everything:  # another name: all
        assert [c.key for c in consume_until(everything, "shared")] == ["secret", "shared"]


def test_a_name_resumed_after_the_principal_gained_scopes_reads_their_history(
    make_mem: MakeMem, coder: Principal
) -> None:
    # The position recorded only the level filter: the same agent resuming it after it
    # joined a team and a swarm never got their changes older than the position.
    mem = make_mem()
    alone = Principal(agent_id=coder.agent_id, project="shop")  # before it joined
    mem.put("plan1", 1, level=Level.SWARM, principal=coder)
    mem.put("mine1", 1, level=Level.PRIVATE, principal=alone)
    mem.put("team1", 1, level=Level.TEAM, principal=coder)
    mem.put("plan2", 2, level=Level.SWARM, principal=coder)
    mem.sync(mem.put("shop1", 1, level=Level.PROJECT, principal=alone), timeout=10)
    with Subscriber(mem, alone, since="feed") as before:
        assert [c.key for c in consume_until(before, "shop1")] == ["mine1", "shop1"]
    consumed = Subscriber.saved_position(mem, alone, "feed")
    # Joined: the new scopes' history comes, in seq order, the old scopes' does not again.
    first = Subscriber(mem, coder, since="feed")
    assert first.backlog() == 3  # plan1, team1, plan2
    assert [first.poll(timeout=15).key for _ in range(2)] == ["plan1", "team1"]  # type: ignore[union-attr]
    assert first.poll(timeout=15).key == "plan2"  # type: ignore[union-attr]
    # Killed while handling plan2 (team1 was consumed and saved, all three are older
    # than the saved seq): no close, no commit. The restart must give plan2 again.
    assert Subscriber.saved_position(mem, coder, "feed") == consumed  # still the old seq
    first.close(commit=False)
    mem.put("mine2", 2, level=Level.PRIVATE, principal=coder)
    with Subscriber(mem, coder, since="feed") as resumed:
        assert [c.key for c in consume_until(resumed, "mine2")] == ["plan2", "mine2"]
    with Subscriber(mem, coder, since="feed") as again:
        assert again.position == feed(mem, coder)[-1] and again.poll(timeout=0) is None
    # Left the team and the swarm: it resumes (no error), with what it still reads.
    mem.sync(mem.put("team2", 2, level=Level.TEAM, principal=coder), timeout=10)
    with Subscriber(mem, alone, since="feed") as left:
        assert left.position == feed(mem, coder)[-2] and left.poll(timeout=0) is None
        mem.put("shop2", 2, level=Level.PROJECT, principal=alone)
        assert [c.key for c in consume_until(left, "shop2")] == ["shop2"]


def test_a_scope_left_and_joined_again_resumes_where_it_was_read(
    make_mem: MakeMem, coder: Principal
) -> None:
    # The position dropped a scope the principal left: joined again, the scope was read
    # from its beginning, and every change of it consumed before came again.
    mem = make_mem()
    alone = Principal(agent_id=coder.agent_id, project="shop")
    mem.put("team1", 1, level=Level.TEAM, principal=coder)
    mem.sync(mem.put("shop1", 1, level=Level.PROJECT, principal=coder), timeout=10)
    with Subscriber(mem, coder, since="feed") as member:
        assert [c.key for c in consume_until(member, "shop1")] == ["team1", "shop1"]
    mem.put("team2", 2, level=Level.TEAM, principal=coder)  # written while out of the team
    mem.sync(mem.put("shop2", 2, level=Level.PROJECT, principal=alone), timeout=10)
    with Subscriber(mem, alone, since="feed") as left:
        assert [c.key for c in consume_until(left, "shop2")] == ["shop2"]
    with Subscriber(mem, coder, since="feed") as back:
        assert back.backlog() == 1
        assert [c.key for c in consume_until(back, "team2")] == ["team2"]
        assert back.poll(timeout=0) is None


def test_a_gained_scope_is_read_without_rescanning_the_others_history(
    make_mem: MakeMem, coder: Principal
) -> None:
    # Catching up a gained scope read every row of the journal from 0 and skipped the
    # other scopes' rows, a batch per poll slice: backlog() counted the skipped rows
    # against its limit (it said 0 with changes waiting) and poll(timeout=0) found none.
    mem = make_mem()
    alone = Principal(agent_id=coder.agent_id, project="shop")
    mem.put("t-old", 1, level=Level.TEAM, principal=coder)
    for i in range(300):
        mem.put(f"shop{i:03d}", i, level=Level.PROJECT, principal=alone)
    mem.sync(mem.put("shop-last", 1, level=Level.PROJECT, principal=alone), timeout=30)
    with Subscriber(mem, alone, since="feed", batch_size=50) as before:
        assert len(consume_until(before, "shop-last")) == 301
    mem.sync(mem.put("t-new", 2, level=Level.TEAM, principal=coder), timeout=10)
    with Subscriber(mem, coder, since="feed", batch_size=50) as joined:
        assert joined.backlog(limit=10) == 2
        first = joined.poll(timeout=0)
        assert first is not None and first.key == "t-old"
        assert joined.backlog(limit=10) == 1
        second = joined.poll(timeout=0)
        assert second is not None and second.key == "t-new"
        assert joined.backlog() == 0


def test_a_gained_scopes_page_that_straddles_the_others_floor_moves_on(
    make_mem: MakeMem, coder: Principal
) -> None:
    # A gained scope is read alone up to the other scopes' floor. A full page that holds
    # rows on both sides of it must move the read to the floor: stopping at the last row
    # below it read the same page again on every scan, and the feed stalled there.
    mem = make_mem()
    alone = Principal(agent_id=coder.agent_id, project="shop")
    for i in range(5):
        mem.put(f"t-old{i}", i, level=Level.TEAM, principal=coder)
    for i in range(10):
        mem.put(f"shop{i}", i, level=Level.PROJECT, principal=alone)
    mem.sync(mem.put("shop-last", 1, level=Level.PROJECT, principal=alone), timeout=30)
    with Subscriber(mem, alone, since="feed") as before:
        assert len(consume_until(before, "shop-last")) == 11
    for i in range(5):
        mem.put(f"t-new{i}", i, level=Level.TEAM, principal=coder)
    mem.sync(mem.put("shop-new", 2, level=Level.PROJECT, principal=alone), timeout=30)
    # Pages of 3: the team's rows 1-3, then 4, 5 and the first after the floor.
    with Subscriber(mem, coder, since="feed", batch_size=3) as joined:
        got = consume_until(joined, "shop-new")
    assert [c.key for c in got] == [f"t-old{i}" for i in range(5)] + [
        f"t-new{i}" for i in range(5)
    ] + ["shop-new"]
    assert [c.seq for c in got] == sorted(c.seq for c in got)


def test_a_scope_left_for_one_read_less_far_keeps_its_progress(make_mem: MakeMem) -> None:
    # The position's seq came from the scopes read now only: moved from swarm s1 (read
    # to its 6th change) to s2 (read to its 1st), the position said seq 1 and s1 was read
    # again from there when the agent moved back.
    mem = make_mem()
    in_s1, in_s2 = Principal(agent_id="a", swarm="s1"), Principal(agent_id="a", swarm="s2")
    mem.sync(mem.put("s2-old", 0, level=Level.SWARM, principal=in_s2), timeout=10)
    for i in range(5):
        mem.put(f"s1-{i}", i, level=Level.SWARM, principal=in_s1)
    mem.sync(mem.put("s1-last", 5, level=Level.SWARM, principal=in_s1), timeout=10)
    with Subscriber(mem, in_s1, since="f", level=Level.SWARM) as first:
        assert len(consume_until(first, "s1-last")) == 6
    with Subscriber(mem, in_s2, since="f", level=Level.SWARM) as moved:
        assert [c.key for c in consume_until(moved, "s2-old")] == ["s2-old"]
    with Subscriber(mem, in_s1, since="f", level=Level.SWARM) as back:
        assert back.backlog() == 0 and back.poll(timeout=0) is None


def test_a_scope_left_while_behind_and_joined_again_resumes_where_it_was_read(
    make_mem: MakeMem, coder: Principal
) -> None:
    # A gained scope, read part of the way (its "behind" seq), then left, then joined
    # again with one more gained scope: three scopes each read from its own floor. The
    # scope left behind was kept at the position's seq instead of its own, and came back
    # with its unread changes skipped; with the window bounded by the highest floor
    # instead of the next, the scope gained last was read past the team's floor alone,
    # and the team's unread changes were skipped too.
    mem = make_mem()
    alone = Principal(agent_id=coder.agent_id, project="shop")
    teamed = Principal(agent_id=coder.agent_id, team=coder.team, project="shop")
    mem.put("plan1", 1, level=Level.SWARM, principal=coder)
    for key in ("t1", "t2", "t3"):
        mem.put(key, key, level=Level.TEAM, principal=coder)
    mem.sync(mem.put("shop1", 1, level=Level.PROJECT, principal=alone), timeout=10)
    with Subscriber(mem, alone, since="feed") as before:
        assert [c.key for c in consume_until(before, "shop1")] == ["shop1"]
    joined = Subscriber(mem, teamed, since="feed")
    assert [c.key for c in consume_until(joined, "t2")] == ["t1", "t2"]
    joined.close(commit=False)  # t1 consumed and saved, t2 not: the team is behind at t1
    with Subscriber(mem, alone, since="feed") as left:
        mem.sync(mem.put("shop2", 2, level=Level.PROJECT, principal=alone), timeout=10)
        assert [c.key for c in consume_until(left, "shop2")] == ["shop2"]
    with Subscriber(mem, coder, since="feed") as back:
        assert back.backlog() == 3 and back.backlog(limit=2) == 2
        assert [c.key for c in consume_until(back, "t3")] == ["plan1", "t2", "t3"]
        assert back.poll(timeout=0) is None


def test_another_scopes_key_under_the_position_prefix_is_delivered(
    make_mem: MakeMem, coder: Principal, other: Principal
) -> None:
    # Only the principal's own PRIVATE keys under _subscriber/ are its bookkeeping. A
    # record another agent put at such a key in a shared scope was skipped as one.
    mem = make_mem()
    teammate = Principal(agent_id="coder-2", team=coder.team, swarm=coder.swarm)
    mem.put(POSITION_PREFIX + "x", "shared", level=Level.SWARM, principal=teammate)
    mem.put(POSITION_PREFIX + "y", "mine", level=Level.PRIVATE, principal=coder)
    mem.sync(mem.put("last", 1, level=Level.SWARM, principal=coder), timeout=10)
    with Subscriber(mem, coder, since=0) as sub:
        assert sub.backlog() == 2
        got = consume_until(sub, "last")
    assert [(c.scope, c.key) for c in got] == [
        ("swarm:phase-1-auth", POSITION_PREFIX + "x"),
        ("swarm:phase-1-auth", "last"),
    ]
    # Live too: its notification alone (no periodic re-read here) brings it. Taken for a
    # position save's and dropped, it waited for the next other change.
    with Subscriber(mem, coder, since=0, recheck_interval=3600) as live:
        assert len(consume_until(live, "last")) == 2
        mem.put(POSITION_PREFIX + "z", "shared", level=Level.SWARM, principal=teammate)
        assert [c.key for c in consume_until(live, POSITION_PREFIX + "z")] == [
            POSITION_PREFIX + "z"
        ]


def test_a_live_change_is_delivered_by_its_notification(
    make_mem: MakeMem, coder: Principal
) -> None:
    # No periodic re-read (recheck_interval): the notification alone must send the
    # subscriber to the journal, the first change after its catch-up (the next seq) too.
    mem = make_mem()
    with Subscriber(mem, coder, since=0, recheck_interval=3600) as sub:
        assert sub.poll(timeout=0) is None  # caught up (empty)
        for key in ("first", "second"):
            mem.put(key, 1, level=Level.SWARM, principal=coder)
            assert [c.key for c in consume_until(sub, key)] == [key]


def test_backlog_counts_past_one_journal_page(make_mem: MakeMem, coder: Principal) -> None:
    # backlog() reads the journal a batch_size page at a time: it stopped after the first.
    # A limit of 0 counts nothing (it is an int >= 0, as documented: "at most limit").
    mem = make_mem()
    for i in range(7):
        r = mem.put(f"k{i}", i, level=Level.SWARM, principal=coder)
    mem.sync(r, timeout=10)
    with Subscriber(mem, coder, since=0, batch_size=2) as sub:
        assert sub.backlog() == 7 and sub.backlog(limit=5) == 5
        assert sub.backlog(limit=0) == 0
        with pytest.raises(ValidationError, match="limit"):
            sub.backlog(limit=-1)


def test_backlog_after_its_memory_is_closed_says_closed_not_unavailable(
    make_mem: MakeMem, coder: Principal
) -> None:
    # backlog() on a closed DualMemory raised StoreUnavailable ("read ... failed: Cannot
    # operate on a closed database"): an outage, which a caller retries forever. Like
    # every read, and like poll(), it says the memory is closed.
    mem = make_mem()
    mem.sync(mem.put("k", 1, level=Level.SWARM, principal=coder), timeout=10)
    sub = Subscriber(mem, coder, since=0)
    assert sub.backlog() == 1
    mem.close()
    for read in (sub.backlog, lambda: sub.poll(timeout=0)):
        with pytest.raises(DualMemError, match="this DualMemory is closed") as closed:
            read()
        assert not isinstance(closed.value, StoreUnavailable)
    sub.close()


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ({"seq": True}, "is not a journal seq"),
        ({"seq": -1}, "is not a journal seq"),
        ({"seq": "3"}, "is not a journal seq"),
        ([3], "is not a journal seq"),
        ({"seq": 1, "scopes": "agent:coder-1"}, "has no valid scopes"),
        ({"seq": 1, "scopes": [1]}, "has no valid scopes"),
        ({"seq": 1, "scopes": [], "behind": []}, "has no valid scopes"),
        ({"seq": 1, "scopes": [], "behind": {"team:backend": 2}}, "has no valid scopes"),
        ({"seq": 1, "scopes": [], "behind": {"team:backend": True}}, "has no valid scopes"),
        ({"seq": 1, "scopes": [], "behind": {"team:backend": -1}}, "has no valid scopes"),
    ],
)
def test_a_saved_position_that_is_not_one_is_refused(
    make_mem: MakeMem, coder: Principal, value: object, why: str
) -> None:
    # A position is the principal's own PRIVATE record, which it can overwrite with
    # anything. Taken as it was, True resumed after seq 1, and a scope "behind" past the
    # position's seq skipped that scope's changes up to there.
    mem = make_mem()
    mem.sync(mem.put("k", 1, level=Level.SWARM, principal=coder), timeout=10)
    mem.sync(mem.put(POSITION_PREFIX + "bad", value, level=Level.PRIVATE, principal=coder))
    with pytest.raises(ValidationError, match=why):
        Subscriber(mem, coder, since="bad")


@pytest.mark.real_redis
def test_a_saved_position_is_read_from_sqlite_while_redis_is_down(
    own_redis_server: RedisServer, tmp_path: Path, keyfile: Path, coder: Principal
) -> None:
    # saved_position() reads the newest copy (the Redis cache entry) and, with Redis
    # down, SQLite's: an operator looking at a consumer's progress during an outage got
    # None, as if nothing was ever consumed.
    mem = DualMemory(
        redis_url=own_redis_server.url, db_path=str(tmp_path / "p.db"), keyring=str(keyfile)
    )
    try:
        mem.sync(mem.put("k", 1, level=Level.SWARM, principal=coder), timeout=10)
        with Subscriber(mem, coder, since="feed") as sub:
            assert [c.key for c in consume_until(sub, "k")] == ["k"]
            sub.commit()
            position = sub.position
        wait_until(
            lambda: mem.get(POSITION_PREFIX + "feed", level=Level.PRIVATE, principal=coder),
            what="the position in SQLite",
        )
        own_redis_server.kill()
        assert Subscriber.saved_position(mem, coder, "feed") == position
    finally:
        mem.close(timeout=1)


def test_backlog_does_not_count_position_saves_against_its_limit(
    make_mem: MakeMem, coder: Principal
) -> None:
    # The subscriber's own position saves used up backlog's limit: 0 with a change waiting.
    mem = make_mem()
    other = Subscriber(mem, coder, since="other", level=Level.PRIVATE)
    with Subscriber(mem, coder, since="feed") as sub:
        for i in range(30):  # each consumed change is one position save of "other"
            mem.sync(mem.put(f"k{i}", i, level=Level.PRIVATE, principal=coder), timeout=10)
        assert len(consume_until(other, "k29")) == 30
        other.close()
        assert len(consume_until(sub, "k29")) == 30
        mem.sync(mem.put("waiting", 1, level=Level.SWARM, principal=coder), timeout=10)
        assert sub.backlog(limit=5) == 1


def test_a_position_saved_without_its_scopes_resumes_at_its_seq(
    make_mem: MakeMem, coder: Principal
) -> None:
    # Positions saved before the scopes were recorded keep resuming where they were, in
    # every scope the principal reads now (they cannot tell which scopes were new).
    mem = make_mem()
    mem.put("plan1", 1, level=Level.SWARM, principal=coder)
    mem.sync(mem.put("mine1", 1, level=Level.PRIVATE, principal=coder), timeout=10)
    seq = feed(mem, coder)[-1]
    old_format = {"seq": seq, "saved_at_us": 1, "level": None}
    mem.sync(mem.put(POSITION_PREFIX + "old", old_format, level=Level.PRIVATE, principal=coder))
    mem.put("plan2", 2, level=Level.SWARM, principal=coder)
    with Subscriber(mem, coder, since="old") as sub:
        assert sub.position == seq
        assert [c.key for c in consume_until(sub, "plan2")] == ["plan2"]
    with Subscriber(mem, coder, since="old") as again:  # saved with its scopes now
        assert again.position == feed(mem, coder)[-1] and again.poll(timeout=0) is None


_CHILD = r"""
import sys
from acl import Principal
from dualmem import DualMemory, Subscriber

url, db, keys, out, name = sys.argv[1:6]
me = Principal(agent_id="coder-1", team="backend", swarm="phase-1-auth", project="shop")
mem = DualMemory(redis_url=url, db_path=db, keyring=keys, worker=False)
sub = Subscriber(mem, me, since=name)
print("subscribed", flush=True)
with open(out, "a", buffering=1) as fh:
    for change in sub:
        fh.write(f"{change.seq}\n")  # "handling" the change
        if change.key == "run/done":
            break
sub.close()
mem.close()
"""


@pytest.mark.real_redis
def test_a_subscriber_process_killed_with_sigkill_resumes_exactly(
    redis_server: RedisServer,
    tmp_path: Path,
    keyfile: Path,
    coder: Principal,
    other: Principal,
) -> None:
    redis_server.client().flushall()
    db = tmp_path / "sub.db"
    mem = DualMemory(redis_url=redis_server.url, db_path=str(db), keyring=str(keyfile))

    def child(out: Path) -> subprocess.Popen[str]:
        args = [redis_server.url, str(db), str(keyfile), str(out), "indexer"]
        proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, *args], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == "subscribed"
        return proc

    def lines(path: Path) -> list[int]:
        return [int(x) for x in path.read_text().split()] if path.exists() else []

    out1, out2 = tmp_path / "first.txt", tmp_path / "second.txt"
    first = child(out1)
    producer = threading.Thread(
        target=write_mixed, args=(mem, coder, other, 1000), kwargs={"tag": "run"}
    )
    producer.start()
    try:
        wait_until(lambda: len(lines(out1)) >= 300, timeout=60, what="300 changes handled")
        first.send_signal(signal.SIGKILL)  # wherever it is: between changes, or mid-way
        first.wait(10)
    finally:
        producer.join()
    mem.sync(mem.put("barrier", 0, level=Level.SWARM, principal=other))
    saved = Subscriber.saved_position(mem, coder, "indexer")
    second = child(out2)
    assert second.wait(60) == 0
    expected = feed(mem, coder)
    mem.close()
    assert len(expected) == 1000
    before, after = lines(out1), lines(out2)
    assert saved is not None and before == expected[: len(before)]  # no gap before the kill
    consumed = expected.index(saved) + 1
    # Resumed right after the saved position: together nothing is missing or doubled ...
    assert expected[:consumed] + after == expected
    # ... and the only change handled twice is one the process was killed while handling.
    assert len(before) - consumed in (0, 1)


def test_a_lost_notification_costs_latency_not_a_change(
    make_mem: MakeMem, coder: Principal, raw_redis: redis.Redis
) -> None:
    mem = make_mem(worker=False)
    stream = mem.layout.stream(0)
    worker = Worker(raw_redis, mem.store, mem.settings.replace(consumer="w"))

    def commit_without_publishing(keys: list[str]) -> None:
        # A worker that died between COMMIT and PUBLISH: the batch is in SQLite, and the
        # redelivery is recognised as a duplicate, so no notification is ever sent.
        for k in keys:
            mem.put(k, 1, level=Level.SWARM, principal=coder)
        entries = [StreamEntry(0, sid.decode(), f) for sid, f in raw_redis.xrange(stream)]
        assert mem.store.apply(entries).applied == len(keys)
        while worker.step():
            pass

    # Periodic re-check: nothing else happens, the journal is re-read anyway.
    sub = Subscriber(mem, coder, since=0, recheck_interval=0.05)
    assert sub.poll(timeout=0) is None  # caught up (empty)
    commit_without_publishing(["a", "b", "c"])
    assert [c.key for c in consume_until(sub, "c")] == ["a", "b", "c"]
    sub.close()
    # No periodic re-check: the next notification's seq jumps past the lost ones, which
    # sends the subscriber back to the journal.
    sub = Subscriber(mem, coder, since=sub.position, recheck_interval=3600)
    assert sub.poll(timeout=0) is None
    commit_without_publishing(["d", "e"])
    mem.put("f", 1, level=Level.SWARM, principal=coder)
    while worker.step():
        pass
    assert [c.key for c in consume_until(sub, "f")] == ["d", "e", "f"]
    sub.close()


@contextlib.contextmanager
def unprompted(
    url: str, tmp_path: Path, keyfile: Path, who: Principal
) -> Iterator[tuple[DualMemory, Subscriber]]:
    """A DualMemory on ``url`` and an unnamed subscriber of ``who`` that never reads the
    journal again of its own accord (``recheck_interval`` an hour): only notifications
    and reconnects send it there. Both closed after."""
    mem = DualMemory(redis_url=url, db_path=str(tmp_path / "m.db"), keyring=str(keyfile))
    try:
        sub = Subscriber(mem, who, since=0, recheck_interval=3600)
        try:
            yield mem, sub
        finally:
            sub.close()
    finally:
        mem.close(timeout=2)


@pytest.mark.real_redis
def test_resubscribes_after_its_connection_is_killed(
    redis_server: RedisServer, tmp_path: Path, keyfile: Path, coder: Principal
) -> None:
    redis_server.client().flushall()
    # No periodic re-read of the journal: only the reconnect may send the subscriber back
    # to it. redis-py reconnects a dropped pub/sub connection by itself inside
    # get_message, and subscribes again, with no error for the subscriber to see: every
    # change published while the connection was down waited for the next recheck.
    with unprompted(redis_server.url, tmp_path, keyfile, coder) as (mem, sub):
        mem.put("before", 1, level=Level.SWARM, principal=coder)
        assert [c.key for c in consume_until(sub, "before")] == ["before"]
        killed = redis_server.client().client_kill_filter(_type="pubsub")
        assert killed >= 1
        for i in range(20):
            last = mem.put(f"during/{i}", i, level=Level.SWARM, principal=coder)
        mem.sync(last, timeout=10)  # all committed, all published to no one
        got = consume_until(sub, "during/19")
        assert [c.key for c in got] == [f"during/{i}" for i in range(20)]
        mem.put("after", 1, level=Level.SWARM, principal=coder)
        assert [c.key for c in consume_until(sub, "after")] == ["after"]


@pytest.mark.real_redis
def test_changes_committed_before_it_subscribes_again_are_read_at_once(
    own_redis_server: RedisServer, tmp_path: Path, keyfile: Path, coder: Principal
) -> None:
    # Redis went down and the subscriber lost its pub/sub connection for good; once Redis
    # is back it subscribes again itself. A change committed (and published to no one)
    # before that must be read from the journal then, not at the next recheck (here: an
    # hour away).
    srv = own_redis_server
    with unprompted(srv.url, tmp_path, keyfile, coder) as (mem, sub):
        assert sub.poll(timeout=0) is None  # caught up (empty)
        srv.stop()
        assert sub.poll(timeout=0.5) is None  # its connection lost, no Redis to subscribe to
        srv.start()
        # A pooled connection idle this long is checked before a put is sent on it: the
        # put does not go out on a socket the restart closed (a StoreUnavailable then).
        time.sleep(_IDLE_PING_S + 0.1)
        mem.sync(mem.put("back", 1, level=Level.SWARM, principal=coder), timeout=10)
        assert [c.key for c in consume_until(sub, "back")] == ["back"]


@pytest.mark.real_redis
def test_while_redis_is_down_it_subscribes_again_with_backoff(
    own_redis_server: RedisServer,
    tmp_path: Path,
    keyfile: Path,
    coder: Principal,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Each attempt to subscribe again waits twice as long as the one before (up to 2 s).
    # Without the wait, a poll tried again at once, hundreds of times a second, for as
    # long as Redis was down. A bound from above only: a slow machine makes fewer tries.
    srv = own_redis_server
    with unprompted(srv.url, tmp_path, keyfile, coder) as (_, sub):
        srv.stop()
        with caplog.at_level("WARNING", logger="dualmem.subscriber"):
            assert sub.poll(timeout=1.0) is None
        tries = [r for r in caplog.records if "pub/sub lost" in r.getMessage()]
        # 0.05 + 0.1 + 0.2 + 0.4 s of waits fit in the second: five tries at most.
        assert 1 <= len(tries) <= 6, [r.getMessage() for r in tries]


@pytest.mark.real_redis
def test_after_it_subscribed_again_the_next_outage_backs_off_from_the_start(
    own_redis_server: RedisServer,
    tmp_path: Path,
    keyfile: Path,
    coder: Principal,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A subscribe that goes through ends the backoff: the wait the last outage had grown
    # to was kept, so after a second outage the first try to subscribe again came that
    # much later (up to 2 s), and changes published meanwhile with it.
    srv = own_redis_server
    with unprompted(srv.url, tmp_path, keyfile, coder) as (mem, sub):
        channel = mem.layout.channel(sub.scopes[0])
        srv.stop()
        assert sub.poll(timeout=1.0) is None  # the backoff grows through the outage
        srv.start()
        listener = srv.client()

        def subscribed_again() -> bool:
            assert sub.poll(timeout=0.1) is None
            return bool(listener.pubsub_numsub(channel)[0][1])

        wait_until(subscribed_again, what="the subscriber to subscribe again")
        caplog.clear()
        srv.stop()
        with caplog.at_level("WARNING", logger="dualmem.subscriber"):
            for _ in range(100):
                lost = [r.getMessage() for r in caplog.records if "pub/sub lost" in r.getMessage()]
                if lost:
                    break
                assert sub.poll(timeout=0.1) is None
            else:
                pytest.fail("the subscriber never saw its connection go")
        assert "re-subscribing in 0.05s" in lost[0], lost


@pytest.mark.real_redis
def test_while_its_position_cannot_be_saved_nothing_more_is_handed_out(
    own_redis_server: RedisServer, tmp_path: Path, keyfile: Path, coder: Principal
) -> None:
    # Redis went down: poll went on delivering from SQLite while no position could be
    # saved, and a consumer killed then got every change it had consumed since again.
    srv = own_redis_server
    mem = DualMemory(redis_url=srv.url, db_path=str(tmp_path / "m.db"), keyring=str(keyfile))
    subs: list[Subscriber] = []

    def start() -> Subscriber:
        subs.append(Subscriber(mem, coder, since="feed", recheck_interval=0.2))
        return subs[-1]

    try:
        for i in range(10):
            receipt = mem.put(f"k{i}", i, level=Level.SWARM, principal=coder)
        mem.sync(receipt, timeout=10)
        expected = feed(mem, coder)
        first = start()
        assert [first.poll(timeout=5).seq for _ in range(3)] == expected[:3]  # type: ignore[union-attr]
        srv.stop()
        began = time.monotonic()
        # expected[2] is consumed, its save fails: nothing more comes, the timeouts run out.
        assert [first.poll(timeout=0.3) for _ in range(3)] == [None, None, None]
        assert time.monotonic() - began >= 0.8
        assert first.saving_stalled
        srv.start()  # the consumer was killed while Redis was down: no close()
        second = start()
        assert second.position == expected[1]  # only the change whose save failed comes back
        assert [second.poll(timeout=5).seq for _ in range(2)] == expected[2:4]  # type: ignore[union-attr]
        srv.stop()
        assert second.poll(timeout=0.3) is None  # expected[3] consumed, not saved
        srv.start()
        # The save is retried and goes through; delivery resumes where it stopped.
        assert [second.poll(timeout=10).seq for _ in range(2)] == expected[4:6]  # type: ignore[union-attr]
        assert not second.saving_stalled
        third = start()  # killed while handling expected[5]
        assert third.position == expected[4]
        assert [third.poll(timeout=5).seq for _ in range(4)] == expected[5:9]  # type: ignore[union-attr]
    finally:
        for sub in subs:
            sub.close(commit=False)
        mem.close(timeout=2)


def committed_then_no_worker(
    make_mem: MakeMem, coder: Principal, *, changes: int, max_backlog: int
) -> DualMemory:
    """A memory with ``changes`` committed SWARM changes (``k0``, ``k1``, ...), no worker,
    and a stream bound of ``max_backlog``."""
    writer = make_mem()
    for i in range(changes):
        receipt = writer.put(f"k{i}", i, level=Level.SWARM, principal=coder)
    writer.sync(receipt, timeout=10)
    writer.close()
    return make_mem(worker=False, max_backlog=max_backlog)


def test_a_subscriber_whose_saves_meet_backpressure_pauses_and_says_so(
    make_mem: MakeMem, coder: Principal
) -> None:
    # Redis is up, the stream is at max_backlog and no worker drains it: the position's
    # save is refused (Backpressure), delivery pauses, saving_stalled says why; a worker
    # that drains the stream lets it resume.
    mem = committed_then_no_worker(make_mem, coder, changes=3, max_backlog=3)
    expected = feed(mem, coder)
    for i in range(3):
        mem.put(f"fill{i}", i, level=Level.SWARM, principal=coder)
    with Subscriber(mem, coder, since="paused") as sub:
        assert sub.poll(timeout=5).seq == expected[0]  # type: ignore[union-attr]
        assert sub.poll(timeout=0.3) is None  # expected[0] consumed, its save refused
        assert sub.saving_stalled
        make_mem()  # a worker drains the stream
        assert sub.poll(timeout=15).seq == expected[1]  # type: ignore[union-attr]
        assert not sub.saving_stalled


def one_change_and_a_full_stream(make_mem: MakeMem, coder: Principal) -> DualMemory:
    """A memory with one committed change, no worker, and a stream at ``max_backlog``: a
    subscriber's position save after that change meets ``Backpressure``."""
    mem = committed_then_no_worker(make_mem, coder, changes=1, max_backlog=1)
    mem.put("fill", 1, level=Level.SWARM, principal=coder)  # the stream is full
    return mem


def test_while_its_position_cannot_be_saved_the_save_is_retried_with_backoff(
    make_mem: MakeMem, coder: Principal, caplog: pytest.LogCaptureFixture
) -> None:
    # poll's promise: a failed save is retried with backoff (each wait twice the one
    # before, up to 2 s). Retried every 0.05 s instead, a stalled subscriber sent a put
    # to a Redis at max_backlog twenty times a second for as long as no worker drained
    # it. A bound from above only: a slow machine makes fewer tries.
    mem = one_change_and_a_full_stream(make_mem, coder)
    with Subscriber(mem, coder, since="paused") as sub:
        assert sub.poll(timeout=5) is not None
        with caplog.at_level("DEBUG", logger="dualmem.subscriber"):
            assert sub.poll(timeout=1.0) is None  # its save refused, then retried
        assert sub.saving_stalled
        tries = [r for r in caplog.records if "still not saved" in r.getMessage()]
        # Retries 0.05, 0.15, 0.35 and 0.75 s after the refused save fit in the second.
        assert 1 <= len(tries) <= 6, [r.getMessage() for r in tries]


def test_a_stalled_save_warns_once_when_its_retries_reach_their_longest_wait(
    make_mem: MakeMem, coder: Principal, caplog: pytest.LogCaptureFixture
) -> None:
    # Once the retries of a refused save wait their longest (2 s), one warning says that
    # delivery is paused; the retries after it go on quietly. A warning at every retry
    # (every 2 s for as long as no worker drains the stream) buried the log. Polled until
    # two retries at the longest wait are logged, however slow the machine is.
    mem = one_change_and_a_full_stream(make_mem, coder)

    def at_longest_wait() -> list[str]:
        said = [r.getMessage() for r in caplog.records]
        return [m for m in said if "retrying every 2s" in m or "next try in 2.00s" in m]

    with Subscriber(mem, coder, since="paused") as sub:
        assert sub.poll(timeout=5) is not None
        with caplog.at_level("DEBUG", logger="dualmem.subscriber"):
            for _ in range(100):
                if len(at_longest_wait()) >= 2:
                    break
                assert sub.poll(timeout=0.5) is None  # its save refused, retried
            else:
                pytest.fail(f"no two retries at the longest wait: {at_longest_wait()}")
        assert sub.saving_stalled
    paused = [m for m in at_longest_wait() if "delivery paused" in m]
    assert len(paused) == 1, at_longest_wait()


def test_a_save_that_goes_through_ends_the_stall_and_the_next_stall_starts_over(
    make_mem: MakeMem, coder: Principal, raw_redis: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    # A save that goes through ends a stall, commit()'s too: saving_stalled said True
    # after commit() had saved the position, until the next poll. And each stall is
    # retried from the shortest wait: the wait the last stall had reached was kept, so a
    # later stall's first retry came that much later (up to 2 s) than its own backoff.
    mem = committed_then_no_worker(make_mem, coder, changes=2, max_backlog=1)
    expected = feed(mem, coder)

    def drained() -> bool:
        return all(raw_redis.xlen(stream) == 0 for stream in mem.layout.streams())

    mem.put("fill", 1, level=Level.SWARM, principal=coder)  # the stream is full
    with Subscriber(mem, coder, since="paused") as sub:
        assert sub.poll(timeout=5).seq == expected[0]  # type: ignore[union-attr]
        assert sub.poll(timeout=0.3) is None and sub.saving_stalled  # its save refused
        drainer = make_mem()  # a worker drains the stream
        wait_until(drained, what="the stream drained")
        sub.commit()  # the save, by hand this time: it goes through
        assert not sub.saving_stalled
        assert Subscriber.saved_position(mem, coder, "paused") == expected[0]
        assert sub.poll(timeout=5).seq == expected[1]  # type: ignore[union-attr]
        wait_until(drained, what="the save drained")
        drainer.close()  # no worker again
        mem.put("fill2", 2, level=Level.SWARM, principal=coder)  # the stream is full again
        with caplog.at_level("DEBUG", logger="dualmem.subscriber"):
            for _ in range(100):
                retries = [r.getMessage() for r in caplog.records if "still not" in r.getMessage()]
                if retries:
                    break
                assert sub.poll(timeout=0.5) is None  # expected[1] consumed, its save refused
            else:
                pytest.fail("the refused save was never retried")
        assert sub.saving_stalled
        # The first retry failed after the shortest wait (0.05 s): the next waits 0.1 s.
        assert "next try in 0.10s" in retries[0], retries


def test_many_open_subscribers_leave_connections_for_puts(
    make_mem: MakeMem, coder: Principal
) -> None:
    # Each subscriber's pub/sub connection came from the pool puts use, capped at 100 by
    # redis-py: with 100 open, every put and the 101st subscriber raised StoreUnavailable
    # ("Too many connections") from a healthy Redis.
    mem = make_mem()
    subs = [
        Subscriber(mem, Principal(agent_id=f"agent-{i}", swarm=coder.swarm), since=0)
        for i in range(150)
    ]
    try:
        receipt = mem.put("after-150", 1, level=Level.SWARM, principal=coder)
        assert mem.get("after-150", level=Level.SWARM, principal=coder, fresh=True) == 1
        mem.sync(receipt, timeout=10)
        assert [c.key for c in consume_until(subs[-1], "after-150")] == ["after-150"]
    finally:
        for sub in subs:
            sub.close()


def test_positions_are_saved_through_the_put_path_as_private_bookkeeping(
    make_mem: MakeMem, coder: Principal
) -> None:
    mem = make_mem()
    for i in range(25):
        mem.put(f"k{i}", i, level=Level.SWARM, principal=coder)
    watcher = Subscriber(mem, coder, since="watcher", commit_every=10)
    got = consume_until(watcher, "k24")
    assert Subscriber.saved_position(mem, coder, "watcher") == got[19].seq  # every 10th
    watcher.commit()
    assert Subscriber.saved_position(mem, coder, "watcher") == got[24].seq
    watcher.close()
    mem.sync(mem.put("barrier", 0, level=Level.SWARM, principal=coder))  # saves committed
    # Saved as the principal's own PRIVATE record, through put (journal, encrypted).
    key = POSITION_PREFIX + "watcher"
    saves = mem.history(key, level=Level.PRIVATE, principal=coder)
    assert [h.op for h in saves] == ["put", "put", "put"]  # positions 10, 20, 25
    assert saves[0].scope == "agent:coder-1" and saves[0].level is Level.PRIVATE
    # Another subscriber of the same principal sees the 25 changes, not the saves.
    with Subscriber(mem, coder, since="auditor") as auditor:
        assert [c.key for c in consume_until(auditor, "k24")] == [f"k{i}" for i in range(25)]
    # A named subscriber started afresh reads history; an int since skips what it names.
    assert Subscriber.saved_position(mem, coder, "new") is None
    with Subscriber(mem, coder, since=got[9].seq) as late:
        change = late.poll(timeout=15)
        assert change is not None and change.key == "k10"


def test_a_resumed_subscriber_that_consumes_nothing_saves_nothing(
    make_mem: MakeMem, coder: Principal
) -> None:
    # A position is saved when a change is consumed. Counted from 0 instead of from the
    # position it resumed, an idle consumer restarted wrote its unchanged position again
    # at every close: a journal row (and a stream entry) per restart, for nothing.
    mem = make_mem()
    mem.sync(mem.put("k", 1, level=Level.SWARM, principal=coder), timeout=10)
    with Subscriber(mem, coder, since="idle") as first:
        assert [c.key for c in consume_until(first, "k")] == ["k"]
    for _ in range(3):
        with Subscriber(mem, coder, since="idle") as again:
            assert again.poll(timeout=0) is None
    mem.sync(mem.put("barrier", 0, level=Level.SWARM, principal=coder))  # saves committed
    saves = mem.history(POSITION_PREFIX + "idle", level=Level.PRIVATE, principal=coder)
    assert [h.op for h in saves] == ["put"]


def test_a_position_past_the_journal_end_does_not_skip_a_new_databases_changes(
    make_mem: MakeMem, coder: Principal, tmp_path: Path
) -> None:
    old = make_mem()
    for i in range(5):
        old.put(f"old{i}", i, level=Level.SWARM, principal=coder)
    with Subscriber(old, coder, since="mirror") as sub:
        consume_until(sub, "old4")
    old.close()
    # The database is replaced (restored from an older backup, say) while Redis still
    # holds the cache entry of the saved position.
    new = make_mem(db_path=str(tmp_path / "restored.db"))
    assert Subscriber.saved_position(new, coder, "mirror") == 5
    new.put("new0", 0, level=Level.SWARM, principal=coder)
    new.sync(new.put("new1", 1, level=Level.SWARM, principal=coder))  # before it starts
    with Subscriber(new, coder, since="mirror") as sub:
        assert sub.position == 0  # a different history: from its beginning
        new.put("new2", 2, level=Level.SWARM, principal=coder)
        assert [c.key for c in consume_until(sub, "new2")] == ["new0", "new1", "new2"]


def test_a_restored_database_that_grew_past_the_saved_position_is_read_from_its_start(
    make_mem: MakeMem, coder: Principal, tmp_path: Path
) -> None:
    old = make_mem()
    for i in range(3):
        old.put(f"old{i}", i, level=Level.SWARM, principal=coder)
    with Subscriber(old, coder, since="mirror") as sub:
        consume_until(sub, "old2")
    saved = Subscriber.saved_position(old, coder, "mirror")
    assert saved is not None
    old.close()
    # Another database (restored from an older backup, say) grows past the saved seq
    # with different changes before the subscriber comes back: "past the end" no longer
    # tells, and resuming at the saved seq used to skip the new history up to it.
    new = make_mem(db_path=str(tmp_path / "restored.db"))
    last = None
    for i in range(saved + 2):
        last = new.put(f"new{i}", i, level=Level.SWARM, principal=coder)
    assert last is not None
    new.sync(last)
    assert new.store.last_seq() > saved
    with Subscriber(new, coder, since="mirror") as sub:
        assert sub.position == 0  # the change at the saved seq is not the consumed one
        keys = [c.key for c in consume_until(sub, f"new{saved + 1}")]
    assert keys == [f"new{i}" for i in range(saved + 2)]


def test_close_from_another_thread_ends_iteration(make_mem: MakeMem, coder: Principal) -> None:
    mem = make_mem()
    sub = Subscriber(mem, coder, since="loop")
    seen: list[str] = []
    done = threading.Event()

    def run() -> None:
        seen.extend(c.key for c in sub)  # blocks until close()
        done.set()

    thread = threading.Thread(target=run)
    thread.start()
    mem.put("one", 1, level=Level.SWARM, principal=coder)
    wait_until(lambda: seen == ["one"], what="the change to arrive")
    sub.close()
    thread.join(15)
    assert done.is_set() and not thread.is_alive()
    assert sub.poll(timeout=0) is None  # closed stays closed
    # The change was consumed (the loop asked for the next one): a restart skips it.
    assert Subscriber.saved_position(mem, coder, "loop") == feed(mem, coder)[-1]


def test_a_poll_after_close_without_commit_consumes_nothing(
    make_mem: MakeMem, coder: Principal
) -> None:
    # close(commit=False) leaves the change last handed out to be delivered again. A
    # poll() after the close must not consume it on its way to returning None (and save
    # the position past it): the restart would skip it.
    mem = make_mem()
    for i in range(2):
        receipt = mem.put(f"k{i}", i, level=Level.SWARM, principal=coder)
    mem.sync(receipt, timeout=10)
    sub = Subscriber(mem, coder, since="feed")
    handed = sub.poll(timeout=5)
    assert handed is not None and handed.key == "k0"
    sub.close(commit=False)
    assert sub.poll(timeout=0) is None
    assert Subscriber.saved_position(mem, coder, "feed") is None
    with Subscriber(mem, coder, since="feed") as again:
        assert [c.key for c in consume_until(again, "k1")] == ["k0", "k1"]


@pytest.mark.parametrize("how", ["close(commit=False)", "an exception"])
def test_a_stop_without_commit_leaves_only_the_last_change_to_come_again(
    make_mem: MakeMem, coder: Principal, how: str
) -> None:
    # With commit_every=10 the position is saved every 10th consumed change. A stop that
    # does not commit (close(commit=False), a with block left by an exception) leaves the
    # change last handed out to come again; the changes consumed before it (by asking for
    # the next) are consumed, yet their position was not written, and they came again
    # too.
    mem = make_mem()
    for i in range(4):
        receipt = mem.put(f"k{i}", i, level=Level.SWARM, principal=coder)
    mem.sync(receipt, timeout=10)
    sub = Subscriber(mem, coder, since="batch", commit_every=10)
    with contextlib.suppress(RuntimeError), sub:
        got = [sub.poll(timeout=5) for _ in range(3)]  # k0 and k1 consumed, k2 handed out
        assert [c.key for c in got if c] == ["k0", "k1", "k2"]
        if how == "an exception":
            raise RuntimeError("handler failed")
        sub.close(commit=False)
    assert Subscriber.saved_position(mem, coder, "batch") == got[1].seq  # type: ignore[union-attr]
    with Subscriber(mem, coder, since="batch") as again:
        assert [c.key for c in consume_until(again, "k3")] == ["k2", "k3"]


def test_close_unsubscribes_from_every_channel(
    make_mem: MakeMem, coder: Principal, raw_redis: redis.Redis
) -> None:
    # A closed subscriber that kept its pub/sub connection stayed subscribed: Redis went
    # on queueing every notification of its scopes for a reader that never comes back
    # (its output buffer growing until Redis drops the client), one connection for each
    # subscriber ever closed.
    mem = make_mem()
    sub = Subscriber(mem, coder, since=0)
    channels = [mem.layout.channel(scope) for scope in sub.scopes]
    assert len(channels) == 4

    def listeners() -> list[int]:
        return [count for _, count in raw_redis.pubsub_numsub(*channels)]

    assert listeners() == [1] * 4  # subscribed (and confirmed) by the constructor
    sub.close()
    wait_until(lambda: listeners() == [0] * 4, what="its channels to have no subscriber")


_SIGNAL_CHILD = """
import signal, sys
from acl import Principal
from dualmem import DualMemory, Subscriber

mem = DualMemory(redis_url=sys.argv[1], db_path=sys.argv[2], keyring=sys.argv[3])
p = Principal(agent_id="coder-1", team="backend", swarm="s", project="shop")
with Subscriber(mem, p, since="loop") as sub:
    # The handler runs in the main thread, inside the poll() the loop is waiting in.
    signal.signal(signal.SIGALRM, lambda *_: sub.close())
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    for change in sub:
        pass
print("ended", flush=True)
mem.close()
"""


def test_close_from_a_signal_handler_ends_iteration(
    redis_url: str, db_path: Path, keyfile: Path
) -> None:
    # It used to wait forever for poll()'s lock, which its own thread held.
    done = run_child(_SIGNAL_CHILD, [redis_url, str(db_path), str(keyfile)], 60, "")
    assert done.returncode == 0 and done.stdout.strip() == "ended", done.stderr


def run_child(
    script: str, args: list[str], timeout: float, where: str
) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a child interpreter; a child still running at ``timeout`` means
    close() from a signal handler (``where``) hung it."""
    Path(args[1]).parent.mkdir(parents=True, exist_ok=True)
    try:
        return subprocess.run(
            [sys.executable, "-c", script, *args],
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"close() from a signal handler{where} hung the subscriber")


_SIGNAL_AT_CHILD = """
import json, signal, sys
from acl import Level, Principal
from dualmem import DualMemory, Subscriber

url, db, keys, where = sys.argv[1:5]
mem = DualMemory(redis_url=url, db_path=db, keyring=keys)
p = Principal(agent_id="coder-1", team="backend", swarm="s", project="shop")
mem.put("k1", 1, level=Level.SWARM, principal=p)
mem.sync(mem.put("k2", 2, level=Level.SWARM, principal=p))


def stop_signal():
    # Delivered at once: raise_signal runs the Python handler before it returns.
    signal.raise_signal(signal.SIGUSR1)


class LockEdges:
    # The subscriber's lock; when armed, the stop signal lands right after the next
    # acquire or right before the next release (the moments no owner is recorded).
    def __init__(self, lock, edge):
        self.lock, self.edge, self.armed = lock, edge, False

    def __enter__(self):
        entered = self.lock.__enter__()
        if self.armed and self.edge == "acquire":
            self.armed = False
            stop_signal()
        return entered

    def __exit__(self, *exc):
        if self.armed and self.edge == "release":
            self.armed = False
            stop_signal()
        return self.lock.__exit__(*exc)


got = []
with Subscriber(mem, p, since="svc") as sub:
    signal.signal(signal.SIGUSR1, lambda *_: sub.close())
    edges = sub._poll_lock = LockEdges(sub._poll_lock, where.rpartition("-")[2])
    write = sub._write_position

    def write_interrupted():
        # A second stop signal while a close() saves the position.
        sub._write_position = write
        stop_signal()
        write()

    edges.armed = where == "poll-release"  # lands as the first poll returns k1
    for change in sub:
        got.append(change.key)
        if where == "poll-acquire":
            edges.armed = True  # lands as the next poll starts
        elif where == "exit-save":
            sub._write_position = write_interrupted
            break  # the with block's close saves, and is interrupted
        elif where == "handler-save":
            sub._write_position = write_interrupted
            stop_signal()  # the handler's close saves, and is interrupted
first = mem.changes(0, principal=p)[0].seq
print(json.dumps([got, Subscriber.saved_position(mem, p, "svc"), first]))
mem.close()
"""


@pytest.mark.parametrize("where", ["poll-acquire", "poll-release", "exit-save", "handler-save"])
def test_close_from_a_signal_handler_returns_wherever_the_signal_lands(
    redis_url: str, db_path: Path, keyfile: Path, where: str
) -> None:
    # poll() held a plain Lock and recorded its thread only inside it; close() only knew
    # poll's thread. A stop signal right after poll took the lock, right before it let
    # go, or while a close() (the with block's, or the handler's own) saved the position
    # made the handler's close() wait forever for its own thread.
    args = [redis_url, str(db_path), str(keyfile), where]
    done = run_child(_SIGNAL_AT_CHILD, args, 30, f" at {where}")
    assert done.returncode == 0, done.stderr
    got, saved, first_seq = json.loads(done.stdout)
    # Iteration ended after the one change handed out, and its position was saved.
    assert got == ["k1"] and saved == first_seq


@pytest.mark.parametrize("since", [-1, True, 1.5, "", " \t", None])
def test_bad_arguments_are_rejected(make_mem: MakeMem, coder: Principal, since: object) -> None:
    mem = make_mem()
    with pytest.raises(ValidationError):
        Subscriber(mem, coder, since=since)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        Subscriber(mem, coder, commit_every=0)
    with pytest.raises(ValidationError):
        Subscriber(mem, "coder-1")  # type: ignore[arg-type]
    # Not a DualMemory: refused up front, not an AttributeError from deep inside.
    with pytest.raises(ValidationError, match="needs a DualMemory"):
        Subscriber(mem.store, coder)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"level": 3.0},  # a builtin TypeError ("'float' object is not iterable")
        {"level": [3]},
        {"since": 2**63},  # past SQLite's range: accepted, then failed at the first poll
        {"batch_size": 2**63},
        {"batch_size": 0},  # every journal read LIMIT 0: nothing ever delivered
        {"commit_every": 2**63},
        {"recheck_interval": 10**400},  # a raw OverflowError from float()
        {"recheck_interval": float("inf")},  # taken: the journal was never re-read
        {"recheck_interval": 0},
    ],
)
def test_bad_arguments_are_rejected_by_the_constructor(
    make_mem: MakeMem, coder: Principal, kwargs: dict[str, object]
) -> None:
    mem = make_mem()
    with pytest.raises(ValidationError):
        Subscriber(mem, coder, **kwargs)  # type: ignore[arg-type]
    with Subscriber(mem, coder, since=2**63 - 1, batch_size=2**63 - 1) as edge:  # the bound
        assert edge.poll(timeout=0) is None and edge.backlog() == 0


@pytest.mark.parametrize("timeout", ["1", b"1", True, -1, float("nan"), [1], 10**400])
def test_a_bad_poll_timeout_is_a_validation_error(
    make_mem: MakeMem, coder: Principal, timeout: object
) -> None:
    # timeout="1" raised a raw TypeError from the comparison. The message is the one of
    # every wait (settings.check_seconds), with None allowed here.
    with Subscriber(make_mem(), coder) as sub:
        with pytest.raises(
            ValidationError,
            match=r"^timeout must be None or a number of seconds in \[0, 1,000,000\], got ",
        ):
            sub.poll(timeout=timeout)  # type: ignore[arg-type]
        assert sub.poll(timeout=0) is None


def test_a_saved_position_outlives_cache_ttl_while_its_save_waits_in_the_stream(
    make_mem: MakeMem, coder: Principal, raw_redis: redis.Redis
) -> None:
    # The save's cache entry expired after cache_ttl while the worker was down: a restart
    # read SQLite's older position and delivered consumed changes again.
    writer = make_mem()
    for r in [writer.put(f"k{i}", i, level=Level.SWARM, principal=coder) for i in range(3)]:
        writer.sync(r)
    writer.close()  # no worker from here on: the saves below wait in the stream
    mem = make_mem(worker=False, cache_ttl=1)
    with Subscriber(mem, coder, since="feed") as sub:
        assert [sub.poll(timeout=5).key for _ in range(3)] == ["k0", "k1", "k2"]  # type: ignore[union-attr]
    saved = [n for n in raw_redis.scan_iter(match=b"dm:*:c:*_subscriber*")]
    assert saved and all(raw_redis.pttl(n) == -1 for n in saved)  # no expiry
    time.sleep(1.2)  # past cache_ttl
    again = Subscriber(mem, coder, since="feed")
    try:
        assert again.position == 3
    finally:
        again.close(commit=False)
