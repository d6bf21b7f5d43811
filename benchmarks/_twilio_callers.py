"""Child process of bench_phone.py: N fake Twilio callers in one process, all on one thread.

``python benchmarks/_twilio_callers.py '{"url": "ws://127.0.0.1:PORT/media", "calls": 200, ...}'``

Opens every call (``ramp_s`` apart in total), prints ``{"connected": N}``,
then each call, at its own offset within ``spread_s``, speaks one utterance,
listens to the answer until it heard ``barge_after_ms`` of it and talks over it
(a barge-in). When every call is through, one JSON line with each call's clears
(item, what had been heard of it, when) is printed and all hang up. Lines carry
mu-law silence between utterances, as real ones do. Only 127.0.0.1.

The callers speak the same Media Streams protocol as
:class:`rtqueue.testing_twilio.FakeTwilio` and behave the same way (20 ms
inbound frames paced in real time, outbound audio played on a playout clock,
each mark echoed once the audio before it has played, ``clear`` drops the
unplayed audio at once and hands back every pending mark), but cost a small
constant per message, so 200 calls fit in one process on a small machine:

- one thread runs everything: a ``selectors`` loop over the calls' sockets
  (non-blocking, each with its own outbound buffer, so a slow bridge never
  stalls the other calls) and one timer heap for every call's 20 ms frame
  clock and mark echoes;
- WebSocket framing is done here (RFC 6455 client side: masked frames, ping
  answered with pong, close answered), with websockets' C mask helper;
- what a caller heard is kept as running totals: the audio position queued
  (``pos``) and when the queued audio ends (``play_end``), so the position
  heard at any instant is ``pos`` minus what is still to play, and which item
  was playing comes from the few item boundaries the marks reveal. Nothing is
  re-summed per frame;
- a message takes effect when it *arrived*, as it would at Twilio, not when
  this busy thread got round to it: each read asks the kernel when its bytes
  came in (``SO_TIMESTAMPNS``), so a ``clear`` read 50 ms late still stops the
  playout where it was on arrival. How late the thread read (``read_lag``) is
  reported, to show what the old way would have added to the truncation error.
"""

from __future__ import annotations

import base64
import heapq
import json
import os
import random
import selectors
import socket
import struct
import sys
import time
import urllib.parse
from collections import deque
from typing import Any

import _common  # noqa: F401 - puts the checkout on sys.path
from websockets.frames import apply_mask  # the C speedup when built, else pure Python
from websockets.utils import accept_key

from rtqueue.formats import PCM16, PCMU, convert
from rtqueue.sim.synth import synthesize

FRAME_MS = 20
FRAME = PCMU.nbytes(FRAME_MS)  # 160 bytes of mu-law
SILENCE_B64 = base64.b64encode(b"\xff" * FRAME).decode("ascii")
TICK, MARK = 0, 1
OP_TEXT, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x8, 0x9, 0xA

_mask_rng = random.Random()


