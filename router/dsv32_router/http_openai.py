"""OpenAI (as vLLM serves it) JSON bodies → ``GenerateRequest``, and errors → OpenAI error objects.

The HTTP front (:mod:`dsv32_router.http_app`) turns each body into the same
``dsv32.serving.v1.GenerateRequest`` a gRPC client would send, so validation,
admission, orchestration, retries and sessions are the gRPC path's own. What
only exists in the OpenAI schema is checked here (types, ``n``, ``stream_options``,
``logprobs``/``top_logprobs``, unsupported options), with the OpenAI field name
in the message; errors from :mod:`dsv32_router.validation` name the proto field
and are renamed by :func:`error_body`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import grpc

from dsv32_proto import serving_pb2
from .validation import MAX_LOGPROBS, invalid

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.OUT_OF_RANGE: 400, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.CANCELLED: 499,
}
_ERROR_TYPE = {400: "invalid_request_error", 404: "not_found_error", 409: "invalid_request_error",
               429: "rate_limit_error", 503: "service_unavailable", 504: "timeout"}
# proto field paths (validation.py) -> OpenAI names
_RENAMES = [(re.compile(r"^sampling\.json_schema"), "response_format"), (re.compile(r"^sampling\."), ""),
            (re.compile(r"^chat\.messages"), "messages"), (re.compile(r"^chat\.tools_json"), "tools"),
            (re.compile(r"^chat\.forced_tool"), "tool_choice"), (re.compile(r"^chat\.require_tool"), "tool_choice"),
            (re.compile(r"^chat\b"), "messages"), (re.compile(r"\.tool_calls_json"), ".tool_calls"),
            (re.compile(r"^token_ids\.ids"), "prompt")]
_FIELD = re.compile(r"^([A-Za-z_][\w.\[\]]*): ")


def openai_field(message: str) -> tuple[str, str | None]:
    """``message`` with its leading proto field path renamed to the OpenAI one, and that name."""
    m = _FIELD.match(message)
    if not m:
        return message, None
    name = m.group(1)
    for pattern, repl in _RENAMES:
        name = pattern.sub(repl, name)
    return name + message[m.end(1):], name


def error_body(code: grpc.StatusCode, message: str) -> tuple[int, dict]:
    """HTTP status and OpenAI error object for a refused request."""
    status = HTTP_STATUS.get(code, 500)
    message, param = openai_field(message)
    kind = "context_length_exceeded" if code == grpc.StatusCode.OUT_OF_RANGE else code.name.lower()
    return status, {"error": {"message": message, "type": _ERROR_TYPE.get(status, "internal_error"),
                              "param": param, "code": kind}}


@dataclass
class HttpRequest:
    """A converted body: the gRPC request plus what only shapes the HTTP answer."""

    grpc: serving_pb2.GenerateRequest
    stream: bool
    include_usage: bool
    logprobs: bool
    top_logprobs: int
    model: str
    thinking: bool = False
    return_token_ids: bool = False
    """vLLM's extension: the generated ids in each choice (``token_ids``)."""


