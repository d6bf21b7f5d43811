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

import json
import logging
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

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
from .protocol import FATAL_CODES, SESSION_EXPIRED, new_event_id
from .secrets import Secret, redact
from .transport import Transport
from .values import Event

if TYPE_CHECKING:
    from .session import Session

__all__ = ["AUTH_CLOSE_CODES", "ReconnectPolicy", "Reconnector", "fatal_loss", "reseed_plan"]

log = logging.getLogger("rtqueue")

#: WebSocket close codes after which reconnecting cannot help (authentication).
AUTH_CLOSE_CODES = frozenset({3000})

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
    close_code: int | None, error: ServerError | None, secret: Secret | str | None = None
) -> RtqueueError | None:
    """The error a lost connection must end with, if reconnecting cannot help; else ``None``.

    ``error`` is the last fatal server error seen on that connection (a code
    in :data:`~rtqueue.protocol.FATAL_CODES`). Messages are redacted.
    """
    if (error is not None and error.code in _AUTH_CODES) or close_code in AUTH_CLOSE_CODES:
        detail = f"{error.code}: {error.message}" if error is not None else f"close code {close_code}"
        return AuthenticationError(redact(f"the server refused the API key ({detail}); not reconnecting", secret))
    if error is not None and error.code in FATAL_CODES:
        return ConnectionLost(redact(f"the server ended the session ({error.code}: {error.message}); "
                                     "not reconnecting", secret))
    return None


def reseed_plan(
    items: Iterable[dict[str, Any]],
    *,
    pending_calls: Callable[[str], bool] = lambda _cid: False,
    limit: int | None = None,
) -> tuple[list[dict[str, Any]], Counter[str]]:
    """Items to re-create on a new socket, and what cannot be carried, by reason.

    ``pending_calls(call_id)`` says whether a function call's output is still
    on its way (its tools run or its output is queued); such a call is
    carried even though its output is not in ``items`` yet. ``limit`` keeps
    only the newest items (the rest count as ``trimmed``).
    """
    items = [i for i in items if isinstance(i, dict)]
    outputs = {i.get("call_id") for i in items if i.get("type") == "function_call_output"}
    dropped: Counter[str] = Counter()
    seeds: list[dict[str, Any]] = []
    carried_calls: set[str] = set()
    for item in items:
        typ = item.get("type")
        iid = item.get("id")
        base: dict[str, Any] = {"id": iid} if isinstance(iid, str) and iid else {}
        if typ == "function_call":
            cid = item.get("call_id")
            if not isinstance(cid, str) or not (cid in outputs or pending_calls(cid)):
                dropped["dangling_call"] += 1
                continue
            carried_calls.add(cid)
            seeds.append({**base, "type": "function_call", "call_id": cid, "name": str(item.get("name") or ""),
                          "arguments": str(item.get("arguments") or "")})
        elif typ == "function_call_output":
            cid = item.get("call_id")
            if cid not in carried_calls:
                dropped["dangling_call"] += 1
                continue
            seeds.append({**base, "type": "function_call_output", "call_id": cid,
                          "output": str(item.get("output") or "")})
        elif typ == "message":
            seed, why = _message_seed(item, base)
            if seed is None:
                dropped[why] += 1
            else:
                seeds.append(seed)
        else:
            dropped["other"] += 1
    if limit is not None and len(seeds) > limit:
        cut = len(seeds) - limit
        dropped["trimmed"] += cut
        seeds = seeds[cut:]
        # An output whose call was trimmed away would be refused: drop it too.
        calls = {s["call_id"] for s in seeds if s["type"] == "function_call"}
        kept = [s for s in seeds if s["type"] != "function_call_output" or s["call_id"] in calls]
        dropped["trimmed"] += len(seeds) - len(kept)
        seeds = kept
    return seeds, dropped


