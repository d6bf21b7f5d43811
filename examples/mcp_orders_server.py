"""A tiny MCP server for examples/guarded_desk.py: the shop's order system, over stdio.

    python examples/mcp_orders_server.py        # speaks MCP on stdin/stdout

Tools: ``order_status(order_id)`` (where an order is) and ``order_total(order_id)``
(what it cost). The data is made up and deterministic, so the example's
transcript is the same on every run.
"""

from __future__ import annotations

import zlib
from typing import Any

from mcp.server.mcpserver import MCPServer

server: MCPServer[Any] = MCPServer("orders", log_level="WARNING")

_STATUSES = ("shipped", "out for delivery", "delivered", "being packed")


def _pick(order_id: str) -> int:
    # A stable pseudo-random number per order id: the same answer every run.
    return zlib.crc32(order_id.strip().encode())


@server.tool()
def order_status(order_id: str) -> dict[str, Any]:
    """Where an order is now, by its order number."""
    return {"order_id": order_id, "status": _STATUSES[_pick(order_id) % len(_STATUSES)]}


@server.tool()
def order_total(order_id: str) -> dict[str, Any]:
    """What an order cost, by its order number."""
    return {"order_id": order_id, "total_eur": 20 + _pick(order_id) % 480}


if __name__ == "__main__":
    server.run("stdio")
