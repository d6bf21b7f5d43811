"""Call placement and call checkpoints, the decisions (no I/O, no threads, no clock of its own).

A call worker (:mod:`rtqueue.serve`) and a call router (:mod:`rtqueue.ray_serve`)
ask three questions, answered here as pure functions of values passed in:

- **May this worker take one more call?** :func:`admit` (capacity and drain
  state in, an :class:`Admission` out: a SIP status to reject with when not).
- **Which worker takes the call?** :func:`choose_worker`: the least-loaded
  live, non-draining worker with a free slot (by the fraction of its capacity
  in use, then calls active, then name, so the choice is deterministic).
- **What does a call need to continue elsewhere?** A :class:`Checkpoint`: the
  call id, the agent speaking, the conversation items a re-seed needs, and the
  *pending intents*: responses the worker asked for that have not finished,
  and function calls the model made whose output has not been seen. Built by
  :func:`make_checkpoint`; :func:`resume_plan` says what a new worker must do
  with one (which agent, which tool calls to answer, whether to re-seed).

Checkpoints are plain values with a JSON-able :meth:`Checkpoint.to_dict`, so
any store (a dict, a Ray actor, Redis) can hold them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from .errors import InvalidArgument

__all__ = [
    "BUSY",
    "UNAVAILABLE",
    "Admission",
    "Checkpoint",
    "PendingTool",
    "ResumePlan",
    "WorkerLoad",
    "admit",
    "choose_worker",
    "make_checkpoint",
    "merge_items",
    "pending_tools",
    "resume_plan",
]

#: SIP status for a call refused because every slot is taken (486 Busy Here).
BUSY = 486
#: SIP status for a call refused because the worker is draining or closed (503 Service Unavailable).
UNAVAILABLE = 503
#: Items a checkpoint keeps at most (the newest); older ones are what a re-seed would trim anyway.
MAX_CHECKPOINT_ITEMS = 200


# -- placement --------------------------------------------------------------------------------------


@attrs.frozen
class Admission:
    """The answer of :func:`admit`: ``ok``, or the SIP ``status`` to reject with and why."""

    ok: bool
    status: int | None = None
    reason: str = ""


def admit(active: int, capacity: int, *, draining: bool) -> Admission:
    """Whether a worker with ``active`` calls of ``capacity`` may take one more.

    A draining (or closing) worker refuses with 503; a full one with 486.
    """
    if draining:
        return Admission(False, UNAVAILABLE, "the worker is draining")
    if active >= capacity:
        return Admission(False, BUSY, f"the worker is at capacity ({active}/{capacity} calls)")
    return Admission(True)


@attrs.frozen
class WorkerLoad:
    """One worker's load as a router sees it (also what ``CallWorker.load()`` reports)."""

    name: str
    active: int
    capacity: int
    draining: bool = False
    alive: bool = True
    done: int = 0
    failed: int = 0
    rejected: int = 0
    resumed: int = 0
    cpu_s: float = 0.0
    rss_mb: float = 0.0
    threads: int = 0

    @property
    def free(self) -> int:
        """Slots left (0 when draining or dead)."""
        if self.draining or not self.alive:
            return 0
        return max(0, self.capacity - self.active)

    def to_dict(self) -> dict[str, Any]:
        """The figures as a JSON-able dict (the health endpoint's body)."""
        return {**attrs.asdict(self), "free": self.free}


def choose_worker(loads: Iterable[WorkerLoad], *, exclude: Iterable[str] = ()) -> str | None:
    """The name of the least-loaded worker with a free slot, or ``None`` if none has one.

    Least loaded = the smallest fraction of its capacity in use, then the
    fewest active calls, then the name. ``exclude`` names workers not to use
    (one that just refused, one that died).
    """
    skip = set(exclude)
    best: tuple[float, int, str] | None = None
    for w in loads:
        if w.name in skip or w.free <= 0:
            continue
        key = (w.active / w.capacity if w.capacity > 0 else 1.0, w.active, w.name)
        if best is None or key < best:
            best = key
    return best[2] if best is not None else None


# -- checkpoints -------------------------------------------------------------------------------------


@attrs.frozen
class PendingTool:
    """A function call the model made whose output the worker has not seen in the conversation."""

    call_id: str
    name: str
    arguments: str
    #: The ``function_call`` item's id (where its output goes), when known.
    item_id: str | None = None


def _items(value: object) -> tuple[dict[str, Any], ...]:
    if not isinstance(value, (list, tuple)):
        raise InvalidArgument("Checkpoint items must be a list of conversation items")
    return tuple(json.loads(json.dumps(i)) for i in value if isinstance(i, dict))


