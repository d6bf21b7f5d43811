"""Local MCP servers' tools as rtqueue function tools.

An :class:`MCPServer` connects to one `Model Context Protocol
<https://modelcontextprotocol.io>`_ server, over stdio (a subprocess) or
streamable HTTP, lists its tools, and offers them as ordinary
:class:`~rtqueue.tools.Tool` objects, so an agent uses them like any other
function tool::

    from rtqueue.mcp import MCPServer

    with MCPServer.stdio("python", ["orders_server.py"], prefix="orders_") as orders:
        desk = rtqueue.Agent(name="desk", instructions="...", tools=[*orders.tools()])
        with rtqueue.Session.connect(agent=desk) as session:
            ...

The official ``mcp`` package is asyncio-based; rtqueue is not. Everything
asynchronous runs on one private event loop on one thread per server (named
``rtqueue-mcp-<name>``). A tool call, made by the session's tool pool (or by
app code calling the tool), hands its request to that loop and blocks for the
result, up to the tool's timeout. No coroutine, event loop or asyncio/anyio
exception reaches the caller: every failure (the tool reported ``isError``,
the server process died, the connection was lost, the call timed out, the
server was closed) is a :class:`~rtqueue.errors.ToolError`, which the tool
pool turns into an ``{"error": ...}`` output the model can act on.

``mcp`` is an optional dependency (``pip install 'rtqueue[mcp]'``; this module
is written against mcp 2.x). Importing this module works without it;
connecting raises :class:`MCPUnavailable`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import re
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

import attrs

from .errors import InvalidArgument, RtqueueError, ToolError
from .tools import DEFAULT_TOOL_TIMEOUT, Tool, ToolContext, serialize_output

if sys.version_info < (3, 11):  # pragma: no cover - anyio depends on the backport there
    from exceptiongroup import BaseExceptionGroup

if TYPE_CHECKING:  # typing.Self is 3.11+; annotations are not evaluated
    from typing import Self

    from mcp import ClientSession

# What an MCP transport yields: the (read, write) stream pair ClientSession takes.
TransportStreams = tuple[Any, Any]

__all__ = ["MCPError", "MCPServer", "MCPTool", "MCPUnavailable", "render_result"]

log = logging.getLogger("rtqueue.mcp")

THREAD_NAME_PREFIX = "rtqueue-mcp-"

_T = TypeVar("_T")

_INSTALL_HINT = "install it with: pip install 'rtqueue[mcp]' (mcp>=2.3,<3)"

# OpenAI's function-name alphabet; MCP names may also hold '.', '/' and more.
_NOT_NAME_CHAR = re.compile(r"[^A-Za-z0-9_-]")
_SERVER_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

# A paginating server that never stops must not hang connect() or refresh().
_MAX_LIST_PAGES = 100


class MCPError(RtqueueError):
    """An MCP server could not be started, connected to, or listed.

    Raised by :meth:`MCPServer.stdio`, :meth:`MCPServer.http` and
    :meth:`MCPServer.refresh`. Failures of individual tool calls are
    :class:`~rtqueue.errors.ToolError` instead.
    """


class MCPUnavailable(MCPError, ImportError):
    """The optional ``mcp`` package is missing or too old (``pip install 'rtqueue[mcp]'``)."""


def _require_mcp() -> None:
    try:
        import mcp  # noqa: F401
        from mcp.client.streamable_http import streamable_http_client  # noqa: F401  (mcp 2.x only)
    except ImportError as exc:
        raise MCPUnavailable(f"rtqueue.mcp needs the 'mcp' package: {_INSTALL_HINT}") from exc


# --------------------------------------------------------------------------
# Transports: how to open the stream pair, on the loop thread.


@attrs.frozen
class _StdioTransport:
    command: str
    args: tuple[str, ...]
    env: Mapping[str, str] | None
    cwd: str | None
    stderr: TextIO | None

    def describe(self) -> str:
        return " ".join([self.command, *self.args])

    async def open(self, stack: contextlib.AsyncExitStack) -> TransportStreams:
        from mcp.client.stdio import StdioServerParameters, stdio_client

        params = StdioServerParameters(
            command=self.command,
            args=list(self.args),
            env=dict(self.env) if self.env is not None else None,
            cwd=self.cwd,
        )
        # stdio_client closes stdin, waits, then kills the process group: the
        # child never outlives the connection, and is reaped (no zombie).
        return await stack.enter_async_context(stdio_client(params, errlog=self.stderr or sys.stderr))


@attrs.frozen
class _HttpTransport:
    url: str
    headers: Mapping[str, str] | None = attrs.field(repr=False)  # may carry a bearer token
    http_timeout: float

    def describe(self) -> str:
        return self.url

    async def open(self, stack: contextlib.AsyncExitStack) -> TransportStreams:
        import httpx2
        from mcp.client.streamable_http import streamable_http_client

        # Our own client, to carry the headers; the MCP transport then leaves
        # its lifetime to us (the exit stack). Reads stay long: a server may
        # hold a response stream open while a tool runs.
        client = httpx2.AsyncClient(
            headers=dict(self.headers or {}),
            timeout=httpx2.Timeout(self.http_timeout, read=max(self.http_timeout, 300.0)),
        )
        await stack.enter_async_context(client)
        return await stack.enter_async_context(streamable_http_client(self.url, http_client=client))


_Transport = _StdioTransport | _HttpTransport


# --------------------------------------------------------------------------
# Tools


@attrs.frozen(eq=False)
class MCPTool(Tool):
    """A :class:`~rtqueue.tools.Tool` that calls a tool of an :class:`MCPServer`.

    ``name`` is what the model sees (the server's name for the tool, with the
    server's ``prefix`` and characters OpenAI refuses replaced by ``_``);
    ``mcp_name`` is the server's own name for it. Calling the tool directly
    (``tool(a=1, b=2)``) makes the MCP call and returns its output string.
    """

    mcp_name: str = attrs.field(default="", kw_only=True)
    server_name: str = attrs.field(default="", kw_only=True)

    def invoke(self, raw_arguments: str, ctx: ToolContext | None = None) -> str:
        """Validate the model's JSON arguments against the MCP input schema and make the call.

        Returns the output string (see :meth:`MCPServer.call`). Raises
        :class:`~rtqueue.errors.ToolError` for invalid arguments and for every
        failure of the call, with a message addressed to the model; the
        message is not wrapped again (``Tool.invoke`` would prefix it with
        "tool X failed: ToolError"). ``ctx`` is not sent to the server.
        """
        kwargs = self.parse_arguments(raw_arguments)
        result = self.func(**kwargs)
        return result if isinstance(result, str) else serialize_output(result)


def _tool_name(prefix: str, mcp_name: str) -> str:
    return _NOT_NAME_CHAR.sub("_", prefix + mcp_name)[:64]


def _schema(raw: object) -> dict[str, Any]:
    """The MCP input schema as a function tool's ``parameters``.

    MCP requires ``"type": "object"``; a server that leaves it out (or sends
    no properties) still gets a usable schema.
    """
    schema = dict(raw) if isinstance(raw, Mapping) else {}
    schema.setdefault("type", "object")
    if schema.get("type") == "object":
        schema.setdefault("properties", {})
    return schema


# --------------------------------------------------------------------------
# Results


def _describe_block(block: Mapping[str, Any]) -> str:
    """One content block of a tool result as text for the model."""
    kind = block.get("type")
    if kind == "text":
        return str(block.get("text", ""))
    if kind in ("image", "audio"):
        data = block.get("data")
        size = len(data) * 3 // 4 if isinstance(data, str) else 0  # base64
        return f"[{kind} {block.get('mimeType', 'unknown type')}, about {size} bytes, not shown]"
    if kind == "resource_link":
        label = block.get("title") or block.get("name") or ""
        return f"[resource link {label}: {block.get('uri', '')}]".replace(" :", ":")
    if kind == "resource":
        resource = block.get("resource")
        resource = resource if isinstance(resource, Mapping) else {}
        uri = resource.get("uri", "")
        if isinstance(resource.get("text"), str):
            return f"[resource {uri}]\n{resource['text']}"
        return f"[resource {uri} ({resource.get('mimeType', 'binary')}), not shown]"
    return f"[{kind} content, not shown]"


def render_result(result: Mapping[str, Any], *, prefer_structured: bool = False) -> tuple[bool, str]:
    """``(is_error, text)`` for an MCP ``CallToolResult`` in its wire form (camelCase keys).

    Text blocks are kept as they are, one per line; images, audio and binary
    resources become a short bracketed note (the model gets no bytes through
    a function output); embedded text resources keep their text.
    ``structuredContent`` is sent as JSON when there is no content block,
    or always when ``prefer_structured`` is true. An empty result reads
    ``"(no output)"``.
    """
    content = result.get("content")
    blocks = [b for b in content if isinstance(b, Mapping)] if isinstance(content, list) else []
    structured = result.get("structuredContent")
    is_error = bool(result.get("isError"))
    if structured is not None and (prefer_structured or not blocks) and not is_error:
        return False, serialize_output(structured)
    text = "\n".join(_describe_block(b) for b in blocks)
    if not text and structured is not None:
        text = serialize_output(structured)
    return is_error, text or "(no output)"


def _leaf(exc: BaseException) -> BaseException:
    """The first exception inside anyio's (nested) exception groups."""
    seen: set[int] = set()
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions and id(exc) not in seen:
        seen.add(id(exc))
        exc = exc.exceptions[0]
    return exc


def _describe_exception(exc: BaseException) -> str:
    """A one-line cause, looking through anyio's exception groups."""
    exc = _leaf(exc)
    message = str(exc).strip()
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


# --------------------------------------------------------------------------
# The server connection


class MCPServer:
    """A connection to one MCP server whose tools the model can call.

    Make one with :meth:`stdio` or :meth:`http`; both return once the server
    is initialized and its tools are listed (or raise :class:`MCPError`).
    Use it as a context manager, or call :meth:`close`.

    :meth:`tools` gives the server's tools as :class:`MCPTool` objects for an
    :class:`~rtqueue.Agent` (or a session's tools). They stay valid while the
    server is open; after :meth:`close`, or once the server died, calling one
    gives a :class:`~rtqueue.errors.ToolError` saying so (an error output for
    the model, never a hang).

    The list is read at connect time and again whenever the server sends
    ``notifications/tools/list_changed`` (or :meth:`refresh` is called):
    :meth:`tools` then returns the new list. Tools already handed to an
    agent are not changed; give the agent the new list (e.g. on its next
    handoff) to offer new tools.

    Thread-safe. One private thread and event loop per server; nothing
    asyncio is exposed.
    """

    def __init__(
        self,
        transport: _Transport,
        *,
        name: str,
        allowed_tools: Iterable[str] | Callable[[str], bool] | None = None,
        prefix: str = "",
        timeout: float | None = None,
        connect_timeout: float = 30.0,
        prefer_structured: bool = False,
    ) -> None:
        """Connect (private: use :meth:`stdio` or :meth:`http`)."""
        _require_mcp()
        if not isinstance(name, str) or not _SERVER_NAME.match(name):
            raise InvalidArgument(f"MCP server name must be 1-64 characters of [A-Za-z0-9_.-], got {name!r}")
        if not isinstance(prefix, str) or _NOT_NAME_CHAR.search(prefix) or len(prefix) > 32:
            raise InvalidArgument(f"prefix must be up to 32 characters of [A-Za-z0-9_-], got {prefix!r}")
        self._allowed = _allowed_filter(allowed_tools)
        # Named tools the server turns out not to have are reported once, at connect.
        self._allowed_names = (
            frozenset(allowed_tools) if allowed_tools is not None and not callable(allowed_tools) else frozenset()
        )
        self._timeout = _positive(timeout, "timeout", allow_none=True)
        self._connect_timeout = _positive(connect_timeout, "connect_timeout")
        self.name = name
        self.prefix = prefix
        self.prefer_structured = bool(prefer_structured)
        self._transport = transport

        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._tools: dict[str, MCPTool] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: ClientSession | None = None
        self._accepting = False  # calls may be submitted to the loop
        self._closing = False
        self._failure: str | None = None  # why the connection ended, if it ended by itself
        self._startup_error: BaseException | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._cancel_startup: Callable[[], None] | None = None
        self._background: set[asyncio.Task[None]] = set()

        self._thread = threading.Thread(target=self._run, name=f"{THREAD_NAME_PREFIX}{name}", daemon=True)
        self._thread.start()
        # The loop enforces connect_timeout itself; the margin covers a loop
        # that never got that far (it cannot hang here forever either way).
        if not self._ready.wait(self._connect_timeout + 5.0):
            self.close()
            raise MCPError(f"MCP server {name!r} did not start within {self._connect_timeout:g} s")
        if self._startup_error is not None:
            error = self._startup_error
            self.close()
            raise MCPError(
                f"could not connect to MCP server {name!r} ({transport.describe()}): {self._startup_reason(error)}"
            ) from error

    # -- constructors ---------------------------------------------------------

    @classmethod
    def stdio(
        cls,
        command: str,
        args: Sequence[str] = (),
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        name: str | None = None,
        stderr: TextIO | None = None,
        allowed_tools: Iterable[str] | Callable[[str], bool] | None = None,
        prefix: str = "",
        timeout: float | None = None,
        connect_timeout: float = 30.0,
        prefer_structured: bool = False,
    ) -> MCPServer:
        """Start ``command args...`` as a subprocess and talk MCP over its stdin/stdout.

        - ``env``: variables added to the small default environment ``mcp``
          gives servers (``HOME``, ``PATH``, ``USER``...; not all of ours, so
          secrets do not leak into a third-party server by accident).
        - ``cwd``: the server's working directory; ``stderr``: where its
          stderr goes (a real file; default ``sys.stderr``).
        - ``name``: names the thread and error messages (default: the
          command's base name).
        - ``allowed_tools``: the server's tool names to offer (or a predicate
          of the name); ``None`` offers all.
        - ``prefix``: prepended to each tool's name, against clashes between
          servers (``prefix="fs_"`` offers ``read`` as ``fs_read``).
        - ``timeout``: seconds one tool call may take (becomes each
          :attr:`Tool.timeout`); ``None``: the tool runner's default, and
          30 s for direct calls.
        - ``connect_timeout``: seconds to start, initialize and list tools.
        - ``prefer_structured``: send ``structuredContent`` (as JSON) rather
          than the text content when a result has both.

        Raises :class:`MCPError` if the process cannot start or does not
        answer; :class:`MCPUnavailable` without the ``mcp`` package.
        """
        if not isinstance(command, str) or not command:
            raise InvalidArgument(f"command must be a non-empty str, got {command!r}")
        if isinstance(args, str) or not all(isinstance(a, str) for a in args):
            raise InvalidArgument(f"args must be a list of str, got {args!r}")
        if env is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise InvalidArgument("env must map str to str")
        transport = _StdioTransport(
            command=command, args=tuple(args), env=env, cwd=None if cwd is None else str(cwd), stderr=stderr
        )
        default = re.sub(r"[^A-Za-z0-9_.-]", "_", command.replace("\\", "/").rsplit("/", 1)[-1])[:64] or "stdio"
        return cls(
            transport,
            name=name or default,
            allowed_tools=allowed_tools,
            prefix=prefix,
            timeout=timeout,
            connect_timeout=connect_timeout,
            prefer_structured=prefer_structured,
        )

    @classmethod
    def http(
        cls,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        name: str | None = None,
        allowed_tools: Iterable[str] | Callable[[str], bool] | None = None,
        prefix: str = "",
        timeout: float | None = None,
        connect_timeout: float = 30.0,
        prefer_structured: bool = False,
    ) -> MCPServer:
        """Connect to a streamable HTTP MCP endpoint (e.g. ``http://127.0.0.1:8000/mcp``).

        ``headers`` are sent with every request (e.g. ``Authorization``).
        ``name`` defaults to the URL's host. The other options are those of
        :meth:`stdio`; ``connect_timeout`` also bounds each HTTP connect.
        """
        if not isinstance(url, str) or not re.match(r"^https?://", url):
            raise InvalidArgument(f"url must be an http:// or https:// URL, got {url!r}")
        if headers is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
            raise InvalidArgument("headers must map str to str")
        host = re.sub(r"^https?://([^/@]*@)?", "", url).split("/", 1)[0]
        transport = _HttpTransport(url=url, headers=headers, http_timeout=float(connect_timeout))
        return cls(
            transport,
            name=name or re.sub(r"[^A-Za-z0-9_.-]", "_", host)[:64] or "http",
            allowed_tools=allowed_tools,
            prefix=prefix,
            timeout=timeout,
            connect_timeout=connect_timeout,
            prefer_structured=prefer_structured,
        )

    # -- public API -----------------------------------------------------------

    def tools(self) -> list[MCPTool]:
        """The server's tools (as allowed and prefixed), in the server's order."""
        with self._lock:
            return list(self._tools.values())

    def tool(self, name: str) -> MCPTool:
        """The tool the model knows as ``name`` (prefixed). Raises ``KeyError`` if absent."""
        with self._lock:
            return self._tools[name]

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closing

    @property
    def connected(self) -> bool:
        """Whether calls can be made: open, and the connection has not ended by itself.

        A stdio server that exits is noticed by the next call (which then
        fails at once); an HTTP connection that breaks, when it breaks.
        """
        with self._lock:
            return self._accepting and self._failure is None

    def call(self, name: str, arguments: Mapping[str, Any] | None = None, *, timeout: float | None = None) -> str:
        """Call the server's tool ``name`` (its MCP name) and return its output string.

        The output is what the model would receive (see :func:`render_result`).
        ``timeout`` defaults to the server's ``timeout`` (else 30 s). Raises
        :class:`~rtqueue.errors.ToolError` when the tool reports an error, the
        call times out (the request is then cancelled on the server), or the
        server is closed, dead or unreachable. Arguments are not validated
        here; :class:`MCPTool` does that against the tool's schema.
        """
        wait = _positive(timeout, "timeout", allow_none=True) or self._timeout or DEFAULT_TOOL_TIMEOUT
        return self._call(name, dict(arguments or {}), wait, label=name)

    def refresh(self, timeout: float | None = None) -> list[MCPTool]:
        """List the server's tools again now and return the new :meth:`tools`.

        Raises :class:`MCPError` if the server cannot be asked (closed, dead,
        timed out after ``timeout``, default ``connect_timeout``).
        """
        wait = _positive(timeout, "timeout", allow_none=True) or self._connect_timeout
        outcome = self._submit(self._refresh_async, wait)
        if isinstance(outcome, str):
            raise MCPError(f"could not list the tools of MCP server {self.name!r}: {outcome}")
        return self.tools()

    def wait_for_tools(self, predicate: Callable[[list[MCPTool]], bool], timeout: float | None = None) -> bool:
        """Block until ``predicate(self.tools())`` holds (e.g. after a list change); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while not predicate(list(self._tools.values())):
                if self._closing or (self._failure is not None and not self._accepting):
                    return False  # the list cannot change any more
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._changed.wait(remaining)
            return True

    def close(self, timeout: float = 10.0) -> None:
        """Disconnect: end the loop thread and, for stdio, the server process. Idempotent.

        Safe from any thread (including a tool worker). Calls in flight end
        with a :class:`~rtqueue.errors.ToolError`. The shutdown is graceful
        first (stdin closed, HTTP session deleted) and forced after half of
        ``timeout``; a stdio server that ignores both is killed by ``mcp``'s
        own escalation (SIGTERM, then SIGKILL to its process group).
        """
        if threading.current_thread() is self._thread:
            raise InvalidArgument("MCPServer.close() cannot be called from its own loop thread")
        with self._lock:
            self._closing = True
            self._accepting = False
            loop = self._loop
            self._changed.notify_all()
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(self._request_stop)
        self._thread.join(timeout / 2)
        if self._thread.is_alive() and loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._force_stop)
            self._thread.join(timeout / 2)
        if self._thread.is_alive():
            log.warning("MCP server %r: its thread did not end within %g s", self.name, timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closing else ("connected" if self.connected else f"lost ({self._failure})")
        return f"<MCPServer {self.name!r} {self._transport.describe()!r} {state}, {len(self._tools)} tools>"

    def _startup_reason(self, error: BaseException) -> str:
        error = _leaf(error)
        if isinstance(error, TimeoutError):
            return f"no answer to initialize and tools/list within {self._connect_timeout:g} s"
        if _is_connection_closed(error):
            return "the server closed the connection (did it exit?)"
        return _describe_exception(error)

    # -- calling, from any thread ----------------------------------------------

    def _call(self, mcp_name: str, arguments: dict[str, Any], timeout: float, *, label: str) -> str:
        outcome = self._submit(lambda: self._call_async(mcp_name, arguments), timeout, label=label)
        if isinstance(outcome, str):
            raise ToolError(outcome)
        is_error, text = outcome
        if is_error:
            raise ToolError(f"tool {label} failed: {text}")
        return text

    def _submit(self, make: Callable[[], Awaitable[_T]], timeout: float, *, label: str | None = None) -> _T | str:
        """Run ``make()`` on the loop and return its value, or an error message (a ``str``).

        The coroutines passed here never raise (they return their failure),
        so whatever comes back from the future is theirs, and a
        ``TimeoutError`` can only be our own wait running out.
        """
        if threading.current_thread() is self._thread:
            return f"MCP server {self.name!r} was called from its own loop thread"
        with self._lock:
            loop = self._loop if self._accepting else None
            if loop is None:
                return self._unavailable()
            # Made under the lock: close() cannot stop the loop between the
            # check and the submission, so the task exists and is either run or
            # cancelled by the loop's shutdown (which resolves the future).
            future = asyncio.run_coroutine_threadsafe(_as_coroutine(make), loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()  # cancels the request on the loop (MCP sends notifications/cancelled)
            what = f"tool {label}" if label is not None else f"MCP server {self.name!r}"
            return f"{what} timed out after {timeout:g} s"
        except concurrent.futures.CancelledError:
            return self._unavailable()

    def _unavailable(self) -> str:
        if self._closing:
            return f"MCP server {self.name!r} is closed"
        return f"MCP server {self.name!r} is not connected: {self._failure or 'the connection ended'}"

    # -- the loop thread ---------------------------------------------------------

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # asyncio.run itself failed; nothing else can report it
            log.exception("MCP server %r: the event loop failed", self.name)
            if not self._ready.is_set():
                self._startup_error = exc
        finally:
            with self._lock:
                self._accepting = False
                self._loop = None
                self._changed.notify_all()
            self._ready.set()

    async def _main(self) -> None:
        import anyio
        import mcp_types
        from mcp import ClientSession

        with anyio.CancelScope() as scope:
            with self._lock:
                self._loop = asyncio.get_running_loop()
                self._stop = asyncio.Event()
                self._cancel_startup = scope.cancel
                if self._closing:
                    return
            try:
                async with contextlib.AsyncExitStack() as stack:
                    read, write = await self._transport.open(stack)
                    session = ClientSession(
                        read,
                        write,
                        message_handler=self._on_message,
                        client_info=mcp_types.Implementation(name="rtqueue", version=_version()),
                    )
                    await stack.enter_async_context(session)
                    with anyio.fail_after(self._connect_timeout):
                        await session.initialize()
                        listed = await self._list_tools(session)
                    missing = sorted(self._allowed_names - {t.get("name") for t in listed})
                    if missing:
                        log.warning("MCP server %r has no tools named %s (allowed_tools)", self.name, missing)
                    with self._lock:
                        self._session = session
                        self._install(listed)
                        self._cancel_startup = None
                        self._accepting = not self._closing
                    self._ready.set()
                    await self._stop.wait()
            except BaseException as exc:  # on our own loop: record, never propagate to asyncio.run
                if not self._ready.is_set():
                    self._startup_error = exc
                elif not self._closing:
                    with self._lock:
                        self._failure = _describe_exception(exc)
                    log.warning("MCP server %r: connection lost: %s", self.name, self._failure)
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
            finally:
                with self._lock:
                    self._accepting = False
                    self._session = None
                    if self._failure is None and not self._closing:
                        self._failure = "the connection ended"
                    self._changed.notify_all()

    def _request_stop(self) -> None:
        """On the loop: leave the connection gracefully (or abandon a startup)."""
        if self._cancel_startup is not None:
            self._cancel_startup()
        if self._stop is not None:
            self._stop.set()

    def _force_stop(self) -> None:
        """On the loop: cancel everything (a graceful close did not finish)."""
        for task in asyncio.all_tasks():
            task.cancel()

    async def _on_message(self, message: Any) -> None:
        """Server notifications and transport faults (on the loop)."""
        method = getattr(message, "method", None)
        if method == "notifications/tools/list_changed":
            # Not awaited here: the handler runs inside the session's receive
            # loop, which must stay free to deliver the tools/list answer.
            task = asyncio.get_running_loop().create_task(self._refresh_quietly())
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        elif isinstance(message, Exception):
            log.warning("MCP server %r: transport error: %s", self.name, _describe_exception(message))

    async def _refresh_quietly(self) -> None:
        outcome = await self._refresh_async()
        if isinstance(outcome, str):
            log.warning("MCP server %r: re-listing tools after a change failed: %s", self.name, outcome)

    async def _refresh_async(self) -> str | None:
        """List the tools and install them; an error message instead of raising."""
        session = self._session
        if session is None:
            return self._unavailable()
        try:
            listed = await self._list_tools(session)
        except Exception as exc:
            return _describe_exception(exc)
        with self._lock:
            self._install(listed)
        return None

    async def _list_tools(self, session: ClientSession) -> list[dict[str, Any]]:
        """Every page of ``tools/list``, each tool in its wire form (camelCase keys)."""
        import mcp_types

        tools: list[dict[str, Any]] = []
        cursor: str | None = None
        for _ in range(_MAX_LIST_PAGES):
            params = mcp_types.PaginatedRequestParams(cursor=cursor) if cursor is not None else None
            page = await session.list_tools(params=params)
            tools.extend(t.model_dump(by_alias=True, mode="json", exclude_none=True) for t in page.tools)
            cursor = page.next_cursor
            if not cursor:
                return tools
        log.warning("MCP server %r: stopped listing tools after %d pages", self.name, _MAX_LIST_PAGES)
        return tools

    async def _call_async(self, mcp_name: str, arguments: dict[str, Any]) -> tuple[bool, str] | str:
        """On the loop: one ``tools/call``; ``(is_error, text)`` or an error message, never an exception."""
        from mcp.shared.exceptions import MCPError as ProtocolMCPError

        session = self._session
        if session is None:
            return self._unavailable()
        try:
            result = await session.call_tool(mcp_name, arguments)
        except ProtocolMCPError as exc:
            if _is_connection_closed(exc):
                with self._lock:
                    if self._failure is None and not self._closing:
                        self._failure = "the connection closed (did the server exit?)"
                return self._unavailable()
            return f"MCP server {self.name!r} refused the call of {mcp_name}: {exc.error.message}"
        except Exception as exc:
            return f"calling {mcp_name} on MCP server {self.name!r} failed: {_describe_exception(exc)}"
        try:
            return render_result(
                result.model_dump(by_alias=True, mode="json", exclude_none=True),
                prefer_structured=self.prefer_structured,
            )
        except (TypeError, ValueError) as exc:
            return f"the result of {mcp_name} cannot be sent: {exc}"

    # -- tool objects (under self._lock) -----------------------------------------

    def _install(self, listed: list[dict[str, Any]]) -> None:
        tools: dict[str, MCPTool] = {}
        for spec in listed:
            mcp_name = spec.get("name")
            if not isinstance(mcp_name, str) or not self._allowed(mcp_name):
                continue
            name = _tool_name(self.prefix, mcp_name)
            if name in tools:
                log.warning(
                    "MCP server %r: tools %r and %r both become %r; keeping the first",
                    self.name,
                    tools[name].mcp_name,
                    mcp_name,
                    name,
                )
                continue
            description = spec.get("description") or spec.get("title") or ""
            parameters = _schema(spec.get("inputSchema"))
            old = self._tools.get(name)
            if (
                old is not None
                and old.mcp_name == mcp_name
                and old.description == description
                and old.parameters == parameters
            ):
                tools[name] = old  # unchanged: keep its identity for agents holding it
                continue
            try:
                tools[name] = MCPTool(
                    name=name,
                    description=str(description),
                    parameters=parameters,
                    func=self._caller(mcp_name, name),
                    timeout=self._timeout,
                    mcp_name=mcp_name,
                    server_name=self.name,
                )
            except InvalidArgument as exc:
                log.warning("MCP server %r: tool %r is not offered: %s", self.name, mcp_name, exc)
        self._tools = tools
        self._changed.notify_all()

    def _caller(self, mcp_name: str, name: str) -> Callable[..., str]:
        def call(**arguments: Any) -> str:
            return self._call(mcp_name, arguments, self._timeout or DEFAULT_TOOL_TIMEOUT, label=name)

        call.__name__ = name
        call.__doc__ = f"Call {mcp_name!r} on MCP server {self.name!r}."
        return call


async def _as_coroutine(make: Callable[[], Awaitable[_T]]) -> _T:
    # Defers make() to the loop thread: the coroutine that touches the
    # session is created where it runs.
    return await make()


def _is_connection_closed(exc: BaseException) -> bool:
    from mcp.shared.exceptions import MCPError as ProtocolMCPError
    from mcp_types import CONNECTION_CLOSED

    return isinstance(exc, ProtocolMCPError) and exc.error.code == CONNECTION_CLOSED


def _allowed_filter(allowed: Iterable[str] | Callable[[str], bool] | None) -> Callable[[str], bool]:
    if allowed is None:
        return lambda _name: True
    if callable(allowed):
        return allowed
    if isinstance(allowed, (str, bytes)):
        raise InvalidArgument("allowed_tools must be a list of tool names (wrap a single name in a list)")
    names = frozenset(allowed)
    if not all(isinstance(n, str) for n in names):
        raise InvalidArgument(f"allowed_tools must hold str names, got {sorted(map(repr, names))}")
    return names.__contains__


def _positive(value: object, what: str, *, allow_none: bool = False) -> Any:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise InvalidArgument(f"{what} must be a positive number of seconds, got {value!r}")
    return float(value)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rtqueue")
    except PackageNotFoundError:
        return "0"
