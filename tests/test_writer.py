"""The writer's lanes: mic audio written by the appending thread when nothing is ahead of it."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from rtqueue.errors import ConnectionLost, RtqueueError
from rtqueue.gate import ResponseGate
from rtqueue.handles import SendHandle
from rtqueue.writer import RELEASE_SEND_MAX, Outbound, Writer

UNIT = 5.0


class Wire:
    """A fake socket: records (thread name, event type, tag) per send; can hold one event type."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, Any]] = []
        self.cond = threading.Condition()
        self.hold_type: str | None = None
        self.holding = threading.Event()
        self.release = threading.Event()
        self.fail = False
        self.syscall = False  # release the GIL in send(), as a real socket write does
        self.backed = False  # what backed_up() says (a real transport: the kernel's send backlog)
        self.explode = False  # raise a bug-like error (not ConnectionLost) from the next send(), once

    def send(self, text: str) -> None:
        if self.syscall:
            time.sleep(0.0002)
        event = json.loads(text)
        if self.fail:
            raise ConnectionLost("wire cut")
        if self.explode:
            self.explode = False
            raise RuntimeError("a recorder's disk is full")
        if event["type"] == self.hold_type:
            self.holding.set()
            assert self.release.wait(UNIT)
        with self.cond:
            self.sent.append((threading.current_thread().name, event["type"], event.get("tag")))
            self.cond.notify_all()

    def wait_count(self, n: int) -> list[tuple[str, str, Any]]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.sent) >= n, UNIT), self.sent
            return list(self.sent)


def _audio(tag: int) -> str:
    return json.dumps({"type": "input_audio_buffer.append", "event_id": f"a{tag}", "audio": "AAAA", "tag": tag})


def _control(kind: str, tag: str, **extra: Any) -> Outbound:
    event = {"type": kind, "event_id": f"evt_{tag}", "tag": tag}
    return Outbound(event=event, handle=SendHandle(event["event_id"]), **extra)


Rig = tuple[Writer, Wire, list[BaseException]]
_GATES: dict[int, ResponseGate] = {}


@pytest.fixture
def rig() -> Iterator[Rig]:
    wire = Wire()
    errors: list[BaseException] = []
    gate = ResponseGate()
    writer = Writer(gate, wire.send, on_send_error=errors.append, name="rtqueue-writer-test",
                    backed_up=lambda: wire.backed)
    writer.start()
    _GATES[id(writer)] = gate
    yield writer, wire, errors
    del _GATES[id(writer)]
    wire.release.set()
    writer.stop(timeout=UNIT)
    assert not writer.thread.is_alive()


def test_idle_writer_lets_the_appending_thread_send(rig: Rig) -> None:
    writer, wire, _ = rig
    assert writer.append_audio(_audio(1))
    # Sent before append_audio returned, on this thread: no writer wake-up.
    assert wire.sent == [(threading.current_thread().name, "input_audio_buffer.append", 1)]
    assert writer.audio_sent == 1 and writer.audio_direct == 1


def test_audio_never_passes_a_control_event_in_flight(rig: Rig) -> None:
    writer, wire, _ = rig
    wire.hold_type = "input_audio_buffer.commit"
    writer.enqueue(_control("input_audio_buffer.commit", "c"))
    assert wire.holding.wait(UNIT)  # the writer is inside send() with the commit
    for tag in range(3):
        assert writer.append_audio(_audio(tag))  # must queue behind it
    assert wire.sent == []
    wire.release.set()
    sent = wire.wait_count(4)
    assert [(t, tag) for _, t, tag in sent] == [
        ("input_audio_buffer.commit", "c"),
        ("input_audio_buffer.append", 0), ("input_audio_buffer.append", 1), ("input_audio_buffer.append", 2),
    ]
    assert all(name == "rtqueue-writer-test" for name, _, _ in sent)
    # Once the lane is empty again, audio goes direct once more.
    assert writer.append_audio(_audio(9))
    assert wire.wait_count(5)[-1] == (threading.current_thread().name, "input_audio_buffer.append", 9)
    assert writer.audio_sent == 4 and writer.audio_direct == 1


