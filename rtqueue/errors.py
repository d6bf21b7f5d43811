"""The one exception tree of rtqueue.

Everything rtqueue raises on purpose derives from :class:`RtqueueError`. The tree
separates "you closed it" (:class:`SessionClosed`) from "it broke"
(:class:`ConnectionLost`), and a server's word (:class:`ServerError`) from our
own checks::

    RtqueueError
    +-- InvalidArgument (also TypeError)      wrong types or values from the app
    |   +-- AudioFormatError                   audio in a format the session does not use
    +-- ConnectError                           could not open the socket
    |   +-- AuthenticationError                key refused (fatal: never retried)
    +-- SessionClosed                          the app closed the session
    +-- ConnectionLost                         the socket died under us
    +-- ProtocolError                          a frame we cannot understand
    +-- ServerError                            an ``error`` event from the server
    |   +-- CallControlError                   a call-control REST request refused (HTTP status kept)
    +-- ResponseError                          a response request did not complete
    |   +-- ResponseTimeout                    wait(timeout) ran out (may still finish)
    |   +-- GateTimeout                        never sent: its deadline passed in the gate
    |   +-- ResponseRejected                   the server refused the response.create
    +-- ToolError                              a tool raised, timed out or got bad args
    +-- InputGuardrailTripped                  an input guardrail blocked the user's text
    +-- AudioUnavailable                       no PortAudio / no device
    +-- WebhookVerificationError               a webhook's signature, timestamp or shape is wrong

Low-level exceptions (websocket-client, json, OSError) are mapped to these at
the boundary and chained with ``raise ... from``. An API key never appears in
any message: see :func:`rtqueue.secrets.redact`.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AudioFormatError",
    "AudioUnavailable",
    "AuthenticationError",
    "CallControlError",
    "ConnectError",
    "ConnectionLost",
    "GateTimeout",
    "InputGuardrailTripped",
    "InvalidArgument",
    "ProtocolError",
    "ResponseError",
    "ResponseRejected",
    "ResponseTimeout",
    "RtqueueError",
    "ServerError",
    "SessionClosed",
    "ToolError",
    "WebhookVerificationError",
]


class RtqueueError(Exception):
    """Base class of every error rtqueue raises on purpose."""


class InvalidArgument(RtqueueError, TypeError):
    """The app passed an argument of the wrong type or value.

    Also a :class:`TypeError`, so ``except TypeError`` in app code keeps working.
    """


class AudioFormatError(InvalidArgument):
    """Audio in one format was given to a session negotiated for another (e.g. PCM16 into ``audio/pcmu``)."""


class ConnectError(RtqueueError):
    """The WebSocket could not be opened (DNS, TCP, TLS, HTTP handshake)."""


class AuthenticationError(ConnectError):
    """The server refused our credentials; retrying cannot help."""


class SessionClosed(RtqueueError):
    """The session was closed by the app; nothing more can be sent."""


class ConnectionLost(RtqueueError):
    """The connection broke (not by the app's doing)."""


class ProtocolError(RtqueueError):
    """A server frame could not be understood (malformed JSON, binary, bad shape)."""

    def __init__(self, message: str, *, frame: Any = None) -> None:
        super().__init__(message)
        #: The raw frame (truncated to 200 characters) for diagnosis.
        self.frame = frame


class ServerError(RtqueueError):
    """An ``error`` event sent by the server.

    ``code``, ``type``, ``message``, ``param`` and ``event_id`` mirror the GA
    error object; ``event_id`` names the client event that caused it, if known.
    """

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        type: str | None = None,
        param: str | None = None,
        event_id: str | None = None,
    ) -> None:
        super().__init__(f"{code or type or 'error'}: {message}")
        self.message = message
        self.code = code
        self.type = type
        self.param = param
        self.event_id = event_id

    @classmethod
    def from_event(cls, event: dict[str, Any]) -> ServerError:
        """Build from a server ``error`` event (tolerating missing fields)."""
        err = event.get("error")
        if not isinstance(err, dict):
            err = {}

        def text(key: str) -> str | None:  # a field of the wrong type is treated as absent
            value = err.get(key)
            return value if isinstance(value, str) else None

        return cls(
            text("message") or "unknown server error",
            code=text("code"),
            type=text("type"),
            param=text("param"),
            event_id=text("event_id"),
        )


class CallControlError(ServerError):
    """A call-control request (``/v1/realtime/calls/{call_id}/...``) was refused.

    ``status_code`` is the HTTP status (404 for an unknown call, 400 for a bad
    body or a call in the wrong state, 401 for a refused key...); ``code``,
    ``type``, ``message`` and ``param`` mirror the JSON error body;
    ``request`` says what was asked (e.g. ``"hangup rtc_..."``).
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        code: str | None = None,
        type: str | None = None,
        param: str | None = None,
        request: str | None = None,
    ) -> None:
        super().__init__(message, code=code, type=type, param=param)
        where = f"{request}: " if request else ""
        self.args = (f"{where}HTTP {status_code} {code or type or 'error'}: {message}",)
        self.status_code = status_code
        self.request = request


class ResponseError(RtqueueError):
    """A requested response did not complete as asked."""


class ResponseTimeout(ResponseError, TimeoutError):
    """``wait(timeout)`` ran out; the response may still complete later."""


class GateTimeout(ResponseError, TimeoutError):
    """The ``response.create`` waited past its deadline and was never sent."""


class ResponseRejected(ResponseError):
    """The server answered our ``response.create`` with an error.

    ``error`` is the :class:`ServerError`; a conflict retried too often ends here
    with code ``conversation_already_has_active_response``.
    """

    def __init__(self, message: str, *, error: ServerError | None = None) -> None:
        super().__init__(message)
        self.error = error


class ToolError(RtqueueError):
    """A tool raised, ran past its timeout, or was called with invalid arguments."""


class InputGuardrailTripped(RtqueueError):
    """An input guardrail blocked the user's text; nothing was sent.

    ``guardrail`` is its name, ``result`` its :class:`~rtqueue.guardrails.GuardrailResult`.
    """

    def __init__(self, message: str, *, guardrail: str, result: Any) -> None:
        super().__init__(message)
        self.guardrail = guardrail
        self.result = result


class AudioUnavailable(RtqueueError):
    """Audio devices cannot be used (PortAudio missing, no device, bad format)."""


class WebhookVerificationError(RtqueueError):
    """A webhook could not be trusted or is not the event expected.

    ``reason`` says why: ``"signature"`` (no signature matches the secret),
    ``"timestamp"`` (outside the tolerance: a stale or replayed delivery, or
    a clock far off), ``"headers"`` (a Standard Webhooks header is missing or
    malformed), ``"payload"`` (not the JSON of a webhook event) or
    ``"event_type"`` (verified, but not the event type asked for). Answer
    such a delivery with an HTTP 4xx; never act on it.
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason
