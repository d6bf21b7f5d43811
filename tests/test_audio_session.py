"""Audio in a session (issue 4): playback, microphones, push-to-talk, VAD modes, and the
truncation and cancel rules of barge-in.

Three layers:

- a scripted transport (the test plays the server, frame by frame) pins the
  barge-in rules exactly: what is cancelled, what is truncated, at how many ms;
- the simulator, with the device-free backends (NullSpeaker, WavSpeaker,
  PcmMicrophone, WavMicrophone): no sound server needed;
- real sounddevice streams on a private PulseAudio null sink (skipped with a
  reason when PulseAudio, PortAudio or espeak-ng is missing).
"""

from __future__ import annotations

import base64
import contextlib
import json
import queue
import shutil
import subprocess
import sys
import threading
import wave
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rtqueue import Session, Simulator
from rtqueue.audio import (
    AudioIO,
    Microphone,
    NullSpeaker,
    PcmMicrophone,
    Speaker,
    WavMicrophone,
    WavSpeaker,
    float_to_pcm16,
    pcm16_to_float,
    resample,
)
from rtqueue.audio_session import AudioLink, Interruption
from rtqueue.errors import AudioUnavailable
from rtqueue.protocol import METADATA_KEY
from rtqueue.sim import synthesize
from rtqueue.testing import MockTransport
from tests.pulse import PulseServer
from tests.utils import UNIT, silence_pcm, speech_pcm

# -- a transport the test drives -------------------------------------------------------------


class ScriptedTransport(MockTransport):
    """rtqueue.testing's mock, plus ``observe(event)`` recorded at the moment each event is sent."""

    def __init__(self, session: dict[str, Any]) -> None:
        super().__init__(session=session)
        self.observe: Callable[[dict[str, Any]], Any] = lambda event: None
        self.observed: list[Any] = []  # observe(event) at the moment each event was sent

    def send(self, text: str) -> None:
        self.observed.append(self.observe(json.loads(text)))
        super().send(text)


def _done_body(rid: str, status: str, reason: str | None = None) -> dict[str, Any]:
    details = None if status == "completed" else {"type": status, "reason": reason}
    return {"object": "realtime.response", "id": rid, "status": status, "status_details": details, "output": [],
            "conversation_id": "conv_1", "metadata": None, "usage": None}


class Script:
    """The server side of a scripted session: responses, items, audio, sync points."""

    def __init__(self, session: Session, transport: ScriptedTransport) -> None:
        self.session = session
        self.t = transport
        self._sync = session.events("test.sync")
        self._syncs = 0

    def sync(self) -> None:
        """Return once the reader has handled every event pushed so far."""
        self._syncs += 1
        self.t.push(type="test.sync", n=self._syncs)
        ev = self._sync.get(timeout=UNIT)
        assert ev is not None and ev["n"] == self._syncs

    def flush(self) -> None:
        """Return once the writer has sent everything queued so far (control events go in order)."""
        self.session.send({"type": "test.flush"}).wait_sent(UNIT)

    def start_response(self, rid: str, *, in_band: bool = True, **params: Any) -> Any:
        """``create_response()`` and answer it with ``response.created`` for ``rid``."""
        handle = self.session.create_response(**({} if in_band else {"conversation": "none"}), **params)
        create = self.t.wait_sent(lambda e: e["type"] == "response.create" and e["event_id"] == handle.event_id)
        body = _done_body(rid, "in_progress")
        body.update(status_details=None, metadata={METADATA_KEY: create["event_id"]},
                    conversation_id="conv_1" if in_band else None)
        self.t.push(type="response.created", response=body)
        return handle

    def add_item(self, item_id: str) -> None:
        """The assistant item enters the conversation (in-band responses only)."""
        self.t.push(type="conversation.item.added", previous_item_id=None,
                    item={"id": item_id, "object": "realtime.item", "type": "message", "status": "in_progress",
                          "role": "assistant", "content": []})

    def audio(self, rid: str, item_id: str, samples: int, *, chunk: int = 1200) -> None:
        """Stream ``samples`` samples of a 300 Hz tone for ``item_id`` in ``chunk``-sample deltas."""
        pcm = float_to_pcm16(0.3 * np.sin(2 * np.pi * 300 * np.arange(samples) / 24000))
        for lo in range(0, len(pcm), 2 * chunk):
            self.t.push(type="response.output_audio.delta", response_id=rid, item_id=item_id, output_index=0,
                        content_index=0, delta=base64.b64encode(pcm[lo : lo + 2 * chunk]).decode())

    def audio_done(self, rid: str, item_id: str) -> None:
        self.t.push(type="response.output_audio.done", response_id=rid, item_id=item_id, output_index=0,
                    content_index=0)

    def done(self, rid: str, status: str = "completed", reason: str | None = None) -> None:
        self.t.push(type="response.done", response=_done_body(rid, status, reason))

    def speech_started(self) -> None:
        self.t.push(type="input_audio_buffer.speech_started", audio_start_ms=0, item_id="item_user")


