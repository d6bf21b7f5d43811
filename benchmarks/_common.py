"""Shared helpers for the benchmark scripts (not a benchmark itself: no ``bench_`` prefix).

- :class:`SimProcess`: the Realtime simulator in its own process (so the client
  process's CPU time and GIL belong to the client under test alone), driven
  over stdin/stdout JSON lines by ``_simproc.py``;
- :func:`tally`: per-create outcomes counted from the simulator's own logs
  (intents, lost intents, duplicates, user-visible conflicts);
- small statistics, PCM, table, JSON and chart helpers.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import select
import subprocess
import sys
import time
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from rtqueue.sim.synth import hum, silence  # noqa: E402 - needs the path above

CONFLICT = "conversation_already_has_active_response"


# -- statistics ----------------------------------------------------------------------------


def percentile(values: Iterable[float], q: float) -> float | None:
    """Nearest-rank percentile; ``None`` for no data."""
    data = sorted(values)
    if not data:
        return None
    k = min(len(data) - 1, max(0, round(q / 100.0 * len(data) + 0.5) - 1))
    return data[k]


def latency_summary(values_ms: Sequence[float] | None) -> dict[str, float | int | None]:
    """p50 / p99 / max / n of a list of milliseconds (all ``None`` when not measurable)."""
    if values_ms is None:
        return {"p50": None, "p99": None, "max": None, "n": 0}
    return {
        "p50": percentile(values_ms, 50),
        "p99": percentile(values_ms, 99),
        "max": max(values_ms) if values_ms else None,
        "n": len(values_ms),
    }


def deep_size(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes held by ``obj`` and everything it references, each object once.

    Follows dicts, sequences, sets, deques, attrs classes and ``__slots__``
    objects (what the session's stores are made of).
    """
    import attrs

    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    size = sys.getsizeof(obj)
    if isinstance(obj, dict):
        size += sum(deep_size(k, seen) + deep_size(v, seen) for k, v in list(obj.items()))
    elif isinstance(obj, (list, tuple, set, frozenset, deque)):
        size += sum(deep_size(x, seen) for x in list(obj))
    elif attrs.has(type(obj)):
        size += sum(deep_size(getattr(obj, f.name), seen) for f in attrs.fields(type(obj)))
    elif hasattr(type(obj), "__slots__"):
        size += sum(deep_size(getattr(obj, k), seen) for k in type(obj).__slots__ if hasattr(obj, k))
    return size


class GcPauses:
    """Times the cyclic garbage collector's runs while ``on`` (``gc.callbacks``).

    A collection runs with the GIL held, on whichever thread triggered it:
    every thread of the process waits it out, so a long full collection shows
    up as a latency tail in any client. ``summary()`` gives counts, total and
    longest pause.
    """

    def __init__(self) -> None:
        self.on = False
        self.pauses: list[tuple[int, float]] = []  # (generation, ms)
        self._t0: float | None = None
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if not self.on:
            self._t0 = None
        elif phase == "start":
            self._t0 = time.perf_counter()
        elif self._t0 is not None:
            self.pauses.append((int(info["generation"]), (time.perf_counter() - self._t0) * 1000.0))
            self._t0 = None

    def close(self) -> None:
        """Stop listening (idempotent)."""
        self.on = False
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def summary(self) -> dict[str, float | int]:
        """``gc_collections``, ``gc_full_collections``, ``gc_ms_total``, ``gc_max_ms`` over the time ``on``."""
        return {
            "gc_collections": len(self.pauses),
            "gc_full_collections": sum(1 for g, _ in self.pauses if g == 2),
            "gc_ms_total": round(sum(ms for _, ms in self.pauses), 1),
            "gc_max_ms": round(max((ms for _, ms in self.pauses), default=0.0), 2),
        }


