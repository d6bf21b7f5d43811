"""rtqueue.testing: the mock transport and the socketless scripted server, and what they make testable."""

from __future__ import annotations

import threading
from typing import Any

import pytest

import rtqueue
from rtqueue import Agent, Session, tool
from rtqueue.audio import AudioIO, NullSpeaker
from rtqueue.errors import AudioUnavailable, ConnectionLost, InvalidArgument, SessionClosed
from rtqueue.protocol import METADATA_KEY
from rtqueue.testing import MockTransport, ScriptedServer
from tests.utils import UNIT


@tool
def lookup_order(order_id: str) -> dict:
    """Look up an order by its id."""
    return {"order_id": order_id, "status": "shipped"}


def test_scripted_server_runs_agents_tools_and_handoffs_without_a_socket():
    """A two-agent desk on ScriptedServer: the tool runs under its agent, the handoff lands, no conflicts."""
    returns = Agent(name="returns", instructions="You are returns.", tools=[lookup_order])
    greeter = Agent(name="greeter", instructions="You are the greeter.", handoffs=[returns])
    server = ScriptedServer(seed=3)
    with Session.connect(transport=server.transport, agent=greeter) as session:
        results = session.events("tool.result", "agent.handoff")
        session.ask("transfer me to returns", timeout=UNIT)
        assert session.agent is not None and session.agent.name == "returns"
        answer = session.ask("[tools: lookup_order] where is order 42", timeout=UNIT)
        assert "shipped" in answer.text and answer.agent == "returns"
        seen = [results.get(UNIT), results.get(UNIT)]
        assert [e.type for e in seen if e is not None] == ["agent.handoff", "tool.result"]
        assert seen[1] is not None and seen[1]["agent"] == "returns"
    stats = server.connections[0].stats()
    assert stats["conflicts"] == 0 and server.connections[0].internal_errors == []


def test_scripted_server_serves_a_reconnect_on_a_new_connection():
    """The transport factory is called again after a drop: the session reconnects and answers."""
    server = ScriptedServer()
    with Session.connect(transport=server.transport, instructions="Be brief.",
                         reconnect=rtqueue.ReconnectPolicy(initial_backoff=0.01)) as session:
        reconnected = session.events("session.reconnected")
        assert session.ask("[say: one]", timeout=UNIT).text == "one"
        server.transports[0].drop()
        assert reconnected.get(UNIT) is not None
        assert session.ask("[say: two]", timeout=UNIT).text == "two"
    assert len(server.connections) == 2
    replay = [e["type"] for e in server.client_events(1)]
    assert replay[0] == "session.update" and "conversation.item.create" in replay


def test_mock_transport_lets_the_test_be_the_server():
    """The test answers the create itself; the handle resolves with what it pushed."""
    mock = MockTransport()
    with Session.connect(transport=mock, reconnect=False) as session:
        handle = session.create_response(instructions="hi")
        sent = mock.wait_sent(lambda e: e["type"] == "response.create")
        assert sent["response"]["instructions"] == "hi" and METADATA_KEY in sent["response"]["metadata"]
        meta = sent["response"]["metadata"]
        mock.push(type="response.created", response={"id": "resp_1", "metadata": meta, "conversation_id": "c"})
        mock.push(type="response.done", response={"id": "resp_1", "status": "completed", "metadata": meta,
                                                  "output": [{"type": "message", "role": "assistant",
                                                              "content": [{"type": "output_text",
                                                                           "text": "hello"}]}]})
        assert handle.wait(UNIT).text == "hello"


def test_metadata_echo_missing_still_matches_the_pending_create():
    """A proxy that drops response.metadata: the 16-pair create is matched as the one pending create."""
    mock = MockTransport()
    with Session.connect(transport=mock, reconnect=False) as session:
        meta = {f"k{i}": str(i) for i in range(16)}
        handle = session.create_response(metadata=meta)
        sent = mock.wait_sent(lambda e: e["type"] == "response.create")
        assert sent["response"]["metadata"] == meta  # no 17th pair
        mock.push(type="response.created", response={"id": "resp_1", "conversation_id": "c"})
        mock.push(type="response.done", response={"id": "resp_1", "status": "completed", "output": []})
        assert handle.wait(UNIT).id == "resp_1" and handle.response_id == "resp_1"
        assert session.gate.depth() == 0


