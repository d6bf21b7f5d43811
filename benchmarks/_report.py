"""Print the Markdown tables of a results folder (for benchmarks/RESULTS.md and the README).

    python benchmarks/_report.py [benchmarks/results]            # every table
    python benchmarks/_report.py [benchmarks/results] --readme   # the README's conflicts matrix
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import _common as C


def _load(folder: Path, name: str) -> dict[str, Any] | None:
    path = folder / f"bench_{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _loadavg(m: dict[str, Any]) -> Any:
    return m.get("loadavg_1_5_15min", m.get("loadavg_at_start"))


def _targets(doc: dict[str, Any]) -> str:
    return "\n".join(f"- {'PASS' if t['pass'] else 'FAIL'}: {t['target']} ({t['detail']})" for t in doc["targets"])


def report(folder: Path) -> str:
    parts: list[str] = []
    conf = _load(folder, "conflicts")
    if conf is not None:
        m = conf["machine"]
        parts.append(f"### Conflicts, lost intents, errors, gate latency, CPU\n\n`{conf['command']}` on {m['date']}, "
                     f"{m['cpus']} CPUs, Python {m['python']}, load average (1/5/15 min) when it ended {_loadavg(m)}; "
                     f"simulator speed {conf['speed']}x, seed {conf['seed']}, {conf['seconds']} s.\n")
        for rtt in sorted({r["latency_ms"] for r in conf["results"]}):
            rows = [r for r in conf["results"] if r["latency_ms"] == rtt]
            for r in rows:
                r["lost_of"] = f"{r.get('lost_intents')}/{r.get('intents')}"
            parts.append(f"**RTT {rtt:g} ms**\n")
            parts.append(C.table(rows, [
                ("workload", "workload"), ("strategy", "strategy"), ("creates", "creates"),
                ("conflicts_per_1000", "conflicts /1000 creates"), ("user_visible_conflicts", "visible conflicts"),
                ("lost_of", "lost intents"), ("duplicates", "dups"), ("cancel_not_active", "cancel_not_active"),
                ("truncate_errors", "truncate errors"), ("gate_p50_ms", "gate p50 ms"),
                ("gate_p99_ms", "gate p99 ms"), ("gate_max_ms", "gate max ms"),
                ("cpu_ms_per_response", "CPU ms/response"), ("drained", "drained"),
            ], nd=2) + "\n")
        parts.append(_targets(conf) + "\n")
        if conf.get("skipped"):
            parts.append("\n".join(f"- skipped {k}: {v}" for k, v in conf["skipped"].items()) + "\n")
    reader = _load(folder, "reader")
    if reader is not None:
        m = reader["machine"]
        parts.append(f"### Reader throughput\n\n`{reader['command']}` on {m['date']}, pinned to one CPU, "
                     f"load average (1/5/15 min) when it ended {_loadavg(m)}.\n")
        parts.append(C.table(reader["results"], [
            ("variant", "path"), ("frames", "frames"), ("audio_s", "audio s"), ("wall_ms", "wall ms"),
            ("us_per_frame", "us/frame"), ("x_realtime", "x real time (wall)"),
            ("x_realtime_cpu", "x real time (thread CPU)"),
        ], nd=1) + "\n")
        parts.append(_targets(reader) + "\n")
    for path in sorted(folder.glob("bench_scale*.json")):
        scale = json.loads(path.read_text())
        m = scale["machine"]
        parts.append(f"### Scale ({path.name})\n\n`{scale['command']}` on {m['date']}, load average (1/5/15 min) "
                     f"when it ended {_loadavg(m)}.\n")
        parts.append(C.table(scale["results"], [
            ("sessions", "sessions"), ("seconds", "steady s"), ("mic_audio_s_per_session", "mic audio s/session"),
            ("server_responses", "responses"), ("app_creates", "app creates"), ("conflicts", "server conflicts"),
            ("user_visible_conflicts", "visible"), ("lost_intents", "lost"), ("gate_p50_ms", "gate p50 ms"),
            ("gate_p99_ms", "gate p99 ms"), ("gate_max_ms", "gate max ms"), ("mb_per_session", "MB/session"),
            ("rss_growth_mb_per_min", "RSS growth MB/min"), ("capped_growth_mb_per_min", "of which capped stores"),
            ("other_growth_mb_per_min", "other"), ("threads_per_session", "threads/session"),
            ("client_cpu_pct", "client CPU %"), ("sim_cpu_pct", "simulator CPU %"),
        ], nd=2) + "\n")
        stores = scale["results"][0].get("capped_stores")
        if stores:
            rows = [{"store": k, **v} for k, v in stores.items()]
            parts.append("Capped per-session stores at the end of the run (growth fitted over the second half):\n")
            parts.append(C.table(rows, [
                ("store", "store"), ("entries_per_session", "entries/session"), ("cap_per_session", "cap"),
                ("bytes_per_entry", "bytes/entry"), ("growth_mb_per_min", "growth MB/min"),
                ("plateau_mb", "all sessions full, MB"),
            ], nd=3) + "\n")
        sched = C.scheduler_table(scale["results"][0].get("scheduler"))
        if sched is not None:
            parts.append("Scheduler pressure over the steady phase (Linux schedstat; run-queue wait: ready to run, "
                         "no CPU free):\n")
            parts.append(sched + "\n")
        mach = scale["results"][0].get("machine_cpu")
        if mach:
            parts.append(f"The machine over the same window (/proc/stat, % of one CPU): {C.machine_cpu_text(mach)}.\n")
        parts.append(_targets(scale) + "\n")
    return "\n".join(parts)


_ORDER = ("naive", "flag", "poll", "rtqueue", "openai-agents")
_WORKLOADS = {"handoff": "handoff storm", "tools": "tool chains", "bargein": "barge-in", "app_vs_vad": "app vs VAD"}


def _cell(r: dict[str, Any]) -> str:
    text = f"{r['conflicts_per_1000']:.0f}, {r['lost_intents']}/{r['intents']}"
    extra = []
    if r.get("retried_conflicts"):
        extra.append(f"{r['retried_conflicts']} races retried")
    if r.get("duplicates"):
        extra.append(f"{r['duplicates']} dups")
    if r.get("cancel_not_active"):
        extra.append(f"{r['cancel_not_active']} cancel_not_active")
    if r.get("truncate_errors"):
        extra.append(f"{r['truncate_errors']} truncate errors")
    if extra:
        text += f" ({', '.join(extra)})"
    return f"**{text}**" if r["strategy"] == "rtqueue" else text


def readme_table(conf: dict[str, Any]) -> str:
    """One row per workload x RTT, one column per strategy: "conflicts per 1000 creates, lost/intents (extras)"."""
    present = [s for s in _ORDER if any(r["strategy"] == s for r in conf["results"])]
    head = "| workload @ RTT | " + " | ".join(present) + " |"
    lines = [head, "|" + "---|" * (len(present) + 1)]
    keys = sorted({(r["latency_ms"], r["workload"]) for r in conf["results"]},
                  key=lambda k: (k[0], list(_WORKLOADS).index(k[1]) if k[1] in _WORKLOADS else 99))
    for rtt, wl in keys:
        cells = []
        for strategy in present:
            match = [r for r in conf["results"]
                     if (r["latency_ms"], r["workload"], r["strategy"]) == (rtt, wl, strategy)]
            cells.append(_cell(match[0]) if match else "-")
        lines.append(f"| {_WORKLOADS.get(wl, wl)} @ {rtt:g} ms | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--readme"]
    folder = Path(args[0] if args else C.HERE / "results")
    if "--readme" in sys.argv[1:]:
        doc = _load(folder, "conflicts")
        print(readme_table(doc) if doc is not None else "no bench_conflicts.json in " + str(folder))
    else:
        print(report(folder))
