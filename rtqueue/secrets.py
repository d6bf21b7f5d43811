"""API keys that never leak: a wrapper whose repr hides the value, and a redactor.

rtqueue keeps the key in a :class:`Secret` from the moment it is read; only the
transport unwraps it to build the handshake header. Every exception message
that crosses our boundary is passed through :func:`redact`.
"""

from __future__ import annotations

import re

__all__ = ["Secret", "redact"]

_KEYLIKE = re.compile(r"\b(sk-[A-Za-z0-9_\-]{6,}|Bearer\s+[A-Za-z0-9_\-\.]{6,})")


class Secret:
    """A string that shows as ``Secret('***')`` in reprs, str(), logs and tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            from .errors import InvalidArgument

            raise InvalidArgument(f"api_key must be a str, not {type(value).__name__}")
        self._value = value

    def reveal(self) -> str:
        """The raw value; call only where it goes on the wire."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)

    def __reduce__(self) -> tuple[object, ...]:
        # Pickling would write the key to disk or another process: refuse.
        raise TypeError("Secret cannot be pickled")


def redact(text: str, *secrets: Secret | str | None) -> str:
    """Return ``text`` with every given secret, and anything key-shaped, replaced by ``***``."""
    for s in secrets:
        raw = s.reveal() if isinstance(s, Secret) else s
        if raw and len(raw) >= 4:
            text = text.replace(raw, "***")
    return _KEYLIKE.sub("***", text)
