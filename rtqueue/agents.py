"""Agents, handoffs and the resolved agent graph.

An :class:`Agent` is a persona: instructions, function tools and the agents it
may hand the conversation to. A handoff is offered to the model as one more
function tool, ``transfer_to_<name>``; when the model calls it the session
switches agents with a ``session.update`` (see :func:`session_config_for`).

Agent graphs have cycles (a greeter hands off to returns, which hands back to
the greeter) and agents that refer to ones defined later. Agents are frozen
values, so a handoff target may be named lazily:

- an :class:`Agent`;
- a name ``str``, looked up when the graph is resolved;
- a zero-argument callable returning an :class:`Agent` (``lambda: greeter``);
- a :class:`Handoff` from :func:`handoff`, wrapping any of the above with its
  own description or tool name.

:func:`resolve_agents` walks the graph once, checks it, and returns an
:class:`AgentGraph` that answers the session's questions.
"""

from __future__ import annotations

import copy
import re
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeAlias

import attrs

from .errors import InvalidArgument
from .guardrails import InputGuardrail, OutputGuardrail, check_list
from .hosted_mcp import HostedMCP, check_servers
from .tools import Tool, _check_name

__all__ = [
    "Agent",
    "AgentGraph",
    "Handoff",
    "HandoffTarget",
    "handoff",
    "handoff_tool_name",
    "resolve_agents",
    "session_config_for",
]

_UNSAFE = re.compile(r"[^a-z0-9_]")

# The handoff tool's arguments: nothing required, so the model can transfer at
# once; a reason helps logs and the next agent's first words.
_HANDOFF_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "reason": {
            "type": "string",
            "description": "Why the conversation is being transferred (optional).",
        }
    },
    "required": [],
    "additionalProperties": False,
}


def handoff_tool_name(agent_name: str) -> str:
    """The default handoff tool name: ``transfer_to_`` + the agent's name,
    lowercased, with every character outside ``[a-z0-9_]`` replaced by ``_``.

    Raises :class:`~rtqueue.errors.InvalidArgument` if the result is longer
    than the 64 characters a function name may have (give the
    :func:`handoff` a ``tool_name`` then).
    """
    name = "transfer_to_" + _UNSAFE.sub("_", agent_name.lower())
    if len(name) > 64:
        raise InvalidArgument(
            f"handoff tool name {name!r} is longer than 64 characters; use handoff({agent_name!r}, tool_name=...)"
        )
    return name


def _check_target(target: object, where: str) -> None:
    if isinstance(target, Handoff):
        return
    if isinstance(target, str):
        if not target:
            raise InvalidArgument(f"{where}: an agent name cannot be empty")
        return
    if isinstance(target, Agent) or callable(target):
        return
    raise InvalidArgument(
        f"{where}: a handoff target must be an Agent, an agent name, a zero-argument "
        f"callable returning an Agent, or handoff(...), got {target!r}"
    )


def _validate_handoff_target(instance: Handoff, attribute: Any, value: Any) -> None:
    if isinstance(value, Handoff):
        raise InvalidArgument("handoff(): the target cannot itself be a Handoff")
    _check_target(value, "handoff()")


def _optional_tool_name(value: object) -> str | None:
    return None if value is None else _check_name(value)


def _str_field(what: str) -> Callable[[Any, Any, Any], None]:
    def check(instance: Any, attribute: Any, value: Any) -> None:
        if not isinstance(value, str):
            raise InvalidArgument(f"{what} {attribute.name} must be a str, got {type(value).__name__}")

    return check


@attrs.frozen
class Handoff:
    """A handoff target with its own description and/or tool name.

    ``description`` replaces the target agent's ``description`` in the handoff
    tool's description when non-empty; ``tool_name`` replaces the default
    ``transfer_to_<name>``.
    """

    target: Agent | str | Callable[[], Agent] = attrs.field(validator=_validate_handoff_target)
    description: str = attrs.field(default="", validator=_str_field("handoff"))
    tool_name: str | None = attrs.field(default=None, converter=_optional_tool_name)


def handoff(
    target: Agent | str | Callable[[], Agent], *, description: str = "", tool_name: str | None = None
) -> Handoff:
    """Describe a handoff to ``target`` (an Agent, a name, or a callable returning one)."""
    return Handoff(target=target, description=description, tool_name=tool_name)


