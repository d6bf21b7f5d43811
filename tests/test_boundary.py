"""The argument and output boundary of the modules around the session (issue 12, items 9 and 10).

Typing and packaging, private-member reach-ins, argument checks of the
simulator and its fault plans, the simulator's command line, strict tool
output, secrets in URLs, and the simulator's logging.
"""

from __future__ import annotations

import ast
import configparser
import json
import logging
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect

import rtqueue
from rtqueue.agents import Agent, resolve_agents, session_config_for
from rtqueue.errors import InvalidArgument
from rtqueue.sim import FaultPlan, Simulator
from tests.utils import UNIT

ROOT = Path(__file__).resolve().parent.parent

# The modules outside the session rewrite: tools, agents, transport, simulator, audio.
PERIPHERY = [
    "rtqueue/agents.py",
    "rtqueue/sim",
    "rtqueue/audio",
    "rtqueue/tools.py",
    "rtqueue/toolrunner.py",
    "rtqueue/transport.py",
    "rtqueue/protocol.py",
    "rtqueue/secrets.py",
    "rtqueue/cli.py",
    "rtqueue/demo.py",
    "rtqueue/demo_desk.py",
]


def periphery_files() -> list[Path]:
    """The Python files of :data:`PERIPHERY`."""
    files: list[Path] = []
    for entry in PERIPHERY:
        path = ROOT / entry
        files += [path] if path.suffix == ".py" else sorted(path.glob("*.py"))
    return files


def run(*args: str) -> subprocess.CompletedProcess[str]:
    """Run a command from the project root with this interpreter's environment."""
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=6 * UNIT, check=False)


# -- typing and packaging -----------------------------------------------------------------


def test_py_typed_is_shipped() -> None:
    """rtqueue/py.typed exists and setup.cfg ships it as package data."""
    assert (ROOT / "rtqueue" / "py.typed").is_file()
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    shipped = cfg.get("options.package_data", "rtqueue", fallback="")
    assert "py.typed" in shipped.replace(",", " ").split()


# -- private members ------------------------------------------------------------------------


def test_agent_graph_lookup_is_public() -> None:
    """AgentGraph.agent() finds an agent by object or name and refuses strangers; session_config_for uses it."""
    billing = Agent("billing", instructions="Bill.")
    desk = Agent("desk", instructions="Greet.", handoffs=[billing])
    graph = resolve_agents(desk)
    assert graph.agent("billing") is billing
    assert graph.agent(desk) is desk
    with pytest.raises(InvalidArgument, match="no agent named 'nobody'"):
        graph.agent("nobody")
    with pytest.raises(InvalidArgument, match="not the one in this graph"):
        graph.agent(Agent("billing", instructions="Another."))
    assert session_config_for("desk", graph)["instructions"] == "Greet."


def test_periphery_reads_no_private_members() -> None:
    """ruff SLF001 (private member access) is clean for the modules around the session."""
    result = run(sys.executable, "-m", "ruff", "check", "--no-cache", "--select", "SLF001", *PERIPHERY)
    assert result.returncode == 0, result.stdout + result.stderr


# -- simulator arguments --------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"speed": -1},
        {"speed": "fast"},
        {"speed": math.nan},
        {"speed": math.inf},
        {"port": "x"},
        {"port": -1},
        {"port": 65536},
        {"port": True},
        {"port": 80.0},
        {"host": 127001},
        {"host": ""},
        {"latency_ms": -5},
        {"latency_ms": "20"},
        {"seed": "one"},
        {"seed": 1.5},
        {"trace": 5},
        {"require_api_key": 12345},
        {"require_api_key": ""},
        {"faults": {"drop_after_events": 1}},
        {"audio_chunk_ms": 0},
        {"audio_chunk_ms": 20.5},
        {"words_per_second": 0},
        {"first_output_ms": -1},
        {"min_response_ms": math.nan},
        {"max_sessions": -1},
        {"max_sessions": 2.0},
        {"record": "yes"},
        {"close_timeout": 0},
        {"session_max_duration_s": -1},
    ],
    ids=repr,
)
def test_simulator_refuses_bad_arguments(kwargs: dict[str, Any]) -> None:
    """Simulator(...) with a wrong type or value raises InvalidArgument naming the argument, before binding."""
    name = next(iter(kwargs))
    with pytest.raises(InvalidArgument, match=f"Simulator {name} must be") as info:
        Simulator(**kwargs)
    assert isinstance(info.value, rtqueue.RtqueueError) and isinstance(info.value, TypeError)
    if name == "require_api_key":
        assert "12345" not in str(info.value), "the key is echoed back"


