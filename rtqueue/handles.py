"""Per-request wait handles: :class:`SendHandle` for any client event, and
:class:`ResponseHandle` for a ``response.create``.

A handle is resolved exactly once, by whichever thread learns the outcome
(the writer when sending fails, the reader on ``response.done`` or ``error``,
the session on close). Waiters block on a :class:`threading.Condition`; no user
code runs under its lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .errors import InvalidArgument, ResponseTimeout, RtqueueError
from .values import Response

if TYPE_CHECKING:
    from .session import Session

__all__ = ["ResponseHandle", "SendHandle"]


def _check_timeout(timeout: float | None) -> None:
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0):
        raise InvalidArgument(f"timeout must be a number >= 0 or None, not {timeout!r}")


class SendHandle:
    """Tracks one client event from the app's call until it is written or fails.

    ``wait()`` returns once the event is on the wire and raises the failure
    otherwise (:class:`~rtqueue.errors.SessionClosed`,
    :class:`~rtqueue.errors.ConnectionLost`, ...). Nothing the app queued is
    dropped without its handle saying so.
    """

    def __init__(self, event: dict[str, Any]) -> None:
        self.event = event
        self._cond = threading.Condition()
        self._sent_at: float | None = None
        self._error: BaseException | None = None

    @property
    def event_id(self) -> str | None:
        """The client ``event_id`` of the event."""
        eid = self.event.get("event_id")
        return eid if isinstance(eid, str) else None

    @property
    def error(self) -> BaseException | None:
        """Why sending failed, if it did."""
        return self._error

    def sent(self) -> bool:
        """Whether the event has been written to the socket."""
        return self._sent_at is not None

    def wait_sent(self, timeout: float | None = None) -> None:
        """Block until written; raise the failure, or :class:`ResponseTimeout`."""
        _check_timeout(timeout)
        with self._cond:
            if not self._cond.wait_for(lambda: self._sent_at is not None or self._error is not None, timeout):
                raise ResponseTimeout(f"{self.event.get('type')} not sent within {timeout}s")
            if self._error is not None:
                raise self._error

    # -- resolution (internal) -------------------------------------------------

    def _mark_sent(self) -> None:
        with self._cond:
            self._sent_at = time.monotonic()
            self._cond.notify_all()

    def _fail_send(self, error: BaseException) -> bool:
        with self._cond:
            if self._sent_at is not None or self._error is not None:
                return False
            self._error = error
            self._cond.notify_all()
            return True


class ResponseHandle(SendHandle):
    """The app's view of one ``response.create``.

    ``wait()`` returns the :class:`~rtqueue.values.Response` when its
    ``response.done`` arrives (any status, including ``cancelled``), and raises
    :class:`~rtqueue.errors.ResponseTimeout` (the response may still finish),
    :class:`~rtqueue.errors.GateTimeout` (never sent),
    :class:`~rtqueue.errors.ResponseRejected` (the server refused it), or the
    connection's error. ``followup`` links to the response the session created
    after this one's tool calls or handoff; :meth:`final` follows that chain.
    """

    def __init__(self, event: dict[str, Any], session: Session | None = None, *, in_band: bool = True) -> None:
        super().__init__(event)
        self._session = session
        self.in_band = in_band
        self.response_id: str | None = None
        self.retries = 0
        self._response: Response | None = None
        self._followup: ResponseHandle | None = None
        self._followup_pending = False
        self._cancel_requested = False
        self._callbacks: list[Callable[[ResponseHandle], None]] = []

    def __repr__(self) -> str:
        state = "done" if self.done() else ("sent" if self.sent() else "queued")
        return f"<ResponseHandle {self.event_id} {self.response_id or '-'} {state}>"

    def done(self) -> bool:
        """Whether the outcome is known (a response, or an error)."""
        return self._response is not None or self._error is not None

    def wait(self, timeout: float | None = None) -> Response:
        """Block until ``response.done`` for this request; return the :class:`Response`."""
        _check_timeout(timeout)
        with self._cond:
            if not self._cond.wait_for(self.done, timeout):
                raise ResponseTimeout(
                    f"response {self.response_id or self.event_id} not done within {timeout}s"
                )
            if self._error is not None:
                raise self._error
            assert self._response is not None
            return self._response

    def result(self) -> Response | None:
        """The response if done, else ``None`` (never blocks, never raises)."""
        return self._response

    @property
    def followup(self) -> ResponseHandle | None:
        """The response the session created to continue after this one's tool calls."""
        return self._followup

    def final(self, timeout: float | None = None) -> Response:
        """Wait for this response and every follow-up it caused; return the last one.

        A response that called tools or handed off is followed by the session's
        own ``response.create``; the final response is the one that answers the
        user. ``timeout`` covers the whole chain.
        """
        _check_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        handle: ResponseHandle = self
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            response = handle.wait(remaining)
            with handle._cond:
                # The session decides on a follow-up before resolving the handle
                # (it marks _followup_pending first), so this wait is bounded.
                ok = handle._cond.wait_for(
                    lambda h=handle: not h._followup_pending,
                    None if deadline is None else max(0.0, deadline - time.monotonic()),
                )
                if not ok:
                    raise ResponseTimeout(f"follow-up of {handle.response_id} not started within {timeout}s")
                nxt = handle._followup
            if nxt is None:
                return response
            handle = nxt

    def cancel(self, timeout: float | None = None) -> Response | None:
        """Cancel this response: unsent -> withdrawn; active -> ``response.cancel`` by id.

        Returns the final :class:`Response` when it was active (after its
        ``response.done``), ``None`` when it was withdrawn before sending or had
        already finished.
        """
        if self._session is None:
            raise RtqueueError("handle is not attached to a session")
        return self._session._cancel_handle(self, timeout)

    def add_done_callback(self, fn: Callable[[ResponseHandle], None]) -> None:
        """Call ``fn(handle)`` once done (on the session's dispatcher thread, never the reader)."""
        with self._cond:
            if not self.done():
                self._callbacks.append(fn)
                return
        if self._session is not None:
            self._session._dispatch_call(fn, self)
        else:
            fn(self)

    # -- resolution (internal) -------------------------------------------------

    def _resolve(self, response: Response) -> list[Callable[[ResponseHandle], None]] | None:
        """Set the outcome; returns callbacks to run, or ``None`` if already done."""
        with self._cond:
            if self.done():
                return None
            if self._sent_at is None:
                self._sent_at = time.monotonic()
            self._response = response
            self._cond.notify_all()
            cbs, self._callbacks = self._callbacks, []
            return cbs

    def _fail(self, error: BaseException) -> list[Callable[[ResponseHandle], None]] | None:
        """Fail it; returns callbacks to run, or ``None`` if already done."""
        with self._cond:
            if self.done():
                return None
            self._error = error
            self._cond.notify_all()
            cbs, self._callbacks = self._callbacks, []
            return cbs

    def _fail_send(self, error: BaseException) -> bool:
        cbs = self._fail(error)
        if cbs and self._session is not None:
            for fn in cbs:
                self._session._dispatch_call(fn, self)
        return cbs is not None

    def _expect_followup(self) -> None:
        with self._cond:
            self._followup_pending = True

    def _set_followup(self, handle: ResponseHandle | None) -> None:
        with self._cond:
            self._followup = handle
            self._followup_pending = False
            self._cond.notify_all()
