"""Tool approvals and hosted MCP on the simulator: handler, app answers, timeouts, MCP approval requests."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest

from rtqueue import (
    Agent,
    ApprovalDecision,
    ApprovalRequest,
    HostedMCP,
    InvalidArgument,
    Session,
    Simulator,
    tool,
)
from tests.utils import UNIT

RAN: list[str] = []


@tool(needs_approval=True)
def refund(order_id: str, amount: float) -> str:
    """Refund an order.

    Args:
        order_id: the order number
        amount: how much to refund
    """
    RAN.append(order_id)
    return json.dumps({"refunded": amount, "order": order_id})


@tool(needs_approval=lambda args: args["amount"] > 100)
def credit(order_id: str, amount: float) -> str:
    """Give store credit for an order.

    Args:
        order_id: the order number
        amount: how much credit
    """
    RAN.append(f"credit-{order_id}")
    return "credited"


DOCS = HostedMCP("docs", server_url="https://mcp.example.invalid/sse")


@pytest.fixture
def sim():
    with Simulator(speed=20.0) as s:
        yield s


@pytest.fixture(autouse=True)
def _clear():
    RAN.clear()


def _outputs(sim: Simulator) -> list[str]:
    return [e["item"]["output"] for e in sim.client_events()
            if e["type"] == "conversation.item.create" and e["item"].get("type") == "function_call_output"]


def test_handler_approval_runs_the_tool(sim: Simulator):
    """An approving handler sees the call's name and arguments; the tool runs and its result is used."""
    seen: list[ApprovalRequest] = []

    def handler(req: ApprovalRequest) -> bool:
        seen.append(req)
        return True

    desk = Agent("desk", instructions="You are the desk.", tools=[refund])
    with Session.connect(url=sim.url, agent=desk, approval_handler=handler, reconnect=False) as s:
        answer = s.ask("[tools: refund] refund order 42 amount 30", timeout=UNIT)
        stats = s.stats()["approvals"]
    assert RAN == ["42"]
    assert seen[0].name == "refund" and seen[0].kind == "function" and seen[0].agent == "desk"
    assert json.loads(seen[0].arguments)["order_id"] == "42"
    assert "30" in answer.text
    assert stats["approved"] == 1 and stats["rejected"] == 0
    assert sim.stats()["conflicts"] == 0


def test_handler_rejection_tells_the_model_why_and_never_runs(sim: Simulator):
    """A rejected call is not run; the model gets 'rejected: <reason>'."""
    desk = Agent("desk", instructions="You are the desk.", tools=[refund])
    with Session.connect(url=sim.url, agent=desk, reconnect=False,
                         approval_handler=lambda req: ApprovalDecision(False, "refunds need a manager")) as s:
        rejected: list[Any] = []
        s.on("tool.rejected", rejected.append)
        s.ask("[tools: refund] refund order 42 amount 30", timeout=UNIT)
        assert s.wait_idle(UNIT)
    assert RAN == []
    assert json.loads(_outputs(sim)[0]) == {"error": "rejected: refunds need a manager"}
    assert sim.stats()["conflicts"] == 0


def test_app_answers_a_published_request(sim: Simulator):
    """Without a handler, tool.approval_requested is published and session.approve() lets it run."""
    desk = Agent("desk", instructions="You are the desk.", tools=[refund])
    with Session.connect(url=sim.url, agent=desk, reconnect=False) as s:
        with s.events("tool.approval_requested") as requests:
            out: list[Any] = []
            t = threading.Thread(target=lambda: out.append(s.ask("[tools: refund] refund order 7 amount 5",
                                                                 timeout=UNIT)))
            t.start()
            req = requests.get(timeout=UNIT)
            assert req is not None and req["name"] == "refund"
            assert [p.call_id for p in s.pending_approvals()] == [req["call_id"]]
            s.approve(req["call_id"])
            t.join(UNIT)
        with pytest.raises(InvalidArgument):
            s.approve(req["call_id"])  # answered already
    assert RAN == ["7"] and out
    assert sim.stats()["conflicts"] == 0


