"""Tool calls and handoffs: what happens after a response asked for functions.

The reader hands each finished response with function calls to the **turn
worker** (thread ``rtqueue-turns-N``), which runs the tools on the
``rtqueue-tool`` pool, then queues, in this order on the control lane:

1. one ``function_call_output`` item per call (in call order);
2. for a handoff, a ``session.update`` with the new agent's instructions and
   tools (the voice is kept: changing it after audio earns
   ``cannot_update_voice``);
3. exactly one ``response.create`` (the follow-up), through the gate.

Policy for responses that did not complete (``cancelled`` by the user or by
server VAD, ``failed``, ``incomplete``): their calls are **not run**; each is
answered with an output saying it was not run, so the conversation holds no
dangling call, and **no follow-up** is created. A call id is handled once only,
ever. And if the user starts a new turn (text, commit, or speech) while the
tools run, the outputs are still sent but the follow-up is skipped: the user's
new turn gets the next response, not a stale answer to the old one.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Any

from .agents import Agent, resolve_agents, session_config_for
from .errors import InvalidArgument, RtqueueError
from .handles import ResponseHandle
from .toolrunner import ToolCall, ToolOutcome, ToolRunner
from .tools import ToolContext
from .values import Event, Response

if TYPE_CHECKING:
    from .session import Session

__all__ = ["TurnManager"]

log = logging.getLogger("rtqueue")


class TurnManager:
    """Per-session owner of the agent graph, the current agent and the turn worker."""

    def __init__(self, session: Session, agent: Agent | None, extra: tuple[Agent, ...], *, tool_timeout: float) -> None:
        self._session = session
        self._tool_timeout = tool_timeout
        start = agent if agent is not None else (extra[0] if extra else None)
        self._graph = resolve_agents(start, extra) if start is not None else None
        session._agent = start
        self._runner: ToolRunner | None = None
        self._cond = threading.Condition()
        self._jobs: deque[tuple[Response, ResponseHandle | None, list[ToolCall], int]] = deque()
        self._busy = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._handled: OrderedDict[str, None] = OrderedDict()
        # Held while queueing outputs -> session.update -> response.create, so an
        # app handoff from another thread cannot interleave with that order.
        self._wire = threading.Lock()
        self.handoffs = 0

    # -- configuration -----------------------------------------------------------------

    def config_for(self, agent: Agent) -> dict[str, Any]:
        """GA session fields for ``agent`` (instructions and tools; no voice)."""
        assert self._graph is not None
        return session_config_for(agent, self._graph, self._session.context)

    def initial_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """Merge the starting agent's configuration into the first ``session.update``."""
        agent = self._session._agent
        if agent is None:
            return config
        merged = dict(config)
        merged.update(self.config_for(agent))
        if agent.voice and "voice" not in (config.get("audio", {}).get("output", {})):
            audio = dict(merged.get("audio", {}))
            audio["output"] = {**audio.get("output", {}), "voice": agent.voice}
            merged["audio"] = audio
        return merged

    # -- reader side (must not block) ------------------------------------------------------

    def on_response_done(self, response: Response, handle: ResponseHandle | None) -> None:
        """Called by the reader for a finished response that has function calls."""
        calls: list[ToolCall] = []
        with self._cond:
            for item in response.function_calls:
                cid = item.get("call_id")
                if not isinstance(cid, str) or cid in self._handled:
                    continue  # a call is handled once, ever
                self._handled[cid] = None
                while len(self._handled) > 10_000:
                    self._handled.popitem(last=False)
                calls.append(
                    ToolCall(
                        call_id=cid,
                        name=str(item.get("name") or ""),
                        arguments=str(item.get("arguments") or ""),
                        item_id=item.get("id"),
                        response_id=response.id,
                    )
                )
            if not calls or self._closed:
                return
            if handle is not None and response.status == "completed":
                handle._expect_followup()
            self._jobs.append((response, handle, calls, self._session.turn_seq))
            self._ensure_thread()
            self._cond.notify()

    def idle(self) -> bool:
        """Whether no tool job is queued or running."""
        with self._cond:
            return not self._jobs and not self._busy

    # -- the turn worker ------------------------------------------------------------------------

    def _ensure_thread(self) -> None:
        # Caller holds the condition.
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"rtqueue-turns-{self._session._n}", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._closed:
                    self._cond.wait()
                if self._closed:
                    jobs, self._jobs = list(self._jobs), deque()
                    for _, handle, _, _ in jobs:
                        if handle is not None:
                            handle._set_followup(None)
                    return
                job = self._jobs.popleft()
                self._busy = True
            response, handle = job[0], job[1]
            try:
                self._handle(*job)
            except Exception as exc:  # a bug must not leave ask() hanging
                log.exception("rtqueue: turn worker failed on %s", response.id)
                self._session._publish(Event("rtqueue.error", {"error": exc, "message": f"turn worker: {exc!r}"}))
                if handle is not None:
                    handle._set_followup(None)
            finally:
                with self._cond:
                    self._busy = False

    def _handle(self, response: Response, handle: ResponseHandle | None, calls: list[ToolCall], turn: int) -> None:
        session = self._session
        if response.status != "completed":
            reason = f"not run: the response was {response.status} before it finished"
            for call in calls:
                self._send_output(call.call_id, json.dumps({"error": reason}))
                session._publish(Event("tool.skipped", {"call_id": call.call_id, "name": call.name, "reason": reason,
                                                        "response_id": response.id}))
            if handle is not None:
                handle._set_followup(None)
            return
        agent = session._agent
        agent_name = agent.name if agent is not None else ""
        graph = self._graph
        target: Agent | None = None
        handoff_call: ToolCall | None = None
        tool_calls: list[ToolCall] = []
        extra_handoffs: list[ToolCall] = []
        for call in calls:
            dest = graph.handoff_target(call.name, agent_name) if graph is not None else None
            if dest is None:
                tool_calls.append(call)
            elif handoff_call is None:
                handoff_call, target = call, dest
            else:
                extra_handoffs.append(call)
        outcomes = {o.call.call_id: o for o in self._run_tools(tool_calls, agent_name)}
        with self._wire:
            self._queue_results(response, handle, calls, turn, outcomes, handoff_call, target, extra_handoffs)

    def _queue_results(
        self,
        response: Response,
        handle: ResponseHandle | None,
        calls: list[ToolCall],
        turn: int,
        outcomes: dict[str, ToolOutcome],
        handoff_call: ToolCall | None,
        target: Agent | None,
        extra_handoffs: list[ToolCall],
    ) -> None:
        session = self._session
        agent = session._agent
        # 1. outputs, in call order
        for call in calls:
            if call is handoff_call and target is not None:
                output = json.dumps({"assistant": target.name, "status": "transferred"})
            elif call in extra_handoffs:
                output = json.dumps({"error": "only one handoff per response; this one was not done"})
            else:
                output = outcomes[call.call_id].output
            self._send_output(call.call_id, output)
        # 2. the handoff's session.update
        if target is not None and handoff_call is not None:
            self._switch(agent, target, call_id=handoff_call.call_id, response_id=response.id)
        # 3. one follow-up create, unless the user already moved on
        if session.turn_seq != turn:
            session._publish(Event("turn.followup_skipped", {"response_id": response.id,
                                                             "reason": "the user started a new turn"}))
            if handle is not None:
                handle._set_followup(None)
            return
        try:
            follow = session.create_response()
        except RtqueueError as exc:
            log.warning("rtqueue: follow-up create failed: %s", exc)
            follow = None
        if handle is not None:
            handle._set_followup(follow)

    def _run_tools(self, calls: list[ToolCall], agent_name: str) -> list[ToolOutcome]:
        if not calls:
            return []
        session = self._session
        graph = self._graph
        for call in calls:
            session._publish(Event("tool.call", {"call_id": call.call_id, "name": call.name,
                                                 "arguments": call.arguments, "agent": agent_name}))
        if self._runner is None:
            self._runner = ToolRunner(default_timeout=self._tool_timeout)

        def resolve(name: str) -> Any:
            return graph.tool(agent_name, name) if graph is not None else None

        def ctx(call: ToolCall) -> ToolContext:
            return ToolContext(call_id=call.call_id, tool_name=call.name, agent_name=agent_name,
                               context=session.context)

        outcomes = self._runner.run_calls(calls, resolve, ctx)
        for o in outcomes:
            data = {"call_id": o.call.call_id, "name": o.call.name, "arguments": o.call.arguments,
                    "output": o.output, "ok": o.ok, "error": o.error, "duration_ms": o.duration_ms,
                    "agent": agent_name}
            session._publish(Event("tool.result" if o.ok else "tool.error", data))
        return outcomes

    def _send_output(self, call_id: str, output: str) -> None:
        self._session.send(
            {"type": "conversation.item.create",
             "item": {"type": "function_call_output", "call_id": call_id, "output": output}}
        )

    def _switch(self, source: Agent | None, target: Agent, **info: Any) -> None:
        session = self._session
        config = self.config_for(target)
        current_voice = (session.session_config.get("audio") or {}).get("output", {}).get("voice")
        if target.voice and target.voice != current_voice:
            if session._produced_audio:
                log.warning("rtqueue: agent %s asks for voice %r but the session already spoke; keeping %r",
                            target.name, target.voice, current_voice)
                session._publish(Event("agent.voice_kept", {"agent": target.name, "requested": target.voice,
                                                            "voice": current_voice}))
            else:
                config["audio"] = {"output": {"voice": target.voice}}
        session.send({"type": "session.update", "session": config})
        session._agent = target
        self.handoffs += 1
        session._publish(Event("agent.handoff", {"source": source.name if source else None,
                                                 "target": target.name, **info}))

    # -- app side -------------------------------------------------------------------------------

    def app_handoff(self, agent: Agent | str, *, respond: bool) -> ResponseHandle | None:
        """``Session.handoff``: switch agents now, then (optionally) one gated create."""
        if isinstance(agent, str):
            if self._graph is None or self._graph.get(agent) is None:
                raise InvalidArgument(f"unknown agent {agent!r}")
            target = self._graph.get(agent)
        elif isinstance(agent, Agent):
            if self._graph is None or self._graph.get(agent.name) is None:
                known = tuple(self._graph.values()) if self._graph is not None else ()
                self._graph = resolve_agents(agent, known)
            target = agent
        else:
            raise InvalidArgument(f"handoff() needs an Agent or an agent name, not {type(agent).__name__}")
        assert target is not None
        with self._wire:
            # Serialise with the turn worker so the wire order stays update -> create.
            self._switch(self._session._agent, target, call_id=None, response_id=None)
            return self._session.create_response() if respond else None

    def close(self) -> None:
        """End the turn worker and the tool pool (idempotent)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(5.0)
        if self._runner is not None:
            # A tool stuck past its timeout cannot be killed; close must not hang on it.
            self._runner.close(wait=False)
