"""Tests for rtqueue.tools: schemas from signatures, argument checks, invoke."""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from typing import Annotated, Any, Literal, Optional

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st
from openai.types.realtime import RealtimeFunctionTool

from rtqueue.errors import InvalidArgument, ToolError
from rtqueue.tools import Tool, ToolContext, serialize_output, tool


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


class Size(enum.IntEnum):
    SMALL = 1
    LARGE = 2


def props(t: Tool) -> dict[str, Any]:
    return t.parameters["properties"]


def assert_valid_definition(definition: dict[str, Any]) -> None:
    """Check a tool definition against the openai GA model, extra keys included."""
    model = RealtimeFunctionTool.model_validate(definition)
    assert set(definition) <= set(RealtimeFunctionTool.model_fields)
    assert model.type == "function"
    assert model.model_dump(exclude_unset=True) == definition
    json.dumps(definition)


# --------------------------------------------------------------------------
# Schema generation


def test_scalar_types() -> None:
    """str, int, float and bool map to their JSON schema types."""

    @tool
    def f(s: str, i: int, x: float, b: bool) -> None:
        """F."""

    assert props(f) == {
        "s": {"type": "string"},
        "i": {"type": "integer"},
        "x": {"type": "number"},
        "b": {"type": "boolean"},
    }
    assert f.parameters["required"] == ["s", "i", "x", "b"]
    assert f.parameters["additionalProperties"] is False
    assert f.parameters["type"] == "object"


def test_container_types() -> None:
    """list, Sequence, tuple and dict[str, X] map to arrays and objects."""

    @tool
    def f(
        a: list[int],
        b: Sequence[str],
        c: tuple[float, ...],
        d: tuple[int, str],
        e: dict[str, bool],
        g: list,
        h: dict,
        i: list[list[str]],
    ) -> None:
        """F."""

    p = props(f)
    assert p["a"] == {"type": "array", "items": {"type": "integer"}}
    assert p["b"] == {"type": "array", "items": {"type": "string"}}
    assert p["c"] == {"type": "array", "items": {"type": "number"}}
    assert p["d"] == {
        "type": "array",
        "prefixItems": [{"type": "integer"}, {"type": "string"}],
        "items": False,
        "minItems": 2,
        "maxItems": 2,
    }
    assert p["e"] == {"type": "object", "additionalProperties": {"type": "boolean"}}
    assert p["g"] == {"type": "array"}
    assert p["h"] == {"type": "object"}
    assert p["i"] == {"type": "array", "items": {"type": "array", "items": {"type": "string"}}}


def test_literal_and_enum() -> None:
    """Literal and Enum parameters become enums of their values."""

    @tool
    def f(mode: Literal["fast", "slow"], color: Color, size: Size, mixed: Literal[1, "a"]) -> None:
        """F."""

    p = props(f)
    assert p["mode"] == {"type": "string", "enum": ["fast", "slow"]}
    assert p["color"] == {"type": "string", "enum": ["red", "green"]}
    assert p["size"] == {"type": "integer", "enum": [1, 2]}
    assert p["mixed"] == {"enum": [1, "a"]}


def test_optional_schema_forms() -> None:
    """X | None uses a type list, compound schemas use anyOf, defaults are shown."""

    @tool
    def f(
        a: Optional[int],  # noqa: UP045
        b: str | None = None,
        c: int = 3,
        d: Color = Color.RED,
        e: Literal["x", "y"] | None = None,
        g: list[int] | None = None,
        h: int | str = 1,
        k: Any = None,
    ) -> None:
        """F."""

    p = props(f)
    assert f.parameters["required"] == ["a"]
    assert p["a"] == {"type": ["integer", "null"]}
    assert p["b"] == {"type": ["string", "null"], "default": None}
    assert p["c"] == {"type": "integer", "default": 3}
    assert p["d"] == {"type": "string", "enum": ["red", "green"], "default": "red"}
    assert p["e"] == {"type": ["string", "null"], "enum": ["x", "y", None], "default": None}
    assert p["g"] == {"type": ["array", "null"], "items": {"type": "integer"}, "default": None}
    assert p["h"] == {"anyOf": [{"type": "integer"}, {"type": "string"}], "default": 1}
    assert p["k"] == {"default": None}


def test_non_json_default_is_hidden() -> None:
    """A default that is not plain JSON is left out of the schema but stays optional."""
    sentinel = object()

    @tool
    def f(a: Any = sentinel) -> None:
        """F."""

    assert props(f)["a"] == {}
    assert f.parameters["required"] == []


