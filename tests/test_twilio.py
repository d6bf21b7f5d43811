"""Twilio Media Streams (issue 13): the bridge, end to end over loopback with the simulator and a fake Twilio.

The fake Twilio (:mod:`rtqueue.testing_twilio`) plays the caller: it streams
mu-law in real time (or faster), plays what the bridge sends on a playout
clock, echoes marks once the audio before them was played, honours ``clear``
and records what the caller heard. The simulator speaks ``audio/pcmu``.
"""

from __future__ import annotations

import base64
import json
import threading
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from rtqueue import Session, Simulator
from rtqueue.recording import Recorder, read_recording
from rtqueue.testing_twilio import FakeTwilio
from rtqueue.twilio import (
    DTMF_EVENT,
    TwilioBridge,
    TwilioCall,
    TwilioOutput,
    VoiceWebhook,
    session_factory,
    stream_twiml,
)
from tests.utils import UNIT

#: Server VAD as a phone line uses it; the client (not the server) cancels on speech start.
VAD = {"type": "server_vad", "create_response": True, "interrupt_response": False, "silence_duration_ms": 200}


def appended_audio(sim: Simulator) -> bytes:
    """Every byte of input audio the simulator received, in order."""
    return b"".join(base64.b64decode(ev["audio"]) for ev in sim.client_events()
                    if ev.get("type") == "input_audio_buffer.append")


def test_whole_call_streams_both_ways_untouched_and_stop_closes_the_session():
    """A call: start -> caller speaks -> the agent answers in pcmu -> every mark echoed -> stop closes all."""
    made: list[TwilioCall] = []

    with Simulator(speed=None, seed=1) as sim:
        connect = session_factory(sim.url, instructions="You are the desk. [len: 6]", turn_detection=VAD)

        def factory(call: TwilioCall) -> Session:
            made.append(call)
            return connect(call)

        with TwilioBridge(factory) as bridge, FakeTwilio(bridge.url, speed=4.0) as twilio:
            caller = twilio.call(parameters={"tenant": "acme", "lang": "en"})
            assert bridge.wait_calls(lambda cs: bool(cs) and cs[0].session is not None, UNIT)
            call = made[0]
            assert call.parameters == {"tenant": "acme", "lang": "en"}
            assert call.call_sid == caller.call_sid and call.stream_sid == caller.stream_sid
            session = call.session
            assert session is not None and session.context is call
            assert session.input_format.type == session.output_format.type == "audio/pcmu"
            done = session.events("response.done")

            caller.say("Hello, I would like to check my order please.")
            ev = done.get(timeout=UNIT)
            assert ev is not None and ev["response"]["status"] == "completed"
            item = next(o["id"] for o in ev["response"]["output"] if o["type"] == "message")
            # The caller hears the whole answer; then every mark has come back.
            assert call.output.wait_idle(UNIT)
            assert caller.wait_until(lambda c: c.marks_pending() == 0 and not c.agent_talking(), UNIT)
            stats = call.stats()
            assert stats.marks_sent == stats.marks_echoed > 0 and stats.marks_pending == 0
            sent = b"".join(base64.b64decode(e["delta"]) for e in sim.server_events()
                            if e.get("type") == "response.output_audio.delta" and e["item_id"] == item)
            assert caller.heard_audio(item) == sent  # the model's bytes, untouched, all of them
            assert stats.heard_ms == caller.heard_ms(item) == len(sent) / 8
            assert caller.clears == [] and caller.errors == []

            caller.hangup()
            assert call.wait_ended(UNIT) and session.closed
            # Inbound: the caller's mu-law went to input_audio_buffer.append byte for byte.
            got = appended_audio(sim)
            assert len(got) > 8000 and got == bytes(caller.sent_audio[: len(got)])
            assert bridge.stats().active_calls == 0 and bridge.stats().total_calls == 1
        stats = sim.stats()
        assert stats["conflicts"] == 0 and stats["errors"] == {}


