"""The Twilio bridge's parts on their own: the playout model, inbound chunking and the I/O loop.

:class:`~rtqueue.twilio.TwilioOutput` runs on a fake clock advanced by hand
and a ``send`` that records what would go to Twilio, so every played position
is computed, not measured. :class:`~rtqueue.twilio.TwilioInput` is fed frames
directly. :class:`~rtqueue.twilio_io.MediaLoop` serves real loopback sockets
to clients built on websockets' sync client (and one raw TCP socket), with
handlers defined here. No simulator, no fake Twilio, no real audio.
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from rtqueue.errors import ConnectionLost, InvalidArgument
from rtqueue.twilio import TwilioInput, TwilioOutput
from rtqueue.twilio_io import Link, MediaLoop
from tests.utils import UNIT

# ---------------------------------------------------------------------------------------------
# TwilioOutput: the playout model on a fake clock


class Clock:
    """A clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Line:
    """A TwilioOutput on a fake clock, with every message it sends recorded (and the thread that sent it)."""

    def __init__(self, *, writable: Callable[[], bool] | None = lambda: True, playout_speed: float = 1.0,
                 frame_ms: int = 100) -> None:
        self.clock = Clock()
        self.sent: list[dict[str, Any]] = []
        self.senders: list[threading.Thread] = []
        self.out = TwilioOutput(self._send, frame_ms=frame_ms, writable=writable, clock=self.clock,
                                playout_speed=playout_speed)
        self.out.stream_sid = "MZ1"

    def _send(self, text: str) -> None:
        self.sent.append(json.loads(text))
        self.senders.append(threading.current_thread())

    def at(self, t: float) -> Line:
        self.clock.now = t
        return self

    def marks(self) -> list[str]:
        """The names of the marks sent so far, in order."""
        return [m["mark"]["name"] for m in self.sent if m["event"] == "mark"]

    def events(self) -> list[str]:
        return [m["event"] for m in self.sent]

    def audio(self) -> bytes:
        return b"".join(base64.b64decode(m["media"]["payload"]) for m in self.sent if m["event"] == "media")

    @classmethod
    def a_then_b_at(cls, t: float) -> Line:
        """Items 'a' then 'b' (100 ms each) written at t=0, no echoes; the clock at ``t``."""
        line = cls()
        line.out.play("a", mulaw(100))
        line.out.end_item("a")
        line.out.play("b", mulaw(100, seed=5))
        return line.at(t)


def mulaw(ms: int, seed: int = 0) -> bytes:
    """``ms`` of mu-law (8 bytes a millisecond), every byte telling its position."""
    return bytes((seed + i) % 251 for i in range(8 * ms))


def test_played_position_follows_the_clock_and_never_passes_what_was_written():
    """Three 100 ms frames written at t=0 play back to back: the position at t is min(t, 0.3 s), never more."""
    line = Line()
    line.out.play("a", mulaw(300))
    assert line.events() == ["media", "mark"] * 3
    assert line.out.played_ms("a") == 0.0  # t=0: nothing played yet
    for t, expected in ((0.05, 50.0), (0.1, 100.0), (0.15, 150.0), (0.25, 250.0), (0.35, 300.0), (5.0, 300.0)):
        assert line.at(t).out.played_ms("a") == pytest.approx(expected, abs=1.0), t
        assert line.out.played_ms("a") <= 300.0
    # Only echoes move the echoed position; the model never counts them.
    assert line.out.echoed_ms("a") == 0.0 and line.out.stats()["marks_pending"] == 3


def test_a_frame_written_while_the_line_is_busy_starts_when_the_one_before_ends():
    """100 ms written at t=0 and 100 ms at t=0.05: the second plays 0.1..0.2, so at t=0.12 the position is 120."""
    line = Line()
    line.out.play("a", mulaw(100))
    line.at(0.05).out.play("a", mulaw(100, seed=7))
    assert line.at(0.12).out.played_ms("a") == pytest.approx(120.0, abs=1.0)  # 170 if it started at 0.05
    assert line.at(0.19).out.played_ms("a") == pytest.approx(190.0, abs=1.0)
    assert line.at(0.3).out.played_ms("a") == 200.0


