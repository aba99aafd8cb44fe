"""What is sent: every workload is a list of conversations of one or more turns.

A single request is a one-turn conversation. The prompt of turn ``t`` is
``prefix + user_1 + reply_1 + … + user_t`` where ``reply_i`` are the token ids
the server actually streamed back, so multi-turn sessions grow their history
the way a chat does and share their prefix with every earlier turn. Output
lengths are exact because requests set ``ignore_eos`` and ``max_tokens``.

* ``SyntheticWorkload`` — fixed or ranged lengths (vLLM's random dataset:
  uniform integers in ``[L·(1−r), L·(1+r)]``).
* ``MixedWorkload`` — long prompts with short answers mixed with short chats,
  labelled ``long`` and ``chat`` (the disaggregated-vs-colocated workload).
* ``SessionWorkload`` — multi-turn sessions over a shared system prefix.
* ``TraceWorkload`` — Mooncake-style trace replay, with its own timestamps.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np

from .tokens import TokenSource
from .trace import read_trace


@dataclass
class Turn:
    user_ids: list[int]
    output_len: int


@dataclass
class Conversation:
    index: int
    kind: str
    turns: list[Turn]
    prefix_ids: list[int] = field(default_factory=list)
    session_id: str = ""           # sent as GenerateRequest.session_id when set
    arrival_s: float | None = None  # a trace's own send time

    def prompt_ids(self, turn: int, replies: Sequence[Sequence[int]]) -> list[int]:
        ids = list(self.prefix_ids)
        for t in range(turn):
            ids += self.turns[t].user_ids
            ids += replies[t]
        return ids + self.turns[turn].user_ids


class Workload(Protocol):
    think_time_s: float

    def build(self, n: int, tokens: TokenSource) -> list[Conversation]:
        """Conversations holding ``n`` requests in all."""

    def describe(self) -> dict[str, Any]:
        """The parameters, for the report."""


def ranged_lengths(length: int, range_ratio: float, n: int, rng: np.random.Generator) -> np.ndarray:
    lo = max(1, int(length * (1 - range_ratio)))
    hi = max(lo, int(length * (1 + range_ratio)))
    return rng.integers(lo, hi + 1, size=n)


def _check_lengths(**lengths: int) -> None:
    for name, v in lengths.items():
        if v < 1:
            raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {v}")


def _check_ratio(r: float) -> None:
    if not 0 <= r < 1:
        raise ValueError(f"range-ratio must be in [0, 1), got {r}")


@dataclass(frozen=True)
class SyntheticWorkload:
    input_len: int = 512
    output_len: int = 128
    range_ratio: float = 0.0
    seed: int = 0
    think_time_s: float = 0.0

    def __post_init__(self) -> None:
        _check_lengths(input_len=self.input_len, output_len=self.output_len)
        _check_ratio(self.range_ratio)

    def build(self, n: int, tokens: TokenSource) -> list[Conversation]:
        rng = np.random.default_rng([self.seed, 1])
        ins = ranged_lengths(self.input_len, self.range_ratio, n, rng)
        outs = ranged_lengths(self.output_len, self.range_ratio, n, rng)
        return [Conversation(i, "synthetic", [Turn(tokens.random(int(a), rng), int(b))])
                for i, (a, b) in enumerate(zip(ins, outs))]

    def describe(self) -> dict[str, Any]:
        return {"workload": "synthetic", **asdict(self)}


@dataclass(frozen=True)
class MixedWorkload:
    input_len: int = 128          # chats
    output_len: int = 128
    long_input_len: int = 2048    # long prompts, short answers
    long_output_len: int = 16
    long_fraction: float = 0.25
    range_ratio: float = 0.0
    seed: int = 0
    think_time_s: float = 0.0

    def __post_init__(self) -> None:
        _check_lengths(input_len=self.input_len, output_len=self.output_len,
                       long_input_len=self.long_input_len, long_output_len=self.long_output_len)
        _check_ratio(self.range_ratio)
        if not 0 <= self.long_fraction <= 1:
            raise ValueError(f"long-fraction must be in [0, 1], got {self.long_fraction}")

    def build(self, n: int, tokens: TokenSource) -> list[Conversation]:
        rng = np.random.default_rng([self.seed, 2])
        is_long = np.zeros(n, dtype=bool)
        is_long[rng.permutation(n)[: round(n * self.long_fraction)]] = True  # an exact mix
        convs = []
        for i, long in enumerate(is_long):
            a, b = (self.long_input_len, self.long_output_len) if long else (self.input_len, self.output_len)
            a = int(ranged_lengths(a, self.range_ratio, 1, rng)[0])
            b = int(ranged_lengths(b, self.range_ratio, 1, rng)[0])
            convs.append(Conversation(i, "long" if long else "chat", [Turn(tokens.random(a, rng), b)]))
        return convs

    def describe(self) -> dict[str, Any]:
        return {"workload": "mixed", **asdict(self)}


@dataclass(frozen=True)
class SessionWorkload:
    turns: int = 4
    input_len: int = 128          # new user tokens per turn
    output_len: int = 64
    shared_prefix_len: int = 256  # system prompt shared by every session of a group
    prefix_groups: int = 1
    range_ratio: float = 0.0
    think_time_s: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        _check_lengths(turns=self.turns, input_len=self.input_len, output_len=self.output_len,
                       prefix_groups=self.prefix_groups)
        _check_ratio(self.range_ratio)
        if self.shared_prefix_len < 0 or self.think_time_s < 0:
            raise ValueError("shared-prefix-len and think-time must be >= 0")

    def build(self, n: int, tokens: TokenSource) -> list[Conversation]:
        rng = np.random.default_rng([self.seed, 3])
        prefixes = [tokens.block(g, self.shared_prefix_len) for g in range(self.prefix_groups)]
        convs = []
        for s in range(math.ceil(n / self.turns)):
            k = min(self.turns, n - s * self.turns)  # the last session may be shorter
            ins = ranged_lengths(self.input_len, self.range_ratio, k, rng)
            outs = ranged_lengths(self.output_len, self.range_ratio, k, rng)
            turns = [Turn(tokens.random(int(a), rng), int(b)) for a, b in zip(ins, outs)]
            convs.append(Conversation(s, "session", turns, prefixes[s % self.prefix_groups],
                                      session_id=f"s{s}"))
        return convs

    def describe(self) -> dict[str, Any]:
        return {"workload": "sessions", **asdict(self)}


@dataclass(frozen=True)
class TraceWorkload:
    path: str
    block_size: int = 512         # tokens per hash id (Mooncake: 512)
    time_scale: float = 1.0       # 2 = replay twice as fast
    seed: int = 0
    think_time_s: float = 0.0

    def __post_init__(self) -> None:
        _check_lengths(trace_block_size=self.block_size)
        if not self.time_scale > 0:
            raise ValueError(f"trace-time-scale must be > 0, got {self.time_scale}")
        # Parsed up front so that a malformed trace is reported before anything is sent.
        object.__setattr__(self, "_entries", read_trace(self.path))

    def build(self, n: int | None, tokens: TokenSource) -> list[Conversation]:
        entries = sorted(self._entries[:n] if n is not None else self._entries, key=lambda e: e.timestamp_ms)
        t0 = entries[0].timestamp_ms
        rng = np.random.default_rng([self.seed, 4])
        convs = []
        for i, e in enumerate(entries):  # the first n lines of the file, in timestamp order
            ids = [t for h in e.hash_ids for t in tokens.block(h, self.block_size)][: e.input_length]
            ids += tokens.random(e.input_length - len(ids), rng)
            convs.append(Conversation(i, "trace", [Turn(ids, e.output_length)], session_id=e.session_id,
                                      arrival_s=(e.timestamp_ms - t0) / 1000.0 / self.time_scale))
        return convs

    def describe(self) -> dict[str, Any]:
        return {"workload": "trace", **asdict(self)}
