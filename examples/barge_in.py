"""Barge-in: a scripted user interrupts the assistant mid-sentence.

The assistant starts a long answer; after it has played for a while, the
"user" speaks (speech PCM goes into the input buffer, as a microphone would
send it). The server's voice detection hears it and cancels the response;
rtqueue stops playback at once and truncates the assistant's message to what
was really played, so the model's memory of the conversation matches what the
user heard. Then the assistant answers the interruption.

Run from a clone after `pip install -e .`:

    python examples/barge_in.py              # no sound card needed (a null speaker keeps time)
    python examples/barge_in.py --speaker    # hear it on the default output device
    python examples/barge_in.py --app        # the app interrupts (Session.interrupt()) instead
    python examples/barge_in.py --speed 4    # everything 4x faster than real time

It always runs on the embedded simulator (127.0.0.1), which checks every
truncate: one past the audio it produced would be refused with
"Audio content of Xms is already shorter than Yms".
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

import rtqueue
from rtqueue.audio import AudioIO, NullSpeaker, Speaker
from rtqueue.errors import AudioUnavailable
from rtqueue.sim import synthesize


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A scripted user interrupts the assistant mid-sentence.")
    parser.add_argument("--speaker", action="store_true", help="play on the default output device")
    parser.add_argument("--app", action="store_true", help="interrupt with Session.interrupt() instead of speaking")
    parser.add_argument("--after", type=float, default=2.0, help="seconds of playback before the user barges in")
    parser.add_argument("--speed", type=float, default=1.0, help="run this many times faster than real time")
    args = parser.parse_args(argv)
    if args.speed <= 0 or args.after <= 0:
        parser.error("--speed and --after must be positive")

    output = Speaker() if args.speaker else NullSpeaker(speed=args.speed)
    turn_detection = {"type": "server_vad", "create_response": True, "interrupt_response": True,
                      "silence_duration_ms": 400}
    interrupted = threading.Event()
    cuts: list[rtqueue.Event] = []

    def on_interrupted(ev: rtqueue.Event) -> None:
        cuts.append(ev)
        interrupted.set()
    with rtqueue.Simulator(speed=args.speed, seed=11) as sim:
        try:
            session = rtqueue.Session.connect(url=sim.url, audio=AudioIO(output=output, input=None),
                                              turn_detection=turn_detection)
        except AudioUnavailable as exc:
            print(f"no audio device: {exc}", file=sys.stderr)
            return 2
        with session:
            session.on("audio.interrupted", on_interrupted)
            done = session.events("response.done")
            words: list[str] = []
            session.on("response.output_audio_transcript.delta", lambda ev: words.append(ev["delta"]))

            print("user:      Tell me about the history of tea. [a long answer]")
            session.send_text("Tell me about the history of tea. [len: 60]")
            story = session.create_response()
            first_audio = session.events("response.output_audio.delta")
            if first_audio.get(timeout=30) is None:
                print("no audio from the assistant", file=sys.stderr)
                return 1
            first_audio.close()
            # The user listens for a while (an example may sleep: nothing here is synchronised by it).
            time.sleep(args.after / (1.0 if args.speaker else args.speed))

            if args.app:
                print("user:      [presses the stop button]")
                cut = session.interrupt(timeout=30)
            else:
                print("user:      (speaks) Wait, stop, I have a question!")
                speech = synthesize("wait stop I have a question", voice="echo", seed=1).pcm
                session.append_audio(speech + bytes(48 * 600))  # speech, then 600 ms of silence
                if not interrupted.wait(30):
                    print("server VAD never fired", file=sys.stderr)
                    return 1
                cut = cuts[-1]  # the event carries the same fields as Session.interrupt()'s result
            first = story.wait(30)
            # What does the model now remember having said? Ask the server for the item.
            retrieved = session.events("conversation.item.retrieved")
            session.send({"type": "conversation.item.retrieve", "item_id": cut.item_id})
            item = retrieved.get(timeout=30)
            remembered = (item["item"]["content"] or [{}])[0].get("transcript") if item is not None else None

            print(f"assistant: {''.join(words).strip()} ... [cut off]")
            print(f"           (the model remembers saying: {remembered!r})")
            print(f"\nbarge-in ({cut.source}): item {cut.item_id}")
            print(f"  received  {cut.received_ms:8.1f} ms of audio from the server")
            print(f"  played    {cut.played_ms:8.1f} ms (what the listener heard)")
            print(f"  truncated at {cut.truncated_ms} ms (conversation.item.truncate audio_end_ms)")
            print(f"  response  {first.status} ({(first.status_details or {}).get('reason')})")

            if not args.app:
                # Server VAD answers the interruption by itself (create_response).
                ev = done.get(timeout=30)
                while ev is not None and ev["response"]["id"] == first.id:
                    ev = done.get(timeout=30)
                if ev is None:
                    print("no answer to the interruption", file=sys.stderr)
                    return 1
                reply = rtqueue.Response.from_done(ev.data)
                print(f"\nassistant: {reply.text}  [{reply.status}]")
                output.wait_idle(60)

        stats = sim.stats()
        truncates = [e for e in sim.client_events() if e["type"] == "conversation.item.truncate"]
        sent = truncates[0]["audio_end_ms"] if truncates else None
        print(f"\nsummary: played_ms={cut.played_ms:.1f} truncated_ms={cut.truncated_ms} "
              f"truncate_sent={sent} server_errors={stats['errors']}")
    return 0 if not stats["errors"] and sent == cut.truncated_ms else 1


if __name__ == "__main__":
    sys.exit(main())
