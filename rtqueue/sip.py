"""OpenAI SIP calls for synchronous apps: webhooks, call control, ready tools.

The flow of a phone call whose audio OpenAI carries::

    caller --SIP--> OpenAI --POST realtime.call.incoming (signed)--> your webhook
    your app: call = rtqueue.sip.verify_webhook(body, headers, secret)
              control.accept(call.call_id, agent=desk)          # or reject(...)
              with rtqueue.Session.connect(call_id=call.call_id, agent=desk) as s:
                  ...                                           # events, tools, handoffs, DTMF
              control.refer(call.call_id, "tel:+1...") / control.hangup(call.call_id)

- :func:`verify_webhook` checks a delivery with the official ``openai``
  package's Standard Webhooks verification (``webhook-id``,
  ``webhook-timestamp``, ``webhook-signature``, secret ``whsec_...``) and
  returns an :class:`IncomingCall`; a bad signature, a stale timestamp or a
  malformed delivery raises :class:`~rtqueue.errors.WebhookVerificationError`.
- :class:`CallControl` wraps ``openai.OpenAI().realtime.calls``
  (``accept``, ``reject``, ``refer``, ``hangup``) with a configurable
  ``base_url`` (a :class:`~rtqueue.Simulator`'s ``http_base_url``); HTTP
  failures become :class:`~rtqueue.errors.CallControlError` (status code
  kept) or :class:`~rtqueue.errors.ConnectError`.
- :func:`refer_tool` and :func:`hangup_tool` are :class:`~rtqueue.Tool` s an
  agent can call: "transfer me to a human" ends in a SIP REFER. They are
  built per call (they need the :class:`CallControl` and the ``call_id``).

The ``openai`` package is needed here only; it is the ``phone`` extra
(``pip install rtqueue[phone]``) and imported on first use.
"""

from __future__ import annotations

import functools
import json
import os
import types
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import attrs

from .agents import Agent, resolve_agents, session_config_for
from .errors import CallControlError, ConnectError, InvalidArgument, RtqueueError, WebhookVerificationError
from .secrets import Secret, redact
from .tools import Tool

if TYPE_CHECKING:
    import openai

__all__ = [
    "INCOMING_CALL",
    "CallControl",
    "IncomingCall",
    "SipHeader",
    "hangup_tool",
    "refer_tool",
    "verify_webhook",
]

#: The webhook event type of a new SIP call.
INCOMING_CALL = "realtime.call.incoming"
#: Seconds a webhook's timestamp may differ from now (Standard Webhooks' usual 5 minutes).
DEFAULT_TOLERANCE = 300
#: SIP status a reject sends when none is given (603 Decline, the API's default).
DEFAULT_REJECT_STATUS = 603

_NO_TOOL_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


def _openai() -> Any:
    """The ``openai`` module, imported on first use (it is an extra)."""
    try:
        import openai
    except ImportError as exc:
        raise RtqueueError(
            "rtqueue.sip needs the official openai package: pip install 'rtqueue[phone]' (or openai>=1.107)"
        ) from exc
    return openai


# -- webhooks -------------------------------------------------------------------------------------


@attrs.frozen
class SipHeader:
    """One header of the SIP INVITE, as the webhook lists it (untrusted caller metadata)."""

    name: str
    value: str


def _uri(value: str | None) -> str | None:
    """The URI of a From/To header value: inside ``<...>`` when present, else the value up to ``;``."""
    if value is None:
        return None
    if "<" in value and ">" in value:
        return value[value.index("<") + 1 : value.index(">")]
    return value.split(";", 1)[0].strip()


