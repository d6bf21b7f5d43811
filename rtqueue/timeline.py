"""A conversation on a time axis: ``rtqueue timeline call.jsonl -o call.html``.

Reads a recording (:mod:`rtqueue.recording`, a client recording or the
simulator's trace) and writes one self-contained HTML page (Plotly, its
JavaScript inlined from the installed ``plotly`` package: nothing is fetched
when the page is viewed). Needs the ``[timeline]`` extra (``plotly``).

Lanes, top to bottom:

- **user**: user speech (``input_audio_buffer.speech_started`` ->
  ``speech_stopped``), and user text messages as points;
- one lane **per agent**: each response as a bar from ``response.created``
  to ``response.done``, coloured by its status. The agent of a response is
  the one whose instructions were last sent (``session.update``) before the
  response was created; an agent is named after the ``transfer_to_<name>``
  handoff call that led to its instructions, the first one after the
  header's ``config["agent"]`` (or "agent" when the recording does not say);
- **gate**: for each in-band ``response.create``, the time from the client
  sending it to the server's ``response.created`` (matched by the metadata
  echo, else by order), and the time it waited in the gate before it was
  sent: a client recording notes it with the frame (``note.gate_wait_ms``);
  a simulator trace cannot know it, so there, when the previous response
  had just finished, the time since that ``response.done`` stands in;
- **tools**: each function call from ``response.function_call_arguments.done``
  to the client's ``function_call_output``; handoff calls also as points on
  **handoffs**;
- **barge-ins**: ``response.cancel`` and ``conversation.item.truncate``, the
  latter with the played (``audio_end_ms``) vs received milliseconds;
- **errors** and **connections** (a new connection index = a reconnect).

Hovering a bar shows its events.
"""

from __future__ import annotations

import html
import json
import os
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import attrs

from .recording import Frame, Recording, audio_ms, read_recording

__all__ = ["Bar", "build_bars", "render_html", "write_timeline"]

STATUS_COLORS = {
    "completed": "#2e7d32",
    "cancelled": "#ef6c00",
    "incomplete": "#f9a825",
    "failed": "#c62828",
    "in_progress": "#9e9e9e",
}


@attrs.define
class Bar:
    """One mark on the timeline: ``start``/``end`` in seconds (equal for a point)."""

    lane: str
    kind: str  # response, speech, gate, tool, handoff, barge_in, error, connection, user_text
    start: float
    end: float
    label: str
    hover: list[str] = attrs.Factory(list)
    status: str | None = None


