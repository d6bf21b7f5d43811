"""Guardrails: synchronous checks on what the assistant says and on what the user says.

An **output guardrail** watches the assistant's text (the audio transcript or
the text output) while it streams. It runs every ``every_chars`` new
characters and once more when the response is done, on the session's guardrail
thread (``rtqueue-guard-N``): never on the socket reader, never under a lock.
When one trips, the session

1. stops local playback of that response,
2. cancels it (if it is still running) and truncates its item at what was played,
3. tells the model what went wrong (a system message) and
4. asks for **one** corrective response, through the gate, after the cancelled
   response's ``response.done``: never a conflict, never two corrections for one
   response (several guardrails tripping on it make one), and a ``final()`` /
   :meth:`~rtqueue.Session.ask` waiting on the tripped response returns the
   correction. A correction that trips again is corrected again at most
   ``max_corrections`` times in a row; after that it is only cut off.

The app gets a ``guardrail.tripped`` event with the guardrail's output.

An **input guardrail** checks the user's text (:meth:`~rtqueue.Session.ask`,
:meth:`~rtqueue.Session.send_text`) before it is sent, and each input audio
transcript when it arrives. A trip blocks the response: ``ask`` raises
:class:`InputGuardrailTripped` (nothing is sent), or, when the guardrail has a
``refusal``, the user's words stay out of the conversation and the assistant
says the refusal instead. For speech, when server or semantic VAD would
create the responses and input audio is transcribed, the session turns VAD's
``create_response`` off and makes each turn's response itself once the
transcript passed, so nothing is said before the check (it costs the
transcription's latency); a trip deletes the user's item and speaks the
refusal, if any. Without a transcription model (or with a VAD config that
rtqueue cannot see), the response VAD started is cancelled and cut as soon as
the transcript trips.

A guardrail is a function of one :class:`GuardrailContext` returning a
:class:`GuardrailResult`, a bool (True: tripped) or None (passed). One that
raises is reported (``guardrail.error``) and counts as passed: a broken check
must not silence the assistant. Guardrails are given per agent
(``Agent(output_guardrails=..., input_guardrails=...)``) and session-wide
(``Session.connect(output_guardrails=..., input_guardrails=...)``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, overload

import attrs

from .errors import InputGuardrailTripped, InvalidArgument

__all__ = [
    "GuardrailContext",
    "GuardrailResult",
    "InputGuardrail",
    "InputGuardrailTripped",
    "OutputGuardrail",
    "input_guardrail",
    "output_guardrail",
]

DEFAULT_EVERY_CHARS = 80


@attrs.frozen
class GuardrailContext:
    """What a guardrail looks at.

    ``text`` is the whole text so far (output guardrails: the response's
    transcript up to now; input guardrails: the user's text or transcript).
    ``final`` says the text is complete. ``agent`` is the agent whose
    response it is (output) or the current agent (input); ``context`` the
    app's object given to ``Session.connect(context=...)``.
    """

    text: str
    kind: str  # "output" or "input"
    agent: str | None = None
    response_id: str | None = None
    item_id: str | None = None
    final: bool = False
    context: Any = None


@attrs.frozen
class GuardrailResult:
    """A guardrail's verdict: ``tripped``, its ``info`` for the app, and a ``message`` for the model.

    ``message`` (optional) replaces the default note telling the model what
    went wrong (output) or the refusal said (input).
    """

    tripped: bool
    info: Any = None
    message: str | None = None


def _normalise(value: object, name: str) -> GuardrailResult:
    if value is None or value is False:
        return GuardrailResult(False)
    if value is True:
        return GuardrailResult(True)
    if isinstance(value, GuardrailResult):
        return value
    raise InvalidArgument(f"guardrail {name!r} returned {type(value).__name__}; "
                          "return a GuardrailResult, a bool or None")


def _check_func(instance: Any, attribute: Any, value: Any) -> None:
    if not callable(value):
        raise InvalidArgument(f"a guardrail wraps a function, not {value!r}")
    try:
        inspect.signature(value).bind(None)
    except TypeError:
        raise InvalidArgument(f"guardrail {getattr(value, '__name__', value)!r} must take one argument "
                              "(a GuardrailContext)") from None
    except ValueError:  # builtins without a signature: trust them
        pass


def _check_name(instance: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"a guardrail's name is a non-empty string, not {value!r}")


def _check_every(instance: Any, attribute: Any, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgument(f"every_chars must be a positive int, not {value!r}")


def _check_refusal(instance: Any, attribute: Any, value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise InvalidArgument(f"refusal must be a non-empty string or None, not {value!r}")


@attrs.frozen(eq=False)
class OutputGuardrail:
    """A check on the assistant's streamed text (see the module doc). Make one with :func:`output_guardrail`."""

    func: Callable[[GuardrailContext], Any] = attrs.field(validator=_check_func)
    name: str = attrs.field(validator=_check_name)
    every_chars: int = attrs.field(default=DEFAULT_EVERY_CHARS, validator=_check_every)

    def check(self, ctx: GuardrailContext) -> GuardrailResult:
        """Run the function (user code: call it off every lock) and normalise its answer; exceptions propagate."""
        return _normalise(self.func(ctx), self.name)


@attrs.frozen(eq=False)
class InputGuardrail:
    """A check on the user's text or transcript (see the module doc). Make one with :func:`input_guardrail`."""

    func: Callable[[GuardrailContext], Any] = attrs.field(validator=_check_func)
    name: str = attrs.field(validator=_check_name)
    refusal: str | None = attrs.field(default=None, validator=_check_refusal)

    def check(self, ctx: GuardrailContext) -> GuardrailResult:
        """Run the function (user code: call it off every lock) and normalise its answer; exceptions propagate."""
        return _normalise(self.func(ctx), self.name)


@overload
def output_guardrail(func: Callable[[GuardrailContext], Any], /) -> OutputGuardrail: ...
@overload
def output_guardrail(*, name: str | None = None, every_chars: int = DEFAULT_EVERY_CHARS
                     ) -> Callable[[Callable[[GuardrailContext], Any]], OutputGuardrail]: ...


def output_guardrail(func: Callable[[GuardrailContext], Any] | None = None, /, *, name: str | None = None,
                     every_chars: int = DEFAULT_EVERY_CHARS) -> Any:
    """Make an :class:`OutputGuardrail` of a function; usable bare (``@output_guardrail``) or with options."""
    def make(f: Callable[[GuardrailContext], Any]) -> OutputGuardrail:
        return OutputGuardrail(f, name or str(getattr(f, "__name__", "guardrail")), every_chars)

    return make(func) if func is not None else make


@overload
def input_guardrail(func: Callable[[GuardrailContext], Any], /) -> InputGuardrail: ...
@overload
def input_guardrail(*, name: str | None = None, refusal: str | None = None
                    ) -> Callable[[Callable[[GuardrailContext], Any]], InputGuardrail]: ...


def input_guardrail(func: Callable[[GuardrailContext], Any] | None = None, /, *, name: str | None = None,
                    refusal: str | None = None) -> Any:
    """Make an :class:`InputGuardrail` of a function; usable bare (``@input_guardrail``) or with options."""
    def make(f: Callable[[GuardrailContext], Any]) -> InputGuardrail:
        return InputGuardrail(f, name or str(getattr(f, "__name__", "guardrail")), refusal)

    return make(func) if func is not None else make


def check_list(value: object, kind: type, what: str) -> tuple[Any, ...]:
    """``value`` as a tuple of ``kind`` (a list or tuple of them, or None); else :class:`InvalidArgument`."""
    if value is None:
        return ()
    if isinstance(value, kind):
        return (value,)
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
        raise InvalidArgument(f"{what} must be a list of {kind.__name__}, not {value!r}")
    for g in value:
        if not isinstance(g, kind):
            raise InvalidArgument(f"{what} must hold {kind.__name__} objects (use @{kind.__name__.lower()[:-9]}"
                                  f"_guardrail), not {g!r}")
    return tuple(value)


def correction_note(guardrail: str, result: GuardrailResult) -> str:
    """The system message telling the model why its reply was cut off."""
    if result.message:
        return result.message
    why = f" ({result.info})" if isinstance(result.info, str) and result.info else ""
    return (f"Your previous reply was stopped by the '{guardrail}' guardrail{why} and the listener did not hear "
            f"the rest of it. Do not repeat it. Briefly correct yourself and answer again within the rules.")


def refusal_instructions(refusal: str) -> str:
    """Response instructions that make the assistant say ``refusal`` and nothing else."""
    return f"Say exactly the following, word for word, and nothing else: {refusal}"
