"""The Twilio Media Streams sockets on a few I/O threads: websockets' sans-I/O protocol over selectors.

:class:`MediaLoop` is the socket layer under :class:`rtqueue.twilio.TwilioBridge`.
``threads`` reactor threads ("rtqueue-twilio-io-1".."-N") read every call's
socket, each call's on one of them; the first also accepts connections and
gives each new one to the reactor with the fewest. The WebSocket protocol
itself (handshake, framing, ping/pong, the closing handshake) is
``websockets.server.ServerProtocol``, the library's sans-I/O core, fed with
the bytes read. Each text message is handed to the link's handler on its
reactor's thread, which must not block (the bridge's handler only parses,
queues and hands audio on; see :mod:`rtqueue.twilio` for the one exception,
caller audio written to the OpenAI socket, which it writes only while that
socket is not backed up (``WebSocketTransport.backed_up``, Linux), else the
session's writer does; elsewhere the transport's send timeout bounds it).

Why not websockets' threaded server: it runs three threads per connection
(a receive thread, the handler's and a keepalive thread) and passes every
message from one to the next through a queue. Twilio sends fifty messages a
second per call, so at 200 calls that hand-off was the largest share of the
bridge's CPU, and 600 threads took turns at the GIL. Here a readable socket
costs one ``recv`` for however many messages it holds, and no thread wakes
another. Why several reactors: a thread that makes a system call gives up
the GIL and waits to get it back; one reactor for 200 calls spent more time
waiting than working.

Writes come from any thread (:meth:`Link.send_text`: the call's worker, or the
session's reader writing frames and the ``clear``). Sockets are non-blocking:
bytes the socket does not take at once wait in the link's outbox, which the
reactor flushes when the socket has room; a writer whose outbox holds more
than ``_OUTBOX_MAX`` bytes waits for it to drain (the back-pressure a
blocking socket gave) unless :meth:`Link.stop_writers` was called, and the
reactor stops reading a link whose outbox is over that bound (a peer that
pings and never reads cannot make it queue without end). So a reactor never
blocks on a write, and one slow caller never holds up the others.

Locks, in this order: the caller's own (``TwilioOutput``'s send lock), then a
link's ``_wlock`` (outbox and socket writes), then its ``_plock`` (the
protocol object); a reactor's ``_lock`` (its set of links) is taken alone.
Held for microseconds, never across a handler call or a wait other than a
writer's wait for room (on ``_wlock``'s condition, which releases it). Only a
reactor thread closes a socket (:meth:`Link.drop`); other threads ask with
:meth:`Link.abort`. :meth:`Link.close` blocks (at most its timeout, plus a
second for the abort): never call it on a reactor thread.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Protocol, TypeVar

from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol

from .errors import ConnectionLost

__all__ = ["Link", "LinkHandler", "MediaLoop", "Reactor"]

log = logging.getLogger("rtqueue.twilio")
_T = TypeVar("_T")

_READ_SIZE = 256 * 1024
_OUTBOX_MAX = 256 * 1024  # bytes waiting for the socket before a writer blocks (and the link is not read)
_SEND_CHUNK = 64 * 1024  # small queued messages are joined into writes of about this size
_TICK = 0.25  # resolution of the timers (open, close and keepalive timeouts)


class LinkHandler(Protocol):
    """What the bridge hangs on an open link; called on the loop thread, must not block."""

    def on_text(self, text: str) -> bool:
        """One text message; return False to hear no more from this link."""

    def on_closed(self) -> None:
        """The socket is closed (by either side); called once."""


# accept(link, request) -> None to accept, or (HTTP status, body) to refuse.
Acceptor = Callable[["Link", Request], "tuple[int, str] | None"]
# opened(link) -> the handler of an accepted link.
Opener = Callable[["Link"], LinkHandler]


class Link:
    """One WebSocket connection: its socket, its protocol state and its outbox.

    Writers call :meth:`send_text`, :meth:`writable` and :meth:`close` from any
    thread; everything else is the loop's.
    """

    def __init__(self, loop: MediaLoop, reactor: Reactor, sock: socket.socket, peer: object, *,
                 max_size: int) -> None:
        self.peer = peer
        self.handler: LinkHandler | None = None
        self.closed = threading.Event()  # the socket is closed
        self._loop = loop
        self._reactor = reactor
        self.socket = sock  # read and closed by the loop thread only
        self._proto = ServerProtocol(max_size=max_size, logger=logging.getLogger("rtqueue.twilio.websockets"))
        self._wlock = threading.Lock()
        self._room = threading.Condition(self._wlock)
        self._plock = threading.Lock()
        self._outbox: collections.deque[bytes] = collections.deque()
        self._outbox_bytes = 0
        self._eof_pending = False  # half-close once the outbox is flushed (websockets' SEND_EOF)
        self._watching_write = False
        self._waiting = 0  # writers waiting for room
        self._writers_stopped = False
        self._read_paused = False  # reads suspended while the outbox is over its bound (on_readable)
        self.dropped = False
        self._deaf = False  # the handler wants no more messages
        self._fragments: list[bytes] | None = None
        self.opened_at = time.monotonic()
        self._close_deadline: float | None = None
        self._next_ping: float | None = None
        self._ping_sent: float | None = None

    # -- any thread ----------------------------------------------------------------------------

    @property
    def open(self) -> bool:
        """The handshake is done and no close has started."""
        return self._proto.state is State.OPEN and not self.dropped

    def send_text(self, *texts: str) -> float | None:
        """Write text messages, in one socket write; waits only while the outbox is full.

        Returns when (``time.monotonic()``) the bytes were handed to the socket,
        timed just before the system call (the thread may wait for the GIL
        after it), or None if they had to wait in the outbox behind earlier
        bytes. Raises :class:`ConnectionLost` if the connection is not open.
        """
        with self._room:
            while self._outbox_bytes > _OUTBOX_MAX and not self.dropped and not self._writers_stopped:
                self._waiting += 1
                try:
                    self._room.wait(1.0)
                finally:
                    self._waiting -= 1
            if self.dropped or self._writers_stopped or self._proto.state is not State.OPEN:
                raise ConnectionLost("the Twilio stream is closed")
            with self._plock:
                for text in texts:
                    self._proto.send_text(text.encode())
                out = self._proto.data_to_send()
            at = time.monotonic() if not self._outbox else None
            self._write_locked(out)
            return at

    def stop_writers(self) -> None:
        """From now on :meth:`send_text` fails at once, and a writer waiting for room gives up (any thread).

        The call is ending: nothing more is to be written but the close frame (:meth:`close`).
        """
        with self._room:
            self._writers_stopped = True
            self._room.notify_all()

    def writable(self) -> bool:
        """True if a short message would go to the socket now (nothing waits in the outbox)."""
        return not self._outbox_bytes

    def close(self, code: int = 1000, timeout: float = 2.0) -> None:
        """Run the closing handshake (at most ``timeout``), then make sure the socket is closed."""
        with self._room:
            if not self.dropped and self._proto.state is State.OPEN:
                with self._plock:
                    self._proto.send_close(code)
                    out = self._proto.data_to_send()
                self._write_locked(out)
                self._close_deadline = time.monotonic() + timeout
        if not self.closed.wait(timeout):
            self.abort()
            self.closed.wait(1.0)

    def abort(self) -> None:
        """Close the socket now, without a handshake (the loop does it)."""
        self._reactor.call_soon(self.drop)

    # -- internals (writes: under _wlock) ----------------------------------------------------------

    def _write_locked(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            if chunk:
                self._outbox.append(chunk)
                self._outbox_bytes += len(chunk)
            else:
                self._eof_pending = True
        self._flush_locked()
        if (self._outbox or self._eof_pending) and not self._watching_write and not self.dropped:
            self._watching_write = True
            self._reactor.call_soon(self._watch_write)

    def _emit(self, op: Callable[[ServerProtocol], _T]) -> _T:
        """Run ``op`` on the protocol and queue what it has to send (locks in order: _wlock, _plock)."""
        with self._wlock:
            with self._plock:
                result = op(self._proto)
                out = self._proto.data_to_send()
            self._write_locked(out)
        return result

    def _flush_locked(self) -> None:
        outbox = self._outbox
        while outbox and not self.dropped:
            if len(outbox) > 1 and len(outbox[0]) < _SEND_CHUNK:
                # Small messages go out together, up to _SEND_CHUNK: one system call, and never a copy
                # of the whole outbox per attempt (a line draining slowly would make that quadratic).
                parts, size = [], 0
                while outbox and size < _SEND_CHUNK:
                    size += len(outbox[0])
                    parts.append(outbox.popleft())
                outbox.appendleft(b"".join(parts))
            data = outbox[0]
            try:
                n = self.socket.send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as exc:  # the peer is gone: the loop will see it on the next read
                log.debug("twilio: write failed: %r", exc)
                outbox.clear()
                self._outbox_bytes = 0
                break
            self._outbox_bytes -= n
            if n < len(data):
                outbox[0] = data[n:]
                break
            outbox.popleft()
        if not outbox and self._eof_pending and not self.dropped:
            self._eof_pending = False
            with contextlib.suppress(OSError):
                self.socket.shutdown(socket.SHUT_WR)
        if self._waiting and self._outbox_bytes <= _OUTBOX_MAX:
            self._room.notify_all()

    # -- the loop's side ---------------------------------------------------------------------------

    def _watch_write(self) -> None:
        with self._wlock:
            if self.dropped:
                return
            want = bool(self._outbox or self._eof_pending)
            self._watching_write = want
        self._reactor.watch(self, write=want, read=not self._read_paused)

    def on_writable(self) -> None:
        with self._wlock:
            self._flush_locked()
            want = bool(self._outbox or self._eof_pending) and not self.dropped
            self._watching_write = want
            resume = self._read_paused and self._outbox_bytes <= _OUTBOX_MAX // 2
            if resume:
                self._read_paused = False
        if not want or resume:
            self._reactor.watch(self, write=want, read=not self._read_paused)

    def on_readable(self) -> None:
        if self._outbox_bytes > _OUTBOX_MAX:
            # The peer does not read what we owe it (pongs, say): stop reading it until it does, so
            # it cannot make us queue without bound. The kernel's buffers push back on it meanwhile.
            self._read_paused = True
            self._reactor.watch(self, write=True, read=False)
            return
        try:
            data = self.socket.recv(_READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        with self._wlock:
            with self._plock:
                if data:
                    self._proto.receive_data(data)
                else:
                    self._proto.receive_eof()
                out = self._proto.data_to_send()
                events = self._proto.events_received()
                closing = self._proto.close_expected()
            self._write_locked(out)
        if closing and self._close_deadline is None:
            self._close_deadline = time.monotonic() + self._loop.close_timeout
        for event in events:
            if isinstance(event, Request):
                self._handshake(event)
            elif isinstance(event, Frame):
                self._on_frame(event)
        if not data or self._proto.state is State.CLOSED:
            self.drop()

    def _handshake(self, request: Request) -> None:
        try:
            refusal = self._loop.acceptor(self, request)
        except Exception:
            log.exception("twilio: checking a handshake raised")
            refusal = (500, "internal error\n")
        def respond(proto: ServerProtocol) -> Response:
            response = proto.reject(*refusal) if refusal is not None else proto.accept(request)
            proto.send_response(response)
            return response

        response = self._emit(respond)
        if response.status_code != 101:
            self._close_deadline = time.monotonic() + self._loop.close_timeout
            return
        if self._loop.ping_interval:
            self._next_ping = time.monotonic() + self._loop.ping_interval
        try:
            self.handler = self._loop.opener(self)
        except Exception:
            log.exception("twilio: opening a call raised; closing its socket")
            self.drop()

    def _on_frame(self, frame: Frame) -> None:
        op = frame.opcode
        if op is Opcode.PONG:
            self._ping_sent = None
            return
        if op is Opcode.TEXT:
            if not frame.fin:
                self._fragments = [bytes(frame.data)]
                return
            data = bytes(frame.data)
        elif op is Opcode.CONT and self._fragments is not None:
            self._fragments.append(bytes(frame.data))
            if not frame.fin:
                return
            data, self._fragments = b"".join(self._fragments), None
        else:  # binary (Twilio sends none), ping (answered by the protocol), close
            return
        handler = self.handler
        if handler is None or self._deaf:
            return
        try:
            text = data.decode()
        except UnicodeDecodeError:
            log.warning("twilio: a text frame that is not UTF-8 was ignored")
            return
        try:
            keep = handler.on_text(text)
        except Exception:
            log.exception("twilio: a call's message handler raised; the call ends")
            keep = False
        if not keep:
            self._deaf = True

    def tick(self, now: float) -> None:
        if self.dropped:
            return
        state = self._proto.state
        if state is State.CONNECTING and now - self.opened_at > self._loop.open_timeout:
            log.debug("twilio: opening handshake timed out")
            self.drop()
        elif self._close_deadline is not None and now > self._close_deadline:
            self.drop()
        elif state is State.OPEN and self._next_ping is not None and now >= self._next_ping:
            interval = self._loop.ping_interval or 0.0
            if self._ping_sent is not None and now - self._ping_sent > interval:
                log.info("twilio: no pong for %.0f s; closing the stream", now - self._ping_sent)
                self._emit(lambda proto: proto.fail(1011, "keepalive ping timeout"))
                self._close_deadline = now + self._loop.close_timeout
                return
            self._emit(lambda proto: proto.send_ping(b"rtqueue"))
            if self._ping_sent is None:
                self._ping_sent = now
            self._next_ping = now + interval

    def drop(self) -> None:
        """Close the socket and tell the handler, once (loop thread only: others call :meth:`abort`)."""
        with self._wlock:
            if self.dropped:
                return
            self.dropped = True
            self._outbox.clear()
            self._outbox_bytes = 0
            self._room.notify_all()
        self._reactor.forget(self)
        with contextlib.suppress(OSError):
            self.socket.close()
        self.closed.set()
        handler = self.handler
        if handler is not None:
            try:
                handler.on_closed()
            except Exception:
                log.exception("twilio: a call's close handler raised")


class Reactor:
    """One I/O thread: a selector over its share of the links, a wake-up socket and a queue of tasks."""

    def __init__(self, name: str) -> None:
        self.sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, self)
        self._tasks: collections.deque[Callable[[], None]] = collections.deque()
        self._links: set[Link] = set()
        self._lock = threading.Lock()  # _links (read by other threads through links())
        self.stopping = False
        self.on_ready: Callable[[], None] | None = None  # the listener's turn (the first reactor only)
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        # How busy the thread is: rounds, time spent working (and on a CPU), the longest round.
        self.rounds = 0
        self.busy_s = 0.0
        self.cpu_s = 0.0
        self.longest_s = 0.0

    def links(self) -> list[Link]:
        with self._lock:
            return list(self._links)

    def begin_stop(self) -> None:
        """From now on :meth:`reserve` refuses, and the thread drops its links and ends (any thread)."""
        with self._lock:
            self.stopping = True
        self.call_soon(lambda: None)  # wake it to see it

    def load(self) -> int:
        with self._lock:
            return len(self._links)

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on this thread (thread-safe; order kept)."""
        self._tasks.append(fn)
        with contextlib.suppress(BlockingIOError, OSError):  # a full wake socket is awake enough
            self._wake_w.send(b"\0")

    def reserve(self, link: Link) -> bool:
        """Count ``link`` as this reactor's from now on (any thread); :meth:`adopt` then watches it.

        False once the reactor is stopping: the caller closes the link's socket.
        """
        with self._lock:
            if self.stopping:
                return False
            self._links.add(link)
            return True

    def adopt(self, link: Link) -> None:
        """Start reading ``link`` (this thread)."""
        if not link.closed.is_set():
            self.sel.register(link.socket, selectors.EVENT_READ, link)

    def watch(self, link: Link, *, write: bool, read: bool = True) -> None:
        events = (selectors.EVENT_READ if read else 0) | (selectors.EVENT_WRITE if write or not read else 0)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.sel.modify(link.socket, events, link)

    def forget(self, link: Link) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.sel.unregister(link.socket)
        with self._lock:
            self._links.discard(link)

    def close(self) -> None:
        for s in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                s.close()
        self.sel.close()

    def _run(self) -> None:
        last_tick = time.monotonic()
        try:
            while True:
                ready = self.sel.select(_TICK)
                began = time.monotonic()
                cpu = time.thread_time()
                for key, mask in ready:
                    target = key.data
                    if target is self:
                        with contextlib.suppress(BlockingIOError, OSError):
                            self._wake_r.recv(4096)
                    elif target is None:
                        if self.on_ready is not None:
                            self.on_ready()
                    else:
                        if mask & selectors.EVENT_WRITE:
                            target.on_writable()
                        if mask & selectors.EVENT_READ:
                            target.on_readable()
                while self._tasks:
                    fn = self._tasks.popleft()
                    try:
                        fn()
                    except Exception:
                        log.exception("twilio: an I/O task raised")
                now = time.monotonic()
                if now - last_tick >= _TICK:
                    last_tick = now
                    for link in self.links():
                        link.tick(now)
                spent = time.monotonic() - began
                self.rounds += 1
                self.busy_s += spent
                self.cpu_s += time.thread_time() - cpu
                if spent > self.longest_s:
                    self.longest_s = spent
                if self.stopping:
                    for link in self.links():  # a link reserved while stop() was looking, too
                        link.drop()
                    if not self._tasks:
                        with self._lock:
                            if not self._links:
                                return
        except Exception:  # a bug here must not leave calls hanging: drop them all
            log.exception("twilio: an I/O thread failed; dropping its calls")
            for link in self.links():
                link.drop()