@contextlib.contextmanager
def scripted(output: Any, *, interrupt_response: bool = True) -> Iterator[Script]:
    """A session on a :class:`ScriptedTransport` with server VAD and an audio output."""
    td = {"type": "server_vad", "create_response": False, "interrupt_response": interrupt_response}
    transport = ScriptedTransport({"audio": {"input": {"turn_detection": td}}})
    with Session.connect(transport=transport, audio=AudioIO(output=output, input=None), name="scripted",
                         reconnect=False) as session:
        yield Script(session, transport)


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run ``fn`` in a started thread; its result lands in the returned list."""
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(fn()), name="test-interrupt", daemon=True)
    t.start()
    return t, out


# -- barge-in rules, exactly ------------------------------------------------------------------


def test_truncate_is_played_ms_clamped_to_received_and_follows_the_cancel():
    """App interrupt: response.cancel by id, then truncate at floor(played) = floor(received) when all was played."""
    spk = NullSpeaker(realtime=False)  # plays each chunk the moment it arrives: played == received
    with scripted(spk) as s:
        handle = s.start_response("resp_1")
        s.add_item("item_1")
        s.audio("resp_1", "item_1", 24_012)  # 1000.5 ms
        s.sync()
        it = s.session.interrupt(timeout=UNIT)
        assert isinstance(it, Interruption)
        assert (it.item_id, it.played_ms, it.received_ms, it.truncated_ms) == ("item_1", 1000.5, 1000.5, 1000)
        assert it.cancel_sent and it.response_id == "resp_1" and it.source == "app"
        assert it.cancelled is not None and it.cancelled.status == "cancelled"
        assert handle.wait(UNIT).status == "cancelled"
        s.flush()
        assert s.t.sent_of("response.cancel", "conversation.item.truncate") == [
            {"type": "response.cancel", "response_id": "resp_1"},
            {"type": "conversation.item.truncate", "item_id": "item_1", "content_index": 0, "audio_end_ms": 1000},
        ]


def test_nothing_played_means_no_truncate():
    """Interrupting before any audio arrived cancels the response but sends no truncate (0 ms)."""
    with scripted(NullSpeaker()) as s:
        s.start_response("resp_1")
        s.add_item("item_1")
        s.sync()
        it = s.session.interrupt(timeout=UNIT)
        assert it.item_id is None and it.truncated_ms is None and it.cancel_sent
        s.flush()
        assert s.t.sent_of("response.cancel", "conversation.item.truncate") == [
            {"type": "response.cancel", "response_id": "resp_1"}
        ]


def test_out_of_band_audio_is_stopped_but_never_truncated_or_cancelled():
    """An out-of-band response's item is not in the conversation: stop it locally, send nothing."""
    spk = NullSpeaker(realtime=False)
    with scripted(spk) as s:
        handle = s.start_response("resp_oob", in_band=False)
        s.audio("resp_oob", "item_oob", 4800)
        s.sync()
        it = s.session.interrupt(timeout=UNIT)
        assert it.item_id == "item_oob" and it.played_ms == 200.0
        assert it.truncated_ms is None and not it.cancel_sent
        s.flush()
        assert s.t.sent_of("response.cancel", "conversation.item.truncate") == []
        s.done("resp_oob")
        assert handle.wait(UNIT).status == "completed"


