"""The conversation core alone: no threads, no sockets, no sleeping.

Each test feeds :class:`rtqueue.core.ConversationCore` app requests, server
events and tool results, and checks the actions it returns. The property test
at the end drives it together with a gate, a one-lane "writer" and a model
server through random interleavings and checks the invariants of issue 12:
at most one in-band response in flight, every request settled exactly once,
every tool call answered exactly once, the agent of a response never changes.
"""

from __future__ import annotations

import json
from collections import Counter, deque
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rtqueue import Agent, tool
from rtqueue.agents import resolve_agents, session_config_for
from rtqueue.core import (
    REQUEST_MOVES,
    ConversationCore,
    CoreError,
    Fail,
    Phase,
    Publish,
    ReleaseHold,
    Request,
    Resolve,
    RunTools,
    Send,
    SetFollowup,
    Started,
)
from rtqueue.errors import ConnectionLost, ResponseRejected, SessionClosed
from rtqueue.gate import ResponseGate
from rtqueue.handles import ResponseHandle
from rtqueue.protocol import METADATA_KEY
from rtqueue.routing import GateRouter

# -- fixtures --------------------------------------------------------------------------------


@tool
def lookup(order_id: str) -> dict:
    """Look up an order."""
    return {"order_id": order_id}


@tool
def refund(order_id: str) -> dict:
    """Refund an order."""
    return {"refunded": order_id}


BRAVO = Agent(name="bravo", instructions="You are bravo.", tools=[refund], handoffs=["alpha"])
ALPHA = Agent(name="alpha", instructions="You are alpha.", tools=[lookup], handoffs=[BRAVO])
GRAPH = resolve_agents(ALPHA)


def handle() -> ResponseHandle:
    """A plain future (callbacks run inline: there is no dispatcher here)."""
    return ResponseHandle({}, dispatch=lambda fn, h: fn(h))


def make_core(*, agents: bool = True) -> ConversationCore:
    core = ConversationCore(handle_factory=lambda ev, in_band: handle())
    if agents:
        core.start_agents(GRAPH, ALPHA)
    return core


def sends(actions: list[Any]) -> list[dict[str, Any]]:
    return [a.event for a in actions if isinstance(a, Send)]


def created(rid: str, eid: str | None, *, in_band: bool = True) -> dict[str, Any]:
    return {"type": "response.created", "response": {
        "id": rid, "status": "in_progress", "conversation_id": "conv_1" if in_band else None,
        "metadata": {METADATA_KEY: eid} if eid else None}}


def done(rid: str, eid: str | None = None, status: str = "completed", calls: list[tuple[str, str]] = (),
         text: str = "") -> dict[str, Any]:
    output: list[dict[str, Any]] = [{"type": "function_call", "call_id": cid, "name": name, "arguments": "{}",
                                     "id": f"item_{cid}"} for cid, name in calls]
    if text:
        output.append({"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": text}]})
    return {"type": "response.done", "response": {
        "id": rid, "status": status, "output": output, "conversation_id": "conv_1",
        "metadata": {METADATA_KEY: eid} if eid else None}}


def updated(session: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"type": "session.updated", "session": session or {"type": "realtime"}}


# -- requests and responses ----------------------------------------------------------------------


def test_request_moves_are_a_table_and_illegal_moves_change_nothing():
    """A request's phase follows REQUEST_MOVES; an illegal move raises CoreError and leaves it as it was."""
    req = Request("evt_1", handle(), {}, True, None)
    req.move("created")
    assert req.phase is Phase.CREATED
    with pytest.raises(CoreError):
        req.move("retry")
    assert req.phase is Phase.CREATED
    req.move("done")
    with pytest.raises(CoreError):
        req.move("fail")
    assert req.phase is Phase.DONE
    assert all(nxt in Phase for nxt in REQUEST_MOVES.values())


