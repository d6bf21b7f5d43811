"""The compact conversation store behind Session.items and re-seeding."""

from __future__ import annotations

import base64
import gc
import hashlib
import json
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest

from rtqueue.history import History
from rtqueue.reconnect import reseed_plan


def raw_items() -> list[dict[str, Any]]:
    """Items as the server sends them, with fields the store does not keep."""
    return [
        {"id": "item_sys", "object": "realtime.item", "type": "message", "role": "system", "status": "completed",
         "content": [{"type": "input_text", "text": "Be brief."}]},
        {"id": "item_u1", "object": "realtime.item", "type": "message", "role": "user", "status": "completed",
         "content": [{"type": "input_audio", "transcript": None, "audio": "AAAA" * 500}]},
        {"id": "item_a1", "object": "realtime.item", "type": "message", "role": "assistant", "status": "completed",
         "content": [{"type": "output_audio", "transcript": "Hello there."}]},
        {"id": "item_u2", "object": "realtime.item", "type": "message", "role": "user", "status": "completed",
         "content": [{"type": "input_text", "text": "Order 42?"},
                     {"type": "input_image", "image_url": "data:image/png;base64," + "B" * 2000}]},
        {"id": "item_fc", "object": "realtime.item", "type": "function_call", "status": "completed",
         "call_id": "call_1", "name": "lookup", "arguments": '{"order": 42}'},
        {"id": "item_fo", "object": "realtime.item", "type": "function_call_output", "call_id": "call_1",
         "output": '{"status": "shipped"}'},
        {"id": "item_a2", "object": "realtime.item", "type": "message", "role": "assistant",
         "status": "incomplete", "content": [{"type": "output_audio", "transcript": None}]},
        {"id": "item_mcp", "object": "realtime.item", "type": "mcp_call", "server_label": "x", "name": "y"},
        {"id": "item_dangling", "type": "function_call", "call_id": "call_2", "name": "slow", "arguments": "{}"},
    ]


def test_items_keep_what_reseeding_needs_and_drop_the_rest() -> None:
    h = History()
    for item in raw_items():
        h.put(item)
    out = {i["id"]: i for i in h.items()}
    assert list(out) == [i["id"] for i in raw_items()]
    assert out["item_a1"] == {"id": "item_a1", "type": "message", "role": "assistant", "status": "completed",
                              "content": [{"type": "output_audio", "transcript": "Hello there."}]}
    assert out["item_u1"]["content"] == [{"type": "input_audio", "transcript": None}]  # no audio kept
    image = base64.b64decode("B" * 2000)  # an image is kept as a reference, never its bytes
    assert out["item_u2"]["content"][1] == {"type": "input_image", "image": hashlib.sha256(image).hexdigest(),
                                            "bytes": len(image), "mime_type": "image/png"}
    assert out["item_fc"] == {"id": "item_fc", "type": "function_call", "status": "completed", "call_id": "call_1",
                              "name": "lookup", "arguments": '{"order": 42}'}
    assert out["item_fo"]["output"] == '{"status": "shipped"}'
    assert out["item_mcp"] == {"id": "item_mcp", "type": "mcp_call", "name": "y"}
    assert all("object" not in i for i in out.values())


@pytest.mark.parametrize("limit", [None, 3])
@pytest.mark.parametrize("pending", [set(), {"call_2"}])
def test_reseed_plan_is_the_same_from_the_store_as_from_raw_items(limit: int | None, pending: set[str]) -> None:
    h = History()
    for item in raw_items():
        h.put(item)
    h.set_transcript("item_u1", "Where is my order?")
    raw = raw_items()
    raw[1]["content"][0]["transcript"] = "Where is my order?"
    assert reseed_plan(h.items(), pending_calls=pending.__contains__, limit=limit) == reseed_plan(
        raw, pending_calls=pending.__contains__, limit=limit
    )


def test_update_keeps_place_and_a_known_transcript() -> None:
    h = History()
    h.put({"id": "a", "type": "message", "role": "user", "status": "in_progress",
           "content": [{"type": "input_audio", "transcript": None}]})
    h.put({"id": "b", "type": "message", "role": "assistant", "content": []})
    h.set_transcript("a", "hi")
    h.put({"id": "a", "type": "message", "role": "user", "status": "completed",
           "content": [{"type": "input_audio", "transcript": None}]})  # conversation.item.done, no transcript
    items = h.items()
    assert [i["id"] for i in items] == ["a", "b"]
    assert items[0]["status"] == "completed"
    assert items[0]["content"] == [{"type": "input_audio", "transcript": "hi"}]
    h.set_transcript("missing", "x")  # unknown ids are ignored
    assert "missing" not in h


def test_delete_limit_and_junk() -> None:
    h = History(limit=3)
    for i in range(5):
        h.put({"id": f"i{i}", "type": "message", "role": "user", "content": [{"type": "input_text", "text": str(i)}]})
    assert [i["id"] for i in h.items()] == ["i2", "i3", "i4"]
    h.delete("i3")
    h.delete("nope")
    assert [i["id"] for i in h.items()] == ["i2", "i4"] and len(h) == 2
    for junk in (None, "x", {"type": "message"}, {"id": 5}, {"id": "ok", "content": "not a list"}):
        h.put(junk)  # type: ignore[arg-type]
    assert h.items()[-1] == {"id": "ok", "type": None}
    items = h.items()
    items[0]["content"].append({"type": "input_text", "text": "mutated"})
    assert len(h.items()[0]["content"]) == 1  # callers get copies
    with pytest.raises(ValueError):
        History(limit=-1)


def _allocated(build: Callable[[], Any]) -> tuple[Any, int]:
    """What ``build()`` returns, and the bytes still allocated for it once it returned (tracemalloc)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = build()
        gc.collect()
        return kept, tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_the_store_is_several_times_smaller_than_parsed_items() -> None:
    """Why the store exists: at 200 sessions the raw history was most of the memory growth."""
    frames = []
    for k in range(300):
        role = "user" if k % 2 else "assistant"
        part = {"type": "input_audio", "transcript": None} if role == "user" else {
            "type": "output_audio", "transcript": f"Answer number {k}: your order ships tomorrow morning."}
        frames.append(json.dumps({"type": "conversation.item.done", "event_id": f"ev{k}", "item": {
            "id": f"item_{k:020d}", "object": "realtime.item", "type": "message", "role": role,
            "status": "completed", "content": [part]}}))

    def store() -> History:
        h = History()
        for f in frames:
            h.put(json.loads(f)["item"])
        return h

    parsed, raw_bytes = _allocated(lambda: [json.loads(f)["item"] for f in frames])  # what the session used to keep
    h, store_bytes = _allocated(store)
    assert len(parsed) == len(h) == 300
    assert store_bytes * 2.5 < raw_bytes, (store_bytes, raw_bytes)
