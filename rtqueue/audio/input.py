"""Audio input: deliver 24 kHz PCM16 mono chunks to the session.

``start(on_chunk)`` makes the input call ``on_chunk(pcm)`` from its own thread,
"rtqueue-audio-in", with ``chunk_ms`` of audio each time (the last chunk of a
finite source may be shorter). ``on_chunk`` must be quick (the session only
appends to its audio lane); an exception it raises is logged and counted in
``stats()["callback_errors"]``, and delivery goes on.

Muting keeps the timing: while muted, chunks are delivered as digital silence,
so server VAD sees the end of any speech that was under way.
"""

from __future__ import annotations

import abc
import collections
import logging
import threading
import time
from collections.abc import Callable
from os import PathLike
from typing import Any

import attrs
import numpy as np

from ..errors import AudioUnavailable, InvalidArgument
from ..formats import PCM16, AudioFormat
from ._backend import load_sounddevice
from .pcm import BYTES_PER_MS, SAMPLE_RATE, StreamResampler, float_to_pcm16, read_wav_24k_mono

__all__ = ["AudioInput", "Microphone", "NullMicrophone", "PcmMicrophone", "WavMicrophone"]

log = logging.getLogger("rtqueue.audio")

_JOIN_TIMEOUT = 5.0

#: Called with each chunk; its return value is ignored.
ChunkCallback = Callable[[bytes], object]


class AudioInput(abc.ABC):
    """A source of mono audio for the session, in :attr:`format` (24 kHz PCM16 by default).

    Subclasses have a ``muted`` attribute (bool, settable from any thread) and a
    ``chunk_ms`` attribute. The session transcodes ``format`` to its input
    format (no copy when they are equal, e.g. G.711 from a phone line).
    """

    # The slot backs mute()/unmute(); attrs subclasses reuse it for their field.
    __slots__ = ("muted",)

    muted: bool
    chunk_ms: int
    format: AudioFormat = PCM16

    @abc.abstractmethod
    def start(self, on_chunk: ChunkCallback) -> None:
        """Begin delivering chunks to ``on_chunk`` from the "rtqueue-audio-in" thread."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop capturing and end every thread this object started. Idempotent."""

    @abc.abstractmethod
    def stats(self) -> dict[str, Any]:
        """Counters (a fresh dict): delivered_ms, dropped_ms, muted_ms, callback_errors, ..."""

    def mute(self) -> None:
        """Deliver silence instead of the captured audio until :meth:`unmute`."""
        self.muted = True

    def unmute(self) -> None:
        """Deliver the captured audio again."""
        self.muted = False


