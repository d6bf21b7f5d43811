"""Tests for rtqueue.mcp: a local MCP server's tools as rtqueue tools, over stdio and streamable HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mcp")

from rtqueue import Agent, Session, Simulator, Tool, ToolError
from rtqueue.mcp import MCPError, MCPServer, MCPTool, MCPUnavailable, render_result
from tests.utils import UNIT

SERVER = Path(__file__).resolve().parent / "mcp_server.py"
TOOLS = ["add", "lookup_order", "explode", "nap", "pid", "picture", "stats", "grow"]

Connect = Callable[..., MCPServer]


@pytest.fixture
def http_url() -> Iterator[str]:
    """The URL of tests/mcp_server.py serving streamable HTTP on a loopback ephemeral port."""
    proc = subprocess.Popen(
        [sys.executable, str(SERVER), "--http"], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the server binds before printing, so it is listening now
        assert line.startswith("PORT "), f"the HTTP test server did not start: {line!r}"
        yield f"http://127.0.0.1:{int(line.split()[1])}/mcp"
    finally:
        proc.kill()
        proc.wait(UNIT)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.fixture(params=["stdio", "http"])
def connect(request: pytest.FixtureRequest) -> Iterator[Connect]:
    """Connects to the test server over the parametrized transport; closes what it opened."""
    opened: list[MCPServer] = []
    url = request.getfixturevalue("http_url") if request.param == "http" else None

    def make(**kwargs: Any) -> MCPServer:
        kwargs.setdefault("connect_timeout", UNIT)
        if url is not None:
            server = MCPServer.http(url, name="test-http", **kwargs)
        else:
            server = MCPServer.stdio(sys.executable, [str(SERVER)], name="test-stdio", **kwargs)
        opened.append(server)
        return server

    yield make
    for server in opened:
        server.close()


def mcp_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("rtqueue-mcp-") and t.is_alive()]


def threads_left(before: set[threading.Thread]) -> list[str]:
    """Threads started since ``before`` still alive after joining each for up to one UNIT in all."""
    deadline = time.monotonic() + UNIT
    left = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    for t in left:
        t.join(max(0.0, deadline - time.monotonic()))
    return [t.name for t in left if t.is_alive()]


def gone(pid: int) -> bool:
    """Whether process ``pid`` has exited and been reaped (no zombie left)."""
    if not Path("/proc").is_dir():
        return True  # no procfs: nothing to check it with
    return not Path(f"/proc/{pid}").exists()


def function_outputs(sim: Simulator) -> list[str]:
    return [
        e["item"]["output"]
        for e in sim.client_events(0)
        if e.get("type") == "conversation.item.create" and e.get("item", {}).get("type") == "function_call_output"
    ]


# -- listing --------------------------------------------------------------------------------


def test_lists_tools_with_schemas(connect: Connect) -> None:
    """The server's tools become rtqueue Tools with the server's schemas and descriptions."""
    server = connect()
    tools = server.tools()
    assert [t.name for t in tools] == TOOLS
    assert all(isinstance(t, Tool) and isinstance(t, MCPTool) for t in tools)
    add = server.tool("add")
    assert add.description == "Add two integers."
    assert add.parameters["type"] == "object"
    assert add.parameters["required"] == ["a", "b"]
    assert {k: v["type"] for k, v in add.parameters["properties"].items()} == {"a": "integer", "b": "integer"}
    assert add.definition()["name"] == "add" and add.mcp_name == "add"
    assert server.tool("pid").parameters["properties"] == {}
    assert server.connected and not server.closed
    assert [t.name.startswith("rtqueue-mcp-test-") for t in mcp_threads()] == [True]


def test_allowed_tools_and_prefix(connect: Connect) -> None:
    """allowed_tools filters by the server's names; prefix renames for the model, not for the server."""
    server = connect(allowed_tools=["add", "lookup_order"], prefix="shop_")
    assert [t.name for t in server.tools()] == ["shop_add", "shop_lookup_order"]
    assert server.tool("shop_add").mcp_name == "add"
    assert server.tool("shop_add").invoke('{"a": 2, "b": 3}') == "5"
    picky = connect(allowed_tools=lambda name: name.startswith("l"))
    assert [t.name for t in picky.tools()] == ["lookup_order"]


