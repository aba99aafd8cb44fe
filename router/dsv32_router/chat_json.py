"""The JSON fields of chat input (``tools_json``, ``tool_calls_json``): parsed with caps, shapes checked.

Each failure is a :class:`~dsv32_router.validation.RequestError` with
``INVALID_ARGUMENT`` naming the field, never a Python exception escaping as
``UNKNOWN``: the text is bounded in size and its nesting depth is measured
before ``json.loads`` (a 100k-deep array would otherwise overflow the
recursion limit), then the OpenAI shapes are checked (a list of objects, each
with a ``function`` object whose ``name`` is a string, arguments a JSON object).
"""

from __future__ import annotations

import json
from typing import Any, Callable

MAX_JSON_BYTES = 1 << 20
MAX_JSON_DEPTH = 64


def json_depth(text: str) -> int:
    """Deepest nesting of ``[``/``{`` outside strings (no recursion)."""
    depth = best = 0
    in_str = esc = False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            best = max(best, depth)
        elif ch in "]}":
            depth -= 1
    return best


def load_capped(text: str, field: str, invalid: Callable[[str, str], Exception]) -> Any:
    if len(text.encode()) > MAX_JSON_BYTES:
        raise invalid(field, f"at most {MAX_JSON_BYTES} bytes of JSON")
    if json_depth(text) > MAX_JSON_DEPTH:
        raise invalid(field, f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise invalid(field, f"not JSON ({e})") from None


def _function(item: Any, where: str, invalid) -> dict:
    if not isinstance(item, dict):
        raise invalid(where, "must be an object")
    fn = item.get("function", item) if "function" in item or "type" in item else item
    if not isinstance(fn, dict):
        raise invalid(f"{where}.function", "must be an object")
    if not isinstance(fn.get("name"), str) or not fn["name"]:
        raise invalid(f"{where}.function.name", "must be a non-empty string")
    return fn


def check_tools(text: str, field: str, invalid) -> list:
    tools = load_capped(text, field, invalid)
    if not isinstance(tools, list):
        raise invalid(field, "must be a JSON list of tools")
    for k, tool in enumerate(tools):
        fn = _function(tool, f"{field}[{k}]", invalid)
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise invalid(f"{field}[{k}].function.parameters", "must be a JSON schema object")
    return tools


def check_tool_calls(text: str, field: str, invalid) -> list:
    calls = load_capped(text, field, invalid)
    if not isinstance(calls, list):
        raise invalid(field, "must be a JSON list of tool calls")
    for k, call in enumerate(calls):
        fn = _function(call, f"{field}[{k}]", invalid)
        args = fn.get("arguments", {})
        if isinstance(args, str):
            args = load_capped(args, f"{field}[{k}].function.arguments", invalid)
        if not isinstance(args, dict):
            raise invalid(f"{field}[{k}].function.arguments", "must be a JSON object (or its text)")
    return calls


def check_json_schema(text: str, field: str, invalid) -> None:
    """A structured-output schema: capped JSON, an object, and one llguidance compiles."""
    schema = load_capped(text, field, invalid)
    if not isinstance(schema, dict):
        raise invalid(field, "must be a JSON schema object")
    import llguidance

    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(text, overrides={"whitespace_flexible": False})
        error = llguidance.LLMatcher.validate_grammar(grammar)
    except (ValueError, RuntimeError) as e:
        error = str(e)
    if error and not error.startswith("WARNING"):
        raise invalid(field, f"not a supported JSON schema: {error}")


def forced_tool_schema(tools_json: str, name: str, invalid) -> str:
    """The parameters schema (text) of the tool ``name`` that a named tool choice forces."""
    tools = check_tools(tools_json, "chat.tools_json", invalid) if tools_json else []
    for tool in tools:
        fn = tool.get("function", tool) if isinstance(tool.get("function"), dict) else tool
        if fn.get("name") == name:
            text = json.dumps(fn.get("parameters") or {"type": "object"})
            check_json_schema(text, "chat.forced_tool", invalid)
            return text
    raise invalid("chat.forced_tool", f"{name!r} is not one of the tools")


def required_tool_schema(tools_json: str, invalid) -> str:
    """Tool choice "required" (as vLLM does it): a non-empty JSON list of ``{"name", "parameters"}``,
    each one of the tools with its own parameters schema."""
    tools = check_tools(tools_json, "chat.tools_json", invalid) if tools_json else []
    if not tools:
        raise invalid("chat.require_tool", "needs tools")
    options = []
    for tool in tools:
        fn = tool.get("function", tool) if isinstance(tool.get("function"), dict) else tool
        options.append({"type": "object", "properties": {"name": {"const": fn["name"]},
                                                         "parameters": fn.get("parameters") or {"type": "object"}},
                        "required": ["name", "parameters"], "additionalProperties": False})
    text = json.dumps({"type": "array", "minItems": 1, "items": {"anyOf": options}})
    check_json_schema(text, "chat.require_tool", invalid)
    return text
