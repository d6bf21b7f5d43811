"""The ``rtqueue`` command: ``demo``, ``sim``, ``serve``, ``timeline`` and ``bench``."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .sim.cli import non_negative_number

__all__ = ["main"]


def main(argv: Sequence[str] | None = None, *, prog: str = "rtqueue") -> int:
    """Entry point of the ``rtqueue`` console script and ``python -m rtqueue``.

    ``prog`` is the command name in usage lines (``python -m rtqueue`` when
    run as a module), also for ``sim``'s.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["sim"]:
        # The simulator has its own options (and --help): hand them over whole.
        from .sim.cli import main as sim_main

        return sim_main(args[1:], prog=f"{prog} sim")
    parser = argparse.ArgumentParser(prog=prog, description="Conflict-free Realtime voice agents.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run a multi-agent voice conversation (simulator unless --live)")
    demo.add_argument("--live", action="store_true", help="talk to OpenAI (needs $OPENAI_API_KEY)")
    demo.add_argument("--phone", action="store_true",
                      help="a phone call instead: the support desk answers an OpenAI SIP call from a scripted "
                           "caller (simulator; with --live it waits for a real call, see rtqueue.demo_phone)")
    demo.add_argument("--audio", action="store_true", help="play the voices through the speaker")
    demo.add_argument("--scenario", choices=["customer_service", "basic"], default="customer_service")
    demo.add_argument("--model", default="gpt-realtime")
    demo.add_argument("--speed", type=non_negative_number, default=None,
                      help="simulator pacing vs real time (default: 4, or 1 with --audio)")
    demo.add_argument("--latency-ms", type=non_negative_number, default=20.0,
                      help="simulated one-way network latency")
    demo.add_argument("--json", metavar="FILE", help="also write the transcript and summary as JSON")
    demo.add_argument("--record", metavar="DIR", help="write the session's recording (demo.jsonl) and its timeline "
                                                      "(demo.html) into DIR")

    sub.add_parser("sim", help="run the Realtime simulator standalone (see `rtqueue sim --help`)")

    srv = sub.add_parser("serve", help="host SIP calls: a call worker with capacity, health and drain "
                                       "(see rtqueue.serve)")
    srv.add_argument("app", help="the agents factory, module:function (gets a CallInfo, returns an Agent or "
                                 "CallApp)")
    srv.add_argument("--port", type=int, default=8080, help="loopback HTTP port for /webhook, /healthz, /load")
    srv.add_argument("--capacity", type=int, default=50, help="calls hosted at once (more: rejected 486)")
    srv.add_argument("--name", default="worker", help="the worker's name (threads, checkpoints, figures)")
    srv.add_argument("--realtime-url", default=None, help="Realtime WebSocket URL (default OpenAI's)")
    srv.add_argument("--control-base-url", default=None, help="call-control REST base (default OpenAI's)")
    srv.add_argument("--secret-env", default="OPENAI_WEBHOOK_SECRET",
                     help="environment variable holding the webhook secret (whsec_...)")

    timeline = sub.add_parser("timeline", help="draw a recording as a self-contained HTML timeline")
    timeline.add_argument("recording", help="a recording (JSONL) from Session.connect(record=...) or sim --trace")
    timeline.add_argument("-o", "--output", default=None, help="the HTML file (default: RECORDING with .html)")

    bench = sub.add_parser("bench", help="run every benchmark in benchmarks/")
    bench.add_argument("--quick", action="store_true")
    bench.add_argument("--out", default="benchmarks/results", help="folder for JSON and PNG results")

    ns = parser.parse_args(args)
    if ns.command == "demo" and ns.phone:
        from .demo_phone import phone_demo

        return phone_demo(live=ns.live, speed=ns.speed, json_path=ns.json)
    if ns.command == "demo":
        from .demo import run_demo

        return run_demo(
            live=ns.live, audio=ns.audio, scenario=ns.scenario, model=ns.model,
            speed=ns.speed, latency_ms=ns.latency_ms, json_path=ns.json, record_dir=ns.record,
        )
    if ns.command == "timeline":
        return _timeline(ns.recording, ns.output)
    if ns.command == "serve":
        return _serve(ns)
    if ns.command == "bench":
        return _bench(quick=ns.quick, out=ns.out)
    return 2  # pragma: no cover


def _serve(ns: argparse.Namespace) -> int:
    """Run a call worker until SIGTERM/SIGINT, then drain (finish the calls it has) and exit."""
    import gc
    import signal
    import threading

    from .errors import RtqueueError
    from .serve import CallWorker, load_app

    secret = os.environ.get(ns.secret_env)
    if not secret:
        print(f"rtqueue serve: set ${ns.secret_env} to the webhook secret (whsec_...)", file=sys.stderr)
        return 2
    try:
        worker = CallWorker(load_app(ns.app), realtime_url=ns.realtime_url, control_base_url=ns.control_base_url,
                            webhook_secret=secret, capacity=ns.capacity, name=ns.name)
    except RtqueueError as exc:
        print(f"rtqueue serve: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        http = worker.serve_http(port=ns.port)
        # Everything alive now (modules, the app's agents, the worker) lives as long as the process:
        # out of the collector's reach, it no longer lengthens the full collections that stop every
        # call's threads (bench_phone: a full collection at 500 calls stopped them for ~170 ms).
        gc.collect()
        gc.freeze()
        print(f"rtqueue serve: {ns.name} ({ns.capacity} calls) webhook {http.webhook_url}, health {http.url}/healthz",
              flush=True)
        stop.wait()
        print("rtqueue serve: draining", flush=True)
        worker.drain()
    finally:
        worker.close()
    print(json.dumps(worker.load().to_dict()))
    return 0


def _timeline(recording: str, output: str | None) -> int:
    try:
        from .timeline import write_timeline
    except ImportError:  # pragma: no cover - plotly is the [timeline] extra
        print("rtqueue timeline needs plotly: pip install 'rtqueue[timeline]'", file=sys.stderr)
        return 1
    out = output or str(Path(recording).with_suffix(".html"))
    try:
        n = write_timeline(recording, out)
    except (OSError, ValueError) as exc:
        print(f"rtqueue timeline: {exc}", file=sys.stderr)
        return 1
    print(f"{out}: {n} responses")
    return 0


def _bench(*, quick: bool, out: str) -> int:
    root = Path(__file__).resolve().parent.parent / "benchmarks"
    scripts = sorted(root.glob("bench_*.py"))
    if not scripts:
        print("rtqueue bench: no benchmarks/ folder next to the package (run from a source checkout)")
        return 2
    Path(out).mkdir(parents=True, exist_ok=True)
    failed = 0
    summary: list[dict[str, Any]] = []
    for script in scripts:
        cmd = [sys.executable, str(script), "--out", out] + (["--quick"] if quick else [])
        print(f"\n=== {script.name} ===", flush=True)
        t0 = time.monotonic()
        rc = subprocess.call(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        summary.append({"script": script.name, "rc": rc, "seconds": round(time.monotonic() - t0, 1)})
        failed += rc != 0
    print("\n" + json.dumps(summary, indent=2))
    return 1 if failed else 0
