"""Paged latent + indexer cache, its page allocator and the prefix cache.

Allocation follows a query/commit discipline (``can_allocate`` then
``allocate``), so a caller that cannot get every page it needs takes none.
Pages are reference-counted: ``free`` drops one reference and refuses a page
that holds none (double free).

**Prefix cache.** A full page whose tokens were computed can be *published*
under its content key (:mod:`dsv32_text.prefix_hash`: a hash chain over the
token ids, salted with the model and numerics). When its last reference goes,
a published page is not freed but kept, unreferenced, in LRU order; a later
request whose prompt starts with the same tokens ``lookup``s the keys and
``acquire``s the pages (one more reference each: shared, read-only; nobody
writes to a full page). ``allocate`` takes truly free pages first, then evicts
the least recently used unreferenced cached pages; a referenced page is never
evicted. ``num_free`` counts both kinds: a cached page costs nothing to take.
The latent and the indexer pools share page ids, so a cached page always
carries both (a prefix is never reused without its indexer keys).
``check_no_leaks`` is what tests and shutdown paths call: no page referenced.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque

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
        self._key_of: dict[int, str] = {}            # published page -> its key
        self._page_of: dict[str, int] = {}           # key -> published page
        self._lru: OrderedDict[int, None] = OrderedDict()  # unreferenced published pages, oldest first
        self.added: set[str] = set()                 # keys published / evicted since the last drain_events()
        self.removed: set[str] = set()
        self._events = threading.Lock()              # drain_events() runs on the heartbeat thread
        self.evictions = 0

    @property
    def num_free(self) -> int:
        """Pages ``allocate`` can hand out: free ones plus unreferenced cached ones."""
        return len(self._free) + len(self._lru)

    @property
    def num_cached(self) -> int:
        """Published pages (referenced or not)."""
        return len(self._page_of)

    def can_allocate(self, n: int) -> bool:
        return 0 <= n <= self.num_free

    def allocate(self, n: int) -> list[int]:
        if not self.can_allocate(n):
            raise OutOfPages(f"asked for {n} pages, {self.num_free} free of {self.num_total}")
        pages = []
        for _ in range(n):
            if self._free:
                pages.append(self._free.popleft())
            else:  # evict the least recently used unreferenced cached page
                page, _ = self._lru.popitem(last=False)
                self._unpublish(page)
                self.evictions += 1
                pages.append(page)
        for p in pages:
            self._refs[p] = 1
        return pages

    def free(self, pages: list[int]) -> None:
        for p in pages:
            if not 0 <= p < self.num_total or self._refs[p] <= 0:
                raise ValueError(f"page {p} is not allocated (double free?)")
        for p in pages:
            self._refs[p] -= 1
            if self._refs[p] == 0:
                if p in self._key_of:
                    self._lru[p] = None  # most recently used end
                else:
                    self._free.append(p)

    # -- prefix cache ------------------------------------------------------------------
    def lookup(self, keys: list[str]) -> list[int]:
        """The published pages of the longest prefix of ``keys`` (no reference taken: ``acquire`` them)."""
        pages = []
        for k in keys:
            p = self._page_of.get(k)
            if p is None:
                break
            pages.append(p)
        return pages

    def acquire(self, pages: list[int]) -> None:
        """One more reference on each published page (taken out of the LRU while referenced)."""
        for p in pages:
            if p not in self._key_of:
                raise ValueError(f"page {p} is not a cached page")
        for p in pages:
            if self._refs[p] == 0:
                del self._lru[p]
            self._refs[p] += 1

    def publish(self, page: int, key: str) -> bool:
        """Make an allocated, fully computed page findable under ``key``. False if the key is already
        cached (another page holds the same tokens: this one stays private) or the page already is."""
        if self._refs[page] <= 0:
            raise ValueError(f"page {page} is not allocated")
        if key in self._page_of or page in self._key_of:
            return False
        self._page_of[key], self._key_of[page] = page, key
        with self._events:
            self.added.add(key)
            self.removed.discard(key)
        return True

    def evict(self, keys: list[str] | None = None) -> int:
        """Drop unreferenced cached pages (those of ``keys``; all with None) back to the free list."""
        pages = list(self._lru) if keys is None else [self._page_of[k] for k in keys if k in self._page_of]
        n = 0
        for p in pages:
            if self._refs[p] == 0 and p in self._lru:
                del self._lru[p]
                self._unpublish(p)
                self._free.append(p)
                n += 1
        return n

    def _unpublish(self, page: int) -> None:
        key = self._key_of.pop(page)
        del self._page_of[key]
        with self._events:
            self.removed.add(key)
            self.added.discard(key)

    def cached_keys(self) -> list[str]:
        with self._events:
            return list(self._page_of)

    def drain_events(self) -> tuple[set[str], set[str]]:
        """Keys published and keys dropped since the last call (for the worker's summary in Redis)."""
        with self._events:
            added, removed = self.added, self.removed
            self.added, self.removed = set(), set()
        return added, removed

    def check_no_leaks(self) -> None:
        used = [p for p, r in enumerate(self._refs) if r]
        if used or self.num_free != self.num_total:
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
