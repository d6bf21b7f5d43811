"""Running the tool calls of one response on a thread pool.

The model may call several tools in one response. The session hands them all
to :meth:`ToolRunner.run_calls`, which runs them in parallel, waits for every
one (each up to its timeout), and returns one :class:`ToolOutcome` per call in
call order; the session then sends all outputs and a single
``response.create``. Failures never raise: the model gets an ``{"error": ...}``
output it can act on, the app gets ``ok=False`` and the message.

Threads cannot be killed. A tool still running at its timeout is abandoned:
its outcome says it timed out, its late result is logged and discarded, and
its worker thread stays busy until the function returns. So that a few stuck
tools cannot starve later responses, the runner then moves new work to a fresh
pool, letting the old one finish in the background.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import attrs

from .errors import InvalidArgument, ToolError
from .tools import Tool, ToolContext

if TYPE_CHECKING:  # typing.Self is 3.11+; annotations are not evaluated
    from typing import Self

__all__ = ["ToolCall", "ToolOutcome", "ToolRunner", "error_output"]

log = logging.getLogger("rtqueue.tools")

THREAD_NAME_PREFIX = "rtqueue-tool"

_MAX_WAIT = 3600.0


def _opt_str(instance: Any, attribute: Any, value: Any) -> None:
    if value is not None and not isinstance(value, str):
        raise InvalidArgument(f"ToolCall {attribute.name} must be a str or None, got {type(value).__name__}")


def _req_str(instance: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, str):
        raise InvalidArgument(f"ToolCall {attribute.name} must be a str, got {type(value).__name__}")


@attrs.frozen
class ToolCall:
    """One function call the model made: ``arguments`` is its raw JSON string."""

    call_id: str = attrs.field(validator=_req_str)
    name: str = attrs.field(validator=_req_str)
    arguments: str = attrs.field(validator=_req_str)
    item_id: str | None = attrs.field(default=None, validator=_opt_str)
    response_id: str | None = attrs.field(default=None, validator=_opt_str)

    @classmethod
    def from_event(cls, event: Mapping[str, Any]) -> ToolCall:
        """Build from a ``response.function_call_arguments.done`` event or a
        ``response.output_item.done`` event whose item is a ``function_call``.

        Raises :class:`~rtqueue.errors.InvalidArgument` for any other event.
        """
        kind = event.get("type")
        if kind == "response.function_call_arguments.done":
            return cls(
                call_id=event.get("call_id"),  # type: ignore[arg-type]
                name=event.get("name"),  # type: ignore[arg-type]
                arguments=event.get("arguments") or "",
                item_id=event.get("item_id"),
                response_id=event.get("response_id"),
            )
        item = event.get("item")
        if kind == "response.output_item.done" and isinstance(item, Mapping) and item.get("type") == "function_call":
            return cls(
                call_id=item.get("call_id"),  # type: ignore[arg-type]
                name=item.get("name"),  # type: ignore[arg-type]
                arguments=item.get("arguments") or "",
                item_id=item.get("id"),
                response_id=event.get("response_id"),
            )
        raise InvalidArgument(f"not a function call event: {kind!r}")


@attrs.frozen
class ToolOutcome:
    """The result of one :class:`ToolCall`.

    ``output`` is what the model receives as ``function_call_output.output``;
    when ``ok`` is false it is ``{"error": "<message>"}`` and ``error`` holds the
    same message for the app. ``duration_ms`` is the time the tool ran (for a
    timeout: until it was abandoned; for a call that never ran: 0 or the time
    it waited for a worker).
    """

    call: ToolCall
    output: str
    ok: bool
    error: str | None
    duration_ms: float

    def to_event(self) -> dict[str, Any]:
        """The ``conversation.item.create`` client event carrying this output."""
        return {
            "type": "conversation.item.create",
            "item": {"type": "function_call_output", "call_id": self.call.call_id, "output": self.output},
        }


def error_output(message: str) -> str:
    """The ``output`` string sent to the model for a failed call."""
    return json.dumps({"error": message}, ensure_ascii=False)


def _failed(call: ToolCall, message: str, duration_ms: float = 0.0) -> ToolOutcome:
    return ToolOutcome(call=call, output=error_output(message), ok=False, error=message, duration_ms=duration_ms)


@attrs.define(eq=False)
class _Job:
    """One submitted call; every field is guarded by the batch's condition."""

    call: ToolCall
    tool: Tool
    ctx: ToolContext | None
    timeout: float
    queue_timeout: float
    submitted_at: float
    executor: ThreadPoolExecutor | None = None
    started_at: float | None = None
    output: str | None = None
    error: str | None = None
    finished_at: float | None = None
    abandoned: bool = False
    closed: bool = False  # abandoned because the runner closed


