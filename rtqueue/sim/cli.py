"""Command line: run the simulator until Ctrl-C.

``rtqueue sim --port 8765 [--latency-ms N] [--speed X] [--seed N]
[--trace FILE] [--replay FILE] [--require-api-key KEY]`` (or ``python -m rtqueue sim``, or
``python -m rtqueue.sim``) prints the URL and serves until interrupted.
Invalid options are reported by argparse (usage and exit status 2), never as
a traceback.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import threading
from collections.abc import Sequence

from ..errors import InvalidArgument
from .server import Simulator

__all__ = ["build_parser", "main", "non_negative_number"]

#: The program name in usage lines when none is given (the console script's).
DEFAULT_PROG = "rtqueue sim"


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be within 0..65535, got {port}")
    return port


def non_negative_number(text: str) -> float:
    """An argparse ``type``: a finite number >= 0 (anything else is a usage error)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _non_empty(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def build_parser(prog: str = DEFAULT_PROG) -> argparse.ArgumentParser:
    """The argument parser of :func:`main`; ``prog`` names the command in usage lines."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Run the embedded OpenAI Realtime (GA) simulator on loopback.",
    )
    p.add_argument("--host", type=_non_empty, default="127.0.0.1", help="interface to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8765, help="TCP port; 0 picks a free one (default: 8765)")
    p.add_argument("--latency-ms", type=non_negative_number, default=0.0, help="one-way simulated network delay")
    p.add_argument(
        "--speed",
        type=non_negative_number,
        default=1.0,
        help="pacing relative to real time; 0 means as fast as possible (default: 1.0)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for IDs, the scripted model and faults")
    p.add_argument("--trace", type=_non_empty, default=None, help="append every frame as JSONL to this file")
    p.add_argument(
        "--replay",
        type=_non_empty,
        default=None,
        metavar="FILE",
        help="serve this recording's server side instead of the scripted model",
    )
    p.add_argument(
        "--require-api-key",
        type=_non_empty,
        default=None,
        metavar="KEY",
        help="refuse connections without this key (close code 3000)",
    )
    return p


def main(
    argv: Sequence[str] | None = None,
    *,
    ready: threading.Event | None = None,
    stop: threading.Event | None = None,
    prog: str = DEFAULT_PROG,
) -> int:
    """Run until Ctrl-C (or until ``stop`` is set); return the exit status.

    ``ready`` is set once the URL is printed; ``stop`` lets tests end the run.
    ``prog`` is the command name shown in usage and errors. Invalid options
    exit with status 2 (``SystemExit``, argparse's convention) and a usage line.
    """
    parser = build_parser(prog)
    args = parser.parse_args(list(argv) if argv is not None else None)
    stop = stop or threading.Event()
    # SIGTERM (e.g. from a process manager) stops as cleanly as Ctrl-C, so the
    # trace is flushed. Signal handlers can only be set from the main thread.
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        return _serve(parser, args, ready, stop)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _serve(
    parser: argparse.ArgumentParser, args: argparse.Namespace, ready: threading.Event | None, stop: threading.Event
) -> int:
    try:
        sim = Simulator(
            args.host,
            args.port,
            latency_ms=args.latency_ms,
            seed=args.seed,
            trace=args.trace,
            speed=args.speed or None,
            require_api_key=args.require_api_key,
            replay=args.replay,
        )
    except InvalidArgument as exc:  # the option types above should catch everything first
        parser.error(str(exc))
    try:
        with sim:
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
