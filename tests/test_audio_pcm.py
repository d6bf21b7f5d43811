"""PCM helpers and the PortAudio-less import path."""

from __future__ import annotations

import sys
import wave
from pathlib import Path

import numpy as np
import pytest

import rtqueue.audio as audio
from rtqueue.audio import (
    AudioIO,
    Microphone,
    Speaker,
    StreamResampler,
    _backend,
    float_to_pcm16,
    pcm16_to_float,
    read_wav_24k_mono,
    resample,
    rms_dbfs,
)
from rtqueue.errors import AudioUnavailable, InvalidArgument


def tone(freq: float, seconds: float, rate: int, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def test_pcm16_round_trip_is_exact() -> None:
    """Every int16 code survives pcm16_to_float -> float_to_pcm16."""
    codes = np.arange(-32768, 32768, dtype="<i2").tobytes()
    assert float_to_pcm16(pcm16_to_float(codes)) == codes


def test_float_to_pcm16_clips() -> None:
    """Out-of-range floats saturate instead of wrapping."""
    out = np.frombuffer(float_to_pcm16(np.array([2.0, -2.0, 1.0])), dtype="<i2")
    assert out.tolist() == [32767, -32768, 32767]


def test_odd_pcm_is_rejected() -> None:
    """An odd byte count is not PCM16."""
    with pytest.raises(InvalidArgument):
        pcm16_to_float(b"\x00\x01\x02")


def test_rms_dbfs() -> None:
    """A full-scale sine is about -3 dBFS; silence is -inf."""
    assert rms_dbfs(tone(440, 1, 24000, amp=1.0)) == pytest.approx(-3.01, abs=0.05)
    assert rms_dbfs(bytes(480)) == float("-inf")
    assert rms_dbfs(b"") == float("-inf")


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000])
def test_resample_round_trip(rate: int) -> None:
    """24 kHz -> rate -> 24 kHz keeps length and a 440 Hz tone almost unchanged."""
    x = tone(440, 1.0, 24000)
    y = resample(resample(x, 24000, rate), rate, 24000)
    assert y.size == x.size
    assert np.max(np.abs(y - x)[100:-100]) < 0.01


@pytest.mark.parametrize("rate", [16000, 44100, 48000])
def test_stream_resampler_matches_length_and_content(rate: int) -> None:
    """Chunked streaming resampling yields n*dst/src samples (minus filter delay) of the same tone."""
    x = tone(440, 1.0, 24000)
    rs = StreamResampler(24000, rate)
    y = np.concatenate([rs.process(c) for c in np.array_split(x, 53)])
    assert abs(y.size - rate) <= 2
    ref = resample(x, 24000, rate)
    n = min(y.size, ref.size) - 40
    # The streaming filter delays the signal by a few samples: compare at the best alignment.
    best = min(np.max(np.abs(y[d + 100 : d + n] - ref[100:n])) for d in range(20))
    assert best < 0.02, best


def test_resample_rejects_bad_rates() -> None:
    """Rates must be positive ints."""
    with pytest.raises(InvalidArgument):
        resample(np.zeros(10), 0, 24000)


def write_wav(path: Path, samples: np.ndarray, rate: int, channels: int = 1, width: int = 2) -> None:
    data = np.repeat(samples[:, None], channels, axis=1).reshape(-1)
    if width == 2:
        raw = np.clip(np.rint(data * 32768), -32768, 32767).astype("<i2").tobytes()
    elif width == 1:
        raw = np.clip(np.rint(data * 128 + 128), 0, 255).astype(np.uint8).tobytes()
    else:
        raw = np.clip(np.rint(data * 2.0**31), -(2**31), 2**31 - 1).astype("<i4").tobytes()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(raw)


def test_read_wav_24k_mono_is_identity_for_24k_mono(tmp_path: Path) -> None:
    """A 24 kHz mono PCM16 file is returned byte for byte."""
    pcm = float_to_pcm16(tone(300, 0.25, 24000))
    with wave.open(str(tmp_path / "a.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(24000)
        w.writeframes(pcm)
    assert read_wav_24k_mono(tmp_path / "a.wav") == pcm


@pytest.mark.parametrize(("rate", "channels", "width"), [(48000, 2, 2), (22050, 1, 1), (16000, 2, 4)])
def test_read_wav_converts(tmp_path: Path, rate: int, channels: int, width: int) -> None:
    """Other rates, channel counts and widths become 24 kHz mono with the same duration and level."""
    write_wav(tmp_path / "b.wav", tone(440, 0.5, rate), rate, channels, width)
    x = pcm16_to_float(read_wav_24k_mono(tmp_path / "b.wav"))
    assert x.size == 12000
    assert rms_dbfs(x[200:-200]) == pytest.approx(rms_dbfs(tone(440, 0.5, 24000)), abs=0.3)


def test_read_wav_rejects_non_wav(tmp_path: Path) -> None:
    """A file that is not a PCM WAV raises InvalidArgument."""
    (tmp_path / "x.wav").write_bytes(b"not a wav file at all")
    with pytest.raises(InvalidArgument):
        read_wav_24k_mono(tmp_path / "x.wav")


def test_import_does_not_load_sounddevice() -> None:
    """Importing rtqueue.audio does not import sounddevice (PortAudio may be missing)."""
    import subprocess

    code = "import sys, rtqueue.audio; print('sounddevice' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _no_portaudio(name: str) -> None:
    raise OSError("PortAudio library not found")


def test_missing_portaudio_raises_audio_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without PortAudio, Speaker/Microphone/AudioIO.default raise AudioUnavailable naming the fix."""
    monkeypatch.setattr(_backend, "_import_module", _no_portaudio)
    for opener in (lambda: Speaker().start(), lambda: Microphone().start(lambda b: None), AudioIO.default):
        with pytest.raises(AudioUnavailable) as info:
            opener()
        assert "PortAudio" in str(info.value)
        assert "apt-get install libportaudio2" in str(info.value)
        assert isinstance(info.value.__cause__, OSError)


def test_missing_sounddevice_package_raises_audio_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the sounddevice package, the error says what to pip install."""
    monkeypatch.setitem(sys.modules, "sounddevice", None)  # makes `import sounddevice` raise ImportError
    with pytest.raises(AudioUnavailable) as info:
        Speaker().start()
    assert "pip install sounddevice" in str(info.value)
    assert isinstance(info.value.__cause__, ImportError)


def test_exports() -> None:
    """The package exports the documented names."""
    for name in [
        "AudioIO",
        "AudioOutput",
        "AudioInput",
        "Speaker",
        "Microphone",
        "NullSpeaker",
        "NullMicrophone",
        "WavSpeaker",
        "WavMicrophone",
        "PcmMicrophone",
        "PlaybackCut",
        "pcm16_to_float",
        "float_to_pcm16",
        "resample",
        "rms_dbfs",
        "read_wav_24k_mono",
    ]:
        assert hasattr(audio, name), name
