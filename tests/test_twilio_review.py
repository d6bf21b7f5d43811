"""Review findings on the Twilio I/O redesign (f5642c8..1e7412a), each fixed since but one.

The one left is a strict xfail: a stalled OpenAI socket holds up its I/O thread until the
transport's send timeout (``rtqueue.transport.SEND_STALL_S``) fails the write.

The playout-model tests run TwilioOutput on the fake clock of tests/test_twilio_io.py. The I/O
tests use real loopback sockets. A caller that stops reading is a raw socket with a tiny receive
buffer, driven by websockets' sans-I/O client. A stalled OpenAI socket is a MockTransport whose
``send`` blocks on an Event, as a blocking socket with a full send buffer does. Where a thread
must be caught at a given point, the test blocks it on an Event or a join. It never sleeps and
hopes.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State
from websockets.sync.client import connect
from websockets.uri import parse_uri

from rtqueue.testing import MockTransport
from rtqueue.twilio import DTMF_EVENT, TwilioBridge, session_factory
from rtqueue.twilio_io import _OUTBOX_MAX, Link, MediaLoop
from tests.test_twilio_io import Handler, Line, mulaw
from tests.utils import UNIT

FORMAT = {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}


def start_msg(n: int = 1) -> str:
    return json.dumps({"event": "start", "streamSid": f"MZ{n}",
                       "start": {"streamSid": f"MZ{n}", "callSid": f"CA{n}", "mediaFormat": FORMAT}})


def media_msg(n: int = 1) -> str:
    return json.dumps({"event": "media", "streamSid": f"MZ{n}",
                       "media": {"payload": base64.b64encode(b"\xff" * 160).decode()}})


def wait_until(pred: Callable[[], bool], timeout: float) -> bool:
    """Poll ``pred`` until it is true (True) or ``timeout`` passed (False)."""
    deadline = time.monotonic() + timeout
    gate = threading.Event()
    while not pred():
        if time.monotonic() > deadline:
            return False
        gate.wait(0.005)
    return True


def deaf_peer(port: int, *texts: str) -> tuple[socket.socket, ClientProtocol]:
    """A client that completes the handshake, sends ``texts``, then never reads again (4 KiB receive buffer)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.settimeout(UNIT)
    proto = ClientProtocol(parse_uri(f"ws://127.0.0.1:{port}/media"))
    proto.send_request(proto.connect())
    for chunk in proto.data_to_send():
        sock.sendall(chunk)
    while proto.state is State.CONNECTING:
        data = sock.recv(4096)
        assert data, "the server closed the socket during the handshake"
        proto.receive_data(data)
    for text in texts:
        proto.send_text(text.encode())
    for chunk in proto.data_to_send():
        sock.sendall(chunk)
    return sock, proto


class NoSession:
    """What a factory returns when the test needs a call, not a conversation."""

    closed = False

    def close(self) -> None:
        self.closed = True


# ---------------------------------------------------------------------------------------------
# The playout model


def test_a_cut_keeps_what_the_model_played_of_the_item_before() -> None:
    """'a' then 'b' (100 ms each) written at t=0, no echoes. At t=0.15 the model has played all of 'a'
    and 50 ms of 'b'. A barge-in cuts 'b' at 50 ms, and 'a' still counts as heard. Its marks were
    cleared, so no echo can raise it again. Today played_ms('a') drops from 100 to 0, heard_ms says
    50 and dropped_ms says 150."""
    line = Line.a_then_b_at(0.15)
    assert line.out.played_ms("a") == 100.0
    cut = line.out.interrupt()
    assert cut is not None and cut.item_id == "b" and cut.played_ms == pytest.approx(50.0, abs=1.0)
    assert line.out.played_ms("a") == 100.0  # never goes backwards
    stats = line.out.stats()
    assert stats["heard_ms"] == pytest.approx(150.0, abs=1.0)
    assert stats["dropped_ms"] == pytest.approx(50.0, abs=1.0)


def test_play_leaves_a_deferred_clear_to_the_worker_while_the_socket_has_no_room() -> None:
    """The socket is full, so interrupt() defers its clear to the worker. New audio then comes to
    play() while the socket is still full. play() must write nothing: per its doc it writes only
    "while the socket has room", and it never blocks."""
    room = {"now": False}
    line = Line(writable=lambda: room["now"])
    line.out.play("a", mulaw(200))
    assert line.out.write_pending(threading.Event())  # the worker wrote 'a' (the socket took it, then filled up)
    written = len(line.sent)
    cut = line.at(0.05).out.interrupt()
    assert cut is not None and line.out.stats()["clears_deferred"] == 1 and len(line.sent) == written
    line.out.play("b", mulaw(100))  # the socket still has no room
    assert line.events()[written:] == [], "play() wrote to a socket without room"
    # The worker then writes the clear first, then 'b'.
    room["now"] = True
    assert line.out.write_pending(threading.Event())
    assert line.events()[written:] == ["clear", "media", "mark"]


