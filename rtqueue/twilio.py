"""Phone calls through Twilio Media Streams: a bridge from each call to an rtqueue :class:`~rtqueue.Session`.

Twilio opens a WebSocket to the app (TwiML ``<Connect><Stream url="wss://...">``,
see :func:`stream_twiml`) and speaks JSON: ``connected``, ``start`` (stream and
call ids, ``mediaFormat`` ``audio/x-mulaw`` 8000 Hz mono, custom parameters),
``media`` (base64 mu-law, 20 ms frames), ``mark``, ``dtmf``, ``stop``. The app
answers with ``media``, ``mark`` (Twilio echoes a mark once the audio queued
before it has been played to the caller) and ``clear`` (drop the buffered
audio now).

:class:`TwilioBridge` serves that WebSocket (websockets' sans-I/O protocol on
a few I/O threads, see :mod:`rtqueue.twilio_io`; on loopback unless told
otherwise) and joins each call to its own session, made by the app's factory
with the call's devices (:attr:`TwilioCall.audio`): ``audio/pcmu`` both ways,
so mu-law bytes pass from Twilio to ``input_audio_buffer.append`` and from the
assistant's audio deltas to Twilio untouched.

What the caller heard: each assistant delta is sent as media frames of at
most ``frame_ms`` (100 ms), each followed by a mark, and the played position
follows Twilio's playout (it plays in real time, each frame once the one
before it is done), corrected by the marks Twilio echoes; never audio merely
queued (see :class:`TwilioOutput`). On a barge-in (server VAD's
``speech_started`` or ``Session.interrupt``) the output device drops the
unsent audio, freezes the played position at that instant and writes
``clear`` to Twilio *before* it returns the cut to the session, which only
then cancels and truncates the item at that position; marks Twilio hands back
because of the clear are not counted as heard. The session's reader never
waits for the Twilio socket: if a frame write is under way or the socket is
full, the ``clear`` jumps the queue instead and is the next message written
(after at most the one frame under way), and the truncation is still at what
the caller heard.

Threads: ``io_threads`` (4) threads, "rtqueue-twilio-io-K", accept and read
every call's socket (the only readers; each call's socket is read by one of
them). They hand inbound audio to the session, which usually writes it to the
OpenAI socket on that very thread (see :mod:`rtqueue.writer`), and never run
app code. Per call, one worker ("rtqueue-twilio-worker-N") runs the app's
session factory, writes the outbound media the session's reader could not
write at once (a socket without room), then closes the session when the call
ends. :meth:`TwilioBridge.close` ends them all, from any thread.
"""

from __future__ import annotations

import base64
import binascii
import collections
import contextlib
import http
import itertools
import json
import logging
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs

from .audio.input import AudioInput, ChunkCallback
from .audio.output import AudioOutput, PlaybackCut
from .errors import AudioUnavailable, InvalidArgument, RtqueueError, SessionClosed
from .formats import PCMU, AudioFormat
from .httpreply import ReplyHandler
from .secrets import Secret

if TYPE_CHECKING:
    from websockets.http11 import Request

    from .audio.devices import AudioIO
    from .session import Session
    from .twilio_io import Link, MediaLoop

__all__ = [
    "DTMF_EVENT",
    "BridgeStats",
    "CallStats",
    "TwilioBridge",
    "TwilioCall",
    "TwilioInput",
    "TwilioOutput",
    "TwilioStart",
    "VoiceWebhook",
    "session_factory",
    "stream_twiml",
]

log = logging.getLogger("rtqueue.twilio")

#: Event type of a key press published to the call's session (the same type the
#: Realtime API uses for DTMF on SIP calls, so one handler serves both).
DTMF_EVENT = "input_audio_buffer.dtmf_event_received"

_MULAW_SILENCE = 0xFF  # mu-law code of a zero sample
_MAX_ITEMS = 256  # per-item accounting kept for this many recent items
_MAX_CLEARED = 4096  # names of marks handed back by a clear, remembered to ignore their echo
_ECHO_LAGS = 512  # recent mark echo lags kept (about a minute of speech): their minimum is the round trip
_JOIN_TIMEOUT = 5.0
# How long interrupt() waits for a frame write under way before it leaves the clear to the worker:
# one small write to a socket with room takes microseconds; a socket that is full could take forever.
_CLEAR_WAIT = 0.005

SessionFactory = Callable[["TwilioCall"], "Session"]


# ---------------------------------------------------------------------------------------------
# Values


