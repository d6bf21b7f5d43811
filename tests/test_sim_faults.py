"""Every FaultPlan field actually happens on the wire."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from rtqueue.errors import InvalidArgument
from rtqueue.sim import FaultPlan, Simulator

TIMEOUT = 10.0
SESSION_START = ["session.created"]  # the GA service sends no conversation.created


def recv_json(ws: ClientConnection) -> dict[str, Any]:
    return json.loads(ws.recv(timeout=TIMEOUT))


def recv_frames(ws: ClientConnection) -> list[Any]:
    """Every frame until the server closes the connection (text frames parsed when possible)."""
    frames: list[Any] = []
    try:
        while True:
            frame = ws.recv(timeout=TIMEOUT)
            if isinstance(frame, str):
                try:
                    frame = json.loads(frame)
                except ValueError:
                    pass
            frames.append(frame)
    except ConnectionClosed:
        return frames


def speak(ws: ClientConnection, text: str = "hello [len: 20]") -> None:
    ws.send(
        json.dumps(
            {"type": "session.update", "session": {"type": "realtime", "audio": {"input": {"turn_detection": None}}}}
        )
    )
    ws.send(
        json.dumps(
            {
                "type": "conversation.item.create",
                "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]},
            }
        )
    )
    ws.send(json.dumps({"type": "response.create"}))


def test_fault_plan_validates() -> None:
    """Nonsense plans are refused at construction (with InvalidArgument; tests/test_boundary.py has every field)."""
    with pytest.raises(InvalidArgument):
        FaultPlan(duplicate_events=1.5)
    with pytest.raises(InvalidArgument):
        FaultPlan(drop_after_events=-1)
    with pytest.raises(InvalidArgument):
        FaultPlan(withhold_done=0)
    with pytest.raises(InvalidArgument):
        FaultPlan(error_after=(1, 2))  # type: ignore[arg-type]


def test_drop_after_events_closes_without_close_frame() -> None:
    """drop_after_events: N events, then the TCP connection ends with no close frame."""
    # The client sends nothing: unread client data would make the kernel reset
    # the connection, and a reset may discard frames the client has not read.
    with Simulator(speed=None, faults=FaultPlan(drop_after_events=1)) as sim, connect(sim.url) as ws:
        got = [recv_json(ws)]
        assert [e["type"] for e in got] == SESSION_START
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=TIMEOUT)
        assert info.value.rcvd is None  # abrupt: no close frame from the server
        assert sim.wait_until(lambda s: s.stats()["faults"].get("drop_after_events") == 1, TIMEOUT)


def test_drop_mid_response() -> None:
    """drop_mid_response: the connection dies during the next response's audio."""
    with Simulator(speed=20.0, faults=FaultPlan(drop_mid_response=True)) as sim, connect(sim.url) as ws:
        speak(ws)
        frames = recv_frames(ws)
        kinds = [f["type"] for f in frames]
        assert kinds.count("response.output_audio.delta") == 2
        assert "response.done" not in kinds
        assert ws.close_code == 1006


def test_withhold_done() -> None:
    """withhold_done: no response.done; new creates conflict until the response is cancelled."""
    with Simulator(speed=None, min_response_ms=0, faults=FaultPlan(withhold_done=1)) as sim, connect(sim.url) as ws:
        speak(ws)
        while recv_json(ws)["type"] != "response.output_item.done":
            pass
        ws.send(json.dumps({"type": "response.create", "event_id": "again"}))
        ev = recv_json(ws)
        while ev["type"] != "error":
            assert ev["type"] != "response.done"
            ev = recv_json(ws)
        assert ev["error"]["code"] == "conversation_already_has_active_response"
        ws.send(json.dumps({"type": "response.cancel"}))
        done = recv_json(ws)
        assert done["type"] == "response.done" and done["response"]["status"] == "cancelled"
        assert sim.stats()["withheld"] == 1


def test_duplicate_events() -> None:
    """duplicate_events=1: every non-audio event arrives twice with the same event_id."""
    with Simulator(speed=None, faults=FaultPlan(duplicate_events=1.0)) as sim, connect(sim.url) as ws:
        first, second = recv_json(ws), recv_json(ws)
        assert first == second and first["type"] == "session.created"
        speak(ws)
        seen: list[dict[str, Any]] = []
        while not seen or seen[-1]["type"] != "response.done" or len(seen) < 2 or seen[-2]["type"] != "response.done":
            seen.append(recv_json(ws))
        audio = [e for e in seen if e["type"] == "response.output_audio.delta"]
        assert len({e["event_id"] for e in audio}) == len(audio)
        others = [e["event_id"] for e in seen if e["type"] != "response.output_audio.delta"]
        assert others[::2] == others[1::2]
        assert sim.stats()["faults"]["duplicate_events"] >= 10


