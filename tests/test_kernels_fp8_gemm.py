"""fp8_gemm: Triton vs torch twin, twin vs the block-scaled formula and vs unquantised activations.

Tolerances (error model in dsv32_kernels.testing): products of e4m3 values times pow2
scales are exact in fp32, so the two implementations differ only by summation order:
``2·γ_K·mag`` with ``mag = |x_deq|·|W_deq|ᵀ``; a bf16 output adds one bf16 step
(``2^-7·|y|``) where the fp32 values straddle a rounding boundary; Hopper's fp8 MMA
adds ``2^-13·mag``.
"""

from __future__ import annotations

import torch

from kernel_params import DEVICES  # noqa: E402  (sets TRITON_INTERPRET before triton loads)

import pytest  # noqa: E402

import dsv32_kernels as K  # noqa: E402
from dsv32_kernels import fp8  # noqa: E402
from dsv32_kernels import testing as kt  # noqa: E402

# name -> (x shape, N, options)
CASES = {
    "m1-tails-n130-k200": ((1, 200), 130, {}),
    "m5-aligned-n128-k128": ((5, 128), 128, {}),
    "m33-n64-k300": ((33, 300), 64, {}),
    "m17-n256-k384-fp32": ((17, 384), 256, {"dtype": torch.float32}),
    "non-contiguous-x": ((9, 200), 70, {"strided": True}),
    "leading-dims": ((2, 3, 130), 40, {}),
    "outlier-channels": ((6, 256), 48, {"outliers": True}),
}


def _inputs(case: str, device: str, seed: int = 0):
    shape, N, opts = CASES[case]
    if device == "cuda":  # DeepSeek-like widths (kv_a_proj_with_mqa: 576 x 7168) with the same quirks
        shape, N = (*shape[:-1], 7168 + shape[-1] % 128), 576 + N % 128
    g = torch.Generator().manual_seed(seed)
    dtype = opts.get("dtype", torch.bfloat16)
    x = torch.randn(shape, generator=g)
    if opts.get("strided"):
        x = torch.randn(shape[1], 2 * shape[0], generator=g).T[::2]
    if opts.get("outliers"):
        x[..., 7] *= 300.0
    w_q, w_s = fp8.quant_weight(torch.randn(N, shape[-1], generator=g) * 0.05)
    return x.to(dtype).to(device), w_q.to(device), w_s.to(device)


def _mag(x, w_q, w_s):
    K_ = w_q.shape[1]
    xq, xs = fp8.quant_blocks(torch.nn.functional.pad(x.float(), (0, -K_ % 128)))
    xd = fp8.dequant_blocks(xq, xs)[..., :K_]
    return xd.abs() @ fp8.dequant_weight(w_q, w_s).abs().T


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_triton_matches_naive(device, case):
    x, w_q, w_s = _inputs(case, device)
    want = K.naive_fp8_gemm(x, w_q, w_s)
    with K.backend("triton"):
        got = K.fp8_gemm(x, w_q, w_s)
    assert got.dtype == x.dtype and got.shape == (*x.shape[:-1], w_q.shape[0])
    bound = (2 * kt.gamma(w_q.shape[1]) + (kt.FP8_MMA_REL if device == "cuda" else 0.0)) * _mag(x, w_q, w_s)
    if x.dtype == torch.bfloat16:
        bound = bound + 2.0 ** -7 * want.float().abs()
    assert ((got.float() - want.float()).abs() <= bound + 1e-30).all()


@pytest.mark.parametrize("case", CASES)
def test_naive_matches_block_formula(case):
    """Σ over 128-wide K blocks of (x8·w8ᵀ)·s_x·s_w, written out block by block."""
    x, w_q, w_s = _inputs(case, "cpu", seed=1)
    N, K_ = w_q.shape
    x2 = x.reshape(-1, K_).float()
    y = torch.zeros(x2.shape[0], N)
    for kb in range(-(-K_ // 128)):
        sl = slice(128 * kb, min(K_, 128 * kb + 128))
        xq, xs = fp8.quant_blocks(torch.nn.functional.pad(x2[:, sl], (0, 128 - (sl.stop - sl.start))))
        part = xq.float()[:, : sl.stop - sl.start] @ w_q[:, sl].float().T  # exact products, fp32 sums
        y += part * xs * w_s[torch.arange(N) // 128, kb][None, :]
    got = K.naive_fp8_gemm(x, w_q, w_s).float().reshape(-1, N)
    bound = 2 * kt.gamma(K_) * _mag(x2, w_q, w_s)
    if x.dtype == torch.bfloat16:
        bound = bound + kt.BF16_REL * y.abs()  # the twin's output is rounded to bf16, the formula is not
    assert ((got - y).abs() <= bound + 1e-30).all()


@pytest.mark.parametrize("case", CASES)
def test_naive_within_activation_quantisation_error(case):
    """Against unquantised activations: |Δy| <= Σ_d (2^-4|x_d| + 2^-10·s_x)|W_d| (W dequantised exactly)."""
    x, w_q, w_s = _inputs(case, "cpu", seed=2)
    N, K_ = w_q.shape
    x2 = x.reshape(-1, K_).float()
    w = fp8.dequant_weight(w_q, w_s)
    exact = x2 @ w.T
    _, xs = fp8.quant_blocks(torch.nn.functional.pad(x2, (0, -K_ % 128)))
    ex = kt.E4M3_REL * x2.abs() + 2.0 ** -10 * xs.repeat_interleave(128, dim=1)[:, :K_]
    bound = ex @ w.abs().T + 2 * kt.gamma(K_) * (x2.abs() @ w.abs().T)
    got = K.naive_fp8_gemm(x, w_q, w_s).float().reshape(-1, N)
    if x.dtype == torch.bfloat16:  # output rounding: 2^-8 of the unrounded value <= 2^-8·(1+2^-7) of the rounded one
        bound = bound + kt.BF16_REL * (1 + 2.0 ** -7) * got.abs()
    err = (got - exact).abs()
    assert (err <= bound).all()
    assert err.max() > 0


def test_rejects_mismatched_scales():
    w_q, w_s = fp8.quant_weight(torch.randn(130, 200))
    with pytest.raises(ValueError, match="w_scale_inv"):
        K.fp8_gemm(torch.randn(2, 200), w_q, w_s[:1])
    with pytest.raises(ValueError, match="x: expected shape"):
        K.fp8_gemm(torch.randn(2, 100), w_q, w_s)
