"""Multi-agent handoffs and tools against the simulator (issue 3)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import rtqueue
from rtqueue import Agent, FaultPlan, Session, Simulator, handoff, tool
from tests.utils import UNIT


def _wire(sim: Simulator, index: int = 0) -> list[dict[str, Any]]:
    """Client events of one simulator session, without the audio lane."""
    return [e for e in sim.client_events(index) if e["type"] != "input_audio_buffer.append"]


def _transfer_call_ids(sim: Simulator, index: int = 0) -> list[str]:
    out = []
    for ev in sim.server_events(index):
        if ev["type"] == "response.output_item.done":
            item = ev["item"]
            if item.get("type") == "function_call" and item["name"].startswith("transfer_to_"):
                out.append(item["call_id"])
    return out


def _assert_handoff_wire_order(sim: Simulator, call_ids: list[str], index: int = 0) -> None:
    """Each handoff's output is followed on the wire by exactly session.update, then response.create."""
    wire = _wire(sim, index)
    for cid in call_ids:
        pos = next(
            i for i, e in enumerate(wire)
            if e["type"] == "conversation.item.create" and e["item"].get("call_id") == cid
        )
        assert [e["type"] for e in wire[pos : pos + 3]] == [
            "conversation.item.create", "session.update", "response.create"
        ], f"wire order after handoff {cid}: {[e['type'] for e in wire[pos:pos + 4]]}"


@tool
def lookup_order(order_id: str) -> dict:
    """Look up an order by its id."""
    return {"order_id": order_id, "status": "shipped"}


def test_issue_example_greeter_hands_off_and_tool_runs(sim: Simulator):
    """The issue's example: greeter hands off to returns, which calls the tool; ask() returns the answer."""
    returns = Agent(name="returns", instructions="You are the returns agent. Handle returns.", tools=[lookup_order])
    greeter = Agent(name="greeter", instructions="You are the greeter. Greet, then route.", handoffs=[returns])
    handoffs: list[tuple[str, str]] = []
    seen = threading.Event()
    with Session.connect(url=sim.url, agent=greeter) as session:
        session.on("agent.handoff", lambda e: (handoffs.append((e.source, e.target)), seen.set()))
        answer = session.ask("I want to talk to returns about order 42", timeout=UNIT)
        assert session.agent.name == "returns"
        assert answer.agent == "returns"
        assert "shipped" in answer.text and "42" in answer.text
        assert seen.wait(UNIT) and handoffs == [("greeter", "returns")]
        assert not answer.function_calls
    assert sim.stats()["conflicts"] == 0
    _assert_handoff_wire_order(sim, _transfer_call_ids(sim))


def _ring(n: int) -> list[Agent]:
    names = ["alpha", "bravo", "charlie"][:n]
    return [
        Agent(name=name, instructions=f"You are {name}. Speak, then route.", handoffs=[names[(i + 1) % n]])
        for i, name in enumerate(names)
    ]


def test_chain_of_50_handoffs_with_latency():
    """50 handoffs A->B->C->A at 20 ms latency: 0 conflicts, exact wire order, right final agent."""
    agents = _ring(3)
    names = [a.name for a in agents]
    with Simulator(speed=None, latency_ms=20, seed=11) as sim, Session.connect(
        url=sim.url, agent=agents[0], agents=agents
    ) as session:
        for i in range(50):
            target = names[(i + 1) % 3]
            final = session.ask(f"Please transfer me to {target} now.", timeout=UNIT)
            assert final.agent == target and final.status == "completed"
        assert session.agent.name == names[50 % 3]
        assert session.wait_idle(UNIT)
        handing_off = [
            ev["response"] for ev in sim.server_events(0)
            if ev["type"] == "response.done" and any(
                o.get("type") == "function_call" for o in ev["response"]["output"])
        ]
    stats = sim.stats()
    assert stats["conflicts"] == 0 and stats["errors"] == {}
    call_ids = _transfer_call_ids(sim)
    assert len(call_ids) == 50
    _assert_handoff_wire_order(sim, call_ids)
    assert len(handing_off) == 50
    for resp in handing_off:  # every handing-off response also speaks
        msgs = [o for o in resp["output"] if o["type"] == "message"]
        assert msgs and msgs[0]["content"][0].get("transcript")


