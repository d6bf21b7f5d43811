"""Function tools: typed Python functions the model can call.

``@tool`` turns a typed, documented function into a :class:`Tool`: its JSON
schema comes from the signature, its descriptions from the docstring. A tool
stays a plain callable for app code; the SDK uses :meth:`Tool.invoke`, which
validates the model's JSON arguments (with ``jsonschema``), calls the function
and serialises its return value into the string sent back as
``function_call_output.output``::

    @rtqueue.tool
    def lookup_order(order_id: str, include_items: bool = False) -> dict:
        '''Look up an order by its id.

        Args:
            order_id: The order number, e.g. "A-1234".
            include_items: Also list the items in the order.
        '''

Supported parameter annotations: ``str``, ``int``, ``float``, ``bool``,
``list[X]`` / ``Sequence[X]``, ``tuple[X, ...]`` / ``tuple[X, Y]``,
``dict[str, X]``, ``Literal[...]``, :class:`enum.Enum` subclasses,
``Optional[X]`` / ``X | None``, other unions, ``Any`` and ``Annotated[X, "description"]``.
A parameter without an annotation is refused at decoration time with
:class:`~rtqueue.errors.InvalidArgument` (guessing "string" would hide the
mistake until the model sends a number). A parameter annotated
:class:`ToolContext` is injected by the SDK and does not appear in the schema.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import decimal
import enum
import inspect
import json
import logging
import pathlib
import re
import sys
import types
import typing
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, overload

import attrs
import jsonschema
from jsonschema.exceptions import best_match

from .errors import InvalidArgument, ToolError

__all__ = [
    "DEFAULT_TOOL_TIMEOUT",
    "Tool",
    "ToolContext",
    "serialize_output",
    "tool",
]

#: Seconds a tool may run when neither the tool nor the runner says otherwise.
DEFAULT_TOOL_TIMEOUT = 30.0

# OpenAI's rule for function names; the server rejects anything else.
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

# Several validation errors at once let the model fix all of them in one retry,
# but a flood of them helps nobody.
_MAX_REPORTED_ERRORS = 5

log = logging.getLogger("rtqueue.tools")


def _check_approval(instance: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, bool) and not callable(value):
        raise InvalidArgument(f"needs_approval must be a bool or a predicate of the arguments, not {value!r}")


@attrs.frozen
class ToolContext:
    """What the SDK knows about one tool call, injected into tools that ask.

    A tool receives it by declaring a parameter annotated ``ToolContext`` (any
    name); that parameter is left out of the JSON schema the model sees.

    ``context`` is the application object given to the session (``None`` if
    none was given); ``agent_name`` is the agent that was active when the model
    called the tool.
    """

    call_id: str
    tool_name: str
    agent_name: str | None = None
    context: Any = None


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not _TOOL_NAME.match(name):
        raise InvalidArgument(f"tool name must be 1-64 characters of letters, digits, '_' or '-', got {name!r}")
    return name


def _check_str(instance: Any, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str):
        raise InvalidArgument(f"tool {attribute.name} must be a str, got {type(value).__name__}")


def _check_callable(instance: Any, attribute: attrs.Attribute[Any], value: object) -> None:
    if not callable(value):
        raise InvalidArgument(f"tool {attribute.name} must be callable, got {value!r}")


def _check_timeout(timeout: object) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise InvalidArgument(f"tool timeout must be a positive number of seconds or None, got {timeout!r}")
    return float(timeout)


def _check_parameters(parameters: object) -> dict[str, Any]:
    if not isinstance(parameters, Mapping):
        raise InvalidArgument(f"tool parameters must be a JSON schema dict, got {type(parameters).__name__}")
    schema = dict(parameters)
    if schema.get("type") != "object":
        raise InvalidArgument('tool parameters must be a JSON schema with "type": "object"')
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise InvalidArgument(f"tool parameters are not a valid JSON schema: {exc.message}") from exc
    return schema


def _freeze_converters(converters: Mapping[str, Callable[[Any], Any]]) -> Mapping[str, Callable[[Any], Any]]:
    return types.MappingProxyType(dict(converters))


@attrs.frozen(eq=False)
class Tool:
    """A function the model can call.

    Build one with :func:`tool`; constructing it directly is for hand-written
    schemas: ``func`` is then called with the validated arguments as keyword
    arguments.

    - ``name``: 1-64 characters of ``[A-Za-z0-9_-]`` (OpenAI's rule).
    - ``parameters``: a JSON schema of ``"type": "object"``, checked at construction.
    - ``timeout``: seconds the :class:`~rtqueue.toolrunner.ToolRunner` waits for
      one call; ``None`` means the runner's ``default_timeout`` (30 s unless changed).
    - ``context_param``: the name of the parameter that receives the
      :class:`ToolContext`, or ``None``.
    - ``converters``: per-parameter functions applied after validation (turning
      JSON values into ``float``, enum members, tuples); :func:`tool` fills it.
    - ``needs_approval``: ``True``, or a predicate of the parsed arguments,
      when a call must be approved before it runs (see :mod:`rtqueue.approvals`).

    Tools compare by identity (their schema is a dict, so value equality would
    make them unhashable).
    """

    name: str = attrs.field(converter=_check_name)
    description: str = attrs.field(validator=_check_str)
    parameters: dict[str, Any] = attrs.field(converter=_check_parameters, repr=False)
    func: Callable[..., Any] = attrs.field(validator=_check_callable)
    timeout: float | None = attrs.field(default=None, converter=_check_timeout)
    context_param: str | None = attrs.field(default=None, repr=False)
    converters: Mapping[str, Callable[[Any], Any]] = attrs.field(factory=dict, converter=_freeze_converters, repr=False)
    needs_approval: bool | Callable[[dict[str, Any]], bool] = attrs.field(default=False,
                                                                           validator=_check_approval)
    _validator: Any = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        # Built once: jsonschema compiles nothing, but resolving the draft and
        # format checker per call is wasted work on the hot path.
        object.__setattr__(self, "_validator", jsonschema.Draft202012Validator(self.parameters))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the wrapped function directly, exactly as app code would."""
        return self.func(*args, **kwargs)

    def requires_approval(self, arguments: dict[str, Any]) -> bool:
        """Whether this call (its parsed ``arguments``) must be approved first; a raising predicate says yes."""
        rule = self.needs_approval
        if isinstance(rule, bool):
            return rule
        try:
            return bool(rule(arguments))
        except Exception:  # a broken predicate must not wave a call through
            log.warning("needs_approval of tool %s raised; asking for approval", self.name, exc_info=True)
            return True

    def definition(self) -> dict[str, Any]:
        """The GA Realtime function tool for ``session.tools``.

        ``{"type": "function", "name", "description", "parameters"}``; a deep
        copy, so callers may change it freely.
        """
        return {
            "type": "function",
            "name": self.name,
            "description": self.description,
            "parameters": copy.deepcopy(self.parameters),
        }

    def parse_arguments(self, raw: str) -> dict[str, Any]:
        """Validate the model's JSON arguments and return the keyword arguments.

        An empty or blank string counts as ``{}`` (models send it for tools
        without parameters). Values are validated against :attr:`parameters`,
        then converted: integers become floats where the parameter is a
        ``float``, enum values become members, arrays become tuples where
        the parameter is a ``tuple``. The :class:`ToolContext` is not added here.

        Raises :class:`~rtqueue.errors.ToolError` with a message addressed to
        the model for invalid JSON, a non-object, missing required or unknown
        properties and wrong types, e.g.
        ``invalid arguments for lookup_order: 'order_id' is a required property``.
        """
        if not isinstance(raw, str):
            raise ToolError(f"invalid arguments for {self.name}: expected a JSON string, got {type(raw).__name__}")
        text = raw.strip() or "{}"
        try:
            args = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ToolError(
                f"invalid arguments for {self.name}: not valid JSON ({exc.msg} at position {exc.pos})"
            ) from exc
        if not isinstance(args, dict):
            raise ToolError(f"invalid arguments for {self.name}: expected a JSON object, got {_json_type(args)}")
        errors = sorted(self._validator.iter_errors(args), key=lambda e: (list(e.absolute_path), e.message))
        if errors:
            raise ToolError(f"invalid arguments for {self.name}: {_describe_errors(errors)}")
        for key, convert in self.converters.items():
            if key in args:
                args[key] = convert(args[key])
        return args

    def invoke(self, raw_arguments: str, ctx: ToolContext | None = None) -> str:
        """Parse ``raw_arguments``, call the function and serialise its result.

        The result becomes the ``function_call_output.output`` string (see
        :func:`serialize_output`). A tool that takes a :class:`ToolContext`
        gets ``ctx``, or, when ``ctx`` is ``None``, a context with
        ``call_id=""`` and ``context=None``.

        Raises :class:`~rtqueue.errors.ToolError` (chained ``from`` the cause)
        for invalid arguments, when the function raises, or when its result
        cannot be sent (NaN or infinity, an object :func:`serialize_output`
        does not convert, a circular reference). The function runs on the
        calling thread.
        """
        kwargs = self.parse_arguments(raw_arguments)
        if self.context_param is not None:
            kwargs[self.context_param] = ctx if ctx is not None else ToolContext(call_id="", tool_name=self.name)
        try:
            result = self.func(**kwargs)
        except Exception as exc:
            raise ToolError(f"tool {self.name} failed: {type(exc).__name__}: {exc}") from exc
        try:
            return serialize_output(result)
        except (TypeError, ValueError) as exc:
            raise ToolError(f"tool {self.name} returned a value that cannot be sent: {exc}") from exc


def serialize_output(value: Any) -> str:
    """Turn a tool's return value into the string the model receives.

    A ``str`` is sent as it is. Anything else is sent as strict JSON
    (``json.dumps(..., allow_nan=False)``), with these conversions at any depth:

    - attrs instances and dataclasses become objects of their fields;
    - enum members become their values; sets and frozensets become lists;
      other mappings (e.g. ``MappingProxyType``) become objects;
    - ``datetime``, ``date`` and ``time`` become ISO 8601 strings (``isoformat()``);
    - ``uuid.UUID``, finite ``decimal.Decimal`` (its exact digits, not a
      rounded float) and paths (``pathlib.PurePath``) become strings (``str()``);
    - numpy scalars and arrays become numbers and lists (``item()``, ``tolist()``).

    Raises :class:`~rtqueue.errors.InvalidArgument` (a ``TypeError``) for any
    other object (it is not sent as its ``str()`` or ``repr``: the model would
    read ``<Order object at 0x7f...>``, or internals the app never meant to
    share), for NaN and infinite numbers (JSON has no such values; the API
    would get non-standard ``NaN``), for circular references and for dict keys
    JSON cannot have. :meth:`Tool.invoke` turns that into a
    :class:`~rtqueue.errors.ToolError` ("tool X returned a value that cannot
    be sent: ..."), and the model gets an error output instead.
    """
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, default=_json_default, ensure_ascii=False, allow_nan=False)
    except InvalidArgument:
        raise
    except ValueError as exc:
        if "Out of range float" in str(exc):
            raise InvalidArgument("it contains NaN or infinity, which JSON cannot represent") from None
        raise InvalidArgument(str(exc)) from exc  # "Circular reference detected"
    except TypeError as exc:
        raise InvalidArgument(str(exc)) from exc  # dict keys of an unsupported type
    except RecursionError:
        raise InvalidArgument("it is nested too deeply for JSON") from None


