"""Session.usage: response and transcription tokens per session and per agent, and the latest rate limits."""

from __future__ import annotations

from typing import Any

import pytest
from openai.types.realtime import (
    ConversationItemInputAudioTranscriptionCompletedEvent,
    RateLimitsUpdatedEvent,
    ResponseDoneEvent,
)

from rtqueue import Agent, Session, Simulator
from rtqueue.config import AudioConfig, AudioInput, SessionConfig
from rtqueue.usage import AgentUsage, RateLimit, TokenUsage, TranscriptionUsage, Usage, UsageMeter
from tests.utils import UNIT, silence_pcm, speech_pcm


def usage(inp: int, out: int, *, cached: int = 0, image: int = 0) -> dict[str, Any]:
    """A GA response usage object."""
    return {
        "total_tokens": inp + out, "input_tokens": inp, "output_tokens": out,
        "input_token_details": {"text_tokens": inp - image, "audio_tokens": 0, "image_tokens": image,
                                "cached_tokens": cached,
                                "cached_tokens_details": {"text_tokens": cached, "audio_tokens": 0, "image_tokens": 0}},
        "output_token_details": {"text_tokens": out // 2, "audio_tokens": out - out // 2},
    }


def done(rid: str, use: dict[str, Any] | None) -> dict[str, Any]:
    """A response.done event (checked against the GA model)."""
    event = {"type": "response.done", "event_id": f"ev_{rid}", "response": {
        "id": rid, "object": "realtime.response", "status": "completed", "output": [], "usage": use}}
    ResponseDoneEvent.model_validate(event)
    return event


def transcribed(use: dict[str, Any]) -> dict[str, Any]:
    event = {"type": "conversation.item.input_audio_transcription.completed", "event_id": "ev_t", "item_id": "it",
             "content_index": 0, "transcript": "hi", "usage": use}
    ConversationItemInputAudioTranscriptionCompletedEvent.model_validate(event)
    return event


def limits(remaining: int, name: str = "tokens") -> dict[str, Any]:
    event = {"type": "rate_limits.updated", "event_id": "ev_rl", "rate_limits": [
        {"name": name, "limit": 40000, "remaining": remaining, "reset_seconds": 0.5}]}
    RateLimitsUpdatedEvent.model_validate(event)
    return event


def test_meter_sums_responses_per_session_and_per_agent():
    """Each split of the GA usage object adds up, in total and for the agent that made the response."""
    meter = UsageMeter()
    meter.observe(done("r1", usage(100, 40, cached=30, image=10)), "desk")
    meter.observe(done("r2", usage(200, 60)), "billing")
    meter.observe(done("r3", usage(50, 10)), None)
    u = meter.snapshot()
    assert u.tokens == TokenUsage(responses=3, input_tokens=350, output_tokens=110, total_tokens=460,
                                  input_text_tokens=340, input_image_tokens=10, cached_tokens=30,
                                  cached_text_tokens=30, output_text_tokens=55, output_audio_tokens=55)
    assert (u.input_tokens, u.output_tokens, u.total_tokens) == (350, 110, 460)
    assert set(u.by_agent) == {"desk", "billing"}
    assert u.by_agent["desk"].tokens == TokenUsage.from_usage(usage(100, 40, cached=30, image=10))
    assert u.by_agent["billing"].tokens.total_tokens == 260


def test_meter_counts_a_response_once_and_ignores_what_has_no_usage():
    """A repeated response.done adds nothing; no or malformed usage counts nothing (but never fails)."""
    meter = UsageMeter()
    meter.observe(done("r1", usage(10, 5)), "a")
    meter.observe(done("r1", usage(10, 5)), "a")
    meter.observe(done("r2", None), "a")
    meter.observe({"type": "response.done", "response": {"id": "r3", "usage": {"input_tokens": "many",
                                                                                "output_tokens": -3}}}, "a")
    meter.observe({"type": "response.done", "response": "nonsense"}, None)
    meter.observe({"type": "response.output_text.delta"}, None)
    u = meter.snapshot()
    assert u.tokens.responses == 2 and u.tokens.total_tokens == 15 and u.tokens.input_tokens == 10


def test_meter_sums_transcriptions_by_tokens_and_duration():
    """Token-billed and duration-billed transcription usage both add up, per agent too."""
    meter = UsageMeter()
    meter.observe(transcribed({"type": "tokens", "input_tokens": 12, "output_tokens": 3, "total_tokens": 15,
                               "input_token_details": {"audio_tokens": 12, "text_tokens": 0}}), "desk")
    meter.observe(transcribed({"type": "duration", "seconds": 1.5}), "desk")
    meter.observe(transcribed({"type": "duration", "seconds": 2.0}), None)
    u = meter.snapshot()
    assert u.transcription == TranscriptionUsage(transcriptions=3, input_tokens=12, output_tokens=3, total_tokens=15,
                                                 input_audio_tokens=12, seconds=3.5)
    assert u.by_agent["desk"] == AgentUsage(transcription=TranscriptionUsage(
        transcriptions=2, input_tokens=12, output_tokens=3, total_tokens=15, input_audio_tokens=12, seconds=1.5))
    assert u.total_tokens == 0  # transcription is billed apart


def test_meter_keeps_the_latest_rate_limits_by_name():
    """rate_limits.updated replaces each named limit; malformed entries are skipped."""
    meter = UsageMeter()
    meter.observe(limits(39000), None)
    meter.observe(limits(38000), None)
    meter.observe(limits(90, "requests"), None)
    meter.observe({"type": "rate_limits.updated", "rate_limits": [{"limit": 3}, "x", {"name": "tokens",
                                                                                      "remaining": True}]}, None)
    u = meter.snapshot()
    assert u.rate_limits["requests"] == RateLimit("requests", 40000, 90, 0.5)
    assert u.rate_limits["tokens"] == RateLimit("tokens")  # the last entry said nothing valid


def test_snapshots_are_frozen_and_independent():
    """A Usage cannot be changed, and later events do not change an earlier snapshot."""
    meter = UsageMeter()
    meter.observe(done("r1", usage(1, 1)), "a")
    first = meter.snapshot()
    meter.observe(done("r2", usage(1, 1)), "a")
    assert first.by_agent["a"].tokens.responses == 1 and meter.snapshot().by_agent["a"].tokens.responses == 2
    with pytest.raises(TypeError):
        first.by_agent["b"] = AgentUsage()  # type: ignore[index]
    assert Usage() == UsageMeter().snapshot()


def test_session_usage_per_agent_against_the_simulator(sim: Simulator):
    """Session.usage matches every Response.usage, split by the agent that made each response."""
    billing = Agent(name="billing", instructions="You are billing.")
    desk = Agent(name="desk", instructions="You are the desk.", handoffs=[billing])
    with Session.connect(url=sim.url, agent=desk, turn_detection=None) as session:
        rates = session.events("rate_limits.updated")
        r1 = session.ask("Hello", timeout=UNIT)
        handle = session.handoff(billing)
        assert handle is not None
        r2 = handle.wait(UNIT)
        r3 = session.ask("How much do I owe?", timeout=UNIT)
        assert [r.agent for r in (r1, r2, r3)] == ["desk", "billing", "billing"]
        assert all(r.usage for r in (r1, r2, r3))
        u = session.usage
        want = {a: sum((TokenUsage.from_usage(r.usage or {}) for r in (r1, r2, r3) if r.agent == a), TokenUsage())
                for a in ("desk", "billing")}
        assert {a: x.tokens for a, x in u.by_agent.items()} == want
        assert u.tokens == want["desk"] + want["billing"] and u.tokens.responses == 3
        assert u.total_tokens > 0 and u.tokens.output_audio_tokens > 0
        updates = [rates.get(UNIT) for _ in range(3)]  # the simulator sends one after each response.done
        assert all(updates)
        assert session.usage.rate_limits["tokens"].remaining == updates[-1].rate_limits[0]["remaining"]


def test_usage_includes_a_response_as_soon_as_its_answer_returns(sim: Simulator):
    """The count is in before ask() returns: read right after, it is never one behind."""
    with Session.connect(url=sim.url, turn_detection=None) as session:
        for n in range(1, 11):
            answer = session.ask(f"question {n}", timeout=UNIT)
            u = session.usage
            assert u.tokens.responses == n
            assert answer.usage is not None
        assert u.by_agent == {}


def test_transcription_usage_from_the_simulator(sim: Simulator):
    """Input transcription usage is summed, and counted for the agent speaking."""
    desk = Agent(name="desk", instructions="You are the desk.")
    config = SessionConfig(audio=AudioConfig(input=AudioInput(transcription="gpt-4o-mini-transcribe",
                                                              turn_detection=None)))
    with Session.connect(url=sim.url, agent=desk, config=config) as session:
        completed = session.events("conversation.item.input_audio_transcription.completed")
        session.append_audio(speech_pcm(600) + silence_pcm(200))
        session.commit()
        event = completed.get(UNIT)
        assert event is not None
        u = session.usage
        assert u.transcription == TranscriptionUsage.from_usage(event.usage)
        assert u.transcription.transcriptions == 1 and u.transcription.total_tokens > 0
        assert u.by_agent["desk"].transcription == u.transcription
