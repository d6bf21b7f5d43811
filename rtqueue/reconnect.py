"""Reconnecting a session after a dropped socket or ``session_expired``.

Policy (documented for apps):

- **Triggers**: any loss of the socket not caused by :meth:`Session.close`, and
  the server's ``session_expired`` (60-minute limit), which the server follows
  with a close.
- **Fatal errors never retry**: an ``invalid_api_key`` error or a close with
  code 3000 fails the session with :class:`~rtqueue.errors.AuthenticationError`;
  ``insufficient_quota`` / ``account_deactivated`` followed by a close fail it
  with :class:`~rtqueue.errors.ConnectionLost` naming the code; an HTTP 401/403
  handshake on a new attempt raises ``AuthenticationError`` too. Messages
  never carry the key.
- **Backoff**: attempt *n* (1-based) waits ``min(max_backoff, initial_backoff *
  2**(n-1))``, of which the fraction ``jitter`` is random ("equal jitter"):
  the wait is uniform in ``[base * (1 - jitter), base]``. At most
  ``max_attempts`` attempts, then the session fails with ``ConnectionLost``.
- **On the new socket**, before anything the app queued: one
  ``session.update`` with every session field the app (or an agent handoff)
  asked for so far, i.e. the current agent's instructions and tools, voice and
  turn detection; then the conversation re-seeded as ``conversation.item.create``
  events with the original item ids: text messages, audio turns that have a
  transcript (sent as text), function calls with their outputs. What cannot
  be carried is counted by reason in ``session.reconnected``'s
  ``not_carried`` / ``not_carried_by_reason``: ``audio`` (audio without a
  transcript), ``incomplete`` (a message cut mid-stream with no text yet),
  ``dangling_call`` (a function call whose output will never come because its
  response was cut), ``trimmed`` (older than the newest ``max_reseed_items``),
  ``other`` (item types with no text form). The writer resumes only once the
  server answered the ``session.update`` (its ``session.updated``).
- **Handles in flight**: a ``response.create`` sent but not yet started
  (``pending``) is re-issued on the new socket, ahead of what the app queued
  meanwhile; a response that was already streaming (``active``) cannot be
  resumed: its handle fails with :class:`~rtqueue.errors.ConnectionLost`, and a
  ``cancel()`` waiting on it raises the same. Events still queued are sent
  after the re-seed, in order; their handles report ``sent()`` then. Queued
  microphone audio is dropped (stale) and counted in ``audio_dropped``.
- **Events**: ``session.reconnecting`` (``attempt``, ``reason``, ``delay_s``,
  ``responses_failed``, ``creates_reissued``) before each try, and
  ``session.reconnected`` (``attempt``, ``downtime_ms``, ``reseeded``,
  ``not_carried``, ``not_carried_by_reason``) after. A loss during a
  reconnect simply counts as a failed attempt.
- **close()** during a reconnect stops it at once (the backoff wait and the
  handshake waits are cut short) and ends every thread.

**Planned recycling** (calls longer than the 60-minute cap, see
:mod:`rtqueue.recycle` for the decisions and :mod:`rtqueue.recycler` for the
thread): :meth:`Reconnector.recycle` moves a quiet session to a new socket
before the server ends it. It holds the writer, checks that nothing is in
flight and nothing is queued, sends a no-op ``session.update`` on the old
socket and waits for its answer (every event sent before it has then been
processed, so every item the app created is in the history), checks again,
opens the new socket, closes the old one, and resumes on the new one through
the same steps as a reconnect (config, then the re-seed, optionally led by a
summary), keeping the microphone audio queued meanwhile. The app sees
``session.recycling`` and ``session.recycled`` (``old_session_id``,
``new_session_id``, ``forced``, ``summarized``, ``reseeded``,
``not_carried``, ``downtime_ms``). At the hard deadline it recycles anyway,
the way a drop is handled (streaming responses fail, pending creates are
re-issued).
"""

from __future__ import annotations

