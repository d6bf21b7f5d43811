"""A call worker: one process hosting many OpenAI SIP calls, each in its own thread, with its agents.

``rtqueue serve myapp:make_agents`` (or :class:`CallWorker` from Python)::

    OpenAI --POST realtime.call.incoming--> worker /webhook  (loopback HTTP, or a router)
        verify (rtqueue.sip.verify_webhook) -> admit (capacity, drain) -> a call thread:
            CallControl.accept(call_id, agent=...) -> Session.connect(call_id=..., agent=...)
            every response.done / handoff: a Checkpoint into the store
        over capacity: CallControl.reject(call_id, 486); draining: 503

- **The app** is a function ``make_agents(call: CallInfo) -> Agent | CallApp``
  called once per call (and again when a call is resumed on this worker), so
  per-call tools (:func:`rtqueue.sip.refer_tool`, :func:`~rtqueue.sip.hangup_tool`)
  can be built with ``call.control`` and ``call.call_id``.
- **Worker-driven turns** (default): the call is accepted with server VAD's
  ``create_response`` off and the worker asks for a response on each
  ``input_audio_buffer.committed``. The server therefore never starts a
  response while no worker is attached (a tool call made then would have
  nobody to answer it); after a worker dies, the caller's turn waits for the
  re-attach instead of being answered half-way.
- **Checkpoints** (:class:`~rtqueue.callstate.Checkpoint`) are written to a
  :class:`CheckpointStore` at each response's end, each handoff, and each
  response the worker asks for. :meth:`CallWorker.resume_call` continues a
  call from its checkpoint: re-attach with ``?call_id=`` as the agent that was
  speaking, probe whether the call's server session still holds the
  conversation (``conversation.item.retrieve`` of the newest item; re-seed
  the items if not), answer the handoffs and tool calls nobody answered, then
  ask for one response.
- **Health and load**: :meth:`CallWorker.load` (calls active, capacity,
  done, failed, rejected, resumed, CPU seconds, RSS, threads) and, with
  :meth:`CallWorker.serve_http`, ``GET /healthz`` and ``GET /load`` on
  127.0.0.1 next to ``POST /webhook``.
- **Drain**: :meth:`CallWorker.drain` refuses new calls (503) and waits for
  the calls it has to end; :meth:`CallWorker.close` detaches from the calls
  still up (they stay up on OpenAI's side and can be resumed elsewhere) and
  ends every thread the worker started.

Threads: ``rtqueue-serve-call-<worker>-<n>`` per call, ``rtqueue-serve-http``
plus ``rtqueue-serve-http-req`` per request. User code (the app factory,
tools re-run on resume) runs on a call thread, never under the worker's lock.
"""

from __future__ import annotations

import http.server
import importlib
import itertools
import json
import logging
import os
import resource
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import attrs

from .agents import Agent, AgentGraph, resolve_agents
from .callstate import (
    UNAVAILABLE,
    Checkpoint,
    PendingTool,
    WorkerLoad,
    admit,
    make_checkpoint,
    resume_plan,
)
from .errors import InvalidArgument, RtqueueError, WebhookVerificationError
from .handles import ResponseHandle
from .history import reseed_plan
from .httpreply import ReplyHandler
from .protocol import new_event_id
from .reconnect import ReconnectPolicy
from .secrets import Secret
from .session import Session
from .sip import CallControl, IncomingCall, verify_webhook
from .values import Event

__all__ = [
    "CallApp",
    "CallInfo",
    "CallWorker",
    "CheckpointStore",
    "HealthServer",
    "MemoryCheckpointStore",
    "load_app",
]

log = logging.getLogger("rtqueue.serve")

_PROBE_TIMEOUT = 3.0  # seconds to wait for the server's answer to the resume probe
_QUIET_S = 0.3  # seconds of no response events that count as "nothing streaming" after a re-attach
_BUSY_MAX_S = 30.0  # at most this long for a response found streaming at re-attach to end
_MAX_BODY = 1 << 20


# -- checkpoint stores ------------------------------------------------------------------------------


class CheckpointStore(Protocol):
    """Where a worker keeps its calls' checkpoints; any thread may call it.

    ``put`` must not block for long (it runs at each turn end on a session's
    callback thread) and keeps, per call, the checkpoint with the highest
    ``seq``; ``get`` returns the latest or ``None``; ``delete`` forgets a
    call (it ended).
    """

    def put(self, checkpoint: Checkpoint) -> None: ...

    def get(self, call_id: str) -> Checkpoint | None: ...

    def delete(self, call_id: str) -> None: ...


