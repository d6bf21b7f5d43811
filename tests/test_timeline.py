"""rtqueue timeline: the HTML page in a real headless browser (Debian's chromium)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from rtqueue import Simulator
from rtqueue.cli import main
from rtqueue.recording import read_recording
from rtqueue.timeline import build_bars
from tests.test_replay import _conversation
from tests.utils import UNIT

pytest.importorskip("plotly")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _record(path: Path) -> None:
    with Simulator(speed=4.0, trace=path) as sim:
        _conversation(sim.url)
        sim.wait_until(lambda s: s.stats()["active_sessions"] == 0, UNIT)


def _chromium(*args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", "--virtual-time-budget=10000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("timeline")
    rec, out = tmp / "call.jsonl", tmp / "call.html"
    _record(rec)
    assert main(["timeline", str(rec), "-o", str(out)]) == 0
    return rec, out


def test_bars_of_a_recording(page: tuple[Path, Path]) -> None:
    rec = read_recording(page[0])
    bars = build_bars(rec)
    responses = [b for b in bars if b.kind == "response"]
    created = [f for f in rec.frames if f.type == "response.created"]
    assert len(responses) == len(created) >= 4
    assert {b.lane for b in responses} == {"agent", "returns"}  # the first agent is unnamed in a trace
    assert {b.status for b in responses} >= {"completed", "cancelled"}
    assert any(b.kind == "tool" and b.label == "lookup_order" and b.end >= b.start for b in bars)
    assert any(b.kind == "handoff" and b.label == "returns" for b in bars)
    truncate = next(b for b in bars if b.kind == "barge_in" and b.label == "truncate")
    assert re.search(r"played 100 ms of \d+ ms received", truncate.hover[0])
    assert any(b.kind == "gate" for b in bars)


def test_page_is_self_contained(page: tuple[Path, Path]) -> None:
    text = page[1].read_text()
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=", text)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_page_in_headless_chromium(page: tuple[Path, Path]) -> None:
    rec, out = page
    n = sum(1 for f in read_recording(rec).frames if f.type == "response.created")
    done = _chromium("--enable-logging=stderr", "--v=0", "--dump-dom", out.as_uri())
    dom = done.stdout
    assert 'data-rendered="1"' in dom, done.stderr[-2000:]
    assert f'data-response-bars="{n}"' in dom
    assert "data-errors" not in dom
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line]
    assert not [line for line in console if "rror" in line], console
    shot = Path(__file__).resolve().parent.parent / "docs" / "timeline.png"
    if os.environ.get("RTQ_TIMELINE_SCREENSHOT"):
        shot.parent.mkdir(exist_ok=True)
        _chromium(f"--screenshot={shot}", "--window-size=1400,700", "--hide-scrollbars", out.as_uri())
        assert shot.stat().st_size > 10_000
