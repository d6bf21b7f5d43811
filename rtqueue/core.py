"""The conversation core: every request, response, turn and agent of a session, with no I/O.

:class:`ConversationCore` is the session's protocol state (h11's shape, like
the :class:`~rtqueue.gate.ResponseGate` and the simulator's ``SimSession``). It
has no thread, no socket, no lock and no sleep. Its inputs are:

- server events (:meth:`ConversationCore.receive`), after the shell told the
  gate about them;
- app requests (:meth:`create_response`, :meth:`turn`, :meth:`send_event`,
  :meth:`update`, :meth:`app_handoff`, :meth:`cancel_active`, ...);
- tool results (:meth:`tool_results`) from the tool worker;
- the writer's reports (:meth:`unsent`) and connection changes
  (:meth:`connection_lost`, :meth:`reconnect_plan`, :meth:`close`);
- the clock, passed in as ``now`` where time matters.

Each returns a list of *actions* (frozen values) for the shell to apply, in
order: :class:`Send` (queue a client event on the writer), :class:`Resolve` /
:class:`Fail` (settle a future), :class:`SetFollowup`, :class:`RunTools`,
:class:`Publish`. The shell applies them under its one mutex, so the order of
events on the wire is the order the core decided.

Records:

- one :class:`Request` per ``response.create`` the app or the session asked
  for, keyed by its client ``event_id``; its phase moves through
  :data:`REQUEST_MOVES` (an illegal move raises :class:`CoreError` and changes
  nothing);
- one :class:`ResponseRecord` per response the server started, keyed by
  response id, holding the **agent that made it** (the agent whose
  ``session.update`` the server had confirmed when it said
  ``response.created``), its streamed text and audio, and its waiters.

The agent of a response never changes after ``response.created``; tool and
handoff calls are resolved against it, not against the current agent.
"""

from __future__ import annotations

import enum
import json
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

from . import protocol
from .agents import Agent, AgentGraph
from .errors import (
    ConnectionLost,
    InvalidArgument,
    ResponseError,
    ResponseRejected,
    RtqueueError,
    ServerError,
    SessionClosed,
)
from .formats import PCM16, AudioFormat, format_of
from .guardrails import refusal_instructions
from .history import History, reseed_plan
from .protocol import METADATA_KEY, new_event_id
from .recycle import Activity
from .values import Response

__all__ = [
    "HANDLED_TYPES",
    "REQUEST_MOVES",
    "Action",
    "ConversationCore",
    "CoreError",
    "Fail",
    "Phase",
    "Publish",
    "ReleaseHold",
    "Request",
    "Resolve",
    "ResponseRecord",
    "Retried",
    "RunTools",
    "Send",
    "SetFollowup",
    "Started",
    "ToolJob",
]

#: Responses kept after their ``response.done`` for late waiters (cancel, interrupt).
RECENT_RESPONSES = 16
#: Response ids whose ``response.done`` was read (a cancel queued for one is moot).
RECENT_DONE_IDS = 256
#: Call ids handled once, ever (a replayed or duplicated call is not run twice).
HANDLED_CALLS = 10_000
#: Function-call outputs remembered for re-seeding after a reconnect.
RECENT_OUTPUTS = 256
#: Bytes of streamed text kept per response.
MAX_TEXT = 1_000_000

_TEXT_DELTAS = frozenset({"response.output_text.delta", "response.output_audio_transcript.delta"})
_HANDLED = frozenset({
    "session.created", "session.updated", "response.created", "response.done", "error",
    "input_audio_buffer.speech_started", "conversation.item.added", "conversation.item.done",
    "conversation.item.deleted", "conversation.item.input_audio_transcription.completed",
    "input_audio_buffer.speech_stopped",
})


class CoreError(RtqueueError):
    """An illegal move of the core's state (a bug in the caller); nothing was changed."""


class Phase(enum.Enum):
    """Where a request stands."""

    QUEUED = "queued"  # on the writer's lane, or sent and not yet answered
    CREATED = "created"  # the server said response.created for it
    DONE = "done"  # its response.done arrived (any status)
    FAILED = "failed"  # rejected, timed out in the gate, withdrawn, lost, closed


#: (phase, move) -> next phase. Anything else is illegal.
REQUEST_MOVES: Mapping[tuple[Phase, str], Phase] = {
    (Phase.QUEUED, "created"): Phase.CREATED,
    (Phase.QUEUED, "retry"): Phase.QUEUED,
    (Phase.QUEUED, "reissue"): Phase.QUEUED,
    (Phase.QUEUED, "done"): Phase.DONE,  # response.done whose response.created was never seen
    (Phase.QUEUED, "fail"): Phase.FAILED,
    (Phase.CREATED, "done"): Phase.DONE,
    (Phase.CREATED, "fail"): Phase.FAILED,
}


# -- actions ---------------------------------------------------------------------------------


@attrs.frozen
class Send:
    """Queue ``event`` on the writer. ``handle`` reports it sent or failed.

    ``gated``: an in-band ``response.create`` that waits for the gate;
    ``prelude``: events sent right after the gate is reserved, before the
    create (a turn's user item); ``front``: jump the control lane (urgent);
    ``oob``: an out-of-band create; ``deadline``: monotonic time after which a
    gated create is never sent; ``untagged``: the create carries no id in
    ``response.metadata`` (the app used all 16 pairs).
    """

    event: dict[str, Any]
    handle: Any = None
    gated: bool = False
    oob: bool = False
    front: bool = False
    deadline: float | None = None
    prelude: tuple[dict[str, Any], ...] = ()
    untagged: bool = False
    holder: str | None = None  # the response whose tool chain this create continues (takes its gate hold)


@attrs.frozen
class ReleaseHold:
    """End the gate hold of ``response_id``'s tool chain: no follow-up will come."""

    response_id: str


@attrs.frozen
class Resolve:
    """Settle ``future`` with ``value`` (a :class:`Response`, or a session config for an update)."""

    future: Any
    value: Any


@attrs.frozen
class Started:
    """The server started ``handle``'s response: it is ``response_id``, spoken by ``agent``."""

    handle: Any
    response_id: str
    agent: str | None


@attrs.frozen
class Retried:
    """The server raced ``handle``'s create; it goes out again."""

    handle: Any


@attrs.frozen
class Fail:
    """Settle ``future`` with ``error``."""

    future: Any
    error: BaseException


@attrs.frozen
class SetFollowup:
    """``handle.followup`` is ``followup`` (``None``: the chain ends); ``expect``: one is coming."""

    handle: Any
    followup: Any = None
    expect: bool = False


@attrs.frozen
class ToolCallSpec:
    """One function call of a finished response."""

    call_id: str
    name: str
    arguments: str
    item_id: str | None = None
    kind: str = "function"  # or "mcp_approval": an mcp_approval_request item (call_id is its id)
    server_label: str | None = None


@attrs.frozen
class ToolJob:
    """Run ``calls`` as ``agent``'s tools; render ``handoff_target``'s config (user code, off every lock)."""

    response_id: str
    agent: str | None
    calls: tuple[ToolCallSpec, ...]
    handoff_call: str | None = None  # call id of the (first) handoff call
    handoff_target: str | None = None  # the agent it transfers to
    in_band: bool = True  # an out-of-band response's chain holds no gate slot


