"""Test helpers: one timeout unit and PCM makers (as websockets' tests/utils.py)."""

from __future__ import annotations

import os

from rtqueue.sim.synth import hum, silence

#: One timeout unit (seconds); scale it on slow machines with RTQ_TIMEOUT_SCALE.
UNIT = 10.0 * float(os.environ.get("RTQ_TIMEOUT_SCALE", "1"))


def speech_pcm(ms: int, *, amp: float = 0.3, freq: float = 220.0) -> bytes:
    """Voiced-sounding PCM16 at 24 kHz (loud enough for server VAD)."""
    return hum(ms, amp=amp, freq=freq)


def silence_pcm(ms: int) -> bytes:
    """Digital silence, PCM16 at 24 kHz."""
    return silence(ms)
