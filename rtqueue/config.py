"""The GA session configuration as typed, validated, immutable values.

:class:`SessionConfig` mirrors the GA ``session`` object of ``session.update``
(``openai.types.realtime.RealtimeSessionCreateRequest``)::

    SessionConfig(
        instructions="Be brief.",
        audio=AudioConfig(
            input=AudioInput(format="pcmu", noise_reduction=NoiseReduction("far_field"),
                             transcription=Transcription(model="gpt-4o-mini-transcribe", language="en"),
                             turn_detection=SemanticVad(eagerness="low")),
            output=AudioOutput(format="pcmu", voice="marin", speed=1.1),
        ),
        max_output_tokens=512,
        truncation=RetentionRatio(0.8, post_instructions=8000),
    )

Every value checks itself when made and raises
:class:`~rtqueue.errors.InvalidArgument` naming the field (``ServerVad.threshold
must be ...``), so a bad configuration fails in the app's own call, before
anything is sent. Nested fields also take their GA dict form (``{"type":
"server_vad", "threshold": 0.6}``), parsed strictly: an unknown key is an error
too.

:meth:`SessionConfig.to_dict` gives the GA JSON with only the fields that were
set, so a config made for an update stays a partial update. A field left out is
omitted; where GA gives ``null`` a meaning (``turn_detection=None``: manual
turns; ``noise_reduction=None`` and ``transcription=None``: off;
``tracing=None``: no traces) ``None`` sends ``null``, and the default is
:data:`UNSET`. For the other fields ``None`` means "not set".

:func:`session_fields` turns the top-level conveniences that
:meth:`Session.update <rtqueue.Session.update>` accepts (``voice``, ``speed``,
``audio_format``, ``turn_detection``...) into their GA paths and refuses any
name that is neither a convenience nor a GA session field.

Pure: no threads, no I/O (the sans-I/O cores may import it).
"""

from __future__ import annotations

import copy
import enum
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, Literal, TypeVar, cast

import attrs

from .errors import InvalidArgument
from .formats import AudioFormat, format_of

__all__ = [
    "GA_SESSION_FIELDS",
    "SESSION_CONVENIENCES",
    "UNSET",
    "VOICES",
    "AudioConfig",
    "AudioInput",
    "AudioOutput",
    "CustomVoice",
    "NoiseReduction",
    "PromptRef",
    "RetentionRatio",
    "SemanticVad",
    "ServerVad",
    "SessionConfig",
    "Tracing",
    "Transcription",
    "merge_session",
    "session_fields",
    "turn_detection_of",
]


class Unset(enum.Enum):
    """The type of :data:`UNSET`: "leave this field out" where ``None`` means GA ``null``."""

    UNSET = "UNSET"

    def __repr__(self) -> str:
        return "UNSET"


#: A field not set (omitted from the JSON), distinct from ``None`` (sent as ``null``).
UNSET: Final = Unset.UNSET

#: The GA built-in voices (``marin`` and ``cedar`` are the recommended ones).
VOICES: Final = ("alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar")

#: Top-level fields of the GA realtime session (``RealtimeSessionCreateRequest``).
GA_SESSION_FIELDS: Final = frozenset({
    "type", "model", "instructions", "output_modalities", "audio", "tools", "tool_choice", "max_output_tokens",
    "tracing", "truncation", "include", "prompt", "parallel_tool_calls", "reasoning",
})

#: Top-level conveniences of ``Session.update`` and where they go in the GA session.
SESSION_CONVENIENCES: Final = {
    "voice": "audio.output.voice",
    "speed": "audio.output.speed",
    "output_format": "audio.output.format",
    "input_format": "audio.input.format",
    "audio_format": "audio.input.format and audio.output.format",
    "turn_detection": "audio.input.turn_detection",
    "noise_reduction": "audio.input.noise_reduction",
    "transcription": "audio.input.transcription",
}

