"""Tests for rtqueue.agents: agents, handoffs, graph resolution, session config."""

from __future__ import annotations

import json
from typing import Any

import attrs
import pytest
from openai.types.realtime import (
    RealtimeFunctionTool,
    RealtimeSessionCreateRequest,
    SessionUpdateEvent,
)

from rtqueue.agents import (
    Agent,
    AgentGraph,
    Handoff,
    handoff,
    handoff_tool_name,
    resolve_agents,
    session_config_for,
)
from rtqueue.errors import InvalidArgument
from rtqueue.tools import Tool, tool


@tool
def lookup_order(order_id: str) -> str:
    """Look up an order.

    Args:
        order_id: The order id.
    """
    return order_id


@tool
def start_return(order_id: str, reason: str = "") -> str:
    """Start a return."""
    return "ok"


def tool_names(defs: list[dict[str, Any]]) -> list[str]:
    return [d["name"] for d in defs]


# --------------------------------------------------------------------------
# Agent values


def test_agent_defaults_and_conversion() -> None:
    """Lists become tuples; defaults are empty."""
    a = Agent(name="greeter", tools=[lookup_order], handoffs=["returns"])
    assert a.tools == (lookup_order,)
    assert a.handoffs == ("returns",)
    assert (a.instructions, a.voice, a.description) == ("", None, "")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": ""}, "name must be a non-empty str"),
        ({"name": 3}, "name must be a non-empty str"),
        ({"name": "a", "instructions": 5}, "instructions must be a str or a callable"),
        ({"name": "a", "tools": lookup_order}, "tools must be a list or tuple"),
        ({"name": "a", "tools": [print]}, "decorate the function with @rtqueue.tool"),
        ({"name": "a", "tools": [lookup_order, lookup_order]}, "two tools are named 'lookup_order'"),
        ({"name": "a", "handoffs": "returns"}, "wrap a single name in a list"),
        ({"name": "a", "handoffs": [3]}, "a handoff target must be"),
        ({"name": "a", "handoffs": [""]}, "cannot be empty"),
        ({"name": "a", "voice": 1}, "voice must be"),
        ({"name": "a", "description": None}, "description must be a str"),
    ],
)
def test_agent_validation(kwargs: dict[str, Any], match: str) -> None:
    """Wrong types raise InvalidArgument with a clear message."""
    with pytest.raises(InvalidArgument, match=match):
        Agent(**kwargs)


def test_render_instructions() -> None:
    """A str is returned as is; a callable gets the app context."""
    assert Agent(name="a", instructions="Be kind.").render_instructions({"x": 1}) == "Be kind."
    dynamic = Agent(name="a", instructions=lambda ctx: f"Customer {ctx['name']}.")
    assert dynamic.render_instructions({"name": "Ada"}) == "Customer Ada."
    broken = Agent(name="a", instructions=lambda ctx: 42)
    with pytest.raises(InvalidArgument, match="returned int, expected str"):
        broken.render_instructions(None)


def test_with_handoffs_appends_a_copy() -> None:
    """with_handoffs returns a new agent with the targets appended."""
    a = Agent(name="a", handoffs=["b"])
    b = a.with_handoffs("c", handoff("d"))
    assert a.handoffs == ("b",)
    assert b.handoffs == ("b", "c", Handoff(target="d"))
    assert b.name == "a"


def test_handoff_validation() -> None:
    """handoff() checks its target and tool name."""
    with pytest.raises(InvalidArgument, match="handoff target must be"):
        handoff(3)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="cannot itself be a Handoff"):
        handoff(handoff("a"))  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="tool name"):
        handoff("a", tool_name="bad name")


def test_agents_hashable() -> None:
    """Agents and handoffs are hashable values."""
    a = Agent(name="a", tools=[lookup_order], handoffs=["b", handoff("c")])
    assert len({a, a}) == 1
    assert a == attrs.evolve(a)


# --------------------------------------------------------------------------
# Graphs and cycles


def test_cycle_by_name() -> None:
    """A <-> B where each names the other by string."""
    greeter = Agent(name="greeter", handoffs=["returns"])
    returns = Agent(name="returns", handoffs=["greeter"])
    graph = resolve_agents(greeter, extra=[returns])
    assert set(graph) == {"greeter", "returns"}
    assert graph.handoff_target("transfer_to_returns", "greeter") is returns
    assert graph.handoff_target("transfer_to_greeter", "returns") is greeter
    assert graph.start is greeter


def test_cycle_by_object_and_name() -> None:
    """An agent defined first is reached by object; the one before it by name."""
    returns = Agent(name="returns", handoffs=["greeter"])
    greeter = Agent(name="greeter", handoffs=[returns])
    graph = resolve_agents(greeter)
    assert graph["returns"] is returns
    assert graph.handoff_target("transfer_to_greeter", returns) is greeter


