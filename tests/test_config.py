"""The typed GA session config: every field's JSON against openai.types.realtime, checks, and Session wiring."""

from __future__ import annotations

import typing
from typing import Any

import attrs
import pytest
from openai import BaseModel
from openai.types.realtime import RealtimeSessionCreateRequest, SessionUpdateEvent
from openai.types.realtime.realtime_audio_config_output import RealtimeAudioConfigOutput

import rtqueue
from rtqueue import Session, Simulator
from rtqueue.config import (
    GA_SESSION_FIELDS,
    SESSION_CONVENIENCES,
    UNSET,
    VOICES,
    AudioConfig,
    AudioInput,
    AudioOutput,
    CustomVoice,
    NoiseReduction,
    PromptRef,
    RetentionRatio,
    SemanticVad,
    ServerVad,
    SessionConfig,
    Tracing,
    Transcription,
    merge_session,
    session_fields,
)
from rtqueue.errors import InvalidArgument
from rtqueue.formats import PCMA, PCMU
from rtqueue.testing import MockTransport
from tests.utils import UNIT


def inp(**kw: Any) -> SessionConfig:
    return SessionConfig(audio=AudioConfig(input=AudioInput(**kw)))


def out(**kw: Any) -> SessionConfig:
    return SessionConfig(audio=AudioConfig(output=AudioOutput(**kw)))


#: One config per field (and per form of a field): together they set every field of every class.
CASES: dict[str, SessionConfig] = {
    "model": SessionConfig(model="gpt-realtime"),
    "instructions": SessionConfig(instructions="Be brief."),
    "output_modalities_audio": SessionConfig(output_modalities=["audio"]),
    "output_modalities_text": SessionConfig(output_modalities=("text",)),
    "tools": SessionConfig(tools=[{"type": "function", "name": "lookup", "description": "Look up.",
                                   "parameters": {"type": "object", "properties": {}}}]),
    "tool_choice_mode": SessionConfig(tool_choice="required"),
    "tool_choice_function": SessionConfig(tool_choice={"type": "function", "name": "lookup"}),
    "tool_choice_mcp": SessionConfig(tool_choice={"type": "mcp", "server_label": "docs", "name": "search"}),
    "max_output_tokens_int": SessionConfig(max_output_tokens=512),
    "max_output_tokens_inf": SessionConfig(max_output_tokens="inf"),
    "truncation_auto": SessionConfig(truncation="auto"),
    "truncation_disabled": SessionConfig(truncation="disabled"),
    "truncation_retention": SessionConfig(truncation=RetentionRatio(0.8)),
    "truncation_retention_limits": SessionConfig(truncation=RetentionRatio(0.5, post_instructions=8000)),
    "prompt_id": SessionConfig(prompt="pmpt_123"),
    "prompt_full": SessionConfig(prompt=PromptRef("pmpt_123", version="2", variables={
        "city": "Paris", "note": {"type": "input_text", "text": "be kind"}})),
    "tracing_auto": SessionConfig(tracing="auto"),
    "tracing_null": SessionConfig(tracing=None),
    "tracing_object": SessionConfig(tracing=Tracing(workflow_name="desk", group_id="g1", metadata={"k": "v"})),
    "include": SessionConfig(include=["item.input_audio_transcription.logprobs"]),
    "input_format_pcm": inp(format="pcm16"),
    "input_format_pcmu": inp(format=PCMU),
    "noise_near": inp(noise_reduction="near_field"),
    "noise_far_strength": inp(noise_reduction=NoiseReduction("far_field", strength=0.5)),
    "noise_off": inp(noise_reduction=None),
    "transcription_model": inp(transcription="gpt-4o-mini-transcribe"),
    "transcription_full": inp(transcription=Transcription(model="whisper-1", language="en", prompt="names")),
    "transcription_off": inp(transcription=None),
    "server_vad_full": inp(turn_detection=ServerVad(threshold=0.6, prefix_padding_ms=200, silence_duration_ms=400,
                                                    idle_timeout_ms=6000, create_response=False,
                                                    interrupt_response=True)),
    "server_vad_word": inp(turn_detection="server_vad"),
    "semantic_vad_full": inp(turn_detection=SemanticVad(eagerness="low", create_response=True,
                                                        interrupt_response=False)),
    "manual_turns": inp(turn_detection=None),
    "output_format_pcma": out(format=PCMA),
    "voice_marin": out(voice="marin"),
    "voice_cedar": out(voice="cedar"),
    "voice_custom": out(voice=CustomVoice("voice_1234")),
    "speed_min": out(speed=0.25),
    "speed_max": out(speed=1.5),
    "audio_both": SessionConfig(audio=AudioConfig(input=AudioInput(format="pcmu"), output=AudioOutput(format="pcmu"))),
}

