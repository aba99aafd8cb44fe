"""``dsv32-serve bench frontends``: the cost of the OpenAI HTTP front and of the JSON-schema mask.

One ``up --http-port 0`` cluster (1 prefill + 1 decode) on the given checkpoint (the tiny
one by default), then, in one run:

1. the same closed-loop load (``loadtest``'s synthetic workload) through gRPC and
   through HTTP (``/v1/completions`` streamed, read with aiohttp), alternated
   ``--rounds`` times: median TTFT and TPOT of each front and their ratio; then
   single requests alternating the fronts request by request (TTFT);
2. decode speed with a JSON-schema constraint vs none: ``--batch`` concurrent
   gRPC requests of ``--max-tokens`` tokens, per-request decode tokens/s
   (tokens after the first / time after the first), constrained and not.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# A schema whose answers run long with random weights: one free string field.
LONG_SCHEMA = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint (default: the tiny one, made if missing)")
    p.add_argument("--num-prompts", type=int, default=24)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch", type=int, default=8, help="concurrent requests of the grammar comparison")
    p.add_argument("--max-tokens", type=int, default=48)


def _fronts(a, grpc_target: str, http_target: str) -> dict:
    from dsv32_loadtest import Arrival, SyntheticWorkload, run_load

    got = {"grpc": {"ttft_ms": [], "tpot_ms": []}, "openai": {"ttft_ms": [], "tpot_ms": []}}
    for _ in range(a.rounds):
        for backend, target in (("grpc", grpc_target), ("openai", http_target)):
            report = run_load(target, SyntheticWorkload(input_len=a.input_len, output_len=a.output_len),
                              Arrival("closed", concurrency=a.concurrency), num_prompts=a.num_prompts,
                              request_timeout_s=300, max_duration_s=600, backend=backend)
            run = report.runs[0]
            if run.summary(None)["failed"]:
                raise SystemExit(f"bench frontends: {backend} requests failed: {[r.error for r in run.results][:3]}")
            for r in run.results:
                got[backend]["ttft_ms"].append(r.ttft_s * 1e3)
                got[backend]["tpot_ms"].append(r.tpot_s * 1e3)
    return {b: {k: statistics.median(v) for k, v in m.items()} for b, m in got.items()}


async def _interleaved(grpc_target: str, http_target: str, n: int, input_len: int) -> dict[str, float]:
    """TTFT of single requests sent one at a time, alternating the fronts request by request, so both
    see the same background load (a fairer pairing than whole runs on shared cores)."""
    from dsv32_loadtest._api import serving_pb2 as pb
    from dsv32_loadtest.client import GenerationClient
    from dsv32_loadtest.metrics import RequestResult
    from dsv32_loadtest.openai_client import OpenAIClient

    got: dict[str, list[float]] = {"grpc": [], "openai": []}
    async with OpenAIClient(http_target) as h, GenerationClient(grpc_target, 1) as g:
        for i in range(n):
            for name, client in (("grpc", g), ("openai", h)) if i % 2 else (("openai", h), ("grpc", g)):
                ids = [100 + (i * 7 + k) % 5000 for k in range(input_len)]
                req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids),
                                         sampling=pb.SamplingParams(max_tokens=4, ignore_eos=True, temperature=0))
                r = RequestResult(index=i, kind="probe", session_id="", turn=0, request_id="", input_tokens=input_len,
                                  requested_output_tokens=4, scheduled_s=None)
                await client.generate(req, r, time.perf_counter(), 120)
                if not r.ok:
                    raise SystemExit(f"bench frontends: {name}: {r.status} {r.error}")
                got[name].append(r.chunk_times_s[0] * 1e3)
    return {k: statistics.median(v) for k, v in got.items()}


def _decode_rate(target: str, batch: int, max_tokens: int, schema: dict | None) -> tuple[float, float]:
    from dsv32_router.client import generate

    def one(seed: int):
        kw = {"json_schema": json.dumps(schema)} if schema else {"ignore_eos": True}
        out = generate(target, "Describe the weather in JSON.", temperature=1.0, seed=seed, max_tokens=max_tokens,
                       timeout=300, **kw)
        u = out.usage
        n = u.completion_tokens
        return (n - 1) / max(u.e2e_s - u.time_to_first_token_s, 1e-9) if n > 1 else None, n

    with ThreadPoolExecutor(batch) as pool:
        rows = list(pool.map(one, range(batch)))
    rates = [r for r, _ in rows if r is not None]
    return statistics.median(rates), statistics.mean(n for _, n in rows)


def run(a: argparse.Namespace) -> int:
    from .up import local_cluster

    log_dir = Path(tempfile.mkdtemp(prefix="dsv32-bench-frontends-"))
    with local_cluster(a.model, prefill=1, decode=1, port=0, http_port=0, log_dir=str(log_dir),
                       num_pages=256) as target:
        http = "http://" + (log_dir / "router.ready.http").read_text().strip() + "/v1"
        t0 = time.monotonic()
        import asyncio

        single = asyncio.run(_interleaved(target, http, a.num_prompts, a.input_len))
        fronts = _fronts(a, target, http)
        _decode_rate(target, 2, 8, LONG_SCHEMA)  # warm the grammar tokenizer of the workers
        free = _decode_rate(target, a.batch, a.max_tokens, None)
        constrained = _decode_rate(target, a.batch, a.max_tokens, LONG_SCHEMA)
        g, h = fronts["grpc"], fronts["openai"]
        print(f"fronts: {a.rounds} x {a.num_prompts} requests each, input {a.input_len}, output {a.output_len}, "
              f"concurrency {a.concurrency}")
        for key, name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT")):
            print(f"  {name} p50 ms  gRPC {g[key]:.2f}  HTTP {h[key]:.2f}  HTTP/gRPC {h[key] / g[key]:.3f}")
        print(f"  single requests, fronts alternated request by request ({a.num_prompts} each): TTFT p50 ms  "
              f"gRPC {single['grpc']:.1f}  HTTP {single['openai']:.1f}  "
              f"HTTP/gRPC {single['openai'] / single['grpc']:.3f}")
        print(f"grammar: {a.batch} concurrent requests, max {a.max_tokens} tokens")
        print(f"  decode tok/s per request p50  none {free[0]:.1f} (mean {free[1]:.0f} tokens)  "
              f"json_schema {constrained[0]:.1f} (mean {constrained[1]:.0f} tokens)  "
              f"ratio {constrained[0] / free[0]:.3f}")
        print(f"({time.monotonic() - t0:.0f} s)")
    return 0