import functools
import logging
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import attrs

from .errors import (
    AuthenticationError,
    ConnectError,
    ConnectionLost,
    InvalidArgument,
    RtqueueError,
    ServerError,
)
from .gate import percentile
from .history import reseed_plan
from .protocol import FATAL_CODES, SESSION_EXPIRED
from .recycle import Activity, SessionClock, Summary
from .secrets import Secret, redact
from .transport import Transport
from .values import Event

__all__ = [
    "AUTH_CLOSE_CODES",
    "REQUEST_CLOSE_CODES",
    "ReconnectHost",
    "ReconnectPolicy",
    "Reconnector",
    "fatal_loss",
    "reseed_plan",
]

#: Outcomes of :meth:`Reconnector.recycle`.
RECYCLED, BUSY, FAILED, HANDED_OVER, STOPPED = "recycled", "busy", "failed", "handed_over", "stopped"

log = logging.getLogger("rtqueue")

#: WebSocket close codes after which reconnecting cannot help (authentication).
AUTH_CLOSE_CODES = frozenset({3000})
#: Close codes for a request the service refuses as such (missing or unknown model, the retired
#: beta header): the same request will be refused again.
REQUEST_CLOSE_CODES = frozenset({4000})

_AUTH_CODES = frozenset({"invalid_api_key"})


