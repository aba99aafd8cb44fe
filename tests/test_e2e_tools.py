"""Tool calls produced by a real cluster: ``up`` with real prefill and decode workers whose engine emits
a fixed DSML answer (the test-only logits processor ``DSV32_SCRIPTED_OUTPUT``, engine/scripted.py),
seen through the OpenAI-compatible HTTP API by the ``openai`` SDK, whole and streamed, and through
gRPC. The tokens cross the whole path: prefill samples the first, the KV cache moves, decode samples
the rest, the router detokenizes and parses the DSML into ``tool_calls`` with valid JSON arguments.
"""

from __future__ import annotations

import json
import time

import pytest

from dsv32_router.client import generate
from dsv32_text.encoding import _render_tool_calls
from upproc import up

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
         {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
CALLS = [{"function": {"name": "get_weather", "arguments": {"city": "Hangzhou 杭州", "days": [1, 2]}}},
         {"function": {"name": "add", "arguments": {"a": 1.5, "b": {"c": None}}}}]
ANSWER = "Let me check." + _render_tool_calls(CALLS, 0)
WANT = [("get_weather", {"city": "Hangzhou 杭州", "days": [1, 2]}), ("add", {"a": 1.5, "b": {"c": None}})]
MESSAGES = [{"role": "user", "content": "Weather in Hangzhou? And 1.5 + c."}]


@pytest.fixture(scope="module")
def cluster(tiny_model, tmp_path_factory):
    script = tmp_path_factory.mktemp("up-tools") / "answer.txt"
    script.write_text(ANSWER, encoding="utf-8")
    with up(tiny_model, "--http-port", "0", env={"DSV32_SCRIPTED_OUTPUT": str(script)}) as (target, proc):
        deadline = time.monotonic() + 30  # `up` prints the HTTP address right after `ready`
        while not any(line.startswith("http ") for line in proc.out):
            assert time.monotonic() < deadline, "".join(proc.err)
            time.sleep(0.1)
        base = next(line for line in proc.out if line.startswith("http ")).split()[1]
        yield target, openai.OpenAI(base_url=base, api_key="none", max_retries=0, timeout=120)


def _args(calls) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in calls]


def test_the_sdk_sees_tool_calls_from_a_real_cluster(cluster):
    _, client = cluster
    out = client.chat.completions.create(model="", messages=MESSAGES, tools=TOOLS, temperature=0, max_tokens=200)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
    assert _args(choice.message.tool_calls) == WANT
    assert out.usage.completion_tokens > 20  # the whole DSML block was generated, token by token


def test_streamed_tool_calls_arrive_name_first_then_argument_fragments(cluster):
    _, client = cluster
    names, fragments, finish = {}, {}, None
    for chunk in client.chat.completions.create(model="", messages=MESSAGES, tools=TOOLS, temperature=0,
                                                max_tokens=200, stream=True):
        for d in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
            if d.function.name:
                assert d.index not in fragments, "the name comes before any argument fragment"
                names[d.index] = d.function.name
            if d.function.arguments:
                fragments.setdefault(d.index, []).append(d.function.arguments)
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    assert finish == "tool_calls"
    got = [(names[i], json.loads("".join(fragments[i]))) for i in sorted(names)]
    assert got == WANT
    assert any(len(f) > 1 for f in fragments.values())  # arguments streamed in pieces, not buffered


def test_grpc_sees_the_same_tool_calls(cluster):
    target, _ = cluster
    out = generate(target, messages=MESSAGES, tools=TOOLS, temperature=0.0, max_tokens=200)
    assert out.finish_reason == "tool_calls" and out.text == "Let me check."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in out.tool_calls] == WANT