def _check_ms(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 10 <= value <= 1000:
        raise InvalidArgument(f"{name} must be an int within 10..1000, not {value!r}")


def _check_speed(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e6:
        raise InvalidArgument(f"playout_speed must be a number > 0, not {value!r}")


def _str_map(value: Mapping[str, str]) -> dict[str, str]:
    return dict(value)


@attrs.frozen
class TwilioStart:
    """What Twilio's ``start`` message said about the stream."""

    stream_sid: str
    call_sid: str
    account_sid: str = ""
    tracks: tuple[str, ...] = ("inbound",)
    media_format: AudioFormat = PCMU
    # Apps pass per-call tokens here: kept out of repr (and so out of logs).
    custom_parameters: Mapping[str, str] = attrs.field(factory=dict, converter=_str_map, repr=False)

    @classmethod
    def from_message(cls, message: Mapping[str, Any]) -> TwilioStart:
        """Parse a ``start`` message; raise :class:`InvalidArgument` if it is not one we can carry.

        The media format must be ``audio/x-mulaw`` at 8000 Hz, mono (the only
        format Twilio streams in).
        """
        start = message.get("start")
        if not isinstance(start, Mapping):
            raise InvalidArgument("Twilio start message without a 'start' object")
        stream_sid = start.get("streamSid") or message.get("streamSid")
        call_sid = start.get("callSid")
        if not isinstance(stream_sid, str) or not stream_sid or not isinstance(call_sid, str) or not call_sid:
            raise InvalidArgument("Twilio start message without streamSid/callSid")
        mf = start.get("mediaFormat") or {}
        if not isinstance(mf, Mapping):
            raise InvalidArgument(f"Twilio mediaFormat must be an object, not {mf!r}")
        encoding, rate, channels = mf.get("encoding", "audio/x-mulaw"), mf.get("sampleRate", 8000), mf.get(
            "channels", 1)
        if str(encoding).lower() != "audio/x-mulaw" or rate != 8000 or channels != 1:
            raise InvalidArgument(
                f"Twilio media format {encoding!r} {rate!r} Hz x{channels!r}: "
                "only audio/x-mulaw 8000 Hz mono is carried"
            )
        params = start.get("customParameters") or {}
        if not isinstance(params, Mapping):
            raise InvalidArgument(f"Twilio customParameters must be an object, not {params!r}")
        tracks = start.get("tracks") or ("inbound",)
        return cls(
            stream_sid=stream_sid,
            call_sid=call_sid,
            account_sid=str(start.get("accountSid") or ""),
            tracks=tuple(str(t) for t in tracks) if isinstance(tracks, (list, tuple)) else ("inbound",),
            media_format=PCMU,
            custom_parameters={str(k): str(v) for k, v in params.items()},
        )


@attrs.frozen
class CallStats:
    """Counters of one call (a snapshot).

    ``heard_ms``: assistant audio whose marks Twilio echoed (what the caller
    heard); ``sent_ms``: assistant audio written to Twilio; ``marks_pending``:
    marks sent and not yet echoed; ``marks_cleared``: marks a ``clear`` made
    moot (their echoes are not counted as heard); ``barge_ins``: interrupts
    that cut audio still playing (each wrote one ``clear``); ``interrupts``:
    every ``interrupt()`` the session made; ``last_clear_at``: the
    ``time.monotonic()`` at which the last ``clear`` was written.
    """

    index: int
    state: str
    stream_sid: str | None
    call_sid: str | None
    media_in_frames: int
    media_in_ms: float
    media_out_frames: int
    sent_ms: float
    heard_ms: float
    marks_sent: int
    marks_echoed: int
    marks_pending: int
    marks_cleared: int
    clears: int
    barge_ins: int
    interrupts: int
    dtmf: int
    ignored_ms: float
    last_clear_at: float | None
    error: str | None


@attrs.frozen
class BridgeStats:
    """Counters of a bridge (a snapshot): calls now and in total, plus each live call's :class:`CallStats`."""

    active_calls: int
    total_calls: int
    failed_calls: int
    rejected: int
    barge_ins: int
    calls: tuple[CallStats, ...]
    #: The I/O loop that reads every call's socket: ``rounds``, ``busy_s``, ``longest_round_ms``, ``links``.
    io: Mapping[str, float] = attrs.field(factory=dict)


# ---------------------------------------------------------------------------------------------
# The call's audio devices


class TwilioInput(AudioInput):
    """The caller's voice: mu-law frames from Twilio's ``media`` messages, passed on untouched.

    :meth:`feed` is called by the call's socket reader. Twilio's 20 ms frames
    are joined into chunks of ``chunk_ms`` (40 ms, as the microphone's) before
    they go to the session: each chunk is one ``input_audio_buffer.append``,
    so the OpenAI socket carries half as many messages as Twilio's, at the
    cost of at most one frame of delay. Before the session has started the
    device (while the app's factory connects), up to ``backlog_ms`` of audio
    is kept and delivered first; older audio is dropped. While ``muted``,
    mu-law silence of the same length is delivered instead.
    """

    format: AudioFormat = PCMU

    def __init__(self, *, backlog_ms: int = 2000, chunk_ms: int = 40) -> None:
        _check_ms("chunk_ms", chunk_ms)
        self.muted = False
        self.chunk_ms = chunk_ms
        self._chunk_bytes = PCMU.nbytes(chunk_ms)
        self._pending = bytearray()  # frames fed and not yet a whole chunk (only the socket reader feeds)
        self._backlog_max = PCMU.nbytes(backlog_ms)
        self._lock = threading.Lock()
        self._on_chunk: ChunkCallback | None = None
        self._backlog: collections.deque[bytes] = collections.deque()
        self._backlog_bytes = 0
        self._closed = False
        self._starting = False
        self._delivered = 0
        self._dropped = 0
        self._muted_bytes = 0
        self._callback_errors = 0

    def start(self, on_chunk: ChunkCallback) -> None:
        """Deliver the backlog, then every frame as it comes, to ``on_chunk``."""
        if not callable(on_chunk):
            raise InvalidArgument(f"on_chunk must be callable, got {on_chunk!r}")
        with self._lock:
            if self._closed:
                raise AudioUnavailable("TwilioInput is closed")
            if self._on_chunk is not None or self._starting:
                raise InvalidArgument("TwilioInput already started")
            self._starting = True
        # The backlog is delivered outside the lock (the callback may take a
        # moment); frames fed meanwhile join the backlog and go out in the next
        # round, so order is kept. Then feed() delivers directly.
        carry = bytearray()  # backlog short of a whole chunk: it leads what feed() joins next
        while True:
            with self._lock:
                backlog = list(self._backlog)
                self._backlog.clear()
                self._backlog_bytes = 0
                if not backlog or self._closed:
                    if not self._closed:
                        self._pending[:0] = carry
                        self._on_chunk = on_chunk
                    return
            for frame in backlog:
                carry += frame
            step = self._chunk_bytes
            while len(carry) >= step:
                chunk = bytes(carry[:step])
                del carry[:step]
                self._deliver(on_chunk, chunk)

    def feed(self, frame: bytes) -> None:
        """One inbound frame of mu-law audio (the socket reader calls this; never blocks)."""
        with self._lock:
            if self._closed:
                return
            cb = self._on_chunk
            if cb is None:
                self._backlog.append(frame)
                self._backlog_bytes += len(frame)
                while self._backlog_bytes > self._backlog_max and self._backlog:
                    old = self._backlog.popleft()
                    self._backlog_bytes -= len(old)
                    self._dropped += len(old)
                return
            pending = self._pending
            pending += frame
            if len(pending) < self._chunk_bytes:
                return
            chunk = bytes(pending)
            pending.clear()
        self._deliver(cb, chunk)

    def _deliver(self, cb: ChunkCallback, frame: bytes) -> None:
        if self.muted:
            frame = bytes([_MULAW_SILENCE]) * len(frame)
            self._muted_bytes += len(frame)
        self._delivered += len(frame)
        try:
            cb(frame)
        except Exception:
            self._callback_errors += 1
            log.exception("twilio input: the session's audio callback raised")

    def close(self) -> None:
        """Stop delivering (the call's frames are dropped from now on). Idempotent."""
        with self._lock:
            self._closed = True
            self._on_chunk = None
            self._backlog.clear()
            self._backlog_bytes = 0
            self._pending.clear()

    def stats(self) -> dict[str, Any]:
        """delivered_ms, muted_ms, dropped_ms (backlog overflow), callback_errors."""
        return {
            "delivered_ms": PCMU.ms(self._delivered),
            "muted_ms": PCMU.ms(self._muted_bytes),
            "dropped_ms": PCMU.ms(self._dropped),
            "callback_errors": self._callback_errors,
        }


@attrs.define(eq=False)
class _Item:
    """Accounting of one assistant item, in mu-law bytes (8 a millisecond)."""

    received: int = 0
    sent: int = 0
    heard: int = 0  # up to the last echoed mark
    ended: bool = False
    cut: bool = False
    overflow: bool = False  # the unsent backlog was full: the rest of the item is not sent


@attrs.frozen
class _Frame:
    item_id: str
    payload: bytes
    end: int  # the item's byte position after this frame


@attrs.define(eq=False)
class _Mark:
    """A mark on the line: the frame before it is the item's bytes ``start..end``."""

    item_id: str
    start: int
    end: int
    # Twilio's playout of the frame as modelled (see TwilioOutput).
    plays_at: float
    ends_at: float
    landed: bool  # on the socket (until then the frame is not counted as playing)


class TwilioOutput(AudioOutput):
    """The assistant's voice to the caller: media frames and marks on the call's socket.

    ``play`` (the session's reader calls it) cuts the audio into frames of at
    most ``frame_ms``, each written as a ``media`` message followed by a
    ``mark``. While the socket has room (``writable``) and no write is under
    way, ``play`` writes them itself, which never waits (the bridge's sockets
    are non-blocking); the rest goes to the call's worker thread, which writes
    one frame at a time as the socket drains. Without ``writable`` every frame
    goes through the worker.

    :meth:`played_ms` is what the caller heard, from a model of Twilio's
    playout: a frame starts playing when it was written or when the frame
    before it ends, whichever is later, and lasts its length (divided by
    ``playout_speed``, 1 for Twilio). The model's instants are taken before
    each write, because a thread can wait long for the GIL after a system
    call; a frame whose write has not returned does not count yet. Twilio
    plays a frame one network delay after we write it and echoes its mark one
    more delay after it played, so what the caller has heard by now is the
    model's position half the smallest lag of the last 512 echoes ago. A cut
    (:meth:`interrupt`) takes the model's own position: the ``clear`` travels
    that delay too, so that is where Twilio stops. An echoed mark counts its
    audio heard in any case. So the position is exact to a few milliseconds with
    frames of any size, however late the echoes are read, and the line carries
    one mark per frame rather than one per 10 ms.

    :meth:`interrupt` never waits for the socket. Under a short lock it drops
    the unsent audio, freezes the played position at the model's position of
    that instant (pending marks no longer count) and reports the cut. The ``clear`` is
    written by the caller of ``interrupt`` itself when no frame is being
    written and the socket has room (so it is on the socket before the
    session's ``response.cancel``); otherwise it goes to the head of the
    worker's queue and is the very next message written, after at most the
    one frame already under way.

    At most ``max_backlog_ms`` of unsent audio is queued: when a slow line
    backs up past that, the rest of the item being queued is dropped (counted
    as ``overflow_ms``), so memory stays bounded and what is played stays a
    gapless prefix of the item (its played position is still exact).
    """

    format: AudioFormat = PCMU

    def __init__(
        self,
        send: Callable[[str], object],
        *,
        frame_ms: int = 100,
        max_backlog_ms: int = 30_000,
        writable: Callable[[], bool] | None = None,
        send_frame: Callable[[str, str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        playout_speed: float = 1.0,
    ) -> None:
        _check_ms("frame_ms", frame_ms)
        if isinstance(max_backlog_ms, bool) or not isinstance(max_backlog_ms, int) or max_backlog_ms < frame_ms:
            raise InvalidArgument(f"max_backlog_ms must be an int >= frame_ms, not {max_backlog_ms!r}")
        # send(text) writes one text message on the call's socket (it may block while the socket is full;
        # it may return when it handed the bytes to the socket, see _write_clear);
        # send_frame(media, mark) writes both in one go if the transport can; writable() says whether a
        # short message would be taken by the socket now (None: assume it would).
        self._send = send
        self._send_frame = send_frame
        self._clock = clock
        _check_speed(playout_speed)
        self._speed = float(playout_speed)
        self._writable = writable
        self._frame_bytes = PCMU.nbytes(frame_ms)
        self._backlog_max = PCMU.nbytes(max_backlog_ms)
        # _lock (with _cond) guards all state and is never held across a socket write.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        # Held across exactly one write (a frame's media and mark, or a clear), never while waiting for work:
        # a frame is taken from the queue and written under it, so no frame taken before a clear can reach
        # Twilio after that clear. Lock order: _send_lock, then _lock.
        self._send_lock = threading.Lock()
        self._queue: collections.deque[_Frame] = collections.deque()
        self._queued = 0  # bytes in _queue
        self._clear_pending = False  # a clear the worker must write before anything else
        self._items: collections.OrderedDict[str, _Item] = collections.OrderedDict()
        self._marks: collections.OrderedDict[str, _Mark] = collections.OrderedDict()  # pending, oldest first
        # The playout model (class doc): when the audio written so far ends playing, and the recent
        # lags of mark echoes behind the model (their minimum is the round trip to Twilio).
        self._play_end = 0.0
        self._echo_lags: collections.deque[float] = collections.deque(maxlen=_ECHO_LAGS)
        self._cleared: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._seq = itertools.count(1)
        self._last_id: str | None = None
        self._closed = False
        self.stream_sid = ""
        # counters
        self._frames_sent = 0
        self._frames_direct = 0
        self._sent = 0
        self._heard = 0
        self._received = 0
        self._marks_sent = 0
        self._marks_echoed = 0
        self._marks_cleared = 0
        self._unknown_marks = 0
        self._clears = 0
        self._clears_deferred = 0
        self._barge_ins = 0
        self._interrupts = 0
        self._ignored = 0
        self._dropped = 0
        self._overflow = 0
        self.last_clear_at: float | None = None
        self._clear_times: collections.deque[float] = collections.deque(maxlen=256)

    @property
    def clear_times(self) -> list[float]:
        """When each ``clear`` was handed to the socket (``time.monotonic()``; the last 256)."""
        with self._lock:
            return list(self._clear_times)

    # -- the session's side -----------------------------------------------------------------

    def start(self) -> None:
        """Nothing to open: the call's worker writes the frames."""
        if self._closed:
            raise AudioUnavailable("TwilioOutput is closed")

    def close(self) -> None:
        """Drop unsent audio and accept no more. Idempotent."""
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._queued = 0
            self._clear_pending = False
            self._cond.notify_all()

    def play(self, item_id: str, pcm: bytes) -> None:
        """Queue mu-law audio of ``item_id`` in frames (never blocks); audio of an item already cut is ignored.

        Audio past ``max_backlog_ms`` of unsent audio drops the rest of the item (see the class doc).
        """
        if not isinstance(item_id, str) or not item_id:
            raise InvalidArgument(f"item_id must be a non-empty str, got {item_id!r}")
        if not isinstance(pcm, (bytes, bytearray, memoryview)):
            raise InvalidArgument(f"audio must be bytes, got {type(pcm).__name__}")
        data = bytes(pcm)
        with self._cond:
            if self._closed:
                return
            item = self._item_locked(item_id)
            if item.cut:
                self._ignored += len(data)
                return
            self._last_id = item_id
            if item.overflow or self._queued + len(data) > self._backlog_max:
                # Counted as received (the model said it) but never sent: the item stays current
                # until it is cut, so a barge-in still truncates it at what was heard.
                item.overflow = True
                item.received += len(data)
                self._received += len(data)
                self._overflow += len(data)
                return
            step = self._frame_bytes
            for i in range(0, len(data), step):
                chunk = data[i : i + step]
                item.received += len(chunk)
                self._queue.append(_Frame(item_id, chunk, item.received))
            self._received += len(data)
            self._queued += len(data)
            if self._writable is None:
                self._cond.notify_all()
                return
        # Written here, on the caller's thread, while the socket has room (it never waits): the worker
        # is woken only for what is left, so a line that keeps up costs no thread switch per delta.
        try:
            while self._write_one(None, direct=True):
                pass
        except Exception as exc:  # the call is ending; the worker sees it on its next write
            log.debug("twilio: direct write failed: %r", exc)
        with self._cond:
            if self._queue or self._clear_pending:
                self._cond.notify_all()

    def end_item(self, item_id: str) -> None:
        """No more audio will come for ``item_id``."""
        with self._cond:
            self._item_locked(item_id).ended = True
            self._cond.notify_all()

    def played_ms(self, item_id: str) -> float:
        """Milliseconds of ``item_id`` the caller heard: the playout model, never behind the echoed marks."""
        with self._lock:
            return PCMU.ms(self._heard_locked(item_id, self._clock()))

    def echoed_ms(self, item_id: str) -> float:
        """Milliseconds of ``item_id`` whose marks Twilio echoed (a lower bound of :meth:`played_ms`)."""
        with self._lock:
            item = self._items.get(item_id)
            return PCMU.ms(item.heard) if item is not None else 0.0

    def received_ms(self, item_id: str) -> float:
        """Milliseconds of ``item_id`` accepted by :meth:`play`."""
        with self._lock:
            item = self._items.get(item_id)
            return PCMU.ms(item.received) if item is not None else 0.0

    def current_item(self) -> str | None:
        """The item playing (oldest unechoed mark), else the next queued one, else the last one unfinished."""
        with self._lock:
            return self._current_locked()

    def is_playing(self) -> bool:
        """True while audio is unsent or its marks are not all echoed."""
        with self._lock:
            return bool(self._queue or self._marks)

    def wait_idle(self, timeout: float) -> bool:
        """Block until every mark sent was echoed and nothing is queued; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not (self._queue or self._marks) or self._closed, timeout)

    def interrupt(self) -> PlaybackCut | None:
        """Drop unsent audio, have ``clear`` written if anything may still play, and return the cut.

        Never waits for the socket (see the class doc): the cut's ``played_ms``
        is the played position of the current item when this was called; the
        ``clear`` is on the socket when this returns unless a frame write was
        under way or the socket was full, in which case it is the next message
        the worker writes.
        """
        # A frame write in progress holds _send_lock for one short send; wait that long at most, so a
        # socket that stopped draining never holds up the caller (the session's reader).
        owned = self._send_lock.acquire(timeout=_CLEAR_WAIT)
        try:
            with self._cond:
                self._interrupts += 1
                current = self._current_locked()
                playing = bool(self._queue or self._marks)
                victims = {f.item_id for f in self._queue} | {m.item_id for m in self._marks.values()}
                if current is not None:
                    victims.add(current)
                # Freeze what was heard at this instant, for every item still on the line (one queued
                # behind another may have played whole): the model's share of the frame playing now
                # counts, the rest of it (and everything after) is dropped by the clear.
                now = self._clock()
                for item_id in victims:
                    item = self._item_locked(item_id)
                    heard = self._heard_locked(item_id, now, delayed=False)
                    if heard > item.heard:
                        self._heard += heard - item.heard
                        item.heard = heard
                for item_id in victims:
                    item = self._item_locked(item_id)
                    if not item.cut:
                        item.cut = True
                        self._dropped += item.received - item.heard
                for name in self._marks:
                    self._cleared[name] = None
                    self._marks_cleared += 1
                while len(self._cleared) > _MAX_CLEARED:
                    self._cleared.popitem(last=False)
                self._marks.clear()
                self._queue.clear()
                self._queued = 0
                self._last_id = None
                self._play_end = 0.0  # the clear empties Twilio's buffer: what comes next plays at once
                cut = None
                if current is not None:
                    item = self._items[current]
                    cut = PlaybackCut(
                        item_id=current,
                        played_ms=PCMU.ms(item.heard),
                        received_ms=PCMU.ms(item.received),
                        dropped_ms=PCMU.ms(item.received - item.heard),
                    )
                inline = False
                if playing:
                    self._barge_ins += 1
                    inline = owned and not self._clear_pending and not self._closed
                    if not inline:
                        self._clear_pending = True  # the worker writes it before any other frame
                        self._clears_deferred += 1
                self._cond.notify_all()
            if inline:
                if self._writable is None or self._writable():
                    self._write_clear()
                else:
                    with self._cond:  # full socket: the worker waits for room, not us
                        self._clear_pending = True
                        self._clears_deferred += 1
                        self._cond.notify_all()
        finally:
            if owned:
                self._send_lock.release()
        return cut

    def _write_clear(self) -> None:
        """Write ``clear`` (under _send_lock) and note when it was on the socket.

        ``send`` may return when it handed the bytes to the socket (a float, as the bridge's links do);
        otherwise the time after it returned is noted.
        """
        try:
            at = self._send(json.dumps({"event": "clear", "streamSid": self.stream_sid}))
        except Exception as exc:  # the call is ending: nothing left to clear
            log.debug("twilio: clear not written: %r", exc)
            return
        now = at if isinstance(at, float) else time.monotonic()
        with self._lock:
            self._clears += 1
            self.last_clear_at = now
            self._clear_times.append(now)

    def stats(self) -> dict[str, Any]:
        """sent/heard/received/dropped/ignored/overflow/buffered ms, marks sent/echoed/pending/cleared,
        clears (and how many the worker wrote because the socket was busy), barge-ins, interrupts."""
        with self._lock:
            return {
                "played_ms": PCMU.ms(self._heard),
                "heard_ms": PCMU.ms(self._heard),
                "sent_ms": PCMU.ms(self._sent),
                "received_ms": PCMU.ms(self._received),
                "dropped_ms": PCMU.ms(self._dropped),
                "ignored_ms": PCMU.ms(self._ignored),
                "overflow_ms": PCMU.ms(self._overflow),
                "buffered_ms": PCMU.ms(self._queued),
                "frames_sent": self._frames_sent,
                "frames_direct": self._frames_direct,
                "marks_sent": self._marks_sent,
                "marks_echoed": self._marks_echoed,
                "marks_pending": len(self._marks),
                "marks_cleared": self._marks_cleared,
                "unknown_marks": self._unknown_marks,
                "clears": self._clears,
                "clears_deferred": self._clears_deferred,
                "barge_ins": self._barge_ins,
                "interrupts": self._interrupts,
                "last_clear_at": self.last_clear_at,
            }

    # -- the call's side ----------------------------------------------------------------------

    def on_mark(self, name: str) -> None:
        """Twilio echoed mark ``name`` (the socket reader calls this): the audio before it was heard.

        Marks come back in the order sent, so every earlier pending mark is
        settled too. A mark handed back by a ``clear`` counts for nothing.
        """
        with self._cond:
            if name in self._cleared:
                del self._cleared[name]
                return
            if name not in self._marks:
                self._unknown_marks += 1
                return
            while self._marks:
                mark, pending = self._marks.popitem(last=False)
                self._marks_echoed += 1
                item = self._items.get(pending.item_id)
                if item is not None and pending.end > item.heard:
                    self._heard += pending.end - item.heard
                    item.heard = pending.end
                if mark == name:
                    break
            self._echo_lags.append(self._clock() - pending.ends_at)
            self._cond.notify_all()

    def write_pending(self, stop: threading.Event) -> bool:
        """Write what is queued, a pending ``clear`` first, then frames one at a time (the worker calls this).

        Blocks until there is something to write; returns False instead once
        ``stop`` is set or the device is closed. Raises what the socket raises.
        """
        with self._cond:
            while not (self._queue or self._clear_pending) and not stop.is_set() and not self._closed:
                self._cond.wait()
            if stop.is_set() or self._closed:
                return False
        while self._write_one(stop, direct=False):
            pass
        return True

    def _write_one(self, stop: threading.Event | None, *, direct: bool) -> bool:
        """Write a pending ``clear``, else the next frame and its mark; False if there was nothing to write.

        ``direct`` (the thread that queued the audio, see :meth:`play`): only if the send lock is free
        and the socket has room, so it never waits.
        """
        if direct:
            if not self._send_lock.acquire(blocking=False):
                return False
        else:
            self._send_lock.acquire()
        try:
            with self._cond:
                ready = bool(self._queue) and not (stop is not None and stop.is_set()) and not self._closed
                room = ready and self._writable is not None and self._writable()
                if self._clear_pending and direct and not (self._writable is not None and self._writable()):
                    return False  # a deferred clear on a full socket is the worker's: this thread never waits
                if self._clear_pending:
                    self._clear_pending = False
                    frame = None
                elif ready and (room or not direct):
                    frame = self._queue.popleft()
                    self._queued -= len(frame.payload)
                    name = f"{frame.item_id}/{next(self._seq)}"
                    # Twilio plays it from the moment it is written (just below, under the send lock,
                    # and timed before the write: a thread may wait long for the GIL after a system
                    # call), or once the audio before it is done. A socket with room takes the frame
                    # at once (the bridge's never block): it counts as written now ("landed"), not
                    # once this thread gets the GIL back after the system call.
                    plays_at = max(self._clock(), self._play_end)
                    self._play_end = plays_at + PCMU.ms(len(frame.payload)) / 1000.0 / self._speed
                    written = _Mark(frame.item_id, frame.end - len(frame.payload), frame.end, plays_at,
                                    self._play_end, landed=room)
                    self._marks[name] = written
                    item = self._items.get(frame.item_id)
                    if item is not None:
                        item.sent = frame.end
                    sid = self.stream_sid
                else:
                    return False
            if frame is None:
                self._write_clear()
                return True
            payload = base64.b64encode(frame.payload).decode("ascii")
            media = json.dumps({"event": "media", "streamSid": sid, "media": {"payload": payload}})
            mark = json.dumps({"event": "mark", "streamSid": sid, "mark": {"name": name}})
            if self._send_frame is not None:
                self._send_frame(media, mark)
            else:
                self._send(media)
                self._send(mark)
        finally:
            self._send_lock.release()
        with self._lock:
            written.landed = True
            self._frames_sent += 1
            self._marks_sent += 1
            self._sent += len(frame.payload)
            self._frames_direct += direct
        return True

    def wake(self) -> None:
        """Wake a worker blocked in :meth:`write_pending` (to see its ``stop``)."""
        with self._cond:
            self._cond.notify_all()

    # -- internals ----------------------------------------------------------------------------

    def _item_locked(self, item_id: str) -> _Item:
        item = self._items.get(item_id)
        if item is None:
            item = self._items[item_id] = _Item()
            while len(self._items) > _MAX_ITEMS:
                self._items.popitem(last=False)
        return item

    def _heard_locked(self, item_id: str, now: float, *, delayed: bool = True) -> int:
        """Bytes of ``item_id`` heard at ``now``: the playout model's position, never behind the echoes.

        ``delayed``: as heard now, one network delay behind the model; else the model's own position,
        which is where a ``clear`` written now stops the playout (it travels that delay too).
        """
        item = self._items.get(item_id)
        if item is None:
            return 0
        heard = item.heard
        if item.cut or not self._marks:
            return heard
        # The model runs on our clock; Twilio plays what we wrote one network delay later: half the
        # smallest recent echo lag (an echo comes back one more delay after its audio played).
        t = now - (max(0.0, min(self._echo_lags)) / 2.0 if delayed and self._echo_lags else 0.0)
        for mark in self._marks.values():  # in playout order, items one after the other
            if not mark.landed or t <= mark.plays_at:
                break
            if t < mark.ends_at:  # this frame is playing
                if mark.item_id == item_id:
                    return max(heard, mark.start + int((t - mark.plays_at) * self._speed * 1000.0 * PCMU.nbytes(1)))
                break
            if mark.item_id == item_id:
                heard = max(heard, mark.end)
        return heard

    def _current_locked(self) -> str | None:
        if self._marks:
            # The item of the frame playing now as the model has it (not merely the oldest unechoed
            # mark's: an item queued behind another plays as soon as that one is done).
            now = self._clock()
            tail: _Mark | None = None
            for mark in self._marks.values():
                tail = mark
                if not mark.landed or now < mark.ends_at:
                    return mark.item_id
            if self._queue:
                return self._queue[0].item_id
            assert tail is not None
            return tail.item_id
        if self._queue:
            return self._queue[0].item_id
        last = self._last_id
        if last is not None:
            item = self._items.get(last)
            if item is not None and not item.cut and not (item.ended and item.heard >= item.received):
                return last
        return None


# ---------------------------------------------------------------------------------------------
# One call


class TwilioCall:
    """One Media Streams connection and its session.

    Made by the bridge; the app meets it in its session factory and in
    :meth:`TwilioBridge.calls`. ``start`` is what Twilio's ``start`` message
    said (None until it came); ``audio`` holds the devices the factory must
    hand to ``Session.connect(audio=call.audio, ...)``; ``session`` is the
    factory's session once made; ``digits`` every DTMF key pressed so far.
    """

    def __init__(self, index: int, link: Link, *, frame_ms: int, backlog_ms: int,
                 max_backlog_ms: int = 30_000, input_chunk_ms: int = 40, close_timeout: float = 2.0,
                 playout_speed: float = 1.0) -> None:
        from .audio.devices import AudioIO

        self.index = index
        self._link = link
        self._close_timeout = close_timeout
        self.start: TwilioStart | None = None
        self.output = TwilioOutput(self._write, frame_ms=frame_ms, max_backlog_ms=max_backlog_ms,
                                   writable=self._writable, send_frame=self._write_frame, playout_speed=playout_speed)
        self.input = TwilioInput(backlog_ms=backlog_ms, chunk_ms=input_chunk_ms)
        self.audio: AudioIO = AudioIO(output=self.output, input=self.input)
        self.session: Session | None = None
        self.digits: list[str] = []
        self.error: BaseException | None = None
        self.state = "connected"  # -> starting -> active -> ended
        self.ended = threading.Event()
        self.protocol: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()  # the worker's cue: the call is over
        self._started = threading.Event()  # start message in
        self._hangup_code: int | None = None
        self._media_frames = 0
        self._media_bytes = 0
        self.worker: threading.Thread | None = None

    # -- public -------------------------------------------------------------------------------

    @property
    def stream_sid(self) -> str | None:
        """Twilio's stream id (None before ``start``)."""
        return self.start.stream_sid if self.start else None

    @property
    def call_sid(self) -> str | None:
        """Twilio's call id (None before ``start``)."""
        return self.start.call_sid if self.start else None

    @property
    def parameters(self) -> Mapping[str, str]:
        """The ``<Parameter>`` values of the TwiML ``<Stream>`` (empty before ``start``)."""
        return self.start.custom_parameters if self.start else {}

    def hangup(self) -> None:
        """End the stream: close the WebSocket (Twilio then runs the TwiML after ``<Connect>``).

        Returns at once; the call's worker closes the socket and the session.
        """
        with self._lock:
            if self._hangup_code is None:
                self._hangup_code = 1000
        self._end()

    def wait_ended(self, timeout: float | None = None) -> bool:
        """Block until the call ended and its session is closed; False on timeout."""
        return self.ended.wait(timeout)

    def stats(self) -> CallStats:
        """A snapshot of the call's counters."""
        out = self.output.stats()
        return CallStats(
            index=self.index,
            state=self.state,
            stream_sid=self.stream_sid,
            call_sid=self.call_sid,
            media_in_frames=self._media_frames,
            media_in_ms=PCMU.ms(self._media_bytes),
            media_out_frames=out["frames_sent"],
            sent_ms=out["sent_ms"],
            heard_ms=out["heard_ms"],
            marks_sent=out["marks_sent"],
            marks_echoed=out["marks_echoed"],
            marks_pending=out["marks_pending"],
            marks_cleared=out["marks_cleared"],
            clears=out["clears"],
            barge_ins=out["barge_ins"],
            interrupts=out["interrupts"],
            dtmf=len(self.digits),
            ignored_ms=out["ignored_ms"],
            last_clear_at=out["last_clear_at"],
            error=None if self.error is None else f"{type(self.error).__name__}: {self.error}",
        )

    def __repr__(self) -> str:
        return f"<TwilioCall #{self.index} {self.state} call={self.call_sid} stream={self.stream_sid}>"

    # -- the bridge's side ----------------------------------------------------------------------

    def _write(self, text: str) -> float | None:
        return self._link.send_text(text)

    def _write_frame(self, media: str, mark: str) -> None:
        # Both messages in one socket write: half the system calls, and nothing comes between them.
        self._link.send_text(media, mark)

    def _writable(self) -> bool:
        # Whether the socket takes a short message now: interrupt() writes a clear itself only then.
        return self._link.writable()

    def _end(self) -> None:
        self._stop.set()
        self._started.set()
        self._link.stop_writers()  # a write waiting for room on a line that stopped reading gives up
        self.output.wake()

    # -- the bridge's I/O loop calls these (LinkHandler) ---------------------------------------------

    def on_text(self, text: str) -> bool:
        """One message from Twilio (the I/O loop's thread): handled without blocking; False ends the call."""
        try:
            keep = self._on_message(text)
        except Exception as exc:  # a bug here must end the call, not hang it
            self.error = exc
            log.exception("twilio call #%d: handling a message failed", self.index)
            keep = False
        if not keep:
            self._end()
        return keep

    def on_closed(self) -> None:
        """The socket closed (Twilio hung up, or we did)."""
        self._end()

    def _on_message(self, raw: str | bytes) -> bool:
        try:
            msg = json.loads(raw)
        except ValueError:
            log.warning("twilio call #%d: a frame that is not JSON was ignored", self.index)
            return True
        if not isinstance(msg, dict):
            return True
        event = msg.get("event")
        if event == "media":
            media = msg.get("media")
            if not isinstance(media, dict) or media.get("track", "inbound") not in ("inbound", "inbound_track"):
                return True
            try:
                frame = base64.b64decode(media.get("payload", ""), validate=True)
            except (binascii.Error, ValueError, TypeError):
                log.warning("twilio call #%d: media payload is not base64; ignored", self.index)
                return True
            self._media_frames += 1
            self._media_bytes += len(frame)
            self.input.feed(frame)
        elif event == "mark":
            mark = msg.get("mark")
            if isinstance(mark, dict) and isinstance(mark.get("name"), str):
                self.output.on_mark(mark["name"])
        elif event == "dtmf":
            self._on_dtmf(msg)
        elif event == "start":
            try:
                start = TwilioStart.from_message(msg)
            except InvalidArgument as exc:
                self.error = exc
                log.warning("twilio call #%d: %s; hanging up", self.index, exc)
                with self._lock:
                    self._hangup_code = 1003
                return False
            self.start = start
            self.output.stream_sid = start.stream_sid
            self.state = "starting"
            self._started.set()
        elif event == "connected":
            self.protocol = {k: v for k, v in msg.items() if k != "event"}
        elif event == "stop":
            return False
        return True

    def _on_dtmf(self, msg: dict[str, Any]) -> None:
        dtmf = msg.get("dtmf")
        digit = dtmf.get("digit") if isinstance(dtmf, dict) else None
        if not isinstance(digit, str) or not digit:
            return
        with self._lock:
            self.digits.append(digit)
            session = self.session
            if session is not None:
                self._publish_dtmf(session, digit)
        # Before the session exists the key waits in digits; the worker publishes it then.

    def _publish_dtmf(self, session: Session, digit: str) -> None:
        # Under self._lock, so keys reach the app in the order pressed; publish()
        # only queues (the session's dispatcher runs the app's callbacks).
        if session.closed:
            return
        with contextlib.suppress(SessionClosed):  # closed meanwhile: nobody is listening
            session.publish(DTMF_EVENT, {"event": digit, "received_at": int(time.time()), "source": "twilio",
                                         "call_sid": self.call_sid, "stream_sid": self.stream_sid})

    def work(self, factory: SessionFactory, on_end: Callable[[TwilioCall], Any] | None) -> None:
        """The worker: make the session, write outbound audio, close everything at the end."""
        try:
            self._started.wait()
            if not self._stop.is_set() and self.start is not None:
                try:
                    session = factory(self)
                except BaseException as exc:  # the app's factory: anything may come out
                    self.error = exc
                    log.warning("twilio call #%d: session factory raised %s; hanging up",
                                self.index, type(exc).__name__)
                    with self._lock:
                        if self._hangup_code is None:
                            self._hangup_code = 1011
                    self._stop.set()
                else:
                    with self._lock:
                        self.session = session
                        for digit in self.digits:  # keys pressed while the session was connecting
                            self._publish_dtmf(session, digit)
                    self.state = "active"
                    while self.output.write_pending(self._stop):
                        pass
                    if not self._stop.is_set():
                        # The session closed (the app closed it, or it died): nobody is left to talk.
                        with self._lock:
                            if self._hangup_code is None:
                                self._hangup_code = 1000
        except Exception as exc:  # the socket broke while writing: the call is over
            if self.error is None:
                self.error = exc
            log.debug("twilio call #%d: writer stopped: %r", self.index, exc)
        finally:
            self._finish(on_end)

    def _finish(self, on_end: Callable[[TwilioCall], Any] | None) -> None:
        self._stop.set()
        with self._lock:
            code = self._hangup_code
        try:
            # Waits for Twilio's close (bounded by close_timeout); a socket already closed returns at once.
            self._link.close(1000 if code is None else code, self._close_timeout)
        except Exception:
            log.debug("twilio call #%d: close failed", self.index, exc_info=True)
        session = self.session
        if session is not None:
            try:
                session.close()
            except Exception:
                log.warning("twilio call #%d: closing the session raised", self.index, exc_info=True)
        else:
            self.audio.close()
        self.state = "ended"
        if on_end is not None:
            try:
                on_end(self)
            except Exception:
                log.exception("twilio call #%d: on_call_end raised", self.index)
        self.ended.set()

    def shut(self, code: int) -> None:
        """Bridge closing: the worker closes the socket with ``code`` and ends the call."""
        with self._lock:
            if self._hangup_code is None:
                self._hangup_code = code
        self._end()

    def threads(self) -> list[threading.Thread]:
        """This call's threads (its worker; its socket is read by the bridge's I/O loop)."""
        return [t for t in (self.worker,) if t is not None]


# ---------------------------------------------------------------------------------------------
# The bridge


def session_factory(url: str | None = None, **connect_kwargs: Any) -> SessionFactory:
    """A factory for :class:`TwilioBridge`: ``Session.connect(url, **connect_kwargs)`` per call.

    Adds what a phone call needs: ``audio=call.audio``, ``audio_format="pcmu"``
    (both ways; no transcoding anywhere), ``context=call`` and the name
    ``twilio-<CallSid>`` unless given. Everything else (``agent``,
    ``turn_detection``, ``api_key``...) goes to :meth:`~rtqueue.Session.connect`
    unchanged.
    """
    if "audio" in connect_kwargs:
        raise InvalidArgument("session_factory passes audio=call.audio itself; leave audio out")

    def make(call: TwilioCall) -> Session:
        from .session import Session

        kwargs = dict(connect_kwargs)
        kwargs.setdefault("audio_format", "pcmu")
        kwargs.setdefault("context", call)
        kwargs.setdefault("name", f"twilio-{call.call_sid}")
        return Session.connect(url, audio=call.audio, **kwargs)

    return make


class TwilioBridge:
    """Serves Twilio Media Streams and joins each call to a session made by ``factory(call)``.

    ``factory`` runs on the call's worker thread once Twilio's ``start``
    arrived; it must return a session connected with ``audio=call.audio`` and
    ``audio/pcmu`` both ways (:func:`session_factory` builds one). The bridge
    listens on ``host:port`` (loopback, a free port by default) at ``path``
    (any path when None); put a TLS-terminating proxy in front for Twilio's
    ``wss://``. At most ``max_calls`` calls at once (more get HTTP 503).
    ``on_call_end(call)`` runs on the call's worker after its session closed.
    ``frame_ms`` bounds outbound media frames, one mark each (marks bound the
    played position, the clock fills in between, see :class:`TwilioOutput`);
    ``input_chunk_ms`` is the caller audio per ``input_audio_buffer.append``
    (Twilio's 20 ms frames joined, see :class:`TwilioInput`). ``io_threads``
    threads accept and read every call's socket, the calls spread over them
    (see :mod:`rtqueue.twilio_io`). ``playout_speed`` is how fast the far end
    plays audio: 1 for Twilio, which plays in real time; a simulated line run
    faster than real time (``FakeTwilio(speed=...)``) says so here. ``backlog_ms`` is the caller audio kept
    while the session connects; ``outbound_backlog_ms`` bounds the assistant
    audio queued for a call and not yet taken by its socket (a line that backs
    up past it loses the rest of that answer, see :class:`TwilioOutput`).
    ``close_timeout`` bounds each closing
    handshake. With ``auth_token`` (the Twilio account's; a ``str`` or
    :class:`~rtqueue.secrets.Secret`, never logged) a handshake whose
    ``X-Twilio-Signature`` does not sign ``public_url`` (the ``wss://`` URL in
    the TwiML; default: :attr:`url` plus the request's path) is refused with
    403. Use as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        factory: SessionFactory,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        path: str | None = "/media",
        max_calls: int | None = None,
        on_call_end: Callable[[TwilioCall], Any] | None = None,
        frame_ms: int = 100,
        input_chunk_ms: int = 40,
        io_threads: int = 4,
        playout_speed: float = 1.0,
        backlog_ms: int = 2000,
        outbound_backlog_ms: int = 30_000,
        ping_interval: float | None = 20.0,
        close_timeout: float = 2.0,
        open_timeout: float = 5.0,
        auth_token: str | Secret | None = None,
        public_url: str | None = None,
    ) -> None:
        if not callable(factory):
            raise InvalidArgument("factory must be a callable taking a TwilioCall and returning a Session")
        if not isinstance(host, str) or not host:
            raise InvalidArgument(f"host must be a non-empty str, not {host!r}")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise InvalidArgument(f"port must be an int within 0..65535, not {port!r}")
        if path is not None and (not isinstance(path, str) or not path.startswith("/")):
            raise InvalidArgument(f"path must start with '/' (or be None), not {path!r}")
        if max_calls is not None and (isinstance(max_calls, bool) or not isinstance(max_calls, int)
                                      or max_calls < 1):
            raise InvalidArgument(f"max_calls must be an int >= 1 or None, not {max_calls!r}")
        _check_ms("frame_ms", frame_ms)
        _check_ms("input_chunk_ms", input_chunk_ms)
        if isinstance(io_threads, bool) or not isinstance(io_threads, int) or not 1 <= io_threads <= 64:
            raise InvalidArgument(f"io_threads must be an int within 1..64, not {io_threads!r}")
        if (isinstance(outbound_backlog_ms, bool) or not isinstance(outbound_backlog_ms, int)
                or outbound_backlog_ms < frame_ms):
            raise InvalidArgument(f"outbound_backlog_ms must be an int >= frame_ms, not {outbound_backlog_ms!r}")
        for key, val in (("close_timeout", close_timeout), ("open_timeout", open_timeout)):
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not val > 0:
                raise InvalidArgument(f"{key} must be > 0, not {val!r}")
        self._factory = factory
        self._host = host
        self._requested_port = port
        self._path = path
        self._max_calls = max_calls
        self._on_end = on_call_end
        self._frame_ms = frame_ms
        self._input_chunk_ms = input_chunk_ms
        self._io_threads = io_threads
        _check_speed(playout_speed)
        self._playout_speed = float(playout_speed)
        self._backlog_ms = backlog_ms
        self._outbound_backlog_ms = outbound_backlog_ms
        self._ping_interval = ping_interval
        self._close_timeout = float(close_timeout)
        self._open_timeout = float(open_timeout)
        self._validator: Any = None
        if auth_token is not None:
            token = auth_token if isinstance(auth_token, Secret) else Secret(auth_token)
            from twilio.request_validator import RequestValidator  # type: ignore[import-untyped]

            self._validator = RequestValidator(token.reveal())
        if public_url is not None and urllib.parse.urlsplit(public_url).scheme not in ("wss", "ws"):
            raise InvalidArgument(f"public_url must be the wss:// URL given to Twilio, not {public_url!r}")
        self._public_url = public_url
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._loop: MediaLoop | None = None
        self._port = 0
        self._closing = False
        self._index = itertools.count(1)
        self._calls: dict[int, TwilioCall] = {}
        self._ended: list[TwilioCall] = []  # ended, threads not yet joined
        self._total = 0
        self._failed = 0
        self._rejected = 0
        self._barge_ins_done = 0

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> TwilioBridge:
        """Bind and start accepting; returns self. Raises ``OSError`` if the address is taken."""
        from .twilio_io import MediaLoop

        with self._lock:
            if self._loop is not None or self._closing:
                raise RtqueueError("TwilioBridge.start() may be called once, before close()")
            loop = MediaLoop(self._host, self._requested_port, acceptor=self._accept, opener=self._open,
                             max_size=2**20, open_timeout=self._open_timeout, close_timeout=self._close_timeout,
                             ping_interval=self._ping_interval, threads=self._io_threads)
            self._loop = loop
            self._port = loop.port
        loop.start()
        return self

    def __enter__(self) -> TwilioBridge:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def port(self) -> int:
        """The port listened on (after :meth:`start`)."""
        return self._port

    @property
    def url(self) -> str:
        """``ws://host:port/path``: where (a proxy in front of) Twilio connects."""
        return f"ws://{self._host}:{self._port}{self._path or '/'}"

    def close(self, timeout: float = 10.0) -> None:
        """Stop accepting, end every call (socket closed, session closed) and every thread. Idempotent.

        Safe from any thread, a call's own worker or an event callback
        included (a thread never joins itself).
        """
        with self._lock:
            self._closing = True
            loop = self._loop
            calls = list(self._calls.values())
        if loop is None:
            return
        loop.stop_accepting()
        for link in loop.links():
            if link.handler is None:  # still in the opening handshake: drop it now
                link.abort()
        for call in calls:
            call.shut(1001)  # its worker stops writing (a write waiting for room fails) and closes the link
        deadline = time.monotonic() + timeout
        self._join_workers(deadline)
        loop.stop(max(0.1, deadline - time.monotonic()))
        self._join_workers(deadline)  # a call opened meanwhile, or a worker the dropped links woke

    def _join_workers(self, deadline: float) -> None:
        me = threading.current_thread()
        threads: list[threading.Thread] = []
        with self._lock:
            calls = list(self._calls.values()) + self._ended
        for call in calls:
            # Called from one of this call's own session threads (an event callback): its worker is
            # closing that session and waits for this very thread, so it is not waited for here.
            own = getattr(call.session, "threads", None)
            if callable(own) and me in own():
                continue
            threads += call.threads()
        for t in threads:
            if t is not me and t.is_alive():
                t.join(max(0.0, deadline - time.monotonic()))

    # -- state --------------------------------------------------------------------------------------

    def calls(self) -> list[TwilioCall]:
        """The live calls (connected and not ended), oldest first."""
        with self._lock:
            return [c for c in self._calls.values() if not c.ended.is_set()]

    def wait_calls(self, predicate: Callable[[list[TwilioCall]], bool], timeout: float) -> bool:
        """Block until ``predicate(all calls seen, oldest first)`` is true; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                calls = list(self._calls.values()) + self._ended
                calls.sort(key=lambda c: c.index)
                if predicate(calls):
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(min(left, 0.05))

    def stats(self) -> BridgeStats:
        """Calls now, in total, failed (factory raised), refused (403/404/503), barge-ins, per-call stats."""
        with self._lock:
            live = list(self._calls.values())
            total, failed, rejected, done = self._total, self._failed, self._rejected, self._barge_ins_done
        per = tuple(c.stats() for c in live)
        return BridgeStats(
            active_calls=sum(1 for c in live if not c.ended.is_set()),
            total_calls=total,
            failed_calls=failed,
            rejected=rejected,
            barge_ins=done + sum(s.barge_ins for s in per),
            calls=per,
            io=self._loop.stats() if self._loop is not None else {},
        )

    # -- the I/O loop's callbacks (its thread; never block) ------------------------------------------

    def _accept(self, link: Link, request: Request) -> tuple[int, str] | None:
        path = urllib.parse.urlsplit(request.path).path
        with self._lock:
            live = sum(1 for c in self._calls.values() if not c.ended.is_set())
            if self._closing:
                refusal: tuple[http.HTTPStatus, str] | None = (http.HTTPStatus.SERVICE_UNAVAILABLE, "closing\n")
            elif self._path is not None and path != self._path:
                refusal = (http.HTTPStatus.NOT_FOUND, "no media stream here\n")
            elif self._validator is not None and not self._signed(request):
                refusal = (http.HTTPStatus.FORBIDDEN, "bad signature\n")
            elif self._max_calls is not None and live >= self._max_calls:
                refusal = (http.HTTPStatus.SERVICE_UNAVAILABLE, "too many calls\n")
            else:
                refusal = None
            if refusal is not None:
                self._rejected += 1
        return None if refusal is None else (int(refusal[0]), refusal[1])

    def _signed(self, request: Request) -> bool:
        # Twilio signs the handshake with the account's auth token over the URL it
        # was given (no body): X-Twilio-Signature, as for its webhooks.
        url = self._public_url or f"ws://{self._host}:{self._port}{request.path}"
        signature = request.headers.get("X-Twilio-Signature", "")
        return bool(self._validator.validate(url, {}, signature))

    def _open(self, link: Link) -> TwilioCall:
        with self._lock:
            index = next(self._index)
            call = TwilioCall(index, link, frame_ms=self._frame_ms, backlog_ms=self._backlog_ms,
                              max_backlog_ms=self._outbound_backlog_ms, input_chunk_ms=self._input_chunk_ms,
                              close_timeout=self._close_timeout, playout_speed=self._playout_speed)
            worker = threading.Thread(target=self._work, args=(call,), name=f"rtqueue-twilio-worker-{index}",
                                      daemon=True)
            call.worker = worker
            self._calls[index] = call
            self._total += 1
            closing = self._closing
            self._changed.notify_all()
        try:
            worker.start()
        except BaseException:  # out of threads, say: the call never runs, so it must not hold a slot
            with self._lock:
                self._calls.pop(index, None)
                self._failed += 1
                self._changed.notify_all()
            raise
        if closing:
            call.shut(1001)
        return call

    def _work(self, call: TwilioCall) -> None:
        try:
            call.work(self._factory, self._on_end)
        finally:
            with self._lock:
                if call.error is not None and call.session is None:
                    self._failed += 1
                self._calls.pop(call.index, None)
                self._ended.append(call)
                self._barge_ins_done += call.output.stats()["barge_ins"]
                # Keep the last few for wait_calls()/close(); their threads end right after.
                while len(self._ended) > 1024:
                    self._ended.pop(0)
                self._changed.notify_all()


# ---------------------------------------------------------------------------------------------
# TwiML and the voice webhook


def stream_twiml(
    url: str,
    *,
    parameters: Mapping[str, str] | None = None,
    name: str | None = None,
    status_callback: str | None = None,
) -> str:
    """The TwiML that answers a call by streaming it to ``url``: ``<Connect><Stream>`` (bidirectional).

    ``parameters`` become ``<Parameter name= value=>`` children (they come
    back in ``start.customParameters``; do not put secrets there, Twilio logs
    them). Twilio requires a ``wss://`` URL without a query string;
    ``ws://`` is accepted for loopback tests. Needs the ``twilio`` package (extra ``rtqueue[phone]``).
    """
    if not isinstance(url, str) or urllib.parse.urlsplit(url).scheme not in ("wss", "ws"):
        raise InvalidArgument(f"url must be a wss:// (or ws://) URL, not {url!r}")
    if urllib.parse.urlsplit(url).query:
        # Twilio's <Stream> refuses query strings (error 31920): values travel as <Parameter>s.
        raise InvalidArgument(f"a <Stream> url takes no query string; pass parameters= instead: {url!r}")
    try:
        from twilio.twiml.voice_response import Connect, VoiceResponse  # type: ignore[import-untyped]
    except ImportError as exc:
        raise RtqueueError("stream_twiml needs the twilio package: pip install 'rtqueue[phone]'") from exc
    attrs_: dict[str, str] = {}
    if name is not None:
        attrs_["name"] = name
    if status_callback is not None:
        attrs_["status_callback"] = status_callback
    response = VoiceResponse()
    connect = Connect()
    stream = connect.stream(url=url, **attrs_)
    for key, value in (parameters or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidArgument(f"stream parameters are str -> str, not {key!r}: {value!r}")
        stream.parameter(name=key, value=value)
    response.append(connect)
    return str(response)


class VoiceWebhook:
    """A minimal loopback HTTP server for Twilio's voice webhook: every POST (or GET) to ``path``
    is answered with :func:`stream_twiml` of ``stream_url``.

    ``parameters(form)`` (optional) turns the webhook's form fields
    (``CallSid``, ``From``, ``To``...) into ``<Parameter>`` values. With
    ``auth_token`` the ``X-Twilio-Signature`` header is checked (twilio's
    ``RequestValidator``, against ``public_url`` when a proxy rewrote the URL)
    and a bad one gets 403; the token is never logged. One thread
    ("rtqueue-twilio-webhook") serves requests one at a time.
    """

    def __init__(
        self,
        stream_url: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        path: str = "/voice",
        parameters: Callable[[Mapping[str, str]], Mapping[str, str]] | None = None,
        auth_token: str | None = None,
        public_url: str | None = None,
    ) -> None:
        stream_twiml(stream_url)  # checks the URL and that twilio is installed, now rather than per call
        self.stream_url = stream_url
        self._host, self._port, self._path = host, port, path
        self._parameters = parameters
        self._validator: Any = None
        if auth_token is not None:
            from twilio.request_validator import RequestValidator

            self._validator = RequestValidator(auth_token)
        self._public_url = public_url
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.requests = 0
        self.refused = 0

    def start(self) -> VoiceWebhook:
        """Bind and serve; returns self."""
        import http.server

        hook = self

        class _Handler(ReplyHandler):
            log_name = log.name
            log_prefix = "voice webhook: "  # no headers, so no signature, are logged

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode("utf-8", "replace") if length else ""
                self._answer(dict(urllib.parse.parse_qsl(body)))

            def do_GET(self) -> None:
                self._answer(dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query)))

            def _answer(self, form: dict[str, str]) -> None:
                status, body, ctype = hook.answer(self.command, self.path, form,
                                                  self.headers.get("X-Twilio-Signature", ""))
                self.reply(status, body.encode("utf-8"), ctype)

        self._server = http.server.HTTPServer((self._host, self._port), _Handler)
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="rtqueue-twilio-webhook",
                                        daemon=True)
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        """``http://host:port/path``, the voice webhook to configure (behind a public proxy)."""
        return f"http://{self._host}:{self._port}{self._path}"

    def answer(self, method: str, target: str, form: Mapping[str, str], signature: str) -> tuple[int, str, str]:
        """``(status, body, content type)`` for one webhook request (the server calls this)."""
        self.requests += 1
        if urllib.parse.urlsplit(target).path != self._path:
            self.refused += 1
            return 404, "not found\n", "text/plain"
        if self._validator is not None:
            url = self._public_url or f"http://{self._host}:{self._port}{target}"
            params = dict(form) if method == "POST" else {}
            if not self._validator.validate(url, params, signature):
                self.refused += 1
                return 403, "bad signature\n", "text/plain"
        params_out = dict(self._parameters(form)) if self._parameters is not None else {}
        return 200, stream_twiml(self.stream_url, parameters=params_out), "application/xml"

    def close(self) -> None:
        """Stop serving and end the thread. Idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(_JOIN_TIMEOUT)

    def __enter__(self) -> VoiceWebhook:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