def test_create_is_tagged_and_resolved_by_its_own_done():
    """A create carries its event id in metadata; created then done resolve its handle with that agent."""
    core = make_core()
    h = handle()
    [send] = core.create_response({"instructions": "hi"}, h, now=0.0)
    assert isinstance(send, Send) and send.gated and send.event["response"]["metadata"] == {
        METADATA_KEY: send.event["event_id"]}
    eid = send.event["event_id"]
    actions = core.receive(created("resp_1", eid))
    assert actions == [Started(h, "resp_1", "alpha")]
    actions = core.receive(done("resp_1", eid, text="hello"))
    [resolve] = [a for a in actions if isinstance(a, Resolve)]
    assert resolve.future is h and resolve.value.text == "hello" and resolve.value.agent == "alpha"
    assert core.requests() == []


def test_sixteen_metadata_pairs_are_not_tagged_and_matched_as_the_pending_one():
    """With the app's 16 metadata pairs the core adds no 17th; the gate's match says which create it was."""
    core = make_core()
    meta = {f"k{i}": "v" for i in range(16)}
    h = handle()
    [send] = core.create_response({"metadata": meta}, h, now=0.0)
    assert send.untagged and send.event["response"]["metadata"] == meta
    eid = send.event["event_id"]
    assert core.receive(created("resp_1", None), matched=eid) == [Started(h, "resp_1", "alpha")]


def test_turn_holds_its_user_item_with_its_create():
    """ask(): the user item travels as the create's prelude, sent inside the gate right before it."""
    core = make_core()
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "q"}]}
    [send] = core.turn(item, {}, handle(), now=0.0)
    assert send.gated and len(send.prelude) == 1
    pre = send.prelude[0]
    assert pre["type"] == "conversation.item.create" and pre["item"]["role"] == "user"
    assert pre["item"]["id"].startswith("item_rtq_")  # ours: a reconnect can tell whether it arrived
    assert core.turn_seq == 0  # it cannot cut into a running tool chain, so it does not end one


def test_conflict_is_retried_without_the_prelude_and_other_errors_reject():
    """A raced create goes back to the head without its user item; any other error fails the handle."""
    core = make_core()
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "q"}]}
    h = handle()
    [send] = core.turn(item, {}, h, now=0.0)
    eid = send.event["event_id"]
    err = {"type": "error", "error": {"code": "conversation_already_has_active_response", "message": "x",
                                      "event_id": eid}}
    actions = core.receive(err, verdict="retry")
    [again] = sends(actions)
    [resend] = [a for a in actions if isinstance(a, Send)]
    assert again["event_id"] == eid and resend.front and resend.prelude == ()
    actions = core.receive({"type": "error", "error": {"code": "invalid_value", "message": "no", "event_id": eid}},
                           verdict="reject")
    [fail] = actions
    assert isinstance(fail, Fail) and fail.future is h and isinstance(fail.error, ResponseRejected)
    assert core.requests() == []


def test_vad_response_gets_the_confirmed_agent_not_the_requested_one():
    """A handoff the server has not confirmed yet does not change the agent of a response it starts."""
    core = make_core()
    config = session_config_for(BRAVO, GRAPH)
    actions = core.app_handoff(BRAVO, config, None, now=0.0, respond=False)
    assert sends(actions)[0]["type"] == "session.update" and core.agent is BRAVO
    core.receive(created("resp_vad", None))  # before session.updated: the server still runs alpha
    assert core.response("resp_vad").agent == "alpha"
    core.receive(updated())
    core.receive(created("resp_2", None))
    assert core.response("resp_2").agent == "bravo"


def test_tool_calls_resolve_against_the_agent_of_their_response():
    """alpha's response calls alpha's tool even after the app handed off to bravo meanwhile."""
    core = make_core()
    h = handle()
    eid = core.create_response({}, h, now=0.0)[0].event["event_id"]
    core.receive(created("resp_1", eid))
    core.app_handoff(BRAVO, session_config_for(BRAVO, GRAPH), None, now=0.0, respond=False)
    core.receive(updated())
    actions = core.receive(done("resp_1", eid, calls=[("call_1", "lookup")]))
    [run] = [a for a in actions if isinstance(a, RunTools)]
    assert run.job.agent == "alpha" and [c.name for c in run.job.calls] == ["lookup"]
    assert SetFollowup(h, expect=True) in actions
    assert actions.index(SetFollowup(h, expect=True)) < actions.index(next(a for a in actions
                                                                           if isinstance(a, Resolve)))


