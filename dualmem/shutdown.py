"""Stopping long-running commands on SIGTERM/SIGINT without deadlocking their main thread.

The obvious way, a Python signal handler that calls ``stop.set()`` on a
``threading.Event``, can hang the process for good: the handler runs in the main thread
between two bytecodes, and when those are inside ``stop.wait()`` (which holds the event's
internal lock around its bookkeeping) ``set()`` waits for a lock its own thread holds.
A ``dualmem worker`` pausing on ``stop.wait(0.0005)`` between small batches was caught
ignoring SIGTERM this way (cpython#126434 is the same trap in ``multiprocessing.Event``).

Here the Python-level handler does nothing. ``signal.set_wakeup_fd`` makes the C-level
handler write the signal number to a pipe as the signal arrives, and a small thread
reading that pipe sets the event, from outside the main thread, where taking the lock
is safe.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import FrameType

__all__ = ["stop_on_signals"]

_DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _noop(_signum: int, _frame: FrameType | None) -> None:
    """Installed so that the C-level handler runs (and writes to the wakeup pipe)."""


@contextmanager
def stop_on_signals(
    on_signal: Callable[[int], object] | None = None,
    signals: Sequence[int] = _DEFAULT_SIGNALS,
) -> Iterator[threading.Event]:
    """An event that is set when one of ``signals`` arrives, for the ``with`` block.

    ``on_signal(signum)`` is called first (from the relay thread, not a signal handler:
    it may log or take locks). Leaving the block puts back the previous handlers and
    wakeup fd. Must be entered from the main thread, like ``signal.signal``.

    >>> import os, signal
    >>> with stop_on_signals() as stop:
    ...     os.kill(os.getpid(), signal.SIGTERM)
    ...     stop.wait(5)
    True
    """
    stop = threading.Event()
    wanted = {int(s) for s in signals}
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)  # set_wakeup_fd requires it

    def relay() -> None:
        try:
            while data := os.read(read_fd, 64):
                for signum in data:
                    if signum in wanted:
                        if on_signal is not None:
                            on_signal(signum)
                        stop.set()
        finally:
            os.close(read_fd)

    thread = threading.Thread(target=relay, name="dualmem-signals", daemon=True)
    thread.start()
    previous = {s: signal.signal(s, _noop) for s in signals}
    old_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    try:
        yield stop
    finally:
        signal.set_wakeup_fd(old_fd)
        for s, handler in previous.items():
            signal.signal(s, handler)
        os.close(write_fd)  # the relay reads end-of-file and ends
        thread.join(1)
