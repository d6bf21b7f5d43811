"""The defects of issue 12, one test each, through the public API only.

Every test here failed on the code before the conversation core (commit
cd77b96); each docstring names the defect, each assertion states the wanted
behaviour. No test reads a private member of the SDK: they watch the session
through its events, handles, ``items``, ``stats()`` and ``threads()``, and the
wire through the simulator's ``client_events()`` / ``server_events()``.
"""

from __future__ import annotations

import gc
import json
import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import pytest

import rtqueue
from rtqueue import Agent, Session, Simulator, tool
from rtqueue.audio import AudioIO, NullSpeaker
from tests.utils import UNIT

# -- helpers -------------------------------------------------------------------------


class Collector:
    """A callback that keeps what it is given; tests wait on it with a timeout."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.items: list[Any] = []

    def __call__(self, item: Any) -> None:
        with self._cond:
            self.items.append(item)
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[list[Any]], bool], timeout: float = UNIT) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self.items), timeout)

    def wait_len(self, n: int, timeout: float = UNIT) -> bool:
        return self.wait_for(lambda items: len(items) >= n, timeout)


def item_text(item: dict[str, Any]) -> str:
    """The text (or transcript) of a message item from ``Session.items``."""
    return " ".join(
        str(part.get("text") or part.get("transcript") or "")
        for part in item.get("content") or ()
        if isinstance(part, dict)
    )


def call_outputs(sim: Simulator, index: int = 0) -> dict[str, str]:
    """call_id -> output of every ``function_call_output`` the client sent to the simulator."""
    return {
        e["item"]["call_id"]: e["item"]["output"]
        for e in sim.client_events(index)
        if e.get("type") == "conversation.item.create" and e.get("item", {}).get("type") == "function_call_output"
    }


def function_call_ids(sim: Simulator, name: str, index: int = 0) -> list[str]:
    """Call ids of the model's calls of ``name``, from the simulator's ``response.output_item.done`` events."""
    return [
        e["item"]["call_id"]
        for e in sim.server_events(index)
        if e.get("type") == "response.output_item.done"
        and e["item"].get("type") == "function_call"
        and e["item"].get("name") == name
    ]


def caused_by(exc: BaseException, target: BaseException) -> bool:
    """Whether ``target`` is ``exc`` or in its ``__cause__`` / ``__context__`` chain."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if cur is target:
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


def outcome(fn: Callable[[], Any]) -> tuple[BaseException | None, Any]:
    """``(exception, None)`` if ``fn()`` raised, else ``(None, its result)``."""
    try:
        return None, fn()
    except Exception as exc:
        return exc, None


class DeviceCloseError(RuntimeError):
    """What a broken audio device raises from ``close()``."""


class RaisingSpeaker(NullSpeaker):
    """A null speaker whose ``close()`` ends its thread, then raises (a flaky driver)."""

    error = DeviceCloseError("the speaker driver failed to close")

    def close(self) -> None:
        super().close()
        raise self.error


# -- 1. ask() from several threads ------------------------------------------------------


