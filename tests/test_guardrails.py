"""Guardrails end to end on the simulator: trips, one correction each, input blocks and refusals."""

from __future__ import annotations

import threading
from typing import Any

import pytest

import rtqueue
from rtqueue import (
    Agent,
    GuardrailContext,
    GuardrailResult,
    InputGuardrailTripped,
    InvalidArgument,
    Session,
    Simulator,
    input_guardrail,
    output_guardrail,
)
from rtqueue.audio import AudioIO, NullSpeaker, PcmMicrophone
from rtqueue.sim import synthesize
from tests.utils import UNIT

LONG_PROMISE = ("Of course. I promise you a full refund today, and I will also send a voucher and a letter "
                "of apology and a gift card and more things to make up for it, all of it right now for you")


@pytest.fixture
def sim():
    with Simulator(speed=20.0) as s:
        yield s


@output_guardrail(every_chars=10)
def no_refunds(ctx: GuardrailContext) -> GuardrailResult:
    """Trips when the assistant promises a refund; tells the model what to say instead."""
    tripped = "refund" in ctx.text.lower()
    return GuardrailResult(tripped, info={"matched": "refund"} if tripped else None,
                           message="[say: Sorry, I cannot promise that. A colleague will review your case.]")


def _events(session: Session, *types: str) -> tuple[list[Any], threading.Event]:
    got: list[Any] = []
    seen = threading.Event()

    def on(ev: Any) -> None:
        got.append(ev)
        seen.set()

    for t in types:
        session.on(t, on)
    return got, seen


def _wait(pred: Any) -> bool:
    done = threading.Event()
    for _ in range(200):
        if pred():
            return True
        done.wait(UNIT / 200)
    return bool(pred())


def _count(sim: Simulator, typ: str) -> int:
    return sum(1 for e in sim.client_events() if e.get("type") == typ)


def test_output_guardrail_trip_gives_one_correction(sim: Simulator):
    """A tripped answer is cut off and ask() returns the one correction; 0 conflicts."""
    with Session.connect(url=sim.url, output_guardrails=[no_refunds], reconnect=False) as s:
        trips, seen = _events(s, "guardrail.tripped")
        answer = s.ask(f"[say: {LONG_PROMISE}] can I get my money back?", timeout=UNIT)
        assert answer.text == "Sorry, I cannot promise that. A colleague will review your case."
        assert s.wait_idle(UNIT) and seen.wait(UNIT)
    assert len(trips) == 1
    data = trips[0]
    assert data["guardrail"] == "no_refunds" and data["kind"] == "output" and data["corrected"]
    assert data["info"] == {"matched": "refund"}
    assert _count(sim, "response.create") == 2  # the answer and one correction
    assert sim.stats()["conflicts"] == 0
    assert not [e for e in sim.server_events() if e["type"] == "error"]
    # the correction's system note went in right before its create
    types = [e["type"] for e in sim.client_events()]
    last_create = len(types) - 1 - types[::-1].index("response.create")
    note = sim.client_events()[last_create - 1]
    assert note["type"] == "conversation.item.create" and note["item"]["role"] == "system"


def test_several_guardrails_tripping_make_one_correction(sim: Simulator):
    """Two guardrails tripping on the same response still ask for exactly one correction."""
    also = output_guardrail(lambda ctx: "voucher" in ctx.text, name="no_vouchers", every_chars=5)
    with Session.connect(url=sim.url, output_guardrails=[no_refunds, also], reconnect=False) as s:
        s.ask(f"[say: {LONG_PROMISE}] refund please", timeout=UNIT)
        assert s.wait_idle(UNIT)
    assert _count(sim, "response.create") == 2
    assert sim.stats()["conflicts"] == 0


def test_a_correction_that_trips_again_is_capped(sim: Simulator):
    """A guardrail that trips on everything gets max_corrections (2) corrections, then only cuts."""
    always = output_guardrail(lambda ctx: bool(ctx.text) or ctx.final, name="always", every_chars=1)
    with Session.connect(url=sim.url, output_guardrails=[always], reconnect=False) as s:
        trips, _ = _events(s, "guardrail.tripped")
        s.ask("hello there", timeout=UNIT)
        assert s.wait_idle(UNIT)
        assert (s.wait_idle(UNIT) and len(trips) == 3) or _wait(lambda: len(trips) == 3)
    assert _count(sim, "response.create") == 3  # the answer + 2 corrections, no endless loop
    assert [t["corrected"] for t in trips] == [True, True, False]
    assert sim.stats()["conflicts"] == 0


