"""The tool worker: runs what the conversation core asked for, off every lock.

The core decides *what* happens after a response with function calls (see
:meth:`rtqueue.core.ConversationCore.tool_results`); this thread does the parts
that are user code and may block, then reports back:

- the function tools, on a :class:`~rtqueue.toolrunner.ToolRunner` pool, all
  calls of one response in parallel, each resolved against **the agent of the
  response that made it** (not the agent current now);
- for a handoff call, rendering the target agent's configuration (its
  ``instructions`` may be a callable that raises: then the handoff fails and
  the model is told so).

Policy (kept from the first design, now enforced in the core): a response that
did not complete never runs its calls (each gets a "not run" output, no
follow-up); a call id is handled once, ever; if the user starts a new turn
while tools run, the outputs are still sent but the follow-up is skipped.

Thread ``rtqueue-turns-N`` starts on first use. :meth:`ToolWorker.close`
never joins the thread it is called from, and abandons a tool still running
(threads cannot be killed; the tool's late result is discarded, and a
``tool.abandoned`` event says so).
"""

from __future__ import annotations

import json
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from .agents import AgentGraph, session_config_for
from .approvals import ApprovalBroker, ApprovalDecision, ApprovalRequest
from .core import ToolCallSpec, ToolJob
from .toolrunner import ToolCall, ToolOutcome, ToolRunner
from .tools import Tool, ToolContext
from .values import Event

__all__ = ["HandoffResult", "ToolWorker"]

log = logging.getLogger("rtqueue")

#: (job, outputs by call id, rendered handoff config or None, handoff error or None)
HandoffResult = tuple[ToolJob, dict[str, str], "dict[str, Any] | None", "BaseException | None"]


