"""Test your own agents without sockets: a mock transport and a scripted server.

Modelled on httpx's ``MockTransport``: the network is replaced by an object the
test controls, and the session under test runs unchanged, with all its
threads and guarantees. Two levels:

- :class:`MockTransport`: *your test* is the server. Push server events with
  :meth:`MockTransport.push`; every client event the session sends is in
  :attr:`MockTransport.sent` (and :meth:`MockTransport.wait_sent` blocks for
  one). An optional ``handler(event) -> [server events]`` answers client
  events as they are sent. By default it answers ``session.update`` with
  ``session.updated`` (so :meth:`~rtqueue.Session.connect` returns) and
  ``response.cancel`` with the cancelled ``response.done``, as the real
  service does.
- :class:`ScriptedServer`: a whole Realtime server without a socket. Each
  connection is the simulator's conversation core (:class:`rtqueue.sim.core.SimSession`,
  unpaced), with its deterministic scripted model, tools and handoffs::

      server = rtqueue.testing.ScriptedServer()
      with rtqueue.Session.connect(transport=server.transport, agent=desk) as session:
          assert session.ask("[tools: lookup_order] order 42").text

Both are plain synchronous objects; nothing here opens a port.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from .errors import ConnectionLost
from .sim.core import SimSession

__all__ = ["MockTransport", "ScriptedServer"]

Handler = Callable[[dict[str, Any]], Iterable[dict[str, Any]]]

_CLOSED = object()


class MockTransport:
    """A :class:`~rtqueue.transport.Transport` whose server is the test (see the module doc).

    ``session`` is the ``session`` object of the first ``session.created``
    (pushed at once unless ``created=False``). ``auto_update`` answers
    ``session.update`` with ``session.updated`` (the session merged);
    ``auto_cancel`` answers ``response.cancel`` with that response's
    ``response.done`` (status ``cancelled``). ``handler`` sees every client
    event after that and returns server events to push.
    """

    def __init__(
        self,
        handler: Handler | None = None,
        *,
        session: dict[str, Any] | None = None,
        created: bool = True,
        auto_update: bool = True,
        auto_cancel: bool = True,
    ) -> None:
        self.close_code: int | None = None
        self.close_reason = ""
        self._handler = handler
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._cond = threading.Condition()
        self._n = 0
        self.session: dict[str, Any] = {"type": "realtime", "object": "realtime.session", **(session or {})}
        self.auto_update = auto_update
        self.auto_cancel = auto_cancel
        #: Every client event sent, parsed, in order.
        self.sent: list[dict[str, Any]] = []
        self.closed = False
        if created:
            self.push(type="session.created", session=dict(self.session))

    # -- the server side (the test) ------------------------------------------------------

    def push(self, **event: Any) -> None:
        """Queue one server event (an ``event_id`` is added when missing)."""
        self.push_event(event)

    def push_event(self, event: dict[str, Any]) -> None:
        """Queue one server event given as a dict."""
        with self._cond:
            self._n += 1
            n = self._n
        self._inbox.put(json.dumps({"event_id": f"event_mock_{n}", **event}))

    def push_raw(self, frame: str | bytes) -> None:
        """Queue a raw frame as it would come off the wire (malformed ones included)."""
        self._inbox.put(frame)

    def close_from_server(self, code: int = 1000, reason: str = "") -> None:
        """The server closes the connection with ``code`` (the reader sees the close frame)."""
        self._inbox.put((_CLOSED, code, reason))

    def drop(self) -> None:
        """The connection breaks (no close frame)."""
        self._inbox.put(ConnectionLost("connection dropped by the mock server"))

    def wait_sent(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 10.0) -> dict[str, Any]:
        """The first sent event matching ``pred``, waiting up to ``timeout`` for it."""
        with self._cond:
            if not self._cond.wait_for(lambda: any(pred(e) for e in self.sent), timeout):
                raise AssertionError(f"no matching client event within {timeout}s; sent: "
                                     f"{[e.get('type') for e in self.sent]}")
            return next(e for e in self.sent if pred(e))

    def sent_of(self, *types: str) -> list[dict[str, Any]]:
        """Client events of these types sent so far, in order, without their ``event_id``."""
        with self._cond:
            return [{k: v for k, v in e.items() if k != "event_id"} for e in self.sent if e.get("type") in types]

    # -- the Transport protocol (the session side) ----------------------------------------

    def send(self, text: str) -> None:
        """The session sends one client event."""
        if self.closed:
            raise ConnectionLost("the mock transport is closed")
        event = json.loads(text)
        with self._cond:
            self.sent.append(event)
            self._cond.notify_all()
        for reply in self._answer(event):
            self.push_event(reply)

    def _answer(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        typ = event.get("type")
        if self.auto_update and typ == "session.update" and isinstance(event.get("session"), dict):
            self.session = _merge(self.session, event["session"])
            out.append({"type": "session.updated", "session": dict(self.session)})
        if self.auto_cancel and typ == "response.cancel" and isinstance(event.get("response_id"), str):
            out.append({"type": "response.done", "response": {
                "object": "realtime.response", "id": event["response_id"], "status": "cancelled",
                "status_details": {"type": "cancelled", "reason": "client_cancelled"}, "output": [],
                "conversation_id": "conv_mock", "metadata": None, "usage": None}})
        if self._handler is not None:
            out.extend(self._handler(event))
        return out

    def recv(self) -> str | bytes | None:
        """The next server frame; ``None`` after a close; raises :class:`ConnectionLost` on a drop."""
        item = self._inbox.get()
        if isinstance(item, BaseException):
            self.closed = True
            raise item
        if isinstance(item, tuple) and item and item[0] is _CLOSED:
            self.closed = True
            self.close_code, self.close_reason = item[1], item[2]
            return None
        return item  # type: ignore[no-any-return]

    def send_close(self, code: int = 1000) -> None:
        """The session closes: the reader sees the close echoed."""
        if not self.closed:
            self.close_from_server(code)

    def abort(self) -> None:
        """Wake a blocked :meth:`recv` with a loss."""
        self._inbox.put(ConnectionLost("aborted"))

    def shutdown(self) -> None:
        """Nothing to release."""
        self.closed = True


class ScriptedServer:
    """A Realtime server without a socket: every :meth:`transport` is a new connection.

    Each connection runs a :class:`~rtqueue.sim.core.SimSession` (unpaced:
    every answer is produced at once, on the session's writer thread) with the
    simulator's scripted model, tools, handoffs, errors and VAD. ``options``
    go to ``SimSession`` (e.g. ``seed``). :attr:`connections` holds every
    connection's core, for assertions (``connections[0].stats()``).
    """

    def __init__(self, **options: Any) -> None:
        options.setdefault("speed", None)
        options.setdefault("first_output_ms", 0.0)
        self._options = options
        self._lock = threading.Lock()
        self.connections: list[SimSession] = []
        self.transports: list[MockTransport] = []

    def transport(self) -> MockTransport:
        """A new connection (use as ``Session.connect(transport=server.transport)``)."""
        with self._lock:
            core = SimSession(now=time.monotonic(), index=len(self.connections), **self._options)
            self.connections.append(core)
        lock = threading.Lock()

        def handler(event: dict[str, Any]) -> list[dict[str, Any]]:
            with lock:
                return core.feed(event, time.monotonic())

        mock = MockTransport(handler, created=False, auto_update=False, auto_cancel=False)
        with lock:
            for ev in core.advance(time.monotonic()):
                mock.push_event(ev)
        with self._lock:
            self.transports.append(mock)
        return mock

    def client_events(self, connection: int = 0) -> list[dict[str, Any]]:
        """What the client sent on one connection."""
        return list(self.transports[connection].sent)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
