"""Audio output: play assistant audio and know how much of each item was played.

Every output shares one model (:class:`_BufferedOutput`):

* ``play(item_id, pcm)`` (from the socket reader thread) only appends 24 kHz
  PCM16 to a bounded FIFO and returns.
* A consumer moves audio out of the FIFO in play order and credits each item
  with the samples it played. For :class:`Speaker` that is the PortAudio
  callback (fed by the "rtqueue-audio-out" thread, which resamples to the
  device rate); for :class:`NullSpeaker` / :class:`WavSpeaker` it is a clock
  thread pacing consumption against ``time.monotonic``.
* ``interrupt()`` drops everything still buffered and freezes the playing
  item's position, which is what ``conversation.item.truncate`` must send.

Buffer policy: at most ``max_buffer_ms`` (default 10 minutes) of not-yet-played
audio is kept; past it the OLDEST buffered audio is dropped and counted in
``stats()["overflow_dropped_ms"]``. Dropped audio still advances its item's
position (``played_ms``), because truncation is positional: the server must cut
the item after the part we skipped, not before it.
"""

from __future__ import annotations

import abc
import collections
import logging
import threading
import time
import wave
from os import PathLike
from typing import Any

import attrs
import numpy as np

from ..errors import AudioUnavailable, InvalidArgument
from ..formats import PCM16, AudioFormat
from ._backend import load_sounddevice
from .pcm import SAMPLE_RATE, SAMPLES_PER_MS, StreamResampler

__all__ = ["AudioOutput", "NullSpeaker", "PlaybackCut", "Speaker", "WavSpeaker"]

log = logging.getLogger("rtqueue.audio")

_JOIN_TIMEOUT = 5.0
_MAX_ITEMS = 256  # per-item accounting kept for this many recent items
_WAIT_SLICE = 0.05  # wait_idle re-checks time-based conditions at least this often
_WARMUP_TIMEOUT = 2.0  # longest Speaker.start() waits for the stream's start-up silence


# Checked once in __init__; after that the hot path (a play() per audio delta) assigns counters
# and would otherwise run every validator and converter again on each assignment.
_NO_HOOKS = attrs.setters.NO_OP


@attrs.frozen
class PlaybackCut:
    """Where playback of one item stopped at an ``interrupt()``.

    ``played_ms``: position reached in the item's audio (what to truncate at);
    ``received_ms``: audio received for the item so far; ``dropped_ms``: the
    buffered rest that will never play (``received_ms - played_ms``).
    """

    item_id: str
    played_ms: float
    received_ms: float
    dropped_ms: float


class AudioOutput(abc.ABC):
    """Where the session sends assistant audio (in :attr:`format`, 24 kHz PCM16 mono by default).

    Contract: ``play`` is non-blocking and thread-safe; ``played_ms`` counts
    what the listener has really heard; ``interrupt`` stops at once and reports
    the cut. All methods but ``start``/``close`` may be called from any thread.
    ``format`` is the :class:`~rtqueue.formats.AudioFormat` ``play`` takes: the
    session transcodes its output format to it (bytes pass through untouched
    when they are equal, e.g. G.711 to a phone line).
    """

    __slots__ = ()

    format: AudioFormat = PCM16

    @abc.abstractmethod
    def start(self) -> None:
        """Open the device / start the threads. Audio played before start is kept."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop playback and end every thread this object started. Idempotent."""

    @abc.abstractmethod
    def play(self, item_id: str, pcm: bytes) -> None:
        """Queue ``pcm`` (24 kHz PCM16 mono) for item ``item_id``; never blocks."""

    @abc.abstractmethod
    def end_item(self, item_id: str) -> None:
        """Declare that no more audio will come for ``item_id`` (e.g. on its ``.done``)."""

    @abc.abstractmethod
    def played_ms(self, item_id: str) -> float:
        """Milliseconds of ``item_id`` really played so far (0.0 for an unknown item)."""

    @abc.abstractmethod
    def received_ms(self, item_id: str) -> float:
        """Milliseconds of ``item_id`` accepted by ``play`` (0.0 for an unknown item)."""

    @abc.abstractmethod
    def interrupt(self) -> PlaybackCut | None:
        """Stop playback now, drop all buffered audio; the cut of the current item, if any."""

    @abc.abstractmethod
    def current_item(self) -> str | None:
        """The item playing now, else the next queued one, else the last one not finished."""

    @abc.abstractmethod
    def is_playing(self) -> bool:
        """True while any accepted audio has not been played yet."""

    @abc.abstractmethod
    def wait_idle(self, timeout: float) -> bool:
        """Block until all queued audio has played; False if ``timeout`` seconds passed first."""

    @abc.abstractmethod
    def stats(self) -> dict[str, Any]:
        """Counters: played/received/dropped ms, underruns, and so on (a fresh dict)."""

    def level(self) -> float:
        """RMS (0..1) of the audio played most recently; 0.0 when unknown."""
        return 0.0


