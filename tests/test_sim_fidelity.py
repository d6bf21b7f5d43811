"""The simulator against the real GA service: orders and shapes from recordings (DESIGN.md section 3).

Every event a Driver returns is validated against ``openai.types.realtime``.
"""

from __future__ import annotations

import base64
from typing import Any

from rtqueue.sim.synth import hum, noise, silence, synthesize
from rtqueue.sim.transcribe import Listener, transcribe
from tests.test_sim_core import Driver, errors, last_done, types

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
LOOKUP = {
    "type": "function",
    "name": "lookup_order",
    "description": "Look up an order",
    "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]},
}


def update(d: Driver, **session: Any) -> list[dict[str, Any]]:
    return d.send({"type": "session.update", "session": {"type": "realtime", **session}})


def transcription(model: str = "gpt-4o-transcribe", **extra: Any) -> dict[str, Any]:
    return {"input": {"transcription": {"model": model, **extra}}}


def said(text: str) -> bytes:
    return silence(400) + synthesize(text, voice="cedar", seed=7).pcm + silence(600)


def run(d: Driver, *actions: Any) -> list[dict[str, Any]]:
    """Everything the session sends from now on while ``actions`` run, then until idle."""
    mark = len(d.log)
    for act in actions:
        act()
    d.run_out()
    return d.log[mark:]


def of(events: list[dict[str, Any]], etype: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == etype]


# ------------------------------------------------------------------ 1. input transcription


