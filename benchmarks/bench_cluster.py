"""Calls per worker process, throughput from 1 to 4 Ray workers, webhook-to-attached latency, Ray's cost per call.

    python benchmarks/bench_cluster.py [--quick] [--calls N] [--out DIR] [--json FILE]

One simulator in this process rings ``--calls`` short SIP calls at once
(greeting, "check my order 42" -> a tool call -> the answer, hang-up;
``Simulator(speed=None)``: unpaced, so a run measures CPU, not talk time):

- ``serve``: one ``rtqueue.serve.CallWorker`` in a child process, webhooks
  straight to its loopback ``/webhook`` (what ``rtqueue serve`` runs);
- ``ray-N``: a one-node local Ray cluster (dashboard off, usage stats off,
  128 MB object store) with N worker actors behind the Serve ingress
  (``rtqueue.ray_serve.deploy``), N = 1, 2, 4.

Figures per row: calls completed per second (all calls placed -> all ended)
and its ratio to one Ray worker; worker-side attach latency (call taken ->
session attached, p50/p99) and, for Ray, the ingress's webhook handling time
(verify + placement + the worker's ``take``); CPU seconds per call and RSS of
*every process this benchmark started* (the worker child, or Ray's GCS,
raylet, Serve controller and proxy, router replica and workers), read from
``/proc``: the difference between the rows is what Ray adds. ``--quick``
writes ``bench_cluster_quick.json`` and never overwrites the full results.
"""

from __future__ import annotations

import base64
import multiprocessing as mp
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import _common as C

import rtqueue
from rtqueue.sim.phone import CallerScript, hangup, say, wait_for_agent

SECRET = "whsec_" + base64.b64encode(b"rtqueue-bench-cluster-secret-32b").decode()
API_KEY = "sk-bench-cluster-0123456789"
SCRIPT = CallerScript([wait_for_agent(), say("Please check my order 42"), wait_for_agent(), hangup()])
APP = "tests.cluster_app:make_agents"


# -- /proc accounting of our descendants ------------------------------------------------------------


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(d))
        except (OSError, IndexError, ValueError):
            continue
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        for c in children.get(pid, []):
            out.append(c)
            todo.append(c)
    return out


def _cpu_rss(pids: list[int]) -> tuple[float, float]:
    """CPU seconds (user+sys) and RSS MB summed over ``pids``."""
    tick, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
    cpu = rss = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            cpu += (int(fields[11]) + int(fields[12])) / tick
            rss += int(fields[21]) * page / 1e6
        except (OSError, IndexError, ValueError):
            continue
    return cpu, rss


def _placed(sim: rtqueue.Simulator, url: str, calls: int) -> float:
    """Ring ``calls`` calls at ``url``; seconds until every one ended (by the caller)."""
    t0 = time.monotonic()
    ids = [sim.place_call(url, secret=SECRET, caller=SCRIPT) for _ in range(calls)]
    ok = sim.wait_until(lambda s: all(s.call(c).status == "ended" for c in ids), timeout=300)
    elapsed = time.monotonic() - t0
    bad = [sim.call(c).ended_by for c in ids if sim.call(c).ended_by != "caller"]
    if not ok or bad:
        raise RuntimeError(f"calls did not all complete: {bad[:5]}")
    return elapsed


# -- rtqueue serve alone -----------------------------------------------------------------------------------


def _serve_child(conn: Any, realtime_url: str, control_url: str, capacity: int) -> None:
    sys.path.insert(0, str(C.ROOT))
    from rtqueue.serve import CallWorker, load_app

    worker = CallWorker(load_app(APP), realtime_url=realtime_url, control_base_url=control_url, api_key=API_KEY,
                        webhook_secret=SECRET, capacity=capacity, name="serve")
    conn.send(worker.serve_http().webhook_url)
    conn.recv()  # "stop"
    worker.drain(60)
    stats = worker.stats()
    worker.close()
    conn.send(stats)


def run_serve(sim: rtqueue.Simulator, calls: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve_child, args=(child, sim.url, sim.http_base_url, calls + 8), name="bench-serve")
    proc.start()
    try:
        url = parent.recv()
        _placed(sim, url, min(4, calls))  # warm-up, as for Ray: imports, first connections
        pids = _descendants(os.getpid())
        cpu0, _ = _cpu_rss(pids)
        elapsed = _placed(sim, url, calls)
        cpu1, rss = _cpu_rss(pids)
        parent.send("stop")
        stats = parent.recv()
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    return _row("serve", 1, calls, elapsed, cpu1 - cpu0, rss, stats["attach_ms"][min(4, calls):], [],
                stats["intents"])


