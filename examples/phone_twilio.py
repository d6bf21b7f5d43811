"""The same support desk over a Twilio Media Streams bridge, with a fake Twilio as the caller.

A ``rtqueue.twilio.TwilioBridge`` serves the Media Streams WebSocket and joins
the call to a session in ``audio/pcmu`` both ways (Twilio's mu-law passes
through untouched, and every agent's ``session.update`` keeps the format).
``rtqueue.testing_twilio.FakeTwilio`` plays the caller: it streams mu-law in
real time, plays the agent's audio on a playout clock, echoes marks once the
audio before them was played, honours ``clear`` and records what it heard.

The caller asks about an order, presses 2 (billing), asks about an invoice,
cuts a long answer off after hearing 1.5 s of it, and asks for a human. On the
barge-in the bridge writes ``clear`` first, then the session cancels and
truncates the item at what Twilio said was played: the JSON line's
``max_truncate_error_ms`` compares that position with what the fake caller
really heard (within one 20 ms frame).

    python examples/phone_twilio.py              # real time (~40 s)
    python examples/phone_twilio.py --speed 2    # twice as fast

Everything runs on 127.0.0.1 (the simulator, the bridge, the fake Twilio).
The code lives in ``rtqueue/demo_phone.py``.
"""

from __future__ import annotations

import argparse
import sys

from rtqueue.demo_phone import run_twilio_desk
from rtqueue.errors import RtqueueError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A support desk over a Twilio Media Streams bridge (simulator).")
    parser.add_argument("--speed", type=float, default=1.0, help="pace of the simulator and the fake line")
    parser.add_argument("--barge-after-ms", type=float, default=1500.0,
                        help="audio of the long answer the caller hears before cutting it off")
    args = parser.parse_args(argv)
    if args.speed <= 0 or args.barge_after_ms <= 0:
        parser.error("--speed and --barge-after-ms must be positive")
    try:
        summary = run_twilio_desk(speed=args.speed, barge_after_ms=args.barge_after_ms)
    except RtqueueError as exc:
        print(f"phone_twilio: {exc}", file=sys.stderr)
        return 2
    ok = summary["conflicts"] == 0 and summary["lost_intents"] == 0 and summary["truncate_errors"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
