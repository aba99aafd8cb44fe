"""Unit tests: page allocator, cache layout arithmetic, FP8 helpers, RoPE conventions."""

from __future__ import annotations

import pytest
import torch

from dsv32_kernels import fp8
from dsv32_engine.cache import OutOfPages, PageAllocator
from dsv32_engine.config import ModelConfig
from dsv32_kernels.layout import CacheLayout
from dsv32_engine.rope import rope_half, rope_interleaved, yarn_inv_freq


def test_allocator_query_commit_and_leak_check():
    a = PageAllocator(4)
    assert a.can_allocate(4) and not a.can_allocate(5)
    with pytest.raises(OutOfPages):
        a.allocate(5)
    assert a.num_free == 4  # a failed allocate takes nothing
    p = a.allocate(3)
    assert a.num_free == 1
    a.free(p[1:])
    assert a.num_free == 3  # p[0] is still allocated
    with pytest.raises(AssertionError, match="still referenced"):
        a.check_no_leaks()
    a.free(p[:1])
    a.check_no_leaks()
    with pytest.raises(ValueError, match="double free"):
        a.free(p[:1])


def test_layout_bytes_match_the_serving_formats():
    v32 = CacheLayout(512, 64, 128, mode="fp8")
    assert v32.latent_token_bytes == 656 and v32.index_token_bytes == 132
    assert v32.index_page_bytes == 8448 and v32.latent_rope_offset == 528 and v32.index_scale_offset == 8192
    exact = CacheLayout(512, 64, 128, mode="exact", dtype=torch.bfloat16)
    assert exact.latent_token_bytes == 1152
    expanded = CacheLayout.expanded_kv_token_bytes(128, 192, 128)
    assert expanded == 81920 and round(expanded / v32.token_bytes) == 104
    with pytest.raises(ValueError, match="multiple of 128"):
        CacheLayout(100, 64, 128, mode="fp8")


def test_official_config_parses_with_spec_values(hf_config_dir):
    cfg = ModelConfig.from_dir(hf_config_dir)
    assert cfg.softmax_scale == pytest.approx(0.1352338, abs=1e-7)
    assert cfg.has_indexer and cfg.is_fp8_checkpoint and cfg.is_moe_layer(3) and not cfg.is_moe_layer(2)
    inv, attn = yarn_inv_freq(cfg)
    base = 10000 ** (-torch.arange(0, 64, 2) / 64)
    assert attn == 1.0
    # high-frequency dims (i <= low = 10) keep their frequency; low-frequency ones (i >= high = 23) are divided by 40
    assert torch.allclose(inv[:11], base[:11]) and torch.allclose(inv[23:], base[23:] / 40)


def test_fp8_pow2_scales_and_record_roundtrip():
    x = torch.randn(5, 512) * 3
    q, s = fp8.quant_blocks(x)
    assert torch.equal(s, torch.exp2(torch.log2(s).round()))  # ue8m0: powers of two
    assert ((fp8.dequant_blocks(q, s) - x).abs() <= x.abs() * 2 ** -4 + s.repeat_interleave(128, -1) * 2 ** -9).all()
    layout = CacheLayout(512, 64, 128, mode="fp8")
    kpe = torch.randn(5, 64)
    rec = fp8.pack_latent(x, kpe, layout)
    assert rec.dtype == torch.uint8 and rec.shape == (5, 656)
    back = fp8.unpack_latent(rec, layout)
    assert torch.equal(back[:, :512], fp8.dequant_blocks(q, s))
    assert torch.equal(back[:, 512:], kpe.to(torch.bfloat16).float())


def test_hadamard_is_orthonormal():
    h = fp8.hadamard_matrix(128)
    assert torch.allclose(h @ h.T, torch.eye(128), atol=1e-6)


def test_rope_conventions_differ_and_preserve_norm():
    x = torch.randn(3, 64)
    ang = torch.rand(3, 32)
    cos, sin = ang.cos(), ang.sin()
    a, b = rope_interleaved(x, cos, sin), rope_half(x, cos, sin)
    assert torch.allclose(a.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    assert torch.allclose(b.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    assert not torch.allclose(a, b)
    # interleaved rotates (x0, x1) together; half-split rotates (x0, x32) together
    assert torch.allclose(a[:, :2], torch.stack([x[:, 0] * cos[:, 0] - x[:, 1] * sin[:, 0],
                                                 x[:, 1] * cos[:, 0] + x[:, 0] * sin[:, 0]], -1), atol=1e-6)
    assert torch.allclose(b[:, [0, 32]], torch.stack([x[:, 0] * cos[:, 0] - x[:, 32] * sin[:, 0],
                                                      x[:, 32] * cos[:, 0] + x[:, 0] * sin[:, 0]], -1), atol=1e-6)