def _json_default(value: Any) -> Any:
    if attrs.has(type(value)):
        return attrs.asdict(value, recurse=False)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return list(value)
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, (datetime.date, datetime.time)):  # datetime is a date
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            raise InvalidArgument(f"it contains Decimal({str(value)!r}), which JSON cannot represent")
        return str(value)
    if isinstance(value, (uuid.UUID, pathlib.PurePath)):
        return str(value)
    # numpy is not imported for this: a numpy value can only exist once the app imported numpy.
    np = sys.modules.get("numpy")
    if np is not None and isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()  # a Python scalar for numpy scalars
    kind = type(value).__qualname__
    if type(value).__module__ != "builtins":
        kind = f"{type(value).__module__}.{kind}"
    raise InvalidArgument(
        f"it contains a {kind} object; return str, numbers, bool, "
        "None, lists, dicts, attrs or dataclass instances, enums, sets, datetimes, UUID, Decimal or paths "
        "(or convert the object yourself)"
    )


def _json_type(value: Any) -> str:
    for py, name in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"), (list, "array")):
        if isinstance(value, py):
            return name
    return "null" if value is None else type(value).__name__


def _describe_errors(errors: list[jsonschema.ValidationError]) -> str:
    # One line for all missing properties, so a long list of them cannot hide
    # a type error in the properties that were sent.
    missing = [e for e in errors if e.validator == "required" and not e.absolute_path]
    errors = [e for e in errors if e not in missing]
    parts = []
    if len(missing) == 1:
        parts.append(missing[0].message)
    elif missing:
        first = missing[0]
        names = ", ".join(repr(n) for n in first.validator_value if n not in first.instance)
        parts.append(f"{names} are required properties")
    # Errors inside anyOf branches are noise for the model; best_match picks
    # the most relevant leaf of each.
    for err in errors[:_MAX_REPORTED_ERRORS]:
        leaf = best_match([err]) if err.context else err
        path = "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in leaf.absolute_path)
        parts.append(f"{leaf.message} (at {path.lstrip('.')})" if path else leaf.message)
    if len(errors) > _MAX_REPORTED_ERRORS:
        parts.append(f"and {len(errors) - _MAX_REPORTED_ERRORS} more")
    return "; ".join(parts)


