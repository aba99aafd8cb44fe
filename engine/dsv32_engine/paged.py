"""Torch reads and writes of the paged cache, in both numerics modes.

These are the engine's own (unfused) cache accessors; ``dsv32_kernels`` holds
the fused GPU versions and checks itself against the same layouts.
A slot is ``page * page_size + offset``.
"""

from __future__ import annotations

import torch

from dsv32_kernels import fp8
from dsv32_kernels.layout import CacheLayout


def slots_for(block_table: torch.Tensor, positions: torch.Tensor, page_size: int) -> torch.Tensor:
    """Logical positions of one request → physical slots through its block table."""
    return block_table[positions // page_size] * page_size + positions % page_size


def store_latent(pool: torch.Tensor, slots: torch.Tensor, c: torch.Tensor, k_pe: torch.Tensor,
                 layout: CacheLayout) -> None:
    flat = pool.view(-1, pool.shape[-1])
    if layout.mode == "fp8":
        flat[slots] = fp8.pack_latent(c, k_pe, layout)
    else:
        flat[slots] = torch.cat([c, k_pe], dim=-1).to(pool.dtype)


def read_latent(pool: torch.Tensor, slots: torch.Tensor, layout: CacheLayout, dtype: torch.dtype) -> torch.Tensor:
    """``[..., kv_lora_rank + rope]`` values at ``slots`` (dequantised in fp8 mode)."""
    flat = pool.view(-1, pool.shape[-1])
    rows = flat[slots.clamp_min(0)]
    if layout.mode == "fp8":
        rows = fp8.unpack_latent(rows, layout)
    return rows.to(dtype)


def store_index_key(pool: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, layout: CacheLayout) -> None:
    """``k`` is the post-norm, post-RoPE key; fp8 mode rotates (Hadamard) and quantises it."""
    page, off = slots // layout.page_size, slots % layout.page_size
    if layout.mode == "fp8":
        q, s = fp8.quant_blocks(fp8.hadamard(k.float()))
        keys, scales = fp8.index_page_views(pool, layout)
        keys[page, off] = q
        scales[page, off] = s.squeeze(-1)
    else:
        pool[page, off] = k.to(pool.dtype)


def read_index_keys(pool: torch.Tensor, slots: torch.Tensor, layout: CacheLayout) -> torch.Tensor:
    """fp32 keys ``[..., index_head_dim]`` (fp8: rotated and dequantised)."""
    s = slots.clamp_min(0)
    page, off = s // layout.page_size, s % layout.page_size
    if layout.mode == "fp8":
        keys, scales = fp8.index_page_views(pool, layout)
        return keys[page, off].float() * scales[page, off].unsqueeze(-1)
    return pool[page, off].float()
