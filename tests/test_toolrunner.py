"""Tests for rtqueue.toolrunner: parallel tool calls, failures, timeouts, threads."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from openai.types.realtime import ConversationItemCreateEvent

from rtqueue.errors import InvalidArgument
from rtqueue.toolrunner import ToolCall, ToolOutcome, ToolRunner, error_output
from rtqueue.tools import Tool, ToolContext, tool

# One timeout unit: generous, since it only bounds waits that should end early.
UNIT = 5.0


@pytest.fixture
def runner() -> Iterator[ToolRunner]:
    r = ToolRunner(max_workers=4)
    yield r
    r.close()


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """An event blocked tools wait on; set in teardown so their threads end."""
    event = threading.Event()
    yield event
    event.set()


def resolver(*tools: Tool) -> Callable[[str], Tool | None]:
    table = {t.name: t for t in tools}
    return table.get


def call(name: str, arguments: str = "{}", call_id: str | None = None) -> ToolCall:
    return ToolCall(call_id=call_id or f"call_{name}", name=name, arguments=arguments, item_id=None, response_id="r1")


def test_parallel_calls_return_in_call_order(runner: ToolRunner) -> None:
    """Three tools sleeping 0-50 ms run in parallel and come back in call order."""
    all_started = threading.Barrier(3, timeout=UNIT)

    @tool
    def nap(ms: int) -> dict:
        """Sleep a little."""
        # The barrier proves the three run at the same time: with fewer threads
        # it would break (BrokenBarrierError) instead of passing.
        all_started.wait()
        time.sleep(ms / 1000)
        return {"slept": ms, "thread": threading.current_thread().name}

    calls = [call("nap", json.dumps({"ms": ms}), f"c{i}") for i, ms in enumerate([50, 0, 25])]
    outcomes = runner.run_calls(calls, resolver(nap))
    assert [o.call for o in outcomes] == calls
    assert all(o.ok and o.error is None for o in outcomes)
    results = [json.loads(o.output) for o in outcomes]
    assert [r["slept"] for r in results] == [50, 0, 25]
    assert len({r["thread"] for r in results}) == 3
    assert outcomes[0].duration_ms >= 50


def test_raising_tool(runner: ToolRunner) -> None:
    """A tool that raises gives ok=False and an error output; others still succeed."""

    @tool
    def boom() -> str:
        """Fail."""
        raise RuntimeError("database down")

    @tool
    def fine() -> str:
        """Succeed."""
        return "fine"

    bad, good = runner.run_calls([call("boom"), call("fine")], resolver(boom, fine))
    assert not bad.ok
    assert bad.error == "tool boom failed: RuntimeError: database down"
    assert json.loads(bad.output) == {"error": bad.error}
    assert good.ok and good.output == "fine"


def test_bad_arguments(runner: ToolRunner) -> None:
    """Invalid arguments give ok=False with the validation message for the model."""

    @tool
    def lookup(order_id: str) -> str:
        """Look up."""
        return order_id

    (outcome,) = runner.run_calls([call("lookup", '{"id": 1}')], resolver(lookup))
    assert not outcome.ok
    assert "'order_id' is a required property" in json.loads(outcome.output)["error"]
    assert "'id' was unexpected" in (outcome.error or "")


def test_unknown_tool(runner: ToolRunner) -> None:
    """An unknown tool name gives ok=False without running anything."""
    (outcome,) = runner.run_calls([call("nope")], resolver())
    assert not outcome.ok
    assert outcome.error == "unknown tool 'nope'"
    assert json.loads(outcome.output) == {"error": "unknown tool 'nope'"}
    assert outcome.duration_ms == 0.0


def test_timeout(runner: ToolRunner, release: threading.Event, caplog: pytest.LogCaptureFixture) -> None:
    """A tool past its timeout gives ok=False while the others complete; its late result is dropped."""
    entered = threading.Event()

    @tool(timeout=0.05)
    def stuck() -> str:
        """Never returns in time."""
        entered.set()
        release.wait(UNIT)
        return "late"

    @tool
    def quick() -> str:
        """Returns at once."""
        return "quick"

    slow, fast = runner.run_calls([call("stuck"), call("quick")], resolver(stuck, quick))
    assert entered.is_set()
    assert not slow.ok
    assert slow.error == "tool stuck timed out after 0.05 s"
    assert json.loads(slow.output) == {"error": slow.error}
    assert slow.duration_ms == pytest.approx(50.0)
    assert fast.ok and fast.output == "quick"
    with caplog.at_level("WARNING", logger="rtqueue.tools"):
        release.set()
        runner.close()  # joins the stuck thread once it returns
    assert "finished after its timeout; its result is discarded" in caplog.text


def test_runner_recovers_after_hung_tools(release: threading.Event) -> None:
    """Tools stuck past their timeout do not starve later calls."""
    runner = ToolRunner(max_workers=1)

    @tool(timeout=0.05)
    def stuck() -> str:
        """Hangs."""
        release.wait(UNIT)
        return "late"

    @tool
    def quick() -> str:
        """Returns at once."""
        return "quick"

    try:
        (first,) = runner.run_calls([call("stuck")], resolver(stuck))
        assert not first.ok
        (second,) = runner.run_calls([call("quick")], resolver(quick))
        assert second.ok and second.output == "quick"
    finally:
        release.set()
        runner.close()


def test_queued_call_waiting_too_long(release: threading.Event) -> None:
    """A call that finds no free worker within its timeout fails, and never runs late."""
    runner = ToolRunner(max_workers=1, default_timeout=0.05)
    entered = threading.Event()
    ran: list[str] = []

    @tool(timeout=UNIT)
    def blocker() -> str:
        """Holds the only worker."""
        entered.set()
        release.wait(UNIT)
        return "done"

    @tool
    def queued() -> str:
        """Waits behind the blocker."""
        ran.append("queued")
        return "ran"

    results: list[ToolOutcome] = []
    holder = threading.Thread(target=lambda: results.extend(runner.run_calls([call("blocker")], resolver(blocker))))
    try:
        holder.start()
        assert entered.wait(UNIT)
        (waited,) = runner.run_calls([call("queued")], resolver(queued))
        assert not waited.ok
        assert waited.error == "tool queued could not start within 0.05 s: all tool workers are busy"
        assert waited.duration_ms >= 50
        release.set()
        holder.join(UNIT)
        assert not holder.is_alive()
        assert results[0].ok and results[0].output == "done"
    finally:
        release.set()
        runner.close()
    assert ran == []


def test_context_factory(runner: ToolRunner) -> None:
    """ctx_factory builds the ToolContext each call receives."""

    @tool
    def whoami(ctx: ToolContext) -> dict:
        """Report the context."""
        return {"call_id": ctx.call_id, "agent": ctx.agent_name, "app": ctx.context}

    def factory(c: ToolCall) -> ToolContext:
        return ToolContext(call_id=c.call_id, tool_name=c.name, agent_name="greeter", context="app")

    (outcome,) = runner.run_calls([call("whoami", call_id="c42")], resolver(whoami), factory)
    assert json.loads(outcome.output) == {"call_id": "c42", "agent": "greeter", "app": "app"}


def test_failing_resolve_and_factory(runner: ToolRunner) -> None:
    """A resolve or ctx_factory that raises gives ok=False, never an exception."""

    @tool
    def ok() -> str:
        """Fine."""
        return "ok"

    def bad_resolve(name: str) -> Tool | None:
        raise KeyError(name)

    (outcome,) = runner.run_calls([call("ok")], bad_resolve)
    assert not outcome.ok and "could not look up tool ok" in (outcome.error or "")

    def bad_factory(c: ToolCall) -> ToolContext:
        raise ValueError("no context")

    (outcome,) = runner.run_calls([call("ok")], resolver(ok), bad_factory)
    assert not outcome.ok and "no context" in (outcome.error or "")


def test_empty_batch(runner: ToolRunner) -> None:
    """No calls, no outcomes."""
    assert runner.run_calls([], resolver()) == []


def test_threads_named_and_gone_after_close() -> None:
    """Pool threads are named rtqueue-tool and have ended after close()."""
    runner = ToolRunner(max_workers=2)
    threads: list[threading.Thread] = []
    both = threading.Barrier(2, timeout=UNIT)

    @tool
    def where() -> str:
        """Record the thread."""
        threads.append(threading.current_thread())
        both.wait()
        return threading.current_thread().name

    outcomes = runner.run_calls([call("where", call_id="a"), call("where", call_id="b")], resolver(where))
    assert all(o.ok and o.output.startswith("rtqueue-tool") for o in outcomes)
    assert len(set(threads)) == 2
    assert all(t.is_alive() for t in threads)
    runner.close()
    assert not any(t.is_alive() for t in threads)
    runner.close()  # idempotent
    assert runner.closed


def test_run_after_close() -> None:
    """run_calls on a closed runner reports failures instead of raising."""
    runner = ToolRunner()
    runner.close(wait=False)

    @tool
    def ok() -> str:
        """Fine."""
        return "ok"

    (outcome,) = runner.run_calls([call("ok")], resolver(ok))
    assert not outcome.ok and outcome.error == "the tool runner is closed"


def test_context_manager() -> None:
    """A runner used as a context manager closes on exit."""
    with ToolRunner() as runner:
        assert not runner.closed
    assert runner.closed


def test_runner_argument_checks() -> None:
    """Bad max_workers or default_timeout raise InvalidArgument."""
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InvalidArgument):
            ToolRunner(bad)  # type: ignore[arg-type]
    for bad_timeout in (0, -1.0, float("nan"), "1"):
        with pytest.raises(InvalidArgument):
            ToolRunner(default_timeout=bad_timeout)  # type: ignore[arg-type]


def test_toolcall_from_events() -> None:
    """ToolCall.from_event reads both GA function-call events."""
    args_done = {
        "type": "response.function_call_arguments.done",
        "event_id": "e1",
        "response_id": "resp_1",
        "item_id": "item_1",
        "output_index": 0,
        "call_id": "call_1",
        "name": "lookup",
        "arguments": '{"a": 1}',
    }
    expected = ToolCall(call_id="call_1", name="lookup", arguments='{"a": 1}', item_id="item_1", response_id="resp_1")
    assert ToolCall.from_event(args_done) == expected
    item_done = {
        "type": "response.output_item.done",
        "event_id": "e2",
        "response_id": "resp_1",
        "output_index": 0,
        "item": {
            "id": "item_1",
            "type": "function_call",
            "call_id": "call_1",
            "name": "lookup",
            "arguments": '{"a": 1}',
            "status": "completed",
        },
    }
    assert ToolCall.from_event(item_done) == expected
    with pytest.raises(InvalidArgument):
        ToolCall.from_event({"type": "response.done"})
    with pytest.raises(InvalidArgument):
        ToolCall.from_event({"type": "response.function_call_arguments.done"})


def test_outcome_event_validates_against_openai() -> None:
    """ToolOutcome.to_event() is a valid GA conversation.item.create event."""
    outcome = ToolOutcome(call=call("x"), output=error_output("boom"), ok=False, error="boom", duration_ms=1.0)
    event = outcome.to_event()
    parsed = ConversationItemCreateEvent.model_validate(event)
    assert parsed.item.type == "function_call_output"
    assert parsed.model_dump(exclude_unset=True) == event
