"""OpenTelemetry spans for a session, when ``opentelemetry-api`` is installed.

Install the optional extra (``pip install rtqueue[otel]``) and configure a
tracer provider as usual; rtqueue then emits, on the tracer ``"rtqueue"``:

- ``rtqueue.session``: from connect to close (``rtqueue.session.name``);
- ``rtqueue.turn``: one :meth:`~rtqueue.Session.ask`, its whole chain of
  responses (``rtqueue.turn.text_chars``, ``rtqueue.response.id`` of the last);
- ``rtqueue.response``: from ``response.created`` to ``response.done``, with
  ``rtqueue.response.id``, ``rtqueue.response.status``, ``rtqueue.agent`` and
  ``rtqueue.gate_wait_ms`` (how long our create waited in the gate; absent for
  server-initiated responses);
- ``rtqueue.tool``: one tool call, timed as it ran (``rtqueue.tool.name``,
  ``rtqueue.tool.call_id``, ``rtqueue.tool.ok``, ``rtqueue.agent``,
  ``rtqueue.response.id``);
- ``rtqueue.handoff``: an agent switch (``rtqueue.handoff.source`` / ``.target``).

Configure the provider before connecting: a session looks once, at its
start. Without ``opentelemetry-api``, or with no provider configured, every
call here is a no-op. Spans are started and ended off every lock, on the thread that
learns of the event (never user code: the tracer is the app's SDK).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any

__all__ = ["Telemetry"]

_MAX_OPEN = 256  # response spans kept open at most (a done that never comes must not leak)


class Telemetry:
    """The session's span bookkeeping; inert when OpenTelemetry is absent or ``enabled`` is false."""

    def __init__(self, *, enabled: bool = True) -> None:
        self._tracer: Any = None
        if enabled:
            try:
                from opentelemetry import trace
            except ImportError:
                trace = None  # type: ignore[assignment]
            # Only with a tracer provider configured (an SDK): the API alone would make no-op spans,
            # which still cost the reader a few microseconds per response for nothing.
            if trace is not None and not isinstance(
                trace.get_tracer_provider(), (trace.ProxyTracerProvider, trace.NoOpTracerProvider)
            ):
                self._tracer = trace.get_tracer("rtqueue")
        self._lock = threading.Lock()
        self._session: Any = None
        self._responses: OrderedDict[str, Any] = OrderedDict()

    @property
    def enabled(self) -> bool:
        """Whether spans are emitted."""
        return self._tracer is not None

    def session_started(self, name: str) -> None:
        """Open the session span."""
        if self._tracer is not None:
            self._session = self._tracer.start_span("rtqueue.session", attributes={"rtqueue.session.name": name})

    def session_closed(self) -> None:
        """End the session span and any response span left open."""
        if self._tracer is None:
            return
        with self._lock:
            spans, self._responses = list(self._responses.values()), OrderedDict()
            session, self._session = self._session, None
        for span in spans:
            span.set_attribute("rtqueue.response.status", "unfinished")
            span.end()
        if session is not None:
            session.end()

    def _context(self) -> Any:
        from opentelemetry import trace

        return trace.set_span_in_context(self._session) if self._session is not None else None

    def turn(self, text: str) -> Any:
        """Start a turn span (end it with :meth:`end_turn`); ``None`` when disabled."""
        if self._tracer is None:
            return None
        return self._tracer.start_span("rtqueue.turn", context=self._context(),
                                       attributes={"rtqueue.turn.text_chars": len(text)})

    def end_turn(self, span: Any, response_id: str | None, error: BaseException | None = None) -> None:
        """End a turn span with the id of the response that answered it (or the error)."""
        if span is None:
            return
        if response_id is not None:
            span.set_attribute("rtqueue.response.id", response_id)
        if error is not None:
            span.record_exception(error)
        span.end()

    def response_created(self, response_id: str, agent: str | None, gate_wait_s: float | None) -> None:
        """Open the span of a response the server started."""
        if self._tracer is None:
            return
        attributes: dict[str, Any] = {"rtqueue.response.id": response_id}
        if agent is not None:
            attributes["rtqueue.agent"] = agent
        if gate_wait_s is not None:
            attributes["rtqueue.gate_wait_ms"] = gate_wait_s * 1000.0
        span = self._tracer.start_span("rtqueue.response", context=self._context(), attributes=attributes)
        with self._lock:
            self._responses[response_id] = span
            while len(self._responses) > _MAX_OPEN:
                _, old = self._responses.popitem(last=False)
                old.end()

    def response_done(self, response_id: str, status: str) -> None:
        """End the span of a finished response."""
        if self._tracer is None:
            return
        with self._lock:
            span = self._responses.pop(response_id, None)
        if span is not None:
            span.set_attribute("rtqueue.response.status", status)
            span.end()

    def tool_call(self, *, name: str, call_id: str, agent: str | None, response_id: str | None, ok: bool,
                  duration_ms: float) -> None:
        """A finished tool call, as a span timed as it ran (ending now)."""
        if self._tracer is None:
            return
        end = time.time_ns()
        start = end - int(duration_ms * 1e6)
        attributes: dict[str, Any] = {"rtqueue.tool.name": name, "rtqueue.tool.call_id": call_id,
                                      "rtqueue.tool.ok": ok}
        if agent:
            attributes["rtqueue.agent"] = agent
        if response_id:
            attributes["rtqueue.response.id"] = response_id
        span = self._tracer.start_span("rtqueue.tool", context=self._context(), attributes=attributes,
                                       start_time=start)
        span.end(end_time=end)

    def handoff(self, source: str | None, target: str | None) -> None:
        """An agent switch (an instant span)."""
        if self._tracer is None:
            return
        attributes = {"rtqueue.handoff.source": source or "", "rtqueue.handoff.target": target or ""}
        self._tracer.start_span("rtqueue.handoff", context=self._context(), attributes=attributes).end()
