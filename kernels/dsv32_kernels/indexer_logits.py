"""indexer_logits: lightning-indexer scores ``Σ_h ReLU(q_h·k_j)·w_h`` (spec §3.4), decode and prefill forms.

fp8 mode: ``q`` is e4m3 with ``q_scale`` and the keys are the cached e4m3 keys
with their pow2 scales: ``logit = Σ_h ReLU(q8_h·k8_j)·w_h·q_scale_h·k_scale_j``
(positive scales commute with ReLU). Both sides must be Hadamard-rotated (the
cache holds rotated keys; rotate ``q`` before quantising it). Exact mode: float
``q`` and keys, no scales. Invisible positions get ``-inf``.

* decode (DeepGEMM ``fp8_paged_mqa_logits``): ``q [B, n, H, D]``; token ``i`` of
  request ``b`` sits at position ``context_lens[b] - n + i`` and sees keys up to
  it. One program = one request x ``PAGES_PER_PROG`` pages; the ``n·H`` query
  rows of the request form the M side of one ``tl.dot`` per 64-key page, so each
  key page is read once per request.
* prefill (DeepGEMM ``fp8_mqa_logits``): ``q [T, H, D]`` against ``k [S, D]`` with
  ragged ranges ``ks[t] <= j < ke[t]``. One program = ``BLOCK_T`` query tokens x
  ``TILES_PER_PROG`` key tiles; tiles outside every range of the block are skipped.
"""

from __future__ import annotations

import torch
from . import fp8
from .layout import CacheLayout

from ._triton import next_pow2, tl, triton
from .dispatch import use_triton
from .checks import check_index_pool, check_pow2, expect, same_device

_CHUNK_ELEMS = 1 << 25  # bound on the [.., H, chunk] score tensor of the torch twins


@triton.jit
def _indexer_logits_decode_kernel(
    q_ptr, w_ptr, qs_ptr, k_ptr, bt_ptr, ctx_ptr, out_ptr,
    n, H, max_pages, max_ctx,
    q_sb, q_sn, q_sh, q_sd, w_sb, w_sn, w_sh, qs_sb, qs_sn, qs_sh,
    k_sp, k_st, bt_sb, bt_sp, o_sb, o_sn,
    FP8: tl.constexpr, HAS_QS: tl.constexpr, MMA_F32: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
    IDX_SCALE_OFF: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, PAGES_PER_PROG: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    R: tl.constexpr = BLOCK_N * BLOCK_H
    r = tl.arange(0, R)
    ri = r // BLOCK_H
    rh = r % BLOCK_H
    rmask = (ri < n) & (rh < H)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + b * q_sb + (ri * q_sn + rh * q_sh)[:, None] + d[None, :] * q_sd, mask=rmask[:, None], other=0.0)
    w = tl.load(w_ptr + b * w_sb + ri * w_sn + rh * w_sh, mask=rmask, other=0.0).to(tl.float32)
    if HAS_QS:
        w = w * tl.load(qs_ptr + b * qs_sb + ri * qs_sn + rh * qs_sh, mask=rmask, other=0.0).to(tl.float32)
    if MMA_F32:
        q = q.to(tl.float32)
    ctx = tl.load(ctx_ptr + b)
    ni = tl.arange(0, BLOCK_N)
    last_visible = ctx - n + ni  # [BLOCK_N]: token i sees keys 0..last_visible[i]
    t = tl.arange(0, PAGE)
    for pp in range(PAGES_PER_PROG):
        p = tl.program_id(1) * PAGES_PER_PROG + pp
        j = p * PAGE + t
        logit = tl.full((BLOCK_N, PAGE), float("-inf"), tl.float32)
        if (p < max_pages) & (p * PAGE < ctx):
            page = tl.load(bt_ptr + b * bt_sb + p * bt_sp).to(tl.int64)
            ok = (t.to(tl.int64) * 0 + page) >= 0  # [PAGE]: the interpreter rejects scalar-and-vector masks
            base = k_ptr + tl.maximum(page, 0) * k_sp
            if FP8:
                k = tl.load((base + t[:, None] * D + d[None, :]).to(tl.pointer_type(tl.float8e4nv)),
                            mask=ok[:, None], other=0.0)
                ksc = tl.load((base + IDX_SCALE_OFF + 4 * t).to(tl.pointer_type(tl.float32)), mask=ok, other=0.0)
            else:
                k = tl.load(base + t[:, None] * k_st + d[None, :], mask=ok[:, None], other=0.0)
            if MMA_F32:
                s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.maximum(s, 0.0) * w[:, None]
            lg = tl.sum(tl.reshape(s, (BLOCK_N, BLOCK_H, PAGE)), axis=1)
            if FP8:
                lg = lg * ksc[None, :]
            logit = tl.where((j[None, :] <= last_visible[:, None]) & ok[None, :], lg, float("-inf"))
        tl.store(out_ptr + b * o_sb + ni[:, None] * o_sn + j[None, :], logit,
                 mask=(ni[:, None] < n) & (j[None, :] < max_ctx))


