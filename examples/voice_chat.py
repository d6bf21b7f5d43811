"""Talk to a voice agent with your microphone and speaker; interrupt it any time.

Run from a clone after `pip install -e .` (needs PortAudio: `apt-get install
libportaudio2`, `brew install portaudio`):

    python examples/voice_chat.py            # --sim (default): the embedded simulator, real-time pace
    python examples/voice_chat.py --live     # OpenAI gpt-realtime, needs $OPENAI_API_KEY

Speak; server voice detection ends your turn and the agent answers. Talk over
it and it stops at once (barge-in), remembering only what you heard. Ctrl-C
quits. Use headphones: with loudspeakers the microphone hears the agent and
interrupts it (or pass --half-duplex to mute the microphone while it speaks).

The simulator does not understand words (it detects speech by its energy and
answers with stock sentences); it is there so the audio path can be tried
without a key.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
import time

import rtqueue
from rtqueue.audio import AudioIO, Microphone, Speaker
from rtqueue.errors import AudioUnavailable, RtqueueError


@rtqueue.tool
def get_time() -> str:
    """The current local time (HH:MM)."""
    return time.strftime("%H:%M")


agent = rtqueue.Agent(
    name="assistant",
    instructions="You are a friendly voice assistant. Keep answers short and conversational.",
    tools=[get_time],
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Talk to a voice agent (microphone and speaker).")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--sim", action="store_true", help="use the embedded simulator (the default)")
    where.add_argument("--live", action="store_true", help="use OpenAI (needs $OPENAI_API_KEY)")
    parser.add_argument("--model", default="gpt-realtime")
    parser.add_argument("--voice", default="marin")
    parser.add_argument("--input-device", default=None, help="sounddevice input device (name or index)")
    parser.add_argument("--output-device", default=None, help="sounddevice output device (name or index)")
    parser.add_argument("--half-duplex", action="store_true", help="mute the microphone while the agent speaks")
    parser.add_argument("--greet", action="store_true", help="let the agent speak first")
    parser.add_argument("--seconds", type=float, default=None, help="quit after this many seconds")
    args = parser.parse_args(argv)

    if args.live and not os.environ.get("OPENAI_API_KEY"):
        print("--live needs $OPENAI_API_KEY (without --live the embedded simulator is used)", file=sys.stderr)
        return 2
    try:
        # Checks at once that PortAudio loads (AudioUnavailable says what to install if not).
        io = AudioIO.default(output_device=_device(args.output_device), input_device=_device(args.input_device))
        speaker, mic = io.output, io.input
        assert isinstance(speaker, Speaker) and isinstance(mic, Microphone)
        with contextlib.ExitStack() as stack:
            url = None if args.live else stack.enter_context(rtqueue.Simulator(speed=1.0)).url
            session = stack.enter_context(rtqueue.Session.connect(
                url=url, model=args.model, agent=agent, voice=args.voice, audio=io, turn_detection="server_vad",
            ))
            print(f"connected to {'OpenAI ' + args.model if args.live else 'the simulator at ' + str(url)}; "
                  f"speak (Ctrl-C quits)", flush=True)
            return _converse(session, speaker, mic, args)
    except AudioUnavailable as exc:
        print(f"audio unavailable: {exc}", file=sys.stderr)
        return 2
    except RtqueueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _device(value: str | None) -> int | str | None:
    return int(value) if value is not None and value.isdigit() else value


def _converse(session: rtqueue.Session, speaker: Speaker, mic: Microphone, args: argparse.Namespace) -> int:
    stream = session.events(
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "conversation.item.input_audio_transcription.completed",
        "response.output_audio_transcript.done",
        "audio.interrupted",
        "tool.result",
        "error",
    )
    if args.greet:
        session.create_response(instructions="Greet the user in one short sentence.")
    deadline = None if args.seconds is None else time.monotonic() + args.seconds
    stop = threading.Event()
    try:
        while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            if args.half_duplex:
                mic.muted = speaker.is_playing()
            ev = stream.get(timeout=0.1)
            if ev is None:
                if session.closed:
                    print("session closed", flush=True)
                    return 1
                continue
            _show(ev)
    except KeyboardInterrupt:
        print("\nbye", flush=True)
    finally:
        stream.close()
    return 0


def _show(ev: rtqueue.Event) -> None:
    if ev.type == "input_audio_buffer.speech_started":
        print("you:       (speaking...)", flush=True)
    elif ev.type == "input_audio_buffer.speech_stopped":
        print("you:       (done)", flush=True)
    elif ev.type == "conversation.item.input_audio_transcription.completed":
        print(f"you:       {ev.get('transcript', '').strip()}", flush=True)
    elif ev.type == "response.output_audio_transcript.done":
        print(f"assistant: {ev.get('transcript', '')}", flush=True)
    elif ev.type == "audio.interrupted" and ev.get("item_id"):
        print(f"           [interrupted after {ev.played_ms:.0f} ms; truncated at {ev.truncated_ms} ms]", flush=True)
    elif ev.type == "tool.result":
        print(f"           [tool {ev.name} -> {ev.output}]", flush=True)
    elif ev.type == "error":
        print(f"           [server error: {(ev.get('error') or {}).get('message')}]", flush=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C while connecting or closing
        print("\nbye")
        sys.exit(0)
