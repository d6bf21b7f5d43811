"""Energy-based server VAD on the PCM the client actually sent.

The detector sees the input audio as a stream of 10 ms frames (240 samples of
PCM16 at 24 kHz) and classifies each by RMS energy:

    voiced  <=>  20*log10(rms / 32768)  >=  -60 + 50 * threshold   (dBFS)

so ``threshold`` 0.0 is -60 dBFS (a quiet room is voiced), the default 0.5 is
-35 dBFS, and 1.0 is -10 dBFS (only loud speech). Time is measured in samples
received since the session started, never in wall-clock time, so results do
not depend on how fast the client streams.

- Speech **starts** after :data:`MIN_SPEECH_MS` of consecutive voiced frames;
  the reported start is the onset of that run minus ``prefix_padding_ms``
  (clamped to the start of the current buffer), as the real service reports
  ``audio_start_ms`` including the padding.
- Speech **stops** after ``silence_duration_ms`` of consecutive unvoiced
  frames; the reported end is the position where that silence completed
  (the real ``audio_end_ms`` also includes the silence).

:class:`EnergyVad` is a pure object: feed bytes, get :class:`VadEvent`\\ s.
"""

from __future__ import annotations

import math
from typing import Literal

import attrs
import numpy as np

__all__ = ["FRAME_MS", "MIN_SPEECH_MS", "EnergyVad", "VadEvent", "threshold_dbfs"]

#: Analysis frame length.
FRAME_MS = 10
_FRAME_SAMPLES = 240
_FRAME_BYTES = 2 * _FRAME_SAMPLES
#: Voiced time needed before speech counts as started (ignores clicks).
MIN_SPEECH_MS = 60


def threshold_dbfs(threshold: float) -> float:
    """The RMS level in dBFS that ``threshold`` (0..1) maps to."""
    return -60.0 + 50.0 * min(1.0, max(0.0, threshold))


@attrs.frozen
class VadEvent:
    """A speech boundary. ``ms`` counts from the first sample of the session."""

    kind: Literal["start", "stop"]
    ms: int


@attrs.define(eq=False)
class EnergyVad:
    """Frame-energy VAD with hysteresis; see the module docstring.

    ``buffer_start_ms`` is where the current (uncommitted) input buffer
    begins; a speech start is never reported before it. Call :meth:`reset`
    after the buffer is committed or cleared by the client.
    """

    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    _pending: bytes = b""
    _frames: int = 0  # complete frames seen since the session started
    _speaking: bool = False
    _voiced_run: int = 0
    _silent_run: int = 0
    buffer_start_ms: int = 0

    @property
    def speaking(self) -> bool:
        """True between a reported start and its stop."""
        return self._speaking

    @property
    def position_ms(self) -> int:
        """Milliseconds of complete frames analysed so far."""
        return self._frames * FRAME_MS

    def configure(self, *, threshold: float, prefix_padding_ms: int, silence_duration_ms: int) -> None:
        """Change the parameters; takes effect from the next frame."""
        self.threshold = threshold
        self.prefix_padding_ms = prefix_padding_ms
        self.silence_duration_ms = silence_duration_ms

    def reset(self, buffer_start_ms: int | None = None) -> None:
        """Forget any speech in progress; the buffer now starts at ``buffer_start_ms``.

        ``None`` means "at the current position".
        """
        self._speaking = False
        self._voiced_run = 0
        self._silent_run = 0
        self.buffer_start_ms = self.position_ms if buffer_start_ms is None else buffer_start_ms

    def feed(self, pcm: bytes) -> list[VadEvent]:
        """Analyse more PCM16 audio; return the boundaries it completes, in order.

        Partial frames are kept until the next call, so chunking does not
        change the result.
        """
        data = self._pending + pcm
        n_frames = len(data) // _FRAME_BYTES
        self._pending = data[n_frames * _FRAME_BYTES :]
        if n_frames == 0:
            return []
        frames = np.frombuffer(data, dtype="<i2", count=n_frames * _FRAME_SAMPLES).astype(np.int64)
        frames = frames.reshape(n_frames, _FRAME_SAMPLES)
        # rms >= limit  <=>  sum of squares >= N * limit**2: exact integer sums, and
        # ufunc calls without np.mean's Python wrapper (the simulator runs this for
        # every mic chunk of every session; at 200 sessions it was 40% of its CPU)
        energy = np.add.reduce(frames * frames, axis=1)
        limit = 32768.0 * 10.0 ** (threshold_dbfs(self.threshold) / 20.0)
        voiced = energy >= _FRAME_SAMPLES * limit * limit
        events: list[VadEvent] = []
        min_voiced = math.ceil(MIN_SPEECH_MS / FRAME_MS)
        min_silent = max(1, math.ceil(self.silence_duration_ms / FRAME_MS))
        for is_voiced in voiced.tolist():
            self._frames += 1
            if not self._speaking:
                self._voiced_run = self._voiced_run + 1 if is_voiced else 0
                if self._voiced_run >= min_voiced:
                    onset_ms = (self._frames - self._voiced_run) * FRAME_MS
                    start = max(self.buffer_start_ms, onset_ms - self.prefix_padding_ms)
                    self._speaking = True
                    self._silent_run = 0
                    events.append(VadEvent("start", start))
            else:
                self._silent_run = 0 if is_voiced else self._silent_run + 1
                if self._silent_run >= min_silent:
                    self._speaking = False
                    self._voiced_run = 0
                    events.append(VadEvent("stop", self.position_ms))
        return events
