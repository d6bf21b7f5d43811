"""One client under test in its own process, for ``bench_scale.py --peers`` (not a benchmark itself).

    python benchmarks/_peers.py CLIENT URL SESSIONS SECONDS SEED

runs the scale workload with one client against a simulator that is already
running (``URL``, on 127.0.0.1) and prints one JSON line of figures. The
workload is the same for every client:

- ``SESSIONS`` sessions, server VAD answering and barging in (``create_response``
  and ``interrupt_response``);
- mic audio in real time, 100 ms chunks, each session at its own phase within
  the 100 ms and its own rhythm (0.5-1.5 s of speech, 3-6 s of silence), as
  :class:`bench_scale.Feeder` sends it;
- an app ``response.create`` per session every 10-20 s, tagged in
  ``response.metadata`` (``bench_intent``) so its outcome can be counted;
- every received audio delta base64-decoded as a player would, and its arrival
  time kept: the *jitter* of a delta is ``|gap since the previous delta of the
  same item - that delta's audio length|`` in ms (the simulator paces 50 ms
  chunks every 50 ms, so a client that reads on time sees ~0).

Clients (``CLIENT``):

- ``rtqueue``: ``rtqueue.Session`` per session, as documented: its own reader
  and writer threads and the gate; audio goes to a device-less output
  (:class:`MeterSpeaker`) that the session's audio link decodes into.
- ``openai-agents``: the official openai-agents ``RealtimeSession`` (asyncio),
  every session on one event loop; mic audio with ``send_audio`` from tasks on
  that loop, app creates through its raw-message path; its own audio events
  carry the decoded bytes.
- ``openai``: the official ``openai`` package's synchronous realtime client
  (``OpenAI(websocket_base_url=...).realtime.connect``), one reader thread per
  session calling ``recv()``, mic audio and app creates sent from the feeder
  and app threads directly: no gating (the bare baseline).

Figures (steady window only, after a warm-up): process CPU (user+sys, every
thread), RSS, threads, jitter samples, app intents (created, answered, lost),
and rtqueue's gate latencies.
"""

from __future__ import annotations

import asyncio
import base64
import heapq
import itertools
import json
import os
import random
import statistics
import sys
import threading
import time
from typing import Any

import _common as C
from bench_scale import CHUNK_MS, Feeder

WARMUP_S = 5.0
DRAIN_S = 20.0
VAD = {"type": "server_vad", "create_response": True, "interrupt_response": True}


class Meter:
    """Jitter samples (only while ``on``) and decoded audio, shared by every session of the process."""

    def __init__(self) -> None:
        self.on = False
        self.jitter_ms: list[float] = []
        self.deltas = 0
        self.audio_bytes = 0


class Track:
    """One session's last audio delta: the item, when it came, how long it plays."""

    __slots__ = ("item", "meter", "ms", "t")

    def __init__(self, meter: Meter) -> None:
        self.meter = meter
        self.item: str | None = None
        self.t = 0.0
        self.ms = 0.0

    def delta(self, item_id: str, nbytes: int) -> None:
        now = time.monotonic()
        m = self.meter
        m.deltas += 1
        m.audio_bytes += nbytes
        if m.on and item_id == self.item:
            m.jitter_ms.append(abs((now - self.t) * 1000.0 - self.ms))
        self.item, self.t, self.ms = item_id, now, nbytes / 48.0


class Intents:
    """App creates by tag: answered (a ``response.created`` carried the tag) or refused (an error named it)."""

    def __init__(self) -> None:
        self.created = 0
        self.ok: set[str] = set()
        self.refused: set[str] = set()

    def settled(self) -> int:
        return len(self.ok | self.refused)


def _tag_of_created(event: dict[str, Any]) -> str | None:
    meta = (event.get("response") or {}).get("metadata")
    return meta.get("bench_intent") if isinstance(meta, dict) else None


# -- rtqueue ---------------------------------------------------------------------------------------


