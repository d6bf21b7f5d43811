"""Two agents: a greeter that hands the conversation to a haiku writer.

Run from a clone after `pip install -e .`:

    python examples/handoff.py            # on the embedded simulator
    python examples/handoff.py --live     # on OpenAI ($OPENAI_API_KEY)
"""

from __future__ import annotations

import argparse
import contextlib

import rtqueue

haiku_writer = rtqueue.Agent(
    name="haiku_writer",
    description="Writes a haiku on any topic.",
    instructions="You are the haiku writer. Answer only with a haiku about the user's topic.",
    handoffs=["greeter"],  # by name: the greeter is defined below
)
greeter = rtqueue.Agent(
    name="greeter",
    instructions="You are the greeter. Greet the user; hand poetry requests to the haiku writer.",
    handoffs=[rtqueue.handoff(haiku_writer, description="When the user wants a poem or a haiku.")],
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--live", action="store_true", help="use OpenAI instead of the simulator")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        url = None if args.live else stack.enter_context(rtqueue.Simulator(speed=4.0)).url
        session = stack.enter_context(rtqueue.Session.connect(url=url, agent=greeter, output_modalities=["text"]))
        session.on("agent.handoff", lambda e: print(f"  ({e.source} hands off to {e.target})"))
        for line in ("Hello!", "Please ask the haiku writer for a poem about autumn rain."):
            print(f"you: {line}")
            answer = session.ask(line, timeout=60)
            print(f"{answer.agent}: {answer.text}\n")
        print("now speaking:", session.agent.name)


if __name__ == "__main__":
    main()
