"""Conflicts, lost intents, cancel/truncate errors, gate latency and CPU: five clients, four workloads.

    python benchmarks/bench_conflicts.py [--quick] [--out DIR] [--json FILE]

Strategies: ``naive``, ``flag``, ``poll`` (small real clients over
websocket-client, see ``_clients.py``), ``rtqueue`` (its ``Session``) and
``openai-agents`` (the official SDK's asyncio realtime session), each on the
same workload script (same seed), against the same simulator build, at 0 and
40 ms round-trip latency. The simulator runs in its own process; every count
of conflicts and errors is the simulator's own.

Workloads:

- ``handoff``: N user turns each asking to be put through to another of four
  agents; the agent answering speaks *and* calls the handoff tool; the client
  sends the output, the new agent's ``session.update`` and a follow-up. The
  app sends the next turn after a random 2-8 s (model time; a turn's chain
  lasts about 5 s), without waiting for the chain: turns, handoffs and
  follow-ups overlap.
- ``tools``: turns asking for 1-4 tools in one response (parallel calls);
  each tool takes 0-50 ms; a turn ends when its chain is done.
- ``bargein``: server VAD with ``interrupt_response``; the user speaks, the
  server answers; in half the turns the user speaks again at a random point
  of the answer, and the app asks for a response right after the interruption.
- ``app_vs_vad``: the user keeps talking (server-VAD auto responses) while the
  app asks for responses from a timer.
- ``guardrails`` (not in the default set: ``--workloads guardrails``; rtqueue
  and openai-agents only, the baselines have no guardrails): four agents
  with tools and handoffs and one output guardrail (``_clients.guard_tripped``:
  the word "refund" in the assistant's words, checked every 20 characters by
  both SDKs). Each turn is a plain question, a 1-3 tool request or a handoff;
  in about half of them the assistant's words hold the word at a random
  point: in the answer, in the words said before the tool calls (the trip
  races the calls, the tools and their follow-up), or in the new agent's
  answer after a handoff. A turn ends when everything is quiet. Figures per
  1000 trips (each SDK counts its own trips): **lost corrections** (a trip
  whose correction message was never sent, or never answered by a response
  before the next turn) and **duplicate corrections** (more correction
  messages than trips, or a second response answering a correction with
  nothing new in between), from the simulator's logs
  (``_common.guard_tally``). Written to ``bench_conflicts_guardrails.json``
  (``_quick`` with ``--quick``), never into the other workloads' file.

Figures per row: creates on the wire; server-counted
``conversation_already_has_active_response`` per 1000 creates; user-visible
conflicts (never retried); lost intents (asked for, never produced a response);
duplicates (more than one response for one intent); ``response_cancel_not_active``;
truncate errors; gate latency (``response.done`` read -> next
``response.create`` written, for creates that had to wait); client CPU per
response: the benchmark process's CPU time (``time.process_time``, user+sys,
all threads) over the run divided by the responses the server created; the
process holds only the client under test, the workload driver and the mic
feeder, because the simulator runs in another process.
"""

from __future__ import annotations

import random
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _common as C
from _clients import GUARD_WORD, AgentsClient, Spec, agents_available, make_client, warm_imports

STRATEGIES = ("naive", "flag", "poll", "rtqueue", "openai-agents")
WORKLOADS = ("handoff", "tools", "bargein", "app_vs_vad")
EXTRA_WORKLOADS = ("guardrails",)  # run only when named: --workloads guardrails
GUARDED = ("rtqueue", "openai-agents")  # the strategies that have output guardrails
AGENTS = ("front", "billing", "sales", "support")
TOOLS = ("get_weather", "get_time", "lookup_order", "get_stock")

FULL = {"handoff": 200, "tools": 100, "bargein": 60, "app_vs_vad": 150, "guardrails": 300, "speed": 20.0}
QUICK = {"handoff": 6, "tools": 4, "bargein": 4, "app_vs_vad": 6, "guardrails": 8, "speed": 20.0}
ROUND_TIMEOUT = 30.0
DRAIN_TIMEOUT = 300.0  # after the script: everything asked for must be answered (or the row says drained=False)