def _meter_speaker(meter: Meter) -> Any:
    from rtqueue.audio import AudioOutput, PlaybackCut

    class MeterSpeaker(AudioOutput):
        """A device-less output: counts what it is given and plays it the moment it arrives
        (the same assumption as openai-agents' default playback tracker, so a barge-in truncates
        at what was received)."""

        def __init__(self) -> None:
            self.track = Track(meter)
            self._received: dict[str, float] = {}
            self._current: str | None = None

        def start(self) -> None:
            pass

        def close(self) -> None:
            pass

        def play(self, item_id: str, pcm: bytes) -> None:
            self.track.delta(item_id, len(pcm))
            if item_id != self._current:
                self._received = {item_id: 0.0}
                self._current = item_id
            self._received[item_id] += len(pcm) / 48.0

        def end_item(self, item_id: str) -> None:
            pass

        def played_ms(self, item_id: str) -> float:
            return self._received.get(item_id, 0.0)

        def received_ms(self, item_id: str) -> float:
            return self._received.get(item_id, 0.0)

        def interrupt(self) -> PlaybackCut | None:
            item = self._current
            if item is None:
                return None
            ms = self._received.get(item, 0.0)
            return PlaybackCut(item, ms, ms, 0.0)

        def current_item(self) -> str | None:
            return self._current

        def is_playing(self) -> bool:
            return False

        def wait_idle(self, timeout: float) -> bool:
            return True

        def stats(self) -> dict[str, Any]:
            return {}

    return MeterSpeaker()


