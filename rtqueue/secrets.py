"""API keys that never leak: a wrapper whose repr hides the value, and a redactor.

rtqueue keeps the key in a :class:`Secret` from the moment it is read; only the
transport unwraps it to build the handshake header. Every exception message
that crosses our boundary is passed through :func:`redact`.
"""

from __future__ import annotations

import re

__all__ = ["Secret", "redact"]

_KEYLIKE = re.compile(r"\b(sk-[A-Za-z0-9_\-]{6,}|Bearer\s+[A-Za-z0-9_\-\.]{6,})")

# A URL query or fragment parameter whose name says it carries a credential:
# Azure's ?api-key=, ?key=, ?token=, ?access_token=, ?apikey=, ?client_secret=,
# SAS ?sig= / ?signature=, ?auth=, ?password= ... (case-insensitive; the name
# only has to contain one of these words, or be "sig"). The value, up to the
# next & # ; or : (a message's "url: reason"), becomes ***.
_URL_PARAM = re.compile(
    r"(?P<name>[?&;#](?:sig|[^=&#;\s]*?(?:key|token|secret|signature|auth|password|passwd|pwd|credential)"
    r"[^=&#;\s]*)=)(?P<value>[^&#;:\s'\"<>]+)",
    re.IGNORECASE,
)

# A header (or a "name": "value" / name=value pair) that carries a credential:
# Authorization / Proxy-Authorization (with or without a Bearer/Basic scheme),
# api-key, x-api-key, OpenAI-Api-Key, Ocp-Apim-Subscription-Key, *token, *secret, password.
_HEADER = re.compile(
    # (An error code such as "invalid_api_key: Incorrect API key" is a name, not a header.)
    r"(?P<name>\b(?:proxy-)?authorization|\b(?!invalid_)[\w-]*(?:api[-_]?key|subscription[-_]?key|access[-_]?key"
    r"|token|secret|password))(?P<sep>[\"']?[ \t]*[:=][ \t]*[\"']?)(?P<scheme>(?:bearer|basic|token)[ \t]+)?"
    # The value: not one already redacted, and not the scheme word (no backtracking past it).
    r"(?P<value>(?!\*\*\*|(?:bearer|basic|token)[ \t])[^\s'\",;&<>)\]}]+)",
    re.IGNORECASE,
)

# The password of user:password@ in a URL.
_USERINFO = re.compile(r"(?P<pre>\b[a-z][a-z0-9+.\-]*://[^/\s:@]+:)(?P<value>[^@\s/]+)(?=@)", re.IGNORECASE)


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
    """Return ``text`` with every given secret, and anything key-shaped, replaced by ``***``.

    Besides the given secrets (4 characters or longer) it removes, whatever
    the key looks like:

    - OpenAI-style keys (``sk-...``) and ``Bearer`` tokens anywhere;
    - the value of a URL query or fragment parameter whose name contains
      key, token, secret, signature, sig, auth, password or credential
      (``?api-key=***``, ``&access_token=***``; case-insensitive);
    - the value of a credential header or field: ``Authorization: Bearer ***``,
      ``api-key: ***``, ``x-api-key``, ``Ocp-Apim-Subscription-Key``,
      ``"client_secret": "***"``, ``password=***``;
    - the password in ``scheme://user:***@host``.
    """
    for s in secrets:
        raw = s.reveal() if isinstance(s, Secret) else s
        if raw and len(raw) >= 4:
            text = text.replace(raw, "***")
    text = _URL_PARAM.sub(lambda m: m["name"] + "***", text)
    text = _HEADER.sub(lambda m: m["name"] + m["sep"] + (m["scheme"] or "") + "***", text)
    text = _USERINFO.sub(lambda m: m["pre"] + "***", text)
    return _KEYLIKE.sub("***", text)
