"""A guarded support desk: an output guardrail, an approval-gated refund tool and MCP tools.

The desk agent has

- an **output guardrail** (``no_refund_promises``): the assistant must never
  promise a refund itself. When its words trip it, the session stops the
  reply, cancels and truncates it, tells the model why and asks for one
  correction, all through the gate;
- a **refund tool that needs approval** (``issue_refund``): every call waits
  for the app's policy (``RefundPolicy``: up to 100 EUR approved, more
  rejected with a reason the model is told);
- a **hosted MCP server** (``policies``, the Realtime GA ``mcp`` tool type),
  which the service calls itself; its calls need approval too, and the same
  policy lets read-only lookups through;
- a **local MCP server's tools** (``examples/mcp_orders_server.py``, started
  over stdio by :class:`rtqueue.mcp.MCPServer`): ``order_status`` and
  ``order_total`` are called from the session's tool pool like any tool.

By default it runs on the embedded simulator with a scripted customer (five
turns). Each scripted line carries simulator hooks (``[tools: ...]``,
``[mcp: ...]``, ``[say: ...]``; see ``rtqueue/sim/model.py``) that make the
simulated model call the tools and, once, promise a refund so the guardrail
trips; the transcript shows the lines without them. It prints the
transcript and, last, one JSON line: ``conflicts`` (the simulator's count of
``conversation_already_has_active_response``), ``lost_intents`` (a turn
without an answer, or a ``response.create`` that never became a response),
``guardrail_trips``, ``corrections``, ``approvals``, ``rejections`` and
``mcp_calls`` (hosted + local; also split out).

    python examples/guarded_desk.py            # the scripted customer, on the simulator
    python examples/guarded_desk.py --live     # on OpenAI ($OPENAI_API_KEY), no hooks;
                                               # --mcp-url names a real hosted MCP server
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import threading
from pathlib import Path
from typing import Any

import attrs

import rtqueue
from rtqueue import (
    Agent,
    ApprovalDecision,
    ApprovalRequest,
    GuardrailContext,
    GuardrailResult,
    HostedMCP,
    Session,
    output_guardrail,
    tool,
)
from rtqueue.audio import AudioIO, NullSpeaker
from rtqueue.mcp import MCPServer

ORDERS_SERVER = Path(__file__).resolve().parent / "mcp_orders_server.py"
REFUND_LIMIT_EUR = 100.0
SIM_SPEED = 8.0

# (what the customer says, the simulator hooks that steer the scripted model)
SCRIPT: tuple[tuple[str, str], ...] = (
    ("Hi, where is my order 1042?", "[tools: order_status]"),
    ("What is your policy on returns?", "[mcp: policies.search_policies]"),
    ("The blender from order 1042 broke after a week. Can I get my money back?",
     "[tools: ] [say: Of course! I promise you a full refund today, no questions asked, and a voucher on top.]"),
    ("Please refund order 1042, amount 40 euros.", "[tools: issue_refund]"),
    ("And refund order 1043 too, amount 450 euros.", "[tools: issue_refund]"),
)

_HOOK = re.compile(r"\[(say|len|tools|items|mcp)\s*:[^\]]*\]", re.IGNORECASE)
_PROMISE = re.compile(r"\b(promise|guarantee)\w*\b.*\brefund", re.IGNORECASE | re.DOTALL)


def make_guardrail(simulated: bool) -> rtqueue.OutputGuardrail:
    """The desk's output guardrail; on the simulator its note also scripts the correction's words."""
    note = ("You promised a refund, which only a manager may approve. Do not promise refunds: say you are "
            "sorry and that you can request a refund for approval.")
    if simulated:
        note += " [say: Sorry, I should not have said that. Refunds need an approval; I can request one for you.]"

    @output_guardrail(every_chars=24)
    def no_refund_promises(ctx: GuardrailContext) -> GuardrailResult:
        """Trips when the assistant promises or guarantees a refund."""
        hit = _PROMISE.search(ctx.text)
        return GuardrailResult(hit is not None, info={"matched": hit.group(0)} if hit else None, message=note)

    return no_refund_promises


@tool(needs_approval=True)
def issue_refund(order_id: str, amount: float) -> dict[str, Any]:
    """Refund (part of) an order to the customer's card.

    Args:
        order_id: the order number
        amount: how much to refund, in euros
    """
    return {"order_id": order_id, "refunded_eur": amount, "status": "refund issued"}


@attrs.define
class RefundPolicy:
    """The app's approval handler: small refunds and read-only MCP lookups yes, anything else no.

    It runs on the session's tool worker (never the socket reader) and may take
    its time: a real desk would ask a person here.
    """

    limit_eur: float = REFUND_LIMIT_EUR
    decisions: list[tuple[str, bool]] = attrs.field(factory=list)

    def __call__(self, req: ApprovalRequest) -> ApprovalDecision:
        if req.kind == "mcp":
            ok = req.server_label == "policies"
            return self._note(req, ApprovalDecision(ok, None if ok else "unknown MCP server"))
        try:
            amount = float(json.loads(req.arguments or "{}").get("amount", 0))
        except (TypeError, ValueError):
            return self._note(req, ApprovalDecision(False, "the amount is not a number"))
        if amount <= self.limit_eur:
            return self._note(req, ApprovalDecision(True))
        return self._note(req, ApprovalDecision(
            False, f"{amount:g} EUR is over the desk's {self.limit_eur:g} EUR limit; a manager will call back"))

    def _note(self, req: ApprovalRequest, decision: ApprovalDecision) -> ApprovalDecision:
        self.decisions.append((req.name, decision.approved))
        return decision


@attrs.define
class Tally:
    """What the session's events said, counted on its dispatcher thread (read after close)."""

    local_tools: frozenset[str]
    hosted_mcp_calls: int = 0
    local_mcp_calls: int = 0
    lock: threading.Lock = attrs.field(factory=threading.Lock)

    def attach(self, session: Session) -> None:
        session.on("guardrail.tripped", self._tripped)
        session.on("tool.approved", lambda e: print(f"    [approved] {e['name']}"))
        session.on("tool.rejected", lambda e: print(f"    [rejected] {e['name']}: {e['reason']}"))
        session.on("tool.result", self._tool)
        session.on("tool.error", lambda e: print(f"    [tool error] {e.name}: {e.error}"))
        session.on("response.mcp_call.completed", self._hosted)

    def _tripped(self, e: rtqueue.Event) -> None:
        print(f"    [guardrail {e['guardrail']} cut the desk off after \"{e['text']}\" "
              f"({e['info']}); correcting: {e['corrected']}]")

    def _tool(self, e: rtqueue.Event) -> None:
        local = e.name in self.local_tools
        with self.lock:
            self.local_mcp_calls += local
        output = " ".join(str(e.output).split())  # MCP results come pretty-printed
        print(f"    [{'local MCP' if local else 'tool'}] {e.name}({e.arguments}) -> {output}")

    def _hosted(self, e: rtqueue.Event) -> None:
        with self.lock:
            self.hosted_mcp_calls += 1
        print(f"    [hosted MCP] call {e.get('item_id')} completed")


