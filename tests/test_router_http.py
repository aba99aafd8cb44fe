"""The HTTP front's pieces without processes: OpenAI bodies → GenerateRequest, errors → OpenAI
error objects, the tool JSON caps and shapes of chat input, and TokenStream's parsed fields."""

from __future__ import annotations

import json

import grpc
import pytest

from dsv32_proto import serving_pb2, worker_pb2
from dsv32_router.http_openai import chat_request, completion_request, error_body
from dsv32_router.stream import TokenStream
from dsv32_router.validation import ModelSpec, RequestError, ResolvedRequest, Sampling, resolve

SPEC = ModelSpec(name="m", max_model_len=100000, vocab_size=1000)
CHAT = [{"role": "user", "content": "hi"}]


class Tok:
    def encode(self, text):
        return [ord(c) % 1000 for c in text]


def refused(fn, body) -> tuple[int, dict]:
    with pytest.raises(RequestError) as e:
        fn(body)
    return error_body(e.value.code, e.value.message)


def test_chat_body_becomes_the_grpc_request():
    r = chat_request({"model": "m", "messages": CHAT + [
        {"role": "assistant", "content": None, "reasoning_content": "r",
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "42"}]}],
        "temperature": 0, "top_p": 0.5, "top_k": 3, "max_completion_tokens": 7, "seed": 9, "stop": "x",
        "logprobs": True, "top_logprobs": 2, "stream": True, "stream_options": {"include_usage": True},
        "chat_template_kwargs": {"thinking": True}, "tools": [{"type": "function", "function": {"name": "f"}}],
        "n": 1, "user": "u"})
    g = r.grpc
    assert g.chat.thinking and json.loads(g.chat.tools_json)[0]["function"]["name"] == "f"
    assert [m.role for m in g.chat.messages] == ["user", "assistant", "tool"] and g.chat.messages[2].content == "42"
    assert json.loads(g.chat.messages[1].tool_calls_json)[0]["id"] == "c1"
    assert g.chat.messages[1].reasoning_content == "r"
    s = g.sampling
    got = (s.temperature, s.top_p, s.top_k, s.max_tokens, s.seed, list(s.stop), s.logprobs)
    assert got == (0, 0.5, 3, 7, 9, ["x"], 2)
    assert r.stream and r.include_usage and r.logprobs and r.top_logprobs == 2
    assert not chat_request({"messages": CHAT, "tools": [{"function": {"name": "f"}}],
                             "tool_choice": "none"}).grpc.chat.tools_json


def test_completion_body_becomes_the_grpc_request():
    assert completion_request({"prompt": "abc", "max_tokens": 3}).grpc.prompt == "abc"
    assert list(completion_request({"prompt": [[1, 2]]}).grpc.token_ids.ids) == [1, 2]
    assert completion_request({"prompt": "a", "logprobs": 3}).grpc.sampling.logprobs == 3