CLASSES = (SessionConfig, AudioConfig, AudioInput, AudioOutput, NoiseReduction, Transcription, ServerVad,
           SemanticVad, RetentionRatio, PromptRef, Tracing, CustomVoice)


def assert_no_extras(value: object, path: str = "session") -> None:
    """openai's models accept unknown keys (extra="allow"): fail on any, at any depth."""
    if isinstance(value, BaseModel):
        assert not value.model_extra, f"{path}: fields the GA model does not have: {value.model_extra}"
        for name in type(value).model_fields:
            assert_no_extras(getattr(value, name), f"{path}.{name}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            assert_no_extras(v, f"{path}[{i}]")


def validate_ga(session: dict[str, Any]) -> None:
    """``session`` is a valid GA realtime session and session.update, with no unknown field anywhere."""
    assert_no_extras(RealtimeSessionCreateRequest.model_validate(session))
    event = SessionUpdateEvent.model_validate({"type": "session.update", "session": session})
    assert_no_extras(event.session)


def set_fields(value: object, seen: set[tuple[str, str]]) -> None:
    if not attrs.has(type(value)):
        return
    for f in attrs.fields(type(value)):
        v = getattr(value, f.name)
        if v is not UNSET and (v is not None or f.name in ("turn_detection", "noise_reduction", "transcription",
                                                               "tracing")):
            seen.add((type(value).__name__, f.name))
            set_fields(v, seen)


@pytest.mark.parametrize("name", list(CASES))
def test_each_field_serialises_to_valid_ga_json(name: str):
    """One field's JSON validates against openai.types.realtime, is partial, and parses back to the same value."""
    config = CASES[name]
    data = config.to_dict()
    validate_ga(data)
    given = {f.name for f in attrs.fields(SessionConfig) if getattr(config, f.name) not in (None, UNSET)}
    assert set(data) == {"type"} | given | ({"tracing"} if config.tracing is None else set())
    assert SessionConfig.from_dict(data) == config


def test_the_cases_set_every_field_of_every_class():
    """CASES leaves no field of any config class untested."""
    seen: set[tuple[str, str]] = set()
    for config in CASES.values():
        set_fields(config, seen)
    every = {(cls.__name__, f.name) for cls in CLASSES for f in attrs.fields(cls)}
    assert every - seen == set()


def test_a_whole_config_is_valid_ga_json():
    """Every field at once validates too (and is the union of the single-field JSONs)."""
    config = SessionConfig(
        model="gpt-realtime", instructions="Be brief.", output_modalities=["audio"],
        audio=AudioConfig(
            input=AudioInput(format="pcmu", noise_reduction="far_field", transcription=Transcription(language="en"),
                             turn_detection=SemanticVad(eagerness="high")),
            output=AudioOutput(format="pcmu", voice="cedar", speed=1.2)),
        tools=[{"type": "function", "name": "f", "parameters": {"type": "object"}}], tool_choice="auto",
        max_output_tokens="inf", truncation=RetentionRatio(0.7, 4000), prompt="pmpt_1", tracing="auto",
        include=["item.input_audio_transcription.logprobs"])
    validate_ga(config.to_dict())
    assert config.to_dict()["audio"]["output"] == {"format": {"type": "audio/pcmu"}, "voice": "cedar", "speed": 1.2}


def test_ga_field_lists_match_openai():
    """GA_SESSION_FIELDS and VOICES are exactly what openai.types.realtime lists."""
    assert set(RealtimeSessionCreateRequest.model_fields) == GA_SESSION_FIELDS
    voice = RealtimeAudioConfigOutput.model_fields["voice"].annotation
    literals = {a for arg in typing.get_args(voice) for a in typing.get_args(arg) if isinstance(a, str)}
    assert literals == set(VOICES)


def test_an_rtqueue_tool_is_taken_by_its_definition():
    """tools= takes rtqueue.Tool objects as their GA function definition."""

    @rtqueue.tool
    def lookup(order_id: str) -> str:
        """Look up an order."""
        return order_id

    data = SessionConfig(tools=[lookup]).to_dict()
    validate_ga(data)
    assert data["tools"][0]["name"] == "lookup"


BAD: list[tuple[str, Any, str]] = [
    ("max_output_tokens 0", lambda: SessionConfig(max_output_tokens=0), "SessionConfig.max_output_tokens"),
    ("max_output_tokens big", lambda: SessionConfig(max_output_tokens=5000), "SessionConfig.max_output_tokens"),
    ("max_output_tokens str", lambda: SessionConfig(max_output_tokens="lots"), "SessionConfig.max_output_tokens"),
    ("both modalities", lambda: SessionConfig(output_modalities=["audio", "text"]), "output_modalities"),
    ("bad modality", lambda: SessionConfig(output_modalities=["video"]), "output_modalities"),
    ("modality str", lambda: SessionConfig(output_modalities="audio"), "output_modalities"),
    ("instructions int", lambda: SessionConfig(instructions=3), "SessionConfig.instructions"),
    ("model empty", lambda: SessionConfig(model=""), "SessionConfig.model"),
    ("tool_choice word", lambda: SessionConfig(tool_choice="sometimes"), "SessionConfig.tool_choice"),
    ("tool_choice fn no name", lambda: SessionConfig(tool_choice={"type": "function"}), "SessionConfig.tool_choice"),
    ("tools not list", lambda: SessionConfig(tools={"type": "function"}), "SessionConfig.tools"),
    ("tool no type", lambda: SessionConfig(tools=[{"name": "x"}]), "SessionConfig.tools"),
    ("truncation word", lambda: SessionConfig(truncation="sometimes"), "SessionConfig.truncation"),
    ("retention > 1", lambda: RetentionRatio(1.5), "RetentionRatio.retention_ratio"),
    ("post_instructions 0", lambda: RetentionRatio(0.5, 0), "RetentionRatio.post_instructions"),
    ("truncation dict extra", lambda: SessionConfig(truncation={"type": "retention_ratio", "retention_ratio": 0.5,
                                                                "ratio": 1}), "truncation"),
    ("prompt no id", lambda: PromptRef(""), "PromptRef.id"),
    ("prompt variables", lambda: PromptRef("p", variables={"x": 3}), "PromptRef.variables"),
    ("tracing word", lambda: SessionConfig(tracing="on"), "SessionConfig.tracing"),
    ("tracing extra", lambda: SessionConfig(tracing={"workflow": "x"}), "SessionConfig.tracing"),
    ("tracing metadata", lambda: Tracing(metadata="x"), "Tracing.metadata"),
    ("include", lambda: SessionConfig(include=["everything"]), "SessionConfig.include"),
    ("noise type", lambda: NoiseReduction("very_far"), "NoiseReduction.type"),
    ("noise strength", lambda: NoiseReduction("near_field", strength=-1), "NoiseReduction.strength"),
    ("transcription language", lambda: Transcription(language="English!"), "Transcription.language"),
    ("transcription model", lambda: Transcription(model=5), "Transcription.model"),
    ("vad threshold", lambda: ServerVad(threshold=1.2), "ServerVad.threshold"),
    ("vad prefix", lambda: ServerVad(prefix_padding_ms=-1), "ServerVad.prefix_padding_ms"),
    ("vad silence float", lambda: ServerVad(silence_duration_ms=2.5), "ServerVad.silence_duration_ms"),
    ("vad idle", lambda: ServerVad(idle_timeout_ms=0), "ServerVad.idle_timeout_ms"),
    ("vad create", lambda: ServerVad(create_response="yes"), "ServerVad.create_response"),
    ("vad interrupt", lambda: ServerVad(interrupt_response=1), "ServerVad.interrupt_response"),
    ("eagerness", lambda: SemanticVad(eagerness="eager"), "SemanticVad.eagerness"),
    ("semantic create", lambda: SemanticVad(create_response="no"), "SemanticVad.create_response"),
    ("semantic interrupt", lambda: SemanticVad(interrupt_response=0), "SemanticVad.interrupt_response"),
    ("td word", lambda: AudioInput(turn_detection="sometimes"), "turn_detection"),
    ("td type", lambda: AudioInput(turn_detection={"type": "client_vad"}), "turn_detection"),
    ("td semantic has no threshold", lambda: AudioInput(turn_detection={"type": "semantic_vad", "threshold": 0.5}),
     "turn_detection"),
    ("input format", lambda: AudioInput(format="mp3"), "audio format"),
    ("output format rate", lambda: AudioOutput(format={"type": "audio/pcm", "rate": 16000}), "24000"),
    ("voice", lambda: AudioOutput(voice="robot"), "AudioOutput.voice"),
    ("custom voice", lambda: CustomVoice(""), "CustomVoice.id"),
    ("speed low", lambda: AudioOutput(speed=0.1), "AudioOutput.speed"),
    ("speed high", lambda: AudioOutput(speed=2), "AudioOutput.speed"),
    ("speed nan", lambda: AudioOutput(speed=float("nan")), "AudioOutput.speed"),
    ("audio dict extra", lambda: SessionConfig(audio={"inputs": {}}), "SessionConfig.audio"),
    ("input dict extra", lambda: AudioConfig(input={"vad": True}), "AudioConfig.input"),
    ("from_dict untyped", lambda: SessionConfig.from_dict({"type": "realtime", "reasoning": {}}), "reasoning"),
    ("from_dict type", lambda: SessionConfig.from_dict({"type": "transcription"}), "realtime"),
]


@pytest.mark.parametrize(("case", "make", "names"), BAD, ids=[b[0] for b in BAD])
def test_bad_values_raise_invalid_argument_naming_the_field(case: str, make: Any, names: str):
    """Each bad value raises InvalidArgument whose message names the field."""
    with pytest.raises(InvalidArgument) as info:
        make()
    assert names in str(info.value), str(info.value)


def test_values_are_frozen():
    """Config values cannot be changed after they are made."""
    config = SessionConfig(instructions="x")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        config.instructions = "y"  # type: ignore[misc]


@pytest.mark.parametrize(("fields", "expected"), [
    ({"voice": "cedar"}, {"audio": {"output": {"voice": "cedar"}}}),
    ({"voice": {"id": "voice_1"}}, {"audio": {"output": {"voice": {"id": "voice_1"}}}}),
    ({"speed": 1.25}, {"audio": {"output": {"speed": 1.25}}}),
    ({"input_format": "pcmu"}, {"audio": {"input": {"format": {"type": "audio/pcmu"}}}}),
    ({"output_format": PCMA}, {"audio": {"output": {"format": {"type": "audio/pcma"}}}}),
    ({"audio_format": "pcmu"}, {"audio": {"input": {"format": {"type": "audio/pcmu"}},
                                          "output": {"format": {"type": "audio/pcmu"}}}}),
    ({"audio_format": ("pcm16", "pcmu")}, {"audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}},
                                                     "output": {"format": {"type": "audio/pcmu"}}}}),
    ({"turn_detection": "semantic_vad"}, {"audio": {"input": {"turn_detection": {
        "type": "semantic_vad", "create_response": True, "interrupt_response": True}}}}),
    ({"turn_detection": ServerVad(idle_timeout_ms=5000)}, {"audio": {"input": {"turn_detection": {
        "type": "server_vad", "idle_timeout_ms": 5000}}}}),
    ({"turn_detection": None}, {"audio": {"input": {"turn_detection": None}}}),
    ({"noise_reduction": "near_field"}, {"audio": {"input": {"noise_reduction": {"type": "near_field"}}}}),
    ({"noise_reduction": None}, {"audio": {"input": {"noise_reduction": None}}}),
    ({"transcription": "whisper-1"}, {"audio": {"input": {"transcription": {"model": "whisper-1"}}}}),
    ({"transcription": None}, {"audio": {"input": {"transcription": None}}}),
    ({"voice": None, "speed": None}, {}),
])
def test_conveniences_map_to_their_ga_paths(fields: dict[str, Any], expected: dict[str, Any]):
    """Each update() convenience lands at its GA path, and the result is valid GA JSON."""
    conveniences, raw = session_fields(fields)
    assert conveniences == expected and raw == {}
    validate_ga({"type": "realtime", **conveniences})