def _message_seed(item: dict[str, Any], base: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    role = item.get("role")
    if role not in ("user", "assistant", "system"):
        return None, "other"
    kind = "output_text" if role == "assistant" else "input_text"
    content: list[dict[str, str]] = []
    saw_audio = False
    parts = item.get("content")
    for c in parts if isinstance(parts, list) else ():
        if not isinstance(c, dict):
            continue
        ctype = c.get("type")
        if ctype in ("input_text", "output_text", "text"):
            text = c.get("text")
        else:
            saw_audio = saw_audio or ctype in ("input_audio", "output_audio", "audio")
            text = c.get("transcript")
        if isinstance(text, str) and text:
            content.append({"type": kind, "text": text})
    if content:
        return {**base, "type": "message", "role": role, "content": content}, ""
    if item.get("status") in ("in_progress", "incomplete"):
        return None, "incomplete"
    return None, "audio" if saw_audio else "incomplete"


class _Stopped(Exception):
    """close() was called while reconnecting."""


class Reconnector:
    """Owns reconnect attempts for one session (thread ``rtqueue-reconnect-N``).

    The reader of a lost socket calls :meth:`handle_lost`; it never blocks. One
    reconnect thread at a time runs the attempt loop; a loss reported while it
    runs (the new socket died too) makes it go round again.
    """

    def __init__(self, session: Session, policy: ReconnectPolicy, *, seed: int | None = None) -> None:
        self._session = session
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
        self._expired = False
        self.reconnects = 0
        self.failures = 0  # attempts that failed
        self.responses_failed = 0
        self.creates_reissued = 0
        self.not_carried: Counter[str] = Counter()
        self._downtimes: deque[float] = deque(maxlen=10_000)

    # -- reader side (never blocks) ------------------------------------------------------

    def note_server_error(self, err: ServerError) -> None:
        """Reader: remember a fatal error or an expiry; the close that follows decides."""
        if err.code in FATAL_CODES:
            self._fatal = err
        elif err.code == SESSION_EXPIRED:
            self._expired = True

    def handle_lost(self, error: BaseException, transport: Transport) -> bool:
        """Reader of a lost socket: reconnect (in the background) or end the session.

        Returns ``False`` only when reconnecting is stopped (the app closes),
        so the caller ends the session its usual way.
        """
        fatal = fatal_loss(getattr(transport, "close_code", None), self._fatal, self._session._secret)
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
                    target=self._run, args=(error,), name=f"rtqueue-reconnect-{self._session._n}", daemon=True
                )
                self._thread.start()
        if action == "die":
            assert fatal is not None
            self._session._die(fatal)
        elif action == "wake":
            self._wake()
        return True

    def _running_now(self) -> bool:
        with self._cond:
            return self._running

    # -- app side ---------------------------------------------------------------------------

    def stop(self, timeout: float | None = None) -> None:
        """End any attempt in progress at once (the app closes the session)."""
        with self._cond:  # after this, handle_lost() starts no thread
            self._stop.set()
            t = self._thread
        self._wake()
        if t is not None and t is not threading.current_thread():
            t.join(self.policy.connect_timeout + 2.0 if timeout is None else timeout)

    @property
    def reconnecting(self) -> bool:
        """Whether a reconnect is under way."""
        return self._running_now()

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

    def _wake(self) -> None:
        cond = self._session._replies_cond
        with cond:
            cond.notify_all()

    def _run(self, error: BaseException) -> None:
        try:
            while True:
                if not self._reconnect(error):
                    return
                with self._cond:
                    if self._lost is not None and self._lost is self._session._transport:
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
            log.exception("rtqueue: reconnect thread failed")
            self._die(ConnectionLost(f"reconnecting failed: {exc!r}"))

    def _die(self, error: BaseException) -> None:
        with self._cond:
            self._running = False
        if not self._stop.is_set():
            self._session._die(error)

    def _reconnect(self, error: BaseException) -> bool:
        """One loss: retry until connected (``True``), or end the session (``False``)."""
        session = self._session
        started = time.monotonic()
        session.writer.pause()
        failed, reissued = self._drop_in_flight()
        reason = "session_expired" if self._expired else str(error)
        for attempt in range(1, self.policy.max_attempts + 1):
            wait = self.policy.delay(attempt, self._rand)
            session._publish(Event("session.reconnecting", {
                "attempt": attempt, "reason": reason, "delay_s": wait,
                "responses_failed": failed, "creates_reissued": reissued,
            }))
            if self._stop.wait(wait):
                return False
            try:
                transport = session._transport_factory()
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
            log.info("rtqueue: reconnected after %.0f ms (attempt %d)", downtime * 1000, attempt)
            session._publish(Event("session.reconnected", {
                "attempt": attempt, "downtime_ms": downtime * 1000, "reseeded": reseeded,
                "not_carried": sum(dropped.values()), "not_carried_by_reason": dict(dropped),
            }))
            return True
        self._die(ConnectionLost(redact(
            f"gave up reconnecting after {self.policy.max_attempts} attempts: {reason}", session._secret
        )))
        return False

    def _take_fatal(self) -> RtqueueError | None:
        with self._cond:
            fatal, self._fatal_loss = self._fatal_loss, None
            return fatal

    def _discard(self, transport: Transport) -> None:
        """Drop a half-adopted socket: its reader must not report the loss as a new one."""
        session = self._session
        with self._cond:
            if session._transport is transport:
                session._transport = None
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

    def _drop_in_flight(self) -> tuple[int, int]:
        """Reset the gate; re-queue pending creates, fail the streaming ones."""
        session = self._session
        failed = reissued = 0
        requeue = []
        for entry in session.gate.reset():
            if entry.event_id is None:
                continue  # a server-initiated response: nobody waits on it
            with session._lock:
                item = session._creates.get(entry.event_id)
                handle = session._by_eid.get(entry.event_id)
            if entry.state == "pending" and item is not None:
                item.first_wait = None
                requeue.append(item)
            elif handle is not None:
                with session._lock:
                    session._by_eid.pop(entry.event_id, None)
                    if handle.response_id:
                        session._by_rid.pop(handle.response_id, None)
                    session._creates.pop(entry.event_id, None)
                rid = entry.response_id or handle.response_id
                err = ConnectionLost("the connection dropped while this response was streaming; "
                                     "it cannot be resumed")
                lost = getattr(session, "_lost_rids", None)
                if rid is not None and lost is not None:
                    with session._done_cond:
                        lost[rid] = err
                        while len(lost) > 256:
                            lost.popitem(last=False)
                        session._done_cond.notify_all()
                session._run_callbacks(handle, handle._fail(err))
                failed += 1
        for item in reversed(requeue):  # keep their order at the head of the lane
            session.writer.enqueue(item, front=True)
            reissued += 1
        with session._lock:
            session._streams.clear()
        self.responses_failed += failed
        self.creates_reissued += reissued
        return failed, reissued

    def _await(self, transport: Transport, ready: Callable[[], bool], what: str) -> None:
        """Wait (bounded) for ``ready()``; raise if stopped, lost again, or late."""
        session = self._session
        timeout = self.policy.connect_timeout

        def done() -> bool:
            return ready() or self._stop.is_set() or self._lost is transport

        with session._replies_cond:
            ok = session._replies_cond.wait_for(done, timeout)
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
        """Adopt ``transport``: configure, re-seed, then let the writer go."""
        session = self._session
        with session._replies_cond:
            version = session._config_version
        with self._cond:
            if self._stop.is_set():
                raise _Stopped
            self._lost = None
            self._fatal_loss = None
            session._transport = transport
        self._fatal = None
        self._expired = False
        session._start_reader(transport)
        with self._cond:
            assert session._reader is not None
            self._attempt = (transport, session._reader)
        self._await(transport, lambda: session._config_version > version, "session.created")
        # The writer is parked: this thread is the only sender until resume().
        with session._lock:
            config = json.loads(json.dumps(session._desired))
        with session._replies_cond:
            version = session._config_version
        update_id = new_event_id()
        self._send({"type": "session.update", "event_id": update_id, "session": config})
        dropped: Counter[str] = Counter()
        seeds: list[dict[str, Any]] = []
        if self.policy.reseed:
            # A call the turn worker took on gets its output sent (after the re-seed).
            handled = getattr(session._turns, "_handled", None) or {}
            seeds, dropped = reseed_plan(
                session.items, pending_calls=lambda cid: cid in handled, limit=self.policy.max_reseed_items
            )
            for seed in seeds:
                self._send({"type": "conversation.item.create", "event_id": new_event_id(), "item": seed})
        self._await(
            transport,
            lambda: session._config_version > version or update_id in session._errors_by_eid,
            "session.updated",
        )
        err = session._errors_by_eid.get(update_id)
        if err is not None:
            log.warning("rtqueue: the server refused the configuration on reconnect: %s", err)
            session._publish(Event("rtqueue.error", {"error": err, "message": f"reconnect session.update: {err}"}))
        with self._cond:
            if self._stop.is_set():
                raise _Stopped
            self._attempt = None
            session.writer.resume()
        return len(seeds), dropped

    def _send(self, event: dict[str, Any]) -> None:
        self._session._send_text(json.dumps(event))