def rss_mb() -> float:
    """Resident set size of this process in MB (from /proc; 0.0 where unavailable)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        # other work on the machine skews latency figures: say how busy it was
        "loadavg_1_5_15min": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }


# -- audio ---------------------------------------------------------------------------------


# The user's voice in workloads: the same hum the tests use (rtqueue.sim.synth).
speech_pcm = hum
silence_pcm = silence


# -- the simulator in its own process ---------------------------------------------------------


class SimProcess:
    """``rtqueue.sim.Simulator`` in a child process; ``url``, ``stats()``, ``tally()``, ``close()``.

    Traffic stays on 127.0.0.1. Every call has a timeout; ``close`` ends the
    child (terminate, then kill) even if it stopped answering.
    """

    def __init__(self, **sim_kwargs: Any) -> None:
        sim_kwargs.setdefault("host", "127.0.0.1")
        if sim_kwargs["host"] != "127.0.0.1":
            raise ValueError("benchmarks only talk to 127.0.0.1")
        self._proc = subprocess.Popen(
            [sys.executable, str(HERE / "_simproc.py"), json.dumps(sim_kwargs)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            env={**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")},
        )
        hello = self._read(30.0)
        self.url: str = hello["url"]
        self.pid: int = hello["pid"]

    def _read(self, timeout: float) -> dict[str, Any]:
        assert self._proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("simulator process did not answer in time")
            ready, _, _ = select.select([self._proc.stdout], [], [], left)
            if ready:
                line = self._proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"simulator process ended (rc={self._proc.poll()})")
                if line.startswith("{"):
                    return json.loads(line)

    def call(self, op: str, timeout: float = 60.0, **args: Any) -> dict[str, Any]:
        """Send one command and return its JSON answer."""
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self._proc.stdin.flush()
        return self._read(timeout)

    def stats(self) -> dict[str, Any]:
        """``Simulator.stats()`` of the child."""
        return self.call("stats")

    def tally(self, session: int | None = None) -> dict[str, Any]:
        """:func:`tally` computed in the child from its recorded frames."""
        return self.call("tally", session=session)

    def wait_quiet(self, timeout: float) -> bool:
        """Wait until no response is active server-side (True) or ``timeout``."""
        return bool(self.call("quiet", timeout=timeout + 10.0, wait=timeout)["quiet"])

    def close(self) -> None:
        """End the child process (bounded)."""
        if self._proc.poll() is None:
            try:
                assert self._proc.stdin is not None
                self._proc.stdin.write('{"op": "quit"}\n')
                self._proc.stdin.flush()
            except (OSError, ValueError):
                pass
            try:
                self._proc.wait(10.0)
            except subprocess.TimeoutExpired:
                self._proc.terminate()
                try:
                    self._proc.wait(5.0)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait(5.0)
        for f in (self._proc.stdin, self._proc.stdout):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass

    def __enter__(self) -> SimProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- counting outcomes from the server's own logs -------------------------------------------------


def tally(client_events: list[dict[str, Any]], server_events: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-create outcomes, as the server saw them.

    Every in-band ``response.create`` received is either answered by a
    ``response.created`` or by an ``error`` naming its ``event_id``. A create's
    *intent* is ``response.metadata.bench_intent`` when the client tagged it
    (app requests, follow-ups), else its ``event_id`` (so a retry that re-sends
    the same event id counts as the same intent). An intent is **lost** when
    none of its creates succeeded, and has **duplicates** when more than one did.
    A conflict is **user-visible** when its create never succeeded (nobody
    retried it); a retried one is counted as a server race.
    """
    sent: Counter[str] = Counter()
    key_of: dict[str, str] = {}
    truncates: set[str] = set()
    anon = 0
    for ev in client_events:
        if ev.get("type") == "conversation.item.truncate" and isinstance(ev.get("event_id"), str):
            truncates.add(ev["event_id"])
        if ev.get("type") != "response.create":
            continue
        resp = ev.get("response") if isinstance(ev.get("response"), dict) else {}
        if resp.get("conversation") == "none":
            continue
        eid = ev.get("event_id")
        if not isinstance(eid, str):
            anon += 1
            eid = f"(no event_id #{anon})"
        meta = resp.get("metadata") if isinstance(resp.get("metadata"), dict) else {}
        key_of[eid] = str(meta.get("bench_intent") or eid)
        sent[eid] += 1
    failed: Counter[str] = Counter()
    conflicted: Counter[str] = Counter()
    codes: Counter[str] = Counter()
    truncate_errors = 0
    created = 0
    server_initiated = 0
    cancelled = 0
    for ev in server_events:
        typ = ev.get("type")
        if typ == "error":
            err = ev.get("error") if isinstance(ev.get("error"), dict) else {}
            eid = err.get("event_id")
            code = str(err.get("code"))
            codes[code] += 1
            if (eid in truncates or code == "item_truncate_invalid_item_id"
                    or (code == "invalid_value" and err.get("param") == "audio_end_ms")):
                truncate_errors += 1
            if isinstance(eid, str) and eid in sent:
                failed[eid] += 1
                if err.get("code") == CONFLICT:
                    conflicted[eid] += 1
        elif typ == "response.created":
            created += 1
            meta = (ev.get("response") or {}).get("metadata")
            if not meta:
                server_initiated += 1
        elif typ == "response.done" and (ev.get("response") or {}).get("status") == "cancelled":
            cancelled += 1
    ok_by_key: Counter[str] = Counter()
    for eid, n in sent.items():
        ok_by_key[key_of[eid]] += max(0, n - failed[eid])
    return {
        "creates": sum(sent.values()),
        "intents_on_wire": len(ok_by_key),
        "ok_by_key": dict(ok_by_key),
        "lost_keys": sorted(k for k, n in ok_by_key.items() if n == 0),
        "duplicates": sum(max(0, n - 1) for n in ok_by_key.values()),
        "conflicts": sum(conflicted.values()),
        "user_visible_conflicts": sum(1 for eid in conflicted if sent[eid] - failed[eid] <= 0),
        "responses_created": created,
        "responses_untagged": server_initiated,
        "responses_cancelled": cancelled,
        "errors": dict(codes),
        "truncate_errors": truncate_errors,
        "guard": guard_tally(server_events),
    }