def test_convenience_names_are_not_ga_fields():
    """No convenience shadows a GA top-level field."""
    assert not set(SESSION_CONVENIENCES) & GA_SESSION_FIELDS


@pytest.mark.parametrize("fields", [{"not_a_field": 1}, {"modalities": ["text"]}, {"type": "transcription"},
                                    {"voice": "robot"}, {"speed": 9}, {"audio_format": "mp3"},
                                    {"turn_detection": "always"}, {"noise_reduction": "loud"}])
def test_bad_update_fields_raise_before_anything_is_sent(fields: dict[str, Any]):
    """A name that is no GA field or convenience, or a bad convenience value, raises InvalidArgument."""
    with pytest.raises(InvalidArgument):
        session_fields(fields)


def test_merge_replaces_a_turn_detection_of_another_type():
    """Merging layers never mixes server_vad and semantic_vad fields; same-type layers merge."""
    base = {"audio": {"input": {"turn_detection": {"type": "server_vad", "threshold": 0.7}, "format": {}}}}
    other = merge_session(base, {"audio": {"input": {"turn_detection": {"type": "semantic_vad"}}}})
    assert other["audio"]["input"] == {"turn_detection": {"type": "semantic_vad"}, "format": {}}
    more = {"type": "server_vad", "idle_timeout_ms": 5000}
    same = merge_session(base, {"audio": {"input": {"turn_detection": more}}})
    assert same["audio"]["input"]["turn_detection"] == {"type": "server_vad", "threshold": 0.7, "idle_timeout_ms": 5000}


