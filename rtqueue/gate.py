"""The response gate: the lock shell around :class:`~rtqueue.gate_state.GateState`.

This is the one structure the reader and writer threads share for response
ordering (DESIGN.md section 2). It has no socket and runs no user code: the
writer asks it for the slot before sending an in-band ``response.create``; the
reader tells it what the server said. The state and every rule (pending from
reservation, match by event id, release by response id, out-of-band never
takes the slot, bounded retry of a server-raced create) live in the sans-I/O
:class:`~rtqueue.gate_state.GateState`; this module adds only the lock, the
clock and the waiting. Each method takes the lock, reads the clock, calls the
state, and wakes waiters when the in-band queue shrank (a release), on
``reset`` / ``close`` and on ``poke``.

Waiting is on a :class:`threading.Condition`, so a release wakes the writer in
microseconds; the writer still waits in short slices so it can notice
shutdown, deadlines and audio between them. The thread that read a release
usually sends the waiting create itself
(:meth:`rtqueue.writer.Writer.send_held_create`), reserving through
:meth:`ResponseGate.acquire` with no wait.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Literal

from .gate_state import GateEntry, GateState, GateStats, Verdict
from .gate_state import percentile as percentile

__all__ = ["GateEntry", "GateStats", "ResponseGate", "Verdict"]


class ResponseGate:
    """Lock-protected queue of in-band in-flight responses, plus out-of-band tracking.

    Thread-safe. ``acquire`` is for the writer; ``on_*`` are for the reader;
    ``reset`` / ``close`` for the connection owner. No method calls user code.
    """

    def __init__(self, *, max_retries: int = 3, clock: Callable[[], float] = time.monotonic):
        self._state = GateState(max_retries=max_retries)
        self._clock = clock
        self._cond = threading.Condition(threading.Lock())
        self._pokes = 0  # bumped by poke(): cuts a waiting acquire short without a state change
        self._waiting = 0  # writers inside acquire()'s wait (handoff() waits only for one of them)
        self._reserved = 0  # reservations made by acquire() (handoff() waits for this to move)
        self._handing_off = 0  # readers inside handoff() (acquire() notifies them when it reserves)

    # -- writer side ---------------------------------------------------------

    def acquire(self, event_id: str, timeout: float, *, untagged: bool = False, holder: str | None = None,
                poke_mark: int | None = None) -> bool:
        """Wait up to ``timeout`` seconds for an empty queue, then reserve it for ``event_id``.

        The emptiness check and the reservation are one atomic step. Returns
        ``True`` when reserved (the entry is now ``pending``), ``False`` on
        timeout. Raises :class:`SessionClosed` / :class:`ConnectionLost` once the
        gate is closed. ``untagged``: the create carries no id in its
        metadata, so a ``response.created`` without one is taken as its answer
        (see :meth:`untagged_pending`). ``holder``: the response whose tool
        chain this create continues (it takes over that response's hold).
        ``poke_mark``: a :meth:`poke_mark` read before the call; a poke since
        then ends the wait at once (default: pokes from the call on).
        """
        deadline = self._clock() + max(0.0, timeout)
        with self._cond:
            pokes = self._pokes if poke_mark is None else poke_mark
            while True:
                if poke_mark is not None and self._pokes != pokes:
                    return False  # poked since the mark: what the caller waits for may be gone
                if self._state.can_reserve(holder):
                    # Reserves (empty or our hold) or raises the close error; the clock is read only then.
                    reserved = self._state.try_reserve(event_id, self._clock(), untagged, holder)
                    if reserved:
                        self._reserved += 1
                        if self._handing_off:
                            self._cond.notify_all()  # the reader in handoff() may go on
                    return reserved
                remaining = deadline - self._clock()
                if remaining <= 0 or self._pokes != pokes:
                    return False
                self._waiting += 1
                try:
                    self._cond.wait(remaining)
                finally:
                    self._waiting -= 1

    def handoff(self, timeout: float) -> bool:
        """After a release: let a writer waiting in :meth:`acquire` reserve before the caller goes on.

        The reader calls this right after a ``response.done`` freed the slot.
        If a writer is waiting, the reader blocks (releasing the GIL) until
        that writer has reserved the slot, or ``timeout`` seconds pass;
        otherwise it returns at once. Without it the woken writer queues for
        the GIL behind the rest of the reader's work on that frame and the
        threads it wakes (the app waiting on the response, the dispatcher).
        Returns whether a reservation was made meanwhile.
        """
        with self._cond:
            # Only an empty queue is sure to let the waiting writer through (a hold lets only its own
            # follow-up in); otherwise waiting could only time out.
            if not self._waiting or self._state.depth() != 0 or self._state.closed_error() is not None:
                return False
            before = self._reserved
            deadline = self._clock() + timeout
            self._handing_off += 1
            try:
                while self._reserved == before and self._waiting:
                    remaining = deadline - self._clock()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
            finally:
                self._handing_off -= 1
            return self._reserved != before

    def waiting_writers(self) -> int:
        """Writers inside :meth:`acquire` waiting for the slot now (diagnostics)."""
        with self._cond:
            return self._waiting

    def poke_mark(self) -> int:
        """How many pokes so far (pass it to :meth:`acquire` so a poke made meanwhile counts)."""
        with self._cond:
            return self._pokes

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
            self._state.note_sent(event_id, waited_s, now, gated=gated)

    def abandon(self, event_id: str) -> None:
        """Drop a reservation whose create could not be sent (socket failure)."""
        with self._cond:
            if self._state.abandon(event_id):
                self._cond.notify_all()

    def note_timed_out(self) -> None:
        """Count a create whose deadline passed before the gate let it through."""
        with self._cond:
            self._state.note_timed_out()

    def register_oob(self, event_id: str) -> None:
        """Track an out-of-band create as sent; it never takes the slot."""
        with self._cond:
            self._state.register_oob(event_id, self._clock())

    # -- reader side ---------------------------------------------------------

    def untagged_pending(self, *, any_pending: bool = False) -> str | None:
        """The event id of our pending create that carries no metadata tag, if one is pending.

        At most one in-band create is pending at a time, so a
        ``response.created`` with no tag (server metadata not echoed, or the
        app used every metadata pair) answers it. Server-VAD responses also
        come untagged; if one starts meanwhile, the create earns a conflict
        error naming its id, which is retried as usual. ``any_pending``: a
        tagged create counts too (the server has not shown it echoes metadata).
        """
        with self._cond:
            return self._state.untagged_pending(any_pending=any_pending)

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
            return self._state.on_created(response_id, event_id, now, in_band=in_band)

    def on_done(self, response_id: str, event_id: str | None = None, *, hold: bool = False) -> bool:
        """Record ``response.done`` (any status): remove that response wherever it stands.

        ``event_id`` (from the done's metadata) also releases a still-pending
        entry whose ``response.created`` was never seen. Returns whether
        anything was released. ``hold``: keep the slot for this response's
        tool-chain follow-up (see :meth:`GateState.on_done`).
        """
        now = self._clock()
        with self._cond:
            depth = self._state.depth()
            released = self._state.on_done(response_id, event_id, now, hold=hold)
            self._notify_if_shrank(depth)
            return released

    def release_hold(self, response_id: str) -> bool:
        """End a tool chain's hold without a follow-up; wakes a waiting writer."""
        now = self._clock()
        with self._cond:
            depth = self._state.depth()
            released = self._state.release_hold(response_id, now)
            self._notify_if_shrank(depth)
            return released

    def on_error(self, event_id: str | None, code: str | None) -> Verdict | None:
        """Record an ``error`` event; returns a verdict if it named one of our pending creates.

        A conflict (``conversation_already_has_active_response``) yields
        ``RETRY`` until the create has been retried ``max_retries`` times, then
        ``REJECT``. Any other error for a pending create yields ``REJECT``.
        ``None`` means the error was not about a create the gate holds.
        """
        with self._cond:
            depth = self._state.depth()
            verdict = self._state.on_error(event_id, code)
            self._notify_if_shrank(depth)
            return verdict

    def evict(self, response_id: str) -> bool:
        """Forcibly release a stale active response (its ``done`` never came)."""
        with self._cond:
            depth = self._state.depth()
            removed = self._state.evict(response_id, self._clock())
            self._notify_if_shrank(depth)
            return removed

    # -- connection owner ----------------------------------------------------

    def reset(self) -> list[GateEntry]:
        """Forget everything in flight (the connection was replaced); wake waiters.

        Returns the entries that were dropped so their handles can be failed or
        re-issued.
        """
        with self._cond:
            dropped = self._state.reset()
            self._cond.notify_all()
            return dropped

    def close(self, error: BaseException | None = None) -> list[GateEntry]:
        """Close for good: clear, wake every waiter; later ``acquire`` raises ``error``.

        ``error`` defaults to :class:`SessionClosed`. Idempotent (the first
        error is kept).
        """
        with self._cond:
            dropped = self._state.close(error)
            self._cond.notify_all()
            return dropped

    # -- queries ---------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._state.closed

    def active_response_id(self) -> str | None:
        """The id of the active in-band response at the head, if any."""
        with self._cond:
            return self._state.active_response_id()

    def entries(self) -> list[GateEntry]:
        """A snapshot of the in-band queue, head first."""
        with self._cond:
            return self._state.entries()

    def depth(self) -> int:
        """Number of in-band entries (0 means a create may go now)."""
        with self._cond:
            return self._state.depth()

    def wait_drained(self, timeout: float) -> bool:
        """Block until the in-band queue is empty (or closed); ``False`` on timeout."""
        deadline = self._clock() + timeout
        with self._cond:
            while self._state.depth() and not self._state.closed:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return not self._state.depth()

    def wait_change(self, timeout: float) -> None:
        """Block until any release or reset happens, or ``timeout`` passes."""
        with self._cond:
            self._cond.wait(timeout)

    def stats(self) -> GateStats:
        """Counters and wait/latency percentiles so far."""
        with self._cond:
            return self._state.stats()

    def counts(self) -> dict[str, int]:
        """The counters of :meth:`stats` alone: cheap (no sorting), for frequent polling."""
        with self._cond:
            return self._state.counts()

    def stores(self) -> dict[str, tuple[object, int]]:
        """The capped sample reservoirs, ``name -> (container, cap)`` (memory diagnostics; do not change)."""
        return self._state.stores()

    def latencies_ms(self) -> list[float]:
        """Raw gate latencies (release read -> next create sent), in ms, for benchmarks."""
        with self._cond:
            return self._state.latencies_ms()

    # -- internals -------------------------------------------------------------

    def _notify_if_shrank(self, depth_before: int) -> None:
        # Caller holds the lock. A release is the in-band queue shrinking: that
        # is what a waiting acquire / wait_drained is waiting for.
        if self._state.depth() < depth_before:
            self._cond.notify_all()

    def __repr__(self) -> str:
        with self._cond:
            c = self._state.counts()
            return f"<ResponseGate depth={c['depth']} oob={c['oob_depth']} closed={self._state.closed}>"
