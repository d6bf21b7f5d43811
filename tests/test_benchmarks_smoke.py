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


def run_bench(script: str, tmp_path: Path, *extra: str) -> dict[str, Any]:
    data = run_script(script, tmp_path, *extra)
    assert isinstance(data["results"], list) and data["results"]
    assert isinstance(data["targets"], list) and data["targets"]
    return data


def run_script(script: str, tmp_path: Path, *extra: str) -> dict[str, Any]:
    """Run ``benchmarks/<script> --quick`` and return the JSON it wrote."""
    out = tmp_path / "out"
    path = tmp_path / f"{script}.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick", "--out", str(out), "--json", str(path), *extra],
        capture_output=True,
        text=True,
        timeout=12 * UNIT,
        cwd=ROOT,
    )
    assert path.exists(), f"{script} wrote no JSON (rc={proc.returncode})\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return json.loads(path.read_text())


def test_bench_conflicts_quick(tmp_path: Path) -> None:
    """bench_conflicts --quick: every strategy x workload row, rtqueue with 0 visible conflicts, 0 lost."""
    data = run_bench("bench_conflicts.py", tmp_path)
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
    assert {r["latency_ms"] for r in rows} == {0.0, 40.0}
    mine = [r for r in rows if r["strategy"] == "rtqueue"]
    assert len(mine) == 8
    for r in mine:
        assert r["user_visible_conflicts"] == 0, r
        assert r["lost_intents"] == 0, r
        assert r["creates"] > 0 and r["responses"] > 0
    assert (tmp_path / "out" / "conflicts.png").stat().st_size > 0
    assert (tmp_path / "out" / "gate_latency.png").stat().st_size > 0
    # The README's matrix is printed from that JSON: a row per workload x RTT, rtqueue's cells in bold.
    report = subprocess.run([sys.executable, str(BENCH / "_report.py"), str(tmp_path / "out"), "--readme"],
                            capture_output=True, text=True, timeout=5 * UNIT, cwd=ROOT, check=True).stdout
    lines = report.strip().splitlines()
    assert lines[0].startswith("| workload @ RTT | naive | flag | poll | rtqueue") and len(lines) == 2 + 8
    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.strip().strip("|").split("|")]

    column = cells(lines[0]).index("rtqueue")
    for line in lines[2:]:
        cell = cells(line)[column]
        assert cell.startswith("**") and ", 0/" in cell, line  # bold, and 0 lost intents


def test_bench_conflicts_guardrails_quick(tmp_path: Path) -> None:
    """bench_conflicts --workloads guardrails --quick: rtqueue's trips each get exactly one answered correction."""
    data = run_bench("bench_conflicts.py", tmp_path, "--workloads", "guardrails")
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
    out = tmp_path / "out"
    assert (out / "bench_conflicts_guardrails_quick.json").exists()
    assert not (out / "bench_conflicts.json").exists() and not (out / "conflicts.png").exists()


def test_bench_reader_quick(tmp_path: Path) -> None:
    """bench_reader --quick: rtqueue's reader and the floor are both measured against real time."""
    data = run_bench("bench_reader.py", tmp_path)
    rows = data["results"]
    assert len(rows) == 3
    for row in rows:
        assert row["x_realtime"] > 0 and row["frames"] > 0 and row["audio_s"] > 0


def test_bench_scale_quick(tmp_path: Path) -> None:
    """bench_scale --quick: sessions stream audio with no visible conflict, no lost intent, all threads ended."""
    data = run_bench("bench_scale.py", tmp_path)
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
    assert client["rtqueue-reader"]["switches_in_per_s"] > 0 and client["rtqueue-writer"]["cpu_pct"] > 0
    assert client["total"]["switches_in_per_s"] >= client["rtqueue-writer"]["switches_in_per_s"]
    assert row["scheduler"]["sim"]["total"]["cpu_pct"] > 0
    machine = row["machine_cpu"]  # /proc/stat over the same window: was someone else busy?
    capacity = 100 * (os.cpu_count() or 1) + 5  # % of one CPU, with room for tick rounding
    assert 0 < machine["busy_pct"] <= capacity and 0 <= machine["idle_pct"] <= capacity
    assert 0 <= machine["steal_pct"] <= capacity and isinstance(machine["unaccounted_pct"], float)


def test_soak_quick(tmp_path: Path) -> None:
    """soak --quick: a reconnecting, fault-injected session loses nothing and leaves no thread behind."""
    row = run_script("soak.py", tmp_path)
    assert row["lost_intents"] == 0, row["lost_detail"]
    assert row["hung_waits"] == 0 and row["unresolved_handles"] == 0
    assert row["reconnects"] >= 1 and row["conflicts"] == 0
    assert row["threads_left_after_close"] <= 1
    assert row["session_tables_at_end"]["items"] > 0
    assert row["history_mb"]["end"] > 0


def test_bench_phone_quick(tmp_path: Path) -> None:
    """bench_phone --quick: Twilio and SIP calls with 0 conflicts, 0 lost intents, barge-ins truncated; no full JSON."""
    data = run_bench("bench_phone.py", tmp_path)
    twilio, sip = data["results"]
    assert twilio["part"] == "twilio" and sip["part"] == "sip"
    assert twilio["conflicts"] == 0 and twilio["lost_intents"] == 0 and twilio["truncate_errors"] == 0
    assert twilio["barge_ins"] == twilio["calls"] and twilio["truncations"] == twilio["calls"]
    assert twilio["barge_p99_ms"] is not None and twilio["trunc_err_p99_ms"] is not None
    assert sip["user_visible_conflicts"] == 0 and sip["lost_intents"] == 0  # server races are retried
    assert sip["attached"] == sip["calls"] == sip["calls_ended"] and sip["gate_samples"] > 0
    assert (tmp_path / "out" / "bench_phone_quick.json").exists()
    assert not (tmp_path / "out" / "bench_phone.json").exists()  # --quick never replaces the published run


def test_bench_scale_peers_quick(tmp_path: Path) -> None:
    """bench_scale --peers --quick: rtqueue and the two official clients run the same workload; no full JSON."""
    data = run_bench("bench_scale.py", tmp_path, "--peers", "all", "--ramp", "6")
    rows = {r["client"]: r for r in data["results"]}
    skipped = data["summary"]["skipped"]
    assert set(rows) | set(skipped) == {"rtqueue", "openai-agents", "openai"}
    for r in rows.values():
        assert "error" not in r, r
        assert r["audio_deltas"] > 0 and r["mic_chunks_sent"] > 0 and r["cpu_s_per_session_min"] > 0, r
    assert rows["rtqueue"]["lost_intents"] == 0 and rows["rtqueue"]["gate_samples"] >= 0
    out = tmp_path / "out"
    assert (out / "bench_scale_peers_quick.json").exists() and not (out / "bench_scale_peers.json").exists()
