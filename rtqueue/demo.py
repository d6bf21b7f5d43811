"""``rtqueue demo``: a scripted customer talks to the multi-agent support desk.

Runs on the embedded simulator unless ``--live`` (then OpenAI, with
``$OPENAI_API_KEY``). Prints who speaks, each handoff, each tool call with its
arguments and result, and a summary with the server-side conflict count.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import Any

from .agents import Agent
from .demo_desk import DEMO_TURNS, build_desk
from .errors import RtqueueError
from .session import Session
from .values import Event

__all__ = ["run_demo"]

_BASIC_TURNS = ("Hello there!", "What can you do for me?", "Thanks, that's all.")


def _short(text: str, n: int = 110) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def run_demo(
    *,
    live: bool = False,
    audio: bool = False,
    scenario: str = "customer_service",
    model: str = "gpt-realtime",
    speed: float | None = None,
    latency_ms: float = 20.0,
    json_path: str | None = None,
    record_dir: str | None = None,
    out: Any = None,
) -> int:
    """Run the demo conversation; returns a process exit code (0 = no conflicts, no errors)."""
    out = out or sys.stdout

    def say(line: str) -> None:
        print(line, file=out, flush=True)

    if live and not os.environ.get("OPENAI_API_KEY"):
        say("rtqueue demo --live needs $OPENAI_API_KEY (without --live the demo uses the embedded simulator)")
        return 2
    audio_io = None
    if audio:
        from .audio import AudioIO, Speaker

        try:
            audio_io = AudioIO(output=Speaker(), input=None)
            audio_io.output.start()  # type: ignore[union-attr]
            audio_io.output.close()  # type: ignore[union-attr]
            audio_io = AudioIO(output=Speaker(), input=None)
        except RtqueueError as exc:
            say(f"rtqueue demo --audio: {exc}")
            return 2
    turns = DEMO_TURNS if scenario == "customer_service" else _BASIC_TURNS
    agent: Agent = build_desk() if scenario == "customer_service" else Agent(
        name="assistant", instructions="You are the assistant. Be friendly and brief."
    )
    with contextlib.ExitStack() as stack:
        sim = None
        if live:
            url = None
            where = f"OpenAI ({model})"
        else:
            from .sim import Simulator

            pace = speed if speed is not None else (1.0 if audio else 4.0)
            sim = stack.enter_context(Simulator(latency_ms=latency_ms, speed=pace, seed=7))
            url = sim.url
            where = f"the embedded simulator at {sim.url} (latency {latency_ms:g} ms, speed {pace:g}x)"
        say(f"rtqueue demo: {scenario.replace('_', ' ')} on {where}")
        t0 = time.monotonic()
        recording = None
        if record_dir is not None:
            os.makedirs(record_dir, exist_ok=True)
            recording = os.path.join(record_dir, "demo.jsonl")
        session = stack.enter_context(
            Session.connect(url=url, model=model, agent=agent, audio=audio_io,
                            turn_detection="push_to_talk", name="demo", record=recording)
        )
        stream = stack.enter_context(session.events("response.done", "agent.handoff", "tool.result",
                                                     "tool.error", "tool.skipped", "error"))
        transcript: list[dict[str, Any]] = []
        failures = 0
        for text in turns:
            say(f"\n  customer      : {text}")
            transcript.append({"speaker": "customer", "text": text})
            try:
                final = session.ask(text, timeout=120)
            except RtqueueError as exc:
                say(f"  !! {exc}")
                failures += 1
                continue
            _drain_until(stream, final.id, transcript, say, agent.name)
            if audio_io is not None and audio_io.output is not None:
                # Let the answer finish playing before the customer speaks again.
                audio_io.output.wait_idle(120)
        elapsed = time.monotonic() - t0
        gate = session.gate.stats()
        summary: dict[str, Any] = {
            "responses": gate.done,
            "handoffs": sum(1 for t in transcript if t.get("kind") == "handoff"),
            "tool_calls": sum(1 for t in transcript if t.get("kind") == "tool"),
            "gate_retries": gate.retried,
            "gate_wait_p50_ms": round(gate.wait_p50_ms, 3),
            "gate_wait_p99_ms": round(gate.wait_p99_ms, 3),
            "final_agent": session.agent.name if session.agent else None,
            "seconds": round(elapsed, 2),
            "failures": failures,
        }
        if audio_io is not None and audio_io.output is not None:
            summary["audio_played_ms"] = round(audio_io.output.stats()["played_ms"], 1)
        session.close()
        if sim is not None:
            stats = sim.stats()
            summary["conflicts"] = stats["conflicts"]
            summary["server_errors"] = stats["errors"]
        say("\nsummary")
        for k, v in summary.items():
            say(f"  {k:<17} {v}")
        if recording is not None:
            say(f"\nrecording: {recording}")
            try:
                from .timeline import write_timeline
            except ImportError as exc:  # plotly is the optional [timeline] extra
                say(f"timeline: not drawn ({exc}; pip install 'rtqueue[timeline]')")
            else:
                page = os.path.join(os.path.dirname(recording), "demo.html")
                write_timeline(recording, page)
                say(f"timeline : {page}")
        if json_path:
            with open(json_path, "w", encoding="utf-8") as f:
                json.dump({"transcript": transcript, "summary": summary}, f, indent=2, default=str)
    ok = failures == 0 and summary.get("conflicts", 0) == 0
    return 0 if ok else 1


def _drain_until(stream: Any, final_id: str, transcript: list[dict[str, Any]], say: Any, first: str) -> None:
    """Print the turn's events in order until the final response's ``response.done``."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ev: Event | None = stream.get(timeout=max(0.0, deadline - time.monotonic()))
        if ev is None:
            return
        if ev.type == "response.done":
            resp = ev.data.get("response") or {}
            from .values import response_text

            text = response_text(resp.get("output") or [])
            agent = transcript_agent(transcript, first)
            if text:
                say(f"  {agent:<14}: {_short(text)}")
            calls = [o for o in resp.get("output") or [] if o.get("type") == "function_call"]
            status = resp.get("status")
            if status != "completed":
                say(f"  {'':<14}  (response {status})")
            transcript.append({"speaker": agent, "text": text, "status": status, "calls": len(calls)})
            if resp.get("id") == final_id:
                return
        elif ev.type == "agent.handoff":
            say(f"  --> handoff   : {ev.source} -> {ev.target}")
            transcript.append({"kind": "handoff", "source": ev.source, "target": ev.target})
        elif ev.type in ("tool.result", "tool.error"):
            mark = "tool" if ev.type == "tool.result" else "tool ERROR"
            say(f"  [{mark}] {ev.name}({_short(ev.arguments, 60)}) -> {_short(ev.output, 80)}")
            transcript.append({"kind": "tool", "name": ev.name, "arguments": ev.arguments, "output": ev.output,
                               "ok": ev.ok, "agent": ev.agent})
        elif ev.type == "tool.skipped":
            say(f"  [tool skipped] {ev.name}: {ev.reason}")
        elif ev.type == "error":
            say(f"  !! server error: {(ev.data.get('error') or {}).get('message')}")


def transcript_agent(transcript: list[dict[str, Any]], first: str = "front_desk") -> str:
    """The agent speaking now, from the handoffs recorded so far (``first`` before any)."""
    for t in reversed(transcript):
        if t.get("kind") == "handoff":
            return str(t["target"])
    return first
