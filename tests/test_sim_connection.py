"""Connection-level behaviour of the simulator, as the real GA service behaves (issue 14).

Server side over a real loopback socket (websockets' sync client, which sees
close codes and pings); then what the SDK makes of it (``Session.connect``).
"""

from __future__ import annotations

import inspect
import json
import time
from typing import Any

import pytest
import websocket
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from rtqueue import ReconnectPolicy, Session
from rtqueue.errors import AuthenticationError, ConnectError, ConnectionLost, InvalidArgument
from rtqueue.sim import FaultPlan, Simulator
from rtqueue.sim.server import DEFAULT_MODELS
from rtqueue.transport import WebSocketTransport

TIMEOUT = 10.0
KEY = "sk-rtq-conn-test-0123456789"


def base(sim: Simulator) -> str:
    return f"ws://127.0.0.1:{sim.port}/v1/realtime"


def refused(url: str, headers: dict[str, str] | None = None) -> tuple[dict[str, Any], int, str]:
    """Connect, expect exactly one event then the server's close: ``(event, close code, reason)``."""
    with connect(url, additional_headers=headers or {}, open_timeout=TIMEOUT) as ws:
        event = json.loads(ws.recv(timeout=TIMEOUT))
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=TIMEOUT)
    rcvd = info.value.rcvd
    assert rcvd is not None, "the server must send a close frame"
    return event, rcvd.code, rcvd.reason


def assert_ga_error(event: dict[str, Any], code: str | None, message: str) -> None:
    assert event["type"] == "error" and event["event_id"].startswith("event_")
    assert event["error"] == {
        "type": "invalid_request_error", "code": code, "message": message, "param": None, "event_id": None,
    }


# -- model and beta header: error event, then close 4000 ------------------------------------------------


def test_missing_model_gets_error_then_close_4000() -> None:
    with Simulator(speed=None) as sim:
        event, code, reason = refused(base(sim))
        assert event["error"]["code"] == "missing_model" and event["error"]["type"] == "invalid_request_error"
        assert "model" in event["error"]["message"]
        assert (code, reason) == (4000, "invalid_request_error.missing_model")
        # an empty value is missing too
        event, code, _ = refused(base(sim) + "?model=")
        assert (event["error"]["code"], code) == ("missing_model", 4000)
        assert sim.wait_until(lambda s: s.stats()["active_sessions"] == 0, TIMEOUT)
        stats = sim.stats()
        assert stats["errors"]["missing_model"] == 2 and stats["auth_failures"] == 0
        assert [e["error"]["code"] for e in sim.server_events(0)] == ["missing_model"]  # recorded, nothing else


def test_unknown_model_gets_invalid_model_then_close_4000() -> None:
    with Simulator(speed=None) as sim:
        event, code, reason = refused(base(sim) + "?model=gpt-5-turbo-realtime")
        assert_ga_error(event, "invalid_model", 'Model "gpt-5-turbo-realtime" is not supported in realtime mode.')
        assert (code, reason) == (4000, "invalid_request_error.invalid_model")
        assert sim.wait_until(lambda s: s.stats()["errors"].get("invalid_model") == 1, TIMEOUT)


@pytest.mark.parametrize("model", sorted(DEFAULT_MODELS))
def test_every_documented_model_is_served(model: str) -> None:
    with Simulator(speed=None) as sim, connect(f"{base(sim)}?model={model}") as ws:
        assert json.loads(ws.recv(timeout=TIMEOUT))["type"] == "session.created"


def test_models_option() -> None:
    """models= narrows or widens the allow-list; None accepts any name (but still wants one)."""
    with Simulator(speed=None, models=["my-deployment"]) as sim:
        with connect(base(sim) + "?model=my-deployment") as ws:
            assert json.loads(ws.recv(timeout=TIMEOUT))["type"] == "session.created"
        assert refused(base(sim) + "?model=gpt-realtime")[0]["error"]["code"] == "invalid_model"
    with Simulator(speed=None, models=None) as sim:
        with connect(base(sim) + "?model=anything-at-all") as ws:
            assert json.loads(ws.recv(timeout=TIMEOUT))["type"] == "session.created"
        assert refused(base(sim))[0]["error"]["code"] == "missing_model"
    for bad in ("gpt-realtime", [], [""], [3], 5):
        with pytest.raises(InvalidArgument):
            Simulator(models=bad)  # type: ignore[arg-type]


