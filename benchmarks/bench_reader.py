"""Reader throughput: rtqueue's parse + route + audio decode path, against real time.

    python benchmarks/bench_reader.py [--quick] [--out DIR] [--json FILE]

1. Record: a client asks the simulator (unpaced, in this process) for long
   spoken answers; every server frame is kept exactly as sent (JSON text).
2. Replay, with the process pinned to one CPU: the frames go through a real
   :class:`rtqueue.Session` whose transport hands them out from memory (no
   socket). Its reader thread parses each frame, updates the gate, routes it
   and feeds the audio link, which base64-decodes every
   ``response.output_audio.delta`` and queues it on a device-less speaker
   (``NullSpeaker(realtime=False)``). Wall time is from the first frame to the
   last one handed out and routed.
3. Compare: the audio those frames carry (ms of 24 kHz PCM16) divided by the
   wall time = times faster than real time; also the same for a bare loop
   (``json.loads`` + ``base64.b64decode`` only), the floor any client pays.

Target: rtqueue's reader >= 1000x real time on one core.
"""

from __future__ import annotations

import base64
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import _common as C

TARGET_X = 1000.0


def record(turns: int, words: int) -> list[str]:
    """Server frames of ``turns`` spoken answers of ``words`` words each."""
    import websocket

    from rtqueue.sim import Simulator

    with Simulator(speed=None, seed=3, record=True) as sim:
        ws = websocket.create_connection(sim.url, timeout=30, skip_utf8_validation=True)
        try:
            for i in range(turns):
                ws.send(json.dumps({"type": "conversation.item.create", "item": {
                    "type": "message", "role": "user",
                    "content": [{"type": "input_text", "text": f"Tell me story {i} [len: {words}]"}]}}))
                ws.send(json.dumps({"type": "response.create"}))
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    ev = json.loads(ws.recv())
                    if ev.get("type") == "response.done":
                        break
        finally:
            ws.close()
        return [json.dumps(ev, separators=(",", ":")) for ev in sim.server_events(0)]


def audio_ms(frames: list[str]) -> float:
    total = 0
    for f in frames:
        ev = json.loads(f)
        if ev.get("type") == "response.output_audio.delta":
            total += len(base64.b64decode(ev["delta"]))
    return total / 48.0


class ReplayTransport:
    """A Transport that hands out recorded frames, then waits to be aborted."""

    close_code: int | None = None
    close_reason = ""

    def __init__(self, frames: list[str]) -> None:
        self._frames = frames
        self._i = 0
        self.t_first: float | None = None
        self.t_last: float | None = None
        self.cpu_first = 0.0
        self.cpu_last = 0.0
        self.finished = threading.Event()
        self._aborted = threading.Event()

    def send(self, text: str) -> None:
        pass  # the replayed server does not listen

    def recv(self) -> str | None:
        if self._i == 1:  # after session.created: the measured part starts
            self.t_first = time.perf_counter()
            self.cpu_first = time.thread_time()
        if self._i < len(self._frames):
            frame = self._frames[self._i]
            self._i += 1
            return frame
        if self.t_last is None:
            self.t_last = time.perf_counter()
            self.cpu_last = time.thread_time()
            self.finished.set()
        self._aborted.wait(30)
        return None

    def send_close(self, code: int = 1000) -> None:
        self._aborted.set()

    def abort(self) -> None:
        self._aborted.set()

    def shutdown(self) -> None:
        self._aborted.set()


def replay_rtqueue(frames: list[str], *, audio: bool) -> dict[str, float]:
    from rtqueue import Session
    from rtqueue.audio import AudioIO, NullSpeaker

    transport = ReplayTransport(frames)
    device = AudioIO(output=NullSpeaker(realtime=False), input=None) if audio else None
    session = Session.connect(transport=transport, audio=device, name="bench-reader", reconnect=False)
    try:
        if not transport.finished.wait(300):
            raise RuntimeError("replay did not finish")
        assert transport.t_first is not None and transport.t_last is not None
        wall = transport.t_last - transport.t_first
        cpu = transport.cpu_last - transport.cpu_first
        responses = session.gate.stats().done
    finally:
        session.close()
    return {"wall_s": wall, "reader_cpu_s": cpu, "responses": responses}


