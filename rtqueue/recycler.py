"""The recycling thread: renews a session before the server's 60-minute cap.

:class:`Recycler` is a thin shell (thread ``rtqueue-recycle-N``) around the
pure decisions of :mod:`rtqueue.recycle`; the switch itself is
:meth:`rtqueue.reconnect.Reconnector.recycle`, the same path a reconnect takes.
For each session (each ``session.created``) it:

1. waits for the window to open (``ReconnectPolicy.recycle_after`` seconds
   after ``session.created``; a reconnect meanwhile starts the count again).
   Until ``LEAD_S`` (5 s) before the first window the session has no thread
   for this: the process-wide ``rtqueue-timers`` thread (:mod:`rtqueue.timers`)
   starts this one then, and it sleeps the rest;
2. looks for a quiet moment every ``poll_s``; at the first one, if the
   history is long, it asks the old socket for a summary (one out-of-band
   response, text only, ``response.metadata["rtqueue_purpose"] ==
   "recycle_summary"``; apps see its events) and waits for it, at most
   ``summary_timeout`` and never past the hard deadline (a summary that fails
   or comes back empty is skipped: the whole history is re-seeded then);
3. switches at the next quiet moment (at once, if nothing started meanwhile);
   from the hard deadline on it switches whatever is going on (with the
   summary if one was made, else the whole history).

**Audio during the switch** is kept, not dropped: the microphone audio the app
appends while the writer is held waits on the writer's audio lane (bounded:
``max_audio_chunks``, 250 chunks, about 5 s of 20 ms chunks; past that the
oldest chunk is dropped and counted in ``stats()["audio_dropped"]``) and goes
out on the new socket right after the re-seed. Why: a planned switch takes
one handshake and a few round trips, so that audio is fresh, and it may hold
the first syllables of the user's next turn, which the new session's VAD
needs. (After an *unplanned* drop the writer drops it instead: it may be
seconds old by then.) ``stats()["recycle_audio_kept"]`` counts the chunks
held while the writer was paused for a recycle and sent afterwards (on the
new socket, or on the old one when the switch was called off).

Nothing here blocks the reader or runs under a lock; :meth:`Recycler.stop`
(from :meth:`Session.close`, any thread) ends the thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from .errors import RtqueueError
from .reconnect import BUSY, FAILED, STOPPED, ReconnectHost, Reconnector, ReconnectPolicy
from .recycle import RecycleWindow, SessionClock, Summary, make_summary, split_for_summary, summary_request
from .timers import TimerHandle, call_at

__all__ = ["Recycler"]

log = logging.getLogger("rtqueue")

#: How often a session in its window looks for a quiet moment (seconds).
POLL_S = 0.05
LEAD_S = 5.0  # the thread starts this long before the window opens
#: Wait after a new socket could not be opened before trying again (seconds).
RETRY_S = 1.0


class Recycler:
    """Renews ``host``'s session through ``reconnector`` as its ``policy`` says (see the module docstring)."""

    def __init__(self, host: ReconnectHost, reconnector: Reconnector, policy: ReconnectPolicy, *,
                 poll_s: float = POLL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self._host = host
        self._reconnector = reconnector
        self.policy = policy
        self._poll = poll_s
        self._clock = clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rtqueue-recycle-{host.name}", daemon=True)
        self.summaries = 0  # summary responses that came back with text
        self.summary_failures = 0  # failed, empty or late: the switch re-seeded everything
        self.window_open = False  # the current session is looking for a quiet moment
        self._timer: TimerHandle | None = None  # starts the thread near the first window
        self._start_lock = threading.Lock()  # start vs stop

    def start(self) -> Recycler:
        """Start recycling: the thread itself starts shortly before the first window opens.

        Until then the session costs no thread: the process-wide timer
        (:mod:`rtqueue.timers`) starts it, ``LEAD_S`` before the window of the
        session current now (a reconnect meanwhile only moves the window
        later, which the thread then waits out).
        """
        clock = self._host.session_clock()
        after = self.policy.recycle_after
        if clock is None or after is None:
            self._launch()
            return self
        window = RecycleWindow.plan(clock, after=after, margin=self.policy.recycle_margin,
                                    cap=self.policy.session_cap)
        when = window.start - LEAD_S
        if when <= self._clock():
            self._launch()
        else:
            self._timer = call_at(when, self._launch)
        return self

    def _launch(self) -> None:
        with self._start_lock:
            if not self._stop.is_set() and not self._thread.is_alive() and self._thread.ident is None:
                self._thread.start()

    @property
    def thread(self) -> threading.Thread:
        """The recycling thread."""
        return self._thread

    def stop(self, timeout: float | None = None) -> None:
        """End the thread (from any thread but its own; bounded by ``timeout``)."""
        with self._start_lock:
            self._stop.set()
            if self._timer is not None:
                self._timer.cancel()
        self._host.wake()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(self.policy.connect_timeout + 2.0 if timeout is None else timeout)

    def stats(self) -> dict[str, Any]:
        """Counters of the summaries and whether a recycle is due now."""
        return {"recycle_summaries": self.summaries, "recycle_summary_failures": self.summary_failures,
                "recycle_due": self.window_open}

    # -- the thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                clock = self._host.session_clock()
                if clock is None:
                    self._wait(lambda: self._host.session_clock() is not None, 1.0)
                    continue
                if not self._one_session(clock):
                    return
        except Exception:  # pragma: no cover - a bug; the session goes on without recycling
            log.exception("the recycling thread failed")

    def _changed(self, clock: SessionClock) -> Callable[[], bool]:
        host = self._host

        def changed() -> bool:
            return self._stop.is_set() or host.session_clock() is not clock

        return changed

    def _wait(self, ready: Callable[[], bool], timeout: float) -> bool:
        return self._host.wait_change(lambda: ready() or self._stop.is_set(), max(0.0, timeout))

    def _one_session(self, clock: SessionClock) -> bool:
        """Recycle the session of ``clock`` once (or notice it was replaced some other way).

        ``False``: the session is closed or dead, the thread ends.
        """
        policy = self.policy
        if policy.recycle_after is None:
            self._wait(self._changed(clock), 3600.0)
            return True
        window = RecycleWindow.plan(clock, after=policy.recycle_after, margin=policy.recycle_margin,
                                    cap=policy.session_cap)
        changed = self._changed(clock)
        while not changed() and self._clock() < window.start:
            self._wait(changed, window.start - self._clock())
        if changed():
            return True
        self.window_open = True
        summary: Summary | None = None
        summarized = False  # one try per session: a summary that fails is not asked for again
        try:
            while not changed():
                decision = window.decide(self._clock(), busy=not self._host.activity().quiet)
                if decision == "recycle" and not summarized:
                    # At the quiet moment, before the switch: everything said so far is in the history.
                    summarized = True
                    summary = self._summarize(window, changed)
                    continue  # time passed: look at the activity again
                if decision != "wait":
                    outcome = self._reconnector.recycle(summary, forced=decision == "force")
                    if outcome == FAILED:
                        self._wait(changed, min(RETRY_S, max(0.0, window.deadline - self._clock())))
                        continue
                    if outcome == STOPPED:
                        return False
                    if outcome != BUSY:
                        return True
                self._wait(changed, self._poll)
        finally:
            self.window_open = False
        return True

    def _summarize(self, window: RecycleWindow, changed: Callable[[], bool]) -> Summary | None:
        """The summary of the older part of a long history, made on the current socket; ``None`` if not needed."""
        policy = self.policy
        split = split_for_summary(self._host.recycle_seeds(), keep_turns=policy.keep_turns,
                                  max_chars=policy.summarize_over_chars, max_items=policy.summarize_over_items)
        if split is None:
            return None
        older, _kept = split
        try:
            handle = self._host.request_summary(summary_request(older))
        except RtqueueError as exc:
            log.warning("recycling: could not ask for a summary (%s)", exc)
            self.summary_failures += 1
            return None
        until = min(self._clock() + policy.summary_timeout, window.deadline)
        response = None
        while response is None and not changed() and self._clock() < until:
            try:
                response = handle.wait(min(self._poll * 4, max(0.0, until - self._clock())))
            except RtqueueError as exc:
                if not handle.done():
                    continue  # not yet: look at stop and the deadline again
                log.warning("recycling: the summary failed (%s)", exc)
                break
        if response is None or response.status != "completed" or not response.text.strip():
            self.summary_failures += 1
            if not handle.done():
                try:
                    handle.cancel(1.0)  # an unfinished summary would keep the session busy
                except RtqueueError:
                    pass
            return None
        self.summaries += 1
        return make_summary(response.text, older)
