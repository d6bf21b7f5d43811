"""Protocol truth: every event rtqueue sends, and every event the simulator sends, is a real GA event."""

from __future__ import annotations

import json
from typing import Any

import pydantic
import pytest
from openai.types.realtime import RealtimeClientEvent, RealtimeServerEvent

import rtqueue
from rtqueue import Agent, Session, Simulator, tool
from rtqueue.audio import AudioIO, NullSpeaker, PcmMicrophone
from tests.utils import UNIT, silence_pcm, speech_pcm

CLIENT = pydantic.TypeAdapter(RealtimeClientEvent)
SERVER = pydantic.TypeAdapter(RealtimeServerEvent)


@tool
def lookup_order(order_id: str) -> dict[str, str]:
    """Look up an order by its id."""
    return {"order_id": order_id, "status": "shipped"}


def _exercise(session: Session) -> None:
    """Drive every kind of client event rtqueue can send."""
    session.ask("Hello there", timeout=UNIT)
    session.ask("please transfer me to returns about order 42", timeout=UNIT)
    session.create_response(conversation="none", metadata={"kind": "summary"},
                            input=[{"type": "message", "role": "user",
                                    "content": [{"type": "input_text", "text": "Summarise."}]}],
                            output_modalities=["text"], instructions="One line.").wait(UNIT)
    session.update(instructions="You are the returns agent.", tool_choice="auto")
    long = session.create_response(instructions="[len: 60]")
    delta = session.events("response.output_audio.delta")
    assert delta.get(UNIT) is not None
    session.interrupt(timeout=UNIT)  # cancel + truncate
    long.wait(UNIT)
    session.append_audio(speech_pcm(300) + silence_pcm(100))
    session.commit()
    session.clear_input()
    session.send_text("I am a system note.", role="system")
    session.send({"type": "conversation.item.retrieve", "item_id": session.items[0]["id"]})
    session.send({"type": "output_audio_buffer.clear"})
    session.send({"type": "conversation.item.delete", "item_id": session.items[0]["id"]})
    assert session.wait_idle(UNIT)


def test_client_and_server_events_validate_against_openai_models():
    """Every client event rtqueue sent and every server event the simulator sent parses as a GA event."""
    returns = Agent(name="returns", instructions="You are the returns agent.", tools=[lookup_order],
                    handoffs=["greeter"])
    greeter = Agent(name="greeter", instructions="You are the greeter.", handoffs=[returns], voice="marin")
    audio = AudioIO(output=NullSpeaker(speed=20.0), input=PcmMicrophone(speech_pcm(200), realtime=False,
                                                                         trailing_silence_ms=0))
    with Simulator(speed=4.0, seed=9) as sim:
        with Session.connect(url=sim.url, agent=greeter, audio=audio, turn_detection="push_to_talk",
                             session={"max_output_tokens": 512}) as session:
            _exercise(session)
        client = sim.client_events(0)
        server = sim.server_events(0)
    kinds = {e["type"] for e in client}
    for expected in ("session.update", "conversation.item.create", "response.create", "response.cancel",
                     "conversation.item.truncate", "input_audio_buffer.append", "input_audio_buffer.commit",
                     "input_audio_buffer.clear", "conversation.item.retrieve", "conversation.item.delete"):
        assert expected in kinds, f"{expected} not exercised"
    bad: list[tuple[str, Any]] = []
    for ev in client:
        try:
            CLIENT.validate_python(ev)
        except pydantic.ValidationError as exc:
            bad.append((ev["type"], str(exc)[:300]))
    assert not bad, bad
    for ev in server:
        SERVER.validate_python(ev)
    assert len(server) > 50


@pytest.mark.parametrize("beta,ga", [
    ("response.audio.delta", "response.output_audio.delta"),
    ("response.audio_transcript.delta", "response.output_audio_transcript.delta"),
    ("response.text.delta", "response.output_text.delta"),
])
def test_beta_event_names_accepted_as_aliases(beta: str, ga: str):
    """Beta event names from older servers are read as their GA names."""
    ev = rtqueue.protocol.parse_frame(json.dumps({"type": beta, "delta": "x", "unknown_field": 1}))
    assert ev["type"] == ga and ev["unknown_field"] == 1
