"""Random-weights checkpoints in the exact HF layout (the library behind ``dsv32-serve make-checkpoint``).

Writes config.json, generation_config.json, tokenizer files and sharded
safetensors with ``model.safetensors.index.json``, seeded and reproducible.
``--dtype fp8`` stores the matrices the real checkpoint stores in FP8 as e4m3
with 128×128 ``weight_scale_inv`` blocks (spec §8); the other tensors stay bf16
(fp32 for the router bias), so an fp8 and a bf16 checkpoint made with the same
seed hold the same weights up to FP8 rounding.

Initialisation is scaled so that the model is not degenerate: unit-variance
activations through every projection, attention logits of order one (neither
uniform nor one-hot), distinct indexer scores, and logits with a clear argmax.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from dsv32_kernels import fp8
from .config import ModelConfig
from dsv32_kernels.layout import CacheLayout
from .model import DeepseekV32ForCausalLM
from .progress import progress

_ROPE = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
         "mscale": 1.0, "mscale_all_dim": 1.0}
_COMMON = dict(model_type="deepseek_v32", vocab_size=129280, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
               kv_lora_rank=512, n_shared_experts=1, norm_topk_prob=True, routed_scaling_factor=2.5,
               scoring_func="sigmoid", topk_method="noaux_tc", hidden_act="silu", rms_norm_eps=1e-6, rope_theta=10000,
               rope_scaling=_ROPE, index_head_dim=128, bos_token_id=0, eos_token_id=1, num_nextn_predict_layers=1)

PRESETS: dict[str, dict] = {
    # tests and the demo on 2 CPU cores; index_topk 64 = one page so that DSA is exercised by short prompts
    "tiny": dict(_COMMON, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=4,
                 first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=128, n_routed_experts=16,
                 num_experts_per_tok=4, n_group=4, topk_group=2, index_n_heads=32, index_topk=64,
                 max_position_embeddings=4096),
    # benchmarks on CPU: the indexer-to-MLA cost ratio of V3.2 (16x128 vs 32x576 ~ 64x128 vs 128x576), top-k 256
    "small": dict(_COMMON, hidden_size=512, intermediate_size=1024, moe_intermediate_size=128, num_hidden_layers=6,
                  first_k_dense_replace=1, num_attention_heads=32, q_lora_rank=256, n_routed_experts=32,
                  num_experts_per_tok=8, n_group=8, topk_group=4, index_n_heads=16, index_topk=256,
                  max_position_embeddings=16384),
}
# The published DeepSeek-V3.2 geometry (its config.json), for benchmarks that report figures at the
# real shapes; far too large to make as a checkpoint here.
DEEPSEEK_V32: dict = dict(_COMMON, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                          num_hidden_layers=61, first_k_dense_replace=3, num_attention_heads=128, q_lora_rank=1536,
                          n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4, index_n_heads=64,
                          index_topk=2048, max_position_embeddings=163840, num_key_value_heads=128)
# matrices stored in FP8 by the real checkpoint (spec §8)
_FP8_WEIGHTS = re.compile(r"(q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|gate_proj|up_proj|down_proj"
                          r"|indexer\.wq_b|indexer\.wk)\.weight$")


def _init(name: str, shape: tuple[int, ...], g: torch.Generator, cfg: ModelConfig) -> torch.Tensor:
    if name.endswith("e_score_correction_bias"):
        return torch.rand(shape, generator=g) * 0.1
    if "norm" in name and name.endswith("bias"):
        return torch.randn(shape, generator=g) * 0.1
    if "norm" in name:
        return 1.0 + torch.randn(shape, generator=g) * 0.1
    if name.endswith("embed_tokens.weight"):
        return torch.randn(shape, generator=g)
    fan_in = shape[-1]
    std = fan_in ** -0.5
    if name == "lm_head.weight":
        std *= 4.0  # a clear argmax: greedy decoding must not hinge on rounding
    return torch.randn(shape, generator=g) * std


def tensor_specs(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the HF disk layout (experts one entry each), in a fixed order."""
    layout = CacheLayout(cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.index_head_dim or 128)
    with torch.device("meta"):
        model = DeepseekV32ForCausalLM(cfg, layout)
    specs = []
    for name, p in model.named_parameters():
        m = re.match(r"(.*\.experts)\.(gate_proj|up_proj|down_proj)$", name)
        if m:
            specs += [(f"{m.group(1)}.{e}.{m.group(2)}.weight", tuple(p.shape[1:])) for e in range(p.shape[0])]
        else:
            specs.append((name, tuple(p.shape)))
    return specs


def _mtp_specs(cfg: ModelConfig, specs) -> list[tuple[str, tuple[int, ...]]]:
    """Layer ``num_hidden_layers``: the MTP block real checkpoints carry (spec §7)."""
    n, d = cfg.num_hidden_layers, cfg.hidden_size
    last = f"model.layers.{n - 1}."
    block = [(f"model.layers.{n}." + k[len(last):], s) for k, s in specs if k.startswith(last)]
    return block + [(f"model.layers.{n}.enorm.weight", (d,)), (f"model.layers.{n}.hnorm.weight", (d,)),
                    (f"model.layers.{n}.eh_proj.weight", (d, 2 * d)),
                    (f"model.layers.{n}.shared_head.norm.weight", (d,))]


def make_checkpoint(out: str | Path, preset: str | None = "tiny", config: dict | None = None, dtype: str = "bf16",
                    seed: int = 0, shard_mb: int = 64, with_mtp: bool = True) -> Path:
    if dtype not in ("bf16", "fp8", "fp32"):
        raise ValueError(f"dtype must be bf16, fp8 or fp32, got {dtype!r}")
    raw = dict(config) if config is not None else dict(PRESETS[preset])
    raw.pop("quantization_config", None)
    raw["architectures"] = ["DeepseekV32ForCausalLM"]
    raw["torch_dtype"] = "float32" if dtype == "fp32" else "bfloat16"
    if dtype == "fp8":
        raw["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                      "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}
    cfg = ModelConfig.from_dict(raw)
    if not with_mtp:
        raw["num_nextn_predict_layers"] = 0
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    specs = tensor_specs(cfg)
    if with_mtp:
        specs += _mtp_specs(cfg, specs)
    store = torch.float32 if dtype == "fp32" else torch.bfloat16
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, shape in progress(specs, f"making {out.name}", "tensor"):
        w = _init(name, shape, g, cfg)
        if name.endswith("e_score_correction_bias") or name.endswith("mlp.gate.weight"):
            tensors = {name: w.float()}
        elif dtype == "fp8" and _FP8_WEIGHTS.search(name):
            q, s = fp8.quant_weight(w.to(torch.bfloat16).float())
            tensors = {name: q, name.removesuffix("weight") + "weight_scale_inv": s}
        else:
            tensors = {name: w.to(store)}
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        if size and size + nbytes > shard_mb << 20:
            shards.append({})
            size = 0
        shards[-1].update(tensors)
        size += nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(progress(shards, f"writing {out.name}", "shard")):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / fname, metadata={"format": "pt"})
        for k, t in shard.items():
            weight_map[k] = fname
            total += t.numel() * t.element_size()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"_from_model_config": True, "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
         "do_sample": True, "temperature": 1.0, "top_p": 0.95}, indent=2))
    from dsv32_text.tokenizer import write_tokenizer_files
    write_tokenizer_files(out)
    return out