class RtqueuePeer:
    name = "rtqueue"

    def __init__(self, meter: Meter) -> None:
        self.meter = meter
        self.sessions: list[Any] = []
        self.handles: list[Any] = []
        self.intents = Intents()

    def open(self, url: str, n: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from rtqueue import Session
        from rtqueue.audio import AudioIO

        def connect(i: int) -> Any:
            return Session.connect(url, api_key="sk-bench", turn_detection=dict(VAD), reconnect=False,
                                   audio=AudioIO(output=_meter_speaker(self.meter)), name=f"peer-{i}",
                                   connect_timeout=120.0)

        with ThreadPoolExecutor(8, thread_name_prefix="bench-connect") as pool:
            self.sessions = list(pool.map(connect, range(n)))

    def mic_targets(self) -> list[Any]:
        return self.sessions

    def create(self, i: int, tag: str) -> None:
        self.intents.created += 1
        self.handles.append((tag, self.sessions[i].create_response(metadata={"bench_intent": tag})))

    def settle(self, deadline: float) -> None:
        for tag, h in self.handles:
            try:
                h.wait(max(0.0, deadline - time.monotonic()))
                self.intents.ok.add(tag)
            except Exception:
                if h.done():
                    self.intents.refused.add(tag)

    def gate_ms(self) -> list[float] | None:
        return [x for s in self.sessions for x in s.gate.latencies_ms()]

    def close(self) -> None:
        for s in self.sessions:
            s.close()


# -- the official openai client, synchronous, no gating ------------------------------------------------


class _OpenAIMic:
    """``append_audio`` for the feeder: the official client's own ``input_audio_buffer.append``."""

    def __init__(self, conn: Any, lock: threading.Lock) -> None:
        self.conn = conn
        self.lock = lock

    def append_audio(self, pcm: bytes) -> None:
        with self.lock:  # one sender at a time on this connection (feeder and app threads)
            self.conn.input_audio_buffer.append(audio=base64.b64encode(pcm).decode("ascii"))


class OpenAIPeer:
    name = "openai"

    def __init__(self, meter: Meter) -> None:
        self.meter = meter
        self.conns: list[Any] = []
        self.locks: list[threading.Lock] = []
        self.readers: list[threading.Thread] = []
        self.intents = Intents()
        self._ids = itertools.count()

    def open(self, url: str, n: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        import openai

        base = url.split("/realtime", 1)[0]
        client = openai.OpenAI(api_key="sk-bench", base_url="http://127.0.0.1:9/v1", websocket_base_url=base)

        def connect(i: int) -> Any:
            conn = client.realtime.connect(model="gpt-realtime", max_retries=0).enter()
            conn.session.update(session={"type": "realtime", "output_modalities": ["audio"],
                                         "audio": {"input": {"turn_detection": dict(VAD)}}})
            return conn

        with ThreadPoolExecutor(8, thread_name_prefix="bench-connect") as pool:
            self.conns = list(pool.map(connect, range(n)))
        self.locks = [threading.Lock() for _ in self.conns]
        for i, conn in enumerate(self.conns):
            t = threading.Thread(target=self._read, args=(conn,), name=f"bench-openai-reader-{i}", daemon=True)
            t.start()
            self.readers.append(t)

    def _read(self, conn: Any) -> None:
        track = Track(self.meter)
        intents = self.intents
        try:
            while True:
                ev = conn.recv()
                typ = ev.type
                if typ == "response.output_audio.delta":
                    track.delta(ev.item_id, len(base64.b64decode(ev.delta)))
                elif typ == "response.created":
                    meta = ev.response.metadata
                    if meta and "bench_intent" in meta:
                        intents.ok.add(meta["bench_intent"])
                elif typ == "error":
                    eid = ev.error.event_id
                    if eid and eid.startswith("evt_bench_"):
                        intents.refused.add(eid[len("evt_bench_"):])
        except Exception:
            return  # closed

    def mic_targets(self) -> list[Any]:
        return [_OpenAIMic(c, lk) for c, lk in zip(self.conns, self.locks, strict=True)]

    def create(self, i: int, tag: str) -> None:
        self.intents.created += 1
        with self.locks[i]:
            self.conns[i].response.create(event_id=f"evt_bench_{tag}", response={"metadata": {"bench_intent": tag}})

    def settle(self, deadline: float) -> None:
        while time.monotonic() < deadline and self.intents.settled() < self.intents.created:
            time.sleep(0.1)

    def gate_ms(self) -> list[float] | None:
        return None

    def close(self) -> None:
        for c in self.conns:
            try:
                c.close()
            except Exception:
                pass
        for t in self.readers:
            t.join(2.0)


# -- openai-agents: every session on one asyncio loop ---------------------------------------------------


class AgentsPeer:
    name = "openai-agents"

    def __init__(self, meter: Meter) -> None:
        self.meter = meter
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="bench-agents-loop", daemon=True)
        self.sessions: list[Any] = []
        self.pumps: list[Any] = []
        self.intents = Intents()

    def _run(self, coro: Any, timeout: float = 600.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def open(self, url: str, n: int) -> None:
        self.thread.start()
        self._run(self._open_all(url, n))

    async def _open_all(self, url: str, n: int) -> None:
        from agents.realtime import RealtimeAgent, RealtimeRunner

        sem = asyncio.Semaphore(8)  # as many handshakes at once as the thread clients' 8 connectors

        async def one(i: int) -> Any:
            async with sem:
                runner = RealtimeRunner(RealtimeAgent(name="assistant", instructions="You are a helpful assistant."))
                session = await runner.run(model_config={
                    "url": url, "api_key": "sk-bench",
                    "initial_model_settings": {"turn_detection": dict(VAD), "output_modalities": ["audio"]}})
                await session.__aenter__()
                return session

        self.sessions = list(await asyncio.gather(*(one(i) for i in range(n))))
        self.pumps = [asyncio.ensure_future(self._pump(s)) for s in self.sessions]

    async def _pump(self, session: Any) -> None:
        track = Track(self.meter)
        intents = self.intents
        async for ev in session:
            typ = ev.type
            if typ == "audio":
                audio = ev.audio  # the SDK decoded the delta's base64 already
                track.delta(audio.item_id, len(audio.data))
            elif typ == "raw_model_event":
                data = getattr(ev.data, "data", None)
                if getattr(ev.data, "type", None) != "raw_server_event" or not isinstance(data, dict):
                    continue
                kind = data.get("type")
                if kind == "response.created":
                    tag = _tag_of_created(data)
                    if tag is not None:
                        intents.ok.add(tag)
                elif kind == "error":
                    eid = (data.get("error") or {}).get("event_id")
                    if isinstance(eid, str) and eid.startswith("evt_bench_"):
                        intents.refused.add(eid[len("evt_bench_"):])

    def run_workload(self, seconds_total: float, seed: int, stop_at: float) -> int:
        """Mic feeding and the app timer as tasks on the loop (an asyncio app's way); mic chunks sent."""
        return int(self._run(self._workload(seed, stop_at), timeout=seconds_total + 120.0))

    async def _workload(self, seed: int, stop_at: float) -> int:
        from agents.realtime.model_inputs import RealtimeModelSendRawMessage

        sessions = self.sessions
        n = len(sessions)
        sent = [0]

        async def feed(k: int, group: list[Any]) -> None:
            rhythm = Rhythm(k, len(group), seed)
            tick = CHUNK_MS / 1000.0 / len(rhythm.slots)
            t_next = time.monotonic()
            slot = 0
            while time.monotonic() < stop_at:
                for i in rhythm.slots[slot]:
                    await group[i].send_audio(rhythm.next_chunk(i))
                    sent[0] += 1
                slot = (slot + 1) % len(rhythm.slots)
                t_next += tick
                delay = t_next - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)

        async def app() -> None:
            rng = random.Random(f"{seed}|app")
            due = [(time.monotonic() + rng.uniform(1.0, 15.0), i) for i in range(n)]
            heapq.heapify(due)
            while time.monotonic() < stop_at:
                wait = min(due[0][0], stop_at) - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                now = time.monotonic()
                while due and due[0][0] <= now and now < stop_at:
                    _, i = heapq.heappop(due)
                    tag = f"app:{i}:{self.intents.created}"
                    self.intents.created += 1
                    data = {"event_id": f"evt_bench_{tag}", "response": {"metadata": {"bench_intent": tag}}}
                    msg = {"type": "response.create", "other_data": data}
                    await sessions[i].model.send_event(RealtimeModelSendRawMessage(message=msg))
                    heapq.heappush(due, (now + rng.uniform(10.0, 20.0), i))

        groups = [sessions[i : i + 50] for i in range(0, n, 50)]
        await asyncio.gather(app(), *(feed(k, g) for k, g in enumerate(groups)))
        return sent[0]

    def settle(self, deadline: float) -> None:
        while time.monotonic() < deadline and self.intents.settled() < self.intents.created:
            time.sleep(0.1)

    def gate_ms(self) -> list[float] | None:
        return None

    def close(self) -> None:
        async def shut() -> None:
            for s in self.sessions:
                try:
                    await s.close()
                except Exception:
                    pass
            for p in self.pumps:
                p.cancel()
            await asyncio.gather(*self.pumps, return_exceptions=True)

        try:
            self._run(shut(), 60.0)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5.0)


