"""The simulator's phone network, pure part: calls, scripted callers, call-control rules.

No sockets, threads or clocks here (as :mod:`.core`): the caller passes the
time in. :mod:`.phone_net` is the threaded shell (HTTP endpoints, webhook
delivery, locks) and :class:`~rtqueue.sim.Simulator` drives it.

One :class:`PhoneCall` models one SIP call as OpenAI's side sees it:

- **ringing** after :meth:`Simulator.place_call`, while its signed
  ``realtime.call.incoming`` webhook is delivered;
- **active** after ``POST /v1/realtime/calls/{id}/accept``: the accept body
  configures the call's own :class:`~.core.SimSession`. The call owns that
  core, not any connection: ``?call_id=`` WebSocket attachments
  (:class:`CallTap`) each get a fresh ``session.created`` and, from then on,
  every server event of the call but its audio: the audio goes down the
  phone line, so the socket carries no ``response.output_audio.delta``;
  instead, as the official models say of WebRTC/SIP sessions,
  ``output_audio_buffer.started`` after a response's audio part is added,
  then ``output_audio_buffer.stopped`` after its ``response.done`` (or
  ``output_audio_buffer.cleared`` if it was cut off);
- **ended** by the caller hanging up, ``/hangup``, ``/refer`` (the transfer
  completes after a short delay), ``/reject``, an unanswered webhook, or the
  session expiring. Attached sockets are then closed (1000, "call ended")
  and a new attachment is refused.

The **scripted caller** (:class:`CallerScript`) runs its steps in order:
:func:`say` speaks synthesized speech (:mod:`.synth`, so the simulator
"hears" what it says) into the call's input audio, paced in real time scaled
by the simulator's speed, followed by a short silence so the server VAD ends
the turn, exactly as a caller's audio would; :func:`interrupt` waits until the
agent is talking, then speaks; :func:`wait_for_agent` waits until the agent
has finished a spoken turn (tool calls and handoffs in between don't count);
:func:`dtmf` presses keys (``input_audio_buffer.dtmf_event_received`` to every
attached socket); :func:`pause` waits; :func:`hangup` ends the call. The line
carries audio only while the caller speaks (plus the silence tail), not
continuous silence between utterances, so VAD ``audio_start_ms`` values count
the caller's audio, not wall time.

What the caller said, what the agent said (marked when cut off), DTMF keys,
webhook attempts and how the call ended are kept in :class:`CallRecord`.

Guessed, not seen in recordings: the error codes ``call_already_accepted``
and ``call_not_accepted`` (a request for a call in the wrong state; HTTP
400), the close code/reason of a call's socket when the call ends, and the
refusal of ``?call_id=`` for an unknown or ended call (an ``error`` event
``call_id_not_found``, then close 4000). The 404 body for an unknown call is
the real one.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, TypeAlias

import attrs

from ..errors import InvalidArgument
from ..formats import PCM16, AudioFormat, convert, format_of
from .core import SimSession
from .synth import SAMPLE_RATE, silence, synthesize

__all__ = [
    "CallLine",
    "CallRecord",
    "CallTap",
    "CallerScript",
    "PhoneCall",
    "dtmf",
    "hangup",
    "interrupt",
    "pause",
    "say",
    "sign_webhook",
    "wait_for_agent",
]

_CHUNK_MS = 100  # caller audio per input_audio_buffer.append
_DTMF_KEYS = frozenset("0123456789*#ABCD")
_REFER_DELAY_S = 0.5  # call time from an accepted REFER to the transfer completing (scaled by speed)
_CALL_ENDED = (1000, "call ended")
_TARGET_SCHEMES = ("sip:", "sips:", "tel:")
_MAX_LINES = 1000  # transcript lines kept per call

Outcome: TypeAlias = Literal["caller", "app", "refer", "reject", "unanswered", "expired", "simulator"]


# -- the script -------------------------------------------------------------------------------------


def _text(instance: Any, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str) or not value.split():
        raise InvalidArgument(f"{type(instance).__name__} {attribute.name} must be a non-empty str, got {value!r}")


def _seconds(instance: Any, attribute: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or math.isinf(value):
        raise InvalidArgument(f"{type(instance).__name__} {attribute.name} must be seconds >= 0, got {value!r}")


@attrs.frozen
class Say:
    """The caller speaks ``text`` (see :func:`say`)."""

    text: str = attrs.field(validator=_text)


@attrs.frozen
class Interrupt:
    """The caller speaks ``text`` once the agent is talking (see :func:`interrupt`)."""

    text: str = attrs.field(validator=_text)
    timeout_s: float = attrs.field(default=30.0, validator=_seconds)


@attrs.frozen
class Dtmf:
    """The caller presses ``keys`` (see :func:`dtmf`)."""

    keys: str

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.keys, str) or not self.keys or not set(self.keys) <= _DTMF_KEYS:
            raise InvalidArgument(f"dtmf keys are 0-9, *, #, A-D; got {self.keys!r}")


@attrs.frozen
class Pause:
    """The caller stays silent for ``seconds`` of call time (see :func:`pause`)."""

    seconds: float = attrs.field(validator=_seconds)


@attrs.frozen
class WaitForAgent:
    """The caller waits for the agent's answer (see :func:`wait_for_agent`)."""

    timeout_s: float = attrs.field(default=30.0, validator=_seconds)


