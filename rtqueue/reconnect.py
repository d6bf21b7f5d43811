"""Reconnecting a session after a dropped socket or ``session_expired``.

Policy (documented for apps):

- Triggers: any loss of the socket not caused by :meth:`Session.close`, and the
  server's ``session_expired`` (60-minute limit). Fatal errors
  (``invalid_api_key``, ``insufficient_quota``, an HTTP 401/403 handshake,
  close code 3000 after such an error) never retry: the session fails with
  :class:`~rtqueue.errors.AuthenticationError` / ``ConnectionLost``.
- Backoff: exponential from ``initial_backoff`` to ``max_backoff`` with
  ``jitter`` (a fraction, full jitter on that part), at most ``max_attempts``.
- On the new socket, before anything the app queued: a ``session.update`` with
  the configuration the session last asked for (the current agent's
  instructions and tools, voice, turn detection), then the conversation
  re-seeded from the items the session holds: text messages, audio turns that
  have a transcript (sent as text), function calls and their outputs. Audio
  without a transcript cannot be carried; it is counted in the
  ``session.reconnected`` event's ``not_carried``.
- Handles in flight: a ``response.create`` sent but not yet started
  (``pending``) is re-issued on the new socket; a response that was already
  streaming (``active``) cannot be resumed and its handle fails with
  :class:`~rtqueue.errors.ConnectionLost`. Events still queued are sent after
  the re-seed, in order. Queued microphone audio is dropped (stale).
- Events: ``session.reconnecting`` (attempt, error, delay) before each try,
  ``session.reconnected`` (attempt, downtime_ms, reseeded, not_carried) after.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import TYPE_CHECKING, Any

import attrs

from .errors import AuthenticationError, ConnectError, ConnectionLost, RtqueueError, ServerError
from .gate import percentile
from .protocol import FATAL_CODES, SESSION_EXPIRED
from .transport import Transport
from .values import Event

if TYPE_CHECKING:
    from .session import Session

__all__ = ["ReconnectPolicy", "Reconnector"]

log = logging.getLogger("rtqueue")


@attrs.frozen
class ReconnectPolicy:
    """How a session reconnects (pass to ``Session.connect(reconnect=...)``)."""

    max_attempts: int = 8
    initial_backoff: float = 0.1
    max_backoff: float = 10.0
    jitter: float = 0.5
    connect_timeout: float = 10.0
    reseed: bool = True


class Reconnector:
    """Owns reconnect attempts for one session (thread ``rtqueue-reconnect-N``)."""

    def __init__(self, session: Session, policy: ReconnectPolicy, *, seed: int | None = None) -> None:
        self._session = session
        self.policy = policy
        self._rand = random.Random(seed)
        self._stop = threading.Event()
        self._fatal: ServerError | None = None
        self._expired = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.reconnects = 0
        self.failures = 0
        self._downtimes: list[float] = []

    def note_server_error(self, err: ServerError) -> None:
        """Reader: remember a fatal error or an expiry; the close that follows decides."""
        if err.code in FATAL_CODES:
            self._fatal = err
        elif err.code == SESSION_EXPIRED:
            self._expired = True

    def handle_lost(self, error: BaseException, transport: Transport) -> bool:
        """Reader (old socket): start reconnecting; ``False`` if this loss is final."""
        if self._stop.is_set():
            return False
        if self._fatal is not None or getattr(transport, "close_code", None) == 3000:
            fatal = self._fatal
            msg = f"not reconnecting: {fatal}" if fatal else "server closed with code 3000 (authentication)"
            self._session._die(AuthenticationError(msg))
            return True
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return True
            self._thread = threading.Thread(
                target=self._run, args=(error,), name=f"rtqueue-reconnect-{self._session._n}", daemon=True
            )
            self._thread.start()
        return True

    def stop(self) -> None:
        """End any attempt in progress (the app closes the session)."""
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(self.policy.connect_timeout + 2.0)

    def stats(self) -> dict[str, Any]:
        """Reconnect counters and downtime percentiles (ms)."""
        d = [x * 1000 for x in self._downtimes]
        return {
            "reconnects": self.reconnects,
            "reconnect_failures": self.failures,
            "reconnect_p50_ms": percentile(d, 50),
            "reconnect_p99_ms": percentile(d, 99),
        }

    # -- the attempt loop ------------------------------------------------------------------

    def _run(self, error: BaseException) -> None:
        session = self._session
        started = time.monotonic()
        session.writer.pause()
        active_failed = self._drop_in_flight()
        reason = "session_expired" if self._expired else str(error)
        self._expired = False
        delay = self.policy.initial_backoff
        for attempt in range(1, self.policy.max_attempts + 1):
            wait = min(delay, self.policy.max_backoff)
            wait = wait * (1 - self.policy.jitter) + self._rand.uniform(0, wait * self.policy.jitter)
            session._publish(Event("session.reconnecting", {"attempt": attempt, "reason": reason, "delay_s": wait,
                                                            "responses_failed": active_failed}))
            if self._stop.wait(wait):
                return
            try:
                transport = session._transport_factory()
            except AuthenticationError as exc:
                session._die(exc)
                return
            except ConnectError as exc:
                self.failures += 1
                reason = str(exc)
                delay *= 2
                continue
            if self._stop.is_set():
                transport.shutdown()
                return
            try:
                reseeded, not_carried = self._resume_on(transport)
            except RtqueueError as exc:
                self.failures += 1
                reason = str(exc)
                delay *= 2
                transport.abort()
                continue
            downtime = time.monotonic() - started
            self._downtimes.append(downtime)
            self.reconnects += 1
            session._publish(Event("session.reconnected", {"attempt": attempt, "downtime_ms": downtime * 1000,
                                                           "reseeded": reseeded, "not_carried": not_carried}))
            return
        session._die(ConnectionLost(f"gave up reconnecting after {self.policy.max_attempts} attempts: {reason}"))

    def _drop_in_flight(self) -> int:
        """Reset the gate; re-queue pending creates, fail the streaming ones."""
        session = self._session
        failed = 0
        for entry in session.gate.reset():
            if entry.event_id is None:
                continue
            with session._lock:
                item = session._creates.get(entry.event_id)
                handle = session._by_eid.get(entry.event_id)
            if entry.state == "pending" and item is not None:
                item.first_wait = None
                session.writer.enqueue(item, front=True)
            elif handle is not None:
                with session._lock:
                    session._by_eid.pop(entry.event_id, None)
                    if handle.response_id:
                        session._by_rid.pop(handle.response_id, None)
                    session._creates.pop(entry.event_id, None)
                session._run_callbacks(handle, handle._fail(ConnectionLost(
                    "the connection dropped while this response was streaming; it cannot be resumed"
                )))
                failed += 1
        with session._lock:
            session._streams.clear()
        return failed

    def _resume_on(self, transport: Transport) -> tuple[int, int]:
        """Adopt ``transport``: configure, re-seed, then let the writer go."""
        session = self._session
        timeout = self.policy.connect_timeout
        with session._replies_cond:
            version = session._config_version
        session._transport = transport
        session._start_reader(transport)
        with session._replies_cond:
            ok = session._replies_cond.wait_for(lambda: session._config_version > version, timeout)
        if not ok:
            raise ConnectError(f"no session.created within {timeout}s after reconnecting")
        reseeded = not_carried = 0
        # The writer is parked: this thread is the only sender until resume().
        config = session._desired_config_for_reconnect()
        if len(config) > 1:
            session._send_direct({"type": "session.update", "session": config})
        if self.policy.reseed:
            items, not_carried = session._reseed_items()
            for item in items:
                session._send_direct({"type": "conversation.item.create", "item": item})
            reseeded = len(items)
        session.writer.resume()
        return reseeded, not_carried
