"""Replay (rtqueue.sim.replay): a recorded simulator conversation served back to a fresh client."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from rtqueue import Agent, Session, Simulator, tool
from rtqueue.recording import read_recording
from tests.utils import UNIT


@tool
def lookup_order(order_id: str) -> dict:
    """Look up an order by its id."""
    return {"order_id": order_id, "status": "shipped"}


def _agents() -> Agent:
    returns = Agent(name="returns", instructions="You are the returns agent. Handle returns.", tools=[lookup_order])
    return Agent(name="greeter", instructions="You are the greeter. Greet, then route.", handoffs=[returns])


def _conversation(url: str, record: Path | None = None) -> dict[str, Any]:
    """Tools, a handoff, a barge-in (cancel mid-answer) and a truncate; what the client saw."""
    out: dict[str, Any] = {"handoffs": []}
    with Session.connect(url=url, agent=_agents(), record=record) as session:
        session.on("agent.handoff", lambda e: out["handoffs"].append((e.source, e.target)))
        first = session.ask("I want to talk to returns about order 42", timeout=UNIT)
        out["first"] = (first.text, first.agent, first.status)
        out["agent_after"] = session.agent.name if session.agent else None
        words = threading.Event()
        session.on("response.output_audio_transcript.delta", lambda e: words.set())
        session.send_text("Tell me everything about returns. [len: 60]")
        handle = session.create_response()
        assert words.wait(UNIT)
        session.interrupt(timeout=UNIT)
        cut = handle.wait(UNIT)
        out["cut"] = (cut.status, cut.agent)
        item = next(o for o in cut.output if o.get("type") == "message")
        session.send({"type": "conversation.item.truncate", "item_id": item["id"], "content_index": 0,
                      "audio_end_ms": 100})
        last = session.ask("Thanks, and order 7?", timeout=UNIT)
        out["last"] = (last.text, last.agent, last.status)
        assert session.wait_idle(UNIT)
        out["calls"] = [o.get("name") for o in first.output + last.output if o.get("type") == "function_call"]
    return out


def test_replay_a_recorded_conversation(tmp_path: Path) -> None:
    path = tmp_path / "call.jsonl"
    with Simulator(speed=4.0, trace=path) as sim:
        recorded = _conversation(sim.url)
        sim.wait_until(lambda s: s.stats()["active_sessions"] == 0, UNIT)
    assert recorded["cut"][0] == "cancelled" and recorded["handoffs"] == [("greeter", "returns")]
    assert "shipped" in recorded["first"][0]
    rec = read_recording(path)
    types = [f.type for f in rec.frames if f.sender == "client"]
    assert "response.cancel" in types and "conversation.item.truncate" in types
    for speed in (None, 8.0):
        with Simulator(replay=path, speed=speed) as replay:
            replayed = _conversation(replay.url)
            replay.wait_until(lambda s: s.stats()["active_sessions"] == 0, UNIT)
            stats = replay.stats()
        assert replayed == recorded, speed
        assert stats["replay_mismatches"] == [], stats["replay_mismatches"]


def test_replay_a_client_recording(tmp_path: Path) -> None:
    """Session.connect(record=...) on the client side: the same conversation replays from it, no mismatch."""
    path = tmp_path / "client.jsonl"
    with Simulator(speed=4.0) as sim:
        recorded = _conversation(sim.url, record=path)
    rec = read_recording(path)
    assert rec.header["source"] == "client"
    with Simulator(replay=path, speed=None) as replay:
        replayed = _conversation(replay.url)
        replay.wait_until(lambda s: s.stats()["active_sessions"] == 0, UNIT)
        stats = replay.stats()
    assert replayed == recorded
    assert stats["replay_mismatches"] == [], stats["replay_mismatches"]


def test_replay_reports_an_event_the_recording_never_had(tmp_path: Path) -> None:
    path = tmp_path / "call.jsonl"
    with Simulator(speed=None, trace=path) as sim, Session.connect(url=sim.url) as session:
        session.ask("hello", timeout=UNIT)
    with Simulator(replay=path, speed=None) as replay, Session.connect(url=replay.url) as session:
        session.ask("hello", timeout=UNIT)
        errors = session.events("error")
        session.send({"type": "input_audio_buffer.clear"})
        err = errors.get(UNIT)
        assert err is not None and err["error"]["code"] == "replay_mismatch"
        assert "input_audio_buffer.clear" in err["error"]["message"]
        mismatches = replay.stats()["replay_mismatches"]
    assert [m["kind"] for m in mismatches] == ["unexpected_event"]


def test_sim_cli_has_replay() -> None:
    from rtqueue.sim.cli import build_parser

    assert build_parser().parse_args(["--replay", "call.jsonl"]).replay == "call.jsonl"


def test_core_replay_of_a_recorded_conversation(tmp_path: Path) -> None:
    """The same recording drives the pure ConversationCore: same answers, statuses and calls, no failure."""
    from rtqueue.recording import replay_core

    path = tmp_path / "call.jsonl"
    with Simulator(speed=4.0, trace=path) as sim:
        recorded = _conversation(sim.url)
        sim.wait_until(lambda s: s.stats()["active_sessions"] == 0, UNIT)
    result = replay_core(read_recording(path))
    texts = [r.text for r in result.responses]
    assert recorded["first"][0] in texts and recorded["last"][0] in texts
    assert [r.status for r in result.responses].count("cancelled") == 1
    calls = [o.get("name") for r in result.responses for o in r.output if o.get("type") == "function_call"]
    assert "lookup_order" in calls and "transfer_to_returns" in calls
    assert result.failures == () and len(result.responses) >= 4


def _voice_turn(url: str, chunk_ms: int) -> tuple[str, str]:
    from tests.utils import silence_pcm, speech_pcm

    pcm = speech_pcm(800) + silence_pcm(700)
    step = chunk_ms * 48
    with Session.connect(url=url) as session:
        done = session.events("response.done")
        for i in range(0, len(pcm), step):
            session.append_audio(pcm[i : i + step])
        ev = done.get(UNIT)
        assert ev is not None
        resp = ev["response"]
        text = " ".join(c.get("transcript") or c.get("text") or "" for o in resp["output"]
                        for c in o.get("content") or [])
        return resp["status"], text


def test_replay_matches_audio_by_duration_not_chunks(tmp_path: Path) -> None:
    """A voice turn recorded in 100 ms chunks replays to a client sending 30 ms chunks."""
    path = tmp_path / "voice.jsonl"
    with Simulator(speed=None, trace=path) as sim:
        recorded = _voice_turn(sim.url, 100)
        sim.wait_until(lambda s: s.stats()["active_sessions"] == 0, UNIT)
    assert recorded[0] == "completed"
    with Simulator(replay=path, speed=None) as replay:
        assert _voice_turn(replay.url, 30) == recorded
        replay.wait_until(lambda s: s.stats()["active_sessions"] == 0, UNIT)
        assert replay.stats()["replay_mismatches"] == []


def test_replay_reproduces_a_reconnect(tmp_path: Path) -> None:
    """A connection dropped in the recording ends in the replay too; the client reconnects the same way."""
    from rtqueue import FaultPlan, ReconnectPolicy

    def run(sim: Simulator, drop: bool) -> list[str]:
        policy = ReconnectPolicy(initial_backoff=0.01, connect_timeout=UNIT)
        with Session.connect(url=sim.url, reconnect=policy) as session:
            reconnected = session.events("session.reconnected")
            texts = [session.ask("hello", timeout=UNIT).text]
            if drop:
                sim.inject(FaultPlan(drop_after_events=0), session=0)
            assert reconnected.get(UNIT) is not None
            texts.append(session.ask("again", timeout=UNIT).text)
            return texts

    path = tmp_path / "drop.jsonl"
    with Simulator(speed=None, trace=path) as sim:
        recorded = run(sim, True)
        sim.wait_until(lambda s: s.stats()["active_sessions"] == 0, UNIT)
    assert {f.session for f in read_recording(path).frames} == {0, 1}
    with Simulator(replay=path, speed=None) as replay:
        assert run(replay, False) == recorded
        replay.wait_until(lambda s: s.stats()["active_sessions"] == 0, UNIT)
        assert replay.stats()["sessions"] == 2 and replay.stats()["replay_mismatches"] == []
