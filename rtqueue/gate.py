"""The response gate: the lock-protected queue of in-flight response ids.

This is the one structure the reader and writer threads share for response
ordering (DESIGN.md section 2). It has no socket and runs no user code: the
writer asks it for the slot before sending an in-band ``response.create``; the
reader tells it what the server said. Every rule below comes from a bug seen in
peer SDKs:

- A create occupies the slot from the moment it is *reserved* for sending
  (state ``pending``), not from ``response.created``: the gap between the two is
  where a boolean "has active response" flag loses.
- ``response.created`` is matched to its create by the client event id that the
  session copies into ``response.metadata``; an unmatched in-band created
  (server VAD, another client) still takes the slot.
- Release is by response id (``response.done`` of any status), never a bare
  flag: a late ``done`` for an old response cannot free a newer one.
- Out-of-band responses (``conversation: "none"``) never take the slot.
- A server-raced create (``conversation_already_has_active_response`` naming
  our event id) is released and reported as ``RETRY`` (bounded), not dropped.

Waiting is on a :class:`threading.Condition`, so a release wakes the writer in
microseconds; the writer still waits in short slices so it can notice
shutdown, deadlines and audio between them.
"""

from __future__ import annotations

import enum
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Literal

import attrs

from .errors import ConnectionLost, SessionClosed

__all__ = ["GateEntry", "GateStats", "ResponseGate", "Verdict"]

_SAMPLES = 1024  # the newest waits and latencies kept for percentiles (bounded per session)


class Verdict(enum.Enum):
    """What the session should do with a create the server answered with an error."""

    RETRY = "retry"  # put it back at the head of the control lane
    REJECT = "reject"  # fail its handle


@attrs.frozen
class GateEntry:
    """One in-flight response as the gate sees it (a snapshot)."""

    state: Literal["pending", "active"]
    event_id: str | None
    response_id: str | None
    since: float  # clock time the entry was added or became active
    ours: bool  # False for server-initiated (VAD) or foreign responses


@attrs.frozen
class GateStats:
    """Counters and wait-time percentiles (milliseconds) of a gate."""

    sent: int
    created: int
    done: int
    retried: int
    rejected: int
    timed_out: int
    evicted: int
    depth: int
    oob_depth: int
    foreign: int
    wait_p50_ms: float
    wait_p99_ms: float
    wait_max_ms: float
    latency_p50_ms: float
    latency_p99_ms: float
    latency_max_ms: float
    latency_samples: int

    def as_dict(self) -> dict[str, float | int]:
        """A plain dict (for JSON)."""
        return attrs.asdict(self)


def percentile(values: Iterable[float], q: float) -> float:
    """Nearest-rank percentile of ``values`` (0.0 when empty)."""
    data = sorted(values)
    if not data:
        return 0.0
    k = min(len(data) - 1, max(0, round(q / 100.0 * len(data) + 0.5) - 1))
    return data[k]


@attrs.define(eq=False)
class _Entry:
    state: Literal["pending", "active"]
    event_id: str | None
    response_id: str | None
    since: float
    ours: bool
    untagged: bool = False

    def snapshot(self) -> GateEntry:
        return GateEntry(self.state, self.event_id, self.response_id, self.since, self.ours)


