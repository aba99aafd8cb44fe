"""fp8_gemm: block-scaled W8A8 GEMM ``y = x · Wᵀ`` for FP8 checkpoints (spec §8).

``w_q [N, K]`` e4m3 with ``w_scale_inv [ceil(N/128), ceil(K/128)]`` (a multiplier:
``W = w_q · s``); ``x`` is quantised per token per 128 channels with pow2 scales
(``fp8.quant_blocks``, REF ``act_quant``). Two kernels: ``_act_quant_kernel``
writes ``x`` once as e4m3 + scales (instead of re-quantising it in every
N-block), then ``_fp8_gemm_kernel`` accumulates ``dot(x8, w8ᵀ) · s_x · s_w`` per
128-wide K block in fp32 (promoting every K block, as DeepGEMM does for the
Hopper fp8 MMA). K and N need not be multiples of 128.
"""

from __future__ import annotations

import torch
from . import fp8

from ._triton import pow2_scale_bits, quant_e4m3, round_to_bf16, tl, triton
from .dispatch import use_triton
from .checks import expect, same_device

BLOCK_K = 128  # = the quantisation block: one activation scale and one weight scale per K step


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, M, K, x_sm, x_sk, q_sm, s_sm,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    kb = tl.program_id(1)
    k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    rm64 = rm.to(tl.int64)
    x = tl.load(x_ptr + rm64[:, None] * x_sm + k[None, :] * x_sk, mask=(rm[:, None] < M) & (k[None, :] < K),
                other=0.0).to(tl.float32)
    s, inv = pow2_scale_bits(tl.max(tl.abs(x), axis=1))
    q = quant_e4m3(x, inv[:, None])
    tl.store(q_ptr + rm64[:, None] * q_sm + k[None, :], q.to(tl.float8e4nv), mask=rm[:, None] < M)
    tl.store(s_ptr + rm64 * s_sm + kb, s, mask=rm < M)


@triton.jit
def _fp8_gemm_kernel(a_ptr, as_ptr, w_ptr, ws_ptr, c_ptr, M, N, K,
                     a_sm, as_sm, w_sn, w_sk, ws_sn, ws_sk, c_sm, c_sn,
                     MMA_F32: tl.constexpr, OUT_BF16: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mm = rm < M
    nm = rn < N
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for kb in range(tl.cdiv(K, BLOCK_K)):
        k = kb * BLOCK_K + rk
        a = tl.load(a_ptr + rm64[:, None] * a_sm + k[None, :], mask=mm[:, None], other=0.0)
        w = tl.load(w_ptr + rn64[:, None] * w_sn + k[None, :] * w_sk, mask=nm[:, None] & (k[None, :] < K), other=0.0)
        sa = tl.load(as_ptr + rm64 * as_sm + kb, mask=mm, other=0.0)
        sw = tl.load(ws_ptr + (rn // 128) * ws_sn + kb * ws_sk, mask=nm, other=0.0)
        if MMA_F32:
            d = tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            d = tl.dot(a, tl.trans(w))
        acc += d * sa[:, None] * sw[None, :]
    if OUT_BF16:
        acc = round_to_bf16(acc)
    tl.store(c_ptr + rm64[:, None] * c_sm + rn64[None, :] * c_sn, acc.to(c_ptr.dtype.element_ty),
             mask=mm[:, None] & nm[None, :])


def _check(x: torch.Tensor, w_q: torch.Tensor, w_scale_inv: torch.Tensor) -> tuple[int, int]:
    expect(x, "x", (None,) * x.dim(), dtypes=(torch.bfloat16, torch.float16, torch.float32))
    N, K = w_q.shape
    expect(x, "x", (*x.shape[:-1], K))
    expect(w_q, "w_q", (N, K), dtypes=(torch.float8_e4m3fn,))
    expect(w_scale_inv, "w_scale_inv", (-(-N // 128), -(-K // 128)), dtypes=(torch.float32,))
    same_device(x=x, w_q=w_q, w_scale_inv=w_scale_inv)
    return N, K


def fp8_gemm(x: torch.Tensor, w_q: torch.Tensor, w_scale_inv: torch.Tensor) -> torch.Tensor:
    """``x [..., K]`` (bf16/fp16/fp32) · dequant(``w_q [N, K]``)ᵀ → ``[..., N]`` in ``x.dtype``."""
    N, K = _check(x, w_q, w_scale_inv)
    if not use_triton(x.device):
        return naive_fp8_gemm(x, w_q, w_scale_inv)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return out.reshape(*lead, N)
    kt = triton.cdiv(K, BLOCK_K)
    xq = torch.empty(M, kt * BLOCK_K, dtype=torch.float8_e4m3fn, device=x.device)
    xs = torch.empty(M, kt, dtype=torch.float32, device=x.device)
    qm = 16
    _act_quant_kernel[(triton.cdiv(M, qm), kt)](x2, xq, xs, M, K, *x2.stride(), xq.stride(0), xs.stride(0),
                                                  BLOCK_M=qm, BLOCK_K=BLOCK_K, num_warps=4)
    on_gpu = x.is_cuda
    bm = (64 if M > 32 else 16) if on_gpu else 16
    bn = 128 if on_gpu else 16
    _fp8_gemm_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](
        xq, xs, w_q, w_scale_inv, out, M, N, K,
        xq.stride(0), xs.stride(0), *w_q.stride(), *w_scale_inv.stride(), *out.stride(),
        MMA_F32=not on_gpu, OUT_BF16=x.dtype == torch.bfloat16, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=BLOCK_K,
        num_warps=4 if bm <= 16 else 8, num_stages=3 if on_gpu else 1,
    )
    return out.reshape(*lead, N)


def naive_fp8_gemm(x: torch.Tensor, w_q: torch.Tensor, w_scale_inv: torch.Tensor) -> torch.Tensor:
    """Torch twin: quantise ``x`` (zero-padded to a multiple of 128), dequantise both, fp32 matmul."""
    N, K = w_q.shape
    pad = -K % BLOCK_K
    xq, xs = fp8.quant_blocks(torch.nn.functional.pad(x.float(), (0, pad)))
    xd = fp8.dequant_blocks(xq, xs)[..., :K]
    return (xd @ fp8.dequant_weight(w_q, w_scale_inv).T).to(x.dtype)