@attrs.define(eq=False, on_setattr=_NO_HOOKS)
class _ItemState:
    """Accounting of one item, in 24 kHz samples."""

    received: int = 0
    played: float = 0.0
    ended: bool = False
    cut: bool = False


@attrs.define(eq=False, on_setattr=_NO_HOOKS)
class _Chunk:
    """A run of 24 kHz samples of one item waiting in the FIFO."""

    item_id: str
    state: _ItemState
    data: np.ndarray  # int16
    pos: int = 0

    @property
    def left(self) -> int:
        return self.data.size - self.pos


def _check_play_args(item_id: object, pcm: object) -> bytes:
    if not isinstance(item_id, str) or not item_id:
        raise InvalidArgument(f"item_id must be a non-empty str, got {item_id!r}")
    if not isinstance(pcm, (bytes, bytearray, memoryview)):
        raise InvalidArgument(f"pcm must be bytes, got {type(pcm).__name__}")
    raw = bytes(pcm)
    if len(raw) % 2:
        raise InvalidArgument(f"PCM16 needs an even number of bytes, got {len(raw)}")
    return raw


def _positive(_inst: object, attr: attrs.Attribute[float], value: float) -> None:
    if not value > 0:
        raise InvalidArgument(f"{attr.name} must be > 0, got {value!r}")


