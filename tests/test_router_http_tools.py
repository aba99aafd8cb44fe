"""Tool calls through the real router process, HTTP and gRPC, with a scripted model.

The fake workers of ``test_router_fakes.py`` answer with a fixed DSML answer
(the token ids of "Let me check." + two tool calls + EOS), so the real router's
parsing, streaming and finish reason are seen by the ``openai`` SDK exactly as
a model emitting those tokens would produce them. The next turn sends the
calls and the tool results back: the prompt the prefill worker receives holds
them rendered by the V3.2 encoding.
"""

from __future__ import annotations

import json

import pytest

import test_router_fakes
from dsv32_cluster.procs import free_port
from dsv32_router.client import generate
from dsv32_text.encoding import EOS, _render_tool_calls, render_prompt_ids
from dsv32_text.tokenizer import load_tokenizer
from test_router import start_router, write_model_dir
from test_router_fakes import FakeCluster

openai = pytest.importorskip("openai")

CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": CITY}},
         {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
CALLS = [{"function": {"name": "get_weather", "arguments": {"city": "Hangzhou 杭州", "days": [1, 2]}}},
         {"function": {"name": "add", "arguments": {"a": 1.5, "b": {"c": None}}}}]
ANSWER = "Let me check." + _render_tool_calls(CALLS, 0)
MESSAGES = [{"role": "user", "content": "Weather in Hangzhou? And 1.5 + c."}]


@pytest.fixture(scope="module")
def scripted(tmp_path_factory, redis_server):
    url = f"redis://{redis_server.host}:{redis_server.port}/5"
    model_dir = write_model_dir(tmp_path_factory.mktemp("tools-model"))
    tok = load_tokenizer(model_dir)
    script = tok.encode(ANSWER) + [1]
    assert tok.decode(script) == ANSWER + EOS
    base = len(render_prompt_ids(tok, MESSAGES, "chat", tools=TOOLS))
    patch = pytest.MonkeyPatch()
    # the fake model: the token at generated index i is the script's
    patch.setattr(test_router_fakes, "fake_token", lambda seed, pos: script[pos - base] if 0 <= pos - base < len(script)
                  else 1)
    cluster = FakeCluster(url, "rth:", n_prefill=1, n_decode=1)
    http_port = free_port()
    proc, target = start_router(model_dir, url, "rth:", "--http-port", str(http_port))
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="none", max_retries=0, timeout=60)
    yield client, target, cluster, tok
    proc.terminate()
    proc.wait(10)
    cluster.close()
    patch.undo()


def _args(calls) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in calls]


WANT = [("get_weather", {"city": "Hangzhou 杭州", "days": [1, 2]}), ("add", {"a": 1.5, "b": {"c": None}})]
EXTRA = {"stop_token_ids": [1]}  # the fake workers stop on stop_token_ids only


def test_openai_sdk_sees_tool_calls_whole(scripted):
    client = scripted[0]
    out = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, temperature=0,
                                         max_tokens=150, extra_body=EXTRA)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
    assert _args(choice.message.tool_calls) == WANT
    assert all(c.id.startswith("call_") and c.type == "function" for c in choice.message.tool_calls)


def test_openai_sdk_sees_tool_calls_streamed_incrementally(scripted):
    client = scripted[0]
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, temperature=0,
                                                 max_tokens=150, stream=True, extra_body=EXTRA))
    calls: dict[int, dict] = {}
    pieces = 0
    for ch in chunks:
        for d in ch.choices[0].delta.tool_calls or []:
            if d.index not in calls:
                assert d.id and d.function.name, "a call starts with its id and name"
                calls[d.index] = {"name": d.function.name, "arguments": ""}
            calls[d.index]["arguments"] += d.function.arguments or ""
            pieces += 1
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == WANT
    assert pieces > 4, "arguments arrive in fragments, not once at the end"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == "Let me check."
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_grpc_client_sees_the_same_tool_calls(scripted):
    target = scripted[1]
    out = generate(target, messages=MESSAGES, tools=TOOLS, temperature=0.0, max_tokens=150, stop_token_ids=[1])
    assert out.finish_reason == "tool_calls" and out.text == "Let me check."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in out.tool_calls] == WANT


def test_tool_results_render_back_on_the_next_turn(scripted):
    client, _, cluster, tok = scripted
    first = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, temperature=0,
                                           max_tokens=150, extra_body=EXTRA).choices[0].message
    follow = MESSAGES + [first.model_dump(exclude_none=True)] + [
        {"role": "tool", "tool_call_id": c.id, "content": f"result {k}"} for k, c in enumerate(first.tool_calls)]
    client.chat.completions.create(model="tiny", messages=follow, tools=TOOLS, temperature=0, max_tokens=3,
                                   extra_body=EXTRA)
    prompt = tok.decode([p for p in cluster.prefill.values()][0].prompts[-1])
    assert "<function_results>\n<result>result 0</result>\n<result>result 1</result>\n</function_results>" in prompt
    assert '<｜DSML｜invoke name="add">' in prompt and "Let me check." in prompt