# -- Ray ---------------------------------------------------------------------------------------------------


def run_ray(sim: rtqueue.Simulator, calls: int, workers: int) -> dict[str, Any]:
    import ray

    from rtqueue import ray_serve

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every Ray address on 127.0.0.1
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(C.ROOT), os.environ.get("PYTHONPATH")]))
    ray.init(num_cpus=2, object_store_memory=128 * 1024 * 1024, include_dashboard=False, namespace="rtqueue",
             logging_level="ERROR", log_to_driver=False)
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dep = ray_serve.deploy(APP, webhook_secret=SECRET, realtime_url=sim.url, control_base_url=sim.http_base_url,
                               api_key=API_KEY, workers_per_node=workers, capacity=calls + 8, http_port=port)
        try:
            _placed(sim, dep["webhook_url"], min(4, calls))  # warm-up: imports, first connections
            pids = _descendants(os.getpid())
            cpu0, _ = _cpu_rss(pids)
            elapsed = _placed(sim, dep["webhook_url"], calls)
            cpu1, rss = _cpu_rss(pids)
            stats = [ray.get(w.stats.remote()) for w in dep["workers"].values()]
            router = dep["router"].stats.remote().result(timeout_s=30)
        finally:
            ray_serve.shutdown(dep)
    finally:
        ray.shutdown()
    attach = [ms for st in stats for ms in st["attach_ms"]][min(4, calls):] if workers == 1 else \
        [ms for st in stats for ms in st["attach_ms"]]
    intents: dict[str, int] = {}
    for st in stats:
        for k, v in st["intents"].items():
            intents[k] = intents.get(k, 0) + v
    per_worker = [st["done"] for st in stats]
    row = _row(f"ray-{workers}", workers, calls, elapsed, cpu1 - cpu0, rss, attach,
               router["webhook_ms"][min(4, calls):], intents)
    row["calls_per_worker"] = per_worker
    return row


def _row(mode: str, workers: int, calls: int, elapsed: float, cpu: float, rss: float, attach: list[float],
         webhook: list[float], intents: dict[str, int]) -> dict[str, Any]:
    a, w = C.latency_summary(attach), C.latency_summary(webhook)
    return {"mode": mode, "workers": workers, "calls": calls, "seconds": round(elapsed, 2),
            "calls_per_s": round(calls / elapsed, 2), "cpu_s_per_call": round(cpu / calls, 4),
            "rss_mb_total": round(rss, 1), "attach_p50_ms": a["p50"], "attach_p99_ms": a["p99"],
            "webhook_p50_ms": w["p50"], "webhook_p99_ms": w["p99"], "intents": intents}


def main() -> int:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=None)
    ns = p.parse_args()
    calls = ns.calls or (8 if ns.quick else 40)
    ladder = [1, 2] if ns.quick else [1, 2, 4]
    rows = []
    with rtqueue.Simulator(speed=None, seed=7, ping_interval=None, record=False) as sim:
        C.progress(f"serve alone, {calls} calls")
        rows.append(run_serve(sim, calls))
        for n in ladder:
            C.progress(f"ray, {n} worker(s), {calls} calls")
            rows.append(run_ray(sim, calls, n))
        conflicts = sim.stats()["conflicts"]
    base = next(r for r in rows if r["mode"] == "ray-1")["calls_per_s"]
    for r in rows:
        r["ratio_to_one_ray_worker"] = round(r["calls_per_s"] / base, 2) if base else None
    serve_row = rows[0]
    for r in rows[1:]:
        r["ray_extra_cpu_s_per_call"] = round(r["cpu_s_per_call"] - serve_row["cpu_s_per_call"], 4)
        r["ray_extra_rss_mb"] = round(r["rss_mb_total"] - serve_row["rss_mb_total"], 1)
    print(C.table(rows, [("mode", "mode"), ("calls_per_s", "calls/s"), ("ratio_to_one_ray_worker", "x1"),
                         ("cpu_s_per_call", "CPU s/call"), ("rss_mb_total", "RSS MB"),
                         ("attach_p50_ms", "attach p50"), ("attach_p99_ms", "attach p99"),
                         ("webhook_p50_ms", "webhook p50"), ("webhook_p99_ms", "webhook p99")]))
    doc = {"benchmark": "bench_cluster", "quick": ns.quick, "machine": C.machine(), "calls": calls,
           "conflicts": conflicts, "rows": rows}
    out = Path(ns.out)
    written = C.write_json(doc, out / ("bench_cluster_quick.json" if ns.quick else "bench_cluster.json"), ns.json)
    print("wrote", ", ".join(written))
    return 0 if conflicts == 0 and all(r["intents"].get("lost", 0) == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
