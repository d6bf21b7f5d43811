"""The simulator's conversation logic: a pure state machine, no I/O.

One :class:`SimSession` models one Realtime connection. It never touches a
socket, a thread or a clock; the caller passes the time in:

- :meth:`SimSession.receive` takes one client event (a parsed JSON value) or
  :meth:`SimSession.receive_raw` one raw frame, at time ``now``;
- :meth:`SimSession.advance` returns every server event due at or before
  ``now``, in wire order, including the ones ``receive`` produced at once;
- :meth:`SimSession.next_due` says when the next event becomes due.

Times are seconds on any monotonic scale; they must not go backwards. Pacing
(``speed``) scales the durations of audio and text streaming; ``speed=None``
(or 0) makes every step due at once. Client mistakes never raise: they become
GA ``error`` events with the real service's codes and messages (the catalogue
is in :data:`ERROR_CODES`). Events are produced before time ``now`` is
applied to an incoming event, so a cancel at ``now`` first lets everything due
before ``now`` out, exactly as a real server that streamed them already.

Unknown client event types get ``invalid_value`` with ``param: "type"`` and
the list of supported values, which is what the real service answers.

Orders and shapes follow recordings of the real GA server (DESIGN.md
section 3): no ``conversation.created``; ``conversation.item.done`` before
``response.output_item.done``; ``rate_limits.updated`` (a ``tokens`` entry
only) 40 ms (paced) after ``response.done``; items without ``object``; an
``obfuscation`` string on text, transcript and MCP-argument deltas.
Asynchronous extras run on a session-level timeline next to the responses:
input audio transcription (``audio.input.transcription``; what synthesized
speech says comes from :mod:`.transcribe`, other audio completes with ``""``
or, with ``transcription_failures`` or a ``[fail]`` prompt, fails), the
server VAD ``idle_timeout_ms`` turn, hosted ``mcp`` tool listing. Races the
real service shows are reachable: ``vad_create_delay_s`` lets a barge-in
cancel a VAD response before its ``response.created``; a cancel during a
function call's arguments still sends ``function_call_arguments.done``.

Audio formats (``session.audio.input.format`` / ``.output.format``, per
direction; a partial ``session.update`` keeps what it does not name):
``audio/pcm`` 24 kHz passes through untouched (no conversion cost);
``audio/pcmu`` and ``audio/pcma`` (G.711, 8 kHz) are decoded on input, with
one streaming :class:`~rtqueue.audio.formats.Transcoder` per session, before
the VAD and the transcriber hear them (near matching, see
:mod:`.transcribe`), and the synthesized speech of a response is encoded into
the output format current when that response started (its
``response.audio.output.format`` says which). Every millisecond figure
(buffer length, ``audio_start_ms``/``audio_end_ms``, item durations, the
truncation check) is real time, computed with the right byte rate.
"""

from __future__ import annotations

import base64
import binascii
import copy
import functools
import heapq
import json
import math
import random
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeGuard

import attrs

from ..formats import PCM16, AudioFormat, Transcoder, convert, format_of
from .model import McpCall, Reply, ScriptedModel, Turn, TurnKind
from .synth import SAMPLE_RATE, SpeechStream
from .transcribe import Listener, transcribe
from .vad import EnergyVad

__all__ = [
    "DEFAULT_INSTRUCTIONS",
    "ERROR_CODES",
    "SUPPORTED_CLIENT_EVENTS",
    "SimSession",
]

DEFAULT_INSTRUCTIONS = "You are a helpful, friendly voice assistant. Keep answers short and speak clearly."

SUPPORTED_CLIENT_EVENTS = (
    "session.update",
    "input_audio_buffer.append",
    "input_audio_buffer.commit",
    "input_audio_buffer.clear",
    "conversation.item.create",
    "conversation.item.truncate",
    "conversation.item.delete",
    "conversation.item.retrieve",
    "response.create",
    "response.cancel",
    "output_audio_buffer.clear",
)

#: Error codes this core can send, with what triggers them.
ERROR_CODES: Mapping[str, str] = {
    "conversation_already_has_active_response": "in-band response.create while one is active",
    "response_cancel_not_active": "response.cancel with nothing (or not that id) active",
    "invalid_value": "a bad value; truncate past the produced audio; unknown event type",
    "invalid_type": "a field of the wrong JSON type",
    "item_truncate_invalid_item_id": "truncate of an item that is not assistant audio",
    "item_delete_invalid_item_id": "delete of an unknown item",
    "item_retrieve_invalid_item_id": "retrieve of an unknown item",
    "input_audio_buffer_commit_empty": "commit with less than 100 ms buffered",
    "unknown_parameter": "session.update with a field the GA session does not have",
    "missing_required_parameter": "a required field is absent (e.g. session.type)",
    "cannot_update_voice": "voice change after the session produced audio",
    "invalid_json": "a frame that is not a JSON object ('Invalid event: failed to parse JSON value. ...')",
    "invalid_event": "a binary WebSocket frame",
    "integer_below_min_value": "audio format rate below 24000 (the whole session.update is discarded)",
    "object_above_max_properties": "response.metadata with more than 16 pairs",
    "null": "(code null) truncate of an item that is not model output audio",
    "session_expired": "the session reached its maximum duration",
    "server_error": "an unexpected simulator bug (also listed in SimSession.internal_errors)",
}

_ID_FIX = str.maketrans("+/", "xz")
_PCM = {"type": "audio/pcm", "rate": SAMPLE_RATE}
_FORMAT_TYPES = ("audio/pcm", "audio/pcmu", "audio/pcma")
_TOP_FIELDS = frozenset(
    {
        "type",
        "object",
        "id",
        "model",
        "instructions",
        "output_modalities",
        "audio",
        "tools",
        "tool_choice",
        "max_output_tokens",
        "tracing",
        "truncation",
        "include",
        "prompt",
        "expires_at",
        "parallel_tool_calls",
        "reasoning",
    }
)
_AUDIO_FIELDS = frozenset({"input", "output"})
_AUDIO_IN_FIELDS = frozenset({"format", "noise_reduction", "transcription", "turn_detection"})
_AUDIO_OUT_FIELDS = frozenset({"format", "voice", "speed"})
_FORMAT_FIELDS = frozenset({"type", "rate"})
_SERVER_VAD_FIELDS = frozenset(
    {
        "type",
        "threshold",
        "prefix_padding_ms",
        "silence_duration_ms",
        "create_response",
        "interrupt_response",
        "idle_timeout_ms",
    }
)
_SEMANTIC_VAD_FIELDS = frozenset({"type", "eagerness", "create_response", "interrupt_response"})
# semantic_vad has no silence_duration_ms; eagerness stands in for it.
_EAGERNESS_SILENCE_MS = {"low": 1200, "medium": 700, "auto": 700, "high": 400}
_MIN_COMMIT_MS = 100.0
_MAX_METADATA = 16
#: Voices the GA service accepts (a custom voice is ``{"id": ...}``).
VOICES = ("alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar")
_RESPONSE_FIELDS = frozenset(
    {
        "audio",
        "conversation",
        "input",
        "instructions",
        "max_output_tokens",
        "metadata",
        "output_modalities",
        "parallel_tool_calls",
        "prompt",
        "reasoning",
        "tool_choice",
        "tools",
    }
)
_RATE_LIMITS_DELAY_S = 0.04
_TRANSCRIBE_DELAY_S = 0.15
_TRANSCRIBE_WORD_S = 0.04
_MCP_LIST_S = 0.2
_TEXT_TOKENS_PER_WORD = 1.3
_AUDIO_TOKENS_PER_SECOND = 20.0


def _default_server_vad() -> dict[str, Any]:
    return {
        "type": "server_vad",
        "threshold": 0.5,
        "prefix_padding_ms": 300,
        "silence_duration_ms": 200,
        "create_response": True,
        "interrupt_response": True,
        "idle_timeout_ms": None,
    }


def _default_semantic_vad() -> dict[str, Any]:
    return {"type": "semantic_vad", "eagerness": "auto", "create_response": True, "interrupt_response": True}


