"""store_kv: Triton kernel vs torch twin (bytes), and the twin vs the FP8 error model on the unpaged values."""

from __future__ import annotations

import torch

from kernel_params import DEVICES  # noqa: E402  (sets TRITON_INTERPRET before triton loads)

import pytest  # noqa: E402

import dsv32_kernels as K  # noqa: E402
from dsv32_kernels import fp8  # noqa: E402
from dsv32_kernels.layout import CacheLayout  # noqa: E402
from dsv32_kernels import testing as kt  # noqa: E402

MODES = [
    pytest.param(("fp8", torch.float32), id="fp8"),
    pytest.param(("exact", torch.float32), id="exact-fp32"),
    pytest.param(("exact", torch.bfloat16), id="exact-bf16"),
]
CASES = ["within-one-page", "across-page-boundary", "scattered-with-skips", "all-skipped",
         "non-contiguous-inputs", "padded-page-stride"]


def _layout(mode, big: bool) -> CacheLayout:
    name, dtype = mode
    if big:
        return CacheLayout(512, 64, 128, mode=name, dtype=dtype)
    return kt.small_layout(name, dtype)


def _setup(case: str, layout: CacheLayout, device: str, big: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pages = 48 if big else 4
    T = {"within-one-page": 12, "across-page-boundary": 14, "all-skipped": 4}.get(case, 40)
    T = T * 50 if big and case != "all-skipped" else T
    if case == "within-one-page":
        slots = torch.arange(5, 5 + T) % (pages * 64)
    elif case == "across-page-boundary":
        slots = torch.arange(58, 58 + T) % (pages * 64)
    elif case == "all-skipped":
        slots = torch.full((T,), -1)
    else:
        slots = torch.randperm(pages * 64, generator=g)[:T]
        slots[3::7] = -1
    def val(n, scale=1.0):
        x = torch.randn(T, n, generator=g) * scale
        if case == "non-contiguous-inputs":  # a strided view of a wider buffer, in a different dtype
            x = torch.randn(n, 2 * T, generator=g).to(torch.bfloat16).t()[::2]
        return x.to(device)
    c, k_pe, index_k = val(layout.kv_lora_rank, 3.0), val(layout.qk_rope_head_dim), val(layout.index_head_dim)
    if case == "non-contiguous-inputs":
        slots = torch.stack([slots, slots], dim=1)[:, 0]  # stride 2
    pad = 1 if case == "padded-page-stride" else 0
    shape = list(layout.latent_pool_shape(pages))
    shape[1] += pad
    # random bytes everywhere so that a write to a wrong slot shows
    latent = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    index = torch.randint(0, 256, layout.index_pool_shape(pages), generator=g, dtype=torch.uint8)
    if layout.mode == "exact":
        latent = torch.randn(shape, generator=g).to(layout.dtype)
        index = torch.randn(layout.index_pool_shape(pages), generator=g).to(layout.dtype)
    latent = latent.to(device)[:, :64]
    return latent, index.to(device), c, k_pe, index_k, slots.to(device)


def _clone_pool(p: torch.Tensor) -> torch.Tensor:
    """Clone keeping the (possibly padded) page stride."""
    base = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype, device=p.device)
    base.copy_(p)
    return base


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("device", DEVICES)
def test_triton_matches_naive(device, mode, case):
    big = device == "cuda"
    layout = _layout(mode, big)
    latent, index, c, k_pe, index_k, slots = _setup(case, layout, device, big)
    lat_t, idx_t = _clone_pool(latent), index.clone()
    K.naive_store_kv(latent, index, c, k_pe, index_k, slots, layout)
    with K.backend("triton"):
        K.store_kv(lat_t, idx_t, c, k_pe, index_k, slots, layout)
    # The latent path is exact arithmetic on both sides (pow2 scales, RNE to e4m3/bf16): same bytes.
    assert torch.equal(lat_t.view(torch.uint8), latent.view(torch.uint8))
    if layout.mode == "exact":
        assert torch.equal(idx_t, index)
        return
    # The Hadamard rotation is a 128-term fp32 sum whose order differs between torch and tl.dot;
    # its ~γ_128 relative noise can move a value across an e4m3 rounding boundary, so keys may
    # differ by one e4m3 step (2^-3 relative) - scales by nothing, the amax shift being far below
    # a power-of-two boundary for this data (checked by equality).
    keys_t, sc_t = fp8.index_page_views(idx_t, layout)
    keys_n, sc_n = fp8.index_page_views(index, layout)
    assert torch.equal(sc_t.view(torch.int32), sc_n.view(torch.int32))
    differ = keys_t.view(torch.uint8) != keys_n.view(torch.uint8)
    a, b = keys_t[differ].float(), keys_n[differ].float()
    assert ((a - b).abs() <= 2.0 ** -3 * torch.maximum(a.abs(), b.abs()) + 2.0 ** -9).all()
    assert differ.float().mean() < 1e-3


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", MODES)
def test_naive_matches_unpaged_values(mode, case):
    layout = _layout(mode, big=False)
    latent, index, c, k_pe, index_k, slots = _setup(case, layout, "cpu", big=False, seed=1)
    before_lat, before_idx = _clone_pool(latent), index.clone()
    K.naive_store_kv(latent, index, c, k_pe, index_k, slots, layout)
    keep = slots >= 0
    page, off = slots[keep] // 64, slots[keep] % 64
    c, k_pe, index_k = c[keep].float(), k_pe[keep].float(), index_k[keep].float()
    written = torch.zeros(latent.shape[:2], dtype=torch.bool)
    written[page, off] = True
    assert torch.equal(latent[~written].view(torch.uint8), before_lat[~written].view(torch.uint8))
    if layout.mode == "exact":
        assert torch.equal(latent[page, off], torch.cat([c, k_pe], -1).to(layout.dtype))
        assert torch.equal(index[page, off], index_k.to(layout.dtype))
        assert torch.equal(index[~written], before_idx[~written])
        return
    got = fp8.unpack_latent(latent[page, off], layout)
    scale = got.new_ones(got.shape)
    rec = latent[page, off]
    tile_scales = rec[:, layout.latent_scale_offset:layout.latent_rope_offset].contiguous().view(torch.float32)
    scale[:, :layout.kv_lora_rank] = tile_scales.repeat_interleave(128, dim=1)
    # e4m3 round-to-nearest: 2^-4 relative for normals, half the 2^-9 subnormal step (x scale) below
    assert ((got[:, :layout.kv_lora_rank] - c).abs() <= kt.E4M3_REL * c.abs() + 2.0 ** -10 * scale[:, :layout.kv_lora_rank]).all()
    assert ((got[:, layout.kv_lora_rank:] - k_pe).abs() <= kt.BF16_REL * k_pe.abs()).all()
    # scales are the pow2 ceiling of amax/448: the largest |value| lands in (224, 448]
    amax = c.view(len(c), layout.latent_tiles, 128).abs().amax(-1)
    assert ((amax / tile_scales > 224) & (amax / tile_scales <= 448)).all()
    keys, scales = fp8.index_page_views(index, layout)
    rotated = fp8.hadamard(index_k)
    deq = keys[page, off].float() * scales[page, off, None]
    assert ((deq - rotated).abs() <= kt.E4M3_REL * rotated.abs() + 2.0 ** -10 * scales[page, off, None] + 1e-6).all()
    back = fp8.hadamard(deq)  # H is symmetric and orthonormal: rotating back recovers the key,
    # with the rotated-domain error bound carried over in the 2-norm
    assert ((back - index_k).norm(dim=-1) <= (kt.E4M3_REL * rotated.norm(dim=-1) + 2.0 ** -10 * scales[page, off]
                                             * 128 ** 0.5) * 1.001).all()
    untouched = ~written.reshape(-1)
    assert torch.equal(keys.reshape(-1, 128)[untouched].view(torch.uint8),
                       fp8.index_page_views(before_idx, layout)[0].reshape(-1, 128)[untouched].view(torch.uint8))


def test_rejects_bad_pool():
    layout = kt.small_layout("fp8")
    c, pe, ik = torch.zeros(2, 128), torch.zeros(2, 64), torch.zeros(2, 128)
    slots = torch.zeros(2, dtype=torch.int64)
    good_idx = torch.zeros(layout.index_pool_shape(1), dtype=torch.uint8)
    with pytest.raises(ValueError, match="latent_pool"):
        K.store_kv(torch.zeros(1, 64, 576, dtype=torch.uint8), good_idx, c, pe, ik, slots, layout)
    with pytest.raises(ValueError, match="c: expected shape"):
        K.store_kv(torch.zeros(layout.latent_pool_shape(1), dtype=torch.uint8), good_idx, c[:, :64], pe, ik, slots,
                   layout)