class ResponseGate:
    """Lock-protected queue of in-band in-flight responses, plus out-of-band tracking.

    Thread-safe. ``acquire`` is for the writer; ``on_*`` are for the reader;
    ``reset`` / ``close`` for the connection owner. No method calls user code.
    """

    def __init__(self, *, max_retries: int = 3, clock: Callable[[], float] = time.monotonic):
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError("max_retries must be an int >= 0")
        self._clock = clock
        self._max_retries = max_retries
        self._cond = threading.Condition(threading.Lock())
        self._queue: list[_Entry] = []
        self._oob: dict[str, _Entry] = {}  # keyed by event_id, then response_id
        self._retries: dict[str, int] = {}
        self._closed: BaseException | None = None
        self._pokes = 0  # bumped by poke(): cuts a waiting acquire short without a state change
        self._last_release: float | None = None  # clock time the last release was read
        self._counts = dict.fromkeys(
            ("sent", "created", "done", "retried", "rejected", "timed_out", "evicted", "foreign"), 0
        )
        self._waits: deque[float] = deque(maxlen=_SAMPLES)
        self._latencies: deque[float] = deque(maxlen=_SAMPLES)

    # -- writer side ---------------------------------------------------------

    def acquire(self, event_id: str, timeout: float, *, untagged: bool = False) -> bool:
        """Wait up to ``timeout`` seconds for an empty queue, then reserve it for ``event_id``.

        The emptiness check and the reservation are one atomic step. Returns
        ``True`` when reserved (the entry is now ``pending``), ``False`` on
        timeout. Raises :class:`SessionClosed` / :class:`ConnectionLost` once the
        gate is closed. ``untagged``: the create carries no id in its
        metadata, so a ``response.created`` without one is taken as its answer
        (see :meth:`untagged_pending`).
        """
        deadline = self._clock() + max(0.0, timeout)
        with self._cond:
            pokes = self._pokes
            while True:
                if self._closed is not None:
                    raise self._closed_error()
                if not self._queue:
                    self._queue.append(_Entry("pending", event_id, None, self._clock(), True, untagged))
                    return True
                remaining = deadline - self._clock()
                if remaining <= 0 or self._pokes != pokes:
                    return False
                self._cond.wait(remaining)

    def poke(self) -> None:
        """Make a waiting :meth:`acquire` return ``False`` now (the writer has audio to send)."""
        with self._cond:
            self._pokes += 1
            self._cond.notify_all()

    def now(self) -> float:
        """The gate's clock (``time.monotonic`` unless one was injected)."""
        return self._clock()

    def note_sent(self, event_id: str, waited_s: float, *, gated: bool = True, at: float | None = None) -> None:
        """Record that a create left on the wire after waiting ``waited_s`` in total.

        For a gated create that had to wait for a release, the time from that
        release being read to ``at`` (the clock time the write started, from
        :meth:`now`; default: now) is the *gate latency* (DESIGN.md's figure).
        """
        now = self._clock() if at is None else at
        with self._cond:
            self._counts["sent"] += 1
            if gated:
                self._waits.append(waited_s)
                # Only a create that was waiting when the release came has a gate
                # latency; one that found the gate free would measure idle time.
                if waited_s > 0 and self._last_release is not None and self._last_release >= now - waited_s:
                    self._latencies.append(max(0.0, now - self._last_release))

    def abandon(self, event_id: str) -> None:
        """Drop a reservation whose create could not be sent (socket failure)."""
        with self._cond:
            self._remove_where(lambda e: e.event_id == event_id and e.state == "pending")

    def note_timed_out(self) -> None:
        """Count a create whose deadline passed before the gate let it through."""
        with self._cond:
            self._counts["timed_out"] += 1

    def register_oob(self, event_id: str) -> None:
        """Track an out-of-band create as sent; it never takes the slot."""
        with self._cond:
            self._oob[event_id] = _Entry("pending", event_id, None, self._clock(), True)
            self._counts["sent"] += 1

    # -- reader side ---------------------------------------------------------

    def untagged_pending(self) -> str | None:
        """The event id of our pending create that carries no metadata tag, if one is pending.

        At most one in-band create is pending at a time, so a
        ``response.created`` with no tag (server metadata not echoed, or the
        app used every metadata pair) answers it. Server-VAD responses also
        come untagged; if one starts meanwhile, the create earns a conflict
        error naming its id, which is retried as usual.
        """
        with self._cond:
            for e in self._queue:
                if e.state == "pending" and e.untagged:
                    return e.event_id
            return None

    def on_created(
        self, response_id: str, event_id: str | None, *, in_band: bool | None = None
    ) -> Literal["ours", "oob", "foreign", "foreign_oob"]:
        """Record ``response.created``; returns how it was classified.

        ``in_band`` is the server's own hint (``conversation_id`` present or
        null) for responses we cannot match; ``None`` means unknown, which is
        treated as in-band because taking the slot is the safe side.
        """
        now = self._clock()
        with self._cond:
            self._counts["created"] += 1
            if event_id is not None:
                for entry in self._queue:
                    if entry.event_id == event_id and entry.state == "pending":
                        entry.state, entry.response_id, entry.since = "active", response_id, now
                        return "ours"
                oob = self._oob.pop(event_id, None)
                if oob is not None:
                    oob.state, oob.response_id, oob.since = "active", response_id, now
                    self._oob[response_id] = oob
                    return "oob"
            if in_band is False:
                self._oob[response_id] = _Entry("active", event_id, response_id, now, False)
                return "foreign_oob"
            self._counts["foreign"] += 1
            self._queue.append(_Entry("active", event_id, response_id, now, False))
            return "foreign"

    def on_done(self, response_id: str, event_id: str | None = None) -> bool:
        """Record ``response.done`` (any status): remove that response wherever it stands.

        ``event_id`` (from the done's metadata) also releases a still-pending
        entry whose ``response.created`` was never seen. Returns whether
        anything was released.
        """
        now = self._clock()
        with self._cond:
            released = self._remove_where(lambda e: e.response_id == response_id)
            if not released and event_id is not None:
                released = self._remove_where(lambda e: e.event_id == event_id)
            oob = self._oob.pop(response_id, None)
            if oob is None and event_id is not None:
                oob = self._oob.pop(event_id, None)
            released = released or oob is not None
            if released:
                self._counts["done"] += 1
                self._last_release = now
            return released

    def on_error(self, event_id: str | None, code: str | None) -> Verdict | None:
        """Record an ``error`` event; returns a verdict if it named one of our pending creates.

        A conflict (``conversation_already_has_active_response``) yields
        ``RETRY`` until the create has been retried ``max_retries`` times, then
        ``REJECT``. Any other error for a pending create yields ``REJECT``.
        ``None`` means the error was not about a create the gate holds.
        """
        if event_id is None:
            return None
        with self._cond:
            if self._oob.pop(event_id, None) is not None:
                self._counts["rejected"] += 1
                return Verdict.REJECT
            if not self._remove_where(lambda e: e.event_id == event_id and e.state == "pending"):
                return None
            if code == "conversation_already_has_active_response":
                n = self._retries.get(event_id, 0)
                if n < self._max_retries:
                    self._retries[event_id] = n + 1
                    self._counts["retried"] += 1
                    return Verdict.RETRY
            self._retries.pop(event_id, None)
            self._counts["rejected"] += 1
            return Verdict.REJECT

    def evict(self, response_id: str) -> bool:
        """Forcibly release a stale active response (its ``done`` never came)."""
        with self._cond:
            removed = self._remove_where(lambda e: e.response_id == response_id)
            removed = self._oob.pop(response_id, None) is not None or removed
            if removed:
                self._counts["evicted"] += 1
                self._last_release = self._clock()
            return removed

    # -- connection owner ----------------------------------------------------

    def reset(self) -> list[GateEntry]:
        """Forget everything in flight (the connection was replaced); wake waiters.

        Returns the entries that were dropped so their handles can be failed or
        re-issued.
        """
        with self._cond:
            dropped = [e.snapshot() for e in self._queue] + [e.snapshot() for e in self._oob.values()]
            self._queue.clear()
            self._oob.clear()
            self._retries.clear()
            self._cond.notify_all()
            return dropped

    def close(self, error: BaseException | None = None) -> list[GateEntry]:
        """Close for good: clear, wake every waiter; later ``acquire`` raises ``error``.

        ``error`` defaults to :class:`SessionClosed`. Idempotent (the first
        error is kept).
        """
        with self._cond:
            if self._closed is None:
                self._closed = error if error is not None else SessionClosed("session closed")
        return self.reset()

    # -- queries ---------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed is not None

    def active_response_id(self) -> str | None:
        """The id of the active in-band response at the head, if any."""
        with self._cond:
            for e in self._queue:
                if e.state == "active":
                    return e.response_id
            return None

    def entries(self) -> list[GateEntry]:
        """A snapshot of the in-band queue, head first."""
        with self._cond:
            return [e.snapshot() for e in self._queue]

    def depth(self) -> int:
        """Number of in-band entries (0 means a create may go now)."""
        with self._cond:
            return len(self._queue)

    def wait_drained(self, timeout: float) -> bool:
        """Block until the in-band queue is empty (or closed); ``False`` on timeout."""
        deadline = self._clock() + timeout
        with self._cond:
            while self._queue and self._closed is None:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return not self._queue

    def wait_change(self, timeout: float) -> None:
        """Block until any release or reset happens, or ``timeout`` passes."""
        with self._cond:
            self._cond.wait(timeout)

    def stats(self) -> GateStats:
        """Counters and wait/latency percentiles so far."""
        with self._cond:
            waits = [w * 1000 for w in self._waits]
            lats = [v * 1000 for v in self._latencies]
            return GateStats(
                **self._counters(),
                wait_p50_ms=percentile(waits, 50),
                wait_p99_ms=percentile(waits, 99),
                wait_max_ms=max(waits, default=0.0),
                latency_p50_ms=percentile(lats, 50),
                latency_p99_ms=percentile(lats, 99),
                latency_max_ms=max(lats, default=0.0),
                latency_samples=len(lats),
            )

    def counts(self) -> dict[str, int]:
        """The counters of :meth:`stats` alone: cheap (no sorting), for frequent polling."""
        with self._cond:
            return self._counters()

    def _counters(self) -> dict[str, int]:
        # caller holds self._cond
        return {**self._counts, "depth": len(self._queue), "oob_depth": len(self._oob)}

    def stores(self) -> dict[str, tuple[object, int]]:
        """The capped sample reservoirs, ``name -> (container, cap)`` (memory diagnostics; do not change)."""
        return {"gate_samples": ((self._waits, self._latencies), 2 * _SAMPLES)}

    def latencies_ms(self) -> list[float]:
        """Raw gate latencies (release read -> next create sent), in ms, for benchmarks."""
        with self._cond:
            return [v * 1000 for v in self._latencies]

    # -- internals -------------------------------------------------------------

    def _remove_where(self, pred: Callable[[_Entry], bool]) -> bool:
        # Caller holds the lock.
        before = len(self._queue)
        self._queue[:] = [e for e in self._queue if not pred(e)]
        if len(self._queue) != before:
            self._cond.notify_all()
            return True
        return False

    def _closed_error(self) -> BaseException:
        err = self._closed
        assert err is not None
        # A fresh instance each time so tracebacks don't pile up on one object.
        if isinstance(err, (SessionClosed, ConnectionLost)):
            return type(err)(*err.args)
        return err

    def __repr__(self) -> str:
        with self._cond:
            return f"<ResponseGate depth={len(self._queue)} oob={len(self._oob)} closed={self._closed is not None}>"
