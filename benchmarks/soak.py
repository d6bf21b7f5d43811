"""Soak: one session through a simulated 2-hour conversation, with reconnects and faults.

    python benchmarks/soak.py [--quick] [--minutes 120] [--speed 50] [--seed 1] [--out DIR] [--json FILE]

One :class:`rtqueue.Session` (two agents with tools and handoffs, audio out to
a device-less speaker that plays at the simulator's speed) talks to a
simulator (in a child process, on 127.0.0.1) running ``--speed`` times faster than real time, for
``--minutes`` of *simulated* time (wall time x speed). The user takes turns:
text questions, spoken (push-to-talk) questions, questions that call tools,
handoffs between the agents, and barge-ins that interrupt the assistant.

Meanwhile a chaos thread, on a seeded schedule in simulated time:

- forces a reconnect every 15 simulated minutes, alternating the server's
  ``session_expired`` and a dropped TCP connection;
- injects random faults (about one per 5 simulated minutes, at any moment, so
  they land mid-response, mid tool call, ...): a drop mid-response, a withheld
  ``response.done``, duplicated or delayed events, malformed JSON, a binary
  frame, an unknown event type, a server error, a stalled reader.

The app retries an intent (a user turn) whose response failed with a typed
error, at most twice. Reported (table on stdout, JSON, PNG of memory):

- memory: RSS of this process (the SDK and the app; the simulator runs in a
  child process, recording nothing, and its RSS is reported apart) sampled
  every simulated minute; "flat" = the growth over the second half of the run;
- conflicts: ``conversation_already_has_active_response`` errors (0);
- lost intents: turns with no completed (or cancelled-by-the-user) answer
  after the retries, and handles that were neither sent nor failed (0);
- reconnects and their downtime p50/p99 (loss noticed -> writer resumed).

``--quick`` runs 12 simulated minutes with a reconnect every 3 (a smoke run).
The full run is bounded by ``--max-wall`` seconds (default 600).
"""

from __future__ import annotations

import random
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import _common as C

import rtqueue
from rtqueue import Agent, FaultPlan, ReconnectPolicy, Session, tool
from rtqueue.audio import AudioIO, NullSpeaker
from rtqueue.errors import ResponseTimeout, RtqueueError
from rtqueue.sim import Simulator

RANDOM_FAULTS: dict[str, FaultPlan] = {
    "drop_mid_response": FaultPlan(drop_mid_response=True),
    "withhold_done": FaultPlan(withhold_done=1),
    "duplicate_events": FaultPlan(duplicate_events=0.3),
    "delay_events_ms": FaultPlan(delay_events_ms=15),
    "malformed_json": FaultPlan(malformed_json_after=3),
    "binary_frame": FaultPlan(binary_frame_after=3),
    "unknown_event": FaultPlan(unknown_event_after=3),
    "server_error": FaultPlan(error_after=(3, "server_error")),
    "stall_reading": FaultPlan(stall_reading_s=0.3),
}
#: Faults that stay on until replaced; the chaos thread clears them after a while.
PERSISTENT = {"duplicate_events", "delay_events_ms"}
ATTEMPTS = 3  # an intent is tried at most this many times
TURN_TIMEOUT = 30.0  # real seconds for one attempt (a hang would show up as ResponseTimeout)


# -- the simulator, in its own process ----------------------------------------------------------


def serve(argv: list[str]) -> int:
    """Child mode (``soak.py --serve '{json kwargs}'``): one Simulator, commands as JSON lines on stdin.

    Commands: ``{"op": "inject", "plan": {...}, "session": i}``, ``{"op": "stats"}``,
    ``{"op": "quit"}``. Answers are JSON lines; ``stats`` adds the child's RSS.
    """
    import json

    kwargs = json.loads(argv[0])
    if kwargs.get("host", "127.0.0.1") != "127.0.0.1":
        return 2
    with Simulator(**kwargs) as sim:
        print(json.dumps({"url": sim.url}), flush=True)
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd["op"] == "quit":
                break
            if cmd["op"] == "inject":
                plan = dict(cmd["plan"])
                if plan.get("error_after") is not None:
                    plan["error_after"] = tuple(plan["error_after"])
                sim.inject(FaultPlan(**plan), session=cmd.get("session"))
                print(json.dumps({"ok": True}), flush=True)
            elif cmd["op"] == "stats":
                print(json.dumps({**sim.stats(), "rss_mb": C.rss_mb()}), flush=True)
    return 0


