"""``rtqueue demo --phone``: a support desk that answers phone calls, on the simulator.

Two ways a call reaches the app, one desk behind both (front desk + billing,
``lookup_order`` and ``check_invoice`` tools, a transfer to a human, a hang-up):

- :func:`run_sip_desk`: **OpenAI SIP**. The simulator's phone network rings the
  app's webhook (a loopback HTTP server, :class:`WebhookReceiver`, checking each
  delivery with :func:`rtqueue.sip.verify_webhook`); the app accepts with
  :class:`rtqueue.sip.CallControl` and steers the call with
  ``Session.connect(call_id=..., agent=...)``. The transfer is a SIP REFER
  (:func:`rtqueue.sip.refer_tool`), the hang-up :func:`rtqueue.sip.hangup_tool`.
  A scripted caller (:class:`rtqueue.sim.phone.CallerScript`) speaks, presses
  a key, interrupts the agent once and asks for a human.
- :func:`run_twilio_desk`: **Twilio Media Streams**. The audio flows through the
  app: a :class:`rtqueue.twilio.TwilioBridge` joins the call to a ``pcmu``
  session; a :class:`rtqueue.testing_twilio.FakeTwilio` call is the caller
  (same script), and records what it heard, so the truncation after its
  barge-in is compared with the audio it really played.

Both print the call as it happens and return a summary whose last line,
printed as one JSON object, has ``conflicts``, ``lost_intents``, ``handoffs``,
``tool_calls``, ``barge_ins``, ``truncate_errors`` (and for Twilio
``max_truncate_error_ms``). ``examples/phone_sip.py`` and
``examples/phone_twilio.py`` run them; nothing here talks to anything but
127.0.0.1 unless ``live=True``.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .agents import Agent
from .demo_desk import lookup_order
from .errors import RtqueueError, WebhookVerificationError
from .handles import ResponseHandle
from .session import Session
from .tools import Tool, tool
from .values import Event

if TYPE_CHECKING:
    from .sim import Simulator
    from .sip import IncomingCall
    from .testing_twilio import FakeCall
    from .twilio import TwilioCall

__all__ = [
    "HUMAN_DESK",
    "CallLog",
    "WebhookReceiver",
    "build_phone_desk",
    "phone_demo",
    "run_sip_desk",
    "run_twilio_desk",
    "sip_caller_script",
]

#: Where "a human, please" transfers the caller.
HUMAN_DESK = "sip:humans@desk.example.com"
#: The keypad menu: this key hands the caller to billing.
BILLING_KEY = "2"
#: Silence after the caller's speech before server VAD ends the turn (both desks).
_SILENCE_MS = 300
#: The long answer the caller cuts off (the ``[len: N]`` hook sets its word count on the simulator).
LONG_QUESTION = "Explain the late fees to me [len: 60]"
_CONFLICT = "conversation_already_has_active_response"
_DTMF = "input_audio_buffer.dtmf_event_received"


@tool
def check_invoice(invoice_id: str) -> dict[str, object]:
    """Check whether an invoice is paid.

    Args:
        invoice_id: The invoice number.
    """
    number = invoice_id.strip("# ")
    return {"invoice": number, "status": "paid" if number in ("7", "77") else "open", "amount": 54.5}


def build_phone_desk(call_tools: Sequence[Tool]) -> Agent:
    """The phone desk's agents; ``call_tools`` (transfer, hang-up) are per call and given to both.

    The front desk looks orders up and hands billing questions over; billing
    checks invoices. Either may transfer the caller to a human or end the call.
    """
    billing = Agent(
        "billing",
        instructions="You are the billing agent. Answer invoice questions briefly; you are on the phone.",
        tools=[check_invoice, *call_tools],
        description="Invoices and payments.",
    )
    return Agent(
        "front_desk",
        instructions=("You are the front desk of the shop's phone line. Be brief. Look orders up; hand "
                      "invoice and payment questions to billing."),
        tools=[lookup_order, *call_tools],
        handoffs=[billing],
        description="Greets callers and routes them.",
    )


# -- what the call did, from the session's events ----------------------------------------------------


class CallLog:
    """Prints a call as it happens and counts what the summary reports.

    Subscribe it with :meth:`attach`; it runs on the session's dispatcher
    thread. ``app_handles`` are the app's own ``response.create`` handles
    (greeting, keypad handoff): one that ends in an error, or never ends, is a
    lost intent.
    """

    def __init__(self, say: Callable[[str], None], first_agent: str, *, caller_lines: bool = True) -> None:
        self._say = say
        self._caller_lines = caller_lines  # print the caller's transcribed speech
        self._lock = threading.Condition()
        self.agent = first_agent
        self.lines: list[dict[str, Any]] = []
        self.tool_calls = 0
        self.tool_errors = 0
        self.handoffs = 0
        self.barge_ins = 0
        self.answers = 0  # completed spoken answers (no tool call in them)
        self.conflicts_seen = 0
        self.truncate_errors_seen = 0
        self.errors: list[str] = []
        self.keys: list[str] = []
        self.app_handles: list[ResponseHandle] = []
        self.interruptions: list[dict[str, Any]] = []

    def attach(self, session: Session) -> None:
        """Subscribe to the events this log reads."""
        for typ in ("response.done", "agent.handoff", "tool.result", "tool.error", "error", _DTMF,
                    "audio.interrupted", "conversation.item.input_audio_transcription.completed"):
            session.on(typ, self._on_event)

    def wait(self, predicate: Callable[[CallLog], bool], timeout: float) -> bool:
        """Block until ``predicate(self)`` holds (re-checked after each event); False on timeout."""
        with self._lock:
            return self._lock.wait_for(lambda: predicate(self), timeout)

    def lost_intents(self) -> int:
        """App creates that failed or never finished."""
        return sum(1 for h in self.app_handles if not h.done() or h.error is not None)

    def _line(self, who: str, text: str, **extra: Any) -> None:
        self.lines.append({"speaker": who, "text": text, **extra})
        self._say(f"  {who:<12}: {text}")

    def _on_event(self, ev: Event) -> None:
        with self._lock:
            self._handle(ev)
            self._lock.notify_all()

    def _handle(self, ev: Event) -> None:
        typ = ev.type
        if typ == "response.done":
            resp = ev.data.get("response") or {}
            output = resp.get("output") or []
            text = " ".join(
                str(part.get("transcript") or part.get("text") or "")
                for item in output if item.get("type") == "message"
                for part in item.get("content") or []
            ).strip()
            status = resp.get("status")
            reason = (resp.get("status_details") or {}).get("reason")
            calls = [o for o in output if o.get("type") == "function_call"]
            if text:
                self._line(self.agent, text + ("  [cut off]" if status == "cancelled" else ""))
            if status == "cancelled" and reason == "turn_detected":
                self.barge_ins += 1  # the server's VAD cut it (SIP: the server truncates what it played)
            if status == "completed" and text and not calls:
                self.answers += 1
        elif typ == "agent.handoff":
            self.handoffs += 1
            self.agent = str(ev.target)
            self._say(f"  --> handoff   : {ev.source} -> {ev.target}")
        elif typ in ("tool.result", "tool.error"):
            self.tool_calls += 1
            self.tool_errors += typ == "tool.error"
            mark = "tool" if typ == "tool.result" else "tool ERROR"
            self._say(f"  [{mark}] {ev.name}({ev.arguments}) -> {ev.output}")
        elif typ == _DTMF:
            self.keys.append(str(ev.get("event")))
            self._say(f"  [keypad]      : {ev.get('event')}")
        elif typ == "audio.interrupted":
            self.interruptions.append(dict(ev.data))
            if ev.get("item_id") is not None:
                self.barge_ins += 1  # the app cut its own playback (Twilio: clear, cancel, truncate)
                self._say(f"  [barge-in]    : playback cut at {ev.get('played_ms'):.0f} ms, "
                          f"truncated to {ev.get('truncated_ms')} ms")
        elif typ == "conversation.item.input_audio_transcription.completed":
            text = str(ev.get("transcript") or "").strip()
            if text and self._caller_lines:
                self._line("caller", text)
        elif typ == "error":
            err = ev.data.get("error") or {}
            code = err.get("code")
            self.conflicts_seen += code == _CONFLICT
            self.truncate_errors_seen += err.get("param") == "audio_end_ms" or code == "item_truncate_invalid_item_id"
            self.errors.append(str(code))


def _dtmf_menu(session: Session, log: CallLog) -> None:
    """The keypad menu: ``BILLING_KEY`` hands the caller to billing (an app handoff, gated like any create)."""

    def on_key(ev: Event) -> None:
        if ev.get("event") == BILLING_KEY and session.agent is not None and session.agent.name != "billing":
            with contextlib.suppress(RtqueueError):  # the call may be ending
                # Tell the model what happened (a key press is not in the audio), then switch agents.
                session.send_text(f"(keypad {BILLING_KEY}: billing)")
                handle = session.handoff("billing")
                if handle is not None:
                    log.app_handles.append(handle)

    session.on(_DTMF, on_key)


# -- the app's webhook endpoint -------------------------------------------------------------------------


class WebhookReceiver:
    """The app's side of ``realtime.call.incoming``: a loopback HTTP server verifying each delivery.

    A delivery that verifies is answered 200 and queued (:meth:`next`); one
    that does not (bad signature, stale timestamp...) is answered 400 and
    counted in ``refused``, and OpenAI retries it. One thread,
    "rtqueue-demo-webhook"; :meth:`close` ends it.
    """

    def __init__(self, secret: str, *, host: str = "127.0.0.1", port: int = 0, path: str = "/openai/webhook") -> None:
        from . import sip

        self.secret = secret
        self.refused = 0
        self._calls: queue.Queue[IncomingCall] = queue.Queue()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    if self.path != path:
                        raise WebhookVerificationError(f"no webhook at {self.path}", reason="headers")
                    call = sip.verify_webhook(body, self.headers, receiver.secret)
                except WebhookVerificationError:
                    receiver.refused += 1
                    self.send_response(400)
                else:
                    receiver._calls.put(call)
                    self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass  # the demo prints what matters itself

        self._server = http.server.HTTPServer((host, port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="rtqueue-demo-webhook", daemon=True)
        self._thread.start()
        self.url = f"http://{host}:{self._server.server_address[1]}{path}"

    def next(self, timeout: float) -> IncomingCall | None:
        """The next verified incoming call, or ``None`` after ``timeout`` seconds."""
        try:
            return self._calls.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        """Stop serving. Idempotent."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)

    def __enter__(self) -> WebhookReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- OpenAI SIP -------------------------------------------------------------------------------------------