# -- Session.connect / Session.update ------------------------------------------------------------------


def test_connect_with_a_typed_config_configures_the_server(sim: Simulator):
    """connect(config=...) sends the typed fields; explicit arguments and session= override them."""
    config = SessionConfig(
        instructions="from config", max_output_tokens=300, truncation=RetentionRatio(0.8, 6000),
        tracing=Tracing(workflow_name="desk"),
        audio=AudioConfig(input=AudioInput(noise_reduction="far_field", transcription=Transcription(
            model="gpt-4o-mini-transcribe", language="en"), turn_detection=SemanticVad(eagerness="low")),
            output=AudioOutput(voice="cedar", speed=1.1)))
    with Session.connect(url=sim.url, config=config, voice="marin", session={"max_output_tokens": 200}) as session:
        cfg = session.session_config
        assert cfg["instructions"] == "from config"
        assert cfg["max_output_tokens"] == 200  # session= is merged last
        assert cfg["audio"]["output"] == {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "marin",
                                          "speed": 1.1}  # voice= beats the config's voice
        ain = cfg["audio"]["input"]
        assert ain["noise_reduction"] == {"type": "far_field"}
        assert ain["transcription"] == {"model": "gpt-4o-mini-transcribe", "language": "en"}
        assert ain["turn_detection"]["type"] == "semantic_vad" and ain["turn_detection"]["eagerness"] == "low"
        assert cfg["truncation"] == {"type": "retention_ratio", "retention_ratio": 0.8,
                                     "token_limits": {"post_instructions": 6000}}
        assert cfg["tracing"] == {"workflow_name": "desk"}
        sent = sim.client_events(0)[0]
        validate_ga(sent["session"])
        assert session.ask("hello", timeout=UNIT).status == "completed"
    assert sim.stats()["errors"] == {}


