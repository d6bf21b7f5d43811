"""The five clients the conflict benchmark compares, behind one small driver interface.

Every client offers the same calls to the workload scripts:

- ``connect(url, spec)``; ``close()``;
- ``say(text, key)``: add a user text message, then ask for a response;
- ``request(key)``: ask for a response (a UI button, a timer);
- ``push_audio(pcm)``: microphone audio (``input_audio_buffer.append``);
- ``tap``: the driver waits on server events it needs (``response.created``,
  ``input_audio_buffer.speech_started``...);
- ``quiet(timeout)``: nothing queued, running or in flight on the client side;
- ``gate_latencies_ms()``: release read -> next create written, for creates that
  waited (``None`` when the client has no such thing);
- ``asked``: the intent keys the client asked for (app requests and follow-ups).

Every ``response.create`` carries ``response.metadata.bench_intent`` (the
intent key) when the client lets us tag it, so the simulator's own logs tell
which intents produced a response (see ``_common.tally``).

The three baselines (:class:`RawClient`) are real, small apps over
websocket-client: a reader thread, a writer thread draining a FIFO of control
events, a 4-thread tool pool, and the mic sending audio directly (under the
send lock, so audio never waits behind a held create). They share all app logic
and differ only in how the writer decides that a ``response.create`` may go:

- ``naive``: sends at once;
- ``flag``: a ``has_active_response`` bool set on ``response.created`` and
  cleared on ``response.done`` (any response); the writer waits on an Event
  while it is set;
- ``poll``: a set of active response ids (added on created, removed by id on
  done); the writer sleeps 5 ms between checks; no condition variable, no
  tracking of creates sent but not yet ``response.created``.

App logic shared by the baselines (the common pattern in Realtime apps and
examples): each function call is run as soon as its
``response.function_call_arguments.done`` arrives; when it finishes, its output
is sent and a follow-up ``response.create`` is asked for (a handoff also sends
the new agent's ``session.update`` first). The follow-ups of one response share
one intent key ``fu:<response id>``, so several calls in one response show up
as duplicates when more than one follow-up produces a response. On
``input_audio_buffer.speech_started`` they stop playback, cancel if they
believe a response is active (naive: always; flag: if the flag is set; poll:
each active id) and truncate the playing item at the played milliseconds,
clamped to the audio received. Every client plays the assistant's audio on
the same device-less speaker (``rtqueue.audio.NullSpeaker`` paced like the
simulator), except openai-agents, which uses its own playback tracker.

Output guardrails (``Spec.guard``, the ``guardrails`` workload; rtqueue and
openai-agents only, the baselines have none): both SDKs get the same check,
:func:`guard_tripped` (the word :data:`GUARD_WORD` in the assistant's
transcript), run every :data:`GUARD_EVERY_CHARS` characters of it, and each
counts its trips from its own ``guardrail tripped`` events. What happens on a
trip is each SDK's own: rtqueue's cancel, truncate, system note and one
correction through its gate; openai-agents' interrupt (``response.cancel``)
and its follow-up user message ``guardrail triggered: <name>``.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import math
import secrets
import threading
import time
import zlib
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import attrs
import websocket  # websocket-client

WATCH = frozenset(
    {
        "response.created",
        "response.done",
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "error",
    }
)

#: Tools of the tool-chain workload: name -> its one string parameter.
TOOL_PARAMS = {"get_weather": "city", "get_time": "city", "lookup_order": "order_id", "get_stock": "symbol"}
TOOL_DESCRIPTIONS = {
    "get_weather": "Weather report for a city.",
    "get_time": "Local time in a city.",
    "lookup_order": "Look up an order by its id.",
    "get_stock": "Stock level of a product symbol.",
}


def tool_duration_s(name: str, value: str, seed: int) -> float:
    """How long a tool call takes: 0-50 ms, the same for every client given the same call."""
    return (zlib.crc32(f"{seed}|{name}|{value}".encode()) % 51) / 1000.0


def run_tool_sync(name: str, value: str, seed: int) -> dict[str, Any]:
    """The tools' work (a sleep of 0-50 ms) and their result."""
    time.sleep(tool_duration_s(name, value, seed))
    return {"tool": name, "value": value, "ok": True}


