"""The streaming reasoning / DSML tool-call parser (dsv32_text.output_parser, dsv32_text.tool_parser).

A generated corpus of answer shapes (1-3 calls, string and JSON parameters,
unicode, empty arguments, nested JSON, thinking on and off, malformed and
truncated markup) is parsed whole, one character at a time, in random chunks
and split in two at every boundary: every chunking gives the whole-text result.
Well-formed shapes agree with the strict parser of dsv32_text.encoding; malformed
ones raise nothing and lose nothing (the raw markup comes back as content).
The official golden conversations round-trip: render -> parse of each
assistant turn gives back its reasoning, content and tool calls.
"""

from __future__ import annotations

import copy
import json
import random

import pytest

from dsv32_text.encoding import EOS, THINK_END, _render_tool_calls, encode_messages, parse_message_from_completion_text
from dsv32_text.output_parser import ReasoningSplitter
from dsv32_text.tool_parser import CALLS_END, CALLS_START, INVOKE_END, ToolCallParser, collect

D = "｜DSML｜"
VALUES = ["Hangzhou", "", 'He said "hi"\nand <left> </ not a tag', "明天的天气🌤️", "back\\slash\ttab", 3, -2.5,
          True, None, [1, "two", {"三": 3}], {"deep": {"er": [True, None, []]}}, {}, [], "a</b>c", "0"]


def run(chunks, thinking: bool):
    """(reasoning, content, calls) of text given in ``chunks``: the router's pipeline."""
    split, tools, reasoning, events = ReasoningSplitter(thinking), ToolCallParser(), [], []
    for piece in chunks:
        r, c = split.feed(piece)
        reasoning.append(r)
        events += tools.feed(c)
    r, c = split.finish()
    reasoning.append(r)
    events += tools.feed(c) + tools.finish()
    content, calls = collect(events)
    return "".join(reasoning), content, calls


def _calls(rng: random.Random, n: int) -> list[dict]:
    out = []
    for k in range(n):
        keys = rng.sample(["city", "q", "n", "opts", "数", "empty"], rng.randint(0, 3))
        args = {key: rng.choice(VALUES) for key in keys}
        out.append({"type": "function", "function": {"name": rng.choice(["get_weather", "search", "f_" + str(k)]),
                                                     "arguments": json.dumps(args, ensure_ascii=False)}})
    return out


def _malform(rng: random.Random, text: str) -> tuple[str, str]:
    kind = rng.choice(["truncate", "kind", "badjson", "after", "dup", "nosep"])
    if kind == "truncate":
        start = text.find(CALLS_START)
        return text[:rng.randint(start + 1, len(text) - 1)], kind
    if kind == "kind" and 'string="' in text:
        return text.replace('string="true"', 'string="maybe"', 1).replace('string="false"', 'string="maybe"', 1), kind
    if kind == "badjson":
        tail = f'<{D}parameter name="zz" string="false">{{not json</{D}parameter>\n</{D}invoke>'
        return text.replace(f"</{D}invoke>", tail, 1) if 'name="zz"' not in text else text + "x", kind
    if kind == "dup":
        p = f'<{D}parameter name="d" string="true">1</{D}parameter>\n'
        return text.replace('">\n', f'">\n{p}{p}', 1), kind
    if kind == "nosep":
        return text.replace(f"</{D}invoke>\n", f"</{D}invoke>", 1), kind
    return text + "\n\ntrailing words", "after"


def corpus(n: int = 480):
    rng = random.Random(1234)
    shapes = []
    for i in range(n):
        thinking = i % 2 == 1
        calls = _calls(rng, rng.randint(1, 3))
        content = rng.choice(["", "Let me check.", "好的", "a\n\nb <tag>"])
        reasoning = rng.choice(["", "think 🤔 about </thin", "step 1\nstep 2"]) if thinking else ""
        text = (reasoning + THINK_END if thinking else "") + content + _render_tool_calls(calls, 0)
        kind = "ok"
        if i % 3 == 2:
            text, kind = _malform(rng, text)
        shapes.append((i, thinking, text, kind, reasoning, content, calls))
    return shapes


CORPUS = corpus()


def test_corpus_is_large_and_varied():
    assert len(CORPUS) >= 400
    kinds = {s[3] for s in CORPUS}
    assert {"ok", "truncate", "kind", "badjson", "after", "dup", "nosep"} <= kinds


