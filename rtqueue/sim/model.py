"""The simulator's scripted "model": what the assistant says, which tools it calls.

It is deterministic: the same inputs and seed give the same reply. The rules:

**Context.** The model sees the response's instructions (the response's own, or
else the session's), its function tools, ``tool_choice``, and the turns of its
context (the conversation, or ``response.input`` when given). Only the *last
user message* and what follows it matter. A user audio turn reads as what it
says when the audio was made by :mod:`rtqueue.sim.synth` (see
:mod:`rtqueue.sim.transcribe`), else, without a transcript, as
``"(audio N ms)"``.

**Test hooks** in the last user text, or in the instructions (the user text
wins; a system message after the last user message, such as a guardrail's
correction note, wins over both; hooks are removed before anything is echoed):

- ``[say: some text]``: the reply is exactly ``some text``; so is
  ``Say exactly ...: some text`` in the instructions (a refusal), which wins
  over every hook.
- ``[len: N]``: the reply has exactly N words (1 <= N <= 1000).
- ``[items: N]``: the words are spread over N assistant message items in one
  response (1 <= N <= 8), as the real service sometimes does.
- ``[mcp: label.tool, ...]``: call these tools of the hosted ``mcp`` server
  ``label`` (a session tool of type ``"mcp"``) with ``{"query": <text>}``,
  then report the results in the same response. When the server's
  ``require_approval`` asks for it (the default ``"always"``), the response
  holds an ``mcp_approval_request`` item instead; after the client's
  ``mcp_approval_response`` item and a new ``response.create``, the call
  runs (or, if denied, is skipped). A tool name containing ``fail`` fails.
- ``[tools: a, b]``: call exactly these tools, in this order, instead of
  keyword matching. A name that is not among the available function tools is
  still called, with ``{}`` arguments (a "hallucinated" call, for testing).

**Tool calls.** With ``tool_choice`` ``"auto"`` (the default), every function
tool that matches the last user text is called, all in one response (parallel
calls), each at most once per user message: a tool already called after that
message (its ``function_call`` item is in the context) is not called again.

- A tool *matches* when one of its name tokens (split on ``_``, ``-`` and
  spaces, lower-cased, tokens shorter than 3 letters and stop-words such as
  ``get``/``check``/``tool`` dropped) or, for tools with a description, one of
  its description words (at least 4 letters, not a stop-word) appears as a
  whole word in the user text. A trailing ``s`` is ignored on both sides, so
  ``order`` matches ``orders``.
- ``transfer_to_<name>`` tools (handoffs) match only on the words of
  ``<name>``, never on their description.
- ``tool_choice`` ``"none"`` calls nothing; ``"required"`` calls the matching
  tools or else the first tool; ``{"type": "function", "name": X}`` calls X.
- Arguments come from the tool's JSON schema (``required`` properties, or all
  properties when ``required`` is absent): an ``enum`` gives its first value;
  integers and numbers take the numbers found in the user text, in order
  (else 1); booleans are ``true``; a string whose property name suggests an
  identifier (``id``, ``number``, ``code``, ``zip``, ``phone``...) takes a
  number from the text (else ``"12345"``); ``city``/``location``-like names
  take a capitalised word from the text (else ``"Paris"``); ``query``/
  ``text``/``reason``-like names take the user text; any other string takes
  the longest content word of the text (else ``"example"``); arrays are
  ``[]`` and nested objects recurse.
- A tool with a place-like parameter is called once per place when the text
  names several (capitalised words not at a sentence start): "weather in
  Paris, Berlin and Rome" calls it three times, in one response.
- A response that calls tools also says a short sentence first: ``"Let me
  transfer you to <name>."`` when every call is a handoff, else ``"Let me
  check that."`` (or ``[say: ...]``).

**Words.** Otherwise the reply is:

- after ``function_call_output`` items for the last user message: a summary,
  ``"Here is what I found: <values from each output>."`` (JSON outputs are
  flattened to ``key value`` pairs), at most 30 words; outputs of
  ``transfer_to_*`` calls are left out (after a handoff the new agent answers
  the user as usual);
- with no user message at all: a greeting;
- else an acknowledgement that echoes up to ten of the user's words, padded
  with stock sentences to a seeded length of 8-18 words and capped at 25.

**Summaries.** When the instructions ask to "summarize the conversation"
(as rtqueue's recycling does, in an out-of-band response whose ``input`` is
the history as text messages), the reply is ``Summary:`` followed by what the
user and system turns say, and the values of function outputs, in order
(hooks removed, each turn cut to 80 words, 250 words in all), and no tools
are called. The words of every fact given survive, so tests can check that a
summary carried them.

If the instructions say ``You are <role>`` (e.g. "You are the returns agent."),
the reply starts with ``This is <role>.``, which lets tests tell agents apart.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import attrs

__all__ = ["McpCall", "Reply", "ScriptedModel", "ToolCall", "Turn", "match_tools"]

TurnKind = Literal[
    "user",
    "assistant",
    "system",
    "function_call",
    "function_call_output",
    "mcp_call",
    "mcp_approval_request",
    "mcp_approval_response",
]

# Words too common to identify a tool (in tool names, descriptions or user text).
_STOP_TEXT = """
the and for with from into onto get set check find make create update list fetch show give send
run call use tool tools function user customer info information data agent help request please
current given this that your you about some any can will would could should want need what when
where which who how all are was were has have had not but its our their them they than then
there here also only just more most other such each very like does did done over under
"""
_STOP_WORDS = frozenset(_STOP_TEXT.split())
_ID_HINTS = ("id", "number", "num", "code", "zip", "postal", "phone", "account", "order", "ticket", "ref")
_PLACE_HINTS = ("city", "location", "place", "town", "country", "destination", "address", "region")
_FREE_TEXT_HINTS = ("query", "text", "question", "message", "reason", "topic", "description", "note", "input")
_HOOK = re.compile(r"\[(say|len|tools|items|mcp)\s*:\s*([^\]]*)\]", re.IGNORECASE)
# "Say exactly ...: X" in the instructions (how an app makes the model say a refusal): the reply is X.
_SAY_EXACTLY = re.compile(r"\bsay exactly\b[^:]*:\s*(.+)", re.IGNORECASE | re.DOTALL)
_WORD = re.compile(r"[a-z0-9]+")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_ROLE = re.compile(r"\byou are\s+((?:a|an|the)\s+)?([^.,;:!?\n]{1,48})", re.IGNORECASE)
_FILLER = (
    "I can help with that.",
    "Let me know if there is anything else.",
    "Happy to help further.",
    "That sounds good to me.",
    "I am here whenever you need me.",
    "Thanks for your patience.",
)
_OPENERS = ("Sure.", "Okay.", "Got it.", "Alright.", "Of course.")
_MAX_WORDS = 25
_SUMMARIZE = re.compile(r"\bsummari[sz]e the conversation\b", re.IGNORECASE)
_SUMMARY_TURN_WORDS = 80
_SUMMARY_WORDS = 250


@attrs.frozen
class Turn:
    """One context item, reduced to what the model reads.

    ``kind`` is the item's role (messages) or type (function items). ``text``
    is a message's text; ``name``/``call_id``/``arguments`` describe a
    function call; ``output`` is a function call output.
    """

    kind: TurnKind
    text: str = ""
    name: str = ""
    call_id: str = ""
    arguments: str = ""
    output: str = ""


@attrs.frozen
class ToolCall:
    """A function call the model decided to make; ``arguments`` is a JSON text."""

    name: str
    arguments: str


@attrs.frozen
class McpCall:
    """A hosted MCP tool call (``[mcp: label.tool]``).

    ``approval`` True: the response asks for approval (an
    ``mcp_approval_request`` item) instead of calling. ``output`` is what the
    simulated MCP server returns; ``error`` set means the call fails.
    """

    server_label: str
    name: str
    arguments: str
    approval: bool = False
    approval_request_id: str = ""
    output: str = ""
    error: str = ""


@attrs.frozen
class Reply:
    """What a response contains: words to say (may be empty) and calls to make."""

    text: str
    calls: tuple[ToolCall, ...] = ()
    #: Assistant message items the words are spread over (``[items: N]``).
    items: int = 1
    #: Hosted MCP calls (or approval requests), before the words.
    mcp: tuple[McpCall, ...] = ()


@attrs.define(eq=False)
class ScriptedModel:
    """The deterministic reply policy described in the module docstring."""

    seed: int = 0

    def reply(
        self,
        *,
        instructions: str,
        tools: Sequence[Mapping[str, Any]],
        tool_choice: Any,
        turns: Sequence[Turn],
    ) -> Reply:
        """Decide the reply for a response with this context. Never raises on odd input."""
        if _SUMMARIZE.search(instructions or ""):
            return Reply(text=_conversation_summary(turns))
        functions = [t for t in tools if isinstance(t, Mapping) and t.get("type", "function") == "function"]
        last_user = max((i for i, t in enumerate(turns) if t.kind == "user"), default=None)
        if last_user is None:
            user_text = ""
            after: Sequence[Turn] = turns
        else:
            user_text = turns[last_user].text
            after = turns[last_user + 1 :]
        # Hooks in the last user text win; hooks in the instructions (a
        # response.create's own) apply otherwise.
        hooks = {k.lower(): v.strip() for k, v in _HOOK.findall(instructions or "")}
        hooks.update({k.lower(): v.strip() for k, v in _HOOK.findall(user_text)})
        for t in after:  # a system note after the user's words (a guardrail's correction) wins over them
            if t.kind == "system":
                hooks.update({k.lower(): v.strip() for k, v in _HOOK.findall(t.text)})
        exact = _SAY_EXACTLY.search(_HOOK.sub(" ", instructions or ""))
        if exact:  # "Say exactly ...:" is an order for this very response (a refusal): nothing older beats it
            hooks["say"] = " ".join(exact.group(1).split())
        clean_text = " ".join(_HOOK.sub(" ", user_text).split())
        rng = random.Random(f"{self.seed}|{len(turns)}|{user_text}|{instructions}")
        role = _role_sentence(_HOOK.sub(" ", instructions or ""))

        already = {t.name for t in after if t.kind == "function_call"}
        # A handoff's output is not news to summarise: the new agent answers the user.
        transfers = {
            t.call_id for t in after if t.kind == "function_call" and t.name.lower().startswith("transfer_to_")
        }
        outputs = [t.output for t in after if t.kind == "function_call_output" and t.call_id not in transfers]
        calls = self._choose_calls(functions, tool_choice, clean_text, hooks, already)
        mcp, mcp_text = _mcp_calls(tools, hooks.get("mcp", ""), clean_text, after)

        if "say" in hooks:
            text = hooks["say"]
        elif mcp_text:
            text = mcp_text
        elif calls:
            handoffs = [c.name[len("transfer_to_") :] for c in calls if c.name.lower().startswith("transfer_to_")]
            if len(handoffs) == len(calls):
                text = f"Let me transfer you to {' and '.join(h.replace('_', ' ') for h in handoffs)}."
            else:
                text = "Let me check that."
        elif outputs:
            text = _summary(outputs)
        elif last_user is None:
            text = _join([role, "Hello! How can I help you today?"], _MAX_WORDS)
        else:
            echo = " ".join(clean_text.split()[:10]) or "nothing"
            parts = [role, rng.choice(_OPENERS), f'You said "{echo}".']
            target = rng.randint(8, 18)
            fillers = list(_FILLER)
            rng.shuffle(fillers)
            while fillers and len(" ".join(p for p in parts if p).split()) < target:
                parts.append(fillers.pop())
            text = _join(parts, _MAX_WORDS)
            if len(text.split()) < 5:
                text = _join([text, "How can I help?"], _MAX_WORDS)
        if "len" in hooks and "say" not in hooks:
            text = _exact_length(text, hooks["len"])
        items = 1
        if "items" in hooks:
            try:
                items = max(1, min(8, int(hooks["items"])))
            except ValueError:
                items = 1
        return Reply(text=text, calls=tuple(calls), items=items, mcp=tuple(mcp))

    def _choose_calls(
        self,
        functions: Sequence[Mapping[str, Any]],
        tool_choice: Any,
        text: str,
        hooks: Mapping[str, str],
        already: set[str],
    ) -> list[ToolCall]:
        """The calls for this response, honouring hooks, tool_choice and "once per message"."""
        by_name = {str(t.get("name")): t for t in functions if t.get("name")}
        if "tools" in hooks:
            names = [n.strip() for n in hooks["tools"].split(",") if n.strip()]
            return [
                ToolCall(n, _arguments(by_name[n], text) if n in by_name else "{}")
                for n in dict.fromkeys(names)
                if n not in already
            ]
        if tool_choice == "none" or not functions:
            return []
        if isinstance(tool_choice, Mapping) and tool_choice.get("type") == "function":
            name = str(tool_choice.get("name", ""))
            chosen = [by_name[name]] if name in by_name and name not in already else []
        else:
            words = {_stem(w) for w in _WORD.findall(text.lower())}
            chosen = [t for t in functions if str(t.get("name")) not in already and match_tools(t, words)]
            if not chosen and tool_choice == "required":
                chosen = [t for t in functions if str(t.get("name")) not in already][:1]
        calls: list[ToolCall] = []
        for t in chosen:
            places = _places(text) if _place_param(t) else []
            if len(places) > 1:
                # "weather in Paris, Berlin and Rome": one call per place, in one response.
                calls.extend(ToolCall(str(t.get("name")), _arguments(t, text, place=p)) for p in places)
            else:
                calls.append(ToolCall(str(t.get("name")), _arguments(t, text)))
        return calls


def _needs_approval(tool: Mapping[str, Any], name: str) -> bool:
    """The real default is ``"always"``; ``"never"`` or a ``never.tool_names`` list lifts it."""
    ra = tool.get("require_approval", "always")
    if ra == "never":
        return False
    if isinstance(ra, Mapping):
        never = ra.get("never")
        names = never.get("tool_names") if isinstance(never, Mapping) else None
        return not (isinstance(names, list) and name in names)
    return True


def _mcp_calls(
    tools: Sequence[Mapping[str, Any]], spec: str, text: str, after: Sequence[Turn]
) -> tuple[list[McpCall], str]:
    """The MCP calls for ``[mcp: label.tool, ...]`` and, once they ran, the words that report them."""
    servers = {str(t.get("server_label")): t for t in tools if isinstance(t, Mapping) and t.get("type") == "mcp"}
    done = {(t.arguments, t.name): t for t in after if t.kind == "mcp_call"}
    requests = {(t.arguments, t.name): t.call_id for t in after if t.kind == "mcp_approval_request"}
    answers = {t.call_id: t.output for t in after if t.kind == "mcp_approval_response"}
    calls: list[McpCall] = []
    reported: list[str] = []
    declined = False
    for entry in (e.strip() for e in spec.split(",")):
        label, _, name = entry.partition(".")
        if not label or not name or label not in servers:
            continue
        if (label, name) in done:
            reported.append(done[(label, name)].output or "failed")
            continue
        args = json.dumps({"query": text or "example"}, separators=(",", ":"))
        request_id = requests.get((label, name))
        if request_id is not None:
            answer = answers.get(request_id)
            if answer is None:
                continue  # still waiting for the client's approval
            if answer != "approve":
                declined = True
                continue
        elif _needs_approval(servers[label], name):
            calls.append(McpCall(label, name, args, approval=True))
            continue
        error = f"Tool '{name}' failed on server '{label}'." if "fail" in name.lower() else ""
        output = "" if error else json.dumps({"server": label, "tool": name, "result": "ok"}, separators=(",", ":"))
        calls.append(McpCall(label, name, args, approval_request_id=request_id or "", output=output, error=error))
        reported.append(output or "failed")
    if any(c.approval for c in calls):
        return calls, "I need your approval to use that tool."
    if declined and not calls and not reported:
        return calls, "Okay, I will not use that tool."
    return calls, _summary(reported) if reported else ""


def match_tools(tool: Mapping[str, Any], user_words: set[str]) -> bool:
    """Whether ``tool`` matches a user text whose stemmed lower-case words are ``user_words``."""
    name = str(tool.get("name") or "").lower()
    if name.startswith("transfer_to_"):
        target = _tokens(name[len("transfer_to_") :], min_len=1)
        keys = [w for w in target if w not in _STOP_WORDS] or target
    else:
        keys = [w for w in _tokens(name, min_len=3) if w not in _STOP_WORDS]
        desc = str(tool.get("description") or "").lower()
        keys += [w for w in _WORD.findall(desc) if len(w) >= 4 and w not in _STOP_WORDS]
    return any(_stem(k) in user_words for k in keys)


def _tokens(name: str, *, min_len: int) -> list[str]:
    return [w for w in re.split(r"[_\-\s]+", name.lower()) if len(w) >= min_len]


def _stem(word: str) -> str:
    # Singular/plural is the only morphology worth handling for tool names.
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


def _role_sentence(instructions: str) -> str:
    m = _ROLE.search(instructions or "")
    if not m:
        return ""
    article = (m.group(1) or "").strip().lower()
    role = " ".join(m.group(2).split()[:6])
    if article in ("a", "an") and len(role.split()) < 2:
        return ""  # "You are a helpful, witty ..." describes a manner, not a role
    return f"This is {article + ' ' if article else ''}{role}."


def _join(parts: Sequence[str], max_words: int) -> str:
    words = " ".join(p for p in parts if p).split()
    text = " ".join(words[:max_words])
    if len(words) > max_words and text[-1] not in ".?!":
        text += "."
    return text


def _exact_length(base: str, spec: str) -> str:
    try:
        n = max(1, min(1000, int(spec)))
    except ValueError:
        return base
    pool = base.split() + " ".join(_FILLER).split()
    words = [pool[i % len(pool)] for i in range(n)]
    return " ".join(words)


def _summary(outputs: Sequence[str]) -> str:
    pieces: list[str] = []
    for out in outputs:
        try:
            value: Any = json.loads(out)
        except (TypeError, ValueError):
            value = out
        pieces.append(_flatten(value))
    text = "Here is what I found: " + "; ".join(p for p in pieces if p)
    words = text.split()[:30]
    return " ".join(words).rstrip(".;,") + "."


def _conversation_summary(turns: Sequence[Turn]) -> str:
    """What the user and system turns said and what the tools returned, in order, capped."""
    pieces: list[str] = []
    for t in turns:
        if t.kind in ("user", "system"):
            text = _HOOK.sub(" ", t.text)
        elif t.kind == "function_call_output":
            try:
                text = _flatten(json.loads(t.output))
            except (TypeError, ValueError):
                text = t.output
        else:
            continue
        words = text.split()[:_SUMMARY_TURN_WORDS]
        if words:
            pieces.append(" ".join(words))
    return " ".join(("Summary: " + "; ".join(pieces or ["nothing was said"])).split()[:_SUMMARY_WORDS])


def _flatten(value: Any) -> str:
    if isinstance(value, Mapping):
        return ", ".join(f"{k} {_flatten(v)}" for k, v in list(value.items())[:6])
    if isinstance(value, list):
        return ", ".join(_flatten(v) for v in value[:6])
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


_CAPS = re.compile(r"(?<![.!?]\s)(?<!^)\b([A-Z][a-z]{2,})")


def _places(text: str) -> list[str]:
    """Capitalised words (not at a sentence start), in order, without repeats: the places named."""
    return list(dict.fromkeys(_CAPS.findall(text)))


def _place_param(tool: Mapping[str, Any]) -> bool:
    """Whether ``tool`` takes a place-like string (``city``, ``location``...)."""
    schema = tool.get("parameters")
    props = schema.get("properties") if isinstance(schema, Mapping) else None
    if not isinstance(props, Mapping):
        return False
    return any(any(h in str(k).lower() for h in _PLACE_HINTS) for k in props)


def _arguments(tool: Mapping[str, Any], text: str, *, place: str | None = None) -> str:
    """JSON arguments for ``tool`` built from its schema and the user text (``place`` for place-like strings)."""
    schema = tool.get("parameters")
    numbers = _NUMBER.findall(text)
    state: dict[str, Any] = {"num": 0, "place": place}
    value = _value_for(schema if isinstance(schema, Mapping) else {}, "", text, numbers, state)
    if not isinstance(value, dict):
        value = {}
    return json.dumps(value, separators=(",", ":"))


def _value_for(schema: Mapping[str, Any], name: str, text: str, numbers: list[str], state: dict[str, Any]) -> Any:
    def next_number() -> str | None:
        n = int(state["num"])
        if n < len(numbers):
            state["num"] = n + 1
            return numbers[n]
        return None

    if "enum" in schema and isinstance(schema["enum"], list) and schema["enum"]:
        return schema["enum"][0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if kind == "object" or (kind is None and "properties" in schema):
        props = schema.get("properties")
        props = props if isinstance(props, Mapping) else {}
        required = schema.get("required")
        keys = [k for k in required if k in props] if isinstance(required, list) else list(props)
        return {k: _value_for(props[k] if isinstance(props[k], Mapping) else {}, k, text, numbers, state) for k in keys}
    if kind == "integer":
        n = next_number()
        return int(float(n)) if n is not None else 1
    if kind == "number":
        n = next_number()
        return float(n) if n is not None else 1.0
    if kind == "boolean":
        return True
    if kind == "array":
        return []
    if kind == "null":
        return None
    lname = name.lower()
    if any(h in lname for h in _ID_HINTS):
        return next_number() or "12345"
    if any(h in lname for h in _PLACE_HINTS):
        if state.get("place"):
            return state["place"]
        caps = _CAPS.findall(text)
        return caps[0] if caps else "Paris"
    if any(h in lname for h in _FREE_TEXT_HINTS):
        return text or "example"
    content = [w for w in re.findall(r"[A-Za-z]+", text) if w.lower() not in _STOP_WORDS]
    return max(content, key=len) if content else "example"
