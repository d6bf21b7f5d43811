"""Child process of :class:`_common.SimProcess`: one Simulator, commands as JSON lines on stdin.

``python benchmarks/_simproc.py '{"latency_ms": 20, "speed": 30, "seed": 1}'``
prints ``{"url": ..., "pid": ...}``, then answers each line:
``{"op": "stats"}``, ``{"op": "tally", "session": 0}``,
``{"op": "quiet", "wait": seconds}`` (no active response), ``{"op": "quit"}``.
It ends when stdin closes, so it never outlives its parent.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from _common import tally

from rtqueue.sim import Simulator


def _active(stats: dict[str, Any]) -> int:
    done = stats["completed"] + stats["cancelled"] + stats["incomplete"] + stats.get("failed", 0)
    return stats["responses"] - done


def main() -> int:
    kwargs = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    if kwargs.get("host", "127.0.0.1") != "127.0.0.1":
        print("only 127.0.0.1", file=sys.stderr)
        return 2
    with Simulator(**kwargs) as sim:
        print(json.dumps({"url": sim.url, "pid": os.getpid()}), flush=True)
        for line in sys.stdin:
            try:
                cmd = json.loads(line)
            except ValueError:
                continue
            op = cmd.get("op")
            if op == "quit":
                break
            if op == "stats":
                out: dict[str, Any] = sim.stats()
            elif op == "tally":
                session = cmd.get("session")
                out = tally(sim.client_events(session), sim.server_events(session))
            elif op == "quiet":
                ok = sim.wait_until(lambda s: _active(s.stats()) <= 0, timeout=float(cmd.get("wait", 5.0)))
                out = {"quiet": ok}
            else:
                out = {"error": f"unknown op {op!r}"}
            print(json.dumps(out, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