@attrs.frozen
class IncomingCall:
    """A verified ``realtime.call.incoming`` webhook: a call waiting to be accepted or rejected.

    ``call_id`` is what :class:`CallControl` and ``Session.connect(call_id=)``
    take; ``sip_headers`` keep the INVITE's order and repeats; ``data`` is the
    event's raw ``data`` object (read-only). SIP headers are whatever the
    caller's network sent: treat them as claims, not identity.
    """

    call_id: str
    sip_headers: tuple[SipHeader, ...]
    event_id: str
    webhook_id: str
    created_at: int
    data: Mapping[str, Any] = attrs.field(repr=False)

    def header(self, name: str) -> str | None:
        """The first SIP header called ``name`` (case-insensitive), or ``None``."""
        found = self.headers(name)
        return found[0] if found else None

    def headers(self, name: str) -> tuple[str, ...]:
        """Every value of the SIP header ``name`` (case-insensitive), in order."""
        low = name.lower()
        return tuple(h.value for h in self.sip_headers if h.name.lower() == low)

    @property
    def from_uri(self) -> str | None:
        """The caller's URI from the ``From`` header (``sip:+1415...@host``), if any."""
        return _uri(self.header("From"))

    @property
    def to_uri(self) -> str | None:
        """The called URI from the ``To`` header, if any."""
        return _uri(self.header("To"))

    @property
    def caller(self) -> str | None:
        """The user part of :attr:`from_uri` (usually the caller's number), if any."""
        uri = self.from_uri
        if uri is None:
            return None
        user = uri.split(":", 1)[-1]
        return user.split("@", 1)[0] or None


def _plain_headers(headers: object) -> dict[str, str]:
    """Request headers of any common shape as a dict with lower-case names."""
    items: Iterable[Any]
    # A Mapping, or anything with items(): email.message.Message (http.server), httpx.Headers.
    if isinstance(headers, Mapping) or callable(getattr(headers, "items", None)):
        items = headers.items()  # type: ignore[attr-defined]
    elif isinstance(headers, Iterable) and not isinstance(headers, (str, bytes)):
        items = headers
    else:
        raise InvalidArgument(f"headers must be a mapping or (name, value) pairs, not {type(headers).__name__}")
    out: dict[str, str] = {}
    for pair in items:
        try:
            name, value = pair
        except (TypeError, ValueError):
            raise InvalidArgument(f"headers must hold (name, value) pairs, got {pair!r}") from None
        if isinstance(name, bytes):
            name = name.decode("latin-1")
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        if not isinstance(name, str) or not isinstance(value, str):
            raise InvalidArgument(f"header names and values must be str, got {pair!r}")
        out.setdefault(name.lower(), value)  # the first of repeated headers, as servers read them
    return out


def verify_webhook(
    payload: bytes | str,
    headers: Mapping[str, str] | Iterable[tuple[str, str]] | Any,
    secret: str | Secret,
    *,
    tolerance: int = DEFAULT_TOLERANCE,
) -> IncomingCall:
    """Verify a ``realtime.call.incoming`` delivery and return the call.

    ``payload`` is the request body exactly as received (bytes, or the text
    decoded as UTF-8; never re-serialised JSON). ``headers`` are the request
    headers (a dict, ``(name, value)`` pairs, or an object with ``items()``
    such as ``BaseHTTPRequestHandler.headers``). ``secret`` is the webhook's
    signing secret (``whsec_...``). Verification is the official ``openai``
    package's (``client.webhooks.unwrap``): HMAC-SHA256 over
    ``{webhook-id}.{webhook-timestamp}.{body}``, timestamps within
    ``tolerance`` seconds of now.

    Raises :class:`~rtqueue.errors.WebhookVerificationError` (``reason``:
    ``signature``, ``timestamp``, ``headers``, ``payload``, ``event_type``)
    for a delivery that must not be acted on, :class:`InvalidArgument` for
    arguments of the wrong type. The secret never appears in any message.
    """
    if not isinstance(payload, (bytes, bytearray, str)):
        raise InvalidArgument(f"payload must be the raw body (bytes or str), not {type(payload).__name__}")
    if not isinstance(secret, (str, Secret)) or not (secret.reveal() if isinstance(secret, Secret) else secret):
        raise InvalidArgument("secret must be the webhook's signing secret (a non-empty str, 'whsec_...')")
    if isinstance(tolerance, bool) or not isinstance(tolerance, int) or tolerance < 0:
        raise InvalidArgument(f"tolerance must be an int of seconds >= 0, not {tolerance!r}")
    raw_secret = secret.reveal() if isinstance(secret, Secret) else secret
    plain = _plain_headers(headers)
    for name in ("webhook-id", "webhook-timestamp", "webhook-signature"):
        if not plain.get(name):
            raise WebhookVerificationError(f"the delivery has no {name} header", reason="headers")
    body = bytes(payload) if isinstance(payload, bytearray) else payload
    oa = _openai()
    try:
        event = _webhook_client().webhooks.unwrap(body, plain, secret=raw_secret)
    except oa.InvalidWebhookSignatureError as exc:
        text = str(exc)
        low = text.lower()
        # The package's three messages: "Invalid webhook timestamp format", "Webhook timestamp is
        # too old/new", "... signature does not match ...".
        reason = "headers" if "format" in low else ("timestamp" if "timestamp" in low else "signature")
        raise WebhookVerificationError(redact(f"webhook rejected: {text}", raw_secret), reason=reason) from None
    except (ValueError, UnicodeDecodeError) as exc:  # json.JSONDecodeError is a ValueError
        raise WebhookVerificationError(redact(f"webhook body is not a JSON event: {exc}", raw_secret),
                                       reason="payload") from None
    raw = json.loads(body)
    return _incoming_call(raw, plain["webhook-id"], getattr(event, "type", None))


