"""The response gate on its own: no sockets, no sleeps (DESIGN.md section 2)."""

from __future__ import annotations

import threading
import time

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from rtqueue.errors import ConnectionLost, SessionClosed
from rtqueue.gate import ResponseGate, Verdict

CONFLICT = "conversation_already_has_active_response"


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_acquire_reserves_and_blocks_second():
    """A reserved slot is pending; a second acquire times out without blocking forever."""
    g = ResponseGate()
    assert g.acquire("e1", 0)
    assert g.entries()[0].state == "pending"
    assert not g.acquire("e2", 0)
    assert g.depth() == 1


def test_created_matches_pending_by_event_id():
    """response.created carrying our event id turns pending into active."""
    g = ResponseGate()
    g.acquire("e1", 0)
    assert g.on_created("r1", "e1") == "ours"
    assert g.active_response_id() == "r1"
    assert g.depth() == 1


def test_done_releases_by_id_not_flag():
    """A late done for an old response does not release the current one."""
    g = ResponseGate()
    g.acquire("e1", 0)
    g.on_created("r1", "e1")
    assert g.on_done("r1")
    g.acquire("e2", 0)
    g.on_created("r2", "e2")
    assert not g.on_done("r1")  # stale duplicate
    assert g.active_response_id() == "r2"


def test_foreign_created_takes_slot():
    """A server-VAD response (no event id) occupies the slot."""
    g = ResponseGate()
    assert g.on_created("rv", None) == "foreign"
    assert not g.acquire("e1", 0)
    g.on_done("rv")
    assert g.acquire("e1", 0)


def test_out_of_band_never_takes_slot():
    """Out-of-band responses run alongside; they are tracked separately."""
    g = ResponseGate()
    g.register_oob("o1")
    assert g.on_created("ro", "o1") == "oob"
    assert g.acquire("e1", 0)
    assert g.on_created("rf", None, in_band=False) == "foreign_oob"
    assert g.stats().oob_depth == 2
    g.on_done("ro")
    g.on_done("rf")
    assert g.stats().oob_depth == 0


def test_conflict_retries_bounded_then_rejects():
    """A server-raced create is retried max_retries times, then rejected."""
    g = ResponseGate(max_retries=2)
    for _ in range(2):
        g.on_created("rv", None)
        assert not g.acquire("e1", 0)
        g.on_done("rv")
        assert g.acquire("e1", 0)
        g.on_created("rv2", None)  # VAD raced our pending create
        assert g.on_error("e1", CONFLICT) is Verdict.RETRY
        g.on_done("rv2")
    g.acquire("e1", 0)
    assert g.on_error("e1", CONFLICT) is Verdict.REJECT
    s = g.stats()
    assert (s.retried, s.rejected, s.depth) == (2, 1, 0)


def test_other_error_rejects_and_unknown_error_ignored():
    """A non-conflict error for a pending create rejects it; others are not the gate's."""
    g = ResponseGate()
    g.acquire("e1", 0)
    assert g.on_error("e9", "invalid_value") is None
    assert g.on_error(None, "invalid_value") is None
    assert g.on_error("e1", "invalid_value") is Verdict.REJECT
    assert g.depth() == 0


def test_done_with_event_id_releases_pending_without_created():
    """A done whose created was lost still releases its pending create via metadata."""
    g = ResponseGate()
    g.acquire("e1", 0)
    assert g.on_done("r1", "e1")
    assert g.depth() == 0


def test_release_wakes_waiter_quickly():
    """A waiting acquire wakes on release, long before its timeout."""
    g = ResponseGate()
    g.acquire("e1", 0)
    g.on_created("r1", "e1")
    got = threading.Event()

    def waiter() -> None:
        if g.acquire("e2", 30):
            got.set()

    t = threading.Thread(target=waiter, name="test-waiter")
    t.start()
    g.on_done("r1")
    assert got.wait(5)
    t.join(5)


def test_close_wakes_waiters_with_error():
    """Closing raises the given error in every waiter and in later acquires."""
    g = ResponseGate()
    g.acquire("e1", 0)
    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            g.acquire("e2", 30)
        except ConnectionLost as exc:
            errors.append(exc)

    t = threading.Thread(target=waiter, name="test-waiter")
    t.start()
    dropped = g.close(ConnectionLost("gone"))
    t.join(5)
    assert not t.is_alive()
    assert len(errors) == 1 and [e.event_id for e in dropped] == ["e1"]
    with pytest.raises(ConnectionLost):
        g.acquire("e3", 0)


def test_close_default_is_session_closed():
    """Without an error, close() means 'you closed it'."""
    g = ResponseGate()
    g.close()
    with pytest.raises(SessionClosed):
        g.acquire("e", 0)


def test_evict_releases_stale():
    """A response whose done never comes can be evicted and is counted."""
    g = ResponseGate()
    g.acquire("e1", 0)
    g.on_created("r1", "e1")
    assert g.evict("r1")
    assert g.depth() == 0 and g.stats().evicted == 1


def test_latency_recorded_from_release_to_send():
    """Gate latency is measured from the release being read to the next send."""
    clock = FakeClock()
    g = ResponseGate(clock=clock)
    g.acquire("e1", 0)
    g.on_created("r1", "e1")
    clock.t = 1.0
    g.on_done("r1")
    clock.t = 1.0002
    assert g.acquire("e2", 0)
    g.note_sent("e2", waited_s=0.5)
    s = g.stats()
    assert s.latency_samples == 1
    assert s.latency_p50_ms == pytest.approx(0.2, abs=1e-6)
    assert s.wait_p50_ms == pytest.approx(500.0)


