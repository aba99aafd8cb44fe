"""``dsv32-serve bench engine``: ours vs ``transformers`` on one checkpoint, in one run.

(a) decode tokens/s at batch 1 and 16 vs ``transformers`` ``generate`` (same
prompts, greedy, same number of new tokens; ratio); (b) one decode step with
DSA vs the same step with dense attention at a context of 8×``index_topk``
(ratio); (c) KV-cache bytes per token per layer vs an expanded-K/V cache.
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
    p.add_argument("--batches", default="1,16")
    p.add_argument("--dsa-batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--json", help="write the results here")


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


def bench_decode(model_dir: str, batches: list[int], prompt_len: int, new: int, repeats: int, with_hf: bool):
    from .llm import LLM

    llm = LLM(model_dir, dtype="float32", max_num_seqs=max(batches))
    hf = None
    if with_hf:
        import transformers
        hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
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
    model_dir = args.model
    tmp = None
    if model_dir is None:
        from .checkpoint_maker import make_checkpoint
        tmp = tempfile.TemporaryDirectory(prefix="dsv32-bench-")
        model_dir = str(make_checkpoint(Path(tmp.name) / args.preset, args.preset, dtype="fp32"))
    batches = [int(b) for b in args.batches.split(",")]
    print(f"# bench engine on {model_dir} ({torch.get_num_threads()} threads, device cpu)")
    rows, llm = bench_decode(model_dir, batches, args.prompt_len, args.new_tokens, args.repeats,
                             not args.skip_transformers)
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
        Path(args.json).write_text(json.dumps({"decode": rows, "dsa": dsa, "cache_bytes": cb}, indent=2))
    return 0
