"""The socket boundary: a small transport over websocket-client.

Only this module touches websocket-client. Its exceptions are mapped to
rtqueue's (:class:`ConnectError`, :class:`AuthenticationError`,
:class:`ConnectionLost`) with the key redacted. Thread contract (from
websocket-client's own rules): exactly one reader thread calls :meth:`recv`
and :meth:`shutdown`; the writer calls :meth:`send`; any thread may call
:meth:`send_close` or :meth:`abort` to make the reader return.
"""

from __future__ import annotations

import socket
import ssl
from typing import Protocol

import websocket  # websocket-client

from .errors import AuthenticationError, ConnectError, ConnectionLost
from .secrets import Secret, redact

__all__ = ["Transport", "WebSocketTransport"]


class Transport(Protocol):
    """What a session needs from a connection (tests may supply their own)."""

    close_code: int | None
    close_reason: str

    def send(self, text: str) -> None:
        """Send one text frame; raise :class:`ConnectionLost` if the socket is gone."""

    def recv(self) -> str | bytes | None:
        """Next frame (str or bytes); ``None`` after a close frame; raise :class:`ConnectionLost`."""

    def send_close(self, code: int = 1000) -> None:
        """Start the closing handshake (any thread; never raises)."""

    def abort(self) -> None:
        """Make a blocked :meth:`recv` return at once (any thread; never raises)."""

    def shutdown(self) -> None:
        """Close the socket (reader thread only; idempotent)."""


class WebSocketTransport:
    """A :class:`Transport` on a ``websocket.WebSocket`` (TLS verification always on)."""

    def __init__(self, ws: websocket.WebSocket, secret: Secret | None = None) -> None:
        self._ws = ws
        self._secret = secret
        self.close_code: int | None = None
        self.close_reason = ""

    @classmethod
    def connect(
        cls, url: str, headers: list[str], *, timeout: float = 10.0, secret: Secret | None = None
    ) -> WebSocketTransport:
        """Open the socket and finish the HTTP upgrade, or raise :class:`ConnectError`."""
        try:
            ws = websocket.create_connection(
                url,
                header=headers,
                timeout=timeout,
                enable_multithread=True,
                # Explicit: certificate and host name are verified (the default).
                sslopt={"cert_reqs": ssl.CERT_REQUIRED, "check_hostname": True},
                skip_utf8_validation=True,  # the server's JSON is parsed anyway
            )
        except websocket.WebSocketBadStatusException as exc:
            msg = redact(f"handshake refused by {url}: HTTP {exc.status_code}", secret)
            if exc.status_code in (401, 403):
                raise AuthenticationError(msg) from None
            raise ConnectError(msg) from None
        except (OSError, websocket.WebSocketException, ValueError) as exc:
            # from None: the cause's repr could carry request headers.
            raise ConnectError(redact(f"cannot connect to {url}: {exc}", secret)) from None
        ws.settimeout(None)  # the reader blocks; abort() wakes it
        return cls(ws, secret)

    def send(self, text: str) -> None:
        """Send one text frame (serialised by websocket-client's send lock)."""
        try:
            self._ws.send(text)
        except (OSError, websocket.WebSocketException, AttributeError) as exc:
            raise ConnectionLost(redact(f"send failed: {exc}", self._secret)) from None

    def recv(self) -> str | bytes | None:
        """Receive one data frame; ``None`` once the peer's close frame arrived."""
        try:
            opcode, data = self._ws.recv_data()
        except websocket.WebSocketConnectionClosedException as exc:
            raise ConnectionLost(f"connection closed without a close frame: {exc}") from None
        except (OSError, websocket.WebSocketException, AttributeError, ValueError) as exc:
            raise ConnectionLost(redact(f"receive failed: {exc}", self._secret)) from None
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            if isinstance(data, (bytes, bytearray)) and len(data) >= 2:
                self.close_code = int.from_bytes(data[:2], "big")
                self.close_reason = bytes(data[2:]).decode("utf-8", "replace")
            else:
                self.close_code = 1005
            return None
        if opcode == websocket.ABNF.OPCODE_TEXT:
            return data.decode("utf-8", "replace") if isinstance(data, (bytes, bytearray)) else data
        return bytes(data)

    def send_close(self, code: int = 1000) -> None:
        """Send a close frame; errors are ignored (the reader will see the end)."""
        try:
            if self._ws.connected:
                self._ws.send_close(code)
        except (OSError, websocket.WebSocketException, AttributeError):
            pass

    def abort(self) -> None:
        """Shut the socket down for both directions so ``recv`` returns."""
        # websocket-client's abort() is a no-op once send_close() cleared
        # `connected`, so shut the raw socket down ourselves.
        sock = self._ws.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def shutdown(self) -> None:
        """Close the socket (reader only)."""
        try:
            self._ws.shutdown()
        except (OSError, AttributeError):
            pass

    def __repr__(self) -> str:
        return f"<WebSocketTransport connected={self._ws.connected}>"
