"""The simulator over real sockets: official client, raw clients, latency, trace, auth."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import websocket
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from rtqueue.sim import FaultPlan, Simulator
from rtqueue.sim.cli import main
from rtqueue.sim.schema import validate_server_event

TIMEOUT = 10.0


def recv_json(ws: Any) -> dict[str, Any]:
    return json.loads(ws.recv(timeout=TIMEOUT))


def recv_until(ws: Any, etype: str) -> list[dict[str, Any]]:
    """Receive events up to and including the first of type ``etype``."""
    out = []
    while True:
        ev = recv_json(ws)
        out.append(ev)
        if ev["type"] == etype:
            return out


def user_text(text: str, **fields: Any) -> str:
    """A ``conversation.item.create`` frame adding a user text message (``fields``: e.g. ``event_id``)."""
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
    return json.dumps({"type": "conversation.item.create", **fields, "item": item})


def start_long_answer_and_stop_reading(sim: Simulator, ws: websocket.WebSocket) -> None:
    """Ask for a 1000-word answer over ``ws``, which the caller then never reads.

    That is ~16 MB of audio deltas, more than loopback buffers hold, so the
    simulator's writes to ``ws`` block. Returns once 1000 frames are under way.
    """
    ws.send(user_text("go [len: 1000]"))
    ws.send(json.dumps({"type": "response.create"}))
    assert sim.wait_until(lambda s: s.stats()["server_events"] > 1000, TIMEOUT)


def assert_all_valid(sim: Simulator) -> None:
    events = sim.server_events()
    assert events
    for ev in events:
        validate_server_event(ev)


def test_official_openai_client_holds_a_session() -> None:
    """The official openai client runs session.update, item create and a response to done."""
    from openai import OpenAI

    with Simulator(speed=None, seed=2) as sim:
        client = OpenAI(api_key="sk-test", websocket_base_url=sim.websocket_base_url)
        with client.realtime.connect(model="gpt-realtime") as conn:
            conn.session.update(
                session={
                    "type": "realtime",
                    "instructions": "You are the order desk.",
                    "tools": [
                        {
                            "type": "function",
                            "name": "lookup_order",
                            "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}},
                        }
                    ],
                }
            )
            conn.conversation.item.create(
                item={
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": "status of order 31?"}],
                }
            )
            conn.response.create(response={"metadata": {"rtq": "e1"}})
            seen: list[str] = []
            for event in conn:
                seen.append(event.type)
                if event.type == "response.function_call_arguments.done":
                    assert event.name == "lookup_order" and json.loads(event.arguments) == {"order_id": "31"}
                if event.type == "response.done":
                    assert event.response.status == "completed"
                    assert event.response.metadata == {"rtq": "e1"}
                    break
        assert seen[:2] == ["session.created", "session.updated"]  # no conversation.created in GA
        assert "response.output_audio.delta" in seen
        assert sim.wait_until(lambda s: s.stats()["active_sessions"] == 0, TIMEOUT)
        stats = sim.stats()
        assert stats["sessions"] == 1 and stats["responses"] == 1 and stats["completed"] == 1
        assert stats["function_calls"] == 1
        assert stats["client_events"] == {"session.update": 1, "conversation.item.create": 1, "response.create": 1}
        assert_all_valid(sim)


def test_burst_of_creates_conflicts_over_websocket_client() -> None:
    """A raw burst of 5 response.create gets 4 conflicts, each naming its create."""
    with Simulator(speed=20.0) as sim:
        ws = websocket.create_connection(sim.url, timeout=TIMEOUT)
        try:
            for i in range(5):
                ws.send(json.dumps({"type": "response.create", "event_id": f"burst_{i}"}))
            conflicts: list[str] = []
            while True:
                ev = json.loads(ws.recv())
                if ev["type"] == "error":
                    assert ev["error"]["code"] == "conversation_already_has_active_response"
                    conflicts.append(ev["error"]["event_id"])
                if ev["type"] == "response.done":
                    break
        finally:
            ws.close()
        assert conflicts == [f"burst_{i}" for i in range(1, 5)]
        assert sim.wait_until(lambda s: s.stats()["conflicts"] == 4, TIMEOUT)
        assert sim.stats()["errors"] == {"conversation_already_has_active_response": 4}
        assert_all_valid(sim)


def test_url_paths() -> None:
    """Any path ending in /realtime is served; others get HTTP 404."""
    with Simulator(speed=None) as sim:
        assert sim.url == f"ws://127.0.0.1:{sim.port}/v1/realtime?model=gpt-realtime"
        with connect(f"ws://127.0.0.1:{sim.port}/openai/v1/realtime?model=gpt-realtime") as ws:
            assert recv_json(ws)["type"] == "session.created"
        with pytest.raises(InvalidStatus) as info:
            connect(f"ws://127.0.0.1:{sim.port}/v1/other")
        assert info.value.response.status_code == 404


def test_latency_applies_both_ways() -> None:
    """latency_ms delays every frame each way: a round trip takes at least twice that."""
    with Simulator(speed=None, latency_ms=80) as sim, connect(sim.url) as ws:
        t0 = time.monotonic()
        recv_json(ws)  # session.created (the GA service sends no conversation.created)
        assert time.monotonic() - t0 >= 0.075
        t1 = time.monotonic()
        for i in range(3):
            ws.send(user_text(str(i), event_id=f"i{i}"))
        first = recv_json(ws)
        assert time.monotonic() - t1 >= 0.155
        texts = [first] + [recv_json(ws) for _ in range(5)]
        added = [e["item"]["content"][0]["text"] for e in texts if e["type"] == "conversation.item.added"]
        assert added == ["0", "1", "2"]


def test_trace_jsonl(tmp_path: Path) -> None:
    """trace= writes every frame both ways as JSONL, flushed on close, without the key."""
    path = tmp_path / "trace.jsonl"
    with Simulator(speed=None, trace=path, require_api_key="sk-secret-123") as sim:
        with connect(sim.url, additional_headers={"Authorization": "Bearer sk-secret-123"}) as ws:
            recv_json(ws)
            ws.send(json.dumps({"type": "response.create", "response": {"output_modalities": ["text"]}}))
            recv_until(ws, "response.done")
            recv_until(ws, "rate_limits.updated")  # it follows response.done, as on the real service
            ws.send(b"\x01\x02\x03")
            assert recv_json(ws)["error"]["code"] == "invalid_event"
        sim.wait_until(lambda s: s.stats()["active_sessions"] == 0, TIMEOUT)
    text = path.read_text()
    assert "sk-secret-123" not in text
    header, *lines = [json.loads(line) for line in text.splitlines()]
    assert header["type"] == "rtqueue.recording" and header["source"] == "simulator"
    assert {line["from"] for line in lines} == {"client", "server"}
    assert all(line["session"] == 0 and isinstance(line["t"], float) for line in lines)
    ins = [line for line in lines if line["from"] == "client"]
    assert ins[0]["event"]["type"] == "response.create" and ins[1]["binary_len"] == 3
    outs = [line["event"]["type"] for line in lines if line["from"] == "server"]
    assert outs[0] == "session.created" and "response.done" in outs


def test_require_api_key() -> None:
    """A wrong key gets invalid_api_key and close code 3000; Bearer and api-key headers work."""
    with Simulator(speed=None, require_api_key="sk-right") as sim:
        with connect(sim.url, additional_headers={"Authorization": "Bearer sk-wrong"}) as ws:
            ev = recv_json(ws)
            assert ev["type"] == "error"
            assert ev["error"]["code"] == "invalid_api_key" and ev["error"]["type"] == "invalid_request_error"
            assert ev["error"]["message"].startswith("Incorrect API key provided")
            with pytest.raises(ConnectionClosed) as info:
                ws.recv(timeout=TIMEOUT)
            assert info.value.rcvd is not None and info.value.rcvd.code == 3000
        with connect(sim.url) as ws:  # no key at all: its own message (tests/test_sim_connection.py)
            assert recv_json(ws)["error"]["message"] == "Missing bearer or basic authentication in header"
        for headers in ({"Authorization": "Bearer sk-right"}, {"api-key": "sk-right"}):
            with connect(sim.url, additional_headers=headers) as ws:
                assert recv_json(ws)["type"] == "session.created"
        assert sim.stats()["auth_failures"] == 2
        assert sim.stats()["errors"]["invalid_api_key"] == 1


def test_many_concurrent_sessions_and_stats() -> None:
    """Sessions run concurrently and independently; stats add up over all of them."""
    n = 30
    # Responses last ~0.4 s (30 words at 20x), far longer than a burst takes to arrive.
    with Simulator(speed=20.0, first_output_ms=0, record=False) as sim:
        failures: list[BaseException] = []

        def one(i: int) -> None:
            try:
                with connect(sim.url) as ws:
                    ws.send(user_text(f"hi [len: 30] {i}"))
                    ws.send(json.dumps({"type": "response.create"}))
                    ws.send(json.dumps({"type": "response.create"}))
                    done = recv_until(ws, "response.done")[-1]
                    assert done["response"]["status"] == "completed"
            except BaseException as exc:  # collected and re-raised in the test thread
                failures.append(exc)

        threads = [threading.Thread(target=one, args=(i,), name=f"client-{i}") for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        assert not failures, failures[0]
        assert sim.wait_until(lambda s: s.stats()["active_sessions"] == 0, TIMEOUT)
        stats = sim.stats()
        assert stats["sessions"] == n and stats["responses"] == n and stats["conflicts"] == n
        assert stats["client_events"]["response.create"] == 2 * n
        assert sim.server_events() == [] and sim.client_events() == []


def test_one_loop_thread_and_a_client_that_stops_reading_holds_up_no_one() -> None:
    """One thread serves every session; a client that never reads stalls only its own frames."""
    with Simulator(speed=None, close_timeout=0.5) as sim:
        stuck = websocket.create_connection(sim.url, timeout=TIMEOUT)
        try:
            start_long_answer_and_stop_reading(sim, stuck)
            others = [connect(sim.url) for _ in range(10)]
            try:
                for ws in others:
                    assert recv_json(ws)["type"] == "session.created"
                    ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
                    assert recv_until(ws, "input_audio_buffer.cleared")
                names = [t.name for t in threading.enumerate() if t.name.startswith("rtqueue-sim")]
                assert names == ["rtqueue-sim-loop"]
            finally:
                for ws in others:
                    ws.close()
        finally:
            stuck.abort()


def test_recorded_events_per_session_in_order() -> None:
    """client_events/server_events keep each session's frames in wire order."""
    with Simulator(speed=None) as sim:
        with connect(sim.url) as a, connect(sim.url) as b:
            recv_json(a)
            recv_json(b)
            a.send(json.dumps({"type": "input_audio_buffer.clear", "event_id": "a1"}))
            b.send(json.dumps({"type": "response.cancel", "event_id": "b1"}))
            b.send("{oops")
            recv_until(a, "input_audio_buffer.cleared")
            recv_json(b)
            recv_json(b)
        assert sim.client_events(0) == [{"type": "input_audio_buffer.clear", "event_id": "a1"}]
        assert sim.client_events(1) == [{"type": "response.cancel", "event_id": "b1"}, {"invalid_json": "{oops"}]
        assert [e["type"] for e in sim.server_events(1)] == [
            "session.created",
            "error",
            "error",
        ]
        assert len(sim.client_events()) == 3


