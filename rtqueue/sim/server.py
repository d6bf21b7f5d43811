"""The simulator's WebSocket server: a thin asyncio shell around :class:`SimSession`.

One thread, ``rtqueue-sim-loop``, runs an asyncio event loop with
``websockets``' asyncio server; :meth:`Simulator.close` ends it. Everything
that touches a connection or a :class:`SimSession` runs on that loop:

- one handler task per connection reads frames and feeds them to the session
  (after the simulated latency);
- paced output, latency-delayed frames and expiry are loop timers
  (``call_at``), one pending timer per connection;
- a connection's queued frames are written by a short-lived sender task, at
  most one per connection, so per-connection order holds and a client that
  stops reading stalls only its own sender.

Why one loop and not threads: at 200 sessions the threaded server (two
threads per connection plus a sender pool) made ~36,000 context switches a
second and kept about two threads waiting for a CPU on a 2-core machine,
which showed up as scheduling delay in the *client's* gate latency. A loop
serves every ready socket in one wake-up.

The public methods (``stats``, ``inject``, ``wait_until``, ``close``...) are
called from other threads: each connection's lock guards its session and
queues, ``_lock`` the registry. Locks are taken in the order connection lock,
then ``_lock``, and never held across an ``await``. No user code runs here;
nothing but loopback by default.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

import attrs
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from ..errors import InvalidArgument
from ..gate_state import percentile
from ..recording import Recorder, Recording
from ..secrets import redact
from ._checks import check_int, check_number
from .core import SimSession
from .faults import FaultPlan
from .phone import CallerScript, CallRecord
from .phone_net import CallView, PhoneNetwork
from .replay import ReplaySession, load_replay

__all__ = ["DEFAULT_MODELS", "Simulator"]

_DELTA_TYPES = frozenset({"response.output_audio.delta", "response.output_text.delta"})
_AUDIO_TYPES = frozenset({"response.output_audio.delta"})
_MALFORMED = '{"type": "response.output_audio.delta", "event_id": "event_'
_BINARY = b"\x00\x01rtqueue-sim-binary-frame\xff"
_AUTH_CLOSE_CODE = 3000
_REQUEST_CLOSE_CODE = 4000  # model / beta-header refusals: the real service's code

#: Models the default simulator accepts in ``?model=`` (the documented Realtime
#: models and snapshots); ``Simulator(models=None)`` accepts any name.
DEFAULT_MODELS = frozenset({
    "gpt-realtime",
    "gpt-realtime-2025-08-28",
    "gpt-realtime-mini",
    "gpt-realtime-mini-2025-10-06",
    "gpt-4o-realtime-preview",
    "gpt-4o-realtime-preview-2024-10-01",
    "gpt-4o-realtime-preview-2024-12-17",
    "gpt-4o-realtime-preview-2025-06-03",
    "gpt-4o-mini-realtime-preview",
    "gpt-4o-mini-realtime-preview-2024-12-17",
})

# Connection-level refusals, as the real GA service sends them: an ``error``
# event, then a close whose reason is "<error type>.<error code>".
# Seen in recordings: the beta text and every close code / reason below except
# the two marked "guessed", and invalid_model's wording (seen for transcription
# mode: 'Model "X" is not supported in transcription mode.').
_BETA_MESSAGE = "The Realtime Beta API is no longer supported. Please use /v1/realtime for the GA API."
# guessed: the code and close reason are real, this wording is ours.
_MISSING_MODEL_MESSAGE = "Missing required parameter: 'model'. Pass it in the URL: /v1/realtime?model=gpt-realtime."
_NO_AUTH_MESSAGE = "Missing bearer or basic authentication in header"
# The REST API's 401 body with this message carries ``code: null``; the close
# reason for it is guessed.
_NO_AUTH_REASON = "invalid_request_error"
_BAD_KEY_MESSAGE = (
    "Incorrect API key provided. You can find your API key at https://platform.openai.com/account/api-keys."
)
_NO_CALL_MESSAGE = "No session found for the provided call_id"  # the REST API's words for an unknown call
_CALL_TIMEOUT = 10.0  # a cross-thread call into the loop (inject) gives up after this


def _check_plan(where: str, plan: object, *, none_ok: bool = True) -> FaultPlan | None:
    if plan is None and none_ok:
        return None
    if not isinstance(plan, FaultPlan):
        wanted = "a FaultPlan or None" if none_ok else "a FaultPlan"
        raise InvalidArgument(f"{where} must be {wanted}, got {type(plan).__name__} {plan!r}")
    return plan


@attrs.define(eq=False)
class _Frame:
    due: float
    data: str | bytes | None  # None for a close request
    event: dict[str, Any] | None
    close: tuple[int, str] | None = None


@attrs.define(eq=False)
class _FaultState:
    plan: FaultPlan
    base: int  # events sent when the plan took effect
    rng: random.Random
    fired: set[str] = attrs.Factory(set)
    deltas_seen: int = 0
    stall_pending: bool = True


@attrs.define(eq=False)
class _Conn:
    index: int
    ws: ServerConnection
    core: SimSession | ReplaySession | CallView
    lock: threading.Lock = attrs.Factory(threading.Lock)
    # (due, parsed event or None, raw frame if unparsable)
    inbound: deque[tuple[float, Any, str | bytes | None]] = attrs.Factory(deque)
    outbox: deque[_Frame] = attrs.Factory(deque)
    sendq: deque[_Frame] = attrs.Factory(deque)
    sending: bool = False
    wake_at: float | None = None
    timer: asyncio.TimerHandle | None = None
    last_due: float = 0.0
    sent: int = 0
    closed: bool = False
    close_queued: bool = False
    fault: _FaultState | None = None


class Simulator:
    """An embedded OpenAI Realtime (GA) server on loopback; see ``rtqueue.sim``.

    Arguments:
        host, port: where to listen (``port=0`` picks a free port).
        latency_ms: one-way delay applied to every frame in both directions
            (round trip = 2x), order preserved.
        seed: makes IDs, model choices and random faults reproducible.
        trace: a path; every frame both ways is written as an rtqueue
            recording (:mod:`rtqueue.recording`: a header line, then
            ``{"t", "session", "from": "client"|"server", "event"}`` lines;
            binary frames as ``{"binary_len": n}``, bad JSON as ``{"raw": text}``).
            Handshake headers (and so API keys) are never written.
        speed: pacing of audio and text relative to real time (1.0 real
            time, 20.0 twenty times faster, ``None`` or 0 unpaced).
        require_api_key: when set, a connection must carry ``Authorization:
            Bearer <key>`` or ``api-key: <key>``. As on the real service the
            upgrade succeeds, then: no such header -> an ``error`` event
            ("Missing bearer or basic authentication in header", ``code``
            null) and close 3000; a wrong key -> ``invalid_api_key`` and close
            3000 with reason ``invalid_request_error.invalid_api_key``.
        models: the names accepted in the URL's ``?model=`` (default
            :data:`DEFAULT_MODELS`; ``None``: any). No ``model`` (and no
            ``call_id`` or ``intent=transcription``) -> ``missing_model``, a
            name not listed -> ``invalid_model``; the retired header
            ``OpenAI-Beta: realtime=v1`` -> ``beta_api_shape_disabled``. Each
            is an ``error`` event then close 4000 (reason
            ``invalid_request_error.<code>``).
        ping_interval: seconds between the server's pings (the real service
            pings about every 20 s); ``None`` sends none. A missing pong is
            not held against the client.
        faults: a :class:`FaultPlan` for every session.
        audio_chunk_ms: duration of each ``response.output_audio.delta``.
        words_per_second: speech / text rate of the scripted model.
        first_output_ms: model "thinking" time before the first output
            (paced by ``speed``).
        min_response_ms: unscaled minimum time from ``response.created`` to
            ``response.done`` (default 20 ms): even unpaced, a response is in
            flight for a moment, so a client that sends a second create
            without waiting still collides, as it would on the real service.
            0 lets unpaced responses finish within the same instant.
        max_sessions: connections beyond this many live ones are refused
            with HTTP 429 (``None``: no limit).
        record: keep every frame for :meth:`client_events` /
            :meth:`server_events` (turn off for soak runs).
        close_timeout: seconds to wait for a client's closing handshake.
        session_max_duration_s: when ``session_expired`` is sent (60 min).
        transcription_failures: input audio transcription of audio the
            synthesizer did not register fails (``...transcription.failed``)
            instead of completing with an empty transcript.
        vad_create_delay_s: server VAD announces its response this long after
            the speech stopped; speech starting again within it cancels the
            response before its ``response.created`` (the real service's
            ``response.done`` without ``response.created``).
        replay: a recording (path or :class:`~rtqueue.recording.Recording`)
            whose server side is served instead of the scripted model (see
            :mod:`rtqueue.sim.replay`); differences are listed in
            ``stats()["replay_mismatches"]``.

    Arguments are checked here, before anything binds: a wrong type or value
    (a port outside 0..65535, a negative, NaN or infinite number, ``bool``
    where a number is due) raises :class:`~rtqueue.errors.InvalidArgument`.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        latency_ms: float = 0.0,
        seed: int = 0,
        trace: str | os.PathLike[str] | None = None,
        speed: float | None = 1.0,
        require_api_key: str | None = None,
        models: Iterable[str] | None = DEFAULT_MODELS,
        ping_interval: float | None = 20.0,
        faults: FaultPlan | None = None,
        audio_chunk_ms: int = 50,
        words_per_second: float = 4.0,
        first_output_ms: float = 250.0,
        min_response_ms: float = 20.0,
        max_sessions: int | None = None,
        record: bool = True,
        close_timeout: float = 2.0,
        session_max_duration_s: float = 3600.0,
        replay: str | os.PathLike[str] | Recording | None = None,
        transcription_failures: bool = False,
        vad_create_delay_s: float = 0.0,
    ) -> None:
        if not isinstance(host, str) or not host:
            raise InvalidArgument(f"Simulator host must be a non-empty str, got {type(host).__name__} {host!r}")
        self._host = host
        self._requested_port = check_int("Simulator port", port, maximum=65535)
        self._latency = check_number("Simulator latency_ms", latency_ms) / 1000.0
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise InvalidArgument(f"Simulator seed must be an int, got {type(seed).__name__} {seed!r}")
        self._seed = seed
        if trace is not None and not isinstance(trace, (str, os.PathLike)):
            raise InvalidArgument(f"Simulator trace must be a path (str or os.PathLike) or None, got {trace!r}")
        self._trace_path = os.fspath(trace) if trace is not None else None
        if speed is not None:
            speed = check_number("Simulator speed", speed, or_none=True)
        self._speed = speed or None
        if require_api_key is not None and (not isinstance(require_api_key, str) or not require_api_key):
            raise InvalidArgument(
                f"Simulator require_api_key must be a non-empty str or None, got {type(require_api_key).__name__}"
            )
        self._api_key = require_api_key
        if models is not None:
            if isinstance(models, str) or not isinstance(models, Iterable):
                raise InvalidArgument(f"Simulator models must be an iterable of str or None, got {models!r}")
            models = frozenset(models)
            if not models or not all(isinstance(m, str) and m for m in models):
                raise InvalidArgument(
                    f"Simulator models must hold non-empty str names, got {sorted(map(repr, models))}"
                )
        self._models: frozenset[str] | None = models
        if ping_interval is not None:
            ping_interval = check_number("Simulator ping_interval", ping_interval, above=True)
        self._ping_interval = ping_interval
        self._default_faults = _check_plan("Simulator faults", faults)
        self._session_faults: dict[int, FaultPlan] = {}
        self._audio_chunk_ms = check_int("Simulator audio_chunk_ms", audio_chunk_ms, minimum=1)
        self._wps = check_number("Simulator words_per_second", words_per_second, above=True)
        self._first_output_ms = check_number("Simulator first_output_ms", first_output_ms)
        self._min_response_ms = check_number("Simulator min_response_ms", min_response_ms)
        if not isinstance(transcription_failures, bool):
            raise InvalidArgument(f"Simulator transcription_failures must be a bool, got {transcription_failures!r}")
        self._transcription_failures = transcription_failures
        self._vad_create_delay_s = check_number("Simulator vad_create_delay_s", vad_create_delay_s)
        if max_sessions is not None:
            check_int("Simulator max_sessions", max_sessions, or_none=True)
        self._max_sessions = max_sessions
        if not isinstance(record, bool):
            raise InvalidArgument(f"Simulator record must be a bool, got {type(record).__name__} {record!r}")
        self._record = record
        self._close_timeout = check_number("Simulator close_timeout", close_timeout, above=True)
        self._max_duration = check_number("Simulator session_max_duration_s", session_max_duration_s, above=True)
        try:
            self._replay = load_replay(replay) if replay is not None else None
        except (OSError, ValueError) as exc:
            raise InvalidArgument(f"Simulator replay: cannot read {replay!r}: {exc}") from None
        self._replay_mismatches: list[dict[str, Any]] = []

        self._lock = threading.Lock()  # guards the fields below
        self._started = False
        self._closed = False
        self._next_index = 0
        self._live: dict[int, _Conn] = {}
        # Totals of finished sessions (one summary, so a long soak stays small).
        self._finished: dict[str, Counter[str]] = {"sums": Counter(), "errors": Counter(), "client_events": Counter()}
        self._extra: Counter[str] = Counter()
        self._refused: Counter[str] = Counter()  # connections refused, by error code
        self._faults_fired: Counter[str] = Counter()
        # How late each audio delta left against its due time, ms (loop thread appends; a bounded
        # window): a client's measured audio jitter is only its own when these stay small.
        self._audio_late_ms: deque[float] = deque(maxlen=100_000)
        self._client_log: dict[int, list[tuple[float, dict[str, Any]]]] = {}
        self._server_log: dict[int, list[tuple[float, dict[str, Any]]]] = {}

        # Loop-side state: created in start(), touched only on the loop thread.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: Server | None = None
        self._stop: asyncio.Event | None = None
        self._senders: set[asyncio.Task[None]] = set()  # strong refs: the loop keeps weak ones
        self._start_error: BaseException | None = None
        self._port = 0

        # wait_until(): a generation counter, bumped whenever a frame moves.
        self._changed = threading.Condition()
        self._generation = 0
        self._trace_lock = threading.Lock()
        self._trace_file: Recorder | None = None
        self._fault_rng = random.Random(f"faults|{seed}")

        # The phone network (SIP calls): started on first use (its two threads cost nothing
        # to apps that never call); its calls are driven on the loop.
        self._phone: PhoneNetwork | None = None
        self._phone_lock = threading.Lock()  # serialises its start; taken before _lock
        self._call_conns: dict[str, list[_Conn]] = {}  # loop thread only
        self._call_timers: dict[str, asyncio.TimerHandle] = {}  # loop thread only
        self._calls_made = 0

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Simulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> Simulator:
        """Bind and start serving; returns self.

        Raises ``RuntimeError`` if already started, and the ``OSError`` of the
        bind (e.g. port in use) if the server cannot listen.
        """
        with self._lock:
            if self._started:
                raise RuntimeError("Simulator already started")
            self._started = True
        if self._trace_path is not None:
            self._trace_file = Recorder(self._trace_path, source="simulator")
            self._trace_file.start({"simulator": {"seed": self._seed, "speed": self._speed,
                                                  "latency_ms": self._latency * 1000.0}})
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, args=(ready,), name="rtqueue-sim-loop", daemon=True)
        self._thread.start()
        ready.wait()  # set by the loop thread on every path, even a failing one
        if self._start_error is not None:
            self._thread.join()
            with self._lock:
                self._closed = True
            self._close_trace()
            raise self._start_error
        return self

    def close(self) -> None:
        """Stop serving, close every connection (code 1001), end the loop thread. Idempotent.

        Bounded: a client that stops reading is cut off after ``close_timeout``.
        """
        with self._lock:
            if self._closed or not self._started:
                self._closed = True
                return
            self._closed = True
        loop, thread, stop = self._loop, self._thread, self._stop
        assert loop is not None and thread is not None and stop is not None
        if thread is threading.current_thread():
            raise RuntimeError("Simulator.close() called from its own loop")
        with self._phone_lock:
            phone = self._phone
        if phone is not None:
            phone.close()  # its threads first: no call is driven or answered after this
        try:
            loop.call_soon_threadsafe(stop.set)
        except RuntimeError:
            pass  # the loop already ended
        thread.join(2 * self._close_timeout + 5.0)
        self._close_trace()
        self._notify()

    def _close_trace(self) -> None:
        with self._trace_lock:
            if self._trace_file is not None:
                self._trace_file.close()
                self._trace_file = None

    def _run_loop(self, ready: threading.Event) -> None:
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._main(ready))
        except BaseException as exc:  # reported to start() or logged
            if not ready.is_set():
                self._start_error = exc
            else:
                logging.getLogger("rtqueue.sim").exception("simulator loop failed")
        finally:
            ready.set()
            try:
                tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
                for t in tasks:
                    t.cancel()
                if tasks:
                    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    async def _main(self, ready: threading.Event) -> None:
        self._stop = asyncio.Event()
        try:
            server = await serve(
                self._handle,
                self._host,
                self._requested_port,
                process_request=self._process_request,
                compression=None,
                ping_interval=self._ping_interval,
                ping_timeout=None,  # pings only: no deadline on the pong is known of the real service
                close_timeout=self._close_timeout,
                max_size=16 * 2**20,
                server_header="rtqueue-sim",
                logger=_RedactingLogger(logging.getLogger("rtqueue.sim.websockets"), self._api_key),
            )
        except OSError as exc:
            self._start_error = exc
            ready.set()
            return
        self._server = server
        self._port = server.sockets[0].getsockname()[1]
        ready.set()
        await self._stop.wait()

        server.close(close_connections=False)  # stop accepting; we close the open ones below
        with self._lock:
            conns = list(self._live.values())
        if conns:
            await asyncio.gather(*(self._close_conn(c) for c in conns))
        try:
            await asyncio.wait_for(server.wait_closed(), self._close_timeout + 1.0)
        except asyncio.TimeoutError:
            pass  # whatever is left is cancelled by _run_loop

    async def _close_conn(self, conn: _Conn) -> None:
        try:
            # websockets bounds the closing handshake, but not a write blocked
            # on a client that stopped reading; this bounds both.
            await asyncio.wait_for(conn.ws.close(1001, "simulator shutting down"), self._close_timeout + 0.5)
        except (asyncio.TimeoutError, ConnectionClosed, OSError):
            pass
        conn.ws.transport.abort()

    def _call_in_loop(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop thread and wait for it (inline when already there)."""
        loop = self._loop
        if loop is None or self._thread is threading.current_thread():
            fn()
            return
        done = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # re-raised in the caller's thread
                failure.append(exc)
            finally:
                done.set()

        try:
            loop.call_soon_threadsafe(run)
        except RuntimeError:
            return  # the loop has ended: there is no live connection to change
        deadline = time.monotonic() + _CALL_TIMEOUT
        while not done.wait(0.05):
            if self._thread is None or not self._thread.is_alive():
                return  # closed meanwhile: the call is moot
            if time.monotonic() > deadline:
                raise TimeoutError("the simulator's loop did not answer in time")
        if failure:
            raise failure[0]

    # ------------------------------------------------------------------ public info

    @property
    def host(self) -> str:
        """The host the server is bound to."""
        return self._host

    @property
    def port(self) -> int:
        """The bound TCP port (0 before :meth:`start`)."""
        return self._port

    @property
    def url(self) -> str:
        """Full Realtime URL, e.g. ``ws://127.0.0.1:PORT/v1/realtime?model=gpt-realtime``."""
        return f"ws://{self._host}:{self._port}/v1/realtime?model=gpt-realtime"

    @property
    def websocket_base_url(self) -> str:
        """``ws://127.0.0.1:PORT/v1``, for ``OpenAI(websocket_base_url=...)``."""
        return f"ws://{self._host}:{self._port}/v1"

    def inject(self, plan: FaultPlan, session: int | None = None) -> None:
        """Apply ``plan`` from now on to session ``session`` (or every live and future one).

        It has taken effect when this returns. A session index that has not
        connected yet gets the plan when it does.
        """
        _check_plan("Simulator.inject() plan", plan, none_ok=False)
        if session is not None:
            check_int("Simulator.inject() session", session, or_none=True)
        with self._lock:
            if session is None:
                self._default_faults = plan
                targets = list(self._live.values())
            else:
                self._session_faults[session] = plan
                targets = [self._live[session]] if session in self._live else []
        if targets:
            self._call_in_loop(lambda: self._apply_all(targets, plan))

    def _apply_all(self, targets: list[_Conn], plan: FaultPlan) -> None:
        now = time.monotonic()
        for conn in targets:
            self._apply_faults(conn, plan, now)

    def stats(self) -> dict[str, Any]:
        """Server-side counters summed over all sessions, live and finished.

        Keys: ``sessions`` (connections accepted), ``active_sessions``,
        ``auth_failures`` (connections refused with close 3000), ``responses`` (created), ``completed``,
        ``cancelled``, ``incomplete``, ``withheld``, ``conflicts``
        (``conversation_already_has_active_response`` errors),
        ``cancel_not_active``, ``truncate_errors``, ``errors`` (code -> count,
        every error sent), ``client_events`` (type -> count),
        ``function_calls``, ``vad_speech_started``, ``vad_speech_stopped``,
        ``truncations``, ``server_events``, ``audio_ms_sent``, ``faults``
        (fault name -> times it fired).
        """
        with self._lock:
            live = list(self._live.values())
            acc = {k: Counter(v) for k, v in self._finished.items()}
            total: dict[str, Any] = {
                "sessions": self._next_index,
                "active_sessions": len(live),
                "auth_failures": self._extra["auth_failures"],
                "faults": dict(self._faults_fired),
            }
        for conn in live:
            with conn.lock:
                self._add_totals(acc, conn.core.stats())
        if self._phone is not None:  # a call's session is counted once, whoever is attached to it
            for call_stats in self._phone.core_stats():
                self._add_totals(acc, call_stats)
        sums, errors, client = acc["sums"], acc["errors"], acc["client_events"]
        with self._lock:
            errors.update(self._refused)
        for key in (
            "responses",
            "completed",
            "cancelled",
            "incomplete",
            "withheld",
            "conflicts",
            "cancel_not_active",
            "truncate_errors",
            "function_calls",
            "vad_speech_started",
            "vad_speech_stopped",
            "truncations",
            "server_events",
            "audio_ms_sent",
        ):
            total[key] = sums.get(key, 0)
        total["errors"] = {k: v for k, v in errors.items() if v}
        total["client_events"] = dict(client)
        if self._replay is not None:
            with self._lock:
                total["replay_mismatches"] = list(self._replay_mismatches)
        return total

    def audio_lateness(self, *, reset: bool = False) -> dict[str, float | int | None]:
        """How late audio deltas left against their schedule: ``n``, ``p50``, ``p99``, ``max`` (ms).

        Covers the last 100,000 deltas, or those since the last ``reset=True``
        call. A late delta reaches every client late; a benchmark subtracts
        nothing, it reports this next to the client's jitter.
        """
        samples = list(self._audio_late_ms)  # deque copy: safe against the loop thread's appends
        if reset:
            self._audio_late_ms.clear()
        if not samples:
            return {"n": 0, "p50": None, "p99": None, "max": None}
        return {"n": len(samples), "p50": percentile(samples, 50), "p99": percentile(samples, 99),
                "max": max(samples)}

    @staticmethod
    def _add_totals(acc: dict[str, Counter[str]], stats: dict[str, Any]) -> None:
        acc["errors"].update(stats["errors"])
        acc["client_events"].update(stats["client_events"])
        acc["sums"].update({k: v for k, v in stats.items() if isinstance(v, int)})

    def client_events(self, session: int | None = None) -> list[dict[str, Any]]:
        """Every client frame received (parsed JSON), in order; all sessions if ``None``.

        Frames that were not JSON appear as ``{"invalid_json": text}`` and
        binary ones as ``{"binary_len": n}``. Empty when ``record=False``.
        """
        return self._log(self._client_log, session)

    def server_events(self, session: int | None = None) -> list[dict[str, Any]]:
        """Every server frame sent, in wire order; all sessions (by send time) if ``None``."""
        return self._log(self._server_log, session)

    def _log(self, logs: dict[int, list[tuple[float, dict[str, Any]]]], session: int | None) -> list[dict[str, Any]]:
        with self._lock:
            if session is not None:
                return [ev for _, ev in list(logs.get(session, ()))]
            merged = [entry for i in sorted(logs) for entry in list(logs[i])]
        merged.sort(key=lambda e: e[0])
        return [ev for _, ev in merged]

    def wait_until(self, predicate: Callable[[Simulator], bool], timeout: float = 5.0) -> bool:
        """Block until ``predicate(self)`` is true (re-checked whenever a frame moves).

        Returns False on timeout. For tests: no sleeping to synchronise. The
        predicate runs in the caller's thread, never holding a lock the
        simulator's loop needs.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            seen = self._generation
        while not predicate(self):
            with self._changed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                if self._generation == seen:
                    self._changed.wait(min(left, 0.05))
                seen = self._generation
        return True

    # ------------------------------------------------------------------ connections

    def _process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if not path.rstrip("/").endswith("/realtime"):
            return ws.respond(404, "Not Found: the Realtime endpoint is /v1/realtime\n")
        with self._lock:
            if self._closed:
                return ws.respond(503, "Simulator closing\n")
            if self._max_sessions is not None and len(self._live) >= self._max_sessions:
                return ws.respond(429, "Too many concurrent sessions\n")
        return None

    def _refusal(self, ws: ServerConnection) -> tuple[str | None, str, int, str] | None:
        """Why the real service would refuse this connection after the upgrade, if it would.

        ``(error code, message, close code, close reason)``. Checked in the
        order: authentication, the retired beta header, the model (the order
        among them is our choice: no recording shows two at once).
        """
        request = ws.request
        headers = request.headers if request is not None else None
        if self._api_key is not None:
            if headers is None:
                return None, _NO_AUTH_MESSAGE, _AUTH_CLOSE_CODE, _NO_AUTH_REASON
            auth = (headers.get("Authorization") or "").strip()
            api_key = headers.get("api-key")
            scheme = auth.split(" ", 1)[0].lower()
            if scheme not in ("bearer", "basic") and api_key is None:  # none, or e.g. "Token x"
                return None, _NO_AUTH_MESSAGE, _AUTH_CLOSE_CODE, _NO_AUTH_REASON
            bearer = auth[len("Bearer ") :].strip() if auth.startswith("Bearer ") else None
            if bearer != self._api_key and (api_key or "").strip() != self._api_key:
                return "invalid_api_key", _BAD_KEY_MESSAGE, _AUTH_CLOSE_CODE, "invalid_request_error.invalid_api_key"
        if headers is not None:
            beta = ",".join(headers.get_all("OpenAI-Beta"))
            if "realtime=v1" in (part.strip().lower() for part in beta.split(",")):
                return "beta_api_shape_disabled", _BETA_MESSAGE, _REQUEST_CLOSE_CODE, (
                    "invalid_request_error.beta_api_shape_disabled"
                )
        query = parse_qs(urlsplit(request.path).query if request is not None else "", keep_blank_values=True)
        model = (query.get("model") or [""])[0]
        if not model:
            # A SIP call's control socket (?call_id=) and a transcription
            # session (?intent=transcription) need no model.
            if query.get("call_id") or "transcription" in query.get("intent", ()):
                return None
            return "missing_model", _MISSING_MODEL_MESSAGE, _REQUEST_CLOSE_CODE, "invalid_request_error.missing_model"
        if self._models is not None and model not in self._models:
            return "invalid_model", f'Model "{model}" is not supported in realtime mode.', _REQUEST_CLOSE_CODE, (
                "invalid_request_error.invalid_model"
            )
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        now = time.monotonic()
        with self._lock:
            index = self._next_index
            self._next_index += 1
            if self._record:
                self._client_log[index] = []
                self._server_log[index] = []
            closed = self._closed
        if closed:
            await ws.close(1001, "simulator shutting down")
            return
        core: SimSession | ReplaySession = self._sim_session(now, index)
        if self._replay is not None:  # serve a recording instead of the scripted model
            core = ReplaySession(self._replay, now=now, index=index, speed=self._speed,
                                 mismatches=self._replay_mismatches)
        conn = _Conn(index=index, ws=ws, core=core, last_due=now)
        refusal = self._refusal(ws)
        if refusal is not None:
            await self._reject(conn, *refusal)
            return
        call_id = _call_id_of(ws)
        if call_id is not None:
            # A SIP call's control socket joins the call's own session (or is refused).
            view = self._phone.attach(call_id, now, functools.partial(self._wake_call, call_id)) \
                if self._phone is not None else None
            if view is None:
                await self._reject(conn, "call_id_not_found", _NO_CALL_MESSAGE, _REQUEST_CLOSE_CODE,
                                   "invalid_request_error.call_id_not_found")
                return
            conn.core = view
            self._call_conns.setdefault(call_id, []).append(conn)
        with self._lock:
            self._live[index] = conn
            plan = self._session_faults.get(index, self._default_faults)
        try:
            if plan is not None:
                self._apply_faults(conn, plan, now)
            self._service(conn, now)
            await self._read_loop(conn)
        finally:
            if isinstance(conn.core, CallView):
                conn.core.detach()
                conns = self._call_conns.get(conn.core.call_id, [])
                if conn in conns:
                    conns.remove(conn)
            with conn.lock:
                conn.closed = True
                final = conn.core.stats()
                if conn.timer is not None:
                    # A closed session must not stay in the loop's timer heap
                    # until its next wake-up (up to the 60-minute expiry).
                    conn.timer.cancel()
                    conn.timer = None
            with self._lock:
                self._live.pop(index, None)
                self._add_totals(self._finished, final)
            self._notify()

    async def _reject(self, conn: _Conn, code: str | None, message: str, close_code: int, reason: str) -> None:
        """Refuse a connection as the real service does: one ``error`` event, then the close."""
        event = {
            "type": "error",
            "event_id": conn.core.new_event_id(),
            "error": {"type": "invalid_request_error", "code": code, "message": message, "param": None,
                      "event_id": None},
        }
        with self._lock:
            if close_code == _AUTH_CLOSE_CODE:
                self._extra["auth_failures"] += 1
            if code is not None:  # stats()["errors"] is by code; "missing auth" has none
                self._refused[code] += 1
        self._record_out(conn, event, time.monotonic())
        try:
            await conn.ws.send(json.dumps(event))
            await conn.ws.close(close_code, reason)
        except ConnectionClosed:
            pass
        self._notify()

    async def _read_loop(self, conn: _Conn) -> None:
        ws = conn.ws
        stop = self._stop
        assert stop is not None
        while True:
            st = conn.fault
            if st is not None and st.plan.stall_reading_s > 0 and st.stall_pending:
                st.stall_pending = False
                self._count_fault("stall_reading_s")
                # Waiting on the stop event, not sleeping: close() cuts it short.
                try:
                    await asyncio.wait_for(stop.wait(), st.plan.stall_reading_s)
                except asyncio.TimeoutError:
                    pass
            try:
                frame = await ws.recv()
            except ConnectionClosed:
                return
            t = time.monotonic()
            parsed: Any = None
            raw: str | bytes | None = None
            if isinstance(frame, str):
                try:
                    parsed = json.loads(frame)
                except ValueError:
                    raw = frame
            else:
                raw = frame
            logged = parsed if isinstance(parsed, dict) else _opaque(frame)
            self._record_in(conn, logged, t)
            with conn.lock:
                conn.inbound.append((t + self._latency, parsed, raw))
            self._service(conn, t)
            self._notify()

    # ------------------------------------------------------------------ phone calls

    @property
    def http_base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1``: the call-control REST endpoints (``OpenAI(base_url=...)``).

        ``POST /realtime/calls/{call_id}/accept|reject|refer|hangup``; see
        :mod:`rtqueue.sim.phone` for their rules and errors.
        """
        return self._phone_network().http_base_url

    def place_call(
        self,
        webhook_url: str,
        *,
        secret: str,
        caller: CallerScript | None = None,
        sip_headers: Sequence[tuple[str, str]] | Mapping[str, str] | None = None,
        clock_skew_s: float = 0.0,
    ) -> str:
        """Ring a SIP call into the app; returns its ``call_id`` at once.

        A signed ``realtime.call.incoming`` webhook (Standard Webhooks,
        signed with ``secret``, ``whsec_...``) is POSTed to ``webhook_url``
        (http on loopback only) from the ``rtqueue-sim-webhooks`` thread; a
        non-2xx answer or none is retried (see
        :data:`~rtqueue.sim.phone_net.WEBHOOK_RETRY_DELAYS`), after which the
        call ends unanswered. Accepting it (``/accept``, e.g. with
        :class:`rtqueue.sip.CallControl` at :attr:`http_base_url`) creates
        the call's session from the accept body and starts ``caller``'s
        script (:class:`~rtqueue.sim.phone.CallerScript`; none: a silent
        caller). ``sip_headers`` replace the default From/To/Call-ID;
        ``clock_skew_s`` shifts the sender's clock (stale-timestamp tests).
        """
        return self._phone_network().place_call(webhook_url, secret=secret, caller=caller or CallerScript(),
                                      sip_headers=sip_headers, clock_skew_s=clock_skew_s)

    def calls(self) -> list[CallRecord]:
        """Every call placed so far, as :class:`~rtqueue.sim.phone.CallRecord` snapshots, oldest first."""
        return self._phone.records() if self._phone is not None else []

    def call(self, call_id: str) -> CallRecord:
        """A snapshot of one call: status, transcript, DTMF, how it ended. ``KeyError`` if unknown."""
        record = self._phone.record(call_id) if self._phone is not None else None
        if record is None:
            raise KeyError(call_id)
        return record

    def _phone_network(self) -> PhoneNetwork:
        """The phone network, started on first use (binds its REST port on this host)."""
        with self._phone_lock:
            if self._phone is not None:
                return self._phone
            with self._lock:
                if not self._started or self._closed:
                    raise RuntimeError("the Simulator is not running")
            phone = PhoneNetwork(host=self._host, speed=self._speed, seed=self._seed, api_key=self._api_key,
                                 core_factory=self._new_call_core, wake=self._wake_call, notify=self._notify)
            phone.start()
            self._phone = phone
            return phone

    def _new_call_core(self, model: str, now: float) -> SimSession:
        """The session of a call being accepted (any thread): the simulator's settings, its own index."""
        with self._lock:
            self._calls_made += 1
            index = 1_000_000 + self._calls_made  # apart from connection indexes: ids stay distinct
        return self._sim_session(now, index, model=model)

    def _sim_session(self, now: float, index: int, **extra: Any) -> SimSession:
        """A scripted-model session with this simulator's settings (a connection's, or a call's)."""
        return SimSession(
            now=now,
            index=index,
            seed=self._seed,
            speed=self._speed,
            audio_chunk_ms=self._audio_chunk_ms,
            words_per_second=self._wps,
            max_duration_s=self._max_duration,
            epoch=time.time(),
            first_output_ms=self._first_output_ms,
            min_response_ms=self._min_response_ms,
            transcription_failures=self._transcription_failures,
            vad_create_delay_s=self._vad_create_delay_s,
            **extra,
        )

    def _wake_call(self, call_id: str) -> None:
        """Drive a call on the loop soon (any thread)."""
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._drive_call, call_id)
        except RuntimeError:
            pass  # the loop has ended: the call is over with the simulator

    def _drive_call(self, call_id: str) -> None:
        """Advance a call, push its events to its sockets, set its next timer (loop thread)."""
        phone = self._phone
        if phone is None:
            return
        now = time.monotonic()
        due = phone.drive(call_id, now)
        for conn in list(self._call_conns.get(call_id, ())):
            self._service(conn, now)
        timer = self._call_timers.pop(call_id, None)
        if timer is not None:
            timer.cancel()
        if due is not None:
            loop = self._loop
            assert loop is not None
            self._call_timers[call_id] = loop.call_at(max(due, now), self._drive_call, call_id)
        self._notify()

    # ------------------------------------------------------------------ faults

    def _apply_faults(self, conn: _Conn, plan: FaultPlan, now: float) -> None:
        with conn.lock:
            conn.fault = _FaultState(
                plan=plan,
                base=conn.sent,
                rng=random.Random(f"{self._seed}|{conn.index}|{self._fault_rng.random()}"),
            )
            if plan.withhold_done is not None:
                conn.core.withhold_done(plan.withhold_done)
            if plan.expire_after_s is not None:
                conn.core.expire_at(now + plan.expire_after_s)
        self._service(conn, now)
        # Injected frames are due now, even with nothing else queued.
        self._start_sender(conn)

    def _count_fault(self, name: str) -> None:
        with self._lock:
            self._faults_fired[name] += 1

    async def _fire_faults(self, conn: _Conn) -> bool:
        """Inject the "after N events" frames now due. Returns False if the connection was dropped."""
        st = conn.fault
        if st is None:
            return True
        plan = st.plan
        n = conn.sent - st.base
        extra: list[tuple[str, str | bytes, dict[str, Any]]] = []
        with conn.lock:
            if plan.malformed_json_after is not None and n >= plan.malformed_json_after and "malformed" not in st.fired:
                st.fired.add("malformed")
                extra.append(("malformed_json_after", _MALFORMED, {"invalid_json": _MALFORMED}))
            if plan.binary_frame_after is not None and n >= plan.binary_frame_after and "binary" not in st.fired:
                st.fired.add("binary")
                extra.append(("binary_frame_after", _BINARY, {"binary_len": len(_BINARY)}))
            if plan.unknown_event_after is not None and n >= plan.unknown_event_after and "unknown" not in st.fired:
                st.fired.add("unknown")
                ev = {
                    "type": "x.unknown.event",
                    "event_id": conn.core.new_event_id(),
                    "note": "injected by FaultPlan.unknown_event_after",
                }
                extra.append(("unknown_event_after", json.dumps(ev), ev))
            if plan.error_after is not None and n >= plan.error_after[0] and "error" not in st.fired:
                st.fired.add("error")
                code = plan.error_after[1]
                ev = conn.core.make_error(code, f"Simulated server error ({code}).")
                extra.append(("error_after", json.dumps(ev), ev))
            drop = plan.drop_after_events is not None and n >= plan.drop_after_events and "drop" not in st.fired
            if drop:
                st.fired.add("drop")
        for name, data, logged in extra:
            self._count_fault(name)
            self._record_out(conn, logged, time.monotonic())
            try:
                await conn.ws.send(data)
            except ConnectionClosed:
                return False
        if drop:
            self._count_fault("drop_after_events")
            self._drop(conn)
            return False
        return True

    def _drop(self, conn: _Conn) -> None:
        """Close the TCP connection with no close frame (the client sees 1006)."""
        with conn.lock:
            conn.closed = True
            conn.sendq.clear()
            conn.outbox.clear()
        conn.ws.transport.abort()

    # ------------------------------------------------------------------ scheduling

    def _service(self, conn: _Conn, now: float) -> None:
        """Feed due inbound frames, collect due output, schedule the next wake-up (loop thread)."""
        kick = False
        with conn.lock:
            if conn.closed:
                return
            if conn.wake_at is not None and conn.wake_at <= now:
                conn.wake_at = None
            core = conn.core
            while conn.inbound and conn.inbound[0][0] <= now:
                due, parsed, raw = conn.inbound.popleft()
                if raw is not None:
                    core.receive_raw(raw, due)
                else:
                    core.receive(parsed, due)
            events = core.advance(now)
            if events:
                self._enqueue_out(conn, events, now)
            if core.close_request is not None and not conn.close_queued:
                conn.close_queued = True
                conn.outbox.append(_Frame(due=max(conn.last_due, now), data=None, event=None, close=core.close_request))
            while conn.outbox and conn.outbox[0].due <= now:
                conn.sendq.append(conn.outbox.popleft())
            kick = bool(conn.sendq) and not conn.sending
            candidates = [core.next_due()]
            if conn.inbound:
                candidates.append(conn.inbound[0][0])
            if conn.outbox:
                candidates.append(conn.outbox[0].due)
            wake = min((c for c in candidates if c is not None), default=None)
            if wake is not None and (conn.wake_at is None or wake < conn.wake_at):
                conn.wake_at = wake
                if conn.timer is not None:
                    conn.timer.cancel()
                loop = self._loop
                assert loop is not None
                # loop.time() is time.monotonic() for asyncio's loops.
                conn.timer = loop.call_at(wake, self._on_timer, conn)
        if kick:
            self._start_sender(conn)

    def _on_timer(self, conn: _Conn) -> None:
        conn.timer = None
        self._service(conn, time.monotonic())
        self._notify()

    def _enqueue_out(self, conn: _Conn, events: list[dict[str, Any]], now: float) -> None:
        st = conn.fault
        delay = self._latency + (st.plan.delay_events_ms / 1000.0 if st is not None else 0.0)
        if st is not None and st.plan.delay_events_ms > 0:
            self._count_fault("delay_events_ms")
        for ev in events:
            # Never earlier than the previous frame: latency must not reorder.
            due = max(conn.last_due, now + delay)
            conn.last_due = due
            data = json.dumps(ev, separators=(",", ":"))
            conn.outbox.append(_Frame(due=due, data=data, event=ev))
            if (
                st is not None
                and st.plan.duplicate_events > 0
                and ev.get("type") not in _AUDIO_TYPES
                and st.rng.random() < st.plan.duplicate_events
            ):
                self._count_fault("duplicate_events")
                conn.outbox.append(_Frame(due=due, data=data, event=ev))

    def _start_sender(self, conn: _Conn) -> None:
        """Start ``conn``'s sender task unless one is running (loop thread)."""
        with conn.lock:
            if conn.sending or conn.closed:
                return
            conn.sending = True
        loop = self._loop
        assert loop is not None
        task = loop.create_task(self._run_sender(conn), name=f"rtqueue-sim-send-{conn.index}")
        self._senders.add(task)
        task.add_done_callback(self._senders.discard)

    async def _run_sender(self, conn: _Conn) -> None:
        try:
            alive = await self._fire_faults(conn)
            while alive:
                with conn.lock:
                    if not conn.sendq or conn.closed:
                        break
                    batch = list(conn.sendq)
                    conn.sendq.clear()
                for frame in batch:
                    if not await self._send_frame(conn, frame):
                        alive = False
                        break
        finally:
            # No await between the empty check above and this: a frame queued
            # meanwhile would otherwise find `sending` set and no sender.
            with conn.lock:
                conn.sending = False
            self._notify()

    async def _send_frame(self, conn: _Conn, frame: _Frame) -> bool:
        """Write one frame and apply the faults it triggers; False if the connection ended."""
        if frame.close is not None:
            try:
                await conn.ws.close(*frame.close)
            except Exception:
                pass
            return False
        if not await self._fire_faults(conn):
            return False
        assert frame.data is not None and frame.event is not None
        # Recorded just before the write, so a client that has received a frame
        # always finds it in server_events() (a write that then fails is rare
        # and means the connection is gone anyway).
        now = time.monotonic()
        self._record_out(conn, frame.event, now)
        try:
            await conn.ws.send(frame.data)
        except ConnectionClosed:
            return False
        if frame.event.get("type") in _AUDIO_TYPES:
            self._audio_late_ms.append((now - frame.due) * 1000.0)
        conn.sent += 1
        st = conn.fault
        if (
            st is not None
            and st.plan.drop_mid_response
            and "drop_mid" not in st.fired
            and frame.event.get("type") in _DELTA_TYPES
        ):
            st.deltas_seen += 1
            if st.deltas_seen >= 2:
                st.fired.add("drop_mid")
                self._count_fault("drop_mid_response")
                self._drop(conn)
                return False
        return await self._fire_faults(conn)

    # ------------------------------------------------------------------ records

    def _notify(self) -> None:
        with self._changed:
            self._generation += 1
            self._changed.notify_all()

    def _record_in(self, conn: _Conn, event: dict[str, Any], t: float) -> None:
        if self._record:
            self._client_log[conn.index].append((t, event))
        self._trace(conn.index, "in", event, t)

    def _record_out(self, conn: _Conn, event: dict[str, Any], t: float) -> None:
        if self._record:
            self._server_log[conn.index].append((t, event))
        self._trace(conn.index, "out", event, t)

    def _trace(self, index: int, direction: str, event: dict[str, Any], t: float) -> None:
        """Append a frame to the trace, an rtqueue recording (:mod:`rtqueue.recording`)."""
        recorder = self._trace_file
        if recorder is None:
            return
        sender: Literal["client", "server"] = "client" if direction == "in" else "server"
        if len(event) == 1 and isinstance(event.get("invalid_json"), str):
            recorder.write_raw(sender, event["invalid_json"], t=t, session=index)
        elif len(event) == 1 and isinstance(event.get("binary_len"), int):
            recorder.write_raw(sender, b"\0" * event["binary_len"], t=t, session=index)
        else:
            recorder.write(sender, event, t=t, session=index)


