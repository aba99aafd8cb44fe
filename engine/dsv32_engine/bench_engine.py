"""``dsv32-serve bench engine``: ours vs ``transformers`` on one checkpoint, in one run.

(a) decode tokens/s at batch 1 and 16 vs ``transformers`` ``generate`` (same
prompts, greedy, same number of new tokens; ratio); (b) one decode step with
DSA vs the same step with dense attention at a context of 8×``index_topk``
(ratio); (c) KV-cache bytes per token per layer vs an expanded-K/V cache. ``--dtype`` picks
the compute dtype of both engines (``transformers`` loads the checkpoint in the same one).

``--attention-only --shapes v32``: one DeepSeek-V3.2-shaped attention layer alone
(128 heads, 512 + 64 latent, indexer 64 x 128, top-k 2048; random weights), its paged
cache filled to 8 and 32 x top-k tokens per request (16k, 64k), one decode step with DSA
and the same step dense (every token kept), batch 1 and 8; ratio against the arithmetic
ratio of the two (multiply-adds per step, see :func:`attention_macs`).
Absolute times on a shared 2-core machine are noise; the ratios are the result.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from .progress import progress


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint dir (default: make the 'small' preset in a temp dir)")
    p.add_argument("--preset", default="small")
    p.add_argument("--prompt-len", type=int, default=512, help="context each request decodes against")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--batches", help="default 1,16 (1,8 with --attention-only)")
    p.add_argument("--dsa-batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="fp32",
                   help="compute dtype (EngineConfig.dtype); transformers runs in the same one")
    p.add_argument("--attention-only", action="store_true",
                   help="one attention layer at real shapes: DSA vs dense decode step (see --shapes)")
    p.add_argument("--shapes", choices=sorted(ATTENTION_SHAPES), default="v32")
    p.add_argument("--contexts", default="8,32", help="--attention-only: contexts as multiples of index_topk")
    p.add_argument("--numerics", choices=("fp8", "exact"), default="fp8", help="--attention-only: cache format")
    p.add_argument("--threads", type=int, help="--attention-only: torch threads (default: torch's)")
    p.add_argument("--attention-backend", choices=("torch", "kernels"),
                   help="--attention-only: default kernels on CUDA, torch elsewhere")


def _ours_decode_s(llm, prompts: list[list[int]], new: int) -> float:
    """Seconds for ``new - 1`` decode steps of the whole batch (prefill excluded)."""
    from .sampling_params import SamplingParams

    eng = llm.engine
    sp = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    for i, p in enumerate(prompts):
        eng.add_request(f"bench-{time.monotonic_ns()}-{i}", p, sp)
    produced = 0
    while produced < len(prompts):  # prefill (possibly chunked) until every request has its first token
        produced += len(eng.step())
    t = time.perf_counter()
    while eng.has_unfinished():
        eng.step()
    return time.perf_counter() - t


def _hf_decode_s(hf, prompts: list[list[int]], new: int) -> float:
    """The same for transformers: prefill with a cache, then ``new - 1`` greedy single-token forwards.

    This is the loop ``generate`` runs, minus its logits processors: a baseline that favours transformers.
    """
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask, use_cache=True)
        cache, nxt = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
        t = time.perf_counter()
        for _ in range(new - 1):
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            out = hf(input_ids=nxt, attention_mask=mask, cache=cache, use_cache=True)
            cache, nxt = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
        return time.perf_counter() - t


def bench_decode(model_dir: str, batches: list[int], prompt_len: int, new: int, repeats: int, with_hf: bool,
                 dtype: str = "fp32"):
    from .llm import LLM

    llm = LLM(model_dir, dtype=dtype, max_num_seqs=max(batches))
    hf = None
    if with_hf:
        import transformers
        hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=llm.engine.dtype).eval()
    rows = []
    for b in progress(batches, "bench engine: decode", "batch"):
        prompts = torch.randint(100, 120000, (b, prompt_len), generator=torch.Generator().manual_seed(b)).tolist()
        ours = min(_ours_decode_s(llm, prompts, new) for _ in range(repeats))
        row = {"batch": b, "ours_decode_tok_s": b * (new - 1) / ours}
        if hf is not None:
            theirs = min(_hf_decode_s(hf, prompts, new) for _ in range(repeats))
            row["hf_decode_tok_s"] = b * (new - 1) / theirs
            row["ratio"] = row["ours_decode_tok_s"] / row["hf_decode_tok_s"]
        rows.append(row)
    return rows, llm


def bench_dsa_step(llm, batch: int, repeats: int) -> dict:
    """One decode step for ``batch`` requests at context 8×index_topk, with DSA and with dense attention."""
    from .model import ForwardBatch, SeqSpan
    from .cache import KVCache

    eng = llm.engine
    cfg, layout = eng.config, eng.layout
    ctx = 8 * cfg.index_topk
    pages = layout.pages_for(ctx)
    cache = KVCache(layout, cfg.num_hidden_layers, pages * batch)
    tables = [torch.arange(i * pages, (i + 1) * pages) for i in range(batch)]
    g = torch.Generator().manual_seed(0)
    for i, t in enumerate(tables):  # fill each request's cache with a real prefill
        ids = torch.randint(100, 120000, (ctx - 1,), generator=g)
        pos = torch.arange(ctx - 1)
        fb = ForwardBatch(ids, pos, t[pos // 64] * 64 + pos % 64, [SeqSpan(0, ctx - 1, ctx - 1, t)], torch.tensor([ctx - 2]))
        eng.model(fb, cache)
    pos = torch.full((batch,), ctx - 1)
    step = ForwardBatch(torch.randint(100, 120000, (batch,), generator=g), pos,
                        torch.stack([t[(ctx - 1) // 64] * 64 + (ctx - 1) % 64 for t in tables]),
                        [SeqSpan(i, 1, ctx, t) for i, t in enumerate(tables)], torch.arange(batch))
    layers = [layer.self_attn.attention for layer in eng.model.model.layers]
    topk = cfg.index_topk
    attn_time = [0.0]
    originals = [a._decode for a in layers]

    def timed(fn):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            r = fn(*a, **kw)
            attn_time[0] += time.perf_counter() - t
            return r
        return wrapper

    def measure():
        best_step = best_attn = float("inf")
        for _ in range(repeats):
            attn_time[0] = 0.0
            t = time.perf_counter()
            eng.model(step, cache)
            best_step, best_attn = min(best_step, time.perf_counter() - t), min(best_attn, attn_time[0])
        return best_step, best_attn

    for a, fn in zip(layers, originals):
        a._decode = timed(fn)  # the latent-space attention of a decode step: indexer + top-k + MLA
    try:
        dsa, dsa_attn = measure()
        for a in layers:
            a.cfg.index_topk = ctx + 1  # every token kept: dense attention over the whole context
        dense, dense_attn = measure()
    finally:
        for a, fn in zip(layers, originals):
            a.cfg.index_topk = topk
            del a._decode
    return {"context": ctx, "index_topk": topk, "batch": batch, "dsa_step_s": dsa, "dense_step_s": dense,
            "speedup": dense / dsa, "dsa_attention_s": dsa_attn, "dense_attention_s": dense_attn,
            "attention_speedup": dense_attn / dsa_attn}


def cache_bytes(model_dir: str) -> list[dict]:
    from dsv32_kernels.layout import CacheLayout

    from .checkpoint_maker import DEEPSEEK_V32
    from .config import ModelConfig

    out = []
    for name, cfg in (("bench checkpoint", ModelConfig.from_dir(model_dir)),
                      ("DeepSeek-V3.2 config", ModelConfig.from_dict(DEEPSEEK_V32))):
        expanded = CacheLayout.expanded_kv_token_bytes(cfg.num_attention_heads, cfg.qk_head_dim, cfg.v_head_dim)
        for mode, dt in (("fp8", torch.bfloat16), ("exact", torch.bfloat16)):
            lay = CacheLayout(cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.index_head_dim, mode=mode, dtype=dt)
            out.append({"model": name, "mode": mode, "bytes_per_token_layer": lay.token_bytes,
                        "expanded_kv_bf16": expanded, "ratio": expanded / lay.token_bytes})
    return out


def run(args: argparse.Namespace) -> int:
    if args.attention_only:
        return run_attention_only(args)
    model_dir = args.model
    tmp = None
    if model_dir is None:
        from .checkpoint_maker import make_checkpoint
        tmp = tempfile.TemporaryDirectory(prefix="dsv32-bench-")
        model_dir = str(make_checkpoint(Path(tmp.name) / args.preset, args.preset, dtype="fp32"))
    batches = [int(b) for b in (args.batches or "1,16").split(",")]
    rows, llm = bench_decode(model_dir, batches, args.prompt_len, args.new_tokens, args.repeats,
                             not args.skip_transformers, args.dtype)
    print(f"# bench engine on {model_dir} ({torch.get_num_threads()} threads, device cpu, "
          f"dtype {str(llm.engine.dtype).removeprefix('torch.')})")
    print("\n| batch | ours decode tok/s | transformers decode tok/s | ratio |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['ours_decode_tok_s']:.1f} | {r.get('hf_decode_tok_s', float('nan')):.1f} "
              f"| {r.get('ratio', float('nan')):.2f}x |")
    dsa = bench_dsa_step(llm, args.dsa_batch, args.repeats)
    print(f"\n| decode step, context {dsa['context']} = 8 x index_topk, batch {dsa['batch']} | whole step s "
          f"| attention (indexer + top-k + MLA) s |\n|---|---|---|")
    print(f"| DSA (top-{dsa['index_topk']}) | {dsa['dsa_step_s']:.4f} | {dsa['dsa_attention_s']:.4f} |")
    print(f"| dense | {dsa['dense_step_s']:.4f} | {dsa['dense_attention_s']:.4f} |")
    print(f"| dense / DSA | {dsa['speedup']:.2f}x | {dsa['attention_speedup']:.2f}x |")
    cb = cache_bytes(model_dir)
    print("\n| model | cache mode | bytes/token/layer | expanded K/V bf16 | ratio |\n|---|---|---|---|---|")
    for r in cb:
        print(f"| {r['model']} | {r['mode']} | {r['bytes_per_token_layer']} | {r['expanded_kv_bf16']} | {r['ratio']:.1f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"dtype": str(llm.engine.dtype), "decode": rows, "dsa": dsa,
                                               "cache_bytes": cb}, indent=2))
    return 0


# -- one attention layer at real shapes ------------------------------------------------------------------------------
ATTENTION_SHAPES = {"v32": "DeepSeek-V3.2"}


def attention_macs(cfg, context: int, selected: int) -> int:
    """Multiply-adds of one decode query: the indexer over every key (``index_n_heads`` products of
    ``index_head_dim`` + the head sum) and absorbed MLA over ``selected`` keys (``[c ‖ k_pe]`` scores,
    then the 512-d output: ``H · (576 + 512)`` a key). Dense is ``selected = context`` without the indexer."""
    mla = cfg.num_attention_heads * (cfg.kv_lora_rank + cfg.qk_rope_head_dim + cfg.kv_lora_rank) * selected
    if selected >= context:
        return mla
    return mla + cfg.index_n_heads * (cfg.index_head_dim + 1) * context


def _attention_layer(shapes: str, numerics: str, dtype: torch.dtype, backend: str, device):
    """One MLA layer's attention (``Attention`` seam) with random ``kv_b_proj`` and indexer, at ``shapes``."""
    from torch import nn

    from dsv32_kernels.layout import CacheLayout

    from .checkpoint_maker import DEEPSEEK_V32
    from .config import ModelConfig
    from .model import ATTENTION_BACKENDS, Indexer

    cfg = ModelConfig.from_dict(dict({"v32": DEEPSEEK_V32}[shapes], num_hidden_layers=1))
    layout = CacheLayout(cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.index_head_dim, mode=numerics, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    kv_b = nn.Linear(cfg.kv_lora_rank, cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
    with torch.no_grad():
        kv_b.weight.copy_(torch.randn(kv_b.weight.shape, generator=g) * cfg.kv_lora_rank ** -0.5)
    attention = ATTENTION_BACKENDS[backend](cfg, 0, layout, kv_b.to(device, dtype), Indexer(cfg).to(device))
    return cfg, layout, attention, g


def _fill(attention, layout, cfg, context: int, batch: int, g, device):
    """A cache of ``batch`` requests of ``context`` tokens each, on their own pages: one request's latent and
    indexer keys written through the layer's own store (random values), its pages copied to the others."""
    from .attention import Projected
    from .cache import KVCache

    pages = layout.pages_for(context)
    cache = KVCache(layout, 1, pages * batch, device)
    for a in range(0, context, 8192):
        n = min(8192, context - a)
        p = Projected(None, None, torch.randn(n, cfg.kv_lora_rank, generator=g).to(device, layout.dtype),
                      torch.randn(n, cfg.qk_rope_head_dim, generator=g).to(device, layout.dtype),
                      index_k=torch.randn(n, cfg.index_head_dim, generator=g).to(device))
        attention.store(p, torch.arange(a, a + n, device=device), cache)
    for b in range(1, batch):
        cache.latent[0][b * pages:(b + 1) * pages] = cache.latent[0][:pages]
        cache.index[0][b * pages:(b + 1) * pages] = cache.index[0][:pages]
    tables = [torch.arange(b * pages, (b + 1) * pages, device=device) for b in range(batch)]
    return cache, tables


def bench_attention_step(attention, cfg, layout, context: int, batch: int, repeats: int, g, device) -> dict:
    """One decode step (the token at position ``context - 1``) of ``batch`` requests through the layer's
    attention, DSA (``index_topk``) and dense (``index_topk`` above the context), alternated; best of ``repeats``."""
    from dsv32_kernels import fp8

    from .attention import Projected
    from .model import ForwardBatch, SeqSpan

    cache, tables = _fill(attention, layout, cfg, context, batch, g, device)
    H, Hi, dt = cfg.num_attention_heads, cfg.index_n_heads, layout.dtype
    index_q = torch.randn(batch, Hi, cfg.index_head_dim, generator=g)
    if layout.mode == "fp8":  # what Indexer.project hands over in fp8 mode
        index_q = fp8.fake_quant(fp8.hadamard(index_q))
    p = Projected(torch.randn(batch, H, cfg.qk_nope_head_dim, generator=g).to(device, dt),
                  torch.randn(batch, H, cfg.qk_rope_head_dim, generator=g).to(device, dt), None, None,
                  index_q.to(device), (torch.rand(batch, Hi, generator=g) * Hi ** -0.5).to(device), None)
    step = ForwardBatch(torch.zeros(batch, dtype=torch.long, device=device),
                        torch.full((batch,), context - 1, device=device), None,
                        [SeqSpan(b, 1, context, t) for b, t in enumerate(tables)], torch.arange(batch, device=device))
    topk = cfg.index_topk
    best = {"dsa": float("inf"), "dense": float("inf"), "dsa_cpu": float("inf"), "dense_cpu": float("inf")}
    try:
        with torch.inference_mode():
            for rep in range(repeats + 1):  # the first round warms up
                for name, k in (("dsa", topk), ("dense", context + 1)):
                    cfg.index_topk = k
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    t, c = time.perf_counter(), time.process_time()
                    attention(p, step, cache)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    if rep:
                        best[name] = min(best[name], time.perf_counter() - t)
                        best[name + "_cpu"] = min(best[name + "_cpu"], time.process_time() - c)
    finally:
        cfg.index_topk = topk
    arith = attention_macs(cfg, context, context) / attention_macs(cfg, context, topk)
    speedup = best["dense"] / best["dsa"]
    return {"context": context, "batch": batch, "index_topk": topk, "dsa_s": best["dsa"], "dense_s": best["dense"],
            "speedup": speedup, "arithmetic_ratio": arith, "of_arithmetic": speedup / arith,
            "dsa_cpu_s": best["dsa_cpu"], "dense_cpu_s": best["dense_cpu"],
            "cpu_speedup": best["dense_cpu"] / best["dsa_cpu"]}


def run_attention_only(args: argparse.Namespace) -> int:
    from .engine import _dtype
    from .model import resolve_backend

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = _dtype(args.dtype, device)
    backend = resolve_backend(args.attention_backend, device)
    cfg, layout, attention, g = _attention_layer(args.shapes, args.numerics, dtype, backend, device)
    batches = [int(b) for b in (args.batches or "1,8").split(",")]
    contexts = [int(c) * cfg.index_topk for c in args.contexts.split(",")]
    print(f"# bench engine --attention-only --shapes {args.shapes}: {ATTENTION_SHAPES[args.shapes]} attention layer "
          f"({cfg.num_attention_heads} heads, {cfg.kv_lora_rank} + {cfg.qk_rope_head_dim} latent, indexer "
          f"{cfg.index_n_heads} x {cfg.index_head_dim}, top-k {cfg.index_topk}), {args.numerics} cache, "
          f"{str(dtype).removeprefix('torch.')}, {backend} path, {device.type}, {torch.get_num_threads()} threads, "
          f"best of {args.repeats}")
    rows = []
    for ctx in progress(contexts, "bench engine: attention", "context"):
        for b in batches:
            rows.append(bench_attention_step(attention, cfg, layout, ctx, b, args.repeats, g, device))
    print("\n| context | batch | DSA step s | dense step s | dense / DSA | of arithmetic | arithmetic ratio "
          "| CPU-time ratio |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['context']} ({r['context'] // r['index_topk']} x top-k) | {r['batch']} | {r['dsa_s']:.4f} "
              f"| {r['dense_s']:.4f} | **{r['speedup']:.2f}x** | {100 * r['of_arithmetic']:.0f}% "
              f"| {r['arithmetic_ratio']:.2f}x | {r['cpu_speedup']:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"shapes": args.shapes, "numerics": args.numerics, "dtype": str(dtype),
                                               "backend": backend, "attention": rows}, indent=2))
    return 0
