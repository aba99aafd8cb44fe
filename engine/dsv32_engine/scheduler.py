"""Continuous batching over one page pool.

Queues: ``waiting`` (admitted, no pages yet) → ``running`` (pages held; either
mid-prefill, a chunk per step, or decoding one token per step) → finished
(pages freed). Each step takes, within ``max_num_batched_tokens``: one token
for every decoding request, then prefill chunks for the running requests
that are mid-prefill, then new requests from ``waiting`` while pages last (with a
prefix cache, a new request first acquires the pages of its longest cached prefix and
starts its prefill after them; its own full pages are published after each step).
A decoding request that needs a page when none is free preempts the most
recently admitted request (its pages are freed and it goes back to the front
of ``waiting``; its tokens so far are recomputed later — sampling is keyed by
position, so the recomputed request continues identically).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .cache import PageAllocator
from .prefix_cache import PrefixCaching
from .sampling_params import SamplingParams


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    output_ids: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    num_computed: int = 0          # tokens whose cache is written
    cacheable: bool = True         # reads and feeds the prefix cache (a request may opt out)
    num_cached: int = 0            # prompt tokens found in the prefix cache at admission
    num_published: int = 0         # leading pages published to the prefix cache
    cache_keys: list[str] = field(default_factory=list)  # page keys computed so far (prefix_cache.py)
    finished: bool = False
    finish_reason: str | None = None

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


@dataclass
class ScheduledChunk:
    request: Request
    start: int      # first token position computed this step
    num: int        # tokens computed this step

    @property
    def samples(self) -> bool:
        """This chunk reaches the end of the known tokens: a new token is sampled after it."""
        return self.start + self.num == self.request.num_tokens


class Scheduler:
    def __init__(self, allocator: PageAllocator, page_size: int, max_num_seqs: int, max_num_batched_tokens: int,
                 prefix: PrefixCaching | None = None):
        self.allocator = allocator
        self.prefix = prefix
        self.page_size = page_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0  # requests sent back to ``waiting`` for lack of pages, since start

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _pages_needed(self, req: Request, upto: int) -> int:
        return max(0, -(-upto // self.page_size) - len(req.pages))

    def _grow(self, req: Request, upto: int) -> bool:
        need = self._pages_needed(req, upto)
        if not self.allocator.can_allocate(need):
            return False
        req.pages += self.allocator.allocate(need)
        return True

    def _preempt_last(self, keep: Request, chunks: list["ScheduledChunk"]) -> bool:
        for victim in reversed(self.running):
            if victim is not keep:
                chunks[:] = [c for c in chunks if c.request is not victim]
                self.running.remove(victim)
                self.release(victim)
                victim.num_computed = victim.num_published = 0
                self.waiting.appendleft(victim)
                self.num_preemptions += 1
                return True
        return False

    def release(self, req: Request) -> None:
        if req.pages:
            self.allocator.free(req.pages)
            req.pages = []

    def schedule(self) -> list[ScheduledChunk]:
        chunks: list[ScheduledChunk] = []
        for req in list(self.running):  # decodes first: they hold pages and users are waiting on them
            if req not in self.running or req.num_computed < req.num_tokens - 1 or len(chunks) >= self.max_num_batched_tokens:
                continue
            while not self._grow(req, req.num_tokens):
                if not self._preempt_last(req, chunks):
                    break
            if req in self.running and self._pages_needed(req, req.num_tokens) == 0:
                chunks.append(ScheduledChunk(req, req.num_computed, 1))
        budget = self.max_num_batched_tokens - len(chunks)
        for req in self.running:  # unfinished prefills, a chunk each
            if budget <= 0:
                break
            left = req.num_tokens - req.num_computed
            if left > 1 and not any(c.request is req for c in chunks):
                n = min(left, budget)
                if self._grow(req, req.num_computed + n):
                    chunks.append(ScheduledChunk(req, req.num_computed, n))
                    budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            if self.prefix is not None and req.cacheable and not req.pages:
                # acquired before growing, so the LRU eviction that growing may do cannot take them
                req.pages = self.prefix.match(req.all_ids, req)
                req.num_computed = req.num_published = len(req.pages) * self.page_size
                if not req.output_ids:  # reported with the first token (a preempted request re-matches)
                    req.num_cached = min(req.num_computed, len(req.prompt_ids))
            n = min(req.num_tokens - req.num_computed, budget)
            if not self._grow(req, req.num_computed + n):
                self.release(req)
                req.num_computed = req.num_published = 0
                break
            self.waiting.popleft()
            self.running.append(req)
            chunks.append(ScheduledChunk(req, req.num_computed, n))
            budget -= n
        return chunks

    def publish(self, reqs) -> None:
        """After a step: publish the pages the step completed (no-op without a prefix cache)."""
        if self.prefix is None:
            return
        for req in reqs:
            if req.cacheable and req.pages:
                self.prefix.publish(req)

    def finish(self, req: Request, reason: str) -> None:
        req.finished, req.finish_reason = True, reason
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        self.release(req)
