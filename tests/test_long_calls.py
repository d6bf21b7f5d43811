"""Calls longer than the 60-minute cap (issue 15): planned session recycling, on a simulator whose sessions last 5 s."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import pytest

import rtqueue
from rtqueue import Agent, ReconnectPolicy, Session, Simulator, tool
from rtqueue.core import ConversationCore
from rtqueue.errors import ConnectionLost, InvalidArgument, SessionClosed
from rtqueue.handles import ResponseHandle
from rtqueue.history import History
from rtqueue.recycle import (
    SUMMARY_INSTRUCTIONS,
    SUMMARY_PREFIX,
    SUMMARY_PURPOSE,
    Activity,
    RecycleWindow,
    SessionClock,
    apply_summary,
    make_summary,
    session_clock,
    split_for_summary,
    summary_input,
    summary_request,
)
from rtqueue.sim.model import ScriptedModel, Turn
from rtqueue.transport import Transport, WebSocketTransport
from tests.utils import UNIT, silence_pcm, speech_pcm

SESSION_S = 5.0  # the simulator's session cap in these tests (the real one: 3600 s)


def policy(**kw: Any) -> ReconnectPolicy:
    """Recycle from 1 s after session.created, at the latest 1.5 s before the cap; no summaries unless asked."""
    fields: dict[str, Any] = {"initial_backoff": 0.01, "max_backoff": 0.05, "connect_timeout": UNIT,
                              "recycle_after": 1.0, "recycle_margin": 1.5, "summarize_over_chars": None,
                              "summarize_over_items": None}
    fields.update(kw)
    return ReconnectPolicy(**fields)


def short_sim(**kw: Any) -> Simulator:
    """A fast simulator whose sessions end like the real service's (session_expired, then close) after SESSION_S."""
    return Simulator(speed=20.0, seed=kw.pop("seed", 3), session_max_duration_s=SESSION_S, **kw)


