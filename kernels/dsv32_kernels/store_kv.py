"""store_kv: write one step's latent and indexer keys into the paged pools.

Per token ``t`` with ``slot = slot_mapping[t] >= 0`` (``page * 64 + offset``):

* fp8 mode (spec §6.2-6.3): the latent record gets ``c`` as 4 e4m3 tiles of 128
  with pow2 fp32 scales and ``k_pe`` as bf16 (``fp8.pack_latent``); the indexer
  page gets ``hadamard(index_k)`` (fp32) as 128 e4m3 at byte ``128·offset`` and
  its pow2 scale at byte ``8192 + 4·offset``;
* exact mode: ``[c ‖ k_pe]`` and ``index_k`` (unrotated) cast to the pool dtype.

``index_k=None`` (a ``deepseek_v3`` model: no indexer, no index pool) writes the
latent records only.

The kernel handles ``BLOCK_T`` tokens per program so that the Hadamard
rotation is one ``[BLOCK_T, 128] x [128, 128]`` ``tl.dot``.
"""

from __future__ import annotations

import torch
from . import fp8
from .layout import FP8_TILE, CacheLayout

from ._triton import pow2_scale_bits, quant_e4m3, round_to_bf16, tl, triton
from .dispatch import use_triton
from .checks import check_latent_pool, check_pools, expect

BLOCK_T = 16  # tokens per program (tl.dot needs >= 16 rows)