@pytest.mark.parametrize("shape", CORPUS, ids=[f"{s[0]}-{s[3]}" for s in CORPUS])
def test_every_chunking_gives_the_whole_result(shape):
    i, thinking, text, kind, reasoning, content, calls = shape
    whole = run([text], thinking)
    rng = random.Random(i)
    assert run(list(text), thinking) == whole, "one character at a time"
    cuts = sorted(rng.sample(range(1, len(text)), min(12, len(text) - 1)))
    assert run([text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])], thinking) == whole, "random chunks"
    for cut in range(0, len(text), 1 if i < 40 else 7):  # split points at every boundary (all, for 40 shapes)
        assert run([text[:cut], text[cut:]], thinking) == whole, f"split at {cut}"
    got_reasoning, got_content, got_calls = whole
    if kind == "ok":
        strict = parse_message_from_completion_text(text + EOS, "thinking" if thinking else "chat")
        assert (got_reasoning, got_content) == (reasoning, content) == (strict["reasoning_content"], strict["content"])
        assert got_calls == [c["function"] for c in strict["tool_calls"]]
        assert [json.loads(c["arguments"]) for c in got_calls] == [json.loads(c["function"]["arguments"])
                                                                   for c in calls]
    else:  # nothing lost: the tail after the last complete invoke is content
        body = text.split(THINK_END, 1)[1] if thinking else text
        if text.endswith(CALLS_END) or kind == "after" and got_content.endswith("trailing words"):
            return
        last = body.rfind(INVOKE_END)
        tail = body[last + len(INVOKE_END):] if last >= 0 and kind != "dup" else body[body.find(CALLS_START):]
        complete = [c for c in got_calls if _is_object(c["arguments"])]
        assert got_content.endswith(tail) or got_content.endswith(body[body.find(CALLS_START):]), (kind, whole)
        assert len(complete) <= len(calls) + (kind == "badjson")


def _is_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def test_truncated_invoke_keeps_streamed_pieces_and_returns_the_markup():
    calls = [{"function": {"name": "f", "arguments": {"a": "xyz"}}}]
    text = "hi" + _render_tool_calls(calls, 0)
    cut = text.index("xyz") + 2
    content, got = run([text[:cut]], False)[1:]
    assert got == [{"name": "f", "arguments": '{"a": "xy'}]
    assert content == "hi" + text[2:cut]


@pytest.mark.parametrize("text", ["no markers at all", "<｜DSML｜invoke stray", "\n\n<｜DSML｜function_calls junk",
                                  "\n\n", "\n\n<｜DSML｜function_calls>\n</｜DSML｜function_calls>"])
def test_plain_and_junk_text_is_content(text):
    assert run([text], False) == ("", text, [])


def test_unclosed_reasoning_is_all_reasoning():
    assert run(["abc </thi", "nk but no end"], True) == ("abc </think but no end", "", [])
    assert run(["r</think>c"], True) == ("r", "c", [])


def _golden_turns(folder):
    for name in ("", "_search_wo_date", "_search_w_date"):
        data = json.loads((folder / f"test_input{name}.json").read_text(encoding="utf-8"))
        messages = copy.deepcopy(data["messages"])
        if data.get("tools"):
            messages[0]["tools"] = data["tools"]
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                yield name, i, messages


def test_golden_assistant_turns_round_trip(golden_encoding_dir):
    n = 0
    for name, i, messages in _golden_turns(golden_encoding_dir):
        prefix = encode_messages(messages[:i], "thinking")
        thinking = prefix.endswith("<think>")
        text = encode_messages([messages[i]], "thinking", context=messages[:i])
        assert text.endswith(EOS)
        text = text[:-len(EOS)]
        m = messages[i]
        want_calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                      for c in m.get("tool_calls") or []]
        for chunks in ([text], list(text)):
            reasoning, content, calls = run(chunks, thinking)
            assert content == (m.get("content") or ""), (name, i)
            assert reasoning == ((m.get("reasoning_content") or "") if thinking else ""), (name, i)
            assert [(c["name"], json.loads(c["arguments"])) for c in calls] == \
                [(c["name"], json.loads(c["arguments"])) for c in want_calls], (name, i)
        n += 1
    assert n >= 30  # every assistant turn of the three official conversations
