"""Fuzzing the server-event parser and the reader's routing (issue 6).

Arbitrary JSON, text and bytes go through :func:`rtqueue.protocol.parse_frame`
and the session shell's :meth:`~rtqueue.shell.SessionShell.route` directly (no
sockets, no reader thread): the parser either returns an event dict with a
string ``type`` or raises :class:`ProtocolError`, and routing never raises
anything else, whatever the fields hold. A whole session is then driven through
:class:`rtqueue.testing.MockTransport` with junk frames, and finally a few
malformed frames come over a real socket from the simulator.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rtqueue
from rtqueue import Agent, FaultPlan, Session, Simulator, tool
from rtqueue.core import HANDLED_TYPES
from rtqueue.errors import ConnectionLost, ProtocolError
from rtqueue.protocol import BETA_ALIASES, METADATA_KEY, parse_frame
from rtqueue.shell import SessionShell
from rtqueue.testing import MockTransport
from rtqueue.transport import Transport
from tests.utils import UNIT

#: Examples per property (raise it with RTQ_FUZZ_EXAMPLES for a long hunt).
EXAMPLES = int(os.environ.get("RTQ_FUZZ_EXAMPLES", "100"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=8,
)

#: Every type the session handles specially, plus a few it does not know.
EVENT_TYPES = sorted(
    set(HANDLED_TYPES)
    | set(BETA_ALIASES)
    | {
        "response.output_text.delta",
        "response.output_audio_transcript.delta",
        "response.output_audio.done",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "x.unknown.event",
        "",
    }
)

ids = st.sampled_from(["resp_1", "resp_2", "evt_1", "item_1", "call_1"]) | json_values


@st.composite
def responses(draw: st.DrawFn) -> Any:
    """A ``response`` object: mostly well-formed ids and metadata, with junk in any field."""
    if draw(st.booleans()):
        return draw(json_values)
    obj: dict[str, Any] = {"id": draw(ids)}
    if draw(st.booleans()):
        obj["metadata"] = draw(st.fixed_dictionaries({METADATA_KEY: ids}) | json_values)
    if draw(st.booleans()):
        obj["conversation_id"] = draw(st.none() | st.text(max_size=5) | json_values)
    if draw(st.booleans()):
        obj["output"] = draw(st.lists(items(), max_size=3) | json_values)
    for key in ("status", "status_details", "usage"):
        if draw(st.booleans()):
            obj[key] = draw(json_values)
    return obj


@st.composite
def items(draw: st.DrawFn) -> Any:
    """A conversation item: messages and function calls with junk content."""
    if draw(st.integers(0, 4)) == 0:
        return draw(json_values)
    return {
        "id": draw(ids),
        "type": draw(st.sampled_from(["message", "function_call", "function_call_output"]) | json_values),
        "role": draw(st.sampled_from(["user", "assistant", "system"]) | json_values),
        "call_id": draw(ids),
        "name": draw(st.sampled_from(["lookup_order", "transfer_to_bravo"]) | json_values),
        "arguments": draw(json_values),
        "content": draw(
            st.lists(
                st.fixed_dictionaries(
                    {"type": st.sampled_from(["input_text", "output_audio", "input_audio"]) | json_values,
                     "text": json_values, "transcript": json_values}
                ) | json_values,
                max_size=3,
            ) | json_values
        ),
    }


@st.composite
def server_events(draw: st.DrawFn) -> dict[str, Any]:
    """A server event of a routed type whose every field may be anything."""
    event: dict[str, Any] = {"type": draw(st.sampled_from(EVENT_TYPES))}
    fields = {
        "event_id": ids,
        "response": responses(),
        "item": items(),
        "error": st.fixed_dictionaries({"code": json_values, "message": json_values, "event_id": ids,
                                        "type": json_values, "param": json_values}) | json_values,
        "session": json_values,
        "response_id": ids,
        "item_id": ids,
        "delta": st.text(max_size=40) | json_values,
        "transcript": json_values,
        "audio_start_ms": json_values,
    }
    for key, strat in fields.items():
        if draw(st.booleans()):
            event[key] = draw(strat)
    extra = draw(st.dictionaries(st.text(max_size=8), json_values, max_size=3))
    return {**extra, **event}


def _offline_shell(*, agents_and_audio: bool = False) -> SessionShell:
    """A session shell that was never connected: routing works on its core, no socket thread runs.

    With ``agents_and_audio`` it also has agents (tool calls and handoffs go
    to its tool worker) and an audio link with a speaker.
    """

    def no_connection() -> Transport:
        raise AssertionError("the fuzz tests never connect")

    shell = SessionShell(no_connection)
    if agents_and_audio:
        from rtqueue.agents import resolve_agents
        from rtqueue.audio import AudioIO, NullSpeaker
        from rtqueue.audio_session import AudioLink

        bravo = Agent(name="bravo", instructions="You are bravo.", tools=[lookup_order])
        alpha = Agent(name="alpha", instructions="You are alpha.", tools=[lookup_order], handoffs=[bravo])
        shell.use_agents(resolve_agents(alpha, (bravo,)), alpha, {"type": "realtime"})
        shell.audio = AudioLink(shell, AudioIO(output=NullSpeaker(realtime=False)))
    return shell


def _route_all(shell: SessionShell, events: list[dict[str, Any]]) -> None:
    """Route every event; a ProtocolError (an event without a usable response id) is allowed, nothing else."""
    for event in events:
        try:
            shell.route(event)
        except ProtocolError:
            pass


@tool
def lookup_order(order_id: str) -> dict:
    """Look up an order by its id."""
    return {"order_id": order_id}


# -- the parser --------------------------------------------------------------------------------


@SETTINGS
@given(json_values)
def test_parse_frame_arbitrary_json(value: Any):
    """Any JSON text parses to an event with a str type, or raises ProtocolError."""
    _check_parse(json.dumps(value))


@SETTINGS
@given(st.text(max_size=200))
def test_parse_frame_arbitrary_text(text: str):
    """Any text frame parses to an event with a str type, or raises ProtocolError."""
    _check_parse(text)


@SETTINGS
@given(st.binary(max_size=200))
def test_parse_frame_arbitrary_bytes(data: bytes):
    """A binary frame is always a ProtocolError (the Realtime API sends text)."""
    with pytest.raises(ProtocolError):
        parse_frame(data)


def test_parse_frame_deep_nesting_is_a_protocol_error():
    """Pathologically deep JSON is reported, not a RecursionError in the reader."""
    _check_parse("[" * 100_000 + "]" * 100_000)
    _check_parse('{"type": "x", "a": ' + "[" * 100_000 + "]" * 100_000 + "}")


def _check_parse(frame: str) -> None:
    try:
        event = parse_frame(frame)
    except ProtocolError as exc:
        assert exc.frame is None or len(exc.frame) <= 200
        return
    assert isinstance(event, dict) and isinstance(event["type"], str)
    assert event["type"] not in BETA_ALIASES


# -- routing -------------------------------------------------------------------------------------


@SETTINGS
@given(st.lists(server_events(), min_size=1, max_size=12))
def test_route_arbitrary_events_never_raises(events: list[dict[str, Any]]):
    """Routing any sequence of odd events raises at most ProtocolError and keeps the tables consistent."""
    shell = _offline_shell()
    try:
        _route_all(shell, events)
        # The state stays usable: well-formed events still work afterwards.
        shell.route({"type": "response.created", "response": {"id": "resp_ok", "metadata": {}}})
        assert "resp_ok" in {e.response_id for e in shell.gate.entries()}
        shell.route({"type": "response.done", "response": {"id": "resp_ok", "status": "completed", "output": []}})
        assert "resp_ok" not in {e.response_id for e in shell.gate.entries()}
    finally:
        shell.close(UNIT)


@SETTINGS
@given(st.lists(server_events(), min_size=1, max_size=8))
def test_route_with_pending_create_resolves_or_keeps_handle(events: list[dict[str, Any]]):
    """With a real pending create in the gate, odd events never raise and never corrupt its handle."""
    shell = _offline_shell()
    try:
        handle = shell.new_response_handle()
        shell.run(lambda core: core.create_response({}, handle, now=0.0))  # queued in the (not running) writer
        assert shell.gate.acquire(handle.event_id or "", 0)
        _route_all(shell, events)
        if handle.done():
            assert handle.result() is not None or isinstance(handle.error, rtqueue.RtqueueError)
    finally:
        shell.close(UNIT)


@SETTINGS
@given(st.lists(server_events(), min_size=1, max_size=12))
def test_route_with_agents_and_audio_never_raises(events: list[dict[str, Any]]):
    """The same with tool calls, handoffs and audio in play: the reader's part never raises."""
    shell = _offline_shell(agents_and_audio=True)
    try:
        _route_all(shell, events)
    finally:
        shell.close(UNIT)