# -- direct calls ----------------------------------------------------------------------------


def test_direct_calls_and_content_mapping(connect: Connect) -> None:
    """invoke/call return the model's output string: text, JSON text, image notes, structured content."""
    server = connect()
    assert server.tool("add").invoke('{"a": 1, "b": 2}') == "3"
    assert server.tool("add")(a=20, b=22) == "42"  # still a plain callable for app code
    assert json.loads(server.call("lookup_order", {"order_id": "A-7"})) == {"order_id": "A-7", "status": "shipped"}
    picture = server.call("picture").splitlines()
    assert picture[0] == "a red dot"
    assert picture[1].startswith("[image image/png") and "not shown" in picture[1]
    assert json.loads(server.call("stats")) == {"orders": 3, "late": 1}


def test_prefer_structured(connect: Connect) -> None:
    """prefer_structured sends structuredContent as JSON instead of the text content."""
    server = connect(prefer_structured=True)
    assert json.loads(server.call("add", {"a": 1, "b": 2})) == {"result": 3}


def test_invalid_arguments_are_refused_locally(connect: Connect) -> None:
    """Arguments are validated against the MCP schema before any call."""
    server = connect()
    with pytest.raises(ToolError, match=r"invalid arguments for add: 'b' is a required property"):
        server.tool("add").invoke('{"a": 1}')


def test_error_tool_gives_tool_error(connect: Connect) -> None:
    """A tool result with isError becomes a ToolError carrying the server's message; the server goes on."""
    server = connect()
    with pytest.raises(ToolError, match=r"tool explode failed: .*kaboom: because"):
        server.tool("explode").invoke('{"reason": "because"}')
    with pytest.raises(ToolError, match="Unknown tool"):
        server.call("no_such_tool")
    assert server.call("add", {"a": 1, "b": 1}) == "2"


def test_timeout_cancels_and_the_server_goes_on(connect: Connect) -> None:
    """A call past the tool's timeout is a ToolError at the timeout; later calls work."""
    server = connect(timeout=0.5)
    assert server.tool("nap").timeout == 0.5
    started = time.monotonic()
    with pytest.raises(ToolError, match=r"tool nap timed out after 0.5 s"):
        server.tool("nap").invoke(json.dumps({"seconds": 3 * UNIT}))
    assert time.monotonic() - started < UNIT / 2
    assert server.call("add", {"a": 2, "b": 2}) == "4"
    with pytest.raises(ToolError, match=r"tool nap timed out after 0.2 s"):
        server.call("nap", {"seconds": 3 * UNIT}, timeout=0.2)


def test_tool_list_changes_are_followed(connect: Connect) -> None:
    """notifications/tools/list_changed re-lists the tools; refresh() does it on demand; old tools keep identity."""
    server = connect()
    add = server.tool("add")
    assert server.call("grow") == "grown"
    assert server.wait_for_tools(lambda tools: "extra" in [t.name for t in tools], UNIT)
    assert server.tool("extra").invoke("") == "extra!"
    assert server.tool("add") is add
    assert [t.name for t in server.refresh()] == [*TOOLS, "extra"]


# -- failures and shutdown -------------------------------------------------------------------


def test_closed_server_gives_errors_not_hangs(connect: Connect) -> None:
    """After close(), tools and calls answer with a ToolError at once; close() is idempotent."""
    server = connect()
    add = server.tool("add")
    server.close()
    server.close()
    assert server.closed and not server.connected
    started = time.monotonic()
    with pytest.raises(ToolError, match="is closed"):
        add.invoke('{"a": 1, "b": 2}')
    with pytest.raises(MCPError, match="is closed"):
        server.refresh()
    assert time.monotonic() - started < 1.0
    assert mcp_threads() == []


