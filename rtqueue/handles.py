"""Plain futures: :class:`SendHandle` for any client event, :class:`ResponseHandle` for a
``response.create``, and :class:`Waiter` for anything else a caller blocks on.

A handle knows nothing of the session. It is settled exactly once, by whichever
thread learns the outcome (the writer when sending fails, the reader through
the conversation core on ``response.done`` or ``error``, the session on
close); later settlements are ignored. Waiters block on the handle's own
:class:`threading.Condition`; no user code runs under it. What a handle needs
from the outside comes in as two callables: ``dispatch(fn, handle)`` runs a
done-callback off the caller's thread (the session's dispatcher), and
``canceller(handle, timeout)`` implements :meth:`ResponseHandle.cancel`.

The ``set_*``/``mark_*`` methods are for the session's shell, not for apps.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from .errors import InvalidArgument, ResponseTimeout, RtqueueError
from .values import Response

__all__ = ["ResponseHandle", "SendHandle", "Waiter", "check_timeout"]

T = TypeVar("T")

Dispatch = Callable[[Callable[..., Any], Any], None]


def check_timeout(timeout: object, name: str = "timeout") -> float | None:
    """``timeout`` as seconds (``None``: no limit); :class:`InvalidArgument` unless a number >= 0."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
        raise InvalidArgument(f"{name} must be a number >= 0 or None, not {timeout!r}")
    return float(timeout)


def _run_here(fn: Callable[..., Any], arg: Any) -> None:
    fn(arg)