# --------------------------------------------------------------------------
# The decorator


@overload
def tool(func: Callable[..., Any], /) -> Tool: ...


@overload
def tool(
    *, name: str | None = None, description: str | None = None, timeout: float | None = None,
    needs_approval: bool | Callable[[dict[str, Any]], bool] = False,
) -> Callable[[Callable[..., Any]], Tool]: ...


def tool(
    func: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    timeout: float | None = None,
    needs_approval: bool | Callable[[dict[str, Any]], bool] = False,
) -> Tool | Callable[[Callable[..., Any]], Tool]:
    """Make a :class:`Tool` from a typed function; use as ``@tool`` or ``@tool(...)``.

    - ``name`` defaults to the function's ``__name__``.
    - ``description`` defaults to the docstring's first paragraph.
    - ``timeout``: seconds a call may run; ``None`` uses the runner's default.
    - ``needs_approval``: ``True`` or a predicate of the arguments; such calls
      wait for the app's yes (see :mod:`rtqueue.approvals`).

    Parameter descriptions come from the docstring's Google-style ``Args:``
    section or Sphinx ``:param name:`` fields (``Annotated[X, "text"]`` wins
    over both). Parameters with defaults are optional; the schema has
    ``additionalProperties: false``.

    Raises :class:`~rtqueue.errors.InvalidArgument` at decoration time for a
    parameter without an annotation, an unsupported annotation, ``*args`` /
    ``**kwargs``, positional-only parameters, or a coroutine function (tools
    run on worker threads and must be synchronous).
    """

    def decorate(f: Callable[..., Any]) -> Tool:
        made = _make_tool(f, name=name, description=description, timeout=timeout)
        return attrs.evolve(made, needs_approval=needs_approval) if needs_approval is not False else made

    if func is None:
        return decorate
    if isinstance(func, (str, Tool)) or not callable(func):
        raise InvalidArgument(f"@tool expects a function, got {func!r}; use @tool(name=...) for options")
    return decorate(func)


