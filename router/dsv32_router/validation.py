"""Turning a public ``GenerateRequest`` into a fully resolved request, or a status.

Everything a client can get wrong is checked here, before any worker is
touched, and reported with the gRPC status the API promises and a message that
starts with the offending field's path (``sampling.top_p: ...``):

* ``INVALID_ARGUMENT`` — malformed or out-of-range fields;
* ``NOT_FOUND`` — a ``model`` that this cluster does not serve;
* ``OUT_OF_RANGE`` — a prompt that does not fit in the model's context.
"""

from __future__ import annotations

import json
import math
import random
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from dsv32_proto import serving_pb2
from dsv32_text.generation_config import GenerationConfig

MAX_STOP_STRINGS = 16
MAX_STOP_LEN = 256
MAX_LOGPROBS = 20
MAX_ID_LEN = 128
_ID_RE = re.compile(r"^[A-Za-z0-9._:@/+=-]+$")
ROLES = ("system", "user", "assistant", "tool", "developer")


class RequestError(Exception):
    """A request the router refuses; carries the gRPC status code."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def invalid(field_path: str, why: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"{field_path}: {why}")


@dataclass(frozen=True)
class ModelSpec:
    """What the router needs to know about the served model (read from the checkpoint, no torch)."""

    name: str
    max_model_len: int
    vocab_size: int
    numerics: str = "exact"
    eos_token_id: int = 1
    """The id whose sampling ends a request with ``stop``: config.json's, which is the one
    the engine's workers stop on, else generation_config.json's first."""
    default_temperature: float = GenerationConfig.temperature
    """For requests that set no temperature; from generation_config.json, as in the engine."""
    default_top_p: float = GenerationConfig.top_p
    """For requests that set no top_p; from generation_config.json, as in the engine."""
    default_max_tokens: int = 0
    """For requests that set no max_tokens; 0 = the rest of the context. Decode
    workers commit cache pages for prompt + max_tokens, so this bounds how many
    such requests a worker admits at once."""

    @classmethod
    def from_checkpoint(cls, model_dir: str, name: str | None = None, numerics: str = "exact",
                        default_max_tokens: int = 0) -> ModelSpec:
        d = Path(model_dir)
        cfg = json.loads((d / "config.json").read_text())
        gen = GenerationConfig.from_dir(d)
        eos = cfg.get("eos_token_id", gen.eos_token_ids or 1)
        return cls(name=name or d.resolve().name, max_model_len=int(cfg.get("max_position_embeddings", 163840)),
                   vocab_size=int(cfg["vocab_size"]), numerics=numerics,
                   eos_token_id=int(eos[0] if isinstance(eos, (list, tuple)) else eos),
                   default_temperature=gen.temperature, default_top_p=gen.top_p,
                   default_max_tokens=default_max_tokens)


@dataclass
class Sampling:
    """Resolved sampling parameters (mirrors ``worker.v1.WorkerSampling``)."""

    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    seed: int
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int = 0
    json_schema: str = ""
    """Structured output (empty = off): enforced by the workers' samplers."""
    grammar_replay: int = 0
    """Trailing prompt tokens that were generated under ``json_schema`` (set on a retry)."""
    skip_prefix_cache: bool = False
    """The request neither reuses cached prompt pages nor leaves its own in the workers' caches."""

    def remaining(self, generated: int) -> Sampling:
        """The same parameters for a continuation after ``generated`` tokens (a retry): the
        grammar of a structured answer replays the generated tokens, never restarts."""
        return Sampling(**{**self.__dict__, "max_tokens": self.max_tokens - generated,
                           "grammar_replay": generated if self.json_schema else 0})


@dataclass
class ResolvedRequest:
    request_id: str
    prompt_ids: list[int]
    sampling: Sampling
    session_id: str = ""
    seed_chosen_by_router: bool = False
    thinking: bool = False
    """Chat input in thinking mode: the output splits into reasoning and content."""
    tools: bool = False
    """Chat input with tools: DSML tool calls in the output are parsed."""
    forced_tool: str = ""
    """Named tool choice: the output (JSON arguments) is returned as one call of this function."""
    require_tool: bool = False
    """Tool choice "required": the output (a JSON list of {name, parameters}) is returned as calls."""


def _check_id(value: str, field_path: str) -> None:
    if value and (len(value) > MAX_ID_LEN or not _ID_RE.match(value)):
        raise invalid(field_path, f"at most {MAX_ID_LEN} characters of [A-Za-z0-9._:@/+=-]")


def _prompt_ids(req: serving_pb2.GenerateRequest, tokenizer, spec: ModelSpec) -> list[int]:
    kind = req.WhichOneof("input")
    if kind is None:
        raise invalid("prompt", "one of prompt, chat or token_ids is required")
    if kind == "prompt":
        if not req.prompt:
            raise invalid("prompt", "must not be empty")
        return tokenizer.encode(req.prompt)
    if kind == "token_ids":
        ids = list(req.token_ids.ids)
        if not ids:
            raise invalid("token_ids.ids", "must not be empty")
        for i, t in enumerate(ids):
            if t >= spec.vocab_size:
                raise invalid(f"token_ids.ids[{i}]", f"{t} is not a token id (vocabulary size {spec.vocab_size})")
        return ids
    return _chat_ids(req.chat, tokenizer)