# ---------------------------------------------------------------------------------------------
# The bridge and the I/O loop


def test_close_ends_a_call_whose_worker_is_blocked_on_a_caller_that_stopped_reading() -> None:
    """A caller that stops reading while a long answer plays: the worker waits for room in
    Link.send_text. close(timeout=3) should close that call within about its close_timeout (0.5 s)
    and join the worker. Today close() takes the full 3 s."""
    bridge = TwilioBridge(lambda call: NoSession(), ping_interval=None, frame_ms=1000,  # type: ignore[arg-type,return-value]
                          outbound_backlog_ms=2_000_000, close_timeout=0.5).start()
    sock: socket.socket | None = None
    try:
        sock, _ = deaf_peer(bridge.port, start_msg())
        assert bridge.wait_calls(lambda cs: bool(cs) and cs[0].state == "active", UNIT)
        call = bridge.calls()[0]
        call.output.play("a", bytes(8000 * 1000))  # 1000 s of audio (12 MB on the wire): more than any buffer
        link: Link = call._link
        assert wait_until(lambda: link._waiting > 0, UNIT), "the worker never had to wait for room"
        began = time.monotonic()
        bridge.close(timeout=3.0)
        elapsed = time.monotonic() - began
        assert elapsed < 1.5, f"close() took {elapsed:.2f} s"
        assert call.worker is not None and not call.worker.is_alive()
    finally:
        bridge.close(UNIT)
        if sock is not None:
            sock.close()


def test_stop_drops_a_connection_accepted_while_it_runs() -> None:
    """Reactor 0 accepts a connection at the moment another thread calls stop(). The new link must
    be dropped too, and every thread must end within stop()'s timeout. To make the interleaving
    certain, the test holds reactor 0 just before it reserves the link until stop() has passed
    (reactor 1 has ended)."""
    loop = MediaLoop("127.0.0.1", 0, acceptor=lambda link, request: None, opener=Handler, ping_interval=None,
                     threads=2, open_timeout=UNIT)
    first, second = loop._reactors
    in_accept = threading.Event()
    reserve = first.reserve

    def late_reserve(link: Link) -> None:
        in_accept.set()
        second.thread.join(UNIT)  # stop() has looked at both reactors and reactor 1 has ended
        reserve(link)

    first.reserve = late_reserve  # type: ignore[method-assign]
    loop.start()
    client = socket.create_connection(("127.0.0.1", loop.port), timeout=UNIT)
    try:
        assert in_accept.wait(UNIT)
        loop.stop(1.0)
        assert loop.links() == []
        assert not any(t.is_alive() for t in loop.threads)
    finally:
        loop.stop(UNIT)
        client.close()


def test_close_from_an_event_callback_does_not_wait_for_its_own_call() -> None:
    """An event handler of call 1 (on its session's dispatcher) calls bridge.close(timeout=2). The
    call's worker then closes the session, which joins that dispatcher. close() should not wait for
    that worker (it cannot finish before close() returns). Today close() returns only when its 2 s
    run out."""
    took: list[float] = []
    done = threading.Event()
    holder: list[TwilioBridge] = []

    def factory(call: Any) -> Any:
        session = session_factory(None, transport=MockTransport(), turn_detection=None)(call)

        def on_key(event: Any) -> None:
            began = time.monotonic()
            try:
                holder[0].close(2.0)
            finally:
                took.append(time.monotonic() - began)
                done.set()

        session.on(DTMF_EVENT, on_key)
        return session

    bridge = TwilioBridge(factory, ping_interval=None, close_timeout=0.5).start()
    holder.append(bridge)
    try:
        with connect(bridge.url, proxy=None, open_timeout=UNIT, close_timeout=1.0) as ws:
            ws.send(start_msg())
            assert bridge.wait_calls(lambda cs: bool(cs) and cs[0].state == "active", UNIT)
            ws.send(json.dumps({"event": "dtmf", "streamSid": "MZ1", "dtmf": {"digit": "1"}}))
            assert done.wait(UNIT)
        assert took[0] < 1.0, f"close() from the callback took {took[0]:.2f} s"
    finally:
        bridge.close(UNIT)


