"""Tool calling: what a chat request's `tools` and `tool_choice` make of its output.

- `none` (or no tools): plain text; the tools are not shown to the model.
- a named function: the output is constrained to that function's parameter schema and
  becomes one call of it; `required`: constrained to a JSON list of calls of the listed
  functions (one call unless `parallel_tool_calls`). Both work with any model.
- `auto`: the model writes calls in its own format and a parser (`--tool-call-parser`)
  finds them: `hermes` (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one
  object or a list per tag) or `llama3_json` (the reply is `{"name": ..., "parameters": {...}}`,
  optionally after `<|python_tag|>`, several separated by `;`).

Every response with calls has `finish_reason: "tool_calls"`. Streams send content as it
comes; a call goes out as OpenAI's deltas (its id, name and arguments).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from engine.errors import RequestError
from engine.structured_output import StructuredOutput

PARSERS = ("hermes", "llama3_json")
_HERMES_OPEN, _HERMES_CLOSE = "<tool_call>", "</tool_call>"
_PYTHON_TAG = "<|python_tag|>"


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def as_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ToolPlan:
    """How one request's output is read: `forced` names the one function the output is the
    arguments of; `required` reads a JSON list of calls; `parser` finds calls in free text."""

    forced: str | None = None
    required: bool = False
    parser: str | None = None

    @property
    def active(self) -> bool:
        return bool(self.forced or self.required or self.parser)


def plan_tools(tools: list[dict] | None, tool_choice, parallel: bool, parser: str | None
               ) -> tuple[ToolPlan, StructuredOutput | None, list[dict] | None]:
    """(how to read the output, the constraint to decode under, the tools the template shows)."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise RequestError("tool_choice needs tools", param="tool_choice")
        return ToolPlan(), None, None
    functions = {t["function"]["name"]: t["function"] for t in tools}
    choice = "auto" if tool_choice is None else tool_choice
    if choice == "none":
        return ToolPlan(), None, None
    if choice == "auto":
        if parser is None:
            raise RequestError("tool_choice auto needs a tool-call parser (start the server with --tool-call-parser)",
                               param="tool_choice")
        return ToolPlan(parser=parser), None, tools
    if choice == "required":
        calls = [{"type": "object", "properties": {"name": {"const": name}, "arguments": _schema(f)},
                  "required": ["name", "arguments"], "additionalProperties": False} for name, f in functions.items()]
        schema = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
        if not parallel:
            schema["maxItems"] = 1
        return ToolPlan(required=True), StructuredOutput.json_schema(schema), tools
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if name not in functions:
            raise RequestError(f"tool_choice names {name!r}, which is not in tools", param="tool_choice")
        return ToolPlan(forced=name), StructuredOutput.json_schema(_schema(functions[name])), tools
    raise RequestError("tool_choice must be none, auto, required or {\"type\": \"function\", \"function\": "
                       "{\"name\": ...}}", param="tool_choice")


def _schema(function: dict) -> dict:
    return function.get("parameters") or {"type": "object", "properties": {}}


def read_calls(plan: ToolPlan, text: str) -> tuple[str | None, list[ToolCall]]:
    """The reply's content (None when it is all calls) and its calls."""
    if plan.forced:
        return None, [ToolCall(plan.forced, text.strip())]
    if plan.required:
        try:
            items = json.loads(text)
        except ValueError:
            return text, []  # cut short (max_tokens): no complete call
        return None, [ToolCall(c["name"], json.dumps(c["arguments"])) for c in items]
    if plan.parser == "hermes":
        return _hermes(text)
    if plan.parser == "llama3_json":
        return _llama3(text)
    return text, []


def _call(obj) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return ToolCall(obj["name"], args if isinstance(args, str) else json.dumps(args))


def _calls(blob: str) -> list[ToolCall] | None:
    try:
        value = json.loads(blob)
    except ValueError:
        return None
    calls = [_call(v) for v in (value if isinstance(value, list) else [value])]
    return None if not calls or None in calls else calls


def _hermes(text: str) -> tuple[str | None, list[ToolCall]]:
    if _HERMES_OPEN not in text:
        return text, []
    content, calls, rest = text[:text.index(_HERMES_OPEN)], [], text
    while _HERMES_OPEN in rest:
        _, _, rest = rest.partition(_HERMES_OPEN)
        blob, _, rest = rest.partition(_HERMES_CLOSE)
        found = _calls(blob.strip())
        if found is None:
            return text, []  # not a well-formed call: the text as it is
        calls += found
    content = content + rest.strip()
    return content if content.strip() else None, calls


def _llama3(text: str) -> tuple[str | None, list[ToolCall]]:
    body = text.strip().removeprefix(_PYTHON_TAG).strip()
    if not body.startswith("{"):
        return text, []
    calls = []
    for part in body.split(";"):
        found = _calls(part.strip())
        if found is None:
            return text, []
        calls += found
    return None, calls


class ToolStream:
    """One streamed choice under a ToolPlan: `feed` takes text deltas and returns the content to
    send now (text that may still turn into a call is held); `finish` returns the held
    content and the calls."""

    def __init__(self, plan: ToolPlan):
        self.plan, self.text, self.sent = plan, "", 0

    def feed(self, delta: str) -> str:
        self.text += delta
        if self.plan.forced or self.plan.required:
            return ""
        hold = self._hold_from()
        out = self.text[self.sent:hold]
        self.sent = max(self.sent, hold)
        return out

    def _hold_from(self) -> int:
        """Where text that may be (or become) a call starts."""
        if self.plan.parser == "hermes":
            at = self.text.find(_HERMES_OPEN)
            if at >= 0:
                return at
            for k in range(len(_HERMES_OPEN) - 1, 0, -1):  # a tag still arriving
                if self.text.endswith(_HERMES_OPEN[:k]):
                    return len(self.text) - k
            return len(self.text)
        stripped = self.text.lstrip()  # llama3_json: a reply that starts like a call is held whole
        if self.sent == 0 and (not stripped or stripped.startswith("{")
                               or _PYTHON_TAG.startswith(stripped[:len(_PYTHON_TAG)])):
            return 0
        return len(self.text)

    def finish(self) -> tuple[str, list[ToolCall]]:
        content, calls = read_calls(self.plan, self.text)
        if not calls:
            return self.text[self.sent:], []
        return (content or "")[self.sent:], calls


def template_messages(messages: list[dict]) -> list[dict]:
    """Tool-call history as chat templates expect it: each assistant call's arguments as an
    object, not JSON text (templates render them with `tojson`)."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if calls:
            m = dict(m, tool_calls=[{**c, "function": {**c["function"], "arguments": _as_object(c["function"])}}
                                    for c in calls])
        out.append(m)
    return out


def _as_object(function: dict):
    args = function.get("arguments")
    if isinstance(args, str):
        try:
            return json.loads(args)
        except ValueError:
            raise RequestError(f"tool call {function.get('name')!r}: arguments are not JSON", param="messages") from None
    return args