def sip_caller_script(*, hang_up: bool = False) -> Any:
    """The scripted caller: order question, keypad "2" (billing), invoice, a cut-off answer, "a human".

    With ``hang_up`` the caller says goodbye at the end instead (the agent's
    hang-up tool ends the call) rather than asking for a human (a REFER).
    """
    from .sim.phone import CallerScript, dtmf, interrupt, pause, say, wait_for_agent

    ending = "Thanks that is all goodbye" if hang_up else "I want a human now"
    return CallerScript([
        wait_for_agent(),                       # the greeting
        say("Please check my order 42"),        # -> lookup_order
        wait_for_agent(),
        dtmf(BILLING_KEY),                      # the keypad menu -> the app hands off to billing
        pause(1.0),                             # (a key press is no speech: give the handoff time to start)
        wait_for_agent(),
        say("Is my invoice 7 paid"),            # -> check_invoice
        wait_for_agent(),
        say(LONG_QUESTION),                     # a long answer ...
        interrupt("Sorry stop there"),          # ... cut off by the caller (server VAD barge-in)
        wait_for_agent(),
        say(ending),                            # -> refer_to_human (SIP REFER) or end_call
        wait_for_agent(),
    ], tail_ms=_SILENCE_MS + 300)


def run_sip_desk(
    *,
    speed: float = 10.0,
    seed: int = 7,
    hang_up: bool = False,
    live: bool = False,
    listen_port: int = 8000,
    wait_call_s: float = 600.0,
    timeout: float = 120.0,
    out: Any = None,
) -> dict[str, Any]:
    """Answer one SIP call with the desk; print it; return the summary (also printed last as one JSON line).

    On the simulator (the default) a call is placed with
    :func:`sip_caller_script`. With ``live`` the webhook listens on
    127.0.0.1:``listen_port`` (put a tunnel in front and register its URL with
    OpenAI; ``$OPENAI_WEBHOOK_SECRET`` verifies deliveries) and the first call
    that comes in within ``wait_call_s`` is answered, with
    ``$OPENAI_API_KEY``. ``timeout`` bounds the call.
    """
    from .sip import CallControl, hangup_tool, refer_tool

    stream = out or sys.stdout

    def say(line: str) -> None:
        print(line, file=stream, flush=True)

    t0 = time.monotonic()
    with contextlib.ExitStack() as stack:
        sim: Simulator | None = None
        if live:
            secret = os.environ.get("OPENAI_WEBHOOK_SECRET", "")
            if not secret or not os.environ.get("OPENAI_API_KEY"):
                raise RtqueueError("--live needs $OPENAI_API_KEY and $OPENAI_WEBHOOK_SECRET")
            hook = stack.enter_context(WebhookReceiver(secret, port=listen_port))
            control = stack.enter_context(CallControl())
            url = None
            say(f"rtqueue phone desk (SIP): waiting for a call; webhook at {hook.url}")
        else:
            from .sim import Simulator

            secret = "whsec_" + base64.b64encode(b"rtqueue-demo-phone-desk-secret!!").decode()
            sim = stack.enter_context(Simulator(speed=speed, seed=seed))
            hook = stack.enter_context(WebhookReceiver(secret))
            control = stack.enter_context(CallControl(api_key="sk-demo-phone", base_url=sim.http_base_url))
            url = sim.url
            say(f"rtqueue phone desk (OpenAI SIP) on the embedded simulator (speed {speed:g}x)")
            sim.place_call(hook.url, secret=secret, caller=sip_caller_script(hang_up=hang_up))
        incoming = hook.next(wait_call_s if live else 10.0)
        if incoming is None:
            raise RtqueueError("no call came in")
        call_id = incoming.call_id
        say(f"  [ring]        : {incoming.caller or 'unknown caller'} -> {incoming.to_uri}  ({call_id})")
        desk = build_phone_desk([refer_tool(control, call_id, HUMAN_DESK), hangup_tool(control, call_id)])
        control.accept(call_id, agent=desk, session={"audio": {"input": {
            "transcription": {"model": "whisper-1"},
            "turn_detection": {"type": "server_vad", "silence_duration_ms": _SILENCE_MS},
        }}})
        log = CallLog(say, desk.name)
        closed = threading.Event()
        session = stack.enter_context(Session.connect(url, call_id=call_id, agent=desk, name="phone-desk"))
        session.on("session.closed", lambda _e: closed.set())
        log.attach(session)
        _dtmf_menu(session, log)
        log.app_handles.append(session.create_response(instructions=(
            "Greet the caller. Say that they can press 2 on the keypad for billing.")))
        if sim is not None:
            ended = sim.wait_until(lambda s: s.call(call_id).status == "ended", timeout=timeout)
        else:
            ended = closed.wait(timeout)
        closed.wait(10.0)  # the call's end closes the socket; the session ends by itself
        stats = session.stats()
        session.close()
        summary: dict[str, Any] = {
            "desk": "sip",
            "call_id": call_id,
            "call_ended": ended,
            "handoffs": stats["handoffs"],
            "tool_calls": log.tool_calls,
            "tool_errors": log.tool_errors,
            "barge_ins": log.barge_ins,
            "keys": "".join(log.keys),
            "lost_intents": log.lost_intents(),
            "gate_retried": stats.get("retried", 0),
            "final_agent": log.agent,
        }
        if sim is not None:
            record = sim.call(call_id)
            sstats = sim.stats()
            summary.update(
                ended_by=record.ended_by,
                refer_target=record.refer_target,
                conflicts=sstats["conflicts"],
                truncate_errors=sstats["truncate_errors"],
                cancel_not_active=sstats["cancel_not_active"],
                server_errors=sstats["errors"],
            )
            say("\ncall transcript (the phone network's record)")
            for line in record.transcript:
                cut = "  [cut off]" if line.interrupted else ""
                say(f"  {line.at:7.2f}s {line.speaker:<7}: {line.text}{cut}")
        else:
            summary.update(conflicts=log.conflicts_seen, truncate_errors=log.truncate_errors_seen)
        summary["seconds"] = round(time.monotonic() - t0, 2)
    say(json.dumps(summary, default=str))
    return summary


