"""Planned session recycling, the decisions (no I/O, no threads, no clock of its own).

The real service ends a session after 60 minutes (``session_expired``). A
session recycled *before* that, at a moment when nothing is in flight, moves
to a new socket with nothing lost and nothing cut off. This module holds the
questions that plan asks, as pure functions of state and a clock value passed
in; :mod:`rtqueue.recycler` is the thread that asks them and
:meth:`rtqueue.reconnect.Reconnector.recycle` does the switch.

- **When** (:class:`RecycleWindow`): from ``recycle_after`` seconds after
  ``session.created`` the session looks for a quiet moment; from ``margin``
  seconds before the cap (the server's ``expires_at`` when it reports one,
  else ``created + cap``) it recycles whatever is going on.
- **Quiet** (:class:`Activity`): no request of ours unanswered (in-band or out
  of band, queued in the gate or streaming), no response streaming, no tool
  job (a tool chain holds the gate), no ``session.update`` unanswered, no
  control event queued on the writer, and the user not speaking (between
  ``input_audio_buffer.speech_started`` and ``speech_stopped``).
- **How much to carry** (:func:`split_for_summary`, :func:`apply_summary`): a
  long history is summarised by an out-of-band response (made with
  :func:`summary_request` on the old socket, before the switch); the new
  session is seeded with that summary as one system message plus the last
  ``keep_turns`` user turns verbatim.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import attrs

from .protocol import new_event_id

__all__ = [
    "SUMMARY_INSTRUCTIONS",
    "SUMMARY_PREFIX",
    "SUMMARY_PURPOSE",
    "Activity",
    "RecycleWindow",
    "SessionClock",
    "Summary",
    "apply_summary",
    "make_summary",
    "seed_chars",
    "session_clock",
    "split_for_summary",
    "summary_input",
    "summary_request",
]

#: ``response.metadata["rtqueue_purpose"]`` of the out-of-band summary response (apps see its events).
SUMMARY_PURPOSE = "recycle_summary"
#: The summary message on the new session starts with this.
SUMMARY_PREFIX = "Summary of the conversation before this point (the session was renewed): "
#: What the out-of-band summary response is asked to do.
SUMMARY_INSTRUCTIONS = (
    "Summarize the conversation above for an assistant that will continue it. Keep every fact the "
    "user gave (names, numbers, ids), every tool result, every decision and every open request; "
    "drop greetings and small talk. Plain text, at most 250 words."
)
#: Characters of history sent to the summary response at most (the newest are kept).
SUMMARY_INPUT_CHARS = 60_000
#: Characters of one item sent to the summary response at most.
SUMMARY_PART_CHARS = 4_000

Decision = Literal["wait", "recycle", "force"]


@attrs.frozen
class SessionClock:
    """When the session on one socket began and when the server will end it.

    ``generation`` is the socket's (it changes with every new socket);
    ``created`` the monotonic time ``session.created`` was read;
    ``expires_in`` the seconds from then to the server's ``expires_at``
    (``None`` when the server did not say, or named a time already past).
    """

    generation: int
    session_id: str | None
    created: float
    expires_in: float | None = None


def session_clock(event: Mapping[str, Any], *, generation: int, now: float, wall: float) -> SessionClock:
    """The :class:`SessionClock` of a ``session.created`` read at monotonic ``now`` / epoch ``wall``."""
    session = event.get("session")
    session = session if isinstance(session, Mapping) else {}
    sid = session.get("id")
    expires = session.get("expires_at")
    expires_in = None
    if isinstance(expires, (int, float)) and not isinstance(expires, bool) and expires > wall:
        # Only a time still to come: one in the past is a clock far off (or a fake one), not a cap.
        expires_in = float(expires) - wall
    return SessionClock(generation, sid if isinstance(sid, str) else None, now, expires_in)


@attrs.frozen
class RecycleWindow:
    """From ``start`` a quiet moment recycles the session; from ``deadline`` anything does; ``cap`` is the end."""

    start: float
    deadline: float
    cap: float

    @classmethod
    def plan(cls, clock: SessionClock, *, after: float, margin: float, cap: float) -> RecycleWindow:
        """The window of a session: ``after`` seconds from its creation until ``margin`` before its cap.

        The cap is the server's ``expires_at`` when it gave one (it wins even
        when it is later than ``cap`` seconds: the server knows), else
        ``created + cap``. A start later than the deadline is moved to it.
        """
        length = clock.expires_in if clock.expires_in is not None else cap
        end = clock.created + length
        deadline = max(clock.created, end - margin)
        return cls(min(clock.created + after, deadline), deadline, end)

    def decide(self, now: float, *, busy: bool) -> Decision:
        """``"force"`` from the deadline on, ``"recycle"`` in the window when not ``busy``, else ``"wait"``."""
        if now >= self.deadline:
            return "force"
        if now >= self.start and not busy:
            return "recycle"
        return "wait"


@attrs.frozen
class Activity:
    """What is going on in a session, for the quiet check (counts; ``speaking`` a flag)."""

    requests: int = 0  # our response.creates not done (in band or out of band), incl. queued
    responses: int = 0  # responses streaming (ours or the server's)
    gate: int = 0  # in-band gate entries: pending, active, held by a tool chain
    queued: int = 0  # control events on the writer, not sent
    updates: int = 0  # session.updates not answered
    tools: int = 0  # tool jobs in the core or on the worker
    speaking: bool = False  # between speech_started and speech_stopped

    def reasons(self) -> tuple[str, ...]:
        """Why the session is not quiet (empty: it is)."""
        out = [name for name in ("requests", "responses", "gate", "queued", "updates", "tools") if getattr(self, name)]
        if self.speaking:
            out.append("speaking")
        return tuple(out)

    def plus(self, *, gate: int, queued: int, tools: int) -> Activity:
        """This activity with the shell's part filled in (the gate, the writer, the tool worker)."""
        return attrs.evolve(self, gate=gate, queued=queued, tools=tools)

    @property
    def quiet(self) -> bool:
        """Nothing in flight, nothing queued, nobody speaking."""
        return not self.reasons()


