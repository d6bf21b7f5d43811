"""A fake Twilio for tests: calls that speak the Media Streams protocol to a server on loopback.

:class:`FakeTwilio` places calls to a Media Streams WebSocket (a
:class:`rtqueue.twilio.TwilioBridge`, or any other server) the way Twilio
does: ``connected``, ``start`` (``audio/x-mulaw`` 8000 Hz mono, custom
parameters; the handshake signed with ``auth_token`` when given), then ``media`` frames
of 20 ms mu-law paced in real time (``speed``
times faster), ``dtmf`` and ``stop``. Each :class:`FakeCall` is also the
caller's ear:

- outbound ``media`` is played on a playout clock: audio arriving while
  earlier audio plays is queued behind it, audio arriving to an idle line plays
  from its arrival;
- a ``mark`` is echoed once all audio queued before it has been played;
- ``clear`` drops the unplayed audio at once (the frame under way stops where
  it is) and hands back every pending mark at once, as Twilio does;
- what was heard is recorded: bytes and milliseconds per assistant item (the
  item is read from the mark that follows the audio; :class:`TwilioBridge`
  names marks ``<item_id>/<n>``), a timeline, and each ``clear`` with when it
  came and how much had been heard by then.

The caller is scripted from the test's thread: :meth:`FakeCall.say` (text
made into speech by :mod:`rtqueue.sim.synth`, so the simulator knows what was
said, or raw mu-law), :meth:`FakeCall.pause`, :meth:`FakeCall.dtmf`,
:meth:`FakeCall.hangup`, and waits such as :meth:`FakeCall.wait_heard`. Between
utterances the line carries mu-law silence, as a real phone line does, so
server VAD sees each utterance end.

Threads per call, all named "rtqueue-fake-twilio-...": a reader (the only one
to read the socket), a clock (inbound frames, mark echoes) and websockets'
receive thread. :meth:`FakeCall.close` ends them.
"""

from __future__ import annotations

import base64
import collections
import itertools
import json
import math
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from .errors import InvalidArgument
from .formats import PCM16, PCMU, convert

__all__ = ["ClearRecord", "FakeCall", "FakeTwilio", "Heard"]

_FRAME_MS = 20
_FRAME = PCMU.nbytes(_FRAME_MS)  # 160 bytes
_SILENCE = b"\xff" * _FRAME  # mu-law code of a zero sample
_JOIN_TIMEOUT = 5.0


@attrs.frozen
class Heard:
    """One stretch of assistant audio the caller heard: ``item_id`` (None if no mark named it),
    wall-clock ``start``/``end`` (``time.monotonic()``), milliseconds of audio ``ms``, and
    whether a ``clear`` cut it."""

    item_id: str | None
    start: float
    end: float
    ms: float
    cut: bool


@attrs.frozen
class ClearRecord:
    """A ``clear`` as the caller's line saw it: when it came (``time.monotonic()``), the item
    playing (or last played), how much of that item had been heard, the audio it dropped, and
    the marks it handed back."""

    at: float
    item_id: str | None
    item_heard_ms: float
    heard_ms: float
    dropped_ms: float
    marks_returned: int


@attrs.define(eq=False)
class _Seg:
    payload: bytes
    start: float
    end: float
    item_id: str | None = None
    cut_at: float | None = None

    def heard_bytes(self, now: float) -> int:
        stop = min(now, self.cut_at if self.cut_at is not None else self.end)
        if stop <= self.start:
            return 0
        if stop >= self.end:
            return len(self.payload)
        return int(len(self.payload) * (stop - self.start) / (self.end - self.start))


def _item_of(mark: str) -> str:
    return mark.rsplit("/", 1)[0] if "/" in mark else mark


