"""Hosted MCP servers: the GA ``mcp`` tool type, which the Realtime service calls itself.

A :class:`HostedMCP` is one entry of ``session.tools`` of type ``"mcp"``: the
service lists the server's tools (``mcp_list_tools.*`` events), the model calls
them (``response.mcp_call*`` events and ``mcp_call`` items), and when the
server's ``require_approval`` asks for it the response ends with an
``mcp_approval_request`` item instead. rtqueue answers that through the same
approval path as function tools (:mod:`rtqueue.approvals`): an
``mcp_approval_response`` item and one follow-up ``response.create``, through
the gate.

Give servers per agent (``Agent(mcp=[...])``) or to the whole session
(``Session.connect(mcp=[...])``): session-wide servers are in every agent's
tool list, so a handoff (whose ``session.update`` replaces ``tools``) keeps
them. Local MCP servers (stdio, streamable HTTP), whose tools rtqueue calls
itself, are in :mod:`rtqueue.mcp`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from .errors import InvalidArgument
from .secrets import Secret

__all__ = ["HostedMCP"]


def _label(instance: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, str) or not value or len(value) > 64 or not value.replace("_", "").replace(
            "-", "").isalnum():
        raise InvalidArgument(f"server_label must be 1-64 letters, digits, '_' or '-', not {value!r}")


def _opt_str(instance: Any, attribute: Any, value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not value):
        raise InvalidArgument(f"{attribute.name} must be a non-empty str or None, not {value!r}")


def _approval(instance: Any, attribute: Any, value: Any) -> None:
    if value in ("always", "never"):
        return
    if isinstance(value, Mapping) and set(value) <= {"always", "never"} and all(
            isinstance(v, Mapping) for v in value.values()):
        return
    raise InvalidArgument('require_approval is "always", "never" or {"always"|"never": {"tool_names": [...]}}, '
                          f"not {value!r}")


def _tools(value: object) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(f"allowed_tools must be a list of tool names, not {value!r}")
    return tuple(value)


def _headers(value: object) -> Mapping[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in value.items()):
        raise InvalidArgument("headers must be a dict of str to str")
    return dict(value)


def _secret(value: object) -> Secret | None:
    if value is None or isinstance(value, Secret):
        return value
    if isinstance(value, str) and value:
        return Secret(value)
    raise InvalidArgument("authorization must be a non-empty str or an rtqueue.secrets.Secret")


@attrs.frozen
class HostedMCP:
    """A hosted MCP server the Realtime service calls (GA tool ``{"type": "mcp", ...}``).

    Exactly one of ``server_url`` and ``connector_id``. ``allowed_tools``
    limits the tools offered; ``require_approval`` is ``"always"`` (the API's
    default), ``"never"``, or a filter dict. ``headers`` and
    ``authorization`` (an OAuth token, kept as a :class:`~rtqueue.secrets.Secret`
    so it never shows in a repr or log) go to the MCP server.
    """

    server_label: str = attrs.field(validator=_label)
    server_url: str | None = attrs.field(default=None, validator=_opt_str)
    connector_id: str | None = attrs.field(default=None, validator=_opt_str)
    allowed_tools: tuple[str, ...] | None = attrs.field(default=None, converter=_tools)
    require_approval: str | Mapping[str, Any] = attrs.field(default="always", validator=_approval)
    headers: Mapping[str, str] | None = attrs.field(default=None, converter=_headers, repr=False)
    authorization: Secret | None = attrs.field(default=None, converter=_secret, repr=False)
    server_description: str | None = attrs.field(default=None, validator=_opt_str)

    def __attrs_post_init__(self) -> None:
        if (self.server_url is None) == (self.connector_id is None):
            raise InvalidArgument(f"hosted MCP {self.server_label!r}: give exactly one of server_url and connector_id")

    def definition(self) -> dict[str, Any]:
        """The GA ``mcp`` tool for ``session.tools`` (a fresh dict)."""
        out: dict[str, Any] = {"type": "mcp", "server_label": self.server_label}
        if self.server_url is not None:
            out["server_url"] = self.server_url
        if self.connector_id is not None:
            out["connector_id"] = self.connector_id
        if self.allowed_tools is not None:
            out["allowed_tools"] = list(self.allowed_tools)
        out["require_approval"] = (self.require_approval if isinstance(self.require_approval, str)
                                   else {k: dict(v) for k, v in self.require_approval.items()})
        if self.headers:
            out["headers"] = dict(self.headers)
        if self.authorization is not None:
            out["authorization"] = self.authorization.reveal()
        if self.server_description is not None:
            out["server_description"] = self.server_description
        return out


def check_servers(value: object, what: str = "mcp") -> tuple[HostedMCP, ...]:
    """``value`` as a tuple of :class:`HostedMCP` (a list, a single one, or None); unique labels."""
    if value is None:
        return ()
    items = (value,) if isinstance(value, HostedMCP) else value
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence) or not all(
            isinstance(v, HostedMCP) for v in items):
        raise InvalidArgument(f"{what} must be a list of rtqueue.HostedMCP, not {value!r}")
    labels = [v.server_label for v in items]
    if len(set(labels)) != len(labels):
        raise InvalidArgument(f"{what}: server labels must be unique, got {labels}")
    return tuple(items)