def test_handoff_is_transactional():
    """A handoff whose target fails to render: error output, agent unchanged, handoff_failed, one follow-up."""
    core = make_core()
    h = handle()
    eid = core.create_response({}, h, now=0.0)[0].event["event_id"]
    core.receive(created("resp_1", eid))
    [run] = [a for a in core.receive(done("resp_1", eid, calls=[("call_h", "transfer_to_bravo")]))
             if isinstance(a, RunTools)]
    assert run.job.handoff_call == "call_h" and run.job.handoff_target == "bravo"
    actions = core.tool_results("resp_1", {}, handoff_error=RuntimeError("no instructions"), now=1.0)
    events = sends(actions)
    assert events[0]["item"]["call_id"] == "call_h" and "failed" in json.loads(events[0]["item"]["output"])["error"]
    assert [e["type"] for e in events] == ["conversation.item.create", "response.create"]  # no session.update
    assert core.agent is ALPHA
    failed = [a.data for a in actions if isinstance(a, Publish) and a.type == "agent.handoff_failed"]
    assert failed and failed[0]["target"] == "bravo" and failed[0]["source"] == "alpha"


def test_handoff_that_renders_switches_in_wire_order():
    """A good handoff: output, then session.update, then one create, and agent.handoff published."""
    core = make_core()
    eid = core.create_response({}, handle(), now=0.0)[0].event["event_id"]
    core.receive(created("resp_1", eid))
    core.receive(done("resp_1", eid, calls=[("call_h", "transfer_to_bravo"), ("call_t", "lookup")]))
    actions = core.tool_results("resp_1", {"call_t": '{"ok": 1}'},
                                handoff_config=session_config_for(BRAVO, GRAPH), now=1.0)
    assert [(e["type"], e.get("item", {}).get("call_id")) for e in sends(actions)] == [
        ("conversation.item.create", "call_h"), ("conversation.item.create", "call_t"),
        ("session.update", None), ("response.create", None)]
    assert core.agent is BRAVO


def test_interrupted_response_answers_calls_not_run_and_makes_no_followup():
    """A cancelled response with a call: 'not run' output, tool.skipped, no RunTools, no follow-up."""
    core = make_core()
    h = handle()
    eid = core.create_response({}, h, now=0.0)[0].event["event_id"]
    core.receive(created("resp_1", eid))
    actions = core.receive(done("resp_1", eid, status="cancelled", calls=[("call_1", "lookup")]))
    assert not any(isinstance(a, RunTools) for a in actions)
    assert "not run" in sends(actions)[0]["item"]["output"]
    assert any(isinstance(a, Publish) and a.type == "tool.skipped" for a in actions)


def test_a_call_is_handled_once():
    """The same response.done twice: its calls run once."""
    core = make_core()
    core.receive(created("resp_1", None))
    first = core.receive(done("resp_1", calls=[("call_1", "lookup")]))
    second = core.receive(done("resp_1", calls=[("call_1", "lookup")]))
    assert sum(isinstance(a, RunTools) for a in first) == 1
    assert not any(isinstance(a, RunTools) for a in second)


def test_new_user_turn_skips_the_stale_followup():
    """The user spoke while tools ran: outputs still go, the follow-up does not."""
    core = make_core()
    h = handle()
    eid = core.create_response({}, h, now=0.0)[0].event["event_id"]
    core.receive(created("resp_1", eid))
    core.receive(done("resp_1", eid, calls=[("call_1", "lookup")]))
    core.receive({"type": "input_audio_buffer.speech_started"})
    actions = core.tool_results("resp_1", {"call_1": "{}"}, now=1.0)
    assert [e["type"] for e in sends(actions)] == ["conversation.item.create"]
    assert SetFollowup(h) in actions


