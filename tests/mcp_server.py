"""A tiny MCP server for tests/test_mcp.py (mcp's MCPServer, formerly FastMCP).

``python tests/mcp_server.py`` serves over stdio; ``python tests/mcp_server.py
--http`` serves streamable HTTP on 127.0.0.1 at an ephemeral port and prints
``PORT <n>`` on stdout once it listens (the endpoint is ``/mcp``).

Tools: ``add``, ``lookup_order``, ``explode`` (raises), ``nap`` (sleeps),
``pid`` (the server's process id, so a test can kill it), ``picture`` (text
and an image), ``stats`` (structured content only) and ``grow`` (adds a tool
``extra`` and announces ``notifications/tools/list_changed``).
"""

from __future__ import annotations

import base64
import os
import socket
import sys
from typing import Any

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import CallToolResult, ImageContent, TextContent

server: MCPServer[Any] = MCPServer("rtq-test", log_level="WARNING")


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool()
def lookup_order(order_id: str) -> dict[str, Any]:
    """Look up an order by its id."""
    return {"order_id": order_id, "status": "shipped"}


@server.tool()
def explode(reason: str) -> str:
    """Always fail, with the reason given."""
    # ToolError's message reaches the client; other exceptions are masked.
    raise ToolError(f"kaboom: {reason}")


@server.tool()
async def nap(seconds: float) -> str:
    """Sleep for some seconds, then answer."""
    await anyio.sleep(seconds)
    return "rested"


@server.tool()
def pid() -> int:
    """The server's process id."""
    return os.getpid()


@server.tool()
def picture() -> CallToolResult:
    """A caption and a tiny PNG."""
    png = base64.b64encode(b"\x89PNG\r\n\x1a\nfake").decode()
    return CallToolResult(
        content=[
            TextContent(type="text", text="a red dot"),
            ImageContent(type="image", data=png, mime_type="image/png"),
        ]
    )


@server.tool()
def stats() -> CallToolResult:
    """Numbers, as structured content without text."""
    return CallToolResult(content=[], structured_content={"orders": 3, "late": 1})


def extra() -> str:
    """A tool that exists only after grow() ran."""
    return "extra!"


@server.tool()
async def grow(ctx: Context) -> str:
    """Add the tool 'extra' and tell the client its tool list changed."""
    server.add_tool(extra)
    await ctx.session.send_tool_list_changed()
    return "grown"


def _serve_http() -> None:
    import uvicorn

    # Bound here, port 0, so the port is known before uvicorn starts and no
    # other test can grab it in between; loopback only.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    app = server.streamable_http_app(host="127.0.0.1")
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    if "--http" in sys.argv[1:]:
        _serve_http()
    else:
        server.run("stdio")
