"""The prefill worker's waiting queue and step loop (life cycle: :mod:`dsv32_prefill`).

Each step is one forward within the token budget: a chunk of each partially prefilled prompt and the
new prompts, planned by :meth:`PrefillScheduler._plan`. A prompt whose chunk is its last has its
layers sent as they are computed and goes on to the :class:`PrefillInflightQueue`; the loop starts
the next step at once.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from dsv32_cluster import metrics
from .inflight import PrefillInflightQueue

log = logging.getLogger(__name__)

# An idle EP group re-checks for work this often (each check is one small all_reduce).
EP_IDLE_WAIT_S = 0.02


class QueueFull(Exception):
    pass


@dataclass
class PrefillJob:
    request_id: str
    prompt_ids: list[int]
    params: object  # dsv32_engine.SamplingParams
    transfer_id: str
    endpoint: str
    decode_id: str
    token: str = ""
    """The transfer's secret from the decode worker's reservation (proves this sender to its receiver)."""
    skip_tokens: int = 0
    """Leading prompt tokens (whole pages) the decode worker already holds: only the pages after them are sent."""
    cached_tokens: int = 0
    """Leading prompt tokens found in this worker's prefix cache (not computed here)."""
    enqueued_at: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    # progress (the loop's): pages from the first chunk on; prompt tokens planned into steps so far
    page_ids: list[int] | None = None
    scheduled: int = 0
    started_at: float | None = None
    # results
    first: object = None  # StepOutput
    transfer: object = None  # TransferResult
    error: str | None = None
    queue_s: float = 0.0
    compute_s: float = 0.0
    batch_size: int = 0
    chunks: int = 0
    layer_sends: list = field(default_factory=list)  # (layer, start, end) of each send_layer call, monotonic s

    def fail(self, error: str) -> None:
        self.error = error
        self.done.set()


@dataclass
class Chunk:
    """Prompt positions [start, end) of ``job`` in one step."""
    job: PrefillJob
    start: int
    end: int

    @property
    def is_last(self) -> bool:
        return self.end == len(self.job.prompt_ids)