#: What every guardrail correction message says (openai-agents' own text; bench_conflicts' rtqueue note repeats it).
CORRECTION_MARK = "guardrail triggered"


def _message_text(item: dict[str, Any]) -> str:
    parts = item.get("content") if isinstance(item.get("content"), list) else []
    return " ".join(str(p.get("text") or p.get("transcript") or "") for p in parts if isinstance(p, dict))


def guard_tally(server_events: list[dict[str, Any]]) -> dict[str, int]:
    """Guardrail corrections as the server saw them (bench_conflicts' ``guardrails`` workload).

    A *correction* is a user or system message item whose text holds
    :data:`CORRECTION_MARK`. Walking the server's events in wire order:

    - a correction is **answered** by the first response created after it was
      added and before the next user message that is not a correction (the
      script's next turn); one still open at that message, or at the end, is
      **unanswered**;
    - a response created after the one that answered a correction, with no new
      input in between (no function call output, no user or system message),
      answers that correction again: a **duplicate answer**.

    Responses created with ``conversation: "none"`` are out of band and skipped.
    """
    open_corrections = 0
    items = answered = unanswered = duplicates = 0
    answering = False  # the latest response answered a correction and nothing new came since
    for ev in server_events:
        typ = ev.get("type")
        if typ == "conversation.item.added":
            item = ev.get("item") if isinstance(ev.get("item"), dict) else {}
            kind, role = item.get("type"), item.get("role")
            if kind == "message" and role in ("user", "system") and CORRECTION_MARK in _message_text(item):
                items += 1
                open_corrections += 1
                answering = False
            elif kind == "message" and role == "user":
                unanswered += open_corrections
                open_corrections = 0
                answering = False
            elif kind in ("function_call_output", "message") and role != "assistant":
                answering = False
        elif typ == "response.created":
            resp = ev.get("response") if isinstance(ev.get("response"), dict) else {}
            if resp.get("conversation_id") == "none" or resp.get("conversation") == "none":
                continue
            if open_corrections:
                answered += open_corrections
                open_corrections = 0
                answering = True
            elif answering:
                duplicates += 1
    return {"correction_items": items, "answered": answered, "unanswered": unanswered + open_corrections,
            "duplicate_answers": duplicates}


# -- output ----------------------------------------------------------------------------------------


def base_parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark script takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a short run (smoke test)")
    p.add_argument("--out", default=str(HERE / "results"), help="folder for the JSON and PNG results")
    p.add_argument("--json", metavar="FILE", help="also write the raw results to this JSON file")
    return p


def fmt(v: Any, nd: int = 2) -> str:
    """Table cell text."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def table(rows: list[dict[str, Any]], cols: list[tuple[str, str]], nd: int = 2) -> str:
    """A Markdown table of ``rows`` with ``(key, header)`` columns."""
    head = "| " + " | ".join(h for _, h in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    lines = [head, sep]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(k), nd) for k, _ in cols) + " |")
    return "\n".join(lines)


def write_json(data: dict[str, Any], *paths: str | os.PathLike[str] | None) -> list[str]:
    """Write ``data`` to each non-None path; returns the paths written."""
    written = []
    for p in paths:
        if p is None:
            continue
        path = Path(p)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
        written.append(str(path))
    return written


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or ``None`` when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def progress(msg: str) -> None:
    """One progress line, flushed at once."""
    print(msg, flush=True)


def machine_cpu_text(mach: dict[str, Any]) -> str:
    """bench_scale's ``machine_cpu`` figures as one sentence (printed by the benchmark and by _report)."""
    return (f"busy {mach['busy_pct']}, idle {mach['idle_pct']}, hypervisor steal {mach['steal_pct']}, "
            f"unaccounted {mach.get('unaccounted_pct', '-')} (ticks the guest missed: likely host contention)")


def scheduler_table(sched: dict[str, Any] | None) -> str | None:
    """bench_scale's ``scheduler`` figures as a Markdown table (client per thread kind, simulator total)."""
    if not sched or sched.get("client") is None:
        return None
    rows = [{"process": proc, "threads": kind, **vals}
            for proc in ("client", "sim") for kind, vals in (sched.get(proc) or {}).items()
            if (proc == "client" or kind == "total") and vals["switches_in_per_s"] > 0]
    return table(rows, [("process", "process"), ("threads", "threads"), ("cpu_pct", "CPU %"),
                        ("runq_wait_pct", "run-queue wait, % of a CPU"), ("switches_in_per_s", "switches in /s"),
                        ("wait_per_switch_us", "wait per switch us")], nd=1)
