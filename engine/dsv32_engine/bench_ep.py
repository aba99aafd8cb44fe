"""``dsv32-serve bench ep``: decode steps of an expert-parallel group at EP = 1, 2, 4, side by side.

Each EP size is one local group of real processes (gloo on CPU, NCCL on CUDA).
Every rank holds ``--batch`` requests of ``--prompt-len`` tokens (data-parallel
attention) and decodes ``--steps`` steps after a warm-up. Reported per size:

* the step time split into the MoE phases — dispatch (count exchange + token
  rows + expert ids), local experts, combine — and the rest (attention, dense
  layers, shared experts, LM head, sampling);
* bytes sent per token per MoE layer vs the theoretical minimum: every
  (token, expert) pair whose expert lives on another rank crosses twice
  (dispatch and combine), ``hidden × bytes``, and nothing else;
* per-rank resident weight bytes (measured from the loaded tensors): routed
  experts vs 1/N of all routed experts, and the replicated rest.

EP = 1 runs the same expert-parallel code path on a group of one (no bytes move).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def _rank(ep, model_dir: str, batch: int, prompt_len: int, steps: int, warmup: int) -> dict:
    import torch

    from .engine import EngineCore
    from .sampling_params import SamplingParams

    torch.manual_seed(0)
    eng = EngineCore(model_dir, ep=ep, max_num_seqs=max(batch, 1))
    for b in range(batch):
        ids = [(ep.rank * 1009 + b * 7919 + i * 104729) % 120000 + 100 for i in range(prompt_len)]
        eng.add_request(f"r{ep.rank}-{b}", ids, SamplingParams(temperature=0.0, max_tokens=warmup + steps + 2,
                                                               ignore_eos=True))
    while eng.scheduler.waiting or any(r.num_computed < len(r.prompt_ids) for r in eng.scheduler.running):
        eng.step()  # prefill (chunked) until every request decodes
    for _ in range(warmup):
        eng.step()
    g = eng.ep
    g.profile, g.bytes_sent, g.remote_rows = True, 0, 0
    g.seconds = dict.fromkeys(g.seconds, 0.0)
    tokens = 0
    t0 = time.perf_counter()
    for _ in range(steps):
        tokens += len(eng.step())
    total = time.perf_counter() - t0
    cfg = eng.config
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    return {"rank": ep.rank, "step_s": total / steps, "phases_s": {k: v / steps for k, v in g.seconds.items()},
            "tokens": tokens, "moe_layers": moe_layers, "bytes_sent": g.bytes_sent, "remote_rows": g.remote_rows,
            "row_bytes": cfg.hidden_size * torch.empty(0, dtype=eng.dtype).element_size(),
            "weight_bytes": eng.weight_bytes}


def bench_size(model_dir: str, size: int, args) -> dict:
    from .ep_launch import run_group

    ranks = run_group(_rank, size, model_dir, args.batch, args.prompt_len, args.steps, args.warmup, timeout_s=1800)
    step = max(r["step_s"] for r in ranks)  # lockstep: the group moves at its slowest rank
    phases = {k: max(r["phases_s"][k] for r in ranks) for k in ranks[0]["phases_s"]}
    tokens = sum(r["tokens"] for r in ranks)
    layers = ranks[0]["moe_layers"]
    sent = sum(r["bytes_sent"] for r in ranks)
    minimum = sum(r["remote_rows"] for r in ranks) * ranks[0]["row_bytes"] * 2
    return {"ep": size, "step_s": step, "phases_s": phases, "rest_s": max(0.0, step - sum(phases.values())),
            "tokens_per_step": tokens / args.steps,
            "bytes_per_token_layer": sent / max(tokens * layers, 1),
            "min_bytes_per_token_layer": minimum / max(tokens * layers, 1),
            "moved_over_min": (sent / minimum) if minimum else None,
            "weight_bytes": [r["weight_bytes"] for r in ranks]}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory (default: make the --preset one)")
    p.add_argument("--preset", default="small", help="make-checkpoint preset when --model is not given")
    p.add_argument("--sizes", default="1,2,4", help="EP sizes, comma-separated")
    p.add_argument("--batch", type=int, default=8, help="requests per rank")
    p.add_argument("--prompt-len", type=int, default=128, help="context tokens per request")
    p.add_argument("--steps", type=int, default=8, help="timed decode steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the results here")


def run(args: argparse.Namespace) -> int:
    model_dir, tmp = args.model, None
    if model_dir is None:
        from .checkpoint_maker import make_checkpoint

        tmp = tempfile.TemporaryDirectory(prefix="dsv32-bench-ep-")
        print(f"# making the {args.preset} checkpoint", flush=True)
        model_dir = str(make_checkpoint(Path(tmp.name) / args.preset, args.preset, dtype="fp32"))
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"# bench ep on {model_dir}: {args.batch} requests per rank, context {args.prompt_len}, "
          f"{args.steps} decode steps; gloo on CPU", flush=True)
    from .progress import progress

    rows = []
    for n in progress(sizes, "bench ep", "size"):
        rows.append(bench_size(model_dir, n, args))
        print(f"#   EP={n} done", flush=True)
    base = next((r for r in rows if r["ep"] == 1), None)
    print("\n| EP | step ms | attention + rest ms | dispatch ms | local experts ms | combine ms | tok/step |"
          " bytes/token/MoE layer | minimum | moved / min |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ph = r["phases_s"]
        ratio = f"{r['moved_over_min']:.3f}" if r["moved_over_min"] else "-"
        print(f"| {r['ep']} | {r['step_s'] * 1e3:.1f} | {r['rest_s'] * 1e3:.1f} | {ph['dispatch'] * 1e3:.1f} | "
              f"{ph['experts'] * 1e3:.1f} | {ph['combine'] * 1e3:.1f} | {r['tokens_per_step']:.0f} | "
              f"{r['bytes_per_token_layer']:.0f} | {r['min_bytes_per_token_layer']:.0f} | {ratio} |")
    print("\n| EP | rank | routed-expert bytes | share of all routed | replicated bytes |")
    print("|---|---|---|---|---|")
    for r in rows:
        all_routed = base["weight_bytes"][0]["routed_experts"] if base else None
        for rank, wb in enumerate(r["weight_bytes"]):
            share = f"{wb['routed_experts'] / all_routed:.4f} (1/{r['ep']} = {1 / r['ep']:.4f})" if all_routed else "-"
            print(f"| {r['ep']} | {rank} | {wb['routed_experts']:,} | {share} | {wb['replicated']:,} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return 0