def lost_creates(sim: rtqueue.Simulator) -> int:
    """In-band ``response.create`` intents (by event id) that every try of failed, from the simulator's logs."""
    sent: dict[str, int] = {}
    for ev in sim.client_events():
        resp = ev.get("response") if isinstance(ev.get("response"), dict) else {}
        if ev.get("type") == "response.create" and resp.get("conversation") != "none":
            eid = str(ev.get("event_id"))
            sent[eid] = sent.get(eid, 0) + 1
    failed: dict[str, int] = {}
    for ev in sim.server_events():
        eid = (ev.get("error") or {}).get("event_id") if ev.get("type") == "error" else None
        if eid in sent:
            failed[eid] = failed.get(eid, 0) + 1
    return sum(1 for eid, n in sent.items() if failed.get(eid, 0) >= n)


def run(live: bool, mcp_url: str | None) -> dict[str, Any]:
    """Run the scripted conversation; returns the summary printed last."""
    policy = RefundPolicy()
    unanswered = 0
    with contextlib.ExitStack() as stack:
        sim = None if live else stack.enter_context(rtqueue.Simulator(speed=SIM_SPEED, latency_ms=10))
        orders = stack.enter_context(MCPServer.stdio(sys.executable, [str(ORDERS_SERVER)], name="orders",
                                                     timeout=10.0, connect_timeout=30.0))
        hosted = []
        if sim is not None or mcp_url:
            # On the simulator the URL is never contacted: the simulator plays the MCP server.
            hosted = [HostedMCP("policies", server_url=mcp_url or "https://mcp.example.invalid/policies",
                                allowed_tools=["search_policies"], require_approval="always")]
        desk = Agent(
            "desk",
            instructions=("You are the support desk of a small appliance shop. Be brief. Look orders up with "
                          "the order tools, shop policies with the policies server, and use issue_refund "
                          "for refunds. Never promise a refund yourself."),
            tools=[issue_refund, *orders.tools()],
            mcp=hosted,
        )
        tally = Tally(frozenset(t.name for t in orders.tools()))
        session = stack.enter_context(Session.connect(
            url=sim.url if sim else None, agent=desk, turn_detection=None, reconnect=sim is None,
            audio=AudioIO(output=NullSpeaker(speed=SIM_SPEED if sim else 1.0), input=None),
            output_guardrails=[make_guardrail(simulated=sim is not None)],
            approval_handler=policy, approval_timeout=30.0,
        ))
        tally.attach(session)
        for text, hooks in SCRIPT:
            print(f"customer> {text}")
            try:
                answer = session.ask(f"{text} {hooks}" if sim else text, timeout=120)
            except rtqueue.RtqueueError as exc:
                unanswered += 1
                print(f"    [no answer: {exc}]")
                continue
            if not answer.text.strip():
                unanswered += 1
            print(f"{answer.agent}: {_HOOK.sub('', answer.text).strip()}\n")
            session.wait_idle(60)
        stats = session.stats()
    # Everything is closed here: the dispatcher delivered every event and the MCP server has exited.
    approvals = stats["approvals"]
    return {
        "conflicts": sim.stats()["conflicts"] if sim else None,
        "lost_intents": unanswered + (lost_creates(sim) if sim else 0),
        "guardrail_trips": stats["guardrail_trips"],
        "corrections": stats["corrections"],
        "approvals": approvals["approved"],
        "rejections": approvals["rejected"],
        "mcp_calls": tally.hosted_mcp_calls + tally.local_mcp_calls,
        "hosted_mcp_calls": tally.hosted_mcp_calls,
        "local_mcp_calls": tally.local_mcp_calls,
        "decisions": policy.decisions,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--live", action="store_true", help="use OpenAI instead of the simulator")
    parser.add_argument("--mcp-url", help="a real hosted MCP server for --live (else no hosted MCP tool)")
    args = parser.parse_args()
    summary = run(args.live, args.mcp_url)
    print(json.dumps(summary))
    ok = summary["conflicts"] in (0, None) and summary["lost_intents"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
