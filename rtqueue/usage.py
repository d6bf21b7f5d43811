"""Token usage and rate limits of a session: an accumulator and the frozen totals it reports.

The server reports what each response cost in ``response.done``'s
``response.usage`` (GA ``RealtimeResponseUsage``: input/output/total tokens,
input split into text, audio, image and cached tokens, output into text and
audio), what each input transcription cost in
``conversation.item.input_audio_transcription.completed``'s ``usage`` (tokens,
or seconds of audio for duration-billed models), and the latest limits in
``rate_limits.updated``. :class:`UsageMeter` adds them up per session and per
agent (the agent that made the response); :attr:`Session.usage
<rtqueue.Session.usage>` hands out a :class:`Usage` snapshot.

Pure: no threads, no I/O. The meter is not thread-safe by itself: the session
feeds and reads it under its own mutex.
"""

from __future__ import annotations

import types
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import attrs

__all__ = ["USAGE_EVENTS", "AgentUsage", "RateLimit", "TokenUsage", "TranscriptionUsage", "Usage", "UsageMeter"]

#: Response ids remembered to count each ``response.done`` once (a replay or a duplicate adds nothing).
_SEEN_RESPONSES = 1024


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _details(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


@attrs.frozen
class TokenUsage:
    """Tokens of responses, summed: ``responses`` counted, then the GA usage fields.

    ``input_tokens`` include the cached ones (``cached_tokens`` is a part of
    them, split into ``cached_text/audio/image_tokens``), as in the GA usage
    object.
    """

    responses: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    input_text_tokens: int = 0
    input_audio_tokens: int = 0
    input_image_tokens: int = 0
    cached_tokens: int = 0
    cached_text_tokens: int = 0
    cached_audio_tokens: int = 0
    cached_image_tokens: int = 0
    output_text_tokens: int = 0
    output_audio_tokens: int = 0

    @classmethod
    def from_usage(cls, usage: Mapping[str, Any]) -> TokenUsage:
        """One response's GA ``usage`` object (missing or malformed fields count 0)."""
        inp = _details(usage.get("input_token_details"))
        cached = _details(inp.get("cached_tokens_details"))
        out = _details(usage.get("output_token_details"))
        return cls(
            responses=1,
            input_tokens=_int(usage.get("input_tokens")),
            output_tokens=_int(usage.get("output_tokens")),
            total_tokens=_int(usage.get("total_tokens")),
            input_text_tokens=_int(inp.get("text_tokens")),
            input_audio_tokens=_int(inp.get("audio_tokens")),
            input_image_tokens=_int(inp.get("image_tokens")),
            cached_tokens=_int(inp.get("cached_tokens")),
            cached_text_tokens=_int(cached.get("text_tokens")),
            cached_audio_tokens=_int(cached.get("audio_tokens")),
            cached_image_tokens=_int(cached.get("image_tokens")),
            output_text_tokens=_int(out.get("text_tokens")),
            output_audio_tokens=_int(out.get("audio_tokens")),
        )

    def __add__(self, other: TokenUsage) -> TokenUsage:
        return TokenUsage(*(getattr(self, f.name) + getattr(other, f.name) for f in attrs.fields(TokenUsage)))


@attrs.frozen
class TranscriptionUsage:
    """Input transcription cost, summed: ``transcriptions`` counted; token-billed models add
    tokens (input split into audio and text), duration-billed ones (``whisper-1``) ``seconds``."""

    transcriptions: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    input_audio_tokens: int = 0
    input_text_tokens: int = 0
    seconds: float = 0.0

    @classmethod
    def from_usage(cls, usage: Mapping[str, Any]) -> TranscriptionUsage:
        """One ``...input_audio_transcription.completed`` ``usage`` (``type`` ``tokens`` or ``duration``)."""
        if usage.get("type") == "duration":
            secs = usage.get("seconds")
            ok = isinstance(secs, (int, float)) and not isinstance(secs, bool) and secs >= 0
            return cls(transcriptions=1, seconds=float(secs) if ok else 0.0)  # type: ignore[arg-type]
        inp = _details(usage.get("input_token_details"))
        return cls(
            transcriptions=1,
            input_tokens=_int(usage.get("input_tokens")),
            output_tokens=_int(usage.get("output_tokens")),
            total_tokens=_int(usage.get("total_tokens")),
            input_audio_tokens=_int(inp.get("audio_tokens")),
            input_text_tokens=_int(inp.get("text_tokens")),
        )

    def __add__(self, other: TranscriptionUsage) -> TranscriptionUsage:
        return TranscriptionUsage(*(getattr(self, f.name) + getattr(other, f.name)
                                    for f in attrs.fields(TranscriptionUsage)))


@attrs.frozen
class RateLimit:
    """One entry of ``rate_limits.updated``: ``name`` (``tokens``, ``requests``), ``limit``,
    ``remaining`` and ``reset_seconds`` (``None`` where the server left a field out)."""

    name: str
    limit: int | None = None
    remaining: int | None = None
    reset_seconds: float | None = None


@attrs.frozen
class AgentUsage:
    """One agent's share: its responses' ``tokens`` and the ``transcription`` while it spoke."""

    tokens: TokenUsage = TokenUsage()
    transcription: TranscriptionUsage = TranscriptionUsage()


@attrs.frozen
class Usage:
    """A session's usage so far (a snapshot; take :attr:`Session.usage` again for newer totals).

    ``tokens`` sums every response; ``transcription`` every input
    transcription; ``by_agent`` splits both by agent name (a response counts
    for the agent that made it, a transcription for the agent speaking when
    it completed; without agents it is empty); ``rate_limits`` holds the
    latest ``rate_limits.updated`` entries by name.
    """

    tokens: TokenUsage = TokenUsage()
    transcription: TranscriptionUsage = TranscriptionUsage()
    by_agent: Mapping[str, AgentUsage] = types.MappingProxyType({})
    rate_limits: Mapping[str, RateLimit] = types.MappingProxyType({})

    @property
    def input_tokens(self) -> int:
        """Input tokens of every response."""
        return self.tokens.input_tokens

    @property
    def output_tokens(self) -> int:
        """Output tokens of every response."""
        return self.tokens.output_tokens

    @property
    def total_tokens(self) -> int:
        """Total tokens of every response (transcription is billed apart: see :attr:`transcription`)."""
        return self.tokens.total_tokens


class UsageMeter:
    """Adds up usage from server events; :meth:`snapshot` returns the frozen :class:`Usage`.

    Feed it with :meth:`response_done` (the ``response.done`` event and the
    agent that made the response), :meth:`transcription_completed` and
    :meth:`rate_limits_updated`. Malformed or missing usage adds nothing; a
    ``response.done`` seen twice (same response id) counts once.
    """

    def __init__(self) -> None:
        self._tokens = TokenUsage()
        self._transcription = TranscriptionUsage()
        self._agents: dict[str, AgentUsage] = {}
        self._limits: dict[str, RateLimit] = {}
        self._seen: OrderedDict[str, None] = OrderedDict()

    def response_done(self, event: Mapping[str, Any], agent: str | None) -> None:
        """Count one ``response.done`` for ``agent`` (``None``: no agent, the session total only)."""
        resp = event.get("response")
        if not isinstance(resp, Mapping):
            return
        rid = resp.get("id")
        if isinstance(rid, str) and rid:
            if rid in self._seen:
                return
            self._seen[rid] = None
            while len(self._seen) > _SEEN_RESPONSES:
                self._seen.popitem(last=False)
        usage = resp.get("usage")
        if not isinstance(usage, Mapping):
            return
        one = TokenUsage.from_usage(usage)
        self._tokens += one
        if agent is not None:
            mine = self._agents.get(agent, AgentUsage())
            self._agents[agent] = attrs.evolve(mine, tokens=mine.tokens + one)

    def transcription_completed(self, event: Mapping[str, Any], agent: str | None) -> None:
        """Count one ``conversation.item.input_audio_transcription.completed``."""
        usage = event.get("usage")
        if not isinstance(usage, Mapping):
            return
        one = TranscriptionUsage.from_usage(usage)
        self._transcription += one
        if agent is not None:
            mine = self._agents.get(agent, AgentUsage())
            self._agents[agent] = attrs.evolve(mine, transcription=mine.transcription + one)

    def rate_limits_updated(self, event: Mapping[str, Any]) -> None:
        """Keep the latest entry of each rate limit in ``rate_limits.updated``."""
        limits = event.get("rate_limits")
        for entry in limits if isinstance(limits, list) else ():
            if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
                continue
            reset = entry.get("reset_seconds")
            self._limits[entry["name"]] = RateLimit(
                entry["name"],
                limit=entry["limit"] if _is_count(entry.get("limit")) else None,
                remaining=entry["remaining"] if _is_count(entry.get("remaining")) else None,
                reset_seconds=float(reset) if isinstance(reset, (int, float)) and not isinstance(reset, bool)
                else None,
            )

    def observe(self, event: Mapping[str, Any], agent: str | None) -> None:
        """Route any server event to the right counter (others are ignored)."""
        typ = event.get("type")
        if typ == "response.done":
            self.response_done(event, agent)
        elif typ == "conversation.item.input_audio_transcription.completed":
            self.transcription_completed(event, agent)
        elif typ == "rate_limits.updated":
            self.rate_limits_updated(event)

    def snapshot(self) -> Usage:
        """The totals now, as a frozen :class:`Usage`."""
        return Usage(self._tokens, self._transcription, types.MappingProxyType(dict(self._agents)),
                     types.MappingProxyType(dict(self._limits)))


#: The server events a :class:`UsageMeter` reads.
USAGE_EVENTS = frozenset({"response.done", "conversation.item.input_audio_transcription.completed",
                          "rate_limits.updated"})


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