class SimChild:
    """The simulator in a child process, so this process's RSS is the SDK's alone."""

    def __init__(self, **kwargs: Any) -> None:
        import json
        import subprocess

        self._json = json
        self._proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", json.dumps(kwargs)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
        )
        self._lock = threading.Lock()
        self.url: str = self._read()["url"]

    def _read(self) -> dict[str, Any]:
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"simulator process ended (rc={self._proc.poll()})")
        return dict(self._json.loads(line))

    def _call(self, **cmd: Any) -> dict[str, Any]:
        assert self._proc.stdin is not None
        with self._lock:
            self._proc.stdin.write(self._json.dumps(cmd) + "\n")
            self._proc.stdin.flush()
            return self._read()

    def inject(self, plan: FaultPlan, session: int | None = None) -> None:
        import attrs

        self._call(op="inject", plan=attrs.asdict(plan), session=session)

    def stats(self) -> dict[str, Any]:
        return self._call(op="stats")

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                assert self._proc.stdin is not None
                self._proc.stdin.write('{"op": "quit"}\n')
                self._proc.stdin.close()
                self._proc.wait(30)
            except Exception:
                self._proc.kill()
                self._proc.wait(10)

    def __enter__(self) -> SimChild:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- measuring what the session holds ------------------------------------------------------------


def history_mb(session: Session) -> float:
    """MB held in the conversation history the session keeps (items for re-seeding, recent responses)."""
    stores = session.stores()
    records = list(stores["history"][0].values())  # compact records (rtqueue/history.py)
    done = list(stores["recent_responses"][0].values())
    try:
        return (C.deep_size(records) + C.deep_size(done)) / 2**20
    except RuntimeError:  # a dict changed size while we walked it: skip this sample
        return float("nan")


# -- the app ---------------------------------------------------------------------------------


@tool
def lookup_order(order_id: str) -> dict:
    """Look up an order by its id."""
    return {"order_id": order_id, "status": "shipped", "eta_days": 2}


@tool
def get_weather(city: str) -> dict:
    """Get the weather forecast for a city."""
    return {"city": city, "forecast": "sunny", "celsius": 21}


@tool
def refund_status(order_id: str) -> dict:
    """Check the refund status of an order."""
    return {"order_id": order_id, "refund": "approved"}


def agents() -> tuple[Agent, Agent]:
    billing = Agent(name="billing", instructions="You are the billing agent. Handle refunds.",
                    tools=[refund_status], handoffs=["desk"])
    desk = Agent(name="desk", instructions="You are the front desk. Answer orders and weather.",
                 tools=[lookup_order, get_weather], handoffs=[billing])
    return desk, billing