def said(text: str) -> dict[str, Any]:
    """Response params whose context is one user message (the simulator's ``[say:]``/``[len:]`` hooks)."""
    return {"input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}]}


def _next(stream: rtqueue.dispatch.EventStream, type_: str) -> rtqueue.Event:
    """The next event of ``type_`` on ``stream`` (fails the test after one UNIT)."""
    while True:
        ev = stream.get(UNIT)
        assert ev is not None, f"no {type_} within {UNIT}s"
        if ev.type == type_:
            return ev


def _await_recycle_if_due(session: Session, recycled: rtqueue.dispatch.EventStream) -> rtqueue.Event | None:
    """The app pauses between turns while a recycle is due (a user thinking): the next session.recycled."""
    if not session.stats()["recycle_due"]:
        return None
    return _next(recycled, "session.recycled")


def _seeds(events: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """The ``count`` items a session was seeded with: the conversation.item.creates right after its config."""
    assert events[0]["type"] == "session.update"
    seeds = [e["item"] for e in events[1:count + 1] if e["type"] == "conversation.item.create"]
    assert len(seeds) == count
    return seeds


def _text(item: dict[str, Any]) -> str:
    return " ".join(str(c.get("text") or "") for c in item.get("content") or []) + str(item.get("output") or "")


# -- the decisions, without sockets ------------------------------------------------------------


def test_window_waits_recycles_when_quiet_and_forces_at_the_deadline():
    """The window: wait before it, recycle in it only when quiet, force from the deadline on."""
    clock = SessionClock(1, "sess_1", created=100.0, expires_in=None)
    w = RecycleWindow.plan(clock, after=3300.0, margin=30.0, cap=3600.0)
    assert (w.start, w.deadline, w.cap) == (3400.0, 3670.0, 3700.0)
    assert w.decide(3399.0, busy=False) == "wait"
    assert w.decide(3400.0, busy=True) == "wait"
    assert w.decide(3400.0, busy=False) == "recycle"
    assert w.decide(3670.0, busy=True) == "force"


def test_window_follows_the_servers_expires_at():
    """expires_at from session.created wins over the assumed cap; a start past the deadline moves to it."""
    event = {"type": "session.created", "session": {"id": "sess_9", "expires_at": 1_000_050}}
    clock = session_clock(event, generation=2, now=10.0, wall=1_000_000.0)
    assert clock == SessionClock(2, "sess_9", 10.0, 50.0)
    w = RecycleWindow.plan(clock, after=3300.0, margin=30.0, cap=3600.0)
    assert (w.start, w.deadline, w.cap) == (30.0, 30.0, 60.0)
    assert session_clock({"session": {}}, generation=1, now=0.0, wall=0.0).expires_in is None
    past = {"session": {"expires_at": 1_700_000_000}}  # a fake or far-off clock: no cap from it
    assert session_clock(past, generation=1, now=0.0, wall=1_800_000_000.0).expires_in is None


def test_activity_names_what_keeps_a_session_busy():
    """Quiet means nothing in flight or queued and nobody speaking; each reason is named."""
    assert Activity().quiet and Activity().reasons() == ()
    busy = Activity(requests=1, gate=1, queued=2, updates=1, tools=1, responses=1, speaking=True)
    assert busy.reasons() == ("requests", "responses", "gate", "queued", "updates", "tools", "speaking")
    assert Activity().plus(gate=1, queued=0, tools=0).reasons() == ("gate",)


def test_core_tracks_speech_and_what_is_in_flight():
    """The core's activity: a create in flight, then speech between speech_started and speech_stopped."""
    core = ConversationCore(handle_factory=lambda e, b: object())
    assert core.activity().quiet
    core.create_response({}, object(), now=0.0)
    assert core.activity().requests == 1
    core = ConversationCore(handle_factory=lambda e, b: object())
    core.receive({"type": "input_audio_buffer.speech_started"})
    assert core.activity().reasons() == ("speaking",)
    core.receive({"type": "input_audio_buffer.speech_stopped"})
    assert core.activity().quiet
    core.receive({"type": "input_audio_buffer.speech_started"})
    core.connection_lost([])
    assert core.activity().quiet  # the new session's VAD has heard nothing


def _user(i: int, text: str) -> dict[str, Any]:
    return {"id": f"u{i}", "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


def _assistant(i: int, text: str) -> dict[str, Any]:
    return {"id": f"a{i}", "type": "message", "role": "assistant", "content": [{"type": "output_text", "text": text}]}


def _history() -> list[dict[str, Any]]:
    return [
        _user(1, "My name is Ada."), _assistant(1, "Hello Ada."),
        _user(2, "Where is order 42?"),
        {"id": "f2", "type": "function_call", "call_id": "c2", "name": "lookup_order", "arguments": '{"id":"42"}'},
        {"id": "o2", "type": "function_call_output", "call_id": "c2", "output": '{"status":"shipped"}'},
        _assistant(2, "It shipped."),
        _user(3, "Thanks."), _assistant(3, "You are welcome."),
    ]


def test_split_keeps_whole_turns_and_only_when_long():
    """A long history splits before the last keep_turns user turns; a short one is not summarised."""
    items = _history()
    assert split_for_summary(items, keep_turns=1, max_chars=10_000, max_items=None) is None
    older, kept = split_for_summary(items, keep_turns=1, max_chars=20, max_items=None) or ([], [])
    assert [i["id"] for i in kept] == ["u3", "a3"] and len(older) == 6
    older, kept = split_for_summary(items, keep_turns=2, max_chars=None, max_items=5) or ([], [])
    assert kept[0]["id"] == "u2" and [i["id"] for i in older] == ["u1", "a1"]
    assert split_for_summary(items, keep_turns=3, max_chars=1, max_items=None) is None  # nothing older


def test_summary_request_is_out_of_band_text_with_the_history_as_text_items():
    """The summary create: conversation none, text only, no tools, tagged; tool calls become system text."""
    params = summary_request(_history()[:6])
    assert params["conversation"] == "none" and params["output_modalities"] == ["text"]
    assert params["tool_choice"] == "none" and params["metadata"] == {"rtqueue_purpose": SUMMARY_PURPOSE}
    roles = [i["role"] for i in params["input"]]
    assert roles == ["user", "assistant", "user", "system", "assistant"]
    assert params["input"][3]["content"][0]["text"] == (
        'Tool call lookup_order({"id":"42"}) returned: {"status":"shipped"}')
    assert all("id" not in i for i in params["input"])
    big = [_user(i, "x" * 1000) for i in range(10)]
    assert len(summary_input(big, max_chars=3500)) == 3  # the newest that fit


def test_apply_summary_replaces_what_it_covers_in_the_seed_and_the_history():
    """The summary goes first in place of its items (calls' outputs too); newer items stay; so in the history."""
    items = _history()
    older, _kept = split_for_summary(items, keep_turns=1, max_chars=1, max_items=None) or ([], [])
    summary = make_summary("  Ada; order 42 shipped. ", older)
    assert summary.text == "Ada; order 42 shipped." and summary.calls == {"c2"}
    late = [{"type": "function_call_output", "call_id": "c2", "output": "again"}, _user(4, "new")]
    seeds = apply_summary([*items, *late], summary)
    assert seeds[0]["role"] == "system" and seeds[0]["content"][0]["text"] == SUMMARY_PREFIX + summary.text
    assert [s.get("id") for s in seeds[1:]] == ["u3", "a3", "u4"]
    history = History()
    for item in items:
        history.put(item)
    history.replace(summary.covered, summary.item)
    assert [i["id"] for i in history.items()] == [summary.item["id"], "u3", "a3"]


def test_simulator_model_summarizes_when_asked():
    """The scripted model's summary: user and system texts and tool values, in order, hooks removed, no calls."""
    turns = [Turn("user", text="[say: no] I am Ada."), Turn("assistant", text="Hi Ada."),
             Turn("function_call_output", call_id="c1", output='{"status": "shipped"}'), Turn("system", text="Note 7")]
    reply = ScriptedModel().reply(instructions=SUMMARY_INSTRUCTIONS, tools=[{"type": "function", "name": "note"}],
                                  tool_choice="required", turns=turns)
    assert reply.text == "Summary: I am Ada.; status shipped; Note 7" and reply.calls == ()


def test_policy_checks_its_recycle_fields():
    """recycle_after None turns recycling off; bad values raise InvalidArgument."""
    assert ReconnectPolicy(recycle_after=None).recycle_after is None
    assert ReconnectPolicy().recycle_after == 3300.0 and ReconnectPolicy().recycle_margin == 30.0
    for bad in ({"recycle_after": 0}, {"recycle_margin": -1}, {"keep_turns": -1}, {"summarize_over_chars": 1.5},
                {"session_cap": 0}, {"summary_timeout": 0}):
        with pytest.raises(InvalidArgument):
            ReconnectPolicy(**bad)


# -- on the simulator --------------------------------------------------------------------------


def test_tools_and_handoffs_continue_across_several_recycles():
    """Asks with tools and handoffs across >= 3 quiet recycles: 0 conflicts, 0 lost, outputs once, in context."""
    runs: Counter[str] = Counter()

    @tool
    def lookup_order(order_id: str) -> dict:
        """Look up an order by its id."""
        runs[f"lookup {order_id}"] += 1
        return {"order_id": order_id, "status": "shipped"}

    @tool
    def refund_order(order_id: str) -> dict:
        """Refund an order by its id."""
        runs[f"refund {order_id}"] += 1
        return {"order_id": order_id, "refund": "approved"}

    billing = Agent(name="billing", instructions="You are billing. Handle refunds.", tools=[refund_order],
                    handoffs=["desk"])
    desk = Agent(name="desk", instructions="You are the desk. Answer orders.", tools=[lookup_order],
                 handoffs=[billing])
    script = ["Where is order {n}?", "Please transfer me to billing.", "Please refund order {n}.",
              "Please transfer me to desk."]
    with short_sim() as sim, Session.connect(url=sim.url, agent=desk, agents=[billing], reconnect=policy()) as s:
        recycled = s.events("session.recycled")
        answers: list[tuple[str, rtqueue.Response]] = []
        seen: list[rtqueue.Event] = []
        context: list[tuple[int, int, str, str, str]] = []
        n = 100
        while len(seen) < 3 and n < 160:
            ask = script[n % len(script)].format(n=n)
            answers.append((ask, s.ask(ask, timeout=UNIT)))
            n += 1
            ev = _await_recycle_if_due(s, recycled)
            if ev is not None:
                seen.append(ev)
                assert s.agent is not None
                context.append((len(seen), ev.reseeded, answers[-1][1].text, answers[0][0], s.agent.instructions))
        assert s.agent is not None
        billing_now = s.agent.name == "billing"
        final = s.ask(f"Please refund order {n}." if billing_now else f"Where is order {n}?", timeout=UNIT)
        assert f"order_id {n}" in final.text and ("approved" if billing_now else "shipped") in final.text
        stats = s.stats()
    for index, reseeded, last_answer, first_ask, instructions in context:
        # In context: each new session was configured for the current agent and seeded with the
        # whole conversation so far, from the first question to the answer given just before the switch.
        wire = sim.client_events(index)
        assert wire[0]["session"]["instructions"] == instructions
        texts = [_text(i) for i in _seeds(wire, reseeded)]
        assert texts[0] == first_ask and texts[-1] == last_answer
    assert len(seen) >= 3 and all(not e.forced and e.not_carried == 0 for e in seen)
    assert stats["recycles"] == len(seen) and stats["recycles_forced"] == 0 and stats["reconnects"] == 0
    for ask, answer in answers:  # every ask answered, by the right agent, from its tool when it used one
        assert answer.status == "completed"
        if ask.startswith("Where"):
            assert answer.agent == "desk" and "shipped" in answer.text and ask.split()[3][:-1] in answer.text
        elif ask.startswith("Please refund"):
            assert answer.agent == "billing" and "approved" in answer.text
    assert set(runs.values()) == {1}  # each tool call ran once
    st = sim.stats()
    assert st["conflicts"] == 0 and st["errors"] == {}  # no session_expired: every switch beat the cap
    assert st["sessions"] == len(seen) + 1
    creates = [e["event_id"] for i in range(st["sessions"]) for e in sim.client_events(i)
               if e["type"] == "response.create"]
    assert len(creates) == len(set(creates))  # nothing sent twice
    for i in range(st["sessions"]):
        outputs = Counter(e["item"]["call_id"] for e in sim.client_events(i)
                          if e["type"] == "conversation.item.create" and e["item"]["type"] == "function_call_output")
        assert set(outputs.values()) <= {1}  # each output once per conversation


def test_long_history_is_summarized_on_the_old_socket_before_the_switch():
    """A long history: an out-of-band summary on the old socket, then summary + last turns seed the new one."""

    @tool
    def lookup_order(order_id: str) -> dict:
        """Look up an order by its id."""
        return {"order_id": order_id, "status": "shipped"}

    agent = Agent(name="desk", instructions="You are the desk.", tools=[lookup_order])
    with short_sim(seed=5) as sim, Session.connect(
        url=sim.url, agent=agent, reconnect=policy(summarize_over_chars=300, keep_turns=2)
    ) as s:
        order = s.events("response.done", "session.recycled")
        recycled = s.events("session.recycled")
        s.ask("My name is Ada Lovelace and I live in Turin.", timeout=UNIT)
        s.ask("Where is order 4242?", timeout=UNIT)
        s.ask("I would like a blue scarf.", timeout=UNIT)
        s.ask("My phone number is 555 0199.", timeout=UNIT)
        before = len(s.items)
        ev = _next(recycled, "session.recycled")
        assert ev.summarized and not ev.forced
        # The app saw the summary's response.done before session.recycled.
        kinds = []
        while True:
            e = order.get(UNIT)
            assert e is not None
            meta = e.data.get("response", {}).get("metadata") or {} if e.type == "response.done" else {}
            kinds.append("summary" if meta.get("rtqueue_purpose") == SUMMARY_PURPOSE else e.type)
            if e.type == "session.recycled":
                break
        assert kinds.index("summary") < kinds.index("session.recycled")
        after = s.ask("What is my name?", timeout=UNIT)
        assert after.status == "completed"
        items = s.items
    old, new = sim.client_events(0), sim.client_events(1)
    summaries = [e for e in old if e["type"] == "response.create"
                 and e["response"].get("metadata", {}).get("rtqueue_purpose") == SUMMARY_PURPOSE]
    assert len(summaries) == 1 and summaries[0]["response"]["conversation"] == "none"
    dones = [e for e in sim.server_events(0) if e["type"] == "response.done"
             and (e["response"].get("metadata") or {}).get("rtqueue_purpose") == SUMMARY_PURPOSE]
    assert len(dones) == 1 and dones[0]["response"]["status"] == "completed"  # made on the old socket
    assert not any(e.get("event_id") == summaries[0]["event_id"] for e in new)
    seeds = _seeds(new, ev.reseeded)
    head = _text(seeds[0])
    assert seeds[0]["role"] == "system" and head.startswith(SUMMARY_PREFIX)
    for fact in ("Ada Lovelace", "Turin", "4242", "shipped"):  # the earlier facts, in the new context
        assert fact in head
    users = [_text(i) for i in seeds if i.get("role") == "user"]
    assert users == ["I would like a blue scarf.", "My phone number is 555 0199."]  # the last 2 turns verbatim
    assert len(seeds) < before
    assert items[0]["role"] == "system" and _text(items[0]).startswith(SUMMARY_PREFIX)  # the history, compacted
    assert sim.stats()["conflicts"] == 0 and sim.stats()["errors"] == {}


def test_hard_deadline_recycles_a_session_that_never_goes_quiet():
    """A response streaming past the hard deadline: recycled anyway like a drop; the app goes on."""
    with short_sim() as sim, Session.connect(url=sim.url, reconnect=policy(recycle_after=0.2)) as s:
        recycled = s.events("session.recycled")
        endless = s.create_response(**said("[len: 1000]"))  # about 12 s of speech at speed 20
        ev = _next(recycled, "session.recycled")
        assert ev.forced and ev.old_session_id != ev.new_session_id
        with pytest.raises(ConnectionLost):
            endless.wait(UNIT)
        assert s.ask("Are you still there?", timeout=UNIT).status == "completed"
        stats = s.stats()
    assert stats["recycles_forced"] == 1 and stats["responses_failed_by_reconnect"] == 1
    st = sim.stats()
    assert st["conflicts"] == 0 and "session_expired" not in st["errors"]


def _factory(url: str, hold: threading.Event | None = None,
             opened: threading.Event | None = None) -> Any:
    """Connections to ``url``; from the second on, wait for ``hold`` first, then set ``opened``."""
    count = [0]

    def connect() -> Transport:
        count[0] += 1
        if count[0] > 1 and hold is not None:
            assert hold.wait(UNIT)
        transport = WebSocketTransport.connect(url, [], timeout=UNIT)
        if count[0] > 1 and opened is not None:
            opened.set()
            return HeldTransport(transport)
        return transport

    return connect


class HeldTransport:
    """A transport whose incoming frames are held back until it is closed or aborted."""

    def __init__(self, inner: WebSocketTransport) -> None:
        self.inner = inner
        self.released = threading.Event()

    @property
    def close_code(self) -> int | None:
        """The inner socket's close code."""
        return self.inner.close_code

    @property
    def close_reason(self) -> str:
        """The inner socket's close reason."""
        return self.inner.close_reason

    def send(self, text: str) -> None:
        """Send on the inner socket."""
        self.inner.send(text)

    def recv(self) -> str | bytes | None:
        """The inner socket's next frame, once released."""
        self.released.wait()
        return self.inner.recv()

    def send_close(self, code: int = 1000) -> None:
        """Release, then close the inner socket."""
        self.released.set()
        self.inner.send_close(code)

    def abort(self) -> None:
        """Release, then abort the inner socket."""
        self.released.set()
        self.inner.abort()

    def shutdown(self) -> None:
        """Release, then shut the inner socket."""
        self.released.set()
        self.inner.shutdown()


def test_app_calls_during_the_switch_queue_and_go_out_on_the_new_socket():
    """create_response, send_text and mic audio made while switching: sent once, on the new socket, answered."""
    hold = threading.Event()
    made: list[Any] = []
    with short_sim() as sim:
        with Session.connect(transport=_factory(sim.url, hold), reconnect=policy()) as s:
            recycled = s.events("session.recycled")

            def during(_ev: rtqueue.Event) -> None:  # the dispatcher thread, while the writer is held
                made.append(s.create_response(**said("[say: answered after the switch]")))
                made.append(s.send_text("A note written during the switch."))
                made.append(s.append_audio(silence_pcm(100)))
                hold.set()  # only now may the new socket open

            s.on("session.recycling", during)
            s.ask("Hello there.", timeout=UNIT)
            ev = _next(recycled, "session.recycled")
            assert not ev.forced
            create, note, appended = made
            assert appended is True
            assert create.wait(UNIT).text == "answered after the switch"
            note.wait_sent(UNIT)
            stats = s.stats()
        old, new = sim.client_events(0), sim.client_events(1)
    assert stats["recycle_audio_kept"] >= 1 and stats["audio_dropped"] == 0
    ids = {create.event_id, note.event_id}
    assert not ids & {e.get("event_id") for e in old}
    assert sorted(e["event_id"] for e in new if e.get("event_id") in ids) == sorted(ids)  # each once, there
    assert sum(e["type"] == "input_audio_buffer.append" for e in new) >= 1
    assert sim.stats()["conflicts"] == 0 and sim.stats()["errors"] == {}


def test_close_during_a_recycle_ends_every_thread():
    """close() while the new socket awaits session.created: it returns, queued work fails, no thread is left."""
    opened = threading.Event()
    with short_sim() as sim:
        s = Session.connect(transport=_factory(sim.url, opened=opened), reconnect=policy())
        queued: list[ResponseHandle] = []
        s.on("session.recycling", lambda _ev: queued.append(s.create_response()))
        s.ask("Hello there.", timeout=UNIT)
        assert opened.wait(UNIT)  # the switch is under way: the new socket's frames are held back
        s.close(timeout=UNIT)
        assert not s.threads()
        assert len(queued) == 1
        with pytest.raises(SessionClosed):
            queued[0].wait(UNIT)
        assert s.stats()["recycles"] == 0


def test_a_user_who_never_stops_speaking_is_recycled_at_the_deadline():
    """Server VAD hears speech start and no stop: never quiet, so the switch waits for the hard deadline."""
    with short_sim() as sim, Session.connect(url=sim.url, turn_detection="server_vad",
                                             reconnect=policy(recycle_after=0.2)) as s:
        recycled = s.events("session.recycled")
        vad = s.events("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped")
        ev = None
        while ev is None:  # the user talks on, 100 ms of speech every 20 ms
            s.append_audio(speech_pcm(100))
            ev = recycled.get(0.02)
        assert ev.type == "session.recycled" and ev.forced
        heard = [e.type for e in iter(lambda: vad.get(0), None)]
        assert heard[:1] == ["input_audio_buffer.speech_started"]
        assert "input_audio_buffer.speech_stopped" not in heard
        assert s.stats()["recycles_forced"] == 1 and s.stats()["recycles_deferred"] == 0
    assert sim.stats()["conflicts"] == 0 and "session_expired" not in sim.stats()["errors"]