def _num(body: dict, name: str, kind=float, lo=None, hi=None):
    v = body.get(name)
    if v is None:
        return None
    ok_types = (int,) if kind is int else (int, float)
    if isinstance(v, bool) or not isinstance(v, ok_types):
        raise invalid(name, f"must be {'an integer' if kind is int else 'a number'}, got {json.dumps(v)[:40]}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise invalid(name, f"must be in [{lo}, {hi}], got {v}")
    return v


def _flag(body: dict, name: str) -> bool:
    v = body.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise invalid(name, f"must be a boolean, got {json.dumps(v)[:40]}")
    return v


def _common(body: dict, *, chat: bool) -> tuple[serving_pb2.SamplingParams, dict]:
    if not isinstance(body, dict):
        raise invalid("body", "must be a JSON object")
    n = _num(body, "n", int)
    if n is not None and n != 1:
        raise invalid("n", f"only n=1 is supported, got {n}")
    best_of = _num(body, "best_of", int)
    if best_of is not None and best_of != 1:
        raise invalid("best_of", f"only best_of=1 is supported, got {best_of}")
    for name in ("presence_penalty", "frequency_penalty", "repetition_penalty"):
        v = _num(body, name)
        if v is not None and v != (1 if name == "repetition_penalty" else 0):
            raise invalid(name, "is not supported (only the neutral value)")
    if body.get("logit_bias"):
        raise invalid("logit_bias", "is not supported")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise invalid("user", "must be a string")
    sp = serving_pb2.SamplingParams()
    for name in ("temperature", "top_p"):
        v = _num(body, name)
        if v is not None:
            setattr(sp, name, v)
    top_k = _num(body, "top_k", int)
    if top_k is not None and top_k != -1:  # vLLM: -1 = off
        sp.top_k = top_k
    mt = body.get("max_completion_tokens") if chat and body.get("max_completion_tokens") is not None \
        else body.get("max_tokens")
    name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    if mt is not None:
        mt = _num({name: mt}, name, int, 1, 2**31)
        sp.max_tokens = mt
    seed = _num(body, "seed", int, 0, 2**64 - 1)
    if seed is not None:
        sp.seed = seed
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise invalid("stop", "must be a string or a list of strings")
        sp.stop.extend(stop)
    ids = body.get("stop_token_ids")
    if ids is not None:
        if not isinstance(ids, list) or not all(isinstance(t, int) and t >= 0 for t in ids):
            raise invalid("stop_token_ids", "must be a list of token ids")
        sp.stop_token_ids.extend(ids)
    sp.ignore_eos = _flag(body, "ignore_eos")
    so = body.get("stream_options")
    stream = _flag(body, "stream")
    include_usage = False
    if so is not None:
        if not isinstance(so, dict):
            raise invalid("stream_options", "must be an object")
        if not stream:
            raise invalid("stream_options", "is only allowed when stream is true")
        include_usage = _flag(so, "include_usage")
    model = body.get("model") or ""
    if not isinstance(model, str):
        raise invalid("model", "must be a string")
    ids = {}
    for name in ("session_id", "request_id"):  # dsv32 extensions: session affinity, a client-chosen id
        v = body.get(name)
        if v is not None and not isinstance(v, str):
            raise invalid(name, "must be a string")
        ids[name] = v or ""
    return sp, {"stream": stream, "include_usage": include_usage, "model": model,
                "return_token_ids": _flag(body, "return_token_ids"),
                "skip_prefix_cache": _flag(body, "skip_prefix_cache"), **ids}


def _content(value, where: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # content parts: text only
        out = []
        for j, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise invalid(f"{where}[{j}]", "only text content parts are supported")
            out.append(part["text"])
        return "".join(out)
    raise invalid(where, "must be a string or a list of content parts")


def _response_format(rf, sp: serving_pb2.SamplingParams) -> None:
    """``text``; ``json_object`` (any JSON object); ``json_schema`` ({"json_schema": {"schema": ...}})."""
    if rf is None:
        return
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "json_object":
        sp.json_schema = '{"type": "object"}'
    elif kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("schema", {}), dict):
            raise invalid("response_format.json_schema", "must be an object with a 'schema' object")
        sp.json_schema = json.dumps(js.get("schema", {"type": "object"}))
    elif kind != "text":
        raise invalid("response_format.type", "must be one of text, json_object, json_schema")


def chat_request(body: dict) -> HttpRequest:
    sp, common = _common(body, chat=True)
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise invalid("messages", "must be a non-empty list")
    chat = serving_pb2.ChatInput()
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise invalid(f"messages[{i}]", "must be an object")
        role = m.get("role")
        if not isinstance(role, str):
            raise invalid(f"messages[{i}].role", "is required")
        cm = serving_pb2.ChatMessage(role=role, content=_content(m.get("content"), f"messages[{i}].content"))
        rc = m.get("reasoning_content", m.get("reasoning"))
        if rc is not None:
            cm.reasoning_content = _content(rc, f"messages[{i}].reasoning_content")
        if m.get("tool_calls") is not None:
            cm.tool_calls_json = json.dumps(m["tool_calls"])
        chat.messages.append(cm)
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise invalid("chat_template_kwargs", "must be an object")
    thinking = kwargs.get("thinking", kwargs.get("enable_thinking", False))
    if not isinstance(thinking, bool):
        raise invalid("chat_template_kwargs.thinking", "must be a boolean")
    chat.thinking = thinking
    tool_choice = body.get("tool_choice", "auto")
    if isinstance(tool_choice, dict):  # {"type": "function", "function": {"name": ...}}: forced
        fn = tool_choice.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise invalid("tool_choice.function.name", "must be a string")
        chat.forced_tool = fn["name"]
    elif tool_choice == "required":
        chat.require_tool = True
    elif tool_choice not in ("auto", "none", None):
        raise invalid("tool_choice", "must be 'auto', 'none', 'required' or a named function")
    tools = body.get("tools")
    if tools is not None and tool_choice != "none":
        if not isinstance(tools, list):
            raise invalid("tools", "must be a list of tools")
        chat.tools_json = json.dumps(tools)
    _response_format(body.get("response_format"), sp)
    logprobs = _flag(body, "logprobs")
    top = _num(body, "top_logprobs", int, 0, MAX_LOGPROBS) or 0
    if top and not logprobs:
        raise invalid("top_logprobs", "needs logprobs: true")
    if logprobs:
        sp.logprobs = max(top, 1)  # the engine reports the chosen token with a top-n list, n >= 1
    req = serving_pb2.GenerateRequest(model=common["model"], sampling=sp, chat=chat, session_id=common["session_id"],
                                      skip_prefix_cache=common["skip_prefix_cache"],
                                      request_id=common["request_id"])
    return HttpRequest(grpc=req, stream=common["stream"], include_usage=common["include_usage"],
                       logprobs=logprobs, top_logprobs=top, model=common["model"], thinking=thinking,
                       return_token_ids=common["return_token_ids"])


def completion_request(body: dict) -> HttpRequest:
    sp, common = _common(body, chat=False)
    if _flag(body, "echo"):
        raise invalid("echo", "is not supported")
    if body.get("suffix"):
        raise invalid("suffix", "is not supported")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    req = serving_pb2.GenerateRequest(model=common["model"], sampling=sp, session_id=common["session_id"],
                                      skip_prefix_cache=common["skip_prefix_cache"],
                                      request_id=common["request_id"])
    if isinstance(prompt, str):
        req.prompt = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                     for t in prompt):
        req.token_ids.CopyFrom(serving_pb2.TokenIds(ids=prompt))
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise invalid("prompt", "one prompt per request (a batch of prompts is not supported)")
    else:
        raise invalid("prompt", "must be a string or a list of token ids")
    lp = _num(body, "logprobs", int, 0, MAX_LOGPROBS)
    if lp:
        sp.logprobs = lp
    _response_format(body.get("response_format"), sp)  # vLLM accepts it on completions too
    req.sampling.CopyFrom(sp)
    return HttpRequest(grpc=req, stream=common["stream"], include_usage=common["include_usage"],
                       logprobs=bool(lp), top_logprobs=lp or 0, model=common["model"],
                       return_token_ids=common["return_token_ids"])
