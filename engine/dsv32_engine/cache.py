"""Paged latent + indexer cache and its page allocator.

Allocation follows a query/commit discipline (``can_allocate`` then
``allocate``), so a caller that cannot get every page it needs takes none.
Each page has one owner: ``free`` returns it to the free list and refuses a
page that is not allocated (double free). There is no sharing between
requests yet (that comes with prefix caching). ``check_no_leaks`` is what
tests and shutdown paths call.
"""

from __future__ import annotations

from collections import deque

import torch

from dsv32_kernels.layout import CacheLayout


class OutOfPages(RuntimeError):
    """Raised by ``allocate`` when the caller skipped ``can_allocate``."""


class PageAllocator:
    def __init__(self, num_pages: int):
        if num_pages <= 0:
            raise ValueError(f"num_pages must be positive, got {num_pages}")
        self.num_total = num_pages
        self._free: deque[int] = deque(range(num_pages))
        self._refs = [0] * num_pages

    @property
    def num_free(self) -> int:
        return len(self._free)

    def can_allocate(self, n: int) -> bool:
        return 0 <= n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if not self.can_allocate(n):
            raise OutOfPages(f"asked for {n} pages, {len(self._free)} free of {self.num_total}")
        pages = [self._free.popleft() for _ in range(n)]
        for p in pages:
            self._refs[p] = 1
        return pages

    def free(self, pages: list[int]) -> None:
        for p in pages:
            if not 0 <= p < self.num_total or self._refs[p] <= 0:
                raise ValueError(f"page {p} is not allocated (double free?)")
            self._refs[p] -= 1
            if self._refs[p] == 0:
                self._free.append(p)

    def check_no_leaks(self) -> None:
        used = [p for p, r in enumerate(self._refs) if r]
        if used or len(self._free) != self.num_total:
            raise AssertionError(f"{len(used)} pages still referenced: {used[:16]}{'...' if len(used) > 16 else ''}")


class KVCache:
    """Per-layer page pools: ``latent[l]`` and ``index[l]`` in the layout's byte format."""

    def __init__(self, layout: CacheLayout, num_layers: int, num_pages: int, device: torch.device | str = "cpu",
                 with_index: bool = True):
        self.layout = layout
        self.num_layers = num_layers
        self.num_pages = num_pages
        dt = layout.pool_dtype
        self.latent = [torch.zeros(layout.latent_pool_shape(num_pages), dtype=dt, device=device) for _ in range(num_layers)]
        # A deepseek_v3 (dense MLA) model has no indexer: keep empty pools so the transfer code stays uniform.
        shape = layout.index_pool_shape(num_pages if with_index else 0)
        self.index = [torch.zeros(shape, dtype=dt, device=device) for _ in range(num_layers)]

    @property
    def bytes_per_page(self) -> int:
        """Latent + indexer bytes of one page over all layers."""
        per_layer = self.layout.latent_page_bytes + (self.layout.index_page_bytes if self.index[0].numel() else 0)
        return per_layer * self.num_layers

    @staticmethod
    def pages_that_fit(layout: CacheLayout, num_layers: int, budget_bytes: int) -> int:
        return max(1, budget_bytes // ((layout.latent_page_bytes + layout.index_page_bytes) * num_layers))