def test_fingerprint_recovers_synthesized_text_whatever_the_chunking() -> None:
    """Synthesized speech (and a hum given text) is recognised; other audio is not."""
    text = "where is my order number 42"
    pcm = said(text)
    assert transcribe(pcm) == text
    for chunk in (480, 962, 4802, 24_000):
        listener = Listener()
        for i in range(0, len(pcm), chunk):
            listener.feed(pcm[i : i + chunk], i // 2)
        assert listener.take() == text
    # Two texts sharing a first word are told apart by length.
    assert transcribe(said("where are you")) == "where are you"
    assert transcribe(hum(700)) is None
    assert transcribe(silence(200) + hum(700, text="yes please") + silence(300)) == "yes please"
    assert transcribe(noise(500, level_dbfs=-20)) is None


def test_vad_turn_transcription_is_asynchronous_and_real_text() -> None:
    """delta events then completed (tokens usage), after the commit, interleaved with the response."""
    d = Driver(first_output_ms=250.0)
    update(d, audio=transcription())
    out = run(d, lambda: d.append(said("please check the weather")))
    committed = types(out).index("input_audio_buffer.committed")
    created = types(out).index("response.created")
    deltas = [i for i, t in enumerate(types(out)) if t == "conversation.item.input_audio_transcription.delta"]
    completed = types(out).index("conversation.item.input_audio_transcription.completed")
    assert committed < created < deltas[0] < completed < types(out).index("response.done")
    assert "".join(out[i]["delta"] for i in deltas) == "please check the weather"
    assert all(isinstance(out[i]["obfuscation"], str) for i in deltas)
    done = out[completed]
    assert done["transcript"] == "please check the weather" and done["content_index"] == 0
    assert done["usage"]["type"] == "tokens" and done["usage"]["total_tokens"] > 0
    assert done["item_id"] == out[committed]["item_id"]
    # The user item then carries the transcript.
    item = d.send({"type": "conversation.item.retrieve", "item_id": done["item_id"]})[0]["item"]
    assert item["content"] == [{"type": "input_audio", "transcript": "please check the weather"}]


def test_transcription_can_arrive_after_the_response() -> None:
    """Unpaced, the response finishes first and the transcription follows (seen on the real service)."""
    d = Driver(speed=None)
    update(d, audio=transcription("whisper-1"))
    out = d.append(said("hello there")) + d.run_out()
    order = types(out)
    assert order.index("response.done") < order.index("conversation.item.input_audio_transcription.completed")
    completed = of(out, "conversation.item.input_audio_transcription.completed")[0]
    assert completed["usage"]["type"] == "duration" and completed["usage"]["seconds"] > 0


def test_unintelligible_audio_completes_empty_or_fails() -> None:
    """Audio nobody registered: an empty transcript, or .failed when configured to fail."""
    d = Driver(speed=None)
    update(d, audio=transcription())
    out = d.append(silence(300) + hum(900) + silence(600)) + d.run_out()
    [completed] = of(out, "conversation.item.input_audio_transcription.completed")
    assert completed["transcript"] == ""
    assert "(audio" in last_done(out)["output"][0]["content"][0]["transcript"]

    for d, cfg in (
        (Driver(speed=None, transcription_failures=True), transcription()),
        (Driver(speed=None), transcription(prompt="[fail]")),
    ):
        update(d, audio=cfg)
        out = d.append(silence(300) + hum(900) + silence(600)) + d.run_out()
        [failed] = of(out, "conversation.item.input_audio_transcription.failed")
        assert failed["error"]["message"] and not of(out, "conversation.item.input_audio_transcription.completed")


def test_no_transcription_events_without_config_but_the_model_still_hears() -> None:
    d = Driver(speed=None)
    out = d.append(said("tell me a joke")) + d.run_out()
    assert not [t for t in types(out) if "input_audio_transcription" in t]
    assert "tell me a joke" in last_done(out)["output"][0]["content"][0]["transcript"]


def test_spoken_tool_hook_triggers_the_tool() -> None:
    """A spoken "[tools: lookup_order] order 42" is transcribed and calls the tool with 42."""
    d = Driver(speed=None)
    update(d, tools=[LOOKUP], audio=transcription())
    out = d.append(said("[tools: lookup_order] order 42")) + d.run_out()
    [call] = of(out, "response.function_call_arguments.done")
    assert call["name"] == "lookup_order" and call["arguments"] == '{"order_id":"42"}'
    [completed] = of(out, "conversation.item.input_audio_transcription.completed")
    assert completed["transcript"] == "[tools: lookup_order] order 42"


def test_manual_commit_is_transcribed() -> None:
    d = Driver(speed=None)
    update(d, audio={"input": {"turn_detection": None, "transcription": {"model": "gpt-4o-mini-transcribe"}}})
    d.append(said("good morning"))
    out = d.send({"type": "input_audio_buffer.commit"}) + d.run_out()
    [completed] = of(out, "conversation.item.input_audio_transcription.completed")
    assert completed["transcript"] == "good morning"


# ------------------------------------------------------------------ 2. response cycle order and shapes


def test_connect_and_session_shape() -> None:
    d = Driver()
    assert types(d.log) == ["session.created"]
    sess = d.log[0]["session"]
    assert sess["include"] is None
    assert sess["audio"]["input"]["turn_detection"]["silence_duration_ms"] == 200


def test_response_cycle_order_as_recorded() -> None:
    """The exact audio response order, rate_limits 40 ms after response.done with tokens only."""
    d = Driver(speed=1.0)
    d.user("hello [len: 3]")
    out = run(d, lambda: d.send({"type": "response.create"}))
    seq = [t for t in types(out) if not t.endswith(".delta")]
    assert seq == [
        "response.created",
        "response.output_item.added",
        "conversation.item.added",
        "response.content_part.added",
        "response.output_audio.done",
        "response.output_audio_transcript.done",
        "response.content_part.done",
        "conversation.item.done",
        "response.output_item.done",
        "response.done",
        "rate_limits.updated",
    ]
    d2 = Driver(speed=1.0)
    d2.user("hello [len: 3]")
    d2.send({"type": "response.create"})
    while "response.done" not in types(d2.at(d2.s.next_due() or 0)):
        pass
    t_done = d2.t
    assert d2.s.next_due() is not None and abs(d2.s.next_due() - (t_done + 0.04)) < 1e-9  # type: ignore[operator]
    [rl] = d2.at(t_done + 0.04)
    assert rl["type"] == "rate_limits.updated"
    assert [r["name"] for r in rl["rate_limits"]] == ["tokens"]


def test_items_have_no_object_and_deltas_carry_obfuscation() -> None:
    d = Driver(speed=None)
    out = run(d, lambda: d.user("hi [len: 4]"), lambda: d.send({"type": "response.create"}))
    items = [e["item"] for e in out if "item" in e]
    assert items and all("object" not in it for it in items)
    assert all("object" not in it for it in last_done(out)["output"])
    for e in of(out, "response.output_audio_transcript.delta"):
        assert isinstance(e["obfuscation"], str) and e["obfuscation"]
    text = run(d, lambda: d.send({"type": "response.create", "response": {"output_modalities": ["text"]}}))
    assert of(text, "response.output_text.delta")
    for e in of(text, "response.output_text.delta"):
        assert isinstance(e["obfuscation"], str) and e["obfuscation"]


def test_function_call_item_done_before_output_item_done() -> None:
    d = Driver(speed=None)
    update(d, tools=[LOOKUP])
    d.user("lookup order 7")
    out = run(d, lambda: d.send({"type": "response.create"}))
    order = types(out)
    last_item_done = max(i for i, t in enumerate(order) if t == "conversation.item.done")
    assert order[last_item_done + 1] == "response.output_item.done"


# ------------------------------------------------------------------ 4. validation


def test_response_create_rejects_unknown_fields_and_voices() -> None:
    d = Driver(speed=None)
    [err] = errors(d.send({"type": "response.create", "event_id": "a", "response": {"modalities": ["text"]}}))
    assert err["code"] == "unknown_parameter" and err["param"] == "response.modalities" and err["event_id"] == "a"
    [err] = errors(d.send({"type": "response.create", "response": {"audio": {"output": {"voice": "nova"}}}}))
    assert err["code"] == "invalid_value" and err["param"] == "response.audio.output.voice"
    [err] = errors(update(d, audio={"output": {"voice": "nova"}}))
    assert err["code"] == "invalid_value" and err["param"] == "session.audio.output.voice"
    assert d.s.active_response_ids() == []
    assert not errors(d.send({"type": "response.create", "response": {"audio": {"output": {"voice": "cedar"}}}}))


def test_metadata_over_16_pairs_rejected() -> None:
    d = Driver(speed=None)
    meta = {f"k{i}": "v" for i in range(17)}
    [err] = errors(d.send({"type": "response.create", "response": {"metadata": meta}}))
    assert err["param"] == "response.metadata" and err["type"] == "invalid_request_error"
    assert d.s.active_response_ids() == []
    meta.pop("k0")
    assert not errors(d.send({"type": "response.create", "response": {"metadata": meta}}))


def test_lone_surrogate_is_a_client_error() -> None:
    d = Driver(speed=None)
    out = d.send(
        {
            "type": "conversation.item.create",
            "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi \ud800"}]},
        }
    )
    [err] = errors(out)
    assert err["type"] == "invalid_request_error" and err["code"] == "invalid_value"
    assert err["param"] == "item.content[0].text"
    assert d.s.stats()["errors"].get("server_error") is None