def _chat_ids(chat: serving_pb2.ChatInput, tokenizer) -> list[int]:
    from dsv32_text.encoding import EncodingError, render_prompt_ids
    from .chat_json import check_tool_calls, check_tools

    if not chat.messages:
        raise invalid("chat.messages", "must not be empty")
    messages = []
    for i, m in enumerate(chat.messages):
        if m.role not in ROLES:
            raise invalid(f"chat.messages[{i}].role", f"must be one of {', '.join(ROLES)}, got {m.role!r}")
        msg = {"role": m.role, "content": m.content}
        if m.reasoning_content:
            msg["reasoning_content"] = m.reasoning_content
        if m.tool_calls_json:
            msg["tool_calls"] = check_tool_calls(m.tool_calls_json, f"chat.messages[{i}].tool_calls_json", invalid)
        messages.append(msg)
    tools = check_tools(chat.tools_json, "chat.tools_json", invalid) if chat.tools_json else None
    try:
        return render_prompt_ids(tokenizer, messages, "thinking" if chat.thinking else "chat", tools=tools)
    except (EncodingError, KeyError, TypeError, ValueError) as e:
        raise invalid("chat", str(e)) from None


def _sampling(sp: serving_pb2.SamplingParams, spec: ModelSpec, prompt_len: int) -> tuple[Sampling, bool]:
    temperature = sp.temperature if sp.HasField("temperature") else spec.default_temperature
    if not math.isfinite(temperature) or temperature < 0:
        raise invalid("sampling.temperature", f"must be a finite number >= 0 (0 = greedy), got {temperature}")
    top_p = sp.top_p if sp.HasField("top_p") else spec.default_top_p
    if not (0 < top_p <= 1):  # also rejects NaN
        raise invalid("sampling.top_p", f"must be in (0, 1], got {top_p}")
    top_k = sp.top_k if sp.HasField("top_k") else 0
    if top_k < 0:
        raise invalid("sampling.top_k", f"must be >= 0 (0 = off), got {top_k}")
    room = spec.max_model_len - prompt_len
    if sp.HasField("max_tokens"):
        max_tokens = sp.max_tokens
        if max_tokens < 1:
            raise invalid("sampling.max_tokens", "must be >= 1")
        if max_tokens > room:
            raise invalid("sampling.max_tokens", f"{max_tokens} does not fit: the prompt has {prompt_len} tokens "
                          f"and the context {spec.max_model_len}, so at most {room}")
    else:
        max_tokens = min(room, spec.default_max_tokens) if spec.default_max_tokens > 0 else room
    if sp.logprobs > MAX_LOGPROBS:
        raise invalid("sampling.logprobs", f"at most {MAX_LOGPROBS}, got {sp.logprobs}")
    if len(sp.stop) > MAX_STOP_STRINGS:
        raise invalid("sampling.stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(sp.stop)}")
    for i, s in enumerate(sp.stop):
        if not s or len(s) > MAX_STOP_LEN:
            raise invalid(f"sampling.stop[{i}]", f"must be 1 to {MAX_STOP_LEN} characters")
    for i, t in enumerate(sp.stop_token_ids):
        if t >= spec.vocab_size:
            raise invalid(f"sampling.stop_token_ids[{i}]", f"{t} is not a token id (vocabulary size {spec.vocab_size})")
    if sp.json_schema:
        from .chat_json import check_json_schema

        check_json_schema(sp.json_schema, "sampling.json_schema", invalid)
    chosen = not sp.HasField("seed")
    # An unseeded request still gets a seed: sampling is keyed by (seed,
    # position), so the prefill worker's first token, the decode worker's rest
    # and a retry on another pair are one reproducible stream.
    seed = random.getrandbits(63) if chosen else sp.seed
    return Sampling(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens, seed=seed,
                    stop=list(sp.stop), stop_token_ids=list(sp.stop_token_ids), ignore_eos=sp.ignore_eos,
                    logprobs=sp.logprobs, json_schema=sp.json_schema), chosen


def resolve(req: serving_pb2.GenerateRequest, tokenizer, spec: ModelSpec) -> ResolvedRequest:
    """Validate ``req`` and resolve defaults; raises :class:`RequestError`."""
    if req.model and req.model != spec.name:
        raise RequestError(grpc.StatusCode.NOT_FOUND, f"model: {req.model!r} is not served here (served: {spec.name!r})")
    _check_id(req.request_id, "request_id")
    _check_id(req.session_id, "session_id")
    prompt_ids = _prompt_ids(req, tokenizer, spec)
    if not prompt_ids:
        raise invalid(req.WhichOneof("input"), "tokenizes to no tokens")
    if len(prompt_ids) >= spec.max_model_len:
        raise RequestError(grpc.StatusCode.OUT_OF_RANGE,
                           f"{req.WhichOneof('input')}: {len(prompt_ids)} tokens do not fit in the model's context "
                           f"of {spec.max_model_len} tokens (with room for at least one generated token)")
    sampling, chosen = _sampling(req.sampling, spec, len(prompt_ids))
    sampling.skip_prefix_cache = req.skip_prefix_cache
    forced = req.chat.forced_tool if req.WhichOneof("input") == "chat" else ""
    required = req.WhichOneof("input") == "chat" and req.chat.require_tool
    if forced or required:
        from .chat_json import forced_tool_schema, required_tool_schema

        name = "chat.forced_tool" if forced else "chat.require_tool"
        if sampling.json_schema or (forced and required):
            raise invalid(name, "goes with neither sampling.json_schema nor the other tool choice")
        sampling.json_schema = forced_tool_schema(req.chat.tools_json, forced, invalid) if forced \
            else required_tool_schema(req.chat.tools_json, invalid)
    return ResolvedRequest(request_id=req.request_id or uuid.uuid4().hex, prompt_ids=prompt_ids, sampling=sampling,
                           session_id=req.session_id, seed_chosen_by_router=chosen,
                           # a constrained answer is JSON from its first token: no reasoning to split off
                           thinking=req.WhichOneof("input") == "chat" and req.chat.thinking
                           and not sampling.json_schema,
                           tools=req.WhichOneof("input") == "chat" and bool(req.chat.tools_json) and not forced
                           and not required, forced_tool=forced, require_tool=required)
