"""Secrets (issue 6): the API key never leaks; the simulator checks keys; TLS is verified."""

from __future__ import annotations

import json
import logging
import pickle
import ssl
import traceback
from pathlib import Path
from typing import Any

import pytest
import websocket

import rtqueue
from rtqueue import FaultPlan, ReconnectPolicy, Session, Simulator
from rtqueue.errors import AuthenticationError, ConnectError, ServerError
from rtqueue.protocol import endpoint
from rtqueue.reconnect import fatal_loss
from rtqueue.secrets import Secret, redact
from rtqueue.transport import WebSocketTransport
from tests.utils import UNIT

KEY = "sk-rtq-test-SECRET-0123456789abcdef"


def _everything_said(exc: BaseException) -> str:
    """The exception's message, repr, chained causes and formatted traceback, as one string."""
    parts = [str(exc), repr(exc), "".join(traceback.format_exception(exc))]
    cause = exc.__cause__ or exc.__context__
    while cause is not None:
        parts += [str(cause), repr(cause)]
        cause = cause.__cause__ or cause.__context__
    return "\n".join(parts)


# -- the Secret value and the redactor ---------------------------------------------------------------


def test_secret_hides_its_value():
    """repr, str, format and containers show *** ; pickling is refused; reveal() gives the key."""
    s = Secret(KEY)
    for shown in (repr(s), str(s), f"{s}", f"{s!r}", repr([s]), repr({"k": s})):
        assert KEY not in shown and "***" in shown
    assert s.reveal() == KEY and s == Secret(KEY) and bool(s)
    with pytest.raises(TypeError):
        pickle.dumps(s)
    with pytest.raises(rtqueue.InvalidArgument):
        Secret(123)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text",
    [
        f"Incorrect API key provided: {KEY}.",
        f"Authorization: Bearer {KEY}",
        "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.payload.sig",
        "key sk-proj-abcdefghijklmnop in the middle",
    ],
)
def test_redact_removes_keys_and_bearer_tokens(text: str):
    """redact() removes a given secret and anything key-shaped."""
    out = redact(text, Secret(KEY))
    assert KEY not in out and "***" in out
    assert "sk-proj-abcdefghijklmnop" not in out and "eyJhbGciOiJIUzI1NiJ9" not in out


def test_endpoint_keeps_key_out_of_the_url():
    """The key goes in a header only, never in the URL (URLs end up in logs)."""
    url, headers, secret = endpoint(None, model="gpt-realtime", api_key=KEY)
    assert KEY not in url and headers == [f"Authorization: Bearer {KEY}"] and isinstance(secret, Secret)
    url, headers, _ = endpoint(None, model="m", api_key=KEY, azure_endpoint="https://res.openai.azure.com")
    assert KEY not in url and headers == [f"api-key: {KEY}"]


def test_fatal_loss_messages_are_redacted():
    """The error a refused key produces never quotes the key, even when the server's message does."""
    err = ServerError(f"Incorrect API key provided: {KEY}.", code="invalid_api_key")
    out = fatal_loss(3000, err, Secret(KEY))
    assert isinstance(out, AuthenticationError) and KEY not in _everything_said(out)
    quota = fatal_loss(1000, ServerError(f"quota for {KEY}", code="insufficient_quota"), KEY)
    assert isinstance(quota, rtqueue.ConnectionLost) and KEY not in str(quota)
    assert fatal_loss(1006, None) is None and fatal_loss(1000, ServerError("x", code="server_error")) is None


# -- the SDK against the simulator ------------------------------------------------------------------