class Soak:
    """The simulated user, the chaos schedule, and the measurements."""

    def __init__(self, *, minutes: float, speed: float, reconnect_every_min: float, fault_every_min: float,
                 seed: int, max_wall: float) -> None:
        self.minutes = minutes
        self.speed = speed
        self.reconnect_every = reconnect_every_min
        self.fault_every = fault_every_min
        self.max_wall = max_wall
        self.rng = random.Random(seed)
        self.chaos_rng = random.Random(seed + 1)
        self.seed = seed
        self.t0 = 0.0
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.turns: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()  # per attempt: completed, cancelled, <ErrorType>
        self.lost: list[dict[str, Any]] = []
        self.hangs = 0
        self.intents = 0
        self.retried_intents = 0
        self.injected: Counter[str] = Counter()
        self.forced: list[tuple[float, str]] = []
        self.memory: list[tuple[float, float]] = []  # (simulated minutes, RSS MB of this process: the SDK)
        self.sim_memory: list[tuple[float, float]] = []  # the same for the simulator's process
        self.threads: list[tuple[float, int]] = []
        self.events: Counter[str] = Counter()
        self.wall_truncated = False
        self.held: dict[str, int] = {}
        self.history: list[tuple[float, float]] = []  # (simulated minutes, MB held in the session's history)

    # -- clocks ------------------------------------------------------------------------------

    def sim_min(self) -> float:
        return (time.monotonic() - self.t0) * self.speed / 60.0

    def wait_sim(self, seconds: float) -> None:
        """Let ``seconds`` of simulated time pass (the user thinking)."""
        self.stop.wait(seconds / self.speed)

    # -- run -------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        desk, billing = agents()
        policy = ReconnectPolicy(initial_backoff=0.05, max_backoff=2.0, connect_timeout=10.0)
        speaker = NullSpeaker(speed=self.speed)
        with SimChild(speed=self.speed, seed=self.seed, record=False) as sim:
            session = Session.connect(
                url=sim.url, agent=desk, agents=[billing], audio=AudioIO(output=speaker),
                turn_detection=None, reconnect=policy, response_timeout=max(2.0, 120.0 / self.speed),
                tool_timeout=10.0,
            )
            session.on("*", self._count_event)
            self.t0 = time.monotonic()
            chaos = threading.Thread(target=self._chaos, args=(sim, session), name="soak-chaos", daemon=True)
            sampler = threading.Thread(target=self._sample, args=(sim, session), name="soak-sampler", daemon=True)
            chaos.start()
            sampler.start()
            try:
                while self.sim_min() < self.minutes and not self.stop.is_set():
                    if time.monotonic() - self.t0 > self.max_wall:
                        self.wall_truncated = True
                        break
                    self._turn(session)
                    self.wait_sim(self.rng.uniform(3.0, 12.0))
            finally:
                self.stop.set()
                chaos.join(30)
                sampler.join(30)
                idle = session.wait_idle(30)
                final_stats = session.stats()
                gate_depth = session.gate.depth()
                pending = len(session.writer.pending())
                stores = session.stores()
                self.held = {"items": len(stores["history"][0]), "done_responses": len(stores["recent_responses"][0]),
                             "errors_by_eid": len(stores["server_errors"][0])}
                session.close()
            sim_stats = sim.stats()
        unresolved = [h.event.get("type") for h in session.unresolved()]
        return self._report(final_stats, sim_stats, speaker.stats(), idle, gate_depth, pending, unresolved,
                            threads_left=len(session.threads()))

    def _count_event(self, ev: rtqueue.Event) -> None:
        self.events[ev.type] += 1

    def _sample(self, sim: SimChild, session: Session) -> None:
        while True:
            now = self.sim_min()
            self.memory.append((now, C.rss_mb()))
            self.sim_memory.append((now, float(sim.stats()["rss_mb"])))
            self.threads.append((now, threading.active_count()))
            held = history_mb(session)
            if held == held:  # not NaN
                self.history.append((now, held))
            if self.stop.wait(60.0 / self.speed):  # once per simulated minute
                break
        self.memory.append((self.sim_min(), C.rss_mb()))

    # -- the user ----------------------------------------------------------------------------------

    def _turn(self, session: Session) -> None:
        kind = self.rng.choices(["text", "audio", "tool", "handoff", "barge_in"], [35, 25, 20, 8, 12])[0]
        self.turns[kind] += 1
        self.intents += 1
        n = self.intents
        texts = {
            "text": f"Tell me something nice, number {n}.",
            "tool": self.rng.choice([f"Where is order {n}? Please look up the order.",
                                     "What is the weather forecast in Paris?"]),
            "handoff": "Please transfer me to billing." if (session.agent and session.agent.name == "desk")
            else "Please transfer me to desk.",
        }
        for attempt in range(1, ATTEMPTS + 1):
            outcome = self._attempt(session, kind, texts.get(kind, ""))
            with self.lock:
                self.outcomes[outcome] += 1
            if outcome in ("completed", "cancelled"):
                if attempt > 1:
                    self.retried_intents += 1
                return
            if outcome == "SessionClosed":
                break
        self.lost.append({"intent": n, "kind": kind, "at_min": round(self.sim_min(), 2)})

    def _attempt(self, session: Session, kind: str, text: str) -> str:
        try:
            if kind == "audio":
                pcm = C.speech_pcm(1200) + C.silence_pcm(300)
                for i in range(0, len(pcm), 4800):  # 100 ms chunks
                    session.append_audio(pcm[i:i + 4800])
                session.commit()
                return session.create_response().final(TURN_TIMEOUT).status
            if kind == "barge_in":
                with session.events("response.output_audio.delta") as audio:
                    session.send_text(f"Tell me a long story. [len: {self.rng.randint(40, 120)}]")
                    handle = session.create_response()
                    if audio.get(TURN_TIMEOUT) is None:
                        return "no_audio"
                self.wait_sim(self.rng.uniform(0.5, 3.0))  # listen a little, then talk over it
                session.interrupt(TURN_TIMEOUT)
                return handle.wait(TURN_TIMEOUT).status
            session.send_text(text)
            return session.create_response().final(TURN_TIMEOUT).status
        except ResponseTimeout:
            self.hangs += 1
            return "ResponseTimeout"
        except RtqueueError as exc:
            return type(exc).__name__

    # -- chaos ---------------------------------------------------------------------------------------

    def _chaos(self, sim: SimChild, session: Session) -> None:
        schedule: list[tuple[float, str]] = []
        t, k = self.reconnect_every, 0
        while t < self.minutes:
            schedule.append((t, "expire" if k % 2 == 0 else "drop"))
            t += self.reconnect_every
            k += 1
        t = self.chaos_rng.expovariate(1.0 / self.fault_every)
        while t < self.minutes:
            name = self.chaos_rng.choice(sorted(RANDOM_FAULTS))
            schedule.append((t, name))
            if name in PERSISTENT:
                schedule.append((t + 0.5, "clear"))
            t += self.chaos_rng.expovariate(1.0 / self.fault_every)
        schedule.sort()
        for at, name in schedule:
            wall = self.t0 + at * 60.0 / self.speed
            if self.stop.wait(max(0.0, wall - time.monotonic())):
                return
            index = int(sim.stats()["sessions"]) - 1
            if name == "expire":
                plan = FaultPlan(expire_after_s=0)
            elif name == "drop":
                plan = FaultPlan(drop_after_events=0)
            elif name == "clear":
                plan = FaultPlan()
            else:
                plan = RANDOM_FAULTS[name]
            sim.inject(plan, session=index)
            with self.lock:
                self.injected[name] += 1
                if name in ("expire", "drop"):
                    self.forced.append((round(self.sim_min(), 2), name))

    # -- report ------------------------------------------------------------------------------------------

    def _history_at(self, minute: float) -> float:
        later = [m for t, m in self.history if t >= minute]
        return later[0] if later else (self.history[-1][1] if self.history else 0.0)

    def _report(self, st: dict[str, Any], sim_stats: dict[str, Any], speaker: dict[str, Any], idle: bool,
                gate_depth: int, pending: int, unresolved: list[Any], *, threads_left: int) -> dict[str, Any]:
        mem = self.memory
        half = [m for t, m in mem if t >= self.minutes / 2] or [m for _, m in mem]
        warm = [m for t, m in mem if t >= min(10.0, self.minutes / 4)] or [m for _, m in mem]
        out = {
            "config": {"simulated_minutes": self.minutes, "speed": self.speed, "seed": self.seed,
                       "reconnect_every_min": self.reconnect_every, "fault_every_min": self.fault_every},
            "machine": C.machine(),
            "wall_s": round(time.monotonic() - self.t0, 1),
            "simulated_min_reached": round(self.sim_min(), 1),
            "wall_truncated": self.wall_truncated,
            "intents": self.intents,
            "turns": dict(self.turns),
            "attempt_outcomes": dict(self.outcomes),
            "intents_retried_ok": self.retried_intents,
            "lost_intents": len(self.lost),
            "lost_detail": self.lost,
            "hung_waits": self.hangs,
            "unresolved_handles": len(unresolved),
            "handles_tracked": st["handles_issued"],
            "conflicts": sim_stats["conflicts"],
            "gate_retried": st["retried"],
            "reconnects": st.get("reconnects", 0),
            "reconnect_failures": st.get("reconnect_failures", 0),
            "reconnect_p50_ms": st.get("reconnect_p50_ms"),
            "reconnect_p99_ms": st.get("reconnect_p99_ms"),
            "forced_reconnects": self.forced,
            "faults_injected": dict(self.injected),
            "faults_fired": sim_stats["faults"],
            "responses_failed_by_reconnect": st.get("responses_failed_by_reconnect"),
            "creates_reissued": st.get("creates_reissued"),
            "not_carried": st.get("not_carried"),
            "evicted": st["evicted"],
            "server_sessions": sim_stats["sessions"],
            "server_responses": sim_stats["responses"],
            "server_errors": sim_stats["errors"],
            "function_calls": sim_stats["function_calls"],
            "handoffs": self.events["agent.handoff"],
            "interruptions": self.events["audio.interrupted"],
            "rtqueue_errors": self.events["rtqueue.error"],
            "audio_ms_received": round(speaker.get("received_ms", 0.0)),
            "audio_ms_played": round(speaker.get("played_ms", 0.0)),
            "events_dropped": st["events_dropped"],
            "idle_at_end": idle,
            "gate_depth_at_end": gate_depth,
            "writer_pending_at_end": pending,
            "threads_left_after_close": threads_left,
            "rss_mb": {
                "start": mem[0][1] if mem else None,
                "after_warmup_min": min(warm) if warm else None,
                "max": max(m for _, m in mem) if mem else None,
                "end": mem[-1][1] if mem else None,
                "second_half_growth": (max(half) - min(half)) if half else None,
                "end_minus_warmup": (mem[-1][1] - warm[0]) if mem and warm else None,
            },
            "simulator_rss_mb": {"start": self.sim_memory[0][1] if self.sim_memory else None,
                                 "end": self.sim_memory[-1][1] if self.sim_memory else None},
            "session_tables_at_end": self.held,
            "history_mb": {"start": self.history[0][1] if self.history else None,
                           "end": self.history[-1][1] if self.history else None},
            "rss_growth_minus_history_mb": (
                round((mem[-1][1] - warm[0]) - (self.history[-1][1] - self._history_at(min(10.0, self.minutes / 4))), 2)
                if mem and warm and self.history else None),
            "history_series": [(round(t, 2), round(m, 3)) for t, m in self.history],
            "memory_series": [(round(t, 2), round(m, 2)) for t, m in mem],
            "simulator_memory_series": [(round(t, 2), round(m, 2)) for t, m in self.sim_memory],
            "threads_series": self.threads,
        }
        return out


