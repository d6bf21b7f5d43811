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
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
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


def _optional_count(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise InvalidArgument(f"{attr.name} must be an int >= 0 or None, not {value!r}")


@attrs.frozen
class ReconnectPolicy:
    """How a session reconnects (pass to ``Session.connect(reconnect=...)``).

    ``max_attempts`` tries per loss, waiting :meth:`delay` before each;
    ``connect_timeout`` bounds each handshake and each wait for the server's
    answer on the new socket; ``reseed`` re-creates the conversation's items,
    at most the newest ``max_reseed_items`` (``None``: all the session holds).
    """

    max_attempts: int = attrs.field(default=8, validator=_attempts)
    initial_backoff: float = attrs.field(default=0.1, validator=_non_negative)
    max_backoff: float = attrs.field(default=10.0, validator=_non_negative)
    jitter: float = attrs.field(default=0.5, validator=_fraction)
    connect_timeout: float = attrs.field(default=10.0, validator=_positive)
    reseed: bool = True
    max_reseed_items: int | None = attrs.field(default=500, validator=_optional_count)

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

    def replay(self, transport: Transport, *, reseed: bool, limit: int | None) -> tuple[str, int, Counter[str]]:
        """Queue the configuration and the re-seed on the (paused) writer for ``transport``.

        Returns ``(update event id, items re-seeded, not carried by reason)``.
        """

    def config_version(self) -> int:
        """Bumped on every ``session.created`` / ``session.updated``."""

    def error_for(self, event_id: str) -> ServerError | None:
        """The server's error naming ``event_id``, if one came."""

    def wait_change(self, ready: Callable[[], bool], timeout: float) -> bool:
        """Block until ``ready()`` (re-checked on every server reply and wake-up) or ``timeout``."""

    def wake(self) -> None:
        """Wake :meth:`wait_change` waiters."""

    def resume_writer(self, error: BaseException | None = None) -> None:
        """Let the writer send what the app queued; ``error``: the server refused the replayed config."""

    def die(self, error: BaseException) -> None:
        """End the session for good with ``error``."""

    def publish(self, event: Event) -> None:
        """Deliver an event to the app."""


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
        return {
            "reconnects": self.reconnects,
            "reconnect_failures": self.failures,
            "reconnect_p50_ms": percentile(d, 50),
            "reconnect_p99_ms": percentile(d, 99),
            "responses_failed_by_reconnect": self.responses_failed,
            "creates_reissued": self.creates_reissued,
            "not_carried": sum(self.not_carried.values()),
        }

    # -- the reconnect thread ------------------------------------------------------------------

    def _run(self, error: BaseException) -> None:
        try:
            while True:
                if not self._reconnect(error):
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
        except Exception as exc:  # pragma: no cover - a bug must not leave the session hanging
            log.exception("reconnect thread failed")
            self._die(ConnectionLost(f"reconnecting failed: {exc!r}"))

    def _die(self, error: BaseException) -> None:
        with self._cond:
            self._running = False
        if not self._stop.is_set():
            self._host.die(error)

    def _reconnect(self, error: BaseException) -> bool:
        """One loss: retry until connected (``True``), or end the session (``False``)."""
        host = self._host
        started = time.monotonic()
        host.pause_writer()
        failed, reissued = host.drop_in_flight()
        self.responses_failed += failed
        self.creates_reissued += reissued
        reason = "session_expired" if self._expired else str(error)
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
                reseeded, dropped = self._resume_on(transport)
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

    def _resume_on(self, transport: Transport) -> tuple[int, Counter[str]]:
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
                                                   limit=self.policy.max_reseed_items)
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
            host.resume_writer(err)
        return reseeded, dropped