class Mic:
    """The user's microphone: plays PCM jobs into ``client.push_audio`` at ``speed`` x real time."""

    CHUNK_MS = 100

    def __init__(self, client: Any, speed: float) -> None:
        self._client = client
        self._speed = speed
        self._cond = threading.Condition()
        self._jobs: list[bytes] = []
        self._busy = False
        self._stop = False
        self.errors = 0
        self._thread = threading.Thread(target=self._run, name="bench-mic", daemon=True)
        self._thread.start()

    def say(self, pcm: bytes) -> None:
        with self._cond:
            self._jobs.append(pcm)
            self._cond.notify_all()

    def wait_done(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: not self._jobs and not self._busy, timeout)

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._jobs.clear()
            self._cond.notify_all()
        self._thread.join(5.0)

    def _run(self) -> None:
        step = 48 * self.CHUNK_MS
        period = self.CHUNK_MS / 1000.0 / self._speed
        while True:
            with self._cond:
                while not self._jobs and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                pcm = self._jobs.pop(0)
                self._busy = True
            t_next = time.monotonic()
            for off in range(0, len(pcm), step):
                if self._stop:
                    break
                try:
                    self._client.push_audio(pcm[off : off + step])
                except Exception:
                    self.errors += 1
                t_next += period
                delay = t_next - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            with self._cond:
                self._busy = False
                self._cond.notify_all()


# -- workload scripts ------------------------------------------------------------------------------


def _settle(one_way_ms: float) -> float:
    return 0.03 + 4 * one_way_ms / 1000.0


def wl_handoff(c: Any, sim: C.SimProcess, n: int, speed: float, seed: int, one_way: float) -> dict[str, Any]:
    rng = random.Random(f"{seed}|handoff")
    current = AGENTS[0]
    for i in range(n):
        target = rng.choice([a for a in AGENTS if a != current])
        current = target
        c.say(f"Turn {i}: please put me through to {target} now.", f"app:{i}")
        # A turn's chain (handing-off answer + the new agent's answer) lasts about
        # 5 s of model time: gaps of 2-8 s overlap it often without an endless backlog.
        time.sleep(rng.uniform(2000, 8000) / 1000.0 / speed)
    return {}


def wl_tools(c: Any, sim: C.SimProcess, n: int, speed: float, seed: int, one_way: float) -> dict[str, Any]:
    rng = random.Random(f"{seed}|tools")
    stalls = 0
    for i in range(n):
        names = rng.sample(TOOLS, rng.randint(1, 4))
        c.say(f"Request {i}: [tools: {', '.join(names)}] for Paris and item {i}.", f"app:{i}")
        if not (c.quiet(ROUND_TIMEOUT, _settle(one_way)) and sim.wait_quiet(ROUND_TIMEOUT)):
            stalls += 1
    return {"stalls": stalls}


def wl_bargein(c: Any, sim: C.SimProcess, n: int, speed: float, seed: int, one_way: float) -> dict[str, Any]:
    rng = random.Random(f"{seed}|bargein")
    mic = Mic(c, speed)
    utter = C.speech_pcm(500) + C.silence_pcm(800)
    barge = C.speech_pcm(400) + C.silence_pcm(800)
    interrupts = stalls = 0
    try:
        for i in range(n):
            m = c.tap.mark("response.created")
            mic.say(utter)
            created = c.tap.wait("response.created", m, ROUND_TIMEOUT)
            if created is not None and rng.random() < 0.5:
                time.sleep(rng.uniform(300, 3000) / 1000.0 / speed)
                ms = c.tap.mark("input_audio_buffer.speech_started")
                mic.wait_done(ROUND_TIMEOUT)
                mic.say(barge)
                if c.tap.wait("input_audio_buffer.speech_started", ms, ROUND_TIMEOUT) is not None:
                    c.request(f"app:{i}")  # the app asks for a response right after the interruption
                    interrupts += 1
            mic.wait_done(ROUND_TIMEOUT)
            if not (c.quiet(ROUND_TIMEOUT, _settle(one_way)) and sim.wait_quiet(ROUND_TIMEOUT)):
                stalls += 1
    finally:
        mic.close()
    return {"interruptions": interrupts, "stalls": stalls, "mic_errors": mic.errors}