def test_cycle_by_callable() -> None:
    """A <-> B where the earlier agent refers to the later one with a lambda."""
    greeter = Agent(name="greeter", handoffs=[lambda: returns])
    returns = Agent(name="returns", handoffs=[greeter])
    graph = resolve_agents(greeter)
    assert dict(graph) == {"greeter": greeter, "returns": returns}
    assert graph.handoff_target("transfer_to_returns", "greeter") is returns
    assert graph.handoff_target("transfer_to_greeter", "returns") is greeter


def test_three_cycle() -> None:
    """A -> B -> C -> A, mixing callables, names and handoff()."""
    a = Agent(name="A", handoffs=[lambda: b])
    b = Agent(name="B", handoffs=[handoff(lambda: c, description="For C things.")])
    c = Agent(name="C", handoffs=["A"])
    graph = resolve_agents(a)
    assert len(graph) == 3
    assert graph.handoff_target("transfer_to_b", "A") is b
    assert graph.handoff_target("transfer_to_c", "B") is c
    assert graph.handoff_target("transfer_to_a", "C") is a
    assert graph.handoff_targets("B") == {"transfer_to_c": c}


def test_unknown_name() -> None:
    """A handoff to a name nobody has raises InvalidArgument naming both agents."""
    greeter = Agent(name="greeter", handoffs=["refunds"])
    with pytest.raises(InvalidArgument, match="'greeter' hands off to unknown agent 'refunds'"):
        resolve_agents(greeter)


def test_name_only_reachable_by_string_needs_extra() -> None:
    """An agent only named by a string must be passed in extra."""
    greeter = Agent(name="greeter", handoffs=["returns"])
    Agent(name="returns")
    with pytest.raises(InvalidArgument, match="extra"):
        resolve_agents(greeter)


def test_duplicate_names() -> None:
    """Two different agents with one name raise InvalidArgument."""
    first = Agent(name="support", instructions="one")
    second = Agent(name="support", instructions="two")
    greeter = Agent(name="greeter", handoffs=[first])
    with pytest.raises(InvalidArgument, match="two different agents are named 'support'"):
        resolve_agents(greeter, extra=[second])


def test_stale_copy_is_a_duplicate() -> None:
    """Re-binding with with_handoffs while another agent holds the old object is caught."""
    greeter = Agent(name="greeter")
    returns = Agent(name="returns", handoffs=[greeter])
    greeter = greeter.with_handoffs(returns)
    with pytest.raises(InvalidArgument, match="refer to it by name or with a lambda"):
        resolve_agents(greeter)


def test_equal_agents_are_not_duplicates() -> None:
    """The same agent reached twice (or an equal copy) is fine."""
    support = Agent(name="support")
    greeter = Agent(name="greeter", handoffs=[support, handoff(attrs.evolve(support), tool_name="escalate")])
    graph = resolve_agents(greeter, extra=[support])
    assert tool_names(graph.tools_for("greeter")) == ["transfer_to_support", "escalate"]


def test_callable_errors() -> None:
    """A target callable that raises or returns a non-Agent raises InvalidArgument."""

    def missing() -> Agent:
        raise NameError("name 'later' is not defined")

    with pytest.raises(InvalidArgument, match="raised NameError") as info:
        resolve_agents(Agent(name="a", handoffs=[missing]))
    assert isinstance(info.value.__cause__, NameError)
    with pytest.raises(InvalidArgument, match="expected an Agent"):
        resolve_agents(Agent(name="a", handoffs=[lambda: "b"]))


def test_self_handoff_rejected() -> None:
    """An agent cannot hand off to itself."""
    with pytest.raises(InvalidArgument, match="cannot hand off to itself"):
        resolve_agents(Agent(name="a", handoffs=["a"]))


def test_tool_name_collisions() -> None:
    """Handoff names colliding with each other or a function tool are rejected."""
    a = Agent(name="Billing Desk")
    b = Agent(name="billing-desk")
    with pytest.raises(InvalidArgument, match="two tools named 'transfer_to_billing_desk'"):
        resolve_agents(Agent(name="g", handoffs=[a, b]))

    @tool(name="transfer_to_x")
    def clash() -> None:
        """Clash."""

    with pytest.raises(InvalidArgument, match="two tools named 'transfer_to_x'"):
        resolve_agents(Agent(name="g", tools=[clash], handoffs=[Agent(name="x")]))


def test_resolve_argument_checks() -> None:
    """resolve_agents wants Agent objects."""
    with pytest.raises(InvalidArgument):
        resolve_agents("greeter")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        resolve_agents(Agent(name="a"), extra=["b"])  # type: ignore[list-item]


# --------------------------------------------------------------------------
# Handoff tools


def test_handoff_tool_naming() -> None:
    """Names are lowercased with non [a-z0-9_] characters replaced by _."""
    assert handoff_tool_name("Returns") == "transfer_to_returns"
    assert handoff_tool_name("Billing Desk-2") == "transfer_to_billing_desk_2"
    assert handoff_tool_name("Café") == "transfer_to_caf_"
    with pytest.raises(InvalidArgument, match="longer than 64"):
        handoff_tool_name("x" * 60)


