"""The scripted model, the speech synthesizer and the energy VAD, in isolation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rtqueue.sim.model import ScriptedModel, Turn
from rtqueue.sim.synth import noise, silence, synthesize
from rtqueue.sim.vad import EnergyVad, threshold_dbfs

TOOLS = [
    {
        "type": "function",
        "name": "lookup_order",
        "description": "Find an order",
        "parameters": {
            "type": "object",
            "properties": {
                "order_id": {"type": "string"},
                "quantity": {"type": "integer"},
                "priority": {"type": "string", "enum": ["high", "low"]},
                "gift": {"type": "boolean"},
            },
            "required": ["order_id", "quantity", "priority", "gift"],
        },
    },
    {
        "type": "function",
        "name": "get_weather",
        "description": "Weather forecast for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
    {"type": "function", "name": "transfer_to_billing_agent", "description": "Hand the customer to billing"},
]


def reply(
    text: str,
    *,
    tools: list[dict[str, object]] = TOOLS,
    choice: object = "auto",
    extra: list[Turn] | None = None,
    instructions: str = "",
) -> tuple[str, list[tuple[str, dict[str, object]]]]:
    turns = [Turn("user", text=text), *(extra or [])]
    r = ScriptedModel(seed=1).reply(instructions=instructions, tools=tools, tool_choice=choice, turns=turns)
    return r.text, [(c.name, json.loads(c.arguments)) for c in r.calls]


def test_name_tokens_match_whole_words() -> None:
    """A tool is called when a name token appears as a whole word (plural-insensitive)."""
    _, calls = reply("Where are my orders 55 and 3?")
    assert calls == [("lookup_order", {"order_id": "55", "quantity": 3, "priority": "high", "gift": True})]
    _, calls = reply("reorder the list")
    assert calls == []


def test_description_keywords_and_place_arguments() -> None:
    """Description words match too; a city argument takes a capitalised word from the text."""
    _, calls = reply("What's the forecast in Lisbon?")
    assert calls == [("get_weather", {"city": "Lisbon"})]


def test_parallel_calls_and_handoff_by_name() -> None:
    """All matching tools are called at once; transfer_to_X matches on X only."""
    text, calls = reply("billing question about order 9 and the weather")
    assert [c[0] for c in calls] == ["lookup_order", "get_weather", "transfer_to_billing_agent"]
    assert text == "Let me check that."
    text, calls = reply("I need billing")
    assert calls == [("transfer_to_billing_agent", {})]
    assert text == "Let me transfer you to billing agent."


def test_each_tool_once_per_user_message_then_summary() -> None:
    """After its call and output, a tool is not called again; the reply summarises outputs."""
    extra = [
        Turn("function_call", name="lookup_order", call_id="c1", arguments="{}"),
        Turn("function_call_output", call_id="c1", output=json.dumps({"status": "delayed", "eta_days": 2})),
    ]
    text, calls = reply("where is order 12", extra=extra)
    assert calls == []
    assert text == "Here is what I found: status delayed, eta_days 2."


def test_tool_choice_modes() -> None:
    """none calls nothing, required calls something, a named function is forced."""
    assert reply("order 1", choice="none")[1] == []
    assert [c[0] for c in reply("hello", choice="required")[1]] == ["lookup_order"]
    assert [c[0] for c in reply("hello", choice={"type": "function", "name": "get_weather"})[1]] == ["get_weather"]


def test_hooks() -> None:
    """[say:], [len:] and [tools:] override the policy."""
    assert reply("x [say: Exactly this.]")[0] == "Exactly this."
    assert len(reply("x [len: 40]")[0].split()) == 40
    _, calls = reply("order 4 [tools: get_weather]")
    assert [c[0] for c in calls] == ["get_weather"]


def test_plain_reply_echoes_and_is_bounded() -> None:
    """A plain reply echoes the user's words, names the role, and has 5-25 words."""
    for i in range(20):
        text, calls = reply(f"tell me something nice number {i}", tools=[], instructions="You are the concierge.")
        assert calls == []
        assert text.startswith("This is the concierge.")
        assert f"number {i}" in text
        assert 5 <= len(text.split()) <= 25


def test_greeting_without_user_turn() -> None:
    """With no user message the model greets."""
    r = ScriptedModel().reply(instructions="", tools=[], tool_choice="auto", turns=[])
    assert r.text == "Hello! How can I help you today?" and r.calls == ()


def rms_dbfs(pcm: bytes) -> float:
    x = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    return 20 * np.log10(max(1e-9, float(np.sqrt(np.mean(x**2)))) / 32768)


