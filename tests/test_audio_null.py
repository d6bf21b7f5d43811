"""Outputs and inputs that need no sound server: NullSpeaker, WavSpeaker, PcmMicrophone, WavMicrophone."""

from __future__ import annotations

import threading
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from rtqueue.audio import (
    AudioIO,
    NullMicrophone,
    NullSpeaker,
    PcmMicrophone,
    PlaybackCut,
    WavMicrophone,
    WavSpeaker,
    float_to_pcm16,
    pcm16_to_float,
)
from rtqueue.errors import InvalidArgument

UNIT = 10.0  # one timeout unit, in seconds (never reached when things work)


def tone_pcm(ms: int, freq: float = 440.0, amp: float = 0.5) -> bytes:
    n = ms * 24
    return float_to_pcm16(amp * np.sin(2 * np.pi * freq * np.arange(n) / 24000))


def feed(speaker: NullSpeaker, item_id: str, pcm: bytes, chunk_ms: int = 20) -> None:
    step = chunk_ms * 48
    for i in range(0, len(pcm), step):
        speaker.play(item_id, pcm[i : i + step])


def test_null_speaker_tracks_wall_time() -> None:
    """500 ms played through NullSpeaker takes ~500 ms of wall time and reports 500 ms played."""
    spk = NullSpeaker()
    spk.start()
    try:
        t0 = time.monotonic()
        feed(spk, "item_a", tone_pcm(500))
        assert spk.is_playing()
        assert spk.current_item() == "item_a"
        assert spk.wait_idle(UNIT)
        elapsed = time.monotonic() - t0
        assert spk.played_ms("item_a") == 500.0
        assert spk.received_ms("item_a") == 500.0
        assert 0.48 <= elapsed <= 0.6, elapsed
        assert not spk.is_playing()
        assert spk.stats()["played_ms"] == 500.0
    finally:
        spk.close()


def test_null_speaker_played_ms_is_realtime_midway() -> None:
    """Midway, played_ms matches the elapsed wall time within a few ms."""
    spk = NullSpeaker()
    spk.start()
    try:
        t0 = time.monotonic()
        feed(spk, "item_a", tone_pcm(1000))
        threading.Event().wait(0.3)  # let playback run for a while (not synchronisation)
        played = spk.played_ms("item_a")
        elapsed_ms = (time.monotonic() - t0) * 1000
        assert abs(played - elapsed_ms) < 15, (played, elapsed_ms)
    finally:
        spk.close()


def test_null_speaker_interrupt_midway() -> None:
    """interrupt() mid-way cuts with 0 < played < received and drops the rest."""
    spk = NullSpeaker()
    spk.start()
    try:
        feed(spk, "item_a", tone_pcm(2000))
        threading.Event().wait(0.2)
        cut = spk.interrupt()
        assert isinstance(cut, PlaybackCut)
        assert cut.item_id == "item_a"
        assert 150 < cut.played_ms < cut.received_ms == 2000.0
        assert cut.dropped_ms == pytest.approx(cut.received_ms - cut.played_ms)
        assert not spk.is_playing()
        assert spk.wait_idle(0)
        # Late chunks of the cut item are ignored; the position stays frozen.
        spk.play("item_a", tone_pcm(100))
        assert spk.received_ms("item_a") == 2000.0
        assert not spk.is_playing()
        assert spk.played_ms("item_a") == cut.played_ms
        assert spk.current_item() is None
        assert spk.interrupt() is None
        stats = spk.stats()
        assert stats["ignored_ms"] == 100.0
        assert stats["dropped_ms"] == pytest.approx(cut.dropped_ms)
        # A new item plays normally.
        feed(spk, "item_b", tone_pcm(100))
        assert spk.current_item() == "item_b"
        assert spk.wait_idle(UNIT)
        assert spk.played_ms("item_b") == 100.0
    finally:
        spk.close()


def test_interrupt_drops_queued_items_too() -> None:
    """Items queued behind the playing one are dropped and their late chunks ignored."""
    spk = NullSpeaker(speed=10.0)
    spk.start()
    try:
        feed(spk, "a", tone_pcm(3000))
        feed(spk, "b", tone_pcm(500))
        cut = spk.interrupt()
        assert cut is not None and cut.item_id == "a"
        spk.play("b", tone_pcm(100))
        assert spk.received_ms("b") == 500.0
        assert spk.played_ms("b") == 0.0
    finally:
        spk.close()


