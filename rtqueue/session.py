"""The public, synchronous session: one Realtime conversation over one WebSocket.

Threads (all named ``rtqueue-*``, all ended by :meth:`Session.close`):

- ``rtqueue-reader-N``: the only thread that reads (and finally closes) the
  socket. It parses each frame, updates the :class:`ResponseGate` *first*,
  resolves handles, feeds audio to the player, hands tool calls to the turn
  worker, and publishes events to the dispatcher. It never runs app code.
- ``rtqueue-writer-N``: the only sender (see :mod:`rtqueue.writer`).
- ``rtqueue-dispatch-N``: runs app callbacks (see :mod:`rtqueue.dispatch`).
- ``rtqueue-turns-N`` and the ``rtqueue-tool`` pool: tool calls and handoffs
  (see :mod:`rtqueue.turns`), started on first use.
- audio threads, when audio is on (see :mod:`rtqueue.audio`).
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from . import protocol
from .dispatch import Dispatcher, EventStream
from .errors import (
    AuthenticationError,
    ConnectError,
    ConnectionLost,
    InvalidArgument,
    ProtocolError,
    ResponseError,
    ResponseRejected,
    ResponseTimeout,
    RtqueueError,
    ServerError,
    SessionClosed,
)
from .gate import ResponseGate, Verdict
from .handles import ResponseHandle, SendHandle, _check_timeout
from .history import History
from .protocol import METADATA_KEY, new_event_id
from .secrets import Secret, redact
from .transport import Transport, WebSocketTransport
from .values import Event, Response
from .writer import Outbound, Writer

if TYPE_CHECKING:
    from .agents import Agent

__all__ = ["Session"]

log = logging.getLogger("rtqueue")

_ids = itertools.count(1)

# Recent response.done bookkeeping. Waiters (cancel, interrupt) look a response
# up right after its done; a session has one in-band response at a time, so a
# few dozen cover any waiter, and the caps keep a long call's memory flat.
_RECENT_RESPONSES = 16  # Response objects (each holds its output items)
_RECENT_DONE_IDS = 256  # response ids only (a queued cancel for one of them is moot)
_RECENT_ERRORS = 256  # error replies by client event id, for update() and send() waiters
_HISTORY_ITEMS = 500  # conversation items kept for items and re-seeding (max_reseed_items)

#: Client events that must not wait behind a held ``response.create``.
URGENT = frozenset({"response.cancel", "conversation.item.truncate", "output_audio_buffer.clear"})

_TEXT_DELTAS = ("response.output_text.delta", "response.output_audio_transcript.delta")
_MAX_TEXT = 1_000_000


class _Stream:
    """What the reader accumulates for one response while it streams."""

    __slots__ = ("agent", "audio_bytes", "calls", "parts", "size")

    def __init__(self, agent: str | None) -> None:
        self.agent = agent
        self.parts: list[str] = []
        self.size = 0
        self.audio_bytes = 0
        self.calls: list[dict[str, Any]] = []

    def add_text(self, text: str) -> None:
        if self.size < _MAX_TEXT:
            self.parts.append(text)
            self.size += len(text)


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
        gate_slice_s: float = 0.05,
        name: str | None = None,
    ) -> None:
        """Low-level constructor: prefer :meth:`connect`. Nothing starts until :meth:`_start`."""
        self._n = next(_ids)
        self.name = name or f"session-{self._n}"
        self._transport_factory = transport_factory
        self._transport: Transport | None = None
        self._create_timeout = create_timeout
        self._response_timeout = response_timeout
        self.gate = ResponseGate(max_retries=max_conflict_retries)
        self._lock = threading.Lock()  # guards the tables below; never held across I/O or app code
        self._creates: dict[str, Outbound] = {}  # event_id -> in-flight response.create
        self._by_eid: dict[str, ResponseHandle] = {}
        self._by_rid: dict[str, ResponseHandle] = {}
        self._streams: dict[str, _Stream] = {}
        self._done_cond = threading.Condition()
        self._done: OrderedDict[str, Response] = OrderedDict()
        self._replies_cond = threading.Condition()
        self._errors_by_eid: OrderedDict[str, ServerError] = OrderedDict()
        self._session_config: dict[str, Any] = {}
        self._desired: dict[str, Any] = {"type": "realtime"}  # every session field we asked for
        self._config_version = 0
        self._history = History(_HISTORY_ITEMS)  # the conversation, for items and re-seeding
        self._turn_seq = 0  # bumped whenever the user starts a new turn
        self._produced_audio = False
        self._closing = False
        self._closed = threading.Event()
        self._dead: BaseException | None = None
        self._reader: threading.Thread | None = None
        self.dispatcher = Dispatcher(f"rtqueue-dispatch-{self._n}")
        self.dispatcher.on_callback_error = self._on_callback_error
        self.writer = Writer(
            self.gate,
            self._send_text,
            on_send_error=self._on_send_error,
            on_evict=self._evict_stale,
            skip=self._moot,
            slice_s=gate_slice_s,
            name=f"rtqueue-writer-{self._n}",
        )
        self._agent: Agent | None = None
        self._turns: Any = None  # rtqueue.turns.TurnManager, when agents or tools are used
        self._audio: Any = None  # rtqueue.audio_session.AudioLink, when audio is on
        self._reconnect: Any = None  # rtqueue.reconnect.Reconnector, when enabled
        self.context: Any = None  # the app's object, passed to agent instructions and tools
        self._secret: Secret | None = None
        self._evict_check = 0.0
        # Every handle given out, weakly: a queued one is held by the writer, so
        # the set still has it; a resolved one may go when the app drops it.
        self._issued: weakref.WeakSet[SendHandle] = weakref.WeakSet()
        self._issued_count = 0
        self._fatal_error: ServerError | None = None  # invalid_api_key & co. seen on this connection
        self._lost_rids: OrderedDict[str, BaseException] = OrderedDict()  # responses a reconnect cut off
        self._finished: OrderedDict[str, None] = OrderedDict()  # response ids whose response.done was read

    @classmethod
    def connect(
        cls,
        url: str | None = None,
        *,
        model: str = protocol.DEFAULT_MODEL,
        api_key: str | Secret | None = None,
        azure_endpoint: str | None = None,
        instructions: str | None = None,
        session: Mapping[str, Any] | None = None,
        agent: Agent | None = None,
        agents: Iterable[Agent] = (),
        context: Any = None,
        voice: str | None = None,
        output_modalities: list[str] | None = None,
        turn_detection: str | Mapping[str, Any] | bool | None = True,
        audio: Any = None,
        connect_timeout: float = 10.0,
        create_timeout: float = 120.0,
        response_timeout: float = 300.0,
        tool_timeout: float = 30.0,
        max_conflict_retries: int = 20,
        reconnect: bool | Any = True,
        name: str | None = None,
        transport: Transport | Callable[[], Transport] | None = None,
    ) -> Session:
        """Connect, configure, and return a ready session.

        ``url`` (e.g. a :class:`~rtqueue.Simulator`'s) or OpenAI/Azure by
        ``model``/``azure_endpoint`` with ``api_key`` (or the environment).
        ``instructions``, ``voice``, ``output_modalities``, ``turn_detection``
        (``"server_vad"``, ``"semantic_vad"``, ``"push_to_talk"``/``None`` for
        manual commits, a dict, or ``True`` to keep the server's default) and
        ``session`` (raw GA session fields, merged last) make up the first
        ``session.update``. ``agent`` starts a multi-agent conversation (see
        :class:`~rtqueue.Agent`); ``context`` is handed to agent instructions and
        tools. ``audio=True`` plays and records with the default devices (or
        pass an :class:`~rtqueue.audio.AudioIO`). ``reconnect`` (on by default)
        survives dropped sockets and ``session_expired``.

        Blocks until the server's ``session.created`` and the answer to our
        ``session.update`` arrived (``connect_timeout``). Raises
        :class:`~rtqueue.errors.ConnectError`, :class:`AuthenticationError`,
        :class:`ServerError` (the server refused the configuration) or
        :class:`InvalidArgument`.

        ``transport`` replaces the WebSocket: a :class:`~rtqueue.transport.Transport`
        (used for the first connection only) or a zero-argument factory called for
        each connection, e.g. :class:`rtqueue.testing.MockTransport` for tests
        without sockets. ``url`` and the key are then ignored.
        """
        for key, val, typ in (
            ("instructions", instructions, str),
            ("voice", voice, str),
            ("azure_endpoint", azure_endpoint, str),
        ):
            if val is not None and not isinstance(val, typ):
                raise InvalidArgument(f"{key} must be a {typ.__name__}, not {type(val).__name__}")
        if session is not None and not isinstance(session, Mapping):
            raise InvalidArgument(f"session must be a dict of GA session fields, not {type(session).__name__}")
        for key, val in (("connect_timeout", connect_timeout), ("create_timeout", create_timeout),
                         ("response_timeout", response_timeout), ("tool_timeout", tool_timeout)):
            if isinstance(val, bool) or not isinstance(val, (int, float)) or val <= 0:
                raise InvalidArgument(f"{key} must be a positive number, not {val!r}")
        if transport is not None:
            factory = _transport_factory(transport)
            secret = None
        else:
            full_url, headers, secret = protocol.endpoint(
                url, model=model, api_key=api_key, azure_endpoint=azure_endpoint
            )

            def factory() -> Transport:
                return WebSocketTransport.connect(full_url, headers, timeout=connect_timeout, secret=secret)

        self = cls(
            factory,
            create_timeout=create_timeout,
            response_timeout=response_timeout,
            max_conflict_retries=max_conflict_retries,
            name=name,
        )
        self._secret = secret
        self.context = context
        config = self._initial_config(instructions, voice, output_modalities, turn_detection, session)
        if agent is not None or tuple(agents):
            from .turns import TurnManager

            self._turns = TurnManager(self, agent, tuple(agents), tool_timeout=tool_timeout)
            config = self._turns.initial_config(config)
        if audio not in (None, False):
            from .audio_session import AudioLink

            self._audio = AudioLink.create(self, audio)
        try:
            self._start(config, connect_timeout)
        except BaseException:
            self.close()
            raise
        if reconnect:
            from .reconnect import Reconnector, ReconnectPolicy

            policy = reconnect if isinstance(reconnect, ReconnectPolicy) else ReconnectPolicy()
            self._reconnect = Reconnector(self, policy)
        return self

    @staticmethod
    def _initial_config(
        instructions: str | None,
        voice: str | None,
        output_modalities: list[str] | None,
        turn_detection: str | Mapping[str, Any] | bool | None,
        session: Mapping[str, Any] | None,
    ) -> dict[str, Any]:
        config: dict[str, Any] = {"type": "realtime"}
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
            config["audio"] = audio_cfg
        if session:
            config = _deep_merge(config, dict(session))
        return config

    def _start(self, config: dict[str, Any], timeout: float) -> None:
        self._transport = self._transport_factory()
        self.dispatcher.start()
        self.writer.start()
        if self._audio is not None:
            self._audio.start()
        self._start_reader(self._transport)  # last, as websockets does: the state is ready
        self._await_created(timeout)
        if len(config) > 1:
            self._apply_config(config, timeout)

    def _start_reader(self, transport: Transport) -> None:
        self._reader = threading.Thread(
            target=self._read_loop, args=(transport,), name=f"rtqueue-reader-{self._n}", daemon=True
        )
        self._reader.start()

    def _await_created(self, timeout: float) -> None:
        with self._replies_cond:
            ok = self._replies_cond.wait_for(
                lambda: self._config_version > 0 or self._dead is not None, timeout
            )
        if isinstance(self._dead, AuthenticationError):
            raise AuthenticationError(str(self._dead)) from None
        if self._dead is not None:
            raise ConnectError(f"connection failed before session.created: {self._dead}") from self._dead
        if not ok:
            raise ConnectError(f"no session.created within {timeout}s")

    def _apply_config(self, config: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send a ``session.update`` and wait for its ``session.updated`` (or raise its error)."""
        with self._replies_cond:
            version = self._config_version
        handle = self.send({"type": "session.update", "session": config})
        eid = handle.event_id
        with self._replies_cond:
            ok = self._replies_cond.wait_for(
                lambda: self._config_version > version or eid in self._errors_by_eid or self._dead is not None,
                timeout,
            )
            err = self._errors_by_eid.get(eid) if eid else None
        if err is not None:
            raise err
        if self._dead is not None:
            raise ConnectionLost(f"connection lost during session.update: {self._dead}") from self._dead
        if not ok:
            raise ResponseTimeout(f"no session.updated within {timeout}s")
        return dict(self._session_config)

    # -- public API: responses -----------------------------------------------------

    def create_response(self, *, deadline: float | None = None, **response_params: Any) -> ResponseHandle:
        """Ask for a response; returns its :class:`ResponseHandle` at once (any thread).

        ``response_params`` are GA ``response`` fields (``instructions``,
        ``conversation="none"`` for out-of-band, ``metadata``, ``input``,
        ``tools``, ``output_modalities``, ...). An in-band create waits in the
        writer until the gate is drained; ``deadline`` (seconds from now,
        default ``create_timeout``) bounds that wait, after which it is never
        sent and ``wait()`` raises :class:`~rtqueue.errors.GateTimeout`.
        """
        params = _check_response_params(response_params)
        event = {"type": "response.create", "response": params}
        return self._queue_create(event, deadline)

    def send_text(self, text: str, *, role: str = "user") -> SendHandle:
        """Add a text message to the conversation (``conversation.item.create``); no response."""
        if not isinstance(text, str):
            raise InvalidArgument(f"text must be a str, not {type(text).__name__}")
        if role not in ("user", "system", "assistant"):
            raise InvalidArgument(f"role must be user, system or assistant, not {role!r}")
        kind = "output_text" if role == "assistant" else "input_text"
        item = {"type": "message", "role": role, "content": [{"type": kind, "text": text}]}
        if role == "user":
            self._new_turn()
        return self.send({"type": "conversation.item.create", "item": item})

    def ask(self, text: str, timeout: float | None = 120.0, **response_params: Any) -> Response:
        """Send ``text`` as the user and return the response that finally answers it.

        Tool calls and handoffs started by the first response run first; the
        returned :class:`Response` is the last of that chain. ``timeout`` covers
        the whole chain.
        """
        _check_timeout(timeout)
        self.send_text(text)
        handle = self.create_response(**response_params)
        return handle.final(timeout)

    def cancel(self, timeout: float | None = 10.0) -> Response | None:
        """Cancel the active in-band response by id; return it once its ``response.done`` is in.

        A no-op returning ``None`` when nothing is active (it never sends a
        ``response.cancel`` into nothing). If our create is sent but not yet
        ``response.created``, waits (within ``timeout``) for it to start first.
        """
        _check_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            rid = self.gate.active_response_id()
            if rid is not None:
                return self._cancel_rid(rid, _remaining(deadline))
            if not any(e.state == "pending" for e in self.gate.entries()):
                return None
            remaining = _remaining(deadline)
            if remaining is not None and remaining <= 0:
                return None
            self.gate.wait_change(min(0.05, remaining if remaining is not None else 0.05))

    def send(self, event: Mapping[str, Any]) -> SendHandle:
        """Queue any raw client event; returns a handle (a :class:`ResponseHandle` for creates).

        A raw ``response.create`` is gated like :meth:`create_response`; an
        ``event_id`` is added when missing. The event is sent in order, or its
        handle reports why not.
        """
        if not isinstance(event, Mapping) or not isinstance(event.get("type"), str):
            raise InvalidArgument("event must be a dict with a string 'type'")
        ev = dict(event)
        if ev["type"] == "response.create":
            resp = ev.get("response", {})
            if not isinstance(resp, Mapping):
                raise InvalidArgument("response.create's 'response' must be a dict")
            ev["response"] = _check_response_params(dict(resp))
            return self._queue_create(ev, None)
        ev.setdefault("event_id", new_event_id())
        try:
            json.dumps(ev)
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"event is not JSON-serializable: {exc}") from None
        if ev["type"] == "session.update" and isinstance(ev.get("session"), Mapping):
            with self._lock:
                self._desired = _deep_merge(self._desired, dict(ev["session"]))
        handle = SendHandle(ev)
        self._enqueue(Outbound(ev, handle), front=ev["type"] in URGENT)
        return handle

    def update(self, *, wait: bool = True, timeout: float = 10.0, **session_fields: Any) -> dict[str, Any] | SendHandle:
        """Send a ``session.update`` with GA session fields (``type`` is added).

        With ``wait`` (default) returns the session as ``session.updated``
        reports it, raising :class:`ServerError` if the server refused it;
        otherwise returns the :class:`SendHandle`.
        """
        fields = {"type": "realtime", **session_fields}
        if wait:
            return self._apply_config(fields, timeout)
        return self.send({"type": "session.update", "session": fields})

    # -- public API: events --------------------------------------------------------

    def on(self, event_type: str, callback: Callable[[Event], Any]) -> Callable[[], None]:
        """Call ``callback(event)`` for each event of ``event_type`` (``"*"`` for all).

        Callbacks run on the session's dispatcher thread, in order; a slow one
        delays other callbacks only, never reading or the gate. Returns a
        function that unsubscribes.
        """
        if not isinstance(event_type, str) or not callable(callback):
            raise InvalidArgument("on() needs an event type str and a callable")
        return self.dispatcher.subscribe(event_type, callback)

    def events(self, *types: str) -> EventStream:
        """A blocking iterator over events (all, or only ``types``) from now on.

        Ends when the session closes; ``stream.get(timeout)`` polls one.
        """
        return self.dispatcher.stream(frozenset(types) if types else None)

    # -- public API: state ------------------------------------------------------------

    @property
    def session_config(self) -> dict[str, Any]:
        """The session as the server last reported it (``session.created/updated``)."""
        return dict(self._session_config)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called or the connection failed for good."""
        return self._closing or self._dead is not None

    @property
    def agent(self) -> Agent | None:
        """The agent currently speaking (when agents are used)."""
        return self._agent

    @property
    def items(self) -> list[dict[str, Any]]:
        """The conversation items this session has seen, in order (at most the newest 500).

        Fresh dicts in the server's item shape, holding what re-seeding uses:
        ``id``, ``type``, ``role``, ``status``, ``content`` parts with their
        ``text`` or ``transcript``, and function-call fields. Audio, images and
        unknown fields are not kept (see :mod:`rtqueue.history`).
        """
        return self._history.items()

    def stats(self) -> dict[str, Any]:
        """Gate stats plus writer, dispatcher and reconnect counters."""
        out: dict[str, Any] = self.gate.stats().as_dict()
        out.update(
            audio_sent=self.writer.audio_sent,
            audio_dropped=self.writer.audio_dropped,
            audio_sent_while_held=self.writer.audio_sent_while_held,
            events_dropped=self.dispatcher.dropped_audio,
            callback_errors=self.dispatcher.callback_errors,
            handles_issued=self._issued_count,
        )
        if self._reconnect is not None:
            out.update(self._reconnect.stats())
        return out

    def unresolved(self) -> list[SendHandle]:
        """Handles of client events neither sent nor failed yet (after ``close()``: none).

        The promise "every event the app queued is sent or reported as failed"
        is checkable with this: it is empty once the session is idle or closed.
        """
        with self._lock:
            handles = list(self._issued)
        return [h for h in handles if not h.sent() and h.error is None]

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Block until nothing is queued or in flight; ``False`` on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            drained = not self.writer.pending() and self.gate.wait_drained(_remaining(deadline) or 0.0)
            if drained and (self._turns is None or self._turns.idle()) and not self.writer.pending():
                return True
            self.gate.wait_change(0.01)
        return False

    # -- public API: audio -----------------------------------------------------------

    def append_audio(self, pcm: bytes) -> bool:
        """Queue 24 kHz PCM16 mono audio for ``input_audio_buffer.append`` (audio lane).

        Never waits behind a held ``response.create``. Returns ``False`` if the
        session is closed.
        """
        if not isinstance(pcm, (bytes, bytearray, memoryview)):
            raise InvalidArgument(f"pcm must be bytes, not {type(pcm).__name__}")
        text = json.dumps(
            {
                "type": "input_audio_buffer.append",
                "event_id": new_event_id(),
                "audio": base64.b64encode(bytes(pcm)).decode("ascii"),
            }
        )
        return self.writer.append_audio(text)

    def commit(self) -> SendHandle:
        """Commit the input audio buffer (push-to-talk), ``input_audio_buffer.commit``."""
        self._new_turn()
        return self.send({"type": "input_audio_buffer.commit"})

    def clear_input(self) -> SendHandle:
        """Drop uncommitted input audio, ``input_audio_buffer.clear``."""
        return self.send({"type": "input_audio_buffer.clear"})

    def interrupt(self, timeout: float | None = 10.0) -> Any:
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
        from .audio_session import interrupt

        return interrupt(self, timeout)

    # -- agents ---------------------------------------------------------------------

    def handoff(self, agent: Agent | str, *, respond: bool = True) -> ResponseHandle | None:
        """Switch to ``agent`` now: ``session.update`` then (if ``respond``) one gated create.

        Same guarantees as a model-initiated handoff: wire order
        session.update -> response.create, the create waits for any active
        response to finish, the voice is kept. Emits ``agent.handoff``.
        """
        if self._turns is None:
            from .turns import TurnManager

            if not hasattr(agent, "name"):
                raise InvalidArgument("handoff() needs an Agent when the session started without agents")
            self._turns = TurnManager(self, None, (), tool_timeout=30.0)
        return self._turns.app_handoff(agent, respond=respond)

    # -- closing ------------------------------------------------------------------------

    def close(self, timeout: float = 5.0) -> None:
        """Close: fail what is unsent, end every thread this session started. Idempotent."""
        with self._lock:
            if self._closing:
                already = True
            else:
                self._closing = True
                already = False
        if already:
            self._join_all(timeout)
            return
        err = SessionClosed("session closed by the app")
        if self._reconnect is not None:
            self._reconnect.stop()
        if self._audio is not None:
            self._audio.close()
        self.writer.stop(err, timeout)
        self._fail_in_flight(err)
        transport = self._transport
        if transport is not None:
            transport.send_close()
        reader = self._reader
        if reader is not None and reader is not threading.current_thread():
            reader.join(min(timeout, 2.0))
            if reader.is_alive() and transport is not None:
                transport.abort()
                reader.join(timeout)
        if self._turns is not None:
            self._turns.close()
        self._publish(Event("session.closed", {"reason": "closed by the app"}))
        self.dispatcher.stop(timeout)
        self._closed.set()

    def _join_all(self, timeout: float) -> None:
        self._closed.wait(timeout)

    def threads(self) -> list[threading.Thread]:
        """Live reader, writer, dispatcher, turn and reconnect threads of this session."""
        names = {f"rtqueue-{role}-{self._n}" for role in ("reader", "writer", "dispatch", "turns", "reconnect")}
        return [t for t in threading.enumerate() if t.name in names and t.is_alive()]

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<rtqueue.Session {self.name} {state} gate={self.gate.depth()}>"

    # -- internals: queueing ----------------------------------------------------------

    def _queue_create(self, event: dict[str, Any], deadline: float | None) -> ResponseHandle:
        bad = isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or deadline < 0
        if deadline is not None and bad:
            raise InvalidArgument(f"deadline must be a number of seconds >= 0, not {deadline!r}")
        eid = event.get("event_id") or new_event_id()
        event["event_id"] = eid
        resp = event.setdefault("response", {})
        meta = dict(resp.get("metadata") or {})
        meta[METADATA_KEY] = eid  # how response.created is matched to this request
        resp["metadata"] = meta
        try:
            json.dumps(event)
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"response params are not JSON-serializable: {exc}") from None
        in_band = protocol.is_in_band(resp)
        handle = ResponseHandle(event, self, in_band=in_band)
        if in_band and self._agent is not None:
            handle.agent_name = self._agent.name  # type: ignore[attr-defined]
        limit = self._create_timeout if deadline is None else deadline
        item = Outbound(event, handle, gated=in_band, oob=not in_band, deadline=time.monotonic() + limit)
        with self._lock:
            self._creates[eid] = item
            self._by_eid[eid] = handle
        self._enqueue(item)
        return handle

    def _enqueue(self, item: Outbound, *, front: bool = False) -> None:
        with self._lock:
            if item.handle not in self._issued:  # a retried create comes back through here
                self._issued.add(item.handle)
                self._issued_count += 1
        if self._closing:
            item.handle._fail_send(SessionClosed("session is closed"))
            self._forget(item.handle)
            return
        if self._dead is not None:
            dead = self._dead
            item.handle._fail_send(AuthenticationError(str(dead)) if isinstance(dead, AuthenticationError)
                                   else ConnectionLost(f"connection lost: {dead}"))
            self._forget(item.handle)
            return
        self.writer.enqueue(item, front=front)

    def _send_urgent(self, event: dict[str, Any]) -> SendHandle:
        return self.send(event)

    def _send_urgent_many(self, events: list[dict[str, Any]]) -> list[SendHandle]:
        """Queue urgent events at the head of the control lane, keeping their order; their handles."""
        # Under the writer's (reentrant) lock: otherwise the writer could send the
        # last one, queued first, before the others are in (truncate before cancel).
        with self.writer._cond:
            handles = [self.send(ev) for ev in reversed(events)]
        return handles[::-1]

    def _moot(self, event: dict[str, Any]) -> bool:
        """Writer hook: a ``response.cancel`` whose ``response.done`` was read meanwhile is not sent.

        It was queued while the response was active, but sending it now could
        only earn ``response_cancel_not_active``.
        """
        if event.get("type") != "response.cancel":
            return False
        rid = event.get("response_id")
        with self._lock:
            return isinstance(rid, str) and rid in self._finished

    def _has_item(self, item_id: str) -> bool:
        return item_id in self._history

    def _send_text(self, text: str) -> None:
        transport = self._transport
        if transport is None:
            raise ConnectionLost("not connected")
        transport.send(text)

    def _new_turn(self) -> None:
        with self._lock:
            self._turn_seq += 1

    @property
    def turn_seq(self) -> int:
        """A counter bumped each time the user starts a new turn (text, commit, speech)."""
        return self._turn_seq

    def _forget(self, handle: SendHandle) -> None:
        eid = handle.event_id
        with self._lock:
            if eid is not None:
                self._creates.pop(eid, None)
                self._by_eid.pop(eid, None)

    # -- internals: cancel ---------------------------------------------------------------

    def _cancel_rid(self, rid: str, timeout: float | None) -> Response | None:
        with self._done_cond:
            if rid in self._done:
                return self._done[rid]
        self._send_urgent({"type": "response.cancel", "response_id": rid})
        return self._wait_done(rid, timeout)

    def _wait_done(self, rid: str, timeout: float | None) -> Response:
        with self._done_cond:
            ok = self._done_cond.wait_for(
                lambda: rid in self._done or rid in self._lost_rids or self._dead is not None or self._closing, timeout
            )
            if rid in self._done:
                return self._done[rid]
            if rid in self._lost_rids:
                raise ConnectionLost(f"the connection dropped before response.done for {rid}")
        if not ok:
            raise ResponseTimeout(f"no response.done for {rid} within {timeout}s")
        raise ConnectionLost(f"connection ended before response.done for {rid}")

    def _cancel_handle(self, handle: ResponseHandle, timeout: float | None) -> Response | None:
        if handle.done():
            return handle.result()
        if not handle.sent() and self.writer.withdraw(handle):
            handle._fail(ResponseError("cancelled by the app before it was sent"))
            self._forget(handle)
            return None
        if handle.response_id is None:
            handle._cancel_requested = True  # the reader cancels it on response.created
            try:
                return handle.wait(timeout)
            except ResponseError:
                return None
        return self._cancel_rid(handle.response_id, timeout)

    # -- internals: stale responses ------------------------------------------------------

    def _evict_stale(self) -> None:
        """Writer hook: release a response whose ``response.done`` never came (deadline)."""
        now = time.monotonic()
        if now - self._evict_check < 0.25:
            return
        self._evict_check = now
        for entry in self.gate.entries():
            if now - entry.since < self._response_timeout:
                continue
            if entry.response_id is not None:
                self._send_urgent({"type": "response.cancel", "response_id": entry.response_id})
                self.gate.evict(entry.response_id)
            elif entry.event_id is not None:
                self.gate.on_error(entry.event_id, "rtqueue_evicted")
            error = ResponseError(
                f"response {entry.response_id or entry.event_id} had no response.done within "
                f"{self._response_timeout}s; cancelled and released from the gate"
            )
            with self._lock:
                handle = self._by_rid.pop(entry.response_id or "", None) or self._by_eid.pop(entry.event_id or "", None)
            if handle is not None:
                self._run_callbacks(handle, handle._fail(error))
            self._publish(Event("gate.evicted", {"response_id": entry.response_id, "event_id": entry.event_id,
                                                 "age_s": now - entry.since}))

    # -- internals: the reader ------------------------------------------------------------

    def _read_loop(self, transport: Transport) -> None:
        error: BaseException | None = None
        try:
            while True:
                try:
                    frame = transport.recv()
                except ConnectionLost as exc:
                    error = exc
                    break
                if frame is None:
                    code = getattr(transport, "close_code", None)
                    error = ConnectionLost(
                        f"server closed the connection (code {code}"
                        f"{': ' + transport.close_reason if getattr(transport, 'close_reason', '') else ''})"
                    )
                    break
                try:
                    event = protocol.parse_frame(frame)
                except ProtocolError as exc:
                    log.warning("rtqueue: %s", exc)
                    self._publish(Event("rtqueue.error", {"error": exc, "message": str(exc)}))
                    continue
                try:
                    self._route(event)
                except Exception as exc:  # never let one odd event kill the reader
                    log.exception("rtqueue: error handling %s", event.get("type"))
                    message = f"handling {event.get('type')}: {exc!r}"
                    self._publish(Event("rtqueue.error", {"error": exc, "message": message}))
        finally:
            transport.shutdown()  # the reader alone closes the socket
            if transport is self._transport:
                self._on_connection_lost(error or ConnectionLost("connection ended"), transport)

    def _route(self, event: dict[str, Any]) -> None:
        typ = event["type"]
        handler = self._HANDLERS.get(typ)
        if handler is not None:
            handler(self, event)
        elif typ in _TEXT_DELTAS:
            self._on_text_delta(event)
        if self._audio is not None:
            self._audio.on_event(event)
        if self.dispatcher.wants(typ):
            self._publish(Event(typ, event))

    def _on_session(self, event: dict[str, Any]) -> None:
        session = event.get("session")
        with self._replies_cond:
            if isinstance(session, dict):
                self._session_config = session
            self._config_version += 1
            self._replies_cond.notify_all()

    def _on_created(self, event: dict[str, Any]) -> None:
        resp, rid, eid = _response_ids(event)
        hint = (resp["conversation_id"] is not None) if "conversation_id" in resp else None
        self.gate.on_created(rid, eid, in_band=hint)
        agent = self._agent.name if self._agent is not None else None
        with self._lock:
            self._streams[rid] = _Stream(agent)
            handle = self._by_eid.get(eid) if isinstance(eid, str) else None
            if handle is not None:
                self._creates.pop(eid, None)  # started: no more retries for it
                handle.response_id = rid
                self._by_rid[rid] = handle
        if handle is not None and handle._cancel_requested:
            self._send_urgent({"type": "response.cancel", "response_id": rid})

    def _on_text_delta(self, event: dict[str, Any]) -> None:
        rid = event.get("response_id")
        delta = event.get("delta")
        stream = self._streams.get(rid) if isinstance(rid, str) else None
        if stream is not None and isinstance(delta, str):
            stream.add_text(delta)

    def _on_audio_delta(self, event: dict[str, Any]) -> None:
        rid = event.get("response_id")
        delta = event.get("delta")
        stream = self._streams.get(rid) if isinstance(rid, str) else None
        if isinstance(delta, str):
            self._produced_audio = True
            if stream is not None:
                stream.audio_bytes += _b64_len(delta)

    def _on_done(self, event: dict[str, Any]) -> None:
        _resp, rid, eid = _response_ids(event)
        with self._lock:  # before the gate wakes the writer: a cancel queued for rid is now moot
            self._finished[rid] = None
            while len(self._finished) > _RECENT_DONE_IDS:
                self._finished.popitem(last=False)
        if self.gate.on_done(rid, eid):
            # Hand the GIL to a writer woken by this release: without it, the
            # writer waits for the rest of this handler and the next frames (up
            # to the 5 ms switch interval) before its create can go out.
            time.sleep(0)
        with self._lock:
            stream = self._streams.pop(rid, None)
            handle = self._by_rid.pop(rid, None)
            if handle is None and eid is not None:
                handle = self._by_eid.get(eid)
            if handle is not None and handle.event_id is not None:
                self._by_eid.pop(handle.event_id, None)
                self._creates.pop(handle.event_id, None)
        response = Response.from_done(
            event,
            streamed_text="".join(stream.parts) if stream else "",
            audio_ms=(stream.audio_bytes / 48.0) if stream else 0.0,
            agent=stream.agent if stream else None,
        )
        with self._done_cond:
            self._done[rid] = response
            while len(self._done) > _RECENT_RESPONSES:
                self._done.popitem(last=False)
            self._done_cond.notify_all()
        if self._turns is not None and response.function_calls:
            # Decide on a follow-up *before* resolving the handle, so final()
            # never sees "done, no follow-up" in between.
            self._turns.on_response_done(response, handle)
        if handle is not None:
            self._run_callbacks(handle, handle._resolve(response))

    def _on_error(self, event: dict[str, Any]) -> None:
        err = ServerError.from_event(event)
        eid = err.event_id
        if eid is not None:
            with self._replies_cond:
                self._errors_by_eid[eid] = err
                while len(self._errors_by_eid) > _RECENT_ERRORS:
                    self._errors_by_eid.popitem(last=False)
                self._replies_cond.notify_all()
        verdict = self.gate.on_error(eid, err.code)
        if verdict is Verdict.RETRY and eid is not None:
            with self._lock:
                item = self._creates.get(eid)
            if item is not None:
                handle = item.handle
                if isinstance(handle, ResponseHandle):
                    handle.retries += 1
                item.first_wait = None
                log.info("rtqueue: server raced create %s (%s); retrying", eid, err.code)
                self._enqueue(item, front=True)
        elif verdict is Verdict.REJECT and eid is not None:
            with self._lock:
                self._creates.pop(eid, None)
                handle = self._by_eid.pop(eid, None)
            if handle is not None:
                self._run_callbacks(
                    handle, handle._fail(ResponseRejected(f"server rejected response.create: {err}", error=err))
                )
        if err.code in protocol.FATAL_CODES:
            self._fatal_error = err
        fatal_or_expired = err.code in protocol.FATAL_CODES or err.code == protocol.SESSION_EXPIRED
        if fatal_or_expired and self._reconnect is not None:
            self._reconnect.note_server_error(err)

    def _on_speech_started(self, event: dict[str, Any]) -> None:
        self._new_turn()

    def _on_item(self, event: dict[str, Any]) -> None:
        item = event.get("item")
        if isinstance(item, dict):
            self._history.put(item)

    def _on_item_deleted(self, event: dict[str, Any]) -> None:
        iid = event.get("item_id")
        if isinstance(iid, str):
            self._history.delete(iid)

    def _on_transcription(self, event: dict[str, Any]) -> None:
        iid, transcript = event.get("item_id"), event.get("transcript")
        if isinstance(iid, str) and isinstance(transcript, str):
            self._history.set_transcript(iid, transcript)

    _HANDLERS: dict[str, Callable[[Session, dict[str, Any]], None]] = {
        "session.created": _on_session,
        "session.updated": _on_session,
        "response.created": _on_created,
        "response.done": _on_done,
        "response.output_audio.delta": _on_audio_delta,
        "error": _on_error,
        "input_audio_buffer.speech_started": _on_speech_started,
        "conversation.item.added": _on_item,
        "conversation.item.done": _on_item,
        "conversation.item.deleted": _on_item_deleted,
        "conversation.item.input_audio_transcription.completed": _on_transcription,
    }

    # -- internals: failure ---------------------------------------------------------------

    def _on_send_error(self, exc: BaseException) -> None:
        # Wake the reader: it owns the socket and takes the one "lost" path.
        transport = self._transport
        if transport is not None:
            transport.abort()

    def _on_connection_lost(self, error: BaseException, transport: Transport) -> None:
        if self._closing:
            return
        if self._reconnect is not None and self._reconnect.handle_lost(error, transport):
            return
        from .reconnect import fatal_loss

        fatal = fatal_loss(getattr(transport, "close_code", None), self._fatal_error, self._secret)
        self._die(fatal or (error if isinstance(error, RtqueueError) else ConnectionLost(str(error))))

    def _die(self, error: BaseException) -> None:
        """The connection is gone for good: fail everything queued or in flight."""
        if isinstance(error, (ConnectionLost, AuthenticationError)):
            err: BaseException = error
        else:
            err = ConnectionLost(str(error))
        with self._replies_cond:
            self._dead = err
            self._replies_cond.notify_all()
        with self._done_cond:
            self._done_cond.notify_all()
        unsent = self.writer.stop(err, timeout=1.0)
        self._fail_in_flight(err)
        for item in unsent:
            self._publish(Event("rtqueue.send_failed", {"event": item.event, "error": err}))
        self._publish(Event("session.closed", {"reason": str(err), "error": err}))
        log.warning("rtqueue: %s", redact(str(err), self._secret))

    def _fail_in_flight(self, err: BaseException) -> None:
        self.gate.close(err)
        with self._lock:
            handles = list({id(h): h for h in [*self._by_eid.values(), *self._by_rid.values()]}.values())
            self._by_eid.clear()
            self._by_rid.clear()
            self._creates.clear()
        for h in handles:
            self._run_callbacks(h, h._fail(type(err)(*err.args)))

    def _run_callbacks(self, handle: ResponseHandle, cbs: list[Callable[[ResponseHandle], None]] | None) -> None:
        for fn in cbs or ():
            self._dispatch_call(fn, handle)

    def _dispatch_call(self, fn: Callable[..., Any], *args: Any) -> None:
        self.dispatcher.call(fn, *args)

    def _publish(self, event: Event) -> None:
        self.dispatcher.publish(event)

    def _on_callback_error(self, event: Event, exc: BaseException) -> None:
        self._publish(Event("rtqueue.callback_error", {"event_type": event.type, "error": exc}))


# -- helpers ---------------------------------------------------------------------------


def _transport_factory(transport: Any) -> Callable[[], Transport]:
    """A factory from ``Session.connect(transport=...)``: an instance (first use only) or a callable."""
    if all(callable(getattr(transport, m, None)) for m in ("send", "recv", "send_close", "abort", "shutdown")):
        used = []

        def once() -> Transport:
            if used:
                raise ConnectError("this transport instance was already used; pass a factory to reconnect")
            used.append(True)
            return transport  # type: ignore[no-any-return]

        return once
    if callable(transport):
        return transport  # type: ignore[no-any-return]
    raise InvalidArgument(f"transport must be a Transport or a zero-argument factory, not {type(transport).__name__}")

_KEEP = object()


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
    if meta is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise InvalidArgument("response metadata must map str to str")
    conv = params.get("conversation")
    if conv is not None and conv not in ("auto", "none"):
        raise InvalidArgument('response conversation must be "auto" or "none"')
    return dict(params)


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _response_ids(event: dict[str, Any]) -> tuple[dict[str, Any], str, str | None]:
    """``(response, response id, our create's event id or None)`` of a response.* event."""
    resp = event.get("response")
    if not isinstance(resp, dict) or not isinstance(resp.get("id"), str):
        raise ProtocolError(f"{event['type']} without response.id", frame=str(event)[:200])
    meta = resp.get("metadata")
    eid = meta.get(METADATA_KEY) if isinstance(meta, dict) else None
    return resp, resp["id"], eid if isinstance(eid, str) else None


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _b64_len(s: str) -> int:
    n = len(s)
    if n == 0:
        return 0
    return n * 3 // 4 - (2 if s.endswith("==") else 1 if s.endswith("=") else 0)


def decode_audio(delta: str) -> bytes:
    """Decode a base64 audio delta; raise :class:`ProtocolError` on bad base64."""
    try:
        return base64.b64decode(delta, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProtocolError(f"audio delta is not valid base64: {exc}") from exc