class ToolRunner:
    """A thread pool for tool calls; threads are named ``rtqueue-tool_N``.

    ``default_timeout`` applies to tools whose ``timeout`` is ``None``. Use one
    runner per session; :meth:`run_calls` blocks, so call it from a worker
    thread, never from the socket reader. Safe to use from several threads.
    """

    def __init__(self, max_workers: int = 4, *, default_timeout: float = 30.0) -> None:
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
            raise InvalidArgument(f"max_workers must be a positive int, got {max_workers!r}")
        number = isinstance(default_timeout, (int, float)) and not isinstance(default_timeout, bool)
        if not number or not default_timeout > 0:
            raise InvalidArgument(f"default_timeout must be a positive number of seconds, got {default_timeout!r}")
        self.max_workers = max_workers
        self.default_timeout = float(default_timeout)
        self._lock = threading.Lock()
        self._closed = False
        self._executor = self._new_executor()
        # Pools given up after a tool hung in them; shut down, their threads
        # exit once the stuck functions return.
        self._retired: list[ThreadPoolExecutor] = []
        # Batches being waited for: close() abandons their jobs so run_calls returns at once.
        self._batches: list[tuple[dict[int, _Job], threading.Condition]] = []

    def _new_executor(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix=THREAD_NAME_PREFIX)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def run_calls(
        self,
        calls: Sequence[ToolCall],
        resolve: Callable[[str], Tool | None],
        ctx_factory: Callable[[ToolCall], ToolContext | None] | None = None,
    ) -> list[ToolOutcome]:
        """Run ``calls`` in parallel and return their outcomes in call order.

        ``resolve(name)`` gives the tool for a call's name (``None``: unknown).
        ``ctx_factory(call)`` gives the :class:`~rtqueue.tools.ToolContext`
        for tools that take one (``None``: a bare context is made).

        Each call may run for its tool's ``timeout`` (or ``default_timeout``)
        from the moment a worker starts it, and may wait for a free worker up
        to that timeout or ``default_timeout``, whichever is longer (a short
        timeout is about the tool's own work, not about a busy pool). So this
        returns within twice the largest of those. It never raises for a call's failure:
        an unknown tool, invalid arguments, a tool that raises or times out,
        a failing ``resolve``/``ctx_factory`` and a closed runner all give an
        ``ok=False`` outcome.
        """
        calls = list(calls)
        outcomes: dict[int, ToolOutcome] = {}
        jobs: dict[int, _Job] = {}
        cond = threading.Condition()
        for index, call in enumerate(calls):
            failure = self._prepare(call, resolve, ctx_factory)
            if isinstance(failure, ToolOutcome):
                outcomes[index] = failure
                continue
            tool, ctx = failure
            job = _Job(
                call=call,
                tool=tool,
                ctx=ctx,
                timeout=tool.timeout if tool.timeout is not None else self.default_timeout,
                queue_timeout=max(tool.timeout or 0.0, self.default_timeout),
                submitted_at=time.monotonic(),
            )
            with self._lock:
                # Under the lock, so the pool cannot be shut down or swapped
                # between choosing it and submitting to it.
                if self._closed:
                    outcomes[index] = _failed(call, "the tool runner is closed")
                    continue
                job.executor = self._executor
                job.executor.submit(_run_job, job, cond)
            jobs[index] = job

        with self._lock:
            if self._closed:
                _abandon(jobs, cond)
            self._batches.append((jobs, cond))
        try:
            self._wait(jobs, cond)
        finally:
            with self._lock:
                self._batches.remove((jobs, cond))
        for index, job in jobs.items():
            outcomes[index] = _outcome(job)
            if job.abandoned and job.started_at is not None:
                self._retire(job.executor)
        return [outcomes[i] for i in range(len(calls))]

    def _prepare(
        self,
        call: ToolCall,
        resolve: Callable[[str], Tool | None],
        ctx_factory: Callable[[ToolCall], ToolContext | None] | None,
    ) -> ToolOutcome | tuple[Tool, ToolContext | None]:
        try:
            tool = resolve(call.name)
        except Exception as exc:
            log.exception("resolving tool %r failed", call.name)
            return _failed(call, f"could not look up tool {call.name}: {type(exc).__name__}: {exc}")
        if tool is None:
            return _failed(call, f"unknown tool {call.name!r}")
        if not isinstance(tool, Tool):
            return _failed(call, f"tool {call.name} is misconfigured (resolve returned {type(tool).__name__})")
        ctx = None
        if ctx_factory is not None:
            try:
                ctx = ctx_factory(call)
            except Exception as exc:
                log.exception("building the ToolContext for %r failed", call.name)
                return _failed(call, f"tool {call.name} could not be started: {type(exc).__name__}: {exc}")
        return tool, ctx

    @staticmethod
    def _wait(jobs: dict[int, _Job], cond: threading.Condition) -> None:
        """Wait until every job finished or was abandoned at its deadline."""
        with cond:
            while True:
                now = time.monotonic()
                next_deadline: float | None = None
                for job in jobs.values():
                    if job.finished_at is not None or job.abandoned:
                        continue
                    # A queued job's clock is its wait for a worker; a running
                    # job's is its own run time.
                    if job.started_at is not None:
                        deadline = job.started_at + job.timeout
                    else:
                        deadline = job.submitted_at + job.queue_timeout
                    if now >= deadline:
                        job.abandoned = True
                        job.finished_at = now
                    elif next_deadline is None or deadline < next_deadline:
                        next_deadline = deadline
                if next_deadline is None:
                    return
                # Capped: Condition.wait overflows on huge (e.g. infinite) timeouts.
                cond.wait(min(next_deadline - now, _MAX_WAIT))

    def _retire(self, executor: ThreadPoolExecutor | None) -> None:
        with self._lock:
            if executor is None or self._closed or executor is not self._executor:
                return  # already retired by another batch, or closing anyway
            self._retired.append(executor)
            self._executor = self._new_executor()
        # Its idle threads exit now; the stuck one when its function returns.
        executor.shutdown(wait=False)
        log.warning("a tool timed out while running; new tool calls go to a fresh thread pool")

    def close(self, wait: bool = True) -> None:
        """Shut the pool down; calls not yet started are cancelled. Idempotent.

        ``wait=True`` joins the worker threads, which means waiting for tool
        functions still running, including ones abandoned after their timeout;
        ``wait=False`` returns at once and lets them finish in the background.
        Calling :meth:`run_calls` afterwards gives ``ok=False`` outcomes.
        """
        with self._lock:
            self._closed = True
            executors = [*self._retired, self._executor]
            batches = list(self._batches)
        for jobs, cond in batches:  # run_calls waiting on a tool returns now; the tool is abandoned
            _abandon(jobs, cond)
        for executor in executors:
            executor.shutdown(wait=wait, cancel_futures=True)