def wl_app_vs_vad(c: Any, sim: C.SimProcess, n: int, speed: float, seed: int, one_way: float) -> dict[str, Any]:
    rng = random.Random(f"{seed}|app_vs_vad")
    user_rng = random.Random(f"{seed}|app_vs_vad|user")
    mic = Mic(c, speed)
    stop = threading.Event()

    def user() -> None:
        for _ in range(100_000):
            if stop.is_set():
                return
            mic.say(C.speech_pcm(user_rng.randint(300, 900)) + C.silence_pcm(user_rng.randint(600, 2500)))
            mic.wait_done(ROUND_TIMEOUT)

    talker = threading.Thread(target=user, name="bench-user", daemon=True)
    talker.start()
    try:
        for i in range(n):
            time.sleep(rng.uniform(500, 3000) / 1000.0 / speed)
            c.request(f"app:{i}")
    finally:
        stop.set()
        mic.wait_done(ROUND_TIMEOUT)
        talker.join(ROUND_TIMEOUT)
        mic.close()
    return {"mic_errors": mic.errors}


# Words of the guardrails workload's turns: none names a tool, an agent or the guard word.
_PLAIN = ("could", "you", "tell", "me", "more", "about", "the", "blue", "kettle", "today")


def _with_word(words: list[str], rng: random.Random, trip: bool) -> str:
    """``words`` with the guard word at a random place among the first ten (those the scripted model echoes)."""
    out = list(words)
    if trip:
        out.insert(rng.randint(0, min(9, len(out))), GUARD_WORD)
    return " ".join(out)


def wl_guardrails(c: Any, sim: C.SimProcess, n: int, speed: float, seed: int, one_way: float) -> dict[str, Any]:
    rng = random.Random(f"{seed}|guardrails")
    current = AGENTS[0]
    stalls = 0
    kinds = {"plain": 0, "tools": 0, "handoff": 0}
    tripping = 0
    for i in range(n):
        kind = rng.choice(("plain", "tools", "handoff"))
        trip = rng.random() < 0.5
        kinds[kind] += 1
        tripping += trip
        if kind == "plain":
            # The answer echoes the first ten words: the guard word is said at a random point.
            text = _with_word([f"Q{i}:", *_PLAIN[: rng.randint(5, 9)]], rng, trip)
        elif kind == "tools":
            # Words said before the calls (then the calls, then the follow-up summary): a trip races them.
            names = rng.sample(TOOLS, rng.randint(1, 3))
            said = _with_word(["Okay,", "let", "me", "look", "into", "that", "for", "you", "right", "now."], rng, trip)
            text = f"Request {i}: [tools: {', '.join(names)}] [say: {said}] for Paris and item {i}."
        else:
            target = rng.choice([a for a in AGENTS if a != current])
            current = target
            # The handing-off agent says "Let me transfer you"; the new agent echoes the first ten words.
            text = _with_word([f"T{i}:", "please", "put", "me", "through", "to", target, "now"], rng, trip)
        c.say(text, f"app:{i}")
        if not (c.quiet(ROUND_TIMEOUT, _settle(one_way)) and sim.wait_quiet(ROUND_TIMEOUT)):
            stalls += 1
    return {"stalls": stalls, "turn_kinds": kinds, "turns_with_word": tripping}


SCRIPTS: dict[str, Callable[..., dict[str, Any]]] = {
    "handoff": wl_handoff,
    "tools": wl_tools,
    "bargein": wl_bargein,
    "app_vs_vad": wl_app_vs_vad,
    "guardrails": wl_guardrails,
}


def spec_for(workload: str, speed: float, seed: int) -> Spec:
    if workload == "handoff":
        return Spec(speed=speed, seed=seed, agents=AGENTS)
    if workload == "tools":
        return Spec(speed=speed, seed=seed, tools=TOOLS)
    if workload == "bargein":
        return Spec(speed=speed, seed=seed, vad=True,
                    watch=("response.created", "input_audio_buffer.speech_started"))
    if workload == "guardrails":
        return Spec(speed=speed, seed=seed, agents=AGENTS, tools=TOOLS, guard=True)
    return Spec(speed=speed, seed=seed, vad=True)