def _make_tool(func: Callable[..., Any], *, name: str | None, description: str | None, timeout: float | None) -> Tool:
    label = getattr(func, "__qualname__", repr(func))
    # An object with an async __call__ is just as unusable on a worker thread.
    if inspect.iscoroutinefunction(func) or (
        not inspect.isroutine(func) and inspect.iscoroutinefunction(type(func).__call__)
    ):
        raise InvalidArgument(f"tool {label} is a coroutine function; tools must be synchronous")
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"cannot read the signature of {label}: {exc}") from exc
    try:
        hints = typing.get_type_hints(func, include_extras=True)
    except Exception as exc:
        raise InvalidArgument(f"cannot resolve the type annotations of {label}: {exc}") from exc

    doc = _parse_docstring(inspect.getdoc(func) or "")
    properties: dict[str, Any] = {}
    required: list[str] = []
    converters: dict[str, Callable[[Any], Any]] = {}
    context_param: str | None = None

    for param in signature.parameters.values():
        where = f"parameter {param.name!r} of {label}"
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise InvalidArgument(f"{where}: *args and **kwargs cannot be described to the model")
        if param.kind is param.POSITIONAL_ONLY:
            raise InvalidArgument(f"{where}: positional-only parameters cannot be passed by name")
        if param.name not in hints:
            raise InvalidArgument(f"{where} has no type annotation; annotate it (e.g. ': str')")
        annotation = hints[param.name]
        if _is_context(annotation):
            if context_param is not None:
                raise InvalidArgument(f"{where}: only one parameter may take the ToolContext")
            context_param = param.name
            continue
        annotation, note = _strip_annotated(annotation)
        schema = _schema_for(annotation, where)
        text = note or doc.params.get(param.name)
        if text:
            schema = {"description": text, **schema}
        if param.default is param.empty:
            required.append(param.name)
        else:
            default = _json_default_value(param.default)
            if default is not _NO_DEFAULT:
                schema["default"] = default
        properties[param.name] = schema
        convert = _converter_for(annotation)
        if convert is not None:
            converters[param.name] = convert

    parameters: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }
    return Tool(
        name=name if name is not None else getattr(func, "__name__", ""),
        description=description if description is not None else doc.summary,
        parameters=parameters,
        func=func,
        timeout=timeout,
        context_param=context_param,
        converters=converters,
    )


