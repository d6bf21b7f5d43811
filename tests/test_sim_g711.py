"""G.711 in the simulator: formats, speech decoded for VAD and transcripts, output encoded, truncation in ms."""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
import pytest
from websockets.sync.client import connect

from rtqueue.formats import PCM16, PCMA, PCMU, AudioFormat, convert
from rtqueue.sim import Simulator
from rtqueue.sim.replay import _fill_audio
from rtqueue.sim.synth import silence, synthesize
from rtqueue.sim.transcribe import Listener, transcribe
from tests.test_sim_core import Driver

TIMEOUT = 10.0
CALLER = "Hello, I would like to check the status of my order please."


def of(events: list[dict[str, Any]], etype: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == etype]


def fmt_update(input_fmt: dict[str, Any] | None = None, output_fmt: dict[str, Any] | None = None,
               **extra: Any) -> dict[str, Any]:
    """A ``session.update`` setting the given formats (and any other session fields)."""
    audio: dict[str, Any] = {}
    if input_fmt is not None:
        audio["input"] = {"format": input_fmt}
    if output_fmt is not None:
        audio["output"] = {"format": output_fmt}
    session: dict[str, Any] = {"type": "realtime", **extra}
    if audio:
        session["audio"] = audio
    return {"type": "session.update", "session": session}


def caller_audio(text: str, fmt: AudioFormat, *, lead_ms: float = 301.3, tail_ms: float = 700) -> bytes:
    """Synthesized speech with silence around it, encoded in ``fmt`` (an odd lead puts it off the 8 kHz grid)."""
    return convert(silence(lead_ms) + synthesize(text).pcm + silence(tail_ms), PCM16, fmt)


def append_all(d: Driver, audio: bytes, fmt: AudioFormat, chunk_ms: int = 20) -> list[dict[str, Any]]:
    """Send ``audio`` in ``chunk_ms`` appends, advancing the clock in real time; return the events."""
    out: list[dict[str, Any]] = []
    step = fmt.nbytes(chunk_ms)
    for i in range(0, len(audio), step):
        out += d.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(audio[i : i + step]).decode()})
        out += d.at(d.t + chunk_ms / 1000)
    return out


def audio_by_item(events: list[dict[str, Any]]) -> dict[str, bytes]:
    """The decoded ``response.output_audio.delta`` payloads joined per item."""
    out: dict[str, bytes] = {}
    for ev in of(events, "response.output_audio.delta"):
        out[ev["item_id"]] = out.get(ev["item_id"], b"") + base64.b64decode(ev["delta"])
    return out


def similarity(a: bytes, b: bytes) -> tuple[float, float]:
    """(normalised correlation, RMS ratio) of two PCM16 buffers over their common length."""
    x = np.frombuffer(a, "<i2").astype(np.float64)
    y = np.frombuffer(b, "<i2").astype(np.float64)
    n = min(x.size, y.size)
    x, y = x[:n], y[:n]
    corr = float(np.dot(x, y) / np.sqrt(np.dot(x, x) * np.dot(y, y)))
    return corr, float(np.sqrt(np.mean(x * x)) / np.sqrt(np.mean(y * y)))


def assert_speech_of(item_audio: bytes, fmt: AudioFormat, transcript: str, d: Driver) -> None:
    """``item_audio`` (in ``fmt``) is the synthesis of ``transcript``, not static, and as long."""
    reference = synthesize(transcript, seed=d.s.seed, words_per_second=d.s.words_per_second)
    decoded = convert(item_audio, fmt, PCM16)
    assert abs(fmt.ms(len(item_audio)) - reference.duration_ms) <= 1
    corr, ratio = similarity(decoded, reference.pcm)
    assert corr > 0.99 and 0.9 < ratio < 1.1, (corr, ratio)


# ------------------------------------------------------------------ formats


