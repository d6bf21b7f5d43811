"""The GA audio formats and conversions between them.

A Realtime session carries audio in one of three formats, chosen per direction
under ``session.audio.input.format`` / ``session.audio.output.format``:

- ``{"type": "audio/pcm", "rate": 24000}``: PCM16 little-endian mono, 24 kHz,
  48 bytes a millisecond (the default);
- ``{"type": "audio/pcmu"}``: G.711 mu-law, 8 kHz, 1 byte a sample, 8 bytes a
  millisecond (what telephone networks and Twilio carry);
- ``{"type": "audio/pcma"}``: G.711 A-law, likewise.

Every byte <-> millisecond figure in rtqueue goes through an
:class:`AudioFormat`, never a hard-coded 48. Devices and the simulator work
in PCM16 24 kHz; :class:`Transcoder` converts a stream between any two
formats (G.711 by the C codec in :mod:`audioop`, which is in the standard
library up to Python 3.12 and in the ``audioop-lts`` package from 3.13;
resampling by ``soxr``, a maintained binding of the SoX resampler, with its
state kept across chunks so that chunk edges add no clicks).

This module is pure (no threads, sockets or devices), so the sans-I/O cores
(the conversation core, the simulator core) may import it;
:mod:`rtqueue.audio` re-exports it for device code.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import attrs
import numpy as np

from .errors import InvalidArgument

with warnings.catch_warnings():  # deprecated in 3.11/3.12 (not removed there); audioop-lts from 3.13
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

__all__ = [
    "PCM16",
    "PCMA",
    "PCMU",
    "AudioFormat",
    "Transcoder",
    "convert",
    "format_of",
]

_G711 = ("audio/pcmu", "audio/pcma")
_ALIASES = {
    "pcm": "audio/pcm", "pcm16": "audio/pcm", "audio/pcm": "audio/pcm",
    "pcmu": "audio/pcmu", "g711_ulaw": "audio/pcmu", "ulaw": "audio/pcmu", "mulaw": "audio/pcmu",
    "audio/pcmu": "audio/pcmu", "audio/x-mulaw": "audio/pcmu",
    "pcma": "audio/pcma", "g711_alaw": "audio/pcma", "alaw": "audio/pcma", "audio/pcma": "audio/pcma",
}


@attrs.frozen
class AudioFormat:
    """One GA audio format: ``type`` and sample ``rate`` (mono always).

    Use the constants :data:`PCM16`, :data:`PCMU`, :data:`PCMA` or
    :func:`format_of`; the constructor checks that the pair is one the API
    knows (PCM at 24 kHz, G.711 at 8 kHz).
    """

    type: str
    rate: int
    #: Bytes per millisecond: 48 for PCM16 24 kHz, 8 for G.711 (computed once: it is on the audio hot path).
    bytes_per_ms: float = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.type == "audio/pcm":
            if self.rate != 24000:
                raise InvalidArgument(f"audio/pcm is 24000 Hz in the Realtime API, not {self.rate!r}")
        elif self.type in _G711:
            if self.rate != 8000:
                raise InvalidArgument(f"{self.type} is 8000 Hz, not {self.rate!r}")
        else:
            raise InvalidArgument(f"unknown audio format type {self.type!r} (audio/pcm, audio/pcmu, audio/pcma)")
        object.__setattr__(self, "bytes_per_ms", self.rate * self.sample_width / 1000.0)

    @property
    def sample_width(self) -> int:
        """Bytes per sample: 2 for PCM16, 1 for G.711."""
        return 2 if self.type == "audio/pcm" else 1


    @property
    def is_g711(self) -> bool:
        """True for ``audio/pcmu`` and ``audio/pcma``."""
        return self.type in _G711

    def ms(self, nbytes: int | float) -> float:
        """Milliseconds of audio in ``nbytes`` bytes of this format."""
        return nbytes / self.bytes_per_ms

    def nbytes(self, ms: float) -> int:
        """Bytes for ``ms`` milliseconds, rounded down to whole samples."""
        samples = int(ms * self.rate / 1000.0)
        return samples * self.sample_width

    def check(self, data: bytes | bytearray | memoryview) -> None:
        """Raise :class:`InvalidArgument` if ``data`` cannot be audio in this format (odd PCM16 length)."""
        if len(data) % self.sample_width:
            raise InvalidArgument(f"{self} audio needs whole {self.sample_width}-byte samples, got {len(data)} bytes")

    def to_config(self) -> dict[str, Any]:
        """The GA format object, e.g. ``{"type": "audio/pcmu"}``."""
        if self.type == "audio/pcm":
            return {"type": "audio/pcm", "rate": self.rate}
        return {"type": self.type}

    def __str__(self) -> str:
        return f"{self.type} {self.rate} Hz"


PCM16 = AudioFormat("audio/pcm", 24000)
PCMU = AudioFormat("audio/pcmu", 8000)
PCMA = AudioFormat("audio/pcma", 8000)


def format_of(value: Any, default: AudioFormat | None = None) -> AudioFormat:
    """An :class:`AudioFormat` from a GA format object, a name, or an AudioFormat.

    Accepts ``{"type": "audio/pcmu"}``, ``"pcmu"``, ``"g711_ulaw"`` (the beta
    name), ``"audio/x-mulaw"`` (Twilio's), ``"pcm16"`` and the like. ``None``
    gives ``default`` (PCM16 unless said otherwise). Anything else raises
    :class:`InvalidArgument`.
    """
    if value is None:
        return default if default is not None else PCM16
    if isinstance(value, AudioFormat):
        return value
    if isinstance(value, str):
        kind = _ALIASES.get(value.lower())
        if kind is None:
            raise InvalidArgument(f"unknown audio format {value!r} (pcm16, pcmu, pcma or a GA format object)")
        return PCM16 if kind == "audio/pcm" else AudioFormat(kind, 8000)
    if isinstance(value, Mapping):
        kind = _ALIASES.get(str(value.get("type", "audio/pcm")).lower())
        if kind is None:
            raise InvalidArgument(f"unknown audio format {value!r}")
        rate = value.get("rate", 24000 if kind == "audio/pcm" else 8000)
        if not isinstance(rate, int) or isinstance(rate, bool):
            raise InvalidArgument(f"audio format rate must be an int, not {rate!r}")
        return AudioFormat(kind, rate)
    raise InvalidArgument(f"an audio format is a GA format dict, a name or an AudioFormat, not {value!r}")


def _decode_g711(data: bytes, fmt: AudioFormat) -> bytes:
    return audioop.ulaw2lin(data, 2) if fmt.type == "audio/pcmu" else audioop.alaw2lin(data, 2)


def _encode_g711(pcm: bytes, fmt: AudioFormat) -> bytes:
    return audioop.lin2ulaw(pcm, 2) if fmt.type == "audio/pcmu" else audioop.lin2alaw(pcm, 2)


class Transcoder:
    """Convert a stream of audio chunks from ``src`` to ``dst`` format.

    Identity when the formats match (bytes pass through untouched). Otherwise
    decode to linear PCM16, resample (``soxr``, state kept across chunks) and
    encode. The resampler holds back a few milliseconds; :meth:`flush` returns
    them at the end of an utterance. Not thread-safe: one transcoder per
    stream, used by one thread at a time (the caller's lock, if any).
    """

    def __init__(self, src: AudioFormat, dst: AudioFormat) -> None:
        self.src = src
        self.dst = dst
        self._stream: Any = None
        if src.rate != dst.rate:
            import soxr

            self._stream = soxr.ResampleStream(src.rate, dst.rate, 1, dtype="int16", quality="HQ")

    @property
    def identity(self) -> bool:
        """True when input and output formats are the same."""
        return self.src == self.dst

    def convert(self, data: bytes) -> bytes:
        """Convert one chunk; may return fewer bytes than its duration while the resampler fills."""
        if self.identity:
            return bytes(data)
        self.src.check(data)
        return self._finish(self._resample(self._linear(bytes(data)), last=False))

    def flush(self) -> bytes:
        """Return what the resampler still holds (call once at the end of a stream)."""
        if self.identity or self._stream is None:
            return b""
        return self._finish(self._resample(b"", last=True))

    def _linear(self, data: bytes) -> bytes:
        return _decode_g711(data, self.src) if self.src.is_g711 else data

    def _resample(self, pcm: bytes, *, last: bool) -> bytes:
        if self._stream is None:
            return pcm
        samples = np.frombuffer(pcm, dtype="<i2")
        out = self._stream.resample_chunk(samples, last=last)
        return np.asarray(out, dtype="<i2").tobytes()

    def _finish(self, pcm: bytes) -> bytes:
        return _encode_g711(pcm, self.dst) if self.dst.is_g711 else pcm


def convert(data: bytes, src: AudioFormat, dst: AudioFormat) -> bytes:
    """Convert a whole buffer from ``src`` to ``dst`` (no state kept; the output has the same duration)."""
    if src == dst:
        return bytes(data)
    src.check(data)
    pcm = _decode_g711(bytes(data), src) if src.is_g711 else bytes(data)
    if src.rate != dst.rate:
        import soxr

        samples = np.frombuffer(pcm, dtype="<i2")
        pcm = np.asarray(soxr.resample(samples, src.rate, dst.rate, quality="HQ"), dtype="<i2").tobytes()
    return _encode_g711(pcm, dst) if dst.is_g711 else pcm