def ws_frame(opcode: int, payload: bytes) -> bytes:
    """One final client frame (masked, as RFC 6455 requires of a client)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    key = _mask_rng.getrandbits(32).to_bytes(4, "big")
    return head + key + apply_mask(payload, key)


def ws_open(url: str, timeout: float) -> tuple[socket.socket, bytes]:
    """TCP connect and the WebSocket opening handshake (blocking); returns the socket and bytes read past it."""
    u = urllib.parse.urlsplit(url)
    if u.hostname != "127.0.0.1" or u.port is None:
        raise ValueError("only 127.0.0.1")
    sock = socket.create_connection((u.hostname, u.port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as websockets does: no Nagle delay on frames
    key = base64.b64encode(os.urandom(16)).decode("ascii")
    sock.sendall((f"GET {u.path or '/'} HTTP/1.1\r\nHost: {u.netloc}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("the bridge closed during the handshake")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if " 101 " not in lines[0] + " " or headers.get("sec-websocket-accept") != accept_key(key):
        raise ConnectionError(f"handshake refused: {lines[0]!r}")
    sock.setblocking(False)
    return sock, rest


class Line:
    """One call: its socket, its caller's script, and what the caller heard (running totals)."""

    def __init__(self, index: int, sock: socket.socket, rest: bytes, params: dict[str, str]) -> None:
        self.index = index
        self.sock = sock
        self.stream_sid = f"MZ{index:032x}"
        self.call_sid = f"CA{index:032x}"
        self.inbuf = bytearray(rest)
        self.out = bytearray()
        self.writing = False  # registered for EVENT_WRITE
        self.closed = False
        self.close_sent = False
        self.seq = 0
        self.chunk = 0
        self.next_tick = 0.0
        # inbound: frames of speech to send (base64 strings), else silence
        self.speech: deque[str] = deque()
        self.speech_queued = 0
        self.speech_sent = 0
        self.frames_sent = 0
        # outbound (what the caller hears), in ms of audio
        self.pos = 0.0  # audio queued on the playout clock (minus what clears dropped)
        self.play_end = 0.0  # monotonic time the queued audio finishes playing
        self.last_mark_pos = 0.0  # position of the audio before the last mark received
        self.items: deque[tuple[str, float]] = deque()  # (item, start position), oldest first; a few at most
        self.marks: deque[tuple[float, str]] = deque()  # (echo time, name), in order
        self.gen = 0  # bumped by a clear: stale MARK timers are skipped
        self.clears: list[dict[str, Any]] = []
        self.errors: list[str] = []
        # the script
        self.state = "wait"
        self.start_at = 0.0
        self.deadline = 0.0
        self.heard0 = 0.0
        self.failed: str | None = None
        self.through = False
        self.send_json({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        self.send_json({
            "event": "start", "sequenceNumber": self.next_seq(),
            "start": {"accountSid": "AC" + "0" * 32, "streamSid": self.stream_sid, "callSid": self.call_sid,
                      "tracks": ["inbound"],
                      "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                      "customParameters": params},
            "streamSid": self.stream_sid})

    # -- sending (buffered; the loop flushes) ----------------------------------------------------

    def next_seq(self) -> str:
        self.seq += 1
        return str(self.seq)

    def send_json(self, message: dict[str, Any]) -> None:
        self.out += ws_frame(OP_TEXT, json.dumps(message).encode())

    def send_frame(self, payload_b64: str) -> None:
        self.chunk += 1
        self.out += ws_frame(OP_TEXT, (
            f'{{"event": "media", "sequenceNumber": "{self.next_seq()}", "media": {{"track": "inbound", '
            f'"chunk": "{self.chunk}", "timestamp": "{self.chunk * FRAME_MS}", "payload": "{payload_b64}"}}, '
            f'"streamSid": "{self.stream_sid}"}}').encode())
        self.frames_sent += 1

    def echo(self, name: str) -> None:
        self.send_json({"event": "mark", "sequenceNumber": self.next_seq(), "streamSid": self.stream_sid,
                                "mark": {"name": name}})

    # -- what the caller heard -------------------------------------------------------------------

    def heard(self, now: float) -> float:
        """Milliseconds of assistant audio heard by ``now``: all queued, less what is still to play."""
        return self.pos - max(0.0, self.play_end - now) * 1000.0

    def item_at(self, position: float) -> tuple[str | None, float]:
        """The item whose audio is at ``position``, and how much of it lies before that position."""
        found: tuple[str | None, float] = (None, 0.0)
        for item, start in self.items:
            if start > position:
                break
            found = (item, position - start)
        return found

    # -- messages from the bridge ------------------------------------------------------------------

    def on_text(self, raw: bytes, now: float, timers: Timers) -> None:
        try:
            msg = json.loads(raw)
        except ValueError:
            self.errors.append(f"not JSON: {raw[:80]!r}")
            return
        event = msg.get("event") if isinstance(msg, dict) else None
        if not isinstance(msg, dict) or msg.get("streamSid") != self.stream_sid:
            self.errors.append(f"{event}: wrong or missing streamSid")
        if event == "media":
            payload = msg["media"]["payload"]
            nbytes = len(payload) * 3 // 4 - (payload.endswith("=") + payload.endswith("=="))
            ms = nbytes / 8.0
            start = max(now, self.play_end)
            self.play_end = start + ms / 1000.0
            self.pos += ms
        elif event == "mark":
            name = msg["mark"]["name"]
            item = name.rsplit("/", 1)[0]
            if not self.items or self.items[-1][0] != item:
                self.items.append((item, self.last_mark_pos))
            self.last_mark_pos = self.pos
            due = max(now, self.play_end)
            if due <= now and not self.marks:
                self.echo(name)  # nothing before it is still playing
            else:
                self.marks.append((due, name))
                timers.push(due, MARK, self, self.gen)
        elif event == "clear":
            self.on_clear(now)
        else:
            self.errors.append(f"unknown event {event!r}")

    def on_clear(self, now: float) -> None:
        heard = self.heard(now)
        item, item_heard = self.item_at(heard)
        self.clears.append({"item_id": item, "item_heard_ms": round(item_heard, 3), "at": now,
                            "heard_ms": round(heard, 3), "dropped_ms": round(self.pos - heard, 3)})
        self.pos = heard
        self.play_end = min(self.play_end, now)
        self.last_mark_pos = heard
        while self.items and self.items[-1][1] >= heard and len(self.items) > 1:
            self.items.pop()  # items whose audio was all dropped
        while len(self.items) > 4:
            self.items.popleft()
        # Twilio hands back every pending mark at once on a clear.
        returned = [name for _, name in self.marks]
        self.marks.clear()
        self.gen += 1
        for name in returned:
            self.echo(name)

    # -- the clock (every 20 ms) -------------------------------------------------------------------

    def tick(self, now: float, cfg: dict[str, Any], speech: list[str], barge: list[str]) -> None:
        if self.speech:
            self.send_frame(self.speech.popleft())
            self.speech_sent += 1
        else:
            self.send_frame(SILENCE_B64)
        self.script(now, cfg, speech, barge)

    def say(self, frames: list[str]) -> None:
        self.speech.extend(frames)
        self.speech_queued += len(frames)

    def script(self, now: float, cfg: dict[str, Any], speech: list[str], barge: list[str]) -> None:
        """Speak, listen for barge_after_ms of the answer, talk over it, wait for the clear."""
        if self.state == "wait" and self.start_at and now >= self.start_at:
            self.say(speech)
            self.state, self.deadline = "speaking", now + 60.0
        elif self.state == "speaking" and self.speech_sent == self.speech_queued:
            self.heard0 = self.heard(now)
            self.state, self.deadline = "listening", now + 60.0
        elif self.state == "listening":
            if self.heard(now) - self.heard0 >= cfg["barge_after_ms"]:
                self.say(barge)
                self.state, self.deadline = "barged", now + 30.0
            elif now > self.deadline:
                self.finish("no answer heard")
        elif self.state == "barged":
            if self.clears:
                self.state, self.deadline = "finishing", now + 30.0
            elif now > self.deadline:
                self.failed = "no clear"
                self.state, self.deadline = "finishing", now + 30.0
        elif self.state == "finishing" and (self.speech_sent == self.speech_queued or now > self.deadline):
            self.finish(None)
        if self.state == "speaking" and now > self.deadline:
            self.finish("speech not sent")

    def finish(self, failed: str | None) -> None:
        if failed and not self.failed:
            self.failed = failed
        self.state = "done"
        self.through = True

    def result(self, now: float) -> dict[str, Any]:
        return {"call_sid": self.call_sid, "failed": self.failed,
                "clears": [{k: c[k] for k in ("item_id", "item_heard_ms", "at")} for c in self.clears],
                "heard_ms": round(self.heard(now), 3), "errors": self.errors[:5], "frames_sent": self.frames_sent}


class Timers:
    """One heap of (due, n, kind, line, gen) for every call's frame clock and mark echoes."""

    def __init__(self) -> None:
        self.heap: list[tuple[float, int, int, Line, int]] = []
        self.n = 0

    def push(self, due: float, kind: int, line: Line, gen: int = 0) -> None:
        self.n += 1
        heapq.heappush(self.heap, (due, self.n, kind, line, gen))


_SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux: the kernel's receive time of the bytes read
_ANCILLARY = socket.CMSG_SPACE(16)


class Callers:
    """The event loop: sockets, timers, scripts."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.sel = selectors.DefaultSelector()
        self.timers = Timers()
        self.lines: list[Line] = []
        self.period = FRAME_MS / 1000.0
        self.read_lags: list[float] = []  # seconds between a read's bytes arriving and this thread reading them
        self.speech = self.frames("Hello, I would like to check on my order please.")
        self.barge = self.frames("Sorry, stop, stop.")

    @staticmethod
    def frames(text: str) -> list[str]:
        audio = convert(synthesize(text).pcm, PCM16, PCMU)
        if len(audio) % FRAME:
            audio += b"\xff" * (FRAME - len(audio) % FRAME)
        return [base64.b64encode(audio[i : i + FRAME]).decode("ascii") for i in range(0, len(audio), FRAME)]

    def open(self, index: int, params: dict[str, str]) -> Line:
        sock, rest = ws_open(self.cfg["url"], 60.0)
        sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        line = Line(index, sock, rest, params)
        self.sel.register(sock, selectors.EVENT_READ, line)
        line.next_tick = time.monotonic()
        self.timers.push(line.next_tick, TICK, line)
        self.lines.append(line)
        self.flush(line)
        return line

    # -- I/O ----------------------------------------------------------------------------------------

    def flush(self, line: Line) -> None:
        if line.closed or not line.out:
            return
        try:
            n = line.sock.send(line.out)
        except BlockingIOError:
            n = 0
        except OSError as exc:
            self.drop(line, f"send failed: {exc!r}")
            return
        del line.out[:n]
        want = bool(line.out)
        if want != line.writing:  # the bridge is not reading fast enough: wait for room, keep the rest
            line.writing = want
            self.sel.modify(line.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0), line)

    def drop(self, line: Line, why: str | None) -> None:
        if line.closed:
            return
        line.closed = True
        if why and not line.through:
            line.finish(why)
        try:
            self.sel.unregister(line.sock)
        except (KeyError, ValueError):
            pass
        line.sock.close()

    def read(self, line: Line, now: float) -> None:
        try:
            data, ancillary, _, _ = line.sock.recvmsg(262144, _ANCILLARY)
        except BlockingIOError:
            return
        except OSError as exc:
            self.drop(line, f"recv failed: {exc!r}")
            return
        if not data:
            self.drop(line, "the bridge closed the stream")
            return
        for level, kind, cdata in ancillary:
            if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(cdata) >= 16:
                sec, nsec = struct.unpack("qq", cdata[:16])
                lag = min(max(0.0, time.time() - (sec + nsec / 1e9)), 1.0)
                self.read_lags.append(lag)
                now -= lag  # when the (last of the) bytes arrived
        buf = line.inbuf
        buf += data
        off, size = 0, len(buf)
        while size - off >= 2:
            b0, b1 = buf[off], buf[off + 1]
            n, head = b1 & 0x7F, 2
            if n == 126:
                if size - off < 4:
                    break
                n, head = int.from_bytes(buf[off + 2 : off + 4], "big"), 4
            elif n == 127:
                if size - off < 10:
                    break
                n, head = int.from_bytes(buf[off + 2 : off + 10], "big"), 10
            if b1 & 0x80 or not b0 & 0x80:  # a server never masks; the bridge never fragments
                line.errors.append("masked or fragmented frame from the server")
            if size - off < head + n:
                break
            payload = bytes(buf[off + head : off + head + n])
            off += head + n
            opcode = b0 & 0x0F
            if opcode == OP_TEXT:
                line.on_text(payload, now, self.timers)
            elif opcode == OP_PING:
                line.out += ws_frame(OP_PONG, payload)
            elif opcode == OP_CLOSE:
                if not line.close_sent:
                    line.close_sent = True
                    line.out += ws_frame(OP_CLOSE, payload[:2])
            elif opcode != OP_PONG:
                line.errors.append(f"unexpected opcode {opcode}")
        del buf[:off]
        self.flush(line)

    def run_until(self, done: Any, timeout: float) -> None:
        """Serve sockets and timers until ``done()`` or ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        cfg, speech, barge, heap, period = self.cfg, self.speech, self.barge, self.timers.heap, self.period
        while not done():
            now = time.monotonic()
            if now >= deadline:
                return
            wait = min(0.05, deadline - now)
            if heap:
                wait = max(0.0, min(wait, heap[0][0] - now))
            for key, mask in self.sel.select(wait):
                line = key.data
                if mask & selectors.EVENT_READ:
                    self.read(line, time.monotonic())
                if mask & selectors.EVENT_WRITE and not line.closed:
                    self.flush(line)
            now = time.monotonic()
            touched: set[Line] = set()
            while heap and heap[0][0] <= now:
                _, _, kind, line, gen = heapq.heappop(heap)
                if line.closed:
                    continue
                if kind == TICK:
                    line.tick(now, cfg, speech, barge)
                    line.next_tick += period
                    if now - line.next_tick > 10 * period:  # fell far behind (a stalled machine): resync
                        line.next_tick = now + period
                    self.timers.push(line.next_tick, TICK, line)
                elif gen == line.gen:
                    while line.marks and line.marks[0][0] <= now:
                        line.echo(line.marks.popleft()[1])
                touched.add(line)
            for line in touched:
                self.flush(line)

    def hang_up(self) -> None:
        """``stop`` and a close frame on every line, then wait (bounded) for the bridge to close them."""
        for line in self.lines:
            if not line.closed:
                line.send_json({"event": "stop", "sequenceNumber": line.next_seq(),
                                        "streamSid": line.stream_sid,
                                        "stop": {"accountSid": "AC" + "0" * 32, "callSid": line.call_sid}})
                if not line.close_sent:
                    line.close_sent = True
                    line.out += ws_frame(OP_CLOSE, (1000).to_bytes(2, "big"))
                line.state = "hung up"
                self.flush(line)
        self.run_until(lambda: all(line.closed for line in self.lines), 15.0)
        for line in self.lines:
            self.drop(line, None)
        self.sel.close()


def main() -> int:
    cfg = json.loads(sys.argv[1])
    if not cfg["url"].startswith("ws://127.0.0.1:"):
        print("only 127.0.0.1", file=sys.stderr)
        return 2
    cfg.setdefault("barge_after_ms", 1500.0)
    cfg.setdefault("timeout_s", 240.0)
    n = int(cfg["calls"])
    rng = random.Random(f"{cfg.get('seed', 1)}|callers")
    callers = Callers(cfg)
    gap = float(cfg.get("ramp_s", 5.0)) / max(1, n)
    t_next = time.monotonic()
    for i in range(n):
        callers.open(i + 1, {"n": str(i)})
        t_next += gap
        # Twilio's calls arrive over time, not in one burst; the lines already open keep streaming meanwhile.
        callers.run_until(lambda until=t_next: time.monotonic() >= until, gap + 1.0)
    print(json.dumps({"connected": len(callers.lines)}), flush=True)
    t0 = time.monotonic()
    for line in callers.lines:
        line.start_at = t0 + rng.uniform(0.0, float(cfg.get("spread_s", 5.0)))
    callers.run_until(lambda: all(line.through for line in callers.lines), float(cfg["timeout_s"]))
    now = time.monotonic()
    for line in callers.lines:
        if not line.through:
            line.finish(f"not through by the timeout (state {line.state})")
    lags = sorted(callers.read_lags)
    read_lag = {f"p{q}": round(1000.0 * lags[min(len(lags) - 1, int(len(lags) * q / 100))], 3) for q in (50, 99)} \
        if lags else {}
    read_lag["max"] = round(1000.0 * lags[-1], 3) if lags else None
    print(json.dumps({"through_s": round(now - t0, 2), "read_lag_ms": read_lag,
                      "calls": [line.result(now) for line in callers.lines]}), flush=True)
    callers.hang_up()
    return 0


if __name__ == "__main__":
    sys.exit(main())