@attrs.frozen
class Checkpoint:
    """What one call needs to continue on another worker; a plain value (see the module doc).

    ``seq`` grows with every checkpoint of the call (a store keeps the highest);
    ``responses_pending`` lists why each unfinished response was asked for
    (``"greeting"``, ``"turn"``, ``"resume"``); ``tools_pending`` are function
    calls without a seen output; ``attach_count`` counts the call's
    attachments so far (1 = never moved).
    """

    call_id: str
    agent: str | None
    items: tuple[dict[str, Any], ...] = attrs.field(converter=_items, repr=False)
    responses_pending: tuple[str, ...] = ()
    tools_pending: tuple[PendingTool, ...] = ()
    seq: int = 0
    updated_at: float = 0.0
    worker: str = ""
    attach_count: int = 1
    greeted: bool = False

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (what stores hold)."""
        return {
            "call_id": self.call_id, "agent": self.agent, "items": [dict(i) for i in self.items],
            "responses_pending": list(self.responses_pending),
            "tools_pending": [attrs.asdict(t) for t in self.tools_pending],
            "seq": self.seq, "updated_at": self.updated_at, "worker": self.worker,
            "attach_count": self.attach_count, "greeted": self.greeted,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Checkpoint:
        """The inverse of :meth:`to_dict`; raises :class:`InvalidArgument` for a malformed dict."""
        try:
            return cls(
                call_id=str(data["call_id"]), agent=data.get("agent"), items=list(data.get("items") or ()),
                responses_pending=tuple(str(r) for r in data.get("responses_pending") or ()),
                tools_pending=tuple(PendingTool(str(t["call_id"]), str(t["name"]), str(t["arguments"]),
                                                t.get("item_id"))
                                    for t in data.get("tools_pending") or ()),
                seq=int(data.get("seq", 0)), updated_at=float(data.get("updated_at", 0.0)),
                worker=str(data.get("worker", "")), attach_count=int(data.get("attach_count", 1)),
                greeted=bool(data.get("greeted", False)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgument(f"not a checkpoint: {exc!r}") from None


def merge_items(carried: Sequence[Mapping[str, Any]], current: Sequence[Mapping[str, Any]],
                limit: int = MAX_CHECKPOINT_ITEMS) -> list[dict[str, Any]]:
    """Items carried from earlier attachments followed by this attachment's, by id, newest ``limit`` kept.

    An item known to both is taken from ``current`` (it may have gained a
    transcript) at its first position.
    """
    order: list[str] = []
    by_id: dict[str, dict[str, Any]] = {}
    anonymous: list[dict[str, Any]] = []
    for source in (carried, current):
        for item in source:
            iid = item.get("id")
            if not isinstance(iid, str) or not iid:
                anonymous.append(dict(item))
                continue
            if iid not in by_id:
                order.append(iid)
            by_id[iid] = dict(item)
    out = [by_id[i] for i in order] + anonymous
    return out[-limit:] if limit >= 0 else out


def pending_tools(items: Iterable[Mapping[str, Any]]) -> list[PendingTool]:
    """Function calls in ``items`` that no ``function_call_output`` item answers, in order."""
    seen = list(items)
    answered = {i.get("call_id") for i in seen if i.get("type") == "function_call_output"}
    out = []
    for i in seen:
        cid = i.get("call_id")
        if i.get("type") == "function_call" and isinstance(cid, str) and cid not in answered:
            iid = i.get("id")
            out.append(PendingTool(cid, str(i.get("name") or ""), str(i.get("arguments") or ""),
                                   iid if isinstance(iid, str) and iid else None))
    return out


def make_checkpoint(
    call_id: str,
    *,
    agent: str | None,
    carried: Sequence[Mapping[str, Any]],
    items: Sequence[Mapping[str, Any]],
    responses_pending: Iterable[str],
    seq: int,
    now: float,
    worker: str,
    attach_count: int,
    greeted: bool,
) -> Checkpoint:
    """A checkpoint from a worker's view of one call (``now`` is the caller's clock, wall seconds).

    A function call whose tool runs right now is pending too: its output is not in ``items`` yet.
    """
    merged = merge_items(carried, items)
    tools = pending_tools(merged)
    return Checkpoint(call_id=call_id, agent=agent, items=merged, responses_pending=tuple(responses_pending),
                      tools_pending=tuple(tools), seq=seq, updated_at=now, worker=worker,
                      attach_count=attach_count, greeted=greeted)


@attrs.frozen
class ResumePlan:
    """What a worker re-attaching a call from a :class:`Checkpoint` does, in order.

    1. attach with ``agent`` speaking (``None``: the app's start agent);
    2. probe whether the call's server session still holds ``probe_item``
       (the newest item it should have); if not, re-create ``reseed`` items;
    3. answer ``handoffs`` (switch agent, send the output) and ``tools`` (run,
       send the output) the old worker never answered;
    4. ask for one response (``respond``): it answers a turn the caller ended
       while nobody was attached, a response the old worker had asked for, or
       the tool outputs of step 3.
    """

    agent: str | None
    probe_item: str | None
    reseed: tuple[dict[str, Any], ...]
    tools: tuple[PendingTool, ...]
    handoffs: tuple[tuple[PendingTool, str], ...]
    respond: bool
    reissued: int


def resume_plan(checkpoint: Checkpoint, handoff_target: Mapping[str, str]) -> ResumePlan:
    """The :class:`ResumePlan` for ``checkpoint``.

    ``handoff_target`` maps handoff tool names of the checkpoint's agent to
    their target agent names (``transfer_to_billing`` -> ``billing``).
    """
    agent = checkpoint.agent
    tools: list[PendingTool] = []
    handoffs: list[tuple[PendingTool, str]] = []
    for t in checkpoint.tools_pending:
        target = handoff_target.get(t.name)
        if target is not None:
            handoffs.append((t, target))
            agent = target
        else:
            tools.append(t)
    probe = None
    for item in reversed(checkpoint.items):
        if isinstance(item.get("id"), str) and item.get("id"):
            probe = item["id"]
            break
    return ResumePlan(
        agent=agent, probe_item=probe, reseed=checkpoint.items, tools=tuple(tools), handoffs=tuple(handoffs),
        # Always one response: a turn the caller ended while nobody was attached is unknown to us,
        # and with worker-driven turns nobody answered it.
        respond=True,
        reissued=len(checkpoint.responses_pending) + len(tools) + len(handoffs),
    )