@attrs.frozen
class RunTools:
    """Give ``job`` to the tool worker; it answers with :meth:`ConversationCore.tool_results`."""

    job: ToolJob


@attrs.frozen
class Publish:
    """Deliver an event of ``type`` with ``data`` to subscribers (the shell stamps its time)."""

    type: str
    data: dict[str, Any]


Action = Send | Resolve | Fail | Started | Retried | SetFollowup | RunTools | Publish | ReleaseHold


# -- records ---------------------------------------------------------------------------------


@attrs.define(eq=False)
class Request:
    """One ``response.create`` the session was asked for."""

    event_id: str
    handle: Any
    event: dict[str, Any]
    in_band: bool
    deadline: float | None
    untagged: bool = False
    prelude: tuple[dict[str, Any], ...] = ()
    holder: str | None = None
    phase: Phase = Phase.QUEUED
    response_id: str | None = None
    cancel_requested: bool = False
    retries: int = 0

    def move(self, how: str) -> None:
        """Apply one move of :data:`REQUEST_MOVES`; raise :class:`CoreError` (unchanged) if illegal."""
        nxt = REQUEST_MOVES.get((self.phase, how))
        if nxt is None:
            raise CoreError(f"request {self.event_id}: cannot {how} from {self.phase.value}")
        self.phase = nxt


@attrs.define(eq=False)
class ResponseRecord:
    """One response the server started."""

    id: str
    agent: str | None
    in_band: bool
    turn: int
    request: Request | None = None
    parts: list[str] = attrs.field(factory=list)
    size: int = 0
    audio_ms: float = 0.0  # in the output format current when each delta came
    waiters: list[Any] = attrs.field(factory=list)
    cancel_sent: bool = False


@attrs.define(eq=False)
class _PendingUpdate:
    """A ``session.update`` queued or sent, not yet answered (answers come in order)."""

    event_id: str
    agent: str | None  # the agent it makes current (None: no agent change)
    waiter: Any = None
    previous: Agent | None = None  # the agent before a handoff's update (restored if the server refuses it)


_EMPTY: list[Action] = []


# -- the core -------------------------------------------------------------------------------