def test_audio_appended_after_a_queued_event_follows_it(rig: Rig) -> None:
    writer, wire, _ = rig
    writer.pause(UNIT)  # nothing leaves: the commit stays queued
    writer.enqueue(_control("input_audio_buffer.commit", "c"))
    writer.resume(drop_audio=False)
    assert writer.append_audio(_audio(1))
    sent = wire.wait_count(2)
    assert [tag for _, _, tag in sent] == ["c", 1]


def test_audio_goes_direct_while_a_create_waits_on_the_gate(
    rig: Rig,
) -> None:
    writer, wire, _ = rig
    gate = _GATES[id(writer)]
    gate.on_created("resp_other", None)  # another response is active: the create waits on the gate
    create = _control("response.create", "r", gated=True)
    writer.enqueue(create)
    deadline = threading.Event()
    while create.first_wait is None and not deadline.wait(0.001):
        pass
    assert writer.append_audio(_audio(1))
    assert wire.sent[-1] == (threading.current_thread().name, "input_audio_buffer.append", 1)
    assert writer.audio_sent_while_held == 1
    gate.on_done("resp_other")
    assert [tag for _, _, tag in wire.wait_count(2)] == [1, "r"]


def test_a_failed_direct_write_is_counted_and_reported(rig: Rig) -> None:
    writer, wire, errors = rig
    wire.fail = True
    assert writer.append_audio(_audio(1))
    assert writer.audio_sent == 0 and writer.audio_dropped == 1
    assert len(errors) == 1 and isinstance(errors[0], ConnectionLost)
    # The writer is paused until the session resumes it: later audio waits on the lane.
    wire.fail = False
    assert writer.append_audio(_audio(2))
    assert wire.sent == [] and writer.audio_queued() == 1
    writer.resume(drop_audio=False)
    assert [tag for _, _, tag in wire.wait_count(1)] == [2]


def test_direct_audio_can_be_turned_off(rig: Rig) -> None:
    writer, wire, _ = rig
    writer.direct_audio = False
    assert writer.append_audio(_audio(1))
    assert wire.wait_count(1) == [("rtqueue-writer-test", "input_audio_buffer.append", 1)]
    assert writer.audio_direct == 0