def test_cancel_once_and_waiters_get_the_done():
    """Two cancels of one response send one response.cancel; both waiters get its Response."""
    core = make_core()
    core.receive(created("resp_1", None))
    w1, w2 = handle(), handle()
    first = core.cancel_response("resp_1", w1)
    second = core.cancel_response("resp_1", w2)
    assert [e["type"] for e in sends(first)] == ["response.cancel"] and sends(second) == []
    resolved = [a.future for a in core.receive(done("resp_1", status="cancelled")) if isinstance(a, Resolve)]
    assert resolved == [w1, w2]
    assert core.is_finished("resp_1") and sends(core.cancel_response("resp_1", None)) == []


def test_update_waiters_are_answered_in_order_and_errors_by_id():
    """session.updated answers the oldest update; an error naming an update fails that one."""
    core = make_core(agents=False)
    w1, w2 = handle(), handle()
    e1 = sends(core.update({"type": "realtime", "instructions": "a"}, None, w1))[0]["event_id"]
    e2 = sends(core.update({"type": "realtime", "voice": "x"}, None, w2))[0]["event_id"]
    assert e1 != e2
    actions = core.receive({"type": "error", "error": {"code": "invalid_value", "message": "bad", "event_id": e2}})
    assert [type(a) for a in actions] == [Fail] and actions[0].future is w2
    actions = core.receive(updated({"type": "realtime", "instructions": "a"}))
    assert actions == [Resolve(w1, {"type": "realtime", "instructions": "a"})]


def test_connection_lost_reissues_pending_and_fails_streaming():
    """On a drop: a create the server never started goes again (with its unseen item); a streaming one fails."""
    core = make_core()
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "q"}]}
    streaming, pending = handle(), handle()
    e1 = core.create_response({}, streaming, now=0.0)[0].event["event_id"]
    core.receive(created("resp_1", e1))
    e2 = core.turn(item, {}, pending, now=0.0)[0].event["event_id"]
    actions, failed, reissue = core.connection_lost([(e1, "resp_1", False), (e2, None, True)])
    assert failed == 1 and next(a for a in actions if isinstance(a, Fail)).future is streaming
    assert isinstance(next(a for a in actions if isinstance(a, Fail)).error, ConnectionLost)
    [again] = reissue
    assert again.event["event_id"] == e2 and again.front and len(again.prelude) == 1


def test_close_fails_everything_once_and_refuses_new_requests():
    """close(): every live request, waiter and follow-up settles; later requests raise SessionClosed."""
    core = make_core()
    h1, h2, w = handle(), handle(), handle()
    core.create_response({}, h1, now=0.0)
    e2 = core.create_response({}, h2, now=0.0)[0].event["event_id"]
    core.receive(created("resp_2", e2))
    core.cancel_response("resp_2", w)
    actions = core.close(SessionClosed("bye"))
    assert {id(a.future) for a in actions if isinstance(a, Fail)} == {id(h1), id(h2), id(w)}
    with pytest.raises(SessionClosed):
        core.create_response({}, handle(), now=0.0)
    assert core.close(SessionClosed("again")) == []


def test_barge_in_cancels_once_and_truncates_only_conversation_items():
    """barge_in: cancel + truncate (cancel first), never a second cancel, no truncate of unknown items."""
    core = make_core()
    core.receive(created("resp_1", None))
    core.receive({"type": "conversation.item.added", "item": {"id": "item_1", "type": "message",
                                                             "role": "assistant"}})
    actions, sent, ending = core.barge_in("resp_1", cancel=True, server_cancels=False, truncate=("item_1", 500))
    assert sent and ending and [e["type"] for e in sends(actions)] == ["response.cancel",
                                                                       "conversation.item.truncate"]
    actions, sent, ending = core.barge_in("resp_1", cancel=True, server_cancels=False, truncate=("item_x", 5))
    assert not sent and ending and sends(actions) == []


def test_history_is_bounded_by_size():
    """A 10 MB message is cut in the history, and the store stays near its character cap."""
    core = make_core(agents=False)
    big = "x" * 10_000_000
    core.receive({"type": "conversation.item.added", "item": {
        "id": "item_big", "type": "message", "role": "user", "content": [{"type": "input_text", "text": big}]}})
    [item] = core.history.items()
    assert len(item["content"][0]["text"]) < 200_000 and item["content"][0]["text"].endswith("[truncated by rtqueue]")
    for i in range(50):
        core.receive({"type": "conversation.item.added", "item": {
            "id": f"item_{i}", "type": "message", "role": "user",
            "content": [{"type": "input_text", "text": "y" * 90_000}]}})
    assert core.history.chars <= 1_000_000


