"""DeepSeek-V3.2 chat encoding and completion parser (docs/deepseek_v32_spec.md §10-11).

V3.2 ships no Jinja template: the prompt is built in code, and tool calls use
the DSML markup (``<｜DSML｜invoke name=...>``). Both directions are
reimplemented here from the spec and checked byte for byte against the official
golden files (``fixtures/deepseek_v32/encoding``).

A conversation renders as ``BOS`` + each message in turn; there is no role
token for the system prompt, tool results, or the assistant turn itself (the
user turn ends with ``<｜Assistant｜>``). In thinking mode only the turns after
the last user message carry reasoning; earlier turns render like chat turns.

Deliberate difference from the official ``encoding_dsv32.py``: with
``drop_thinking`` it also deletes every *developer* message before the last
user message (and then indexes past the end). We keep those messages;
reasoning of earlier turns is never rendered either way, so ``drop_thinking``
changes nothing here and is accepted for call compatibility.
"""

from __future__ import annotations

import json
import re
from typing import Any, Protocol, Sequence

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "\uff5cDSML\uff5c"
THINKING_MODES = ("chat", "thinking")

# Fixed prose, byte-exact with the official golden output (blank lines matter:
# a widely copied version lacks them, spec §12.7).
_TOOLS_TEMPLATE = """## Tools

You have access to a set of tools you can use to answer the user's question.
You can invoke functions by writing a "<{dsml}function_calls>" block like the following as part of your reply to the user:
<{dsml}function_calls>
<{dsml}invoke name="$FUNCTION_NAME">
<{dsml}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{dsml}parameter>
...
</{dsml}invoke>
<{dsml}invoke name="$FUNCTION_NAME2">
...
</{dsml}invoke>
</{dsml}function_calls>

String and scalar parameters should be specified as is without any escaping or quotes, while lists and objects should use JSON format. The "string" attribute should be set to "true" for string type parameters and "false" for other types (numbers, booleans, arrays, objects).

If the thinking_mode is enabled, then after function results you should strongly consider outputting a thinking block. Here is an example:

<{dsml}function_calls>
...
</{dsml}function_calls>

<function_results>
...
</function_results>

{think_start}...thinking about results{think_end}

Here are the functions available in JSONSchema format:
<functions>
{schemas}
</functions>
"""
_RESPONSE_FORMAT_HEADER = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
_CALLS_START = f"\n\n<{DSML}function_calls"
_CALLS_END = f"</{DSML}function_calls>"
_INVOKE_START, _INVOKE_END = f"<{DSML}invoke", f"</{DSML}invoke"
_PARAM_START, _PARAM_END = f"<{DSML}parameter", f"/{DSML}parameter"


class EncodingError(ValueError):
    """A conversation that the V3.2 chat format cannot express."""


class CompletionParseError(EncodingError):
    """Generated text that is not a well-formed V3.2 assistant message."""


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _text(msg: dict[str, Any], index: int, required: bool) -> str:
    """Message content as text; OpenAI text parts are concatenated."""
    content = msg.get("content")
    if content is None and not required:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise EncodingError(f"messages[{index}].content must be a string or text parts, got {type(content).__name__}")


def render_tools(tools: Sequence[dict[str, Any]]) -> str:
    """The tools block: usage instructions then one JSON schema per line."""
    functions = [t["function"] if "function" in t else t for t in tools]
    return _TOOLS_TEMPLATE.format(dsml=DSML, think_start=THINK_START, think_end=THINK_END,
                                  schemas="\n".join(_json(f) for f in functions))


def _extras(msg: dict[str, Any]) -> str:
    """Tools and response-format blocks attached to a system/developer message."""
    out = ""
    if msg.get("tools"):
        out += "\n\n" + render_tools(msg["tools"])
    if msg.get("response_format"):
        out += "\n\n" + _RESPONSE_FORMAT_HEADER + _json(msg["response_format"])
    return out


def _render_tool_calls(tool_calls: Sequence[dict[str, Any]], index: int) -> str:
    invokes = []
    for k, call in enumerate(tool_calls):
        fn = call.get("function", call)
        args = fn.get("arguments", {})
        try:
            args = json.loads(args) if isinstance(args, str) else args
        except json.JSONDecodeError as exc:
            raise EncodingError(f"messages[{index}].tool_calls[{k}] arguments are not JSON: {exc}") from None
        if not isinstance(args, dict):
            raise EncodingError(f"messages[{index}].tool_calls[{k}] arguments must be a JSON object")
        params = [
            f'<{DSML}parameter name="{key}" string="{"true" if isinstance(v, str) else "false"}">'
            f"{v if isinstance(v, str) else _json(v)}</{DSML}parameter>"
            for key, v in args.items()
        ]
        invokes.append(f'<{DSML}invoke name="{fn.get("name")}">\n' + "\n".join(params) + f"\n</{DSML}invoke>")
    return f"\n\n<{DSML}function_calls>\n" + "\n".join(invokes) + f"\n</{DSML}function_calls>"


