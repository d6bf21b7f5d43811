"""The guardrail thread: runs output and input guardrails off the reader, one check at a time.

The reader only *offers* work (a response's text grew, a response finished, a
transcript arrived): a dictionary update under a condition, no user code.
Thread ``rtqueue-guard-N`` (started on first use) takes each offer, reads the
text through its :class:`GuardHost`, runs the guardrails that are due (each
every ``every_chars`` new characters, all of them once the response is done)
and reports verdicts back to the host, which turns them into the conversation
core's actions. Guardrails are user code: a raising one is reported as a
``guardrail.error`` event and counts as passed.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict, deque
from typing import Any, Protocol

from .guardrails import GuardrailContext, GuardrailResult, InputGuardrail, OutputGuardrail
from .values import Event

__all__ = ["GuardHost", "GuardrailMonitor"]

log = logging.getLogger("rtqueue")

_MAX_TRACKED = 256  # responses whose check progress is remembered


class GuardHost(Protocol):
    """What the monitor needs from its session (the shell implements it)."""

    def guard_text(self, response_id: str) -> tuple[str, str | None, bool] | None:
        """``(text so far, agent, done)`` of a response, or None if it is unknown."""

    def output_guards_for(self, agent: str | None) -> tuple[OutputGuardrail, ...]:
        """The session-wide output guardrails plus ``agent``'s."""

    def input_guards_now(self) -> tuple[tuple[InputGuardrail, ...], str | None]:
        """The session-wide input guardrails plus the current agent's, and that agent's name."""

    def guard_context(self) -> Any:
        """The app's context object."""

    def output_tripped(self, response_id: str, guard: OutputGuardrail, result: GuardrailResult, text: str) -> None:
        """An output guardrail tripped on this response."""

    def output_passed(self, response_id: str) -> None:
        """Every output guardrail passed the finished response."""

    def input_tripped(self, item_id: str, guard: InputGuardrail, result: GuardrailResult, text: str) -> None:
        """An input guardrail tripped on a transcript."""

    def input_passed(self, item_id: str) -> None:
        """Every input guardrail passed a transcript."""

    def publish(self, event: Event) -> None:
        """Deliver an event to the app."""


def run_guard(guard: OutputGuardrail | InputGuardrail, ctx: GuardrailContext,
              publish: Any) -> GuardrailResult | None:
    """Run one guardrail (user code); a raising one is published as ``guardrail.error`` and yields None."""
    try:
        return guard.check(ctx)
    except BaseException as exc:  # SystemExit too: a guardrail must not take the session down
        log.warning("guardrail %s raised %r", guard.name, exc)
        publish(Event("guardrail.error", {"guardrail": guard.name, "kind": ctx.kind, "error": exc,
                                          "message": f"{type(exc).__name__}: {exc}",
                                          "response_id": ctx.response_id, "item_id": ctx.item_id}))
        return None


class GuardrailMonitor:
    """Runs guardrails for one session on thread ``name`` (see the module doc)."""

    def __init__(self, host: GuardHost, name: str) -> None:
        self._host = host
        self._name = name
        self._cond = threading.Condition()
        self._offers: OrderedDict[str, bool] = OrderedDict()  # response id -> final
        self._inputs: deque[tuple[str, str]] = deque()  # (item id, transcript)
        self._offered: OrderedDict[str, int] = OrderedDict()  # response id -> text size last offered
        self._checked: dict[tuple[str, str], int] = {}  # (response id, guardrail) -> size last checked
        self._done: OrderedDict[str, None] = OrderedDict()  # responses settled (tripped or final)
        self._closed = False
        self._busy = False
        self._thread: threading.Thread | None = None
        self.min_every = 1  # the shell sets the smallest every_chars of the guardrails in use

    # -- offers (reader thread; never blocks on user code) --------------------------------

    def offer_output(self, response_id: str, size: int, *, final: bool = False) -> None:
        """The response's text is ``size`` characters now (``final``: it is done)."""
        with self._cond:
            if self._closed or response_id in self._done:
                return
            if not final and size < self._offered.get(response_id, 0) + self.min_every:
                return  # debounce: not enough new text for any guardrail
            self._offered[response_id] = size
            while len(self._offered) > _MAX_TRACKED:
                self._offered.popitem(last=False)
            self._offers[response_id] = self._offers.get(response_id, False) or final
            self._wake()

    def offer_input(self, item_id: str, text: str) -> None:
        """A user transcript arrived."""
        with self._cond:
            if self._closed:
                return
            self._inputs.append((item_id, text))
            self._wake()

    def _wake(self) -> None:
        # Caller holds the condition.
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()
        self._cond.notify()

    def idle(self) -> bool:
        """Whether nothing is queued or running."""
        with self._cond:
            return not self._offers and not self._inputs and not self._busy

    @property
    def thread(self) -> threading.Thread | None:
        """The monitor thread, once started."""
        return self._thread

    # -- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._offers and not self._inputs and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                self._busy = True
                work: tuple[str, Any] = (("input", self._inputs.popleft()) if self._inputs
                                         else ("output", self._offers.popitem(last=False)))
            try:
                if work[0] == "input":
                    self._check_input(*work[1])
                else:
                    self._check_output(*work[1])
            except Exception as exc:  # a bug here must not end the thread
                log.exception("guardrail monitor failed")
                self._host.publish(Event("rtqueue.error", {"error": exc, "message": f"guardrails: {exc!r}"}))
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _settle(self, response_id: str) -> None:
        with self._cond:
            self._done[response_id] = None
            while len(self._done) > _MAX_TRACKED:
                self._done.popitem(last=False)
            self._offers.pop(response_id, None)
            self._offered.pop(response_id, None)
            for key in [k for k in self._checked if k[0] == response_id]:
                del self._checked[key]

    def _check_output(self, response_id: str, final: bool) -> None:
        snap = self._host.guard_text(response_id)
        if snap is None:
            self._settle(response_id)
            return
        text, agent, done = snap
        final = final or done
        ctx = GuardrailContext(text=text, kind="output", agent=agent, response_id=response_id, final=final,
                               context=self._host.guard_context())
        for guard in self._host.output_guards_for(agent):
            key = (response_id, guard.name)
            if not final and len(text) < self._checked.get(key, 0) + guard.every_chars:
                continue
            self._checked[key] = len(text)
            result = run_guard(guard, ctx, self._host.publish)
            if result is not None and result.tripped:
                self._settle(response_id)
                self._host.output_tripped(response_id, guard, result, text)
                return
        if final:
            self._settle(response_id)
            self._host.output_passed(response_id)

    def _check_input(self, item_id: str, text: str) -> None:
        guards, agent = self._host.input_guards_now()
        ctx = GuardrailContext(text=text, kind="input", agent=agent, item_id=item_id, final=True,
                               context=self._host.guard_context())
        for guard in guards:
            result = run_guard(guard, ctx, self._host.publish)
            if result is not None and result.tripped:
                self._host.input_tripped(item_id, guard, result, text)
                return
        self._host.input_passed(item_id)

    # -- closing --------------------------------------------------------------------------------

    def close(self, timeout: float = 5.0) -> None:
        """Stop: queued checks are dropped; a running guardrail is waited for (never from itself)."""
        with self._cond:
            self._closed = True
            self._offers.clear()
            self._inputs.clear()
            self._cond.notify_all()
            t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)
