"""FP8 weights resident as stored (``weight_format="fp8"``) vs dequantised at load (``"dequant"``).

The bound, per FP8 product (``dsv32_engine/fp8_linear.py``):

* CPU (the torch path): the weight is dequantised per product into the values the dequant
  path holds and the activations are not rounded, so the bound is **zero**: the same greedy
  tokens and bit-identical log-probs (checked below for fp32 and bf16).
* CUDA (``fp8_gemm``, W8A8 as the reference): the activations are rounded to e4m3 per token
  per 128 channels, ``|Δy| <= Σ_d (2^-4 |x_d| + 2^-10 s_x) |W_d|`` plus fp32 summation order.
  Checked per product in ``test_kernels_fp8_gemm.py`` and here on every FP8 product of a real
  forward (the kernel's torch twin standing in on CPU). Through the whole tiny random model
  the rounding is not small: first-token log-probs move by up to ~3 nats and greedy tokens
  split at top-2 margins up to ~2.3 nats (32 prompts, fp32), because e4m3 keeps 3 mantissa
  bits and a slightly moved hidden state can route to other experts. That is the numerics
  of the reference's own ``fp8_gemm`` path, not a loss of this format, so no token-level
  equality is claimed for it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from checkpoints import tiny_checkpoint
from dsv32_kernels import fp8

# experts dominate (64 x 512 wide, vocab 1024): the byte ratio is about the FP8 matrices
LINEAR_HEAVY = dict(vocab_size=1024, n_routed_experts=64, moe_intermediate_size=512)


def _ref_dequant(q, s):
    out_f, in_f = q.shape
    return q.float() * s.float().repeat_interleave(128, 0)[:out_f].repeat_interleave(128, 1)[:, :in_f]


def _load(model_dir: str, dtype: torch.dtype, weight_format: str, local_experts=None):
    from dsv32_engine.config import ModelConfig
    from dsv32_engine.model import DeepseekV32ForCausalLM
    from dsv32_engine.moe import Experts, MoE
    from dsv32_engine.weights import load_weights
    from dsv32_kernels.layout import CacheLayout

    cfg = ModelConfig.from_dir(model_dir)
    with torch.device("meta"):
        model = DeepseekV32ForCausalLM(cfg, CacheLayout(cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.index_head_dim))
        if local_experts is not None:  # what an expert-parallel rank builds, without its process group
            for layer in model.model.layers:
                if isinstance(layer.mlp, MoE):
                    layer.mlp.experts = Experts(cfg, len(local_experts))
    load_weights(model, cfg, model_dir, dtype, "cpu", local_experts, weight_format=weight_format)
    return cfg, model


# -- dequantisation -------------------------------------------------------------------------------

def test_e4m3_bit_conversion_is_exact_for_every_code():
    codes = torch.arange(256, dtype=torch.uint8).view(fp8.FP8)
    ok = ~codes.float().isnan()
    for dtype in (torch.float32, torch.bfloat16):
        got = fp8.e4m3_to(codes, dtype)
        assert got.dtype == dtype and torch.equal(got[ok].float(), codes.float()[ok])


@pytest.mark.parametrize("shape", [(256, 384), (576, 200), (64, 128)], ids=["aligned", "tails", "one-block"])
@pytest.mark.parametrize("scale", ["pow2", "any", "large"])
def test_dequant_weight_is_the_fp32_product_rounded_once(shape, scale):
    g = torch.Generator().manual_seed(0)
    q, s = fp8.quant_weight(torch.randn(*shape, generator=g) * 0.05)
    s = {"pow2": s, "any": s * 1.37, "large": s * 2.0 ** 20}[scale]  # large: the 2^120 is not folded
    want = _ref_dequant(q, s)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(fp8.dequant_weight(q, s, dtype=dtype), want.to(dtype))
    stacked_q, stacked_s = torch.stack([q, q.flip(0)]), torch.stack([s, s.flip(0)])
    assert torch.equal(fp8.dequant_weight(stacked_q, stacked_s), torch.stack([want, _ref_dequant(q.flip(0), s.flip(0))]))


def test_dequant_linear_in_chunks_equals_one_chunk(monkeypatch):
    g = torch.Generator().manual_seed(1)
    q, s = fp8.quant_weight(torch.randn(700, 300, generator=g) * 0.05)
    x = torch.randn(5, 300, generator=g)
    whole = F.linear(x, _ref_dequant(q, s))
    monkeypatch.setattr(fp8, "DEQUANT_CHUNK", 128 * 300)  # one row block at a time, the last one partial
    torch.testing.assert_close(fp8.dequant_linear(x, q, s), whole, rtol=1e-6, atol=1e-6)


# -- loading and resident bytes -------------------------------------------------------------------

def test_fp8_weights_stay_as_stored_and_kv_b_is_dequantised():
    from dsv32_engine.fp8_linear import Linear

    _, model = _load(tiny_checkpoint("fp8"), torch.bfloat16, "fp8")
    attn, moe = model.model.layers[1].self_attn, model.model.layers[1].mlp
    for lin in (attn.q_a_proj, attn.q_b_proj, attn.kv_a_proj_with_mqa, attn.o_proj, attn.indexer.wq_b,
                attn.indexer.wk, moe.shared_experts.down_proj, model.model.layers[0].mlp.gate_proj):
        assert isinstance(lin, Linear) and lin.weight.dtype == fp8.FP8 and lin.weight_scale_inv.dtype == torch.float32
    assert attn.kv_b_proj.weight.dtype == torch.bfloat16 and attn.kv_b_proj.weight_scale_inv is None
    assert moe.experts.gate_proj.dtype == fp8.FP8 and moe.experts.down_proj_scale_inv.shape[0] == 16
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.lm_head.weight_scale_inv is None
    _, plain = _load(tiny_checkpoint("bf16"), torch.bfloat16, "fp8")  # nothing FP8 on disk: as stored
    assert all(p.dtype != fp8.FP8 for p in plain.parameters())


@pytest.mark.slow
def test_resident_bytes_are_the_checkpoints_and_about_half_of_dequantised():
    from dsv32_engine.weights import checkpoint_weight_bytes, resident_weight_bytes

    d = tiny_checkpoint("fp8", **LINEAR_HEAVY)
    cfg, model = _load(d, torch.bfloat16, "fp8")
    kept = resident_weight_bytes(model)
    disk = checkpoint_weight_bytes(cfg, d)
    assert kept["routed_experts"] == disk["routed_experts"]  # e4m3 + scales, byte for byte
    # the rest differs only by kv_b_proj, dequantised to bf16 (1 byte a value more, its scales less), and the
    # indexer's weights_proj, stored in bf16 and kept in fp32 (as the reference computes it)
    attn = [layer.self_attn for layer in model.model.layers]
    extra = sum(a.kv_b_proj.weight.numel() - 4 * -(-a.kv_b_proj.out_features // 128) * -(-a.kv_b_proj.in_features // 128)
                + 2 * a.indexer.weights_proj.weight.numel() for a in attn)
    assert kept["replicated"] - disk["replicated"] == extra
    _, deq = _load(d, torch.bfloat16, "dequant")
    ratio = kept["total"] / resident_weight_bytes(deq)["total"]
    assert ratio <= 0.55, ratio
    # an expert-parallel rank holds its experts as stored too
    cfg, half = _load(d, torch.bfloat16, "fp8", local_experts=list(range(0, 64, 2)))
    assert resident_weight_bytes(half)["routed_experts"] == checkpoint_weight_bytes(cfg, d, list(range(0, 64, 2)))[
        "routed_experts"] == disk["routed_experts"] // 2


def test_bad_weight_format_is_a_config_error():
    from dsv32_engine.config import ConfigError
    from dsv32_engine.engine_config import EngineConfig

    with pytest.raises(ConfigError, match="weight_format must be one of"):
        EngineConfig("x", weight_format="int4")


def test_every_engine_entry_point_takes_weight_format():
    from dsv32_cluster.runtime import engine_argv, engine_config
    from dsv32_serve.cli import build_parser

    for role in ("prefill", "decode", "colocated"):
        args = build_parser([role]).parse_args([role, "--model", "m", "--weight-format", "dequant"])
        assert engine_config(args).weight_format == "dequant"
    up = build_parser(["up"]).parse_args(["up", "--weight-format", "dequant"])
    assert engine_argv(up, skip=("model",)) == ["--weight-format", "dequant"]
    gen = build_parser(["generate"]).parse_args(["generate", "--model", "m", "hi", "--weight-format", "dequant"])
    assert gen.weight_format == "dequant"
    bench = build_parser(["bench"]).parse_args(["bench", "weights", "--weight-formats", "fp8"])
    assert bench.rest == ["--weight-formats", "fp8"]


# -- outputs --------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_fp8_resident_equals_dequantised_at_load_on_cpu(dtype):
    from dsv32_engine import LLM, SamplingParams

    model = tiny_checkpoint("fp8")
    prompts = [[(i * 7919 + j * 104729) % 90000 + 200 for j in range(10 + 25 * i)] for i in range(6)]
    sp = SamplingParams(temperature=0.0, max_tokens=12, logprobs=2, ignore_eos=True)
    kept, deq = LLM(model=model, dtype=dtype), LLM(model=model, dtype=dtype, weight_format="dequant")
    assert kept.engine.weight_bytes["total"] < deq.engine.weight_bytes["total"], \
        "EngineCore must pass EngineConfig.weight_format to load_weights"
    for a, b in zip(kept.generate(prompts, sp), deq.generate(prompts, sp)):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].logprobs == b.outputs[0].logprobs  # bound zero: bit-identical


@pytest.mark.slow
@pytest.mark.parametrize("device", [
    pytest.param("cpu", id="twin"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                              reason="needs CUDA")]),
])
def test_every_fp8_product_of_a_forward_is_within_the_activation_rounding_bound(monkeypatch, device):
    """The CUDA path's numerics (``fp8_gemm``; on CPU its torch twin) on the activations a real forward produces."""
    import dsv32_engine.fp8_linear as fl
    import dsv32_kernels as K
    from dsv32_engine import LLM, SamplingParams
    from dsv32_kernels import testing as kt

    shapes, worst = set(), [0.0]

    def checked(x, w_q, s):
        y = K.fp8_gemm(x, w_q, s) if device == "cuda" else K.naive_fp8_gemm(x, w_q, s)
        K_ = w_q.shape[1]
        xf = x.float().reshape(-1, K_)
        w = _ref_dequant(w_q, s)
        _, xs = fp8.quant_blocks(F.pad(xf, (0, -K_ % 128)))
        ex = kt.E4M3_REL * xf.abs() + 2.0 ** -10 * xs.repeat_interleave(128, dim=1)[:, :K_]
        mma = kt.FP8_MMA_REL if device == "cuda" else 0.0  # Hopper's fp8 MMA accumulation (see the kernel test)
        bound = ex @ w.abs().T + (2 * kt.gamma(K_) + mma) * (xf.abs() @ w.abs().T)
        if x.dtype == torch.bfloat16:  # both outputs rounded to bf16: a step of either
            bound = bound + 2 * kt.BF16_REL * (1 + 2.0 ** -7) * y.float().reshape(-1, w.shape[0]).abs()
        err = (y.float().reshape(-1, w.shape[0]) - F.linear(xf, w).to(x.dtype).float()).abs()
        assert (err <= bound + 1e-30).all()
        worst[0] = max(worst[0], float((err / (bound + 1e-30)).max()))
        shapes.add(tuple(w_q.shape))
        return y

    monkeypatch.setattr(fl, "use_triton", lambda _: True)
    monkeypatch.setattr(fl, "fp8_gemm", checked)
    llm = LLM(model=tiny_checkpoint("fp8"), dtype="bf16", device=device)
    llm.generate([[(j * 104729) % 90000 + 200 for j in range(40)], [5, 6, 7]],
                 SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    cfg = llm.engine.config
    want = {(cfg.q_lora_rank, cfg.hidden_size), (cfg.index_n_heads * cfg.index_head_dim, cfg.q_lora_rank),
            (cfg.hidden_size, cfg.num_attention_heads * cfg.v_head_dim),
            (cfg.moe_intermediate_size, cfg.hidden_size), (cfg.hidden_size, cfg.moe_intermediate_size),
            (cfg.intermediate_size, cfg.hidden_size)}
    assert want <= shapes, want - shapes  # attention, indexer, routed and shared experts, dense MLP
    assert 0 < worst[0] <= 1


# -- expert parallelism ---------------------------------------------------------------------------

def _generate_fp8(ep, model_dir):
    from test_ep import _generate

    return _generate(ep, model_dir, "exact")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ep_with_fp8_experts_generates_what_one_process_does():
    from dsv32_engine.ep_launch import run_group
    from dsv32_engine.weights import checkpoint_weight_bytes
    from test_ep import _merge

    model = tiny_checkpoint("fp8")
    ref_tokens, ref_lp, ref_bytes, _ = _generate_fp8(None, model)
    results = run_group(_generate_fp8, 2, model, timeout_s=600)
    tokens, logprobs = _merge(results)
    assert tokens == ref_tokens
    assert max(abs(a - b) for rid in ref_lp for a, b in zip(logprobs[rid], ref_lp[rid])) <= 1e-3  # as test_ep
    from dsv32_engine.config import ModelConfig

    disk = checkpoint_weight_bytes(ModelConfig.from_dir(model), model)["routed_experts"]
    assert ref_bytes["routed_experts"] == disk
    for _, _, wb, _ in results:
        assert wb["routed_experts"] * 2 == disk and wb["replicated"] == ref_bytes["replicated"]
