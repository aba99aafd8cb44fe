"""``dsv32-serve bench engine | kernels | transfer | ep | weights``: side-by-side benchmarks that report ratios."""

from __future__ import annotations

import argparse
import importlib

BENCHES = {
    "engine": ("dsv32_engine.bench_engine", "decode tokens/s vs transformers, DSA vs dense step, cache bytes"),
    "kernels": ("dsv32_kernels.bench", "Triton kernels vs their torch twins and the H200 roofline"),
    "ep": ("dsv32_engine.bench_ep", "expert parallelism at EP = 1, 2, 4: step phases, bytes moved vs minimum, "
                                    "resident weights per rank"),
    "weights": ("dsv32_engine.bench_weights", "an FP8 checkpoint as stored vs dequantised at load: resident bytes "
                                              "(and at DeepSeek-V3.2's shapes), decode tokens/s"),
    "transfer": ("dsv32_engine.transfer.bench", "KV transfer vs raw torch.distributed send/recv; TTFT overlap"),
    "frontends": ("dsv32_serve.bench_frontends", "TTFT/TPOT through HTTP vs gRPC; decode tok/s with a JSON-schema "
                                                 "mask vs none"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bench", choices=sorted(BENCHES), help="; ".join(f"{k}: {v[1]}" for k, v in BENCHES.items()))
    p.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own options (see bench WHAT --help)")


def run(args: argparse.Namespace) -> int:
    module = importlib.import_module(BENCHES[args.bench][0])  # only the chosen benchmark is imported
    sub = argparse.ArgumentParser(prog=f"dsv32-serve bench {args.bench}", description=BENCHES[args.bench][1])
    module.add_arguments(sub)
    return int(module.run(sub.parse_args(args.rest)) or 0)
