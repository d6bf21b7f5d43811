"""Argument checks shared by :class:`~rtqueue.sim.Simulator` and :class:`~rtqueue.sim.FaultPlan`.

Each raises :class:`~rtqueue.errors.InvalidArgument` naming the argument, what
it must be and what it got. ``bool`` is never accepted as a number (``True``
is an ``int`` to Python, but never what a caller meant), and NaN and the
infinities are refused wherever a number is expected. ``None`` is the
caller's business: ``or_none=True`` only adds "or None" to the message.
"""

from __future__ import annotations

import math

from ..errors import InvalidArgument

__all__ = ["check_int", "check_number"]


def _got(value: object) -> str:
    return f"got {type(value).__name__} {value!r}"


def check_number(
    where: str,
    value: object,
    *,
    minimum: float = 0.0,
    above: bool = False,
    maximum: float | None = None,
    or_none: bool = False,
) -> float:
    """``value`` as a finite float within the bounds (``above``: strictly greater than ``minimum``)."""
    if maximum is not None:
        bound = f"within {minimum:g}..{maximum:g}"
    else:
        bound = f"> {minimum:g}" if above else f">= {minimum:g}"
    wanted = f"{where} must be a finite number {bound}" + (" or None" if or_none else "")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgument(f"{wanted}, {_got(value)}")
    number = float(value)
    low = number <= minimum if above else number < minimum
    if not math.isfinite(number) or low or (maximum is not None and number > maximum):
        raise InvalidArgument(f"{wanted}, got {value!r}")
    return number


def check_int(
    where: str, value: object, *, minimum: int = 0, maximum: int | None = None, or_none: bool = False
) -> int:
    """``value`` as an int within ``minimum..maximum``."""
    bound = f">= {minimum}" if maximum is None else f"within {minimum}..{maximum}"
    wanted = f"{where} must be an int {bound}" + (" or None" if or_none else "")
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{wanted}, {_got(value)}")
    if value < minimum or (maximum is not None and value > maximum):
        raise InvalidArgument(f"{wanted}, got {value!r}")
    return value