# -- Twilio Media Streams -------------------------------------------------------------------------------


def _twilio_call_tools(transfers: list[str]) -> list[Tool]:
    """Per-call transfer and hang-up tools for a Twilio stream.

    On Twilio a transfer is the app's business: it ends the stream and the
    TwiML after ``<Connect>`` (say, a ``<Dial>`` to the human queue) takes
    over. Here the tool records the target; the app ends the stream once the
    goodbye has been heard (see :func:`_end_after_goodbye`).
    """

    def refer_to_human() -> str:
        transfers.append(HUMAN_DESK)
        return "The caller is being transferred now. Say a short goodbye."

    def end_call() -> str:
        transfers.append("hangup")
        return "The call is ending. Say goodbye."

    schema: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}
    return [
        Tool(name="refer_to_human", description=(
            "Transfer the caller to a human colleague by phone. Use it when the caller asks for a human, "
            "a person or an operator, or when you cannot help."), parameters=dict(schema), func=refer_to_human),
        Tool(name="end_call", description=(
            "Hang up the phone call. Use it only when the caller says goodbye or asks to end the call."),
            parameters=dict(schema), func=end_call),
    ]


def _end_after_goodbye(session: Session, call: TwilioCall, transfers: list[str]) -> None:
    """Once a transfer or hang-up was asked for, end the stream after the next answer was heard."""

    def on_done(ev: Event) -> None:
        resp = ev.data.get("response") or {}
        calls = [o for o in resp.get("output") or [] if o.get("type") == "function_call"]
        if transfers and not calls:
            # On the dispatcher thread: waiting here delays only other callbacks, and the call is ending.
            call.output.wait_idle(10.0)
            call.hangup()

    session.on("response.done", on_done)


