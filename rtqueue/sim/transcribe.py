"""What simulated speech says: recoverable transcripts for the simulator's input audio.

The simulator cannot recognise speech, but it made most of the speech it
hears. :func:`rtqueue.sim.synth.synthesize` (and :class:`SpeechStream` built
with ``register=True``, and :func:`rtqueue.sim.synth.hum` given ``text=``)
registers every utterance here under an **audio fingerprint**; when user
audio is committed, :class:`Listener` computes the same fingerprint on the
committed buffer and looks the text up.

The fingerprint, computed on PCM16 24 kHz mono:

- the *loud span*: from the first to the last sample whose magnitude is at
  least :data:`LOUD` (about -30 dBFS), so digital silence or quiet room
  noise *before and after* the utterance does not matter;
- the *head*: the :data:`HEAD_SAMPLES` samples (100 ms) starting at the first
  loud sample (zero-padded if the audio ends first), hashed.

A registered utterance matches a committed buffer when the heads hash the
same; among several utterances with the same head (texts starting with the
same word, same voice and seed), the one whose loud-span length is closest
wins, if it is within 100 ms (or 5 %) of the committed one. The fingerprint
is computed incrementally as chunks arrive, so it does not depend on how the
client chunks its audio. Audio mixed with noise, resampled, or never
registered (a microphone, :func:`hum` without text) does not match: it reads
as unintelligible.

**Near matching** (for audio that went through a lossy codec, e.g. G.711 on
a phone call, where no sample survives exactly): :func:`register` also keeps
the utterance's *shape*, the RMS of each 5 ms frame of its loud span
(:data:`SHAPE_FRAME`). ``transcribe(pcm, near=True)`` and a
``Listener(near=True)`` compare the heard shape with every registered one
whose loud span is within the same tolerance, at frame shifts of up to
+-15 ms, by normalised correlation; the best one scoring at least
:data:`NEAR_MIN_SCORE` wins. Measured: G.711 mu-law or A-law and back
(soxr resampling both ways) scores above 0.9999; different texts score
below 0.999 unless they have the same word lengths and first word, which
the exact fingerprint cannot tell apart either. Utterances registered with
:func:`register_parts` (a :class:`~rtqueue.sim.synth.SpeechStream` with
``register=True``, which never renders all its words) have no shape and are
not found by near matching.

The registry is process-wide (tests build audio in one thread and the
simulator hears it in another), thread-safe and bounded
(:data:`MAX_ENTRIES`, oldest forgotten first).
"""

from __future__ import annotations

import hashlib

import numpy as np

__all__ = [
    "HEAD_SAMPLES",
    "LOUD",
    "MAX_ENTRIES",
    "Listener",
    "clear_registry",
    "fingerprint",
    "recognize",
    "recognize_near",
    "register",
    "register_parts",
    "transcribe",
]

#: Magnitude (PCM16) from which a sample counts as loud.
LOUD = 1000
#: Samples hashed from the first loud sample on (100 ms at 24 kHz).
HEAD_SAMPLES = 2400
#: Loud-span difference (samples, 100 ms) still taken as the same utterance.
SPAN_TOLERANCE = 2400
#: Utterances remembered at most.
MAX_ENTRIES = 4096
#: Samples per frame of a near-matching shape (5 ms at 24 kHz).
SHAPE_FRAME = 120
#: Frames of shape kept at most (10 s; float16, so 4 kB an utterance at most): longer
#: utterances compare on their first 10 s (and their whole loud span).
MAX_SHAPE_FRAMES = 2_000
#: Shape correlation from which near matching accepts an utterance.
NEAR_MIN_SCORE = 0.999
_SHAPE_SHIFTS = 3

# Lock-free on purpose (the simulator core is sans-I/O and imports no thread module): every
# update replaces a dict value with a new tuple, and single dict operations are atomic under
# the GIL. Two threads registering the same head at the same instant may lose one entry, and
# eviction may skip a beat; for a test aid that is harmless.
_registry: dict[bytes, tuple[tuple[int, str], ...]] = {}
# Near matching: (loud span, text) -> shape (frame RMS over the loud span), oldest first.
_shapes: dict[tuple[int, str], np.ndarray] = {}


def _loud(pcm: bytes | bytearray | memoryview) -> np.ndarray:
    a = np.frombuffer(pcm, dtype="<i2")
    return np.flatnonzero(np.abs(a.astype(np.int32)) >= LOUD)


def _key(head: bytes) -> bytes:
    head = head[: 2 * HEAD_SAMPLES].ljust(2 * HEAD_SAMPLES, b"\0")
    return hashlib.blake2b(head, digest_size=12).digest()


