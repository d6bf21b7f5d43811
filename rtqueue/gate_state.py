"""The response gate's state and rules, with no I/O: the sans-I/O core of the gate.

:class:`GateState` is the queue of in-flight response ids for the default
conversation (DESIGN.md section 2) as plain data. It has no thread, no lock,
no socket and no clock: every method that needs the time takes ``now`` (in
the caller's clock, seconds) as an argument, and each returns a plain result.
:class:`~rtqueue.gate.ResponseGate` is the thin lock shell around it that the
reader and writer threads share. Every rule below comes from a bug seen in
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

An illegal use raises and changes nothing: reserving the slot of a closed
gate raises the error it was closed with (a fresh instance for the library's
own errors), and a bad ``max_retries`` is refused at construction.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Iterable
from typing import Literal

import attrs

from .errors import ConnectionLost, SessionClosed

__all__ = ["CONFLICT", "GateEntry", "GateState", "GateStats", "Verdict", "percentile"]

_SAMPLES = 1024  # the newest waits and latencies kept for percentiles (bounded per session)

#: The server's error code for a create that raced another in-band response.
CONFLICT = "conversation_already_has_active_response"

_COUNTERS = ("sent", "created", "done", "retried", "rejected", "timed_out", "evicted", "foreign")


class Verdict(enum.Enum):
    """What the session should do with a create the server answered with an error."""

    RETRY = "retry"  # put it back at the head of the control lane
    REJECT = "reject"  # fail its handle


@attrs.frozen
class GateEntry:
    """One in-flight response as the gate sees it (a snapshot)."""

    state: Literal["pending", "active", "held"]
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
    state: Literal["pending", "active", "held"]
    event_id: str | None
    response_id: str | None
    since: float
    ours: bool
    untagged: bool = False

    def snapshot(self) -> GateEntry:
        return GateEntry(self.state, self.event_id, self.response_id, self.since, self.ours)


class GateState:
    """The in-band queue of in-flight responses, out-of-band tracking, retries and statistics.

    Not thread-safe and never blocks: the caller serializes access (see
    :class:`~rtqueue.gate.ResponseGate`). ``try_reserve`` / ``note_sent`` are
    the writer's; ``on_*`` the reader's; ``reset`` / ``close`` the connection
    owner's. Times (``now``, ``since``) are in the caller's clock.
    """

    def __init__(self, *, max_retries: int = 3) -> None:
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError("max_retries must be an int >= 0")
        self._max_retries = max_retries
        self._queue: list[_Entry] = []
        self._oob: dict[str, _Entry] = {}  # keyed by event_id, then response_id
        self._retries: dict[str, int] = {}
        self._closed: BaseException | None = None
        self._last_release: float | None = None  # clock time the last release was read
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self._waits: deque[float] = deque(maxlen=_SAMPLES)
        self._latencies: deque[float] = deque(maxlen=_SAMPLES)

    # -- writer side ---------------------------------------------------------

    def try_reserve(self, event_id: str, now: float, untagged: bool = False, holder: str | None = None) -> bool:
        """Reserve the slot for ``event_id`` iff the in-band queue is empty; ``True`` when reserved.

        The reserved entry is ``pending`` since ``now``. ``untagged``: the
        create carries no id in its metadata, so a ``response.created``
        without one is taken as its answer (see :meth:`untagged_pending`).
        ``holder``: the response whose tool chain this create continues; if
        the queue holds nothing but holds, that response's among them (see
        :meth:`on_done`), its hold becomes this create's reservation in the
        same step.
        Raises the close error (:class:`SessionClosed` / :class:`ConnectionLost`
        / the one given) once closed, changing nothing.
        """
        err = self.closed_error()
        if err is not None:
            raise err
        if not self.can_reserve(holder):
            return False
        if holder is not None:
            self._queue[:] = [e for e in self._queue if not (e.state == "held" and e.response_id == holder)]
        self._queue.append(_Entry("pending", event_id, None, now, True, untagged))
        return True

    def can_reserve(self, holder: str | None = None) -> bool:
        """Whether :meth:`try_reserve` with this ``holder`` would reserve now (or raise: closed).

        The queue must be empty, or, for a chain's follow-up, hold nothing but
        holds, one of them its own (two chains can hold at once when the
        server started a response during the first one's tools: each
        follow-up goes in turn, never alongside a live response).
        """
        if self._closed is not None or not self._queue:
            return True
        return (holder is not None and all(e.state == "held" for e in self._queue)
                and any(e.response_id == holder for e in self._queue))

    def release_hold(self, response_id: str, now: float) -> bool:
        """End the hold of ``response_id``'s tool chain (no follow-up after all); ``True`` if it held."""
        released = self._remove_where(lambda e: e.state == "held" and e.response_id == response_id)
        if released:
            self._last_release = now
        return released

    def note_sent(self, event_id: str, waited_s: float, now: float, *, gated: bool = True) -> None:
        """Record that a create left on the wire at ``now`` after waiting ``waited_s`` in total.

        For a gated create that had to wait for a release, the time from that
        release being read to ``now`` is the *gate latency* (DESIGN.md's figure).
        """
        self._counts["sent"] += 1
        if gated:
            self._waits.append(waited_s)
            # Only a create that was waiting when the release came has a gate
            # latency; one that found the gate free would measure idle time.
            if waited_s > 0 and self._last_release is not None and self._last_release >= now - waited_s:
                self._latencies.append(max(0.0, now - self._last_release))

    def abandon(self, event_id: str) -> bool:
        """Drop a reservation whose create could not be sent; whether one was dropped."""
        return self._remove_where(lambda e: e.event_id == event_id and e.state == "pending")

    def note_timed_out(self) -> None:
        """Count a create whose deadline passed before the gate let it through."""
        self._counts["timed_out"] += 1

    def register_oob(self, event_id: str, now: float) -> None:
        """Track an out-of-band create as sent at ``now``; it never takes the slot."""
        self._oob[event_id] = _Entry("pending", event_id, None, now, True)
        self._counts["sent"] += 1

    # -- reader side ---------------------------------------------------------

    def untagged_pending(self, *, any_pending: bool = False) -> str | None:
        """The event id of our pending create that carries no metadata tag, if one is pending.

        At most one in-band create is pending at a time, so a
        ``response.created`` with no tag (server metadata not echoed, or the
        app used every metadata pair) answers it. Server-VAD responses also
        come untagged; if one starts meanwhile, the create earns a conflict
        error naming its id, which is retried as usual. ``any_pending``: a
        tagged create counts too (the server has not shown that it echoes
        metadata).
        """
        for e in self._queue:
            if e.state == "pending" and e.ours and (e.untagged or any_pending):
                return e.event_id
        return None

    def on_created(
        self, response_id: str, event_id: str | None, now: float, *, in_band: bool | None = None
    ) -> Literal["ours", "oob", "foreign", "foreign_oob"]:
        """Record ``response.created`` read at ``now``; returns how it was classified.

        ``in_band`` is the server's own hint (``conversation_id`` present or
        null) for responses we cannot match; ``None`` means unknown, which is
        treated as in-band because taking the slot is the safe side.
        """
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

    def on_done(self, response_id: str, event_id: str | None, now: float, *, hold: bool = False) -> bool:
        """Record ``response.done`` (any status) read at ``now``: remove that response wherever it stands.

        ``event_id`` (from the done's metadata) also releases a still-pending
        entry whose ``response.created`` was never seen. Returns whether
        anything (in-band or out-of-band) was released.

        ``hold``: the response called tools and its follow-up ``response.create``
        will come; its in-band entry stays as a ``held`` entry (keyed by the
        response id) so no other create slips between the tool outputs and the
        follow-up. Only the follow-up (``try_reserve(holder=response_id)``) or
        :meth:`release_hold` ends it. A later ``done`` for the same id does not.
        """
        if hold:
            for entry in self._queue:
                if entry.response_id == response_id and entry.state != "held":
                    entry.state, entry.since = "held", now
                    self._counts["done"] += 1
                    return False
        released = self._remove_where(lambda e: e.response_id == response_id and e.state != "held")
        if not released and event_id is not None:
            released = self._remove_where(lambda e: e.event_id == event_id and e.state != "held")
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

        A conflict (:data:`CONFLICT`) yields ``RETRY`` until the create has
        been retried ``max_retries`` times, then ``REJECT``. Any other error
        for a pending create yields ``REJECT``. ``None`` means the error was
        not about a create the gate holds.
        """
        if event_id is None:
            return None
        if self._oob.pop(event_id, None) is not None:
            self._counts["rejected"] += 1
            return Verdict.REJECT
        if not self._remove_where(lambda e: e.event_id == event_id and e.state == "pending"):
            return None
        if code == CONFLICT:
            n = self._retries.get(event_id, 0)
            if n < self._max_retries:
                self._retries[event_id] = n + 1
                self._counts["retried"] += 1
                return Verdict.RETRY
        self._retries.pop(event_id, None)
        self._counts["rejected"] += 1
        return Verdict.REJECT

    def evict(self, response_id: str, now: float) -> bool:
        """Forcibly release a stale active response (its ``done`` never came); whether one was."""
        removed = self._remove_where(lambda e: e.response_id == response_id)
        removed = self._oob.pop(response_id, None) is not None or removed
        if removed:
            self._counts["evicted"] += 1
            self._last_release = now
        return removed

    # -- connection owner ----------------------------------------------------

    def reset(self) -> list[GateEntry]:
        """Forget everything in flight (the connection was replaced).

        Returns the entries that were dropped (in-band first, then
        out-of-band) so their handles can be failed or re-issued. Counters,
        samples and the close error are kept.
        """
        dropped = [e.snapshot() for e in self._queue] + [e.snapshot() for e in self._oob.values()]
        self._queue.clear()
        self._oob.clear()
        self._retries.clear()
        return dropped

    def close(self, error: BaseException | None = None) -> list[GateEntry]:
        """Close for good and :meth:`reset`; later :meth:`try_reserve` raises ``error``.

        ``error`` defaults to :class:`SessionClosed`. Idempotent (the first
        error is kept). Returns the dropped entries.
        """
        if self._closed is None:
            self._closed = error if error is not None else SessionClosed("session closed")
        return self.reset()

    # -- queries ---------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed is not None

    def closed_error(self) -> BaseException | None:
        """The error a reservation raises once closed (``None`` while open).

        A fresh instance each call for :class:`SessionClosed` /
        :class:`ConnectionLost`, so tracebacks don't pile up on one object.
        """
        err = self._closed
        if isinstance(err, (SessionClosed, ConnectionLost)):
            return type(err)(*err.args)
        return err

    @property
    def max_retries(self) -> int:
        """How many times a server-raced create is retried before it is rejected."""
        return self._max_retries

    @property
    def last_release(self) -> float | None:
        """The ``now`` of the last release (done or evict), ``None`` before the first."""
        return self._last_release

    def retries(self, event_id: str) -> int:
        """How many times the create ``event_id`` has been retried so far."""
        return self._retries.get(event_id, 0)

    def active_response_id(self) -> str | None:
        """The id of the active in-band response at the head, if any."""
        for e in self._queue:
            if e.state == "active":
                return e.response_id
        return None

    def entries(self) -> list[GateEntry]:
        """A snapshot of the in-band queue, head first."""
        return [e.snapshot() for e in self._queue]

    def oob_entries(self) -> list[GateEntry]:
        """A snapshot of the out-of-band responses tracked (pending and active)."""
        return [e.snapshot() for e in self._oob.values()]

    def depth(self) -> int:
        """Number of in-band entries (0 means a create may go now)."""
        return len(self._queue)

    def stats(self) -> GateStats:
        """Counters and wait/latency percentiles so far."""
        waits = [w * 1000 for w in self._waits]
        lats = [v * 1000 for v in self._latencies]
        return GateStats(
            **self.counts(),
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
        return {**self._counts, "depth": len(self._queue), "oob_depth": len(self._oob)}

    def stores(self) -> dict[str, tuple[object, int]]:
        """The capped sample reservoirs, ``name -> (container, cap)`` (memory diagnostics; do not change)."""
        return {"gate_samples": ((self._waits, self._latencies), 2 * _SAMPLES)}

    def latencies_ms(self) -> list[float]:
        """Raw gate latencies (release read -> next create sent), in ms, for benchmarks."""
        return [v * 1000 for v in self._latencies]

    # -- internals -------------------------------------------------------------

    def _remove_where(self, pred: Callable[[_Entry], bool]) -> bool:
        before = len(self._queue)
        self._queue[:] = [e for e in self._queue if not pred(e)]
        return len(self._queue) != before

    def __repr__(self) -> str:
        return f"<GateState depth={len(self._queue)} oob={len(self._oob)} closed={self._closed is not None}>"
