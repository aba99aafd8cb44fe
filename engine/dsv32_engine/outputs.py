"""Offline results, in the shape Python users already know (vLLM's ``RequestOutput``)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    """Per generated token: {token id: log-prob} holding the chosen token and the top-n."""
    finish_reason: str | None
    """``stop`` (EOS, a stop token or a stop string), ``length`` or ``abort``."""
    stop_reason: str | int | None = None
    cumulative_logprob: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True
    num_cached_tokens: int = 0
    """Prompt tokens whose cache came from the prefix cache (not computed for this request)."""