@attrs.define(eq=False, on_setattr=_NO_HOOKS)
class _BufferedOutput(AudioOutput):
    """FIFO + per-item accounting shared by every output; subclasses consume it.

    One lock guards all state; the consumer (callback or clock thread) holds it
    only to move references and update counters, never for I/O or resampling.
    """

    max_buffer_ms: float = attrs.field(default=600_000.0, kw_only=True, validator=_positive)

    _lock: threading.Lock = attrs.field(init=False, repr=False, factory=threading.Lock)
    _cond: threading.Condition = attrs.field(init=False, repr=False)
    _pending: collections.deque[_Chunk] = attrs.field(init=False, repr=False, factory=collections.deque)
    _pending_samples: int = attrs.field(init=False, repr=False, default=0)
    _items: collections.OrderedDict[str, _ItemState] = attrs.field(init=False, factory=collections.OrderedDict)
    _last_id: str | None = attrs.field(init=False, repr=False, default=None)
    _last: _ItemState | None = attrs.field(init=False, repr=False, default=None)
    _generation: int = attrs.field(init=False, repr=False, default=0)
    _running: bool = attrs.field(init=False, repr=False, default=False)
    _closed: bool = attrs.field(init=False, repr=False, default=False)
    _level: float = attrs.field(init=False, repr=False, default=0.0)
    _counters: dict[str, float] = attrs.field(init=False, repr=False)
    _interrupts: int = attrs.field(init=False, repr=False, default=0)

    def __attrs_post_init__(self) -> None:
        self._cond = threading.Condition(self._lock)
        # In 24 kHz samples (exact sums); stats() converts to ms.
        self._counters = {
            "played_ms": 0.0,
            "received_ms": 0.0,
            "dropped_ms": 0.0,
            "overflow_dropped_ms": 0.0,
            "ignored_ms": 0.0,
        }

    # -- hooks for subclasses (all called with the lock held) ---------------

    def _advance_locked(self, now: float) -> None:
        """Consume whatever is due by ``now`` (clock outputs); Speaker does nothing."""

    def _on_enqueue_locked(self, now: float, was_empty: bool) -> None:
        """Called after ``play`` appended audio."""

    def _device_heads_locked(self) -> list[tuple[str, _ItemState]]:
        """Items downstream of the FIFO (resampler, ready blocks), oldest first."""
        return []

    def _drop_device_locked(self) -> None:
        """Drop audio downstream of the FIFO (interrupt)."""

    def _device_busy_locked(self, now: float) -> bool:
        """True while audio downstream of the FIFO has not been heard yet."""
        return False

    def _played_locked(self, state: _ItemState, now: float) -> float:
        """Samples of ``state`` heard by ``now`` (Speaker corrects for latency)."""
        return state.played

    # -- shared machinery (lock held) ---------------------------------------

    def _take_locked(self, max_samples: int) -> list[tuple[_Chunk, np.ndarray]]:
        """Remove up to ``max_samples`` from the FIFO head, in order."""
        out: list[tuple[_Chunk, np.ndarray]] = []
        while max_samples > 0 and self._pending:
            head = self._pending[0]
            n = min(max_samples, head.left)
            out.append((head, head.data[head.pos : head.pos + n]))
            head.pos += n
            max_samples -= n
            self._pending_samples -= n
            if head.left == 0:
                self._pending.popleft()
        return out

    def _credit_locked(self, item_id: str, state: _ItemState, samples: float) -> None:
        if state.cut:
            return
        state.played = min(float(state.received), state.played + samples)
        self._counters["played_ms"] += samples
        self._last_id, self._last = item_id, state

    def _remember_locked(self, item_id: str) -> _ItemState:
        state = self._items.get(item_id)
        if state is None:
            state = self._items[item_id] = _ItemState()
            while len(self._items) > _MAX_ITEMS:
                # Chunks hold their state object, so evicting only loses lookups by id.
                self._items.popitem(last=False)
        return state

    def _current_locked(self) -> tuple[str, _ItemState] | None:
        heads = self._device_heads_locked()
        if heads:
            return heads[0]
        if self._pending:
            return self._pending[0].item_id, self._pending[0].state
        last = self._last
        if (
            last is not None
            and self._last_id is not None
            and not last.cut
            and not (last.ended and last.played >= last.received)
        ):
            return self._last_id, last
        return None

    def _busy_locked(self, now: float) -> bool:
        return bool(self._pending_samples) or self._device_busy_locked(now)

    # -- public API -----------------------------------------------------------

    def play(self, item_id: str, pcm: bytes) -> None:
        """Queue audio for ``item_id``; thread-safe and non-blocking.

        Chunks for an item cut by ``interrupt()`` are ignored (counted as
        ``ignored_ms``); so is anything after ``close()``. Raises
        :class:`InvalidArgument` for a non-str id or an odd byte count.
        """
        raw = _check_play_args(item_id, pcm)
        if not raw:
            return
        data = np.frombuffer(raw, dtype="<i2")
        with self._lock:
            if self._closed:
                return
            state = self._remember_locked(item_id)
            if state.cut:
                self._counters["ignored_ms"] += data.size
                return
            state.received += data.size
            self._counters["received_ms"] += data.size
            was_empty = not self._pending
            self._pending.append(_Chunk(item_id, state, data))
            self._pending_samples += data.size
            self._drop_overflow_locked()
            self._on_enqueue_locked(time.monotonic(), was_empty)
            self._cond.notify_all()

    def _drop_overflow_locked(self) -> None:
        excess = self._pending_samples - int(self.max_buffer_ms * SAMPLES_PER_MS)
        if excess <= 0:
            return
        for chunk, data in self._take_locked(excess):
            # Skipped audio advances the item's position (see module docstring).
            chunk.state.played = min(float(chunk.state.received), chunk.state.played + data.size)
            self._counters["overflow_dropped_ms"] += data.size

    def end_item(self, item_id: str) -> None:
        """Mark ``item_id`` complete: once fully played it is no longer "current"."""
        with self._lock:
            state = self._items.get(item_id)
            if state is not None:
                state.ended = True
            self._cond.notify_all()

    def played_ms(self, item_id: str) -> float:
        """Milliseconds of ``item_id`` played so far; frozen at the cut once interrupted."""
        with self._lock:
            now = time.monotonic()
            self._advance_locked(now)
            state = self._items.get(item_id)
            if state is None:
                return 0.0
            if state.cut:
                return state.played / SAMPLES_PER_MS
            return self._played_locked(state, now) / SAMPLES_PER_MS

    def received_ms(self, item_id: str) -> float:
        """Milliseconds of audio accepted for ``item_id`` (chunks after a cut not counted)."""
        with self._lock:
            state = self._items.get(item_id)
            return 0.0 if state is None else state.received / SAMPLES_PER_MS

    def interrupt(self) -> PlaybackCut | None:
        """Stop playback at once and drop everything buffered.

        Returns the cut of the current item (see :meth:`current_item`), or None
        if there is none. Every item with dropped audio is marked cut: its later
        chunks are ignored. New items play normally afterwards.
        """
        with self._lock:
            self._advance_locked(time.monotonic())
            current = self._current_locked()
            victims = {id(s): (i, s) for i, s in self._device_heads_locked()}
            victims.update({id(c.state): (c.item_id, c.state) for c in self._pending})
            if current is not None:
                victims[id(current[1])] = current
            self._drop_device_locked()
            self._pending.clear()
            self._pending_samples = 0
            self._generation += 1
            for _item_id, state in victims.values():
                if not state.cut:
                    state.cut = True
                    self._counters["dropped_ms"] += state.received - state.played
            self._interrupts += 1
            self._last_id = self._last = None
            self._cond.notify_all()
            if current is None:
                return None
            item_id, state = current
            return PlaybackCut(
                item_id=item_id,
                played_ms=state.played / SAMPLES_PER_MS,
                received_ms=state.received / SAMPLES_PER_MS,
                dropped_ms=(state.received - state.played) / SAMPLES_PER_MS,
            )

    def current_item(self) -> str | None:
        """The item playing now, else the next queued, else the last one played and
        neither ended (:meth:`end_item`) and fully played, nor cut."""
        with self._lock:
            self._advance_locked(time.monotonic())
            current = self._current_locked()
            return None if current is None else current[0]

    def is_playing(self) -> bool:
        """True while accepted audio is still buffered or not yet heard."""
        with self._lock:
            now = time.monotonic()
            self._advance_locked(now)
            return self._busy_locked(now)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until everything queued so far has been played (or dropped)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                now = time.monotonic()
                self._advance_locked(now)
                if not self._busy_locked(now) or self._closed:
                    return True
                remaining = deadline - now
                if remaining <= 0:
                    return False
                # Timed slices: some "busy" conditions end with time, not a notify.
                self._cond.wait(min(remaining, _WAIT_SLICE))

    def stats(self) -> dict[str, Any]:
        """A snapshot: played_ms, received_ms, dropped_ms (by interrupt),
        overflow_dropped_ms, ignored_ms, interrupts, buffered_ms, plus subclass extras."""
        with self._lock:
            self._advance_locked(time.monotonic())
            out: dict[str, Any] = {k: v / SAMPLES_PER_MS for k, v in self._counters.items()}
            out["interrupts"] = self._interrupts
            out["buffered_ms"] = self._pending_samples / SAMPLES_PER_MS
            out.update(self._extra_stats_locked())
            return out

    def _extra_stats_locked(self) -> dict[str, Any]:
        return {"underruns": 0}

    def level(self) -> float:
        """RMS (0..1) of the most recently played audio."""
        return self._level


