"""Audio formats in the SDK: the codec and resampler, and a G.711 session end to end on a mock server."""

from __future__ import annotations

import base64
import threading
from typing import Any

import numpy as np
import pytest

import rtqueue
from rtqueue import PCM16, PCMA, PCMU, Agent, AudioFormat, AudioFormatError, InvalidArgument, Session
from rtqueue.audio import AudioIO, AudioOutput, PcmMicrophone, PlaybackCut
from rtqueue.formats import Transcoder, convert, format_of
from rtqueue.testing import MockTransport
from tests.utils import UNIT, speech_pcm

PCMU_SESSION = {"audio": {"input": {"format": {"type": "audio/pcmu"}}, "output": {"format": {"type": "audio/pcmu"}}}}


def _tone(ms: int, freq: float = 440.0) -> bytes:
    t = np.arange(ms * 24) / 24000
    return (0.3 * 32767 * np.sin(2 * np.pi * freq * t)).astype("<i2").tobytes()


def _corr(a: bytes, b: bytes) -> float:
    x = np.frombuffer(a, "<i2").astype(float)
    y = np.frombuffer(b, "<i2").astype(float)
    n = min(len(x), len(y))
    return float(np.corrcoef(x[:n], y[:n])[0, 1])


# -- the format value ---------------------------------------------------------------------------------


def test_bytes_per_ms_follow_the_format():
    """PCM16 24 kHz is 48 bytes a millisecond, G.711 is 8; ms() and nbytes() invert each other."""
    assert PCM16.bytes_per_ms == 48 and PCMU.bytes_per_ms == 8 and PCMA.bytes_per_ms == 8
    assert PCMU.ms(8000) == 1000 and PCM16.ms(48000) == 1000
    assert PCMU.nbytes(20) == 160 and PCM16.nbytes(20) == 960


def test_format_of_accepts_ga_objects_and_names():
    """GA dicts, beta names and Twilio's MIME type all map to the one value; to_config is the GA object."""
    assert format_of({"type": "audio/pcmu"}) is not None
    assert format_of({"type": "audio/pcmu"}) == format_of("g711_ulaw") == format_of("audio/x-mulaw") == PCMU
    assert format_of("pcma") == PCMA and format_of(None) == PCM16
    assert format_of({"type": "audio/pcm", "rate": 24000}) == PCM16
    assert PCMU.to_config() == {"type": "audio/pcmu"}
    assert PCM16.to_config() == {"type": "audio/pcm", "rate": 24000}


@pytest.mark.parametrize("bad", ["opus", {"type": "audio/pcm", "rate": 16000}, {"type": "x"}, 5, {"rate": "x"}])
def test_unknown_formats_are_invalid_arguments(bad: Any):
    """A format the API does not have is refused with InvalidArgument (an RtqueueError)."""
    with pytest.raises(InvalidArgument):
        format_of(bad)


def test_pcm16_needs_whole_samples_g711_does_not():
    """check() refuses an odd PCM16 length; any length is whole G.711 samples."""
    with pytest.raises(InvalidArgument):
        PCM16.check(b"\x00" * 3)
    PCMU.check(b"\x00" * 3)


# -- conversion ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", [PCMU, PCMA])
def test_g711_round_trip_keeps_duration_and_waveform(fmt: AudioFormat):
    """PCM16 -> G.711 -> PCM16 keeps the length in ms and the tone (correlation > 0.95)."""
    pcm = _tone(500)
    coded = convert(pcm, PCM16, fmt)
    assert len(coded) == 500 * 8
    back = convert(coded, fmt, PCM16)
    assert len(back) == len(pcm)
    assert _corr(pcm, back) > 0.95


def test_streaming_transcoder_matches_whole_buffer_length():
    """Chunked conversion plus flush() gives the same number of bytes as converting at once."""
    pcm = _tone(1000)
    tc = Transcoder(PCM16, PCMU)
    out = b"".join(tc.convert(pcm[i:i + 960]) for i in range(0, len(pcm), 960)) + tc.flush()
    assert len(out) == len(convert(pcm, PCM16, PCMU)) == 8000
    # a delay of a few ms at most, no clicks: the decoded stream matches the tone once aligned
    back = convert(out, PCMU, PCM16)
    best = max(_corr(pcm[2 * lag:], back) for lag in range(0, 24 * 10, 6))
    assert best > 0.9