def fingerprint(pcm: bytes | bytearray | memoryview) -> tuple[bytes, int] | None:
    """``(head key, loud span in samples)`` of a whole buffer; ``None`` if it has no loud sample."""
    pcm = bytes(pcm[: len(pcm) - len(pcm) % 2])
    loud = _loud(pcm)
    if loud.size == 0:
        return None
    first, last = int(loud[0]), int(loud[-1])
    return _key(pcm[2 * first : 2 * (first + HEAD_SAMPLES)]), last - first + 1


def register(pcm: bytes | bytearray | memoryview, text: str) -> None:
    """Remember that ``pcm`` says ``text`` (no-op for silent audio or empty text)."""
    if not text.strip():
        return
    pcm = bytes(pcm[: len(pcm) - len(pcm) % 2])
    loud = _loud(pcm)
    if loud.size == 0:
        return
    first, last = int(loud[0]), int(loud[-1])
    span = last - first + 1
    _add(_key(pcm[2 * first : 2 * (first + HEAD_SAMPLES)]), span, text)
    _add_shape(span, text, pcm[2 * first : 2 * (last + 1)])


def _shape(pcm: bytes | bytearray | memoryview) -> np.ndarray:
    """RMS of each :data:`SHAPE_FRAME`-sample frame (the last one zero-padded), float16."""
    a = np.frombuffer(pcm, dtype="<i2", count=min(len(pcm) // 2, MAX_SHAPE_FRAMES * SHAPE_FRAME))
    a = a.astype(np.float64)
    n = -(-a.size // SHAPE_FRAME) * SHAPE_FRAME
    frames = np.pad(a, (0, n - a.size)).reshape(-1, SHAPE_FRAME)
    shape: np.ndarray = np.sqrt(np.add.reduce(frames * frames, axis=1) / SHAPE_FRAME).astype(np.float16)
    return shape


def _add_shape(span: int, text: str, loud_pcm: bytes) -> None:
    key = (span, text)
    if key in _shapes:
        return
    _shapes[key] = _shape(loud_pcm)
    while len(_shapes) > MAX_ENTRIES:
        try:
            del _shapes[next(iter(_shapes))]
        except (KeyError, RuntimeError, StopIteration):  # another thread changed it meanwhile
            break


def _similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Best normalised correlation of two shapes over small frame shifts (alignment jitter)."""
    best = -1.0
    for shift in range(-_SHAPE_SHIFTS, _SHAPE_SHIFTS + 1):
        x = a[max(0, shift) :]
        y = b[max(0, -shift) :]
        m = min(x.size, y.size)
        if m == 0:
            continue
        x64 = x[:m].astype(np.float64)
        y64 = y[:m].astype(np.float64)
        den = float(np.sqrt(np.dot(x64, x64) * np.dot(y64, y64)))
        if den > 0.0:
            best = max(best, float(np.dot(x64, y64)) / den)
    return best


def recognize_near(shape: np.ndarray, span: int) -> str | None:
    """The text whose registered shape best matches ``shape`` (loud span ``span``), or ``None``.

    See the module docstring: candidates need a loud span within the exact
    fingerprint's tolerance and a shape correlation of at least
    :data:`NEAR_MIN_SCORE`.
    """
    best: tuple[float, str] | None = None
    for (cand_span, text), cand in list(_shapes.items()):
        if abs(cand_span - span) > max(SPAN_TOLERANCE, cand_span // 20):
            continue
        score = _similarity(shape, cand)
        if score >= NEAR_MIN_SCORE and (best is None or score > best[0]):
            best = (score, text)
    return None if best is None else best[1]


def _add(key: bytes, span: int, text: str) -> None:
    entries = _registry.pop(key, ())  # re-inserted below: the newest keys are last
    if (span, text) not in entries:
        entries = (*entries, (span, text))
    _registry[key] = entries
    while len(_registry) > MAX_ENTRIES:
        try:
            del _registry[next(iter(_registry))]  # the oldest
        except (KeyError, RuntimeError, StopIteration):  # another thread changed it meanwhile
            break


def register_parts(head: bytes, gap_samples: int, tail: bytes, text: str) -> None:
    """:func:`register` for the buffer ``head + gap_samples of anything + tail``, not built.

    ``head`` must hold the first loud sample and the 100 ms after it; ``tail``
    the last loud sample (how :class:`~rtqueue.sim.synth.SpeechStream`
    registers without rendering every word).
    """
    fp = fingerprint(head)
    tail_loud = _loud(tail[: len(tail) - len(tail) % 2])
    if fp is None or tail_loud.size == 0:
        register(head, text)
        return
    key, _ = fp
    first = int(_loud(head)[0])
    last = len(head) // 2 + gap_samples + int(tail_loud[-1])
    _add(key, last - first + 1, text)


def recognize(key: bytes, span: int) -> str | None:
    """The text registered for this fingerprint, or ``None`` (unintelligible)."""
    entries = _registry.get(key)
    if not entries:
        return None
    best_span, text = min(entries, key=lambda e: abs(e[0] - span))
    # The same head with a clearly different length is other audio (a hum of
    # another duration, an utterance cut short or run into the next one).
    return text if abs(best_span - span) <= max(SPAN_TOLERANCE, best_span // 20) else None


def transcribe(pcm: bytes | bytearray | memoryview, *, near: bool = False) -> str | None:
    """The text of a whole buffer, or ``None`` when it is not registered speech.

    ``near`` also tries near matching (audio that went through a lossy codec).
    """
    fp = fingerprint(pcm)
    if fp is None:
        return None
    text = recognize(*fp)
    if text is None and near:
        pcm = bytes(pcm[: len(pcm) - len(pcm) % 2])
        loud = _loud(pcm)
        first, last = int(loud[0]), int(loud[-1])
        text = recognize_near(_shape(pcm[2 * first : 2 * (last + 1)]), last - first + 1)
    return text


def clear_registry() -> None:
    """Forget every registered utterance (tests)."""
    _registry.clear()
    _shapes.clear()


class Listener:
    """Incremental fingerprint of the uncommitted input buffer (one per session).

    :meth:`feed` takes each appended chunk with the absolute sample index of
    its first sample; :meth:`take` returns the text of the audio before a
    given sample (a commit point) and starts over. Memory: the 100 ms head;
    with ``near`` (a session whose audio went through a lossy codec) also
    the shape of the loud span so far (its first 10 s), 8 bytes per 5 ms.
    """

    __slots__ = ("_energy", "_first", "_head", "_last", "near")

    def __init__(self, *, near: bool = False) -> None:
        self.near = near
        self._head = bytearray()
        self._first: int | None = None
        self._last = -1
        self._energy: list[float] = []

    def reset(self) -> None:
        self._head = bytearray()
        self._first = None
        self._last = -1
        self._energy = []

    def feed(self, pcm: bytes | bytearray | memoryview, start: int) -> None:
        n = len(pcm) // 2
        if n == 0:
            return
        if self._first is not None and len(self._head) >= 2 * HEAD_SAMPLES:
            # Only the end of the loud span (and, near, its shape) still matters.
            loud = _loud(pcm[: 2 * n])
            if loud.size:
                self._last = start + int(loud[-1])
            if self.near:
                self._feed_energy(pcm[: 2 * n], start)
            return
        loud = _loud(pcm[: 2 * n])
        if loud.size == 0:
            if self._first is not None:
                self._head += pcm[: 2 * min(n, HEAD_SAMPLES - len(self._head) // 2)]
                if self.near:
                    self._feed_energy(pcm[: 2 * n], start)
            return
        if self._first is None:
            self._first = start + int(loud[0])
            offset = int(loud[0])
        else:
            offset = 0
        self._last = start + int(loud[-1])
        room = HEAD_SAMPLES - len(self._head) // 2
        self._head += pcm[2 * offset : 2 * min(n, offset + room)]
        if self.near:
            self._feed_energy(pcm[: 2 * n], start)

    def _feed_energy(self, pcm: bytes | bytearray | memoryview, start: int) -> None:
        """Add the chunk's squared samples to the shape frames (aligned to the first loud sample)."""
        assert self._first is not None
        skip = max(0, self._first - start)
        a = np.frombuffer(pcm, dtype="<i2")[skip:].astype(np.float64)
        pos = start + skip - self._first  # offset of a[0] in the loud span
        k0 = pos // SHAPE_FRAME
        if a.size == 0 or k0 >= MAX_SHAPE_FRAMES:
            return
        bins = np.bincount((np.arange(a.size) + pos % SHAPE_FRAME) // SHAPE_FRAME, weights=a * a)
        energy = self._energy
        for j, e in enumerate(bins.tolist()):
            k = k0 + j
            if k >= MAX_SHAPE_FRAMES:
                break
            if k < len(energy):
                energy[k] += e
            else:
                energy.append(e)

    def take(self, end: int | None = None) -> str | None:
        """The text of what was fed before sample ``end`` (all if ``None``); then reset."""
        first, last, head, energy = self._first, self._last, bytes(self._head), self._energy
        self.reset()
        if first is None or (end is not None and first >= end):
            return None
        if end is not None:
            last = min(last, end - 1)
            head = head[: 2 * max(0, end - first)]
        span = last - first + 1
        text = recognize(_key(head), span)
        if text is None and self.near and energy:
            frames = min(len(energy), -(-span // SHAPE_FRAME))
            shape = np.sqrt(np.asarray(energy[:frames], dtype=np.float64) / SHAPE_FRAME).astype(np.float16)
            text = recognize_near(shape, span)
        return text
