"""Command line: run the simulator until Ctrl-C.

``python -m rtqueue.sim --port 8765 [--latency-ms N] [--speed X] [--seed N]
[--trace FILE] [--require-api-key KEY]`` prints the URL and serves until
interrupted. :func:`main` is also what ``python -m rtqueue sim`` calls.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence

from .server import Simulator

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of :func:`main`."""
    p = argparse.ArgumentParser(
        prog="python -m rtqueue.sim",
        description="Run the embedded OpenAI Realtime (GA) simulator on loopback.",
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="TCP port; 0 picks a free one (default: 8765)")
    p.add_argument("--latency-ms", type=float, default=0.0, help="one-way simulated network delay")
    p.add_argument(
        "--speed",
        type=float,
        default=1.0,
        help="pacing relative to real time; 0 means as fast as possible (default: 1.0)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for IDs, the scripted model and faults")
    p.add_argument("--trace", default=None, help="append every frame as JSONL to this file")
    p.add_argument(
        "--require-api-key",
        default=None,
        metavar="KEY",
        help="refuse connections without this key (close code 3000)",
    )
    return p


def main(
    argv: Sequence[str] | None = None, *, ready: threading.Event | None = None, stop: threading.Event | None = None
) -> int:
    """Run until Ctrl-C (or until ``stop`` is set); return the exit status.

    ``ready`` is set once the URL is printed; ``stop`` lets tests end the run.
    """
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    stop = stop or threading.Event()
    # SIGTERM (e.g. from a process manager) stops as cleanly as Ctrl-C, so the
    # trace is flushed. Signal handlers can only be set from the main thread.
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        return _serve(args, ready, stop)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _serve(args: argparse.Namespace, ready: threading.Event | None, stop: threading.Event) -> int:
    try:
        with Simulator(
            args.host,
            args.port,
            latency_ms=args.latency_ms,
            seed=args.seed,
            trace=args.trace,
            speed=args.speed or None,
            require_api_key=args.require_api_key,
        ) as sim:
            print(f"rtqueue simulator listening on {sim.url}", flush=True)
            print(f"OpenAI(websocket_base_url={sim.websocket_base_url!r}); Ctrl-C to stop", flush=True)
            if ready is not None:
                ready.set()
            # Short waits keep Ctrl-C responsive on every platform.
            while not stop.wait(0.5):
                pass
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    except OSError as exc:
        print(f"error: cannot start the simulator: {exc}", file=sys.stderr)
        return 1
    return 0