def test_a_call_whose_worker_cannot_start_frees_its_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    """max_calls=1. Starting the first call's worker fails, so that call is dropped. A second caller
    should then get through. Today it gets HTTP 503 ('too many calls') for as long as the bridge
    runs."""
    real_start = threading.Thread.start

    def start(self: threading.Thread) -> None:
        if self.name.startswith("rtqueue-twilio-worker-"):
            raise RuntimeError("can't start new thread")
        real_start(self)

    bridge = TwilioBridge(lambda call: NoSession(), max_calls=1, ping_interval=None).start()  # type: ignore[arg-type,return-value]
    try:
        monkeypatch.setattr(threading.Thread, "start", start)
        with connect(bridge.url, proxy=None, open_timeout=UNIT, close_timeout=1.0) as ws, \
                pytest.raises(ConnectionClosed):  # the server drops the socket
            ws.recv(timeout=UNIT)
        monkeypatch.setattr(threading.Thread, "start", real_start)
        assert bridge.stats().active_calls == 0
        with connect(bridge.url, proxy=None, open_timeout=UNIT, close_timeout=1.0) as ws:  # 503 today
            ws.send(start_msg(2))
            assert bridge.wait_calls(lambda cs: any(c.state == "active" for c in cs), UNIT)
    finally:
        monkeypatch.setattr(threading.Thread, "start", real_start)
        bridge.close(UNIT)


def test_a_peer_that_pings_and_never_reads_cannot_grow_the_outbox_without_bound() -> None:
    """8 MB of pings from a peer that reads nothing. Back-pressure should stop the reading, or the
    link should be failed. Today the outbox grows more than 20 times its 256 KiB bound."""
    loop = MediaLoop("127.0.0.1", 0, acceptor=lambda link, request: None, opener=Handler, ping_interval=None,
                     threads=1)
    loop.start()
    sock: socket.socket | None = None
    try:
        sock, proto = deaf_peer(loop.port)
        for _ in range(64 * 1024):
            proto.send_ping(b"x" * 125)
        sock.settimeout(2.0)
        try:
            for chunk in proto.data_to_send():
                sock.sendall(chunk)
        except TimeoutError:
            pass  # the server stopped reading us: back-pressure
        link = loop.links()[0]
        assert not wait_until(lambda: link._outbox_bytes > 4 * _OUTBOX_MAX, 2.0), link._outbox_bytes
    finally:
        loop.stop(UNIT)
        if sock is not None:
            sock.close()


def test_a_stalled_openai_socket_does_not_freeze_the_other_calls() -> None:
    """io_threads=1. Call 1's OpenAI socket stops taking data. A real socket backs up first
    (``WebSocketTransport.backed_up``: tests/test_transport.py shows it turns True before a send
    would block), so caller audio goes to the session's writer thread, which blocks alone in the
    send; the I/O thread goes on, and a second caller gets through its handshake. (Before, the I/O
    thread wrote call 1's audio itself and every call on it waited up to SEND_STALL_S.)"""
    jammed = threading.Event()
    stuck = threading.Event()
    release = threading.Event()
    senders: list[str] = []

    class FullSocket(MockTransport):
        def backed_up(self) -> bool:
            return jammed.is_set() and not release.is_set()

        def send(self, text: str) -> None:
            if '"input_audio_buffer.append"' in text and jammed.is_set() and not release.is_set():
                senders.append(threading.current_thread().name)
                stuck.set()
                release.wait(UNIT)
            super().send(text)

    def factory(call: Any) -> Any:
        return session_factory(None, transport=FullSocket(), turn_detection=None)(call)

    bridge = TwilioBridge(factory, io_threads=1, ping_interval=None).start()
    try:
        with connect(bridge.url, proxy=None, open_timeout=UNIT, close_timeout=1.0) as first:
            first.send(start_msg(1))
            assert bridge.wait_calls(lambda cs: bool(cs) and cs[0].state == "active", UNIT)
            jammed.set()  # the OpenAI side stops reading: the socket backs up
            for _ in range(4):  # 80 ms: two 40 ms chunks for the session
                first.send(media_msg(1))
            assert stuck.wait(UNIT)
            with connect(bridge.url, proxy=None, open_timeout=2.0, close_timeout=1.0) as second:
                second.send(start_msg(2))
                assert bridge.wait_calls(lambda cs: len(cs) > 1 and cs[1].state != "connected", 2.0)
            assert senders and all(name.startswith("rtqueue-writer") for name in senders), senders
    finally:
        release.set()
        bridge.close(UNIT)