def test_close_is_idempotent_and_closes_clients() -> None:
    """close() ends every connection with 1001 and can be called twice."""
    sim = Simulator(speed=1.0).start()
    ws = connect(sim.url)
    recv_json(ws)
    sim.close()
    sim.close()
    with pytest.raises(ConnectionClosed) as info:
        while True:
            ws.recv(timeout=TIMEOUT)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1001
    ws.close()


def test_inject_applies_to_one_session() -> None:
    """inject(plan, session=i) affects that session only, from then on."""
    with Simulator(speed=None) as sim, connect(sim.url) as a, connect(sim.url) as b:
        recv_json(a)  # session.created (no conversation.created in GA)
        recv_json(b)
        sim.inject(FaultPlan(unknown_event_after=0), session=1)
        assert recv_json(b)["type"] == "x.unknown.event"
        a.send(json.dumps({"type": "input_audio_buffer.clear"}))
        assert recv_json(a)["type"] == "input_audio_buffer.cleared"


def test_cli_main_runs_until_stopped(capsys: pytest.CaptureFixture[str]) -> None:
    """main() prints the URL, serves, and returns 0 when stopped."""
    ready, stop = threading.Event(), threading.Event()
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(main(["--port", "0", "--speed", "0"], ready=ready, stop=stop)))
    t.start()
    try:
        assert ready.wait(TIMEOUT)
        url = capsys.readouterr().out.split("listening on ")[1].split()[0]
        with connect(url) as ws:
            assert recv_json(ws)["type"] == "session.created"
    finally:
        stop.set()
        t.join(TIMEOUT)
    assert result == [0]


