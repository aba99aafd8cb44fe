"""End to end: the OpenAI-compatible HTTP front of a live ``dsv32-serve up --http-port 0`` cluster
(1 prefill + 1 decode, real processes, private redis-server), driven by the real ``openai`` SDK.

Greedy output through HTTP, through gRPC and from the offline ``LLM`` are the
same tokens (``return_token_ids``, vLLM's extension, gives HTTP's ids), for a
text prompt and for chat input; thinking mode separates ``reasoning_content``
in both APIs; errors come back as the SDK's typed exceptions naming the field;
a client that disconnects frees its pages.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest

from dsv32_proto import worker_pb2, worker_pb2_grpc
from dsv32_router.client import generate, stream_responses
from dsv32_cluster.state import ClusterState

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow

MAX_TOKENS = 8
TEXT = "The disaggregated cluster streams tokens"
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime number."}]


def _oracle(model: str) -> dict:
    from dsv32_engine import LLM
    from dsv32_text.encoding import render_prompt_ids
    from dsv32_text.tokenizer import load_tokenizer

    tok = load_tokenizer(model)
    llm = LLM(model=model)
    prompts = {"text": TEXT, "chat": render_prompt_ids(tok, CHAT, "chat"),
               "think": render_prompt_ids(tok, CHAT, "thinking")}
    outs = llm.generate(list(prompts.values()), [_greedy() for _ in prompts])
    ids = {n: o.outputs[0].token_ids for n, o in zip(prompts, outs)}
    ids["think_text"] = tok.decode(ids["think"])
    return ids


def _greedy():
    from dsv32_engine import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)


@pytest.fixture(scope="module")
def cluster(tiny_model, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("up-http")
    err = open(log_dir / "up.stderr", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "dsv32_serve.cli", "up", "--model", tiny_model, "--port", "0",
                             "--http-port", "0", "--log-dir", str(log_dir), "--num-pages", "64", "--grace", "5"],
                            stdout=subprocess.PIPE, stderr=err, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    try:
        oracle = _oracle(tiny_model)
        deadline = time.monotonic() + 180
        while not any(line.startswith("http ") for line in lines):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"up did not become ready:\n{(log_dir / 'up.stderr').read_text()}")
            time.sleep(0.1)
        target = next(line for line in lines if line.startswith("ready ")).split()[1]
        base = next(line for line in lines if line.startswith("http ")).split()[1]
        client = openai.OpenAI(base_url=base, api_key="none", max_retries=0, timeout=120)
        yield {"target": target, "base": base, "client": client, "oracle": oracle, "log_dir": log_dir}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        err.close()


def test_models_and_health(cluster):
    models = cluster["client"].models.list().data
    assert len(models) == 1 and models[0].id and models[0].object == "model"
    with urllib.request.urlopen(cluster["base"].rsplit("/v1", 1)[0] + "/health", timeout=10) as r:
        assert r.status == 200


def test_completion_greedy_equals_grpc_and_offline(cluster):
    c, want = cluster["client"], cluster["oracle"]["text"]
    out = c.completions.create(model="", prompt=TEXT, max_tokens=MAX_TOKENS, temperature=0,
                               logprobs=2, extra_body={"return_token_ids": True})
    choice = out.choices[0]
    assert choice.token_ids == want
    assert generate(cluster["target"], TEXT, max_tokens=MAX_TOKENS, temperature=0.0).token_ids == want
    assert out.usage.completion_tokens == len(want) and out.usage.prompt_tokens > 0
    assert choice.finish_reason in ("length", "stop")
    assert len(choice.logprobs.token_logprobs) == len(want) and all(len(t) == 2 for t in choice.logprobs.top_logprobs)


def test_chat_greedy_whole_and_streamed_equal_grpc_and_offline(cluster):
    c, want = cluster["client"], cluster["oracle"]["chat"]
    models = c.models.list().data
    out = c.chat.completions.create(model=models[0].id, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0,
                                    logprobs=True, top_logprobs=2, extra_body={"return_token_ids": True})
    msg = out.choices[0]
    assert msg.token_ids == want and msg.message.role == "assistant"
    assert [len(t.top_logprobs) for t in msg.logprobs.content] == [2] * len(want)
    grpc_out = generate(cluster["target"], messages=CHAT, max_tokens=MAX_TOKENS, temperature=0.0)
    assert grpc_out.token_ids == want and grpc_out.text == msg.message.content
    chunks = list(c.chat.completions.create(model=models[0].id, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"return_token_ids": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [t for ch in chunks if ch.choices for t in ch.choices[0].token_ids] == want
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == msg.message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want)
    assert [ch.choices[0].finish_reason for ch in chunks[:-1]][-1] == msg.finish_reason


def test_seed_reproducible(cluster):
    c = cluster["client"]
    runs = [c.completions.create(model="", prompt=TEXT, max_tokens=MAX_TOKENS, temperature=0.9, seed=7).choices[0].text
            for _ in range(2)]
    assert runs[0] == runs[1]


def test_thinking_separates_reasoning_in_both_apis(cluster):
    c, text = cluster["client"], cluster["oracle"]["think_text"]
    out = c.chat.completions.create(model="", messages=CHAT, max_tokens=MAX_TOKENS, temperature=0,
                                    extra_body={"chat_template_kwargs": {"thinking": True}})
    msg = out.choices[0].message
    reasoning, sep, content = text.partition("</think>")
    assert msg.model_extra["reasoning_content"] == reasoning and (msg.content or "") == content
    chunks = list(c.chat.completions.create(model="", messages=CHAT, max_tokens=MAX_TOKENS, temperature=0, stream=True,
                                            extra_body={"chat_template_kwargs": {"thinking": True}}))
    assert "".join((ch.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for ch in chunks) == reasoning
    msgs = list(stream_responses(cluster["target"], messages=CHAT, thinking=True, max_tokens=MAX_TOKENS,
                                 temperature=0.0))
    assert "".join(m.reasoning_content for m in msgs) == reasoning and "".join(m.text for m in msgs) == content


def test_errors_are_typed_and_name_the_field(cluster):
    c = cluster["client"]
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="", messages=CHAT, temperature=-1)
    assert e.value.status_code == 400 and "temperature" in str(e.value) and e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="", messages=CHAT, n=2)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="", prompt=TEXT, max_tokens=10**6)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="", prompt=[5] * 5000)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="no-such-model", prompt=TEXT, max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="", messages=[{"role": "wizard", "content": "x"}])
    assert e.value.body["param"] == "messages[0].role"
    with pytest.raises(openai.APIStatusError) as e:  # a deadline too short to be admitted
        c.completions.create(model="", prompt=TEXT, max_tokens=2, extra_headers={"X-Request-Timeout": "0.000001"})
    assert e.value.status_code == 504
    req = urllib.request.Request(cluster["base"] + "/chat/completions", data=b"{not json",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 400 and json.loads(e.value.read())["error"]["param"] == "body"


def _decode_stats(cluster):
    state = ClusterState.from_url(_redis_url(cluster))
    try:
        [w] = state.workers("decode")
    finally:
        state.client.close()
    with grpc.insecure_channel(w.endpoint) as ch:
        return worker_pb2_grpc.DecodeWorkerStub(ch).Stats(worker_pb2.StatsRequest(), timeout=5)


def _redis_url(cluster) -> str:
    import re

    return re.search(r"redis (redis://\S+),", (cluster["log_dir"] / "up.stderr").read_text()).group(1)


def test_client_disconnect_cancels_and_frees_pages(cluster):
    c = cluster["client"]
    stream = c.completions.create(model="", prompt=TEXT, max_tokens=3000, temperature=0, stream=True,
                                  extra_body={"ignore_eos": True})
    next(iter(stream))
    assert _decode_stats(cluster).running_requests == 1
    stream.close()  # the connection goes away mid-answer
    deadline = time.monotonic() + 20
    while True:
        s = _decode_stats(cluster)
        if s.running_requests == 0 and s.free_pages == s.total_pages and s.reserved_pages == 0:
            break
        assert time.monotonic() < deadline, f"pages not freed after a disconnect: {s}"
        time.sleep(0.2)


SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 10}, "days": {"type": "integer", "minimum": 1, "maximum": 14},
    "units": {"enum": ["C", "F"]}, "alerts": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}},
    "required": ["city", "days", "units"], "additionalProperties": False}


def test_json_schema_output_validates_for_20_random_weight_generations(cluster):
    import jsonschema

    c = cluster["client"]
    rf = {"type": "json_schema", "json_schema": {"name": "forecast", "schema": SCHEMA}}

    def constrained(seed):
        return c.chat.completions.create(model="", messages=CHAT, temperature=1.0, seed=seed, max_tokens=60,
                                         response_format=rf).choices[0]

    def free(seed):
        return c.completions.create(model="", prompt=TEXT, temperature=1.0, seed=seed, max_tokens=20).choices[0]

    with ThreadPoolExecutor(6) as pool:  # batched with unconstrained requests
        frees = [pool.submit(free, s) for s in range(4)]
        outs = list(pool.map(constrained, range(20)))
    for out in outs:
        assert out.finish_reason == "stop"
        jsonschema.validate(json.loads(out.message.content), SCHEMA)
    assert all(f.result().finish_reason for f in frees)
    obj = c.chat.completions.create(model="", messages=CHAT, temperature=1.0, seed=1, max_tokens=200,
                                    response_format={"type": "json_object"}).choices[0]
    if obj.finish_reason == "stop":  # random weights may spend all 200 tokens inside one string
        assert isinstance(json.loads(obj.message.content), dict)
    grpc_out = generate(cluster["target"], messages=CHAT, temperature=1.0, seed=3, max_tokens=60,
                        json_schema=json.dumps(SCHEMA))
    jsonschema.validate(json.loads(grpc_out.text), SCHEMA)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="", messages=CHAT, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}})
    assert e.value.body["param"] == "response_format"


def test_loadtest_openai_backend_same_workload_and_metrics_as_grpc(cluster):
    from dsv32_loadtest import Arrival, SessionWorkload, SyntheticWorkload, run_load

    summaries = {}
    for backend, target in (("openai", cluster["base"]), ("grpc", cluster["target"])):
        report = run_load(target, SyntheticWorkload(input_len=32, output_len=8), Arrival("closed", concurrency=2),
                          num_prompts=6, request_timeout_s=120, max_duration_s=60, backend=backend)
        assert report.models and report.models[0]["vocab_size"] > 0
        run = report.runs[0]
        s = summaries[backend] = run.summary(None)
        assert (s["planned"], s["completed"], s["failed"]) == (6, 6, 0), [r.error for r in run.results]
        assert s["output_len_mismatches"] == 0, (backend, [(r.output_tokens, r.finish_reason) for r in run.results])
        assert s["server_token_count_mismatches"] == 0, (backend, [(r.output_tokens, r.server_completion_tokens)
                                                                   for r in run.results])
        for r in run.results:
            assert r.ok and r.e2e_s >= r.ttft_s > 0 and r.output_tokens == r.requested_output_tokens == 8
            assert r.input_tokens == r.server_prompt_tokens and r.finish_reason == "length"
    assert set(summaries["openai"]) == set(summaries["grpc"])
    report = run_load(cluster["base"], SessionWorkload(turns=2, input_len=16, output_len=4, shared_prefix_len=64),
                      Arrival("closed", concurrency=2), num_prompts=4, request_timeout_s=120, max_duration_s=60,
                      backend="openai")
    assert report.runs[0].summary(None)["completed"] == 4


def test_disconnect_while_waiting_for_a_whole_answer_frees_pages(cluster):
    import socket

    host, port = cluster["base"].split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    body = json.dumps({"prompt": TEXT, "max_tokens": 3000, "ignore_eos": True, "temperature": 0}).encode()
    s = socket.create_connection((host, int(port)))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % len(body) + body)
    deadline = time.monotonic() + 20
    while _decode_stats(cluster).running_requests == 0:
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.1)
    s.close()  # gone before the answer is complete
    deadline = time.monotonic() + 20
    while True:
        st = _decode_stats(cluster)
        if st.running_requests == 0 and st.free_pages == st.total_pages and st.reserved_pages == 0:
            break
        assert time.monotonic() < deadline, f"pages not freed after a disconnect: {st}"
        time.sleep(0.2)


def test_named_tool_choice_forces_a_schema_valid_call(cluster):
    import jsonschema

    c = cluster["client"]
    tools = [{"type": "function", "function": {"name": "forecast", "parameters": SCHEMA}},
             {"type": "function", "function": {"name": "other"}}]
    choice = {"type": "function", "function": {"name": "forecast"}}
    for seed in range(3):
        out = c.chat.completions.create(model="", messages=CHAT, tools=tools, tool_choice=choice, temperature=1.0,
                                        seed=seed, max_tokens=60).choices[0]
        assert out.finish_reason == "tool_calls" and not out.message.content
        [call] = out.message.tool_calls
        assert call.function.name == "forecast" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMA)
    chunks = list(c.chat.completions.create(model="", messages=CHAT, tools=tools, tool_choice=choice, temperature=1.0,
                                            seed=0, max_tokens=60, stream=True))
    deltas = [d for ch in chunks for d in ch.choices[0].delta.tool_calls or []]
    assert deltas[0].function.name == "forecast" and len(deltas) > 2
    jsonschema.validate(json.loads("".join(d.function.arguments or "" for d in deltas)), SCHEMA)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    for seed in range(2):  # "required": one or more calls, each of a listed tool with valid arguments
        out = c.chat.completions.create(model="", messages=CHAT, tools=tools, tool_choice="required",
                                        temperature=1.0, seed=seed, max_tokens=120).choices[0]
        if out.finish_reason == "length":  # cut inside the list: it came back as content
            assert out.message.content
            continue
        assert out.finish_reason == "tool_calls" and out.message.tool_calls
        for call in out.message.tool_calls:
            args = json.loads(call.function.arguments)
            if call.function.name == "forecast":
                jsonschema.validate(args, SCHEMA)
            assert call.function.name in ("forecast", "other") and isinstance(args, dict)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="", messages=CHAT, tools=tools,
                                  tool_choice={"type": "function", "function": {"name": "nope"}})
    assert e.value.body["param"] == "tool_choice"


def test_usage_reports_cached_prompt_tokens_and_a_request_may_opt_out(cluster):
    """usage.prompt_tokens_details.cached_tokens as OpenAI reports it; skip_prefix_cache and session end."""
    c = cluster["client"]
    prompt = list(range(3000, 3300))  # 4 full pages of 64 (the last token is always computed)
    first = c.completions.create(model="", prompt=prompt, max_tokens=2, temperature=0,
                                 extra_body={"session_id": "http-s1"})
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    again = c.completions.create(model="", prompt=prompt, max_tokens=2, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens == 256
    assert again.choices[0].text == first.choices[0].text
    skip = c.completions.create(model="", prompt=prompt, max_tokens=2, temperature=0,
                                extra_body={"skip_prefix_cache": True})
    assert skip.usage.prompt_tokens_details.cached_tokens == 0 and skip.choices[0].text == first.choices[0].text
    req = urllib.request.Request(cluster["base"] + "/sessions/http-s1", method="DELETE")
    with urllib.request.urlopen(req, timeout=10) as r:
        body = json.loads(r.read())
    assert body["deleted"] is True and body["object"] == "session.deleted"
