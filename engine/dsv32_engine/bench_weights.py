"""``dsv32-serve bench weights``: an FP8 checkpoint held as stored vs dequantised at load.

(a) resident weight bytes of each ``--weight-format`` (measured from the loaded
tensors) next to the checkpoint's own bytes (from its safetensors headers), and
the fp8/dequant ratio; (b) the same bytes at the published DeepSeek-V3.2
geometry, computed from the shapes with the loader's rules (no checkpoint that
size is made); (c) decode tokens/s of each format at the given batch sizes
(greedy, prefill excluded, best of ``--repeats``). On CPU the fp8 format
dequantises each weight per product, so (c) is its cost there; on CUDA the
products run through ``fp8_gemm``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from .bench_engine import _ours_decode_s
from .progress import progress


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="an FP8 checkpoint (default: make the preset in FP8 in a temp dir)")
    p.add_argument("--preset", default="small")
    p.add_argument("--dtype", default="fp32", help="compute dtype of both formats (EngineConfig.dtype)")
    p.add_argument("--weight-formats", default="fp8,dequant")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--batches", default="1,16")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", help="write the results here")


def v32_weight_bytes(dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """Resident bytes of DeepSeek-V3.2 (61 layers, MTP excluded) per format, and as stored on disk, from the shapes."""
    from .checkpoint_maker import _FP8_WEIGHTS, DEEPSEEK_V32
    from .config import ModelConfig
    from .model import DeepseekV32ForCausalLM
    from .weights import DEQUANT_ALWAYS, FP32_PARAMS
    from dsv32_kernels.layout import CacheLayout

    cfg = ModelConfig.from_dict(dict(DEEPSEEK_V32, architectures=["DeepseekV32ForCausalLM"]))
    with torch.device("meta"):
        model = DeepseekV32ForCausalLM(cfg, CacheLayout(cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.index_head_dim))
    size = torch.tensor([], dtype=dtype).element_size()
    out = {"stored": 0, "fp8": 0, "dequant": 0}
    for name, p in model.named_parameters():
        on_disk = name if name.endswith(("weight", "bias")) else name + ".weight"  # stacked experts
        wide = 4 if FP32_PARAMS.search(name) else size
        if _FP8_WEIGHTS.search(on_disk):
            *lead, o, i = p.shape
            fp8_bytes = p.numel() + 4 * (p.numel() // (o * i)) * -(-o // 128) * -(-i // 128)
            out["stored"] += fp8_bytes
            out["fp8"] += p.numel() * wide if DEQUANT_ALWAYS.search(name) else fp8_bytes
            out["dequant"] += p.numel() * wide
        else:
            out["stored"] += p.numel() * (4 if name.endswith("e_score_correction_bias") else 2)  # spec §8
            out["fp8"] += p.numel() * wide
            out["dequant"] += p.numel() * wide
    return out


def run(args: argparse.Namespace) -> int:
    from .checkpoint_maker import make_checkpoint
    from .llm import LLM
    from .weights import checkpoint_weight_bytes

    tmp = None
    model_dir = args.model
    if model_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="dsv32-bench-weights-")
        model_dir = str(make_checkpoint(Path(tmp.name) / args.preset, args.preset, dtype="fp8"))
    batches = [int(b) for b in args.batches.split(",")]
    formats = args.weight_formats.split(",")
    result: dict = {"model": model_dir, "dtype": args.dtype, "prompt_len": args.prompt_len,
                    "new_tokens": args.new_tokens, "formats": {}}
    for fmt in formats:
        llm = LLM(model_dir, dtype=args.dtype, weight_format=fmt, max_num_seqs=max(batches))
        eng = llm.engine
        row = {"resident": eng.weight_bytes, "checkpoint": checkpoint_weight_bytes(eng.config, model_dir)}
        vocab = eng.sampleable_vocab
        for b in progress(batches, f"bench weights: {fmt} decode", "batch"):
            g = torch.Generator().manual_seed(b)
            prompts = torch.randint(100, vocab, (b, args.prompt_len), generator=g).tolist()
            best = min(_ours_decode_s(llm, prompts, args.new_tokens) for _ in range(args.repeats))
            row[f"decode_tok_s_b{b}"] = b * (args.new_tokens - 1) / best
        result["formats"][fmt] = row
        del llm, eng
    f = result["formats"]
    if "fp8" in f and "dequant" in f:
        result["resident_ratio_fp8_over_dequant"] = f["fp8"]["resident"]["total"] / f["dequant"]["resident"]["total"]
        if result["resident_ratio_fp8_over_dequant"] == 1.0:
            raise SystemExit("bench weights: both formats hold the same bytes (is weight_format reaching the loader?)")
    result["deepseek_v32_bf16"] = v32 = v32_weight_bytes(torch.bfloat16)
    _print(result, batches, v32)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return 0


def _print(result: dict, batches: list[int], v32: dict) -> None:
    gib = 2.0 ** 30
    print(f"## Weights as stored vs dequantised at load ({Path(result['model']).name}, compute dtype "
          f"{result['dtype']}, context {result['prompt_len']}, {result['new_tokens'] - 1} decode steps)\n")
    print("| format | resident MiB | checkpoint MiB | resident / checkpoint | "
          + " | ".join(f"decode tok/s b={b}" for b in batches) + " |")
    print("|---|---|---|---|" + "---|" * len(batches))
    for fmt, row in result["formats"].items():
        r, c = row["resident"]["total"], row["checkpoint"]["total"]
        print(f"| {fmt} | {r / 2 ** 20:.1f} | {c / 2 ** 20:.1f} | {r / c:.2f} | "
              + " | ".join(f"{row[f'decode_tok_s_b{b}']:.1f}" for b in batches) + " |")
    if "resident_ratio_fp8_over_dequant" in result:
        print(f"\nresident bytes fp8 / dequant: {result['resident_ratio_fp8_over_dequant']:.3f}")
    print(f"\nDeepSeek-V3.2 geometry (61 layers, bf16 compute): as stored {v32['stored'] / gib:.1f} GiB, "
          f"fp8 {v32['fp8'] / gib:.1f} GiB, dequant {v32['dequant'] / gib:.1f} GiB, "
          f"fp8 / dequant {v32['fp8'] / v32['dequant']:.3f}")