def test_truncate_non_assistant_item() -> None:
    d = Driver(speed=None)
    user_id = d.user("hello")[0]["item"]["id"]
    [err] = errors(
        d.send({"type": "conversation.item.truncate", "item_id": user_id, "content_index": 0, "audio_end_ms": 0})
    )
    assert err["code"] is None and err["message"] == "Only model output audio messages can be truncated"


def test_binary_and_bad_json_frames() -> None:
    d = Driver(speed=None)
    d.s.receive_raw(b"\x00", d.t)
    [err] = errors(d.take())
    assert err["code"] == "invalid_event"
    assert err["message"] == "Expected a text WebSocket message; binary frames are not supported."
    d.s.receive_raw("{nope", d.t)
    [err] = errors(d.take())
    assert err["message"].startswith("Invalid event: failed to parse JSON value.")


def test_rate_below_24000_discards_the_whole_update() -> None:
    d = Driver(speed=None)
    out = update(d, instructions="changed", audio={"input": {"format": {"type": "audio/pcm", "rate": 16000}}})
    [err] = errors(out)
    assert err["code"] == "integer_below_min_value" and err["param"] == "session.audio.input.format.rate"
    assert "session.updated" not in types(out)
    assert d.s.session["instructions"] != "changed"


# ------------------------------------------------------------------ 5. scripted model


