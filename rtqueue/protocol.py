"""Protocol facts of the Realtime API (GA) kept in one place.

Event names, error codes, id generation, the endpoint URL and handshake
headers, and the parser that turns a raw frame into a dict (or a
:class:`~rtqueue.errors.ProtocolError`). No sockets here.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets as _rand
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .errors import InvalidArgument, ProtocolError
from .secrets import Secret, redact

__all__ = [
    "BETA_ALIASES",
    "CONFLICT",
    "DEFAULT_MODEL",
    "MAX_METADATA_PAIRS",
    "METADATA_KEY",
    "endpoint",
    "new_event_id",
    "parse_frame",
]

DEFAULT_MODEL = "gpt-realtime"
OPENAI_URL = "wss://api.openai.com/v1/realtime"

#: The key under ``response.metadata`` carrying the client event id of the
#: ``response.create`` that asked for it; it is how ``response.created`` is
#: matched to its request (DESIGN.md section 2).
METADATA_KEY = "rtq_event_id"
#: The API allows at most this many ``response.metadata`` pairs (the SDK's tag
#: is left out when the app's own metadata uses them all).
MAX_METADATA_PAIRS = 16

CONFLICT = "conversation_already_has_active_response"
CANCEL_NOT_ACTIVE = "response_cancel_not_active"
SESSION_EXPIRED = "session_expired"
#: Error codes after which reconnecting cannot help.
FATAL_CODES = frozenset({"invalid_api_key", "insufficient_quota", "account_deactivated"})

#: Beta event names accepted on input, mapped to their GA names.
BETA_ALIASES = {
    "response.audio.delta": "response.output_audio.delta",
    "response.audio.done": "response.output_audio.done",
    "response.audio_transcript.delta": "response.output_audio_transcript.delta",
    "response.audio_transcript.done": "response.output_audio_transcript.done",
    "response.text.delta": "response.output_text.delta",
    "response.text.done": "response.output_text.done",
    "conversation.item.created": "conversation.item.added",
}

_MAX_FRAME_PREVIEW = 200


# Event ids: a random per-process part and a counter (20 hex digits, as token_hex(10) was). Every mic
# chunk takes one, and os.urandom is a system call that releases the GIL: with hundreds of sessions
# each release was a chance for the feeding thread to lose the GIL and queue for it again.
_id_seq = itertools.count(1)
_id_base = _rand.token_hex(4)


def _reseed_ids() -> None:
    global _id_base
    _id_base = _rand.token_hex(4)  # a forked child must not repeat its parent's ids


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reseed_ids)


def new_event_id(prefix: str = "evt_rtq_") -> str:
    """A fresh client event id, unique in this process (ids are matched per connection)."""
    return f"{prefix}{_id_base}{next(_id_seq):012x}"


def parse_frame(frame: str | bytes) -> dict[str, Any]:
    """Parse one server frame into an event dict with a string ``type``.

    Beta event names are renamed to their GA names. Unknown types and fields
    pass through untouched. Raises :class:`ProtocolError` for binary frames,
    invalid JSON, or JSON that is not an object with a string ``type``.
    """
    if isinstance(frame, (bytes, bytearray, memoryview)):
        raise ProtocolError(
            f"unexpected binary frame ({len(frame)} bytes); the Realtime API sends JSON text",
            frame=bytes(frame[:_MAX_FRAME_PREVIEW]),
        )
    try:
        event = json.loads(frame)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(
            f"malformed JSON frame: {exc}", frame=frame[:_MAX_FRAME_PREVIEW]
        ) from exc
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        raise ProtocolError(
            "frame is not a JSON object with a string 'type'", frame=frame[:_MAX_FRAME_PREVIEW]
        )
    alias = BETA_ALIASES.get(event["type"])
    if alias is not None:
        event["type"] = alias
    return event


def endpoint(
    url: str | None,
    *,
    model: str,
    api_key: str | Secret | None,
    azure_endpoint: str | None = None,
    call_id: str | None = None,
) -> tuple[str, list[str], Secret | None]:
    """Work out the WebSocket URL and handshake headers.

    - ``url`` given: used as is (a simulator, a proxy); the key, if any, is sent
      as ``Authorization: Bearer``.
    - ``azure_endpoint`` given: ``wss://<resource>/openai/v1/realtime?model=<deployment>``
      with an ``api-key`` header (``api_key`` or ``$AZURE_OPENAI_API_KEY``).
    - otherwise OpenAI: ``wss://api.openai.com/v1/realtime?model=...`` with
      ``Authorization: Bearer`` from ``api_key`` or ``$OPENAI_API_KEY``.

    ``call_id`` (a SIP call accepted with ``/v1/realtime/calls/{call_id}/accept``)
    attaches to that call's session instead of opening a new one: it is added
    to the query of ``url`` (replacing any ``call_id`` there) or of the Azure
    URL, and OpenAI's URL becomes ``wss://api.openai.com/v1/realtime?call_id=...``
    (no ``model``: the call's model was set when it was accepted).

    Returns ``(url, headers, secret)``; the headers hold the key, so they must
    never be logged. Raises :class:`InvalidArgument` when a key is required
    and missing.
    """
    if call_id is not None and (not isinstance(call_id, str) or not call_id):
        raise InvalidArgument(f"call_id must be a non-empty str, not {call_id!r}")
    if not isinstance(model, str) or not model:
        raise InvalidArgument("model must be a non-empty str")
    if api_key is not None and not isinstance(api_key, (str, Secret)):
        raise InvalidArgument(f"api_key must be a str, not {type(api_key).__name__}")
    secret = api_key if isinstance(api_key, Secret) else (Secret(api_key) if api_key else None)
    if url is not None:
        if not isinstance(url, str) or not url.startswith(("ws://", "wss://")):
            # redact(): a key may sit in the URL's query (?api-key=...).
            raise InvalidArgument(redact(f"url must be a ws:// or wss:// URL, got {url!r}", secret))
        headers = [f"Authorization: Bearer {secret.reveal()}"] if secret else []
        return with_call_id(url, call_id), headers, secret
    if azure_endpoint is not None:
        if secret is None and os.environ.get("AZURE_OPENAI_API_KEY"):
            secret = Secret(os.environ["AZURE_OPENAI_API_KEY"])
        if secret is None:
            raise InvalidArgument("Azure needs api_key= or $AZURE_OPENAI_API_KEY")
        host = azure_endpoint.split("://", 1)[-1].rstrip("/")
        full = f"wss://{host}/openai/v1/realtime?{urlencode({'model': model})}"
        return with_call_id(full, call_id), [f"api-key: {secret.reveal()}"], secret
    if secret is None and os.environ.get("OPENAI_API_KEY"):
        secret = Secret(os.environ["OPENAI_API_KEY"])
    if secret is None:
        raise InvalidArgument(
            "no API key: pass api_key=, set $OPENAI_API_KEY, or pass url= (e.g. a Simulator's)"
        )
    query = {"call_id": call_id} if call_id is not None else {"model": model}
    full = f"{OPENAI_URL}?{urlencode(query)}"
    return full, [f"Authorization: Bearer {secret.reveal()}"], secret


def with_call_id(url: str, call_id: str | None) -> str:
    """``url`` with ``call_id`` set in its query (any earlier ``call_id`` replaced); unchanged for ``None``."""
    if call_id is None:
        return url
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "call_id"]
    query.append(("call_id", call_id))
    return urlunsplit(parts._replace(query=urlencode(query)))


def is_in_band(response: dict[str, Any]) -> bool:
    """Whether a ``response.create``'s response params target the default conversation."""
    return bool(response.get("conversation", "auto") != "none")
