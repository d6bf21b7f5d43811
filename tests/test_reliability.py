"""Reliability (issue 6): reconnect, deadlines, stale responses, backpressure."""

from __future__ import annotations

import base64
import inspect
import random
import threading
from typing import Any

import pytest

import rtqueue
from rtqueue import Agent, FaultPlan, ReconnectPolicy, Session, Simulator, tool
from rtqueue.audio import AudioIO, NullSpeaker
from rtqueue.dispatch import DEFAULT_STREAM_SIZE
from rtqueue.errors import (
    AuthenticationError,
    ConnectionLost,
    InvalidArgument,
    ResponseError,
    ResponseTimeout,
    SessionClosed,
)
from rtqueue.reconnect import reseed_plan
from rtqueue.transport import WebSocketTransport
from tests.utils import UNIT, silence_pcm, speech_pcm

FAST = ReconnectPolicy(initial_backoff=0.01, max_backoff=0.05, connect_timeout=UNIT)


def _index(sim: Simulator) -> int:
    """The simulator index of the newest connection (tests here use one client)."""
    return int(sim.stats()["sessions"]) - 1


def _next(stream: rtqueue.dispatch.EventStream, type_: str) -> rtqueue.Event:
    """The next event of ``type_`` on ``stream`` (fails the test after one UNIT)."""
    while True:
        ev = stream.get(UNIT)
        assert ev is not None, f"no {type_} within {UNIT}s"
        if ev.type == type_:
            return ev