def test_barge_in_clears_first_and_truncates_at_what_the_caller_heard(tmp_path: Path):
    """Two barge-ins: clear before response.cancel, truncate within one 20 ms frame of what was heard."""
    recorders: list[Recorder] = []

    with Simulator(speed=1.0, seed=2) as sim:
        def factory(call: TwilioCall) -> Session:
            rec = Recorder(tmp_path / f"call{call.index}.jsonl", audio="duration")
            recorders.append(rec)
            return Session.connect(sim.url, instructions="You are the desk. [len: 14]", audio=call.audio,
                                   audio_format="pcmu", turn_detection=VAD, record=rec)

        with TwilioBridge(factory) as bridge, FakeTwilio(bridge.url, speed=1.0) as twilio:
            caller = twilio.call()
            assert bridge.wait_calls(lambda cs: bool(cs) and cs[0].session is not None, UNIT)
            call = bridge.calls()[0]
            session = call.session
            assert session is not None
            cuts = session.events("audio.interrupted")
            caller.say("Hello, where is my parcel?", wait=False)
            for n, after_ms in enumerate((600.0, 1100.0)):
                heard_before = caller.heard_ms()
                # Interrupt while the agent talks, once the caller heard after_ms of this answer.
                assert caller.wait_until(lambda c, h=heard_before, a=after_ms: c.heard_ms() - h >= a, 2 * UNIT)
                caller.say("Sorry, stop, stop.", wait=False)
                assert caller.wait_until(lambda c, k=n + 1: len(c.clears) == k, UNIT)
                cut = cuts.get(timeout=UNIT)
                while cut is not None and cut["item_id"] is None:  # speech starting with nothing playing
                    cut = cuts.get(timeout=UNIT)
                assert cut is not None and cut["source"] == "server_vad" and cut["cancel_sent"]
            assert caller.wait_until(lambda c: c.speech_sent == c.speech_queued, UNIT)
            caller.hangup()
            assert call.wait_ended(UNIT)

        truncates = [e for e in sim.client_events() if e.get("type") == "conversation.item.truncate"]
        assert len(truncates) == len(caller.clears) == 2
        errors = []
        for clear, trunc in zip(caller.clears, truncates, strict=True):
            assert trunc["item_id"] == clear.item_id
            errors.append(abs(trunc["audio_end_ms"] - clear.item_heard_ms))
        assert max(errors) <= 20.0, (errors, caller.clears, truncates)
        # Nothing of a cut item reached the line after its clear.
        for clear in caller.clears:
            assert not [name for t, kind, name in caller.events
                        if kind == "mark" and t > clear.at and name and name.startswith(f"{clear.item_id}/")]
        # The clear was on the Twilio socket before the cancel was written to the Realtime one.
        recorders[0].close()
        rec = read_recording(tmp_path / "call1.jsonl")
        cancels = [recorders[0].t0 + f.t for f in rec.frames if f.sender == "client" and f.type == "response.cancel"]
        assert len(cancels) == 2
        for written, cancel in zip(call.output.clear_times, cancels, strict=True):
            assert written < cancel
        stats = sim.stats()
        assert stats["conflicts"] == 0 and stats["truncate_errors"] == 0 and stats["cancel_not_active"] == 0
        assert "invalid_value" not in stats["errors"] and "response_cancel_not_active" not in stats["errors"]
        assert call.stats().barge_ins == 2


def test_dtmf_reaches_the_app_as_an_event():
    """Key presses are published to the call's session as input_audio_buffer.dtmf_event_received, in order,
    including one pressed while the session was still connecting."""
    seen: list[str] = []
    got = threading.Event()

    def on_key(ev: Any) -> None:
        seen.append(ev.event)
        if len(seen) == 4:
            got.set()

    with Simulator(speed=None, seed=3) as sim:
        connect = session_factory(sim.url, turn_detection=VAD)

        def factory(call: TwilioCall) -> Session:
            session = connect(call)
            session.on(DTMF_EVENT, on_key)
            return session

        with TwilioBridge(factory) as bridge, FakeTwilio(bridge.url, speed=4.0) as twilio:
            caller = twilio.call()
            caller.dtmf("9")  # most likely before the session exists
            assert bridge.wait_calls(lambda cs: bool(cs) and cs[0].session is not None, UNIT)
            call = bridge.calls()[0]
            assert call.session is not None
            keys = call.session.events(DTMF_EVENT)
            for digit in "42#":
                caller.dtmf(digit)
            assert got.wait(UNIT)
            assert seen == ["9", "4", "2", "#"] and call.digits == seen
            ev = keys.get(timeout=UNIT)
            assert ev is not None and ev.source == "twilio" and ev.call_sid == caller.call_sid
            caller.hangup()
            assert call.wait_ended(UNIT)


def test_unsigned_handshakes_are_refused():
    """With auth_token, a stream whose handshake does not carry Twilio's signature is refused (403)."""
    token = "twilio-auth-token-0123456789"
    with Simulator(speed=None, seed=5) as sim:
        factory = session_factory(sim.url, turn_detection=VAD)
        with TwilioBridge(factory, auth_token=token) as bridge, FakeTwilio(bridge.url, speed=4.0) as twilio:
            with pytest.raises(Exception, match="403"):
                twilio.call(auth_token="not-the-token")
            with pytest.raises(Exception, match="403"):
                twilio.call()
            caller = twilio.call(auth_token=token)
            assert bridge.wait_calls(lambda cs: bool(cs) and cs[0].session is not None, UNIT)
            caller.hangup()
            assert bridge.wait_calls(lambda cs: cs[0].ended.is_set(), UNIT)
            assert bridge.stats().rejected == 2 and bridge.stats().total_calls == 1