class ToolWorker:
    """Runs :class:`~rtqueue.core.ToolJob`\\ s one at a time on thread ``name``.

    ``graph()`` gives the agent graph now; ``context`` is the app's object;
    ``publish`` delivers ``tool.*`` events; ``on_done(job, outputs,
    handoff_config, handoff_error)`` hands the results to the core.
    """

    def __init__(
        self,
        *,
        name: str,
        graph: Callable[[], AgentGraph | None],
        context: Callable[[], Any],
        publish: Callable[[Event], None],
        on_done: Callable[[ToolJob, dict[str, str], dict[str, Any] | None, BaseException | None], None],
        tool_timeout: float,
        observe: Callable[[dict[str, Any]], None] | None = None,
        approvals: ApprovalBroker | None = None,
    ) -> None:
        self._name = name
        self._approvals = approvals
        self._graph = graph
        self._context = context
        self._publish = publish
        self._on_done = on_done
        self._observe = observe
        self._runner = ToolRunner(default_timeout=tool_timeout)
        self._cond = threading.Condition()
        self._jobs: deque[ToolJob] = deque()
        self._busy: ToolJob | None = None
        self._closed = False
        self._thread: threading.Thread | None = None

    def submit(self, job: ToolJob) -> None:
        """Queue ``job`` (never blocks); ignored once closed."""
        with self._cond:
            if self._closed:
                return
            self._jobs.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify()

    def idle(self) -> bool:
        """Whether no job is queued or running."""
        with self._cond:
            return not self._jobs and self._busy is None

    @property
    def thread(self) -> threading.Thread | None:
        """The worker thread, once started."""
        return self._thread

    # -- the thread -------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job = self._busy = self._jobs.popleft()
            try:
                outputs, config, error = self._work(job)
                if not self._closed:
                    self._on_done(job, outputs, config, error)
            except BaseException as exc:  # a bug (or a SystemExit) must not leave ask() hanging
                log.exception("tool worker failed on %s", job.response_id)
                self._publish(Event("rtqueue.error", {"error": exc, "message": f"tool worker: {exc!r}"}))
                if not self._closed:
                    self._on_done(job, {}, None, exc)
            finally:
                with self._cond:
                    self._busy = None
                    self._cond.notify_all()

    def _work(self, job: ToolJob) -> tuple[dict[str, str], dict[str, Any] | None, BaseException | None]:
        graph = self._graph()
        agent = job.agent
        known = graph is not None and agent is not None and agent in graph
        handoffs = {c.call_id for c in job.calls
                    if known and graph is not None and graph.handoff_target(c.name, agent or "") is not None}
        mcp = [c for c in job.calls if c.kind == "mcp_approval"]
        calls = [ToolCall(call_id=c.call_id, name=c.name, arguments=c.arguments, item_id=c.item_id,
                          response_id=job.response_id)
                 for c in job.calls if c.call_id not in handoffs and c.kind == "function"]
        rejected = self._approve(job, calls, mcp, graph, agent)
        outputs = {cid: out for cid, out in rejected.items()}
        runnable = [c for c in calls if c.call_id not in rejected]
        outputs.update({o.call.call_id: o.output for o in self._run_tools(runnable, graph, agent or "")})
        config: dict[str, Any] | None = None
        error: BaseException | None = None
        if job.handoff_target is not None and graph is not None:
            try:  # user code: the target's instructions callable
                config = session_config_for(job.handoff_target, graph, self._context())
            except BaseException as exc:  # SystemExit & co. too: the model must still get an answer
                error = exc
                log.warning("handoff to %s failed: %r", job.handoff_target, exc)
        return outputs, config, error

    def _approve(self, job: ToolJob, calls: list[ToolCall], mcp: list[ToolCallSpec], graph: AgentGraph | None,
                 agent: str | None) -> dict[str, str]:
        """Ask for the approvals this job needs; return the outputs of MCP answers and rejected calls.

        A rejected function call is not run: its output tells the model why.
        An MCP approval request's "output" is the decision as JSON, which
        the core turns into an ``mcp_approval_response`` item.
        """
        asks: list[ApprovalRequest] = []
        for call in calls:
            if self._needs_approval(call, graph, agent):
                asks.append(ApprovalRequest(call.call_id, call.name, call.arguments, "function", agent,
                                            response_id=job.response_id))
        for spec in mcp:
            asks.append(ApprovalRequest(spec.call_id, spec.name, spec.arguments, "mcp", agent,
                                        server_label=spec.server_label, response_id=job.response_id))
        if not asks:
            return {}
        if self._approvals is None:  # no broker: nothing can say yes
            decisions = {a.call_id: ApprovalDecision(False, "no approval path configured") for a in asks}
        else:
            decisions = self._approvals.decide(asks)
        out: dict[str, str] = {}
        for ask in asks:
            d = decisions[ask.call_id]
            if ask.kind == "mcp":
                out[ask.call_id] = json.dumps({"approve": d.approved, "reason": d.reason})
            elif not d.approved:
                why = d.reason or "the operator said no"
                out[ask.call_id] = json.dumps({"error": f"rejected: {why}"})
        return out

    @staticmethod
    def _needs_approval(call: ToolCall, graph: AgentGraph | None, agent: str | None) -> bool:
        if graph is None or agent is None or agent not in graph:
            return False
        found = graph.tool(agent, call.name)
        try:
            args = json.loads(call.arguments) if call.arguments.strip() else {}
        except ValueError:
            return False  # the runner reports the bad arguments; nothing would run
        if not isinstance(args, dict):
            return False
        if found is not None and found.requires_approval(args):
            return True
        rule = graph[agent].needs_approval
        if isinstance(rule, bool):
            return rule and found is not None
        try:
            return found is not None and bool(rule(call.name, args))
        except Exception:  # a broken predicate must not wave a call through
            log.warning("needs_approval of agent %s raised; asking for approval", agent, exc_info=True)
            return True

    def _run_tools(self, calls: list[ToolCall], graph: AgentGraph | None, agent: str) -> list[ToolOutcome]:
        if not calls:
            return []
        for call in calls:
            self._publish(Event("tool.call", {"call_id": call.call_id, "name": call.name,
                                              "arguments": call.arguments, "agent": agent}))

        def resolve(name: str) -> Tool | None:
            return graph.tool(agent, name) if graph is not None and agent else None

        context = self._context()

        def ctx(call: ToolCall) -> ToolContext:
            return ToolContext(call_id=call.call_id, tool_name=call.name, agent_name=agent or None, context=context)

        outcomes = self._runner.run_calls(calls, resolve, ctx)
        for o in outcomes:
            data = {"call_id": o.call.call_id, "name": o.call.name, "arguments": o.call.arguments,
                    "output": o.output, "ok": o.ok, "error": o.error, "duration_ms": o.duration_ms,
                    "agent": agent, "response_id": o.call.response_id}
            self._publish(Event("tool.result" if o.ok else "tool.error", data))
            if self._observe is not None:
                self._observe(data)
        return outcomes

    # -- closing --------------------------------------------------------------------------

    def close(self, timeout: float = 5.0) -> None:
        """End the worker: queued jobs are dropped, a running tool is abandoned. Idempotent.

        Called from a tool (a "hang up" tool) or from the worker itself it
        does not wait for the thread it runs on: that thread ends as soon as
        the tool returns.
        """
        with self._cond:
            self._closed = True
            self._jobs.clear()
            busy = self._busy
            self._cond.notify_all()
            t = self._thread
        if busy is not None:
            log.info("closing while tools of %s run: they are abandoned", busy.response_id)
            self._publish(Event("tool.abandoned", {
                "response_id": busy.response_id, "names": [c.name for c in busy.calls],
                "reason": "the session closed while they ran; their results are discarded"}))
        self._runner.close(wait=False)  # wakes a run_calls waiting on a tool
        here = threading.current_thread()
        if t is not None and t is not here and not here.name.startswith("rtqueue-tool"):
            t.join(timeout)