def replay_floor(frames: list[str]) -> dict[str, float]:
    t0 = time.perf_counter()
    c0 = time.thread_time()
    for f in frames[1:]:
        ev = json.loads(f)
        if ev.get("type") == "response.output_audio.delta":
            base64.b64decode(ev["delta"])
    return {"wall_s": time.perf_counter() - t0, "reader_cpu_s": time.thread_time() - c0, "responses": 0}


def main(argv: list[str] | None = None) -> int:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=None)
    ns = p.parse_args(argv)
    turns, words, repeats = (4, 120, 2) if ns.quick else (20, 400, 5)
    repeats = ns.repeats or repeats
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    C.progress(f"recording {turns} spoken answers of {words} words from the simulator ...")
    frames = record(turns, words)
    ms = audio_ms(frames)
    n_audio = sum(1 for f in frames if '"response.output_audio.delta"' in f[:60])
    C.progress(f"  {len(frames)} frames, {n_audio} audio deltas, {ms / 1000:.1f} s of audio, "
               f"{sum(map(len, frames)) / 1e6:.1f} MB of JSON")
    pinned = None
    if hasattr(os, "sched_setaffinity"):
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        pinned = cpu
        C.progress(f"pinned to CPU {cpu}")
    variants = {
        "rtqueue reader: parse + route + decode audio (NullSpeaker)": lambda: replay_rtqueue(frames, audio=True),
        "rtqueue reader: parse + route (no audio output)": lambda: replay_rtqueue(frames, audio=False),
        "floor: json.loads + b64decode only": lambda: replay_floor(frames),
    }
    rows: list[dict[str, Any]] = []
    for name, fn in variants.items():
        runs = []
        for k in range(repeats):
            r = fn()
            runs.append(r)
            C.progress(f"  {name} [{k + 1}/{repeats}]: {ms / 1000 / r['wall_s']:.0f}x real time "
                       f"({r['wall_s'] * 1000:.1f} ms wall)")
        wall = statistics.median(r["wall_s"] for r in runs)
        cpu_s = statistics.median(r["reader_cpu_s"] for r in runs)
        rows.append({
            "variant": name,
            "frames": len(frames) - 1,
            "audio_s": round(ms / 1000, 2),
            "wall_ms": round(wall * 1000, 2),
            "reader_cpu_ms": round(cpu_s * 1000, 2),
            "x_realtime": round(ms / 1000 / wall, 1),
            "x_realtime_cpu": round(ms / 1000 / cpu_s, 1) if cpu_s > 0 else None,
            "us_per_frame": round(wall * 1e6 / (len(frames) - 1), 2),
            "runs_wall_ms": [round(r["wall_s"] * 1000, 2) for r in runs],
        })
    main_row = rows[0]
    rows[0]["vs_floor"] = round(rows[0]["wall_ms"] / rows[2]["wall_ms"], 2)
    rows[1]["vs_floor"] = round(rows[1]["wall_ms"] / rows[2]["wall_ms"], 2)
    ok = main_row["x_realtime"] >= TARGET_X
    result = {
        "benchmark": "reader",
        "machine": C.machine(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "quick": ns.quick,
        "pinned_cpu": pinned,
        "targets": [{"target": f"reader >= {TARGET_X:g}x real time on one core", "pass": ok,
                     "detail": f"{main_row['x_realtime']}x"}],
        "results": rows,
    }
    written = C.write_json(result, out / "bench_reader.json", ns.json)
    plt = C.pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(8, 3.2))
        ax.barh([r["variant"] for r in rows], [r["x_realtime"] for r in rows], color=["C0", "C1", "C7"])
        ax.axvline(TARGET_X, color="red", linestyle="--", label=f"target {TARGET_X:g}x")
        ax.set_xlabel("times faster than real time (one CPU)")
        ax.invert_yaxis()
        ax.legend()
        fig.tight_layout()
        path = out / "reader.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    print()
    print(C.table(rows, [("variant", "variant"), ("frames", "frames"), ("audio_s", "audio s"),
                         ("wall_ms", "wall ms"), ("reader_cpu_ms", "reader CPU ms"), ("us_per_frame", "us/frame"),
                         ("x_realtime", "x real time"), ("vs_floor", "time vs floor")]))
    print()
    print(f"{'PASS' if ok else 'FAIL'}  rtqueue: reader >= {TARGET_X:g}x real time on one core "
          f"[{main_row['x_realtime']}x]")
    print("\nwrote " + ", ".join(written))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