def test_close_ends_every_call_session_and_thread():
    """bridge.close() from another thread hangs up live calls (1001), closes their sessions and threads."""
    with Simulator(speed=None, seed=4) as sim:
        bridge = TwilioBridge(session_factory(sim.url, turn_detection=VAD), max_calls=2).start()
        twilio = FakeTwilio(bridge.url, speed=4.0)
        try:
            callers = [twilio.call(), twilio.call()]
            assert bridge.wait_calls(lambda cs: len(cs) == 2 and all(c.session is not None for c in cs), UNIT)
            calls = bridge.calls()
            # A third call is over capacity: refused at the handshake.
            with pytest.raises(Exception, match="503"):
                twilio.call()
            assert bridge.stats().rejected == 1
            closer = threading.Thread(target=bridge.close, name="test-closer")
            closer.start()
            closer.join(UNIT)
            assert not closer.is_alive()
            for caller in callers:
                assert caller.closed.wait(UNIT) and caller.close_code == 1001
            for call in calls:
                assert call.ended.is_set() and call.session is not None and call.session.closed
                assert not [t for t in call.threads() if t.is_alive()]
        finally:
            twilio.close()
            bridge.close()


def test_a_failing_factory_or_a_wrong_format_hangs_up():
    """The factory raising ends the call (close 1011); a start not in mu-law 8 kHz is refused (1003)."""
    def factory(call: TwilioCall) -> Session:
        raise RuntimeError("no agents today")

    with TwilioBridge(factory) as bridge, FakeTwilio(bridge.url) as twilio:
        caller = twilio.call()
        assert caller.closed.wait(UNIT) and caller.close_code == 1011
        assert bridge.wait_calls(lambda cs: bool(cs) and cs[0].ended.is_set(), UNIT)
        assert bridge.stats().failed_calls == 1

        from websockets.sync.client import connect

        with connect(bridge.url, proxy=None) as ws:
            ws.send('{"event": "connected", "protocol": "Call", "version": "1.0.0"}')
            ws.send('{"event": "start", "streamSid": "MZ1", "start": {"streamSid": "MZ1", "callSid": "CA1", '
                    '"mediaFormat": {"encoding": "audio/l16", "sampleRate": 16000, "channels": 1}}}')
            with pytest.raises(Exception, match="1003"):
                ws.recv(timeout=UNIT)


def test_twiml_and_voice_webhook():
    """stream_twiml makes <Connect><Stream> with parameters; the webhook serves it, checking signatures."""
    xml = stream_twiml("wss://example.test/media", parameters={"tenant": "acme"}, name="desk")
    root = ET.fromstring(xml)
    stream = root.find("./Connect/Stream")
    assert root.tag == "Response" and stream is not None
    assert stream.get("url") == "wss://example.test/media" and stream.get("name") == "desk"
    assert {p.get("name"): p.get("value") for p in stream.findall("Parameter")} == {"tenant": "acme"}
    for bad in ("https://example.test/media", "wss://example.test/media?token=x"):
        with pytest.raises(TypeError):
            stream_twiml(bad)

    from twilio.request_validator import RequestValidator

    token = "test-auth-token-0123456789"
    with VoiceWebhook("wss://example.test/media", auth_token=token,
                      parameters=lambda form: {"from": form.get("From", "")}) as hook:
        form = {"CallSid": "CA1", "From": "+15550100"}
        signature = RequestValidator(token).compute_signature(hook.url, form)

        def post(sig: str, url: str = hook.url) -> tuple[int, str]:
            req = urllib.request.Request(url, data=urllib.parse.urlencode(form).encode(),
                                         headers={"X-Twilio-Signature": sig})
            try:
                with urllib.request.urlopen(req, timeout=UNIT) as resp:
                    return resp.status, resp.read().decode()
            except urllib.error.HTTPError as err:
                return err.code, ""

        status, body = post(signature)
        assert status == 200
        param = ET.fromstring(body).find("./Connect/Stream/Parameter")
        assert param is not None and param.get("value") == "+15550100"
        assert post("bad")[0] == 403
        assert post(signature, hook.url.replace("/voice", "/other"))[0] == 404