def test_a_line_that_ran_dry_starts_the_next_frame_when_it_is_written():
    """100 ms ended at t=0.1; audio written at t=1.0 starts at 1.0, not at 0.1 (the gap is not counted)."""
    line = Line()
    line.out.play("a", mulaw(100))
    assert line.at(0.5).out.played_ms("a") == 100.0  # nothing more to play during the gap
    line.at(1.0).out.play("a", mulaw(200, seed=3))
    assert line.out.played_ms("a") == 100.0
    assert line.at(1.05).out.played_ms("a") == pytest.approx(150.0, abs=1.0)
    assert line.at(1.15).out.played_ms("a") == pytest.approx(250.0, abs=1.0)
    assert line.at(2.0).out.played_ms("a") == 300.0


def test_the_model_learns_the_echo_lag_and_runs_half_of_it_late():
    """Marks echoed a constant 2*d after their frame ends (d=20 ms) make the model lag by d, to 1 ms."""
    d = 0.02
    late, control = Line(), Line()  # same writes; only `late` hears echoes
    for line in (late, control):
        line.out.play("a", mulaw(400))
    names = late.marks()
    assert len(names) == 4
    # Frame k ends at 0.1*(k+1); its mark comes back 2*d later.
    late.at(0.1 + 2 * d).out.on_mark(names[0])
    t = 0.1 + 2 * d
    assert late.out.played_ms("a") == pytest.approx(control.at(t).out.played_ms("a") - d * 1000.0, abs=1.0)
    assert late.out.played_ms("a") == pytest.approx(120.0, abs=1.0)
    late.at(0.2 + 2 * d).out.on_mark(names[1])
    for t in (0.25, 0.28, 0.33):
        lagged, model = late.at(t).out.played_ms("a"), control.at(t).out.played_ms("a")
        assert lagged == pytest.approx(model - d * 1000.0, abs=1.0), t
        assert lagged >= late.out.echoed_ms("a") == 200.0
    # A later item on the same line is modelled with the same lag.
    # The last mark of "a" comes back 2*d late on `late`, at once (no lag to learn) on `control`.
    late.at(0.4 + 2 * d).out.on_mark(late.marks()[3])
    control.at(0.4).out.on_mark(control.marks()[3])
    assert late.out.echoed_ms("a") == control.out.echoed_ms("a") == 400.0
    for line in (late, control):
        line.at(1.0).out.play("b", mulaw(300))
    for t in (1.05, 1.15, 1.25):
        assert late.at(t).out.played_ms("b") == pytest.approx(control.at(t).out.played_ms("b") - d * 1000.0,
                                                              abs=1.0), t


def test_interrupt_freezes_the_cut_at_the_model_position_and_cleared_echoes_do_not_move_it():
    """interrupt() at t=0.15 into 300 ms: cut at 150 ms, a clear written; echoes of the cleared marks count nothing."""
    line = Line()
    line.out.play("a", mulaw(300))
    names = line.marks()
    cut = line.at(0.15).out.interrupt()
    assert cut is not None and cut.item_id == "a"
    assert cut.played_ms == pytest.approx(150.0, abs=1.0)
    assert cut.received_ms == 300.0 and cut.dropped_ms == pytest.approx(150.0, abs=1.0)
    assert line.events()[-1] == "clear" and line.sent[-1]["streamSid"] == "MZ1"
    # Time passes and Twilio hands every mark back (because of the clear): the position stays frozen.
    assert line.at(0.25).out.played_ms("a") == cut.played_ms
    for name in names:
        line.at(0.4).out.on_mark(name)
    assert line.out.played_ms("a") == cut.played_ms and line.out.echoed_ms("a") == cut.played_ms
    stats = line.out.stats()
    assert stats["marks_cleared"] == 3 and stats["marks_echoed"] == 0 and stats["unknown_marks"] == 0
    assert stats["heard_ms"] == cut.played_ms and stats["clears"] == 1 and stats["barge_ins"] == 1
    # More audio of the cut item is ignored; a new item plays at once (the clear emptied Twilio's buffer).
    line.out.play("a", mulaw(100))
    assert line.out.stats()["ignored_ms"] == 100.0
    line.at(0.5).out.play("b", mulaw(100))
    assert line.at(0.55).out.played_ms("b") == pytest.approx(50.0, abs=1.0)


