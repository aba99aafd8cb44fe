"""``dsv32-serve bench kernels``: each op at DeepSeek-V3.2 shapes vs its torch twin and the H200 roofline.

On CUDA every op runs as the Triton kernel and as its torch twin (skipped where
the twin would need too much memory), at 128 heads, top-k 2048, contexts
4k-128k and batch 1-128; the table gives time, achieved GB/s and TFLOP/s and
the fraction of the H200 roofline ``max(bytes / 4.8 TB/s, flops / peak)`` (peak:
790 TFLOP/s for bf16 MMAs, 1979 for fp8). Without CUDA it times the torch twins
(what the ops run on CPU tensors) at reduced shapes and says so: those numbers
say nothing about the kernels. Markdown on stdout, optionally ``--json PATH``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from . import fp8
from .layout import CacheLayout

from . import dispatch as kb
from .fp8_gemm import fp8_gemm, naive_fp8_gemm
from .indexer_logits import (indexer_logits_decode, indexer_logits_prefill, naive_indexer_logits_decode,
                             naive_indexer_logits_prefill)
from .sparse_mla_decode import naive_sparse_mla_decode, sparse_mla_decode
from .sparse_mla_prefill import naive_sparse_mla_prefill, sparse_mla_prefill
from .store_kv import naive_store_kv, store_kv
from .testing import build_cache
from .topk import naive_topk_indices, topk_indices

H200_BW = 4.8e12
H200_BF16 = 790e12
H200_FP8 = 1979e12
OPS = ("store_kv", "indexer_decode", "indexer_prefill", "topk", "mla_decode", "mla_prefill", "fp8_gemm")


@dataclass
class Case:
    op: str
    shape: str
    bytes: float
    flops: float
    peak: float  # FLOP/s of the MMA kind the op uses
    triton: Callable[[], object] | None
    naive: Callable[[], object] | None
    naive_skip: str = ""


@dataclass
class Row:
    op: str
    shape: str
    impl: str
    ms: float | None
    gbps: float | None = None
    tflops: float | None = None
    roofline: float | None = None
    speedup_vs_naive: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS), help="ops to run (default: all)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--iters", type=int, default=0, help="timed repetitions (default: 20 on CUDA, 3 on CPU)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")


# -- timing ---------------------------------------------------------------------------------------------
def _time_ms(fn: Callable[[], object], device: torch.device, iters: int) -> float:
    fn()  # warm-up (and, for Triton, compile)
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        best = math.inf
        for _ in range(iters):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            best = min(best, start.elapsed_time(end))
        return best
    best = math.inf
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        best = min(best, (time.perf_counter() - t0) * 1e3)
    return best


def _with(backend_name: str, fn: Callable[[], object]) -> Callable[[], object]:
    def call():
        with kb.backend(backend_name):
            return fn()
    return call


# -- cases -----------------------------------------------------------------------------------------------
def _shapes(device: torch.device, quick: bool) -> dict:
    if device.type == "cuda":
        return dict(H=128, IH=64, topk=2048, dv=512,
                    decode=[(1, 32768), (16, 32768), (64, 4096), (64, 32768), (128, 32768), (64, 131072)]
                    if not quick else [(1, 32768), (64, 32768)],
                    prefill=[4096, 8192] if not quick else [4096], mla_prefill=[1024, 4096] if not quick else [1024],
                    store=[128, 8192], gemm_m=[1, 64, 512, 4096] if not quick else [64],
                    gemm_nk=[(24576, 1536), (576, 7168), (7168, 16384), (4096, 7168)])
    return dict(H=16, IH=16, topk=256, dv=512, decode=[(1, 4096), (4, 4096)] if not quick else [(1, 4096)],
                prefill=[512], mla_prefill=[128], store=[64, 1024], gemm_m=[1, 64], gemm_nk=[(1536, 1024), (576, 2048)])


def _layout(dv: int) -> CacheLayout:
    return CacheLayout(dv, 64, 128, mode="fp8")


def _filled_pool(layout: CacheLayout, pages: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pools of real fp8 records: one page written by store_kv, tiled (values don't change the timing)."""
    one = build_cache(layout, [64], extra_pages=0, device=device)
    lat = one.latent_pool[:1].expand(pages, -1, -1).contiguous()
    idx = one.index_pool[:1].expand(pages, -1).contiguous()
    return lat, idx