# -- summaries ---------------------------------------------------------------------------------


def _texts(item: Mapping[str, Any]) -> list[str]:
    parts = item.get("content")
    out: list[str] = []
    for c in parts if isinstance(parts, list) else ():
        if isinstance(c, Mapping):
            text = c.get("text") if isinstance(c.get("text"), str) else c.get("transcript")
            if isinstance(text, str) and text:
                out.append(text)
    return out


def _item_chars(item: Mapping[str, Any]) -> int:
    return (sum(len(t) for t in _texts(item)) + len(str(item.get("arguments") or ""))
            + len(str(item.get("output") or "")))


def seed_chars(seeds: Iterable[Mapping[str, Any]]) -> int:
    """Characters of text in re-seed items (messages' text, calls' arguments, outputs)."""
    return sum(_item_chars(s) for s in seeds)


def split_for_summary(
    seeds: Sequence[dict[str, Any]], *, keep_turns: int, max_chars: int | None, max_items: int | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | None:
    """``(older, kept)`` when ``seeds`` are long enough to summarise, else ``None``.

    Long: more than ``max_chars`` characters of text or more than
    ``max_items`` items (``None``: no such limit). ``kept`` starts at the
    ``keep_turns``-th user message from the end, so a turn (the question,
    its tool calls and outputs, the answer) is never split; with no more user
    turns than that there is nothing older to summarise (``None``).
    """
    long = (max_chars is not None and seed_chars(seeds) > max_chars) or (
        max_items is not None and len(seeds) > max_items)
    if not long:
        return None
    users = [i for i, s in enumerate(seeds) if s.get("type") == "message" and s.get("role") == "user"]
    if len(users) <= keep_turns:
        return None
    cut = users[len(users) - keep_turns] if keep_turns > 0 else len(seeds)
    if cut == 0:
        return None
    return list(seeds[:cut]), list(seeds[cut:])


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + " [...]"


def summary_input(
    items: Sequence[Mapping[str, Any]], *, max_chars: int = SUMMARY_INPUT_CHARS, part_chars: int = SUMMARY_PART_CHARS
) -> list[dict[str, Any]]:
    """The history as text message items for the summary response's ``input``.

    Messages keep their role; a function call and its output become one
    system message ("Tool call name(arguments) returned: output"). No item
    ids (the input is not the conversation). Each text is cut to
    ``part_chars``; past ``max_chars`` in all, the oldest items are left out,
    except a first system message (an earlier summary), which always goes.
    """
    outputs = {str(i.get("call_id")): str(i.get("output") or "") for i in items
               if i.get("type") == "function_call_output"}
    rendered: list[dict[str, Any]] = []
    for item in items:
        typ = item.get("type")
        if typ == "function_call":
            cid = str(item.get("call_id"))
            text = f"Tool call {item.get('name')}({item.get('arguments') or ''})"
            text += f" returned: {outputs[cid]}" if cid in outputs else " (no result)"
            rendered.append(_text_item("system", _clip(text, part_chars)))
        elif typ == "message" and item.get("role") in ("user", "assistant", "system"):
            text = " ".join(_texts(item))
            if text:
                rendered.append(_text_item(str(item["role"]), _clip(text, part_chars)))
    first = rendered[0] if rendered and rendered[0]["role"] == "system" else None
    budget = max_chars - (len(first["content"][0]["text"]) if first is not None else 0)
    kept: list[dict[str, Any]] = []
    for entry in reversed(rendered[1:] if first is not None else rendered):
        budget -= len(entry["content"][0]["text"])
        if budget < 0:
            break
        kept.append(entry)
    kept.reverse()
    return [first, *kept] if first is not None else kept


def _text_item(role: str, text: str) -> dict[str, Any]:
    kind = "output_text" if role == "assistant" else "input_text"
    return {"type": "message", "role": role, "content": [{"type": kind, "text": text}]}


def summary_request(items: Sequence[Mapping[str, Any]], *, max_output_tokens: int = 1024) -> dict[str, Any]:
    """The ``response.create`` fields of the out-of-band summary of ``items`` (text only, no tools)."""
    return {
        "conversation": "none",
        "output_modalities": ["text"],
        "instructions": SUMMARY_INSTRUCTIONS,
        "input": summary_input(items),
        "tool_choice": "none",
        "max_output_tokens": max_output_tokens,
        "metadata": {"rtqueue_purpose": SUMMARY_PURPOSE},
    }


@attrs.frozen
class Summary:
    """A summary standing for some items: ``item`` replaces ``covered`` (item ids) and ``calls`` (call ids)."""

    text: str
    covered: frozenset[str]
    calls: frozenset[str]
    item: dict[str, Any]


def make_summary(text: str, older: Iterable[Mapping[str, Any]]) -> Summary:
    """The summary ``text`` of the re-seed items ``older``, as one system message with an id of ours."""
    older = list(older)
    covered = frozenset(str(s["id"]) for s in older if isinstance(s.get("id"), str))
    calls = frozenset(str(s["call_id"]) for s in older if s.get("type") == "function_call" and s.get("call_id"))
    item = {"id": new_event_id("item_rtq_"), "type": "message", "role": "system",
            "content": [{"type": "input_text", "text": SUMMARY_PREFIX + text.strip()}]}
    return Summary(text.strip(), covered, calls, item)


def apply_summary(seeds: Sequence[dict[str, Any]], summary: Summary) -> list[dict[str, Any]]:
    """The re-seed with ``summary`` first in place of what it covers.

    Items it covers go (by id), and so do function call outputs whose call it
    covers (an output without its call would be refused). Items newer than
    the summary (said after it was made) stay, in order.
    """
    rest = [s for s in seeds
            if not (isinstance(s.get("id"), str) and s["id"] in summary.covered)
            and not (s.get("type") in ("function_call", "function_call_output") and s.get("call_id") in summary.calls)]
    return [json.loads(json.dumps(summary.item)), *rest]