def test_server_vad_cancels_itself_so_nobody_else_cancels():
    """speech_started with interrupt_response on: truncate only; a following interrupt() sends no cancel either."""
    spk = NullSpeaker(realtime=False)
    with scripted(spk, interrupt_response=True) as s:
        s.start_response("resp_1")
        s.add_item("item_1")
        s.audio("resp_1", "item_1", 12_000)
        s.speech_started()
        s.sync()
        s.flush()
        assert s.t.sent_of("response.cancel", "conversation.item.truncate") == [
            {"type": "conversation.item.truncate", "item_id": "item_1", "content_index": 0, "audio_end_ms": 500}
        ]
        link: AudioLink = s.session.audio
        assert link.last_interruption is not None and link.last_interruption.source == "server_vad"
        # The app interrupts too, before the server's cancelled response.done is in.
        thread, out = in_thread(lambda: s.session.interrupt(timeout=UNIT))
        s.done("resp_1", "cancelled", "turn_detected")
        thread.join(UNIT)
        it = out[0]
        assert not it.cancel_sent and it.truncated_ms is None
        assert it.cancelled is not None and it.cancelled.status_details["reason"] == "turn_detected"
        s.flush()
        assert s.t.sent_of("response.cancel") == []


def test_server_vad_without_interrupt_response_client_cancels_once():
    """interrupt_response off: speech_started makes the client cancel (once) and truncate."""
    spk = NullSpeaker(realtime=False)
    with scripted(spk, interrupt_response=False) as s:
        s.t.auto_cancel = False  # keep the response active while interrupt() runs
        s.start_response("resp_1")
        s.add_item("item_1")
        s.audio("resp_1", "item_1", 7200)
        s.speech_started()
        s.sync()
        s.flush()
        assert s.t.sent_of("response.cancel", "conversation.item.truncate") == [
            {"type": "response.cancel", "response_id": "resp_1"},
            {"type": "conversation.item.truncate", "item_id": "item_1", "content_index": 0, "audio_end_ms": 300},
        ]
        thread, out = in_thread(lambda: s.session.interrupt(timeout=UNIT))
        s.done("resp_1", "cancelled", "client_cancelled")
        thread.join(UNIT)
        assert not out[0].cancel_sent and out[0].cancelled.status == "cancelled"
        s.flush()
        assert len(s.t.sent_of("response.cancel")) == 1


def test_interrupt_after_generation_finished_truncates_without_cancel():
    """response.done in, playback still going: no cancel (nothing active), truncate at the played position."""
    spk = NullSpeaker()  # real-time clock: 2 s of audio is still playing after response.done
    with scripted(spk) as s:
        handle = s.start_response("resp_1")
        s.add_item("item_1")
        s.audio("resp_1", "item_1", 48_000)
        s.audio_done("resp_1", "item_1")
        s.done("resp_1")
        s.sync()
        assert handle.wait(UNIT).status == "completed"
        assert spk.is_playing()
        threading.Event().wait(0.1)  # let some of it play (not synchronisation)
        it = s.session.interrupt(timeout=UNIT)
        assert not it.cancel_sent and it.cancelled is None
        assert it.item_id == "item_1" and 0 < it.truncated_ms < 2000
        assert it.truncated_ms == int(it.played_ms)
        assert not spk.is_playing()
        s.flush()
        assert s.t.sent_of("response.cancel", "conversation.item.truncate") == [
            {"type": "conversation.item.truncate", "item_id": "item_1", "content_index": 0,
             "audio_end_ms": it.truncated_ms}
        ]


def test_audio_arriving_after_the_cancel_is_not_played():
    """Deltas of a response being cancelled, even for a new item, never reach the speaker."""
    spk = NullSpeaker(realtime=False)
    with scripted(spk) as s:
        s.t.auto_cancel = False
        s.start_response("resp_1")
        s.add_item("item_1")
        s.audio("resp_1", "item_1", 2400)
        s.sync()
        thread, out = in_thread(lambda: s.session.interrupt(timeout=UNIT))
        s.t.wait_sent(lambda e: e["type"] == "response.cancel")
        s.audio("resp_1", "item_1", 2400)  # in flight when the server got the cancel
        s.add_item("item_2")
        s.audio("resp_1", "item_2", 2400)
        s.done("resp_1", "cancelled", "client_cancelled")
        thread.join(UNIT)
        assert out[0].truncated_ms == 100
        assert spk.received_ms("item_1") == 100.0 and spk.received_ms("item_2") == 0.0
        assert s.session.audio.dropped_after_cancel_ms == 200.0