def _paged(B: int, ctx: int, device: torch.device) -> tuple[torch.Tensor, int]:
    per = -(-ctx // 64)
    bt = torch.randperm(B * per, device=device).view(B, per).to(torch.int32)
    return bt, B * per


def _physical(bt: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return (bt.long().gather(1, pos // 64) * 64 + pos % 64).to(torch.int32)


def _cases_store(s, device):
    layout = _layout(s["dv"])
    for T in s["store"]:
        lat, idx = _filled_pool(layout, -(-T // 64) + 1, device)
        c = torch.randn(T, s["dv"], device=device, dtype=torch.bfloat16)
        pe = torch.randn(T, 64, device=device, dtype=torch.bfloat16)
        ik = torch.randn(T, 128, device=device, dtype=torch.bfloat16)
        slots = torch.randperm(lat.shape[0] * 64, device=device)[:T]
        f = lambda fn: (lambda: fn(lat, idx, c, pe, ik, slots, layout))  # noqa: E731
        yield Case("store_kv", f"T={T}", T * (2 * (s["dv"] + 64 + 128) + 8 + layout.token_bytes),
                   T * 2 * 128 * 128, H200_BF16, f(store_kv), f(naive_store_kv))


def _cases_indexer_decode(s, device):
    layout, H = _layout(s["dv"]), s["IH"]
    for B, ctx in s["decode"]:
        bt, pages = _paged(B, ctx, device)
        _, pool = _filled_pool(layout, pages, device)
        q = torch.randn(B, 1, H, 128, device=device).to(fp8.FP8)
        qs = torch.rand(B, 1, H, device=device)
        w = torch.randn(B, 1, H, device=device)
        lens = torch.full((B,), ctx, dtype=torch.int32, device=device)
        f = lambda fn: (lambda: fn(q, w, pool, bt, lens, layout, qs))  # noqa: E731
        big = B * ctx * H * 4 * 2 > 8e9
        yield Case("indexer_decode", f"B={B} ctx={ctx} H={H}",
                   B * ctx * (132 + 4) + B * H * 136, 2 * B * H * ctx * 128, H200_FP8,
                   f(indexer_logits_decode), None if big else f(naive_indexer_logits_decode),
                   "twin needs too much memory" if big else "")


def _cases_indexer_prefill(s, device):
    H = s["IH"]
    for T in s["prefill"]:
        q = torch.randn(T, H, 128, device=device).to(fp8.FP8)
        qs, w = torch.rand(T, H, device=device), torch.randn(T, H, device=device)
        k = torch.randn(T, 128, device=device).to(fp8.FP8)
        ksc = torch.rand(T, device=device)
        ks = torch.zeros(T, dtype=torch.int32, device=device)
        ke = torch.arange(1, T + 1, dtype=torch.int32, device=device)
        f = lambda fn: (lambda: fn(q, w, k, ksc, ks, ke, qs))  # noqa: E731
        pairs = T * (T + 1) / 2
        yield Case("indexer_prefill", f"T=S={T} causal H={H}", T * T * 4 + T * 132 + T * H * 136,
                   2 * H * 128 * pairs, H200_FP8, f(indexer_logits_prefill), f(naive_indexer_logits_prefill))


def _cases_topk(s, device):
    for B, ctx in s["decode"]:
        logits = torch.randn(B, 1, ctx, device=device)
        bt, _ = _paged(B, ctx, device)
        f = lambda fn: (lambda: fn(logits, s["topk"], bt))  # noqa: E731
        yield Case("topk", f"B={B} L={ctx} k={s['topk']}", B * ctx * 4 + B * s["topk"] * 8, 0.0, H200_BF16,
                   f(topk_indices), f(naive_topk_indices))


def _mla_inputs(s, B, ctx, device):
    layout = _layout(s["dv"])
    bt, pages = _paged(B, ctx, device)
    lat, _ = _filled_pool(layout, pages, device)
    pos = torch.randint(0, ctx, (B, s["topk"]), device=device)
    q = torch.randn(B, s["H"], layout.latent_dim, device=device, dtype=torch.bfloat16)
    return layout, lat, q, _physical(bt, pos)


def _mla_cost(s, rows, layout):
    H, k = s["H"], s["topk"]
    return (rows * k * layout.latent_token_bytes + rows * H * (layout.latent_dim * 2 + 4 * layout.kv_lora_rank + 4),
            2 * rows * H * k * (layout.latent_dim + layout.kv_lora_rank))


def _cases_mla_decode(s, device):
    for B, ctx in s["decode"]:
        layout, lat, q, idx = _mla_inputs(s, B, ctx, device)
        f = lambda fn: (lambda: fn(q, lat, idx, 0.1352338, layout))  # noqa: E731
        yield Case("mla_decode", f"B={B} ctx={ctx} H={s['H']} k={s['topk']}", *_mla_cost(s, B, layout), H200_BF16,
                   f(sparse_mla_decode), f(naive_sparse_mla_decode))


def _cases_mla_prefill(s, device):
    for T in s["mla_prefill"]:
        layout, lat, q, idx = _mla_inputs(s, T, max(T, 2 * s["topk"]), device)
        f = lambda fn: (lambda: fn(q, lat, idx, 0.1352338, layout))  # noqa: E731
        yield Case("mla_prefill", f"T={T} H={s['H']} k={s['topk']}", *_mla_cost(s, T, layout), H200_BF16,
                   f(sparse_mla_prefill), f(naive_sparse_mla_prefill))


def _cases_gemm(s, device):
    for N, K in s["gemm_nk"]:
        w_q, w_s = fp8.quant_weight(torch.randn(N, K) * 0.05)
        w_q, w_s = w_q.to(device), w_s.to(device)
        for M in s["gemm_m"]:
            x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
            f = lambda fn: (lambda: fn(x, w_q, w_s))  # noqa: E731
            yield Case("fp8_gemm", f"M={M} N={N} K={K}", N * K + w_s.numel() * 4 + M * K * 2 + M * N * 2,
                       2 * M * N * K, H200_FP8, f(fp8_gemm), f(naive_fp8_gemm))


CASES = {"store_kv": _cases_store, "indexer_decode": _cases_indexer_decode, "indexer_prefill": _cases_indexer_prefill,
         "topk": _cases_topk, "mla_decode": _cases_mla_decode, "mla_prefill": _cases_mla_prefill,
         "fp8_gemm": _cases_gemm}


# -- run -------------------------------------------------------------------------------------------------
def _measure(case: Case, impl: str, fn: Callable[[], object], device: torch.device, iters: int) -> Row:
    try:
        ms = _time_ms(fn, device, iters)
    except torch.OutOfMemoryError:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return Row(case.op, case.shape, impl, None, note="out of memory")
    sec = ms / 1e3
    row = Row(case.op, case.shape, impl, ms, case.bytes / sec / 1e9, case.flops / sec / 1e12)
    if device.type == "cuda":
        row.roofline = max(case.bytes / H200_BW, case.flops / case.peak) / sec
    return row


def _rows_for(case: Case, device: torch.device, iters: int) -> list[Row]:
    rows = []
    if device.type == "cuda" and case.triton is not None:
        rows.append(_measure(case, "triton", _with("auto", case.triton), device, iters))
    if case.naive is None:
        rows.append(Row(case.op, case.shape, "torch", None, note=case.naive_skip))
    else:
        rows.append(_measure(case, "torch", _with("torch", case.naive), device, iters))
    if len(rows) == 2 and rows[0].ms and rows[1].ms:
        rows[0].speedup_vs_naive = rows[1].ms / rows[0].ms
    return rows


def _fmt(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def _markdown(rows: list[Row], header: str) -> str:
    out = [header, "", "| op | shape | impl | time (ms) | GB/s | TFLOP/s | H200 roofline | vs torch twin | note |",
           "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        roof = "—" if r.roofline is None else f"{100 * r.roofline:.0f}%"
        speed = "—" if r.speedup_vs_naive is None else f"{r.speedup_vs_naive:.1f}x"
        out.append(f"| {r.op} | {r.shape} | {r.impl} | {_fmt(r.ms, '.3f')} | {_fmt(r.gbps, '.1f')} | "
                   f"{_fmt(r.tflops, '.2f')} | {roof} | {speed} | {r.note} |")
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    want = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if want == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here")
        return 2
    device = torch.device(want)
    iters = args.iters or (20 if device.type == "cuda" else 3)
    torch.manual_seed(0)
    shapes = _shapes(device, args.quick)
    if device.type == "cuda":
        header = (f"## dsv32_kernels on {torch.cuda.get_device_name(device)}: Triton kernels vs torch twins "
                  f"(roofline: H200 {H200_BW / 1e12:.1f} TB/s, {H200_BF16 / 1e12:.0f} TFLOP/s bf16, "
                  f"{H200_FP8 / 1e12:.0f} TFLOP/s fp8)")
    else:
        header = (f"## CPU torch path (no CUDA on this machine): the torch twins at reduced shapes "
                  f"(heads {shapes['H']}, top-k {shapes['topk']}); no kernel was timed and there is no roofline")
    rows: list[Row] = []
    from tqdm import tqdm

    # the engine's progress bars' rule (DSV32_PROGRESS: 1 always, 0 never, unset on a terminal); kernels
    # import nothing of the project, so the three lines stand here again
    setting = os.environ.get("DSV32_PROGRESS", "").strip().lower()
    disable = None if setting == "" else setting in ("0", "false", "no")
    with torch.inference_mode():
        for op in tqdm(args.ops, desc="bench kernels", unit="op", disable=disable, leave=False):
            for case in CASES[op](shapes, device):
                rows.extend(_rows_for(case, device, iters))
                del case
    print(_markdown(rows, header))
    if args.json:
        meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                "path": "triton+torch" if device.type == "cuda" else "cpu torch path",
                "torch": torch.__version__, "iters": iters}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": [asdict(r) for r in rows]}, f, indent=1)
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m dsv32_kernels.bench", description=__doc__.splitlines()[0])
    add_arguments(p)
    raise SystemExit(run(p.parse_args()))