class GateMachine(RuleBasedStateMachine):
    """Any interleaving of send/created/done/error/reset keeps the gate's invariants."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = ResponseGate(max_retries=2)
        self.n = 0
        self.queued: list[str] = []  # creates the app wants, not yet sent (the writer's lane)
        self.pending: list[str] = []  # sent, no created yet (model of ours)
        self.active: dict[str, str | None] = {}  # rid -> eid (None = foreign)
        self.finished: set[str] = set()  # creates that got a response or were rejected
        self.retry_count: dict[str, int] = {}
        self.wanted: set[str] = set()

    @rule()
    def app_wants(self) -> None:
        self.n += 1
        self.queued.append(f"e{self.n}")
        self.wanted.add(f"e{self.n}")

    @precondition(lambda self: self.queued)
    @rule()
    def writer_tries(self) -> None:
        eid = self.queued[0]
        ok = self.gate.acquire(eid, 0)
        assert ok == (not self.pending and not self.active)
        if ok:
            self.queued.pop(0)
            self.pending.append(eid)
            self.gate.note_sent(eid, 0.0)

    @precondition(lambda self: self.pending)
    @rule()
    def server_created(self) -> None:
        eid = self.pending.pop(0)
        rid = "r" + eid
        assert self.gate.on_created(rid, eid) == "ours"
        self.active[rid] = eid

    @rule()
    def server_vad_created(self) -> None:
        self.n += 1
        rid = f"rv{self.n}"
        self.gate.on_created(rid, None)
        self.active[rid] = None

    @precondition(lambda self: self.active)
    @rule(data=st.data())
    def server_done(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.active)))
        eid = self.active.pop(rid)
        assert self.gate.on_done(rid)
        if eid is not None:
            self.finished.add(eid)

    @rule(rid=st.sampled_from(["r-old", "rv-unknown"]))
    def stale_done(self, rid: str) -> None:
        assert not self.gate.on_done(rid)

    @precondition(lambda self: self.pending and self.active)
    @rule()
    def server_conflict(self) -> None:
        # Our pending create raced a foreign response: the server rejects it.
        eid = self.pending.pop(0)
        verdict = self.gate.on_error(eid, CONFLICT)
        n = self.retry_count.get(eid, 0)
        if n < 2:
            assert verdict is Verdict.RETRY
            self.retry_count[eid] = n + 1
            self.queued.insert(0, eid)  # back at the head, not dropped
        else:
            assert verdict is Verdict.REJECT
            self.finished.add(eid)

    @rule()
    def reset(self) -> None:
        dropped = {e.event_id for e in self.gate.reset() if e.ours}
        ours = set(self.pending) | {e for e in self.active.values() if e}
        assert dropped == ours
        self.finished |= ours
        self.pending.clear()
        self.active.clear()
        self.retry_count.clear()  # a new socket: each create's conflict-retry budget starts over

    @invariant()
    def at_most_one_of_ours_in_flight(self) -> None:
        ours = [e for e in self.gate.entries() if e.ours]
        assert len(ours) <= 1

    @invariant()
    def model_matches_gate(self) -> None:
        assert self.gate.depth() == len(self.pending) + len(self.active)

    @invariant()
    def no_create_lost(self) -> None:
        places = [set(self.queued), set(self.pending), {e for e in self.active.values() if e}, self.finished]
        assert set().union(*places) == self.wanted
        assert sum(len(p) for p in places) == len(self.wanted)  # each create in exactly one place

    @invariant()
    def drained_means_acquirable(self) -> None:
        if self.gate.depth() == 0:
            assert self.gate.acquire("probe", 0)
            self.gate.abandon("probe")


GateMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestGateStateful = GateMachine.TestCase


def test_poke_cuts_a_wait_short_without_acquiring():
    """poke() makes a waiting acquire return False at once (the writer has audio to send)."""
    g = ResponseGate()
    g.acquire("e1", 0)
    returned = threading.Event()
    result: list[bool] = []

    def waiter() -> None:
        result.append(g.acquire("e2", 30))
        returned.set()

    t = threading.Thread(target=waiter, name="test-waiter")
    t.start()
    while not returned.is_set():
        g.poke()
        returned.wait(0.01)
    t.join(5)
    assert result == [False] and g.depth() == 1


def test_handoff_waits_until_the_waiting_writer_has_reserved():
    """handoff(): after a release, the reader goes on only once the waiting writer holds the slot."""
    gate = ResponseGate()
    assert gate.handoff(1.0) is False  # nobody waiting: returns at once
    gate.on_created("resp_1", None)
    got: list[bool] = []
    writer = threading.Thread(target=lambda: got.append(gate.acquire("evt_w", 5.0)))
    writer.start()
    tick, deadline = threading.Event(), time.monotonic() + 5.0
    while gate.waiting_writers() == 0 and time.monotonic() < deadline:
        tick.wait(0.001)  # polls a condition, with a deadline
    assert gate.waiting_writers() == 1
    assert gate.handoff(0.5) is False  # a writer waits, but the slot is taken: nothing to hand off
    assert gate.on_done("resp_1")
    assert gate.handoff(5.0) is True
    assert [e.event_id for e in gate.entries()] == ["evt_w"]  # reserved before handoff returned
    writer.join(5.0)
    assert got == [True] and gate.waiting_writers() == 0
