"""examples/guarded_desk.py runs end to end on the simulator and reports what its scripted customer exercised."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.utils import UNIT

pytest.importorskip("mcp")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "guarded_desk.py"


def test_guarded_desk_example_runs_clean() -> None:
    """The example's last line is its JSON summary: no conflict, nothing lost, every feature used."""
    proc = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=6 * UNIT,
                          cwd=ROOT, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    lines = proc.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["conflicts"] == 0
    assert summary["lost_intents"] == 0
    assert summary["guardrail_trips"] >= 1
    assert summary["corrections"] >= 1
    assert summary["approvals"] >= 1
    assert summary["rejections"] >= 1
    assert summary["mcp_calls"] >= 2
    assert summary["hosted_mcp_calls"] >= 1 and summary["local_mcp_calls"] >= 1
    transcript = "\n".join(lines[:-1])
    assert "customer> " in transcript and "desk: " in transcript
    assert "[say:" not in transcript and "[tools:" not in transcript  # the simulator's hooks stay hidden
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