# -- one run ---------------------------------------------------------------------------------------------


def run_one(strategy: str, workload: str, sim: C.SimProcess, n: int, speed: float, seed: int,
            rtt_ms: float) -> dict[str, Any]:
    one_way = rtt_ms / 2
    row: dict[str, Any] = {"strategy": strategy, "workload": workload, "latency_ms": rtt_ms, "one_way_ms": one_way,
                           "rounds": n, "speed": speed, "seed": seed}
    client = make_client(strategy)
    t0 = time.monotonic()
    cpu0 = time.process_time()
    try:
        client.connect(sim.url, spec_for(workload, speed, seed))
        index = sim.stats()["sessions"] - 1
        row.update(SCRIPTS[workload](client, sim, n, speed, seed, one_way))
        row["drained"] = bool(client.quiet(DRAIN_TIMEOUT, _settle(one_way)) and sim.wait_quiet(DRAIN_TIMEOUT))
        cpu_s = time.process_time() - cpu0
        lat = client.gate_latencies_ms()
        asked = set(client.asked)
        row.update({f"client_{k}": v for k, v in client.extra().items() if not isinstance(v, dict)})
        if isinstance(client, AgentsClient):
            row["agents_session_events"] = client.extra()["session_events"]
    finally:
        client.close()
    row["seconds"] = round(time.monotonic() - t0, 2)
    t = sim.tally(index)
    wire_keys = set(t["ok_by_key"])
    lost = sorted(set(t["lost_keys"]) | (asked - wire_keys))
    creates = t["creates"]
    responses = t["responses_created"]
    errors = t.get("errors", {})
    gl = C.latency_summary(lat)
    row.update({
        "creates": creates,
        "intents": len(asked | wire_keys),
        "responses": responses,
        "server_initiated_responses": t["responses_untagged"],
        "cancelled_responses": t["responses_cancelled"],
        "conflicts": t["conflicts"],
        "conflicts_per_1000": round(1000.0 * t["conflicts"] / creates, 1) if creates else 0.0,
        "user_visible_conflicts": t["user_visible_conflicts"],
        "retried_conflicts": t["conflicts"] - t["user_visible_conflicts"],
        "lost_intents": len(lost),
        "lost_examples": lost[:10],
        "duplicates": t["duplicates"],
        "cancel_not_active": errors.get("response_cancel_not_active", 0),
        "truncate_errors": t["truncate_errors"],
        "errors": errors,
        "gate_p50_ms": gl["p50"],
        "gate_p99_ms": gl["p99"],
        "gate_max_ms": gl["max"],
        "gate_samples": gl["n"],
        "gate_latencies_ms": [round(x, 4) for x in lat] if lat is not None else None,
        "cpu_ms": round(cpu_s * 1000.0, 1),
        "cpu_ms_per_response": round(cpu_s * 1000.0 / responses, 3) if responses else None,
    })
    if workload == "guardrails":
        row.update(guard_figures(row.get("client_guardrail_trips", 0), t["guard"]))
    return row


def guard_figures(trips: int, g: dict[str, int]) -> dict[str, Any]:
    """Lost and duplicate corrections (see the module doc) from the client's trips and the server's guard tally."""
    sent = g["correction_items"]
    lost = max(0, trips - sent) + g["unanswered"]
    dups = max(0, sent - trips) + g["duplicate_answers"]
    return {
        "trips": trips,
        "corrections_sent": sent,
        "corrections_answered": g["answered"],
        "corrections_unanswered": g["unanswered"],
        "trips_without_correction": max(0, trips - sent),
        "duplicate_answers": g["duplicate_answers"],
        "lost_corrections": lost,
        "duplicate_corrections": dups,
        "lost_corrections_per_1000_trips": round(1000.0 * lost / trips, 1) if trips else None,
        "duplicate_corrections_per_1000_trips": round(1000.0 * dups / trips, 1) if trips else None,
    }


# -- report ------------------------------------------------------------------------------------------------