def test_update_is_answered_and_its_error_raised():
    """update() returns the session the mock reports; a refused update raises ServerError."""

    def refuse_voice(event: dict[str, Any]) -> list[dict[str, Any]]:
        if event["type"] == "session.update" and "voice" in event["session"].get("audio", {}).get("output", {}):
            return [{"type": "error", "error": {"code": "cannot_update_voice", "message": "no",
                                                "event_id": event["event_id"]}}]
        return []

    mock = MockTransport(refuse_voice)
    mock.auto_update = True
    with Session.connect(transport=mock, reconnect=False) as session:
        assert session.update(instructions="x", timeout=UNIT)["instructions"] == "x"
        mock.auto_update = False
        with pytest.raises(rtqueue.ServerError) as info:
            session.update(audio={"output": {"voice": "cedar"}}, timeout=UNIT)
        assert info.value.code == "cannot_update_voice"


def test_server_close_ends_the_session_and_later_calls_raise_its_error():
    """A server close without reconnect: session.closed is published, calls raise ConnectionLost at once."""
    mock = MockTransport()
    with Session.connect(transport=mock, reconnect=False) as session:
        closed = session.events("session.closed")
        mock.close_from_server(1011, "internal")
        assert closed.get(UNIT) is not None
        with pytest.raises(ConnectionLost):
            session.ask("hello")
    with pytest.raises(SessionClosed):
        session.create_response()


class _BrokenSpeaker(NullSpeaker):
    def start(self) -> None:
        raise AudioUnavailable("the device vanished")


def test_connect_failing_half_way_leaves_nothing_running():
    """An audio device that fails to start after the socket opened: connect raises, every thread ends."""
    before = set(threading.enumerate())
    mock = MockTransport()
    with pytest.raises(AudioUnavailable):
        Session.connect(transport=mock, audio=AudioIO(output=_BrokenSpeaker(realtime=False)), reconnect=False)
    assert mock.closed
    assert [t.name for t in threading.enumerate() if t not in before and t.name.startswith("rtqueue-")] == []


def test_transport_argument_is_checked():
    """transport= must be a Transport or a factory; an instance serves one connection only."""
    with pytest.raises(InvalidArgument):
        Session.connect(transport=42)  # type: ignore[arg-type]


# -- the review's findings, each end to end -------------------------------------------------------