def _render_message(i: int, msgs: list[dict[str, Any]], last_user: int, thinking: bool) -> str:
    msg = msgs[i]
    role = msg.get("role")
    think_suffix = THINK_START if thinking and i == last_user else THINK_END
    if role == "system":
        return _text(msg, i, required=False) + _extras(msg)
    if role == "user":
        return USER + _text(msg, i, required=True) + ASSISTANT + think_suffix
    if role == "developer":  # search-agent format; the official API rejects it
        content = _text(msg, i, required=False)
        if not content:
            raise EncodingError(f"messages[{i}] (developer) needs non-empty content")
        return USER + _extras(msg) + "\n\n# The user's message is: " + content + ASSISTANT + think_suffix
    if role == "assistant":
        tool_calls = msg.get("tool_calls") or []
        reasoning = ""
        if thinking and i > last_user:
            if not msg.get("reasoning_content") and not tool_calls:
                raise EncodingError(f"messages[{i}]: in thinking mode an assistant turn after the last "
                                    "user message needs reasoning_content or tool_calls")
            reasoning = (msg.get("reasoning_content") or "") + THINK_END
        calls = _render_tool_calls(tool_calls, i) if tool_calls else ""
        return reasoning + _text(msg, i, required=False) + calls + EOS
    if role == "tool":
        # The k-th tool message after an assistant answers its k-th call; ids are ignored.
        owner = i - 1
        while owner >= 0 and msgs[owner].get("role") == "tool":
            owner -= 1
        owner_ok = owner >= 0 and msgs[owner].get("role") == "assistant"
        expected = len(msgs[owner].get("tool_calls") or []) if owner_ok else 0
        order = i - owner
        if order > expected:
            raise EncodingError(f"messages[{i}] (tool) has no matching tool call in the preceding assistant turn")
        out = "\n\n<function_results>" if order == 1 else ""
        out += f"\n<result>{_text(msg, i, required=True)}</result>"
        if order == expected:
            out += "\n</function_results>\n\n" + (THINK_START if thinking and i >= last_user else THINK_END)
        return out
    raise EncodingError(f"messages[{i}] has unknown role {role!r}")


def _attach(messages: list[dict[str, Any]], key: str, value: Any) -> list[dict[str, Any]]:
    """Put request-level ``tools``/``response_format`` on the leading system message
    (the golden files attach them there), creating an empty one if there is none."""
    if messages and messages[0].get("role") == "system":
        if messages[0].get(key):
            raise EncodingError(f"{key} given both as an argument and on messages[0]")
        return [{**messages[0], key: value}, *messages[1:]]
    return [{"role": "system", "content": "", key: value}, *messages]


def encode_messages(
    messages: Sequence[dict[str, Any]],
    thinking_mode: str,
    tools: Sequence[dict[str, Any]] | None = None,
    response_format: dict[str, Any] | None = None,
    context: Sequence[dict[str, Any]] | None = None,
    drop_thinking: bool = True,
    add_default_bos_token: bool = True,
) -> str:
    """Render ``messages`` (after an already-rendered ``context``) as prompt text.

    ``tools`` (OpenAI format) and ``response_format`` are optional shortcuts for
    putting them on the first system message. With a ``context``, only
    ``messages`` are rendered (no BOS), positioned as the conversation's tail.
    ``drop_thinking`` is accepted for compatibility; see the module docstring.
    """
    del drop_thinking
    if thinking_mode not in THINKING_MODES:
        raise EncodingError(f"thinking_mode must be one of {THINKING_MODES}, got {thinking_mode!r}")
    context = list(context or ())
    full = [*context, *messages]
    if not all(isinstance(m, dict) for m in full):
        raise EncodingError("every message must be a dict with a 'role'")
    if context and (tools or response_format):
        raise EncodingError("with a context, tools/response_format belong on its (already rendered) system message")
    if tools:
        full = _attach(full, "tools", list(tools))
    if response_format:
        full = _attach(full, "response_format", response_format)
    last_user = max((i for i, m in enumerate(full) if m.get("role") in ("user", "developer")), default=-1)
    thinking = thinking_mode == "thinking"
    prompt = BOS if add_default_bos_token and not context else ""
    return prompt + "".join(_render_message(i, full, last_user, thinking)
                            for i in range(len(context), len(full)))


class _Encoder(Protocol):
    def encode(self, text: str) -> list[int]: ...


def render_prompt_ids(tokenizer: _Encoder, messages: Sequence[dict[str, Any]], thinking_mode: str,
                      tools: Sequence[dict[str, Any]] | None = None, **kwargs: Any) -> list[int]:
    """Token ids of the rendered prompt. BOS is in the text, so the tokenizer
    must not add one (our ``Tokenizer.encode`` never does)."""
    return tokenizer.encode(encode_messages(messages, thinking_mode, tools=tools, **kwargs))


# --- parsing (spec §11) ------------------------------------------------------