@triton.jit
def _indexer_logits_prefill_kernel(
    q_ptr, w_ptr, qs_ptr, k_ptr, ksc_ptr, ks_ptr, ke_ptr, out_ptr, T, S, H,
    q_st, q_sh, q_sd, w_st, w_sh, qs_st, qs_sh, k_ss, k_sd, ksc_ss, o_st, o_ss,
    HAS_QS: tl.constexpr, HAS_KS: tl.constexpr, MMA_F32: tl.constexpr, D: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr, TILES_PER_PROG: tl.constexpr,
):
    R: tl.constexpr = BLOCK_T * BLOCK_H
    r = tl.arange(0, R)
    rt = tl.program_id(0) * BLOCK_T + r // BLOCK_H
    rh = r % BLOCK_H
    rmask = (rt < T) & (rh < H)
    rt64 = rt.to(tl.int64)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + (rt64 * q_st + rh * q_sh)[:, None] + d[None, :] * q_sd, mask=rmask[:, None], other=0.0)
    w = tl.load(w_ptr + rt64 * w_st + rh * w_sh, mask=rmask, other=0.0).to(tl.float32)
    if HAS_QS:
        w = w * tl.load(qs_ptr + rt64 * qs_st + rh * qs_sh, mask=rmask, other=0.0).to(tl.float32)
    if MMA_F32:
        q = q.to(tl.float32)
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = tok < T
    ks = tl.load(ks_ptr + tok, mask=tmask, other=2147483647)
    ke = tl.load(ke_ptr + tok, mask=tmask, other=0)
    lo_all = tl.min(ks, axis=0)
    hi_all = tl.max(ke, axis=0)
    for tp in range(TILES_PER_PROG):
        j0 = (tl.program_id(1) * TILES_PER_PROG + tp) * BLOCK_S
        j = j0 + tl.arange(0, BLOCK_S)
        logit = tl.full((BLOCK_T, BLOCK_S), float("-inf"), tl.float32)
        if (j0 < S) & (j0 < hi_all) & (j0 + BLOCK_S > lo_all):
            jm = j < S
            k = tl.load(k_ptr + j.to(tl.int64)[:, None] * k_ss + d[None, :] * k_sd, mask=jm[:, None], other=0.0)
            if MMA_F32:
                s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.maximum(s, 0.0) * w[:, None]
            lg = tl.sum(tl.reshape(s, (BLOCK_T, BLOCK_H, BLOCK_S)), axis=1)
            if HAS_KS:
                lg = lg * tl.load(ksc_ptr + j * ksc_ss, mask=jm, other=0.0)[None, :]
            logit = tl.where((j[None, :] >= ks[:, None]) & (j[None, :] < ke[:, None]), lg, float("-inf"))
        tl.store(out_ptr + tok.to(tl.int64)[:, None] * o_st + j[None, :] * o_ss, logit,
                 mask=tmask[:, None] & (j[None, :] < S))


def _mma_f32(q: torch.Tensor, key_dtype: torch.dtype) -> bool:
    """Native MMA on CUDA when both sides share an fp8/bf16/fp16 dtype; fp32 math otherwise (and always on CPU)."""
    return not (q.is_cuda and q.dtype == key_dtype and q.dtype in (torch.float8_e4m3fn, torch.bfloat16, torch.float16))


def _check_q(q: torch.Tensor, q_scale: torch.Tensor | None, fp8_mode: bool, lead: tuple[int, ...]) -> None:
    if fp8_mode:
        expect(q, "q", (*lead, None, None), dtypes=(torch.float8_e4m3fn,))
        if q_scale is None:
            raise ValueError("fp8 mode needs q_scale (q is e4m3)")
        expect(q_scale, "q_scale", (*lead, q.shape[-2]), floating=True)
    else:
        expect(q, "q", (*lead, None, None), floating=True)
        if q.dtype == torch.float8_e4m3fn and q_scale is None:
            raise ValueError("e4m3 q needs q_scale")