class Waiter(Generic[T]):
    """A one-shot future: :meth:`set_result` or :meth:`set_error` once; :meth:`get` blocks."""

    def __init__(self, what: str = "result") -> None:
        self._what = what
        self._cond = threading.Condition()
        self._done = False
        self._value: T | None = None
        self._error: BaseException | None = None

    def set_result(self, value: T) -> bool:
        """Settle with ``value``; ``False`` if already settled."""
        with self._cond:
            if self._done:
                return False
            self._done, self._value = True, value
            self._cond.notify_all()
            return True

    def set_error(self, error: BaseException) -> bool:
        """Settle with ``error``; ``False`` if already settled."""
        with self._cond:
            if self._done:
                return False
            self._done, self._error = True, error
            self._cond.notify_all()
            return True

    def done(self) -> bool:
        """Whether it is settled."""
        return self._done

    def get(self, timeout: float | None = None) -> T:
        """The value, or raise the error; :class:`ResponseTimeout` after ``timeout`` seconds."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._done, timeout):
                raise ResponseTimeout(f"no {self._what} within {timeout}s")
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


class SendHandle:
    """Tracks one client event from the app's call until it is written or fails.

    ``wait_sent()`` returns once the event is on the wire and raises the failure
    otherwise (:class:`~rtqueue.errors.SessionClosed`,
    :class:`~rtqueue.errors.ConnectionLost`, ...). Nothing the app queued is
    dropped without its handle saying so.
    """

    def __init__(self, event: dict[str, Any], *, dispatch: Dispatch | None = None) -> None:
        self.event = event
        self._cond = threading.Condition()
        #: When the app queued it (``time.monotonic()``).
        self.queued_at = time.monotonic()
        self._sent_at: float | None = None
        self._error: BaseException | None = None
        self._dispatch = dispatch or _run_here

    @property
    def event_id(self) -> str | None:
        """The client ``event_id`` of the event."""
        eid = self.event.get("event_id")
        return eid if isinstance(eid, str) else None

    @property
    def error(self) -> BaseException | None:
        """Why sending (or the response) failed, if it did."""
        return self._error

    def sent(self) -> bool:
        """Whether the event has been written to the socket."""
        return self._sent_at is not None

    @property
    def sent_at(self) -> float | None:
        """When it was written (``time.monotonic()``), if it was."""
        return self._sent_at

    def wait_sent(self, timeout: float | None = None) -> None:
        """Block until written; raise the failure, or :class:`ResponseTimeout`."""
        timeout = check_timeout(timeout)
        with self._cond:
            if not self._cond.wait_for(lambda: self._sent_at is not None or self._error is not None, timeout):
                raise ResponseTimeout(f"{self.event.get('type')} not sent within {timeout}s")
            if self._sent_at is None and self._error is not None:
                raise self._error

    # -- settlement (the session's shell) ------------------------------------------

    def mark_sent(self) -> None:
        """The writer put it on the wire."""
        with self._cond:
            if self._sent_at is None:
                self._sent_at = time.monotonic()
            self._cond.notify_all()

    def set_error(self, error: BaseException) -> bool:
        """It was not sent: ``error`` says why. ``False`` if already sent or failed."""
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

    def __init__(
        self,
        event: dict[str, Any],
        *,
        in_band: bool = True,
        dispatch: Dispatch | None = None,
        canceller: Callable[[ResponseHandle, float | None], Response | None] | None = None,
    ) -> None:
        super().__init__(event, dispatch=dispatch)
        self.in_band = in_band
        self.response_id: str | None = None
        #: The agent that spoke this response (set when it starts).
        self.agent: str | None = None
        self._canceller = canceller
        self._response: Response | None = None
        self._followup: ResponseHandle | None = None
        self._followup_pending = False
        self._followup_decided = False
        self._callbacks: list[Callable[[ResponseHandle], None]] = []
        self._retries = 0

    def __repr__(self) -> str:
        state = "done" if self.done() else ("sent" if self.sent() else "queued")
        return f"<ResponseHandle {self.event_id} {self.response_id or '-'} {state}>"

    @property
    def retries(self) -> int:
        """How often the server raced this create and it was sent again."""
        return self._retries

    def done(self) -> bool:
        """Whether the outcome is known (a response, or an error)."""
        return self._response is not None or self._error is not None

    def wait(self, timeout: float | None = None) -> Response:
        """Block until ``response.done`` for this request; return the :class:`Response`."""
        timeout = check_timeout(timeout)
        with self._cond:
            if not self._cond.wait_for(self.done, timeout):
                raise ResponseTimeout(f"response {self.response_id or self.event_id} not done within {timeout}s")
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
        timeout = check_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        handle: ResponseHandle = self
        while True:
            response = handle.wait(_left(deadline))
            nxt = handle.wait_followup(_left(deadline))
            if nxt is None:
                return response
            handle = nxt

    def wait_followup(self, timeout: float | None) -> ResponseHandle | None:
        """Once done: the follow-up handle, or ``None`` when the chain ends here."""
        with self._cond:
            # The core decides on a follow-up before it resolves the handle, so
            # this wait is bounded by the tools' run time.
            if not self._cond.wait_for(lambda: not self._followup_pending, timeout):
                raise ResponseTimeout(f"follow-up of {self.response_id} not started within {timeout}s")
            return self._followup

    def cancel(self, timeout: float | None = None) -> Response | None:
        """Cancel this response: unsent -> withdrawn; active -> ``response.cancel`` by id.

        Returns the final :class:`Response` when it was active (after its
        ``response.done``), ``None`` when it was withdrawn before sending or had
        already finished.
        """
        timeout = check_timeout(timeout)
        if self._canceller is None:
            raise RtqueueError("this handle is not attached to a session")
        return self._canceller(self, timeout)

    def add_done_callback(self, fn: Callable[[ResponseHandle], None]) -> None:
        """Call ``fn(handle)`` once done (on the session's dispatcher thread, never the reader)."""
        if not callable(fn):
            raise InvalidArgument(f"add_done_callback() needs a callable, not {type(fn).__name__}")
        with self._cond:
            if not self.done():
                self._callbacks.append(fn)
                return
        self._dispatch(fn, self)

    # -- settlement (the session's shell) ------------------------------------------

    def set_started(self, response_id: str, agent: str | None) -> None:
        """The server started it as ``response_id``."""
        with self._cond:
            self.response_id = response_id
            self.agent = agent
            if self._sent_at is None:
                self._sent_at = time.monotonic()

    def note_retry(self) -> None:
        """The server raced it; it goes out again."""
        with self._cond:
            self._retries += 1

    def set_result(self, response: Response) -> bool:
        """Settle with its :class:`Response`; ``False`` if already settled."""
        with self._cond:
            if self.done():
                return False
            if self._sent_at is None:
                self._sent_at = time.monotonic()
            self._response = response
            self._cond.notify_all()
            cbs, self._callbacks = self._callbacks, []
        self._run(cbs)
        return True

    def set_error(self, error: BaseException) -> bool:
        """Fail it; ``False`` if already settled."""
        with self._cond:
            if self.done():
                return False
            self._error = error
            self._cond.notify_all()
            cbs, self._callbacks = self._callbacks, []
        self._run(cbs)
        return True

    def expect_followup(self) -> None:
        """Tools run for it: :meth:`final` waits for :meth:`set_followup` (a no-op once that was called)."""
        with self._cond:
            if not self._followup_decided:
                self._followup_pending = True

    def set_followup(self, handle: ResponseHandle | None) -> None:
        """The follow-up create (``None``: the chain ends here). The first decision stands."""
        with self._cond:
            if self._followup_decided:
                return
            self._followup_decided = True
            self._followup = handle
            self._followup_pending = False
            self._cond.notify_all()

    def _run(self, cbs: list[Callable[[ResponseHandle], None]]) -> None:
        for fn in cbs:
            self._dispatch(fn, self)


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())
