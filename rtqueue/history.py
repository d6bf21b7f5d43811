"""The conversation as this client saw it: a bounded, compact item store.

A session remembers the conversation items the server announced
(``conversation.item.added`` / ``.done``), for :attr:`Session.items` and for
re-seeding a new socket after a reconnect (:func:`rtqueue.reconnect.reseed_plan`).
It keeps only what those need: ids, types, roles, status, text and
transcripts, and function-call fields. Audio, images and fields it does not
know are dropped.

Why not keep the server's dicts: a parsed item is about 1.5 KB (every dict
carries its own copy of each key, every value is a fresh string), and at 200
sessions the raw history was most of the benchmark's memory growth
(benchmarks/bench_scale.py). A record here is a few hundred bytes, mostly the
text itself. The store holds at most ``limit`` items, oldest dropped first.
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

__all__ = ["History"]

_TEXT_PARTS = frozenset({"input_text", "output_text", "text"})


def _word(value: Any) -> str | None:
    """A short vocabulary value (type, role, status), shared across records."""
    return sys.intern(value) if isinstance(value, str) and len(value) <= 40 else None


class _Record:
    __slots__ = ("arguments", "call_id", "id", "name", "output", "parts", "role", "status", "type")

    def __init__(self, item: Mapping[str, Any]) -> None:
        self.id: str = item["id"]
        self.type = _word(item.get("type"))
        self.role = _word(item.get("role"))
        self.status = _word(item.get("status"))
        call_id, name = item.get("call_id"), item.get("name")
        self.call_id = call_id if isinstance(call_id, str) else None
        self.name = name if isinstance(name, str) else None
        args, output = item.get("arguments"), item.get("output")
        self.arguments = args if isinstance(args, str) else None
        self.output = output if isinstance(output, str) else None
        parts: list[tuple[str, str | None]] = []
        content = item.get("content")
        for c in content if isinstance(content, list) else ():
            if isinstance(c, Mapping) and isinstance(c.get("type"), str):
                ctype = sys.intern(c["type"])
                text = c.get("text") if ctype in _TEXT_PARTS else c.get("transcript")
                parts.append((ctype, text if isinstance(text, str) else None))
        self.parts: tuple[tuple[str, str | None], ...] = tuple(parts)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "type": self.type}
        for key in ("role", "status", "call_id", "name", "arguments", "output"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.parts or self.type == "message":
            out["content"] = [
                {"type": ctype, "text" if ctype in _TEXT_PARTS else "transcript": text} for ctype, text in self.parts
            ]
        return out


class History:
    """Conversation items in the order first seen, at most ``limit`` of them. Thread-safe."""

    def __init__(self, limit: int = 500) -> None:
        if not isinstance(limit, int) or limit < 0:
            raise ValueError("limit must be an int >= 0")
        self._limit = limit
        self._lock = threading.Lock()
        self._records: OrderedDict[str, _Record] = OrderedDict()

    def put(self, item: Mapping[str, Any]) -> None:
        """Add or update an item (a server item dict with a string ``id``; others are ignored).

        An update keeps the item's place; a transcript already filled in by
        :meth:`set_transcript` survives an update that has none.
        """
        if not isinstance(item, Mapping) or not isinstance(item.get("id"), str):
            return
        record = _Record(item)
        with self._lock:
            old = self._records.get(record.id)
            if old is not None:
                known = dict(old.parts)
                record.parts = tuple((t, x if x is not None else known.get(t)) for t, x in record.parts)
            self._records[record.id] = record
            while len(self._records) > self._limit:
                self._records.popitem(last=False)

    def delete(self, item_id: str) -> None:
        """Forget an item (``conversation.item.deleted``)."""
        with self._lock:
            self._records.pop(item_id, None)

    def set_transcript(self, item_id: str, transcript: str) -> None:
        """Fill in an input audio transcript (``...input_audio_transcription.completed``)."""
        with self._lock:
            record = self._records.get(item_id)
            if record is not None:
                record.parts = tuple(
                    (t, transcript if t == "input_audio" else x) for t, x in record.parts
                )

    def __contains__(self, item_id: object) -> bool:
        with self._lock:
            return item_id in self._records

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)

    def items(self) -> list[dict[str, Any]]:
        """The items as fresh dicts in the server's shape (``id``, ``type``, ``role``, ``content``...)."""
        with self._lock:
            records = list(self._records.values())
        return [r.as_dict() for r in records]