def run_twilio_desk(
    *,
    speed: float = 1.0,
    seed: int = 7,
    barge_after_ms: float = 1500.0,
    timeout: float = 60.0,
    out: Any = None,
    inspect: Callable[[Simulator, TwilioCall, FakeCall], None] | None = None,
) -> dict[str, Any]:
    """One Twilio call to the desk on the simulator, the fake Twilio as the caller; returns the summary.

    The caller (on this thread) speaks, presses ``2``, asks about an invoice,
    asks a question whose long answer it cuts off after hearing
    ``barge_after_ms`` of it, then asks for a human. ``speed`` paces the
    simulator and the fake line alike. ``max_truncate_error_ms`` compares
    each truncate the session sent (``audio_end_ms``, read from the
    simulator) with what the fake caller had heard of that item when the
    ``clear`` reached it. ``inspect(sim, call, caller)`` runs before teardown
    (tests look at the heard audio there).
    """
    from .sim import Simulator
    from .testing_twilio import FakeTwilio
    from .twilio import TwilioBridge

    stream = out or sys.stdout

    def say(line: str) -> None:
        print(line, file=stream, flush=True)

    t0 = time.monotonic()
    logs: list[CallLog] = []
    transfers: list[str] = []
    vad = {"type": "server_vad", "create_response": True, "interrupt_response": False,
           "silence_duration_ms": _SILENCE_MS}
    with contextlib.ExitStack() as stack:
        sim = stack.enter_context(Simulator(speed=speed, seed=seed))
        holder: list[TwilioCall] = []

        def factory(call: TwilioCall) -> Session:
            holder.append(call)
            desk = build_phone_desk(_twilio_call_tools(transfers))
            log = CallLog(say, desk.name, caller_lines=False)  # the script prints its own lines
            logs.append(log)
            # audio/pcmu both ways: Twilio's mu-law passes through untouched; every agent keeps it.
            session = Session.connect(sim.url, agent=desk, audio=call.audio, audio_format="pcmu",
                                      turn_detection=vad, context=call, name=f"twilio-{call.call_sid}",
                                      session={"audio": {"input": {"transcription": {"model": "whisper-1"}}}})
            log.attach(session)
            _dtmf_menu(session, log)
            _end_after_goodbye(session, call, transfers)
            log.app_handles.append(session.create_response(instructions=(
                "Greet the caller. Say that they can press 2 on the keypad for billing.")))
            return session

        # The fake line plays at ``speed`` times real time: the bridge's playout model must know.
        bridge = stack.enter_context(TwilioBridge(factory, playout_speed=speed))
        twilio = stack.enter_context(FakeTwilio(bridge.url, speed=speed))
        say(f"rtqueue phone desk (Twilio Media Streams, audio/pcmu) on the embedded simulator (speed {speed:g}x)")
        caller = twilio.call(parameters={"from": "+14155550123"})
        if not bridge.wait_calls(lambda cs: bool(cs) and cs[0].session is not None, 10.0):
            raise RtqueueError("the bridge made no session for the call")
        call = holder[0]
        log = logs[0]

        def answered(n: int) -> None:
            if not log.wait(lambda lg: lg.answers >= n, timeout):
                raise RtqueueError(f"the agent gave no answer #{n}")
            call.output.wait_idle(timeout)  # ... and the caller heard it all

        def caller_says(text: str, *, wait: bool = True) -> None:
            log.lines.append({"speaker": "caller", "text": text})
            say(f"  {'caller':<12}: {text}")
            caller.say(text, wait=wait)

        answered(1)                                   # the greeting
        caller_says("Please check my order 42")       # -> lookup_order
        answered(2)
        caller.dtmf(BILLING_KEY)                      # the keypad menu -> handoff to billing
        answered(3)
        caller_says("Is my invoice 7 paid")           # -> check_invoice
        answered(4)
        heard = caller.heard_ms()
        caller_says(LONG_QUESTION, wait=False)
        if not caller.wait_until(lambda c: c.heard_ms() - heard >= barge_after_ms, timeout):
            raise RtqueueError("the long answer never played")
        caller_says("Sorry stop there", wait=False)   # barge-in: clear, cancel, truncate at what was heard
        if not caller.wait_until(lambda c: len(c.clears) >= 1, timeout):
            raise RtqueueError("no clear reached the caller")
        answered(5)
        caller_says("I want a human now")             # -> refer_to_human, goodbye, the app ends the stream
        ended = caller.closed.wait(timeout)
        call.wait_ended(timeout)
        if inspect is not None:
            inspect(sim, call, caller)
        truncates = [e for e in sim.client_events() if e.get("type") == "conversation.item.truncate"]
        errors_ms: list[float] = []
        for clear in caller.clears:
            match = [t for t in truncates if t.get("item_id") == clear.item_id]
            if match:
                errors_ms.append(abs(float(match[0]["audio_end_ms"]) - clear.item_heard_ms))
        cstats = call.stats()
        sstats = sim.stats()
        summary: dict[str, Any] = {
            "desk": "twilio",
            "call_sid": caller.call_sid,
            "call_ended": ended,
            "transferred_to": transfers[0] if transfers else None,
            "conflicts": sstats["conflicts"],
            "lost_intents": log.lost_intents(),
            "handoffs": log.handoffs,
            "tool_calls": log.tool_calls,
            "tool_errors": log.tool_errors,
            "barge_ins": cstats.barge_ins,
            "clears": len(caller.clears),
            "truncates": len(truncates),
            "truncate_errors": sstats["truncate_errors"],
            "max_truncate_error_ms": round(max(errors_ms), 3) if errors_ms else None,
            "cancel_not_active": sstats["cancel_not_active"],
            "server_errors": sstats["errors"],
            "keys": "".join(log.keys),
            "heard_ms": round(caller.heard_ms(), 1),
            "final_agent": log.agent,
            "fake_twilio_errors": list(caller.errors),
        }
    summary["seconds"] = round(time.monotonic() - t0, 2)
    say(json.dumps(summary, default=str))
    return summary


def phone_demo(*, live: bool = False, speed: float | None = None, json_path: str | None = None,
               out: Any = None) -> int:
    """``rtqueue demo --phone``: :func:`run_sip_desk`; exit code 0 when the call ended with 0 conflicts, 0 lost.

    ``speed`` paces the simulator (default 10x real time); ``json_path``
    also writes the summary there.
    """
    try:
        summary = run_sip_desk(live=live, speed=10.0 if speed is None else speed, out=out)
    except RtqueueError as exc:
        print(f"rtqueue demo --phone: {exc}", file=out or sys.stdout)
        return 2
    if json_path:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2, default=str)
    ok = summary["call_ended"] and summary["conflicts"] == 0 and summary["lost_intents"] == 0
    return 0 if ok else 1