def _abandon(jobs: dict[int, _Job], cond: threading.Condition) -> None:
    """Give up every unfinished job of a batch (the runner is closing) and wake its waiter."""
    with cond:
        now = time.monotonic()
        for job in jobs.values():
            if job.finished_at is None and not job.abandoned:
                job.abandoned = True
                job.finished_at = now
                job.closed = True
        cond.notify_all()


def _run_job(job: _Job, cond: threading.Condition) -> None:
    """Worker-thread body: run one call and record its result under ``cond``."""
    with cond:
        if job.abandoned:  # gave up waiting for a worker; do not run it late
            return
        job.started_at = time.monotonic()
        cond.notify_all()
    output: str | None = None
    error: str | None = None
    try:
        output = job.tool.invoke(job.call.arguments, job.ctx)
    except ToolError as exc:
        error = str(exc)
    except BaseException as exc:  # invoke wraps Exception; this is SystemExit & co.
        error = f"tool {job.call.name} failed: {type(exc).__name__}"
        raise
    finally:
        with cond:
            if job.abandoned:
                log.warning(
                    "tool %s (call %s) finished after its timeout; its result is discarded",
                    job.call.name,
                    job.call.call_id,
                )
            else:
                job.output, job.error = output, error
                job.finished_at = time.monotonic()
                cond.notify_all()


def _outcome(job: _Job) -> ToolOutcome:
    if job.closed:
        message = f"tool {job.call.name} was abandoned: the session closed while it ran"
        return _failed(job.call, message, ((job.finished_at or job.submitted_at) - job.submitted_at) * 1000.0)
    if job.abandoned:
        if job.started_at is None:
            waited = (job.finished_at or job.submitted_at) - job.submitted_at
            message = f"tool {job.call.name} could not start within {job.queue_timeout:g} s: all tool workers are busy"
            return _failed(job.call, message, waited * 1000.0)
        message = f"tool {job.call.name} timed out after {job.timeout:g} s"
        return _failed(job.call, message, job.timeout * 1000.0)
    assert job.started_at is not None and job.finished_at is not None
    duration_ms = (job.finished_at - job.started_at) * 1000.0
    if job.error is not None or job.output is None:
        return _failed(job.call, job.error or f"tool {job.call.name} failed", duration_ms)
    return ToolOutcome(call=job.call, output=job.output, ok=True, error=None, duration_ms=duration_ms)