COLS = [
    ("strategy", "strategy"), ("workload", "workload"), ("latency_ms", "RTT ms"), ("creates", "creates"),
    ("conflicts_per_1000", "conflicts/1000"), ("user_visible_conflicts", "visible conflicts"),
    ("lost_intents", "lost"), ("duplicates", "dups"), ("cancel_not_active", "cancel_not_active"),
    ("truncate_errors", "truncate err"), ("gate_p50_ms", "gate p50 ms"), ("gate_p99_ms", "gate p99 ms"),
    ("gate_max_ms", "gate max ms"), ("cpu_ms_per_response", "CPU ms/resp"), ("drained", "drained"),
]


GUARD_COLS = [
    ("strategy", "strategy"), ("latency_ms", "RTT ms"), ("rounds", "turns"), ("trips", "trips"),
    ("corrections_sent", "corrections sent"), ("lost_corrections", "lost corr."),
    ("duplicate_corrections", "dup corr."), ("lost_corrections_per_1000_trips", "lost /1000 trips"),
    ("duplicate_corrections_per_1000_trips", "dup /1000 trips"), ("creates", "creates"),
    ("conflicts_per_1000", "conflicts/1000 creates"), ("user_visible_conflicts", "visible conflicts"),
    ("cancel_not_active", "cancel_not_active"), ("lost_intents", "lost intents"), ("drained", "drained"),
]


def guard_targets(rows: list[dict[str, Any]]) -> list[tuple[str, bool, str]]:
    """rtqueue's guardrail targets: trips happened; 0 visible conflicts, 0 lost, 0 duplicate corrections."""
    mine = [r for r in rows if r["strategy"] == "rtqueue"]
    if not mine:
        return [("rtqueue ran the guardrails workload", False, "no rtqueue rows")]
    out: list[tuple[str, bool, str]] = []
    for r in mine:
        ok = (r["trips"] > 0 and r["user_visible_conflicts"] == 0 and r["lost_corrections"] == 0
              and r["duplicate_corrections"] == 0 and r["lost_intents"] == 0 and r.get("drained", True))
        out.append((f"guardrails @ {r['latency_ms']:g} ms: trips > 0, 0 visible conflicts, 0 lost and 0 duplicate "
                    "corrections, 0 lost intents", ok,
                    f"trips={r['trips']} visible={r['user_visible_conflicts']} lost_corr={r['lost_corrections']} "
                    f"dup_corr={r['duplicate_corrections']} lost={r['lost_intents']} drained={r.get('drained')}"))
    return out


def targets(rows: list[dict[str, Any]]) -> list[tuple[str, bool, str]]:
    """rtqueue's targets: (name, ok, detail)."""
    out: list[tuple[str, bool, str]] = []
    mine = [r for r in rows if r["strategy"] == "rtqueue"]
    if not mine:
        return [("rtqueue ran", False, "no rtqueue rows")]
    for r in mine:
        ok = r["user_visible_conflicts"] == 0 and r["lost_intents"] == 0 and r.get("drained", True)
        out.append((f"{r['workload']} @ {r['latency_ms']:g} ms: 0 visible conflicts, 0 lost intents", ok,
                    f"visible={r['user_visible_conflicts']} lost={r['lost_intents']} drained={r.get('drained')} "
                    f"(server races retried: {r['retried_conflicts']})"))
    lat0 = [x for r in mine if r["latency_ms"] == 0 for x in (r["gate_latencies_ms"] or [])]
    p50, p99 = C.percentile(lat0, 50), C.percentile(lat0, 99)
    out.append(("gate latency p50 <= 0.2 ms @ 0 ms", p50 is not None and p50 <= 0.2,
                f"p50={C.fmt(p50, 3)} ms over {len(lat0)} gated creates"))
    out.append(("gate latency p99 <= 1 ms @ 0 ms", p99 is not None and p99 <= 1.0,
                f"p99={C.fmt(p99, 3)} ms over {len(lat0)} gated creates"))
    return out


