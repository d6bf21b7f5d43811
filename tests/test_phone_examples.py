"""Phone examples end to end (issue 13): the SIP and Twilio desks, `rtqueue demo --phone`, and a G.711 handoff.

The examples run as subprocesses on the embedded simulator; each prints one
JSON summary line last. The in-process test looks at what the fake Twilio
caller heard after a handoff: it must be the agent's speech, not static.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rtqueue.demo_phone import run_twilio_desk
from rtqueue.formats import PCM16, PCMU, convert
from rtqueue.sim import Simulator
from rtqueue.sim.synth import synthesize
from rtqueue.testing_twilio import FakeCall
from rtqueue.twilio import TwilioCall
from tests.utils import UNIT

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(int(20 * UNIT))


def last_json(*cmd: str) -> dict[str, Any]:
    """Run ``cmd`` from the repository root; return its last stdout line parsed as JSON (it must exit 0)."""
    proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=12 * UNIT, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_desk_kept_its_promises(summary: dict[str, Any]) -> None:
    """The figures every phone desk run must show."""
    assert summary["call_ended"] is True, summary
    assert summary["conflicts"] == 0 and summary["lost_intents"] == 0, summary
    assert summary["handoffs"] >= 1 and summary["tool_calls"] >= 1, summary
    assert summary["barge_ins"] >= 1 and summary["truncate_errors"] == 0, summary
    assert summary["keys"] == "2" and summary["final_agent"] == "billing", summary


def test_sip_example_transfers_to_a_human_by_refer():
    """examples/phone_sip.py: webhook, accept, attach; tools, keypad handoff, a barge-in, a SIP REFER."""
    summary = last_json("examples/phone_sip.py")
    assert_desk_kept_its_promises(summary)
    assert summary["ended_by"] == "refer" and summary["refer_target"] == "sip:humans@desk.example.com"
    assert summary["tool_errors"] == 0 and summary["cancel_not_active"] == 0


def test_sip_example_hang_up_ends_the_call_from_the_agent_tool():
    """examples/phone_sip.py --hangup: the caller says goodbye and the agent's end_call tool hangs up."""
    summary = last_json("examples/phone_sip.py", "--hangup")
    assert_desk_kept_its_promises(summary)
    assert summary["ended_by"] == "app" and summary["refer_target"] is None


def test_rtqueue_demo_phone_runs_the_sip_desk(tmp_path: Path):
    """`rtqueue demo --phone` runs the SIP desk and writes the same summary with --json."""
    out = tmp_path / "phone.json"
    summary = last_json("-m", "rtqueue", "demo", "--phone", "--json", str(out))
    assert_desk_kept_its_promises(summary)
    assert json.loads(out.read_text()) == summary


def test_twilio_example_truncates_within_a_frame_of_what_was_heard():
    """examples/phone_twilio.py: the desk over the bridge; the barge-in truncates within 20 ms of what was heard."""
    summary = last_json("examples/phone_twilio.py", "--speed", "2")
    assert_desk_kept_its_promises(summary)
    assert summary["clears"] >= 1 and summary["truncates"] == summary["clears"], summary
    assert summary["max_truncate_error_ms"] is not None and summary["max_truncate_error_ms"] <= 20.0, summary
    assert summary["transferred_to"] == "sip:humans@desk.example.com" and summary["fake_twilio_errors"] == []
    assert summary["cancel_not_active"] == 0
    assert "invalid_value" not in summary["server_errors"]
    assert "response_cancel_not_active" not in summary["server_errors"]


def correlation(a: bytes, b: bytes) -> float:
    """Normalised correlation of two PCM16 buffers over their common length."""
    x = np.frombuffer(a, "<i2").astype(np.float64)
    y = np.frombuffer(b, "<i2").astype(np.float64)
    n = min(x.size, y.size)
    x, y = x[:n], y[:n]
    return float(np.dot(x, y) / np.sqrt(np.dot(x, x) * np.dot(y, y)))


def test_a_handoff_in_a_twilio_call_keeps_pcmu_so_the_caller_hears_speech_not_static():
    """After the keypad handoff, the mu-law the fake caller heard decodes to the new agent's synthesized speech."""
    seen: dict[str, Any] = {}

    def inspect(sim: Simulator, call: TwilioCall, caller: FakeCall) -> None:
        events = sim.server_events()
        seen["transcripts"] = {e["item_id"]: e["transcript"] for e in events
                               if e.get("type") == "response.output_audio_transcript.done"}
        seen["sent"] = {}
        for e in events:
            if e.get("type") == "response.output_audio.delta":
                seen["sent"][e["item_id"]] = seen["sent"].get(e["item_id"], b"") + base64.b64decode(e["delta"])
        seen["formats"] = [e["response"]["audio"]["output"]["format"] for e in events
                           if e.get("type") == "response.done"]
        updates = [e["session"] for e in sim.client_events() if e.get("type") == "session.update"]
        seen["update_formats"] = [u.get("audio", {}).get("output", {}).get("format") for u in updates]
        seen["heard"] = {item: caller.heard_audio(item) for item in caller.heard_items()}
        seen["cut"] = {c.item_id for c in caller.clears}
        session = call.session
        assert session is not None
        seen["output_format"] = session.output_format

    summary = run_twilio_desk(speed=2.0, out=io.StringIO(), inspect=inspect)
    assert summary["handoffs"] >= 1 and summary["conflicts"] == 0 and summary["truncate_errors"] == 0
    assert seen["output_format"] == PCMU
    assert seen["formats"] and all(f == {"type": "audio/pcmu"} for f in seen["formats"]), seen["formats"]
    # The handoff's session.update (and every other) restates audio/pcmu.
    assert len(seen["update_formats"]) >= 2 and all(f == {"type": "audio/pcmu"} for f in seen["update_formats"])
    billing = [item for item, text in seen["transcripts"].items()
               if text.startswith("This is the billing agent") and item in seen["heard"] and item not in seen["cut"]]
    assert billing, seen["transcripts"]
    for item in billing:
        heard = seen["heard"][item]
        assert heard == seen["sent"][item]  # every byte the model sent, untouched
        reference = synthesize(seen["transcripts"][item], seed=7)
        decoded = convert(heard, PCMU, PCM16)
        assert abs(PCMU.ms(len(heard)) - reference.duration_ms) <= 1
        assert correlation(decoded, reference.pcm) > 0.99
        # Static (PCM16 bytes played as mu-law) would be loud noise: the energy matches speech instead.
        ratio = np.sqrt(np.mean(np.frombuffer(decoded, "<i2").astype(np.float64) ** 2)) / np.sqrt(
            np.mean(np.frombuffer(reference.pcm, "<i2").astype(np.float64) ** 2))
        assert 0.9 < ratio < 1.1, ratio