@functools.lru_cache(maxsize=1)
def _webhook_client() -> Any:
    """One ``openai`` client for verifying webhooks (building one costs ~30 ms; it never sends a request).

    The Webhooks resource needs a client object; its key is a placeholder and
    the secret is passed per call, so sharing it across threads is safe.
    """
    return _openai().OpenAI(api_key="unused-for-webhook-verification", max_retries=0)


def _incoming_call(raw: Any, webhook_id: str, event_type: Any) -> IncomingCall:
    if not isinstance(raw, dict):
        raise WebhookVerificationError("webhook body is not a JSON object", reason="payload")
    if event_type != INCOMING_CALL or raw.get("type") != INCOMING_CALL:
        raise WebhookVerificationError(
            f"verified webhook is {raw.get('type')!r}, not {INCOMING_CALL!r}", reason="event_type"
        )
    data = raw.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("call_id"), str) or not data["call_id"]:
        raise WebhookVerificationError(f"{INCOMING_CALL} without data.call_id", reason="payload")
    headers: list[SipHeader] = []
    for h in data.get("sip_headers") or ():
        if isinstance(h, dict) and isinstance(h.get("name"), str) and isinstance(h.get("value"), str):
            headers.append(SipHeader(h["name"], h["value"]))
    created = raw.get("created_at")
    return IncomingCall(
        call_id=data["call_id"],
        sip_headers=tuple(headers),
        event_id=str(raw.get("id") or ""),
        webhook_id=webhook_id,
        created_at=created if isinstance(created, int) and not isinstance(created, bool) else 0,
        data=types.MappingProxyType(data),
    )


# -- call control -----------------------------------------------------------------------------------


def _check_call_id(call_id: object) -> str:
    if not isinstance(call_id, str) or not call_id:
        raise InvalidArgument(f"call_id must be a non-empty str, not {call_id!r}")
    return call_id