def test_three_cities_three_calls_in_one_response() -> None:
    d = Driver(speed=None)
    update(d, tools=[WEATHER])
    d.user("What is the weather in Paris, Berlin and Rome?")
    out = run(d, lambda: d.send({"type": "response.create"}))
    calls = of(out, "response.function_call_arguments.done")
    assert [c["arguments"] for c in calls] == ['{"city":"Paris"}', '{"city":"Berlin"}', '{"city":"Rome"}']
    assert len({c["response_id"] for c in calls}) == 1
    assert len(of(out, "response.done")) == 1


# ------------------------------------------------------------------ 3. races and extras


def test_several_assistant_items_in_one_response() -> None:
    d = Driver(speed=None)
    d.user("tell me two things [items: 2] [len: 8]")
    out = run(d, lambda: d.send({"type": "response.create"}))
    done = last_done(out)
    assert [it["type"] for it in done["output"]] == ["message", "message"]
    assert [e["output_index"] for e in of(out, "response.output_item.done")] == [0, 1]
    words = sum(len(it["content"][0]["transcript"].split()) for it in done["output"])
    assert words == 8


def test_response_done_without_response_created_on_barge_in() -> None:
    """Speech that starts while a VAD response is being created cancels it before it is announced."""
    d = Driver(speed=None, vad_create_delay_s=0.05)
    first = synthesize("hello there", voice="cedar", seed=7).pcm
    second = synthesize("wait a moment", voice="cedar", seed=7).pcm
    out = run(d, lambda: d.append(silence(300) + first + silence(300) + second + silence(400)))
    dones = of(out, "response.done")
    created = {e["response"]["id"] for e in of(out, "response.created")}
    orphan = [e["response"] for e in dones if e["response"]["id"] not in created]
    assert orphan and orphan[0]["status"] == "cancelled"
    assert orphan[0]["status_details"] == {"type": "cancelled", "reason": "turn_detected"}
    assert orphan[0]["output"] == []
    # The second turn's response is announced normally once the delay passed.
    assert any(e["response"]["status"] == "completed" for e in dones)


def test_function_call_arguments_done_inside_a_cancelled_response() -> None:
    d = Driver(speed=1.0)
    update(d, tools=[LOOKUP], output_modalities=["text"])
    d.user("lookup order 123456789 please [say: ok]")
    d.send({"type": "response.create"})
    out: list[dict[str, Any]] = []
    while "response.function_call_arguments.delta" not in types(out):
        out += d.at(d.s.next_due() or d.t)
    out += d.send({"type": "response.cancel"})
    out += d.run_out()
    done = last_done(out)
    assert done["status"] == "cancelled"
    [args_done] = of(out, "response.function_call_arguments.done")
    assert args_done["response_id"] == done["id"]
    assert args_done["arguments"] and '{"order_id":"123456789"}'.startswith(args_done["arguments"])
    call_items = [it for it in done["output"] if it["type"] == "function_call"]
    assert call_items and call_items[0]["status"] == "incomplete"


def test_idle_timeout_flow() -> None:
    """timeout_triggered, then committed, then a response; once per idle period."""
    d = Driver(speed=None)
    update(d, audio={"input": {"turn_detection": {"type": "server_vad", "idle_timeout_ms": 5000}}})
    d.user("hi [len: 3]")
    d.send({"type": "response.create"})
    t_done = d.t
    assert not [e for e in d.at(t_done + 4.9) if e["type"] == "input_audio_buffer.timeout_triggered"]
    out = d.at(t_done + 5.0) + d.run_out()
    order = types(out)
    i = order.index("input_audio_buffer.timeout_triggered")
    assert order[i + 1 : i + 5] == [
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.done",
        "response.created",
    ]
    assert out[i]["item_id"] == out[i + 1]["item_id"]
    assert order.count("input_audio_buffer.timeout_triggered") == 1
    assert order.count("response.done") == 1


def test_speech_disarms_idle_timeout() -> None:
    d = Driver(speed=None)
    update(d, audio={"input": {"turn_detection": {"type": "server_vad", "idle_timeout_ms": 5000}}})
    d.user("hi [len: 3]")
    d.send({"type": "response.create"})
    d.at(1.0)
    d.append(silence(100) + synthesize("hello", seed=1).pcm[:24_000])  # speech starts, not yet stopped
    out = d.at(10.0)
    assert "input_audio_buffer.timeout_triggered" not in types(out)


