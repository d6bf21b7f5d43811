"""A retail support desk: five agents, mock tools, handoffs, in one conversation.

The desk (agents and tools) is `rtqueue.demo_desk`, the same one `rtqueue demo`
runs; read that module for how the agents and tools are written. This script
lets you type as the customer (or replays the demo's scripted customer with
`--script`), and prints every handoff and tool call as it happens.

    python examples/customer_service.py --script     # the scripted customer
    python examples/customer_service.py              # type; an empty line quits
    python examples/customer_service.py --live       # on OpenAI ($OPENAI_API_KEY)
"""

from __future__ import annotations

import argparse
import contextlib

import rtqueue
from rtqueue.demo_desk import DEMO_TURNS, build_desk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--live", action="store_true", help="use OpenAI instead of the simulator")
    parser.add_argument("--script", action="store_true", help="replay the demo's scripted customer")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        sim = None if args.live else stack.enter_context(rtqueue.Simulator(speed=4.0, latency_ms=20))
        session = stack.enter_context(
            rtqueue.Session.connect(url=sim.url if sim else None, agent=build_desk(), output_modalities=["text"])
        )
        session.on("agent.handoff", lambda e: print(f"    -> handoff {e.source} -> {e.target}"))
        session.on("tool.result", lambda e: print(f"    [tool] {e.name}({e.arguments}) -> {e.output}"))
        session.on("tool.error", lambda e: print(f"    [tool error] {e.name}: {e.error}"))
        turns = iter(DEMO_TURNS) if args.script else iter(lambda: input("customer> ").strip(), "")
        for text in turns:
            if args.script:
                print(f"customer> {text}")
            answer = session.ask(text, timeout=120)
            print(f"{answer.agent}: {answer.text}\n")
        print(f"gate: {session.gate.stats().done} responses, {session.gate.stats().retried} server races retried")
    if sim is not None:
        print(f"simulator: {sim.stats()['conflicts']} conflicts")


if __name__ == "__main__":
    main()
