"""The conversation as this client saw it: a bounded, compact item store.

A session remembers the conversation items the server announced
(``conversation.item.added`` / ``.done``), for :attr:`Session.items` and for
re-seeding a new socket after a reconnect (:func:`rtqueue.reconnect.reseed_plan`).
It keeps only what those need: ids, types, roles, status, text and
transcripts, and function-call fields. Audio and fields it does not know are
dropped; an image is kept as a reference (its SHA-256 and size, see
:class:`~rtqueue.images.ImageRef`), never its bytes.

Why not keep the server's dicts: a parsed item is about 1.5 KB (every dict
carries its own copy of each key, every value is a fresh string), and at 200
sessions the raw history was most of the benchmark's memory growth
(benchmarks/bench_scale.py). A record here is a few hundred bytes, mostly the
text itself. The store holds at most ``limit`` items, oldest dropped first.
"""

from __future__ import annotations

import sys
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .images import ImageRef, image_ref

__all__ = ["History", "reseed_plan"]

_TEXT_PARTS = frozenset({"input_text", "output_text", "text"})

#: Characters kept of one text, transcript, arguments or output; the rest is cut.
MAX_PART_CHARS = 100_000
#: Characters of text the whole store keeps; the oldest items go first past it.
MAX_TOTAL_CHARS = 1_000_000
TRUNCATED_MARK = " [truncated by rtqueue]"


