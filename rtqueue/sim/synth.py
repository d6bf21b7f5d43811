"""Deterministic speech-like audio for the simulator (PCM16, 24 kHz, mono).

Nothing here is real speech synthesis. :func:`synthesize` turns text into a
sound that *behaves* like speech for the things a Realtime client cares about:

- it is clearly voiced (a harmonic tone around a voice-dependent pitch, shaped
  by one raised-cosine envelope per syllable), so an energy VAD fires on it;
- every word has a duration that grows with its length, followed by a short
  low-energy gap (longer after ``.``, ``?``, ``!``), all under the GA
  default 200 ms of silence that ends a turn (at the default rate and speed);
- it is a pure function of its arguments: the same text, voice and seed give
  the same bytes on every machine (numpy float64 arithmetic, no global RNG).

The same module also gives tests microphone-like input: :func:`silence`,
:func:`noise` and, through :func:`synthesize`, "user speech".

Speech from :func:`synthesize` (and :func:`hum` given ``text=``) is
registered with :mod:`rtqueue.sim.transcribe` under an audio fingerprint, so
the simulator knows what it says when a client sends it as input: the input
transcription events carry that text and the scripted model answers it.
"""

from __future__ import annotations

import bisect
import functools
import math
import re
import zlib

import attrs
import numpy as np

from .transcribe import HEAD_SAMPLES, register, register_parts

__all__ = [
    "BYTES_PER_MS",
    "SAMPLE_RATE",
    "Speech",
    "SpeechStream",
    "noise",
    "pcm_ms",
    "silence",
    "synthesize",
]

#: Sample rate of every PCM buffer in the simulator (the GA ``audio/pcm`` rate).
SAMPLE_RATE = 24_000
#: PCM16 mono at 24 kHz: 24 samples of 2 bytes per millisecond.
BYTES_PER_MS = 48

# Fundamental frequency per known voice; unknown voices get a stable pitch from
# a CRC of their name so that different voices still sound different.
_VOICE_F0: dict[str, float] = {
    "alloy": 180.0,
    "ash": 125.0,
    "ballad": 140.0,
    "coral": 215.0,
    "echo": 115.0,
    "sage": 200.0,
    "shimmer": 225.0,
    "verse": 135.0,
    "marin": 205.0,
    "cedar": 120.0,
}

# Peak amplitude of voiced audio as a fraction of full scale. About -15 dBFS
# RMS: loud enough for any VAD threshold up to ~0.9, far from clipping.
_PEAK = 0.35
# Envelope floor inside a word, so a word stays voiced between its syllables.
_ENV_FLOOR = 0.25
_VOWEL_GROUPS = re.compile(r"[aeiouy]+")


@attrs.frozen
class Speech:
    """Synthesized audio for a text, with where each word starts.

    ``pcm`` is PCM16 little-endian mono at :data:`SAMPLE_RATE`. ``words[i]``
    starts at sample ``word_starts[i]``; ``word_starts`` is non-decreasing and
    every offset is below ``samples`` (when there is any word at all).
    """

    pcm: bytes
    words: tuple[str, ...]
    word_starts: tuple[int, ...]

    @property
    def samples(self) -> int:
        """Number of samples in :attr:`pcm`."""
        return len(self.pcm) // 2

    @property
    def duration_ms(self) -> int:
        """Duration in whole milliseconds (rounded down)."""
        return self.samples * 1000 // SAMPLE_RATE


def pcm_ms(pcm: bytes | bytearray | memoryview) -> float:
    """Duration in milliseconds of a PCM16 24 kHz mono buffer."""
    return len(pcm) / BYTES_PER_MS


def silence(ms: float) -> bytes:
    """Digital silence of ``ms`` milliseconds (rounded down to whole samples)."""
    return bytes(2 * int(ms * SAMPLE_RATE / 1000))


def hum(ms: float, *, amp: float = 0.3, freq: float = 220.0, text: str | None = None) -> bytes:
    """A voiced hum of ``ms`` milliseconds (4 Hz syllable-like swell): the simplest
    stand-in for a user speaking, loud enough for server VAD at default settings.

    With ``text``, the simulator hears the hum as saying that text (see
    :mod:`rtqueue.sim.transcribe`); without, it is unintelligible."""
    t = np.arange(int(ms * SAMPLE_RATE / 1000)) / SAMPLE_RATE
    wave = amp * np.sin(2 * np.pi * freq * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))
    pcm = _to_pcm16(wave)
    if text:
        register(pcm, text)
    return pcm