class MemoryCheckpointStore:
    """A :class:`CheckpointStore` in this process's memory (tests, one-process deployments)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: dict[str, Checkpoint] = {}
        self.puts = 0

    def put(self, checkpoint: Checkpoint) -> None:
        """Keep ``checkpoint`` unless a newer one (higher ``seq``) of the same call is kept."""
        with self._lock:
            self.puts += 1
            old = self._data.get(checkpoint.call_id)
            if old is None or checkpoint.seq >= old.seq:
                self._data[checkpoint.call_id] = checkpoint

    def get(self, call_id: str) -> Checkpoint | None:
        """The latest checkpoint of ``call_id``, or ``None``."""
        with self._lock:
            return self._data.get(call_id)

    def delete(self, call_id: str) -> None:
        """Forget ``call_id``."""
        with self._lock:
            self._data.pop(call_id, None)

    def call_ids(self) -> list[str]:
        """The calls with a checkpoint."""
        with self._lock:
            return list(self._data)


# -- the app ------------------------------------------------------------------------------------------


@attrs.frozen
class CallInfo:
    """What the app's factory gets for one call.

    ``incoming`` is the verified webhook (``None`` when the call is resumed
    from a checkpoint: the webhook went to another worker); ``control``
    is the worker's :class:`~rtqueue.sip.CallControl` (for per-call refer and
    hang-up tools).
    """

    call_id: str
    incoming: IncomingCall | None
    control: CallControl
    resumed: bool = False


@attrs.frozen
class CallApp:
    """A call's agents and how to start it (what the factory returns, or just the start :class:`Agent`).

    ``greeting``: instructions of the first response (``None``: wait for the
    caller). ``session``: raw GA session fields for the accept, merged last.
    """

    agent: Agent
    agents: tuple[Agent, ...] = attrs.field(default=(), converter=tuple)
    context: Any = None
    greeting: str | None = "Greet the caller."
    session: Mapping[str, Any] | None = None


AppFactory = Callable[[CallInfo], "Agent | CallApp"]


def load_app(spec: str) -> AppFactory:
    """The factory named by ``"package.module:function"`` (imported now).

    Raises :class:`InvalidArgument` for a malformed spec, a missing module or
    attribute, or something not callable.
    """
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise InvalidArgument(f"the app must be 'module:function', not {spec!r}")
    module_name, attr = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InvalidArgument(f"app {spec}: cannot import {module_name!r}: {exc}") from exc
    func = getattr(module, attr, None)
    if not callable(func):
        raise InvalidArgument(f"app {spec}: {module_name} has no callable {attr!r}")
    return func  # type: ignore[no-any-return]


def _as_app(value: object, where: str) -> CallApp:
    if isinstance(value, CallApp):
        return value
    if isinstance(value, Agent):
        return CallApp(value)
    raise RtqueueError(f"{where} must return an rtqueue.Agent or rtqueue.serve.CallApp, not {type(value).__name__}")


# -- the worker ----------------------------------------------------------------------------------------


@attrs.define(eq=False)
class _Call:
    """One call on this worker (fields written by its thread; read under the worker's lock)."""

    call_id: str
    incoming: IncomingCall | None
    resume: Checkpoint | None
    received_at: float  # monotonic, when the worker took the call
    thread: threading.Thread | None = None
    session: Session | None = None
    ended: threading.Event = attrs.Factory(threading.Event)
    attached: threading.Event = attrs.Factory(threading.Event)
    finished: threading.Event = attrs.Factory(threading.Event)
    summary: dict[str, Any] = attrs.Factory(dict)
    # The checkpoint's parts: only the call's own callbacks and thread touch these, under _ck_lock.
    ck_lock: threading.Lock = attrs.Factory(threading.Lock)
    carried: list[dict[str, Any]] = attrs.Factory(list)
    seq: int = 0
    attach_count: int = 1
    greeted: bool = False
    intents: list[tuple[str, ResponseHandle]] = attrs.Factory(list)
    reissued: int = 0


class CallWorker:
    """Hosts many SIP calls, one thread each; see the module doc.

    ``app`` builds each call's agents. ``realtime_url`` is the Realtime
    WebSocket URL (default OpenAI's; a :class:`~rtqueue.Simulator`'s ``url``);
    ``control_base_url`` the call-control REST base (``Simulator.http_base_url``).
    ``api_key`` (or ``$OPENAI_API_KEY``) serves both. ``webhook_secret``
    (``whsec_...``) verifies webhooks given to :meth:`handle_webhook`.
    ``capacity`` bounds the calls hosted at once; ``store`` keeps checkpoints
    (default: a :class:`MemoryCheckpointStore`); ``name`` labels threads,
    checkpoints and load figures. ``worker_turns``: see the module doc.
    ``clock`` gives the wall time written into checkpoints.
    """

    def __init__(
        self,
        app: AppFactory,
        *,
        realtime_url: str | None = None,
        control_base_url: str | None = None,
        api_key: str | Secret | None = None,
        webhook_secret: str | Secret | None = None,
        capacity: int = 50,
        store: CheckpointStore | None = None,
        name: str = "worker",
        worker_turns: bool = True,
        model: str = "gpt-realtime",
        connect_timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not callable(app):
            raise InvalidArgument("app must be a callable taking a CallInfo (see rtqueue.serve.load_app)")
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise InvalidArgument(f"capacity must be an int >= 1, not {capacity!r}")
        if not isinstance(name, str) or not name:
            raise InvalidArgument("name must be a non-empty str")
        self._app = app
        self.name = name
        self.capacity = capacity
        self._url = realtime_url
        self._api_key = api_key
        self._secret = webhook_secret
        self._store: CheckpointStore = store if store is not None else MemoryCheckpointStore()
        self._worker_turns = worker_turns
        self._model = model
        self._connect_timeout = connect_timeout
        self._clock = clock
        self.control = CallControl(api_key=api_key, base_url=control_base_url)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._calls: dict[str, _Call] = {}
        self._numbers = itertools.count(1)
        self._draining = False
        self._closed = False
        self._done = 0
        self._failed = 0
        self._rejected = 0
        self._resumed = 0
        self._attach_ms: list[float] = []
        self._resume_ms: list[float] = []
        self._intents = {"fulfilled": 0, "cut": 0, "lost": 0, "carried": 0}
        self._http: HealthServer | None = None

    def __repr__(self) -> str:
        return f"<rtqueue.serve.CallWorker {self.name} {self.load().active}/{self.capacity}>"

    def __enter__(self) -> CallWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def store(self) -> CheckpointStore:
        """The checkpoint store."""
        return self._store

    # -- taking calls --------------------------------------------------------------------------

    def handle_webhook(self, body: bytes | str, headers: Any) -> tuple[int, str]:
        """A webhook delivery: verify, then take or refuse the call. Returns ``(HTTP status, text)``.

        400 for a delivery that fails verification (the sender retries or
        gives up), 200 otherwise: a call over capacity or during a drain is
        rejected with its SIP status (486 / 503) through call control, which
        *is* the answer to the delivery.
        """
        if self._secret is None:
            return 500, "no webhook secret configured"
        try:
            incoming = verify_webhook(body, headers, self._secret)
        except WebhookVerificationError as exc:
            return 400, f"webhook rejected ({exc.reason})"
        taken, status, reason = self.take_call(incoming)
        if taken:
            return 200, "accepted"
        self._reject(incoming.call_id, status)
        return 200, f"rejected {status}: {reason}"

    def take_call(self, incoming: IncomingCall) -> tuple[bool, int | None, str]:
        """Host a verified call if there is room: ``(True, None, "")``, else ``(False, sip_status, why)``.

        On success the call's thread accepts it and attaches; the caller of
        this method does not wait for that. A refused call is *not* rejected
        here (a router may place it elsewhere): :meth:`handle_webhook` does.
        """
        return self._start(incoming.call_id, incoming, None)

    def resume_call(self, call_id: str, checkpoint: Checkpoint | None = None) -> tuple[bool, int | None, str]:
        """Continue ``call_id`` (accepted elsewhere, its worker gone) from its checkpoint.

        ``checkpoint`` defaults to the store's. Refused like :meth:`take_call`
        when full or draining, or when no checkpoint exists.
        """
        cp = checkpoint if checkpoint is not None else self._store.get(call_id)
        if cp is None:
            return False, None, f"no checkpoint for {call_id}"
        return self._start(call_id, None, cp)

    def _start(self, call_id: str, incoming: IncomingCall | None, cp: Checkpoint | None
               ) -> tuple[bool, int | None, str]:
        with self._lock:
            verdict = admit(len(self._calls), self.capacity, draining=self._draining or self._closed)
            if not verdict.ok:
                self._rejected += 1
                return False, verdict.status, verdict.reason
            if call_id in self._calls:
                return True, None, "already hosted"  # a retried delivery of a call we have
            call = _Call(call_id, incoming, cp, time.monotonic())
            if cp is not None:
                call.carried = [dict(i) for i in cp.items]
                call.seq = cp.seq
                call.attach_count = cp.attach_count + 1
                call.greeted = cp.greeted
            call.thread = threading.Thread(target=self._run, args=(call,), daemon=True,
                                           name=f"rtqueue-serve-call-{self.name}-{next(self._numbers)}")
            self._calls[call_id] = call
            call.thread.start()
        return True, None, ""

    def _reject(self, call_id: str, status: int | None) -> None:
        try:
            self.control.reject(call_id, status_code=status or UNAVAILABLE)
        except RtqueueError as exc:  # the call may have gone meanwhile: nothing else to do
            log.warning("%s: reject %s failed: %s", self.name, call_id, exc)

    # -- one call (its thread) -------------------------------------------------------------------

    def _run(self, call: _Call) -> None:
        outcome = "failed"
        try:
            outcome = self._host(call)
        except Exception as exc:
            log.warning("%s: call %s failed: %s", self.name, call.call_id, exc, exc_info=True)
            call.summary["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            session = call.session
            if session is not None:
                session.close()
            intents = self._settle_intents(call)
            with self._lock:
                self._calls.pop(call.call_id, None)
                if outcome == "done":
                    self._done += 1
                elif outcome == "failed":
                    self._failed += 1
                for key, n in intents.items():
                    self._intents[key] += n
                self._changed.notify_all()
            if outcome == "done":
                self._store.delete(call.call_id)
            call.summary.update(outcome=outcome, worker=self.name, intents=intents, reissued=call.reissued)
            call.finished.set()
            call.attached.set()  # wake wait_attached() of a call that never attached

    def _host(self, call: _Call) -> str:
        info = CallInfo(call.call_id, call.incoming, self.control, resumed=call.resume is not None)
        app = _as_app(self._app(info), "the app factory")
        graph = resolve_agents(app.agent, app.agents)
        agents = [graph[n] for n in graph]
        if call.resume is None:
            self.control.accept(call.call_id, agent=app.agent, agents=app.agents, context=app.context,
                                model=self._model, session=self._accept_session(app))
        plan = resume_plan(call.resume, _handoff_names(graph, call.resume.agent)) if call.resume else None
        start = graph.agent(plan.agent) if plan is not None and plan.agent is not None and plan.agent in graph \
            else app.agent
        if self._closed:
            return "detached"
        session = Session.connect(
            self._url, api_key=self._api_key, model=self._model, call_id=call.call_id, agent=start, agents=agents,
            context=app.context, name=f"{self.name}-{call.call_id[-8:]}", connect_timeout=self._connect_timeout,
            # The call's server session keeps its conversation across sockets: a reconnect
            # re-attaches and re-configures, re-creating items would only earn "already exists".
            reconnect=ReconnectPolicy(max_attempts=4, reseed=False),
        )
        call.session = session
        session.on("session.closed", lambda _e: call.ended.set())
        session.on("response.done", lambda _e: self._checkpoint(call))
        session.on("agent.handoff", lambda _e: self._checkpoint(call))
        if self._worker_turns:
            session.on("input_audio_buffer.committed", lambda _e: self._respond(call, "turn"))
        attached = (time.monotonic() - call.received_at) * 1000
        with self._lock:
            (self._resume_ms if plan is not None else self._attach_ms).append(attached)
            if plan is not None:
                self._resumed += 1
        call.summary.update(attached_ms=attached, attached_at=self._clock(), attachments=call.attach_count)
        call.attached.set()
        if plan is not None:
            self._resume(call, session, graph, plan)
        elif app.greeting is not None:
            call.greeted = True
            self._respond(call, "greeting", instructions=app.greeting)
        else:
            self._checkpoint(call)
        while not call.ended.wait(0.25):
            if session.closed or self._closed:
                break
        return "detached" if self._closed and not session.closed else "done"

    def _accept_session(self, app: CallApp) -> dict[str, Any] | None:
        extra = dict(app.session or {})
        if not self._worker_turns:
            return extra or None
        audio = dict(extra.get("audio") or {})
        audio_in = dict(audio.get("input") or {})
        td = dict(audio_in.get("turn_detection") or {"type": "server_vad"})
        td.setdefault("interrupt_response", True)
        td["create_response"] = False  # the worker answers each committed turn (see the module doc)
        audio_in["turn_detection"] = td
        audio["input"] = audio_in
        extra["audio"] = audio
        return extra

    def _respond(self, call: _Call, why: str, **params: Any) -> None:
        session = call.session
        if session is None or session.closed:
            return
        try:
            handle = session.create_response(**params)
        except RtqueueError:  # the session just closed: the call is ending
            return
        with call.ck_lock:
            call.intents.append((why, handle))
        handle.add_done_callback(lambda _h: self._checkpoint(call))
        self._checkpoint(call)

    def _checkpoint(self, call: _Call) -> None:
        session = call.session
        if session is None:
            return
        try:
            items = session.items
            agent = session.agent
        except RtqueueError:
            return
        with call.ck_lock:
            call.seq += 1
            pending = tuple(why for why, h in call.intents if not h.done())
            cp = make_checkpoint(call.call_id, agent=agent.name if agent is not None else None, carried=call.carried,
                                 items=items, responses_pending=pending, seq=call.seq, now=self._clock(),
                                 worker=self.name, attach_count=call.attach_count, greeted=call.greeted)
        try:
            self._store.put(cp)
        except Exception as exc:  # a store outage must not end the call
            log.warning("%s: checkpoint of %s not stored: %s", self.name, call.call_id, exc)

    def _resume(self, call: _Call, session: Session, graph: AgentGraph, plan: Any) -> None:
        """Carry out a :class:`~rtqueue.callstate.ResumePlan` on the freshly attached session."""
        if plan.probe_item is not None and not self._server_has(session, plan.probe_item):
            seeds, _dropped = reseed_plan([dict(i) for i in plan.reseed])
            for seed in seeds:
                session.send({"type": "conversation.item.create", "item": seed})
        old_agent = call.resume.agent if call.resume is not None else None
        for pending, target in plan.handoffs:
            self._send_output(session, pending, json.dumps({"handed_off_to": target}))
        for pending in plan.tools:
            tool = _find_tool(graph, old_agent, pending.name)
            if tool is None:
                output = json.dumps({"error": f"tool {pending.name!r} is not available"})
            else:
                try:
                    output = tool.invoke(pending.arguments)
                except Exception as exc:  # the model hears about a failing tool, as in a session
                    output = json.dumps({"error": f"{type(exc).__name__}: {exc}"})
            self._send_output(session, pending, output)
        call.reissued = plan.reissued
        with self._lock:
            self._intents["carried"] += plan.reissued
        self._await_quiet(session)
        self._respond(call, "resume")

    @staticmethod
    def _await_quiet(session: Session) -> None:
        """Before the resume response: let a response that was streaming when we attached finish.

        The new socket never saw that response's ``response.created``, so the
        gate cannot know it holds the slot. Its events (deltas, ``done``) name
        it: if one shows within :data:`_QUIET_S`, wait (bounded) for its
        ``response.done``. A response still "thinking" at attach time can slip
        through; the gate then learns it from the one conflict it earns.
        """
        seen: set[str] = set()
        done: set[str] = set()
        changed = threading.Condition()

        def on_event(ev: Event) -> None:
            rid = ev.data.get("response_id") or (ev.data.get("response") or {}).get("id")
            if not isinstance(rid, str):
                return
            with changed:
                (done if ev.type == "response.done" else seen).add(rid)
                changed.notify_all()

        undo = session.on("*", on_event)
        try:
            with changed:
                changed.wait_for(lambda: bool(seen - done), _QUIET_S)
                changed.wait_for(lambda: not (seen - done), _BUSY_MAX_S)
        finally:
            undo()

    def _server_has(self, session: Session, item_id: str) -> bool:
        """Whether the call's server session holds ``item_id`` (``conversation.item.retrieve``)."""
        eid = new_event_id()
        answer: list[bool] = []
        got = threading.Event()

        def on_event(ev: Event) -> None:
            if ev.type == "conversation.item.retrieved" and (ev.data.get("item") or {}).get("id") == item_id:
                answer.append(True)
                got.set()
            elif ev.type == "error" and (ev.data.get("error") or {}).get("event_id") == eid:
                answer.append(False)
                got.set()

        undo = [session.on("conversation.item.retrieved", on_event), session.on("error", on_event)]
        try:
            session.send({"type": "conversation.item.retrieve", "event_id": eid, "item_id": item_id})
            # No answer in time: assume the server kept it (re-creating would duplicate turns).
            return answer[0] if got.wait(_PROBE_TIMEOUT) else True
        finally:
            for u in undo:
                u()

    @staticmethod
    def _send_output(session: Session, pending: PendingTool, output: str) -> None:
        event: dict[str, Any] = {"type": "conversation.item.create",
                                 "item": {"type": "function_call_output", "call_id": pending.call_id,
                                          "output": output}}
        if pending.item_id:
            # Right after its call: the caller may have spoken meanwhile, and an output after that
            # turn would read as the answer to it.
            event["previous_item_id"] = pending.item_id
        session.send(event)

    def _settle_intents(self, call: _Call) -> dict[str, int]:
        """Each response this worker asked for: fulfilled, cut (the call ended under it) or lost."""
        out = {"fulfilled": 0, "cut": 0, "lost": 0}
        with call.ck_lock:
            intents = list(call.intents)
        for _why, handle in intents:
            if not handle.done() or handle.error is not None:
                # The session closes when the call ends or the worker detaches: what it failed is cut.
                out["cut" if call.ended.is_set() or self._closed else "lost"] += 1
            else:
                out["fulfilled"] += 1
        return out

    # -- figures and lifecycle ------------------------------------------------------------------------

    def load(self) -> WorkerLoad:
        """Calls active, capacity, done, failed, rejected, resumed; CPU seconds, RSS (MB), threads."""
        with self._lock:
            active, draining = len(self._calls), self._draining or self._closed
            done, failed, rejected, resumed = self._done, self._failed, self._rejected, self._resumed
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return WorkerLoad(name=self.name, active=active, capacity=self.capacity, draining=draining, alive=True,
                          done=done, failed=failed, rejected=rejected, resumed=resumed,
                          cpu_s=round(usage.ru_utime + usage.ru_stime, 3), rss_mb=round(_rss_mb(), 1),
                          threads=threading.active_count())

    def stats(self) -> dict[str, Any]:
        """:meth:`load` plus attach latencies (ms, webhook taken -> session attached) and intents."""
        with self._lock:
            attach, resume, intents = list(self._attach_ms), list(self._resume_ms), dict(self._intents)
        return {**self.load().to_dict(), "attach_ms": attach, "resume_ms": resume, "intents": intents}

    def wait_call(self, call_id: str, timeout: float | None = None) -> dict[str, Any] | None:
        """Block until ``call_id`` ends on this worker; its summary, or ``None`` (unknown here, or timeout)."""
        with self._lock:
            call = self._calls.get(call_id)
        if call is None or not call.finished.wait(timeout):
            return None
        return dict(call.summary)

    def wait_attached(self, call_id: str, timeout: float | None = None) -> dict[str, Any] | None:
        """Block until ``call_id``'s session is attached (or the call is over); what is known of it then.

        ``None`` for a call not hosted here or a timeout. The dict has
        ``attached_ms`` / ``attached_at`` once attached, ``outcome`` once over.
        """
        with self._lock:
            call = self._calls.get(call_id)
        if call is None or not call.attached.wait(timeout):
            return None
        return dict(call.summary)

    def active_calls(self) -> list[str]:
        """The calls hosted now."""
        with self._lock:
            return list(self._calls)

    def drain(self, timeout: float | None = None) -> bool:
        """Take no more calls and wait until the hosted ones have ended; ``False`` on timeout."""
        with self._lock:
            self._draining = True
            return self._changed.wait_for(lambda: not self._calls, timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Detach from every call (each stays up on the service, resumable) and end every thread. Idempotent."""
        with self._lock:
            self._closed = True
            calls = list(self._calls.values())
        if self._http is not None:
            self._http.close()
        for call in calls:
            call.ended.set()
        deadline = time.monotonic() + timeout
        for call in calls:
            if call.thread is not None and call.thread is not threading.current_thread():
                call.thread.join(max(0.0, deadline - time.monotonic()))
        self.control.close()

    def threads(self) -> list[threading.Thread]:
        """The worker's own live threads (calls and HTTP)."""
        with self._lock:
            out = [c.thread for c in self._calls.values() if c.thread is not None and c.thread.is_alive()]
        if self._http is not None:
            out += self._http.threads()
        return out

    def serve_http(self, port: int = 0, host: str = "127.0.0.1") -> HealthServer:
        """Start the loopback HTTP endpoint (``/webhook``, ``/healthz``, ``/load``); returns it."""
        if self._http is None:
            self._http = HealthServer(self, host=host, port=port)
        return self._http


def _handoff_names(graph: AgentGraph, agent: str | None) -> dict[str, str]:
    if agent is None or agent not in graph:
        agent = graph.start.name
    return {tool: target.name for tool, target in graph.handoff_targets(agent).items()}


def _find_tool(graph: AgentGraph, agent: str | None, name: str) -> Any:
    names = ([agent] if agent is not None and agent in graph else []) + [n for n in graph if n != agent]
    for n in names:
        tool = graph.tool(n, name)
        if tool is not None:
            return tool
    return None


def _rss_mb() -> float:
    """This process's resident memory now (Linux ``/proc``; else the peak from getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 1e6
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


# -- the loopback HTTP endpoint ------------------------------------------------------------------------


class HealthServer:
    """``POST /webhook``, ``GET /healthz`` (200, or 503 while draining), ``GET /load`` (JSON) on loopback.

    Threads ``rtqueue-serve-http`` and one ``rtqueue-serve-http-req`` per
    request; :meth:`close` ends them all.
    """

    def __init__(self, worker: CallWorker, *, host: str = "127.0.0.1", port: int = 0) -> None:
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise InvalidArgument(f"the worker's HTTP endpoint binds to loopback only, not {host!r}")
        self._server = _Http((host, port), _Handler, worker)
        self.url = f"http://{host}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="rtqueue-serve-http", daemon=True)
        self._thread.start()

    @property
    def webhook_url(self) -> str:
        """Where the webhook goes (``.../webhook``)."""
        return self.url + "/webhook"

    def close(self) -> None:
        """Stop serving and join every thread. Idempotent."""
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)

    def threads(self) -> list[threading.Thread]:
        """Live threads of this endpoint."""
        return [t for t in [self._thread, *self._server.requests()] if t.is_alive()]


class _Http(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = True

    def __init__(self, address: tuple[str, int], handler: type[http.server.BaseHTTPRequestHandler],
                 worker: CallWorker) -> None:
        self.worker = worker
        self._reqs: list[threading.Thread] = []
        self._reqs_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(target=self.process_request_thread, args=(request, client_address),
                                  name="rtqueue-serve-http-req", daemon=True)
        with self._reqs_lock:
            self._reqs = [t for t in self._reqs if t.is_alive()] + [thread]
        thread.start()

    def requests(self) -> list[threading.Thread]:
        with self._reqs_lock:
            return list(self._reqs)

    def server_close(self) -> None:
        super().server_close()
        for t in self.requests():
            t.join(5.0)


class _Handler(ReplyHandler):
    server: _Http
    log_name = log.name

    def do_GET(self) -> None:
        worker = self.server.worker
        if self.path == "/healthz":
            load = worker.load()
            self.reply_json(503 if load.draining else 200, {"ok": not load.draining, "name": load.name,
                                                        "draining": load.draining})
        elif self.path == "/load":
            self.reply_json(200, worker.load().to_dict())
        else:
            self.reply_json(404, {"error": "not found"})

    def do_POST(self) -> None:
        if self.path != "/webhook":
            self.reply_json(404, {"error": "not found"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_BODY:
            self.reply_json(413, {"error": "too large"})
            return
        body = self.rfile.read(length)
        status, text = self.server.worker.handle_webhook(body, self.headers)
        self.reply_json(status, {"result": text})



def checkpoint_summary(checkpoints: Iterable[Checkpoint]) -> dict[str, int]:
    """Counts over checkpoints (calls, pending responses, pending tools) for health pages."""
    cps = list(checkpoints)
    return {"calls": len(cps), "responses_pending": sum(len(c.responses_pending) for c in cps),
            "tools_pending": sum(len(c.tools_pending) for c in cps)}