_NOISE_TYPES = ("near_field", "far_field")
_EAGERNESS = ("low", "medium", "high", "auto")
_MODALITIES = ("audio", "text")
_TOOL_CHOICES = ("auto", "none", "required")
_INCLUDE = ("item.input_audio_transcription.logprobs",)
_MAX_OUTPUT_TOKENS = 4096
#: Conveniences where ``None`` means GA ``null`` (off / manual turns); for the others it means "not set".
_NULLABLE = frozenset({"turn_detection", "noise_reduction", "transcription"})
_LANGUAGE = re.compile(r"[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})*")

_T = TypeVar("_T")


# -- checks ------------------------------------------------------------------------------------------


def _fail(where: str, message: str) -> InvalidArgument:
    return InvalidArgument(f"{where} {message}")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_str(where: str, v: object, *, empty: bool = True) -> None:
    if v is not None and (not isinstance(v, str) or (not empty and not v)):
        raise _fail(where, f"must be a {'' if empty else 'non-empty '}str, not {v!r}")


def _check_bool(where: str, v: object) -> None:
    if v is not None and not isinstance(v, bool):
        raise _fail(where, f"must be True or False, not {v!r}")


def _check_int(where: str, v: object, lo: int, hi: int | None = None) -> None:
    if v is None:
        return
    if not _is_int(v) or v < lo or (hi is not None and v > hi):  # type: ignore[operator]
        span = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise _fail(where, f"must be an int {span} (milliseconds), not {v!r}" if where.endswith("_ms")
                    else f"must be an int {span}, not {v!r}")


def _check_number(where: str, v: object, lo: float, hi: float) -> None:
    if v is not None and (not _is_number(v) or not lo <= v <= hi):  # type: ignore[operator]
        raise _fail(where, f"must be a number between {lo} and {hi}, not {v!r}")


def _check_choice(where: str, v: object, choices: Iterable[str]) -> None:
    options = tuple(choices)
    if v is not None and v not in options:
        raise _fail(where, f"must be one of {', '.join(repr(c) for c in options)}, not {v!r}")


def _put(out: dict[str, Any], key: str, value: Any) -> None:
    """Add ``value`` unless it is "not set"; typed values go in as their GA JSON."""
    if value is None or value is UNSET:
        return
    out[key] = _json(value)


def _put_nullable(out: dict[str, Any], key: str, value: Any) -> None:
    """Add ``value``, ``None`` as GA ``null``; :data:`UNSET` is left out."""
    if value is not UNSET:
        out[key] = None if value is None else _json(value)


