"""The gate's sans-I/O core on its own: no threads, no sleeps, the time passed in (DESIGN.md section 2)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rtqueue import gate, gate_state
from rtqueue.errors import ConnectionLost, SessionClosed
from rtqueue.gate_state import CONFLICT, GateEntry, GateState, GateStats, Verdict, percentile


def _active(s: GateState, event_id: str = "e1", response_id: str = "r1", now: float = 0.0) -> GateState:
    """Reserve ``event_id`` and make it active as ``response_id``."""
    assert s.try_reserve(event_id, now)
    assert s.on_created(response_id, event_id, now) == "ours"
    return s


def _snapshot(s: GateState) -> tuple[object, ...]:
    return (s.entries(), s.oob_entries(), s.counts(), s.last_release, s.latencies_ms(), s.closed)


# -- the module --------------------------------------------------------------------


def test_module_imports_no_io_or_clock():
    """gate_state imports no threading, socket, asyncio or time module."""
    tree = ast.parse(Path(gate_state.__file__).read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    assert not names & {"threading", "socket", "asyncio", "time", "selectors", "_thread"}


def test_gate_module_reexports_the_values():
    """rtqueue.gate re-exports GateEntry, GateStats, Verdict and percentile from gate_state."""
    assert (gate.GateEntry, gate.GateStats, gate.Verdict, gate.percentile) == (
        GateEntry, GateStats, Verdict, percentile,
    )


def test_max_retries_is_validated():
    """A negative or non-int max_retries is refused at construction."""
    for bad in (-1, 1.5, "3"):
        with pytest.raises(ValueError):
            GateState(max_retries=bad)  # type: ignore[arg-type]
    assert GateState(max_retries=0).max_retries == 0


# -- writer side -------------------------------------------------------------------


def test_try_reserve_iff_empty():
    """try_reserve adds a pending entry (since now) only when the queue is empty."""
    s = GateState()
    assert s.try_reserve("e1", 2.5)
    assert s.entries() == [GateEntry("pending", "e1", None, 2.5, True)]
    before = _snapshot(s)
    assert not s.try_reserve("e2", 3.0)
    assert _snapshot(s) == before


def test_foreign_response_blocks_reservation():
    """A server-VAD response (no event id) takes the slot until its done."""
    s = GateState()
    assert s.on_created("rv", None, 1.0) == "foreign"
    assert not s.try_reserve("e1", 1.0)
    assert s.on_done("rv", None, 2.0)
    assert s.try_reserve("e1", 2.0)


def test_abandon_drops_only_that_pending_reservation():
    """abandon removes the pending entry of that event id and nothing else."""
    s = GateState()
    s.try_reserve("e1", 0.0)
    assert not s.abandon("e2")
    assert s.abandon("e1")
    assert s.depth() == 0
    _active(s, "e3", "r3")
    assert not s.abandon("e3")  # active: not a reservation any more
    assert s.depth() == 1


def test_note_timed_out_and_register_oob_count():
    """note_timed_out counts; register_oob counts as sent and tracks a pending out-of-band entry."""
    s = GateState()
    s.note_timed_out()
    s.register_oob("o1", 4.0)
    c = s.counts()
    assert (c["timed_out"], c["sent"], c["oob_depth"], c["depth"]) == (1, 1, 1, 0)
    assert s.oob_entries() == [GateEntry("pending", "o1", None, 4.0, True)]


def test_latency_measured_from_release_to_send():
    """A gated create that waited across a release gets a latency sample: send time minus release time."""
    s = _active(GateState())
    assert s.on_done("r1", None, 1.0)
    assert s.last_release == 1.0
    assert s.try_reserve("e2", 1.0002)
    s.note_sent("e2", 0.5, 1.0002)
    st_ = s.stats()
    assert st_.latency_samples == 1 and st_.sent == 1
    assert st_.latency_p50_ms == pytest.approx(0.2, abs=1e-6)
    assert st_.wait_p50_ms == pytest.approx(500.0)


def test_no_latency_without_a_wait_across_a_release():
    """No latency sample when the create did not wait, waited only before the release, or was not gated."""
    s = _active(GateState())
    s.on_done("r1", None, 10.0)
    s.note_sent("e2", 0.0, 10.5)  # found the gate free
    s.note_sent("e3", 0.2, 10.5)  # started waiting after the release
    s.note_sent("e4", 5.0, 10.5, gated=False)  # an ungated create
    assert s.latencies_ms() == []
    assert s.stats().sent == 3 and s.stats().latency_samples == 0
    assert s.stats().wait_max_ms == pytest.approx(200.0)


def test_sample_reservoirs_are_capped():
    """Waits and latencies keep only the newest 1024 samples each (stores() reports the cap)."""
    s = _active(GateState())
    s.on_done("r1", None, 0.0)
    for i in range(1500):
        s.note_sent(f"e{i}", 1.0, 0.5)
    holders, cap = s.stores()["gate_samples"]
    assert isinstance(holders, tuple) and cap == 2048
    assert [len(h) for h in holders] == [1024, 1024]
    assert s.stats().latency_samples == 1024


# -- reader side -------------------------------------------------------------------


def test_created_matches_pending_by_event_id():
    """response.created carrying our event id turns pending into active at now."""
    s = GateState()
    s.try_reserve("e1", 1.0)
    assert s.on_created("r1", "e1", 2.0) == "ours"
    assert s.entries() == [GateEntry("active", "e1", "r1", 2.0, True)]
    assert s.active_response_id() == "r1" and s.counts()["created"] == 1


def test_created_classifies_oob_and_foreign():
    """Out-of-band creates and in_band=False responses never enter the in-band queue."""
    s = GateState()
    s.register_oob("o1", 0.0)
    assert s.on_created("ro", "o1", 1.0) == "oob"
    assert s.on_created("rf", None, 1.0, in_band=False) == "foreign_oob"
    assert s.on_created("rx", "unknown", 1.0) == "foreign"
    assert [e.response_id for e in s.entries()] == ["rx"]
    assert {e.response_id for e in s.oob_entries()} == {"ro", "rf"}
    c = s.counts()
    assert (c["created"], c["foreign"], c["depth"], c["oob_depth"]) == (3, 1, 1, 2)


def test_untagged_pending_names_only_an_untagged_reservation():
    """untagged_pending returns the pending create reserved with untagged=True, else None."""
    s = GateState()
    assert s.untagged_pending() is None
    s.try_reserve("e1", 0.0)
    assert s.untagged_pending() is None
    s.abandon("e1")
    s.try_reserve("e2", 0.0, untagged=True)
    assert s.untagged_pending() == "e2"
    s.on_created("r2", "e2", 0.0)
    assert s.untagged_pending() is None


def test_done_releases_by_id_not_flag():
    """A late done for an old response id does not release the current one."""
    s = _active(GateState())
    assert s.on_done("r1", "e1", 1.0)
    _active(s, "e2", "r2", 2.0)
    before = _snapshot(s)
    assert not s.on_done("r1", "e1", 3.0)
    assert _snapshot(s) == before and s.active_response_id() == "r2"


def test_done_removes_the_response_wherever_it_stands():
    """A done removes its response even from behind the head of the queue."""
    s = _active(GateState())
    s.on_created("rv", None, 1.0)
    assert s.on_done("rv", None, 2.0)
    assert [e.response_id for e in s.entries()] == ["r1"]


def test_done_with_event_id_releases_pending_without_created():
    """A done whose created was lost releases the pending create named in its metadata."""
    s = GateState()
    s.try_reserve("e1", 0.0)
    assert s.on_done("r1", "e1", 1.0)
    assert s.depth() == 0 and s.counts()["done"] == 1 and s.last_release == 1.0


def test_done_releases_out_of_band_by_response_or_event_id():
    """Out-of-band entries are released by response id, or by event id before their created."""
    s = GateState()
    s.register_oob("o1", 0.0)
    s.register_oob("o2", 0.0)
    s.on_created("ro1", "o1", 0.0)
    assert s.on_done("ro1", None, 1.0)
    assert s.on_done("ro2", "o2", 1.0)
    assert s.oob_entries() == [] and s.counts()["done"] == 2


def test_unknown_done_changes_nothing():
    """A done for a response the gate never held returns False and changes nothing."""
    s = _active(GateState())
    before = _snapshot(s)
    assert not s.on_done("nope", None, 5.0)
    assert _snapshot(s) == before


def test_conflict_retries_bounded_then_rejects():
    """A server-raced create gets RETRY max_retries times, then REJECT (and its count is forgotten)."""
    s = GateState(max_retries=2)
    for n in (1, 2):
        assert s.try_reserve("e1", 0.0)
        assert s.on_error("e1", CONFLICT) is Verdict.RETRY
        assert s.retries("e1") == n and s.depth() == 0
    assert s.try_reserve("e1", 0.0)
    assert s.on_error("e1", CONFLICT) is Verdict.REJECT
    c = s.counts()
    assert (c["retried"], c["rejected"], c["depth"]) == (2, 1, 0) and s.retries("e1") == 0


def test_other_error_rejects_and_unrelated_errors_are_ignored():
    """A non-conflict error rejects a pending create; errors naming nothing pending return None."""
    s = GateState()
    s.try_reserve("e1", 0.0)
    before = _snapshot(s)
    assert s.on_error(None, "invalid_value") is None
    assert s.on_error("e9", "invalid_value") is None
    assert _snapshot(s) == before
    assert s.on_error("e1", "invalid_value") is Verdict.REJECT
    assert s.depth() == 0 and s.counts()["rejected"] == 1


def test_error_for_an_active_create_is_not_the_gates():
    """An error naming a create that is already active leaves it in the queue."""
    s = _active(GateState())
    assert s.on_error("e1", CONFLICT) is None
    assert s.active_response_id() == "r1"


def test_error_for_an_oob_create_rejects_it():
    """An error naming a pending out-of-band create rejects and forgets it."""
    s = GateState()
    s.register_oob("o1", 0.0)
    assert s.on_error("o1", CONFLICT) is Verdict.REJECT
    assert s.oob_entries() == [] and s.counts()["rejected"] == 1


def test_evict_releases_stale_in_band_and_oob():
    """evict removes a response whose done never came, counts it, and records the release time."""
    s = _active(GateState())
    assert s.evict("r1", 7.0)
    assert s.depth() == 0 and s.counts()["evicted"] == 1 and s.last_release == 7.0
    s.on_created("rf", None, 8.0, in_band=False)
    assert s.evict("rf", 9.0)
    before = _snapshot(s)
    assert not s.evict("rf", 10.0)
    assert _snapshot(s) == before


# -- connection owner --------------------------------------------------------------


def test_reset_returns_everything_dropped_and_forgets_retries():
    """reset returns in-band then out-of-band entries, empties both, and restarts retry counts."""
    s = GateState(max_retries=1)
    s.try_reserve("e1", 0.0)
    assert s.on_error("e1", CONFLICT) is Verdict.RETRY
    s.try_reserve("e1", 1.0)
    s.register_oob("o1", 1.0)
    dropped = s.reset()
    assert dropped == [GateEntry("pending", "e1", None, 1.0, True), GateEntry("pending", "o1", None, 1.0, True)]
    assert s.depth() == 0 and s.oob_entries() == [] and s.retries("e1") == 0
    assert s.counts()["sent"] == 1  # counters survive a reset
    s.try_reserve("e1", 2.0)
    assert s.on_error("e1", CONFLICT) is Verdict.RETRY


def test_close_defaults_to_session_closed_and_refuses_reservations():
    """close() drops everything; try_reserve then raises a fresh SessionClosed and changes nothing."""
    s = _active(GateState())
    dropped = s.close()
    assert [e.response_id for e in dropped] == ["r1"] and s.closed
    before = _snapshot(s)
    with pytest.raises(SessionClosed) as first:
        s.try_reserve("e2", 1.0)
    with pytest.raises(SessionClosed) as second:
        s.try_reserve("e2", 1.0)
    assert first.value is not second.value
    assert _snapshot(s) == before


def test_close_keeps_the_first_error():
    """close is idempotent: the first error is kept (a fresh ConnectionLost per reservation)."""
    s = GateState()
    s.close(ConnectionLost("gone"))
    assert s.close(SessionClosed("later")) == []
    err = s.closed_error()
    assert isinstance(err, ConnectionLost) and err.args == ("gone",)
    with pytest.raises(ConnectionLost, match="gone"):
        s.try_reserve("e1", 0.0)


def test_close_with_a_foreign_error_raises_that_instance():
    """An error type that is not the library's own is raised as given."""
    boom = RuntimeError("boom")
    s = GateState()
    assert s.closed_error() is None
    s.close(boom)
    with pytest.raises(RuntimeError) as info:
        s.try_reserve("e1", 0.0)
    assert info.value is boom


