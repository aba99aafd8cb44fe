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
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch
import xxhash

HASH_BLOCK_BYTES = 2 << 20
"""Gather/scatter and hash this many bytes at a time, so the hash reads what the copy just wrote from cache."""


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
        """The pools of one layer that travel, in wire and checksum order: indexer (if any), then latent.

        The smaller pool goes first: the receiver writes a message straight into the pages only once an
        earlier message of the same layer has landed (see ``landing``), which is then most of the bytes.
        """
        return [self.index[layer], self.latent[layer]] if self.index_page_bytes else [self.latent[layer]]

    @property
    def part_bytes(self) -> list[int]:
        """Bytes of one page of each pool of ``parts``, in the same order."""
        return [self.index_page_bytes, self.latent_page_bytes] if self.index_page_bytes else [self.latent_page_bytes]

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

    def window(self, a: int, b: int) -> PageSet:
        """The page set of the slice ``[a, b)`` of this one (the pages of one message segment)."""
        sub = PageSet.__new__(PageSet)
        sub.ids = self.ids[a:b]
        sub.run_start = sub.ids[0] if sub.ids == list(range(sub.ids[0], sub.ids[0] + b - a)) else None
        sub.ids_tensor, sub.ids_numpy = self.ids_tensor[a:b], self.ids_numpy[a:b]
        return sub

    def run(self, pool: torch.Tensor) -> torch.Tensor | None:
        """These pages of a ``[pages, page_bytes]`` pool as a view, if they are a run of consecutive ids."""
        return None if self.run_start is None else pool[self.run_start : self.run_start + len(self)]

    def gather(self, pool: torch.Tensor, out: torch.Tensor, checksum: Checksum | None = None) -> torch.Tensor:
        """Copy these pages of a ``[pages, page_bytes]`` pool into ``out`` (``[n, page_bytes]``), extending
        ``checksum`` over each block right after copying it (one pass over the pool: the hash reads from cache)."""
        step = _block_rows(pool.shape[1], pool.is_cuda)
        for a in range(0, len(self), step):
            block = out[a : a + step]
            torch.index_select(pool, 0, self.ids_tensor[a : a + step], out=block)
            if checksum is not None:
                checksum.update(block)
        return out

    def scatter(self, pool: torch.Tensor, buf: torch.Tensor, checksum: Checksum | None = None,
                guard: Callable[[], AbstractContextManager[bool]] | None = None) -> None:
        """Write ``buf`` (``[n, page_bytes]``) into these pages of the pool, hashing each block just before
        writing it. ``guard``: entered around each block's write, which happens only if it yields True."""
        step = _block_rows(pool.shape[1], pool.is_cuda)
        for a in range(0, len(self), step):
            block = buf[a : a + step]
            if checksum is not None:
                checksum.update(block)
            with guard() if guard is not None else nullcontext(True) as may_write:
                if may_write:
                    self._scatter(pool, block, a)

    def _scatter(self, pool: torch.Tensor, block: torch.Tensor, a: int) -> None:
        n = block.shape[0]
        if self.run_start is not None:
            pool[self.run_start + a : self.run_start + a + n].copy_(block)
        elif pool.is_cuda:
            pool.index_copy_(0, self.ids_tensor[a : a + n], block)
        else:  # numpy's fancy assignment copies rows at memcpy speed; torch's index_copy_ is ~8x slower on CPU
            pool.numpy()[self.ids_numpy[a : a + n]] = block.numpy()


def _block_rows(page_bytes: int, cuda: bool) -> int:
    """Pages per gather/scatter block: one block on a GPU (one kernel), ~``HASH_BLOCK_BYTES`` on a CPU."""
    return 1 << 30 if cuda else max(1, HASH_BLOCK_BYTES // max(page_bytes, 1))


class Checksum:
    """Running checksum of page bytes, in the order they are fed (layer 0 indexer, layer 0 latent, layer 1...).

    On a CPU: XXH3-128 (the ``xxhash`` library) over the byte stream, ~60 GB/s a core here, so the sender
    hashes each block it gathers (or the pages it sends in place) and the receiver each block it scatters
    (or the pages a message landed in) while they are in cache. Any changed, reordered, missing or extra
    byte (a missing indexer pool) changes the result; where message boundaries fall does not.

    On a GPU (no copy to the host): a fused torch reduction per page, ``sum_j (2j+1) * word_j mod 2**64``
    over its 8-byte words (odd weights are invertible mod 2**64: any changed word, or words reordered
    within a page, changes it), the digests kept on the device and hashed in order with blake2b at the end.
    The two give different strings (``kv2:`` / ``kv1:``); both sides of a transfer use the same device kind.
    """

    def __init__(self, device: torch.device | str | None = None):
        self.cuda = torch.device(device).type == "cuda" if device is not None else False
        self._xxh = None if self.cuda else xxhash.xxh3_128()
        self._digests: list[torch.Tensor] = []
        self.seconds = 0.0
        """Time spent hashing (on a GPU: launching the reductions)."""

    def update(self, buf: torch.Tensor) -> None:
        """Add a ``[pages, page_bytes]`` uint8 buffer (page_bytes a multiple of 8), contiguous."""
        t0 = time.perf_counter()
        if buf.is_cuda != self.cuda:
            raise ValueError(f"a {'CUDA' if self.cuda else 'CPU'} checksum was fed a {buf.device} buffer")
        if self.cuda:  # int64 wraps like uint64
            words = buf.shape[1] // 8
            self._digests.append((buf.view(torch.int64) * _weights(words, buf.device)).sum(dim=1))
        else:
            self._xxh.update(buf.numpy())
        self.seconds += time.perf_counter() - t0

    def hexdigest(self) -> str:
        if not self.cuda:
            return "kv2:" + self._xxh.hexdigest()
        digests = torch.cat(self._digests).cpu().numpy() if self._digests else np.zeros(0, dtype=np.int64)
        return "kv1:" + hashlib.blake2b(digests.astype("<i8", copy=False).tobytes(), digest_size=8).hexdigest()


@functools.lru_cache(maxsize=32)
def _weights(words: int, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.arange(1, 2 * words, 2, dtype=np.uint64).view(np.int64)).to(device)


def cache_checksum(cache, pages: Sequence[int], num_layers: int | None = None) -> str:
    """What a transfer of these pages reports as its checksum, computed straight from a cache."""
    cp = CachePages(cache, num_layers)
    ps = cp.page_set(pages)
    checksum = Checksum(cp.device)
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