def test_last_item_stays_current_until_ended() -> None:
    """An item that ran dry (more may come) is still current and cut; end_item() finishes it."""
    spk = NullSpeaker(realtime=False)
    spk.start()
    try:
        spk.play("a", tone_pcm(100))
        assert spk.wait_idle(UNIT)
        assert spk.current_item() == "a"
        spk.end_item("a")
        assert spk.current_item() is None
        assert spk.interrupt() is None
        spk.play("b", tone_pcm(100))
        assert spk.wait_idle(UNIT)
        cut = spk.interrupt()
        assert cut == PlaybackCut("b", 100.0, 100.0, 0.0)
    finally:
        spk.close()


def test_null_speaker_idle_gap_does_not_catch_up() -> None:
    """After running dry, new audio plays in real time from its arrival, not instantly."""
    spk = NullSpeaker()
    spk.start()
    try:
        spk.play("a", tone_pcm(50))
        assert spk.wait_idle(UNIT)
        threading.Event().wait(0.1)
        t0 = time.monotonic()
        spk.play("a", tone_pcm(200))
        assert spk.wait_idle(UNIT)
        assert time.monotonic() - t0 >= 0.19
        assert spk.played_ms("a") == 250.0
    finally:
        spk.close()


def test_speed_factor() -> None:
    """speed=10 plays 1 s of audio in about 100 ms."""
    spk = NullSpeaker(speed=10.0)
    spk.start()
    try:
        t0 = time.monotonic()
        feed(spk, "a", tone_pcm(1000))
        assert spk.wait_idle(UNIT)
        assert 0.09 <= time.monotonic() - t0 < 0.3
    finally:
        spk.close()


def test_buffer_cap_drops_oldest() -> None:
    """Past max_buffer_ms the oldest audio is dropped, counted, and advances the position."""
    spk = NullSpeaker(max_buffer_ms=100)
    feed(spk, "a", tone_pcm(300))  # not started: nothing plays
    stats = spk.stats()
    assert stats["buffered_ms"] == 100.0
    assert stats["overflow_dropped_ms"] == 200.0
    assert spk.played_ms("a") == 200.0
    spk.close()


def test_play_validates_arguments() -> None:
    """play() rejects odd byte counts, non-bytes and empty ids; empty audio is a no-op."""
    spk = NullSpeaker()
    with pytest.raises(InvalidArgument):
        spk.play("a", b"\x00")
    with pytest.raises(InvalidArgument):
        spk.play("a", "text")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        spk.play("", b"\x00\x00")
    spk.play("a", b"")
    assert spk.received_ms("a") == 0.0
    spk.close()


def test_close_is_idempotent_and_ends_thread() -> None:
    """close() twice is fine; the audio thread is gone afterwards; play() after close is ignored."""
    spk = NullSpeaker()
    spk.start()
    feed(spk, "a", tone_pcm(1000))
    spk.close()
    spk.close()
    assert not [t for t in threading.enumerate() if t.name == "rtqueue-audio-out"]
    spk.play("a", tone_pcm(10))


def test_wav_speaker_writes_played_audio(tmp_path: Path) -> None:
    """WavSpeaker writes exactly the audio it played, as 24 kHz mono PCM16."""
    pcm = tone_pcm(300)
    spk = WavSpeaker(tmp_path / "out.wav", realtime=False)
    spk.start()
    feed(spk, "a", pcm)
    assert spk.wait_idle(UNIT)
    spk.close()
    with wave.open(str(tmp_path / "out.wav"), "rb") as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 24000)
        assert w.readframes(w.getnframes()) == pcm


def test_wav_speaker_realtime_interrupt_writes_only_played(tmp_path: Path) -> None:
    """A realtime WavSpeaker cut mid-way wrote just the played part."""
    pcm = tone_pcm(1000)
    spk = WavSpeaker(tmp_path / "out.wav")
    spk.start()
    feed(spk, "a", pcm)
    threading.Event().wait(0.2)
    cut = spk.interrupt()
    spk.close()
    assert cut is not None
    with wave.open(str(tmp_path / "out.wav"), "rb") as w:
        data = w.readframes(w.getnframes())
    assert len(data) == int(cut.played_ms * 24) * 2
    assert data == pcm[: len(data)]


