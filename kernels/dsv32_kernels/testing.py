"""Helpers for the kernel tests and the benchmark: paged caches with known contents, error bounds.

Error model used by the tests (IEEE round-to-nearest):

* fp32: unit roundoff ``u = 2^-24``; a sum of ``n`` products computed in any
  order differs from another order by at most ``2·γ_n·Σ|terms|`` with
  ``γ_n = n·u / (1 - n·u)`` (Higham, Accuracy and Stability, §3.1);
* bf16 (8 significant bits): rounding moves a value by at most ``2^-8`` relative;
* e4m3 (4 significant bits): at most ``2^-4`` relative for normal values, and
  ``2^-10`` absolute (half the 2^-9 subnormal step) times the block scale below;
* Hopper fp8 MMAs keep about 14 bits in their accumulator (DeepSeek-V3 report,
  §3.3.2): ``2^-13`` relative to ``Σ|terms|`` per 128-deep block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from . import fp8
from .layout import CacheLayout

from .store_kv import naive_store_kv

U32 = 2.0 ** -24
BF16_REL = 2.0 ** -8
E4M3_REL = 2.0 ** -4
FP8_MMA_REL = 2.0 ** -13


def gamma(n: int) -> float:
    return n * U32 / (1 - n * U32)


def small_layout(mode: str, dtype: torch.dtype = torch.float32) -> CacheLayout:
    """Real rope (64) and indexer (128) widths, a 128-wide latent (one fp8 tile) to keep interpreter tests fast."""
    return CacheLayout(kv_lora_rank=128, qk_rope_head_dim=64, index_head_dim=128, mode=mode, dtype=dtype)


@dataclass
class PagedCache:
    """Pools filled through ``naive_store_kv`` plus the unpaged values that went in, per request."""

    layout: CacheLayout
    latent_pool: torch.Tensor
    index_pool: torch.Tensor
    block_tables: torch.Tensor  # [B, max_pages] int32, -1 padded
    context_lens: torch.Tensor  # [B] int32
    c: list[torch.Tensor]  # per request [ctx, kv_lora_rank]
    k_pe: list[torch.Tensor]  # per request [ctx, rope]
    index_k: list[torch.Tensor]  # per request [ctx, index_head_dim]

    def slots(self, b: int) -> torch.Tensor:
        """Physical slots of request ``b``'s positions ``0..ctx-1``."""
        pos = torch.arange(int(self.context_lens[b]), device=self.block_tables.device)
        page = self.layout.page_size
        return self.block_tables[b].long()[pos // page] * page + pos % page


def build_cache(layout: CacheLayout, context_lens: list[int], *, seed: int = 0, extra_pages: int = 2,
                spare_columns: int = 1, page_stride_pad: int = 0, device: str | torch.device = "cpu",
                scale: float = 1.0) -> PagedCache:
    """Requests of the given lengths on shuffled pages; ``page_stride_pad`` extra rows per latent page."""
    g = torch.Generator().manual_seed(seed)
    page = layout.page_size
    need = [layout.pages_for(n) for n in context_lens]
    num_pages = sum(need) + extra_pages
    order = torch.randperm(num_pages, generator=g)
    max_pages = max(need, default=0) + spare_columns
    bt = torch.full((len(context_lens), max_pages), -1, dtype=torch.int32)
    used = 0
    for b, k in enumerate(need):
        bt[b, :k] = order[used:used + k].to(torch.int32)
        used += k
    shape = list(layout.latent_pool_shape(num_pages))
    shape[1] += page_stride_pad
    latent = torch.zeros(shape, dtype=layout.pool_dtype, device=device)[:, :page]
    index = torch.zeros(layout.index_pool_shape(num_pages), dtype=layout.pool_dtype, device=device)
    cache = PagedCache(layout, latent, index, bt.to(device), torch.tensor(context_lens, dtype=torch.int32, device=device),
                       [], [], [])
    for b, n in enumerate(context_lens):
        c = (torch.randn(n, layout.kv_lora_rank, generator=g) * scale).to(device)
        k_pe = (torch.randn(n, layout.qk_rope_head_dim, generator=g) * scale).to(device)
        index_k = torch.randn(n, layout.index_head_dim, generator=g).to(device)
        naive_store_kv(latent, index, c, k_pe, index_k, cache.slots(b), layout)
        cache.c.append(c)
        cache.k_pe.append(k_pe)
        cache.index_k.append(index_k)
    return cache


def cached_latent(layout: CacheLayout, c: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
    """What the latent cache returns for ``[c ‖ k_pe]``: fp8 records round-tripped through ``unpack_latent``."""
    if layout.mode == "fp8":
        if c.shape[0] == 0:  # fp8.pack_latent cannot byte-view an empty scale tensor
            return c.new_zeros(0, layout.latent_dim, dtype=torch.float32)
        return fp8.unpack_latent(fp8.pack_latent(c, k_pe, layout), layout)
    return torch.cat([c, k_pe], dim=-1).to(layout.dtype).float()


def cached_index_key(layout: CacheLayout, index_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What the indexer cache holds for ``index_k``: (rotated e4m3 keys, scales) or (float keys, None)."""
    if layout.mode == "fp8":
        q, s = fp8.quant_blocks(fp8.hadamard(index_k.float()))
        return q, s[:, 0]
    return index_k.to(layout.dtype), None


def indexer_query(layout: CacheLayout, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp8: rotate and quantise per head ``(e4m3 q, q_scale)``; exact: ``(q, None)``."""
    if layout.mode == "fp8":
        q8, s = fp8.quant_blocks(fp8.hadamard(q.float()))
        return q8, s[..., 0]
    return q, None