def _call_id_of(ws: ServerConnection) -> str | None:
    """The ``?call_id=`` of a connection's request, if any."""
    request = ws.request
    if request is None:
        return None
    value = (parse_qs(urlsplit(request.path).query).get("call_id") or [""])[0]
    return value or None


def _opaque(frame: str | bytes) -> dict[str, Any]:
    if isinstance(frame, str):
        return {"invalid_json": frame[:1000]}
    return {"binary_len": len(frame)}


_SECRET_HEADERS = frozenset({"authorization", "api-key", "openai-api-key"})


#: Wire-level trace of the simulator's connections: every handshake header,
#: frame and state change websockets reports at DEBUG. Off unless asked:
#: ``logging.getLogger("rtqueue.sim.wire").setLevel(logging.DEBUG)``. Its
#: level is pinned to INFO (when nobody set one), so an app that turns on
#: DEBUG for "rtqueue" does not get a line per frame; frames are only
#: formatted when this logger is enabled for DEBUG.
WIRE_LOGGER = "rtqueue.sim.wire"
_wire = logging.getLogger(WIRE_LOGGER)
if _wire.level == logging.NOTSET:
    _wire.setLevel(logging.INFO)


class _RedactingLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """The websockets server's logger: DEBUG to :data:`WIRE_LOGGER`, the rest to ``logger``; minus secrets.

    websockets decides once per connection, with :meth:`isEnabledFor`,
    whether to format its per-frame DEBUG lines; that answer is the wire
    logger's. Lifecycle messages (INFO and up: listening, connection
    open/rejected, errors) go to ``logger`` ("rtqueue.sim.websockets").
    At DEBUG websockets logs every handshake header (``< %s: %s``); the
    values of credential headers, the required key and anything key-shaped
    (:func:`~rtqueue.secrets.redact`) are replaced by ``***`` in the
    formatted line before a record is made.
    """

    def __init__(self, logger: logging.Logger, key: str | None) -> None:
        super().__init__(logger, {})
        self._key = key

    def _target(self, level: int) -> logging.Logger:
        return _wire if level < logging.INFO else self.logger

    def isEnabledFor(self, level: int) -> bool:
        return self._target(level).isEnabledFor(level)

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        target = self._target(level)
        if not target.isEnabledFor(level):
            return
        clean = list(args)
        if len(clean) >= 2 and isinstance(clean[0], str) and clean[0].lower() in _SECRET_HEADERS:
            clean[1] = "***"
        text = str(msg)
        if clean:
            try:
                text = text % tuple(clean)
            except (TypeError, ValueError):
                text = f"{text} {clean!r}"
        target.log(level, "%s", redact(text, self._key), **kwargs)