# -- output ---------------------------------------------------------------------------------------


def print_table(r: dict[str, Any]) -> None:
    rss = r["rss_mb"]
    rows = [
        {"what": "simulated minutes (wall s)", "value": f"{r['simulated_min_reached']} ({r['wall_s']} s)"},
        {"what": "intents (user turns)", "value": r["intents"]},
        {"what": "turns by kind", "value": ", ".join(f"{k} {v}" for k, v in sorted(r["turns"].items()))},
        {"what": "attempt outcomes", "value": ", ".join(f"{k} {v}" for k, v in sorted(r["attempt_outcomes"].items()))},
        {"what": "lost intents", "value": r["lost_intents"]},
        {"what": "hung waits / unresolved handles", "value": f"{r['hung_waits']} / {r['unresolved_handles']}"},
        {"what": "conflicts", "value": r["conflicts"]},
        {"what": "reconnects (forced)", "value": f"{r['reconnects']} ({len(r['forced_reconnects'])})"},
        {"what": "reconnect p50 / p99 ms", "value": f"{C.fmt(r['reconnect_p50_ms'], 1)} / "
                                                      f"{C.fmt(r['reconnect_p99_ms'], 1)}"},
        {"what": "faults injected", "value": ", ".join(f"{k} {v}" for k, v in sorted(r["faults_injected"].items()))},
        {"what": "responses failed by a drop / creates re-issued",
         "value": f"{r['responses_failed_by_reconnect']} / {r['creates_reissued']}"},
        {"what": "evicted (withheld done)", "value": r["evicted"]},
        {"what": "server responses / function calls / handoffs",
         "value": f"{r['server_responses']} / {r['function_calls']} / {r['handoffs']}"},
        {"what": "audio received / played (s)",
         "value": f"{r['audio_ms_received'] / 1000:.0f} / {r['audio_ms_played'] / 1000:.0f}"},
        {"what": "RSS MB start / after warm-up / max / end",
         "value": f"{C.fmt(rss['start'], 1)} / {C.fmt(rss['after_warmup_min'], 1)} / {C.fmt(rss['max'], 1)} / "
                  f"{C.fmt(rss['end'], 1)}"},
        {"what": "RSS growth over the second half (MB)", "value": C.fmt(rss["second_half_growth"], 1)},
        {"what": "simulator process RSS MB start / end",
         "value": f"{C.fmt(r['simulator_rss_mb']['start'], 1)} / {C.fmt(r['simulator_rss_mb']['end'], 1)}"},
        {"what": "history held by the session, start / end (MB)",
         "value": f"{C.fmt(r['history_mb']['start'], 2)} / {C.fmt(r['history_mb']['end'], 2)}"},
        {"what": "RSS growth after warm-up minus history growth (MB)",
         "value": C.fmt(r["rss_growth_minus_history_mb"], 1)},
        {"what": "session tables at end",
         "value": ", ".join(f"{k} {v}" for k, v in r["session_tables_at_end"].items())},
        {"what": "idle at end / gate depth / threads left after close",
         "value": f"{r['idle_at_end']} / {r['gate_depth_at_end']} / {r['threads_left_after_close']}"},
    ]
    print(C.table(rows, [("what", "soak"), ("value", "result")]))