def test_google_docstring() -> None:
    """Google-style Args give descriptions; the first paragraph is the description."""

    @tool
    def lookup_order(order_id: str, include_items: bool = False, note: str = "") -> dict:
        """Look up an order
        by its id.

        Use it whenever the caller mentions an order.

        Args:
            order_id (str): The order number,
                e.g. "A-1234".
            include_items: Also list the items.

        Returns:
            order_id: not a parameter description.
        """
        return {}

    assert lookup_order.description == "Look up an order by its id."
    p = props(lookup_order)
    assert p["order_id"]["description"] == 'The order number, e.g. "A-1234".'
    assert p["include_items"]["description"] == "Also list the items."
    assert "description" not in p["note"]


def test_sphinx_docstring() -> None:
    """Sphinx :param fields give descriptions, with or without a type."""

    @tool
    def book(room: str, nights: int) -> str:
        """Book a room.

        :param room: The room
            name.
        :param int nights: How many nights.
        :returns: a confirmation.
        """
        return "ok"

    assert book.description == "Book a room."
    p = props(book)
    assert p["room"]["description"] == "The room name."
    assert p["nights"]["description"] == "How many nights."


def test_annotated_description_wins() -> None:
    """Annotated[X, "text"] describes a parameter, over the docstring."""

    @tool
    def f(city: Annotated[str, "The city name."]) -> None:
        """F.

        Args:
            city: ignored
        """

    assert props(f)["city"] == {"description": "The city name.", "type": "string"}


def test_no_docstring() -> None:
    """Without a docstring the description is empty and the name is the function's."""

    @tool
    def ping() -> str:
        return "pong"

    assert ping.name == "ping"
    assert ping.description == ""
    assert ping.parameters == {"type": "object", "properties": {}, "required": [], "additionalProperties": False}


def test_decorator_options() -> None:
    """@tool(name=..., description=..., timeout=...) overrides the defaults."""

    @tool(name="get_weather", description="Weather now.", timeout=2.5)
    def weather(city: str) -> str:
        """Ignored."""
        return city

    assert (weather.name, weather.description, weather.timeout) == ("get_weather", "Weather now.", 2.5)

    def g() -> None:
        """G."""

    assert tool(g).timeout is None
    with pytest.raises(InvalidArgument, match="tool name"):
        tool(lambda: None)  # "<lambda>" is no valid function name


def test_context_parameter_is_injected_not_described() -> None:
    """A ToolContext parameter is not in the schema and receives the context."""
    seen: list[ToolContext] = []

    @tool
    def f(x: int, ctx: ToolContext) -> str:
        """F."""
        seen.append(ctx)
        return "done"

    assert list(props(f)) == ["x"]
    assert f.context_param == "ctx"
    ctx = ToolContext(call_id="call_1", tool_name="f", agent_name="greeter", context={"user": 7})
    assert f.invoke('{"x": 1}', ctx) == "done"
    f.invoke('{"x": 1}')
    assert seen[0] is ctx
    assert seen[1] == ToolContext(call_id="", tool_name="f")


def test_optional_context_parameter() -> None:
    """ToolContext | None is injected as well."""

    @tool
    def f(ctx: ToolContext | None = None) -> str:
        """F."""
        return ctx.call_id if ctx else "none"

    assert props(f) == {}
    assert f.invoke("", ToolContext(call_id="c9", tool_name="f")) == "c9"


def test_tool_stays_callable() -> None:
    """Calling a Tool calls the function directly."""

    @tool
    def add(a: int, b: int = 2) -> int:
        """Add."""
        return a + b

    assert add(1) == 3
    assert add(a=1, b=5) == 6


@pytest.mark.parametrize(
    ("source", "match"),
    [
        ("def f(a): pass", "has no type annotation"),
        ("def f(*a: int): pass", r"\*args"),
        ("def f(**a: int): pass", r"\*\*kwargs"),
        ("def f(a: int, /): pass", "positional-only"),
        ("def f(a: set[int]): pass", "unsupported annotation"),
        ("def f(a: dict[int, str]): pass", "dict\\[str"),
        ("async def f(a: int): pass", "coroutine"),
        ("def f(a: ToolContext, b: ToolContext): pass", "only one"),
    ],
)
def test_bad_signatures_rejected(source: str, match: str) -> None:
    """Unusable signatures raise InvalidArgument at decoration time."""
    namespace: dict[str, Any] = {"ToolContext": ToolContext}
    exec(source, namespace)  # building odd signatures is the point
    with pytest.raises(InvalidArgument, match=match):
        tool(namespace["f"])


def test_bad_options_rejected() -> None:
    """Invalid names, timeouts and non-functions raise InvalidArgument."""

    def f() -> None:
        """F."""

    with pytest.raises(InvalidArgument, match="tool name"):
        tool(name="has space")(f)
    with pytest.raises(InvalidArgument, match="timeout"):
        tool(timeout=0)(f)
    with pytest.raises(InvalidArgument, match="timeout"):
        tool(timeout=-1)(f)
    with pytest.raises(InvalidArgument, match="expects a function"):
        tool("lookup")  # type: ignore[call-overload]
    assert issubclass(InvalidArgument, TypeError)


