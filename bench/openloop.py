"""Open-loop load: sends scheduled by the clock, so a slow send delays no later send's clock.

A closed loop (send, wait, send) slows down when the system does and then reports
only the latency of the requests it managed to send: coordinated omission. Here every
send has an intended time fixed before the run starts, and latency is measured from that
intended time, so any queueing a sender suffers counts against the system.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

__all__ = ["Send", "run_open_loop", "schedule", "senders_for"]

#: ``(index, intended_ns, started_ns, finished_ns)`` of one send.
Send = tuple[int, int, int, int]


def schedule(
    rate: float, duration_s: float, start_ns: int, *, senders: int = 1, sender: int = 0
) -> list[tuple[int, int]]:
    """``(index, intended_ns)`` of the sends of one sender at a constant offered ``rate``.

    The run has ``rate * duration_s`` sends, one every ``1/rate`` seconds from
    ``start_ns``; sender ``k`` of ``senders`` takes every ``senders``-th of them.

    >>> schedule(1000, 0.005, 0)
    [(0, 0), (1, 1000000), (2, 2000000), (3, 3000000), (4, 4000000)]
    >>> schedule(1000, 0.005, 0, senders=2, sender=1)
    [(1, 1000000), (3, 3000000)]
    """
    if rate <= 0 or duration_s <= 0:
        raise ValueError("rate and duration must be positive")
    n = int(rate * duration_s)
    step = 1e9 / rate
    return [(i, start_ns + round(i * step)) for i in range(sender, n, senders)]


def senders_for(rate: float, per_sender: float) -> int:
    """How many senders share ``rate`` so that none is offered more than ``per_sender``.

    >>> senders_for(500, 2500), senders_for(3_000, 2500), senders_for(10_000, 2500)
    (1, 2, 4)
    """
    return max(1, -(-int(rate) // int(per_sender)))


def run_open_loop(
    plan: Sequence[tuple[int, int]],
    send: Callable[[int], object],
    *,
    clock: Callable[[], int] = time.monotonic_ns,
    sleep: Callable[[float], object] = time.sleep,
) -> list[Send]:
    """Call ``send(index)`` at each intended time of ``plan``; never earlier, never skipped.

    A send that is due while the previous one is still running starts as soon as that one
    returns (a synchronous client cannot do better); its lateness stays in the record,
    because latency is taken from the intended time.

    >>> now = [0]
    >>> def clock(): return now[0]
    >>> def sleep(s): now[0] += int(s * 1e9)
    >>> def send(i): now[0] += 1_500_000          # every send takes 1.5 ms
    >>> [(i, due, start) for i, due, start, _ in
    ...  run_open_loop(schedule(1000, 0.003, 0), send, clock=clock, sleep=sleep)]
    [(0, 0, 0), (1, 1000000, 1500000), (2, 2000000, 3000000)]
    """
    out: list[Send] = []
    for index, due in plan:
        wait = due - clock()
        if wait > 0:
            # Sleeping (not spinning) overshoots by tens of microseconds, and that
            # lateness is charged to the measurement, never hidden.
            sleep(wait / 1e9)
        started = clock()
        send(index)
        out.append((index, due, started, clock()))
    return out
