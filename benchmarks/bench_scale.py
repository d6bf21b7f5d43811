"""Scale: many concurrent rtqueue sessions in one process against one simulator.

    python benchmarks/bench_scale.py [--quick] [--sessions N] [--seconds S] [--aligned] [--out DIR] [--json FILE]
    python benchmarks/bench_scale.py --peers all [--ramp 100,200,400,800] [--seconds S] [--quick]

``--peers``: the same workload with rtqueue, openai-agents and the bare
``openai`` client side by side, each in its own process (``_peers.py`` says
how each is driven and measured) against one simulator, ramping N; results in
``bench_scale_peers.json``. ``--quick`` writes ``*_quick.json`` files, never the
full results.

One process holds N :class:`rtqueue.Session` objects (default 200), all
connected to one simulator running in a second process (the two processes
share this machine's cores). Each session:

- streams microphone audio at real time (100 ms chunks: turns of 0.5-1.5 s of
  speech then 3-6 s of silence, in a per-session random rhythm) through
  ``append_audio``; server VAD with ``create_response`` and
  ``interrupt_response`` answers and barges in;
- gets app responses from a timer (``create_response`` every 10-20 s), which
  the gate must order against the VAD's own responses.

A few feeder threads stand in for the audio callbacks (one per 50 sessions),
each session's chunks at its own phase within the 100 ms period (``--aligned``
sends them all at one instant instead, a worst case), and one timer thread
plays the app. Measured: server-counted conflicts, lost app intents (handles
that failed or never finished), gate latency (``response.done`` read -> next
create written, pooled over all sessions), threads per session, the CPU share
of both processes, and memory: RSS sampled every half second, MB per session
(steady RSS minus the RSS before connecting, divided by N) and growth in MB/min
fitted over the second half of the steady phase. The growth is split into the
conversation history each session keeps for re-seeding (capped at 500 items;
items counted every 5 s, times their measured size) and everything else: the
history grows until its cap by design (a 60 s run is far from it; the plateau
is printed), everything else must not grow.
"""

from __future__ import annotations

import heapq
import os
import random
import re
import statistics
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import _common as C

