"""Delivery of events to app code, off the socket reader.

One dispatcher thread per session runs every callback, in arrival order, so a
slow callback delays other callbacks but never socket reading or the gate.
Pull-style apps get :class:`EventStream` iterators with their own queues.

Backpressure: the queue is unbounded for control events (they are few and
must not be lost) but holds at most ``max_audio`` audio delta events; past it
the oldest audio delta is dropped and counted (audio is the bulk, and a late
audio chunk is worthless to a callback anyway).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from .values import Event

__all__ = ["Dispatcher", "EventStream"]

log = logging.getLogger("rtqueue")

AUDIO_TYPES = frozenset({"response.output_audio.delta"})

Callback = Callable[[Event], Any]


class EventStream:
    """A blocking iterator over a session's events (``Session.events()``).

    Iteration ends when the session closes or :meth:`close` is called. Holds at
    most ``max_audio`` audio deltas (oldest dropped, counted in ``dropped``).
    """

    def __init__(self, types: frozenset[str] | None, max_audio: int, on_close: Callable[[EventStream], None]):
        self._types = types
        self._max_audio = max_audio
        self._on_close = on_close
        self._cond = threading.Condition()
        self._items: deque[Event] = deque()
        self._audio = 0
        self._closed = False
        self.dropped = 0

    def wants(self, event: Event) -> bool:
        """Whether this stream subscribed to ``event.type``."""
        return self._types is None or event.type in self._types

    def _put(self, event: Event) -> None:
        with self._cond:
            if self._closed:
                return
            if event.type in AUDIO_TYPES:
                if self._audio >= self._max_audio:
                    self._drop_oldest_audio()
                self._audio += 1
            self._items.append(event)
            self._cond.notify()

    def _drop_oldest_audio(self) -> None:
        for i, ev in enumerate(self._items):
            if ev.type in AUDIO_TYPES:
                del self._items[i]
                self._audio -= 1
                self.dropped += 1
                return

    def get(self, timeout: float | None = None) -> Event | None:
        """Next event, or ``None`` on timeout or once closed and drained."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._items or self._closed, timeout):
                return None
            if not self._items:
                return None
            ev = self._items.popleft()
            if ev.type in AUDIO_TYPES:
                self._audio -= 1
            return ev

    def __iter__(self) -> Iterator[Event]:
        while True:
            ev = self.get()
            if ev is None:
                return
            yield ev

    def close(self) -> None:
        """Stop the stream; iteration ends after the events already queued."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._on_close(self)

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Dispatcher:
    """Owns the dispatcher thread and the subscriber tables."""

    def __init__(self, name: str = "rtqueue-dispatch", *, max_audio: int = 500) -> None:
        self._name = name
        self._max_audio = max_audio
        self._cond = threading.Condition()
        self._queue: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._audio_queued = 0
        self._callbacks: dict[str, list[Callback]] = {}
        self._streams: list[EventStream] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.dropped_audio = 0
        self.callback_errors = 0
        self.on_callback_error: Callable[[Event, BaseException], None] | None = None

    def start(self) -> None:
        """Start the thread (once)."""
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    # -- subscription ------------------------------------------------------------

    def subscribe(self, event_type: str, callback: Callback) -> Callable[[], None]:
        """Register ``callback`` for ``event_type`` (or ``"*"``); returns an unsubscribe function."""
        with self._cond:
            self._callbacks.setdefault(event_type, []).append(callback)

        def unsubscribe() -> None:
            with self._cond:
                cbs = self._callbacks.get(event_type, [])
                if callback in cbs:
                    cbs.remove(callback)

        return unsubscribe

    def stream(self, types: frozenset[str] | None) -> EventStream:
        """A new :class:`EventStream` fed from now on."""
        s = EventStream(types, self._max_audio, self._remove_stream)
        with self._cond:
            if self._stopping:
                s._closed = True
            else:
                self._streams.append(s)
        return s

    def _remove_stream(self, s: EventStream) -> None:
        with self._cond:
            if s in self._streams:
                self._streams.remove(s)

    def wants(self, event_type: str) -> bool:
        """Cheap check (no lock: a stale answer costs one event) whether anyone listens."""
        return bool(
            self._streams
            or self._callbacks.get(event_type)
            or self._callbacks.get("*")
        )

    # -- producing ---------------------------------------------------------------

    def publish(self, event: Event) -> None:
        """Queue ``event`` for callbacks and streams (never blocks, never runs user code)."""
        with self._cond:
            streams = [s for s in self._streams if s.wants(event)]
        for s in streams:
            s._put(event)
        if not (self._callbacks.get(event.type) or self._callbacks.get("*")):
            return
        self._put(self._deliver, (event,), audio=event.type in AUDIO_TYPES)

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the dispatcher thread."""
        self._put(fn, args, audio=False)

    def _put(self, fn: Callable[..., Any], args: tuple[Any, ...], *, audio: bool) -> None:
        with self._cond:
            if self._stopping:
                return
            if audio:
                if self._audio_queued >= self._max_audio:
                    for i, (f, a) in enumerate(self._queue):
                        if f == self._deliver and a[0].type in AUDIO_TYPES:
                            del self._queue[i]
                            self._audio_queued -= 1
                            self.dropped_audio += 1
                            break
                self._audio_queued += 1
            self._queue.append((fn, args))
            self._cond.notify()

    # -- the thread ----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                fn, args = self._queue.popleft()
                if fn == self._deliver and args[0].type in AUDIO_TYPES:
                    self._audio_queued -= 1
            try:
                fn(*args)
            except Exception:  # a user callback must never kill the dispatcher
                log.exception("rtqueue: error in %r", fn)

    def _deliver(self, event: Event) -> None:
        with self._cond:
            cbs = list(self._callbacks.get(event.type, ())) + list(self._callbacks.get("*", ()))
        for cb in cbs:
            try:
                cb(event)
            except Exception as exc:
                self.callback_errors += 1
                log.warning("rtqueue: callback %r for %s raised %r", cb, event.type, exc)
                if self.on_callback_error is not None and event.type != "rtqueue.callback_error":
                    self.on_callback_error(event, exc)

    def stop(self, timeout: float = 5.0) -> None:
        """Deliver what is queued, then end the thread and every stream (idempotent)."""
        with self._cond:
            self._stopping = True
            streams, self._streams = self._streams, []
            self._cond.notify_all()
        for s in streams:
            with s._cond:
                s._closed = True
                s._cond.notify_all()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)

    @property
    def thread(self) -> threading.Thread | None:
        """The dispatcher thread."""
        return self._thread
