"""Test helpers: one timeout unit and PCM makers (as websockets' tests/utils.py)."""

from __future__ import annotations

import os

import numpy as np

#: One timeout unit (seconds); scale it on slow machines with RTQ_TIMEOUT_SCALE.
UNIT = 10.0 * float(os.environ.get("RTQ_TIMEOUT_SCALE", "1"))


def speech_pcm(ms: int, *, amp: float = 0.3, freq: float = 220.0) -> bytes:
    """Voiced-sounding PCM16 at 24 kHz (loud enough for server VAD)."""
    t = np.arange(int(24 * ms)) / 24000.0
    wave = amp * np.sin(2 * np.pi * freq * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))
    return (wave * 32767).astype("<i2").tobytes()


def silence_pcm(ms: int) -> bytes:
    """Digital silence, PCM16 at 24 kHz."""
    return b"\x00\x00" * (24 * ms)