class ConversationCore:
    """The protocol state of one session (see the module docstring).

    ``handle_factory(event, in_band)`` makes the future for a follow-up create
    the core decides on by itself. ``render(agent, context)`` is *not* here:
    rendering an agent's instructions is user code and happens in the shell.
    """

    def __init__(
        self,
        *,
        handle_factory: Callable[[dict[str, Any], bool], Any],
        graph: AgentGraph | None = None,
        agent: Agent | None = None,
        create_timeout: float = 120.0,
        history: History | None = None,
    ) -> None:
        self._new_handle = handle_factory
        self._create_timeout = create_timeout
        self.graph = graph
        self._agent = agent  # the agent the app sees now (changes at once on a handoff)
        self._confirmed_agent = agent.name if agent is not None else None  # what the server has
        self.history = history if history is not None else History()
        self._requests: dict[str, Request] = {}
        self._responses: dict[str, ResponseRecord] = {}
        self._recent: OrderedDict[str, Response] = OrderedDict()
        self._finished: OrderedDict[str, None] = OrderedDict()
        self._handled: OrderedDict[str, None] = OrderedDict()
        self._outputs: OrderedDict[str, tuple[str, str]] = OrderedDict()  # call id -> (event id, output)
        self._updates: deque[_PendingUpdate] = deque()
        self._jobs: dict[str, tuple[ToolJob, Any, int, str]] = {}  # response id -> job, handle, turn, status
        self.session_config: dict[str, Any] = {}
        self.desired: dict[str, Any] = {"type": "realtime"}
        # The negotiated audio formats: what the server last reported (the desired ones until then).
        self.input_format: AudioFormat = PCM16
        self.output_format: AudioFormat = PCM16
        # Output guardrails (rtqueue.guardrails): the shell sets guard_outputs when any exist.
        self.guard_outputs = False
        self.max_corrections = 2
        self._tripped: OrderedDict[str, None] = OrderedDict()  # responses a guardrail cut (once each)
        self._guard_pending: dict[str, Any] = {}  # done, verdict not in: response id -> its handle
        self._corrections: dict[str, Any] = {}  # tripped before done: response id -> correction handle
        self._correction_depth: OrderedDict[str, int] = OrderedDict()  # correction create event id -> depth
        self.guardrail_trips = 0
        self.corrections = 0
        self._unguarded: OrderedDict[str, None] = OrderedDict()  # rtqueue's own responses
        self.config_version = 0
        self.turn_seq = 0
        self.produced_audio = False
        self.speaking = False  # server VAD heard speech start and no stop yet (a recycle waits for the stop)
        self.handoffs = 0
        self._closed: BaseException | None = None
        self._replay_waiters: list[Any] = []
        self._matched: str | None = None  # set by receive() for the response.created it handles
        self._handlers: dict[str, Callable[[dict[str, Any], str | None], list[Action]]] = {
            "session.created": self._on_session,
            "session.updated": self._on_session,
            "response.created": self._on_created,
            "response.done": self._on_done,
            "error": self._on_error,
            "input_audio_buffer.speech_started": self._on_speech_started,
            "conversation.item.added": self._on_item,
            "conversation.item.done": self._on_item,
            "conversation.item.deleted": self._on_item_deleted,
            "conversation.item.input_audio_transcription.completed": self._on_transcription,
            "input_audio_buffer.speech_stopped": self._on_speech_stopped,
        }
        assert set(self._handlers) == _HANDLED

    # -- queries ----------------------------------------------------------------------------

    @property
    def agent(self) -> Agent | None:
        """The current agent (after a handoff, the target, at once)."""
        return self._agent

    @property
    def closed_error(self) -> BaseException | None:
        """Why the core takes no more requests (closed or dead), else ``None``."""
        return self._closed

    def request(self, event_id: str) -> Request | None:
        """The live request with this client event id."""
        return self._requests.get(event_id)

    def requests(self) -> list[Request]:
        """Every request not yet done or failed."""
        return list(self._requests.values())

    def response(self, response_id: str) -> ResponseRecord | None:
        """The record of a response still streaming."""
        return self._responses.get(response_id)

    def recent(self, response_id: str) -> Response | None:
        """A finished response kept for late waiters."""
        return self._recent.get(response_id)

    def is_finished(self, response_id: str) -> bool:
        """Whether ``response.done`` for this id was read, or a reconnect cut it off (a cancel would be refused)."""
        return response_id in self._finished

    def has_item(self, item_id: str) -> bool:
        """Whether the conversation holds this item (as far as this client knows)."""
        return item_id in self.history

    def pending_call(self, call_id: str) -> bool:
        """Whether this call was taken on (handled once: its tools ran or run, its output was or will be sent)."""
        return call_id in self._handled

    def tools_idle(self) -> bool:
        """Whether no tool job is running."""
        return not self._jobs

    def activity(self) -> Activity:
        """What is in flight, for a planned recycle's quiet check (the shell adds the gate and the writer).

        A response whose output guardrails have not given their verdict yet counts as streaming.
        """
        return Activity(requests=len(self._requests), responses=len(self._responses) + len(self._guard_pending),
                        updates=len(self._updates), tools=len(self._jobs), speaking=self.speaking)

    def stores(self) -> dict[str, tuple[object, int]]:
        """The capped per-session stores, ``name -> (container, cap)`` (memory diagnostics; do not change)."""
        return {
            "history": (self.history.records, self.history.limit),
            "recent_responses": (self._recent, RECENT_RESPONSES),
            "done_ids": (self._finished, RECENT_DONE_IDS),
            "handled_calls": (self._handled, HANDLED_CALLS),
        }

    def voice(self) -> str | None:
        """The voice the server reported, if any."""
        audio = self.session_config.get("audio")
        out = audio.get("output") if isinstance(audio, dict) else None
        voice = out.get("voice") if isinstance(out, dict) else None
        return voice if isinstance(voice, str) else None

    def server_interrupts(self) -> bool:
        """Whether the server cancels the active response itself on speech start."""
        audio = self.session_config.get("audio")
        inp = audio.get("input") if isinstance(audio, dict) else None
        td = inp.get("turn_detection") if isinstance(inp, dict) else None
        if not isinstance(td, dict):
            return True  # no VAD configured: speech_started only comes from a server that has one
        return bool(td.get("interrupt_response", True))

    # -- app requests -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed is not None:
            raise _reraisable(self._closed)

    def create_response(
        self,
        params: dict[str, Any],
        handle: Any,
        *,
        now: float,
        deadline: float | None = None,
        event_id: str | None = None,
        prelude: tuple[dict[str, Any], ...] = (),
        holder: str | None = None,
    ) -> list[Action]:
        """Ask for one response (``params`` are GA response fields, already checked).

        The create is tagged with its ``event_id`` in ``response.metadata``
        unless the app already used the 16 pairs the API allows (then it is
        matched as the one pending create). ``prelude`` events go out right
        after the gate is reserved for it, before it (see :meth:`turn`).
        """
        self._check_open()
        eid = event_id or new_event_id()
        resp = dict(params)
        meta = dict(resp.get("metadata") or {})
        untagged = len(meta) >= protocol.MAX_METADATA_PAIRS
        if not untagged:
            meta[METADATA_KEY] = eid
        if meta:
            resp["metadata"] = meta
        event = {"type": "response.create", "event_id": eid, "response": resp}
        in_band = protocol.is_in_band(resp)
        limit = self._create_timeout if deadline is None else deadline
        req = Request(eid, handle, event, in_band, now + limit, untagged=untagged and in_band, prelude=prelude,
                      holder=holder)
        self._requests[eid] = req
        return [self._send_for(req)]

    def turn(self, item: dict[str, Any], params: dict[str, Any], handle: Any, *, now: float,
             deadline: float | None = None) -> list[Action]:
        """An app turn: the user ``item`` and its response enter the gate as one unit.

        The item is held with the create and sent only once the gate is free,
        immediately before it, so no other turn's message can land between a
        question and its answer.
        """
        self._check_open()
        item = {"id": new_event_id("item_rtq_"), **item}  # an id of ours: a reconnect can tell if it arrived
        if not protocol.is_in_band(params):
            # Out of band: the question is the response's own input, not a conversation item.
            return self.create_response({**params, "input": [*params.get("input", ()), item]}, handle, now=now,
                                        deadline=deadline)
        # No turn_seq bump: the item goes out only when no response or tool chain
        # holds the gate, so it can never cut into another turn's chain.
        event = {"type": "conversation.item.create", "event_id": new_event_id(), "item": item}
        return self.create_response(params, handle, now=now, deadline=deadline, prelude=(event,))

    def send_event(self, event: dict[str, Any], handle: Any, *, front: bool = False) -> list[Action]:
        """Queue any other client event (``event_id`` already set)."""
        self._check_open()
        typ = event["type"]
        if typ == "session.update" and isinstance(event.get("session"), Mapping):
            self.desired = deep_merge(self.desired, dict(event["session"]))
            self._updates.append(_PendingUpdate(event["event_id"], None))
        elif typ == "conversation.item.create":
            item = event.get("item")
            if isinstance(item, dict) and item.get("type") == "message" and item.get("role") == "user":
                self.turn_seq += 1
        elif typ == "input_audio_buffer.commit":
            self.turn_seq += 1
        return [Send(event, handle, front=front)]

    def update(self, fields: dict[str, Any], handle: Any, waiter: Any) -> list[Action]:
        """A ``session.update``; ``waiter`` is settled with the session as ``session.updated`` reports it."""
        self._check_open()
        eid = new_event_id()
        event = {"type": "session.update", "event_id": eid, "session": fields}
        self.desired = deep_merge(self.desired, fields)
        self._updates.append(_PendingUpdate(eid, None, waiter))
        return [Send(event, handle)]

    def set_graph(self, graph: AgentGraph) -> None:
        """Adopt a (re-)resolved agent graph; the current agent stays."""
        self.graph = graph

    def start_agents(self, graph: AgentGraph, agent: Agent) -> None:
        """Begin with ``agent`` of ``graph`` (its config goes out with the first update)."""
        self.graph = graph
        self._agent = agent
        self._confirmed_agent = agent.name

    def app_handoff(self, target: Agent, config: dict[str, Any], handle: Any, *, now: float,
                    respond: bool) -> list[Action]:
        """Switch to ``target`` (its ``config`` rendered by the shell): update, then maybe one create.

        Both are queued in one step, so nothing another thread queues can
        come between them on the wire.
        """
        self._check_open()
        actions = self._switch(target, config, call_id=None, response_id=None)
        if respond:
            actions += self.create_response({}, handle, now=now)
        return actions

    def cancel_request(self, event_id: str) -> list[Action]:
        """Cancel our create: when active, by id now; when sent but not started, once it starts."""
        req = self._requests.get(event_id)
        if req is None:
            return _EMPTY
        if req.response_id is None:
            req.cancel_requested = True
            return _EMPTY
        return self.cancel_response(req.response_id, None)

    def cancel_response(self, response_id: str, waiter: Any) -> list[Action]:
        """Cancel a response by id (at most one ``response.cancel`` each); ``waiter`` gets its Response."""
        done = self._recent.get(response_id)
        if done is not None:
            return [Resolve(waiter, done)] if waiter is not None else _EMPTY
        rec = self._responses.get(response_id)
        if rec is None:
            if waiter is not None:
                return [Fail(waiter, ResponseError(f"no response {response_id} is known to this session"))]
            return _EMPTY
        if waiter is not None:
            rec.waiters.append(waiter)
        if rec.cancel_sent or response_id in self._finished:
            return _EMPTY
        rec.cancel_sent = True
        return [Send({"type": "response.cancel", "event_id": new_event_id(), "response_id": response_id},
                     front=True)]

    def mark_cancelled_by_server(self, response_id: str) -> None:
        """The server cancels this response itself (speech start with ``interrupt_response``)."""
        rec = self._responses.get(response_id)
        if rec is not None:
            rec.cancel_sent = True

    def cancel_sent(self, response_id: str) -> bool:
        """Whether someone (we or the server) is already cancelling this response."""
        rec = self._responses.get(response_id)
        return rec is not None and rec.cancel_sent

    def barge_in(
        self, response_id: str | None, *, cancel: bool, server_cancels: bool, truncate: tuple[str, int] | None
    ) -> tuple[list[Action], bool, bool]:
        """The user barged in while ``response_id`` (the gate's active in-band response) ran.

        Cancels it by id only when asked (``cancel``), when the server does
        not do it itself (``server_cancels``), when it has not finished and
        when nobody cancels it already; truncates ``truncate = (item_id,
        audio_end_ms)`` only for an item in the conversation. The cancel and
        the truncate go to the head of the lane, in that order. Returns
        ``(actions, cancel_sent, ending)``; ``ending``: the response is being
        cancelled by someone, so waiting for its ``response.done`` makes sense.
        """
        actions: list[Action] = []
        send_cancel = ending = False
        if response_id is not None:
            rec = self._responses.get(response_id)
            if rec is not None and rec.cancel_sent:
                ending = True
            elif server_cancels:
                self.mark_cancelled_by_server(response_id)
                ending = True
            elif cancel and response_id not in self._finished:
                if rec is not None:
                    rec.cancel_sent = True
                send_cancel = ending = True
                actions.append(_cancel_send(response_id))
        actions.extend(self._truncate_sends(truncate))
        return actions, send_cancel, ending

    def wait_response(self, response_id: str, waiter: Any) -> list[Action]:
        """Settle ``waiter`` with this response once done (at once if it already is)."""
        done = self._recent.get(response_id)
        if done is not None:
            return [Resolve(waiter, done)]
        rec = self._responses.get(response_id)
        if rec is None:
            return [Fail(waiter, ConnectionLost(f"response {response_id} is not streaming any more"))]
        rec.waiters.append(waiter)
        return _EMPTY

    def unsent(self, event_id: str, error: BaseException) -> list[Action]:
        """The writer could not send this create (deadline, withdrawn, stopped): forget it."""
        req = self._requests.pop(event_id, None)
        if req is None or req.phase is not Phase.QUEUED:
            return _EMPTY
        req.move("fail")
        if req.holder is not None:  # a chain's follow-up that never went: its hold must not outlive it
            return [Fail(req.handle, error), ReleaseHold(req.holder)]
        return [Fail(req.handle, error)]

    # -- server events ----------------------------------------------------------------------

    def receive(self, event: dict[str, Any], *, verdict: str | None = None, matched: str | None = None
                ) -> list[Action]:
        """One server event, after the gate saw it.

        ``verdict`` is the gate's word on an ``error`` (``"retry"``,
        ``"reject"`` or ``None``); ``matched`` the event id of the untagged
        create the gate matched a ``response.created`` without metadata to.
        """
        if matched is not None:
            self._matched = matched
        typ = event["type"]
        if typ in _TEXT_DELTAS:
            self._on_text_delta(event)
            return _EMPTY
        if typ == "response.output_audio.delta":
            self._on_audio_delta(event)
            return _EMPTY
        handler = self._handlers.get(typ)
        if handler is None:
            return _EMPTY
        return handler(event, verdict)

    def stream(self, event: dict[str, Any]) -> None:
        """A streaming event (audio, text or transcript delta): add it to its response. No actions."""
        if event["type"] == "response.output_audio.delta":
            self._on_audio_delta(event)
        else:
            self._on_text_delta(event)

    def _on_text_delta(self, event: dict[str, Any]) -> None:
        rid, delta = event.get("response_id"), event.get("delta")
        rec = self._responses.get(rid) if isinstance(rid, str) else None
        if rec is not None and isinstance(delta, str) and rec.size < MAX_TEXT:
            rec.parts.append(delta)
            rec.size += len(delta)

    def _on_audio_delta(self, event: dict[str, Any]) -> None:
        delta = event.get("delta")
        if not isinstance(delta, str):
            return
        self.produced_audio = True
        rid = event.get("response_id")
        rec = self._responses.get(rid) if isinstance(rid, str) else None
        if rec is not None:
            rec.audio_ms += b64_len(delta) / self.output_format.bytes_per_ms

    def _on_session(self, event: dict[str, Any], _verdict: str | None) -> list[Action]:
        session = event.get("session")
        if isinstance(session, dict):
            self.session_config = session
            self._note_formats(session)
        self.config_version += 1
        if event["type"] != "session.updated" or not self._updates:
            return _EMPTY
        upd = self._updates.popleft()
        if upd.agent is not None:
            self._confirmed_agent = upd.agent
        if upd.waiter is not None:
            return [Resolve(upd.waiter, dict(self.session_config))]
        return _EMPTY

    def _on_created(self, event: dict[str, Any], _verdict: str | None) -> list[Action]:
        resp, rid, eid = response_ids(event)
        if eid is None:
            eid, self._matched = self._matched, None
        req = self._requests.get(eid) if eid is not None else None
        if req is not None and req.phase is not Phase.QUEUED:
            req = None
        in_band = req.in_band if req is not None else resp.get("conversation_id", "x") is not None
        rec = ResponseRecord(rid, self._confirmed_agent, in_band, self.turn_seq, request=req)
        self._responses[rid] = rec
        meta = resp.get("metadata")
        if isinstance(meta, dict) and "rtqueue_purpose" in meta:
            # rtqueue's own work (a recycle summary) is not the assistant speaking: no guardrail checks it.
            self._unguarded[rid] = None
            while len(self._unguarded) > RECENT_DONE_IDS:
                self._unguarded.popitem(last=False)
        if req is None:
            return _EMPTY
        req.move("created")
        req.response_id = rid
        actions: list[Action] = [Started(req.handle, rid, rec.agent)]
        if req.cancel_requested:
            actions += self.cancel_response(rid, None)
        return actions

    def note_finished(self, response_id: str) -> None:
        """``response.done`` for this id was read: a cancel still queued for it is moot.

        The shell calls this *before* the gate releases the response, so a
        writer woken by the release never sends that cancel.
        """
        self._finished[response_id] = None
        while len(self._finished) > RECENT_DONE_IDS:
            self._finished.popitem(last=False)

    def _on_done(self, event: dict[str, Any], _verdict: str | None) -> list[Action]:
        _resp, rid, eid = response_ids(event)
        if eid is None:  # the shell matched it to our create (no metadata echo)
            eid, self._matched = self._matched, None
        self.note_finished(rid)
        rec = self._responses.pop(rid, None)
        req = rec.request if rec is not None else None
        if req is None and eid is not None:
            req = self._requests.get(eid)
        agent = rec.agent if rec is not None else self._confirmed_agent
        response = Response.from_done(
            event,
            streamed_text="".join(rec.parts) if rec else "",
            audio_ms=rec.audio_ms if rec else 0.0,
            agent=agent,
        )
        self._recent[rid] = response
        while len(self._recent) > RECENT_RESPONSES:
            self._recent.popitem(last=False)
        actions: list[Action] = []
        handle = None
        if req is not None and req.phase in (Phase.QUEUED, Phase.CREATED):
            if req.phase is Phase.QUEUED:  # its response.created was never matched to it
                req.response_id = rid
                actions.append(Started(req.handle, rid, agent))
            req.move("done")
            self._requests.pop(req.event_id, None)
            handle = req.handle
        if req is not None and req.event_id in self._correction_depth:
            # A correction finished: a trip on its final text must still see how deep the chain is.
            self._correction_depth[rid] = self._correction_depth[req.event_id]
        chained = False
        if response.function_calls or response.mcp_approval_requests:
            # Decide on a follow-up before resolving the handle, so final() never
            # sees "done, no follow-up" in between.
            calls = self._on_calls(response, agent, handle, self.turn_seq, rec.in_band if rec is not None else True)
            chained = any(isinstance(a, RunTools) for a in calls)
            actions += calls
        if chained:
            self._corrections.pop(rid, None)  # it finished with calls before our cancel: the chain leads
        elif self.is_guarded(rid) or rid in self._corrections or rid in self._tripped:
            actions += self._guard_followup(rid, handle)
        if handle is not None:
            actions.append(Resolve(handle, response))
        for w in rec.waiters if rec is not None else ():
            actions.append(Resolve(w, response))
        return actions

    def _truncate_sends(self, truncate: tuple[str, int] | None) -> list[Action]:
        """The urgent ``conversation.item.truncate`` of ``(item_id, audio_end_ms)``, if the item is known."""
        if truncate is None or truncate[0] not in self.history:
            return []
        item_id, ms = truncate
        return [Send({"type": "conversation.item.truncate", "event_id": new_event_id(),
                      "item_id": item_id, "content_index": 0, "audio_end_ms": ms}, front=True)]

    def _on_error(self, event: dict[str, Any], verdict: str | None) -> list[Action]:
        err = ServerError.from_event(event)
        eid = err.event_id
        actions: list[Action] = []
        if eid is not None:
            for upd in self._updates:
                if upd.event_id == eid:
                    self._updates.remove(upd)
                    if upd.waiter is not None:
                        actions.append(Fail(upd.waiter, err))
                    if upd.agent is not None and self._agent is not None and self._agent.name == upd.agent:
                        # The server refused the handoff's configuration: the agent did not change.
                        self._agent = upd.previous
                        actions.append(Publish("agent.handoff_failed", {
                            "source": upd.previous.name if upd.previous else None, "target": upd.agent,
                            "call_id": None, "error": err, "message": str(err)}))
                    break
        req = self._requests.get(eid) if eid is not None else None
        if req is not None and verdict == "retry" and req.phase is Phase.QUEUED:
            req.move("retry")
            req.retries += 1
            req.prelude = ()  # the turn's item went out with the first try
            actions.append(Retried(req.handle))
            actions.append(self._send_for(req, front=True))
        elif req is not None and verdict == "reject" and req.phase is Phase.QUEUED:
            req.move("fail")
            self._requests.pop(req.event_id, None)
            actions.append(Fail(req.handle, ResponseRejected(f"server rejected response.create: {err}", error=err)))
        return actions

    def _on_item(self, event: dict[str, Any], _verdict: str | None) -> list[Action]:
        item = event.get("item")
        if isinstance(item, dict):
            self.history.put(item)
        return _EMPTY

    def _on_item_deleted(self, event: dict[str, Any], _verdict: str | None) -> list[Action]:
        iid = event.get("item_id")
        if isinstance(iid, str):
            self.history.delete(iid)
        return _EMPTY

    def _on_transcription(self, event: dict[str, Any], _verdict: str | None) -> list[Action]:
        iid, transcript = event.get("item_id"), event.get("transcript")
        if isinstance(iid, str) and isinstance(transcript, str):
            self.history.set_transcript(iid, transcript)
        return _EMPTY

    def _on_speech_started(self, event: dict[str, Any], _verdict: str | None) -> list[Action]:
        self.turn_seq += 1
        self.speaking = True
        return _EMPTY

    def _on_speech_stopped(self, event: dict[str, Any], _verdict: str | None) -> list[Action]:
        self.speaking = False
        return _EMPTY

    # -- guardrails -----------------------------------------------------------------------------

    def is_guarded(self, response_id: str) -> bool:
        """Whether output guardrails check this response (all but rtqueue's own, such as a recycle summary)."""
        return self.guard_outputs and response_id not in self._unguarded

    def _guard_followup(self, rid: str, handle: Any) -> list[Action]:
        """At ``response.done``: link a correction made already, or await the final guardrail verdict."""
        if rid in self._corrections:
            corr = self._corrections.pop(rid)
            return [SetFollowup(handle, corr)] if handle is not None else _EMPTY
        if rid in self._tripped:  # cut off with no correction (too many in a row)
            return [SetFollowup(handle)] if handle is not None else _EMPTY
        if handle is None or self._closed is not None:
            return _EMPTY
        self._guard_pending[rid] = handle
        return [SetFollowup(handle, expect=True)]

    def guardrail_passed(self, response_id: str) -> list[Action]:
        """The final guardrail check of a finished response passed: its chain ends here."""
        handle = self._guard_pending.pop(response_id, None)
        return [SetFollowup(handle)] if handle is not None else _EMPTY

    def guardrail_tripped(
        self, response_id: str, *, guardrail: str, note: str, info: Any = None, text: str = "",
        truncate: tuple[str, int] | None = None, now: float,
    ) -> list[Action]:
        """An output guardrail tripped on ``response_id``: cut it off and ask for one correction.

        Once per response (later trips of it are ignored). Cancels it by id if
        it still runs and nobody cancels it yet, truncates ``truncate = (item_id,
        audio_end_ms)`` (what was played) if the item is in the conversation,
        both at the head of the lane; then queues ``note`` as a system message
        and one corrective ``response.create`` as one gated unit, so it goes
        out after the cancelled response's ``response.done``. A correction that
        trips in turn is corrected at most :attr:`max_corrections` times in a row.
        """
        if response_id in self._tripped or self._closed is not None:
            return _EMPTY
        self._tripped[response_id] = None
        while len(self._tripped) > RECENT_DONE_IDS:
            self._tripped.popitem(last=False)
        self.guardrail_trips += 1
        actions: list[Action] = []
        rec = self._responses.get(response_id)
        agent = rec.agent if rec is not None else None
        if rec is not None and not rec.cancel_sent and response_id not in self._finished:
            rec.cancel_sent = True
            actions.append(_cancel_send(response_id))
        actions.extend(self._truncate_sends(truncate))
        request_eid = rec.request.event_id if rec is not None and rec.request is not None else None
        # A correction's depth is known by its create's event id while it streams, by its response id once done.
        depth = self._correction_depth.get(request_eid if request_eid is not None else response_id, 0)
        corr = None
        if depth < self.max_corrections:
            corr = self._new_handle({}, True)
            item = {"id": new_event_id("item_rtq_"), "type": "message", "role": "system",
                    "content": [{"type": "input_text", "text": note}]}
            eid = new_event_id()
            self._correction_depth[eid] = depth + 1
            while len(self._correction_depth) > RECENT_DONE_IDS:
                self._correction_depth.popitem(last=False)
            note_event = {"type": "conversation.item.create", "event_id": new_event_id(), "item": item}
            actions += self.create_response({}, corr, now=now, event_id=eid, prelude=(note_event,))
            self.corrections += 1
            pending = self._guard_pending.pop(response_id, None)
            if pending is not None:  # done already: its waiters follow on to the correction
                actions.append(SetFollowup(pending, corr))
            elif rec is not None:
                self._corrections[response_id] = corr  # linked at its response.done
        else:
            pending = self._guard_pending.pop(response_id, None)
            if pending is not None:
                actions.append(SetFollowup(pending))
        actions.append(Publish("guardrail.tripped", {
            "kind": "output", "guardrail": guardrail, "response_id": response_id, "agent": agent, "info": info,
            "text": text, "note": note, "corrected": corr is not None, "correction": corr}))
        return actions

    def input_tripped(
        self, item_id: str | None, *, guardrail: str, info: Any = None, text: str = "",
        refusal: str | None = None, active: str | None = None, truncate: tuple[str, int] | None = None,
        now: float,
    ) -> list[Action]:
        """An input guardrail tripped on a user item (a transcript): block what answers it.

        Cancels ``active`` (the in-band response running now, which server VAD
        started for this speech) unless someone cancels it already, truncates
        what was played of it, deletes the user's item from the conversation,
        and, with a ``refusal``, queues one response saying it (gated).
        """
        if self._closed is not None:
            return _EMPTY
        self.guardrail_trips += 1
        actions: list[Action] = []
        rec = self._responses.get(active) if active is not None else None
        if rec is not None and active is not None and not rec.cancel_sent and active not in self._finished:
            rec.cancel_sent = True
            self._tripped[active] = None
            actions.append(Send({"type": "response.cancel", "event_id": new_event_id(),
                                 "response_id": active}, front=True))
        if truncate is not None and truncate[0] in self.history:
            actions.append(Send({"type": "conversation.item.truncate", "event_id": new_event_id(),
                                 "item_id": truncate[0], "content_index": 0, "audio_end_ms": truncate[1]},
                                front=True))
        if item_id is not None and item_id in self.history:
            actions.append(Send({"type": "conversation.item.delete", "event_id": new_event_id(),
                                 "item_id": item_id}, front=True))
        handle = None
        if refusal is not None:
            handle = self._new_handle({}, True)
            actions += self.create_response({"instructions": refusal_instructions(refusal)}, handle, now=now)
        actions.append(Publish("guardrail.tripped", {
            "kind": "input", "guardrail": guardrail, "item_id": item_id, "info": info, "text": text,
            "cancelled": active if rec is not None else None, "refusal": handle}))
        return actions

    # -- tools and handoffs -------------------------------------------------------------------

    def will_follow_up(self, event: dict[str, Any]) -> bool:
        """Whether this ``response.done`` will start a tool chain with a follow-up create.

        The shell asks before the gate releases the response, so the gate can
        hold the slot for the follow-up (:meth:`ResponseGate.on_done` ``hold``).
        """
        resp = event.get("response")
        if self._closed is not None or not isinstance(resp, dict) or resp.get("status") != "completed":
            return False
        output = resp.get("output")
        return isinstance(output, list) and any(
            isinstance(i, dict) and _call_key(i) is not None and _call_key(i) not in self._handled for i in output)

    def _on_calls(self, response: Response, agent: str | None, handle: Any, turn: int, in_band: bool = True
                  ) -> list[Action]:
        calls: list[ToolCallSpec] = []
        for item in (*response.function_calls, *response.mcp_approval_requests):
            cid = _call_key(item)
            if cid is None or cid in self._handled:
                continue  # a call is handled once, ever
            self._handled[cid] = None
            while len(self._handled) > HANDLED_CALLS:
                self._handled.popitem(last=False)
            iid = item.get("id")
            label = item.get("server_label")
            calls.append(ToolCallSpec(cid, str(item.get("name") or ""), str(item.get("arguments") or ""),
                                      iid if isinstance(iid, str) else None,
                                      kind="function" if item.get("type") == "function_call" else "mcp_approval",
                                      server_label=label if isinstance(label, str) else None))
        if not calls or self._closed is not None:
            return _EMPTY
        if response.status != "completed":
            # An interrupted response's calls are answered "not run"; no follow-up. (An MCP
            # approval request of a cut response is left unanswered: the model asks again if it must.)
            reason = f"not run: the response was {response.status} before it finished"
            actions: list[Action] = []
            for call in calls:
                if call.kind != "function":
                    continue
                actions.append(self._output(call.call_id, json.dumps({"error": reason})))
                actions.append(Publish("tool.skipped", {"call_id": call.call_id, "name": call.name,
                                                              "reason": reason, "response_id": response.id}))
            return actions
        handoff_call = target = None
        for call in calls:
            dest = self._handoff_dest(call.name, agent)
            if dest is not None and handoff_call is None:
                handoff_call, target = call.call_id, dest.name
        job = ToolJob(response.id, agent, tuple(calls), handoff_call, target, in_band)
        self._jobs[response.id] = (job, handle, turn, response.status)
        # The promise of a follow-up first: the worker may finish before RunTools is applied.
        out: list[Action] = [SetFollowup(handle, expect=True)] if handle is not None else []
        out.append(RunTools(job))
        return out

    def tool_results(
        self,
        response_id: str,
        outputs: Mapping[str, str],
        *,
        handoff_config: dict[str, Any] | None = None,
        handoff_error: BaseException | None = None,
        now: float,
    ) -> list[Action]:
        """The tool worker finished ``response_id``'s job.

        ``outputs`` maps call id to the output string of every function tool
        call. For a handoff call, ``handoff_config`` is the target's rendered
        session config, or ``handoff_error`` why it could not be rendered.
        Queued in one step: every output (call order), then the handoff's
        ``session.update`` (only if the target resolved), then one follow-up
        ``response.create`` (unless the user started a new turn meanwhile).
        """
        entry = self._jobs.pop(response_id, None)
        if entry is None:
            return _EMPTY
        job, handle, turn, _status = entry
        if self._closed is not None:
            return [SetFollowup(handle)] if handle is not None else _EMPTY
        current = self._agent.name if self._agent is not None else None
        if job.handoff_call is not None and current != job.agent:
            # The app handed off meanwhile: this stale transfer must not override it.
            handoff_error = handoff_error or RuntimeError(f"the conversation was already transferred to {current}")
        actions: list[Action] = []
        target = self.graph.get(job.handoff_target) if self.graph is not None and job.handoff_target else None
        transferred = target is not None and handoff_config is not None and handoff_error is None
        for call in job.calls:
            if call.call_id == job.handoff_call:
                if transferred:
                    output = json.dumps({"assistant": job.handoff_target, "status": "transferred"})
                else:
                    why = f"{type(handoff_error).__name__}: {handoff_error}" if handoff_error else "unknown agent"
                    output = json.dumps({"error": f"transfer to {job.handoff_target} failed ({why}); "
                                                  "the conversation stays with you"})
            elif job.handoff_target is not None and self._is_handoff(call.name, job.agent):
                output = json.dumps({"error": "only one handoff per response; this one was not done"})
            elif call.kind == "mcp_approval":
                actions.append(self._mcp_answer(call, outputs.get(call.call_id)))
                continue
            else:
                output = outputs.get(call.call_id) or json.dumps({"error": f"tool {call.name} gave no output"})
            actions.append(self._output(call.call_id, output))
        if job.handoff_call is not None:
            if transferred:
                assert target is not None and handoff_config is not None
                actions += self._switch(target, handoff_config, call_id=job.handoff_call, response_id=response_id)
            else:
                actions.append(Publish("agent.handoff_failed", {
                    "source": job.agent, "target": job.handoff_target, "call_id": job.handoff_call,
                    "response_id": response_id, "error": handoff_error,
                    "message": str(handoff_error) if handoff_error else "unknown agent",
                }))
        if self.turn_seq != turn:
            actions.append(Publish("turn.followup_skipped", {"response_id": response_id,
                                                                   "reason": "the user started a new turn"}))
            actions.append(ReleaseHold(response_id))
            if handle is not None:
                actions.append(SetFollowup(handle))
            return _to_front(actions)
        follow = self._new_handle({}, True)
        if not job.in_band:
            # An out-of-band response's chain holds no gate slot, so its follow-up queues like any create:
            # at the head it would block an in-band chain's follow-up that ends the hold it waits for.
            actions = _to_front(actions)
            actions += self.create_response({}, follow, now=now)
            if handle is not None:
                actions.append(SetFollowup(handle, follow))
            return actions
        actions += self.create_response({}, follow, now=now, holder=response_id)
        if handle is not None:
            actions.append(SetFollowup(handle, follow))
        return _to_front(actions)

    def _mcp_answer(self, call: ToolCallSpec, decision: str | None) -> Send:
        """The ``mcp_approval_response`` item for an approval request (``decision``: JSON from the worker)."""
        try:
            parsed = json.loads(decision) if decision else {}
        except ValueError:
            parsed = {}
        approve = bool(parsed.get("approve", False)) if isinstance(parsed, dict) else False
        item: dict[str, Any] = {"type": "mcp_approval_response", "approval_request_id": call.call_id,
                                "approve": approve}
        reason = parsed.get("reason") if isinstance(parsed, dict) else None
        if isinstance(reason, str) and reason:
            item["reason"] = reason
        return Send({"type": "conversation.item.create", "event_id": new_event_id(), "item": item})

    def _is_handoff(self, name: str, agent: str | None) -> bool:
        return self._handoff_dest(name, agent) is not None

    def _handoff_dest(self, name: str, agent: str | None) -> Agent | None:
        """The agent ``name`` transfers to from ``agent``, if it is one of its handoff tools."""
        graph = self.graph
        if graph is None or agent is None or agent not in graph:
            return None
        return graph.handoff_target(name, agent)

    def _output(self, call_id: str, output: str) -> Send:
        eid = new_event_id()
        # Kept until a reconnect needs it: sent on a socket that died before echoing it, it is re-seeded.
        self._outputs[call_id] = (eid, output)
        while len(self._outputs) > RECENT_OUTPUTS:
            self._outputs.popitem(last=False)
        return Send({"type": "conversation.item.create", "event_id": eid,
                     "item": {"type": "function_call_output", "call_id": call_id, "output": output}})

    def _note_formats(self, session: Mapping[str, Any]) -> None:
        """Adopt the audio formats a session object names (fields it leaves out keep their value)."""
        audio = session.get("audio")
        if not isinstance(audio, Mapping):
            return
        for direction in ("input", "output"):
            part = audio.get(direction)
            fmt = part.get("format") if isinstance(part, Mapping) else None
            if fmt is None:
                continue
            try:
                value = format_of(fmt)
            except InvalidArgument:
                continue  # a format we do not know: keep the last one we can count in
            if direction == "input":
                self.input_format = value
            else:
                self.output_format = value

    def _format_fields(self) -> dict[str, Any]:
        """The audio formats the app asked for, to repeat in every agent's ``session.update``.

        The server merges a partial update, but a peer SDK lost the G.711 format
        on handoffs (static on the phone line); naming it costs nothing.
        """
        audio = self.desired.get("audio")
        out: dict[str, Any] = {}
        if isinstance(audio, Mapping):
            for direction in ("input", "output"):
                part = audio.get(direction)
                if isinstance(part, Mapping) and "format" in part:
                    out[direction] = {"format": part["format"]}
        return out

    def _switch(self, target: Agent, config: dict[str, Any], **info: Any) -> list[Action]:
        config = dict(config)
        actions: list[Action] = []
        formats = self._format_fields()
        if formats:
            config["audio"] = deep_merge(config.get("audio") or {}, formats)
        voice = self.voice()
        if target.voice and target.voice != voice:
            if self.produced_audio:
                actions.append(Publish("agent.voice_kept", {"agent": target.name, "requested": target.voice,
                                                                  "voice": voice}))
            else:
                config["audio"] = deep_merge(config.get("audio") or {}, {"output": {"voice": target.voice}})
        eid = new_event_id()
        self.desired = deep_merge(self.desired, config)
        self._updates.append(_PendingUpdate(eid, target.name, previous=self._agent))
        source = self._agent
        self._agent = target
        self.handoffs += 1
        actions.insert(0, Send({"type": "session.update", "event_id": eid, "session": config}))
        actions.append(Publish("agent.handoff", {"source": source.name if source else None,
                                                       "target": target.name, **info}))
        return actions

    # -- connection ------------------------------------------------------------------------

    def connection_lost(self, dropped: Iterable[tuple[str | None, str | None, bool]]) -> tuple[list[Action], int,
                                                                                              list[Send]]:
        """The socket died and a new one will be tried. ``dropped`` are the gate's entries
        ``(event_id, response_id, pending)``.

        Creates sent but not started are re-issued (returned, to go to the
        head of the lane, with their turn's item if the server never announced
        it); responses that were streaming fail with :class:`ConnectionLost`
        (their handles and waiters). Returns ``(actions, failed, reissue)``.
        """
        actions: list[Action] = []
        reissue: list[Send] = []
        failed = 0
        self.speaking = False  # the new session's VAD has heard nothing yet
        lost = ConnectionLost("the connection dropped while this response was streaming; it cannot be resumed")
        for eid, _rid, pending in dropped:
            req = self._requests.get(eid) if eid is not None else None
            if req is not None and pending and req.phase is Phase.QUEUED:
                req.move("reissue")
                req.prelude = tuple(p for p in req.prelude if not self._item_known(p))
                reissue.append(self._send_for(req, front=True))
        for rid, rec in list(self._responses.items()):
            del self._responses[rid]
            self.note_finished(rid)  # the new socket does not know it: a cancel queued for it is moot
            req = rec.request
            if req is not None and req.phase is Phase.CREATED:
                req.move("fail")
                self._requests.pop(req.event_id, None)
                actions.append(Fail(req.handle, _copy(lost)))
                failed += 1
            for w in rec.waiters:
                actions.append(Fail(w, ConnectionLost(f"the connection dropped before response.done for {rid}")))
        # Tool jobs of responses that ended still deliver their outputs (after the re-seed).
        return actions, failed, reissue

    def item_known(self, event: dict[str, Any]) -> bool:
        """Whether the item a ``conversation.item.create`` carries is in the conversation already."""
        return self._item_known(event)

    def _item_known(self, event: dict[str, Any]) -> bool:
        item = event.get("item")
        iid = item.get("id") if isinstance(item, dict) else None
        return isinstance(iid, str) and iid in self.history

    def reconnect_plan(self, *, reseed: bool, limit: int | None, queued: Iterable[str]) -> tuple[dict[str, Any],
                                                                                                list[dict[str, Any]],
                                                                                                dict[str, int]]:
        """The ``session.update`` and the re-seed items for a new socket.

        ``queued`` are the event ids still on the writer's lane: their
        ``session.update``\\ s are still to come; every other unanswered one is
        answered by this replay (the replayed config holds its fields).
        """
        still = set(queued)
        keep: deque[_PendingUpdate] = deque()
        settled: list[_PendingUpdate] = []
        for upd in self._updates:
            (keep if upd.event_id in still else settled).append(upd)
        eid = new_event_id()
        replay = _PendingUpdate(eid, self._agent.name if self._agent is not None else None)
        self._updates = deque([replay, *keep])
        self._replay_waiters += [u.waiter for u in settled if u.waiter is not None]
        config = json.loads(json.dumps(self.desired))
        seeds: list[dict[str, Any]] = []
        dropped: dict[str, int] = {}
        if reseed:
            items = self.history.items()
            echoed = {i.get("call_id") for i in items if i.get("type") == "function_call_output"}
            running = {c.call_id for job, _h, _t, _s in self._jobs.values() for c in job.calls}
            with_outputs: list[dict[str, Any]] = []
            for item in items:
                with_outputs.append(item)
                cid = item.get("call_id")
                unanswered = item.get("type") == "function_call" and isinstance(cid, str) and cid not in echoed
                sent = self._outputs.get(cid) if unanswered and isinstance(cid, str) else None
                if sent is not None and sent[0] not in still:
                    # Sent on the old socket, never echoed: carry it, or the call would dangle.
                    with_outputs.append({"type": "function_call_output", "call_id": cid, "output": sent[1]})

            def pending(cid: str) -> bool:  # its output is still to come: tools running, or output queued
                queued_output = self._outputs.get(cid)
                return cid in running or (queued_output is not None and queued_output[0] in still)

            plan, counts = reseed_plan(with_outputs, pending_calls=pending, limit=limit)
            seeds, dropped = plan, dict(counts)
        return {"type": "session.update", "event_id": eid, "session": config}, seeds, dropped

    def take_replay_waiters(self) -> list[Any]:
        """Update waiters the last replay answers (settle them with :attr:`session_config`)."""
        waiters, self._replay_waiters = self._replay_waiters, []
        return waiters

    def close(self, error: BaseException) -> list[Action]:
        """No more requests: fail every live request, waiter and follow-up (first error kept)."""
        if self._closed is None:
            self._closed = error
        actions: list[Action] = []
        for req in list(self._requests.values()):
            if req.phase in (Phase.QUEUED, Phase.CREATED):
                req.move("fail")
                actions.append(Fail(req.handle, _copy(error)))
        self._requests.clear()
        for rec in self._responses.values():
            for w in rec.waiters:
                actions.append(Fail(w, _copy(error)))
        self._responses.clear()
        for upd in self._updates:
            if upd.waiter is not None:
                actions.append(Fail(upd.waiter, _copy(error)))
        self._updates.clear()
        actions += [Fail(w, _copy(error)) for w in self._replay_waiters]
        self._replay_waiters = []
        for _job, handle, _turn, _status in self._jobs.values():
            if handle is not None:
                actions.append(SetFollowup(handle))
        self._jobs.clear()
        actions += [SetFollowup(h) for h in self._guard_pending.values()]
        self._guard_pending.clear()
        self._corrections.clear()
        return actions

    def evict(self, now: float, response_timeout: float, entries: Iterable[tuple[str | None, str | None, float]]
              ) -> list[Action]:
        """Give up on gate entries ``(event_id, response_id, since)`` older than ``response_timeout``.

        The shell releases them from the gate; here their requests and
        waiters fail, and the app hears ``gate.evicted``.
        """
        actions: list[Action] = []
        for eid, rid, since in entries:
            if now - since < response_timeout:
                continue
            error = ResponseError(
                f"response {rid or eid} had no response.done within {response_timeout}s; "
                "cancelled and released from the gate"
            )
            rec = self._responses.pop(rid, None) if rid is not None else None
            req = rec.request if rec is not None else (self._requests.get(eid) if eid is not None else None)
            if req is not None and req.phase in (Phase.QUEUED, Phase.CREATED):
                req.move("fail")
                self._requests.pop(req.event_id, None)
                actions.append(Fail(req.handle, error))
            for w in rec.waiters if rec is not None else ():
                actions.append(Fail(w, error))
            actions.append(Publish("gate.evicted", {"response_id": rid, "event_id": eid,
                                                          "age_s": now - since}))
        return actions

    # -- internals -----------------------------------------------------------------------

    def _send_for(self, req: Request, *, front: bool = False) -> Send:
        return Send(req.event, req.handle, gated=req.in_band, oob=not req.in_band, front=front,
                    deadline=req.deadline, prelude=req.prelude, untagged=req.untagged, holder=req.holder)