class StuckLine:
    """A Twilio socket that stops reading: a ``media`` write blocks until :meth:`resume`; writes are recorded in
    the order they reach the line."""

    def __init__(self) -> None:
        self.written: list[dict[str, Any]] = []
        self.blocked = threading.Event()  # a media write is stuck
        self.open = threading.Event()  # the far end reads again
        self.cleared = threading.Event()
        self.lock = threading.Condition()

    def send(self, text: str) -> None:
        msg = json.loads(text)
        if msg["event"] == "media" and not self.open.is_set():
            self.blocked.set()
            self.open.wait(UNIT)
        with self.lock:
            self.written.append(msg)
            self.lock.notify_all()
        if msg["event"] == "clear":
            self.cleared.set()

    def writable(self) -> bool:
        return self.open.is_set()

    def resume(self) -> None:
        self.open.set()

    def wait_written(self, n: int) -> bool:
        with self.lock:
            return self.lock.wait_for(lambda: len(self.written) >= n, UNIT)

    def events(self) -> list[str]:
        with self.lock:
            return [m["event"] + ":" + (m.get("mark", {}).get("name", "")) for m in self.written]


def run_writer(out: TwilioOutput, stop: threading.Event) -> threading.Thread:
    """The call worker's loop, on a named thread."""
    def loop() -> None:
        while out.write_pending(stop):
            pass

    thread = threading.Thread(target=loop, name="test-twilio-writer", daemon=True)
    thread.start()
    return thread


def test_clear_jumps_a_blocked_media_send_and_interrupt_never_waits_for_the_socket():
    """A media write stuck on a full socket: interrupt() returns at once, and the clear is the next message."""
    line = StuckLine()
    out = TwilioOutput(line.send, frame_ms=10, writable=line.writable)
    out.stream_sid = "MZ1"
    stop = threading.Event()
    writer = run_writer(out, stop)
    try:
        out.play("item_a", b"\x01" * 800)  # 100 ms: ten frames
        assert line.blocked.wait(UNIT)  # the first frame's media is stuck in the socket
        cut = out.interrupt()
        # interrupt() came back while the write is still stuck: it did not wait for the socket.
        assert line.written == [] and not line.open.is_set()
        assert cut is not None and cut.item_id == "item_a" and cut.played_ms == 0.0 and cut.received_ms == 100.0
        assert out.stats()["clears"] == 0 and out.stats()["clears_deferred"] == 1 and not out.is_playing()
        out.play("item_b", b"\x02" * 160)  # the next answer queues behind the clear
        line.resume()
        assert line.cleared.wait(UNIT) and line.wait_written(7)
        # The frame under way finishes (its media and mark), then the clear, then only the new item's frames.
        assert line.events() == ["media:", "mark:item_a/1", "clear:", "media:", "mark:item_b/2", "media:",
                                 "mark:item_b/3"]
        # Twilio hands the cut frame's mark back after the clear: it does not count as heard.
        out.on_mark("item_a/1")
        assert out.played_ms("item_a") == 0.0 and out.stats()["clears"] == 1
    finally:
        stop.set()
        out.wake()
        line.resume()
        writer.join(UNIT)
    assert not writer.is_alive()


def test_outbound_backlog_is_bounded_and_what_is_played_stays_a_prefix():
    """A line that stops draining: audio past max_backlog_ms is dropped for the rest of that item, never queued,
    and the played position only ever counts frames that were sent."""
    line = StuckLine()
    out = TwilioOutput(line.send, frame_ms=10, max_backlog_ms=200, writable=line.writable)
    out.stream_sid = "MZ1"
    stop = threading.Event()
    writer = run_writer(out, stop)
    try:
        out.play("item_a", b"\x01" * 80)
        assert line.blocked.wait(UNIT)
        for _ in range(10):
            out.play("item_a", b"\x01" * 800)  # 1 s of audio against a 200 ms bound
        stats = out.stats()
        assert stats["buffered_ms"] == 200.0 and stats["overflow_ms"] == 800.0
        assert out.received_ms("item_a") == 1010.0  # the model's position still counts all it said
        line.resume()
        assert line.wait_written(2 * 21)  # the frame under way and the 20 queued, each media + mark
        for msg in list(line.written):
            if msg["event"] == "mark":
                out.on_mark(msg["mark"]["name"])
        assert out.played_ms("item_a") == out.stats()["sent_ms"] < out.received_ms("item_a")
        assert out.current_item() == "item_a"  # unfinished: a barge-in still truncates it at what was heard
    finally:
        stop.set()
        out.wake()
        line.resume()
        writer.join(UNIT)