def test_delay_events() -> None:
    """delay_events_ms delays every outgoing event, keeping order."""
    with Simulator(speed=None) as sim, connect(sim.url) as ws:
        recv_json(ws)  # session.created (no conversation.created in GA)
        sim.inject(FaultPlan(delay_events_ms=150))
        t0 = time.monotonic()
        ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
        ws.send(json.dumps({"type": "response.cancel"}))
        assert recv_json(ws)["type"] == "input_audio_buffer.cleared"
        assert time.monotonic() - t0 >= 0.14
        assert recv_json(ws)["error"]["code"] == "response_cancel_not_active"


@pytest.mark.parametrize(
    ("plan", "check"),
    [
        (FaultPlan(malformed_json_after=1), lambda f: isinstance(f, str)),
        (FaultPlan(binary_frame_after=1), lambda f: isinstance(f, bytes)),
        (FaultPlan(unknown_event_after=1), lambda f: f["type"] == "x.unknown.event"),
        (
            FaultPlan(error_after=(1, "server_error")),
            lambda f: f["type"] == "error" and f["error"]["code"] == "server_error",
        ),
    ],
)
def test_injected_frames_after_n_events(plan: FaultPlan, check: Any) -> None:
    """After N events the injected frame arrives, and the session carries on normally."""
    with Simulator(speed=None, faults=plan) as sim, connect(sim.url) as ws:
        frames = []
        raw = [ws.recv(timeout=TIMEOUT) for _ in range(2)]
        for frame in raw:
            try:
                frames.append(json.loads(frame))
            except (TypeError, ValueError):
                frames.append(frame)
        assert [f["type"] for f in frames[:1]] == SESSION_START
        assert check(frames[1])
        ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
        assert recv_json(ws)["type"] == "input_audio_buffer.cleared"
        assert sum(sim.stats()["faults"].values()) == 1


def test_expire_after() -> None:
    """expire_after_s: session_expired error, then a normal close."""
    with Simulator(speed=None, faults=FaultPlan(expire_after_s=0.2)) as sim, connect(sim.url) as ws:
        t0 = time.monotonic()
        frames = recv_frames(ws)
        assert time.monotonic() - t0 >= 0.19
        assert [f["type"] for f in frames] == [*SESSION_START, "error"]
        assert frames[1]["error"]["code"] == "session_expired"
        assert frames[1]["error"]["message"] == "Your session hit the maximum duration of 60 minutes."
        assert ws.close_code == 1000
        assert sim.stats()["errors"]["session_expired"] == 1


def test_stall_reading() -> None:
    """stall_reading_s: client frames are not read (nor answered) for that long."""
    with Simulator(speed=None) as sim, connect(sim.url) as ws:
        recv_json(ws)  # session.created (no conversation.created in GA)
        sim.inject(FaultPlan(stall_reading_s=0.3), session=0)
        # The handler is already blocked in a read; the stall starts with the next one.
        ws.send(json.dumps({"type": "input_audio_buffer.clear", "event_id": "first"}))
        assert recv_json(ws)["type"] == "input_audio_buffer.cleared"
        t0 = time.monotonic()
        ws.send(json.dumps({"type": "input_audio_buffer.clear", "event_id": "second"}))
        assert recv_json(ws)["type"] == "input_audio_buffer.cleared"
        assert time.monotonic() - t0 >= 0.25
        assert sim.stats()["faults"]["stall_reading_s"] == 1


def test_faults_only_hit_their_session() -> None:
    """A plan for session 1 given at construction time leaves session 0 alone."""
    with Simulator(speed=None) as sim:
        sim.inject(FaultPlan(drop_after_events=0), session=1)
        with connect(sim.url) as a, connect(sim.url) as b:
            assert recv_json(a)["type"] == "session.created"
            with pytest.raises(ConnectionClosed):
                b.recv(timeout=TIMEOUT)
            a.send(json.dumps({"type": "input_audio_buffer.clear"}))
            assert recv_json(a)["type"] == "input_audio_buffer.cleared"