def test_interrupt_with_nothing_playing_or_active_sends_nothing():
    """interrupt() when idle: no cancel, no truncate, returns at once."""
    with scripted(NullSpeaker()) as s:
        it = s.session.interrupt(timeout=UNIT)
        assert it == Interruption(None, 0.0, 0.0, None, None, "app")
        s.flush()
        assert s.t.sent_of("response.cancel", "conversation.item.truncate") == []


def test_cancel_overtaken_by_done_while_a_create_is_held_is_not_sent():
    """Interrupt while a create waits in the gate and the response ends meanwhile: no cancel for a done response."""
    stale = []
    for _ in range(10):
        with scripted(NullSpeaker(realtime=False)) as s:
            s.t.auto_cancel = False
            gate = s.session.gate
            # At each send: is resp_1 still in flight as far as the client knows?
            s.t.observe = lambda ev, gate=gate: gate.active_response_id() == "resp_1"
            s.start_response("resp_1")
            s.add_item("item_1")
            s.audio("resp_1", "item_1", 2400)
            held = s.session.create_response()  # waits in the gate behind resp_1
            s.sync()
            thread, out = in_thread(lambda s=s: s.session.interrupt(timeout=UNIT))
            s.done("resp_1")  # the server finished resp_1 before it read our cancel
            thread.join(UNIT)
            s.t.wait_sent(lambda e, held=held: e["type"] == "response.create" and e["event_id"] == held.event_id)
            s.flush()
            sent = zip(s.t.sent, s.t.observed, strict=True)
            stale += [e for e, live in sent if e["type"] == "response.cancel" and not live]
            assert out[0].truncated_ms == 100 and s.t.sent_of("conversation.item.truncate")
    assert stale == []


# -- the simulator, no sound server ----------------------------------------------------------


def test_null_audio_plays_in_real_time(sim: Simulator):
    """audio="null": assistant audio is 'played' by NullSpeaker at 24 kHz of wall time, all of it."""
    with Session.connect(url=sim.url, audio="null", turn_detection="push_to_talk") as session:
        link: AudioLink = session.audio
        spk = link.io.output
        assert isinstance(spk, NullSpeaker)
        response = session.ask("Say hi [len: 2]", timeout=UNIT)
        item = response.output[0]["id"]
        assert spk.received_ms(item) == response.audio_ms > 0
        assert spk.wait_idle(UNIT)
        assert spk.played_ms(item) == response.audio_ms
    assert sim.stats()["errors"] == {}


def test_wav_speaker_records_exactly_the_received_audio(sim: Simulator, tmp_path: Path):
    """WavSpeaker writes the assistant's audio: same duration and same samples as the server sent."""
    path = tmp_path / "assistant.wav"
    spk = WavSpeaker(path, realtime=False)
    with Session.connect(url=sim.url, audio=AudioIO(output=spk, input=None), turn_detection=None) as session:
        response = session.ask("Tell me something [len: 7]", timeout=UNIT)
        assert spk.wait_idle(UNIT)
    sent = b"".join(base64.b64decode(e["delta"]) for e in sim.server_events(0)
                    if e["type"] == "response.output_audio.delta")
    with wave.open(str(path), "rb") as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24000, 1, 2)
        frames = w.readframes(w.getnframes())
        duration_ms = w.getnframes() / 24.0
    print(f"\nWAV {duration_ms:.1f} ms, received {response.audio_ms:.1f} ms")
    assert duration_ms == response.audio_ms == len(sent) / 48.0
    assert frames == sent


