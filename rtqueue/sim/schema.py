"""Conformance checks against the official ``openai`` package's GA models.

``openai`` is a test dependency, not a runtime one: it is imported lazily,
and :func:`validate_server_event` raises ``ImportError`` without it.
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["validate_client_event", "validate_server_event"]


@functools.cache
def _adapters() -> tuple[Any, Any]:
    import pydantic
    from openai.types.realtime import RealtimeClientEvent, RealtimeServerEvent

    return pydantic.TypeAdapter(RealtimeServerEvent), pydantic.TypeAdapter(RealtimeClientEvent)


def validate_server_event(event: dict[str, Any]) -> Any:
    """Validate one server event against ``openai.types.realtime.RealtimeServerEvent``.

    Returns the parsed model; raises ``pydantic.ValidationError`` if the event
    does not fit the union (including an unknown ``type``).
    """
    return _adapters()[0].validate_python(event)


def validate_client_event(event: dict[str, Any]) -> Any:
    """Validate one client event against ``openai.types.realtime.RealtimeClientEvent``."""
    return _adapters()[1].validate_python(event)