@pytest.mark.parametrize("kind", ["audio/pcmu", "audio/pcma"])
def test_g711_formats_are_accepted_per_direction(kind: str) -> None:
    """A G.711 format is taken for input and output alike and shown as the GA object (no rate)."""
    d = Driver(speed=None)
    updated = of(d.send(fmt_update({"type": kind}, {"type": kind})), "session.updated")
    audio = updated[0]["session"]["audio"]
    assert audio["input"]["format"] == {"type": kind} and audio["output"]["format"] == {"type": kind}
    # Per direction: input back to PCM16 leaves the output G.711.
    audio = of(d.send(fmt_update({"type": "audio/pcm", "rate": 24000})), "session.updated")[0]["session"]["audio"]
    assert audio["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
    assert audio["output"]["format"] == {"type": kind}


def test_invalid_formats_are_refused_with_the_real_errors_and_change_nothing() -> None:
    """Unknown type: invalid_value listing the three; PCM below 24 kHz: integer_below_min_value; G.711 rate: unknown."""
    d = Driver(speed=None)
    before = d.s.session
    err = of(d.send(fmt_update({"type": "audio/opus"})), "error")[0]["error"]
    assert err["code"] == "invalid_value" and err["param"] == "session.audio.input.format.type"
    assert err["message"] == (
        "Invalid value: 'audio/opus'. Supported values are: 'audio/pcm', 'audio/pcmu', 'audio/pcma'."
    )
    err = of(d.send(fmt_update(None, {"type": "audio/pcm", "rate": 8000})), "error")[0]["error"]
    assert err["code"] == "integer_below_min_value" and err["param"] == "session.audio.output.format.rate"
    err = of(d.send(fmt_update({"type": "audio/pcmu", "rate": 8000})), "error")[0]["error"]
    assert err["code"] == "unknown_parameter" and err["param"] == "session.audio.input.format.rate"
    err = of(d.send(fmt_update(None, "audio/pcmu", instructions="x")), "error")[0]["error"]  # type: ignore[arg-type]
    assert err["code"] == "invalid_type" and err["param"] == "session.audio.output.format"
    assert d.s.session == before


# ------------------------------------------------------------------ input


@pytest.mark.parametrize("fmt", [PCMU, PCMA], ids=["pcmu", "pcma"])
def test_g711_speech_in_gives_vad_turn_at_the_real_ms_and_its_transcript(fmt: AudioFormat) -> None:
    """G.711 caller speech: speech_started/stopped at the ms PCM16 gives, a real-length item, the text."""
    reference = Driver(speed=None)
    ref_events = append_all(reference, caller_audio(CALLER, PCM16), PCM16)
    d = Driver(speed=None)
    d.send(fmt_update(audio={
        "input": {"format": fmt.to_config(), "transcription": {"model": "gpt-4o-transcribe"}},
        "output": {"format": fmt.to_config()}}))
    events = append_all(d, caller_audio(CALLER, fmt), fmt)
    events += d.run_out()
    started, stopped = of(events, "input_audio_buffer.speech_started"), of(events, "input_audio_buffer.speech_stopped")
    ref_started = of(ref_events, "input_audio_buffer.speech_started")
    ref_stopped = of(ref_events, "input_audio_buffer.speech_stopped")
    assert len(started) == len(stopped) == len(ref_started) == 1
    # The G.711 round trip moves a 10 ms VAD frame at most.
    assert abs(started[0]["audio_start_ms"] - ref_started[0]["audio_start_ms"]) <= 10
    assert abs(stopped[0]["audio_end_ms"] - ref_stopped[0]["audio_end_ms"]) <= 10
    done = of(events, "conversation.item.input_audio_transcription.completed")
    assert [e["transcript"] for e in done] == [CALLER]
    assert of(events, "response.created")  # server VAD answered the turn
    assert d.s.stats()["audio_bytes_in"] == {fmt.type: len(caller_audio(CALLER, fmt))}


def test_manual_commit_of_g711_audio_counts_real_ms_and_hears_the_text() -> None:
    """Without VAD, a commit's item lasts the audio's real ms; too little audio is refused in real ms."""
    d = Driver(speed=None)
    d.send(fmt_update(audio={"input": {"format": {"type": "audio/pcmu"}, "turn_detection": None,
                                       "transcription": {"model": "whisper-1"}}}))
    d.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"\xff" * 640).decode()})  # 80 ms
    err = of(d.send({"type": "input_audio_buffer.commit"}), "error")[0]["error"]
    assert err["code"] == "input_audio_buffer_commit_empty" and "only has 80.00ms" in err["message"]
    d.send({"type": "input_audio_buffer.clear"})
    audio = caller_audio("Can you transfer me to a human", PCMU, lead_ms=100, tail_ms=100)
    append_all(d, audio, PCMU)
    events = d.send({"type": "input_audio_buffer.commit"}) + d.run_out()
    done = of(events, "conversation.item.input_audio_transcription.completed")
    assert done[0]["transcript"] == "Can you transfer me to a human"
    assert done[0]["usage"] == {"type": "duration", "seconds": (len(audio) // 8) / 1000}


def test_an_item_with_g711_input_audio_lasts_its_real_ms_and_is_heard() -> None:
    """conversation.item.create with pcmu input_audio: the model hears the text; the duration is in 8 kHz bytes."""
    d = Driver(speed=None)
    d.send(fmt_update({"type": "audio/pcmu"}))
    audio = caller_audio("what is the weather in Paris", PCMU, lead_ms=0, tail_ms=50)
    d.send({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [
        {"type": "input_audio", "audio": base64.b64encode(audio).decode()}]}})
    item_id = d.log[-1]["item"]["id"]
    assert d.s._user_audio_ms[item_id] == len(audio) // 8
    assert d.s._heard[item_id] == "what is the weather in Paris"


def test_near_matching_hears_g711_speech_but_not_other_audio() -> None:
    """The transcriber's near match finds codec'd synthesized speech; a listener without near does not."""
    audio = caller_audio(CALLER, PCMA)
    decoded = convert(audio, PCMA, PCM16)
    assert transcribe(decoded) is None
    assert transcribe(decoded, near=True) == CALLER
    near, exact = Listener(near=True), Listener()
    for i in range(0, len(decoded), 962):  # odd-sized chunks: shape frames straddle them
        near.feed(decoded[i : i + 962], i // 2)
        exact.feed(decoded[i : i + 962], i // 2)
    assert near.take() == CALLER and exact.take() is None
    assert transcribe(convert(convert(synthesize("a sentence never registered").pcm[:1000], PCM16, PCMU),
                              PCMU, PCM16), near=True) is None


# ------------------------------------------------------------------ output


def test_pcmu_output_deltas_are_mulaw_speech_of_the_right_length() -> None:
    """Every delta is 50 ms of mu-law (the last the rest); decoded, it is the synthesized transcript."""
    d = Driver(speed=None)
    d.send(fmt_update(None, {"type": "audio/pcmu"}))
    d.user("tell me about your opening hours please")
    events = d.send({"type": "response.create"}) + d.run_out()
    created = of(events, "response.created")[0]["response"]
    assert created["audio"]["output"]["format"] == {"type": "audio/pcmu"}
    audio = audio_by_item(events)
    assert audio
    for done in of(events, "response.output_audio_transcript.done"):
        sizes = [len(base64.b64decode(e["delta"])) for e in of(events, "response.output_audio.delta")
                 if e["item_id"] == done["item_id"]]
        assert all(n == PCMU.nbytes(d.s.audio_chunk_ms) for n in sizes[:-1]) and sizes[-1] <= 8 * 60
        assert_speech_of(audio[done["item_id"]], PCMU, done["transcript"], d)
    stats = d.s.stats()
    assert stats["audio_bytes_out"] == {"audio/pcmu": sum(len(a) for a in audio.values())}


def test_truncating_a_g711_item_checks_its_ms_with_the_real_error() -> None:
    """Past the pcmu item's length: 'Audio content of Xms is already shorter than Yms'; within it: truncated."""
    d = Driver(speed=None)
    d.send(fmt_update(None, {"type": "audio/pcma"}))
    d.user("hello")
    events = d.send({"type": "response.create"}) + d.run_out()
    item_id, audio = next(iter(audio_by_item(events).items()))
    length = len(audio) // 8
    err = of(d.send({"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0,
                     "audio_end_ms": length + 1}), "error")[0]["error"]
    assert err["code"] == "invalid_value" and err["param"] == "audio_end_ms"
    assert err["message"] == f"Audio content of {length}ms is already shorter than {length + 1}ms"
    ok = d.send({"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0,
                 "audio_end_ms": length})
    assert of(ok, "conversation.item.truncated")[0]["audio_end_ms"] == length


def test_truncating_mid_stream_is_checked_against_the_g711_bytes_sent() -> None:
    """While a pcmu response streams, what was sent so far (in 8 kHz bytes) is the limit."""
    d = Driver(speed=1.0)
    d.send(fmt_update(None, {"type": "audio/pcmu"}))
    d.user("tell me a long story [len: 40]")
    events = d.send({"type": "response.create"}) + d.at(1.0)
    item_id, audio = next(iter(audio_by_item(events).items()))
    sent_ms = len(audio) // 8
    assert 0 < sent_ms < 2000
    err = of(d.send({"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0,
                     "audio_end_ms": sent_ms + 60}), "error")[0]["error"]
    assert err["message"] == f"Audio content of {sent_ms}ms is already shorter than {sent_ms + 60}ms"
    d.send({"type": "response.cancel"})


def test_a_handoff_update_without_format_keeps_pcmu_output() -> None:
    """An agent handoff (instructions, tools, voice only) keeps the G.711 format: the next answer is mu-law speech."""
    d = Driver(speed=None)
    d.send(fmt_update({"type": "audio/pcmu"}, {"type": "audio/pcmu"}))
    tool = {"type": "function", "name": "lookup_order", "description": "Look up an order"}
    updated = of(d.send({"type": "session.update", "session": {
        "type": "realtime", "instructions": "You are the billing agent.", "tools": [tool],
        "audio": {"output": {"voice": "cedar"}}}}), "session.updated")[0]["session"]
    assert updated["audio"]["output"] == {"format": {"type": "audio/pcmu"}, "voice": "cedar", "speed": 1.0}
    assert updated["audio"]["input"]["format"] == {"type": "audio/pcmu"}
    d.user("hello there")
    events = d.send({"type": "response.create"}) + d.run_out()
    done = of(events, "response.done")[0]["response"]
    assert done["audio"]["output"]["format"] == {"type": "audio/pcmu"}
    transcript = of(events, "response.output_audio_transcript.done")[0]
    audio = audio_by_item(events)[transcript["item_id"]]
    reference = synthesize(transcript["transcript"], voice="cedar", seed=d.s.seed)
    corr, ratio = similarity(convert(audio, PCMU, PCM16), reference.pcm)
    assert corr > 0.99 and 0.9 < ratio < 1.1
    assert set(d.s.stats()["audio_bytes_out"]) == {"audio/pcmu"}


def test_each_response_keeps_the_output_format_it_started_with() -> None:
    """A format change during a response applies from the next one; each says its format."""
    d = Driver(speed=1.0)
    d.send(fmt_update(None, {"type": "audio/pcmu"}))
    d.user("tell me a story [len: 30]")
    first = d.send({"type": "response.create"}) + d.at(0.5)
    d.send(fmt_update(None, {"type": "audio/pcm", "rate": 24000}))
    first += d.run_out()
    d.user("and another one [len: 5]")
    second = d.send({"type": "response.create"}) + d.run_out()
    assert of(first, "response.done")[0]["response"]["audio"]["output"]["format"] == {"type": "audio/pcmu"}
    assert of(second, "response.done")[0]["response"]["audio"]["output"]["format"] == {
        "type": "audio/pcm", "rate": 24000}
    a1 = next(iter(audio_by_item(first).values()))
    t1 = of(first, "response.output_audio_transcript.done")[0]["transcript"]
    assert_speech_of(a1, PCMU, t1, d)
    a2 = next(iter(audio_by_item(second).values()))
    t2 = of(second, "response.output_audio_transcript.done")[0]["transcript"]
    assert a2 == synthesize(t2).pcm  # PCM16 passes through byte for byte
    stats = d.s.stats()["audio_bytes_out"]
    assert stats == {"audio/pcmu": len(a1), "audio/pcm": len(a2)}


def test_a_response_can_ask_for_its_own_output_format() -> None:
    """response.create with audio.output.format streams that format, the session's stays."""
    d = Driver(speed=None)
    d.user("hi")
    events = d.send({"type": "response.create", "response": {
        "audio": {"output": {"format": {"type": "audio/pcma"}}}}}) + d.run_out()
    assert of(events, "response.created")[0]["response"]["audio"]["output"]["format"] == {"type": "audio/pcma"}
    assert set(d.s.stats()["audio_bytes_out"]) == {"audio/pcma"}
    assert d.s.session["audio"]["output"]["format"] == {"type": "audio/pcm", "rate": 24000}


def test_replay_fills_g711_durations_with_g711_silence() -> None:
    """A recording kept as durations replays as silence of the session's format (not PCM zeros = loud static)."""
    ev = {"type": "response.output_audio.delta", "delta": None, "rtq_audio_ms": 20}
    assert base64.b64decode(_fill_audio(dict(ev), PCMU)["delta"]) == b"\xff" * 160
    assert base64.b64decode(_fill_audio(dict(ev), PCMA)["delta"]) == b"\xd5" * 160
    assert base64.b64decode(_fill_audio(dict(ev), PCM16)["delta"]) == b"\0" * 960


# ------------------------------------------------------------------ over a socket


def test_a_g711_call_over_a_socket_keeps_its_format_through_a_handoff() -> None:
    """Over loopback: pcmu caller speech -> VAD turn with transcript -> mu-law answer; a handoff keeps pcmu."""
    with Simulator(speed=None, seed=3) as sim, connect(sim.url) as ws:

        def until(etype: str) -> list[dict[str, Any]]:
            out = []
            while True:
                out.append(json.loads(ws.recv(timeout=TIMEOUT)))
                if out[-1]["type"] == etype:
                    return out

        until("session.created")
        ws.send(json.dumps(fmt_update(audio={
            "input": {"format": {"type": "audio/pcmu"}, "transcription": {"model": "whisper-1"}},
            "output": {"format": {"type": "audio/pcmu"}}})))
        until("session.updated")
        audio = caller_audio(CALLER, PCMU)
        for i in range(0, len(audio), 160):
            ws.send(json.dumps({"type": "input_audio_buffer.append",
                                "audio": base64.b64encode(audio[i : i + 160]).decode()}))
        events = until("response.done")
        assert of(events, "input_audio_buffer.speech_started")
        assert of(events, "response.done")[0]["response"]["audio"]["output"]["format"] == {"type": "audio/pcmu"}
        # The handoff: a new agent's instructions and tools, no audio.output.format.
        ws.send(json.dumps({"type": "session.update", "session": {
            "type": "realtime", "instructions": "You are the returns agent.", "tools": []}}))
        events = until("session.updated")
        assert events[-1]["session"]["audio"]["output"]["format"] == {"type": "audio/pcmu"}
        ws.send(json.dumps({"type": "response.create"}))
        events += until("response.done")
        transcripts = of(events, "response.output_audio_transcript.done")
        audio_out = audio_by_item(events)[transcripts[0]["item_id"]]
        reference = synthesize(transcripts[0]["transcript"], seed=3)
        corr, _ = similarity(convert(audio_out, PCMU, PCM16), reference.pcm)
        assert corr > 0.99
        assert sim.wait_until(lambda s: any(
            e["type"] == "conversation.item.input_audio_transcription.completed" and e["transcript"] == CALLER
            for e in s.server_events()), TIMEOUT)