def test_many_appending_threads_lose_and_duplicate_nothing(
    rig: Rig,
) -> None:
    """Four threads append while control events flow: every chunk sent once, each thread's in order."""
    writer, wire, _ = rig
    per_thread = 200

    def feed(k: int) -> None:
        for i in range(per_thread):
            assert writer.append_audio(_audio(k * 1000 + i))

    threads = [threading.Thread(target=feed, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for i in range(50):
        writer.enqueue(_control("session.update", f"u{i}"))
    for t in threads:
        t.join(UNIT)
    sent = wire.wait_count(4 * per_thread + 50)
    audio = [tag for _, kind, tag in sent if kind == "input_audio_buffer.append"]
    assert sorted(audio) == sorted(k * 1000 + i for k in range(4) for i in range(per_thread))
    for k in range(4):
        mine = [tag for tag in audio if tag // 1000 == k]
        assert mine == sorted(mine)
    assert [tag for _, kind, tag in sent if kind == "session.update"] == [f"u{i}" for i in range(50)]
    assert writer.audio_sent == 4 * per_thread and writer.audio_dropped == 0


def test_pause_waits_for_a_direct_write_in_flight(rig: Rig) -> None:
    """pause() promises the socket to its caller alone: an appending thread inside send() must finish first."""
    writer, wire, _ = rig
    wire.hold_type = "input_audio_buffer.append"
    feeder = threading.Thread(target=writer.append_audio, args=(_audio(1),), name="feeder")
    feeder.start()
    assert wire.holding.wait(UNIT)  # the feeder is inside send()
    assert writer.pause(0.05) is False  # parked writer, but the socket is not free yet
    wire.release.set()
    feeder.join(UNIT)
    assert writer.pause(UNIT) is True
    assert wire.sent == [("feeder", "input_audio_buffer.append", 1)] and writer.audio_direct == 1
    assert writer.append_audio(_audio(2))  # paused: it queues
    assert writer.audio_queued() == 1 and len(wire.sent) == 1


def test_direct_writes_do_not_wake_the_idle_writer(rig: Rig) -> None:
    """The point of direct writes: 200 chunks from an idle session wake the writer thread not once."""
    writer, wire, _ = rig
    wire.syscall = True  # other threads get the GIL during each write, as with a socket
    before = writer.wakeups
    for tag in range(200):
        assert writer.append_audio(_audio(tag))
    assert writer.audio_direct == 200 and len(wire.sent) == 200
    writer.enqueue(_control("session.update", "u"))  # one control event: one wake-up
    wire.wait_count(201)
    assert writer.wakeups - before <= 3


# -- the held create sent by the thread that read its release (Writer.send_held_create) -----------


def _parked(gate: ResponseGate) -> None:
    """Until the writer waits in the gate."""
    tick = threading.Event()
    for _ in range(int(UNIT * 1000)):
        if gate.waiting_writers():
            return
        tick.wait(0.001)
    raise AssertionError("the writer never waited on the gate")


@pytest.fixture
def no_forced_switch() -> Iterator[None]:
    """The test thread keeps the GIL from a release to its send_held_create() (as the reader does, in
    microseconds): otherwise the writer, woken by the release, could win the race now and then."""
    import sys

    before = sys.getswitchinterval()
    sys.setswitchinterval(100.0)
    yield
    sys.setswitchinterval(before)


def _held(rig: Rig, *extra: Outbound, holder: str | None = None) -> tuple[Writer, Wire, ResponseGate, Outbound]:
    writer, wire, _ = rig
    gate = _GATES[id(writer)]
    writer.slice_s = 60.0  # a writer that waited out its slice on a create already sent would time the test out
    gate.on_created("resp_other", None)  # another response is active: the create waits on the gate
    create = _control("response.create", "r", gated=True, holder=holder)
    writer.enqueue_many([create, *extra])
    _parked(gate)
    return writer, wire, gate, create


def test_the_releasing_thread_sends_the_held_create_and_the_writer_goes_on(rig: Rig, no_forced_switch: None) -> None:
    writer, wire, gate, create = _held(rig, _control("session.update", "u"))
    assert writer.send_held_create() is False  # the gate is not free yet
    gate.on_done("resp_other")
    assert writer.send_held_create() is True
    me = threading.current_thread().name
    assert wire.sent == [(me, "response.create", "r")]  # sent here, before this call returned
    assert create.handle.sent() and writer.creates_sent_on_release == 1
    assert [(e.state, e.event_id) for e in gate.entries()] == [("pending", "evt_r")]  # the slot is taken
    # The writer sends what follows at once (it does not wait out its 60 s slice on the create).
    assert wire.wait_count(2)[1] == ("rtqueue-writer-test", "session.update", "u")
    assert len(wire.sent) == 2 and writer.send_held_create() is False  # nothing is held any more


def test_the_held_create_keeps_its_prelude_and_the_audio_order(rig: Rig, no_forced_switch: None) -> None:
    writer, wire, gate, create = _held(rig)
    create.prelude = ({"type": "conversation.item.create", "event_id": "evt_item", "tag": "item"},)
    gate.on_done("resp_other")
    assert writer.send_held_create() is True
    assert [tag for _, _, tag in wire.sent] == ["item", "r"]  # the turn's item right before its create
    assert writer.append_audio(_audio(1))  # after it, as ever
    assert [tag for _, _, tag in wire.wait_count(3)] == ["item", "r", 1]


def test_a_create_that_continues_a_tool_chain_is_left_to_the_writer(rig: Rig, no_forced_switch: None) -> None:
    writer, wire, gate, _ = _held(rig, holder="resp_tool")
    gate.on_done("resp_other")
    assert writer.send_held_create() is False  # the hold is the writer's to take over
    assert wire.wait_count(1) == [("rtqueue-writer-test", "response.create", "r")]
    assert writer.creates_sent_on_release == 0


def test_nothing_held_nothing_sent(rig: Rig) -> None:
    writer, wire, _ = rig
    assert writer.send_held_create() is False
    writer.enqueue(_control("session.update", "u"))
    wire.wait_count(1)
    assert writer.send_held_create() is False and writer.creates_sent_on_release == 0


def test_a_failed_send_puts_the_create_back_at_the_head(rig: Rig, no_forced_switch: None) -> None:
    writer, wire, gate, create = _held(rig, _control("session.update", "u"))
    errors = rig[2]
    gate.on_done("resp_other")
    wire.fail = True
    assert writer.send_held_create() is True  # handled: reported, not lost
    assert [type(e) for e in errors] == [ConnectionLost]
    assert [o.event["tag"] for o in writer.pending()] == ["r", "u"]  # in order, for the new socket
    assert gate.entries() == []  # the slot is free again
    assert not create.handle.sent() and create.handle.error is None  # the create waits for the new socket
    assert wire.sent == [] and writer.creates_sent_on_release == 0
    wire.fail = False
    writer.resume(drop_audio=False)  # the new socket
    writer.enqueue(_control("session.update", "m"))
    # Sent once, in order: a create sent twice would stand before the marker.
    assert [tag for _, _, tag in wire.wait_count(3)] == ["r", "u", "m"]
    assert gate.entries()[0].event_id == "evt_r" and len(wire.sent) == 3


def test_an_unexpected_error_fails_the_create_and_frees_the_writer(rig: Rig, no_forced_switch: None) -> None:
    writer, wire, gate, create = _held(rig, _control("session.update", "u"))
    gate.on_done("resp_other")
    wire.explode = True
    assert writer.send_held_create() is True
    assert isinstance(create.handle.error, RtqueueError) and "evt_r" in str(create.handle.error)
    assert [type(e) for e in rig[2]] == [RtqueueError]  # reported: the session renews its connection
    assert gate.entries() == []
    # The writer is not left waiting on a flag: what follows goes out.
    assert wire.wait_count(1) == [("rtqueue-writer-test", "session.update", "u")]


def test_a_backed_up_socket_gets_audio_from_the_writer_only(rig: Rig, no_forced_switch: None) -> None:
    """The appending thread (maybe a Twilio bridge's I/O thread) never writes to a socket that backs up."""
    writer, wire, _ = rig
    wire.backed = True
    assert writer.append_audio(_audio(1)) and writer.append_audio(_audio(2))
    assert [(who, tag) for who, _, tag in wire.wait_count(2)] == [("rtqueue-writer-test", 1),
                                                                  ("rtqueue-writer-test", 2)]
    # Counted once: the second chunk queued behind the first anyway.
    assert writer.audio_direct == 0 and writer.audio_backed_up == 1
    wire.backed = False
    assert writer.append_audio(_audio(3))
    assert wire.wait_count(3)[2] == (threading.current_thread().name, "input_audio_buffer.append", 3)


def test_the_releasing_thread_leaves_a_backed_up_socket_to_the_writer(rig: Rig, no_forced_switch: None) -> None:
    writer, wire, gate, _ = _held(rig)
    wire.backed = True
    gate.on_done("resp_other")
    assert writer.send_held_create() is False  # its send could block: not on the reader
    assert wire.wait_count(1) == [("rtqueue-writer-test", "response.create", "r")]


def test_a_create_too_big_to_be_sure_of_the_socket_is_left_to_the_writer(rig: Rig, no_forced_switch: None) -> None:
    writer, wire, gate, create = _held(rig)
    create.event["instructions"] = "x" * RELEASE_SEND_MAX
    gate.on_done("resp_other")
    assert writer.send_held_create() is False
    assert wire.wait_count(1) == [("rtqueue-writer-test", "response.create", "r")]
