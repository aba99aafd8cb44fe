"""sparse_mla_decode: absorbed MLA (MQA form) over each request's top-k cache slots (spec §3.1, §4).

``q [B, H, 576] = [q_lat 512 ‖ q_pe 64]``; ``K`` = the cached 576 values of each
selected slot (fp8 records dequantised in the kernel), ``V = K[:512]``;
``o = softmax(q·Kᵀ·sm_scale)·V`` with fp32 online softmax, ``lse`` in natural log.
Slots ``-1`` are skipped; a row with none gives ``o = 0``, ``lse = -inf``.

Kernel shape (FlashMLA-like): all heads of a request share its selected slots,
so one program owns ``BLOCK_H`` heads of one row and streams ``BLOCK_N`` records
at a time: each 656-byte record is loaded once per head block and both products
are ``tl.dot``s (``[BLOCK_H, 576] x [576, BLOCK_N]`` and ``[BLOCK_H, BLOCK_N] x
[BLOCK_N, 512]``). fp8 tiles are dequantised as ``e4m3 · 2^k``, exact in bf16, so
on CUDA the MMAs run in bf16 with fp32 accumulation; on CPU (interpreter) in fp32.
Small batches split the top-k across programs (``num_splits``) and a second
kernel merges the partial results by their log-sum-exp.
"""

from __future__ import annotations

import torch
from . import fp8
from .layout import FP8_TILE, CacheLayout

from ._triton import next_pow2, tl, triton
from .dispatch import use_triton
from .checks import check_latent_pool, check_pow2, expect, same_device

LOG2E = 1.4426950408889634
_GATHER_ELEMS = 1 << 24  # bound on the gathered [rows, topk, 576] fp32 block of the torch twin
# GPU tiling (untuned: no GPU was available when this was written). 64 heads x 512 fp32
# accumulators need 8 warps to stay in registers.
GPU_BLOCK_H, GPU_BLOCK_N, GPU_WARPS = 64, 64, 8


