"""OpenAI SIP calls end to end over loopback: webhook, call control, attached sessions, the scripted caller."""

from __future__ import annotations

import base64
import http.server
import json
import queue
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

import rtqueue
from rtqueue import protocol, sip
from rtqueue.sim.phone import CallerScript, dtmf, hangup, interrupt, say, wait_for_agent
from tests.utils import UNIT

SECRET = "whsec_" + base64.b64encode(b"rtqueue-test-webhook-secret-32by").decode()
OTHER_SECRET = "whsec_" + base64.b64encode(b"some-other-secret-of-32-bytes!!!").decode()
API_KEY = "sk-test-sip-0123456789"


class WebhookApp:
    """The app's side: a loopback HTTP server that verifies each delivery with rtqueue.sip."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.deliveries: queue.Queue[sip.IncomingCall | rtqueue.WebhookVerificationError] = queue.Queue()
        app = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    call = sip.verify_webhook(body, self.headers, app.secret)
                except rtqueue.WebhookVerificationError as exc:
                    app.deliveries.put(exc)
                    self.send_response(400)
                else:
                    app.deliveries.put(call)
                    self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       name="rtqueue-test-webhook-app", daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/openai/webhook"

    def next(self) -> sip.IncomingCall | rtqueue.WebhookVerificationError:
        return self.deliveries.get(timeout=UNIT)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(UNIT)


@pytest.fixture
def phone() -> Iterator[rtqueue.Simulator]:
    """A simulator 10x faster than real time (the caller's speech is paced)."""
    with rtqueue.Simulator(speed=10.0, seed=3) as sim:
        yield sim


@pytest.fixture
def app() -> Iterator[WebhookApp]:
    """The app's webhook endpoint."""
    hook = WebhookApp(SECRET)
    try:
        yield hook
    finally:
        hook.close()


@pytest.fixture
def control(phone: rtqueue.Simulator) -> Iterator[sip.CallControl]:
    """Call control pointed at the simulator's REST endpoints."""
    with sip.CallControl(api_key=API_KEY, base_url=phone.http_base_url) as ctl:
        yield ctl


@rtqueue.tool
def lookup_order(order_id: str) -> dict[str, str]:
    """Look up an order by its number.

    Args:
        order_id: The order number.
    """
    return {"order": order_id, "status": "shipped"}


def desk_agents(control: sip.CallControl, call_id: str, ran: list[str]) -> rtqueue.Agent:
    """A support desk for one call: a greeter with a tool, a billing agent, a transfer and a hang-up."""

    @rtqueue.tool
    def check_invoice(invoice_id: str) -> str:
        """Check an invoice.

        Args:
            invoice_id: The invoice number.
        """
        ran.append("check_invoice")
        return "paid"

    refer = sip.refer_tool(control, call_id, "sip:humans@desk.example.com")
    bye = sip.hangup_tool(control, call_id)
    billing = rtqueue.Agent("billing", instructions="You are the billing agent.",
                            tools=[check_invoice, refer, bye], description="Invoices and payments.")
    return rtqueue.Agent("desk", instructions="You are the support desk.", tools=[lookup_order, refer, bye],
                         handoffs=[billing], description="Front desk.")


def run_call(phone: rtqueue.Simulator, app: WebhookApp, control: sip.CallControl, script: CallerScript
             ) -> tuple[str, list[str], list[rtqueue.Event], dict[str, Any]]:
    """Place a call, accept it, attach a session with the desk agents, greet, run until the call ends."""
    call_id = phone.place_call(app.url, secret=SECRET, caller=script)
    incoming = app.next()
    assert isinstance(incoming, sip.IncomingCall) and incoming.call_id == call_id
    from openai.types.webhooks import RealtimeCallIncomingWebhookEvent

    RealtimeCallIncomingWebhookEvent.model_validate({  # the simulator's webhook has the GA shape
        "id": incoming.event_id, "created_at": incoming.created_at, "type": "realtime.call.incoming",
        "object": "event", "data": dict(incoming.data)})
    ran: list[str] = []
    desk = desk_agents(control, call_id, ran)
    control.accept(call_id, agent=desk)
    seen: list[rtqueue.Event] = []
    with rtqueue.Session.connect(call_id=call_id, url=phone.url, agent=desk, name="sip-call") as session:
        assert session.call_id == call_id
        closed = threading.Event()
        session.on("*", seen.append)
        session.on("session.closed", lambda _e: closed.set())
        session.create_response(instructions="Greet the caller.")
        assert phone.wait_until(lambda s: s.call(call_id).status == "ended", timeout=3 * UNIT)
        assert closed.wait(UNIT), "the session did not end with the call"
        stats = session.stats()
    return call_id, ran, seen, stats


def test_whole_sip_call_ends_in_a_refer(phone: rtqueue.Simulator, app: WebhookApp, control: sip.CallControl):
    """Webhook -> accept -> attach -> caller speaks -> tool -> handoff -> DTMF -> "a human" ends in a SIP REFER."""
    script = CallerScript([
        wait_for_agent(),
        say("Please check my order 42"),
        wait_for_agent(),
        say("Now billing please"),
        wait_for_agent(),
        say("Is my invoice 7 paid"),
        wait_for_agent(),
        dtmf("12#"),
        say("I want a human now"),
        wait_for_agent(),
    ])
    call_id, ran, seen, stats = run_call(phone, app, control, script)
    record = phone.call(call_id)
    assert record.ended_by == "refer" and record.refer_target == "sip:humans@desk.example.com"
    assert record.dtmf == "12#"
    keys = [e.data["event"] for e in seen if e.type == "input_audio_buffer.dtmf_event_received"]
    assert keys == ["1", "2", "#"]
    dtmf_event = next(e for e in seen if e.type == "input_audio_buffer.dtmf_event_received").data
    from openai.types.realtime import InputAudioBufferDtmfEventReceivedEvent

    InputAudioBufferDtmfEventReceivedEvent.model_validate(dtmf_event)  # the GA shape
    assert record.said("caller")[:2] == ["Please check my order 42", "Now billing please"]
    agent_lines = record.said("agent")
    assert any("shipped" in line for line in agent_lines), agent_lines  # lookup_order's result was spoken
    assert any(line.startswith("This is the billing agent") for line in agent_lines), agent_lines
    assert ran == ["check_invoice"]
    assert stats["handoffs"] >= 1
    assert [e.data["name"] for e in seen if e.type == "response.function_call_arguments.done"] == [
        "lookup_order", "transfer_to_billing", "check_invoice", "refer_to_human"]
    assert phone.stats()["conflicts"] == 0
    assert record.webhook_attempts == (200,) and record.attachments >= 1
    # No audio frames on the control socket (OpenAI carries the call's audio): each spoken answer shows as
    # output_audio_buffer.started, then .stopped after its response.done, in the official models' shapes.
    from openai.types.realtime.realtime_server_event import OutputAudioBufferStarted, OutputAudioBufferStopped

    assert not [e for e in seen if e.type == "response.output_audio.delta"]
    started = [e.data for e in seen if e.type == "output_audio_buffer.started"]
    stopped = [e.data for e in seen if e.type == "output_audio_buffer.stopped"]
    assert started and len(stopped) <= len(started)
    for data in started:
        OutputAudioBufferStarted.model_validate(data)
    for data in stopped:
        OutputAudioBufferStopped.model_validate(data)
    done = {e.data["response"]["id"] for e in seen if e.type == "response.done"}
    assert {d["response_id"] for d in stopped} <= done


def test_sip_call_hung_up_by_the_agent_tool(phone: rtqueue.Simulator, app: WebhookApp,
                                             control: sip.CallControl):
    """The caller says goodbye; the agent's hang-up tool ends the call from inside the session."""
    script = CallerScript([wait_for_agent(), say("Thanks that is all goodbye"), wait_for_agent()])
    call_id, _ran, seen, _stats = run_call(phone, app, control, script)
    record = phone.call(call_id)
    assert record.ended_by == "app"
    assert "end_call" in [e.data["name"] for e in seen if e.type == "response.function_call_arguments.done"]
    assert phone.stats()["conflicts"] == 0


def test_caller_interrupts_then_hangs_up(phone: rtqueue.Simulator, app: WebhookApp, control: sip.CallControl):
    """The caller talks over the agent (a VAD barge-in cuts its answer), then hangs up; the socket closes."""
    script = CallerScript([
        wait_for_agent(),
        say("Tell me about order 42 [len: 60]"),
        interrupt("Stop stop I have a question"),
        wait_for_agent(),
        hangup(),
    ])
    call_id, _ran, seen, _stats = run_call(phone, app, control, script)
    record = phone.call(call_id)
    assert record.ended_by == "caller" and record.script_done
    assert any(line.interrupted for line in record.transcript if line.speaker == "agent")
    cancelled = [e for e in seen if e.type == "response.done" and e.data["response"]["status"] == "cancelled"]
    assert cancelled and cancelled[0].data["response"]["status_details"]["reason"] == "turn_detected"
    stats = phone.stats()
    assert stats["conflicts"] == 0 and stats["cancel_not_active"] == 0


def test_bad_signature_is_rejected_and_retried(phone: rtqueue.Simulator, app: WebhookApp):
    """A delivery signed with another secret fails verification; the network retries, then gives up."""
    call_id = phone.place_call(app.url, secret=OTHER_SECRET, caller=CallerScript([say("hello")]))
    first = app.next()
    assert isinstance(first, rtqueue.WebhookVerificationError) and first.reason == "signature"
    assert OTHER_SECRET not in str(first) and SECRET not in str(first)
    assert phone.wait_until(lambda s: s.call(call_id).status == "ended", timeout=UNIT)
    record = phone.call(call_id)
    assert record.ended_by == "unanswered"
    assert set(record.webhook_attempts) == {400} and len(record.webhook_attempts) == 4


def test_stale_timestamp_is_rejected(phone: rtqueue.Simulator, app: WebhookApp):
    """A delivery whose timestamp is ten minutes old fails verification with reason "timestamp"."""
    phone.place_call(app.url, secret=SECRET, clock_skew_s=-600)
    stale = app.next()
    assert isinstance(stale, rtqueue.WebhookVerificationError) and stale.reason == "timestamp"


def test_verify_webhook_parses_headers_and_refuses_bad_input():
    """verify_webhook returns the call and its SIP headers; missing headers, bad JSON and other events fail."""
    import time

    from rtqueue.sim.phone import sign_webhook

    body = json.dumps({"object": "event", "id": "evt_1", "type": "realtime.call.incoming", "created_at": 1,
                       "data": {"call_id": "rtc_1", "sip_headers": [
                           {"name": "From", "value": '"Ann" <sip:+15550001@carrier.example>;tag=1'},
                           {"name": "To", "value": "sip:+15550002@x.example"},
                           {"name": "X-Note", "value": "a"}, {"name": "x-note", "value": "b"}]}})
    headers = sign_webhook(SECRET, "wh_1", int(time.time()), body)
    call = sip.verify_webhook(body.encode(), list(headers.items()), rtqueue.secrets.Secret(SECRET))
    assert call.call_id == "rtc_1" and call.webhook_id == "wh_1" and call.event_id == "evt_1"
    assert call.from_uri == "sip:+15550001@carrier.example" and call.caller == "+15550001"
    assert call.to_uri == "sip:+15550002@x.example" and call.headers("X-NOTE") == ("a", "b")
    with pytest.raises(rtqueue.WebhookVerificationError) as missing:
        sip.verify_webhook(body, {"webhook-id": "wh_1"}, SECRET)
    assert missing.value.reason == "headers"
    other = json.dumps({"object": "event", "id": "evt_2", "type": "batch.completed", "created_at": 1,
                        "data": {"id": "batch_1"}})
    with pytest.raises(rtqueue.WebhookVerificationError) as wrong:
        sip.verify_webhook(other, sign_webhook(SECRET, "wh_2", int(time.time()), other), SECRET)
    assert wrong.value.reason == "event_type"
    with pytest.raises(rtqueue.WebhookVerificationError) as garbled:
        sip.verify_webhook("{not json", sign_webhook(SECRET, "wh_3", int(time.time()), "{not json"), SECRET)
    assert garbled.value.reason == "payload"
    with pytest.raises(rtqueue.InvalidArgument):
        sip.verify_webhook(body, headers, "")


def test_reject_with_a_status_code(phone: rtqueue.Simulator, app: WebhookApp, control: sip.CallControl):
    """reject(status_code=486) ends the ringing call as rejected; the call is gone for later requests."""
    call_id = phone.place_call(app.url, secret=SECRET)
    assert isinstance(app.next(), sip.IncomingCall)
    control.reject(call_id, status_code=486)
    record = phone.call(call_id)
    assert record.status == "ended" and record.ended_by == "reject" and record.reject_status == 486
    with pytest.raises(rtqueue.CallControlError) as gone:
        control.accept(call_id)
    assert gone.value.status_code == 404 and gone.value.code == "call_id_not_found"


def test_rest_errors_keep_status_and_code(phone: rtqueue.Simulator, app: WebhookApp, control: sip.CallControl):
    """Unknown call 404, wrong state 400, bad bodies 400, refused attach: real-style errors, mapped to rtqueue's."""
    with pytest.raises(rtqueue.CallControlError) as unknown:
        control.hangup("rtc_nope")
    err = unknown.value
    assert (err.status_code, err.code, err.type) == (404, "call_id_not_found", "invalid_request_error")
    assert err.message == "No session found for the provided call_id"
    call_id = phone.place_call(app.url, secret=SECRET)
    assert isinstance(app.next(), sip.IncomingCall)
    with pytest.raises(rtqueue.CallControlError) as early:
        control.refer(call_id, "tel:+14155550123")
    assert early.value.status_code == 400
    with pytest.raises(rtqueue.CallControlError) as bad_config:
        control.accept(call_id, session={"voice_of_doom": True})
    assert bad_config.value.status_code == 400 and bad_config.value.code == "unknown_parameter"
    control.accept(call_id, instructions="You are the desk.")
    with pytest.raises(rtqueue.CallControlError) as twice:
        control.accept(call_id)
    assert twice.value.status_code == 400
    with pytest.raises(rtqueue.InvalidArgument):
        control.refer(call_id, "https://not-a-sip-uri")
    raw = urllib.request.Request(f"{phone.http_base_url}/realtime/calls/{call_id}/refer", data=b"{nope",
                                 headers={"Authorization": f"Bearer {API_KEY}"}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as garbled:
        urllib.request.build_opener(urllib.request.ProxyHandler({})).open(raw, timeout=UNIT)
    assert garbled.value.code == 400 and json.loads(garbled.value.read())["error"]["type"] == "invalid_request_error"
    garbled.value.close()
    with pytest.raises(rtqueue.ConnectError, match="call_id_not_found"):
        rtqueue.Session.connect(call_id="rtc_unknown", url=phone.url, connect_timeout=UNIT)
    control.hangup(call_id)
    assert phone.call(call_id).ended_by == "app"
    assert phone.stats()["conflicts"] == 0


def test_api_key_is_required_and_never_shown():
    """With require_api_key, a wrong key is a 401 CallControlError; the key shows in no repr or message."""
    with rtqueue.Simulator(speed=None, require_api_key=API_KEY) as sim:
        with sip.CallControl(api_key="sk-wrong-key-0123456789", base_url=sim.http_base_url, max_retries=0) as ctl:
            assert "sk-wrong" not in repr(ctl)
            with pytest.raises(rtqueue.CallControlError) as refused:
                ctl.hangup("rtc_x")
            assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"
            assert "sk-wrong-key" not in str(refused.value)
        with sip.CallControl(api_key=API_KEY, base_url=sim.http_base_url) as ctl:
            with pytest.raises(rtqueue.CallControlError) as unknown:
                ctl.hangup("rtc_x")
            assert unknown.value.status_code == 404


def test_call_url_adds_call_id():
    """connect(call_id=) attaches by URL: OpenAI's ?call_id=, or added to a given URL's query."""
    url, headers, _ = protocol.endpoint(None, model="gpt-realtime", api_key="sk-abc123456", call_id="rtc_1")
    assert url == "wss://api.openai.com/v1/realtime?call_id=rtc_1"
    assert headers == ["Authorization: Bearer sk-abc123456"]
    url, _, _ = protocol.endpoint("ws://127.0.0.1:9/v1/realtime?model=m&call_id=old", model="m", api_key=None,
                                  call_id="rtc_2")
    assert url == "ws://127.0.0.1:9/v1/realtime?model=m&call_id=rtc_2"
    with pytest.raises(rtqueue.InvalidArgument):
        protocol.endpoint(None, model="m", api_key="sk-abc123456", call_id="")


def test_a_dropped_call_socket_reattaches_without_reseeding(phone: rtqueue.Simulator, app: WebhookApp,
                                                            control: sip.CallControl):
    """A call session's reconnect re-attaches to the live conversation: nothing re-created, no errors."""
    from rtqueue.sim.faults import FaultPlan
    from rtqueue.sim.phone import pause

    call_id = phone.place_call(app.url, secret=SECRET, caller=CallerScript([pause(600)]))
    incoming = app.next()
    assert isinstance(incoming, sip.IncomingCall)
    control.accept(call_id, instructions="You are the desk.")
    with rtqueue.Session.connect(call_id=call_id, url=phone.url,
                                 reconnect=rtqueue.ReconnectPolicy(initial_backoff=0.01)) as s:
        s.ask("[say: first answer] My name is Ada.", timeout=UNIT)
        with s.events("session.reconnected") as reconnected:
            phone.inject(FaultPlan(drop_after_events=0), session=0)
            ev = reconnected.get(timeout=UNIT)
        assert ev is not None and ev["reseeded"] == 0
        assert s.ask("[say: third] what is my name?", timeout=UNIT).text == "third"
    errors = [e for i in range(2) for e in phone.server_events(i) if e["type"] == "error"]
    assert errors == []
    assert phone.stats()["conflicts"] == 0
    control.hangup(call_id)