def test_an_item_queued_behind_another_counts_from_when_the_model_plays_it():
    """'a' then 'b' (100 ms each) written at t=0: at t=0.15, before any echo, 'b' is the item playing, 50 ms in."""
    line = Line.a_then_b_at(0.15)
    assert line.out.played_ms("a") == 100.0
    assert line.out.played_ms("b") == pytest.approx(50.0, abs=1.0)
    assert line.out.current_item() == "b"
    cut = line.out.interrupt()
    assert cut is not None and cut.item_id == "b" and cut.played_ms == pytest.approx(50.0, abs=1.0)


def test_a_clear_on_a_full_socket_is_the_next_message_the_worker_writes():
    """Socket without room: interrupt() returns without writing; write_pending writes the clear before later frames."""
    line = Line(writable=lambda: False)
    line.out.play("a", mulaw(200))
    assert line.out.write_pending(threading.Event())
    cut = line.at(0.05).out.interrupt()
    assert cut is not None and cut.played_ms == pytest.approx(50.0, abs=1.0)
    assert "clear" not in line.events() and line.out.stats()["clears_deferred"] == 1
    line.out.play("b", mulaw(100))
    assert line.out.write_pending(threading.Event())
    assert line.events() == ["media", "mark"] * 2 + ["clear", "media", "mark"]


def test_playout_speed_two_halves_every_frame():
    """playout_speed=2: 300 ms of audio written at t=0 is all played at t=0.15 (150 ms at t=0.075)."""
    fast, real = Line(playout_speed=2.0), Line()
    for line in (fast, real):
        line.out.play("a", mulaw(300))
    assert fast.at(0.025).out.played_ms("a") == pytest.approx(50.0, abs=1.0)
    assert fast.at(0.075).out.played_ms("a") == pytest.approx(150.0, abs=1.0)
    assert fast.at(0.125).out.played_ms("a") == pytest.approx(250.0, abs=1.0)
    assert fast.at(0.15).out.played_ms("a") == pytest.approx(300.0, abs=1.0)
    assert fast.at(0.2).out.played_ms("a") == 300.0
    assert real.at(0.15).out.played_ms("a") == pytest.approx(150.0, abs=1.0)


def test_an_echoed_mark_counts_its_audio_even_when_the_clock_says_otherwise():
    """Clock stopped at t=0; Twilio echoes the second mark: 200 ms heard (the first mark is settled with it)."""
    line = Line()
    line.out.play("a", mulaw(300))
    names = line.marks()
    assert line.out.played_ms("a") == 0.0
    line.out.on_mark(names[1])
    assert line.out.played_ms("a") >= 200.0 and line.out.echoed_ms("a") == 200.0
    stats = line.out.stats()
    assert stats["marks_echoed"] == 2 and stats["marks_pending"] == 1 and stats["heard_ms"] == 200.0
    line.out.on_mark(names[2])
    assert line.out.played_ms("a") == 300.0 and not line.out.is_playing()
    assert line.out.wait_idle(0.0)


def test_a_socket_with_room_gets_the_frames_on_the_calling_thread():
    """writable() True: play() itself writes every frame and its mark, in order, on the caller's thread."""
    line = Line()
    audio = mulaw(250)
    line.out.play("a", audio)
    stats = line.out.stats()
    assert stats["frames_direct"] == stats["frames_sent"] == 3 and stats["marks_sent"] == 3
    assert stats["buffered_ms"] == 0.0 and stats["sent_ms"] == 250.0
    assert line.events() == ["media", "mark"] * 3 and line.audio() == audio
    assert line.marks() == sorted(set(line.marks()), key=line.marks().index)  # distinct names
    assert set(line.senders) == {threading.current_thread()}  # no worker was needed


