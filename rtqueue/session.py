"""The public, synchronous session: one Realtime conversation over one WebSocket.

:class:`Session` is a facade. It checks every argument at the boundary (a bad
one raises :class:`~rtqueue.errors.InvalidArgument` before anything happens)
and hands the request to the conversation core through its threaded shell
(:mod:`rtqueue.core`, :mod:`rtqueue.shell`), where the protocol state and the
threads live. The mission's shape is unchanged: separate reader, writer and
audio threads share the lock-protected queue of active response ids (the
:class:`~rtqueue.gate.ResponseGate`), and the writer blocks in short timed
waits until it drains before it sends a ``response.create``.

One rule for every call after :meth:`Session.close`: it raises
:class:`~rtqueue.errors.SessionClosed` at once (after the connection failed
for good: that error, e.g. :class:`~rtqueue.errors.ConnectionLost`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from . import protocol
from .agents import Agent, resolve_agents, session_config_for
from .approvals import ApprovalBroker, ApprovalRequest
from .config import SessionConfig, merge_session
from .config import session_fields as split_session_fields
from .core import deep_merge
from .dispatch import DEFAULT_STREAM_SIZE, EventStream
from .errors import AudioFormatError, ConnectError, InvalidArgument, RtqueueError, SessionClosed
from .formats import AudioFormat, format_of
from .gate import ResponseGate
from .guardrails import InputGuardrail, InputGuardrailTripped, OutputGuardrail, check_list, refusal_instructions
from .handles import ResponseHandle, SendHandle, check_timeout
from .hosted_mcp import HostedMCP, check_servers
from .protocol import new_event_id
from .secrets import Secret
from .shell import SessionShell
from .tools import Tool
from .transport import Transport, WebSocketTransport
from .values import Event, Response

if TYPE_CHECKING:
    from .audio_session import AudioLink, Interruption
    from .dispatch import Dispatcher
    from .recording import Recorder
    from .usage import Usage
    from .writer import Writer

__all__ = ["Session"]

#: Client events that must not wait behind a held ``response.create``.
URGENT = frozenset({"response.cancel", "conversation.item.truncate", "output_audio_buffer.clear"})


class Session:
    """A connected Realtime session; create with :meth:`connect`.

    Every public method is thread-safe and returns promptly unless it says it
    blocks; blocking methods take a ``timeout``. Use as a context manager or
    call :meth:`close` (idempotent).
    """

    # -- construction ------------------------------------------------------------

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
        name: str | None = None,
    ) -> None:
        """Low-level constructor: prefer :meth:`connect`. Nothing starts until :meth:`start`."""
        for key, val in (("create_timeout", create_timeout), ("response_timeout", response_timeout),
                         ("gate_slice_s", gate_slice_s), ("tool_timeout", tool_timeout)):
            _positive(key, val)
        if isinstance(max_conflict_retries, bool) or not isinstance(max_conflict_retries, int) \
                or max_conflict_retries < 0:
            raise InvalidArgument(f"max_conflict_retries must be an int >= 0, not {max_conflict_retries!r}")
        if name is not None and not isinstance(name, str):
            raise InvalidArgument(f"name must be a str, not {type(name).__name__}")
        if not callable(transport_factory):
            raise InvalidArgument("transport_factory must be a zero-argument callable returning a Transport")
        self._shell = SessionShell(
            transport_factory,
            create_timeout=create_timeout,
            response_timeout=response_timeout,
            max_conflict_retries=max_conflict_retries,
            gate_slice_s=gate_slice_s,
            tool_timeout=tool_timeout,
            context=context,
            secret=secret,
            label=name,
        )
        self.name = self._shell.label
        self._call_id: str | None = None

    @classmethod
    def connect(
        cls,
        url: str | None = None,
        *,
        model: str = protocol.DEFAULT_MODEL,
        api_key: str | Secret | None = None,
        azure_endpoint: str | None = None,
        call_id: str | None = None,
        instructions: str | None = None,
        session: Mapping[str, Any] | None = None,
        config: SessionConfig | Mapping[str, Any] | None = None,
        agent: Agent | None = None,
        tools: Sequence[Tool] | None = None,
        agents: Iterable[Agent] = (),
        context: Any = None,
        voice: str | None = None,
        output_modalities: list[str] | None = None,
        turn_detection: str | Mapping[str, Any] | bool | None = True,
        audio: Any = None,
        audio_format: Any = None,
        connect_timeout: float = 10.0,
        create_timeout: float = 120.0,
        response_timeout: float = 300.0,
        tool_timeout: float = 30.0,
        max_conflict_retries: int = 20,
        reconnect: bool | Any = True,
        name: str | None = None,
        transport: Transport | Callable[[], Transport] | None = None,
        record: str | os.PathLike[str] | Recorder | None = None,
        record_audio: str = "kept",
        tracing: str | Mapping[str, Any] | None = None,
        output_guardrails: Sequence[OutputGuardrail] | None = None,
        input_guardrails: Sequence[InputGuardrail] | None = None,
        mcp: Sequence[HostedMCP] | None = None,
        approval_handler: Callable[[ApprovalRequest], Any] | None = None,
        approval_timeout: float = 60.0,
        approval_default: str = "reject",
    ) -> Session:
        """Connect, configure, and return a ready session.

        ``url`` (e.g. a :class:`~rtqueue.Simulator`'s) or OpenAI/Azure by
        ``model``/``azure_endpoint`` with ``api_key`` (or the environment).
        ``instructions``, ``voice``, ``output_modalities``, ``turn_detection``
        (``"server_vad"``, ``"semantic_vad"``, ``"push_to_talk"``/``None`` for
        manual commits, a dict, or ``True`` to keep the server's default) and
        ``session`` (raw GA session fields, merged last) make up the first
        ``session.update``, on top of ``config``: a typed
        :class:`~rtqueue.config.SessionConfig` (or its GA dict form, checked
        the same way) for everything else of the GA session (noise reduction,
        transcription, VAD details, truncation, prompt, ...). ``tools``
        (:class:`~rtqueue.Tool` objects) are function tools for a session
        without agents: rtqueue calls them and answers the model (an implicit
        agent named ``"assistant"`` owns them). ``agent``
        starts a multi-agent conversation (see :class:`~rtqueue.Agent`);
        ``context`` is handed to agent instructions and tools. ``audio=True``
        plays and records with the default devices, ``"null"`` uses
        device-less ones, or pass an :class:`~rtqueue.audio.AudioIO`.
        ``audio_format`` sets the session's audio format both ways
        (``"pcm16"``, ``"pcmu"``, ``"pcma"``, a GA format dict or an
        :class:`~rtqueue.formats.AudioFormat`), or per direction as a pair
        ``(input, output)``; every millisecond figure, the devices (which are
        transcoded to and from it) and every agent's ``session.update`` follow
        it.
        ``reconnect`` (``True``, ``False`` or a :class:`~rtqueue.ReconnectPolicy`;
        on by default) survives dropped sockets and ``session_expired``, and
        renews the session before the server's 60-minute cap, at a quiet moment
        (``ReconnectPolicy.recycle_after``; see :mod:`rtqueue.recycler`): the
        app keeps the same :class:`Session` and sees ``session.recycled``.

        ``transport`` replaces the WebSocket: a :class:`~rtqueue.transport.Transport`
        (used for the first connection only) or a zero-argument factory called for
        each connection, e.g. :class:`rtqueue.testing.MockTransport` for tests
        without sockets. ``url`` and the key are then ignored.

        ``record`` writes every frame both ways to a JSONL recording (a path, or
        a :class:`~rtqueue.recording.Recorder`), with the session's config,
        keys and auth headers redacted; ``record_audio="duration"`` replaces
        audio by its length. Replay it with ``rtqueue.Simulator(replay=...)``,
        draw it with ``rtqueue timeline``.

        ``output_guardrails`` / ``input_guardrails`` apply to every agent (each
        agent may add its own): see :mod:`rtqueue.guardrails`.

        ``mcp`` lists hosted MCP servers (:class:`~rtqueue.hosted_mcp.HostedMCP`)
        offered in every agent's tools. Tool calls that need approval (a tool's
        or agent's ``needs_approval``, a hosted MCP approval request) ask
        ``approval_handler(request)`` on the tool worker, or, without one,
        publish ``tool.approval_requested`` for :meth:`approve` /
        :meth:`reject`; after ``approval_timeout`` seconds
        ``approval_default`` (``"reject"`` or ``"approve"``) decides. See
        :mod:`rtqueue.approvals`.

        ``tracing`` sets the GA session's ``tracing`` field (``"auto"``, or a
        dict of ``workflow_name``, ``group_id``, ``metadata``): OpenAI's own
        traces of the session. rtqueue's OpenTelemetry spans (see
        :mod:`rtqueue.telemetry`) need no argument: they appear whenever
        ``opentelemetry-api`` is installed.

        ``call_id`` attaches to an accepted SIP call (see :mod:`rtqueue.sip`):
        the socket is ``wss://.../v1/realtime?call_id=...`` (added to ``url``'s
        query when one is given), the call's session is steered like any
        other (agents, tools, handoffs, gated responses; no audio frames: the
        call's audio stays with OpenAI), DTMF key presses arrive as
        ``input_audio_buffer.dtmf_event_received`` events, and
        :attr:`call_id` names the call. A reconnect re-attaches to the same
        call; once the call has ended the server refuses it and the session
        ends.

        Blocks until the server's ``session.created`` and the answer to our
        ``session.update`` arrived (``connect_timeout``). Raises
        :class:`~rtqueue.errors.ConnectError`, :class:`AuthenticationError`,
        :class:`ServerError` (the server refused the configuration) or
        :class:`InvalidArgument`; whatever it raises, nothing it started is
        left running.
        """
        from .reconnect import ReconnectPolicy

        for key, val, typ in (("instructions", instructions, str), ("voice", voice, str),
                              ("azure_endpoint", azure_endpoint, str)):
            if val is not None and not isinstance(val, typ):
                raise InvalidArgument(f"{key} must be a {typ.__name__}, not {type(val).__name__}")
        if session is not None and not isinstance(session, Mapping):
            raise InvalidArgument(f"session must be a dict of GA session fields, not {type(session).__name__}")
        _positive("connect_timeout", connect_timeout)
        if not (isinstance(reconnect, (bool, ReconnectPolicy))):
            raise InvalidArgument(f"reconnect must be True, False or a ReconnectPolicy, not {reconnect!r}")
        if agent is not None and not isinstance(agent, Agent):
            raise InvalidArgument(f"agent must be an rtqueue.Agent, not {type(agent).__name__}")
        if isinstance(agents, (str, bytes, Mapping)) or not isinstance(agents, Iterable):
            raise InvalidArgument("agents must be a list of rtqueue.Agent")
        extra = tuple(agents)
        if tools is not None:
            if agent is not None or extra:
                raise InvalidArgument("tools= is for a session without agents; give the tools to the Agent")
            # One implicit agent runs them: function tools need an owner to resolve and call them.
            agent = Agent("assistant", instructions=instructions or "", tools=tools)
        start = agent if agent is not None else (extra[0] if extra else None)
        shared_mcp = check_servers(mcp, "mcp")
        graph = resolve_agents(start, extra, shared_mcp=shared_mcp) if start is not None else None
        config = _initial_config(instructions, voice, output_modalities, turn_detection, session,
                                 base=_typed_config(config))
        if audio_format is not None:
            config = deep_merge(config, {"audio": _format_config(audio_format)})
        if tracing is not None:
            config["tracing"] = _tracing(tracing)
        secret: Secret | None = None
        if transport is not None:
            factory = _transport_factory(transport)
        else:
            full_url, headers, secret = protocol.endpoint(
                url, model=model, api_key=api_key, azure_endpoint=azure_endpoint, call_id=call_id
            )

            def factory() -> Transport:
                return WebSocketTransport.connect(full_url, headers, timeout=connect_timeout, secret=secret)

        self = cls(
            factory,
            create_timeout=create_timeout,
            response_timeout=response_timeout,
            max_conflict_retries=max_conflict_retries,
            tool_timeout=tool_timeout,
            context=context,
            secret=secret,
            name=name,
        )
        self._call_id = call_id
        self._shell.approvals = ApprovalBroker(handler=approval_handler, timeout=approval_timeout,
                                               default=approval_default, publish=self._shell.publish)
        if approval_timeout >= create_timeout:
            # A chain waiting for an approval holds the gate: other turns' creates would time out first.
            raise InvalidArgument(f"approval_timeout ({approval_timeout}) must be shorter than create_timeout "
                                  f"({create_timeout}): a tool chain holds the gate while it waits for an answer")
        if shared_mcp and graph is None:  # no agents: the servers join the session's own tools
            config["tools"] = [*config.get("tools", ()), *(m.definition() for m in shared_mcp)]
        self._shell.output_guards = check_list(output_guardrails, OutputGuardrail, "output_guardrails")
        self._shell.input_guards = check_list(input_guardrails, InputGuardrail, "input_guardrails")
        if graph is not None and start is not None:
            try:
                config = self._shell.use_agents(graph, start, config)  # renders instructions: user code
            except RtqueueError:
                raise
            except Exception as exc:
                why = f"{type(exc).__name__}: {exc}"
                raise RtqueueError(f"agent {start.name!r}: its instructions raised {why}") from exc
        self._shell.refresh_guards()
        speech_guarded = bool(self._shell.input_guards) or (
            graph is not None and any(a.input_guardrails for a in graph.values()))
        held = _hold_vad_responses(config) if speech_guarded else None
        if held is not None:
            config, self._shell.guard_speech = held, True
        # Last of the checks: the recording's file is opened only once nothing else can refuse.
        if record is not None:
            from .recording import Recorder

            if record_audio not in ("kept", "duration"):
                raise InvalidArgument(f'record_audio must be "kept" or "duration", not {record_audio!r}')
            if isinstance(record, Recorder):
                self._shell.recorder = record
            elif isinstance(record, (str, os.PathLike)):
                self._shell.recorder = Recorder(record, audio=record_audio)  # type: ignore[arg-type]
                self._shell.own_recorder = True
            else:
                raise InvalidArgument(f"record must be a path or an rtqueue.recording.Recorder, not {record!r}")
        try:
            if audio is not None and audio is not False:
                from .audio_session import AudioLink

                self._shell.audio = AudioLink(self._shell, AudioLink.device(audio))
            self._shell.start(config, connect_timeout)
        except BaseException as exc:
            try:
                self._shell.close(1.0)
            except BaseException as cleanup:  # the connect error is the one to see
                exc.__context__ = cleanup
            raise
        if reconnect:
            from .reconnect import Reconnector

            policy = reconnect if isinstance(reconnect, ReconnectPolicy) else ReconnectPolicy()
            if call_id is not None:
                # A call's conversation lives on at the server while its socket is re-attached: re-seeding
                # it would duplicate every item (invalid_value), and a new socket is no new 60-minute session.
                # A normal close (1000) of a call's socket means the call ended: re-attaching would be refused.
                policy = attrs.evolve(policy, reseed=False, recycle_after=None,
                                      final_close_codes=policy.final_close_codes | {1000})
            self._shell.reconnector = Reconnector(self._shell, policy)
            if policy.recycle_after is not None:
                from .recycler import Recycler

                self._shell.recycler = Recycler(self._shell, self._shell.reconnector, policy).start()
        return self

    def start(self, config: SessionConfig | Mapping[str, Any] | None = None, timeout: float = 10.0) -> Session:
        """Open the connection of a session made with the low-level constructor; returns it."""
        _positive("timeout", timeout)
        if self._shell.started:
            raise InvalidArgument("start() was called already; a session starts once")
        if isinstance(config, SessionConfig):
            config = config.to_dict()
        cfg = {"type": "realtime", **dict(config or {})}
        try:
            self._shell.start(cfg, timeout)
        except BaseException:
            self._shell.close(1.0)
            raise
        return self

    def _open(self) -> SessionShell:
        """The shell, or raise at once if the session is closed or dead."""
        shell = self._shell
        if shell.closing:
            raise SessionClosed("the session is closed")
        dead = shell.dead
        if dead is not None:
            raise type(dead)(*dead.args)
        return shell

    # -- public API: responses -----------------------------------------------------

    def create_response(self, *, deadline: float | None = None, **response_params: Any) -> ResponseHandle:
        """Ask for a response; returns its :class:`ResponseHandle` at once (any thread).

        ``response_params`` are GA ``response`` fields (``instructions``,
        ``conversation="none"`` for out-of-band, ``metadata`` (at most 16
        pairs), ``input``, ``tools``, ``output_modalities``, ...). An in-band
        create waits in the writer until the gate is drained; ``deadline``
        (seconds from now, default ``create_timeout``) bounds that wait, after
        which it is never sent and ``wait()`` raises
        :class:`~rtqueue.errors.GateTimeout`.
        """
        params = _check_response_params(response_params)
        _check_deadline(deadline)
        shell = self._open()
        handle = shell.new_response_handle()
        now = time.monotonic()
        shell.run(lambda core: core.create_response(params, handle, now=now, deadline=deadline))
        return handle

    def send_text(self, text: str, *, role: str = "user") -> SendHandle:
        """Add a text message to the conversation (``conversation.item.create``); no response.

        A user message is checked by the input guardrails first (in the
        calling thread): a trip raises
        :class:`~rtqueue.guardrails.InputGuardrailTripped` and sends nothing.
        """
        item = _message(text, role)
        if role == "user":
            tripped = self._open().check_input(text)
            if tripped is not None:
                guard, result = tripped
                raise InputGuardrailTripped(f"input guardrail {guard.name!r} blocked the message",
                                            guardrail=guard.name, result=result)
        return self.send({"type": "conversation.item.create", "item": item})

    def ask(self, text: str, timeout: float | None = 120.0, **response_params: Any) -> Response:
        """Send ``text`` as the user and return the response that finally answers it.

        The user message and its ``response.create`` enter the gate as one
        unit: the message is sent only when no response is running, right
        before its create, so each caller gets the answer to its own question
        even when many threads ask at once, and :attr:`items` reads question,
        answer, question, answer.

        Tool calls and handoffs started by the response run first; the
        returned :class:`Response` is the last of that chain. ``timeout``
        covers the whole chain. If server VAD starts a turn meanwhile, that
        turn is answered first (its response holds the gate) and this
        question after it; if the user speaks while this answer's tools run,
        the chain stops there (the new turn gets the next response) and the
        response that called the tools is returned.

        Input guardrails check ``text`` first, in this thread: a trip raises
        :class:`~rtqueue.guardrails.InputGuardrailTripped` with nothing sent,
        or, if the guardrail has a ``refusal``, the question stays out of the
        conversation and the returned response is the assistant saying the
        refusal. With output guardrails, the answer is returned once they all
        passed it; if one trips, the correction it asked for is returned.
        """
        item = _message(text, "user")
        timeout = check_timeout(timeout)
        params = _check_response_params(response_params)
        shell = self._open()
        handle = shell.new_response_handle()
        now = time.monotonic()
        tripped = shell.check_input(text)
        if tripped is not None:
            guard, result = tripped
            refusal = result.message or guard.refusal
            if refusal is None:
                raise InputGuardrailTripped(f"input guardrail {guard.name!r} blocked the question",
                                            guardrail=guard.name, result=result)
            refusal_params = {**params, "instructions": refusal_instructions(refusal)}
            shell.run(lambda core: core.create_response(refusal_params, handle, now=now))
            return handle.final(timeout)
        span = shell.telemetry.turn(text)
        try:
            shell.run(lambda core: core.turn(item, params, handle, now=now))
            answer = handle.final(timeout)
        except BaseException as exc:
            shell.telemetry.end_turn(span, handle.response_id, exc)
            raise
        shell.telemetry.end_turn(span, answer.id)
        return answer

    def approve(self, call_id: str) -> None:
        """Approve a call announced by ``tool.approval_requested`` (from any thread).

        Raises :class:`InvalidArgument` if no approval waits for ``call_id``
        (answered already, timed out, or unknown).
        """
        self._open().approvals.answer(call_id, True)

    def reject(self, call_id: str, reason: str | None = None) -> None:
        """Reject a call announced by ``tool.approval_requested``; the model is told ``reason``."""
        self._open().approvals.answer(call_id, False, reason)

    def pending_approvals(self) -> list[ApprovalRequest]:
        """The calls waiting for :meth:`approve` / :meth:`reject` now."""
        return self._open().approvals.pending()

    def cancel(self, timeout: float | None = 10.0) -> Response | None:
        """Cancel the active in-band response by id; return it once its ``response.done`` is in.

        A no-op returning ``None`` when nothing is active (it never sends a
        ``response.cancel`` into nothing). If our create is sent but not yet
        ``response.created``, it is cancelled as soon as it starts.
        """
        timeout = check_timeout(timeout)
        return self._open().cancel_active(timeout)

    def send_image(self, image: str | os.PathLike[str] | bytes, text: str | None = None, *,
                   mime: str | None = None, detail: str | None = None) -> SendHandle:
        """Add a user message with an image (and ``text``, if given) to the conversation; no response.

        ``image`` is a file path or the image's bytes: a PNG, JPEG, WebP or
        GIF (told by its magic bytes; ``mime``, if given, must agree) of at
        most :data:`rtqueue.images.MAX_IMAGE_BYTES`. It goes as an
        ``input_image`` content part (a base64 data URL; ``detail``
        ``"auto"``, ``"low"`` or ``"high"``), before the ``input_text`` part.
        Every check runs first and raises :class:`InvalidArgument` with
        nothing sent. :attr:`items` keeps a reference to the image (SHA-256
        and size), never its bytes, so a reconnect cannot re-send it: its
        re-seed counts it under ``not_carried_by_reason["image"]``.
        """
        from .images import image_part, load_image

        data, kind = load_image(image, mime)
        content = [image_part(data, kind, detail)]
        if text is not None:
            if not isinstance(text, str):
                raise InvalidArgument(f"text must be a str, not {type(text).__name__}")
            content.append({"type": "input_text", "text": text})
        return self.send({"type": "conversation.item.create",
                          "item": {"type": "message", "role": "user", "content": content}})

    def send(self, event: Mapping[str, Any]) -> SendHandle:
        """Queue any raw client event; returns a handle (a :class:`ResponseHandle` for creates).

        A raw ``response.create`` is gated like :meth:`create_response`; an
        ``event_id`` is added when missing. The event is sent in order, or its
        handle reports why not.
        """
        if not isinstance(event, Mapping) or not isinstance(event.get("type"), str):
            raise InvalidArgument("event must be a dict with a string 'type'")
        ev = dict(event)
        eid = ev.get("event_id")
        if eid is not None and not isinstance(eid, str):
            raise InvalidArgument("event_id must be a str")
        if ev["type"] == "response.create":
            resp = ev.get("response", {})
            if not isinstance(resp, Mapping):
                raise InvalidArgument("response.create's 'response' must be a dict")
            params = _check_response_params(dict(resp))
            shell = self._open()
            created = shell.new_response_handle()
            now = time.monotonic()
            shell.run(lambda core: core.create_response(params, created, now=now, event_id=eid))
            return created
        ev["event_id"] = eid or new_event_id()
        _check_json(ev, "event")
        shell = self._open()
        handle = shell.new_send_handle(ev)
        shell.run(lambda core: core.send_event(ev, handle, front=ev["type"] in URGENT))
        return handle

    def update(self, config: SessionConfig | Mapping[str, Any] | None = None, /, *, wait: bool = True,
               timeout: float | None = 10.0, **session_fields: Any) -> dict[str, Any] | SendHandle:
        """Send a ``session.update`` (``type: "realtime"`` is added); only what is given changes.

        ``config`` is a :class:`~rtqueue.config.SessionConfig` (its set fields
        only) or a raw dict of GA session fields. Keyword fields are GA
        top-level fields, sent as given (``instructions=``, ``tools=``,
        ``audio={...}``...), or conveniences mapped to their GA path:
        ``voice`` and ``speed`` (``audio.output``), ``input_format``,
        ``output_format`` and ``audio_format`` (both, or an ``(input,
        output)`` pair), ``turn_detection`` (``"server_vad"``,
        ``"semantic_vad"``, ``None`` for manual turns, a
        :class:`~rtqueue.config.ServerVad`...), ``noise_reduction``
        (``"near_field"``, ``"far_field"``, ``None`` for off) and
        ``transcription`` (a model name, a
        :class:`~rtqueue.config.Transcription`, ``None`` for off). Layers merge
        in that order: the typed config, the conveniences, the raw keyword
        fields, a raw ``config`` dict last. A keyword that is neither raises
        :class:`InvalidArgument` and nothing is sent.

        With ``wait`` (default) returns the session as ``session.updated``
        reports it, raising :class:`ServerError` if the server refused it;
        otherwise returns the :class:`SendHandle`.
        """
        timeout = check_timeout(timeout)
        if not isinstance(wait, bool):
            raise InvalidArgument(f"wait must be a bool, not {wait!r}")
        fields = _update_fields(config, session_fields)
        _check_json(fields, "session fields")
        shell = self._open()
        if wait:
            return shell.apply_config(fields, timeout)
        return self.send({"type": "session.update", "session": fields})

    # -- public API: events --------------------------------------------------------

    def publish(self, event_type: str, data: Mapping[str, Any] | None = None) -> None:
        """Deliver an event the app (or a bridge) makes to this session's subscribers.

        It reaches :meth:`on` callbacks and :meth:`events` streams like the
        session's own events, in publish order, on the dispatcher thread
        (never blocks). A phone bridge publishes DTMF key presses this way.
        Raises :class:`InvalidArgument` for a non-str type or non-dict data,
        :class:`SessionClosed` once closed.
        """
        if not isinstance(event_type, str) or not event_type:
            raise InvalidArgument(f"event_type must be a non-empty str, not {event_type!r}")
        if data is not None and not isinstance(data, Mapping):
            raise InvalidArgument(f"data must be a dict, not {type(data).__name__}")
        self._open().publish(Event(event_type, {"type": event_type, **(data or {})}))

    def on(self, event_type: str, callback: Callable[[Event], Any]) -> Callable[[], None]:
        """Call ``callback(event)`` for each event of ``event_type`` (``"*"`` for all).

        Callbacks run on the session's dispatcher thread, in order; a slow one
        delays other callbacks only, never reading or the gate; one that raises
        (anything, ``SystemExit`` included) is logged and reported as
        ``rtqueue.callback_error``. Returns a function that unsubscribes.
        """
        if not isinstance(event_type, str) or not callable(callback):
            raise InvalidArgument("on() needs an event type str and a callable")
        return self._open().dispatcher.subscribe(event_type, callback)

    def events(self, *types: str, max_size: int = DEFAULT_STREAM_SIZE) -> EventStream:
        """A blocking iterator over events (all, or only ``types``) from now on.

        Ends when the session closes; ``stream.get(timeout)`` polls one. Use it
        in a ``with`` block or a ``for`` loop: leaving either (or dropping the
        stream) unsubscribes it. It holds at most ``max_size`` events: past
        that the oldest ``*.delta`` event is dropped (else the oldest event),
        counted in ``stream.dropped``.
        """
        if not all(isinstance(t, str) for t in types):
            raise InvalidArgument("events() takes event type strings")
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1:
            raise InvalidArgument(f"max_size must be an int >= 1, not {max_size!r}")
        return self._open().dispatcher.stream(frozenset(types) if types else None, max_size)

    # -- public API: state ------------------------------------------------------------

    @property
    def gate(self) -> ResponseGate:
        """The gate: the lock-protected queue of in-flight response ids (``gate.stats()``)."""
        return self._shell.gate

    @property
    def writer(self) -> Writer:
        """The writer (for diagnostics: lanes and counters)."""
        return self._shell.writer

    @property
    def dispatcher(self) -> Dispatcher:
        """The dispatcher (for diagnostics)."""
        return self._shell.dispatcher

    @property
    def audio(self) -> AudioLink | None:
        """The audio link (devices, ``last_interruption``, ``stats()``) when audio is on."""
        return self._shell.audio

    @property
    def context(self) -> Any:
        """The app's object, passed to agent instructions and tools."""
        return self._shell.context

    @property
    def session_config(self) -> dict[str, Any]:
        """The session as the server last reported it (``session.created/updated``)."""
        with self._shell.locked() as core:
            return dict(core.session_config)

    @property
    def call_id(self) -> str | None:
        """The SIP call this session steers (``connect(call_id=...)``), else ``None``."""
        return self._call_id

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called or the connection failed for good."""
        return self._shell.closing or self._shell.dead is not None

    @property
    def agent(self) -> Agent | None:
        """The agent currently speaking (when agents are used)."""
        with self._shell.locked() as core:
            return core.agent

    @property
    def items(self) -> list[dict[str, Any]]:
        """The conversation items this session has seen, in order.

        At most the newest 500, and about a million characters of text (see
        :mod:`rtqueue.history`). Fresh dicts in the server's item shape,
        holding what re-seeding uses: ``id``, ``type``, ``role``, ``status``,
        ``content`` parts with their ``text`` or ``transcript`` (an image as a
        reference: ``{"type": "input_image", "image": sha256, "bytes": n,
        "mime_type": ...}``), and function-call fields.
        """
        with self._shell.locked() as core:
            return core.history.items()

    @property
    def turn_seq(self) -> int:
        """A counter bumped each time the user starts a new turn (text, commit, speech)."""
        with self._shell.locked() as core:
            return core.turn_seq

    @property
    def usage(self) -> Usage:
        """Tokens used so far, per session and per agent, and the latest rate limits (a frozen snapshot).

        Sums the ``usage`` of every ``response.done`` (a response counts for the
        agent that made it) and of every input transcription, and keeps the
        latest ``rate_limits.updated``: see :class:`~rtqueue.usage.Usage`.
        """
        with self._shell.locked():
            return self._shell.usage.snapshot()

    def stats(self) -> dict[str, Any]:
        """Gate stats plus writer, dispatcher, reconnect and audio counters."""
        shell = self._shell
        out: dict[str, Any] = shell.gate.stats().as_dict()
        out.update(
            audio_sent=shell.writer.audio_sent,
            audio_direct=shell.writer.audio_direct,
            audio_dropped=shell.writer.audio_dropped,
            audio_sent_while_held=shell.writer.audio_sent_while_held,
            creates_sent_on_release=shell.writer.creates_sent_on_release,
            audio_backed_up=shell.writer.audio_backed_up,
            events_dropped=shell.dispatcher.dropped_audio,
            event_streams=shell.dispatcher.stream_count(),
            callback_errors=shell.dispatcher.callback_errors,
            handles_issued=shell.issued_count,
        )
        with shell.locked() as core:
            out.update(handoffs=core.handoffs, history_items=len(core.history), history_chars=core.history.chars,
                       guardrail_trips=core.guardrail_trips, corrections=core.corrections)
        out["approvals"] = shell.approvals.stats()
        if shell.reconnector is not None:
            out.update(shell.reconnector.stats())
        if shell.recycler is not None:
            out.update(shell.recycler.stats(), recycle_audio_kept=shell.recycle_audio_kept)
        if shell.audio is not None:
            out["audio"] = shell.audio.stats()
        return out

    def stores(self) -> dict[str, tuple[object, int]]:
        """The session's capped stores, ``name -> (container, cap)``, for memory benchmarks.

        Read-only diagnostics: the containers are live; measure them, never change them.
        """
        return self._shell.stores()

    def unresolved(self) -> list[SendHandle]:
        """Handles of client events neither sent nor failed yet (after ``close()``: none).

        The promise "every event the app queued is sent or reported as failed"
        is checkable with this: it is empty once the session is idle or closed.
        """
        return self._shell.unresolved()

    def wait_idle(self, timeout: float | None = 30.0) -> bool:
        """Block until nothing is queued or in flight; ``False`` on timeout."""
        timeout = check_timeout(timeout)
        shell = self._open()
        deadline = None if timeout is None else time.monotonic() + timeout
        while deadline is None or time.monotonic() < deadline:
            left = 1.0 if deadline is None else max(0.0, deadline - time.monotonic())
            drained = not shell.writer.pending() and shell.gate.wait_drained(left)
            if drained and shell.tools_idle() and not shell.writer.pending():
                return True
            if shell.closing or shell.dead is not None:
                return False
            shell.gate.wait_change(0.01)
        return False

    # -- public API: audio -----------------------------------------------------------

    def append_audio(self, pcm: bytes, format: Any = None) -> bool:
        """Send audio as ``input_audio_buffer.append``, in the session's input format.

        With nothing queued ahead of it the chunk is written on the calling
        thread before this returns; otherwise it waits on the writer's audio
        lane, in order.

        The bytes must be in the negotiated input format (PCM16 24 kHz unless
        ``audio_format`` said otherwise; see :attr:`input_format`). ``format``
        states what they are (a name, GA dict or
        :class:`~rtqueue.formats.AudioFormat`): if it is not the session's, the
        call fails with :class:`AudioFormatError` rather than send noise.
        Never waits behind a held ``response.create``. Raises
        :class:`InvalidArgument` for partial samples (an odd PCM16 length), and
        :class:`SessionClosed` once closed.
        """
        if not isinstance(pcm, (bytes, bytearray, memoryview)):
            raise InvalidArgument(f"pcm must be bytes, not {type(pcm).__name__}")
        shell = self._open()
        fmt = shell.input_format()
        if format is not None:
            stated = format_of(format)
            if stated != fmt:
                raise AudioFormatError(f"audio in {stated} appended to a session whose input format is {fmt}; "
                                       f"convert it (rtqueue.formats.convert) or set audio_format")
        fmt.check(pcm)
        return shell.append_audio(bytes(pcm))

    @property
    def input_format(self) -> AudioFormat:
        """The negotiated input audio format (as the server last reported it)."""
        return self._shell.input_format()

    @property
    def output_format(self) -> AudioFormat:
        """The negotiated output audio format (as the server last reported it)."""
        return self._shell.output_format()

    def commit(self) -> SendHandle:
        """Commit the input audio buffer (push-to-talk), ``input_audio_buffer.commit``."""
        return self.send({"type": "input_audio_buffer.commit"})

    def clear_input(self) -> SendHandle:
        """Drop uncommitted input audio, ``input_audio_buffer.clear``."""
        return self.send({"type": "input_audio_buffer.clear"})

    def interrupt(self, timeout: float | None = 10.0) -> Interruption:
        """Barge in from the app: stop playback, cancel the active response, truncate to what was played.

        Playback stops at once and the buffered rest is dropped. The active
        in-band response (if any, and unless a cancel for it is already under
        way) is cancelled by id; the interrupted item is truncated at the
        milliseconds played, clamped to the audio received (no truncate at
        0 ms or for items outside the conversation). Returns an
        :class:`~rtqueue.audio_session.Interruption` once the cancelled
        response's ``response.done`` is in (or ``timeout`` raises
        :class:`ResponseTimeout`). Creates sent or queued but not yet started
        are left alone. Without audio it is :meth:`cancel`. Server VAD
        barge-ins (``speech_started``) do the same by themselves and emit
        ``audio.interrupted``.
        """
        from .audio_session import Interruption

        timeout = check_timeout(timeout)
        shell = self._open()
        if shell.audio is not None:
            return shell.audio.barge_in(cancel=True, source="app", wait=timeout)
        rid = shell.gate.active_response_id()
        cancelled = shell.cancel_response(rid, timeout) if rid is not None else None
        return Interruption(None, 0.0, 0.0, None, cancelled, "app", cancel_sent=rid is not None, response_id=rid)

    # -- agents ---------------------------------------------------------------------

    def handoff(self, agent: Agent | str, *, respond: bool = True) -> ResponseHandle | None:
        """Switch to ``agent`` now: ``session.update`` then (if ``respond``) one gated create.

        Same guarantees as a model-initiated handoff: wire order
        session.update -> response.create, the create waits for any active
        response to finish, the voice is kept. Emits ``agent.handoff``. The
        target's configuration is rendered first; if that fails (its
        instructions callable raised), nothing changes, ``agent.handoff_failed``
        is emitted and the error is raised as an :class:`RtqueueError`.
        """
        if not isinstance(agent, (Agent, str)):
            raise InvalidArgument(f"handoff() needs an Agent or an agent name, not {type(agent).__name__}")
        if not isinstance(respond, bool):
            raise InvalidArgument(f"respond must be a bool, not {respond!r}")
        shell = self._open()
        target, graph = shell.resolve_target(agent)
        shell.refresh_guards()  # a new agent may bring guardrails
        try:
            config = session_config_for(target, graph, shell.context)  # user code, off every lock
        except Exception as exc:
            with shell.locked() as core:
                source = core.agent.name if core.agent is not None else None
            shell.publish(Event("agent.handoff_failed", {"source": source, "target": target.name, "call_id": None,
                                                         "error": exc, "message": str(exc)}))
            raise RtqueueError(f"handoff to {target.name} failed: {type(exc).__name__}: {exc}") from exc
        handle = shell.new_response_handle() if respond else None
        now = time.monotonic()
        shell.run(lambda core: core.app_handoff(target, config, handle, now=now, respond=respond))
        return handle

    # -- closing ------------------------------------------------------------------------

    def close(self, timeout: float = 5.0) -> None:
        """Close: fail what is unsent, end every thread this session started. Idempotent.

        Returns promptly from any thread, a callback or a tool included (a
        tool still running is abandoned). If a cleanup step raised (say, an
        audio device's ``close``), the first such error is re-raised after
        everything else was closed.
        """
        t = check_timeout(timeout, "timeout")
        self._shell.close(5.0 if t is None else t)

    def threads(self) -> list[Any]:
        """Live reader, writer, dispatcher, tool and reconnect threads of this session."""
        return self._shell.threads()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<rtqueue.Session {self.name} {state} gate={self._shell.gate.depth()}>"


# -- helpers ---------------------------------------------------------------------------


def _positive(key: str, val: object) -> None:
    if isinstance(val, bool) or not isinstance(val, (int, float)) or not val > 0 or val != val:
        raise InvalidArgument(f"{key} must be a positive number, not {val!r}")


def _check_deadline(deadline: object) -> None:
    if deadline is not None and (isinstance(deadline, bool) or not isinstance(deadline, (int, float))
                                 or not deadline >= 0):
        raise InvalidArgument(f"deadline must be a number of seconds >= 0, not {deadline!r}")


def _check_json(value: Any, what: str) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"{what} is not JSON-serializable: {exc}") from None


def _tracing(value: object) -> Any:
    """The GA ``tracing`` field: ``"auto"`` or ``{workflow_name, group_id, metadata}``."""
    if value == "auto":
        return "auto"
    if isinstance(value, Mapping):
        unknown = set(value) - {"workflow_name", "group_id", "metadata"}
        if unknown:
            raise InvalidArgument(f"tracing takes workflow_name, group_id and metadata, not {sorted(unknown)}")
        for key in ("workflow_name", "group_id"):
            if key in value and not isinstance(value[key], str):
                raise InvalidArgument(f"tracing {key} must be a str")
        if "metadata" in value and not isinstance(value["metadata"], Mapping):
            raise InvalidArgument("tracing metadata must be a dict")
        return dict(value)
    raise InvalidArgument(f'tracing must be "auto" or a dict, not {value!r}')


def _message(text: object, role: str) -> dict[str, Any]:
    if not isinstance(text, str):
        raise InvalidArgument(f"text must be a str, not {type(text).__name__}")
    if role not in ("user", "system", "assistant"):
        raise InvalidArgument(f"role must be user, system or assistant, not {role!r}")
    kind = "output_text" if role == "assistant" else "input_text"
    return {"type": "message", "role": role, "content": [{"type": kind, "text": text}]}


def _transport_factory(transport: Any) -> Callable[[], Transport]:
    """A factory from ``Session.connect(transport=...)``: an instance (first use only) or a callable."""
    if all(callable(getattr(transport, m, None)) for m in ("send", "recv", "send_close", "abort", "shutdown")):
        used: list[bool] = []

        def once() -> Transport:
            if used:
                raise ConnectError("this transport instance was already used; pass a factory to reconnect")
            used.append(True)
            return transport  # type: ignore[no-any-return]

        return once
    if callable(transport):
        return transport  # type: ignore[no-any-return]
    raise InvalidArgument(f"transport must be a Transport or a zero-argument factory, not {type(transport).__name__}")


def _initial_config(
    instructions: str | None,
    voice: str | None,
    output_modalities: list[str] | None,
    turn_detection: str | Mapping[str, Any] | bool | None,
    session: Mapping[str, Any] | None,
    *,
    base: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    config: dict[str, Any] = {"type": "realtime", **(base or {})}
    if instructions is not None:
        config["instructions"] = instructions
    if output_modalities is not None:
        if not isinstance(output_modalities, (list, tuple)) or not all(
            m in ("text", "audio") for m in output_modalities
        ):
            raise InvalidArgument('output_modalities must be a list of "text" and/or "audio"')
        config["output_modalities"] = list(output_modalities)
    audio_cfg: dict[str, Any] = {}
    if voice is not None:
        audio_cfg.setdefault("output", {})["voice"] = voice
    td = turn_detection_config(turn_detection)
    if td is not _KEEP:
        audio_cfg.setdefault("input", {})["turn_detection"] = td
    if audio_cfg:
        config = merge_session(config, {"audio": audio_cfg})  # on top of base's audio, not instead of it
    if session:
        _check_json(dict(session), "session")
        config = deep_merge(config, dict(session))
    return config


_KEEP = object()


def _typed_config(config: object) -> dict[str, Any] | None:
    """``connect(config=...)`` as GA JSON: a SessionConfig, or its GA dict form checked as one."""
    if config is None:
        return None
    if isinstance(config, Mapping):
        config = SessionConfig.from_dict(config)
    if not isinstance(config, SessionConfig):
        raise InvalidArgument(f"config must be an rtqueue.SessionConfig, not {type(config).__name__}")
    return config.to_dict()


def _update_fields(config: object, fields: Mapping[str, Any]) -> dict[str, Any]:
    """The ``session`` of an ``update()``: typed config, conveniences, raw fields, then a raw dict (see there)."""
    raw_last: Mapping[str, Any] = {}
    out: dict[str, Any] = {"type": "realtime"}
    if isinstance(config, SessionConfig):
        out = config.to_dict()
    elif isinstance(config, Mapping):
        raw_last = config
    elif config is not None:
        raise InvalidArgument(f"update() takes a SessionConfig or a dict of GA session fields, not {config!r}")
    conveniences, raw = split_session_fields(fields)
    for layer in (conveniences, raw, raw_last):
        out = merge_session(out, layer)
    return out


def _hold_vad_responses(config: dict[str, Any]) -> dict[str, Any] | None:
    """``config`` with VAD's own ``create_response`` off, so input guardrails judge speech before any answer.

    Only when server or semantic VAD would create responses and input audio
    is transcribed (the guardrails need the transcript); then rtqueue creates
    each turn's response itself once the transcript passed. Else None: the
    fallback is to cut off the response VAD made as soon as a transcript trips.
    """
    audio = config.get("audio")
    inp = audio.get("input") if isinstance(audio, Mapping) else None
    if not isinstance(inp, Mapping):
        return None
    td, transcription = inp.get("turn_detection"), inp.get("transcription")
    if not isinstance(td, Mapping) or td.get("type") not in ("server_vad", "semantic_vad") or not transcription:
        return None
    if td.get("create_response", True) is False:
        return None  # the app makes responses itself
    return deep_merge(config, {"audio": {"input": {"turn_detection": {**td, "create_response": False}}}})


def _format_config(value: Any) -> dict[str, Any]:
    """``audio_format=`` as the GA ``audio`` fields: one format both ways, or an ``(input, output)`` pair."""
    if isinstance(value, tuple):
        if len(value) != 2:
            raise InvalidArgument(f"audio_format as a pair is (input, output), not {value!r}")
        inp, out = format_of(value[0]), format_of(value[1])
    else:
        inp = out = format_of(value)
    return {"input": {"format": inp.to_config()}, "output": {"format": out.to_config()}}


def turn_detection_config(value: str | Mapping[str, Any] | bool | None) -> Any:
    """Map plain words to a GA ``turn_detection`` object (``_KEEP`` = leave the server's)."""
    if value is True:
        return _KEEP
    if value is None or value is False or value == "push_to_talk" or value == "manual":
        return None
    if value == "server_vad":
        return {"type": "server_vad", "create_response": True, "interrupt_response": True}
    if value == "semantic_vad":
        return {"type": "semantic_vad", "create_response": True, "interrupt_response": True}
    if isinstance(value, Mapping):
        return dict(value)
    raise InvalidArgument(
        'turn_detection must be "server_vad", "semantic_vad", "push_to_talk", None, True or a dict; '
        f"got {value!r}"
    )


_RESPONSE_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "instructions": (str,),
    "conversation": (str,),
    "metadata": (dict,),
    "input": (list,),
    "tools": (list,),
    "tool_choice": (str, dict),
    "output_modalities": (list,),
    "max_output_tokens": (int, str),
    "audio": (dict,),
    "prompt": (dict,),
}


def _check_response_params(params: dict[str, Any]) -> dict[str, Any]:
    for key, val in params.items():
        types = _RESPONSE_FIELD_TYPES.get(key)
        if types is not None and val is not None and not isinstance(val, types):
            names = " or ".join(t.__name__ for t in types)
            raise InvalidArgument(f"response field {key!r} must be {names}, not {type(val).__name__}")
    meta = params.get("metadata")
    if meta is not None:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise InvalidArgument("response metadata must map str to str")
        if len(meta) > protocol.MAX_METADATA_PAIRS:
            raise InvalidArgument(f"response metadata has {len(meta)} pairs; the API allows "
                                  f"{protocol.MAX_METADATA_PAIRS}")
    conv = params.get("conversation")
    if conv is not None and conv not in ("auto", "none"):
        raise InvalidArgument('response conversation must be "auto" or "none"')
    _check_json(params, "response params")
    return dict(params)