def test_handoff_tool_definition() -> None:
    """The handoff tool describes the target and takes an optional reason."""
    returns = Agent(name="Returns", description="Handles returns and refunds.")
    greeter = Agent(name="greeter", tools=[lookup_order], handoffs=[returns])
    graph = resolve_agents(greeter)
    defs = graph.tools_for("greeter")
    assert tool_names(defs) == ["lookup_order", "transfer_to_returns"]
    transfer = defs[1]
    assert transfer == {
        "type": "function",
        "name": "transfer_to_returns",
        "description": "Transfer the conversation to the Returns agent. Handles returns and refunds.",
        "parameters": {
            "type": "object",
            "properties": {
                "reason": {"type": "string", "description": "Why the conversation is being transferred (optional)."}
            },
            "required": [],
            "additionalProperties": False,
        },
    }
    for definition in defs:
        RealtimeFunctionTool.model_validate(definition)
        assert set(definition) <= set(RealtimeFunctionTool.model_fields)


def test_handoff_description_and_name_override() -> None:
    """handoff(description=..., tool_name=...) replaces the defaults."""
    returns = Agent(name="returns", description="Agent text.")
    greeter = Agent(
        name="greeter", handoffs=[handoff(returns, description="When the caller wants a refund.", tool_name="refund")]
    )
    graph = resolve_agents(greeter)
    (definition,) = graph.tools_for(greeter)
    assert definition["name"] == "refund"
    assert definition["description"] == (
        "Transfer the conversation to the returns agent. When the caller wants a refund."
    )
    assert graph.handoff_target("refund", "greeter") is returns
    assert graph.handoff_target("transfer_to_returns", "greeter") is None


def test_handoff_without_any_description() -> None:
    """Without descriptions the tool description is one sentence."""
    graph = resolve_agents(Agent(name="g", handoffs=[Agent(name="x")]))
    assert graph.tools_for("g")[0]["description"] == "Transfer the conversation to the x agent."


def test_graph_lookups() -> None:
    """tool() finds function tools only; unknown agents raise InvalidArgument."""
    returns = Agent(name="returns", tools=[start_return])
    greeter = Agent(name="greeter", tools=[lookup_order], handoffs=[returns])
    graph = resolve_agents(greeter)
    assert isinstance(graph, AgentGraph)
    assert graph.tool("greeter", "lookup_order") is lookup_order
    assert graph.tool(greeter, "start_return") is None
    assert graph.tool("returns", "start_return") is start_return
    assert graph.tool("greeter", "transfer_to_returns") is None
    assert graph.handoff_target("lookup_order", "greeter") is None
    assert isinstance(graph.tool("greeter", "lookup_order"), Tool)
    with pytest.raises(InvalidArgument, match="no agent named 'nobody'"):
        graph.tools_for("nobody")
    with pytest.raises(InvalidArgument, match="not the one in this graph"):
        graph.tools_for(Agent(name="greeter", instructions="changed"))
    assert "greeter" in repr(graph)


def test_tools_for_returns_copies() -> None:
    """Changing the returned definitions does not change the graph."""
    graph = resolve_agents(Agent(name="g", handoffs=[Agent(name="x")]))
    graph.tools_for("g")[0]["parameters"]["properties"].clear()
    assert "reason" in graph.tools_for("g")[0]["parameters"]["properties"]


# --------------------------------------------------------------------------
# Session config


def test_session_config_validates_against_openai() -> None:
    """session_config_for gives a valid GA session.update session."""
    greeter = Agent(
        name="greeter",
        instructions=lambda ctx: f"Greet {ctx['customer']}.",
        tools=[lookup_order],
        handoffs=["returns"],
        voice="marin",
    )
    returns = Agent(name="returns", instructions="Handle returns.", tools=[start_return], handoffs=[greeter])
    graph = resolve_agents(greeter, extra=[returns])
    config = session_config_for(greeter, graph, {"customer": "Ada"})
    assert config == {
        "type": "realtime",
        "instructions": "Greet Ada.",
        "tools": graph.tools_for("greeter"),
        "tool_choice": "auto",
    }
    assert "voice" not in config
    event = {"type": "session.update", "session": config}
    parsed = SessionUpdateEvent.model_validate(event)
    assert isinstance(parsed.session, RealtimeSessionCreateRequest)
    assert set(config) <= set(RealtimeSessionCreateRequest.model_fields)
    assert [t.name for t in parsed.session.tools or []] == ["lookup_order", "transfer_to_returns"]  # type: ignore[union-attr]
    json.dumps(event)

    other = session_config_for("returns", graph)
    assert other["instructions"] == "Handle returns."
    SessionUpdateEvent.model_validate({"type": "session.update", "session": other})
