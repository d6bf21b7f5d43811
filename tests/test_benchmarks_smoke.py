"""Smoke-run every benchmark with --quick: they still run, write their JSON, and rtqueue keeps its promises.

Benchmarks are not tests: only breakage and rtqueue's correctness figures
(no user-visible conflict, no lost intent) are checked here, never timings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.utils import UNIT

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"

pytestmark = pytest.mark.timeout(int(30 * UNIT))


#: Every smoke run: (script, extra arguments). They are started together, once per module, because
#: they mostly wait (a paced simulator, real-time microphones): run one after another they took
#: 3.5 minutes of the suite; side by side about one. Each is still checked by its own test.
RUNS: dict[str, tuple[str, tuple[str, ...]]] = {
    "conflicts": ("bench_conflicts.py", ("--latencies", "40")),
    "guardrails": ("bench_conflicts.py", ("--workloads", "guardrails")),
    "reader": ("bench_reader.py", ()),
    "scale": ("bench_scale.py", ()),
    "soak": ("soak.py", ()),
    "phone": ("bench_phone.py", ()),
    "peers": ("bench_scale.py", ("--peers", "all", "--ramp", "6", "--seconds", "3")),
}


class Runs:
    """The smoke runs, started at once; :meth:`result` waits for one and returns the JSON it wrote."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.procs: dict[str, subprocess.Popen[str]] = {}
        for name, (script, extra) in RUNS.items():
            work = base / name
            work.mkdir()
            self.procs[name] = subprocess.Popen(
                [sys.executable, str(BENCH / script), "--quick", "--out", str(work / "out"),
                 "--json", str(work / "result.json"), *extra],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)

    def out(self, name: str) -> Path:
        return self.base / name / "out"

    def result(self, name: str) -> dict[str, Any]:
        proc = self.procs[name]
        try:
            stdout, stderr = proc.communicate(timeout=20 * UNIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            pytest.fail(f"{name}: no result within {20 * UNIT}s\n{stdout[-3000:]}\n{stderr[-3000:]}")
        path = self.base / name / "result.json"
        assert path.exists(), f"{name} wrote no JSON (rc={proc.returncode})\n{stdout[-3000:]}\n{stderr[-3000:]}"
        assert "Traceback" not in stderr, stderr[-3000:]
        return json.loads(path.read_text())

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """All smoke runs, started together."""
    started = Runs(tmp_path_factory.mktemp("bench"))
    try:
        yield started
    finally:
        started.close()


def bench(runs: Runs, name: str) -> dict[str, Any]:
    data = runs.result(name)
    assert isinstance(data["results"], list) and data["results"]
    assert isinstance(data["targets"], list) and data["targets"]
    return data


def test_bench_conflicts_quick(runs: Runs) -> None:
    """bench_conflicts --quick at 40 ms: every strategy x workload row, rtqueue with 0 visible conflicts, 0 lost."""
    data = bench(runs, "conflicts")
    rows = data["results"]
    keys = {"strategy", "workload", "latency_ms", "creates", "conflicts_per_1000", "lost_intents", "duplicates",
            "gate_p50_ms", "gate_p99_ms", "cpu_ms_per_response"}
    for row in rows:
        assert keys <= set(row), sorted(keys - set(row))
        assert "failed" not in row, row
    strategies = {r["strategy"] for r in rows}
    assert {"naive", "flag", "poll", "rtqueue"} <= strategies
    assert "openai-agents" in strategies or "openai-agents" in data["skipped"]
    assert {r["workload"] for r in rows} == {"handoff", "tools", "bargein", "app_vs_vad"}
    assert {r["latency_ms"] for r in rows} == {40.0}
    mine = [r for r in rows if r["strategy"] == "rtqueue"]
    assert len(mine) == 4
    for r in mine:
        assert r["user_visible_conflicts"] == 0, r
        assert r["lost_intents"] == 0, r
        assert r["creates"] > 0 and r["responses"] > 0
    assert (runs.out("conflicts") / "conflicts.png").stat().st_size > 0
    assert (runs.out("conflicts") / "gate_latency.png").stat().st_size > 0
    # The README's matrix is printed from that JSON: a row per workload x RTT, rtqueue's cells in bold.
    report = subprocess.run([sys.executable, str(BENCH / "_report.py"), str(runs.out("conflicts")), "--readme"],
                            capture_output=True, text=True, timeout=5 * UNIT, cwd=ROOT, check=True).stdout
    lines = report.strip().splitlines()
    assert lines[0].startswith("| workload @ RTT | naive | flag | poll | rtqueue") and len(lines) == 2 + 4
    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.strip().strip("|").split("|")]

    column = cells(lines[0]).index("rtqueue")
    for line in lines[2:]:
        cell = cells(line)[column]
        assert cell.startswith("**") and ", 0/" in cell, line  # bold, and 0 lost intents


def test_bench_conflicts_guardrails_quick(runs: Runs) -> None:
    """bench_conflicts --workloads guardrails --quick: rtqueue's trips each get exactly one answered correction."""
    data = bench(runs, "guardrails")
    rows = data["results"]
    assert {r["workload"] for r in rows} == {"guardrails"}
    assert {r["strategy"] for r in rows} <= {"rtqueue", "openai-agents"}  # the baselines have no guardrails
    assert "openai-agents" in {r["strategy"] for r in rows} or "openai-agents" in data["skipped"]
    mine = [r for r in rows if r["strategy"] == "rtqueue"]
    assert {r["latency_ms"] for r in mine} == {0.0, 40.0}
    for r in mine:
        assert "failed" not in r, r
        assert r["trips"] > 0 and r["corrections_sent"] == r["trips"], r
        assert r["lost_corrections"] == 0 and r["duplicate_corrections"] == 0, r
        assert r["user_visible_conflicts"] == 0 and r["lost_intents"] == 0, r
    out = runs.out("guardrails")
    assert (out / "bench_conflicts_guardrails_quick.json").exists()
    assert not (out / "bench_conflicts.json").exists() and not (out / "conflicts.png").exists()