def _positive(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise InvalidArgument(f"{attr.name} must be a positive number, not {value!r}")


def _non_negative(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise InvalidArgument(f"{attr.name} must be a number >= 0, not {value!r}")


def _fraction(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise InvalidArgument(f"{attr.name} must be within [0, 1], not {value!r}")


def _attempts(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgument(f"{attr.name} must be an int >= 1, not {value!r}")


def _optional_positive(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    if value is not None:
        _positive(_inst, attr, value)


def _count(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgument(f"{attr.name} must be an int >= 0, not {value!r}")


def _optional_count(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise InvalidArgument(f"{attr.name} must be an int >= 0 or None, not {value!r}")


def _codes(value: Iterable[int]) -> frozenset[int]:
    return frozenset(value)


@attrs.frozen
class ReconnectPolicy:
    """How a session reconnects (pass to ``Session.connect(reconnect=...)``).

    ``max_attempts`` tries per loss, waiting :meth:`delay` before each;
    ``connect_timeout`` bounds each handshake and each wait for the server's
    answer on the new socket; ``reseed`` re-creates the conversation's items,
    at most the newest ``max_reseed_items`` (``None``: all the session holds).

    Recycling (calls longer than the server's 60-minute cap): ``recycle_after``
    seconds after ``session.created`` (``None``: never) the session looks for
    a quiet moment to move to a new socket; ``recycle_margin`` seconds before
    the cap it moves anyway. The cap is the server's ``expires_at`` (from
    ``session.created``) when it reports one, else ``session_cap`` seconds.
    A history longer than ``summarize_over_chars`` characters of text or
    ``summarize_over_items`` items (``None``: no such limit) is first
    summarised by an out-of-band response on the old socket (bounded by
    ``summary_timeout``); the new session then gets the summary and the last
    ``keep_turns`` user turns verbatim instead of everything.
    """

    max_attempts: int = attrs.field(default=8, validator=_attempts)
    initial_backoff: float = attrs.field(default=0.1, validator=_non_negative)
    max_backoff: float = attrs.field(default=10.0, validator=_non_negative)
    jitter: float = attrs.field(default=0.5, validator=_fraction)
    connect_timeout: float = attrs.field(default=10.0, validator=_positive)
    reseed: bool = True
    max_reseed_items: int | None = attrs.field(default=500, validator=_optional_count)
    #: Close codes from the server that end the session for good (a call socket closed 1000: the call ended).
    final_close_codes: frozenset[int] = attrs.field(default=frozenset(), converter=_codes)
    recycle_after: float | None = attrs.field(default=55 * 60.0, validator=_optional_positive)
    recycle_margin: float = attrs.field(default=30.0, validator=_non_negative)
    session_cap: float = attrs.field(default=60 * 60.0, validator=_positive)
    summarize_over_chars: int | None = attrs.field(default=20_000, validator=_optional_count)
    summarize_over_items: int | None = attrs.field(default=200, validator=_optional_count)
    keep_turns: int = attrs.field(default=4, validator=_count)
    summary_timeout: float = attrs.field(default=30.0, validator=_positive)

    def base_delay(self, attempt: int) -> float:
        """The wait before attempt ``attempt`` (1-based) without jitter."""
        if attempt < 1:
            raise InvalidArgument(f"attempt is 1-based, not {attempt!r}")
        # min() first on the exponent: 2**1000 is fine for ints, but keep floats sane.
        return min(self.max_backoff, self.initial_backoff * 2.0 ** min(attempt - 1, 60))

    def delay(self, attempt: int, rng: random.Random) -> float:
        """The wait before attempt ``attempt``: uniform in ``[base * (1 - jitter), base]``."""
        base = self.base_delay(attempt)
        return base * (1.0 - self.jitter) + rng.uniform(0.0, base * self.jitter)


def fatal_loss(
    close_code: int | None, error: ServerError | None, secret: Secret | str | None = None, close_reason: str = ""
) -> RtqueueError | None:
    """The error a lost connection must end with, if reconnecting cannot help; else ``None``.

    ``error`` is the last fatal server error seen on that connection (a code
    in :data:`~rtqueue.protocol.FATAL_CODES`), or, for a close with one of
    :data:`AUTH_CLOSE_CODES` / :data:`REQUEST_CLOSE_CODES`, the error event
    that came just before it: its text goes into the error raised. Messages
    are redacted.
    """
    if error is not None:
        detail = f"{error.code or error.type or 'error'}: {error.message}"
    else:
        detail = close_reason or f"close code {close_code}"
    if (error is not None and error.code in _AUTH_CODES) or close_code in AUTH_CLOSE_CODES:
        return AuthenticationError(redact(f"the server refused the API key ({detail}); not reconnecting", secret))
    if close_code in REQUEST_CLOSE_CODES:
        return ConnectError(redact(f"the server refused the connection ({detail}); not reconnecting", secret))
    if error is not None and error.code in FATAL_CODES:
        return ConnectionLost(redact(f"the server ended the session ({detail}); not reconnecting", secret))
    return None


class _Stopped(Exception):
    """close() was called while reconnecting."""


class ReconnectHost(Protocol):
    """What a :class:`Reconnector` needs from its session (the session's shell implements it)."""

    name: str  # thread names end with it
    secret: Secret | None

    def open_transport(self) -> Transport:
        """A new connection (raises :class:`ConnectError` / :class:`AuthenticationError`)."""

    def adopt(self, transport: Transport) -> threading.Thread:
        """Make ``transport`` the session's socket and start its reader; returns the reader thread."""

    def current_transport(self) -> Transport | None:
        """The socket the session uses now."""

    def forget_transport(self, transport: Transport) -> None:
        """``transport`` is being discarded: stop using it if it is the current one."""

    def pause_writer(self) -> None:
        """Hold the writer (parked: no send in progress)."""

    def drop_in_flight(self) -> tuple[int, int]:
        """Reset the gate: re-queue creates not started, fail streaming ones; ``(failed, reissued)``."""

    def replay(self, transport: Transport, *, reseed: bool, limit: int | None,
               summary: Summary | None = None) -> tuple[str, int, Counter[str]]:
        """Queue the configuration and the re-seed on the (paused) writer for ``transport``.

        ``summary``: it replaces the items it covers, in the re-seed and in the
        history. Returns ``(update event id, items re-seeded, not carried by reason)``.
        """

    def config_version(self) -> int:
        """Bumped on every ``session.created`` / ``session.updated``."""

    def error_for(self, event_id: str) -> ServerError | None:
        """The server's error naming ``event_id``, if one came."""

    def wait_change(self, ready: Callable[[], bool], timeout: float) -> bool:
        """Block until ``ready()`` (re-checked on every server reply and wake-up) or ``timeout``."""

    def wake(self) -> None:
        """Wake :meth:`wait_change` waiters."""

    def resume_writer(self, error: BaseException | None = None, *, keep_audio: bool = False) -> None:
        """Let the writer send what the app queued; ``error``: the server refused the replayed config.

        ``keep_audio``: send the microphone audio queued meanwhile too (else it is dropped as stale).
        """

    def die(self, error: BaseException) -> None:
        """End the session for good with ``error``."""

    def publish(self, event: Event) -> None:
        """Deliver an event to the app."""

    # Planned recycling (rtqueue.recycler):

    def session_clock(self) -> SessionClock | None:
        """When the current socket's session began and when the server ends it (``None``: not yet)."""

    def activity(self) -> Activity:
        """What is in flight or queued now (never blocks)."""

    def quiet_barrier(self) -> tuple[Activity, Any]:
        """Writer paused: the activity and, only if quiet, a waiter for a no-op ``session.update``
        primed on the current socket (answered once the server processed everything sent before)."""

    def retire_transport(self, transport: Transport, timeout: float) -> None:
        """Stop using ``transport`` as planned: forget it, close it, wait (bounded) for its reader to end."""

    def recycle_seeds(self) -> list[dict[str, Any]]:
        """The items a re-seed would carry now (nothing changes)."""

    def request_summary(self, params: dict[str, Any]) -> Any:
        """Queue an out-of-band ``response.create`` with ``params``; its :class:`~rtqueue.ResponseHandle`."""


class Reconnector:
    """Owns reconnect attempts for one session (thread ``rtqueue-reconnect-N``).

    The reader of a lost socket calls :meth:`handle_lost`; it never blocks. One
    reconnect thread at a time runs the attempt loop; a loss reported while it
    runs (the new socket died too) makes it go round again.
    """

    def __init__(self, host: ReconnectHost, policy: ReconnectPolicy, *, seed: int | None = None) -> None:
        self._host = host
        self.policy = policy
        self._rand = random.Random(seed)
        self._stop = threading.Event()
        self._cond = threading.Condition()  # guards the fields below
        self._running = False
        self._lost: Transport | None = None  # a socket lost while the thread runs
        self._lost_error: BaseException | None = None
        self._fatal_loss: RtqueueError | None = None
        self._thread: threading.Thread | None = None
        self._attempt: tuple[Transport, threading.Thread] | None = None  # socket being adopted, its reader
        # Per connection, written by the reader only:
        self._fatal: ServerError | None = None
        self._last: ServerError | None = None
        self._expired = False
        self.reconnects = 0
        self.failures = 0  # attempts that failed
        self.responses_failed = 0
        self.creates_reissued = 0
        self.not_carried: Counter[str] = Counter()
        self._downtimes: deque[float] = deque(maxlen=10_000)
        # Planned recycles (written by the one recycling thread, read by stats()):
        self.recycles = 0  # switches done, forced ones included
        self.recycles_forced = 0  # at the hard deadline, not at a quiet moment
        self.recycles_summarized = 0  # seeded with a summary
        self.recycles_deferred = 0  # found busy once the writer was held: tried again later
        self.recycle_failures = 0  # the new socket could not be opened: the old one went on
        self._recycle_downtimes: deque[float] = deque(maxlen=10_000)
        self._last_resume: tuple[int, Counter[str]] = (0, Counter())  # the last reconnect's re-seed

    # -- reader side (never blocks) ------------------------------------------------------

    def note_server_error(self, err: ServerError) -> None:
        """Reader: remember a fatal error, an expiry, and the last error (a refusing close carries it)."""
        self._last = err
        if err.code in FATAL_CODES:
            self._fatal = err
        elif err.code == SESSION_EXPIRED:
            self._expired = True

    def handle_lost(self, error: BaseException, transport: Transport, close_code: int | None,
                    close_reason: str = "") -> bool:
        """Reader of a lost socket: reconnect (in the background) or end the session.

        Returns ``False`` only when reconnecting is stopped (the app closes),
        so the caller ends the session its usual way.
        """
        refusing = close_code in AUTH_CLOSE_CODES or close_code in REQUEST_CLOSE_CODES
        fatal = fatal_loss(close_code, self._fatal or (self._last if refusing else None), self._host.secret,
                           close_reason)
        if fatal is None and close_code in self.policy.final_close_codes:
            fatal = ConnectionLost(f"the server ended it (close {close_code}: {close_reason or 'normal'}); "
                                   "not reconnecting")
        with self._cond:
            if self._stop.is_set():
                return False
            if self._running:
                # The thread is mid-attempt on this socket, or just adopted it: it decides.
                self._lost, self._lost_error = transport, error
                if fatal is not None:
                    self._fatal_loss = fatal
                action = "wake"
            elif fatal is not None:
                action = "die"
            else:
                self._running = True
                action = "start"
                self._thread = threading.Thread(
                    target=self._run, args=(error,), name=f"rtqueue-reconnect-{self._host.name}", daemon=True
                )
                self._thread.start()
        if action == "die":
            assert fatal is not None
            self._host.die(fatal)
        elif action == "wake":
            self._host.wake()
        return True

    # -- app side ---------------------------------------------------------------------------

    def stop(self, timeout: float | None = None) -> None:
        """End any attempt in progress at once (the app closes the session)."""
        with self._cond:  # after this, handle_lost() starts no thread
            self._stop.set()
            t = self._thread
        self._host.wake()
        if t is not None and t is not threading.current_thread():
            t.join(self.policy.connect_timeout + 2.0 if timeout is None else timeout)

    @property
    def thread(self) -> threading.Thread | None:
        """The reconnect thread, if one ever ran."""
        return self._thread

    @property
    def reconnecting(self) -> bool:
        """Whether a reconnect is under way."""
        with self._cond:
            return self._running

    def downtimes_ms(self) -> list[float]:
        """Each reconnect's downtime (loss noticed -> writer resumed), in ms."""
        with self._cond:
            return [d * 1000 for d in self._downtimes]

    def stats(self) -> dict[str, Any]:
        """Reconnect counters and downtime percentiles (ms)."""
        d = self.downtimes_ms()
        with self._cond:
            r = [x * 1000 for x in self._recycle_downtimes]
        return {
            "reconnects": self.reconnects,
            "reconnect_failures": self.failures,
            "reconnect_p50_ms": percentile(d, 50),
            "reconnect_p99_ms": percentile(d, 99),
            "responses_failed_by_reconnect": self.responses_failed,
            "creates_reissued": self.creates_reissued,
            "not_carried": sum(self.not_carried.values()),
            "recycles": self.recycles,
            "recycles_forced": self.recycles_forced,
            "recycles_summarized": self.recycles_summarized,
            "recycles_deferred": self.recycles_deferred,
            "recycle_failures": self.recycle_failures,
            "recycle_p50_ms": percentile(r, 50),
            "recycle_p99_ms": percentile(r, 99),
        }

    # -- the reconnect thread ------------------------------------------------------------------

    def _run(self, error: BaseException) -> None:
        self._loop(lambda: self._reconnect(error))

    def _loop(self, first: Callable[[], bool]) -> None:
        """Run ``first`` (a reconnect, or a recycle's switch), then reconnect while the new socket keeps dying."""
        try:
            step = first
            while True:
                if not step():
                    return
                with self._cond:
                    if self._lost is not None and self._lost is self._host.current_transport():
                        # The new socket died before we were done: go round again.
                        error = self._lost_error or ConnectionLost("connection lost")
                        fatal, self._fatal_loss = self._fatal_loss, None
                        self._lost = None
                    else:
                        self._running = False
                        return
                if fatal is not None:
                    self._die(fatal)
                    return
                step = functools.partial(self._reconnect, error)
        except Exception as exc:  # pragma: no cover - a bug must not leave the session hanging
            log.exception("reconnect thread failed")
            self._die(ConnectionLost(f"reconnecting failed: {exc!r}"))

    def _die(self, error: BaseException) -> None:
        with self._cond:
            self._running = False
        if not self._stop.is_set():
            self._host.die(error)

    def _reconnect(self, error: BaseException, reason: str | None = None, summary: Summary | None = None) -> bool:
        """One loss: retry until connected (``True``), or end the session (``False``)."""
        host = self._host
        started = time.monotonic()
        host.pause_writer()
        failed, reissued = host.drop_in_flight()
        self.responses_failed += failed
        self.creates_reissued += reissued
        reason = reason or ("session_expired" if self._expired else str(error))
        for attempt in range(1, self.policy.max_attempts + 1):
            wait = self.policy.delay(attempt, self._rand)
            host.publish(Event("session.reconnecting", {
                "attempt": attempt, "reason": reason, "delay_s": wait,
                "responses_failed": failed, "creates_reissued": reissued,
            }))
            if self._stop.wait(wait):
                return False
            try:
                transport = host.open_transport()
            except AuthenticationError as exc:
                self._die(exc)
                return False
            except ConnectError as exc:
                self.failures += 1
                reason = str(exc)
                continue
            try:
                reseeded, dropped = self._resume_on(transport, summary=summary)
            except _Stopped:
                self._discard(transport)
                return False
            except AuthenticationError as exc:
                self._discard(transport)
                self._die(exc)
                return False
            except RtqueueError as exc:
                fatal = self._take_fatal()
                self._discard(transport)
                if fatal is not None:
                    self._die(fatal)
                    return False
                self.failures += 1
                reason = str(exc)
                continue
            downtime = time.monotonic() - started
            with self._cond:
                self._downtimes.append(downtime)
            self.reconnects += 1
            self.not_carried.update(dropped)
            self._last_resume = (reseeded, dropped)
            log.info("reconnected after %.0f ms (attempt %d)", downtime * 1000, attempt)
            host.publish(Event("session.reconnected", {
                "attempt": attempt, "downtime_ms": downtime * 1000, "reseeded": reseeded,
                "not_carried": sum(dropped.values()), "not_carried_by_reason": dict(dropped),
            }))
            return True
        self._die(ConnectionLost(redact(
            f"gave up reconnecting after {self.policy.max_attempts} attempts: {reason}", host.secret
        )))
        return False

    # -- planned recycling (the recycling thread) ------------------------------------------------

    def recycle(self, summary: Summary | None, *, forced: bool) -> str:
        """Move the session to a new socket now, as planned; runs on the caller's (recycling) thread.

        Not ``forced``: only if the session is quiet once the writer is held,
        and still quiet after the barrier (a no-op ``session.update`` on the
        old socket, answered once the server processed everything sent before
        it); else :data:`BUSY`, having sent nothing but that update. A new
        socket that cannot be opened leaves the old one in use
        (:data:`FAILED`). Then the old socket is closed and the new one gets
        the config and the re-seed (``summary`` first, standing for what it
        covers) before anything the app queued meanwhile, microphone audio
        included.

        ``forced`` (the hard deadline): the old socket is closed at once and
        the rest is a reconnect: streaming responses fail with
        :class:`ConnectionLost`, creates not started are re-issued.

        Returns :data:`RECYCLED`, :data:`BUSY` (a reconnect under way counts
        too), :data:`FAILED`, :data:`HANDED_OVER` (it ended in the reconnect
        path: the new socket failed, or the old one died meanwhile) or
        :data:`STOPPED`.
        """
        host = self._host
        with self._cond:
            if self._stop.is_set():
                return STOPPED
            if self._running:
                return BUSY
            self._running = True
            self._lost = None
        started = time.monotonic()
        clock = host.session_clock()
        old_id = clock.session_id if clock is not None else None
        try:
            return self._switch(host.current_transport(), old_id, summary, forced, started)
        except RtqueueError as exc:  # the session was closed or died under us: nothing to renew
            log.info("recycling stopped: %s", exc)
            return STOPPED
        except Exception as exc:  # pragma: no cover - a bug must not leave the session hanging
            log.exception("recycling the session failed")
            self._die(ConnectionLost(f"recycling the session failed: {exc!r}"))
            return STOPPED

    def _switch(self, old: Transport | None, old_id: str | None, summary: Summary | None, forced: bool,
                started: float) -> str:
        host = self._host
        host.pause_writer()
        new: Transport | None = None
        if not forced and old is not None:
            _activity, barrier = host.quiet_barrier()
            if barrier is None:
                return self._not_now(BUSY, deferred=True)
            try:
                self._await(old, barrier.done, "the answer to the recycle's barrier")
            except _Stopped:
                return STOPPED
            except RtqueueError:
                return self._not_now(BUSY)  # lost meanwhile (handled there), or no answer in time
            if not host.activity().quiet:  # the server started something before the barrier came back
                return self._not_now(BUSY, deferred=True)
            host.publish(Event("session.recycling", {"session_id": old_id, "forced": False,
                                                     "summarized": summary is not None}))
            try:
                new = host.open_transport()
            except (ConnectError, AuthenticationError) as exc:
                self.recycle_failures += 1
                log.warning("recycling: could not open the new socket (%s); going on with the old one", exc)
                return self._not_now(FAILED)
            if self._stop.is_set():  # closed while the handshake ran: the old socket is the app's to close
                new.shutdown()
                return STOPPED
        else:
            host.publish(Event("session.recycling", {"session_id": old_id, "forced": True,
                                                     "summarized": summary is not None}))
        if old is not None:
            host.retire_transport(old, self.policy.connect_timeout)
        with self._cond:
            if self._lost is old:
                self._lost = None  # its end was ours
        done: list[bool] = []
        self._loop(lambda: self._finish_switch(new, old_id, summary, started, done))
        if self._stop.is_set():
            return STOPPED
        return RECYCLED if done else HANDED_OVER

    def _finish_switch(self, new: Transport | None, old_id: str | None, summary: Summary | None, started: float,
                       done: list[bool]) -> bool:
        """The old socket is closed: resume on ``new`` (or reconnect: forced, or it failed). As :meth:`_reconnect`."""
        host = self._host
        if new is None:
            if not self._reconnect(ConnectionLost("the session was recycled at its deadline"),
                                   reason="recycle_deadline", summary=summary):
                return False
            reseeded, dropped = self._last_resume
        else:
            failed, reissued = host.drop_in_flight()  # nothing when quiet; a response the server began since is cut
            self.responses_failed += failed
            self.creates_reissued += reissued
            try:
                reseeded, dropped = self._resume_on(new, summary=summary, keep_audio=True)
            except _Stopped:
                self._discard(new)
                return False
            except AuthenticationError as exc:
                self._discard(new)
                self._die(exc)
                return False
            except RtqueueError as exc:
                fatal = self._take_fatal()
                self._discard(new)
                if fatal is not None:
                    self._die(fatal)
                    return False
                self.recycle_failures += 1
                return self._reconnect(exc, summary=summary)  # the old socket is gone: the drop path
        downtime = time.monotonic() - started
        with self._cond:
            self._recycle_downtimes.append(downtime)
        self.recycles += 1
        self.recycles_forced += new is None
        self.recycles_summarized += summary is not None
        self.not_carried.update(dropped)
        done.append(True)
        clock = host.session_clock()
        log.info("session recycled in %.0f ms (%s)", downtime * 1000, "forced" if new is None else "quiet")
        host.publish(Event("session.recycled", {
            "old_session_id": old_id, "new_session_id": clock.session_id if clock is not None else None,
            "forced": new is None, "summarized": summary is not None, "reseeded": reseeded,
            "not_carried": sum(dropped.values()), "not_carried_by_reason": dict(dropped),
            "downtime_ms": downtime * 1000,
        }))
        return True

    def _not_now(self, outcome: str, *, deferred: bool = False) -> str:
        """Give the writer back to the old socket (its queued mic audio kept) and keep using it.

        If the old socket died while it was held, the usual reconnect takes over, on this thread.
        """
        self.recycles_deferred += deferred
        self._host.resume_writer(keep_audio=True)
        with self._cond:
            if self._stop.is_set():
                return STOPPED
            lost = self._lost
            self._lost = None
            if lost is None or lost is not self._host.current_transport():
                self._running = False
                return outcome
            error = self._lost_error or ConnectionLost("connection lost")
            fatal, self._fatal_loss = self._fatal_loss, None
        if fatal is not None:
            self._die(fatal)
        else:
            self._loop(lambda: self._reconnect(error))
        return HANDED_OVER

    def _take_fatal(self) -> RtqueueError | None:
        with self._cond:
            fatal, self._fatal_loss = self._fatal_loss, None
            return fatal

    def _discard(self, transport: Transport) -> None:
        """Drop a half-adopted socket: its reader must not report the loss as a new one."""
        self._host.forget_transport(transport)
        with self._cond:
            if self._lost is transport:
                self._lost = None
            attempt, self._attempt = self._attempt, None
        reader = attempt[1] if attempt is not None and attempt[0] is transport else None
        if reader is None:
            transport.shutdown()  # no reader ever ran on it
            return
        transport.abort()  # the reader returns and closes it
        if reader is not threading.current_thread():
            reader.join(2.0)

    def _await(self, transport: Transport, ready: Callable[[], bool], what: str) -> None:
        """Wait (bounded) for ``ready()``; raise if stopped, lost again, or late."""
        timeout = self.policy.connect_timeout

        def done() -> bool:
            return ready() or self._stop.is_set() or self._lost is transport

        ok = self._host.wait_change(done, timeout)
        if self._stop.is_set():
            raise _Stopped
        if self._lost is transport:
            fatal = self._fatal_loss
            if isinstance(fatal, AuthenticationError):
                self._fatal_loss = None
                raise fatal
            raise ConnectionLost(f"the new connection was lost while waiting for {what}")
        if not ok:
            raise ConnectError(f"no {what} within {timeout}s after reconnecting")

    def _resume_on(self, transport: Transport, *, summary: Summary | None = None,
                   keep_audio: bool = False) -> tuple[int, Counter[str]]:
        """Adopt ``transport``: configure, re-seed (both sent by the writer), then let the writer go."""
        host = self._host
        version = host.config_version()
        with self._cond:
            if self._stop.is_set():
                raise _Stopped
            self._lost = None
            self._fatal_loss = None
        self._fatal = None
        self._last = None
        self._expired = False
        reader = host.adopt(transport)
        with self._cond:
            self._attempt = (transport, reader)
        self._await(transport, lambda: host.config_version() > version, "session.created")
        version = host.config_version()
        update_id, reseeded, dropped = host.replay(transport, reseed=self.policy.reseed,
                                                   limit=self.policy.max_reseed_items, summary=summary)
        self._await(
            transport,
            lambda: host.config_version() > version or host.error_for(update_id) is not None,
            "session.updated",
        )
        err = host.error_for(update_id)
        if err is not None:
            log.warning("the server refused the configuration on reconnect: %s", err)
            host.publish(Event("rtqueue.error", {"error": err, "message": f"reconnect session.update: {err}"}))
        with self._cond:
            if self._stop.is_set():
                raise _Stopped
            self._attempt = None
            host.resume_writer(err, keep_audio=keep_audio)
        return reseeded, dropped
