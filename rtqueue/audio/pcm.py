"""PCM helpers: conversions, resampling, levels and WAV loading.

The session's audio format is PCM16 little-endian mono at 24 kHz: 24 samples and
48 bytes per millisecond. Everything here is pure numpy, with no sound device.

Resampling is linear interpolation plus a short windowed-sinc low-pass filter
applied on the high-rate side (before decimating, after interpolating), so that
a 48 kHz microphone does not alias into the 24 kHz stream and 24 kHz speech
does not image into the device's band. It is cheap enough for the audio
threads and needs no scipy.
"""

from __future__ import annotations

import wave
from os import PathLike

import numpy as np
import numpy.typing as npt

from ..errors import InvalidArgument

__all__ = [
    "BYTES_PER_MS",
    "SAMPLES_PER_MS",
    "SAMPLE_RATE",
    "StreamResampler",
    "float_to_pcm16",
    "pcm16_to_float",
    "read_wav_24k_mono",
    "resample",
    "rms_dbfs",
]

#: Sample rate of every PCM16 buffer rtqueue exchanges with the session.
SAMPLE_RATE = 24_000
SAMPLES_PER_MS = SAMPLE_RATE // 1000
BYTES_PER_MS = SAMPLES_PER_MS * 2

_TAPS = 31  # odd, so the filter has an integer group delay of 15 samples

PcmLike = bytes | bytearray | memoryview
_F32 = npt.NDArray[np.float32]


def pcm16_to_float(pcm: PcmLike) -> np.ndarray:
    """Decode PCM16 little-endian bytes to float32 samples in [-1.0, 1.0).

    Raises :class:`InvalidArgument` for an odd number of bytes.
    """
    raw = bytes(pcm)
    if len(raw) % 2:
        raise InvalidArgument(f"PCM16 needs an even number of bytes, got {len(raw)}")
    return np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0


def float_to_pcm16(samples: np.ndarray) -> bytes:
    """Encode float samples (clipped to [-1, 1]) as PCM16 little-endian bytes."""
    x = np.asarray(samples, dtype=np.float64)
    # Scale by 32768 (the inverse of pcm16_to_float, so int16 codes round-trip
    # exactly) and clip, so +1.0 saturates at 32767 instead of wrapping.
    q = np.clip(np.rint(x * 32768.0), -32768, 32767).astype("<i2")
    return q.tobytes()


def rms_dbfs(audio: PcmLike | np.ndarray) -> float:
    """RMS level in dBFS of PCM16 bytes or float samples; ``-inf`` for silence or no data."""
    x = (
        pcm16_to_float(audio)
        if isinstance(audio, (bytes, bytearray, memoryview))
        else (np.asarray(audio, dtype=np.float64))
    )
    if x.size == 0:
        return float("-inf")
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))
    return 20.0 * np.log10(rms) if rms > 0 else float("-inf")


def _lowpass(cutoff: float) -> _F32:
    """Windowed-sinc FIR with unity DC gain; ``cutoff`` in cycles per sample (< 0.5)."""
    n = np.arange(_TAPS, dtype=np.float64) - (_TAPS - 1) / 2
    h = 2 * cutoff * np.sinc(2 * cutoff * n) * np.hamming(_TAPS)
    return (h / float(h.sum())).astype(np.float32)


def _check_rates(src_rate: int, dst_rate: int) -> None:
    for name, rate in (("src_rate", src_rate), ("dst_rate", dst_rate)):
        if not isinstance(rate, (int, np.integer)) or isinstance(rate, bool) or rate <= 0:
            raise InvalidArgument(f"{name} must be a positive int, got {rate!r}")