def test_simulator_inject_refuses_bad_arguments() -> None:
    """Simulator.inject() wants a FaultPlan and a session index >= 0 or None."""
    sim = Simulator(speed=None)  # never started: the checks come first
    with pytest.raises(InvalidArgument, match="must be a FaultPlan"):
        sim.inject({"drop_after_events": 1})  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="session must be an int >= 0 or None"):
        sim.inject(FaultPlan(), session=-1)
    with pytest.raises(InvalidArgument, match="session must be an int >= 0 or None"):
        sim.inject(FaultPlan(), session="0")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"drop_after_events": -1},
        {"drop_after_events": 1.5},
        {"drop_after_events": "3"},
        {"drop_after_events": True},
        {"drop_mid_response": 1},
        {"drop_mid_response": "yes"},
        {"withhold_done": 0},
        {"withhold_done": -2},
        {"withhold_done": 1.0},
        {"duplicate_events": -0.1},
        {"duplicate_events": 1.5},
        {"duplicate_events": "half"},
        {"duplicate_events": math.nan},
        {"delay_events_ms": -1},
        {"delay_events_ms": None},
        {"delay_events_ms": math.inf},
        {"malformed_json_after": -1},
        {"malformed_json_after": 2.5},
        {"binary_frame_after": -1},
        {"binary_frame_after": "1"},
        {"unknown_event_after": -1},
        {"unknown_event_after": [1]},
        {"error_after": (1, 2)},
        {"error_after": (-1, "server_error")},
        {"error_after": (1.5, "server_error")},
        {"error_after": (1, "")},
        {"error_after": [1, "server_error"]},
        {"error_after": (1,)},
        {"expire_after_s": -1},
        {"expire_after_s": "60"},
        {"stall_reading_s": -0.5},
        {"stall_reading_s": None},
    ],
    ids=repr,
)
def test_fault_plan_refuses_bad_fields(kwargs: dict[str, Any]) -> None:
    """FaultPlan(...) with a field of the wrong type or sign raises InvalidArgument naming the field."""
    name = next(iter(kwargs))
    with pytest.raises(InvalidArgument, match=f"FaultPlan {name}"):
        FaultPlan(**kwargs)


def test_fault_plan_accepts_good_fields() -> None:
    """Every FaultPlan field takes its documented range (ints for float fields included)."""
    plan = FaultPlan(
        drop_after_events=0,
        drop_mid_response=True,
        withhold_done=1,
        duplicate_events=1,
        delay_events_ms=0,
        malformed_json_after=0,
        binary_frame_after=3,
        unknown_event_after=4,
        error_after=(0, "server_error"),
        expire_after_s=0,
        stall_reading_s=0.25,
    )
    assert plan.error_after == (0, "server_error")


# -- simulator command line -----------------------------------------------------------------


