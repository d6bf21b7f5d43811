"""Glue between a :class:`~rtqueue.Session` and its audio devices, and barge-in.

The reader feeds assistant audio deltas to the output (``play`` never
blocks); the input's audio thread hands mic chunks to the writer (written on
that thread when nothing is queued ahead, see :mod:`rtqueue.writer`). Barge-in, on
server VAD's ``input_audio_buffer.speech_started`` or :meth:`Session.interrupt`:

1. stop local playback at once and drop the buffered rest; audio still
   arriving for the response being cancelled is dropped too;
2. cancel the active in-band response by id, only when the server will not do
   it itself (``interrupt_response`` off, or an app-initiated interrupt), only
   if one is active, and never twice for the same response (a response the
   server already cancelled on ``speech_started`` is not cancelled again: that
   would earn ``response_cancel_not_active``);
3. ``conversation.item.truncate`` the interrupted item at the milliseconds
   really played, clamped to the audio received (never past what the server
   produced), skipped at 0 ms, for items not in the conversation (out-of-band
   responses) and for items streamed on an earlier socket (after a reconnect
   the server no longer has their audio).

The cancel and the truncate jump to the head of the control lane together,
cancel first, so they never wait behind a held ``response.create``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import math
import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Protocol

import attrs

from .errors import InvalidArgument, RtqueueError
from .formats import AudioFormat, Transcoder
from .handles import SendHandle
from .values import Event, Response

if TYPE_CHECKING:
    from .audio import AudioIO, PlaybackCut

__all__ = ["AudioHost", "AudioLink", "Interruption", "truncate_ms"]

log = logging.getLogger("rtqueue")

_MAX_TRACKED = 256  # cancelled responses / item sockets remembered


@attrs.frozen
class Interruption:
    """What a barge-in did: the cut item, ms played and truncated, the cancelled response.

    ``played_ms`` is the position reached in ``item_id`` when playback stopped
    and ``received_ms`` the audio received for it by then; ``truncated_ms`` is
    the ``audio_end_ms`` sent (None when no truncate was needed: nothing
    played, nothing playing, or the item is not in the conversation).
    ``cancelled`` is the response this interrupt ended, once its
    ``response.done`` is in (``Session.interrupt`` waits for it; the server-VAD
    path does not wait and leaves it None). ``cancel_sent`` says whether this
    interrupt sent a ``response.cancel`` (False when nothing was active or the
    server cancels on its own). ``source`` is ``"app"`` or ``"server_vad"``.
    ``response_id`` is the response active at the moment of the interrupt.
    ``trigger_at`` is when the barge-in was triggered, on the
    :func:`time.monotonic` clock: when the reader read ``speech_started``
    (server VAD) or when :meth:`~rtqueue.Session.interrupt` was called; a
    phone bridge's ``clear`` time minus it is the barge-in latency. It is
    not compared by ``==``.
    """

    item_id: str | None
    played_ms: float
    received_ms: float
    truncated_ms: int | None
    cancelled: Response | None
    source: str
    cancel_sent: bool = False
    response_id: str | None = None  # the active response at the moment of the interrupt
    # Monotonic time of the trigger: when the reader read speech_started (server VAD), or the
    # interrupt() call (app). Playback stopped (a phone bridge's ``clear``) after it: the barge-in latency.
    trigger_at: float | None = attrs.field(default=None, eq=False)  # a time, not part of what happened


class AudioHost(Protocol):
    """What :class:`AudioLink` needs from its session (the session's shell implements it)."""

    def append_audio(self, pcm: bytes) -> bool:
        """Queue microphone audio (in the session's input format) on the writer's audio lane."""

    def input_format(self) -> AudioFormat:
        """The session's negotiated input audio format."""

    def output_format(self) -> AudioFormat:
        """The session's negotiated output audio format."""

    def frame_time(self) -> float:
        """Monotonic time the reader read the frame it is handling now."""

    def generation(self) -> int:
        """A number that changes each time the session adopts a new socket."""

    def server_interrupts(self) -> bool:
        """Whether the server cancels the active response itself on speech start."""

    def barge_in(
        self, cut: PlaybackCut | None, *, cancel: bool, server_cancels: bool, truncatable: bool
    ) -> tuple[str | None, bool, bool, int | None, list[SendHandle]]:
        """Cancel and truncate as the core decides: ``(response_id, cancel_sent, ending, truncated_ms, handles)``."""

    def wait_done(self, response_id: str, timeout: float | None) -> Response:
        """Block until ``response.done`` of ``response_id``; raise on timeout or loss."""

    def publish(self, event: Event) -> None:
        """Deliver an event to the app."""


class AudioLink:
    """Owns a session's :class:`~rtqueue.audio.AudioIO` while it is connected.

    Created by ``Session.connect(audio=...)``; :meth:`stats` is for diagnostics.
    """

    def __init__(self, host: AudioHost, io: AudioIO) -> None:
        self._host = host
        self.io = io
        self._lock = threading.Lock()  # one barge-in at a time (reader vs app threads)
        # Responses whose late audio must not play (a cancel is under way for them).
        self._cancelled: OrderedDict[str, None] = OrderedDict()
        # Which socket generation each item's audio came on (truncating it is only valid on that socket).
        self._item_gen: OrderedDict[str, int] = OrderedDict()
        self._item_resp: OrderedDict[str, str] = OrderedDict()  # item id -> the response whose audio it is
        self.last_interruption: Interruption | None = None
        self.interruptions = 0
        self.bad_audio = 0
        self.dropped_after_cancel_ms = 0.0  # audio of cancelled responses that arrived late
        # Session format -> device format, per direction; rebuilt when either side changes.
        self._to_device: Transcoder | None = None
        self._from_device: Transcoder | None = None
        self._in_lock = threading.Lock()  # the input's audio thread vs a format change

    @staticmethod
    def device(audio: Any) -> AudioIO:
        """``audio=True`` -> default devices; ``"null"`` -> no device; or an ``AudioIO``."""
        from .audio import AudioIO

        if audio is True:
            return AudioIO.default()
        if isinstance(audio, str) and audio == "null":
            return AudioIO.null()
        if isinstance(audio, AudioIO):
            return audio
        raise InvalidArgument(f'audio must be True, "null" or an rtqueue.audio.AudioIO, not {audio!r}')

    def start(self) -> None:
        """Open the devices; the microphone streams into the writer's audio lane."""
        if self.io.output is not None:
            self.io.output.start()
        if self.io.input is not None:
            self.io.input.start(self._on_mic)

    def _on_mic(self, chunk: bytes) -> None:
        """A device chunk (audio-in thread): transcoded to the session's input format, then queued."""
        assert self.io.input is not None
        src, dst = self.io.input.format, self._host.input_format()
        if src == dst:
            self._host.append_audio(chunk)
            return
        with self._in_lock:
            tc = self._from_device
            if tc is None or tc.src != src or tc.dst != dst:
                tc = self._from_device = Transcoder(src, dst)
            data = tc.convert(chunk)
        if data:
            self._host.append_audio(data)

    def close(self) -> None:
        """Close the devices (ends their threads); raises what a device's ``close`` raised."""
        self.io.close()

    def stats(self) -> dict[str, Any]:
        """Barge-in counters plus the output's and input's own stats."""
        out: dict[str, Any] = {
            "interruptions": self.interruptions,
            "bad_audio": self.bad_audio,
            "dropped_after_cancel_ms": self.dropped_after_cancel_ms,
        }
        if self.io.output is not None:
            out["output"] = self.io.output.stats()
        if self.io.input is not None:
            out["input"] = self.io.input.stats()
        return out

    # -- reader thread (never blocks) ------------------------------------------------------

    def on_event(self, event: dict[str, Any]) -> None:
        """Route one server event: audio to the speaker, speech start to barge-in."""
        typ = event["type"]
        out = self.io.output
        if typ == "response.output_audio.delta":
            if out is not None:
                self._on_audio(event)
        elif typ == "response.output_audio.done":
            item_id = event.get("item_id")
            if out is not None and isinstance(item_id, str):
                with self._lock:
                    tc = self._to_device
                    tail = tc.flush() if tc is not None and not tc.identity else b""
                    if tail:
                        out.play(item_id, tail)
                    self._to_device = None  # a fresh resampler for the next item
                out.end_item(item_id)
        elif typ == "response.done":
            resp = event.get("response")
            rid = resp.get("id") if isinstance(resp, dict) else None
            if isinstance(rid, str):
                with self._lock:
                    self._cancelled.pop(rid, None)
        elif typ == "input_audio_buffer.speech_started":
            server_cancels = self._host.server_interrupts()
            self.barge_in(cancel=not server_cancels, source="server_vad", wait=None,
                          server_cancels=server_cancels)

    def _on_audio(self, event: dict[str, Any]) -> None:
        assert self.io.output is not None
        delta, item_id, rid = event.get("delta"), event.get("item_id"), event.get("response_id")
        if not isinstance(delta, str) or not isinstance(item_id, str):
            return
        try:
            pcm = base64.b64decode(delta, validate=True)
        except (binascii.Error, ValueError):
            self.bad_audio += 1
            return
        fmt = self._host.output_format()
        with self._lock:
            if isinstance(rid, str) and rid in self._cancelled:
                # Sent before the server saw our cancel: never play it.
                self.dropped_after_cancel_ms += fmt.ms(len(pcm))
                return
            device = self.io.output.format
            if device is not fmt and device != fmt:  # usually the same object: skip attrs' field-wise compare
                tc = self._to_device
                if tc is None or tc.src != fmt or tc.dst != device:
                    tc = self._to_device = Transcoder(fmt, device)
                try:
                    pcm = tc.convert(pcm)
                except InvalidArgument:
                    self.bad_audio += 1  # a partial sample: not audio in the negotiated format
                    return
            if item_id not in self._item_gen:
                self._item_gen[item_id] = self._host.generation()
                while len(self._item_gen) > _MAX_TRACKED:
                    self._item_gen.popitem(last=False)
                if isinstance(rid, str):
                    self._item_resp[item_id] = rid
                    while len(self._item_resp) > _MAX_TRACKED:
                        self._item_resp.popitem(last=False)
            # Under the lock, so a concurrent barge-in cannot slip between the check and the play.
            self.io.output.play(item_id, pcm)

    def cut_response(self, response_id: str) -> tuple[str, int] | None:
        """Stop playing ``response_id`` (a guardrail cut it): ``(item_id, audio_end_ms)`` to truncate, or None.

        Its audio still arriving is dropped. Playback stops only if what plays
        now is that response's; the truncate position is what was played,
        clamped to what was received (None at 0 ms or for an item of an
        earlier socket).
        """
        out = self.io.output
        with self._lock:
            self._cancelled[response_id] = None
            while len(self._cancelled) > _MAX_TRACKED:
                self._cancelled.popitem(last=False)
            if out is None:
                return None
            current = out.current_item()
            if current is None or self._item_resp.get(current) != response_id:
                return None
            self._to_device = None
            cut = out.interrupt()
            if cut is None or self._item_gen.get(cut.item_id) != self._host.generation():
                return None
        ms = truncate_ms(cut)
        return (cut.item_id, ms) if ms is not None else None

    # -- barge-in -------------------------------------------------------------------------------

    def barge_in(
        self, *, cancel: bool, source: str, wait: float | None, server_cancels: bool = False
    ) -> Interruption:
        """Stop playback, cancel if asked and something is active, truncate to what was played.

        ``server_cancels``: the server is cancelling the active response itself
        (speech start with ``interrupt_response``); nobody sends a second
        cancel. ``wait`` None: do not wait for the cancelled response's
        ``done`` (the reader thread calls this); otherwise wait up to ``wait``
        seconds and report it in ``cancelled``.
        """
        host = self._host
        trigger_at = host.frame_time() if source == "server_vad" else time.monotonic()
        out = self.io.output
        with self._lock:
            self._to_device = None  # whatever the resampler held was never played: drop it
            cut: PlaybackCut | None = out.interrupt() if out is not None else None
            truncatable = cut is not None and self._item_gen.get(cut.item_id, host.generation()) == host.generation()
            rid, send_cancel, ending, truncated, handles = host.barge_in(
                cut, cancel=cancel, server_cancels=server_cancels, truncatable=truncatable
            )
            if rid is not None and ending:
                self._cancelled[rid] = None
                while len(self._cancelled) > _MAX_TRACKED:
                    self._cancelled.popitem(last=False)
        cancelled = None
        if rid is not None and ending and wait is not None:
            cancelled = host.wait_done(rid, wait)
        if wait is not None and handles:
            # Return with the truncate on the wire (a close right after must not drop it).
            with contextlib.suppress(RtqueueError):
                handles[-1].wait_sent(wait)
        result = Interruption(
            item_id=cut.item_id if cut else None,
            played_ms=cut.played_ms if cut else 0.0,
            received_ms=cut.received_ms if cut else 0.0,
            truncated_ms=truncated,
            cancelled=cancelled,
            source=source,
            cancel_sent=send_cancel,
            response_id=rid,
            trigger_at=trigger_at,
        )
        self.last_interruption = result
        self.interruptions += 1
        host.publish(Event("audio.interrupted", attrs.asdict(result, recurse=False)))
        return result


def truncate_ms(cut: PlaybackCut | None) -> int | None:
    """``audio_end_ms`` for a cut: played, clamped to received, floored; None at 0."""
    if cut is None:
        return None
    ms = math.floor(min(cut.played_ms, cut.received_ms))
    return ms if ms > 0 else None