@pytest.mark.parametrize("writable", [lambda: False, None], ids=["socket-full", "no-writable"])
def test_without_room_frames_wait_for_the_worker_and_play_from_when_written(writable: Callable[[], bool] | None):
    """writable() False (or none given): play() writes nothing; write_pending() writes it all and returns.

    The playout model starts when the frames are written (t=0.5), not when they were queued (t=0).
    """
    line = Line(writable=writable)
    audio = mulaw(300)
    line.out.play("a", audio)
    assert line.sent == [] and line.out.stats()["buffered_ms"] == 300.0
    assert line.at(0.2).out.played_ms("a") == 0.0
    line.at(0.5)
    assert line.out.write_pending(threading.Event())  # returns once drained
    stats = line.out.stats()
    assert stats["frames_sent"] == 3 and stats["frames_direct"] == 0 and stats["buffered_ms"] == 0.0
    assert line.events() == ["media", "mark"] * 3 and line.audio() == audio
    assert line.at(0.55).out.played_ms("a") == pytest.approx(50.0, abs=1.0)
    stop = threading.Event()
    stop.set()
    assert not line.out.write_pending(stop)  # nothing queued and told to stop: returns at once


# ---------------------------------------------------------------------------------------------
# TwilioInput: 20 ms frames joined into chunks


def test_input_joins_frames_into_whole_chunks_in_order():
    """chunk_ms=40: 20 ms frames go out as 320-byte chunks, byte for byte; a partial chunk waits, close drops it."""
    got: list[bytes] = []
    inp = TwilioInput(chunk_ms=40)
    inp.start(got.append)
    frames = [bytes([k]) * 80 + bytes(range(80)) for k in range(7)]  # 160 bytes each, all different
    for n, frame in enumerate(frames, 1):
        inp.feed(frame)
        assert len(got) == n // 2  # a chunk as soon as two frames are in, never before
    assert [len(c) for c in got] == [320, 320, 320]
    assert b"".join(got) == b"".join(frames[:6])
    inp.close()
    inp.feed(frames[0])  # after close: nothing more, and the half chunk is gone
    assert len(got) == 3 and inp.stats()["delivered_ms"] == 120.0


def test_input_keeps_what_came_before_start_and_delivers_it_first_in_order():
    """Frames fed before start() (the session still connecting) reach the callback first, byte for byte."""
    got: list[bytes] = []
    inp = TwilioInput(chunk_ms=40)
    early = [bytes([k]) * 160 for k in range(3)]
    for frame in early:
        inp.feed(frame)
    assert inp.stats()["delivered_ms"] == 0.0
    inp.start(got.append)
    late = [bytes([10 + k]) * 160 for k in range(3)]
    for frame in late:
        inp.feed(frame)
    assert b"".join(got) == b"".join(early + late)  # six frames: three whole chunks, the early ones first
    assert [len(c) for c in got] == [320, 320, 320]
    assert inp.stats()["delivered_ms"] == 120.0 and inp.stats()["dropped_ms"] == 0.0
    inp.close()


def test_input_delivers_the_backlog_in_whole_chunks_too():
    """Four 20 ms frames fed before start() go out as two 40 ms chunks, as frames fed after start() do."""
    got: list[bytes] = []
    inp = TwilioInput(chunk_ms=40)
    for k in range(4):
        inp.feed(bytes([k]) * 160)
    inp.start(got.append)
    assert [len(c) for c in got] == [320, 320]
    inp.close()


@pytest.mark.parametrize("chunk_ms", [5, 2000, True, "40", 40.0])
def test_input_refuses_a_bad_chunk_size(chunk_ms: object):
    """chunk_ms must be an int within 10..1000."""
    with pytest.raises(InvalidArgument):
        TwilioInput(chunk_ms=chunk_ms)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# MediaLoop over loopback sockets


