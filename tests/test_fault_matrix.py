"""Fault matrix (issue 6): every injected fault x {idle, streaming, tool call, handoff} in flight.

For each case the session either recovers (a later ``ask()`` completes) or the
work in flight fails with a typed rtqueue error; no ``wait()`` hangs (every
wait has a timeout and ``ResponseTimeout`` counts as a hang here); every
client event the session queued was either sent or carries an error; after
``close()`` no thread is left (the autouse leak check).
"""

from __future__ import annotations

import threading
import zlib
from typing import Any

import pytest

import rtqueue
from rtqueue import Agent, FaultPlan, ReconnectPolicy, Session, Simulator, tool
from rtqueue.errors import ResponseTimeout, RtqueueError
from tests.utils import UNIT

FAULTS: dict[str, FaultPlan] = {
    "drop_after_events": FaultPlan(drop_after_events=0),
    "drop_mid_response": FaultPlan(drop_mid_response=True),
    "withhold_done": FaultPlan(withhold_done=1),
    "duplicate_events": FaultPlan(duplicate_events=0.5),
    "delay_events_ms": FaultPlan(delay_events_ms=20),
    "malformed_json": FaultPlan(malformed_json_after=0),
    "binary_frame": FaultPlan(binary_frame_after=0),
    "unknown_event": FaultPlan(unknown_event_after=0),
    "error_server_error": FaultPlan(error_after=(0, "server_error")),
    "error_insufficient_quota": FaultPlan(error_after=(0, "insufficient_quota")),
    "expire": FaultPlan(expire_after_s=0),
    "stall_reading": FaultPlan(stall_reading_s=0.2),
}
STATES = ("idle", "streaming", "tool_call", "handoff")
#: How the simulator's stats show that each fault really happened.
FIRED = {
    "drop_after_events": "drop_after_events",
    "drop_mid_response": "drop_mid_response",
    "duplicate_events": "duplicate_events",
    "delay_events_ms": "delay_events_ms",
    "malformed_json": "malformed_json_after",
    "binary_frame": "binary_frame_after",
    "unknown_event": "unknown_event_after",
    "error_server_error": "error_after",
    "error_insufficient_quota": "error_after",
    "stall_reading": "stall_reading_s",
}
RECONNECTS = {"drop_after_events", "drop_mid_response", "expire"}

POLICY = ReconnectPolicy(initial_backoff=0.01, max_backoff=0.05, connect_timeout=UNIT)
RESPONSE_TIMEOUT = 2.0  # a withheld response.done is evicted after this long


def said(text: str) -> dict[str, Any]:
    """Response params whose context is one user message (the simulator's hooks)."""
    return {"input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}]}


def _settle(handle: rtqueue.ResponseHandle) -> str:
    """Wait for a response chain; return its outcome. A ResponseTimeout (a hang) fails the test."""
    try:
        final = handle.final(UNIT)
    except ResponseTimeout as exc:  # pragma: no cover - the property under test
        pytest.fail(f"wait() hung: {exc}")
    except RtqueueError as exc:
        return type(exc).__name__
    return final.status


def _index(sim: Simulator) -> int:
    return int(sim.stats()["sessions"]) - 1


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault_matrix(fault: str, state: str):
    """The session recovers or fails typed; no hung wait, no silently lost event, no leaked thread."""
    plan = FAULTS[fault]
    release = threading.Event()
    tool_started = threading.Event()

    @tool
    def lookup_order(order_id: str) -> dict:
        """Look up an order by its id."""
        tool_started.set()
        release.wait(UNIT)
        return {"order_id": order_id, "status": "shipped"}

    bravo = Agent(name="bravo", instructions="You are bravo.", tools=[lookup_order])
    alpha = Agent(name="alpha", instructions="You are alpha.", tools=[lookup_order], handoffs=[bravo])
    with Simulator(speed=50.0, seed=zlib.crc32(f"{fault}/{state}".encode())) as sim:
        session = Session.connect(
            url=sim.url, agent=alpha, reconnect=POLICY, response_timeout=RESPONSE_TIMEOUT, tool_timeout=UNIT
        )
        try:
            errors = session.events("rtqueue.error", "session.closed", "gate.evicted")
            assert session.ask("Hello", timeout=UNIT).status == "completed"
            in_flight = _bring_to(state, session, sim, plan, tool_started)
            release.set()
            outcomes = [_settle(h) for h in in_flight]
            assert all(o in ("completed", "cancelled", "incomplete", "ConnectionLost", "ResponseError",
                             "ResponseRejected") for o in outcomes), outcomes
            # Recovery: a following ask completes (a response cut by the fault may fail typed first).
            after = [_ask_outcome(session, f"And now? attempt {i}") for i in range(3)]
            assert "completed" in after, (outcomes, after)
            assert after.index("completed") <= 1, after
            assert session.wait_idle(UNIT)
        finally:
            release.set()
            session.close(timeout=UNIT)
        assert not session.threads()
        assert session.stats()["handles_issued"] > 3  # the check below covers app and internal events
        lost = [h.event for h in session.unresolved()]
        assert not lost, f"client events neither sent nor failed: {[e.get('type') for e in lost]}"
        drained = []
        while (ev := errors.get(0)) is not None:
            drained.append(ev.type)
        if fault in ("malformed_json", "binary_frame"):
            assert "rtqueue.error" in drained
        if fault == "withhold_done":
            # The first response created after the fault never ends: it was evicted, with an event.
            assert "gate.evicted" in drained and session.gate.stats().evicted == 1
        stats = sim.stats()
        assert stats["conflicts"] == session.gate.stats().retried
        if fault in FIRED:
            assert stats["faults"].get(FIRED[fault], 0) >= 1, stats["faults"]
        elif fault == "withhold_done":
            assert stats["withheld"] == 1
        else:
            assert stats["errors"].get("session_expired") == 1
        assert (session.stats()["reconnects"] >= 1) == (fault in RECONNECTS)
        print(f"{fault}/{state}: in flight {outcomes}, after {after}, reconnects {session.stats()['reconnects']}")


def _ask_outcome(session: Session, text: str) -> str:
    session.send_text(text)
    return _settle(session.create_response())


def _bring_to(
    state: str, session: Session, sim: Simulator, plan: FaultPlan, tool_started: threading.Event
) -> list[rtqueue.ResponseHandle]:
    """Put the session in ``state``, inject ``plan`` there; return the handles in flight."""
    index = _index(sim)
    if state == "idle":
        sim.inject(plan, session=index)
        return []
    if state == "streaming":
        deltas = session.events("response.output_audio.delta")
        handle = session.create_response(**said("[len: 60]"))
        assert deltas.get(UNIT) is not None
        sim.inject(plan, session=index)
        return [handle]
    if state == "tool_call":
        session.send_text("Where is order 42? Please lookup the order.")
        handle = session.create_response()
        assert tool_started.wait(UNIT)
        sim.inject(plan, session=index)
        return [handle]
    assert state == "handoff"
    calls = session.events("response.function_call_arguments.done")
    session.send_text("Please transfer me to bravo.")
    handle = session.create_response()
    assert calls.get(UNIT) is not None  # the handoff call is out; its response is still running
    sim.inject(plan, session=index)
    return [handle]