def _to_tools(value: object) -> tuple[Tool, ...]:
    if isinstance(value, (str, bytes, Tool, Mapping)) or not isinstance(value, Iterable):
        raise InvalidArgument(f"Agent tools must be a list or tuple of Tool, got {type(value).__name__}")
    tools = tuple(value)
    names: set[str] = set()
    for item in tools:
        if not isinstance(item, Tool):
            raise InvalidArgument(
                f"Agent tools must be Tool objects (decorate the function with @rtqueue.tool), got {item!r}"
            )
        if item.name in names:
            raise InvalidArgument(f"Agent tools: two tools are named {item.name!r}")
        names.add(item.name)
    return tools


def _to_handoffs(value: object) -> tuple[Any, ...]:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise InvalidArgument(
            f"Agent handoffs must be a list or tuple of targets, got {type(value).__name__}"
            + (" (wrap a single name in a list)" if isinstance(value, str) else "")
        )
    targets = tuple(value)
    for target in targets:
        _check_target(target, "Agent handoffs")
    return targets


def _check_instructions(instance: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, str) and not callable(value):
        raise InvalidArgument(
            f"Agent instructions must be a str or a callable taking the context, got {type(value).__name__}"
        )


def _check_agent_name(instance: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        raise InvalidArgument(f"Agent name must be a non-empty str, got {value!r}")


def _check_voice(instance: Any, attribute: Any, value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not value):
        raise InvalidArgument(f"Agent voice must be a non-empty str or None, got {value!r}")


def _check_agent_approval(instance: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, bool) and not callable(value):
        raise InvalidArgument(f"needs_approval must be a bool or a predicate (tool_name, arguments), not {value!r}")


def _output_guards(value: object) -> tuple[OutputGuardrail, ...]:
    return check_list(value, OutputGuardrail, "output_guardrails")


def _input_guards(value: object) -> tuple[InputGuardrail, ...]:
    return check_list(value, InputGuardrail, "input_guardrails")


@attrs.frozen
class Agent:
    """One persona of a voice app.

    - ``name``: unique within a graph; also names its handoff tool.
    - ``instructions``: a str, or a callable given the app's context object
      (the one passed to the session) that returns a str.
    - ``tools``: :class:`~rtqueue.tools.Tool` objects (a list is accepted;
      stored as a tuple); names must be unique.
    - ``handoffs``: targets this agent may transfer to (see the module doc).
    - ``voice``: the voice to open the session with when this agent starts it;
      a handoff never changes the voice (the server refuses once audio was sent).
    - ``description``: one line used in the handoff tool other agents see.
    - ``needs_approval``: ``True``, or a predicate ``(tool_name, arguments)``,
      when this agent's function tool calls must be approved before they run
      (on top of each tool's own ``needs_approval``; see :mod:`rtqueue.approvals`).
    - ``mcp``: hosted MCP servers (:class:`~rtqueue.hosted_mcp.HostedMCP`) this
      agent may use.
    - ``output_guardrails`` / ``input_guardrails``: checks on what this agent
      says and on what the user says to it (see :mod:`rtqueue.guardrails`),
      on top of the session-wide ones.

    Invalid values raise :class:`~rtqueue.errors.InvalidArgument`.
    """

    name: str = attrs.field(validator=_check_agent_name)
    instructions: str | Callable[[Any], str] = attrs.field(default="", validator=_check_instructions)
    tools: tuple[Tool, ...] = attrs.field(default=(), converter=_to_tools)
    handoffs: tuple[Agent | Handoff | str | Callable[[], Agent], ...] = attrs.field(default=(), converter=_to_handoffs)
    voice: str | None = attrs.field(default=None, validator=_check_voice)
    description: str = attrs.field(default="", validator=_str_field("Agent"))
    needs_approval: bool | Callable[[str, dict[str, Any]], bool] = attrs.field(default=False,
                                                                                validator=_check_agent_approval)
    mcp: tuple[HostedMCP, ...] = attrs.field(default=(), converter=check_servers)
    output_guardrails: tuple[OutputGuardrail, ...] = attrs.field(default=(), converter=_output_guards)
    input_guardrails: tuple[InputGuardrail, ...] = attrs.field(default=(), converter=_input_guards)

    def render_instructions(self, context: Any = None) -> str:
        """The instructions text; a callable is called with ``context``.

        Raises :class:`~rtqueue.errors.InvalidArgument` if the callable returns
        something other than a str. Exceptions it raises propagate unchanged.
        """
        if isinstance(self.instructions, str):
            return self.instructions
        text = self.instructions(context)
        if not isinstance(text, str):
            raise InvalidArgument(f"instructions of agent {self.name!r} returned {type(text).__name__}, expected str")
        return text

    def with_handoffs(self, *targets: Agent | Handoff | str | Callable[[], Agent]) -> Agent:
        """A copy of this agent with ``targets`` appended to its handoffs.

        The copy is a new object: agents that already refer to this one *as an
        object* still see the old one, and resolving both in one graph is a
        duplicate-name error. Refer to agents by name or by ``lambda`` to close
        cycles.
        """
        return attrs.evolve(self, handoffs=(*self.handoffs, *targets))


#: What may stand as a handoff target.
HandoffTarget: TypeAlias = Agent | Handoff | str | Callable[[], Agent]


@attrs.frozen
class _HandoffEdge:
    tool_name: str
    target: Agent
    definition: dict[str, Any] = attrs.field(eq=False)


class AgentGraph(Mapping[str, Agent]):
    """The checked agent graph: a read-only mapping of name to :class:`Agent`.

    Built by :func:`resolve_agents`; ``start`` is the agent to begin with.
    Per agent it knows the function tools and the handoff tools offered to
    the model.
    """

    __slots__ = ("_agents", "_edges", "_start", "shared_mcp")

    def __init__(self, start: Agent, agents: dict[str, Agent], edges: dict[str, dict[str, _HandoffEdge]],
                 shared_mcp: tuple[HostedMCP, ...] = ()) -> None:
        self._start = start
        self._agents = types.MappingProxyType(agents)
        self._edges = edges
        #: Hosted MCP servers of the whole session: in every agent's tool list, so handoffs keep them.
        self.shared_mcp = shared_mcp

    @property
    def start(self) -> Agent:
        """The agent the graph was resolved from."""
        return self._start

    def __getitem__(self, name: str) -> Agent:
        return self._agents[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._agents)

    def __len__(self) -> int:
        return len(self._agents)

    def __repr__(self) -> str:
        return f"AgentGraph(start={self._start.name!r}, agents={list(self._agents)!r})"

    def agent(self, agent: Agent | str) -> Agent:
        """The graph's :class:`Agent` for ``agent`` (an Agent or its name).

        Raises :class:`~rtqueue.errors.InvalidArgument` for a name the graph
        does not know, or an Agent that is not the one in the graph under its
        name (a modified copy).
        """
        name = agent.name if isinstance(agent, Agent) else agent
        try:
            found = self._agents[name]
        except (KeyError, TypeError):
            raise InvalidArgument(f"no agent named {name!r} in this graph (known: {', '.join(self._agents)})") from None
        if isinstance(agent, Agent) and agent != found:
            raise InvalidArgument(f"agent {name!r} is not the one in this graph (a modified copy?)")
        return found

    def tools_for(self, agent: Agent | str) -> list[dict[str, Any]]:
        """The ``session.tools`` list for ``agent``: its function tools, its
        handoff tools, then its hosted MCP servers and the session's, as fresh dicts."""
        found = self.agent(agent)
        tools = [t.definition() for t in found.tools]
        tools += [copy.deepcopy(edge.definition) for edge in self._edges[found.name].values()]
        own = {m.server_label for m in found.mcp}
        tools += [m.definition() for m in (*found.mcp, *(m for m in self.shared_mcp if m.server_label not in own))]
        return tools

    def handoff_target(self, tool_name: str, from_agent: Agent | str) -> Agent | None:
        """The agent that ``tool_name`` transfers to from ``from_agent``, or
        ``None`` if it is not one of that agent's handoff tools."""
        edge = self._edges[self.agent(from_agent).name].get(tool_name)
        return None if edge is None else edge.target

    def handoff_targets(self, agent: Agent | str) -> dict[str, Agent]:
        """Handoff tool name -> target agent, for ``agent``."""
        return {name: edge.target for name, edge in self._edges[self.agent(agent).name].items()}

    def tool(self, agent: Agent | str, tool_name: str) -> Tool | None:
        """``agent``'s function tool called ``tool_name``, or ``None``
        (handoff tools are not :class:`~rtqueue.tools.Tool` objects)."""
        for candidate in self.agent(agent).tools:
            if candidate.name == tool_name:
                return candidate
        return None


def resolve_agents(start: Agent, extra: Iterable[Agent] = (), *, shared_mcp: Iterable[HostedMCP] = ()
                   ) -> AgentGraph:
    """Walk the graph from ``start`` and ``extra`` and check it.

    Every agent reachable through handoffs joins the graph; agents that are
    only ever named by a string must be reachable as objects somewhere, or be
    listed in ``extra``. Callable targets are called once each, here.

    Raises :class:`~rtqueue.errors.InvalidArgument` for: a handoff to an
    unknown name; two different agents with one name; a callable that raises
    or returns no Agent; an agent handing off to itself; two handoffs of one
    agent with the same tool name, or a handoff tool name equal to one of its
    function tools. ``shared_mcp`` hosted MCP servers join every agent's tools.
    """
    if not isinstance(start, Agent):
        raise InvalidArgument(f"resolve_agents() needs an Agent to start from, got {start!r}")
    extras = list(extra)
    for agent in extras:
        if not isinstance(agent, Agent):
            raise InvalidArgument(f"resolve_agents(extra=...) must hold Agent objects, got {agent!r}")

    agents: dict[str, Agent] = {}
    # Targets per agent as (spec, agent-or-name); names are resolved once every
    # object-reachable agent is known, since a name may refer to one found later.
    pending: dict[str, list[tuple[Any, Agent | str]]] = {}
    queue: list[Agent] = [start, *extras]
    while queue:
        agent = queue.pop(0)
        known = agents.get(agent.name)
        if known is not None:
            if known is not agent and known != agent:
                raise InvalidArgument(
                    f"two different agents are named {agent.name!r}; names must be unique. "
                    "If one is a copy (with_handoffs/attrs.evolve) of the other, refer to it "
                    "by name or with a lambda instead of the old object"
                )
            continue
        agents[agent.name] = agent
        resolved: list[tuple[Any, Agent | str]] = []
        for spec in agent.handoffs:
            target = _resolve_target(spec, agent)
            resolved.append((spec, target))
            if isinstance(target, Agent):
                queue.append(target)
        pending[agent.name] = resolved

    edges: dict[str, dict[str, _HandoffEdge]] = {}
    for name, resolved in pending.items():
        agent = agents[name]
        function_names = {t.name for t in agent.tools}
        table: dict[str, _HandoffEdge] = {}
        for spec, target in resolved:
            if isinstance(target, str):
                if target not in agents:
                    raise InvalidArgument(
                        f"agent {name!r} hands off to unknown agent {target!r} "
                        f"(known: {', '.join(sorted(agents))}); pass agents that are only "
                        "named by a string in resolve_agents(..., extra=[...])"
                    )
                target = agents[target]
            if target.name == name:
                raise InvalidArgument(f"agent {name!r} cannot hand off to itself")
            edge = _edge(spec, target)
            if edge.tool_name in table or edge.tool_name in function_names:
                raise InvalidArgument(
                    f"agent {name!r} has two tools named {edge.tool_name!r}; "
                    "give the handoff its own name with handoff(..., tool_name=...)"
                )
            table[edge.tool_name] = edge
        edges[name] = table
    return AgentGraph(start, agents, edges, check_servers(list(shared_mcp), "mcp"))


def _resolve_target(spec: Any, owner: Agent) -> Agent | str:
    target = spec.target if isinstance(spec, Handoff) else spec
    if isinstance(target, (Agent, str)):
        return target
    try:
        result = target()
    except Exception as exc:
        raise InvalidArgument(
            f"handoff target callable of agent {owner.name!r} raised {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(result, Agent):
        raise InvalidArgument(f"handoff target callable of agent {owner.name!r} returned {result!r}, expected an Agent")
    return result


def _edge(spec: Any, target: Agent) -> _HandoffEdge:
    handoff_spec = spec if isinstance(spec, Handoff) else None
    tool_name = (handoff_spec.tool_name if handoff_spec else None) or handoff_tool_name(target.name)
    detail = (handoff_spec.description if handoff_spec else "") or target.description
    description = f"Transfer the conversation to the {target.name} agent."
    if detail:
        description = f"{description} {detail}"
    definition = {
        "type": "function",
        "name": tool_name,
        "description": description,
        "parameters": _HANDOFF_PARAMETERS,
    }
    return _HandoffEdge(tool_name=tool_name, target=target, definition=definition)


def session_config_for(agent: Agent | str, graph: AgentGraph, context: Any = None) -> dict[str, Any]:
    """The ``session`` object of a ``session.update`` that makes ``agent`` active.

    ``{"type": "realtime", "instructions", "tools", "tool_choice": "auto"}``.
    The voice is left out on purpose: it cannot change once the session has
    produced audio, so the session layer decides when to send it.
    """
    found = graph.agent(agent)
    return {
        "type": "realtime",
        "instructions": found.render_instructions(context),
        "tools": graph.tools_for(found),
        "tool_choice": "auto",
    }