class CallControl:
    """Accept, reject, transfer and end SIP calls: ``/v1/realtime/calls/{call_id}/...``.

    A thin synchronous client over the official ``openai`` package's
    ``realtime.calls`` resource. ``api_key`` (a str or
    :class:`~rtqueue.secrets.Secret`; default ``$OPENAI_API_KEY``) is kept in a
    :class:`Secret` and never shows in reprs or errors. ``base_url`` points it
    elsewhere, e.g. ``Simulator.http_base_url`` (``http://127.0.0.1:PORT/v1``).
    ``timeout`` bounds each request (seconds); ``max_retries`` is the
    ``openai`` client's own retry count for connection errors, 429 and 5xx.

    Every method blocks until the server answered and is safe from any thread,
    a tool included. Failures: :class:`~rtqueue.errors.CallControlError`
    (the server refused: ``status_code``, ``code``, ``message``) or
    :class:`~rtqueue.errors.ConnectError` (no answer). Use as a context
    manager or call :meth:`close` to release its HTTP connections.
    """

    def __init__(
        self,
        *,
        api_key: str | Secret | None = None,
        base_url: str | None = None,
        timeout: float = 10.0,
        max_retries: int = 2,
    ) -> None:
        if api_key is not None and not isinstance(api_key, (str, Secret)):
            raise InvalidArgument(f"api_key must be a str, not {type(api_key).__name__}")
        secret = api_key if isinstance(api_key, Secret) else (Secret(api_key) if api_key else None)
        if secret is None and os.environ.get("OPENAI_API_KEY"):
            secret = Secret(os.environ["OPENAI_API_KEY"])
        if secret is None:
            raise InvalidArgument("no API key: pass api_key= or set $OPENAI_API_KEY")
        if base_url is not None and (not isinstance(base_url, str) or not base_url.startswith(("http://", "https://"))):
            raise InvalidArgument(redact(f"base_url must be an http(s):// URL, got {base_url!r}", secret))
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise InvalidArgument(f"timeout must be a positive number of seconds, not {timeout!r}")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise InvalidArgument(f"max_retries must be an int >= 0, not {max_retries!r}")
        self._secret = secret
        self.base_url = base_url
        self.timeout = float(timeout)
        oa = _openai()
        self._openai = oa
        self._client: openai.OpenAI = oa.OpenAI(
            api_key=secret.reveal(), base_url=base_url, timeout=self.timeout, max_retries=max_retries
        )

    def __repr__(self) -> str:
        return f"<rtqueue.sip.CallControl base_url={self.base_url or 'https://api.openai.com/v1'}>"

    def __enter__(self) -> CallControl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP connection pool. Idempotent."""
        self._client.close()

    # -- requests ---------------------------------------------------------------

    def accept(
        self,
        call_id: str,
        *,
        agent: Agent | None = None,
        agents: Iterable[Agent] = (),
        context: Any = None,
        model: str = "gpt-realtime",
        instructions: str | None = None,
        session: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Answer the call and configure its session; returns the body sent.

        The session is ``{"type": "realtime", "model": model}``, then the
        starting ``agent``'s configuration (instructions, tools, handoffs,
        rendered with ``context``; its voice if it has one), then
        ``instructions``, then ``session`` (raw GA session fields, merged
        last). Attach with ``Session.connect(call_id=..., agent=...)`` after
        this returns.
        """
        call_id = _check_call_id(call_id)
        if not isinstance(model, str) or not model:
            raise InvalidArgument("model must be a non-empty str")
        if instructions is not None and not isinstance(instructions, str):
            raise InvalidArgument(f"instructions must be a str, not {type(instructions).__name__}")
        if session is not None and not isinstance(session, Mapping):
            raise InvalidArgument(f"session must be a dict of GA session fields, not {type(session).__name__}")
        if agent is not None and not isinstance(agent, Agent):
            raise InvalidArgument(f"agent must be an rtqueue.Agent, not {type(agent).__name__}")
        body: dict[str, Any] = {"type": "realtime", "model": model}
        extra = tuple(agents)
        start = agent if agent is not None else (extra[0] if extra else None)
        if start is not None:
            body.update(session_config_for(start, resolve_agents(start, extra), context))
            if start.voice is not None:
                body["audio"] = {"output": {"voice": start.voice}}
        if instructions is not None:
            body["instructions"] = instructions
        if session:
            for key, value in session.items():
                if isinstance(value, Mapping) and isinstance(body.get(key), dict):
                    body[key] = {**body[key], **value}
                else:
                    body[key] = value
        fields = {k: v for k, v in body.items() if k != "type"}
        self._request("accept", call_id, lambda calls: calls.accept(call_id, type="realtime", extra_body=fields))
        return body

    def reject(self, call_id: str, *, status_code: int = DEFAULT_REJECT_STATUS) -> None:
        """Decline the call with a SIP status (default 603 Decline; e.g. 486 Busy Here)."""
        call_id = _check_call_id(call_id)
        if isinstance(status_code, bool) or not isinstance(status_code, int) or not 300 <= status_code <= 699:
            raise InvalidArgument(f"status_code must be a SIP status 300..699, not {status_code!r}")
        self._request("reject", call_id, lambda calls: calls.reject(call_id, status_code=status_code))

    def refer(self, call_id: str, target_uri: str) -> None:
        """Transfer the call with a SIP REFER to ``target_uri`` (``tel:+14155550123``, ``sip:desk@example.com``)."""
        call_id = _check_call_id(call_id)
        _check_target_uri(target_uri)
        self._request("refer", call_id, lambda calls: calls.refer(call_id, target_uri=target_uri))

    def hangup(self, call_id: str) -> None:
        """End the call (the caller hears the line drop; attached sockets close)."""
        call_id = _check_call_id(call_id)
        self._request("hangup", call_id, lambda calls: calls.hangup(call_id))

    def _request(self, what: str, call_id: str, send: Any) -> None:
        """Run one request; map the ``openai`` package's errors to rtqueue's (the one place it is done)."""
        oa = self._openai
        try:
            send(self._client.realtime.calls)
        except oa.APIStatusError as exc:
            err = _error_body(exc.body)
            message = err.get("message") if isinstance(err.get("message"), str) else exc.message
            raise CallControlError(
                redact(str(message), self._secret),
                request=f"{what} {call_id}",
                status_code=exc.status_code,
                code=_str_or_none(err.get("code")),
                type=_str_or_none(err.get("type")),
                param=_str_or_none(err.get("param")),
            ) from exc
        except oa.APIConnectionError as exc:
            where = self.base_url or "api.openai.com"
            raise ConnectError(redact(f"{what} {call_id}: no answer from {where}: {exc}", self._secret)) from exc


