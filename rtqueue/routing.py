"""The gate's side of a server event, before the conversation core sees it.

One piece of code serves the session's reader (:mod:`rtqueue.shell`), the
replay of a recording into the core (:func:`rtqueue.recording.replay_core`) and
the core's property tests, so the three cannot drift apart. Per event:

- ``response.created``: matched to our create by the metadata tag; an untagged
  one is the answer to our untagged pending create (the app used all 16
  metadata pairs), or, until the server has echoed a tag once (a proxy may
  strip ``response.metadata``), a *candidate* answer to our pending create,
  decided at that response's ``response.done`` unless the create earns a
  conflict error first (then it was a server-VAD response);
- ``response.done``: the core notes the id as finished *before* the gate
  releases it (a cancel still queued for it is moot), and says whether a tool
  chain follows, in which case the gate holds the slot for its follow-up;
- ``error``: the gate's verdict on our create (``"retry"``/``"reject"``).
"""

from __future__ import annotations

import contextlib
import re
from typing import TYPE_CHECKING, Any

import attrs

from .core import ConversationCore, response_ids
from .errors import ServerError
from .gate import ResponseGate, Verdict

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

__all__ = ["GateRouter", "Routed"]

_VERDICTS = {Verdict.RETRY: "retry", Verdict.REJECT: "reject"}
_RESPONSE_ID = re.compile(r"\bresp_[A-Za-z0-9]+")


@attrs.frozen
class Routed:
    """What the gate made of an event: the core's ``verdict`` and ``matched`` inputs, and a release."""

    verdict: str | None = None
    matched: str | None = None
    released: bool = False  # a response.done freed the slot (a waiting writer may go)
    error: ServerError | None = None  # an ``error`` event, parsed


_NOTHING = Routed()


class GateRouter:
    """Tells ``gate`` about each server event first (see the module docstring). Not thread-safe:
    the session's reader alone calls it. ``holds=False`` never holds the slot for a tool chain (a
    replay whose follow-ups are recorded creates of their own)."""

    def __init__(self, gate: ResponseGate, *, holds: bool = True) -> None:
        self.gate = gate
        self._holds = holds
        self._echo_seen = False  # a response.created carried our metadata tag back
        self._candidate: tuple[str, str] | None = None  # (response id, our pending create's event id)

    def route(self, event: dict[str, Any], core: ConversationCore,
              guard: AbstractContextManager[Any] | None = None) -> Routed:
        """The gate's part of ``event``; ``guard`` is held around the calls into ``core``."""
        typ = event["type"]
        if typ == "response.created":
            return self._created(event)
        if typ == "response.done":
            return self._done(event, core, guard or contextlib.nullcontext())
        if typ == "error":
            err = ServerError.from_event(event)
            if self._candidate is not None and err.event_id == self._candidate[1]:
                self._candidate = None  # our create was refused: the candidate was the server's own
            raw = self.gate.on_error(err.event_id, err.code)
            if raw is Verdict.RETRY:
                with guard or contextlib.nullcontext():  # the session mutex, then the gate: the lock order
                    self._hold_named_response(err, core)
            verdict = _VERDICTS.get(raw)  # type: ignore[arg-type]
            return Routed(verdict=verdict, error=err)
        return _NOTHING

    def _hold_named_response(self, err: ServerError, core: ConversationCore) -> None:
        """A conflict names the response in the way ("...in progress: resp_X."); take its slot if unknown.

        A socket attached mid-response (a SIP call re-attached with
        ``?call_id=``) never saw that response's ``response.created``: without
        this the retried create would go out at once and conflict again, up
        to the retry bound. With it, the retry waits for that ``response.done``.
        """
        found = _RESPONSE_ID.search(err.message or "")
        if found is None:
            return
        rid = found.group(0)
        if any(e.response_id == rid for e in self.gate.entries()) or core.is_finished(rid):
            return  # known, or its response.done was read already: a slot now would never be freed
        self.gate.on_created(rid, None, in_band=True)

    def _created(self, event: dict[str, Any]) -> Routed:
        resp, rid, eid = response_ids(event)
        in_band = (resp["conversation_id"] is not None) if "conversation_id" in resp else None
        matched = None
        if eid is not None:
            self._echo_seen = True
            self._candidate = None
        elif in_band is not False:
            matched = self.gate.untagged_pending()
            if matched is None and not self._echo_seen:
                pending = self.gate.untagged_pending(any_pending=True)
                self._candidate = (rid, pending) if pending is not None else None
        self.gate.on_created(rid, eid or matched, in_band=in_band)
        return Routed(matched=matched)

    def _done(self, event: dict[str, Any], core: ConversationCore, guard: AbstractContextManager[Any]) -> Routed:
        _resp, rid, eid = response_ids(event)
        matched = None
        candidate = self._candidate
        if candidate is not None and candidate[0] == rid:
            self._candidate = None
            waiting = {e.event_id for e in self.gate.entries() if e.state == "pending"}
            if eid is None and candidate[1] in waiting:
                # Done, and our create got no conflict error meanwhile: it was ours, unechoed.
                matched = eid = candidate[1]
                self.gate.abandon(candidate[1])
        with guard:
            core.note_finished(rid)
            hold = self._holds and core.will_follow_up(event)
        return Routed(matched=matched, released=self.gate.on_done(rid, eid, hold=hold))