def test_manual_tool_with_handwritten_schema() -> None:
    """A Tool built directly checks its schema and calls func with keywords."""
    t = Tool(
        name="echo",
        description="Echo.",
        parameters={"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
        func=lambda text: text.upper(),
    )
    assert t.invoke('{"text": "hi"}') == "HI"
    with pytest.raises(InvalidArgument, match="not a valid JSON schema"):
        Tool(name="x", description="", parameters={"type": "object", "properties": 3}, func=print)
    with pytest.raises(InvalidArgument, match='"type": "object"'):
        Tool(name="x", description="", parameters={"type": "string"}, func=print)
    with pytest.raises(InvalidArgument, match="callable"):
        Tool(name="x", description="", parameters={"type": "object"}, func=3)  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# Definitions against the openai types


def test_definition_validates_against_openai() -> None:
    """Tool.definition() is a valid GA RealtimeFunctionTool."""

    @tool
    def lookup_order(order_id: str, color: Color = Color.RED, qty: int | None = None) -> dict:
        """Look up an order.

        Args:
            order_id: The order id.
        """
        return {}

    definition = lookup_order.definition()
    assert definition["type"] == "function"
    assert definition["name"] == "lookup_order"
    assert definition["description"] == "Look up an order."
    assert_valid_definition(definition)


def test_definition_is_a_copy() -> None:
    """Changing a definition does not change the tool."""

    @tool
    def f(a: int) -> None:
        """F."""

    definition = f.definition()
    definition["parameters"]["properties"]["a"]["type"] = "string"
    assert props(f)["a"] == {"type": "integer"}


# --------------------------------------------------------------------------
# Argument validation


@tool
def lookup_order(order_id: str, qty: int = 1, price: float = 0.0, tags: list[str] | None = None) -> dict:
    """Look up an order."""
    return {"order_id": order_id, "qty": qty, "price": price, "tags": tags}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("{", "invalid arguments for lookup_order: not valid JSON"),
        ("[1]", "invalid arguments for lookup_order: expected a JSON object, got array"),
        ('"x"', "expected a JSON object, got string"),
        ("{}", "invalid arguments for lookup_order: 'order_id' is a required property"),
        ('{"order_id": 5}', "5 is not of type 'string' (at order_id)"),
        ('{"order_id": "A", "qty": "two"}', "'two' is not of type 'integer' (at qty)"),
        ('{"order_id": "A", "qty": true}', "True is not of type 'integer' (at qty)"),
        ('{"order_id": "A", "tags": ["a", 1]}', "(at tags[1])"),
        ('{"order_id": "A", "colour": "red"}', "Additional properties are not allowed ('colour' was unexpected)"),
    ],
)
def test_invalid_arguments(raw: str, message: str) -> None:
    """Bad JSON, non-objects, missing, mistyped and unknown fields raise ToolError."""
    with pytest.raises(ToolError) as info:
        lookup_order.parse_arguments(raw)
    assert message in str(info.value)


def test_several_errors_reported_together() -> None:
    """All missing properties and type errors appear in one message."""

    @tool
    def f(a: str, b: int, c: int) -> None:
        """F."""

    with pytest.raises(ToolError) as info:
        f.parse_arguments('{"a": 1}')
    assert str(info.value) == (
        "invalid arguments for f: 'b', 'c' are required properties; 1 is not of type 'string' (at a)"
    )


def test_bad_json_error_is_chained() -> None:
    """A JSON error is chained as the ToolError's cause."""
    with pytest.raises(ToolError) as info:
        lookup_order.parse_arguments("{bad")
    assert isinstance(info.value.__cause__, json.JSONDecodeError)


def test_empty_arguments_mean_empty_object() -> None:
    """An empty argument string is read as {}."""

    @tool
    def ping() -> str:
        """Ping."""
        return "pong"

    assert ping.parse_arguments("") == {}
    assert ping.invoke("  ") == "pong"


def test_coercions() -> None:
    """ints become floats, enum values members, arrays tuples, as annotated."""

    @tool
    def f(
        x: float,
        xs: list[float],
        m: dict[str, float],
        maybe: float | None,
        color: Color,
        colors: list[Color],
        pair: tuple[int, float],
        many: tuple[str, ...],
        ints: list[int],
    ) -> None:
        """F."""

    args = f.parse_arguments(
        json.dumps(
            {
                "x": 1,
                "xs": [1, 2.5],
                "m": {"a": 3},
                "maybe": None,
                "color": "green",
                "colors": ["red"],
                "pair": [1, 2],
                "many": ["a", "b"],
                "ints": [1, 2],
            }
        )
    )
    assert args == {
        "x": 1.0,
        "xs": [1.0, 2.5],
        "m": {"a": 3.0},
        "maybe": None,
        "color": Color.GREEN,
        "colors": [Color.RED],
        "pair": (1, 2.0),
        "many": ("a", "b"),
        "ints": [1, 2],
    }
    assert type(args["x"]) is float
    assert type(args["xs"][0]) is float
    assert type(args["pair"][1]) is float
    assert f.parse_arguments(json.dumps({**args, "color": "red", "colors": [], "maybe": 2}))["maybe"] == 2.0