class Rhythm:
    """:class:`bench_scale.Feeder`'s per-session phases and speech/silence rhythm, for an asyncio feeder."""

    def __init__(self, k: int, n: int, seed: int) -> None:
        rng = self._rng = random.Random(f"{seed}|feeder|{k}")
        self.speech = C.speech_pcm(CHUNK_MS)
        self.silence = C.silence_pcm(CHUNK_MS)
        self.phase = [[rng.randint(1, 20), False] for _ in range(n)]
        self.slots: list[list[int]] = [[] for _ in range(Feeder._SLOTS)]
        for i in range(n):
            self.slots[rng.randrange(Feeder._SLOTS)].append(i)

    def next_chunk(self, i: int) -> bytes:
        ph = self.phase[i]
        ph[0] -= 1
        if ph[0] <= 0:
            ph[1] = not ph[1]
            ph[0] = self._rng.randint(5, 15) if ph[1] else self._rng.randint(30, 60)
        return self.speech if ph[1] else self.silence


def warm_imports(client: str) -> None:
    """Import the client's modules before the first RSS reading: memory per session excludes code."""
    if client == "rtqueue":
        import rtqueue.audio  # noqa: F401
        from rtqueue import Session  # noqa: F401
    elif client == "openai":
        import openai
        import websockets.sync.client  # noqa: F401
        from openai.resources.realtime import realtime  # noqa: F401

        assert openai.OpenAI is not None
    else:
        import agents.realtime  # noqa: F401
        from agents.realtime.model_inputs import RealtimeModelSendRawMessage  # noqa: F401


PEERS = {"rtqueue": RtqueuePeer, "openai-agents": AgentsPeer, "openai": OpenAIPeer}