#: Server event types the core acts on (deltas aside); every other type passes through.
HANDLED_TYPES = _HANDLED | _TEXT_DELTAS | {"response.output_audio.delta"}


# -- helpers -------------------------------------------------------------------------------


def response_ids(event: dict[str, Any]) -> tuple[dict[str, Any], str, str | None]:
    """``(response, response id, our create's event id or None)`` of a ``response.*`` event.

    Raises :class:`~rtqueue.errors.ProtocolError` when the response has no id.
    """
    from .errors import ProtocolError

    resp = event.get("response")
    if not isinstance(resp, dict) or not isinstance(resp.get("id"), str):
        raise ProtocolError(f"{event['type']} without response.id", frame=str(event)[:200])
    meta = resp.get("metadata")
    eid = meta.get(METADATA_KEY) if isinstance(meta, dict) else None
    return resp, resp["id"], eid if isinstance(eid, str) else None


def _cancel_send(response_id: str) -> Send:
    """``response.cancel`` of ``response_id``, urgent (it jumps the control lane)."""
    return Send({"type": "response.cancel", "event_id": new_event_id(), "response_id": response_id}, front=True)


def _to_front(actions: list[Action]) -> list[Action]:
    """A tool chain's sends go to the head of the lane, in order: creates queued behind the gate's hold
    must not block the follow-up that ends it."""
    return [attrs.evolve(a, front=True) if isinstance(a, Send) else a for a in actions]


def deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated with ``extra``, merging nested dicts (neither is changed)."""
    out = dict(base)
    for k, v in extra.items():
        old = out.get(k)
        out[k] = deep_merge(old, v) if isinstance(v, Mapping) and isinstance(old, Mapping) else v
    return out


def _call_key(item: Mapping[str, Any]) -> str | None:
    """The id a tool chain answers: a function call's ``call_id``, an MCP approval request's item ``id``."""
    kind = item.get("type")
    key = item.get("call_id") if kind == "function_call" else item.get("id") if kind == "mcp_approval_request" else None
    return key if isinstance(key, str) else None


def b64_len(s: str) -> int:
    """Decoded length of a base64 string (no decoding)."""
    n = len(s)
    if n == 0:
        return 0
    return n * 3 // 4 - (2 if s.endswith("==") else 1 if s.endswith("=") else 0)


def _copy(err: BaseException) -> BaseException:
    """A fresh instance per handle, so tracebacks don't pile up on one object."""
    try:
        return type(err)(*err.args)
    except Exception:
        return err


def _reraisable(err: BaseException) -> BaseException:
    if isinstance(err, SessionClosed):
        return SessionClosed("the session is closed")
    if isinstance(err, RtqueueError):
        return _copy(err)
    return ConnectionLost(str(err))
