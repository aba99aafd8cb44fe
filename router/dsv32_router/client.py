"""A small synchronous client of the public API (used by ``dsv32-serve generate --target``).

    for delta in stream_generate("127.0.0.1:50051", "Hello", max_tokens=32, temperature=0):
        print(delta, end="", flush=True)

``stream_generate`` yields the text deltas; ``stream_responses`` yields the
``dsv32.serving.v1.GenerateResponse`` messages themselves (``.text``,
``.token_ids``, ``.logprobs``; the last one has ``.finish_reason`` and
``.usage``); ``generate`` collects a whole answer. Errors raise
:class:`GenerateError` with the gRPC status and the server's message.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import grpc

from dsv32_proto import serving_pb2, serving_pb2_grpc

_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "max_tokens", "seed", "stop", "stop_token_ids", "ignore_eos",
                    "logprobs", "json_schema")


class GenerateError(RuntimeError):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


def build_request(prompt: str | Sequence[int] | None = None, *, messages: Sequence[dict] | None = None,
                  thinking: bool = False, model: str = "", session_id: str = "", request_id: str = "",
                  tools: Sequence[dict] | None = None, skip_prefix_cache: bool = False,
                  **sampling) -> serving_pb2.GenerateRequest:
    """A ``GenerateRequest`` from a text prompt, token ids, or chat ``messages`` (OpenAI-style dicts:
    role/content, and reasoning_content/tool_calls on assistant turns); ``tools``: OpenAI tools."""
    unknown = set(sampling) - set(_SAMPLING_FIELDS)
    if unknown:
        raise TypeError(f"unknown sampling parameter(s): {', '.join(sorted(unknown))}")
    sp = serving_pb2.SamplingParams(**{k: v for k, v in sampling.items() if v is not None})
    req = serving_pb2.GenerateRequest(model=model, sampling=sp, session_id=session_id or "",
                                      request_id=request_id or "", skip_prefix_cache=skip_prefix_cache)
    if messages is not None:
        req.chat.CopyFrom(serving_pb2.ChatInput(thinking=thinking, tools_json=json.dumps(tools) if tools else "",
                                                messages=[
            serving_pb2.ChatMessage(role=m["role"], content=m.get("content") or "",
                                    reasoning_content=m.get("reasoning_content") or "",
                                    tool_calls_json=json.dumps(m["tool_calls"]) if m.get("tool_calls") else "")
            for m in messages]))
    elif isinstance(prompt, str):
        req.prompt = prompt
    elif prompt is not None:
        req.token_ids.CopyFrom(serving_pb2.TokenIds(ids=list(prompt)))
    return req


def stream_responses(target: str, prompt: str | Sequence[int] | None = None, *, timeout: float | None = None,
                     channel: grpc.Channel | None = None, **params) -> Iterator[serving_pb2.GenerateResponse]:
    """Stream one generation's messages from the router at ``target`` (``HOST:PORT``).

    ``params``: the sampling fields of ``SamplingParams`` (``temperature``,
    ``max_tokens``, ``stop``...), plus ``session_id``, ``request_id``,
    ``model``, ``messages`` / ``thinking`` (chat input instead of ``prompt``).
    ``timeout`` is the request's deadline in seconds. Closing the iterator
    early cancels the request (the cluster frees its pages).
    """
    req = build_request(prompt, **params)
    own = channel is None
    ch = connect(target) if own else channel
    call = serving_pb2_grpc.GenerationStub(ch).Generate(req, timeout=timeout, metadata=credentials())
    try:
        for msg in call:
            yield msg
    except grpc.RpcError as e:
        raise GenerateError(e.code(), e.details()) from None
    finally:
        call.cancel()
        if own:
            ch.close()


def stream_generate(target: str, prompt: str | Sequence[int] | None = None, **params) -> Iterator[str]:
    """Stream one generation's text deltas (same arguments as :func:`stream_responses`)."""
    for msg in stream_responses(target, prompt, **params):
        if msg.text:
            yield msg.text


@dataclass
class Completion:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[serving_pb2.Logprobs] = field(default_factory=list)
    finish_reason: str = ""
    usage: serving_pb2.Usage | None = None
    prefill_worker: str = ""
    decode_worker: str = ""
    request_id: str = ""
    messages: int = 0
    reasoning_content: str = ""
    tool_calls: list[dict] = field(default_factory=list)
    """OpenAI-style: ``{"id", "type": "function", "function": {"name", "arguments"}}``."""


def generate(target: str, prompt: str | Sequence[int] | None = None, **params) -> Completion:
    """Collect a whole generation (same arguments as :func:`stream_responses`)."""
    out = Completion()
    for msg in stream_responses(target, prompt, **params):
        out.messages += 1
        out.text += msg.text
        out.reasoning_content += msg.reasoning_content
        for c in msg.tool_calls:
            if c.index == len(out.tool_calls):
                out.tool_calls.append({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": ""}})
            out.tool_calls[c.index]["function"]["arguments"] += c.arguments
        out.token_ids += msg.token_ids
        out.logprobs += msg.logprobs
        out.request_id = out.request_id or msg.request_id
        out.prefill_worker = out.prefill_worker or msg.prefill_worker
        out.decode_worker = out.decode_worker or msg.decode_worker
        if msg.finish_reason:
            out.finish_reason, out.usage = msg.finish_reason, msg.usage
    return out


def list_models(target: str, timeout: float = 5.0) -> list[serving_pb2.ModelInfo]:
    with connect(target) as ch:
        return list(serving_pb2_grpc.GenerationStub(ch).ListModels(serving_pb2.ListModelsRequest(),
                                                                    timeout=timeout, metadata=credentials()).models)


def end_session(target: str, session_id: str, timeout: float = 10.0) -> serving_pb2.EndSessionResponse:
    """End a session now: its record goes and the workers free the cached pages only it used."""
    with connect(target) as ch:
        return serving_pb2_grpc.GenerationStub(ch).EndSession(serving_pb2.EndSessionRequest(session_id=session_id),
                                                              timeout=timeout, metadata=credentials())


def credentials(token: str | None = None) -> list[tuple[str, str]]:
    """The call metadata a router with an API token wants: ``token``, else ``$DSV32_API_TOKEN``."""
    token = token if token is not None else os.environ.get("DSV32_API_TOKEN", "")
    return [("authorization", f"Bearer {token}")] if token else []


def connect(target: str) -> grpc.Channel:
    """A channel to the router: TLS when ``$DSV32_TLS_CA`` names the CA's PEM file, else plain."""
    ca = os.environ.get("DSV32_TLS_CA", "")
    if not ca:
        return grpc.insecure_channel(target)
    with open(ca, "rb") as f:
        return grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=f.read()))