def _json(value: Any) -> Any:
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    if isinstance(value, AudioFormat):
        return value.to_config()
    if isinstance(value, (tuple, list)):
        return [_json(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _json(v) for k, v in value.items()}
    return value


def _parse(cls: type[_T], value: object, where: str, *, tag: str | None = None) -> _T:
    """``value`` if it is a ``cls`` already, else its GA dict form parsed strictly (unknown keys refused)."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise _fail(where, f"must be a {cls.__name__} or its GA dict, not {value!r}")
    data = dict(value)
    if tag is not None:
        kind = data.pop("type", tag)
        if kind != tag:
            raise _fail(where, f'"type" must be {tag!r}, not {kind!r}')
    names = [f.name for f in attrs.fields(cast(Any, cls))]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise _fail(where, f"has no field {', '.join(map(repr, unknown))} (it takes {', '.join(names)})")
    make: Callable[..., _T] = cls
    return make(**data)


# -- audio input -------------------------------------------------------------------------------------


@attrs.frozen
class NoiseReduction:
    """Input noise reduction: ``near_field`` (headsets) or ``far_field`` (laptop and room microphones).

    ``strength`` (optional, > 0) scales the suppression; the service's default is 1.
    """

    type: Literal["near_field", "far_field"]
    strength: float | None = None

    def __attrs_post_init__(self) -> None:
        _check_choice("NoiseReduction.type", self.type, _NOISE_TYPES)
        if self.strength is not None and (not _is_number(self.strength) or self.strength <= 0):
            raise _fail("NoiseReduction.strength", f"must be a number > 0, not {self.strength!r}")

    def to_dict(self) -> dict[str, Any]:
        """GA ``audio.input.noise_reduction``."""
        out: dict[str, Any] = {"type": self.type}
        _put(out, "strength", self.strength)
        return out


@attrs.frozen
class Transcription:
    """Input audio transcription: ``model`` (e.g. ``"gpt-4o-mini-transcribe"``, ``"whisper-1"``),
    ``language`` (ISO-639-1, e.g. ``"en"``) and a ``prompt`` guiding it. All optional."""

    model: str | None = None
    language: str | None = None
    prompt: str | None = None

    def __attrs_post_init__(self) -> None:
        _check_str("Transcription.model", self.model, empty=False)
        _check_str("Transcription.prompt", self.prompt)
        if self.language is not None and (not isinstance(self.language, str)
                                          or not _LANGUAGE.fullmatch(self.language)):
            raise _fail("Transcription.language", f'must be an ISO-639-1 code such as "en", not {self.language!r}')

    def to_dict(self) -> dict[str, Any]:
        """GA ``audio.input.transcription``."""
        out: dict[str, Any] = {}
        _put(out, "model", self.model)
        _put(out, "language", self.language)
        _put(out, "prompt", self.prompt)
        return out


@attrs.frozen
class ServerVad:
    """Server voice activity detection; every field optional (the server's defaults apply).

    ``threshold`` 0..1 (default 0.5), ``prefix_padding_ms`` (300) and
    ``silence_duration_ms`` (500) shape the turn; ``idle_timeout_ms`` makes a
    response after that long without speech; ``create_response`` and
    ``interrupt_response`` (both true by default) say whether a turn's end
    makes a response and whether speech cancels the running one.
    """

    threshold: float | None = None
    prefix_padding_ms: int | None = None
    silence_duration_ms: int | None = None
    idle_timeout_ms: int | None = None
    create_response: bool | None = None
    interrupt_response: bool | None = None

    def __attrs_post_init__(self) -> None:
        _check_number("ServerVad.threshold", self.threshold, 0.0, 1.0)
        _check_int("ServerVad.prefix_padding_ms", self.prefix_padding_ms, 0)
        _check_int("ServerVad.silence_duration_ms", self.silence_duration_ms, 0)
        _check_int("ServerVad.idle_timeout_ms", self.idle_timeout_ms, 1)
        _check_bool("ServerVad.create_response", self.create_response)
        _check_bool("ServerVad.interrupt_response", self.interrupt_response)

    def to_dict(self) -> dict[str, Any]:
        """GA ``audio.input.turn_detection`` of type ``server_vad``."""
        out: dict[str, Any] = {"type": "server_vad"}
        for f in attrs.fields(type(self)):
            _put(out, f.name, getattr(self, f.name))
        return out


@attrs.frozen
class SemanticVad:
    """Semantic turn detection: ``eagerness`` ``low``/``medium``/``high``/``auto``
    (how soon the model takes its turn), ``create_response``, ``interrupt_response``."""

    eagerness: Literal["low", "medium", "high", "auto"] | None = None
    create_response: bool | None = None
    interrupt_response: bool | None = None

    def __attrs_post_init__(self) -> None:
        _check_choice("SemanticVad.eagerness", self.eagerness, _EAGERNESS)
        _check_bool("SemanticVad.create_response", self.create_response)
        _check_bool("SemanticVad.interrupt_response", self.interrupt_response)

    def to_dict(self) -> dict[str, Any]:
        """GA ``audio.input.turn_detection`` of type ``semantic_vad``."""
        out: dict[str, Any] = {"type": "semantic_vad"}
        for f in attrs.fields(type(self)):
            _put(out, f.name, getattr(self, f.name))
        return out


TurnDetection = ServerVad | SemanticVad


def turn_detection_of(value: object) -> TurnDetection | Unset | None:
    """A turn detection from a typed value, a GA dict, a word, ``None`` or :data:`UNSET`.

    Words: ``"server_vad"`` and ``"semantic_vad"`` (each with
    ``create_response`` and ``interrupt_response`` on, as ``Session.connect``
    has them), ``"manual"``/``"push_to_talk"`` or ``None`` for no turn
    detection (``null``: the app commits turns).
    """
    if value is UNSET or value is None or isinstance(value, (ServerVad, SemanticVad)):
        return value
    if value in ("manual", "push_to_talk"):
        return None
    if value == "server_vad":
        return ServerVad(create_response=True, interrupt_response=True)
    if value == "semantic_vad":
        return SemanticVad(create_response=True, interrupt_response=True)
    if isinstance(value, Mapping):
        kind = value.get("type")
        if kind == "server_vad":
            return _parse(ServerVad, value, "turn_detection", tag="server_vad")
        if kind == "semantic_vad":
            return _parse(SemanticVad, value, "turn_detection", tag="semantic_vad")
        raise _fail("turn_detection", f'"type" must be "server_vad" or "semantic_vad", not {kind!r}')
    raise _fail("turn_detection", 'must be a ServerVad, a SemanticVad, "server_vad", "semantic_vad", '
                f'"manual", None or a GA dict, not {value!r}')


def _format(value: object) -> AudioFormat | None:
    return None if value is None else format_of(value)


def _noise(value: object) -> NoiseReduction | Unset | None:
    if value is UNSET or value is None or isinstance(value, NoiseReduction):
        return value
    if isinstance(value, str):
        return NoiseReduction(value)  # type: ignore[arg-type]
    return _parse(NoiseReduction, value, "noise_reduction")


def _transcription(value: object) -> Transcription | Unset | None:
    if value is UNSET or value is None or isinstance(value, Transcription):
        return value
    if isinstance(value, str):
        return Transcription(model=value)
    return _parse(Transcription, value, "transcription")


@attrs.frozen
class AudioInput:
    """GA ``audio.input``: ``format`` (a name such as ``"pcmu"``, a GA dict or an
    :class:`~rtqueue.formats.AudioFormat`), ``noise_reduction`` (a
    :class:`NoiseReduction`, ``"near_field"``/``"far_field"``, or ``None`` for
    off), ``transcription`` (a :class:`Transcription`, a model name, or
    ``None`` for off) and ``turn_detection`` (see :func:`turn_detection_of`)."""

    format: AudioFormat | None = attrs.field(default=None, converter=_format)
    noise_reduction: NoiseReduction | Unset | None = attrs.field(default=UNSET, converter=_noise)
    transcription: Transcription | Unset | None = attrs.field(default=UNSET, converter=_transcription)
    turn_detection: TurnDetection | Unset | None = attrs.field(default=UNSET, converter=turn_detection_of)

    def to_dict(self) -> dict[str, Any]:
        """GA ``audio.input`` with only the fields set."""
        out: dict[str, Any] = {}
        _put(out, "format", self.format)
        _put_nullable(out, "noise_reduction", self.noise_reduction)
        _put_nullable(out, "transcription", self.transcription)
        _put_nullable(out, "turn_detection", self.turn_detection)
        return out


@attrs.frozen
class CustomVoice:
    """A custom voice by id (``{"id": "voice_1234"}``)."""

    id: str

    def __attrs_post_init__(self) -> None:
        _check_str("CustomVoice.id", self.id, empty=False)

    def to_dict(self) -> dict[str, Any]:
        """GA ``{"id": ...}``."""
        return {"id": self.id}


def _voice(value: object) -> str | CustomVoice | None:
    if value is None or isinstance(value, CustomVoice):
        return value
    if isinstance(value, Mapping):
        return _parse(CustomVoice, value, "voice")
    if value not in VOICES:
        raise _fail("AudioOutput.voice", f"must be one of {', '.join(VOICES)} or a CustomVoice, not {value!r}")
    return value


@attrs.frozen
class AudioOutput:
    """GA ``audio.output``: ``format``, ``voice`` (one of :data:`VOICES`, or a
    :class:`CustomVoice`; it cannot change once the session has spoken) and
    ``speed`` (0.25 to 1.5; 1.0 is normal)."""

    format: AudioFormat | None = attrs.field(default=None, converter=_format)
    voice: str | CustomVoice | None = attrs.field(default=None, converter=_voice)
    speed: float | None = None

    def __attrs_post_init__(self) -> None:
        _check_number("AudioOutput.speed", self.speed, 0.25, 1.5)

    def to_dict(self) -> dict[str, Any]:
        """GA ``audio.output`` with only the fields set."""
        out: dict[str, Any] = {}
        _put(out, "format", self.format)
        _put(out, "voice", self.voice)
        _put(out, "speed", self.speed)
        return out


def _audio_input(value: object) -> AudioInput | None:
    return None if value is None else _parse(AudioInput, value, "AudioConfig.input")


def _audio_output(value: object) -> AudioOutput | None:
    return None if value is None else _parse(AudioOutput, value, "AudioConfig.output")


@attrs.frozen
class AudioConfig:
    """GA ``audio``: an :class:`AudioInput` and an :class:`AudioOutput` (either may be left out)."""

    input: AudioInput | None = attrs.field(default=None, converter=_audio_input)
    output: AudioOutput | None = attrs.field(default=None, converter=_audio_output)

    def to_dict(self) -> dict[str, Any]:
        """GA ``audio`` with only the parts set."""
        out: dict[str, Any] = {}
        _put(out, "input", self.input)
        _put(out, "output", self.output)
        return out


# -- the rest of the session -------------------------------------------------------------------------


@attrs.frozen
class RetentionRatio:
    """Truncation that keeps ``retention_ratio`` (0..1) of the conversation's tokens when it
    overflows, with an optional ``post_instructions`` token limit (GA ``token_limits``)."""

    retention_ratio: float
    post_instructions: int | None = None

    def __attrs_post_init__(self) -> None:
        _check_number("RetentionRatio.retention_ratio", self.retention_ratio, 0.0, 1.0)
        _check_int("RetentionRatio.post_instructions", self.post_instructions, 1)

    def to_dict(self) -> dict[str, Any]:
        """GA ``truncation`` of type ``retention_ratio``."""
        out: dict[str, Any] = {"type": "retention_ratio", "retention_ratio": self.retention_ratio}
        if self.post_instructions is not None:
            out["token_limits"] = {"post_instructions": self.post_instructions}
        return out

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> RetentionRatio:
        """Parse the GA dict form (strict)."""
        data = dict(value)
        if data.pop("type", "retention_ratio") != "retention_ratio":
            raise _fail("truncation", '"type" must be "retention_ratio"')
        limits = data.pop("token_limits", None) or {}
        if not isinstance(limits, Mapping) or set(limits) - {"post_instructions"}:
            raise _fail("truncation.token_limits", f"takes only post_instructions, not {limits!r}")
        unknown = sorted(set(data) - {"retention_ratio"})
        if unknown or "retention_ratio" not in data:
            raise _fail("truncation", f"takes retention_ratio and token_limits, not {sorted(value)}")
        return cls(data["retention_ratio"], limits.get("post_instructions"))


def _truncation(value: object) -> Literal["auto", "disabled"] | RetentionRatio | None:
    if value is None or value in ("auto", "disabled") or isinstance(value, RetentionRatio):
        return value
    if isinstance(value, Mapping):
        return RetentionRatio.from_dict(value)
    raise _fail("SessionConfig.truncation", f'must be "auto", "disabled" or a RetentionRatio, not {value!r}')


def _copy(value: Any) -> Any:
    """A dict's own deep copy, so the frozen value cannot change under the caller's later edits."""
    return copy.deepcopy(dict(value)) if isinstance(value, Mapping) else value


@attrs.frozen
class PromptRef:
    """A stored prompt: its ``id``, an optional ``version`` and ``variables`` (name ->
    a string, or a GA input object such as ``{"type": "input_text", "text": ...}``)."""

    id: str
    version: str | None = None
    variables: Mapping[str, str | Mapping[str, Any]] | None = attrs.field(default=None, converter=_copy)

    def __attrs_post_init__(self) -> None:
        _check_str("PromptRef.id", self.id, empty=False)
        _check_str("PromptRef.version", self.version, empty=False)
        if self.variables is None:
            return
        if not isinstance(self.variables, Mapping):
            raise _fail("PromptRef.variables", f"must be a dict, not {self.variables!r}")
        for name, val in self.variables.items():
            if not isinstance(name, str) or not (isinstance(val, str) or (
                    isinstance(val, Mapping) and isinstance(val.get("type"), str))):
                raise _fail("PromptRef.variables", f"maps names to a str or a GA input object, not {name!r}: {val!r}")

    def to_dict(self) -> dict[str, Any]:
        """GA ``prompt``."""
        out: dict[str, Any] = {"id": self.id}
        _put(out, "version", self.version)
        _put(out, "variables", self.variables)
        return out


def _prompt(value: object) -> PromptRef | None:
    if value is None or isinstance(value, PromptRef):
        return value
    if isinstance(value, str):
        return PromptRef(value)
    return _parse(PromptRef, value, "SessionConfig.prompt")


@attrs.frozen
class Tracing:
    """OpenAI's traces of the session: ``workflow_name``, ``group_id`` and ``metadata`` (all optional)."""

    workflow_name: str | None = None
    group_id: str | None = None
    metadata: Mapping[str, Any] | None = attrs.field(default=None, converter=_copy)

    def __attrs_post_init__(self) -> None:
        _check_str("Tracing.workflow_name", self.workflow_name)
        _check_str("Tracing.group_id", self.group_id)
        if self.metadata is not None and not isinstance(self.metadata, Mapping):
            raise _fail("Tracing.metadata", f"must be a dict, not {self.metadata!r}")

    def to_dict(self) -> dict[str, Any]:
        """GA ``tracing`` (an object)."""
        out: dict[str, Any] = {}
        _put(out, "workflow_name", self.workflow_name)
        _put(out, "group_id", self.group_id)
        _put(out, "metadata", self.metadata)
        return out


def _tracing(value: object) -> Literal["auto"] | Tracing | Unset | None:
    if value is UNSET or value is None or value == "auto" or isinstance(value, Tracing):
        return value
    if isinstance(value, Mapping):
        return _parse(Tracing, value, "SessionConfig.tracing")
    raise _fail("SessionConfig.tracing", f'must be "auto", a Tracing, a dict or None, not {value!r}')


def _audio(value: object) -> AudioConfig | None:
    return None if value is None else _parse(AudioConfig, value, "SessionConfig.audio")


def _strings(value: object) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        return value  # type: ignore[return-value]  # refused by the check that follows
    return tuple(value)


def _tools(value: object) -> tuple[Mapping[str, Any], ...] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise _fail("SessionConfig.tools", f"must be a list of GA tool dicts, not {value!r}")
    tools: list[Mapping[str, Any]] = []
    for t in value:
        # An rtqueue.Tool (or anything with a GA definition) is taken by its definition.
        definition = getattr(t, "definition", None)
        tool = definition() if callable(definition) else t
        if not isinstance(tool, Mapping) or not isinstance(tool.get("type"), str):
            raise _fail("SessionConfig.tools", f'holds GA tool dicts with a "type", not {t!r}')
        tools.append(copy.deepcopy(dict(tool)))
    return tuple(tools)


@attrs.frozen
class SessionConfig:
    """The GA realtime session, typed; every field optional (see the module docstring).

    ``model``; ``instructions``; ``output_modalities`` (``("audio",)`` or
    ``("text",)``: GA takes one); ``audio`` (an :class:`AudioConfig`);
    ``tools`` (GA tool dicts or :class:`rtqueue.Tool`\\ s); ``tool_choice``
    (``"auto"``, ``"none"``, ``"required"``, or ``{"type": "function",
    "name": ...}`` / ``{"type": "mcp", "server_label": ..., "name": ...}``);
    ``max_output_tokens`` (1 to 4096, or ``"inf"``); ``truncation``
    (``"auto"``, ``"disabled"`` or a :class:`RetentionRatio`); ``prompt`` (a
    :class:`PromptRef` or a prompt id); ``tracing`` (``"auto"``, a
    :class:`Tracing`, or ``None`` for none); ``include`` (e.g.
    ``("item.input_audio_transcription.logprobs",)``).
    """

    model: str | None = None
    instructions: str | None = None
    output_modalities: tuple[Literal["audio", "text"], ...] | None = attrs.field(default=None, converter=_strings)
    audio: AudioConfig | None = attrs.field(default=None, converter=_audio)
    tools: tuple[Mapping[str, Any], ...] | None = attrs.field(default=None, converter=_tools)
    tool_choice: str | Mapping[str, Any] | None = None
    max_output_tokens: int | Literal["inf"] | None = None
    truncation: Literal["auto", "disabled"] | RetentionRatio | None = attrs.field(default=None, converter=_truncation)
    prompt: PromptRef | None = attrs.field(default=None, converter=_prompt)
    tracing: Literal["auto"] | Tracing | Unset | None = attrs.field(default=UNSET, converter=_tracing)
    include: tuple[str, ...] | None = attrs.field(default=None, converter=_strings)

    def __attrs_post_init__(self) -> None:
        _check_str("SessionConfig.model", self.model, empty=False)
        _check_str("SessionConfig.instructions", self.instructions)
        mods = self.output_modalities
        if mods is not None and (not isinstance(mods, tuple) or len(mods) != 1 or mods[0] not in _MODALITIES):
            raise _fail("SessionConfig.output_modalities",
                        f'must be ["audio"] or ["text"] (GA takes one), not {mods!r}')
        self._check_tool_choice()
        mot = self.max_output_tokens
        if mot is not None and mot != "inf" and (not _is_int(mot) or not 1 <= mot <= _MAX_OUTPUT_TOKENS):
            raise _fail("SessionConfig.max_output_tokens", f'must be an int from 1 to {_MAX_OUTPUT_TOKENS} or "inf", '
                        f"not {mot!r}")
        if self.include is not None:
            if not isinstance(self.include, tuple):
                raise _fail("SessionConfig.include", f"must be a list, not {self.include!r}")
            for name in self.include:
                _check_choice("SessionConfig.include", name, _INCLUDE)

    def _check_tool_choice(self) -> None:
        tc = self.tool_choice
        where = "SessionConfig.tool_choice"
        if tc is None or tc in _TOOL_CHOICES:
            return
        if isinstance(tc, Mapping):
            kind, keys = tc.get("type"), set(tc)
            if kind == "function" and keys == {"type", "name"} and isinstance(tc["name"], str) and tc["name"]:
                return
            if kind == "mcp" and "server_label" in tc and keys <= {"type", "server_label", "name"} and all(
                    isinstance(tc[k], str) for k in keys - {"type"}):
                return
        raise _fail(where, 'must be "auto", "none", "required", {"type": "function", "name": ...} or '
                    f'{{"type": "mcp", "server_label": ..., "name": ...}}, not {tc!r}')

    def to_dict(self) -> dict[str, Any]:
        """The GA ``session`` object (``type: "realtime"`` plus only the fields set)."""
        out: dict[str, Any] = {"type": "realtime"}
        for f in attrs.fields(type(self)):
            value = getattr(self, f.name)
            if f.name == "tracing":
                _put_nullable(out, f.name, value)
            elif f.name == "audio":
                audio = value.to_dict() if value is not None else {}
                if audio:
                    out["audio"] = audio
            else:
                _put(out, f.name, value)
        return out

    @classmethod
    def from_dict(cls, session: Mapping[str, Any]) -> SessionConfig:
        """Parse a GA ``session`` object strictly (``type`` must be ``"realtime"`` if given).

        Fields this class does not type (``parallel_tool_calls``,
        ``reasoning``, ...) are refused: pass those as raw dicts.
        """
        return _parse(cls, session, "session", tag="realtime")


# -- update conveniences -----------------------------------------------------------------------------


def _one_format(name: str, value: object) -> dict[str, Any]:
    try:
        return format_of(value).to_config()
    except InvalidArgument as exc:
        raise _fail(name, f"is not an audio format: {exc}") from None


def session_fields(fields: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``Session.update``'s keyword fields: ``(conveniences as GA JSON, raw GA fields)``.

    Conveniences (:data:`SESSION_CONVENIENCES`) are checked and mapped to
    their GA paths (``voice`` -> ``audio.output.voice``, ``audio_format`` ->
    both formats, ``turn_detection="semantic_vad"`` -> a semantic VAD...).
    GA top-level fields (:data:`GA_SESSION_FIELDS`) pass raw. Any other name
    raises :class:`InvalidArgument`, so nothing is sent.
    """
    unknown = sorted(set(fields) - GA_SESSION_FIELDS - set(SESSION_CONVENIENCES))
    if unknown:
        raise InvalidArgument(
            f"not a GA session field: {', '.join(map(repr, unknown))}. "
            f"Use one of {', '.join(sorted(GA_SESSION_FIELDS))}"
            f" or a convenience ({', '.join(f'{k} -> {v}' for k, v in SESSION_CONVENIENCES.items())}); "
            "pass a field rtqueue does not know as a raw dict: update({...})")
    if "type" in fields and fields["type"] != "realtime":
        raise InvalidArgument(f'session type must be "realtime", not {fields["type"]!r}')
    raw = {k: v for k, v in fields.items() if k in GA_SESSION_FIELDS}
    inp: dict[str, Any] = {}
    out: dict[str, Any] = {}
    given = {k: v for k, v in fields.items() if v is not None or k in _NULLABLE}  # None: not set
    if "audio_format" in given:
        value = given["audio_format"]
        pair = value if isinstance(value, tuple) and len(value) == 2 else (value, value)
        inp["format"] = _one_format("audio_format", pair[0])
        out["format"] = _one_format("audio_format", pair[1])
    if "input_format" in given:
        inp["format"] = _one_format("input_format", given["input_format"])
    if "output_format" in given:
        out["format"] = _one_format("output_format", given["output_format"])
    if "voice" in given:
        out["voice"] = _json(_voice(given["voice"]))
    if "speed" in given:
        out.update(AudioOutput(speed=given["speed"]).to_dict())
    typed = AudioInput(
        turn_detection=fields.get("turn_detection", UNSET),
        noise_reduction=fields.get("noise_reduction", UNSET),
        transcription=fields.get("transcription", UNSET),
    )
    inp.update(typed.to_dict())
    audio: dict[str, Any] = {}
    if inp:
        audio["input"] = inp
    if out:
        audio["output"] = out
    return ({"audio": audio} if audio else {}), raw


def merge_session(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated with ``extra`` (neither changed), nested dicts merged.

    A turn detection of another ``type`` replaces the old one whole: merging
    a ``server_vad`` into a ``semantic_vad`` would mix their fields.
    """
    out = dict(base)
    for key, value in extra.items():
        old = out.get(key)
        replace = key == "turn_detection" and isinstance(old, Mapping) and isinstance(value, Mapping) \
            and old.get("type") != value.get("type")
        out[key] = merge_session(old, value) if isinstance(value, Mapping) and isinstance(old, Mapping) \
            and not replace else value
    return out