def _short(event: Mapping[str, Any], limit: int = 160) -> str:
    keep = {k: v for k, v in event.items() if k not in ("delta", "audio", "event_id")}
    text = json.dumps(keep, separators=(",", ":"), default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _metadata_values(obj: Any) -> set[str]:
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    return {str(v) for v in meta.values()} if isinstance(meta, Mapping) else set()


def build_bars(rec: Recording) -> list[Bar]:
    """The marks of a recording's timeline (see the module docstring)."""
    bars: list[Bar] = []
    config = rec.config
    first_agent = str(config.get("agent") or "agent")
    names: dict[str, str] = {}  # instructions -> agent name
    first_instructions: str | None = None
    current = first_agent
    pending_handoff: str | None = None
    speech_start: dict[str, float] = {}
    responses: dict[str, Bar] = {}
    creates: list[tuple[Frame, set[str]]] = []  # in-band creates not matched yet
    last_done: float | None = None
    calls: dict[str, tuple[float, str, Frame]] = {}
    received_ms: dict[str, float] = defaultdict(float)
    out_format: Any = None
    session: int | None = None

    for f in rec.frames:
        if session is not None and f.session != session:
            bars.append(Bar("connections", "connection", f.t, f.t, f"connection {f.session}",
                            [f"new connection (index {f.session}): a reconnect"]))
        session = f.session
        ev = f.event
        if ev is None:
            what = f"raw frame {f.raw!r}" if f.raw is not None else f"binary frame of {f.binary_len} bytes"
            bars.append(Bar("errors", "error", f.t, f.t, "bad frame", [f"{f.sender}: {what}"]))
            continue
        kind = f.type or ""
        if f.sender == "client":
            if kind == "session.update":
                sess = ev.get("session") or {}
                instructions = sess.get("instructions")
                fmt = ((sess.get("audio") or {}).get("output") or {}).get("format")
                if fmt is not None:
                    out_format = fmt
                if isinstance(instructions, str):
                    if pending_handoff is not None:
                        names.setdefault(instructions, pending_handoff)
                        if instructions == first_instructions and first_agent == "agent":
                            # Handed back to the first agent: now we know its name.
                            for b in bars:
                                if b.lane == "agent":
                                    b.lane = pending_handoff
                        pending_handoff = None
                    elif first_instructions is None:
                        first_instructions = instructions
                        names.setdefault(instructions, first_agent)
                    current = names.get(instructions, current)
            elif kind == "response.create":
                resp = ev.get("response") or {}
                if resp.get("conversation") != "none":
                    creates.append((f, _metadata_values(resp)))
                    waited = (f.note or {}).get("gate_wait_ms")
                    if isinstance(waited, (int, float)) and waited > 0:  # a client recording knows it
                        bars.append(Bar("gate", "gate", f.t - waited / 1000.0, f.t, "waited in the gate",
                                        [f"waited {waited:.1f} ms in the gate before it was sent", _short(ev)]))
                    elif last_done is not None and 0 <= f.t - last_done < 0.25:
                        bars.append(Bar("gate", "gate", last_done, f.t, "after done",
                                        [f"sent {1000 * (f.t - last_done):.0f} ms after the previous "
                                         "response.done", _short(ev)]))
            elif kind == "conversation.item.create":
                item = ev.get("item") or {}
                if item.get("type") == "function_call_output" and item.get("call_id") in calls:
                    start, name, done = calls.pop(item["call_id"])
                    bars.append(Bar("tools", "tool", start, f.t, name,
                                    [f"{name}: {1000 * (f.t - start):.0f} ms", _short(done.event or {}),
                                     _short(ev)]))
                elif item.get("role") == "user":
                    text = " ".join(str(c.get("text", "")) for c in item.get("content") or [] if isinstance(c, dict))
                    bars.append(Bar("user", "user_text", f.t, f.t, "text", [f"user: {text[:200]}"]))
            elif kind == "response.cancel":
                bars.append(Bar("barge-ins", "barge_in", f.t, f.t, "cancel", [_short(ev)]))
            elif kind == "conversation.item.truncate":
                item_id = str(ev.get("item_id"))
                played = ev.get("audio_end_ms")
                got = received_ms.get(item_id, 0.0)
                bars.append(Bar("barge-ins", "barge_in", f.t, f.t, "truncate",
                                [f"played {played} ms of {got:.0f} ms received "
                                 f"(truncated {max(0.0, got - float(played or 0)):.0f} ms)", _short(ev)]))
            continue
        # server
        if kind == "input_audio_buffer.speech_started":
            speech_start[str(ev.get("item_id"))] = f.t
        elif kind == "input_audio_buffer.speech_stopped":
            start = speech_start.pop(str(ev.get("item_id")), f.t)
            bars.append(Bar("user", "speech", start, f.t, "speech", [f"user speech {1000 * (f.t - start):.0f} ms"]))
        elif kind == "response.created":
            resp = ev.get("response") or {}
            rid = str(resp.get("id"))
            bar = Bar(current, "response", f.t, f.t, rid, [f"response.created {rid} ({current})"],
                      status="in_progress")
            responses[rid] = bar
            bars.append(bar)
            if resp.get("conversation_id") is not None or resp.get("conversation") != "none":
                meta = _metadata_values(resp)
                match = next((c for c in creates if meta and c[1] & meta), None)
                if match is None and creates and not (creates[0][1] and meta):
                    match = creates[0]
                if match is not None:
                    creates.remove(match)
                    sent = match[0]
                    bars.append(Bar("gate", "gate", sent.t, f.t, "create→created",
                                    [f"response.create sent -> response.created {rid}: "
                                     f"{1000 * (f.t - sent.t):.0f} ms", _short(sent.event or {})]))
        elif kind == "response.done":
            resp = ev.get("response") or {}
            rid = str(resp.get("id"))
            found = responses.get(rid)
            if found is None:  # a done whose created was never sent
                found = Bar(current, "response", f.t, f.t, rid, ["(no response.created)"])
                bars.append(found)
            found.end = f.t
            found.status = str(resp.get("status"))
            found.hover.append(f"response.done {found.status} {_short(resp.get('status_details') or {}, 80)}")
            last_done = f.t
        elif kind == "response.output_audio.delta":
            item_id = str(ev.get("item_id"))
            ms = ev.get("rtq_audio_ms")
            if isinstance(ms, (int, float)):
                received_ms[item_id] += float(ms)
            elif isinstance(ev.get("delta"), str):
                received_ms[item_id] += audio_ms(ev["delta"], out_format)
        elif kind == "response.output_audio_transcript.done" or kind == "response.output_text.done":
            rid = str(ev.get("response_id"))
            if rid in responses:
                said = ev.get("transcript") if "transcript" in ev else ev.get("text")
                responses[rid].hover.append(f"says: {str(said)[:200]}")
        elif kind == "response.function_call_arguments.done":
            name = str(ev.get("name"))
            calls[str(ev.get("call_id"))] = (f.t, name, f)
            handoff_target: str | None = None
            rid = str(ev.get("response_id"))
            if rid in responses:
                responses[rid].hover.append(f"calls {name}({str(ev.get('arguments'))[:80]})")
            if name.startswith("transfer_to_"):
                handoff_target = name[len("transfer_to_"):]
                pending_handoff = handoff_target
                bars.append(Bar("handoffs", "handoff", f.t, f.t, pending_handoff,
                                [f"handoff {current} -> {pending_handoff}"]))
        elif kind == "error":
            err = ev.get("error") or {}
            bars.append(Bar("errors", "error", f.t, f.t, str(err.get("code")),
                            [f"error {err.get('code')}: {str(err.get('message'))[:200]}"]))
        if ev.get("type", "").startswith("response.") and "response_id" in ev:
            bar_ = responses.get(str(ev["response_id"]))
            if bar_ is not None and kind.endswith(".done") and len(bar_.hover) < 30:
                bar_.hover.append(kind)
    return bars


_SCRIPT = """
window.addEventListener("error", function (e) {
  document.body.dataset.errors = (document.body.dataset.errors || "") + String(e.message) + ";";
});
var spec = @SPEC@;
Plotly.newPlot("rtq-timeline", spec.data, spec.layout, {responsive: true}).then(function (gd) {
  var n = 0;
  gd.querySelectorAll(".barlayer .trace").forEach(function (t, i) {
    var d = gd.data.filter(function (x) { return x.type === "bar"; })[i];
    if (d && d.meta === "response") { n += t.querySelectorAll(".point").length; }
  });
  document.body.dataset.responseBars = String(n);
  document.body.dataset.rendered = "1";
  console.log("rtqueue-timeline response bars: " + n);
});
"""


def _plotly_js() -> str:
    from plotly.offline import get_plotlyjs  # type: ignore[import-untyped]  # the [timeline] extra

    return str(get_plotlyjs())


def render_html(rec: Recording, *, title: str = "rtqueue timeline") -> str:
    """The self-contained HTML page of a recording's timeline."""
    bars = build_bars(rec)
    agent_lanes = list(dict.fromkeys(b.lane for b in bars if b.kind == "response"))
    lanes = ["connections", "errors", "barge-ins", "handoffs", "tools", "gate", *reversed(agent_lanes), "user"]
    traces: list[dict[str, Any]] = []
    groups: dict[tuple[str, str], list[Bar]] = defaultdict(list)
    for b in bars:
        key = (b.kind, b.status or "") if b.kind == "response" else (b.kind, "")
        groups[key].append(b)
    point_kinds = {"handoff", "barge_in", "error", "connection", "user_text"}
    colors = {"speech": "#1565c0", "gate": "#8e24aa", "tool": "#00838f", "handoff": "#6d4c41",
              "barge_in": "#d84315", "error": "#b71c1c", "connection": "#37474f", "user_text": "#1565c0"}
    for (kind, status), group in sorted(groups.items()):
        hover = ["<br>".join(html.escape(h) for h in [b.label, *b.hover[:25]]) for b in group]
        name = f"response ({status})" if kind == "response" else kind
        if kind in point_kinds:
            traces.append({"type": "scatter", "mode": "markers", "name": name, "x": [b.start for b in group],
                           "y": [b.lane for b in group], "hovertext": hover, "hoverinfo": "text",
                           "marker": {"size": 11, "symbol": "diamond", "color": colors.get(kind, "#555")},
                           "meta": kind})
        else:
            traces.append({"type": "bar", "orientation": "h", "name": name, "base": [b.start for b in group],
                           "x": [max(b.end - b.start, 0.004) for b in group], "y": [b.lane for b in group],
                           "hovertext": hover, "hoverinfo": "text", "meta": kind,
                           "marker": {"color": STATUS_COLORS.get(status, "#607d8b") if kind == "response"
                                      else colors.get(kind, "#555")}})
    layout = {
        "title": {"text": title},
        "barmode": "overlay",
        "xaxis": {"title": {"text": "seconds since the recording started"}, "zeroline": False},
        "yaxis": {"categoryorder": "array", "categoryarray": lanes, "type": "category"},
        "height": 180 + 40 * len(lanes),
        "hovermode": "closest",
        "legend": {"orientation": "h", "y": -0.25},
        "margin": {"l": 110},
    }
    n_responses = sum(1 for b in bars if b.kind == "response")
    spec = json.dumps({"data": traces, "layout": layout}, default=str).replace("</", "<\\/")
    script = _SCRIPT.replace("@SPEC@", spec)
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title>"
        f"<script>{_plotly_js()}</script></head>\n"
        f"<body data-responses=\"{n_responses}\">"
        "<div id=\"rtq-timeline\" style=\"width:100%;\"></div>\n"
        f"<script>{script}</script></body></html>\n"
    )


def write_timeline(recording: str | os.PathLike[str] | Recording, out: str | os.PathLike[str]) -> int:
    """Write the HTML timeline of ``recording`` to ``out``; returns the number of responses drawn."""
    rec = recording if isinstance(recording, Recording) else read_recording(recording)
    title = f"rtqueue timeline: {os.path.basename(os.fspath(recording))}" if not isinstance(
        recording, Recording) else "rtqueue timeline"
    page = render_html(rec, title=title)
    with open(out, "w", encoding="utf-8") as fh:
        fh.write(page)
    return sum(1 for b in build_bars(rec) if b.kind == "response")