# -- queries -----------------------------------------------------------------------


def test_stats_and_counts_agree():
    """stats() carries exactly the counters of counts() plus the percentiles."""
    s = _active(GateState())
    s.on_created("rv", None, 0.0)
    for i, waited in enumerate((0.010, 0.020, 0.030)):
        s.note_sent(f"e{i}", waited, 0.0)
    st_ = s.stats()
    d = st_.as_dict()
    assert {k: d[k] for k in s.counts()} == s.counts()
    assert (st_.depth, st_.foreign, st_.sent, st_.wait_max_ms) == (2, 1, 3, pytest.approx(30.0))
    assert st_.wait_p50_ms == pytest.approx(20.0) and st_.wait_p99_ms == pytest.approx(30.0)


def test_percentile_nearest_rank():
    """percentile is nearest-rank and 0.0 for no data."""
    assert percentile([], 50) == 0.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile(range(1, 101), 98.5) == 99
    assert percentile([5.0], 0) == 5.0 and percentile([1.0, 9.0], 100) == 9.0


def test_repr_shows_depths():
    """repr shows the in-band depth, the out-of-band depth and whether closed."""
    s = _active(GateState())
    s.register_oob("o1", 0.0)
    assert repr(s) == "<GateState depth=1 oob=1 closed=False>"