def test_concurrent_asks_with_tools_each_get_their_final_answer():
    """4 threads x 3 ask() that call a tool: every ask returns its own tool-informed answer, never the call."""
    desk = Agent(name="desk", instructions="You are the desk.", tools=[lookup_order])
    answers: list[tuple[str, Any]] = []
    lock = threading.Lock()
    with rtqueue.Simulator(speed=20, seed=5) as sim, Session.connect(url=sim.url, agent=desk) as session:

        def asker(n: int) -> None:
            for k in range(3):
                order = f"{n}{k}7"
                r = session.ask(f"[tools: lookup_order] where is order {order}", timeout=3 * UNIT)
                with lock:
                    answers.append((order, r))

        workers = [threading.Thread(target=asker, args=(n,), name=f"asker-{n}") for n in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(6 * UNIT)
        assert not any(w.is_alive() for w in workers)
        assert session.wait_idle(UNIT)
        assert sim.stats()["conflicts"] == 0
    assert len(answers) == 12
    for order, r in answers:
        assert not r.function_calls and order in r.text and "shipped" in r.text, (order, r.text)


class _Swallow(MockTransport):
    """A first connection that loses what is sent to it: the create (and what follows) drops the socket."""

    def send(self, text: str) -> None:
        if '"response.create"' in text:
            self.drop()
            raise ConnectionLost("the line went dead")
        super().send(text)


def test_a_turn_whose_create_dies_with_the_socket_is_asked_again_with_its_question():
    """The user item went out, the create did not, nothing was echoed: the new socket gets both."""
    server = ScriptedServer()
    made: list[MockTransport] = []

    def factory() -> MockTransport:
        made.append(_Swallow() if not made else server.transport())
        return made[-1]

    with Session.connect(transport=factory, reconnect=rtqueue.ReconnectPolicy(initial_backoff=0.01)) as session:
        assert session.ask("[say: still here]", timeout=UNIT).text == "still here"
    second = [(e["type"], e.get("item", {}).get("role")) for e in server.client_events(0)]
    assert ("conversation.item.create", "user") in second and ("response.create", None) in second


def test_update_waiting_across_a_reconnect_is_answered_by_the_replay():
    """update() whose session.updated never came on the old socket returns once the new one confirms it."""
    server = ScriptedServer()
    made: list[MockTransport] = []

    def factory() -> MockTransport:
        made.append(MockTransport() if not made else server.transport())
        return made[-1]

    with Session.connect(transport=factory, reconnect=rtqueue.ReconnectPolicy(initial_backoff=0.01)) as session:
        made[0].auto_update = False  # the old server never answers the next update
        out: list[Any] = []
        t = threading.Thread(target=lambda: out.append(session.update(instructions="be terse", timeout=UNIT)))
        t.start()
        made[0].wait_sent(lambda e: e["type"] == "session.update")
        made[0].drop()
        t.join(2 * UNIT)
        assert out and out[0]["instructions"] == "be terse"


def test_out_of_band_ask_sends_its_question_as_the_response_input():
    """ask(conversation="none"): the question is the response's input; the conversation is untouched."""
    server = ScriptedServer()
    with Session.connect(transport=server.transport) as session:
        assert session.ask("[say: aside]", conversation="none", timeout=UNIT).text == "aside"
        assert session.items == []
    [create] = [e for e in server.client_events(0) if e["type"] == "response.create"]
    assert create["response"]["conversation"] == "none" and create["response"]["input"][0]["role"] == "user"


def test_handoff_target_raising_system_exit_is_answered_and_the_worker_lives():
    """A target whose instructions raise SystemExit: the model is told, the next tool call still runs."""

    def broken(ctx: Any) -> str:
        raise SystemExit("instructions unavailable")

    billing = Agent(name="billing", instructions=broken)
    desk = Agent(name="desk", instructions="You are the desk.", tools=[lookup_order], handoffs=[billing])
    server = ScriptedServer()
    with Session.connect(transport=server.transport, agent=desk) as session:
        failed = session.events("agent.handoff_failed")
        session.ask("transfer me to billing", timeout=UNIT)
        ev = failed.get(UNIT)
        assert ev is not None and ev["target"] == "billing" and session.agent is not None
        assert session.agent.name == "desk"
        assert "shipped" in session.ask("[tools: lookup_order] order 9", timeout=UNIT).text


def test_four_agent_triage_with_app_handoffs_and_barge_ins_resolves_every_call_under_its_agent():
    """Model and app handoffs mixed with barge-ins: every tool runs under the agent whose response called it."""
    import random

    @tool
    def check_balance(account: str) -> dict:
        """Check an account balance."""
        return {"account": account, "balance": 10}

    @tool
    def track_parcel(order_id: str) -> dict:
        """Track a parcel."""
        return {"order_id": order_id, "where": "depot"}

    billing = Agent(name="billing", instructions="You are billing.", tools=[check_balance],
                    handoffs=["triage", "shipping"])
    shipping = Agent(name="shipping", instructions="You are shipping.", tools=[track_parcel],
                     handoffs=["triage", "billing"])
    human = Agent(name="human", instructions="You are a human.", handoffs=["triage"])
    triage = Agent(name="triage", instructions="You are triage.", handoffs=[billing, shipping, human])
    rng = random.Random(7)
    results: list[rtqueue.Event] = []
    stop = threading.Event()
    with rtqueue.Simulator(speed=10, seed=11) as sim, Session.connect(
        url=sim.url, agent=triage, agents=[billing, shipping, human]
    ) as session:
        session.on("tool.result", results.append)
        session.on("tool.error", results.append)

        def meddle() -> None:  # the app: handoffs and barge-ins at random moments
            while not stop.wait(rng.uniform(0.02, 0.15)):
                try:
                    if rng.random() < 0.5:
                        session.handoff(rng.choice(["triage", "billing", "shipping", "human"]), respond=False)
                    else:
                        session.interrupt(timeout=UNIT)
                except rtqueue.SessionClosed:
                    return

        meddler = threading.Thread(target=meddle, name="test-meddler")
        meddler.start()
        lines = ["transfer me to billing", "[tools: check_balance] account 5", "transfer me to shipping",
                 "[tools: track_parcel] order 8", "transfer me to triage", "[tools: check_balance] account 2"]
        try:
            for line in lines * 2:
                session.ask(line, timeout=3 * UNIT)
        finally:
            stop.set()
            meddler.join(UNIT)
        assert session.wait_idle(UNIT)
        assert sim.stats()["conflicts"] == 0
    owner = {"check_balance": "billing", "track_parcel": "shipping"}
    ran = [e for e in results if e.type == "tool.result"]
    assert ran and all(e["agent"] == owner[e["name"]] for e in ran)
    # The [tools:] hook makes the model call a tool even when the meddler had handed the conversation to
    # an agent without it: only then is a call "unknown", judged by the agent of the calling response.
    unknown = [e for e in results if e.type == "tool.error" and "unknown tool" in str(e.get("error"))]
    assert all(e["agent"] != owner[e["name"]] for e in unknown)


def test_a_proxy_that_strips_response_metadata_does_not_leave_creates_hanging():
    """No metadata echo at all: each create is matched as the one pending; answers resolve their handles."""
    mock = MockTransport()
    with Session.connect(transport=mock, reconnect=False) as session:
        for n in range(3):
            handle = session.create_response(instructions=f"answer {n}")
            sent = mock.wait_sent(lambda e, n=n: e["type"] == "response.create"
                                  and e["response"].get("instructions") == f"answer {n}")
            assert METADATA_KEY in sent["response"]["metadata"]  # tagged, but the proxy drops it
            rid = f"resp_{n}"
            mock.push(type="response.created", response={"id": rid, "conversation_id": "c", "metadata": None})
            mock.push(type="response.done", response={"id": rid, "status": "completed", "metadata": None,
                                                      "output": []})
            assert handle.wait(UNIT).id == rid and handle.response_id == rid
        assert session.gate.depth() == 0


def test_client_recording_notes_each_creates_gate_wait_and_the_timeline_draws_it(tmp_path: Any):
    """record=...: a create that waited in the gate carries note.gate_wait_ms; the timeline shows that wait."""
    from rtqueue.recording import read_recording
    from rtqueue.timeline import build_bars

    path = tmp_path / "call.jsonl"
    with rtqueue.Simulator(speed=10, seed=2) as sim, Session.connect(url=sim.url, record=path,
                                                                     name="rec") as session:
        first = session.create_response(instructions="[len: 30]")
        second = session.create_response(instructions="[say: after]")  # waits for the first
        assert second.wait(UNIT).text == "after" and first.done()
    rec = read_recording(path)
    creates = [f for f in rec.frames if f.type == "response.create"]
    assert len(creates) == 2 and creates[1].note is not None and creates[1].note["gate_wait_ms"] > 50
    gates = [b for b in build_bars(rec) if b.kind == "gate" and b.label == "waited in the gate"]
    assert gates and abs((gates[-1].end - gates[-1].start) * 1000 - creates[1].note["gate_wait_ms"]) < 1