@pytest.mark.timeout(120)
def test_1_ask_from_16_threads_gets_own_answer():
    """Defect 1: ask() from several threads returns other threads' answers (user item and create are not one unit)."""
    threads_n, rounds = 16, 8  # issue 12: 16 threads x 8 ask() at 20 ms simulated latency
    wrong: list[str] = []
    errors: list[str] = []
    lock = threading.Lock()
    # Paced (20x real time) at 20 ms one-way latency: each answer takes a moment to come out.
    with Simulator(speed=20, latency_ms=20, seed=1) as sim, Session.connect(url=sim.url) as session:

        def asker(n: int) -> None:
            for k in range(rounds):
                token = f"tok{n}x{k}"
                try:
                    answer = session.ask(f"[say: {token}] question {k} from thread {n}", timeout=3 * UNIT)
                except rtqueue.RtqueueError as exc:
                    with lock:
                        errors.append(f"{token}: {exc!r}")
                    continue
                if token not in answer.text:
                    with lock:
                        wrong.append(f"{token} got {answer.text!r}")

        workers = [threading.Thread(target=asker, args=(n,), name=f"asker-{n}") for n in range(threads_n)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(6 * UNIT)
        assert not any(w.is_alive() for w in workers), "an ask() never returned"
        assert session.wait_idle(UNIT)
        messages = [i for i in session.items if i.get("type") == "message"]
    assert errors == []
    assert wrong == [], f"{len(wrong)} of {threads_n * rounds} answers belong to another thread: {wrong[:5]}"
    roles = [m.get("role") for m in messages]
    pairs = [roles[i : i + 2] for i in range(0, len(roles), 2)]
    out_of_order = [i for i, pair in enumerate(pairs) if pair != ["user", "assistant"]]
    assert len(roles) == 2 * threads_n * rounds and not out_of_order, (
        f"session.items do not read question, answer, ...: {len(out_of_order)} of {len(pairs)} pairs are "
        f"out of order, the first at item {2 * out_of_order[0] if out_of_order else len(roles)}: {roles[:6]}..."
    )
    for question, answer in zip(messages[::2], messages[1::2], strict=True):
        token = item_text(question).split("[say:", 1)[1].split("]", 1)[0].strip()
        assert item_text(answer) == token, f"{item_text(answer)!r} follows {item_text(question)!r}"
    assert sim.stats()["conflicts"] == 0


# -- 2. a tool call resolves against the agent of its response ----------------------------


@pytest.mark.timeout(60)
def test_2_tool_call_resolves_against_the_agent_of_its_response():
    """Defect 2: a tool call is looked up under the current agent, not the one whose response made it."""
    ran = threading.Event()

    @tool
    def lookup(order_id: str) -> dict:
        """Look up an order by its id."""
        ran.set()
        return {"order_id": order_id, "status": "found"}

    a = Agent(name="a", instructions="You are agent a.", tools=[lookup], handoffs=["b"])
    b = Agent(name="b", instructions="You are agent b.", handoffs=["a"])
    results, tool_errors, created = Collector(), Collector(), Collector()
    # Each response stays in flight for 1.5 s, so the app's handoff lands while a's response streams.
    with (
        Simulator(speed=None, seed=1, min_response_ms=1500) as sim,
        Session.connect(url=sim.url, agent=a, agents=[a, b]) as session,
    ):
        session.on("tool.result", results)
        session.on("tool.error", tool_errors)
        session.on("response.created", created)
        session.send_text("[tools: lookup] where is order 42?")
        handle = session.create_response()
        assert created.wait_len(1), "a's response never started"
        assert handle.result() is None, "a's response finished before the handoff (test setup)"
        session.handoff("b", respond=False)
        handle.final(3 * UNIT)
        assert session.wait_idle(UNIT)
        assert session.agent.name == "b"
        first = handle.result()
    assert first is not None and [c["name"] for c in first.function_calls] == ["lookup"]
    unknown = [e.get("output") for e in tool_errors.items]
    assert ran.is_set(), f"a's call of its own tool 'lookup' was not run; tool.error outputs: {unknown}"
    assert tool_errors.items == []
    assert results.wait_len(1) and [(e.name, e.agent) for e in results.items] == [("lookup", "a")]
    assert first.agent == "a"
    for output in call_outputs(sim).values():
        assert "unknown tool" not in output


# -- 3. a failed handoff is not reported as done -----------------------------------------


@pytest.mark.timeout(60)
def test_3_handoff_whose_target_fails_to_resolve_is_not_reported_done(sim: Simulator):
    """Defect 3: a handoff whose target's instructions callable raises is told to the model as transferred."""

    def broken_instructions(context: Any) -> str:
        raise RuntimeError("the billing prompt is missing")

    billing = Agent(name="billing", instructions=broken_instructions)
    a = Agent(name="a", instructions="You are agent a.", handoffs=[billing])
    failed = Collector()
    with Session.connect(url=sim.url, agent=a) as session:
        session.on("agent.handoff_failed", failed)
        try:
            session.ask("[tools: transfer_to_billing] put me through to billing", timeout=UNIT)
        except rtqueue.RtqueueError:
            pass  # what ask() returns after a failed handoff is not the point here
        assert session.wait_idle(UNIT)
        call_ids = function_call_ids(sim, "transfer_to_billing")
        assert len(call_ids) == 1, "the model did not call the handoff tool (test setup)"
        cid = call_ids[0]
        assert sim.wait_until(lambda s: cid in call_outputs(s), UNIT), "the handoff call was never answered"
        output = json.loads(call_outputs(sim)[cid])
        assert output.get("status") != "transferred" and "error" in output, (
            f"the model was told {output} although the handoff failed"
        )
        assert session.agent.name == "a"
        assert failed.wait_len(1), "no agent.handoff_failed event"
        ev = failed.items[0]
        assert (ev.source, ev.target) == ("a", "billing")
        assert ev.error is not None


# -- 4. close() from inside a tool ---------------------------------------------------------


@pytest.mark.timeout(60)
def test_4_close_inside_a_tool_returns_promptly(sim: Simulator):
    """Defect 4: close() called inside a tool (a "hang up" tool) blocks for 5 s joining its own worker."""
    holder: dict[str, Session] = {}
    took: list[float] = []
    hung_up = threading.Event()

    @tool
    def hang_up() -> dict:
        """Hang up the call."""
        t0 = time.monotonic()
        holder["session"].close()
        took.append(time.monotonic() - t0)
        hung_up.set()
        return {"status": "hung up"}

    desk = Agent(name="desk", instructions="You are the desk.", tools=[hang_up])
    session = Session.connect(url=sim.url, agent=desk)
    holder["session"] = session
    try:
        try:
            session.ask("[tools: hang_up] goodbye", timeout=UNIT)
        except rtqueue.RtqueueError:
            pass  # the session closed under the ask
        assert hung_up.wait(UNIT), "the tool's close() never returned"
        assert took[0] < 2.0, f"close() inside a tool took {took[0]:.1f} s"
        assert session.closed
    finally:
        session.close()


# -- 5. close() always finishes ------------------------------------------------------------


@pytest.mark.timeout(60)
def test_5_close_is_robust_to_a_raising_device_a_bad_timeout_and_a_failed_connect(sim: Simulator):
    """Defect 5: close() raises part-way (raising device, close("x"), failed connect) and leaves threads alive."""
    # (a) an audio device whose close() raises: every thread ends first, then the error comes out.
    speaker = RaisingSpeaker(realtime=False)
    session = Session.connect(url=sim.url, audio=AudioIO(output=speaker, input=None))
    with pytest.raises(Exception) as raised:
        session.close()
    assert caused_by(raised.value, speaker.error), f"close() raised {raised.value!r}, not the device's error"
    assert isinstance(raised.value, (DeviceCloseError, rtqueue.RtqueueError))
    assert session.threads() == [], f"close() raised with threads still alive: {session.threads()}"
    session.close()  # a second close() is a no-op
    assert session.threads() == []
    assert sim.wait_until(lambda s: s.stats()["active_sessions"] == 0, UNIT)

    # (b) close(timeout="x") is refused at the boundary and leaves the session open, then closes normally.
    session = Session.connect(url=sim.url)
    try:
        with pytest.raises(rtqueue.InvalidArgument):
            session.close(timeout="x")
        assert not session.closed, "a refused close() left the session half-closed"
    finally:
        session.close()
    assert session.threads() == [], f"threads alive after close(): {session.threads()}"

    # (c) connect() with a bad audio object fails cleanly: no thread, no server-side session.
    before = {t.name for t in threading.enumerate()}
    with pytest.raises(rtqueue.InvalidArgument):
        Session.connect(url=sim.url, audio=AudioIO(output="not a device", input=None))
    assert sim.wait_until(lambda s: s.stats()["active_sessions"] == 0, UNIT), "the failed connect left a session open"
    left = sorted(t.name for t in threading.enumerate() if t.name.startswith("rtqueue-") and t.name not in before)
    assert left == [], f"threads alive after the failed connect: {left}"


# -- 6. every call after close() raises SessionClosed at once -------------------------------


@pytest.mark.timeout(60)
def test_6_every_call_after_close_raises_session_closed_at_once(sim: Simulator):
    """Defect 6: after close(), update() waits its timeout and create_response()/handoff() return failed handles."""
    a = Agent(name="a", instructions="You are agent a.", handoffs=["b"])
    b = Agent(name="b", instructions="You are agent b.", handoffs=["a"])
    session = Session.connect(url=sim.url, agent=a, agents=[a, b])
    session.close()
    calls: dict[str, Callable[[], Any]] = {
        "update": lambda: session.update(instructions="again"),
        "create_response": lambda: session.create_response(),
        "handoff": lambda: session.handoff("b"),
        "ask": lambda: session.ask("hello", timeout=UNIT),
        "send_text": lambda: session.send_text("hello"),
        "send": lambda: session.send({"type": "input_audio_buffer.clear"}),
        "cancel": lambda: session.cancel(),
        "interrupt": lambda: session.interrupt(),
        "commit": lambda: session.commit(),
    }
    wrong: list[str] = []
    for name, call in calls.items():
        t0 = time.monotonic()
        exc, result = outcome(call)
        took = time.monotonic() - t0
        if not isinstance(exc, rtqueue.SessionClosed):
            wrong.append(f"{name}() -> {exc!r}" if exc is not None else f"{name}() returned {result!r}")
        elif took > 1.0:
            wrong.append(f"{name}() raised SessionClosed only after {took:.1f} s")
    assert wrong == [], "after close(), calls must raise SessionClosed at once:\n" + "\n".join(wrong)
    assert session.agent.name == "a", "handoff() after close() changed session.agent"


# -- 7. the dispatcher survives any exception a callback raises --------------------------


class CallbackBomb(BaseException):
    """A BaseException that is neither SystemExit nor KeyboardInterrupt."""


@pytest.mark.timeout(60)
def test_7_dispatcher_survives_callbacks_raising_base_exceptions(sim: Simulator):
    """Defect 7: a callback raising SystemExit (or any BaseException) silently kills the dispatcher."""

    def exits(event: Any) -> None:
        raise SystemExit("callback exits")

    def bombs(event: Any) -> None:
        raise CallbackBomb("callback bombs")

    seen, done = Collector(), Collector()
    with Session.connect(url=sim.url) as session:
        session.on("response.done", exits)
        session.on("*", bombs)
        session.on("response.done", seen)
        handles = []
        for i in range(2):
            session.send_text(f"[say: answer {i}] question {i}")
            h = session.create_response()
            h.add_done_callback(done)
            h.wait(UNIT)
            handles.append(h)
        assert seen.wait_len(2), f"later callbacks were not delivered: {len(seen.items)} of 2 response.done events"
        assert done.wait_len(2), f"add_done_callback callbacks were not delivered: {len(done.items)} of 2"
        assert [e.response["id"] for e in seen.items] == [h.response_id for h in handles]
        assert set(map(id, done.items)) == set(map(id, handles))


# -- 8. events() is bounded and unsubscribes ------------------------------------------------


@pytest.mark.timeout(60)
def test_8_abandoned_event_stream_is_dropped_and_streams_are_bounded(sim: Simulator):
    """Defect 8: an abandoned events() iterator keeps buffering without bound."""
    with Session.connect(url=sim.url) as session:
        stream = session.events()
        ref = weakref.ref(stream)
        session.ask("[say: hello] hi", timeout=UNIT)
        for _ in stream:
            break  # the loop ends: the stream is abandoned
        del stream
        gc.collect()
        for i in range(30):
            session.ask(f"[say: answer {i}] question {i}", timeout=UNIT)
        gc.collect()
        assert ref() is None, "the session still holds (and feeds) an abandoned, unreferenced event stream"
        assert session.stats()["event_streams"] == 0

        # A stream nobody reads holds at most max_size (non-control) events and counts what it dropped.
        deltas = ("response.output_text.delta", "response.output_audio_transcript.delta")
        with session.events(*deltas, max_size=20) as unread:
            assert session.stats()["event_streams"] == 1
            for i in range(10):
                session.ask(f"[len: 30] question {i}", timeout=UNIT)
            held = 0
            while unread.get(timeout=0) is not None:
                held += 1
            assert held <= 20, f"an unread stream buffered {held} events past max_size=20"
            assert unread.dropped > 0
        assert session.stats()["event_streams"] == 0, "the stream is still fed after its with-block"


# -- 9. every error is an RtqueueError ----------------------------------------------------


@pytest.mark.timeout(60)
def test_9_bad_arguments_raise_invalid_argument(sim: Simulator):
    """Defect 9: errors outside the tree: bad arguments raise plain TypeError/ValueError/gaierror or pass silently."""
    opened: list[Any] = []

    def connect(**kwargs: Any) -> Session:
        s = Session.connect(url=sim.url, **kwargs)
        opened.append(s)  # accepted: closed below
        return s

    def simulator(**kwargs: Any) -> None:
        with Simulator(**kwargs):
            pass

    def events_5() -> Any:
        s = session.events(5)
        opened.append(s)
        return s

    session = Session.connect(url=sim.url)
    try:
        done = session.create_response()
        done.wait(UNIT)
        calls: dict[str, Callable[[], Any]] = {
            'session.update(timeout="x")': lambda: session.update(instructions="hi", timeout="x"),
            'session.wait_idle("x")': lambda: session.wait_idle("x"),
            'handle.cancel(timeout="x")': lambda: done.cancel(timeout="x"),
            "Session.connect(max_conflict_retries=-1)": lambda: connect(max_conflict_retries=-1),
            'Session.connect(reconnect="yes")': lambda: connect(reconnect="yes"),
            "Simulator(speed=-1)": lambda: simulator(speed=-1),
            'Simulator(speed="fast")': lambda: simulator(speed="fast"),
            'Simulator(port="x")': lambda: simulator(port="x"),
            "FaultPlan(drop_after_events=-1)": lambda: rtqueue.FaultPlan(drop_after_events=-1),
            "session.events(5)": events_5,
            "session.append_audio(odd-length PCM16)": lambda: session.append_audio(b"\x00\x01\x02"),
            "handle.add_done_callback(5)": lambda: done.add_done_callback(5),
            'session.close("x")': lambda: session.close("x"),  # last: today it half-closes the session
        }
        wrong: list[str] = []
        for name, call in calls.items():
            exc, result = outcome(call)
            if not isinstance(exc, rtqueue.InvalidArgument):
                wrong.append(f"{name} -> {exc!r}" if exc is not None else f"{name} was accepted ({result!r})")
        assert wrong == [], "each must raise rtqueue.InvalidArgument:\n" + "\n".join(wrong)
    finally:
        for obj in opened:
            obj.close()
        session.close()


# -- 10. smaller, session-side --------------------------------------------------------------


@pytest.mark.timeout(60)
def test_10a_sixteen_metadata_pairs_stay_sixteen(sim: Simulator):
    """Defect 10: the SDK's own response.metadata tag turns the app's 16 allowed pairs into 17."""
    metadata = {f"key{i}": f"value{i}" for i in range(16)}
    with Session.connect(url=sim.url) as session:
        handle = session.create_response(metadata=metadata)

        def sent(s: Simulator) -> list[dict[str, Any]]:
            return [
                e["response"].get("metadata") or {}
                for e in s.client_events(0)
                if e.get("type") == "response.create" and "key0" in (e.get("response", {}).get("metadata") or {})
            ]

        assert sim.wait_until(lambda s: bool(sent(s)), UNIT)
        on_wire = sent(sim)[0]
        assert len(on_wire) <= 16, f"response.create carried {len(on_wire)} metadata pairs (the API allows 16)"
        assert on_wire == metadata
        response = handle.wait(UNIT)
        assert response.status == "completed"
        assert response.metadata == metadata


@pytest.mark.timeout(120)
def test_10b_history_is_capped_by_size():
    """Defect 10: history is capped by item count only: a 10 MB message is kept whole, and re-sent on reconnect."""
    big = "x" * 10_000_000
    policy = rtqueue.ReconnectPolicy(initial_backoff=0.01, max_backoff=0.05, connect_timeout=UNIT)
    added = Collector()
    with Simulator(speed=None, seed=1) as sim, Session.connect(url=sim.url, reconnect=policy) as session:
        reconnected = session.events("session.reconnected")
        session.on("conversation.item.done", added)
        session.send_text(big).wait_sent(UNIT)
        assert added.wait_for(lambda evs: any(len(item_text(e.item)) > 1000 for e in evs), UNIT)
        assert session.wait_idle(UNIT)
        items = session.items
        kept = sum(len(item_text(i)) for i in items)
        assert kept <= 1_000_000, f"session.items holds {kept:,} characters of text (a 10 MB message kept whole)"
        user = [i for i in items if i.get("role") == "user"]
        assert user, "the big message is not in session.items at all"
        # Marked either by a "truncated" flag (on the item or its part) or by a note at the end of the text.
        cut = user[-1]
        flagged = cut.get("truncated") or any(isinstance(p, dict) and p.get("truncated") for p in cut["content"])
        noted = "truncated" in item_text(cut)[-200:].lower()
        assert flagged or noted, f"the cut message is not marked truncated (ends {item_text(cut)[-40:]!r})"
        # A reconnect re-seeds what the history holds, so the 10 MB are not sent again.
        sim.inject(rtqueue.FaultPlan(drop_after_events=0), session=0)
        assert reconnected.get(UNIT) is not None, "no reconnect"
        assert sim.wait_until(
            lambda s: any(e.get("type") == "conversation.item.create" for e in s.client_events(1)), UNIT
        ), "the reconnect did not re-seed the conversation"
        resent = max((len(json.dumps(e)) for e in sim.client_events(1)), default=0)
        assert resent <= 1_100_000, f"the reconnect re-sent a {resent:,}-byte event"
        reconnected.close()


@pytest.mark.timeout(30)
def test_10c_rtqueue_logger_has_a_null_handler():
    """Defect 10: no logging.NullHandler on the "rtqueue" logger."""
    handlers = logging.getLogger("rtqueue").handlers
    assert any(isinstance(h, logging.NullHandler) for h in handlers), f"handlers of 'rtqueue': {handlers}"


@pytest.mark.timeout(60)
def test_10d_log_messages_do_not_repeat_the_logger_name(caplog: pytest.LogCaptureFixture):
    """Defect 10: a doubled "rtqueue: rtqueue:" prefix (messages repeat the logger's name)."""
    caplog.set_level(logging.WARNING, logger="rtqueue")
    errors = Collector()
    with Simulator(speed=None, seed=1) as sim, Session.connect(url=sim.url) as session:
        session.on("rtqueue.error", errors)
        sim.inject(rtqueue.FaultPlan(malformed_json_after=0), session=0)
        session.ask("[say: hi] hello", timeout=UNIT)
        assert errors.wait_len(1), "the malformed frame was not reported (test setup)"
    records = [r for r in caplog.records if r.name == "rtqueue" or r.name.startswith("rtqueue.")]
    assert records, "rtqueue logged no warning for the malformed frame (test setup)"
    doubled = [f"{r.name}: {r.getMessage()}" for r in records if r.getMessage().startswith("rtqueue:")]
    assert doubled == [], f"with a '%(name)s: %(message)s' format these read 'rtqueue: rtqueue: ...': {doubled}"
