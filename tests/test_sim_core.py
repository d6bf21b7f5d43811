"""The simulator's pure core: protocol behaviour with explicit time, no sockets."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rtqueue.sim.core import SimSession
from rtqueue.sim.schema import validate_server_event
from rtqueue.sim.synth import silence, synthesize

ORDER_TOOL = {
    "type": "function",
    "name": "lookup_order",
    "description": "Look up an order by its id",
    "parameters": {
        "type": "object",
        "properties": {"order_id": {"type": "string"}, "verbose": {"type": "boolean"}},
        "required": ["order_id"],
    },
}
RETURNS_TOOL = {"type": "function", "name": "transfer_to_returns", "description": "Hand off to returns"}
WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}


def checked(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validate every server event against the official GA union; return them."""
    for ev in events:
        validate_server_event(ev)
    ids = [ev["event_id"] for ev in events]
    assert len(ids) == len(set(ids)), "event_ids must be unique"
    return events


class Driver:
    """A SimSession with a clock; every event it returns is validated."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("first_output_ms", 0.0)
        self.t = 0.0
        self.s = SimSession(now=0.0, **kwargs)
        self.log: list[dict[str, Any]] = []
        self.take()

    def take(self) -> list[dict[str, Any]]:
        events = checked(self.s.advance(self.t))
        self.log.extend(events)
        assert not self.s.internal_errors
        return events

    def send(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        self.s.receive(event, self.t)
        return self.take()

    def at(self, t: float) -> list[dict[str, Any]]:
        self.t = t
        return self.take()

    def run_out(self) -> list[dict[str, Any]]:
        """Advance until nothing but expiry is pending."""
        out: list[dict[str, Any]] = []
        while True:
            due = self.s.next_due()
            if due is None or due > self.t + 600:
                return out
            out += self.at(max(self.t, due))

    def user(self, text: str) -> list[dict[str, Any]]:
        return self.send(
            {
                "type": "conversation.item.create",
                "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]},
            }
        )

    def append(self, pcm: bytes, chunk_ms: int = 20) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        step = 48 * chunk_ms
        for i in range(0, len(pcm), step):
            out += self.send(
                {"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm[i : i + step]).decode()}
            )
        return out


def types(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


def last_done(events: list[dict[str, Any]]) -> dict[str, Any]:
    """The response of the last response.done (rate_limits.updated follows it)."""
    return dict(next(e for e in reversed(events) if e["type"] == "response.done")["response"])


def errors(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e["error"] for e in events if e["type"] == "error"]


def no_vad() -> dict[str, Any]:
    return {"type": "session.update", "session": {"type": "realtime", "audio": {"input": {"turn_detection": None}}}}


def test_connect_sends_session_and_conversation_created() -> None:
    """The first events are session.created (GA defaults) then conversation.created."""
    d = Driver()
    assert types(d.log) == ["session.created"]  # the GA service sends no conversation.created
    sess = d.log[0]["session"]
    assert sess["type"] == "realtime" and sess["object"] == "realtime.session"
    assert sess["id"].startswith("sess_")
    assert sess["output_modalities"] == ["audio"]
    assert sess["audio"]["output"]["voice"] == "marin"
    assert sess["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
    td = sess["audio"]["input"]["turn_detection"]
    assert td == {
        "type": "server_vad",
        "threshold": 0.5,
        "prefix_padding_ms": 300,
        "silence_duration_ms": 200,
        "create_response": True,
        "interrupt_response": True,
        "idle_timeout_ms": None,
    }
    assert sess["tools"] == [] and sess["tool_choice"] == "auto" and sess["max_output_tokens"] == "inf"
    assert sess["include"] is None


def test_conflict_error_echoes_event_id() -> None:
    """A second in-band response.create while one is active is refused, naming the active one."""
    d = Driver()
    d.user("hello")
    first = d.send({"type": "response.create", "event_id": "evt_a"})
    rid = next(e for e in first if e["type"] == "response.created")["response"]["id"]
    second = d.send({"type": "response.create", "event_id": "evt_b"})
    [err] = errors(second)
    assert err == {
        "type": "invalid_request_error",
        "code": "conversation_already_has_active_response",
        "message": f"Conversation already has an active response in progress: {rid}. "
        "Wait until the response is finished before creating a new one.",
        "param": None,
        "event_id": "evt_b",
    }
    assert d.s.stats()["conflicts"] == 1
    d.run_out()
    # Once response.done went out, a new create is accepted.
    assert "response.created" in types(d.send({"type": "response.create", "event_id": "evt_c"}))


def test_response_created_carries_metadata_and_conversation() -> None:
    """response.created copies metadata and names the default conversation."""
    d = Driver()
    out = d.send({"type": "response.create", "event_id": "e1", "response": {"metadata": {"rtq": "e1"}}})
    created = next(e for e in out if e["type"] == "response.created")["response"]
    assert created["status"] == "in_progress" and created["metadata"] == {"rtq": "e1"}
    assert created["conversation_id"].startswith("conv_") and created["id"].startswith("resp_")
    assert "rate_limits.updated" not in types(out)  # it follows response.done


def test_cancel_with_nothing_active() -> None:
    """response.cancel with no active response earns response_cancel_not_active."""
    d = Driver()
    [err] = errors(d.send({"type": "response.cancel", "event_id": "c1"}))
    assert err["code"] == "response_cancel_not_active"
    assert err["message"] == "Cancellation failed: no active response found"
    assert err["event_id"] == "c1"
    [err] = errors(d.send({"type": "response.cancel", "response_id": "resp_nope"}))
    assert err["code"] == "response_cancel_not_active"
    assert d.s.stats()["cancel_not_active"] == 2


def test_cancel_stops_stream_and_reports_cancelled() -> None:
    """Cancelling mid-audio closes the item as incomplete and sends response.done cancelled."""
    d = Driver()
    d.send(no_vad())
    d.user("tell me a story [len: 20]")
    d.send({"type": "response.create"})
    d.at(0.5)
    out = d.send({"type": "response.cancel", "event_id": "x"})
    assert types(out)[-1] == "response.done"
    done = out[-1]["response"]
    assert done["status"] == "cancelled"
    assert done["status_details"] == {"type": "cancelled", "reason": "client_cancelled"}
    assert done["output"][0]["status"] == "incomplete"
    assert types(d.run_out()) == ["rate_limits.updated"]
    assert d.s.stats()["cancelled"] == 1
    # Cancelling the same response again: nothing is active.
    [err] = errors(d.send({"type": "response.cancel", "response_id": done["id"]}))
    assert err["code"] == "response_cancel_not_active"


def _audio_ms(events: list[dict[str, Any]], item_id: str) -> int:
    n = sum(
        len(base64.b64decode(e["delta"]))
        for e in events
        if e["type"] == "response.output_audio.delta" and e["item_id"] == item_id
    )
    return n // 48


def test_truncate_past_produced_audio_is_invalid_value() -> None:
    """Truncating beyond the audio actually produced gets the real service's message."""
    d = Driver()
    d.send(no_vad())
    d.user("hi [len: 20]")
    d.send({"type": "response.create"})
    d.at(0.6)
    d.send({"type": "response.cancel"})
    item_id = next(e for e in d.log if e["type"] == "response.output_item.added")["item"]["id"]
    produced = _audio_ms(d.log, item_id)
    assert 500 <= produced <= 700
    [err] = errors(
        d.send(
            {
                "type": "conversation.item.truncate",
                "item_id": item_id,
                "content_index": 0,
                "audio_end_ms": produced + 85,
                "event_id": "t1",
            }
        )
    )
    assert err == {
        "type": "invalid_request_error",
        "code": "invalid_value",
        "message": f"Audio content of {produced}ms is already shorter than {produced + 85}ms",
        "param": "audio_end_ms",
        "event_id": "t1",
    }
    [err] = errors(
        d.send({"type": "conversation.item.truncate", "item_id": "item_zzz", "content_index": 0, "audio_end_ms": 10})
    )
    assert err["code"] == "item_truncate_invalid_item_id"
    assert "item_zzz" in err["message"]
    out = d.send({"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0, "audio_end_ms": 100})
    assert out[0]["type"] == "conversation.item.truncated" and out[0]["audio_end_ms"] == 100
    # After a truncate the item is that short: the same bound applies from now on.
    [err] = errors(
        d.send({"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0, "audio_end_ms": 150})
    )
    assert err["message"] == "Audio content of 100ms is already shorter than 150ms"
    retrieved = d.send({"type": "conversation.item.retrieve", "item_id": item_id})[0]["item"]
    assert len(retrieved["content"][0]["transcript"].split()) <= 2
    stats = d.s.stats()
    assert stats["truncate_errors"] == 3 and stats["truncations"] == 1


def test_truncate_user_item_is_invalid_item_id() -> None:
    """Only assistant audio items can be truncated."""
    d = Driver()
    user_id = d.user("hello")[0]["item"]["id"]
    [err] = errors(
        d.send({"type": "conversation.item.truncate", "item_id": user_id, "content_index": 0, "audio_end_ms": 0})
    )
    assert err["code"] is None and err["message"] == "Only model output audio messages can be truncated"


def speech_turn(text: str = "please look up my order status today", lead_ms: int = 500, tail_ms: int = 800) -> bytes:
    return silence(lead_ms) + synthesize(text, voice="cedar", seed=3).pcm + silence(tail_ms)


def test_vad_detects_speech_commits_and_responds() -> None:
    """Server VAD on speech-like PCM: started, stopped, committed, user item, then an auto response."""
    d = Driver()
    pcm = speech_turn()
    speech_ms = len(pcm) // 48 - 1300
    out = d.append(pcm)
    kinds = types(out)
    i = kinds.index("input_audio_buffer.speech_started")
    assert kinds[i : i + 6] == [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.done",
        "response.created",
    ]
    started, stopped, committed, added = out[i], out[i + 1], out[i + 2], out[i + 3]
    # 500 ms of lead silence minus 300 ms of prefix padding (frames are 10 ms).
    assert 180 <= started["audio_start_ms"] <= 220
    assert 500 + speech_ms + 100 <= stopped["audio_end_ms"] <= 500 + speech_ms + 300  # 200 ms default silence
    assert started["item_id"] == stopped["item_id"] == committed["item_id"] == added["item"]["id"]
    assert added["item"]["content"] == [{"type": "input_audio", "transcript": None}]
    created = out[i + 5]["response"]
    assert created["metadata"] is None
    rest = d.run_out()
    assert types(rest)[-2:] == ["response.done", "rate_limits.updated"]
    assert last_done(rest)["status"] == "completed"
    transcript = last_done(rest)["output"][0]["content"][0]["transcript"]
    assert "please look up my order status today" in transcript  # the model heard the synthesized speech
    assert d.s.stats()["vad_speech_started"] == 1


def test_vad_ignores_quiet_noise_and_chunking() -> None:
    """Room noise never starts speech; the result does not depend on chunk size."""
    from rtqueue.sim.synth import noise

    d = Driver()
    assert "input_audio_buffer.speech_started" not in types(d.append(noise(2000, level_dbfs=-55)))
    starts = []
    for chunk in (7, 20, 100):
        d2 = Driver()
        ev = [e for e in d2.append(speech_turn(), chunk_ms=chunk) if e["type"].startswith("input_audio_buffer.speech")]
        starts.append([(e["type"], e.get("audio_start_ms", e.get("audio_end_ms"))) for e in ev])
    assert starts[0] == starts[1] == starts[2]


def test_speech_interrupts_active_response() -> None:
    """With interrupt_response, speech start cancels the in-band response (turn_detected)."""
    d = Driver()
    d.user("talk for a while [len: 25]")
    d.send({"type": "response.create"})
    d.at(0.4)
    d.t = 0.4
    out = d.append(speech_turn(lead_ms=100))
    kinds = types(out)
    i = kinds.index("input_audio_buffer.speech_started")
    j = kinds.index("response.done")
    assert i < j
    cancelled = out[j]["response"]
    assert cancelled["status"] == "cancelled"
    assert cancelled["status_details"] == {"type": "cancelled", "reason": "turn_detected"}
    # The user turn then gets its own response.
    assert kinds.count("response.created") == 1 and kinds.index("response.created") > j


def test_interrupt_response_false_keeps_response() -> None:
    """interrupt_response false: speech does not cancel, and no second response is created."""
    d = Driver()
    d.send(
        {
            "type": "session.update",
            "session": {
                "type": "realtime",
                "audio": {"input": {"turn_detection": {"type": "server_vad", "interrupt_response": False}}},
            },
        }
    )
    d.user("talk [len: 25]")
    d.send({"type": "response.create"})
    out = d.append(speech_turn(lead_ms=100))
    assert "input_audio_buffer.speech_started" in types(out)
    assert "response.done" not in types(out) and "response.created" not in types(out)


def test_semantic_vad_detects_speech() -> None:
    """semantic_vad is accepted and detects turns like server VAD (eagerness sets the wait)."""
    d = Driver()
    upd = d.send(
        {
            "type": "session.update",
            "session": {
                "type": "realtime",
                "audio": {"input": {"turn_detection": {"type": "semantic_vad", "eagerness": "high"}}},
            },
        }
    )
    assert upd[0]["session"]["audio"]["input"]["turn_detection"]["type"] == "semantic_vad"
    kinds = types(d.append(speech_turn()))
    assert "input_audio_buffer.speech_stopped" in kinds and "response.created" in kinds


def test_manual_commit_and_clear() -> None:
    """commit needs 100 ms of audio (exact message); clear empties the buffer."""
    d = Driver()
    d.send(no_vad())
    d.append(silence(50))
    [err] = errors(d.send({"type": "input_audio_buffer.commit", "event_id": "k"}))
    assert err["code"] == "input_audio_buffer_commit_empty"
    assert err["message"] == (
        "Error committing input audio buffer: buffer too small. Expected at least 100ms of audio, "
        "but buffer only has 50.00ms of audio."
    )
    d.append(silence(100))
    out = d.send({"type": "input_audio_buffer.commit"})
    assert types(out) == ["input_audio_buffer.committed", "conversation.item.added", "conversation.item.done"]
    d.append(silence(300))
    assert types(d.send({"type": "input_audio_buffer.clear"})) == ["input_audio_buffer.cleared"]
    assert errors(d.send({"type": "input_audio_buffer.commit"}))[0]["message"].endswith("0.00ms of audio.")


def tool_session(d: Driver, *tools: dict[str, Any]) -> None:
    d.send(no_vad())
    d.send({"type": "session.update", "session": {"type": "realtime", "tools": list(tools)}})


def test_tools_called_before_response_done() -> None:
    """Matching tools are all called in one response, speech first, before response.done."""
    d = Driver()
    tool_session(d, ORDER_TOOL, RETURNS_TOOL, WEATHER_TOOL)
    d.user("I want to return my order 4412 please")
    d.send({"type": "response.create"})
    out = d.run_out()
    kinds = types(out)
    done_at = kinds.index("response.done")
    calls = [e for e in out if e["type"] == "response.function_call_arguments.done"]
    assert [c["name"] for c in calls] == ["lookup_order", "transfer_to_returns"]
    assert all(out.index(c) < done_at for c in calls)
    assert calls[0]["arguments"] == '{"order_id":"4412"}'
    assert calls[1]["arguments"] == "{}"
    assert kinds.index("response.output_audio.delta") < out.index(calls[0])
    final = out[done_at]["response"]
    assert [o["type"] for o in final["output"]] == ["message", "function_call", "function_call"]
    assert final["output"][0]["content"][0]["transcript"] == "Let me check that."
    assert d.s.stats()["function_calls"] == 2

    # Outputs come back; the next response summarises them and calls nothing again.
    for c in calls:
        d.send(
            {
                "type": "conversation.item.create",
                "item": {"type": "function_call_output", "call_id": c["call_id"], "output": '{"status": "shipped"}'},
            }
        )
    d.send({"type": "response.create"})
    out = d.run_out()
    assert "response.function_call_arguments.done" not in types(out)
    transcript = last_done(out)["output"][0]["content"][0]["transcript"]
    assert transcript.startswith("Here is what I found:") and "shipped" in transcript


def test_handoff_only_says_transfer() -> None:
    """A response whose only calls are transfer_to_* says it is transferring."""
    d = Driver()
    tool_session(d, RETURNS_TOOL, WEATHER_TOOL)
    d.user("I need to make some returns")
    d.send({"type": "response.create", "response": {"output_modalities": ["text"]}})
    out = d.run_out()
    text = next(e for e in out if e["type"] == "response.output_text.done")["text"]
    assert text == "Let me transfer you to returns."
    assert [e["name"] for e in out if e["type"] == "response.function_call_arguments.done"] == ["transfer_to_returns"]


def test_test_hooks_tools_say_len() -> None:
    """[tools: ...], [say: ...] and [len: N] control the scripted model exactly."""
    d = Driver()
    tool_session(d, ORDER_TOOL, WEATHER_TOOL)
    d.user("nothing relevant [tools: get_weather, ghost_tool] [say: Hang on a moment.]")
    d.send({"type": "response.create"})
    out = d.run_out()
    names = [e["name"] for e in out if e["type"] == "response.function_call_arguments.done"]
    assert names == ["get_weather", "ghost_tool"]
    assert (
        next(e for e in out if e["type"] == "response.output_audio_transcript.done")["transcript"]
        == "Hang on a moment."
    )
    d.user("count please [len: 7]")
    d.send({"type": "response.create"})
    out = d.run_out()
    assert len(next(e for e in out if e["type"] == "response.output_audio_transcript.done")["transcript"].split()) == 7


def test_tool_choice_none_and_forced() -> None:
    """tool_choice none suppresses calls; a named function is always called."""
    d = Driver()
    tool_session(d, ORDER_TOOL, WEATHER_TOOL)
    d.user("where is order 7")
    d.send({"type": "response.create", "response": {"tool_choice": "none"}})
    assert "response.function_call_arguments.done" not in types(d.run_out())
    d.send({"type": "response.create", "response": {"tool_choice": {"type": "function", "name": "get_weather"}}})
    out = d.run_out()
    assert [e["name"] for e in out if e["type"] == "response.function_call_arguments.done"] == ["get_weather"]


def test_out_of_band_runs_alongside_in_band() -> None:
    """conversation "none" responses do not take the slot and stay out of the conversation."""
    d = Driver()
    d.send(no_vad())
    d.user("hello there [len: 12]")
    inband = d.send({"type": "response.create", "event_id": "a"})
    oob = d.send(
        {
            "type": "response.create",
            "event_id": "b",
            "response": {
                "conversation": "none",
                "metadata": {"topic": "classify"},
                "output_modalities": ["text"],
                "input": [
                    {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "[say: positive]"}]}
                ],
            },
        }
    )
    assert not errors(oob)
    oob_created = next(e for e in oob if e["type"] == "response.created")["response"]
    assert oob_created["conversation_id"] is None and oob_created["metadata"] == {"topic": "classify"}
    d.run_out()
    dones = {e["response"]["id"]: e["response"] for e in d.log if e["type"] == "response.done"}
    assert len(dones) == 2 and all(r["status"] == "completed" for r in dones.values())
    oob_done = dones[oob_created["id"]]
    assert oob_done["output"][0]["content"][0]["text"] == "positive"
    oob_item = oob_done["output"][0]["id"]
    added = [e["item"]["id"] for e in d.log if e["type"] == "conversation.item.added"]
    assert oob_item not in added
    assert next(e for e in inband if e["type"] == "response.created")["response"]["id"] in dones
    # An OOB response alone does not block an in-band create.
    d.send({"type": "response.create", "response": {"conversation": "none"}})
    assert not errors(d.send({"type": "response.create"}))


def test_session_update_unknown_and_missing_parameters() -> None:
    """Unknown session fields and a missing session.type are refused, changing nothing."""
    d = Driver()
    [err] = errors(d.send({"type": "session.update", "event_id": "u1", "session": {"type": "realtime", "foo": 1}}))
    assert err == {
        "type": "invalid_request_error",
        "code": "unknown_parameter",
        "message": "Unknown parameter: 'session.foo'.",
        "param": "session.foo",
        "event_id": "u1",
    }
    [err] = errors(d.send({"type": "session.update", "session": {"type": "realtime", "audio": {"input": {"bar": 1}}}}))
    assert err["param"] == "session.audio.input.bar"
    [err] = errors(d.send({"type": "session.update", "session": {"type": "realtime", "modalities": ["text"]}}))
    assert err["message"] == "Unknown parameter: 'session.modalities'."
    [err] = errors(d.send({"type": "session.update", "session": {"instructions": "x"}}))
    assert err["code"] == "missing_required_parameter"
    assert err["message"] == "Missing required parameter: 'session.type'."
    assert err["param"] == "session.type"
    [err] = errors(
        d.send({"type": "session.update", "session": {"type": "realtime", "instructions": "ok", "tools": 5}})
    )
    assert err["code"] == "invalid_type"
    assert d.s.session["instructions"] != "ok"


def test_session_update_merges_deeply() -> None:
    """session.update merges audio deeply; turn_detection null disables VAD."""
    d = Driver()
    out = d.send(
        {
            "type": "session.update",
            "session": {
                "type": "realtime",
                "instructions": "Be brief.",
                "audio": {"output": {"voice": "cedar"}, "input": {"turn_detection": None}},
            },
        }
    )
    sess = out[0]["session"]
    assert out[0]["type"] == "session.updated"
    assert sess["instructions"] == "Be brief."
    assert sess["audio"]["output"] == {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "cedar", "speed": 1.0}
    assert sess["audio"]["input"]["turn_detection"] is None
    assert sess["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
    assert "input_audio_buffer.speech_started" not in types(d.append(speech_turn()))


def test_voice_cannot_change_after_audio() -> None:
    """Once the session produced audio, a voice change is cannot_update_voice."""
    d = Driver()
    d.send(no_vad())
    same = {"type": "session.update", "session": {"type": "realtime", "audio": {"output": {"voice": "marin"}}}}
    d.send({"type": "response.create"})
    d.run_out()
    assert not errors(d.send(same))
    [err] = errors(
        d.send({"type": "session.update", "session": {"type": "realtime", "audio": {"output": {"voice": "ash"}}}})
    )
    assert err["code"] == "cannot_update_voice"
    assert err["message"] == "Cannot update a conversation's voice if assistant audio is present."
    assert d.s.session["audio"]["output"]["voice"] == "marin"


def test_unknown_event_and_bad_json() -> None:
    """Unknown types get invalid_value on 'type'; frames that are not JSON objects get invalid_json."""
    d = Driver()
    [err] = errors(d.send({"type": "response.explode", "event_id": "q"}))
    assert err["code"] == "invalid_value" and err["param"] == "type" and err["event_id"] == "q"
    assert "'response.create'" in err["message"]
    d.s.receive_raw("{not json", d.t)
    [err] = errors(d.take())
    assert err["code"] == "invalid_json"
    assert err["message"].startswith("Invalid event: failed to parse JSON value.")
    d.s.receive_raw(b"\x00\x01", d.t)
    [err] = errors(d.take())
    assert err["code"] == "invalid_event"
    assert err["message"] == "Expected a text WebSocket message; binary frames are not supported."
    [err] = errors(d.send([1, 2]))  # type: ignore[arg-type]
    assert err["code"] == "invalid_json"
    stats = d.s.stats()
    assert stats["errors"]["invalid_json"] == 2 and stats["client_events"]["response.explode"] == 1


def test_item_create_delete_retrieve_and_previous_item() -> None:
    """Items can be inserted after a given item, retrieved and deleted."""
    d = Driver()
    a = d.user("first")[0]["item"]["id"]
    b = d.user("second")[0]
    assert b["previous_item_id"] == a
    c = d.send(
        {
            "type": "conversation.item.create",
            "previous_item_id": "root",
            "item": {
                "id": "item_custom",
                "type": "message",
                "role": "system",
                "content": [{"type": "input_text", "text": "sys"}],
            },
        }
    )[0]
    assert c["item"]["id"] == "item_custom" and c["previous_item_id"] is None
    assert d.send({"type": "conversation.item.retrieve", "item_id": a})[0]["item"]["content"][0]["text"] == "first"
    assert d.send({"type": "conversation.item.delete", "item_id": a})[0] == {
        "type": "conversation.item.deleted",
        "event_id": d.log[-1]["event_id"],
        "item_id": a,
    }
    assert (
        errors(d.send({"type": "conversation.item.delete", "item_id": a}))[0]["code"] == "item_delete_invalid_item_id"
    )
    assert errors(
        d.send(
            {
                "type": "conversation.item.create",
                "previous_item_id": "item_none",
                "item": {"type": "message", "role": "user", "content": []},
            }
        )
    )
    assert (
        errors(
            d.send({"type": "conversation.item.create", "item": {"type": "message", "role": "robot", "content": []}})
        )[0]["param"]
        == "item.role"
    )


def test_text_modality_streams_text() -> None:
    """output_modalities ["text"] streams output_text deltas that add up to the done text."""
    d = Driver()
    d.send({"type": "session.update", "session": {"type": "realtime", "output_modalities": ["text"]}})
    d.user("hi [say: plain text reply]")
    d.send({"type": "response.create"})
    d.run_out()
    deltas = "".join(e["delta"] for e in d.log if e["type"] == "response.output_text.delta")
    assert deltas == "plain text reply"
    assert "response.output_audio.delta" not in types(d.log)


def test_max_output_tokens_makes_incomplete() -> None:
    """A response cut by max_output_tokens ends incomplete with that reason."""
    d = Driver()
    d.user("talk [len: 40]")
    d.send({"type": "response.create", "response": {"max_output_tokens": 10}})
    done = last_done(d.run_out())
    assert done["status"] == "incomplete"
    assert done["status_details"] == {"type": "incomplete", "reason": "max_output_tokens"}


def test_withheld_done_keeps_response_active_until_cancel() -> None:
    """withhold_done: the stream ends without response.done; the slot stays taken until cancel."""
    d = Driver()
    d.send(no_vad())
    d.s.withhold_done(1)
    d.send({"type": "response.create"})
    out = d.run_out()
    assert "response.output_item.done" in types(out) and "response.done" not in types(out)
    assert errors(d.send({"type": "response.create"}))[0]["code"] == "conversation_already_has_active_response"
    out = d.send({"type": "response.cancel"})
    assert types(out) == ["response.done"] and out[0]["response"]["status"] == "cancelled"
    assert d.s.stats()["withheld"] == 1


def test_session_expires() -> None:
    """At the deadline the session sends session_expired and asks to be closed."""
    d = Driver()
    d.s.expire_at(5.0)
    assert d.at(4.9) == []
    [err] = errors(d.at(5.0))
    assert err["code"] == "session_expired"
    assert err["message"] == "Your session hit the maximum duration of 60 minutes."
    assert d.s.close_request == (1000, "session expired")
    assert d.send({"type": "response.create"}) == []


def test_pacing_follows_the_clock() -> None:
    """At speed 1 audio leaves in real time; at speed 10 ten times faster; unpaced at once."""
    for speed, horizon in ((1.0, 1.0), (10.0, 0.1)):
        d = Driver(speed=speed)
        d.send(no_vad())
        d.send({"type": "response.create"})
        out = d.at(horizon)
        ms = sum(len(base64.b64decode(e["delta"])) for e in out if e["type"] == "response.output_audio.delta") // 48
        assert 1000 <= ms <= 1100, (speed, ms)
        assert "response.done" not in types(out)
    d = Driver(speed=None)
    assert "response.done" in types(d.send({"type": "response.create"}))


def test_first_output_delay_and_min_response() -> None:
    """first_output_ms delays the first item; min_response_ms keeps unpaced responses active."""
    d = Driver(first_output_ms=300.0)
    d.send({"type": "response.create"})
    assert "response.output_item.added" not in types(d.at(0.29))
    assert "response.output_item.added" in types(d.at(0.3))
    d = Driver(speed=None, min_response_ms=50.0)
    d.send({"type": "response.create"})
    assert errors(d.send({"type": "response.create"}))[0]["code"] == "conversation_already_has_active_response"
    assert "response.done" in types(d.at(0.05))


def test_deterministic_for_a_seed() -> None:
    """The same inputs and seed give byte-identical event streams."""

    def run(seed: int) -> list[dict[str, Any]]:
        d = Driver(seed=seed, speed=None)
        d.user("what is the weather in Paris")
        d.send({"type": "response.create"})
        return d.log

    assert run(4) == run(4)
    assert run(4) != run(5)


client_events = st.sampled_from(
    [
        {"type": "response.create"},
        {"type": "response.create", "response": {"conversation": "none"}},
        {"type": "response.cancel"},
        {
            "type": "conversation.item.create",
            "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "order 5 weather"}]},
        },
        {
            "type": "input_audio_buffer.append",
            "audio": base64.b64encode(synthesize("hello there friend", seed=1).pcm).decode(),
        },
        {"type": "input_audio_buffer.append", "audio": base64.b64encode(silence(700)).decode()},
        {"type": "input_audio_buffer.commit"},
        {"type": "input_audio_buffer.clear"},
        {"type": "session.update", "session": {"type": "realtime", "tools": [ORDER_TOOL, WEATHER_TOOL]}},
        {"type": "session.update", "session": {"type": "realtime", "audio": {"output": {"voice": "ash"}}}},
        {"type": "conversation.item.truncate", "item_id": "item_x", "content_index": 0, "audio_end_ms": 5},
        {"type": "bogus"},
    ]
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(client_events, st.floats(min_value=0.0, max_value=0.5)), max_size=25))
def test_any_sequence_is_valid_and_never_overlaps(steps: list[tuple[dict[str, Any], float]]) -> None:
    """Any client sequence: no exception, every event valid, in-band responses never overlap."""
    d = Driver(speed=4.0)
    for event, dt in steps:
        d.at(d.t + dt)
        d.send(event)
    d.run_out()
    active: set[str] = set()
    inband: set[str] = set()
    for ev in d.log:
        if ev["type"] == "response.created":
            r = ev["response"]
            if r["conversation_id"] is not None:
                assert not (active & inband), "two in-band responses at once"
                inband.add(r["id"])
            active.add(r["id"])
        elif ev["type"] == "response.done":
            active.discard(ev["response"]["id"])
    assert not active, "every response ended with response.done"


@pytest.mark.parametrize(
    ("event", "param"),
    [
        ({"type": "conversation.item.truncate", "item_id": "x", "content_index": 0}, "audio_end_ms"),
        (
            {"type": "conversation.item.truncate", "item_id": "x", "content_index": 0, "audio_end_ms": "5"},
            "audio_end_ms",
        ),
        ({"type": "input_audio_buffer.append"}, "audio"),
        ({"type": "input_audio_buffer.append", "audio": "***"}, "audio"),
        ({"type": "conversation.item.create"}, "item"),
        ({"type": "session.update"}, "session"),
        (
            {"type": "response.create", "response": {"output_modalities": ["text", "audio"]}},
            "response.output_modalities",
        ),
        ({"type": "response.create", "response": {"metadata": {"k": 1}}}, "response.metadata.k"),
    ],
)
def test_malformed_client_events_name_the_param(event: dict[str, Any], param: str) -> None:
    """Malformed client events become errors naming the offending parameter."""
    d = Driver()
    [err] = errors(d.send(event))
    assert err["param"] == param