@attrs.frozen
class HangUp:
    """The caller hangs up (see :func:`hangup`)."""


Step: TypeAlias = Say | Interrupt | Dtmf | Pause | WaitForAgent | HangUp
_STEP_TYPES = (Say, Interrupt, Dtmf, Pause, WaitForAgent, HangUp)


def say(text: str) -> Say:
    """Speak ``text`` as synthesized speech; the step ends when the caller has finished speaking."""
    return Say(text)


def interrupt(text: str, *, timeout_s: float = 30.0) -> Interrupt:
    """Wait until the agent is talking (at most ``timeout_s`` real seconds), then speak ``text`` over it."""
    return Interrupt(text, timeout_s)


def dtmf(keys: str) -> Dtmf:
    """Press keypad ``keys`` (``0-9 * # A-D``), one DTMF event each, about 150 ms of call time apart."""
    return Dtmf(keys)


def pause(seconds: float) -> Pause:
    """Stay silent for ``seconds`` of call time (scaled by the simulator's speed)."""
    return Pause(seconds)


def wait_for_agent(*, timeout_s: float = 30.0) -> WaitForAgent:
    """Wait until the agent has finished a spoken answer given since the caller last spoke.

    A response that only calls tools or hands off does not count: the agent's
    answer after them does. Gives up after ``timeout_s`` real seconds.
    """
    return WaitForAgent(timeout_s)


def hangup() -> HangUp:
    """Hang up: the call ends, attached sockets close."""
    return HangUp()