#: The output guardrail of the ``guardrails`` workload trips on this word in the assistant's words.
GUARD_WORD = "refund"
GUARD_NAME = "no_money_back_talk"  # its name must not hold the word: the agents SDK says it back
#: Both SDKs run it every this many characters of a response's transcript.
GUARD_EVERY_CHARS = 20
#: rtqueue's correction note: the same words as openai-agents' follow-up message, plus the simulator
#: hook that makes the scripted model's correction clean (openai-agents' message, a new user turn, is
#: answered by the scripted model with an echo of its own words, which is clean already).
RTQ_CORRECTION = f"guardrail triggered: {GUARD_NAME} [say: Sorry, let me put that another way.]"


def guard_tripped(text: str) -> bool:
    """The guardrail's check, the same function for both SDKs."""
    return GUARD_WORD in text.lower()


def handoff_name(agent: str) -> str:
    return "transfer_to_" + agent


@attrs.define
class Spec:
    """What a workload needs from a session."""

    speed: float  # simulator pacing (the playback clocks run at the same speed)
    seed: int = 0
    agents: tuple[str, ...] = ()  # handoff storm: every agent can hand off to every other
    tools: tuple[str, ...] = ()  # tool chains
    vad: bool = False  # server VAD with create_response and interrupt_response
    guard: bool = False  # an output guardrail on every response (guard_tripped)
    watch: tuple[str, ...] = ()  # server events the workload script waits for

    def instructions(self, agent: str | None) -> str:
        return f"You are the {agent} agent." if agent else "You are a helpful voice assistant."

    def vad_config(self) -> dict[str, Any] | None:
        if not self.vad:
            return None
        return {"type": "server_vad", "create_response": True, "interrupt_response": True,
                "silence_duration_ms": 500, "prefix_padding_ms": 300, "threshold": 0.5}

    def function_tools(self, agent: str | None) -> list[dict[str, Any]]:
        """GA function tool definitions for the baselines (same names and schemas as the others)."""
        out: list[dict[str, Any]] = []
        for name in self.tools:
            param = TOOL_PARAMS[name]
            out.append({"type": "function", "name": name, "description": TOOL_DESCRIPTIONS[name],
                        "parameters": {"type": "object", "properties": {param: {"type": "string"}},
                                       "required": [param]}})
        for other in self.agents:
            if other != agent:
                out.append({"type": "function", "name": handoff_name(other),
                            "description": f"Hand the conversation to the {other} agent.",
                            "parameters": {"type": "object", "properties": {}}})
        return out