def test_connect_config_as_a_ga_dict_is_checked_like_the_typed_one(sim: Simulator):
    """connect(config={...}) parses the dict strictly: a bad value raises before connecting."""
    with pytest.raises(InvalidArgument, match=r"ServerVad\.threshold"):
        Session.connect(url=sim.url, config={"audio": {"input": {"turn_detection": {"type": "server_vad",
                                                                                     "threshold": 3}}}})
    with pytest.raises(InvalidArgument, match="config must be"):
        Session.connect(url=sim.url, config=42)  # type: ignore[arg-type]
    assert sim.stats()["sessions"] == 0


def test_update_voice_goes_to_audio_output_voice(sim: Simulator):
    """update(voice=...) (rejected as session.voice before) changes audio.output.voice."""
    with Session.connect(url=sim.url) as session:
        cfg = session.update(voice="cedar", speed=1.3, noise_reduction="near_field", transcription="whisper-1",
                             turn_detection=ServerVad(idle_timeout_ms=6000, silence_duration_ms=300))
        assert isinstance(cfg, dict)
        assert cfg["audio"]["output"]["voice"] == "cedar" and cfg["audio"]["output"]["speed"] == 1.3
        ain = cfg["audio"]["input"]
        assert ain["noise_reduction"] == {"type": "near_field"} and ain["transcription"] == {"model": "whisper-1"}
        assert ain["turn_detection"]["idle_timeout_ms"] == 6000
        assert ain["turn_detection"]["silence_duration_ms"] == 300
        cfg = session.update(turn_detection=None, noise_reduction=None)
        assert isinstance(cfg, dict)
        assert cfg["audio"]["input"]["turn_detection"] is None and cfg["audio"]["input"]["noise_reduction"] is None
        for event in sim.client_events(0):
            if event["type"] == "session.update":
                validate_ga(event["session"])
    assert sim.stats()["errors"] == {}


