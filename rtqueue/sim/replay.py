"""Replay a recording's server side to a live client: :class:`ReplaySession`.

A drop-in for :class:`~rtqueue.sim.core.SimSession` in the simulator's server
(``Simulator(replay="call.jsonl")``, ``rtqueue sim --replay call.jsonl``).
Connection ``k`` replays the recording's ``k``-th connection (the last one
once they run out).

How it answers:

- Every recorded server frame is attached to the client frame recorded just
  before it (its *trigger*); frames recorded before any client frame (e.g.
  ``session.created``) are sent at their recorded time after the connection.
- Input audio (``input_audio_buffer.append``) is matched by duration, not
  by chunk: what followed a recorded append is released once the live audio
  reaches the recorded duration at that append.
- Other client events are matched by type and order: the live client's n-th
  ``response.create`` is the recording's n-th ``response.create``, and
  releases the server frames attached to it, at the recorded offsets after
  the live event (divided by ``speed``; unpaced when ``speed`` is None),
  never before a frame already released.
- IDs the client makes up are rewritten: a recorded client ``event_id``,
  item ``id``/``previous_item_id`` or ``response.metadata`` value is
  replaced, everywhere in the server frames, by the live client's value at
  the same place (so ``error.event_id`` and the metadata echo in
  ``response.created``/``response.done`` match the live client's requests).
- When the recording has a later connection, this one is closed (code
  1011) once everything recorded on it was replayed: the client reconnects
  as it did, and its next connection replays the next recorded one.
- Differences it cannot explain are listed in :meth:`ReplaySession.stats`
  (``"mismatches"``): a client event whose content differs from the recorded
  one (``event_id``s and audio payloads aside), and a client event the
  recording never had, which also gets a server ``error`` event
  (``code: "replay_mismatch"``) naming what the recording had.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
from collections import Counter, defaultdict
from collections.abc import Mapping
from typing import Any

from ..errors import InvalidArgument
from ..formats import AudioFormat, format_of
from ..recording import Frame, Recording, audio_ms, read_recording

__all__ = ["ReplaySession", "load_replay"]

_ID_KEYS = frozenset({"event_id", "id", "item_id", "previous_item_id"})
_AUDIO_FIELDS = {"input_audio_buffer.append": "audio", "response.output_audio.delta": "delta"}
# The byte that encodes digital silence (linear 0) in each format (G.711's code for 0).
_SILENCE_BYTE = {"audio/pcm": 0x00, "audio/pcmu": 0xFF, "audio/pcma": 0xD5}


def load_replay(source: str | os.PathLike[str] | Recording) -> Recording:
    """A :class:`Recording` from a path (or the recording itself), checked to have server frames."""
    rec = source if isinstance(source, Recording) else read_recording(source)
    if not any(f.sender == "server" for f in rec.frames):
        raise ValueError("the recording has no server frames to replay")
    return rec


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _pairs(recorded: Any, live: Any, under_metadata: bool, out: dict[str, str]) -> None:
    """Collect recorded -> live string pairs at the same place (ids and metadata values)."""
    if isinstance(recorded, Mapping) and isinstance(live, Mapping):
        for key, value in recorded.items():
            if key not in live:
                continue
            other = live[key]
            if isinstance(value, str) and isinstance(other, str):
                if value != other and (under_metadata or key in _ID_KEYS):
                    out[value] = other
            else:
                _pairs(value, other, under_metadata or key == "metadata", out)
    elif isinstance(recorded, list) and isinstance(live, list):
        for a, b in zip(recorded, live, strict=False):
            _pairs(a, b, under_metadata, out)


def _rewrite(value: Any, ids: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        return ids.get(value, value)
    if isinstance(value, dict):
        return {k: _rewrite(v, ids) for k, v in value.items()}
    if isinstance(value, list):
        return [_rewrite(v, ids) for v in value]
    return value


def _comparable(event: Mapping[str, Any], ids: Mapping[str, str]) -> Any:
    """An event without its event_id and audio payload, with recorded ids mapped to live ones."""
    out = {k: v for k, v in event.items() if k != "event_id"}
    field = _AUDIO_FIELDS.get(str(out.get("type")))
    if field is not None:
        out.pop(field, None)
        out.pop("rtq_audio_ms", None)
    return _rewrite(out, ids)


def _frame_ms(frame: Frame, fmt: Any = None) -> float:
    """The audio duration of a recorded ``input_audio_buffer.append`` (kept or as ``rtq_audio_ms``).

    ``fmt`` is the session's input format (a GA format object) when it was recorded.
    """
    event = frame.event or {}
    ms = event.get("rtq_audio_ms")
    if isinstance(ms, (int, float)):
        return float(ms)
    payload = event.get("audio")
    return audio_ms(payload, fmt) if isinstance(payload, str) else 0.0


def _session_formats(event: Mapping[str, Any]) -> tuple[Any, Any] | None:
    """``(input format, output format)`` objects of a ``session.created``/``.updated`` event, else None."""
    if event.get("type") not in ("session.created", "session.updated"):
        return None
    session = event.get("session")
    audio = session.get("audio") if isinstance(session, Mapping) else None
    if not isinstance(audio, Mapping):
        return None
    formats = []
    for side in ("input", "output"):
        cfg = audio.get(side)
        formats.append(cfg.get("format") if isinstance(cfg, Mapping) else None)
    return formats[0], formats[1]


def _audio_format(value: Any) -> AudioFormat:
    try:
        return format_of(value)
    except InvalidArgument:  # a recording from a server that spoke of other formats: PCM16 it is
        return format_of(None)


def _fill_audio(event: dict[str, Any], fmt: AudioFormat) -> dict[str, Any]:
    """A recording kept as durations has ``delta: null``: send silence of that length in ``fmt`` instead."""
    if event.get("type") == "response.output_audio.delta" and event.get("delta") is None:
        ms = event.get("rtq_audio_ms")
        n = fmt.nbytes(float(ms)) if isinstance(ms, (int, float)) else 0
        event = {k: v for k, v in event.items() if k != "rtq_audio_ms"}
        event["delta"] = base64.b64encode(bytes([_SILENCE_BYTE[fmt.type]]) * n).decode("ascii")
    return event


class ReplaySession:
    """Serves one recorded connection; the interface of ``SimSession`` the server uses."""

    def __init__(
        self,
        recording: Recording,
        *,
        now: float,
        index: int = 0,
        speed: float | None = 1.0,
        mismatches: list[dict[str, Any]] | None = None,
    ) -> None:
        sessions = sorted({f.session for f in recording.frames})
        chosen = sessions[min(index, len(sessions) - 1)] if sessions else 0
        frames = [f for f in recording.frames if f.session == chosen]
        # A later connection in the recording means this one ended: end it too once replayed.
        self._ends = any(s > chosen for s in sessions)
        self.index = index
        self._speed = speed or None
        self._start = now
        self._t0 = frames[0].t if frames else 0.0
        # Client frames by type, each with the server frames it triggered.
        self._by_type: dict[str, list[tuple[Frame, list[Frame]]]] = defaultdict(list)
        self._initial: list[Frame] = []
        # Durations of the recorded appends, in the input format the recording had at each.
        self._append_ms: list[float] = []
        current: list[Frame] | None = None
        recorded_in: Any = None
        for f in frames:
            if f.sender == "client":
                kind = f.type or ("<binary>" if f.binary_len is not None else "<invalid_json>")
                current = []
                self._by_type[kind].append((f, current))
                if kind == "input_audio_buffer.append":
                    self._append_ms.append(_frame_ms(f, recorded_in))
            elif f.event is not None:
                (self._initial if current is None else current).append(f)
                formats = _session_formats(f.event)
                if formats is not None:
                    recorded_in = formats[0]
        # The live session's formats: those of the last session.created/updated sent to the client.
        self._in_format: Any = None
        self._out_format = _audio_format(None)
        self._seen: Counter[str] = Counter()
        self._live_audio_ms = 0.0
        self._recorded_audio_ms = 0.0
        self._ids: dict[str, str] = {}
        self._queue: list[tuple[float, int, dict[str, Any]]] = []
        self._seq = itertools.count()
        self._last_due = now
        self._mismatches: list[dict[str, Any]] = mismatches if mismatches is not None else []
        self._own: list[dict[str, Any]] = []
        self._client_events: Counter[str] = Counter()
        self._errors: Counter[str] = Counter()
        self._sent: Counter[str] = Counter()
        self._n_errors = 0
        self.close_request: tuple[int, str] | None = None
        for f in self._initial:
            self._schedule(now + self._scaled(f.t - self._t0), f.event or {})

    # ------------------------------------------------------------------ helpers

    def _scaled(self, dt: float) -> float:
        return 0.0 if self._speed is None else max(0.0, dt) / self._speed

    def _schedule(self, due: float, event: dict[str, Any]) -> None:
        due = max(due, self._last_due)
        self._last_due = due
        self._queue.append((due, next(self._seq), event))

    def _mismatch(self, **info: Any) -> None:
        entry = {"session": self.index, **info}
        self._mismatches.append(entry)
        self._own.append(entry)

    # ------------------------------------------------------------------ the SimSession interface

    def receive_raw(self, frame: str | bytes, now: float) -> None:
        if isinstance(frame, (bytes, bytearray, memoryview)):
            self._answer("<binary>", None, now)
        else:
            try:
                event = json.loads(frame)
            except ValueError:
                event = None
            if isinstance(event, dict):
                self.receive(event, now)
            else:
                self._answer("<invalid_json>", None, now)

    def receive(self, event: Any, now: float) -> None:
        if not isinstance(event, dict):
            self._answer("<invalid_json>", None, now)
            return
        kind = event.get("type")
        if kind == "input_audio_buffer.append":
            self._append(event, now)
            return
        self._answer(kind if isinstance(kind, str) else "<no type>", event, now)

    def _append(self, event: dict[str, Any], now: float) -> None:
        """Audio is matched by duration, not by chunk: chunking may differ from the recording's.

        The frames recorded after the recorded appends are released once the
        live audio reaches the duration the recording had at that append.
        """
        kind = "input_audio_buffer.append"
        self._client_events[kind] += 1
        payload = event.get("audio")
        self._live_audio_ms += audio_ms(payload, self._in_format) if isinstance(payload, str) else 0.0
        recorded = self._by_type.get(kind, [])
        while self._seen[kind] < len(recorded):
            client, answers = recorded[self._seen[kind]]
            ms = self._append_ms[self._seen[kind]]
            if self._recorded_audio_ms + ms > self._live_audio_ms + 0.5:
                break
            self._recorded_audio_ms += ms
            self._seen[kind] += 1
            for f in answers:
                assert f.event is not None
                self._schedule(now + self._scaled(f.t - client.t), _rewrite(f.event, self._ids))

    def _answer(self, kind: str, event: dict[str, Any] | None, now: float) -> None:
        self._client_events[kind] += 1
        n = self._seen[kind]
        self._seen[kind] += 1
        recorded = self._by_type.get(kind, [])
        if n >= len(recorded):
            had = len(recorded)
            message = (
                f"Replay: the client sent a {_ordinal(n + 1)} {kind!r} event; the recording has "
                + (f"only {had}." if had else "none.")
            )
            self._mismatch(kind="unexpected_event", type=kind, nth=n + 1, message=message)
            self._errors["replay_mismatch"] += 1
            self._schedule(now, {
                "type": "error",
                "event_id": self.new_event_id(),
                "error": {"type": "invalid_request_error", "code": "replay_mismatch", "message": message,
                          "param": None, "event_id": event.get("event_id") if event else None},
            })
            return
        client, answers = recorded[n]
        if event is not None and client.event is not None:
            _pairs(client.event, event, False, self._ids)
            want, got = _comparable(client.event, self._ids), _comparable(event, {})
            if want != got:
                self._mismatch(kind="different_event", type=kind, nth=n + 1,
                               recorded=want, received=got,
                               message=f"Replay: the {_ordinal(n + 1)} {kind!r} differs from the recording")
        for f in answers:
            assert f.event is not None
            self._schedule(now + self._scaled(f.t - client.t), _rewrite(f.event, self._ids))

    def advance(self, now: float) -> list[dict[str, Any]]:
        due = [e for e in self._queue if e[0] <= now]
        if not due:
            self._maybe_end()
            return []
        self._queue = [e for e in self._queue if e[0] > now]
        due.sort(key=lambda e: (e[0], e[1]))
        out = []
        for _, _, event in due:
            formats = _session_formats(event)
            if formats is not None:
                self._in_format, self._out_format = formats[0], _audio_format(formats[1])
            out.append(_fill_audio(event, self._out_format))
        for ev in out:
            self._sent[str(ev.get("type"))] += 1
            if ev.get("type") == "error":
                code = (ev.get("error") or {}).get("code")
                if isinstance(code, str) and code != "replay_mismatch":
                    self._errors[code] += 1
        self._maybe_end()
        return out

    def _maybe_end(self) -> None:
        if self._ends and self.close_request is None and not self._queue and not self.unanswered():
            self.close_request = (1011, "replay: the recorded connection ended here")

    def next_due(self) -> float | None:
        return min((e[0] for e in self._queue), default=None)

    def feed(self, event: Any, now: float) -> list[dict[str, Any]]:
        self.receive(event, now)
        return self.advance(now)

    def make_error(self, code: str, message: str, *, type: str = "server_error", param: str | None = None
                   ) -> dict[str, Any]:
        self._errors[code] += 1
        return {"type": "error", "event_id": self.new_event_id(),
                "error": {"type": type, "code": code, "message": message, "param": param, "event_id": None}}

    def new_event_id(self) -> str:
        self._n_errors += 1
        return f"event_replay{self.index}x{self._n_errors}"

    def expire_at(self, when: float) -> None:
        """Faults that expire a session do not apply to a replay."""

    def withhold_done(self, nth: int) -> None:
        """Faults that withhold a response.done do not apply to a replay."""

    def unanswered(self) -> dict[str, int]:
        """Recorded client events (by type) the live client has not sent (yet)."""
        left = {k: len(v) - self._seen[k] for k, v in self._by_type.items()}
        return {k: n for k, n in left.items() if n > 0}

    def stats(self) -> dict[str, Any]:
        sent = self._sent
        return {
            "responses": sent["response.created"],
            "completed": 0,
            "cancelled": 0,
            "incomplete": 0,
            "withheld": 0,
            "conflicts": self._errors.get("conversation_already_has_active_response", 0),
            "cancel_not_active": self._errors.get("response_cancel_not_active", 0),
            "truncate_errors": 0,
            "errors": dict(self._errors),
            "client_events": dict(self._client_events),
            "function_calls": sent["response.function_call_arguments.done"],
            "vad_speech_started": sent["input_audio_buffer.speech_started"],
            "vad_speech_stopped": sent["input_audio_buffer.speech_stopped"],
            "truncations": self._client_events["conversation.item.truncate"],
            "server_events": sum(sent.values()),
            "audio_ms_sent": 0,
            "mismatches": list(self._own),
            "unanswered": self.unanswered(),
        }