def test_unanswered_request_falls_to_the_default(sim: Simulator):
    """No answer within approval_timeout: "reject" by default, "approve" when configured."""
    desk = Agent("desk", instructions="You are the desk.", tools=[refund])
    with Session.connect(url=sim.url, agent=desk, approval_timeout=0.2, reconnect=False) as s:
        s.ask("[tools: refund] refund order 1 amount 5", timeout=UNIT)
        assert s.stats()["approvals"]["timed_out"] == 1
    assert RAN == [] and "no answer within 0.2s" in _outputs(sim)[0]
    with Session.connect(url=sim.url, agent=desk, approval_timeout=0.2, approval_default="approve",
                         reconnect=False) as s:
        s.ask("[tools: refund] refund order 2 amount 5", timeout=UNIT)
    assert RAN == ["2"]


def test_predicate_decides_per_call(sim: Simulator):
    """needs_approval as a predicate: small credits run at once, large ones wait for a yes."""
    asked: list[str] = []
    desk = Agent("desk", instructions="You are the desk.", tools=[credit])

    def handler(req: ApprovalRequest) -> bool:
        asked.append(req.arguments)
        return False

    with Session.connect(url=sim.url, agent=desk, approval_handler=handler, reconnect=False) as s:
        s.ask("[tools: credit] credit order 5 amount 20", timeout=UNIT)
        s.ask("[tools: credit] credit order 6 amount 500", timeout=UNIT)
    assert RAN == ["credit-5"] and len(asked) == 1 and "500" in asked[0]


def test_agent_level_approval_covers_its_tools(sim: Simulator):
    """Agent(needs_approval=...) asks for its function tools even if the tool does not."""
    @tool
    def lookup(order_id: str) -> str:
        """Look up an order.

        Args:
            order_id: the order number
        """
        RAN.append(order_id)
        return "shipped"

    desk = Agent("desk", instructions="You are the desk.", tools=[lookup],
                 needs_approval=lambda name, args: name == "lookup")
    with Session.connect(url=sim.url, agent=desk, approval_handler=lambda r: False, reconnect=False) as s:
        s.ask("[tools: lookup] order 9", timeout=UNIT)
    assert RAN == []


def test_a_raising_handler_rejects(sim: Simulator):
    """An approval handler that raises rejects the call and publishes tool.approval_error."""
    def broken(req: ApprovalRequest) -> bool:
        raise RuntimeError("policy service down")

    desk = Agent("desk", instructions="You are the desk.", tools=[refund])
    with Session.connect(url=sim.url, agent=desk, approval_handler=broken, reconnect=False) as s, \
            s.events("tool.approval_error") as errors:
        s.ask("[tools: refund] refund order 3 amount 5", timeout=UNIT)
        err = errors.get(timeout=UNIT)
    assert err is not None and "policy service down" in err["message"]
    assert RAN == []


def test_close_while_an_approval_waits_returns_promptly(sim: Simulator):
    """close() wakes a tool job waiting for an answer; no thread is left."""
    desk = Agent("desk", instructions="You are the desk.", tools=[refund])
    s = Session.connect(url=sim.url, agent=desk, approval_timeout=100, reconnect=False)
    with s.events("tool.approval_requested") as requests:
        s.send_text("[tools: refund] refund order 4 amount 5")
        s.create_response()
        assert requests.get(timeout=UNIT) is not None
    s.close(timeout=UNIT)
    assert s.threads() == [] and RAN == []


# -- hosted MCP ------------------------------------------------------------------------------------


def test_hosted_mcp_definition_and_validation():
    """HostedMCP renders the GA mcp tool; the token never shows in its repr; bad values are refused."""
    server = HostedMCP("crm", connector_id="connector_x", allowed_tools=["find"], require_approval="never",
                       authorization="tok-secret-123")
    d = server.definition()
    assert d == {"type": "mcp", "server_label": "crm", "connector_id": "connector_x", "allowed_tools": ["find"],
                 "require_approval": "never", "authorization": "tok-secret-123"}
    assert "tok-secret-123" not in repr(server)
    with pytest.raises(InvalidArgument):
        HostedMCP("crm")  # neither url nor connector
    with pytest.raises(InvalidArgument):
        HostedMCP("bad label!", server_url="https://x.invalid")
    with pytest.raises(InvalidArgument):
        HostedMCP("crm", server_url="https://x.invalid", require_approval="sometimes")