def plot(r: dict[str, Any], path: Path) -> str | None:
    plt = C.pyplot()
    if plt is None or not r["memory_series"]:
        return None
    fig, ax = plt.subplots(figsize=(9, 4))
    xs = [t for t, _ in r["memory_series"]]
    ys = [m for _, m in r["memory_series"]]
    ax.plot(xs, ys, lw=1.5, label="SDK process RSS")
    if r["simulator_memory_series"]:
        ax.plot([t for t, _ in r["simulator_memory_series"]], [m for _, m in r["simulator_memory_series"]],
                lw=1.0, color="tab:gray", label="simulator process RSS")
        ys = ys + [m for _, m in r["simulator_memory_series"]]
    if r["history_series"]:
        base = ys[0]
        ax.plot([t for t, _ in r["history_series"]], [base + m for _, m in r["history_series"]], lw=1.0,
                ls=":", color="tab:green", label="SDK start RSS + conversation history held")
    for i, (t, kind) in enumerate(r["forced_reconnects"]):
        ax.axvline(t, color="tab:red" if kind == "expire" else "tab:orange", lw=0.8, ls="--",
                   label=("forced reconnect (" + kind + ")") if i < 2 else None)
    ax.set_xlabel("simulated minutes")
    ax.set_ylabel("RSS (MB)")
    ax.set_ylim(0, max(ys) * 1.2)
    ax.set_title(f"rtqueue soak: {r['intents']} turns, {r['reconnects']} reconnects, "
                 f"{r['conflicts']} conflicts, {r['lost_intents']} lost intents")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def main(argv: list[str] | None = None) -> int:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=None, help="simulated minutes (default 120; quick 12)")
    p.add_argument("--speed", type=float, default=50.0, help="simulator speed vs real time (default 50)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-wall", type=float, default=600.0, help="stop after this many wall seconds")
    args = p.parse_args(argv)
    minutes = args.minutes if args.minutes is not None else (12.0 if args.quick else 120.0)
    reconnect_every = 3.0 if args.quick else 15.0
    fault_every = 1.5 if args.quick else 5.0
    C.progress(f"soak: {minutes} simulated minutes at {args.speed}x (~{minutes * 60 / args.speed:.0f} s of wall "
               f"time), reconnect every {reconnect_every} min, a random fault every ~{fault_every} min")
    soak = Soak(minutes=minutes, speed=args.speed, reconnect_every_min=reconnect_every,
                fault_every_min=fault_every, seed=args.seed, max_wall=args.max_wall)
    result = soak.run()
    print_table(result)
    name = "soak_quick" if args.quick else "soak"
    out = Path(args.out)
    png = plot(result, out / f"{name}_memory.png")
    written = C.write_json(result, out / f"{name}.json", args.json)
    C.progress("wrote " + ", ".join(written + ([png] if png else [])))
    ok = result["conflicts"] == 0 and result["lost_intents"] == 0 and result["unresolved_handles"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        sys.exit(serve(sys.argv[2:]))
    sys.exit(main())
