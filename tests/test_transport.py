"""The socket boundary: chunked reads and pooled mask keys over a real loopback server."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import websocket
from websockets.sync.server import ServerConnection, serve
from websockets.utils import accept_key

from rtqueue.errors import ConnectionLost
from rtqueue.transport import WebSocketTransport, _BufferedWebSocket, _MaskKeys, _xor_mask


@contextmanager
def server(handler: Callable[[ServerConnection], None]) -> Iterator[str]:
    """A websockets server on 127.0.0.1 running ``handler`` per connection; yields its URL."""
    with serve(handler, "127.0.0.1", 0, max_size=None) as srv:
        t = threading.Thread(target=srv.serve_forever, name="test-ws-server", daemon=True)
        t.start()
        try:
            yield f"ws://127.0.0.1:{srv.socket.getsockname()[1]}/"
        finally:
            srv.shutdown()
            t.join(5.0)


# Sizes around every websocket length encoding and the read chunk (16 KiB).
SIZES = [0, 1, 125, 126, 127, 4000, 16383, 16384, 16385, 65535, 65536, 200_000]


def _text(n: int, k: int) -> str:
    return (f"<{k}>" + "abcdefghijklmnopqrstuvwxyz" * (n // 26 + 1))[:n] if n else ""


def test_frames_of_every_size_arrive_whole_and_in_order() -> None:
    expected: list[str | bytes] = []
    for k, n in enumerate(SIZES):
        expected.append(_text(n, k))
        expected.append(os.urandom(n))
    # a fragmented message: three frames, one message
    expected.append("first-second-third")

    def handler(ws: ServerConnection) -> None:
        for m in expected[:-1]:
            ws.send(m)
        ws.send(iter(["first-", "second-", "third"]))
        ws.ping(b"are you there")  # the library answers pings from inside recv
        ws.close(4001, "done here")

    with server(handler) as url:
        t = WebSocketTransport.connect(url, [], timeout=5.0)
        try:
            got = [t.recv() for _ in expected]
            assert got == expected
            assert t.recv() is None  # the close frame
            assert (t.close_code, t.close_reason) == (4001, "done here")
        finally:
            t.shutdown()


def test_many_queued_frames_take_few_reads() -> None:
    """The point of the buffer: frames already in the kernel cost no read each."""
    sent = threading.Event()
    messages = [f'{{"type": "x", "n": {i}}}' for i in range(200)]

    def handler(ws: ServerConnection) -> None:
        for m in messages:
            ws.send(m)
        sent.set()
        ws.recv()  # hold the connection open until the client is done

    with server(handler) as url:
        t = WebSocketTransport.connect(url, [], timeout=5.0)
        ws = t._ws
        assert isinstance(ws, _BufferedWebSocket)
        reads = 0
        fill = ws._fill

        def counting_fill() -> int:
            nonlocal reads
            reads += 1
            return fill()

        ws._fill = counting_fill  # type: ignore[method-assign]
        try:
            assert sent.wait(5.0)
            assert [t.recv() for _ in messages] == messages
            # ~6 KB of frames: a read or two, where unbuffered reading took 2 per frame
            assert reads <= 5, reads
            t.send("bye")
        finally:
            t.shutdown()


def test_common_frames_skip_the_library_parser_and_the_rest_still_use_it() -> None:
    """Whole text frames come straight from the buffer; fragments (and a ping between them) use the library."""
    sent = threading.Event()
    messages = [f'{{"type": "x", "n": {i}}}' for i in range(300)]
    pongs: list[threading.Event] = []

    def handler(ws: ServerConnection) -> None:
        for m in messages:
            ws.send(m)
        ws.send(iter(["frag-", "ment"]))  # two frames, one message: the library's path
        pongs.append(ws.ping(b"mid"))  # answered by the client from inside recv
        ws.send(b"\x00\x01binary")
        ws.send("after")
        sent.set()
        ws.recv()

    with server(handler) as url:
        t = WebSocketTransport.connect(url, [], timeout=5.0)
        ws = t._ws
        assert isinstance(ws, _BufferedWebSocket)
        parsed = 0
        library = ws.frame_buffer.recv_frame

        def counting() -> object:
            nonlocal parsed
            parsed += 1
            return library()

        ws.frame_buffer.recv_frame = counting  # type: ignore[method-assign]
        try:
            assert sent.wait(5.0)
            got = [t.recv() for _ in range(len(messages) + 3)]
            assert got == [*messages, "frag-ment", b"\x00\x01binary", "after"]
            assert pongs and pongs[0].wait(5.0)
            # The two fragments and the ping; a frame cut by a read boundary may go to the library too.
            assert 3 <= parsed <= 10, parsed
            t.send("bye")
        finally:
            t.shutdown()


@contextmanager
def stalled_peer(rcvbuf: int | None = None) -> Iterator[str]:
    """A raw server that completes the WebSocket handshake, then never reads again; yields its URL."""
    done = threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))
    if rcvbuf is not None:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)

    def peer() -> None:
        conn, _ = listener.accept()
        request = b""
        while b"\r\n\r\n" not in request:
            request += conn.recv(4096)
        key = next(line.split(b":", 1)[1].strip() for line in request.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key:"))
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: " + accept_key(key.decode()).encode() + b"\r\n\r\n")
        done.wait(30.0)
        conn.close()

    thread = threading.Thread(target=peer, name="test-stalled-peer", daemon=True)
    thread.start()
    try:
        yield f"ws://127.0.0.1:{listener.getsockname()[1]}/"
    finally:
        done.set()
        listener.close()
        thread.join(5.0)


def test_a_peer_that_stops_reading_is_connection_lost_within_the_send_timeout() -> None:
    """A send that gets no byte out for ``send_stall_s`` fails with ConnectionLost instead of blocking forever."""
    with stalled_peer(rcvbuf=4096) as url:
        t = WebSocketTransport.connect(url, [], timeout=5.0, send_stall_s=0.3)
        t._ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        try:
            began = time.monotonic()
            with pytest.raises(ConnectionLost, match="send"):
                for _ in range(2000):  # at most ~130 MB: the buffers fill long before
                    t.send("x" * 65536)
            assert time.monotonic() - began < 10.0
        finally:
            t.shutdown()


def _probe_works() -> bool:
    """Linux 4.6+ (tcpi_notsent_bytes): what WebSocketTransport.backed_up reads."""
    if not sys.platform.startswith("linux") or not hasattr(socket, "TCP_INFO"):
        return False
    with socket.socket() as s:
        return len(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 148)) >= 148


@pytest.mark.skipif(not _probe_works(), reason="needs Linux 4.6+ TCP_INFO")
@pytest.mark.parametrize("sndbuf", [None, 8192])
def test_a_backed_up_socket_says_so_before_a_send_would_block(sndbuf: int | None) -> None:
    """Writing mic-sized frames only while ``backed_up()`` is False never blocks, however the peer stalls."""
    with stalled_peer() as url:
        t = WebSocketTransport.connect(url, [], timeout=5.0, send_stall_s=0.5)  # a block would raise
        if sndbuf is not None:  # a small buffer, as a young connection over a real network has
            t._ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        try:
            sent = 0
            while not t.backed_up():
                t.send("x" * 6400)  # a 100 ms PCM16 chunk, base64
                sent += 1
                assert sent < 20_000, "never backed up"
            assert sent > 0
            assert t.backed_up()  # stays so: the peer still reads nothing
        finally:
            t.shutdown()


def test_a_peer_that_keeps_up_is_never_backed_up() -> None:
    """Frames at the pace the peer reads them (real-time mic audio is far slower still): no backlog."""
    cond = threading.Condition()
    read = [0]

    def handler(ws: ServerConnection) -> None:
        for _ in ws:
            with cond:
                read[0] += 1
                cond.notify_all()

    with server(handler) as url:
        t = WebSocketTransport.connect(url, [], timeout=5.0)
        try:
            backed = 0
            for n in range(1, 201):
                t.send("x" * 6400)
                backed += t.backed_up()
                with cond:
                    assert cond.wait_for(lambda n=n: read[0] >= n, 5.0)
            assert backed == 0 and not t.backed_up()
        finally:
            t.shutdown()


def test_peer_vanishing_mid_frame_is_connection_lost() -> None:
    def handler(ws: ServerConnection) -> None:
        ws.send("whole")
        # a header promising 1000 bytes, then only 10, then the TCP connection ends
        ws.socket.sendall(bytes([0x81, 126, 0x03, 0xE8]) + b"x" * 10)
        ws.socket.shutdown(socket.SHUT_RDWR)

    with server(handler) as url:
        t = WebSocketTransport.connect(url, [], timeout=5.0)
        try:
            assert t.recv() == "whole"
            with pytest.raises(ConnectionLost):
                t.recv()
        finally:
            t.shutdown()


def test_client_frames_are_masked_with_pooled_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server unmasks 3000 client frames correctly; keys come from few urandom draws."""
    draws: list[int] = []
    real = os.urandom

    def counting_urandom(n: int) -> bytes:
        draws.append(n)
        return real(n)

    echoed: list[str] = []

    def handler(ws: ServerConnection) -> None:
        for _ in range(3000):
            echoed.append(str(ws.recv()))
        ws.send("ok")

    with server(handler) as url:
        t = WebSocketTransport.connect(url, [], timeout=5.0)
        monkeypatch.setattr(os, "urandom", counting_urandom)
        try:
            frames = [f"frame {i} " + "y" * (i % 300) for i in range(3000)]
            for f in frames:
                t.send(f)
            assert t.recv() == "ok"
        finally:
            monkeypatch.undo()
            t.shutdown()
    assert echoed == frames
    # 3000 frames x 4-byte keys = 12000 bytes: three 4 KiB draws, not 3000 calls
    assert len(draws) == 3 and all(n == 4096 for n in draws)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 7, 125, 126, 127, 6473, 65535, 65536, 70001])
def test_xor_mask_matches_the_library(n: int) -> None:
    data, key = os.urandom(n), os.urandom(4)
    masked = _xor_mask(key, data)
    assert masked == websocket.ABNF.mask(key, data)
    assert _xor_mask(key, masked) == data  # masking is its own inverse


def test_mask_keys_are_thread_safe_and_never_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    # A pool of numbered 4-byte words: a key handed to two threads would show up twice.
    counter = iter(range(1 << 30))
    draws: list[int] = []

    def numbered(n: int) -> bytes:
        draws.append(n)
        return b"".join(next(counter).to_bytes(4, "big") for _ in range(n // 4))

    monkeypatch.setattr(os, "urandom", numbered)
    keys = _MaskKeys()
    out: list[list[bytes]] = [[] for _ in range(4)]

    def take(i: int) -> None:
        out[i].extend(keys(4) for _ in range(5000))

    threads = [threading.Thread(target=take, args=(i,), name=f"test-mask-{i}") for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(10.0)
    flat = [k for part in out for k in part]
    assert len(flat) == 20_000 and all(len(k) == 4 for k in flat)
    assert len(set(flat)) == 20_000  # no key given out twice
    assert len(draws) == 20  # 1024 keys per 4 KiB draw