# -- property: random sequences keep the invariants --------------------------------

# Weighted so that long retry chains (reserve, conflict, reserve, ...) come up often.
_OPS = ("reserve",) * 3 + ("error",) * 3 + ("created", "done") * 2 + (
    "stale_done", "evict", "reset", "oob", "abandon", "close",
)
_MONOTONIC = ("sent", "created", "done", "retried", "rejected", "timed_out", "evicted", "foreign")
_MAX_RETRIES = 1


class _Driver:
    """Feeds a GateState server-like inputs (unique ids) and checks each result."""

    def __init__(self) -> None:
        self.s = GateState(max_retries=_MAX_RETRIES)
        self.now = 0.0
        self.n = 0
        self.lane: list[str] = []  # creates to send again (RETRY verdicts, reset or abandoned reservations)
        self.oob_pending: list[str] = []  # registered out-of-band creates without a created yet
        self.old: list[tuple[str, str | None]] = []  # (response id, its event id) of finished responses
        self.eid_of: dict[str, str | None] = {}  # response id -> event id it was created for
        self.tries: dict[str, int] = {}  # conflict retries per create since the last reset

    def fresh(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def pending_ours(self) -> list[str]:
        return [e.event_id for e in self.s.entries() if e.state == "pending" and e.event_id]

    def active_rids(self) -> list[str]:
        return [e.response_id for e in self.s.entries() + self.s.oob_entries() if e.response_id]

    def step(self, op: str, k: int) -> None:
        self.now += 0.001
        getattr(self, op)(k)

    def reserve(self, k: int) -> None:
        from_lane = bool(self.lane) and k % 5 != 4  # mostly: the writer sends its lane's head first
        eid = self.lane[0] if from_lane else self.fresh("e")
        before = _snapshot(self.s)
        if self.s.closed:
            with pytest.raises((SessionClosed, ConnectionLost)):
                self.s.try_reserve(eid, self.now)
            assert _snapshot(self.s) == before
            return
        was_empty = self.s.depth() == 0
        ok = self.s.try_reserve(eid, self.now, k % 3 == 0)
        assert ok == was_empty  # never a second entry while another exists
        if not ok:
            assert _snapshot(self.s) == before
        elif from_lane:
            self.lane.pop(0)

    def created(self, k: int) -> None:
        choices: list[tuple[str | None, bool | None]] = [(e, None) for e in self.pending_ours()]
        choices += [(o, None) for o in self.oob_pending] + [(None, None), (None, False)]
        eid, in_band = choices[k % len(choices)]
        rid = self.fresh("r")
        kind = self.s.on_created(rid, eid, self.now, in_band=in_band)
        if eid in self.oob_pending:
            self.oob_pending.remove(eid)
            assert kind == "oob"
        elif eid is not None:
            assert kind == "ours" and self.s.active_response_id() == rid
        else:
            assert kind == ("foreign_oob" if in_band is False else "foreign")
        self.eid_of[rid] = eid

    def done(self, k: int) -> None:
        choices: list[tuple[str, str | None, bool]] = [
            (r, self.eid_of[r] if k % 2 else None, True) for r in self.active_rids()
        ]
        choices += [(self.fresh("r"), e, True) for e in self.pending_ours()]  # its created was lost
        choices += [(self.fresh("r"), o, True) for o in self.oob_pending]
        choices.append((self.fresh("r"), None, False))  # a response the gate never held
        rid, eid, expected = choices[k % len(choices)]
        assert self.s.on_done(rid, eid, self.now) == expected
        assert rid not in self.active_rids()
        if eid in self.oob_pending:
            self.oob_pending.remove(eid)
        self.old.append((rid, eid if eid is not None else self.eid_of.get(rid)))

    def stale_done(self, k: int) -> None:
        if not self.old:
            return
        rid, eid = self.old[k % len(self.old)]
        before = _snapshot(self.s)
        assert not self.s.on_done(rid, eid, self.now)  # an old done never releases a newer response
        assert _snapshot(self.s) == before

    def error(self, k: int) -> None:
        pending = self.pending_ours()
        answered = [e.event_id for e in self.s.entries() if e.state == "active" and e.ours]
        others: list[str | None] = [*self.oob_pending, *answered, self.fresh("e"), None]
        # Mostly a conflict for our pending create, so that the retry bound gets reached.
        eid = pending[0] if pending and k < 35 else others[k % len(others)]
        code = CONFLICT if k < 25 else "invalid_value"
        before = _snapshot(self.s)
        verdict = self.s.on_error(eid, code)
        if eid in pending:
            tries = self.tries.get(eid, 0)
            expected = Verdict.RETRY if code == CONFLICT and tries < _MAX_RETRIES else Verdict.REJECT
            assert verdict is expected and eid not in self.pending_ours()
            if verdict is Verdict.RETRY:
                self.tries[eid] = tries + 1
                self.lane.insert(0, eid)
            else:
                self.tries.pop(eid, None)
            assert self.s.retries(eid) == self.tries.get(eid, 0)
        elif eid in self.oob_pending:
            assert verdict is Verdict.REJECT
            self.oob_pending.remove(eid)
        else:
            assert verdict is None and _snapshot(self.s) == before  # not a create the gate holds pending

    def evict(self, k: int) -> None:
        choices = [*self.active_rids(), self.fresh("r")]
        rid = choices[k % len(choices)]
        known = rid in self.active_rids()
        before = _snapshot(self.s)
        assert self.s.evict(rid, self.now) == known
        if known:
            self.old.append((rid, self.eid_of.get(rid)))
        else:
            assert _snapshot(self.s) == before

    def reset(self, k: int) -> None:
        expected = self.s.entries() + self.s.oob_entries()
        assert self.s.reset() == expected
        self._dropped(expected)

    def close(self, k: int) -> None:
        if k < 45:  # rarely: after a close every reservation raises
            return
        expected = self.s.entries() + self.s.oob_entries()
        assert self.s.close(ConnectionLost("gone") if k % 2 else None) == expected
        self._dropped(expected)

    def _dropped(self, dropped: list[GateEntry]) -> None:
        for e in dropped:
            if e.response_id is not None:
                self.old.append((e.response_id, e.event_id))
            elif e.ours and e.event_id is not None and e.event_id not in self.oob_pending:
                self.lane.append(e.event_id)  # an unstarted create is sent again
        self.oob_pending.clear()
        self.tries.clear()  # a reset forgets retry counts
        assert self.s.depth() == 0 and self.s.oob_entries() == []

    def oob(self, k: int) -> None:
        eid = self.fresh("o")
        self.s.register_oob(eid, self.now)
        self.oob_pending.append(eid)

    def abandon(self, k: int) -> None:
        choices = [*self.pending_ours(), self.fresh("e")]
        eid = choices[k % len(choices)]
        expected = eid in self.pending_ours()
        assert self.s.abandon(eid) == expected
        if expected:
            self.lane.insert(0, eid)

    def check(self, counts_before: dict[str, int]) -> None:
        s = self.s
        entries, counts = s.entries(), s.counts()
        assert s.depth() == len(entries) == counts["depth"]
        assert counts["oob_depth"] == len(s.oob_entries())
        assert sorted(e.event_id or "" for e in s.oob_entries() if e.state == "pending") == sorted(self.oob_pending)
        assert all(v >= 0 for v in counts.values())
        assert all(counts[c] >= counts_before[c] for c in _MONOTONIC)
        assert sum(e.ours for e in entries) <= 1
        assert sum(e.state == "pending" for e in entries) <= 1
        assert all(e.since <= self.now for e in entries + s.oob_entries())
        assert all(s.retries(e) == self.tries.get(e, 0) <= _MAX_RETRIES for e in self.lane)
        assert s.active_response_id() == next((e.response_id for e in entries if e.state == "active"), None)


_op = st.tuples(st.sampled_from(_OPS), st.integers(min_value=0, max_value=50))


@settings(max_examples=400, deadline=None)
@given(st.lists(_op, min_size=10, max_size=100))
def test_random_sequences_keep_the_invariants(ops: list[tuple[str, int]]):
    """Any sequence of reserve/created/done/error/evict/reset/close keeps the gate's invariants."""
    d = _Driver()
    for op, k in ops:
        before = d.s.counts()
        d.step(op, k)
        d.check(before)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=1e6), max_size=50), st.floats(min_value=0, max_value=100))
def test_percentile_is_a_member_within_bounds(values: list[float], q: float):
    """percentile returns one of the values, between their min and max."""
    p = percentile(values, q)
    if values:
        assert p in values and min(values) <= p <= max(values)
    else:
        assert p == 0.0