@triton.jit
def _store_kv_kernel(
    c_ptr, pe_ptr, ik_ptr, slot_ptr, had_ptr, lat_ptr, idx_ptr, T,
    c_st, c_sd, pe_st, pe_sd, ik_st, ik_sd,
    lat_sp, lat_st, idx_sp, idx_st,
    FP8: tl.constexpr, DV: tl.constexpr, DR: tl.constexpr, DI: tl.constexpr, PAGE: tl.constexpr,
    TILE: tl.constexpr, SCALE_OFF: tl.constexpr, ROPE_OFF: tl.constexpr, IDX_SCALE_OFF: tl.constexpr,
    POOL_BF16: tl.constexpr, HAS_INDEX: tl.constexpr, BLOCK_T: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    slot = tl.load(slot_ptr + t, mask=t < T, other=-1).to(tl.int64)
    ok = slot >= 0
    page = slot // PAGE
    off = slot % PAGE
    t64 = t.to(tl.int64)
    dv = tl.arange(0, DV)
    dr = tl.arange(0, DR)
    di = tl.arange(0, DI)
    c = tl.load(c_ptr + t64[:, None] * c_st + dv[None, :] * c_sd, mask=ok[:, None], other=0.0).to(tl.float32)
    pe = tl.load(pe_ptr + t64[:, None] * pe_st + dr[None, :] * pe_sd, mask=ok[:, None], other=0.0).to(tl.float32)
    if FP8:
        # latent record: 4 x 128 e4m3 | 4 fp32 scales | 64 bf16 (byte offsets)
        NT: tl.constexpr = DV // TILE
        rec = page * lat_sp + off * lat_st
        c3 = tl.reshape(c, (BLOCK_T, NT, TILE))
        s, inv = pow2_scale_bits(tl.max(tl.abs(c3), axis=2))
        q = tl.reshape(quant_e4m3(c3, inv[:, :, None]), (BLOCK_T, DV))
        rec_p = lat_ptr + rec[:, None]
        tl.store((rec_p + dv[None, :]).to(tl.pointer_type(tl.float8e4nv)), q.to(tl.float8e4nv), mask=ok[:, None])
        nt = tl.arange(0, NT)
        tl.store((rec_p + SCALE_OFF + 4 * nt[None, :]).to(tl.pointer_type(tl.float32)), s, mask=ok[:, None])
        tl.store((rec_p + ROPE_OFF + 2 * dr[None, :]).to(tl.pointer_type(tl.bfloat16)),
                 round_to_bf16(pe).to(tl.bfloat16), mask=ok[:, None])
        if HAS_INDEX:
            # indexer key: Hadamard-rotate (fp32), one pow2 scale per key, DeepGEMM page layout
            k = tl.load(ik_ptr + t64[:, None] * ik_st + di[None, :] * ik_sd, mask=ok[:, None], other=0.0)
            had = tl.load(had_ptr + di[:, None] * DI + di[None, :])
            kr = tl.dot(k.to(tl.float32), had, input_precision="ieee")
            ks, kinv = pow2_scale_bits(tl.max(tl.abs(kr), axis=1))
            kq = quant_e4m3(kr, kinv[:, None])
            pg = idx_ptr + page * idx_sp
            tl.store((pg[:, None] + off[:, None] * DI + di[None, :]).to(tl.pointer_type(tl.float8e4nv)),
                     kq.to(tl.float8e4nv), mask=ok[:, None])
            tl.store((pg + IDX_SCALE_OFF + 4 * off).to(tl.pointer_type(tl.float32)), ks, mask=ok)
    else:
        if POOL_BF16:
            c = round_to_bf16(c)
            pe = round_to_bf16(pe)
        rec = page * lat_sp + off * lat_st
        out_ty = lat_ptr.dtype.element_ty
        tl.store(lat_ptr + rec[:, None] + dv[None, :], c.to(out_ty), mask=ok[:, None])
        tl.store(lat_ptr + rec[:, None] + DV + dr[None, :], pe.to(out_ty), mask=ok[:, None])
        if HAS_INDEX:
            k = tl.load(ik_ptr + t64[:, None] * ik_st + di[None, :] * ik_sd, mask=ok[:, None], other=0.0)
            k = k.to(tl.float32)
            if POOL_BF16:
                k = round_to_bf16(k)
            tl.store(idx_ptr + (page * idx_sp + off * idx_st)[:, None] + di[None, :], k.to(out_ty), mask=ok[:, None])


def store_kv(latent_pool: torch.Tensor, index_pool: torch.Tensor | None, c: torch.Tensor, k_pe: torch.Tensor,
             index_k: torch.Tensor | None, slot_mapping: torch.Tensor, layout: CacheLayout) -> None:
    """Write ``c [T, kv_lora_rank]``, ``k_pe [T, rope]``, ``index_k [T, index_head_dim]`` at ``slot_mapping [T]``.

    ``c`` is post-norm, ``k_pe`` post-RoPE, ``index_k`` post-LayerNorm and RoPE but
    not yet Hadamard-rotated (fp8 mode rotates it here). ``slot_mapping == -1``
    skips a token. ``index_k=None`` writes the latent only (``index_pool`` is then
    ignored and may be ``None``). In place.
    """
    T = c.shape[0]
    has_index = index_k is not None
    expect(c, "c", (T, layout.kv_lora_rank), floating=True)
    expect(k_pe, "k_pe", (T, layout.qk_rope_head_dim), floating=True)
    if has_index:
        expect(index_k, "index_k", (T, layout.index_head_dim), floating=True)
    expect(slot_mapping, "slot_mapping", (T,), dtypes=(torch.int64, torch.int32))
    if has_index:
        check_pools(latent_pool, index_pool, layout)
    else:
        check_latent_pool(latent_pool, layout)
    if T == 0:
        return
    if not use_triton(c.device):
        naive_store_kv(latent_pool, index_pool, c, k_pe, index_k, slot_mapping, layout)
        return
    fp8_mode = layout.mode == "fp8"
    slot_mapping = slot_mapping.contiguous()  # the kernel reads it with unit stride
    had = fp8.hadamard_matrix(layout.index_head_dim, c.device) if fp8_mode and has_index \
        else c.new_zeros(1, dtype=torch.float32)
    if not has_index:  # never read or written (HAS_INDEX=False); any pointers of the right kinds
        index_k, index_pool = c, latent_pool
    _store_kv_kernel[(triton.cdiv(T, BLOCK_T),)](
        c, k_pe, index_k, slot_mapping, had, latent_pool, index_pool, T,
        *c.stride(), *k_pe.stride(), *(index_k.stride() if has_index else (0, 0)),
        latent_pool.stride(0), latent_pool.stride(1), index_pool.stride(0) if has_index else 0,
        index_pool.stride(1) if has_index and not fp8_mode else 0,
        FP8=fp8_mode, DV=layout.kv_lora_rank, DR=layout.qk_rope_head_dim, DI=layout.index_head_dim,
        PAGE=layout.page_size, TILE=FP8_TILE, SCALE_OFF=layout.latent_scale_offset,
        ROPE_OFF=layout.latent_rope_offset, IDX_SCALE_OFF=layout.index_scale_offset,
        POOL_BF16=latent_pool.dtype == torch.bfloat16, HAS_INDEX=has_index, BLOCK_T=BLOCK_T, num_warps=4,
    )


def naive_store_kv(latent_pool: torch.Tensor, index_pool: torch.Tensor | None, c: torch.Tensor, k_pe: torch.Tensor,
                   index_k: torch.Tensor | None, slot_mapping: torch.Tensor, layout: CacheLayout) -> None:
    """Torch twin of :func:`store_kv` (same arguments, same bytes)."""
    keep = slot_mapping >= 0
    if not bool(keep.any()):
        return
    slots = slot_mapping[keep].long()
    page, off = slots // layout.page_size, slots % layout.page_size
    c, k_pe = c[keep], k_pe[keep]
    if layout.mode == "fp8":
        latent_pool[page, off] = fp8.pack_latent(c, k_pe, layout)
    else:
        latent_pool[page, off] = torch.cat([c, k_pe], dim=-1).to(latent_pool.dtype)
    if index_k is None:
        return
    index_k = index_k[keep]
    if layout.mode == "fp8":
        keys, scales = fp8.index_page_views(index_pool, layout)
        q, s = fp8.quant_blocks(fp8.hadamard(index_k.float()))
        keys[page, off] = q
        scales[page, off] = s[:, 0]
    else:
        index_pool[page, off] = index_k.to(index_pool.dtype)