# -- the reader loop -------------------------------------------------------------------------------


frames = (
    st.binary(max_size=50)
    | st.text(max_size=80)
    | json_values.map(json.dumps)
    | server_events().map(json.dumps)
)


@SETTINGS
@given(st.lists(frames, max_size=15))
def test_reader_loop_survives_any_frames(raw: list[str | bytes]):
    """The reader processes every frame, reports bad ones, and ends only at the close."""
    transport = MockTransport()
    with Session.connect(transport=transport, reconnect=False) as session:
        errors = session.events("rtqueue.error")
        closed = session.events("session.closed")
        for frame in raw:
            transport.push_raw(frame)
        transport.push(type="session.updated", session={"type": "realtime", "instructions": "sentinel"})
        transport.close_from_server(1000)
        assert closed.get(UNIT) is not None  # the reader reached the close
        assert session.session_config.get("instructions") == "sentinel"  # and the last frame before it
        with pytest.raises(ConnectionLost):
            session.create_response()
        bad = sum(1 for f in raw if _unparsable(f))
        reported = 0
        while errors.get(0) is not None:
            reported += 1
        assert reported >= bad


def _unparsable(frame: str | bytes) -> bool:
    try:
        parse_frame(frame)
    except ProtocolError:
        return True
    return False


# -- over a real socket ----------------------------------------------------------------------------


def test_malformed_frames_over_the_socket_are_reported_and_harmless():
    """Malformed JSON, a binary frame, an unknown type and duplicates: two errors reported, the session works."""
    plan = FaultPlan(malformed_json_after=2, binary_frame_after=4, unknown_event_after=6, duplicate_events=0.3)
    with Simulator(speed=None, seed=12) as sim, Session.connect(url=sim.url) as session:
        errors = session.events("rtqueue.error")
        sim.inject(plan, session=0)
        for i in range(3):
            assert session.ask(f"hello {i}", timeout=UNIT).status == "completed"
        assert session.wait_idle(UNIT)
        reported = [errors.get(UNIT), errors.get(UNIT)]
        assert all(e is not None and isinstance(e.error, ProtocolError) for e in reported)
        assert errors.get(0.05) is None  # the unknown type and the duplicates are not errors
        assert session.gate.depth() == 0
    faults = sim.stats()["faults"]
    assert faults["malformed_json_after"] == 1 and faults["binary_frame_after"] == 1
    assert faults["unknown_event_after"] == 1 and faults["duplicate_events"] >= 1