def test_close_is_bounded_when_a_client_stops_reading() -> None:
    """close() finishes promptly even while a sender is blocked on a client that never reads."""
    sim = Simulator(speed=None, close_timeout=0.5).start()
    ws = websocket.create_connection(sim.url, timeout=TIMEOUT)
    try:
        start_long_answer_and_stop_reading(sim, ws)
        t0 = time.monotonic()
        sim.close()
        assert time.monotonic() - t0 < 4.0
    finally:
        ws.abort()


def test_openai_agents_realtime_runner() -> None:
    """openai-agents' RealtimeRunner runs a tool round trip against the simulator without errors."""
    agents = pytest.importorskip("agents")
    import asyncio

    from agents.realtime import RealtimeAgent, RealtimeRunner

    @agents.function_tool
    def lookup_order(order_id: str) -> str:
        """Look up an order."""
        return json.dumps({"order_id": order_id, "status": "shipped"})

    async def run(url: str) -> list[str]:
        agent = RealtimeAgent(name="desk", instructions="You are the order desk.", tools=[lookup_order])
        runner = RealtimeRunner(
            starting_agent=agent,
            config={"model_settings": {"model_name": "gpt-realtime", "output_modalities": ["text"]}},
        )
        session = await runner.run(model_config={"url": url, "api_key": "sk-test"})
        seen: list[str] = []
        async with session:
            await session.send_message("where is my order 42?")
            async for ev in session:
                seen.append(ev.type)
                if ev.type == "error" or seen.count("agent_end") == 2:
                    break
        return seen

    with Simulator(speed=None) as sim:
        seen = asyncio.run(asyncio.wait_for(run(sim.url), TIMEOUT))
        assert "error" not in seen and seen.count("tool_end") == 1
        stats = sim.stats()
        assert stats["errors"] == {} and stats["function_calls"] == 1 and stats["completed"] == 2
        assert_all_valid(sim)