def test_no_model_needed_for_a_transcription_session() -> None:
    """?intent=transcription needs no model."""
    with Simulator(speed=None) as sim, connect(base(sim) + "?intent=transcription") as ws:
        assert json.loads(ws.recv(timeout=TIMEOUT))["type"] == "session.created"


def test_a_call_socket_needs_no_model_but_a_known_call() -> None:
    """?call_id= needs no model; an unknown call is refused as call_id_not_found (close 4000), not missing_model."""
    with Simulator(speed=None) as sim:
        event, code, reason = refused(base(sim) + "?call_id=rtc_123")
        assert event["error"]["code"] == "call_id_not_found" and code == 4000
        assert reason == "invalid_request_error.call_id_not_found"


@pytest.mark.parametrize("value", ["realtime=v1", "assistants=v2, realtime=v1", "Realtime=V1"])
def test_retired_beta_header_gets_beta_api_shape_disabled(value: str) -> None:
    with Simulator(speed=None) as sim:
        event, code, reason = refused(sim.url, {"OpenAI-Beta": value})
        assert_ga_error(
            event, "beta_api_shape_disabled",
            "The Realtime Beta API is no longer supported. Please use /v1/realtime for the GA API.",
        )
        assert (code, reason) == (4000, "invalid_request_error.beta_api_shape_disabled")
        # another beta flag is not the retired shape
        with connect(sim.url, additional_headers={"OpenAI-Beta": "assistants=v2"}) as ws:
            assert json.loads(ws.recv(timeout=TIMEOUT))["type"] == "session.created"


# -- auth: close 3000 ------------------------------------------------------------------------------------


def test_missing_auth_gets_missing_bearer_then_close_3000() -> None:
    with Simulator(speed=None, require_api_key=KEY) as sim:
        event, code, reason = refused(sim.url)
        assert_ga_error(event, None, "Missing bearer or basic authentication in header")
        assert code == 3000 and reason.startswith("invalid_request_error")
        # an Authorization header of another scheme is no bearer or basic authentication either
        assert refused(sim.url, {"Authorization": f"Token {KEY}"})[0]["error"]["message"] == event["error"]["message"]
        assert sim.wait_until(lambda s: s.stats()["auth_failures"] == 2, TIMEOUT)
        assert sim.stats()["errors"] == {}


@pytest.mark.parametrize("headers", [{"Authorization": "Bearer sk-wrong"}, {"api-key": "nope"},
                                     {"Authorization": "Basic dXNlcjpwYXNz"}])
def test_bad_key_closes_3000_with_invalid_api_key_reason(headers: dict[str, str]) -> None:
    with Simulator(speed=None, require_api_key=KEY) as sim:
        event, code, reason = refused(sim.url, headers)
        assert event["error"]["code"] == "invalid_api_key" and KEY not in json.dumps(event)
        assert (code, reason) == (3000, "invalid_request_error.invalid_api_key")
        stats = sim.stats()
        assert stats["auth_failures"] == 1 and stats["errors"]["invalid_api_key"] == 1


def test_auth_is_checked_before_the_model() -> None:
    with Simulator(speed=None, require_api_key=KEY) as sim:
        assert refused(base(sim), {"Authorization": "Bearer bad"})[1] == 3000
        assert refused(base(sim), {"Authorization": f"Bearer {KEY}"})[1] == 4000


def test_handshake_is_accepted_not_refused_with_401() -> None:
    """The real service completes the upgrade (101) and refuses in-band; a 401 would hide the reason."""
    with Simulator(speed=None, require_api_key=KEY) as sim:
        ws = websocket.create_connection(sim.url, timeout=TIMEOUT)  # would raise on a 401
        try:
            assert ws.getstatus() == 101
            assert json.loads(ws.recv())["type"] == "error"
        finally:
            ws.close()


# -- pings ---------------------------------------------------------------------------------------------


def test_server_pings_every_interval() -> None:
    with Simulator(speed=None, ping_interval=0.05) as sim:
        pings: list[float] = []
        ws = websocket.create_connection(sim.url, timeout=TIMEOUT)
        try:
            assert json.loads(ws.recv())["type"] == "session.created"
            start = time.monotonic()
            while len(pings) < 3:
                opcode, _ = ws.recv_data(control_frame=True)
                if opcode == websocket.ABNF.OPCODE_PING:
                    pings.append(time.monotonic() - start)
                    ws.pong(b"")
        finally:
            ws.close()
    assert pings[-1] >= 0.09  # spaced by the interval, not a burst