def _error_body(body: object) -> dict[str, Any]:
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            return inner
    return {}


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _check_target_uri(target_uri: object) -> str:
    if not isinstance(target_uri, str) or not target_uri.startswith(("sip:", "sips:", "tel:")):
        raise InvalidArgument(f"target_uri must be a sip:, sips: or tel: URI, not {target_uri!r}")
    return target_uri


# -- ready tools -----------------------------------------------------------------------------------


def refer_tool(
    control: CallControl,
    call_id: str,
    target_uri: str,
    *,
    name: str = "refer_to_human",
    description: str = (
        "Transfer the caller to a human colleague by phone. Use it when the caller asks for a human, "
        "a person or an operator, or when you cannot help."
    ),
    message: str = "The caller is being transferred now. Say a short goodbye.",
) -> Tool:
    """A tool that transfers ``call_id`` to ``target_uri`` with a SIP REFER when the model calls it.

    Built per call. It returns ``message`` to the model once the REFER was
    accepted; a refused REFER reaches the model as a tool error (and the
    call goes on). After a transfer the call's socket closes.
    """
    call_id = _check_call_id(call_id)
    _check_target_uri(target_uri)
    if not isinstance(control, CallControl):
        raise InvalidArgument(f"control must be a CallControl, not {type(control).__name__}")

    def refer() -> str:
        control.refer(call_id, target_uri)
        return message

    return Tool(name=name, description=description, parameters=dict(_NO_TOOL_PARAMETERS), func=refer,
                timeout=control.timeout * 3 + 1.0)


def hangup_tool(
    control: CallControl,
    call_id: str,
    *,
    name: str = "end_call",
    description: str = "Hang up the phone call. Use it only when the caller says goodbye or asks to end the call.",
) -> Tool:
    """A tool that ends ``call_id`` (``/hangup``) when the model calls it. Built per call.

    Safe inside a running session: the hang-up closes the call's socket from
    the server side; the session then ends by itself (its reconnect is
    refused for an ended call) or when the app closes it.
    """
    call_id = _check_call_id(call_id)
    if not isinstance(control, CallControl):
        raise InvalidArgument(f"control must be a CallControl, not {type(control).__name__}")

    def hang_up() -> str:
        control.hangup(call_id)
        return "The call has ended."

    return Tool(name=name, description=description, parameters=dict(_NO_TOOL_PARAMETERS), func=hang_up,
                timeout=control.timeout * 3 + 1.0)