def test_passing_guardrails_change_nothing(sim: Simulator):
    """A guardrail that passes leaves the answer alone and adds no response."""
    calls: list[GuardrailContext] = []

    @output_guardrail(every_chars=5)
    def watch(ctx: GuardrailContext) -> bool:
        calls.append(ctx)
        return False

    with Session.connect(url=sim.url, output_guardrails=[watch], reconnect=False) as s:
        answer = s.ask("[say: Your order ships tomorrow morning.] where is my order", timeout=UNIT)
    assert answer.text == "Your order ships tomorrow morning."
    assert _count(sim, "response.create") == 1
    assert calls and calls[-1].final and calls[-1].text == answer.text
    assert all(c.kind == "output" and c.response_id == answer.id for c in calls)


def test_a_raising_guardrail_is_reported_not_fatal(sim: Simulator):
    """A guardrail that raises publishes guardrail.error and counts as passed."""
    @output_guardrail
    def broken(ctx: GuardrailContext) -> bool:
        raise ValueError("bug in the check")

    with Session.connect(url=sim.url, output_guardrails=[broken], reconnect=False) as s:
        errors, seen = _events(s, "guardrail.error")
        answer = s.ask("[say: All good.] hi", timeout=UNIT)
        assert seen.wait(UNIT)
    assert answer.text == "All good."
    assert "bug in the check" in errors[0]["message"]


def test_agent_guardrails_apply_to_that_agents_responses_only(sim: Simulator):
    """An agent's own output guardrail trips on its answers, not on another agent's."""
    strict = Agent("strict", instructions="You are the strict agent.", output_guardrails=[no_refunds])
    loose = Agent("loose", instructions="You are the loose agent.")
    with Session.connect(url=sim.url, agent=loose.with_handoffs(strict), reconnect=False) as s:
        first = s.ask(f"[say: {LONG_PROMISE}] refund?", timeout=UNIT)
        assert "refund" in first.text  # loose has no guardrail
        s.handoff("strict", respond=False)
        second = s.ask(f"[say: {LONG_PROMISE}] refund?", timeout=UNIT)
        assert second.text.startswith("Sorry, I cannot promise that")
    assert sim.stats()["conflicts"] == 0


def test_input_guardrail_blocks_a_question_before_anything_is_sent(sim: Simulator):
    """ask() with a tripping input guardrail raises InputGuardrailTripped and sends nothing."""
    @input_guardrail
    def no_hacking(ctx: GuardrailContext) -> GuardrailResult:
        return GuardrailResult("hack" in ctx.text, info="hacking")

    with Session.connect(url=sim.url, input_guardrails=[no_hacking], reconnect=False) as s:
        with pytest.raises(InputGuardrailTripped) as err:
            s.ask("how do I hack the bank?", timeout=UNIT)
        assert isinstance(err.value, rtqueue.RtqueueError) and err.value.guardrail == "no_hacking"
        assert err.value.result.info == "hacking"
        with pytest.raises(InputGuardrailTripped):
            s.send_text("hack it")
        assert s.ask("[say: Fine.] hello", timeout=UNIT).text == "Fine."
    assert _count(sim, "conversation.item.create") == 1  # only the allowed question


def test_input_guardrail_with_a_refusal_answers_with_it(sim: Simulator):
    """A refusal guardrail keeps the question out of the conversation and the assistant says the refusal."""
    refuse = input_guardrail(lambda ctx: "password" in ctx.text, name="secrets",
                             refusal="I cannot help with passwords.")
    with Session.connect(url=sim.url, input_guardrails=[refuse], reconnect=False) as s:
        answer = s.ask("tell me the admin password", timeout=UNIT)
        assert answer.text == "I cannot help with passwords."
        assert not any("password" in str(i) and i.get("role") == "user" for i in s.items)
    assert sim.stats()["conflicts"] == 0


def test_spoken_input_tripping_cancels_the_answer_and_deletes_the_item():
    """A transcript tripping an input guardrail cancels VAD's response, deletes the item, speaks the refusal."""
    refuse = input_guardrail(lambda ctx: "password" in ctx.text.lower(), name="secrets",
                             refusal="I cannot help with passwords.")
    speech = synthesize("Please tell me the admin password now.").pcm
    with Simulator(speed=1.0) as sim:
        mic = PcmMicrophone(speech, realtime=True, trailing_silence_ms=1200)
        with Session.connect(url=sim.url, input_guardrails=[refuse], turn_detection="server_vad",
                             session={"audio": {"input": {"transcription": {"model": "whisper-1"}}}},
                             audio=AudioIO(input=mic, output=NullSpeaker()), reconnect=False) as s:
            trips, seen = _events(s, "guardrail.tripped")
            assert seen.wait(3 * UNIT)
            assert sim.wait_until(lambda sm: any(
                e.get("type") == "conversation.item.delete" for e in sm.client_events()), UNIT)
            assert sim.wait_until(lambda sm: any(
                "I cannot help with passwords." in str(e) for e in sm.server_events()
                if e.get("type") == "response.done"), 2 * UNIT)
            mic.close()
    assert trips[0]["kind"] == "input" and trips[0]["guardrail"] == "secrets"
    assert sim.stats()["conflicts"] == 0