def test_sim_help_names_the_command_it_was_run_as() -> None:
    """`python -m rtqueue sim --help` shows usage for `python -m rtqueue sim`, not `python -m rtqueue.sim`."""
    result = run(sys.executable, "-m", "rtqueue", "sim", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m rtqueue sim "), result.stdout
    assert "rtqueue.sim" not in result.stdout


def test_sim_negative_speed_is_a_usage_error() -> None:
    """`python -m rtqueue sim --speed -1` prints an argparse error and exits 2, without a traceback."""
    result = run(sys.executable, "-m", "rtqueue", "sim", "--speed", "-1")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "usage: python -m rtqueue sim" in result.stderr
    assert "error: argument --speed: must be a finite number >= 0, got -1" in result.stderr


@pytest.mark.parametrize("argv", [["--port", "x"], ["--port", "70000"], ["--latency-ms", "nan"], ["--speed", "fast"]])
def test_sim_cli_bad_options_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Every bad simulator option is an argparse usage error (status 2), raised before anything binds."""
    from rtqueue.cli import main

    with pytest.raises(SystemExit) as info:
        main(["sim", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: rtqueue sim ") and f"error: argument {argv[0]}:" in err


# -- tool output ---------------------------------------------------------------------------------


def _returning(value: Any) -> rtqueue.Tool:
    @rtqueue.tool
    def report() -> Any:
        """Return the value under test."""
        return value

    return report


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, [1.0, math.nan], {"ratio": math.inf}], ids=repr)
def test_tool_returning_nan_or_inf_is_a_tool_error(value: Any) -> None:
    """A tool returning NaN or infinity (at any depth) gives a ToolError; no non-standard JSON is produced."""
    with pytest.raises(rtqueue.ToolError, match=r"tool report returned a value that cannot be sent: .*NaN or infinity"):
        _returning(value).invoke("{}")
    with pytest.raises(InvalidArgument):
        rtqueue.tools.serialize_output(value)


def test_tool_returning_an_unknown_object_is_a_tool_error() -> None:
    """An object serialize_output does not convert is refused (named by type), not sent as its str() or repr."""

    class Opaque:
        def __str__(self) -> str:
            return "opaque!"

    for value in (Opaque(), {"nested": [Opaque()]}, b"raw bytes", object()):
        with pytest.raises(rtqueue.ToolError, match="returned a value that cannot be sent: it contains a") as info:
            _returning(value).invoke("{}")
        assert "opaque!" not in str(info.value) and " at 0x" not in str(info.value)


def test_tool_output_converts_documented_types() -> None:
    """datetimes, dates and times become ISO 8601; UUID, Decimal and paths strings; numpy numbers and lists."""
    import datetime
    import decimal
    import pathlib
    import uuid

    import numpy as np

    value = {
        "at": datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.timezone.utc),
        "day": datetime.date(2024, 5, 6),
        "time": datetime.time(7, 8),
        "id": uuid.UUID(int=1),
        "price": decimal.Decimal("12.50"),
        "file": pathlib.PurePosixPath("/srv/report.txt"),
        "count": np.int64(3),
        "scores": np.array([0.5, 1.0]),
    }
    assert json.loads(_returning(value).invoke("{}")) == {
        "at": "2024-05-06T07:08:09+00:00",
        "day": "2024-05-06",
        "time": "07:08:00",
        "id": "00000000-0000-0000-0000-000000000001",
        "price": "12.50",
        "file": "/srv/report.txt",
        "count": 3,
        "scores": [0.5, 1.0],
    }
    with pytest.raises(rtqueue.ToolError, match="Decimal"):
        _returning(decimal.Decimal("NaN")).invoke("{}")


# -- secrets in URLs -------------------------------------------------------------------------------

AZURE_KEY = "0123456789abcdef0123456789abcdef"  # Azure keys are 32 hex digits: nothing like sk-...


@pytest.mark.parametrize(
    "text",
    [
        f"wss://res.openai.azure.com/openai/realtime?api-version=2024-10-01&api-key={AZURE_KEY}",
        f"ws://proxy.local/v1/realtime?model=gpt-realtime&key={AZURE_KEY}",
        f"ws://proxy.local/v1/realtime?token={AZURE_KEY}&model=gpt-realtime",
        f"https://app.local/callback#access_token={AZURE_KEY}&state=1",
        f"ws://proxy.local/v1/realtime?APIKEY={AZURE_KEY}",
        f"ws://proxy.local/v1/realtime?client_secret={AZURE_KEY}",
        f"https://acct.blob.core.windows.net/c/b?sv=2022&sig={AZURE_KEY}",
        f"api-key: {AZURE_KEY}",
        f"Authorization: Basic {AZURE_KEY}",
        f"Ocp-Apim-Subscription-Key: {AZURE_KEY}",
        f"wss://user:{AZURE_KEY}@proxy.local/v1/realtime",
    ],
)
def test_redact_removes_keys_that_do_not_look_like_keys(text: str) -> None:
    """redact() removes a credential from URL query parameters and headers even when it is not sk-shaped."""
    out = rtqueue.secrets.redact(text)
    assert AZURE_KEY not in out and "***" in out
    assert rtqueue.secrets.redact(out) == out
    assert rtqueue.secrets.redact("ws://127.0.0.1:8765/v1/realtime?model=gpt-realtime&api-version=1") == (
        "ws://127.0.0.1:8765/v1/realtime?model=gpt-realtime&api-version=1"
    )


def test_connect_error_redacts_a_key_in_the_url() -> None:
    """A ConnectError (refused TCP) or InvalidArgument for a URL carrying ?api-key= never shows the key."""
    from rtqueue.protocol import endpoint
    from rtqueue.transport import WebSocketTransport

    url = f"ws://127.0.0.1:9/openai/realtime?api-version=2024-10-01&api-key={AZURE_KEY}"
    with pytest.raises(rtqueue.ConnectError) as info:
        WebSocketTransport.connect(url, [], timeout=UNIT)
    said = f"{info.value} {info.value!r}"
    assert AZURE_KEY not in said and "api-key=***" in said
    with pytest.raises(InvalidArgument) as bad:
        endpoint(f"https://res.openai.azure.com/openai/realtime?api-key={AZURE_KEY}", model="m", api_key=None)
    assert AZURE_KEY not in str(bad.value) and "api-key=***" in str(bad.value)


# -- logging -----------------------------------------------------------------------------------------


def _one_exchange(sim: Simulator) -> None:
    with connect(sim.url, open_timeout=UNIT) as ws:
        assert json.loads(ws.recv(timeout=UNIT))["type"] == "session.created"  # the GA service sends no
        ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
        assert json.loads(ws.recv(timeout=UNIT))["type"] == "input_audio_buffer.cleared"


def test_simulator_frames_stay_off_the_rtqueue_debug_log(caplog: pytest.LogCaptureFixture) -> None:
    """With DEBUG on for "rtqueue", the simulator logs no frames; they go to "rtqueue.sim.wire" only when asked."""
    caplog.set_level(logging.DEBUG, logger="rtqueue")
    with Simulator(speed=None, seed=1) as sim:
        _one_exchange(sim)
    quiet = [r for r in caplog.records if r.name.startswith("rtqueue.sim") and r.levelno < logging.INFO]
    assert quiet == [], [r.getMessage() for r in quiet][:5]

    caplog.clear()
    caplog.set_level(logging.DEBUG, logger="rtqueue.sim.wire")
    with Simulator(speed=None, seed=1) as sim:
        _one_exchange(sim)
    wire = [r.getMessage() for r in caplog.records if r.name == "rtqueue.sim.wire"]
    assert any("input_audio_buffer.clear" in m for m in wire), wire[:5]


def test_periphery_log_messages_do_not_repeat_the_logger_name() -> None:
    """No log call in the modules around the session starts its message with "rtqueue:" (a doubled prefix)."""
    offenders: list[str] = []
    for path in periphery_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args):
                continue
            if node.func.attr not in {"debug", "info", "warning", "error", "exception", "critical", "log"}:
                continue
            first = node.args[1] if node.func.attr == "log" and len(node.args) > 1 else node.args[0]
            text = first.value if isinstance(first, ast.Constant) else None
            if isinstance(first, ast.JoinedStr) and first.values and isinstance(first.values[0], ast.Constant):
                text = first.values[0].value
            if isinstance(text, str) and text.lower().startswith("rtqueue:"):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []
