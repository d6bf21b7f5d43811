"""rtqueue.recording: the JSONL format, redaction, audio durations, reading, the simulator's trace."""

from __future__ import annotations

import base64
import io
import json
import threading
from pathlib import Path

from rtqueue import Session
from rtqueue.recording import Recorder, audio_ms, read_recording
from rtqueue.sim import Simulator

KEY = "sk-proj-abcdefghijklmnop1234567890"


def test_header_frames_and_redaction(tmp_path: Path) -> None:
    path = tmp_path / "call.jsonl"
    with Recorder(path, audio="duration") as rec:
        rec.start({"instructions": f"use {KEY}", "api_key": "plain-value",
                   "tools": [{"type": "mcp", "headers": {"Authorization": "Bearer abcdefgh12345"}}]})
        audio = base64.b64encode(b"\0" * 4800).decode()
        rec.write("client", {"type": "input_audio_buffer.append", "audio": audio})
        rec.write("server", {"type": "response.output_audio.delta", "delta": audio})
        rec.write("client", {"type": "session.update", "session": {"tools": [
            {"type": "mcp", "server_url": "https://x", "headers": {"X-Token": "tok-123", "authorization": "abc"}}],
            "instructions": f"key {KEY} here"}, "usage": {"max_output_tokens": 5}})
        rec.write_raw("client", b"\x01\x02")
        rec.write_raw("client", "{not json")
        assert rec.new_connection() == 1
        rec.write("server", {"type": "session.created"})
    text = path.read_text()
    assert KEY not in text and "plain-value" not in text and "abcdefgh12345" not in text
    assert "tok-123" not in text and '"abc"' not in text
    header = json.loads(text.splitlines()[0])
    assert header["type"] == "rtqueue.recording" and header["version"] == 1 and header["source"] == "client"
    assert header["started_at"].endswith("Z") and header["audio"] == "duration"
    r = read_recording(path)
    assert [f.sender for f in r.frames] == ["client", "server", "client", "client", "client", "server"]
    append, delta = r.frames[0].event, r.frames[1].event
    assert append is not None and append["audio"] is None and append["rtq_audio_ms"] == 100.0
    assert delta is not None and delta["delta"] is None and delta["rtq_audio_ms"] == 100.0
    update = r.frames[2].event
    assert update is not None and update["usage"] == {"max_output_tokens": 5}  # not a credential
    assert r.frames[3].binary_len == 2 and r.frames[4].raw == "{not json"
    assert r.frames[5].session == 1 and r.frames[0].session == 0
    assert all(a.t <= b.t for a, b in zip(r.frames, r.frames[1:], strict=False))


def test_audio_kept_and_format() -> None:
    buf = io.StringIO()
    rec = Recorder(buf)
    rec.start({"audio": {"output": {"format": {"type": "audio/pcmu"}}}})
    rec.write("server", {"type": "response.output_audio.delta", "delta": "AAAA"})
    rec.close()
    assert '"delta":"AAAA"' in buf.getvalue()
    assert audio_ms(base64.b64encode(b"\0" * 800).decode(), {"type": "audio/pcmu"}) == 100.0


def test_truncated_last_line_and_threads(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    rec = Recorder(path, source="simulator")
    rec.start({})
    threads = [threading.Thread(target=lambda: [rec.write("server", {"type": "x", "n": i}) for i in range(200)])
               for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    rec.close()
    with open(path, "a") as fh:
        fh.write('{"t": 1.0, "session": 0, "from": "ser')
    r = read_recording(path)
    assert len(r.frames) == 800 and r.header["source"] == "simulator"


def test_simulator_trace_is_a_recording(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    with Simulator(speed=None, trace=path) as sim, Session.connect(url=sim.url) as session:
        session.ask("hello", timeout=10)
    r = read_recording(path)
    assert r.header["source"] == "simulator"
    assert r.frames[0].sender == "server" and r.frames[0].type == "session.created"
    assert any(f.sender == "client" and f.type == "response.create" for f in r.frames)