def test_same_format_passes_bytes_through():
    """Identity conversion returns the bytes untouched (what a phone bridge relies on)."""
    data = bytes(range(256)) * 4
    assert Transcoder(PCMU, PCMU).convert(data) == data
    assert convert(data, PCMU, PCMU) == data


# -- a G.711 session ----------------------------------------------------------------------------------


def _pcmu_delta(rid: str, item: str, nbytes: int) -> dict[str, Any]:
    coded = convert(_tone(nbytes // 8), PCM16, PCMU)
    return {"type": "response.output_audio.delta", "response_id": rid, "item_id": item, "output_index": 0,
            "content_index": 0, "delta": base64.b64encode(coded).decode()}


def test_audio_format_configures_both_directions():
    """connect(audio_format="pcmu") sends the G.711 formats; the session reports them."""
    t = MockTransport()
    with Session.connect(transport=t, audio_format="pcmu", reconnect=False) as s:
        first = t.sent_of("session.update")[0]["session"]
        assert first["audio"]["input"]["format"] == {"type": "audio/pcmu"}
        assert first["audio"]["output"]["format"] == {"type": "audio/pcmu"}
        assert s.input_format == PCMU and s.output_format == PCMU


def test_audio_format_per_direction():
    """A pair sets input and output separately."""
    t = MockTransport()
    with Session.connect(transport=t, audio_format=("pcm16", "pcma"), reconnect=False) as s:
        assert s.input_format == PCM16 and s.output_format == PCMA


def test_pcm16_appended_to_a_pcmu_session_fails_clearly():
    """Audio stated as PCM16 into an audio/pcmu session raises AudioFormatError and sends nothing."""
    t = MockTransport()
    with Session.connect(transport=t, audio_format="pcmu", reconnect=False) as s:
        with pytest.raises(AudioFormatError, match="audio/pcmu"):
            s.append_audio(_tone(20), format="pcm16")
        assert isinstance(AudioFormatError("x"), InvalidArgument)
        s.append_audio(b"\xff" * 161, format="pcmu")  # any length is whole G.711 samples
        s.send({"type": "test.flush"}).wait_sent(UNIT)
        sent = t.sent_of("input_audio_buffer.append")
        assert len(sent) == 1 and base64.b64decode(sent[0]["audio"]) == b"\xff" * 161


def test_response_audio_ms_counts_g711_bytes():
    """Response.audio_ms of a mu-law response is its bytes / 8, not / 48."""
    t = MockTransport()
    with Session.connect(transport=t, audio_format="pcmu", reconnect=False) as s:
        h = s.create_response()
        create = t.wait_sent(lambda e: e["type"] == "response.create")
        body = {"object": "realtime.response", "id": "resp_1", "status": "in_progress", "output": [],
                "metadata": create.get("response", {}).get("metadata")}
        t.push(type="response.created", response=body)
        for _ in range(5):
            t.push_event(_pcmu_delta("resp_1", "item_1", 1600))
        t.push(type="response.done", response={**body, "status": "completed"})
        assert h.wait(UNIT).audio_ms == pytest.approx(1000.0)


def test_handoff_update_repeats_the_format():
    """An agent's session.update names the G.711 formats again, so a handoff cannot lose them."""
    t = MockTransport()
    a, b = Agent("a", instructions="A."), Agent("b", instructions="B.")
    with Session.connect(transport=t, agent=a.with_handoffs(b), audio_format="pcmu", reconnect=False) as s:
        s.handoff("b")
        upd = t.wait_sent(lambda e: e["type"] == "session.update" and e["session"].get("instructions") == "B.")
        assert upd["session"]["audio"]["output"]["format"] == {"type": "audio/pcmu"}
        assert upd["session"]["audio"]["input"]["format"] == {"type": "audio/pcmu"}
        assert s.output_format == PCMU


def test_reconnect_replays_the_format():
    """The first session.update on a new socket carries the negotiated G.711 formats."""
    made: list[MockTransport] = []
    second = threading.Event()

    def factory() -> MockTransport:
        made.append(MockTransport())
        if len(made) == 2:
            second.set()
        return made[-1]

    with Session.connect(transport=factory, audio_format="pcma",
                         reconnect=rtqueue.ReconnectPolicy(initial_backoff=0.01)) as s:
        made[0].drop()
        assert second.wait(UNIT)
        upd = made[1].wait_sent(lambda e: e["type"] == "session.update")
        assert upd["session"]["audio"]["output"]["format"] == {"type": "audio/pcma"}
        assert s.output_format == PCMA


class _Recorder(AudioOutput):
    """An AudioOutput that keeps what it is given (PCM16 by default)."""

    def __init__(self, fmt: AudioFormat = PCM16) -> None:
        self.fmt = fmt
        self.data: dict[str, bytearray] = {}
        self.ended = threading.Event()

    @property  # type: ignore[override]
    def format(self) -> AudioFormat:
        return self.fmt

    def start(self) -> None: ...
    def close(self) -> None: ...

    def play(self, item_id: str, pcm: bytes) -> None:
        self.data.setdefault(item_id, bytearray()).extend(pcm)

    def end_item(self, item_id: str) -> None:
        self.ended.set()

    def played_ms(self, item_id: str) -> float:
        return 0.0

    def received_ms(self, item_id: str) -> float:
        return self.fmt.ms(len(self.data.get(item_id, b"")))

    def interrupt(self) -> PlaybackCut | None:
        return None

    def current_item(self) -> str | None:
        return None

    def is_playing(self) -> bool:
        return False

    def wait_idle(self, timeout: float) -> bool:
        return True

    def stats(self) -> dict[str, Any]:
        return {}


@pytest.mark.parametrize("device_fmt", [PCM16, PCMU])
def test_output_device_gets_its_own_format(device_fmt: AudioFormat):
    """mu-law deltas reach a PCM16 speaker decoded and resampled (same duration), a mu-law one untouched."""
    t = MockTransport()
    out = _Recorder(device_fmt)
    with Session.connect(transport=t, audio_format="pcmu", audio=AudioIO(output=out, input=None),
                         reconnect=False):
        deltas = [_pcmu_delta("resp_1", "item_1", 800) for _ in range(10)]
        for d in deltas:
            t.push_event(d)
        t.push(type="response.output_audio.done", response_id="resp_1", item_id="item_1", output_index=0,
               content_index=0)
        assert out.ended.wait(UNIT)
        got = bytes(out.data["item_1"])
        sent = b"".join(base64.b64decode(d["delta"]) for d in deltas)
        if device_fmt == PCMU:
            assert got == sent
        else:
            assert len(got) == len(convert(sent, PCMU, PCM16))  # 1000 ms either way
            assert out.received_ms("item_1") == pytest.approx(1000.0)


def test_pcm16_microphone_is_encoded_for_a_pcmu_session():
    """A PCM16 microphone feeding a mu-law session appends mu-law of the same duration."""
    t = MockTransport()
    speech = speech_pcm(400)
    mic = PcmMicrophone(speech, realtime=False, trailing_silence_ms=0, chunk_ms=20)
    with Session.connect(transport=t, audio_format="pcmu", audio=AudioIO(output=None, input=mic),
                         reconnect=False) as s:
        assert mic.finished.wait(UNIT)
        s.send({"type": "test.flush"}).wait_sent(UNIT)
        appended = b"".join(base64.b64decode(e["audio"]) for e in t.sent_of("input_audio_buffer.append"))
    # all of it is mu-law at 8 bytes per ms; the resampler holds back its filter delay (~35 ms) for the next chunk
    assert 340 * 8 <= len(appended) <= 400 * 8
    back = convert(appended, PCMU, PCM16)
    assert np.abs(np.frombuffer(back, "<i2")).mean() > 1000  # speech, not silence or static
