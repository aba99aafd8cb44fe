"""Per-request sampling parameters, shaped like the ones Python users know (vLLM)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

MAX_LOGPROBS = 20
GREEDY_BELOW = 1e-5
"""A temperature below this samples greedily (argmax): dividing fp32 logits by less overflows."""


@dataclass
class SamplingParams:
    temperature: float | None = None
    """0 = greedy (as is anything below ``GREEDY_BELOW`` = 1e-5). ``None`` takes the checkpoint's
    generation_config.json (1.0 for DeepSeek-V3.2)."""
    top_p: float | None = None
    """Nucleus mass in (0, 1]. ``None`` takes generation_config.json (0.95)."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 or -1 = off."""
    max_tokens: int = 16
    """Tokens to generate at most (>= 1)."""
    seed: int | None = None
    """Per-request seed; the same seed gives the same tokens on any worker."""
    stop: list[str] = field(default_factory=list)
    """Stop strings; the output is cut before the first one."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Extra token ids that end the request (kept in the output, like EOS)."""
    ignore_eos: bool = False
    """Keep generating past EOS (for benchmarks with exact lengths)."""
    logprobs: int | None = None
    """Return, per generated token, the chosen token's log-prob and the top-n (0..20)."""
    json_schema: str | None = None
    """Structured output: the answer is JSON valid against this schema (text), enforced while
    sampling (:mod:`dsv32_engine.grammar`); ``'{"type": "object"}'`` = any JSON object."""
    grammar_replay: int = 0
    """With ``json_schema``: the prompt's last n tokens were generated under it (a retry); the
    grammar consumes them first."""
    skip_prefix_cache: bool = False
    """Neither reuse cached prompt pages nor leave this request's pages in the prefix cache."""

    def validate(self, vocab_size: int | None = None) -> "SamplingParams":
        """Raise ``ValueError`` naming the offending field; returns self."""
        def bad(name: str, why: str):
            raise ValueError(f"sampling parameter {name} {why}")

        t = self.temperature
        if t is not None and (not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0):
            bad("temperature", f"must be a finite number >= 0, got {t!r}")
        p = self.top_p
        if p is not None and (not isinstance(p, (int, float)) or not math.isfinite(p) or not 0 < p <= 1):
            bad("top_p", f"must be in (0, 1], got {p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            bad("top_k", f"must be an integer >= -1 (0 or -1 = off), got {self.top_k!r}")
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            bad("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            bad("seed", f"must be a non-negative integer, got {self.seed!r}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            bad("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "must hold non-empty strings")
        for tid in self.stop_token_ids:
            if not isinstance(tid, int) or tid < 0 or (vocab_size is not None and tid >= vocab_size):
                bad("stop_token_ids", f"holds an invalid token id {tid!r}")
        return self

    def with_defaults(self, defaults: dict) -> "SamplingParams":
        """Fill ``None`` fields from generation_config.json values."""
        return replace(self,
                       temperature=self.temperature if self.temperature is not None else float(defaults.get("temperature", 1.0)),
                       top_p=self.top_p if self.top_p is not None else float(defaults.get("top_p", 1.0)),
                       stop=list(self.stop), stop_token_ids=list(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        """Temperature below ``GREEDY_BELOW`` (logits / 1e-45 overflow to inf, then NaN probabilities)."""
        return self.temperature is not None and self.temperature < GREEDY_BELOW