def test_killed_server_gives_clear_errors(connect: Connect) -> None:
    """A server process killed under the connection: calls fail fast with "not connected", never hang."""
    server = connect(timeout=3 * UNIT)
    pid = int(server.call("pid"))
    os.kill(pid, signal.SIGKILL)
    started = time.monotonic()
    for _ in range(2):  # the call that finds the dead server, and one after it
        with pytest.raises(ToolError, match="is not connected"):
            server.tool("add").invoke('{"a": 1, "b": 2}')
    assert time.monotonic() - started < UNIT
    assert not server.connected
    server.close()
    assert mcp_threads() == []


def test_close_from_another_thread_ends_call_threads_and_process(connect: Connect) -> None:
    """close() from another thread ends a blocked call with a ToolError, every thread it started and the child."""
    before = set(threading.enumerate())
    server = connect(timeout=3 * UNIT)
    pid = int(server.call("pid"))
    stdio = server.name == "test-stdio"
    failures: list[BaseException] = []
    calling = threading.Thread(
        target=lambda: _capture(failures, lambda: server.call("nap", {"seconds": 3 * UNIT})), name="test-mcp-caller"
    )
    calling.start()
    closer = threading.Thread(target=server.close, name="test-mcp-closer")
    closer.start()
    closer.join(UNIT)
    calling.join(UNIT)
    assert not closer.is_alive() and not calling.is_alive()
    assert len(failures) == 1 and isinstance(failures[0], ToolError), failures
    assert "closed" in str(failures[0])
    # Not only rtqueue's loop thread: asyncio's child watcher and executor threads too.
    assert threads_left(before) == []
    if stdio:
        assert gone(pid), f"the stdio server {pid} is still running or a zombie after close()"


def _capture(into: list[BaseException], fn: Callable[[], object]) -> None:
    try:
        fn()
    except BaseException as exc:
        into.append(exc)


def test_connect_failures_raise_mcp_error() -> None:
    """A server that exits, never answers or does not exist, a port nobody listens on: MCPError, no thread left."""
    with pytest.raises(MCPError, match=r"could not connect to MCP server 'quitter'.*closed the connection"):
        MCPServer.stdio(sys.executable, ["-c", "import sys; sys.exit(3)"], name="quitter", connect_timeout=UNIT)
    mute = ["-c", "import time; time.sleep(60)"]  # never answers initialize
    with pytest.raises(MCPError, match=r"'mute'.*no answer to initialize and tools/list within 0.5 s"):
        MCPServer.stdio(sys.executable, mute, name="mute", connect_timeout=0.5)
    with pytest.raises(MCPError, match="could not connect to MCP server 'nowhere'"):
        MCPServer.stdio("/nonexistent/mcp-server", name="nowhere", connect_timeout=UNIT)
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        with pytest.raises(MCPError, match=r"could not connect.*ConnectError"):
            MCPServer.http(f"http://127.0.0.1:{port}/mcp", connect_timeout=UNIT)
    assert mcp_threads() == []


