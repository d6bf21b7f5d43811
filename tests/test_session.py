"""The session against the simulator over real sockets (issue 2)."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
import websocket

import rtqueue
from rtqueue import Session, Simulator
from rtqueue.errors import ConnectionLost, GateTimeout, InvalidArgument, SessionClosed
from tests.utils import UNIT, silence_pcm, speech_pcm


def test_readme_example(sim: Simulator):
    """The issue's example: ask, then 5 creates at once, all completed, 0 conflicts."""
    with Session.connect(url=sim.url, instructions="Be brief.") as session:
        r = session.ask("Hello there", timeout=UNIT)
        assert r.status == "completed" and r.text
        handles = [session.create_response() for _ in range(5)]
        assert [h.wait(timeout=UNIT).status for h in handles] == ["completed"] * 5
        assert len({h.response_id for h in handles}) == 5
    assert sim.stats()["conflicts"] == 0
    assert not session.threads()


def test_200_creates_from_8_threads(sim: Simulator):
    """8 threads x 25 create_response(): 200 responses, zero conflicts, gate drained."""
    with Session.connect(url=sim.url) as session:
        handles: list[rtqueue.ResponseHandle] = []
        lock = threading.Lock()
        start = threading.Barrier(8)

        def worker() -> None:
            start.wait(UNIT)
            for _ in range(25):
                h = session.create_response(instructions="Count.")
                with lock:
                    handles.append(h)

        threads = [threading.Thread(target=worker, name=f"test-app-{i}") for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(UNIT)
        results = [h.wait(timeout=3 * UNIT) for h in handles]
        assert len(results) == 200
        assert all(r.status == "completed" for r in results)
        assert len({r.id for r in results}) == 200
        assert session.gate.wait_drained(UNIT)
        stats = session.gate.stats()
        assert stats.depth == 0 and stats.done == 200 and stats.rejected == 0
    assert sim.stats()["conflicts"] == 0
    assert sim.stats()["responses"] == 200


def test_held_creates_go_out_from_the_reader_at_their_release(sim: Simulator):
    """Creates queued back to back: each held one leaves as the previous response.done is read, in order."""
    with Session.connect(url=sim.url) as session:
        handles = [session.create_response(instructions=f"Say {i}. [len: 3]") for i in range(6)]
        results = [h.wait(timeout=UNIT) for h in handles]
        stats = session.stats()
    assert [r.status for r in results] == ["completed"] * 6
    created = [e for e in sim.server_events(0) if e["type"] == "response.created"]
    assert [e["response"]["id"] for e in created] == [r.id for r in results]  # the order they were asked in
    # Five were held behind another; the thread that read each release sent it (the writer, woken by
    # the release, may now and then win one under load: not all five are asserted).
    assert 1 <= stats["creates_sent_on_release"] <= 5
    assert sim.stats()["conflicts"] == 0 and sim.stats()["errors"] == {}


def test_raw_burst_without_rtqueue_conflicts():
    """Proof the simulator is strict: a raw burst of creates gets conflict errors."""
    with Simulator(speed=1.0, seed=1) as sim:
        _raw_burst(sim)
    assert sim.stats()["conflicts"] == 4


def _raw_burst(sim: Simulator) -> None:
    ws = websocket.create_connection(sim.url, timeout=UNIT)
    try:
        for i in range(5):
            ws.send(json.dumps({"type": "response.create", "event_id": f"raw{i}"}))
        conflicts, done = 0, 0
        while done < 1 or conflicts < 4:
            ev = json.loads(ws.recv())
            if ev["type"] == "error" and ev["error"]["code"] == "conversation_already_has_active_response":
                assert ev["error"]["event_id"] in {f"raw{i}" for i in range(1, 5)}
                conflicts += 1
            elif ev["type"] == "response.done":
                done += 1
        assert conflicts == 4
    finally:
        ws.close()


def test_vad_auto_response_races_client_create():
    """A server-VAD response racing our create: ours is retried, not lost; nothing hangs."""
    with Simulator(speed=10.0, latency_ms=40, seed=3) as sim, Session.connect(
        url=sim.url, turn_detection="server_vad"
    ) as session:
        vad = session.events("input_audio_buffer.speech_stopped")
        session.append_audio(silence_pcm(200) + speech_pcm(600) + silence_pcm(700))
        # Sent right behind the audio: the server's VAD starts its own response
        # on that audio before our create arrives, and we learn of it 40 ms later.
        handle = session.create_response(instructions="Also answer this.")
        response = handle.wait(timeout=UNIT)
        assert response.status == "completed"
        assert vad.get(timeout=UNIT) is not None
        assert handle.retries >= 1
        assert session.gate.wait_drained(UNIT)
        stats = session.gate.stats()
        assert stats.retried >= 1 and stats.rejected == 0 and stats.foreign >= 1
    assert sim.stats()["conflicts"] == stats.retried


def test_cancel_while_streaming_returns_after_done():
    """cancel() sends response.cancel by id and returns the cancelled response after its done."""
    with Simulator(speed=1.0, seed=2) as sim, Session.connect(url=sim.url) as session:
        started = session.events("response.output_audio.delta")
        handle = session.create_response(instructions="Tell a long story. [len: 80]")
        assert started.get(timeout=UNIT) is not None
        response = session.cancel(timeout=UNIT)
        assert response is not None and response.status == "cancelled"
        assert response.status_details and response.status_details.get("reason") == "client_cancelled"
        assert handle.wait(timeout=UNIT).status == "cancelled"
        cancels = [e for e in sim.client_events(0) if e["type"] == "response.cancel"]
        assert cancels == [{"type": "response.cancel", "event_id": cancels[0]["event_id"],
                            "response_id": handle.response_id}]
    assert sim.stats()["cancel_not_active"] == 0


def test_cancel_with_nothing_active_sends_nothing(sim: Simulator):
    """cancel() with no active response is a no-op: no response.cancel on the wire."""
    with Session.connect(url=sim.url) as session:
        assert session.cancel(timeout=UNIT) is None
        session.ask("Hi", timeout=UNIT)
        assert session.cancel(timeout=UNIT) is None
        session.send_text("marker").wait_sent(UNIT)
        assert session.wait_idle(UNIT)
    assert not [e for e in sim.client_events(0) if e["type"] == "response.cancel"]
    assert sim.stats()["cancel_not_active"] == 0


def test_out_of_band_runs_alongside(sim: Simulator):
    """An out-of-band response is not gated and does not block in-band ones."""
    with Session.connect(url=sim.url) as session:
        inband = session.create_response()
        oob = session.create_response(conversation="none", metadata={"purpose": "classify"})
        assert oob.wait(timeout=UNIT).metadata["purpose"] == "classify"
        assert inband.wait(timeout=UNIT).status == "completed"
        assert oob.wait(timeout=UNIT).conversation_id is None
    assert sim.stats()["conflicts"] == 0


def test_handle_cancel_before_send_withdraws():
    """A create still held by the gate can be withdrawn; it is never sent."""
    with Simulator(speed=1.0, seed=2) as sim, Session.connect(url=sim.url) as session:
        first = session.create_response(instructions="[len: 40]")
        second = session.create_response()
        assert second.cancel(timeout=UNIT) is None
        with pytest.raises(rtqueue.ResponseError):
            second.wait(timeout=UNIT)
        first.cancel(timeout=UNIT)
    sent = [e.get("event_id") for e in sim.client_events(0) if e["type"] == "response.create"]
    assert second.event_id not in sent


def test_gate_deadline_never_sends_late():
    """A create whose deadline passes in the gate fails with GateTimeout and is never sent."""
    with Simulator(speed=1.0, seed=2) as sim, Session.connect(url=sim.url) as session:
        first = session.create_response(instructions="[len: 40]")
        late = session.create_response(deadline=0.05)
        with pytest.raises(GateTimeout):
            late.wait(timeout=UNIT)
        assert session.gate.stats().timed_out == 1
        session.cancel(timeout=UNIT)
        first.wait(timeout=UNIT)
        assert session.wait_idle(UNIT)
    sent = [e.get("event_id") for e in sim.client_events(0) if e["type"] == "response.create"]
    assert late.event_id not in sent


def test_raw_send_create_is_gated(sim: Simulator):
    """A raw response.create through send() is gated like create_response()."""
    with Session.connect(url=sim.url) as session:
        handles = [session.send({"type": "response.create", "response": {}}) for _ in range(3)]
        assert all(isinstance(h, rtqueue.ResponseHandle) for h in handles)
        assert [h.wait(UNIT).status for h in handles] == ["completed"] * 3  # type: ignore[union-attr]
    assert sim.stats()["conflicts"] == 0


def test_update_applies_and_reports_server_errors(sim: Simulator):
    """update() returns the new session; an unknown field in a raw dict raises the server's error."""
    with Session.connect(url=sim.url) as session:
        cfg = session.update(instructions="Speak like a pirate.")
        assert cfg["instructions"] == "Speak like a pirate."
        with pytest.raises(rtqueue.ServerError) as info:
            session.update({"not_a_field": 1})  # raw: sent as given (a keyword is refused before sending)
        assert info.value.code == "unknown_parameter"
        assert session.ask("still alive?", timeout=UNIT).status == "completed"


def test_bad_configuration_at_connect_raises(sim: Simulator):
    """A session field the server rejects makes connect() raise, with no thread left."""
    with pytest.raises(rtqueue.ServerError) as info:
        Session.connect(url=sim.url, session={"bogus": True})
    assert info.value.code == "unknown_parameter"


def test_events_callbacks_and_iterator(sim: Simulator):
    """on() callbacks and events() both see events; a raising callback harms nothing."""
    seen: list[str] = []
    got_done = threading.Event()
    with Session.connect(url=sim.url) as session:
        session.on("response.done", lambda e: (seen.append(e.response["status"]), got_done.set()))
        session.on("response.created", lambda e: 1 / 0)
        errors = session.events("rtqueue.callback_error")
        with session.events("response.created", "response.done") as stream:
            session.ask("hello", timeout=UNIT)
            types = [stream.get(UNIT).type, stream.get(UNIT).type]  # type: ignore[union-attr]
        assert types == ["response.created", "response.done"]
        assert got_done.wait(UNIT) and seen == ["completed"]
        err = errors.get(UNIT)
        assert err is not None and isinstance(err.error, ZeroDivisionError)
        assert session.ask("again", timeout=UNIT).status == "completed"


def test_slow_callback_delays_neither_reading_nor_gate(sim: Simulator):
    """A callback blocked on an event does not stop responses from completing."""
    release = threading.Event()
    with Session.connect(url=sim.url) as session:
        session.on("response.created", lambda e: release.wait(3 * UNIT))
        handles = [session.create_response() for _ in range(5)]
        assert [h.wait(UNIT).status for h in handles] == ["completed"] * 5
        release.set()


def test_wrong_argument_types_raise_invalid_argument(sim: Simulator):
    """Wrong types from the app raise InvalidArgument (a TypeError) and send nothing."""
    with Session.connect(url=sim.url) as session:
        for call in (
            lambda: session.send_text(42),  # type: ignore[arg-type]
            lambda: session.create_response(instructions=7),
            lambda: session.create_response(metadata={"a": 1}),
            lambda: session.create_response(conversation="other"),
            lambda: session.send({"no": "type"}),
            lambda: session.send({"type": "x", "bad": object()}),
            lambda: session.on(3, print),  # type: ignore[arg-type]
            lambda: session.ask("hi", timeout=-1),
        ):
            with pytest.raises(InvalidArgument):
                call()
        with pytest.raises(TypeError):
            session.append_audio("not bytes")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        Session.connect(url="http://not-a-websocket")


def test_closed_session_fails_new_work(sim: Simulator):
    """After close(), new work fails at once with SessionClosed; close is idempotent."""
    session = Session.connect(url=sim.url)
    session.close()
    session.close()
    with pytest.raises(SessionClosed):
        session.create_response().wait(UNIT)
    with pytest.raises(SessionClosed):
        session.send_text("x").wait_sent(UNIT)
    assert not session.threads()


def test_close_fails_queued_creates(sim: Simulator):
    """Creates still queued at close() fail with SessionClosed: none is silently dropped."""
    session = Session.connect(url=sim.url)
    handles = [session.create_response(instructions="[len: 30]") for _ in range(10)]
    session.close()
    outcomes = []
    for h in handles:
        try:
            outcomes.append(h.wait(UNIT).status)
        except SessionClosed:
            outcomes.append("closed")
    assert len(outcomes) == 10 and "closed" in outcomes


def test_server_closing_mid_response_fails_handles_clearly():
    """The server dropping the socket mid-response fails the handle with ConnectionLost."""
    with Simulator(speed=1.0, seed=4, faults=rtqueue.FaultPlan(drop_mid_response=True)) as sim:
        session = Session.connect(url=sim.url, reconnect=False)
        try:
            handle = session.create_response(instructions="[len: 40]")
            with pytest.raises(ConnectionLost):
                handle.wait(UNIT)
            with pytest.raises(ConnectionLost):
                session.create_response().wait(UNIT)
        finally:
            session.close()
        assert not session.threads()


@pytest.mark.parametrize(
    "fault",
    [
        {"malformed_json_after": 3},
        {"binary_frame_after": 3},
        {"unknown_event_after": 3},
    ],
)
def test_bad_frames_are_reported_and_session_goes_on(fault: dict[str, int]):
    """Malformed, binary and unknown frames: a clear error event, and the session keeps working."""
    with Simulator(speed=None, seed=5, faults=rtqueue.FaultPlan(**fault)) as sim, Session.connect(
        url=sim.url
    ) as session:
        errors = session.events("rtqueue.error", "x.unknown.event")
        for _ in range(3):
            assert session.ask("hello", timeout=UNIT).status == "completed"
        ev = errors.get(UNIT)
        assert ev is not None
        if "unknown_event_after" not in fault:
            assert ev.type == "rtqueue.error" and isinstance(ev.error, rtqueue.ProtocolError)


def test_api_key_never_leaks(sim: Simulator, caplog: pytest.LogCaptureFixture):
    """The key appears in no repr, log line or exception message."""
    key = "sk-test-SECRET-0123456789abcdef"
    with Session.connect(url=sim.url, api_key=key) as session:
        assert key not in repr(session) and key not in repr(session.__dict__)
    with pytest.raises(rtqueue.ConnectError) as info:
        Session.connect(url="ws://127.0.0.1:9/v1/realtime", api_key=key, reconnect=False, connect_timeout=2)
    assert key not in str(info.value) and key not in repr(info.value)
    assert key not in caplog.text


def test_unresolved_lists_only_events_neither_sent_nor_failed(sim: Simulator):
    """unresolved() holds queued events until they are sent; after close() nothing is left open."""
    session = Session.connect(url=sim.url)
    try:
        first = session.create_response(instructions="[len: 30]")
        held = session.create_response()
        assert held in session.unresolved()  # waiting in the gate behind the first
        first.wait(UNIT)
        held.wait(UNIT)
        assert session.wait_idle(UNIT) and session.unresolved() == []
        queued = [session.create_response() for _ in range(3)]
    finally:
        session.close()
    assert session.unresolved() == []
    assert all(h.sent() or isinstance(h.error, SessionClosed) for h in queued)
    assert session.stats()["handles_issued"] >= 5


def test_publish_delivers_app_events_in_order_and_checks_arguments():
    """Session.publish reaches callbacks and streams in order; bad arguments and a closed session raise."""
    from rtqueue.testing import MockTransport

    s = Session.connect(transport=MockTransport(), reconnect=False)
    got: list[Any] = []
    s.on("app.note", got.append)
    with s.events("app.note") as stream:
        for n in range(3):
            s.publish("app.note", {"n": n})
        assert [stream.get(timeout=UNIT)["n"] for _ in range(3)] == [0, 1, 2]
    with pytest.raises(InvalidArgument):
        s.publish("", {})
    with pytest.raises(InvalidArgument):
        s.publish("app.note", [1])  # type: ignore[arg-type]
    s.close()
    assert [e["n"] for e in got] == [0, 1, 2] and got[0]["type"] == "app.note"
    with pytest.raises(SessionClosed):
        s.publish("app.note")
