"""Choosing the (prefill, decode) pair for a request.

Pure functions over the registry snapshot plus the router's own in-flight
counts (load reports arrive once per heartbeat, so a burst of requests would
otherwise all see the same "least loaded" worker). Pages are counted in each
worker's own registered page size (``WorkerInfo.pages_for``); the router has
no page size of its own.

Decode worker D, in order:

1. able to hold the request for its whole life:
   ``free_pages - pending_pages >= pages(prompt + max_tokens)``; workers that
   already failed this request only if no other one fits (a 1+1 cluster must
   still be able to retry after a corrupted transfer);
2. cache-aware: the worker that holds the longest leading part of the prompt in
   its prefix cache (``cached``: tokens per worker, from the key sets workers
   publish in Redis), unless it runs more than ``cache_slack`` requests above
   the least loaded candidate (then load wins: a hot cache is no reason to queue
   behind a busy worker);
3. the session's decode worker if it qualifies (with nothing cached anywhere);
4. otherwise the fewest running + pending requests, then the most free pages,
   then rotation (so that equal workers take turns).

A colocated cluster (``up --colocated``) has no pairs: the request goes whole
to one colocated worker, chosen by the decode rules above (``role="colocated"``);
:func:`serving_mode` says which of the two a registry snapshot serves.

Prefill worker P: a pool large enough for the prompt, preferably one that has
not failed this request, the least work ahead of the prompt's first token:
queued tokens (reported + pending from this router) plus the prompt tokens it
would compute (those it has not cached), then rotation.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from dsv32_cluster.state import WorkerInfo


class NoWorkers(Exception):
    """No worker of a role is registered (→ UNAVAILABLE)."""


class NoCapacity(Exception):
    """Workers exist but none can take the request now (→ RESOURCE_EXHAUSTED after waiting)."""


class NeverFits(NoCapacity):
    """No decode pool could ever hold the request (→ RESOURCE_EXHAUSTED at once)."""


def serving_mode(counts: dict[str, int]) -> str | None:
    """``disaggregated`` while a (prefill, decode) pair is registered, else ``colocated``
    while a colocated worker is, else None. A cluster is meant to run one mode; one that
    has both serves through its pairs. ``counts``: workers per role."""
    if counts["prefill"] and counts["decode"]:
        return "disaggregated"
    return "colocated" if counts["colocated"] else None


@dataclass
class Pending:
    """What this router has sent to one worker and not yet seen finish."""

    requests: int = 0
    pages: int = 0
    tokens: int = 0


@dataclass
class PairPolicy:
    pending: dict[str, Pending] = field(default_factory=dict)
    _turns: dict[str, itertools.count] = field(default_factory=dict)
    cache_slack: int = 4
    """Requests a decode worker may run above the least loaded one and still win on its cache."""

    def _pending(self, worker_id: str) -> Pending:
        return self.pending.setdefault(worker_id, Pending())

    def _rotation(self, workers: list[WorkerInfo], role: str) -> dict[str, int]:
        # one counter per role: a shared one would advance twice per request and,
        # with two workers of each role, always land on the same parity
        turn = next(self._turns.setdefault(role, itertools.count()))
        ids = sorted(w.worker_id for w in workers)
        return {wid: (i - turn) % len(ids) for i, wid in enumerate(ids)}

    def choose_decode(self, workers: list[WorkerInfo], need_tokens: int, *, affinity: str | None = None,
                      avoid: frozenset[str] = frozenset(), role: str = "decode",
                      cached: dict[str, int] | None = None) -> WorkerInfo:
        """``avoid``: workers that failed this request; used only when nothing else fits.
        ``role``: ``colocated`` chooses the worker that runs the whole request.
        ``cached``: leading prompt tokens each worker holds in its prefix cache."""
        decode = [w for w in workers if w.role == role]
        if not decode:
            raise NoWorkers(f"no {role} worker is registered")
        if all(w.pages_for(need_tokens) > w.total_pages for w in decode):
            biggest = max(decode, key=lambda w: w.total_pages * w.page_size)
            raise NeverFits(f"the request needs {biggest.pages_for(need_tokens)} cache pages for prompt + max_tokens; "
                            f"the largest {role} pool has {biggest.total_pages}")
        fits = [w for w in decode if w.free_pages - self._pending(w.worker_id).pages >= w.pages_for(need_tokens)]
        if not fits:
            need = sorted({w.pages_for(need_tokens) for w in decode})
            raise NoCapacity(f"no {role} worker has {' or '.join(map(str, need))} free cache pages")
        fits = [w for w in fits if w.worker_id not in avoid] or fits

        def load(w: WorkerInfo) -> int:
            return w.running + self._pending(w.worker_id).requests

        hits = {w.worker_id: (cached or {}).get(w.worker_id, 0) for w in fits}
        if any(hits.values()):
            floor = min(map(load, fits)) + self.cache_slack
            near = [w for w in fits if load(w) <= floor and hits[w.worker_id]]
            if near:
                best = max(hits[w.worker_id] for w in near)
                fits = [w for w in near if hits[w.worker_id] == best]
        for w in fits:
            if w.worker_id == affinity:
                return w
        order = self._rotation(fits, role)
        return min(fits, key=lambda w: (load(w), -(w.free_pages - self._pending(w.worker_id).pages),
                                        order[w.worker_id]))

    def choose_prefill(self, workers: list[WorkerInfo], prompt_tokens: int = 0, *,
                       avoid: frozenset[str] = frozenset(), cached: dict[str, int] | None = None) -> WorkerInfo:
        prefill = [w for w in workers if w.role == "prefill"]
        if not prefill:
            raise NoWorkers("no prefill worker is registered")
        # a worker that reports no pool size (0) is not filtered out
        large = [w for w in prefill if not w.total_pages or w.total_pages >= w.pages_for(prompt_tokens)]
        if not large:
            need = sorted({w.pages_for(prompt_tokens) for w in prefill})
            raise NeverFits(f"the prompt needs {' or '.join(map(str, need))} cache pages; "
                            "no prefill pool is that large")
        fits = [w for w in large if w.worker_id not in avoid] or large
        order = self._rotation(fits, "prefill")
        cached = cached or {}
        return min(fits, key=lambda w: (w.queued_tokens + self._pending(w.worker_id).tokens
                                        + prompt_tokens - min(prompt_tokens, cached.get(w.worker_id, 0)),
                                        order[w.worker_id]))

    # -- bookkeeping of what this router has in flight ------------------------
    def add(self, worker_id: str, *, requests: int = 0, pages: int = 0, tokens: int = 0) -> None:
        p = self._pending(worker_id)
        p.requests += requests
        p.pages += pages
        p.tokens += tokens

    def remove(self, worker_id: str, *, requests: int = 0, pages: int = 0, tokens: int = 0) -> None:
        self.add(worker_id, requests=-requests, pages=-pages, tokens=-tokens)
