"""The socket boundary: a small transport over websocket-client.

Only this module touches websocket-client. Its exceptions are mapped to
rtqueue's (:class:`ConnectError`, :class:`AuthenticationError`,
:class:`ConnectionLost`) with the key redacted. Thread contract (from
websocket-client's own rules): exactly one reader thread calls :meth:`recv`
and :meth:`shutdown`; the writer calls :meth:`send`; any thread may call
:meth:`send_close` or :meth:`abort` to make the reader return.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import sys
import threading
from typing import Any, Protocol

import numpy as np
import websocket  # websocket-client

from .errors import AuthenticationError, ConnectError, ConnectionLost
from .secrets import Secret, redact

__all__ = ["SEND_BACKLOG_BYTES", "SEND_STALL_S", "Transport", "WebSocketTransport"]

#: A send that gets no byte onto the socket for this long means the peer stopped reading: the
#: connection is lost (ConnectionLost, then the session's usual reconnect). Without it a direct mic
#: write, or a Twilio bridge I/O thread carrying it, would block for as long as the peer stalls.
SEND_STALL_S = 5.0

#: Bytes written but not yet sent by the kernel (at most a quarter of the send buffer) past which
#: a socket counts as backed up: threads that must not block leave their writes to the writer.
SEND_BACKLOG_BYTES = 64 * 1024

# Linux's struct tcp_info: tcpi_notsent_bytes (since 4.6) is the u32 at this offset. Other systems
# that define TCP_INFO lay the struct out differently: there the probe is off.
_TCP_INFO = getattr(socket, "TCP_INFO", None) if sys.platform.startswith("linux") else None
_NOTSENT_AT = 144


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

    # Optional (a session uses it when present): ``backed_up() -> bool``, whether a send could
    # block now; see WebSocketTransport.backed_up.


def _xor_mask(key: bytes, data: bytes) -> bytes:
    """RFC 6455 masking: ``data`` XOR the 4-byte ``key`` repeated, as numpy word XORs.

    websocket-client XORs through two Python big integers; for a 6.4 KB mic
    chunk that is ~13 us of held GIL per frame, ~3 us this way.
    """
    n = len(data)
    buf = bytearray(n + 3)  # padded to whole 32-bit words; the pad is cut off below
    buf[:n] = data
    words = np.frombuffer(buf, np.uint32, (n + 3) >> 2)
    words ^= np.frombuffer(key, np.uint32)[0]  # native order on both sides: byte i meets key[i % 4]
    return bytes(memoryview(buf)[:n])


class _Frame(websocket.ABNF):
    """websocket-client's frame with :func:`_xor_mask` for the payload; framing stays the library's."""

    def _get_masked(self, mask_key: str | bytes) -> bytes:
        key = mask_key.encode("latin-1") if isinstance(mask_key, str) else bytes(mask_key)
        data = self.data.encode("latin-1") if isinstance(self.data, str) else (self.data or b"")
        return key + _xor_mask(key, data)


class _BufferedWebSocket(websocket.WebSocket):
    """websocket-client's ``WebSocket``, reading the socket in chunks.

    The library parses each frame with two to four exact-size reads (header,
    extended length, payload), each one ``recv`` system call and so one GIL
    release and re-acquire. With hundreds of sessions in one process those
    hand-offs, not the parsing, made the GIL queue that delayed writers
    (benchmarks/bench_scale.py). Here one ``recv_into`` a buffer owned by the
    connection takes whatever the kernel has (up to ``_CHUNK`` bytes) and the
    library's exact-size requests are served from it; framing, validation and
    control frames stay the library's. The buffer is reused, not reallocated
    per read: 64 KiB reads shrunk to each frame's size fragmented the heap
    (+140 MB/min at 200 sessions). Only the reader thread calls ``_recv``.
    Outgoing frames are masked by :func:`_xor_mask`.

    :meth:`recv_data` takes the frame a server sends nearly always (one whole
    unmasked text or binary frame, no extension bits, not inside a fragmented
    message) straight from the buffer when all of it is there: the library's
    frame parser costs ~25 us of held GIL per frame (a quarter of a
    session's reading), this ~2 us. Every other frame (control frames,
    fragments, one larger than the buffer or not all read yet, anything
    unusual) goes to the library as before.
    """

    _CHUNK = 16384  # the library's own cap on a single read

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rbuf = bytearray(self._CHUNK)
        self._rview = memoryview(self._rbuf)
        self._rpos = 0
        self._rlen = 0

    def _recv(self, bufsize: int) -> bytes:
        if self._rpos >= self._rlen:
            self._rpos, self._rlen = 0, self._fill()
        start = self._rpos
        end = min(self._rlen, start + bufsize)
        self._rpos = end
        return bytes(self._rview[start:end])

    def recv_data(self, control_frame: bool = False) -> tuple[int, Any]:
        """The library's ``recv_data``, with the fast path of the class doc."""
        if self._rpos >= self._rlen:
            self._rpos, self._rlen = 0, self._fill()
        pos, avail = self._rpos, self._rlen - self._rpos
        if avail >= 2 and self.cont_frame.recving_frames is None:
            buf = self._rbuf
            b0, b1 = buf[pos], buf[pos + 1]
            opcode = b0 & 0x0F
            # FIN, no RSV bits, text or binary, not masked (a server never masks).
            if b0 & 0xF0 == 0x80 and opcode in (1, 2) and not b1 & 0x80:
                n, head = b1 & 0x7F, 2
                if n == 126:
                    n, head = (int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4) if avail >= 4 else (-1, 0)
                elif n == 127:
                    n, head = (int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10) if avail >= 10 else (-1, 0)
                if 0 <= n <= avail - head:
                    self._rpos = pos + head + n
                    return opcode, bytes(self._rview[pos + head : pos + head + n])
        return super().recv_data(control_frame)

    def _send(self, data: bytes | str) -> int:
        """One write of the library's send loop, bounded by the socket's send timeout.

        ``SO_SNDTIMEO`` (set at connect) makes a write that cannot queue a
        byte for that long fail with ``EAGAIN``; the library would wait again
        (forever, on a blocking socket), so here it is a lost connection. A
        slow peer that keeps taking bytes never trips it.
        """
        sock = self.sock
        if sock is None:
            raise websocket.WebSocketConnectionClosedException("socket is already closed.")
        try:
            return int(sock.send(data.encode("utf-8") if isinstance(data, str) else data))
        except (BlockingIOError, ssl.SSLWantWriteError):
            raise websocket.WebSocketTimeoutException("the peer took no data within the send timeout") from None

    def send(self, payload: bytes | str, opcode: int = websocket.ABNF.OPCODE_TEXT) -> int:
        """The library's ``send`` (data and control frames), masking with :func:`_xor_mask`."""
        if opcode == websocket.ABNF.OPCODE_TEXT and isinstance(payload, str):
            payload = payload.encode("utf-8")
        return self.send_frame(_Frame(1, 0, 0, 0, opcode, 1, payload))

    def _fill(self) -> int:
        sock = self.sock
        if sock is None:
            raise websocket.WebSocketConnectionClosedException("Connection is closed")
        n = sock.recv_into(self._rbuf)  # blocking socket: returns data, 0 at EOF, or raises OSError
        if n == 0:  # what the library does on EOF
            sock.close()
            self.sock = None
            self.connected = False
            raise websocket.WebSocketConnectionClosedException("Connection to remote host was lost.")
        return n


