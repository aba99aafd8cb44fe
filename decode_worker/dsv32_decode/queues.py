"""The decode worker's queues (see :mod:`dsv32_decode` for the life cycle).

* :class:`PreallocQueue` — reservations: pages taken from the engine's pool
  for a request whose KV is on its way, with a lease; nothing runs yet.
* :class:`RunningBatch` — the loop thread that owns the engine: it admits
  verified requests (``EngineCore.add_prefilled``), or, on a colocated worker,
  prompts the engine prefills itself (``EngineCore.add_request``: chunked
  prefill mixed into the decode steps), applies aborts, and steps the
  continuous batch, handing each request's tokens to its output queue.

One lock (``engine_lock``) serialises everything that touches the engine or
its allocator: the loop holds it for one ``step()``; a reservation holds it to
take pages.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from dsv32_cluster import metrics

# An idle EP group re-checks for work this often (each check is one small all_reduce).
EP_IDLE_WAIT_S = 0.02

log = logging.getLogger(__name__)


@dataclass
class Reservation:
    request_id: str
    transfer_id: str
    page_ids: list[int]
    commit_pages: int
    """Pages the request may grow to (prompt + max_tokens): admission is checked
    against these, so a running request never has to be preempted (which would
    recompute its prompt here)."""
    prefill_worker_id: str
    expires_at: float
    taken: bool = False
    cached_pages: int = 0
    """The first ``cached_pages`` of ``page_ids`` came from the prefix cache (the prompt's leading
    tokens are already here): only the rest is transferred."""
    local: bool = False
    """The uncached rest of the prompt is short: this worker prefills it (no transfer)."""
    session_id: str = ""

    @property
    def transfer_pages(self) -> list[int]:
        """The pages the KV transfer writes (none when the prompt is prefilled here)."""
        return [] if self.local else self.page_ids[self.cached_pages:]


class PreallocQueue:
    """Reservations by request id, with capacity accounting and lease expiry."""

    def __init__(self, engine, engine_lock: threading.Lock, release_transfer):
        self.engine, self.lock = engine, engine_lock
        self.release_transfer = release_transfer  # (transfer_id) -> None, stops the receiver side
        self._by_id: dict[str, Reservation] = {}
        self._mu = threading.Lock()
        self.committed_pages = 0  # reserved + running requests' commitments
        self.on_change = lambda: None  # load changed (the heartbeat reports it at once)

    def reserve(self, request_id: str, transfer_id: str, num_prompt: int, max_tokens: int, prefill_worker_id: str,
                lease_s: float, prompt_pages: bool = True, prompt_ids: list[int] | None = None,
                params=None, local_prefill_tokens: int = 0, session_id: str = "") -> Reservation | None:
        """Pages for the prompt now, capacity for prompt + max_tokens; None if full.
        ``prompt_pages=False`` (colocated worker): capacity only; the engine takes
        the pages itself as it prefills, within the commitment.
        ``prompt_ids``: the prompt's leading full pages that the prefix cache holds are acquired instead
        of allocated (and not transferred); if what is left is at most ``local_prefill_tokens``, this
        worker prefills it itself (``local``) and takes no page for it now."""
        layout = self.engine.layout
        commit = layout.pages_for(num_prompt + max_tokens)
        with self._mu:
            if request_id in self._by_id:
                raise KeyError(f"request {request_id} already holds a reservation here")
            if self.committed_pages + commit > self.engine.allocator.num_total:
                return None
            pages, cached, local = [], 0, False
            if prompt_pages:  # (the engine lock is held for a whole step: not taken when there is nothing to take)
                with self.lock:
                    if prompt_ids:
                        pages = self.engine.match_prefix(prompt_ids, params)
                        cached = len(pages)
                        local = bool(cached) and num_prompt - cached * layout.page_size <= local_prefill_tokens
                    need_now = 0 if local else layout.pages_for(num_prompt) - cached
                    if not self.engine.allocator.can_allocate(need_now):
                        if pages:
                            self.engine.allocator.free(pages)
                        return None
                    pages += self.engine.allocator.allocate(need_now)
            self.committed_pages += commit
            res = Reservation(request_id, transfer_id, pages, commit, prefill_worker_id, time.monotonic() + lease_s,
                              cached_pages=cached, local=local, session_id=session_id)
            self._by_id[request_id] = res
        self.on_change()
        return res

    def cancel(self, request_id: str) -> str:
        """Drop a reservation no stream has taken (its pages are freed): ``"dropped"``; ``"taken"`` if a
        ``Decode`` stream owns it now (the stream's path frees it); ``"unknown"`` otherwise. Atomic with
        :meth:`take`, so a page is never freed by both."""
        with self._mu:
            res = self._by_id.get(request_id)
            if res is None:
                return "unknown"
            if res.taken:
                return "taken"
        return "dropped" if self.drop(request_id, free_pages=True, untaken_only=True) is not None else "taken"

    def renew(self, request_id: str, lease_s: float, cap_at: float) -> None:
        """Progress was seen (the KV is arriving): push the lease ``lease_s`` ahead, never past ``cap_at``."""
        with self._mu:
            res = self._by_id.get(request_id)
            if res is not None:
                res.expires_at = max(res.expires_at, min(time.monotonic() + lease_s, cap_at))

    def get(self, request_id: str) -> Reservation | None:
        with self._mu:
            return self._by_id.get(request_id)

    def take(self, request_id: str, transfer_id: str) -> Reservation | None:
        """Hand a reservation over to its Decode stream (ends the lease)."""
        with self._mu:
            res = self._by_id.get(request_id)
            if res is None or res.transfer_id != transfer_id or res.taken:
                return None
            res.taken = True
            return res

    def drop(self, request_id: str, free_pages: bool, untaken_only: bool = False) -> Reservation | None:
        """Forget a reservation. ``free_pages``: the engine never took the pages over. ``untaken_only``:
        leave it alone if a ``Decode`` stream has taken it meanwhile."""
        with self._mu:
            res = self._by_id.get(request_id)
            if res is None or (untaken_only and res.taken):
                return None
            del self._by_id[request_id]
            self.committed_pages -= res.commit_pages
        if free_pages:
            with self.lock:
                self.engine.allocator.free(res.page_ids)
            self.release_transfer(res.transfer_id)
        self.on_change()
        return res

    def expire(self, now: float | None = None) -> list[str]:
        now = time.monotonic() if now is None else now
        with self._mu:
            stale = [r.request_id for r in self._by_id.values() if not r.taken and r.expires_at <= now]
        dropped = []
        for rid in stale:
            if self.drop(rid, free_pages=True, untaken_only=True) is not None:
                log.warning("reservation for %s expired before its Decode stream; pages freed", rid)
                dropped.append(rid)
        return dropped

    def __len__(self) -> int:
        return len(self._by_id)

    def reserved_pages(self) -> int:
        with self._mu:
            return sum(len(r.page_ids) for r in self._by_id.values() if not r.taken)


@dataclass
class Admission:
    request_id: str
    prompt_ids: list[int]
    params: object  # dsv32_engine.SamplingParams
    page_ids: list[int] | None
    """The received prompt cache; None: the engine prefills the prompt itself (colocated)."""
    first: object  # dsv32_engine.engine.StepOutput from the prefill worker; None when colocated
    cached_pages: list[int] = field(default_factory=list)
    """With ``page_ids`` None: the prompt's leading pages from this worker's prefix cache, handed to the
    engine, which prefills only the rest."""
    session_id: str = ""
    generated: list[int] = field(default_factory=list)  # token ids streamed so far
    created: float = field(default_factory=time.monotonic)
    out: queue.Queue = field(default_factory=queue.Queue)
    """Receives lists of StepOutput, then ``None`` when the request leaves the
    batch (an exception instead if the engine refused or failed it)."""


class RunningBatch:
    """The loop thread: admit, abort, step, dispatch. The only caller of the engine after startup."""

    def __init__(self, engine, engine_lock: threading.Lock, on_leave, idle_wait_s: float = 0.05):
        self.engine, self.lock, self.on_leave = engine, engine_lock, on_leave
        self.on_finished = lambda adm: None  # a request left the batch having finished (not aborted)
        self.idle_wait_s = idle_wait_s
        self._inbox: deque = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._live: dict[str, Admission] = {}
        # Aborts of requests not in the batch (yet): an admission that comes after its cancel is refused.
        self._aborted_early: OrderedDict[str, None] = OrderedDict()
        self.steps = 0
        self.finished = 0
        self.aborted = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="decode-loop", daemon=True)

    def start(self) -> RunningBatch:
        self._thread.start()
        return self

    def admit(self, adm: Admission) -> None:
        self._inbox.append(("admit", adm))
        self._wake.set()

    def abort(self, request_id: str) -> None:
        self._inbox.append(("abort", request_id))
        self._wake.set()

    @property
    def running(self) -> int:
        return len(self._live)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    def _leave(self, rid: str, aborted: bool) -> None:
        adm = self._live.pop(rid, None)
        if adm is None:
            return
        if aborted:
            self.aborted += 1
        else:
            self.finished += 1
        metrics.process().requests("aborted" if aborted else "finished").inc()
        adm.out.put(None)
        if not aborted:
            try:
                self.on_finished(adm)
            except Exception:
                log.exception("after %s finished", rid)
        self.on_leave(rid)

    def _drain_inbox(self) -> None:
        while self._inbox:
            kind, item = self._inbox.popleft()
            if kind == "admit":
                self._live[item.request_id] = item
                if self._aborted_early.pop(item.request_id, 0) is None:  # cancelled before it got here
                    self._refuse(item, None)
                    continue
                try:
                    with self.lock:
                        if item.page_ids is None:
                            self.engine.add_request(item.request_id, item.prompt_ids, item.params,
                                                    cached_pages=item.cached_pages)
                            metrics.process().prompt_tokens.inc(len(item.prompt_ids))
                        else:
                            self.engine.add_prefilled(item.request_id, item.prompt_ids, item.params, item.page_ids,
                                                      item.first)
                            item.generated.append(item.first.token_id)
                except Exception as e:  # refused: the pages never became the engine's
                    log.error("admission of %s refused: %s", item.request_id, e)
                    self._refuse(item, e)
                    continue
                if item.first is not None and item.first.finished:  # EOS or max_tokens=1: finished at admission
                    self._leave(item.request_id, aborted=False)
            elif item in self._live:
                try:
                    with self.lock:
                        self.engine.abort(item)
                except Exception:  # one bad abort must not take every other stream down with the loop
                    log.exception("abort of %s", item)
                self._leave(item, aborted=True)
            else:
                self._aborted_early[item] = None
                while len(self._aborted_early) > 4096:
                    self._aborted_early.popitem(last=False)

    def _refuse(self, item: Admission, error: Exception | None) -> None:
        """An admission that does not run: its pages go back, its stream ends (``error`` or aborted)."""
        if item.page_ids or item.cached_pages:
            try:
                with self.lock:
                    self.engine.allocator.free(item.page_ids or item.cached_pages)
            except Exception:
                log.exception("freeing the pages of refused %s", item.request_id)
        if error is not None:
            item.out.put(error)
        self._leave(item.request_id, aborted=True)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_inbox()
                ep = self.engine.ep is not None
                if not self._live:
                    # Without EP: sleep until work comes. In an EP group the ranks step in lockstep: a rank
                    # without requests still joins every step (its peers' MoE layers need it) and only
                    # waits when the last step found the whole group idle.
                    if not ep or self.engine.group_idle:
                        self._wake.wait(EP_IDLE_WAIT_S if ep else self.idle_wait_s)
                        self._wake.clear()
                    if not ep:
                        continue
                t0 = time.monotonic()
                with self.lock:
                    outs = self.engine.step()
                self.steps += 1
                m = metrics.process()
                m.decode_step.observe(time.monotonic() - t0)
                m.step_beat()
                m.generation_tokens.inc(len(outs))
                by_rid: dict[str, list] = {}
                for o in outs:
                    by_rid.setdefault(o.request_id, []).append(o)
                for rid, tokens in by_rid.items():
                    adm = self._live.get(rid)
                    if adm is None:
                        continue
                    adm.generated += [t.token_id for t in tokens]
                    adm.out.put(tokens)
                    if tokens[-1].finished:
                        self._leave(rid, aborted=False)
        except BaseException as e:  # the engine failed: fail every stream, let the process exit
            log.exception("decode loop failed")
            self.error = e
            for rid in list(self._live):
                self._leave(rid, aborted=True)