_NO_DEFAULT = object()


def _json_default_value(value: Any) -> Any:
    # Show the default to the model only when it is plain JSON; a default such
    # as a sentinel object would only confuse it.
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, tuple):
        value = list(value)
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return _NO_DEFAULT
    return value


def _is_context(annotation: Any) -> bool:
    annotation, _ = _strip_annotated(annotation)
    if annotation is ToolContext:
        return True
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return _is_union(annotation) and args == [ToolContext]


def _strip_annotated(annotation: Any) -> tuple[Any, str | None]:
    if typing.get_origin(annotation) is typing.Annotated:
        base, *extras = typing.get_args(annotation)
        note = next((e for e in extras if isinstance(e, str)), None)
        return base, note
    return annotation, None


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


_SCALARS: dict[Any, str] = {str: "string", bool: "boolean", int: "integer", float: "number"}


def _schema_for(annotation: Any, where: str) -> dict[str, Any]:
    """The JSON schema for one annotation (no description)."""
    annotation, _ = _strip_annotated(annotation)
    if annotation in _SCALARS:
        return {"type": _SCALARS[annotation]}
    if annotation is Any:
        return {}
    if annotation is type(None):
        return {"type": "null"}
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return _enum_schema([m.value for m in annotation], where)

    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return _enum_schema(list(args), where)
    if _is_union(annotation):
        options = [a for a in args if a is not type(None)]
        nullable = len(options) < len(args)
        if len(options) == 1:
            inner = _schema_for(options[0], where)
        else:
            inner = {"anyOf": [_schema_for(a, where) for a in options]}
        return _nullable(inner) if nullable else inner
    if annotation in (list, tuple, Sequence) or origin in (list, Sequence):
        schema: dict[str, Any] = {"type": "array"}
        if args:
            schema["items"] = _schema_for(args[0], where)
        return schema
    if origin is tuple:
        if not args:
            return {"type": "array"}
        if len(args) == 2 and args[1] is Ellipsis:
            return {"type": "array", "items": _schema_for(args[0], where)}
        if args == ((),):  # tuple[()]
            return {"type": "array", "maxItems": 0}
        return {
            "type": "array",
            "prefixItems": [_schema_for(a, where) for a in args],
            "items": False,
            "minItems": len(args),
            "maxItems": len(args),
        }
    if annotation in (dict, Mapping) or origin in (dict, Mapping):
        schema = {"type": "object"}
        if args:
            if args[0] is not str:
                raise InvalidArgument(f"{where}: JSON object keys are strings; use dict[str, ...]")
            schema["additionalProperties"] = _schema_for(args[1], where)
        return schema
    raise InvalidArgument(
        f"{where}: unsupported annotation {annotation!r}; use str, int, float, bool, list, tuple, "
        "dict[str, X], Literal, an Enum, Optional or a union of these"
    )


def _enum_schema(values: list[Any], where: str) -> dict[str, Any]:
    if not values:
        raise InvalidArgument(f"{where}: an enum or Literal needs at least one value")
    kinds = set()
    for v in values:
        if v is not None and type(v) not in _SCALARS:
            raise InvalidArgument(f"{where}: enum and Literal values must be str, int, float, bool or None, got {v!r}")
        kinds.add("null" if v is None else _SCALARS[type(v)])
    schema: dict[str, Any] = {"enum": list(values)}
    if len(kinds) == 1:
        schema = {"type": kinds.pop(), **schema}
    return schema


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    # The compact {"type": [X, "null"]} form reads best to the model; fall back
    # to anyOf when the schema is not a single plain type.
    if isinstance(schema.get("type"), str) and "anyOf" not in schema:
        result = dict(schema, type=[schema["type"], "null"])
        if "enum" in result:
            result["enum"] = [*result["enum"], None]
        return result
    if not schema:
        return schema  # Any already admits null
    return {"anyOf": [schema, {"type": "null"}]}