def _chunk_ms_ok(_inst: object, attr: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 10 <= value <= 1000:
        raise InvalidArgument(f"{attr.name} must be an int within 10..1000 ms, got {value!r}")


def _check_callback(on_chunk: object) -> None:
    if not callable(on_chunk):
        raise InvalidArgument(f"on_chunk must be callable, got {on_chunk!r}")


@attrs.define(eq=False)
class _Delivery:
    """Counters and the guarded call of ``on_chunk``; shared by every input."""

    delivered_ms: float = 0.0
    muted_ms: float = 0.0
    callback_errors: int = 0

    def deliver(self, on_chunk: ChunkCallback, pcm: bytes, muted: bool) -> None:
        ms = len(pcm) / BYTES_PER_MS
        if muted:
            pcm = bytes(len(pcm))
            self.muted_ms += ms
        self.delivered_ms += ms
        try:
            on_chunk(pcm)
        except Exception:
            self.callback_errors += 1
            log.exception("audio input on_chunk callback raised")


@attrs.define(eq=False)
class NullMicrophone(AudioInput):
    """An input that never delivers anything (text-only or playback-only sessions)."""

    chunk_ms: int = attrs.field(default=40, kw_only=True, validator=_chunk_ms_ok)
    muted: bool = attrs.field(default=False, kw_only=True)

    def start(self, on_chunk: ChunkCallback) -> None:
        """Accept the callback and never call it."""
        _check_callback(on_chunk)

    def close(self) -> None:
        """Nothing to stop."""

    def stats(self) -> dict[str, Any]:
        """All zero."""
        return {"delivered_ms": 0.0, "muted_ms": 0.0, "dropped_ms": 0.0, "callback_errors": 0}


@attrs.define(eq=False)
class PcmMicrophone(AudioInput):
    """Delivers given 24 kHz PCM16 mono audio as if it were spoken into a microphone.

    Chunks of ``chunk_ms`` are delivered at real-time pace (``speed`` times
    faster; as fast as possible with ``realtime=False``), followed by
    ``trailing_silence_ms`` of silence so server VAD sees the speech end. With
    ``loop=True`` audio + silence repeat until ``close()``; otherwise
    ``finished`` is set after the last chunk. Pacing is against
    ``time.monotonic`` with absolute deadlines, so it does not drift.
    """

    data: bytes = attrs.field(converter=bytes)
    chunk_ms: int = attrs.field(default=40, kw_only=True, validator=_chunk_ms_ok)
    realtime: bool = attrs.field(default=True, kw_only=True)
    loop: bool = attrs.field(default=False, kw_only=True)
    trailing_silence_ms: int = attrs.field(default=1000, kw_only=True)
    speed: float = attrs.field(default=1.0, kw_only=True)
    muted: bool = attrs.field(default=False, kw_only=True)

    #: Set once everything (audio and trailing silence) was delivered, or on close.
    finished: threading.Event = attrs.field(init=False, repr=False, factory=threading.Event)
    _stop: threading.Event = attrs.field(init=False, repr=False, factory=threading.Event)
    _thread: threading.Thread | None = attrs.field(init=False, repr=False, default=None)
    _delivery: _Delivery = attrs.field(init=False, repr=False, factory=_Delivery)

    @data.validator
    def _check_data(self, _attr: attrs.Attribute[bytes], value: bytes) -> None:
        if len(value) % 2:
            raise InvalidArgument(f"PCM16 needs an even number of bytes, got {len(value)}")

    @trailing_silence_ms.validator
    def _check_silence(self, _attr: attrs.Attribute[int], value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidArgument(f"trailing_silence_ms must be an int >= 0, got {value!r}")

    @speed.validator
    def _check_speed(self, _attr: attrs.Attribute[float], value: float) -> None:
        if not value > 0:
            raise InvalidArgument(f"speed must be > 0, got {value!r}")

    def start(self, on_chunk: ChunkCallback) -> None:
        """Start the delivery thread ("rtqueue-audio-in"); a second call is an error."""
        _check_callback(on_chunk)
        if self._stop.is_set():
            raise AudioUnavailable(f"{type(self).__name__} is closed")
        if self._thread is not None:
            raise InvalidArgument(f"{type(self).__name__} already started")
        self._thread = threading.Thread(target=self._run, args=(on_chunk,), name="rtqueue-audio-in", daemon=True)
        self._thread.start()

    def _run(self, on_chunk: ChunkCallback) -> None:
        stream = self.data + bytes(self.trailing_silence_ms * BYTES_PER_MS)
        size = self.chunk_ms * BYTES_PER_MS
        period = self.chunk_ms / 1000.0 / self.speed
        t0 = time.monotonic()
        k = 0  # chunks delivered since t0
        try:
            while not self._stop.is_set():
                for start in range(0, len(stream), size):
                    if self.realtime:
                        # Chunk k is "captured" once its audio has elapsed.
                        delay = t0 + (k + 1) * period - time.monotonic()
                        if delay > 0 and self._stop.wait(delay):
                            return
                    if self._stop.is_set():
                        return
                    self._delivery.deliver(on_chunk, stream[start : start + size], self.muted)
                    k += 1
                if not self.loop or not stream:
                    return
        finally:
            self.finished.set()

    def close(self) -> None:
        """Stop delivering and end the thread (sets ``finished``). Idempotent."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(_JOIN_TIMEOUT)
        self.finished.set()

    def stats(self) -> dict[str, Any]:
        """delivered_ms, muted_ms, dropped_ms (always 0), callback_errors."""
        d = self._delivery
        return {
            "delivered_ms": d.delivered_ms,
            "muted_ms": d.muted_ms,
            "dropped_ms": 0.0,
            "callback_errors": d.callback_errors,
        }


@attrs.define(eq=False, init=False)
class WavMicrophone(PcmMicrophone):
    """A :class:`PcmMicrophone` speaking a WAV file (any rate/channels, converted to 24 kHz mono).

    The file is read in the constructor, so a bad path or format fails there
    (``OSError`` or :class:`InvalidArgument`), not in the audio thread.
    """

    path: str = attrs.field(default="", kw_only=True)

    def __init__(
        self,
        path: str | PathLike[str],
        *,
        chunk_ms: int = 40,
        realtime: bool = True,
        loop: bool = False,
        trailing_silence_ms: int = 1000,
        speed: float = 1.0,
        muted: bool = False,
    ) -> None:
        self.__attrs_init__(
            read_wav_24k_mono(path),
            path=str(path),
            chunk_ms=chunk_ms,
            realtime=realtime,
            loop=loop,
            trailing_silence_ms=trailing_silence_ms,
            speed=speed,
            muted=muted,
        )


@attrs.define(eq=False)
class Microphone(AudioInput):
    """Captures from a sounddevice ``InputStream`` (``device=None``: the default input).

    The PortAudio callback only copies the first channel into a bounded queue
    (``max_queue_ms``; when full the OLDEST audio is dropped and counted in
    ``dropped_ms``). The "rtqueue-audio-in" thread resamples to 24 kHz, converts
    to PCM16 and delivers ``chunk_ms`` chunks.
    """

    device: int | str | None = None
    chunk_ms: int = attrs.field(default=40, kw_only=True, validator=_chunk_ms_ok)
    samplerate: int | None = attrs.field(default=None, kw_only=True)
    latency: float | str = attrs.field(default=0.05, kw_only=True)
    max_queue_ms: float = attrs.field(default=2000.0, kw_only=True)
    muted: bool = attrs.field(default=False, kw_only=True)

    _lock: threading.Lock = attrs.field(init=False, repr=False, factory=threading.Lock)
    _cond: threading.Condition = attrs.field(init=False, repr=False)
    _queue: collections.deque[np.ndarray] = attrs.field(init=False, repr=False, factory=collections.deque)
    _queued: int = attrs.field(init=False, repr=False, default=0)
    _closed: bool = attrs.field(init=False, repr=False, default=False)
    _stream: Any = attrs.field(init=False, repr=False, default=None)
    _thread: threading.Thread | None = attrs.field(init=False, repr=False, default=None)
    _rate: int = attrs.field(init=False, repr=False, default=SAMPLE_RATE)
    _dropped_frames: int = attrs.field(init=False, repr=False, default=0)
    _overflows: int = attrs.field(init=False, repr=False, default=0)
    _captured_frames: int = attrs.field(init=False, repr=False, default=0)
    _delivery: _Delivery = attrs.field(init=False, repr=False, factory=_Delivery)

    def __attrs_post_init__(self) -> None:
        self._cond = threading.Condition(self._lock)

    @property
    def device_rate(self) -> int:
        """Sample rate of the open stream (24000 before ``start``)."""
        return self._rate

    def start(self, on_chunk: ChunkCallback) -> None:
        """Open the input stream and start delivering; raises :class:`AudioUnavailable`."""
        _check_callback(on_chunk)
        if self._closed:
            raise AudioUnavailable("Microphone is closed")
        if self._stream is not None:
            raise InvalidArgument("Microphone already started")
        sd = load_sounddevice()
        try:
            info = sd.query_devices(self.device, "input")
            rate = int(self.samplerate or info["default_samplerate"])
            stream = sd.InputStream(
                device=self.device,
                samplerate=rate,
                channels=1,
                dtype="float32",
                latency=self.latency,
                callback=self._callback,
            )
        except (sd.PortAudioError, ValueError) as exc:
            raise AudioUnavailable(f"cannot open input device {self.device!r}: {exc}") from exc
        self._rate = rate
        self._stream = stream
        self._thread = threading.Thread(target=self._run, args=(on_chunk, rate), name="rtqueue-audio-in", daemon=True)
        self._thread.start()
        try:
            stream.start()
        except sd.PortAudioError as exc:
            self.close()
            raise AudioUnavailable(f"cannot start input device {self.device!r}: {exc}") from exc

    def _callback(self, indata: np.ndarray, frames: int, _time: Any, status: Any) -> None:
        if status.input_overflow:
            self._overflows += 1
        block = indata[:, 0].copy()  # PortAudio reuses its buffer after we return
        cap = int(self.max_queue_ms * self._rate / 1000)
        with self._lock:
            self._queue.append(block)
            self._queued += block.size
            self._captured_frames += block.size
            while self._queued > cap and len(self._queue) > 1:
                old = self._queue.popleft()
                self._queued -= old.size
                self._dropped_frames += old.size
            self._cond.notify()

    def _run(self, on_chunk: ChunkCallback, rate: int) -> None:
        resampler = StreamResampler(rate, SAMPLE_RATE)
        size = self.chunk_ms * BYTES_PER_MS
        pending = bytearray()
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                blocks = list(self._queue)
                self._queue.clear()
                self._queued = 0
            pending += float_to_pcm16(resampler.process(np.concatenate(blocks)))
            while len(pending) >= size:
                chunk = bytes(pending[:size])
                del pending[:size]
                self._delivery.deliver(on_chunk, chunk, self.muted)

    def close(self) -> None:
        """Stop the stream and end the delivery thread. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
            stream, self._stream = self._stream, None
        if stream is not None:
            try:
                stream.abort()
                stream.close()
            except Exception:  # pragma: no cover - device vanished
                log.debug("error closing input stream", exc_info=True)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(_JOIN_TIMEOUT)

    def stats(self) -> dict[str, Any]:
        """captured_ms, delivered_ms, muted_ms, dropped_ms, overflows, callback_errors, device_rate."""
        with self._lock:
            d = self._delivery
            return {
                "captured_ms": self._captured_frames * 1000.0 / self._rate,
                "delivered_ms": d.delivered_ms,
                "muted_ms": d.muted_ms,
                "dropped_ms": self._dropped_frames * 1000.0 / self._rate,
                "overflows": self._overflows,
                "callback_errors": d.callback_errors,
                "device_rate": self._rate,
            }