def mcp_tool(label: str = "docs", **extra: Any) -> dict[str, Any]:
    return {"type": "mcp", "server_label": label, "server_url": f"https://{label}.example/mcp", **extra}


def test_mcp_tools_are_listed_on_session_update() -> None:
    d = Driver(speed=None)
    out = run(
        d,
        lambda: update(
            d,
            tools=[
                mcp_tool(allowed_tools=["search"], require_approval="never"),
                mcp_tool("broken", server_url="https://fail.example/mcp"),
            ],
        ),
    )
    order = types(out)
    assert order[0] == "session.updated"
    assert order.count("mcp_list_tools.in_progress") == 2
    [ok] = of(out, "mcp_list_tools.completed")
    [bad] = of(out, "mcp_list_tools.failed")
    done = [e["item"] for e in of(out, "conversation.item.done") if e["item"]["id"] == ok["item_id"]]
    assert done[0]["type"] == "mcp_list_tools" and [t["name"] for t in done[0]["tools"]] == ["search"]
    assert bad["item_id"] != ok["item_id"]
    # The same tools again: nothing new to list.
    assert "mcp_list_tools.in_progress" not in types(
        run(d, lambda: update(d, tools=[mcp_tool(allowed_tools=["search"], require_approval="never")]))
    )


def test_mcp_call_flow_and_failure() -> None:
    d = Driver(speed=None)
    update(d, tools=[mcp_tool(require_approval="never")])
    d.user("find the refund policy [mcp: docs.search]")
    out = run(d, lambda: d.send({"type": "response.create"}))
    seq = [t for t in types(out) if t.startswith(("response.mcp", "response.output_item", "conversation.item"))]
    seq = [t for t in seq if t != "response.mcp_call_arguments.delta"]
    assert seq[:7] == [
        "response.output_item.added",
        "conversation.item.added",
        "response.mcp_call_arguments.done",
        "response.mcp_call.in_progress",
        "response.mcp_call.completed",
        "conversation.item.done",
        "response.output_item.done",
    ]
    assert of(out, "response.mcp_call_arguments.delta")
    done = last_done(out)
    assert done["status"] == "completed"
    call = done["output"][0]
    assert call["type"] == "mcp_call" and call["server_label"] == "docs" and call["name"] == "search"
    assert '"result":"ok"' in call["output"] and call["error"] is None
    assert done["output"][1]["type"] == "message"
    assert "Here is what I found" in done["output"][1]["content"][0]["transcript"]

    d.user("and now [mcp: docs.fail_lookup]")
    out = run(d, lambda: d.send({"type": "response.create"}))
    assert "response.mcp_call.failed" in types(out)
    assert last_done(out)["output"][0]["error"]["type"] == "tool_execution_error"


def test_mcp_approval_request_then_response() -> None:
    d = Driver(speed=None)
    update(d, tools=[mcp_tool(require_approval="always")])
    d.user("search the docs [mcp: docs.search]")
    out = run(d, lambda: d.send({"type": "response.create"}))
    assert not [t for t in types(out) if t.startswith("response.mcp_call")]
    request = last_done(out)["output"][0]
    assert request["type"] == "mcp_approval_request" and request["name"] == "search"
    approval = {"type": "mcp_approval_response", "approval_request_id": request["id"], "approve": True}
    assert not errors(d.send({"type": "conversation.item.create", "item": approval}))
    out = run(d, lambda: d.send({"type": "response.create"}))
    assert "response.mcp_call.completed" in types(out)
    call = last_done(out)["output"][0]
    assert call["type"] == "mcp_call" and call["approval_request_id"] == request["id"]


def test_audio_item_created_by_the_client_is_heard() -> None:
    d = Driver(speed=None)
    audio = base64.b64encode(said("what time is it")).decode()
    d.send(
        {
            "type": "conversation.item.create",
            "item": {"type": "message", "role": "user", "content": [{"type": "input_audio", "audio": audio}]},
        }
    )
    out = run(d, lambda: d.send({"type": "response.create"}))
    assert "what time is it" in last_done(out)["output"][0]["content"][0]["transcript"]