class FakeCall:
    """One call from the fake Twilio (see the module doc). Make it with :meth:`FakeTwilio.call`."""

    def __init__(
        self,
        url: str,
        *,
        index: int = 1,
        speed: float = 1.0,
        parameters: Mapping[str, str] | None = None,
        call_sid: str | None = None,
        account_sid: str = "AC00000000000000000000000000000000",
        mic: bool = True,
        echo_marks_on_clear: bool = True,
        connect_timeout: float = 10.0,
        auth_token: str | None = None,
    ) -> None:
        from websockets.sync.client import connect

        if not speed > 0 or math.isinf(speed):
            raise InvalidArgument(f"speed must be > 0, not {speed!r}")
        self.index = index
        self.speed = float(speed)
        self.stream_sid = f"MZ{index:032x}"
        self.call_sid = call_sid or f"CA{index:032x}"
        self.account_sid = account_sid
        self.parameters = dict(parameters or {})
        self._mic = mic
        self._echo_on_clear = echo_marks_on_clear
        # Reentrant: wait_until() runs the test's predicate, which reads heard_ms() & co., under it.
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._seq = itertools.count(1)
        self._stop = threading.Event()
        self.closed = threading.Event()  # the socket is closed (either side)
        # inbound (the caller's voice)
        self._speech: collections.deque[bytes] = collections.deque()
        self._speech_queued = 0  # frames ever queued
        self._speech_sent = 0  # of those, sent
        self.frames_sent = 0
        self.sent_audio = bytearray()  # every inbound byte sent, silence included
        # outbound (what the caller hears)
        self._segs: list[_Seg] = []
        self._play_end = 0.0
        self._marks: collections.deque[tuple[str, float]] = collections.deque()
        self.clears: list[ClearRecord] = []
        self.marks_received = 0
        self.marks_echoed = 0
        self.media_received = 0
        self.dropped_bytes = 0
        self.events: list[tuple[float, str, str | None]] = []  # (t, event, mark name) for all but media
        self.errors: list[str] = []  # protocol violations seen from the server
        self.close_code: int | None = None

        headers = {}
        if auth_token is not None:  # sign the handshake as Twilio does
            from twilio.request_validator import RequestValidator  # type: ignore[import-untyped]

            headers["X-Twilio-Signature"] = RequestValidator(auth_token).compute_signature(url, {})
        self._ws = connect(url, compression=None, open_timeout=connect_timeout, ping_interval=None,
                           close_timeout=2.0, proxy=None, additional_headers=headers)
        self._ws.recv_events_thread.name = f"rtqueue-fake-twilio-recv-{index}"
        self._send({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        self._send({
            "event": "start",
            "sequenceNumber": str(next(self._seq)),
            "start": {
                "accountSid": self.account_sid,
                "streamSid": self.stream_sid,
                "callSid": self.call_sid,
                "tracks": ["inbound"],
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                "customParameters": self.parameters,
            },
            "streamSid": self.stream_sid,
        })
        self._t0 = time.monotonic()
        self._reader = threading.Thread(target=self._read, name=f"rtqueue-fake-twilio-reader-{index}", daemon=True)
        self._clock = threading.Thread(target=self._run_clock, name=f"rtqueue-fake-twilio-clock-{index}",
                                       daemon=True)
        self._reader.start()
        self._clock.start()

    # -- the caller's script ----------------------------------------------------------------------

    def say(self, speech: str | bytes, *, wait: bool = True, timeout: float | None = None) -> float:
        """Speak: text (synthesized speech the simulator understands) or raw mu-law bytes.

        Returns the speech's duration in ms. With ``wait`` blocks until its last
        frame was sent (real time divided by ``speed``).
        """
        if isinstance(speech, str):
            from .sim.synth import synthesize

            audio = convert(synthesize(speech).pcm, PCM16, PCMU)
        elif isinstance(speech, (bytes, bytearray, memoryview)):
            audio = bytes(speech)
        else:
            raise InvalidArgument(f"say() takes text or mu-law bytes, not {type(speech).__name__}")
        if len(audio) % _FRAME:
            audio += b"\xff" * (_FRAME - len(audio) % _FRAME)
        frames = [audio[i : i + _FRAME] for i in range(0, len(audio), _FRAME)]
        with self._cond:
            self._speech.extend(frames)
            self._speech_queued += len(frames)
            target = self._speech_queued
            self._cond.notify_all()
        if wait:
            limit = timeout if timeout is not None else 2 * PCMU.ms(len(audio)) / 1000 / self.speed + 10.0
            self.wait_until(lambda c: c.speech_sent >= target, limit)
        return PCMU.ms(len(audio))

    def pause(self, ms: float) -> None:
        """Stay silent for ``ms`` of line time (the line keeps sending silence)."""
        self._stop.wait(ms / 1000.0 / self.speed)

    def dtmf(self, digit: str) -> None:
        """Press a key (``0-9``, ``*``, ``#``, ``A-D``)."""
        if not isinstance(digit, str) or len(digit) != 1 or digit not in "0123456789*#ABCD":
            raise InvalidArgument(f"a DTMF digit is one of 0-9 * # A-D, not {digit!r}")
        self._send({"event": "dtmf", "streamSid": self.stream_sid, "sequenceNumber": str(next(self._seq)),
                    "dtmf": {"track": "inbound_track", "digit": digit}})

    def hangup(self) -> None:
        """Send ``stop`` and close the stream, as Twilio does when the caller hangs up."""
        if not self.closed.is_set():
            try:
                self._send({"event": "stop", "sequenceNumber": str(next(self._seq)), "streamSid": self.stream_sid,
                            "stop": {"accountSid": self.account_sid, "callSid": self.call_sid}})
            except Exception:
                pass  # the server closed first
        self.close()

    def close(self) -> None:
        """Close the socket and end this call's threads. Idempotent."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        try:
            self._ws.close()
        except Exception:
            pass
        for t in (self._clock, self._reader, self._ws.recv_events_thread):
            if t is not threading.current_thread():
                t.join(_JOIN_TIMEOUT)

    # -- what happened ----------------------------------------------------------------------------

    @property
    def speech_sent(self) -> int:
        """Frames of speech sent so far (see :meth:`say`)."""
        return self._speech_sent

    @property
    def speech_queued(self) -> int:
        """Frames of speech queued so far; all were sent when it equals :attr:`speech_sent`."""
        return self._speech_queued

    def wait_until(self, predicate: Callable[[FakeCall], bool], timeout: float) -> bool:
        """Block until ``predicate(self)`` is true (re-checked at every 20 ms tick); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    def heard_ms(self, item_id: str | None = None) -> float:
        """Milliseconds of assistant audio heard so far (of ``item_id`` only, when given)."""
        now = time.monotonic()
        with self._lock:
            return PCMU.ms(sum(s.heard_bytes(now) for s in self._segs if item_id is None or s.item_id == item_id))

    def heard_audio(self, item_id: str | None = None) -> bytes:
        """The mu-law bytes heard so far, in order (of ``item_id`` only, when given)."""
        now = time.monotonic()
        with self._lock:
            return b"".join(s.payload[: s.heard_bytes(now)] for s in self._segs
                            if item_id is None or s.item_id == item_id)

    def heard_items(self) -> dict[str, float]:
        """Milliseconds heard per item, in the order first heard."""
        now = time.monotonic()
        out: dict[str, float] = {}
        with self._lock:
            for s in self._segs:
                if s.item_id is not None:
                    out[s.item_id] = out.get(s.item_id, 0.0) + PCMU.ms(s.heard_bytes(now))
        return out

    def timeline(self) -> list[Heard]:
        """What was heard, as stretches of one item each (consecutive frames merged)."""
        now = time.monotonic()
        out: list[Heard] = []
        with self._lock:
            for s in self._segs:
                n = s.heard_bytes(now)
                if not n:
                    continue
                end = s.start + (s.end - s.start) * n / len(s.payload)
                prev = out[-1] if out else None
                if prev is not None and prev.item_id == s.item_id and not prev.cut and abs(prev.end - s.start) < 1e-3:
                    out[-1] = Heard(s.item_id, prev.start, end, prev.ms + PCMU.ms(n), s.cut_at is not None)
                else:
                    out.append(Heard(s.item_id, s.start, end, PCMU.ms(n), s.cut_at is not None))
        return out

    def agent_talking(self) -> bool:
        """True while assistant audio is playing on the line."""
        now = time.monotonic()
        with self._lock:
            return self._play_end > now

    def marks_pending(self) -> int:
        """Marks received and not yet echoed."""
        with self._lock:
            return len(self._marks)

    # -- threads ----------------------------------------------------------------------------------

    def _send(self, message: dict[str, Any]) -> None:
        self._ws.send(json.dumps(message))

    def _read(self) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            for raw in self._ws:
                self._on_message(raw)
        except ConnectionClosed:
            pass
        finally:
            self.close_code = self._ws.close_code
            self.closed.set()
            self._stop.set()
            with self._cond:
                self._cond.notify_all()

    def _on_message(self, raw: str | bytes) -> None:
        now = time.monotonic()
        try:
            msg = json.loads(raw)
        except ValueError:
            self.errors.append(f"not JSON: {raw[:80]!r}")
            return
        if not isinstance(msg, dict):
            self.errors.append(f"not an object: {msg!r}")
            return
        event = msg.get("event")
        if msg.get("streamSid") != self.stream_sid:
            self.errors.append(f"{event}: streamSid {msg.get('streamSid')!r} is not {self.stream_sid!r}")
        if event == "media":
            media = msg.get("media")
            try:
                payload = base64.b64decode(media["payload"], validate=True)  # type: ignore[index]
            except Exception:
                self.errors.append(f"media without a base64 payload: {media!r}")
                return
            with self._cond:
                self.media_received += 1
                start = max(now, self._play_end)
                end = start + PCMU.ms(len(payload)) / 1000.0 / self.speed
                self._segs.append(_Seg(payload, start, end))
                self._play_end = end
                self._cond.notify_all()
        elif event == "mark":
            mark = msg.get("mark")
            name = mark.get("name") if isinstance(mark, dict) else None
            if not isinstance(name, str):
                self.errors.append(f"mark without a name: {msg!r}")
                return
            with self._cond:
                self.events.append((now, "mark", name))
                self.marks_received += 1
                item = _item_of(name)
                for s in reversed(self._segs):
                    if s.item_id is not None:
                        break
                    s.item_id = item
                self._marks.append((name, max(now, self._play_end)))
                self._cond.notify_all()
        elif event == "clear":
            self._on_clear(now)
        else:
            self.errors.append(f"unknown event {event!r}")

    def _on_clear(self, now: float) -> None:
        with self._cond:
            self.events.append((now, "clear", None))
            playing = [s for s in self._segs if s.start <= now < s.end]
            before = [s for s in self._segs if s.start <= now]
            current = playing[0] if playing else (before[-1] if before else None)
            dropped = 0
            kept: list[_Seg] = []
            for s in self._segs:
                if s.start >= now and s.cut_at is None:
                    dropped += len(s.payload)
                    continue
                if s.end > now and s.cut_at is None:
                    s.cut_at = now
                    dropped += len(s.payload) - s.heard_bytes(now)
                kept.append(s)
            self._segs = kept
            self.dropped_bytes += dropped
            self._play_end = min(self._play_end, now)
            returned = [name for name, _ in self._marks] if self._echo_on_clear else []
            self._marks.clear()
            item = current.item_id if current is not None else None
            item_heard = sum(s.heard_bytes(now) for s in self._segs if item is not None and s.item_id == item)
            self.clears.append(ClearRecord(
                at=now,
                item_id=item,
                item_heard_ms=PCMU.ms(item_heard),
                heard_ms=PCMU.ms(sum(s.heard_bytes(now) for s in self._segs)),
                dropped_ms=PCMU.ms(dropped),
                marks_returned=len(returned),
            ))
            self._cond.notify_all()
        self._echo(returned)

    def _echo(self, names: list[str]) -> None:
        for name in names:
            try:
                self._send({"event": "mark", "sequenceNumber": str(next(self._seq)), "streamSid": self.stream_sid,
                            "mark": {"name": name}})
            except Exception:
                return
            with self._lock:
                self.marks_echoed += 1

    def _run_clock(self) -> None:
        period = _FRAME_MS / 1000.0 / self.speed
        next_tick = time.monotonic()
        chunk = 0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                frame: bytes | None = None
                with self._cond:
                    due = []
                    while self._marks and self._marks[0][1] <= now:
                        due.append(self._marks.popleft()[0])
                    if now >= next_tick:
                        if self._speech:
                            frame = self._speech.popleft()
                            self._speech_sent += 1
                        elif self._mic:
                            frame = _SILENCE
                        next_tick += period
                        if now - next_tick > 10 * period:  # fell far behind (a stalled machine): resync
                            next_tick = now + period
                    self._cond.notify_all()
                self._echo(due)
                if frame is not None:
                    chunk += 1
                    self._send({
                        "event": "media",
                        "sequenceNumber": str(next(self._seq)),
                        "media": {"track": "inbound", "chunk": str(chunk), "timestamp": str(chunk * _FRAME_MS),
                                  "payload": base64.b64encode(frame).decode("ascii")},
                        "streamSid": self.stream_sid,
                    })
                    self.frames_sent += 1
                    self.sent_audio += frame
                with self._cond:
                    wake = next_tick if (self._mic or self._speech) else now + 0.05
                    if self._marks:
                        wake = min(wake, self._marks[0][1])
                    left = wake - time.monotonic()
                    if left > 0 and not self._stop.is_set():
                        self._cond.wait(left)
        except Exception:
            # The socket closed under us (the server hung up): the reader records it.
            self._stop.set()

    def __enter__(self) -> FakeCall:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FakeTwilio:
    """Places :class:`FakeCall` s to a Media Streams URL (e.g. ``TwilioBridge.url``).

    ``speed`` paces every call's line (inbound frames and playout); 1.0 is
    real time. :meth:`close` closes every call placed.
    """

    def __init__(self, url: str, *, speed: float = 1.0) -> None:
        self.url = url
        self.speed = speed
        self._lock = threading.Lock()
        self._calls: list[FakeCall] = []
        self._index = itertools.count(1)

    def call(self, *, parameters: Mapping[str, str] | None = None, **kwargs: Any) -> FakeCall:
        """Open a stream: ``connected`` and ``start`` are sent before this returns."""
        kwargs.setdefault("speed", self.speed)
        call = FakeCall(self.url, index=next(self._index), parameters=parameters, **kwargs)
        with self._lock:
            self._calls.append(call)
        return call

    def close(self) -> None:
        """Close every call (no ``stop``: as if the line dropped). Idempotent."""
        with self._lock:
            calls, self._calls = self._calls, []
        for c in calls:
            c.close()

    def __enter__(self) -> FakeTwilio:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