@pytest.mark.parametrize("body,param", [
    ({"messages": CHAT, "n": 2}, "n"), ({"messages": CHAT, "temperature": "hot"}, "temperature"),
    ({"messages": []}, "messages"), ({"messages": CHAT, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": CHAT, "top_logprobs": 2}, "top_logprobs"), ({"messages": CHAT, "top_logprobs": 99, "logprobs": True},
                                                              "top_logprobs"),
    ({"messages": CHAT, "response_format": {"type": "xml"}}, "response_format.type"),
    ({"messages": CHAT, "tool_choice": "sometimes"}, "tool_choice"),
    ({"messages": CHAT, "tool_choice": {"type": "function", "function": {}}}, "tool_choice.function.name"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]"),
    ({"messages": CHAT, "presence_penalty": 1.0}, "presence_penalty"),
    ({"messages": CHAT, "chat_template_kwargs": {"thinking": "yes"}}, "chat_template_kwargs.thinking"),
])
def test_chat_refusals_name_the_openai_field(body, param):
    status, err = refused(chat_request, body)
    assert status == 400 and err["error"]["param"] == param and err["error"]["message"].startswith(param + ":")


def test_completion_refusals():
    assert refused(completion_request, {"prompt": ["a", "b"]})[1]["error"]["param"] == "prompt"
    assert refused(completion_request, {"prompt": "a", "echo": True})[1]["error"]["param"] == "echo"
    assert refused(completion_request, {"prompt": "a", "max_tokens": 0})[1]["error"]["param"] == "max_tokens"


@pytest.mark.parametrize("code,status", [("INVALID_ARGUMENT", 400), ("OUT_OF_RANGE", 400), ("NOT_FOUND", 404),
                                         ("RESOURCE_EXHAUSTED", 429), ("UNAVAILABLE", 503),
                                         ("DEADLINE_EXCEEDED", 504), ("INTERNAL", 500)])
def test_grpc_codes_map_to_http(code, status):
    got, body = error_body(getattr(grpc.StatusCode, code), "sampling.top_p: must be in (0, 1]")
    assert got == status and body["error"]["param"] == "top_p" and body["error"]["message"].startswith("top_p:")


def test_validation_messages_are_renamed_for_http():
    for proto_path, name in [("chat.messages[2].tool_calls_json", "messages[2].tool_calls"),
                             ("chat.tools_json", "tools"), ("sampling.max_tokens", "max_tokens")]:
        assert error_body(grpc.StatusCode.INVALID_ARGUMENT, f"{proto_path}: bad")[1]["error"]["param"] == name


def _chat(**kw):
    return serving_pb2.GenerateRequest(chat=serving_pb2.ChatInput(**kw))


@pytest.mark.parametrize("req,field", [
    (_chat(messages=[serving_pb2.ChatMessage(role="assistant", tool_calls_json="[1]")]),
     "chat.messages[0].tool_calls_json[0]"),
    (_chat(messages=[serving_pb2.ChatMessage(role="assistant", tool_calls_json='{"a": 1}')]),
     "chat.messages[0].tool_calls_json"),
    (_chat(messages=[serving_pb2.ChatMessage(role="assistant", tool_calls_json='[{"function": null}]')]),
     "chat.messages[0].tool_calls_json[0].function"),
    (_chat(messages=[serving_pb2.ChatMessage(role="assistant",
                                             tool_calls_json='[{"function": {"name": "f", "arguments": "[1]"}}]')]),
     "chat.messages[0].tool_calls_json[0].function.arguments"),
    (_chat(messages=[serving_pb2.ChatMessage(role="assistant", tool_calls_json="[" * 100_000 + "]" * 100_000)]),
     "chat.messages[0].tool_calls_json"),
    (_chat(messages=[serving_pb2.ChatMessage(role="user", content="x")], tools_json="[1]"), "chat.tools_json[0]"),
    (_chat(messages=[serving_pb2.ChatMessage(role="user", content="x")], tools_json='{"a": 1}'), "chat.tools_json"),
    (_chat(messages=[serving_pb2.ChatMessage(role="user", content="x")], tools_json='[{"function": null}]'),
     "chat.tools_json[0].function"),
    (_chat(messages=[serving_pb2.ChatMessage(role="user", content="x")], tools_json="{" * 100_000),
     "chat.tools_json"),
    (_chat(messages=[serving_pb2.ChatMessage(role="user", content="x")], tools_json='["' + "x" * (1 << 21) + '"]'),
     "chat.tools_json"),
])
def test_malformed_tool_json_is_invalid_argument_naming_the_field(req, field):
    with pytest.raises(RequestError) as e:
        resolve(req, Tok(), SPEC)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.message.startswith(field + ":")


def _stream(thinking=False, tools=False):
    req = ResolvedRequest(request_id="r", prompt_ids=[1], thinking=thinking, tools=tools,
                          sampling=Sampling(temperature=0, top_p=1, top_k=0, max_tokens=100, seed=0))
    return TokenStream(_CharTok(), req, eos_token_id=1)


class _CharTok:
    """Token id = a code point (BOS 0 and EOS 1 are none); enough for the stream's detokenizer."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids if i >= 2)


def _push(ts, text, finish=True):
    outs = []
    for k, ch in enumerate(text):
        last = finish and k == len(text) - 1
        tok = worker_pb2.Token(token_id=ord(ch), finished=last, finish_reason="stop" if last else "")
        out = ts.push([tok])
        if out is not None:
            outs.append(out)
    return outs


def test_token_stream_splits_reasoning_and_streams_tool_calls():
    D = "｜DSML｜"
    text = (f'hmm</think>ok\n\n<{D}function_calls>\n<{D}invoke name="f">\n<{D}parameter name="a" string="true">'
            f'xy</{D}parameter>\n</{D}invoke>\n</{D}function_calls>')
    outs = _push(_stream(thinking=True, tools=True), text)
    assert "".join(o.reasoning_content for o in outs) == "hmm" and "".join(o.text for o in outs) == "ok"
    calls = [c for o in outs for c in o.tool_calls]
    assert calls[0].name == "f" and calls[0].id.startswith("call_") and len(calls) > 2  # streamed in pieces
    assert "".join(c.arguments for c in calls) == '{"a": "xy"}'
    assert outs[-1].finish_reason == "tool_calls"
    plain = _push(_stream(), text)
    assert "".join(o.text for o in plain) == text and plain[-1].finish_reason == "stop"


def test_a_retry_replays_the_grammar_of_the_generated_tokens():
    from dsv32_router.request_run import _sampling_pb

    s = Sampling(temperature=0, top_p=1, top_k=0, max_tokens=50, seed=1, json_schema='{"type": "object"}')
    again = s.remaining(7)
    assert (again.max_tokens, again.grammar_replay) == (43, 7)
    pb = _sampling_pb(again)
    assert (pb.json_schema, pb.grammar_replay) == ('{"type": "object"}', 7)
    assert Sampling(temperature=0, top_p=1, top_k=0, max_tokens=50, seed=1).remaining(7).grammar_replay == 0


def test_named_tool_choice_becomes_the_functions_schema():
    tools = json.dumps([{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}}}}}])
    req = _chat(messages=[serving_pb2.ChatMessage(role="user", content="x")], tools_json=tools, forced_tool="f")
    r = resolve(req, Tok(), SPEC)
    assert r.forced_tool == "f" and not r.tools and json.loads(r.sampling.json_schema)["properties"]["a"]
    for bad in ("g", ""):
        if bad:
            req.chat.forced_tool = bad
            with pytest.raises(RequestError) as e:
                resolve(req, Tok(), SPEC)
            assert e.value.message.startswith("chat.forced_tool:")
    outs = _push(_stream_forced("f"), '{"a": 1}')
    calls = [c for o in outs for c in o.tool_calls]
    assert calls[0].name == "f" and "".join(c.arguments for c in calls) == '{"a": 1}'
    assert "".join(o.text for o in outs) == "" and outs[-1].finish_reason == "tool_calls"


def _stream_forced(name):
    req = ResolvedRequest(request_id="r", prompt_ids=[1], forced_tool=name,
                          sampling=Sampling(temperature=0, top_p=1, top_k=0, max_tokens=100, seed=0))
    return TokenStream(_CharTok(), req, eos_token_id=1)


def test_required_tool_choice_lists_calls_or_returns_the_text():
    tools = json.dumps([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}},
                        {"type": "function", "function": {"name": "g"}}])
    req = _chat(messages=[serving_pb2.ChatMessage(role="user", content="x")], tools_json=tools, require_tool=True)
    r = resolve(req, Tok(), SPEC)
    schema = json.loads(r.sampling.json_schema)
    assert r.require_tool and schema["minItems"] == 1 and len(schema["items"]["anyOf"]) == 2
    assert chat_request({"messages": CHAT, "tools": json.loads(tools), "tool_choice": "required"}).grpc.chat.require_tool
    ts = _stream()
    ts.req.require_tool = True
    outs = _push(ts, '[{"name": "g", "parameters": {"k": "v"}}]')
    calls = [c for o in outs for c in o.tool_calls]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("g", {"k": "v"})]
    assert outs[-1].finish_reason == "tool_calls" and "".join(o.text for o in outs) == ""
    cut = _stream()
    cut.req.require_tool = True
    assert "".join(o.text for o in _push(cut, '[{"name": "g", "par')) == '[{"name": "g", "par'


@pytest.mark.parametrize("chat", [False, True], ids=["completion", "chat"])
def test_tokens_that_decode_to_no_text_yet_still_stream_their_ids(chat):
    """A message whose tokens are an incomplete UTF-8 sequence has no text: with return_token_ids the
    client must still get its ids (the loadtest counts output tokens from them)."""
    from dsv32_proto import serving_pb2
    from dsv32_router.http_openai import HttpRequest
    from dsv32_router.http_output import ChoiceBuilder

    req = HttpRequest(serving_pb2.GenerateRequest(), stream=True, include_usage=False, logprobs=False,
                      top_logprobs=0, model="tiny", return_token_ids=True)
    b = ChoiceBuilder(None, req, "tiny", chat)
    got = []
    for out in (serving_pb2.GenerateResponse(request_id="r", text="a", token_ids=[5]),
                serving_pb2.GenerateResponse(request_id="r", text="", token_ids=[6, 7]),
                serving_pb2.GenerateResponse(request_id="r", text="é", token_ids=[8], finish_reason="length")):
        got += [i for c in b.chunks(out) for i in c["choices"][0]["token_ids"]]
    assert got == [5, 6, 7, 8]
