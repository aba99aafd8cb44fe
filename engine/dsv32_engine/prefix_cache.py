"""A request's side of the prefix cache: match its longest cached prefix, publish its full pages.

The pages themselves live in :class:`~dsv32_engine.cache.PageAllocator` (reference
counts, LRU of unreferenced cached pages); the keys come from
:func:`dsv32_text.prefix_hash.page_hashes`. A request reuses whole pages only, and
never its last prompt token's page position: the forward that samples the first
token needs at least that token's query, so at most
``(len(prompt) - 1) // page_size`` pages are matched.
"""

from __future__ import annotations

import contextlib
import time

from dsv32_text.prefix_hash import page_hashes, salt_key

from .cache import PageAllocator


class PrefixCaching:
    def __init__(self, allocator: PageAllocator, page_size: int, salt: str):
        self.allocator, self.page_size, self.salt = allocator, page_size, salt
        self.hit_tokens = 0      # prompt tokens served from the cache, since start
        self.lookup_tokens = 0   # prompt tokens looked up

    @staticmethod
    def salt_for(model_fingerprint: str, numerics: str, dtype: object, page_size: int) -> str:
        return salt_key("dsv32-kv", model_fingerprint, numerics, dtype, page_size)

    def keys(self, req, upto: int) -> list[str]:
        """The request's page keys covering its first ``upto`` tokens (extended in place, kept on it)."""
        if len(req.cache_keys) < upto // self.page_size:
            req.cache_keys = page_hashes(req.all_ids[:upto], self.page_size, self.salt, req.cache_keys)
        return req.cache_keys[:upto // self.page_size]

    def match(self, tokens: list[int], req=None, acquire: bool = True) -> list[int]:
        """Acquire the cached pages of the longest full-page prefix of ``tokens`` (leaving at least the last
        token to compute); the caller owns one reference on each page returned. ``acquire=False``: only
        look (nothing taken, nothing counted)."""
        n = (len(tokens) - 1) // self.page_size
        keys = self.keys(req, n * self.page_size) if req is not None else page_hashes(
            tokens[:n * self.page_size], self.page_size, self.salt)
        pages = self.allocator.lookup(keys)
        if acquire:
            self.allocator.acquire(pages)
            self.lookup_tokens += len(tokens)
            self.hit_tokens += len(pages) * self.page_size
        return pages

    def publish(self, req) -> None:
        """Publish the request's pages that are full and computed (every token's cache written)."""
        full = min(req.num_computed // self.page_size, len(req.pages))
        if full <= req.num_published:
            return
        keys = self.keys(req, full * self.page_size)
        for i in range(req.num_published, full):
            self.allocator.publish(req.pages[i], keys[i])
        req.num_published = full


class SessionPages:
    """Which cached pages each session's turns left on a worker, so that ending the session (or its TTL)
    frees them. A page shared with another live session (a common system prompt) stays; a page in use
    is never touched (``PageAllocator.evict`` drops unreferenced pages only). ``lock`` is the lock the
    worker holds around its allocator (None: the caller serialises)."""

    def __init__(self, engine, lock, ttl_s: float):
        self.engine, self.allocator, self.ttl_s = engine, engine.allocator, ttl_s
        self.lock = lock if lock is not None else contextlib.nullcontext()
        self._keys: dict[str, set[str]] = {}      # session -> keys its turns left
        self._owners: dict[str, set[str]] = {}    # key -> sessions
        self._seen: dict[str, float] = {}         # session -> last turn (monotonic s)

    def __len__(self) -> int:
        return len(self._keys)

    def note(self, session_id: str, token_ids: list[int], now: float | None = None) -> None:
        """A turn of ``session_id`` ended here with the cache of ``token_ids`` (prompt + output)."""
        if not session_id:
            return
        keys = self.engine.page_keys(token_ids)
        with self.lock:
            mine = self._keys.setdefault(session_id, set())
            for k in keys:
                mine.add(k)
                self._owners.setdefault(k, set()).add(session_id)
            self._seen[session_id] = time.monotonic() if now is None else now

    def release(self, session_id: str) -> int:
        """Forget the session; evict the cached pages no other session left. Returns pages freed."""
        with self.lock:
            return self._release(session_id)

    def _release(self, session_id: str) -> int:
        keys = self._keys.pop(session_id, set())
        self._seen.pop(session_id, None)
        alone = []
        for k in keys:
            owners = self._owners.get(k)
            if owners is not None:
                owners.discard(session_id)
                if not owners:
                    del self._owners[k]
                    alone.append(k)
        return self.allocator.evict(alone) if alone else 0

    def expire(self, now: float | None = None) -> int:
        """Release every session idle for longer than the TTL."""
        now = time.monotonic() if now is None else now
        with self.lock:
            stale = [s for s, t in self._seen.items() if now - t > self.ttl_s]
            return sum(self._release(s) for s in stale)