@triton.jit
def _sparse_mla_kernel(
    q_ptr, kv_ptr, idx_ptr, o_ptr, lse_ptr, H, head_blocks, TOPK, blocks_per_split, scale_log2,
    q_sr, q_sh, q_sd, kv_sp, kv_st, idx_sr, idx_sk, o_sr, o_ss, o_sh, lse_sr, lse_ss,
    FP8: tl.constexpr, MMA_BF16: tl.constexpr, DV: tl.constexpr, DR: tl.constexpr, TILE: tl.constexpr,
    SCALE_OFF: tl.constexpr, ROPE_OFF: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # head blocks vary fastest so that the programs sharing a row's records run together (L2 reuse);
    # rows ride on axis 0 because axis 1 is limited to 65535 programs
    pid = tl.program_id(0)
    row = (pid // head_blocks).to(tl.int64)
    split = tl.program_id(1)
    heads = (pid % head_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = heads < H
    dv = tl.arange(0, DV)
    dr = tl.arange(0, DR)
    q_rows = q_ptr + row * q_sr + heads[:, None] * q_sh
    q_lat = tl.load(q_rows + dv[None, :] * q_sd, mask=hmask[:, None], other=0.0).to(tl.float32)
    q_pe = tl.load(q_rows + (DV + dr[None, :]) * q_sd, mask=hmask[:, None], other=0.0).to(tl.float32)
    if MMA_BF16:
        q_lat = q_lat.to(tl.bfloat16)
        q_pe = q_pe.to(tl.bfloat16)
    m = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, DV), tl.float32)
    nb0 = split * blocks_per_split
    for nb in range(nb0, nb0 + blocks_per_split):
        kk = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        idx = tl.load(idx_ptr + row * idx_sr + kk * idx_sk, mask=kk < TOPK, other=-1).to(tl.int64)
        if tl.max(idx, axis=0) >= 0:  # skip blocks of padding
            valid = idx >= 0
            slot = tl.maximum(idx, 0)
            rec = kv_ptr + (slot // PAGE) * kv_sp + (slot % PAGE) * kv_st  # [BLOCK_N] record starts
            if FP8:
                NT: tl.constexpr = DV // TILE
                c8 = tl.load((rec[:, None] + dv[None, :]).to(tl.pointer_type(tl.float8e4nv)),
                             mask=valid[:, None], other=0.0)
                sc = tl.load((rec[:, None] + SCALE_OFF + 4 * tl.arange(0, NT)[None, :]).to(tl.pointer_type(tl.float32)),
                             mask=valid[:, None], other=0.0)
                c = tl.reshape(tl.reshape(c8.to(tl.float32), (BLOCK_N, NT, TILE)) * sc[:, :, None], (BLOCK_N, DV))
                pe = tl.load((rec[:, None] + ROPE_OFF + 2 * dr[None, :]).to(tl.pointer_type(tl.bfloat16)),
                             mask=valid[:, None], other=0.0).to(tl.float32)
            else:
                c = tl.load(rec[:, None] + dv[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
                pe = tl.load(rec[:, None] + DV + dr[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
            if MMA_BF16:
                c = c.to(tl.bfloat16)
                pe = pe.to(tl.bfloat16)
                s = tl.dot(q_lat, tl.trans(c)) + tl.dot(q_pe, tl.trans(pe))
            else:
                s = tl.dot(q_lat, tl.trans(c), input_precision="ieee") + tl.dot(q_pe, tl.trans(pe), input_precision="ieee")
            s = tl.where(valid[None, :], s * scale_log2, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            if MMA_BF16:
                acc = acc * alpha[:, None] + tl.dot(p.to(tl.bfloat16), c)
            else:
                acc = acc * alpha[:, None] + tl.dot(p, c, input_precision="ieee")
            m = m_new
    empty = l == 0.0
    o = acc / tl.where(empty, 1.0, l)[:, None]
    lse = tl.where(empty, float("-inf"), (m + tl.log2(tl.where(empty, 1.0, l))) / 1.4426950408889634)
    tl.store(o_ptr + row * o_sr + split * o_ss + heads[:, None] * o_sh + dv[None, :], o, mask=hmask[:, None])
    tl.store(lse_ptr + row * lse_sr + split * lse_ss + heads, lse, mask=hmask)


@triton.jit
def _sparse_mla_combine_kernel(
    op_ptr, lsep_ptr, o_ptr, lse_ptr, H, n_splits,
    op_sr, op_ss, op_sh, lp_sr, lp_ss, o_sr, o_sh, lse_sr,
    DV: tl.constexpr, BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = heads < H
    dv = tl.arange(0, DV)
    m = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    for sp in range(n_splits):
        m = tl.maximum(m, tl.load(lsep_ptr + row * lp_sr + sp * lp_ss + heads, mask=hmask, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    den = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, DV), tl.float32)
    for sp in range(n_splits):
        wgt = tl.exp(tl.load(lsep_ptr + row * lp_sr + sp * lp_ss + heads, mask=hmask, other=float("-inf")) - m_safe)
        part = tl.load(op_ptr + row * op_sr + sp * op_ss + heads[:, None] * op_sh + dv[None, :], mask=hmask[:, None],
                       other=0.0)
        den += wgt
        acc += wgt[:, None] * part
    empty = den == 0.0
    tl.store(o_ptr + row * o_sr + heads[:, None] * o_sh + dv[None, :], acc / tl.where(empty, 1.0, den)[:, None],
             mask=hmask[:, None])
    tl.store(lse_ptr + row * lse_sr + heads, tl.where(empty, float("-inf"), m_safe + tl.log(tl.where(empty, 1.0, den))),
             mask=hmask)


def check_sparse_mla_args(q: torch.Tensor, latent_pool: torch.Tensor, indices: torch.Tensor,
                          layout: CacheLayout) -> torch.device:
    R, H = q.shape[0], q.shape[1]
    expect(q, "q", (R, H, layout.latent_dim), floating=True)
    expect(indices, "indices", (R, None), dtypes=(torch.int32, torch.int64))
    check_latent_pool(latent_pool, layout)
    return same_device(q=q, latent_pool=latent_pool, indices=indices)


def _default_splits(q: torch.Tensor, rows: int, head_blocks: int, n_blocks: int) -> int:
    """Split only when rows x head blocks leave SMs idle (the partial results cost a write and a read
    of ``[rows, splits, H, 512]`` fp32), each split keeping >= 4 blocks of work."""
    if not q.is_cuda:
        return 1
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    want = sms // max(1, rows * head_blocks)
    return max(1, min(want, n_blocks // 4))


def launch_sparse_mla(q: torch.Tensor, latent_pool: torch.Tensor, indices: torch.Tensor, sm_scale: float,
                      layout: CacheLayout, num_splits: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared by decode (rows = requests) and prefill (rows = query tokens)."""
    R, H, _ = q.shape
    topk = indices.shape[1]
    DV, DR = layout.kv_lora_rank, layout.qk_rope_head_dim
    check_pow2("kv_lora_rank", DV)
    check_pow2("qk_rope_head_dim", DR)
    o = torch.empty(R, H, DV, dtype=torch.float32, device=q.device)
    lse = torch.empty(R, H, dtype=torch.float32, device=q.device)
    if R == 0:
        return o, lse
    on_gpu = q.is_cuda
    # CPU (interpreter) tiles are the smallest tl.dot accepts; GPU tiles follow FlashMLA (64 heads x 64 slots)
    block_h = min(GPU_BLOCK_H, max(16, next_pow2(H))) if on_gpu else 16
    block_n = GPU_BLOCK_N if on_gpu else 16
    head_blocks = triton.cdiv(H, block_h)
    n_blocks = max(1, triton.cdiv(topk, block_n))
    splits = _default_splits(q, R, head_blocks, n_blocks) if num_splits is None else max(1, min(num_splits, n_blocks))
    per_split = triton.cdiv(n_blocks, splits)
    splits = triton.cdiv(n_blocks, per_split)
    if splits > 1:
        o_part = torch.empty(R, splits, H, DV, dtype=torch.float32, device=q.device)
        lse_part = torch.empty(R, splits, H, dtype=torch.float32, device=q.device)
    else:
        o_part, lse_part = o.unsqueeze(1), lse.unsqueeze(1)
    fp8_mode = layout.mode == "fp8"
    mma_bf16 = on_gpu and (fp8_mode or (q.dtype == torch.bfloat16 and latent_pool.dtype == torch.bfloat16))
    _sparse_mla_kernel[(head_blocks * R, splits)](
        q, latent_pool, indices, o_part, lse_part, H, head_blocks, topk, per_split, sm_scale * LOG2E,
        *q.stride(), latent_pool.stride(0), latent_pool.stride(1), *indices.stride(),
        o_part.stride(0), o_part.stride(1), o_part.stride(2), lse_part.stride(0), lse_part.stride(1),
        FP8=fp8_mode, MMA_BF16=mma_bf16, DV=DV, DR=DR, TILE=FP8_TILE, SCALE_OFF=layout.latent_scale_offset,
        ROPE_OFF=layout.latent_rope_offset, PAGE=layout.page_size, BLOCK_H=block_h, BLOCK_N=block_n,
        num_warps=GPU_WARPS if on_gpu else 4, num_stages=2,
    )
    if splits > 1:
        _sparse_mla_combine_kernel[(R, head_blocks)](
            o_part, lse_part, o, lse, H, splits,
            o_part.stride(0), o_part.stride(1), o_part.stride(2), lse_part.stride(0), lse_part.stride(1),
            o.stride(0), o.stride(1), lse.stride(0), DV=DV, BLOCK_H=block_h, num_warps=8 if on_gpu else 4,
        )
    return o, lse


def sparse_mla_decode(q: torch.Tensor, latent_pool: torch.Tensor, indices: torch.Tensor, sm_scale: float,
                      layout: CacheLayout, *, num_splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [B, H, 576]``, ``indices [B, topk]`` physical slots (-1 = skip) → ``o [B, H, 512]``, ``lse [B, H]`` fp32.

    ``num_splits`` forces the top-k split (default: by occupancy on CUDA, 1 elsewhere).
    """
    device = check_sparse_mla_args(q, latent_pool, indices, layout)
    if not use_triton(device):
        return naive_sparse_mla_decode(q, latent_pool, indices, sm_scale, layout)
    return launch_sparse_mla(q, latent_pool, indices, sm_scale, layout, num_splits)


def naive_sparse_mla_decode(q: torch.Tensor, latent_pool: torch.Tensor, indices: torch.Tensor, sm_scale: float,
                            layout: CacheLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin: gather the selected slots (dequantised), softmax in fp32, weighted sum.

    Rows are processed in chunks that bound the gathered ``[rows, topk, 576]`` block.
    """
    R, H, _ = q.shape
    topk = indices.shape[1]
    DV = layout.kv_lora_rank
    o = torch.empty(R, H, DV, dtype=torch.float32, device=q.device)
    lse = torch.empty(R, H, dtype=torch.float32, device=q.device)
    flat = latent_pool.view(-1, latent_pool.shape[-1]) if latent_pool.is_contiguous() else None
    step = max(1, _GATHER_ELEMS // max(1, topk * layout.latent_dim))
    for r0 in range(0, R, step):
        idx = indices[r0:r0 + step].long()
        valid = idx >= 0
        slot = idx.clamp_min(0)
        if flat is not None:
            rows = flat[slot]
        else:
            rows = latent_pool[slot // layout.page_size, slot % layout.page_size]
        kv = fp8.unpack_latent(rows, layout) if layout.mode == "fp8" else rows.float()  # [r, topk, 576]
        s = torch.einsum("rhd,rkd->rhk", q[r0:r0 + step].float(), kv) * sm_scale
        s.masked_fill_(~valid[:, None, :], float("-inf"))
        chunk_lse = torch.logsumexp(s, dim=-1)  # -inf for rows without any slot
        p = torch.exp(s - chunk_lse.nan_to_num(neginf=0.0)[..., None])
        o[r0:r0 + step] = torch.einsum("rhk,rkd->rhd", p, kv[..., :DV])
        lse[r0:r0 + step] = chunk_lse
    return o, lse
