"""One timer thread for the whole process: far-off, rare callbacks without a thread each.

A session that will need something in an hour (renewing itself before the
service's 60-minute cap) should not keep a thread asleep for that hour: with
hundreds of sessions in one process that is hundreds of idle threads. Instead
it asks :func:`call_at` for a callback; the one thread ``rtqueue-timers`` sleeps
until the earliest one is due, runs it, and ends as soon as nothing is
scheduled (so closing every session leaves no thread behind).

Callbacks run on the timer thread and must be quick (start a thread, set an
event); one that raises is logged and the others still run.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

__all__ = ["TimerHandle", "call_at"]

log = logging.getLogger("rtqueue")

_lock = threading.Condition()
_heap: list[tuple[float, int, TimerHandle]] = []
_seq = itertools.count()
_thread: threading.Thread | None = None


class TimerHandle:
    """A scheduled callback; :meth:`cancel` it if it is no longer wanted."""

    __slots__ = ("_fn", "cancelled", "when")

    def __init__(self, when: float, fn: Callable[[], object]) -> None:
        self.when = when
        self._fn: Callable[[], object] | None = fn
        self.cancelled = False

    def cancel(self) -> None:
        """Never run it (a no-op once it ran). The timer thread ends if nothing else is scheduled."""
        with _lock:
            self.cancelled = True
            self._fn = None
            _lock.notify_all()

    def take(self) -> Callable[[], object] | None:
        """Claim the callback to run it (None if cancelled or already taken); for the timer thread."""
        fn, self._fn = self._fn, None
        return fn


def call_at(when: float, fn: Callable[[], object]) -> TimerHandle:
    """Run ``fn`` on the shared timer thread at monotonic time ``when`` (at once if past)."""
    global _thread
    handle = TimerHandle(when, fn)
    with _lock:
        heapq.heappush(_heap, (when, next(_seq), handle))
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_run, name="rtqueue-timers", daemon=True)
            _thread.start()
        _lock.notify_all()
    return handle


def _run() -> None:
    global _thread
    while True:
        with _lock:
            while True:
                while _heap and _heap[0][2].cancelled:
                    heapq.heappop(_heap)
                if not _heap:
                    _thread = None  # the next call_at starts a fresh thread
                    return
                wait = _heap[0][0] - time.monotonic()
                if wait <= 0:
                    fn = heapq.heappop(_heap)[2].take()
                    break
                _lock.wait(wait)
        if fn is not None:
            try:
                fn()
            except Exception:
                log.exception("a timer callback failed")
