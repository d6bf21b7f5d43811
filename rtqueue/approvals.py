"""Tool approvals: a person (or a policy) says yes or no before a tool runs.

A function tool needs approval when its :class:`~rtqueue.Tool` says so
(``needs_approval=True`` or a predicate of the arguments) or its agent does
(``Agent(needs_approval=...)``). A hosted MCP call needs approval when the
server's ``require_approval`` makes the model ask (an ``mcp_approval_request``
item). Both take the same path:

- with an ``approval_handler`` (``Session.connect(approval_handler=...)``),
  the handler is called with an :class:`ApprovalRequest` and answers
  ``True``/``False`` or an :class:`ApprovalDecision` (with a reason);
- without one, the session publishes ``tool.approval_requested`` and the app
  answers with :meth:`~rtqueue.Session.approve` /
  :meth:`~rtqueue.Session.reject` from any thread.

Either way the wait is on the tool worker thread, never on the socket reader,
and is bounded by ``approval_timeout`` (a handler runs on a thread of its own,
so a hung one cannot hold the session), after which ``approval_default``
("reject" unless said otherwise) decides. A rejected function call is not run:
the model gets ``{"error": "rejected: <reason>"}``; a rejected MCP call is
answered with ``mcp_approval_response`` ``approve: false``. A handler that
raises rejects (and ``tool.approval_error`` says why): a broken check must not
approve.

While a call waits for its answer, its response's tool chain holds the gate
(the model must hear the result before anything else is said), so other
turns' creates wait too: ``Session.connect`` therefore refuses an
``approval_timeout`` that is not shorter than ``create_timeout``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from .errors import InvalidArgument
from .values import Event

__all__ = ["ApprovalBroker", "ApprovalDecision", "ApprovalRequest"]


@attrs.frozen
class ApprovalRequest:
    """One call waiting for a yes or no.

    ``kind`` is ``"function"`` (a function tool; ``call_id`` is its call id)
    or ``"mcp"`` (a hosted MCP call; ``call_id`` is the
    ``mcp_approval_request`` item's id, ``server_label`` its server).
    ``arguments`` is the model's JSON string.
    """

    call_id: str
    name: str
    arguments: str
    kind: str = "function"
    agent: str | None = None
    server_label: str | None = None
    response_id: str | None = None


@attrs.frozen
class ApprovalDecision:
    """The answer: ``approved`` and an optional ``reason`` (told to the model when rejected)."""

    approved: bool
    reason: str | None = None


def _normalise(value: object) -> ApprovalDecision:
    if isinstance(value, ApprovalDecision):
        return value
    if isinstance(value, bool):
        return ApprovalDecision(value)
    raise InvalidArgument(f"an approval handler returns a bool or an ApprovalDecision, not {value!r}")


class ApprovalBroker:
    """Asks for approvals and waits for the answers (see the module doc).

    ``handler`` may be None (answers come through :meth:`answer`);
    ``publish`` delivers ``tool.approval_*`` events.
    """

    def __init__(
        self,
        *,
        handler: Callable[[ApprovalRequest], Any] | None,
        timeout: float,
        default: str,
        publish: Callable[[Event], None],
    ) -> None:
        if handler is not None and not callable(handler):
            raise InvalidArgument(f"approval_handler must be callable, not {handler!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise InvalidArgument(f"approval_timeout must be a positive number, not {timeout!r}")
        if default not in ("reject", "approve"):
            raise InvalidArgument(f'approval_default must be "reject" or "approve", not {default!r}')
        self._handler = handler
        self._timeout = float(timeout)
        self._default = default
        self._publish = publish
        self._cond = threading.Condition()
        self._pending: dict[str, ApprovalRequest] = {}
        self._answers: dict[str, ApprovalDecision] = {}
        self._closed = False
        self.approved = 0
        self.rejected = 0
        self.timed_out = 0

    def pending(self) -> list[ApprovalRequest]:
        """Requests waiting for :meth:`answer` now."""
        with self._cond:
            return list(self._pending.values())

    def answer(self, call_id: str, approved: bool, reason: str | None = None) -> None:
        """The app's answer to a published request; :class:`InvalidArgument` if none waits for it."""
        if not isinstance(call_id, str):
            raise InvalidArgument(f"call_id must be a str, not {type(call_id).__name__}")
        if reason is not None and not isinstance(reason, str):
            raise InvalidArgument(f"reason must be a str or None, not {type(reason).__name__}")
        with self._cond:
            if call_id not in self._pending or call_id in self._answers:
                raise InvalidArgument(f"no approval is waiting for call {call_id!r}")
            self._answers[call_id] = ApprovalDecision(bool(approved), reason)
            self._cond.notify_all()

    def decide(self, requests: Sequence[ApprovalRequest]) -> dict[str, ApprovalDecision]:
        """Decide every request (blocks the calling tool worker, never the reader)."""
        if not requests:
            return {}
        out = self._by_handler(requests) if self._handler is not None else self._by_app(requests)
        for req in requests:
            d = out[req.call_id]
            if d.approved:
                self.approved += 1
            else:
                self.rejected += 1
            self._publish(Event("tool.approved" if d.approved else "tool.rejected", {
                "call_id": req.call_id, "name": req.name, "kind": req.kind, "agent": req.agent,
                "server_label": req.server_label, "reason": d.reason}))
        return out

    def _by_handler(self, requests: Sequence[ApprovalRequest]) -> dict[str, ApprovalDecision]:
        """Ask the handler about each request, on a thread of its own, for at most the timeout in all.

        The handler is user code that may hang (a person on the other end):
        it runs on ``rtqueue-approval`` threads and the tool worker waits for
        it only until the deadline; after it, ``approval_default`` decides and
        the handler's late answer is discarded (threads cannot be killed).
        """
        assert self._handler is not None
        handler = self._handler
        deadline = time.monotonic() + self._timeout
        out: dict[str, ApprovalDecision] = {}
        for req in requests:
            box: list[ApprovalDecision] = []
            done = threading.Event()

            def ask(req: ApprovalRequest = req, box: list[ApprovalDecision] = box, done: threading.Event = done
                    ) -> None:
                try:
                    box.append(_normalise(handler(req)))
                except BaseException as exc:  # a broken check must not approve, nor end anything of ours
                    self._publish(Event("tool.approval_error", {
                        "call_id": req.call_id, "name": req.name, "error": exc,
                        "message": f"{type(exc).__name__}: {exc}"}))
                    box.append(ApprovalDecision(False, f"the approval check failed ({type(exc).__name__})"))
                finally:
                    done.set()

            threading.Thread(target=ask, name=f"rtqueue-approval-{req.call_id}", daemon=True).start()
            answered = False
            while not answered:
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    break
                answered = done.wait(min(left, 0.25))  # short waits: close() must not wait out a slow handler
            if box:
                out[req.call_id] = box[0]
            elif self._closed:
                out[req.call_id] = ApprovalDecision(False, "the session closed before an answer came")
            else:
                self.timed_out += 1
                out[req.call_id] = ApprovalDecision(self._default == "approve",
                                                    f"no answer within {self._timeout:g}s")
        return out

    def _by_app(self, requests: Sequence[ApprovalRequest]) -> dict[str, ApprovalDecision]:
        with self._cond:
            for req in requests:
                self._pending[req.call_id] = req
        for req in requests:
            self._publish(Event("tool.approval_requested", attrs.asdict(req)))
        deadline = time.monotonic() + self._timeout
        out: dict[str, ApprovalDecision] = {}
        with self._cond:
            try:
                while not self._closed and not all(r.call_id in self._answers for r in requests):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                for req in requests:
                    answer = self._answers.pop(req.call_id, None)
                    if answer is None:
                        if self._closed:
                            answer = ApprovalDecision(False, "the session closed before an answer came")
                        else:
                            self.timed_out += 1
                            answer = ApprovalDecision(self._default == "approve",
                                                      f"no answer within {self._timeout:g}s")
                    out[req.call_id] = answer
            finally:
                for req in requests:
                    self._pending.pop(req.call_id, None)
                    self._answers.pop(req.call_id, None)
        return out

    def close(self) -> None:
        """Wake every waiter: unanswered requests are rejected."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def stats(self) -> dict[str, int]:
        """approved, rejected, timed_out, pending."""
        with self._cond:
            pending = len(self._pending)
        return {"approved": self.approved, "rejected": self.rejected, "timed_out": self.timed_out,
                "pending": pending}