def test_hosted_mcp_approval_request_is_answered_through_the_gate(sim: Simulator):
    """An mcp_approval_request is approved by the handler: mcp_approval_response + one follow-up, the call runs."""
    seen: list[ApprovalRequest] = []
    desk = Agent("desk", instructions="You are the desk.", mcp=[DOCS])
    with Session.connect(url=sim.url, agent=desk, reconnect=False,
                         approval_handler=lambda r: seen.append(r) or True) as s, \
            s.events("response.mcp_call.completed", "mcp_list_tools.completed") as stream:
        answer = s.ask("[mcp: docs.search] how do refunds work", timeout=UNIT)
        types = set()
        while len(types) < 2:
            ev = stream.get(timeout=UNIT)
            assert ev is not None
            types.add(ev.type)
    assert seen[0].kind == "mcp" and seen[0].server_label == "docs" and seen[0].name == "search"
    answers = [e["item"] for e in sim.client_events() if e["type"] == "conversation.item.create"
               and e["item"].get("type") == "mcp_approval_response"]
    assert len(answers) == 1 and answers[0]["approve"] is True and answers[0]["approval_request_id"] == seen[0].call_id
    assert "ok" in answer.text
    assert sim.stats()["conflicts"] == 0


def test_hosted_mcp_denied(sim: Simulator):
    """A rejected MCP call is answered approve: false and the model says it will not use the tool."""
    desk = Agent("desk", instructions="You are the desk.", mcp=[DOCS])
    with Session.connect(url=sim.url, agent=desk, reconnect=False,
                         approval_handler=lambda r: ApprovalDecision(False, "not now")) as s:
        answer = s.ask("[mcp: docs.search] how do refunds work", timeout=UNIT)
    answers = [e["item"] for e in sim.client_events() if e["type"] == "conversation.item.create"
               and e["item"].get("type") == "mcp_approval_response"]
    assert answers[0]["approve"] is False and answers[0]["reason"] == "not now"
    assert answer.text == "Okay, I will not use that tool."


def test_session_wide_mcp_survives_handoffs(sim: Simulator):
    """Session-wide hosted servers are in every agent's session.update, so a handoff keeps them."""
    a = Agent("a", instructions="You are agent a.")
    b = Agent("b", instructions="You are agent b.")
    with Session.connect(url=sim.url, agent=a.with_handoffs(b), mcp=[DOCS], reconnect=False) as s:
        s.handoff("b", respond=False)
        s.wait_idle(UNIT)
        tools = s.session_config.get("tools") or []
    updates = [e["session"] for e in sim.client_events() if e["type"] == "session.update"]
    assert all(any(t.get("type") == "mcp" and t["server_label"] == "docs" for t in u.get("tools", []))
               for u in updates if "tools" in u)
    assert any(t.get("type") == "mcp" for t in tools)


def test_a_hung_handler_is_bounded_by_the_timeout(sim: Simulator):
    """A handler slower than approval_timeout is overruled by approval_default; the call never runs."""
    release = threading.Event()

    def slow(req: ApprovalRequest) -> bool:
        release.wait(UNIT)
        return True

    desk = Agent("desk", instructions="You are the desk.", tools=[refund])
    try:
        with Session.connect(url=sim.url, agent=desk, approval_handler=slow, approval_timeout=0.3,
                             reconnect=False) as s:
            s.ask("[tools: refund] refund order 5 amount 5", timeout=UNIT)
            assert s.stats()["approvals"]["timed_out"] == 1
    finally:
        release.set()
    assert RAN == [] and "no answer within 0.3s" in _outputs(sim)[0]


def test_approval_timeout_must_be_shorter_than_create_timeout(sim: Simulator):
    """An approval wait longer than a create may wait in the gate is refused at connect."""
    with pytest.raises(InvalidArgument, match="create_timeout"):
        Session.connect(url=sim.url, approval_timeout=120, create_timeout=60, reconnect=False)
