"""The writer thread: it owns the order of everything the session sends.

Two lanes feed it. The **control lane** is FIFO (a few urgent events, such as
``response.cancel`` and ``conversation.item.truncate``, jump to its head). The
**audio lane** carries ``input_audio_buffer.append``. A chunk never passes a
control event queued before it, with one exception: it passes a
``response.create``, so mic audio never queues behind a held create.

Mic audio usually skips the lane: when nothing is queued or being sent (or
the only thing queued is a ``response.create`` waiting on the gate) and the
socket is not backed up (``backed_up``: on Linux, the kernel's unsent
bytes), the appending thread writes its chunk itself (``direct``). A
backed-up socket gets its writes from this thread only: the appending thread
may be a Twilio bridge's I/O thread, which must not block on one call's
socket. Waking the writer for every 100 ms chunk cost about four thread
switches, ~85 us of CPU per chunk with hundreds of sessions in one process
(benchmarks/bench_scale.py); the direct write costs the ~11 us of framing.
Order is kept: a chunk goes direct only when no earlier chunk and no control
event is queued or in flight, so the wire order is the order the app asked
for. Control events, the gate and the reconnect's replay stay the writer's,
with one exception below.

The create the writer waits on in the gate may be sent by the thread that
read its release (:meth:`Writer.send_held_create`, called by the reader): it
already holds the GIL, where the woken writer would first have to win it
from every thread coming back from a system call. The writer sends nothing
until that send is done, so the order stays the writer's.

An in-band ``response.create`` at the head waits on the :class:`ResponseGate`
in timed slices (``slice_s``, default 1 s). The gate's condition cuts a
slice short the moment it drains, so the wake-up costs microseconds, and a
*poke* cuts it short when mic audio or an urgent event (cancel, truncate)
arrives, so neither waits for the slice to end; closing the gate (shutdown)
wakes it too, and a slice never runs past the create's deadline. Between
slices the writer only looks for stale responses, whose timeout is minutes.
DESIGN.md asked for slices of a few ms, then 50 ms; with pokes nothing needs
them short, and every slice end wakes a thread: 5 ms slices cost 15 % of a
core at 200 sessions (benchmarks/bench_scale.py), and 50 ms slices were a
fifth of the app's CPU with 300 SIP calls each holding a prompt behind its
greeting (6,000 wake-ups a second; benchmarks/bench_phone.py).

``on_evict`` (the session's stale-response check) runs between those slices
and, when the writer is idle, every ``idle_check_s`` (the session passes a tenth of
its response timeout, 0.05-5 s): a response whose
``response.done`` never comes is released even when nothing is queued behind it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import attrs

from .errors import ConnectionLost, GateTimeout, RtqueueError, SessionClosed
from .gate import ResponseGate
from .handles import SendHandle

__all__ = ["RELEASE_SEND_MAX", "Outbound", "Writer"]

log = logging.getLogger("rtqueue")

#: The most the thread that read a release writes for a held create (its prelude included); a
#: bigger one (long instructions, many tools) is left to the writer (see Writer.send_held_create).
RELEASE_SEND_MAX = 16 * 1024

_IDLE_CHECK_S = 0.25  # while idle, look for stale responses this often (unless told otherwise)


def _create_texts(item: Outbound) -> list[str]:
    """A gated create's frames in wire order: its turn's item (the prelude), then the create."""
    return [json.dumps(pre) for pre in item.prelude] + [json.dumps(item.event)]


@attrs.define(eq=False)
class Outbound:
    """One queued client event and what the writer must do with it."""

    event: dict[str, Any]
    handle: SendHandle
    gated: bool = False  # an in-band response.create: wait for the gate
    oob: bool = False  # an out-of-band response.create: track, never wait
    deadline: float | None = None  # monotonic time after which it is never sent
    prelude: tuple[dict[str, Any], ...] = ()  # sent after the gate is reserved, just before the create
    untagged: bool = False  # the create has no id in its metadata (the gate matches it as the pending one)
    holder: str | None = None  # the response whose tool chain it continues (it takes that response's hold)
    ordinal: int = 0  # set by the writer: how many control events were queued before this one
    first_wait: float | None = None
    withdrawn: bool = False

    @property
    def event_id(self) -> str:
        """The client event id (always set by the session)."""
        return str(self.event["event_id"])


class Writer:
    """Owns the writer thread and the two outbound lanes.

    ``send`` is called with the JSON text and must raise
    :class:`ConnectionLost` when the socket is gone. On such a failure the
    writer puts the event back at the head, pauses, and calls
    ``on_send_error``; the session then either ``resume()``s it on a new
    socket or ``stop()``s it, failing everything still queued.
    """

    def __init__(
        self,
        gate: ResponseGate,
        send: Callable[[str], None],
        *,
        on_send_error: Callable[[BaseException], None],
        on_sent: Callable[[Outbound], None] | None = None,
        on_unsent: Callable[[Outbound, BaseException], None] | None = None,
        on_evict: Callable[[], None] | None = None,
        send_gated: Callable[[str, float], None] | None = None,
        skip: Callable[[dict[str, Any]], bool] | None = None,
        backed_up: Callable[[], bool] | None = None,
        slice_s: float = 1.0,
        max_audio_chunks: int = 250,
        name: str = "rtqueue-writer",
        idle_check_s: float = _IDLE_CHECK_S,
        direct_audio: bool = True,
    ) -> None:
        self._gate = gate
        # Each idle check is a wake-up; hundreds of idle sessions in one process pay for every one of them.
        self._idle_check = idle_check_s
        self._send = send
        self._on_send_error = on_send_error
        self._on_sent = on_sent
        self._on_unsent = on_unsent
        # A gated create goes through this, with the seconds it waited (to record it); default: send.
        self._send_gated = send_gated
        self._prime: deque[str] = deque()  # replay for a new socket: goes out while paused
        self._on_evict = on_evict
        self._skip = skip  # skip(event) True: a non-create event became moot while queued; drop it
        # backed_up() True: a send could block now; threads other than this one then leave it to this one.
        self._backed_up = backed_up
        #: Longest single wait on the gate, in seconds (settable: benchmarks vary it).
        self.slice_s = slice_s
        self._max_audio = max_audio_chunks
        self._cond = threading.Condition()
        self._control: deque[Outbound] = deque()
        # (control events queued before it, text): audio never passes a control event queued before
        # it, except a response.create (mic audio must not wait behind a held create).
        self._audio: deque[tuple[int, str]] = deque()
        self._queued_total = 0  # control events ever queued (the next one's ordinal)
        self._paused = False
        self._busy = False  # the thread is sending something it took off a lane (under _cond)
        self._direct_inflight = 0  # appending threads inside a direct write (under _cond)
        self._in_gate: Outbound | None = None  # the create this thread waits on in the gate (under _cond)
        self._releaser_sending = False  # send_held_create() is sending it: this thread waits (under _cond)
        #: Let the appending thread write mic audio itself when nothing is ahead of it (see the module doc).
        self.direct_audio = direct_audio
        self._parked = threading.Event()  # set while the thread waits because it is paused
        self._stopping: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.audio_sent = 0
        self.audio_direct = 0  # of audio_sent: chunks the appending thread wrote itself
        self.audio_dropped = 0
        self.audio_sent_while_held = 0  # audio chunks sent while a create waited on the gate
        self.creates_sent_on_release = 0  # held creates the thread that read their release sent
        self.audio_backed_up = 0  # mic chunks that would have gone direct, queued because the socket backed up
        self.skipped = 0  # control events dropped as moot by ``skip``
        self.wakeups = 0  # times the thread's wait on its condition returned (direct mic writes add none)

    # -- producers ---------------------------------------------------------------

    def start(self) -> None:
        """Start the thread (once)."""
        self._thread.start()

    @property
    def thread(self) -> threading.Thread:
        """The writer thread."""
        return self._thread

    def enqueue(self, item: Outbound, *, front: bool = False) -> None:
        """Queue a control event (``front`` for urgent ones); fails it if stopped."""
        self.enqueue_many([item], front=front)

    def enqueue_many(self, items: list[Outbound], *, front: bool = False) -> None:
        """Queue several control events in one step, keeping their order (at the head if ``front``)."""
        if not items:
            return
        with self._cond:
            if self._stopping is None:
                for item in items:
                    item.ordinal = self._queued_total
                    self._queued_total += 1
                if front:
                    self._control.extendleft(reversed(items))
                else:
                    self._control.extend(items)
                self._cond.notify()
                n = len(items)
                holding = front and len(self._control) > n and self._control[n].first_wait is not None
            else:
                holding = False
            err = self._stopping
        if err is None:
            if holding:
                self._gate.poke()  # the writer is waiting on the gate: an urgent event goes first, now
            return
        for item in items:
            self._fail(item, type(err)(*err.args))

    def append_audio(self, text: str) -> bool:
        """Send or queue one serialized ``input_audio_buffer.append``; ``False`` if stopped.

        With nothing ahead of it the chunk is written on the calling thread
        (see the module doc); a failed write counts the chunk dropped and
        reports the lost connection, as the writer would. Otherwise it goes on
        the audio lane, which is bounded: when full, the oldest chunk is
        dropped and counted (a stale chunk is worth less than a fresh one).
        """
        with self._cond:
            if self._stopping is not None:
                return False
            control = self._control
            direct = (
                self.direct_audio and not self._busy and not self._paused and not self._audio
                and not self._prime
                and (not control or (control[0].first_wait is not None and len(control) == 1))
            )
            # A socket that backs up: the chunk waits on the lane, so only the writer can block on it
            # (an appending thread may be a Twilio bridge's I/O thread, carrying other calls). The
            # probe keeps the GIL (no wait under the lock).
            if direct and self._backed_up is not None and self._backed_up():
                direct = False
                self.audio_backed_up += 1
            if direct:
                send = self._send
                self._direct_inflight += 1  # pause() waits for it: the socket is then the caller's alone
                held = bool(control)
            else:
                send = None
                if len(self._audio) >= self._max_audio:
                    self._audio.popleft()
                    self.audio_dropped += 1
                self._audio.append((self._queued_total, text))
                self._cond.notify()
                holding = bool(control) and control[0].first_wait is not None
        if send is not None:
            error: ConnectionLost | None = None
            try:
                send(text)
            except ConnectionLost as exc:
                error = exc
            with self._cond:
                self._direct_inflight -= 1
                if error is None:
                    self.audio_sent += 1
                    self.audio_direct += 1
                    self.audio_sent_while_held += held
                else:
                    self.audio_dropped += 1
                    self._paused = True
                if self._paused and not self._direct_inflight:
                    # A pause() waits for the socket. Only then: a notify per chunk would wake the
                    # idle writer for every mic chunk, the very wake-up direct writes remove.
                    self._cond.notify_all()
            if error is not None:
                self._on_send_error(error)
            return True
        if holding:
            self._gate.poke()  # the writer is waiting on the gate: let it send this now
        return True

    def withdraw(self, handle: SendHandle) -> bool:
        """Remove a not-yet-sent event; ``True`` if it was still queued."""
        with self._cond:
            for item in self._control:
                if item.handle is handle:
                    item.withdrawn = True
                    self._control.remove(item)
                    self._cond.notify()
                    return True
        return False

    def filter_preludes(self, known: Callable[[dict[str, Any]], bool]) -> None:
        """Drop prelude events ``known(event)`` says arrived already (a reconnect's re-seed carries them)."""
        with self._cond:
            for item in self._control:
                if item.prelude:
                    item.prelude = tuple(p for p in item.prelude if not known(p))

    def audio_queued(self) -> int:
        """Mic chunks waiting on the audio lane (at most ``max_audio_chunks``)."""
        with self._cond:
            return len(self._audio)

    def queued_event_ids(self) -> set[str]:
        """Event ids of the control events not sent yet."""
        with self._cond:
            return {item.event_id for item in self._control}

    def prime(self, send: Callable[[str], None], texts: list[str]) -> None:
        """While paused: adopt a new socket's ``send`` and write ``texts`` on it first, in order.

        The writer thread sends them (it stays the only sender) and stays
        paused for everything else until :meth:`resume`.
        """
        with self._cond:
            self._send = send
            self._prime.clear()  # what an earlier, failed attempt primed is for a dead socket
            self._prime.extend(texts)
            self._cond.notify_all()

    def pause(self, timeout: float = 5.0) -> bool:
        """Hold everything (the connection is being replaced).

        Returns once the thread is parked and no appending thread is inside a
        direct write (no send in progress), so the caller may use the socket
        alone; ``False`` if that did not happen within ``timeout``.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            self._paused = True
            self._cond.notify_all()
            parked = threading.current_thread() is self._thread or not self._thread.is_alive()
        if not parked and not self._parked.wait(timeout):
            return False
        with self._cond:
            return self._cond.wait_for(lambda: not self._direct_inflight and not self._releaser_sending,
                                       max(0.0, deadline - time.monotonic()))

    def resume(self, send: Callable[[str], None] | None = None, *, drop_audio: bool = True) -> None:
        """Continue, optionally on a new ``send`` function (a new socket)."""
        with self._cond:
            if send is not None:
                self._send = send
            if drop_audio:
                self.audio_dropped += len(self._audio)
                self._audio.clear()
            self._paused = False
            self._parked.clear()
            self._cond.notify_all()

    def pending(self) -> list[Outbound]:
        """Snapshot of the control lane."""
        with self._cond:
            return list(self._control)

    def stop(self, error: BaseException | None = None, timeout: float = 5.0) -> list[Outbound]:
        """End the thread; fail and return every control event not sent (idempotent)."""
        err = error if error is not None else SessionClosed("session closed")
        with self._cond:
            if self._stopping is None:
                self._stopping = err
            unsent = list(self._control)
            self._control.clear()
            self._audio.clear()
            self._prime.clear()
            self._cond.notify_all()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._gate.close(err)  # wakes a writer waiting on the gate
            self._thread.join(timeout)
        for item in unsent:
            self._fail(item, type(err)(*err.args))
        return unsent

    # -- the thread -------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                more = self._step()
                if self._busy:  # a stale read just takes the lock once more
                    with self._cond:
                        if not self._releaser_sending:  # that send keeps it until it is out
                            self._busy = False
                if not more:
                    break
        except Exception:  # pragma: no cover - a bug; keep it loud
            log.exception("writer thread crashed")
            self._on_send_error(RtqueueError("writer thread crashed"))

    def _step(self) -> bool:
        with self._cond:
            while self._stopping is None and (
                self._releaser_sending or self._paused or (not self._audio and not self._control)
            ):
                if self._releaser_sending:  # the held create is going out on another thread: it goes first
                    self._cond.wait()
                    self.wakeups += 1
                    continue
                if self._prime:
                    break
                if self._paused:
                    self._parked.set()
                    self._cond.wait()
                    self.wakeups += 1
                    continue
                woke = self._cond.wait(self._idle_check)
                self.wakeups += 1
                if not woke and self._on_evict is not None:
                    break
            # The replay for a new socket goes first, paused or not (resume() may come before it is out).
            primed = self._prime[0] if self._prime and self._stopping is None else None
            send = self._send
            if primed is None and self._paused and self._stopping is None:
                return True  # paused: park on the next step
            idle = primed is None and self._stopping is None and not self._audio and not self._control
            if primed is None and not idle:
                self._parked.clear()
                if self._stopping is not None:
                    return False
                head = self._control[0] if self._control else None
                if head is None or head.gated:
                    audio = [text for _, text in self._audio]
                    self._audio.clear()
                else:  # only what was appended before the head was queued goes first
                    audio = []
                    while self._audio and self._audio[0][0] <= head.ordinal:
                        audio.append(self._audio.popleft()[1])
                # From here until the step ends nothing may go direct, or it could pass what this
                # step sends (a waiting create is the exception: _pop marks it busy once it goes).
                self._busy = bool(audio) or (head is not None and not head.gated)
        if primed is not None:
            return self._step_prime(send, primed)
        if idle:
            # Nothing to send for a while: a response that never ends must not
            # hold the gate forever (nor a wait() on it), even with no create queued.
            assert self._on_evict is not None
            self._on_evict()
            return True
        if audio:
            holding = head is not None and head.gated and head.first_wait is not None
            sent = 0
            for text in audio:
                if not self._transmit_audio(text):
                    break
                sent += 1
            with self._cond:  # the appending threads count direct chunks under it too
                self.audio_sent += sent
                if holding:
                    self.audio_sent_while_held += sent
                if head is not None and head.gated:
                    self._busy = False  # the audio is out; a waiting create lets later audio go direct
            if sent < len(audio):
                return True
        if head is None:
            return True
        if head.gated:
            return self._step_gated(head)
        return self._send_head(head)

    def _step_gated(self, head: Outbound) -> bool:
        now = time.monotonic()
        if head.first_wait is None:
            head.first_wait = now
        if head.deadline is not None and now >= head.deadline:
            if self._pop(head):
                self._gate.note_timed_out()
                self._fail(head, GateTimeout(
                    f"response.create {head.event_id} waited {now - head.first_wait:.3f}s in the gate "
                    "past its deadline and was not sent"
                ))
            return True
        if self._on_evict is not None:
            self._on_evict()
        wait = self.slice_s if head.deadline is None else max(0.0, min(self.slice_s, head.deadline - now))
        with self._cond:
            if not self._control or self._control[0] is not head or self._releaser_sending:
                return True  # taken meanwhile (send_held_create)
            self._in_gate = head
            # Read with _in_gate set: a send_held_create() that sees it pokes after this mark,
            # so this wait cannot outlast a create already sent.
            mark = self._gate.poke_mark()
        try:
            acquired = self._gate.acquire(head.event_id, wait, untagged=head.untagged, holder=head.holder,
                                          poke_mark=mark)
        except (SessionClosed, ConnectionLost):
            return True  # stop() is under way; the next step sees it
        finally:
            with self._cond:
                if self._in_gate is head:
                    self._in_gate = None
        if not acquired:
            return True
        if not self._pop(head):  # withdrawn while we waited
            self._gate.abandon(head.event_id)
            return True
        waited = time.monotonic() - head.first_wait
        try:
            self._write_create(self._send, head, _create_texts(head), waited)
        except ConnectionLost as exc:
            self._gate.abandon(head.event_id)
            self._requeue_after_failure(head, exc)
        return True

    def _write_create(self, send: Callable[[str], None], head: Outbound, texts: list[str], waited: float) -> None:
        """Write a reserved create (``texts``: its turn's item, then it) and record it sent."""
        # The write starts now: taken after send() returns, the time would also
        # count waiting for the GIL back after the syscall.
        started = self._gate.now()
        for pre in texts[:-1]:  # a turn's user item: right before its create, inside the gate
            send(pre)
        if self._send_gated is not None:
            self._send_gated(texts[-1], waited)
        else:
            send(texts[-1])
        self._gate.note_sent(head.event_id, waited, at=started)
        self._mark_sent(head)

    def send_held_create(self) -> bool:
        """Send, on the calling thread, the in-band create this writer waits on in the gate, if it is free now.

        For the thread that read a release (the reader, right after a
        ``response.done``). Woken by that release, the writer would first have
        to win the GIL from every thread coming back from a system call; with
        hundreds of sessions in one process that wait reached 25 ms, the
        releasing thread already holds the GIL (benchmarks/RESULTS.md). Nothing
        else changes: only the create the writer is parked on goes (with its
        prelude), it reserves the slot as :meth:`ResponseGate.acquire` does
        (atomically with the emptiness check, and with taking it off the lane),
        and the writer sends nothing until it is out, so the wire order is the
        writer's. Returns ``False``, leaving it to the writer, when the writer
        waits on no such create, the create continues a tool chain (its hold is
        the writer's to take over), its deadline passed, the writer is paused,
        replaying or stopping, an appending thread is mid-write, the socket is
        backed up (``backed_up``), or the gate is not free.

        The calling thread writes to the socket, but only one that is not
        backed up, and at most :data:`RELEASE_SEND_MAX` bytes (the create and
        its turn's item): it then has room, and the write does not block.
        """
        if self._backed_up is not None and self._backed_up():
            return False  # the send could block: the writer's to do
        with self._cond:
            head = self._in_gate
        if head is None:
            return False
        try:  # before taking it: a create too big to be sure of the socket's room stays the writer's
            texts = _create_texts(head)
        except (TypeError, ValueError):
            return False  # the writer reports it
        if sum(len(t) for t in texts) > RELEASE_SEND_MAX:
            return False
        now = time.monotonic()
        with self._cond:
            if self._in_gate is not head:
                return False
            if (head.holder is not None or self._paused or self._prime
                    or self._stopping is not None or self._direct_inflight or self._releaser_sending
                    or not self._control or self._control[0] is not head
                    or (head.deadline is not None and now >= head.deadline)):
                return False
            try:  # writer's lock, then the gate's (the documented order); a zero timeout never waits
                reserved = self._gate.acquire(head.event_id, 0.0, untagged=head.untagged)
            except (SessionClosed, ConnectionLost):
                return False
            if not reserved:
                return False
            self._control.popleft()
            self._in_gate = None
            self._busy = self._releaser_sending = True
            send = self._send
        assert head.first_wait is not None
        waited = now - head.first_wait
        error: BaseException | None = None
        try:
            self._write_create(send, head, texts, waited)
        except Exception as exc:  # reported below: the flags must not stay set
            error = exc
        lost = isinstance(error, ConnectionLost)
        with self._cond:
            if error is None:
                self.creates_sent_on_release += 1
            # A lost socket: back at the head, held until the connection is replaced (as the writer
            # does). Anything else is a bug or a bad event: the create fails, the connection is renewed.
            requeued = lost and self._stopping is None
            if requeued:
                self._control.appendleft(head)
                self._paused = True
        if error is not None:
            # Only now, paused or off the lane: a writer that takes the freed slot cannot resend it.
            self._gate.abandon(head.event_id)
        self._gate.poke()  # the writer's wait on this create ends (it then waits for the flag below)
        with self._cond:
            self._busy = self._releaser_sending = False
            self._cond.notify_all()
        if error is not None:
            if not lost:
                log.error("sending a held response.create failed", exc_info=error)
            failure = error if lost else RtqueueError(f"response.create {head.event_id} not sent: {error!r}")
            if not requeued:
                self._fail(head, failure)
            self._on_send_error(failure)
        return True

    def _send_head(self, head: Outbound) -> bool:
        if not self._pop(head):
            return True
        if not head.oob and self._skip is not None and self._skip(head.event):
            self.skipped += 1
            self._mark_sent(head)  # nothing to send any more; its handle must not hang
            return True
        if head.oob:
            self._gate.register_oob(head.event_id)  # before sending: created may come fast
        try:
            self._send(json.dumps(head.event))
        except ConnectionLost as exc:
            if head.oob:
                self._gate.on_error(head.event_id, None)
            self._requeue_after_failure(head, exc)
            return True
        self._mark_sent(head)
        return True

    def _transmit_audio(self, text: str) -> bool:
        try:
            self._send(text)
        except ConnectionLost as exc:
            with self._cond:
                self.audio_dropped += 1
                self._paused = True
            self._on_send_error(exc)
            return False
        return True

    def _pop(self, item: Outbound) -> bool:
        with self._cond:
            if self._control and self._control[0] is item and not self._paused:
                self._control.popleft()
                self._busy = True  # being sent: audio appended from now on must follow it
                return True
            return False

    def _requeue_after_failure(self, item: Outbound, exc: BaseException) -> None:
        with self._cond:
            if self._stopping is None:
                self._control.appendleft(item)
                self._paused = True
                requeued = True
            else:
                requeued = False
        if not requeued:
            self._fail(item, exc)
        self._on_send_error(exc)

    def _step_prime(self, send: Callable[[str], None], text: str) -> bool:
        try:
            send(text)
        except ConnectionLost as exc:
            with self._cond:
                self._prime.clear()
                self._cond.notify_all()
            self._on_send_error(exc)
            return True
        with self._cond:
            if self._prime and self._prime[0] is text:
                self._prime.popleft()
            self._cond.notify_all()
        return True

    def _mark_sent(self, item: Outbound) -> None:
        item.handle.mark_sent()
        if self._on_sent is not None:
            self._on_sent(item)

    def _fail(self, item: Outbound, error: BaseException) -> None:
        item.handle.set_error(error)
        if self._on_unsent is not None:
            self._on_unsent(item, error)
