"""Delivery of events to app code, off the socket reader.

One dispatcher thread per session runs every callback, in arrival order, so a
slow callback delays other callbacks but never socket reading or the gate. A
callback that raises anything, ``SystemExit`` and ``KeyboardInterrupt``
included, is logged and counted; the dispatcher goes on. Pull-style apps get
:class:`EventStream` iterators with their own bounded queues.

Backpressure:

- the callback queue is unbounded for control events (they are few and must
  not be lost) but holds at most ``max_audio`` audio delta events; past it the
  oldest audio delta is dropped and counted (a late audio chunk is worthless to
  a callback anyway);
- each :class:`EventStream` holds at most ``max_size`` events (default
  :data:`DEFAULT_STREAM_SIZE`). When full, the oldest audio delta is dropped;
  if it holds none, the oldest other ``*.delta``; if none, the oldest event.
  Every drop is counted in :attr:`EventStream.dropped`.
- a stream the app no longer references (an abandoned ``for`` loop, a dropped
  iterator) unsubscribes by itself: the dispatcher holds streams weakly.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from .handles import check_timeout
from .values import Event

__all__ = ["DEFAULT_STREAM_SIZE", "Dispatcher", "EventStream"]

log = logging.getLogger("rtqueue")

AUDIO_TYPES = frozenset({"response.output_audio.delta"})

#: Events an :class:`EventStream` buffers before it drops (see the module doc).
DEFAULT_STREAM_SIZE = 1000

Callback = Callable[[Event], Any]


def _is_audio(event: Event) -> bool:
    return event.type in AUDIO_TYPES


def _droppable(event: Event) -> bool:
    return event.type.endswith(".delta")


class EventStream:
    """A blocking iterator over a session's events (``Session.events()``).

    Iteration ends when the session closes, when :meth:`close` is called, or
    when the ``with`` block ends; leaving a ``for`` loop early closes it too.
    Holds at most ``max_size`` events (see the module doc for what is dropped;
    ``dropped`` counts it).
    """

    def __init__(self, types: frozenset[str] | None, max_size: int = DEFAULT_STREAM_SIZE) -> None:
        self._types = types
        self._max = max_size
        self._cond = threading.Condition()
        self._items: deque[Event] = deque()
        self._closed = False
        self._on_close: Callable[[EventStream], None] | None = None
        self.dropped = 0

    def wants(self, event: Event) -> bool:
        """Whether this stream subscribed to ``event.type``."""
        return self._types is None or event.type in self._types

    def bind(self, on_close: Callable[[EventStream], None]) -> None:
        """The dispatcher's side: call ``on_close(stream)`` once, when the stream is closed."""
        self._on_close = on_close

    def put(self, event: Event) -> None:
        """Add ``event`` (the dispatcher's side; drops per the policy when full)."""
        with self._cond:
            if self._closed:
                return
            if len(self._items) >= self._max:
                self._drop_one()
            self._items.append(event)
            self._cond.notify()

    def _drop_one(self) -> None:
        for droppable in (_is_audio, _droppable):
            for i, ev in enumerate(self._items):
                if droppable(ev):
                    del self._items[i]
                    self.dropped += 1
                    return
        self._items.popleft()
        self.dropped += 1

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def get(self, timeout: float | None = None) -> Event | None:
        """Next event, or ``None`` on timeout or once closed and drained."""
        timeout = check_timeout(timeout)
        with self._cond:
            if not self._cond.wait_for(lambda: self._items or self._closed, timeout):
                return None
            if not self._items:
                return None
            return self._items.popleft()

    def __iter__(self) -> Iterator[Event]:
        try:
            while True:
                ev = self.get()
                if ev is None:
                    return
                yield ev
        finally:  # the loop ended, or was left early (break, exception, dropped iterator)
            self.close()

    def end(self) -> None:
        """The session closed: iteration ends after the events already queued."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def close(self) -> None:
        """Stop the stream and unsubscribe; iteration ends after the events already queued."""
        self.end()
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close(self)

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
        self._streams: list[weakref.ref[EventStream]] = []
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

    def stream(self, types: frozenset[str] | None, max_size: int = DEFAULT_STREAM_SIZE) -> EventStream:
        """A new :class:`EventStream` fed from now on (held weakly)."""
        s = EventStream(types, max_size)
        with self._cond:
            if self._stopping:
                s.end()
                return s
            ref = weakref.ref(s, self._forget)
            self._streams.append(ref)
        s.bind(lambda _s: self._forget(ref))
        return s

    def _forget(self, ref: weakref.ref[EventStream]) -> None:
        with self._cond:
            if ref in self._streams:
                self._streams.remove(ref)

    def stream_count(self) -> int:
        """Streams still subscribed."""
        with self._cond:
            return sum(1 for r in self._streams if r() is not None)

    def audio_queued(self) -> int:
        """Audio delta events waiting for callbacks (at most ``max_audio``)."""
        with self._cond:
            return self._audio_queued

    def wants(self, event_type: str) -> bool:
        """Cheap check (no lock: a stale answer costs one event) whether anyone listens."""
        return bool(self._streams or self._callbacks.get(event_type) or self._callbacks.get("*"))

    # -- producing ---------------------------------------------------------------

    def publish(self, event: Event) -> None:
        """Queue ``event`` for callbacks and streams (never blocks, never runs user code)."""
        if self._streams:
            with self._cond:
                streams = [s for r in self._streams if (s := r()) is not None and s.wants(event)]
            for s in streams:
                s.put(event)
        if not (self._callbacks.get(event.type) or self._callbacks.get("*")):
            return
        self._put(self._deliver, (event,), audio=event.type in AUDIO_TYPES)

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the dispatcher thread (at once, here, once it has stopped)."""
        if not self._put(fn, args, audio=False):
            self._guarded(fn, args)

    def _put(self, fn: Callable[..., Any], args: tuple[Any, ...], *, audio: bool) -> bool:
        with self._cond:
            if self._stopping:
                return False
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
            return True

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
            self._guarded(fn, args)

    def _guarded(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            fn(*args)
        except BaseException:  # a user callback must never kill the dispatcher, SystemExit included
            self.callback_errors += 1
            log.exception("error in callback %r", fn)

    def _deliver(self, event: Event) -> None:
        with self._cond:
            cbs = list(self._callbacks.get(event.type, ())) + list(self._callbacks.get("*", ()))
        for cb in cbs:
            try:
                cb(event)
            except BaseException as exc:  # SystemExit & co. too: the next callback must still run
                self.callback_errors += 1
                log.warning("callback %r for %s raised %r", cb, event.type, exc)
                if self.on_callback_error is not None and event.type != "rtqueue.callback_error":
                    self.on_callback_error(event, exc)

    def stop(self, timeout: float = 5.0) -> None:
        """Deliver what is queued, then end the thread and every stream (idempotent)."""
        with self._cond:
            self._stopping = True
            refs, self._streams = self._streams, []
            self._cond.notify_all()
        for r in refs:
            s = r()
            if s is not None:
                s.end()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)

    @property
    def thread(self) -> threading.Thread | None:
        """The dispatcher thread."""
        return self._thread
