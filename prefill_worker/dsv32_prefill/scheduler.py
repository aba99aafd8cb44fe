"""The prefill worker's waiting queue and batch loop (life cycle: :mod:`dsv32_prefill`).

The loop hands each finished batch's transfers to the :class:`PrefillInflightQueue`
and starts the next batch at once.
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
    enqueued_at: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    # results
    first: object = None  # StepOutput
    transfer: object = None  # TransferResult
    error: str | None = None
    queue_s: float = 0.0
    compute_s: float = 0.0
    batch_size: int = 0
    layer_sends: list = field(default_factory=list)  # (layer, start, end) of each send_layer call, monotonic s

    def fail(self, error: str) -> None:
        self.error = error
        self.done.set()


class PrefillScheduler:
    """``WaitingQueue`` + the batch loop that owns the engine; transfers end in the ``inflight`` queue."""

    def __init__(self, engine, sender, *, budget_tokens: int, max_queued_tokens: int, transfer_timeout_s: float):
        self.engine, self.sender = engine, sender
        self.budget_tokens = budget_tokens
        self.max_queued_tokens = max_queued_tokens
        self.transfer_timeout_s = transfer_timeout_s
        self._waiting: deque[PrefillJob] = deque()
        self._cv = threading.Condition()
        self._stop = False
        self.queued_tokens = 0
        self.running_tokens = 0
        self.counters = {"bytes_sent": 0, "batches": 0, "requests": 0, "failed": 0}
        self._counters_lock = threading.Lock()
        self._pages_lock = threading.Lock()  # the loop allocates while the inflight queue frees
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
        for job in self._waiting:
            job.fail("prefill worker shutting down")

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
        with self._cv:
            job.cancelled = True
            if job in self._waiting:
                self._waiting.remove(job)
                self.queued_tokens -= len(job.prompt_ids)
                job.fail("cancelled")

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def _count(self, name: str, n: int = 1) -> None:
        with self._counters_lock:
            self.counters[name] += n
        m = metrics.process()
        if name == "bytes_sent":
            m.transfer_bytes("sent").inc(n)
        elif name in ("requests", "failed"):
            m.requests("finished" if name == "requests" else "failed").inc(n)

    def _free_pages(self, page_ids: list[int]) -> None:
        with self._pages_lock:
            self.engine.allocator.free(page_ids)
        with self._cv:  # a prompt may be waiting for these pages
            self._cv.notify_all()

    def _next_batch(self, wait_s: float | None = None) -> list[PrefillJob]:
        """Arrival order, within the token budget and the free pages (always at least one job; with
        ``wait_s``, empty when nothing fits within that many seconds)."""
        with self._cv:
            while not self._stop and not self._head_fits():
                if wait_s is not None:
                    if wait_s > 0:
                        self._cv.wait(wait_s)
                    if not self._head_fits():
                        return []
                    break
                self._cv.wait(0.5)  # woken by a submit or by pages coming back; the timeout is a safety net
            if self._stop:
                return []
            batch, tokens, pages = [], 0, 0
            layout, free = self.engine.layout, self.engine.allocator.num_free
            while self._waiting:
                job = self._waiting[0]
                n, p = len(job.prompt_ids), layout.pages_for(len(job.prompt_ids))
                if batch and (tokens + n > self.budget_tokens or pages + p > free):
                    break
                self._waiting.popleft()
                self.queued_tokens -= n
                batch.append(job)
                tokens, pages = tokens + n, pages + p
            self.running_tokens = tokens
            return batch

    def _head_fits(self) -> bool:
        """A prompt waits and its pages are free, or no transfer in flight holds pages that could free up
        for it (then waiting cannot help: a prompt larger than the pool fails at allocation)."""
        if not self._waiting:
            return False
        need = self.engine.layout.pages_for(len(self._waiting[0].prompt_ids))
        return need <= self.engine.allocator.num_free or not len(self.inflight)

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
                self._prefill(batch)
            except EPGroupFailed as e:  # a peer rank is gone: this rank cannot compute anything any more
                log.error("EP group failed (%s); stopping this worker", e)
                for job in batch:
                    if not job.done.is_set():
                        job.fail(f"prefill failed: {e}")
                os.kill(os.getpid(), signal.SIGTERM)
                return
            except Exception as e:  # never leave an RPC hanging
                log.exception("prefill batch failed")
                for job in batch:
                    if not job.done.is_set():
                        job.fail(f"prefill failed: {e}")
            finally:
                self.running_tokens = 0
                self.on_change()

    def _prefill(self, batch: list[PrefillJob]) -> None:
        from dsv32_engine.engine import PrefillInput

        eng, alloc = self.engine, self.engine.allocator
        live, pages, handles = [], {}, {}
        for job in batch:
            need = eng.layout.pages_for(len(job.prompt_ids))
            if not alloc.can_allocate(need):
                job.fail(f"prompt needs {need} pages; this prefill worker's pool has {alloc.num_total}")
                continue
            with self._pages_lock:
                pages[job.request_id] = alloc.allocate(need)
            try:
                handles[job.request_id] = self.sender.begin(job.transfer_id, job.endpoint, job.decode_id,
                                                            pages[job.request_id], token=job.token)
            except Exception as e:
                self._free_pages(pages.pop(job.request_id))
                job.fail(f"KV transfer to {job.decode_id} could not start: {e}")
                continue
            live.append(job)
        try:
            if not live:
                return
            now = time.monotonic()
            for job in live:
                job.queue_s, job.batch_size = now - job.enqueued_at, len(live)
            failed: dict[str, str] = {}

            def on_layer_done(layer: int) -> None:
                for job in live:
                    if job.request_id not in failed:
                        try:
                            t = time.monotonic()
                            self.sender.send_layer(handles[job.request_id], layer)
                            job.layer_sends.append((layer, t, time.monotonic()))
                        except Exception as e:
                            failed[job.request_id] = f"KV transfer to {job.decode_id} failed at layer {layer}: {e}"

            inputs = [PrefillInput(j.request_id, j.prompt_ids, j.params, pages[j.request_id]) for j in live]
            t0 = time.monotonic()
            firsts = eng.prefill(inputs, on_layer_done=on_layer_done)
            compute = time.monotonic() - t0
            self._count("batches")
            m = metrics.process()
            m.prefill_step.observe(compute)
            m.step_beat()
            for job in live:
                m.queue_time.observe(job.queue_s)
                m.prompt_tokens.inc(len(job.prompt_ids))
            for job, first in zip(live, firsts):
                job.first, job.compute_s = first, compute
                if job.request_id in failed:
                    job.fail(failed[job.request_id])
                    continue
                # the pages stay with the transfer until it ends; the loop goes on to the next batch
                self.inflight.add(job, handles[job.request_id], pages.pop(job.request_id))
        finally:
            for job in batch:
                if job.request_id in pages:
                    self._free_pages(pages[job.request_id])
                if job.error:
                    self._count("failed")