def _cut(text: str | None) -> str | None:
    if text is None or len(text) <= MAX_PART_CHARS:
        return text
    return text[:MAX_PART_CHARS] + TRUNCATED_MARK


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
        self.arguments = _cut(args) if isinstance(args, str) else None
        self.output = _cut(output) if isinstance(output, str) else None
        parts: list[tuple[str, str | ImageRef | None]] = []
        content = item.get("content")
        for c in content if isinstance(content, list) else ():
            if isinstance(c, Mapping) and isinstance(c.get("type"), str):
                ctype = sys.intern(c["type"])
                if ctype == "input_image":
                    parts.append((ctype, image_ref(c)))
                    continue
                text = c.get("text") if ctype in _TEXT_PARTS else c.get("transcript")
                parts.append((ctype, _cut(text) if isinstance(text, str) else None))
        self.parts: tuple[tuple[str, str | ImageRef | None], ...] = tuple(parts)

    @property
    def size(self) -> int:
        """Characters of text this record holds."""
        return (len(self.arguments or "") + len(self.output or "")
                + sum(len(x) for _, x in self.parts if isinstance(x, str)))

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "type": self.type}
        for key in ("role", "status", "call_id", "name", "arguments", "output"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.parts or self.type == "message":
            out["content"] = [_part(ctype, x) for ctype, x in self.parts]
        return out


def _part(ctype: str, value: str | ImageRef | None) -> dict[str, Any]:
    if ctype == "input_image":
        return {"type": ctype, **(value.to_dict() if isinstance(value, ImageRef) else {})}
    return {"type": ctype, "text" if ctype in _TEXT_PARTS else "transcript": value}


class History:
    """Conversation items in the order first seen: at most ``limit`` of them and
    ``max_chars`` characters of text (oldest dropped first; one text longer than
    :data:`MAX_PART_CHARS` is cut and ends with :data:`TRUNCATED_MARK`).

    Not thread-safe on its own: the conversation core owns it, under the
    session's mutex.
    """

    def __init__(self, limit: int = 500, *, max_chars: int = MAX_TOTAL_CHARS) -> None:
        if not isinstance(limit, int) or limit < 0:
            raise ValueError("limit must be an int >= 0")
        self._limit = limit
        self._max_chars = max_chars
        self._chars = 0
        self._records: OrderedDict[str, _Record] = OrderedDict()

    @property
    def limit(self) -> int:
        """The most items kept."""
        return self._limit

    @property
    def records(self) -> Mapping[str, object]:
        """The compact records by item id (memory diagnostics; do not change)."""
        return self._records

    @property
    def chars(self) -> int:
        """Characters of text held now."""
        return self._chars

    def put(self, item: Mapping[str, Any]) -> None:
        """Add or update an item (a server item dict with a string ``id``; others are ignored).

        An update keeps the item's place; a transcript already filled in by
        :meth:`set_transcript` survives an update that has none. An
        ``input_image`` part is kept as ``{"type": "input_image", "image":
        sha256, "bytes": n, "mime_type": ...}``.
        """
        if not isinstance(item, Mapping) or not isinstance(item.get("id"), str):
            return
        record = _Record(item)
        old = self._records.get(record.id)
        if old is not None:
            known = dict(old.parts)
            record.parts = tuple((t, x if x is not None else known.get(t)) for t, x in record.parts)
            self._chars -= old.size
        self._records[record.id] = record
        self._chars += record.size
        while len(self._records) > self._limit or (self._chars > self._max_chars and len(self._records) > 1):
            _, gone = self._records.popitem(last=False)
            self._chars -= gone.size

    def delete(self, item_id: str) -> None:
        """Forget an item (``conversation.item.deleted``)."""
        gone = self._records.pop(item_id, None)
        if gone is not None:
            self._chars -= gone.size

    def replace(self, item_ids: Iterable[str], item: Mapping[str, Any]) -> None:
        """Forget ``item_ids`` and put ``item`` first, in their place (a summary that stands for them)."""
        for gone in item_ids:
            self.delete(gone)
        self.put(item)
        iid = item.get("id")
        if isinstance(iid, str) and iid in self._records:
            self._records.move_to_end(iid, last=False)

    def set_transcript(self, item_id: str, transcript: str) -> None:
        """Fill in an input audio transcript (``...input_audio_transcription.completed``)."""
        record = self._records.get(item_id)
        if record is not None:
            self._chars -= record.size
            record.parts = tuple(
                (t, _cut(transcript) if t == "input_audio" else x) for t, x in record.parts
            )
            self._chars += record.size

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._records

    def __len__(self) -> int:
        return len(self._records)

    def items(self) -> list[dict[str, Any]]:
        """The items as fresh dicts in the server's shape (``id``, ``type``, ``role``, ``content``...)."""
        records = list(self._records.values())
        return [r.as_dict() for r in records]


def reseed_plan(
    items: Iterable[dict[str, Any]],
    *,
    pending_calls: Callable[[str], bool] = lambda _cid: False,
    limit: int | None = None,
) -> tuple[list[dict[str, Any]], Counter[str]]:
    """Items to re-create on a new socket, and what cannot be carried, by reason.

    Reasons: ``dangling_call``, ``audio`` (a message with audio and no
    transcript), ``incomplete``, ``other`` (item types not re-created),
    ``trimmed`` (past ``limit``) and ``image``: each image of a message (the
    history holds a reference, not the bytes; the message's text still goes).

    ``pending_calls(call_id)`` says whether a function call's output is still
    on its way (its tools run or its output is queued); such a call is
    carried even though its output is not in ``items`` yet. ``limit`` keeps
    only the newest items (the rest count as ``trimmed``).
    """
    items = [i for i in items if isinstance(i, dict)]
    outputs = {i.get("call_id") for i in items if i.get("type") == "function_call_output"}
    dropped: Counter[str] = Counter()
    seeds: list[dict[str, Any]] = []
    carried_calls: set[str] = set()
    for item in items:
        typ = item.get("type")
        iid = item.get("id")
        base: dict[str, Any] = {"id": iid} if isinstance(iid, str) and iid else {}
        if typ == "function_call":
            cid = item.get("call_id")
            if not isinstance(cid, str) or not (cid in outputs or pending_calls(cid)):
                dropped["dangling_call"] += 1
                continue
            carried_calls.add(cid)
            seeds.append({**base, "type": "function_call", "call_id": cid, "name": str(item.get("name") or ""),
                          "arguments": str(item.get("arguments") or "")})
        elif typ == "function_call_output":
            cid = item.get("call_id")
            if cid not in carried_calls:
                dropped["dangling_call"] += 1
                continue
            seeds.append({**base, "type": "function_call_output", "call_id": cid,
                          "output": str(item.get("output") or "")})
        elif typ == "message":
            seed, why = _message_seed(item, base)
            images = _images(item)
            if images:
                dropped["image"] += images
            if seed is not None:
                seeds.append(seed)
            elif not images or why != "incomplete":  # an image-only message is counted once, as its image
                dropped[why] += 1
        else:
            dropped["other"] += 1
    if limit is not None and len(seeds) > limit:
        cut = len(seeds) - limit
        dropped["trimmed"] += cut
        seeds = seeds[cut:]
        # An output whose call was trimmed away would be refused: drop it too.
        calls = {s["call_id"] for s in seeds if s["type"] == "function_call"}
        kept = [s for s in seeds if s["type"] != "function_call_output" or s["call_id"] in calls]
        dropped["trimmed"] += len(seeds) - len(kept)
        seeds = kept
    return seeds, dropped


def _images(item: dict[str, Any]) -> int:
    """How many ``input_image`` parts a message holds (none can be re-sent: only references are kept)."""
    parts = item.get("content")
    return sum(1 for c in parts if isinstance(c, dict) and c.get("type") == "input_image") \
        if isinstance(parts, list) else 0


def _message_seed(item: dict[str, Any], base: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    role = item.get("role")
    if role not in ("user", "assistant", "system"):
        return None, "other"
    kind = "output_text" if role == "assistant" else "input_text"
    content: list[dict[str, str]] = []
    saw_audio = False
    parts = item.get("content")
    for c in parts if isinstance(parts, list) else ():
        if not isinstance(c, dict):
            continue
        ctype = c.get("type")
        if ctype in ("input_text", "output_text", "text"):
            text = c.get("text")
        else:
            saw_audio = saw_audio or ctype in ("input_audio", "output_audio", "audio")
            text = c.get("transcript")
        if isinstance(text, str) and text:
            content.append({"type": kind, "text": text})
    if content:
        return {**base, "type": "message", "role": role, "content": content}, ""
    if item.get("status") in ("in_progress", "incomplete"):
        return None, "incomplete"
    return None, "audio" if saw_audio else "incomplete"