CHUNK_MS = 100
GATE_P99_TARGET_MS = 5.0


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process from /proc (0.0 where unavailable)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def schedstat(pid: int, kinds: dict[int, str] | None = None) -> dict[str, list[int]] | None:
    """Linux scheduler counters of a process's threads, summed per thread kind.

    Per kind: ``[ns on a CPU, ns runnable but waiting for a CPU, times
    scheduled in]`` from ``/proc/<pid>/task/*/schedstat``. ``kinds`` maps
    native thread ids to kinds (threads not in it count as "other"; without
    it everything is "all"). ``None`` where the kernel does not expose it.
    """
    out: dict[str, list[int]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", encoding="ascii") as f:
                vals = [int(x) for x in f.read().split()[:3]]
        except (OSError, ValueError):
            continue  # the thread ended meanwhile
        kind = "all" if kinds is None else kinds.get(int(tid), "other")
        acc = out.setdefault(kind, [0, 0, 0])
        for i, v in enumerate(vals):
            acc[i] += v
    return out or None


def thread_kinds() -> dict[int, str]:
    """This process's threads by native id: name without its trailing number ("rtqueue-writer")."""
    return {t.native_id: re.sub(r"-\d+$", "", t.name) for t in threading.enumerate() if t.native_id is not None}


def scheduler_pressure(before: dict[str, list[int]] | None, after: dict[str, list[int]] | None,
                       wall_s: float) -> dict[str, dict[str, float]] | None:
    """Per kind (and "total"): CPU %, run-queue wait (% of a CPU), switches in per second, wait per switch.

    Run-queue wait is time a thread was ready to run but no CPU was free: on
    a machine this busy it, not the GIL alone, delays a woken writer.
    """
    if before is None or after is None or wall_s <= 0:
        return None
    out: dict[str, dict[str, float]] = {}
    total = [0, 0, 0]
    for kind, (run, wait, n) in sorted(after.items()):
        b = before.get(kind, [0, 0, 0])
        d = [run - b[0], wait - b[1], n - b[2]]
        total = [x + y for x, y in zip(total, d, strict=True)]
        out[kind] = _pressure(d, wall_s)
    out["total"] = _pressure(total, wall_s)
    return out


def _pressure(d: list[int], wall_s: float) -> dict[str, float]:
    run, wait, n = d
    return {
        "cpu_pct": round(run / wall_s / 1e7, 1),
        "runq_wait_pct": round(wait / wall_s / 1e7, 1),
        "switches_in_per_s": round(n / wall_s),
        "wait_per_switch_us": round(wait / n / 1e3, 1) if n > 0 else 0.0,
    }


def machine_ticks() -> list[int] | None:
    """The whole machine's CPU ticks from /proc/stat: user, nice, system, idle, iowait, irq, softirq, steal."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    return [int(x) for x in fields[1:9]]


def machine_cpu(before: list[int] | None, after: list[int] | None, wall_s: float) -> dict[str, float] | None:
    """The machine's CPU over a window from /proc/stat, in % of one CPU: busy, steal, idle, unaccounted.

    The runs share a machine. "steal" is time the hypervisor reported giving
    this VM's CPUs to someone else; "unaccounted" is what is left of
    100 x CPUs after busy, idle and steal. On an idle machine it is ~0; here
    (a VM that reports no steal) it grows under load, and the likeliest cause
    is timer ticks the guest never saw because its vCPU was not running, that
    is, host contention. Either one makes a run's latency tail suspect.
    """
    if before is None or after is None or wall_s <= 0:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (a - b for a, b in zip(after, before, strict=True))
    hz = os.sysconf("SC_CLK_TCK")

    def pct(ticks: int) -> float:
        return round(100.0 * ticks / hz / wall_s, 1)

    busy, stolen, idle_pct = pct(user + nice + system + irq + softirq), pct(steal), pct(idle + iowait)
    return {
        "busy_pct": busy,
        "steal_pct": stolen,
        "idle_pct": idle_pct,
        "unaccounted_pct": round(100.0 * (os.cpu_count() or 1) - busy - stolen - idle_pct, 1),
    }


def slope_per_min(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, per minute (``None`` under 4 points)."""
    if len(points) < 4:
        return None
    xs, ys = [t for t, _ in points], [v for _, v in points]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    cov = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    return 60.0 * cov / den if den else None


# Per-session state that grows by design until its cap: how to reach it, and the cap.
# Per-session state that grows by design until its cap (Session.stores(): name -> (container, cap)):
# history (conversation items kept for re-seeding), recent_responses (Responses for cancel()/interrupt()
# waiters), done_ids (response ids whose done was read), handled_calls (call ids run once), server_errors
# (error replies by client event id), gate_samples (percentile reservoirs).


def _stores(sessions: list[Any]) -> dict[str, tuple[list[Any], int]]:
    """Each store's containers over ``sessions`` and its per-session cap."""
    out: dict[str, tuple[list[Any], int]] = {}
    for s in sessions:
        for name, (holder, cap) in s.stores().items():
            out.setdefault(name, ([], cap))[0].append(holder)
    return out


def _entries(holder: Any) -> int:
    return sum(len(h) for h in holder) if isinstance(holder, tuple) else len(holder)


def store_counts(sessions: list[Any]) -> dict[str, int]:
    """Entries in each capped store, summed over ``sessions`` (cheap: lengths only)."""
    return {name: sum(_entries(h) for h in holders) for name, (holders, _) in _stores(sessions).items()}


def _marginal_bytes(holder: Any) -> int:
    """Bytes the entries of a store add: its deep size minus an empty store's of the same type."""
    if isinstance(holder, tuple):
        return sum(_marginal_bytes(h) for h in holder)
    empty = type(holder)(maxlen=holder.maxlen) if isinstance(holder, deque) else type(holder)()
    return C.deep_size(holder) - C.deep_size(empty)


def store_entry_bytes(sessions: list[Any]) -> dict[str, float]:
    """Mean bytes per entry of each capped store, measured on ``sessions``."""
    out: dict[str, float] = {}
    for name, (holders, _) in _stores(sessions).items():
        entries = sum(_entries(h) for h in holders)
        out[name] = sum(_marginal_bytes(h) for h in holders) / entries if entries else 0.0
    return out


class Feeder:
    """One thread feeding real-time mic audio to a group of sessions, 100 ms at a time.

    Each session gets its own phase within the 100 ms period (as separate
    calls' audio callbacks would, each on its own device or network clock),
    so the chunks are spread over the period in ``_SLOTS`` slots instead of
    arriving for all sessions at one instant. ``aligned=True`` sends every
    session's chunk at the same instant instead (a worst case no real set of
    independent streams produces; kept to measure it).
    """

    _SLOTS = 20

    def __init__(self, k: int, sessions: list[Any], seed: int, stop: threading.Event, *,
                 aligned: bool = False) -> None:
        self._sessions = sessions
        self._stop = stop
        self._rng = random.Random(f"{seed}|feeder|{k}")
        self._speech = C.speech_pcm(CHUNK_MS)
        self._silence = C.silence_pcm(CHUNK_MS)
        # per session: chunks left in the current phase, and whether it is speech
        self._phase = [[self._rng.randint(1, 20), False] for _ in sessions]
        slots = 1 if aligned else self._SLOTS
        self._slots: list[list[int]] = [[] for _ in range(slots)]
        for i in range(len(sessions)):
            self._slots[self._rng.randrange(slots)].append(i)
        self.sent = 0
        self.late = 0
        self.thread = threading.Thread(target=self._run, name=f"bench-feeder-{k}", daemon=True)

    def _run(self) -> None:
        tick = CHUNK_MS / 1000.0 / len(self._slots)
        t_next = time.monotonic()
        slot = 0
        while not self._stop.is_set():
            for i in self._slots[slot]:
                ph = self._phase[i]
                ph[0] -= 1
                if ph[0] <= 0:
                    ph[1] = not ph[1]
                    # a turn: 0.5-1.5 s of speech, then 3-6 s of silence (the answer plays meanwhile)
                    ph[0] = self._rng.randint(5, 15) if ph[1] else self._rng.randint(30, 60)
                self._sessions[i].append_audio(self._speech if ph[1] else self._silence)
                self.sent += 1
            slot = (slot + 1) % len(self._slots)
            t_next += tick
            delay = t_next - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
            else:
                self.late += 1


class AppIntents:
    """The app's ``create_response`` handles: outcomes tallied as they finish.

    Only unfinished handles are kept, so the benchmark's own bookkeeping does
    not grow with the run and blur the memory figure (a finished handle holds
    its whole :class:`~rtqueue.Response`).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[int, Any] = {}
        self.created = 0
        self.ok = 0
        self.failed = 0
        self.rejected = 0

    def add(self, handle: Any) -> None:
        with self._lock:
            self._pending[id(handle)] = handle
            self.created += 1
        handle.add_done_callback(self.finished)

    def finished(self, handle: Any) -> None:
        """Tally a finished handle (idempotent)."""
        with self._lock:
            if self._pending.pop(id(handle), None) is None:
                return
            if handle.error is None:
                self.ok += 1
            else:
                self.failed += 1
                self.rejected += type(handle.error).__name__ == "ResponseRejected"

    def pending(self) -> list[Any]:
        with self._lock:
            return list(self._pending.values())


def main(argv: list[str] | None = None) -> int:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--sessions", type=int, default=None)
    p.add_argument("--seconds", type=float, default=None,
                   help="steady-state duration (default 180 s: ~1500 gated creates for a stable p99)")
    p.add_argument("--latency-ms", type=float, default=0.0, help="one-way simulated latency")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--switch-interval-ms", type=float, default=None,
                   help="set this process's sys.setswitchinterval (CPython's default is 5 ms), a deployment "
                        "knob for many threads: how long a woken thread may wait for the GIL before asking for it")
    p.add_argument("--aligned", action="store_true",
                   help="send every session's mic chunk at the same instant (worst case) instead of "
                        "at per-session phases")
    p.add_argument("--gate-slice-ms", type=float, default=None,
                   help="experiment: override the writer's gate wait slice (rtqueue's default is 50 ms)")
    p.add_argument("--peers", metavar="CLIENTS", default=None,
                   help="side by side: run the workload with each client in its own process against one "
                        "simulator, ramping the session count: 'all' or a comma list of "
                        + ", ".join(PEER_CLIENTS))
    p.add_argument("--ramp", default=None, help="with --peers: session counts to try, in order (default "
                   "100,150,200,300,400,600,800; a client leaves the ramp at the first count it does not "
                   f"hold, once past {PEER_COMPARE_AT}, where the ratios are taken)")
    p.add_argument("--budget-min", type=float, default=20.0,
                   help="with --peers: stop starting new steps after this many minutes")
    ns = p.parse_args(argv)
    if ns.peers:
        return peers_main(ns)
    n = ns.sessions or (20 if ns.quick else 200)
    seconds = ns.seconds or (6.0 if ns.quick else 180.0)
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)

    from rtqueue import Session

    if ns.switch_interval_ms is not None:
        sys.setswitchinterval(ns.switch_interval_ms / 1000.0)

    rss: list[tuple[float, float]] = []
    stop_sampling = threading.Event()
    t0 = time.monotonic()

    def sample() -> None:
        while not stop_sampling.wait(0.5):
            rss.append((time.monotonic() - t0, C.rss_mb()))

    sampler = threading.Thread(target=sample, name="bench-rss", daemon=True)
    sampler.start()
    threads_before = threading.active_count()
    rss_before = C.rss_mb()
    sessions: list[Any] = []
    intents = AppIntents()
    stop = threading.Event()
    result: dict[str, Any] = {}
    with C.SimProcess(latency_ms=ns.latency_ms, speed=1.0, seed=ns.seed, record=False) as sim:
        C.progress(f"connecting {n} sessions to {sim.url} ...")
        t_conn = time.monotonic()

        def connect(i: int) -> Any:
            return Session.connect(sim.url, api_key="sk-bench", turn_detection="server_vad", reconnect=False,
                                   name=f"scale-{i}", connect_timeout=60.0)

        with ThreadPoolExecutor(8, thread_name_prefix="bench-connect") as pool:
            sessions = list(pool.map(connect, range(n)))
        connect_s = time.monotonic() - t_conn
        if ns.gate_slice_ms is not None:
            for s in sessions:
                s.writer.slice_s = ns.gate_slice_ms / 1000.0
        rss_connected = C.rss_mb()
        threads_after = threading.active_count()
        per_session_threads = statistics.mean(len(s.threads()) for s in sessions)
        C.progress(f"  connected in {connect_s:.1f} s; RSS {rss_before:.0f} -> {rss_connected:.0f} MB; "
                   f"threads +{threads_after - threads_before}")
        feeders = [Feeder(k, sessions[i : i + 50], ns.seed, stop, aligned=ns.aligned)
                   for k, i in enumerate(range(0, n, 50))]
        rng = random.Random(f"{ns.seed}|app")
        cpu0, sim_cpu0, t_steady = time.process_time(), proc_cpu_s(sim.pid), time.monotonic()
        for f in feeders:
            f.thread.start()
        kinds = thread_kinds()
        sched0 = (schedstat(os.getpid(), kinds), schedstat(sim.pid), time.monotonic())
        ticks0 = machine_ticks()
        steady_from = time.monotonic() - t0
        # The app: a timer per session, all on this thread (a heap of due times).
        due = [(time.monotonic() + rng.uniform(1.0, 15.0), i) for i in range(n)]
        heapq.heapify(due)
        end = time.monotonic() + seconds
        next_report = time.monotonic() + 5.0
        counts: list[tuple[float, dict[str, int]]] = [(steady_from, store_counts(sessions))]
        while time.monotonic() < end:
            t_due, i = due[0]
            wait = min(t_due, end, next_report) - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            now = time.monotonic()
            while due and due[0][0] <= now:
                _, i = heapq.heappop(due)
                intents.add(sessions[i].create_response(metadata={"bench_intent": f"app:{i}:{intents.created}"}))
                heapq.heappush(due, (now + rng.uniform(10.0, 20.0), i))
            if now >= next_report:
                next_report += 5.0
                # counters only: stats() sorts each gate's samples for percentiles, and 200 of
                # those on this thread would stall everyone else's GIL for a few ms
                done = sum(s.gate.counts()["done"] for s in sessions)
                retried = sum(s.gate.counts()["retried"] for s in sessions)
                counts.append((now - t0, store_counts(sessions)))
                C.progress(f"  t={now - t_steady:5.1f}s RSS {C.rss_mb():.0f} MB, responses done {done}, "
                           f"server races retried {retried}, app creates {intents.created}")
        sched1 = (schedstat(os.getpid(), kinds), schedstat(sim.pid), time.monotonic())
        ticks1 = machine_ticks()
        stop.set()
        for f in feeders:
            f.thread.join(5.0)
        steady_to = time.monotonic() - t0
        counts.append((steady_to, store_counts(sessions)))
        cpu = time.process_time() - cpu0
        sim_cpu = proc_cpu_s(sim.pid) - sim_cpu0
        wall = time.monotonic() - t_steady
        C.progress("draining: waiting for app responses to finish ...")
        deadline = time.monotonic() + 120.0
        for h in intents.pending():
            try:
                h.wait(max(0.0, deadline - time.monotonic()))
            except Exception:
                pass
        stats = sim.stats()
        # what each entry of the capped stores weighs, from a sample of sessions
        entry_bytes = store_entry_bytes(sessions[: min(20, n)])
        lat = [x for s in sessions for x in s.gate.latencies_ms()]
        gstats = [s.gate.counts() for s in sessions]
        for h in intents.pending():  # done, but its callback (on a dispatcher) not run yet
            if h.done():
                intents.finished(h)
        unfinished = intents.pending()
        for s in sessions:
            s.close()
        stop_sampling.set()
        sampler.join(2.0)
        threads_left = threading.active_count() - threads_before
        half = steady_from + (steady_to - steady_from) / 2  # fits use the second half (the first warms up)
        steady = [m for t, m in rss if half <= t <= steady_to]
        growth = slope_per_min([(t, m) for t, m in rss if half <= t <= steady_to])
        stores: dict[str, dict[str, Any]] = {}
        for name, (_, cap) in _stores(sessions[:1]).items():
            per_min = slope_per_min([(t, float(c[name])) for t, c in counts if half <= t <= steady_to])
            stores[name] = {
                "entries_per_session": round(counts[-1][1][name] / n, 1),
                "cap_per_session": cap,
                "bytes_per_entry": round(entry_bytes[name]),
                "growth_mb_per_min": None if per_min is None else round(per_min * entry_bytes[name] / 2**20, 3),
                "plateau_mb": round(cap * entry_bytes[name] * n / 2**20, 1),
            }
        store_growth = sum(v["growth_mb_per_min"] or 0.0 for v in stores.values())
        other_growth = None if growth is None else growth - store_growth
        rss_steady = statistics.median(steady) if steady else C.rss_mb()
        gl = C.latency_summary(lat)
        result = {
            "sessions": n,
            "switch_interval_ms": round(sys.getswitchinterval() * 1000.0, 3),
            "mic_phases": "aligned" if ns.aligned else "per-session",
            "seconds": round(wall, 1),
            "latency_ms_one_way": ns.latency_ms,
            "connect_s": round(connect_s, 2),
            "server_responses": stats["responses"],
            "server_cancelled": stats["cancelled"],
            "vad_speech_started": stats["vad_speech_started"],
            "app_creates": intents.created,
            "creates_on_wire": stats["client_events"].get("response.create", 0),
            "conflicts": stats["conflicts"],
            "conflicts_retried": sum(g["retried"] for g in gstats),
            "user_visible_conflicts": intents.rejected,
            "lost_intents": intents.failed + len(unfinished),
            "cancel_not_active": stats["cancel_not_active"],
            "truncate_errors": stats["truncate_errors"],
            "server_errors": stats["errors"],
            "gate_p50_ms": gl["p50"],
            "gate_p99_ms": gl["p99"],
            "gate_max_ms": gl["max"],
            "gate_samples": gl["n"],
            "rss_before_mb": round(rss_before, 1),
            "rss_connected_mb": round(rss_connected, 1),
            "rss_steady_mb": round(rss_steady, 1),
            "mb_per_session": round((rss_steady - rss_before) / n, 3),
            "rss_growth_mb_per_min": None if growth is None else round(growth, 2),
            "capped_stores": stores,
            "capped_growth_mb_per_min": round(store_growth, 2),
            "capped_plateau_mb": round(sum(v["plateau_mb"] for v in stores.values()), 1),
            "other_growth_mb_per_min": None if other_growth is None else round(other_growth, 2),
            "threads_per_session": round((threads_after - threads_before) / n, 2),
            "session_threads_per_session": round(per_session_threads, 2),
            "threads_left_after_close": threads_left,
            "client_cpu_pct": round(100.0 * cpu / wall, 1),
            "sim_cpu_pct": round(100.0 * sim_cpu / wall, 1),
            "mic_chunks_sent": sum(f.sent for f in feeders),
            "mic_audio_s_per_session": round(sum(f.sent for f in feeders) * CHUNK_MS / 1000.0 / n, 1),
            "feeder_late_ticks": sum(f.late for f in feeders),
            "audio_dropped": sum(s.writer.audio_dropped for s in sessions),
            "scheduler": {
                "client": scheduler_pressure(sched0[0], sched1[0], sched1[2] - sched0[2]),
                "sim": scheduler_pressure(sched0[1], sched1[1], sched1[2] - sched0[2]),
            },
        }
        result["machine_cpu"] = machine_cpu(ticks0, ticks1, sched1[2] - sched0[2])
    checks: list[tuple[str, bool, str]] = [
        ("0 user-visible conflicts", result["user_visible_conflicts"] == 0,
         f"visible={result['user_visible_conflicts']} (server races retried: {result['conflicts_retried']})"),
        ("0 lost intents", result["lost_intents"] == 0, f"lost={result['lost_intents']}"),
        (f"gate p99 <= {GATE_P99_TARGET_MS:g} ms", result["gate_p99_ms"] is not None
         and result["gate_p99_ms"] <= GATE_P99_TARGET_MS, f"p99={C.fmt(result['gate_p99_ms'], 3)} ms "
         f"over {result['gate_samples']} gated creates"),
    ]
    if not ns.quick:  # a few seconds are all warm-up: no verdict on memory then
        hist = result["capped_stores"]["history"]
        checks.append((
            "steady memory (RSS growth besides the capped per-session stores < 1 MB/min per 100 sessions)",
            result["other_growth_mb_per_min"] is not None and result["other_growth_mb_per_min"] < n / 100.0,
            f"RSS {result['rss_growth_mb_per_min']} MB/min = capped stores {result['capped_growth_mb_per_min']} "
            f"(history {hist['entries_per_session']} of {hist['cap_per_session']} items/session, "
            f"{hist['bytes_per_entry']} B each; all stores full: {result['capped_plateau_mb']} MB) "
            f"+ other {result['other_growth_mb_per_min']}; {result['mb_per_session']} MB/session",
        ))
    doc = {
        "benchmark": "scale",
        "machine": C.machine(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "quick": ns.quick,
        "targets": [{"target": name, "pass": ok, "detail": d} for name, ok, d in checks],
        "results": [result],
        "rss_samples": [(round(t, 2), round(m, 1)) for t, m in rss],
        "gate_latencies_ms": [round(x, 4) for x in lat],
    }
    written = C.write_json(doc, out / ("bench_scale_quick.json" if ns.quick else "bench_scale.json"), ns.json)
    plt = C.pyplot()
    if plt is not None:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4))
        a1.plot([t for t, _ in rss], [m for _, m in rss])
        a1.axvspan(steady_from, steady_to, alpha=0.15, label="steady (mic + app)")
        a1.set_xlabel("seconds")
        a1.set_ylabel("RSS MB")
        a1.set_title(f"memory, {n} sessions")
        a1.legend()
        if lat:
            vals = sorted(lat)
            a2.step([max(v, 1e-3) for v in vals], [(i + 1) / len(vals) for i in range(len(vals))], where="post")
            a2.axvline(GATE_P99_TARGET_MS, color="red", linestyle="--", label="p99 target")
            a2.set_xscale("log")
            a2.legend()
        a2.set_xlabel("gate latency ms")
        a2.set_title("gate latency CDF (all sessions)")
        fig.tight_layout()
        path = out / "scale.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    print()
    print(C.table([result], [("sessions", "sessions"), ("seconds", "s"), ("server_responses", "responses"),
                             ("app_creates", "app creates"), ("conflicts", "conflicts"),
                             ("user_visible_conflicts", "visible"), ("lost_intents", "lost"),
                             ("gate_p50_ms", "gate p50 ms"), ("gate_p99_ms", "gate p99 ms"),
                             ("mb_per_session", "MB/session"), ("rss_growth_mb_per_min", "RSS MB/min"),
                             ("threads_per_session", "threads/session"), ("client_cpu_pct", "client CPU %"),
                             ("sim_cpu_pct", "sim CPU %")], nd=3))
    sched = C.scheduler_table(result["scheduler"])
    if sched is not None:
        print("\nscheduler pressure over the steady phase (Linux schedstat; run-queue wait = ready, no free CPU):")
        print(sched)
    mach = result["machine_cpu"]
    if mach is not None:
        print(f"\nmachine over the steady phase (/proc/stat, % of one CPU, {os.cpu_count()} CPUs): "
              f"{C.machine_cpu_text(mach)}")
    print()
    for name, ok, detail in checks:
        print(f"{'PASS' if ok else 'FAIL'}  rtqueue scale: {name}  [{detail}]")
    print("\nwrote " + ", ".join(written))
    return 0 if all(ok for _, ok, _ in checks) else 1


# -- side by side: rtqueue, openai-agents and the bare openai client (--peers) ---------------------------

PEER_CLIENTS = ("rtqueue", "openai-agents", "openai")
PEER_JITTER_P99_MS = 20.0  # a step is "held" with audio-delta jitter p99 at most this ...
PEER_COMPARE_AT = 200  # ... and gate p99 <= GATE_P99_TARGET_MS (rtqueue); ratios are taken at this count


def _peer_available(client: str) -> str | None:
    """``None`` when the client's package imports, else why not."""
    try:
        if client == "openai-agents":
            import agents.realtime  # noqa: F401
        elif client == "openai":
            import openai  # noqa: F401
            import websockets.sync.client  # noqa: F401
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _run_peer(sim: Any, client: str, n: int, seconds: float, seed: int) -> dict[str, Any]:
    """One step: ``client`` with ``n`` sessions in a child process (``_peers.py``); the server's counts around it."""
    import json
    import subprocess

    sim.wait_quiet(15.0)  # the previous step's responses have ended
    sim.call("audio_late", reset=True)
    s0, cpu0, t0 = sim.stats(), proc_cpu_s(sim.pid), time.monotonic()
    env = {**os.environ, "PYTHONPATH": str(C.ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, str(C.HERE / "_peers.py"), client, sim.url, str(n), str(seconds), str(seed)],
                          capture_output=True, text=True, timeout=seconds + 900, env=env)
    s1, cpu1, wall = sim.stats(), proc_cpu_s(sim.pid), time.monotonic() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    row: dict[str, Any] = json.loads(lines[-1]) if lines else {
        "client": client, "sessions": n, "error": (proc.stderr or proc.stdout)[-2000:]}
    for key in ("responses", "conflicts", "cancel_not_active", "truncate_errors"):
        row["server_" + key] = s1[key] - s0[key]
    row["sim_cpu_pct"] = round(100.0 * (cpu1 - cpu0) / wall, 1)  # over the whole step (connect to close)
    # The simulator's own lateness: a delta that left late reaches any client late (the jitter bar
    # then measures the simulator, whichever client runs).
    late = sim.call("audio_late")
    row["sim_late_p50_ms"], row["sim_late_p99_ms"] = late.get("p50"), late.get("p99")
    jit, gate = row.get("jitter_p99_ms"), row.get("gate_p99_ms")
    row["held"] = (jit is not None and jit <= PEER_JITTER_P99_MS
                   and (gate is None or gate <= GATE_P99_TARGET_MS) and "error" not in row)
    return row


def peers_main(ns: Any) -> int:
    """``--peers``: the same workload with each client in turn, ramping N; ratios at PEER_COMPARE_AT."""
    clients = list(PEER_CLIENTS) if ns.peers == "all" else [c.strip() for c in ns.peers.split(",") if c.strip()]
    unknown = [c for c in clients if c not in PEER_CLIENTS]
    if unknown:
        raise SystemExit(f"unknown clients {unknown}; choose from {PEER_CLIENTS}")
    skipped = {c: why for c in clients if (why := _peer_available(c)) is not None}
    clients = [c for c in clients if c not in skipped]
    ramp = [int(x) for x in (ns.ramp or ("8,16" if ns.quick else "100,150,200,300,400,600,800")).split(",")]
    seconds = ns.seconds or (5.0 if ns.quick else 45.0)
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    alive = set(clients)
    t_start = time.monotonic()
    with C.SimProcess(latency_ms=ns.latency_ms, speed=1.0, seed=ns.seed, record=False) as sim:
        for step, n in enumerate(ramp):
            k = step % max(1, len(clients))
            for client in clients[k:] + clients[:k]:  # rotated: no client always runs first after a ramp-up
                if client not in alive:
                    continue
                if time.monotonic() - t_start > ns.budget_min * 60.0:
                    C.progress(f"  budget of {ns.budget_min:g} min spent: no more steps")
                    alive.clear()
                    break
                C.progress(f"{client}: {n} sessions, {seconds:g} s steady ...")
                row = _run_peer(sim, client, n, seconds, ns.seed)
                rows.append(row)
                C.progress(f"  {client} x{n}: CPU {row.get('cpu_s_per_session_min')} s/session-min, "
                           f"{row.get('mb_per_session')} MB/session, jitter p99 {C.fmt(row.get('jitter_p99_ms'))} ms, "
                           f"gate p99 {C.fmt(row.get('gate_p99_ms'))} ms, lost {row.get('lost_intents')}"
                           f"{'' if row['held'] else '  -> not held'}"
                           f"{' ERROR ' + row['error'][-300:] if 'error' in row else ''}")
                # A client leaves the ramp at its first count not held, but not before the count the
                # ratios are taken at: every client is measured there.
                if not row["held"] and n >= PEER_COMPARE_AT:
                    alive.discard(client)
    def held_up_to(client: str) -> int | None:
        """The largest count held with every smaller count tried also held (a later lucky step does not count)."""
        best = None
        for r in sorted((r for r in rows if r["client"] == client), key=lambda r: r["sessions"]):
            if not r["held"]:
                break
            best = r["sessions"]
        return best

    largest = {c: held_up_to(c) for c in clients}
    top = {c: max((r["sessions"] for r in rows if r["client"] == c), default=None) for c in clients}

    def at(client: str, n: int) -> dict[str, Any] | None:
        return next((r for r in rows if r["client"] == client and r["sessions"] == n and "error" not in r), None)

    def ratio(a: Any, b: Any) -> float | None:
        return round(a / b, 3) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None

    cmp_n = PEER_COMPARE_AT if PEER_COMPARE_AT in ramp else ramp[min(1, len(ramp) - 1)]
    mine, peer = at("rtqueue", cmp_n), at("openai-agents", cmp_n)
    summary = {
        "compare_at_sessions": cmp_n,
        "largest_n_held": largest,
        "cpu_ratio_rtqueue_vs_agents": ratio(mine and mine["cpu_s_per_session_min"],
                                             peer and peer["cpu_s_per_session_min"]),
        "mem_ratio_rtqueue_vs_agents": ratio(mine and mine["mb_per_session"], peer and peer["mb_per_session"]),
        "largest_n_ratio_rtqueue_vs_agents": ratio(largest.get("rtqueue"), largest.get("openai-agents")),
        # Both held the last count tried: the ratio is a lower bound of what each could hold.
        "ramp_capped": {c: largest.get(c) is not None and largest.get(c) == top.get(c) for c in clients},
        "skipped": skipped,
    }
    checks: list[tuple[str, bool, str]] = []
    mine_rows = [r for r in rows if r["client"] == "rtqueue" and "error" not in r]
    if mine_rows:
        lost = sum(r["lost_intents"] for r in mine_rows)
        checks.append(("rtqueue: 0 lost intents at every step", lost == 0, f"lost={lost}"))
    if mine is not None and peer is not None:
        cr, mr = summary["cpu_ratio_rtqueue_vs_agents"], summary["mem_ratio_rtqueue_vs_agents"]
        checks.append((f"rtqueue CPU per session-minute <= 0.8x openai-agents' at {cmp_n} sessions",
                       cr is not None and cr <= 0.8, f"{mine['cpu_s_per_session_min']} vs "
                       f"{peer['cpu_s_per_session_min']} CPU-s per session-minute = {cr}x"))
        checks.append((f"rtqueue memory per session <= 1.5x openai-agents' at {cmp_n} sessions",
                       mr is not None and mr <= 1.5,
                       f"{mine['mb_per_session']} vs {peer['mb_per_session']} MB = {mr}x"))
    if "rtqueue" in largest and "openai-agents" in largest:
        lr = summary["largest_n_ratio_rtqueue_vs_agents"]
        capped = summary["ramp_capped"].get("rtqueue") and summary["ramp_capped"].get("openai-agents")
        checks.append(("rtqueue's largest N >= 1.25x openai-agents'", lr is not None and lr >= 1.25,
                       f"{largest['rtqueue']} vs {largest['openai-agents']} = {lr}x"
                       + (" (both held the ramp's last count: not decided)" if capped else "")))
    doc = {
        "benchmark": "scale_peers",
        "machine": C.machine(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "quick": ns.quick,
        "workload": {"seconds_steady": seconds, "ramp": ramp, "jitter_p99_target_ms": PEER_JITTER_P99_MS,
                     "gate_p99_target_ms": GATE_P99_TARGET_MS, "seed": ns.seed},
        "targets": [{"target": name, "pass": ok, "detail": d} for name, ok, d in checks],
        "summary": summary,
        "results": rows,
    }
    name = "bench_scale_peers_quick.json" if ns.quick else "bench_scale_peers.json"
    written = C.write_json(doc, out / name, ns.json)
    print()
    print(C.table(rows, PEER_COLUMNS, nd=3))
    print(f"\nlargest N held (jitter p99 <= {PEER_JITTER_P99_MS:g} ms, gate p99 <= {GATE_P99_TARGET_MS:g} ms): "
          + ", ".join(f"{c} {largest[c]}" for c in clients))
    for c, why in skipped.items():
        print(f"skipped {c}: {why}")
    print()
    for cname, ok, detail in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {cname}  [{detail}]")
    print("\nwrote " + ", ".join(written))
    return 0 if all(ok for _, ok, _ in checks) else 1


PEER_COLUMNS = [("client", "client"), ("sessions", "sessions"), ("cpu_s_per_session_min", "CPU s/session-min"),
                ("cpu_pct", "client CPU %"), ("mb_per_session", "MB/session"),
                ("threads_per_session", "threads/session"), ("jitter_p50_ms", "jitter p50 ms"),
                ("jitter_p99_ms", "jitter p99 ms"), ("gate_p99_ms", "gate p99 ms"), ("app_creates", "app creates"),
                ("lost_intents", "lost"), ("server_conflicts", "server conflicts"), ("sim_cpu_pct", "sim CPU %"),
                ("sim_late_p99_ms", "sim late p99 ms"), ("gc_max_ms", "GC max pause ms"),
                ("held", "held")]


if __name__ == "__main__":
    sys.exit(main())