def charts(rows: list[dict[str, Any]], out: Path) -> list[str]:
    plt = C.pyplot()
    if plt is None:
        return []
    made = []
    lats = sorted({r["latency_ms"] for r in rows})
    strategies = [s for s in STRATEGIES if any(r["strategy"] == s for r in rows)]
    workloads = [w for w in WORKLOADS if any(r["workload"] == w for r in rows)]
    if not workloads:
        return []
    fig, axes = plt.subplots(2, len(lats), figsize=(6.5 * len(lats), 7.6), squeeze=False)
    width = 0.8 / max(1, len(strategies))
    panels = (
        ("conflicts_per_1000", "server conflicts / 1000 creates", "server-counted conflicts (rtqueue's: retried)"),
        ("lost_per_100", "lost intents / 100 intents", "lost intents"),
    )
    for row_axes, (key, ylabel, title) in zip(axes, panels, strict=True):
        for ax, lat in zip(row_axes, lats, strict=True):
            for k, s in enumerate(strategies):
                vals = []
                for w in workloads:
                    hit = [r for r in rows if r["strategy"] == s and r["workload"] == w and r["latency_ms"] == lat]
                    if not hit:
                        vals.append(0.0)
                    elif key == "lost_per_100":
                        vals.append(100.0 * hit[0]["lost_intents"] / max(1, hit[0]["intents"]))
                    else:
                        vals.append(hit[0][key])
                xs = [i + (k - (len(strategies) - 1) / 2) * width for i in range(len(workloads))]
                ax.bar(xs, vals, width, label=s)
            ax.set_xticks(range(len(workloads)), workloads)
            ax.set_title(f"{title}, RTT {lat:g} ms")
            ax.set_ylabel(ylabel)
            ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "conflicts.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    made.append(str(path))

    fig, axes = plt.subplots(1, len(lats), figsize=(6.5 * len(lats), 4.2), squeeze=False)
    for ax, lat in zip(axes[0], lats, strict=False):
        for s in strategies:
            vals = sorted(x for r in rows if r["strategy"] == s and r["latency_ms"] == lat
                          for x in (r["gate_latencies_ms"] or []))
            if not vals:
                continue
            ys = [(i + 1) / len(vals) for i in range(len(vals))]
            ax.step([max(v, 1e-3) for v in vals], ys, where="post", label=f"{s} (n={len(vals)})")
        ax.set_xscale("log")
        ax.set_xlabel("gate latency, ms (response.done read -> next create written)")
        ax.set_ylabel("fraction of gated creates")
        ax.set_title(f"gate latency CDF, RTT {lat:g} ms")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "gate_latency.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    made.append(str(path))
    return made