def test_update_takes_a_typed_config_and_keeps_it_partial(sim: Simulator):
    """update(SessionConfig(...)) sends only the fields set; keyword fields and a raw dict merge after it."""
    with Session.connect(url=sim.url, instructions="first", config=SessionConfig(max_output_tokens=100)) as session:
        session.update(SessionConfig(truncation="disabled", audio=AudioConfig(output=AudioOutput(speed=0.8))),
                       instructions="second")
        sent = [e for e in sim.client_events(0) if e["type"] == "session.update"][-1]["session"]
        assert sent == {"type": "realtime", "truncation": "disabled", "audio": {"output": {"speed": 0.8}},
                        "instructions": "second"}
        cfg = session.session_config
        assert cfg["max_output_tokens"] == 100 and cfg["instructions"] == "second" and cfg["truncation"] == "disabled"
        session.update({"instructions": "raw wins", "audio": {"output": {"speed": 1.0}}}, speed=1.4)
        cfg = session.session_config
        assert cfg["instructions"] == "raw wins" and cfg["audio"]["output"]["speed"] == 1.0


def test_update_refuses_unknown_names_before_sending():
    """update(not_a_field=...) raises InvalidArgument naming it, and no session.update goes out."""
    mock = MockTransport()
    with Session.connect(transport=mock, reconnect=False) as session:
        before = len(mock.sent_of("session.update"))
        with pytest.raises(InvalidArgument, match="not_a_field") as info:
            session.update(not_a_field=1)
        assert "voice -> audio.output.voice" in str(info.value)
        with pytest.raises(InvalidArgument, match=r"AudioOutput\.voice"):
            session.update(voice="robot")
        with pytest.raises(InvalidArgument, match=r"update\(\) takes"):
            session.update(42)  # type: ignore[arg-type]
        assert session.update(instructions="ok", timeout=UNIT)["instructions"] == "ok"  # type: ignore[index]
        assert len(mock.sent_of("session.update")) == before + 1


def test_low_level_start_takes_a_typed_config():
    """Session(...).start(SessionConfig) sends its JSON as the first session.update."""
    mock = MockTransport()
    session = Session(lambda: mock).start(SessionConfig(instructions="typed", max_output_tokens=64), timeout=UNIT)
    with session:
        first = mock.sent_of("session.update")[0]["session"]
        assert first == {"type": "realtime", "instructions": "typed", "max_output_tokens": 64}