def _steps(value: Iterable[Step]) -> tuple[Step, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise InvalidArgument("CallerScript steps must be a list of steps (say(), dtmf(), ...)")
    steps = tuple(value)
    for step in steps:
        if not isinstance(step, _STEP_TYPES):
            raise InvalidArgument(f"not a caller step: {step!r} (use say, interrupt, dtmf, pause, wait_for_agent, "
                                  "hangup)")
    return steps


@attrs.frozen
class CallerScript:
    """What the caller on a simulated call does, in order (steps from :func:`say`, :func:`dtmf`, ...).

    ``voice`` and ``words_per_second`` shape the caller's synthesized speech;
    ``tail_ms`` is the silence sent after each utterance (at least the VAD's
    ``silence_duration_ms`` plus 300 ms is sent, whatever this says) so the
    server VAD ends the caller's turn. A script that ends without
    :func:`hangup` leaves the caller on the line, silent.
    """

    steps: tuple[Step, ...] = attrs.field(default=(), converter=_steps)
    voice: str = "cedar"
    words_per_second: float = 4.0
    tail_ms: int = 600


# -- records ---------------------------------------------------------------------------------------


@attrs.frozen
class CallLine:
    """One line of a call's transcript: who spoke, what, and when (seconds since the call was placed)."""

    speaker: Literal["caller", "agent"]
    text: str
    at: float
    #: For the agent: the caller (or a cancel) cut this answer off.
    interrupted: bool = False


@attrs.frozen
class CallRecord:
    """A snapshot of one simulated call (``Simulator.call(call_id)``)."""

    call_id: str
    status: Literal["ringing", "active", "ended"]
    #: Who ended it: ``caller`` (hung up), ``app`` (``/hangup``), ``refer`` (transferred),
    #: ``reject``, ``unanswered`` (no 2xx for the webhook), ``expired``, ``simulator`` (closed).
    ended_by: Outcome | None
    refer_target: str | None
    reject_status: int | None
    transcript: tuple[CallLine, ...]
    #: Keys the caller pressed, in order.
    dtmf: str
    #: HTTP status of each webhook delivery attempt (``None``: no answer).
    webhook_attempts: tuple[int | None, ...]
    sip_headers: tuple[tuple[str, str], ...]
    #: WebSocket attachments (``?call_id=``) so far.
    attachments: int
    #: The accept body's session configuration (``None`` until accepted).
    accepted_config: Mapping[str, Any] | None = attrs.field(repr=False)
    #: Whether the caller's script has run to its end.
    script_done: bool
    #: The call session's counters (as ``Simulator.stats()`` keys: ``conflicts``, ``responses``...).
    stats: Mapping[str, Any] = attrs.field(repr=False)

    def said(self, speaker: Literal["caller", "agent"]) -> list[str]:
        """The texts one side said, in order."""
        return [line.text for line in self.transcript if line.speaker == speaker]


# -- webhooks (the sending side) ----------------------------------------------------------------------


def sign_webhook(secret: str, webhook_id: str, timestamp: int, body: str) -> dict[str, str]:
    """Standard Webhooks headers for ``body``: ``webhook-id``, ``webhook-timestamp``, ``webhook-signature``.

    The signature is ``v1,`` + base64 HMAC-SHA256 of ``{id}.{timestamp}.{body}``
    keyed with the base64 part of a ``whsec_...`` secret (or the secret's
    bytes otherwise): what OpenAI sends and ``openai``'s ``webhooks.unwrap``
    checks.
    """
    key = base64.b64decode(secret[len("whsec_") :]) if secret.startswith("whsec_") else secret.encode()
    digest = hmac.new(key, f"{webhook_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": "v1," + base64.b64encode(digest).decode("ascii"),
    }


def api_error(message: str, *, code: str | None, param: str | None = None,
              type: str = "invalid_request_error") -> dict[str, Any]:
    """An OpenAI REST error body."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


_NOT_FOUND = (404, api_error("No session found for the provided call_id", code="call_id_not_found"))


# -- a call --------------------------------------------------------------------------------------------


@attrs.define(eq=False)
class CallTap:
    """One ``?call_id=`` attachment's view of a call: the events due to it and whether to close.

    The server's connection reads :attr:`queue` and :attr:`close_request`;
    the call fills them. Only the call's owner (under its lock) touches it.
    """

    queue: list[dict[str, Any]] = attrs.Factory(list)
    close_request: tuple[int, str] | None = None
    attached: bool = True


@attrs.define(eq=False)
class _Line:
    speaker: Literal["caller", "agent"]
    text: str
    at: float
    response_id: str | None = None


@attrs.define(eq=False)
class PhoneCall:
    """One simulated SIP call; see the module docstring. Not thread-safe: its owner locks.

    ``core_factory(model, now)`` makes the call's session on accept.
    ``speed`` paces the caller like the rest of the simulator (``None``:
    unpaced). Times are monotonic seconds passed in by the owner; ``epoch``
    is the wall-clock time at ``placed_at`` (for DTMF ``received_at``).
    """

    call_id: str
    script: CallerScript
    sip_headers: tuple[tuple[str, str], ...]
    placed_at: float
    epoch: float
    speed: float | None
    core_factory: Callable[[str, float], SimSession]
    seed: int = 0

    status: Literal["ringing", "active", "ended"] = attrs.field(init=False, default="ringing")
    ended_by: Outcome | None = attrs.field(init=False, default=None)
    refer_target: str | None = attrs.field(init=False, default=None)
    reject_status: int | None = attrs.field(init=False, default=None)
    core: SimSession | None = attrs.field(init=False, default=None)
    accepted_config: dict[str, Any] | None = attrs.field(init=False, default=None)
    webhook_attempts: list[int | None] = attrs.field(init=False, factory=list)
    attachments: int = attrs.field(init=False, default=0)
    _taps: list[CallTap] = attrs.field(init=False, factory=list)
    _speaking: set[str] = attrs.field(init=False, factory=set)  # responses whose audio buffer started
    _lines: list[_Line] = attrs.field(init=False, factory=list)
    _cut: set[str] = attrs.field(init=False, factory=set)
    _keys: list[str] = attrs.field(init=False, factory=list)
    _final_stats: dict[str, Any] | None = attrs.field(init=False, default=None)
    _end_at: float | None = attrs.field(init=False, default=None)
    # The caller: step index, its phase, when a waiting step next acts, queued line audio and keys.
    _pc: int = attrs.field(init=False, default=0)
    _phase: Literal["start", "speak", "wait", "done"] = attrs.field(init=False, default="start")
    _last_t: float = attrs.field(init=False, default=-math.inf)
    _wake_at: float | None = attrs.field(init=False, default=None)
    _audio: deque[tuple[float, str]] = attrs.field(init=False, factory=deque)  # (due, base64 append)
    _pending_keys: deque[tuple[float, str]] = attrs.field(init=False, factory=deque)
    # What the agent is doing, from the call's server events.
    _active: set[str] = attrs.field(init=False, factory=set)
    _talking: bool = attrs.field(init=False, default=False)
    _answers: int = attrs.field(init=False, default=0)
    _answers_at_speech: int = attrs.field(init=False, default=0)

    # -- control (the REST endpoints) ---------------------------------------------------------

    def request(self, action: str, body: Any, now: float) -> tuple[int, dict[str, Any] | None]:
        """Apply ``POST /v1/realtime/calls/{id}/{action}`` with JSON ``body``; returns ``(status, json)``."""
        self.advance(now)
        if self.status == "ended":
            return _NOT_FOUND
        if not isinstance(body, dict):
            return 400, api_error("The request body must be a JSON object.", code="invalid_type")
        if action == "accept":
            return self._accept(body, now)
        if action == "reject":
            return self._reject(body, now)
        if action == "refer":
            return self._refer(body, now)
        if action == "hangup":
            if self.status != "active":
                return 400, api_error("The call has not been accepted; reject it instead.", code="call_not_accepted")
            self._end("app", now)
            return 200, None
        return 404, api_error(f"Invalid URL (POST /v1/realtime/calls/{{call_id}}/{action})", code=None)

    def _accept(self, body: dict[str, Any], now: float) -> tuple[int, dict[str, Any] | None]:
        if self.status != "ringing":
            return 400, api_error("The call has already been accepted.", code="call_already_accepted")
        if body.get("type") != "realtime":
            if "type" not in body:
                return 400, api_error("Missing required parameter: 'type'.", code="missing_required_parameter",
                                      param="type")
            return 400, api_error(f"Invalid value: {body.get('type')!r}. Supported values are: 'realtime'.",
                                  code="invalid_value", param="type")
        model = body.get("model", "gpt-realtime")
        if not isinstance(model, str) or not model:
            return 400, api_error("Invalid 'model': expected a non-empty string.", code="invalid_type", param="model")
        core = self.core_factory(model, now)
        config = {k: v for k, v in body.items() if k != "model"}
        core.receive({"type": "session.update", "event_id": "accept", "session": config}, now)
        for event in core.advance(now):
            if event.get("type") == "error":
                err = event.get("error") or {}
                return 400, api_error(str(err.get("message")), code=err.get("code"), param=err.get("param"),
                                      type=str(err.get("type") or "invalid_request_error"))
        self.core = core
        self.accepted_config = dict(body)
        self.status = "active"
        self._last_t = now  # the caller's script starts when the call is answered
        return 200, None

    def _reject(self, body: dict[str, Any], now: float) -> tuple[int, dict[str, Any] | None]:
        if self.status != "ringing":
            return 400, api_error("The call has already been accepted; hang it up instead.",
                                  code="call_already_accepted")
        code = body.get("status_code", 603)
        if isinstance(code, bool) or not isinstance(code, int) or not 300 <= code <= 699:
            return 400, api_error(f"Invalid 'status_code': {code!r}. Expected a SIP status code from 300 to 699.",
                                  code="invalid_value", param="status_code")
        self.reject_status = code
        self._end("reject", now)
        return 200, None

    def _refer(self, body: dict[str, Any], now: float) -> tuple[int, dict[str, Any] | None]:
        if self.status != "active":
            return 400, api_error("The call has not been accepted.", code="call_not_accepted")
        target = body.get("target_uri")
        if target is None:
            return 400, api_error("Missing required parameter: 'target_uri'.", code="missing_required_parameter",
                                  param="target_uri")
        if not isinstance(target, str) or not target.startswith(_TARGET_SCHEMES):
            return 400, api_error(f"Invalid 'target_uri': {target!r}. Expected a sip: or tel: URI.",
                                  code="invalid_value", param="target_uri")
        if self.refer_target is None:
            self.refer_target = target
            # The transfer target answers, then OpenAI's leg is released: not at once.
            self._end_at = now + self._pace(_REFER_DELAY_S)
        return 200, None

    def webhook_failed(self, now: float) -> None:
        """Every delivery attempt of the webhook failed: the caller gives up (unanswered)."""
        if self.status == "ringing":
            self._end("unanswered", now)

    def shutdown(self, now: float) -> None:
        """The simulator is closing: end the call."""
        if self.status != "ended":
            self._end("simulator", now)

    # -- attachments ----------------------------------------------------------------------------

    def attach(self, now: float) -> CallTap | None:
        """A ``?call_id=`` socket joins; ``None`` if the call is not active (refuse it)."""
        self.advance(now)
        core = self.core
        if self.status != "active" or core is None:
            return None
        tap = CallTap()
        # Each attachment starts like a session: session.created with the call's current session.
        tap.queue.append({"type": "session.created", "event_id": core.new_event_id(), "session": core.session})
        self._taps.append(tap)
        self.attachments += 1
        return tap

    def detach(self, tap: CallTap) -> None:
        """The attachment's socket is gone."""
        tap.attached = False
        if tap in self._taps:
            self._taps.remove(tap)

    def client_event(self, event: Any, now: float, *, raw: str | bytes | None = None) -> None:
        """A client event from an attached socket (parsed, or ``raw`` when it was not JSON)."""
        core = self.core
        if core is None or self.status != "active":
            return
        self.advance(now)
        if raw is not None:
            core.receive_raw(raw, now)
        else:
            core.receive(event, now)

    # -- time ----------------------------------------------------------------------------------

    def next_due(self) -> float | None:
        """When :meth:`advance` next has work; ``None`` if nothing is scheduled (or not active)."""
        if self.status != "active":
            return None
        candidates = [t for t in (self._caller_due(), self._end_at) if t is not None]
        if self.core is not None:
            due = self.core.next_due()
            if due is not None:
                candidates.append(due)
        return min(candidates) if candidates else None

    def advance(self, now: float) -> None:
        """Run everything due at or before ``now`` in time order; fill the taps' queues."""
        core = self.core
        while self.status == "active" and core is not None:
            t = self._caller_due()
            if self._end_at is not None and (t is None or self._end_at < t):
                t = self._end_at
            if t is None or t > now:
                break
            t = max(t, self._last_t)  # a step "due at once" happens now, never in the past
            self._last_t = t
            self._publish(core.advance(t), t)
            if self.status != "active":
                break
            if self._end_at is not None and self._end_at <= t:
                self._end("refer", t)
                break
            self._run_caller(t)
        if self.status == "active" and core is not None:
            self._last_t = max(self._last_t, now)
            self._publish(core.advance(now), now)
            if core.close_request is not None:
                self._end("expired", now)

    def _caller_due(self) -> float | None:
        phase = self._phase
        if phase == "start":
            return -math.inf
        if phase == "speak":
            return self._audio[0][0] if self._audio else -math.inf
        if phase == "wait":
            candidates = [t for t in (self._wake_at,) if t is not None]
            if self._pending_keys:
                candidates.append(self._pending_keys[0][0])
            return min(candidates) if candidates else None
        return None

    def _pace(self, seconds: float) -> float:
        return seconds / self.speed if self.speed else 0.0

    # -- the caller ----------------------------------------------------------------------------------

    def _step(self) -> Step | None:
        return self.script.steps[self._pc] if self._pc < len(self.script.steps) else None

    def _run_caller(self, t: float) -> None:
        core = self.core
        assert core is not None
        # Line audio and keys due now first: they belong to the step under way.
        while self._audio and self._audio[0][0] <= t:
            _, chunk = self._audio.popleft()
            core.receive({"type": "input_audio_buffer.append", "audio": chunk}, t)
        while self._pending_keys and self._pending_keys[0][0] <= t:
            _, key = self._pending_keys.popleft()
            self._dtmf(key, t)
        if self._phase == "speak" and not self._audio:
            self._next_step()
        elif self._phase == "wait" and self._wake_at is not None and self._wake_at <= t:
            self._wake_at = None
            step = self._step()
            if isinstance(step, Interrupt):
                self._speak(step.text, t)  # timed out waiting for the agent to talk: speak anyway
            elif not self._pending_keys:
                self._next_step()  # a pause is over, the keys are pressed, or the wait timed out
        self._start_steps(t)

    def _start_steps(self, t: float) -> None:
        """Start steps until one has to wait (or the script ends)."""
        while self._phase == "start" and self.status == "active":
            step = self._step()
            if step is None:
                self._phase = "done"
                return
            if isinstance(step, Say):
                self._speak(step.text, t)
            elif isinstance(step, Interrupt):
                if self._talking:
                    self._speak(step.text, t)
                else:
                    self._wait(t + step.timeout_s)  # real seconds: the agent may simply not talk
            elif isinstance(step, WaitForAgent):
                if self._answered():
                    self._next_step()
                else:
                    self._wait(t + step.timeout_s)
            elif isinstance(step, Dtmf):
                gap = self._pace(0.15)
                for i, key in enumerate(step.keys):
                    if gap == 0:
                        self._dtmf(key, t)
                    else:
                        self._pending_keys.append((t + i * gap, key))
                if gap == 0:
                    self._next_step()
                else:
                    self._wait(t + len(step.keys) * gap)
            elif isinstance(step, Pause):
                if self._pace(step.seconds) > 0:
                    self._wait(t + self._pace(step.seconds))
                else:
                    self._next_step()
            else:  # HangUp
                self._next_step()
                self._end("caller", t)

    def _wait(self, until: float) -> None:
        self._phase = "wait"
        self._wake_at = until

    def _next_step(self) -> None:
        self._pc += 1
        self._phase = "start"
        self._wake_at = None

    def _speak(self, text: str, t: float) -> None:
        core = self.core
        assert core is not None
        speech = synthesize(text, voice=self.script.voice, seed=self.seed,
                            words_per_second=self.script.words_per_second)
        pcm = speech.pcm + silence(self._tail_ms(core))
        # The whole utterance in the call's input format at once (one conversion, one read of the
        # session), then cut into the appends the line carries.
        fmt, audio = self._encode(pcm)
        chunk = fmt.nbytes(_CHUNK_MS)
        step = self._pace(_CHUNK_MS / 1000)
        for k, lo in enumerate(range(0, len(audio), chunk)):
            self._audio.append((t + k * step, base64.b64encode(audio[lo : lo + chunk]).decode("ascii")))
        self._lines.append(_Line("caller", " ".join(speech.words), t - self.placed_at))
        self._answers_at_speech = self._answers
        self._phase = "speak"  # ends when the last chunk has gone out
        self._wake_at = None

    def _tail_ms(self, core: SimSession) -> int:
        td = core.session["audio"]["input"].get("turn_detection") or {}
        vad_ms = 700 if td.get("type") == "semantic_vad" else int(td.get("silence_duration_ms") or 200)
        return max(self.script.tail_ms, vad_ms + 300)

    def _encode(self, pcm: bytes) -> tuple[AudioFormat, bytes]:
        """The caller's 24 kHz PCM16 in the call session's input format (and that format)."""
        core = self.core
        assert core is not None
        fmt = format_of(core.session["audio"]["input"].get("format") or {"type": "audio/pcm", "rate": SAMPLE_RATE})
        return fmt, (pcm if fmt == PCM16 else convert(pcm, PCM16, fmt))

    def _dtmf(self, key: str, t: float) -> None:
        core = self.core
        assert core is not None
        self._keys.append(key)
        event = {
            "type": "input_audio_buffer.dtmf_event_received",
            "event_id": core.new_event_id(),
            "event": key,
            "received_at": int(self.epoch + (t - self.placed_at)),
        }
        for tap in self._taps:
            tap.queue.append(dict(event))

    def _answered(self) -> bool:
        return self._answers > self._answers_at_speech and not self._active

    # -- the agent, from the call's server events ---------------------------------------------------

    def _publish(self, events: list[dict[str, Any]], t: float) -> None:
        for event in events:
            self._observe(event, t)
            for out in self._socket_events(event):
                for tap in self._taps:
                    tap.queue.append(out)
        if not events or self._phase != "wait":
            return
        step = self._step()
        if isinstance(step, WaitForAgent) and self._answered():
            self._next_step()
            self._start_steps(t)
        elif isinstance(step, Interrupt) and self._talking:
            self._speak(step.text, t)

    def _socket_events(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        """What an attached socket gets for one of the call's server events (no audio: module doc)."""
        typ = event.get("type")
        if typ == "response.output_audio.delta":
            return []
        rid = event.get("response_id")
        if typ == "response.content_part.added" and (event.get("part") or {}).get("type") == "audio" \
                and isinstance(rid, str) and rid not in self._speaking:
            self._speaking.add(rid)
            return [event, self._buffer_event("output_audio_buffer.started", rid)]
        if typ == "response.done":
            resp = event.get("response") or {}
            rid = resp.get("id")
            if isinstance(rid, str) and rid in self._speaking:
                self._speaking.discard(rid)
                kind = "stopped" if resp.get("status") == "completed" else "cleared"
                return [event, self._buffer_event(f"output_audio_buffer.{kind}", rid)]
        return [event]

    def _buffer_event(self, typ: str, response_id: str) -> dict[str, Any]:
        core = self.core
        assert core is not None
        return {"type": typ, "event_id": core.new_event_id(), "response_id": response_id}

    def _observe(self, event: dict[str, Any], t: float) -> None:
        typ = event.get("type")
        if typ == "response.created":
            rid = (event.get("response") or {}).get("id")
            if isinstance(rid, str):
                self._active.add(rid)
        elif typ in ("response.output_audio.delta", "response.output_text.delta",
                     "response.output_audio_transcript.delta"):
            self._talking = True
        elif typ in ("response.output_audio_transcript.done", "response.output_text.done"):
            text = event.get("transcript") if typ.endswith("transcript.done") else event.get("text")
            if isinstance(text, str) and text and len(self._lines) < _MAX_LINES:
                self._lines.append(_Line("agent", text, t - self.placed_at, event.get("response_id")))
        elif typ == "response.done":
            resp = event.get("response") or {}
            rid = resp.get("id")
            self._active.discard(rid)
            output = resp.get("output") or []
            if resp.get("status") != "completed" and isinstance(rid, str):
                self._cut.add(rid)
            elif any(item.get("type") == "message" for item in output) and not any(
                    item.get("type") == "function_call" for item in output):
                self._answers += 1
            if not self._active:
                self._talking = False

    # -- ending ----------------------------------------------------------------------------------------

    def _end(self, by: Outcome, t: float) -> None:
        if self.status == "ended":
            return
        if self.core is not None:
            self._final_stats = self.core.stats()
        self.status = "ended"
        self.ended_by = by
        self._end_at = None
        self._wake_at = None
        self._audio.clear()
        self._pending_keys.clear()
        for tap in self._taps:
            tap.close_request = _CALL_ENDED
        self.core = None  # the call's session is gone with it

    # -- records ---------------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any] | None:
        """The call session's counters (live or final); ``None`` if never accepted."""
        if self.core is not None:
            return self.core.stats()
        return dict(self._final_stats) if self._final_stats is not None else None

    def record(self) -> CallRecord:
        """A frozen snapshot of the call."""
        lines = tuple(
            CallLine(line.speaker, line.text, round(line.at, 3), interrupted=line.response_id in self._cut)
            for line in self._lines
        )
        return CallRecord(
            call_id=self.call_id,
            status=self.status,
            ended_by=self.ended_by,
            refer_target=self.refer_target,
            reject_status=self.reject_status,
            transcript=lines,
            dtmf="".join(self._keys),
            webhook_attempts=tuple(self.webhook_attempts),
            sip_headers=self.sip_headers,
            attachments=self.attachments,
            accepted_config=json.loads(json.dumps(self.accepted_config)) if self.accepted_config else None,
            script_done=self._pc >= len(self.script.steps),
            stats=self.stats() or {},
        )


def default_sip_headers(call_number: int, caller: str = "+14155550123",
                        callee: str = "+18005550100") -> tuple[tuple[str, str], ...]:
    """SIP INVITE headers like a carrier's: From, To, Call-ID."""
    return (
        ("From", f'"{caller}" <sip:{caller}@sip.example.com>;tag={call_number:08x}'),
        ("To", f"<sip:{callee}@sip.example.com>"),
        ("Call-ID", f"{call_number:016x}@sip.example.com"),
    )