# -- the property test -----------------------------------------------------------------------------


class World:
    """The core, a real gate, one writer lane and a model server, stepped by hand."""

    def __init__(self) -> None:
        self.t = 0.0
        self.core = ConversationCore(handle_factory=lambda ev, in_band: self.track(handle()))
        self.core.start_agents(GRAPH, ALPHA)
        self.gate = ResponseGate(max_retries=3, clock=lambda: self.t)
        self.router = GateRouter(self.gate)  # the reader's gate step, as the shell runs it
        self.lane: deque[Send] = deque()
        self.handles: list[ResponseHandle] = []
        self.settled: Counter[int] = Counter()
        self.server_queue: deque[dict[str, Any]] = deque()  # creates the server accepted, not started
        self.server_active: list[tuple[str, str | None, bool]] = []  # (rid, eid, in_band)
        self.updates_unanswered = 0
        self.jobs: deque[Any] = deque()
        self.outputs: Counter[str] = Counter()
        self.calls: set[str] = set()
        self.agent_at_start: dict[str, str | None] = {}
        self.conflicts = 0
        self.n = 0

    def track(self, h: ResponseHandle) -> ResponseHandle:
        self.handles.append(h)
        original_result, original_error = h.set_result, h.set_error

        def set_result(value: Any) -> bool:
            ok = original_result(value)
            self.settled[id(h)] += ok
            if ok and value.id in self.agent_at_start:
                assert value.agent == self.agent_at_start[value.id], "the agent of a response changed"
            return ok

        def set_error(error: BaseException) -> bool:
            ok = original_error(error)
            self.settled[id(h)] += ok
            return ok

        h.set_result, h.set_error = set_result, set_error  # type: ignore[method-assign]
        return h

    def apply(self, actions: list[Any]) -> None:
        fronts: list[Send] = []
        for a in actions:
            if isinstance(a, Send):
                if a.front:
                    fronts.append(a)
                else:
                    self.lane.append(a)
            elif isinstance(a, Resolve):
                a.future.set_result(a.value)
            elif isinstance(a, Fail):
                a.future.set_error(a.error)
            elif isinstance(a, Started):
                a.handle.set_started(a.response_id, a.agent)
                self.agent_at_start[a.response_id] = a.agent
            elif isinstance(a, RunTools):
                self.jobs.append(a.job)
            elif isinstance(a, ReleaseHold):
                self.gate.release_hold(a.response_id)
            elif isinstance(a, SetFollowup):
                if a.expect:
                    a.handle.expect_followup()
                else:
                    a.handle.set_followup(a.followup)
        self.lane.extendleft(reversed(fronts))

    # the app
    def app_create(self) -> None:
        self.apply(self.core.create_response({}, self.track(handle()), now=self.t))

    def app_turn(self) -> None:
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "q"}]}
        self.apply(self.core.turn(item, {}, self.track(handle()), now=self.t))

    def app_oob(self) -> None:
        self.apply(self.core.create_response({"conversation": "none"}, self.track(handle()), now=self.t))

    def app_handoff(self) -> None:
        target = BRAVO if self.core.agent is ALPHA else ALPHA
        self.apply(self.core.app_handoff(target, session_config_for(target, GRAPH), self.track(handle()),
                                         now=self.t, respond=True))

    # the writer
    def write(self) -> None:
        if not self.lane:
            return
        head = self.lane[0]
        if head.gated and not self.gate.acquire(head.event["event_id"], 0, untagged=head.untagged, holder=head.holder):
            return
        self.lane.popleft()
        if head.oob:
            self.gate.register_oob(head.event["event_id"])
        for pre in head.prelude:
            self.server_receive(pre)
        self.server_receive(head.event)

    # the server
    def server_receive(self, event: dict[str, Any]) -> None:
        typ = event["type"]
        if typ == "session.update":
            self.updates_unanswered += 1
        elif typ == "conversation.item.create" and event["item"].get("type") == "function_call_output":
            self.outputs[event["item"]["call_id"]] += 1
        elif typ == "response.create":
            in_band = event["response"].get("conversation") != "none"
            if in_band and (any(ib for _, _, ib in self.server_active) or
                            any(c["response"].get("conversation") != "none" for c in self.server_queue)):
                self.conflicts += 1
                self.receive({"type": "error", "error": {
                    "code": "conversation_already_has_active_response", "message": "busy",
                    "event_id": event["event_id"]}})
            else:
                self.server_queue.append(event)
        elif typ == "response.cancel":
            for rid, eid, _ in list(self.server_active):
                if rid == event["response_id"]:
                    self.finish(rid, eid, "cancelled", [])

    def receive(self, event: dict[str, Any]) -> None:
        """The shell's route(): the gate first, then the core."""
        routed = self.router.route(event, self.core)
        self.apply(self.core.receive(event, verdict=routed.verdict, matched=routed.matched))

    def start(self) -> None:
        if self.server_queue:
            ev = self.server_queue.popleft()
            self.n += 1
            rid = f"resp_{self.n}"
            in_band = ev["response"].get("conversation") != "none"
            eid = ev["event_id"]
            self.server_active.append((rid, eid, in_band))
            self.receive(created(rid, eid, in_band=in_band))

    def vad(self) -> None:
        if not any(ib for _, _, ib in self.server_active) and not self.server_queue:
            self.n += 1
            rid = f"resp_{self.n}"
            self.server_active.append((rid, None, True))
            self.receive({"type": "input_audio_buffer.speech_started"})
            self.receive(created(rid, None))

    def answer_update(self) -> None:
        if self.updates_unanswered:
            self.updates_unanswered -= 1
            self.receive(updated())

    def finish_one(self, status: str, calls: list[str]) -> None:
        if self.server_active:
            rid, eid, _ = self.server_active[0]
            self.finish(rid, eid, status, calls)

    def finish(self, rid: str, eid: str | None, status: str, names: list[str]) -> None:
        self.server_active = [a for a in self.server_active if a[0] != rid]
        calls = []
        for name in names:
            self.n += 1
            cid = f"call_{self.n}"
            self.calls.add(cid)
            calls.append((cid, name))
        self.receive(done(rid, eid, status, calls))

    # the tool worker
    def tools(self, handoff_fails: bool) -> None:
        if self.jobs:
            job = self.jobs.popleft()
            outputs = {c.call_id: '{"ok": true}' for c in job.calls}
            config = error = None
            if job.handoff_target is not None:
                if handoff_fails:
                    error = RuntimeError("instructions raised")
                else:
                    config = session_config_for(job.handoff_target, GRAPH)
            self.apply(self.core.tool_results(job.response_id, outputs, handoff_config=config,
                                              handoff_error=error, now=self.t))

    def quiesce(self) -> None:
        for _ in range(500):
            before = (len(self.lane), len(self.server_queue), len(self.server_active), len(self.jobs),
                      self.updates_unanswered)
            self.write()
            self.answer_update()
            self.start()
            self.finish_one("completed", [])
            self.tools(False)
            after = (len(self.lane), len(self.server_queue), len(self.server_active), len(self.jobs),
                     self.updates_unanswered)
            if after == before == (0, 0, 0, 0, 0):
                return
        raise AssertionError("the world did not settle")