def _thread_workload(peer: Any, n: int, seed: int, stop_at: float) -> int:
    """Feeder threads (one per 50 sessions, as bench_scale) and the app timer on this thread."""
    stop = threading.Event()
    targets = peer.mic_targets()
    feeders = [Feeder(k, targets[i : i + 50], seed, stop) for k, i in enumerate(range(0, n, 50))]
    for f in feeders:
        f.thread.start()
    rng = random.Random(f"{seed}|app")
    due = [(time.monotonic() + rng.uniform(1.0, 15.0), i) for i in range(n)]
    heapq.heapify(due)
    while time.monotonic() < stop_at:
        wait = min(due[0][0], stop_at) - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        now = time.monotonic()
        while due and due[0][0] <= now and now < stop_at:
            _, i = heapq.heappop(due)
            peer.create(i, f"app:{i}:{peer.intents.created}")
            heapq.heappush(due, (now + rng.uniform(10.0, 20.0), i))
    stop.set()
    for f in feeders:
        f.thread.join(5.0)
    return sum(f.sent for f in feeders)


def run(client: str, url: str, n: int, seconds: float, seed: int) -> dict[str, Any]:
    warm_imports(client)
    meter = Meter()
    peer = PEERS[client](meter)
    threads0 = threading.active_count()
    rss0 = C.rss_mb()
    t_conn = time.monotonic()
    peer.open(url, n)
    connect_s = time.monotonic() - t_conn
    threads1 = threading.active_count()
    rss: list[float] = []
    window: dict[str, float] = {}
    stop_at = time.monotonic() + WARMUP_S + seconds

    gc_pauses = C.GcPauses()

    def measure() -> None:
        # The steady window: from the end of the warm-up to the end of the workload.
        time.sleep(WARMUP_S)
        gc_pauses.on = meter.on = True
        window["cpu0"], window["t0"] = time.process_time(), time.monotonic()
        while time.monotonic() < stop_at:
            time.sleep(0.5)
            rss.append(C.rss_mb())
        window["cpu1"], window["t1"] = time.process_time(), time.monotonic()
        meter.on = False
        gc_pauses.close()

    sampler = threading.Thread(target=measure, name="bench-measure", daemon=True)
    sampler.start()
    if isinstance(peer, AgentsPeer):
        chunks = peer.run_workload(WARMUP_S + seconds, seed, stop_at)
    else:
        chunks = _thread_workload(peer, n, seed, stop_at)
    sampler.join(10.0)
    peer.settle(time.monotonic() + DRAIN_S)
    gate = peer.gate_ms()
    intents = peer.intents
    wall = window["t1"] - window["t0"]
    cpu = window["cpu1"] - window["cpu0"]
    rss_steady = statistics.median(rss) if rss else C.rss_mb()
    jl = C.latency_summary(meter.jitter_ms)
    gl = C.latency_summary(gate)
    out = {
        "client": client,
        "sessions": n,
        "seconds": round(wall, 1),
        "connect_s": round(connect_s, 1),
        "cpu_s": round(cpu, 2),
        "cpu_pct": round(100.0 * cpu / wall, 1),
        "cpu_s_per_session_min": round(cpu / n / (wall / 60.0), 4),
        "rss_before_mb": round(rss0, 1),
        "rss_steady_mb": round(rss_steady, 1),
        "mb_per_session": round((rss_steady - rss0) / n, 3),
        "threads_per_session": round((threads1 - threads0) / n, 2),
        "mic_chunks_sent": chunks,
        "audio_deltas": meter.deltas,
        "audio_s_decoded": round(meter.audio_bytes / 48000.0, 1),
        "jitter_p50_ms": jl["p50"],
        "jitter_p99_ms": jl["p99"],
        "jitter_max_ms": jl["max"],
        "jitter_samples": jl["n"],
        "app_creates": intents.created,
        "app_answered": len(intents.ok),
        "app_refused": len(intents.refused - intents.ok),
        "lost_intents": intents.created - len(intents.ok),
        "gate_p50_ms": gl["p50"],
        "gate_p99_ms": gl["p99"],
        "gate_samples": gl["n"],
        # The cyclic GC stops every thread of the process while it runs (a source of jitter for any client).
        **gc_pauses.summary(),
    }
    peer.close()
    return out


def main(argv: list[str]) -> int:
    client, url, n, seconds, seed = argv[0], argv[1], int(argv[2]), float(argv[3]), int(argv[4])
    if not url.startswith("ws://127.0.0.1:"):
        print("only 127.0.0.1", file=sys.stderr)
        return 2
    result = run(client, url, n, seconds, seed)
    print(json.dumps(result), flush=True)
    os._exit(0)  # do not wait on a client's leftover threads: the figures are out


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