class Tap:
    """Counts the server events the driver waits for; ``wait(type, mark, timeout)``."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._counts: Counter[str] = Counter()
        self._last: dict[str, dict[str, Any]] = {}
        self.last_frame = time.monotonic()

    def push(self, typ: str, event: dict[str, Any]) -> None:
        with self._cond:
            self._counts[typ] += 1
            self._last[typ] = event
            self.last_frame = time.monotonic()
            self._cond.notify_all()

    def mark(self, typ: str) -> int:
        with self._cond:
            return self._counts[typ]

    def count(self, typ: str) -> int:
        return self.mark(typ)

    def wait(self, typ: str, mark: int, timeout: float) -> dict[str, Any] | None:
        with self._cond:
            if self._cond.wait_for(lambda: self._counts[typ] > mark, timeout):
                return self._last[typ]
            return None


# ------------------------------------------------------------------------------------------
# The three baselines


class RawClient:
    """naive / flag / poll over websocket-client (see the module docstring)."""

    def __init__(self, strategy: str) -> None:
        if strategy not in ("naive", "flag", "poll"):
            raise ValueError(strategy)
        self.name = strategy
        self.tap = Tap()
        self.asked: set[str] = set()
        self.latencies: list[float] = []
        self.send_errors = 0
        self._ws: websocket.WebSocket | None = None
        self._spec: Spec | None = None
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._queue: deque[dict[str, Any]] = deque()
        self._busy = False
        self._stop = False
        self._threads: list[threading.Thread] = []
        self._pool: ThreadPoolExecutor | None = None
        self._tools_running = 0
        self._agent: str | None = None
        self._player: Any = None  # rtqueue.audio.NullSpeaker: the same device-less speaker for every client
        # strategy state
        self._has_active = False  # flag
        self._idle = threading.Event()  # flag: set while has_active is False
        self._idle.set()
        self._active_ids: set[str] = set()  # poll
        self._last_release: float | None = None  # perf_counter when a response.done was read
        # instrumentation only (for quiet()), never used to decide anything
        self._outstanding: set[str] = set()
        self._live: set[str] = set()

    # -- driver interface -----------------------------------------------------------------

    def connect(self, url: str, spec: Spec) -> None:
        self._spec = spec
        from rtqueue.audio import NullSpeaker

        self._player = NullSpeaker(speed=spec.speed)
        self._player.start()
        # Same socket options as rtqueue's transport (skip_utf8_validation: the
        # pure-Python UTF-8 check would cost these clients ~35 ms per response).
        self._ws = websocket.create_connection(url, header=["Authorization: Bearer sk-bench"], timeout=10,
                                               enable_multithread=True, skip_utf8_validation=True)
        self._ws.settimeout(None)
        self._pool = ThreadPoolExecutor(4, thread_name_prefix=f"bench-{self.name}-tool")
        self._agent = spec.agents[0] if spec.agents else None
        session: dict[str, Any] = {"type": "realtime", "instructions": spec.instructions(self._agent),
                                   "tools": spec.function_tools(self._agent),
                                   "audio": {"input": {"turn_detection": spec.vad_config()}}}
        for target, role in ((self._read_loop, "reader"), (self._write_loop, "writer")):
            t = threading.Thread(target=target, name=f"bench-{self.name}-{role}", daemon=True)
            self._threads.append(t)
        mark = self.tap.mark("session.updated")
        self._threads[0].start()
        self._threads[1].start()
        self._enqueue({"type": "session.update", "session": session})
        if self.tap.wait("session.updated", mark, 10.0) is None:
            raise RuntimeError(f"{self.name}: no session.updated")

    def say(self, text: str, key: str) -> None:
        self._enqueue({"type": "conversation.item.create",
                       "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}})
        self.request(key)

    def request(self, key: str) -> None:
        self.asked.add(key)
        self._enqueue({"type": "response.create", "response": {"metadata": {"bench_intent": key}}})

    def push_audio(self, pcm: bytes) -> None:
        self._send_now({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode("ascii")})

    def quiet(self, timeout: float, settle: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._cond:
                idle = not self._queue and not self._busy and self._tools_running == 0
            if idle and not self._outstanding and not self._live and time.monotonic() - self.tap.last_frame >= settle:
                return True
            time.sleep(0.005)
        return False

    def gate_latencies_ms(self) -> list[float] | None:
        return None if self.name == "naive" else list(self.latencies)

    def extra(self) -> dict[str, Any]:
        return {"send_errors": self.send_errors}

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._idle.set()
        ws = self._ws
        if ws is not None:
            try:
                with self._send_lock:
                    ws.send_close()
            except Exception:
                pass
        for t in self._threads:
            t.join(3.0)
        if ws is not None:
            try:
                ws.close(timeout=1)
            except Exception:
                pass
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._player is not None:
            self._player.close()

    # -- sending ----------------------------------------------------------------------------------

    def _enqueue(self, event: dict[str, Any]) -> None:
        event.setdefault("event_id", "evt_b_" + secrets.token_hex(8))
        with self._cond:
            self._queue.append(event)
            self._cond.notify()

    def _send_now(self, event: dict[str, Any]) -> None:
        event.setdefault("event_id", "evt_b_" + secrets.token_hex(8))
        self._send_text(json.dumps(event))

    def _send_text(self, text: str) -> None:
        ws = self._ws
        if ws is None:
            return
        try:
            with self._send_lock:
                ws.send(text)
        except Exception:
            self.send_errors += 1

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                event = self._queue.popleft()
                self._busy = True
            try:
                if event["type"] == "response.create":
                    t_wait = time.perf_counter()
                    waited = self._gate_wait()
                    if self._stop:
                        return
                    self._outstanding.add(event["event_id"])
                    event["response"]["metadata"]["bench_eid"] = event["event_id"]
                    text = json.dumps(event)
                    t_write = time.perf_counter()  # measured as rtqueue does: when the write starts
                    self._send_text(text)
                    rel = self._last_release
                    if waited and rel is not None and rel >= t_wait:
                        self.latencies.append((t_write - rel) * 1000.0)
                else:
                    self._send_text(json.dumps(event))
            finally:
                with self._cond:
                    self._busy = False

    def _gate_wait(self) -> bool:
        """Strategy: block until a response.create may go; returns whether it had to wait."""
        if self.name == "naive":
            return False
        if self.name == "flag":
            if self._idle.is_set():
                return False
            while not self._idle.wait(0.5):
                if self._stop:
                    break
            return True
        # poll
        if not self._active_ids:
            return False
        deadline = time.monotonic() + 600
        while self._active_ids and not self._stop and time.monotonic() < deadline:
            time.sleep(0.005)
        return True

    # -- reading ------------------------------------------------------------------------------------

    def _read_loop(self) -> None:
        ws = self._ws
        assert ws is not None
        while True:
            try:
                frame = ws.recv()
            except Exception:
                break
            if not frame:
                break
            t = time.perf_counter()
            try:
                event = json.loads(frame)
            except ValueError:
                continue
            typ = event.get("type")
            if typ == "response.output_audio.delta":
                self._player.play(event.get("item_id") or "", base64.b64decode(event.get("delta") or ""))
                self.tap.last_frame = time.monotonic()
                continue
            if typ == "response.output_audio.done":
                self._player.end_item(event.get("item_id") or "")
            if typ == "response.created":
                rid = event["response"]["id"]
                if self.name == "flag":
                    self._has_active = True
                    self._idle.clear()
                elif self.name == "poll":
                    self._active_ids.add(rid)
                self._live.add(rid)
                meta = event["response"].get("metadata") or {}
                self._outstanding.discard(meta.get("bench_eid"))
            elif typ == "response.done":
                rid = event["response"]["id"]
                self._last_release = t
                if self.name == "flag":
                    self._has_active = False
                    self._idle.set()
                elif self.name == "poll":
                    self._active_ids.discard(rid)
                self._live.discard(rid)
            elif typ == "error":
                self._outstanding.discard((event.get("error") or {}).get("event_id"))
            elif typ == "response.function_call_arguments.done":
                self._start_call(event)
            elif typ == "input_audio_buffer.speech_started":
                self._barge_in()
            if typ in WATCH or typ == "session.updated":
                self.tap.push(typ, event)
            else:
                self.tap.last_frame = time.monotonic()

    def _barge_in(self) -> None:
        cut = self._player.interrupt()
        if self.name == "naive":
            self._send_now({"type": "response.cancel"})
        elif self.name == "flag":
            if self._has_active:
                self._send_now({"type": "response.cancel"})
        else:
            for rid in list(self._active_ids):
                self._send_now({"type": "response.cancel", "response_id": rid})
        if cut is not None:
            ms = math.floor(min(cut.played_ms, cut.received_ms))
            if ms > 0:
                self._send_now({"type": "conversation.item.truncate", "item_id": cut.item_id, "content_index": 0,
                                "audio_end_ms": ms})

    def _start_call(self, event: dict[str, Any]) -> None:
        assert self._pool is not None
        with self._cond:
            self._tools_running += 1
        self._pool.submit(self._run_call, event.get("response_id") or "", event.get("call_id") or "",
                          event.get("name") or "", event.get("arguments") or "{}")

    def _run_call(self, rid: str, call_id: str, name: str, arguments: str) -> None:
        spec = self._spec
        assert spec is not None
        try:
            try:
                args = json.loads(arguments)
            except ValueError:
                args = {}
            if name.startswith("transfer_to_") and name[len("transfer_to_"):] in spec.agents:
                target = name[len("transfer_to_"):]
                output: dict[str, Any] = {"assistant": target, "status": "transferred"}
                self._enqueue({"type": "conversation.item.create",
                               "item": {"type": "function_call_output", "call_id": call_id,
                                        "output": json.dumps(output)}})
                self._enqueue({"type": "session.update",
                               "session": {"type": "realtime", "instructions": spec.instructions(target),
                                           "tools": spec.function_tools(target)}})
                self._agent = target
            else:
                value = str(args.get(TOOL_PARAMS.get(name, ""), ""))
                output = run_tool_sync(name, value, spec.seed)
                self._enqueue({"type": "conversation.item.create",
                               "item": {"type": "function_call_output", "call_id": call_id,
                                        "output": json.dumps(output)}})
            self.request(f"fu:{rid}")
        finally:
            with self._cond:
                self._tools_running -= 1


# ------------------------------------------------------------------------------------------
# rtqueue


class RtqueueClient:
    """rtqueue's :class:`Session`, used as its docs say (agents, @tool, NullSpeaker for barge-in)."""

    name = "rtqueue"

    def __init__(self) -> None:
        self.tap = Tap()
        self.asked: set[str] = set()
        self.session: Any = None
        self.handles: list[Any] = []
        self._fu = itertools.count()
        self.guardrail_trips = 0

    def connect(self, url: str, spec: Spec) -> None:
        from rtqueue import Agent, Session, tool
        from rtqueue.audio import AudioIO, NullSpeaker

        tools = [tool(_make_tool(name, spec.seed), name=name, description=TOOL_DESCRIPTIONS[name])
                 for name in spec.tools]
        agents = [Agent(name=a, instructions=spec.instructions(a), tools=tools,
                        handoffs=[o for o in spec.agents if o != a])
                  for a in spec.agents]
        if not agents:
            agents = [Agent(name="assistant", instructions=spec.instructions(None), tools=tools)]
        # Every client plays the assistant's audio (here on a device-less clock).
        audio = AudioIO(output=NullSpeaker(speed=spec.speed), input=None)
        guards = None
        if spec.guard:
            from rtqueue import GuardrailResult, output_guardrail

            guards = [output_guardrail(lambda ctx: GuardrailResult(guard_tripped(ctx.text), message=RTQ_CORRECTION),
                                       name=GUARD_NAME, every_chars=GUARD_EVERY_CHARS)]
        self.session = Session.connect(
            url, agent=agents[0], agents=agents[1:], turn_detection=spec.vad_config(), audio=audio,
            api_key="sk-bench", name=f"bench-{secrets.token_hex(2)}", reconnect=False, output_guardrails=guards,
        )
        session = self.session
        original = session.create_response

        def create_response(**params: Any) -> Any:
            # The session's own follow-ups (after tools and handoffs) come through
            # here too: tag them so the server's logs can count them.
            if "metadata" not in params:
                key = f"fu:rtq{next(self._fu)}"
                self.asked.add(key)
                params["metadata"] = {"bench_intent": key}
            return original(**params)

        session.create_response = create_response
        if spec.guard:
            session.on("guardrail.tripped", self._tripped)
        for typ in spec.watch:  # only what the script needs: each one wakes the dispatcher thread
            session.on(typ, lambda ev, typ=typ: self.tap.push(typ, ev.data))

    def _tripped(self, ev: Any) -> None:
        if ev["kind"] == "output":  # one dispatcher thread: no lock needed
            self.guardrail_trips += 1

    def say(self, text: str, key: str) -> None:
        self.session.send_text(text)
        self.request(key)

    def request(self, key: str) -> None:
        self.asked.add(key)
        self.handles.append(self.session.create_response(metadata={"bench_intent": key}))

    def push_audio(self, pcm: bytes) -> None:
        self.session.append_audio(pcm)

    def quiet(self, timeout: float, settle: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.session.wait_idle(max(0.01, deadline - time.monotonic())):
                time.sleep(settle)  # a finished response's tools are handed over just after its done
                if self.session.wait_idle(0.01):
                    return True
        return False

    def gate_latencies_ms(self) -> list[float] | None:
        return self.session.gate.latencies_ms()

    def extra(self) -> dict[str, Any]:
        st = self.session.gate.stats()
        failed = sum(1 for h in self.handles if h.done() and h.error is not None)
        return {"gate_retried": st.retried, "gate_rejected": st.rejected, "gate_timed_out": st.timed_out,
                "handles_failed": failed, "threads": len(self.session.threads()),
                "guardrail_trips": self.guardrail_trips}

    def close(self) -> None:
        if self.session is not None:
            self.session.close()


def _make_tool(name: str, seed: int) -> Any:
    param = TOOL_PARAMS[name]

    def impl(**kwargs: str) -> dict[str, Any]:
        return run_tool_sync(name, str(kwargs.get(param, "")), seed)

    # A real signature for @tool's schema: one required string parameter.
    ns: dict[str, Any] = {"impl": impl}
    exec(f"def {name}({param}: str) -> dict:\n    return impl({param}={param})\n", ns)
    fn = ns[name]
    fn.__doc__ = TOOL_DESCRIPTIONS[name]
    return fn


# ------------------------------------------------------------------------------------------
# openai-agents


class AgentsClient:
    """openai-agents' RealtimeSession (asyncio, on its own loop thread) pointed at the simulator.

    App requests go through the SDK's raw-message path
    (``RealtimeModelSendRawMessage``), whose ``response.create`` the SDK itself
    sequences (its "manual" create path), so they can carry the intent tag;
    tool calls and handoffs are the SDK's own (``function_tool``, agent
    ``handoffs``); barge-in is the SDK's own handling of ``speech_started``.
    """

    name = "openai-agents"

    def __init__(self) -> None:
        self.tap = Tap()
        self.asked: set[str] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="bench-agents-loop", daemon=True)
        self._session: Any = None
        self._pump: Any = None
        self._live: set[str] = set()
        # Guardrails workload only: app intents asked for whose response was not created yet. Its turns
        # must not start before the previous one's create even went out (the SDK holds creates in its
        # sequencer, where _live cannot see them); the other workloads keep their pacing.
        self._waiting: set[str] = set()
        self._track_waiting = False
        self.session_events: Counter[str] = Counter()

    def _run(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def connect(self, url: str, spec: Spec) -> None:
        self._track_waiting = spec.guard
        self._thread.start()
        self._run(self._open(url, spec))

    async def _open(self, url: str, spec: Spec) -> None:
        from agents import function_tool
        from agents.realtime import RealtimeAgent, RealtimeRunner

        tools = [function_tool(_make_async_tool(name, spec.seed), name_override=name,
                               description_override=TOOL_DESCRIPTIONS[name]) for name in spec.tools]
        names = list(spec.agents) or ["assistant"]
        agents = {a: RealtimeAgent(name=a, instructions=spec.instructions(a if spec.agents else None), tools=tools)
                  for a in names}
        for a, agent in agents.items():
            agent.handoffs = [agents[o] for o in names if o != a]
        settings: dict[str, Any] = {"turn_detection": spec.vad_config(), "output_modalities": ["audio"]}
        config: dict[str, Any] = {}
        if spec.guard:
            from agents import GuardrailFunctionOutput, OutputGuardrail

            def check(_ctx: Any, _agent: Any, text: Any) -> GuardrailFunctionOutput:
                tripped = guard_tripped(str(text))
                return GuardrailFunctionOutput(output_info={"tripped": tripped}, tripwire_triggered=tripped)

            config = {"output_guardrails": [OutputGuardrail(guardrail_function=check, name=GUARD_NAME)],
                      "guardrails_settings": {"debounce_text_length": GUARD_EVERY_CHARS}}
        runner = RealtimeRunner(agents[names[0]], config=config or None)
        self._session = await runner.run(model_config={"url": url, "api_key": "sk-bench",
                                                       "initial_model_settings": settings})
        await self._session.__aenter__()
        self._pump = asyncio.ensure_future(self._pump_events())

    async def _pump_events(self) -> None:
        async for ev in self._session:
            if ev.type == "raw_model_event":
                data = getattr(ev.data, "data", None)
                if getattr(ev.data, "type", None) == "raw_server_event" and isinstance(data, dict):
                    typ = data.get("type")
                    if typ == "response.created":
                        self._live.add(data["response"]["id"])
                        self._waiting.discard((data["response"].get("metadata") or {}).get("bench_intent"))
                    elif typ == "response.done":
                        self._live.discard(data["response"]["id"])
                    if typ in WATCH:
                        self.tap.push(typ, data)
                    else:
                        self.tap.last_frame = time.monotonic()
            else:
                self.session_events[ev.type] += 1

    async def _send_raw(self, typ: str, data: dict[str, Any]) -> None:
        from agents.realtime.model_inputs import RealtimeModelSendRawMessage

        await self._session.model.send_event(RealtimeModelSendRawMessage(message={"type": typ, "other_data": data}))

    def say(self, text: str, key: str) -> None:
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
        self._run(self._send_raw("conversation.item.create", {"item": item}))
        self.request(key)

    def request(self, key: str) -> None:
        self.asked.add(key)
        if self._track_waiting:
            self._waiting.add(key)
        eid = "evt_oa_" + secrets.token_hex(8)
        self._run(self._send_raw("response.create", {"event_id": eid, "response": {"metadata": {"bench_intent": key}}}))

    def push_audio(self, pcm: bytes) -> None:
        self._run(self._session.send_audio(pcm))

    def quiet(self, timeout: float, settle: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._live and not self._waiting and time.monotonic() - self.tap.last_frame >= settle:
                return True
            time.sleep(0.005)
        return False

    def gate_latencies_ms(self) -> list[float] | None:
        return None  # its sequencer is internal; not measured

    def extra(self) -> dict[str, Any]:
        return {"session_events": dict(self.session_events),
                "guardrail_trips": self.session_events["guardrail_tripped"]}

    def close(self) -> None:
        async def shut() -> None:
            if self._session is not None:
                await self._session.close()
            if self._pump is not None:
                self._pump.cancel()
                try:
                    await self._pump
                except BaseException:
                    pass

        try:
            self._run(shut(), 15.0)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5.0)
            if not self._thread.is_alive():
                self._loop.close()


def _make_async_tool(name: str, seed: int) -> Any:
    param = TOOL_PARAMS[name]

    async def impl(**kwargs: str) -> dict[str, Any]:
        value = str(kwargs.get(param, ""))
        await asyncio.sleep(tool_duration_s(name, value, seed))
        return {"tool": name, "value": value, "ok": True}

    ns: dict[str, Any] = {"impl": impl}
    exec(f"async def {name}({param}: str) -> dict:\n    return await impl({param}={param})\n", ns)
    fn = ns[name]
    fn.__doc__ = TOOL_DESCRIPTIONS[name]
    return fn


def agents_available() -> str | None:
    """``None`` when openai-agents imports, else why not."""
    try:
        import agents  # noqa: F401
        from agents.realtime import RealtimeRunner  # noqa: F401
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def warm_imports() -> None:
    """Import everything the clients use, so no run's CPU time pays for imports."""
    import rtqueue
    import rtqueue.audio
    import rtqueue.sim

    assert rtqueue.Session is not None
    if agents_available() is None:
        import agents.realtime.model_inputs  # noqa: F401
        from agents import function_tool  # noqa: F401


def make_client(strategy: str) -> Any:
    if strategy in ("naive", "flag", "poll"):
        return RawClient(strategy)
    if strategy == "rtqueue":
        return RtqueueClient()
    if strategy == "openai-agents":
        return AgentsClient()
    raise ValueError(strategy)
