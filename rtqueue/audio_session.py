"""Glue between a :class:`~rtqueue.Session` and its audio devices, and barge-in.

The reader feeds assistant audio deltas to the output (``play`` never
blocks); the input's audio thread feeds the writer's audio lane. Barge-in, on
server VAD's ``input_audio_buffer.speech_started`` or :meth:`Session.interrupt`:

1. stop local playback at once and drop the buffered rest;
2. cancel the active in-band response by id, only when the server will not do
   it itself (``interrupt_response`` off, or an app-initiated interrupt) and
   only if one is active;
3. ``conversation.item.truncate`` the interrupted item at the milliseconds
   really played, clamped to the audio received (never past what the server
   produced), skipped at 0 ms and for items not in the conversation.
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
from typing import TYPE_CHECKING, Any

import attrs

from .errors import InvalidArgument
from .handles import _check_timeout
from .values import Event, Response

if TYPE_CHECKING:
    from .audio import AudioIO, PlaybackCut
    from .session import Session

__all__ = ["AudioLink", "Interruption", "interrupt"]

log = logging.getLogger("rtqueue")


@attrs.frozen
class Interruption:
    """What a barge-in did: the cut item, ms played and truncated, the cancelled response."""

    item_id: str | None
    played_ms: float
    received_ms: float
    truncated_ms: int | None  # audio_end_ms sent, or None when no truncate was needed
    cancelled: Response | None  # the response cancelled by this interrupt, after its done
    source: str  # "app" or "server_vad"


class AudioLink:
    """Owns a session's :class:`~rtqueue.audio.AudioIO` while it is connected."""

    def __init__(self, session: Session, io: AudioIO) -> None:
        self._session = session
        self.io = io
        self.last_interruption: Interruption | None = None
        self.interruptions = 0
        self.bad_audio = 0

    @classmethod
    def create(cls, session: Session, audio: Any) -> AudioLink:
        """``audio=True`` -> default devices; ``"null"`` -> no device; or an ``AudioIO``."""
        from .audio import AudioIO

        if audio is True:
            io = AudioIO.default()
        elif audio == "null":
            io = AudioIO.null()
        elif isinstance(audio, AudioIO):
            io = audio
        else:
            raise InvalidArgument(f'audio must be True, "null" or an rtqueue.audio.AudioIO, not {audio!r}')
        return cls(session, io)

    def start(self) -> None:
        """Open the devices; the microphone streams into the writer's audio lane."""
        if self.io.output is not None:
            self.io.output.start()
        if self.io.input is not None:
            self.io.input.start(self._session.append_audio)

    def close(self) -> None:
        """Close the devices (ends their threads)."""
        self.io.close()

    # -- reader thread (never blocks) ------------------------------------------------------

    def on_event(self, event: dict[str, Any]) -> None:
        """Route one server event: audio to the speaker, speech start to barge-in."""
        typ = event["type"]
        out = self.io.output
        if typ == "response.output_audio.delta" and out is not None:
            delta, item_id = event.get("delta"), event.get("item_id")
            if isinstance(delta, str) and isinstance(item_id, str):
                try:
                    pcm = base64.b64decode(delta, validate=True)
                except (binascii.Error, ValueError):
                    self.bad_audio += 1
                    return
                out.play(item_id, pcm)
        elif typ == "response.output_audio.done" and out is not None:
            item_id = event.get("item_id")
            if isinstance(item_id, str):
                out.end_item(item_id)
        elif typ == "input_audio_buffer.speech_started":
            td = ((self._session.session_config.get("audio") or {}).get("input") or {}).get("turn_detection") or {}
            server_cancels = bool(td.get("interrupt_response", True))
            self.barge_in(cancel=not server_cancels, source="server_vad", wait=None)

    def barge_in(self, *, cancel: bool, source: str, wait: float | None) -> Interruption:
        """Stop playback, cancel if asked and something is active, truncate to what was played.

        ``wait`` None: do not wait for the cancelled response's ``done`` (the
        reader thread calls this); otherwise wait up to ``wait`` seconds.
        """
        session = self._session
        out = self.io.output
        cut: PlaybackCut | None = out.interrupt() if out is not None else None
        events: list[dict[str, Any]] = []
        rid = session.gate.active_response_id() if cancel else None
        if rid is not None:
            events.append({"type": "response.cancel", "response_id": rid})
        truncated = _truncate_ms(cut)
        if cut is not None and truncated is not None and session._has_item(cut.item_id):
            events.append({"type": "conversation.item.truncate", "item_id": cut.item_id, "content_index": 0,
                           "audio_end_ms": truncated})
        else:
            truncated = None
        session._send_urgent_many(events)
        cancelled = None
        if rid is not None and wait is not None:
            cancelled = session._wait_done(rid, wait)
        result = Interruption(
            item_id=cut.item_id if cut else None,
            played_ms=cut.played_ms if cut else 0.0,
            received_ms=cut.received_ms if cut else 0.0,
            truncated_ms=truncated,
            cancelled=cancelled,
            source=source,
        )
        self.last_interruption = result
        self.interruptions += 1
        session._publish(Event("audio.interrupted", attrs.asdict(result, recurse=False)))
        return result


def _truncate_ms(cut: PlaybackCut | None) -> int | None:
    """``audio_end_ms`` for a cut: played, clamped to received, floored; None at 0."""
    if cut is None:
        return None
    ms = math.floor(min(cut.played_ms, cut.received_ms))
    return ms if ms > 0 else None


def interrupt(session: Session, timeout: float | None) -> Interruption:
    """``Session.interrupt``: barge in from the app and wait for the cancelled response."""
    _check_timeout(timeout)
    link: AudioLink | None = session._audio
    if link is None:
        rid = session.gate.active_response_id()
        cancelled = session.cancel(timeout) if rid is not None else None
        return Interruption(None, 0.0, 0.0, None, cancelled, "app")
    return link.barge_in(cancel=True, source="app", wait=timeout)