def test_wav_microphone_question_gets_an_answer(tmp_path: Path):
    """A recorded question (16 kHz WAV) fed by WavMicrophone: server VAD hears it, a response follows."""
    question = pcm16_to_float(synthesize("where is my order please", voice="echo", seed=3).pcm)
    path = tmp_path / "question.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(float_to_pcm16(resample(question, 24000, 16000)))
    mic = WavMicrophone(path, speed=4.0, trailing_silence_ms=800)
    with Simulator(speed=8.0, seed=4) as sim, Session.connect(
        url=sim.url, audio=AudioIO(output=NullSpeaker(realtime=False), input=mic), turn_detection="server_vad"
    ) as session:
        events = session.events("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                                "response.done")
        types = []
        while "response.done" not in types:
            ev = events.get(timeout=UNIT)
            assert ev is not None, types
            types.append(ev.type)
            if ev.type == "response.done":
                assert ev["response"]["status"] == "completed"
        assert mic.finished.wait(UNIT)
        user = [i for i in session.items if i.get("role") == "user"]
    assert types == ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped", "response.done"]
    assert len(user) == 1 and user[0]["content"][0]["type"] == "input_audio"
    assert sim.stats()["vad_speech_started"] == 1 and sim.stats()["errors"] == {}


def test_push_to_talk_commit_then_create(sim: Simulator):
    """turn_detection="push_to_talk": no server VAD; append, commit(), create_response() answers."""
    with Session.connect(url=sim.url, audio=AudioIO(output=NullSpeaker(realtime=False), input=None),
                         turn_detection="push_to_talk") as session:
        assert session.session_config["audio"]["input"]["turn_detection"] is None
        for _ in range(10):
            assert session.append_audio(speech_pcm(60))
        session.commit().wait_sent(UNIT)
        response = session.create_response().wait(UNIT)
        assert response.status == "completed" and response.audio_ms > 0
        assert [i["role"] for i in session.items if i.get("type") == "message"] == ["user", "assistant"]
    types = [e["type"] for e in sim.client_events(0)]
    assert types[-12:] == ["input_audio_buffer.append"] * 10 + ["input_audio_buffer.commit", "response.create"]
    stats = sim.stats()
    assert stats["vad_speech_started"] == 0 and stats["errors"] == {}


def test_semantic_vad_is_accepted_and_answers_speech():
    """turn_detection="semantic_vad" configures the server; speech then silence gets an answer."""
    with Simulator(speed=8.0, seed=5) as sim, Session.connect(
        url=sim.url, audio=AudioIO(output=NullSpeaker(realtime=False), input=None), turn_detection="semantic_vad"
    ) as session:
        td = session.session_config["audio"]["input"]["turn_detection"]
        assert td["type"] == "semantic_vad" and td["interrupt_response"] is True and td["create_response"] is True
        done = session.events("response.done")
        session.append_audio(silence_pcm(200) + speech_pcm(700) + silence_pcm(1200))
        ev = done.get(timeout=UNIT)
        assert ev is not None and ev["response"]["status"] == "completed"
    assert sim.stats()["vad_speech_started"] == 1 and sim.stats()["errors"] == {}


def test_mic_audio_keeps_flowing_while_a_create_is_held():
    """While a response.create waits behind an active response, mic appends still reach the server."""
    mic = PcmMicrophone(speech_pcm(500), loop=True, chunk_ms=20, trailing_silence_ms=0)
    with Simulator(speed=2.0, seed=6) as sim, Session.connect(
        url=sim.url, audio=AudioIO(output=NullSpeaker(realtime=False), input=mic), turn_detection="push_to_talk"
    ) as session:
        created = session.events("response.created")
        session.send_text("Tell me a long story [len: 16]")
        first = session.create_response()
        assert created.get(timeout=UNIT) is not None  # the first response is active now
        marker = session.send({"type": "session.update", "session": {"type": "realtime"}})
        held = session.create_response()  # queued right behind the marker; held by the gate
        assert first.wait(UNIT).status == "completed"
        assert held.wait(UNIT).status == "completed"
        while_held = session.writer.audio_sent_while_held
        mic.close()
    events = sim.client_events(0)
    ids = [e.get("event_id") for e in events]
    queued_at, sent_at = ids.index(marker.event_id), ids.index(held.event_id)
    appends = sum(1 for e in events[queued_at:sent_at] if e["type"] == "input_audio_buffer.append")
    first_done = next(i for i, e in enumerate(sim.server_events(0))
                      if e["type"] == "response.done" and e["response"]["id"] == first.response_id)
    print(f"\n{appends} mic chunks ({appends * 20} ms) reached the server while the create was held; "
          f"writer counted {while_held}")
    assert appends >= 10 and while_held >= 10
    assert sent_at > queued_at + appends  # the create went out after all of them
    assert first_done >= 0 and sim.stats()["conflicts"] == 0


def test_interrupt_without_audio_is_a_cancel():
    """A session without audio: interrupt() cancels the active response (and only then)."""
    with Simulator(speed=1.0, seed=2) as paced, Session.connect(url=paced.url) as session:
        assert session.interrupt(timeout=UNIT).cancelled is None
        started = session.events("response.output_audio.delta")
        session.create_response(instructions="[len: 40]")
        assert started.get(timeout=UNIT) is not None
        it = session.interrupt(timeout=UNIT)
        assert it.cancel_sent and it.cancelled is not None and it.cancelled.status == "cancelled"
        assert it.truncated_ms is None
    assert paced.stats()["cancel_not_active"] == 0


def test_audio_true_without_portaudio_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, sim: Simulator):
    """audio=True on a machine without PortAudio raises AudioUnavailable naming it, before connecting."""
    from rtqueue.audio import _backend

    def no_portaudio(name: str) -> Any:
        raise OSError("PortAudio library not found")

    monkeypatch.setattr(_backend, "_import_module", no_portaudio)
    with pytest.raises(AudioUnavailable, match="PortAudio"):
        Session.connect(url=sim.url, audio=True)
    assert sim.stats()["sessions"] == 0