def test_missing_mcp_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the mcp package, connecting raises MCPUnavailable (an ImportError and an RtqueueError)."""
    monkeypatch.setitem(sys.modules, "mcp", None)
    with pytest.raises(ImportError, match=r"rtqueue\[mcp\]") as info:
        MCPServer.stdio(sys.executable, [str(SERVER)])
    assert isinstance(info.value, MCPUnavailable) and isinstance(info.value, MCPError)


def test_render_result() -> None:
    """Content blocks map to text for the model; bytes never pass, embedded text resources do."""
    assert render_result({"content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}) == (False, "a\nb")
    assert render_result({"content": [], "isError": True}) == (True, "(no output)")
    audio = render_result({"content": [{"type": "audio", "data": "AAAA", "mimeType": "audio/wav"}]})[1]
    assert audio == "[audio audio/wav, about 3 bytes, not shown]"
    embedded = {"type": "resource", "resource": {"uri": "file:///a.txt", "text": "hello"}}
    assert render_result({"content": [embedded]})[1] == "[resource file:///a.txt]\nhello"
    link = {"type": "resource_link", "name": "a", "uri": "file:///a"}
    assert render_result({"content": [link]})[1] == "[resource link a: file:///a]"
    both = {"content": [{"type": "text", "text": "3"}], "structuredContent": {"result": 3}}
    assert render_result(both) == (False, "3")
    assert render_result(both, prefer_structured=True) == (False, '{"result": 3}')


# -- with a session on the simulator -----------------------------------------------------------


@pytest.mark.timeout(60)
def test_agent_uses_mcp_tools_in_a_session(connect: Connect, sim: Simulator) -> None:
    """The model calls the MCP tools through the tool pool: results reach the answer, errors and timeouts too."""
    server = connect()
    slow = connect(allowed_tools=["nap"], prefix="slow_", timeout=0.5)
    desk = Agent(name="desk", instructions="You are the desk.", tools=[*server.tools(), *slow.tools()])
    with Session.connect(url=sim.url, agent=desk) as session:
        errors = session.events("tool.error")
        answer = session.ask("[tools: add] what is 2 plus 40?", timeout=UNIT)
        assert answer.status == "completed" and "42" in answer.text
        answer = session.ask("[tools: lookup_order] where is order 77?", timeout=UNIT)
        assert "shipped" in answer.text and "77" in answer.text

        assert session.ask("[tools: explode] it broke", timeout=UNIT).status == "completed"
        ev = errors.get(UNIT)
        assert ev is not None and ev.name == "explode" and "kaboom" in ev.error

        assert session.ask("[tools: slow_nap] nap for 30 seconds", timeout=UNIT).status == "completed"
        ev = errors.get(UNIT)
        assert ev is not None and ev.name == "slow_nap" and "timed out" in ev.error

        assert session.ask("[tools: add] and 1 plus 1?", timeout=UNIT).text.count("2") >= 1
    outputs = function_outputs(sim)
    assert outputs[:2] == ["42", '{\n  "order_id": "77",\n  "status": "shipped"\n}']
    assert "kaboom" in json.loads(outputs[2])["error"] and "timed out" in json.loads(outputs[3])["error"]
    assert sim.stats()["conflicts"] == 0


@pytest.mark.timeout(60)
def test_server_killed_mid_session(connect: Connect, sim: Simulator) -> None:
    """The MCP server dies while the model's call runs: the model gets an error output at once, the session goes on."""
    server = connect(timeout=3 * UNIT)
    pid = int(server.call("pid"))
    desk = Agent(name="desk", instructions="You are the desk.", tools=server.tools())
    with Session.connect(url=sim.url, agent=desk) as session:
        calls = session.events("tool.call")
        errors = session.events("tool.error")
        started = time.monotonic()
        asking = threading.Thread(
            target=lambda: session.ask("[tools: nap] nap for 30 seconds", timeout=2 * UNIT), name="test-mcp-ask"
        )
        asking.start()
        assert calls.get(UNIT) is not None, "the model never called nap"
        os.kill(pid, signal.SIGKILL)
        ev = errors.get(UNIT)
        asking.join(UNIT)
        assert not asking.is_alive()
        assert ev is not None and ev.name == "nap" and "not connected" in ev.error
        assert time.monotonic() - started < UNIT, "the dead server's call was only ended by a timeout"
        answer = session.ask("[tools: add] what is 1 plus 2?", timeout=UNIT)
        assert answer.status == "completed"
        assert errors.get(UNIT) is not None  # add fails too: the server is gone
    outputs = function_outputs(sim)
    assert len(outputs) == 2 and all("not connected" in json.loads(o)["error"] for o in outputs)
    assert sim.stats()["conflicts"] == 0
