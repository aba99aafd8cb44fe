"""Page bytes for KV transfer: pool views, gather, scatter, checksum, staging buffers.

Every pool travels as raw bytes: a ``[pages, page_bytes]`` uint8 view of the
pool, whatever its dtype (fp8 pools already are uint8; exact pools are
float32/bf16 and arrive bit-identical). Page sizes come from ``CacheLayout``;
this module only checks that the pools agree with it.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections.abc import Sequence

import numpy as np
import torch


def pool_pages(pool: torch.Tensor) -> torch.Tensor:
    """``[pages, page_bytes]`` uint8 view of a contiguous page pool (no copy)."""
    if not pool.is_contiguous():
        raise ValueError("KV transfer needs contiguous page pools")
    page_bytes = (pool[0].numel() if pool.shape[0] else int(np.prod(pool.shape[1:]))) * pool.element_size()
    return pool.view(torch.uint8).reshape(pool.shape[0], page_bytes)


class CachePages:
    """Byte views of a cache's pools (``cache.layout``, ``cache.latent``, ``cache.index``)."""

    def __init__(self, cache, num_layers: int | None = None):
        layout = cache.layout
        self.num_layers = len(cache.latent) if num_layers is None else num_layers
        if not 0 < self.num_layers <= min(len(cache.latent), len(cache.index)):
            raise ValueError(f"num_layers={self.num_layers} but the cache has {len(cache.latent)} layers")
        self.latent = [pool_pages(t) for t in cache.latent[: self.num_layers]]
        self.index = [pool_pages(t) for t in cache.index[: self.num_layers]]
        self.num_pages = self.latent[0].shape[0]
        self.device = self.latent[0].device
        self.latent_page_bytes = layout.latent_page_bytes
        # A model without an indexer keeps empty index pools: nothing of it travels.
        self.index_page_bytes = layout.index_page_bytes if self.index[0].shape[0] else 0
        if self.latent_page_bytes % 8 or self.index_page_bytes % 8:
            raise ValueError("page sizes must be multiples of 8 bytes (the checksum reads 8-byte words)")
        for pools, page_bytes in ((self.latent, self.latent_page_bytes), (self.index, self.index_page_bytes)):
            for p in pools:
                if page_bytes and p.shape != (self.num_pages, page_bytes):
                    raise ValueError(f"pool of shape {tuple(p.shape)} (bytes) disagrees with the layout: "
                                     f"{self.num_pages} pages of {page_bytes} bytes")

    @property
    def page_bytes(self) -> int:
        """Bytes of one page in one layer, latent + indexer."""
        return self.latent_page_bytes + self.index_page_bytes

    def parts(self, layer: int) -> list[torch.Tensor]:
        """The pools of one layer that travel, in wire and checksum order: latent, then indexer."""
        return [self.latent[layer], self.index[layer]] if self.index_page_bytes else [self.latent[layer]]

    def page_set(self, pages: Sequence[int]) -> PageSet:
        return PageSet(pages, self.num_pages, self.device)