class Handler:
    """A link's handler: records every text and how often the link closed."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.texts: list[str] = []
        self.closes = 0
        self.closed = threading.Event()
        self._cond = threading.Condition()

    def on_text(self, text: str) -> bool:
        with self._cond:
            self.texts.append(text)
            self._cond.notify_all()
        return True

    def on_closed(self) -> None:
        self.closes += 1
        self.closed.set()

    def wait_texts(self, n: int, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.texts) >= n, timeout)


class Server:
    """A started MediaLoop with the handlers it opened and the requests it was asked to accept."""

    def __init__(self, loop: MediaLoop) -> None:
        self.loop = loop
        self.handlers: list[Handler] = []
        self.requests: list[str] = []
        self._cond = threading.Condition()

    def opened(self, link: Link) -> Handler:
        handler = Handler(link)
        with self._cond:
            self.handlers.append(handler)
            self._cond.notify_all()
        return handler

    def handler(self, n: int, timeout: float = UNIT) -> Handler:
        """The handler of the n-th link opened (0-based), once it is."""
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.handlers) > n, timeout)
            return self.handlers[n]

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.loop.port}/media"


@contextlib.contextmanager
def serving(*, refuse: tuple[int, str] | None = None, threads: int = 2, open_timeout: float = UNIT,
            close_timeout: float = UNIT) -> Iterator[Server]:
    holder: list[Server] = []

    def acceptor(link: Link, request: Any) -> tuple[int, str] | None:
        holder[0].requests.append(request.path)
        return refuse

    def opener(link: Link) -> Handler:
        return holder[0].opened(link)

    loop = MediaLoop("127.0.0.1", 0, acceptor=acceptor, opener=opener, open_timeout=open_timeout,
                     close_timeout=close_timeout, ping_interval=None, threads=threads)
    server = Server(loop)
    holder.append(server)
    loop.start()
    try:
        yield server
    finally:
        loop.stop(UNIT)


def client(server: Server, **kwargs: Any) -> ClientConnection:
    kwargs.setdefault("close_timeout", 1.0)
    return connect(server.url, open_timeout=UNIT, proxy=None, compression=None, ping_interval=None, **kwargs)


def test_loop_delivers_text_messages_in_order_fragmented_ones_whole():
    """Messages reach the handler in order; one sent in three fragments arrives as one text."""
    with serving() as server, client(server) as ws:
        handler = server.handler(0)
        ws.send("first")
        ws.send(iter(["frag-1 ", "frag-2 ", "frag-3"]))  # websockets sends an iterable as fragments
        ws.send('{"event": "media"}')
        assert handler.wait_texts(3, UNIT)
        assert handler.texts == ["first", "frag-1 frag-2 frag-3", '{"event": "media"}']
        assert server.requests == ["/media"]


def test_send_text_writes_each_text_as_its_own_message_in_order():
    """Link.send_text(a, b) from the test thread: the client receives a, then b."""
    with serving() as server, client(server) as ws:
        link = server.handler(0).link
        assert link.open and link.writable()
        link.send_text('{"event": "media"}', '{"event": "mark"}')
        link.send_text("third")
        assert [ws.recv(timeout=UNIT) for _ in range(3)] == ['{"event": "media"}', '{"event": "mark"}', "third"]


def test_a_refused_handshake_fails_the_client_and_opens_nothing():
    """acceptor -> (404, "no\\n"): the client's connect raises InvalidStatus 404; the opener never runs."""
    with serving(refuse=(404, "no\n")) as server:
        with pytest.raises(InvalidStatus) as failed:
            client(server)
        assert failed.value.response.status_code == 404
        assert failed.value.response.body == b"no\n"
        assert server.requests == ["/media"] and server.handlers == []


