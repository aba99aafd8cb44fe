"""DeepSeek-V3.2 chat encoding against the official golden files, and the parser."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from dsv32_text.encoding import (CompletionParseError, EncodingError, encode_messages,
                                 parse_message_from_completion_text, render_prompt_ids, render_tools)
from dsv32_text.tokenizer import load_tokenizer

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
D = "｜DSML｜"


def golden(folder: Path, name: str) -> tuple[dict, str]:
    data = json.loads((folder / f"test_input{name}.json").read_text(encoding="utf-8"))
    # The official test strips the files; only test_output.txt has a trailing newline.
    return data, (folder / f"test_output{name}.txt").read_text(encoding="utf-8").rstrip("\n")


@pytest.mark.parametrize("name", ["", "_search_wo_date", "_search_w_date"], ids=["tools", "search_wo_date", "search_w_date"])
def test_golden_files(name, golden_encoding_dir):
    data, expected = golden(golden_encoding_dir, name)
    prompt = encode_messages(data["messages"], "thinking", tools=data.get("tools"))
    assert prompt == expected


def test_golden_tools_on_system_message(golden_encoding_dir):
    # The official test puts the tools on messages[0] instead of passing them.
    data, expected = golden(golden_encoding_dir, "")
    messages = copy.deepcopy(data["messages"])
    messages[0]["tools"] = data["tools"]
    assert encode_messages(messages, "thinking") == expected
    assert "tools" not in data["messages"][0]  # the kwarg path must not mutate the input


def test_tools_block_has_the_blank_lines(golden_encoding_dir):
    data, expected = golden(golden_encoding_dir, "")
    block = render_tools(data["tools"])
    assert "\n\n" + block + "<｜User｜>" in expected
    assert "</｜DSML｜function_calls>\n\nString and scalar" in block
    assert "\n\n<think>...thinking about results</think>\n\nHere are the functions" in block


def test_spec_example_thinking_and_tokens():
    messages = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "Hello! I am DeepSeek.", "reasoning_content": "thinking..."},
        {"role": "user", "content": "1+1=?"},
    ]
    expected = (f"{BOS}<｜User｜>hello<｜Assistant｜></think>Hello! I am DeepSeek.{EOS}"
                "<｜User｜>1+1=?<｜Assistant｜><think>")
    assert encode_messages(messages, "thinking") == expected
    assert encode_messages(messages, "thinking", drop_thinking=False) == expected
    ids = render_prompt_ids(load_tokenizer(None), messages, "thinking")
    assert ids[:5] == [0, 128803, 33310, 128804, 128799]
    assert ids[-1] == 128798 and ids.count(1) == 1 and ids.count(0) == 1


def test_chat_mode_and_no_bos():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]
    assert encode_messages(messages, "chat") == f"{BOS}S<｜User｜>hi<｜Assistant｜></think>"
    assert encode_messages(messages, "chat", add_default_bos_token=False) == "S<｜User｜>hi<｜Assistant｜></think>"


def test_tools_without_system_message_and_response_format():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    schema = {"type": "json_schema", "json_schema": {"name": "x"}}
    out = encode_messages([{"role": "user", "content": "q"}], "chat", tools=tools, response_format=schema)
    assert out.startswith(BOS + "\n\n## Tools\n\n")
    assert '<functions>\n{"name": "f", "parameters": {"type": "object"}}\n</functions>\n' in out
    assert out.endswith('\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n'
                        '{"type": "json_schema", "json_schema": {"name": "x"}}<｜User｜>q<｜Assistant｜></think>')


def test_developer_message():
    out = encode_messages([{"role": "developer", "content": "find it"}], "thinking")
    assert out == f"{BOS}<｜User｜>\n\n# The user's message is: find it<｜Assistant｜><think>"


def test_context_renders_only_the_tail(golden_encoding_dir):
    data, expected = golden(golden_encoding_dir, "")
    messages = copy.deepcopy(data["messages"])
    messages[0]["tools"] = data["tools"]
    tail = encode_messages(messages[5:], "thinking", context=messages[:5])
    assert tail.startswith("\n\n<function_results>\n<result>")  # messages[5] is a tool result
    assert expected.endswith(tail) and len(tail) < len(expected) - 1000


# --- the official round trips -------------------------------------------------

def test_official_round_trip_tool_call(golden_encoding_dir):
    data, _ = golden(golden_encoding_dir, "")
    messages = copy.deepcopy(data["messages"])
    messages[0]["tools"] = data["tools"]
    prompt = encode_messages([messages[4]], "thinking", context=messages[:4])
    parsed = parse_message_from_completion_text(prompt, "thinking")
    parsed.pop("content")
    want = copy.deepcopy(messages[4])
    for call in want["tool_calls"]:
        call.pop("id")
    assert parsed == want


def test_official_round_trip_thinking(golden_encoding_dir):
    data, _ = golden(golden_encoding_dir, "")
    messages = data["messages"]
    prompt = encode_messages([messages[-6]], "thinking", context=messages[:-6])
    parsed = parse_message_from_completion_text(prompt, "thinking")
    assert parsed.pop("tool_calls") == []
    assert parsed == messages[-6]


ARGS = {
    "strings": {"city": "Hangzhou", "note": 'He said "hi"\nand <left>'},
    "scalars": {"n": 3, "x": -2.5, "ok": True, "none": None},
    "nested": {"items": [1, "two", {"三": 3}], "opts": {"deep": [True, None]}},
    "unicode": {"q": "明天的天气🌤️", "emoji": ["📅"]},
    "no_args": {},
}


@pytest.mark.parametrize("mode", ["chat", "thinking"])
@pytest.mark.parametrize("args", ARGS.values(), ids=ARGS.keys())
def test_round_trip_tool_calls(mode, args):
    calls = [{"type": "function", "function": {"name": "tool_a", "arguments": json.dumps(args, ensure_ascii=False)}},
             {"type": "function", "function": {"name": "tool_b", "arguments": '{"k": 1}'}}]
    msg = {"role": "assistant", "content": "calling", "reasoning_content": "because" if mode == "thinking" else "",
           "tool_calls": calls}
    context = [{"role": "user", "content": "go"}]
    prompt = encode_messages([msg], mode, context=context)
    parsed = parse_message_from_completion_text(prompt, mode)
    assert parsed["content"] == "calling" and parsed["reasoning_content"] == msg["reasoning_content"]
    assert [c["function"]["name"] for c in parsed["tool_calls"]] == ["tool_a", "tool_b"]
    assert json.loads(parsed["tool_calls"][0]["function"]["arguments"]) == args
    assert list(json.loads(parsed["tool_calls"][0]["function"]["arguments"])) == list(args)  # key order


def test_parse_without_eos_after_tool_calls_and_plain_chat():
    text = (f'\n\n<{D}function_calls>\n<{D}invoke name="f">\n<{D}parameter name="a" string="false">1</{D}parameter>'
            f'\n</{D}invoke>\n</{D}function_calls>')
    call = parse_message_from_completion_text(text, "chat")["tool_calls"][0]
    assert call == {"type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    assert parse_message_from_completion_text(f"Hi there{EOS}", "chat") == {
        "role": "assistant", "content": "Hi there", "reasoning_content": "", "tool_calls": []}


CALL = (f'\n\n<{D}function_calls>\n<{D}invoke name="f">\n<{D}parameter name="a" string="true">x</{D}parameter>'
        f'\n</{D}invoke>\n</{D}function_calls>')
SECOND_A = f'<{D}parameter name="a" string="true">y</{D}parameter>\n'
BAD = {
    "no_end_think": ("thinking", f"reasoning only{EOS}"),
    "call_before_end_think": ("thinking", f"r{CALL}</think>{EOS}"),
    "no_eos": ("chat", "unfinished answer"),
    "text_after_eos": ("chat", f"answer{EOS}more"),
    "text_after_calls": ("chat", CALL + f"tail{EOS}"),
    "duplicate_param": ("chat", CALL.replace(f"</{D}parameter>\n", f"</{D}parameter>\n" + SECOND_A)),
    "bad_string_attr": ("chat", CALL.replace('string="true"', 'string="yes"')),
    "unterminated_block": ("chat", CALL.removesuffix(f"</{D}function_calls>")),
    "truncated_invoke": ("chat", CALL[:CALL.index(">x<") + 2]),
    "empty_block": ("chat", f"\n\n<{D}function_calls>\n</{D}function_calls>{EOS}"),
    "bad_json_value": ("chat", CALL.replace('string="true">x<', 'string="false">{x<')),
    "missing_newline": ("chat", CALL.replace('name="f">\n', 'name="f">')),
    "think_in_content": ("chat", f"a<think>b{EOS}"),
    "dsml_in_reasoning": ("thinking", f"a{D}b</think>c{EOS}"),
    "bos_in_content": ("thinking", f"r</think>{BOS}c{EOS}"),
}


@pytest.mark.parametrize("mode, text", BAD.values(), ids=BAD.keys())
def test_parser_rejects(mode, text):
    with pytest.raises(CompletionParseError) as err:
        parse_message_from_completion_text(text, mode)
    assert isinstance(err.value, ValueError) and str(err.value)


BAD_MESSAGES = {
    "unknown_role": ("chat", [{"role": "robot", "content": "x"}]),
    "tool_without_call": ("chat", [{"role": "user", "content": "q"}, {"role": "tool", "content": "r"}]),
    "too_many_results": ("chat", [{"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "content": "1"}, {"role": "tool", "content": "2"}]),
    "thinking_turn_without_reasoning": ("thinking", [{"role": "user", "content": "q"},
                                                     {"role": "assistant", "content": "a"}]),
    "bad_arguments": ("chat", [{"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "[1, 2]"}}]}]),
    "user_content_none": ("chat", [{"role": "user", "content": None}]),
    "empty_developer": ("chat", [{"role": "developer", "content": ""}]),
    "bad_mode": ("fast", [{"role": "user", "content": "q"}]),
}


@pytest.mark.parametrize("mode, messages", BAD_MESSAGES.values(), ids=BAD_MESSAGES.keys())
def test_encoder_rejects(mode, messages):
    with pytest.raises(EncodingError):
        encode_messages(messages, mode)


def test_tool_results_open_block_and_think_suffix():
    call = {"type": "function", "function": {"name": "f", "arguments": "{}"}}
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": "", "reasoning_content": "r", "tool_calls": [call, call]},
            {"role": "tool", "content": "one"}]
    out = encode_messages(msgs, "thinking")
    assert out.endswith(f"{EOS}\n\n<function_results>\n<result>one</result>")  # still open: 1 of 2
    out = encode_messages([*msgs, {"role": "tool", "content": "two"}], "thinking")
    assert out.endswith("\n<result>two</result>\n</function_results>\n\n<think>")
    assert encode_messages([*msgs, {"role": "tool", "content": "two"}], "chat").endswith("</function_results>\n\n</think>")