def test_synth_is_deterministic_voiced_and_timed() -> None:
    """Synthesized speech is reproducible, clearly voiced, and word offsets are in order."""
    a = synthesize("the quick brown fox jumps", voice="marin", seed=2)
    assert a == synthesize("the quick brown fox jumps", voice="marin", seed=2)
    assert a.pcm != synthesize("the quick brown fox jumps", voice="cedar", seed=2).pcm
    assert rms_dbfs(a.pcm) > -25
    assert list(a.word_starts) == sorted(a.word_starts) and a.word_starts[0] == 0
    # About 4 words per second for average words.
    assert 900 <= a.duration_ms <= 1600
    faster = synthesize("the quick brown fox jumps", speed=1.5)
    assert faster.duration_ms < a.duration_ms
    assert synthesize("").pcm == b""


def test_helpers_silence_and_noise() -> None:
    """silence() is zeros of the right length; noise() sits at the requested level."""
    assert silence(10) == bytes(480)
    assert abs(rms_dbfs(noise(1000, level_dbfs=-50)) + 50) < 1.0


@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.8])
def test_vad_boundaries_on_synth(threshold: float) -> None:
    """Start = onset - padding, stop = end of speech + silence duration, per threshold."""
    speech = synthesize("hello there how are you doing today", seed=5)
    vad = EnergyVad(threshold=threshold, prefix_padding_ms=300, silence_duration_ms=500)
    events = vad.feed(silence(1000) + speech.pcm + silence(1000))
    assert [e.kind for e in events] == ["start", "stop"]
    # Onset at 1000 ms minus 300 ms padding; a high threshold hears the soft
    # start of the first syllable a little later.
    assert 690 <= events[0].ms <= 760
    end = 1000 + speech.duration_ms
    assert end + 400 <= events[1].ms <= end + 520


def test_vad_threshold_mapping_and_reset() -> None:
    """Thresholds map to dBFS levels; reset forgets speech in progress."""
    assert threshold_dbfs(0.5) == -35.0 and threshold_dbfs(0.0) == -60.0 and threshold_dbfs(1.0) == -10.0
    vad = EnergyVad(threshold=0.5)
    assert vad.feed(noise(1000, level_dbfs=-30)) and vad.speaking
    vad.reset()
    assert not vad.speaking and vad.buffer_start_ms == 1000
    assert EnergyVad(threshold=0.5).feed(noise(1000, level_dbfs=-45)) == []


def test_three_places_three_calls() -> None:
    """A place-taking tool is called once per place named, in order; one place gives one call."""
    _, calls = reply("What is the weather in Paris, Berlin and Rome?")
    assert calls == [("get_weather", {"city": c}) for c in ("Paris", "Berlin", "Rome")]
    _, calls = reply("What is the weather in Oslo today")
    assert calls == [("get_weather", {"city": "Oslo"})]


def test_items_and_mcp_hooks() -> None:
    """[items: N] spreads the words; [mcp: label.tool] asks approval by default, calls when 'never'."""
    model = ScriptedModel(seed=1)
    r = model.reply(instructions="", tools=[], tool_choice="auto", turns=[Turn("user", text="hi [items: 3]")])
    assert r.items == 3
    server = {"type": "mcp", "server_label": "docs", "server_url": "https://docs.example/mcp"}
    turns = [Turn("user", text="refund policy [mcp: docs.search]")]
    r = model.reply(instructions="", tools=[server], tool_choice="auto", turns=turns)
    assert [(c.server_label, c.name, c.approval) for c in r.mcp] == [("docs", "search", True)]
    r = model.reply(instructions="", tools=[{**server, "require_approval": "never"}], tool_choice="auto", turns=turns)
    assert [(c.name, c.approval) for c in r.mcp] == [("search", False)] and "found" in r.text
    denied = [
        *turns,
        Turn("mcp_approval_request", name="search", arguments="docs", call_id="mcpr_1"),
        Turn("mcp_approval_response", call_id="mcpr_1", output="deny"),
    ]
    r = model.reply(instructions="", tools=[server], tool_choice="auto", turns=denied)
    assert r.mcp == () and "not" in r.text


def test_synth_punctuation_pause_fits_default_vad() -> None:
    """A sentence with punctuation is one turn under the 200 ms GA default silence."""
    speech = synthesize("Hello. Where is my order? It was due today!", seed=2)
    vad = EnergyVad(threshold=0.5, prefix_padding_ms=300, silence_duration_ms=200)
    assert [e.kind for e in vad.feed(silence(500) + speech.pcm + silence(500))] == ["start", "stop"]