def test_bench_reader_quick(runs: Runs) -> None:
    """bench_reader --quick: rtqueue's reader and the floor are both measured against real time."""
    data = bench(runs, "reader")
    rows = data["results"]
    assert len(rows) == 3
    for row in rows:
        assert row["x_realtime"] > 0 and row["frames"] > 0 and row["audio_s"] > 0


def test_bench_scale_quick(runs: Runs) -> None:
    """bench_scale --quick: sessions stream audio with no visible conflict, no lost intent, all threads ended."""
    data = bench(runs, "scale")
    (row,) = data["results"]
    assert row["sessions"] > 0 and row["server_responses"] > 0
    assert row["user_visible_conflicts"] == 0
    assert row["lost_intents"] == 0
    assert row["threads_left_after_close"] <= 1  # the RSS sampler may still be ending
    assert row["mb_per_session"] is not None and row["threads_per_session"] > 0
    stores = row["capped_stores"]
    assert set(stores) == {"history", "recent_responses", "done_ids", "handled_calls", "server_errors", "gate_samples"}
    assert stores["history"]["entries_per_session"] > 0 and stores["history"]["bytes_per_entry"] > 0
    assert row["other_growth_mb_per_min"] is None or isinstance(row["other_growth_mb_per_min"], float)
    client = row["scheduler"]["client"]  # Linux schedstat, per thread kind
    # The writer sends the gated creates (it wakes), though with direct mic writes and 1 s gate slices
    # its CPU share can round to 0.0 % in a short run.
    assert client["rtqueue-reader"]["switches_in_per_s"] > 0 and client["rtqueue-writer"]["switches_in_per_s"] > 0
    assert client["rtqueue-writer"]["cpu_pct"] >= 0
    assert client["total"]["switches_in_per_s"] >= client["rtqueue-writer"]["switches_in_per_s"]
    assert row["scheduler"]["sim"]["total"]["cpu_pct"] > 0
    machine = row["machine_cpu"]  # /proc/stat over the same window: was someone else busy?
    capacity = 100 * (os.cpu_count() or 1) + 5  # % of one CPU, with room for tick rounding
    assert 0 < machine["busy_pct"] <= capacity and 0 <= machine["idle_pct"] <= capacity
    assert 0 <= machine["steal_pct"] <= capacity and isinstance(machine["unaccounted_pct"], float)


def test_soak_quick(runs: Runs) -> None:
    """soak --quick: a reconnecting, fault-injected session loses nothing and leaves no thread behind."""
    row = runs.result("soak")
    assert row["lost_intents"] == 0, row["lost_detail"]
    assert row["hung_waits"] == 0 and row["unresolved_handles"] == 0
    assert row["reconnects"] >= 1 and row["conflicts"] == 0
    assert row["threads_left_after_close"] <= 1
    assert row["session_tables_at_end"]["items"] > 0
    assert row["history_mb"]["end"] > 0


def test_bench_phone_quick(runs: Runs) -> None:
    """bench_phone --quick: Twilio and SIP calls with 0 conflicts, 0 lost intents, barge-ins truncated; no full JSON."""
    data = bench(runs, "phone")
    twilio, sip = data["results"]
    assert twilio["part"] == "twilio" and sip["part"] == "sip"
    assert twilio["conflicts"] == 0 and twilio["lost_intents"] == 0 and twilio["truncate_errors"] == 0
    assert twilio["barge_ins"] == twilio["calls"] and twilio["truncations"] == twilio["calls"]
    assert twilio["barge_p99_ms"] is not None and twilio["trunc_err_p99_ms"] is not None
    assert sip["user_visible_conflicts"] == 0 and sip["lost_intents"] == 0  # server races are retried
    assert sip["attached"] == sip["calls"] == sip["calls_ended"] and sip["gate_samples"] > 0
    assert sip["workload"] == "arrivals" and sip["peak_active_calls"] == sip["calls"]  # all on the line at once
    assert (runs.out("phone") / "bench_phone_quick.json").exists()
    assert not (runs.out("phone") / "bench_phone.json").exists()  # --quick never replaces the published run


def test_bench_scale_peers_quick(runs: Runs) -> None:
    """bench_scale --peers --quick: rtqueue and the two official clients run the same workload; no full JSON."""
    data = bench(runs, "peers")
    rows = {r["client"]: r for r in data["results"]}
    skipped = data["summary"]["skipped"]
    assert set(rows) | set(skipped) == {"rtqueue", "openai-agents", "openai"}
    for r in rows.values():
        assert "error" not in r, r
        assert r["audio_deltas"] > 0 and r["mic_chunks_sent"] > 0 and r["cpu_s_per_session_min"] > 0, r
    assert rows["rtqueue"]["lost_intents"] == 0 and rows["rtqueue"]["gate_samples"] >= 0
    out = runs.out("peers")
    assert (out / "bench_scale_peers_quick.json").exists() and not (out / "bench_scale_peers.json").exists()
