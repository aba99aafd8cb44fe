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
2. the session's decode worker if it qualifies (its running batch already holds
   the conversation's neighbourhood and later a prefix cache);
3. otherwise the fewest running + pending requests, then the most free pages,
   then rotation (so that equal workers take turns).

A colocated cluster (``up --colocated``) has no pairs: the request goes whole
to one colocated worker, chosen by the decode rules above (``role="colocated"``);
:func:`serving_mode` says which of the two a registry snapshot serves.

Prefill worker P: a pool large enough for the prompt, preferably one that has
not failed this request, fewest queued tokens (reported + pending from
this router), then rotation.
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

    def _pending(self, worker_id: str) -> Pending:
        return self.pending.setdefault(worker_id, Pending())

    def _rotation(self, workers: list[WorkerInfo], role: str) -> dict[str, int]:
        # one counter per role: a shared one would advance twice per request and,
        # with two workers of each role, always land on the same parity
        turn = next(self._turns.setdefault(role, itertools.count()))
        ids = sorted(w.worker_id for w in workers)
        return {wid: (i - turn) % len(ids) for i, wid in enumerate(ids)}

    def choose_decode(self, workers: list[WorkerInfo], need_tokens: int, *, affinity: str | None = None,
                      avoid: frozenset[str] = frozenset(), role: str = "decode") -> WorkerInfo:
        """``avoid``: workers that failed this request; used only when nothing else fits.
        ``role``: ``colocated`` chooses the worker that runs the whole request."""
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
        for w in fits:
            if w.worker_id == affinity:
                return w
        order = self._rotation(fits, role)
        return min(fits, key=lambda w: (w.running + self._pending(w.worker_id).requests,
                                        -(w.free_pages - self._pending(w.worker_id).pages), order[w.worker_id]))

    def choose_prefill(self, workers: list[WorkerInfo], prompt_tokens: int = 0, *,
                       avoid: frozenset[str] = frozenset()) -> WorkerInfo:
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
        return min(fits, key=lambda w: (w.queued_tokens + self._pending(w.worker_id).tokens, order[w.worker_id]))

    # -- bookkeeping of what this router has in flight ------------------------
    def add(self, worker_id: str, *, requests: int = 0, pages: int = 0, tokens: int = 0) -> None:
        p = self._pending(worker_id)
        p.requests += requests
        p.pages += pages
        p.tokens += tokens

    def remove(self, worker_id: str, *, requests: int = 0, pages: int = 0, tokens: int = 0) -> None:
        self.add(worker_id, requests=-requests, pages=-pages, tokens=-tokens)
