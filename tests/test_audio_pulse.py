"""Real sounddevice streams on a private PulseAudio null sink: what Speaker says it played
is what the sink's monitor recorded, and Microphone hears what is played into the sink.

Needs: pulseaudio + pulseaudio-utils (pactl, pacat, paplay), libportaudio2,
libasound2-plugins (ALSA's pulse plugin, PortAudio's route to PulseAudio) and,
for the speech test, espeak-ng. Skipped with a reason when any is missing.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import threading
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rtqueue.audio import Microphone, Speaker, float_to_pcm16, pcm16_to_float
from tests.pulse import PulseServer

UNIT = 10.0
TONE_HZ = 440.0
AMP = 0.5
THRESHOLD = 0.05  # |sample| above this counts as tone (the tone peaks at 0.5)


class Recorder:
    """Records the default input (the null sink's monitor) with a sounddevice InputStream."""

    def __init__(self, rate: int = 48000) -> None:
        import sounddevice as sd

        self.rate = rate
        self._blocks: list[np.ndarray] = []
        self._frames = 0
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self.overflows = 0
        self._stream = sd.InputStream(
            samplerate=rate, channels=1, dtype="float32", latency=0.05, callback=self._callback
        )

    def _callback(self, indata: np.ndarray, frames: int, _t: Any, status: Any) -> None:
        if status.input_overflow:
            self.overflows += 1
        with self._cond:
            self._blocks.append(indata[:, 0].copy())
            self._frames += frames
            self._cond.notify_all()

    @property
    def frames(self) -> int:
        with self._lock:
            return self._frames

    def wait_frames(self, n: int, timeout: float = UNIT) -> bool:
        """Wait until at least ``n`` frames were recorded in total."""
        with self._cond:
            return self._cond.wait_for(lambda: self._frames >= n, timeout)

    def samples(self, start: int = 0) -> np.ndarray:
        with self._lock:
            data = np.concatenate(self._blocks) if self._blocks else np.zeros(0, np.float32)
        return data[start:]

    def __enter__(self) -> Recorder:
        self._stream.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stream.abort()
        self._stream.close()


def tone_pcm(ms: float) -> bytes:
    n = int(ms * 24)
    return float_to_pcm16(AMP * np.sin(2 * np.pi * TONE_HZ * np.arange(n) / 24000))


def play_chunked(spk: Speaker, item_id: str, pcm: bytes, chunk_ms: int = 50) -> None:
    step = chunk_ms * 48
    for i in range(0, len(pcm), step):
        spk.play(item_id, pcm[i : i + step])


def active_span_ms(x: np.ndarray, rate: int) -> tuple[float, int, int]:
    """Onset-to-offset duration (ms) of samples above THRESHOLD, with the onset/offset indices."""
    idx = np.flatnonzero(np.abs(x) > THRESHOLD)
    if idx.size == 0:
        return 0.0, 0, 0
    return (idx[-1] - idx[0] + 1) * 1000.0 / rate, int(idx[0]), int(idx[-1])


def test_speaker_tone_reaches_the_sink(pulse: PulseServer) -> None:
    """1.0 s of 440 Hz played by Speaker is recorded from the monitor with the same energy and duration."""
    with Recorder() as rec:
        spk = Speaker()
        spk.start()
        try:
            start = rec.frames
            play_chunked(spk, "tone", tone_pcm(1000))
            assert spk.wait_idle(UNIT)
            played = spk.played_ms("tone")
            assert rec.wait_frames(rec.frames + int(0.3 * rec.rate))  # the tail reaches the monitor
            stats = spk.stats()
        finally:
            spk.close()
        x = rec.samples(start)
    span_ms, on, off = active_span_ms(x, rec.rate)
    energy = float(np.sum(np.square(x[on : off + 1], dtype=np.float64)) / rec.rate)
    expected_energy = AMP**2 / 2 * 1.0  # mean square of the tone x 1 s
    print(f"\nspan={span_ms:.1f} ms energy={energy:.4f} (expected {expected_energy:.4f}) played={played} {stats}")
    assert played == pytest.approx(1000.0, rel=0.05)
    assert span_ms == pytest.approx(1000.0, rel=0.05)
    assert energy == pytest.approx(expected_energy, rel=0.05)
    # Frames above threshold in 10 ms windows: no gaps (underruns) inside the tone.
    win = rec.rate // 100
    frames = x[on : off + 1][: (off + 1 - on) // win * win].reshape(-1, win)
    loud = np.sqrt(np.mean(np.square(frames), axis=1)) > AMP / np.sqrt(2) / 2
    assert loud.sum() * 10 == pytest.approx(1000.0, rel=0.05)


def test_barge_in_cut_matches_what_was_heard(pulse: PulseServer) -> None:
    """interrupt() at random points: cut.played_ms equals the tone duration the monitor recorded (<= 60 ms off)."""
    rng = random.Random(20240611)
    errors: list[float] = []
    with Recorder() as rec:
        spk = Speaker()
        spk.start()
        try:
            for i in range(10):
                start = rec.frames
                item = f"item_{i}"
                play_chunked(spk, item, tone_pcm(3000))
                threading.Event().wait(rng.uniform(0.15, 1.2))  # barge in at a random moment
                cut = spk.interrupt()
                assert cut is not None and cut.item_id == item
                assert 0 < cut.played_ms < cut.received_ms
                assert spk.wait_idle(UNIT)
                assert not spk.is_playing()
                # Record a little past the end so the tail is in the recording.
                assert rec.wait_frames(rec.frames + int(0.2 * rec.rate))
                heard_ms, _, _ = active_span_ms(rec.samples(start), rec.rate)
                errors.append(cut.played_ms - heard_ms)
        finally:
            spk.close()
    print(
        f"\nbarge-in errors (cut - heard, ms): {[round(e, 1) for e in errors]}; max |err| = {max(map(abs, errors)):.1f}"
    )
    assert max(map(abs, errors)) <= 60.0, errors


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
def test_microphone_hears_speech_played_into_the_sink(pulse: PulseServer, tmp_path: Path) -> None:
    """Speech played into the sink with paplay is captured by Microphone (monitor) as loud audio of the right length."""
    if shutil.which("paplay") is None:
        pytest.skip("paplay not installed (pulseaudio-utils)")
    wav = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), "hello, I would like to return my order"], check=True, timeout=UNIT)
    with wave.open(str(wav), "rb") as w:
        speech_ms = w.getnframes() * 1000.0 / w.getframerate()
    chunks: list[bytes] = []
    enough = threading.Event()
    target = int((speech_ms + 600) * 48)
    total = 0

    def on_chunk(pcm: bytes) -> None:
        nonlocal total
        chunks.append(pcm)
        total += len(pcm)
        if total >= target:
            enough.set()

    mic = Microphone(chunk_ms=20)
    mic.start(on_chunk)
    try:
        subprocess.run(["paplay", str(wav)], env=pulse.env, check=True, timeout=UNIT)
        assert enough.wait(UNIT)
        stats = mic.stats()
    finally:
        mic.close()
    x = pcm16_to_float(b"".join(chunks))
    rms = np.sqrt(np.mean(np.square(x.reshape(-1, 480)), axis=1))  # 20 ms frames
    loud = np.flatnonzero(rms > 0.01)
    assert loud.size, "nothing but silence was captured"
    span_ms = (loud[-1] - loud[0] + 1) * 20.0
    level_db = 20 * np.log10(np.sqrt(np.mean(np.square(x[loud[0] * 480 : (loud[-1] + 1) * 480]))))
    print(f"\nspeech {speech_ms:.0f} ms, captured loud span {span_ms:.0f} ms at {level_db:.1f} dBFS; {stats}")
    assert level_db > -30
    assert 0.7 * speech_ms <= span_ms <= 1.1 * speech_ms
    assert stats["dropped_ms"] == 0