def main(argv: list[str] | None = None) -> int:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help=f"comma-separated, of {', '.join(WORKLOADS + EXTRA_WORKLOADS)}")
    p.add_argument("--latencies", default="0,40", help="round-trip latencies in ms (one-way is half)")
    p.add_argument("--speed", type=float, default=None, help="simulator pacing vs real time (default 20)")
    p.add_argument("--seed", type=int, default=7)
    ns = p.parse_args(argv)
    sizes = dict(QUICK if ns.quick else FULL)
    speed = ns.speed or sizes["speed"]
    strategies = [s for s in ns.strategies.split(",") if s]
    workloads = [w for w in ns.workloads.split(",") if w]
    unknown = sorted(set(workloads) - set(WORKLOADS + EXTRA_WORKLOADS))
    if unknown:
        p.error(f"unknown workloads: {', '.join(unknown)}")
    rtts = [float(x) for x in ns.latencies.split(",") if x]
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    skipped: dict[str, str] = {}
    why = agents_available()
    if "openai-agents" in strategies and why is not None:
        skipped["openai-agents"] = f"openai-agents is not installed ({why}); pip install openai-agents to compare"
        C.progress(f"SKIP openai-agents: {skipped['openai-agents']}")
        strategies.remove("openai-agents")
    warm_imports()
    rows: list[dict[str, Any]] = []
    t_start = time.monotonic()
    def runs(wl: str) -> list[str]:
        return [s for s in strategies if wl not in EXTRA_WORKLOADS or s in GUARDED]

    total = len(rtts) * sum(len(runs(wl)) for wl in workloads)
    k = 0
    for rtt in rtts:
        for wl in workloads:
            with C.SimProcess(latency_ms=rtt / 2, speed=speed, seed=ns.seed, record=True) as sim:
                for strat in runs(wl):
                    k += 1
                    C.progress(f"[{k}/{total}] {strat:<13} {wl:<10} RTT {rtt:g} ms ...")
                    try:
                        row = run_one(strat, wl, sim, sizes[wl], speed, ns.seed, rtt)
                    except Exception as exc:  # a client that breaks is a result too
                        row = {"strategy": strat, "workload": wl, "latency_ms": rtt, "failed": repr(exc),
                               "creates": 0, "conflicts_per_1000": None, "lost_intents": None, "duplicates": None,
                               "gate_p50_ms": None, "gate_p99_ms": None, "cpu_ms_per_response": None,
                               "user_visible_conflicts": None, "retried_conflicts": None, "gate_latencies_ms": None}
                        C.progress(f"      FAILED: {exc!r}")
                    rows.append(row)
                    if "failed" not in row:
                        C.progress(
                            f"      creates={row['creates']} conflicts={row['conflicts']} "
                            f"visible={row['user_visible_conflicts']} lost={row['lost_intents']} "
                            f"dups={row['duplicates']} cancel_not_active={row['cancel_not_active']} "
                            f"trunc_err={row['truncate_errors']} gate_p99={C.fmt(row['gate_p99_ms'], 3)} ms "
                            f"cpu/resp={C.fmt(row['cpu_ms_per_response'], 2)} ms ({row['seconds']} s)"
                        )
                        if wl == "guardrails":
                            C.progress(f"      trips={row['trips']} corrections={row['corrections_sent']} "
                                       f"lost_corr={row['lost_corrections']} dup_corr={row['duplicate_corrections']}")
    guard_rows = [r for r in rows if r["workload"] in EXTRA_WORKLOADS]
    rows = [r for r in rows if r["workload"] not in EXTRA_WORKLOADS]
    guard_checks = guard_targets([r for r in guard_rows if "failed" not in r]) if guard_rows else []
    guard_written: list[str] = []
    if guard_rows:
        guard_doc = {
            "benchmark": "conflicts/guardrails",
            "machine": C.machine(),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "quick": ns.quick,
            "speed": speed,
            "seed": ns.seed,
            "sizes": {"guardrails": sizes["guardrails"]},
            "skipped": skipped,
            "seconds": round(time.monotonic() - t_start, 1),
            "targets": [{"target": n, "pass": ok, "detail": d} for n, ok, d in guard_checks],
            "results": guard_rows,
        }
        # --quick never overwrites the full run's file.
        name = "bench_conflicts_guardrails_quick.json" if ns.quick else "bench_conflicts_guardrails.json"
        guard_written = C.write_json(guard_doc, out / name, ns.json if not rows else None)
        print()
        print(C.table(guard_rows, GUARD_COLS, nd=1))
        print()
        for name, ok, detail in guard_checks:
            print(f"{'PASS' if ok else 'FAIL'}  rtqueue: {name}  [{detail}]")
        if not rows:
            for name, reason in skipped.items():
                print(f"SKIP  {name}: {reason}")
            print("\nwrote " + ", ".join(guard_written))
            failed = any("failed" in r for r in guard_rows)
            return 0 if all(ok for _, ok, _ in guard_checks) and not failed else 1
    checks = targets([r for r in rows if "failed" not in r]) if rows else []
    result = {
        "benchmark": "conflicts",
        "machine": C.machine(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "quick": ns.quick,
        "speed": speed,
        "seed": ns.seed,
        "sizes": sizes,
        "skipped": skipped,
        "seconds": round(time.monotonic() - t_start, 1),
        "targets": [{"target": n, "pass": ok, "detail": d} for n, ok, d in checks],
        "results": rows,
    }
    written = C.write_json(result, out / "bench_conflicts.json", ns.json)
    written += charts([r for r in rows if "failed" not in r], out)
    print()
    print(C.table(rows, COLS, nd=3))
    print()
    for name, ok, detail in checks:
        print(f"{'PASS' if ok else 'FAIL'}  rtqueue: {name}  [{detail}]")
    for name, reason in skipped.items():
        print(f"SKIP  {name}: {reason}")
    print("\nwrote " + ", ".join(written + guard_written))
    checks += guard_checks
    return 0 if all(ok for _, ok, _ in checks) and not any("failed" in r for r in rows + guard_rows) else 1


if __name__ == "__main__":
    sys.exit(main())