def indexer_logits_decode(q: torch.Tensor, weights: torch.Tensor, index_pool: torch.Tensor,
                          block_tables: torch.Tensor, context_lens: torch.Tensor, layout: CacheLayout,
                          q_scale: torch.Tensor | None = None, *, max_ctx: int | None = None) -> torch.Tensor:
    """Paged index scores ``[B, n, max_ctx]`` fp32 (``max_ctx`` defaults to ``max_pages * 64``).

    ``q [B, n, H, D]`` (e4m3 + ``q_scale [B, n, H]`` in fp8 mode), ``weights [B, n, H]``
    fp32 (with the 64^-0.5·128^-0.5 factors), ``block_tables [B, max_pages]`` int32
    (-1 padded), ``context_lens [B]`` int32 (including the ``n`` query tokens).
    """
    B, n, H, D = q.shape
    _check_q(q, q_scale, layout.mode == "fp8", (B, n))
    expect(q, "q", (B, n, H, layout.index_head_dim))
    expect(weights, "weights", (B, n, H), floating=True)
    expect(block_tables, "block_tables", (B, None), dtypes=(torch.int32, torch.int64))
    expect(context_lens, "context_lens", (B,), dtypes=(torch.int32, torch.int64))
    check_index_pool(index_pool, layout)
    device = same_device(q=q, weights=weights, index_pool=index_pool, block_tables=block_tables,
                         context_lens=context_lens, q_scale=q_scale)
    max_ctx = block_tables.shape[1] * layout.page_size if max_ctx is None else int(max_ctx)
    if not use_triton(device):
        return naive_indexer_logits_decode(q, weights, index_pool, block_tables, context_lens, layout, q_scale,
                                           max_ctx=max_ctx)
    check_pow2("index_head_dim", D)
    out = torch.empty(B, n, max_ctx, dtype=torch.float32, device=device)
    if out.numel() == 0:
        return out
    context_lens = context_lens.contiguous()  # read with unit stride
    fp8_mode = layout.mode == "fp8"
    key_dtype = torch.float8_e4m3fn if fp8_mode else index_pool.dtype
    block_n = next_pow2(n)
    block_h = max(next_pow2(H), 16 // min(block_n, 16))
    pages_per_prog = 4 if q.is_cuda else 1
    qs = q_scale if q_scale is not None else weights
    grid = (B, triton.cdiv(triton.cdiv(max_ctx, layout.page_size), pages_per_prog))
    _indexer_logits_decode_kernel[grid](
        q, weights, qs, index_pool, block_tables, context_lens, out,
        n, H, block_tables.shape[1], max_ctx,
        *q.stride(), *weights.stride(), *qs.stride(),
        index_pool.stride(0), 0 if fp8_mode else index_pool.stride(1), *block_tables.stride(), *out.stride()[:2],
        FP8=fp8_mode, HAS_QS=q_scale is not None, MMA_F32=_mma_f32(q, key_dtype), D=D, PAGE=layout.page_size,
        IDX_SCALE_OFF=layout.index_scale_offset, BLOCK_N=block_n, BLOCK_H=block_h, PAGES_PER_PROG=pages_per_prog,
        num_warps=8 if block_n * block_h >= 128 else 4, num_stages=2,
    )
    return out


def naive_indexer_logits_decode(q: torch.Tensor, weights: torch.Tensor, index_pool: torch.Tensor,
                                block_tables: torch.Tensor, context_lens: torch.Tensor, layout: CacheLayout,
                                q_scale: torch.Tensor | None = None, *, max_ctx: int | None = None) -> torch.Tensor:
    """Torch twin of :func:`indexer_logits_decode`: gather the pages, score in fp32, mask."""
    B, n, H, D = q.shape
    page = layout.page_size
    L = block_tables.shape[1] * page
    max_ctx = L if max_ctx is None else int(max_ctx)
    pages = block_tables.long()
    if layout.mode == "fp8":
        keys, scales = fp8.index_page_views(index_pool, layout)
        k = keys[pages.clamp_min(0)].reshape(B, L, D)
        k_scale = scales[pages.clamp_min(0)].reshape(B, L)
    else:
        k = index_pool[pages.clamp_min(0)].reshape(B, L, D)
        k_scale = None
    w = weights.float() if q_scale is None else weights.float() * q_scale.float()
    qf = q.float()
    out = torch.empty(B, n, L, dtype=torch.float32, device=q.device)
    step = max(page, _CHUNK_ELEMS // max(1, B * n * H))
    for l0 in range(0, L, step):
        s = torch.einsum("bnhd,bld->bnhl", qf, k[:, l0:l0 + step].float())
        out[..., l0:l0 + step] = torch.einsum("bnhl,bnh->bnl", s.clamp_min_(0), w)
    if k_scale is not None:
        out *= k_scale[:, None, :]
    pos = context_lens.long()[:, None] - n + torch.arange(n, device=q.device)  # [B, n]
    j = torch.arange(L, device=q.device)
    visible = (j <= pos[..., None]) & (pages >= 0).repeat_interleave(page, dim=1)[:, None, :]
    out.masked_fill_(~visible, float("-inf"))
    if max_ctx <= L:
        return out[..., :max_ctx].contiguous()
    return torch.nn.functional.pad(out, (0, max_ctx - L), value=float("-inf"))


def indexer_logits_prefill(q: torch.Tensor, weights: torch.Tensor, k: torch.Tensor, k_scale: torch.Tensor | None,
                           ks: torch.Tensor, ke: torch.Tensor, q_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Ragged index scores ``[T, S]`` fp32: row ``t`` is finite only for ``ks[t] <= j < ke[t]``.

    ``q [T, H, D]`` (e4m3 + ``q_scale [T, H]``, or float), ``weights [T, H]`` fp32,
    ``k [S, D]`` (e4m3 + ``k_scale [S]`` fp32, or float with ``k_scale=None``),
    ``ks``/``ke [T]`` int32 (causality: ``ke = start + position + 1``).
    """
    T, H, D = q.shape
    S = k.shape[0]
    fp8_mode = k.dtype == torch.float8_e4m3fn
    _check_q(q, q_scale, fp8_mode, (T,))
    expect(weights, "weights", (T, H), floating=True)
    expect(k, "k", (S, D))
    if fp8_mode:
        if k_scale is None:
            raise ValueError("e4m3 k needs k_scale")
        expect(k_scale, "k_scale", (S,), dtypes=(torch.float32,))
    for name, v in (("ks", ks), ("ke", ke)):
        expect(v, name, (T,), dtypes=(torch.int32, torch.int64))
    device = same_device(q=q, weights=weights, k=k, k_scale=k_scale, ks=ks, ke=ke, q_scale=q_scale)
    if not use_triton(device):
        return naive_indexer_logits_prefill(q, weights, k, k_scale, ks, ke, q_scale)
    check_pow2("index_head_dim", D)
    out = torch.empty(T, S, dtype=torch.float32, device=device)
    if T == 0 or S == 0:
        return out.fill_(float("-inf"))
    ks, ke = ks.contiguous(), ke.contiguous()  # read with unit stride
    block_h = next_pow2(H)
    block_t = max(1, min(128 // block_h, 16)) if q.is_cuda else max(1, 16 // block_h)
    block_h = max(block_h, 16 // block_t)
    tiles = 8 if q.is_cuda else 2
    qs = q_scale if q_scale is not None else weights
    kscale = k_scale if k_scale is not None else weights
    grid = (triton.cdiv(T, block_t), triton.cdiv(triton.cdiv(S, 64), tiles))
    _indexer_logits_prefill_kernel[grid](
        q, weights, qs, k, kscale, ks, ke, out, T, S, H,
        *q.stride(), *weights.stride(), *qs.stride(), *k.stride(), kscale.stride(0), *out.stride(),
        HAS_QS=q_scale is not None, HAS_KS=k_scale is not None, MMA_F32=_mma_f32(q, k.dtype), D=D,
        BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_S=64, TILES_PER_PROG=tiles,
        num_warps=8 if block_t * block_h >= 128 else 4, num_stages=2,
    )
    return out


def naive_indexer_logits_prefill(q: torch.Tensor, weights: torch.Tensor, k: torch.Tensor,
                                 k_scale: torch.Tensor | None, ks: torch.Tensor, ke: torch.Tensor,
                                 q_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Torch twin of :func:`indexer_logits_prefill` (chunked over query tokens to bound memory)."""
    T, H, _ = q.shape
    S = k.shape[0]
    kf = k.float()
    w = weights.float() if q_scale is None else weights.float() * q_scale.float()
    out = torch.empty(T, S, dtype=torch.float32, device=q.device)
    step = max(1, _CHUNK_ELEMS // max(1, H * S))
    for t0 in range(0, T, step):
        s = torch.einsum("thd,sd->ths", q[t0:t0 + step].float(), kf)
        out[t0:t0 + step] = torch.einsum("ths,th->ts", s.clamp_min_(0), w[t0:t0 + step])
    if k_scale is not None:
        out *= k_scale.float()[None, :]
    j = torch.arange(S, device=q.device)
    visible = (j >= ks.long()[:, None]) & (j < ke.long()[:, None])
    return out.masked_fill_(~visible, float("-inf"))
