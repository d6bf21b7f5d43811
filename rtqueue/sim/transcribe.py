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
client chunks its audio. Audio mixed with noise,
resampled, or never registered (a microphone, :func:`hum` without text)
does not match: it reads as unintelligible.

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

# Lock-free on purpose (the simulator core is sans-I/O and imports no thread module): every
# update replaces a dict value with a new tuple, and single dict operations are atomic under
# the GIL. Two threads registering the same head at the same instant may lose one entry, and
# eviction may skip a beat; for a test aid that is harmless.
_registry: dict[bytes, tuple[tuple[int, str], ...]] = {}


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
    fp = fingerprint(pcm)
    if fp is None:
        return
    _add(*fp, text)


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


def transcribe(pcm: bytes | bytearray | memoryview) -> str | None:
    """The text of a whole buffer, or ``None`` when it is not registered speech."""
    fp = fingerprint(pcm)
    return None if fp is None else recognize(*fp)


def clear_registry() -> None:
    """Forget every registered utterance (tests)."""
    _registry.clear()


class Listener:
    """Incremental fingerprint of the uncommitted input buffer (one per session).

    :meth:`feed` takes each appended chunk with the absolute sample index of
    its first sample; :meth:`take` returns the text of the audio before a
    given sample (a commit point) and starts over. Memory: the 100 ms head.
    """

    __slots__ = ("_first", "_head", "_last")

    def __init__(self) -> None:
        self._head = bytearray()
        self._first: int | None = None
        self._last = -1

    def reset(self) -> None:
        self._head = bytearray()
        self._first = None
        self._last = -1

    def feed(self, pcm: bytes | bytearray | memoryview, start: int) -> None:
        n = len(pcm) // 2
        if n == 0:
            return
        if self._first is not None and len(self._head) >= 2 * HEAD_SAMPLES:
            # Only the end of the loud span still matters.
            loud = _loud(pcm[: 2 * n])
            if loud.size:
                self._last = start + int(loud[-1])
            return
        loud = _loud(pcm[: 2 * n])
        if loud.size == 0:
            if self._first is not None:
                self._head += pcm[: 2 * min(n, HEAD_SAMPLES - len(self._head) // 2)]
            return
        if self._first is None:
            self._first = start + int(loud[0])
            offset = int(loud[0])
        else:
            offset = 0
        self._last = start + int(loud[-1])
        room = HEAD_SAMPLES - len(self._head) // 2
        self._head += pcm[2 * offset : 2 * min(n, offset + room)]

    def take(self, end: int | None = None) -> str | None:
        """The text of what was fed before sample ``end`` (all if ``None``); then reset."""
        first, last, head = self._first, self._last, bytes(self._head)
        self.reset()
        if first is None or (end is not None and first >= end):
            return None
        if end is not None:
            last = min(last, end - 1)
            head = head[: 2 * max(0, end - first)]
        return recognize(_key(head), last - first + 1)
