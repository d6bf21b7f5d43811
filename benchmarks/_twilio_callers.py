"""Child process of bench_phone.py: N fake Twilio callers (``rtqueue.testing_twilio``) in one process.

``python benchmarks/_twilio_callers.py '{"url": "ws://127.0.0.1:PORT/media", "calls": 200, ...}'``

Opens every call (``ramp_s`` apart in total), prints ``{"connected": N}``,
then each call, at its own offset within ``spread_s``, speaks one utterance,
listens to the answer until it heard ``barge_after_ms`` of it and talks over it
(a barge-in). When every call is through, all hang up and one JSON line with
each call's clears (item, what had been heard of it, when) is printed. Lines
carry mu-law silence between utterances, as real ones do. Only 127.0.0.1.
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time
from typing import Any

import _common  # noqa: F401 - puts the checkout on sys.path

from rtqueue.formats import PCM16, PCMU, convert
from rtqueue.sim.synth import synthesize
from rtqueue.testing_twilio import FakeCall, FakeTwilio


class Through:
    """Counts calls that are through their barge-in; wait() blocks until all are (or a timeout)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.count = 0
        self._cond = threading.Condition()

    def arrive(self) -> None:
        with self._cond:
            self.count += 1
            self._cond.notify_all()

    def wait(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.count >= self.n, timeout)


def run_call(caller: FakeCall, start: float, cfg: dict[str, Any], speech: bytes, barge: bytes,
             through: Through, hang: threading.Event) -> dict[str, Any]:
    out: dict[str, Any] = {"call_sid": caller.call_sid, "failed": None}
    try:
        delay = start - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # the call's own moment to speak (not a synchronisation)
        caller.say(speech, wait=True, timeout=60.0)
        heard0 = caller.heard_ms()
        if not caller.wait_until(lambda c: c.heard_ms() - heard0 >= cfg["barge_after_ms"], 60.0):
            out["failed"] = "no answer heard"
        else:
            caller.say(barge, wait=False)
            if not caller.wait_until(lambda c: len(c.clears) >= 1, 30.0):
                out["failed"] = "no clear"
            caller.wait_until(lambda c: c.speech_sent == c.speech_queued, 30.0)
    except Exception as exc:  # a broken call is a result, not a crash of the benchmark
        out["failed"] = f"{type(exc).__name__}: {exc}"
    finally:
        through.arrive()
    hang.wait(cfg["timeout_s"])
    out["clears"] = [{"item_id": c.item_id, "item_heard_ms": c.item_heard_ms, "at": c.at} for c in caller.clears]
    out["heard_ms"] = caller.heard_ms()
    out["errors"] = list(caller.errors)[:5]
    out["frames_sent"] = caller.frames_sent
    return out


def main() -> int:
    cfg = json.loads(sys.argv[1])
    if not cfg["url"].startswith("ws://127.0.0.1:"):
        print("only 127.0.0.1", file=sys.stderr)
        return 2
    cfg.setdefault("barge_after_ms", 1500.0)
    cfg.setdefault("timeout_s", 240.0)
    n = int(cfg["calls"])
    rng = random.Random(f"{cfg.get('seed', 1)}|callers")
    speech = convert(synthesize("Hello, I would like to check on my order please.").pcm, PCM16, PCMU)
    barge = convert(synthesize("Sorry, stop, stop.").pcm, PCM16, PCMU)
    twilio = FakeTwilio(cfg["url"], speed=1.0)
    calls: list[FakeCall] = []
    gap = float(cfg.get("ramp_s", 5.0)) / max(1, n)
    for i in range(n):
        calls.append(twilio.call(parameters={"n": str(i)}, connect_timeout=60.0))
        time.sleep(gap)  # Twilio's calls arrive over time, not in one burst
    print(json.dumps({"connected": len(calls)}), flush=True)
    t0 = time.monotonic()
    through = Through(n)
    hang = threading.Event()
    results: list[dict[str, Any]] = [{} for _ in calls]
    threads = []
    for i, caller in enumerate(calls):
        start = t0 + rng.uniform(0.0, float(cfg.get("spread_s", 5.0)))

        def work(i: int = i, caller: FakeCall = caller, start: float = start) -> None:
            results[i] = run_call(caller, start, cfg, speech, barge, through, hang)

        t = threading.Thread(target=work, name=f"bench-caller-{i}", daemon=True)
        t.start()
        threads.append(t)
    # Every call is through its barge-in: hang them all up together (so all N stay live until here).
    through.wait(cfg["timeout_s"])
    hang.set()
    for t in threads:
        t.join(30.0)
    print(json.dumps({"through_s": round(time.monotonic() - t0, 2), "calls": results}), flush=True)
    for caller in calls:
        caller.hangup()
    twilio.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
