"""Serving metrics, defined exactly as vLLM's ``benchmark_serving`` defines them.

Per request (only successful requests enter the latency statistics):

* TTFT — from sending the request to the first streamed chunk that carries a token;
* ITL — the gap between consecutive token-bearing chunks (one value per chunk
  after the first, whatever the number of tokens in the chunk);
* E2E — from sending the request to the end of the stream;
* TPOT — ``(E2E − TTFT) / (output tokens − 1)``, defined for ≥ 2 output tokens.

Beside the timings each request keeps the server's ``Usage`` (prompt, completion
and prefix-cached prompt tokens) and ``output_hash``, a digest of the token ids it
received: two greedy runs of one workload are compared request by request with it.
Multi-turn workloads also get per-turn statistics (:func:`summarize_by_turn`).

Per run, over ``duration`` = run start → last request finished:

* request / input-token / output-token throughput = completed (resp. their
  tokens) / duration;
* goodput = requests/s that succeeded *and* met every SLO given
  (``value <= slo``; a request with one output token has TPOT 0 for this test).

Statistics: mean, median, std, p90, p99 (``numpy.percentile``, linear
interpolation, as vLLM), reported in milliseconds.
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

OK = "OK"
# Harness-side error classes, beside the gRPC status code names.
EMPTY_STREAM = "EMPTY_STREAM"      # the call ended OK but streamed no token
FINISH_ABORT = "FINISH_ABORT"      # the server finished the stream with finish_reason "abort"
CLIENT_ERROR = "CLIENT_ERROR"      # an exception in the harness itself (a bug: reported, not hidden)
PERCENTILES = (90, 99)


@dataclass
class RequestResult:
    """What was measured for one request; times are seconds from ``start_s``."""

    index: int
    kind: str = "synthetic"
    session_id: str = ""
    turn: int = 0
    request_id: str = ""
    input_tokens: int = 0
    requested_output_tokens: int = 0
    scheduled_s: float | None = None   # planned send time from run start (open loop, first turns)
    start_s: float | None = None       # actual send time from run start
    chunk_times_s: list[float] = field(default_factory=list)  # token-bearing chunks, from start_s
    chunk_tokens: list[int] = field(default_factory=list)     # tokens in each of those chunks
    end_s: float | None = None         # end of the stream (or the error), from start_s
    status: str = "PENDING"
    error: str = ""
    finish_reason: str = ""
    server_prompt_tokens: int | None = None
    server_completion_tokens: int | None = None
    server_ttft_s: float | None = None
    server_e2e_s: float | None = None
    cached_tokens: int | None = None   # Usage.cached_tokens: prompt tokens served from a prefix cache
    output_hash: str = ""              # output_digest(reply_ids) of a completed request
    prefill_worker: str = ""
    decode_worker: str = ""
    reply_ids: list[int] = field(default_factory=list, repr=False)  # for session history; not reported

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def output_tokens(self) -> int:
        """Tokens the client received (the server's own count is kept beside it)."""
        return int(sum(self.chunk_tokens))

    @property
    def ttft_s(self) -> float | None:
        return self.chunk_times_s[0] if self.chunk_times_s else None

    @property
    def e2e_s(self) -> float | None:
        return self.end_s if self.ok else None

    @property
    def itl_s(self) -> list[float]:
        t = self.chunk_times_s
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.output_tokens < 2 or self.ttft_s is None:
            return None
        return (self.end_s - self.ttft_s) / (self.output_tokens - 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["reply_ids"]
        d["chunk_times_s"] = [round(t, 6) for t in self.chunk_times_s]  # µs: enough, and 3x smaller
        d.update(ttft_s=self.ttft_s, tpot_s=self.tpot_s, e2e_s=self.e2e_s, output_tokens=self.output_tokens)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RequestResult":
        names = cls.__dataclass_fields__.keys()
        return cls(**{k: v for k, v in d.items() if k in names})


def output_digest(ids: Sequence[int]) -> str:
    """16 hex digits standing for a request's output token ids (equal ids ⇔ equal digests, in practice)."""
    return hashlib.blake2b(array("I", ids).tobytes(), digest_size=8).hexdigest()


@dataclass(frozen=True)
class Slo:
    """Service-level objectives in milliseconds; ``None`` = not part of goodput."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    def __post_init__(self) -> None:
        for name, v in asdict(self).items():
            if v is not None and not v > 0:
                raise ValueError(f"SLO {name} must be > 0 ms, got {v}")

    @classmethod
    def parse(cls, text: str) -> "Slo":
        """``"ttft=500,tpot=50,e2e=10000"`` (milliseconds; any subset)."""
        values: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, val = part.partition("=")
            key = key.strip().lower()
            if not sep or key not in ("ttft", "tpot", "e2e"):
                raise ValueError(f"bad SLO term {part!r}: expected ttft=MS, tpot=MS or e2e=MS")
            try:
                values[f"{key}_ms"] = float(val)
            except ValueError:
                raise ValueError(f"bad SLO value in {part!r}: not a number of milliseconds") from None
        if not values:
            raise ValueError("empty SLO: expected e.g. ttft=500,tpot=50")
        return cls(**values)

    @property
    def empty(self) -> bool:
        return self.ttft_ms is None and self.tpot_ms is None and self.e2e_ms is None

    def met_by(self, r: RequestResult) -> bool:
        if not r.ok:
            return False
        tpot = r.tpot_s if r.tpot_s is not None else 0.0
        checks = ((self.ttft_ms, r.ttft_s), (self.tpot_ms, tpot), (self.e2e_ms, r.e2e_s))
        return all(slo is None or (v is not None and v * 1000.0 <= slo) for slo, v in checks)


def describe(values_s: Sequence[float]) -> dict[str, float | int | None]:
    """mean/median/std/p90/p99/min/max in ms of values given in seconds."""
    out: dict[str, float | int | None] = {"count": len(values_s)}
    keys = ["mean", "median", "std", *(f"p{p}" for p in PERCENTILES), "min", "max"]
    if not values_s:
        return {**out, **dict.fromkeys(keys)}
    a = np.asarray(values_s, dtype=np.float64) * 1000.0
    stats = [a.mean(), np.median(a), a.std(), *np.percentile(a, PERCENTILES), a.min(), a.max()]
    return {**out, **{k: float(v) for k, v in zip(keys, stats)}}


def error_counts(results: Iterable[RequestResult]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in results:
        if not r.ok:
            counts[r.status] = counts.get(r.status, 0) + 1
    return dict(sorted(counts.items()))


def summarize(results: Sequence[RequestResult], duration_s: float, slo: Slo | None = None,
              planned: int | None = None) -> dict[str, Any]:
    """The run's summary: counts, errors by class, throughputs, goodput, statistics."""
    done = [r for r in results if r.ok]

    def per_s(x: float) -> float | None:
        return x / duration_s if duration_s > 0 else None

    n_in = sum(r.input_tokens for r in done)
    cached = [r.cached_tokens for r in done if r.cached_tokens is not None]
    n_out = sum(r.output_tokens for r in done)
    planned = len(results) if planned is None else planned
    s: dict[str, Any] = {
        "planned": planned,
        "sent": len(results),
        "not_sent": planned - len(results),
        "completed": len(done),
        "failed": len(results) - len(done),
        "errors": error_counts(results),
        "duration_s": duration_s,
        "total_input_tokens": n_in,
        "total_output_tokens": n_out,
        # prompt tokens the server took from a prefix cache (None: no Usage reported them)
        "total_cached_tokens": sum(cached) if cached else None,
        "request_throughput": per_s(len(done)),
        "input_throughput": per_s(n_in),
        "output_throughput": per_s(n_out),
        "total_token_throughput": per_s(n_in + n_out),
        # Consistency checks a live end-to-end test can assert on.
        "output_len_mismatches": sum(r.output_tokens != r.requested_output_tokens for r in done),
        "server_token_count_mismatches": sum(
            r.server_completion_tokens is not None and r.server_completion_tokens != r.output_tokens
            for r in done),
        "ttft_ms": describe([r.ttft_s for r in done if r.ttft_s is not None]),
        "tpot_ms": describe([r.tpot_s for r in done if r.tpot_s is not None]),
        "itl_ms": describe([x for r in done for x in r.itl_s]),
        "e2e_ms": describe([r.e2e_s for r in done]),
        # How late requests left against their arrival schedule: the harness's own
        # saturation (or the in-flight cap) shows here, not in the server's numbers.
        "send_lag_ms": describe([r.start_s - r.scheduled_s for r in results
                                 if r.scheduled_s is not None and r.start_s is not None]),
    }
    if slo is not None and not slo.empty:
        good = sum(slo.met_by(r) for r in done)
        s.update(good_requests=good, goodput=per_s(good))
    else:
        s.update(good_requests=None, goodput=None)
    return s


def summarize_by_turn(results: Sequence[RequestResult]) -> list[dict[str, Any]]:
    """One entry per turn index of a multi-turn workload (``turn`` 0 = a session's first), in order; [] when
    every request is a first turn. Latencies in ms as in :func:`summarize`."""
    turns = sorted({r.turn for r in results})
    if turns in ([], [0]):
        return []
    out = []
    for t in turns:
        sent = [r for r in results if r.turn == t]
        done = [r for r in sent if r.ok]
        cached = [r.cached_tokens for r in done if r.cached_tokens is not None]
        out.append({
            "turn": t,
            "sent": len(sent),
            "completed": len(done),
            "mean_input_tokens": sum(r.input_tokens for r in done) / len(done) if done else None,
            "mean_cached_tokens": sum(cached) / len(cached) if cached else None,
            "ttft_ms": describe([r.ttft_s for r in done if r.ttft_s is not None]),
            "e2e_ms": describe([r.e2e_s for r in done]),
        })
    return out