def noise(ms: float, *, level_dbfs: float = -60.0, seed: int = 0) -> bytes:
    """White noise at ``level_dbfs`` RMS (default: a quiet room microphone).

    Deterministic for a given seed. Below the VAD threshold for any
    ``threshold`` >= 0.05 at the default level.
    """
    n = int(ms * SAMPLE_RATE / 1000)
    rng = np.random.default_rng(seed)
    rms = 10.0 ** (level_dbfs / 20.0)
    x = rng.standard_normal(n) * rms
    return _to_pcm16(x)


def synthesize(
    text: str,
    *,
    voice: str = "marin",
    seed: int = 0,
    words_per_second: float = 4.0,
    speed: float = 1.0,
) -> Speech:
    """Speech-like PCM for ``text``, all at once (see :class:`SpeechStream`).

    ``words_per_second`` sets the average word rate for a five-letter word;
    longer words take longer. ``speed`` is the session's ``audio.output.speed``
    (0.25-1.5 on the real service) and divides every duration. An empty text
    gives empty audio. Raises ``ValueError`` for a non-positive rate or speed.
    """
    stream = SpeechStream(text, voice=voice, seed=seed, words_per_second=words_per_second, speed=speed)
    pcm = stream.read(0, stream.samples)
    register(pcm, " ".join(stream.words))
    return Speech(pcm=pcm, words=stream.words, word_starts=stream.word_starts)


