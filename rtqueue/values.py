"""Immutable values the session hands to the app: :class:`Response` and :class:`Event`."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import attrs

__all__ = ["Event", "Response", "response_text"]


def _freeze(d: Mapping[str, Any] | None) -> dict[str, Any]:
    return dict(d) if d else {}


@attrs.frozen
class Response:
    """A finished response, as ``response.done`` reported it.

    ``status`` is one of ``completed``, ``cancelled``, ``failed``,
    ``incomplete``. ``text`` is the output text, or the audio transcript when
    the response spoke. ``output`` holds the output items as the server sent
    them (dicts). ``function_calls`` lists the function-call items.
    """

    id: str
    status: str
    status_details: dict[str, Any] | None = None
    text: str = ""
    output: tuple[dict[str, Any], ...] = ()
    usage: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    conversation_id: str | None = None
    agent: str | None = None  # the agent that was speaking, when agents are used
    audio_ms: float = 0.0  # milliseconds of audio received for this response

    @property
    def function_calls(self) -> tuple[dict[str, Any], ...]:
        """The ``function_call`` output items, in order."""
        return tuple(i for i in self.output if i.get("type") == "function_call")

    @property
    def mcp_approval_requests(self) -> tuple[dict[str, Any], ...]:
        """The ``mcp_approval_request`` output items (hosted MCP calls waiting for a yes), in order."""
        return tuple(i for i in self.output if i.get("type") == "mcp_approval_request")

    @classmethod
    def from_done(
        cls,
        event: dict[str, Any],
        *,
        streamed_text: str = "",
        audio_ms: float = 0.0,
        agent: str | None = None,
    ) -> Response:
        """Build from a ``response.done`` event; ``streamed_text`` fills in when output lacks text."""
        resp = event.get("response")
        if not isinstance(resp, dict):
            resp = {}
        raw_output = resp.get("output")
        output = tuple(i for i in raw_output if isinstance(i, dict)) if isinstance(raw_output, list) else ()
        text = response_text(output) or streamed_text
        details = resp.get("status_details")
        usage = resp.get("usage")
        metadata = resp.get("metadata")
        return cls(
            id=str(resp.get("id") or ""),
            status=str(resp.get("status") or "unknown"),
            status_details=details if isinstance(details, dict) else None,
            text=text,
            output=output,
            usage=usage if isinstance(usage, dict) else None,
            metadata=metadata if isinstance(metadata, dict) else None,
            conversation_id=resp.get("conversation_id") if isinstance(resp.get("conversation_id"), str) else None,
            agent=agent,
            audio_ms=audio_ms,
        )


def response_text(output: tuple[dict[str, Any], ...] | list[dict[str, Any]]) -> str:
    """Join the text (or audio transcript) of every assistant message in ``output``."""
    parts: list[str] = []
    for item in output:
        if item.get("type") != "message":
            continue
        content = item.get("content")
        if not isinstance(content, list):
            continue
        for c in content:
            if not isinstance(c, dict):
                continue
            t = c.get("text") if c.get("type") in ("output_text", "text") else c.get("transcript")
            if isinstance(t, str) and t:
                parts.append(t)
    return " ".join(parts)


@attrs.frozen
class Event:
    """An event delivered to ``Session.on`` callbacks and ``Session.events()``.

    Server events carry the server's JSON in ``data`` (``type`` is its GA type).
    rtqueue's own events use dotted types of their own: ``agent.handoff``,
    ``tool.call``, ``tool.error``, ``session.reconnecting``,
    ``session.reconnected``, ``rtqueue.error``, ``gate.evicted``, ...
    Fields of ``data`` are readable as attributes (``event.source``) or keys
    (``event["source"]``).
    """

    type: str
    data: Mapping[str, Any] = attrs.field(factory=dict, converter=_freeze)
    received_at: float = attrs.field(factory=time.monotonic)

    def __getattr__(self, name: str) -> Any:
        # Only called for names that are not real attributes.
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return self.data[name]
        except KeyError:
            raise AttributeError(f"{self.type} event has no field {name!r}") from None

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        """``data.get(key, default)``."""
        return self.data.get(key, default)

    @property
    def is_server_event(self) -> bool:
        """Whether this came from the server (it has a server ``event_id``)."""
        return "event_id" in self.data and not self.type.startswith(("rtqueue.", "agent.", "tool."))
