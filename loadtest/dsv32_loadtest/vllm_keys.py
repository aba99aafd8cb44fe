"""The flat keys of ``vllm bench serve``'s result JSON, so that its dashboards and scripts read ours.

Per run (and at the top of ``report.json`` for the first run: vLLM writes one file per rate)::

    completed, failed, duration, total_input_tokens, total_output_tokens,
    request_throughput, request_goodput, output_throughput, total_token_throughput,
    mean_ttft_ms, median_ttft_ms, std_ttft_ms, p99_ttft_ms, ...   (ttft, tpot, itl, e2el)

``--metric-percentiles 50,90,99`` chooses the ``pNN_`` keys (vLLM's default: 99); percentiles
are ``numpy.percentile`` (linear), as vLLM's. ``p99.9`` is written ``p99.9_ttft_ms`` as vLLM does.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .metrics import RequestResult

METRICS = ("ttft", "tpot", "itl", "e2el")


def parse_percentiles(text: str) -> list[float]:
    """``"50,90,99"`` → ``[50.0, 90.0, 99.0]`` (each in (0, 100])."""
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--metric-percentiles: numbers separated by commas, got {text!r}") from None
    if not out or any(not 0 < p <= 100 for p in out):
        raise ValueError(f"--metric-percentiles: each in (0, 100], got {text!r}")
    return out


def _name(p: float) -> str:
    return f"p{int(p)}" if float(p).is_integer() else f"p{p:g}"


def _values_ms(results: Sequence[RequestResult], metric: str) -> list[float]:
    done = [r for r in results if r.ok]
    if metric == "ttft":
        v = [r.ttft_s for r in done if r.ttft_s is not None]
    elif metric == "tpot":
        v = [r.tpot_s for r in done if r.tpot_s is not None]
    elif metric == "itl":
        v = [x for r in done for x in r.itl_s]
    else:
        v = [r.e2e_s for r in done if r.e2e_s is not None]
    return [x * 1000.0 for x in v]


def flat_keys(results: Sequence[RequestResult], summary: dict[str, Any],
              percentiles: Sequence[float] = (99.0,)) -> dict[str, Any]:
    out: dict[str, Any] = {
        "completed": summary["completed"], "failed": summary["failed"], "duration": summary["duration_s"],
        "total_input_tokens": summary["total_input_tokens"], "total_output_tokens": summary["total_output_tokens"],
        "request_throughput": summary["request_throughput"], "request_goodput": summary["goodput"],
        "output_throughput": summary["output_throughput"],
        "total_token_throughput": summary["total_token_throughput"],
    }
    for metric in METRICS:
        v = np.asarray(_values_ms(results, metric), dtype=np.float64)
        stats = {"mean": v.mean(), "median": np.median(v), "std": v.std()} if v.size else dict.fromkeys(
            ("mean", "median", "std"))
        for p in percentiles:
            stats[_name(p)] = np.percentile(v, p) if v.size else None
        out.update({f"{k}_{metric}_ms": (None if x is None else float(x)) for k, x in stats.items()})
    return out