class _Reject(Exception):
    """Internal: a client event is refused; becomes one ``error`` event."""

    def __init__(
        self,
        code: str | None,
        message: str,
        param: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.type = type


def _missing(param: str) -> _Reject:
    return _Reject("missing_required_parameter", f"Missing required parameter: '{param}'.", param)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _bad_type(param: str, expected: str, value: Any) -> _Reject:
    return _Reject(
        "invalid_type",
        f"Invalid type for '{param}': expected {expected}, but got {_json_type(value)} instead.",
        param,
    )


def _bad_value(param: str, value: Any, supported: Sequence[str] | None = None) -> _Reject:
    msg = f"Invalid value: '{value}'."
    if supported:
        msg += " Supported values are: " + ", ".join(f"'{s}'" for s in supported) + "."
    return _Reject("invalid_value", msg, param)


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@attrs.define(eq=False)
class _Message:
    """Server-side state of one assistant message being (or having been) produced."""

    item_id: str
    output_index: int
    text_mode: bool
    words: tuple[str, ...]
    speech: SpeechStream | None
    samples_sent: int = 0
    words_sent: int = 0
    part_open: bool = False
    done: bool = False
    status: str = "in_progress"
    truncated_ms: int | None = None
    #: The output format of the response this message belongs to.
    fmt: AudioFormat = PCM16
    # G.711 output only: the encoder, how far the speech was fed into it
    # (24 kHz samples), encoded bytes not sent yet, and bytes sent.
    encoder: Transcoder | None = None
    fed: int = 0
    pending: bytearray = attrs.Factory(bytearray)
    bytes_sent: int = 0

    def sent_text(self) -> str:
        return " ".join(self.words[: self.words_sent])

    def produced_ms(self) -> int:
        """Milliseconds of audio sent (or kept by a truncation), in the format it was sent in."""
        if self.truncated_ms is not None:
            return self.truncated_ms
        if not self.fmt.is_g711:
            return self.samples_sent * 1000 // SAMPLE_RATE
        return self.bytes_sent * 1000 // (self.fmt.rate * self.fmt.sample_width)


@attrs.define(eq=False)
class _FunctionCall:
    item_id: str
    output_index: int
    call_id: str
    name: str
    arguments: str
    done: bool = False
    sent: str = ""


@attrs.define(eq=False)
class _Response:
    id: str
    in_band: bool
    obj: dict[str, Any]
    steps: deque[tuple[float, Callable[[], None]]]
    ordinal: int
    withhold_done: bool = False
    finished: bool = False
    messages: list[_Message] = attrs.Factory(list)
    calls: list[_FunctionCall] = attrs.Factory(list)
    input_tokens: int = 0
    announced: bool = True
    idle: bool = False
    #: The output audio format when the response started (a later session.update does not change it).
    fmt: AudioFormat = PCM16


@attrs.define(eq=False)
class SimSession:
    """One simulated Realtime session; see the module docstring for the contract.

    Constructor arguments (all keyword): ``now`` is the connection time (the
    ``session.created`` and ``conversation.created`` events are due then);
    ``index`` distinguishes sessions for IDs and seeds; ``seed`` makes IDs and
    model choices reproducible; ``speed`` paces streaming (1.0 = real time,
    ``None``/0 = no pacing); ``audio_chunk_ms`` is the length of each
    ``response.output_audio.delta``; ``words_per_second`` sets speech and text
    rate; ``max_duration_s`` is when ``session_expired`` is sent (the real
    service: 60 minutes); ``epoch`` is the wall-clock time at ``now``, used
    only for ``expires_at``; ``first_output_ms`` is the model's "thinking"
    time between ``response.created`` and the first output (scaled by
    ``speed`` like all pacing, so 0 when unpaced); ``min_response_ms`` is a
    floor, *not* scaled, on the time from ``response.created`` to
    ``response.done``: with ``speed=None`` it keeps responses in flight long
    enough for a burst of creates to collide, as on the real service.
    """

    now: float = 0.0
    index: int = 0
    seed: int = 0
    model: str = "gpt-realtime"
    speed: float | None = 1.0
    audio_chunk_ms: int = 50
    words_per_second: float = 4.0
    max_duration_s: float = 3600.0
    epoch: float = 1_700_000_000.0
    first_output_ms: float = 250.0
    min_response_ms: float = 0.0
    expiry_message: str = "Your session hit the maximum duration of 60 minutes."
    #: Delay (seconds, not scaled by ``speed``) between a server-VAD turn and
    #: its ``response.created``. Speech that starts within it cancels the
    #: response before it was announced: ``response.done`` (cancelled) for a
    #: response whose ``response.created`` was never sent, as the real
    #: service does around interruptions. 0 announces at once.
    vad_create_delay_s: float = 0.0
    #: With input transcription on, unintelligible audio (not made by the
    #: synthesizer) gives ``...input_audio_transcription.failed`` instead of a
    #: ``.completed`` with an empty transcript. A transcription ``prompt``
    #: containing ``[fail]`` does the same for one session.
    transcription_failures: bool = False

    #: ``(code, reason)`` once the session wants its connection closed (expiry).
    close_request: tuple[int, str] | None = attrs.field(init=False, default=None)
    #: Descriptions of unexpected exceptions turned into ``server_error`` events.
    internal_errors: list[str] = attrs.field(init=False, factory=list)
    _ids: random.Random = attrs.field(init=False)
    _model: ScriptedModel = attrs.field(init=False)
    _ready: list[dict[str, Any]] = attrs.field(init=False, factory=list)
    _last_now: float = attrs.field(init=False)
    _session: dict[str, Any] = attrs.field(init=False)
    _conversation_id: str = attrs.field(init=False)
    _order: list[str] = attrs.field(init=False, factory=list)
    _turn_cache: dict[str, tuple[Any, Any, Turn, int]] = attrs.field(init=False, factory=dict)
    _items: dict[str, dict[str, Any]] = attrs.field(init=False, factory=dict)
    _messages: dict[str, _Message] = attrs.field(init=False, factory=dict)
    _user_audio_ms: dict[str, int] = attrs.field(init=False, factory=dict)
    _responses: list[_Response] = attrs.field(init=False, factory=list)
    _responses_created: int = attrs.field(init=False, default=0)
    _withhold: set[int] = attrs.field(init=False, factory=set)
    _audio_produced: bool = attrs.field(init=False, default=False)
    _vad: EnergyVad = attrs.field(init=False, factory=EnergyVad)
    _carry: bytes = attrs.field(init=False, default=b"")
    _total_samples: int = attrs.field(init=False, default=0)
    _buffer_start_samples: int = attrs.field(init=False, default=0)
    _speech_item_id: str | None = attrs.field(init=False, default=None)
    _speech_start_ms: int = attrs.field(init=False, default=0)
    _expires_at: float = attrs.field(init=False)
    _expired: bool = attrs.field(init=False, default=False)
    _counts: Counter[str] = attrs.field(init=False, factory=Counter)
    _errors: Counter[str] = attrs.field(init=False, factory=Counter)
    _client_events: Counter[str] = attrs.field(init=False, factory=Counter)
    _handler_table: dict[str, Callable[[dict[str, Any], str | None, float], None]] = attrs.field(init=False)
    _later: list[tuple[float, int, Callable[[], None]]] = attrs.field(init=False, factory=list)
    _later_seq: int = attrs.field(init=False, default=0)
    _listener: Listener = attrs.field(init=False, factory=Listener)
    _server_turn: bool = attrs.field(init=False, default=False)
    _mcp_listed: dict[str, str] = attrs.field(init=False, factory=dict)
    _idle_gen: int = attrs.field(init=False, default=0)
    _heard: dict[str, str | None] = attrs.field(init=False, factory=dict)
    _in_fmt: AudioFormat = attrs.field(init=False, default=PCM16)
    # G.711 input: the decoder (None for PCM16, which needs none) and how many
    # 24 kHz samples it produced; it holds back up to ~75 ms, so this trails
    # _total_samples, which counts what arrived.
    _decoder: Transcoder | None = attrs.field(init=False, default=None)
    _decoded_samples: int = attrs.field(init=False, default=0)
    _bytes_in: Counter[str] = attrs.field(init=False, factory=Counter)
    _bytes_out: Counter[str] = attrs.field(init=False, factory=Counter)

    def __attrs_post_init__(self) -> None:
        self._handler_table = self._handlers()  # built once: receive() runs per mic chunk
        self._ids = random.Random(f"ids|{self.seed}|{self.index}")
        self._model = ScriptedModel(seed=self.seed)
        self._last_now = self.now
        self._expires_at = self.now + self.max_duration_s
        self._conversation_id = self._new_id("conv_")
        self._session = {
            "type": "realtime",
            "object": "realtime.session",
            "id": self._new_id("sess_"),
            "model": self.model,
            "output_modalities": ["audio"],
            "instructions": DEFAULT_INSTRUCTIONS,
            "tools": [],
            "tool_choice": "auto",
            "max_output_tokens": "inf",
            "tracing": None,
            "truncation": "auto",
            "include": None,
            "prompt": None,
            "expires_at": int(self.epoch + self.max_duration_s),
            "audio": {
                "input": {
                    "format": dict(_PCM),
                    "transcription": None,
                    "noise_reduction": None,
                    "turn_detection": _default_server_vad(),
                },
                "output": {"format": dict(_PCM), "voice": "marin", "speed": 1.0},
            },
        }
        self._configure_vad()
        # The real GA service sends no conversation.created: session.created comes first.
        self._emit("session.created", session=copy.deepcopy(self._session))

    # ------------------------------------------------------------------ public

    @property
    def session(self) -> dict[str, Any]:
        """A copy of the effective session configuration (as in ``session.updated``)."""
        return copy.deepcopy(self._session)

    @property
    def expired(self) -> bool:
        """True once ``session_expired`` was produced; input is ignored after that."""
        return self._expired

    def receive_raw(self, frame: str | bytes, now: float) -> None:
        """A raw WebSocket frame arrived; text is parsed as JSON, binary is refused.

        Malformed JSON or a non-object gives an ``invalid_json`` error event.
        """
        if isinstance(frame, (bytes, bytearray, memoryview)):
            self._catch_up(now)
            self._client_events["<binary>"] += 1
            self._error(
                _Reject("invalid_event", "Expected a text WebSocket message; binary frames are not supported."),
                None,
            )
            return
        try:
            event = json.loads(frame)
        except ValueError as exc:
            self._catch_up(now)
            self._client_events["<invalid_json>"] += 1
            self._error(_Reject("invalid_json", f"Invalid event: failed to parse JSON value. {exc}."), None)
            return
        self.receive(event, now)

    def receive(self, event: Any, now: float) -> None:
        """Apply one client event received at ``now``. Never raises for bad input.

        Output it causes is returned by the next :meth:`advance` call with a
        time >= ``now``. Ignored once the session expired.
        """
        self._catch_up(now)
        if self._expired:
            return
        if not isinstance(event, dict):
            self._client_events["<invalid_json>"] += 1
            self._error(_Reject("invalid_json", "Client events must be JSON objects."), None)
            return
        etype = event.get("type")
        raw_eid = event.get("event_id")
        eid = raw_eid if isinstance(raw_eid, str) else None
        self._client_events[etype if isinstance(etype, str) else "<missing>"] += 1
        handler = self._handler_table.get(etype) if isinstance(etype, str) else None
        try:
            if etype != "input_audio_buffer.append":
                _check_surrogates(event, "")
            if etype is None:
                raise _missing("type")
            if handler is None:
                raise _bad_value("type", etype, SUPPORTED_CLIENT_EVENTS)
            handler(event, eid, now)
        except _Reject as rej:
            self._error(rej, eid)
        except Exception as exc:
            # Reported like the real service's internal failures, and kept
            # for tests, which assert that this list stays empty.
            self.internal_errors.append(f"{etype}: {exc!r}")
            self._error(
                _Reject("server_error", "The server had an error while processing your request.", type="server_error"),
                eid,
            )

    def advance(self, now: float) -> list[dict[str, Any]]:
        """Return (and forget) every server event due at or before ``now``, in order."""
        self._catch_up(now)
        out, self._ready = self._ready, []
        return out

    def next_due(self) -> float | None:
        """When :meth:`advance` next has something to return; ``None`` if never (idle)."""
        if self._ready:
            return self._last_now
        candidates = [r.steps[0][0] for r in self._responses if r.steps]
        if self._later:
            candidates.append(self._later[0][0])
        if not self._expired:
            candidates.append(self._expires_at)
        return min(candidates) if candidates else None

    def feed(self, event: Any, now: float) -> list[dict[str, Any]]:
        """:meth:`receive` then :meth:`advance` at the same time: the immediate answer."""
        self.receive(event, now)
        return self.advance(now)

    def expire_at(self, when: float) -> None:
        """Move the ``session_expired`` deadline (fault injection, tests)."""
        self._expires_at = when

    def withhold_done(self, nth: int) -> None:
        """Never send ``response.done`` for the ``nth`` response created from now on (1-based).

        That response stays active server-side (it still conflicts with new
        in-band creates); a ``response.cancel`` for it still ends it.
        """
        if nth < 1:
            raise ValueError("nth must be >= 1")
        self._withhold.add(self._responses_created + nth)

    def make_error(
        self, code: str, message: str, *, type: str = "server_error", param: str | None = None
    ) -> dict[str, Any]:
        """Build (and count) an ``error`` event without queueing it (fault injection)."""
        self._errors[code] += 1
        self._counts["server_events"] += 1
        return {
            "type": "error",
            "event_id": self._new_id("event_"),
            "error": {"type": type, "code": code, "message": message, "param": param, "event_id": None},
        }

    def new_event_id(self) -> str:
        """A fresh server ``event_id`` (for events the transport layer makes up)."""
        return self._new_id("event_")

    def active_response_ids(self) -> list[str]:
        """IDs of responses that have not sent ``response.done`` (in-band first)."""
        live = [r for r in self._responses if not r.finished]
        return [r.id for r in live if r.in_band] + [r.id for r in live if not r.in_band]

    def stats(self) -> dict[str, Any]:
        """Counters of this session (see ``Simulator.stats`` for the keys)."""
        counts = dict(self._counts)
        return {
            "responses": counts.get("responses", 0),
            "completed": counts.get("completed", 0),
            "cancelled": counts.get("cancelled", 0),
            "incomplete": counts.get("incomplete", 0),
            "withheld": counts.get("withheld", 0),
            "conflicts": self._errors.get("conversation_already_has_active_response", 0),
            "cancel_not_active": self._errors.get("response_cancel_not_active", 0),
            "truncate_errors": counts.get("truncate_errors", 0),
            "errors": dict(self._errors),
            "client_events": dict(self._client_events),
            "function_calls": counts.get("function_calls", 0),
            "vad_speech_started": counts.get("vad_speech_started", 0),
            "vad_speech_stopped": counts.get("vad_speech_stopped", 0),
            "truncations": counts.get("truncations", 0),
            "server_events": counts.get("server_events", 0),
            "audio_ms_sent": counts.get("audio_samples_sent", 0) * 1000 // SAMPLE_RATE,
            # Bytes of audio by format type ("audio/pcm", "audio/pcmu", "audio/pcma"),
            # received in appends and sent in response.output_audio.delta.
            "audio_bytes_in": dict(self._bytes_in),
            "audio_bytes_out": dict(self._bytes_out),
        }

    # ----------------------------------------------------------------- helpers

    def _new_id(self, prefix: str) -> str:
        # 15 random bytes as 20 base64 characters, mapped onto letters and
        # digits: unique in practice, like the real service's IDs, and cheap.
        return prefix + base64.b64encode(self._ids.randbytes(15)).decode("ascii").translate(_ID_FIX)

    def _schedule(self, when: float, step: Callable[[], None]) -> None:
        """Run ``step`` at ``when`` (session-level timeline, outside any response)."""
        self._later_seq += 1
        heapq.heappush(self._later, (when, self._later_seq, step))

    def _obfuscation(self, delta: str) -> str:
        # The real service pads deltas with a random string (against length
        # side channels); clients must ignore it.
        return base64.b64encode(self._ids.randbytes(6 + (len(delta) * 7) % 9)).decode("ascii").rstrip("=")

    def _emit(self, etype: str, **fields: Any) -> dict[str, Any]:
        event = {"type": etype, "event_id": self._new_id("event_"), **fields}
        self._ready.append(event)
        self._counts["server_events"] += 1
        return event

    def _error(self, rej: _Reject, client_event_id: str | None) -> None:
        self._errors[rej.code or "null"] += 1
        self._emit(
            "error",
            error={
                "type": rej.type,
                "code": rej.code,
                "message": rej.message,
                "param": rej.param,
                "event_id": client_event_id,
            },
        )

    def _catch_up(self, now: float) -> None:
        """Run every scheduled step due at or before ``now``, in due order."""
        if now < self._last_now:
            # A caller clock going backwards must not reorder the stream.
            now = self._last_now
        while True:
            best: _Response | None = None
            for r in self._responses:
                if r.steps and (best is None or r.steps[0][0] < best.steps[0][0]):
                    best = r
            due = best.steps[0][0] if best is not None else math.inf
            if not self._expired and self._expires_at <= min(due, now):
                self._last_now = max(self._last_now, self._expires_at)
                self._expire()
                continue
            if self._later and self._later[0][0] <= min(due, now) and (best is None or self._later[0][0] < due):
                when, _, later = heapq.heappop(self._later)
                self._last_now = max(self._last_now, when)
                if not self._expired:
                    later()
                continue
            if best is None or due > now:
                break
            self._last_now = max(self._last_now, due)
            _, step = best.steps.popleft()
            step()
        self._last_now = now

    def _expire(self) -> None:
        self._expired = True
        for r in self._responses:
            r.steps.clear()
        self._later.clear()
        self._error(_Reject("session_expired", self.expiry_message), None)
        self.close_request = (1000, "session expired")

    def _handlers(self) -> dict[str, Callable[[dict[str, Any], str | None, float], None]]:
        return {
            "session.update": self._on_session_update,
            "input_audio_buffer.append": self._on_append,
            "input_audio_buffer.commit": self._on_commit,
            "input_audio_buffer.clear": self._on_clear,
            "conversation.item.create": self._on_item_create,
            "conversation.item.truncate": self._on_truncate,
            "conversation.item.delete": self._on_item_delete,
            "conversation.item.retrieve": self._on_item_retrieve,
            "response.create": self._on_response_create,
            "response.cancel": self._on_response_cancel,
            "output_audio_buffer.clear": self._on_output_clear,
        }

    def _pace(self, seconds: float) -> float:
        """Scale a stream duration by the pacing speed (0 when unpaced)."""
        return seconds / self.speed if self.speed else 0.0

    def _inband_active(self) -> _Response | None:
        return next((r for r in self._responses if r.in_band and not r.finished), None)

    # ------------------------------------------------------------- session.update

    def _on_session_update(self, event: dict[str, Any], eid: str | None, now: float) -> None:
        patch = event.get("session")
        if patch is None:
            raise _missing("session")
        if not isinstance(patch, dict):
            raise _bad_type("session", "an object", patch)
        if "type" not in patch:
            raise _missing("session.type")
        if patch["type"] != "realtime":
            raise _bad_value("session.type", patch["type"], ["realtime"])
        self._check_unknown(patch)
        new = copy.deepcopy(self._session)
        self._apply_session_patch(new, patch)
        old_voice = self._session["audio"]["output"]["voice"]
        new_voice = new["audio"]["output"]["voice"]
        if new_voice != old_voice and self._audio_produced:
            raise _Reject(
                "cannot_update_voice",
                "Cannot update a conversation's voice if assistant audio is present.",
                "session.audio.output.voice",
            )
        self._session = new
        self._configure_vad()
        in_fmt = format_of(new["audio"]["input"]["format"])
        if in_fmt != self._in_fmt:
            self._switch_input(in_fmt)
        self._emit("session.updated", session=copy.deepcopy(self._session))
        if "tools" in patch:
            self._list_mcp_tools(now)

    def _list_mcp_tools(self, now: float) -> None:
        """Hosted MCP servers new in the session: an mcp_list_tools item, listed asynchronously.

        A ``server_url`` containing ``fail`` is unreachable: ``mcp_list_tools.failed``.
        """
        for tool in self._session["tools"]:
            if tool.get("type") != "mcp":
                continue
            label = str(tool.get("server_label") or "")
            key = json.dumps(tool, sort_keys=True)
            if not label or self._mcp_listed.get(label) == key:
                continue
            self._mcp_listed[label] = key
            item_id = self._new_id("mcpl_")
            item: dict[str, Any] = {"id": item_id, "type": "mcp_list_tools", "server_label": label, "tools": []}
            previous = self._order[-1] if self._order else None
            self._insert_item(copy.deepcopy(item), previous)
            self._emit("conversation.item.added", previous_item_id=previous, item=copy.deepcopy(item))
            self._emit("mcp_list_tools.in_progress", item_id=item_id)
            failed = "fail" in str(tool.get("server_url") or "").lower()
            self._schedule(
                now + self._pace(_MCP_LIST_S), functools.partial(self._mcp_listed_done, item_id, tool, failed)
            )

    def _mcp_listed_done(self, item_id: str, tool: dict[str, Any], failed: bool) -> None:
        if failed:
            self._emit("mcp_list_tools.failed", item_id=item_id)
            return
        allowed = tool.get("allowed_tools")
        names = allowed if isinstance(allowed, list) and allowed else ["search", "fetch"]
        listed = [
            {
                "name": str(n),
                "description": f"{n} on {tool.get('server_label')}",
                "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}},
            }
            for n in names
        ]
        item = self._items.get(item_id)
        if item is None:
            return
        item["tools"] = listed
        self._emit("mcp_list_tools.completed", item_id=item_id)
        self._emit("conversation.item.done", previous_item_id=self._previous_of(item_id), item=copy.deepcopy(item))

    def _check_unknown(self, patch: dict[str, Any]) -> None:
        def unknown(prefix: str, obj: Any, allowed: frozenset[str]) -> None:
            if not isinstance(obj, dict):
                return
            for key in obj:
                if key not in allowed:
                    param = f"{prefix}.{key}"
                    raise _Reject("unknown_parameter", f"Unknown parameter: '{param}'.", param)

        unknown("session", patch, _TOP_FIELDS)
        audio = patch.get("audio")
        unknown("session.audio", audio, _AUDIO_FIELDS)
        if isinstance(audio, dict):
            ain, aout = audio.get("input"), audio.get("output")
            unknown("session.audio.input", ain, _AUDIO_IN_FIELDS)
            unknown("session.audio.output", aout, _AUDIO_OUT_FIELDS)
            if isinstance(ain, dict):
                unknown("session.audio.input.format", ain.get("format"), _FORMAT_FIELDS)
                td = ain.get("turn_detection")
                if isinstance(td, dict):
                    allowed = _SEMANTIC_VAD_FIELDS if td.get("type") == "semantic_vad" else _SERVER_VAD_FIELDS
                    unknown("session.audio.input.turn_detection", td, allowed)
            if isinstance(aout, dict):
                unknown("session.audio.output.format", aout.get("format"), _FORMAT_FIELDS)

    def _apply_session_patch(self, new: dict[str, Any], patch: dict[str, Any]) -> None:
        """Validate ``patch`` and merge it into ``new`` (a copy); raise on the first problem."""
        if "instructions" in patch:
            if not isinstance(patch["instructions"], str):
                raise _bad_type("session.instructions", "a string", patch["instructions"])
            new["instructions"] = patch["instructions"]
        if "output_modalities" in patch:
            new["output_modalities"] = _check_modalities("session.output_modalities", patch["output_modalities"])
        if "tools" in patch:
            new["tools"] = _check_tools("session.tools", patch["tools"])
        if "tool_choice" in patch:
            new["tool_choice"] = _check_tool_choice("session.tool_choice", patch["tool_choice"])
        if "max_output_tokens" in patch:
            new["max_output_tokens"] = _check_max_tokens("session.max_output_tokens", patch["max_output_tokens"])
        for key in ("tracing", "truncation", "prompt", "include", "parallel_tool_calls", "reasoning"):
            if key in patch:
                new[key] = copy.deepcopy(patch[key])
        if "model" in patch:
            if not isinstance(patch["model"], str):
                raise _bad_type("session.model", "a string", patch["model"])
            new["model"] = patch["model"]
        audio = patch.get("audio")
        if audio is None:
            return
        if not isinstance(audio, dict):
            raise _bad_type("session.audio", "an object", audio)
        ain = audio.get("input")
        if ain is not None:
            if not isinstance(ain, dict):
                raise _bad_type("session.audio.input", "an object", ain)
            cur = new["audio"]["input"]
            if "format" in ain:
                cur["format"] = _check_format("session.audio.input.format", ain["format"])
            for key in ("transcription", "noise_reduction"):
                if key in ain:
                    if ain[key] is not None and not isinstance(ain[key], dict):
                        raise _bad_type(f"session.audio.input.{key}", "an object", ain[key])
                    cur[key] = copy.deepcopy(ain[key])
            if "turn_detection" in ain:
                cur["turn_detection"] = _merge_turn_detection(cur["turn_detection"], ain["turn_detection"])
        aout = audio.get("output")
        if aout is not None:
            if not isinstance(aout, dict):
                raise _bad_type("session.audio.output", "an object", aout)
            cur = new["audio"]["output"]
            if "format" in aout:
                cur["format"] = _check_format("session.audio.output.format", aout["format"])
            if "voice" in aout:
                cur["voice"] = _check_voice("session.audio.output.voice", aout["voice"])
            if "speed" in aout:
                sp = aout["speed"]
                if not _is_number(sp):
                    raise _bad_type("session.audio.output.speed", "a number", sp)
                if not 0.25 <= sp <= 1.5:
                    raise _Reject(
                        "invalid_value",
                        f"Invalid 'session.audio.output.speed': {sp}. Expected a value between 0.25 and 1.5.",
                        "session.audio.output.speed",
                    )
                cur["speed"] = float(sp)

    def _configure_vad(self) -> None:
        td = self._session["audio"]["input"]["turn_detection"]
        if not td:
            return
        if td["type"] == "semantic_vad":
            self._vad.configure(
                threshold=0.5,
                prefix_padding_ms=300,
                silence_duration_ms=_EAGERNESS_SILENCE_MS.get(td.get("eagerness") or "auto", 700),
            )
        else:
            self._vad.configure(
                threshold=float(td.get("threshold", 0.5) if td.get("threshold") is not None else 0.5),
                prefix_padding_ms=int(td.get("prefix_padding_ms") or 0),
                silence_duration_ms=int(td.get("silence_duration_ms") or 0),
            )

    # ------------------------------------------------------------- input audio

    def _buffer_ms(self) -> float:
        return (self._total_samples - self._buffer_start_samples) * 1000 / SAMPLE_RATE

    def _switch_input(self, fmt: AudioFormat) -> None:
        """The input format changed: finish the old decoder's audio, then decode (or not) the new way."""
        self._drain_decoder(listen=True)
        self._carry = b""  # half a PCM16 sample cannot start another format's stream
        self._in_fmt = fmt
        self._decoder = Transcoder(fmt, PCM16) if fmt.is_g711 else None
        self._decoded_samples = self._total_samples
        self._listener.near = fmt.is_g711

    def _drain_decoder(self, *, listen: bool) -> None:
        """G.711 input: let out what the decoder holds back and start a fresh stream.

        At a commit or clear (the buffer ends there) and on a format change.
        The VAD hears the rest so its clock stays on real time (its events are
        moot: the caller resets it); the transcriber only when ``listen``.
        """
        if self._decoder is None:
            return
        rest = self._decoder.flush()
        if rest:
            if listen:
                self._listener.feed(rest, self._decoded_samples)
            self._vad.feed(rest)
        self._decoder = Transcoder(self._in_fmt, PCM16)
        self._decoded_samples = self._total_samples

    def _on_append(self, event: dict[str, Any], eid: str | None, now: float) -> None:
        audio = event.get("audio")
        if audio is None:
            raise _missing("audio")
        if not isinstance(audio, str):
            raise _bad_type("audio", "a string", audio)
        try:
            raw = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise _Reject("invalid_value", "Invalid 'audio'. Expected base64-encoded audio bytes.", "audio") from exc
        self._bytes_in[self._in_fmt.type] += len(raw)
        if self._decoder is None:
            # PCM16 24 kHz: what arrived is what the VAD hears, no copy, no conversion.
            data = self._carry + raw
            usable = len(data) - len(data) % 2
            self._carry = data[usable:]
            pcm = data[:usable]
            start = self._total_samples
            self._total_samples += usable // 2
        else:
            # G.711: one byte a sample at 8 kHz, three 24 kHz samples of real time.
            self._total_samples += len(raw) * (SAMPLE_RATE // self._in_fmt.rate)
            pcm = self._decoder.convert(raw)
            start = self._decoded_samples
            self._decoded_samples += len(pcm) // 2
        self._listener.feed(pcm, start)
        td = self._session["audio"]["input"]["turn_detection"]
        if not td:
            return
        for vev in self._vad.feed(pcm):
            if vev.kind == "start":
                self._speech_started(vev.ms, td)
            else:
                self._speech_stopped(vev.ms, td, now)

    def _speech_started(self, start_ms: int, td: Mapping[str, Any]) -> None:
        self._disarm_idle()
        self._speech_item_id = self._new_id("item_")
        self._speech_start_ms = start_ms
        self._counts["vad_speech_started"] += 1
        self._emit("input_audio_buffer.speech_started", audio_start_ms=start_ms, item_id=self._speech_item_id)
        active = self._inband_active()
        if active is not None and td.get("interrupt_response", True):
            self._cancel(active, "turn_detected")

    def _speech_stopped(self, end_ms: int, td: Mapping[str, Any], now: float) -> None:
        item_id = self._speech_item_id or self._new_id("item_")
        self._speech_item_id = None
        self._counts["vad_speech_stopped"] += 1
        self._emit("input_audio_buffer.speech_stopped", audio_end_ms=end_ms, item_id=item_id)
        duration = max(0, end_ms - self._speech_start_ms)
        # The audio after the stop point stays in the buffer for the next turn.
        self._buffer_start_samples = min(self._total_samples, end_ms * SAMPLE_RATE // 1000)
        self._vad.buffer_start_ms = end_ms
        heard = self._listener.take(end_ms * SAMPLE_RATE // 1000)
        self._commit_user_audio(item_id, duration, heard, now)
        if td.get("create_response", True) and self._inband_active() is None:
            self._server_turn = True
            try:
                self._start_response({}, None, now, in_band=True)
            finally:
                self._server_turn = False

    def _commit_user_audio(self, item_id: str, duration_ms: int, heard: str | None, now: float) -> None:
        previous = self._order[-1] if self._order else None
        self._emit("input_audio_buffer.committed", previous_item_id=previous, item_id=item_id)
        item = {
            "id": item_id,
            "type": "message",
            "status": "completed",
            "role": "user",
            "content": [{"type": "input_audio", "transcript": None}],
        }
        self._user_audio_ms[item_id] = duration_ms
        self._heard[item_id] = heard
        self._insert_item(item, previous)
        self._emit("conversation.item.added", previous_item_id=previous, item=copy.deepcopy(item))
        self._emit("conversation.item.done", previous_item_id=previous, item=copy.deepcopy(item))
        self._schedule_transcription(item_id, heard, duration_ms, now)

    # ------------------------------------------------------------- input transcription

    def _schedule_transcription(self, item_id: str, heard: str | None, duration_ms: int, now: float) -> None:
        """Input transcription events, on the timeline after the commit (asynchronous, as for real)."""
        cfg = self._session["audio"]["input"]["transcription"]
        if not isinstance(cfg, dict):
            return
        model = str(cfg.get("model") or "whisper-1")
        t = now + self._pace(_TRANSCRIBE_DELAY_S + duration_ms / 10_000)
        if heard is None and (self.transcription_failures or "[fail]" in str(cfg.get("prompt") or "")):
            self._schedule(t, functools.partial(self._transcription_failed, item_id))
            return
        text = heard or ""
        words = text.split()
        step = self._pace(_TRANSCRIBE_WORD_S)
        for i, word in enumerate(words):
            self._schedule(
                t + i * step, functools.partial(self._transcription_delta, item_id, word if i == 0 else " " + word)
            )
        done = functools.partial(self._transcription_completed, item_id, text, duration_ms, model)
        self._schedule(t + len(words) * step, done)

    def _transcription_delta(self, item_id: str, delta: str) -> None:
        self._emit(
            "conversation.item.input_audio_transcription.delta",
            item_id=item_id,
            content_index=0,
            delta=delta,
            obfuscation=self._obfuscation(delta),
        )

    def _transcription_completed(self, item_id: str, text: str, duration_ms: int, model: str) -> None:
        item = self._items.get(item_id)
        if item is not None:
            item["content"] = [{"type": "input_audio", "transcript": text}]
        usage: dict[str, Any]
        if model == "whisper-1":
            usage = {"type": "duration", "seconds": round(duration_ms / 1000, 3)}
        else:
            audio_tokens = math.ceil(duration_ms / 1000 * _AUDIO_TOKENS_PER_SECOND / 2) + 1
            out = math.ceil(len(text.split()) * _TEXT_TOKENS_PER_WORD)
            usage = {
                "type": "tokens",
                "input_tokens": audio_tokens,
                "output_tokens": out,
                "total_tokens": audio_tokens + out,
                "input_token_details": {"text_tokens": 0, "audio_tokens": audio_tokens},
            }
        self._emit(
            "conversation.item.input_audio_transcription.completed",
            item_id=item_id,
            content_index=0,
            transcript=text,
            usage=usage,
        )

    def _transcription_failed(self, item_id: str) -> None:
        self._emit(
            "conversation.item.input_audio_transcription.failed",
            item_id=item_id,
            content_index=0,
            error={
                "type": "transcription_error",
                "code": "audio_unintelligible",
                "message": "Audio could not be transcribed: no intelligible speech.",
                "param": None,
            },
        )

    def _on_commit(self, event: dict[str, Any], eid: str | None, now: float) -> None:
        ms = self._buffer_ms()
        if ms < _MIN_COMMIT_MS:
            raise _Reject(
                "input_audio_buffer_commit_empty",
                "Error committing input audio buffer: buffer too small. Expected at least 100ms of "
                f"audio, but buffer only has {ms:.2f}ms of audio.",
            )
        item_id = self._speech_item_id or self._new_id("item_")
        self._speech_item_id = None
        self._drain_decoder(listen=True)
        self._buffer_start_samples = self._total_samples
        self._vad.reset()
        self._commit_user_audio(item_id, int(ms), self._listener.take(), now)

    def _on_clear(self, event: dict[str, Any], eid: str | None, now: float) -> None:
        self._drain_decoder(listen=False)
        self._listener.reset()
        self._buffer_start_samples = self._total_samples
        self._speech_item_id = None
        self._vad.reset()
        self._emit("input_audio_buffer.cleared")

    def _on_output_clear(self, event: dict[str, Any], eid: str | None, now: float) -> None:
        # Over a WebSocket there is no server-side output buffer to clear; the
        # real service only acknowledges this on WebRTC/SIP. Accept silently.
        return

    # ------------------------------------------------------------- conversation items

    def _insert_item(self, item: dict[str, Any], previous_id: str | None) -> None:
        if previous_id is None or previous_id == "root":
            pos = 0 if previous_id == "root" else len(self._order)
        else:
            pos = self._order.index(previous_id) + 1
        self._order.insert(pos, item["id"])
        self._items[item["id"]] = item

    def _on_item_create(self, event: dict[str, Any], eid: str | None, now: float) -> None:
        raw = event.get("item")
        if raw is None:
            raise _missing("item")
        if not isinstance(raw, dict):
            raise _bad_type("item", "an object", raw)
        previous = event.get("previous_item_id")
        if previous is not None:
            if not isinstance(previous, str):
                raise _bad_type("previous_item_id", "a string", previous)
            if previous != "root" and previous not in self._items:
                raise _Reject(
                    "invalid_value",
                    f"Invalid 'previous_item_id': no item with id '{previous}' in the conversation.",
                    "previous_item_id",
                )
        item, audio_ms = self._normalize_item(raw, "item")
        if item["id"] in self._items:
            raise _Reject("invalid_value", f"Item with id '{item['id']}' already exists.", "item.id")
        if audio_ms is not None:
            self._user_audio_ms[item["id"]] = audio_ms
            self._heard[item["id"]] = _hear_parts(raw.get("content"), self._in_fmt)
        if previous is None:
            previous = self._order[-1] if self._order else None
        self._insert_item(item, previous)
        prev_out = None if previous == "root" else previous
        self._emit("conversation.item.added", previous_item_id=prev_out, item=copy.deepcopy(item))
        self._emit("conversation.item.done", previous_item_id=prev_out, item=copy.deepcopy(item))

    def _normalize_item(self, raw: dict[str, Any], param: str) -> tuple[dict[str, Any], int | None]:
        """Validate a client item; return the server's view of it and its audio length (ms)."""
        itype = raw.get("type")
        if itype is None:
            raise _missing(f"{param}.type")
        raw_id = raw.get("id")
        if raw_id is not None and not isinstance(raw_id, str):
            raise _bad_type(f"{param}.id", "a string", raw_id)
        item_id = raw_id or self._new_id("item_")
        base = {"id": item_id, "type": itype, "status": "completed"}
        if itype == "function_call_output":
            for key in ("call_id", "output"):
                if key not in raw:
                    raise _missing(f"{param}.{key}")
                if not isinstance(raw[key], str):
                    raise _bad_type(f"{param}.{key}", "a string", raw[key])
            return {**base, "call_id": raw["call_id"], "output": raw["output"]}, None
        if itype == "function_call":
            for key in ("name", "arguments"):
                if key not in raw:
                    raise _missing(f"{param}.{key}")
                if not isinstance(raw[key], str):
                    raise _bad_type(f"{param}.{key}", "a string", raw[key])
            call_id = raw.get("call_id") or self._new_id("call_")
            return {**base, "call_id": call_id, "name": raw["name"], "arguments": raw["arguments"]}, None
        if itype == "mcp_approval_response":
            rid = raw.get("approval_request_id")
            if rid is None:
                raise _missing(f"{param}.approval_request_id")
            if not isinstance(rid, str):
                raise _bad_type(f"{param}.approval_request_id", "a string", rid)
            if "approve" not in raw:
                raise _missing(f"{param}.approve")
            if not isinstance(raw["approve"], bool):
                raise _bad_type(f"{param}.approve", "a boolean", raw["approve"])
            reason = raw.get("reason")
            return {
                "id": item_id,
                "type": itype,
                "approval_request_id": rid,
                "approve": raw["approve"],
                "reason": reason if isinstance(reason, str) else None,
            }, None
        if itype != "message":
            raise _bad_value(
                f"{param}.type", itype, ["message", "function_call", "function_call_output", "mcp_approval_response"]
            )
        role = raw.get("role")
        if role is None:
            raise _missing(f"{param}.role")
        allowed = {
            "user": ("input_text", "input_audio", "input_image"),
            "system": ("input_text",),
            "assistant": ("output_text", "output_audio", "text"),
        }
        if role not in allowed:
            raise _bad_value(f"{param}.role", role, list(allowed))
        content = raw.get("content")
        if content is None:
            raise _missing(f"{param}.content")
        if not isinstance(content, list):
            raise _bad_type(f"{param}.content", "an array", content)
        parts: list[dict[str, Any]] = []
        audio_ms: int | None = None
        for i, part in enumerate(content):
            where = f"{param}.content[{i}]"
            if not isinstance(part, dict):
                raise _bad_type(where, "an object", part)
            ptype = part.get("type")
            if ptype not in allowed[role]:
                raise _bad_value(f"{where}.type", ptype, allowed[role])
            if ptype in ("input_text", "output_text", "text"):
                text = part.get("text", "")
                if not isinstance(text, str):
                    raise _bad_type(f"{where}.text", "a string", text)
                parts.append({"type": "output_text" if ptype == "text" else ptype, "text": text})
            elif ptype == "input_audio":
                audio = part.get("audio", "")
                if not isinstance(audio, str):
                    raise _bad_type(f"{where}.audio", "a string", audio)
                try:
                    n = len(base64.b64decode(audio, validate=True))
                except (binascii.Error, ValueError) as exc:
                    raise _Reject("invalid_value", f"Invalid '{where}.audio': not base64.", f"{where}.audio") from exc
                # Input audio parts are in the session's input format.
                audio_ms = (audio_ms or 0) + n * 1000 // (self._in_fmt.rate * self._in_fmt.sample_width)
                parts.append({"type": "input_audio", "transcript": part.get("transcript")})
            elif ptype == "output_audio":
                parts.append({"type": "output_audio", "transcript": part.get("transcript")})
            else:
                parts.append({"type": ptype, "image_url": part.get("image_url"), "detail": part.get("detail")})
        return {**base, "role": role, "content": parts}, audio_ms

    def _on_item_delete(self, event: dict[str, Any], eid: str | None, now: float) -> None:
        item_id = self._require_str(event, "item_id")
        if item_id not in self._items:
            raise _Reject("item_delete_invalid_item_id", f"Invalid 'item_id': no item with id '{item_id}'.", "item_id")
        self._order.remove(item_id)
        self._turn_cache.pop(item_id, None)
        self._heard.pop(item_id, None)
        del self._items[item_id]
        self._emit("conversation.item.deleted", item_id=item_id)

    def _on_item_retrieve(self, event: dict[str, Any], eid: str | None, now: float) -> None:
        item_id = self._require_str(event, "item_id")
        if item_id not in self._items:
            raise _Reject(
                "item_retrieve_invalid_item_id", f"Invalid 'item_id': no item with id '{item_id}'.", "item_id"
            )
        self._emit("conversation.item.retrieved", item=copy.deepcopy(self._items[item_id]))

    @staticmethod
    def _require_str(event: dict[str, Any], key: str) -> str:
        if key not in event:
            raise _missing(key)
        value = event[key]
        if not isinstance(value, str):
            raise _bad_type(key, "a string", value)
        return value

    @staticmethod
    def _require_int(event: dict[str, Any], key: str) -> int:
        if key not in event:
            raise _missing(key)
        value = event[key]
        if not _is_int(value):
            raise _bad_type(key, "an integer", value)
        return value

    def _on_truncate(self, event: dict[str, Any], eid: str | None, now: float) -> None:
        try:
            item_id = self._require_str(event, "item_id")
            content_index = self._require_int(event, "content_index")
            end_ms = self._require_int(event, "audio_end_ms")
            msg = self._messages.get(item_id)
            if item_id in self._items and (msg is None or msg.text_mode):
                # What the real service answers for a user (or text) item: code null.
                raise _Reject(None, "Only model output audio messages can be truncated", "item_id")
            if msg is None or item_id not in self._items:
                raise _Reject(
                    "item_truncate_invalid_item_id",
                    f"Invalid 'item_id': no assistant audio item with id '{item_id}'.",
                    "item_id",
                )
            if content_index != 0:
                raise _Reject(
                    "invalid_value",
                    f"Invalid 'content_index': item '{item_id}' has no audio content at index {content_index}.",
                    "content_index",
                )
            produced = msg.produced_ms()
            if end_ms < 0:
                raise _Reject(
                    "invalid_value", f"Invalid 'audio_end_ms': {end_ms}. Expected a value >= 0.", "audio_end_ms"
                )
            if end_ms > produced:
                raise _Reject(
                    "invalid_value",
                    f"Audio content of {produced}ms is already shorter than {end_ms}ms",
                    "audio_end_ms",
                )
        except _Reject as rej:
            if rej.code in ("invalid_value", "item_truncate_invalid_item_id", None):
                self._counts["truncate_errors"] += 1
            raise
        msg.truncated_ms = end_ms
        if msg.speech is not None:
            cut = end_ms * SAMPLE_RATE // 1000
            msg.words_sent = min(msg.words_sent, sum(1 for s in msg.speech.word_starts if s < cut))
        self._items[item_id]["content"] = [{"type": "output_audio", "transcript": msg.sent_text()}]
        self._counts["truncations"] += 1
        self._emit("conversation.item.truncated", item_id=item_id, content_index=0, audio_end_ms=end_ms)

    # ------------------------------------------------------------- responses

    def _on_response_create(self, event: dict[str, Any], eid: str | None, now: float) -> None:
        params = event.get("response")
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise _bad_type("response", "an object", params)
        for key in params:
            if key not in _RESPONSE_FIELDS:
                raise _Reject("unknown_parameter", f"Unknown parameter: 'response.{key}'.", f"response.{key}")
        conversation = params.get("conversation", "auto")
        if conversation is not None and not isinstance(conversation, str):
            raise _bad_type("response.conversation", "a string", conversation)
        in_band = conversation != "none"
        if in_band:
            active = self._inband_active()
            if active is not None:
                raise _Reject(
                    "conversation_already_has_active_response",
                    f"Conversation already has an active response in progress: {active.id}. "
                    "Wait until the response is finished before creating a new one.",
                )
        self._start_response(params, eid, now, in_band=in_band)

    def _on_response_cancel(self, event: dict[str, Any], eid: str | None, now: float) -> None:
        rid = event.get("response_id")
        if rid is not None and not isinstance(rid, str):
            raise _bad_type("response_id", "a string", rid)
        if rid:
            target = next((r for r in self._responses if r.id == rid and not r.finished), None)
        else:
            target = self._inband_active()
        if target is None:
            raise _Reject("response_cancel_not_active", "Cancellation failed: no active response found")
        self._cancel(target, "client_cancelled")

    def _context_turns(self, params: Mapping[str, Any]) -> tuple[list[Turn], int]:
        """The model's context and an input-token estimate."""
        raw_input = params.get("input")
        items: list[dict[str, Any]] = []
        if raw_input is None:
            return self._conversation_turns()
        else:
            if not isinstance(raw_input, list):
                raise _bad_type("response.input", "an array", raw_input)
            for i, entry in enumerate(raw_input):
                if not isinstance(entry, dict):
                    raise _bad_type(f"response.input[{i}]", "an object", entry)
                if entry.get("type") == "item_reference":
                    ref = entry.get("id")
                    if ref not in self._items:
                        raise _Reject(
                            "invalid_value",
                            f"Invalid 'response.input[{i}].id': no item with id '{ref}'.",
                            f"response.input[{i}].id",
                        )
                    items.append(self._items[ref])
                else:
                    item, audio_ms = self._normalize_item(entry, f"response.input[{i}]")
                    if audio_ms is not None:
                        self._user_audio_ms[item["id"]] = audio_ms
                    items.append(item)
        turns = [self._turn(it) for it in items]
        return turns, sum(_turn_tokens(t) for t in turns)

    def _conversation_turns(self) -> tuple[list[Turn], int]:
        # Every response reads the whole conversation; converting each item anew
        # made a long session's responses cost O(items) of string work each (a
        # 200-session, 15-minute benchmark slowed the simulator down as it went).
        # An item's turn is reused while the item and its content are the same
        # objects: every change here replaces one or the other.
        turns: list[Turn] = []
        tokens = 0
        cache = self._turn_cache
        for iid in self._order:
            item = self._items[iid]
            hit = cache.get(iid)
            if hit is None or hit[0] is not item or hit[1] is not item.get("content"):
                turn = self._turn(item)
                hit = cache[iid] = (item, item.get("content"), turn, _turn_tokens(turn))
            turns.append(hit[2])
            tokens += hit[3]
        return turns, tokens

    def _turn(self, item: Mapping[str, Any]) -> Turn:
        itype = item.get("type")
        if itype == "function_call":
            return Turn(
                "function_call",
                name=str(item.get("name", "")),
                call_id=str(item.get("call_id", "")),
                arguments=str(item.get("arguments", "")),
            )
        if itype == "function_call_output":
            return Turn(
                "function_call_output", call_id=str(item.get("call_id", "")), output=str(item.get("output", ""))
            )
        if itype == "mcp_call":
            return Turn(
                "mcp_call",
                name=str(item.get("name", "")),
                arguments=str(item.get("server_label", "")),
                output=str(item.get("output") or ""),
            )
        if itype == "mcp_approval_request":
            return Turn(
                "mcp_approval_request",
                name=str(item.get("name", "")),
                arguments=str(item.get("server_label", "")),
                call_id=str(item.get("id", "")),
            )
        if itype == "mcp_approval_response":
            return Turn(
                "mcp_approval_response",
                call_id=str(item.get("approval_request_id", "")),
                output="approve" if item.get("approve") else "deny",
            )
        if itype == "mcp_list_tools":
            return Turn("system")
        texts: list[str] = []
        for part in item.get("content") or []:
            ptype = part.get("type")
            if ptype in ("input_text", "output_text", "text"):
                texts.append(str(part.get("text") or ""))
            elif ptype in ("input_audio", "output_audio"):
                transcript = part.get("transcript")
                heard = self._heard.get(str(item.get("id"))) if ptype == "input_audio" else None
                if transcript:
                    texts.append(str(transcript))
                elif heard:
                    # The model hears the audio, transcription or not.
                    texts.append(heard)
                elif ptype == "input_audio":
                    texts.append(f"(audio {self._user_audio_ms.get(str(item.get('id')), 0)} ms)")
        role = item.get("role")
        kind: TurnKind = role if role in ("user", "assistant", "system") else "system"
        return Turn(kind, text=" ".join(t for t in texts if t))

    def _start_response(self, params: Mapping[str, Any], eid: str | None, now: float, *, in_band: bool) -> None:
        sess = self._session
        modalities = sess["output_modalities"]
        if "output_modalities" in params:
            modalities = _check_modalities("response.output_modalities", params["output_modalities"])
        tools = sess["tools"]
        if "tools" in params:
            tools = _check_tools("response.tools", params["tools"])
        tool_choice = sess["tool_choice"]
        if "tool_choice" in params:
            tool_choice = _check_tool_choice("response.tool_choice", params["tool_choice"])
        instructions = sess["instructions"]
        if "instructions" in params:
            if not isinstance(params["instructions"], str):
                raise _bad_type("response.instructions", "a string", params["instructions"])
            instructions = params["instructions"]
        max_tokens = sess["max_output_tokens"]
        if "max_output_tokens" in params:
            max_tokens = _check_max_tokens("response.max_output_tokens", params["max_output_tokens"])
        metadata = params.get("metadata")
        if metadata is not None:
            if not isinstance(metadata, dict):
                raise _bad_type("response.metadata", "an object", metadata)
            if len(metadata) > _MAX_METADATA:
                raise _Reject(
                    "object_above_max_properties",
                    "Invalid 'response.metadata': too many properties. Expected an object with at most "
                    f"{_MAX_METADATA} properties, but got an object with {len(metadata)} properties instead.",
                    "response.metadata",
                )
            for key, value in metadata.items():
                if not isinstance(value, str):
                    raise _bad_type(f"response.metadata.{key}", "a string", value)
        voice = sess["audio"]["output"]["voice"]
        out_format = sess["audio"]["output"]["format"]
        r_audio = params.get("audio")
        if isinstance(r_audio, dict) and isinstance(r_audio.get("output"), dict):
            if "voice" in r_audio["output"]:
                voice = _check_voice("response.audio.output.voice", r_audio["output"]["voice"])
            if "format" in r_audio["output"]:
                out_format = _check_format("response.audio.output.format", r_audio["output"]["format"])
        turns, input_tokens = self._context_turns(params)

        reply = self._model.reply(instructions=instructions, tools=tools, tool_choice=tool_choice, turns=turns)
        text_mode = modalities == ["text"]
        reply, incomplete = self._apply_token_limit(reply, max_tokens, text_mode)

        self._responses_created += 1
        rid = self._new_id("resp_")
        obj: dict[str, Any] = {
            "object": "realtime.response",
            "id": rid,
            "status": "in_progress",
            "status_details": None,
            "output": [],
            "conversation_id": self._conversation_id if in_band else None,
            "output_modalities": list(modalities),
            "max_output_tokens": max_tokens,
            "audio": {"output": {"format": dict(out_format), "voice": voice}},
            "usage": None,
            "metadata": copy.deepcopy(metadata),
        }
        resp = _Response(
            id=rid,
            in_band=in_band,
            obj=obj,
            steps=deque(),
            ordinal=self._responses_created,
            withhold_done=self._responses_created in self._withhold,
            input_tokens=input_tokens,
            fmt=format_of(out_format),
        )
        self._responses.append(resp)
        self._counts["responses"] += 1
        self._disarm_idle()
        if self._server_turn and self.vad_create_delay_s > 0:
            resp.announced = False
            self._plan(resp, reply, now + self.vad_create_delay_s, text_mode, voice, incomplete)
            resp.steps.appendleft((now + self.vad_create_delay_s, functools.partial(self._announce, resp)))
        else:
            self._emit("response.created", response=copy.deepcopy(obj))
            self._plan(resp, reply, now, text_mode, voice, incomplete)

    def _announce(self, resp: _Response) -> None:
        resp.announced = True
        self._emit("response.created", response=copy.deepcopy(resp.obj))

    def _apply_token_limit(self, reply: Reply, max_tokens: Any, text_mode: bool) -> tuple[Reply, bool]:
        """Cut the reply to ``max_output_tokens``; report whether it was cut."""
        if not _is_int(max_tokens):
            return reply, False
        per_word = _TEXT_TOKENS_PER_WORD + (0 if text_mode else _AUDIO_TOKENS_PER_SECOND / self.words_per_second)
        words = reply.text.split()
        call_tokens = sum(len(c.arguments) // 4 + 4 for c in reply.calls)
        if math.ceil(len(words) * per_word) + call_tokens <= max_tokens:
            return reply, False
        keep = max(1, int(max_tokens / per_word)) if words else 0
        return Reply(text=" ".join(words[:keep]), calls=(), items=reply.items), True

    def _plan(self, resp: _Response, reply: Reply, now: float, text_mode: bool, voice: Any, incomplete: bool) -> None:
        """Schedule the whole stream of ``resp`` as steps with due times."""
        t = now + self._pace(self.first_output_ms / 1000)
        tick = self._pace(self.audio_chunk_ms / 1000)
        add = resp.steps.append
        all_words = tuple(reply.text.split())
        n_items = max(1, min(reply.items, len(all_words)))
        size = math.ceil(len(all_words) / n_items) if all_words else 0
        groups = [all_words[g : g + size] for g in range(0, len(all_words), size)] if size else []
        for mcp in reply.mcp:
            t = self._plan_mcp(resp, mcp, t, tick)
        first = len(reply.mcp)
        for index, words in enumerate(groups):
            t = self._plan_message(resp, first + index, words, t, tick, text_mode, voice)
            if index + 1 < len(groups):
                t += tick
        for call in reply.calls:
            fc = _FunctionCall(
                item_id=self._new_id("item_"),
                output_index=len(resp.messages) + len(resp.calls),
                call_id=self._new_id("call_"),
                name=call.name,
                arguments=call.arguments,
            )
            resp.calls.append(fc)
            t += tick
            add((t, functools.partial(self._call_open, resp, fc)))
            pieces = _split_args(call.arguments)
            for piece in pieces:
                t += tick / 2
                add((t, functools.partial(self._call_delta, resp, fc, piece)))
            add((t, functools.partial(self._call_close, resp, fc)))
        status = "incomplete" if incomplete else "completed"
        t = max(t, now + self.min_response_ms / 1000)
        add((t, lambda: self._finish(resp, status, "max_output_tokens" if incomplete else None)))

    def _plan_mcp(self, resp: _Response, call: McpCall, t: float, tick: float) -> float:
        """Schedule one hosted MCP call (or approval request) item from ``t``; return when it closes."""
        item_id = self._new_id("mcpr_" if call.approval else "mcp_")
        if call.approval:
            item: dict[str, Any] = {
                "id": item_id,
                "type": "mcp_approval_request",
                "server_label": call.server_label,
                "name": call.name,
                "arguments": call.arguments,
            }
            resp.steps.append((t, functools.partial(self._mcp_open, resp, item)))
            resp.steps.append((t, functools.partial(self._mcp_close, resp, item_id, dict(item))))
            return t
        item = {
            "id": item_id,
            "type": "mcp_call",
            "server_label": call.server_label,
            "name": call.name,
            "arguments": "",
            "approval_request_id": call.approval_request_id or None,
            "output": None,
            "error": None,
        }
        final = {**item, "arguments": call.arguments}
        if call.error:
            final["error"] = {"type": "tool_execution_error", "message": call.error}
        else:
            final["output"] = call.output
        resp.steps.append((t, functools.partial(self._mcp_open, resp, item)))
        for piece in _split_args(call.arguments):
            t += tick / 2
            resp.steps.append((t, functools.partial(self._mcp_event, resp, item_id, "arguments.delta", delta=piece)))
        resp.steps.append(
            (t, functools.partial(self._mcp_event, resp, item_id, "arguments.done", arguments=call.arguments))
        )
        resp.steps.append((t, functools.partial(self._mcp_event, resp, item_id, "in_progress")))
        t += tick
        status = "failed" if call.error else "completed"
        resp.steps.append((t, functools.partial(self._mcp_event, resp, item_id, status)))
        resp.steps.append((t, functools.partial(self._mcp_close, resp, item_id, final)))
        return t

    def _mcp_index(self, resp: _Response, item_id: str) -> int:
        return next(i for i, it in enumerate(resp.obj["output"]) if it.get("id") == item_id)

    def _mcp_open(self, resp: _Response, item: dict[str, Any]) -> None:
        index = len(resp.obj["output"])
        resp.obj["output"].append(copy.deepcopy(item))
        self._emit("response.output_item.added", response_id=resp.id, output_index=index, item=copy.deepcopy(item))
        if resp.in_band:
            previous = self._order[-1] if self._order else None
            self._insert_item(copy.deepcopy(item), previous)
            self._emit("conversation.item.added", previous_item_id=previous, item=copy.deepcopy(item))

    def _mcp_event(self, resp: _Response, item_id: str, what: str, **fields: Any) -> None:
        index = self._mcp_index(resp, item_id)
        if what == "arguments.delta":
            fields["obfuscation"] = self._obfuscation(str(fields["delta"]))
        if what.startswith("arguments."):
            etype = "response.mcp_call_arguments." + what.split(".", 1)[1]
            self._emit(etype, response_id=resp.id, item_id=item_id, output_index=index, **fields)
        else:
            self._emit("response.mcp_call." + what, item_id=item_id, output_index=index)

    def _mcp_close(self, resp: _Response, item_id: str, final: dict[str, Any]) -> None:
        index = self._mcp_index(resp, item_id)
        resp.obj["output"][index] = copy.deepcopy(final)
        if resp.in_band and item_id in self._items:
            self._items[item_id] = copy.deepcopy(final)
            self._emit("conversation.item.done", previous_item_id=self._previous_of(item_id), item=copy.deepcopy(final))
        self._emit("response.output_item.done", response_id=resp.id, output_index=index, item=copy.deepcopy(final))

    def _plan_message(
        self,
        resp: _Response,
        index: int,
        words: tuple[str, ...],
        t: float,
        tick: float,
        text_mode: bool,
        voice: Any,
    ) -> float:
        """Schedule one assistant message item from ``t``; return when it closes."""
        add = resp.steps.append
        msg = _Message(
            item_id=self._new_id("item_"),
            output_index=index,
            text_mode=text_mode,
            words=words,
            speech=None,
            fmt=resp.fmt,
        )
        if not text_mode:
            voice_name = voice if isinstance(voice, str) else str(voice.get("id", "marin"))
            msg.speech = SpeechStream(
                " ".join(words),
                voice=voice_name,
                seed=self.seed,
                words_per_second=self.words_per_second,
                speed=float(self._session["audio"]["output"]["speed"]),
            )
        resp.messages.append(msg)
        add((t, lambda: self._msg_open(resp, msg)))
        if text_mode:
            word_s = self._pace(1 / self.words_per_second)
            for _ in range(len(words)):
                add((t + _ * word_s, lambda: self._msg_text_delta(resp, msg)))
            t += (len(words) - 1) * word_s
        else:
            assert msg.speech is not None
            chunk = SAMPLE_RATE * self.audio_chunk_ms // 1000
            n_chunks = max(1, math.ceil(msg.speech.samples / chunk))
            for k in range(n_chunks):
                add((t + k * tick, functools.partial(self._msg_audio_chunk, resp, msg, k, chunk)))
            t += (n_chunks - 1) * tick
        add((t, lambda: self._msg_close(resp, msg, "completed")))
        return t

    def _assistant_item(self, msg: _Message, status: str) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        if status != "in_progress":
            if msg.text_mode:
                content = [{"type": "output_text", "text": msg.sent_text()}]
            else:
                content = [{"type": "output_audio", "transcript": msg.sent_text()}]
        return {
            "id": msg.item_id,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": content,
        }

    def _msg_open(self, resp: _Response, msg: _Message) -> None:
        item = self._assistant_item(msg, "in_progress")
        resp.obj["output"].append(item)
        self._emit(
            "response.output_item.added", response_id=resp.id, output_index=msg.output_index, item=copy.deepcopy(item)
        )
        if resp.in_band:
            previous = self._order[-1] if self._order else None
            self._insert_item(copy.deepcopy(item), previous)
            self._messages[msg.item_id] = msg
            self._emit("conversation.item.added", previous_item_id=previous, item=copy.deepcopy(item))
        part = {"type": "text", "text": ""} if msg.text_mode else {"type": "audio", "transcript": ""}
        msg.part_open = True
        self._emit(
            "response.content_part.added",
            response_id=resp.id,
            item_id=msg.item_id,
            output_index=msg.output_index,
            content_index=0,
            part=part,
        )

    def _loc(self, resp: _Response, msg: _Message) -> dict[str, Any]:
        return {"response_id": resp.id, "item_id": msg.item_id, "output_index": msg.output_index, "content_index": 0}

    def _msg_text_delta(self, resp: _Response, msg: _Message) -> None:
        word = msg.words[msg.words_sent]
        delta = word if msg.words_sent == 0 else " " + word
        msg.words_sent += 1
        self._emit(
            "response.output_text.delta", **self._loc(resp, msg), delta=delta, obfuscation=self._obfuscation(delta)
        )

    def _msg_audio_chunk(self, resp: _Response, msg: _Message, k: int, chunk: int) -> None:
        speech = msg.speech
        assert speech is not None
        lo, hi = k * chunk, min(speech.samples, (k + 1) * chunk)
        # The transcript runs slightly ahead of the audio, as on the real service:
        # a word's text goes out with the chunk where its sound starts.
        while msg.words_sent < len(msg.words) and speech.word_starts[msg.words_sent] < hi:
            word = msg.words[msg.words_sent]
            delta = word if msg.words_sent == 0 else " " + word
            msg.words_sent += 1
            self._emit(
                "response.output_audio_transcript.delta",
                **self._loc(resp, msg),
                delta=delta,
                obfuscation=self._obfuscation(delta),
            )
        payload = self._encoded(msg, hi, chunk) if msg.fmt.is_g711 else speech.read(lo, hi)
        msg.samples_sent = hi
        self._audio_produced = True
        self._counts["audio_samples_sent"] += hi - lo
        self._bytes_out[msg.fmt.type] += len(payload)
        self._emit(
            "response.output_audio.delta",
            **self._loc(resp, msg),
            delta=base64.b64encode(payload).decode("ascii"),
        )

    @staticmethod
    def _encoded(msg: _Message, hi: int, chunk: int) -> bytes:
        """The speech up to sample ``hi``, encoded in the message's (G.711) format, not sent before.

        The encoder's resampler holds back up to ~115 ms and lets it out in
        bursts, so the speech is fed ahead (one chunk at a time) until the
        bytes for ``hi`` are there: each delta then carries exactly its own
        milliseconds, and the last one everything that is left.
        """
        speech = msg.speech
        assert speech is not None
        if msg.encoder is None:
            msg.encoder = Transcoder(PCM16, msg.fmt)
        last = hi >= speech.samples
        want = hi * msg.fmt.rate // SAMPLE_RATE * msg.fmt.sample_width - msg.bytes_sent
        while msg.fed < speech.samples and (last or len(msg.pending) < want):
            step = min(speech.samples, msg.fed + chunk)
            msg.pending += msg.encoder.convert(speech.read(msg.fed, step))
            msg.fed = step
            if step >= speech.samples:
                msg.pending += msg.encoder.flush()
        n = len(msg.pending) if last else max(0, min(len(msg.pending), want))
        out = bytes(msg.pending[:n])
        del msg.pending[:n]
        msg.bytes_sent += n
        return out

    def _msg_close(self, resp: _Response, msg: _Message, status: str) -> None:
        if msg.done:
            return
        msg.done = True
        msg.status = status
        if msg.speech is not None:
            # Only the layout is needed from now on (to cut transcripts on truncate).
            msg.speech.release()
        msg.encoder = None
        msg.pending = bytearray()
        loc = self._loc(resp, msg)
        if msg.part_open:
            msg.part_open = False
            text = msg.sent_text()
            if msg.text_mode:
                self._emit("response.output_text.done", **loc, text=text)
                part = {"type": "text", "text": text}
            else:
                self._emit("response.output_audio.done", **loc)
                self._emit("response.output_audio_transcript.done", **loc, transcript=text)
                part = {"type": "audio", "transcript": text}
            self._emit("response.content_part.done", **loc, part=part)
        item = self._assistant_item(msg, status)
        resp.obj["output"][msg.output_index] = item
        # Real order: conversation.item.done, then response.output_item.done.
        if resp.in_band and msg.item_id in self._items:
            if msg.truncated_ms is None:
                self._items[msg.item_id] = copy.deepcopy(item)
            else:
                self._items[msg.item_id]["status"] = status
            previous = self._previous_of(msg.item_id)
            self._emit(
                "conversation.item.done", previous_item_id=previous, item=copy.deepcopy(self._items[msg.item_id])
            )
        self._emit(
            "response.output_item.done", response_id=resp.id, output_index=msg.output_index, item=copy.deepcopy(item)
        )

    def _previous_of(self, item_id: str) -> str | None:
        pos = self._order.index(item_id)
        return self._order[pos - 1] if pos > 0 else None

    def _call_item(self, fc: _FunctionCall, status: str) -> dict[str, Any]:
        return {
            "id": fc.item_id,
            "type": "function_call",
            "status": status,
            "name": fc.name,
            "call_id": fc.call_id,
            "arguments": fc.arguments if status == "completed" else "",
        }

    def _call_open(self, resp: _Response, fc: _FunctionCall) -> None:
        item = self._call_item(fc, "in_progress")
        fc.output_index = len(resp.obj["output"])
        resp.obj["output"].append(item)
        self._emit(
            "response.output_item.added", response_id=resp.id, output_index=fc.output_index, item=copy.deepcopy(item)
        )
        if resp.in_band:
            previous = self._order[-1] if self._order else None
            self._insert_item(copy.deepcopy(item), previous)
            self._emit("conversation.item.added", previous_item_id=previous, item=copy.deepcopy(item))

    def _call_delta(self, resp: _Response, fc: _FunctionCall, piece: str) -> None:
        fc.sent += piece
        self._emit(
            "response.function_call_arguments.delta",
            response_id=resp.id,
            item_id=fc.item_id,
            output_index=fc.output_index,
            call_id=fc.call_id,
            delta=piece,
        )

    def _call_close(self, resp: _Response, fc: _FunctionCall, status: str = "completed") -> None:
        if fc.done:
            return
        fc.done = True
        if status == "completed" or fc.sent:
            # A call cut by a cancel still reports its arguments so far: the
            # real service sends function_call_arguments.done inside cancelled
            # responses (the item itself ends incomplete).
            if status == "completed":
                self._counts["function_calls"] += 1
            self._emit(
                "response.function_call_arguments.done",
                response_id=resp.id,
                item_id=fc.item_id,
                output_index=fc.output_index,
                call_id=fc.call_id,
                name=fc.name,
                arguments=fc.arguments if status == "completed" else fc.sent,
            )
        item = self._call_item(fc, status)
        resp.obj["output"][fc.output_index] = item
        if resp.in_band and fc.item_id in self._items:
            self._items[fc.item_id] = copy.deepcopy(item)
            self._emit(
                "conversation.item.done", previous_item_id=self._previous_of(fc.item_id), item=copy.deepcopy(item)
            )
        self._emit(
            "response.output_item.done", response_id=resp.id, output_index=fc.output_index, item=copy.deepcopy(item)
        )

    def _usage(self, resp: _Response) -> dict[str, Any]:
        text_tokens = sum(math.ceil(m.words_sent * _TEXT_TOKENS_PER_WORD) for m in resp.messages)
        text_tokens += sum(len(c.arguments) // 4 + 4 for c in resp.calls if c.done)
        audio_tokens = sum(math.ceil(m.samples_sent / SAMPLE_RATE * _AUDIO_TOKENS_PER_SECOND) for m in resp.messages)
        out = text_tokens + audio_tokens
        return {
            "total_tokens": resp.input_tokens + out,
            "input_tokens": resp.input_tokens,
            "output_tokens": out,
            "input_token_details": {
                "text_tokens": resp.input_tokens,
                "audio_tokens": 0,
                "image_tokens": 0,
                "cached_tokens": 0,
                "cached_tokens_details": {"text_tokens": 0, "audio_tokens": 0, "image_tokens": 0},
            },
            "output_token_details": {"text_tokens": text_tokens, "audio_tokens": audio_tokens},
        }

    def _finish(self, resp: _Response, status: str, reason: str | None) -> None:
        """All output is out: send ``response.done`` (unless withheld by a fault)."""
        if resp.withhold_done:
            # Fault: the response never reports done and stays active.
            self._counts["withheld"] += 1
            return
        self._send_done(resp, status, reason)

    def _send_done(self, resp: _Response, status: str, reason: str | None) -> None:
        resp.finished = True
        resp.steps.clear()
        resp.obj["status"] = status
        if status == "completed":
            resp.obj["status_details"] = None
        else:
            resp.obj["status_details"] = {"type": status, "reason": reason}
        resp.obj["usage"] = self._usage(resp)
        self._counts[status] += 1
        self._emit("response.done", response=copy.deepcopy(resp.obj))
        if resp.in_band and not resp.idle:
            self._arm_idle()
        # rate_limits.updated follows response.done (about 40 ms later on the
        # real service), with a tokens entry only.
        used = int(resp.obj["usage"]["total_tokens"])
        self._schedule(self._last_now + self._pace(_RATE_LIMITS_DELAY_S), functools.partial(self._rate_limits, used))
        # Finished responses are only needed for their IDs; keep memory bounded.
        self._responses = [r for r in self._responses if not r.finished]

    def _disarm_idle(self) -> None:
        self._idle_gen += 1

    def _arm_idle(self) -> None:
        """Server VAD ``idle_timeout_ms``: no speech that long after a response -> a new turn.

        Counted from ``response.done`` in session time (not scaled by
        ``speed``); fires once per response, and a response it starts does
        not re-arm it.
        """
        td = self._session["audio"]["input"]["turn_detection"]
        if not td or td.get("type") != "server_vad" or not td.get("idle_timeout_ms"):
            return
        self._idle_gen += 1
        gen = self._idle_gen
        self._schedule(self._last_now + td["idle_timeout_ms"] / 1000, functools.partial(self._idle_timeout, gen))

    def _idle_timeout(self, gen: int) -> None:
        if gen != self._idle_gen or self._vad.speaking or self._inband_active() is not None:
            return
        td = self._session["audio"]["input"]["turn_detection"]
        if not td or not td.get("idle_timeout_ms"):
            return
        item_id = self._new_id("item_")
        start_ms = self._buffer_start_samples * 1000 // SAMPLE_RATE
        end_ms = self._total_samples * 1000 // SAMPLE_RATE
        self._emit(
            "input_audio_buffer.timeout_triggered", audio_start_ms=start_ms, audio_end_ms=end_ms, item_id=item_id
        )
        self._buffer_start_samples = self._total_samples
        self._vad.reset()
        self._commit_user_audio(item_id, end_ms - start_ms, self._listener.take(), self._last_now)
        if td.get("create_response", True):
            self._start_response({}, None, self._last_now, in_band=True)
            live = self._inband_active()
            if live is not None:
                live.idle = True

    def _rate_limits(self, used: int) -> None:
        self._emit(
            "rate_limits.updated",
            rate_limits=[{"name": "tokens", "limit": 40000, "remaining": max(0, 40000 - used), "reset_seconds": 0.3}],
        )

    def _cancel(self, resp: _Response, reason: str) -> None:
        """Stop ``resp`` now: close what is open as incomplete, then ``response.done`` cancelled."""
        resp.steps.clear()
        for msg in resp.messages:
            if not msg.done and resp.obj["output"] and msg.output_index < len(resp.obj["output"]):
                self._msg_close(resp, msg, "incomplete")
        for fc in resp.calls:
            if (
                not fc.done
                and fc.output_index < len(resp.obj["output"])
                and (resp.obj["output"][fc.output_index].get("id") == fc.item_id)
            ):
                self._call_close(resp, fc, "incomplete")
        # Items never announced are dropped from the response.
        self._send_done(resp, "cancelled", reason)


# --------------------------------------------------------------------- checks


def _check_modalities(param: str, value: Any) -> list[str]:
    if not isinstance(value, list):
        raise _bad_type(param, "an array", value)
    if value not in (["audio"], ["text"]):
        raise _Reject(
            "invalid_value",
            f"Invalid value for '{param}': {json.dumps(value)}. Supported combinations are: ['text'] and ['audio'].",
            param,
        )
    return list(value)


def _check_tools(param: str, value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise _bad_type(param, "an array", value)
    tools: list[dict[str, Any]] = []
    for i, tool in enumerate(value):
        where = f"{param}[{i}]"
        if not isinstance(tool, dict):
            raise _bad_type(where, "an object", tool)
        ttype = tool.get("type", "function")
        if ttype not in ("function", "mcp"):
            raise _bad_value(f"{where}.type", ttype, ["function", "mcp"])
        if ttype == "function":
            if "name" not in tool:
                raise _missing(f"{where}.name")
            if not isinstance(tool["name"], str):
                raise _bad_type(f"{where}.name", "a string", tool["name"])
        tools.append({"type": ttype, **{k: copy.deepcopy(v) for k, v in tool.items() if k != "type"}})
    return tools


def _check_tool_choice(param: str, value: Any) -> Any:
    if isinstance(value, str):
        if value not in ("auto", "none", "required"):
            raise _bad_value(param, value, ["auto", "none", "required"])
        return value
    if isinstance(value, dict) and value.get("type") in ("function", "mcp"):
        return copy.deepcopy(value)
    raise _bad_type(param, "a string or an object", value)


def _check_max_tokens(param: str, value: Any) -> int | str:
    if value == "inf":
        return "inf"
    if not _is_int(value):
        raise _bad_type(param, "an integer or 'inf'", value)
    if not 1 <= value <= 4096:
        raise _Reject("invalid_value", f"Invalid '{param}': {value}. Expected a value between 1 and 4096.", param)
    return value


def _check_format(param: str, value: Any) -> dict[str, Any]:
    """A GA audio format object, normalised; the real service's errors otherwise.

    The GA union (``openai.types.realtime.RealtimeAudioFormats``) is
    ``audio/pcm`` (``rate`` 24000 only), ``audio/pcmu`` and ``audio/pcma``
    (no ``rate`` field: 8 kHz is implied, so a ``rate`` there is an unknown
    parameter, as for any field a GA object does not have).
    """
    if not isinstance(value, dict):
        raise _bad_type(param, "an object", value)
    ftype = value.get("type", "audio/pcm")
    if ftype not in _FORMAT_TYPES:
        raise _bad_value(f"{param}.type", ftype, _FORMAT_TYPES)
    if ftype != "audio/pcm":
        if "rate" in value:
            raise _Reject("unknown_parameter", f"Unknown parameter: '{param}.rate'.", f"{param}.rate")
        return {"type": ftype}
    rate = value.get("rate", SAMPLE_RATE)
    if _is_number(rate) and rate < SAMPLE_RATE:
        raise _Reject(
            "integer_below_min_value",
            f"Invalid '{param}.rate': integer below minimum value. Expected a value >= {SAMPLE_RATE}, "
            f"but got {rate} instead.",
            f"{param}.rate",
        )
    if rate != SAMPLE_RATE:
        raise _bad_value(f"{param}.rate", rate, [str(SAMPLE_RATE)])
    return dict(_PCM)


def _hear_parts(content: Any, fmt: AudioFormat) -> str | None:
    """What the synthesized speech in an item's ``input_audio`` parts (in ``fmt``) says (already validated)."""
    heard = []
    for part in content if isinstance(content, list) else []:
        if isinstance(part, dict) and part.get("type") == "input_audio" and not part.get("transcript"):
            audio = base64.b64decode(str(part.get("audio") or ""))
            text = transcribe(convert(audio, fmt, PCM16), near=True) if fmt.is_g711 else transcribe(audio)
            if text:
                heard.append(text)
    return " ".join(heard) or None


def _check_voice(param: str, voice: Any) -> Any:
    if isinstance(voice, dict) and isinstance(voice.get("id"), str):
        return {"id": voice["id"]}
    if not isinstance(voice, str):
        raise _bad_type(param, "a string", voice)
    if voice not in VOICES:
        raise _bad_value(param, voice, VOICES)
    return voice


def _check_surrogates(value: Any, path: str) -> None:
    """A lone UTF-16 surrogate in any string is a client error (the real service: invalid_value)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            param = path or "event"
            raise _Reject(
                "invalid_value",
                f"Invalid '{param}': string contains a lone surrogate at position {exc.start}; "
                "expected valid UTF-8 text.",
                param,
            ) from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_surrogates(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_surrogates(v, f"{path}[{i}]")


def _merge_turn_detection(current: dict[str, Any] | None, value: Any) -> dict[str, Any] | None:
    param = "session.audio.input.turn_detection"
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _bad_type(param, "an object", value)
    ttype = value.get("type")
    if ttype is None:
        raise _missing(f"{param}.type")
    if ttype not in ("server_vad", "semantic_vad"):
        raise _bad_value(f"{param}.type", ttype, ["server_vad", "semantic_vad"])
    base = _default_server_vad() if ttype == "server_vad" else _default_semantic_vad()
    if current is not None and current.get("type") == ttype:
        base = copy.deepcopy(current)
    for key, v in value.items():
        where = f"{param}.{key}"
        if key in ("create_response", "interrupt_response") and not isinstance(v, bool):
            raise _bad_type(where, "a boolean", v)
        if key == "threshold":
            if not _is_number(v):
                raise _bad_type(where, "a number", v)
            if not 0.0 <= v <= 1.0:
                raise _Reject("invalid_value", f"Invalid '{where}': {v}. Expected a value between 0 and 1.", where)
        if key in ("prefix_padding_ms", "silence_duration_ms", "idle_timeout_ms") and v is not None:
            if not _is_int(v):
                raise _bad_type(where, "an integer", v)
            if v < 0:
                raise _Reject("invalid_value", f"Invalid '{where}': {v}. Expected a value >= 0.", where)
        if key == "eagerness" and v not in _EAGERNESS_SILENCE_MS:
            raise _bad_value(where, v, list(_EAGERNESS_SILENCE_MS))
        base[key] = v
    return base


def _split_args(arguments: str) -> list[str]:
    """Split a JSON text into up to three deltas, as streamed by the model."""
    if len(arguments) <= 8:
        return [arguments]
    n = 3
    size = math.ceil(len(arguments) / n)
    return [arguments[i : i + size] for i in range(0, len(arguments), size)]


def _turn_tokens(turn: Turn) -> int:
    """Input-token estimate of one turn (words x tokens per word, plus per-item overhead)."""
    return math.ceil(len((turn.text or turn.arguments or turn.output).split()) * _TEXT_TOKENS_PER_WORD) + 4