def collect(mic: PcmMicrophone) -> list[bytes]:
    chunks: list[bytes] = []
    mic.start(chunks.append)
    assert mic.finished.wait(UNIT)
    mic.close()
    return chunks


def test_pcm_microphone_delivers_audio_then_silence_in_real_time() -> None:
    """PcmMicrophone delivers its data in 40 ms chunks at real-time pace, then trailing silence."""
    pcm = tone_pcm(200)
    mic = PcmMicrophone(pcm, trailing_silence_ms=200)
    t0 = time.monotonic()
    chunks = collect(mic)
    elapsed = time.monotonic() - t0
    assert all(len(c) == 40 * 48 for c in chunks)
    assert b"".join(chunks) == pcm + bytes(200 * 48)
    assert 0.38 <= elapsed < 0.6, elapsed
    assert mic.stats()["delivered_ms"] == 400.0


def test_pcm_microphone_mute_sends_silence() -> None:
    """A muted microphone keeps delivering chunks, as silence."""
    mic = PcmMicrophone(tone_pcm(200), realtime=False, trailing_silence_ms=0)
    mic.mute()
    chunks = collect(mic)
    assert b"".join(chunks) == bytes(200 * 48)
    assert mic.stats()["muted_ms"] == 200.0


def test_pcm_microphone_loop_until_close() -> None:
    """loop=True repeats audio + silence until close()."""
    got = threading.Event()
    chunks: list[bytes] = []

    def on_chunk(b: bytes) -> None:
        chunks.append(b)
        if len(chunks) >= 12:
            got.set()

    mic = PcmMicrophone(tone_pcm(80), loop=True, realtime=False, trailing_silence_ms=40, chunk_ms=40)
    mic.start(on_chunk)
    assert got.wait(UNIT)
    mic.close()
    assert mic.finished.is_set()
    assert chunks[:3] == chunks[3:6]


def test_on_chunk_errors_are_counted_not_fatal() -> None:
    """An exception from on_chunk is logged and counted; delivery continues."""

    def bad(_b: bytes) -> None:
        raise RuntimeError("boom")

    mic = PcmMicrophone(tone_pcm(120), realtime=False, trailing_silence_ms=0)
    mic.start(bad)
    assert mic.finished.wait(UNIT)
    mic.close()
    assert mic.stats()["callback_errors"] == 3


def test_wav_microphone_resamples_file(tmp_path: Path) -> None:
    """WavMicrophone turns a 48 kHz stereo WAV into 24 kHz mono chunks, then trailing silence."""
    rate = 48000
    x = 0.5 * np.sin(2 * np.pi * 440 * np.arange(rate // 2) / rate)
    stereo = np.repeat(x[:, None], 2, axis=1).reshape(-1)
    with wave.open(str(tmp_path / "in.wav"), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.rint(stereo * 32767).astype("<i2").tobytes())
    mic = WavMicrophone(tmp_path / "in.wav", trailing_silence_ms=120, speed=4.0)
    got = pcm16_to_float(b"".join(collect(mic)))
    assert got.size == 12000 + 120 * 24
    expected = 0.5 * np.sin(2 * np.pi * 440 * np.arange(12000) / 24000)
    assert np.max(np.abs(got[100:11900] - expected[100:11900])) < 0.01
    assert not got[12000:].any()


def test_wav_microphone_bad_file_fails_early(tmp_path: Path) -> None:
    """A missing file fails in the constructor, not in the audio thread."""
    with pytest.raises(OSError):
        WavMicrophone(tmp_path / "missing.wav")


def test_null_io() -> None:
    """AudioIO.null() pairs a NullSpeaker with a NullMicrophone that never delivers."""
    io = AudioIO.null()
    assert isinstance(io.output, NullSpeaker)
    assert isinstance(io.input, NullMicrophone)
    io.input.start(lambda b: pytest.fail("NullMicrophone delivered audio"))
    io.output.start()
    io.close()
