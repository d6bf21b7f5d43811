"""Fault plans: what the simulator breaks on purpose, for reliability tests.

A :class:`FaultPlan` is a frozen value. Give one to ``Simulator(faults=...)``
(every session, from its connection) or to ``Simulator.inject(plan,
session=...)`` at run time (from that moment). Each fault actually happens on
the wire; counts such as "after N events" start when the plan takes effect and
count the simulator's ordinary server events sent on that connection (frames
injected by faults are not counted). Every one-shot fault fires once per
application of a plan.
"""

from __future__ import annotations

from typing import Any

import attrs

from ..errors import InvalidArgument
from ._checks import check_int, check_number

__all__ = ["FaultPlan"]


def _where(attr: attrs.Attribute[Any]) -> str:
    return f"FaultPlan {attr.name}"


def _count(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    if value is not None:
        check_int(_where(attr), value, or_none=True)


def _non_negative(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    check_number(_where(attr), value)


def _optional_non_negative(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    if value is not None:
        check_number(_where(attr), value, or_none=True)


def _probability(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    check_number(_where(attr), value, maximum=1.0)


def _flag(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, bool):
        raise InvalidArgument(f"{_where(attr)} must be a bool, got {type(value).__name__} {value!r}")


def _withhold(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    if value is not None:
        check_int(_where(attr) + " (1-based)", value, minimum=1, or_none=True)


def _error_after(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, tuple) or len(value) != 2 or not isinstance(value[1], str) or not value[1]:
        raise InvalidArgument(f"{_where(attr)} must be (n_events, code) with a non-empty str code, got {value!r}")
    check_int(f"{_where(attr)}[0] (n_events)", value[0])


@attrs.frozen
class FaultPlan:
    """Faults to inject into a session. All default to "off".

    - ``drop_after_events``: after sending N events, close the TCP connection
      abruptly (no close frame; the client sees code 1006).
    - ``drop_mid_response``: drop the connection the same way during the next
      response's audio (after its second audio or text delta).
    - ``withhold_done``: never send ``response.done`` for the Nth response
      (1-based) created after the plan applies; it stays active server-side
      (conflicts with new in-band creates) until cancelled.
    - ``duplicate_events``: probability that a non-audio event is sent twice
      (same ``event_id``), drawn from the simulator's seeded RNG.
    - ``delay_events_ms``: extra delay on every outgoing event (order kept).
    - ``malformed_json_after``: after N events, send one text frame that is
      not valid JSON.
    - ``binary_frame_after``: after N events, send one binary frame.
    - ``unknown_event_after``: after N events, send one
      ``{"type": "x.unknown.event", ...}``.
    - ``error_after``: ``(n, code)``: after N events, send one ``error``
      event (type ``server_error``) with that code.
    - ``expire_after_s``: that many seconds after the plan applies, send
      ``session_expired`` ("Your session hit the maximum duration of 60
      minutes.") and close the connection (code 1000).
    - ``stall_reading_s``: stop reading client frames for that long, once,
      starting with the next read (TCP back-pressure then reaches the client).

    Counts are ints >= 0 (``withhold_done`` >= 1), durations and rates finite
    numbers >= 0, ``duplicate_events`` within 0..1 and ``drop_mid_response``
    a bool; anything else raises :class:`~rtqueue.errors.InvalidArgument`.
    """

    drop_after_events: int | None = attrs.field(default=None, validator=_count)
    drop_mid_response: bool = attrs.field(default=False, validator=_flag)
    withhold_done: int | None = attrs.field(default=None, validator=_withhold)
    duplicate_events: float = attrs.field(default=0.0, validator=_probability)
    delay_events_ms: float = attrs.field(default=0.0, validator=_non_negative)
    malformed_json_after: int | None = attrs.field(default=None, validator=_count)
    binary_frame_after: int | None = attrs.field(default=None, validator=_count)
    unknown_event_after: int | None = attrs.field(default=None, validator=_count)
    error_after: tuple[int, str] | None = attrs.field(default=None, validator=_error_after)
    expire_after_s: float | None = attrs.field(default=None, validator=_optional_non_negative)
    stall_reading_s: float = attrs.field(default=0.0, validator=_non_negative)