def test_default_ping_interval_is_20s() -> None:
    assert inspect.signature(Simulator).parameters["ping_interval"].default == 20.0
    Simulator(ping_interval=None)  # no pings at all
    for bad in (0, -1.0, float("nan"), True, "20"):
        with pytest.raises(InvalidArgument):
            Simulator(ping_interval=bad)  # type: ignore[arg-type]


def test_sdk_session_survives_frequent_pings() -> None:
    """rtqueue's transport answers pings while a conversation runs."""
    with Simulator(speed=None, ping_interval=0.02) as sim, Session.connect(url=sim.url) as session:
        for i in range(3):
            session.ask(f"hello {i}", timeout=TIMEOUT)
            time.sleep(0.05)
        assert session.ask("still there?", timeout=TIMEOUT) is not None


# -- what the SDK makes of it --------------------------------------------------------------------------


def _connect_error(url: str, **kwargs: Any) -> tuple[BaseException, float]:
    t0 = time.monotonic()
    with pytest.raises((ConnectError, AuthenticationError)) as info:
        Session.connect(url=url, connect_timeout=5.0, **kwargs)
    return info.value, time.monotonic() - t0


def test_sdk_bad_key_is_authentication_error_without_retry() -> None:
    with Simulator(speed=None, require_api_key=KEY) as sim:
        err, _ = _connect_error(sim.url, api_key="sk-rtq-wrong-" + "0" * 12)
        assert isinstance(err, AuthenticationError) and "invalid_api_key" in str(err)
        assert sim.stats()["sessions"] == 1



def test_sdk_missing_auth_raises_authentication_error_with_the_server_text() -> None:
    with Simulator(speed=None, require_api_key=KEY) as sim:
        err, _ = _connect_error(sim.url)
        assert isinstance(err, AuthenticationError)
        assert "Missing bearer or basic authentication in header" in str(err)
        assert sim.stats()["sessions"] == 1



def test_sdk_bad_key_error_carries_the_server_text() -> None:
    """Today redact() reads "invalid_api_key: Incorrect" as a credential header and masks "Incorrect"."""
    with Simulator(speed=None, require_api_key=KEY) as sim:
        err, _ = _connect_error(sim.url, api_key="sk-rtq-wrong-" + "0" * 12)
        assert "Incorrect API key provided" in str(err)



@pytest.mark.parametrize(
    ("query", "text"),
    [("", "Missing required parameter: 'model'"),
     ("?model=gpt-nope", 'invalid_model: Model "gpt-nope" is not supported in realtime mode.')],
)
def test_sdk_4000_close_is_fatal_with_the_server_text(query: str, text: str) -> None:
    """A 4000 close fails Session.connect at once with the server's error: one connection, no reconnect loop."""
    with Simulator(speed=None) as sim:
        err, took = _connect_error(base(sim) + query)
        assert type(err) is ConnectError and text in str(err)
        assert sim.stats()["sessions"] == 1 and took < 2.0



def test_sdk_4000_close_on_reconnect_is_fatal_not_retried() -> None:
    """The reconnect handshake gets invalid_model + close 4000: the session ends at once, with the text."""
    policy = ReconnectPolicy(initial_backoff=0.01, max_backoff=0.05, max_attempts=5, connect_timeout=5.0)
    with Simulator(speed=None) as sim:
        urls = [sim.url]

        def transport() -> WebSocketTransport:
            return WebSocketTransport.connect(urls[-1], [], timeout=5.0)

        session = Session.connect(transport=transport, reconnect=policy)
        try:
            closed = session.events("session.closed")
            session.ask("hello", timeout=TIMEOUT)
            urls.append(base(sim) + "?model=gpt-retired")  # the model is gone when the socket drops
            sim.inject(FaultPlan(drop_after_events=0), session=0)
            ev = closed.get(TIMEOUT)
            assert ev is not None and isinstance(ev.error, (ConnectError, ConnectionLost))
            assert 'Model "gpt-retired" is not supported in realtime mode.' in str(ev.error)
        finally:
            session.close()
        assert sim.stats()["sessions"] == 2  # the first socket and one refused attempt, no loop



def test_fatal_loss_treats_a_4000_close_as_fatal() -> None:
    """The rule itself: a 4000 close is never worth a retry, even if its error event was not seen."""
    from rtqueue.errors import ServerError
    from rtqueue.reconnect import fatal_loss

    assert fatal_loss(4000, None) is not None
    err = ServerError('Model "x" is not supported in realtime mode.', code="invalid_model",
                      type="invalid_request_error")
    assert 'Model "x" is not supported' in str(fatal_loss(4000, err))