# ---------------------------------------------------------------------------
# Clock-paced outputs (no device)


@attrs.define(eq=False, on_setattr=_NO_HOOKS)
class _ClockOutput(_BufferedOutput):
    """Consumes the FIFO at 24 kHz of wall time (``speed`` times faster), or at once.

    The position is computed from ``time.monotonic()`` whenever it is read, so
    ``played_ms`` is exact between the thread's 10 ms ticks. When the FIFO runs
    dry the clock stops; audio arriving later plays from its arrival, with no
    "catch-up" of the idle time.
    """

    realtime: bool = attrs.field(default=True, kw_only=True)
    speed: float = attrs.field(default=1.0, kw_only=True, validator=_positive)
    tick: float = attrs.field(default=0.01, kw_only=True, validator=_positive)

    _thread: threading.Thread | None = attrs.field(init=False, repr=False, default=None)
    _clock_t0: float | None = attrs.field(init=False, repr=False, default=None)
    _clock_done: int = attrs.field(init=False, repr=False, default=0)
    _to_write: list[np.ndarray] = attrs.field(init=False, repr=False, factory=list)

    def _keeps_written(self) -> bool:
        return False

    def _advance_locked(self, now: float) -> None:
        if not self._running or not self._pending_samples:
            return
        if not self.realtime:
            due = self._pending_samples
        else:
            if self._clock_t0 is None:
                self._clock_t0, self._clock_done = now, 0
            total = int((now - self._clock_t0) * SAMPLE_RATE * self.speed)
            due = total - self._clock_done
            self._clock_done = total
        if due <= 0:
            return
        taken = self._take_locked(due)
        got = 0
        for chunk, data in taken:
            self._credit_locked(chunk.item_id, chunk.state, data.size)
            got += data.size
            if self._keeps_written():
                self._to_write.append(data)
        if taken:
            x = taken[-1][1].astype(np.float32) / 32768.0
            self._level = float(np.sqrt(np.mean(np.square(x)))) if x.size else 0.0
        if got < due:
            self._clock_t0 = None  # ran dry: stop the clock until new audio
            self._cond.notify_all()

    def _on_enqueue_locked(self, now: float, was_empty: bool) -> None:
        if was_empty and self._running and self.realtime:
            self._clock_t0, self._clock_done = now, 0

    def start(self) -> None:
        """Start the clock thread ("rtqueue-audio-out")."""
        with self._lock:
            if self._closed:
                raise AudioUnavailable(f"{type(self).__name__} is closed")
            if self._running:
                return
            self._open_sink()
            self._running = True
            if self._pending:
                self._clock_t0, self._clock_done = time.monotonic(), 0
            self._thread = threading.Thread(target=self._run, name="rtqueue-audio-out", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    if self._closed:
                        break
                    self._advance_locked(time.monotonic())
                    out, self._to_write = self._to_write, []
                    if not out:
                        if self._pending_samples:
                            self._cond.wait(self.tick)
                        else:
                            self._cond.notify_all()  # idle: wake wait_idle()
                            self._level = 0.0
                            self._cond.wait()
                if out:
                    self._write(out)  # file I/O outside the lock
            with self._lock:
                out, self._to_write = self._to_write, []
            if out:
                self._write(out)
        except Exception:  # pragma: no cover - a bug or a full disk; do not die silently
            log.exception("%s thread failed", type(self).__name__)

    def _open_sink(self) -> None:
        pass

    def _write(self, chunks: list[np.ndarray]) -> None:
        pass

    def _close_sink(self) -> None:
        pass

    def close(self) -> None:
        """Stop the clock and end its thread; buffered audio is discarded. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(_JOIN_TIMEOUT)
        self._close_sink()


@attrs.define(eq=False, on_setattr=_NO_HOOKS)
class NullSpeaker(_ClockOutput):
    """An output with no device: a real-time clock consumes the audio.

    ``played_ms`` advances like a real speaker's (``speed`` > 1 runs faster, for
    tests; ``realtime=False`` plays everything the moment it arrives).
    """


@attrs.define(eq=False, on_setattr=_NO_HOOKS)
class WavSpeaker(_ClockOutput):
    """Writes what is played to a 24 kHz mono PCM16 WAV file, paced like :class:`NullSpeaker`.

    Only audio actually played is written, back to back (idle gaps are not
    written; interrupted audio is not written). The file is complete after
    ``close()``.
    """

    path: str | PathLike[str]
    _wav: wave.Wave_write | None = attrs.field(init=False, repr=False, default=None)

    def _keeps_written(self) -> bool:
        return True

    def _open_sink(self) -> None:
        # Kept open across calls (closed in close()), so no context manager.
        w = wave.open(str(self.path), "wb")  # noqa: SIM115
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        self._wav = w

    def _write(self, chunks: list[np.ndarray]) -> None:
        assert self._wav is not None
        self._wav.writeframes(b"".join(c.astype("<i2").tobytes() for c in chunks))

    def _close_sink(self) -> None:
        if self._wav is not None:
            self._wav.close()
            self._wav = None


# ---------------------------------------------------------------------------
# The real speaker


@attrs.define(eq=False, on_setattr=_NO_HOOKS)
class _Block:
    """Device-rate audio of one item, ready for the PortAudio callback."""

    item_id: str
    state: _ItemState
    frames: np.ndarray  # float32 at the device rate
    src_samples: int  # 24 kHz samples this block stands for
    rms: float
    pos: int = 0
    credited: float = 0.0


@attrs.define(eq=False, on_setattr=_NO_HOOKS)
class Speaker(_BufferedOutput):
    """Plays through a sounddevice ``OutputStream`` (``device=None``: the default output).

    Threads: "rtqueue-audio-out" takes 20 ms at a time from the FIFO, resamples
    24 kHz to the device rate and keeps about ``lead_ms`` ready; the PortAudio
    callback only copies ready frames into the device buffer (silence when none)
    and updates counters.

    What ``played_ms`` counts: 24 kHz samples whose device frames the callback
    has handed to PortAudio, minus those handed within the last
    ``stream.latency`` seconds (still in the device's buffer). ``interrupt()``
    stops handing frames at once but does not flush the device buffer, so the
    few ms already handed do sound; the cut therefore reports everything handed,
    which is exactly what the listener hears. ``volume`` (0..1) applies at once.

    ``start()`` plays ``warmup_ms`` of silence before returning (at most 2 s):
    streams lose or stutter their first tens of ms on PulseAudio, and audio
    handed then would be counted as played without being heard.
    """

    device: int | str | None = None
    volume: float = attrs.field(default=1.0, kw_only=True)
    samplerate: int | None = attrs.field(default=None, kw_only=True)
    latency: float | str = attrs.field(default=0.05, kw_only=True)
    lead_ms: float = attrs.field(default=60.0, kw_only=True, validator=_positive)
    warmup_ms: float = attrs.field(default=150.0, kw_only=True)

    _stream: Any = attrs.field(init=False, repr=False, default=None)
    _thread: threading.Thread | None = attrs.field(init=False, repr=False, default=None)
    _rate: int = attrs.field(init=False, repr=False, default=SAMPLE_RATE)
    _out_latency: float = attrs.field(init=False, repr=False, default=0.0)
    _ready: collections.deque[_Block] = attrs.field(init=False, repr=False, factory=collections.deque)
    _ready_frames: int = attrs.field(init=False, repr=False, default=0)
    _feeding: list[tuple[str, _ItemState]] = attrs.field(init=False, repr=False, factory=list)
    _history: collections.deque[tuple[float, _ItemState, float]] = attrs.field(
        init=False, factory=lambda: collections.deque(maxlen=1024)
    )
    _last_handed: float = attrs.field(init=False, repr=False, default=float("-inf"))
    _was_playing: bool = attrs.field(init=False, repr=False, default=False)
    _underruns: int = attrs.field(init=False, repr=False, default=0)
    _starved: int = attrs.field(init=False, repr=False, default=0)
    _warm_frames: int = attrs.field(init=False, repr=False, default=0)
    _warm_needed: int = attrs.field(init=False, repr=False, default=0)

    @volume.validator
    def _check_volume(self, _attr: attrs.Attribute[float], value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise InvalidArgument(f"volume must be within 0..1, got {value!r}")

    @property
    def device_rate(self) -> int:
        """Sample rate of the open stream (24000 before ``start``)."""
        return self._rate

    @property
    def output_latency(self) -> float:
        """The stream's reported output latency in seconds (0.0 before ``start``)."""
        return self._out_latency

    def start(self) -> None:
        """Open and start the output stream; raises :class:`AudioUnavailable` on failure."""
        with self._lock:
            if self._closed:
                raise AudioUnavailable("Speaker is closed")
            if self._running:
                return
        sd = load_sounddevice()
        try:
            info = sd.query_devices(self.device, "output")
            rate = int(self.samplerate or info["default_samplerate"])
            channels = 1
            try:
                sd.check_output_settings(self.device, channels=1, dtype="float32", samplerate=rate)
            except sd.PortAudioError:
                channels = max(1, min(2, int(info["max_output_channels"])))
            stream = sd.OutputStream(
                device=self.device,
                samplerate=rate,
                channels=channels,
                dtype="float32",
                latency=self.latency,
                callback=self._callback,
            )
        except (sd.PortAudioError, ValueError) as exc:
            raise AudioUnavailable(f"cannot open output device {self.device!r}: {exc}") from exc
        with self._lock:
            self._rate = rate
            self._out_latency = float(stream.latency)
            self._stream = stream
            self._running = True
            self._warm_needed = int(self.warmup_ms * rate / 1000)
        self._thread = threading.Thread(target=self._feed, name="rtqueue-audio-out", daemon=True)
        self._thread.start()
        try:
            stream.start()
        except sd.PortAudioError as exc:
            self.close()
            raise AudioUnavailable(f"cannot start output device {self.device!r}: {exc}") from exc
        # Measured on PulseAudio: the first ~50 ms a new stream is handed may be
        # lost or interrupted by a gap, which would make played_ms wrong. Play
        # silence through that start-up and return once it is behind us (bounded:
        # a stalled device must not hang start()).
        with self._cond:
            self._cond.wait_for(lambda: self._warm_frames >= self._warm_needed or self._closed, _WARMUP_TIMEOUT)

    def close(self) -> None:
        """Stop the stream (without draining) and end the feeder thread. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._running = False
            self._cond.notify_all()
            stream, self._stream = self._stream, None
            thread = self._thread
        # Outside the lock: the callback takes it, and abort() waits for the callback.
        if stream is not None:
            try:
                stream.abort()
                stream.close()
            except Exception:  # pragma: no cover - device vanished; nothing left to do
                log.debug("error closing output stream", exc_info=True)
        if thread is not None and thread is not threading.current_thread():
            thread.join(_JOIN_TIMEOUT)

    # -- feeder thread --------------------------------------------------------

    def _feed(self) -> None:
        resampler: StreamResampler | None = None
        generation = -1
        step = 20 * SAMPLES_PER_MS
        while True:
            with self._cond:
                lead = int(self.lead_ms * self._rate / 1000)
                while not self._closed and not (self._pending_samples and self._ready_frames < lead):
                    self._cond.wait()
                if self._closed:
                    return
                if generation != self._generation:
                    # After a cut, do not let the filter's memory leak old audio.
                    resampler = StreamResampler(SAMPLE_RATE, self._rate)
                    generation = self._generation
                taken = self._take_locked(step)
                self._feeding = [(c.item_id, c.state) for c, _ in taken]
            assert resampler is not None
            blocks = []
            for chunk, data in taken:
                frames = resampler.process(data.astype(np.float32) / 32768.0)
                rms = float(np.sqrt(np.mean(np.square(frames)))) if frames.size else 0.0
                blocks.append(_Block(chunk.item_id, chunk.state, frames, data.size, rms))
            with self._cond:
                self._feeding = []
                if generation == self._generation:
                    self._ready.extend(blocks)
                    self._ready_frames += sum(b.frames.size for b in blocks)
                self._cond.notify_all()

    # -- PortAudio callback: copy and count only --------------------------------

    def _callback(self, outdata: np.ndarray, frames: int, _time: Any, status: Any) -> None:
        if status.output_underflow:
            self._underruns += 1
        filled = 0
        with self._lock:
            if self._warm_frames < self._warm_needed:
                self._warm_frames += frames
                if self._warm_frames >= self._warm_needed:
                    self._cond.notify_all()
                outdata.fill(0.0)
                return
            ready = self._ready
            while filled < frames and ready:
                blk = ready[0]
                n = min(frames - filled, blk.frames.size - blk.pos)
                if n:
                    outdata[filled : filled + n] = blk.frames[blk.pos : blk.pos + n, None]
                    blk.pos += n
                    filled += n
                    self._ready_frames -= n
                if blk.pos >= blk.frames.size:
                    ready.popleft()
                    credit = blk.src_samples - blk.credited
                else:
                    credit = blk.src_samples * blk.pos / blk.frames.size - blk.credited
                blk.credited += credit
                self._credit_locked(blk.item_id, blk.state, credit)
                self._level = blk.rms
                if not blk.state.cut:
                    self._history.append((time.monotonic(), blk.state, blk.state.played))
            if filled:
                self._last_handed = time.monotonic()
                if filled < frames and self._was_playing and self._pending_samples:
                    self._starved += 1
                self._was_playing = True
            else:
                if self._was_playing:
                    self._level = 0.0
                self._was_playing = False
            if self._ready_frames < self.lead_ms * self._rate / 1000:
                self._cond.notify_all()
            volume = self.volume
        if filled < frames:
            outdata[filled:] = 0.0
        if volume != 1.0:
            outdata *= volume

    # -- hooks ----------------------------------------------------------------

    def _device_heads_locked(self) -> list[tuple[str, _ItemState]]:
        heads = [(b.item_id, b.state) for b in self._ready]
        heads.extend(self._feeding)
        return heads

    def _drop_device_locked(self) -> None:
        self._ready.clear()
        self._ready_frames = 0

    def _device_busy_locked(self, now: float) -> bool:
        return bool(self._ready or self._feeding) or now < self._last_handed + self._out_latency

    def _played_locked(self, state: _ItemState, now: float) -> float:
        # Frames handed at time t are heard by about t + latency: report the
        # item's count as of the newest callback at least `latency` old.
        threshold = now - self._out_latency
        seen = False
        for t, s, played in reversed(self._history):
            if s is not state:
                continue
            if t <= threshold:
                return played
            seen = True
        return 0.0 if seen else state.played

    def _extra_stats_locked(self) -> dict[str, Any]:
        return {
            "underruns": self._underruns,
            "starved": self._starved,
            "device_rate": self._rate,
            "output_latency_ms": self._out_latency * 1000.0,
        }