class SpeechStream:
    """The same audio as :func:`synthesize`, rendered lazily, word by word.

    The layout (words, where each starts, total length) is known at once and
    costs nothing; samples are computed only when :meth:`read` asks for them,
    so a response's CPU cost is spread over its streaming and a cancelled
    response never pays for the audio it did not send. Each word is rendered
    from its own seed, so any read order gives the same bytes. Reads are
    expected to move forward: words before the last read are forgotten, which
    bounds memory to about one word.
    """

    def __init__(
        self,
        text: str,
        *,
        voice: str = "marin",
        seed: int = 0,
        words_per_second: float = 4.0,
        speed: float = 1.0,
        register: bool = False,
    ) -> None:
        if words_per_second <= 0 or speed <= 0:
            raise ValueError("words_per_second and speed must be positive")
        self.words: tuple[str, ...] = tuple(text.split())
        self._f0 = _VOICE_F0.get(voice, 110.0 + (zlib.crc32(voice.encode()) % 120))
        self._seed = seed
        base_s = 1.0 / words_per_second / speed
        starts: list[int] = []
        self._voiced_n: list[int] = []
        self._gap_n: list[int] = []
        pos = 0
        for word in self.words:
            starts.append(pos)
            letters = sum(ch.isalnum() for ch in word) or 1
            # Longer words last longer; clamp so one odd token cannot dominate.
            dur_s = base_s * min(2.5, max(0.5, 0.45 + 0.11 * letters))
            gap_s = 0.18 * dur_s
            if word[-1] in ".?!":
                gap_s += 0.05 / speed
            self._voiced_n.append(max(1, int((dur_s - gap_s * 0.5) * SAMPLE_RATE)))
            self._gap_n.append(int(gap_s * SAMPLE_RATE))
            pos += self._voiced_n[-1] + self._gap_n[-1]
        self.word_starts: tuple[int, ...] = tuple(starts)
        #: Total number of samples.
        self.samples = pos
        self._cache: dict[int, bytes] = {}
        if register and self.words:
            self._register()

    def _register(self) -> None:
        """Register the fingerprint (head and loud span) without rendering every word."""
        head: list[bytes] = []
        size = 0
        i = 0
        while i < len(self.words) and size < 2 * (HEAD_SAMPLES + 480):
            pcm = _render_word(self.words[i], self._voiced_n[i], self._gap_n[i], self._f0, self._seed)
            head.append(pcm)
            size += len(pcm)
            i += 1
        # Same fingerprint as the whole buffer: first loud sample from the head
        # words, last loud sample from the last word.
        last = len(self.words) - 1
        tail = _render_word(self.words[last], self._voiced_n[last], self._gap_n[last], self._f0, self._seed)
        if i > last:
            register(b"".join(head), " ".join(self.words))
        else:
            gap = self.word_starts[last] - size // 2
            register_parts(b"".join(head), gap, tail, " ".join(self.words))

    @property
    def duration_ms(self) -> int:
        """Duration in whole milliseconds (rounded down)."""
        return self.samples * 1000 // SAMPLE_RATE

    def read(self, lo: int, hi: int) -> bytes:
        """PCM16 bytes of samples ``[lo, hi)`` (clamped to the stream)."""
        lo, hi = max(0, lo), min(self.samples, hi)
        if hi <= lo:
            return b""
        first = bisect.bisect_right(self.word_starts, lo) - 1
        out: list[bytes] = []
        i = first
        while i < len(self.words) and self.word_starts[i] < hi:
            pcm = self._word(i)
            start = self.word_starts[i]
            out.append(pcm[2 * max(0, lo - start) : 2 * (min(hi, start + len(pcm) // 2) - start)])
            i += 1
        for old in [k for k in self._cache if k < first]:
            del self._cache[old]
        return b"".join(out)

    def release(self) -> None:
        """Forget rendered samples (the layout stays); a later read renders again."""
        self._cache.clear()

    def _word(self, i: int) -> bytes:
        pcm = self._cache.get(i)
        if pcm is None:
            pcm = _render_word(self.words[i], self._voiced_n[i], self._gap_n[i], self._f0, self._seed)
            self._cache[i] = pcm
        return pcm


@functools.lru_cache(maxsize=1024)
def _render_word(word: str, voiced_n: int, gap_n: int, f0: float, seed: int) -> bytes:
    """PCM of one word and its trailing gap.

    A pure function of its arguments, so the same word in the same voice
    sounds the same everywhere (as with a real voice) and repeated words,
    which are most of them, come from the cache (about 1024 x 12 kB at most).
    """
    rng = np.random.default_rng(zlib.crc32(f"{seed}|{f0}|{word}|{voiced_n}".encode()))
    syllables = max(1, min(4, len(_VOWEL_GROUPS.findall(word.lower()))))
    return _to_pcm16(_voiced(voiced_n, syllables, f0, rng)) + bytes(2 * gap_n)


_TABLE_SIZE = 1024
# One period of each of the first five harmonics, mixed per word into a wavetable.
_HARMONICS = np.sin(np.outer(np.arange(1, 6), np.arange(_TABLE_SIZE) * (2.0 * math.pi / _TABLE_SIZE)))


def _voiced(n: int, syllables: int, f0: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` samples of a harmonic tone with one envelope bump per syllable."""
    t = np.arange(n, dtype=np.float64)
    # Pitch: gentle fall across the word plus per-word jitter, like intonation.
    jitter = 1.0 + 0.08 * (rng.random() - 0.5)
    pitch = f0 * jitter * (1.08 - 0.16 * t / max(1, n))
    # A few harmonics with random (but seeded) weights give a vowel-ish timbre.
    # One period goes into a wavetable, read at the running phase: much cheaper
    # than evaluating every harmonic at every sample.
    weights = rng.uniform(0.3, 1.0, size=5) / np.arange(1, 6)
    table = weights @ _HARMONICS
    table = table / float(np.max(np.abs(table)) or 1.0)
    cycles = np.cumsum(pitch) / SAMPLE_RATE
    wave = table[(cycles * _TABLE_SIZE).astype(np.int64) % _TABLE_SIZE]
    # Syllable envelope: raised cosines, lifted by a floor so the word stays
    # voiced between syllables (a VAD must not see silence inside a word).
    syl = np.sin(math.pi * ((t * syllables / n) % 1.0)) ** 2
    edge = np.minimum(1.0, np.minimum(t, n - 1 - t) / (0.01 * SAMPLE_RATE))
    env = (_ENV_FLOOR + (1 - _ENV_FLOOR) * syl) * edge
    return _PEAK * wave * env


def _to_pcm16(x: np.ndarray) -> bytes:
    """Float samples in [-1, 1] to PCM16 little-endian bytes (clipped)."""
    samples = np.asarray(x, dtype=np.float64)
    return (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()
