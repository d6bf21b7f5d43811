"""OpenTelemetry spans (rtqueue.telemetry) and the GA session's tracing field."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from rtqueue import Agent, Session, tool
from rtqueue.errors import InvalidArgument
from rtqueue.telemetry import Telemetry
from rtqueue.testing import MockTransport, ScriptedServer
from tests.utils import UNIT

otel_sdk = pytest.importorskip("opentelemetry.sdk.trace")
from opentelemetry import trace  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

_EXPORTER = InMemorySpanExporter()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """A process-wide SDK provider (it can be set once) exporting to memory; cleared per test."""
    if not isinstance(trace.get_tracer_provider(), otel_sdk.TracerProvider):
        provider = otel_sdk.TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        trace.set_tracer_provider(provider)
    _EXPORTER.clear()
    yield _EXPORTER


@tool
def lookup_order(order_id: str) -> dict:
    """Look up an order by its id."""
    return {"order_id": order_id, "status": "shipped"}


def test_spans_for_session_turns_responses_tools_and_handoffs(spans: InMemorySpanExporter):
    """A desk with a handoff and a tool: one session span, a span per turn, response, tool call and handoff."""
    returns = Agent(name="returns", instructions="You are returns.", tools=[lookup_order])
    desk = Agent(name="desk", instructions="You are the desk.", handoffs=[returns])
    with Session.connect(transport=ScriptedServer().transport, agent=desk, name="otel-desk") as session:
        session.ask("transfer me to returns", timeout=UNIT)
        answer = session.ask("[tools: lookup_order] order 42", timeout=UNIT)
    done = spans.get_finished_spans()
    by_name: dict[str, list] = {}
    for s in done:
        by_name.setdefault(s.name, []).append(s)
    [sess] = by_name["rtqueue.session"]
    assert sess.attributes["rtqueue.session.name"] == "otel-desk"
    assert len(by_name["rtqueue.turn"]) == 2
    assert by_name["rtqueue.turn"][-1].attributes["rtqueue.response.id"] == answer.id
    responses = by_name["rtqueue.response"]
    assert len(responses) == 4  # handoff call, its follow-up, tool call, its follow-up
    assert all(r.attributes["rtqueue.response.status"] == "completed" for r in responses)
    assert all("rtqueue.gate_wait_ms" in r.attributes for r in responses)  # all ours
    assert [r.attributes["rtqueue.agent"] for r in responses] == ["desk", "returns", "returns", "returns"]
    [call] = by_name["rtqueue.tool"]
    assert call.attributes["rtqueue.tool.name"] == "lookup_order" and call.attributes["rtqueue.agent"] == "returns"
    assert call.attributes["rtqueue.response.id"] == responses[2].attributes["rtqueue.response.id"]
    [handoff] = by_name["rtqueue.handoff"]
    assert handoff.attributes["rtqueue.handoff.target"] == "returns"
    assert all(s.parent is not None and s.parent.span_id == sess.context.span_id
               for s in done if s.name != "rtqueue.session")


def test_disabled_telemetry_does_nothing():
    """Telemetry(enabled=False) (as without opentelemetry-api) emits nothing and never fails."""
    t = Telemetry(enabled=False)
    assert not t.enabled
    t.session_started("x")
    t.response_created("resp_1", "a", 0.1)
    t.response_done("resp_1", "completed")
    t.end_turn(t.turn("hi"), "resp_1")
    t.tool_call(name="n", call_id="c", agent=None, response_id=None, ok=True, duration_ms=1.0)
    t.handoff("a", "b")
    t.session_closed()


def test_tracing_field_reaches_the_session_update():
    """connect(tracing=...) sets the GA session's tracing field; a bad value is refused before connecting."""
    mock = MockTransport()
    with Session.connect(transport=mock, tracing={"workflow_name": "desk", "group_id": "g1"}, reconnect=False):
        update = mock.wait_sent(lambda e: e["type"] == "session.update")
    assert update["session"]["tracing"] == {"workflow_name": "desk", "group_id": "g1"}
    mock2 = MockTransport()
    with Session.connect(transport=mock2, tracing="auto", reconnect=False):
        assert mock2.wait_sent(lambda e: e["type"] == "session.update")["session"]["tracing"] == "auto"
    with pytest.raises(InvalidArgument):
        Session.connect(transport=MockTransport(), tracing={"workflow": "x"})