def _until(text: str, pos: int, stops: Sequence[str]) -> tuple[str, str | None, int]:
    """Text from ``pos`` to the earliest of ``stops``, that stop, and the offset after it."""
    found = [(j, s) for s in stops if (j := text.find(s, pos)) >= 0]
    if not found:
        return text[pos:], None, len(text)
    j, stop = min(found)
    return text[pos:j], stop, j + len(stop)


def _fail(what: str, text: str, pos: int) -> CompletionParseError:
    return CompletionParseError(f"{what} (at offset {pos}: {text[pos:pos + 40]!r})")


def _parse_invoke(text: str, pos: int) -> tuple[dict[str, Any], int]:
    """One ``<｜DSML｜invoke ...>...</｜DSML｜invoke`` (``pos`` is just after its opening tag)."""
    header, stop, after = _until(text, pos, [_PARAM_START, _INVOKE_END])
    # Without parameters the encoder leaves an empty line before </｜DSML｜invoke>.
    m = re.fullmatch(r'\s*name="(.*?)">\n' + ("" if stop == _PARAM_START else r"\n?"), header, re.DOTALL)
    if stop is None or m is None:
        raise _fail("malformed invoke header", text, pos)
    name, args, pos = m.group(1), {}, after
    while stop == _PARAM_START:
        body, stop, after = _until(text, pos, [_PARAM_END])
        p = re.fullmatch(r' name="(.*?)" string="(true|false)">(.*)<', body, re.DOTALL)
        if stop is None or p is None:
            raise _fail(f"malformed parameter in invoke of {name!r}", text, pos)
        key, is_str, value = p.groups()
        if key in args:
            raise _fail(f"duplicate parameter {key!r} in invoke of {name!r}", text, pos)
        args[key] = _json(value) if is_str == "true" else value
        between, stop, pos = _until(text, after, [_PARAM_START, _INVOKE_END])
        if between != ">\n" or stop is None:
            raise _fail("expected '>\\n' and the next parameter or </｜DSML｜invoke", text, after)
    arguments = "{" + ", ".join(f"{_json(k)}: {v}" for k, v in args.items()) + "}"
    try:
        json.loads(arguments)
    except json.JSONDecodeError:
        raise _fail(f"arguments of {name!r} are not valid JSON: {arguments[:80]!r}", text, pos) from None
    return {"type": "function", "function": {"name": name, "arguments": arguments}}, pos


def _parse_tool_calls(text: str, pos: int) -> tuple[list[dict[str, Any]], int]:
    """The block after ``\\n\\n<｜DSML｜function_calls``, up to and including its end tag."""
    calls = []
    while True:
        between, stop, after = _until(text, pos, [_INVOKE_START, _CALLS_END])
        if between != ">\n" or stop is None:
            raise _fail("expected '>\\n' then <｜DSML｜invoke or </｜DSML｜function_calls>", text, pos)
        if stop == _CALLS_END:
            if not calls:
                raise _fail("function_calls block without any invoke", text, pos)
            return calls, after
        call, pos = _parse_invoke(text, after)
        calls.append(call)


def parse_message_from_completion_text(text: str, thinking_mode: str) -> dict[str, Any]:
    """Parse generated text (ending with EOS; optional after tool calls) into an
    OpenAI-style assistant message with ``content``, ``reasoning_content`` and
    ``tool_calls``. Strict like the official parser: anything malformed raises
    :class:`CompletionParseError`; recovery is the caller's business.
    Decode with ``skip_special_tokens=False`` or the DSML markers are lost.
    """
    if thinking_mode not in THINKING_MODES:
        raise CompletionParseError(f"thinking_mode must be one of {THINKING_MODES}, got {thinking_mode!r}")
    reasoning, pos = "", 0
    if thinking_mode == "thinking":
        reasoning, stop, pos = _until(text, 0, [THINK_END, _CALLS_START])
        if stop != THINK_END:
            raise _fail("thinking mode: reasoning must end with </think> before anything else", text, 0)
    content, stop, after = _until(text, pos, [EOS, _CALLS_START])
    tool_calls: list[dict[str, Any]] = []
    if stop == _CALLS_START:
        tool_calls, pos = _parse_tool_calls(text, after)
        rest, _, after = _until(text, pos, [EOS])
        if rest:
            raise _fail("unexpected text after </｜DSML｜function_calls>", text, pos)
    elif stop is None:
        raise _fail("content does not end with <｜end▁of▁sentence｜>", text, pos)
    if after != len(text):
        raise _fail("unexpected text after <｜end▁of▁sentence｜>", text, after)
    for field, value in (("reasoning_content", reasoning), ("content", content)):
        for marker in (BOS, EOS, THINK_START, THINK_END, DSML):
            if marker in value:
                raise CompletionParseError(f"{field} contains the marker {marker!r}")
    return {"role": "assistant", "content": content, "reasoning_content": reasoning, "tool_calls": tool_calls}
