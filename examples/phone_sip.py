"""A support desk answering an OpenAI SIP phone call, on the embedded simulator.

The simulator's phone network rings this app's webhook (a loopback HTTP
server; each delivery is checked with ``rtqueue.sip.verify_webhook``); the app
accepts with ``CallControl.accept`` and steers the call with
``Session.connect(call_id=..., agent=...)``. The desk: a front desk with a
``lookup_order`` tool, a billing agent with ``check_invoice``, the keypad
("press 2 for billing" is an app handoff on a DTMF event), a transfer to a
human by SIP REFER (``rtqueue.sip.refer_tool``) and a hang-up
(``rtqueue.sip.hangup_tool``). A scripted caller speaks, presses 2, cuts the
agent off once, and asks for a human.

Run from a clone after ``pip install -e '.[phone]'``:

    python examples/phone_sip.py               # simulator, 10x real time
    python examples/phone_sip.py --hangup      # the caller says goodbye: the agent hangs up
    python examples/phone_sip.py --live        # wait for a real call (see below)

It prints the call, then the network's transcript, and last one JSON line
(``conflicts``, ``lost_intents``, ``handoffs``, ``tool_calls``,
``barge_ins``, ``truncate_errors``...). Without ``--live`` nothing leaves
127.0.0.1. With ``--live`` (``$OPENAI_API_KEY`` and the webhook's
``$OPENAI_WEBHOOK_SECRET``) the webhook listens on 127.0.0.1:``--port``: put
a tunnel in front of it, register its URL for ``realtime.call.incoming`` and
call your SIP number. The code lives in ``rtqueue/demo_phone.py`` (also
``rtqueue demo --phone``).
"""

from __future__ import annotations

import argparse
import sys

from rtqueue.demo_phone import run_sip_desk
from rtqueue.errors import RtqueueError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A support desk answering an OpenAI SIP call (simulator).")
    parser.add_argument("--speed", type=float, default=10.0, help="simulator pace vs real time")
    parser.add_argument("--hangup", action="store_true", help="the caller says goodbye instead of asking for a human")
    parser.add_argument("--live", action="store_true",
                        help="answer a real call (needs $OPENAI_API_KEY and $OPENAI_WEBHOOK_SECRET)")
    parser.add_argument("--port", type=int, default=8000, help="with --live: the webhook's port on 127.0.0.1")
    args = parser.parse_args(argv)
    if args.speed <= 0:
        parser.error("--speed must be positive")
    try:
        summary = run_sip_desk(speed=args.speed, hang_up=args.hangup, live=args.live, listen_port=args.port)
    except RtqueueError as exc:
        print(f"phone_sip: {exc}", file=sys.stderr)
        return 2
    return 0 if summary["conflicts"] == 0 and summary["lost_intents"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
