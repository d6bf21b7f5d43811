"""The threaded shell around one session's conversation core.

:class:`SessionShell` owns the threads and applies what the
:class:`~rtqueue.core.ConversationCore` decides. Nothing here decides protocol
questions; it moves events between the socket, the gate, the core, the
writer, the tool worker, the audio devices and the app's callbacks.

Threads (all named ``rtqueue-*``, all ended by :meth:`SessionShell.close`):

- ``rtqueue-reader-N``: the only thread that reads (and finally closes) the
  socket. Per frame: parse, tell the gate *first* (so a waiting writer wakes
  at once; after a release it waits, at most 2 ms, for that writer to
  reserve: ``ResponseGate.handoff``), then the core (under the mutex), then
  audio and subscribers. It never runs app code.
- ``rtqueue-writer-N``: the only sender of control events, the reconnect's
  replay included; mic audio with nothing queued ahead of it is written by
  the appending thread itself (see :mod:`rtqueue.writer`).
- ``rtqueue-dispatch-N``: runs app callbacks (see :mod:`rtqueue.dispatch`).
- ``rtqueue-turns-N`` and the ``rtqueue-tool`` pool: tools and handoff
  rendering (see :mod:`rtqueue.turns`), started on first use.
- ``rtqueue-reconnect-N`` while reconnecting; audio threads when audio is on.

**Lock order** (the one place it is written down), outermost first:

1. the audio link's lock (:class:`~rtqueue.audio_session.AudioLink`: one
   barge-in at a time) and the reconnector's lock (it resumes the writer
   atomically with its stop check); neither is held by anyone who takes the
   other;
2. the session mutex (an ``RLock``; guards the core);
3. the writer's lock;
4. the gate's lock;
5. leaves, never held while taking another: a handle's or a waiter's
   condition, an event stream's, the dispatcher's, ``_changed`` (the replies
   condition) and the tool runner's batch conditions.

Nothing blocks under the mutex: the actions that put events on the wire are
applied under it, so the wire order is the core's order; settling futures,
publishing and starting tools happen after it is released. User code and
tools never run under any lock, nor on the reader. A few counters (the
config version) are read without the mutex: single reads of an int.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import itertools
import json
import logging
import threading
import time
import weakref
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from . import protocol
from .agents import Agent, AgentGraph, resolve_agents, session_config_for
from .approvals import ApprovalBroker
from .core import (
    Action,
    ConversationCore,
    Fail,
    Publish,
    ReleaseHold,
    Resolve,
    Retried,
    RunTools,
    Send,
    SetFollowup,
    Started,
    ToolJob,
    deep_merge,
    response_ids,
)
from .dispatch import Dispatcher
from .errors import (
    AuthenticationError,
    ConnectError,
    ConnectionLost,
    InvalidArgument,
    ProtocolError,
    ResponseError,
    ResponseTimeout,
    RtqueueError,
    ServerError,
    SessionClosed,
)
from .formats import AudioFormat
from .gate import ResponseGate
from .guard_runner import GuardrailMonitor, run_guard
from .guardrails import (
    GuardrailContext,
    GuardrailResult,
    InputGuardrail,
    OutputGuardrail,
    correction_note,
)
from .handles import ResponseHandle, SendHandle, Waiter
from .history import History, reseed_plan
from .reconnect import AUTH_CLOSE_CODES, REQUEST_CLOSE_CODES, Reconnector, fatal_loss
from .recycle import Activity, SessionClock, Summary, apply_summary, session_clock
from .routing import GateRouter
from .secrets import Secret, redact
from .telemetry import Telemetry
from .transport import Transport
from .turns import ToolWorker
from .usage import USAGE_EVENTS, UsageMeter
from .values import Event, Response
from .writer import Outbound, Writer

if TYPE_CHECKING:
    from .audio import PlaybackCut
    from .audio_session import AudioLink
    from .recording import Recorder
    from .recycler import Recycler

__all__ = ["SessionShell"]

log = logging.getLogger("rtqueue")

# After a release, the reader waits at most this long for a writer waiting in the gate to reserve
# (ResponseGate.handoff): the writer's create goes out before the reader wakes anyone else.
_HANDOFF_S = 0.002

_ids = itertools.count(1)

_RECENT_ERRORS = 256  # error replies by client event id (reconnect's update waiter)
HISTORY_ITEMS = 500  # conversation items kept for items and re-seeding (max_reseed_items)

#: Streaming events: they only add to a response's text or audio (no gate, no actions).
_STREAMING = frozenset({"response.output_audio.delta", "response.output_text.delta",
                        "response.output_audio_transcript.delta"})


class SessionShell:
    """Threads, the mutex and the socket around one :class:`~rtqueue.core.ConversationCore`.

    The public :class:`~rtqueue.session.Session` is a facade over it; the
    audio link and the reconnector talk to it through their host protocols
    (:class:`~rtqueue.audio_session.AudioHost`,
    :class:`~rtqueue.reconnect.ReconnectHost`).
    """

    def __init__(
        self,
        transport_factory: Callable[[], Transport],
        *,
        create_timeout: float = 120.0,
        response_timeout: float = 300.0,
        max_conflict_retries: int = 20,
        gate_slice_s: float = 1.0,
        tool_timeout: float = 30.0,
        context: Any = None,
        secret: Secret | None = None,
        label: str | None = None,
    ) -> None:
        self.n = next(_ids)
        self.label = label or f"session-{self.n}"
        self.telemetry = Telemetry()
        self.name = str(self.n)
        self.secret = secret
        self.context = context
        self._factory = transport_factory
        self._transport: Transport | None = None
        self._generation = 0
        self._response_timeout = response_timeout
        self._tool_timeout = tool_timeout
        self.gate = ResponseGate(max_retries=max_conflict_retries)
        self._mutex = threading.RLock()  # guards self.core (see the lock order above)
        self.core = ConversationCore(handle_factory=self._make_handle, create_timeout=create_timeout,
                                     history=History(HISTORY_ITEMS))
        self._changed = threading.Condition()  # config versions and error replies arrived
        self._errors: OrderedDict[str, ServerError] = OrderedDict()
        self._closing = False
        self._closed = threading.Event()
        self._dead: BaseException | None = None
        self._reader: threading.Thread | None = None
        self.dispatcher = Dispatcher(f"rtqueue-dispatch-{self.n}")
        self.dispatcher.on_callback_error = self._on_callback_error
        self.writer = Writer(
            self.gate,
            self._send_text,
            on_send_error=self._on_send_error,
            on_unsent=self._on_unsent,
            on_evict=self._evict_stale,
            skip=self._moot,
            send_gated=self._send_create,
            backed_up=self._backed_up,
            slice_s=gate_slice_s,
            name=f"rtqueue-writer-{self.n}",
            # A stale response is one past response_timeout (300 s by default): looking for one every
            # tenth of that, at most every 5 s, is precise enough, and idle writers stay asleep.
            idle_check_s=min(5.0, max(0.05, response_timeout / 10.0)),
        )
        self.tools: ToolWorker | None = None
        self.approvals = ApprovalBroker(handler=None, timeout=60.0, default="reject", publish=self.publish)
        self.output_guards: tuple[OutputGuardrail, ...] = ()  # session-wide (agents add their own)
        self.input_guards: tuple[InputGuardrail, ...] = ()
        # Input guardrails on speech, before any response: VAD's create_response is off and rtqueue
        # creates each turn's response once its transcript passed (see Session.connect).
        self.guard_speech = False
        self.guards: GuardrailMonitor | None = None  # made by refresh_guards when any guardrail exists
        self.audio: AudioLink | None = None
        self.reconnector: Reconnector | None = None
        self.recycler: Recycler | None = None  # renews the session before the server's cap
        self._session_clock: SessionClock | None = None  # the current socket's session.created
        self.recycle_audio_kept = 0  # mic chunks queued during a recycle and sent on the new socket
        self._evict_check = 0.0
        self._issued: weakref.WeakSet[SendHandle] = weakref.WeakSet()
        self.usage = UsageMeter()  # token usage and rate limits; read and fed under the mutex
        self.issued_count = 0
        self._fatal_error: ServerError | None = None
        self._last_error: ServerError | None = None  # a refusing close (3000/4000) carries its text
        self._started = False
        self.frame_at = 0.0  # monotonic time the reader read its current frame
        self._router = GateRouter(self.gate)  # the gate's side of each server event (rtqueue.routing)
        self.recorder: Recorder | None = None  # every frame both ways, when recording
        self.own_recorder = False  # close it with the session (it was made from a path)

    # -- handles ------------------------------------------------------------------------

    def _dispatch(self, fn: Callable[..., Any], handle: Any) -> None:
        self.dispatcher.call(fn, handle)

    def _make_handle(self, event: dict[str, Any], in_band: bool) -> ResponseHandle:
        return ResponseHandle(event, in_band=in_band, dispatch=self._dispatch, canceller=self.cancel_handle)

    def new_response_handle(self) -> ResponseHandle:
        """A handle for a create the app asks for (its event is filled in by the core)."""
        return self._make_handle({}, True)

    def new_send_handle(self, event: dict[str, Any]) -> SendHandle:
        """A handle for any other client event."""
        return SendHandle(event, dispatch=self._dispatch)

    # -- applying the core's actions ---------------------------------------------------------

    def run(self, step: Callable[[ConversationCore], list[Action]]) -> list[SendHandle]:
        """Run ``step(core)`` under the mutex and apply its actions; return the handles of its sends.

        Sends are queued on the writer before the mutex is released, so the
        wire order is the core's; everything else is applied after it.
        """
        with self._mutex:
            actions = step(self.core)
            if not actions:  # most server events change state and ask for nothing
                return []
            handles, rest = self._queue_sends(actions)
        self._apply(rest)
        return handles

    def _queue_sends(self, actions: list[Action]) -> tuple[list[SendHandle], list[Action]]:
        # Caller holds the mutex. Consecutive urgent sends go to the head together, in order.
        handles: list[SendHandle] = []
        rest: list[Action] = []
        group: list[Outbound] = []
        front = False
        for action in actions:
            if not isinstance(action, Send):
                rest.append(action)
                continue
            handle = action.handle if action.handle is not None else self.new_send_handle(action.event)
            if isinstance(handle, ResponseHandle) and not handle.event:
                handle.event = action.event
            handles.append(handle)
            self._issue(handle)
            item = Outbound(action.event, handle, gated=action.gated, oob=action.oob, deadline=action.deadline,
                            prelude=action.prelude, untagged=action.untagged, holder=action.holder)
            if group and front != action.front:
                self.writer.enqueue_many(group, front=front)
                group = []
            front = action.front
            group.append(item)
        if group:
            self.writer.enqueue_many(group, front=front)
        return handles, rest

    def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Resolve):
                action.future.set_result(action.value)
            elif isinstance(action, Fail):
                action.future.set_error(action.error)
            elif isinstance(action, Started):
                action.handle.set_started(action.response_id, action.agent)
            elif isinstance(action, Retried):
                log.info("server raced create %s; retrying", action.handle.event_id)
                action.handle.note_retry()
            elif isinstance(action, SetFollowup):
                if action.expect:
                    action.handle.expect_followup()
                else:
                    action.handle.set_followup(action.followup)
            elif isinstance(action, RunTools):
                with self._mutex:  # close() reads self.tools once: no worker may start after it
                    worker = None if self._closing else self._tool_worker()
                if worker is not None:
                    worker.submit(action.job)
            elif isinstance(action, ReleaseHold):
                self.gate.release_hold(action.response_id)
            elif isinstance(action, Publish):
                if action.type == "agent.handoff":
                    self.telemetry.handoff(action.data.get("source"), action.data.get("target"))
                self.publish(Event(action.type, action.data))

    def _issue(self, handle: SendHandle) -> None:
        if handle not in self._issued:  # a retried create comes back through here
            self._issued.add(handle)
            self.issued_count += 1

    def publish(self, event: Event) -> None:
        """Deliver ``event`` to subscribers (never blocks)."""
        self.dispatcher.publish(event)

    @contextlib.contextmanager
    def locked(self) -> Iterator[ConversationCore]:
        """The core under the mutex, for reading its state (never block inside)."""
        with self._mutex:
            yield self.core

    # -- agents ------------------------------------------------------------------------------

    def use_agents(self, graph: AgentGraph, start: Agent, config: dict[str, Any]) -> dict[str, Any]:
        """Begin with ``start``: its rendered config (user code, called here) merged into ``config``."""
        merged = deep_merge(config, session_config_for(start, graph, self.context))
        out = (config.get("audio") or {}).get("output") or {}
        if start.voice and "voice" not in out:
            merged = deep_merge(merged, {"audio": {"output": {"voice": start.voice}}})
        with self._mutex:
            self.core.start_agents(graph, start)
        return merged

    def resolve_target(self, agent: Agent | str) -> tuple[Agent, AgentGraph]:
        """The handoff target and the graph it is in (a new Agent object joins the graph)."""
        with self._mutex:
            graph = self.core.graph
        if isinstance(agent, str):
            found = graph.get(agent) if graph is not None else None
            if found is None or graph is None:
                raise InvalidArgument(f"unknown agent {agent!r}")
            return found, graph
        if graph is not None and graph.get(agent.name) == agent:
            return agent, graph
        known = tuple(a for a in graph.values() if a.name != agent.name) if graph is not None else ()
        shared = graph.shared_mcp if graph is not None else ()
        new_graph = resolve_agents(agent, known, shared_mcp=shared)  # calls handoff target callables: user code
        with self._mutex:
            self.core.set_graph(new_graph)
        return agent, new_graph

    # -- starting ---------------------------------------------------------------------------

    def start(self, config: dict[str, Any], timeout: float) -> None:
        """Open the socket, start the threads, wait for ``session.created``, send ``config``."""
        self._started = True
        self.telemetry.session_started(self.label)
        if self.recorder is not None:
            # One sender while recording: a recording's client lines then keep the wire's order.
            self.writer.direct_audio = False
            agent = self.core.agent
            self.recorder.start({**config, "agent": agent.name} if agent is not None else config)
        self._transport = self._factory()
        self._generation += 1
        self.dispatcher.start()
        self.writer.start()
        self._start_reader(self._transport)  # last, as websockets does: the state is ready
        self._await_created(timeout)
        if len(config) > 1:
            self.apply_config(config, timeout)
        if self.audio is not None:
            # Only now: the server has our audio format, so the first mic chunk is read in it.
            self.audio.start()

    def _start_reader(self, transport: Transport) -> threading.Thread:
        self._reader = threading.Thread(
            target=self._read_loop, args=(transport,), name=f"rtqueue-reader-{self.n}", daemon=True
        )
        self._reader.start()
        return self._reader

    def _await_created(self, timeout: float) -> None:
        ok = self.wait_change(lambda: self.core.config_version > 0 or self._dead is not None, timeout)
        dead = self._dead
        if isinstance(dead, AuthenticationError):
            raise AuthenticationError(str(dead)) from None
        if dead is not None:
            raise ConnectError(f"connection failed before session.created: {dead}") from dead
        if not ok:
            raise ConnectError(f"no session.created within {timeout}s")

    def apply_config(self, config: dict[str, Any], timeout: float | None) -> dict[str, Any]:
        """Send a ``session.update`` and wait for its ``session.updated`` (or raise its error)."""
        waiter: Waiter[dict[str, Any]] = Waiter("session.updated")
        self.run(lambda core: core.update(config, None, waiter))
        try:
            return waiter.get(timeout)
        except ResponseTimeout:
            raise ResponseTimeout(f"no session.updated within {timeout}s") from None

    # -- the reader ------------------------------------------------------------------------------

    def _read_loop(self, transport: Transport) -> None:
        error: BaseException | None = None
        try:
            while True:
                try:
                    frame = transport.recv()
                except ConnectionLost as exc:
                    error = exc
                    break
                self.frame_at = time.monotonic()  # when the frame being handled was read (barge-in latency)
                if self.recorder is not None and frame is not None:
                    self._record_in(frame)
                if frame is None:
                    code = transport.close_code
                    reason = transport.close_reason
                    detail = f"code {code}: {reason}" if reason else f"code {code}"
                    error = ConnectionLost(f"server closed the connection ({detail})")
                    break
                try:
                    event = protocol.parse_frame(frame)
                except ProtocolError as exc:
                    log.warning("%s", exc)
                    self.publish(Event("rtqueue.error", {"error": exc, "message": str(exc)}))
                    continue
                try:
                    self.route(event)
                except Exception as exc:  # never let one odd event kill the reader
                    log.exception("error handling %s", event.get("type"))
                    message = f"handling {event.get('type')}: {exc!r}"
                    self.publish(Event("rtqueue.error", {"error": exc, "message": message}))
        finally:
            transport.shutdown()  # the reader alone closes the socket
            if transport is self._transport:
                self._on_connection_lost(error or ConnectionLost("connection ended"), transport)

    def route(self, event: dict[str, Any]) -> None:
        """Handle one parsed server event: gate first, then the core, then audio and subscribers."""
        typ = event["type"]
        if typ in _STREAMING:  # the bulk of the traffic: no gate, no actions
            with self._mutex:
                self.core.stream(event)
                guards = self.guards
                if guards is not None and typ != "response.output_audio.delta":
                    rid = event.get("response_id")
                    rec = self.core.response(rid) if isinstance(rid, str) else None
                    size = rec.size if rec is not None and self.core.is_guarded(rec.id) else -1
            if guards is not None and typ != "response.output_audio.delta" and size >= 0:
                guards.offer_output(event["response_id"], size)
        else:
            self._route_control(typ, event)
            if self.guards is not None:
                self._offer_guards(typ, event)
        if self.audio is not None:
            self.audio.on_event(event)
        if self.dispatcher.wants(typ):
            self.publish(Event(typ, event))

    def _route_control(self, typ: str, event: dict[str, Any]) -> None:
        routed = self._router.route(event, self.core, self._mutex)
        # After a release, the create the writer holds goes out at once from this thread, which has
        # the GIL (Writer.send_held_create); failing that, the writer gets the slot before this
        # frame's other work (handoff); failing that, a thread woken by the release gets the GIL.
        if routed.released and not self.writer.send_held_create() and not self.gate.handoff(_HANDOFF_S):
            time.sleep(0)
        if routed.error is not None:
            self._note_error(routed.error)
        verdict, matched = routed.verdict, routed.matched
        if typ in USAGE_EVENTS:
            self.run(lambda core: self._receive_metered(core, event, verdict, matched))
        else:
            self.run(lambda core: core.receive(event, verdict=verdict, matched=matched))
        if self.telemetry.enabled and typ in ("response.created", "response.done"):
            self._trace_response(typ, event)
        if typ == "session.created":  # read by the recycling thread: one reference, swapped whole
            self._session_clock = session_clock(event, generation=self._generation, now=time.monotonic(),
                                                wall=time.time())
        if typ in ("session.created", "session.updated"):
            with self._changed:
                self._changed.notify_all()

    def _offer_guards(self, typ: str, event: dict[str, Any]) -> None:
        assert self.guards is not None
        if typ == "response.done":
            _resp, rid, _eid = response_ids(event)
            if rid is not None:
                with self._mutex:
                    guarded = self.core.is_guarded(rid)
                if guarded:
                    self.guards.offer_output(rid, 0, final=True)
        elif typ == "conversation.item.input_audio_transcription.completed":
            iid, text = event.get("item_id"), event.get("transcript")
            # Holding VAD's responses, every transcript needs a verdict (an empty one passes).
            if isinstance(iid, str) and isinstance(text, str) and (text.strip() or self.guard_speech):
                self.guards.offer_input(iid, text)

    # -- guardrails (GuardHost) -------------------------------------------------------------------

    def refresh_guards(self) -> None:
        """Start guarding once any guardrail exists (session-wide or on an agent of the graph)."""
        with self._mutex:
            graph = self.core.graph
            agents = list(graph.values()) if graph is not None else []
            outputs = [*self.output_guards, *(g for a in agents for g in a.output_guardrails)]
            inputs = [*self.input_guards, *(g for a in agents for g in a.input_guardrails)]
            if not outputs and not inputs:
                return
            self.core.guard_outputs = bool(outputs)
            if self.guards is None:
                self.guards = GuardrailMonitor(self, f"rtqueue-guard-{self.n}")
            self.guards.min_every = min((g.every_chars for g in outputs), default=1)

    def guard_text(self, response_id: str) -> tuple[str, str | None, bool] | None:
        """GuardHost: the response's text so far, its agent, and whether it is done."""
        with self._mutex:
            rec = self.core.response(response_id)
            if rec is not None:
                return "".join(rec.parts), rec.agent, False
            done = self.core.recent(response_id)
        if done is None:
            return None
        return done.text, done.agent, True

    def output_guards_for(self, agent: str | None) -> tuple[OutputGuardrail, ...]:
        """Session-wide output guardrails plus ``agent``'s."""
        with self._mutex:
            graph = self.core.graph
        own = graph[agent].output_guardrails if graph is not None and agent is not None and agent in graph else ()
        return (*self.output_guards, *own)

    def input_guards_now(self) -> tuple[tuple[InputGuardrail, ...], str | None]:
        """Session-wide input guardrails plus the current agent's, and its name."""
        with self._mutex:
            agent = self.core.agent
        own = agent.input_guardrails if agent is not None else ()
        return (*self.input_guards, *own), (agent.name if agent is not None else None)

    def guard_context(self) -> Any:
        """GuardHost: the app's context object."""
        return self.context

    def output_tripped(self, response_id: str, guard: OutputGuardrail, result: GuardrailResult, text: str) -> None:
        """GuardHost: stop playback of the response, then let the core cut it off and correct it."""
        cut = self.audio.cut_response(response_id) if self.audio is not None else None
        note = correction_note(guard.name, result)
        now = time.monotonic()
        self.run(lambda core: core.guardrail_tripped(response_id, guardrail=guard.name, note=note,
                                                     info=result.info, text=text, truncate=cut, now=now))

    def output_passed(self, response_id: str) -> None:
        """GuardHost: the finished response passed every check."""
        self.run(lambda core: core.guardrail_passed(response_id))

    def input_passed(self, item_id: str) -> None:
        """GuardHost: a transcript passed; holding VAD's responses, rtqueue makes the turn's response now."""
        if not self.guard_speech:
            return
        handle = self.new_response_handle()
        now = time.monotonic()
        with contextlib.suppress(RtqueueError):  # closed meanwhile: nothing to answer
            self.run(lambda core: core.create_response({}, handle, now=now))

    def input_tripped(self, item_id: str, guard: InputGuardrail, result: GuardrailResult, text: str) -> None:
        """GuardHost: a transcript tripped: block the response server VAD made for it (or would make)."""
        # Holding VAD's responses, none was made for this speech: whatever runs now is not its answer.
        active = None if self.guard_speech else self.gate.active_response_id()
        cut = self.audio.cut_response(active) if self.audio is not None and active is not None else None
        refusal = result.message or guard.refusal
        now = time.monotonic()
        self.run(lambda core: core.input_tripped(item_id, guardrail=guard.name, info=result.info, text=text,
                                                 refusal=refusal, active=active, truncate=cut, now=now))

    def check_input(self, text: str) -> tuple[InputGuardrail, GuardrailResult] | None:
        """Run the input guardrails on the app's text in the calling thread; the first trip, or None."""
        guards, agent = self.input_guards_now()
        if not guards:
            return None
        ctx = GuardrailContext(text=text, kind="input", agent=agent, final=True, context=self.context)
        for guard in guards:
            result = run_guard(guard, ctx, self.publish)
            if result is not None and result.tripped:
                with self._mutex:
                    self.core.guardrail_trips += 1
                self.publish(Event("guardrail.tripped", {"kind": "input", "guardrail": guard.name, "item_id": None,
                                                         "info": result.info, "text": text}))
                return guard, result
        return None

    def _trace_response(self, typ: str, event: dict[str, Any]) -> None:
        resp, rid, _eid = response_ids(event)
        if typ == "response.done":
            self.telemetry.response_done(rid, str(resp.get("status")))
            return
        with self._mutex:
            rec = self.core.response(rid)
            agent = rec.agent if rec is not None else None
            handle = rec.request.handle if rec is not None and rec.request is not None else None
        sent = handle.sent_at if handle is not None else None
        wait = sent - handle.queued_at if handle is not None and sent is not None else None
        self.telemetry.response_created(rid, agent, wait)

    def _receive_metered(self, core: ConversationCore, event: dict[str, Any], verdict: str | None,
                         matched: str | None) -> list[Action]:
        """The core's step for an event with usage, then its count (under the mutex, before any waiter wakes).

        A ``response.done`` counts for the agent that made the response: the
        :class:`Response` the core has just built says which.
        """
        actions = core.receive(event, verdict=verdict, matched=matched)
        agent: str | None = None
        if event["type"] == "response.done":
            resp = event.get("response")
            rid = resp.get("id") if isinstance(resp, dict) else None
            done = core.recent(rid) if isinstance(rid, str) else None
            agent = done.agent if done is not None else None
        elif core.agent is not None:
            agent = core.agent.name
        self.usage.observe(event, agent)
        return actions

    def _note_error(self, err: ServerError) -> None:
        eid = err.event_id
        if eid is not None:
            with self._changed:
                self._errors[eid] = err
                while len(self._errors) > _RECENT_ERRORS:
                    self._errors.popitem(last=False)
                self._changed.notify_all()
        self._last_error = err
        if err.code in protocol.FATAL_CODES:
            self._fatal_error = err
        if self.reconnector is not None:
            self.reconnector.note_server_error(err)

    # -- writer hooks ------------------------------------------------------------------------------

    def _send_text(self, text: str, note: dict[str, Any] | None = None) -> None:
        transport = self._transport
        if transport is None:
            raise ConnectionLost("not connected")
        recorder = self.recorder
        if recorder is not None:
            # Recorded before it goes: once sent, the reader may record the server's answer first,
            # and a replay ties each server frame to the client frame before it.
            recorder.write("client", json.loads(text), note=note)
        transport.send(text)

    def _backed_up(self) -> bool:
        """Whether the current socket holds a send backlog (a transport may not tell: then no)."""
        probe = getattr(self._transport, "backed_up", None)
        if probe is None:
            return False
        try:
            return bool(probe())
        except Exception:  # a custom transport's probe: it must not break the appending thread or the reader
            log.debug("transport.backed_up() raised", exc_info=True)
            return False

    def _send_create(self, text: str, waited_s: float) -> None:
        """A gated create: sent like any event; a recording also notes how long it waited in the gate."""
        self._send_text(text, {"gate_wait_ms": round(waited_s * 1000.0, 3)} if self.recorder is not None else None)

    def _record_in(self, frame: str | bytes) -> None:
        assert self.recorder is not None
        try:
            event = json.loads(frame) if isinstance(frame, str) else None
        except ValueError:
            event = None
        if isinstance(event, dict):
            self.recorder.write("server", event)
        else:
            self.recorder.write_raw("server", frame)

    def _on_send_error(self, exc: BaseException) -> None:
        # Wake the reader: it owns the socket and takes the one "lost" path.
        transport = self._transport
        if transport is not None:
            transport.abort()

    def _on_unsent(self, item: Outbound, error: BaseException) -> None:
        if isinstance(item.handle, ResponseHandle):
            self.run(lambda core: core.unsent(item.event_id, error))

    def _moot(self, event: dict[str, Any]) -> bool:
        """Writer hook: a ``response.cancel`` whose ``response.done`` was read meanwhile is not sent.

        It was queued while the response was active, but sending it now could
        only earn ``response_cancel_not_active``.
        """
        if event.get("type") != "response.cancel":
            return False
        rid = event.get("response_id")
        if not isinstance(rid, str):
            return False
        with self._mutex:  # done meanwhile, or cut off by a reconnect: the server no longer has it
            return self.core.is_finished(rid)

    def _evict_stale(self) -> None:
        """Writer hook: release a response whose ``response.done`` never came (deadline)."""
        now = time.monotonic()
        if now - self._evict_check < 0.25:
            return
        self._evict_check = now
        stale = [e for e in self.gate.entries() if now - e.since >= self._response_timeout]
        if not stale:
            return
        for entry in stale:
            rid = entry.response_id
            if rid is not None:
                self.run(functools.partial(ConversationCore.cancel_response, response_id=rid, waiter=None))
                self.gate.evict(rid)
            elif entry.event_id is not None:
                self.gate.on_error(entry.event_id, "rtqueue_evicted")
        self.run(lambda core: core.evict(now, self._response_timeout,
                                          [(e.event_id, e.response_id, e.since) for e in stale]))

    # -- tools -------------------------------------------------------------------------------------

    def _tool_worker(self) -> ToolWorker:
        if self.tools is None:
            self.tools = ToolWorker(
                name=f"rtqueue-turns-{self.n}",
                graph=self._graph,
                context=lambda: self.context,
                publish=self.publish,
                on_done=self._tools_done,
                tool_timeout=self._tool_timeout,
                observe=self._trace_tool if self.telemetry.enabled else None,
                approvals=self.approvals,
            )
        return self.tools

    def _trace_tool(self, data: dict[str, Any]) -> None:
        self.telemetry.tool_call(name=data["name"], call_id=data["call_id"], agent=data.get("agent"),
                                 response_id=data.get("response_id"), ok=bool(data["ok"]),
                                 duration_ms=float(data["duration_ms"]))

    def _graph(self) -> AgentGraph | None:
        with self._mutex:
            return self.core.graph

    def _tools_done(self, job: ToolJob, outputs: dict[str, str], config: dict[str, Any] | None,
                    error: BaseException | None) -> None:
        now = time.monotonic()
        self.run(lambda core: core.tool_results(job.response_id, outputs, handoff_config=config,
                                                handoff_error=error, now=now))

    def tools_idle(self) -> bool:
        """Whether no tool job is queued or running."""
        with self._mutex:
            core_idle = self.core.tools_idle()
        return core_idle and (self.tools is None or self.tools.idle())

    # -- cancel ------------------------------------------------------------------------------------

    def cancel_handle(self, handle: ResponseHandle, timeout: float | None) -> Response | None:
        """``ResponseHandle.cancel``: withdraw if unsent, else cancel by id and wait for its done."""
        if handle.done():
            return handle.result()
        eid = handle.event_id or ""
        if not handle.sent() and self.writer.withdraw(handle):
            err = ResponseError("cancelled by the app before it was sent")
            self.run(lambda core: core.unsent(eid, err))
            return None
        rid = handle.response_id
        if rid is None:
            self.run(lambda core: core.cancel_request(eid))  # cancelled as soon as it starts
            try:
                return handle.wait(timeout)
            except ResponseError:
                return None
        return self.cancel_response(rid, timeout)

    def cancel_response(self, response_id: str, timeout: float | None) -> Response:
        """Cancel ``response_id`` (once) and wait for its ``response.done``."""
        waiter: Waiter[Response] = Waiter(f"response.done for {response_id}")
        self.run(lambda core: core.cancel_response(response_id, waiter))
        return waiter.get(timeout)

    def cancel_active(self, timeout: float | None) -> Response | None:
        """``Session.cancel``: the active in-band response, or the pending one once it starts."""
        rid = self.gate.active_response_id()
        if rid is not None:
            return self.cancel_response(rid, timeout)
        pending = [e.event_id for e in self.gate.entries() if e.state == "pending" and e.event_id]
        if not pending:
            return None
        with self._mutex:
            req = self.core.request(pending[0])
        if req is None:
            return None
        return self.cancel_handle(req.handle, timeout)

    def wait_done(self, response_id: str, timeout: float | None) -> Response:
        """Block until ``response.done`` of ``response_id`` (AudioHost)."""
        waiter: Waiter[Response] = Waiter(f"response.done for {response_id}")
        self.run(lambda core: core.wait_response(response_id, waiter))
        return waiter.get(timeout)

    # -- AudioHost -------------------------------------------------------------------------------

    def append_audio(self, pcm: bytes) -> bool:
        """Send mic audio (already checked) through the writer: direct when nothing is ahead, else its lane."""
        # The JSON text by hand: base64 and our ids need no escaping, and json.dumps scanning the
        # 6.4 KB string of a 100 ms chunk was ~17 us of held GIL, two thirds of this call.
        text = ('{"type":"input_audio_buffer.append","event_id":"' + protocol.new_event_id()
                + '","audio":"' + base64.b64encode(pcm).decode("ascii") + '"}')
        return self.writer.append_audio(text)

    def input_format(self) -> AudioFormat:
        """The negotiated input audio format (AudioHost)."""
        # No mutex: one read of a reference the core swaps whole (on session.updated). It is read for
        # every mic chunk and every audio delta; the mutex here was a second acquisition per frame.
        return self.core.input_format

    def output_format(self) -> AudioFormat:
        """The negotiated output audio format (AudioHost)."""
        return self.core.output_format

    def frame_time(self) -> float:
        """Monotonic time the reader read the frame it is handling (AudioHost)."""
        return self.frame_at

    def generation(self) -> int:
        """Bumped each time a new socket is adopted."""
        return self._generation

    def server_interrupts(self) -> bool:
        """Whether the server cancels the active response itself on speech start."""
        with self._mutex:
            return self.core.server_interrupts()

    def barge_in(
        self, cut: PlaybackCut | None, *, cancel: bool, server_cancels: bool, truncatable: bool
    ) -> tuple[str | None, bool, bool, int | None, list[SendHandle]]:
        """Cancel and truncate as the core decides (AudioHost)."""
        from .audio_session import truncate_ms

        ms = truncate_ms(cut)
        truncate = (cut.item_id, ms) if cut is not None and ms is not None and truncatable else None
        out: list[Any] = []

        def step(core: ConversationCore) -> list[Action]:
            rid = self.gate.active_response_id()
            actions, sent, ending = core.barge_in(rid, cancel=cancel, server_cancels=server_cancels,
                                                  truncate=truncate)
            truncated = truncate[1] if truncate is not None and truncate[0] in core.history else None
            out.extend([rid, sent, ending, truncated])
            return actions

        handles = self.run(step)
        return out[0], out[1], out[2], out[3], handles

    # -- ReconnectHost ---------------------------------------------------------------------------

    def open_transport(self) -> Transport:
        """A new connection from the factory."""
        return self._factory()

    def adopt(self, transport: Transport) -> threading.Thread:
        """Use ``transport`` from now on and start its reader."""
        self._transport = transport
        self._generation += 1
        if self.recorder is not None:
            self.recorder.new_connection()
        return self._start_reader(transport)

    def current_transport(self) -> Transport | None:
        """The socket in use."""
        return self._transport

    def forget_transport(self, transport: Transport) -> None:
        """Stop using ``transport`` (a failed reconnect attempt)."""
        if self._transport is transport:
            self._transport = None

    def pause_writer(self) -> None:
        """Park the writer (no send in progress)."""
        self.writer.pause()

    def resume_writer(self, error: BaseException | None = None, *, keep_audio: bool = False) -> None:
        """Unpark the writer; settle update waiters the replay answered (or failed: ``error``).

        ``keep_audio``: the mic audio queued meanwhile goes out too (a planned recycle), else it is dropped.
        """
        with self._mutex:
            waiters = self.core.take_replay_waiters()
            config = dict(self.core.session_config)
        for w in waiters:
            if error is not None:
                w.set_error(error)
            else:
                w.set_result(config)
        if keep_audio:
            self.recycle_audio_kept += self.writer.audio_queued()
        self.writer.resume(drop_audio=not keep_audio)

    def drop_in_flight(self) -> tuple[int, int]:
        """Reset the gate; re-queue creates not started, fail streaming ones."""
        dropped = [(e.event_id, e.response_id, e.state == "pending") for e in self.gate.reset()]
        with self._mutex:
            actions, failed, reissue = self.core.connection_lost(dropped)
            # A turn whose create failed to send after its item went out: re-send the item only if
            # the server never announced it (then the re-seed does not carry it either).
            self.writer.filter_preludes(self.core.item_known)
            self._queue_sends(list(reissue))
        self._apply(actions)
        return failed, len(reissue)

    def replay(self, transport: Transport, *, reseed: bool, limit: int | None,
               summary: Summary | None = None) -> tuple[str, int, Counter[str]]:
        """Queue the configuration and the re-seed for the new socket (the writer sends them).

        ``summary`` replaces what it covers, in the re-seed and in the history (it goes first in both).
        """
        with self._mutex:  # the snapshot and the plan in one step (lock order: mutex, then writer)
            queued = self.writer.queued_event_ids()
            update, seeds, dropped = self.core.reconnect_plan(reseed=reseed, limit=limit, queued=queued)
            if summary is not None and reseed:
                seeds = apply_summary(seeds, summary)
                self.core.history.replace(summary.covered, summary.item)
        texts = [json.dumps(update)]
        texts += [json.dumps({"type": "conversation.item.create", "event_id": protocol.new_event_id(), "item": s})
                  for s in seeds]
        self.writer.prime(self._send_text, texts)  # adopt() made it the current socket
        return str(update["event_id"]), len(seeds), Counter(dropped)

    def config_version(self) -> int:
        """Bumped on every ``session.created`` / ``session.updated``."""
        return self.core.config_version

    def error_for(self, event_id: str) -> ServerError | None:
        """The error reply naming ``event_id``."""
        with self._changed:
            return self._errors.get(event_id)

    def wait_change(self, ready: Callable[[], bool], timeout: float | None) -> bool:
        """Block until ``ready()`` or ``timeout``; re-checked on every reply and wake-up."""
        with self._changed:
            return self._changed.wait_for(ready, timeout)

    def wake(self) -> None:
        """Wake :meth:`wait_change` waiters."""
        with self._changed:
            self._changed.notify_all()

    # -- ReconnectHost: planned recycling (rtqueue.recycler) ----------------------------------------

    def session_clock(self) -> SessionClock | None:
        """When the current socket's ``session.created`` came, and the server's ``expires_at``."""
        return self._session_clock

    def _activity(self) -> Activity:
        # Caller holds the mutex (lock order: mutex, writer, gate).
        act = self.core.activity()
        tools = act.tools + (0 if self.tools is None or self.tools.idle() else 1)
        return act.plus(gate=self.gate.depth(), queued=len(self.writer.pending()), tools=tools)

    def activity(self) -> Activity:
        """What is in flight or queued now (core, gate, writer's control lane, tool worker)."""
        with self._mutex:
            return self._activity()

    def quiet_barrier(self) -> tuple[Activity, Waiter[dict[str, Any]] | None]:
        """Writer paused: if quiet, prime a no-op ``session.update`` on the current socket; its waiter.

        Checked and registered in one mutex step, so an update the app asks
        for meanwhile is answered after this one, in wire order.
        """
        with self._mutex:
            act = self._activity()
            if not act.quiet:
                return act, None
            waiter: Waiter[dict[str, Any]] = Waiter("session.updated for the recycle's barrier")
            sends = [a for a in self.core.update({"type": "realtime"}, None, waiter) if isinstance(a, Send)]
            self.writer.prime(self._send_text, [json.dumps(a.event) for a in sends])
        return act, waiter

    def retire_transport(self, transport: Transport, timeout: float) -> None:
        """Stop using ``transport`` as planned: forget it, close it, wait (bounded) for its reader."""
        reader = self._reader
        self.forget_transport(transport)  # first: its reader must not report the close as a loss
        transport.send_close()
        if reader is not None and reader is not threading.current_thread():
            reader.join(min(timeout, 2.0))
            if reader.is_alive():
                transport.abort()
                reader.join(timeout)

    def recycle_seeds(self) -> list[dict[str, Any]]:
        """The items a re-seed would carry now (nothing changes)."""
        with self._mutex:
            seeds, _dropped = reseed_plan(self.core.history.items(), pending_calls=self.core.pending_call)
        return seeds

    def request_summary(self, params: dict[str, Any]) -> ResponseHandle:
        """Queue the recycle's out-of-band summary create; its handle."""
        handle = self.new_response_handle()
        now = time.monotonic()
        self.run(lambda core: core.create_response(params, handle, now=now))
        return handle

    # -- failure ---------------------------------------------------------------------------------

    def _on_connection_lost(self, error: BaseException, transport: Transport) -> None:
        if self._closing:
            return
        code, reason = transport.close_code, transport.close_reason
        if self.reconnector is not None and self.reconnector.handle_lost(error, transport, code, reason):
            return
        refusing = code in AUTH_CLOSE_CODES or code in REQUEST_CLOSE_CODES
        fatal = fatal_loss(code, self._fatal_error or (self._last_error if refusing else None), self.secret, reason)
        self.die(fatal or (error if isinstance(error, RtqueueError) else ConnectionLost(str(error))))

    def die(self, error: BaseException) -> None:
        """The connection is gone for good: fail everything queued or in flight."""
        err = error if isinstance(error, (ConnectionLost, ConnectError)) else ConnectionLost(str(error))
        self._dead = err
        self.wake()
        with self._mutex:
            actions = self.core.close(err)
        unsent = self.writer.stop(err, timeout=1.0)
        self._apply(actions)
        self.gate.close(err)
        for item in unsent:
            self.publish(Event("rtqueue.send_failed", {"event": item.event, "error": err}))
        self.publish(Event("session.closed", {"reason": str(err), "error": err}))
        log.warning("%s", redact(str(err), self.secret))

    @property
    def started(self) -> bool:
        """Whether :meth:`start` ran (or is running)."""
        return self._started

    @property
    def dead(self) -> BaseException | None:
        """Why the connection ended for good, if it did."""
        return self._dead

    @property
    def closing(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closing

    def _on_callback_error(self, event: Event, exc: BaseException) -> None:
        self.publish(Event("rtqueue.callback_error", {"event_type": event.type, "error": exc}))

    # -- closing ---------------------------------------------------------------------------------

    def close(self, timeout: float) -> None:
        """End everything this session started; re-raise the first cleanup error at the end.

        Safe from any thread (a callback, a tool, the app), after a failed
        connect, and twice (the second call waits for the first, unless it
        runs on a thread the first is waiting for).
        """
        with self._mutex:
            already = self._closing
            self._closing = True
            actions = [] if already else self.core.close(SessionClosed("session closed by the app"))
        if already:
            if threading.current_thread() not in self.threads():
                self._closed.wait(timeout)
            return
        errors: list[BaseException] = []

        def step(fn: Callable[[], Any]) -> None:
            try:
                fn()
            except BaseException as exc:  # keep going: every thread must end
                errors.append(exc)

        err = SessionClosed("session closed by the app")
        self.wake()
        if self.reconnector is not None:
            step(lambda: self.reconnector.stop(timeout))  # type: ignore[union-attr]
        if self.recycler is not None:
            step(lambda: self.recycler.stop(timeout))  # type: ignore[union-attr]
        step(self.approvals.close)  # wakes a tool job waiting for an answer: it is rejected
        if self.tools is not None:
            step(lambda: self.tools.close(timeout))  # type: ignore[union-attr]
        if self.guards is not None:
            step(lambda: self.guards.close(timeout))  # type: ignore[union-attr]
        if self.audio is not None:
            step(self.audio.close)
        step(lambda: self.writer.stop(err, timeout))
        step(lambda: self._apply(actions))
        step(lambda: self.gate.close(err))
        step(lambda: self._close_socket(timeout))
        if self._started:
            step(lambda: self.publish(Event("session.closed", {"reason": "closed by the app"})))
        step(lambda: self.dispatcher.stop(timeout))
        step(self.telemetry.session_closed)
        if self.recorder is not None:
            recorder = self.recorder
            step(recorder.close if self.own_recorder else recorder.flush)
        self._closed.set()
        if errors:
            first = errors[0]
            if len(errors) > 1:
                log.warning("close(): %d cleanup errors; raising the first: %r", len(errors), errors[1:])
            if isinstance(first, RtqueueError):
                raise first
            raise RtqueueError(f"close(): a cleanup step failed after everything was closed: {first!r}") from first

    def _close_socket(self, timeout: float) -> None:
        transport = self._transport
        if transport is not None:
            transport.send_close()
        reader = self._reader
        if reader is not None and reader is not threading.current_thread():
            reader.join(min(timeout, 2.0))
            if reader.is_alive() and transport is not None:
                transport.abort()
                reader.join(timeout)
        elif transport is not None and reader is None:
            transport.shutdown()  # no reader ever ran on it

    def threads(self) -> list[threading.Thread]:
        """Live threads this session started (reader, writer, dispatcher, tools, reconnect)."""
        roles = ("reader", "writer", "dispatch", "turns", "reconnect", "guard", "recycle")
        names = {f"rtqueue-{role}-{self.n}" for role in roles}
        return [t for t in threading.enumerate() if t.name in names and t.is_alive()]

    def stores(self) -> dict[str, tuple[object, int]]:
        """Every capped per-session store, ``name -> (container, cap)`` (memory diagnostics)."""
        with self._mutex:
            out = self.core.stores()
        out["server_errors"] = (self._errors, _RECENT_ERRORS)
        out.update(self.gate.stores())
        return out

    def unresolved(self) -> list[SendHandle]:
        """Issued handles neither sent nor failed yet."""
        with self._mutex:
            handles = list(self._issued)
        return [h for h in handles if not h.sent() and h.error is None]