def _converter_for(annotation: Any) -> Callable[[Any], Any] | None:
    """A function turning validated JSON into the annotated Python value, or None if JSON is already right."""
    annotation, _ = _strip_annotated(annotation)
    if annotation is float:
        return _to_float
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return annotation
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if _is_union(annotation):
        options = [a for a in args if a is not type(None)]
        if len(options) != 1:
            return None  # which branch matched is ambiguous; pass JSON through
        inner = _converter_for(options[0])
        if inner is None:
            return None
        return lambda v: None if v is None else inner(v)
    if origin in (list, Sequence) and args:
        item = _converter_for(args[0])
        if item is None:
            return None
        convert_item = item
        return lambda v: [convert_item(x) for x in v]
    if annotation is tuple:
        return tuple
    if origin is tuple:
        if not args:
            return tuple
        if len(args) == 2 and args[1] is Ellipsis:
            item = _converter_for(args[0])
            if item is None:
                return tuple
            convert_each = item
            return lambda v: tuple(convert_each(x) for x in v)
        items = [_converter_for(a) for a in args]
        return lambda v: tuple(c(x) if c else x for c, x in zip(items, v, strict=False))
    if origin in (dict, Mapping) and len(args) == 2:
        value = _converter_for(args[1])
        if value is None:
            return None
        convert_value = value
        return lambda v: {k: convert_value(x) for k, x in v.items()}
    return None


def _to_float(value: Any) -> Any:
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


# --------------------------------------------------------------------------
# Docstrings


@attrs.frozen
class _Doc:
    summary: str
    params: dict[str, str]


_GOOGLE_SECTION = re.compile(r"^(Args|Arguments|Parameters|Params|Keyword Args|Keyword Arguments):\s*$")
_GOOGLE_ENTRY = re.compile(r"^(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")
_SPHINX_FIELD = re.compile(r"^:(\w+)(?:\s+([^:]*?))?:\s*(.*)$")


def _parse_docstring(doc: str) -> _Doc:
    """Summary (first paragraph) and parameter descriptions of a cleaned docstring."""
    lines = doc.splitlines()
    summary_lines: list[str] = []
    for line in lines:
        stripped = line.strip()
        if not stripped or _GOOGLE_SECTION.match(stripped) or stripped.startswith(":"):
            break
        summary_lines.append(stripped)
    params = _google_params(lines)
    for key, value in _sphinx_params(lines).items():
        params.setdefault(key, value)
    return _Doc(summary=" ".join(summary_lines), params=params)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _google_params(lines: list[str]) -> dict[str, str]:
    params: dict[str, str] = {}
    i = 0
    while i < len(lines):
        header = lines[i]
        if not _GOOGLE_SECTION.match(header.strip()):
            i += 1
            continue
        base = _indent(header)
        entry_indent: int | None = None
        current: str | None = None
        i += 1
        while i < len(lines):
            line = lines[i]
            if line.strip() and _indent(line) <= base:
                break  # the next section ("Returns:") or prose
            if line.strip():
                indent = _indent(line)
                match = _GOOGLE_ENTRY.match(line.strip())
                if match and (entry_indent is None or indent <= entry_indent):
                    entry_indent = indent
                    current = match.group(1).lstrip("*")
                    params[current] = match.group(2).strip()
                elif current is not None:
                    params[current] = f"{params[current]} {line.strip()}".strip()
            i += 1
    return params


def _sphinx_params(lines: list[str]) -> dict[str, str]:
    params: dict[str, str] = {}
    current: str | None = None
    for line in lines:
        stripped = line.strip()
        match = _SPHINX_FIELD.match(stripped)
        if match:
            field, arg, text = match.groups()
            current = None
            if field in ("param", "parameter", "arg", "argument", "key", "keyword") and arg:
                current = arg.split()[-1]  # ":param int qty:" names qty
                params[current] = text.strip()
        elif current is not None and stripped and _indent(line) > 0:
            params[current] = f"{params[current]} {stripped}".strip()
        else:
            current = None
    return params