def test_a_peer_that_stops_reading_does_not_hold_up_the_others():
    """One reactor, two links: the first stops reading while the server writes to it until its socket is full
    and the writer is blocked on the full outbox; the second link's messages still come through at once."""
    # A client that stops reading: a small receive buffer and websockets' flow control (max_queue=1) let it
    # take a few frames at most; then the server's socket fills up.
    slow_sock = socket.socket()
    slow_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    with serving(threads=1) as server, contextlib.ExitStack() as stack:
        slow_sock.connect(("127.0.0.1", server.loop.port))
        stack.enter_context(client(server, sock=slow_sock, max_queue=1, close_timeout=0.1))  # reads no close
        slow_link = server.handler(0).link
        fast = stack.enter_context(client(server))
        fast_handler = server.handler(1)

        full = threading.Event()
        written: list[int] = []
        errors: list[BaseException] = []

        def flood() -> None:
            chunk = "x" * 65536
            try:
                while len(written) < 128:  # 8 MB at most; the kernel and the outbox take about half that
                    slow_link.send_text(chunk)  # waits for room once the outbox is over its bound
                    written.append(len(chunk))
                    if not slow_link.writable():
                        full.set()
            except ConnectionLost:
                pass
            except BaseException as exc:
                errors.append(exc)
            finally:
                full.set()

        writer = threading.Thread(target=flood, name="test-flood", daemon=True)
        writer.start()
        try:
            assert full.wait(UNIT)
            assert len(written) < 128, "the slow socket took everything: it was not backed up"
            for n in range(1, 21):
                began = time.monotonic()
                fast.send(f"msg {n}")
                assert fast_handler.wait_texts(n, UNIT)
                assert time.monotonic() - began < 0.5  # promptly, although the other socket is stuck
                fast_handler.link.send_text(f"reply {n}")
                assert fast.recv(timeout=0.5) == f"reply {n}"
            assert fast_handler.texts == [f"msg {n}" for n in range(1, 21)]
            # Meanwhile the writer is stuck waiting for room: the slow peer reads nothing.
            assert writer.is_alive() and len(written) < 128 and not slow_link.writable(), len(written)
        finally:
            server.loop.stop(UNIT)  # drops the slow link: the blocked writer gets ConnectionLost
            writer.join(UNIT)
        assert not writer.is_alive() and errors == []


def test_close_runs_the_closing_handshake_with_a_cooperating_client():
    """Link.close(1000, timeout): the client sees code 1000, close returns well before the timeout, on_closed once."""
    with serving() as server, client(server) as ws:
        handler = server.handler(0)
        began = time.monotonic()
        handler.link.close(1000, UNIT)
        assert time.monotonic() - began < UNIT / 2  # the handshake finished; the socket was not aborted
        assert handler.link.closed.is_set() and not handler.link.open
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=UNIT)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000
        assert ws.close_code == 1000
        assert handler.closed.wait(UNIT)
        with pytest.raises(ConnectionLost):
            handler.link.send_text("too late")
        handler.link.close(1000, UNIT)  # again: nothing happens
        server.loop.stop(UNIT)
        assert handler.closes == 1


def test_stop_ends_every_thread_even_with_links_open():
    """MediaLoop.stop() with two live links: both are dropped (on_closed each), every loop thread ends."""
    with serving() as server, client(server) as a, client(server) as b:
        handlers = [server.handler(0), server.handler(1)]
        a.send("hello")
        assert handlers[0].wait_texts(1, UNIT)
        assert all(t.is_alive() for t in server.loop.threads) and len(server.loop.threads) == 2
        server.loop.stop(UNIT)
        assert not any(t.is_alive() for t in server.loop.threads)
        assert all(h.closed.is_set() and h.closes == 1 for h in handlers)
        assert server.loop.links() == []
        for ws in (a, b):
            with pytest.raises(ConnectionClosedError):
                ws.recv(timeout=UNIT)
        server.loop.stop(UNIT)  # idempotent


def test_a_socket_that_never_sends_a_handshake_is_dropped_after_open_timeout():
    """A TCP connection that sends nothing is closed after open_timeout (0.3 s); an opened link stays up."""
    with serving(open_timeout=0.3) as server, client(server) as ws:
        handler = server.handler(0)
        began = time.monotonic()  # before the connection, so before the server's clock for it starts
        silent = socket.create_connection(("127.0.0.1", server.loop.port), timeout=UNIT)
        try:
            assert silent.recv(1) == b""  # the server closed it (recv waits up to UNIT)
            elapsed = time.monotonic() - began
        finally:
            silent.close()
        assert 0.3 <= elapsed < 3.0, elapsed
        # The opened link lived through the same timers: still open and talking.
        ws.send("still here")
        assert handler.wait_texts(1, UNIT) and handler.texts == ["still here"]
        assert handler.link.open and not handler.closed.is_set()
        assert server.requests == ["/media"]  # the silent socket never reached the acceptor