@given(st.integers(min_value=-(2**53), max_value=2**53))
def test_int_accepted_for_number(value: int) -> None:
    """Any JSON integer is a valid float argument and arrives as a float."""
    args = lookup_order.parse_arguments(json.dumps({"order_id": "A", "price": value}))
    assert args["price"] == float(value)
    assert isinstance(args["price"], float)


# --------------------------------------------------------------------------
# invoke and serialization


@attrs.frozen
class Order:
    id: str
    color: Color


def test_invoke_serialization() -> None:
    """str is sent as is; other values as JSON (attrs, enums); an unknown object is refused, not sent as str()."""

    @tool
    def f(kind: str) -> Any:
        """F."""
        return {
            "str": "plain text",
            "dict": {"a": 1, "b": [1, 2]},
            "none": None,
            "attrs": Order(id="A-1", color=Color.RED),
            "nested": {"order": Order(id="B", color=Color.GREEN), "when": [Color.RED]},
            "opaque": {"when": _Opaque()},
            "number": 2.5,
            "unicode": ["café"],
        }[kind]

    assert f.invoke('{"kind": "str"}') == "plain text"
    assert json.loads(f.invoke('{"kind": "dict"}')) == {"a": 1, "b": [1, 2]}
    assert f.invoke('{"kind": "none"}') == "null"
    assert json.loads(f.invoke('{"kind": "attrs"}')) == {"id": "A-1", "color": "red"}
    assert json.loads(f.invoke('{"kind": "nested"}')) == {"order": {"id": "B", "color": "green"}, "when": ["red"]}
    with pytest.raises(ToolError, match=r"tool f returned a value that cannot be sent: .*_Opaque object"):
        f.invoke('{"kind": "opaque"}')
    assert f.invoke('{"kind": "number"}') == "2.5"
    assert f.invoke('{"kind": "unicode"}') == '["café"]'


class _Opaque:
    def __str__(self) -> str:
        return "opaque!"


def test_serialize_output_sets() -> None:
    """Sets serialise as lists."""
    assert json.loads(serialize_output({"s": {1}})) == {"s": [1]}


def test_invoke_wraps_tool_exceptions() -> None:
    """A tool that raises gives a ToolError chained from the exception."""

    @tool
    def boom(x: int) -> None:
        """Boom."""
        raise ValueError(f"bad {x}")

    with pytest.raises(ToolError, match="tool boom failed: ValueError: bad 3") as info:
        boom.invoke('{"x": 3}')
    assert isinstance(info.value.__cause__, ValueError)


def test_invoke_bad_arguments_do_not_call() -> None:
    """invoke with invalid arguments raises ToolError without calling the function."""
    calls: list[int] = []

    @tool
    def f(x: int) -> None:
        """F."""
        calls.append(x)

    with pytest.raises(ToolError, match="invalid arguments for f"):
        f.invoke('{"x": "1"}')
    assert calls == []


def test_invoke_unserializable_result() -> None:
    """A result json cannot encode (a cycle) gives a ToolError."""

    @tool
    def f() -> Any:
        """F."""
        loop: list[Any] = []
        loop.append(loop)
        return loop

    with pytest.raises(ToolError, match="cannot be sent"):
        f.invoke("{}")


def test_tools_without_an_agent_are_called():
    """Session.connect(tools=[...]) runs function tools for a session without agents."""
    from rtqueue import Agent, Session, Simulator, tool
    from rtqueue.errors import InvalidArgument
    from tests.utils import UNIT

    calls: list[str] = []

    @tool
    def lookup_order(order_id: str) -> str:
        """Look an order up.

        Args:
            order_id: the order number
        """
        calls.append(order_id)
        return "shipped"

    with Simulator(speed=20.0) as sim, Session.connect(url=sim.url, instructions="Be brief.",
                                                       tools=[lookup_order], reconnect=False) as s:
        answer = s.ask("[tools: lookup_order] where is order 42", timeout=UNIT)
        assert calls == ["42"] and "shipped" in answer.text
        assert s.session_config["instructions"] == "Be brief."
    with pytest.raises(InvalidArgument):
        Session.connect(url="ws://127.0.0.1:9", tools=[lookup_order], agent=Agent("a"))