class PageSet:
    """Page ids of one transfer on one side, in the forms gather and scatter want."""

    def __init__(self, pages: Sequence[int], num_pages: int, device: torch.device):
        self.ids = [int(p) for p in pages]
        if not self.ids:
            raise ValueError("a transfer needs at least one page")
        if len(set(self.ids)) != len(self.ids) or min(self.ids) < 0 or max(self.ids) >= num_pages:
            raise ValueError(f"pages must be distinct ids in [0, {num_pages}), got {self.ids[:16]}")
        first = self.ids[0]
        # A run of consecutive ids (common with a fresh allocator) is used as a slice: no copy.
        self.run_start = first if self.ids == list(range(first, first + len(self.ids))) else None
        self.ids_tensor = torch.tensor(self.ids, dtype=torch.long, device=device)
        self.ids_numpy = np.asarray(self.ids, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    def chunks(self, ranges: list[tuple[int, int]]) -> list[PageSet]:
        """The page sets of consecutive slices of this one (the pages of each message)."""
        out = []
        for a, b in ranges:
            sub = PageSet.__new__(PageSet)
            sub.ids = self.ids[a:b]
            sub.run_start = sub.ids[0] if sub.ids == list(range(sub.ids[0], sub.ids[0] + b - a)) else None
            sub.ids_tensor, sub.ids_numpy = self.ids_tensor[a:b], self.ids_numpy[a:b]
            out.append(sub)
        return out

    def gather(self, pool: torch.Tensor, staging: torch.Tensor) -> torch.Tensor:
        """These pages of a ``[pages, page_bytes]`` pool as one contiguous buffer (a view if they are a run)."""
        if self.run_start is not None:
            return pool[self.run_start : self.run_start + len(self)]
        out = staging[: len(self) * pool.shape[1]].view(len(self), pool.shape[1])
        return torch.index_select(pool, 0, self.ids_tensor, out=out)

    def scatter(self, pool: torch.Tensor, buf: torch.Tensor) -> None:
        """Write ``buf`` (``[n, page_bytes]``) into these pages of the pool."""
        if self.run_start is not None:
            pool[self.run_start : self.run_start + len(self)].copy_(buf)
        elif pool.is_cuda:
            pool.index_copy_(0, self.ids_tensor, buf)
        else:  # numpy's fancy assignment copies rows at memcpy speed; torch's index_copy_ is ~8x slower on CPU
            pool.numpy()[self.ids_numpy] = buf.numpy()


class Checksum:
    """Running checksum of page buffers, in the order they are fed (layer 0 latent, layer 0 index, layer 1...).

    Each page is reduced to a 64-bit digest ``sum_j (2j+1) * word_j mod 2**64`` over its 8-byte words (one
    pass at memory speed, 5-10x cheaper than crc32 here, where the checksum competes with the copies for
    two cores); the digests are hashed in order with blake2b. So any changed word (odd weights are
    invertible mod 2**64), any reordering of words within a page, any page out of place and any missing
    or extra page or pool (a missing indexer) changes the result. CPU and CUDA give the same digests.
    """

    def __init__(self):
        self._hash = hashlib.blake2b(digest_size=8)

    def update(self, buf: torch.Tensor) -> None:
        """Add a ``[pages, page_bytes]`` uint8 buffer (page_bytes a multiple of 8)."""
        words = buf.shape[1] // 8
        if buf.is_cuda:  # int64 wraps like uint64: the same digests as numpy's
            digests = (buf.view(torch.int64) * _weights(words, buf.device)).sum(dim=1).cpu().numpy()
        else:
            digests = np.einsum("ij,j->i", buf.numpy().view(np.uint64), _weights(words, None))
        self._hash.update(digests.astype("<u8", copy=False).tobytes())

    def hexdigest(self) -> str:
        return "kv1:" + self._hash.hexdigest()


@functools.lru_cache(maxsize=32)
def _weights(words: int, device: torch.device | None):
    odd = np.arange(1, 2 * words, 2, dtype=np.uint64)
    return odd if device is None else torch.from_numpy(odd.view(np.int64)).to(device)


def cache_checksum(cache, pages: Sequence[int], num_layers: int | None = None) -> str:
    """What a transfer of these pages reports as its checksum, computed straight from a cache."""
    cp = CachePages(cache, num_layers)
    ps = cp.page_set(pages)
    checksum = Checksum()
    for layer in range(cp.num_layers):
        for pool in cp.parts(layer):
            checksum.update(pool[ps.ids_tensor].contiguous())
    return checksum.hexdigest()


class StagingPool:
    """Reusable byte buffers: fresh allocations page-fault at ~1.5 GB/s here, reused ones copy at ~6-12.

    Keeps up to ``max_bytes`` of idle buffers (size it to the transfer windows), dropping the smallest first.
    """

    def __init__(self, max_bytes: int):
        self._free: list[torch.Tensor] = []
        self._max_bytes = max_bytes
        self._lock = threading.Lock()

    def take(self, nbytes: int, device: torch.device) -> torch.Tensor:
        """A 1-D uint8 buffer of at least ``nbytes`` bytes."""
        with self._lock:  # (list.remove would compare tensors by value: pop by position)
            fits = [i for i, b in enumerate(self._free) if b.device == device and b.numel() >= nbytes]
            if fits:
                return self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
        return torch.empty(nbytes, dtype=torch.uint8, device=device)

    def give(self, buf: torch.Tensor) -> None:
        with self._lock:
            self._free.append(buf)
            self._free.sort(key=torch.Tensor.numel)
            while sum(b.numel() for b in self._free) > self._max_bytes:
                self._free.pop(0)