def test_parallel_tool_calls_one_followup(sim: Simulator):
    """3 calls in one response (tools sleeping 0-50 ms): 3 outputs, then exactly one follow-up create."""
    started = {"a": 0.0, "b": 0.0, "c": 0.0}

    def make(name: str, ms: int) -> rtqueue.Tool:
        def fn(x: int = 1) -> dict:
            started[name] = time.monotonic()
            threading.Event().wait(ms / 1000)  # the tool's own work, not test synchronisation
            return {"tool": name, "slept_ms": ms}

        fn.__name__ = f"tool_{name}"
        fn.__doc__ = f"Tool {name}."
        return tool(fn)

    tools = [make("a", 50), make("b", 0), make("c", 25)]
    agent = Agent(name="worker", instructions="You are the worker.", tools=tools)
    with Session.connect(url=sim.url, agent=agent) as session:
        final = session.ask("[tools: tool_a, tool_b, tool_c]", timeout=UNIT)
        assert "slept_ms" in final.text or "tool" in final.text
        assert session.wait_idle(UNIT)
    wire = _wire(sim)
    outputs = [i for i, e in enumerate(wire) if e["type"] == "conversation.item.create"
               and e["item"]["type"] == "function_call_output"]
    creates = [i for i, e in enumerate(wire) if e["type"] == "response.create"]
    assert len(outputs) == 3 and len(creates) == 2
    assert max(outputs) < creates[1]  # all outputs, then the one follow-up
    assert {json.loads(wire[i]["item"]["output"])["tool"] for i in outputs} == {"a", "b", "c"}
    assert max(started.values()) - min(started.values()) < 0.045  # they ran in parallel


@pytest.fixture
def stuck() -> Iterator[threading.Event]:
    """An event a deliberately slow tool waits on; released at teardown."""
    ev = threading.Event()
    yield ev
    ev.set()


def test_tool_errors_reach_model_and_app(sim: Simulator, stuck: threading.Event):
    """A raising tool, bad arguments, a timed-out tool: error outputs, tool.error events, session goes on."""

    @tool
    def explode() -> str:
        """Always fails."""
        raise RuntimeError("kaboom")

    @tool(timeout=0.2)
    def slow() -> str:
        """Never finishes in time."""
        stuck.wait(3 * UNIT)
        return "late"

    @tool
    def needs_id(order_id: int) -> str:
        """Needs an integer id."""
        return str(order_id)

    agent = Agent(name="desk", instructions="You are the desk.", tools=[explode, slow, needs_id])
    # The model is shown a needs_id without parameters, so it calls it with {}: invalid for our tool.
    loose = [{"type": "function", "name": "needs_id", "description": "x", "parameters": {"type": "object"}},
             explode.definition(), slow.definition()]
    with Session.connect(url=sim.url, agent=agent) as session:
        errors = session.events("tool.error")
        final = session.ask("[tools: explode, slow, needs_id]", timeout=UNIT, tools=loose)
        assert final.status == "completed"
        got = {}
        for _ in range(3):
            ev = errors.get(UNIT)
            assert ev is not None
            got[ev.name] = ev.error
        assert "kaboom" in got["explode"]
        assert "timed out" in got["slow"] or "timeout" in got["slow"]
        assert "order_id" in got["needs_id"]
        assert session.ask("still there?", timeout=UNIT).status == "completed"
    outputs = {e["item"]["call_id"]: json.loads(e["item"]["output"]) for e in _wire(sim)
               if e["type"] == "conversation.item.create" and e["item"]["type"] == "function_call_output"}
    assert len(outputs) == 3 and all("error" in o for o in outputs.values())


def test_app_handoff_from_another_thread_while_streaming():
    """Session.handoff from another thread mid-response: no conflict, no lost response, order kept."""
    a, b = Agent(name="alpha", instructions="You are alpha."), Agent(name="bravo", instructions="You are bravo.")
    with Simulator(speed=4.0, seed=3) as sim, Session.connect(url=sim.url, agent=a, agents=[b]) as session:
        streaming = session.events("response.output_audio.delta")
        first = session.create_response(instructions="You are alpha. [len: 30]")
        assert streaming.get(UNIT) is not None
        box: dict[str, Any] = {}
        t = threading.Thread(target=lambda: box.update(h=session.handoff(b)), name="test-app-handoff")
        t.start()
        t.join(UNIT)
        assert first.wait(UNIT).status == "completed"
        second = box["h"].wait(UNIT)
        assert second.status == "completed" and session.agent.name == "bravo"
        assert "bravo" in second.text
    assert sim.stats()["conflicts"] == 0
    wire = _wire(sim)
    upd = max(i for i, e in enumerate(wire) if e["type"] == "session.update")
    assert wire[upd + 1]["type"] == "response.create"


