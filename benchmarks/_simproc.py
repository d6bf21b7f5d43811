"""Child process of :class:`_common.SimProcess`: one Simulator, commands as JSON lines on stdin.

``python benchmarks/_simproc.py '{"latency_ms": 20, "speed": 30, "seed": 1}'``
prints ``{"url": ..., "pid": ...}``, then answers each line:
``{"op": "stats"}``, ``{"op": "tally", "session": 0}``,
``{"op": "quiet", "wait": seconds}`` (no active response),
``{"op": "audio_late", "reset": bool}`` (how late audio deltas left, ms), ``{"op": "quit"}``;
phone calls (bench_phone): ``{"op": "phone"}`` (the REST base URL),
``{"op": "place_calls", "url": webhook, "secret": whsec, "n": N, "script": [[step, arg], ...]}``
(N calls, each with that caller script: ``say``/``interrupt`` text, ``pause``
seconds, ``wait``, ``hangup``), ``{"op": "calls"}`` (how many calls are in
each status, how they ended, agent lines cut off).
It ends when stdin closes, so it never outlives its parent.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from typing import Any

from _common import tally

from rtqueue.sim import Simulator


def _active(stats: dict[str, Any]) -> int:
    done = stats["completed"] + stats["cancelled"] + stats["incomplete"] + stats.get("failed", 0)
    return stats["responses"] - done


def _script(steps: list[list[Any]]) -> Any:
    """A CallerScript from ``[[step, arg], ...]`` (JSON-friendly)."""
    from rtqueue.sim.phone import CallerScript, hangup, interrupt, pause, say, wait_for_agent

    made: list[Any] = []
    for name, *arg in steps:
        if name == "say":
            made.append(say(arg[0]))
        elif name == "interrupt":
            made.append(interrupt(arg[0], timeout_s=120.0))
        elif name == "pause":
            made.append(pause(float(arg[0])))
        elif name == "wait":
            made.append(wait_for_agent(timeout_s=float(arg[0]) if arg else 120.0))
        elif name == "hangup":
            made.append(hangup())
        else:
            raise ValueError(f"unknown caller step {name!r}")
    return CallerScript(made)


def _calls(sim: Any) -> dict[str, Any]:
    """Calls by status and by how they ended; agent answers cut off by the caller."""
    status: Counter[str] = Counter()
    ended: Counter[str] = Counter()
    cut = done = 0
    for rec in sim.calls():
        status[rec.status] += 1
        if rec.ended_by:
            ended[rec.ended_by] += 1
        cut += sum(1 for line in rec.transcript if line.speaker == "agent" and line.interrupted)
        done += rec.script_done
    return {"status": dict(status), "ended_by": dict(ended), "agent_lines_cut": cut, "scripts_done": done}


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
            elif op == "audio_late":
                out = sim.audio_lateness(reset=bool(cmd.get("reset")))
            elif op == "tally":
                session = cmd.get("session")
                out = tally(sim.client_events(session), sim.server_events(session))
            elif op == "phone":
                out = {"http_base_url": sim.http_base_url}
            elif op == "place_calls":
                script = _script(cmd["script"])
                ids = [sim.place_call(cmd["url"], secret=cmd["secret"], caller=script) for _ in range(int(cmd["n"]))]
                out = {"call_ids": ids}
            elif op == "calls":
                out = _calls(sim)
            elif op == "quiet":
                ok = sim.wait_until(lambda s: _active(s.stats()) <= 0, timeout=float(cmd.get("wait", 5.0)))
                out = {"quiet": ok}
            else:
                out = {"error": f"unknown op {op!r}"}
            print(json.dumps(out, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