def test_key_absent_from_reprs_logs_and_traces(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """A full session with a key, a reconnect and errors: the key is in no repr, log line or trace file."""
    caplog.set_level(logging.DEBUG)
    trace = tmp_path / "trace.jsonl"
    policy = ReconnectPolicy(initial_backoff=0.01, connect_timeout=UNIT)
    with Simulator(speed=None, seed=1, trace=trace, require_api_key=KEY) as sim:
        with Session.connect(url=sim.url, api_key=KEY, reconnect=policy) as session:
            reconnected = session.events("session.reconnected")
            session.ask("hello", timeout=UNIT)
            sim.inject(FaultPlan(drop_after_events=0, malformed_json_after=0), session=0)
            assert reconnected.get(UNIT) is not None
            session.ask("again", timeout=UNIT)
            shown = [repr(session), repr(vars(session)), repr(session.stats()), repr(session.gate),
                     repr(session.writer.__dict__), repr(session.dispatcher.__dict__)]
            assert all(KEY not in s for s in shown)
        wrong = "sk-rtq-wrong-key-" + "0" * 12
        with pytest.raises(AuthenticationError) as info:
            Session.connect(url=sim.url, api_key=wrong)
        assert wrong not in _everything_said(info.value)
        assert sim.stats()["auth_failures"] == 1
    assert caplog.records and KEY not in caplog.text  # the SDK's, websocket-client's and the simulator's
    text = trace.read_text()
    assert text and KEY not in text and "Bearer" not in text
    header, *frames = [json.loads(line) for line in text.splitlines()]
    assert header["type"] == "rtqueue.recording"
    assert all("event" in f or "raw" in f or "binary_len" in f for f in frames)


def test_simulator_logs_do_not_carry_the_key(caplog: pytest.LogCaptureFixture):
    """Even at DEBUG, the simulator's own server logs never show the key."""
    caplog.set_level(logging.DEBUG)
    with Simulator(speed=None, require_api_key=KEY) as sim, Session.connect(url=sim.url, api_key=KEY):
        pass
    assert KEY not in caplog.text


def test_connect_error_does_not_carry_the_key():
    """A refused TCP connection: ConnectError whose message, repr and chain hold no key."""
    with pytest.raises(ConnectError) as info:
        Session.connect(url="ws://127.0.0.1:9/v1/realtime", api_key=KEY, reconnect=False, connect_timeout=2)
    assert KEY not in _everything_said(info.value)


# -- the simulator's key check ------------------------------------------------------------------------


@pytest.mark.parametrize("header", [None, "Authorization: Bearer sk-rtq-wrong-000000000000", "api-key: nope"])
def test_simulator_refuses_without_the_key_like_the_service(header: str | None):
    """No or wrong key: one error event (invalid_api_key; no key: code null), then a close with code 3000."""
    with Simulator(speed=None, require_api_key=KEY) as sim:
        ws = websocket.create_connection(sim.url, header=[header] if header else [], timeout=UNIT)
        try:
            opcode, data = ws.recv_data()
            assert opcode == websocket.ABNF.OPCODE_TEXT
            event = json.loads(data)
            assert event["type"] == "error" and event["error"]["code"] == ("invalid_api_key" if header else None)
            assert KEY not in data.decode()
            opcode, data = ws.recv_data(control_frame=True)
            assert opcode == websocket.ABNF.OPCODE_CLOSE
            assert int.from_bytes(data[:2], "big") == 3000
        finally:
            ws.close()
        assert sim.stats()["auth_failures"] == 1 and sim.stats()["active_sessions"] == 0


@pytest.mark.parametrize("header", [f"Authorization: Bearer {KEY}", f"api-key: {KEY}"])
def test_simulator_accepts_the_key_in_either_header(header: str):
    """The right key as a Bearer token or an api-key header (Azure style) opens a session."""
    with Simulator(speed=None, require_api_key=KEY) as sim:
        ws = websocket.create_connection(sim.url, header=[header], timeout=UNIT)
        try:
            assert json.loads(ws.recv())["type"] == "session.created"
        finally:
            ws.close()


def test_sdk_without_key_gets_authentication_error_and_no_retry():
    """Session.connect with no key to a keyed server: AuthenticationError, one attempt only."""
    with Simulator(speed=None, require_api_key=KEY) as sim:
        with pytest.raises(AuthenticationError) as info:
            Session.connect(url=sim.url)
        # the server's text ("Missing bearer ...") in it: tests/test_sim_connection.py (client side)
        assert KEY not in _everything_said(info.value)
        assert sim.stats()["sessions"] == 1


# -- TLS ------------------------------------------------------------------------------------------------


def test_tls_verification_stays_on(monkeypatch: pytest.MonkeyPatch):
    """The transport asks websocket-client for certificate and host name checks (no traffic is sent)."""
    seen: dict[str, Any] = {}

    def fake_create_connection(url: str, **kwargs: Any) -> Any:
        seen.update(kwargs, url=url)
        raise OSError("stopped by the test before any traffic")

    monkeypatch.setattr(websocket, "create_connection", fake_create_connection)
    with pytest.raises(ConnectError) as info:
        Session.connect(api_key=KEY, reconnect=False, connect_timeout=1)
    assert seen["url"].startswith("wss://api.openai.com/v1/realtime")
    assert seen["sslopt"]["cert_reqs"] == ssl.CERT_REQUIRED and seen["sslopt"]["check_hostname"] is True
    assert f"Authorization: Bearer {KEY}" in seen["header"]
    assert KEY not in _everything_said(info.value)
    with pytest.raises(ConnectError):
        WebSocketTransport.connect("wss://example.invalid/v1/realtime", [], timeout=1)
    assert seen["sslopt"] == {"cert_reqs": ssl.CERT_REQUIRED, "check_hostname": True}