def test_cancelled_response_with_tool_call_is_not_run():
    """A cancelled response's tool call is never run and no follow-up is created."""
    calls: list[str] = []

    @tool
    def weather(city: str) -> str:
        """Get the weather for a city."""
        calls.append(city)
        return "sunny"

    agent = Agent(name="w", instructions="You are w.", tools=[weather])
    # withhold_done keeps the response open after its call, as a slow real model
    # does, so the user's cancel lands between the call and response.done.
    plan = rtqueue.FaultPlan(withhold_done=1)
    with Simulator(speed=None, seed=3, faults=plan) as sim, Session.connect(url=sim.url, agent=agent) as session:
        skipped = session.events("tool.skipped")
        args_done = session.events("response.function_call_arguments.done")
        session.send_text("weather in Paris")
        handle = session.create_response()
        assert args_done.get(UNIT) is not None
        cancelled = session.cancel(timeout=UNIT)
        assert cancelled is not None and cancelled.status == "cancelled"
        assert [c["name"] for c in cancelled.function_calls] == ["weather"]
        assert handle.wait(UNIT).status == "cancelled"
        ev = skipped.get(UNIT)
        assert ev is not None and ev.name == "weather"
        assert handle.final(UNIT).id == handle.response_id  # no follow-up
        assert session.wait_idle(UNIT)
        assert session.ask("and tomorrow?", timeout=UNIT).status == "completed"
    assert calls == []
    creates = [e for e in _wire(sim) if e["type"] == "response.create"]
    assert len(creates) == 2  # the cancelled one and the user's next turn; no follow-up
    outputs = [e for e in _wire(sim) if e["type"] == "conversation.item.create"
               and e["item"]["type"] == "function_call_output"]
    assert len(outputs) == 1 and "not run" in outputs[0]["item"]["output"]


def test_no_stale_followup_after_user_starts_new_turn(sim: Simulator, stuck: threading.Event):
    """Tools still running when the user speaks again: outputs sent, no stale follow-up."""
    entered = threading.Event()

    @tool
    def slow_lookup(order_id: str) -> str:
        """Slow lookup of an order."""
        entered.set()
        stuck.wait(UNIT)
        return "found"

    agent = Agent(name="d", instructions="You are d.", tools=[slow_lookup])
    with Session.connect(url=sim.url, agent=agent) as session:
        skipped = session.events("turn.followup_skipped")
        session.send_text("[tools: slow_lookup] order 7")
        first = session.create_response()
        assert entered.wait(UNIT)
        session.send_text("Never mind, new question.")  # the user moved on
        stuck.set()
        assert first.final(UNIT).id == first.wait(UNIT).id
        assert skipped.get(UNIT) is not None
        assert session.ask("What now?", timeout=UNIT).status == "completed"
    creates = [e for e in _wire(sim) if e["type"] == "response.create"]
    assert len(creates) == 2  # the first and the new turn's; no stale follow-up


def test_call_ids_are_handled_once(sim: Simulator):
    """A function call delivered twice (duplicated events) runs once."""
    calls: list[str] = []

    @tool
    def ping() -> str:
        """Ping."""
        calls.append("x")
        return "pong"

    agent = Agent(name="p", instructions="You are p.", tools=[ping])
    with Session.connect(url=sim.url, agent=agent) as session:
        sim.inject(FaultPlan(duplicate_events=1.0), session=0)  # every server event arrives twice
        final = session.ask("[tools: ping]", timeout=UNIT)
        assert session.wait_idle(UNIT)
        assert final.status == "completed"
        dones = [e for e in sim.server_events(0) if e["type"] == "response.done"
                 and any(o["type"] == "function_call" for o in e["response"]["output"])]
        assert len(dones) == 2  # the same response.done, sent twice
    assert calls == ["x"]


def test_cycles_by_name_and_voice_is_kept(sim: Simulator):
    """Agents refer to each other by name; a handoff asking another voice after audio keeps the voice."""
    greeter = Agent(name="greeter", instructions="You are the greeter.", handoffs=["returns"], voice="marin")
    returns = Agent(name="returns", instructions="You are returns.", handoffs=[handoff("greeter")], voice="cedar")
    with Session.connect(url=sim.url, agent=greeter, agents=[returns]) as session:
        kept = session.events("agent.voice_kept")
        session.ask("transfer me to returns", timeout=UNIT)
        assert session.agent.name == "returns"
        assert kept.get(UNIT) is not None
        session.ask("back to the greeter please", timeout=UNIT)
        assert session.agent.name == "greeter"
        assert session.session_config["audio"]["output"]["voice"] == "marin"
    assert "cannot_update_voice" not in sim.stats()["errors"]


def test_simulator_rejects_voice_change_after_audio(sim: Simulator):
    """The simulator answers a voice change after audio with cannot_update_voice, as OpenAI does."""
    with Session.connect(url=sim.url, voice="marin") as session:
        session.ask("hello", timeout=UNIT)
        with pytest.raises(rtqueue.ServerError) as info:
            session.update(audio={"output": {"voice": "cedar"}})
        assert info.value.code == "cannot_update_voice"
