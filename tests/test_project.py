"""Project-level checks: the public API, the README's commands, the CI script, the CLI."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import rtqueue
from tests.utils import UNIT

ROOT = Path(__file__).resolve().parent.parent

PUBLIC = {
    "ApprovalDecision", "ApprovalRequest", "HostedMCP",
    "Agent", "AudioFormat", "AudioFormatError", "AudioUnavailable", "AuthenticationError", "PCM16", "PCMA",
    "PCMU", "ConnectError", "ConnectionLost", "Event", "FaultPlan",
    "GateStats", "GateTimeout", "GuardrailContext", "GuardrailResult", "InputGuardrail",
    "InputGuardrailTripped", "OutputGuardrail", "input_guardrail", "output_guardrail",
    "Handoff", "Interruption", "InvalidArgument", "ProtocolError", "ReconnectPolicy",
    "Response", "ResponseError", "ResponseGate", "ResponseHandle", "ResponseRejected", "ResponseTimeout",
    "RtqueueError", "SendHandle", "ServerError", "Session", "SessionClosed", "Simulator", "Tool", "ToolContext",
    "ToolError", "__version__", "handoff", "tool",
    "CallControlError", "WebhookVerificationError",
    "SessionConfig", "Usage",
}


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("## Quick start", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_public_api_is_exactly_all():
    """rtqueue.__all__ is the documented public API and every name resolves."""
    assert set(rtqueue.__all__) == PUBLIC
    for name in rtqueue.__all__:
        assert getattr(rtqueue, name) is not None


def test_errors_form_one_tree():
    """Every public exception derives from RtqueueError."""
    for name in rtqueue.__all__:
        obj = getattr(rtqueue, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            assert issubclass(obj, rtqueue.RtqueueError), name


def test_readme_has_exactly_two_commands_and_ci_runs_the_test_one():
    """The quick start has two commands; .ci/run ends with the second, verbatim."""
    commands = _readme_commands()
    assert len(commands) == 2
    assert "rtqueue demo" in commands[0] and "pytest" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1].strip() == commands[1]


def test_import_does_not_load_sounddevice():
    """import rtqueue works without PortAudio: sounddevice is imported lazily."""
    code = "import sys, rtqueue, rtqueue.audio; print('sounddevice' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=UNIT, check=True)
    assert out.stdout.strip() == "False"


def test_demo_runs_with_zero_conflicts(tmp_path: Path):
    """`rtqueue demo` (as python -m rtqueue demo) completes with handoffs, tools and 0 conflicts."""
    out = tmp_path / "demo.json"
    proc = subprocess.run(
        [sys.executable, "-m", "rtqueue", "demo", "--speed", "50", "--json", str(out),
         "--record", str(tmp_path / "rec")],
        capture_output=True, text=True, timeout=6 * UNIT, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    import json

    from rtqueue.recording import read_recording

    summary = json.loads(out.read_text())["summary"]
    assert summary["conflicts"] == 0 and summary["failures"] == 0
    assert summary["handoffs"] >= 3 and summary["tool_calls"] >= 3
    # --record DIR: the session's recording and its timeline page.
    rec = read_recording(tmp_path / "rec" / "demo.jsonl")
    assert rec.header["source"] == "client"
    assert sum(1 for f in rec.frames if f.type == "response.done") == summary["responses"]
    assert (tmp_path / "rec" / "demo.html").stat().st_size > 0
    assert re.search(r"--> handoff\s+: front_desk -> authentication", proc.stdout)
    assert "[tool] verify_customer(" in proc.stdout


def test_standalone_simulator_serves_a_session():
    """`python -m rtqueue sim --port 0` prints its URL, serves a session, and stops on Ctrl-C."""
    import signal

    proc = subprocess.Popen(
        [sys.executable, "-m", "rtqueue", "sim", "--port", "0", "--speed", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        url = re.search(r"ws://127\.0\.0\.1:\d+/v1/realtime\S*", line)
        assert url, line
        with rtqueue.Session.connect(url=url.group(0), reconnect=False) as session:
            assert session.ask("hello", timeout=UNIT).status == "completed"
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(UNIT)
    assert rc == 0