def said(text: str) -> dict[str, Any]:
    """Response params whose context is one user message (the simulator's ``[say:]``/``[len:]`` hooks)."""
    return {"input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}]}


@tool
def lookup_order(order_id: str) -> dict:
    """Look up an order by its id."""
    return {"order_id": order_id, "status": "shipped"}


# -- reconnect ------------------------------------------------------------------------------


def test_drop_reconnects_with_config_and_conversation(sim: Simulator):
    """A dropped socket: reconnecting/reconnected, session.update first, words re-seeded, ask() works."""
    agent = Agent(name="desk", instructions="You are the desk. Answer orders.", tools=[lookup_order])
    with Session.connect(url=sim.url, agent=agent, reconnect=FAST) as session:
        events = session.events("session.reconnecting", "session.reconnected")
        first = session.ask("Hello, my name is Ada", timeout=UNIT)
        assert first.text
        sim.inject(FaultPlan(drop_after_events=0), session=0)
        reconnecting = _next(events, "session.reconnecting")
        assert reconnecting.attempt == 1 and reconnecting.responses_failed == 0
        reconnected = _next(events, "session.reconnected")
        assert reconnected.reseeded == 2 and reconnected.not_carried == 0
        after = session.ask("What about order 42?", timeout=UNIT)
        assert after.status == "completed" and "shipped" in after.text
        wire = sim.client_events(1)  # complete now: the server answered what came after
        assert wire[0]["type"] == "session.update"
        cfg = wire[0]["session"]
        assert cfg["instructions"] == agent.instructions
        assert [t["name"] for t in cfg["tools"]] == ["lookup_order"]
        seeded = [e["item"] for e in wire[1:3]]
        assert [e["type"] for e in wire[1:3]] == ["conversation.item.create"] * 2
        assert seeded[0]["role"] == "user" and seeded[0]["content"][0]["text"] == "Hello, my name is Ada"
        assert seeded[1]["role"] == "assistant" and seeded[1]["content"][0]["text"] == first.text
        assert wire[3]["type"] == "conversation.item.create" and wire[3]["item"]["content"][0]["text"] == (
            "What about order 42?"
        )
        stats = session.stats()
        assert stats["reconnects"] == 1 and stats["reconnect_failures"] == 0
    assert sim.stats()["conflicts"] == 0


def test_reconnect_after_handoff_configures_the_current_agent(sim: Simulator):
    """After a handoff, a reconnect re-sends the *current* agent's instructions and tools, keeping the voice."""
    billing = Agent(name="billing", instructions="You are billing. Handle refunds.", tools=[lookup_order])
    desk = Agent(name="desk", instructions="You are the desk.", handoffs=[billing])
    with Session.connect(url=sim.url, agent=desk, voice="marin", reconnect=FAST) as session:
        events = session.events("session.reconnected")
        assert session.ask("Please transfer me to billing.", timeout=UNIT).agent == "billing"
        sim.inject(FaultPlan(drop_after_events=0), session=0)
        assert events.get(UNIT) is not None
        cfg = sim.client_events(1)[0]["session"]
        assert cfg["instructions"] == billing.instructions
        assert [t["name"] for t in cfg["tools"]] == ["lookup_order"]
        assert cfg["audio"]["output"]["voice"] == "marin"
        answer = session.ask("Check order 42 please.", timeout=UNIT)
        assert answer.agent == "billing" and "shipped" in answer.text
    assert sim.stats()["errors"] == {}


def test_session_expired_reconnects(sim: Simulator):
    """session_expired: the session reconnects (reason session_expired) and the user continues."""
    with Session.connect(url=sim.url, instructions="Be brief.", reconnect=FAST) as session:
        events = session.events("session.reconnecting", "session.reconnected")
        session.ask("Remember the word banana", timeout=UNIT)
        sim.inject(FaultPlan(expire_after_s=0), session=0)
        assert _next(events, "session.reconnecting").reason == "session_expired"
        assert _next(events, "session.reconnected").reseeded == 2
        assert session.ask("Which word?", timeout=UNIT).status == "completed"
        assert sim.client_events(1)[0]["session"]["instructions"] == "Be brief."
    stats = sim.stats()
    assert stats["errors"].get("session_expired") == 1 and stats["sessions"] == 2


def test_streaming_response_fails_and_queued_create_goes_through():
    """Drop mid-response: the streaming handle fails with ConnectionLost; the queued create completes after."""
    with Simulator(speed=20.0, seed=4) as sim, Session.connect(url=sim.url, reconnect=FAST) as session:
        sim.inject(FaultPlan(drop_mid_response=True), session=0)
        streaming = session.create_response(**said("[len: 40]"))
        queued = session.create_response(**said("[say: second]"))
        with pytest.raises(ConnectionLost):
            streaming.wait(UNIT)
        assert queued.wait(UNIT).text == "second"
        assert session.stats()["responses_failed_by_reconnect"] == 1
        assert session.ask("still there?", timeout=UNIT).status == "completed"
    assert sim.stats()["conflicts"] == 0


def test_pending_create_is_reissued_on_the_new_socket():
    """A create sent but not yet started when the socket drops is sent again and completes."""
    with Simulator(speed=None, latency_ms=150, seed=5) as sim, Session.connect(url=sim.url, reconnect=FAST) as s:
        handle = s.create_response(**said("[say: reissued]"))
        handle.wait_sent(UNIT)
        sim.inject(FaultPlan(drop_after_events=0), session=0)  # the server has not even read it yet
        assert handle.wait(UNIT).text == "reissued"
        assert s.stats()["creates_reissued"] == 1
    creates = [e for e in sim.client_events(1) if e["type"] == "response.create"]
    assert [c["event_id"] for c in creates] == [handle.event_id]


def test_cancel_waiting_on_a_cut_response_raises_connection_lost():
    """cancel() of a streaming response that a drop cuts off raises ConnectionLost, never hangs."""
    with Simulator(speed=5.0, seed=6) as sim, Session.connect(url=sim.url, reconnect=FAST) as session:
        deltas = session.events("response.output_audio.delta")
        handle = session.create_response(**said("[len: 80]"))
        assert deltas.get(UNIT) is not None
        blocked = threading.Event()
        outcome: list[BaseException | object] = []

        sim.inject(FaultPlan(stall_reading_s=UNIT), session=0)  # the server will not read our cancel

        def cancel() -> None:
            blocked.set()
            try:
                outcome.append(handle.cancel(UNIT))
            except rtqueue.RtqueueError as exc:
                outcome.append(exc)

        t = threading.Thread(target=cancel, name="test-cancel")
        t.start()
        assert blocked.wait(UNIT)
        sim.inject(FaultPlan(drop_after_events=0), session=0)
        t.join(2 * UNIT)
        assert not t.is_alive()
        assert len(outcome) == 1 and isinstance(outcome[0], ConnectionLost)
        with pytest.raises(ConnectionLost):
            handle.wait(UNIT)


def test_tool_call_in_flight_survives_a_drop(sim: Simulator):
    """A tool running when the socket drops: its call is re-seeded, its output sent after, ask() answers."""
    started, release = threading.Event(), threading.Event()

    @tool
    def slow_lookup(order_id: str) -> dict:
        """Look up an order slowly."""
        started.set()
        release.wait(UNIT)
        return {"order_id": order_id, "status": "delivered"}

    agent = Agent(name="desk", instructions="You are the desk.", tools=[slow_lookup])
    with Session.connect(url=sim.url, agent=agent, reconnect=FAST) as session:
        events = session.events("session.reconnected")
        session.send_text("Where is order 7? Please lookup it.")
        handle = session.create_response()
        assert started.wait(UNIT)
        sim.inject(FaultPlan(drop_after_events=0), session=0)
        assert events.get(UNIT) is not None
        release.set()
        final = handle.final(UNIT)
        assert final.status == "completed" and "delivered" in final.text
    wire = sim.client_events(1)
    kinds = [(e["type"], e.get("item", {}).get("type")) for e in wire]
    call = kinds.index(("conversation.item.create", "function_call"))
    output = kinds.index(("conversation.item.create", "function_call_output"))
    assert call < output < kinds.index(("response.create", None))
    assert sim.stats()["errors"] == {}


def test_audio_turns_without_transcript_are_counted_not_carried():
    """A user audio turn with no transcript cannot be re-seeded: counted as not carried (audio)."""
    with Simulator(speed=None, seed=7) as sim, Session.connect(
        url=sim.url, turn_detection="server_vad", reconnect=FAST
    ) as session:
        events = session.events("session.reconnected", "response.done")
        session.append_audio(silence_pcm(200) + speech_pcm(600) + silence_pcm(800))
        assert _next(events, "response.done").response["status"] == "completed"
        assert session.wait_idle(UNIT)
        sim.inject(FaultPlan(drop_after_events=0), session=0)
        ev = _next(events, "session.reconnected")
        assert ev.not_carried_by_reason == {"audio": 1}
        assert ev.reseeded == 1  # the assistant's spoken answer, as its transcript
        assert session.stats()["not_carried"] == 1


def test_a_new_socket_lost_during_reconnect_is_retried(sim: Simulator):
    """The socket of the first attempt drops too: a second attempt succeeds."""
    with Session.connect(url=sim.url, reconnect=FAST) as session:
        events = session.events("session.reconnecting", "session.reconnected")
        sim.inject(FaultPlan(drop_after_events=1), session=1)  # dies right after session.created
        sim.inject(FaultPlan(drop_after_events=0), session=0)
        assert _next(events, "session.reconnected").attempt == 2
        assert session.stats()["reconnect_failures"] == 1
        assert session.ask("hello", timeout=UNIT).status == "completed"


def test_key_refused_on_reconnect_is_fatal_and_not_retried():
    """The key is refused when reconnecting (close 3000): AuthenticationError, no further attempt."""
    key = "sk-rtq-test-0123456789abcdef"
    with Simulator(speed=None, seed=8, require_api_key=key) as sim:
        keys = [key]

        def connect() -> WebSocketTransport:
            return WebSocketTransport.connect(sim.url, [f"Authorization: Bearer {keys[-1]}"], timeout=UNIT)

        session = Session.connect(transport=connect, reconnect=FAST)
        try:
            closed = session.events("session.closed")
            pending = session.create_response(deadline=UNIT)
            pending.wait(UNIT)
            keys.append("sk-rtq-revoked-000000000000")  # revoked meanwhile: the next handshake is refused
            sim.inject(FaultPlan(drop_after_events=0), session=0)
            ev = closed.get(UNIT)
            assert ev is not None and isinstance(ev.error, AuthenticationError)
            assert key not in str(ev.error)
            with pytest.raises(AuthenticationError):
                session.create_response().wait(UNIT)
        finally:
            session.close()
    stats = sim.stats()
    assert stats["sessions"] == 2 and stats["auth_failures"] == 1


def test_quota_error_then_close_is_not_retried(sim: Simulator):
    """insufficient_quota followed by the socket closing: no reconnect, ConnectionLost naming the code."""
    with Session.connect(url=sim.url, reconnect=FAST) as session:
        errors = session.events("error")
        closed = session.events("session.closed")
        sim.inject(FaultPlan(error_after=(0, "insufficient_quota")), session=0)
        assert errors.get(UNIT) is not None
        assert session.ask("still here?", timeout=UNIT).status == "completed"  # an error alone ends nothing
        sim.inject(FaultPlan(drop_after_events=0), session=0)
        ev = closed.get(UNIT)
        assert ev is not None and isinstance(ev.error, ConnectionLost) and "insufficient_quota" in str(ev.error)
        assert session.stats()["reconnects"] == 0
    assert sim.stats()["sessions"] == 1


def test_unreachable_server_gives_up_with_connection_lost():
    """The server is gone: bounded attempts with bounded delays, then ConnectionLost everywhere."""
    policy = ReconnectPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.02, connect_timeout=UNIT)
    sim = Simulator(speed=None, seed=9).start()
    session = Session.connect(url=sim.url, reconnect=policy)
    try:
        events = session.events("session.reconnecting", "session.closed")
        sim.close()
        delays, closed = [], None
        while closed is None:
            ev = events.get(UNIT)
            assert ev is not None
            if ev.type == "session.reconnecting":
                delays.append(ev.delay_s)
            else:
                closed = ev
        assert len(delays) == 3 and all(0.005 <= d <= 0.02 for d in delays)
        assert isinstance(closed.error, ConnectionLost) and "gave up" in str(closed.error)
        with pytest.raises(ConnectionLost):
            session.create_response().wait(UNIT)
        assert session.stats()["reconnect_failures"] == 3
    finally:
        session.close()
        sim.close()


def test_close_during_reconnect_ends_everything(sim: Simulator):
    """close() while waiting to reconnect: returns, queued work fails SessionClosed, no thread left."""
    slow = ReconnectPolicy(initial_backoff=60.0, max_backoff=60.0, jitter=0.0)
    session = Session.connect(url=sim.url, reconnect=slow)
    events = session.events("session.reconnecting")
    sim.inject(FaultPlan(drop_after_events=0), session=0)
    assert events.get(UNIT) is not None
    queued = session.create_response()
    text = session.send_text("hello?")
    session.close(timeout=UNIT)
    with pytest.raises(SessionClosed):
        queued.wait(UNIT)
    assert isinstance(text.error, SessionClosed)
    assert not session.threads()
    assert sim.stats()["sessions"] == 1


def test_reconnect_off_fails_instead(sim: Simulator):
    """reconnect=False: a drop ends the session with ConnectionLost and no second connection."""
    session = Session.connect(url=sim.url, reconnect=False)
    try:
        sim.inject(FaultPlan(drop_after_events=0), session=0)
        with pytest.raises(ConnectionLost):
            session.create_response().wait(UNIT)
    finally:
        session.close()
    assert sim.stats()["sessions"] == 1


def test_backoff_is_exponential_bounded_and_jittered():
    """delay(n) is within [base*(1-jitter), base], base doubles up to max_backoff; jitter varies it."""
    policy = ReconnectPolicy(initial_backoff=0.1, max_backoff=2.0, jitter=0.5)
    rng = random.Random(1)
    bases = [policy.base_delay(n) for n in range(1, 10)]
    assert bases[:5] == [0.1, 0.2, 0.4, 0.8, 1.6] and bases[5:] == [2.0] * 4
    for n in range(1, 200):
        base = policy.base_delay(min(n, 12))
        d = policy.delay(min(n, 12), rng)
        assert base * 0.5 <= d <= base
    assert len({round(policy.delay(3, rng), 9) for _ in range(20)}) > 10
    assert ReconnectPolicy(jitter=0.0).delay(2, rng) == 0.2
    for bad in ({"max_attempts": 0}, {"jitter": 1.5}, {"initial_backoff": -1}, {"connect_timeout": 0}):
        with pytest.raises(InvalidArgument):
            ReconnectPolicy(**bad)  # type: ignore[arg-type]


def test_reseed_plan_carries_words_and_counts_the_rest():
    """reseed_plan: text and transcripts carried, audio/dangling calls/others counted, limit trims."""
    items: list[dict[str, Any]] = [
        {"id": "u1", "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
        {"id": "u2", "type": "message", "role": "user", "content": [{"type": "input_audio", "transcript": None}]},
        {"id": "a1", "type": "message", "role": "assistant", "status": "completed",
         "content": [{"type": "output_audio", "transcript": "hello"}]},
        {"id": "f1", "type": "function_call", "call_id": "c1", "name": "x", "arguments": "{}"},
        {"id": "o1", "type": "function_call_output", "call_id": "c1", "output": "1"},
        {"id": "f2", "type": "function_call", "call_id": "c2", "name": "y", "arguments": "{}"},
        {"id": "f3", "type": "function_call", "call_id": "c3", "name": "z", "arguments": "{}"},
        {"id": "a2", "type": "message", "role": "assistant", "status": "in_progress",
         "content": [{"type": "output_audio", "transcript": ""}]},
        {"id": "m1", "type": "mcp_call"},
        {"id": "bad", "type": "message", "role": "user", "content": "not a list"},
    ]
    seeds, dropped = reseed_plan(items, pending_calls=lambda cid: cid == "c3")
    assert [s["id"] for s in seeds] == ["u1", "a1", "f1", "o1", "f3"]
    assert seeds[1]["content"] == [{"type": "output_text", "text": "hello"}]
    assert dict(dropped) == {"audio": 1, "dangling_call": 1, "incomplete": 2, "other": 1}
    seeds, dropped = reseed_plan(items, limit=3)
    assert [s["id"] for s in seeds] == ["a1", "f1", "o1"] and dropped["trimmed"] == 1
    seeds, dropped = reseed_plan(items, limit=1)
    assert seeds == [] and dropped["trimmed"] == 4  # o1 without its call f1 goes too


# -- deadlines and stale responses ----------------------------------------------------------


def test_withheld_done_is_evicted_and_next_create_goes_through(sim: Simulator):
    """No response.done ever: after response_timeout the entry is cancelled, cleared, reported; the next runs."""
    with Session.connect(url=sim.url, response_timeout=0.3) as session:
        evicted = session.events("gate.evicted")
        sim.inject(FaultPlan(withhold_done=1), session=0)
        stuck = session.create_response(**said("[say: never done]"))
        nxt = session.create_response(**said("[say: next]"))
        ev = evicted.get(UNIT)
        assert ev is not None and ev.response_id and ev.age_s >= 0.3
        with pytest.raises(ResponseError, match=r"no response\.done"):
            stuck.wait(UNIT)
        assert nxt.wait(UNIT).text == "next"
        assert session.gate.stats().evicted == 1
    wire = [e for e in sim.client_events(0) if e["type"] in ("response.cancel", "response.create")]
    assert [e["type"] for e in wire] == ["response.create", "response.cancel", "response.create"]
    assert wire[1]["response_id"] == ev.response_id
    assert sim.stats()["conflicts"] == 0


def test_withheld_done_is_evicted_even_with_nothing_queued(sim: Simulator):
    """A wait() with no timeout on a response that never ends returns once it is evicted."""
    with Session.connect(url=sim.url, response_timeout=0.3) as session:
        sim.inject(FaultPlan(withhold_done=1), session=0)
        stuck = session.create_response()
        with pytest.raises(ResponseError):
            stuck.wait()  # no timeout: the eviction must end it
        assert session.gate.depth() == 0


def test_every_blocking_call_times_out():
    """Blocking calls honour their timeout on a response that never ends (ResponseTimeout / False / None)."""
    with Simulator(speed=None, seed=10) as sim, Session.connect(url=sim.url) as session:
        sim.inject(FaultPlan(withhold_done=1), session=0)
        stuck = session.create_response()
        with pytest.raises(ResponseTimeout):
            stuck.wait(0.05)
        with pytest.raises(ResponseTimeout):
            stuck.final(0.05)
        with pytest.raises(ResponseTimeout):
            session.ask("hi", timeout=0.05)
        assert session.wait_idle(0.05) is False
        assert session.events("nothing.ever").get(0.05) is None
        cancelled = session.cancel(timeout=UNIT)  # a cancel does end it: the server answers with a done
        assert cancelled is not None and cancelled.status == "cancelled"
    # Defaults are finite where a wait could otherwise last forever.
    for fn, name in ((Session.ask, "timeout"), (Session.cancel, "timeout"), (Session.wait_idle, "timeout"),
                     (Session.close, "timeout"), (Session.interrupt, "timeout"), (Session.update, "timeout")):
        default = inspect.signature(fn).parameters[name].default
        assert isinstance(default, (int, float)) and 0 < default <= 300, (fn.__name__, default)


# -- backpressure -------------------------------------------------------------------------------


def _long_audio_response(session: Session) -> rtqueue.Response:
    return session.create_response(**said("[len: 300]")).wait(UNIT)  # ~1500 audio deltas


_AUDIO = "response.output_audio.delta"


def _response_events(sim: Simulator) -> list[dict[str, Any]]:
    """Server events of session 0 from the first response.created to the response.done, once all are logged."""
    assert sim.wait_until(lambda s: any(e["type"] == "response.done" for e in s.server_events(0)), UNIT)
    events = sim.server_events(0)
    first = next(i for i, e in enumerate(events) if e["type"] == "response.created")
    last = next(i for i, e in enumerate(events) if e["type"] == "response.done")
    return events[first : last + 1]


def _control_ids(events: list[dict[str, Any]]) -> list[str]:
    return [e["event_id"] for e in events if e["type"] != _AUDIO]


def test_unread_event_stream_is_bounded_and_keeps_control_events(sim: Simulator):
    """An events() stream nobody reads: audio deltas capped (oldest dropped, counted), control events all kept."""
    with Session.connect(url=sim.url) as session:
        stream = session.events()
        response = _long_audio_response(session)
        assert response.status == "completed"
        server = _response_events(sim)
        got: list[dict[str, Any]] = []
        while (ev := stream.get(0)) is not None:
            if ev.is_server_event:
                got.append(dict(ev.data, type=ev.type))
        got = got[next(i for i, e in enumerate(got) if e["type"] == "response.created"):]
        got = got[: next(i for i, e in enumerate(got) if e["type"] == "response.done") + 1]
        sent_audio = [e["event_id"] for e in server if e["type"] == _AUDIO]
        kept_audio = [e["event_id"] for e in got if e["type"] == _AUDIO]
        assert len(sent_audio) > DEFAULT_STREAM_SIZE and 0 < len(kept_audio) < DEFAULT_STREAM_SIZE
        assert stream.dropped == len(sent_audio) - len(kept_audio)
        assert kept_audio == sent_audio[-len(kept_audio):]  # drop-oldest: the newest are kept, in order
        assert _control_ids(got) == _control_ids(server)  # every control event, in order


def test_blocked_callback_bounds_audio_and_delivers_every_control_event(sim: Simulator):
    """A callback stuck on an event: responses still complete; audio queued is capped; control events all arrive."""
    release, done = threading.Event(), threading.Event()
    seen: list[dict[str, Any]] = []

    def slow(ev: rtqueue.Event) -> None:
        release.wait(3 * UNIT)
        if ev.is_server_event:
            seen.append(dict(ev.data, type=ev.type))
        if ev.type == "response.done":
            done.set()

    with Session.connect(url=sim.url) as session:
        session.on("*", slow)
        response = _long_audio_response(session)  # completes while the callback is blocked
        assert response.status == "completed"
        assert session.dispatcher.audio_queued() <= 500
        release.set()
        assert done.wait(UNIT)
        server = _response_events(sim)
        sent_audio = sum(1 for e in server if e["type"] == _AUDIO)
        got_audio = sum(1 for e in seen if e["type"] == _AUDIO)
        dropped = session.stats()["events_dropped"]
        assert sent_audio > 1000 and dropped > 0 and dropped == sent_audio - got_audio
        delivered = _control_ids(seen)
        assert [i for i in delivered if i in set(_control_ids(server))] == _control_ids(server)


def test_mic_audio_lane_is_bounded_while_the_socket_cannot_take_it(sim: Simulator):
    """Mic audio piling up while nothing can be sent: the newest 250 chunks kept, the rest dropped and counted."""
    with Session.connect(url=sim.url, turn_detection=None) as session:
        assert session.writer.pause(UNIT)  # as while the socket is stalled or being replaced
        chunks = [i.to_bytes(2, "little") * 480 for i in range(400)]  # 20 ms each, tagged by index
        assert all(session.append_audio(c) for c in chunks)
        assert session.writer.audio_queued() == 250 and session.stats()["audio_dropped"] == 150
        session.writer.resume(drop_audio=False)
        session.send_text("marker").wait_sent(UNIT)
        assert sim.wait_until(lambda s: any(e.get("item", {}).get("content", [{}])[0].get("text") == "marker"
                                            for e in s.client_events(0)
                                            if e["type"] == "conversation.item.create"), UNIT)
    sent = [base64.b64decode(e["audio"]) for e in sim.client_events(0) if e["type"] == "input_audio_buffer.append"]
    assert sent == chunks[150:]  # drop-oldest, order kept


def test_slow_speaker_buffer_is_bounded():
    """A speaker far slower than the stream: its buffer stays capped, the oldest audio is dropped and counted."""
    speaker = NullSpeaker(max_buffer_ms=1000.0)
    with Simulator(speed=None, seed=11) as sim, Session.connect(
        url=sim.url, audio=AudioIO(output=speaker), turn_detection=None
    ) as session:
        response = _long_audio_response(session)
        stats = speaker.stats()
        assert response.audio_ms > 60_000
        assert stats["buffered_ms"] <= 1000.0
        assert stats["overflow_dropped_ms"] >= response.audio_ms - 1000.0 - stats["played_ms"] - 1
        assert stats["received_ms"] == pytest.approx(response.audio_ms)