class MediaLoop:
    """The accepting and reading threads of a bridge: ``threads`` reactors, links spread over them.

    The first reactor also accepts; each new link goes to the reactor with the
    fewest. Several threads rather than one: a thread that makes a system call
    gives up the GIL and waits to get it back, and a reader makes two per
    message it passes on (the read, and the write to the OpenAI socket), so
    under load one thread spends more time waiting for the GIL than working.
    ``acceptor(link, request)`` decides each handshake (None accepts, or an
    HTTP status and body refuses); ``opener(link)`` returns the handler of an
    accepted link. Both run on a reactor thread and must not block.
    """

    def __init__(self, host: str, port: int, *, acceptor: Acceptor, opener: Opener, max_size: int = 2**20,
                 open_timeout: float = 5.0, close_timeout: float = 2.0, ping_interval: float | None = 20.0,
                 threads: int = 4, name: str = "rtqueue-twilio-io") -> None:
        self.acceptor = acceptor
        self.opener = opener
        self.open_timeout = open_timeout
        self.close_timeout = close_timeout
        self.ping_interval = ping_interval
        self._max_size = max_size
        self._listener = socket.create_server((host, port), backlog=1024)
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._reactors = [Reactor(f"{name}-{i + 1}") for i in range(threads)]
        first = self._reactors[0]
        first.on_ready = self._accept
        first.sel.register(self._listener, selectors.EVENT_READ, None)
        self._accepting = True

    @property
    def threads(self) -> list[threading.Thread]:
        """The reactors' threads."""
        return [r.thread for r in self._reactors]

    def start(self) -> None:
        """Start the threads (accepting from now on)."""
        for r in self._reactors:
            r.thread.start()

    def stats(self) -> dict[str, float]:
        """threads, rounds (select returns), busy_s (time spent handling them; cpu_s of it on a CPU, the
        rest waiting for the GIL or the OS), longest_round_ms, links."""
        rs = self._reactors
        return {"threads": len(rs), "rounds": sum(r.rounds for r in rs),
                "busy_s": round(sum(r.busy_s for r in rs), 3), "cpu_s": round(sum(r.cpu_s for r in rs), 3),
                "longest_round_ms": round(max(r.longest_s for r in rs) * 1000.0, 3),
                "links": sum(r.load() for r in rs)}

    def links(self) -> list[Link]:
        """The links alive now."""
        return [link for r in self._reactors for link in r.links()]

    def stop_accepting(self) -> None:
        """Close the listening socket: new connections are refused by the OS."""
        self._reactors[0].call_soon(self._close_listener)

    def stop(self, timeout: float = 5.0) -> None:
        """Drop every link, end the threads and close the loop's sockets. Idempotent, any thread."""
        self.stop_accepting()
        for r in self._reactors:
            r.begin_stop()
        if not self._reactors[0].thread.is_alive():
            self._close_listener()  # never started (or already ended): no thread will run the task
        deadline = time.monotonic() + timeout
        me = threading.current_thread()
        for r in self._reactors:
            if r.thread.is_alive() and r.thread is not me:
                r.thread.join(max(0.0, deadline - time.monotonic()))
        for r in self._reactors:
            if not r.thread.is_alive():
                r.close()

    # -- the first reactor's thread -------------------------------------------------------------

    def _close_listener(self) -> None:
        if self._accepting:
            self._accepting = False
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._reactors[0].sel.unregister(self._listener)
            self._listener.close()

    def _accept(self) -> None:
        for _ in range(64):  # what is waiting now; the selector says when more come
            try:
                sock, peer = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors, say: keep serving the calls we have
                log.warning("twilio: accept failed: %r", exc)
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            reactor = min(self._reactors, key=Reactor.load)
            link = Link(self, reactor, sock, peer, max_size=self._max_size)
            if not reactor.reserve(link):  # stopping
                sock.close()
                continue
            if reactor is self._reactors[0]:
                reactor.adopt(link)
            else:
                reactor.call_soon(functools.partial(reactor.adopt, link))