def test_unpaced_burst_still_conflicts() -> None:
    """Even with speed=None a response stays active for min_response_ms, so bursts collide."""
    with Simulator(speed=None) as sim, connect(sim.url) as ws:
        ws.send(json.dumps({"type": "response.create", "event_id": "one"}))
        ws.send(json.dumps({"type": "response.create", "event_id": "two"}))
        events = recv_until(ws, "response.done")
        errs = [e["error"] for e in events if e["type"] == "error"]
        assert [(e["code"], e["event_id"]) for e in errs] == [("conversation_already_has_active_response", "two")]


def test_audio_lateness_reports_how_late_deltas_left() -> None:
    """audio_lateness(): one sample per audio delta sent, against its schedule; reset starts a new window."""
    with Simulator(speed=4.0, seed=2) as sim, connect(sim.url) as ws:
        assert sim.audio_lateness() == {"n": 0, "p50": None, "p99": None, "max": None}
        recv_json(ws)  # session.created
        ws.send(user_text("hello [len: 12]"))
        ws.send(json.dumps({"type": "response.create"}))
        events = recv_until(ws, "response.done")
        deltas = sum(1 for e in events if e["type"] == "response.output_audio.delta")
        late = sim.audio_lateness(reset=True)
        assert deltas > 1 and late["n"] == deltas
        assert 0.0 <= late["p50"] <= late["p99"] <= late["max"] < 1000.0  # type: ignore[operator]
        assert sim.audio_lateness()["n"] == 0