class PrefillScheduler:
    """``WaitingQueue`` + the partially prefilled prompts + the step loop that owns the engine; transfers
    end in the ``inflight`` queue.

    Chunking (``budget_tokens`` = ``--max-num-batched-tokens`` is the size of a step): a long prompt
    runs in chunks of at most the budget, and a prompt that arrives behind it waits for the step in
    progress only. After a step that ran a chunk, the next one takes the waiting prompts that fit
    whole (arrival order), alone. Otherwise a step takes (1) half the budget for the oldest partial
    prompt (so new prompts cannot starve it), (2) waiting prompts in arrival order: whole if they fit
    in what is left, else the first chunk of one that is then partial (at least a quarter of the
    budget); a prompt that does not fit waits for the next step without holding back smaller ones
    behind it, (3) what is left to the partial prompts, oldest first. A partial prompt holds its pages
    from its first chunk on; one that is cancelled is dropped (its pages freed) before the next step.
    """

    def __init__(self, engine, sender, *, budget_tokens: int, max_queued_tokens: int, transfer_timeout_s: float):
        self.engine, self.sender = engine, sender
        self.budget_tokens = budget_tokens
        self.max_queued_tokens = max_queued_tokens
        self.transfer_timeout_s = transfer_timeout_s
        self._waiting: deque[PrefillJob] = deque()
        self._partial: list[PrefillJob] = []  # pages held, some chunks computed; oldest first
        self._chunk_ran = False  # the last step ran a chunk of a long prompt
        self._cv = threading.Condition()
        self._stop = False
        self.queued_tokens = 0
        """Prompt tokens not computed yet and not in the running step (waiting and partial prompts)."""
        self.running_tokens = 0
        """Tokens of the running step."""
        self.counters = {"bytes_sent": 0, "batches": 0, "requests": 0, "failed": 0}
        self._counters_lock = threading.Lock()
        self.pages_lock = threading.Lock()
        """Serialises the allocator: the loop allocates while the inflight queue (and the service) frees."""
        self.inflight = PrefillInflightQueue(sender, transfer_timeout_s, self._free_pages, self._count)
        self.on_change = lambda: None  # load changed (the heartbeat reports it at once)
        self._thread = threading.Thread(target=self._run, name="prefill-loop", daemon=True)

    def start(self) -> PrefillScheduler:
        self.inflight.on_change = lambda: self.on_change()
        self.inflight.start()
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=30)
        self.inflight.stop(drain_s=min(5.0, self.transfer_timeout_s))
        with self._cv:
            left = list(self._waiting) + list(self._partial)
            self._waiting.clear()
        for job in left:
            self._drop(job, "prefill worker shutting down")

    def submit(self, job: PrefillJob) -> None:
        n = len(job.prompt_ids)
        with self._cv:
            if self._stop:
                raise QueueFull("prefill worker shutting down")
            if self._waiting and self.queued_tokens + n > self.max_queued_tokens:
                raise QueueFull(f"{self.queued_tokens} prompt tokens queued (limit {self.max_queued_tokens})")
            self._waiting.append(job)
            self.queued_tokens += n
            self._cv.notify()
        self.on_change()

    def cancel(self, job: PrefillJob) -> None:
        """A waiting job leaves at once; a partial one before the next step (the loop owns its pages)."""
        with self._cv:
            job.cancelled = True
            if job in self._waiting:
                self._waiting.remove(job)
                self.queued_tokens -= len(job.prompt_ids)
                job.fail("cancelled")
            self._cv.notify_all()

    @property
    def num_waiting(self) -> int:
        """Prompts waiting for compute: not started, or partially prefilled."""
        return len(self._waiting) + len(self._partial)

    def _count(self, name: str, n: int = 1) -> None:
        with self._counters_lock:
            self.counters[name] += n
        m = metrics.process()
        if name == "bytes_sent":
            m.transfer_bytes("sent").inc(n)
        elif name in ("requests", "failed"):
            m.requests("finished" if name == "requests" else "failed").inc(n)

    def _free_pages(self, page_ids: list[int]) -> None:
        with self.pages_lock:
            self.engine.allocator.free(page_ids)
        with self._cv:  # a prompt may be waiting for these pages
            self._cv.notify_all()

    def _drop(self, job: PrefillJob, error: str) -> None:
        """End a job the loop holds (partial or in a failed step): its pages back, its tokens off the books."""
        with self._cv:
            if job in self._partial:
                self._partial.remove(job)
            self.queued_tokens -= len(job.prompt_ids) - job.scheduled
            job.scheduled = len(job.prompt_ids)
        pages, job.page_ids = job.page_ids, None
        if pages:
            self._free_pages(pages)
        if not job.done.is_set():
            job.fail(error)
            self._count("failed")

    # -- the loop ---------------------------------------------------------------------------------
    def _next_batch(self, wait_s: float | None = None) -> list[Chunk]:
        """The next step's chunks (at least one when anything can run; with ``wait_s``, empty when
        nothing can within that many seconds)."""
        with self._cv:
            for job in [j for j in self._partial if j.cancelled]:  # between chunks: drop it now
                self._drop(job, "cancelled")
            while not self._stop and not self._can_step():
                if wait_s is not None:
                    if wait_s > 0:
                        self._cv.wait(wait_s)
                    if not self._can_step():
                        return []
                    break
                self._cv.wait(0.5)  # woken by a submit or by pages coming back; the timeout is a safety net
            if self._stop:
                return []
            batch = self._plan()
            for c in batch:
                c.job.scheduled = c.end
                self.queued_tokens -= c.end - c.start
            self.running_tokens = sum(c.end - c.start for c in batch)
            return batch

    def _can_step(self) -> bool:
        """A partial prompt can go on, or the oldest waiting prompt's pages are free (or it needs more
        than the whole pool: then waiting cannot help, it fails at allocation)."""
        if self._partial:
            return True
        if not self._waiting:
            return False
        need = self.engine.layout.pages_for(len(self._waiting[0].prompt_ids))
        return need <= self.engine.allocator.num_free or need > self.engine.allocator.num_total

    def _plan(self) -> list[Chunk]:
        """One step's chunks within the budget (the rules of :class:`PrefillScheduler`'s docstring)."""
        budget = self.budget_tokens
        if self._partial and self._chunk_ran:  # prompts that fit whole go now, without another chunk
            batch = self._admit(budget, whole_only=True)
            if batch:
                self._chunk_ran = False
                return batch
        left = {j.request_id: len(j.prompt_ids) - j.scheduled for j in self._partial}
        reserve = min(left[self._partial[0].request_id], max(1, budget // 2)) if self._partial else 0
        new = self._admit(budget - reserve, whole_only=False)
        room = budget - sum(c.end - c.start for c in new)
        batch, started = [], {id(c.job) for c in new}
        for job in self._partial:
            if id(job) in started or room <= 0:
                continue
            take = min(left[job.request_id], room)
            batch.append(Chunk(job, job.scheduled, job.scheduled + take))
            room -= take
        batch += new
        self._chunk_ran = any(not (c.start == c.job.cached_tokens and c.is_last) for c in batch)
        return batch

    def _admit(self, room: int, whole_only: bool) -> list[Chunk]:
        """Waiting prompts in arrival order within ``room`` tokens and the free pages: whole, or (unless
        ``whole_only``) the first chunk of one that is partial from then on."""
        layout, alloc = self.engine.layout, self.engine.allocator
        free, new = alloc.num_free, []
        for job in list(self._waiting):
            if room <= 0:
                break
            with self.pages_lock:  # a session release may evict between the lookup and the acquire
                hits = self.engine.match_prefix(job.prompt_ids, job.params, acquire=False)
                cached = len(hits) * layout.page_size
                n = len(job.prompt_ids) - cached
                need = layout.pages_for(len(job.prompt_ids)) - len(hits)
                if need > alloc.num_total:  # can never fit: the step fails it at allocation
                    if new or whole_only:
                        break
                    take = n
                elif need > free:
                    break  # pages in arrival order: later prompts do not take the pages this one waits for
                elif n <= room:
                    take = n
                elif not whole_only and room >= max(1, self.budget_tokens // 4):
                    take = room  # the first chunk; the job is partial from now on
                else:
                    continue  # too long for what is left of this step: it goes first in the next
                if cached:  # its prefix pages are the job's from now on (freed with the rest)
                    alloc.acquire(hits)
                    job.page_ids, job.cached_tokens = hits, cached
                    job.scheduled = cached
                    self.queued_tokens -= cached
            self._waiting.remove(job)
            new.append(Chunk(job, cached, cached + take))
            room, free = room - take, free - min(need, free)
            if take < n:
                self._partial.append(job)
        return new

    def _run(self) -> None:
        from dsv32_engine.parallel import EPGroupFailed

        ep = self.engine.ep is not None
        while True:
            # In an EP group the ranks step in lockstep: a rank without a batch joins its peers' steps
            # (idle_step) and only waits for work when the whole group was idle.
            batch = self._next_batch((EP_IDLE_WAIT_S if self.engine.group_idle else 0.0) if ep else None)
            if self._stop:
                return
            try:
                if not batch:
                    self.engine.idle_step()
                    continue
            except EPGroupFailed as e:
                log.error("EP group failed (%s); stopping this worker", e)
                os.kill(os.getpid(), signal.SIGTERM)
                return
            try:
                self._step(batch)
            except EPGroupFailed as e:  # a peer rank is gone: this rank cannot compute anything any more
                log.error("EP group failed (%s); stopping this worker", e)
                for c in batch:
                    self._drop(c.job, f"prefill failed: {e}")
                os.kill(os.getpid(), signal.SIGTERM)
                return
            except Exception as e:  # never leave an RPC hanging, nor pages held
                log.exception("prefill step failed")
                for c in batch:
                    if not (c.is_last and c.job.first is not None):  # those went on to the inflight queue
                        self._drop(c.job, f"prefill failed: {e}")
            finally:
                self.running_tokens = 0
                self.on_change()

    def _step(self, batch: list[Chunk]) -> None:
        """One forward. Pages for each new prompt; a transfer for each prompt whose chunk is its last
        (its layers are sent as they are computed: the earlier chunks' cache is already complete)."""
        from dsv32_engine.engine import PrefillInput

        eng, alloc = self.engine, self.engine.allocator
        live, handles, now = [], {}, time.monotonic()
        for c in batch:
            job = c.job
            if job.started_at is None:  # its first chunk: pages for all but its cached prefix
                held = job.page_ids or []
                need = eng.layout.pages_for(len(job.prompt_ids)) - len(held)
                if not alloc.can_allocate(need):
                    self._drop(job, f"prompt needs {need} pages; this prefill worker's pool has {alloc.num_total}")
                    continue
                with self.pages_lock:
                    job.page_ids = held + alloc.allocate(need)
                if eng.prefix is not None:
                    eng.prefix.lookup_tokens += len(job.prompt_ids)
                    eng.prefix.hit_tokens += job.cached_tokens
                job.started_at, job.queue_s = now, now - job.enqueued_at
                metrics.process().queue_time.observe(job.queue_s)
            if c.is_last:
                try:
                    send = job.page_ids[eng.layout.pages_for(job.skip_tokens):]  # whole pages
                    handles[job.request_id] = self.sender.begin(job.transfer_id, job.endpoint, job.decode_id,
                                                                send, token=job.token)
                except Exception as e:
                    self._drop(job, f"KV transfer to {job.decode_id} could not start: {e}")
                    continue
            live.append(c)
        if not live:
            return
        failed: dict[str, str] = {}
        last = [c.job for c in live if c.is_last]

        def on_layer_done(layer: int) -> None:
            for job in last:
                if job.request_id not in failed:
                    try:
                        t = time.monotonic()
                        self.sender.send_layer(handles[job.request_id], layer)
                        job.layer_sends.append((layer, t, time.monotonic()))
                    except Exception as e:
                        failed[job.request_id] = f"KV transfer to {job.decode_id} failed at layer {layer}: {e}"

        inputs = [PrefillInput(c.job.request_id, c.job.prompt_ids, c.job.params, c.job.page_ids, start=c.start,
                               end=c.end) for c in live]
        t0 = time.monotonic()
        firsts = eng.prefill(inputs, on_layer_done=on_layer_done)
        t1 = time.monotonic()
        self._count("batches")
        m = metrics.process()
        m.prefill_step.observe(t1 - t0)
        m.step_beat()
        m.prompt_tokens.inc(sum(c.end - c.start for c in live))
        for c, first in zip(live, firsts):
            job = c.job
            job.chunks += 1
            if not c.is_last:
                continue
            job.first, job.compute_s, job.batch_size = first, t1 - job.started_at, len(live)
            if job.request_id in failed:
                self._drop(job, failed[job.request_id])
                continue
            with self._cv:
                if job in self._partial:
                    self._partial.remove(job)
            # the pages stay with the transfer until it ends; the loop goes on to the next step
            pages, job.page_ids = job.page_ids, None
            self.inflight.add(job, handles[job.request_id], pages)