OPS = st.sampled_from(["create", "turn", "oob", "handoff", "write", "write", "write", "start", "start", "vad",
                       "update", "done", "done_tools", "done_handoff", "cancelled_tools", "tools",
                       "tools_fail", "tick"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(OPS, min_size=1, max_size=60))
def test_invariants_hold_through_any_interleaving(ops: list[str]):
    """Random app, server and tool steps: one in-band response at a time, everything settled once."""
    w = World()
    for op in ops:
        if op == "create":
            w.app_create()
        elif op == "turn":
            w.app_turn()
        elif op == "oob":
            w.app_oob()
        elif op == "handoff":
            w.app_handoff()
        elif op == "write":
            w.write()
        elif op == "start":
            w.start()
        elif op == "vad":
            w.vad()
        elif op == "update":
            w.answer_update()
        elif op == "done":
            w.finish_one("completed", [])
        elif op == "done_tools":
            w.finish_one("completed", ["lookup", "refund", "nope"])
        elif op == "done_handoff":
            w.finish_one("completed", ["transfer_to_bravo", "transfer_to_alpha", "lookup"])
        elif op == "cancelled_tools":
            w.finish_one("cancelled", ["lookup"])
        elif op == "tools":
            w.tools(False)
        elif op == "tools_fail":
            w.tools(True)
        elif op == "tick":
            w.t += 1.0
        # At most one in-band response in flight, on our side and on the server's.
        assert sum(1 for e in w.gate.entries() if e.state != "held") <= 1  # a hold is no response in flight
        assert sum(1 for _, _, ib in w.server_active if ib) <= 1
    w.quiesce()
    assert w.conflicts == 0
    assert all(h.done() for h in w.handles), "a request was neither resolved nor failed"
    assert all(w.settled[id(h)] == 1 for h in w.handles)
    for h in w.handles:
        h.wait_followup(0)  # raises if a follow-up was promised and never decided
    assert {cid for cid in w.calls} == set(w.outputs) and set(w.outputs.values()) <= {1}, "a call not answered once"
    w.apply(w.core.close(SessionClosed("end")))
    assert all(w.settled[id(h)] == 1 for h in w.handles)


def test_stale_model_handoff_does_not_override_a_later_app_handoff():
    """The app handed off while alpha's handoff call ran: the call is answered failed, the app's choice stands."""
    core = make_core()
    eid = core.create_response({}, handle(), now=0.0)[0].event["event_id"]
    core.receive(created("resp_1", eid))
    core.receive(done("resp_1", eid, calls=[("call_h", "transfer_to_bravo")]))
    third = Agent(name="carol", instructions="You are carol.")
    graph = resolve_agents(ALPHA, (third,))
    core.set_graph(graph)
    core.app_handoff(third, session_config_for(third, graph), None, now=0.0, respond=False)
    actions = core.tool_results("resp_1", {}, handoff_config=session_config_for(BRAVO, graph), now=1.0)
    assert core.agent is third
    assert "failed" in json.loads(sends(actions)[0]["item"]["output"])["error"]
    assert not any(e["type"] == "session.update" for e in sends(actions))


def test_refused_handoff_update_restores_the_agent():
    """The server refuses a handoff's session.update: the agent goes back and agent.handoff_failed is published."""
    core = make_core()
    [update] = sends(core.app_handoff(BRAVO, session_config_for(BRAVO, GRAPH), None, now=0.0, respond=False))
    assert core.agent is BRAVO
    actions = core.receive({"type": "error", "error": {"code": "invalid_value", "message": "bad tools",
                                                       "event_id": update["event_id"]}})
    assert core.agent is ALPHA
    assert [a.type for a in actions if isinstance(a, Publish)] == ["agent.handoff_failed"]


def test_tool_chain_holds_the_gate_until_its_follow_up():
    """A response with tools keeps the gate (held); only its follow-up takes it over, and it jumps the lane."""
    core = make_core()
    gate = ResponseGate(max_retries=1)
    eid = core.create_response({}, handle(), now=0.0)[0].event["event_id"]
    assert gate.acquire(eid, 0)
    gate.on_created("resp_1", eid, in_band=True)
    event = done("resp_1", eid, calls=[("call_1", "lookup")])
    assert core.will_follow_up(event)
    gate.on_done("resp_1", eid, hold=True)
    core.receive(event)
    assert not gate.acquire("evt_other", 0)  # another create waits behind the chain
    actions = core.tool_results("resp_1", {"call_1": "{}"}, now=1.0)
    assert all(a.front for a in actions if isinstance(a, Send))
    follow = next(a for a in actions if isinstance(a, Send) and a.gated)
    assert follow.holder == "resp_1" and gate.acquire(follow.event["event_id"], 0, holder="resp_1")
    gate.on_created("resp_2", follow.event["event_id"], in_band=True)
    gate.on_done("resp_2", follow.event["event_id"])
    assert gate.acquire("evt_other", 0)


def test_reconnect_reseeds_a_sent_but_unechoed_output_and_carries_calls_still_running():
    """Re-seed: an output sent on the dead socket but never echoed goes with its call; a running call is carried."""
    core = make_core()
    core.receive(created("resp_1", None))
    for cid in ("call_sent", "call_queued", "call_running"):
        core.receive({"type": "conversation.item.added", "item": {
            "id": f"item_{cid}", "type": "function_call", "call_id": cid, "name": "lookup", "arguments": "{}"}})
    core.receive(done("resp_1", calls=[("call_sent", "lookup"), ("call_queued", "lookup")]))
    actions = core.tool_results("resp_1", {"call_sent": '{"a": 1}', "call_queued": '{"b": 2}'}, now=1.0)
    queued_eid = next(e["event_id"] for e in sends(actions) if e.get("item", {}).get("call_id") == "call_queued")
    core.receive(created("resp_2", None))
    core.receive(done("resp_2", calls=[("call_running", "lookup")]))  # its tools are still running
    _update, seeds, dropped = core.reconnect_plan(reseed=True, limit=None, queued={queued_eid})
    kinds = [(s["type"], s.get("call_id")) for s in seeds]
    assert ("function_call_output", "call_sent") in kinds  # re-created from what we sent
    assert kinds.index(("function_call", "call_sent")) < kinds.index(("function_call_output", "call_sent"))
    assert ("function_call", "call_queued") in kinds and ("function_call_output", "call_queued") not in kinds
    assert ("function_call", "call_running") in kinds
    assert dropped.get("dangling_call", 0) == 0


def test_an_oob_chain_never_blocks_an_in_band_chains_follow_up():
    """An out-of-band response's tool follow-up queues behind the in-band chain whose hold it would wait on."""
    w = World()
    w.app_oob()
    w.vad()  # the server starts an in-band response of its own
    w.write()
    w.start()
    w.finish_one("completed", ["lookup", "refund", "nope"])  # the in-band one: its chain holds the gate
    w.finish_one("completed", ["lookup", "refund", "nope"])  # the out-of-band one: a chain with no hold
    w.quiesce()
    assert w.conflicts == 0
    assert {cid for cid in w.calls} == set(w.outputs)


def test_rtqueues_own_responses_are_not_guarded():
    """A response tagged rtqueue_purpose (a recycle summary) is never checked by output guardrails."""
    core = make_core(agents=False)
    core.guard_outputs = True
    summary = created("resp_sum", None, in_band=False)
    summary["response"]["metadata"] = {"rtqueue_purpose": "recycle_summary"}
    core.receive(summary)
    core.receive(created("resp_user", None))
    assert not core.is_guarded("resp_sum") and core.is_guarded("resp_user")
    core.guard_outputs = False
    assert not core.is_guarded("resp_user")


def _conflict(eid: str, rid: str) -> dict[str, Any]:
    return {"type": "error", "error": {
        "type": "invalid_request_error", "code": "conversation_already_has_active_response", "event_id": eid,
        "message": f"Conversation already has an active response in progress: {rid}. Wait until the response "
                   "is finished before creating a new one."}}


def test_a_conflict_naming_an_unseen_response_takes_its_slot():
    """A socket attached mid-response learns the active response from the conflict, unless it already ended."""
    core = make_core(agents=False)
    gate = ResponseGate(max_retries=5)
    router = GateRouter(gate)
    assert gate.acquire("evt_1", 0)
    routed = router.route(_conflict("evt_1", "resp_unseen1"), core)
    assert routed.verdict == "retry"
    assert [e.response_id for e in gate.entries() if e.state == "active"] == ["resp_unseen1"]
    router.route(done("resp_unseen1"), core)  # its done frees the slot as usual
    assert not [e for e in gate.entries() if e.state == "active"]
    core.note_finished("resp_gone")
    assert gate.acquire("evt_2", 0)
    router.route(_conflict("evt_2", "resp_gone"), core)
    assert not [e for e in gate.entries() if e.response_id == "resp_gone"]
