"""Recordings of Realtime conversations: one JSONL format for the client and the simulator.

A recording is a text file of JSON lines. The first line is a header::

    {"type": "rtqueue.recording", "version": 1, "source": "client"|"simulator",
     "started_at": "2026-01-01T00:00:00.000000Z", "audio": "kept"|"duration",
     "config": {...the session config, redacted}}

then one line per WebSocket frame::

    {"t": 0.123, "session": 0, "from": "client"|"server", "event": {...}}

``t`` is seconds since the recording started (monotonic clock), ``session`` the
connection index (0 for a client's first connection, +1 on each reconnect; the
simulator's connection index). A frame that was not a JSON object is written
with ``{"raw": "<first 1000 chars>"}`` or ``{"binary_len": n}`` in place of
``event``.

Nothing secret reaches the file: every string goes through
:func:`rtqueue.secrets.redact`, and the value of any field whose name says it
carries a credential (``authorization``, ``api_key``/``api-key``, ``password``,
``secret``, ``token``..., at any depth, e.g. an MCP tool's ``headers``) is
replaced by ``"***"``.

With ``audio="duration"`` the audio payloads (``delta`` of
``response.output_audio.delta``, ``audio`` of ``input_audio_buffer.append``)
are replaced by ``null`` and an ``"rtq_audio_ms"`` field gives their duration.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import threading
import time
from collections.abc import Iterable, Mapping
from typing import IO, Any, Literal

import attrs

from .secrets import redact

__all__ = ["CoreReplay", "Frame", "Recorder", "Recording", "audio_ms", "read_recording", "redact_event", "replay_core"]

FORMAT = "rtqueue.recording"
VERSION = 1

Sender = Literal["client", "server"]

# Field names whose value is a credential (the whole name, or its last -/_ separated part).
_SECRET_KEY = re.compile(
    r"^(?:.*[-_ ])?(?:authorization|api[-_]?key|apikey|password|passwd|secret|token|access[-_]?token"
    r"|client[-_]?secret|subscription[-_]?key|cookie)$",
    re.IGNORECASE,
)

# (event type, field) pairs holding base64 audio.
_AUDIO_FIELDS = {"response.output_audio.delta": "delta", "input_audio_buffer.append": "audio"}


def _b64_len(text: str) -> int:
    n = len(text.rstrip("="))
    return n * 3 // 4


def _bytes_per_ms(fmt: Any) -> float:
    """Bytes of audio per millisecond for a GA format object (PCM16 24 kHz by default)."""
    if isinstance(fmt, Mapping):
        kind = str(fmt.get("type", "audio/pcm"))
        if kind in ("audio/pcmu", "audio/pcma"):
            return 8.0  # G.711: 8 kHz, 1 byte a sample
        rate = fmt.get("rate", 24000)
        if isinstance(rate, int) and rate > 0:
            return rate * 2 / 1000.0
    return 48.0


def audio_ms(b64: str, fmt: Any = None) -> float:
    """The duration in ms of base64 audio in ``fmt`` (a GA format object; PCM16 24 kHz if None)."""
    return round(_b64_len(b64) / _bytes_per_ms(fmt), 3)


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {str(k): ("***" if _SECRET_KEY.match(str(k)) and value[k] is not None else _redact_value(value[k]))
                for k in value}
    if isinstance(value, (list, tuple)):
        return [_redact_value(v) for v in value]
    return value


def redact_event(event: Mapping[str, Any], *, audio: str = "kept", formats: Mapping[str, Any] | None = None
                 ) -> dict[str, Any]:
    """A copy of ``event`` fit for a recording: credentials removed, audio kept or replaced by its duration.

    ``formats`` maps ``"input"``/``"output"`` to the session's audio format objects.
    """
    kind = event.get("type")
    field = _AUDIO_FIELDS.get(kind) if isinstance(kind, str) else None
    payload = event.get(field) if field is not None else None
    out: dict[str, Any] = {}
    for k, v in event.items():
        key = str(k)
        if key == field and isinstance(payload, str):
            out[key] = v  # base64 audio: neither a credential nor worth 100 regex passes
        elif _SECRET_KEY.match(key) and v is not None:
            out[key] = "***"
        else:
            out[key] = _redact_value(v)
    if field is not None and isinstance(payload, str) and audio == "duration":
        fmt = (formats or {}).get("output" if field == "delta" else "input")
        out[field] = None
        out["rtq_audio_ms"] = audio_ms(payload, fmt)
    return out


def _formats(config: Mapping[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    audio = config.get("audio")
    if isinstance(audio, Mapping):
        for side in ("input", "output"):
            part = audio.get(side)
            if isinstance(part, Mapping) and isinstance(part.get("format"), Mapping):
                found[side] = part["format"]
    return found


class Recorder:
    """Writes a recording (see the module docstring). Thread-safe: one lock, one line per write.

    ``path_or_file`` is a path (created or truncated) or a text file object
    (not closed by :meth:`close`, only flushed). ``source`` is ``"client"``
    or ``"simulator"``; ``audio`` is ``"kept"`` or ``"duration"``.

    :meth:`start` writes the header with the session config; a frame written
    before it starts the recording with an empty config.
    """

    def __init__(
        self,
        path_or_file: str | os.PathLike[str] | IO[str],
        *,
        source: Literal["client", "simulator"] = "client",
        audio: Literal["kept", "duration"] = "kept",
    ) -> None:
        if source not in ("client", "simulator"):
            raise ValueError(f"Recorder source must be 'client' or 'simulator', got {source!r}")
        if audio not in ("kept", "duration"):
            raise ValueError(f"Recorder audio must be 'kept' or 'duration', got {audio!r}")
        self.source = source
        self.audio = audio
        self._lock = threading.Lock()
        self._owned = isinstance(path_or_file, (str, os.PathLike))
        if isinstance(path_or_file, (str, os.PathLike)):
            self._file: IO[str] | None = open(path_or_file, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
        else:
            self._file = path_or_file
        self._t0 = time.monotonic()
        self._started = False
        self._session = 0
        self._formats: dict[str, Any] = {}
        self.frames = 0

    @property
    def t0(self) -> float:
        """The ``time.monotonic()`` reading that is ``t = 0`` in the file."""
        return self._t0

    @property
    def session(self) -> int:
        """The current connection index (see :meth:`new_connection`)."""
        return self._session

    def start(self, config: Mapping[str, Any] | None = None) -> None:
        """Write the header with ``config`` (redacted). Only the first call writes."""
        with self._lock:
            self._start_locked(config or {})

    def _start_locked(self, config: Mapping[str, Any]) -> None:
        if self._started or self._file is None:
            return
        self._started = True
        self._formats = _formats(config)
        header = {
            "type": FORMAT,
            "version": VERSION,
            "source": self.source,
            "started_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "audio": self.audio,
            "config": _redact_value(dict(config)),
        }
        self._file.write(json.dumps(header, separators=(",", ":")) + "\n")

    def new_connection(self) -> int:
        """A reconnect: later frames (without an explicit ``session``) carry the next index, returned."""
        with self._lock:
            self._session += 1
            return self._session

    def write(self, sender: Sender, event: Mapping[str, Any], *, t: float | None = None,
              session: int | None = None, note: Mapping[str, Any] | None = None) -> None:
        """Append one frame; ``t`` is a ``time.monotonic()`` reading (default: now).

        ``note``: what the client knew about the frame but did not send (e.g.
        ``{"gate_wait_ms": 12.5}`` for a create that waited in the gate); kept
        beside ``event`` and ignored by replay.
        """
        clean = redact_event(event, audio=self.audio, formats=self._formats)
        self._line(sender, "event", clean, t, session, note)

    def write_raw(self, sender: Sender, frame: str | bytes, *, t: float | None = None,
                  session: int | None = None) -> None:
        """Append a frame that was not a JSON object (text kept to 1000 characters, binary as its length)."""
        if isinstance(frame, str):
            self._line(sender, "raw", redact(frame[:1000]), t, session)
        else:
            self._line(sender, "binary_len", len(frame), t, session)

    def _line(self, sender: Sender, key: str, value: Any, t: float | None, session: int | None,
              note: Mapping[str, Any] | None = None) -> None:
        if sender not in ("client", "server"):
            raise ValueError(f"sender must be 'client' or 'server', got {sender!r}")
        now = time.monotonic() if t is None else t
        with self._lock:
            if self._file is None:
                return
            self._start_locked({})
            record = {"t": round(now - self._t0, 6), "session": self._session if session is None else session,
                      "from": sender, key: value}
            if note:
                record["note"] = dict(note)
            self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
            self.frames += 1

    def flush(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.flush()

    def close(self) -> None:
        """Flush, and close the file if this recorder opened it. Idempotent."""
        with self._lock:
            if self._file is None:
                return
            self._start_locked({})
            self._file.flush()
            if self._owned:
                self._file.close()
            self._file = None

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@attrs.frozen
class Frame:
    """One recorded frame. ``event`` is None for a frame that was not JSON (see ``raw``/``binary_len``)."""

    t: float
    session: int
    sender: str
    event: dict[str, Any] | None
    raw: str | None = None
    binary_len: int | None = None
    note: dict[str, Any] | None = None  # what the recording client knew beside the frame (gate wait)

    @property
    def type(self) -> str | None:
        kind = self.event.get("type") if self.event is not None else None
        return kind if isinstance(kind, str) else None


@attrs.frozen
class Recording:
    header: dict[str, Any]
    frames: tuple[Frame, ...]

    @property
    def config(self) -> dict[str, Any]:
        config = self.header.get("config")
        return config if isinstance(config, dict) else {}

    def client_events(self) -> list[dict[str, Any]]:
        return [f.event for f in self.frames if f.sender == "client" and f.event is not None]

    def server_events(self) -> list[dict[str, Any]]:
        return [f.event for f in self.frames if f.sender == "server" and f.event is not None]


def read_recording(path: str | os.PathLike[str]) -> Recording:
    """Read a recording; a truncated (unparsable) last line is ignored, any other bad line raises ValueError."""
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    return parse_recording(lines)


def parse_recording(lines: Iterable[str]) -> Recording:
    lines = [line for line in lines if line.strip()]
    header: dict[str, Any] = {}
    frames: list[Frame] = []
    for i, line in enumerate(lines):
        try:
            obj = json.loads(line)
        except ValueError:
            if i == len(lines) - 1:
                break  # a recording cut off mid-write
            raise ValueError(f"recording line {i + 1} is not JSON: {line[:80]!r}") from None
        if not isinstance(obj, dict):
            raise ValueError(f"recording line {i + 1} is not an object")
        if obj.get("type") == FORMAT:
            if not header:
                header = obj
            continue
        sender = obj.get("from")
        if sender not in ("client", "server"):
            raise ValueError(f"recording line {i + 1} has no 'from': {line[:80]!r}")
        event = obj.get("event")
        frames.append(Frame(
            t=float(obj.get("t", 0.0)), session=int(obj.get("session", 0)), sender=sender,
            event=event if isinstance(event, dict) else None,
            raw=obj.get("raw") if isinstance(obj.get("raw"), str) else None,
            binary_len=obj.get("binary_len") if isinstance(obj.get("binary_len"), int) else None,
            note=obj.get("note") if isinstance(obj.get("note"), dict) else None,
        ))
    if not header:
        raise ValueError("not an rtqueue recording (no header line)")
    return Recording(header=header, frames=tuple(frames))



@attrs.frozen
class CoreReplay:
    """What :func:`replay_core` saw the conversation core do."""

    responses: tuple[Any, ...]  # rtqueue.values.Response (the core's record), in the order they finished
    actions: dict[str, int]  # action class name -> count
    published: tuple[str, ...]  # types of the Publish actions
    verdicts: tuple[tuple[str | None, str | None, str | None], ...]  # (error code, event_id, verdict)
    failures: tuple[str, ...]  # repr of the errors Fail actions carried


def replay_core(recording: Recording, *, session: int | None = None) -> CoreReplay:
    """Drive the pure :class:`rtqueue.core.ConversationCore` with a recording (no socket, no thread).

    The recorded client ``response.create`` events become the core's own
    requests (same event ids, so the metadata echo of the recorded
    ``response.created`` matches them), the recorded server events go through
    a :class:`rtqueue.gate.ResponseGate` and the core as the session's shell
    routes them. ``session`` picks one connection (default: the first).
    A recorded incident so becomes a unit test of the core.
    """
    from .core import ConversationCore, Fail, Publish
    from .gate import ResponseGate
    from .protocol import METADATA_KEY
    from .routing import GateRouter

    streaming = {"response.output_audio.delta", "response.output_text.delta", "response.output_audio_transcript.delta"}
    frames = [f for f in recording.frames if f.event is not None]
    if frames:
        chosen = min(f.session for f in frames) if session is None else session
        frames = [f for f in frames if f.session == chosen]
    core = ConversationCore(handle_factory=lambda event, in_band: None)
    gate = ResponseGate()
    router = GateRouter(gate, holds=False)  # the recorded follow-ups are creates of their own here
    counts: dict[str, int] = {}
    published: list[str] = []
    verdicts: list[tuple[str | None, str | None, str | None]] = []
    failures: list[str] = []
    responses: list[Any] = []

    def apply(actions: Iterable[Any]) -> None:
        for action in actions:
            name = type(action).__name__
            counts[name] = counts.get(name, 0) + 1
            if isinstance(action, Publish):
                published.append(action.type)
            elif isinstance(action, Fail):
                failures.append(repr(action.error))

    for f in frames:
        event = dict(f.event or {})
        kind = event.get("type")
        if f.sender == "client":
            if kind == "response.create" and isinstance(event.get("event_id"), str):
                eid = event["event_id"]
                params = dict(event.get("response") or {})
                meta = {k: v for k, v in (params.get("metadata") or {}).items() if k != METADATA_KEY}
                params.pop("metadata", None)
                if meta:
                    params["metadata"] = meta
                apply(core.create_response(params, None, now=f.t, event_id=eid))
                if params.get("conversation") == "none":
                    gate.register_oob(eid)
                elif gate.acquire(eid, 0.0):
                    gate.note_sent(eid, 0.0)
            continue
        if kind in streaming:
            core.stream(event)
            continue
        routed = router.route(event, core)
        if routed.error is not None:
            verdicts.append((routed.error.code, routed.error.event_id, routed.verdict))
        apply(core.receive(event, verdict=routed.verdict, matched=routed.matched))
        if kind == "response.done":
            rid = str((event.get("response") or {}).get("id"))
            finished = core.recent(rid)
            if finished is not None:
                responses.append(finished)
    return CoreReplay(responses=tuple(responses), actions=counts, published=tuple(published),
                      verdicts=tuple(verdicts), failures=tuple(failures))