def resample(samples: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Resample a whole mono float signal; returns float32 of ``round(n * dst / src)`` samples.

    One-shot and delay-compensated (the filter is applied centred), so the output
    is time-aligned with the input. For a live stream use :class:`StreamResampler`.
    """
    _check_rates(src_rate, dst_rate)
    x = np.asarray(samples, dtype=np.float32).reshape(-1)
    if src_rate == dst_rate or x.size == 0:
        return x.copy()
    h = _lowpass(0.45 * min(src_rate, dst_rate) / max(src_rate, dst_rate))
    if dst_rate < src_rate:
        x = np.convolve(x, h, mode="same").astype(np.float32)
    n_out = round(x.size * dst_rate / src_rate)
    pos = np.arange(n_out, dtype=np.float64) * (src_rate / dst_rate)
    y = np.interp(pos, np.arange(x.size), x).astype(np.float32)
    if dst_rate > src_rate:
        y = np.convolve(y, h, mode="same").astype(np.float32)
    return y


class StreamResampler:
    """Resample a mono float stream chunk by chunk, with exact rational timing.

    ``process(chunk)`` returns the output samples that chunk completes. Over any
    number of calls the total output length stays within one sample (plus the
    filter's 15-sample delay) of ``n_in * dst / src``: positions are computed in
    integers, so hours of audio do not drift. Not thread-safe: one owner thread.
    """

    __slots__ = ("_dst", "_fir_hist", "_h", "_held", "_in_base", "_k", "_src")

    def __init__(self, src_rate: int, dst_rate: int) -> None:
        _check_rates(src_rate, dst_rate)
        self._src = int(src_rate)
        self._dst = int(dst_rate)
        self._h: _F32 | None = (
            None if src_rate == dst_rate else _lowpass(0.45 * min(src_rate, dst_rate) / max(src_rate, dst_rate))
        )
        self._fir_hist = np.zeros(_TAPS - 1, dtype=np.float32)
        self._held = np.zeros(0, dtype=np.float32)  # last input sample, if any
        self._in_base = 0  # absolute input index of _held[0]
        self._k = 0  # absolute index of the next output sample

    def _filter(self, x: np.ndarray, h: _F32) -> _F32:
        buf = np.concatenate((self._fir_hist, np.asarray(x, dtype=np.float32)))
        self._fir_hist = buf[-(_TAPS - 1) :]
        return np.convolve(buf, h, mode="valid").astype(np.float32)

    def process(self, chunk: np.ndarray) -> np.ndarray:
        """Feed ``chunk`` (float samples at the source rate); return float32 at the target rate."""
        x = np.asarray(chunk, dtype=np.float32).reshape(-1)
        h = self._h
        if h is None:
            return x.copy()
        if self._dst < self._src:
            x = self._filter(x, h)
        y = self._interp(x)
        if self._dst > self._src:
            y = self._filter(y, h)
        return y

    def _interp(self, chunk: np.ndarray) -> np.ndarray:
        x = np.concatenate((self._held, chunk))
        if x.size < 2:
            self._held = x
            return np.zeros(0, dtype=np.float32)
        last = self._in_base + x.size - 1  # absolute index of x[-1]
        src, dst = self._src, self._dst
        # Output k sits at input position k*src/dst; it needs samples floor(p) and floor(p)+1.
        k_end = -(-last * dst // src)
        k = np.arange(self._k, k_end, dtype=np.int64)
        num = k * src
        idx = num // dst - self._in_base
        frac = ((num % dst) / dst).astype(np.float32)
        y = x[idx] * (1.0 - frac) + x[idx + 1] * frac
        self._k = int(k_end)
        self._held = x[-1:]
        self._in_base = last
        return np.asarray(y, dtype=np.float32)


def read_wav_24k_mono(path: str | PathLike[str]) -> bytes:
    """Read a PCM WAV of any rate, channel count and 8/16/24/32-bit width as 24 kHz mono PCM16.

    Channels are averaged. Raises :class:`InvalidArgument` if the file is not a
    PCM WAV (``wave`` reads integer PCM only); ``OSError`` if it cannot be opened.
    """
    try:
        with wave.open(str(path), "rb") as w:
            channels, width, rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
            raw = w.readframes(w.getnframes())
    except (wave.Error, EOFError) as exc:
        raise InvalidArgument(f"{path}: not a readable PCM WAV file ({exc})") from exc
    if width == 1:
        x = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        x = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        v = np.where(v >= 1 << 23, v - (1 << 24), v)
        x = v.astype(np.float32) / float(1 << 23)
    elif width == 4:
        x = (np.frombuffer(raw, dtype="<i4").astype(np.float64) / 2.0**31).astype(np.float32)
    else:
        raise InvalidArgument(f"{path}: unsupported sample width {width} bytes")
    usable = x.size - x.size % channels
    mono = x[:usable].reshape(-1, channels).mean(axis=1)
    return float_to_pcm16(resample(mono, rate, SAMPLE_RATE))