def _load_example(name: str) -> Any:
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_voice_chat_without_portaudio_says_what_to_install(monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]):
    """examples/voice_chat.py on a machine without PortAudio exits with code 2 and an install hint."""
    from rtqueue.audio import _backend

    def no_portaudio(name: str) -> Any:
        raise OSError("cannot load library 'libportaudio.so.2'")

    monkeypatch.setattr(_backend, "_import_module", no_portaudio)
    assert _load_example("voice_chat").main([]) == 2
    err = capsys.readouterr().err
    assert "audio unavailable" in err and "apt-get install libportaudio2" in err


# -- real devices on a PulseAudio null sink -------------------------------------------------------


def test_speaker_plays_the_session_audio(pulse: PulseServer):
    """Speaker in a session plays the simulator's audio: the monitor hears the same energy and duration."""
    from tests.test_audio_pulse import Recorder

    spk = Speaker()
    with Simulator(speed=1.0, seed=2) as sim, Recorder() as rec, Session.connect(
        url=sim.url, audio=AudioIO(output=spk, input=None), turn_detection="push_to_talk"
    ) as session:
        start = rec.frames
        response = session.ask("Say something nice [len: 8]", timeout=UNIT)
        assert spk.wait_idle(UNIT)
        assert rec.wait_frames(rec.frames + rec.rate // 4)  # the tail reaches the monitor
        heard = resample(rec.samples(start), rec.rate, 24000)
        item = response.output[0]["id"]
        stats = spk.stats()
        received_ms = spk.received_ms(item)
    sent = pcm16_to_float(b"".join(base64.b64decode(e["delta"]) for e in sim.server_events(0)
                                   if e["type"] == "response.output_audio.delta"))

    def span_ms(x: np.ndarray) -> float:
        idx = np.flatnonzero(np.abs(x) > 0.01)
        return (idx[-1] - idx[0] + 1) / 24.0

    def energy(x: np.ndarray) -> float:
        return float(np.sum(np.square(x, dtype=np.float64)) / 24000)

    print(f"\nreceived {received_ms:.1f} ms; span sent {span_ms(sent):.1f} ms heard {span_ms(heard):.1f} ms; "
          f"energy sent {energy(sent):.5f} heard {energy(heard):.5f}; {stats}")
    assert received_ms == response.audio_ms == len(sent) / 24.0
    assert spk.played_ms(item) == pytest.approx(received_ms)
    assert span_ms(heard) == pytest.approx(span_ms(sent), rel=0.05)
    assert energy(heard) == pytest.approx(energy(sent), rel=0.05)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
def test_microphone_speech_triggers_server_vad_and_a_response(pulse: PulseServer, tmp_path: Path):
    """espeak-ng speech played into the sink reaches the simulator through Microphone: speech_started, a response."""
    if shutil.which("paplay") is None:
        pytest.skip("paplay not installed (pulseaudio-utils)")
    wav = tmp_path / "question.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), "Hello, I would like to return my order"], check=True,
                   timeout=UNIT)
    mic = Microphone(chunk_ms=20)
    with Simulator(speed=4.0, seed=3) as sim, Session.connect(
        url=sim.url, audio=AudioIO(output=None, input=mic), turn_detection="server_vad"
    ) as session:
        events = session.events("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                                "response.done")
        subprocess.run(["paplay", "--latency-msec=20", str(wav)], env=pulse.env, check=True, timeout=UNIT)
        types = []
        while "response.done" not in types:
            ev = events.get(timeout=UNIT)
            assert ev is not None, types
            types.append(ev.type)
        stats = mic.stats()
    print(f"\n{types}; mic {stats}")
    assert types[:2] == ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped"]
    assert sim.stats()["vad_speech_started"] >= 1 and sim.stats()["completed"] >= 1
    assert stats["dropped_ms"] == 0


def test_demo_audio_plays_through_the_speaker(pulse: PulseServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """`rtqueue demo --audio` (run_demo(audio=True)) plays the answers on the default output device."""
    import io

    from rtqueue import demo
    from tests.test_audio_pulse import Recorder

    monkeypatch.setattr(demo, "_BASIC_TURNS", ("Hello there! [len: 5]",))
    out = io.StringIO()
    report = tmp_path / "demo.json"
    with Recorder() as rec:
        start = rec.frames
        code = demo.run_demo(audio=True, scenario="basic", speed=4.0, json_path=str(report), out=out)
        assert rec.wait_frames(rec.frames + rec.rate // 5)
        heard = rec.samples(start)
    summary = json.loads(report.read_text())["summary"]
    loud = np.flatnonzero(np.abs(heard) > 0.01)
    span_ms = (loud[-1] - loud[0] + 1) * 1000.0 / rec.rate if loud.size else 0.0
    print(f"\n{out.getvalue()}\nheard {span_ms:.1f} ms of a {summary['audio_played_ms']} ms answer")
    assert code == 0 and summary["conflicts"] == 0 and summary["server_errors"] == {}
    assert "assistant     : This is the assistant" in out.getvalue()
    assert summary["audio_played_ms"] > 500
    # The answer ends with the silent gap after its last word, which the monitor cannot show.
    assert summary["audio_played_ms"] - 300 <= span_ms <= summary["audio_played_ms"]


def test_voice_chat_runs_on_the_null_sink_and_quits_on_ctrl_c(pulse: PulseServer, tmp_path: Path):
    """examples/voice_chat.py --greet talks through the sink; SIGINT ends it cleanly with code 0."""
    import signal

    root = Path(__file__).resolve().parent.parent
    env = {**pulse.env, "PYTHONPATH": str(root), "PYTHONUNBUFFERED": "1"}
    stderr = tmp_path / "stderr.txt"
    with stderr.open("w") as err_file:
        proc = subprocess.Popen([sys.executable, str(root / "examples" / "voice_chat.py"), "--greet"], env=env,
                                stdout=subprocess.PIPE, stderr=err_file, text=True)
    lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=read, name="test-voice-chat-stdout", daemon=True)
    reader.start()
    seen = []
    try:
        while not any(s.startswith("assistant:") for s in seen):  # the greeting was spoken
            line = lines.get(timeout=UNIT)
            assert line is not None, (seen, stderr.read_text())
            seen.append(line)
        proc.send_signal(signal.SIGINT)
        proc.wait(UNIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(UNIT)
        reader.join(UNIT)
    while (line := lines.get(timeout=UNIT)) is not None:
        seen.append(line)
    err = stderr.read_text()
    print("".join(seen))
    assert seen[0].startswith("connected to the simulator")
    assert proc.returncode == 0 and seen[-1].strip() == "bye", err
    assert "Traceback" not in err


def test_idle_session_writes_mic_audio_on_the_mic_thread():
    """With nothing queued, mic chunks go out on the appending thread (no writer wake-up), in order."""
    chunks = [i.to_bytes(2, "little") * 480 for i in range(40)]
    with Simulator(speed=4.0, seed=3) as sim, Session.connect(url=sim.url, turn_detection=None) as session:
        assert all(session.append_audio(c) for c in chunks)
        assert sim.wait_until(lambda s: sum(e["type"] == "input_audio_buffer.append"
                                            for e in s.client_events(0)) == 40, UNIT)
        stats = session.stats()
        assert stats["audio_sent"] == 40 and stats["audio_dropped"] == 0
        assert stats["audio_direct"] >= 30  # a few may queue behind a control event in flight
    got = [base64.b64decode(e["audio"]) for e in sim.client_events(0) if e["type"] == "input_audio_buffer.append"]
    assert got == chunks