class _MaskKeys:
    """Frame mask keys from ``os.urandom``, drawn 4 KiB at a time.

    RFC 6455 wants each client frame's key from a strong entropy source;
    websocket-client calls ``os.urandom(4)`` per frame, a system call (and a
    GIL hand-off) per mic chunk. One draw serves 1024 frames. Thread-safe:
    the writer masks data frames, the reader masks its pongs.
    """

    _POOL = 4096

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool = b""
        self._pos = 0

    def __call__(self, length: int) -> bytes:
        with self._lock:
            if self._pos + length > len(self._pool):
                self._pool = os.urandom(max(self._POOL, length))
                self._pos = 0
            key = self._pool[self._pos : self._pos + length]
            self._pos += length
            return key


def _set_send_timeout(sock: socket.socket | None, seconds: float) -> None:
    """``SO_SNDTIMEO``: a blocking send that cannot queue a byte for ``seconds`` fails with EAGAIN."""
    if sock is None or not seconds > 0:
        return
    if os.name == "nt":  # a DWORD of milliseconds
        value = struct.pack("I", max(1, int(seconds * 1000)))
    else:  # struct timeval
        value = struct.pack("ll", int(seconds), int((seconds % 1) * 1_000_000))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)
    except (OSError, ValueError):  # a socket type without it: sends stay unbounded, as before
        pass


class WebSocketTransport:
    """A :class:`Transport` on a ``websocket.WebSocket`` (TLS verification always on)."""

    def __init__(self, ws: websocket.WebSocket, secret: Secret | None = None) -> None:
        self._ws = ws
        self._secret = secret
        self.close_code: int | None = None
        self.close_reason = ""

    @classmethod
    def connect(
        cls, url: str, headers: list[str], *, timeout: float = 10.0, secret: Secret | None = None,
        send_stall_s: float = SEND_STALL_S,
    ) -> WebSocketTransport:
        """Open the socket and finish the HTTP upgrade, or raise :class:`ConnectError`.

        ``send_stall_s``: a send that gets no byte out for this long fails with
        :class:`ConnectionLost` (see :data:`SEND_STALL_S`).
        """
        try:
            ws = websocket.create_connection(
                url,
                header=headers,
                timeout=timeout,
                enable_multithread=True,
                # Explicit: certificate and host name are verified (the default).
                sslopt={"cert_reqs": ssl.CERT_REQUIRED, "check_hostname": True},
                skip_utf8_validation=True,  # the server's JSON is parsed anyway
                class_=_BufferedWebSocket,
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
        _set_send_timeout(ws.sock, send_stall_s)
        ws.set_mask_key(_MaskKeys())
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
            raise ConnectionLost(redact(f"connection closed without a close frame: {exc}", self._secret)) from None
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

    def backed_up(self) -> bool:
        """Whether the kernel holds a send backlog: the peer takes bytes slower than we write them.

        True when the bytes the kernel has not sent yet (Linux ``TCP_INFO``'s
        ``tcpi_notsent_bytes``) reach :data:`SEND_BACKLOG_BYTES` or a quarter
        of the send buffer, well before a send would block. A thread that must
        not block (a Twilio bridge's I/O thread writing caller audio, the
        reader sending a held create) then leaves its write to the writer
        thread. One or two ``getsockopt`` calls, which keep the GIL. Linux
        only (kernel 4.6+): elsewhere always ``False``, and only
        :data:`SEND_STALL_S` bounds a stall.
        """
        sock = self._ws.sock
        if sock is None or _TCP_INFO is None:
            return False
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _NOTSENT_AT + 4)
            if len(info) < _NOTSENT_AT + 4:
                return False
            notsent: int = struct.unpack_from("=I", info, _NOTSENT_AT)[0]
            if notsent == 0:  # the usual case: one call
                return False
            return notsent >= min(SEND_BACKLOG_BYTES, sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 4)
        except (OSError, ValueError):
            return False

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