def test_output_trip_stops_playback_and_truncates_at_what_was_played():
    """With a speaker, a trip stops playback and truncates the item within what was received."""
    with Simulator(speed=1.0) as sim:
        speaker = NullSpeaker()
        with Session.connect(url=sim.url, output_guardrails=[no_refunds], turn_detection=None,
                             audio=AudioIO(output=speaker, input=None), reconnect=False) as s:
            answer = s.ask(f"[say: Let me see. {LONG_PROMISE}] money back?", timeout=3 * UNIT)
            assert answer.text.startswith("Sorry")
            assert s.wait_idle(UNIT)
        truncs = [e for e in sim.client_events() if e["type"] == "conversation.item.truncate"]
        cancels = [e for e in sim.client_events() if e["type"] == "response.cancel"]
        errors = [e for e in sim.server_events() if e["type"] == "error"]
    assert not errors
    assert len(cancels) == 1 and len(truncs) == 1  # cut while it played
    assert 0 < truncs[0]["audio_end_ms"] < 20_000
    assert sim.stats()["conflicts"] == 0


def test_guardrail_arguments_are_checked():
    """Bad guardrail values are InvalidArgument at the call."""
    with pytest.raises(InvalidArgument):
        output_guardrail(lambda: True)  # takes no context
    with pytest.raises(InvalidArgument):
        output_guardrail(lambda c: True, every_chars=0)
    with pytest.raises(InvalidArgument):
        Agent("a", output_guardrails=[lambda c: True])
    with pytest.raises(InvalidArgument):
        input_guardrail(lambda c: True, refusal="")


def test_close_ends_the_guardrail_thread(sim: Simulator):
    """The rtqueue-guard thread ends with close()."""
    with Session.connect(url=sim.url, output_guardrails=[no_refunds], reconnect=False) as s:
        s.ask("[say: hi] hello", timeout=UNIT)
        assert any(t.name.startswith("rtqueue-guard-") for t in s.threads())
    assert s.threads() == []


def test_a_correction_tripping_after_it_finished_is_still_capped(sim: Simulator):
    """Trips found only by the final check (short answers) still stop after max_corrections corrections."""
    dollars = output_guardrail(lambda ctx: "$" in ctx.text, name="no_prices", every_chars=500)
    with Session.connect(url=sim.url, output_guardrails=[dollars], reconnect=False) as s:
        trips, _ = _events(s, "guardrail.tripped")
        answer = s.ask("[say: That costs $40.] how much?", timeout=UNIT)
        assert s.wait_idle(UNIT)
        assert _wait(lambda: len(trips) == 3)
    assert answer.text == "That costs $40."  # the last correction, cut off and not corrected again
    assert _count(sim, "response.create") == 3
    assert [t["corrected"] for t in trips] == [True, True, False]


def test_speech_is_judged_before_any_response_is_made():
    """With input guardrails on transcribed speech, VAD makes no response: rtqueue does, once the words pass."""
    seen: list[str] = []

    @input_guardrail
    def record(ctx: GuardrailContext) -> bool:
        seen.append(ctx.text)
        return "password" in ctx.text.lower()

    speech = synthesize("What time do you open tomorrow?").pcm
    with Simulator(speed=1.0) as sim:
        mic = PcmMicrophone(speech, realtime=True, trailing_silence_ms=1200)
        with Session.connect(url=sim.url, input_guardrails=[record], turn_detection="server_vad",
                             session={"audio": {"input": {"transcription": {"model": "whisper-1"}}}},
                             audio=AudioIO(input=mic, output=NullSpeaker()), reconnect=False) as s:
            td = s.session_config["audio"]["input"]["turn_detection"]
            assert td["create_response"] is False and td["interrupt_response"] is True
            assert sim.wait_until(lambda sm: any(e.get("type") == "response.done" for e in sm.server_events()),
                                  3 * UNIT)
            mic.close()
        types = [e["type"] for e in sim.client_events() if e["type"] != "input_audio_buffer.append"]
    assert seen and "open" in seen[0].lower()
    assert "response.create" in types  # made by rtqueue after the transcript passed
    assert sim.stats()["conflicts"] == 0
